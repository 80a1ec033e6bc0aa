//! An `ersm.EnergyMask` node's weights and mean-field settings: the energy
//! layer at the cut and a gate inside the suffix read them the same way.

use crate::ersm::{EnergySpec, HeadConv, Neighbourhood, UnaryHead, MAX_HEAD_DILATION};
use crate::onnx::{attr_f32, attr_i64, attr_ints, label, Constants};
use anyhow::{bail, Context, Result};
use tract_onnx::pb::NodeProto;

/// The energy layer's op type (a gate's too).
pub const OP_TYPE: &str = "EnergyMask";
/// The energy layer's ONNX domain.
pub const DOMAIN: &str = "ersm";

/// Every attribute the energy node may carry.
pub const ATTRIBUTES: [&str; 9] = [
    "lambda",
    "tau",
    "steps",
    "neighbourhood",
    "stride_rule",
    "fills",
    "convs",
    "conv_relu",
    "conv_dilations",
];

/// Most mean-field steps a package may ask for (each is a pass over the map;
/// a few converge, and a huge count would stall every frame).
pub const MAX_STEPS: i64 = 100;

/// Most conv layers a unary head may have.
pub const MAX_CONVS: i64 = crate::ersm::MAX_HEAD_CONVS as i64;

/// An attribute holding one int per head conv (`convs` of them), each in
/// `range` (`values` says which, for the error), or `default` for every
/// conv when absent.
fn per_conv(
    node: &NodeProto,
    name: &str,
    convs: usize,
    default: i64,
    range: std::ops::RangeInclusive<i64>,
    values: &str,
) -> Result<Vec<i64>> {
    match attr_ints(node, name)? {
        None => Ok(vec![default; convs]),
        Some(v) if v.len() == convs && v.iter().all(|x| range.contains(x)) => Ok(v),
        Some(v) => bail!(
            "{}: {name} must hold {convs} {values}, got {v:?}",
            label(node)
        ),
    }
}

/// Reads the node's settings and weights for a `channels`-channel feature map.
///
/// Inputs: `X`, then `convs` pairs `W, B` (conv layers ahead of the per-token
/// head: ONNX Conv weights `[Cout, Cin / groups, k, k]`, odd square kernels,
/// stride 1, same padding), then `w, b` (linear head; `w` of `C` values in any
/// shape such as `[1, C, 1, 1]`) or `W1, b1, w2, b2` (two-layer head, `W1` of
/// `hidden × C`). Attributes: `lambda` (≥ 0), `tau` (> 0), `steps`
/// (0–[`MAX_STEPS`]), `neighbourhood` (4 or 8), `convs` (0–[`MAX_CONVS`],
/// default 0), `conv_relu` (one 0/1 per conv, default all 1),
/// `conv_dilations` (one tap spacing per conv, 1–[`MAX_HEAD_DILATION`],
/// default all 1).
pub fn spec(node: &NodeProto, consts: &Constants, channels: usize) -> Result<EnergySpec> {
    let what = label(node);
    // A misspelt attribute would silently take its default.
    for a in &node.attribute {
        if !ATTRIBUTES.contains(&a.name.as_str()) {
            let hint = match a.name.as_str() {
                "neighborhood" => " (did you mean 'neighbourhood'?)",
                "fill" => " (did you mean 'fills'?)",
                _ => "",
            };
            bail!(
                "{what}: unknown attribute '{}'{hint}; EnergyMask reads {}",
                a.name,
                ATTRIBUTES.join(", ")
            );
        }
    }
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
    let convs = attr_i64(node, "convs", Some(0))?;
    if !(0..=MAX_CONVS).contains(&convs) {
        bail!("{what}: convs must be between 0 and {MAX_CONVS}, got {convs}");
    }
    let convs = convs as usize;
    let relu = per_conv(node, "conv_relu", convs, 1, 0..=1, "values of 0 or 1")?;
    let dilations = per_conv(
        node,
        "conv_dilations",
        convs,
        1,
        1..=MAX_HEAD_DILATION as i64,
        &format!("values between 1 and {MAX_HEAD_DILATION}"),
    )?;
    let mut layers = Vec::with_capacity(convs);
    let mut c = channels;
    for (i, (&relu, &dilation)) in relu.iter().zip(&dilations).enumerate() {
        let (relu, dilation) = (relu == 1, dilation as usize);
        let (wi, bi) = (1 + 2 * i, 2 + 2 * i);
        let weight_name = node.input.get(wi).map_or("", String::as_str);
        let shape = consts.shape(weight_name).unwrap_or(&[]).to_vec();
        let layer = match shape.as_slice() {
            &[cout, per_group, k, k2] if k == k2 && k % 2 == 1 && per_group > 0 && c.is_multiple_of(per_group) => {
                HeadConv {
                    cin: c,
                    cout,
                    k,
                    groups: c / per_group,
                    dilation,
                    weight: weight(wi)?,
                    bias: weight(bi)?,
                    relu,
                }
            }
            _ => bail!(
                "{what}: conv {i} weight (input {wi}, '{weight_name}') must be a constant [Cout, {c} / groups, k, k] with k odd, is {shape:?}"
            ),
        };
        c = layer.cout;
        layers.push(layer);
    }
    let base = 1 + 2 * convs;
    let head = match node.input.len().checked_sub(base) {
        Some(2) => {
            let w = weight(base)?;
            if w.len() != c {
                bail!(
                    "{what}: unary weight has {} values, the head's input has {c} channels",
                    w.len()
                );
            }
            UnaryHead::Linear {
                w,
                b: scalar(base + 1)?,
            }
        }
        Some(4) => {
            let (w1, b1, w2) = (weight(base)?, weight(base + 1)?, weight(base + 2)?);
            if b1.is_empty() || w1.len() != b1.len() * c || w2.len() != b1.len() {
                bail!(
                    "{what}: two-layer head shapes do not fit {c} channels: W1 {} values, b1 {}, w2 {}",
                    w1.len(),
                    b1.len(),
                    w2.len()
                );
            }
            UnaryHead::TwoLayer {
                w1,
                b1,
                w2,
                b2: scalar(base + 3)?,
            }
        }
        _ => bail!(
            "{what}: with {convs} conv layers, expected {} inputs (X, 2 per conv, w, b) or {} (X, 2 per conv, W1, b1, w2, b2), got {}",
            base + 2,
            base + 4,
            node.input.len()
        ),
    };
    let head = if layers.is_empty() {
        head
    } else {
        UnaryHead::Conv {
            layers,
            head: Box::new(head),
        }
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
