//! Add and Mul of two computed values: residual adds, gates, and the
//! squeeze-excite channel scale (tokens × a dense per-channel vector).

use super::Op;
use crate::sparse::{buffers::Buffers, plan::Frame, value::Value};
use anyhow::{bail, ensure, Result};
use std::borrow::Cow;

/// Which elementwise function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryKind {
    Add,
    Mul,
}

impl BinaryKind {
    #[inline]
    fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinaryKind::Add => a + b,
            BinaryKind::Mul => a * b,
        }
    }
}

/// A binary elementwise op; keeps the active set of its token operand.
#[derive(Clone, Debug)]
pub struct Binary {
    pub kind: BinaryKind,
    /// Channels of the result.
    pub c: usize,
    /// Level of the token operand, if any (for cost).
    pub level: Option<usize>,
}

impl Op for Binary {
    fn name(&self) -> &'static str {
        match self.kind {
            BinaryKind::Add => "Add",
            BinaryKind::Mul => "Mul",
        }
    }

    fn eval(
        &self,
        mut inputs: Vec<Cow<'_, Value>>,
        _frame: &Frame,
        bufs: &Buffers,
    ) -> Result<Value> {
        let b = inputs.pop().expect("binary op has two inputs");
        let a = inputs.pop().expect("binary op has two inputs");
        // Put the token operand (if any) first, so the result reuses its buffer.
        let (a, b) = match (&*a, &*b) {
            (Value::Dense { .. }, Value::Tokens { .. }) => (b, a),
            _ => (a, b),
        };
        let kind = self.kind;
        let mut out = a.into_owned();
        match (&mut out, &*b) {
            (
                Value::Tokens {
                    level: la, data, ..
                },
                Value::Tokens {
                    level: lb,
                    data: db,
                    ..
                },
            ) => {
                ensure!(
                    *la == *lb,
                    "operands on different token sets ({la} vs {lb})"
                );
                ensure!(data.len() == db.len(), "operand sizes differ");
                data.iter_mut()
                    .zip(db)
                    .for_each(|(x, &y)| *x = kind.apply(*x, y));
            }
            (Value::Tokens { c, data, .. }, Value::Dense { data: v, .. }) => {
                ensure!(
                    v.len() == *c,
                    "per-channel operand has {} values, expected {c}",
                    v.len()
                );
                for row in data.chunks_exact_mut(*c) {
                    row.iter_mut()
                        .zip(v)
                        .for_each(|(x, &y)| *x = kind.apply(*x, y));
                }
            }
            (Value::Dense { data, .. }, Value::Dense { data: db, .. }) => {
                ensure!(data.len() == db.len(), "operand sizes differ");
                data.iter_mut()
                    .zip(db)
                    .for_each(|(x, &y)| *x = kind.apply(*x, y));
            }
            (Value::Dense { .. }, Value::Tokens { .. }) => bail!("unreachable operand order"),
        }
        // The other operand, when read for the last time, goes back to the free list.
        if let Cow::Owned(v) = b {
            bufs.give(v.into_data());
        }
        Ok(out)
    }

    fn in_place(&self) -> bool {
        true
    }

    fn cost(&self, tokens: &[usize]) -> u64 {
        (self.level.map_or(1, |l| tokens[l]) * self.c) as u64
    }
}
