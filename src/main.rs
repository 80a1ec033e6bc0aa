//! The `ersm` command line.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ersm::ersm::{Device, DeviceChoice};
use ersm::model::ModelPackage;
use ersm::pipeline::{top1, Pipeline};
use ersm::report::{ideal_speedup, BenchReport, StageSamples};
use ersm::source::images;
use std::path::{Path, PathBuf};

/// Sparse CNN inference with Energy-Regularized Spatial Masking, beside the dense baseline.
#[derive(Parser)]
#[command(name = "ersm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time ERSM and the dense baseline side by side on bundled images.
    Bench(BenchArgs),
    /// Show where the network is cut, the prefix and suffix ops, and suffix cost.
    Inspect(InspectArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Model package folder (manifest.json + ONNX). Default: the bundled model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// An image file or a folder of PNG/JPEG images. Default: the bundled photos.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Frames to time per mode (images are cycled).
    #[arg(long, default_value_t = 40)]
    frames: usize,
    /// Untimed frames per mode first (caches, allocator).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where the energy layer runs: cpu, cuda (fails without a usable GPU), or
    /// auto (CUDA when available, else CPU).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
}

/// `--device` values.
#[derive(Clone, Copy, clap::ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

impl From<DeviceArg> for DeviceChoice {
    fn from(d: DeviceArg) -> DeviceChoice {
        match d {
            DeviceArg::Cpu => DeviceChoice::Cpu,
            DeviceArg::Cuda => DeviceChoice::Cuda,
            DeviceArg::Auto => DeviceChoice::Auto,
        }
    }
}

#[derive(clap::Args)]
struct InspectArgs {
    /// Model package folder (manifest.json + ONNX). Default: the bundled model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Keep ratio at which to estimate the sparse suffix cost (0..1].
    #[arg(long, default_value_t = 0.5)]
    keep: f64,
}

/// A bundled path: as given relative to the working directory, else beside the crate.
fn bundled(rel: &str) -> PathBuf {
    let here = PathBuf::from(rel);
    if here.exists() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

const DEFAULT_MODEL: &str = "models/mobilenet_v2_ersm";
const DEFAULT_IMAGES: &str = "models/images";

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(a) => bench(a),
        Command::Inspect(a) => inspect(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn bench(a: BenchArgs) -> Result<()> {
    anyhow::ensure!(a.frames > 0, "--frames must be at least 1");
    let model_dir = a.model.unwrap_or_else(|| bundled(DEFAULT_MODEL));
    let model = ModelPackage::load(&model_dir)?;
    let pipeline = Pipeline::new(model, Device::select(a.device.into())?);
    let files = images::list(&a.images.unwrap_or_else(|| bundled(DEFAULT_IMAGES)))?;
    // A bad image is reported and skipped; the rest are still used.
    let frames: Vec<_> = files
        .iter()
        .filter_map(|f| {
            images::load(f)
                .map_err(|e| log::warn!("skipping: {e:#}"))
                .ok()
        })
        .collect();
    anyhow::ensure!(!frames.is_empty(), "no image could be decoded");
    let m = &pipeline.model;
    log::info!(
        "model {} ({}), cut at '{}' ({}×{}×{}), {} images",
        m.manifest.name,
        model_dir.display(),
        m.cut.node,
        m.cut.c,
        m.cut.h,
        m.cut.w,
        frames.len()
    );
    let (mut ersm, mut dense) = (StageSamples::default(), StageSamples::default());
    let (mut keeps, mut agree, mut macs) = (Vec::new(), 0usize, 0f64);
    for i in 0..a.warmup + a.frames {
        let frame = &frames[i % frames.len()];
        // Alternate which mode goes first so neither always runs on warm caches.
        let (e, d) = if i % 2 == 0 {
            let e = pipeline.run_ersm(frame)?;
            (e, pipeline.run_dense(frame)?)
        } else {
            let d = pipeline.run_dense(frame)?;
            (pipeline.run_ersm(frame)?, d)
        };
        if i < a.warmup {
            continue;
        }
        ersm.push(&e.times);
        dense.push(&d.times);
        keeps.push(e.mask.keep_ratio());
        agree += usize::from(top1(&e.logits) == top1(&d.logits));
        let counts = m.plan.token_counts(&e.mask.kept);
        macs += m.plan.cost(&counts) as f64;
        log::debug!(
            "{}: top-1 {} (dense {}), keep {:.3}",
            frame.name,
            m.manifest.label(top1(&e.logits)),
            m.manifest.label(top1(&d.logits)),
            e.mask.keep_ratio()
        );
    }
    let n = a.frames as f64;
    let keep = keeps.iter().sum::<f64>() / n;
    let report = BenchReport {
        model: m.manifest.name.clone(),
        device: pipeline.device.name().into(),
        frames: a.frames,
        keep_ratio: keep,
        keep_ratio_min: keeps.iter().copied().fold(f64::INFINITY, f64::min),
        keep_ratio_max: keeps.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        ideal_speedup: ideal_speedup(&dense, keep),
        speedup: dense.p50("total") / ersm.p50("total"),
        suffix_speedup: dense.p50("suffix") / ersm.p50("suffix"),
        agreement: agree as f64 / n,
        suffix_macs_dense: m.plan.dense_cost(),
        suffix_macs_ersm: macs / n,
        stages: [
            ("ersm".to_string(), ersm.summaries()),
            ("dense".to_string(), dense.summaries()),
        ]
        .into(),
    };
    println!("{}", report.table());
    if let Some(path) = a.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        log::info!("wrote {}", path.display());
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    anyhow::ensure!(
        a.keep > 0.0 && a.keep <= 1.0,
        "--keep must be in (0, 1], got {}",
        a.keep
    );
    let model_dir = a.model.unwrap_or_else(|| bundled(DEFAULT_MODEL));
    let m = ModelPackage::load(&model_dir)?;
    let e = &m.energy;
    println!("model      {} ({})", m.manifest.name, m.origin.display());
    println!(
        "input      {} {:?}",
        m.manifest.input.name, m.manifest.input.shape
    );
    println!(
        "cut        energy node '{}' reads '{}' ({}×{}×{} = {} tokens of {} channels)",
        m.cut.node,
        m.cut.input,
        m.cut.c,
        m.cut.h,
        m.cut.w,
        m.cut.h * m.cut.w,
        m.cut.c
    );
    println!(
        "energy     λ = {}, τ = {}, T = {}, {:?}-neighbourhood, {} head",
        e.lambda,
        e.tau,
        e.steps,
        e.neighbourhood,
        match e.head {
            ersm::ersm::UnaryHead::Linear { .. } => "linear",
            ersm::ersm::UnaryHead::TwoLayer { .. } => "two-layer",
        }
    );
    println!(
        "\nprefix ({} ONNX nodes, dense in tract):",
        m.prefix_ops.len()
    );
    println!("  {}", m.prefix_ops.join(" → "));
    println!("\nsuffix ({} sparse steps):", m.plan.steps.len());
    for step in &m.plan.steps {
        let level = m.plan.slot_levels[step.output]
            .map(|l| format!("{}×{}", m.plan.levels[l].h, m.plan.levels[l].w))
            .unwrap_or_else(|| "dense".into());
        let full: Vec<usize> = m.plan.levels.iter().map(|l| l.h * l.w).collect();
        println!(
            "  {:<18} {:<28} {:>9}  {:>10} MACs",
            step.op.name(),
            step.node,
            level,
            step.op.cost(&full)
        );
    }
    // Estimate: every level keeps the same fraction (strided levels keep at least that).
    let est: Vec<usize> = m
        .plan
        .levels
        .iter()
        .map(|l| ((l.h * l.w) as f64 * a.keep).ceil() as usize)
        .collect();
    let (dense, sparse) = (m.plan.dense_cost(), m.plan.cost(&est));
    println!(
        "\nsuffix cost: {:.3} GFLOPs dense, {:.3} GFLOPs at keep {:.2} ({:.2}x fewer; assumes the same keep ratio at every resolution)",
        2.0 * dense as f64 / 1e9,
        2.0 * sparse as f64 / 1e9,
        a.keep,
        dense as f64 / sparse.max(1) as f64
    );
    Ok(())
}
