//! Pre-processing against a direct, unoptimised transcription of its
//! definition (triangle filter whose support widens with the downscale,
//! short side resized, centre crop, per-channel normalisation), in f64.

use ersm::model::manifest::Preprocess;
use ersm::preprocess::{crop_region, preprocess};

/// Normalised triangle-filter weights of source samples for output `o`.
fn weights(src: usize, dst: usize, o: usize) -> Vec<(usize, f64)> {
    let scale = src as f64 / dst as f64;
    let support = scale.max(1.0);
    let centre = (o as f64 + 0.5) * scale;
    let w: Vec<(usize, f64)> = (0..src)
        .map(|i| {
            (
                i,
                (1.0 - ((i as f64 + 0.5 - centre) / support).abs()).max(0.0),
            )
        })
        .filter(|(_, w)| *w > 0.0)
        .collect();
    let sum: f64 = w.iter().map(|(_, w)| w).sum();
    if sum == 0.0 {
        return vec![(((centre as usize).min(src - 1)), 1.0)];
    }
    w.into_iter().map(|(i, v)| (i, v / sum)).collect()
}

fn reference(rgb: &[u8], w: usize, h: usize, p: &Preprocess) -> Vec<f32> {
    let (rw, rh, ox, oy, nw, nh) = match p.resize {
        // Stretched: the whole frame, each axis to its own size.
        Some([rw, rh]) => (rw, rh, 0, 0, rw, rh),
        None => {
            let short = w.min(h) as f64;
            let rw = ((w as f64 * p.resize_short as f64 / short).round() as usize).max(p.crop);
            let rh = ((h as f64 * p.resize_short as f64 / short).round() as usize).max(p.crop);
            let (ox, oy) = ((rw - p.crop) / 2, (rh - p.crop) / 2);
            (rw, rh, ox, oy, p.crop, p.crop)
        }
    };
    let mut out = vec![0.0f32; 3 * nw * nh];
    for y in 0..nh {
        let wy = weights(h, rh, oy + y);
        for x in 0..nw {
            let wx = weights(w, rw, ox + x);
            for c in 0..3 {
                let mut v = 0.0f64;
                for &(sy, a) in &wy {
                    for &(sx, b) in &wx {
                        v += a * b * rgb[(sy * w + sx) * 3 + c] as f64;
                    }
                }
                let v = (v * p.scale as f64 - p.mean[c] as f64) / p.std[c] as f64;
                out[c * nw * nh + y * nw + x] = v as f32;
            }
        }
    }
    out
}

fn image(w: usize, h: usize, seed: u32) -> Vec<u8> {
    let mut s = seed;
    (0..w * h * 3)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 24) as u8
        })
        .collect()
}

fn manifest(resize_short: usize, crop: usize) -> Preprocess {
    Preprocess {
        resize_short,
        crop,
        scale: 1.0 / 255.0,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
        resize: None,
    }
}

/// A detector's view: the whole frame stretched to the input size, each
/// axis scaled on its own (down, up, and one of each).
#[test]
fn stretch_matches_the_direct_definition() {
    for (i, &(w, h, rw, rh)) in [(96, 72, 64, 32), (50, 81, 64, 96), (40, 30, 32, 64)]
        .iter()
        .enumerate()
    {
        let p = Preprocess {
            resize_short: 0,
            crop: 0,
            scale: 1.0,
            mean: [0.0; 3],
            std: [1.0; 3],
            resize: Some([rw, rh]),
        };
        let rgb = image(w, h, 11 + i as u32);
        let got = preprocess(&rgb, w, h, &p).unwrap();
        let want = reference(&rgb, w, h, &p);
        assert_eq!(got.len(), 3 * rw * rh);
        let err = got
            .iter()
            .zip(&want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err < 1e-3, "{w}×{h} → {rw}×{rh}: max error {err}");
        assert_eq!(crop_region(w, h, &p), [0.0, 0.0, w as f32, h as f32]);
    }
}

#[test]
fn matches_the_direct_definition() {
    // Downscale (landscape, portrait), upscale, odd sizes, crop = resize.
    for (i, &(w, h, r, c)) in [
        (96, 72, 40, 32),
        (50, 81, 36, 36),
        (20, 14, 40, 32),
        (33, 33, 33, 33),
        (7, 5, 12, 10),
    ]
    .iter()
    .enumerate()
    {
        let rgb = image(w, h, i as u32 + 1);
        let p = manifest(r, c);
        let got = preprocess(&rgb, w, h, &p).unwrap();
        let want = reference(&rgb, w, h, &p);
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 1e-4, "{w}×{h} → {r}/{c}: max error {err}");
    }
}

#[test]
fn crop_region_is_the_centre_square_the_network_sees() {
    let p = manifest(256, 224);
    let [x0, y0, x1, y1] = crop_region(768, 576, &p);
    // 576 → 256 scales by 4/9; the 224 crop is 504 source pixels, centred.
    assert!((x1 - x0 - 504.0).abs() < 2.0 && (y1 - y0 - 504.0).abs() < 2.0);
    assert!(
        (x0 - 132.0).abs() < 2.0 && (y0 - 36.0).abs() < 2.0,
        "{x0} {y0}"
    );
}

#[test]
fn bad_buffers_are_errors() {
    let p = manifest(40, 32);
    assert!(preprocess(&[0; 10], 4, 4, &p).is_err());
    assert!(preprocess(&[], 0, 0, &p).is_err());
}

/// Split across threads, every band of rows (the green and blue planes with
/// the red) holds exactly what one thread computes.
#[test]
fn threads_give_the_same_bits() {
    let p = Preprocess {
        resize_short: 0,
        crop: 0,
        scale: 1.0 / 255.0,
        mean: [0.1, 0.2, 0.3],
        std: [0.5, 0.6, 0.7],
        resize: Some([96, 70]),
    };
    let rgb = image(131, 97, 5);
    let one = preprocess(&rgb, 131, 97, &p).unwrap();
    let want = reference(&rgb, 131, 97, &p);
    let err = one
        .iter()
        .zip(&want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err < 1e-3, "max error {err}");
    for n in [2, 3] {
        let threads = ersm::threads::Threads::new(n).unwrap();
        let got = threads.install(|| preprocess(&rgb, 131, 97, &p).unwrap());
        assert_eq!(got, one, "{n} threads");
    }
}
