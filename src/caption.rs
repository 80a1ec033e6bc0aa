//! Text drawn into overlay frames (the label, keep ratio and latency) in a
//! public-domain 8×8 bitmap font scaled to the frame: no font file to ship
//! with the binary or to find on the device.

use font8x8::legacy::BASIC_LEGACY;

/// One line of a caption and its colour.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    pub text: String,
    pub rgb: [u8; 3],
}

/// White, for most lines.
pub const WHITE: [u8; 3] = [255, 255, 255];
/// Orange, for what needs a second look (ERSM and dense disagree).
pub const ORANGE: [u8; 3] = [255, 160, 40];

/// Glyph scale for a frame of this width: about 60 characters a line.
fn scale(width: usize) -> usize {
    ((width as f32 / 500.0).round() as usize).clamp(1, 6)
}

/// Height in pixels of the band `lines` lines take on a frame this wide.
pub fn band_height(width: usize, lines: usize) -> usize {
    let s = scale(width);
    if lines == 0 {
        0
    } else {
        lines * (8 * s + 2 * s) + 2 * s
    }
}

/// Draws `lines` over a darkened band across the top of an RGB image
/// (`height × width × 3`). Text that does not fit is cut at the right edge;
/// characters outside ASCII are drawn as `?`.
pub fn draw(rgb: &mut [u8], width: usize, height: usize, lines: &[Line]) {
    if width == 0 || height == 0 || rgb.len() < width * height * 3 {
        return;
    }
    let s = scale(width);
    let band = band_height(width, lines.len()).min(height);
    // Darken rather than blank the band, so the picture still shows through.
    for v in &mut rgb[..band * width * 3] {
        *v = (*v as u16 * 3 / 10) as u8;
    }
    for (row, line) in lines.iter().enumerate() {
        let y0 = 2 * s + row * 10 * s;
        for (col, ch) in line.text.chars().enumerate() {
            let x0 = 2 * s + col * 8 * s;
            if x0 + 8 * s > width {
                break;
            }
            let glyph = BASIC_LEGACY[if ch.is_ascii() {
                ch as usize
            } else {
                b'?' as usize
            }];
            for (gy, bits) in glyph.iter().enumerate() {
                for gx in 0..8 {
                    if bits >> gx & 1 == 0 {
                        continue;
                    }
                    for dy in 0..s {
                        let y = y0 + gy * s + dy;
                        if y >= height {
                            continue;
                        }
                        let start = (y * width + x0 + gx * s) * 3;
                        for px in rgb[start..start + 3 * s].chunks_exact_mut(3) {
                            px.copy_from_slice(&line.rgb);
                        }
                    }
                }
            }
        }
    }
}

/// The caption drawn on overlays: both top-1 labels (the dense one in orange
/// when they differ), then the keep ratio and the latencies given (recent
/// medians, ms), the dense one and the speed-up when the baseline ran.
pub fn compose(
    label: &str,
    dense_label: Option<&str>,
    keep: f64,
    (ersm_ms, dense_ms): (f64, Option<f64>),
    fell_back: bool,
) -> Vec<Line> {
    let mut lines = vec![Line {
        text: format!(
            "ERSM: {label}{}",
            if fell_back { " (dense fallback)" } else { "" }
        ),
        rgb: WHITE,
    }];
    let mut perf = format!("keep {keep:.2} | {ersm_ms:.1} ms");
    if let Some(dl) = dense_label {
        lines.push(Line {
            text: format!("dense: {dl}"),
            rgb: if dl == label { WHITE } else { ORANGE },
        });
        let d = dense_ms.unwrap_or(f64::NAN);
        perf += &format!(" vs dense {d:.1} ms ({:.2}x)", d / ersm_ms);
    }
    lines.push(Line {
        text: perf,
        rgb: WHITE,
    });
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lands_in_the_band_and_nowhere_else() {
        let (w, h) = (320, 120);
        let mut img = vec![200u8; w * h * 3];
        let lines = [Line {
            text: "keep 0.72 | ERSM 12.1 ms".into(),
            rgb: WHITE,
        }];
        draw(&mut img, w, h, &lines);
        let band = band_height(w, 1);
        let white = img[..band * w * 3]
            .chunks_exact(3)
            .filter(|p| *p == [255, 255, 255])
            .count();
        assert!(white > 100, "{white} text pixels");
        // Below the band the image is untouched.
        assert!(img[band * w * 3..].iter().all(|&v| v == 200));
        // The band itself is darkened where there is no text.
        assert_eq!(img[0], 60);
    }

    #[test]
    fn long_and_non_ascii_text_and_tiny_frames_do_not_panic() {
        let lines = [Line {
            text: "é".repeat(500),
            rgb: ORANGE,
        }];
        for (w, h) in [(1, 1), (7, 3), (64, 4), (4000, 30)] {
            let mut img = vec![0u8; w * h * 3];
            draw(&mut img, w, h, &lines);
        }
        draw(&mut [], 0, 0, &lines);
    }
}
