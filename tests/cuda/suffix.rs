//! The sparse suffix on the GPU (`src/sparse/gpu`) against the CPU sparse
//! executor, on the tiny model, random networks covering every op, and the
//! shipped model.
//!
//! On a machine with an NVIDIA GPU the kernels run there. Everywhere, the
//! same kernel source is also compiled for the CPU with the C++ compiler
//! (a few lines of emulation stand in for CUDA's thread indices; the kernels
//! use no shared memory or barriers) and the whole GPU executor runs on it:
//! lowering, weight and rulebook uploads, launch order and sizes, buffer
//! lifetimes. What that cannot check (the GPU's own memory and timing) needs
//! the GPU run of `targets/gpu-check.sh`.

use crate::common::*;
use ersm::package::ModelPackage;
use ersm::sparse::gpu::cuda::CudaDevice;
use ersm::sparse::gpu::{
    Args, Device, DeviceTokens, Family, GpuSuffix, Kernel, RulebookSite, BLOCK,
};
use ersm::sparse::launch::all_sources;
use ersm::sparse::plan::GateOffsets;
use std::ffi::c_void;

/// Relative error allowed: the sums run in another order than the CPU's GEMM.
const TOL: f32 = 1e-4;

/// Lines that make the CUDA source compile as C++ on the host.
const EMULATION: &str = r#"
#include <math.h>
typedef unsigned int u32;
struct sfx_dim3 { unsigned x, y, z; };
static thread_local sfx_dim3 blockIdx, threadIdx, blockDim;
extern "C" void sfx_emu_set(unsigned block, unsigned thread, unsigned dim) {
    blockIdx.x = block; threadIdx.x = thread; blockDim.x = dim;
}
#define __device__
#define __global__
#define __forceinline__ inline
"#;

/// A kernel's trampoline: reads the parameter struct from the bytes given.
type KernelFn = unsafe extern "C" fn(*const u8);
/// The size of a kernel's parameter struct, as the C++ compiler lays it out.
type SizeFn = unsafe extern "C" fn() -> usize;

/// Lines after the kernels: for each entry point `k`, `emu_k` calls it with
/// the parameter struct its bytes hold, and `emu_size_k` gives that
/// struct's size, both deduced from the kernel's own signature.
fn trampolines() -> String {
    let mut s = String::from(
        "template <typename P> static void sfx_emu_call(void (*f)(P), const void* p) { f(*static_cast<const P*>(p)); }\n\
         template <typename P> static unsigned long sfx_emu_size(void (*)(P)) { return sizeof(P); }\n",
    );
    for f in Family::ALL {
        for k in f.entries() {
            s += &format!(
                "extern \"C\" void emu_{k}(const void* p) {{ sfx_emu_call({k}, p); }}\n\
                 extern \"C\" unsigned long emu_size_{k}() {{ return sfx_emu_size({k}); }}\n"
            );
        }
    }
    s
}

/// A launch as a device takes it.
type LaunchArgs = (Kernel, usize, Args);

/// The kernels compiled for this CPU, run thread by thread.
#[derive(Clone)]
struct Emulator {
    set: unsafe extern "C" fn(u32, u32, u32),
    /// Each kernel's trampoline and parameter size.
    kernels: Vec<(Kernel, KernelFn, usize)>,
    /// Whether frames are captured as graphs: lists of launches, replayed
    /// as one (as a CUDA graph keeps the parameters of its launches).
    graphs: bool,
    /// The launches captured so far, while capturing.
    capturing: std::cell::RefCell<Option<Vec<LaunchArgs>>>,
}

/// A host buffer the kernels write through raw addresses.
struct HostBuf {
    ptr: *mut f32,
    len: usize,
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by `Box::into_raw` of a slice of `len` values.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.ptr, self.len,
            )))
        };
    }
}

impl HostBuf {
    fn new(data: Box<[f32]>) -> HostBuf {
        let len = data.len();
        HostBuf {
            ptr: Box::into_raw(data) as *mut f32,
            len,
        }
    }
}

impl Emulator {
    /// Builds the kernels with the host C++ compiler; `None` (SKIPPED) when
    /// there is none.
    fn build() -> Option<Emulator> {
        let source = format!("{EMULATION}{}\n{}", all_sources(), trampolines());
        let lib = crate::host_library("sfx-emu", &source, &["-DSFX_HOST_EMULATION"])?;
        // SAFETY: the symbols have the signatures the source gives them.
        unsafe {
            let set = std::mem::transmute::<*mut c_void, unsafe extern "C" fn(u32, u32, u32)>(
                lib.symbol("sfx_emu_set"),
            );
            let mut kernels = Vec::new();
            for family in Family::ALL {
                for name in family.entries() {
                    let f = lib.symbol(&format!("emu_{name}"));
                    let size = lib.symbol(&format!("emu_size_{name}"));
                    kernels.push((
                        Kernel { family, name },
                        std::mem::transmute::<*mut c_void, KernelFn>(f),
                        std::mem::transmute::<*mut c_void, SizeFn>(size)(),
                    ));
                }
            }
            Some(Emulator {
                set,
                kernels,
                graphs: false,
                capturing: Default::default(),
            })
        }
    }

    /// The same kernels, capturing frames as graphs.
    fn with_graphs(&self) -> Emulator {
        Emulator {
            graphs: true,
            ..self.clone()
        }
    }

    /// Runs one launch, thread by thread.
    fn run(&self, kernel: Kernel, threads: usize, args: &Args) {
        let &(_, f, size) = self
            .kernels
            .iter()
            .find(|(k, ..)| *k == kernel)
            .unwrap_or_else(|| panic!("no kernel {kernel:?} in the source"));
        // The Rust parameter struct is its C twin's size: a field added on
        // one side only shows here, by name.
        assert_eq!(
            args.len(),
            size,
            "{}: the Rust parameter struct has {} bytes, the C one {size}",
            kernel.name,
            args.len()
        );
        // Whole blocks, as the GPU runs them: the kernels' bounds checks count.
        for i in 0..threads.div_ceil(BLOCK) * BLOCK {
            // SAFETY: the executor sized every buffer in `p` for `threads`
            // outputs; the emulation globals are thread-local.
            unsafe {
                (self.set)((i / BLOCK) as u32, (i % BLOCK) as u32, BLOCK as u32);
                f(args.as_ptr());
            }
        }
    }
}

impl Device for Emulator {
    type Buf = HostBuf;

    fn upload(&self, data: &[f32]) -> anyhow::Result<HostBuf> {
        Ok(HostBuf::new(data.into()))
    }

    fn alloc(&self, n: usize) -> anyhow::Result<HostBuf> {
        // NaN, so a value read before any kernel wrote it shows in the result.
        Ok(HostBuf::new(vec![f32::NAN; n.max(1)].into()))
    }

    unsafe fn copy_from(&self, src: u64, n: usize) -> anyhow::Result<HostBuf> {
        // SAFETY: the caller promises `n` live values at `src`.
        let data = unsafe { std::slice::from_raw_parts(src as *const f32, n) };
        self.upload(data)
    }

    fn ptr(&self, buf: &HostBuf) -> u64 {
        buf.ptr as u64
    }

    fn launch(&self, kernel: Kernel, threads: usize, args: &Args) -> anyhow::Result<()> {
        match self.capturing.borrow_mut().as_mut() {
            Some(list) => list.push((kernel, threads, *args)),
            None => self.run(kernel, threads, args),
        }
        Ok(())
    }

    fn write(&self, buf: &mut HostBuf, at: usize, data: &[f32]) -> anyhow::Result<()> {
        assert!(at + data.len() <= buf.len, "write past the end");
        // SAFETY: `buf` holds `len` values, and `at + data.len()` is within them.
        unsafe { std::slice::from_raw_parts_mut(buf.ptr.add(at), data.len()) }
            .copy_from_slice(data);
        Ok(())
    }

    fn download(&self, buf: &HostBuf, n: usize) -> anyhow::Result<Vec<f32>> {
        assert!(n <= buf.len, "download past the end");
        // SAFETY: `buf` holds `len` initialised values.
        Ok(unsafe { std::slice::from_raw_parts(buf.ptr, n) }.to_vec())
    }

    fn sync(&self) -> anyhow::Result<()> {
        // Every emulated launch has finished when it returns.
        Ok(())
    }

    type Graph = Vec<LaunchArgs>;

    fn capture(
        &self,
        f: &mut dyn FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<Option<Vec<LaunchArgs>>> {
        if !self.graphs {
            return Ok(None);
        }
        *self.capturing.borrow_mut() = Some(Vec::new());
        let r = f();
        let list = self.capturing.borrow_mut().take().expect("capturing");
        r.map(|()| Some(list))
    }

    fn launch_graph(&self, graph: &Vec<LaunchArgs>) -> anyhow::Result<()> {
        for (kernel, threads, p) in graph {
            self.run(*kernel, *threads, p);
        }
        Ok(())
    }
}

/// CPU sparse suffix against the GPU one on the same features and kept set.
fn compare<D: Device>(m: &ModelPackage, gpu: &GpuSuffix<D>, x: &[f32], kept: &[u32], what: &str) {
    compare_with(m, gpu, x, &[], kept, what)
}

/// [`compare`] for a suffix that also reads the prefix maps `taps`.
fn compare_with<D: Device>(
    m: &ModelPackage,
    gpu: &GpuSuffix<D>,
    x: &[f32],
    taps: &[Vec<f32>],
    kept: &[u32],
    what: &str,
) {
    compare_frame(m, gpu, x, taps, kept, None, what)
}

/// [`compare_with`] for a stream's frame when `stream` holds the raster
/// indices held and the gates' offsets: the CPU's `run_holding` against
/// the GPU's run with the plan's `holding` (none: the GPU's gates hold
/// nothing and move by nothing).
fn compare_frame<D: Device>(
    m: &ModelPackage,
    gpu: &GpuSuffix<D>,
    x: &[f32],
    taps: &[Vec<f32>],
    kept: &[u32],
    stream: Option<(&[u32], GateOffsets)>,
    what: &str,
) {
    let fm = ersm::ersm::FeatureMap::new(x, m.cut.c, m.cut.h, m.cut.w).unwrap();
    let feats = ersm::ersm::cpu::gather(fm, kept);
    let (cpu_out, cpu_frame) = match stream {
        None => m.plan.run(kept, feats.clone(), taps.to_vec()),
        Some((held, offsets)) => {
            m.plan
                .run_holding(kept, held, offsets, feats.clone(), taps.to_vec())
        }
    }
    .expect("CPU suffix runs");
    let holding = stream.map(|(held, offsets)| m.plan.holding(held, offsets));
    let cpu = m.plan.dense_outputs(&cpu_out, &cpu_frame.sets);
    let (out, frame) = gpu
        .run(&m.plan, kept, &feats, taps, holding.as_ref())
        .expect("GPU suffix runs");
    // Behind a gate the sets are the device's: the CPU's, entry for entry.
    assert_eq!(
        frame.sets, cpu_frame.sets,
        "{what}: token sets after the run"
    );
    let got = m.plan.dense_outputs(&out, &frame.sets);
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: non-finite output"
    );
    let err = rel_err(&got, &cpu);
    assert!(err <= TOL, "{what}: GPU vs CPU relative error {err}");
    // The token sets and rulebooks the kernels build before the steps are
    // the host's, entry for entry (those behind a gate are built by the
    // steps, checked above), and the suffix run on them from device memory
    // gives the same output bit for bit.
    let built = gpu
        .frame_on_device(kept)
        .expect("the frame builds on the device");
    let host = m.plan.frame(kept);
    for (l, set) in host.sets.iter().enumerate() {
        if host.has(l) {
            assert_eq!(&built.sets[l], set, "{what}: level {l} built on the device");
        }
    }
    for (r, key) in m.plan.rules.iter().enumerate() {
        if host.has(key.in_level) && host.has(key.out_level) {
            assert_eq!(
                built.rulebooks[r].table, cpu_frame.rulebooks[r].table,
                "{what}: rulebook {r} built on the device"
            );
        }
    }
    assert_eq!(built.rulebooks.len(), frame.rulebooks.len());
    let uploaded = gpu.upload_kept(kept).unwrap();
    let rows = gpu.device().upload(&feats).unwrap();
    // SAFETY: the kept list, its count and its rows, uploaded just above.
    let run = unsafe {
        gpu.run_on_device(
            uploaded.tokens,
            gpu.device().ptr(&rows),
            taps,
            holding.as_ref(),
        )
    }
    .unwrap_or_else(|e| panic!("{what}: run on device tokens: {e:#}"));
    assert_eq!(
        run.counts,
        cpu_frame.counts(),
        "{what}: token counts read back"
    );
    if let Some(sets) = &run.sets {
        assert_eq!(sets, &cpu_frame.sets, "{what}: sets read back");
    }
    assert_eq!(
        m.plan.dense_outputs(&run.values, &cpu_frame.sets),
        got,
        "{what}: the device-built frame's output"
    );
}

/// `m` lowered for a fresh device, against the CPU on random features and a
/// random mask at each keep ratio.
fn compare_random_masks<D: Device>(
    make: &impl Fn() -> D,
    m: &ModelPackage,
    rng: &mut Rng,
    keeps: &[f32],
    what: &str,
) {
    let gpu =
        GpuSuffix::new(make(), &m.plan).unwrap_or_else(|e| panic!("{what} does not lower: {e:#}"));
    let (c, h, w) = (m.cut.c, m.cut.h, m.cut.w);
    for &p in keeps {
        let x = rng.normals(c * h * w, 1.0);
        let kept = random_kept(rng, h * w, p);
        compare(m, &gpu, &x, &kept, &format!("{what}, keep {p}"));
    }
}

/// Every model and mask of the comparison, on one device.
fn check_everything<D: Device>(make: impl Fn() -> D) {
    let tiny = ModelPackage::load("models/tiny").unwrap();
    let gpu = GpuSuffix::new(make(), &tiny.plan).expect("tiny model lowers");
    let mut rng = Rng::new(7);
    for p in [0.02, 0.3, 0.7, 1.0] {
        let x = rng.normals(tiny.cut.c * tiny.cut.h * tiny.cut.w, 1.0);
        let kept = random_kept(&mut rng, tiny.cut.h * tiny.cut.w, p);
        compare(&tiny, &gpu, &x, &kept, &format!("tiny, keep {p}"));
    }
    let (mut upsampled, mut merged) = (0, 0);
    for seed in 0..24u64 {
        let (h, w, c) = RANDOM_SHAPES[seed as usize % RANDOM_SHAPES.len()];
        let m = package(random_network(seed, h, w, c), h, w);
        upsampled += usize::from(m.plan.levels.iter().any(|l| l.up));
        merged += usize::from(m.plan.levels.iter().any(|l| l.merge.is_some()));
        let mut rng = Rng::new(500 + seed);
        compare_random_masks(
            &make,
            &m,
            &mut rng,
            &[0.05, 0.4, 1.0],
            &format!("random network {seed}"),
        );
    }
    // The upsampled levels' kernels and the merged adds ran too.
    assert!(
        upsampled > 0 && merged > 0,
        "{upsampled} random networks upsample, {merged} add a lateral"
    );
    // Fill vectors on dropped positions: conv, depthwise and pooling kernels.
    for seed in 0..12u64 {
        let (h, w, c) = RANDOM_SHAPES[seed as usize % RANDOM_SHAPES.len()];
        let mut rng = Rng::new(900 + seed);
        let m = with_random_fills(random_network(seed, h, w, c), h, w, &mut rng, 0.6);
        let what = format!("random network {seed} with fills");
        compare_random_masks(&make, &m, &mut rng, &[0.05, 0.4], &what);
    }
    // Detector-shaped suffixes: prefix maps gathered at their own levels
    // (`sfx_gather_map`, on host- and device-built token lists), several
    // outputs; then with a gate after a strided block (`gate.cu`,
    // `sfx_level`'s rule 4, the levels and rulebooks behind it built by the
    // steps), under both stride rules.
    let shapes = [(16, 16, 6), (8, 24, 4)];
    let detectors = (0..6u64).map(|s| (detector_package(s, &shapes), s, "random detector"));
    let gated = (0..4u64).map(|s| (gated_detector_package(s, &shapes), s, "gated detector"));
    for (m, seed, kind) in detectors.chain(gated) {
        let gpu = GpuSuffix::new(make(), &m.plan).expect("a detector lowers");
        let mut rng = Rng::new(700 + seed);
        let image = rng.normals(m.prefix.input_shape.iter().product(), 1.0);
        let maps = prefix_maps(&m, &image);
        for p in [0.05, 0.5, 1.0] {
            let kept = random_kept(&mut rng, m.cut.h * m.cut.w, p);
            let what = format!("{kind} {seed}, keep {p}");
            compare_with(&m, &gpu, &maps[0], &maps[1..], &kept, &what);
        }
    }
    // A stream's frames on gated detectors: held tokens kept at every gate
    // (`sfx_level`'s rule 4 reading the held flags) and the gates' costs
    // moved by their shift (`sfx_gate_unary`), or not on a refresh frame;
    // then a frame off the stream on the same device buffers, which holds
    // nothing again.
    for seed in 0..4u64 {
        let m = gated_detector_package(seed, &shapes);
        let mut shifted = gated_detector_package(seed, &shapes);
        let names: Vec<String> = m.plan.gates_named().map(|(n, _)| n.to_string()).collect();
        for name in &names {
            shifted.plan.set_gate_shift(name, 0.4).unwrap();
        }
        let gpu = GpuSuffix::new(make(), &m.plan).expect("a gated detector lowers");
        let mut rng = Rng::new(1700 + seed);
        let image = rng.normals(m.prefix.input_shape.iter().product(), 1.0);
        let maps = prefix_maps(&m, &image);
        for p in [0.3, 0.9] {
            let kept = random_kept(&mut rng, m.cut.h * m.cut.w, p);
            let held: Vec<u32> = kept.iter().copied().filter(|_| rng.f32() < 0.2).collect();
            for offsets in [GateOffsets::Stream, GateOffsets::Package] {
                let what = format!("stream {seed}, keep {p}, {offsets:?}");
                let stream = Some((&held[..], offsets));
                compare_frame(&shifted, &gpu, &maps[0], &maps[1..], &kept, stream, &what);
            }
            let what = format!("off the stream {seed}, keep {p}");
            compare_with(&m, &gpu, &maps[0], &maps[1..], &kept, &what);
        }
    }
    let shipped = ModelPackage::load("models/mobilenet_v2_ersm").unwrap();
    let gpu = GpuSuffix::new(make(), &shipped.plan).expect("the shipped model lowers");
    let mut rng = Rng::new(11);
    let (h, w, c) = (shipped.cut.h, shipped.cut.w, shipped.cut.c);
    for keep in [0.3, 0.8] {
        // Post-ReLU6-like features: non-negative, bounded.
        let x: Vec<f32> = (0..c * h * w).map(|_| 6.0 * rng.f32()).collect();
        let kept = blob_kept(&mut rng, h, w, keep);
        compare(
            &shipped,
            &gpu,
            &x,
            &kept,
            &format!("shipped model, keep {keep}"),
        );
    }
    // The `centre` rule's edge cases: no centre tap active (each strided
    // level keeps the position over the first token), one token in the last
    // row and column, and every token.
    let odd: Vec<u32> = (0..(h * w) as u32)
        .filter(|i| (i / w as u32) % 2 == 1 && (i % w as u32) % 2 == 1)
        .collect();
    let last = vec![(h * w - 1) as u32];
    let all: Vec<u32> = (0..(h * w) as u32).collect();
    for (kept, what) in [
        (odd, "odd rows and columns"),
        (last, "the last token"),
        (all, "all"),
    ] {
        let x: Vec<f32> = (0..c * h * w).map(|_| 6.0 * rng.f32()).collect();
        compare(&shipped, &gpu, &x, &kept, &format!("shipped model, {what}"));
    }
}

#[test]
fn emulated_gpu_suffix_matches_the_cpu_executor() {
    let Some(emulator) = Emulator::build() else {
        return;
    };
    check_everything(|| emulator.clone());
    check_everything(|| emulator.with_graphs());
}

#[test]
fn gpu_suffix_matches_the_cpu_executor_on_a_real_gpu() {
    match CudaDevice::new(0) {
        Ok(d) => println!("GPU: {}", d.describe()),
        Err(e) => {
            println!("SKIPPED: no GPU suffix here ({e})");
            return;
        }
    }
    check_everything(|| CudaDevice::with_graphs(0, false).unwrap());
    println!("again, frames captured as CUDA graphs");
    check_everything(|| CudaDevice::with_graphs(0, true).unwrap());
}

#[test]
fn suffix_kernels_compile_to_ptx_for_jetson_and_test_architectures() {
    let Some(archs) = crate::ptx_test_archs() else {
        return;
    };
    for &arch in archs {
        for family in Family::ALL {
            let ptx = ersm::gpu::compile_source(&family.source(), family.name(), arch)
                .unwrap_or_else(|e| panic!("{arch}: {e}"));
            let text = ptx.to_src();
            let entries = family.entries();
            assert!(!entries.is_empty(), "{}: no kernels", family.name());
            for k in entries {
                assert!(
                    text.contains(&format!(".entry {k}(")),
                    "{arch}: no entry {k}"
                );
            }
        }
    }
}

/// A frame of `m`: post-ReLU6-like features (non-negative, bounded), a blob
/// of kept tokens at `keep`, and their gathered rows.
fn blob_frame(m: &ModelPackage, rng: &mut Rng, keep: f64) -> (Vec<u32>, Vec<f32>) {
    let (c, h, w) = (m.cut.c, m.cut.h, m.cut.w);
    let x: Vec<f32> = (0..c * h * w).map(|_| 6.0 * rng.f32()).collect();
    let kept = blob_kept(rng, h, w, keep);
    let fm = ersm::ersm::FeatureMap::new(&x, c, h, w).unwrap();
    let feats = ersm::ersm::cpu::gather(fm, &kept);
    (kept, feats)
}

/// A kept list, its count and the gathered rows in device buffers a whole
/// map long, as the energy kernel leaves them: frames rewrite the same
/// buffers, so a captured graph sees each frame's data at its addresses.
struct EnergyOutputs<B> {
    list: B,
    count: B,
    rows: B,
}

impl<B> EnergyOutputs<B> {
    fn new<D: Device<Buf = B>>(d: &D, m: &ModelPackage) -> EnergyOutputs<B> {
        let hw = m.cut.h * m.cut.w;
        EnergyOutputs {
            list: d.alloc(hw).unwrap(),
            count: d.alloc(1).unwrap(),
            rows: d.alloc(hw * m.cut.c).unwrap(),
        }
    }

    /// Writes a frame's kept list and rows.
    fn write<D: Device<Buf = B>>(&mut self, d: &D, kept: &[u32], feats: &[f32]) {
        let bits: Vec<f32> = kept.iter().map(|&i| f32::from_bits(i)).collect();
        d.write(&mut self.list, 0, &bits).unwrap();
        d.write(&mut self.count, 0, &[f32::from_bits(kept.len() as u32)])
            .unwrap();
        d.write(&mut self.rows, 0, feats).unwrap();
    }

    /// Runs `gpu`'s device path on what was written last.
    fn run<D: Device<Buf = B>>(
        &self,
        gpu: &GpuSuffix<D>,
    ) -> anyhow::Result<ersm::sparse::gpu::DeviceRun> {
        let d = gpu.device();
        let tokens = DeviceTokens {
            kept: d.ptr(&self.list),
            count: d.ptr(&self.count),
        };
        // SAFETY: `new` sized the buffers for a whole map and `write` filled
        // the kept list, its count and its rows.
        unsafe { gpu.run_on_device(tokens, d.ptr(&self.rows), &[], None) }
    }
}

/// `ersm bench --profile`'s GPU path: the timed run computes what the untimed
/// one does, with the rulebooks built on either side, with one time per step,
/// then the token sets and rulebooks, then the uploads, accumulated over frames.
#[test]
fn timed_gpu_suffix_gives_the_untimed_result() {
    let Some(emulator) = Emulator::build() else {
        return;
    };
    let m = ModelPackage::load("models/mobilenet_v2_ersm").unwrap();
    let gpu = GpuSuffix::new(emulator, &m.plan).expect("the shipped model lowers");
    let (kept, feats) = blob_frame(&m, &mut Rng::new(23), 0.5);
    let (want, frame) = gpu.run(&m.plan, &kept, &feats, &[], None).unwrap();
    let want = m.plan.dense_outputs(&want, &frame.sets);
    let counts: Vec<usize> = frame.sets.iter().map(|s| s.len()).collect();
    for site in [RulebookSite::Device, RulebookSite::Host] {
        let mut times = Vec::new();
        for frames in 1..=2 {
            let (got, got_counts) = gpu
                .run_timed(&m.plan, &kept, &feats, &[], site, &mut times)
                .unwrap();
            assert_eq!(m.plan.dense_outputs(&got, &frame.sets), want);
            assert_eq!(got_counts, counts, "{site:?}: token counts");
            assert_eq!(
                times.len(),
                m.plan.steps.len() + 2,
                "one time per step, then two"
            );
            assert!(times.iter().all(|t| t.is_finite() && *t >= 0.0));
            assert!(
                times[..m.plan.steps.len()].iter().sum::<f64>() > 0.0,
                "{site:?}: after {frames} frame(s) the steps took no time"
            );
            assert!(
                times[m.plan.steps.len()] > 0.0,
                "{site:?}: building the token sets and rulebooks took no time"
            );
        }
        let (issued, done) = gpu.time_launches(&m.plan, &kept, &feats, &[]).unwrap();
        assert!(
            issued > 0.0 && issued <= done,
            "issued {issued} ms, done {done} ms"
        );
        assert!(gpu.time_launches(&m.plan, &kept, &feats[1..], &[]).is_err());
        // A wrong row count is refused before anything runs.
        assert!(gpu
            .run_timed(&m.plan, &kept, &feats[1..], &[], site, &mut times)
            .is_err());
    }
}

/// What the executor asked of a device, in order.
#[derive(Clone, Debug, PartialEq)]
enum Call {
    Upload,
    Alloc,
    CopyFrom,
    Write,
    Launch(Kernel),
    Download(usize),
    Sync,
    Capture,
    Graph,
}

/// The emulator, logging every call.
struct Recording {
    inner: Emulator,
    log: std::cell::RefCell<Vec<Call>>,
    /// Whether each capture fails at its end, as an invalidated CUDA
    /// capture does: its launches were recorded, none of them ran.
    failing_capture: bool,
}

impl Recording {
    fn new(inner: Emulator) -> Recording {
        Recording {
            inner,
            log: Default::default(),
            failing_capture: false,
        }
    }

    /// The same, with every capture failing.
    fn failing_capture(inner: Emulator) -> Recording {
        Recording {
            failing_capture: true,
            ..Recording::new(inner)
        }
    }

    fn note(&self, c: Call) {
        self.log.borrow_mut().push(c);
    }
}

impl Device for Recording {
    type Buf = HostBuf;

    fn upload(&self, data: &[f32]) -> anyhow::Result<HostBuf> {
        self.note(Call::Upload);
        self.inner.upload(data)
    }

    fn alloc(&self, n: usize) -> anyhow::Result<HostBuf> {
        self.note(Call::Alloc);
        self.inner.alloc(n)
    }

    unsafe fn copy_from(&self, src: u64, n: usize) -> anyhow::Result<HostBuf> {
        self.note(Call::CopyFrom);
        // SAFETY: passed on as the caller promised it.
        unsafe { self.inner.copy_from(src, n) }
    }

    fn ptr(&self, buf: &HostBuf) -> u64 {
        self.inner.ptr(buf)
    }

    fn launch(&self, kernel: Kernel, threads: usize, args: &Args) -> anyhow::Result<()> {
        self.note(Call::Launch(kernel));
        self.inner.launch(kernel, threads, args)
    }

    fn write(&self, buf: &mut HostBuf, at: usize, data: &[f32]) -> anyhow::Result<()> {
        self.note(Call::Write);
        self.inner.write(buf, at, data)
    }

    fn download(&self, buf: &HostBuf, n: usize) -> anyhow::Result<Vec<f32>> {
        self.note(Call::Download(n));
        self.inner.download(buf, n)
    }

    fn sync(&self) -> anyhow::Result<()> {
        self.note(Call::Sync);
        self.inner.sync()
    }

    type Graph = Vec<LaunchArgs>;

    fn capture(
        &self,
        f: &mut dyn FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<Option<Vec<LaunchArgs>>> {
        self.note(Call::Capture);
        let graph = self.inner.capture(f)?;
        if self.failing_capture {
            anyhow::bail!("emulated: the stream capture was invalidated");
        }
        Ok(graph)
    }

    fn launch_graph(&self, graph: &Vec<LaunchArgs>) -> anyhow::Result<()> {
        self.note(Call::Graph);
        self.inner.launch_graph(graph)
    }
}

/// On the device path a frame's only reads are after its last launch: the
/// token counts, then the output. No count comes back before the steps
/// run, nothing waits in between, and the gathered rows are read where the
/// energy kernel left them (no copy, no upload). The first frame allocates
/// the workspace; later ones allocate nothing and launch the same grids,
/// one by one, or, where the device captures, as the one graph the first
/// frame captured.
#[test]
fn device_path_reads_back_only_counts_and_logits_after_the_last_launch() {
    let Some(emulator) = Emulator::build() else {
        return;
    };
    device_path_frames(emulator.clone());
    device_path_frames(emulator.with_graphs());
}

fn device_path_frames(emulator: Emulator) {
    let graphs = emulator.graphs;
    let m = ModelPackage::load("models/mobilenet_v2_ersm").unwrap();
    let dev = Recording::new(emulator);
    let gpu = GpuSuffix::new(dev, &m.plan).expect("the shipped model lowers");
    let (kept, feats) = blob_frame(&m, &mut Rng::new(31), 0.6);
    let uploaded = gpu.upload_kept(&kept).unwrap();
    let rows = gpu.device().upload(&feats).unwrap();
    // Every residual Add runs in the kernel of the conv before it, and the
    // Flatten relabels the pooled vector: neither launches.
    let labels: Vec<String> = m.plan.steps.iter().map(|s| s.label()).collect();
    let adds = labels.iter().filter(|l| *l == "Add").count();
    let flattens = labels.iter().filter(|l| *l == "Flatten").count();
    assert_eq!((adds, flattens), (7, 1), "the shipped model's steps");
    let per_frame = m.plan.levels.len() + m.plan.rules.len() + m.plan.steps.len() - adds - flattens;
    let mut first_launches = Vec::new();
    let mut outputs = Vec::new();
    for frame_no in 0..3 {
        let what = format!("graphs {graphs}, frame {frame_no}");
        gpu.device().log.borrow_mut().clear();
        // SAFETY: the kept list, its count and its rows, uploaded above.
        let out = unsafe { gpu.run_on_device(uploaded.tokens, gpu.device().ptr(&rows), &[], None) }
            .unwrap();
        let log = gpu.device().log.borrow().clone();
        let n_out = match &out.values[..] {
            [ersm::sparse::Value {
                shape: ersm::sparse::Shape::Dense { .. },
                data,
            }] => data.len(),
            v => panic!("the shipped model's output is dense, got {v:?}"),
        };
        let reads = [Call::Download(m.plan.levels.len()), Call::Download(n_out)];
        outputs.push(out);
        if graphs && frame_no > 0 {
            let mut want = vec![Call::Graph];
            want.extend(reads.iter().cloned());
            assert_eq!(log, want, "{what}: the graph, then the two reads");
            continue;
        }
        let launches: Vec<Call> = log
            .iter()
            .filter(|c| matches!(c, Call::Launch(_)))
            .cloned()
            .collect();
        assert_eq!(
            launches.len(),
            per_frame,
            "{what}: a launch per level, rulebook and step but the Adds and the Flatten"
        );
        assert!(
            !launches.iter().any(|c| matches!(
                c,
                Call::Launch(Kernel {
                    name: "sfx_binary" | "sfx_activation",
                    ..
                })
            )),
            "{what}: an Add or a copy launched on its own: {launches:?}"
        );
        if frame_no == 0 {
            first_launches = launches;
        } else {
            assert_eq!(launches, first_launches, "{what}: other launches");
        }
        // The first frame asks to capture (the device says whether it can),
        // with the launches then captured, or run; a captured frame then
        // runs as its graph. Its workspace is allocated first, the stream
        // buffer (held flags, gate shifts) written with zeros once.
        let last = log
            .iter()
            .rposition(|c| matches!(c, Call::Launch(_) | Call::Graph))
            .unwrap();
        let before_ok = |c: &Call| match c {
            Call::Launch(_) => true,
            Call::Alloc | Call::Capture | Call::Write => frame_no == 0,
            _ => false,
        };
        assert!(
            log[..last].iter().all(before_ok),
            "{what}: before the last launch: {log:?}"
        );
        if graphs {
            assert_eq!(log[last], Call::Graph, "{what}: the captured graph runs");
        }
        assert_eq!(log[last + 1..], reads, "{what}: after the last launch");
    }
    // The same as the host-built frame's run, bit for bit.
    let (want, frame) = gpu.run(&m.plan, &kept, &feats, &[], None).unwrap();
    let want_counts: Vec<usize> = frame.sets.iter().map(|s| s.len()).collect();
    for ersm::sparse::gpu::DeviceRun {
        values: got,
        counts,
        ..
    } in outputs
    {
        assert_eq!(got, want);
        assert_eq!(counts, want_counts);
    }
}

/// A kept list the kernels cannot use (a count past the map, or none) is an
/// error that names the counts, not a read past the buffers.
#[test]
fn device_frame_refuses_a_bad_kept_count() {
    let Some(emulator) = Emulator::build() else {
        return;
    };
    let m = ModelPackage::load("models/tiny").unwrap();
    let gpu = GpuSuffix::new(emulator, &m.plan).expect("tiny model lowers");
    let hw = m.cut.h * m.cut.w;
    let d = gpu.device();
    let list: Vec<f32> = (0..hw as u32).map(f32::from_bits).collect();
    let rows = d.upload(&vec![0.0; hw * m.cut.c]).unwrap();
    let list = d.upload(&list).unwrap();
    for n in [0u32, hw as u32 + 5] {
        let count = d.upload(&[f32::from_bits(n)]).unwrap();
        let tokens = DeviceTokens {
            kept: d.ptr(&list),
            count: d.ptr(&count),
        };
        // SAFETY: the list and rows hold a whole map; the count is what is tested.
        let err = unsafe { gpu.run_on_device(tokens, d.ptr(&rows), &[], None) }.unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("kept list holds"), "count {n}: {msg}");
    }
}

/// A residual Add runs in the kernel of the conv before it whatever that
/// conv's kernel (1×1, rulebook, depthwise, strided, with a fused
/// activation) and whichever operand the conv's output is, and equals the
/// CPU's; an Add of a conv output that something else reads too, or of no
/// conv's output, launches on its own.
#[test]
fn residual_adds_run_in_their_convs_kernels_and_match_the_cpu() {
    let Some(emulator) = Emulator::build() else {
        return;
    };
    let (h, w, c) = (12, 10, 8);
    let mut b = Builder::new(77);
    let x = b.conv("image", 3, c, 3, 1, [1, 1, 1, 1], 1);
    let x = b.op("Relu", &[&x], vec![]);
    let x = energy(&mut b, &x, c, 0.3, 1, 4);
    // Depthwise, its output the Add's first operand.
    let y = b.conv(&x, c, c, 3, 1, [1; 4], c);
    let x = b.op("Add", &[&y, &x], vec![]);
    // Dense 3×3 through the rulebook, its output the second operand.
    let y = b.conv(&x, c, c, 3, 1, [1; 4], 1);
    let x = b.op("Add", &[&x, &y], vec![]);
    // Strided, then a 1×1 on the strided level added to it.
    let s = b.conv(&x, c, c, 3, 2, [1; 4], 1);
    let y = b.conv(&s, c, c, 1, 1, [0; 4], 1);
    let x = b.op("Add", &[&y, &s], vec![]);
    // A per-channel constant (an affine op, not an Add), then a conv whose
    // ReLU is fused into it before the residual add.
    let k = b.rng.normals(c, 0.5);
    let k = b.init("k", &[1, c, 1, 1], k);
    let y = b.conv(&x, c, c, 1, 1, [0; 4], 1);
    let y = b.op("Add", &[&y, &k], vec![]);
    let z = b.conv(&y, c, c, 1, 1, [0; 4], 1);
    let z = b.op("Relu", &[&z], vec![]);
    let x = b.op("Add", &[&z, &y], vec![]);
    // Not fused: a conv output that two Adds read, and an Add after an Add.
    let y = b.conv(&x, c, c, 1, 1, [0; 4], 1);
    let a = b.op("Add", &[&y, &x], vec![]);
    let x = b.op("Add", &[&a, &y], vec![]);
    let p = b.op("GlobalAveragePool", &[&x], vec![]);
    let p = b.op("Flatten", &[&p], vec![attr_int("axis", 1)]);
    let wd = b.rng.normals(c * 5, 0.3);
    let wd = b.init("fc.w", &[5, c], wd);
    let bd = b.init("fc.b", &[5], vec![0.1; 5]);
    let out = b.op(
        "Gemm",
        &[&p, &wd, &bd],
        vec![attr_int("transB", 1), attr_float("alpha", 1.0)],
    );
    let m = package(b.model(("image", &[1, 3, h, w]), &out), h, w);
    let labels: Vec<String> = m.plan.steps.iter().map(|s| s.label()).collect();
    let binaries = labels.iter().filter(|l| *l == "Add").count();
    let gpu = GpuSuffix::new(Recording::new(emulator), &m.plan).expect("the network lowers");
    let mut rng = Rng::new(78);
    for keep in [0.1, 0.5, 1.0] {
        let xs = rng.normals(c * h * w, 1.0);
        let kept = random_kept(&mut rng, h * w, keep);
        gpu.device().log.borrow_mut().clear();
        compare(&m, &gpu, &xs, &kept, &format!("fused adds, keep {keep}"));
        let launched = gpu
            .device()
            .log
            .borrow()
            .iter()
            .filter(|c| matches!(c, Call::Launch(k) if k.name == "sfx_binary"))
            .count();
        // `compare` runs the steps twice (on a host-built frame, then on
        // the device path); each launches the two unfused Adds alone.
        assert_eq!(
            (binaries, launched),
            (6, 2 * 2),
            "keep {keep}: Adds in the plan, and launched on their own: {labels:?}"
        );
    }
}

/// A captured frame keeps its launches' parameters, not the frame's data:
/// replayed for the next frames' kept tokens and rows, written where the
/// energy kernel writes them (the same buffers, other counts), it computes
/// each frame's own output, as the host-built run of that frame does.
#[test]
fn a_captured_frame_replays_for_each_later_frames_tokens() {
    let Some(emulator) = Emulator::build() else {
        return;
    };
    let m = ModelPackage::load("models/mobilenet_v2_ersm").unwrap();
    let gpu = GpuSuffix::new(Recording::new(emulator.with_graphs()), &m.plan)
        .expect("the shipped model lowers");
    let d = gpu.device();
    let mut inputs = EnergyOutputs::new(d, &m);
    let mut rng = Rng::new(41);
    for (frame_no, keep) in [0.6, 0.2, 0.9, 0.05].into_iter().enumerate() {
        let (kept, feats) = blob_frame(&m, &mut rng, keep);
        inputs.write(d, &kept, &feats);
        d.log.borrow_mut().clear();
        let ersm::sparse::gpu::DeviceRun {
            values: got,
            counts,
            ..
        } = inputs.run(&gpu).unwrap();
        if frame_no > 0 {
            assert_eq!(
                d.log.borrow()[0],
                Call::Graph,
                "frame {frame_no}: replays the graph"
            );
        }
        let (want, frame) = gpu.run(&m.plan, &kept, &feats, &[], None).unwrap();
        assert_eq!(got, want, "frame {frame_no}, keep {keep}");
        let want_counts: Vec<usize> = frame.sets.iter().map(|s| s.len()).collect();
        assert_eq!(counts, want_counts, "frame {frame_no}: token counts");
    }
}

/// A frame whose capture fails still runs: the executor launches it kernel
/// by kernel (nothing of the failed capture ran), gives the host-built
/// result, says it stopped capturing, and later frames do not try again.
#[test]
fn a_failed_capture_falls_back_to_kernel_by_kernel_launches() {
    let Some(emulator) = Emulator::build() else {
        return;
    };
    let m = ModelPackage::load("models/mobilenet_v2_ersm").unwrap();
    let gpu = GpuSuffix::new(Recording::failing_capture(emulator.with_graphs()), &m.plan)
        .expect("the shipped model lowers");
    assert!(!gpu.stopped_capturing(), "no frame has run yet");
    let d = gpu.device();
    let mut inputs = EnergyOutputs::new(d, &m);
    let mut rng = Rng::new(43);
    let mut launches = Vec::new();
    for (frame_no, keep) in [0.5, 0.8].into_iter().enumerate() {
        let (kept, feats) = blob_frame(&m, &mut rng, keep);
        inputs.write(d, &kept, &feats);
        d.log.borrow_mut().clear();
        let got = inputs
            .run(&gpu)
            .map(|r| r.values)
            .unwrap_or_else(|e| panic!("frame {frame_no}: {e:#}"));
        let log = d.log.borrow().clone();
        let captures = log.iter().filter(|c| **c == Call::Capture).count();
        assert_eq!(
            captures,
            usize::from(frame_no == 0),
            "frame {frame_no}: only the first frame tries to capture"
        );
        assert!(
            !log.contains(&Call::Graph),
            "frame {frame_no}: no graph replays"
        );
        launches.push(log.iter().filter(|c| matches!(c, Call::Launch(_))).count());
        assert!(gpu.stopped_capturing(), "frame {frame_no}");
        let (want, _) = gpu.run(&m.plan, &kept, &feats, &[], None).unwrap();
        assert_eq!(got, want, "frame {frame_no}, keep {keep}");
    }
    // The first frame's launches went into the failed capture, then again
    // one by one; the second frame's only one by one.
    assert!(launches[1] > 0, "launches: {launches:?}");
    assert_eq!(launches[0], 2 * launches[1], "launches: {launches:?}");
}
