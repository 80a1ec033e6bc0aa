//! `ersm bench`'s loop: ERSM and the dense baseline on the same frames, one
//! after the other (alternating which goes first), timed per stage, into a
//! [`BenchReport`] with both modes' samples.

use crate::answer::Comparison;
use crate::detect::Agreement;
use crate::pipeline::Pipeline;
use crate::report::{ideal_speedup, BenchReport, FaceSummary, StageSamples};
use crate::source::Frame;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;

/// How a benchmark runs.
pub struct BenchOptions {
    /// Frames timed per mode (the frames are cycled).
    pub frames: usize,
    /// Untimed frames per mode first.
    pub warmup: usize,
    /// A file for every timed frame's kept tokens and both modes' logits,
    /// one JSON record per line.
    pub dump: Option<PathBuf>,
}

/// A benchmark's report and both modes' per-stage samples.
pub struct Bench {
    pub report: BenchReport,
    pub ersm: StageSamples,
    pub dense: StageSamples,
}

/// Times `pipeline` on `frames`. A frame that fails is named in the log and
/// left out of every statistic; none timed is an error.
pub fn run(pipeline: &Pipeline, frames: &[Frame], opts: &BenchOptions) -> Result<Bench> {
    anyhow::ensure!(!frames.is_empty(), "no image could be decoded");
    let m = &pipeline.model;
    let mut dump = match &opts.dump {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("--dump {}", p.display()))?,
        )),
        None => None,
    };
    let (mut ersm, mut dense) = (StageSamples::default(), StageSamples::default());
    let (mut keeps, mut agree, mut macs, mut fell) = (Vec::new(), 0usize, 0f64, 0usize);
    let mut failed = 0usize;
    let mut faces = Agreement::default();
    for i in 0..opts.warmup + opts.frames {
        let frame = &frames[i % frames.len()];
        // Alternate which mode goes first so neither always runs on warm caches.
        let both = crate::panics::catch(
            || format!("frame {}", frame.name),
            || {
                Ok(if i % 2 == 0 {
                    let e = pipeline.run_ersm(frame)?;
                    (e, pipeline.run_dense(frame)?)
                } else {
                    let d = pipeline.run_dense(frame)?;
                    (pipeline.run_ersm(frame)?, d)
                })
            },
        );
        let (e, d) = match both {
            Ok(r) => r,
            Err(err) => {
                log::warn!("frame {}: {err:#}; skipped", frame.name);
                failed += 1;
                continue;
            }
        };
        if i < opts.warmup {
            continue;
        }
        ersm.push(&e.times);
        dense.push(&d.times);
        keeps.push(e.mask.keep_ratio());
        let (w, h) = (frame.width, frame.height);
        let answer = m.reader.read(&e.logits, w, h)?;
        let dense_answer = m.reader.read(&d.logits, w, h)?;
        let compared = Comparison::of(&answer, &dense_answer);
        agree += usize::from(compared.agrees());
        if let Comparison::Faces(a) = compared {
            faces.add(&a);
        }
        if let Some(w) = dump.as_mut() {
            let rec = crate::record::dump_line(
                &frame.name,
                &e.mask.kept,
                (&answer, &e.logits),
                Some((&dense_answer, &d.logits)),
                m.reader.is_detector(),
            );
            writeln!(w, "{rec}").context("--dump")?;
        }
        macs += e.suffix_macs(&m.plan) as f64;
        fell += usize::from(e.fell_back);
        log::debug!(
            "{}: {} (dense {}), keep {:.3}",
            frame.name,
            answer.label(&m.manifest),
            dense_answer.label(&m.manifest),
            e.mask.keep_ratio()
        );
    }
    anyhow::ensure!(
        !keeps.is_empty(),
        "no frame could be timed ({failed} failed; the log names why)"
    );
    if let Some(w) = dump.as_mut() {
        w.flush().context("--dump")?;
    }
    let n = keeps.len() as f64;
    let keep = keeps.iter().sum::<f64>() / n;
    let report = BenchReport {
        model: m.manifest.name.clone(),
        device: pipeline.device().name().into(),
        placement: pipeline.placement(),
        threads: pipeline.threads.count(),
        frames: keeps.len(),
        failed,
        keep_ratio: keep,
        keep_ratio_min: keeps.iter().copied().fold(f64::INFINITY, f64::min),
        keep_ratio_max: keeps.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        ideal_speedup: ideal_speedup(&dense, keep),
        speedup: dense.p50("total") / ersm.p50("total"),
        suffix_speedup: dense.p50("suffix") / ersm.p50("suffix"),
        agreement: agree as f64 / n,
        faces: m.reader.is_detector().then(|| FaceSummary::of(&faces)),
        suffix_macs_dense: m.plan.dense_cost(),
        suffix_macs_ersm: macs / n,
        energy_macs: m.energy.head.macs(m.cut.h, m.cut.w),
        fallback_rate: pipeline.fallback.map(|_| fell as f64 / n),
        stages: [
            ("ersm".to_string(), ersm.summaries()),
            ("dense".to_string(), dense.summaries()),
        ]
        .into(),
    };
    Ok(Bench {
        report,
        ersm,
        dense,
    })
}
