"""Issue 12: can the energy head rank tokens the way the oracle does?
`measure_ranking.py` found integrated gradients along the mask (an oracle that
sees the dense network) keep more answers than the head at every deletion
fraction. This trains a head of the same shape on that oracle: on augmented
training views, each token's target energy is its place in the image's
cumulative share of positive attribution, minus `--share` (so a token is kept
while the tokens ranked above it hold less than that share: keep varies per
image). Evaluated against the package's head on the held-out views: deletion
area by energy, and agreement against keep at a sweep of energy offsets.

    python3 -m ersm_training.train_rank --data /tmp/data \
        --head models/mobilenet_v2_ersm/model.onnx --out /tmp/rank
"""

import argparse
import json
from dataclasses import replace
import os
import random
import time

import torch
import torch.nn.functional as F

from . import data
from .measure_ranking import DELETED, keep_top, mask_ig, runner
from .measure_semantics import head_from_onnx
from .semantics import CUT, ZERO, Suffix
import torch.nn as nn

from .train import CUT_C, HEAD_CONVS, HIDDEN, ConvHead, EnergyHead, hard_mask, load_backbone, weights_path


def target_energy(ig, share):
    """Per token: cumulative share of the image's positive attribution held by the
    tokens ranked at or above it, minus `share`. Negative for the smallest set of
    top tokens that holds `share`; monotone in the token's rank."""
    b = ig.shape[0]
    flat = ig.flatten(1).clamp_min(0)
    order = flat.argsort(1, descending=True)
    sorted_v = flat.gather(1, order)
    cum = sorted_v.cumsum(1) / sorted_v.sum(1, keepdim=True).clamp_min(1e-12)
    # Exclusive cumulative share: the first token starts at 0, so it is always kept.
    cum = torch.cat([torch.zeros(b, 1), cum[:, :-1]], 1)
    out = torch.empty_like(flat).scatter_(1, order, cum)
    return (out - share).view_as(ig)


def spread_target(ig, share):
    """`target_energy` rescaled on each side of the threshold: tokens inside the
    share span -1..0, the rest 0..+1, so moving the threshold by a fixed offset
    moves the kept share by a similar amount on either side (the plain target
    bunches every dropped token within 1 - share of zero, so keep falls off a
    cliff when the threshold rises)."""
    t = target_energy(ig, share)
    return torch.where(t < 0, t / share, t / (1 - share))


def make_head(kind):
    if kind == "local":
        return EnergyHead(CUT_C)
    if kind in ("context", "wide"):
        return ContextHead(CUT_C, kind == "wide")
    return ConvHead(CUT_C, HEAD_CONVS[kind])


class ContextHead(EnergyHead):
    """The head with what a local head cannot see: the unary cost also reads
    the image's mean and spread of features (one pooled vector per frame), and
    `wide` adds two 3×3 convs (a 5×5-token neighbourhood) before it."""

    def __init__(self, c, wide=False):
        super().__init__(c)
        self.wide = wide
        cin = c
        if wide:
            self.pre = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
            cin = c
        self.l1 = nn.Conv2d(cin + 2 * c, HIDDEN, 1)

    def unary(self, x):
        g = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)[:, :, None, None].expand(-1, -1, *x.shape[2:])
        h = self.pre(x) if self.wide else x
        return self.l2(F.relu(self.l1(torch.cat([h, g], 1))))


def features_and_ig(teacher, suffix, xs, batch):
    fs, igs, dense = [], [], []
    for i in range(0, len(xs), batch):
        x = torch.stack(xs[i:i + batch])
        with torch.no_grad():
            f = teacher.features[:CUT](x)
            full = torch.ones(len(f), 1, f.shape[2], f.shape[3])
            d = suffix.run(f, full, ZERO)[0]
        igs.append(mask_ig(suffix, f, d.argmax(1)))
        fs.append(f)
        dense.append(d)
    return torch.cat(fs), torch.cat(igs), torch.cat(dense)


def energies(head, f, offset=0.0):
    """The head's final energies (N×1×H×W) on features f, `offset` added to
    its unary cost (where export_head.py bakes it), in batches."""
    with torch.no_grad():
        return torch.cat([head(f[i:i + 64], offset)[0] for i in range(0, len(f), 64)])


def offset_points(run, e, offsets):
    """Keep, agreement and MACs with the energies `e` (N×H×W) moved by each offset."""
    points = []
    for off in offsets:
        m = hard_mask(e[:, None] + off)
        agree, macs = run(m)
        keep = m.flatten(1).mean(1)
        points.append({"offset": off, "keep_mean": keep.mean().item(), "keep_min": keep.min().item(),
                       "keep_max": keep.max().item(), "agreement": agree, "mac_fraction": macs})
    return points


def evaluate(suffix, head, f, dense, offsets, sem=ZERO):
    """Deletion in the head's energy order and agreement at each energy offset,
    with suffix MACs, under semantics `sem`."""
    e = energies(head, f)[:, 0]
    run = runner(suffix, f, dense, sem)
    out = {"rule": sem.down, "deletion": [], "deletion_macs": []}
    for d in DELETED:
        agree, macs = run(keep_top(-e, 1 - d))
        out["deletion"].append(agree)
        out["deletion_macs"].append(macs)
    out["area"] = sum((a + b) / 2 * 0.1 for a, b in zip(out["deletion"], out["deletion"][1:])) / 0.9
    out["offsets"] = offset_points(run, e, offsets)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--head", required=True, help="package whose head is the baseline")
    ap.add_argument("--out", required=True)
    ap.add_argument("--views", type=int, default=2400)
    ap.add_argument("--share", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--eval-only", action="store_true", help="evaluate OUT/head.pt under both stride rules")
    ap.add_argument("--head-kind", choices=["local", "context", "wide", "conv", "sep"], default="local",
                    help="local: the runtime's head; context: + the image's pooled features; wide: + two 3x3 convs; "
                         "conv: two 3x3 convs, no pooled features; sep: the same, depthwise-separable")
    ap.add_argument("--target", choices=["plain", "spread", "mix"], default="plain",
                    help="plain: cumulative share minus --share, x4; spread: each side rescaled to -1..0 / 0..1, x2; "
                         "mix: half the --head package's own energies, half the spread target")
    ap.add_argument("--rule", choices=["any", "centre"], default="any", help="stride rule of the evaluation")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    teacher = load_backbone(weights_path())
    suffix = Suffix(teacher)
    cache = os.path.join(args.out, f"cache{args.views}.pt")
    _, held, stamps, images = data.training_images(args.data)
    t0 = time.time()
    if os.path.exists(cache):
        tf, tig, td, hf, hig, hd = torch.load(cache, weights_only=True)
    else:
        views = data.Views(images, stamps)
        xs = [data.runtime_view(im) for im in images] + [views.one() for _ in range(args.views)]
        tf, tig, td = features_and_ig(teacher, suffix, xs, 32)
        print(f"training views {len(xs)}: {time.time() - t0:.0f} s", flush=True)
        hx = [v for _, v in data.held_out_views(args.data, held)]
        hf, hig, hd = features_and_ig(teacher, suffix, hx, 32)
        torch.save((tf, tig, td, hf, hig, hd), cache)
    print(f"features and attributions: {time.time() - t0:.0f} s", flush=True)

    offsets = [-1.5, -1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5]
    if args.eval_only:
        head = make_head(args.head_kind)
        head.load_state_dict(torch.load(os.path.join(args.out, f"head-{args.head_kind}{args.tag}.pt"),
                                        weights_only=True))
        head.eval()
        rows = []
        for rule in ("any", "centre"):
            sem = replace(ZERO, down=rule)
            for name, h in (("package head", head_from_onnx(args.head)), ("attribution-trained head", head)):
                r = evaluate(suffix, h, hf, hd, offsets, sem)
                r["head"] = name
                rows.append(r)
                print(json.dumps(r), flush=True)
        with open(os.path.join(args.out, "rank_eval.json"), "w") as fh:
            json.dump({"views": len(hf), "rows": rows}, fh, indent=1)
        return
    sem = replace(ZERO, down=args.rule)
    base = evaluate(suffix, head_from_onnx(args.head), hf, hd, offsets, sem)
    print("package head:", json.dumps(base), flush=True)

    head = make_head(args.head_kind)
    opt = torch.optim.Adam(head.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    if args.target == "spread":
        target = spread_target(tig, args.share)[:, None] * 2.0
    elif args.target == "mix":
        # The package head keeps whole the images it cannot rank (section 7);
        # the attribution ranks tokens within an image. Half of each.
        own = energies(head_from_onnx(args.head), tf)
        target = 0.5 * own + 0.5 * spread_target(tig, args.share)[:, None] * 2.0
    else:
        target = target_energy(tig, args.share)[:, None] * 4.0  # energies of order ±1..4
    for step in range(args.steps):
        idx = torch.randint(0, len(tf), (64,))
        e, _ = head(tf[idx])
        loss = F.smooth_l1_loss(e, target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f} keep(hard) {(e < 0).float().mean().item():.3f}", flush=True)
    head.eval()
    trained = evaluate(suffix, head, hf, hd, offsets, sem)
    print(f"IG head ({args.head_kind}):", json.dumps(trained), flush=True)
    # Oracle ceiling on the same views: the attribution itself as the energy.
    oracle = {"area": None,
              "offsets": offset_points(runner(suffix, hf, hd, sem), target_energy(hig, args.share) * 4.0, offsets)}
    print("oracle (attribution as energy):", json.dumps(oracle), flush=True)
    torch.save(head.state_dict(), os.path.join(args.out, f"head-{args.head_kind}{args.tag}.pt"))
    with open(os.path.join(args.out, f"rank-{args.head_kind}{args.tag}.json"), "w") as fh:
        json.dump({"args": vars(args), "package_head": base, "ig_head": trained, "oracle": oracle,
                   "train_views": len(tf), "held_out_views": len(hf)}, fh, indent=1)


if __name__ == "__main__":
    main()
