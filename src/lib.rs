//! ersm: Energy-Regularized Spatial Masking for sparse CNN inference on embedded GPUs.
//!
//! Data flows one way: `source` → `preprocess` → `prefix` (tract, dense) →
//! `ersm` (energies, keep, gather) → `sparse` (suffix on kept tokens) → `report`.
//! `model` loads a package and cuts it into those parts; `pipeline` wires them.
//! `run` drives a stream through the pipeline; at its end `report` summarises
//! and `live` (viewer, MJPEG, metrics, RTP/RTSP) shows it while it goes on.
//! `sparse::gpu` runs the suffix on a GPU; `gpu` is the one CUDA device
//! every GPU user goes through.

pub mod answer;
pub mod bench;
pub mod caption;
pub mod capture;
pub mod cli;
mod depthwise_row;
pub mod detect;
pub mod ersm;
pub mod eval;
pub mod faces;
pub mod files;
pub mod gpu;
pub mod infer;
pub mod inverted_residual;
mod lanes;
pub mod live;
pub mod logits;
pub mod model;
pub mod onnx;
pub mod overlay;
pub mod package;
pub mod panics;
pub mod pipeline;
pub mod placement;
pub mod plot;
pub mod prefix;
pub mod preprocess;
pub mod profile;
pub mod record;
pub mod relay;
pub mod report;
pub mod rowgemm;
pub mod run;
pub mod source;
pub mod sparse;
pub mod stem;
pub mod strided_depthwise;
pub mod threads;
pub mod track;
#[cfg(test)]
mod tract_nets;
