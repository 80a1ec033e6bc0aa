//! Values flowing between suffix steps, and their shapes: the one
//! description the lowering, the CPU executor and the GPU executor share.

use super::tokens::TokenSet;

/// What a suffix tensor is, without its values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shape {
    /// One row of `c` channels per active token of token-set `level`.
    Tokens { level: usize, c: usize },
    /// A tensor with no spatial extent left (after global pooling), ONNX shape.
    Dense { shape: Vec<usize> },
}

impl Shape {
    /// Channel count: row length for tokens, axis 1 for dense values (the
    /// one axis of a vector, as `Reshape` to `[-1]` leaves logits).
    pub fn channels(&self) -> usize {
        match self {
            Shape::Tokens { c, .. } => *c,
            Shape::Dense { shape } if shape.len() == 1 => shape[0],
            Shape::Dense { shape } => shape.get(1).copied().unwrap_or(1),
        }
    }

    /// The token level, `None` for a dense value.
    pub fn level(&self) -> Option<usize> {
        match self {
            Shape::Tokens { level, .. } => Some(*level),
            Shape::Dense { .. } => None,
        }
    }

    /// Values it holds, given the active tokens of every level.
    pub fn len(&self, tokens: &[usize]) -> usize {
        match self {
            Shape::Tokens { level, c } => tokens[*level] * c,
            Shape::Dense { shape } => shape.iter().product(),
        }
    }
}

/// A tensor in the sparse suffix: its shape and its values.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub shape: Shape,
    pub data: Vec<f32>,
}

impl Value {
    /// Token rows of `c` channels at `level`.
    pub fn tokens(level: usize, c: usize, data: Vec<f32>) -> Value {
        Value {
            shape: Shape::Tokens { level, c },
            data,
        }
    }

    /// A dense value of ONNX shape `shape`.
    pub fn dense(shape: Vec<usize>, data: Vec<f32>) -> Value {
        Value {
            shape: Shape::Dense { shape },
            data,
        }
    }

    /// The raw values.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The raw values, owned (to recycle the buffer).
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// The raw values, mutably.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Channel count: row length for tokens, axis 1 for dense values.
    pub fn channels(&self) -> usize {
        self.shape.channels()
    }

    /// The dense NCHW tensor this value stands for, with its shape: inactive
    /// positions hold `fill` (one value per channel) or zero. `sets` are the
    /// frame's token sets.
    pub fn to_dense(&self, sets: &[TokenSet], fill: Option<&[f32]>) -> (Vec<usize>, Vec<f32>) {
        match &self.shape {
            Shape::Dense { shape } => (shape.clone(), self.data.clone()),
            Shape::Tokens { level, c } => {
                let (c, data) = (*c, &self.data);
                let set = &sets[*level];
                let hw = set.h * set.w;
                let mut out = vec![0.0; c * hw];
                if let Some(f) = fill {
                    for (plane, &v) in out.chunks_exact_mut(hw).zip(f) {
                        plane.fill(v);
                    }
                }
                for (n, &i) in set.coords.iter().enumerate() {
                    for ch in 0..c {
                        out[ch * hw + i as usize] = data[n * c + ch];
                    }
                }
                (vec![1, c, set.h, set.w], out)
            }
        }
    }
}
