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
    /// The graph's outputs, in its order (a classifier's logits; a
    /// detector's maps).
    pub graph_outputs: Vec<String>,
    /// Tensors computed before the cut that the suffix reads too (FPN
    /// laterals), in the order the prefix hands them over after its first
    /// output.
    pub taps: Vec<Tap>,
    /// Feature map channels, height, width.
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Cut {
    /// The cut's map, `[1, C, H, W]`.
    pub fn shape(&self) -> [usize; 4] {
        [1, self.c, self.h, self.w]
    }

    /// What the dense suffix reads, in order: the cut's map, then each tap.
    pub fn suffix_input_shapes(&self) -> Vec<[usize; 4]> {
        std::iter::once(self.shape())
            .chain(self.taps.iter().map(Tap::shape))
            .collect()
    }
}

/// A tensor of the prefix the suffix reads beside the energy layer's output:
/// a `[1, C, H, W]` map whose size is the cut's times or divided by a
/// whole factor, gathered at the active positions of its own resolution.
#[derive(Clone, Debug)]
pub struct Tap {
    pub name: String,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Tap {
    /// The map, `[1, C, H, W]`.
    pub fn shape(&self) -> [usize; 4] {
        [1, self.c, self.h, self.w]
    }
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
    /// The suffix as an ONNX model (inputs: the energy layer's output, then
    /// the taps).
    pub suffix_proto: ModelProto,
    /// The whole network with every energy node as Identity (every token kept).
    pub dense_proto: ModelProto,
    /// The prefix as an ONNX model (outputs: the energy layer's input, then
    /// the taps).
    pub prefix_proto: ModelProto,
    /// The original network, when the manifest names one (`dense_model`): the
    /// dense baseline and the fallback run it instead of `dense_suffix`.
    pub baseline: Option<Baseline>,
}

impl CutModel {
    /// Loads a package folder holding `manifest.json` and its ONNX file.
    pub fn load(dir: impl AsRef<Path>) -> Result<CutModel> {
        CutModel::load_sized(dir, None)
    }

    /// Loads a package; with `size` (`(W, H)`), a package that stretches
    /// the frame to its input (a detector) at that input size instead: the
    /// graph's input is declared at it, and the cut, the levels and the
    /// decoder follow from it.
    pub fn load_sized(dir: impl AsRef<Path>, size: Option<(usize, usize)>) -> Result<CutModel> {
        let dir = dir.as_ref();
        crate::panics::catch(
            || format!("model package {}", dir.display()),
            || Self::load_unguarded(dir, size),
        )
    }

    fn load_unguarded(dir: &Path, size: Option<(usize, usize)>) -> Result<CutModel> {
        if !dir.exists() {
            bail!("model package {}: not found", dir.display());
        }
        if !dir.is_dir() {
            bail!(
                "model package {}: expected a folder holding manifest.json and the ONNX file",
                dir.display()
            );
        }
        let mut manifest = Manifest::read(&dir.join("manifest.json"))?;
        let path = dir.join(&manifest.model);
        let mut proto = read_onnx(&path)?;
        if let Some(size) = size {
            resize_input(&mut manifest, &mut proto, size).with_context(|| {
                format!(
                    "--input-size {}x{}, model {}",
                    size.0,
                    size.1,
                    dir.display()
                )
            })?;
        }
        let mut package = Self::from_proto(proto, manifest, &path)?;
        if let Some(file) = package.manifest.dense_model.clone() {
            let bpath = dir.join(&file);
            let baseline = Baseline::load(&bpath, &package.cut, &package.prefix_proto)
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
        ensure!(!graph.output.is_empty(), "the graph has no output");
        let graph_outputs: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();

        // Prefix: what the energy input needs. Suffix: everything after the cut.
        let (before, after) = split_at(graph, &input);
        let mut prefix_nodes: Vec<NodeProto> = before.into_iter().cloned().collect();
        ensure!(
            !prefix_nodes.iter().any(|n| n.op_type == energy::OP_TYPE),
            "the energy layer's input depends on the energy layer"
        );
        let mut suffix_nodes: Vec<NodeProto> = after
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
        let input_name = graph_inputs[0].name.as_str();
        let produced_before: HashSet<String> = prefix_nodes
            .iter()
            .flat_map(|n| n.output.iter().cloned())
            .collect();
        // A suffix node may read a prefix tensor (an FPN lateral): the prefix
        // hands it over too, and the suffix gathers it where its level is
        // active. The image itself is not a map of the cut's tokens.
        let mut tap_names: Vec<String> = Vec::new();
        for n in &suffix_nodes {
            for t in &n.input {
                if t == input_name {
                    bail!(
                        "{} after the energy layer reads the graph input '{t}': only tensors the prefix computes may cross the cut",
                        label(n)
                    );
                }
                if produced_before.contains(t) && !tap_names.contains(t) {
                    tap_names.push(t.clone());
                }
            }
        }
        // The energy layer's input read after the cut is its unmasked map, a
        // tap like any other: the prefix hands it over a second time through
        // an Identity, so every prefix output is a tensor of its own.
        if let Some(t) = tap_names.iter_mut().find(|t| **t == input) {
            let copy = format!("{input}.tap");
            for n in suffix_nodes.iter_mut() {
                for i in n.input.iter_mut().filter(|i| **i == input) {
                    i.clone_from(&copy);
                }
            }
            prefix_nodes.push(NodeProto {
                name: copy.clone(),
                op_type: "Identity".into(),
                input: vec![input.clone()],
                output: vec![copy.clone()],
                ..Default::default()
            });
            *t = copy;
        }
        if let Some(o) = graph_outputs
            .iter()
            .find(|o| produced_before.contains(*o) || **o == input)
        {
            bail!("graph output '{o}' is computed before the energy layer: every output must come after it");
        }
        let prefix_ops = prefix_nodes.iter().map(|n| n.op_type.clone()).collect();
        let prefix_outputs: Vec<&str> = std::iter::once(input.as_str())
            .chain(tap_names.iter().map(String::as_str))
            .collect();
        let prefix_proto = subgraph(&proto, prefix_nodes, graph_inputs.clone(), &prefix_outputs);
        let shapes = onnx::output_shapes(&prefix_proto, &manifest.input.shape, "prefix")?;
        let fs = shapes[0].clone();
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
        let taps = tap_names
            .into_iter()
            .zip(&shapes[1..])
            .map(|(name, s)| tap(name, s, (h, w)))
            .collect::<Result<Vec<Tap>>>()?;

        let fills = energy::fills(enode)?;
        let lowered_taps: Vec<(String, usize, usize, usize)> = taps
            .iter()
            .map(|t| (t.name.clone(), t.c, t.h, t.w))
            .collect();
        let mut plan = crate::sparse::lower::lower(
            &suffix_nodes,
            &consts,
            &output,
            (c, h, w),
            &lowered_taps,
            &graph_outputs,
            &fills,
        )?;
        plan.stride_rule = energy::stride_rule(enode)?;
        let suffix_inputs = std::iter::once(float_input(&output, &fs))
            .chain(taps.iter().map(|t| float_input(&t.name, &t.shape())))
            .collect();
        let outputs: Vec<&str> = graph_outputs.iter().map(String::as_str).collect();
        // Densely (the fallback, the baseline) a gate keeps every token.
        let dense_suffix_nodes = suffix_nodes.iter().map(energy_as_identity).collect();
        let suffix_proto = subgraph(&proto, dense_suffix_nodes, suffix_inputs, &outputs);
        let dense_proto = with_identity_energy(&proto);
        Ok(CutModel {
            origin: origin.to_path_buf(),
            manifest,
            cut: Cut {
                node: onnx::node_name(enode).to_string(),
                input,
                output,
                graph_outputs,
                taps,
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

/// The tap `name` of prefix shape `s`, checked against the cut's map size:
/// the same size, or a whole factor larger or smaller (rounded up, as a
/// strided layer's output is).
fn tap(name: String, s: &[usize], (h, w): (usize, usize)) -> Result<Tap> {
    let what = || format!("'{name}' (read after the energy layer, computed before it)");
    ensure!(
        s.len() == 4 && s[0] == 1 && s[1] >= 1 && s[2] >= 1 && s[3] >= 1,
        "{}: must be a [1, C, H, W] map to cross the cut, is {s:?}",
        what()
    );
    let (th, tw) = (s[2], s[3]);
    ensure!(
        crate::sparse::ops::gather::Scale::of((th, tw), (h, w)).is_some(),
        "{}: its {th}×{tw} map is not the cut's {h}×{w} times or divided by a whole factor",
        what()
    );
    ensure!(
        s[1] <= MAX_CHANNELS,
        "{}: {} channels, at most {MAX_CHANNELS}",
        what(),
        s[1]
    );
    Ok(Tap {
        name,
        c: s[1],
        h: th,
        w: tw,
    })
}

/// Declares `proto`'s input at `(w, h)` and the manifest's input and
/// stretch with it; the outputs' declared sizes are dropped (they follow).
/// Only a package that stretches the whole frame may change size; a
/// CenterFace detector's sides must be multiples of 32 (its FPN adds maps
/// of strides 4 to 32).
fn resize_input(
    manifest: &mut Manifest,
    proto: &mut ModelProto,
    (w, h): (usize, usize),
) -> Result<()> {
    use tract_onnx::pb::tensor_shape_proto::dimension::Value;
    ensure!(
        manifest.preprocess.resize.is_some(),
        "the package crops a centred square (a classifier's input); only a package that stretches the frame to its input (a detector) takes another size"
    );
    ensure!(
        (1..=manifest::MAX_INPUT_SIDE).contains(&w) && (1..=manifest::MAX_INPUT_SIDE).contains(&h),
        "each side must be between 1 and {}",
        manifest::MAX_INPUT_SIDE
    );
    if manifest
        .detector
        .as_ref()
        .is_some_and(|d| d.decoder == "centerface")
    {
        ensure!(
            w % 32 == 0 && h % 32 == 0,
            "a CenterFace detector's sides must be multiples of 32 (e.g. {}x{})",
            w.div_ceil(32) * 32,
            h.div_ceil(32) * 32
        );
    }
    let graph = proto
        .graph
        .as_mut()
        .context("not an ONNX model: no graph")?;
    let input = graph
        .input
        .iter_mut()
        .find(|i| i.name == manifest.input.name)
        .with_context(|| format!("the graph has no input '{}'", manifest.input.name))?;
    if let Some(tract_onnx::pb::type_proto::Value::TensorType(t)) =
        input.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        if let Some(shape) = t.shape.as_mut() {
            for (d, v) in shape.dim.iter_mut().zip([1, 3, h, w]) {
                d.value = Some(Value::DimValue(v as i64));
            }
        }
    }
    for o in graph.output.iter_mut() {
        if let Some(tract_onnx::pb::type_proto::Value::TensorType(t)) =
            o.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            t.shape = None;
        }
    }
    graph.value_info.clear();
    manifest.input.shape = vec![1, 3, h, w];
    manifest.preprocess.resize = Some([w, h]);
    Ok(())
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

/// The network with every energy node (the cut's and any gate) replaced
/// by Identity: every token kept.
fn with_identity_energy(proto: &ModelProto) -> ModelProto {
    let mut p = proto.clone();
    let g = p.graph.as_mut().expect("checked");
    for n in g.node.iter_mut() {
        *n = energy_as_identity(n);
    }
    p.opset_import.retain(|o| o.domain != energy::DOMAIN);
    p
}

/// An energy node (the cut's or a gate) as Identity, every token kept;
/// any other node as it is.
fn energy_as_identity(n: &NodeProto) -> NodeProto {
    let mut n = n.clone();
    if n.op_type == energy::OP_TYPE {
        n.op_type = "Identity".into();
        n.domain.clear();
        n.input.truncate(1);
        n.attribute.clear();
    }
    n
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
