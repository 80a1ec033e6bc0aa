"""Issue 12, item 4, for a package whose suffix is torchvision's (the shipped
head-only network): choose the confidence-fallback margin on *training* views
(the smallest top-1 margin below which re-running densely brings training
agreement to the target), measure it on the held-out views, and write it into
the manifest so `--fallback` works on the package.

    python3 -m ersm_training.calibrate_fallback --data /tmp/data \
        --package ../models/mobilenet_v2_ersm

The sparse semantics is ersm's for this package (`package_semantics`): zero
and pooling over active tokens, or its fill vectors (`package_fills`) and
pooling over every position; the stride rule its energy node sets. Writes
`fallback.margin` into `manifest.json`, and with `--record` everything
measured (the package's record is training/experiments/mobilenet_v2_ersm/fallback.json).
"""

import argparse
import json
import os
import random

import torch

from . import data
from .export import choice_features, choose_margin, dense_logits, summarise
from .measure_semantics import head_from_onnx, package_fills, package_semantics
from .semantics import Suffix, dense_macs
from .train import hard_mask, load_backbone, weights_path


def outputs(teacher, head, f, dense, sem, fills=None, offset=0.0):
    """Sparse logits, masks and suffix MAC fractions of the package on features f,
    its head's unary cost moved by `offset` (0: as shipped)."""
    total = dense_macs(teacher, f)
    suffix = Suffix(teacher, fills)
    res = {"sparse": [], "mask": [], "macs": []}
    with torch.no_grad():
        for i in range(0, len(f), 64):
            fb = f[i:i + 64]
            m = hard_mask(head(fb, offset)[0])
            logits, macs = suffix.run(fb, m, sem)
            res["sparse"].append(logits)
            res["mask"].append(m)
            res["macs"].append(macs / total)
    out = {k: torch.cat(v) for k, v in res.items()}
    out["dense"] = dense
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="folder with the extracted Debian packages (see data.py)")
    ap.add_argument("--package", required=True, help="package folder (manifest.json, model.onnx)")
    ap.add_argument("--target", type=float, default=0.97, help="training agreement the margin is chosen for")
    ap.add_argument("--train-views", type=int, default=1200)
    ap.add_argument("--record", help="a JSON file for everything measured (training/experiments/<model>/fallback.json)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    random.seed(0)
    torch.manual_seed(0)
    teacher = load_backbone(weights_path())
    head = head_from_onnx(os.path.join(args.package, "model.onnx"))
    sem = package_semantics(os.path.join(args.package, "model.onnx"))
    fills = package_fills(os.path.join(args.package, "model.onnx"))
    _, held, stamps, images = data.training_images(args.data)
    tf, hf, _ = choice_features(teacher, args.data, images, stamps, held, args.train_views)
    to = outputs(teacher, head, tf, dense_logits(teacher, tf), sem, fills)
    ho = outputs(teacher, head, hf, dense_logits(teacher, hf), sem, fills)
    t = choose_margin(to, args.target)
    result = {"target": args.target, "fallback_margin": t, "semantics": sem.name(),
              "train": summarise(to, t), "train_sparse": summarise(to),
              "held_out": summarise(ho), "held_out_fallback": summarise(ho, t),
              "held_out_by_margin": []}
    # The trade-off the margin moves along, on held-out views.
    for m in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8):
        p = summarise(ho, m)
        p["margin"] = m
        result["held_out_by_margin"].append(p)
    print(json.dumps(result, indent=1))
    if args.record:
        with open(args.record, "w") as fh:
            json.dump(result, fh, indent=1)
    path = os.path.join(args.package, "manifest.json")
    with open(path) as fh:
        manifest = json.load(fh)
    manifest["fallback"] = {"margin": round(t, 4)}
    with open(path, "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")


if __name__ == "__main__":
    main()
