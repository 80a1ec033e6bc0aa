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
    /// Builds the table once per token set pair and window. Which input row
    /// and column each output row and column reads at each tap is worked out
    /// once per axis ([`Window::source`] and the map's bounds), so a token's
    /// taps are lookups (at CenterFace's stride 4 a frame's tables hold
    /// 100 000 entries).
    pub fn build(input: &TokenSet, output: &TokenSet, win: Window) -> Rulebook {
        let taps = win.kh * win.kw;
        // axis(n, k, pad, len)[o * k + t]: the input position output o reads
        // at tap t along one axis, or NONE outside the map.
        const NONE: usize = usize::MAX;
        let axis = |n: usize, k: usize, pad: usize, len: usize| -> Vec<usize> {
            (0..n)
                .flat_map(|o| (0..k).map(move |t| (o, t)))
                .map(|(o, t)| match win.source(o, t, pad) {
                    Some(v) if v >= 0 && (v as usize) < len => v as usize,
                    _ => NONE,
                })
                .collect()
        };
        let rows = axis(output.h, win.kh, win.pad_top, input.h);
        let cols = axis(output.w, win.kw, win.pad_left, input.w);
        // Padding, and a transposed conv's taps that read no input, stay
        // INACTIVE.
        let mut table = vec![INACTIVE; output.len() * taps];
        for (&o, entries) in output.coords.iter().zip(table.chunks_exact_mut(taps)) {
            let (oy, ox) = (o as usize / output.w, o as usize % output.w);
            let cols = &cols[ox * win.kw..][..win.kw];
            let rows = &rows[oy * win.kh..][..win.kh];
            for (&y, entries) in rows.iter().zip(entries.chunks_exact_mut(win.kw)) {
                if y == NONE {
                    continue;
                }
                let line = &input.index[y * input.w..][..input.w];
                for (e, &x) in entries.iter_mut().zip(cols) {
                    if x != NONE {
                        let i = line[x];
                        *e = if i == INACTIVE { DROPPED } else { i };
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse::tokens::tests::random_set;

    /// The table by its definition, tap by tap.
    fn by_definition(input: &TokenSet, output: &TokenSet, win: Window) -> Vec<u32> {
        let mut table = Vec::new();
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
                        _ => INACTIVE,
                    });
                }
            }
        }
        table
    }

    #[test]
    fn every_window_gives_the_table_of_its_definition() {
        let mut seed = 0x2545f4914f6cdd1d;
        let win = |k: usize, stride: usize, pad: usize, transposed: bool| Window {
            kh: k,
            kw: k,
            stride,
            pad_top: pad,
            pad_left: pad + usize::from(k > 1 && !transposed && stride == 1) % 2,
            transposed,
        };
        for (h, w) in [(1, 1), (6, 9), (15, 20), (30, 40)] {
            for p in [0.1, 0.5, 1.0] {
                let input = random_set(h, w, p, &mut seed);
                for window in [
                    win(1, 1, 0, false),
                    win(3, 1, 1, false),
                    win(3, 2, 1, false),
                    win(3, 2, 0, false),
                    win(5, 1, 2, false),
                    win(2, 2, 0, true),
                    win(3, 2, 1, true),
                ] {
                    let (oh, ow) = if window.transposed {
                        (h * window.stride, w * window.stride)
                    } else {
                        (h.div_ceil(window.stride), w.div_ceil(window.stride))
                    };
                    let output = random_set(oh, ow, 0.6, &mut seed);
                    let got = Rulebook::build(&input, &output, window);
                    assert_eq!(got.taps, window.kh * window.kw);
                    assert_eq!(
                        got.table,
                        by_definition(&input, &output, window),
                        "{h}x{w} p {p} {window:?}"
                    );
                }
            }
        }
    }
}
