//! What an op's GPU twin sees while its launch is recorded: its inputs'
//! shapes and device addresses, each level's token count in device memory,
//! the rulebook tables, the residual it may add in its own kernel, and
//! where its output goes. An op's `record` (`sparse/ops/<op>.rs`) reads
//! these and records its launch with its own parameter struct.

use super::{Args, Kernel, KernelArgs};
use crate::sparse::value::Shape;
use anyhow::{ensure, Context, Result};

/// One kernel launch of a frame's steps.
#[derive(Clone, Copy, Debug)]
pub struct Launch {
    /// The step it computes (its time is that step's).
    pub step: usize,
    pub kernel: Kernel,
    pub threads: usize,
    pub args: Args,
}

/// Output buffers for the steps being recorded.
pub trait Pool {
    /// A free buffer of at least `n` values: its address and pool index.
    fn alloc(&mut self, n: usize) -> Result<(u64, usize)>;
}

/// One step's view of a frame being recorded.
pub struct StepIo<'a> {
    pub(crate) inputs: Vec<(Shape, u64)>,
    /// Rows each level can hold (its positions): launches and buffers are
    /// sized for them, and the kernels read the exact counts on the device.
    pub(crate) capacity: &'a [usize],
    /// Address of the level counts, one `u32` per level.
    pub(crate) counts: u64,
    /// Address of each rulebook's table.
    pub(crate) tables: &'a [u64],
    /// Address of each level's token list (raster positions, ascending).
    pub(crate) lists: &'a [u64],
    /// Address of each level's index map (raster position → token, or
    /// `SFX_INACTIVE`).
    pub(crate) sets: &'a [u64],
    /// Address of each level's held flags (one `u32` per position, nonzero
    /// where a stream's held tokens reach), rewritten every frame.
    pub(crate) held: &'a [u64],
    /// Address of each gate's shift (one `f32`), rewritten every frame.
    pub(crate) shifts: &'a [u64],
    /// The other operand of the Add after this step, when the plan lets
    /// this step's kernel add it.
    pub(crate) residual: Option<(Shape, u64)>,
    pub(crate) fused: bool,
    pub(crate) out: Option<(u64, usize)>,
    /// Pool buffers the step works in, free again after it.
    pub(crate) scratch: Vec<usize>,
    pub(crate) pool: &'a mut dyn Pool,
    pub(crate) launches: &'a mut Vec<Launch>,
    pub(crate) step: usize,
}

impl StepIo<'_> {
    /// Input `k`: its shape and address.
    pub fn input(&self, k: usize) -> Result<(&Shape, u64)> {
        let (shape, at) = self
            .inputs
            .get(k)
            .with_context(|| format!("input {k} is not computed"))?;
        Ok((shape, *at))
    }

    /// Input `k` as token rows of `c` channels: their level and address.
    pub fn tokens(&self, k: usize, c: usize, op: &str) -> Result<(usize, u64)> {
        match self.input(k)? {
            (Shape::Tokens { level, c: ci }, at) => {
                ensure!(*ci == c, "{op} expects {c} channels, got {ci}");
                Ok((*level, at))
            }
            (Shape::Dense { .. }, _) => anyhow::bail!("{op} expects token rows"),
        }
    }

    /// Rows level `level` can hold: its positions.
    pub fn capacity(&self, level: usize) -> usize {
        self.capacity[level]
    }

    /// Values a buffer of `shape` holds at capacity.
    pub fn len(&self, shape: &Shape) -> usize {
        shape.len(self.capacity)
    }

    /// Address of level `level`'s token count.
    pub fn count(&self, level: usize) -> u64 {
        self.counts + 4 * level as u64
    }

    /// What an elementwise launch over `shape`'s values reads: the address
    /// of its level's count and its row length (nothing for a dense value,
    /// whose size is fixed).
    pub fn count_of(&self, shape: &Shape) -> (u64, i32) {
        match shape {
            Shape::Tokens { level, c } => (self.count(*level), *c as i32),
            Shape::Dense { .. } => (0, 0),
        }
    }

    /// Address of level `level`'s token list.
    pub fn list(&self, level: usize) -> u64 {
        self.lists[level]
    }

    /// Address of level `level`'s index map.
    pub fn set(&self, level: usize) -> u64 {
        self.sets[level]
    }

    /// Address of level `level`'s held flags (a stream's; zero off one).
    pub fn held(&self, level: usize) -> u64 {
        self.held[level]
    }

    /// Address of gate `gate`'s shift for the frame (0.0 off a stream).
    pub fn shift(&self, gate: usize) -> u64 {
        self.shifts[gate]
    }

    /// Address of rulebook `i`'s table.
    pub fn rulebook(&self, i: usize) -> u64 {
        self.tables[i]
    }

    /// The address of the residual this step's kernel adds to its output
    /// of `out`, or 0: offered only when the plan fused the next Add into
    /// this step, and taken only when it holds the same rows.
    pub fn residual(&mut self, out: &Shape) -> u64 {
        match &self.residual {
            Some((shape, at)) if shape == out => {
                self.fused = true;
                *at
            }
            _ => 0,
        }
    }

    /// Allocates the step's output, `n` values: its address.
    pub fn output(&mut self, n: usize) -> Result<u64> {
        ensure!(self.out.is_none(), "a step has one output");
        let (at, buf) = self.pool.alloc(n.max(1))?;
        self.out = Some((at, buf));
        Ok(at)
    }

    /// A buffer of `n` values the step works in (its launches only): its
    /// address.
    pub fn scratch(&mut self, n: usize) -> Result<u64> {
        let (at, buf) = self.pool.alloc(n.max(1))?;
        self.scratch.push(buf);
        Ok(at)
    }

    /// Records a launch of `kernel` on `threads` threads with `args`.
    pub fn launch<A: KernelArgs>(&mut self, kernel: Kernel, threads: usize, args: &A) {
        self.launches.push(Launch {
            step: self.step,
            kernel,
            threads,
            args: Args::of(args),
        });
    }
}
