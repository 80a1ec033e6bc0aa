//! Values flowing between suffix steps.

use super::tokens::TokenSet;

/// A tensor in the sparse suffix.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// One row of `c` channels per active token of token-set `level`.
    Tokens {
        level: usize,
        c: usize,
        data: Vec<f32>,
    },
    /// A tensor with no spatial extent left (after global pooling), ONNX shape.
    Dense { shape: Vec<usize>, data: Vec<f32> },
}

impl Value {
    /// The raw values.
    pub fn data(&self) -> &[f32] {
        match self {
            Value::Tokens { data, .. } | Value::Dense { data, .. } => data,
        }
    }

    /// The raw values, owned (to recycle the buffer).
    pub fn into_data(self) -> Vec<f32> {
        match self {
            Value::Tokens { data, .. } | Value::Dense { data, .. } => data,
        }
    }

    /// The raw values, mutably.
    pub fn data_mut(&mut self) -> &mut [f32] {
        match self {
            Value::Tokens { data, .. } | Value::Dense { data, .. } => data,
        }
    }

    /// Channel count: row length for tokens, axis 1 for dense values.
    pub fn channels(&self) -> usize {
        match self {
            Value::Tokens { c, .. } => *c,
            Value::Dense { shape, .. } => shape.get(1).copied().unwrap_or(1),
        }
    }

    /// The dense NCHW tensor this value stands for, with its shape: inactive
    /// positions hold `fill` (one value per channel) or zero. `sets` are the
    /// frame's token sets.
    pub fn to_dense(&self, sets: &[TokenSet], fill: Option<&[f32]>) -> (Vec<usize>, Vec<f32>) {
        match self {
            Value::Dense { shape, data } => (shape.clone(), data.clone()),
            Value::Tokens { level, c, data } => {
                let set = &sets[*level];
                let hw = set.h * set.w;
                let mut out = vec![0.0; c * hw];
                if let Some(f) = fill {
                    for (plane, &v) in out.chunks_exact_mut(hw).zip(f) {
                        plane.fill(v);
                    }
                }
                for (n, &i) in set.coords.iter().enumerate() {
                    for ch in 0..*c {
                        out[ch * hw + i as usize] = data[n * c + ch];
                    }
                }
                (vec![1, *c, set.h, set.w], out)
            }
        }
    }
}
