//! Small tract graphs for the unit tests of ersm's ops in tract's plan
//! (`strided_depthwise`, `inverted_residual`): random weights, a conv
//! wired as tract's own, and a run.

use tract_core::internal::*;
use tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
use tract_core::ops::nn::DataFormat;

/// A seeded linear congruential generator of values in (−scale, scale).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    /// `n` values as a 1-D tensor.
    pub(crate) fn values(&mut self, n: usize, scale: f32) -> Tensor {
        let v: Vec<f32> = (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((self.0 >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0) * scale
            })
            .collect();
        tensor1(&v)
    }
}

/// Wires tract's own conv on `x` (NCHW): `kernel` OIHW, `bias` one value
/// per output channel, `pads` [top, left, bottom, right].
pub(crate) fn wire_conv(
    model: &mut TypedModel,
    x: OutletId,
    kernel: Tensor,
    bias: Tensor,
    [stride, group]: [usize; 2],
    pads: [usize; 4],
) -> OutletId {
    let n = model.nodes.len();
    let (cout, cin, k) = (
        kernel.shape()[0],
        kernel.shape()[1] * group,
        kernel.shape()[2],
    );
    let kernel = model.add_const(format!("k{n}"), kernel).unwrap();
    let bias = model.add_const(format!("b{n}"), bias).unwrap();
    let op = Conv {
        pool_spec: PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec!(k, k),
            padding: PaddingSpec::Explicit(tvec!(pads[0], pads[1]), tvec!(pads[2], pads[3])),
            dilations: None,
            strides: Some(tvec!(stride, stride)),
            input_channels: cin,
            output_channels: cout,
        },
        kernel_fmt: KernelFormat::OIHW,
        group,
        q_params: None,
    };
    model
        .wire_node(format!("conv{n}"), op, &[x, kernel, bias])
        .unwrap()[0]
}

/// Runs `model`, optimised, on one input; its first output's values.
pub(crate) fn run(model: TypedModel, x: &Tensor) -> Vec<f32> {
    let plan = model.into_optimized().unwrap().into_runnable().unwrap();
    let out = plan.run(tvec!(x.clone().into_tvalue())).unwrap();
    let view = out[0].try_as_plain_ram().unwrap();
    view.as_slice::<f32>().unwrap().to_vec()
}
