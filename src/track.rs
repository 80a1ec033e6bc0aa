//! A stream's memory between frames: the tokens around the faces ERSM found
//! in the frame before, which every energy layer keeps in the next one
//! (manifest `track`, `--track`). A face once found keeps its whole context
//! while it stays in view; the masks alone decide only its first frames
//! (training/experiments/centerface_ersm/REPORT.md, section 23).

use crate::detect::Detection;

/// Raster indices (ascending) of the cut's `(w, h)` tokens under `faces`
/// (boxes in the network input's pixels, `input` = (w, h)), each box grown
/// by `margin` tokens on every side and clipped to the map.
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
    let mut flags = vec![false; w * h];
    for f in faces {
        // A non-finite box (never decoded from finite maps) holds nothing.
        if ![f.x1, f.y1, f.x2, f.y2].iter().all(|v| v.is_finite()) {
            continue;
        }
        let token = |v: f32, s: f32, n: usize| ((v / s).floor().max(0.0) as usize).min(n - 1);
        let (x1, x2) = (token(f.x1, sx, w), token(f.x2, sx, w));
        let (y1, y2) = (token(f.y1, sy, h), token(f.y2, sy, h));
        for y in y1.saturating_sub(margin)..=(y2 + margin).min(h - 1) {
            let row = &mut flags[y * w..(y + 1) * w];
            row[x1.saturating_sub(margin)..=(x2 + margin).min(w - 1)].fill(true);
        }
    }
    (0..(w * h) as u32).filter(|&i| flags[i as usize]).collect()
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
}
