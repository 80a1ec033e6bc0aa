//! Active token sets: which positions of a map are computed.

/// Marks a position with no active token in [`TokenSet::index`].
pub const INACTIVE: u32 = u32::MAX;

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

    /// The set of a stride-`s` layer's output: output `(oy, ox)` is active when
    /// any input in rows `[s·oy, s·oy + s)` and columns `[s·ox, s·ox + s)` is.
    pub fn downsample(&self, s: usize, out_h: usize, out_w: usize) -> TokenSet {
        let mut active = vec![false; out_h * out_w];
        for &i in &self.coords {
            let (y, x) = (i as usize / self.w, i as usize % self.w);
            let (oy, ox) = (y / s, x / s);
            if oy < out_h && ox < out_w {
                active[oy * out_w + ox] = true;
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
