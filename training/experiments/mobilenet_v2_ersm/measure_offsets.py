"""Issue 12, REPORT section 7: a head's agreement, keep and suffix MACs on the
held-out views at a list of threshold offsets, torchvision's suffix unchanged.
The offset goes into the unary cost (`--where unary`: where export_head.py
bakes it, so the mean-field steps see it) or onto the final energy
(`--where energy`: how train_rank.py moves its heads). Uses train_rank.py's
cache of held-out features.

    python3 experiments/mobilenet_v2_ersm/measure_offsets.py --cache /tmp/rank/cache1600.pt \
        --head ORIGINAL_MODEL.onnx --where unary --offsets 0,-0.25,-0.35,-0.5,-0.75,-1 \
        --out models/mobilenet_v2_ersm/runs/package_offsets_centre.json

`--head` is a package's model.onnx, or a train_rank.py state dict with `--kind`.
ORIGINAL_MODEL.onnx is the package as train.py exported it (offset 0, `any`):
`git show e537dbd:models/mobilenet_v2_ersm/model.onnx`.
`--fills CKPT` runs the suffix with a `finetune.py --tune fill` checkpoint's
fill vectors and semantics (REPORT section 2, run 8; runs/run8_fills.pt holds
that run's fill vectors from its step-300 checkpoint):

    python3 experiments/mobilenet_v2_ersm/measure_offsets.py --cache /tmp/rank/cache1600.pt \
        --head models/mobilenet_v2_ersm/model.onnx --where unary --offsets=-0.4,-0.2,0,0.2,0.35,0.75 \
        --fills models/mobilenet_v2_ersm/runs/run8_fills.pt --out models/mobilenet_v2_ersm/runs/run8_offsets.json

and the same without `--fills` (zero) for runs/run8_zero_offsets.json.
"""

import argparse
import json
import os
from dataclasses import replace

import torch

from ersm_training.measure_ranking import runner
from ersm_training.measure_semantics import head_from_onnx
from ersm_training.semantics import ZERO, Suffix, semantic_keys
from ersm_training.train import load_backbone, weights_path
from ersm_training.finetune import SEMANTICS
from ersm_training.train_rank import energies, make_head, offset_points


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True, help="train_rank.py's cacheN.pt")
    ap.add_argument("--head", required=True, help="model.onnx, or a train_rank.py state dict")
    ap.add_argument("--kind", default="local", help="train_rank.py's --head-kind of a state dict")
    ap.add_argument("--where", choices=["unary", "energy"], required=True)
    ap.add_argument("--offsets", required=True, help="comma-separated")
    ap.add_argument("--rule", choices=["any", "centre"], default="centre")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--fills", help="a finetune.py --tune fill checkpoint: its fill vectors and semantics "
                                    "(torchvision's weights either way)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, _, _, hf, _, hd = torch.load(args.cache, weights_only=True)
    if args.head.endswith(".onnx"):
        head = head_from_onnx(args.head)
    else:
        head = make_head(args.kind)
        head.load_state_dict(torch.load(args.head, weights_only=True))
        head.eval()
    net = load_backbone(weights_path())
    if args.fills:
        ck = torch.load(args.fills, weights_only=False)
        if ck["args"].get("tune") != "fill":
            raise SystemExit(f"{args.fills}: not a --tune fill checkpoint")
        sem = SEMANTICS[ck["args"]["semantics"]]
        means = semantic_keys({k[len("means."):]: v for k, v in ck["student"].items() if k.startswith("means.")})
        run = runner(Suffix(net, means), hf, hd, sem)
    else:
        run = runner(Suffix(net), hf, hd, replace(ZERO, down=args.rule))
    offsets = [float(o) for o in args.offsets.split(",")]
    if args.where == "energy":
        points = offset_points(run, energies(head, hf)[:, 0], offsets)
    else:
        points = []
        for off in offsets:
            p = offset_points(run, energies(head, hf, off)[:, 0], [0.0])[0]
            points.append({**p, "offset": off})
    for p in points:
        print(json.dumps(p), flush=True)
    with open(args.out, "w") as fh:
        json.dump(points, fh, indent=1)


if __name__ == "__main__":
    main()
