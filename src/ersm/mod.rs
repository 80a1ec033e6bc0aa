//! The energy layer: unary cost, mean-field pairwise coherence, threshold, compaction, gather.

pub mod cpu;
pub mod cuda;
pub mod node;

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

/// Most conv layers a unary head may have.
pub const MAX_HEAD_CONVS: usize = 16;

/// Widest tap spacing a head conv may have (a head reads token maps of tens
/// of tokens; a wider spacing would only read padding).
pub const MAX_HEAD_DILATION: usize = 64;

/// One conv layer ahead of a per-token unary head: stride 1, a `k × k`
/// kernel with taps `dilation` tokens apart and zero padding
/// `dilation · (k / 2)` (the map keeps its size), `groups` groups.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadConv {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel side (odd).
    pub k: usize,
    /// Channel groups (1: dense; `cin`: depthwise).
    pub groups: usize,
    /// Tokens between neighbouring taps (1: a plain conv): a wider view of
    /// the map for the same multiply-adds.
    pub dilation: usize,
    /// `cout × (cin / groups) × k × k`, row-major (ONNX's Conv layout).
    pub weight: Vec<f32>,
    /// `cout` values.
    pub bias: Vec<f32>,
    /// ReLU after the bias.
    pub relu: bool,
}

impl HeadConv {
    /// Multiply-adds for an `h × w` map.
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        (self.cout * (self.cin / self.groups) * self.k * self.k * h * w) as u64
    }

    fn validate(&self) -> Result<()> {
        let (cin, cout, k, g) = (self.cin, self.cout, self.k, self.groups);
        if cin == 0 || cout == 0 || k.is_multiple_of(2) || g == 0 {
            bail!("conv layer {cin}→{cout}, kernel {k}, groups {g}: channels and groups must be > 0 and the kernel odd");
        }
        if !cin.is_multiple_of(g) || !cout.is_multiple_of(g) {
            bail!("conv layer {cin}→{cout}: {g} groups do not divide the channels");
        }
        if !(1..=MAX_HEAD_DILATION).contains(&self.dilation) {
            bail!(
                "conv layer {cin}→{cout}: dilation {} is outside 1–{MAX_HEAD_DILATION}",
                self.dilation
            );
        }
        if self.weight.len() != cout * (cin / g) * k * k || self.bias.len() != cout {
            bail!(
                "conv layer {cin}→{cout}, kernel {k}, groups {g}: weight has {} values (expected {}), bias {} (expected {cout})",
                self.weight.len(),
                cout * (cin / g) * k * k,
                self.bias.len()
            );
        }
        Ok(())
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
    /// Conv layers over the whole token map, then a per-token head (`Linear`
    /// or `TwoLayer`) on their output: a unary cost that reads a token's
    /// neighbourhood, not the token alone.
    Conv {
        layers: Vec<HeadConv>,
        head: Box<UnaryHead>,
    },
}

impl UnaryHead {
    /// Number of input channels the head reads.
    pub fn channels(&self) -> usize {
        match self {
            UnaryHead::Linear { w, .. } => w.len(),
            UnaryHead::TwoLayer { w1, b1, .. } => w1.len() / b1.len().max(1),
            UnaryHead::Conv { layers, head } => layers.first().map_or(head.channels(), |l| l.cin),
        }
    }

    /// What the head is, for listings: "linear", "two-layer", or its convs then that.
    pub fn describe(&self) -> String {
        match self {
            UnaryHead::Linear { .. } => "linear".into(),
            UnaryHead::TwoLayer { .. } => "two-layer".into(),
            UnaryHead::Conv { layers, head } => {
                let convs: Vec<String> = layers
                    .iter()
                    .map(|l| {
                        let kind = if l.groups == 1 {
                            ""
                        } else if l.groups == l.cin {
                            " depthwise"
                        } else {
                            " grouped"
                        };
                        let spread = if l.dilation > 1 {
                            format!(" dilated {}", l.dilation)
                        } else {
                            String::new()
                        };
                        format!("{0}×{0}{kind}{spread} conv {1}→{2}", l.k, l.cin, l.cout)
                    })
                    .collect();
                format!("{}, then {}", convs.join(", "), head.describe())
            }
        }
    }

    /// Multiply-adds of the head for an `h × w` map (the energy layer's cost
    /// beside the suffix's).
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        let hw = (h * w) as u64;
        match self {
            UnaryHead::Linear { w, .. } => w.len() as u64 * hw,
            UnaryHead::TwoLayer { w1, w2, .. } => (w1.len() + w2.len()) as u64 * hw,
            UnaryHead::Conv { layers, head } => {
                layers.iter().map(|l| l.macs(h, w)).sum::<u64>() + head.macs(h, w)
            }
        }
    }

    fn validate(&self) -> Result<()> {
        match self {
            UnaryHead::Linear { .. } => Ok(()),
            UnaryHead::TwoLayer { w1, b1, w2, .. } => {
                if b1.is_empty() || !w1.len().is_multiple_of(b1.len()) || w2.len() != b1.len() {
                    bail!(
                        "two-layer unary head has inconsistent shapes: W1 {} values, b1 {}, w2 {}",
                        w1.len(),
                        b1.len(),
                        w2.len()
                    );
                }
                Ok(())
            }
            UnaryHead::Conv { layers, head } => {
                if layers.is_empty() || layers.len() > MAX_HEAD_CONVS {
                    bail!(
                        "conv unary head has {} conv layers, expected 1 to {MAX_HEAD_CONVS}",
                        layers.len()
                    );
                }
                if matches!(**head, UnaryHead::Conv { .. }) {
                    bail!("conv unary head: the per-token head after the convs cannot itself be a conv head");
                }
                for (i, l) in layers.iter().enumerate() {
                    l.validate()
                        .with_context(|| format!("unary head conv {i}"))?;
                    if i > 0 && l.cin != layers[i - 1].cout {
                        bail!(
                            "unary head conv {i} reads {} channels, conv {} gives {}",
                            l.cin,
                            i - 1,
                            layers[i - 1].cout
                        );
                    }
                }
                let last = layers[layers.len() - 1].cout;
                if head.channels() != last {
                    bail!(
                        "unary head: the per-token head reads {} channels, the last conv gives {last}",
                        head.channels()
                    );
                }
                head.validate()
            }
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
        self.head.validate()
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
        self.compute_from(cuda::MapSource::Host(x), spec)
    }

    /// Like [`Device::compute`] for a map that may already be in device
    /// memory (read there by the kernel; the CPU layer needs host values).
    pub fn compute_from(&self, x: cuda::MapSource<'_>, spec: &EnergySpec) -> Result<TokenMask> {
        self.compute_holding(x, spec, &[])
    }

    /// [`Device::compute_from`] on a stream: the raster indices `held`
    /// (ascending) are kept beside the negative energies.
    pub fn compute_holding(
        &self,
        x: cuda::MapSource<'_>,
        spec: &EnergySpec,
        held: &[u32],
    ) -> Result<TokenMask> {
        match (self, x) {
            (Device::Cpu, cuda::MapSource::Host(x)) => cpu::compute_holding(x, spec, held),
            (Device::Cpu, cuda::MapSource::Device(_)) => {
                bail!("the CPU energy layer reads host values, not a device buffer")
            }
            (Device::Cuda(b), x) => Ok(b.compute_holding(x, spec, held)?),
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
