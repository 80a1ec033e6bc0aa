#!/usr/bin/env python3
"""ersm's ERSM path, ersm's dense path and ONNX Runtime's dense run of the same
network, side by side, on the same images and the same thread counts.

    python3 -m pip install onnxruntime==1.20.1 onnx==1.17.0 numpy pillow   # once
    cargo build --release
    python3 targets/compare-ort.py                 # threads 1, 2 and all; bundled photos and clip
    python3 targets/compare-ort.py --device cuda   # ersm on the GPU against ORT's CUDA provider

For each thread count it runs, one after the other:
  - `ersm bench --threads N` on the bundled photos (ERSM and ersm dense
    alternate frame by frame),
  - `ersm run --threads N` on the bundled clip (the same, per frame),
  - ONNX Runtime (intra-op threads N, all graph optimisations) on the whole
    network with the energy layer as Identity, or on the package's original
    network where the manifest names one (`dense_model`), and on the prefix
    alone (the subgraph up to the energy layer's input), on the same photos
    pre-processed as the manifest says. A dense network's time does not depend
    on the content, so the same figures stand for the clip's frames.
Times are of the network (prefix + energy layer + suffix); pre-processing is
left out on both sides. It prints p50/p95 and the ratios, and writes the
numbers as JSON with --json. The machines are noisy: compare the ratios within
one run, not absolute times across runs.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pct(v, q):
    return float(np.percentile(np.asarray(v), q, method="inverted_cdf"))


def summary(v):
    return {"p50": pct(v, 50), "p95": pct(v, 95), "n": len(v)}


def preprocess(path, p):
    """The manifest's pre-processing: short side to resize_short (bilinear,
    antialiased), centre crop, scale, mean/std, CHW."""
    from PIL import Image
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = p["resize_short"] / min(w, h)
    rw, rh = max(p["crop"], round(w * s)), max(p["crop"], round(h * s))
    im = im.resize((rw, rh), Image.BILINEAR)
    x0, y0 = (rw - p["crop"]) // 2, (rh - p["crop"]) // 2
    im = im.crop((x0, y0, x0 + p["crop"], y0 + p["crop"]))
    a = np.asarray(im, dtype=np.float32) * p["scale"]
    a = (a - np.array(p["mean"], np.float32)) / np.array(p["std"], np.float32)
    return a.transpose(2, 0, 1)[None].copy()


def dense_graphs(model_dir, manifest, out_dir):
    """The whole dense network and the prefix subgraph, as ONNX files."""
    import onnx
    from onnx import helper
    proto = onnx.load(os.path.join(model_dir, manifest["model"]))
    energy = [n for n in proto.graph.node if n.op_type == "EnergyMask"]
    if len(energy) != 1:
        sys.exit(f"{model_dir}: expected one EnergyMask node, found {len(energy)}")
    cut = energy[0].input[0]
    if manifest.get("dense_model"):
        whole = os.path.join(model_dir, manifest["dense_model"])
    else:
        g = proto.graph
        i = list(g.node).index(energy[0])
        ident = helper.make_node("Identity", [cut], list(energy[0].output), name=energy[0].name)
        g.node.remove(energy[0])
        g.node.insert(i, ident)
        used = {x for n in g.node for x in n.input}
        keep = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
        keep_ops = [o for o in proto.opset_import if o.domain in ("", "ai.onnx")]
        del proto.opset_import[:]
        proto.opset_import.extend(keep_ops)
        whole = os.path.join(out_dir, "dense.onnx")
        onnx.save(proto, whole)
    prefix = os.path.join(out_dir, "prefix.onnx")
    onnx.utils.extract_model(whole, prefix, [manifest["input"]["name"]], [cut])
    return whole, prefix


def ort_provider(device):
    """ONNX Runtime's provider for `device`, or (None, why) when it has none."""
    import onnxruntime as ort
    if device == "cpu":
        return "CPUExecutionProvider", None
    have = ort.get_available_providers()
    if "CUDAExecutionProvider" not in have:
        return None, (f"onnxruntime {ort.__version__} here has no CUDA execution provider "
                      f"(it offers {', '.join(have)}; pip's onnxruntime-gpu brings one)")
    return "CUDAExecutionProvider", None


def time_ort(path, inputs, threads, frames, warmup, provider="CPUExecutionProvider"):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=[provider])
    if sess.get_providers()[0] != provider:
        raise RuntimeError(f"ONNX Runtime could not start {provider} (it runs {sess.get_providers()})")
    name = sess.get_inputs()[0].name
    times, outs = [], []
    for i in range(warmup + frames):
        x = inputs[i % len(inputs)]
        t = time.perf_counter()
        y = sess.run(None, {name: x})[0]
        dt = (time.perf_counter() - t) * 1e3
        if i >= warmup:
            times.append(dt)
            if i - warmup < len(inputs):
                outs.append(y.reshape(-1))
    return times, outs


def run_ersm(cmd):
    """Runs ersm; on failure exits with what it said."""
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd[:2])} failed ({r.returncode}):\n" + "\n".join(r.stderr.splitlines()[-5:]))


def ersm_bench(binary, model, images, threads, frames, warmup, tmp, device, extra=()):
    out = os.path.join(tmp, f"bench-{threads}.json")
    dump = os.path.join(tmp, f"dump-{threads}.jsonl")
    run_ersm([binary, "bench", "--model", model, "--images", images, "--device", device,
                    "--threads", str(threads), "--frames", str(frames), "--warmup", str(warmup),
                    "--json", out, "--dump", dump, *extra])
    report = json.load(open(out))
    dumps = [json.loads(l) for l in open(dump)]
    return report, dumps


def ersm_run(binary, model, clip, threads, frames, tmp, device):
    out = os.path.join(tmp, f"run-{threads}.jsonl")
    run_ersm([binary, "run", "--model", model, "--source", clip, "--device", device,
                    "--threads", str(threads), "--max-frames", str(frames), "--jsonl", out])
    recs = [json.loads(l) for l in open(out)]
    recs = [r for r in recs if not r["warmup"] and r.get("dense_ms")]
    net = lambda t: t["prefix"] + t["ersm"] + t["suffix"]
    return {
        "ersm": summary([net(r["ersm_ms"]) for r in recs]),
        "dense": summary([net(r["dense_ms"]) for r in recs]),
        "keep": float(np.mean([r["keep_ratio"] for r in recs])),
        "agreement": float(np.mean([r["agree"] for r in recs])),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ersm", default=os.path.join(ROOT, "target/release/ersm"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models/mobilenet_v2_ersm"))
    ap.add_argument("--images", default=os.path.join(ROOT, "models/images"))
    ap.add_argument("--clip", default=os.path.join(ROOT, "models/streams/vtest.mp4"))
    ap.add_argument("--threads", default="1,2,all", help="comma-separated; 'all' = every core")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--clip-frames", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: ersm with --device cuda, ONNX Runtime with its CUDA execution provider")
    args = ap.parse_args()
    if not os.access(args.ersm, os.X_OK):
        sys.exit(f"{args.ersm} not found: run `cargo build --release` first (or pass --ersm)")
    cores = len(os.sched_getaffinity(0))
    counts = []
    for t in args.threads.split(","):
        n = cores if t.strip() == "all" else int(t)
        if n not in counts:
            counts.append(n)
    manifest = json.load(open(os.path.join(args.model, "manifest.json")))
    files = sorted(os.path.join(args.images, f) for f in os.listdir(args.images)
                   if f.lower().endswith((".png", ".jpg", ".jpeg")))
    inputs = [preprocess(f, manifest["preprocess"]) for f in files]
    provider, why = ort_provider(args.device)
    if why:
        print(f"ONNX Runtime dense not timed: {why}")
    results = {"cores": cores, "device": args.device, "ort_provider": provider, "ort_missing": why,
               "images": [os.path.basename(f) for f in files], "threads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        whole, prefix = dense_graphs(args.model, manifest, tmp)
        for n in counts:
            report, dumps = ersm_bench(args.ersm, args.model, args.images, n, args.frames, args.warmup, tmp,
                                       args.device)
            clip = ersm_run(args.ersm, args.model, args.clip, n, args.clip_frames, tmp, args.device) \
                if os.path.exists(args.clip) else None
            if provider:
                ort_whole, ort_out = time_ort(whole, inputs, n, args.frames, args.warmup, provider)
                ort_prefix, _ = time_ort(prefix, inputs, n, args.frames, args.warmup, provider)
            else:  # NaN times: the table shows what ersm measured and says ORT's are missing
                ort_whole, ort_out, ort_prefix = [float("nan")], [], [float("nan")]
            st = report["stages"]
            # ersm's dense top-1 and ORT's on the same photos (pre-processing
            # differs in rounding only).
            same = sum(int(np.argmax(d["dense_logits"]) == np.argmax(o))
                       for d, o in zip(dumps[:len(files)], ort_out))
            results["threads"][n] = {
                "photos": {
                    "ersm": {"p50": st["ersm"]["network"]["p50_ms"], "p95": st["ersm"]["network"]["p95_ms"]},
                    "ersm_dense": {"p50": st["dense"]["network"]["p50_ms"], "p95": st["dense"]["network"]["p95_ms"]},
                    "keep": report["keep_ratio"], "agreement": report["agreement"],
                    "suffix_efficiency": report["suffix_speedup"] * report["suffix_macs_ersm"]
                    / report["suffix_macs_dense"],
                },
                "clip": clip,
                "ort_dense": summary(ort_whole),
                "prefix": {"tract": {"p50": st["dense"]["prefix"]["p50_ms"], "p95": st["dense"]["prefix"]["p95_ms"]},
                           "ort": summary(ort_prefix)},
                "ort_top1_same_as_ersm_dense": f"{same}/{len(ort_out)}",
                "placement": report.get("placement"),
            }
    first = next(iter(results["threads"].values()))
    print(f"ersm: {first['placement']}; ONNX Runtime: {provider or 'none'}")
    print(f"network time per frame, ms (pre-processing excluded); {cores} cores; "
          f"{len(files)} photos, clip {os.path.basename(args.clip)}")
    hdr = f"{'threads':>7} {'input':>6} | {'ERSM p50/p95':>15} {'ersm dense':>15} {'ORT dense':>15} | " \
          f"{'dense/ERSM':>10} {'ORT/ERSM':>8} {'keep':>5} {'agree':>5}"
    print(hdr)
    print("-" * len(hdr))
    for n, r in results["threads"].items():
        o = r["ort_dense"]
        for label, e, d in [("photos", r["photos"]["ersm"], r["photos"]["ersm_dense"]),
                            ("clip", *(r["clip"][k] for k in ("ersm", "dense")))] if r["clip"] else \
                [("photos", r["photos"]["ersm"], r["photos"]["ersm_dense"])]:
            src = r["photos"] if label == "photos" else r["clip"]
            print(f"{n:>7} {label:>6} | {e['p50']:7.2f}/{e['p95']:<7.2f} {d['p50']:7.2f}/{d['p95']:<7.2f} "
                  f"{o['p50']:7.2f}/{o['p95']:<7.2f} | {d['p50'] / e['p50']:9.2f}x {o['p50'] / e['p50']:7.2f}x "
                  f"{src['keep']:5.2f} {src['agreement']:5.2f}")
    print("\nprefix alone (the same subgraph), ms p50/p95:")
    for n, r in results["threads"].items():
        t, o = r["prefix"]["tract"], r["prefix"]["ort"]
        print(f"{n:>7} threads | tract {t['p50']:6.2f}/{t['p95']:<6.2f} ORT {o['p50']:6.2f}/{o['p95']:<6.2f} "
              f"| tract/ORT {t['p50'] / o['p50']:.2f}x | sparse suffix at "
              f"{r['photos']['suffix_efficiency']:.2f} of its MAC-ratio ideal | "
              f"ORT top-1 = ersm dense on {r['ort_top1_same_as_ersm_dense']} photos")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
