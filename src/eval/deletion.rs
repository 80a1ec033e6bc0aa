//! Deletion test: remove tokens progressively in a ranking's order (least
//! important first) and watch the prediction. Rankings: ERSM energy
//! (highest first), feature magnitude (lowest L2 norm first), and random.

use super::{progress, softmax, Analysed};
use crate::logits::top1;
use crate::pipeline::Pipeline;
use anyhow::Result;
use serde::Serialize;

/// A deletion order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ranking {
    /// Highest ERSM energy first.
    Energy,
    /// Lowest feature L2 norm first.
    Magnitude,
    /// Uniformly random (seeded).
    Random,
}

/// One point of a curve, averaged over images (and seeds for random).
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// Fraction of tokens deleted.
    pub deleted: f64,
    /// Fraction of images whose top-1 is still the dense top-1.
    pub agreement: f64,
    /// Mean probability of the dense top-1 class.
    pub probability: f64,
}

/// One ranking's curve and its areas (trapezoid over the deleted fraction).
#[derive(Clone, Debug, Serialize)]
pub struct Curve {
    pub ranking: Ranking,
    pub points: Vec<Point>,
    pub agreement_area: f64,
    pub probability_area: f64,
}

/// The whole test.
#[derive(Clone, Debug, Serialize)]
pub struct Deletion {
    pub images: usize,
    pub step: f64,
    pub seeds: u64,
    pub curves: Vec<Curve>,
}

/// The deletion order for a ranking: token indices, first deleted first.
pub fn order(a: &Analysed, c: usize, ranking: Ranking, seed: u64) -> Vec<u32> {
    let n = a.mask.energies.len();
    let mut idx: Vec<u32> = (0..n as u32).collect();
    match ranking {
        Ranking::Energy => {
            let e = &a.mask.energies;
            idx.sort_by(|&x, &y| e[y as usize].total_cmp(&e[x as usize]).then(x.cmp(&y)));
        }
        Ranking::Magnitude => {
            let norm: Vec<f32> = (0..n)
                .map(|t| {
                    (0..c)
                        .map(|ch| a.maps.features[ch * n + t].powi(2))
                        .sum::<f32>()
                })
                .collect();
            idx.sort_by(|&x, &y| {
                norm[x as usize]
                    .total_cmp(&norm[y as usize])
                    .then(x.cmp(&y))
            });
        }
        Ranking::Random => {
            // Fisher–Yates with a splitmix64 stream: reproducible per seed.
            let mut s = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut next = || {
                s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^ (z >> 31)
            };
            for i in (1..n).rev() {
                let j = (next() % (i as u64 + 1)) as usize;
                idx.swap(i, j);
            }
        }
    }
    idx
}

/// Fractions deleted at each step: 0, step, 2·step, … below 1 (at least one
/// token always stays).
pub fn steps(step: f64) -> Vec<f64> {
    let n = (1.0 / step).ceil() as usize;
    (0..n)
        .map(|i| i as f64 * step)
        .filter(|f| *f < 1.0)
        .collect()
}

/// Tokens kept after deleting `fraction` of `order` (ascending, never empty).
pub fn kept_after(order: &[u32], fraction: f64) -> Vec<u32> {
    let n = order.len();
    let deleted = ((fraction * n as f64).round() as usize).min(n - 1);
    let mut kept = order[deleted..].to_vec();
    kept.sort_unstable();
    kept
}

fn area(points: &[Point], value: impl Fn(&Point) -> f64) -> f64 {
    points
        .windows(2)
        .map(|w| (w[1].deleted - w[0].deleted) * (value(&w[0]) + value(&w[1])) / 2.0)
        .sum()
}

/// Runs the test on analysed images.
pub fn run(p: &Pipeline, images: &[Analysed], step: f64, seeds: u64) -> Result<Deletion> {
    anyhow::ensure!(step > 0.0 && step < 1.0, "--step must be in (0, 1)");
    anyhow::ensure!(seeds > 0, "--seeds must be at least 1");
    let fractions = steps(step);
    let c = p.model.cut.c;
    let plan: Vec<(Ranking, u64)> = [
        (Ranking::Energy, 1),
        (Ranking::Magnitude, 1),
        (Ranking::Random, seeds),
    ]
    .to_vec();
    let bar = progress(images.len() * (2 + seeds as usize), "deletion");
    let mut curves = Vec::new();
    for (ranking, runs) in plan {
        let mut agree = vec![0.0f64; fractions.len()];
        let mut prob = vec![0.0f64; fractions.len()];
        for seed in 0..runs {
            for a in images {
                let target = top1(&a.dense_logits);
                let ord = order(a, c, ranking, seed);
                for (i, &f) in fractions.iter().enumerate() {
                    let logits = a.logits_with(p, &kept_after(&ord, f))?;
                    agree[i] += f64::from(u8::from(top1(&logits) == target));
                    prob[i] += softmax(&logits)[target];
                }
                bar.inc(1);
            }
        }
        let runs_total = (runs as usize * images.len()) as f64;
        let points: Vec<Point> = fractions
            .iter()
            .enumerate()
            .map(|(i, &f)| Point {
                deleted: f,
                agreement: agree[i] / runs_total,
                probability: prob[i] / runs_total,
            })
            .collect();
        curves.push(Curve {
            ranking,
            agreement_area: area(&points, |p| p.agreement),
            probability_area: area(&points, |p| p.probability),
            points,
        });
    }
    bar.finish_and_clear();
    Ok(Deletion {
        images: images.len(),
        step,
        seeds,
        curves,
    })
}

impl Deletion {
    /// One row per ranking and step.
    pub fn csv(&self) -> String {
        let mut s = String::from("ranking,deleted,agreement,probability\n");
        for c in &self.curves {
            for p in &c.points {
                s += &format!(
                    "{},{:.4},{:.6},{:.6}\n",
                    serde_json::to_value(c.ranking)
                        .unwrap_or_default()
                        .as_str()
                        .unwrap_or("?"),
                    p.deleted,
                    p.agreement,
                    p.probability
                );
            }
        }
        s
    }

    /// The summary table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "deletion test: {} images, steps of {:.0} %, random averaged over {} seeds\n",
            self.images,
            self.step * 100.0,
            self.seeds
        );
        s += "ranking      area(top-1 agreement)  area(p of dense top-1)\n";
        for c in &self.curves {
            s += &format!(
                "{:<12} {:>21.4}  {:>22.4}\n",
                format!("{:?}", c.ranking).to_lowercase(),
                c.agreement_area,
                c.probability_area
            );
        }
        s += "(larger is better: the ranking deletes what the prediction does not need first)";
        s
    }
}
