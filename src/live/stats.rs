//! What a running `ersm run` reports while it runs: counters, latency
//! histograms and a short history, updated once a frame by the run and read
//! by the HTTP server as `/metrics` (Prometheus text) and `/status` (JSON).

use crate::pipeline::StageTimes;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::fmt::Write;
use std::time::Instant;

/// Latency bucket bounds, seconds (Prometheus `le`): 1 ms to 5 s, covering a
/// fast GPU frame and a slow CPU one.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0, 5.0,
];
/// Keep-ratio bucket bounds.
const KEEP_BUCKETS: [f64; 10] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];
/// Frames kept for the viewer's plots.
pub const HISTORY: usize = 300;
/// Stages reported per path, in pipeline order.
const STAGES: [&str; 5] = ["preprocess", "prefix", "ersm", "suffix", "total"];

/// A Prometheus histogram: counts per bucket (not cumulative), sum and count.
#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// The `_bucket`, `_sum` and `_count` lines, `labels` inside the braces.
    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// What the run is, fixed at start.
#[derive(Clone, Debug, Default)]
pub struct Info {
    pub model: String,
    pub source: String,
    pub device: String,
    pub threads: usize,
    /// The dense baseline runs beside ERSM.
    pub compare: bool,
    /// The confidence fallback is on.
    pub fallback: bool,
}

/// One processed frame, as the run saw it.
#[derive(Clone, Debug, Default)]
pub struct FrameRecord {
    pub index: usize,
    pub name: String,
    pub ersm: StageTimes,
    pub dense: Option<StageTimes>,
    pub keep: f64,
    pub label: String,
    pub dense_label: Option<String>,
    pub agree: Option<bool>,
    /// A detector's faces against dense's on this frame, when compared.
    pub faces: Option<crate::detect::Agreement>,
    pub fell_back: bool,
    /// Suffix compute spent on this frame as a fraction of the dense suffix.
    pub suffix_compute: f64,
    /// Left out of the latency statistics.
    pub warmup: bool,
}

/// One point of the viewer's plots.
#[derive(Clone, Copy, Debug)]
struct Point {
    frame: usize,
    ersm_ms: f64,
    dense_ms: Option<f64>,
    keep: f64,
}

/// Everything `/metrics` and `/status` say.
#[derive(Debug)]
pub struct Stats {
    info: Info,
    started: Instant,
    frames: u64,
    failed: u64,
    capture_dropped: u64,
    live_dropped: u64,
    compared: u64,
    agreed: u64,
    /// A detector's faces against dense's, summed over compared frames.
    faces: Option<crate::detect::Agreement>,
    fell_back: u64,
    keep_sum: f64,
    compute_sum: f64,
    keep: Histogram,
    /// `[path][stage]`, path 0 = ersm, 1 = dense.
    latency: [Vec<Histogram>; 2],
    recent: VecDeque<Point>,
    last: Option<FrameRecord>,
    viewers: usize,
    rss_bytes: f64,
    ended: Option<String>,
    /// Outputs that failed while the run went on, each with why.
    output_errors: Vec<String>,
}

impl Stats {
    /// Empty statistics for the run `info` describes.
    pub fn new(info: Info) -> Stats {
        let per_stage = || {
            STAGES
                .iter()
                .map(|_| Histogram::new(&LATENCY_BUCKETS))
                .collect()
        };
        Stats {
            info,
            started: Instant::now(),
            frames: 0,
            failed: 0,
            capture_dropped: 0,
            live_dropped: 0,
            compared: 0,
            agreed: 0,
            faces: None,
            fell_back: 0,
            keep_sum: 0.0,
            compute_sum: 0.0,
            keep: Histogram::new(&KEEP_BUCKETS),
            latency: [per_stage(), per_stage()],
            recent: VecDeque::with_capacity(HISTORY),
            last: None,
            viewers: 0,
            rss_bytes: 0.0,
            ended: None,
            output_errors: Vec::new(),
        }
    }

    /// Records an output that failed (an RTSP server that refused, an
    /// encoder that died): `/status` lists it, `/metrics` counts it.
    pub fn record_output_error(&mut self, what: String) {
        self.output_errors.push(what);
    }

    /// Records one processed frame.
    pub fn record(&mut self, r: FrameRecord) {
        self.frames += 1;
        self.keep_sum += r.keep;
        self.compute_sum += r.suffix_compute;
        self.keep.observe(r.keep);
        self.fell_back += u64::from(r.fell_back);
        if let Some(a) = r.agree {
            self.compared += 1;
            self.agreed += u64::from(a);
        }
        if let Some(f) = &r.faces {
            self.faces.get_or_insert_with(Default::default).add(f);
        }
        if !r.warmup {
            observe(&mut self.latency[0], &r.ersm);
            if let Some(d) = &r.dense {
                observe(&mut self.latency[1], d);
            }
        }
        if self.recent.len() == HISTORY {
            self.recent.pop_front();
        }
        self.recent.push_back(Point {
            frame: r.index,
            ersm_ms: r.ersm.total(),
            dense_ms: r.dense.map(|d| d.total()),
            keep: r.keep,
        });
        self.last = Some(r);
    }

    /// A frame that failed and was skipped.
    pub fn record_failure(&mut self) {
        self.failed += 1;
    }

    /// Frames the capture queue has dropped so far (it counts them itself).
    pub fn set_capture_dropped(&mut self, n: u64) {
        self.capture_dropped = n;
    }

    /// A frame the live outputs skipped because they were still busy.
    pub fn record_live_drop(&mut self) {
        self.live_dropped += 1;
    }

    /// MJPEG viewers now connected.
    pub fn set_viewers(&mut self, n: usize) {
        self.viewers = n;
    }

    /// Resident memory of the process.
    pub fn set_rss_bytes(&mut self, b: f64) {
        self.rss_bytes = b;
    }

    /// The run is over, and why.
    pub fn end(&mut self, why: &str) {
        self.ended = Some(why.to_string());
    }

    /// Frames processed.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Frames processed, failed, dropped by the capture queue, and skipped
    /// by the live outputs.
    pub fn counts(&self) -> [u64; 4] {
        [
            self.frames,
            self.failed,
            self.capture_dropped,
            self.live_dropped,
        ]
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn prometheus(&self) -> String {
        let mut o = String::with_capacity(8192);
        let esc = |s: &str| {
            s.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
        };
        let info = format!(
            "model=\"{}\",source=\"{}\",device=\"{}\",threads=\"{}\"",
            esc(&self.info.model),
            esc(&self.info.source),
            esc(&self.info.device),
            self.info.threads
        );
        let _ = writeln!(
            o,
            "# HELP ersm_info The run: model, source, device, worker threads.\n\
             # TYPE ersm_info gauge\nersm_info{{{info}}} 1"
        );
        let n = self.frames.max(1) as f64;
        let last_keep = self.last.as_ref().map_or(f64::NAN, |l| l.keep);
        // (name, type, help, value); the dense and fallback series only when
        // the run has them.
        let mut simple: Vec<(&str, &str, &str, f64)> =
            vec![
            ("ersm_uptime_seconds", "gauge", "Seconds since the run started.",
             self.started.elapsed().as_secs_f64()),
            ("ersm_frames_total", "counter", "Frames processed.", self.frames as f64),
            (
                "ersm_output_errors_total",
                "counter",
                "Outputs (streams, files) that failed.",
                self.output_errors.len() as f64,
            ),
            ("ersm_failed_frames_total", "counter", "Frames that failed and were skipped.",
             self.failed as f64),
            ("ersm_capture_dropped_frames_total", "counter",
             "Frames the capture queue dropped because inference fell behind.",
             self.capture_dropped as f64),
            ("ersm_live_dropped_frames_total", "counter",
             "Processed frames the live outputs skipped because they were still busy.",
             self.live_dropped as f64),
            ("ersm_keep_ratio", "gauge", "Fraction of tokens kept on the last frame.", last_keep),
            ("ersm_suffix_compute_ratio", "gauge",
             "Mean suffix compute spent (fallbacks included) as a fraction of the dense suffix.",
             self.compute_sum / n),
            ("ersm_stream_viewers", "gauge", "MJPEG viewers connected.", self.viewers as f64),
            ("ersm_resident_memory_bytes", "gauge", "Resident memory of the process.",
             self.rss_bytes),
        ];
        if self.info.compare {
            simple.extend([
                (
                    "ersm_compared_frames_total",
                    "counter",
                    "Frames run through the dense baseline too.",
                    self.compared as f64,
                ),
                (
                    "ersm_agreeing_frames_total",
                    "counter",
                    "Frames whose ERSM answer is the dense one (the same top-1, or exactly its faces).",
                    self.agreed as f64,
                ),
                (
                    "ersm_agreement_ratio",
                    "gauge",
                    "Share of compared frames whose answer is the dense one, so far.",
                    self.agreed as f64 / self.compared.max(1) as f64,
                ),
            ]);
        }
        if let Some(f) = &self.faces {
            simple.extend([
                (
                    "ersm_dense_faces_total",
                    "counter",
                    "Faces the dense baseline found on compared frames.",
                    f.reference as f64,
                ),
                (
                    "ersm_faces_total",
                    "counter",
                    "Faces ERSM found on compared frames.",
                    f.found as f64,
                ),
                (
                    "ersm_matched_faces_total",
                    "counter",
                    "Dense faces ERSM found too (IoU >= 0.5, one to one).",
                    f.matched as f64,
                ),
                (
                    "ersm_face_recall_ratio",
                    "gauge",
                    "Share of the dense baseline's faces ERSM found so far (a miss is a face left uncovered).",
                    f.recall(),
                ),
                (
                    "ersm_face_precision_ratio",
                    "gauge",
                    "Share of ERSM's faces the dense baseline found too, so far.",
                    f.precision(),
                ),
            ]);
        }
        if self.info.fallback {
            simple.push((
                "ersm_fallback_frames_total",
                "counter",
                "Frames the confidence fallback re-ran densely.",
                self.fell_back as f64,
            ));
        }
        for (name, kind, help, v) in simple {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
        let _ = writeln!(
            o,
            "# HELP ersm_keep_ratio_frames Keep ratio per frame.\n\
             # TYPE ersm_keep_ratio_frames histogram"
        );
        self.keep.write(&mut o, "ersm_keep_ratio_frames", "");
        let _ = writeln!(
            o,
            "# HELP ersm_stage_latency_seconds Wall-clock time of each stage per frame \
             (warm-up frames left out).\n# TYPE ersm_stage_latency_seconds histogram"
        );
        for (path, hists) in ["ersm", "dense"].iter().zip(&self.latency) {
            if *path == "dense" && !self.info.compare {
                continue;
            }
            for (stage, h) in STAGES.iter().zip(hists) {
                let labels = format!("path=\"{path}\",stage=\"{stage}\"");
                h.write(&mut o, "ersm_stage_latency_seconds", &labels);
            }
        }
        o
    }

    /// The `/status` document: the run, its totals, the last frame and the
    /// recent history the viewer plots.
    pub fn status(&self) -> Value {
        let n = self.frames.max(1) as f64;
        let p50 = |path: usize| -> Option<f64> {
            let v: Vec<f64> = self
                .recent
                .iter()
                .rev()
                .take(30)
                .filter_map(|p| {
                    if path == 0 {
                        Some(p.ersm_ms)
                    } else {
                        p.dense_ms
                    }
                })
                .collect();
            median(v)
        };
        let (e, d) = (p50(0), p50(1));
        json!({
            "model": self.info.model,
            "source": self.info.source,
            "device": self.info.device,
            "threads": self.info.threads,
            "compare": self.info.compare,
            "fallback": self.info.fallback,
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "running": self.ended.is_none(),
            "ended": self.ended,
            "output_errors": self.output_errors,
            "frames": self.frames,
            "failed": self.failed,
            "capture_dropped": self.capture_dropped,
            "live_dropped": self.live_dropped,
            "viewers": self.viewers,
            "rss_mib": self.rss_bytes / (1024.0 * 1024.0),
            "keep_ratio_mean": (self.frames > 0).then(|| self.keep_sum / n),
            "suffix_compute": (self.frames > 0).then(|| self.compute_sum / n),
            "agreement": (self.compared > 0).then(|| self.agreed as f64 / self.compared as f64),
            "faces": self.faces.map(|f| json!({
                "dense": f.reference,
                "found": f.found,
                "matched": f.matched,
                "recall": f.recall(),
                "precision": f.precision(),
                "f1": f.f1(),
                "mean_iou": f.mean_iou(),
            })),
            "fallback_rate": self.info.fallback.then(|| self.fell_back as f64 / n),
            "ersm_ms_p50": e,
            "dense_ms_p50": d,
            "speedup": e.zip(d).map(|(e, d)| d / e),
            "last": self.last.as_ref().map(|l| json!({
                "frame": l.index,
                "name": l.name,
                "label": l.label,
                "dense_label": l.dense_label,
                "agree": l.agree,
                "keep": l.keep,
                "fell_back": l.fell_back,
                "ersm_ms": l.ersm.total(),
                "dense_ms": l.dense.map(|d| d.total()),
            })),
            "recent": {
                "frame": self.recent.iter().map(|p| p.frame).collect::<Vec<_>>(),
                "ersm_ms": self.recent.iter().map(|p| p.ersm_ms).collect::<Vec<_>>(),
                "dense_ms": self.recent.iter().map(|p| p.dense_ms).collect::<Vec<_>>(),
                "keep": self.recent.iter().map(|p| p.keep).collect::<Vec<_>>(),
            },
        })
    }
}

/// Adds one frame's stage times (milliseconds) to per-stage histograms (seconds).
fn observe(hists: &mut [Histogram], t: &StageTimes) {
    let values = [t.preprocess, t.prefix, t.ersm, t.suffix, t.total()];
    for (h, v) in hists.iter_mut().zip(values) {
        h.observe(v / 1e3);
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize, keep: f64, agree: bool) -> FrameRecord {
        FrameRecord {
            index: i,
            ersm: StageTimes {
                prefix: 5.0,
                suffix: 3.0,
                ..Default::default()
            },
            dense: Some(StageTimes {
                prefix: 5.0,
                suffix: 7.0,
                ..Default::default()
            }),
            keep,
            label: "cat".into(),
            dense_label: Some("cat".into()),
            agree: Some(agree),
            faces: None,
            warmup: i == 0,
            ..Default::default()
        }
    }

    #[test]
    fn histograms_are_cumulative_and_end_at_the_count() {
        let mut s = Stats::new(Info {
            compare: true,
            ..Default::default()
        });
        for i in 0..10 {
            s.record(record(i, 0.05 + i as f64 / 10.0, i % 2 == 0));
        }
        let text = s.prometheus();
        let buckets: Vec<u64> = text
            .lines()
            .filter(|l| {
                l.starts_with("ersm_stage_latency_seconds_bucket{path=\"ersm\",stage=\"total\"")
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(buckets.len(), LATENCY_BUCKETS.len() + 1);
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]));
        // Nine timed frames of 8 ms: all in the 0.008 bucket and above.
        assert_eq!(*buckets.last().unwrap(), 9);
        assert!(text.contains(
            "ersm_stage_latency_seconds_bucket{path=\"ersm\",stage=\"total\",le=\"0.006\"} 0"
        ));
        assert!(text.contains(
            "ersm_stage_latency_seconds_bucket{path=\"ersm\",stage=\"total\",le=\"0.008\"} 9"
        ));
        assert!(text.contains("ersm_agreeing_frames_total 5"));
        assert!(text.contains("ersm_keep_ratio_frames_count 10"));
        let status = s.status();
        assert_eq!(status["frames"], 10);
        assert_eq!(status["speedup"], 12.0 / 8.0);
        assert_eq!(status["recent"]["keep"].as_array().unwrap().len(), 10);
    }

    #[test]
    fn history_is_bounded_and_labels_are_escaped() {
        let mut s = Stats::new(Info {
            model: "a\"b\\c\nd".into(),
            ..Default::default()
        });
        for i in 0..HISTORY + 50 {
            s.record(record(i, 0.5, true));
        }
        assert_eq!(s.status()["recent"]["frame"][0], 50);
        assert!(s.prometheus().contains("model=\"a\\\"b\\\\c\\nd\""));
        // Without --compare dense, no dense series.
        assert!(!s.prometheus().contains("path=\"dense\""));
    }
}
