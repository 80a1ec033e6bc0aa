"""Where the sparse network loses its answers (REPORT section 3): on the
held-out views, under the package's masks at a few offsets of its threshold,
top-1 agreement with the original when

- the sparse suffix runs as shipped (`as shipped`);
- every kept token's features are exact (the dense suffix) and only global
  pooling leaves out the dropped tokens (`pooling only`);
- the sparse suffix runs as shipped, but the dropped tokens enter global
  pooling with their dense values (`kept tokens only`): what the errors at
  kept tokens, which grow from the holes' borders, cost by themselves;
- the depthwise convs read, at dropped taps, the mean of the kept expansion
  outputs around them instead of the fill vector (`inpaint`, `inpaint-half`:
  halfway between the two), a semantics that leaves the dense path alone;
- the pool gets an estimate of the dropped tokens' mean final feature, a
  ridge-fitted linear map of the cut features' means over the dropped and the
  kept tokens and of the kept tokens' pool (`pool estimate`, fitted on
  augmented training views under the same head at random offsets; the best
  of four ridge strengths, so an optimistic figure);
- each dropped cell of the last (7x7) map enters the pool with an estimate
  of its dense feature, from its own 4x4 patch of cut features and the
  image's mean cut feature, through a two-layer MLP trained by regression
  on the same training views (`cell fast path`).

    python3 experiments/mobilenet_v2_ersm/measure_losses.py --data /tmp/data \\
        --package models/mobilenet_v2_ersm/model.onnx --out models/mobilenet_v2_ersm/runs/losses.json
"""

import argparse
import json
import os
from dataclasses import replace

import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from ersm_training import data
from ersm_training.measure_semantics import head_from_onnx, package_fills, package_semantics
from ersm_training.semantics import Suffix, downsample
from ersm_training.train import CUT, hard_mask, load_backbone, weights_path

BATCH = 64


def prefix_features(net, x):
    """Cut features of the views `x`."""
    return torch.cat([net.features[:CUT](x[i:i + BATCH]) for i in range(0, len(x), BATCH)])


def dense_maps_of(net, f):
    """The dense suffix's last map (before pooling) for cut features `f`."""
    return torch.cat([net.features[CUT:](f[i:i + BATCH]) for i in range(0, len(f), BATCH)])


def sparse_run(net, fills, sem, f, m):
    """The sparse suffix on cut features `f` under masks `m`: its logits, its
    last map and that map's mask."""
    out = []
    for i in range(0, len(f), BATCH):
        maps = {}
        logits = Suffix(net, fills).run(f[i:i + BATCH], m[i:i + BATCH], sem, maps)[0]
        out.append((logits, maps[(18, "out")], maps[(18, "mask")]))
    return [torch.cat(z) for z in zip(*out)]


def pool_inputs(ys, ms, f, m):
    """Per view: the sparse pool over the kept tokens of the last map `ys`
    (mask `ms`), the share of it kept, and the cut features' means over the
    dropped and the kept tokens (mask `m`)."""
    pool = (ys * ms).sum((2, 3)) / ms.sum((2, 3)).clamp_min(1.0)
    g = torch.cat([(f * w).sum((2, 3)) / w.sum((2, 3)).clamp_min(1.0) for w in (1 - m, m)], 1)
    return pool, ms.flatten(1).mean(1, keepdim=True), g


def training_features(net, stamps, images, views=2560):
    """Cut features of augmented training views."""
    random.seed(0)
    torch.manual_seed(0)
    gen = data.Views(images, stamps)
    return torch.cat([net.features[:CUT](gen.batch(BATCH)) for _ in range(views // BATCH)])


def fit_pool_estimates(net, head, fills, sem, f, dense_maps):
    """Ridge maps from [dropped and kept cut means, kept pool, 1] to the
    dropped tokens' mean dense feature, one per ridge strength, fitted on cut
    features `f` (dense last maps `dense_maps`) under the head's masks at
    random offsets."""
    shift = torch.rand(len(f), 1, 1, 1) * 1.2 - 0.2
    m = torch.cat([hard_mask(head(f[i:i + BATCH], shift[i:i + BATCH])[0]) for i in range(0, len(f), BATCH)])
    _, ys, ms = sparse_run(net, fills, sem, f, m)
    pool, k, g = pool_inputs(ys, ms, f, m)
    dense = dense_maps.mean((2, 3))
    sel = k[:, 0] < 0.999
    x = torch.cat([g, pool, torch.ones(len(g), 1)], 1)[sel]
    target = ((dense - k * pool) / (1 - k))[sel]
    return [torch.linalg.solve(x.T @ x + lam * len(x) * torch.eye(x.shape[1]), x.T @ target)
            for lam in (1e-2, 1e-1, 1.0, 10.0)]


def cells(f):
    """Each cell of the 7x7 map: its 4x4 patch of cut features and the image's
    mean cut feature, one row per cell."""
    patch = F.unfold(f, 4, stride=4).transpose(1, 2)
    mean = f.mean((2, 3))[:, None, :].expand(-1, patch.shape[1], -1)
    return torch.cat([patch, mean], 2).reshape(-1, patch.shape[2] + f.shape[1])


def fit_cell_fast_path(f, dense_maps, epochs=12, hidden=512):
    """A two-layer MLP from `cells(f)` to each cell's dense final feature (of
    `dense_maps`, standardised in and out), trained by regression; returns the
    map from cut features to estimated final maps."""
    with torch.enable_grad():
        x = cells(f)
        y = dense_maps
        side = y.shape[-1]
        y = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
        xm, xs, ym, ys = x.mean(0), x.std(0) + 1e-3, y.mean(0), y.std(0) + 1e-3
        mlp = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, y.shape[1]))
        opt = torch.optim.Adam(mlp.parameters(), 1e-3)
        for _ in range(epochs):
            for b in torch.randperm(len(x)).split(1024):
                loss = F.mse_loss(mlp((x[b] - xm) / xs), (y[b] - ym) / ys)
                opt.zero_grad()
                loss.backward()
                opt.step()

    def estimate(fc):
        out = mlp((cells(fc) - xm) / xs) * ys + ym
        return out.reshape(len(fc), side * side, -1).transpose(1, 2).reshape(len(fc), -1, side, side)
    return estimate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--package", required=True, help="model.onnx: its head gives the masks, its fills the semantics")
    ap.add_argument("--offsets", default="0,0.3,0.6", help="offsets in the head's unary cost (0: as shipped)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    net = load_backbone(weights_path())
    head = head_from_onnx(args.package)
    fills = package_fills(args.package)
    sem = package_semantics(args.package)
    rows = []
    with torch.no_grad():
        _, held, stamps, images = data.training_images(args.data)
        f = prefix_features(net, torch.stack([v for _, v in data.held_out_views(args.data, held)]))
        dense_maps = dense_maps_of(net, f)
        target = net.classifier(dense_maps.mean((2, 3))).argmax(1)
        agree = lambda logits: (logits.argmax(1) == target).float().mean().item()
        train_f = training_features(net, stamps, images)
        train_maps = dense_maps_of(net, train_f)
        estimates = fit_pool_estimates(net, head, fills, sem, train_f, train_maps)
        fast_path = fit_cell_fast_path(train_f, train_maps)
        del train_maps
        fast_maps = torch.cat([fast_path(f[i:i + BATCH]) for i in range(0, len(f), BATCH)])
        for off in (float(v) for v in args.offsets.split(",")):
            m = torch.cat([hard_mask(head(f[i:i + BATCH], off)[0]) for i in range(0, len(f), BATCH)])
            m_last = m
            while m_last.shape[-1] > dense_maps.shape[-1]:
                m_last = downsample(m_last, sem.down)
            pooled = (dense_maps * m_last).sum((2, 3)) / m_last.sum((2, 3)).clamp_min(1.0)
            row = {"offset": off, "keep": m.flatten(1).mean(1).mean().item(),
                   "pooling only": agree(net.classifier(pooled))}
            shipped, ys, ms = sparse_run(net, fills, sem, f, m)
            row["as shipped"] = agree(shipped)
            pool, k, g = pool_inputs(ys, ms, f, m)
            x = torch.cat([g, pool, torch.ones(len(g), 1)], 1)
            row["pool estimate"] = max(agree(net.classifier(k * pool + (1 - k) * (x @ w))) for w in estimates)
            row["kept tokens only"] = agree(net.classifier((ys * ms + dense_maps * (1 - ms)).mean((2, 3))))
            row["cell fast path"] = agree(net.classifier((ys * ms + fast_maps * (1 - ms)).mean((2, 3))))
            for inner in ("inpaint", "inpaint-half"):
                row[inner] = agree(sparse_run(net, fills, replace(sem, inner=inner), f, m)[0])
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open(args.out, "w") as fh:
        json.dump({"views": len(f), "package": os.path.basename(args.package), "semantics": sem.name(),
                   "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
