//! One frame of `ersm run` as a line of `--jsonl`: what it found, how it
//! compares with dense, and each mode's stage times.

use crate::pipeline::StageTimes;
use serde::Serialize;

/// One frame of `ersm run`, as a line of `--jsonl`. Fields are in
/// alphabetical order, the order the records have always had.
#[derive(Clone, Debug, Serialize)]
pub struct JsonRecord<'a> {
    /// The frame agrees with dense: the same top-1 class, or every dense
    /// face found and no other.
    pub agree: Option<bool>,
    /// The dense baseline's top-1 softmax margin.
    pub dense_margin: Option<f64>,
    /// A detector's faces by the dense baseline, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dense_faces: Option<Vec<FaceJson>>,
    pub dense_ms: Option<StageMs>,
    /// The dense baseline's class, when it ran (a classifier).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dense_top1: Option<usize>,
    pub ersm_ms: StageMs,
    /// A detector's faces, in frame pixels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faces: Option<Vec<FaceJson>>,
    pub fell_back: bool,
    /// Index in the stream (warm-up frames included).
    pub frame: usize,
    pub height: usize,
    pub keep_ratio: f64,
    pub kept_tokens: usize,
    pub label: String,
    pub name: &'a str,
    pub rss_mib: f64,
    /// A classifier's class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1: Option<usize>,
    /// Left out of the latency percentiles.
    pub warmup: bool,
    pub width: usize,
}

/// One face of a `--jsonl` record: its box and landmarks in frame pixels.
#[derive(Clone, Debug, Serialize)]
pub struct FaceJson {
    /// `[x1, y1, x2, y2]`.
    pub bbox: [f32; 4],
    /// Eyes, nose, mouth corners, `[x, y]` each.
    pub landmarks: [[f32; 2]; 5],
    pub score: f32,
}

impl FaceJson {
    /// The record of one detection.
    pub fn of(d: &crate::detect::Detection) -> FaceJson {
        FaceJson {
            bbox: [d.x1, d.y1, d.x2, d.y2],
            landmarks: d.landmarks,
            score: d.score,
        }
    }
}

/// One mode's stage times of a frame, ms (alphabetical, as in [`JsonRecord`]).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StageMs {
    pub ersm: f64,
    pub prefix: f64,
    pub preprocess: f64,
    pub suffix: f64,
    pub total: f64,
}

impl StageMs {
    /// The stage times of one frame.
    pub fn of(t: &StageTimes) -> StageMs {
        StageMs {
            ersm: t.ersm,
            prefix: t.prefix,
            preprocess: t.preprocess,
            suffix: t.suffix,
            total: t.total(),
        }
    }
}

/// One frame's `--dump` line (`bench`, `run`): the kept tokens and the raw
/// answer of each mode, for comparing two builds or two front ends (the
/// CLI and the Python package) frame by frame. A classifier's logits, or a
/// detector's faces; the dense side only when it ran.
pub fn dump_line(
    name: &str,
    kept: &[u32],
    ersm: (&crate::answer::Answer, &[f32]),
    dense: Option<(&crate::answer::Answer, &[f32])>,
    detector: bool,
) -> serde_json::Value {
    let mut rec = serde_json::json!({ "image": name, "kept": kept });
    let faces = |a: &crate::answer::Answer| -> Vec<FaceJson> {
        a.faces().iter().map(FaceJson::of).collect()
    };
    if detector {
        rec["faces"] = serde_json::json!(faces(ersm.0));
        if let Some((d, _)) = dense {
            rec["dense_faces"] = serde_json::json!(faces(d));
        }
    } else {
        rec["logits"] = serde_json::json!(ersm.1);
        if let Some((_, l)) = dense {
            rec["dense_logits"] = serde_json::json!(l);
        }
    }
    rec
}
