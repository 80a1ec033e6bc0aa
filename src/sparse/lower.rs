//! Lowering the graph after the energy layer into a sparse [`Plan`]: walks
//! the suffix nodes in graph order and hands each to its op's builder
//! ([`ops::BUILDERS`]), which records the tensor it computes (a token map at
//! some level, or a dense value) and the steps computing it. Fill vectors
//! attach to tensors as they are lowered.

use super::ops::{self, Lowered, OnnxNode, Tensor};
use super::value::Shape;
use super::Plan;
use crate::onnx::{label, Constants};
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use tract_onnx::pb::NodeProto;

/// Lowers `nodes` (the suffix, in graph order) reading `input` (`c × h × w`
/// tokens) and the prefix maps `taps` (name, channels, height, width), and
/// producing `outputs`. `fills` name the token maps whose dropped positions
/// hold a fill vector instead of zero.
pub fn lower(
    nodes: &[NodeProto],
    consts: &Constants,
    input: &str,
    (c, h, w): (usize, usize, usize),
    taps: &[(String, usize, usize, usize)],
    outputs: &[String],
    fills: &[(String, Vec<f32>)],
) -> Result<Plan> {
    let mut lowered = Lowered::default();
    lowered.levels.push(super::Level {
        parent: None,
        stride: 1,
        h,
        w,
        up: false,
        merge: None,
        gate: None,
    });
    let input_tensor = Tensor {
        slot: lowered.slot(input, Shape::Tokens { level: 0, c }),
        shape: Shape::Tokens { level: 0, c },
    };
    let mut unused: Vec<&str> = fills.iter().map(|(n, _)| n.as_str()).collect();
    attach_fill(&mut lowered, fills, &mut unused, input, &input_tensor)?;
    lowered.tensors.insert(input.to_string(), input_tensor);
    let mut tap_slots = Vec::with_capacity(taps.len());
    for (name, tc, th, tw) in taps {
        let (map, tensor) = ops::gather::tap(&mut lowered, name, *tc, (*th, *tw))?;
        attach_fill(&mut lowered, fills, &mut unused, name, &tensor)?;
        lowered.tensors.insert(name.clone(), tensor);
        tap_slots.push(map);
    }
    let mut readers: HashMap<String, usize> = HashMap::new();
    for n in nodes {
        for i in &n.input {
            *readers.entry(i.clone()).or_default() += 1;
        }
    }
    let mut folded = vec![false; nodes.len()];
    for (ix, node) in nodes.iter().enumerate() {
        if folded[ix] || node.op_type == "Constant" {
            continue;
        }
        let Some(op) = ops::BUILDERS.iter().find(|b| b.op_type == node.op_type) else {
            bail!(
                "{} after the energy layer is not supported by the sparse executor (supported: {})",
                label(node),
                ops::supported().join(", ")
            );
        };
        let given = node.input.iter().filter(|i| !i.is_empty()).count();
        ensure!(
            node.input.len() >= op.inputs && node.input[..op.inputs].iter().all(|i| !i.is_empty()),
            "{}: {} needs {} inputs, has {given}",
            label(node),
            node.op_type,
            op.inputs
        );
        let mut n = OnnxNode {
            node,
            consts,
            lowered: &mut lowered,
            next: nodes.get(ix + 1),
            readers: &readers,
            graph_outputs: outputs,
            folded: false,
        };
        let tensor = (op.build)(&mut n).with_context(|| label(node))?;
        let name = n.output_name();
        if n.folded {
            folded[ix + 1] = true;
        }
        attach_fill(&mut lowered, fills, &mut unused, &name, &tensor)
            .with_context(|| label(node))?;
        lowered.tensors.insert(name, tensor);
    }
    if let Some(name) = unused.first() {
        bail!("the energy layer's fill for '{name}': no such tensor after the energy layer (a Conv output folded with its BatchNormalization is named by the BatchNormalization's output)");
    }
    let out = outputs
        .iter()
        .map(|o| {
            lowered.tensors.get(o).map(|t| t.slot).with_context(|| {
                format!("graph output '{o}' is not computed after the energy layer")
            })
        })
        .collect::<Result<Vec<usize>>>()?;
    Ok(Plan::new(lowered, c, tap_slots, out))
}

/// Attaches the fill `fills` give tensor `name` as soon as it is lowered,
/// so every later reader sees it.
fn attach_fill(
    lowered: &mut Lowered,
    fills: &[(String, Vec<f32>)],
    unused: &mut Vec<&str>,
    name: &str,
    t: &Tensor,
) -> Result<()> {
    let Some((_, f)) = fills.iter().find(|(n, _)| n == name) else {
        return Ok(());
    };
    let Shape::Tokens { c, .. } = t.shape else {
        bail!("the energy layer's fill for '{name}': it has no spatial extent (only token maps hold dropped positions)");
    };
    ensure!(
        f.len() == c,
        "the energy layer's fill for '{name}' has {} values, the tensor has {c} channels",
        f.len()
    );
    // On an alias, ops lowered before it would already have read the
    // source without the fill: the fill must name the source.
    let source = &lowered.slot_names[t.slot];
    ensure!(
        source == name,
        "the energy layer's fill for '{name}': it is an Identity or Dropout of '{source}'; name '{source}' instead"
    );
    lowered.slot_fills[t.slot] = Some(f.clone());
    unused.retain(|u| *u != name);
    Ok(())
}
