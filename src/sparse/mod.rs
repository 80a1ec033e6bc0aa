//! The sparse suffix: layers after the energy layer, computed at kept tokens only.
//!
//! Semantics (DESIGN.md, "Sparse semantics"; models/README.md for fills): every
//! layer is evaluated at active positions only and inactive positions hold
//! zero, or the tensor's fill vector when the package gives one; a stride-s
//! layer's active set follows its input's by the package's [`StrideRule`] (the
//! s×s max-pool, or the centre tap); global pooling averages active tokens, or
//! every position of a filled map.
//!
//! `lower` turns ONNX nodes into a [`Plan`] through each op's builder;
//! `ops/` holds each op whole (builder, CPU, GPU twin); `plan` runs the steps
//! on the CPU, `gpu` on a GPU, both on one [`frame::Frame`] of token sets and
//! rulebooks.

pub mod buffers;
pub mod frame;
pub mod gemm;
pub mod gpu;
pub mod launch;
pub mod lower;
pub mod ops;
pub mod plan;
pub mod rulebook;
pub mod tokens;
pub mod value;

pub use frame::{Frame, Level};
pub use plan::{Plan, Step};
pub use tokens::{StrideRule, TokenSet};
pub use value::{Shape, Value};
