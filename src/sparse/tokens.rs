//! Active token sets: which positions of a map are computed. Their GPU twins
//! are `sfx_level0` and `sfx_level` of `kernels/tokens.cu`.

use super::launch::{Family, Kernel, KernelArgs};

/// Marks a position with no active token in [`TokenSet::index`]; in a
/// rulebook, a tap outside the map (padding, which reads zero).
pub const INACTIVE: u32 = u32::MAX;

/// In a rulebook, a tap on a dropped (inactive) position inside the map: it
/// reads the input tensor's fill vector, or zero when it has none.
pub const DROPPED: u32 = u32::MAX - 1;

/// How a stride-`s` layer's active set follows from its input's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StrideRule {
    /// Output `(oy, ox)` is active when any input in rows `[s·oy, s·oy + s)`
    /// and columns `[s·ox, s·ox + s)` is (the s×s max-pool).
    #[default]
    Any,
    /// Output `(oy, ox)` is active when input `(s·oy, s·ox)`, the centre tap of
    /// an odd "same"-padded kernel, is: a strided layer keeps the keep ratio.
    /// When no centre tap is active, the output over the first active input
    /// (raster order) is, so a level is never empty.
    Centre,
}

impl StrideRule {
    /// Parses the `stride_rule` attribute's value.
    pub fn parse(s: &str) -> Option<StrideRule> {
        match s {
            "any" => Some(StrideRule::Any),
            "centre" => Some(StrideRule::Centre),
            _ => None,
        }
    }

    /// The attribute value that names this rule.
    pub fn as_str(self) -> &'static str {
        match self {
            StrideRule::Any => "any",
            StrideRule::Centre => "centre",
        }
    }
}

/// The active positions of one `H × W` map, in raster order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSet {
    /// Map height.
    pub h: usize,
    /// Map width.
    pub w: usize,
    /// Raster index of each active token, ascending.
    pub coords: Vec<u32>,
    /// Token number at each raster position, or [`INACTIVE`].
    pub index: Vec<u32>,
}

impl TokenSet {
    /// Builds a set from ascending raster indices.
    pub fn from_raster(h: usize, w: usize, coords: Vec<u32>) -> Self {
        let mut index = vec![INACTIVE; h * w];
        for (n, &i) in coords.iter().enumerate() {
            index[i as usize] = n as u32;
        }
        TokenSet {
            h,
            w,
            coords,
            index,
        }
    }

    /// Every position active.
    pub fn full(h: usize, w: usize) -> Self {
        Self::from_raster(h, w, (0..(h * w) as u32).collect())
    }

    /// Number of active tokens.
    pub fn len(&self) -> usize {
        self.coords.len()
    }

    /// True when no token is active.
    pub fn is_empty(&self) -> bool {
        self.coords.is_empty()
    }

    /// The set of an `s`-times upsampled map (a transposed conv's output):
    /// `(y, x)` is active when `(y / s, x / s)` is. Built from the parent's
    /// tokens row by row (each parent row's tokens are a run of `coords`),
    /// not by a scan of every output position: at CenterFace's stride 4
    /// that scan was 19 200 positions a level, twice a frame.
    pub fn upsample(&self, s: usize, out_h: usize, out_w: usize) -> TokenSet {
        let mut coords = Vec::with_capacity(self.len() * s * s);
        for oy in 0..out_h.min(self.h * s) {
            let py = oy / s;
            let lo = self.coords.partition_point(|&c| (c as usize) < py * self.w);
            let hi = self
                .coords
                .partition_point(|&c| (c as usize) < (py + 1) * self.w);
            for &c in &self.coords[lo..hi] {
                let px = c as usize % self.w;
                let row = oy * out_w;
                coords.extend(
                    ((px * s).min(out_w)..(px * s + s).min(out_w)).map(|ox| (row + ox) as u32),
                );
            }
        }
        Self::from_raster(out_h, out_w, coords)
    }

    /// The positions active in this set or in `other` (of the same map):
    /// the two ascending lists merged.
    pub fn union(&self, other: &TokenSet) -> TokenSet {
        let n = (self.h * self.w) as u32;
        let (a, b) = (&self.coords, &other.coords);
        let b = &b[..b.partition_point(|&c| c < n)];
        let mut coords = Vec::with_capacity(a.len() + b.len());
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            let (x, y) = (a[i], b[j]);
            coords.push(x.min(y));
            i += usize::from(x <= y);
            j += usize::from(y <= x);
        }
        coords.extend_from_slice(&a[i..]);
        coords.extend_from_slice(&b[j..]);
        Self::from_raster(self.h, self.w, coords)
    }

    /// The set of a stride-`s` layer's output under `rule`.
    pub fn downsample(&self, s: usize, out_h: usize, out_w: usize, rule: StrideRule) -> TokenSet {
        let mut active = vec![false; out_h * out_w];
        let mut found = false;
        for &i in &self.coords {
            let (y, x) = (i as usize / self.w, i as usize % self.w);
            if rule == StrideRule::Centre && (y % s != 0 || x % s != 0) {
                continue;
            }
            let (oy, ox) = (y / s, x / s);
            if oy < out_h && ox < out_w {
                active[oy * out_w + ox] = true;
                found = true;
            }
        }
        // No centre tap active: the output over the first active input stays,
        // so a non-empty set never strides down to nothing.
        if !found {
            if let Some(&i) = self.coords.first() {
                let (oy, ox) = (i as usize / self.w / s, i as usize % self.w / s);
                active[oy.min(out_h - 1) * out_w + ox.min(out_w - 1)] = true;
            }
        }
        let coords = active
            .iter()
            .enumerate()
            .filter(|(_, &a)| a)
            .map(|(i, _)| i as u32)
            .collect();
        Self::from_raster(out_h, out_w, coords)
    }
}

/// `LevelParams` of `tokens.cu`: the GPU twin of [`TokenSet::from_raster`]
/// (`sfx_level0`, from the kept list) and [`TokenSet::downsample`]
/// (`sfx_level`, from the parent level).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LevelParams {
    pub set_in: u64,
    /// A union level's second parent's index map.
    pub set_in2: u64,
    pub list_in: u64,
    pub count_in: u64,
    pub set_out: u64,
    pub list_out: u64,
    pub count_out: u64,
    /// A gate's level (rule 4): the gate's energies over the map.
    pub energies: u64,
    /// Rule 4 on a stream: a `u32` flag per parent position, nonzero where
    /// the held tokens reach (0: none held).
    pub held: u64,
    pub map_h: i32,
    pub map_w: i32,
    pub in_h: i32,
    pub in_w: i32,
    pub stride: i32,
    /// 0 for [`StrideRule::Any`], 1 for [`StrideRule::Centre`], 2 for an
    /// upsampled level ([`TokenSet::upsample`]), 3 for a union
    /// ([`TokenSet::union`]), 4 for a gate's level (`ops::gate`).
    pub rule: i32,
}

// SAFETY: repr(C) addresses and i32s, as in tokens.cu.
unsafe impl KernelArgs for LevelParams {}

/// Level 0 from the kept list.
pub const LEVEL0: Kernel = Kernel {
    family: Family::Tokens,
    name: "sfx_level0",
};
/// A strided level from its parent.
pub const LEVEL: Kernel = Kernel {
    family: Family::Tokens,
    name: "sfx_level",
};

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A random set of an `h × w` map, each position active with probability
    /// `p` (an xorshift, so every run draws the same sets).
    pub(crate) fn random_set(h: usize, w: usize, p: f64, seed: &mut u64) -> TokenSet {
        let coords = (0..(h * w) as u32)
            .filter(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                (*seed % 1000) as f64 / 1000.0 < p
            })
            .collect();
        TokenSet::from_raster(h, w, coords)
    }

    #[test]
    fn upsample_and_union_are_their_definitions_position_by_position() {
        let mut seed = 0x9e3779b97f4a7c15;
        for (h, w) in [(1, 1), (3, 5), (15, 20), (30, 40), (7, 2)] {
            for p in [0.0, 0.05, 0.3, 0.9, 1.0] {
                let a = random_set(h, w, p, &mut seed);
                for s in [1, 2, 3] {
                    // Output maps that fit the parent exactly, crop it, and
                    // overhang it.
                    for (oh, ow) in [
                        (h * s, w * s),
                        (h * s - 1, (w * s).max(2) - 1),
                        (h * s + 1, w * s + 2),
                    ] {
                        let up = a.upsample(s, oh, ow);
                        for y in 0..oh {
                            for x in 0..ow {
                                let want = y / s < h
                                    && x / s < w
                                    && a.index[y / s * w + x / s] != INACTIVE;
                                assert_eq!(
                                    up.index[y * ow + x] != INACTIVE,
                                    want,
                                    "{h}x{w} p {p} s {s} → {oh}x{ow} at ({y}, {x})"
                                );
                            }
                        }
                        assert!(up.coords.windows(2).all(|c| c[0] < c[1]));
                    }
                }
                let b = random_set(h, w, 1.0 - p / 2.0, &mut seed);
                let u = a.union(&b);
                for i in 0..h * w {
                    let want = a.index[i] != INACTIVE || b.index[i] != INACTIVE;
                    assert_eq!(u.index[i] != INACTIVE, want, "{h}x{w} p {p} union at {i}");
                }
                assert!(u.coords.windows(2).all(|c| c[0] < c[1]));
            }
        }
    }
}
