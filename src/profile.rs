//! Where a frame's time goes: the prefix, the energy layer, and each kind of
//! sparse suffix op (time, MACs, achieved GFLOP/s), measured on real frames
//! with the pipeline's threads (`ersm bench --profile`); with the suffix on a
//! GPU, each op's launch and kernels, and what crosses to the device.

use crate::ersm::FeatureMap;
use crate::pipeline::Pipeline;
use crate::source::Frame;
use crate::sparse::gpu::RulebookSite;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Instant;

/// Mean time per frame of one row of the profile.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Row {
    /// Stage or op kind (`Conv1x1+Clip` for a conv with a fused activation).
    pub name: String,
    /// Steps of this kind per frame (0 for whole stages).
    pub steps: usize,
    pub ms: f64,
    /// Multiply-accumulates per frame (0 where not counted).
    pub macs: f64,
    /// Shown for comparison, not part of the frame (left out of the total).
    pub aside: bool,
}

/// Profiles `frames` (cycled `count` times) through the ERSM path.
pub fn ersm(p: &Pipeline, frames: &[Frame], count: usize) -> Result<Vec<Row>> {
    let m = &p.model;
    let plan = &m.plan;
    let (mut prefix, mut energy) = (0.0, 0.0);
    let (mut step_ms, mut host_ms) = (Vec::new(), Vec::new());
    // The GPU suffix run untimed: launches issued, and done.
    let mut untimed = (0.0, 0.0);
    let mut step_macs = vec![0.0; plan.steps.len()];
    for i in 0..count {
        let frame = &frames[i % frames.len()];
        let input = p.preprocess(frame)?;
        p.threads.install(|| -> Result<()> {
            let t = Instant::now();
            let x = p.features(&input)?;
            prefix += t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            let mut mask = p
                .device()
                .compute(
                    FeatureMap::new(&x.features, m.cut.c, m.cut.h, m.cut.w)?,
                    &m.energy,
                )
                .context("energy layer")?;
            energy += t.elapsed().as_secs_f64() * 1e3;
            let tokens = match &p.placement.suffix {
                Some(g) => {
                    let (_, counts) = g
                        .run_timed(
                            plan,
                            &mask.kept,
                            &mask.features,
                            &x.taps,
                            RulebookSite::Device,
                            &mut step_ms,
                        )
                        .context("sparse suffix (GPU)")?;
                    // The same frame with host-built rulebooks, for the choice
                    // between the two (its op times are not kept).
                    g.run_timed(
                        plan,
                        &mask.kept,
                        &mask.features,
                        &x.taps,
                        RulebookSite::Host,
                        &mut host_ms,
                    )
                    .context("sparse suffix (GPU, host rulebooks)")?;
                    let (issued, done) = g
                        .time_launches(plan, &mask.kept, &mask.features, &x.taps)
                        .context("sparse suffix (GPU, untimed)")?;
                    untimed.0 += issued;
                    untimed.1 += done;
                    counts
                }
                None => {
                    let rows = std::mem::take(&mut mask.features);
                    let (_, frame) = plan
                        .run_timed(&mask.kept, rows, x.taps, &mut step_ms)
                        .context("sparse suffix")?;
                    frame.counts()
                }
            };
            for (acc, s) in step_macs.iter_mut().zip(&plan.steps) {
                *acc += s.op.cost(&tokens) as f64;
            }
            Ok(())
        })?;
    }
    let n = count.max(1) as f64;
    let mut kinds: BTreeMap<String, Row> = BTreeMap::new();
    for (s, step) in plan.steps.iter().enumerate() {
        let name = step.label();
        let row = kinds.entry(name.clone()).or_insert(Row {
            name,
            ..Row::default()
        });
        row.steps += 1;
        row.ms += step_ms.get(s).copied().unwrap_or(0.0) / n;
        row.macs += step_macs[s] / n;
    }
    let on_gpu = p.placement.suffix.is_some();
    let mut rows = vec![
        Row {
            name: if p.placement.nets.is_some() {
                "prefix (tract-cuda)"
            } else {
                "prefix (tract)"
            }
            .into(),
            ms: prefix / n,
            ..Row::default()
        },
        Row {
            name: "energy layer".into(),
            ms: energy / n,
            ..Row::default()
        },
        Row {
            name: if on_gpu {
                "token sets + rulebooks (GPU kernels)"
            } else {
                "token sets + rulebooks"
            }
            .into(),
            ms: step_ms.get(plan.steps.len()).copied().unwrap_or(0.0) / n,
            ..Row::default()
        },
    ];
    if on_gpu {
        // The GPU suffix's extra entry: what crosses to the device per frame;
        // then the same two parts with the rulebooks built on the host.
        let at = |t: &[f64], i: usize| t.get(plan.steps.len() + i).copied().unwrap_or(0.0) / n;
        rows.push(Row {
            name: "rows + kept list to the GPU".into(),
            ms: at(&step_ms, 1),
            ..Row::default()
        });
        rows.push(Row {
            name: "aside: token sets + rulebooks (host)".into(),
            ms: at(&host_ms, 0),
            aside: true,
            ..Row::default()
        });
        rows.push(Row {
            name: "aside: rows + rulebooks to the GPU".into(),
            ms: at(&host_ms, 1),
            aside: true,
            ..Row::default()
        });
        // Unsynchronised, the frame's launches queue behind each other: how
        // long the host takes to issue them against how long the frame takes.
        rows.push(Row {
            name: "aside: suffix untimed, launches issued".into(),
            ms: untimed.0 / n,
            aside: true,
            ..Row::default()
        });
        rows.push(Row {
            name: "aside: suffix untimed, done".into(),
            ms: untimed.1 / n,
            aside: true,
            ..Row::default()
        });
    }
    let mut ops: Vec<Row> = kinds.into_values().collect();
    ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    rows.extend(ops);
    Ok(rows)
}

/// The prefix's time per tract op kind and output shape, mean per frame,
/// largest first (tract's optimised ops, so fused convs show as one op).
pub fn prefix(p: &Pipeline, frames: &[Frame], count: usize) -> Result<Vec<Row>> {
    let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
    for i in 0..count {
        let input = p.preprocess(&frames[i % frames.len()])?;
        let times = p.threads.install(|| p.model.prefix.profile(&input))?;
        for (op, shape, ms) in times {
            let row = rows.entry((op.clone(), shape.clone())).or_insert(Row {
                name: format!("{op} {shape}"),
                ..Row::default()
            });
            row.ms += ms / count.max(1) as f64;
            if i == 0 {
                row.steps += 1;
            }
        }
    }
    let mut rows: Vec<Row> = rows.into_values().collect();
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    Ok(rows)
}

/// The profile as a table: time per frame, share, MACs, GFLOP/s.
pub fn table(rows: &[Row]) -> String {
    let total: f64 = rows.iter().filter(|r| !r.aside).map(|r| r.ms).sum();
    let mut s = String::new();
    let _ = writeln!(
        s,
        " {:<40}{:>6}{:>10}{:>8}{:>11}{:>10}",
        "stage / op", "steps", "ms", "share", "MMACs", "GFLOP/s"
    );
    for r in rows {
        let gflops = if r.macs > 0.0 && r.ms > 0.0 {
            format!("{:.1}", 2.0 * r.macs / (r.ms * 1e6))
        } else {
            "-".into()
        };
        let steps = if r.steps > 0 {
            r.steps.to_string()
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            " {:<40}{:>6}{:>10.3}{:>7.1}%{:>11.2}{:>10}",
            r.name,
            steps,
            r.ms,
            100.0 * r.ms / total.max(1e-9),
            r.macs / 1e6,
            gflops
        );
    }
    let _ = writeln!(s, " {:<40}{:>6}{:>10.3}", "total", "", total);
    s
}
