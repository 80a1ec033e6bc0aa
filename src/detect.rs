//! Reading a detector's output maps: CenterFace's decoding (every position
//! whose heatmap passes the threshold becomes a box from the scale and
//! offset maps, with five landmarks), greedy non-maximum suppression, and
//! the one-to-one matching of two frames' detections that fidelity is
//! measured with. Decoding follows deface 1.5.0's `CenterFace.decode`, so
//! ersm's dense run and deface's agree box for box.

use crate::model::manifest::DetectorSpec;
use anyhow::{ensure, Result};

/// One detected face, in input pixels (or frame pixels after [`Detection::scaled`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Detection {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
    pub score: f32,
    /// Eyes, nose, mouth corners: `(x, y)` each.
    pub landmarks: [[f32; 2]; 5],
}

impl Detection {
    /// Intersection over union of two boxes (0 when either is empty).
    pub fn iou(&self, o: &Detection) -> f32 {
        let w = (self.x2.min(o.x2) - self.x1.max(o.x1)).max(0.0);
        let h = (self.y2.min(o.y2) - self.y1.max(o.y1)).max(0.0);
        let inter = w * h;
        let union = self.area() + o.area() - inter;
        if union > 0.0 {
            inter / union
        } else {
            0.0
        }
    }

    fn area(&self) -> f32 {
        (self.x2 - self.x1).max(0.0) * (self.y2 - self.y1).max(0.0)
    }

    /// The detection with x scaled by `sx` and y by `sy` (input pixels to
    /// frame pixels).
    pub fn scaled(&self, sx: f32, sy: f32) -> Detection {
        Detection {
            x1: self.x1 * sx,
            y1: self.y1 * sy,
            x2: self.x2 * sx,
            y2: self.y2 * sy,
            score: self.score,
            landmarks: self.landmarks.map(|[x, y]| [x * sx, y * sy]),
        }
    }
}

/// Channels of CenterFace's four output maps: heatmap, scale, offset,
/// landmarks.
pub const CENTERFACE_CHANNELS: [usize; 4] = [1, 2, 2, 10];

/// Checks that a network's outputs (`[1, C, h, w]` each) are CenterFace's
/// four maps of one size; their `(h, w)`.
pub fn check_outputs(shapes: &[Vec<usize>]) -> Result<(usize, usize)> {
    let channels: Vec<usize> = shapes
        .iter()
        .map(|s| s.get(1).copied().unwrap_or(0))
        .collect();
    ensure!(
        shapes.len() == 4 && channels == CENTERFACE_CHANNELS,
        "a CenterFace detector has four output maps of 1, 2, 2 and 10 channels (heatmap, scale, offset, landmarks); the graph's are {shapes:?}"
    );
    let (h, w) = (shapes[0][2], shapes[0][3]);
    ensure!(
        shapes
            .iter()
            .all(|s| s.len() == 4 && s[0] == 1 && s[2] == h && s[3] == w),
        "a detector's output maps must be [1, C, h, w] of one size, are {shapes:?}"
    );
    Ok((h, w))
}

/// Decodes CenterFace's maps (`outputs`: the four maps of `h × w`, one
/// after another) into detections in input pixels, for an input of
/// `input_w × input_h` at `stride` pixels per map position. A position
/// holding zero, as a dropped token does, is "nothing here".
pub fn decode(
    outputs: &[f32],
    (h, w): (usize, usize),
    (input_w, input_h): (usize, usize),
    stride: f32,
    spec: &DetectorSpec,
) -> Result<Vec<Detection>> {
    let hw = h * w;
    ensure!(
        outputs.len() == 15 * hw,
        "detector outputs hold {} values, 15 maps of {h}×{w} expected",
        outputs.len()
    );
    let (heat, rest) = outputs.split_at(hw);
    let (scale, rest) = rest.split_at(2 * hw);
    let (offset, lms) = rest.split_at(2 * hw);
    let (iw, ih) = (input_w as f32, input_h as f32);
    let mut found = Vec::new();
    for (i, &score) in heat.iter().enumerate() {
        if score <= spec.threshold {
            continue;
        }
        let (y, x) = ((i / w) as f32, (i % w) as f32);
        let s0 = scale[i].exp() * stride;
        let s1 = scale[hw + i].exp() * stride;
        let (o0, o1) = (offset[i], offset[hw + i]);
        let x1 = ((x + o1 + 0.5) * stride - s1 / 2.0).max(0.0).min(iw);
        let y1 = ((y + o0 + 0.5) * stride - s0 / 2.0).max(0.0).min(ih);
        let landmarks = std::array::from_fn(|j| {
            [
                lms[(2 * j + 1) * hw + i] * s1 + x1,
                lms[2 * j * hw + i] * s0 + y1,
            ]
        });
        found.push(Detection {
            x1,
            y1,
            x2: (x1 + s1).min(iw),
            y2: (y1 + s0).min(ih),
            score,
            landmarks,
        });
    }
    Ok(nms(found, spec.nms_iou))
}

/// Greedy non-maximum suppression: highest score first, a box overlapping
/// a kept one at `iou` or more goes (ties keep raster order).
pub fn nms(mut boxes: Vec<Detection>, iou: f32) -> Vec<Detection> {
    boxes.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Detection> = Vec::new();
    for b in boxes {
        if kept.iter().all(|k| k.iou(&b) < iou) {
            kept.push(b);
        }
    }
    kept
}

/// How one frame's (or many frames') detections agree with the reference's
/// (the dense network's): matched one to one at IoU ≥ [`MATCH_IOU`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Agreement {
    /// Reference detections with a match.
    pub matched: usize,
    /// Reference detections.
    pub reference: usize,
    /// Detections under test.
    pub found: usize,
    /// Sum of the matched pairs' IoU.
    pub iou_sum: f64,
}

/// IoU from which two detections are the same face.
pub const MATCH_IOU: f32 = 0.5;

impl Agreement {
    /// Matches `found` to `reference` one to one, highest IoU first.
    pub fn of(reference: &[Detection], found: &[Detection]) -> Agreement {
        let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
        for (i, r) in reference.iter().enumerate() {
            for (j, f) in found.iter().enumerate() {
                let v = r.iou(f);
                if v >= MATCH_IOU {
                    pairs.push((v, i, j));
                }
            }
        }
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
        let (mut used_r, mut used_f) = (vec![false; reference.len()], vec![false; found.len()]);
        let mut a = Agreement {
            reference: reference.len(),
            found: found.len(),
            ..Agreement::default()
        };
        for (v, i, j) in pairs {
            if !used_r[i] && !used_f[j] {
                used_r[i] = true;
                used_f[j] = true;
                a.matched += 1;
                a.iou_sum += f64::from(v);
            }
        }
        a
    }

    /// Adds another frame's counts.
    pub fn add(&mut self, o: &Agreement) {
        self.matched += o.matched;
        self.reference += o.reference;
        self.found += o.found;
        self.iou_sum += o.iou_sum;
    }

    /// Reference faces found (1 when there were none): a missed face is a
    /// privacy leak.
    pub fn recall(&self) -> f64 {
        ratio(self.matched, self.reference)
    }

    /// Detections that are reference faces (1 when there were none).
    pub fn precision(&self) -> f64 {
        ratio(self.matched, self.found)
    }

    /// Harmonic mean of recall and precision.
    pub fn f1(&self) -> f64 {
        let (r, p) = (self.recall(), self.precision());
        if r + p > 0.0 {
            2.0 * r * p / (r + p)
        } else {
            0.0
        }
    }

    /// Mean IoU of the matched pairs (`None` without any).
    pub fn mean_iou(&self) -> Option<f64> {
        (self.matched > 0).then(|| self.iou_sum / self.matched as f64)
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DetectorSpec {
        DetectorSpec {
            decoder: "centerface".into(),
            threshold: 0.5,
            nms_iou: 0.3,
        }
    }

    /// Maps of `h × w` with one face centred at map position (y, x): a
    /// heatmap peak, a scale of `size` pixels, no offset.
    fn maps(h: usize, w: usize, faces: &[(usize, usize, f32, f32)]) -> Vec<f32> {
        let hw = h * w;
        let mut m = vec![0.0; 15 * hw];
        for &(y, x, score, size) in faces {
            let i = y * w + x;
            m[i] = score;
            m[hw + i] = (size / 4.0).ln();
            m[2 * hw + i] = (size / 4.0).ln();
            for j in 0..10 {
                m[5 * hw + j * hw + i] = 0.1 * j as f32;
            }
        }
        m
    }

    #[test]
    fn decodes_boxes_and_landmarks_as_deface_does() {
        let m = maps(30, 40, &[(10, 20, 0.9, 32.0)]);
        let d = decode(&m, (30, 40), (160, 120), 4.0, &spec()).unwrap();
        assert_eq!(d.len(), 1);
        // Centre (20 + 0.5) * 4 = 82, (10 + 0.5) * 4 = 42; 32 pixels a side.
        let b = d[0];
        assert!(
            (b.x1 - 66.0).abs() < 1e-4 && (b.y1 - 26.0).abs() < 1e-4,
            "{b:?}"
        );
        assert!(
            (b.x2 - 98.0).abs() < 1e-4 && (b.y2 - 58.0).abs() < 1e-4,
            "{b:?}"
        );
        // Landmark j: x from channel 2j + 1, y from channel 2j, in box units.
        assert!((b.landmarks[0][0] - (0.1 * 32.0 + 66.0)).abs() < 1e-4);
        assert!((b.landmarks[0][1] - 26.0).abs() < 1e-4);
    }

    #[test]
    fn zero_is_no_face_and_nms_keeps_the_best_of_overlapping_boxes() {
        let m = maps(
            30,
            40,
            &[(10, 20, 0.9, 32.0), (10, 21, 0.8, 32.0), (25, 5, 0.6, 16.0)],
        );
        let d = decode(&m, (30, 40), (160, 120), 4.0, &spec()).unwrap();
        let scores: Vec<f32> = d.iter().map(|b| b.score).collect();
        assert_eq!(scores, vec![0.9, 0.6], "the 0.8 box overlaps the 0.9 one");
        let none = decode(&vec![0.0; 15 * 1200], (30, 40), (160, 120), 4.0, &spec()).unwrap();
        assert!(
            none.is_empty(),
            "zero maps (every position dropped) hold no face"
        );
        assert!(decode(&m[1..], (30, 40), (160, 120), 4.0, &spec()).is_err());
    }

    #[test]
    fn agreement_matches_one_to_one() {
        let face = |x: f32| Detection {
            x1: x,
            y1: 0.0,
            x2: x + 10.0,
            y2: 10.0,
            score: 0.9,
            landmarks: [[0.0; 2]; 5],
        };
        let reference = [face(0.0), face(100.0)];
        // The closer of two candidates matches (IoU 95 / 105), the other
        // and a third box are extra, and the second face is missed.
        let found = [face(1.0), face(0.5), face(50.0)];
        let a = Agreement::of(&reference, &found);
        assert_eq!((a.matched, a.reference, a.found), (1, 2, 3));
        assert!((a.recall() - 0.5).abs() < 1e-9 && (a.precision() - 1.0 / 3.0).abs() < 1e-9);
        assert!((a.mean_iou().unwrap() - 0.9047619).abs() < 1e-6, "{a:?}");
        let empty = Agreement::of(&[], &[]);
        assert_eq!(
            (empty.recall(), empty.precision(), empty.f1()),
            (1.0, 1.0, 1.0)
        );
    }
}
