//! The sparse suffix against tract: equal to the dense-masked reference for
//! random masks and random networks covering every supported op, and equal to
//! the plain dense suffix when every token is kept.

mod common;

use common::*;
use ersm::model::{lower::SUPPORTED, ModelPackage};
use std::collections::BTreeSet;

const TOL: f32 = 1e-4;

fn features(rng: &mut Rng, m: &ModelPackage) -> Vec<f32> {
    rng.normals(m.cut.c * m.cut.h * m.cut.w, 1.0)
}

#[test]
fn tiny_model_all_tokens_equals_dense_suffix() {
    let m = ModelPackage::load("models/tiny").unwrap();
    let mut rng = Rng::new(1);
    for _ in 0..3 {
        let x = features(&mut rng, &m);
        let all: Vec<u32> = (0..(m.cut.h * m.cut.w) as u32).collect();
        let dense = m.dense_suffix.run(&x).unwrap();
        let err = rel_err(&sparse(&m, &x, &all), &dense);
        assert!(err <= TOL, "all tokens kept: relative error {err}");
    }
}

#[test]
fn tiny_model_random_masks_equal_dense_masked_reference() {
    let m = ModelPackage::load("models/tiny").unwrap();
    let mut rng = Rng::new(2);
    let n = m.cut.h * m.cut.w;
    for p in [0.0, 0.1, 0.25, 0.5, 0.75, 0.95] {
        let x = features(&mut rng, &m);
        let kept = random_kept(&mut rng, n, p);
        let (s, r) = (sparse(&m, &x, &kept), dense_masked(&m, &x, &kept));
        let err = rel_err(&s, &r);
        assert!(
            err <= TOL,
            "keep p={p} ({} tokens): relative error {err}\nsparse {s:?}\nref {r:?}",
            kept.len()
        );
    }
}

#[test]
fn tiny_model_energy_masks_equal_dense_masked_reference() {
    // Masks as the runtime makes them: from the energy layer on real prefix features.
    let m = ModelPackage::load("models/tiny").unwrap();
    let mut rng = Rng::new(3);
    for _ in 0..3 {
        let input = rng.normals(3 * 112 * 112, 1.0);
        let x = m.prefix.run(&input).unwrap();
        let fm = ersm::ersm::FeatureMap::new(&x, m.cut.c, m.cut.h, m.cut.w).unwrap();
        let mask = ersm::ersm::cpu::compute(fm, &m.energy).unwrap();
        let err = rel_err(
            &sparse(&m, &x, &mask.kept),
            &dense_masked(&m, &x, &mask.kept),
        );
        assert!(err <= TOL, "relative error {err}");
    }
}

#[test]
fn random_networks_cover_every_op_and_match_reference() {
    let mut used = BTreeSet::new();
    let shapes = [
        (9, 9, 8),
        (7, 12, 6),
        (16, 5, 4),
        (4, 4, 8),
        (11, 11, 6),
        (6, 17, 4),
    ];
    for seed in 0..24u64 {
        let (h, w, c) = shapes[seed as usize % shapes.len()];
        let proto = random_network(seed, h, w, c);
        let suffix_ops: Vec<String> = {
            let g = proto.graph.as_ref().unwrap();
            let e = g
                .node
                .iter()
                .position(|n| n.op_type == "EnergyMask")
                .unwrap();
            g.node[e + 1..].iter().map(|n| n.op_type.clone()).collect()
        };
        let m = package(proto, h, w);
        let mut rng = Rng::new(1000 + seed);
        for p in [0.05, 0.4, 0.8] {
            let x = features(&mut rng, &m);
            let kept = random_kept(&mut rng, h * w, p);
            let (s, r) = (sparse(&m, &x, &kept), dense_masked(&m, &x, &kept));
            let err = rel_err(&s, &r);
            assert!(
                err <= TOL,
                "seed {seed}, {h}×{w}×{c}, keep p={p}: relative error {err}\nops {suffix_ops:?}"
            );
        }
        let x = features(&mut rng, &m);
        let all: Vec<u32> = (0..(h * w) as u32).collect();
        let err = rel_err(&sparse(&m, &x, &all), &m.dense_suffix.run(&x).unwrap());
        assert!(
            err <= TOL,
            "seed {seed}: all tokens kept vs dense suffix, relative error {err}"
        );
        used.extend(suffix_ops);
    }
    let missing: Vec<_> = SUPPORTED
        .iter()
        .filter(|op| !used.contains(**op) && **op != "Dropout")
        .collect();
    assert!(missing.is_empty(), "random networks never used {missing:?}");
}

#[test]
fn degenerate_maps_one_token_and_one_row() {
    for (seed, (h, w)) in [(1, 1), (1, 9), (8, 1), (2, 3)].into_iter().enumerate() {
        let mut b = Builder::new(seed as u64);
        let x = b.conv("image", 3, 6, 3, 1, [1; 4], 1);
        let x = energy(&mut b, &x, 6, 0.5, 2, 8);
        let y = b.conv(&x, 6, 6, 3, 1, [1; 4], 6);
        let y = b.act(&y);
        let y = b.conv(&y, 6, 8, 3, 1, [1; 4], 2);
        let y = b.op("GlobalAveragePool", &[&y], vec![]);
        let out = b.op("Flatten", &[&y], vec![]);
        let m = package(b.model(("image", &[1, 3, h, w]), &out), h, w);
        let mut rng = Rng::new(7);
        let x = features(&mut rng, &m);
        let kept = random_kept(&mut rng, h * w, 0.5);
        let err = rel_err(&sparse(&m, &x, &kept), &dense_masked(&m, &x, &kept));
        assert!(err <= TOL, "{h}×{w}: relative error {err}");
    }
}

#[test]
fn mobilenet_v2_suffix_matches_reference() {
    let m = package(mobilenet_v2_suffix(5), 28, 28);
    let mut rng = Rng::new(9);
    for keep in [0.3, 1.0] {
        let x = features(&mut rng, &m);
        let kept = blob_kept(&mut rng, 28, 28, keep);
        let err = rel_err(&sparse(&m, &x, &kept), &dense_masked(&m, &x, &kept));
        assert!(err <= TOL, "keep {keep}: relative error {err}");
    }
}
