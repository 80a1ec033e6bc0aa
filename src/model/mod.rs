//! Model packages: loading, validating, and cutting one ONNX network into the
//! dense prefix's graph, the energy layer's spec, and the sparse suffix's
//! plan (DESIGN.md, "Model package"). Nothing here builds a runtime: tract's
//! plans are prepared from the cut by `crate::package`.

pub mod baseline;
pub mod energy;
pub mod inspect;
pub mod manifest;

use crate::ersm::EnergySpec;
use crate::onnx::{self, float_input, label, split_at, subgraph, Constants};
use crate::sparse::Plan;
use anyhow::{bail, ensure, Context, Result};
pub use baseline::Baseline;
pub use manifest::Manifest;
use prost::Message;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tract_onnx::pb::{ModelProto, NodeProto};

/// Where the network is cut.
#[derive(Clone, Debug)]
pub struct Cut {
    /// Name of the energy node.
    pub node: String,
    /// Tensor the energy layer reads (the prefix output).
    pub input: String,
    /// Tensor it writes (the masked features the suffix reads).
    pub output: String,
    /// The graph's final output.
    pub graph_output: String,
    /// Feature map channels, height, width.
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

/// A loaded, validated model package, cut into its parts.
pub struct CutModel {
    /// Where it came from (folder or file), for messages.
    pub origin: PathBuf,
    pub manifest: Manifest,
    pub cut: Cut,
    pub energy: EnergySpec,
    /// The suffix lowered for the sparse executor.
    pub plan: Plan,
    /// ONNX op types before the cut, in graph order.
    pub prefix_ops: Vec<String>,
    /// The suffix as an ONNX model (input: the energy layer's output).
    pub suffix_proto: ModelProto,
    /// The whole network with the energy layer as Identity (every token kept).
    pub dense_proto: ModelProto,
    /// The prefix as an ONNX model (output: the energy layer's input).
    pub prefix_proto: ModelProto,
    /// The original network, when the manifest names one (`dense_model`): the
    /// dense baseline and the fallback run it instead of `dense_suffix`.
    pub baseline: Option<Baseline>,
}

impl CutModel {
    /// Loads a package folder holding `manifest.json` and its ONNX file.
    pub fn load(dir: impl AsRef<Path>) -> Result<CutModel> {
        let dir = dir.as_ref();
        crate::panics::catch(
            || format!("model package {}", dir.display()),
            || Self::load_unguarded(dir),
        )
    }

    fn load_unguarded(dir: &Path) -> Result<CutModel> {
        if !dir.exists() {
            bail!("model package {}: not found", dir.display());
        }
        if !dir.is_dir() {
            bail!(
                "model package {}: expected a folder holding manifest.json and the ONNX file",
                dir.display()
            );
        }
        let manifest = Manifest::read(&dir.join("manifest.json"))?;
        let path = dir.join(&manifest.model);
        let proto = read_onnx(&path)?;
        let mut package = Self::from_proto(proto, manifest, &path)?;
        if let Some(file) = package.manifest.dense_model.clone() {
            let bpath = dir.join(&file);
            let cut = &package.cut;
            let baseline = Baseline::load(
                &bpath,
                &cut.input,
                &[1, cut.c, cut.h, cut.w],
                &package.prefix_proto,
            )
            .with_context(|| format!("dense_model {}", bpath.display()))?;
            package.baseline = Some(baseline);
        }
        Ok(package)
    }

    /// Validates and cuts an ONNX model; `origin` names it in errors.
    pub fn from_proto(proto: ModelProto, manifest: Manifest, origin: &Path) -> Result<CutModel> {
        let what = origin.display().to_string();
        Self::build(proto, manifest, origin).with_context(|| format!("model {what}"))
    }

    fn build(proto: ModelProto, manifest: Manifest, origin: &Path) -> Result<CutModel> {
        let graph = proto
            .graph
            .as_ref()
            .context("not an ONNX model: no graph")?;
        ensure!(
            !graph.node.is_empty(),
            "not an ONNX model: the graph has no nodes"
        );
        let model_dir = origin.parent().and_then(|p| p.to_str());
        let consts = Constants::load(graph, model_dir)?;
        let e = energy::find(&graph.node)?;
        let enode = &graph.node[e];
        let (input, output) = match (enode.input.first(), enode.output.first()) {
            (Some(i), Some(o)) => (i.clone(), o.clone()),
            _ => bail!("{}: needs an input and an output", label(enode)),
        };
        ensure!(
            graph.output.len() == 1,
            "the graph must have one output, has {}",
            graph.output.len()
        );
        let graph_output = graph.output[0].name.clone();

        // Prefix: what the energy input needs. Suffix: everything after the cut.
        let (before, after) = split_at(graph, &input);
        let prefix_nodes: Vec<NodeProto> = before.into_iter().cloned().collect();
        ensure!(
            !prefix_nodes.iter().any(|n| n.op_type == energy::OP_TYPE),
            "the energy layer's input depends on the energy layer"
        );
        let suffix_nodes: Vec<NodeProto> = after
            .into_iter()
            .filter(|n| !std::ptr::eq(*n, enode))
            .cloned()
            .collect();
        let graph_inputs: Vec<_> = graph
            .input
            .iter()
            .filter(|i| !consts.contains(&i.name))
            .cloned()
            .collect();
        ensure!(
            graph_inputs.len() == 1,
            "the graph must have one input, has {}",
            graph_inputs.len()
        );
        ensure!(
            graph_inputs[0].name == manifest.input.name,
            "graph input is '{}', the manifest says '{}'",
            graph_inputs[0].name,
            manifest.input.name
        );
        onnx::check_declared_shape(&graph_inputs[0], &manifest.input.shape)?;
        let produced_before: HashSet<&str> = prefix_nodes
            .iter()
            .flat_map(|n| n.output.iter().map(String::as_str))
            .chain(std::iter::once(graph_inputs[0].name.as_str()))
            .collect();
        for n in &suffix_nodes {
            if let Some(t) = n
                .input
                .iter()
                .find(|t| produced_before.contains(t.as_str()))
            {
                bail!(
                    "{} after the energy layer reads '{t}' from before it: connections across the cut are not supported",
                    label(n)
                );
            }
        }

        let prefix_ops = prefix_nodes.iter().map(|n| n.op_type.clone()).collect();
        let prefix_proto = subgraph(&proto, prefix_nodes, graph_inputs.clone(), &[&input]);
        let fs = onnx::output_shape(&prefix_proto, &manifest.input.shape, "prefix")?;
        ensure!(
            fs.len() == 4 && fs[0] == 1,
            "the energy layer's input '{input}' must be a [1, C, H, W] feature map, is {fs:?}"
        );
        let (c, h, w) = (fs[1], fs[2], fs[3]);
        ensure!(
            (1..=MAX_CHANNELS).contains(&c) && h >= 1 && w >= 1,
            "the energy layer's input '{input}' is {c}×{h}×{w}: channels must be between 1 and {MAX_CHANNELS}"
        );
        let energy = energy::spec(enode, &consts, c)?;

        let fills = energy::fills(enode)?;
        let mut plan = crate::sparse::lower::lower(
            &suffix_nodes,
            &consts,
            &output,
            (c, h, w),
            &graph_output,
            &fills,
        )?;
        plan.stride_rule = energy::stride_rule(enode)?;
        let suffix_proto = subgraph(
            &proto,
            suffix_nodes,
            vec![float_input(&output, &fs)],
            &[&graph_output],
        );
        let dense_proto = with_identity_energy(&proto, e);
        Ok(CutModel {
            origin: origin.to_path_buf(),
            manifest,
            cut: Cut {
                node: onnx::node_name(enode).to_string(),
                input,
                output,
                graph_output,
                c,
                h,
                w,
            },
            energy,
            plan,
            prefix_ops,
            suffix_proto,
            dense_proto,
            prefix_proto,
            baseline: None,
        })
    }
}

/// Most channels the energy layer's feature map (the tokens) may have.
pub const MAX_CHANNELS: usize = 8192;

/// Reads an ONNX file (memory-mapped), with errors that name it.
pub fn read_onnx(path: &Path) -> Result<ModelProto> {
    crate::files::ensure_regular(path, "model")?;
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    // SAFETY: the map is only read while decoding, and a model file changing
    // under a running process is outside what ersm supports.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("{}: cannot map", path.display()))?;
    let proto = ModelProto::decode(&map[..])
        .map_err(|e| anyhow::anyhow!("{}: not an ONNX model ({e})", path.display()))?;
    if proto.graph.as_ref().is_none_or(|g| g.node.is_empty()) {
        bail!("{}: not an ONNX model (no graph nodes)", path.display());
    }
    if let Some(g) = &proto.graph {
        onnx::check_tensor_types(g).with_context(|| path.display().to_string())?;
    }
    Ok(proto)
}

/// The network with node `e` (the energy layer) replaced by Identity.
fn with_identity_energy(proto: &ModelProto, e: usize) -> ModelProto {
    let mut p = proto.clone();
    let g = p.graph.as_mut().expect("checked");
    let n = &mut g.node[e];
    n.op_type = "Identity".into();
    n.domain.clear();
    n.input.truncate(1);
    n.attribute.clear();
    p.opset_import.retain(|o| o.domain != energy::DOMAIN);
    p
}

impl std::fmt::Debug for CutModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CutModel")
            .field("origin", &self.origin)
            .field("name", &self.manifest.name)
            .field("cut", &self.cut)
            .field("suffix_steps", &self.plan.steps.len())
            .finish_non_exhaustive()
    }
}
