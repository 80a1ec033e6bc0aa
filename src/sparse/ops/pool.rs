//! Global average pooling (GlobalAveragePool, ReduceMean over space): over
//! the active tokens, or over every position when dropped ones hold a fill.
//! On the GPU: `sfx_global_mean` of `pool.cu`.

use super::{OnnxNode, Op, Tensor};
use crate::onnx::{attr_i64, attr_ints};
use crate::sparse::launch::{Family, Kernel, KernelArgs, StepIo};
use crate::sparse::{buffers::Buffers, frame::Frame, value::Shape, value::Value};
use anyhow::{bail, ensure, Result};
use std::borrow::Cow;

/// Global mean of one level's token map: tokens → dense value.
#[derive(Clone, Debug)]
pub struct GlobalMean {
    pub source: &'static str,
    pub level: usize,
    pub c: usize,
    /// Output shape (`[1, C, 1, 1]` or `[1, C]`).
    pub shape: Vec<usize>,
    /// The input's fill vector: with one, the mean is over every position of
    /// the level's map (the dense mean of the filled map); without, over
    /// active tokens only (submanifold semantics).
    pub fill: Option<Vec<f32>>,
}

/// Builds a GlobalAveragePool, or a ReduceMean over both spatial axes.
pub fn from_onnx(n: &mut OnnxNode<'_>) -> Result<Tensor> {
    let (axes, keep, source) = if n.op_type() == "ReduceMean" {
        let axes = match attr_ints(n.node, "axes")? {
            Some(a) => a,
            None => match n.node.input.get(1).filter(|s| !s.is_empty()) {
                Some(name) => n.consts.i64s(name)?,
                None => bail!("ReduceMean over all axes is not supported; give axes [2, 3]"),
            },
        };
        let keep = attr_i64(n.node, "keepdims", Some(1))? != 0;
        (axes, keep, "ReduceMean")
    } else {
        (vec![2, 3], true, "GlobalAveragePool")
    };
    let mut axes: Vec<i64> = axes
        .iter()
        .map(|&a| if a < 0 { a + 4 } else { a })
        .collect();
    axes.sort();
    ensure!(
        axes == [2, 3],
        "only the mean over both spatial axes is supported, got axes {axes:?}"
    );
    let x = n.input(0)?;
    let Shape::Tokens { level, c } = x.shape else {
        bail!("global pooling of a value that has no spatial extent");
    };
    let shape = if keep { vec![1, c, 1, 1] } else { vec![1, c] };
    let op = GlobalMean {
        source,
        level,
        c,
        shape: shape.clone(),
        fill: n.fill(x.slot).cloned(),
    };
    Ok(n.emit(op, vec![x.slot], Shape::Dense { shape }))
}

impl Op for GlobalMean {
    fn name(&self) -> &'static str {
        self.source
    }

    fn eval(&self, inputs: Vec<Cow<'_, Value>>, frame: &Frame, bufs: &Buffers) -> Result<Value> {
        let Shape::Tokens { c, .. } = inputs[0].shape else {
            anyhow::bail!("{} expects token input", self.source);
        };
        let data = &inputs[0].data;
        let mut sum = bufs.take(c);
        let rows = data.len() / c;
        for row in data.chunks_exact(c) {
            sum.iter_mut().zip(row).for_each(|(s, &x)| *s += x);
        }
        let inv = match &self.fill {
            Some(f) => {
                let set = &frame.sets[self.level];
                let positions = set.h * set.w;
                let dropped = positions.saturating_sub(rows) as f32;
                sum.iter_mut().zip(f).for_each(|(s, &v)| *s += dropped * v);
                1.0 / positions.max(1) as f32
            }
            // The energy layer keeps at least one token, and strided sets inherit it.
            None => 1.0 / rows.max(1) as f32,
        };
        sum.iter_mut().for_each(|s| *s *= inv);
        Ok(Value::dense(self.shape.clone(), sum))
    }

    fn cost(&self, tokens: &[usize]) -> u64 {
        (tokens[self.level] * self.c) as u64
    }

    fn gpu_arrays(&self) -> Option<Vec<Cow<'_, [f32]>>> {
        Some(
            self.fill
                .as_deref()
                .map(Cow::Borrowed)
                .into_iter()
                .collect(),
        )
    }

    fn record(&self, io: &mut StepIo<'_>, arrays: &[u64]) -> Result<Shape> {
        let (level, x) = io.tokens(0, self.c, "global pooling")?;
        let y = io.output(self.c)?;
        let positions = io.capacity(level);
        let p = GlobalMeanParams {
            x,
            fill: arrays.first().copied().unwrap_or(0),
            y,
            count: io.count(level),
            rows: positions as i32,
            c: self.c as i32,
            positions: positions as i32,
        };
        io.launch(KERNEL, self.c, &p);
        Ok(Shape::Dense {
            shape: self.shape.clone(),
        })
    }
}

/// `GlobalMeanParams` of `pool.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GlobalMeanParams {
    pub x: u64,
    pub fill: u64,
    pub y: u64,
    pub count: u64,
    pub rows: i32,
    pub c: i32,
    pub positions: i32,
}

// SAFETY: repr(C) addresses and i32s, as in pool.cu.
unsafe impl KernelArgs for GlobalMeanParams {}

const KERNEL: Kernel = Kernel {
    family: Family::Pool,
    name: "sfx_global_mean",
};
