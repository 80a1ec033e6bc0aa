//! The `ersm` command line, in the library so the binary and the Python
//! package (`python -m ersm`) run the same one: parse, dispatch, say what
//! failed. `args` holds the options.

mod args;

use crate::bench::{Bench, BenchOptions};
use crate::capture::{Capture, Policy, Reopen};
use crate::files::bundled;
use crate::live::stats::Info;
use crate::live::{http, Live, Target};
use crate::overlay::OverlayWriter;
use crate::package::ModelPackage;
use crate::pipeline::{Pipeline, Placement};
use crate::relay::Relay;
use crate::report::Ending;
use crate::run::RunOptions;
use crate::source::{self, images, Looping, SourceOptions, Uri};
use crate::threads::Threads;
use anyhow::{Context, Result};
use args::*;
use clap::Parser;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The package the commands use when `--model` is not given.
pub const DEFAULT_MODEL: &str = "models/mobilenet_v2_ersm";
const DEFAULT_IMAGES: &str = "models/images";
const DEFAULT_STREAM: &str = "models/streams/vtest.mp4";
/// Overlay pictures a file output may hold while its encoder catches up.
const OVERLAY_QUEUE: usize = 8;

/// Runs the command line `args` (the program's name first) and returns the
/// exit status: 0, 1 when the command failed (said on standard error), 2
/// for a bad command line (clap's message).
pub fn main<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    // A second call in one process (the Python package) keeps the first logger.
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .try_init();
    crate::panics::install_hook();
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            // Help and version are answers (exit 0), anything else a usage error.
            let _ = e.print();
            return e.exit_code();
        }
    };
    let result = crate::panics::catch(
        || "ersm".into(),
        || match cli.command {
            Command::Run(a) => run(a),
            Command::Bench(a) => bench(a),
            Command::Inspect(a) => inspect(a),
            Command::Eval(e) => eval(e),
            Command::Mask(a) => mask(a),
        },
    );
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

fn run(a: RunArgs) -> Result<()> {
    if let (Some(j), Some(d)) = (&a.jsonl, &a.dump) {
        anyhow::ensure!(
            resolved(j).is_none() || resolved(j) != resolved(d),
            "--jsonl and --dump name the same file ({}): each needs its own",
            d.display()
        );
    }
    // Ctrl-C ends the run with its summary; a second one ends it at once.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    })
    .context("installing the Ctrl-C handler")?;
    let uri = match &a.source {
        Some(s) => Uri::parse(s)?,
        None => Uri::File(bundled(DEFAULT_STREAM)),
    };
    // Everything is opened before the first frame: failures come first. The
    // HTTP port is bound before the model loads, so a port in use fails at once.
    let targets = a
        .output
        .iter()
        .map(|o| Target::parse(o).map(|t| (o.as_str(), t)))
        .collect::<Result<Vec<_>>>()?;
    let mut bound = None;
    for (uri, t) in &targets {
        if let Target::Http(addr) = t {
            anyhow::ensure!(
                bound.is_none(),
                "--output {uri}: one http:// output is enough (it serves every viewer)"
            );
            bound = Some(http::Bound::bind(*addr, uri)?);
        }
    }
    let opts = SourceOptions {
        width: a.input_width,
        height: a.input_height,
        fps: a.input_fps,
        stall_timeout: Some(Duration::from_secs_f64(a.stall_timeout)),
    };
    // The source first: a detector runs at its resolution.
    let mut source = open_source(&uri, &opts, a.reconnect, &stop)?;
    let mut pipeline_args = a.pipeline;
    if pipeline_args.input_size.is_none() {
        pipeline_args.input_size = source_input_size(pipeline_args.model.as_deref(), &*source);
    }
    let pipeline = load_pipeline(pipeline_args)?;
    if a.anonymize.is_some() {
        anyhow::ensure!(
            pipeline.model.reader.is_detector(),
            "--anonymize covers faces: model {} is a classifier, not a face detector (try --model models/centerface_ersm)",
            pipeline.model.origin.display()
        );
        if a.overlay.is_none() && a.output.is_empty() {
            log::warn!("--anonymize without --overlay or --output: nothing anonymized is written");
        }
    }
    let described = source.describe();
    let live = source.is_live();
    let fps = source.fps();
    let length = source.frame_count().filter(|_| !a.looping);
    log::info!(
        "source {described}; model {} ({}); energy layer on {}",
        pipeline.model.manifest.name,
        pipeline.model.origin.display(),
        pipeline.device().name()
    );
    if a.looping {
        source = Box::new(Looping::new(uri.clone(), opts.clone(), source));
    }
    let reopen: Option<Reopen> = (a.reconnect && live).then(|| {
        let (uri, opts) = (uri.clone(), opts.clone());
        Box::new(move || source::open(&uri, &opts)) as Reopen
    });
    if a.reconnect && !live {
        log::warn!("--reconnect applies to live sources only; {uri} is not one");
    }
    let policy = if live || a.drop_frames {
        Policy::DropOldest
    } else {
        Policy::Block
    };
    let mut overlays = Vec::new();
    let mut streams = Vec::new();
    // A file takes a few frames ahead of its encoder; one that falls
    // further behind (or stops reading) loses frames, never inference time.
    let file = |flag: &str, p: &Path| {
        Relay::start(flag, OverlayWriter::create(flag, p, fps)?, OVERLAY_QUEUE)
    };
    if let Some(p) = &a.overlay {
        overlays.push(file("--overlay", p)?);
    }
    for (uri, t) in &targets {
        match t {
            Target::File(p) => overlays.push(file("--output", p)?),
            Target::Stream(url) => streams.push(OverlayWriter::stream(url)?),
            Target::Http(_) => {}
        }
        log::debug!("--output {uri}");
    }
    let live_outputs = if bound.is_some() || !streams.is_empty() {
        let info = Info {
            model: pipeline.model.manifest.name.clone(),
            source: described.clone(),
            device: pipeline.device().name().into(),
            threads: pipeline.threads.count(),
            compare: a.compare == CompareArg::Dense,
            fallback: pipeline.fallback.is_some(),
        };
        let preprocess = pipeline.model.manifest.preprocess.clone();
        Some(Live::start(bound, streams, info, preprocess)?)
    } else {
        None
    };
    let capture = Capture::start(source, a.queue, policy, reopen).context("capture thread")?;
    let report = crate::run::run(
        &pipeline,
        &capture,
        RunOptions {
            compare: a.compare == CompareArg::Dense,
            jsonl: a.jsonl,
            dump: a.dump,
            overlays,
            live: live_outputs,
            max_frames: a.max_frames,
            warmup: a.warmup,
            stall_timeout: Duration::from_secs_f64(a.stall_timeout),
            reconnect: a.reconnect && live,
            length,
            source: described,
            anonymize: a.anonymize,
            hold: crate::faces::Hold::new(a.hold),
        },
        &stop,
    )?;
    say(format_args!("{}", report.table()))?;
    if let Ending::SourceError(e) = &report.ending {
        anyhow::bail!("{e}");
    }
    if report.frames == 0 {
        anyhow::bail!(
            "no frame of {} was processed ({} failed)",
            report.source,
            report.failed
        );
    }
    if !report.output_errors.is_empty() {
        anyhow::bail!("{}", report.output_errors.join("; "));
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    let outputs = [
        (&a.json, "--json"),
        (&a.dump, "--dump"),
        (&a.plot, "--plot"),
    ];
    for (path, what) in [(&a.json, "--json"), (&a.plot, "--plot")] {
        if let Some(p) = path {
            crate::files::ensure_writable(p, what)?;
        }
    }
    // One file for two outputs would hold whichever was written last.
    for (i, (p, what)) in outputs.iter().enumerate() {
        for (q, other) in &outputs[i + 1..] {
            if let (Some(p), Some(q)) = (p, q) {
                if resolved(p) == resolved(q) {
                    anyhow::bail!("{what} and {other} name the same file, {}", p.display());
                }
            }
        }
    }
    let pipeline = load_pipeline(a.pipeline)?;
    let files = images::list(&a.images.unwrap_or_else(|| bundled(DEFAULT_IMAGES)))?;
    // A bad image is reported and skipped; the rest are still used.
    let (frames, _) = images::load_all(&files);
    let m = &pipeline.model;
    log::info!(
        "model {} ({}), cut at '{}' ({}×{}×{}), {} images",
        m.manifest.name,
        m.origin.display(),
        m.cut.node,
        m.cut.c,
        m.cut.h,
        m.cut.w,
        frames.len()
    );
    let opts = BenchOptions {
        frames: a.frames,
        warmup: a.warmup,
        dump: a.dump,
    };
    let Bench {
        report,
        ersm,
        dense,
    } = crate::bench::run(&pipeline, &frames, &opts)?;
    say(format_args!("{}", report.table()))?;
    if a.profile {
        let rows = crate::profile::ersm(&pipeline, &frames, a.frames)?;
        say(format_args!(
            "where an ERSM frame's network time goes ({} threads, mean per frame):",
            pipeline.threads.count()
        ))?;
        say(format_args!("{}", crate::profile::table(&rows)))?;
        let rows = crate::profile::prefix(&pipeline, &frames, a.frames)?;
        say(format_args!(
            "the prefix by tract op and output shape (mean per frame):"
        ))?;
        say(format_args!("{}", crate::profile::table(&rows)))?;
    }
    if let Some(path) = &a.plot {
        let stages: Vec<(&str, Vec<f64>, Vec<f64>)> = crate::report::STAGES
            .iter()
            .map(|s| (*s, ersm.samples(s).to_vec(), dense.samples(s).to_vec()))
            .collect();
        let ideal = dense.p50("total") / report.ideal_speedup;
        crate::plot::latency(&stages, ideal, path)?;
        log::info!("wrote {}", path.display());
    }
    if let Some(path) = a.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        log::info!("wrote {}", path.display());
    }
    Ok(())
}

/// Loads the model and places its stages as `a` asks.
fn load_pipeline(a: PipelineArgs) -> Result<Pipeline> {
    let PipelineArgs {
        model,
        device,
        fallback,
        track,
        threads,
        input_size,
    } = a;
    load(&PipelineOptions {
        model,
        device: device.into(),
        threads,
        input_size,
        fallback,
        track,
    })
}

/// The input size of a detector that stretches frames to its input, when
/// no `--input-size` is given: the source's own resolution rounded up to
/// multiples of 32 (as deface does), when the source knows it before its
/// first frame (a video, a camera, a single image). `None`: the package's
/// size (a classifier, a folder of images, a package that cannot be read —
/// its load then says why).
fn source_input_size(model: Option<&Path>, source: &dyn source::Source) -> Option<(usize, usize)> {
    let dir = model.map_or_else(|| bundled(DEFAULT_MODEL), Path::to_path_buf);
    let m = crate::model::manifest::Manifest::read(&dir.join("manifest.json")).ok()?;
    m.detector.as_ref()?;
    m.preprocess.resize?;
    let (w, h) = source.size()?;
    let up = |v: usize| v.div_ceil(32).clamp(1, 4096 / 32) * 32;
    let size = (up(w), up(h));
    log::info!(
        "input {}×{}: the source's {w}×{h} rounded up to multiples of 32 (--input-size WxH sets another)",
        size.0,
        size.1
    );
    Some(size)
}

/// Opens the source; with `--reconnect`, a camera or network source that
/// is down at start is tried again every few seconds until it answers (or
/// Ctrl-C), as one that drops later is.
fn open_source(
    uri: &Uri,
    opts: &SourceOptions,
    reconnect: bool,
    stop: &AtomicBool,
) -> Result<Box<dyn source::Source>> {
    const RETRY: Duration = Duration::from_secs(2);
    let live = matches!(uri, Uri::V4l2(_) | Uri::Csi(_) | Uri::Url(_));
    loop {
        match source::open(uri, opts) {
            Ok(s) => return Ok(s),
            Err(e) if reconnect && live => {
                log::warn!(
                    "{e:#}; trying again in {} s (--reconnect; Ctrl-C to stop)",
                    RETRY.as_secs()
                );
                let until = std::time::Instant::now() + RETRY;
                while std::time::Instant::now() < until {
                    anyhow::ensure!(
                        !stop.load(Ordering::SeqCst),
                        "source {uri}: interrupted while waiting for it to come up"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// How a pipeline is loaded: the options `run`, `bench` and `eval` share,
/// as the library (and the Python package's `Net`) takes them.
#[derive(Clone, Debug)]
pub struct PipelineOptions {
    /// The model package folder; `None`: the bundled default.
    pub model: Option<PathBuf>,
    pub device: crate::ersm::DeviceChoice,
    /// Worker threads; `None`: every core this process may use.
    pub threads: Option<usize>,
    /// A detector's input size (W, H), instead of the package's.
    pub input_size: Option<(usize, usize)>,
    /// Re-run unsure frames densely.
    pub fallback: bool,
    /// Track faces from frame to frame (the package's `track` settings).
    pub track: bool,
}

/// Loads the model and places its stages as `o` asks, as `ersm run` does.
pub fn load(o: &PipelineOptions) -> Result<Pipeline> {
    let model_dir = o.model.clone().unwrap_or_else(|| bundled(DEFAULT_MODEL));
    let model = ModelPackage::load_sized(&model_dir, o.input_size)?;
    let cores = Threads::available();
    let threads = match o.threads {
        Some(0) => anyhow::bail!("threads: 0 is not a number of worker threads (1-1024)"),
        // The workers spin while a frame runs: more than the cores this
        // process may use only queue behind each other (1000 on 2 cores
        // took 0.6-3 s a frame).
        Some(n) if n > cores => {
            log::warn!(
                "--threads {n}: this process may use {cores} core(s); running {cores} threads"
            );
            cores
        }
        Some(n) => n,
        None => cores,
    };
    let threads = Threads::new(threads)?;
    log::info!("{} worker thread(s)", threads.count());
    let placement = Placement::decide(&model, o.device)?;
    let pipeline = Pipeline::placed(model, placement).with_threads(threads);
    log::info!("{}", pipeline.placement());
    let pipeline = if o.fallback {
        pipeline.with_fallback()?
    } else {
        pipeline
    };
    if o.track {
        pipeline.with_tracking()
    } else {
        Ok(pipeline)
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn eval(cmd: EvalCommand) -> Result<()> {
    let common = match &cmd {
        EvalCommand::Deletion(d) => &d.common,
        EvalCommand::Sparsity(a) => a,
        EvalCommand::Occlusion(o) => &o.common,
    };
    let pipeline = load_pipeline(common.pipeline.clone())?;
    let inputs = if common.images.is_empty() {
        vec![bundled(DEFAULT_IMAGES)]
    } else {
        common.images.clone()
    };
    let out = common.out.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let failed = match &cmd {
        EvalCommand::Occlusion(o) => {
            let (frames, failed) = crate::eval::load_inputs(&inputs, common.every)?;
            let r = crate::eval::occlusion::run(&pipeline, &frames, &o.sizes, o.grid)?;
            save_results(&out, "occlusion", &r.csv(), &r, &failed)?;
            crate::plot::occlusion(&r, &out.join("occlusion.svg"))?;
            say(format_args!("{}", r.table()))?;
            failed
        }
        EvalCommand::Deletion(d) => {
            let (analysed, failed) = crate::eval::analyse_inputs(&pipeline, &inputs, common.every)?;
            let r = crate::eval::deletion::run(&pipeline, &analysed, d.step, d.seeds)?;
            save_results(&out, "deletion", &r.csv(), &r, &failed)?;
            crate::plot::deletion(&r, &out.join("deletion.svg"))?;
            say(format_args!("{}", r.table()))?;
            failed
        }
        EvalCommand::Sparsity(_) => {
            let (analysed, failed) = crate::eval::analyse_inputs(&pipeline, &inputs, common.every)?;
            let r = crate::eval::sparsity::of(&pipeline, &analysed)?;
            save_results(&out, "sparsity", &r.csv(), &r, &failed)?;
            crate::plot::sparsity(&r, &out.join("sparsity.svg"))?;
            say(format_args!("{}", r.table()))?;
            failed
        }
    };
    report_failed(&failed)?;
    say(format_args!("results in {}", out.display()))?;
    Ok(())
}

/// `p` with its folder resolved (links, `..`), to tell two spellings of one
/// output file apart from two files.
fn resolved(p: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(p).ok()?;
    let dir = abs.parent()?.canonicalize().ok()?;
    Some(dir.join(abs.file_name()?))
}

/// Prints `text` and a newline on standard output. A reader that went away
/// (`ersm inspect | head -3`) ends the process quietly; any other failure
/// (a full disk) is an error that says so, never a panic.
fn say(text: std::fmt::Arguments<'_>) -> Result<()> {
    say_raw(format_args!("{text}\n"))
}

/// [`say`] without the newline.
fn say_raw(text: std::fmt::Arguments<'_>) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_fmt(text).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(anyhow::anyhow!("writing to standard output: {e}")),
    }
}

/// Writes `NAME.csv` and `NAME.json` (the result and the images left out).
fn save_results<T: serde::Serialize>(
    out: &Path,
    name: &str,
    csv: &str,
    result: &T,
    failed: &[String],
) -> Result<()> {
    write(&out.join(format!("{name}.csv")), csv)?;
    let json = serde_json::json!({ "result": result, "failed_images": failed });
    write(
        &out.join(format!("{name}.json")),
        &serde_json::to_string_pretty(&json)?,
    )
}

fn report_failed(failed: &[String]) -> Result<()> {
    if !failed.is_empty() {
        say(format_args!(
            "{} image(s) could not be evaluated:",
            failed.len()
        ))?;
        for f in failed {
            say(format_args!("  {f}"))?;
        }
    }
    Ok(())
}

fn mask(a: MaskArgs) -> Result<()> {
    let pipeline = load_pipeline(PipelineArgs {
        model: a.model,
        device: a.device,
        fallback: false,
        track: false,
        threads: None,
        input_size: None,
    })?;
    let frame = images::load(&a.image)?;
    let r = pipeline.run_ersm(&frame)?;
    let answer = pipeline
        .model
        .reader
        .read(&r.logits, frame.width, frame.height)?;
    let mut img = crate::overlay::draw(&frame, &r.mask, &pipeline.model.manifest.preprocess);
    crate::faces::draw(&mut img, frame.width, frame.height, answer.faces());
    image::save_buffer(
        &a.out,
        &img,
        frame.width as u32,
        frame.height as u32,
        image::ColorType::Rgb8,
    )
    .with_context(|| format!("writing {}", a.out.display()))?;
    say(format_args!(
        "{}: '{}', kept {} of {} tokens ({:.1} %) -> {}",
        a.image.display(),
        answer.label(&pipeline.model.manifest),
        r.mask.kept.len(),
        r.mask.h * r.mask.w,
        100.0 * r.mask.keep_ratio(),
        a.out.display()
    ))?;
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let model_dir = a.model.unwrap_or_else(|| bundled(DEFAULT_MODEL));
    let m = ModelPackage::load(&model_dir)?;
    say_raw(format_args!("{}", m.describe(a.keep)))?;
    Ok(())
}
