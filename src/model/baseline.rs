//! The original network of a fine-tuned package: when the sparse network's
//! suffix was trained away from the original weights, the dense baseline (and
//! the confidence fallback) must still be the original network, so every
//! agreement figure is measured against it. It shares the package's prefix.

use super::read_onnx;
use crate::onnx::{float_input, node_name, split_at, subgraph, Constants};
use anyhow::{bail, ensure, Context, Result};
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
    /// Loads `path`: a plain ONNX network (no energy layer) whose tensor `cut`
    /// (`[1, C, H, W]` = `feature_shape`) is computed by the same prefix as
    /// the package's (`prefix`).
    pub fn load(
        path: &Path,
        cut: &str,
        feature_shape: &[usize],
        prefix: &ModelProto,
    ) -> Result<Baseline> {
        let pgraph = prefix
            .graph
            .as_ref()
            .context("internal: prefix has no graph")?;
        let prefix_consts = Constants::load(pgraph, path.parent().and_then(|p| p.to_str()))?;
        let prefix_nodes: Vec<NodeProto> = pgraph
            .node
            .iter()
            .filter(|n| n.op_type != "Constant")
            .cloned()
            .collect();
        let proto = read_onnx(path)?;
        let graph = proto.graph.as_ref().context("no graph")?;
        ensure!(
            graph.output.len() == 1,
            "the original network must have one output, has {}",
            graph.output.len()
        );
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
        let output = graph.output[0].name.clone();
        let model_dir = path.parent().and_then(|p| p.to_str());
        let consts = Constants::load(graph, model_dir)?;
        let (ours, after) = split_at(graph, cut);
        ensure!(
            !ours.is_empty(),
            "no node computes '{cut}', the tensor where the package is cut"
        );
        let compared: Vec<&NodeProto> = ours
            .iter()
            .copied()
            .filter(|n| n.op_type != "Constant")
            .collect();
        same_prefix(&compared, &consts, &prefix_nodes, &prefix_consts)?;
        let suffix_nodes: Vec<NodeProto> = after.into_iter().cloned().collect();
        let suffix_proto = subgraph(
            &proto,
            suffix_nodes,
            vec![float_input(cut, feature_shape)],
            &[&output],
        );
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
