//! Sparsity: how many tokens each image keeps, with no budget imposed, and
//! what that costs: top-1 agreement with the dense baseline, the confidence
//! fallback, and the effective suffix compute.

use super::Analysed;
use crate::answer::{Answer, Comparison};
use crate::detect::Agreement;
use crate::pipeline::Pipeline;
use crate::report::FaceSummary;
use anyhow::Result;
use serde::Serialize;

/// Keep ratio of one image.
#[derive(Clone, Debug, Serialize)]
pub struct ImageKeep {
    pub image: String,
    pub keep_ratio: f64,
    pub kept: usize,
    pub tokens: usize,
    /// ERSM's answer (after any fallback) is the dense baseline's: the same
    /// top-1, or exactly the dense faces.
    pub agrees: bool,
    /// The confidence fallback re-ran this image densely.
    pub fell_back: bool,
    /// Suffix multiply-accumulates spent, as a fraction of the dense suffix's
    /// (sparse plus, when it fell back, dense).
    pub compute: f64,
    /// The dense baseline's top-1 softmax margin: how sure the reference is
    /// (0 for a detector).
    pub dense_margin: f64,
    /// A detector's faces: by dense, and matched by ERSM.
    pub dense_faces: usize,
    pub matched_faces: usize,
}

pub use crate::logits::SURE_MARGIN;

/// Keep ratios over a set of images.
#[derive(Clone, Debug, Serialize)]
pub struct Sparsity {
    pub images: Vec<ImageKeep>,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    /// Images per keep-ratio bin of width 0.1 (0–0.1, …, 0.9–1.0).
    pub histogram: Vec<usize>,
    /// Fraction of images whose top-1 is the dense baseline's.
    pub agreement: f64,
    /// Fraction of images re-run densely (absent when the fallback is off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_rate: Option<f64>,
    /// Mean effective suffix compute, as a fraction of dense.
    pub compute: f64,
    /// Images the dense network is sure of (margin ≥ [`SURE_MARGIN`]), and
    /// the agreement on them (absent when there are none).
    pub sure_images: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sure_agreement: Option<f64>,
    /// A detector's faces against dense's over every image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faces: Option<FaceSummary>,
}

/// Summarises analysed images, running the sparse suffix on each (and the
/// fallback where the pipeline has it on and the result is unsure).
pub fn of(p: &Pipeline, images: &[Analysed]) -> Result<Sparsity> {
    let plan = &p.model.plan;
    let dense = plan.dense_cost().max(1) as f64;
    let mut per = Vec::with_capacity(images.len());
    let reader = &p.model.reader;
    // Detections are matched in input pixels: IoU does not change with the
    // frame's scaling.
    let (iw, ih) = (
        p.model.manifest.input.shape[3],
        p.model.manifest.input.shape[2],
    );
    let mut faces = Agreement::default();
    for a in images {
        let (logits, tokens) = match &a.tracked {
            Some((logits, tokens)) => (logits.clone(), tokens.clone()),
            None => a.suffix_with(p, &a.mask.kept)?,
        };
        let fell_back = p.unsure(&logits);
        let answer = reader.read(if fell_back { &a.dense_logits } else { &logits }, iw, ih)?;
        let dense_answer = reader.read(&a.dense_logits, iw, ih)?;
        let compared = Comparison::of(&answer, &dense_answer);
        let (dense_margin, found) = match (&dense_answer, compared) {
            (Answer::Class { margin, .. }, _) => (f64::from(*margin), Agreement::default()),
            (_, Comparison::Faces(f)) => (0.0, f),
            _ => (0.0, Agreement::default()),
        };
        faces.add(&found);
        per.push(ImageKeep {
            image: a.name.clone(),
            keep_ratio: a.mask.keep_ratio(),
            kept: a.mask.kept.len(),
            tokens: a.mask.h * a.mask.w,
            agrees: compared.agrees(),
            fell_back,
            compute: plan.spent(&tokens, fell_back) as f64 / dense,
            dense_margin,
            dense_faces: found.reference,
            matched_faces: found.matched,
        });
    }
    let sure: Vec<&ImageKeep> = per
        .iter()
        .filter(|k| !reader.is_detector() && k.dense_margin >= SURE_MARGIN)
        .collect();
    let sure_agreement = (!sure.is_empty())
        .then(|| sure.iter().filter(|k| k.agrees).count() as f64 / sure.len() as f64);
    let sure_images = sure.len();
    let n = per.len().max(1) as f64;
    let agreement = per.iter().filter(|k| k.agrees).count() as f64 / n;
    let fallback_rate = p
        .fallback
        .map(|_| per.iter().filter(|k| k.fell_back).count() as f64 / n);
    let compute = per.iter().map(|k| k.compute).sum::<f64>() / n;
    let mean = per.iter().map(|k| k.keep_ratio).sum::<f64>() / n;
    let var = per
        .iter()
        .map(|k| (k.keep_ratio - mean).powi(2))
        .sum::<f64>()
        / n;
    let mut histogram = vec![0usize; 10];
    for k in &per {
        histogram[((k.keep_ratio * 10.0) as usize).min(9)] += 1;
    }
    Ok(Sparsity {
        mean,
        std: var.sqrt(),
        min: per
            .iter()
            .map(|k| k.keep_ratio)
            .fold(f64::INFINITY, f64::min),
        max: per
            .iter()
            .map(|k| k.keep_ratio)
            .fold(f64::NEG_INFINITY, f64::max),
        images: per,
        histogram,
        agreement,
        fallback_rate,
        compute,
        sure_images,
        sure_agreement,
        faces: reader.is_detector().then(|| FaceSummary::of(&faces)),
    })
}

impl Sparsity {
    /// One row per image.
    pub fn csv(&self) -> String {
        let mut s =
            String::from("image,keep_ratio,kept,tokens,agrees,fell_back,compute,dense_margin,dense_faces,matched_faces\n");
        for k in &self.images {
            s += &format!(
                "{},{:.6},{},{},{},{},{:.6},{:.6},{},{}\n",
                k.image,
                k.keep_ratio,
                k.kept,
                k.tokens,
                k.agrees,
                k.fell_back,
                k.compute,
                k.dense_margin,
                k.dense_faces,
                k.matched_faces
            );
        }
        s
    }

    /// Summary and a text histogram.
    pub fn table(&self) -> String {
        let mut s = format!(
            "sparsity: {} images, keep ratio mean {:.3} (std {:.3}, min {:.3}, max {:.3})\n",
            self.images.len(),
            self.mean,
            self.std,
            self.min,
            self.max
        );
        if let Some(f) = &self.faces {
            s += &format!(
                "{}; effective suffix compute {:.3} of dense\n",
                f.line(),
                self.compute
            );
        } else {
            s += &format!(
                "top-1 agreement with dense {:.1} %, effective suffix compute {:.3} of dense",
                self.agreement * 100.0,
                self.compute
            );
            if let Some(r) = self.fallback_rate {
                s += &format!(", fallback {:.1} % of images", r * 100.0);
            }
            s.push('\n');
        }
        match self.sure_agreement {
            _ if self.faces.is_some() => {}
            Some(a) => {
                s += &format!(
                    "on the {} image(s) the dense network is sure of (top-1 margin >= {SURE_MARGIN}): agreement {:.1} %\n",
                    self.sure_images,
                    a * 100.0
                )
            }
            None => {
                s += &format!("no image has a dense top-1 margin >= {SURE_MARGIN}\n")
            }
        }
        for (i, &n) in self.histogram.iter().enumerate() {
            s += &format!(
                "  {:.1}-{:.1} {:>4} {}\n",
                i as f64 / 10.0,
                (i + 1) as f64 / 10.0,
                n,
                "#".repeat(n)
            );
        }
        s.pop();
        s
    }
}
