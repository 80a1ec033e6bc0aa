//! The `ersm.EnergyMask` node: finding it and reading its weights and attributes.

use super::onnx::{attr_f32, attr_i64, attr_str, label, Constants};
use crate::ersm::{EnergySpec, Neighbourhood, UnaryHead};
use crate::sparse::StrideRule;
use anyhow::{bail, Context, Result};
use tract_onnx::pb::NodeProto;

/// The energy layer's op type.
pub const OP_TYPE: &str = "EnergyMask";
/// The energy layer's ONNX domain.
pub const DOMAIN: &str = "ersm";

/// The index of the one energy node in `nodes`.
pub fn find(nodes: &[NodeProto]) -> Result<usize> {
    let found: Vec<usize> = nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == OP_TYPE)
        .map(|(i, _)| i)
        .collect();
    match found.as_slice() {
        [] => bail!("no energy layer: the graph has no {DOMAIN}.{OP_TYPE} node"),
        [i] => {
            let node = &nodes[*i];
            if node.domain != DOMAIN {
                bail!(
                    "{}: domain is '{}', expected '{DOMAIN}'",
                    label(node),
                    node.domain
                );
            }
            Ok(*i)
        }
        many => bail!(
            "more than one energy layer: {} {OP_TYPE} nodes ({})",
            many.len(),
            many.iter()
                .map(|&i| format!("'{}'", super::onnx::node_name(&nodes[i])))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
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

/// Most mean-field steps a package may ask for (each is a pass over the map;
/// a few converge, and a huge count would stall every frame).
pub const MAX_STEPS: i64 = 100;

/// Reads the node's settings and weights for a `channels`-channel feature map.
///
/// Inputs: `X, w, b` (linear head; `w` of `C` values in any shape such as
/// `[1, C, 1, 1]`) or `X, W1, b1, w2, b2` (two-layer head, `W1` of `hidden × C`).
/// Attributes: `lambda` (≥ 0), `tau` (> 0), `steps` (0–[`MAX_STEPS`]), `neighbourhood` (4 or 8).
pub fn spec(node: &NodeProto, consts: &Constants, channels: usize) -> Result<EnergySpec> {
    let what = label(node);
    let lambda = attr_f32(node, "lambda", None)?;
    let tau = attr_f32(node, "tau", Some(1.0))?;
    let steps = attr_i64(node, "steps", Some(0))?;
    if !(0..=MAX_STEPS).contains(&steps) {
        bail!("{what}: steps must be between 0 and {MAX_STEPS}, got {steps}");
    }
    let neighbourhood = match attr_i64(node, "neighbourhood", Some(4))? {
        4 => Neighbourhood::Four,
        8 => Neighbourhood::Eight,
        n => bail!("{what}: neighbourhood must be 4 or 8, got {n}"),
    };
    let weight = |k: usize| -> Result<Vec<f32>> {
        let name = node
            .input
            .get(k)
            .with_context(|| format!("{what}: missing input {k}"))?;
        if !consts.contains(name) {
            bail!("{what}: input {k} ('{name}') must be an initializer");
        }
        consts.f32s(name).with_context(|| what.clone())
    };
    let scalar = |k: usize| -> Result<f32> {
        let v = weight(k)?;
        match v.as_slice() {
            [x] => Ok(*x),
            _ => bail!("{what}: input {k} must hold one value, has {}", v.len()),
        }
    };
    let head = match node.input.len() {
        3 => {
            let w = weight(1)?;
            if w.len() != channels {
                bail!(
                    "{what}: unary weight has {} values, the feature map has {channels} channels",
                    w.len()
                );
            }
            UnaryHead::Linear { w, b: scalar(2)? }
        }
        5 => {
            let (w1, b1, w2) = (weight(1)?, weight(2)?, weight(3)?);
            if b1.is_empty() || w1.len() != b1.len() * channels || w2.len() != b1.len() {
                bail!(
                    "{what}: two-layer head shapes do not fit {channels} channels: W1 {} values, b1 {}, w2 {}",
                    w1.len(),
                    b1.len(),
                    w2.len()
                );
            }
            UnaryHead::TwoLayer {
                w1,
                b1,
                w2,
                b2: scalar(4)?,
            }
        }
        n => bail!("{what}: expected 3 inputs (X, w, b) or 5 (X, W1, b1, w2, b2), got {n}"),
    };
    let spec = EnergySpec {
        head,
        lambda,
        tau,
        steps: steps as u32,
        neighbourhood,
    };
    spec.validate().with_context(|| what.clone())?;
    Ok(spec)
}
