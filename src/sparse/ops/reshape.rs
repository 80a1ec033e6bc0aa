//! Flatten and Reshape of dense values (after global pooling), and the ops
//! that pass a tensor through unchanged (Identity, Dropout at inference),
//! which lower to no step. On the GPU a reshape relabels its input's buffer,
//! or copies it (`sfx_activation` with no function) when it is read again.

use super::activation::record_elementwise;
use super::{OnnxNode, Op, Tensor};
use crate::onnx::attr_i64;
use crate::sparse::launch::StepIo;
use crate::sparse::{buffers::Buffers, frame::Frame, value::Shape, value::Value};
use anyhow::{bail, ensure, Result};
use std::borrow::Cow;

/// Changes a dense value's shape, keeping its data.
#[derive(Clone, Debug)]
pub struct Reshape {
    pub source: &'static str,
    pub shape: Vec<usize>,
}

impl Reshape {
    /// The output shape for `input`: only a dense value of as many values.
    fn output(&self, input: &Shape) -> Result<Shape> {
        let Shape::Dense { shape } = input else {
            bail!("{} of a token map is not supported", self.source);
        };
        let n: usize = shape.iter().product();
        ensure!(
            self.shape.iter().product::<usize>() == n,
            "reshape of {n} values to {:?}",
            self.shape
        );
        Ok(Shape::Dense {
            shape: self.shape.clone(),
        })
    }
}

/// Identity and Dropout: the input tensor, under another name.
pub fn identity_from_onnx(n: &mut OnnxNode<'_>) -> Result<Tensor> {
    n.input(0)
}

/// Builds a Flatten of a dense value.
pub fn flatten_from_onnx(n: &mut OnnxNode<'_>) -> Result<Tensor> {
    let (slot, shape) = n.dense_input()?;
    let axis = attr_i64(n.node, "axis", Some(1))?;
    let axis = if axis < 0 {
        axis + shape.len() as i64
    } else {
        axis
    } as usize;
    ensure!(
        axis <= shape.len(),
        "Flatten axis {axis} out of range for {shape:?}"
    );
    let shape = vec![
        shape[..axis].iter().product(),
        shape[axis..].iter().product(),
    ];
    emit(n, "Flatten", slot, shape)
}

/// Builds a Reshape of a dense value to a constant shape.
pub fn from_onnx(n: &mut OnnxNode<'_>) -> Result<Tensor> {
    let (slot, shape) = n.dense_input()?;
    let target = match n.node.input.get(1) {
        Some(name) if n.consts.contains(name) => n.consts.i64s(name)?,
        _ => bail!("Reshape target shape must be a constant"),
    };
    let shape = reshape_target(&shape, &target)?;
    emit(n, "Reshape", slot, shape)
}

fn emit(
    n: &mut OnnxNode<'_>,
    source: &'static str,
    slot: usize,
    shape: Vec<usize>,
) -> Result<Tensor> {
    let op = Reshape {
        source,
        shape: shape.clone(),
    };
    Ok(n.emit(op, vec![slot], Shape::Dense { shape }))
}

/// ONNX Reshape semantics (0 copies a dimension, one -1 is inferred).
fn reshape_target(shape: &[usize], target: &[i64]) -> Result<Vec<usize>> {
    let total: usize = shape.iter().product();
    let mut out: Vec<Option<usize>> = target
        .iter()
        .enumerate()
        .map(|(i, &d)| match d {
            0 => shape.get(i).copied(),
            -1 => None,
            d if d > 0 => Some(d as usize),
            _ => Some(usize::MAX),
        })
        .collect();
    ensure!(
        !out.contains(&Some(usize::MAX)),
        "invalid Reshape target {target:?}"
    );
    let known: usize = out.iter().flatten().product();
    match out.iter().filter(|d| d.is_none()).count() {
        0 => {}
        1 if known > 0 && total.is_multiple_of(known) => {
            if let Some(d) = out.iter_mut().find(|d| d.is_none()) {
                *d = Some(total / known);
            }
        }
        _ => bail!("cannot reshape {shape:?} to {target:?}"),
    }
    let out: Vec<usize> = out.into_iter().flatten().collect();
    ensure!(
        out.iter().product::<usize>() == total,
        "cannot reshape {shape:?} to {target:?}"
    );
    Ok(out)
}

impl Op for Reshape {
    fn name(&self) -> &'static str {
        self.source
    }

    fn eval(
        &self,
        mut inputs: Vec<Cow<'_, Value>>,
        _frame: &Frame,
        _bufs: &Buffers,
    ) -> Result<Value> {
        let v = inputs.swap_remove(0).into_owned();
        if let Shape::Tokens { .. } = v.shape {
            anyhow::bail!("{} of a token map is not supported", self.source)
        }
        Ok(Value::dense(self.shape.clone(), v.data))
    }

    fn in_place(&self) -> bool {
        true
    }

    fn cost(&self, _tokens: &[usize]) -> u64 {
        0
    }

    fn relabel(&self, input: &Shape) -> Option<Result<Shape>> {
        Some(self.output(input))
    }

    fn gpu_arrays(&self) -> Option<Vec<Cow<'_, [f32]>>> {
        Some(Vec::new())
    }

    fn record(&self, io: &mut StepIo<'_>, _arrays: &[u64]) -> Result<Shape> {
        // A copy, as the input is read again later and each slot owns its
        // buffer.
        let (shape, x) = io.input(0)?;
        let out = self.output(shape)?;
        record_elementwise(io, &out, x, None)?;
        Ok(out)
    }
}
