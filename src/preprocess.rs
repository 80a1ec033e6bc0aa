//! Frame → network input: resize the short side (antialiased bilinear),
//! centre-crop, scale, normalise, HWC u8 → CHW f32. Only the crop is computed.

use crate::model::manifest::Preprocess;
use anyhow::{ensure, Result};

/// Filter taps for one output coordinate: first source index and weights.
struct Taps {
    start: usize,
    weights: Vec<f32>,
}

/// Triangle-filter taps mapping `src` samples to `dst` samples, for output
/// coordinates `offset..offset + count` (PIL-style: the support widens with
/// the downscale factor, so downscaling averages instead of aliasing).
fn taps(src: usize, dst: usize, offset: usize, count: usize) -> Vec<Taps> {
    let scale = src as f32 / dst as f32;
    let support = scale.max(1.0);
    (offset..offset + count)
        .map(|o| {
            let centre = (o as f32 + 0.5) * scale;
            let lo = ((centre - support).floor().max(0.0)) as usize;
            let hi = ((centre + support).ceil() as usize).min(src);
            let mut weights: Vec<f32> = (lo..hi)
                .map(|i| (1.0 - ((i as f32 + 0.5 - centre) / support).abs()).max(0.0))
                .collect();
            let sum: f32 = weights.iter().sum();
            if sum > 0.0 {
                weights.iter_mut().for_each(|w| *w /= sum);
            } else {
                // Degenerate 1-pixel source: take the nearest sample.
                weights = vec![1.0];
                return Taps {
                    start: (centre as usize).min(src - 1),
                    weights,
                };
            }
            Taps { start: lo, weights }
        })
        .collect()
}

/// The resized size and the crop's offset in it.
struct Geometry {
    rw: usize,
    rh: usize,
    ox: usize,
    oy: usize,
}

fn geometry(width: usize, height: usize, p: &Preprocess) -> Geometry {
    let short = width.min(height) as f32;
    let rw = ((width as f32 * p.resize_short as f32 / short).round() as usize).max(p.crop);
    let rh = ((height as f32 * p.resize_short as f32 / short).round() as usize).max(p.crop);
    Geometry {
        rw,
        rh,
        ox: (rw - p.crop) / 2,
        oy: (rh - p.crop) / 2,
    }
}

/// The part of a `width × height` frame the network sees, in frame pixels:
/// `[x0, y0, x1, y1)`.
pub fn crop_region(width: usize, height: usize, p: &Preprocess) -> [f32; 4] {
    let g = geometry(width.max(1), height.max(1), p);
    let (sx, sy) = (width as f32 / g.rw as f32, height as f32 / g.rh as f32);
    [
        g.ox as f32 * sx,
        g.oy as f32 * sy,
        (g.ox + p.crop) as f32 * sx,
        (g.oy + p.crop) as f32 * sy,
    ]
}

/// Converts an RGB8 image (`width × height`, row-major HWC) into a normalised
/// `3 × crop × crop` CHW tensor as the manifest describes.
pub fn preprocess(rgb: &[u8], width: usize, height: usize, p: &Preprocess) -> Result<Vec<f32>> {
    ensure!(width > 0 && height > 0, "empty image ({width}×{height})");
    ensure!(
        rgb.len() == width * height * 3,
        "image buffer has {} bytes, expected {width}×{height}×3",
        rgb.len()
    );
    let Geometry { rw, rh, ox, oy } = geometry(width, height, p);
    let xt = taps(width, rw, ox, p.crop);
    let yt = taps(height, rh, oy, p.crop);
    let n = p.crop;
    // Horizontal pass on the rows the vertical pass reads.
    let row_lo = yt.iter().map(|t| t.start).min().unwrap_or(0);
    let row_hi = yt
        .iter()
        .map(|t| t.start + t.weights.len())
        .max()
        .unwrap_or(0);
    let mut tmp = vec![0.0f32; (row_hi - row_lo) * n * 3];
    for y in row_lo..row_hi {
        let src = &rgb[y * width * 3..(y + 1) * width * 3];
        let dst = &mut tmp[(y - row_lo) * n * 3..(y - row_lo + 1) * n * 3];
        for (x, t) in xt.iter().enumerate() {
            let mut acc = [0.0f32; 3];
            for (k, &w) in t.weights.iter().enumerate() {
                let s = &src[(t.start + k) * 3..(t.start + k) * 3 + 3];
                acc[0] += w * s[0] as f32;
                acc[1] += w * s[1] as f32;
                acc[2] += w * s[2] as f32;
            }
            dst[x * 3..x * 3 + 3].copy_from_slice(&acc);
        }
    }
    let mut out = vec![0.0f32; 3 * n * n];
    let mul: [f32; 3] = std::array::from_fn(|c| p.scale / p.std[c]);
    let add: [f32; 3] = std::array::from_fn(|c| -p.mean[c] / p.std[c]);
    for (y, t) in yt.iter().enumerate() {
        let mut acc = vec![0.0f32; n * 3];
        for (k, &w) in t.weights.iter().enumerate() {
            let row = &tmp[(t.start + k - row_lo) * n * 3..(t.start + k - row_lo + 1) * n * 3];
            acc.iter_mut().zip(row).for_each(|(a, &r)| *a += w * r);
        }
        for x in 0..n {
            for c in 0..3 {
                out[c * n * n + y * n + x] = acc[x * 3 + c] * mul[c] + add[c];
            }
        }
    }
    Ok(out)
}
