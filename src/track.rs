//! A stream's memory between frames: the tokens around the faces ERSM found
//! in the frame before, which every energy layer keeps in the next one
//! (manifest `track`, `--track`). A face once found keeps its whole context
//! while it stays in view; the masks alone decide only its first frames
//! (training/experiments/centerface_ersm/REPORT.md, section 23).

use crate::detect::Detection;

/// Raster indices (ascending) of the cut's `(w, h)` tokens under `faces`
/// (boxes in the network input's pixels, `input` = (w, h)), each box grown
/// by `margin` tokens on every side and clipped to the map. A box outside
/// the frame holds what its margin reaches inside.
pub fn held_tokens(
    faces: &[Detection],
    input: (usize, usize),
    cut: (usize, usize),
    margin: usize,
) -> Vec<u32> {
    let (w, h) = cut;
    if w == 0 || h == 0 {
        return Vec::new();
    }
    let (sx, sy) = (input.0 as f32 / w as f32, input.1 as f32 / h as f32);
    let m = margin as i64;
    // The token span [lo, hi] of pixels v1..v2 grown by the margin, within
    // 0..n (None when it misses the map).
    let span = |v1: f32, v2: f32, s: f32, n: usize| {
        let lo = ((v1 / s).floor() as i64 - m).max(0);
        let hi = ((v2 / s).floor() as i64 + m).min(n as i64 - 1);
        (lo <= hi).then_some((lo as usize, hi as usize))
    };
    let mut flags = vec![false; w * h];
    for f in faces {
        // A non-finite box (never decoded from finite maps) holds nothing.
        if ![f.x1, f.y1, f.x2, f.y2].iter().all(|v| v.is_finite()) {
            continue;
        }
        let (Some((x1, x2)), Some((y1, y2))) = (span(f.x1, f.x2, sx, w), span(f.y1, f.y2, sy, h))
        else {
            continue;
        };
        for y in y1..=y2 {
            flags[y * w + x1..=y * w + x2].fill(true);
        }
    }
    (0..(w * h) as u32).filter(|&i| flags[i as usize]).collect()
}

/// Where each of `faces` is carried one frame on by its motion since the
/// nearest face of the frame `before` (centres less than its box's larger
/// side apart): its box moved by the centres' difference. Faces with no
/// such face before give none.
pub fn carried(faces: &[Detection], before: &[Detection]) -> Vec<Detection> {
    let centre = |f: &Detection| ((f.x1 + f.x2) / 2.0, (f.y1 + f.y2) / 2.0);
    faces
        .iter()
        .filter_map(|f| {
            let (cx, cy) = centre(f);
            let side = (f.x2 - f.x1).max(f.y2 - f.y1);
            let (dx, dy) = before
                .iter()
                .map(|g| {
                    let (gx, gy) = centre(g);
                    (cx - gx, cy - gy)
                })
                .filter(|(dx, dy)| dx.hypot(*dy) < side)
                .min_by(|a, b| a.0.hypot(a.1).total_cmp(&b.0.hypot(b.1)))?;
            Some(Detection {
                x1: f.x1 + dx,
                y1: f.y1 + dy,
                x2: f.x2 + dx,
                y2: f.y2 + dy,
                ..*f
            })
        })
        .collect()
}

/// Raster indices (ascending) of the `(w, h)` map's tokens `now` keeps and
/// none of `before` kept, counted only inside a 2×2 block of such tokens
/// (an opening by a 2×2 square: a token that flickers alone, or a thin
/// edge, is not new), then grown by `margin` tokens on every side. With
/// nothing `before` (a stream's first frame), every token `now` keeps is
/// new.
pub fn new_tokens(
    now: &[bool],
    before: &[Vec<bool>],
    (w, h): (usize, usize),
    margin: usize,
) -> Vec<u32> {
    let n = w * h;
    if now.len() != n || w < 2 || h < 2 {
        return Vec::new();
    }
    let new: Vec<bool> = (0..n)
        .map(|i| now[i] && !before.iter().any(|b| b.get(i).copied().unwrap_or(false)))
        .collect();
    // The blocks' top-left corners, then every token of a block.
    let mut opened = vec![false; n];
    for y in 0..h - 1 {
        for x in 0..w - 1 {
            let i = y * w + x;
            if new[i] && new[i + 1] && new[i + w] && new[i + w + 1] {
                for j in [i, i + 1, i + w, i + w + 1] {
                    opened[j] = true;
                }
            }
        }
    }
    let mut grown = vec![false; n];
    for y in 0..h {
        for x in 0..w {
            if !opened[y * w + x] {
                continue;
            }
            let (y0, y1) = (y.saturating_sub(margin), (y + margin).min(h - 1));
            let (x0, x1) = (x.saturating_sub(margin), (x + margin).min(w - 1));
            for yy in y0..=y1 {
                grown[yy * w + x0..=yy * w + x1].fill(true);
            }
        }
    }
    (0..n as u32).filter(|&i| grown[i as usize]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face(x1: f32, y1: f32, x2: f32, y2: f32) -> Detection {
        Detection {
            x1,
            y1,
            x2,
            y2,
            score: 0.9,
            landmarks: [[0.0; 2]; 5],
        }
    }

    #[test]
    fn new_tokens_are_blocks_none_of_the_last_frames_kept_grown_by_the_margin() {
        let (w, h) = (8, 6);
        let at = |pts: &[(usize, usize)]| {
            let mut m = vec![false; w * h];
            for &(x, y) in pts {
                m[y * w + x] = true;
            }
            m
        };
        // A 2×2 block at (4..=5, 2..=3), a lone token at (1, 1), and a
        // token kept two frames ago at (0, 5) beside a new one at (1, 5).
        let now = at(&[(4, 2), (5, 2), (4, 3), (5, 3), (1, 1), (0, 5), (1, 5)]);
        let before = [at(&[(0, 5)]), at(&[])];
        assert_eq!(new_tokens(&now, &before, (w, h), 0), vec![20, 21, 28, 29]);
        // Grown by one token, clipped to the map.
        let grown = new_tokens(&now, &before, (w, h), 1);
        let want: Vec<u32> = (1..=4)
            .flat_map(|y| (3..=6).map(move |x| (y * w + x) as u32))
            .collect();
        assert_eq!(grown, want);
        // A block any of the last frames kept is not new.
        let seen = [at(&[]), at(&[(5, 3)])];
        assert!(new_tokens(&now, &seen, (w, h), 0).is_empty());
        // A stream's first frame: every block is new.
        assert_eq!(new_tokens(&now, &[], (w, h), 0), vec![20, 21, 28, 29]);
    }

    #[test]
    fn a_box_holds_its_tokens_and_a_margin_clipped_to_the_map() {
        // 640×480 input, 80×60 tokens (stride 8): pixels 16..31 are token 2..3.
        let held = held_tokens(&[face(16.0, 8.0, 31.0, 15.0)], (640, 480), (80, 60), 0);
        assert_eq!(held, vec![82, 83]);
        let held = held_tokens(&[face(16.0, 8.0, 31.0, 15.0)], (640, 480), (80, 60), 1);
        let want: Vec<u32> = (0..3)
            .flat_map(|y| (1..5).map(move |x| (y * 80 + x) as u32))
            .collect();
        assert_eq!(held, want);
        // At the map's corner the margin stops at the edge: tokens 78..=79
        // and 58..=59 (the box runs past the frame), grown by 2 on the
        // inner sides only.
        let held = held_tokens(&[face(630.0, 470.0, 700.0, 500.0)], (640, 480), (80, 60), 2);
        assert_eq!(held.len(), 4 * 4);
        assert_eq!(held[0], 56 * 80 + 76);
        assert_eq!(*held.last().unwrap(), 80 * 60 - 1);
    }

    #[test]
    fn overlapping_faces_hold_each_token_once_and_bad_boxes_nothing() {
        let faces = [face(0.0, 0.0, 15.0, 15.0), face(8.0, 8.0, 23.0, 23.0)];
        // Tokens (0..=1)² and (1..=2)² of an 8×8 map: 9 is in both.
        let held = held_tokens(&faces, (64, 64), (8, 8), 0);
        assert_eq!(held, vec![0, 1, 8, 9, 10, 17, 18]);
        assert!(held_tokens(&[face(f32::NAN, 0.0, 8.0, 8.0)], (64, 64), (8, 8), 1).is_empty());
        assert!(held_tokens(&[], (64, 64), (8, 8), 1).is_empty());
    }

    #[test]
    fn a_box_past_the_frame_holds_what_its_margin_reaches() {
        // Pixels 72..80 of a 64-pixel frame are token 9, past the 8 columns:
        // a margin of 2 reaches column 7 only, a margin of 1 nothing.
        let off = [face(72.0, 0.0, 80.0, 7.0)];
        assert_eq!(held_tokens(&off, (64, 64), (8, 8), 2), vec![7, 15, 23]);
        assert!(held_tokens(&off, (64, 64), (8, 8), 1).is_empty());
        let above = [face(0.0, -40.0, 7.0, -20.0)];
        assert!(held_tokens(&above, (64, 64), (8, 8), 2).is_empty());
    }

    #[test]
    fn a_face_is_carried_by_its_motion_from_the_nearest_face_before() {
        let now = [
            face(100.0, 50.0, 140.0, 90.0),
            face(300.0, 50.0, 320.0, 70.0),
        ];
        // The first moved 30 pixels right and 4 down since the nearer of two
        // faces; the second's nearest is 60 pixels off, more than its side.
        let before = [
            face(70.0, 46.0, 110.0, 86.0),
            face(0.0, 0.0, 40.0, 40.0),
            face(240.0, 50.0, 260.0, 70.0),
        ];
        let on = carried(&now, &before);
        assert_eq!(on, vec![face(130.0, 54.0, 170.0, 94.0)]);
        assert!(carried(&now, &[]).is_empty());
        // A face that stood still is carried where it is.
        assert_eq!(carried(&now[..1], &now[..1]), vec![now[0]]);
    }
}
