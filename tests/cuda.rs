//! The CUDA energy layer: the kernel compiles for every Jetson architecture
//! (with NVRTC alone, no GPU), and where a GPU exists it matches the CPU path.
//! The sparse suffix on the GPU is in `cuda/suffix.rs` (one test binary for
//! both: each integration test binary costs a link of the whole runtime).

mod common;
#[path = "cuda/suffix.rs"]
mod suffix;

use ersm::ersm::cuda::{self, CudaBackend};
use ersm::ersm::{cpu, Device, DeviceChoice, EnergySpec, FeatureMap, Neighbourhood, UnaryHead};

/// Set by CI, where pip's NVRTC wheel is installed: a missing NVRTC is then a failure.
fn nvrtc_required() -> bool {
    std::env::var_os("ERSM_REQUIRE_NVRTC").is_some()
}

fn gpu() -> Option<CudaBackend> {
    if !cuda::driver_present() {
        eprintln!("SKIPPED: no CUDA driver on this machine; CUDA parity not checked");
        return None;
    }
    match CudaBackend::new(0) {
        Ok(b) => {
            eprintln!("CUDA device: {}", b.description);
            Some(b)
        }
        Err(e) => {
            eprintln!("SKIPPED: CUDA driver present but no usable device ({e})");
            None
        }
    }
}

struct Lcg(u64);
impl Lcg {
    fn f32(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
}

fn specs(rng: &mut Lcg, c: usize) -> Vec<EnergySpec> {
    let linear = UnaryHead::Linear {
        w: rng.vec(c, 1.0 / (c as f32).sqrt()),
        b: 0.05,
    };
    let hidden = 8;
    let two = UnaryHead::TwoLayer {
        w1: rng.vec(hidden * c, 0.5),
        b1: rng.vec(hidden, 0.2),
        w2: rng.vec(hidden, 0.5),
        b2: -0.1,
    };
    vec![
        EnergySpec {
            head: linear.clone(),
            lambda: 0.3,
            tau: 1.0,
            steps: 3,
            neighbourhood: Neighbourhood::Four,
        },
        EnergySpec {
            head: linear.clone(),
            lambda: 0.5,
            tau: 0.5,
            steps: 2,
            neighbourhood: Neighbourhood::Eight,
        },
        EnergySpec {
            head: linear,
            lambda: 0.0,
            tau: 1.0,
            steps: 0,
            neighbourhood: Neighbourhood::Four,
        },
        EnergySpec {
            head: two,
            lambda: 0.2,
            tau: 2.0,
            steps: 4,
            neighbourhood: Neighbourhood::Eight,
        },
    ]
}

#[test]
fn kernel_compiles_to_ptx_for_jetson_and_test_architectures() {
    if !cuda::nvrtc_present() {
        assert!(
            !nvrtc_required(),
            "ERSM_REQUIRE_NVRTC is set but libnvrtc cannot be loaded (LD_LIBRARY_PATH?)"
        );
        eprintln!("SKIPPED: no libnvrtc on this machine; install nvidia-cuda-nvrtc-cu12 (pip) to check the kernel compiles");
        return;
    }
    // Nano, Xavier, Orin, and the H100 the GPU checks run on. CUDA 13 dropped
    // sm_53 and sm_72; those devices' own NVRTC (CUDA 10.2, 11.4) compiles there.
    let version = cuda::nvrtc_version().expect("NVRTC version");
    eprintln!("NVRTC {}.{}", version.0, version.1);
    let archs: &[&'static str] = if version.0 <= 12 {
        &["compute_53", "compute_72", "compute_87", "compute_90"]
    } else {
        eprintln!(
            "NVRTC {}.x cannot target sm_53/sm_72: checking sm_87 and sm_90 only",
            version.0
        );
        &["compute_87", "compute_90"]
    };
    for &arch in archs {
        let ptx = cuda::compile(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let text = ptx.to_src();
        assert!(
            text.contains(".entry ersm_energy_gather"),
            "{arch}: no kernel entry in PTX"
        );
        let target = format!(".target sm_{}", &arch["compute_".len()..]);
        assert!(text.contains(&target), "{arch}: PTX lacks {target}");
    }
}

#[test]
fn architecture_choice_follows_compute_capability() {
    assert_eq!(cuda::arch_for(8, 7).unwrap(), "compute_87");
    assert_eq!(cuda::arch_for(7, 2).unwrap(), "compute_72");
    assert_eq!(cuda::arch_for(5, 3).unwrap(), "compute_53");
    assert_eq!(cuda::arch_for(9, 0).unwrap(), "compute_90");
    assert_eq!(cuda::arch_for(12, 0).unwrap(), "compute_90");
    assert!(cuda::arch_for(5, 0).is_err());
}

#[test]
fn without_a_driver_auto_uses_cpu_and_cuda_is_a_clear_error() {
    if cuda::driver_present() {
        eprintln!("SKIPPED: a CUDA driver is present; the no-driver fallback is not testable here");
        return;
    }
    assert!(matches!(
        Device::select(DeviceChoice::Auto).unwrap(),
        Device::Cpu
    ));
    let err = format!("{:#}", Device::select(DeviceChoice::Cuda).unwrap_err());
    assert!(
        err.contains("--device cuda") && err.contains("libcuda"),
        "{err}"
    );
}

#[test]
fn cuda_matches_cpu_exactly_on_kept_sets() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Lcg(7);
    // 1×1, one row, one column, odd, the shipped 28×28, and maps beyond one block's shared memory.
    let shapes = [
        (1, 1, 5),
        (1, 17, 8),
        (13, 1, 8),
        (7, 9, 3),
        (28, 28, 24),
        (28, 28, 32),
        (14, 14, 32),
        (56, 56, 32),
        (64, 80, 48),
    ];
    for &(h, w, c) in &shapes {
        for spec in specs(&mut rng, c) {
            let x = rng.vec(c * h * w, 2.0);
            let fm = FeatureMap::new(&x, c, h, w).unwrap();
            let want = cpu::compute(fm, &spec).unwrap();
            let got = gpu.compute(fm, &spec).unwrap();
            assert_eq!(got.kept, want.kept, "{h}×{w}×{c}: kept sets differ");
            assert_eq!(
                got.features, want.features,
                "{h}×{w}×{c}: gathered rows differ"
            );
            for (i, (a, b)) in got.energies.iter().zip(&want.energies).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{h}×{w}×{c}: energy {i}: {a} vs {b}"
                );
            }
            // Deterministic: the same input gives the same bits.
            let again = gpu.compute(fm, &spec).unwrap();
            assert_eq!(again, got, "{h}×{w}×{c}: two runs differ");
        }
    }
}

#[test]
fn cuda_keeps_lowest_token_when_none_is_negative() {
    let Some(gpu) = gpu() else { return };
    let x: Vec<f32> = (0..40 * 40)
        .map(|i| 1.0 + ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let spec = EnergySpec {
        head: UnaryHead::Linear {
            w: vec![1.0],
            b: 0.0,
        },
        lambda: 0.0,
        tau: 1.0,
        steps: 0,
        neighbourhood: Neighbourhood::Four,
    };
    let fm = FeatureMap::new(&x, 1, 40, 40).unwrap();
    assert_eq!(
        gpu.compute(fm, &spec).unwrap().kept,
        cpu::compute(fm, &spec).unwrap().kept
    );
}

/// The whole ERSM path with `--device cuda`: the energy kernel hands its
/// gathered rows to the GPU suffix in device memory. Same kept sets and
/// logits within 1e-3 of the CPU pipeline on the bundled photos.
#[test]
fn gpu_pipeline_matches_the_cpu_pipeline_on_the_shipped_model() {
    use ersm::model::ModelPackage;
    use ersm::pipeline::Pipeline;
    if gpu().is_none() {
        return;
    }
    let load = || ModelPackage::load("models/mobilenet_v2_ersm").unwrap();
    let cpu = Pipeline::new(load(), Device::Cpu);
    let on_gpu =
        Pipeline::new(load(), Device::select(DeviceChoice::Cuda).unwrap()).with_gpu_suffix();
    assert!(
        on_gpu.gpu_suffix.is_some(),
        "the shipped model's suffix did not lower"
    );
    for name in ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"] {
        let frame =
            ersm::source::images::load(std::path::Path::new(&format!("models/images/{name}")))
                .unwrap();
        let a = cpu.run_ersm(&frame).unwrap();
        let b = on_gpu.run_ersm(&frame).unwrap();
        assert_eq!(a.mask.kept, b.mask.kept, "{name}: kept sets differ");
        let scale = a.logits.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = a
            .logits
            .iter()
            .zip(&b.logits)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            err <= 1e-3 * scale,
            "{name}: logits differ by {err} (scale {scale})"
        );
    }
}
