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
    /// `(y, x)` is active when `(y / s, x / s)` is.
    pub fn upsample(&self, s: usize, out_h: usize, out_w: usize) -> TokenSet {
        let coords = (0..out_h * out_w)
            .filter(|&i| {
                let (y, x) = (i / out_w / s, i % out_w / s);
                y < self.h && x < self.w && self.index[y * self.w + x] != INACTIVE
            })
            .map(|i| i as u32)
            .collect();
        Self::from_raster(out_h, out_w, coords)
    }

    /// The positions active in this set or in `other` (of the same map).
    pub fn union(&self, other: &TokenSet) -> TokenSet {
        let coords = (0..self.h * self.w)
            .filter(|&i| {
                self.index[i] != INACTIVE || other.index.get(i).is_some_and(|&t| t != INACTIVE)
            })
            .map(|i| i as u32)
            .collect();
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
    pub map_h: i32,
    pub map_w: i32,
    pub in_h: i32,
    pub in_w: i32,
    pub stride: i32,
    /// 0 for [`StrideRule::Any`], 1 for [`StrideRule::Centre`], 2 for an
    /// upsampled level ([`TokenSet::upsample`]), 3 for a union
    /// ([`TokenSet::union`]).
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
