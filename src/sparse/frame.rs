//! One frame's token sets and rulebooks, and the levels and rulebook keys
//! they are built from (fixed at load). Ops read a [`Frame`]; the plan
//! builds it: every set from the kept tokens before the first step, except
//! the sets behind a gate (a second energy layer inside the suffix), built
//! when the gate has run.

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
    /// A gate's narrowing of the parent's set (the gate's number in the
    /// suffix): the parent's positions whose energy under that gate is
    /// negative, known only once the gate has run.
    pub gate: Option<usize>,
}

/// A rulebook the frame must build: between two levels for one window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleKey {
    pub in_level: usize,
    pub out_level: usize,
    pub window: Window,
}

/// The placeholder of a rulebook not built (behind a gate, or on a device).
fn unbuilt() -> Rulebook {
    Rulebook {
        taps: 0,
        table: Vec::new(),
    }
}

/// Per-frame state: the active set of every level and the rulebooks over
/// them. Behind a gate that has not run yet, a level's set and the
/// rulebooks reading it are empty placeholders.
#[derive(Debug)]
pub struct Frame {
    pub sets: Vec<TokenSet>,
    pub rulebooks: Vec<Rulebook>,
    /// The held tokens' footprint at every level (empty: none held): what
    /// each gate keeps whatever its energies say ([`Frame::footprint`]).
    pub held: Vec<TokenSet>,
    /// The new tokens' footprint at every level (empty: none): where a
    /// moved gate also keeps its choice at the package's own offset
    /// (manifest `track.new_tokens`).
    pub fresh: Vec<TokenSet>,
    /// Levels whose sets are not built yet.
    pending: Vec<bool>,
    /// Rulebooks not built yet.
    rules_pending: Vec<bool>,
}

impl Frame {
    /// Every level's token set for the kept raster indices of level 0; the
    /// levels behind a gate hold no tokens (their sets come from the run).
    pub fn sets(levels: &[Level], rule: StrideRule, kept: &[u32]) -> Vec<TokenSet> {
        let mut f = Frame::placeholders(levels, &[]);
        f.resolve(levels, rule, Some(kept), None);
        f.sets
    }

    /// The sets of level 0's raster indices `held` at every level, as if
    /// every gate kept all it reads: where a stream's last faces reach at
    /// each resolution, by the levels' own rules.
    pub fn footprint(levels: &[Level], rule: StrideRule, held: &[u32]) -> Vec<TokenSet> {
        let mut f = Frame::placeholders(levels, &[]);
        f.resolve(levels, rule, Some(held), None);
        // A gate's level pending over a built parent: open it on all of it.
        while let Some((g, p)) = levels.iter().enumerate().find_map(|(i, l)| {
            let (g, p) = (l.gate?, l.parent?);
            (f.pending[i] && !f.pending[p]).then_some((g, p))
        }) {
            let all = f.sets[p].coords.clone();
            f.resolve(levels, rule, None, Some((g, &all)));
        }
        f.sets
    }

    /// Every level's token set and every rulebook for the kept raster
    /// indices, as far as no gate stands before them.
    pub fn build(levels: &[Level], rules: &[RuleKey], rule: StrideRule, kept: &[u32]) -> Frame {
        let mut f = Frame::placeholders(levels, rules);
        f.resolve(levels, rule, Some(kept), None);
        f.build_rulebooks(rules);
        f
    }

    /// Builds what gate `gate` was holding back, now that it keeps the
    /// raster indices `kept` of its level (ascending).
    pub fn open_gate(
        &mut self,
        levels: &[Level],
        rules: &[RuleKey],
        rule: StrideRule,
        gate: usize,
        kept: &[u32],
    ) {
        self.resolve(levels, rule, None, Some((gate, kept)));
        self.build_rulebooks(rules);
    }

    /// A frame whose every set and rulebook is built (elsewhere: by the
    /// GPU's kernels).
    pub fn complete(sets: Vec<TokenSet>, rulebooks: Vec<Rulebook>) -> Frame {
        Frame {
            pending: vec![false; sets.len()],
            rules_pending: vec![false; rulebooks.len()],
            sets,
            rulebooks,
            held: Vec::new(),
            fresh: Vec::new(),
        }
    }

    /// A frame of these sets (built elsewhere: by the GPU's kernels) whose
    /// `rules` rulebooks stay on the device.
    pub fn with_sets(sets: Vec<TokenSet>, rules: usize) -> Frame {
        Frame {
            pending: vec![false; sets.len()],
            rules_pending: vec![true; rules],
            sets,
            rulebooks: (0..rules).map(|_| unbuilt()).collect(),
            held: Vec::new(),
            fresh: Vec::new(),
        }
    }

    /// True when the set of level `l` is built.
    pub fn has(&self, l: usize) -> bool {
        !self.pending[l]
    }

    fn placeholders(levels: &[Level], rules: &[RuleKey]) -> Frame {
        let empty = |l: &Level| TokenSet {
            h: l.h,
            w: l.w,
            coords: Vec::new(),
            index: Vec::new(),
        };
        Frame {
            sets: levels.iter().map(empty).collect(),
            rulebooks: rules.iter().map(|_| unbuilt()).collect(),
            pending: vec![true; levels.len()],
            rules_pending: vec![true; rules.len()],
            held: Vec::new(),
            fresh: Vec::new(),
        }
    }

    /// Builds every pending level whose inputs are known: level 0 from
    /// `kept`, a gate's level from `gate` when it is that gate's, the rest
    /// from their parents.
    fn resolve(
        &mut self,
        levels: &[Level],
        rule: StrideRule,
        kept: Option<&[u32]>,
        gate: Option<(usize, &[u32])>,
    ) {
        for (i, l) in levels.iter().enumerate() {
            if !self.pending[i] {
                continue;
            }
            let set = match (l.parent, l.gate) {
                (None, _) => match kept {
                    Some(k) => TokenSet::from_raster(l.h, l.w, k.to_vec()),
                    None => continue,
                },
                (Some(_), Some(g)) => match gate {
                    Some((k, list)) if k == g => TokenSet::from_raster(l.h, l.w, list.to_vec()),
                    _ => continue,
                },
                (Some(p), None) => {
                    if self.pending[p] || l.merge.is_some_and(|q| self.pending[q]) {
                        continue;
                    }
                    let sets = &self.sets;
                    match l.merge {
                        Some(q) => sets[p].union(&sets[q]),
                        None if l.up => sets[p].upsample(l.stride, l.h, l.w),
                        None => sets[p].downsample(l.stride, l.h, l.w, rule),
                    }
                }
            };
            self.sets[i] = set;
            self.pending[i] = false;
        }
    }

    /// Builds every pending rulebook whose two levels are built.
    fn build_rulebooks(&mut self, rules: &[RuleKey]) {
        let ready: Vec<usize> = (0..rules.len())
            .filter(|&r| {
                self.rules_pending[r]
                    && !self.pending[rules[r].in_level]
                    && !self.pending[rules[r].out_level]
            })
            .collect();
        let sets = &self.sets;
        let build = |&r: &usize| {
            let k = &rules[r];
            Rulebook::build(&sets[k.in_level], &sets[k.out_level], k.window)
        };
        // Rulebooks are independent: on the pool's threads when there is
        // one (never rayon's global pool: `--threads 1` means one thread).
        let built: Vec<Rulebook> = if crate::threads::pool_threads() > 1 {
            ready.par_iter().map(build).collect()
        } else {
            ready.iter().map(build).collect()
        };
        for (r, rb) in ready.into_iter().zip(built) {
            self.rulebooks[r] = rb;
            self.rules_pending[r] = false;
        }
    }

    /// Active tokens per level.
    pub fn counts(&self) -> Vec<usize> {
        self.sets.iter().map(TokenSet::len).collect()
    }
}
