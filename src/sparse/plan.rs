//! A lowered suffix: token-set levels, the rulebooks they need, ordered
//! steps, and the schedule both executors follow (slot lifetimes, fused
//! activations and residual adds), computed once at load.

use super::buffers::Buffers;
pub use super::frame::{Frame, Level, RuleKey};
pub use super::ops::gate::GateOffsets;
use super::ops::Lowered;
pub use super::ops::Step;
use super::tokens::{StrideRule, TokenSet};
use super::value::{Shape, Value};
use anyhow::{bail, ensure, Context, Result};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// The suffix, lowered once at load and run on every frame.
#[derive(Debug, Default)]
pub struct Plan {
    pub levels: Vec<Level>,
    pub rules: Vec<RuleKey>,
    pub steps: Vec<Step>,
    /// Name of the tensor held by each slot (slot 0 is the gathered features).
    pub slot_names: Vec<String>,
    /// Shape of each slot's tensor.
    pub slot_shapes: Vec<Shape>,
    /// What each token-map slot holds at its dropped positions: a fill vector
    /// (one value per channel) from the package, or `None` for zero.
    pub slot_fills: Vec<Option<Vec<f32>>>,
    /// Channels of the energy layer's features.
    pub channels: usize,
    /// How strided layers derive their active sets.
    pub stride_rule: StrideRule,
    /// Dense input slots the prefix's maps fill every frame (the taps, in
    /// the order the prefix hands them over).
    pub taps: Vec<usize>,
    /// Slots holding the suffix outputs, in the graph's output order.
    pub outputs: Vec<usize>,
    /// Every ONNX tensor name the plan computes (aliases included) and its slot.
    pub tensors: BTreeMap<String, usize>,
    /// Every token map by tensor name, with its channels: the tensors a fill
    /// vector may name, and the values it must hold.
    pub fillable: BTreeMap<String, usize>,
    /// Step after which each slot is no longer read (`usize::MAX` for the
    /// outputs and for slots never read).
    pub last_use: Vec<usize>,
    /// For each step, the other operand of an Add that may run in the
    /// step's own kernel (see [`Plan::schedule`]); the GPU executor fuses
    /// it.
    pub residual: Vec<Option<usize>>,
    /// Value buffers recycled from frame to frame.
    buffers: Buffers,
}

/// What a stream's frame changes in a gated suffix's run on a device: each
/// level's held footprint (none when nothing is held) and each gate's shift,
/// by the gate's number.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Holding {
    pub held: Vec<TokenSet>,
    pub shifts: Vec<f32>,
}

impl Holding {
    /// True when it changes nothing: nothing held, every shift zero.
    pub fn is_none(&self) -> bool {
        self.held.iter().all(|s| s.coords.is_empty()) && self.shifts.iter().all(|&s| s == 0.0)
    }
}

impl Plan {
    /// A frame's [`Holding`] for the raster indices `held` of level 0 (as
    /// [`Plan::run_holding`] takes them) at `offsets`.
    pub fn holding(&self, held: &[u32], offsets: GateOffsets) -> Holding {
        let mut shifts = vec![0.0; self.gates().count()];
        for g in self.gates() {
            if offsets == GateOffsets::Stream {
                shifts[g.gate] = g.shift;
            }
        }
        Holding {
            held: if held.is_empty() || shifts.is_empty() {
                Vec::new()
            } else {
                Frame::footprint(&self.levels, self.stride_rule, held)
            },
            shifts,
        }
    }

    /// The plan of a finished lowering whose results are `outputs`, on
    /// `channels`-wide gathered features and the prefix maps in `taps`.
    pub fn new(lowered: Lowered, channels: usize, taps: Vec<usize>, outputs: Vec<usize>) -> Plan {
        let mut plan = Plan {
            levels: lowered.levels,
            rules: lowered.rules,
            steps: lowered.steps,
            slot_names: lowered.slot_names,
            slot_shapes: lowered.slot_shapes,
            slot_fills: lowered.slot_fills,
            channels,
            taps,
            outputs,
            ..Plan::default()
        };
        for (name, t) in lowered.tensors {
            if let Shape::Tokens { c, .. } = t.shape {
                plan.fillable.insert(name.clone(), c);
            }
            plan.tensors.insert(name, t.slot);
        }
        plan.schedule();
        plan
    }

    /// The one pass both executors' schedules come from: fuses each
    /// activation into the op before it, then computes each slot's last
    /// reader and which Adds may run in the kernel of the conv before them.
    fn schedule(&mut self) {
        self.fuse_activations();
        self.last_use = vec![usize::MAX; self.slot_names.len()];
        for (s, step) in self.steps.iter().enumerate() {
            for &i in &step.inputs {
                self.last_use[i] = s;
            }
        }
        // The outputs must survive the whole run.
        for &o in &self.outputs {
            self.last_use[o] = usize::MAX;
        }
        self.residual = self.fusable_adds();
    }

    /// For each step, the other operand of an Add that may run in its
    /// kernel: the step can take a residual (a conv), its output is read
    /// only by the next step, and that step is an Add of it and another
    /// value. (Whether the other value holds the same token rows is known
    /// when the GPU launches are recorded; if not, the Add runs on its own.)
    /// In MobileNet-style blocks this is every residual add.
    fn fusable_adds(&self) -> Vec<Option<usize>> {
        let readers = self.readers();
        self.steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let next = self.steps.get(i + 1)?;
                if !s.op.takes_residual()
                    || !next.op.is_add()
                    || readers[s.output] != 1
                    || self.outputs.contains(&s.output)
                {
                    return None;
                }
                match next.inputs[..] {
                    [a, b] if a == s.output => Some(b),
                    [a, b] if b == s.output => Some(a),
                    _ => None,
                }
            })
            .collect()
    }

    /// How many steps read each slot.
    fn readers(&self) -> Vec<usize> {
        let mut readers = vec![0usize; self.slot_names.len()];
        for s in &self.steps {
            s.inputs.iter().for_each(|&i| readers[i] += 1);
        }
        readers
    }

    /// Folds each activation into the conv or linear op before it when that
    /// op's output is read by the activation alone: the activation then runs
    /// inside the op's row loop, on values still in cache, and its step and
    /// buffer disappear. The unread intermediate slot stays unwritten.
    fn fuse_activations(&mut self) {
        let readers = self.readers();
        let mut producer: Vec<Option<usize>> = vec![None; self.slot_names.len()];
        for (s, step) in self.steps.iter().enumerate() {
            producer[step.output] = Some(s);
        }
        let mut fused = vec![false; self.steps.len()];
        for (s, done) in fused.iter_mut().enumerate() {
            let Some(act) = self.steps[s].op.activation() else {
                continue;
            };
            let src = self.steps[s].inputs[0];
            let Some(p) = producer[src] else { continue };
            if readers[src] != 1 || self.outputs.contains(&src) {
                continue;
            }
            let Some(op) = self.steps[p].op.with_activation(act) else {
                continue;
            };
            self.steps[p].op = op;
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

    /// The suffix's gates (its later energy layers), in the order they run.
    pub fn gates(&self) -> impl Iterator<Item = &super::ops::Gate> {
        self.steps.iter().filter_map(|s| s.op.gate())
    }

    /// Moves the unary costs of the gate at ONNX node `node` by `shift`
    /// (a stream's operating point, manifest `track.gate_offsets`).
    pub fn set_gate_shift(&mut self, node: &str, shift: f32) -> Result<()> {
        ensure!(
            shift.is_finite(),
            "gate '{node}': offset {shift} is not finite"
        );
        let Some(at) = self
            .steps
            .iter()
            .position(|s| s.node == node && s.op.gate().is_some())
        else {
            let names: Vec<&str> = self.gates_named().map(|(n, _)| n).collect();
            bail!("no gate '{node}' in the suffix (its gates: {names:?})");
        };
        let step = &mut self.steps[at];
        let mut gate = step.op.gate().cloned().context("internal: a gate step")?;
        gate.shift = shift;
        step.op = std::sync::Arc::new(gate);
        Ok(())
    }

    /// Each gate with the ONNX node it came from.
    pub fn gates_named(&self) -> impl Iterator<Item = (&str, &super::ops::Gate)> {
        self.steps
            .iter()
            .filter_map(|s| Some((s.node.as_str(), s.op.gate()?)))
    }

    /// The fill vector output `k` holds at dropped positions, if it is a
    /// token map with one.
    pub fn output_fill(&self, k: usize) -> Option<&[f32]> {
        self.slot_fills[self.outputs[k]].as_deref()
    }

    /// The ONNX shape of each output: `[1, C, h, w]` for a token map.
    pub fn output_shapes(&self) -> Vec<Vec<usize>> {
        self.outputs
            .iter()
            .map(|&o| match &self.slot_shapes[o] {
                Shape::Tokens { level, c } => {
                    vec![1, *c, self.levels[*level].h, self.levels[*level].w]
                }
                Shape::Dense { shape } => shape.clone(),
            })
            .collect()
    }

    /// The outputs as dense tensors, flattened one after another in the
    /// graph's output order: a token map scattered over `sets`, holding its
    /// fill vector or zero at dropped positions (where a detector's map
    /// then says "nothing here").
    pub fn dense_outputs(&self, values: &[Value], sets: &[TokenSet]) -> Vec<f32> {
        let mut out = Vec::new();
        for (k, v) in values.iter().enumerate() {
            out.extend(v.to_dense(sets, self.output_fill(k)).1);
        }
        out
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

    /// Every level's token set for the kept raster indices. Behind a gate a
    /// set is known only once the suffix has run: there it holds no tokens
    /// (use the frame [`Plan::run`] returns).
    pub fn sets(&self, kept: &[u32]) -> Vec<TokenSet> {
        Frame::sets(&self.levels, self.stride_rule, kept)
    }

    /// Builds every level's token set and every rulebook from the kept
    /// raster indices, those behind a gate excepted (the run builds them).
    pub fn frame(&self, kept: &[u32]) -> Frame {
        Frame::build(&self.levels, &self.rules, self.stride_rule, kept)
    }

    /// Active tokens per level for the kept raster indices (no rulebooks
    /// built); behind a gate, none (see [`Plan::sets`]).
    pub fn token_counts(&self, kept: &[u32]) -> Vec<usize> {
        self.sets(kept).iter().map(TokenSet::len).collect()
    }

    /// Multiply-accumulates of the whole suffix for the given tokens per level.
    pub fn cost(&self, tokens: &[usize]) -> u64 {
        self.steps.iter().map(|s| s.op.cost(tokens)).sum()
    }

    /// Multiply-accumulates one frame spends in the suffix, from the active
    /// tokens per level the suffix ran: the sparse suffix, plus the dense
    /// suffix when the frame fell back.
    pub fn spent(&self, tokens: &[usize], fell_back: bool) -> u64 {
        let sparse = self.cost(tokens);
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

    /// Fails unless `taps` are the prefix maps the suffix reads, by count and size.
    pub fn check_taps(&self, taps: &[Vec<f32>]) -> Result<()> {
        ensure!(
            taps.len() == self.taps.len(),
            "{} prefix maps given, the suffix reads {}",
            taps.len(),
            self.taps.len()
        );
        for (t, &slot) in taps.iter().zip(&self.taps) {
            let want = self.slot_shapes[slot].len(&[]);
            ensure!(
                t.len() == want,
                "prefix map '{}' holds {} values, expected {want}",
                self.slot_names[slot],
                t.len()
            );
        }
        Ok(())
    }

    /// Runs the suffix on gathered features (`kept.len() × C`) and the
    /// prefix maps it reads (dense, in [`Plan::taps`] order). Returns the
    /// outputs and the frame (for scattering a token output back to a map).
    pub fn run(
        &self,
        kept: &[u32],
        features: Vec<f32>,
        taps: Vec<Vec<f32>>,
    ) -> Result<(Vec<Value>, Frame)> {
        self.run_inner(kept, &[], &[], GateOffsets::Stream, features, taps, None)
    }

    /// [`Plan::run`] on a stream: every gate also keeps the raster indices
    /// `held` of level 0 (ascending; where the last frame's faces were, a
    /// subset of `kept`) at its own resolution, whatever its energies, and
    /// runs at `offsets`.
    pub fn run_holding(
        &self,
        kept: &[u32],
        held: &[u32],
        offsets: GateOffsets,
        features: Vec<f32>,
        taps: Vec<Vec<f32>>,
    ) -> Result<(Vec<Value>, Frame)> {
        self.run_stream(kept, held, &[], offsets, features, taps)
    }

    /// [`Plan::run_holding`] with the raster indices `fresh` of level 0
    /// (ascending; manifest `track.new_tokens`): at [`GateOffsets::Stream`]
    /// a moved gate also keeps, within their footprint, what it keeps at
    /// the package's own offset.
    #[allow(clippy::too_many_arguments)]
    pub fn run_stream(
        &self,
        kept: &[u32],
        held: &[u32],
        fresh: &[u32],
        offsets: GateOffsets,
        features: Vec<f32>,
        taps: Vec<Vec<f32>>,
    ) -> Result<(Vec<Value>, Frame)> {
        self.run_inner(kept, held, fresh, offsets, features, taps, None)
    }

    /// [`Plan::run`], also adding each step's wall time (ms) to `times`
    /// (one entry per step, then one for the token sets and rulebooks).
    pub fn run_timed(
        &self,
        kept: &[u32],
        features: Vec<f32>,
        taps: Vec<Vec<f32>>,
        times: &mut Vec<f64>,
    ) -> Result<(Vec<Value>, Frame)> {
        times.resize(self.steps.len() + 1, 0.0);
        self.run_inner(
            kept,
            &[],
            &[],
            GateOffsets::Stream,
            features,
            taps,
            Some(times),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn run_inner(
        &self,
        kept: &[u32],
        held: &[u32],
        fresh: &[u32],
        offsets: GateOffsets,
        features: Vec<f32>,
        taps: Vec<Vec<f32>>,
        mut times: Option<&mut Vec<f64>>,
    ) -> Result<(Vec<Value>, Frame)> {
        let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
        self.check_features(kept.len(), features.len())?;
        self.check_taps(&taps)?;
        let t = std::time::Instant::now();
        let mut frame = self.frame(kept);
        if !held.is_empty() && self.gates().next().is_some() {
            frame.held = Frame::footprint(&self.levels, self.stride_rule, held);
        }
        if !fresh.is_empty()
            && offsets == GateOffsets::Stream
            && self.gates().any(|g| g.shift != 0.0)
        {
            frame.fresh = Frame::footprint(&self.levels, self.stride_rule, fresh);
        }
        if let Some(times) = times.as_deref_mut() {
            times[self.steps.len()] += ms(t);
        }
        let mut slots: Vec<Option<Value>> = vec![None; self.slot_names.len()];
        slots[0] = Some(Value::tokens(0, self.channels, features));
        for (map, &slot) in taps.into_iter().zip(&self.taps) {
            slots[slot] = Some(Value {
                shape: self.slot_shapes[slot].clone(),
                data: map,
            });
        }
        for (s, step) in self.steps.iter().enumerate() {
            let t = std::time::Instant::now();
            if let Some(gate) = step.op.gate() {
                let x = slots[step.inputs[0]]
                    .as_ref()
                    .context("internal: a gate's input read before it was written")?;
                let kept = gate
                    .keeps(x, &frame, offsets)
                    .with_context(|| format!("second energy layer at node {}", step.node))?;
                // The sets and rulebooks behind the gate count as the
                // frame's sets and rulebooks, not as the gate.
                let built = std::time::Instant::now();
                frame.open_gate(
                    &self.levels,
                    &self.rules,
                    self.stride_rule,
                    gate.gate,
                    &kept,
                );
                if let Some(times) = times.as_deref_mut() {
                    let sets = ms(built);
                    times[self.steps.len()] += sets;
                    times[s] -= sets;
                }
            }
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
        let mut outputs: Vec<Value> = Vec::with_capacity(self.outputs.len());
        for (k, &o) in self.outputs.iter().enumerate() {
            let v = match slots[o].take() {
                Some(v) => v,
                // A tensor named twice among the outputs.
                None => match self.outputs[..k].iter().position(|&p| p == o) {
                    Some(first) => outputs[first].clone(),
                    None => bail!("internal: suffix output never written"),
                },
            };
            outputs.push(v);
        }
        Ok((outputs, frame))
    }
}
