//! Sparsity: how many tokens each image keeps, with no budget imposed.

use super::Analysed;
use serde::Serialize;

/// Keep ratio of one image.
#[derive(Clone, Debug, Serialize)]
pub struct ImageKeep {
    pub image: String,
    pub keep_ratio: f64,
    pub kept: usize,
    pub tokens: usize,
}

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
}

/// Summarises analysed images.
pub fn of(images: &[Analysed]) -> Sparsity {
    let per: Vec<ImageKeep> = images
        .iter()
        .map(|a| ImageKeep {
            image: a.name.clone(),
            keep_ratio: a.mask.keep_ratio(),
            kept: a.mask.kept.len(),
            tokens: a.mask.h * a.mask.w,
        })
        .collect();
    let n = per.len().max(1) as f64;
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
    Sparsity {
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
    }
}

impl Sparsity {
    /// One row per image.
    pub fn csv(&self) -> String {
        let mut s = String::from("image,keep_ratio,kept,tokens\n");
        for k in &self.images {
            s += &format!("{},{:.6},{},{}\n", k.image, k.keep_ratio, k.kept, k.tokens);
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
