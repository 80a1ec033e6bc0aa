//! Where each stage of a pipeline runs, decided once when it is built: the
//! energy layer on the device the user chose, and, when that is a GPU, the
//! sparse suffix and the prefix and dense baseline there too wherever the
//! GPU can run them (each that cannot says why once and stays on the CPU).
//! Every GPU executor shares the one opened device (`crate::gpu`).

use crate::ersm::{Device, DeviceChoice};
use crate::package::ModelPackage;
use crate::prefix::TractNet;
use crate::sparse::gpu::{cuda::CudaDevice, GpuSuffix};
use anyhow::Result;
use std::fmt;

/// The tract nets a pipeline runs on the GPU.
pub struct GpuNets {
    /// The dense prefix.
    pub prefix: TractNet,
    /// The dense baseline's layers after the cut.
    pub dense: TractNet,
}

/// Where each stage runs, with the GPU executors of the stages placed there.
pub struct Placement {
    /// The energy layer's device.
    pub energy: Device,
    /// The sparse suffix on the GPU; `None`: the CPU executor runs it.
    pub suffix: Option<GpuSuffix<CudaDevice>>,
    /// The prefix and the dense baseline's suffix prepared by tract-cuda;
    /// `None`: tract's CPU plans run them.
    pub nets: Option<GpuNets>,
}

impl Placement {
    /// Every stage on the CPU.
    pub fn cpu() -> Placement {
        Placement::energy_only(Device::Cpu)
    }

    /// The energy layer on `energy`, every other stage on the CPU.
    pub fn energy_only(energy: Device) -> Placement {
        Placement {
            energy,
            suffix: None,
            nets: None,
        }
    }

    /// Places `model`'s stages for the user's device choice: the energy
    /// layer first (`--device cuda` without a usable GPU is an error), then
    /// on its GPU the sparse suffix (frames as CUDA graphs with
    /// `ERSM_CUDA_GRAPHS=1`) and tract-cuda's prefix and dense baseline.
    pub fn decide(model: &ModelPackage, choice: DeviceChoice) -> Result<Placement> {
        let energy = Device::select(choice)?;
        let Device::Cuda(backend) = &energy else {
            return Ok(Placement::energy_only(energy));
        };
        let graphs = crate::sparse::gpu::cuda::graphs_asked();
        let suffix = CudaDevice::on(backend.gpu(), graphs)
            .map_err(anyhow::Error::from)
            .and_then(|d| {
                let what = d.describe().to_string();
                GpuSuffix::new(d, &model.plan).map(|g| (g, what))
            });
        let suffix = match suffix {
            Ok((g, what)) => {
                log::info!("sparse suffix on the GPU: {what}");
                Some(g)
            }
            Err(e) => {
                log::warn!("sparse suffix stays on the CPU: {e:#}");
                None
            }
        };
        let nets = model.prefix.on_cuda().and_then(|prefix| {
            Ok(GpuNets {
                prefix,
                dense: model.baseline_suffix().on_cuda()?,
            })
        });
        let nets = match nets {
            Ok(n) => {
                log::info!("prefix and dense baseline on the GPU (tract-cuda)");
                Some(n)
            }
            Err(e) => {
                log::warn!("prefix and dense baseline stay on the CPU: {e:#}");
                None
            }
        };
        Ok(Placement {
            energy,
            suffix,
            nets,
        })
    }

    /// Where the sparse suffix runs, for reports.
    fn suffix_name(&self) -> &'static str {
        match &self.suffix {
            Some(g) if g.device().captures() && g.stopped_capturing() => {
                "cuda (kernel by kernel: capturing a frame as a CUDA graph failed)"
            }
            Some(g) if g.device().captures() => "cuda (frames as CUDA graphs)",
            Some(_) => "cuda",
            None => "cpu",
        }
    }
}

/// "prefix cpu, energy cuda, sparse suffix cuda, dense baseline cpu".
impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nets = if self.nets.is_some() { "cuda" } else { "cpu" };
        write!(
            f,
            "prefix {nets}, energy {}, sparse suffix {}, dense baseline {nets}",
            self.energy.name(),
            self.suffix_name()
        )
    }
}
