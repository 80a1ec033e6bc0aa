"""Export `ersm-tiny`, the small ERSM test network, as an ONNX model package.

Reproducible: fixed seed, pinned packages (see models/README.md):
    python3 -m pip install onnx==1.17.0 numpy==1.26.4 onnxruntime==1.20.1 pillow==13.0.0
    python3 training/tiny_export.py   # writes models/tiny and tests/data/tiny_onnxruntime_logits.json

The weights are random (He-initialised, random BatchNorm statistics): this
network exists so that every op the sparse executor supports is exercised by
fast tests on a committed file. Only the energy layer's bias is calibrated,
on the bundled photos, so that about half of the tokens survive.
"""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "models", "tiny")
IMAGES = os.path.join(ROOT, "models", "images")
SIZE = 112
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
LAMBDA, TAU, STEPS, NEIGHBOURHOOD = 0.25, 1.0, 2, 4

rng = np.random.default_rng(20261128)
nodes, inits = [], []


def init(name, arr):
    inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
    return name


def conv(name, x, cin, cout, k, stride=1, pad=None, groups=1, bias=True):
    pad = k // 2 if pad is None else pad
    fan_in = cin // groups * k * k
    w = rng.normal(0, np.sqrt(2.0 / fan_in), (cout, cin // groups, k, k))
    inputs = [x, init(name + ".w", w)]
    if bias:
        inputs.append(init(name + ".b", rng.normal(0, 0.05, cout)))
    nodes.append(helper.make_node(
        "Conv", inputs, [name], name=name, kernel_shape=[k, k], strides=[stride, stride],
        pads=[pad, pad, pad, pad], group=groups))
    return name


def bn(name, x, c):
    nodes.append(helper.make_node(
        "BatchNormalization",
        [x, init(name + ".gamma", rng.uniform(0.5, 1.5, c)), init(name + ".beta", rng.normal(0, 0.1, c)),
         init(name + ".mean", rng.normal(0, 0.1, c)), init(name + ".var", rng.uniform(0.5, 1.5, c))],
        [name], name=name, epsilon=1e-5))
    return name


def op(kind, name, inputs, **attrs):
    nodes.append(helper.make_node(kind, inputs, [name], name=name, **attrs))
    return name


def relu6(name, x):
    return op("Clip", name, [x, init(name + ".min", np.array(0.0)), init(name + ".max", np.array(6.0))])


# ---- prefix: 3x112x112 -> 24x28x28 (stride 4) ----
x = conv("stem", "image", 3, 16, 3, stride=2)
x = op("Relu", "stem.relu", [bn("stem.bn", x, 16)])
x = relu6("pre.dw.relu6", bn("pre.dw.bn", conv("pre.dw", x, 16, 16, 3, groups=16, bias=False), 16))
x = conv("pre.pw", x, 16, 24, 1)
x = op("Relu", "pre.relu", [conv("pre.down", x, 24, 24, 3, stride=2)])
PREFIX_OUT, C = x, 24

# ---- the energy layer ----
ersm_w = rng.normal(0, 1.0 / np.sqrt(C), C)
nodes.append(helper.make_node(
    "EnergyMask", [PREFIX_OUT, init("ersm.w", ersm_w), init("ersm.b", np.zeros(1))], ["ersm.out"],
    name="ersm", domain="ersm", **{"lambda": LAMBDA, "tau": TAU, "steps": STEPS,
                                   "neighbourhood": NEIGHBOURHOOD}))

# ---- suffix: every op the sparse executor supports ----
x = "ersm.out"
e = op("HardSwish", "b1.expand.hswish", [bn("b1.expand.bn", conv("b1.expand", x, 24, 64, 1, bias=False), 64)])
d = relu6("b1.dw.relu6", bn("b1.dw.bn", conv("b1.dw", e, 64, 64, 3, groups=64, bias=False), 64))
g = op("GlobalAveragePool", "b1.se.pool", [d])
s = op("Relu", "b1.se.relu", [conv("b1.se.fc1", g, 64, 16, 1)])
s = op("HardSigmoid", "b1.se.gate", [conv("b1.se.fc2", s, 16, 64, 1)], alpha=1.0 / 6.0, beta=0.5)
d = op("Mul", "b1.se.scale", [d, s])
p = bn("b1.project.bn", conv("b1.project", d, 64, 24, 1, bias=False), 24)
x = op("Add", "b1.add", [p, x])
x = op("Relu", "b2.relu", [bn("b2.bn", x, 24)])
c = conv("b2.gconv", x, 24, 32, 3, stride=2, groups=4)
x = op("Mul", "b2.gate", [c, op("Sigmoid", "b2.sigmoid", [c])])
x = op("Relu", "b3.relu", [conv("b3.conv", x, 32, 48, 3)])
x = relu6("b4.relu6", conv("b4.dw", x, 48, 48, 5, stride=2, groups=48))
x = op("HardSwish", "b5.hswish", [conv("b5.pw", x, 48, 64, 1)])
x = op("ReduceMean", "head.pool", [x], axes=[2, 3], keepdims=1)
x = op("Flatten", "head.flatten", [x], axis=1)
nodes.append(helper.make_node(
    "Gemm", [x, init("head.fc1.w", rng.normal(0, np.sqrt(2 / 64), (32, 64))),
             init("head.fc1.b", rng.normal(0, 0.05, 32))],
    ["head.fc1"], name="head.fc1", transB=1))
x = op("Relu", "head.relu", ["head.fc1"])
x = op("Reshape", "head.reshape", [x, numpy_helper.from_array(np.array([1, -1], np.int64), "head.shape").name])
inits.append(numpy_helper.from_array(np.array([1, -1], np.int64), "head.shape"))
x = op("MatMul", "head.fc2", [x, init("head.fc2.w", rng.normal(0, np.sqrt(1 / 32), (32, 10)))])
op("Add", "logits", [x, init("head.fc2.b", rng.normal(0, 0.05, 10))])

graph = helper.make_graph(
    nodes, "ersm-tiny",
    [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
    [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
    initializer=inits)
model = helper.make_model(graph, producer_name="ersm models/tiny/export.py",
                          opset_imports=[helper.make_opsetid("", 14), helper.make_opsetid("ersm", 1)])
model.ir_version = 8


def preprocess(path):
    """Resize the short side to SIZE, centre-crop, normalise: as the manifest says."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = SIZE / min(w, h)
    img = img.resize((max(SIZE, round(w * s)), max(SIZE, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - SIZE) // 2, (h - SIZE) // 2
    a = np.asarray(img.crop((left, top, left + SIZE, top + SIZE)), np.float32) / 255.0
    a = (a - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return a.transpose(2, 0, 1)[None].astype(np.float32)


def session(m, outputs):
    m = onnx.ModelProto.FromString(m.SerializeToString())
    for n in m.graph.node:
        if n.op_type == "EnergyMask":
            n.op_type, n.domain = "Identity", ""
            del n.input[1:]
            del n.attribute[:]
    del m.opset_import[1:]
    del m.graph.output[:]
    m.graph.output.extend([helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


# Calibrate the energy bias: median unary cost over the bundled photos -> ~50 % kept.
photos = sorted(f for f in os.listdir(IMAGES) if f.lower().endswith((".png", ".jpg", ".jpeg")))
prefix = session(model, [PREFIX_OUT])
feats = [prefix.run(None, {"image": preprocess(os.path.join(IMAGES, f))})[0] for f in photos]
unary = np.concatenate([np.einsum("c,nchw->nhw", ersm_w, f).ravel() for f in feats])
bias = -float(np.median(unary))
for t in inits:
    if t.name == "ersm.b":
        t.CopyFrom(numpy_helper.from_array(np.array([bias], np.float32), "ersm.b"))
onnx.checker.check_model(model)
onnx.save(model, os.path.join(OUT, "model.onnx"))

# The dense network's logits according to ONNX Runtime, for an independent check of
# tract, on an input any language can rebuild exactly: x[i] = sin(0.01 * i) (flat index).
probe = np.sin(0.01 * np.arange(3 * SIZE * SIZE, dtype=np.float64)).astype(np.float32)
dense = session(model, ["logits"])
logits = dense.run(None, {"image": probe.reshape(1, 3, SIZE, SIZE)})[0].ravel().tolist()
with open(os.path.join(ROOT, "tests", "data", "tiny_onnxruntime_logits.json"), "w") as fh:
    json.dump({"engine": f"onnxruntime {ort.__version__}", "input": "x[i] = sin(0.01 * i), NCHW flat index",
               "energy_layer": "replaced by Identity (every token kept)", "logits": logits}, fh, indent=1)
print(f"wrote model.onnx ({len(nodes)} nodes), ersm bias {bias:.4f}")

manifest = {
    "name": "ersm-tiny",
    "description": "Small random-weight ERSM network whose suffix uses every op ersm's sparse executor "
                   "supports. For tests; its predictions mean nothing.",
    "model": "model.onnx",
    "input": {"name": "image", "shape": [1, 3, SIZE, SIZE], "layout": "NCHW", "colour": "RGB"},
    "preprocess": {"resize_short": SIZE, "crop": SIZE, "scale": 1.0 / 255.0, "mean": MEAN, "std": STD},
    "output": {"name": "logits"},
    "labels": [f"class{i}" for i in range(10)],
    "licence": {"weights": "Apache-2.0 (random weights generated by export.py)",
                "images": "see models/images/SOURCES.md"},
}
with open(os.path.join(OUT, "manifest.json"), "w") as fh:
    json.dump(manifest, fh, indent=2)
    fh.write("\n")
