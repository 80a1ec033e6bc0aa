//! The `ersm.EnergyMask` node at the cut: finding it and reading the
//! attributes it sets for the whole suffix (its weights and mean-field
//! settings are `crate::ersm::node`'s to read).

pub use crate::ersm::node::{spec, ATTRIBUTES, DOMAIN, OP_TYPE};
use crate::onnx::{attr_str, label};
use crate::sparse::StrideRule;
use anyhow::{bail, ensure, Context, Result};
use tract_onnx::pb::NodeProto;

/// The index of the energy node at the cut in `nodes`: the first in graph
/// order. Any later one is a gate inside the suffix (`sparse::ops::gate`).
pub fn find(nodes: &[NodeProto]) -> Result<usize> {
    let Some(i) = nodes.iter().position(|n| n.op_type == OP_TYPE) else {
        bail!("no energy layer: the graph has no {DOMAIN}.{OP_TYPE} node");
    };
    let node = &nodes[i];
    if node.domain != DOMAIN {
        bail!(
            "{}: domain is '{}', expected '{DOMAIN}'",
            label(node),
            node.domain
        );
    }
    Ok(i)
}

/// The suffix's stride rule, from the node's `stride_rule` attribute
/// (`"any"`, the default, or `"centre"`).
pub fn stride_rule(node: &NodeProto) -> Result<StrideRule> {
    match attr_str(node, "stride_rule")? {
        None => Ok(StrideRule::Any),
        Some(s) => StrideRule::parse(&s).with_context(|| {
            format!(
                "{}: stride_rule must be \"any\" or \"centre\", got \"{s}\"",
                label(node)
            )
        }),
    }
}

/// The fill vectors of the suffix's tensors, from the node's `fills`
/// attribute (a list of float tensors, each named after the tensor after the
/// energy layer whose dropped positions it fills, with one value per channel).
/// Empty when absent: every dropped position holds zero.
pub fn fills(node: &NodeProto) -> Result<Vec<(String, Vec<f32>)>> {
    use tract_onnx::pb::attribute_proto::AttributeType;
    let Some(a) = node.attribute.iter().find(|a| a.name == "fills") else {
        return Ok(Vec::new());
    };
    ensure!(
        a.r#type == AttributeType::Tensors as i32,
        "{}: attribute 'fills' must be a list of tensors",
        label(node)
    );
    let mut out: Vec<(String, Vec<f32>)> = Vec::with_capacity(a.tensors.len());
    for (k, t) in a.tensors.iter().enumerate() {
        let what = format!("{}: fill {k} ('{}')", label(node), t.name);
        ensure!(
            !t.name.is_empty(),
            "{what} has no name: name it after the tensor it fills"
        );
        ensure!(
            out.iter().all(|(n, _)| *n != t.name),
            "{what}: a second fill for the same tensor"
        );
        ensure!(
            t.data_type == 1,
            "{what} must be FLOAT, is element type {}",
            t.data_type
        );
        // Decoded as initializers are (float_data or raw_data).
        let v: Vec<f32> =
            tract_onnx::tensor::load_tensor(&tract_onnx::data_resolver::MmapDataResolver, t, None)
                .with_context(|| what.clone())?
                .to_plain_array_view::<f32>()
                .with_context(|| what.clone())?
                .iter()
                .copied()
                .collect();
        ensure!(!v.is_empty(), "{what} holds no values (dims {:?})", t.dims);
        if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            bail!("{what} holds {x} at index {i}: fill values must be finite");
        }
        out.push((t.name.clone(), v));
    }
    Ok(out)
}
