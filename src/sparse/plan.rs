//! A lowered suffix: token-set levels, the rulebooks they need, and ordered steps.

use super::buffers::Buffers;
use super::ops::Op;
use super::rulebook::{Rulebook, Window};
use super::tokens::{StrideRule, TokenSet};
use super::value::Value;
use anyhow::{bail, ensure, Context, Result};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// One resolution of the suffix; level 0 is the energy layer's map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Level {
    /// The level this one was strided from.
    pub parent: Option<usize>,
    /// Stride from the parent.
    pub stride: usize,
    pub h: usize,
    pub w: usize,
}

/// One op applied to value slots.
#[derive(Debug)]
pub struct Step {
    /// The ONNX node it came from (first node, when several were fused).
    pub node: String,
    pub op: Box<dyn Op>,
    pub inputs: Vec<usize>,
    pub output: usize,
}

impl Step {
    /// The op's name, with the activation fused into it (`Conv1x1+Clip`).
    pub fn label(&self) -> String {
        match self.op.fused() {
            Some(a) => format!("{}+{}", self.op.name(), a.name()),
            None => self.op.name().to_string(),
        }
    }
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

/// The suffix, lowered once at load and run on every frame.
#[derive(Debug, Default)]
pub struct Plan {
    pub levels: Vec<Level>,
    pub rules: Vec<RuleKey>,
    pub steps: Vec<Step>,
    /// Name of the tensor held by each slot (slot 0 is the gathered features).
    pub slot_names: Vec<String>,
    /// Level of each slot's tensor, `None` when it is dense.
    pub slot_levels: Vec<Option<usize>>,
    /// What each token-map slot holds at its dropped positions: a fill vector
    /// (one value per channel) from the package, or `None` for zero.
    pub slot_fills: Vec<Option<Vec<f32>>>,
    /// Channels of the energy layer's features.
    pub channels: usize,
    /// How strided layers derive their active sets.
    pub stride_rule: StrideRule,
    /// Slot holding the suffix output.
    pub output: usize,
    /// Every ONNX tensor name the plan computes (aliases included) and its slot.
    pub tensors: BTreeMap<String, usize>,
    /// Every token map by tensor name, with its channels: the tensors a fill
    /// vector may name, and the values it must hold.
    pub fillable: BTreeMap<String, usize>,
    /// Step after which each slot is no longer read.
    last_use: Vec<usize>,
    /// Value buffers recycled from frame to frame.
    buffers: Buffers,
}

impl Plan {
    /// An empty plan whose input is a `c`-channel map of `h × w` tokens.
    pub fn new(input_name: &str, c: usize, h: usize, w: usize) -> Plan {
        Plan {
            levels: vec![Level {
                parent: None,
                stride: 1,
                h,
                w,
            }],
            slot_names: vec![input_name.to_string()],
            slot_levels: vec![Some(0)],
            slot_fills: vec![None],
            channels: c,
            ..Plan::default()
        }
    }

    /// The level a stride-`s` layer on `parent` produces (created once).
    pub fn child_level(&mut self, parent: usize, stride: usize, h: usize, w: usize) -> usize {
        let level = Level {
            parent: Some(parent),
            stride,
            h,
            w,
        };
        if let Some(i) = self.levels.iter().position(|l| *l == level) {
            return i;
        }
        self.levels.push(level);
        self.levels.len() - 1
    }

    /// The index of the rulebook for this window between two levels (created once).
    pub fn rulebook(&mut self, in_level: usize, out_level: usize, window: Window) -> usize {
        let key = RuleKey {
            in_level,
            out_level,
            window,
        };
        if let Some(i) = self.rules.iter().position(|r| *r == key) {
            return i;
        }
        self.rules.push(key);
        self.rules.len() - 1
    }

    /// Adds a slot for a named tensor and returns it.
    pub fn slot(&mut self, name: &str, level: Option<usize>) -> usize {
        self.slot_names.push(name.to_string());
        self.slot_levels.push(level);
        self.slot_fills.push(None);
        self.slot_names.len() - 1
    }

    /// Appends a step; its inputs must already have been produced.
    pub fn push(&mut self, node: &str, op: Box<dyn Op>, inputs: Vec<usize>, output: usize) {
        self.steps.push(Step {
            node: node.to_string(),
            op,
            inputs,
            output,
        });
    }

    /// Marks `output` as the result, fuses activations into the ops that
    /// produce their input, and computes slot lifetimes.
    pub fn finish(&mut self, output: usize) {
        self.output = output;
        self.fuse_activations();
        self.last_use = vec![usize::MAX; self.slot_names.len()];
        for (s, step) in self.steps.iter().enumerate() {
            for &i in &step.inputs {
                self.last_use[i] = s;
            }
        }
        // The output must survive the whole run.
        self.last_use[output] = usize::MAX;
    }

    /// Folds each activation into the conv or linear op before it when that
    /// op's output is read by the activation alone: the activation then runs
    /// inside the op's row loop, on values still in cache, and its step and
    /// buffer disappear. The unread intermediate slot stays unwritten.
    fn fuse_activations(&mut self) {
        let n = self.slot_names.len();
        let mut readers = vec![0usize; n];
        let mut producer: Vec<Option<usize>> = vec![None; n];
        for (s, step) in self.steps.iter().enumerate() {
            step.inputs.iter().for_each(|&i| readers[i] += 1);
            producer[step.output] = Some(s);
        }
        let mut fused = vec![false; self.steps.len()];
        for (s, done) in fused.iter_mut().enumerate() {
            let Some(act) = self.steps[s].op.activation() else {
                continue;
            };
            let src = self.steps[s].inputs[0];
            let Some(p) = producer[src] else { continue };
            if readers[src] != 1 || src == self.output || !self.steps[p].op.fuse_activation(act) {
                continue;
            }
            let out = self.steps[s].output;
            self.steps[p].output = out;
            producer[out] = Some(p);
            *done = true;
        }
        let mut s = 0;
        self.steps.retain(|_| {
            s += 1;
            !fused[s - 1]
        });
    }

    /// The fill vector the output holds at dropped positions, if it is a
    /// token map with one.
    pub fn output_fill(&self) -> Option<&[f32]> {
        self.slot_fills[self.output].as_deref()
    }

    /// How many tensors of the suffix hold a fill vector at dropped positions.
    pub fn fill_count(&self) -> usize {
        self.slot_fills.iter().filter(|f| f.is_some()).count()
    }

    /// Buffers the suffix has allocated since load; constant once frames of
    /// similar keep ratios have passed (the rest are recycled).
    pub fn buffers_allocated(&self) -> u64 {
        self.buffers.fresh()
    }

    /// Every level's token set for the kept raster indices.
    pub fn sets(&self, kept: &[u32]) -> Vec<TokenSet> {
        let mut sets: Vec<TokenSet> = Vec::with_capacity(self.levels.len());
        for l in &self.levels {
            let set = match l.parent {
                None => TokenSet::from_raster(l.h, l.w, kept.to_vec()),
                Some(p) => sets[p].downsample(l.stride, l.h, l.w, self.stride_rule),
            };
            sets.push(set);
        }
        sets
    }

    /// Builds every level's token set and every rulebook from the kept raster indices.
    pub fn frame(&self, kept: &[u32]) -> Frame {
        let sets = self.sets(kept);
        let rulebooks = self
            .rules
            .iter()
            .map(|r| Rulebook::build(&sets[r.in_level], &sets[r.out_level], r.window))
            .collect();
        Frame { sets, rulebooks }
    }

    /// Active tokens per level for the kept raster indices (no rulebooks built).
    pub fn token_counts(&self, kept: &[u32]) -> Vec<usize> {
        self.sets(kept).iter().map(TokenSet::len).collect()
    }

    /// Multiply-accumulates of the whole suffix for the given tokens per level.
    pub fn cost(&self, tokens: &[usize]) -> u64 {
        self.steps.iter().map(|s| s.op.cost(tokens)).sum()
    }

    /// Multiply-accumulates one frame spends in the suffix: the sparse suffix on
    /// `kept`, plus the dense suffix when the frame fell back.
    pub fn spent(&self, kept: &[u32], fell_back: bool) -> u64 {
        let sparse = self.cost(&self.token_counts(kept));
        if fell_back {
            sparse + self.dense_cost()
        } else {
            sparse
        }
    }

    /// Multiply-accumulates with every token of every level active.
    pub fn dense_cost(&self) -> u64 {
        let full: Vec<usize> = self.levels.iter().map(|l| l.h * l.w).collect();
        self.cost(&full)
    }

    /// Fails unless `values` gathered features are `kept` rows of the cut's channels.
    pub fn check_features(&self, kept: usize, values: usize) -> Result<()> {
        ensure!(
            values == kept * self.channels,
            "gathered features hold {values} values, expected {kept} tokens × {} channels",
            self.channels
        );
        Ok(())
    }

    /// Runs the suffix on gathered features (`kept.len() × C`). Returns the
    /// output and the frame (for scattering a token output back to a map).
    pub fn run(&self, kept: &[u32], features: Vec<f32>) -> Result<(Value, Frame)> {
        self.run_inner(kept, features, None)
    }

    /// [`Plan::run`], also adding each step's wall time (ms) to `times`
    /// (one entry per step, then one for the token sets and rulebooks).
    pub fn run_timed(
        &self,
        kept: &[u32],
        features: Vec<f32>,
        times: &mut Vec<f64>,
    ) -> Result<(Value, Frame)> {
        times.resize(self.steps.len() + 1, 0.0);
        self.run_inner(kept, features, Some(times))
    }

    fn run_inner(
        &self,
        kept: &[u32],
        features: Vec<f32>,
        mut times: Option<&mut Vec<f64>>,
    ) -> Result<(Value, Frame)> {
        let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
        self.check_features(kept.len(), features.len())?;
        let t = std::time::Instant::now();
        let frame = self.frame(kept);
        if let Some(times) = times.as_deref_mut() {
            times[self.steps.len()] += ms(t);
        }
        let mut slots: Vec<Option<Value>> = vec![None; self.slot_names.len()];
        slots[0] = Some(Value::Tokens {
            level: 0,
            c: self.channels,
            data: features,
        });
        for (s, step) in self.steps.iter().enumerate() {
            let t = std::time::Instant::now();
            // An elementwise op gets the inputs it reads for the last time (and
            // only once) owned, to work in place; other ops borrow them.
            let in_place = step.op.in_place();
            let mut owned: Vec<Option<Value>> = step
                .inputs
                .iter()
                .map(|&i| {
                    let once = step.inputs.iter().filter(|&&j| j == i).count() == 1;
                    if in_place && self.last_use[i] == s && once {
                        slots[i].take()
                    } else {
                        None
                    }
                })
                .collect();
            let mut args: Vec<Cow<'_, Value>> = Vec::with_capacity(step.inputs.len());
            for (k, &i) in step.inputs.iter().enumerate() {
                match owned[k].take() {
                    Some(v) => args.push(Cow::Owned(v)),
                    None => match &slots[i] {
                        Some(v) => args.push(Cow::Borrowed(v)),
                        None => bail!(
                            "internal: slot {} read before it was written",
                            self.slot_names[i]
                        ),
                    },
                }
            }
            let out = step
                .op
                .eval(args, &frame, &self.buffers)
                .with_context(|| format!("sparse {} at node {}", step.op.name(), step.node))?;
            slots[step.output] = Some(out);
            for &i in &step.inputs {
                if self.last_use[i] == s {
                    if let Some(v) = slots[i].take() {
                        self.buffers.give(v.into_data());
                    }
                }
            }
            if let Some(times) = times.as_deref_mut() {
                times[s] += ms(t);
            }
        }
        let out = slots[self.output]
            .take()
            .context("internal: suffix output never written")?;
        Ok((out, frame))
    }
}
