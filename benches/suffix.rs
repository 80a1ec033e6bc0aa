//! Sparse suffix vs tract running the same suffix densely, on a MobileNetV2
//! suffix (cut at 28×28×32) at keep ratios 25/50/75/100 %.
//!
//! Prints, per keep ratio, both medians, the measured speedup, the ideal
//! `1/keep`, and their ratio (the target: ≥ 0.9 at 50 %, ≥ 0.95 at 100 %).
//! `MAC ratio` is the bound the sparse semantics allow: a stride-2 layer's
//! active set is the max-pool of its input's, so deeper levels keep more than
//! `keep` and the suffix's work shrinks by less than `1/keep`.
//! Timings interleave the two paths so machine noise hits both alike.
//! Run: `cargo bench --bench suffix` (add `-- --quick` for fewer rounds).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 15 } else { 60 };
    let m = package(mobilenet_v2_suffix(1), 28, 28);
    let (c, h, w) = (m.cut.c, m.cut.h, m.cut.w);
    let mut rng = Rng::new(42);
    let x = rng.normals(c * h * w, 1.0);
    let fmap = ersm::ersm::FeatureMap::new(&x, c, h, w).unwrap();
    println!(
        "MobileNetV2 suffix from 28×28×32, {} sparse steps, dense {:.1} MMACs, {rounds} rounds",
        m.plan.steps.len(),
        m.plan.dense_cost() as f64 / 1e6
    );
    println!(
        "{:>6} {:>10} {:>11} {:>11} {:>9} {:>8} {:>14} {:>12}",
        "keep",
        "MAC ratio",
        "dense ms",
        "sparse ms",
        "speedup",
        "ideal",
        "speedup/ideal",
        "speedup/MAC"
    );
    for keep in [0.25, 0.5, 0.75, 1.0] {
        let kept = blob_kept(&mut rng, h, w, keep);
        let keep = kept.len() as f64 / (h * w) as f64;
        let feats = ersm::ersm::cpu::gather(fmap, &kept);
        let counts = m.plan.token_counts(&kept);
        let mac_ratio = m.plan.dense_cost() as f64 / m.plan.cost(&counts) as f64;
        let (mut dense, mut sparse) = (Vec::new(), Vec::new());
        for r in 0..rounds + 3 {
            let run_dense = || {
                let t = Instant::now();
                std::hint::black_box(m.dense_suffix.run(&x).unwrap());
                t.elapsed().as_secs_f64() * 1e3
            };
            let run_sparse = || {
                let t = Instant::now();
                std::hint::black_box(m.plan.run(&kept, feats.clone(), Vec::new()).unwrap());
                t.elapsed().as_secs_f64() * 1e3
            };
            let (d, s) = if r % 2 == 0 {
                let d = run_dense();
                (d, run_sparse())
            } else {
                let s = run_sparse();
                (run_dense(), s)
            };
            if r >= 3 {
                dense.push(d);
                sparse.push(s);
            }
        }
        let (d, s) = (median(dense), median(sparse));
        let ideal = 1.0 / keep;
        println!(
            "{:>5.0}% {:>9.2}x {:>11.3} {:>11.3} {:>8.2}x {:>7.2}x {:>14.3} {:>12.3}",
            keep * 100.0,
            mac_ratio,
            d,
            s,
            d / s,
            ideal,
            d / s / ideal,
            d / s / mac_ratio
        );
    }
}
