//! Sparse suffix ops, one per file. Each holds its configuration and weights,
//! prepared at load; `eval` runs it on one frame's token sets.

pub mod activation;
pub mod affine;
pub mod binary;
pub mod conv;
pub mod depthwise;
pub mod linear;
pub mod pool;
pub mod reshape;

use super::buffers::Buffers;
use super::plan::Frame;
use super::value::Value;
use anyhow::Result;
use std::borrow::Cow;
use std::fmt::Debug;

pub use activation::{Activation, ActivationKind};
pub use affine::ChannelAffine;
pub use binary::{Binary, BinaryKind};
pub use conv::Conv;
pub use depthwise::Depthwise;
pub use linear::Linear;
pub use pool::GlobalMean;
pub use reshape::Reshape;

/// One lowered suffix op.
pub trait Op: Debug + Send + Sync + std::any::Any {
    /// Short op name for listings.
    fn name(&self) -> &'static str;
    /// Computes the output, taking new buffers from `bufs`. Inputs arrive
    /// owned (to be reused in place) only when [`Op::in_place`] says so.
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
    /// Applies `act` to this op's output from now on, inside its own row loop;
    /// false when the op cannot.
    fn fuse_activation(&mut self, _act: ActivationKind) -> bool {
        false
    }
    /// The activation fused into this op, if any (for listings).
    fn fused(&self) -> Option<ActivationKind> {
        None
    }
}
