"""Issue 12, item 5: the shipped package's held-out curve. The package's head
with its unary cost moved by each offset (0: as shipped; higher keeps fewer
tokens), torchvision's suffix under the package's semantics (its fill
vectors, pooling over active tokens, its stride rule). Per offset, on the 554
held-out views: keep per image (mean, min, max), top-1 agreement, top-5
overlap and suffix MAC fraction without fallback; with the package's own
fallback margin; and with the margin chosen on training views for 97 %
training agreement at that offset (calibrate_fallback.py's rule), each with
its fallback rate and effective suffix compute (sparse MACs plus fallback).
Agreement on the views the original is sure of (top-1 softmax margin >= 0.3)
beside it.

    python3 experiments/mobilenet_v2_ersm/measure_curve.py --data /tmp/data \\
        --package models/mobilenet_v2_ersm --out models/mobilenet_v2_ersm/runs/curve_package.json
"""

import argparse
import json
import os
import random

import torch

from ersm_training import data
from ersm_training.calibrate_fallback import outputs
from ersm_training.export import choice_features, choose_margin, dense_logits, summarise
from ersm_training.measure_semantics import head_from_onnx, package_fills, package_semantics
from ersm_training.finetune import sure_views
from ersm_training.train import load_backbone, weights_path


def sure_agreement(o):
    """Top-1 agreement without fallback on the views the original is sure of, and their share."""
    sure = sure_views(o["dense"])
    hit = o["sparse"].argmax(1) == o["dense"].argmax(1)
    return {"sure_share": sure.float().mean().item(),
            "sure_agreement": hit[sure].float().mean().item() if sure.any() else float("nan")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="folder with the extracted Debian packages (see data.py)")
    ap.add_argument("--package", required=True, help="package folder (manifest.json, model.onnx)")
    ap.add_argument("--offsets", default="-0.6,-0.4,-0.2,0,0.2,0.4,0.6,0.65,0.7,0.8,1.0,1.5")
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--train-views", type=int, default=1200)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)
    onnx_path = os.path.join(args.package, "model.onnx")
    with open(os.path.join(args.package, "manifest.json")) as fh:
        package_margin = json.load(fh)["fallback"]["margin"]
    teacher = load_backbone(weights_path())
    head = head_from_onnx(onnx_path)
    sem = package_semantics(onnx_path)
    fills = package_fills(onnx_path)
    _, held, stamps, images = data.training_images(args.data)
    tf, hf, _ = choice_features(teacher, args.data, images, stamps, held, args.train_views)
    td, hd = dense_logits(teacher, tf), dense_logits(teacher, hf)
    points = []
    for off in (float(v) for v in args.offsets.split(",")):
        to = outputs(teacher, head, tf, td, sem, fills, off)
        ho = outputs(teacher, head, hf, hd, sem, fills, off)
        chosen = choose_margin(to, args.target)
        p = {"offset": off, "sparse": {**summarise(ho), **sure_agreement(ho)},
             "package_margin": package_margin, "with_package_margin": summarise(ho, package_margin),
             "chosen_margin": chosen, "with_chosen_margin": summarise(ho, chosen),
             "train_fallback_rate": summarise(to, chosen)["fallback_rate"]}
        print(json.dumps(p), flush=True)
        points.append(p)
    with open(args.out, "w") as fh:
        json.dump({"semantics": sem.name(), "target": args.target, "train_views": len(tf),
                   "held_out_views": len(hf), "points": points}, fh, indent=1)


if __name__ == "__main__":
    main()
