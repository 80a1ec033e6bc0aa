//! The `ersm` command line: dispatch to the library (`args` holds the
//! options).

mod args;

use anyhow::{Context, Result};
use args::*;
use clap::Parser;
use ersm::bench::{Bench, BenchOptions};
use ersm::capture::{Capture, Policy, Reopen};
use ersm::live::stats::Info;
use ersm::live::{http, Live, Target};
use ersm::overlay::OverlayWriter;
use ersm::package::ModelPackage;
use ersm::pipeline::{Pipeline, Placement};
use ersm::report::Ending;
use ersm::run::RunOptions;
use ersm::source::{self, images, Looping, SourceOptions, Uri};
use ersm::threads::Threads;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
const DEFAULT_STREAM: &str = "models/streams/vtest.mp4";

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    ersm::panics::install_hook();
    let cli = Cli::parse();
    let result = ersm::panics::catch(
        || "ersm".into(),
        || match cli.command {
            Command::Run(a) => run(a),
            Command::Bench(a) => bench(a),
            Command::Inspect(a) => inspect(a),
            Command::Eval(e) => eval(e),
            Command::Mask(a) => mask(a),
        },
    );
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: RunArgs) -> Result<()> {
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
    let pipeline = load_pipeline(a.pipeline)?;
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
    let opts = SourceOptions {
        width: a.input_width,
        height: a.input_height,
        fps: a.input_fps,
    };
    let mut source = source::open(&uri, &opts)?;
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
    if let Some(p) = &a.overlay {
        overlays.push(("--overlay", OverlayWriter::create("--overlay", p, fps)?));
    }
    for (uri, t) in &targets {
        match t {
            Target::File(p) => {
                overlays.push(("--output", OverlayWriter::create("--output", p, fps)?))
            }
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
    let report = ersm::run::run(
        &pipeline,
        &capture,
        RunOptions {
            compare: a.compare == CompareArg::Dense,
            jsonl: a.jsonl,
            overlays,
            live: live_outputs,
            max_frames: a.max_frames,
            warmup: a.warmup,
            stall_timeout: Duration::from_secs_f64(a.stall_timeout),
            reconnect: a.reconnect && live,
            length,
            source: described,
            anonymize: a.anonymize,
            hold: ersm::faces::Hold::new(a.hold),
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
            ersm::files::ensure_writable(p, what)?;
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
    } = ersm::bench::run(&pipeline, &frames, &opts)?;
    say(format_args!("{}", report.table()))?;
    if a.profile {
        let rows = ersm::profile::ersm(&pipeline, &frames, a.frames)?;
        say(format_args!(
            "where an ERSM frame's network time goes ({} threads, mean per frame):",
            pipeline.threads.count()
        ))?;
        say(format_args!("{}", ersm::profile::table(&rows)))?;
        let rows = ersm::profile::prefix(&pipeline, &frames, a.frames)?;
        say(format_args!(
            "the prefix by tract op and output shape (mean per frame):"
        ))?;
        say(format_args!("{}", ersm::profile::table(&rows)))?;
    }
    if let Some(path) = &a.plot {
        let stages: Vec<(&str, Vec<f64>, Vec<f64>)> = ersm::report::STAGES
            .iter()
            .map(|s| (*s, ersm.samples(s).to_vec(), dense.samples(s).to_vec()))
            .collect();
        let ideal = dense.p50("total") / report.ideal_speedup;
        ersm::plot::latency(&stages, ideal, path)?;
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
        threads,
        input_size,
    } = a;
    let model_dir = model.unwrap_or_else(|| bundled(DEFAULT_MODEL));
    let model = ModelPackage::load_sized(&model_dir, input_size)?;
    let cores = Threads::available();
    let threads = match threads {
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
    let placement = Placement::decide(&model, device.into())?;
    let pipeline = Pipeline::placed(model, placement).with_threads(threads);
    log::info!("{}", pipeline.placement());
    if fallback {
        pipeline.with_fallback()
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
            let (frames, failed) = ersm::eval::load_inputs(&inputs, common.every)?;
            let r = ersm::eval::occlusion::run(&pipeline, &frames, &o.sizes, o.grid)?;
            save_results(&out, "occlusion", &r.csv(), &r, &failed)?;
            ersm::plot::occlusion(&r, &out.join("occlusion.svg"))?;
            say(format_args!("{}", r.table()))?;
            failed
        }
        EvalCommand::Deletion(d) => {
            let (analysed, failed) = ersm::eval::analyse_inputs(&pipeline, &inputs, common.every)?;
            let r = ersm::eval::deletion::run(&pipeline, &analysed, d.step, d.seeds)?;
            save_results(&out, "deletion", &r.csv(), &r, &failed)?;
            ersm::plot::deletion(&r, &out.join("deletion.svg"))?;
            say(format_args!("{}", r.table()))?;
            failed
        }
        EvalCommand::Sparsity(_) => {
            let (analysed, failed) = ersm::eval::analyse_inputs(&pipeline, &inputs, common.every)?;
            let r = ersm::eval::sparsity::of(&pipeline, &analysed)?;
            save_results(&out, "sparsity", &r.csv(), &r, &failed)?;
            ersm::plot::sparsity(&r, &out.join("sparsity.svg"))?;
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
        threads: None,
        input_size: None,
    })?;
    let frame = images::load(&a.image)?;
    let r = pipeline.run_ersm(&frame)?;
    let answer = pipeline
        .model
        .reader
        .read(&r.logits, frame.width, frame.height)?;
    let mut img = ersm::overlay::draw(&frame, &r.mask, &pipeline.model.manifest.preprocess);
    ersm::faces::draw(&mut img, frame.width, frame.height, answer.faces());
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
