#!/usr/bin/env python3
"""ersm on the GPU beside PyTorch's cuDNN path on the same GPU: a reference
for the dense baseline where ONNX Runtime's CUDA provider cannot be
installed (the GPU machines' onnxruntime is the CPU wheel, and the CUDA one
is larger than what reaches them).

    python3 targets/compare-torch.py --device cuda      # ersm built, torch with CUDA
    python3 targets/compare-torch.py --device cpu       # the same on the CPU (checks the script)

The package's dense network (the ONNX graph `compare-ort.py` times, the
energy layer as Identity or the manifest's `dense_model`) runs in PyTorch:
each ONNX node as the torch function it names (no export, no other model),
with the graph's own weights, so its logits are checked against ONNX
Runtime's (CPU) on the bundled photos before anything is timed. It is timed
two ways, from an input on the host to logits on the host (the span of
ersm's network time, pre-processing left out):
  - eager: one launch per op from Python, cuDNN choosing each conv's
    algorithm (benchmark mode);
  - CUDA graph (GPU only): the whole network captured once and replayed,
    which removes the per-op launch cost, the best a runtime built on
    cuDNN reaches at batch 1.
Then `ersm bench` on the same photos gives ersm's ERSM and dense network
times, side by side in this one run. The machines are noisy: compare the
ratios within one run.
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compare_ort():
    """targets/compare-ort.py as a module: its pre-processing, dense graph and ersm runs."""
    spec = importlib.util.spec_from_file_location("compare_ort", os.path.join(ROOT, "targets", "compare-ort.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def torch_network(path, device):
    """The ONNX graph at `path` as a function of one input tensor, its nodes
    run in order as torch ops on `device`; an op it does not know is an error
    naming the node."""
    import onnx
    import torch
    import torch.nn.functional as F
    from onnx import helper, numpy_helper

    g = onnx.load(path).graph
    values = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()).to(device) for t in g.initializer}
    steps = []

    def clip(x, lo=None, hi=None):
        return torch.clamp(x, min=None if lo is None else float(lo), max=None if hi is None else float(hi))

    for n in g.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        op = n.op_type
        if op == "Constant":
            values[n.output[0]] = torch.from_numpy(numpy_helper.to_array(a["value"]).copy()).to(device)
            continue
        if op == "Conv":
            pads = a.get("pads", [0, 0, 0, 0])
            if pads[:2] != pads[2:]:
                sys.exit(f"node {n.name}: asymmetric Conv padding {pads} is not supported here")
            stride, dil, groups = tuple(a.get("strides", [1, 1])), tuple(a.get("dilations", [1, 1])), a.get("group", 1)
            fn = (lambda s, p, d, g_: lambda x, w, b=None: F.conv2d(x, w, b, s, p, d, g_))(
                stride, tuple(pads[:2]), dil, groups)
        elif op == "Clip":
            lo, hi = a.get("min"), a.get("max")
            fn = (lambda lo_, hi_: lambda x, mn=None, mx=None: clip(
                x, lo_ if mn is None else mn, hi_ if mx is None else mx))(lo, hi)
        elif op == "Relu":
            fn = torch.relu
        elif op == "Add":
            fn = torch.add
        elif op == "Mul":
            fn = torch.mul
        elif op == "Identity":
            fn = lambda x: x  # noqa: E731
        elif op == "GlobalAveragePool":
            fn = lambda x: x.mean(dim=(2, 3), keepdim=True)  # noqa: E731
        elif op == "Flatten":
            fn = (lambda ax: lambda x: x.flatten(ax))(a.get("axis", 1))
        elif op == "Gemm":
            if a.get("transA", 0):
                sys.exit(f"node {n.name}: Gemm with transA is not supported here")
            fn = (lambda al, be, tb: lambda x, w, c=None: al * (x @ (w.t() if tb else w))
                  + (0 if c is None else be * c))(a.get("alpha", 1.0), a.get("beta", 1.0), a.get("transB", 0))
        elif op == "MatMul":
            fn = torch.matmul
        elif op == "Reshape":
            fn = lambda x, s: x.reshape([x.shape[i] if v == 0 else int(v) for i, v in enumerate(s.tolist())])  # noqa: E731
        else:
            sys.exit(f"node {n.name}: ONNX op {op} has no torch counterpart here")
        steps.append((fn, list(n.input), n.output[0]))
    name, out = g.input[0].name, g.output[0].name

    def run(x):
        env = dict(values)
        env[name] = x
        for fn, inputs, output in steps:
            env[output] = fn(*[env[i] for i in inputs if i])
        return env[out]

    return run


def timed(fn, inputs, frames, warmup, sync):
    """Per-frame ms of `fn` on the inputs in turn; the first outputs, one per input."""
    times, outs = [], []
    for i in range(warmup + frames):
        x = inputs[i % len(inputs)]
        t = time.perf_counter()
        y = fn(x)
        sync()
        dt = (time.perf_counter() - t) * 1e3
        if i >= warmup:
            times.append(dt)
            if len(outs) < len(inputs):
                outs.append(y.reshape(-1))
    return times, outs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ersm", default=os.path.join(ROOT, "target/release/ersm"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models/mobilenet_v2_ersm"))
    ap.add_argument("--images", default=os.path.join(ROOT, "models/images"))
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--threads", type=int, default=0, help="ersm's and torch's CPU threads (0: every core)")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()
    co = compare_ort()
    try:
        import torch
    except ImportError as e:
        sys.exit(f"PyTorch is not installed here ({e})")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"torch {torch.__version__} here has no CUDA device")
    if not os.access(args.ersm, os.X_OK):
        sys.exit(f"{args.ersm} not found: run `cargo build --release` first (or pass --ersm)")
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = True
    manifest = json.load(open(os.path.join(args.model, "manifest.json")))
    files = sorted(os.path.join(args.images, f) for f in os.listdir(args.images)
                   if f.lower().endswith((".png", ".jpg", ".jpeg")))
    host = [co.preprocess(f, manifest["preprocess"]) for f in files]
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    results = {"device": args.device, "torch": torch.__version__, "threads": threads,
               "images": [os.path.basename(f) for f in files]}
    if args.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        whole, _ = co.dense_graphs(args.model, manifest, tmp)
        net = torch_network(whole, dev)
        inputs = [torch.from_numpy(x) for x in host]

        def eager(x):
            with torch.inference_mode():
                return net(x.to(dev, non_blocking=False)).cpu()

        # The graph's own logits against ONNX Runtime's before any timing.
        _, ort_out = co.time_ort(whole, host, threads, len(host), 0)
        _, got = timed(eager, inputs, len(inputs), 0, sync)
        err = max(float(np.abs(g.numpy() - o).max() / max(np.abs(o).max(), 1e-6)) for g, o in zip(got, ort_out))
        same = sum(int(np.argmax(g.numpy()) == np.argmax(o)) for g, o in zip(got, ort_out))
        results["check"] = {"max_rel_err_vs_ort": err, "top1_same": f"{same}/{len(host)}"}
        print(f"torch {torch.__version__} on {results.get('gpu', 'the CPU')}: logits against ONNX Runtime's "
              f"max relative error {err:.1e}, top-1 the same on {same}/{len(host)} photos")
        if err > 1e-3 or same != len(host):
            sys.exit("the torch network does not compute what the ONNX graph does: not timed")
        eager_ms, _ = timed(eager, inputs, args.frames, args.warmup, sync)
        results["torch_eager"] = co.summary(eager_ms)
        if args.device == "cuda":
            static_in = inputs[0].to(dev).clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(3):  # cuDNN picks its algorithms before capture
                    net(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                static_out = net(static_in)

            def replay(x):
                static_in.copy_(x)
                graph.replay()
                return static_out.cpu()

            _, got = timed(replay, inputs, len(inputs), 0, sync)
            if any(int(np.argmax(g.numpy())) != int(np.argmax(o)) for g, o in zip(got, ort_out)):
                sys.exit("the captured graph's top-1 differs from ONNX Runtime's")
            graph_ms, _ = timed(replay, inputs, args.frames, args.warmup, sync)
            results["torch_cuda_graph"] = co.summary(graph_ms)
        report, _ = co.ersm_bench(args.ersm, args.model, args.images, threads, args.frames, args.warmup, tmp,
                                  args.device)
    st = report["stages"]
    results["ersm"] = {"p50": st["ersm"]["network"]["p50_ms"], "p95": st["ersm"]["network"]["p95_ms"]}
    results["ersm_dense"] = {"p50": st["dense"]["network"]["p50_ms"], "p95": st["dense"]["network"]["p95_ms"]}
    results["placement"] = report.get("placement")
    results["keep"] = report["keep_ratio"]
    print(f"ersm: {results['placement']}")
    print(f"network time per frame, ms p50/p95, {len(files)} photos (pre-processing excluded):")
    rows = [("ersm ERSM", results["ersm"]), ("ersm dense", results["ersm_dense"]),
            ("torch eager", results["torch_eager"])]
    if "torch_cuda_graph" in results:
        rows.append(("torch CUDA graph", results["torch_cuda_graph"]))
    dense = results["ersm_dense"]["p50"]
    for label, r in rows:
        print(f"  {label:<17} {r['p50']:8.3f} / {r['p95']:<8.3f}  ersm dense / this {dense / r['p50']:6.2f}x")
    print(f"  keep ratio {results['keep']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
