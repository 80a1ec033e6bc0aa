//! Threads and buffers: results are bit-identical for any thread count (the
//! prefix, the sparse suffix and the dense baseline), activations are fused
//! into the op before them, and the suffix stops allocating once frames repeat.

mod common;

use common::*;
use ersm::ersm::Device;
use ersm::package::ModelPackage;
use ersm::pipeline::Pipeline;
use ersm::source::images;
use ersm::threads::Threads;

const MODEL: &str = "models/mobilenet_v2_ersm";

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn shipped_model_is_bit_identical_on_1_2_and_3_threads() {
    let frames: Vec<_> = ["chelsea.png", "coffee.png"]
        .iter()
        .map(|n| images::load(&std::path::Path::new("models/images").join(n)).unwrap())
        .collect();
    let mut outputs = Vec::new();
    for n in [1, 2, 3] {
        let p = Pipeline::new(ModelPackage::load(MODEL).unwrap(), Device::Cpu)
            .with_threads(Threads::new(n).unwrap());
        assert_eq!(p.threads.count(), n);
        let per_frame: Vec<_> = frames
            .iter()
            .map(|f| {
                let e = p.run_ersm(f).unwrap();
                let d = p.run_dense(f).unwrap();
                (e.mask.kept.clone(), bits(&e.logits), bits(&d.logits))
            })
            .collect();
        outputs.push((n, per_frame));
    }
    let (_, one) = &outputs[0];
    for (n, other) in &outputs[1..] {
        for (i, (a, b)) in one.iter().zip(other).enumerate() {
            assert_eq!(a.0, b.0, "frame {i}: kept set differs on {n} threads");
            assert_eq!(a.1, b.1, "frame {i}: ERSM logits differ on {n} threads");
            assert_eq!(a.2, b.2, "frame {i}: dense logits differ on {n} threads");
        }
    }
}

#[test]
fn random_networks_are_bit_identical_on_any_thread_count() {
    let pools: Vec<Threads> = [1, 2, 4]
        .iter()
        .map(|&n| Threads::new(n).unwrap())
        .collect();
    for seed in 0..8u64 {
        // Large enough maps that rows are split across threads.
        let (h, w, c) = (24, 20, 8);
        let m = package(random_network(seed, h, w, c), h, w);
        let mut rng = Rng::new(500 + seed);
        let x: Vec<f32> = (0..c * h * w).map(|_| rng.f32() * 2.0 - 1.0).collect();
        let kept = random_kept(&mut rng, h * w, 0.6);
        let runs: Vec<Vec<u32>> = pools
            .iter()
            .map(|t| bits(&t.install(|| sparse(&m, &x, &kept))))
            .collect();
        for (t, r) in pools.iter().zip(&runs).skip(1) {
            assert_eq!(
                &runs[0],
                r,
                "seed {seed}: {} threads differ from 1",
                t.count()
            );
        }
        // And the threaded run is still the dense-masked reference.
        let err = rel_err(
            &pools[2].install(|| sparse(&m, &x, &kept)),
            &dense_masked(&m, &x, &kept),
        );
        assert!(err <= 1e-4, "seed {seed}: relative error {err}");
    }
}

#[test]
fn energy_head_convs_split_across_threads_give_identical_energies() {
    use ersm::ersm::{cpu, EnergySpec, FeatureMap, HeadConv, Neighbourhood, UnaryHead};
    // 64 × 64 × 32: large enough that the head's output planes are split.
    let (c, h, w) = (32, 64, 64);
    let mut state = 7u32;
    let mut next = || {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    };
    let x: Vec<f32> = (0..c * h * w).map(|_| next()).collect();
    let mut layer = |groups: usize, k: usize| HeadConv {
        cin: c,
        cout: c,
        k,
        groups,
        dilation: 1,
        weight: (0..c * (c / groups) * k * k).map(|_| next()).collect(),
        bias: (0..c).map(|_| next()).collect(),
        relu: true,
    };
    let layers = vec![layer(c, 3), layer(1, 1)];
    let spec = EnergySpec {
        head: UnaryHead::Conv {
            layers,
            head: Box::new(UnaryHead::Linear {
                w: (0..c).map(|_| next()).collect(),
                b: 0.0,
            }),
        },
        lambda: 0.3,
        tau: 1.0,
        steps: 2,
        neighbourhood: Neighbourhood::Eight,
    };
    let map = FeatureMap::new(&x, c, h, w).unwrap();
    let energies = |n: usize| {
        let m = Threads::new(n)
            .unwrap()
            .install(|| cpu::compute(map, &spec).unwrap());
        bits(&m.energies)
    };
    let one = energies(1);
    for n in [2, 3] {
        assert_eq!(one, energies(n), "energies differ on {n} threads");
    }
}

#[test]
fn mobilenet_activations_are_fused_into_their_convs() {
    let m = ModelPackage::load(MODEL).unwrap();
    let lone: Vec<&str> = m
        .plan
        .steps
        .iter()
        .filter(|s| s.op.activation().is_some())
        .map(|s| s.node.as_str())
        .collect();
    assert!(lone.is_empty(), "activations left unfused: {lone:?}");
    let fused = m
        .plan
        .steps
        .iter()
        .filter(|s| s.op.fused().is_some())
        .count();
    assert!(fused >= 20, "only {fused} ops carry a fused activation");
}

#[test]
fn steady_state_allocates_no_suffix_buffers() {
    let p = Pipeline::new(ModelPackage::load(MODEL).unwrap(), Device::Cpu)
        .with_threads(Threads::new(2).unwrap());
    let frame = images::load(std::path::Path::new("models/images/chelsea.png")).unwrap();
    let mut counts = Vec::new();
    for _ in 0..4 {
        p.run_ersm(&frame).unwrap();
        counts.push(p.model.plan.buffers_allocated());
    }
    assert!(counts[0] > 0, "the first frame allocates its buffers");
    assert_eq!(
        counts[1], counts[3],
        "buffers allocated after frames 1..4: {counts:?}"
    );
}
