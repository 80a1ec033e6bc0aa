//! The sparse suffix against tract: equal to the dense-masked reference for
//! random masks and random networks covering every supported op, and equal to
//! the plain dense suffix when every token is kept.

mod common;

use common::*;
use ersm::package::ModelPackage;
use ersm::sparse::ops::supported;
use ersm::sparse::plan::GateOffsets;
use std::collections::BTreeSet;

const TOL: f32 = 1e-4;

fn features(rng: &mut Rng, m: &ModelPackage) -> Vec<f32> {
    rng.normals(m.cut.c * m.cut.h * m.cut.w, 1.0)
}

/// Random features and a random mask keeping about `p` of the tokens: the
/// sparse suffix equals the dense-masked reference. Returns the kept tokens.
fn matches_reference(m: &ModelPackage, rng: &mut Rng, p: f32, what: &str) -> Vec<u32> {
    let x = features(rng, m);
    let kept = random_kept(rng, m.cut.h * m.cut.w, p);
    let err = rel_err(&sparse(m, &x, &kept), &dense_masked(m, &x, &kept));
    assert!(err <= TOL, "{what}, keep p={p}: relative error {err}");
    kept
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
    let mut merged = 0;
    for seed in 0..24u64 {
        let (h, w, c) = RANDOM_SHAPES[seed as usize % RANDOM_SHAPES.len()];
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
            matches_reference(
                &m,
                &mut rng,
                p,
                &format!("seed {seed}, {h}×{w}×{c}, ops {suffix_ops:?}"),
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
        merged += usize::from(m.plan.levels.iter().any(|l| l.merge.is_some()));
    }
    assert!(
        merged > 0,
        "no random network adds an upsampled map to a lateral"
    );
    let missing: Vec<_> = supported()
        .into_iter()
        // A gate (a second EnergyMask) has its own test below.
        .filter(|op| !used.contains(*op) && *op != "Dropout" && *op != "EnergyMask")
        .collect();
    assert!(missing.is_empty(), "random networks never used {missing:?}");
}

#[test]
fn centre_stride_rule_matches_reference_and_keeps_the_keep_ratio() {
    for seed in 0..12u64 {
        let (h, w, c) = [(9, 9, 8), (12, 7, 6), (16, 16, 4)][seed as usize % 3];
        let m = package(
            with_stride_rule(random_network(seed, h, w, c), "centre"),
            h,
            w,
        );
        assert_eq!(m.plan.stride_rule, ersm::sparse::StrideRule::Centre);
        let mut rng = Rng::new(2000 + seed);
        for p in [0.05, 0.4, 0.8] {
            let kept = matches_reference(&m, &mut rng, p, &format!("seed {seed}, {h}×{w}×{c}"));
            // A strided level holds exactly the tokens on its parent's stride grid.
            let sets = m.plan.sets(&kept);
            for (l, level) in m.plan.levels.iter().enumerate() {
                let Some(parent) = level.parent else { continue };
                if let Some(other) = level.merge {
                    // Every position active in either parent, and no other.
                    let (a, b) = (&sets[parent].index, &sets[other].index);
                    let want = a
                        .iter()
                        .zip(b)
                        .filter(|(x, y)| **x != u32::MAX || **y != u32::MAX);
                    assert_eq!(sets[l].len(), want.count(), "seed {seed}, level {l}");
                    continue;
                }
                if level.up {
                    // Every position under an active parent, and no other.
                    let s2 = level.stride * level.stride;
                    assert_eq!(
                        sets[l].len(),
                        sets[parent].len() * s2,
                        "seed {seed}, level {l}"
                    );
                    continue;
                }
                let pw = m.plan.levels[parent].w;
                let want = sets[parent]
                    .coords
                    .iter()
                    .filter(|&&i| {
                        let (y, x) = (i as usize / pw, i as usize % pw);
                        y % level.stride == 0
                            && x % level.stride == 0
                            && y / level.stride < level.h
                            && x / level.stride < level.w
                    })
                    .count();
                assert_eq!(sets[l].len(), want.max(1), "seed {seed}, level {l}");
            }
        }
    }
}

#[test]
fn stride_rules_differ_where_they_should() {
    use ersm::sparse::{StrideRule, TokenSet};
    // Active: (0,1) and (2,2) of a 4×4 map; stride 2 → 2×2.
    let set = TokenSet::from_raster(4, 4, vec![1, 10]);
    assert_eq!(set.downsample(2, 2, 2, StrideRule::Any).coords, vec![0, 3]);
    assert_eq!(set.downsample(2, 2, 2, StrideRule::Centre).coords, vec![3]);
    // No centre tap active: the output over the first active input stays.
    let set = TokenSet::from_raster(4, 4, vec![5, 15]);
    assert_eq!(set.downsample(2, 2, 2, StrideRule::Any).coords, vec![0, 3]);
    assert_eq!(set.downsample(2, 2, 2, StrideRule::Centre).coords, vec![0]);
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

#[test]
fn fill_vectors_match_reference_on_random_networks() {
    // Dropped positions of some token maps hold a fill vector: k×k, grouped
    // and depthwise convs read it at dropped taps (never at padding), and
    // pooling a filled map averages every position.
    let mut pooled_with_fill = 0;
    for seed in 0..24u64 {
        let (h, w, c) = RANDOM_SHAPES[seed as usize % RANDOM_SHAPES.len()];
        let mut rng = Rng::new(3000 + seed);
        let proto = random_network(seed, h, w, c);
        let proto = if seed % 2 == 0 {
            with_stride_rule(proto, "centre")
        } else {
            proto
        };
        let m = with_random_fills(proto, h, w, &mut rng, 0.6);
        pooled_with_fill += m
            .plan
            .steps
            .iter()
            .filter(|s| s.op.name().contains("Pool") || s.op.name() == "ReduceMean")
            .filter(|s| m.plan.slot_fills[s.inputs[0]].is_some())
            .count();
        for p in [0.05, 0.4, 0.8] {
            matches_reference(&m, &mut rng, p, &format!("seed {seed} with fills"));
        }
        // Every token kept: no position reads a fill, so the plain dense suffix.
        let x = features(&mut rng, &m);
        let all: Vec<u32> = (0..(h * w) as u32).collect();
        let err = rel_err(&sparse(&m, &x, &all), &m.dense_suffix.run(&x).unwrap());
        assert!(
            err <= TOL,
            "seed {seed} with fills, all kept: relative error {err}"
        );
    }
    assert!(
        pooled_with_fill > 0,
        "no random network pooled a filled map"
    );
}

#[test]
fn fill_vectors_change_the_answer_only_where_tokens_are_dropped() {
    let proto = mobilenet_v2_suffix(5);
    let mut rng = Rng::new(11);
    let zero = package(proto.clone(), 28, 28);
    let filled = with_random_fills(proto, 28, 28, &mut rng, 1.0);
    let x = features(&mut rng, &filled);
    let kept = blob_kept(&mut rng, 28, 28, 0.3);
    let err = rel_err(
        &sparse(&filled, &x, &kept),
        &dense_masked(&filled, &x, &kept),
    );
    assert!(
        err <= TOL,
        "MobileNetV2 suffix with fills, keep 0.3: relative error {err}"
    );
    // The fills must matter: against the zero rule on the same tokens.
    let diff = rel_err(&sparse(&filled, &x, &kept), &sparse(&zero, &x, &kept));
    assert!(diff > 1e-2, "fills left the logits unchanged ({diff})");
}

/// Detector-shaped networks: a suffix reading prefix maps beside the energy
/// layer's output (finer, the same size and coarser than the cut), Adds on
/// the union of sets, and two token-map outputs. Sparse equals the
/// dense-masked reference (each prefix map masked by its own level) under
/// both stride rules, and the dense suffix when every token is kept; a
/// dropped position of an output holds zero ("nothing here").
#[test]
fn suffix_reading_prefix_maps_with_several_outputs_matches_reference() {
    let mut coarse = 0;
    for seed in 0..12u64 {
        let m = detector_package(seed, &[(16, 16, 6), (8, 24, 4), (24, 16, 5)]);
        let (h, w) = (m.prefix.input_shape[2], m.prefix.input_shape[3]);
        let taps: Vec<(usize, usize)> = m.cut.taps.iter().map(|t| (t.h, t.w)).collect();
        assert!(
            taps.contains(&(h, w)) && taps.contains(&(h / 2, w / 2)),
            "seed {seed}: the stride-1 map and the cut's input are read after the cut: {taps:?}"
        );
        coarse += usize::from(taps.contains(&(h / 4, w / 4)));
        assert_eq!(m.plan.outputs.len(), 2, "seed {seed}: two outputs");
        let mut rng = Rng::new(500 + seed);
        // The prefix's own maps, as the prefix computes them for an image.
        let image = rng.normals(3 * h * w, 1.0);
        let maps = prefix_maps(&m, &image);
        let (x, taps) = (&maps[0], &maps[1..]);
        for p in [0.05, 0.3, 0.7] {
            let kept = random_kept(&mut rng, m.cut.h * m.cut.w, p);
            let got = sparse_with(&m, x, taps, &kept);
            let want = dense_masked_with(&m, x, taps, &kept);
            let err = rel_err(&got, &want);
            assert!(err <= TOL, "seed {seed}, keep p={p}: relative error {err}");
            // The heatmap (first output, h·w values) is zero where its level
            // is inactive, never sigmoid(0).
            let last = m.plan.slot_shapes[m.plan.outputs[0]].level().unwrap();
            let active = m.plan.sets(&kept)[last].len();
            let zeros = got[..h * w].iter().filter(|v| **v == 0.0).count();
            assert!(
                zeros >= h * w - active,
                "seed {seed}: dropped heatmap positions hold zero"
            );
        }
        let all: Vec<u32> = (0..(m.cut.h * m.cut.w) as u32).collect();
        let dense = dense_suffix_with(&m, x, taps);
        let err = rel_err(&sparse_with(&m, x, taps, &all), &dense);
        assert!(
            err <= TOL,
            "seed {seed}: all tokens kept vs dense suffix, relative error {err}"
        );
        // The whole network (prefix and dense suffix in one tract plan) gives
        // what the two halves give.
        let whole = ersm::prefix::TractNet::new(&m.dense_proto, &[1, 3, h, w], "whole")
            .unwrap()
            .run(&image)
            .unwrap();
        assert!(
            rel_err(&whole, &dense) <= TOL,
            "seed {seed}: the halves compose"
        );
    }
    assert!(coarse > 0, "no random detector read a coarser prefix map");
}

/// A gate (a second energy layer) after the suffix's stride-2 block: the
/// layers after it run on the gate's narrower set, the finer levels on the
/// union of it and the cut's, and the sparse suffix equals the
/// dense-masked reference whose gate keeps the negative energies of its
/// own masked map, under both stride rules; and the gate narrows (it keeps
/// fewer than its input level on most frames). On some networks a second
/// gate sits on the finest union level before the heads' conv (CenterFace's
/// peak gate): it keeps the reference's set too.
#[test]
fn a_gate_inside_the_suffix_matches_the_reference_on_random_detectors() {
    let mut narrowed = 0;
    for seed in 0..10u64 {
        let m = gated_detector_package(seed, &[(16, 16, 6), (8, 24, 4), (24, 16, 5)]);
        let (h, w) = (m.prefix.input_shape[2], m.prefix.input_shape[3]);
        let gates: Vec<_> = m.plan.gates().collect();
        let want_gates = if seed % 4 >= 2 { 2 } else { 1 };
        assert_eq!(gates.len(), want_gates, "seed {seed}: gates lowered");
        let (g_in, g_out) = (gates[0].in_level, gates[0].out_level);
        let mut rng = Rng::new(900 + seed);
        let image = rng.normals(3 * h * w, 1.0);
        let maps = prefix_maps(&m, &image);
        let (x, taps) = (&maps[0], &maps[1..]);
        for p in [0.1, 0.4, 0.8, 1.0] {
            let kept = random_kept(&mut rng, m.cut.h * m.cut.w, p);
            let (got, frame) = sparse_frame(&m, x, taps, &kept);
            let (want, lists) = dense_masked_gated(&m, x, taps, &kept);
            let err = rel_err(&got, &want);
            assert!(err <= TOL, "seed {seed}, keep p={p}: relative error {err}");
            for (k, g) in gates.iter().enumerate() {
                assert_eq!(
                    frame.sets[g.out_level].coords, lists[k],
                    "seed {seed}, keep p={p}: gate {k} keeps what the reference's does"
                );
            }
            narrowed += usize::from(frame.sets[g_out].len() < frame.sets[g_in].len());
        }
    }
    assert!(narrowed > 5, "the gates narrowed {narrowed} of 40 frames");
}

/// On a stream the gates also keep where the last frame's faces were (a
/// held subset of the kept tokens, reaching each gate's level by the
/// levels' own rules): the sparse suffix still equals the dense-masked
/// reference whose gates keep the same, each gate keeps every active
/// position the held tokens reach, and holding changes the sets on some
/// frames (the held positions are not all kept by energy alone).
#[test]
fn gates_keep_the_held_tokens_and_still_match_the_reference() {
    let mut widened = 0;
    for seed in 0..8u64 {
        let m = gated_detector_package(seed, &[(16, 16, 6), (8, 24, 4), (24, 16, 5)]);
        let (h, w) = (m.prefix.input_shape[2], m.prefix.input_shape[3]);
        let gates: Vec<_> = m.plan.gates().collect();
        let mut rng = Rng::new(1900 + seed);
        let image = rng.normals(3 * h * w, 1.0);
        let maps = prefix_maps(&m, &image);
        let (x, taps) = (&maps[0], &maps[1..]);
        for p in [0.3, 0.8] {
            let kept = random_kept(&mut rng, m.cut.h * m.cut.w, p);
            let held: Vec<u32> = kept.iter().copied().filter(|_| rng.f32() < 0.3).collect();
            let fm = ersm::ersm::FeatureMap::new(x, m.cut.c, m.cut.h, m.cut.w).unwrap();
            let feats = ersm::ersm::cpu::gather(fm, &kept);
            let (out, frame) = m
                .plan
                .run_holding(&kept, &held, GateOffsets::Stream, feats, taps.to_vec())
                .expect("sparse suffix runs");
            let got = m.plan.dense_outputs(&out, &frame.sets);
            let (want, lists) = dense_masked_gated_holding(&m, x, taps, &kept, &held, false);
            let err = rel_err(&got, &want);
            assert!(err <= TOL, "seed {seed}, keep p={p}: relative error {err}");
            let (_, plain) = dense_masked_gated(&m, x, taps, &kept);
            for (k, g) in gates.iter().enumerate() {
                let kept_by_gate = &frame.sets[g.out_level].coords;
                assert_eq!(
                    kept_by_gate, &lists[k],
                    "seed {seed}, keep p={p}: gate {k} keeps what the reference's does"
                );
                let active = &frame.sets[g.in_level].coords;
                for i in &frame.held[g.in_level].coords {
                    assert!(
                        active.binary_search(i).is_err() || kept_by_gate.binary_search(i).is_ok(),
                        "seed {seed}, keep p={p}: gate {k} dropped held position {i}"
                    );
                }
                widened += usize::from(kept_by_gate.len() > plain[k].len());
            }
        }
    }
    assert!(
        widened > 3,
        "holding widened a gate's set on {widened} frames"
    );
}

/// A random gated detector (three blocks) whose every gate moves by
/// `shift` on a stream, and its prefix maps of a random image from `rng`.
fn moved_gates_case(seed: u64, shift: f32, rng: &mut Rng) -> (ModelPackage, Vec<Vec<f32>>) {
    let mut m = gated_detector_package(seed, &[(16, 16, 6), (8, 24, 4), (24, 16, 5)]);
    let names: Vec<String> = m.plan.gates_named().map(|(n, _)| n.to_string()).collect();
    for name in &names {
        m.plan
            .set_gate_shift(name, shift)
            .expect("a gate of the suffix");
    }
    let (h, w) = (m.prefix.input_shape[2], m.prefix.input_shape[3]);
    let image = rng.normals(3 * h * w, 1.0);
    let maps = prefix_maps(&m, &image);
    (m, maps)
}

/// New tokens on a stream (manifest `track.new_tokens`): at the stream's
/// offsets a moved gate also keeps, within their reach, what it keeps at
/// the package's own offset; the sparse suffix equals the reference that
/// does the same, the gates keep what the reference's keep, and the new
/// tokens widen some gate's set on some frames. At the package's offsets
/// they are not looked at (the reference without them).
#[test]
fn new_tokens_widen_a_moved_gate_and_still_match_the_reference() {
    let mut widened = 0;
    for seed in 0..6u64 {
        let mut rng = Rng::new(3100 + seed);
        let (m, maps) = moved_gates_case(seed, 0.6, &mut rng);
        let (x, taps) = (&maps[0], &maps[1..]);
        for p in [0.4, 0.9] {
            let kept = random_kept(&mut rng, m.cut.h * m.cut.w, p);
            let held: Vec<u32> = kept.iter().copied().filter(|_| rng.f32() < 0.1).collect();
            let fresh: Vec<u32> = kept.iter().copied().filter(|_| rng.f32() < 0.4).collect();
            let fm = ersm::ersm::FeatureMap::new(x, m.cut.c, m.cut.h, m.cut.w).unwrap();
            let mut sizes = Vec::new();
            for (offsets, new) in [
                (GateOffsets::Stream, &fresh[..]),
                (GateOffsets::Stream, &[][..]),
                (GateOffsets::Package, &fresh[..]),
            ] {
                let feats = ersm::ersm::cpu::gather(fm, &kept);
                let (out, frame) = m
                    .plan
                    .run_stream(&kept, &held, new, offsets, feats, taps.to_vec())
                    .expect("sparse suffix runs");
                let got = m.plan.dense_outputs(&out, &frame.sets);
                let shifted = offsets == GateOffsets::Stream;
                let (want, lists) =
                    dense_masked_gated_stream(&m, x, taps, &kept, &held, new, shifted);
                let err = rel_err(&got, &want);
                assert!(
                    err <= TOL,
                    "seed {seed}, keep p={p}, {offsets:?}, {} new: relative error {err}",
                    new.len()
                );
                for (k, g) in m.plan.gates().enumerate() {
                    assert_eq!(
                        frame.sets[g.out_level].coords, lists[k],
                        "seed {seed}, keep p={p}, {offsets:?}: gate {k} keeps what the reference's does"
                    );
                }
                sizes.push(
                    m.plan
                        .gates()
                        .map(|g| frame.sets[g.out_level].len())
                        .sum::<usize>(),
                );
            }
            widened += usize::from(sizes[0] > sizes[1]);
        }
    }
    assert!(
        widened > 3,
        "new tokens widened a gate's set on only {widened} frames"
    );
}

/// A stream's gates at their offsets (manifest `track.gate_offsets`), and
/// on a refresh frame at the package's own: with a shift set on every
/// gate, the sparse suffix equals the reference whose gates' unary costs
/// move by it, and with `GateOffsets::Package` the reference whose do not;
/// the shift (keeping less) narrows some gate's set on some frames.
#[test]
fn a_refresh_frame_runs_the_gates_at_the_package_offsets() {
    let mut narrowed = 0;
    for seed in 0..6u64 {
        let mut rng = Rng::new(2900 + seed);
        let (m, maps) = moved_gates_case(seed, 0.4, &mut rng);
        let (x, taps) = (&maps[0], &maps[1..]);
        for p in [0.4, 0.9] {
            let kept = random_kept(&mut rng, m.cut.h * m.cut.w, p);
            let held: Vec<u32> = kept.iter().copied().filter(|_| rng.f32() < 0.2).collect();
            let fm = ersm::ersm::FeatureMap::new(x, m.cut.c, m.cut.h, m.cut.w).unwrap();
            let mut sizes = Vec::new();
            for offsets in [GateOffsets::Stream, GateOffsets::Package] {
                let feats = ersm::ersm::cpu::gather(fm, &kept);
                let (out, frame) = m
                    .plan
                    .run_holding(&kept, &held, offsets, feats, taps.to_vec())
                    .expect("sparse suffix runs");
                let got = m.plan.dense_outputs(&out, &frame.sets);
                let shifted = offsets == GateOffsets::Stream;
                let (want, lists) = dense_masked_gated_holding(&m, x, taps, &kept, &held, shifted);
                let err = rel_err(&got, &want);
                assert!(
                    err <= TOL,
                    "seed {seed}, keep p={p}, {offsets:?}: relative error {err}"
                );
                for (k, g) in m.plan.gates().enumerate() {
                    assert_eq!(
                        frame.sets[g.out_level].coords, lists[k],
                        "seed {seed}, keep p={p}, {offsets:?}: gate {k} keeps what the reference's does"
                    );
                }
                sizes.push(
                    m.plan
                        .gates()
                        .map(|g| frame.sets[g.out_level].len())
                        .sum::<usize>(),
                );
            }
            narrowed += usize::from(sizes[0] < sizes[1]);
        }
    }
    assert!(
        narrowed > 3,
        "the stream's offsets narrowed {narrowed} of 12 frames"
    );
}

/// CenterFace's cut at stride 4 (training's `--cut s4`): the energy layer
/// reads the finer map averaged over 2×2, nothing reads its output, and
/// the whole suffix, a strided conv first, reads the finer map gathered
/// under the kept tokens. Sparse equals the dense-masked reference under
/// both stride rules, and the dense suffix with every token kept.
#[test]
fn energy_on_a_pooled_map_with_the_suffix_reading_the_finer_map() {
    for seed in 0..6u64 {
        let (h, w, c) = [(16, 16, 6), (8, 24, 4), (24, 16, 5)][seed as usize % 3];
        let mut b = Builder::new(900 + seed);
        let p0 = b.conv("image", 3, 6, 3, 1, [1; 4], 1);
        let p0 = b.op("Relu", &[&p0], vec![]);
        let pooled = b.op(
            "AveragePool",
            &[&p0],
            vec![
                attr_ints("kernel_shape", &[2, 2]),
                attr_ints("strides", &[2, 2]),
            ],
        );
        let _unread = energy(&mut b, &pooled, 6, 0.3, 1, 4);
        let d = b.conv(&p0, 6, c, 3, 2, [1; 4], 1);
        let d = b.act(&d);
        let y = b.conv(&d, c, c, 3, 1, [1; 4], 1);
        let y = b.op("Relu", &[&y], vec![]);
        let y = b.op("Add", &[&y, &d], vec![]);
        let u = b.conv_transpose(&y, c, 6, 2);
        let u = b.op("Relu", &[&u], vec![]);
        let l = b.conv(&p0, 6, 6, 1, 1, [0; 4], 1);
        let u = b.op("Add", &[&u, &l], vec![]);
        let heat = b.conv(&u, 6, 1, 1, 1, [0; 4], 1);
        let heat = b.op("Sigmoid", &[&heat], vec![]);
        let proto = b.model_outputs(("image", &[1, 3, h, w]), &[&heat, &y]);
        let proto = if seed.is_multiple_of(2) {
            with_stride_rule(proto, "centre")
        } else {
            proto
        };
        let m = package(proto, h, w);
        assert_eq!(
            (m.cut.h, m.cut.w),
            (h / 2, w / 2),
            "seed {seed}: tokens on the pooled grid"
        );
        let taps: Vec<(usize, usize)> = m.cut.taps.iter().map(|t| (t.h, t.w)).collect();
        assert_eq!(
            taps,
            vec![(h, w)],
            "seed {seed}: the suffix reads the finer map"
        );
        let mut rng = Rng::new(950 + seed);
        let image = rng.normals(3 * h * w, 1.0);
        let maps = prefix_maps(&m, &image);
        let (x, taps) = (&maps[0], &maps[1..]);
        for p in [0.1, 0.4, 0.8] {
            let kept = random_kept(&mut rng, m.cut.h * m.cut.w, p);
            let err = rel_err(
                &sparse_with(&m, x, taps, &kept),
                &dense_masked_with(&m, x, taps, &kept),
            );
            assert!(err <= TOL, "seed {seed}, keep p={p}: relative error {err}");
        }
        let all: Vec<u32> = (0..(m.cut.h * m.cut.w) as u32).collect();
        let dense = dense_suffix_with(&m, x, taps);
        let err = rel_err(&sparse_with(&m, x, taps, &all), &dense);
        assert!(err <= TOL, "seed {seed}: every token kept vs dense, {err}");
    }
}
