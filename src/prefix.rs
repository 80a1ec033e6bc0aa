//! Dense execution in tract: the prefix before the energy layer, and the dense
//! baseline's suffix. Each net is optimised once for its fixed input shape.

use crate::stem::{self, Patches};
use anyhow::{Context, Result};
use std::sync::{Arc, Mutex, PoisonError};
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;

/// Where a tract net runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// tract's CPU plan, on the pipeline's threads.
    Cpu,
    /// tract-cuda on CUDA device 0. Inputs are uploaded; an output stays on
    /// the device until read ([`Output`]), and goes back in as it is.
    Cuda,
}

impl Engine {
    /// Short name for logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Cpu => "cpu",
            Engine::Cuda => "cuda",
        }
    }
}

#[cfg(feature = "gpu-prefix")]
fn cuda_plan(source: &TypedModel) -> Result<Arc<TypedRunnableModel>> {
    // Linking tract-cuda registers its runtime with tract.
    use tract_cuda as _;
    let rt = tract_core::runtime::runtime_for_name("cuda")?
        .context("tract has no \"cuda\" runtime registered")?;
    let runnable = rt.prepare(source.clone())?;
    let plan = runnable
        .typed_plan()
        .context("tract-cuda returned a plan ersm cannot run")?;
    Ok(plan.clone())
}

#[cfg(not(feature = "gpu-prefix"))]
fn cuda_plan(_source: &TypedModel) -> Result<Arc<TypedRunnableModel>> {
    anyhow::bail!("this build binds CUDA 11.4 (JetPack 5); tract-cuda needs CUDA 12.2 or later")
}

/// A tract network of fixed shapes: one input (the image or the cut's map),
/// or several (the cut's map and the prefix maps a suffix reads beside it),
/// and one output or several (a detector's maps).
pub struct TractNet {
    plan: Arc<TypedRunnableModel>,
    /// The typed graph before optimisation, from which a GPU plan is prepared.
    source: TypedModel,
    /// The net's name in errors.
    what: String,
    /// Where the plan runs.
    pub engine: Engine,
    /// Input shape.
    pub input_shape: Vec<usize>,
    /// The first conv's patches, gathered from the input before the plan
    /// runs, when the stem was rewritten ([`crate::stem`]).
    stem: Option<Patches>,
    /// Whether the plan's first block gathers the stem's patches itself
    /// ([`crate::inverted_residual::fuse_stem`]): the plan then reads the
    /// image.
    stem_fused: bool,
    /// The graph as it was before the stem rewrite (only when it was
    /// rewritten), from which a GPU plan is prepared.
    unpatched: Option<ModelProto>,
    /// The patch tensor, kept between frames: 1.35 MB for MobileNetV2, which
    /// as a fresh allocation costs page faults every frame. tract only reads
    /// it (it writes in place only into inputs nobody else holds).
    patch_buf: Mutex<Option<Arc<Tensor>>>,
    /// First output's shape.
    pub output_shape: Vec<usize>,
    /// Op names in evaluation order, before optimisation (for listings).
    pub ops: Vec<String>,
}

impl TractNet {
    /// Builds and optimises `proto`, whose first input gets shape `input_shape`
    /// (other inputs keep the shapes the graph declares). `what` names the net in errors.
    pub fn new(proto: &ModelProto, input_shape: &[usize], what: &str) -> Result<TractNet> {
        TractNet::build(proto, input_shape, None, what)
    }

    /// Like [`TractNet::new`] for a net that reads the image: its first conv
    /// runs as a product over patches gathered here ([`crate::stem`]) when it
    /// can, unless `ERSM_STEM_PATCHES=0` (to measure tract's own stem).
    pub fn from_image(proto: &ModelProto, input_shape: &[usize], what: &str) -> Result<TractNet> {
        let mut patched = proto.clone();
        let stem = if std::env::var("ERSM_STEM_PATCHES").is_ok_and(|v| v == "0") {
            None
        } else {
            stem::rewrite(&mut patched, input_shape)
        };
        let rewritten = stem.is_some();
        let mut net = TractNet::build(&patched, input_shape, stem, what)?;
        if rewritten {
            net.unpatched = Some(proto.clone());
        }
        Ok(net)
    }

    fn build(
        proto: &ModelProto,
        input_shape: &[usize],
        stem: Option<Patches>,
        what: &str,
    ) -> Result<TractNet> {
        let plan_input = stem.as_ref().map_or(input_shape.to_vec(), Patches::shape);
        let typed = typed(proto, &plan_input, what)?;
        let ops = typed
            .eval_order()?
            .iter()
            .map(|&n| typed.node(n).op().name().to_string())
            .collect();
        let output_shape = typed
            .output_fact(0)?
            .shape
            .as_concrete()
            .with_context(|| format!("{what}: output shape is not concrete"))?
            .to_vec();
        let source = typed.clone();
        let mut typed = typed;
        // An inverted-residual block runs row by row in cache
        // (`crate::inverted_residual`), unless `ERSM_FUSED_BLOCKS=0`; any
        // other stride-2 depthwise conv, which tract runs on its scalar path,
        // runs as ersm's kernel with the same bits (`crate::strided_depthwise`),
        // unless `ERSM_STRIDED_DEPTHWISE=0` (to measure tract's own).
        let mut stem_fused = false;
        if !std::env::var("ERSM_FUSED_BLOCKS").is_ok_and(|v| v == "0") {
            crate::inverted_residual::rewrite(&mut typed)
                .with_context(|| format!("{what}: inverted-residual rewrite"))?;
            if let Some(p) = &stem {
                stem_fused = crate::inverted_residual::fuse_stem(&mut typed, p)
                    .with_context(|| format!("{what}: stem into the first block"))?;
            }
        }
        if !std::env::var("ERSM_STRIDED_DEPTHWISE").is_ok_and(|v| v == "0") {
            crate::strided_depthwise::rewrite(&mut typed)
                .with_context(|| format!("{what}: stride-2 depthwise rewrite"))?;
        }
        let plan = typed
            .into_optimized()
            .with_context(|| format!("{what}: tract optimisation failed"))?
            .into_runnable()?;
        Ok(TractNet {
            plan,
            source,
            what: what.to_string(),
            engine: Engine::Cpu,
            input_shape: input_shape.to_vec(),
            stem,
            stem_fused,
            unpatched: None,
            patch_buf: Mutex::default(),
            output_shape,
            ops,
        })
    }

    /// The stem's patches, when its first conv runs as a product over them.
    pub fn patches(&self) -> Option<&Patches> {
        self.stem.as_ref()
    }

    /// Whether the first fused block gathers the stem's patches itself, row
    /// by row, from the image the plan reads.
    pub fn stem_fused(&self) -> bool {
        self.stem_fused
    }

    /// The same net prepared by tract-cuda on CUDA device 0 (cuDNN convolutions,
    /// tract's own kernels for the rest). Fails with the reason when tract-cuda
    /// cannot serve: no driver, a missing CUDA library (cuDNN, cuBLAS, NVRTC,
    /// cudart), a driver older than CUDA 12.2, an op it cannot run, or a build
    /// for CUDA 11.4 (JetPack 5), which tract-cuda does not support.
    pub fn on_cuda(&self) -> Result<TractNet> {
        let source = self.gpu_source()?;
        let plan = cuda_plan(&source).with_context(|| format!("{}: tract-cuda", self.what))?;
        Ok(TractNet {
            plan,
            source,
            what: self.what.clone(),
            engine: Engine::Cuda,
            input_shape: self.input_shape.clone(),
            stem: None,
            stem_fused: false,
            unpatched: None,
            patch_buf: Mutex::default(),
            output_shape: self.output_shape.clone(),
            ops: self.ops.clone(),
        })
    }

    /// The typed graph a GPU plan is prepared from: the one before the stem
    /// rewrite. The rewrite routes around tract's CPU im2col; cuDNN runs the
    /// stem conv as it is, and patches gathered on the host would only add
    /// host work and a 2.25× larger upload (27 channels against 3).
    fn gpu_source(&self) -> Result<TypedModel> {
        match &self.unpatched {
            Some(proto) => typed(proto, &self.input_shape, &self.what),
            None => Ok(self.source.clone()),
        }
    }

    /// Runs the net on `input` (row-major, of `input_shape`); returns the
    /// values of every output, one after another.
    pub fn run(&self, input: &[f32]) -> Result<Vec<f32>> {
        flatten(self.plan.run(tvec![self.input(input)?])?, &self.what)
    }

    /// Runs the net on `input` and returns every output as tract hands it
    /// over: from a tract-cuda plan still in device memory.
    pub fn run_outputs(&self, input: &[f32]) -> Result<Vec<Output>> {
        let out = self.plan.run(tvec![self.input(input)?])?;
        anyhow::ensure!(!out.is_empty(), "{}: the plan has no output", self.what);
        Ok(out.into_iter().map(Output).collect())
    }

    /// Runs a net whose inputs are another net's outputs, handed over as
    /// they are (between two tract-cuda plans the values never leave the
    /// device); the values of every output, one after another.
    pub fn run_from(&self, xs: &[&Output]) -> Result<Vec<f32>> {
        anyhow::ensure!(
            self.stem.is_none(),
            "{}: a net that reads the image takes pixels, not another net's output",
            self.what
        );
        let first = xs.first().map(|x| x.0.shape());
        anyhow::ensure!(
            first == Some(self.input_shape.as_slice()),
            "{}: input has shape {:?}, {:?} needed",
            self.what,
            first,
            self.input_shape
        );
        let inputs = xs.iter().map(|x| x.0.clone()).collect();
        flatten(self.plan.run(inputs)?, &self.what)
    }

    /// `input` as the plan's input tensor: the patches when the stem was
    /// rewritten and the first block does not gather them itself, else the
    /// values themselves.
    fn input(&self, input: &[f32]) -> Result<TValue> {
        let Some(stem) = self.stem.as_ref().filter(|_| !self.stem_fused) else {
            return Ok(Tensor::from_shape(&self.input_shape, input)?.into());
        };
        let want: usize = self.input_shape.iter().product();
        anyhow::ensure!(
            input.len() == want,
            "{}: input has {} values, {:?} needs {want}",
            self.what,
            input.len(),
            self.input_shape
        );
        let held = self
            .patch_buf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // A buffer still held elsewhere (a run on another thread) is not reused.
        let mut buf = match held.filter(|b| Arc::strong_count(b) == 1) {
            Some(b) => b,
            None => Arc::new(Tensor::zero::<f32>(&stem.shape())?),
        };
        let t = Arc::get_mut(&mut buf).context("patch buffer shared")?;
        stem.gather(input, t.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
        *self
            .patch_buf
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(buf.clone());
        Ok(buf.into_tvalue())
    }

    /// Runs the net once on `input`, timing every node of the optimised plan:
    /// `(op, output shape, ms)` in evaluation order (tract's own per-op view).
    pub fn profile(&self, input: &[f32]) -> Result<Vec<(String, String, f64)>> {
        let mut state = self.plan.spawn()?;
        let mut times = Vec::new();
        state.run_plan_with_eval(tvec![self.input(input)?], |ctx, st, node, inputs| {
            let t = std::time::Instant::now();
            let out = tract_core::plan::eval(ctx, st, node, inputs);
            let shape = node
                .outputs
                .first()
                .map(|o| format!("{:?}", o.fact.shape))
                .unwrap_or_default();
            times.push((
                node.op().name().to_string(),
                shape,
                t.elapsed().as_secs_f64() * 1e3,
            ));
            out
        })?;
        Ok(times)
    }

    /// Runs a net with several inputs, each `(shape, values)`, as the plan
    /// takes them (no stem patches are gathered); the values of every
    /// output, one after another.
    pub fn run_many(&self, inputs: &[(&[usize], &[f32])]) -> Result<Vec<f32>> {
        let inputs = inputs
            .iter()
            .map(|(shape, data)| Ok(Tensor::from_shape(shape, data)?.into()))
            .collect::<Result<TVec<TValue>>>()?;
        flatten(self.plan.run(inputs)?, &self.what)
    }
}

/// `proto` typed by tract with its first input of shape `input_shape`, before
/// optimisation.
fn typed(proto: &ModelProto, input_shape: &[usize], what: &str) -> Result<TypedModel> {
    let mut typed = crate::onnx::typed(proto, input_shape, what)?;
    // tract's channel-last rewrite moves depthwise convs onto its vectorised
    // channel-last kernel but slows the 1×1 products; on x86 it measured even
    // (docs/performance.md), so it stays off unless asked for, to measure on
    // another CPU (a Jetson's Cortex-A78).
    if std::env::var("ERSM_TRACT_NHWC").is_ok_and(|v| v == "1") {
        let t = tract_core::transform::get_transform("conv_nhwc")?
            .context("tract has no conv_nhwc transform")?;
        t.transform(&mut typed)
            .with_context(|| format!("{what}: channel-last rewrite"))?;
    }
    Ok(typed)
}

/// A net's output. From a tract-cuda plan the values stay in device memory
/// until something reads them ([`Output::to_vec`] copies them back once).
pub struct Output(TValue);

impl Output {
    /// The values, row-major, where tract keeps them (read back from the
    /// device the first time): no copy of a host tensor.
    pub fn values(&self) -> Result<&[f32]> {
        self.0.try_as_plain_ram()?.as_slice::<f32>()
    }

    /// A copy of the values.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        Ok(self.values()?.to_vec())
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when the output holds no values.
    pub fn is_empty(&self) -> bool {
        self.0.len() == 0
    }

    /// The device address of the values, when they are still on the GPU as
    /// one packed f32 buffer of their own (valid while `self` lives, the
    /// work that wrote them finished). `None` for a host tensor, or one
    /// tract-cuda had to copy out (a view into its per-run arena).
    #[cfg(feature = "gpu-prefix")]
    pub fn device_ptr(&self) -> Option<u64> {
        use tract_gpu::tensor::LazyHostStorage;
        let lazy = self.0.storage_as::<LazyHostStorage>()?;
        // A materialised tensor may have been written on the host since.
        if lazy.is_materialized() {
            return None;
        }
        let d = lazy.device()?;
        let packed = d.strides() == Tensor::natural_strides(d.shape()).as_slice();
        if d.datum_type() != f32::datum_type() || !packed || d.is_exotic() {
            return None;
        }
        let base = d.device_buffer_ptr() as u64;
        Some(base + d.buffer_offset::<u64>())
    }

    /// Without tract-cuda (a CUDA 11.4 build) outputs are on the host.
    #[cfg(not(feature = "gpu-prefix"))]
    pub fn device_ptr(&self) -> Option<u64> {
        None
    }
}

/// The values of a plan's outputs, one after another (a copy).
fn flatten(out: TVec<TValue>, what: &str) -> Result<Vec<f32>> {
    anyhow::ensure!(!out.is_empty(), "{what}: the plan has no output");
    let mut values = Vec::with_capacity(out.iter().map(|o| o.len()).sum());
    for o in out {
        values.extend_from_slice(Output(o).values()?);
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU plan is prepared from the graph before the stem rewrite: it
    /// reads the image itself and computes what the patched CPU plan does.
    #[test]
    fn gpu_source_is_the_unpatched_graph() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/mobilenet_v2_ersm");
        let pkg = crate::package::ModelPackage::load(dir).unwrap();
        let prefix = &pkg.prefix;
        assert!(prefix.patches().is_some(), "the shipped stem is rewritten");
        let source = prefix.gpu_source().unwrap();
        let fact = source.input_fact(0).unwrap();
        assert_eq!(
            fact.shape.as_concrete().unwrap(),
            &prefix.input_shape[..],
            "the GPU graph reads the image"
        );
        let image: Vec<f32> = (0..prefix.input_shape.iter().product::<usize>())
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let plain = source.into_optimized().unwrap().into_runnable().unwrap();
        let want = flatten(
            plain
                .run(tvec![Tensor::from_shape(&prefix.input_shape, &image)
                    .unwrap()
                    .into()])
                .unwrap(),
            "unpatched prefix",
        )
        .unwrap();
        let got = prefix.run(&image).unwrap();
        assert_eq!(want.len(), got.len());
        let worst = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-4,
            "patched and unpatched prefixes differ by {worst}"
        );
    }

    /// A CPU plan's output is a host tensor (no device address), and handing
    /// it to the next net as it is computes what its values do.
    #[test]
    fn an_output_hands_over_to_the_next_net() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/mobilenet_v2_ersm");
        let pkg = crate::package::ModelPackage::load(dir).unwrap();
        let image: Vec<f32> = (0..pkg.prefix.input_shape.iter().product::<usize>())
            .map(|i| ((i * 104729 % 997) as f32 / 498.0) - 1.0)
            .collect();
        let out = pkg.prefix.run_outputs(&image).unwrap().remove(0);
        assert_eq!(out.device_ptr(), None, "a CPU plan's output is on the host");
        let values = out.to_vec().unwrap();
        assert_eq!(values, pkg.prefix.run(&image).unwrap());
        assert_eq!(out.values().unwrap(), &values[..]);
        let dense = pkg.baseline_suffix();
        assert_eq!(
            dense.run_from(&[&out]).unwrap(),
            dense.run(&values).unwrap(),
            "the handed-over output and its values give different logits"
        );
        // The prefix reads pixels: another net's output is refused by name.
        let err = pkg.prefix.run_from(&[&out]).unwrap_err().to_string();
        assert!(err.contains("reads the image"), "{err}");
        // A wrongly shaped output is refused, naming both shapes.
        let small = Output(Tensor::zero::<f32>(&[1, 3]).unwrap().into());
        let err = dense.run_from(&[&small]).unwrap_err().to_string();
        assert!(err.contains("[1, 3]"), "{err}");
    }
}
