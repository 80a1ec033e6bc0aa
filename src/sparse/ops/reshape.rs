//! Flatten and Reshape of dense values (after global pooling).

use super::Op;
use crate::sparse::{buffers::Buffers, plan::Frame, value::Value};
use anyhow::Result;
use std::borrow::Cow;

/// Changes a dense value's shape, keeping its data.
#[derive(Clone, Debug)]
pub struct Reshape {
    pub source: &'static str,
    pub shape: Vec<usize>,
}

impl Op for Reshape {
    fn name(&self) -> &'static str {
        self.source
    }

    fn eval(
        &self,
        mut inputs: Vec<Cow<'_, Value>>,
        _frame: &Frame,
        _bufs: &Buffers,
    ) -> Result<Value> {
        let data = match inputs.swap_remove(0).into_owned() {
            Value::Dense { data, .. } => data,
            Value::Tokens { .. } => {
                anyhow::bail!("{} of a token map is not supported", self.source)
            }
        };
        Ok(Value::Dense {
            shape: self.shape.clone(),
            data,
        })
    }

    fn in_place(&self) -> bool {
        true
    }

    fn cost(&self, _tokens: &[usize]) -> u64 {
        0
    }
}
