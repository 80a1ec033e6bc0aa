//! Neighbour tables: for each output token and kernel tap, the input token it
//! reads. Their GPU twin is `sfx_rulebook` of `kernels/tokens.cu`.

use super::launch::{Family, Kernel, KernelArgs};
use super::tokens::{TokenSet, DROPPED, INACTIVE};

/// Geometry of a windowed layer, the key a rulebook is built and cached by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    /// Kernel height and width.
    pub kh: usize,
    pub kw: usize,
    /// Stride (same along both axes).
    pub stride: usize,
    /// Padding before the first row and column.
    pub pad_top: usize,
    pub pad_left: usize,
    /// A transposed conv's window: output `o` reads input `i` at tap `k`
    /// when `o = i·stride + k − pad`, so most taps of an output read nothing.
    pub transposed: bool,
}

impl Window {
    /// The input position output position `o` reads at tap `k` along one
    /// axis (`pad` before it), if any: it may still lie outside the map.
    #[inline]
    pub fn source(&self, o: usize, k: usize, pad: usize) -> Option<isize> {
        let s = self.stride as isize;
        if self.transposed {
            let n = o as isize + pad as isize - k as isize;
            (n >= 0 && n % s == 0).then_some(n / s)
        } else {
            Some(o as isize * s - pad as isize + k as isize)
        }
    }
}

/// `table[n * taps + t]` is the input token read by output token `n` at tap `t`,
/// [`DROPPED`] where that input is inside the map but inactive (it reads the
/// input's fill vector, or zero), or [`INACTIVE`] where it is outside the map
/// (padding: zero).
#[derive(Clone, Debug)]
pub struct Rulebook {
    /// Taps per output token (`kh · kw`).
    pub taps: usize,
    /// Output-token-major table.
    pub table: Vec<u32>,
}

impl Rulebook {
    /// Builds the table once per token set pair and window.
    pub fn build(input: &TokenSet, output: &TokenSet, win: Window) -> Rulebook {
        let taps = win.kh * win.kw;
        let mut table = Vec::with_capacity(output.len() * taps);
        for &o in &output.coords {
            let (oy, ox) = (o as usize / output.w, o as usize % output.w);
            for ky in 0..win.kh {
                for kx in 0..win.kw {
                    let at = win
                        .source(oy, ky, win.pad_top)
                        .zip(win.source(ox, kx, win.pad_left));
                    table.push(match at {
                        Some((y, x))
                            if y >= 0
                                && x >= 0
                                && (y as usize) < input.h
                                && (x as usize) < input.w =>
                        {
                            match input.index[y as usize * input.w + x as usize] {
                                INACTIVE => DROPPED,
                                i => i,
                            }
                        }
                        // Padding, or no input at this tap of a transposed conv.
                        _ => INACTIVE,
                    });
                }
            }
        }
        Rulebook { taps, table }
    }

    /// The taps of output token `n`.
    #[inline]
    pub fn row(&self, n: usize) -> &[u32] {
        &self.table[n * self.taps..(n + 1) * self.taps]
    }
}

/// `RulebookParams` of `tokens.cu`: the GPU twin of [`Rulebook::build`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RulebookParams {
    pub set_in: u64,
    pub list_in: u64,
    pub count_in: u64,
    pub table: u64,
    pub map_h: i32,
    pub map_w: i32,
    pub in_h: i32,
    pub in_w: i32,
    pub stride: i32,
    pub kh: i32,
    pub kw: i32,
    pub pad_top: i32,
    pub pad_left: i32,
    /// 1 for a transposed conv's window.
    pub transposed: i32,
}

// SAFETY: repr(C) addresses and i32s, as in tokens.cu.
unsafe impl KernelArgs for RulebookParams {}

/// One thread per (output token, tap).
pub const KERNEL: Kernel = Kernel {
    family: Family::Tokens,
    name: "sfx_rulebook",
};
