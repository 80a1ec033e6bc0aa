"""Put a head trained by `train_rank.py` into a package's `model.onnx`.

The prefix and suffix stay as they are; the EnergyMask node gets the head's
conv layers (`convs`, `conv_relu`) and two-layer weights, with `--offset`
baked into the output bias (higher keeps fewer tokens), and `--rule` as its
stride rule. The exported head is read back (`head_from_onnx`) and must give
the trained head's energies on a probe map.

    python3 -m ersm_training.export_head --head /tmp/rank/head-conv-spread.pt \
        --kind conv --offset 0.25 --rule centre --model ../models/mobilenet_v2_ersm/model.onnx

`--head package` moves the head the model holds (its offset and rule; a
second run moves the threshold again). The EnergyMask node is rebuilt without
its fill vectors: run `add_fills.py` after. `training.json` beside the model
records the head (key `head`).

The shipped package's head: the depthwise-separable head trained on the mixed
target (REPORT section 7), 0.33 below its threshold, then run 11's fill vectors:

    python3 -m ersm_training.export_head --head checkpoints/mobilenet_v2_ersm/sep-mix.pt \
        --kind sep --offset -0.33 --rule centre --model ../models/mobilenet_v2_ersm/model.onnx
    python3 -m ersm_training.add_fills --fills checkpoints/mobilenet_v2_ersm/run11_fills.pt \
        --model ../models/mobilenet_v2_ersm/model.onnx

(The package head shipped before it: `--head package --offset -0.35 --rule
centre` on the model `train.py` exported.)
"""

import argparse
import json
import os

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from .measure_semantics import head_from_onnx
from .train import LAMBDA, STEPS, TAU, conv_attributes
from .train_rank import make_head


def set_head(m, head, offset, rule):
    """Replaces the EnergyMask node's weights and head attributes in `m`."""
    g = m.graph
    node = next(n for n in g.node if n.op_type == "EnergyMask")
    old = set(node.input[1:])
    keep = [t for t in g.initializer if t.name not in old]
    del g.initializer[:]
    g.initializer.extend(keep)
    tensors = []
    convs = head.convs() if hasattr(head, "convs") else []
    for i, (conv, _) in enumerate(convs):
        tensors += [(f"ersm.conv{i}.w", conv.weight), (f"ersm.conv{i}.b", conv.bias)]
    hidden = head.l1.weight.shape[0]
    tensors += [("ersm.W1", head.l1.weight.view(hidden, -1)), ("ersm.b1", head.l1.bias),
                ("ersm.w2", head.l2.weight.view(-1)), ("ersm.b2", head.l2.bias + offset)]
    g.initializer.extend(numpy_helper.from_array(t.detach().numpy().astype(np.float32), n) for n, t in tensors)
    del node.input[1:]
    node.input.extend(n for n, _ in tensors)
    del node.attribute[:]
    attrs = {"lambda": LAMBDA, "tau": TAU, "steps": STEPS, "neighbourhood": 4, "stride_rule": rule}
    if convs:
        attrs.update(conv_attributes(convs))
    node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head", required=True,
                    help="state dict from train_rank.py, or `package`: the head --model holds (to move its offset or rule)")
    ap.add_argument("--kind", default="local", help="train_rank.py's --head-kind of --head")
    ap.add_argument("--offset", type=float, required=True)
    ap.add_argument("--rule", choices=["any", "centre"], default="centre")
    ap.add_argument("--model", required=True, help="model.onnx to rewrite")
    ap.add_argument("--out", help="where to write (default: over --model)")
    args = ap.parse_args()
    if args.head == "package":
        head = head_from_onnx(args.model)
    else:
        head = make_head(args.kind)
        head.load_state_dict(torch.load(args.head, weights_only=True))
    head.eval()
    m = onnx.load(args.model)
    set_head(m, head, args.offset, args.rule)
    onnx.checker.check_model(m)
    out = args.out or args.model
    onnx.save(m, out)
    back = head_from_onnx(out)
    probe = torch.sin(0.01 * torch.arange(32 * 28 * 28, dtype=torch.float32)).view(1, 32, 28, 28) * 3
    with torch.no_grad():
        want, got = head(probe, args.offset)[0], back(probe)[0]
    err = (want - got).abs().max().item()
    print(f"{out}: {args.kind} head, offset {args.offset}, rule {args.rule}; read back: max energy error {err:.2e}")
    assert err < 1e-5, err
    record_head(out, args.head, args.kind, args.offset, args.rule)


def record_head(model, head, kind, offset, rule):
    """Notes in `training.json` beside the model, when there is one, which
    head the package now holds (key `head`)."""
    record = os.path.join(os.path.dirname(os.path.abspath(model)), "training.json")
    if not os.path.exists(record):
        return
    with open(record) as fh:
        t = json.load(fh)
    source = head if head == "package" else os.path.relpath(os.path.abspath(head), os.path.dirname(record))
    t["head"] = {"source": source, "kind": kind, "offset": offset, "rule": rule,
                 "by": "export_head.py; fill vectors are dropped, add_fills.py puts them back"}
    with open(record, "w") as fh:
        json.dump(t, fh, indent=1)


if __name__ == "__main__":
    main()
