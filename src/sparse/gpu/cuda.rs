//! The suffix kernels on an NVIDIA GPU through cudarc: compiled by NVRTC at
//! first use for the device's own architecture, launched in order on one
//! stream, buffers in device memory.

use super::{Device, Kernel, Params, BLOCK, KERNEL_SRC};
use crate::ersm::cuda::{compile_source, open_device, CudaError, OpenDevice};
use anyhow::{ensure, Context, Result};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use std::sync::Arc;

// SAFETY: `Params` is `#[repr(C)]` plain data, laid out as `SfxParams` in the
// kernel source (pointers as 64-bit addresses).
unsafe impl DeviceRepr for Params {}

/// One CUDA device with the suffix kernels loaded.
pub struct CudaDevice {
    stream: Arc<CudaStream>,
    functions: Vec<(Kernel, CudaFunction)>,
    description: String,
}

impl CudaDevice {
    /// Opens device `ordinal` and compiles the kernels for it.
    pub fn new(ordinal: usize) -> Result<CudaDevice, CudaError> {
        let OpenDevice {
            ctx,
            major,
            minor,
            arch,
        } = open_device(ordinal)?;
        let module = ctx.load_module(compile_source(KERNEL_SRC, "sparse suffix", arch)?)?;
        let functions = Kernel::ALL
            .iter()
            .map(|&k| Ok((k, module.load_function(k.name())?)))
            .collect::<Result<Vec<_>, CudaError>>()?;
        Ok(CudaDevice {
            stream: ctx.default_stream(),
            functions,
            description: format!("{} (sm_{major}{minor}, suffix kernels {arch})", ctx.name()?),
        })
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

    fn launch(&self, kernel: Kernel, threads: usize, p: &Params) -> Result<()> {
        if threads == 0 {
            return Ok(());
        }
        let func = &self
            .functions
            .iter()
            .find(|(k, _)| *k == kernel)
            .with_context(|| format!("kernel {} not loaded", kernel.name()))?
            .1;
        let cfg = LaunchConfig {
            grid_dim: (threads.div_ceil(BLOCK) as u32, 1, 1),
            block_dim: (BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(func);
        launch.arg(p);
        // SAFETY: the parameter block matches the kernel's signature, and every
        // address in it is a live buffer of this context sized by the caller
        // for `threads` outputs.
        unsafe { launch.launch(cfg) }.with_context(|| format!("launching {}", kernel.name()))?;
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
}
