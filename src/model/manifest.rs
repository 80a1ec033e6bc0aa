//! `manifest.json`: what the network expects around it.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The package manifest (see models/README.md). A key it does not know is
/// an error naming it: a misspelt key would silently take its default.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// ONNX file, relative to the package folder.
    pub model: String,
    pub input: InputSpec,
    pub preprocess: Preprocess,
    /// The graph's output a classifier's logits are read from (checked
    /// against the graph when given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputSpec>,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub licence: serde_json::Value,
    /// The original network (ONNX file, relative to the package folder) that the
    /// dense baseline and the fallback run, when the sparse network's weights
    /// were fine-tuned away from it. Absent: the package's own network, every
    /// token kept, is the baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dense_model: Option<String>,
    /// Confidence fallback, chosen on training data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    /// How a detector's output maps become detections; absent for a
    /// classifier (whose output is logits over `labels`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detector: Option<DetectorSpec>,
    /// A detector's settings on a stream (`--track`), chosen on video.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track: Option<Track>,
}

/// On a stream, every energy layer keeps the tokens around the faces found
/// in the frame before; a gate may then run at another offset.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Track {
    /// Tokens of the cut kept around each face's box, on every side.
    pub margin: usize,
    /// Frames whose faces are held: 1, the last one's; more keep a face
    /// that one frame missed.
    #[serde(default = "one_frame")]
    pub frames: usize,
    /// Every `refresh`-th frame of a stream (its first included) runs the
    /// gates at the package's own offsets, so a face the stream's deeper
    /// gates miss is found within that many frames, then held. 0: never.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refresh: usize,
    /// Each face is also held where its motion since the frame before
    /// carries it one frame on, against faces that outrun the margin.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub predict: bool,
    /// Per gate (its node's name): what its unary costs move by on a stream,
    /// before the mean field (positive: it keeps less).
    #[serde(default)]
    pub gate_offsets: std::collections::BTreeMap<String, f32>,
    /// On the stream's frames, a moved gate also keeps what it would keep
    /// at the package's own offset where the cut's energy layer keeps
    /// tokens none of its last `new_tokens` frames kept (in 2×2 blocks,
    /// grown by the margin): a face's first frames, where nothing is held
    /// yet. 0: never.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub new_tokens: usize,
}

/// A detector's decoding.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorSpec {
    /// The output maps' meaning: `"centerface"` (heatmap, scale, offset,
    /// landmarks at stride 4).
    pub decoder: String,
    /// Heatmap score above which a position is a face.
    pub threshold: f32,
    /// IoU from which non-maximum suppression drops the weaker box.
    #[serde(default = "default_nms_iou")]
    pub nms_iou: f32,
}

fn one_frame() -> usize {
    1
}

fn default_nms_iou() -> f32 {
    0.3
}

/// The output a classifier reads its logits from.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub name: String,
}

/// When a frame is re-run densely: the sparse result's top-1 softmax
/// probability minus its top-2 is below `margin`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fallback {
    pub margin: f32,
}

/// The network input.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub name: String,
    /// `[1, 3, H, W]`.
    pub shape: Vec<usize>,
    /// `"NCHW"`, the only layout ersm feeds (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<String>,
    /// `"RGB"`, the only channel order ersm feeds (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub colour: Option<String>,
}

/// How a frame becomes the input tensor: the short side resized and a
/// centred square cropped (a classifier's view), or the whole frame
/// stretched to `resize` (a detector's: nothing of the frame is lost).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Resize so the short side is this long (bilinear).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resize_short: usize,
    /// Then centre-crop a square of this side.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub crop: usize,
    /// Instead: stretch the whole frame to `[W, H]` (antialiased bilinear).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<[usize; 2]>,
    /// Multiply 8-bit values by this (usually 1/255).
    pub scale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

impl Preprocess {
    /// The input tensor's width and height.
    pub fn output_size(&self) -> (usize, usize) {
        match self.resize {
            Some([w, h]) => (w, h),
            None => (self.crop, self.crop),
        }
    }
}

/// Largest input side a package may declare (pixels): memory and time are
/// sized from it before any frame is seen.
pub const MAX_INPUT_SIDE: usize = 4096;

impl Manifest {
    /// Reads and checks `path`.
    pub fn read(path: &Path) -> Result<Manifest> {
        crate::files::ensure_regular(path, "manifest")?;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let m: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid manifest", path.display()))?;
        m.check()
            .with_context(|| format!("{}: invalid manifest", path.display()))?;
        Ok(m)
    }

    /// Checks the values hang together.
    pub fn check(&self) -> Result<()> {
        let s = &self.input.shape;
        if s.len() != 4 || s[0] != 1 || s[1] != 3 {
            bail!("input.shape must be [1, 3, H, W], got {s:?}");
        }
        if !(1..=MAX_INPUT_SIDE).contains(&s[2]) || !(1..=MAX_INPUT_SIDE).contains(&s[3]) {
            bail!("input.shape {s:?}: H and W must be between 1 and {MAX_INPUT_SIDE}");
        }
        if let Some(l) = self.input.layout.as_deref().filter(|l| *l != "NCHW") {
            bail!("input.layout \"{l}\": ersm feeds NCHW tensors only");
        }
        if let Some(c) = self.input.colour.as_deref().filter(|c| *c != "RGB") {
            bail!("input.colour \"{c}\": ersm feeds RGB frames only (a network trained on BGR needs its first conv's input channels swapped)");
        }
        let p = &self.preprocess;
        if p.resize_short > 2 * MAX_INPUT_SIDE {
            bail!(
                "preprocess.resize_short {} is above the limit {}",
                p.resize_short,
                2 * MAX_INPUT_SIDE
            );
        }
        if !(p.scale.is_finite() && p.scale > 0.0 && p.scale <= 1.0) {
            bail!(
                "preprocess.scale must be in (0, 1] (e.g. 1/255), got {}",
                p.scale
            );
        }
        if p.mean.iter().any(|m| !(m.is_finite() && m.abs() <= 255.0)) {
            bail!(
                "preprocess.mean must hold finite values in [-255, 255], got {:?}",
                p.mean
            );
        }
        if p.std
            .iter()
            .any(|x| !(x.is_finite() && (1e-3..=255.0).contains(x)))
        {
            bail!(
                "preprocess.std must hold finite values in [0.001, 255], got {:?}",
                p.std
            );
        }
        match p.resize {
            Some([w, h]) => {
                if p.crop != 0 || p.resize_short != 0 {
                    bail!("preprocess: give resize, or resize_short and crop, not both");
                }
                if (h, w) != (s[2], s[3]) {
                    bail!(
                        "preprocess.resize [{w}, {h}] (width, height) does not match the input size {}×{}",
                        s[2],
                        s[3]
                    );
                }
            }
            None => {
                if p.crop != s[2] || p.crop != s[3] {
                    bail!(
                        "preprocess.crop {} does not match the input size {}×{}",
                        p.crop,
                        s[2],
                        s[3]
                    );
                }
                if p.resize_short < p.crop {
                    bail!(
                        "preprocess.resize_short {} is smaller than crop {}",
                        p.resize_short,
                        p.crop
                    );
                }
            }
        }
        if let Some(f) = &self.fallback {
            if !(0.0..=1.0).contains(&f.margin) {
                bail!(
                    "fallback.margin must be a probability margin in [0, 1], got {}",
                    f.margin
                );
            }
        }
        if let Some(d) = &self.detector {
            if d.decoder != "centerface" {
                bail!(
                    "detector.decoder \"{}\" is not one ersm decodes (\"centerface\")",
                    d.decoder
                );
            }
            if !(d.threshold > 0.0 && d.threshold < 1.0) {
                bail!("detector.threshold must be in (0, 1), got {}", d.threshold);
            }
            if !(d.nms_iou > 0.0 && d.nms_iou <= 1.0) {
                bail!("detector.nms_iou must be in (0, 1], got {}", d.nms_iou);
            }
            if self.fallback.is_some() {
                bail!("fallback (a classifier's top-1 margin) does not apply to a detector");
            }
        }
        if let Some(t) = &self.track {
            if self.detector.is_none() {
                bail!("track (a detector's stream settings) needs a detector section");
            }
            if t.margin > 64 {
                bail!("track.margin must be at most 64 tokens, got {}", t.margin);
            }
            if !(1..=100).contains(&t.frames) {
                bail!("track.frames must be 1-100 frames, got {}", t.frames);
            }
            if t.refresh == 1 || t.refresh > 10_000 {
                bail!(
                    "track.refresh must be 0 (never) or 2-10000 frames, got {} (1 would run every frame at the package's own offsets: leave gate_offsets out instead)",
                    t.refresh
                );
            }
            if t.new_tokens > 100 {
                bail!(
                    "track.new_tokens must be 0 (never) or 1-100 frames, got {}",
                    t.new_tokens
                );
            }
            for (gate, off) in &t.gate_offsets {
                if !(off.is_finite() && off.abs() <= 100.0) {
                    bail!("track.gate_offsets.{gate} must be finite, within ±100, got {off}");
                }
            }
        }
        if let Some(d) = &self.dense_model {
            if d.is_empty() || d == &self.model {
                bail!("dense_model must name another ONNX file than model, got \"{d}\"");
            }
        }
        Ok(())
    }

    /// The label of class `i`, or `#i` when the manifest has none.
    pub fn label(&self, i: usize) -> String {
        self.labels
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("#{i}"))
    }
}
