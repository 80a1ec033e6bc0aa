//! What a frame's outputs say, by the package's kind: a classifier's top-1
//! class, or a detector's faces (in frame pixels); and how ERSM's answer
//! compares with the dense baseline's on the same frame. One reader serves
//! every package: the manifest's `detector` section decides.

use crate::detect::{self, Agreement, Detection};
use crate::logits::{top1, top1_margin, SURE_MARGIN};
use crate::model::manifest::{DetectorSpec, Manifest};
use anyhow::{ensure, Result};

/// How a package's outputs are read, fixed at load.
#[derive(Clone, Debug)]
pub enum Reader {
    /// Logits over the manifest's labels.
    Classifier,
    /// CenterFace's four maps of `map` (h, w) for an input of `input` (w, h).
    Detector {
        spec: DetectorSpec,
        map: (usize, usize),
        input: (usize, usize),
    },
    /// Several outputs and no decoder named: the network runs (the tests'
    /// random networks), but no answer can be read from it. A package
    /// loaded from a folder must not be this.
    Unread { outputs: usize },
}

impl Reader {
    /// The reader of a network whose outputs have `shapes`, checked against
    /// what the manifest declares.
    pub fn new(manifest: &Manifest, shapes: &[Vec<usize>]) -> Result<Reader> {
        let Some(spec) = &manifest.detector else {
            return Ok(match shapes {
                [shape] => {
                    // A feature map is not logits: one value per label.
                    let values: usize = shape.iter().product();
                    let labels = manifest.labels.len();
                    ensure!(
                        labels == 0 || values == labels,
                        "the output is {shape:?} ({values} values) and the manifest lists {labels} labels: a classifier's output holds one logit per label"
                    );
                    Reader::Classifier
                }
                _ => Reader::Unread {
                    outputs: shapes.len(),
                },
            });
        };
        let map = detect::check_outputs(shapes)?;
        let s = &manifest.input.shape;
        let input = (s[3], s[2]);
        ensure!(
            input.0 == map.1 * 4 && input.1 == map.0 * 4,
            "a CenterFace detector's maps are a quarter of its input: {}×{} maps for a {}×{} input",
            map.1,
            map.0,
            input.0,
            input.1
        );
        Ok(Reader::Detector {
            spec: spec.clone(),
            map,
            input,
        })
    }

    /// Fails unless an answer can be read: a classifier's one output, or a
    /// decoder the manifest names.
    pub fn check_readable(&self) -> Result<()> {
        match self {
            Reader::Unread { outputs } => anyhow::bail!(
                "a classifier has one output (its logits), the graph has {outputs}; a detector's manifest names its decoder (\"detector\")"
            ),
            _ => Ok(()),
        }
    }

    /// True for a detector.
    pub fn is_detector(&self) -> bool {
        matches!(self, Reader::Detector { .. })
    }

    /// The answer in `outputs` (every output, one after another) for a
    /// frame of `width × height` pixels.
    pub fn read(&self, outputs: &[f32], width: usize, height: usize) -> Result<Answer> {
        match self {
            Reader::Unread { outputs } => {
                anyhow::bail!("a network of {outputs} outputs with no decoder named has no answer")
            }
            Reader::Classifier => Ok(Answer::Class {
                index: top1(outputs),
                margin: top1_margin(outputs),
            }),
            Reader::Detector { spec, map, input } => {
                let found = detect::decode(outputs, *map, *input, 4.0, spec)?;
                // The input is the whole frame stretched (preprocess.resize).
                let (sx, sy) = (
                    width as f32 / input.0 as f32,
                    height as f32 / input.1 as f32,
                );
                Ok(Answer::Faces(
                    found.iter().map(|d| d.scaled(sx, sy)).collect(),
                ))
            }
        }
    }
}

/// One frame's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// The top-1 class and its softmax margin over the second.
    Class { index: usize, margin: f32 },
    /// Faces found, in frame pixels.
    Faces(Vec<Detection>),
}

impl Answer {
    /// A short text for captions and logs: the class's label, or the face count.
    pub fn label(&self, manifest: &Manifest) -> String {
        match self {
            Answer::Class { index, .. } => manifest.label(*index),
            Answer::Faces(f) if f.len() == 1 => "1 face".into(),
            Answer::Faces(f) => format!("{} faces", f.len()),
        }
    }

    /// The class, for a classifier.
    pub fn class(&self) -> Option<usize> {
        match self {
            Answer::Class { index, .. } => Some(*index),
            Answer::Faces(_) => None,
        }
    }

    /// The faces, for a detector (none for a classifier).
    pub fn faces(&self) -> &[Detection] {
        match self {
            Answer::Faces(f) => f,
            Answer::Class { .. } => &[],
        }
    }
}

/// How ERSM's answer on a frame compares with the dense baseline's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Comparison {
    /// Same top-1 class; whether dense was sure (margin ≥ `SURE_MARGIN`).
    Class { agree: bool, sure: bool },
    /// ERSM's faces matched to dense's.
    Faces(Agreement),
}

impl Comparison {
    /// ERSM's `ersm` against dense's `dense` answer on one frame.
    pub fn of(ersm: &Answer, dense: &Answer) -> Comparison {
        match (ersm, dense) {
            (Answer::Class { index: a, .. }, Answer::Class { index: b, margin }) => {
                Comparison::Class {
                    agree: a == b,
                    sure: f64::from(*margin) >= SURE_MARGIN,
                }
            }
            _ => Comparison::Faces(Agreement::of(dense.faces(), ersm.faces())),
        }
    }

    /// The frame counts as agreeing: the same class, or every dense face
    /// found and nothing else.
    pub fn agrees(&self) -> bool {
        match self {
            Comparison::Class { agree, .. } => *agree,
            Comparison::Faces(a) => a.matched == a.reference && a.matched == a.found,
        }
    }
}
