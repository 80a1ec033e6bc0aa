//! Prefix maps the suffix reads beside the energy layer's output (FPN
//! laterals): the dense `[1, C, H, W]` map the prefix computed, gathered
//! into token rows at the active positions of its own resolution's level.
//! On the GPU: `sfx_gather_map` of `tokens.cu`.

use super::{Lowered, Op, Step, Tensor};
use crate::sparse::launch::{Family, Kernel, KernelArgs, StepIo};
use crate::sparse::{buffers::Buffers, frame::Frame, value::Shape, value::Value};
use crate::threads::par_rows;
use anyhow::{ensure, Result};
use std::borrow::Cow;
use std::sync::Arc;

/// Tokens a block gathers, one channel after another.
const BLOCK: usize = 64;

/// Tokens one thread gathers at least.
const MIN_ROWS: usize = 512;

/// A dense map's rows at one level's active positions.
#[derive(Clone, Debug)]
pub struct GatherMap {
    pub level: usize,
    pub c: usize,
    /// Positions of the map (`h · w`).
    pub positions: usize,
}

/// How a prefix map's size relates to the cut's (level 0's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// The same size.
    Same,
    /// The cut's times a whole factor (every side).
    Finer(usize),
    /// The cut's divided by a whole factor, rounded up as a strided layer's output is.
    Coarser(usize),
}

impl Scale {
    /// The relation of a `(h, w)` map to the cut's `(h0, w0)`, if it is one
    /// a suffix may read.
    pub fn of((h, w): (usize, usize), (h0, w0): (usize, usize)) -> Option<Scale> {
        if (h, w) == (h0, w0) {
            return Some(Scale::Same);
        }
        if h > h0 && h % h0 == 0 && w % w0 == 0 && h / h0 == w / w0 {
            return Some(Scale::Finer(h / h0));
        }
        (2..=h0.max(w0))
            .find(|f| h0.div_ceil(*f) == h && w0.div_ceil(*f) == w)
            .map(Scale::Coarser)
    }
}

/// Adds prefix map `name` (`c × h × w`) to the suffix: a dense input slot
/// the prefix fills every frame, its level (level 0's set upsampled by a
/// whole factor for a finer map, strided down for a coarser one, level 0
/// itself at the same size), and the step gathering it there. The input
/// slot and the gathered tensor.
pub fn tap(
    lowered: &mut Lowered,
    name: &str,
    c: usize,
    (h, w): (usize, usize),
) -> Result<(usize, Tensor)> {
    let (h0, w0) = (lowered.levels[0].h, lowered.levels[0].w);
    let level = match Scale::of((h, w), (h0, w0)) {
        Some(Scale::Same) => 0,
        Some(Scale::Finer(f)) => lowered.up_level(0, f, h, w),
        Some(Scale::Coarser(f)) => lowered.child_level(0, f, h, w),
        None => anyhow::bail!(
            "'{name}': its {h}×{w} map is not the cut's {h0}×{w0} times or divided by a whole factor"
        ),
    };
    let map = lowered.slot(
        &format!("{name} (dense)"),
        Shape::Dense {
            shape: vec![1, c, h, w],
        },
    );
    let shape = Shape::Tokens { level, c };
    let slot = lowered.slot(name, shape.clone());
    lowered.steps.push(Step {
        node: format!("{name} (from the prefix)"),
        op: Arc::new(GatherMap {
            level,
            c,
            positions: h * w,
        }),
        inputs: vec![map],
        output: slot,
    });
    Ok((map, Tensor { slot, shape }))
}

impl Op for GatherMap {
    fn name(&self) -> &'static str {
        "GatherMap"
    }

    fn eval(&self, inputs: Vec<Cow<'_, Value>>, frame: &Frame, bufs: &Buffers) -> Result<Value> {
        let map = inputs[0].data();
        ensure!(
            map.len() == self.c * self.positions,
            "a prefix map of {} values, {} × {} expected",
            map.len(),
            self.c,
            self.positions
        );
        let coords = &frame.sets[self.level].coords;
        ensure!(
            coords.last().is_none_or(|&i| (i as usize) < self.positions),
            "level {} has a token past the map's {} positions",
            self.level,
            self.positions
        );
        let mut rows = bufs.take_for_writing(coords.len() * self.c);
        // Blocks of tokens channel by channel: a block's reads walk one plane
        // in raster order (CenterFace's stride-4 map is 1.8 MB, past the
        // cache; token by token, each row read 24 planes 77 KB apart), its
        // writes stay in one small block of rows.
        par_rows(&mut rows, self.c, MIN_ROWS, |first, rows| {
            for (block, ids) in rows
                .chunks_mut(BLOCK * self.c)
                .zip(coords[first..].chunks(BLOCK))
            {
                for (ch, plane) in map.chunks_exact(self.positions).enumerate() {
                    for (row, &i) in block.chunks_exact_mut(self.c).zip(ids) {
                        row[ch] = plane[i as usize];
                    }
                }
            }
        });
        Ok(Value::tokens(self.level, self.c, rows))
    }

    fn cost(&self, _tokens: &[usize]) -> u64 {
        0
    }

    fn gpu_arrays(&self) -> Option<Vec<Cow<'_, [f32]>>> {
        Some(Vec::new())
    }

    fn record(&self, io: &mut StepIo<'_>, _arrays: &[u64]) -> Result<Shape> {
        let (shape, map) = io.input(0)?;
        ensure!(
            shape.len(&[]) == self.c * self.positions,
            "GatherMap expects a dense {}-value map",
            self.c * self.positions
        );
        let rows = io.capacity(self.level);
        let y = io.output(rows * self.c)?;
        let p = GatherMapParams {
            map,
            list: io.list(self.level),
            count: io.count(self.level),
            y,
            c: self.c as i32,
            positions: self.positions as i32,
            rows: rows as i32,
        };
        io.launch(KERNEL, rows * self.c, &p);
        Ok(Shape::Tokens {
            level: self.level,
            c: self.c,
        })
    }
}

/// `GatherMapParams` of `tokens.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GatherMapParams {
    pub map: u64,
    pub list: u64,
    pub count: u64,
    pub y: u64,
    pub c: i32,
    pub positions: i32,
    pub rows: i32,
}

// SAFETY: repr(C) addresses and i32s, as in tokens.cu.
unsafe impl KernelArgs for GatherMapParams {}

const KERNEL: Kernel = Kernel {
    family: Family::Tokens,
    name: "sfx_gather_map",
};
