//! The prefix's first convolution as a 1×1 convolution over image patches:
//! the graph rewrite (at load) and the patch gather (per frame).
//!
//! A stem conv reads few channels (3 for RGB), so tract sends it down its
//! lazy-im2col path (its output channels fit one kernel panel, and tract's
//! single-panel rule picks the lazy path whatever the thresholds). For
//! MobileNetV2's 3→32 3×3 stride-2 stem that measured 2.0 ms, 18 % of the
//! prefix on one x86 core. The same products as a 1×1 conv over
//! `cin·kh·kw` patch channels at the output's size run as one packed
//! matrix product: 0.69 ms, plus about 0.1 ms to gather the patches here.
//! Each output still sums the same 27 products; only tract's kernel, not
//! the arithmetic, changes. Where the stem is an inverted-residual block's
//! expansion (MobileNetV2's first block, CenterFace's), that fused block
//! gathers each patch row as it expands it ([`Patches::gather_row`],
//! `inverted_residual::fuse_stem`) and the whole patch tensor is never
//! written.

use crate::onnx::{attr_i64, attr_ints, conv_pads};
use tract_onnx::pb::ModelProto;

/// Input channels up to which the first conv is rewritten: image planes.
const MAX_CHANNELS: usize = 4;

/// Where each patch value of a rewritten stem comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Patches {
    cin: usize,
    h: usize,
    w: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    /// Top and left padding (the bottom and right are implied by the output size).
    pad: [usize; 2],
    out: [usize; 2],
}

impl Patches {
    /// The rewritten net's input shape: `[1, cin·kh·kw, oh, ow]`.
    pub fn shape(&self) -> Vec<usize> {
        vec![
            1,
            self.cin * self.kernel[0] * self.kernel[1],
            self.out[0],
            self.out[1],
        ]
    }

    /// The image the patches are gathered from: `[1, cin, h, w]`.
    pub fn image_shape(&self) -> [usize; 4] {
        [1, self.cin, self.h, self.w]
    }

    /// Patch channels: `cin·kh·kw`.
    pub fn channels(&self) -> usize {
        self.cin * self.kernel[0] * self.kernel[1]
    }

    /// Gathers the patches of `image` (`[1, cin, h, w]`, row-major) into
    /// `out` (of [`Patches::shape`]'s length): channel `(ci·kh + ky)·kw + kx` holds
    /// every output position's tap `(ky, kx)` of input channel `ci`, zero
    /// where the tap falls in the padding. Every value of `out` is written.
    pub fn gather(&self, image: &[f32], out: &mut [f32]) {
        let [oh, ow] = self.out;
        // Planes in parallel (27 of 76 800 values at 640×480: 8 MB a frame,
        // 1.6 ms on one thread).
        crate::threads::par_rows(
            &mut out[..self.channels() * oh * ow],
            oh * ow,
            1,
            |first, planes| {
                for (i, dst) in planes.chunks_exact_mut(oh * ow).enumerate() {
                    for (oy, d) in dst.chunks_exact_mut(ow).enumerate() {
                        self.tap_row(image, first + i, oy, d);
                    }
                }
            },
        );
    }

    /// Output row `oy` of every patch channel of `image` into `out`
    /// (`channels() × ow` values, channel by channel): what a consumer that
    /// runs row by row reads, without the whole patch tensor in memory.
    pub fn gather_row(&self, image: &[f32], oy: usize, out: &mut [f32]) {
        let ow = self.out[1];
        for (p, d) in out[..self.channels() * ow].chunks_exact_mut(ow).enumerate() {
            self.tap_row(image, p, oy, d);
        }
    }

    /// Row `oy` of patch channel `p` into `d` (`ow` values): each tap's row
    /// of the image copied with the stride, zero in the padding.
    fn tap_row(&self, image: &[f32], p: usize, oy: usize, d: &mut [f32]) {
        let ([kh, kw], [sy, sx], [pt, pl]) = (self.kernel, self.stride, self.pad);
        let (h, w) = (self.h, self.w);
        let (ci, ky, kx) = (p / (kh * kw), p / kw % kh, p % kw);
        let Some(y) = (oy * sy + ky).checked_sub(pt).filter(|&y| y < h) else {
            d.fill(0.0);
            return;
        };
        // The output columns whose tap kx lands inside the row: ox in lo..hi.
        let lo = pl.saturating_sub(kx).div_ceil(sx);
        let hi = (w + pl)
            .saturating_sub(kx)
            .div_ceil(sx)
            .min(d.len())
            .max(lo);
        d[..lo].fill(0.0);
        d[hi..].fill(0.0);
        if hi > lo {
            let src = &image[(ci * h + y) * w + lo * sx + kx - pl..][..(hi - lo - 1) * sx + 1];
            strided_copy(&mut d[lo..hi], src, sx);
        }
    }
}

/// `d[i] = src[i · s]`. At stride 2 (every MobileNet stem) in blocks of
/// eight from sixteen, which the compiler turns into vector shuffles: the
/// element-by-element loop was 2.6 % of a CenterFace bench's samples.
fn strided_copy(d: &mut [f32], src: &[f32], s: usize) {
    let mut done = 0;
    if s == 2 {
        for (d8, s16) in d.chunks_exact_mut(8).zip(src.chunks_exact(16)) {
            for (i, v) in d8.iter_mut().enumerate() {
                *v = s16[2 * i];
            }
            done += 8;
        }
    }
    for (v, &x) in d[done..].iter_mut().zip(src[done * s..].iter().step_by(s)) {
        *v = x;
    }
}

/// Rewrites `proto`'s first conv as a 1×1 conv over patches when it reads
/// the graph input (of `input_shape`) alone: at most four channels, one
/// group, no dilation, explicit or VALID padding, weights in an initializer
/// no other node reads. Returns where the patches come from, or `None` (the graph
/// unchanged) when the stem is not such a conv.
pub fn rewrite(proto: &mut ModelProto, input_shape: &[usize]) -> Option<Patches> {
    let &[1, cin, h, w] = input_shape else {
        return None;
    };
    let graph = proto.graph.as_mut()?;
    let input = graph.input.first()?.name.clone();
    let readers: Vec<usize> = (0..graph.node.len())
        .filter(|&i| graph.node[i].input.contains(&input))
        .collect();
    let &[c] = readers.as_slice() else {
        return None;
    };
    let conv = &graph.node[c];
    if conv.op_type != "Conv" || conv.input.first() != Some(&input) || cin > MAX_CHANNELS {
        return None;
    }
    let weight = conv.input.get(1)?.clone();
    let ints = |name: &str, default: [i64; 2]| -> Option<[usize; 2]> {
        let v = attr_ints(conv, name).ok()?.unwrap_or(default.to_vec());
        match v.as_slice() {
            &[a, b] if a >= 0 && b >= 0 => Some([a as usize, b as usize]),
            _ => None,
        }
    };
    let pads = conv_pads(conv).ok()?;
    if attr_i64(conv, "group", Some(1)).ok()? != 1 {
        return None;
    }
    let stride = ints("strides", [1, 1])?;
    let init = graph.initializer.iter().position(|t| t.name == weight)?;
    let dims = &graph.initializer[init].dims;
    let &[cout, wcin, kh, kw] = dims.as_slice() else {
        return None;
    };
    let kernel = [kh as usize, kw as usize];
    if wcin as usize != cin
        || kernel[0] * kernel[1] < 2
        || stride.contains(&0)
        || ints("kernel_shape", [kh, kw]).is_none_or(|k| k != kernel)
        || graph
            .node
            .iter()
            .filter(|n| n.input.contains(&weight))
            .count()
            != 1
    {
        return None;
    }
    let size = |n: usize, p0: usize, p1: usize, k: usize, s: usize| {
        (n + p0 + p1).checked_sub(k).map(|v| v / s + 1)
    };
    let out = [
        size(h, pads[0], pads[2], kernel[0], stride[0])?,
        size(w, pads[1], pads[3], kernel[1], stride[1])?,
    ];
    let patches = Patches {
        cin,
        h,
        w,
        kernel,
        stride,
        pad: [pads[0], pads[1]],
        out,
    };
    // The weights' memory order, [cout][cin][kh][kw], is the 1×1 conv's
    // [cout][cin·kh·kw]: only the shape changes.
    graph.initializer[init].dims = vec![cout, wcin * kh * kw, 1, 1];
    let conv = &mut graph.node[c];
    conv.attribute.retain(|a| {
        !matches!(
            a.name.as_str(),
            "kernel_shape" | "strides" | "pads" | "dilations" | "auto_pad"
        )
    });
    graph.input[0] = crate::onnx::float_input(&input, &patches.shape());
    Some(patches)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct transcription: patch value of channel (ci, ky, kx) at (oy, ox).
    fn naive(p: &Patches, image: &[f32]) -> Vec<f32> {
        let [kh, kw] = p.kernel;
        let mut out = Vec::new();
        for ci in 0..p.cin {
            for ky in 0..kh {
                for kx in 0..kw {
                    for oy in 0..p.out[0] {
                        for ox in 0..p.out[1] {
                            let y = (oy * p.stride[0] + ky) as i64 - p.pad[0] as i64;
                            let x = (ox * p.stride[1] + kx) as i64 - p.pad[1] as i64;
                            let inside =
                                (0..p.h as i64).contains(&y) && (0..p.w as i64).contains(&x);
                            out.push(if inside {
                                image[ci * p.h * p.w + y as usize * p.w + x as usize]
                            } else {
                                0.0
                            });
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn gather_and_gather_row_match_the_definition_for_any_stride_and_padding() {
        for (h, w, k, s, pt, pl, pb, pr) in [
            (7, 9, [3, 3], [2, 2], 1, 1, 1, 1),
            (8, 8, [3, 3], [2, 2], 1, 1, 1, 1),
            (6, 5, [3, 1], [1, 2], 0, 2, 1, 0),
            (5, 5, [5, 5], [3, 1], 2, 0, 0, 3),
            (4, 10, [2, 4], [1, 3], 0, 0, 0, 0),
            // Stride 2 over rows long enough for the blocks of eight.
            (5, 45, [3, 3], [2, 2], 1, 1, 1, 1),
            (4, 38, [3, 3], [2, 2], 0, 2, 0, 1),
        ] {
            let cin = 3;
            let oh = (h + pt + pb - k[0]) / s[0] + 1;
            let ow = (w + pl + pr - k[1]) / s[1] + 1;
            let p = Patches {
                cin,
                h,
                w,
                kernel: k,
                stride: s,
                pad: [pt, pl],
                out: [oh, ow],
            };
            let image: Vec<f32> = (0..cin * h * w).map(|i| i as f32 + 1.0).collect();
            let mut out = vec![f32::NAN; p.shape().iter().product()];
            p.gather(&image, &mut out);
            assert_eq!(out, naive(&p, &image), "{p:?}");
            // Row by row, as the fused first block reads them.
            let mut row = vec![f32::NAN; p.channels() * ow];
            for oy in 0..oh {
                p.gather_row(&image, oy, &mut row);
                for (ch, r) in row.chunks_exact(ow).enumerate() {
                    assert_eq!(r, &out[(ch * oh + oy) * ow..][..ow], "{p:?} row {oy}");
                }
            }
        }
    }
}
