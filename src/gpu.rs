//! The one CUDA device a process uses: opened once (the driver and NVRTC
//! load at run time, so a build needs no CUDA toolkit), one context and its
//! default stream, and a cache of compiled modules. Every GPU user goes
//! through it: the energy kernel (`ersm::cuda`), the sparse suffix
//! (`sparse::gpu::cuda`), and the feature hand-off from tract-cuda, whose
//! device addresses are valid here because both retain device 0's primary
//! context.

use cudarc::driver::{sys, CudaContext, CudaModule, CudaStream, DriverError};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use std::sync::{Arc, Mutex, PoisonError, Weak};

/// What can go wrong on the CUDA path.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver (libcuda.so) on this machine")]
    NoDriver,
    #[error("no NVRTC (libnvrtc.so) on this machine; it compiles the ERSM kernel at first use")]
    NoNvrtc,
    #[error("no CUDA device {0}")]
    NoDevice(usize),
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("NVRTC could not compile the {what} kernels for {arch}: {log}")]
    Compile {
        what: &'static str,
        arch: String,
        log: String,
    },
    #[error("compute capability {0}.{1} is not supported (need 5.3 or newer)")]
    Arch(i32, i32),
    #[error("{0}")]
    Input(String),
}

/// True when the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// True when NVRTC can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The NVRTC library's version, when it can be loaded.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_present() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters; the library is present.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// The NVRTC virtual architecture for a compute capability (`compute_87`).
pub fn arch_for(major: i32, minor: i32) -> Result<&'static str, CudaError> {
    const ARCHES: &[(i32, i32, &str)] = &[
        (5, 3, "compute_53"),
        (6, 0, "compute_60"),
        (6, 1, "compute_61"),
        (6, 2, "compute_62"),
        (7, 0, "compute_70"),
        (7, 2, "compute_72"),
        (7, 5, "compute_75"),
        (8, 0, "compute_80"),
        (8, 6, "compute_86"),
        (8, 7, "compute_87"),
        (8, 9, "compute_89"),
        (9, 0, "compute_90"),
    ];
    // The newest listed architecture not above the device's.
    ARCHES
        .iter()
        .rev()
        .find(|(ma, mi, _)| (*ma, *mi) <= (major, minor))
        .map(|(_, _, a)| *a)
        .ok_or(CudaError::Arch(major, minor))
}

/// Compiles a kernel source (`what` names it in errors) to PTX for `arch`.
pub fn compile_source(src: &str, what: &'static str, arch: &'static str) -> Result<Ptx, CudaError> {
    if !nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let opts = CompileOptions {
        arch: Some(arch),
        // Round every product and sum separately, as the CPU implementation does.
        fmad: Some(false),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| CudaError::Compile {
        what,
        arch: arch.to_string(),
        log: match e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        },
    })
}

/// An opened CUDA device.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    /// The stream every ersm launch and copy is ordered on (the context's
    /// default stream).
    pub stream: Arc<CudaStream>,
    /// Compute capability.
    pub major: i32,
    pub minor: i32,
    /// The NVRTC architecture kernels are compiled for.
    pub arch: &'static str,
    /// The device shares DRAM with the CPU (Jetson) and can map host memory.
    pub integrated: bool,
    name: String,
    /// Modules compiled so far, by name.
    modules: Mutex<Vec<(&'static str, Arc<CudaModule>)>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({})", self.describe())
    }
}

/// Devices opened by this process, so each is opened once.
static OPENED: Mutex<Vec<(usize, Weak<Gpu>)>> = Mutex::new(Vec::new());

impl Gpu {
    /// Device `ordinal`, opened at the first call while any user holds it
    /// (later calls share it). A missing driver or device is an error, not
    /// cudarc's panic.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>, CudaError> {
        let mut opened = OPENED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(gpu) = opened
            .iter()
            .find(|(o, _)| *o == ordinal)
            .and_then(|(_, g)| g.upgrade())
        {
            return Ok(gpu);
        }
        let gpu = Arc::new(Gpu::open_new(ordinal)?);
        opened.retain(|(o, g)| *o != ordinal && g.strong_count() > 0);
        opened.push((ordinal, Arc::downgrade(&gpu)));
        Ok(gpu)
    }

    fn open_new(ordinal: usize) -> Result<Gpu, CudaError> {
        if !driver_present() {
            return Err(CudaError::NoDriver);
        }
        if CudaContext::device_count()? <= ordinal as i32 {
            return Err(CudaError::NoDevice(ordinal));
        }
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: ersm launches, copies and frees on this context's default
        // stream only, so its order is the stream's; cudarc's per-buffer events
        // (two created and destroyed with every allocation, each suffix step's
        // output among them) would order nothing.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability()?;
        let arch = arch_for(major, minor)?;
        let attr = |a| ctx.attribute(a);
        let integrated = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_INTEGRATED)? != 0
            && attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY)? != 0;
        Ok(Gpu {
            stream: ctx.default_stream(),
            name: ctx.name()?,
            ctx,
            major,
            minor,
            arch,
            integrated,
            modules: Mutex::new(Vec::new()),
        })
    }

    /// The module `what`, compiled from `source()` for this device at the
    /// first call and loaded; later calls share it.
    pub fn module(
        &self,
        what: &'static str,
        source: impl FnOnce() -> String,
    ) -> Result<Arc<CudaModule>, CudaError> {
        let mut modules = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, m)) = modules.iter().find(|(w, _)| *w == what) {
            return Ok(m.clone());
        }
        let module = self
            .ctx
            .load_module(compile_source(&source(), what, self.arch)?)?;
        modules.push((what, module.clone()));
        Ok(module)
    }

    /// Name and compute capability, for logs: `NVIDIA H100 (sm_90)`.
    pub fn describe(&self) -> String {
        format!("{} (sm_{}{})", self.name, self.major, self.minor)
    }
}
