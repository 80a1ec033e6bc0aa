//! The energy layer on an NVIDIA GPU through cudarc: the unary head over the
//! whole GPU (a launch per conv layer, one for the per-token costs), then one
//! single-block launch for the mean-field steps, threshold, compaction and
//! gather.
//!
//! The driver and NVRTC are loaded at run time (cudarc's dynamic loading), so
//! ersm builds and runs without a CUDA toolkit; the kernel source is embedded
//! and compiled on first use for the device's own compute capability.

use super::{EnergySpec, FeatureMap, TokenMask, UnaryHead};
pub use crate::gpu::CudaError;
use crate::gpu::{compile_source, Gpu};
use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The kernel source, embedded in the binary: the unary head's device
/// functions, then the energy layer's kernels that call them.
pub const KERNEL_SRC: &str = concat!(
    include_str!("kernels/unary_head.cu"),
    include_str!("kernels/ersm.cu")
);
/// The unary head's device functions alone (the host compiler builds them too).
pub const UNARY_HEAD_SRC: &str = include_str!("kernels/unary_head.cu");
/// The kernels' entry points, in launch order: a head conv layer (once per
/// layer), the unary costs, then the rest of the layer in one block.
pub const KERNEL_NAMES: [&str; 3] = ["ersm_head_layer", "ersm_unary", "ersm_energy_gather"];
/// Threads of the last kernel's single block (must match `ERSM_THREADS` in
/// the source).
const THREADS: u32 = 1024;
/// Threads per block of the head's launches, one output per thread.
const HEAD_BLOCK: u32 = 256;

/// Compiles the kernel to PTX for `arch` (e.g. `compute_87`).
pub fn compile(arch: &'static str) -> Result<Ptx, CudaError> {
    compile_source(KERNEL_SRC, "ERSM", arch)
}

/// A feature map in device memory of this context, written by other work
/// (the tract-cuda prefix's output): `C × H × W` f32 values, channel-major.
/// Its address is valid here because both sides retain device 0's primary
/// context (cudarc's `CudaContext::new(0)`), which ersm and tract-cuda share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMap {
    /// Device address of the first value.
    pub ptr: u64,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

/// Where the kernel reads a frame's feature map.
#[derive(Clone, Copy)]
pub enum MapSource<'a> {
    /// Host values, copied to the device (or mapped, on Jetson) first.
    Host(FeatureMap<'a>),
    /// Values already on the device, read in place. The work that wrote them
    /// must have finished and the buffer must outlive the call.
    Device(DeviceMap),
}

/// A map's shape, whichever side it is on.
#[derive(Clone, Copy)]
struct Shape {
    c: usize,
    h: usize,
    w: usize,
}

impl<'a> From<FeatureMap<'a>> for MapSource<'a> {
    fn from(m: FeatureMap<'a>) -> Self {
        MapSource::Host(m)
    }
}

impl MapSource<'_> {
    fn shape(&self) -> Shape {
        match *self {
            MapSource::Host(m) => Shape {
                c: m.c,
                h: m.h,
                w: m.w,
            },
            MapSource::Device(m) => Shape {
                c: m.c,
                h: m.h,
                w: m.w,
            },
        }
    }
}

/// A buffer the kernel reads or writes: device memory with a page-locked host
/// mirror on a discrete GPU (asynchronous copies, one synchronisation per
/// frame), or mapped page-locked host memory (zero-copy) on an integrated one
/// (Jetson), where CPU and GPU share DRAM.
enum Mem<T> {
    Device {
        dev: CudaSlice<T>,
        host: PinnedHostSlice<T>,
    },
    Mapped {
        host: PinnedHostSlice<T>,
        dptr: u64,
    },
}

impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy> Mem<T> {
    fn new(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        mapped: bool,
        len: usize,
    ) -> Result<Self, CudaError> {
        let len = len.max(1);
        if !mapped {
            // SAFETY: the mirror is written before it is read (upload or fetch).
            let host = unsafe { ctx.alloc_pinned_with_flags::<T>(len, 0)? };
            return Ok(Mem::Device {
                dev: stream.alloc_zeros::<T>(len)?,
                host,
            });
        }
        // SAFETY: the memory is written before it is read (upload or kernel).
        let mut host =
            unsafe { ctx.alloc_pinned_with_flags::<T>(len, sys::CU_MEMHOSTALLOC_DEVICEMAP)? };
        let mut dptr: sys::CUdeviceptr = 0;
        let p = host.as_mut_ptr()? as *mut std::ffi::c_void;
        // SAFETY: `p` is a live DEVICEMAP allocation of this context.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, p, 0).result()? };
        Ok(Mem::Mapped { host, dptr })
    }

    fn ptr(&self, stream: &CudaStream) -> u64 {
        match self {
            Mem::Device { dev, .. } => dev.device_ptr(stream).0,
            Mem::Mapped { dptr, .. } => *dptr,
        }
    }

    /// Makes `data` visible to the kernel (queued on the stream).
    fn upload(&mut self, stream: &Arc<CudaStream>, data: &[T]) -> Result<(), CudaError> {
        match self {
            Mem::Device { dev, host } => {
                host.as_mut_slice()?[..data.len()].copy_from_slice(data);
                stream.memcpy_htod(host, dev)?;
            }
            Mem::Mapped { host, .. } => host.as_mut_slice()?[..data.len()].copy_from_slice(data),
        }
        Ok(())
    }

    /// Queues the copy back to the host mirror (nothing to do when mapped).
    fn fetch(&mut self, stream: &Arc<CudaStream>) -> Result<(), CudaError> {
        if let Mem::Device { dev, host } = self {
            stream.memcpy_dtoh(dev, host)?;
        }
        Ok(())
    }

    /// The first `n` values; the stream must have been synchronised after `fetch`.
    fn read(&self, n: usize) -> Result<Vec<T>, CudaError> {
        let (Mem::Device { host, .. } | Mem::Mapped { host, .. }) = self;
        Ok(host.as_slice()?[..n].to_vec())
    }
}

/// Buffers sized for one map shape and head.
struct Buffers {
    key: (usize, usize, usize, usize),
    x: Mem<f32>,
    head: Mem<f32>,
    /// The head whose parameters `head` holds.
    packed: PackedHead,
    /// Two halves the head's conv layers ping-pong between.
    conv_scratch: Mem<f32>,
    energies: Mem<f32>,
    scratch: Mem<f32>,
    kept: Mem<u32>,
    gathered: Mem<f32>,
    count: Mem<u32>,
    /// A stream's held positions, one flag each (written only for a frame
    /// that holds some).
    held: Mem<u32>,
    /// Events around the launch (with timing: cudarc's default disables it).
    start: CudaEvent,
    end: CudaEvent,
}

/// Device addresses of the energy kernel's outputs for one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOutputs {
    /// The gathered rows: `count × C` f32 values, row-major.
    pub rows: u64,
    /// The kept raster indices: `count` u32 values, ascending.
    pub kept: u64,
    /// The number of kept tokens: one u32.
    pub count: u64,
}

/// Timing of the last frame on the GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KernelTiming {
    /// The energy layer's launches alone (head, costs, the rest), by CUDA
    /// events.
    pub kernel_ms: f32,
    /// Upload + launch + download, wall clock (on the device path, with
    /// the work launched behind the kernel, which the download waits for).
    pub wall_ms: f64,
}

/// A CUDA device with the ERSM kernel loaded.
pub struct CudaBackend {
    /// The device it runs on (kept open while the backend lives).
    gpu: Arc<Gpu>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// The kernels of [`KERNEL_NAMES`], in that order.
    head_layer: CudaFunction,
    unary: CudaFunction,
    energy_gather: CudaFunction,
    /// The device shares DRAM with the CPU (Jetson): use zero-copy mapped memory.
    pub integrated: bool,
    /// Device name and compute capability, for logs.
    pub description: String,
    buffers: Mutex<Option<Buffers>>,
    last: Mutex<KernelTiming>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend({})", self.description)
    }
}

impl CudaBackend {
    /// The energy layer on device `ordinal` (opened once per process).
    pub fn new(ordinal: usize) -> Result<CudaBackend, CudaError> {
        CudaBackend::on(Gpu::open(ordinal)?)
    }

    /// The energy layer on `gpu`, its kernels compiled there (once).
    pub fn on(gpu: Arc<Gpu>) -> Result<CudaBackend, CudaError> {
        let module = gpu.module("ERSM", || KERNEL_SRC.to_string())?;
        let [head_layer, unary, energy_gather] =
            KERNEL_NAMES.map(|name| module.load_function(name));
        let (head_layer, unary, energy_gather) = (head_layer?, unary?, energy_gather?);
        let integrated = gpu.integrated;
        let description = format!(
            "{}, {}, kernel {}",
            gpu.describe(),
            if integrated {
                "integrated, zero-copy"
            } else {
                "discrete, explicit copies"
            },
            gpu.arch
        );
        Ok(CudaBackend {
            ctx: gpu.ctx.clone(),
            stream: gpu.stream.clone(),
            gpu,
            head_layer,
            unary,
            energy_gather,
            integrated,
            description,
            buffers: Mutex::new(None),
            last: Mutex::new(KernelTiming::default()),
        })
    }

    /// The device it runs on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Timing of the most recent frame.
    pub fn last_timing(&self) -> KernelTiming {
        *self.last.lock().expect("timing lock")
    }

    /// The energy layer for one frame.
    pub fn compute<'a>(
        &self,
        x: impl Into<MapSource<'a>>,
        spec: &EnergySpec,
    ) -> Result<TokenMask, CudaError> {
        self.compute_holding(x, spec, &[])
    }

    /// [`CudaBackend::compute`] on a stream: the raster indices `held`
    /// (ascending) are kept beside the negative energies, as
    /// `cpu::compute_holding` keeps them.
    pub fn compute_holding<'a>(
        &self,
        x: impl Into<MapSource<'a>>,
        spec: &EnergySpec,
        held: &[u32],
    ) -> Result<TokenMask, CudaError> {
        Ok(self.launch_and_read(x.into(), spec, held, true, |_| ())?.0)
    }

    /// The energy layer for one frame with its outputs left on the device:
    /// `then` gets their addresses (valid only during the call) as soon as
    /// the kernel is launched, and its result is returned beside the mask
    /// (whose `features` are empty). A map already on the device is read
    /// where it is. Nothing comes back before `then` runs: work it launches
    /// on the default stream (the GPU suffix) is ordered after the kernel
    /// and reads the count where it lies. The count, the kept indices and
    /// the energies are copied back after `then`, for the mask (overlay,
    /// reports). `held`: as for [`CudaBackend::compute_holding`].
    pub fn compute_on_device<R>(
        &self,
        x: MapSource<'_>,
        spec: &EnergySpec,
        held: &[u32],
        then: impl FnOnce(KernelOutputs) -> R,
    ) -> Result<(TokenMask, R), CudaError> {
        self.launch_and_read(x, spec, held, false, then)
    }

    /// Launches the kernel, runs `then` on its outputs where they lie, and
    /// reads the count, kept list and energies back (and the gathered rows,
    /// with `fetch_rows`) in one copy after it.
    fn launch_and_read<R>(
        &self,
        source: MapSource<'_>,
        spec: &EnergySpec,
        held: &[u32],
        fetch_rows: bool,
        then: impl FnOnce(KernelOutputs) -> R,
    ) -> Result<(TokenMask, R), CudaError> {
        let t0 = Instant::now();
        let x = source.shape();
        if spec.head.channels() != x.c {
            return Err(CudaError::Input(format!(
                "energy head reads {} channels, feature map has {}",
                spec.head.channels(),
                x.c
            )));
        }
        let packed = pack_head(&spec.head);
        let hw = x.h * x.w;
        let key = (hw, x.c, packed.values.len(), packed.widest() * hw);
        let mut guard = self.buffers.lock().expect("buffer lock");
        if guard.as_ref().is_none_or(|b| b.key != key) {
            *guard = Some(self.buffers(key)?);
        }
        let b = guard.as_mut().expect("just set");
        if b.packed != packed {
            b.head.upload(&self.stream, &packed.values)?;
            b.packed = packed;
        }
        let xp = match source {
            MapSource::Host(m) => {
                b.x.upload(&self.stream, m.data)?;
                b.x.ptr(&self.stream)
            }
            MapSource::Device(m) => m.ptr,
        };
        // Null when nothing is held: the kernel then reads no flag.
        let held_ptr = if held.is_empty() {
            0u64
        } else {
            let mut flags = vec![0u32; hw];
            for &i in held {
                let slot = flags.get_mut(i as usize).ok_or_else(|| {
                    CudaError::Input(format!("held token {i} outside the {hw}-token map"))
                })?;
                *slot = 1;
            }
            b.held.upload(&self.stream, &flags)?;
            b.held.ptr(&self.stream)
        };
        let (start, end) = (&b.start, &b.end);
        let (hp, csp) = (b.head.ptr(&self.stream), b.conv_scratch.ptr(&self.stream));
        let (ep, sp, kp, gp, cp) = (
            b.energies.ptr(&self.stream),
            b.scratch.ptr(&self.stream),
            b.kept.ptr(&self.stream),
            b.gathered.ptr(&self.stream),
            b.count.ptr(&self.stream),
        );
        let (c, h, w) = (x.c as i32, x.h as i32, x.w as i32);
        let blocks = |threads: usize| LaunchConfig {
            grid_dim: (threads.div_ceil(HEAD_BLOCK as usize) as u32, 1, 1),
            block_dim: (HEAD_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let at = |offset: usize| hp + 4 * offset as u64;
        start.record(&self.stream)?;
        // The head's conv layers, each over the whole map, ping-ponging
        // between the two halves of the conv scratch.
        let half = 4 * (b.packed.widest() * hw) as u64;
        let mut hx = xp;
        for (i, l) in b.packed.layers.iter().enumerate() {
            let out = csp + (i as u64 & 1) * half;
            let (cin, cout, k, groups) = (l.cin as i32, l.cout as i32, l.k as i32, l.groups as i32);
            let dil = l.dilation as i32;
            let (wp, bp, relu) = (at(l.weight), at(l.bias), i32::from(l.relu));
            let mut launch = self.stream.launch_builder(&self.head_layer);
            launch.arg(&hx).arg(&cin).arg(&h).arg(&w).arg(&wp).arg(&bp);
            launch
                .arg(&cout)
                .arg(&k)
                .arg(&dil)
                .arg(&groups)
                .arg(&relu)
                .arg(&out);
            // SAFETY: the arguments match ersm_head_layer's signature; `hx`
            // holds cin × H × W values and `out` (a half of the scratch,
            // sized for the widest layer) cout × H × W; the layer's
            // parameters lie at their packed offsets in `head`.
            unsafe { launch.launch(blocks(l.cout * hw))? };
            hx = out;
        }
        let (hc, hidden, n) = (b.packed.channels as i32, b.packed.hidden as i32, hw as i32);
        let pp = at(b.packed.per_token);
        let mut launch = self.stream.launch_builder(&self.unary);
        launch.arg(&hx).arg(&hc).arg(&n).arg(&pp).arg(&hidden);
        launch.arg(&spec.tau).arg(&ep).arg(&sp);
        // SAFETY: the arguments match ersm_unary's signature; `hx` holds hc
        // × H × W values, `energies` HW and `scratch` 2 × HW.
        unsafe { launch.launch(blocks(hw))? };
        let (steps, eight) = (
            spec.steps as i32,
            i32::from(spec.neighbourhood == super::Neighbourhood::Eight),
        );
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&self.energy_gather);
        launch.arg(&xp).arg(&c).arg(&h).arg(&w);
        launch
            .arg(&spec.lambda)
            .arg(&spec.tau)
            .arg(&steps)
            .arg(&eight);
        launch
            .arg(&ep)
            .arg(&sp)
            .arg(&kp)
            .arg(&gp)
            .arg(&cp)
            .arg(&held_ptr);
        // SAFETY: the arguments match ersm_energy_gather's signature in
        // kernels/ersm.cu, and every buffer holds what it indexes for this
        // (HW, C), `held_ptr` (null or HW flags) included; ersm_unary,
        // launched before it on this stream, wrote the scratch it starts from.
        unsafe { launch.launch(cfg)? };
        end.record(&self.stream)?;
        // The buffers stay locked, so they stay put while `then` reads them.
        let out = then(KernelOutputs {
            rows: gp,
            kept: kp,
            count: cp,
        });
        // The outputs wanted back in one go, then one synchronisation (the
        // gathered buffer whole: its used length is only known from the
        // count).
        b.count.fetch(&self.stream)?;
        b.kept.fetch(&self.stream)?;
        b.energies.fetch(&self.stream)?;
        if fetch_rows {
            b.gathered.fetch(&self.stream)?;
        }
        self.stream.synchronize()?;
        let n = b.count.read(1)?[0] as usize;
        if n == 0 || n > hw {
            return Err(CudaError::Input(format!(
                "kernel returned {n} kept tokens for {hw}"
            )));
        }
        *self.last.lock().expect("timing lock") = KernelTiming {
            kernel_ms: start.elapsed_ms(end)?,
            wall_ms: t0.elapsed().as_secs_f64() * 1e3,
        };
        let kept = b.kept.read(n)?;
        let features = if fetch_rows {
            b.gathered.read(n * x.c)?
        } else {
            Vec::new()
        };
        let energies = b.energies.read(hw)?;
        if let Some(why) = TokenMask::non_finite(&energies) {
            return Err(CudaError::Input(why));
        }
        let mask = TokenMask {
            h: x.h,
            w: x.w,
            c: x.c,
            energies,
            kept,
            features,
        };
        Ok((mask, out))
    }

    fn buffers(&self, key: (usize, usize, usize, usize)) -> Result<Buffers, CudaError> {
        let (hw, c, head, conv_half) = key;
        let m = self.integrated;
        let (ctx, s) = (&self.ctx, &self.stream);
        Ok(Buffers {
            key,
            x: Mem::new(ctx, s, m, hw * c)?,
            head: Mem::new(ctx, s, m, head)?,
            packed: PackedHead::default(),
            conv_scratch: Mem::new(ctx, s, m, 2 * conv_half)?,
            energies: Mem::new(ctx, s, m, hw)?,
            scratch: Mem::new(ctx, s, m, 2 * hw)?,
            kept: Mem::new(ctx, s, m, hw)?,
            gathered: Mem::new(ctx, s, m, hw * c)?,
            count: Mem::new(ctx, s, m, 1)?,
            held: Mem::new(ctx, s, m, hw)?,
            start: ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?,
            end: ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?,
        })
    }
}

/// One conv layer of the head, and where its parameters lie in
/// [`PackedHead::values`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedConv {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub dilation: usize,
    pub groups: usize,
    pub relu: bool,
    /// Offset of the weights, then of the bias.
    pub weight: usize,
    pub bias: usize,
}

/// The head as the kernels read it: every parameter in one buffer, and
/// where each part lies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PackedHead {
    /// Conv weights and biases, layer after layer, then the per-token head's
    /// parameters (`ersm_unary_cost`'s layout).
    pub values: Vec<f32>,
    pub layers: Vec<PackedConv>,
    /// Offset of the per-token head's parameters.
    pub per_token: usize,
    /// Channels the per-token head reads: the last conv's, or the map's.
    pub channels: usize,
    /// The per-token head's hidden width (0 = linear).
    pub hidden: usize,
}

impl PackedHead {
    /// The largest conv output, in channels (0 without convs).
    fn widest(&self) -> usize {
        self.layers.iter().map(|l| l.cout).max().unwrap_or(0)
    }
}

/// The head's parameters in the kernels' layout.
pub fn pack_head(head: &UnaryHead) -> PackedHead {
    match head {
        UnaryHead::Linear { w, b } => PackedHead {
            values: w.iter().copied().chain([*b]).collect(),
            channels: w.len(),
            ..PackedHead::default()
        },
        UnaryHead::TwoLayer { w1, b1, w2, b2 } => PackedHead {
            values: w1
                .iter()
                .chain(b1)
                .chain(w2)
                .copied()
                .chain([*b2])
                .collect(),
            channels: head.channels(),
            hidden: b1.len(),
            ..PackedHead::default()
        },
        UnaryHead::Conv { layers, head } => {
            let mut values = Vec::new();
            let mut packed = Vec::with_capacity(layers.len());
            for l in layers {
                let weight = values.len();
                values.extend_from_slice(&l.weight);
                let bias = values.len();
                values.extend_from_slice(&l.bias);
                packed.push(PackedConv {
                    cin: l.cin,
                    cout: l.cout,
                    k: l.k,
                    dilation: l.dilation,
                    groups: l.groups,
                    relu: l.relu,
                    weight,
                    bias,
                });
            }
            let inner = pack_head(head);
            let per_token = values.len();
            values.extend(inner.values);
            PackedHead {
                values,
                layers: packed,
                per_token,
                channels: inner.channels,
                hidden: inner.hidden,
            }
        }
    }
}
