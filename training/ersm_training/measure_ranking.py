"""Issue 12: is the head's token ranking what loses the answers, or the suffix?
With torchvision's suffix unchanged, delete tokens at the cut in the order of
each ranking and measure top-1 agreement with the dense network on the held-out
views, under the `any` and `centre` stride rules. Rankings: the package's energy
head, feature magnitude, random, and oracles that see the dense network's
gradient (which the runtime cannot): first-order |features x gradient| and
integrated gradients along the mask. If an oracle keeps far more answers than
the head, a better head is the lever; if not, the suffix is.

    python3 -m ersm_training.measure_ranking --data /tmp/data \
        --head models/mobilenet_v2_ersm/model.onnx --out /tmp/ranking.json

`--package` measures the head's own package as ersm runs it instead: its
semantics (fill vectors when it has them) and stride rule, the energy,
magnitude and random orders only (runs/ranking_package.json for the
bundled package; runs/ranking_fills.json for a copy filled with
`add_fills.py --pool all`).
"""

import argparse
import json
import os
import time
from dataclasses import replace

import torch

from . import data
from .measure_semantics import head_from_onnx, package_fills, package_semantics
from .semantics import CUT, ZERO, Suffix, dense_macs
from .train import load_backbone, weights_path

DELETED = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def top1_logit(suffix, f, m, target, sem):
    logits, _ = suffix.run(f, m, sem)
    return logits.gather(1, target[:, None])[:, 0]


def gradient_importance(suffix, f, target):
    """|sum_c f * d(top-1 logit)/df| per token: the first-order effect of zeroing it."""
    f = f.clone().requires_grad_(True)
    full = torch.ones(f.shape[0], 1, f.shape[2], f.shape[3])
    s = top1_logit(suffix, f, full, target, ZERO).sum()
    (g,) = torch.autograd.grad(s, f)
    return (f * g).sum(1).abs().detach()


def mask_ig(suffix, f, target, steps=8):
    """Integrated gradients of the top-1 logit along the mask from all-dropped to
    all-kept: a token's share of the answer, counting its interactions. Strided
    layers average the mask: along this path it equals every stride rule, and
    no position of a 2×2 block is favoured."""
    sem = replace(ZERO, down="mean")
    total = torch.zeros(f.shape[0], f.shape[2], f.shape[3])
    for k in range(steps):
        a = (k + 0.5) / steps
        m = torch.full((f.shape[0], 1, f.shape[2], f.shape[3]), a, requires_grad=True)
        s = top1_logit(suffix, f, m, target, sem).sum()
        (g,) = torch.autograd.grad(s, m)
        total += g[:, 0] / steps
    return total


def runner(suffix, f, dense, sem):
    """mask -> (top-1 agreement with `dense`, mean suffix MAC fraction) on features f."""
    target = dense.argmax(1)
    total = dense_macs(suffix.model, f)

    def run(m):
        with torch.no_grad():
            res = [suffix.run(f[i:i + 64], m[i:i + 64], sem) for i in range(0, len(f), 64)]
        logits, macs = torch.cat([r[0] for r in res]), torch.cat([r[1] for r in res])
        return (logits.argmax(1) == target).float().mean().item(), (macs / total).mean().item()

    return run


def keep_top(score, keep):
    """Mask keeping the `keep` fraction of tokens with the highest score (at least one)."""
    n = score[0].numel()
    k = max(1, round(keep * n))
    flat = score.flatten(1)
    idx = flat.topk(k, 1).indices
    m = torch.zeros_like(flat).scatter_(1, idx, 1.0)
    return m.view(score.shape[0], 1, *score.shape[1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--head", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--package", action="store_true",
                    help="the head's package semantics and stride rule, no oracles")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    torch.manual_seed(0)
    model = load_backbone(weights_path())
    _, held = data.load_photos(args.data)
    views = data.held_out_views(args.data, held)
    x = torch.stack([v for _, v in views])
    suffix = Suffix(model)
    head = head_from_onnx(args.head)
    with torch.no_grad():
        f = torch.cat([model.features[:CUT](x[i:i + 64]) for i in range(0, len(x), 64)])
        full = torch.ones(len(f), 1, f.shape[2], f.shape[3])
        dense = torch.cat([suffix.run(f[i:i + 64], full[i:i + 64], ZERO)[0] for i in range(0, len(f), 64)])
        energy = head(f)[0][:, 0]
    target = dense.argmax(1)
    t0 = time.time()
    scores = {
        "energy (head)": -energy,
        "magnitude": f.pow(2).sum(1),
        "random": torch.rand(energy.shape, generator=torch.Generator().manual_seed(1)),
    }
    if args.package:
        sems = [(package_semantics(args.head).down, package_semantics(args.head))]
        suffix = Suffix(model, package_fills(args.head))
    else:
        sems = [(rule, replace(ZERO, down=rule)) for rule in ("any", "centre")]
    grad, ig = [], []
    for i in range(0 if not args.package else len(f), len(f), args.batch):
        sl = slice(i, i + args.batch)
        grad.append(gradient_importance(suffix, f[sl], target[sl]))
        ig.append(mask_ig(suffix, f[sl], target[sl]))
    if grad:
        scores["oracle |f x grad|"] = torch.cat(grad)
        scores["oracle mask IG"] = torch.cat(ig)
        print(f"oracles: {time.time() - t0:.0f} s", flush=True)
    rows = []
    for rule, sem in sems:
        for name, sc in scores.items():
            run = runner(suffix, f, dense, sem)
            curve = []
            for d in DELETED:
                agree, macs = run(keep_top(sc, 1 - d))
                curve.append({"deleted": d, "agreement": agree, "mac_fraction": macs})
            area = sum((a["agreement"] + b["agreement"]) / 2 * (b["deleted"] - a["deleted"])
                       for a, b in zip(curve, curve[1:])) / (DELETED[-1] - DELETED[0])
            rows.append({"rule": rule, "ranking": name, "area": area, "curve": curve})
            pts = " ".join(f"{p['agreement']:5.1%} ({p['mac_fraction']:.2f})" for p in curve[1:])
            print(f"{rule:<7} {name:<26} area {area:.3f} | {pts}", flush=True)
    with open(args.out, "w") as fh:
        json.dump({"views": len(views), "deleted": DELETED, "semantics": [s.name() for _, s in sems],
                   "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
