"""What a dropped token holds in the suffix: the candidate sparse semantics of
MobileNetV2's layers after the cut, as dense-masked torch (the reference the
runtime must match), with the multiply-accumulates each one costs.

Every tensor after the cut has an active set (computed positions) and a
background (what inactive positions hold):
- `zero`: zero (ersm's first rule, submanifold);
- `mean`: a per-tensor constant, the tensor's mean over calibration data;
- `keep`: the real values, where they are known for free: the prefix's output
  at the cut, and a residual block's input (DynConv's residual identity).

A residual block either writes its background over inactive positions (`sub`)
or passes its input through there (`identity`). A non-residual block (stride 2
or a channel change) and the final 1×1 conv are either computed at active
positions only (`masked`) or everywhere (`dense`), or at inactive positions through a cheap linear
map of the (average-pooled) block input (`fast`, the fast path of Rao et al.,
least-squares fitted on calibration data, then trained). A stride-2 layer's active
set is the 2×2 max-pool of its input's (`any`), its centre tap (`centre`) or
the majority (`majority`). Global pooling averages active tokens (`active`)
or every position with the background included (`all`).
"""

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .train import CUT


@dataclass(frozen=True)
class Semantics:
    cut: str = "zero"  # zero | mean | keep
    bg: str = "zero"  # background of computed tensors: zero | mean
    # a block's inner tensors: bg (as above) | exact (expand at the dilated set) |
    # inpaint (dropped positions hold the mean of the kept ones in their 3x3
    # window, the background where none is kept) | inpaint-half (halfway
    # between the background and that mean)
    inner: str = "bg"
    res: str = "sub"  # sub | identity
    nonres: str = "masked"  # masked | dense | fast
    down: str = "any"  # any | centre | majority
    pool: str = "active"  # active | all

    def name(self):
        d = Semantics()
        parts = [f"{k}={v}" for k, v in self.__dict__.items() if getattr(d, k) != v]
        return ", ".join(parts) or "zero (submanifold)"


ZERO = Semantics()


def describe(name):
    """A package's semantics as `Semantics.name` gives it (fallback.json), in words."""
    rule = "centre" if "down=centre" in name else "any"
    if "bg=mean" in name:
        pool = "every position" if "pool=all" in name else "active tokens"
        return f"the package's learned fill vectors at dropped positions, pooling over {pool}, `{rule}` rule"
    return f"zero at dropped positions, pooling over active tokens, `{rule}` rule"


def semantic_keys(means):
    """Fill vectors keyed as `Suffix` reads them ("cut", or (block, tensor))
    from their parameter names ("cut", "7_expand", ...)."""
    out = {}
    for k, v in means.items():
        if k == "cut":
            out["cut"] = v
        else:
            i, kind = k.split("_")
            out[(int(i), kind)] = v
    return out


def downsample(m, rule):
    if rule == "any":
        return F.max_pool2d(m, 2, 2, ceil_mode=True)
    if rule == "centre":
        # As ersm: when no centre tap is active, the output over the first
        # active input (raster order) is, so a level is never empty.
        out = m[:, :, ::2, ::2].clone()
        empty = out.flatten(1).sum(1) == 0
        if empty.any():
            first = m.flatten(1).argmax(1)
            w = m.shape[-1]
            for b in empty.nonzero().flatten().tolist():
                if m[b].sum() > 0:
                    i = first[b].item()
                    out[b, 0, (i // w) // 2, (i % w) // 2] = 1.0
        return out
    if rule == "majority":
        return (F.avg_pool2d(m, 2, 2, ceil_mode=True) >= 0.5).float()
    if rule == "mean":
        # Attribution only: on a uniform soft mask it equals `any` and
        # `centre`, and its gradient reaches the four inputs alike (max-pool's
        # goes to the first of tied inputs, which would favour even positions).
        return F.avg_pool2d(m, 2, 2, ceil_mode=True)
    raise ValueError(rule)


def dilate(m):
    return F.max_pool2d(m, 3, 1, 1)


def macs_of(mod, n):
    """Multiply-accumulates of a conv layer (with its BatchNorm folded) at n positions."""
    conv = mod if isinstance(mod, nn.Conv2d) else mod[0]
    return conv.weight.numel() * n


class Suffix:
    """MobileNetV2's layers after the cut, run under one semantics."""

    def __init__(self, model, means=None, fast=None):
        self.model = model
        self.means = means or {}
        self.fast = fast or {}

    def _bg(self, key, like, sem, kind):
        """The background of tensor `key`: zero or its calibration mean."""
        rule = sem.bg if kind == "out" or sem.inner != "exact" else "zero"
        if rule == "mean":
            return self.means[key].view(1, -1, 1, 1)
        return torch.zeros_like(like[:, :, :1, :1])

    def run(self, f, m, sem, collect=None):
        """Logits and suffix MACs (per image) for prefix features f and 28×28 mask m."""
        model = self.model
        macs = torch.zeros(f.shape[0])
        if sem.cut == "keep":
            x, x_bg = f, None
        else:
            bgc = torch.zeros(1, f.shape[1], 1, 1) if sem.cut == "zero" else self.means["cut"].view(1, -1, 1, 1)
            x, x_bg = m * f + (1 - m) * bgc, bgc
        for i in range(CUT, 18):
            blk = model.features[i]
            x, m, x_bg, c = self._block(i, blk, x, m, x_bg, sem, collect)
            macs += c
        head = model.features[18]
        if sem.nonres == "dense":
            y = head(x)
            macs += macs_of(head, y.shape[2] * y.shape[3])
            y_bg = None
        elif sem.nonres == "fast":
            # Inactive tokens are averaged first and go through the head once:
            # their real (fast-path) features count, at the cost of one token.
            y = head(x) * m
            if collect is not None:
                # Its kept positions only: the dropped ones enter the pool as one mean.
                collect[(18, "out")] = y
                collect[(18, "mask")] = m
            inact = 1 - m
            n_in = inact.sum((2, 3))
            xm = (x * inact).sum((2, 3)) / n_in.clamp_min(1.0)
            yb = head(xm[:, :, None, None])[:, :, 0, 0]
            pooled = (y.sum((2, 3)) + n_in * yb) / (m.shape[2] * m.shape[3])
            macs += macs_of(head, 1) * (m.flatten(1).sum(1) + 1)
            self.pooled = pooled
            logits = model.classifier(pooled)
            macs += model.classifier[1].weight.numel()
            return logits, macs
        else:
            y = head(x)
            y_bg = self._bg((18, "out"), y, sem, "out")
            y = m * y + (1 - m) * y_bg
            macs += macs_of(head, 1) * m.flatten(1).sum(1)
        if collect is not None:
            collect[(18, "out")] = y
            collect[(18, "mask")] = m
        if sem.pool == "active":
            pooled = (y * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1.0)
        else:
            pooled = y.mean((2, 3))
        self.pooled = pooled
        logits = model.classifier(pooled)
        macs += model.classifier[1].weight.numel()
        return logits, macs

    def _block(self, i, blk, x, m, x_bg, sem, collect):
        layers = list(blk.conv)
        expand = layers[0] if len(layers) == 4 else None
        dw = layers[-3]
        proj = nn.Sequential(layers[-2], layers[-1])
        stride = dw[0].stride[0]
        res = blk.use_res_connect
        n = lambda mm: mm.flatten(1).sum(1)
        if not res and sem.nonres == "dense":
            # Computed everywhere: real values at every position, the mask moves on.
            h = expand(x) if expand is not None else x
            d = dw(h)
            y = proj(d)
            hw_in, hw_out = x.shape[2] * x.shape[3], y.shape[2] * y.shape[3]
            c = (macs_of(expand, hw_in) if expand is not None else 0) + macs_of(dw, hw_out) + macs_of(proj[0], hw_out)
            m_out = downsample(m, sem.down) if stride == 2 else m
            if collect is not None:
                collect[(i, "out")] = y
            return y, m_out, None, torch.full((x.shape[0],), float(c))
        m_out = downsample(m, sem.down) if stride == 2 else m
        c = torch.zeros(x.shape[0])
        h = x
        if expand is not None:
            h = expand(x)
            if sem.inner == "exact":
                # DynConv: the expansion is computed wherever an active output's
                # 3×3 window reads, so the depthwise conv sees true values.
                reach = dilate(F.interpolate(m_out, scale_factor=stride, mode="nearest")[:, :, :x.shape[2], :x.shape[3]]
                               if stride == 2 else m_out)
                reach = torch.maximum(reach, m)
                h = reach * h
                c += macs_of(expand, 1) * n(reach)
            else:
                h_bg = self._bg((i, "expand"), h, sem, "inner")
                if sem.inner.startswith("inpaint"):
                    # What the depthwise conv reads at a dropped tap: the kept
                    # neighbours' mean (a normalised 3x3 average), no new MACs
                    # beyond the additions.
                    den = F.avg_pool2d(m, 3, 1, 1)
                    mean = F.avg_pool2d(h * m, 3, 1, 1) / den.clamp_min(1e-6)
                    a = 1.0 if sem.inner == "inpaint" else 0.5
                    h_bg = torch.where(den > 0, h_bg + a * (mean - h_bg), h_bg)
                h = m * h + (1 - m) * h_bg
                c += macs_of(expand, 1) * n(m)
        if collect is not None:
            collect[(i, "expand")] = h
        d = dw(h)
        d_bg = self._bg((i, "dw"), d, sem, "inner")
        d = m_out * d + (1 - m_out) * d_bg
        c += macs_of(dw, 1) * n(m_out)
        if collect is not None:
            collect[(i, "dw")] = d
        y = proj(d)
        c += macs_of(proj[0], 1) * n(m_out)
        if res and sem.res == "identity":
            out = x + m_out * y
            out_bg = x_bg
        elif not res and sem.nonres == "fast":
            w, b = self.fast[i]
            xp = F.avg_pool2d(x, stride, stride, ceil_mode=True) if stride == 2 else x
            fp = F.conv2d(xp, w[:, :, None, None], b)
            out = m_out * y + (1 - m_out) * fp
            out_bg = None
            c += w.numel() * n(1 - m_out)
        else:
            if res:
                y = x + y
            out_bg = self._bg((i, "out"), y, sem, "out")
            out = m_out * y + (1 - m_out) * out_bg
        if collect is not None:
            collect[(i, "out")] = out
            collect[(i, "mask")] = m_out
        return out, m_out, out_bg, c


def calibration_means(model, feats):
    """Per-tensor channel means of the dense network over calibration features."""
    s = Suffix(model)
    col = {}
    full = torch.ones(feats.shape[0], 1, feats.shape[2], feats.shape[3])
    with torch.no_grad():
        s.run(feats, full, replace(ZERO, cut="keep"), collect=col)
    means = {k: v.mean((0, 2, 3)) for k, v in col.items()}
    means["cut"] = feats.mean((0, 2, 3))
    return means


def fit_fast_paths(model, feats, ridge=1e-3):
    """Least-squares linear maps from each non-residual block's (pooled) input to its output."""
    s = Suffix(model)
    col = {}
    full = torch.ones(feats.shape[0], 1, feats.shape[2], feats.shape[3])
    with torch.no_grad():
        s.run(feats, full, replace(ZERO, cut="keep"), collect=col)
    fast = {}
    for i in range(CUT, 18):
        blk = model.features[i]
        if blk.use_res_connect:
            continue
        x = feats if i == CUT else col[(i - 1, "out")]
        y = col[(i, "out")]
        if x.shape[-1] != y.shape[-1]:
            x = F.avg_pool2d(x, 2, 2, ceil_mode=True)
        X = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        Y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
        X1 = torch.cat([X, torch.ones(len(X), 1)], 1).double()
        A = torch.linalg.solve(X1.T @ X1 + ridge * len(X) * torch.eye(X1.shape[1], dtype=torch.float64), X1.T @ Y.double())
        fast[i] = (A[:-1].T.float().contiguous(), A[-1].float())
    return fast


def dense_macs(model, feats):
    full = torch.ones(1, 1, feats.shape[2], feats.shape[3])
    with torch.no_grad():
        _, macs = Suffix(model).run(feats[:1], full, ZERO)
    return macs.item()
