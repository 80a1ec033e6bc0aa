"""Issue 12, item 1: what should a dropped token hold? With the masks held fixed
(the shipped head's, and spatially coherent random masks at keep 0.3/0.5/0.7)
and torchvision's suffix unchanged, measure top-1 agreement with the dense
network and the suffix multiply-accumulates under each candidate semantics
(`semantics.py`). Writes `semantics.json`; `report.py` tables it.

    git show 0ebb618:models/mobilenet_v2_ersm/model.onnx > /tmp/head-only.onnx   # the head-only package
    python3 -m ersm_training.measure_semantics --data /tmp/data --head /tmp/head-only.onnx

(about 5 minutes on 2 cores). "shipped head" masks are that earlier
package's: its head was trained for torchvision's unchanged suffix.
"""

import argparse
import json
import os
import random
import time
from dataclasses import replace

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from . import data
from .semantics import CUT, ZERO, Semantics, Suffix, calibration_means, dense_macs, fit_fast_paths, semantic_keys
from .add_fills import suffix_tensors
from .train import CUT_C, ConvHead, EnergyHead, hard_mask, load_backbone, weights_path

HERE = os.path.dirname(os.path.abspath(__file__))

VARIANTS = [
    ZERO,
    replace(ZERO, down="centre"),
    replace(ZERO, down="majority"),
    replace(ZERO, pool="all"),
    Semantics(cut="mean", bg="mean", pool="all"),
    Semantics(cut="mean", bg="mean", pool="active"),
    Semantics(cut="mean", bg="mean", pool="all", down="centre"),
    Semantics(cut="keep", res="identity"),
    Semantics(cut="keep", res="identity", bg="mean", pool="all"),
    Semantics(cut="keep", res="identity", bg="mean", pool="all", down="centre"),
    Semantics(cut="keep", res="identity", bg="mean", inner="exact", pool="all"),
    Semantics(cut="keep", res="identity", nonres="fast", bg="mean", pool="all"),
    Semantics(cut="keep", res="identity", nonres="fast", bg="mean", pool="all", down="centre"),
    Semantics(cut="keep", res="identity", nonres="fast", bg="mean", inner="exact", pool="all", down="centre"),
    Semantics(cut="keep", res="identity", nonres="dense", pool="all"),
    Semantics(cut="keep", res="identity", nonres="dense", inner="exact", pool="all"),
]


def head_from_onnx(path):
    """The energy head of a shipped package (its EnergyMask initializers)."""
    m = onnx.load(path)
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in m.graph.initializer}
    node = next(n for n in m.graph.node if n.op_type == "EnergyMask")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    convs, relu = attrs.get("convs", 0), attrs.get("conv_relu", [1] * attrs.get("convs", 0))
    dil = attrs.get("conv_dilations", [1] * convs)
    if convs:
        layers, cin = [], CUT_C  # a grouped first conv's weight does not say how many channels it reads
        for i in range(convs):
            w = init[node.input[1 + 2 * i]]
            groups = cin // w.shape[1]
            layers.append((cin, w.shape[0], w.shape[2], groups, bool(relu[i]), dil[i]))
            cin = w.shape[0]
        head = ConvHead(layers[0][0], layers)
        for i, (m, _) in enumerate(head.convs()):
            m.weight.data = init[node.input[1 + 2 * i]].clone()
            m.bias.data = init[node.input[2 + 2 * i]].clone()
    base = 1 + 2 * convs
    if not convs:
        head = EnergyHead(init[node.input[base]].numel() // init[node.input[base + 1]].numel())
    head.l1.weight.data = init[node.input[base]].view_as(head.l1.weight)
    head.l1.bias.data = init[node.input[base + 1]].view_as(head.l1.bias)
    head.l2.weight.data = init[node.input[base + 2]].view_as(head.l2.weight)
    head.l2.bias.data = init[node.input[base + 3]].view_as(head.l2.bias)
    head.lam, head.tau, head.steps = attrs["lambda"], attrs.get("tau", 1.0), attrs.get("steps", 0)
    return head.eval()


def package_semantics(path):
    """ersm's sparse semantics for a package: zero, or with the energy node's
    `fills` the fill semantics (dropped positions hold the fill vectors,
    pooling over every position), with its stride rule."""
    graph = onnx.load(path).graph
    node = next(n for n in graph.node if n.op_type == "EnergyMask")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    rule = attrs.get("stride_rule", b"any")
    rule = rule.decode() if isinstance(rule, bytes) else rule
    if "fills" in attrs:
        # Pooling averages every position only when the pooled tensor has a fill.
        pooled = suffix_tensors(graph)[0]["18_out"]
        pool = "all" if any(t.name == pooled for t in attrs["fills"]) else "active"
        return Semantics(cut="mean", bg="mean", pool=pool, down=rule)
    return replace(ZERO, down=rule)


def package_fills(path):
    """The package's fill vectors keyed as `Suffix` reads them ("cut",
    (block, tensor)), zero for a tensor it gives none, or None when it has none."""
    model = onnx.load(path)
    node = next(n for n in model.graph.node if n.op_type == "EnergyMask")
    attr = next((a for a in node.attribute if a.name == "fills"), None)
    if attr is None:
        return None
    names, channels = suffix_tensors(model.graph)
    given = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in attr.tensors}
    return semantic_keys({k: given.get(name, torch.zeros(channels.get(k, CUT_C))) for k, name in names.items()})


def coherent_masks(n, keep, seed, hw=28):
    """Blobs, not salt and pepper: smoothed noise thresholded at the keep quantile."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1, hw, hw, generator=g)
    k = torch.exp(-0.5 * (torch.arange(-6, 7, dtype=torch.float32) / 3.0) ** 2)
    k = (k[:, None] * k[None, :]) / k.sum() ** 2
    z = F.conv2d(z, k.view(1, 1, 13, 13), padding=6)
    q = torch.quantile(z.flatten(1), 1 - keep, dim=1).view(n, 1, 1, 1)
    return (z >= q).float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="folder with the extracted Debian packages (see data.py)")
    ap.add_argument("--head", required=True, help="ONNX file whose energy head gives the fixed masks")
    ap.add_argument("--out", required=True, help="the JSON file to write (training/experiments/<model>/semantics.json)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    random.seed(0)
    torch.manual_seed(0)
    model = load_backbone(weights_path())
    train_photos, held = data.load_photos(args.data)
    views = data.held_out_views(args.data, held)
    x = torch.stack([v for _, v in views])
    with torch.no_grad():
        f = torch.cat([model.features[:CUT](x[i:i + 64]) for i in range(0, len(x), 64)])
        calib = torch.stack([data.runtime_view(im) for _, im in train_photos])
        fc = model.features[:CUT](calib)
    means = calibration_means(model, fc)
    suffix = Suffix(model, means, fit_fast_paths(model, fc))
    full = torch.ones(len(f), 1, 28, 28)
    with torch.no_grad():
        dense, _ = suffix.run(f, full, ZERO)
    total = dense_macs(model, f)
    head = head_from_onnx(args.head)
    with torch.no_grad():
        e, _ = head(f)
    masks = {"shipped head": hard_mask(e)}
    for keep in (0.3, 0.5, 0.7):
        masks[f"random {keep}"] = coherent_masks(len(f), keep, seed=int(keep * 10))
    rows = []
    only = os.environ.get("ONLY")
    for sem in VARIANTS:
        if only and only not in sem.name():
            continue
        for mname, m in masks.items():
            t0 = time.time()
            with torch.no_grad():
                logits, macs = zip(*[suffix.run(f[i:i + 64], m[i:i + 64], sem) for i in range(0, len(f), 64)])
            logits, macs = torch.cat(logits), torch.cat(macs)
            agree = (logits.argmax(1) == dense.argmax(1)).float().mean().item()
            d5, s5 = dense.topk(5, 1).indices, logits.topk(5, 1).indices
            top5 = np.mean([len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(d5, s5)])
            row = {"semantics": sem.name(), "config": sem.__dict__, "masks": mname,
                   "keep": m.flatten(1).mean(1).mean().item(), "top1_agreement": agree, "top5_overlap": float(top5),
                   "mac_fraction": (macs / total).mean().item()}
            row["agreement_per_mac_saved"] = agree / max(1e-6, 1 - row["mac_fraction"])
            rows.append(row)
            print(f"{row['semantics']:<70} {mname:<13} keep {row['keep']:.3f} agree {agree:6.1%} "
                  f"top5 {top5:6.1%} MACs {row['mac_fraction']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    with open(args.out, "w") as fh:
        json.dump({"views": len(views), "dense_suffix_macs": total, "rows": rows,
                   "held_out": sorted({k for k, _ in views})}, fh, indent=1)


if __name__ == "__main__":
    main()
