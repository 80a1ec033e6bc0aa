//! A gate: a second `ersm.EnergyMask` inside the suffix. It reads a token
//! map as the sparse run computes it (its fill, or zero, at dropped
//! positions), computes the energy layer's equations on it (the CPU energy
//! layer of `crate::ersm::cpu`), and keeps the active positions whose
//! energy is negative (the lowest-energy one if none is): a narrower set
//! for everything read after it. No GPU kernel yet: a suffix with a gate
//! stays on the CPU.

use super::{OnnxNode, Op, Tensor};
use crate::ersm::{cpu, EnergySpec, FeatureMap, TokenMask};
use crate::sparse::{buffers::Buffers, frame::Frame, value::Shape, value::Value};
use anyhow::{bail, ensure, Result};
use std::borrow::Cow;

/// The energy layer's ONNX domain (the gate's op type is the energy layer's).
const DOMAIN: &str = "ersm";

/// The cut's energy node sets these for the whole suffix; a gate may not.
const CUT_ONLY: [&str; 2] = ["stride_rule", "fills"];

/// One gate, lowered.
#[derive(Debug)]
pub struct Gate {
    pub spec: EnergySpec,
    /// The gate's number among the suffix's gates (its level's `gate`).
    pub gate: usize,
    pub in_level: usize,
    pub out_level: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// What the input holds at dropped positions (its fill vector), as the
    /// energy head reads it.
    pub fill: Option<Vec<f32>>,
}

/// Lowers a gate node: its input must be a token map.
pub fn from_onnx(n: &mut OnnxNode<'_>) -> Result<Tensor> {
    ensure!(
        n.node.domain == DOMAIN,
        "domain is '{}', expected '{DOMAIN}'",
        n.node.domain
    );
    if let Some(a) = n
        .node
        .attribute
        .iter()
        .find(|a| CUT_ONLY.contains(&a.name.as_str()))
    {
        bail!(
            "'{}' is set on the first energy layer (the cut) for the whole suffix; a second one may not set it",
            a.name
        );
    }
    let input = n.input(0)?;
    let Shape::Tokens { level, c } = input.shape else {
        bail!("a second energy layer must read a token map, not a pooled value");
    };
    let spec = crate::ersm::node::spec(n.node, n.consts, c)?;
    let fill = n.fill(input.slot).cloned();
    let (h, w) = (n.lowered.levels[level].h, n.lowered.levels[level].w);
    let (gate, out_level) = n.lowered.gate_level(level);
    let op = Gate {
        spec,
        gate,
        in_level: level,
        out_level,
        c,
        h,
        w,
        fill,
    };
    Ok(n.emit(
        op,
        vec![input.slot],
        Shape::Tokens {
            level: out_level,
            c,
        },
    ))
}

impl Gate {
    /// The raster indices this gate keeps of its input `x` (tokens of its
    /// input level, whose set `frame` holds): the input level's positions
    /// whose final energy is negative, or the lowest-energy one (first in
    /// raster order) if none is, so a level is never empty.
    pub fn keeps(&self, x: &Value, frame: &Frame) -> Result<Vec<u32>> {
        let (_, map) = x.to_dense(&frame.sets, self.fill.as_deref());
        let fm = FeatureMap::new(&map, self.c, self.h, self.w)?;
        let u = cpu::unary(fm, &self.spec.head);
        let e = cpu::mean_field(&u, self.h, self.w, &self.spec);
        if let Some(why) = TokenMask::non_finite(&e) {
            bail!(why);
        }
        let active = &frame.sets[self.in_level].coords;
        let kept: Vec<u32> = active
            .iter()
            .copied()
            .filter(|&i| e[i as usize] < 0.0)
            .collect();
        if !kept.is_empty() || active.is_empty() {
            return Ok(kept);
        }
        let mut best = active[0];
        for &i in active {
            if e[i as usize] < e[best as usize] {
                best = i;
            }
        }
        Ok(vec![best])
    }
}

impl Op for Gate {
    fn name(&self) -> &'static str {
        "Gate"
    }

    /// The input's rows at the gate's kept positions.
    fn eval(&self, inputs: Vec<Cow<'_, Value>>, frame: &Frame, bufs: &Buffers) -> Result<Value> {
        ensure!(
            frame.has(self.out_level),
            "internal: gate {} ran before its set was built",
            self.gate
        );
        let (from, to) = (&frame.sets[self.in_level], &frame.sets[self.out_level]);
        let x = inputs[0].data();
        let mut rows = bufs.take_for_writing(to.len() * self.c);
        for (row, &i) in rows.chunks_exact_mut(self.c).zip(&to.coords) {
            let n = from.index[i as usize] as usize;
            row.copy_from_slice(&x[n * self.c..(n + 1) * self.c]);
        }
        Ok(Value::tokens(self.out_level, self.c, rows))
    }

    /// The head runs on the input level's whole map (the mean field reads
    /// every neighbour): its multiply-adds there, whatever is active.
    fn cost(&self, _tokens: &[usize]) -> u64 {
        self.spec.head.macs(self.h, self.w)
    }

    fn gate(&self) -> Option<&Gate> {
        Some(self)
    }
}
