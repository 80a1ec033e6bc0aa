"""Sparsity-aware fine-tuning of MobileNetV2's suffix under one semantics
(`semantics.py`), by distillation from the original dense network on heavily
augmented views (`data.py`): the teacher sees the same view as the student.

Loss: KL to the teacher's logits, MSE to its pooled pre-classifier features,
with `--feat` MSE to its feature maps at the active positions of every suffix
block's output and of the pre-pooling map (each normalised by the teacher's
variance there), a pull back toward the teacher's weights, and (when the
energy head trains) the keep regulariser. Masks are either spatially coherent random masks (to
compare semantics with the masks held fixed) or the energy head's (hard
forward, straight-through gradient through a sigmoid whose temperature is
annealed, the head's bias starting where every token is kept).

Checkpoints every `--ckpt-every` steps to `--ckpt`; rerunning the same command
resumes from it. The runs in REPORT.md (logs in runs/; 1.5-2.5 s a step on 2 cores):

    cd models/mobilenet_v2_ersm
    # pilots: which semantics trains better with the masks held random
    python3 finetune.py --data /tmp/data --semantics fast --masks random --steps 240 --eval-every 80 \\
        --ckpt /tmp/pilot_fast.pt --log runs/pilot_fast.jsonl
    python3 finetune.py --data /tmp/data --semantics zero --masks random --steps 240 --eval-every 80 \\
        --ckpt /tmp/pilot_zero.pt --log runs/pilot_zero.jsonl          # stopped after step 160
    # run 1 (its first 200 steps: 150 head-only, 50 joint), then run 2 from its step-200 checkpoint
    python3 finetune.py --data /tmp/data --semantics zero --masks head --ratio 1.0 --beta 0.1 --shift 1.0 \\
        --head-steps 150 --steps 2400 --eval-every 200 --ckpt /tmp/run1.pt --log runs/run1_head_phase.jsonl
    python3 finetune.py --data /tmp/data --semantics zero --masks head --ratio 1.0 --beta 0.1 --shift 1.0 \\
        --steps 1200 --lr 5e-5 --pull 0.05 --full 0.2 --eval-every 150 --init /tmp/run1_step200.pt \\
        --ckpt /tmp/run2.pt --log runs/run2.jsonl                      # stopped after step 600
    python3 finetune.py --data /tmp/data --semantics zero --masks head --ratio 1.0 --beta 0.1 --shift 1.0 \\
        --steps 1200 --lr 5e-5 --pull 0.05 --full 0.2 --eval-every 300 --init /tmp/run2.pt \\
        --ckpt /tmp/run3.pt --log runs/run3.jsonl                      # stopped after step 600
    # run 4: BatchNorm scale/shift and fill vectors only, from the original (stopped after step 360)
    python3 finetune.py --data /tmp/data --semantics zero --masks head --ratio 1.0 --beta 0.1 --shift 1.0 \\
        --head-steps 150 --steps 900 --tune bn --lr 1e-3 --pull 0.05 --full 0.2 --eval-every 150 \\
        --ckpt /tmp/run4/ckpt.pt --log runs/run4.jsonl
    # run 5: run 3 continued on fresh views, one thread (stopped after step 600)
    python3 finetune.py --data /tmp/data --semantics zero --masks head --ratio 1.0 --beta 0.1 --shift 1.0 \\
        --steps 2400 --lr 5e-5 --pull 0.05 --full 0.2 --eval-every 300 --init /tmp/run3.pt --seed 5 \\
        --threads 1 --ckpt /tmp/run5/ckpt.pt --log runs/run5.jsonl
    python3 export.py --data /tmp/data --ckpt /tmp/run2.pt --out /tmp/run2_pkg --offsets=-1,-0.5,0,0.5,1
    # runs 6-8: the package's head held fixed, its masks within +-0.6 of the shipped point
    # (run 6 stopped after step 300, run 7 after 150, run 8 after 300)
    python3 finetune.py --data /tmp/data --semantics zero --masks package --package model.onnx \
        --shift-range=-0.6:0.6 --full 0.2 --lr 3e-5 --pull 0.05 --steps 1800 --eval-every 300 \
        --ckpt /tmp/run6/ckpt.pt --log runs/run6.jsonl
    python3 finetune.py --data /tmp/data --semantics zero --masks package --package model.onnx \
        --shift-range=-0.6:0.6 --full 0.3 --lr 1e-5 --pull 0.05 --steps 900 --eval-every 150 \
        --ckpt /tmp/run7/ckpt.pt --log runs/run7.jsonl
    python3 finetune.py --data /tmp/data --semantics fill --tune fill --masks package --package model.onnx \
        --shift-range=-0.6:0.6 --full 0 --lr 1e-3 --pull 0 --steps 600 --eval-every 150 \
        --ckpt /tmp/run8/ckpt.pt --log runs/run8.jsonl
    # run 10: as run 8, pooling over active tokens (the shipped package's semantics)
    python3 finetune.py --data /tmp/data --semantics fill-active --tune fill --masks package --package model.onnx \
        --shift-range=-0.6:0.6 --full 0 --lr 1e-3 --pull 0 --steps 300 --eval-every 150 \
        --ckpt /tmp/run10/ckpt.pt --log runs/run10.jsonl
    # run 11: run 8's fill vectors trained on under run 10's semantics (runs 6-11 ran
    # while model.onnx held the package head; it now holds the separable head, REPORT section 7)
    python3 finetune.py --data /tmp/data --semantics fill-active --tune fill --masks package --package model.onnx \
        --shift-range=-0.6:0.6 --full 0 --lr 5e-4 --pull 0 --steps 200 --eval-every 200 \
        --init runs/run8_fills.pt --ckpt /tmp/run11/ckpt.pt --log runs/run11.jsonl
    # run 12: run 11's vectors trained on under the separable head's masks (model.onnx as shipped)
    python3 finetune.py --data /tmp/data --semantics fill-active --tune fill --masks package --package model.onnx \
        --shift-range=-0.6:0.6 --full 0 --lr 5e-4 --pull 0 --steps 200 --eval-every 200 \
        --init runs/run11_fills.pt --ckpt /tmp/run12/ckpt.pt --log runs/run12.jsonl
    # run 13: every suffix weight with the feature-map loss, under the shipped package's masks,
    # with Adam (a) and with SGD (b), one thread each, side by side
    python3 finetune.py --data /tmp/data --semantics fill-active --masks package --package model.onnx \
        --shift-range=-0.6:0.6 --init runs/run11_fills.pt --tune all --feat 1.0 --lr 1e-5 --pull 0.05 \
        --full 0.3 --steps 150 --eval-every 75 --threads 1 --ckpt /tmp/run13a/ck.pt --log runs/run13a.jsonl
    python3 finetune.py --data /tmp/data --semantics fill-active --masks package --package model.onnx \
        --shift-range=-0.6:0.6 --init runs/run11_fills.pt --tune all --feat 1.0 --opt sgd --lr 5e-5 --pull 0.05 \
        --full 0.3 --steps 150 --eval-every 75 --threads 1 --ckpt /tmp/run13b/ck.pt --log runs/run13b.jsonl
    # run 14: an order of magnitude longer, aimed at half the tokens: every suffix weight with the
    # feature-map loss, the package's masks from keep ~0.93 down to ~0.3, evaluated at +0.6 (keep 0.52)
    # too; chained across sessions (the same command resumes from its checkpoint)
    python3 finetune.py --data /tmp/data --semantics fill-active --masks package --package model.onnx \
        --shift-range=-0.2:1.0 --init runs/run11_fills.pt --tune all --feat 1.0 --lr 2e-5 --pull 0.05 \
        --full 0.2 --steps 6000 --eval-every 500 --eval-offsets=-0.4,0.35,0.6 --threads 2 \
        --ckpt /work/run14/ck.pt --log runs/run14.jsonl
    # run 15: run 14's recipe for 2000 steps under the fast-path semantics (a residual block passes
    # its input through at dropped positions, the others a trained linear map, the last conv once on
    # their mean), the one semantics the report had tried only in a 240-step pilot
    python3 finetune.py --data /tmp/data --semantics fast --masks package --package model.onnx \
        --shift-range=-0.2:1.0 --tune all --feat 1.0 --lr 2e-5 --pull 0.05 \
        --full 0.2 --steps 2000 --eval-every 500 --eval-offsets=-0.4,0.35,0.6 --threads 2 \
        --ckpt /work/run15/ck.pt --log runs/run15.jsonl
"""

import argparse
import copy
import json
import os
import random
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data
from .measure_semantics import coherent_masks, head_from_onnx, package_semantics
from .semantics import CUT, ZERO, Semantics, Suffix, calibration_means, dense_macs, fit_fast_paths, semantic_keys
from .train import TAU, EnergyHead, hard_mask, importance_targets, load_backbone, weights_path

SEMANTICS = {
    "zero": replace(ZERO, down="centre"),
    "zero-any": ZERO,
    "fast": Semantics(cut="keep", res="identity", nonres="fast", bg="mean", pool="all", down="centre"),
    # Dropped positions of every tensor hold a per-layer fill vector (learned
    # with --tune fill), pooled with the rest: the dense path is untouched.
    "fill": Semantics(cut="mean", bg="mean", pool="all", down="centre"),
    # The same, pooling over active tokens: what the shipped package runs
    # (its pooled head output has no fill).
    "fill-active": Semantics(cut="mean", bg="mean", pool="active", down="centre"),
}


class Student(nn.Module):
    """The suffix being trained: a copy of the network, learned backgrounds
    (fill vectors) and fast paths, and the energy head."""

    def __init__(self, teacher, sem, means, fast):
        super().__init__()
        self.net = copy.deepcopy(teacher)
        self.sem = sem
        self.means = nn.ParameterDict({self.key(k): nn.Parameter(v.clone()) for k, v in means.items()})
        self.fast_w = nn.ParameterDict({str(i): nn.Parameter(w.clone()) for i, (w, _) in fast.items()})
        self.fast_b = nn.ParameterDict({str(i): nn.Parameter(b.clone()) for i, (_, b) in fast.items()})
        self.head = EnergyHead(32)

    @staticmethod
    def key(k):
        return k if isinstance(k, str) else f"{k[0]}_{k[1]}"

    def suffix(self):
        means = semantic_keys(self.means)
        fast = {int(i): (self.fast_w[i], self.fast_b[i]) for i in self.fast_w}
        return Suffix(self.net, means, fast)

    def forward(self, f, m, collect=None):
        s = self.suffix()
        logits, macs = s.run(f, m, self.sem, collect)
        return logits, s.pooled, macs


def teacher_outputs(teacher, f, maps=None):
    """The teacher's logits and pooled features; with `maps` (a dict), also
    every suffix block's output, keyed as `Suffix.run`'s collect keys them."""
    with torch.no_grad():
        y = f
        for i in range(CUT, 19):
            y = teacher.features[i](y)
            if maps is not None:
                maps[(i, "out")] = y
        pooled = y.mean((2, 3))
        return teacher.classifier(pooled), pooled


def feature_mse(student_maps, teacher_maps):
    """Mean over the suffix's maps of the squared error at active positions,
    each map's error divided by the teacher's variance of that map."""
    terms = []
    for key, t in teacher_maps.items():
        s, m = student_maps[key], student_maps[(key[0], "mask")]
        err = ((s - t) ** 2 * m).sum() / (m.sum() * t.shape[1]).clamp_min(1.0)
        terms.append(err / t.var().clamp_min(1e-6))
    return torch.stack(terms).mean()


# The top-1 softmax margin from which the original is "sure" of a view.
SURE = 0.3


def sure_views(logits):
    """Which views the original, with these logits, is sure of."""
    p2 = logits.softmax(1).topk(2, 1).values
    return (p2[:, 0] - p2[:, 1]) >= SURE


def evaluate(student, teacher, f, masks_fn, total):
    """Agreement, top-5 overlap, keep and MAC fraction on held-out features;
    `agree_sure`: agreement on the views whose original top-1 softmax margin
    is at least SURE (where a one-pixel shift keeps 98.9 % of its answers,
    REPORT section 3), and `sure`: their share."""
    student.eval()
    out = {"agree": [], "keep": [], "macs": [], "top5": [], "sure_hit": [], "sure": []}
    with torch.no_grad():
        for i in range(0, len(f), 64):
            fb = f[i:i + 64]
            m = masks_fn(fb, i)
            logits, _, macs = student(fb, m)
            t, _ = teacher_outputs(teacher, fb)
            hit = (logits.argmax(1) == t.argmax(1)).float()
            out["agree"].append(hit)
            sure = sure_views(t).float()
            out["sure"].append(sure)
            out["sure_hit"].append(hit * sure)
            d5, s5 = t.topk(5, 1).indices, logits.topk(5, 1).indices
            out["top5"].append(torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(d5, s5)]))
            out["keep"].append(m.flatten(1).mean(1))
            out["macs"].append(macs / total)
    res = {k: torch.cat(v).mean().item() for k, v in out.items()}
    hits = res.pop("sure_hit")
    res["agree_sure"] = hits / res["sure"] if res["sure"] > 0 else float("nan")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--semantics", choices=sorted(SEMANTICS), default="fast")
    ap.add_argument("--masks", choices=["random", "head", "package"], default="head",
                    help="random coherent masks, the head trained here, or --package's head held fixed")
    ap.add_argument("--package", help="masks package: model.onnx whose energy head (and stride rule) is used")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--head-lr", type=float, default=2e-3)
    ap.add_argument("--opt", choices=["adam", "sgd"], default="adam",
                    help="sgd (momentum 0.9) moves each weight in proportion to its gradient; Adam moves "
                         "every weight by about the learning rate, those the loss barely reaches too")
    ap.add_argument("--mse", type=float, default=1.0, help="weight of the pooled-feature MSE")
    ap.add_argument("--feat", type=float, default=0.0,
                    help="weight of the feature-map MSE at active positions (every suffix block and pre-pooling)")
    ap.add_argument("--pull", type=float, default=1e-3, help="weight of the pull toward the teacher's weights")
    ap.add_argument("--beta", type=float, default=0.5, help="keep regulariser (head masks)")
    ap.add_argument("--ratio", type=float, default=1.0, help="head masks: importance threshold (x image mean)")
    ap.add_argument("--shift", type=float, default=1.0, help="head masks: random energy offset range for the suffix")
    ap.add_argument("--shift-range", help="package masks: lo:hi of the random unary offset (default -shift:shift)")
    ap.add_argument("--st", type=float, default=0.0, help="head masks: weight of the straight-through gradient")
    ap.add_argument("--head-steps", type=int, default=0, help="head masks: steps training the head alone first")
    ap.add_argument("--full", type=float, default=0.0,
                    help="head masks: fraction of each batch run with every token kept (keeps the dense path faithful)")
    ap.add_argument("--tune", choices=["all", "bn", "fill"], default="all",
                    help="suffix parameters trained: all, only BatchNorm's scale and shift (with the fill vectors), "
                         "or only the fill vectors (the network's weights, so its dense path, stay the original's)")
    ap.add_argument("--init", help="start from this checkpoint's student (fresh optimizer and schedule)")
    ap.add_argument("--keep-range", default="0.15:0.7", help="random masks: keep ratio drawn from this range")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-views", type=int, default=256)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--log", required=True)
    ap.add_argument("--eval-offsets", default="-0.4,0.35",
                    help="package masks: unary offsets evaluated besides the shipped point")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="torch threads (1 leaves a core free for other work on a 2-core machine)")
    args = ap.parse_args()
    if args.masks == "package" and not args.package:
        ap.error("--masks package needs --package MODEL.onnx")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    teacher = load_backbone(weights_path())
    train_photos, held, stamps, images = data.training_images(args.data)
    views = data.Views(images, stamps)
    held_views = data.held_out_views(args.data, held)
    rng = random.Random(1)
    sub = sorted(rng.sample(range(len(held_views)), min(args.eval_views, len(held_views))))
    with torch.no_grad():
        hx = torch.stack([held_views[i][1] for i in sub])
        hf = torch.cat([teacher.features[:CUT](hx[i:i + 64]) for i in range(0, len(hx), 64)])
        calib = torch.stack([data.runtime_view(im) for im in images[:256]])
        fc = teacher.features[:CUT](calib)
    sem = SEMANTICS[args.semantics]
    student = Student(teacher, sem, calibration_means(teacher, fc), fit_fast_paths(teacher, fc))
    if args.masks == "package":
        # The package's head, frozen: the suffix learns to tolerate the masks
        # it will be shipped with, across offsets around its operating point.
        if package_semantics(args.package).down != sem.down:
            raise SystemExit(f"{args.package}: stride rule differs from --semantics {args.semantics}")
        # The package's own head, whatever its kind (a per-token head or one
        # with convs ahead of it), held fixed.
        student.head = head_from_onnx(args.package)
        student.head.requires_grad_(False)
    total = dense_macs(teacher, hf)
    teacher_params = {n: p.detach().clone() for n, p in student.net.named_parameters()}
    bn = {f"net.{m}." for m, mod in student.net.named_modules() if isinstance(mod, nn.BatchNorm2d)}
    tuned = [p for n, p in student.named_parameters() if not n.startswith("head.")
             and (args.tune == "all" or not n.startswith("net.") or n[:n.rfind(".") + 1] in bn)
             and (args.tune != "fill" or n.startswith("means."))]
    for p in tuned:
        p.requires_grad_(True)
    groups = [{"params": tuned, "lr": args.lr}, {"params": student.head.parameters(), "lr": args.head_lr}]
    opt = torch.optim.Adam(groups) if args.opt == "adam" else torch.optim.SGD(groups, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    start = 0
    if args.init and not os.path.exists(args.ckpt):
        init = torch.load(args.init, weights_only=False)["student"]
        # A fill-vector file (runs/run*_fills.pt) holds only the `means.`
        # entries; the rest of the student stays the original network.
        partial = all(k.startswith("means.") for k in init)
        missing, unexpected = student.load_state_dict(init, strict=not partial)
        assert not unexpected, f"{args.init}: unknown entries {unexpected[:3]}"
        print(f"initialised from {args.init}" + (" (fill vectors only)" if partial else ""), flush=True)
    if os.path.exists(args.ckpt):
        ck = torch.load(args.ckpt, weights_only=False)
        student.load_state_dict(ck["student"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start = ck["step"]
        random.setstate(ck["py_rng"])
        torch.set_rng_state(ck["torch_rng"])
        print(f"resumed at step {start}", flush=True)
    lo, hi = (float(v) for v in args.keep_range.split(":"))
    eval_masks = {f"random {k}": coherent_masks(len(hf), k, seed=100 + int(k * 10)) for k in (0.3, 0.5)}
    logf = open(args.log, "a")

    def log(rec):
        print(json.dumps(rec), flush=True)
        logf.write(json.dumps(rec) + "\n")
        logf.flush()

    def run_eval(step):
        rec = {"step": step, "semantics": sem.name(), "masks": args.masks}
        for name, em in eval_masks.items():
            rec[name] = evaluate(student, teacher, hf, lambda fb, i, em=em: em[i:i + len(fb)], total)
        rec["full"] = evaluate(student, teacher, hf, lambda fb, i: torch.ones(len(fb), 1, 28, 28), total)
        if args.masks != "random":
            rec["head"] = evaluate(student, teacher, hf, lambda fb, i: hard_mask(student.head(fb)[0]), total)
        if args.masks == "package":
            for off in (float(v) for v in args.eval_offsets.split(",")):
                rec[f"head {off:+}"] = evaluate(student, teacher, hf,
                                                lambda fb, i, off=off: hard_mask(student.head(fb, off)[0]), total)
        log(rec)

    if start == 0:
        run_eval(0)
    student.net.eval()  # BatchNorm keeps its statistics: it folds into the convs at export
    t0 = time.time()
    for step in range(start, args.steps):
        x = views.batch(args.batch)
        with torch.no_grad():
            f = teacher.features[:CUT](x)
        t_maps = {} if args.feat > 0 else None
        t_logits, t_pooled = teacher_outputs(teacher, f, t_maps)
        if args.masks == "random":
            keep = random.uniform(lo, hi)
            m = coherent_masks(len(f), keep, seed=random.randrange(1 << 30))
            reg = torch.zeros(())
        elif args.masks == "package":
            slo, shi = ((float(v) for v in args.shift_range.split(":")) if args.shift_range
                        else (-args.shift, args.shift))
            with torch.no_grad():
                shift = torch.rand(len(f), 1, 1, 1) * (shi - slo) + slo
                m = hard_mask(student.head(f, shift)[0])
                m[torch.rand(len(f)) < args.full] = 1.0
            reg = torch.zeros(())
        else:
            e, _ = student.head(f)
            tau = 2.0 * (0.25 ** (step / max(1, args.steps)))  # annealed 2 → 0.5
            soft = torch.sigmoid(-e / tau)
            # The head learns which tokens matter to the teacher (importance
            # targets, stable), the keep regulariser, and a straight-through
            # share of the distillation loss. The suffix sees the head's masks
            # shifted by a random per-image offset, so that it works across the
            # operating points the offset sweep of the report explores.
            target = importance_targets(teacher, f, args.ratio)
            reg = args.beta * soft.mean() + F.binary_cross_entropy_with_logits(-e / TAU, target)
            with torch.no_grad():
                shift = (torch.rand(len(f), 1, 1, 1) * 2 - 1) * args.shift
                hard = hard_mask(student.head(f, shift)[0])
                full = torch.rand(len(f)) < args.full
                hard[full] = 1.0
            m = hard + args.st * (soft - soft.detach())
            if step < args.head_steps:
                opt.zero_grad()
                reg.backward()
                opt.step()
                if step % 10 == 0:
                    log({"step": step, "head_only": True, "keep": hard.flatten(1).mean().item(),
                         "s_per_step": (time.time() - t0) / (step - start + 1)})
                continue
        s_maps = {} if args.feat > 0 else None
        s_logits, s_pooled, _ = student(f, m, s_maps)
        kl = F.kl_div(F.log_softmax(s_logits, 1), F.log_softmax(t_logits, 1), log_target=True,
                      reduction="batchmean")
        mse = F.mse_loss(s_pooled, t_pooled) / t_pooled.var().clamp_min(1e-6)
        feat = feature_mse(s_maps, t_maps) if args.feat > 0 else torch.zeros(())
        pull = sum(((p - teacher_params[n]) ** 2).sum() for n, p in student.net.named_parameters())
        loss = kl + args.mse * mse + args.feat * feat + args.pull * pull + reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0:
            log({"step": step, "kl": kl.item(), "mse": mse.item(), "feat": feat.item(), "pull": pull.item(),
                 "keep": m.detach().flatten(1).mean().item(), "s_per_step": (time.time() - t0) / (step - start + 1)})
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            torch.save({"student": student.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step + 1, "py_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
                        "args": vars(args)}, args.ckpt + ".tmp")
            os.replace(args.ckpt + ".tmp", args.ckpt)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            run_eval(step + 1)
            student.net.eval()


if __name__ == "__main__":
    main()
