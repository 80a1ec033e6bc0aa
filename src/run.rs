//! The main job: frames from a capture queue through ERSM (and the dense
//! baseline beside it), with a live status line, per-frame records and
//! overlays, ending in a summary however the stream ends.

use crate::answer::Comparison;
use crate::caption;
use crate::capture::{Capture, End, Next};
use crate::detect::Agreement;
use crate::live::stats::FrameRecord;
use crate::live::{Live, Shot};
use crate::overlay;
use crate::pipeline::Pipeline;
use crate::record::{FaceJson, JsonRecord, StageMs};
use crate::report::{rss_mib, Ending, FaceSummary, RunReport, StageSamples};
use crate::source::Frame;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How `run` behaves.
pub struct RunOptions {
    /// Run the dense baseline on every frame too.
    pub compare: bool,
    /// One JSON record per frame.
    pub jsonl: Option<PathBuf>,
    /// Each frame's kept tokens and raw answers, one JSON line each (`--dump`).
    pub dump: Option<PathBuf>,
    /// Overlay files and folders, each with the option that named it
    /// (`--overlay`, `--output PATH`) for its errors.
    pub overlays: Vec<crate::relay::Relay>,
    /// Live outputs (`--output http://…`, `rtp://…`, `rtsp://…`).
    pub live: Option<Live>,
    /// Stop after this many frames.
    pub max_frames: Option<usize>,
    /// Frames at the start left out of the latency percentiles.
    pub warmup: usize,
    /// A source silent for this long has stalled.
    pub stall_timeout: Duration,
    /// A stall restarts the source instead of ending the run (`--reconnect`
    /// on a live source).
    pub reconnect: bool,
    /// Frames in the stream, when known (for the progress bar).
    pub length: Option<usize>,
    /// One line naming the source, for the summary.
    pub source: String,
    /// Cover the faces a detector finds on every output, not the heat map.
    pub anonymize: Option<crate::faces::Cover>,
    /// Faces seen lately, kept covered (`--hold`).
    pub hold: crate::faces::Hold,
}

/// The live status line: a progress bar on a terminal, plain lines otherwise.
enum Status {
    Bar(ProgressBar),
    Lines { last: Instant },
}

impl Status {
    fn new(length: Option<usize>) -> Status {
        if !std::io::stderr().is_terminal() {
            return Status::Lines {
                last: Instant::now(),
            };
        }
        let bar = match length {
            Some(n) => ProgressBar::new(n as u64).with_style(
                ProgressStyle::with_template("{bar:24} {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {pos} frames {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        };
        Status::Bar(bar)
    }

    fn update(&mut self, frames: usize, line: impl FnOnce() -> String) {
        match self {
            Status::Bar(b) => {
                b.set_position(frames as u64);
                b.set_message(line());
            }
            Status::Lines { last } => {
                if last.elapsed() >= Duration::from_secs(2) {
                    *last = Instant::now();
                    eprintln!("[ersm] {frames} frames | {}", line());
                }
            }
        }
    }

    fn finish(&self) {
        if let Status::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}

/// Everything recorded so far.
struct Tally {
    ersm: StageSamples,
    dense: StageSamples,
    /// The warm-up frames' times: the percentiles' when the run ended
    /// before any frame after the warm-up.
    warm_ersm: StageSamples,
    warm_dense: StageSamples,
    keeps: Vec<f64>,
    agree: usize,
    /// Frames whose dense top-1 margin is at least `SURE_MARGIN`, and of
    /// those, the ones ERSM agrees on.
    sure: usize,
    sure_agree: usize,
    failed: usize,
    /// Frames the confidence fallback re-ran densely.
    fell_back: usize,
    /// Suffix multiply-accumulates spent, summed over frames (fallbacks included).
    macs: f64,
    /// A detector's faces against dense's, summed over frames.
    faces: Agreement,
}

impl Tally {
    /// Frames processed: every one records a keep ratio.
    fn frames(&self) -> usize {
        self.keeps.len()
    }

    fn line(&self, dropped: u64) -> String {
        let e = self.ersm.recent_p50("total", 30);
        let mut s = format!(
            "ERSM {e:.1} ms ({:.1} FPS) keep {:.2}",
            1e3 / e,
            self.keeps.last().copied().unwrap_or(f64::NAN)
        );
        if !self.dense.is_empty() {
            let d = self.dense.recent_p50("total", 30);
            s += &format!(
                " | dense {d:.1} ms ({:.1} FPS) | {:.2}x | agree {:.0} %",
                1e3 / d,
                d / e,
                100.0 * self.agree as f64 / self.frames().max(1) as f64
            );
        }
        if dropped > 0 {
            s += &format!(" | dropped {dropped}");
        }
        s
    }
}

/// A per-frame log file (`--jsonl`, `--dump`), closed after a write error.
struct Log {
    flag: &'static str,
    out: Option<std::io::BufWriter<std::fs::File>>,
}

impl Log {
    fn create(flag: &'static str, path: Option<&std::path::Path>) -> Result<Log> {
        let out = match path {
            Some(p) => Some(std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| format!("{flag} {}", p.display()))?,
            )),
            None => None,
        };
        Ok(Log { flag, out })
    }

    fn is_open(&self) -> bool {
        self.out.is_some()
    }

    /// Writes one line. A write error (a full disk) stops the log, not the
    /// run; the run then ends non-zero after its summary.
    fn line(&mut self, text: &str, output_errors: &mut Vec<String>) {
        if let Some(w) = self.out.as_mut() {
            if let Err(e) = writeln!(w, "{text}") {
                log::error!("{}: {e}; no more records", self.flag);
                output_errors.push(format!("{}: {e}", self.flag));
                self.out = None;
            }
        }
    }

    fn flush(&mut self, output_errors: &mut Vec<String>) {
        if let Some(w) = self.out.as_mut() {
            if let Err(e) = w.flush() {
                output_errors.push(format!("{}: {e}", self.flag));
            }
        }
    }
}

/// The run's per-frame logs.
struct Logs {
    jsonl: Log,
    dump: Log,
}

/// Runs frames from `capture` until the stream ends, `stop` is set (Ctrl-C),
/// the frame limit is reached or the source fails. Always returns the
/// summary of what was processed; only set-up failures are errors.
pub fn run(
    pipeline: &Pipeline,
    capture: &Capture,
    mut opts: RunOptions,
    stop: &AtomicBool,
) -> Result<RunReport> {
    let mut logs = Logs {
        jsonl: Log::create("--jsonl", opts.jsonl.as_deref())?,
        dump: Log::create("--dump", opts.dump.as_deref())?,
    };
    let m = &pipeline.model;
    let mut t = Tally {
        ersm: StageSamples::default(),
        dense: StageSamples::default(),
        warm_ersm: StageSamples::default(),
        warm_dense: StageSamples::default(),
        keeps: Vec::new(),
        agree: 0,
        sure: 0,
        sure_agree: 0,
        failed: 0,
        fell_back: 0,
        macs: 0.0,
        faces: Agreement::default(),
    };
    let mut status = Status::new(opts.length);
    let mut start: Option<Instant> = None;
    let mut last_frame = Instant::now();
    let mut rss_start = rss_mib();
    let mut output_errors = Vec::new();
    let ending = loop {
        if stop.load(Ordering::SeqCst) {
            break Ending::Interrupted;
        }
        if opts.max_frames.is_some_and(|n| t.frames() >= n) {
            break Ending::FrameLimit;
        }
        let frame = match capture.queue.pop(Duration::from_millis(100)) {
            Next::Frame(f) => f,
            Next::Timeout => {
                if opts.reconnect && last_frame.elapsed() >= opts.stall_timeout {
                    // --reconnect: a stall is not the end. The stalled source
                    // is stopped so the capture thread opens it again, and the
                    // run waits until frames come back (or Ctrl-C).
                    log::warn!(
                        "no frame for {:.0} s; restarting the source and waiting for it",
                        opts.stall_timeout.as_secs_f64()
                    );
                    capture.restart();
                    last_frame = Instant::now();
                    continue;
                }
                if last_frame.elapsed() >= opts.stall_timeout {
                    break Ending::SourceError(format!(
                        "stalled: no frame for {:.0} s",
                        opts.stall_timeout.as_secs_f64()
                    ));
                }
                continue;
            }
            Next::End(End::Finished) => break Ending::EndOfStream,
            Next::End(End::Failed(e)) => break Ending::SourceError(format!("{e:#}")),
        };
        last_frame = Instant::now();
        start.get_or_insert_with(Instant::now);
        let done = crate::panics::catch(
            || format!("frame {}", frame.name),
            || {
                process(
                    pipeline,
                    &frame,
                    &mut t,
                    &mut opts,
                    &mut logs,
                    &mut output_errors,
                    capture.queue.dropped(),
                )
            },
        );
        match done {
            Ok(()) => {}
            Err(e) => {
                // A bad frame is skipped; the stream goes on.
                log::warn!("frame {}: {e:#}; skipped", frame.name);
                t.failed += 1;
                if let Some(l) = &opts.live {
                    l.record_failure();
                }
                continue;
            }
        }
        if t.frames() == opts.warmup.max(1) {
            rss_start = rss_mib();
        }
        let dropped = capture.queue.dropped();
        status.update(t.frames(), || t.line(dropped));
    };
    capture.close();
    status.finish();
    for log in [&mut logs.jsonl, &mut logs.dump] {
        log.flush(&mut output_errors);
    }
    for o in opts.overlays.drain(..) {
        if o.dropped() > 0 {
            log::warn!(
                "{}: {} frame(s) left out, the writer could not keep up",
                o.target(),
                o.dropped()
            );
        }
        if let Some(e) = o.finish() {
            log::error!("{e}");
            output_errors.push(e);
        }
    }
    if let Some(mut l) = opts.live.take() {
        output_errors.extend(l.finish(&ending.to_string()));
    }
    let n = t.keeps.len().max(1) as f64;
    // A run that ended within its warm-up (one image, say) is timed on the
    // warm-up frames rather than not at all; the summary says so.
    let mut warmup = opts.warmup.min(t.frames());
    let warm_timed = t.ersm.is_empty() && !t.warm_ersm.is_empty();
    if warm_timed {
        t.ersm = std::mem::take(&mut t.warm_ersm);
        t.dense = std::mem::take(&mut t.warm_dense);
        warmup = 0;
    }
    let mut stages = std::collections::BTreeMap::new();
    stages.insert("ersm".to_string(), t.ersm.summaries());
    if opts.compare {
        stages.insert("dense".to_string(), t.dense.summaries());
    }
    Ok(RunReport {
        source: opts.source.clone(),
        model: m.manifest.name.clone(),
        device: pipeline.device().name().into(),
        placement: pipeline.placement(),
        threads: pipeline.threads.count(),
        frames: t.frames(),
        dropped: capture.queue.dropped(),
        failed: t.failed,
        skipped: capture.queue.skipped(),
        warmup,
        warm_timed,
        wall_s: start.map_or(0.0, |s| s.elapsed().as_secs_f64()),
        keep_ratio: t.keeps.iter().sum::<f64>() / n,
        keep_ratio_min: t.keeps.iter().copied().fold(f64::NAN, f64::min),
        keep_ratio_max: t.keeps.iter().copied().fold(f64::NAN, f64::max),
        agreement: opts
            .compare
            .then(|| t.agree as f64 / t.frames().max(1) as f64),
        agree_frames: t.agree,
        sure_frames: t.sure,
        sure_agree_frames: t.sure_agree,
        fallback_rate: pipeline
            .fallback
            .map(|_| t.fell_back as f64 / t.frames().max(1) as f64),
        suffix_compute: t.macs / n / m.plan.dense_cost().max(1) as f64,
        faces: (opts.compare && m.reader.is_detector()).then(|| FaceSummary::of(&t.faces)),
        rss_mib_start: rss_start,
        rss_mib_end: rss_mib(),
        ending,
        output_errors,
        stages,
    })
}

/// One frame through ERSM (and dense), recorded everywhere it should be.
fn process(
    pipeline: &Pipeline,
    frame: &Frame,
    t: &mut Tally,
    opts: &mut RunOptions,
    logs: &mut Logs,
    output_errors: &mut Vec<String>,
    dropped: u64,
) -> Result<()> {
    let m = &pipeline.model;
    // Alternate which mode goes first so neither always meets warm caches.
    let (e, d) = if !opts.compare {
        (pipeline.run_ersm(frame)?, None)
    } else if t.frames().is_multiple_of(2) {
        let e = pipeline.run_ersm(frame)?;
        (e, Some(pipeline.run_dense(frame)?))
    } else {
        let d = pipeline.run_dense(frame)?;
        (pipeline.run_ersm(frame)?, Some(d))
    };
    let index = t.frames();
    let timed = index >= opts.warmup;
    if timed {
        t.ersm.push(&e.times);
    } else {
        t.warm_ersm.push(&e.times);
    }
    let keep = e.mask.keep_ratio();
    t.keeps.push(keep);
    let spent = e.suffix_macs(&m.plan) as f64;
    t.macs += spent;
    t.fell_back += usize::from(e.fell_back);
    let answer = m.reader.read(&e.logits, frame.width, frame.height)?;
    let dense = match &d {
        Some(d) => Some(m.reader.read(&d.logits, frame.width, frame.height)?),
        None => None,
    };
    if let Some(d) = &d {
        if timed {
            t.dense.push(&d.times);
        } else {
            t.warm_dense.push(&d.times);
        }
    }
    let compared = dense.as_ref().map(|da| Comparison::of(&answer, da));
    let agrees = compared.map(|c| c.agrees());
    t.agree += usize::from(agrees == Some(true));
    let dense_margin = match &dense {
        Some(crate::answer::Answer::Class { margin, .. }) => Some(f64::from(*margin)),
        _ => None,
    };
    match compared {
        Some(Comparison::Class { agree, sure: true }) => {
            t.sure += 1;
            t.sure_agree += usize::from(agree);
        }
        Some(Comparison::Faces(a)) => t.faces.add(&a),
        _ => {}
    }
    let label = answer.label(&m.manifest);
    let dense_label = dense.as_ref().map(|a| a.label(&m.manifest));
    log::debug!(
        "{}: '{label}'{} keep {keep:.3} | ersm: pre {:.2} prefix {:.2} ersm {:.2} suffix {:.2} ms{}",
        frame.name,
        dense_label.as_ref().map_or(String::new(), |l| format!(" (dense '{l}')")),
        e.times.preprocess,
        e.times.prefix,
        e.times.ersm,
        e.times.suffix,
        d.as_ref().map_or(String::new(), |d| format!(
            " | dense: pre {:.2} prefix {:.2} suffix {:.2} ms",
            d.times.preprocess, d.times.prefix, d.times.suffix
        )),
    );
    if logs.jsonl.is_open() {
        let rec = JsonRecord {
            frame: index,
            name: &frame.name,
            width: frame.width,
            height: frame.height,
            keep_ratio: keep,
            kept_tokens: e.mask.kept.len(),
            top1: answer.class(),
            label: label.clone(),
            dense_top1: dense.as_ref().and_then(|a| a.class()),
            faces: m
                .reader
                .is_detector()
                .then(|| answer.faces().iter().map(FaceJson::of).collect()),
            dense_faces: dense
                .as_ref()
                .filter(|_| m.reader.is_detector())
                .map(|a| a.faces().iter().map(FaceJson::of).collect()),
            agree: agrees,
            dense_margin,
            fell_back: e.fell_back,
            warmup: !timed,
            rss_mib: rss_mib(),
            ersm_ms: StageMs::of(&e.times),
            dense_ms: d.as_ref().map(|d| StageMs::of(&d.times)),
        };
        let rec = serde_json::to_string(&rec).context("--jsonl record")?;
        logs.jsonl.line(&rec, output_errors);
    }
    if logs.dump.is_open() {
        let rec = crate::record::dump_line(
            &frame.name,
            &e.mask.kept,
            (&answer, &e.logits),
            d.as_ref()
                .zip(dense.as_ref())
                .map(|(d, a)| (a, d.logits.as_slice())),
            m.reader.is_detector(),
        );
        logs.dump.line(&rec.to_string(), output_errors);
    }
    // Recent medians read steadier than one frame's time; during warm-up
    // there are none yet.
    let steady = |p50: f64, now: f64| if p50.is_finite() { p50 } else { now };
    let ersm_ms = steady(t.ersm.recent_p50("total", 30), e.times.total());
    let dense_ms = d
        .as_ref()
        .map(|d| steady(t.dense.recent_p50("total", 30), d.times.total()));
    let lines = || {
        caption::compose(
            &label,
            dense_label.as_deref(),
            keep,
            (ersm_ms, dense_ms),
            e.fell_back,
        )
    };
    // What the outputs show of the faces: this frame's, and with
    // --anonymize those seen in the last few frames.
    let shown = match opts.anonymize {
        Some(_) => opts.hold.update(answer.faces()),
        None => answer.faces().to_vec(),
    };
    if !opts.overlays.is_empty() {
        let img = overlay::picture(
            frame,
            &e.mask,
            &m.manifest.preprocess,
            &shown,
            opts.anonymize,
            &lines(),
        );
        // A full disk or a dead encoder stops that output, not the run; a
        // writer that has stopped reading drops frames instead of waiting.
        let mut i = 0;
        while i < opts.overlays.len() {
            if opts.overlays[i].send((img.clone(), frame.width, frame.height)) {
                i += 1;
            } else {
                let o = opts.overlays.remove(i);
                let target = o.target().to_string();
                let e = o
                    .finish()
                    .unwrap_or_else(|| format!("{target}: the writer ended early"));
                log::error!("{e}; no more frames written there");
                output_errors.push(e);
            }
        }
    }
    if let Some(live) = &opts.live {
        live.record(
            FrameRecord {
                index,
                name: frame.name.clone(),
                ersm: e.times,
                dense: d.as_ref().map(|d| d.times),
                keep,
                label: label.clone(),
                dense_label: dense_label.clone(),
                agree: agrees,
                faces: match compared {
                    Some(Comparison::Faces(a)) => Some(a),
                    _ => None,
                },
                fell_back: e.fell_back,
                suffix_compute: spent / m.plan.dense_cost().max(1) as f64,
                warmup: !timed,
            },
            dropped,
        );
        if live.wants_picture() {
            // Only what the overlay needs: the gathered features stay here.
            let mask = crate::ersm::TokenMask {
                features: Vec::new(),
                energies: e.mask.energies.clone(),
                kept: e.mask.kept.clone(),
                ..e.mask
            };
            live.offer(Shot {
                frame: frame.clone(),
                mask,
                caption: lines(),
                faces: shown,
                cover: opts.anonymize,
            });
        }
    }
    Ok(())
}
