//! The suffix kernels on an NVIDIA GPU through cudarc: each family compiled
//! by NVRTC at first use for the device's own architecture, launched in order on one
//! stream, buffers in device memory. With `ERSM_CUDA_GRAPHS=1` a frame's
//! launches are captured once as a CUDA graph and each frame replays it
//! with one launch.

use super::{Device, BLOCK};
use crate::gpu::{CudaError, Gpu};
use crate::sparse::launch::{Args, Family, Kernel};
use anyhow::{ensure, Context, Result};
use cudarc::driver::{
    sys, CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

// SAFETY: the bytes of a kernel's `#[repr(C)]` parameter struct, laid out
// as the kernel takes it by value; the driver reads the parameter's size
// from the kernel's image, at most `Args::CAPACITY` bytes from the start.
unsafe impl DeviceRepr for Args {}

/// Whether `ERSM_CUDA_GRAPHS=1` asks for frames captured as CUDA graphs.
pub fn graphs_asked() -> bool {
    std::env::var("ERSM_CUDA_GRAPHS").is_ok_and(|v| v == "1")
}

/// One CUDA device with the suffix kernels loaded.
pub struct CudaDevice {
    /// The device (kept open while the suffix lives).
    _gpu: Arc<Gpu>,
    stream: Arc<CudaStream>,
    functions: Vec<(Kernel, CudaFunction)>,
    description: String,
    /// Frames captured as graphs, when on.
    graphs: Option<Graphs>,
}

/// What capturing and replaying graphs takes: a stream of its own (capture
/// cannot run on the legacy default stream, where everything else runs),
/// and two events that order a replay after the default stream's work and
/// the default stream's later work after the replay.
struct Graphs {
    stream: Arc<CudaStream>,
    before: CudaEvent,
    after: CudaEvent,
    /// Launches go to `stream`, into the capture, while set (a capture runs
    /// under the GPU suffix's workspace lock, so no other frame launches
    /// meanwhile).
    capturing: AtomicBool,
}

/// A frame's launches captured on a device.
pub struct FrameGraph(CudaGraph);

// SAFETY: CUDA requires that one graph not be used from two threads at
// once; the GPU suffix keeps its graphs in its workspace, behind a mutex,
// and uses them only while it holds it.
unsafe impl Send for FrameGraph {}

impl CudaDevice {
    /// The suffix kernels on device `ordinal` (opened once per process);
    /// frames are captured as graphs when `ERSM_CUDA_GRAPHS=1`.
    pub fn new(ordinal: usize) -> Result<CudaDevice, CudaError> {
        CudaDevice::on(&Gpu::open(ordinal)?, graphs_asked())
    }

    /// The suffix kernels on device `ordinal`, capturing frames as graphs
    /// or not.
    pub fn with_graphs(ordinal: usize, graphs: bool) -> Result<CudaDevice, CudaError> {
        CudaDevice::on(&Gpu::open(ordinal)?, graphs)
    }

    /// The suffix kernels on `gpu`, each family compiled there once,
    /// capturing frames as graphs or not.
    pub fn on(gpu: &Arc<Gpu>, graphs: bool) -> Result<CudaDevice, CudaError> {
        let mut functions = Vec::new();
        for family in Family::ALL {
            let module = gpu.module(family.name(), || family.source())?;
            for name in family.entries() {
                let kernel = Kernel { family, name };
                functions.push((kernel, module.load_function(name)?));
            }
        }
        let ctx = &gpu.ctx;
        let graphs = if graphs {
            let flags = Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
            Some(Graphs {
                stream: ctx.new_stream()?,
                before: ctx.new_event(flags)?,
                after: ctx.new_event(flags)?,
                capturing: AtomicBool::new(false),
            })
        } else {
            None
        };
        Ok(CudaDevice {
            _gpu: gpu.clone(),
            stream: gpu.stream.clone(),
            functions,
            description: format!(
                "{}, suffix kernels {}{}",
                gpu.describe(),
                gpu.arch,
                if graphs.is_some() {
                    ", frames as CUDA graphs"
                } else {
                    ""
                }
            ),
            graphs,
        })
    }

    /// Whether frames are captured as CUDA graphs.
    pub fn captures(&self) -> bool {
        self.graphs.is_some()
    }

    /// The device, for logs.
    pub fn describe(&self) -> &str {
        &self.description
    }
}

impl Device for CudaDevice {
    type Buf = CudaSlice<f32>;

    fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        Ok(self.stream.clone_htod(data)?)
    }

    fn alloc(&self, n: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: every buffer is written by a kernel before it is read.
        Ok(unsafe { self.stream.alloc::<f32>(n.max(1))? })
    }

    unsafe fn copy_from(&self, src: u64, n: usize) -> Result<CudaSlice<f32>> {
        let dst = self.alloc(n)?;
        let dptr = self.ptr(&dst);
        // SAFETY: both addresses hold `n` f32s of this context (the caller
        // promises `src`); the copy is ordered on this stream before any
        // kernel that reads `dst`.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dptr, src, n * 4, self.stream.cu_stream())?
        };
        Ok(dst)
    }

    fn ptr(&self, buf: &CudaSlice<f32>) -> u64 {
        buf.device_ptr(&self.stream).0
    }

    fn launch(&self, kernel: Kernel, threads: usize, args: &Args) -> Result<()> {
        if threads == 0 {
            return Ok(());
        }
        let func = &self
            .functions
            .iter()
            .find(|(k, _)| *k == kernel)
            .with_context(|| format!("kernel {} not loaded", kernel.name))?
            .1;
        let cfg = LaunchConfig {
            grid_dim: (threads.div_ceil(BLOCK) as u32, 1, 1),
            block_dim: (BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = match &self.graphs {
            Some(g) if g.capturing.load(Ordering::Relaxed) => &g.stream,
            _ => &self.stream,
        };
        let mut launch = stream.launch_builder(func);
        launch.arg(args);
        // SAFETY: the parameter block is the kernel's own struct, and every
        // address in it is a live buffer of this context sized by the caller
        // for `threads` outputs.
        unsafe { launch.launch(cfg) }.with_context(|| format!("launching {}", kernel.name))?;
        Ok(())
    }

    fn write(&self, buf: &mut CudaSlice<f32>, at: usize, data: &[f32]) -> Result<()> {
        ensure!(
            at + data.len() <= buf.len(),
            "writing {} values at {at} into a buffer of {}",
            data.len(),
            buf.len()
        );
        if data.is_empty() {
            return Ok(());
        }
        // From pageable memory the copy has taken `data` when this returns.
        let mut dst = buf.slice_mut(at..at + data.len());
        Ok(self.stream.memcpy_htod(data, &mut dst)?)
    }

    fn download(&self, buf: &CudaSlice<f32>, n: usize) -> Result<Vec<f32>> {
        // Only the values asked for cross: a pool buffer that holds the
        // logits may be sized for a whole level's rows.
        let head = buf
            .try_slice(..n)
            .with_context(|| format!("reading {n} values of a buffer of {}", buf.len()))?;
        Ok(self.stream.clone_dtoh(&head)?)
    }

    fn sync(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    type Graph = FrameGraph;

    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<FrameGraph>> {
        let Some(g) = &self.graphs else {
            return Ok(None);
        };
        // Thread-local: other threads' CUDA work (the dense baseline's, say)
        // goes on while this thread captures.
        g.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .context("beginning a stream capture")?;
        g.capturing.store(true, Ordering::Relaxed);
        let launched = f();
        g.capturing.store(false, Ordering::Relaxed);
        // Ended whatever `f` did, so the stream leaves capture mode.
        let ended = g
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .context("ending the stream capture");
        launched?;
        let graph = ended?.context("the capture holds no graph")?;
        // Uploaded now, so the first replay does not pay for it.
        graph.upload().context("uploading the captured graph")?;
        Ok(Some(FrameGraph(graph)))
    }

    fn launch_graph(&self, graph: &FrameGraph) -> Result<()> {
        let g = self
            .graphs
            .as_ref()
            .context("a graph replayed on a device that does not capture")?;
        // Everything the default stream holds (the energy kernel, the kept
        // list's writes) comes first; the reads after wait for the graph.
        g.before.record(&self.stream)?;
        g.stream.wait(&g.before)?;
        graph.0.launch().context("launching the frame's graph")?;
        g.after.record(&g.stream)?;
        self.stream.wait(&g.after)?;
        Ok(())
    }
}
