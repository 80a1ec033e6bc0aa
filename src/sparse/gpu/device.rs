//! What runs the suffix's kernels: memory and launches. [`super::cuda`]
//! runs them on an NVIDIA GPU; the tests run the same kernel source
//! compiled for the CPU.

use crate::sparse::launch::{Args, Kernel};
use anyhow::Result;

/// Threads per block of every launch.
pub const BLOCK: usize = 256;

/// What runs the kernels: memory and launches.
pub trait Device {
    /// A buffer of `f32` (token indices and rulebooks travel as the bits of
    /// their `u32`s).
    type Buf;
    /// A buffer holding `data`.
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// A buffer of `n` values, contents unspecified.
    fn alloc(&self, n: usize) -> Result<Self::Buf>;
    /// A buffer holding a copy of the `n` values at device address `src`
    /// (another component's output, still on the device).
    ///
    /// # Safety
    /// `src` must address `n` live `f32`s of this device, written by work
    /// that has finished.
    unsafe fn copy_from(&self, src: u64, n: usize) -> Result<Self::Buf>;
    /// The address kernels use for `buf`.
    fn ptr(&self, buf: &Self::Buf) -> u64;
    /// Runs `kernel` on `threads` threads (blocks of [`BLOCK`]) with the
    /// parameter block `args`, in order after every earlier launch.
    fn launch(&self, kernel: Kernel, threads: usize, args: &Args) -> Result<()>;
    /// Writes `data` into `buf` from value `at` on, in order after every
    /// earlier launch.
    fn write(&self, buf: &mut Self::Buf, at: usize, data: &[f32]) -> Result<()>;
    /// The first `n` values of `buf`, after every launch so far has finished.
    fn download(&self, buf: &Self::Buf, n: usize) -> Result<Vec<f32>>;
    /// Returns once every launch and copy so far has finished (for timing).
    fn sync(&self) -> Result<()>;
    /// A frame's launches captured to run as one unit (a CUDA graph).
    type Graph;
    /// Captures the launches `f` makes instead of running them: `Ok(None)`
    /// where this device does not capture (its launches then run one by one).
    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<Self::Graph>>;
    /// Runs a captured graph, in order after every earlier launch and copy
    /// and before every later one.
    fn launch_graph(&self, graph: &Self::Graph) -> Result<()>;
}

/// Token indices and rulebook entries as the `f32` buffers carry them: bit
/// for bit.
pub fn words_as_f32(words: &[u32]) -> Vec<f32> {
    words.iter().map(|&i| f32::from_bits(i)).collect()
}
