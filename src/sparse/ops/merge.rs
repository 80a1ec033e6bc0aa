//! Add and Mul of two token maps of the same size on different levels (an
//! upsampled map and a lateral, as in FPN necks): the result lives on the
//! union of the two active sets, and each operand holds its fill vector (or
//! zero) where it has no token, as the dense-masked network does. Each
//! operand's rows are found through a 1×1 rulebook from its level to the
//! union. On the GPU: `sfx_binary_merge` of `elementwise.cu`. Built by
//! `binary::from_onnx`.

use super::binary::BinaryKind;
use super::{OnnxNode, Op, Tensor};
use crate::sparse::launch::{Family, Kernel, KernelArgs, StepIo};
use crate::sparse::rulebook::{Rulebook, Window};
use crate::sparse::tokens::DROPPED;
use crate::sparse::{buffers::Buffers, frame::Frame, value::Shape, value::Value};
use crate::threads::par_rows;
use anyhow::{ensure, Result};
use std::borrow::Cow;

/// A binary op of two token maps whose levels differ but whose maps match.
#[derive(Clone, Debug)]
pub struct MergeBinary {
    pub kind: BinaryKind,
    pub c: usize,
    /// The operands' levels, in input order, and the union's.
    pub levels: [usize; 2],
    pub out_level: usize,
    /// Each operand's rulebook to the union (one tap: its row, or DROPPED).
    pub rulebooks: [usize; 2],
    /// Each operand's fill vector, read where it has no token.
    pub fills: [Option<Vec<f32>>; 2],
}

/// Lowers `x ∘ y` of token maps on levels of the same map size.
pub fn emit(n: &mut OnnxNode<'_>, kind: BinaryKind, x: Tensor, y: Tensor) -> Result<Tensor> {
    let (Shape::Tokens { level: la, c: ca }, Shape::Tokens { level: lb, c: cb }) =
        (&x.shape, &y.shape)
    else {
        anyhow::bail!("internal: a merged binary op of values that are not token maps");
    };
    let (la, lb, c) = (*la, *lb, *ca);
    ensure!(ca == cb, "operands have {ca} and {cb} channels");
    let (a, b) = (&n.lowered.levels[la], &n.lowered.levels[lb]);
    ensure!(
        (a.h, a.w) == (b.h, b.w),
        "operands are token maps of different sizes ({}×{} and {}×{})",
        a.h,
        a.w,
        b.h,
        b.w
    );
    let out_level = n.lowered.union_level(la, lb);
    let one = Window {
        kh: 1,
        kw: 1,
        stride: 1,
        pad_top: 0,
        pad_left: 0,
        transposed: false,
    };
    let rulebooks = [
        n.lowered.rulebook(la, out_level, one),
        n.lowered.rulebook(lb, out_level, one),
    ];
    let op = MergeBinary {
        kind,
        c,
        levels: [la, lb],
        out_level,
        rulebooks,
        fills: [n.fill(x.slot).cloned(), n.fill(y.slot).cloned()],
    };
    Ok(n.emit(
        op,
        vec![x.slot, y.slot],
        Shape::Tokens {
            level: out_level,
            c,
        },
    ))
}

impl MergeBinary {
    /// Operand `k`'s channels for output row `r`: its row in that operand,
    /// which the rulebook gives, or where it has none (`DROPPED`) its fill
    /// vector, else `zeros`.
    #[inline]
    fn operand<'a>(
        &'a self,
        k: usize,
        rows: &'a [f32],
        rb: &Rulebook,
        r: usize,
        zeros: &'a [f32],
    ) -> &'a [f32] {
        match rb.row(r)[0] {
            i if i < DROPPED => &rows[i as usize * self.c..(i as usize + 1) * self.c],
            _ => self.fills[k].as_deref().unwrap_or(zeros),
        }
    }
}

impl Op for MergeBinary {
    fn name(&self) -> &'static str {
        match self.kind {
            BinaryKind::Add => "AddMerged",
            BinaryKind::Mul => "MulMerged",
        }
    }

    fn eval(&self, inputs: Vec<Cow<'_, Value>>, frame: &Frame, bufs: &Buffers) -> Result<Value> {
        for (k, v) in inputs.iter().enumerate() {
            ensure!(
                v.shape
                    == Shape::Tokens {
                        level: self.levels[k],
                        c: self.c
                    },
                "merged operand {k} mismatch"
            );
        }
        let (ra, rb) = (
            &frame.rulebooks[self.rulebooks[0]],
            &frame.rulebooks[self.rulebooks[1]],
        );
        let rows = frame.sets[self.out_level].len();
        let mut y = bufs.take_for_writing(rows * self.c);
        let zeros = vec![0.0; self.c];
        let (xa, xb) = (&inputs[0].data, &inputs[1].data);
        // Each operand's row (or fill) is found once per output row, then the
        // channels combine in one pass; rows split across the run's threads.
        par_rows(&mut y, self.c, 256, |first, chunk| {
            for (i, out) in chunk.chunks_exact_mut(self.c).enumerate() {
                let a = self.operand(0, xa, ra, first + i, &zeros);
                let b = self.operand(1, xb, rb, first + i, &zeros);
                let pairs = out.iter_mut().zip(a.iter().zip(b));
                match self.kind {
                    BinaryKind::Add => pairs.for_each(|(o, (&a, &b))| *o = a + b),
                    BinaryKind::Mul => pairs.for_each(|(o, (&a, &b))| *o = a * b),
                }
            }
        });
        Ok(Value::tokens(self.out_level, self.c, y))
    }

    fn cost(&self, tokens: &[usize]) -> u64 {
        (tokens[self.out_level] * self.c) as u64
    }

    fn gpu_arrays(&self) -> Option<Vec<Cow<'_, [f32]>>> {
        Some(
            self.fills
                .iter()
                .flatten()
                .map(|f| Cow::Borrowed(&f[..]))
                .collect(),
        )
    }

    fn record(&self, io: &mut StepIo<'_>, arrays: &[u64]) -> Result<Shape> {
        let (la, a) = io.tokens(0, self.c, "merged binary op")?;
        let (lb, b) = io.tokens(1, self.c, "merged binary op")?;
        ensure!(
            [la, lb] == self.levels,
            "merged operands on levels {la} and {lb}, expected {:?}",
            self.levels
        );
        // The uploaded fills, in operand order, for the operands that have one.
        let mut uploaded = arrays.iter().copied();
        let mut fill = |k: usize| -> u64 {
            if self.fills[k].is_some() {
                uploaded.next().unwrap_or(0)
            } else {
                0
            }
        };
        let (fill_a, fill_b) = (fill(0), fill(1));
        let rows = io.capacity(self.out_level);
        let y = io.output(rows * self.c)?;
        let p = MergeParams {
            a,
            b,
            rb_a: io.rulebook(self.rulebooks[0]),
            rb_b: io.rulebook(self.rulebooks[1]),
            fill_a,
            fill_b,
            y,
            count: io.count(self.out_level),
            rows: rows as i32,
            c: self.c as i32,
            kind: match self.kind {
                BinaryKind::Add => 0,
                BinaryKind::Mul => 1,
            },
        };
        io.launch(KERNEL, rows * self.c, &p);
        Ok(Shape::Tokens {
            level: self.out_level,
            c: self.c,
        })
    }
}

/// `MergeParams` of `elementwise.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MergeParams {
    pub a: u64,
    pub b: u64,
    pub rb_a: u64,
    pub rb_b: u64,
    pub fill_a: u64,
    pub fill_b: u64,
    pub y: u64,
    pub count: u64,
    pub rows: i32,
    pub c: i32,
    pub kind: i32,
}

// SAFETY: repr(C) addresses and i32s, as in elementwise.cu.
unsafe impl KernelArgs for MergeParams {}

const KERNEL: Kernel = Kernel {
    family: Family::Elementwise,
    name: "sfx_binary_merge",
};
