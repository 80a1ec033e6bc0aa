//! The energy layer: unary cost, mean-field pairwise coherence, threshold, compaction, gather.

pub mod cpu;
pub mod cuda;

use anyhow::{bail, Context, Result};
use std::sync::Arc;

/// Which pixels count as a token's neighbours in the pairwise term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Neighbourhood {
    /// Up, down, left, right.
    Four,
    /// The four plus the diagonals.
    Eight,
}

impl Neighbourhood {
    /// `(dy, dx)` offsets of the neighbours.
    pub fn offsets(self) -> &'static [(isize, isize)] {
        match self {
            Neighbourhood::Four => &[(-1, 0), (0, -1), (0, 1), (1, 0)],
            Neighbourhood::Eight => &[
                (-1, -1),
                (-1, 0),
                (-1, 1),
                (0, -1),
                (0, 1),
                (1, -1),
                (1, 0),
                (1, 1),
            ],
        }
    }
}

/// The learned unary cost `u_i` of a token's feature vector.
#[derive(Clone, Debug, PartialEq)]
pub enum UnaryHead {
    /// `u = w · x + b` (a 1×1 conv to one channel).
    Linear { w: Vec<f32>, b: f32 },
    /// `u = w2 · relu(W1 x + b1) + b2`, `W1` row-major `hidden × C`.
    TwoLayer {
        w1: Vec<f32>,
        b1: Vec<f32>,
        w2: Vec<f32>,
        b2: f32,
    },
}

impl UnaryHead {
    /// Number of input channels the head reads.
    pub fn channels(&self) -> usize {
        match self {
            UnaryHead::Linear { w, .. } => w.len(),
            UnaryHead::TwoLayer { w1, b1, .. } => w1.len() / b1.len().max(1),
        }
    }
}

/// Everything the energy layer needs: weights and the mean-field settings.
#[derive(Clone, Debug, PartialEq)]
pub struct EnergySpec {
    /// Unary cost head.
    pub head: UnaryHead,
    /// Pairwise (Potts) weight λ ≥ 0.
    pub lambda: f32,
    /// Mean-field temperature τ > 0.
    pub tau: f32,
    /// Number of mean-field steps T.
    pub steps: u32,
    /// 4- or 8-neighbourhood.
    pub neighbourhood: Neighbourhood,
}

impl EnergySpec {
    /// Checks the settings the equations need; the message names the bad value.
    pub fn validate(&self) -> Result<()> {
        if !(self.lambda >= 0.0 && self.lambda.is_finite()) {
            bail!("lambda must be a finite number >= 0, got {}", self.lambda);
        }
        if !(self.tau > 0.0 && self.tau.is_finite()) {
            bail!("tau must be a finite number > 0, got {}", self.tau);
        }
        if let UnaryHead::TwoLayer { w1, b1, w2, .. } = &self.head {
            if b1.is_empty() || !w1.len().is_multiple_of(b1.len()) || w2.len() != b1.len() {
                bail!(
                    "two-layer unary head has inconsistent shapes: W1 {} values, b1 {}, w2 {}",
                    w1.len(),
                    b1.len(),
                    w2.len()
                );
            }
        }
        Ok(())
    }
}

/// A feature map in the prefix's NCHW layout (batch 1), borrowed.
#[derive(Clone, Copy, Debug)]
pub struct FeatureMap<'a> {
    /// `C × H × W` values, channel-major.
    pub data: &'a [f32],
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl<'a> FeatureMap<'a> {
    /// Wraps `data`, checking its length against the shape.
    pub fn new(data: &'a [f32], c: usize, h: usize, w: usize) -> Result<Self> {
        if data.len() != c * h * w || c == 0 || h == 0 || w == 0 {
            bail!(
                "feature map has {} values, expected C×H×W = {c}×{h}×{w} (all > 0)",
                data.len()
            );
        }
        Ok(FeatureMap { data, c, h, w })
    }
}

/// The energy layer's answer for one frame.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenMask {
    /// Map height in tokens.
    pub h: usize,
    /// Map width in tokens.
    pub w: usize,
    /// Channels per token.
    pub c: usize,
    /// Final energy of every token, raster order (`H × W`).
    pub energies: Vec<f32>,
    /// Raster indices of kept tokens, ascending.
    pub kept: Vec<u32>,
    /// Kept feature vectors, gathered unscaled: `kept.len() × C`, row-major.
    pub features: Vec<f32>,
}

impl TokenMask {
    /// Why these energies cannot be thresholded, if they cannot (a non-finite
    /// energy means non-finite features upstream).
    pub fn non_finite(energies: &[f32]) -> Option<String> {
        let i = energies.iter().position(|e| !e.is_finite())?;
        Some(format!(
            "energy of token {i} is {} (non-finite features?)",
            energies[i]
        ))
    }

    /// Fraction of tokens kept.
    pub fn keep_ratio(&self) -> f64 {
        self.kept.len() as f64 / (self.h * self.w) as f64
    }

    /// Keep/drop flag per token, raster order.
    pub fn keep_flags(&self) -> Vec<bool> {
        let mut flags = vec![false; self.h * self.w];
        for &i in &self.kept {
            flags[i as usize] = true;
        }
        flags
    }
}

/// Where the energy layer runs.
#[derive(Clone, Debug)]
pub enum Device {
    /// The exact CPU implementation in [`cpu`].
    Cpu,
    /// One kernel launch per frame on an NVIDIA GPU ([`cuda`]).
    Cuda(Arc<cuda::CudaBackend>),
}

/// What the user asked for with `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    /// CUDA when a device is usable, else CPU (with one log line saying why).
    Auto,
}

impl Device {
    /// Opens the device the user chose.
    pub fn select(choice: DeviceChoice) -> Result<Device> {
        if choice == DeviceChoice::Cpu {
            return Ok(Device::Cpu);
        }
        match (choice, cuda::CudaBackend::new(0)) {
            (_, Ok(b)) => {
                log::info!("energy layer on {}", b.description);
                Ok(Device::Cuda(Arc::new(b)))
            }
            (DeviceChoice::Auto, Err(e)) => {
                log::info!("energy layer on CPU ({e})");
                Ok(Device::Cpu)
            }
            (_, Err(e)) => Err(e).context("--device cuda: cannot use CUDA device 0"),
        }
    }

    /// Computes the energy layer on this device.
    pub fn compute(&self, x: FeatureMap<'_>, spec: &EnergySpec) -> Result<TokenMask> {
        match self {
            Device::Cpu => cpu::compute(x, spec),
            Device::Cuda(b) => Ok(b.compute(x, spec)?),
        }
    }

    /// Short name for tables and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
        }
    }
}
