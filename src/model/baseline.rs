//! The original network of a fine-tuned package: when the sparse network's
//! suffix was trained away from the original weights, the dense baseline (and
//! the confidence fallback) must still be the original network, so every
//! agreement figure is measured against it. It shares the package's prefix.

use super::{read_onnx, Cut};
use crate::onnx::{float_input, node_name, split_at, subgraph, Constants};
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tract_onnx::pb::{ModelProto, NodeProto};

/// The original network, cut at the package's energy input.
pub struct Baseline {
    /// The ONNX file it came from.
    pub origin: PathBuf,
    /// Its layers after the cut, run densely on the shared prefix's output
    /// (input: the cut tensor).
    pub suffix_proto: ModelProto,
    /// The whole original network.
    pub proto: ModelProto,
}

impl Baseline {
    /// Loads `path`: a plain ONNX network (no energy layer) whose tensor at
    /// the package's cut, and each map its suffix reads across the cut, are
    /// computed by the same prefix as the package's (`prefix`), and whose
    /// outputs are the package's (by name; handed over in the package's
    /// order).
    pub fn load(path: &Path, cut: &Cut, prefix: &ModelProto) -> Result<Baseline> {
        let pgraph = prefix
            .graph
            .as_ref()
            .context("internal: prefix has no graph")?;
        let prefix_consts = Constants::load(pgraph, path.parent().and_then(|p| p.to_str()))?;
        // The copy of the cut's map the package's prefix hands over as a tap
        // (when its suffix reads the unmasked map) is no layer of the original.
        let copy = format!("{}.tap", cut.input);
        let prefix_nodes: Vec<NodeProto> = pgraph
            .node
            .iter()
            .filter(|n| n.op_type != "Constant" && n.output.first() != Some(&copy))
            .cloned()
            .collect();
        let proto = read_onnx(path)?;
        let graph = proto.graph.as_ref().context("no graph")?;
        if let Some(n) = graph
            .node
            .iter()
            .find(|n| n.op_type == super::energy::OP_TYPE)
        {
            bail!(
                "the original network must not hold an energy layer, has '{}'",
                node_name(n)
            );
        }
        let theirs: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
        let mut ours: Vec<&str> = cut.graph_outputs.iter().map(String::as_str).collect();
        ours.sort_unstable();
        let mut sorted = theirs.clone();
        sorted.sort_unstable();
        ensure!(
            sorted == ours,
            "the original network's outputs ({}) must be the package's ({})",
            theirs.join(", "),
            cut.graph_outputs.join(", ")
        );
        let model_dir = path.parent().and_then(|p| p.to_str());
        let consts = Constants::load(graph, model_dir)?;
        let (before, after) = split_at(graph, &cut.input);
        ensure!(
            !before.is_empty(),
            "no node computes '{}', the tensor where the package is cut",
            cut.input
        );
        let compared: Vec<&NodeProto> = before
            .iter()
            .copied()
            .filter(|n| n.op_type != "Constant")
            .collect();
        same_prefix(&compared, &consts, &prefix_nodes, &prefix_consts)?;
        // The layers after the cut may read what the prefix hands over: the
        // cut's map and the package's taps, nothing else computed before it.
        let produced_before: HashSet<&str> = before
            .iter()
            .flat_map(|n| n.output.iter().map(String::as_str))
            .collect();
        let handed: HashSet<&str> = std::iter::once(cut.input.as_str())
            .chain(cut.taps.iter().map(|t| t.name.as_str()))
            .collect();
        for n in &after {
            if let Some(t) = n
                .input
                .iter()
                .find(|t| produced_before.contains(t.as_str()) && !handed.contains(t.as_str()))
            {
                bail!(
                    "'{}' after the cut reads '{t}', computed before it, which the package's suffix does not read",
                    node_name(n)
                );
            }
        }
        let suffix_nodes: Vec<NodeProto> = after.into_iter().cloned().collect();
        let inputs = std::iter::once(float_input(&cut.input, &cut.shape()))
            .chain(cut.taps.iter().map(|t| float_input(&t.name, &t.shape())))
            .collect();
        let outputs: Vec<&str> = cut.graph_outputs.iter().map(String::as_str).collect();
        let suffix_proto = subgraph(&proto, suffix_nodes, inputs, &outputs);
        Ok(Baseline {
            origin: path.to_path_buf(),
            suffix_proto,
            proto,
        })
    }
}

/// The two prefixes compute the same function: the same ops in the same
/// order, reading equal constants.
fn same_prefix(
    ours: &[&NodeProto],
    consts: &Constants,
    theirs: &[NodeProto],
    their_consts: &Constants,
) -> Result<()> {
    ensure!(
        ours.len() == theirs.len(),
        "its prefix has {} nodes, the package's {}: the dense baseline must share the package's prefix",
        ours.len(),
        theirs.len()
    );
    for (a, b) in ours.iter().zip(theirs) {
        ensure!(
            a.op_type == b.op_type && a.attribute == b.attribute,
            "prefix node '{}' ({}) differs from the package's '{}' ({})",
            node_name(a),
            a.op_type,
            node_name(b),
            b.op_type
        );
        for (ia, ib) in a.input.iter().zip(&b.input) {
            if consts.contains(ia) || their_consts.contains(ib) {
                let (va, vb) = (consts.f32s(ia)?, their_consts.f32s(ib)?);
                ensure!(
                    va == vb && consts.shape(ia) == their_consts.shape(ib),
                    "prefix weight '{ia}' differs from the package's '{ib}': the dense baseline must share the package's prefix"
                );
            }
        }
    }
    Ok(())
}
