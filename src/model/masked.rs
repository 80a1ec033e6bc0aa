//! The dense-masked reference: the suffix run densely by tract with the
//! propagated mask multiplied in after every layer, and global pooling
//! rescaled to a mean over active tokens. The sparse suffix must equal it.

use super::onnx::{float_input, CloneWithoutGraph};
use crate::sparse::Plan;
use tract_onnx::pb::{ModelProto, NodeProto};

/// Name of the mask input of level `l` (`[1, 1, h, w]`, 1 active / 0 inactive).
pub fn mask_input(l: usize) -> String {
    format!("ersm_mask_{l}")
}

/// Name of the pooling rescale input of level `l` (`[1]`, `h·w / active`).
pub fn scale_input(l: usize) -> String {
    format!("ersm_pool_scale_{l}")
}

/// Rewrites `suffix` (as built by the model loader) into the dense-masked
/// reference. Inputs: the masked features, then for every level `l` of `plan`
/// its mask and its pooling scale, in that order.
pub fn reference(suffix: &ModelProto, plan: &Plan) -> ModelProto {
    let graph = suffix.graph.as_ref().expect("suffix has a graph");
    let level_of = |name: &str| plan.tensors.get(name).and_then(|&s| plan.slot_levels[s]);
    let mut nodes: Vec<NodeProto> = Vec::new();
    for node in &graph.node {
        let mut node = node.clone();
        let pooled_level = match node.op_type.as_str() {
            "GlobalAveragePool" | "ReduceMean" => node.input.first().and_then(|i| level_of(i)),
            _ => None,
        };
        let mut extra = Vec::new();
        for out in node.output.iter_mut() {
            let factor = match (level_of(out), pooled_level) {
                (Some(l), _) => mask_input(l),
                (None, Some(l)) => scale_input(l),
                (None, None) => continue,
            };
            let raw = format!("{out}__unmasked");
            extra.push(NodeProto {
                name: format!("{out}__mask"),
                op_type: "Mul".into(),
                input: vec![raw.clone(), factor],
                output: vec![out.clone()],
                ..Default::default()
            });
            *out = raw;
        }
        nodes.push(node);
        nodes.extend(extra);
    }
    let mut inputs = graph.input.clone();
    for (l, level) in plan.levels.iter().enumerate() {
        inputs.push(float_input(&mask_input(l), &[1, 1, level.h, level.w]));
        inputs.push(float_input(&scale_input(l), &[1]));
    }
    let mut g = graph.clone();
    g.node = nodes;
    g.input = inputs;
    ModelProto {
        graph: Some(g),
        ..suffix.clone_without_graph()
    }
}
