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
pub trait Op: Debug + Send + Sync {
    /// Short op name for listings.
    fn name(&self) -> &'static str;
    /// Computes the output. Owned inputs may be reused in place.
    fn eval(&self, inputs: Vec<Cow<'_, Value>>, frame: &Frame) -> Result<Value>;
    /// Multiply-accumulates for the given active-token count per level.
    fn cost(&self, tokens: &[usize]) -> u64;
}
