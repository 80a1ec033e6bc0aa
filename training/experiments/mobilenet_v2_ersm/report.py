"""Write REPORT.md and report.json for the shipped package from training.json
(held-out evaluation, written by train.py) and `ersm bench --json` output.

    cargo run --release -- bench --device cpu --frames 100 --json /tmp/bench.json
    python3 experiments/mobilenet_v2_ersm/report.py /tmp/bench.json
"""

import json
import os
import sys

import torch
import torchvision

from ersm_training.semantics import describe


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


# Fine-tuning runs measured while choosing the recipe (held-out views, same evaluation).
TRIED = [
    ("suffix, Adam 1e-5, 200 steps: `--points 0.02:1.0 --steps 200 --finetune-lr 1e-5`",
     "0.390", "18.6 % (head only 12.9 %)", "82.9 %"),
    ("BatchNorm only, Adam 1e-4, 300 steps: `--points 0.02:0.6 --steps 300 --finetune bn --finetune-lr 1e-4`",
     "0.778", "75.0 % (head only 72.1 %)", "92.9 %"),
    ("suffix, SGD 1e-3 with momentum, 80 steps, ratio 0.5 (an earlier recipe: SGD, KL gradient into the head)",
     "0.924", "90.0 %", "87.1 %"),
    ("suffix, SGD 1e-2 with momentum, 80 steps (same earlier recipe)", "1.000", "diverged (KL > 100)", "0 %"),
    ("head only with a tenth of the straight-through KL gradient: `--points 0.02:0.6 --head-kl 0.1`",
     "0.168", "0.0 % (head only 72.1 %)", "100 %"),
    ("head only, coherence `LAMBDA` 0.5 instead of 0.25, ratio 0.6 / 0.75", "0.780 / 0.651",
     "71.4 % / 48.6 % (on the line)", "100 %"),
    ("head only, coherence `LAMBDA` 1.0, ratio 0.6 / 0.75", "0.790 / 0.663",
     "71.4 % / 55.7 % (within ±4 points of the line)", "100 %"),
]
EVAL = "## Evaluation tools on the held-out photos"
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

def curve_svg(points, chosen, path):
    """Keep ratio against top-1 agreement, one dot per trained point, the target region shaded."""
    W, H, M = 520, 360, 50
    X = lambda k: M + k * (W - 2 * M)
    Y = lambda a: H - M - a * (H - 2 * M)
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<rect x="{X(0)}" y="{Y(1)}" width="{X(0.5) - X(0)}" height="{Y(0.97) - Y(1)}" fill="#c8f0c8"/>',
         f'<text x="{X(0.01)}" y="{Y(0.97) + 12}" fill="#2a7a2a">target: keep ≤ 0.5, agreement ≥ 97 %</text>',
         f'<line x1="{X(0)}" y1="{Y(0)}" x2="{X(1)}" y2="{Y(0)}" stroke="black"/>',
         f'<line x1="{X(0)}" y1="{Y(0)}" x2="{X(0)}" y2="{Y(1)}" stroke="black"/>']
    for v in [0, 0.25, 0.5, 0.75, 1.0]:
        o.append(f'<text x="{X(v)}" y="{Y(0) + 16}" text-anchor="middle">{v:g}</text>')
        o.append(f'<text x="{X(0) - 6}" y="{Y(v) + 4}" text-anchor="end">{v * 100:.0f} %</text>')
    o.append(f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">mean keep ratio (held-out views)</text>')
    o.append(f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">'
             'top-1 agreement with dense</text>')
    line = sorted((p for p in points if p["beta"] == chosen["beta"]), key=lambda p: p["keep_mean"])
    o.append('<polyline fill="none" stroke="#4060c0" points="' +
             " ".join(f"{X(p['keep_mean']):.1f},{Y(p['top1_agreement']):.1f}" for p in line) + '"/>')
    side = 0  # the beta points sit close together: their labels go right, stacked
    for p in points:
        me = (p["beta"], p["ratio"]) == (chosen["beta"], chosen["ratio"])
        colour = "#d03030" if me else ("#4060c0" if p["beta"] == chosen["beta"] else "#e09020")
        x, y = X(p["keep_mean"]), Y(p["top1_agreement"])
        o.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{5 if me else 4}" fill="{colour}"/>')
        if p["beta"] == chosen["beta"]:
            o.append(f'<text x="{x - 8:.1f}" y="{y - 4:.1f}" text-anchor="end" fill="{colour}">'
                     f'ratio {p["ratio"]:g}</text>')
        else:
            o.append(f'<text x="{x + 10:.1f}" y="{y + 14 + 12 * side:.1f}" fill="{colour}">beta {p["beta"]:g}</text>')
            side += 1
    o.append(f'<text x="{X(0.02)}" y="{M - 20}">blue: beta {chosen["beta"]:g}, by importance ratio; '
             f'orange: beta varied at ratio {chosen["ratio"]:g}; red: shipped</text>')
    o.append("</svg>")
    open(path, "w").write("\n".join(o) + "\n")


curve_svg(t["curve"], c, os.path.join(HERE, "curve.svg"))

L = []
L.append("# mobilenet_v2_ersm — report\n")
L.append("torchvision MobileNetV2 (IMAGENET1K_V1) with a trained ERSM energy layer after the "
         "stride-8 stage (`features[:7]`, 32×28×28 tokens at 224×224). Produced by `train.py`; "
         "settings, image lists and package versions in `training.json`.\n")
head = t.get("head")
if head and head["source"] != "package":
    L.append(f"The energy head it ships is no longer `train.py`'s: `export_head.py` put in `{head['source']}` "
             f"(`train_rank.py --head-kind {head['kind']}`, a head that reads a 5×5-token neighbourhood, section 7) "
             f"{-head['offset']:g} below its threshold with the `{head['rule']}` stride rule, and `add_fills.py` "
             "the fill vectors of section 2. The trade-off table below is the history of `train.py`'s head.\n")
L.append("## The cut\n")
L.append(f"Dense MobileNetV2: {(prefix_macs + suffix_macs)/1e6:.1f} M multiply-accumulates; the prefix "
         f"(before the energy layer) {prefix_macs/1e6:.1f} M ({100*prefix_macs/(prefix_macs+suffix_macs):.0f} %), "
         f"the suffix {suffix_macs/1e6:.1f} M. Measured dense CPU time (tract, `ersm bench`, p50): prefix "
         f"{st['dense']['prefix']['p50_ms']:.2f} ms, suffix {st['dense']['suffix']['p50_ms']:.2f} ms. "
         "The prefix runs at 112×112 and 56×56 where convs are cheap per MAC but memory-heavy, so it takes "
         "a larger share of the time than of the MACs; the Amdahl bound below follows from that split.\n")
L.append("## Targets\n")
fb_path = os.path.join(HERE, "fallback.json")
if os.path.exists(fb_path):
    # The package's operating point as shipped (its threshold and stride rule,
    # section 7), measured on the 554-view held-out set by calibrate_fallback.py.
    fb = json.load(open(fb_path))
    h, hf = fb["held_out"], fb["held_out_fallback"]
    met = hf["top1_agreement"] >= 0.97 and hf["effective_compute"] <= 0.5
    L.append(f"Target: top-1 agreement with dense ≥ 97 % at ≤ 50 % of the dense suffix's compute (fallback "
             f"included). **{'Met' if met else 'Not met'}**: on {h['views']} held-out views (sparse semantics: "
             f"{describe(fb['semantics'])}) the shipped point keeps {h['keep_mean']*100:.1f} % of tokens on average "
             f"({h['keep_min']*100:.0f}–{h['keep_max']*100:.0f} %), spends {h['sparse_mac_fraction']:.3f} of the "
             f"dense suffix MACs and agrees on {h['top1_agreement']*100:.1f} % of them; with the package's fallback "
             f"margin ({fb['fallback_margin']:g}) {hf['top1_agreement']*100:.1f} % at {hf['effective_compute']:.2f} "
             "of the dense suffix compute. The threshold and stride rule it ships with are chosen in section 7 "
             "below; the trade-off table that follows is `train.py`'s own evaluation of the head (offset 0, `any` "
             "rule, 140 views).\n")
    # Item 6: the best point at ≤ 50 % keep without the fallback, over every
    # head measured (section 7, zero at dropped positions) and the shipped
    # package with its fill vectors (section 5's curve).
    points = []
    op_path = os.path.join(HERE, "runs", "operating_point.json")
    if os.path.exists(op_path):
        points += [(p, f"the `{sw['head']}` head of section 7") for sw in json.load(open(op_path))["sweeps"]
                   for p in sw["points"]]
    cv_path = os.path.join(HERE, "runs", "curve_package.json")
    if os.path.exists(cv_path):
        points += [({"offset": c["offset"], "agreement": c["sparse"]["top1_agreement"],
                     "keep_mean": c["sparse"]["keep_mean"], "mac_fraction": c["sparse"]["sparse_mac_fraction"]},
                    "the shipped package (its fill vectors; section 5's curve)")
                   for c in json.load(open(cv_path))["points"]]
    best = max((q for q in points if q[0]["keep_mean"] <= 0.5), key=lambda q: q[0]["agreement"], default=None)
    if best:
        p, head = best
        L.append(f"Without the fallback, the best point at ≤ 50 % mean keep on these views is {head} "
                 f"at offset {p['offset']:+g}: {p['agreement']*100:.1f} % agreement at keep "
                 f"{p['keep_mean']:.3f} ({p['mac_fraction']:.3f} of the suffix MACs).\n")
    del_path = os.path.join(HERE, "eval", "deletion.json")
    if os.path.exists(del_path):
        # Item 6's third target, as `ersm eval deletion` measures it (evaluation section).
        d = json.load(open(del_path))["result"]
        area = {r["ranking"]: r for r in d["curves"]}
        e, mg, r = (area[k] for k in ("energy", "magnitude", "random"))
        L.append(f"Target: in `ersm eval deletion` the energy order's area is clearly above magnitude's and "
                 f"random's. On {d['images']} held-out frames: {e['agreement_area']:.3f} against "
                 f"{mg['agreement_area']:.3f} and {r['agreement_area']:.3f} (probability of the dense top-1: "
                 f"{e['probability_area']:.3f} against {mg['probability_area']:.3f} and "
                 f"{r['probability_area']:.3f}); the evaluation section has the curves.\n")
else:
    met = c["top1_agreement"] >= 0.97 and c["keep_mean"] <= 0.5
    L.append(f"Target: top-1 agreement with dense ≥ 97 % at mean keep ≤ 50 %. **{'Met' if met else 'Not met'}**: "
             f"the shipped point keeps {c['keep_mean']*100:.1f} % of tokens on average and agrees on "
             f"{c['top1_agreement']*100:.1f} % of held-out views.\n")
L.append("## Trade-off (held-out views)\n")
cfg = t["settings"]
tuned = cfg.get("finetune_lr", 0) > 0
L.append("`beta` weighs the expected-keep regulariser; `ratio` is the importance threshold of the head's "
         "token-importance term (a token matters when |features × ∂top-1/∂features| exceeds `ratio` times the "
         f"image's mean). Each point: {cfg['train_steps']} steps of {cfg['batch']} augmented crops of the "
         f"training photos, with photographed objects pasted in ({len(t.get('pasted_objects', {}).get('files', []))} "
         "Tux Paint stamps), " + (f"head and suffix (Adam {cfg['finetune_lr']})" if tuned else
         "head only (the backbone is torchvision's, so the dense baseline is exactly torchvision's network)") +
         ". Evaluated on 14 held-out photos × 10 views.\n")
L.append("| beta | ratio | keep mean | keep min | keep max | top-1 agreement | top-5 overlap | dense = torchvision |")
L.append("|---|---|---|---|---|---|---|---|")
for p in t["curve"]:
    L.append(f"| {p['beta']} | {p.get('ratio', '-')} | {p['keep_mean']:.3f} | {p['keep_min']:.3f} | {p['keep_max']:.3f} | "
             f"{p['top1_agreement']*100:.1f} % | {p['top5_overlap']*100:.1f} % | "
             f"{p.get('dense_vs_torchvision_top1', 1.0)*100:.1f} % |")
L.append("\n![trade-off curve](curve.svg)\n")
L.append(f"Shipped: beta = {c['beta']}, ratio = {c.get('ratio')}: {t.get('chosen_why', '')}" +
         (" (then its threshold moved and the `centre` stride rule set, section 7)" if os.path.exists(fb_path) else "")
         + ".\n")
by_ratio = sorted((p for p in t["curve"] if p["beta"] == c["beta"]), key=lambda p: p["keep_mean"])
L.append("What the curve shows: the importance threshold `ratio` sets how many tokens go, and agreement falls "
         "about as fast as the keep ratio does (" + ", ".join(
             f"keep {p['keep_mean']:.2f} → {p['top1_agreement']*100:.0f} %" for p in by_ratio) +
         "); `beta` in 0–0.3 moves the point little next to the importance term. The head shipped before "
         "this one (trained with the KL gradient, 66.6 % keep, 51.4 % agreement) lay on the same line. With torchvision's suffix "
         "unchanged the network does not tolerate zeroed tokens at 28×28: the head sees only stride-8 "
         "features (a local view) and cannot know which regions the global decision rests on, and on many "
         "held-out photos the dense top-1 is a close call that context tips over.\n")
L.append("Tried and not shipped (each against the head-only point at the same `ratio`; commands are "
         "`train.py` with the flags shown; one held-out view is 0.7 points):\n")
L.append("| run | keep mean | top-1 agreement | dense = torchvision |")
L.append("|---|---|---|---|")
for row in TRIED:
    L.append("| " + " | ".join(row) + " |")
L.append("\nFine-tuning helps agreement a little and costs the dense baseline more than it gains: on 34 "
         "training photos the fine-tuned suffix drifts from torchvision's on images unlike them. Reaching the "
         "target needs sparsity-aware training of the suffix on a large image set (as DynConv trains on "
         "ImageNet), which is out of reach here (no ImageNet, 2 CPU cores). The earlier shipped head was "
         "trained with the straight-through KL gradient into the head; that gradient points towards dropping "
         "more even as the KL grows (keep fell from 100 % to 5 % in 60 steps with the pasted-object images), so "
         "the head now learns from the importance target and the regulariser only.\n")
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
L.append("The suffix speedup is larger than the multiply-accumulates saved "
         f"({bench['suffix_macs_dense']/bench['suffix_macs_ersm']:.2f}×) and than the bound because part of it is "
         "implementation, not sparsity: with every token kept, ersm's sparse suffix already runs about 1.38× faster "
         "than tract's dense suffix on this network (`cargo bench --bench suffix`, 2-core x86: 6.9 vs 9.5 ms). "
         "Against its own all-kept time, the saving from dropping tokens at this keep ratio is about the MAC ratio.\n")
# The evaluation sections are written by hand from `ersm eval` output: keep them.
old = open(os.path.join(HERE, "REPORT.md")).read()
tail = old[old.index(EVAL):] if EVAL in old else ""
open(os.path.join(HERE, "REPORT.md"), "w").write("\n".join(L) + "\n" + ("\n" + tail if tail else ""))
print("\n".join(L))
