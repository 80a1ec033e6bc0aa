//! Sparse suffix ops, one per file. Each file holds all of an op: its ONNX
//! builder (`from_onnx`), its CPU evaluation ([`Op::eval`]) and its GPU twin
//! (the arrays it uploads once, and [`Op::record`], which records its launch
//! with the op's own parameter struct for its kernel in
//! `sparse/kernels/<family>.cu`). [`BUILDERS`] maps ONNX op types to the
//! builders; `docs/adding-an-op.md` says how a new op moves in.

pub mod activation;
pub mod affine;
pub mod binary;
pub mod build;
pub mod conv;
pub mod conv_transpose;
pub mod depthwise;
pub mod gate;
pub mod gather;
pub mod linear;
pub mod merge;
pub mod pool;
pub mod reshape;

use super::buffers::Buffers;
use super::frame::Frame;
use super::launch::StepIo;
use super::value::{Shape, Value};
use anyhow::{bail, Result};
use std::borrow::Cow;
use std::fmt::Debug;
use std::sync::Arc;

pub use activation::{Activation, ActivationKind};
pub use affine::ChannelAffine;
pub use binary::{Binary, BinaryKind};
pub use build::{Lowered, OnnxNode, Tensor};
pub use conv::Conv;
pub use depthwise::Depthwise;
pub use gate::Gate;
pub use linear::Linear;
pub use pool::GlobalMean;
pub use reshape::Reshape;

/// Lowers one ONNX node (and any node it folds) into steps; the tensor it
/// computes.
pub type Builder = fn(&mut OnnxNode<'_>) -> Result<Tensor>;

/// An ONNX op type the sparse executor runs.
pub struct OnnxOp {
    pub op_type: &'static str,
    /// Inputs read by position (optional ones past these are looked up
    /// with `get`): a node with fewer is malformed.
    pub inputs: usize,
    pub build: Builder,
}

/// Every ONNX op type after the energy layer the sparse executor runs.
#[rustfmt::skip]
pub const BUILDERS: &[OnnxOp] = &[
    OnnxOp { op_type: "Conv", inputs: 2, build: conv::from_onnx },
    OnnxOp { op_type: "ConvTranspose", inputs: 2, build: conv_transpose::from_onnx },
    OnnxOp { op_type: "BatchNormalization", inputs: 5, build: affine::batch_norm_from_onnx },
    OnnxOp { op_type: "Relu", inputs: 1, build: activation::from_onnx },
    OnnxOp { op_type: "Clip", inputs: 1, build: activation::from_onnx },
    OnnxOp { op_type: "Sigmoid", inputs: 1, build: activation::from_onnx },
    OnnxOp { op_type: "HardSigmoid", inputs: 1, build: activation::from_onnx },
    OnnxOp { op_type: "HardSwish", inputs: 1, build: activation::from_onnx },
    OnnxOp { op_type: "Add", inputs: 2, build: binary::from_onnx },
    OnnxOp { op_type: "Mul", inputs: 2, build: binary::from_onnx },
    OnnxOp { op_type: "GlobalAveragePool", inputs: 1, build: pool::from_onnx },
    OnnxOp { op_type: "ReduceMean", inputs: 1, build: pool::from_onnx },
    OnnxOp { op_type: "Flatten", inputs: 1, build: reshape::flatten_from_onnx },
    OnnxOp { op_type: "Reshape", inputs: 2, build: reshape::from_onnx },
    OnnxOp { op_type: "Gemm", inputs: 2, build: linear::gemm_from_onnx },
    OnnxOp { op_type: "MatMul", inputs: 2, build: linear::matmul_from_onnx },
    OnnxOp { op_type: "Identity", inputs: 1, build: reshape::identity_from_onnx },
    OnnxOp { op_type: "Dropout", inputs: 1, build: reshape::identity_from_onnx },
    OnnxOp { op_type: crate::ersm::node::OP_TYPE, inputs: 1, build: gate::from_onnx },
];

/// The ONNX op types of [`BUILDERS`].
pub fn supported() -> Vec<&'static str> {
    BUILDERS.iter().map(|b| b.op_type).collect()
}

/// One op applied to value slots.
#[derive(Debug)]
pub struct Step {
    /// The ONNX node it came from (first node, when several were fused).
    pub node: String,
    pub op: Arc<dyn Op>,
    pub inputs: Vec<usize>,
    pub output: usize,
}

impl Step {
    /// The op's name, with the activation fused into it (`Conv1x1+Clip`).
    pub fn label(&self) -> String {
        match self.op.fused() {
            Some(a) => format!("{}+{}", self.op.name(), a.name()),
            None => self.op.name().to_string(),
        }
    }
}

/// One lowered suffix op.
pub trait Op: Debug + Send + Sync {
    /// Short op name for listings.
    fn name(&self) -> &'static str;
    /// Computes the output on the CPU, taking new buffers from `bufs`.
    /// Inputs arrive owned (to be reused in place) only when
    /// [`Op::in_place`] says so.
    fn eval(&self, inputs: Vec<Cow<'_, Value>>, frame: &Frame, bufs: &Buffers) -> Result<Value>;
    /// Multiply-accumulates for the given active-token count per level.
    fn cost(&self, tokens: &[usize]) -> u64;
    /// True when the output can overwrite an input read for the last time
    /// (elementwise ops); other ops leave their inputs to be recycled.
    fn in_place(&self) -> bool {
        false
    }
    /// The function, when this op is a lone activation (a fusion candidate).
    fn activation(&self) -> Option<ActivationKind> {
        None
    }
    /// This op applying `act` to its output inside its own row loop (and
    /// its GPU kernel); `None` when it cannot.
    fn with_activation(&self, _act: ActivationKind) -> Option<Arc<dyn Op>> {
        None
    }
    /// The activation fused into this op, if any (for listings).
    fn fused(&self) -> Option<ActivationKind> {
        None
    }
    /// True for an Add of two computed values.
    fn is_add(&self) -> bool {
        false
    }
    /// True when the GPU twin can add the next step's residual (an Add of
    /// its output and another value) in its own kernel.
    fn takes_residual(&self) -> bool {
        false
    }
    /// When the output is the input's values under another shape (a
    /// reshape): that shape, so a GPU step may relabel the input's buffer.
    fn relabel(&self, _input: &Shape) -> Option<Result<Shape>> {
        None
    }
    /// The op as a gate (a second energy layer), which narrows its level's
    /// set before it runs.
    fn gate(&self) -> Option<&Gate> {
        None
    }
    /// GPU twin: the arrays its kernel reads, uploaded once at load in this
    /// order; `None` when the op has no GPU kernel.
    fn gpu_arrays(&self) -> Option<Vec<Cow<'_, [f32]>>> {
        None
    }
    /// GPU twin: records the launch computing this op's output into a
    /// buffer from `io.output`, reading the arrays uploaded from
    /// [`Op::gpu_arrays`] at `arrays`; the output's shape.
    fn record(&self, _io: &mut StepIo<'_>, _arrays: &[u64]) -> Result<Shape> {
        bail!("{} has no GPU kernel", self.name())
    }
}
