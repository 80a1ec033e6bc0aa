"""Put learned fill vectors into a package's `model.onnx`.

`finetune.py --semantics fill-active --tune fill` learns one vector per
tensor of the suffix that dropped positions hold instead of zero (REPORT
section 2, runs 8, 10 and 11; the package ships run 11's); the network's weights stay torchvision's, so the dense path is the
original. This writes them as the EnergyMask node's `fills` attribute (one
float tensor per suffix tensor, named after it: models/README.md), replacing
any fills already there, so running it twice is harmless.

The checkpoint's keys name MobileNetV2 tensors ("cut", "7_expand", "7_dw",
"7_out", ..., "18_out"); the ONNX tensors are found by walking the exported
suffix, whose blocks are Conv → Clip (expand), Conv → Clip (depthwise),
Conv (project) and, for residual blocks, Add; then the head's Conv → Clip.

The bundled package was made with

    python3 -m ersm_training.add_fills --fills checkpoints/mobilenet_v2_ersm/run11_fills.pt \
        --model ../models/mobilenet_v2_ersm/model.onnx
    python3 -m ersm_training.calibrate_fallback --data /tmp/data --package ../models/mobilenet_v2_ersm

`--pool all` (the semantics run 8 trained under) also fills the pooled head
output, so pooling averages every position: it loses answers on held-out
clips (REPORT section 2), and the default `--pool active` leaves it out.

`--clear` removes the attribute (zero at dropped positions, the package as
export_head.py leaves it). Either way `training.json` beside the model, when
there is one, records where the fills came from (key `fills`).
"""

import argparse
import json
import os

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from .semantics import CUT


def suffix_tensors(graph):
    """The ONNX tensor holding each of the checkpoint's keys, and the channels
    each must have (from the producing conv's weights)."""
    nodes = list(graph.node)
    e = next(i for i, n in enumerate(nodes) if n.op_type == "EnergyMask")
    after = [n for n in nodes[e + 1:] if n.op_type != "Constant"]
    inits = {t.name: t for t in graph.initializer}
    names, channels = {"cut": nodes[e].output[0]}, {}
    k = 0

    def expect(op):
        nonlocal k
        if k >= len(after) or after[k].op_type != op:
            got = after[k].op_type if k < len(after) else "the end"
            raise SystemExit(f"suffix node {k} after the energy layer: expected {op}, found {got}")
        k += 1
        return after[k - 1]

    def conv_out(n):
        return inits[n.input[1]].dims[0]

    for i in list(range(CUT, 18)) + [18]:
        conv = expect("Conv")
        names[f"{i}_expand" if i < 18 else "18_out"] = expect("Clip").output[0]
        channels[f"{i}_expand" if i < 18 else "18_out"] = conv_out(conv)
        if i == 18:
            break
        conv = expect("Conv")
        names[f"{i}_dw"] = expect("Clip").output[0]
        channels[f"{i}_dw"] = conv_out(conv)
        proj = expect("Conv")
        out = proj.output[0]
        if k < len(after) and after[k].op_type == "Add" and out in after[k].input:
            out = expect("Add").output[0]
        names[f"{i}_out"] = out
        channels[f"{i}_out"] = conv_out(proj)
    return names, channels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the package's model.onnx, rewritten in place")
    ap.add_argument("--fills", help="a finetune.py --tune fill checkpoint (or runs/run11_fills.pt)")
    ap.add_argument("--clear", action="store_true", help="remove the fills attribute")
    ap.add_argument("--pool", choices=["active", "all"], default="active",
                    help="active: the pooled head output gets no fill, so global pooling averages the active "
                         "tokens; all: it gets the checkpoint's, so pooling averages every position")
    args = ap.parse_args()
    if bool(args.fills) == args.clear:
        raise SystemExit("give --fills CKPT or --clear")
    model = onnx.load(args.model)
    node = next(n for n in model.graph.node if n.op_type == "EnergyMask")
    keep = [a for a in node.attribute if a.name != "fills"]
    del node.attribute[:]
    node.attribute.extend(keep)
    if args.fills:
        ck = torch.load(args.fills, weights_only=False)
        if ck["args"].get("tune") != "fill" or not ck["args"].get("semantics", "").startswith("fill"):
            raise SystemExit(f"{args.fills}: not a --semantics fill --tune fill checkpoint")
        means = {k[len("means."):]: v for k, v in ck["student"].items() if k.startswith("means.")}
        names, channels = suffix_tensors(model.graph)
        channels["cut"] = means["cut"].numel()
        if set(means) != set(names):
            raise SystemExit(f"checkpoint keys {sorted(set(means) ^ set(names))} do not match the suffix")
        if args.pool == "active":
            del means["18_out"]
        tensors = []
        for key in sorted(means, key=lambda k: list(names).index(k)):
            v = means[key].detach().float().numpy().astype(np.float32)
            if v.shape != (channels[key],):
                raise SystemExit(f"{key}: {v.shape[0]} values, '{names[key]}' has {channels[key]} channels")
            tensors.append(numpy_helper.from_array(v, name=names[key]))
        node.attribute.append(helper.make_attribute("fills", tensors))
        print(f"{len(tensors)} fill vectors from {args.fills} (step {ck['step']})")
    onnx.checker.check_model(model)
    onnx.save(model, args.model)
    record = os.path.join(os.path.dirname(os.path.abspath(args.model)), "training.json")
    if os.path.exists(record):
        with open(record) as fh:
            t = json.load(fh)
        t.pop("fills", None)
        if args.fills:
            t["fills"] = {"checkpoint": os.path.relpath(args.fills, os.path.dirname(record)), "step": ck["step"],
                          "recipe": {k: ck["args"][k] for k in ("semantics", "tune", "masks", "shift_range", "lr",
                                                                 "batch", "mse", "seed") if k in ck["args"]},
                          "pool": args.pool, "tensors": len(tensors)}
        with open(record, "w") as fh:
            json.dump(t, fh, indent=1)


if __name__ == "__main__":
    main()
