"""Where fill vectors help and where they hurt: top-1 agreement with the
original on the held-out photos' views and on the held-out clips' frames
separately, under the package's masks, with zero at dropped positions and
with a fill package's vectors (REPORT section 2).

    python3 experiments/mobilenet_v2_ersm/measure_fill_split.py --cache /tmp/rank/cache1600.pt \
        --package models/mobilenet_v2_ersm/model.onnx --out models/mobilenet_v2_ersm/runs/fills_split_active.json

and runs/fills_split.json the same on a copy filled with `add_fills.py --pool all`.

The cache is train_rank.py's: held-out features in `data.held_out_views`
order, ten views of each held-out photo first, then the clips' frames.
"""

import argparse
import json
import os
from dataclasses import replace

import torch

from ersm_training.measure_semantics import head_from_onnx, package_fills, package_semantics
from ersm_training.semantics import ZERO, Suffix
from ersm_training.train import hard_mask, load_backbone, weights_path

VIEWS_PER_PHOTO = 10


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True, help="train_rank.py's cacheN.pt")
    ap.add_argument("--package", required=True, help="model.onnx with fills (its head gives the masks)")
    ap.add_argument("--photos", type=int, default=51, help="held-out photos (their views come first)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    _, _, _, hf, _, hd = torch.load(args.cache, weights_only=True)
    net = load_backbone(weights_path())
    head = head_from_onnx(args.package)
    fills = package_fills(args.package)
    if fills is None:
        raise SystemExit(f"{args.package}: no fill vectors (add_fills.py)")
    sem = package_semantics(args.package)
    target = hd.argmax(1)
    with torch.no_grad():
        m = torch.cat([hard_mask(head(hf[i:i + 64])[0]) for i in range(0, len(hf), 64)])

        def agreement(suffix, s):
            lg = torch.cat([suffix.run(hf[i:i + 64], m[i:i + 64], s)[0] for i in range(0, len(hf), 64)])
            return (lg.argmax(1) == target).float()

        zero = agreement(Suffix(net), replace(ZERO, down=sem.down))
        fill = agreement(Suffix(net, fills), sem)
    n = args.photos * VIEWS_PER_PHOTO
    out = {"views": len(hf), "keep_mean": m.flatten(1).mean(1).mean().item(), "groups": []}
    for name, sl in [("held-out photos (10 views each)", slice(0, n)), ("held-out clip frames", slice(n, None)),
                     ("all", slice(None))]:
        row = {"group": name, "views": len(zero[sl]), "zero": zero[sl].mean().item(), "fill": fill[sl].mean().item()}
        out["groups"].append(row)
        print(json.dumps(row))
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
