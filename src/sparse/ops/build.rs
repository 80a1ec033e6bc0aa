//! What an op's ONNX builder works on: the suffix lowered so far (levels,
//! rulebook keys, value slots, steps) and the node being lowered, with the
//! look-ups every builder needs (computed inputs, constant inputs, the next
//! node to fold). `sparse::lower` walks the graph and calls the builders.

use super::{Op, Step};
use crate::onnx::{node_name, Constants};
use crate::sparse::frame::{Level, RuleKey};
use crate::sparse::rulebook::Window;
use crate::sparse::value::Shape;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::sync::Arc;
use tract_onnx::pb::NodeProto;

/// A computed tensor while lowering: its value slot and shape.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub slot: usize,
    pub shape: Shape,
}

/// The suffix as lowered so far.
#[derive(Debug, Default)]
pub struct Lowered {
    pub levels: Vec<Level>,
    pub rules: Vec<RuleKey>,
    pub steps: Vec<Step>,
    /// Name of the tensor held by each slot (slot 0: the gathered features).
    pub slot_names: Vec<String>,
    /// Shape of each slot's tensor.
    pub slot_shapes: Vec<Shape>,
    /// Each slot's fill vector, when the package gives one.
    pub slot_fills: Vec<Option<Vec<f32>>>,
    /// Every tensor computed so far (aliases included), by ONNX name.
    pub tensors: HashMap<String, Tensor>,
}

impl Lowered {
    /// The level a stride-`s` layer on `parent` produces (created once).
    pub fn child_level(&mut self, parent: usize, stride: usize, h: usize, w: usize) -> usize {
        self.level(Level {
            parent: Some(parent),
            stride,
            h,
            w,
            up: false,
            merge: None,
            gate: None,
        })
    }

    /// The level a transposed conv of stride `s` on `parent` produces: the
    /// parent's map upsampled (created once).
    pub fn up_level(&mut self, parent: usize, stride: usize, h: usize, w: usize) -> usize {
        self.level(Level {
            parent: Some(parent),
            stride,
            h,
            w,
            up: true,
            merge: None,
            gate: None,
        })
    }

    /// The level whose set is the union of two levels' sets of the same
    /// map size (created once, whichever order they come in).
    pub fn union_level(&mut self, a: usize, b: usize) -> usize {
        let (a, b) = (a.min(b), a.max(b));
        let (h, w) = (self.levels[a].h, self.levels[a].w);
        self.level(Level {
            parent: Some(a),
            stride: 1,
            h,
            w,
            up: false,
            merge: Some(b),
            gate: None,
        })
    }

    /// The level of the next gate on `parent`: a subset of its set, known
    /// once the gate has run. Its gate number and the level.
    pub fn gate_level(&mut self, parent: usize) -> (usize, usize) {
        let gate = self.levels.iter().filter(|l| l.gate.is_some()).count();
        let (h, w) = (self.levels[parent].h, self.levels[parent].w);
        let level = self.level(Level {
            parent: Some(parent),
            stride: 1,
            h,
            w,
            up: false,
            merge: None,
            gate: Some(gate),
        });
        (gate, level)
    }

    fn level(&mut self, level: Level) -> usize {
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
    pub fn slot(&mut self, name: &str, shape: Shape) -> usize {
        self.slot_names.push(name.to_string());
        self.slot_shapes.push(shape);
        self.slot_fills.push(None);
        self.slot_names.len() - 1
    }
}

/// One ONNX node being lowered.
pub struct OnnxNode<'a> {
    pub node: &'a NodeProto,
    pub consts: &'a Constants,
    pub lowered: &'a mut Lowered,
    /// The node after this one in graph order.
    pub(crate) next: Option<&'a NodeProto>,
    /// How many nodes of the suffix read each tensor.
    pub(crate) readers: &'a HashMap<String, usize>,
    /// The graph's outputs, which a fold must not hide.
    pub(crate) graph_outputs: &'a [String],
    /// Set once the builder has folded `next` into this node.
    pub(crate) folded: bool,
}

impl<'a> OnnxNode<'a> {
    /// The node's op type.
    pub fn op_type(&self) -> &str {
        &self.node.op_type
    }

    /// Computed input `k`.
    pub fn input(&self, k: usize) -> Result<Tensor> {
        let name = self
            .node
            .input
            .get(k)
            .with_context(|| format!("missing input {k}"))?;
        if self.consts.contains(name) {
            bail!("input {k} ('{name}') is a constant; the sparse executor needs a computed tensor here");
        }
        self.lowered
            .tensors
            .get(name)
            .cloned()
            .with_context(|| format!("input '{name}' is computed nowhere before this node"))
    }

    /// Computed input 0 as a dense value: its slot and ONNX shape.
    pub fn dense_input(&self) -> Result<(usize, Vec<usize>)> {
        match self.input(0)? {
            Tensor {
                slot,
                shape: Shape::Dense { shape },
            } => Ok((slot, shape)),
            _ => bail!(
                "{} of a spatial token map is not supported by the sparse executor; pool it first",
                self.node.op_type
            ),
        }
    }

    /// Constant input `k`, `None` when the node omits it.
    pub fn constant(&self, k: usize) -> Result<Option<Vec<f32>>> {
        match self.node.input.get(k).filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(name) if self.consts.contains(name) => Ok(Some(self.consts.f32s(name)?)),
            Some(name) => bail!("input {k} ('{name}') must be a constant"),
        }
    }

    /// The fill vector of the tensor in `slot`, if it has one.
    pub fn fill(&self, slot: usize) -> Option<&Vec<f32>> {
        self.lowered.slot_fills[slot].as_ref()
    }

    /// Folds the next node into this one when it is an `op_type` reading
    /// this node's output and nothing else reads that output: the next node,
    /// whose output the emitted step then writes.
    pub fn fold_next(&mut self, op_type: &str) -> Option<&'a NodeProto> {
        let out = self.node.output.first()?;
        let next = self.next.filter(|n| {
            n.op_type == op_type
                && n.input.first() == Some(out)
                && self.readers.get(out).copied().unwrap_or(0) == 1
                && !self.graph_outputs.contains(out)
        })?;
        self.folded = true;
        Some(next)
    }

    /// The name of the tensor the node's step writes: the folded node's
    /// output when there is one.
    pub fn output_name(&self) -> String {
        let node = match (self.folded, self.next) {
            (true, Some(next)) => next,
            _ => self.node,
        };
        node.output.first().cloned().unwrap_or_default()
    }

    /// Appends a step computing `op` from `inputs` into a new slot of `shape`.
    pub fn emit(&mut self, op: impl Op + 'static, inputs: Vec<usize>, shape: Shape) -> Tensor {
        let name = self.output_name();
        let slot = self.lowered.slot(&name, shape.clone());
        self.lowered.steps.push(Step {
            node: node_name(self.node).to_string(),
            op: Arc::new(op),
            inputs,
            output: slot,
        });
        Tensor { slot, shape }
    }
}
