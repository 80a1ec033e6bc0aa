//! The stride-2 3×3 depthwise convolution of tract's nets as ersm's own op:
//! the graph rewrite (at load) and the kernel (per frame).
//!
//! tract 0.23's depthwise kernels vectorise only a contiguous input walk: a
//! 3×3 tap set at stride 2 runs its scalar loop on x86 and on aarch64 alike.
//! In CenterFace's prefix at 640×480 the two stride-2 depthwise convs took
//! 14.4 ms of 49 (96×240×320 → 120×160 alone 10.5 ms, 1.6 G multiply-adds a
//! second), where tract's stride-1 ones run at about 20 G/s. Here each input
//! row is split once into its even and odd columns, after which every tap is
//! a contiguous multiply-add over an output row that the compiler vectorises.
//! Each output sums the bias and then the nine products in tract's order
//! (row by row, left to right), with no fused multiply-add, so the result is
//! bit for bit tract's: a tap in the padding adds a product with zero where
//! tract skips it, which leaves every sum as it was.

use crate::depthwise_row::{depthwise_row, TapRow};
use anyhow::{Context, Result};
use tract_core::internal::*;
use tract_core::ops::cnn::{Conv, KernelFormat};
use tract_core::ops::nn::DataFormat;

/// Replaces every f32 3×3 stride-2 depthwise conv of `model` (channels first,
/// no dilation, fixed shapes) by [`StridedDepthwise`];
/// returns how many. The kernel and bias stay the node's inputs.
pub fn rewrite(model: &mut TypedModel) -> Result<usize> {
    let mut count = 0;
    for id in 0..model.nodes.len() {
        let Some(op) = replacement(model, id)? else {
            continue;
        };
        model.nodes[id].op = Box::new(op);
        count += 1;
    }
    Ok(count)
}

/// The op for node `id` when it is a conv this module runs.
fn replacement(model: &TypedModel, id: usize) -> Result<Option<StridedDepthwise>> {
    Ok(depthwise_3x3(model, id)?
        .filter(|d| d.stride == 2)
        .map(|d| StridedDepthwise {
            channels: d.channels,
            input: d.input,
            output: d.output,
            pad: d.pad,
        }))
}

/// A 3×3 depthwise conv node as ersm's ops run it ([`depthwise_3x3`]).
pub(crate) struct Depthwise3x3 {
    pub(crate) channels: usize,
    /// Both axes' stride, 1 or 2.
    pub(crate) stride: usize,
    /// The input's batch size.
    pub(crate) batch: usize,
    pub(crate) input: [usize; 2],
    pub(crate) output: [usize; 2],
    /// Top and left padding.
    pub(crate) pad: [usize; 2],
}

/// Node `id` when it is an f32 3×3 depthwise conv at stride 1 or 2 on both
/// axes, channels first, no dilation, fixed shapes, with its OIHW kernel
/// `[c, 1, 3, 3]` and bias `[c]` as inputs 1 and 2.
pub(crate) fn depthwise_3x3(model: &TypedModel, id: usize) -> Result<Option<Depthwise3x3>> {
    let node = &model.nodes[id];
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
    let spec = &conv.pool_spec;
    let c = spec.input_channels;
    let strides = spec.strides();
    if conv.q_params.is_some()
        || spec.data_format != DataFormat::NCHW
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.kernel_shape.as_slice() != [3, 3]
        || !(*strides == [2, 2][..] || *strides == [1, 1][..])
        || *spec.dilations() != [1, 1][..]
        || conv.group != c
        || spec.output_channels != c
        || node.inputs.len() != 3
    {
        return Ok(None);
    }
    let facts = model.node_input_facts(id)?;
    // The kernel and bias are read per frame, so they need not be constants
    // yet (before decluttering, an ONNX bias is not).
    let kernel_ok = facts[1].shape.as_concrete() == Some(&[c, 1, 3, 3]);
    let bias_ok = facts[2].shape.volume() == c.to_dim();
    let Some(input) = facts[0].shape.as_concrete() else {
        return Ok(None);
    };
    let f32s = facts.iter().all(|f| f.datum_type == f32::datum_type());
    if !f32s || !kernel_ok || !bias_ok || input.len() != 4 {
        return Ok(None);
    }
    let (h, w) = (input[2], input[3]);
    let padding = spec.computed_padding(&[h, w]);
    let (pt, pl) = (padding[0].pad_before, padding[1].pad_before);
    let (oh, ow) = (padding[0].convoluted, padding[1].convoluted);
    if oh == 0 || ow == 0 {
        return Ok(None);
    }
    let output = node.outputs[0].fact.shape.as_concrete().with_context(|| {
        format!(
            "{}: output shape of a fixed-shape depthwise conv",
            node.name
        )
    })?;
    if output != [input[0], c, oh, ow] {
        return Ok(None);
    }
    Ok(Some(Depthwise3x3 {
        channels: c,
        stride: strides[0],
        batch: input[0],
        input: [h, w],
        output: [oh, ow],
        pad: [pt, pl],
    }))
}

/// A 3×3 stride-2 depthwise conv on `[n, c, h, w]` f32, inputs (image, OIHW
/// kernel `[c, 1, 3, 3]`, bias `[c]`).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct StridedDepthwise {
    channels: usize,
    input: [usize; 2],
    output: [usize; 2],
    /// Top and left padding.
    pad: [usize; 2],
}

impl Op for StridedDepthwise {
    fn name(&self) -> StaticName {
        "ErsmDepthwiseS2".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?} pad {:?}", self.input, self.pad)])
    }

    op_as_typed_op!();
}

impl EvalOp for StridedDepthwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (image, kernel, bias) = args_3!(inputs);
        let shape = image.shape();
        let [h, w] = self.input;
        let [oh, ow] = self.output;
        anyhow::ensure!(
            shape.len() == 4 && shape[1] == self.channels && shape[2] == h && shape[3] == w,
            "ErsmDepthwiseS2: input {shape:?}, built for [n, {}, {h}, {w}]",
            self.channels
        );
        // SAFETY: f32 has no invalid bit patterns, and every plane of the
        // output is written below (each row filled with its bias first)
        // before anything reads it.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&[shape[0], self.channels, oh, ow])? };
        let (image, kernel, bias) = (
            image.try_as_plain_ram()?,
            kernel.try_as_plain_ram()?,
            bias.try_as_plain_ram()?,
        );
        let x = image.as_slice::<f32>()?;
        let k = kernel.as_slice::<f32>()?;
        let b = bias.as_slice::<f32>()?;
        let total = x.len() + out.len();
        let c = self.channels;
        tract_linalg::multithread::par_chunks_mut(
            out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
            oh * ow,
            total,
            |first, planes| {
                let mut split = Split::new(self.input, self.output, self.pad);
                for (i, plane) in planes.chunks_exact_mut(oh * ow).enumerate() {
                    let p = first + i;
                    let ch = p % c;
                    let taps: &[f32; 9] = k[ch * 9..ch * 9 + 9].try_into().expect("nine taps");
                    split.plane(&x[p * h * w..(p + 1) * h * w]);
                    split.convolve(taps, b[ch], plane);
                }
                Ok(())
            },
        )?;
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for StridedDepthwise {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.to_tvec();
        anyhow::ensure!(shape.len() == 4, "ErsmDepthwiseS2 reads a rank-4 input");
        shape[2] = self.output[0].to_dim();
        shape[3] = self.output[1].to_dim();
        Ok(tvec!(f32::fact(shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let n = inputs[0].shape[0].clone();
        let points = self.channels * self.output[0] * self.output[1] * 9;
        Ok(tvec!((Cost::FMA(f32::datum_type()), n * points)))
    }

    as_op!();
}

/// One input plane split by column parity, with the padding as zeros:
/// `a[y][j]` is input column `2j - pad_left` (tap columns 0 and 2) and
/// `b[y][j]` column `2j - pad_left + 1` (tap column 1).
struct Split {
    input: [usize; 2],
    output: [usize; 2],
    pad: [usize; 2],
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Split {
    fn new(input: [usize; 2], output: [usize; 2], pad: [usize; 2]) -> Split {
        let ow = output[1];
        Split {
            input,
            output,
            pad,
            a: vec![0.0; input[0] * (ow + 1)],
            b: vec![0.0; input[0] * ow],
        }
    }

    fn plane(&mut self, x: &[f32]) {
        let [h, w] = self.input;
        let ow = self.output[1];
        for y in 0..h {
            let a = &mut self.a[y * (ow + 1)..(y + 1) * (ow + 1)];
            let b = &mut self.b[y * ow..(y + 1) * ow];
            split_row(&x[y * w..(y + 1) * w], self.pad[1], a, b);
        }
    }

    fn convolve(&self, taps: &[f32; 9], bias: f32, out: &mut [f32]) {
        let [h, _] = self.input;
        let [_, ow] = self.output;
        let pt = self.pad[0];
        let k = [
            [taps[0], taps[1], taps[2]],
            [taps[3], taps[4], taps[5]],
            [taps[6], taps[7], taps[8]],
        ];
        for (oy, row) in out.chunks_exact_mut(ow).enumerate() {
            let mut rows: [TapRow<'_>; 3] = [[&[]; 3]; 3];
            let mut ks = [[0.0; 3]; 3];
            let mut m = 0;
            for (ky, &kr) in k.iter().enumerate() {
                // The input row of tap row ky; outside it the taps add zeros.
                let Some(y) = (2 * oy + ky).checked_sub(pt).filter(|&y| y < h) else {
                    continue;
                };
                let a = &self.a[y * (ow + 1)..(y + 1) * (ow + 1)];
                let b = &self.b[y * ow..(y + 1) * ow];
                rows[m] = [a, b, &a[1..]];
                ks[m] = kr;
                m += 1;
            }
            depthwise_row::<false>(row, &rows[..m], &ks[..m], bias, 0.0);
        }
    }
}

/// Splits one input row by column parity for a stride-2 3×3 tap row:
/// `a[j]` is column `2j - pad_left`, `b[j]` column `2j - pad_left + 1`, zero
/// in the padding; `a` is one longer than `b`.
pub(crate) fn split_row(row: &[f32], pad_left: usize, a: &mut [f32], b: &mut [f32]) {
    let ow = b.len();
    assert_eq!(a.len(), ow + 1, "the even half is one longer than the odd");
    let at = |c: usize| match c.checked_sub(pad_left) {
        Some(i) if i < row.len() => row[i],
        _ => 0.0,
    };
    // The first pair (in the padding) and the row's end go one at a time;
    // the pairs between, sixteen columns at a time, eight to each half.
    let mut j = 0;
    while j < ow && 2 * j < pad_left {
        (a[j], b[j]) = (at(2 * j), at(2 * j + 1));
        j += 1;
    }
    let chunks = if 2 * j >= pad_left {
        ((row.len() + pad_left).saturating_sub(2 * j) / 16).min((ow - j) / 8)
    } else {
        0
    };
    let end = j + 8 * chunks;
    if chunks > 0 {
        split_pairs(&row[2 * j - pad_left..], &mut a[j..end], &mut b[j..end]);
    }
    for j in end..ow {
        (a[j], b[j]) = (at(2 * j), at(2 * j + 1));
    }
    a[ow] = at(2 * ow);
}

/// `a[i] = src[2i]`, `b[i] = src[2i + 1]` for `i < a.len()`, eight pairs at
/// a time (`a.len()` a multiple of 8, `src` at least twice as long).
fn split_pairs(src: &[f32], a: &mut [f32], b: &mut [f32]) {
    assert!(a.len().is_multiple_of(8) && b.len() == a.len() && src.len() >= 2 * a.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 detected; the assert bounds every load and store.
        return unsafe { split_pairs_avx2(src, a, b) };
    }
    for ((pair, a), b) in src.chunks_exact(2).zip(a.iter_mut()).zip(b.iter_mut()) {
        (*a, *b) = (pair[0], pair[1]);
    }
}

/// [`split_pairs`] with two loads, two shuffles and two lane permutes per
/// sixteen values (the compiler's own vectors of the plain loop were 4 wide
/// with scalar shuffles: a tenth of CenterFace's prefix).
///
/// # Safety
/// AVX2; the lengths as [`split_pairs`] asserts them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn split_pairs_avx2(src: &[f32], a: &mut [f32], b: &mut [f32]) {
    use std::arch::x86_64::*;
    for i in (0..a.len()).step_by(8) {
        // SAFETY: src holds 2·a.len() values, a and b a.len().
        unsafe {
            let lo = _mm256_loadu_ps(src.as_ptr().add(2 * i));
            let hi = _mm256_loadu_ps(src.as_ptr().add(2 * i + 8));
            // Per 128-bit lane: [lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6], then the
            // middle 64-bit pairs swapped into order.
            let even = _mm256_shuffle_ps::<0b10_00_10_00>(lo, hi);
            let odd = _mm256_shuffle_ps::<0b11_01_11_01>(lo, hi);
            let order = |v: __m256| {
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
            };
            _mm256_storeu_ps(a.as_mut_ptr().add(i), order(even));
            _mm256_storeu_ps(b.as_mut_ptr().add(i), order(odd));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tract_nets::{run, wire_conv, Rng};

    /// A one-conv ONNX-free net: tract's own conv on `[1, c, h, w]`.
    fn conv_net(nc: [usize; 2], hw: [usize; 2], pads: [usize; 4], stride: usize) -> TypedModel {
        let ([n, c], [h, w]) = (nc, hw);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([n, c, h, w])).unwrap();
        let mut rng = Rng((c * h * w) as u64);
        let kernel = rng.values(c * 9, 1.0).into_shape(&[c, 1, 3, 3]).unwrap();
        let bias = rng.values(c, 1.0);
        let y = wire_conv(&mut model, x, kernel, bias, [stride, c], pads);
        model.select_output_outlets(&[y]).unwrap();
        model
    }

    fn image(c: usize, h: usize, w: usize) -> Tensor {
        let v: Vec<f32> = (0..c * h * w)
            .map(|i| ((i * 7919) % 1013) as f32 / 507.0 - 1.0)
            .collect();
        tensor1(&v).into_shape(&[1, c, h, w]).unwrap()
    }

    #[test]
    fn equals_tract_bit_for_bit() {
        // Even and odd sizes, each padding tract computes for these convs,
        // and sizes below one vector.
        for (c, h, w, pads) in [
            (3, 8, 10, [1, 1, 1, 1]),
            (5, 9, 11, [1, 1, 1, 1]),
            (4, 7, 6, [0, 0, 1, 1]),
            (2, 6, 9, [1, 0, 0, 1]),
            (3, 3, 3, [0, 0, 0, 0]),
            (16, 40, 33, [1, 1, 0, 0]),
            (2, 10, 12, [2, 2, 2, 2]),
            (3, 5, 70, [1, 1, 1, 1]),
            (2, 4, 67, [0, 0, 1, 1]),
        ] {
            let reference = conv_net([1, c], [h, w], pads, 2);
            let mut ours = reference.clone();
            assert_eq!(rewrite(&mut ours).unwrap(), 1, "{c}x{h}x{w} {pads:?}");
            let x = image(c, h, w);
            let (a, b) = (run(reference, &x), run(ours, &x));
            assert_eq!(a.len(), b.len());
            // On aarch64 tract sums some padded zones in another order (one
            // ulp apart under qemu's Cortex-A76 for padding 2): close there,
            // the same bits on x86.
            let ulps = if cfg!(target_arch = "x86_64") { 0 } else { 2 };
            let same = a
                .iter()
                .zip(&b)
                .all(|(p, q)| p == q || (p.to_bits() as i64 - q.to_bits() as i64).abs() <= ulps);
            assert!(same, "{c}x{h}x{w} {pads:?}: {a:?} vs {b:?}");
        }
    }

    #[test]
    fn split_row_matches_its_definition() {
        for w in 1usize..70 {
            let row: Vec<f32> = (0..w).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
            for pad in 0..3 {
                let ow = (w + pad).div_ceil(2);
                let col = |c: usize| match c.checked_sub(pad) {
                    Some(i) if i < w => row[i],
                    _ => 0.0,
                };
                let (mut a, mut b) = (vec![9.0; ow + 1], vec![9.0; ow]);
                split_row(&row, pad, &mut a, &mut b);
                for j in 0..ow {
                    assert_eq!(a[j], col(2 * j), "w {w} pad {pad} a[{j}]");
                    assert_eq!(b[j], col(2 * j + 1), "w {w} pad {pad} b[{j}]");
                }
                assert_eq!(a[ow], col(2 * ow), "w {w} pad {pad} a[{ow}]");
            }
        }
    }

    #[test]
    fn equals_tract_on_threads_and_batches() {
        // Planes split across threads: each finds its channel from its index.
        let (c, h, w) = (24, 64, 80);
        let reference = conv_net([2, c], [h, w], [1, 1, 1, 1], 2);
        let mut ours = reference.clone();
        assert_eq!(rewrite(&mut ours).unwrap(), 1);
        let x = image(2 * c, h, w).into_shape(&[2, c, h, w]).unwrap();
        let pool = tract_linalg::multithread::Executor::multithread(3);
        let (a, b) = tract_linalg::multithread::multithread_tract_scope(pool, || {
            (run(reference, &x), run(ours, &x))
        });
        assert_eq!(a, b);
    }

    #[test]
    fn leaves_other_convs_to_tract() {
        let mut model = conv_net([1, 4], [8, 8], [1, 1, 1, 1], 1);
        assert_eq!(rewrite(&mut model).unwrap(), 0, "stride 1");
    }
}
