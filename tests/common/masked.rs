//! The dense-masked reference: the suffix run densely by tract with the
//! propagated mask applied after every layer (dropped positions set to the
//! tensor's fill vector, or zero) and global pooling of a map without a fill
//! rescaled to a mean over active tokens. The sparse suffix must equal it.

use ersm::onnx::{float_input, CloneWithoutGraph};
use ersm::sparse::Plan;
use tract_onnx::pb::{self, ModelProto, NodeProto};

/// Name of the mask input of level `l` (`[1, 1, h, w]`, 1 active / 0 inactive).
pub fn mask_input(l: usize) -> String {
    format!("ersm_mask_{l}")
}

/// Name of the pooling rescale input of level `l` (`[1]`, `h·w / active`).
pub fn scale_input(l: usize) -> String {
    format!("ersm_pool_scale_{l}")
}

/// `1 − mask` of level `l`, computed inside the reference where a fill needs it.
fn unmask(l: usize) -> String {
    format!("ersm_unmask_{l}")
}

const ONE: &str = "ersm_one";

fn node(name: String, op: &str, input: Vec<String>, output: String) -> NodeProto {
    NodeProto {
        name,
        op_type: op.into(),
        input,
        output: vec![output],
        ..Default::default()
    }
}

fn float_tensor(name: String, dims: &[usize], data: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name,
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: pb::tensor_proto::DataType::Float as i32,
        float_data: data.to_vec(),
        ..Default::default()
    }
}

/// Builds the nodes that set tensor `out` from `raw` with level `l`'s mask:
/// `raw · m`, plus `(1 − m) · fill` when the tensor has one.
struct Masker {
    nodes: Vec<NodeProto>,
    initializers: Vec<pb::TensorProto>,
    unmasked_levels: Vec<usize>,
}

impl Masker {
    fn apply(&mut self, raw: String, out: &str, l: usize, fill: Option<&Vec<f32>>) {
        let Some(f) = fill else {
            self.nodes.push(node(
                format!("{out}__mask"),
                "Mul",
                vec![raw, mask_input(l)],
                out.to_string(),
            ));
            return;
        };
        if !self.unmasked_levels.contains(&l) {
            self.unmasked_levels.push(l);
            self.nodes.push(node(
                unmask(l),
                "Sub",
                vec![ONE.into(), mask_input(l)],
                unmask(l),
            ));
        }
        let (kept, fill_name, filled) = (
            format!("{out}__kept"),
            format!("{out}__fill"),
            format!("{out}__filled"),
        );
        self.initializers
            .push(float_tensor(fill_name.clone(), &[1, f.len(), 1, 1], f));
        self.nodes.push(node(
            format!("{out}__mask"),
            "Mul",
            vec![raw, mask_input(l)],
            kept.clone(),
        ));
        self.nodes.push(node(
            format!("{out}__fill_at_dropped"),
            "Mul",
            vec![unmask(l), fill_name],
            filled.clone(),
        ));
        self.nodes.push(node(
            format!("{out}__refill"),
            "Add",
            vec![kept, filled],
            out.to_string(),
        ));
    }
}

/// Rewrites `suffix` (as built by the model loader) into the dense-masked
/// reference. Inputs: the masked features (`x · m`), the prefix maps the
/// suffix reads (unmasked: each is masked here by its own level), then for
/// every level `l` of `plan` its mask and its pooling scale, in that order.
pub fn reference(suffix: &ModelProto, plan: &Plan) -> ModelProto {
    let graph = suffix.graph.as_ref().expect("suffix has a graph");
    let slot_of = |name: &str| plan.tensors.get(name).copied();
    let level_of = |name: &str| slot_of(name).and_then(|s| plan.slot_shapes[s].level());
    let fill_of = |name: &str| slot_of(name).and_then(|s| plan.slot_fills[s].as_ref());
    let mut m = Masker {
        nodes: Vec::new(),
        initializers: vec![float_tensor(ONE.into(), &[1], &[1.0])],
        unmasked_levels: Vec::new(),
    };
    let mut inputs = graph.input.clone();
    // The cut itself holds its fill at dropped positions: the features come
    // in masked (zero there) under another name and are refilled.
    if let Some(first) = inputs.first_mut() {
        let cut = first.name.clone();
        if let Some(f) = fill_of(&cut) {
            first.name = format!("{cut}__masked");
            m.apply(first.name.clone(), &cut, 0, Some(f));
        }
    }
    for tap in inputs.iter_mut().skip(1) {
        let name = tap.name.clone();
        if let Some(l) = level_of(&name) {
            tap.name = format!("{name}__unmasked");
            m.apply(tap.name.clone(), &name, l, fill_of(&name));
        }
    }
    for n in &graph.node {
        let mut n = n.clone();
        // Pooling a map that holds a fill is the plain dense mean.
        let pooled_level = match n.op_type.as_str() {
            "GlobalAveragePool" | "ReduceMean" => n
                .input
                .first()
                .filter(|i| fill_of(i).is_none())
                .and_then(|i| level_of(i)),
            _ => None,
        };
        // Each output of a token map is masked (and refilled); a pooled
        // value without a fill is rescaled; the node goes first.
        let mut after: Vec<(String, String, Option<usize>, Option<usize>)> = Vec::new();
        for out in n.output.iter_mut() {
            let (level, pooled) = (level_of(out), pooled_level);
            if level.is_none() && pooled.is_none() {
                continue;
            }
            let raw = format!("{out}__unmasked");
            after.push((raw.clone(), out.clone(), level, pooled));
            *out = raw;
        }
        m.nodes.push(n);
        for (raw, out, level, pooled) in after {
            match (level, pooled) {
                (Some(l), _) => m.apply(raw, &out, l, fill_of(&out)),
                (None, Some(l)) => m.nodes.push(node(
                    format!("{out}__rescale"),
                    "Mul",
                    vec![raw, scale_input(l)],
                    out,
                )),
                (None, None) => {}
            }
        }
    }
    for (l, level) in plan.levels.iter().enumerate() {
        inputs.push(float_input(&mask_input(l), &[1, 1, level.h, level.w]));
        inputs.push(float_input(&scale_input(l), &[1]));
    }
    let mut g = graph.clone();
    g.node = m.nodes;
    g.input = inputs;
    g.initializer.extend(m.initializers);
    ModelProto {
        graph: Some(g),
        ..suffix.clone_without_graph()
    }
}
