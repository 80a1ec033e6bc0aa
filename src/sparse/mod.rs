//! The sparse suffix: layers after the energy layer, computed at kept tokens only.
//!
//! Semantics (DESIGN.md, "Sparse semantics"; models/README.md for fills): every
//! layer is evaluated at active positions only and inactive positions hold
//! zero, or the tensor's fill vector when the package gives one; a stride-s
//! layer's active set follows its input's by the package's [`StrideRule`] (the
//! s×s max-pool, or the centre tap); global pooling averages active tokens, or
//! every position of a filled map.

pub mod buffers;
pub mod gemm;
pub mod gpu;
pub mod ops;
pub mod plan;
pub mod rulebook;
pub mod tokens;
pub mod value;

pub use plan::{Level, Plan, Step};
pub use tokens::{StrideRule, TokenSet};
pub use value::Value;
