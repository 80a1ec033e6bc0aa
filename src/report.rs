//! Latency statistics, the per-stage table, and the JSON report of `ersm bench`.

use crate::logits::SURE_MARGIN;
use crate::pipeline::StageTimes;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Percentile of `v` (nearest rank), `q` in 0..=100.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// p50, p95 and p99 of one stage, milliseconds.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Summary {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

impl Summary {
    /// Summarises samples.
    pub fn of(v: &[f64]) -> Summary {
        Summary {
            p50_ms: percentile(v, 50.0),
            p95_ms: percentile(v, 95.0),
            p99_ms: percentile(v, 99.0),
        }
    }
}

/// The stages of the table, in order.
pub const STAGES: [&str; 5] = ["preprocess", "prefix", "ersm", "suffix", "total"];

/// Per-stage samples of one mode.
#[derive(Clone, Debug, Default)]
pub struct StageSamples {
    samples: BTreeMap<&'static str, Vec<f64>>,
}

impl StageSamples {
    /// Records one frame.
    pub fn push(&mut self, t: &StageTimes) {
        for (k, v) in [
            ("preprocess", t.preprocess),
            ("prefix", t.prefix),
            ("ersm", t.ersm),
            ("suffix", t.suffix),
            ("total", t.total()),
            // The network alone, as other runtimes time it (no pre-processing).
            ("network", t.prefix + t.ersm + t.suffix),
        ] {
            self.samples.entry(k).or_default().push(v);
        }
        if t.ersm_kernel > 0.0 {
            self.samples
                .entry("ersm_kernel")
                .or_default()
                .push(t.ersm_kernel);
        }
    }

    /// Summary per stage.
    pub fn summaries(&self) -> BTreeMap<String, Summary> {
        self.samples
            .iter()
            .map(|(k, v)| (k.to_string(), Summary::of(v)))
            .collect()
    }

    /// The raw samples of one stage, ms.
    pub fn samples(&self, stage: &str) -> &[f64] {
        self.samples.get(stage).map_or(&[], Vec::as_slice)
    }

    /// Frames recorded.
    pub fn len(&self) -> usize {
        self.samples.get("total").map_or(0, Vec::len)
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// p50 over the last `n` frames of one stage (the rolling status line).
    pub fn recent_p50(&self, stage: &str, n: usize) -> f64 {
        self.samples.get(stage).map_or(f64::NAN, |v| {
            percentile(&v[v.len().saturating_sub(n)..], 50.0)
        })
    }

    /// p50 of one stage.
    pub fn p50(&self, stage: &str) -> f64 {
        self.samples
            .get(stage)
            .map_or(f64::NAN, |v| percentile(v, 50.0))
    }
}

/// The result of `ersm bench`, as written to `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub device: String,
    /// Where each stage ran (`Pipeline::placement`).
    pub placement: String,
    /// Threads the prefix, the sparse suffix and the dense baseline ran on.
    pub threads: usize,
    /// Frames timed (failed ones left out).
    pub frames: usize,
    /// Frames that failed (non-finite values, a panic), named in the log.
    pub failed: usize,
    /// Mean fraction of tokens kept.
    pub keep_ratio: f64,
    pub keep_ratio_min: f64,
    pub keep_ratio_max: f64,
    /// Amdahl bound from the dense prefix/suffix split at this keep ratio.
    pub ideal_speedup: f64,
    /// Dense total p50 over ERSM total p50.
    pub speedup: f64,
    /// Dense suffix p50 over sparse suffix p50.
    pub suffix_speedup: f64,
    /// Fraction of frames whose answer is the dense one: the same top-1
    /// class, or exactly the dense faces.
    pub agreement: f64,
    /// A detector's faces against dense's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faces: Option<FaceSummary>,
    /// Suffix multiply-accumulates: dense, and mean per ERSM frame (the
    /// sparse suffix plus, on frames that fell back, the dense one).
    pub suffix_macs_dense: u64,
    pub suffix_macs_ersm: f64,
    /// Multiply-adds of the energy layer's unary head per frame (ERSM only;
    /// beside the suffix's, not in them).
    pub energy_macs: u64,
    /// Fraction of frames the confidence fallback re-ran densely (absent when off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_rate: Option<f64>,
    /// Per mode ("ersm", "dense"), per stage.
    pub stages: BTreeMap<String, BTreeMap<String, Summary>>,
}

impl BenchReport {
    /// The suffix speed-up over what its MAC ratio promises (1 = every MAC
    /// saved is time saved; the dense suffix is tract's).
    pub fn suffix_efficiency(&self) -> f64 {
        let ideal = self.suffix_macs_dense as f64 / self.suffix_macs_ersm.max(1.0);
        self.suffix_speedup / ideal
    }
}

/// Amdahl: only the suffix shrinks with the keep ratio.
pub fn ideal_speedup(dense: &StageSamples, keep: f64) -> f64 {
    let (pre, prefix, suffix) = (
        dense.p50("preprocess"),
        dense.p50("prefix"),
        dense.p50("suffix"),
    );
    (pre + prefix + suffix) / (pre + prefix + keep * suffix)
}

impl BenchReport {
    /// The jetson-inference style timing table and the summary lines.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let rule = "-".repeat(72);
        let _ = writeln!(s, "{rule}");
        let _ = writeln!(
            s,
            " Timing Report  model {}  device {}  threads {}  frames {}{}",
            self.model,
            self.device,
            self.threads,
            self.frames,
            if self.failed > 0 {
                format!(" ({} failed)", self.failed)
            } else {
                String::new()
            }
        );
        let _ = writeln!(s, " {}", self.placement);
        let _ = writeln!(s, "{rule}");
        let _ = writeln!(
            s,
            " {:<12}|{:>13}{:>13} |{:>13}{:>13}",
            "stage", "ERSM p50", "p95", "dense p50", "p95"
        );
        let names = ["Pre-Process", "Prefix", "ERSM", "Suffix", "Total"];
        for (stage, name) in STAGES.iter().zip(names) {
            let get = |mode: &str| self.stages.get(mode).and_then(|m| m.get(*stage)).copied();
            let cell = |x: Option<Summary>, dense_ersm: bool| match x {
                _ if dense_ersm => format!("{:>13}{:>13}", "-", "-"),
                Some(x) => format!("{:>10.3} ms{:>10.3} ms", x.p50_ms, x.p95_ms),
                None => format!("{:>13}{:>13}", "n/a", "n/a"),
            };
            let _ = writeln!(
                s,
                " {:<12}|{} |{}",
                name,
                cell(get("ersm"), false),
                cell(get("dense"), *stage == "ersm")
            );
        }
        let fps = |mode: &str| {
            self.stages
                .get(mode)
                .and_then(|m| m.get("total"))
                .map_or(f64::NAN, |t| 1e3 / t.p50_ms)
        };
        let _ = writeln!(
            s,
            " {:<12}|{:>13.1}{:>13} |{:>13.1}{:>13}",
            "FPS",
            fps("ersm"),
            "",
            fps("dense"),
            ""
        );
        let _ = writeln!(s, "{rule}");
        let _ = writeln!(
            s,
            " keep ratio      {:.3} mean ({:.3} .. {:.3})   suffix MACs {:.2}M dense, {:.2}M ERSM (+{:.2}M energy layer)",
            self.keep_ratio,
            self.keep_ratio_min,
            self.keep_ratio_max,
            self.suffix_macs_dense as f64 / 1e6,
            self.suffix_macs_ersm / 1e6,
            self.energy_macs as f64 / 1e6
        );
        let _ = writeln!(
            s,
            " speedup         {:.2}x end to end, {:.2}x suffix   (ideal at this keep ratio: {:.2}x)",
            self.speedup, self.suffix_speedup, self.ideal_speedup
        );
        // With fallbacks the suffix may spend more than the dense one.
        let ratio = self.suffix_macs_dense as f64 / self.suffix_macs_ersm.max(1.0);
        let macs = if ratio >= 1.0 {
            format!("{ratio:.2}x fewer MACs")
        } else {
            format!("{:.2}x more MACs", 1.0 / ratio)
        };
        let _ = writeln!(
            s,
            " sparse suffix   {:.2} of its MAC-ratio ideal ({macs})",
            self.suffix_efficiency()
        );
        if let Some(rate) = self.fallback_rate {
            let _ = writeln!(
                s,
                " fallback        {:.1} % of frames re-run densely; effective suffix compute {:.3} of dense",
                rate * 100.0,
                self.suffix_macs_ersm / self.suffix_macs_dense.max(1) as f64
            );
        }
        match &self.faces {
            Some(f) => {
                let _ = writeln!(s, " {}", f.line());
            }
            None => {
                let _ = writeln!(
                    s,
                    " top-1 agreement {:.1} % with dense",
                    self.agreement * 100.0
                );
            }
        }
        let _ = writeln!(s, "{rule}");
        let _ = write!(s, " (p50/p95 of wall-clock time per frame; on a Jetson, lock clocks with jetson_clocks for stable figures)");
        s
    }
}

/// How a `run` ended.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub enum Ending {
    /// The file or folder was read to its end.
    EndOfStream,
    /// Ctrl-C.
    Interrupted,
    /// `--max-frames` reached.
    FrameLimit,
    /// The source failed; the message says how.
    SourceError(String),
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::EndOfStream => write!(f, "end of stream"),
            Ending::Interrupted => write!(f, "interrupted (Ctrl-C)"),
            Ending::FrameLimit => write!(f, "frame limit reached"),
            Ending::SourceError(e) => write!(f, "source error: {e}"),
        }
    }
}

/// The end-of-run summary of `ersm run`.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub source: String,
    pub model: String,
    pub device: String,
    /// Where each stage ran (`Pipeline::placement`).
    pub placement: String,
    /// Threads the prefix, the sparse suffix and the dense baseline ran on.
    pub threads: usize,
    /// Frames run through ERSM (and dense, when compared).
    pub frames: usize,
    /// Frames the capture queue dropped because inference fell behind.
    pub dropped: u64,
    /// Frames that could not be processed (logged and skipped).
    pub failed: usize,
    /// Inputs the source could not read (undecodable images), logged and skipped.
    pub skipped: u64,
    /// Untimed warm-up frames at the start (in `frames`, not in the percentiles).
    pub warmup: usize,
    /// The run ended within its warm-up, so the warm-up frames are the
    /// percentiles' (caches were cold for them).
    pub warm_timed: bool,
    /// Wall-clock seconds from the first frame to the end.
    pub wall_s: f64,
    pub keep_ratio: f64,
    pub keep_ratio_min: f64,
    pub keep_ratio_max: f64,
    /// Top-1 agreement with dense, when compared.
    pub agreement: Option<f64>,
    pub agree_frames: usize,
    /// Frames the dense network is sure of (top-1 margin at least
    /// `SURE_MARGIN`), and how many of them ERSM agrees on: the agreement
    /// that measures ERSM's error rather than the reference's near-ties.
    pub sure_frames: usize,
    pub sure_agree_frames: usize,
    /// Fraction of frames the confidence fallback re-ran densely (absent when off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_rate: Option<f64>,
    /// Mean suffix compute per frame as a fraction of the dense suffix's
    /// (sparse plus fallback multiply-accumulates).
    pub suffix_compute: f64,
    /// A detector's faces against the dense baseline's, when compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faces: Option<FaceSummary>,
    /// Resident memory (MiB) after warm-up and at the end.
    pub rss_mib_start: f64,
    pub rss_mib_end: f64,
    pub ending: Ending,
    /// Outputs (`--jsonl`, `--overlay`) that failed during the run; the run
    /// still summarises, then exits non-zero.
    pub output_errors: Vec<String>,
    /// Per mode ("ersm", "dense"), per stage.
    pub stages: BTreeMap<String, BTreeMap<String, Summary>>,
}

impl RunReport {
    /// Frames in the latency percentiles (processed, after warm-up).
    pub fn timed(&self) -> usize {
        self.frames.saturating_sub(self.warmup)
    }

    /// The stage rows, FPS and speed-up of [`RunReport::table`].
    fn stage_table(&self, s: &mut String, dense: bool, rule: &str) {
        let _ = writeln!(
            s,
            " {:<12}|{:>10}{:>10}{:>10} |{:>10}{:>10}{:>10}   (ms)",
            "stage", "ERSM p50", "p95", "p99", "dense p50", "p95", "p99"
        );
        let names = ["Pre-Process", "Prefix", "ERSM", "Suffix", "Total"];
        let get =
            |mode: &str, stage: &str| self.stages.get(mode).and_then(|m| m.get(stage)).copied();
        let cell = |x: Option<Summary>| match x {
            Some(x) => format!("{:>10.3}{:>10.3}{:>10.3}", x.p50_ms, x.p95_ms, x.p99_ms),
            None => format!("{:>10}{:>10}{:>10}", "-", "-", "-"),
        };
        for (stage, name) in STAGES.iter().zip(names) {
            let d = if *stage == "ersm" {
                None
            } else {
                get("dense", stage)
            };
            let _ = writeln!(s, " {:<12}|{} |{}", name, cell(get("ersm", stage)), cell(d));
        }
        if let Some(k) = get("ersm", "ersm_kernel") {
            let _ = writeln!(s, " {:<12}|{} |{}", " (kernel)", cell(Some(k)), cell(None));
        }
        let fps = |mode: &str| get(mode, "total").map_or(f64::NAN, |t| 1e3 / t.p50_ms);
        let _ = writeln!(
            s,
            " {:<12}|{:>10.1}{:>20} |{:>10}{:>20}",
            "FPS",
            fps("ersm"),
            "",
            if dense {
                format!("{:.1}", fps("dense"))
            } else {
                "-".into()
            },
            ""
        );
        let _ = writeln!(s, "{rule}");
        if dense {
            let _ = writeln!(
                s,
                " speedup         {:.2}x end to end (p50), {:.2}x suffix",
                get("dense", "total").map_or(f64::NAN, |t| t.p50_ms)
                    / get("ersm", "total").map_or(f64::NAN, |t| t.p50_ms),
                get("dense", "suffix").map_or(f64::NAN, |t| t.p50_ms)
                    / get("ersm", "suffix").map_or(f64::NAN, |t| t.p50_ms),
            );
        }
    }

    /// The per-stage table, ERSM beside dense, and the run's totals.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let rule = "-".repeat(94);
        let dense = self.stages.contains_key("dense");
        let _ = writeln!(s, "{rule}");
        let _ = writeln!(
            s,
            " ersm run  source {}\n           model {}  threads {}\n           {}",
            self.source, self.model, self.threads, self.placement
        );
        let _ = writeln!(s, "{rule}");
        if self.frames == 0 {
            let _ = writeln!(
                s,
                " no frame was processed ({} failed, {} dropped, {} unreadable inputs skipped): nothing to summarise",
                self.failed, self.dropped, self.skipped
            );
            let _ = writeln!(s, " ended           {}", self.ending);
            let _ = write!(s, "{rule}");
            return s;
        }
        self.stage_table(&mut s, dense, &rule);
        let _ = writeln!(
            s,
            " frames          {} processed, {} dropped, {} failed, {} unreadable skipped in {:.1} s ({:.1} frames/s through the loop{})",
            self.frames,
            self.dropped,
            self.failed,
            self.skipped,
            self.wall_s,
            self.frames as f64 / self.wall_s.max(1e-9),
            if dense { ", both modes" } else { "" }
        );
        let _ = writeln!(
            s,
            " keep ratio      {:.3} mean ({:.3} .. {:.3}); suffix compute {:.3} of dense",
            self.keep_ratio, self.keep_ratio_min, self.keep_ratio_max, self.suffix_compute
        );
        if let Some(r) = self.fallback_rate {
            let _ = writeln!(
                s,
                " fallback        {:.1} % of frames re-run densely (in the compute above)",
                r * 100.0
            );
        }
        if let Some(f) = &self.faces {
            let _ = writeln!(s, " {}", f.line());
            if let Some(a) = self.agreement {
                let _ = writeln!(
                    s,
                    "                 {:.1} % of frames with exactly dense's faces ({} of {})",
                    a * 100.0,
                    self.agree_frames,
                    self.frames
                );
            }
        } else if let Some(a) = self.agreement {
            let _ = writeln!(
                s,
                " top-1 agreement {:.1} % with dense ({} of {} frames)",
                a * 100.0,
                self.agree_frames,
                self.frames
            );
            let _ = writeln!(
                s,
                "                 {} on the {} frame(s) the dense network is sure of (top-1 margin >= {SURE_MARGIN})",
                match self.sure_frames {
                    0 => "-".to_string(),
                    n => format!("{:.1} %", 100.0 * self.sure_agree_frames as f64 / n as f64),
                },
                self.sure_frames
            );
        }
        let _ = writeln!(
            s,
            " memory          RSS {:.0} MiB after warm-up, {:.0} MiB at the end",
            self.rss_mib_start, self.rss_mib_end
        );
        let _ = writeln!(s, " ended           {}", self.ending);
        for e in &self.output_errors {
            let _ = writeln!(s, " output failed   {e}");
        }
        let _ = writeln!(s, "{rule}");
        let warm = if self.warm_timed {
            "the run ended within the warm-up, so they are the warm-up frames (cold caches: slower than steady state)".to_string()
        } else {
            format!("after {} warm-up", self.warmup)
        };
        let _ = write!(
            s,
            " (percentiles over {} frames {warm}; dense and ERSM alternate which runs first)",
            self.timed()
        );
        s
    }
}

/// Resident set size of this process, MiB (0 where unknown).
pub fn rss_mib() -> f64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as f64;
    pages * page / (1024.0 * 1024.0)
}

/// A detector's faces against the dense baseline's over a run: dense's
/// faces matched one to one (IoU ≥ 0.5). Recall leads: a face dense finds
/// and ERSM misses is one left uncovered.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct FaceSummary {
    pub recall: f64,
    pub precision: f64,
    pub f1: f64,
    /// Mean IoU of the matched pairs (absent without any).
    pub mean_iou: Option<f64>,
    pub dense_faces: usize,
    pub ersm_faces: usize,
    pub matched: usize,
}

impl FaceSummary {
    /// The summary of summed per-frame agreements.
    pub fn of(a: &crate::detect::Agreement) -> FaceSummary {
        FaceSummary {
            recall: a.recall(),
            precision: a.precision(),
            f1: a.f1(),
            mean_iou: a.mean_iou(),
            dense_faces: a.reference,
            ersm_faces: a.found,
            matched: a.matched,
        }
    }

    /// One line for summaries: recall first.
    pub fn line(&self) -> String {
        format!(
            "faces: recall {:.3} of {} dense faces, precision {:.3}, F1 {:.3}, mean IoU {}",
            self.recall,
            self.dense_faces,
            self.precision,
            self.f1,
            self.mean_iou.map_or("-".into(), |v| format!("{v:.3}"))
        )
    }
}
