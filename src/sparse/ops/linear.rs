//! Fully connected layers on dense values: Gemm, MatMul, and 1×1 convs after
//! global pooling (squeeze-excite). On the GPU: `sfx_linear` of `linear.cu`.

use super::activation::GpuAct;
use super::conv::ConvNode;
use super::{ActivationKind, OnnxNode, Op, Tensor};
use crate::onnx::{attr_f32, attr_i64};
use crate::sparse::launch::{Family, Kernel, KernelArgs, StepIo};
use crate::sparse::{buffers::Buffers, frame::Frame, gemm, value::Shape, value::Value};
use anyhow::{bail, ensure, Context, Result};
use std::borrow::Cow;
use std::sync::Arc;

/// `y = x · W + b` on a dense `[1, K, (1, 1)]` value.
#[derive(Clone, Debug)]
pub struct Linear {
    /// What the ONNX node was (for listings).
    pub source: &'static str,
    pub weights: gemm::Weights,
    pub bias: Vec<f32>,
    /// Output shape.
    pub shape: Vec<usize>,
    /// Activation applied to the output (fused at load).
    pub act: Option<ActivationKind>,
}

impl Op for Linear {
    fn name(&self) -> &'static str {
        self.source
    }

    fn eval(&self, inputs: Vec<Cow<'_, Value>>, _frame: &Frame, bufs: &Buffers) -> Result<Value> {
        let Shape::Dense { .. } = inputs[0].shape else {
            anyhow::bail!("{} expects a dense input", self.source);
        };
        let x = &inputs[0].data;
        ensure!(
            x.len() == self.weights.k,
            "{} expects {} inputs, got {}",
            self.source,
            self.weights.k,
            x.len()
        );
        let mut y = bufs.take_for_writing(self.bias.len());
        y.copy_from_slice(&self.bias);
        gemm::matmul(
            1,
            x,
            self.weights.k,
            &self.weights,
            &mut y,
            self.weights.n,
            true,
        );
        if let Some(a) = self.act {
            a.apply_all(&mut y);
        }
        Ok(Value::dense(self.shape.clone(), y))
    }

    fn with_activation(&self, act: ActivationKind) -> Option<Arc<dyn Op>> {
        self.act
            .is_none()
            .then(|| super::activation::fused(self, |l| l.act = Some(act)))
    }

    fn fused(&self) -> Option<ActivationKind> {
        self.act
    }

    fn cost(&self, _tokens: &[usize]) -> u64 {
        (self.weights.k * self.weights.n) as u64
    }

    fn gpu_arrays(&self) -> Option<Vec<Cow<'_, [f32]>>> {
        Some(vec![
            Cow::Borrowed(&self.weights.data[..]),
            Cow::Borrowed(&self.bias[..]),
        ])
    }

    fn record(&self, io: &mut StepIo<'_>, arrays: &[u64]) -> Result<Shape> {
        let (k, n) = (self.weights.k, self.weights.n);
        let (shape, x) = io.input(0)?;
        ensure!(
            matches!(shape, Shape::Dense { .. }) && io.len(shape) == k,
            "linear expects a dense input of {k} values"
        );
        let y = io.output(n)?;
        let p = LinearParams {
            x,
            w: arrays[0],
            bias: arrays[1],
            y,
            k: k as i32,
            n: n as i32,
            act: GpuAct::of(self.act),
        };
        io.launch(KERNEL, n, &p);
        Ok(Shape::Dense {
            shape: self.shape.clone(),
        })
    }
}

/// `LinearParams` of `linear.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LinearParams {
    pub x: u64,
    pub w: u64,
    pub bias: u64,
    pub y: u64,
    pub k: i32,
    pub n: i32,
    pub act: GpuAct,
}

// SAFETY: repr(C) addresses, i32s and a repr(C) GpuAct, as in linear.cu.
unsafe impl KernelArgs for LinearParams {}

const KERNEL: Kernel = Kernel {
    family: Family::Linear,
    name: "sfx_linear",
};

impl Linear {
    /// Lowers a Conv of a dense `[1, cin, 1, 1]` value (after global
    /// pooling): a 1×1 unpadded conv is a linear layer, block-diagonal when
    /// grouped.
    pub fn from_conv(
        n: &mut OnnxNode<'_>,
        slot: usize,
        shape: &[usize],
        conv: ConvNode,
    ) -> Result<Tensor> {
        let (cin, cout, cin_g) = (conv.cin, conv.cout, conv.cin_g);
        ensure!(
            shape.len() == 4 && shape[1] == cin && shape[2] == 1 && shape[3] == 1 && conv.taps() == 1 && conv.pads.iter().all(|&p| p == 0),
            "a conv after global pooling must be 1×1 without padding on a [1, {cin}, 1, 1] value, got {shape:?}"
        );
        let cout_g = cout / conv.groups;
        let mut data = vec![0.0; cin * cout];
        for co in 0..cout {
            let g = co / cout_g;
            for ci in 0..cin_g {
                data[(g * cin_g + ci) * cout + co] = conv.weights[co * cin_g + ci];
            }
        }
        let out = vec![1, cout, 1, 1];
        let op = Linear {
            source: "Conv1x1",
            weights: gemm::Weights {
                k: cin,
                n: cout,
                data,
            },
            bias: conv.bias,
            shape: out.clone(),
            act: None,
        };
        Ok(n.emit(op, vec![slot], Shape::Dense { shape: out }))
    }
}

/// Builds a Gemm of a `[1, K]` value by a constant matrix.
pub fn gemm_from_onnx(n: &mut OnnxNode<'_>) -> Result<Tensor> {
    let (slot, shape) = n.dense_input()?;
    let node = n.node;
    ensure!(
        attr_i64(node, "transA", Some(0))? == 0,
        "Gemm with transA is not supported"
    );
    ensure!(
        shape.len() == 2 && shape[0] == 1,
        "Gemm input must be [1, K], is {shape:?}"
    );
    let alpha = attr_f32(node, "alpha", Some(1.0))?;
    let beta = attr_f32(node, "beta", Some(1.0))?;
    let trans_b = attr_i64(node, "transB", Some(0))? != 0;
    let name = &node.input[1];
    let bs = n
        .consts
        .shape(name)
        .context("Gemm B must be a constant")?
        .to_vec();
    ensure!(bs.len() == 2, "Gemm B must be 2-D, is {bs:?}");
    let (k, cols) = if trans_b {
        (bs[1], bs[0])
    } else {
        (bs[0], bs[1])
    };
    ensure!(
        k == shape[1],
        "Gemm: input has {} features, B expects {k}",
        shape[1]
    );
    let b = n.consts.f32s(name)?;
    let mut data = vec![0.0; k * cols];
    for i in 0..k {
        for j in 0..cols {
            data[i * cols + j] = alpha
                * if trans_b {
                    b[j * k + i]
                } else {
                    b[i * cols + j]
                };
        }
    }
    let bias = match n.constant(2)? {
        None => vec![0.0; cols],
        Some(v) if v.len() == cols => v.iter().map(|x| beta * x).collect(),
        Some(v) if v.len() == 1 => vec![beta * v[0]; cols],
        Some(v) => bail!("Gemm C has {} values, expected {cols} or 1", v.len()),
    };
    let op = Linear {
        source: "Gemm",
        weights: gemm::Weights { k, n: cols, data },
        bias,
        shape: vec![1, cols],
        act: None,
    };
    Ok(n.emit(
        op,
        vec![slot],
        Shape::Dense {
            shape: vec![1, cols],
        },
    ))
}

/// Builds a MatMul of a single row by a constant matrix.
pub fn matmul_from_onnx(n: &mut OnnxNode<'_>) -> Result<Tensor> {
    let (slot, shape) = n.dense_input()?;
    let name = &n.node.input[1];
    let b_shape = n
        .consts
        .shape(name)
        .context("MatMul B must be a constant")?
        .to_vec();
    ensure!(b_shape.len() == 2, "MatMul B must be 2-D, is {b_shape:?}");
    let k: usize = shape.iter().product();
    ensure!(
        shape.last() == Some(&b_shape[0]) && k == b_shape[0],
        "MatMul of {shape:?} by {b_shape:?}: only a single row times a matrix is supported"
    );
    let weights = gemm::Weights {
        k,
        n: b_shape[1],
        data: n.consts.f32s(name)?,
    };
    let mut out_shape = shape.clone();
    *out_shape.last_mut().expect("checked non-empty") = b_shape[1];
    let op = Linear {
        source: "MatMul",
        bias: vec![0.0; b_shape[1]],
        weights,
        shape: out_shape.clone(),
        act: None,
    };
    Ok(n.emit(op, vec![slot], Shape::Dense { shape: out_shape }))
}
