"""Write REPORT.md and report.json for the shipped package from training.json
(held-out evaluation, written by train.py) and `ersm bench --json` output.

    cargo run --release -- bench --device cpu --frames 100 --json /tmp/bench.json
    python3 models/mobilenet_v2_ersm/report.py /tmp/bench.json
"""

import json
import os
import sys

import torch
import torchvision


def macs(module, x):
    """Multiply-accumulates of the convs and linear layers of `module` on `x`."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, torch.nn.Conv2d):
            total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, torch.nn.Linear):
            total[0] += m.in_features * m.out_features

    hs = [m.register_forward_hook(hook) for m in module.modules()]
    with torch.no_grad():
        y = module(x)
    for h in hs:
        h.remove()
    return total[0], y

HERE = os.path.dirname(os.path.abspath(__file__))
t = json.load(open(os.path.join(HERE, "training.json")))
bench = json.load(open(sys.argv[1]))
c = t["chosen"]
per = t["held_out_per_image"]
st = bench["stages"]

net = torchvision.models.mobilenet_v2().eval()
prefix_macs, f = macs(net.features[:7], torch.zeros(1, 3, 224, 224))
suffix_macs, _ = macs(torch.nn.Sequential(net.features[7:], torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                          net.classifier), f)
report = {"prefix_macs": prefix_macs, "suffix_macs": suffix_macs, "chosen": c, "curve": t["curve"], "held_out_per_image": per, "bench": bench}
json.dump(report, open(os.path.join(HERE, "report.json"), "w"), indent=1)

L = []
L.append("# mobilenet_v2_ersm — report\n")
L.append("torchvision MobileNetV2 (IMAGENET1K_V1) with a trained ERSM energy layer after the "
         "stride-8 stage (`features[:7]`, 32×28×28 tokens at 224×224). Produced by `train.py`; "
         "settings, image lists and package versions in `training.json`.\n")
L.append("## The cut\n")
L.append(f"Dense MobileNetV2: {(prefix_macs + suffix_macs)/1e6:.1f} M multiply-accumulates; the prefix "
         f"(before the energy layer) {prefix_macs/1e6:.1f} M ({100*prefix_macs/(prefix_macs+suffix_macs):.0f} %), "
         f"the suffix {suffix_macs/1e6:.1f} M. Measured dense CPU time (tract, `ersm bench`, p50): prefix "
         f"{st['dense']['prefix']['p50_ms']:.2f} ms, suffix {st['dense']['suffix']['p50_ms']:.2f} ms. "
         "The prefix runs at 112×112 and 56×56 where convs are cheap per MAC but memory-heavy, so it takes "
         "a larger share of the time than of the MACs; the Amdahl bound below follows from that split.\n")
L.append("## Targets\n")
met = c["top1_agreement"] >= 0.97 and c["keep_mean"] <= 0.5
L.append(f"Target: top-1 agreement with dense ≥ 97 % at mean keep ≤ 50 %. **{'Met' if met else 'Not met'}**: "
         f"the shipped point keeps {c['keep_mean']*100:.1f} % of tokens on average and agrees on "
         f"{c['top1_agreement']*100:.1f} % of held-out views.\n")
L.append("## Trade-off (held-out views)\n")
L.append("`beta` weighs the expected-keep regulariser; `ratio` is the importance threshold of the head's "
         "token-importance term (a token matters when |features × ∂top-1/∂features| exceeds `ratio` times the "
         "image's mean). Each point: 150 steps of 16 augmented crops, head only (the backbone is torchvision's). "
         "Evaluated on 14 held-out photos × 10 views.\n")
L.append("| beta | ratio | keep mean | keep min | keep max | top-1 agreement | top-5 overlap |")
L.append("|---|---|---|---|---|---|---|")
for p in t["curve"]:
    L.append(f"| {p['beta']} | {p.get('ratio', '-')} | {p['keep_mean']:.3f} | {p['keep_min']:.3f} | {p['keep_max']:.3f} | "
             f"{p['top1_agreement']*100:.1f} % | {p['top5_overlap']*100:.1f} % |")
L.append(f"\nShipped: beta = {c['beta']}, ratio = {c.get('ratio')}: the most faithful point that drops tokens.\n")
L.append("What the curve shows: with torchvision's suffix unchanged, the network does not tolerate zeroed "
         "tokens at 28×28 — the keep ratio jumps between ~100 % and ~60 % and agreement falls to 40–50 % once "
         "a third of the tokens go, even when the head drops the least important ones. Reaching the target "
         "needs the suffix trained under the mask (sparsity-aware fine-tuning, as ERSM trains it) on far more "
         "than 34 photos; a first attempt here (Adam on the suffix at 1e-4) moved the dense path away from "
         "torchvision's (86 % top-1 fidelity) and was dropped.\n")
L.append("## Held-out images (10 views each: centre crop, four corner crops, mirrored)\n")
L.append("| image | keep mean | keep min | keep max | top-1 agreement | top-5 overlap |")
L.append("|---|---|---|---|---|---|")
for n, p in per.items():
    L.append(f"| {n} | {p['keep_mean']:.3f} | {p['keep_min']:.3f} | {p['keep_max']:.3f} | "
             f"{p['top1_agreement']*100:.0f} % | {p['top5_overlap']*100:.0f} % |")
L.append("\n## Cost and latency (`ersm bench`, CPU, bundled held-out photos)\n")
L.append(f"Suffix multiply-accumulates: {bench['suffix_macs_dense']/1e6:.1f} M dense, "
         f"{bench['suffix_macs_ersm']/1e6:.1f} M ERSM (mean over frames). Mean keep ratio "
         f"{bench['keep_ratio']:.3f} ({bench['keep_ratio_min']:.3f} .. {bench['keep_ratio_max']:.3f}), "
         f"{bench['frames']} frames, device {bench['device']}.\n")
L.append("| stage | ERSM p50 ms | ERSM p95 ms | dense p50 ms | dense p95 ms |")
L.append("|---|---|---|---|---|")
for s in ["preprocess", "prefix", "ersm", "suffix", "total"]:
    e, d = st["ersm"].get(s), st["dense"].get(s)
    fmt = lambda x, k: f"{x[k]:.3f}" if x else "-"
    L.append(f"| {s} | {fmt(e, 'p50_ms')} | {fmt(e, 'p95_ms')} | {fmt(d, 'p50_ms') if s != 'ersm' else '-'} | "
             f"{fmt(d, 'p95_ms') if s != 'ersm' else '-'} |")
L.append(f"\nMeasured speedup {bench['speedup']:.2f}× end to end, {bench['suffix_speedup']:.2f}× on the suffix; "
         f"Amdahl bound at this keep ratio {bench['ideal_speedup']:.2f}× (the dense prefix is most of the "
         f"time at this cut). Top-1 agreement on these frames: {bench['agreement']*100:.1f} %.\n")
open(os.path.join(HERE, "REPORT.md"), "w").write("\n".join(L) + "\n")
print("\n".join(L))
