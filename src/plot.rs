//! SVG plots (plotters' SVG backend: no font or image libraries needed, so
//! it cross-builds as is): deletion curves, keep-ratio histogram, and bench
//! latency distributions.

use crate::eval::deletion::Deletion;
use crate::eval::sparsity::Sparsity;
use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::path::Path;

fn err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow!("plot {}: {e}", path.display())
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The series legend, in one style for every plot.
fn legend<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    position: SeriesLabelPosition,
    path: &Path,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err(path))
}

/// A legend key for a line series: a short stroke.
fn line_key(colour: RGBColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
}

const COLOURS: [RGBColor; 3] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(127, 127, 127),
];

/// Agreement and dense-class probability against the fraction deleted.
pub fn deletion(d: &Deletion, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err(path))?;
    let panels = root.split_evenly((1, 2));
    for (panel, (title, pick)) in panels.iter().zip([
        ("top-1 agreement with dense", 0usize),
        ("probability of the dense top-1", 1usize),
    ]) {
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(0f64..1f64, 0f64..1.02f64)
            .map_err(err(path))?;
        chart
            .configure_mesh()
            .x_desc("fraction of tokens deleted")
            .draw()
            .map_err(err(path))?;
        for (c, colour) in d.curves.iter().zip(COLOURS) {
            let pts = c.points.iter().map(|p| {
                (
                    p.deleted,
                    if pick == 0 {
                        p.agreement
                    } else {
                        p.probability
                    },
                )
            });
            let area = if pick == 0 {
                c.agreement_area
            } else {
                c.probability_area
            };
            chart
                .draw_series(LineSeries::new(pts, colour.stroke_width(2)))
                .map_err(err(path))?
                .label(format!("{:?} (area {area:.3})", c.ranking).to_lowercase())
                .legend(line_key(colour));
        }
        legend(&mut chart, SeriesLabelPosition::LowerLeft, path)?;
    }
    root.present().map_err(err(path))?;
    Ok(())
}

/// Histogram of per-image keep ratios.
pub fn sparsity(s: &Sparsity, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(err(path))?;
    let top = s.histogram.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "keep ratio per image (mean {:.2}, {} images)",
                s.mean,
                s.images.len()
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(40)
        .build_cartesian_2d(0f64..1f64, 0f64..top)
        .map_err(err(path))?;
    chart
        .configure_mesh()
        .x_desc("fraction of tokens kept")
        .y_desc("images")
        .draw()
        .map_err(err(path))?;
    chart
        .draw_series(s.histogram.iter().enumerate().map(|(i, &n)| {
            let x = i as f64 / 10.0;
            Rectangle::new(
                [(x + 0.005, 0.0), (x + 0.095, n as f64)],
                COLOURS[1].filled(),
            )
        }))
        .map_err(err(path))?;
    root.present().map_err(err(path))?;
    Ok(())
}

/// Per-stage latency histograms, ERSM beside dense; on the total, the ERSM
/// latency the ideal (Amdahl) speedup would give.
pub fn latency(
    stages: &[(&str, Vec<f64>, Vec<f64>)],
    ideal_total_ms: f64,
    path: &Path,
) -> Result<()> {
    let root =
        SVGBackend::new(path, (1200, 300 * stages.len().div_ceil(2) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err(path))?;
    let panels = root.split_evenly((stages.len().div_ceil(2), 2));
    for (panel, (name, ersm, dense)) in panels.iter().zip(stages) {
        let all = ersm.iter().chain(dense.iter()).copied();
        let (lo, hi) = all.fold((f64::INFINITY, 0f64), |(a, b), v| (a.min(v), b.max(v)));
        if !lo.is_finite() {
            continue;
        }
        let lo = if *name == "total" {
            lo.min(ideal_total_ms)
        } else {
            lo
        };
        let (lo, hi) = (lo * 0.95, hi * 1.05 + 1e-6);
        let bins = 30;
        let width = (hi - lo) / bins as f64;
        let hist = |v: &[f64]| {
            let mut h = vec![0usize; bins];
            for &x in v {
                h[(((x - lo) / width) as usize).min(bins - 1)] += 1;
            }
            h
        };
        let (he, hd) = (hist(ersm), hist(dense));
        let top = he.iter().chain(&hd).copied().max().unwrap_or(1) as f64 * 1.15;
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{name} (ms)"), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(36)
            .build_cartesian_2d(lo..hi, 0f64..top)
            .map_err(err(path))?;
        chart
            .configure_mesh()
            .y_desc("frames")
            .draw()
            .map_err(err(path))?;
        for (h, colour, label) in [(&hd, COLOURS[0], "dense"), (&he, COLOURS[1], "ERSM")] {
            chart
                .draw_series(h.iter().enumerate().map(|(i, &n)| {
                    let x = lo + i as f64 * width;
                    Rectangle::new([(x, 0.0), (x + width, n as f64)], colour.mix(0.5).filled())
                }))
                .map_err(err(path))?
                .label(label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.mix(0.5).filled())
                });
        }
        if *name == "total" && ideal_total_ms.is_finite() {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(ideal_total_ms, 0.0), (ideal_total_ms, top)],
                    BLACK.stroke_width(2),
                )))
                .map_err(err(path))?
                .label(format!("ideal ERSM ({ideal_total_ms:.2} ms)"))
                .legend(line_key(BLACK));
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight, path)?;
    }
    root.present().map_err(err(path))?;
    Ok(())
}

/// One bar series: label, colour, x offset, and the value it shows.
type Bars = (
    &'static str,
    RGBColor,
    f64,
    fn(&crate::eval::occlusion::Condition) -> f64,
);

/// Top-1 flip rates under occlusion, ERSM beside dense, per occluder and
/// size, with the fraction of the occluder's tokens that ERSM dropped.
pub fn occlusion(o: &crate::eval::occlusion::Occlusion, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err(path))?;
    let n = o.conditions.len();
    let labels: Vec<String> = o
        .conditions
        .iter()
        .map(|c| format!("{:?} {:.2}", c.occluder, c.size).to_lowercase())
        .collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "occlusion: top-1 flip rate ({} images, {}×{} positions)",
                o.images, o.grid, o.grid
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..1.05f64)
        .map_err(err(path))?;
    let fmt = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
            labels[i as usize].clone()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&fmt)
        .disable_x_mesh()
        .draw()
        .map_err(err(path))?;
    let series: [Bars; 2] = [
        ("ERSM flips", COLOURS[0], -0.2, |c| c.ersm_flip_rate),
        ("dense flips", COLOURS[1], 0.2, |c| c.dense_flip_rate),
    ];
    for (label, colour, offset, value) in series {
        chart
            .draw_series(o.conditions.iter().enumerate().map(|(i, c)| {
                let x = i as f64 + offset;
                Rectangle::new(
                    [(x - 0.18, 0.0), (x + 0.18, value(c))],
                    colour.mix(0.7).filled(),
                )
            }))
            .map_err(err(path))?
            .label(label)
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.mix(0.7).filled())
            });
    }
    chart
        .draw_series(
            o.conditions
                .iter()
                .enumerate()
                .map(|(i, c)| Circle::new((i as f64, c.occluder_dropped), 5, BLACK.filled())),
        )
        .map_err(err(path))?
        .label("occluder tokens dropped by ERSM")
        .legend(|(x, y)| Circle::new((x + 6, y), 4, BLACK.filled()));
    legend(&mut chart, SeriesLabelPosition::UpperLeft, path)?;
    root.present().map_err(err(path))?;
    Ok(())
}
