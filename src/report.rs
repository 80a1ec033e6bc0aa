//! Latency statistics, the per-stage table, and the JSON report of `ersm bench`.

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

/// p50 and p95 of one stage, milliseconds.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Summary {
    pub p50_ms: f64,
    pub p95_ms: f64,
}

impl Summary {
    /// Summarises samples.
    pub fn of(v: &[f64]) -> Summary {
        Summary {
            p50_ms: percentile(v, 50.0),
            p95_ms: percentile(v, 95.0),
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
    pub frames: usize,
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
    /// Fraction of frames whose top-1 class is the dense one.
    pub agreement: f64,
    /// Suffix multiply-accumulates: dense, and mean per ERSM frame.
    pub suffix_macs_dense: u64,
    pub suffix_macs_ersm: f64,
    /// Per mode ("ersm", "dense"), per stage.
    pub stages: BTreeMap<String, BTreeMap<String, Summary>>,
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
            " Timing Report  model {}  device {}  frames {}",
            self.model, self.device, self.frames
        );
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
            " keep ratio      {:.3} mean ({:.3} .. {:.3})   suffix MACs {:.2}M dense, {:.2}M ERSM",
            self.keep_ratio,
            self.keep_ratio_min,
            self.keep_ratio_max,
            self.suffix_macs_dense as f64 / 1e6,
            self.suffix_macs_ersm / 1e6
        );
        let _ = writeln!(
            s,
            " speedup         {:.2}x end to end, {:.2}x suffix   (ideal at this keep ratio: {:.2}x)",
            self.speedup, self.suffix_speedup, self.ideal_speedup
        );
        let _ = writeln!(
            s,
            " top-1 agreement {:.1} % with dense",
            self.agreement * 100.0
        );
        let _ = writeln!(s, "{rule}");
        let _ = write!(s, " (p50/p95 of wall-clock time per frame; on a Jetson, lock clocks with jetson_clocks for stable figures)");
        s
    }
}
