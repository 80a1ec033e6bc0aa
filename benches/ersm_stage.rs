//! The energy layer by map size: CPU, and CUDA when a device is present.
//!
//! Per map (14×14, 28×28, 56×56 tokens at 24 and 32 channels) and head (a
//! linear head; a conv head: two 3×3 convs, then a two-layer head of 16):
//! median µs per frame and effective GB/s (features read once, energies,
//! kept indices and gathered rows written once). CUDA rows give the kernel alone (CUDA events)
//! and the whole stage (upload + launch + download, wall clock).
//! Run: `cargo bench --bench ersm_stage` (`-- --json FILE` to save the rows).

use ersm::ersm::cuda::CudaBackend;
use ersm::ersm::{cpu, EnergySpec, FeatureMap, HeadConv, Neighbourhood, UnaryHead};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let gpu = if ersm::gpu::driver_present() {
        match CudaBackend::new(0) {
            Ok(b) => Some(b),
            Err(e) => {
                println!("CUDA rows skipped: {e}");
                None
            }
        }
    } else {
        println!("CUDA rows skipped: no CUDA driver on this machine");
        None
    };
    if let Some(g) = &gpu {
        println!("GPU: {}", g.description);
    }
    println!(
        "{:>10} {:>4} {:>6} {:>6} {:>8} {:>12} {:>10}",
        "map", "C", "head", "keep", "device", "µs/frame", "GB/s"
    );
    let mut rows = Vec::new();
    let mut seed = 1u64;
    for c in [24usize, 32] {
        for side in [14usize, 28, 56] {
            let hw = side * side;
            // Smooth features so the mask is spatially coherent, as on real images.
            let x: Vec<f32> = (0..c * hw)
                .map(|i| {
                    let (ch, p) = (i / hw, i % hw);
                    let (y, xx) = ((p / side) as f32, (p % side) as f32);
                    ((y * 0.31 + ch as f32).sin() + (xx * 0.23 - ch as f32 * 0.7).cos()) * 0.8
                })
                .collect();
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let w: Vec<f32> = (0..c)
                .map(|k| ((k as f32 + seed as f32 * 1e-9) * 1.7).sin() / (c as f32).sqrt())
                .collect();
            let conv = |i: usize| HeadConv {
                cin: c,
                cout: c,
                k: 3,
                groups: 1,
                dilation: 1,
                weight: (0..c * c * 9)
                    .map(|k| ((k + i) as f32 * 0.37).sin() / (c as f32 * 3.0))
                    .collect(),
                bias: vec![0.01; c],
                relu: true,
            };
            let heads = [
                ("linear", UnaryHead::Linear { w, b: 0.0 }),
                (
                    "conv",
                    UnaryHead::Conv {
                        layers: vec![conv(0), conv(1)],
                        head: Box::new(UnaryHead::TwoLayer {
                            w1: (0..16 * c).map(|k| (k as f32 * 0.71).cos() * 0.3).collect(),
                            b1: vec![0.0; 16],
                            w2: (0..16).map(|k| (k as f32 * 1.3).sin() * 0.3).collect(),
                            b2: -0.1,
                        }),
                    },
                ),
            ];
            for (head_name, head) in heads {
                let spec = EnergySpec {
                    head,
                    lambda: 0.25,
                    tau: 1.0,
                    steps: 2,
                    neighbourhood: Neighbourhood::Four,
                };
                let fm = FeatureMap::new(&x, c, side, side).unwrap();
                let mask = cpu::compute(fm, &spec).unwrap();
                let n = mask.kept.len();
                let bytes = (hw * c + n * c + hw + n) * 4;
                let reps = match (head_name, hw > 1000) {
                    ("conv", _) => 30,
                    (_, true) => 200,
                    _ => 1000,
                };
                let mut push = |device: &str, us: f64| {
                    let gbs = bytes as f64 / (us * 1e-6) / 1e9;
                    println!(
                        "{:>10} {:>4} {:>6} {:>6.3} {:>8} {:>12.2} {:>10.2}",
                        format!("{side}×{side}"),
                        c,
                        head_name,
                        mask.keep_ratio(),
                        device,
                        us,
                        gbs
                    );
                    rows.push(serde_json::json!({"map": side, "channels": c, "head": head_name, "keep": mask.keep_ratio(), "device": device, "us_per_frame": us, "gb_per_s": gbs}));
                };
                let cpu_us = median(
                    (0..reps)
                        .map(|_| {
                            let t = Instant::now();
                            std::hint::black_box(cpu::compute(fm, &spec).unwrap());
                            t.elapsed().as_secs_f64() * 1e6
                        })
                        .collect(),
                );
                push("cpu", cpu_us);
                if let Some(g) = &gpu {
                    for _ in 0..10 {
                        g.compute(fm, &spec).unwrap();
                    }
                    let (mut kernel, mut wall) = (Vec::new(), Vec::new());
                    for _ in 0..reps {
                        let m = g.compute(fm, &spec).unwrap();
                        assert_eq!(m.kept, mask.kept, "CUDA kept set differs from CPU");
                        let t = g.last_timing();
                        kernel.push(t.kernel_ms as f64 * 1e3);
                        wall.push(t.wall_ms * 1e3);
                    }
                    push("cuda-krn", median(kernel));
                    push("cuda-all", median(wall));
                }
            }
        }
    }
    // The shipped face package's head (five dilated separable convs, 34 M
    // multiply-adds) on its 80×60 map, on one thread and on every core, as
    // `ersm bench` runs it: the energy layer's share of a CenterFace frame.
    let face = ersm::model::CutModel::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/centerface_ersm"
    ))
    .expect("the bundled face package loads");
    let (c, h, w) = (face.cut.c, face.cut.h, face.cut.w);
    let x: Vec<f32> = (0..c * h * w)
        .map(|i| {
            let (ch, p) = (i / (h * w), i % (h * w));
            let (y, xx) = ((p / w) as f32, (p % w) as f32);
            ((y * 0.11 + ch as f32).sin() * (xx * 0.07 - ch as f32 * 0.3).cos()).max(0.0) * 2.0
        })
        .collect();
    // Its gate (the second energy layer, four dilated separable convs, 8.5 M
    // multiply-adds) on the first stride-16 block's 40×30 map of 64 channels.
    let gate = face.plan.gates().next().expect("the face package's gate");
    let (gc, gh, gw) = (gate.c, gate.h, gate.w);
    let gx: Vec<f32> = (0..gc * gh * gw).map(|i| x[i % x.len()]).collect();
    for (name, head, fm, spec) in [
        (
            "face",
            "centerface_ersm",
            FeatureMap::new(&x, c, h, w).unwrap(),
            &face.energy,
        ),
        (
            "gate",
            "centerface_ersm gate",
            FeatureMap::new(&gx, gc, gh, gw).unwrap(),
            &gate.spec,
        ),
    ] {
        for n in [1, ersm::threads::Threads::available()] {
            let threads = ersm::threads::Threads::new(n).unwrap();
            let (us, keep) = threads.install(|| {
                let keep = cpu::compute(fm, spec).unwrap().keep_ratio();
                let us = median(
                    (0..60)
                        .map(|_| {
                            let t = Instant::now();
                            std::hint::black_box(cpu::compute(fm, spec).unwrap());
                            t.elapsed().as_secs_f64() * 1e6
                        })
                        .collect(),
                );
                (us, keep)
            });
            let map = format!("{}×{}", fm.w, fm.h);
            println!(
                "{:>10} {:>4} {:>6} {:>6.3} {:>8} {:>12.2}   ({n} thread(s))",
                map, fm.c, name, keep, "cpu", us
            );
            rows.push(serde_json::json!({"map": format!("{}x{}", fm.w, fm.h), "channels": fm.c, "head": head, "threads": n, "keep": keep, "device": "cpu", "us_per_frame": us}));
        }
    }
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    }
}
