//! One frame's token sets and rulebooks, and the levels and rulebook keys
//! they are built from (fixed at load). Ops read a [`Frame`]; the plan
//! builds it.

use super::rulebook::{Rulebook, Window};
use super::tokens::{StrideRule, TokenSet};
use rayon::prelude::*;

/// One resolution of the suffix; level 0 is the energy layer's map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Level {
    /// The level this one was strided from.
    pub parent: Option<usize>,
    /// Stride from the parent.
    pub stride: usize,
    pub h: usize,
    pub w: usize,
    /// The parent's map upsampled by `stride` (a transposed conv's output),
    /// not strided down: position `(y, x)` is active when the parent's
    /// `(y / stride, x / stride)` is.
    pub up: bool,
    /// With a second level of the same size: this level is the union of
    /// the parent's set and that one's (an Add of two maps reached by
    /// different paths, an upsampled map and a lateral).
    pub merge: Option<usize>,
}

/// A rulebook the frame must build: between two levels for one window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleKey {
    pub in_level: usize,
    pub out_level: usize,
    pub window: Window,
}

/// Per-frame state: the active set of every level and the rulebooks over them.
#[derive(Debug)]
pub struct Frame {
    pub sets: Vec<TokenSet>,
    pub rulebooks: Vec<Rulebook>,
}

impl Frame {
    /// Every level's token set for the kept raster indices of level 0.
    pub fn sets(levels: &[Level], rule: StrideRule, kept: &[u32]) -> Vec<TokenSet> {
        let mut sets: Vec<TokenSet> = Vec::with_capacity(levels.len());
        for l in levels {
            let set = match l.parent {
                None => TokenSet::from_raster(l.h, l.w, kept.to_vec()),
                Some(p) if l.merge.is_some() => sets[p].union(&sets[l.merge.unwrap_or(p)]),
                Some(p) if l.up => sets[p].upsample(l.stride, l.h, l.w),
                Some(p) => sets[p].downsample(l.stride, l.h, l.w, rule),
            };
            sets.push(set);
        }
        sets
    }

    /// Every level's token set and every rulebook for the kept raster indices.
    pub fn build(levels: &[Level], rules: &[RuleKey], rule: StrideRule, kept: &[u32]) -> Frame {
        let sets = Frame::sets(levels, rule, kept);
        // Rulebooks are independent: on the pool's threads when there is
        // one (never rayon's global pool: `--threads 1` means one thread).
        let build = |r: &RuleKey| Rulebook::build(&sets[r.in_level], &sets[r.out_level], r.window);
        let rulebooks = if crate::threads::pool_threads() > 1 {
            rules.par_iter().map(build).collect()
        } else {
            rules.iter().map(build).collect()
        };
        Frame { sets, rulebooks }
    }

    /// Active tokens per level.
    pub fn counts(&self) -> Vec<usize> {
        self.sets.iter().map(TokenSet::len).collect()
    }
}
