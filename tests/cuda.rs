//! The CUDA energy layer: the kernel compiles for every Jetson architecture
//! (with NVRTC alone, no GPU), and where a GPU exists it matches the CPU path.
//! The sparse suffix on the GPU is in `cuda/suffix.rs` (one test binary for
//! both: each integration test binary costs a link of the whole runtime).

mod common;
#[path = "cuda/suffix.rs"]
mod suffix;

use ersm::ersm::cuda::{self, CudaBackend};
use ersm::ersm::{
    cpu, Device, DeviceChoice, EnergySpec, FeatureMap, HeadConv, Neighbourhood, UnaryHead,
};
use std::ffi::{c_void, CString};
use std::process::Command;

/// The architectures the PTX compile tests target: Nano, Xavier, Orin and the
/// x86 GPUs `targets/gpu-check.sh` runs on. CUDA 13's NVRTC no longer targets
/// sm_53 or sm_72; those devices' own NVRTC (CUDA 10.2, 11.4) compiles there.
/// `None` (the test skips) where no NVRTC loads, unless CI requires one.
fn ptx_test_archs() -> Option<&'static [&'static str]> {
    if !ersm::gpu::nvrtc_present() {
        assert!(
            !nvrtc_required(),
            "ERSM_REQUIRE_NVRTC is set but libnvrtc cannot be loaded (LD_LIBRARY_PATH?)"
        );
        eprintln!("SKIPPED: no libnvrtc on this machine; install nvidia-cuda-nvrtc-cu12 (pip) to check the kernels compile");
        return None;
    }
    let version = ersm::gpu::nvrtc_version().expect("NVRTC version");
    eprintln!("NVRTC {}.{}", version.0, version.1);
    if version.0 <= 12 {
        Some(&[
            "compute_53",
            "compute_72",
            "compute_80",
            "compute_87",
            "compute_90",
        ])
    } else {
        eprintln!(
            "NVRTC {}.x cannot target sm_53/sm_72: checking sm_80, sm_87 and sm_90",
            version.0
        );
        Some(&["compute_80", "compute_87", "compute_90"])
    }
}

/// Set by CI, where pip's NVRTC wheel is installed: a missing NVRTC is then a failure.
fn nvrtc_required() -> bool {
    std::env::var_os("ERSM_REQUIRE_NVRTC").is_some()
}

fn gpu() -> Option<CudaBackend> {
    if !ersm::gpu::driver_present() {
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
    // The neighbourhood head's shape: two 3×3 convs (one depthwise, one dense
    // without ReLU here), then the two-layer head.
    let conv = UnaryHead::Conv {
        layers: vec![
            random_conv(rng, c, c, 3, c, true, 1),
            random_conv(rng, c, 8, 3, 1, false, 1),
        ],
        head: Box::new(UnaryHead::TwoLayer {
            w1: rng.vec(hidden * 8, 0.5),
            b1: rng.vec(hidden, 0.2),
            w2: rng.vec(hidden, 0.5),
            b2: -0.1,
        }),
    };
    // A wider view: depthwise-separable convs with taps 2 and 4 apart.
    let dilated = UnaryHead::Conv {
        layers: vec![
            random_conv(rng, c, c, 3, c, false, 2),
            random_conv(rng, c, c, 1, 1, true, 1),
            random_conv(rng, c, c, 3, c, false, 4),
            random_conv(rng, c, 8, 1, 1, true, 1),
        ],
        head: Box::new(UnaryHead::Linear {
            w: rng.vec(8, 0.5),
            b: 0.05,
        }),
    };
    vec![
        EnergySpec {
            head: conv,
            lambda: 0.25,
            tau: 1.0,
            steps: 2,
            neighbourhood: Neighbourhood::Four,
        },
        EnergySpec {
            head: dilated,
            lambda: 0.25,
            tau: 1.0,
            steps: 2,
            neighbourhood: Neighbourhood::Four,
        },
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

fn random_conv(
    rng: &mut Lcg,
    cin: usize,
    cout: usize,
    k: usize,
    groups: usize,
    relu: bool,
    dilation: usize,
) -> HeadConv {
    let fan_in = (cin / groups * k * k) as f32;
    HeadConv {
        cin,
        cout,
        k,
        groups,
        dilation,
        weight: rng.vec(cout * (cin / groups) * k * k, 1.0 / fan_in.sqrt()),
        bias: rng.vec(cout, 0.1),
        relu,
    }
}

type HeadConvFn = unsafe extern "C" fn(
    *const f32,
    i32,
    i32,
    i32,
    *const f32,
    *const f32,
    i32,
    i32,
    i32,
    i32,
    i32,
    *mut f32,
    i32,
    i32,
);

/// A shared library built from CUDA source with the host C++ compiler (one
/// rounding per product and sum, as NVRTC's --fmad=false), or None (SKIPPED)
/// without a compiler. It stays loaded for the rest of the process.
pub(crate) struct HostLibrary(*mut c_void);

impl HostLibrary {
    /// The address of the exported symbol `name` (panics if missing).
    pub(crate) fn symbol(&self, name: &str) -> *mut c_void {
        let n = CString::new(name).unwrap();
        // SAFETY: a handle from dlopen that is never closed.
        let p = unsafe { libc::dlsym(self.0, n.as_ptr()) };
        assert!(!p.is_null(), "no symbol {name}");
        p
    }
}

pub(crate) fn host_library(tag: &str, source: &str, args: &[&str]) -> Option<HostLibrary> {
    // One folder per build: tests running side by side in this process may
    // build the same source at once.
    static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ersm-{tag}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, lib) = (
        dir.join(format!("{tag}.cc")),
        dir.join(format!("lib{tag}.so")),
    );
    std::fs::write(&src, source).unwrap();
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = match Command::new(&cxx)
        .args([
            "-x",
            "c++",
            "-std=c++14",
            "-O2",
            "-shared",
            "-fPIC",
            "-ffp-contract=off",
        ])
        .args(args)
        .arg(&src)
        .arg("-o")
        .arg(&lib)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            println!("SKIPPED: no C++ compiler ({cxx}: {e})");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "{tag}: the kernel source does not compile as C++:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = CString::new(lib.to_str().unwrap()).unwrap();
    // SAFETY: loading the library just built.
    let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen {}", lib.display());
    std::fs::remove_dir_all(&dir).ok();
    Some(HostLibrary(h))
}

/// Per-token unary cost of `ersm_unary_cost`.
type UnaryCostFn = unsafe extern "C" fn(*const f32, i32, i32, i32, *const f32, i32) -> f32;

/// The unary head's device functions built with the host C++ compiler (they
/// are functions of a thread index, without barriers): the conv layer, and
/// the per-token cost.
fn host_unary_head() -> Option<(HeadConvFn, UnaryCostFn)> {
    let wrapper = r#"
extern "C" void head_conv_host(const float* in, int cin, int H, int W, const float* w,
                               const float* b, int cout, int k, int dil, int groups, int relu,
                               float* out, int tid, int nthreads) {
    ersm_head_conv(in, cin, H, W, w, b, cout, k, dil, groups, relu, out, tid, nthreads);
}
extern "C" float unary_cost_host(const float* hx, int hc, int HW, int i, const float* params,
                                 int hidden) {
    return ersm_unary_cost(hx, hc, HW, i, params, hidden);
}
"#;
    let source = format!(
        "#include <math.h>\n#define __device__\n{}{wrapper}",
        cuda::UNARY_HEAD_SRC
    );
    let lib = host_library("unary-head", &source, &[])?;
    // SAFETY: the wrappers above have these signatures.
    unsafe {
        Some((
            std::mem::transmute::<*mut c_void, HeadConvFn>(lib.symbol("head_conv_host")),
            std::mem::transmute::<*mut c_void, UnaryCostFn>(lib.symbol("unary_cost_host")),
        ))
    }
}

/// The GPU's head conv (run thread by thread on the host, 1024 threads that
/// each own several outputs, as a launch of fewer threads than outputs
/// would) gives the CPU's bits on every kind of layer.
#[test]
fn head_conv_kernel_source_matches_the_cpu_conv_bit_for_bit() {
    let Some((f, _)) = host_unary_head() else {
        return;
    };
    let mut rng = Lcg(11);
    // Dense, depthwise, grouped; kernels 1, 3, 5 (dense 1×1 convs are
    // matrix products on the CPU); maps smaller than the kernel; taps 2, 4
    // and 8 apart (the last wider than its map).
    let cases = [
        (32, 32, 3, 1, 28, 28, true, 1),
        (32, 32, 3, 32, 28, 28, false, 1),
        (8, 12, 5, 4, 9, 7, true, 1),
        (5, 3, 1, 1, 1, 13, true, 1),
        (32, 32, 1, 1, 28, 28, false, 1),
        (24, 16, 1, 1, 9, 11, true, 1),
        (6, 6, 5, 6, 2, 2, false, 1),
        (4, 8, 3, 2, 1, 1, true, 1),
        (16, 16, 3, 16, 20, 24, false, 2),
        (8, 4, 3, 1, 15, 11, true, 4),
        (6, 6, 5, 3, 7, 9, true, 8),
        // The shipped face head's depthwise layers (80 × 60, taps 8 apart),
        // and rows that end in a part vector and single positions.
        (32, 32, 3, 32, 60, 80, true, 8),
        (8, 8, 3, 8, 9, 45, false, 4),
    ];
    for &(cin, cout, k, groups, h, w, relu, dil) in &cases {
        let l = random_conv(&mut rng, cin, cout, k, groups, relu, dil);
        let x = rng.vec(cin * h * w, 2.0);
        let want = cpu::conv(FeatureMap::new(&x, cin, h, w).unwrap(), &l);
        let mut got = vec![f32::NAN; cout * h * w];
        for tid in 0..1024 {
            // SAFETY: `x`, the weights and `got` hold what the layer indexes.
            unsafe {
                f(
                    x.as_ptr(),
                    cin as i32,
                    h as i32,
                    w as i32,
                    l.weight.as_ptr(),
                    l.bias.as_ptr(),
                    cout as i32,
                    k as i32,
                    dil as i32,
                    groups as i32,
                    i32::from(relu),
                    got.as_mut_ptr(),
                    tid,
                    1024,
                )
            };
        }
        assert_eq!(got, want, "{cin}→{cout} k{k} d{dil} g{groups} on {h}×{w}");
    }
}

/// The packed head run as the GPU runs it (each conv layer launched over
/// the whole map, one output per thread, then one token per thread) through
/// the host-built device functions gives `cpu::unary`'s bits: the parameter
/// offsets and channel counts the launches use are right for every kind of
/// head, the shipped model's among them. (Where each layer's output lies in
/// the conv scratch is the launch code's alone; a GPU run checks it.)
#[test]
fn packed_unary_head_run_as_launched_matches_the_cpu_bit_for_bit() {
    let Some((conv, cost)) = host_unary_head() else {
        return;
    };
    // Threads of a launch of `n` outputs, in whole blocks of 256.
    let grid = |n: usize| n.div_ceil(256) * 256;
    let mut rng = Lcg(23);
    let shipped = ersm::package::ModelPackage::load("models/mobilenet_v2_ersm").unwrap();
    let mut heads: Vec<(String, UnaryHead, usize, usize)> = specs(&mut rng, 12)
        .into_iter()
        .map(|s| (s.head.describe(), s.head, 9, 11))
        .collect();
    heads.push((
        "shipped".into(),
        shipped.energy.head.clone(),
        shipped.cut.h,
        shipped.cut.w,
    ));
    for (what, head, h, w) in heads {
        let packed = cuda::pack_head(&head);
        let (c, hw) = (head.channels(), h * w);
        let x = rng.vec(c * hw, 3.0);
        let mut hx = x.clone();
        for l in &packed.layers {
            let mut out = vec![f32::NAN; l.cout * hw];
            let n = grid(l.cout * hw);
            for tid in 0..n {
                // SAFETY: `hx` holds cin × H × W values, `out` cout × H × W,
                // and the layer's parameters lie at their offsets.
                unsafe {
                    conv(
                        hx.as_ptr(),
                        l.cin as i32,
                        h as i32,
                        w as i32,
                        packed.values[l.weight..].as_ptr(),
                        packed.values[l.bias..].as_ptr(),
                        l.cout as i32,
                        l.k as i32,
                        l.dilation as i32,
                        l.groups as i32,
                        i32::from(l.relu),
                        out.as_mut_ptr(),
                        tid as i32,
                        n as i32,
                    )
                };
            }
            hx = out;
        }
        assert_eq!(hx.len(), packed.channels * hw, "{what}: channels read");
        let got: Vec<f32> = (0..hw)
            .map(|i| {
                // SAFETY: `hx` holds channels × HW values and the per-token
                // head's parameters follow `per_token`.
                unsafe {
                    cost(
                        hx.as_ptr(),
                        packed.channels as i32,
                        hw as i32,
                        i as i32,
                        packed.values[packed.per_token..].as_ptr(),
                        packed.hidden as i32,
                    )
                }
            })
            .collect();
        let want = cpu::unary(FeatureMap::new(&x, c, h, w).unwrap(), &head);
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn kernel_compiles_to_ptx_for_jetson_and_test_architectures() {
    let Some(archs) = ptx_test_archs() else {
        return;
    };
    for &arch in archs {
        let ptx = cuda::compile(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let text = ptx.to_src();
        for name in cuda::KERNEL_NAMES {
            assert!(
                text.contains(&format!(".entry {name}(")),
                "{arch}: no entry {name} in PTX"
            );
        }
        let target = format!(".target sm_{}", &arch["compute_".len()..]);
        assert!(text.contains(&target), "{arch}: PTX lacks {target}");
    }
}

#[test]
fn architecture_choice_follows_compute_capability() {
    assert_eq!(ersm::gpu::arch_for(8, 7).unwrap(), "compute_87");
    assert_eq!(ersm::gpu::arch_for(7, 2).unwrap(), "compute_72");
    assert_eq!(ersm::gpu::arch_for(5, 3).unwrap(), "compute_53");
    assert_eq!(ersm::gpu::arch_for(9, 0).unwrap(), "compute_90");
    assert_eq!(ersm::gpu::arch_for(12, 0).unwrap(), "compute_90");
    assert!(ersm::gpu::arch_for(5, 0).is_err());
}

#[test]
fn without_a_driver_auto_uses_cpu_and_cuda_is_a_clear_error() {
    if ersm::gpu::driver_present() {
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
    use ersm::package::ModelPackage;
    use ersm::pipeline::{Pipeline, Placement};
    if gpu().is_none() {
        return;
    }
    let load = || ModelPackage::load("models/mobilenet_v2_ersm").unwrap();
    let cpu = Pipeline::new(load(), Device::Cpu);
    let model = load();
    let placement = Placement::decide(&model, DeviceChoice::Cuda).unwrap();
    let on_gpu = Pipeline::placed(model, placement);
    assert!(
        on_gpu.placement.suffix.is_some(),
        "the shipped model's suffix did not lower"
    );
    // The same with each frame's suffix as one CUDA graph, replayed after
    // the energy kernel: twice over the photos, so later frames replay.
    // The suffix is placed here, on the device already open, rather than
    // by `Placement::decide`, which would prepare tract-cuda's nets too.
    let mut graphs = Pipeline::new(load(), Device::select(DeviceChoice::Cuda).unwrap());
    let Device::Cuda(backend) = graphs.device() else {
        panic!("the energy layer is on the CPU")
    };
    let device = ersm::sparse::gpu::cuda::CudaDevice::on(backend.gpu(), true).unwrap();
    let plan = &graphs.model.plan;
    graphs.placement.suffix = Some(ersm::sparse::gpu::GpuSuffix::new(device, plan).unwrap());
    let names = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"];
    for name in names.iter().chain(&names) {
        let frame =
            ersm::source::images::load(std::path::Path::new(&format!("models/images/{name}")))
                .unwrap();
        let a = cpu.run_ersm(&frame).unwrap();
        for (what, p) in [("launches", &on_gpu), ("graphs", &graphs)] {
            let b = p.run_ersm(&frame).unwrap();
            assert_eq!(
                a.mask.kept, b.mask.kept,
                "{name} ({what}): kept sets differ"
            );
            let err = common::rel_err(&b.logits, &a.logits);
            assert!(
                err <= 1e-3,
                "{name} ({what}): logits differ by {err} of their scale"
            );
            assert!(
                b.times.ersm_kernel > 0.0 && a.times.ersm_kernel == 0.0,
                "{name} ({what}): the energy kernel's GPU time is reported on the GPU only"
            );
        }
    }
    // A capture that failed would have fallen back to launches unseen.
    let placement = graphs.placement();
    assert!(
        placement.contains("frames as CUDA graphs"),
        "the frames were not replayed as graphs: {placement}"
    );
}

/// On a stream the energy kernel keeps the held positions beside the
/// negative energies, as the CPU layer does: the same kept sets, rows and
/// energies, with none, some and every position held.
#[test]
fn cuda_keeps_the_held_tokens_as_the_cpu_does() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Lcg(11);
    for &(h, w, c) in &[(7, 9, 3), (28, 28, 32), (60, 80, 32)] {
        for spec in specs(&mut rng, c) {
            let x = rng.vec(c * h * w, 2.0);
            let fm = FeatureMap::new(&x, c, h, w).unwrap();
            let some: Vec<u32> = (0..(h * w) as u32).filter(|i| i % 7 < 2).collect();
            let every: Vec<u32> = (0..(h * w) as u32).collect();
            for held in [&[][..], &some, &every] {
                let want = cpu::compute_holding(fm, &spec, held).unwrap();
                let got = gpu.compute_holding(fm, &spec, held).unwrap();
                let what = format!("{h}×{w}×{c}, {} held", held.len());
                assert_eq!(got.kept, want.kept, "{what}: kept sets differ");
                assert_eq!(got.features, want.features, "{what}: gathered rows differ");
                assert!(
                    held.iter().all(|i| got.kept.binary_search(i).is_ok()),
                    "{what}"
                );
            }
        }
    }
}

/// A tracked stream of the face package (`--track --device cuda`: held
/// tokens and gate shifts in the energy kernel and the suffix's kernels)
/// against the same stream on the CPU: the same kept sets and every level's
/// token count, frame after frame, refreshes included, and faces within
/// 1e-3 of their scale.
#[test]
fn a_tracked_face_stream_on_the_gpu_matches_the_cpu() {
    use ersm::package::ModelPackage;
    use ersm::pipeline::{Pipeline, Placement};
    if gpu().is_none() {
        return;
    }
    let load = || ModelPackage::load("models/centerface_ersm").unwrap();
    let cpu = Pipeline::new(load(), Device::Cpu).with_tracking().unwrap();
    let model = load();
    let placement = Placement::decide(&model, DeviceChoice::Cuda).unwrap();
    let on_gpu = Pipeline::placed(model, placement).with_tracking().unwrap();
    assert!(
        on_gpu.placement.suffix.is_some(),
        "the face package's suffix did not lower"
    );
    let frame =
        ersm::source::images::load(std::path::Path::new("models/images/astronaut.png")).unwrap();
    let refresh = cpu.model.manifest.track.as_ref().unwrap().refresh.max(2);
    for i in 0..refresh + 2 {
        let a = cpu.run_ersm(&frame).unwrap();
        let b = on_gpu.run_ersm(&frame).unwrap();
        assert_eq!(a.mask.kept, b.mask.kept, "frame {i}: kept sets differ");
        assert_eq!(a.tokens, b.tokens, "frame {i}: level token counts differ");
        let err = common::rel_err(&b.logits, &a.logits);
        assert!(
            err <= 1e-3,
            "frame {i}: outputs differ by {err} of their scale"
        );
        assert_eq!(cpu.held(), on_gpu.held(), "frame {i}: held tokens differ");
    }
}

/// The prefix and the dense baseline through tract-cuda (`--device cuda`)
/// against tract's CPU plans on the bundled photos: features and logits
/// within 1e-3 of their scale. Where tract-cuda cannot serve (no GPU, a
/// missing CUDA library, a CUDA 11.4 build), the reason names the net.
#[test]
fn tract_cuda_prefix_and_dense_baseline_match_the_cpu() {
    use ersm::package::ModelPackage;
    use ersm::pipeline::Pipeline;
    let cpu = Pipeline::new(
        ModelPackage::load("models/mobilenet_v2_ersm").unwrap(),
        Device::Cpu,
    );
    let m = &cpu.model;
    let nets = m
        .prefix
        .on_cuda()
        .and_then(|p| Ok((p, m.baseline_suffix().on_cuda()?)));
    let (prefix, dense) = match nets {
        Ok(n) => n,
        Err(e) => {
            let why = format!("{e:#}");
            assert!(
                why.starts_with("prefix: tract-cuda"),
                "the refusal does not name the net: {why}"
            );
            eprintln!("SKIPPED: tract-cuda cannot serve here: {why}");
            return;
        }
    };
    assert!(
        ersm::gpu::driver_present(),
        "tract-cuda prepared a plan without a CUDA driver"
    );
    let close = |what: &str, want: &[f32], got: &[f32]| {
        let err = common::rel_err(got, want);
        assert!(err <= 1e-3, "{what}: differ by {err} of their scale");
    };
    for name in ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"] {
        let frame =
            ersm::source::images::load(std::path::Path::new(&format!("models/images/{name}")))
                .unwrap();
        let input = cpu.preprocess(&frame).unwrap();
        let features = m.prefix.run(&input).unwrap();
        close(
            &format!("{name}: prefix"),
            &features,
            &prefix.run(&input).unwrap(),
        );
        close(
            &format!("{name}: dense baseline"),
            &m.baseline_suffix().run(&features).unwrap(),
            &dense.run(&features).unwrap(),
        );
    }
}

/// With the prefix on tract-cuda, the energy kernel reads the prefix's output
/// where tract-cuda left it, and the dense baseline's suffix takes it there
/// too: the same kept set, energies and logits as the same features read
/// back to the host and uploaded again.
#[test]
fn tract_cuda_prefix_output_feeds_the_kernel_in_device_memory() {
    use ersm::package::ModelPackage;
    use ersm::pipeline::{Pipeline, Placement};
    if gpu().is_none() {
        return;
    }
    let model = ModelPackage::load("models/mobilenet_v2_ersm").unwrap();
    let placement = Placement::decide(&model, DeviceChoice::Cuda).unwrap();
    let on_gpu = Pipeline::placed(model, placement);
    if on_gpu.placement.nets.is_none() {
        eprintln!("SKIPPED: tract-cuda cannot serve here (the log says why)");
        return;
    }
    let cut = &on_gpu.model.cut;
    for name in ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"] {
        let frame =
            ersm::source::images::load(std::path::Path::new(&format!("models/images/{name}")))
                .unwrap();
        let input = on_gpu.preprocess(&frame).unwrap();
        let r = on_gpu.ersm_from_input(&input).unwrap();
        let (logits, mask) = (r.logits, r.mask);
        assert!(
            on_gpu.features_stayed_on_device(),
            "{name}: the prefix's output went through the host ({})",
            on_gpu.placement()
        );
        let host = on_gpu.features(&input).unwrap();
        let want = on_gpu
            .device()
            .compute(
                FeatureMap::new(&host.features, cut.c, cut.h, cut.w).unwrap(),
                &on_gpu.model.energy,
            )
            .unwrap();
        assert_eq!(mask.kept, want.kept, "{name}: kept sets differ");
        assert_eq!(mask.energies, want.energies, "{name}: energies differ");
        let want_logits = on_gpu
            .sparse_logits(&want.kept, want.features, host.taps.clone())
            .unwrap();
        let err = common::rel_err(&logits, &want_logits);
        assert!(err <= 1e-5, "{name}: sparse logits differ by {err}");
        let (dense, _) = on_gpu.dense_from_input(&input).unwrap();
        let err = common::rel_err(&dense, &on_gpu.dense_logits(&host).unwrap());
        assert!(err <= 1e-5, "{name}: dense logits differ by {err}");
    }
}
