//! Occlusion test: paste structured occluders (grey and black squares,
//! patches cut from another photo) over a grid of positions and sizes inside
//! the network's view, and compare how much ERSM's and the dense network's
//! predictions move; also count how often the occluder's tokens are dropped.

use super::{progress, softmax};
use crate::logits::top1;
use crate::pipeline::Pipeline;
use crate::preprocess::crop_region;
use crate::source::Frame;
use anyhow::Result;
use serde::Serialize;

/// What is pasted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Occluder {
    Grey,
    Black,
    /// A patch cut from the next photo of the set.
    Patch,
}

/// Results for one occluder kind and size, over images and positions.
#[derive(Clone, Debug, Serialize)]
pub struct Condition {
    pub occluder: Occluder,
    /// Side as a fraction of the crop's side.
    pub size: f64,
    pub cases: usize,
    /// Fraction of cases whose top-1 changed from the unoccluded prediction.
    pub ersm_flip_rate: f64,
    pub dense_flip_rate: f64,
    /// Mean KL(unoccluded ‖ occluded) of the class distributions.
    pub ersm_kl: f64,
    pub dense_kl: f64,
    /// Mean fraction of the occluder's tokens the energy layer dropped.
    pub occluder_dropped: f64,
    /// Mean fraction of all tokens dropped, for comparison.
    pub all_dropped: f64,
}

/// The whole test.
#[derive(Clone, Debug, Serialize)]
pub struct Occlusion {
    pub images: usize,
    pub grid: usize,
    pub conditions: Vec<Condition>,
}

/// Paints a square occluder of `side` pixels centred at (`cx`, `cy`).
fn paint(frame: &mut Frame, kind: Occluder, other: &Frame, cx: f32, cy: f32, side: f32) {
    let (x0, y0) = (
        (cx - side / 2.0).max(0.0) as usize,
        (cy - side / 2.0).max(0.0) as usize,
    );
    let x1 = ((cx + side / 2.0) as usize).min(frame.width);
    let y1 = ((cy + side / 2.0) as usize).min(frame.height);
    // The patch comes from the other photo's centre, wrapping if it is small.
    let (ox, oy) = (other.width / 2, other.height / 2);
    for y in y0..y1 {
        for x in x0..x1 {
            let px = &mut frame.rgb[(y * frame.width + x) * 3..][..3];
            match kind {
                Occluder::Grey => px.copy_from_slice(&[128, 128, 128]),
                Occluder::Black => px.copy_from_slice(&[0, 0, 0]),
                Occluder::Patch => {
                    let sx = (ox + x - x0) % other.width;
                    let sy = (oy + y - y0) % other.height;
                    px.copy_from_slice(&other.rgb[(sy * other.width + sx) * 3..][..3]);
                }
            }
        }
    }
}

fn kl(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .filter(|(a, _)| **a > 0.0)
        .map(|(a, b)| a * (a / b.max(1e-300)).ln())
        .sum()
}

/// Runs the test: every image × occluder × size × grid position.
pub fn run(p: &Pipeline, frames: &[Frame], sizes: &[f64], grid: usize) -> Result<Occlusion> {
    anyhow::ensure!(grid > 0, "--grid must be at least 1");
    anyhow::ensure!(
        sizes.iter().all(|s| *s > 0.0 && *s <= 1.0),
        "--sizes must be fractions in (0, 1]"
    );
    anyhow::ensure!(!frames.is_empty(), "no frame to occlude");
    let kinds = [Occluder::Grey, Occluder::Black, Occluder::Patch];
    let mut acc: Vec<[f64; 7]> = vec![[0.0; 7]; kinds.len() * sizes.len()];
    let bar = progress(frames.len() * acc.len() * grid * grid, "occlusion");
    let m = &p.model;
    for (i, frame) in frames.iter().enumerate() {
        let other = &frames[(i + 1) % frames.len()];
        let e0 = p.run_ersm(frame)?;
        let d0 = p.run_dense(frame)?;
        let (pe0, pd0) = (softmax(&e0.logits), softmax(&d0.logits));
        let [x0, y0, x1, y1] = crop_region(frame.width, frame.height, &m.manifest.preprocess);
        let (cw, ch) = (x1 - x0, y1 - y0);
        for (k, &kind) in kinds.iter().enumerate() {
            for (s, &size) in sizes.iter().enumerate() {
                let a = &mut acc[k * sizes.len() + s];
                for gy in 0..grid {
                    for gx in 0..grid {
                        let cx = x0 + cw * (gx as f32 + 0.5) / grid as f32;
                        let cy = y0 + ch * (gy as f32 + 0.5) / grid as f32;
                        let side = size as f32 * cw.min(ch);
                        let mut occluded = frame.clone();
                        paint(&mut occluded, kind, other, cx, cy, side);
                        let e = p.run_ersm(&occluded)?;
                        let d = p.run_dense(&occluded)?;
                        // Tokens whose cell centre lies under the occluder.
                        let flags = e.mask.keep_flags();
                        let (mut under, mut dropped) = (0usize, 0usize);
                        for (t, &kept) in flags.iter().enumerate() {
                            let tx = x0 + cw * ((t % e.mask.w) as f32 + 0.5) / e.mask.w as f32;
                            let ty = y0 + ch * ((t / e.mask.w) as f32 + 0.5) / e.mask.h as f32;
                            if (tx - cx).abs() < side / 2.0 && (ty - cy).abs() < side / 2.0 {
                                under += 1;
                                dropped += usize::from(!kept);
                            }
                        }
                        a[0] += 1.0;
                        a[1] += f64::from(u8::from(top1(&e.logits) != top1(&e0.logits)));
                        a[2] += f64::from(u8::from(top1(&d.logits) != top1(&d0.logits)));
                        a[3] += kl(&pe0, &softmax(&e.logits));
                        a[4] += kl(&pd0, &softmax(&d.logits));
                        a[5] += if under > 0 {
                            dropped as f64 / under as f64
                        } else {
                            0.0
                        };
                        a[6] += 1.0 - e.mask.keep_ratio();
                        bar.inc(1);
                    }
                }
            }
        }
    }
    bar.finish_and_clear();
    let mut conditions = Vec::new();
    for (k, &kind) in kinds.iter().enumerate() {
        for (s, &size) in sizes.iter().enumerate() {
            let a = acc[k * sizes.len() + s];
            let n = a[0].max(1.0);
            conditions.push(Condition {
                occluder: kind,
                size,
                cases: a[0] as usize,
                ersm_flip_rate: a[1] / n,
                dense_flip_rate: a[2] / n,
                ersm_kl: a[3] / n,
                dense_kl: a[4] / n,
                occluder_dropped: a[5] / n,
                all_dropped: a[6] / n,
            });
        }
    }
    Ok(Occlusion {
        images: frames.len(),
        grid,
        conditions,
    })
}

impl Occlusion {
    /// One row per occluder and size.
    pub fn csv(&self) -> String {
        let mut s = String::from(
            "occluder,size,cases,ersm_flip_rate,dense_flip_rate,ersm_kl,dense_kl,occluder_dropped,all_dropped\n",
        );
        for c in &self.conditions {
            s += &format!(
                "{:?},{:.3},{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6}\n",
                c.occluder,
                c.size,
                c.cases,
                c.ersm_flip_rate,
                c.dense_flip_rate,
                c.ersm_kl,
                c.dense_kl,
                c.occluder_dropped,
                c.all_dropped
            )
            .to_lowercase();
        }
        s
    }

    /// The summary table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "occlusion test: {} images, {}×{} positions per occluder and size\n",
            self.images, self.grid, self.grid
        );
        s += "occluder  size   flip ERSM  flip dense   KL ERSM  KL dense   occluder tokens dropped (all tokens)\n";
        for c in &self.conditions {
            s += &format!(
                "{:<8} {:>5.2} {:>10.1}% {:>10.1}% {:>9.3} {:>9.3}   {:>5.1}% ({:.1}%)\n",
                format!("{:?}", c.occluder).to_lowercase(),
                c.size,
                100.0 * c.ersm_flip_rate,
                100.0 * c.dense_flip_rate,
                c.ersm_kl,
                c.dense_kl,
                100.0 * c.occluder_dropped,
                100.0 * c.all_dropped
            );
        }
        s.pop();
        s
    }
}
