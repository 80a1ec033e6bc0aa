//! ersm's depthwise conv inside tract's prefix. tract 0.23.9 evaluates NCHW
//! depthwise convs with a scalar inner loop (`DepthWiseConv`; upstream
//! sonos/tract#2735), and in MobileNetV2's prefix those six convs take about a
//! quarter of the time. This op computes the same conv one output row at a
//! time with the row's width vectorised (AVX2/FMA where the CPU has them,
//! NEON on aarch64), channels split across the run's threads. tract still
//! plans and runs the prefix; only these nodes change op.

use crate::threads::par_rows;
use tract_core::internal::*;
use tract_core::ops::cnn::{Conv, KernelFormat};
use tract_core::ops::nn::DataFormat;

/// Planes one thread takes at least.
const MIN_PLANES: usize = 4;

/// A depthwise conv (one `kh×kw` filter per channel, dilation 1) on an NCHW
/// f32 tensor of fixed shape; inputs: data, kernel `[c, 1, kh, kw]`, bias.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DepthwiseRows {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad_top: usize,
    pad_left: usize,
    oh: usize,
    ow: usize,
}

impl DepthwiseRows {
    /// The op for `conv` on an input of shape `input`, if this op computes it:
    /// f32, NCHW, group = channels, equal strides, dilation 1.
    fn for_conv(conv: &Conv, input: &[usize], output: &[usize]) -> Option<DepthwiseRows> {
        let ps = &conv.pool_spec;
        let c = ps.input_channels;
        let plain = conv.q_params.is_none()
            && conv.kernel_fmt == KernelFormat::OIHW
            && ps.data_format == DataFormat::NCHW
            && conv.group == c
            && ps.output_channels == c
            && ps.kernel_shape.len() == 2
            && ps.dilations().iter().all(|&d| d == 1);
        let strides = ps.strides();
        if !plain || strides[0] != strides[1] || input.len() != 4 || input[1] != c {
            return None;
        }
        let pads = ps.computed_padding(&input[2..]);
        let op = DepthwiseRows {
            n: input[0],
            c,
            h: input[2],
            w: input[3],
            kh: ps.kernel_shape[0],
            kw: ps.kernel_shape[1],
            stride: strides[0],
            pad_top: pads[0].pad_before,
            pad_left: pads[1].pad_before,
            oh: pads[0].convoluted,
            ow: pads[1].convoluted,
        };
        (output == [op.n, c, op.oh, op.ow] && op.oh > 0 && op.ow > 0).then_some(op)
    }

    /// Width of one phase of a padded input row: output `x` at tap `dx` reads
    /// phase `dx % stride` at `x + dx / stride`.
    fn phase_width(&self) -> usize {
        self.ow + (self.kw - 1) / self.stride
    }

    /// One channel plane: `x` is `h×w`, `k` the `kh×kw` filter, `out` `oh×ow`.
    /// `phases` holds the padded input rows split by column phase.
    #[inline(always)]
    fn plane<const FMA: bool>(
        &self,
        x: &[f32],
        k: &[f32],
        bias: f32,
        out: &mut [f32],
        phases: &mut [f32],
    ) {
        let (s, pw) = (self.stride, self.phase_width());
        // Padded rows, split by phase once per plane: every input row is read
        // by up to kh output rows.
        for (iy, row) in x.chunks_exact(self.w).enumerate() {
            for p in 0..s {
                let dst = &mut phases[(iy * s + p) * pw..(iy * s + p + 1) * pw];
                for (j, d) in dst.iter_mut().enumerate() {
                    let col = (j * s + p).checked_sub(self.pad_left);
                    *d = col.and_then(|c| row.get(c)).copied().unwrap_or(0.0);
                }
            }
        }
        for (y, acc) in out.chunks_exact_mut(self.ow).enumerate() {
            acc.fill(bias);
            for dy in 0..self.kh {
                let Some(iy) = (y * s + dy).checked_sub(self.pad_top) else {
                    continue;
                };
                if iy >= self.h {
                    continue;
                }
                for dx in 0..self.kw {
                    let kv = k[dy * self.kw + dx];
                    let at = (iy * s + dx % s) * pw + dx / s;
                    let src = &phases[at..at + self.ow];
                    if FMA {
                        for (a, &v) in acc.iter_mut().zip(src) {
                            *a = v.mul_add(kv, *a);
                        }
                    } else {
                        for (a, &v) in acc.iter_mut().zip(src) {
                            *a += v * kv;
                        }
                    }
                }
            }
        }
    }

    /// Planes `first..` (over `n·c`) into `out`.
    #[inline(always)]
    fn planes<const FMA: bool>(
        &self,
        x: &[f32],
        kernel: &[f32],
        bias: &[f32],
        first: usize,
        out: &mut [f32],
    ) {
        let (hw, ohw, taps) = (self.h * self.w, self.oh * self.ow, self.kh * self.kw);
        let mut phases = vec![0.0; self.h * self.stride * self.phase_width()];
        for (i, o) in out.chunks_exact_mut(ohw).enumerate() {
            let plane = first + i;
            let ch = plane % self.c;
            let b = match bias.len() {
                0 => 0.0,
                1 => bias[0],
                _ => bias[ch],
            };
            self.plane::<FMA>(
                &x[plane * hw..(plane + 1) * hw],
                &kernel[ch * taps..(ch + 1) * taps],
                b,
                o,
                &mut phases,
            );
        }
    }

    /// [`Self::planes`] compiled for AVX2 and FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn planes_avx2(&self, x: &[f32], k: &[f32], b: &[f32], first: usize, out: &mut [f32]) {
        self.planes::<true>(x, k, b, first, out)
    }

    /// The best [`Self::planes`] this CPU runs.
    fn planes_dispatch(&self, x: &[f32], k: &[f32], b: &[f32], first: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: both features were just detected.
                return unsafe { self.planes_avx2(x, k, b, first, out) };
            }
            self.planes::<false>(x, k, b, first, out)
        }
        #[cfg(target_arch = "aarch64")]
        {
            // NEON and its fused multiply-add are part of every aarch64 CPU.
            self.planes::<true>(x, k, b, first, out)
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            self.planes::<false>(x, k, b, first, out)
        }
    }
}

impl Op for DepthwiseRows {
    fn name(&self) -> StaticName {
        "ersm.DepthwiseConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{}x{} stride {} on {}x{}x{}",
            self.kh, self.kw, self.stride, self.c, self.h, self.w
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for DepthwiseRows {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, kernel, bias) = args_3!(inputs);
        let x = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let kernel = kernel.try_as_plain_ram()?.as_slice::<f32>()?;
        let bias = bias.try_as_plain_ram()?.as_slice::<f32>()?;
        ensure!(x.len() == self.n * self.c * self.h * self.w);
        ensure!(kernel.len() == self.c * self.kh * self.kw);
        ensure!(bias.len() <= 1 || bias.len() == self.c);
        let mut out = Tensor::zero::<f32>(&[self.n, self.c, self.oh, self.ow])?;
        par_rows(
            out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
            self.oh * self.ow,
            MIN_PLANES,
            |first, o| self.planes_dispatch(x, kernel, bias, first, o),
        );
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for DepthwiseRows {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 3 && inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(f32::fact([self.n, self.c, self.oh, self.ow])))
    }

    as_op!();
}

/// Puts [`DepthwiseRows`] in place of every depthwise conv of `model` it
/// computes; returns how many it replaced.
pub fn use_in(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(conv) = node.op_as::<Conv>() else {
            continue;
        };
        if node.inputs.len() != 3 {
            continue;
        }
        let facts = [node.inputs[0], node.inputs[1], node.inputs[2]]
            .iter()
            .map(|o| model.outlet_fact(*o).cloned())
            .collect::<TractResult<Vec<_>>>()?;
        let output = model.outlet_fact(OutletId::new(id, 0))?;
        let (Some(input), Some(output)) =
            (facts[0].shape.as_concrete(), output.shape.as_concrete())
        else {
            continue;
        };
        if facts.iter().any(|f| f.datum_type != f32::datum_type()) {
            continue;
        }
        let Some(op) = DepthwiseRows::for_conv(conv, input, output) else {
            continue;
        };
        if facts[1].shape.as_concrete() != Some(&[op.c, 1, op.kh, op.kw][..]) {
            continue;
        }
        model.node_mut(id).op = Box::new(op);
        replaced += 1;
    }
    Ok(replaced)
}
