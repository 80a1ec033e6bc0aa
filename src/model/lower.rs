//! Lowering the graph after the energy layer into a sparse [`Plan`].
//!
//! Walks the suffix nodes in graph order, tracking for every tensor whether it
//! is a token map (and at which level) or a dense value, folds each
//! BatchNormalization into the Conv before it, and packs weights for the ops.

use super::onnx::{attr_f32, attr_i64, attr_ints, conv_pads, label, node_name, Constants};
use crate::sparse::gemm::Weights;
use crate::sparse::ops::*;
use crate::sparse::rulebook::Window;
use crate::sparse::Plan;
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use tract_onnx::pb::NodeProto;

/// The ops the sparse executor runs.
pub const SUPPORTED: &[&str] = &[
    "Conv",
    "BatchNormalization",
    "Relu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Add",
    "Mul",
    "GlobalAveragePool",
    "ReduceMean",
    "Flatten",
    "Reshape",
    "Gemm",
    "MatMul",
    "Identity",
    "Dropout",
];

/// What a tensor is while lowering.
#[derive(Clone, Debug)]
enum Kind {
    Tokens { slot: usize, level: usize, c: usize },
    Dense { slot: usize, shape: Vec<usize> },
}

impl Kind {
    fn slot(&self) -> usize {
        match self {
            Kind::Tokens { slot, .. } | Kind::Dense { slot, .. } => *slot,
        }
    }
}

/// Lowers `nodes` (the suffix, in graph order) reading `input` (`c × h × w`
/// tokens) and producing `output`. `fills` name the token maps whose dropped
/// positions hold a fill vector instead of zero.
pub fn lower(
    nodes: &[NodeProto],
    consts: &Constants,
    input: &str,
    (c, h, w): (usize, usize, usize),
    output: &str,
    fills: &[(String, Vec<f32>)],
) -> Result<Plan> {
    let mut plan = Plan::new(input, c, h, w);
    let mut unused: Vec<&str> = fills.iter().map(|(n, _)| n.as_str()).collect();
    // Fills attach to a tensor as soon as it is lowered, so every later reader sees them.
    let mut attach_fill = |plan: &mut Plan, name: &str, kind: &Kind| -> Result<()> {
        let Some((_, f)) = fills.iter().find(|(n, _)| n == name) else {
            return Ok(());
        };
        let Kind::Tokens { slot, c, .. } = kind else {
            bail!("the energy layer's fill for '{name}': it has no spatial extent (only token maps hold dropped positions)");
        };
        ensure!(
            f.len() == *c,
            "the energy layer's fill for '{name}' has {} values, the tensor has {c} channels",
            f.len()
        );
        // On an alias, ops lowered before it would already have read the
        // source without the fill: the fill must name the source.
        let source = &plan.slot_names[*slot];
        ensure!(
            source == name,
            "the energy layer's fill for '{name}': it is an Identity or Dropout of '{source}'; name '{source}' instead"
        );
        plan.slot_fills[*slot] = Some(f.clone());
        unused.retain(|u| *u != name);
        Ok(())
    };
    let mut tensors: HashMap<String, Kind> = HashMap::new();
    let input_kind = Kind::Tokens {
        slot: 0,
        level: 0,
        c,
    };
    attach_fill(&mut plan, input, &input_kind)?;
    plan.fillable.insert(input.to_string(), c);
    tensors.insert(input.to_string(), input_kind);
    let consumers = |name: &str| {
        nodes
            .iter()
            .filter(|n| n.input.iter().any(|i| i == name))
            .count()
    };
    let mut folded: Vec<bool> = vec![false; nodes.len()];
    for (ix, node) in nodes.iter().enumerate() {
        if folded[ix] || node.op_type == "Constant" {
            continue;
        }
        if !SUPPORTED.contains(&node.op_type.as_str()) {
            bail!(
                "{} after the energy layer is not supported by the sparse executor (supported: {})",
                label(node),
                SUPPORTED.join(", ")
            );
        }
        // A BatchNormalization right after a Conv, reading nothing else, is folded into it.
        let bn = nodes.get(ix + 1).filter(|next| {
            node.op_type == "Conv"
                && next.op_type == "BatchNormalization"
                && next.input.first() == node.output.first()
                && consumers(&node.output[0]) == 1
                && node.output[0] != output
        });
        let mut ctx = Lowering {
            plan: &mut plan,
            tensors: &tensors,
            consts,
            node,
        };
        let kind = ctx.node(bn).with_context(|| label(node))?;
        let out = match bn {
            Some(bn) => {
                folded[ix + 1] = true;
                bn.output[0].clone()
            }
            None => node.output.first().cloned().unwrap_or_default(),
        };
        attach_fill(&mut plan, &out, &kind).with_context(|| label(node))?;
        if let Kind::Tokens { c, .. } = kind {
            plan.fillable.insert(out.clone(), c);
        }
        tensors.insert(out, kind);
    }
    if let Some(name) = unused.first() {
        bail!("the energy layer's fill for '{name}': no such tensor after the energy layer (a Conv output folded with its BatchNormalization is named by the BatchNormalization's output)");
    }
    let out = tensors.get(output).with_context(|| {
        format!("graph output '{output}' is not computed after the energy layer")
    })?;
    plan.finish(out.slot());
    for (name, kind) in &tensors {
        plan.tensors.insert(name.clone(), kind.slot());
    }
    Ok(plan)
}

struct Lowering<'a> {
    plan: &'a mut Plan,
    tensors: &'a HashMap<String, Kind>,
    consts: &'a Constants,
    node: &'a NodeProto,
}

impl Lowering<'_> {
    fn input(&self, k: usize) -> Result<&Kind> {
        let name = self
            .node
            .input
            .get(k)
            .with_context(|| format!("missing input {k}"))?;
        if self.consts.contains(name) {
            bail!("input {k} ('{name}') is a constant; the sparse executor needs a computed tensor here");
        }
        self.tensors.get(name).with_context(|| {
            format!("input '{name}' is not computed after the energy layer (it must not read tensors from before the cut)")
        })
    }

    fn constant(&self, k: usize) -> Result<Option<Vec<f32>>> {
        match self.node.input.get(k).filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(name) if self.consts.contains(name) => Ok(Some(self.consts.f32s(name)?)),
            Some(name) => bail!("input {k} ('{name}') must be a constant"),
        }
    }

    fn emit(&mut self, op: Box<dyn Op>, inputs: Vec<usize>, level: Option<usize>) -> usize {
        let name = self.node.output.first().cloned().unwrap_or_default();
        let slot = self.plan.slot(&name, level);
        self.plan.push(node_name(self.node), op, inputs, slot);
        slot
    }

    fn node(&mut self, bn: Option<&NodeProto>) -> Result<Kind> {
        let op = self.node.op_type.as_str();
        // Inputs each op reads by position (optional ones past these are
        // looked up with `get`): a node with fewer is malformed.
        let needs = match op {
            "Add" | "Mul" | "MatMul" | "Gemm" | "Conv" | "Reshape" => 2,
            "BatchNormalization" => 5,
            _ => 1,
        };
        ensure!(
            self.node.input.len() >= needs
                && self.node.input[..needs].iter().all(|i| !i.is_empty()),
            "{op} needs {needs} inputs, has {}",
            self.node.input.iter().filter(|i| !i.is_empty()).count()
        );
        match op {
            "Identity" | "Dropout" => Ok(self.input(0)?.clone()),
            "Conv" => self.conv(bn),
            "BatchNormalization" => {
                let x = self.input(0)?.clone();
                let (scale, shift) = batch_norm(self.node, self.consts)?;
                self.affine("BatchNorm", x, scale, shift)
            }
            "Relu" => self.activation(ActivationKind::Relu),
            "Sigmoid" => self.activation(ActivationKind::Sigmoid),
            "HardSwish" => self.activation(ActivationKind::HardSwish),
            "HardSigmoid" => {
                let alpha = attr_f32(self.node, "alpha", Some(0.2))?;
                let beta = attr_f32(self.node, "beta", Some(0.5))?;
                self.activation(ActivationKind::HardSigmoid { alpha, beta })
            }
            "Clip" => {
                let bound = |k: usize, attr: &str, default: f32| -> Result<f32> {
                    match self.constant(k)? {
                        Some(v) if v.len() == 1 => Ok(v[0]),
                        Some(v) => bail!("Clip bound must be a scalar, has {} values", v.len()),
                        None => attr_f32(self.node, attr, Some(default)),
                    }
                };
                let lo = bound(1, "min", f32::NEG_INFINITY)?;
                let hi = bound(2, "max", f32::INFINITY)?;
                ensure!(lo <= hi, "Clip min {lo} > max {hi}");
                self.activation(ActivationKind::Clip { lo, hi })
            }
            "Add" | "Mul" => self.binary(),
            "GlobalAveragePool" => self.pool(vec![2, 3], true),
            "ReduceMean" => {
                let axes = match attr_ints(self.node, "axes")? {
                    Some(a) => a,
                    None => match self.node.input.get(1).filter(|s| !s.is_empty()) {
                        Some(name) => self.consts.i64s(name)?,
                        None => {
                            bail!("ReduceMean over all axes is not supported; give axes [2, 3]")
                        }
                    },
                };
                let keep = attr_i64(self.node, "keepdims", Some(1))? != 0;
                self.pool(axes, keep)
            }
            "Flatten" => {
                let (slot, shape) = self.dense_input("Flatten")?;
                let axis = attr_i64(self.node, "axis", Some(1))?;
                let axis = if axis < 0 {
                    axis + shape.len() as i64
                } else {
                    axis
                } as usize;
                ensure!(
                    axis <= shape.len(),
                    "Flatten axis {axis} out of range for {shape:?}"
                );
                let shape = vec![
                    shape[..axis].iter().product(),
                    shape[axis..].iter().product(),
                ];
                self.reshape("Flatten", slot, shape)
            }
            "Reshape" => {
                let (slot, shape) = self.dense_input("Reshape")?;
                let target = match self.node.input.get(1) {
                    Some(name) if self.consts.contains(name) => self.consts.i64s(name)?,
                    _ => bail!("Reshape target shape must be a constant"),
                };
                let shape = reshape_target(&shape, &target)?;
                self.reshape("Reshape", slot, shape)
            }
            "Gemm" => self.gemm(),
            "MatMul" => {
                let (slot, shape) = self.dense_input("MatMul")?;
                let name = &self.node.input[1];
                let b_shape = self
                    .consts
                    .shape(name)
                    .context("MatMul B must be a constant")?
                    .to_vec();
                ensure!(b_shape.len() == 2, "MatMul B must be 2-D, is {b_shape:?}");
                let k: usize = shape.iter().product();
                ensure!(shape.last() == Some(&b_shape[0]) && k == b_shape[0], "MatMul of {shape:?} by {b_shape:?}: only a single row times a matrix is supported");
                let weights = Weights {
                    k,
                    n: b_shape[1],
                    data: self.consts.f32s(name)?,
                };
                let mut out_shape = shape.clone();
                *out_shape.last_mut().unwrap() = b_shape[1];
                let op = Linear {
                    source: "MatMul",
                    bias: vec![0.0; b_shape[1]],
                    weights,
                    shape: out_shape.clone(),
                    act: None,
                };
                Ok(Kind::Dense {
                    slot: self.emit(Box::new(op), vec![slot], None),
                    shape: out_shape,
                })
            }
            other => bail!("unsupported op {other}"),
        }
    }

    fn dense_input(&self, op: &str) -> Result<(usize, Vec<usize>)> {
        match self.input(0)? {
            Kind::Dense { slot, shape } => Ok((*slot, shape.clone())),
            Kind::Tokens { .. } => bail!("{op} of a spatial token map is not supported by the sparse executor; pool it first"),
        }
    }

    fn activation(&mut self, kind: ActivationKind) -> Result<Kind> {
        let x = self.input(0)?.clone();
        let op = Box::new(Activation { kind });
        Ok(match x {
            Kind::Tokens { slot, level, c } => Kind::Tokens {
                slot: self.emit(op, vec![slot], Some(level)),
                level,
                c,
            },
            Kind::Dense { slot, shape } => Kind::Dense {
                slot: self.emit(op, vec![slot], None),
                shape,
            },
        })
    }

    fn affine(
        &mut self,
        source: &'static str,
        x: Kind,
        scale: Vec<f32>,
        shift: Vec<f32>,
    ) -> Result<Kind> {
        let c = match &x {
            Kind::Tokens { c, .. } => *c,
            Kind::Dense { shape, .. } => shape.get(1).copied().unwrap_or(1),
        };
        ensure!(
            scale.len() == c && shift.len() == c,
            "per-channel parameters have {} values, tensor has {c} channels",
            scale.len()
        );
        Ok(match x {
            Kind::Tokens { slot, level, c } => {
                let op = Box::new(ChannelAffine {
                    source,
                    scale,
                    shift,
                    level: Some(level),
                });
                Kind::Tokens {
                    slot: self.emit(op, vec![slot], Some(level)),
                    level,
                    c,
                }
            }
            Kind::Dense { slot, shape } => {
                let op = Box::new(ChannelAffine {
                    source,
                    scale,
                    shift,
                    level: None,
                });
                Kind::Dense {
                    slot: self.emit(op, vec![slot], None),
                    shape,
                }
            }
        })
    }

    fn binary(&mut self) -> Result<Kind> {
        let kind = if self.node.op_type == "Add" {
            BinaryKind::Add
        } else {
            BinaryKind::Mul
        };
        let (a, b) = (&self.node.input[0], &self.node.input[1]);
        let (a_const, b_const) = (self.consts.contains(a), self.consts.contains(b));
        if a_const && b_const {
            bail!("both operands are constants");
        }
        if a_const || b_const {
            // x op constant: a per-channel affine map.
            let (k, name) = if a_const { (1, a) } else { (0, b) };
            let x = self.input(k)?.clone();
            let (rank, c) = match &x {
                Kind::Tokens { c, .. } => (4, *c),
                Kind::Dense { shape, .. } => (shape.len(), shape.get(1).copied().unwrap_or(1)),
            };
            let shape = self.consts.shape(name).unwrap_or(&[]).to_vec();
            let v = per_channel(&shape, rank, c, self.consts.f32s(name)?)
                .with_context(|| format!("constant '{name}' of shape {shape:?} does not broadcast per channel over a {c}-channel tensor"))?;
            let (scale, shift) = match kind {
                BinaryKind::Add => (vec![1.0; c], v),
                BinaryKind::Mul => (v, vec![0.0; c]),
            };
            let source = if kind == BinaryKind::Add {
                "AddConst"
            } else {
                "MulConst"
            };
            return self.affine(source, x, scale, shift);
        }
        let (x, y) = (self.input(0)?.clone(), self.input(1)?.clone());
        let inputs = vec![x.slot(), y.slot()];
        // A token operand decides the result's set; the other operand is tokens
        // of the same set or a per-channel value.
        let tokens = match (&x, &y) {
            (
                Kind::Tokens {
                    level: la, c: ca, ..
                },
                Kind::Tokens {
                    level: lb, c: cb, ..
                },
            ) => {
                ensure!(
                    la == lb,
                    "operands are token maps of different resolutions (levels {la} and {lb})"
                );
                ensure!(ca == cb, "operands have {ca} and {cb} channels");
                Some((*la, *ca))
            }
            (Kind::Tokens { level, c, .. }, Kind::Dense { shape, .. })
            | (Kind::Dense { shape, .. }, Kind::Tokens { level, c, .. }) => {
                ensure!(
                    shape.len() == 4 && shape[1] == *c && shape.iter().product::<usize>() == *c,
                    "a token map ({c} channels) can only be combined with a [1, {c}, 1, 1] per-channel value, got {shape:?}"
                );
                Some((*level, *c))
            }
            _ => None,
        };
        if let Some((level, c)) = tokens {
            let op = Box::new(Binary {
                kind,
                c,
                level: Some(level),
            });
            let slot = self.emit(op, inputs, Some(level));
            return Ok(Kind::Tokens { slot, level, c });
        }
        match (&x, &y) {
            (Kind::Dense { shape: sa, .. }, Kind::Dense { shape: sb, .. }) => {
                ensure!(
                    sa == sb,
                    "dense operands of shapes {sa:?} and {sb:?}: only equal shapes are supported"
                );
                let shape = sa.clone();
                let op = Box::new(Binary {
                    kind,
                    c: shape.iter().product(),
                    level: None,
                });
                Ok(Kind::Dense {
                    slot: self.emit(op, inputs, None),
                    shape,
                })
            }
            _ => bail!("internal: token operands are handled above"),
        }
    }

    fn pool(&mut self, axes: Vec<i64>, keep: bool) -> Result<Kind> {
        let mut axes: Vec<i64> = axes
            .iter()
            .map(|&a| if a < 0 { a + 4 } else { a })
            .collect();
        axes.sort();
        ensure!(
            axes == [2, 3],
            "only the mean over both spatial axes is supported, got axes {axes:?}"
        );
        let Kind::Tokens { slot, level, c } = self.input(0)?.clone() else {
            bail!("global pooling of a value that has no spatial extent");
        };
        let shape = if keep { vec![1, c, 1, 1] } else { vec![1, c] };
        let source = if self.node.op_type == "ReduceMean" {
            "ReduceMean"
        } else {
            "GlobalAveragePool"
        };
        let op = Box::new(GlobalMean {
            source,
            level,
            c,
            shape: shape.clone(),
            fill: self.plan.slot_fills[slot].clone(),
        });
        Ok(Kind::Dense {
            slot: self.emit(op, vec![slot], None),
            shape,
        })
    }

    fn reshape(&mut self, source: &'static str, slot: usize, shape: Vec<usize>) -> Result<Kind> {
        let op = Box::new(Reshape {
            source,
            shape: shape.clone(),
        });
        Ok(Kind::Dense {
            slot: self.emit(op, vec![slot], None),
            shape,
        })
    }

    fn gemm(&mut self) -> Result<Kind> {
        let (slot, shape) = self.dense_input("Gemm")?;
        ensure!(
            attr_i64(self.node, "transA", Some(0))? == 0,
            "Gemm with transA is not supported"
        );
        ensure!(
            shape.len() == 2 && shape[0] == 1,
            "Gemm input must be [1, K], is {shape:?}"
        );
        let alpha = attr_f32(self.node, "alpha", Some(1.0))?;
        let beta = attr_f32(self.node, "beta", Some(1.0))?;
        let trans_b = attr_i64(self.node, "transB", Some(0))? != 0;
        let name = &self.node.input[1];
        let bs = self
            .consts
            .shape(name)
            .context("Gemm B must be a constant")?
            .to_vec();
        ensure!(bs.len() == 2, "Gemm B must be 2-D, is {bs:?}");
        let (k, n) = if trans_b {
            (bs[1], bs[0])
        } else {
            (bs[0], bs[1])
        };
        ensure!(
            k == shape[1],
            "Gemm: input has {} features, B expects {k}",
            shape[1]
        );
        let b = self.consts.f32s(name)?;
        let mut data = vec![0.0; k * n];
        for i in 0..k {
            for j in 0..n {
                data[i * n + j] = alpha * if trans_b { b[j * k + i] } else { b[i * n + j] };
            }
        }
        let bias = match self.constant(2)? {
            None => vec![0.0; n],
            Some(v) if v.len() == n => v.iter().map(|x| beta * x).collect(),
            Some(v) if v.len() == 1 => vec![beta * v[0]; n],
            Some(v) => bail!("Gemm C has {} values, expected {n} or 1", v.len()),
        };
        let op = Box::new(Linear {
            source: "Gemm",
            weights: Weights { k, n, data },
            bias,
            shape: vec![1, n],
            act: None,
        });
        Ok(Kind::Dense {
            slot: self.emit(op, vec![slot], None),
            shape: vec![1, n],
        })
    }

    fn conv(&mut self, bn: Option<&NodeProto>) -> Result<Kind> {
        let node = self.node;
        let x = self.input(0)?.clone();
        let wname = node.input.get(1).context("Conv has no weight input")?;
        let ws = self
            .consts
            .shape(wname)
            .with_context(|| format!("Conv weight '{wname}' must be a constant"))?
            .to_vec();
        ensure!(
            ws.len() == 4,
            "only 2-D convs are supported, weight shape {ws:?}"
        );
        let (cout, cin_g, kh, kw) = (ws[0], ws[1], ws[2], ws[3]);
        let groups = attr_i64(node, "group", Some(1))? as usize;
        ensure!(
            groups >= 1 && cout % groups == 0,
            "group {groups} does not divide {cout} output channels"
        );
        let cin = cin_g * groups;
        let strides = attr_ints(node, "strides")?.unwrap_or(vec![1, 1]);
        ensure!(
            strides.len() == 2 && strides[0] == strides[1] && strides[0] >= 1,
            "only equal strides are supported, got {strides:?}"
        );
        let stride = strides[0] as usize;
        let pads = conv_pads(node)?;
        let mut weights = self.consts.f32s(wname)?;
        let mut bias = self.constant(2)?.unwrap_or(vec![0.0; cout]);
        ensure!(
            bias.len() == cout,
            "Conv bias has {} values, expected {cout}",
            bias.len()
        );
        if let Some(bn) = bn {
            let (scale, shift) = batch_norm(bn, self.consts).with_context(|| label(bn))?;
            ensure!(
                scale.len() == cout,
                "{} has {} channels, the conv {cout}",
                label(bn),
                scale.len()
            );
            let per = weights.len() / cout;
            for co in 0..cout {
                weights[co * per..(co + 1) * per]
                    .iter_mut()
                    .for_each(|w| *w *= scale[co]);
                bias[co] = bias[co] * scale[co] + shift[co];
            }
        }
        let taps = kh * kw;
        let out_name = bn.map_or(&node.output[0], |b| &b.output[0]).clone();
        match x {
            Kind::Dense { slot, shape } => {
                ensure!(
                    shape.len() == 4 && shape[1] == cin && shape[2] == 1 && shape[3] == 1 && taps == 1 && pads.iter().all(|&p| p == 0),
                    "a conv after global pooling must be 1×1 without padding on a [1, {cin}, 1, 1] value, got {shape:?}"
                );
                // Block-diagonal for grouped 1×1 convs.
                let cout_g = cout / groups;
                let mut data = vec![0.0; cin * cout];
                for co in 0..cout {
                    let g = co / cout_g;
                    for ci in 0..cin_g {
                        data[(g * cin_g + ci) * cout + co] = weights[co * cin_g + ci];
                    }
                }
                let op = Linear {
                    source: "Conv1x1",
                    weights: Weights {
                        k: cin,
                        n: cout,
                        data,
                    },
                    bias,
                    shape: vec![1, cout, 1, 1],
                    act: None,
                };
                let slot = self.emit_named(&out_name, Box::new(op), vec![slot], None);
                Ok(Kind::Dense {
                    slot,
                    shape: vec![1, cout, 1, 1],
                })
            }
            Kind::Tokens { slot, level, c } => {
                ensure!(
                    c == cin,
                    "Conv expects {cin} input channels, the tensor has {c}"
                );
                let lv = self.plan.levels[level].clone();
                let oh = (lv.h + pads[0] + pads[2])
                    .checked_sub(kh)
                    .map(|v| v / stride + 1);
                let ow = (lv.w + pads[1] + pads[3])
                    .checked_sub(kw)
                    .map(|v| v / stride + 1);
                let (oh, ow) = oh.zip(ow).with_context(|| {
                    format!(
                        "kernel {kh}×{kw} larger than the padded {}×{} map",
                        lv.h, lv.w
                    )
                })?;
                let out_level = if stride == 1 {
                    ensure!(
                        (oh, ow) == (lv.h, lv.w),
                        "a stride-1 conv must keep the map size for submanifold semantics; pads {pads:?} turn {}×{} into {oh}×{ow}",
                        lv.h,
                        lv.w
                    );
                    level
                } else {
                    self.plan.child_level(level, stride, oh, ow)
                };
                let window = Window {
                    kh,
                    kw,
                    stride,
                    pad_top: pads[0],
                    pad_left: pads[1],
                };
                let pointwise = taps == 1 && stride == 1 && pads.iter().all(|&p| p == 0);
                let op: Box<dyn Op> = if pointwise && groups == 1 {
                    let mut data = vec![0.0; cin * cout];
                    for co in 0..cout {
                        for ci in 0..cin {
                            data[ci * cout + co] = weights[co * cin + ci];
                        }
                    }
                    Box::new(Conv {
                        cin,
                        cout,
                        groups,
                        window,
                        in_level: level,
                        out_level,
                        rulebook: None,
                        weights: vec![Weights {
                            k: cin,
                            n: cout,
                            data,
                        }],
                        bias,
                        fill: None,
                        act: None,
                    })
                } else if groups == cin && cout == cin {
                    let rulebook = self.plan.rulebook(level, out_level, window);
                    let mut data = vec![0.0; taps * c];
                    for ch in 0..c {
                        for t in 0..taps {
                            data[t * c + ch] = weights[ch * taps + t];
                        }
                    }
                    // A dropped neighbour adds its tap's weight times the fill:
                    // one precomputed row per tap.
                    let fill_taps = self.plan.slot_fills[slot].as_ref().map(|f| {
                        (0..taps * c)
                            .map(|i| data[i] * f[i % c])
                            .collect::<Vec<f32>>()
                    });
                    Box::new(Depthwise {
                        c,
                        window,
                        in_level: level,
                        out_level,
                        rulebook,
                        weights: data,
                        bias,
                        fill_taps,
                        act: None,
                    })
                } else {
                    let rulebook = self.plan.rulebook(level, out_level, window);
                    let cout_g = cout / groups;
                    let k = taps * cin_g;
                    let per_group = (0..groups)
                        .map(|g| {
                            let mut data = vec![0.0; k * cout_g];
                            for co in 0..cout_g {
                                for ci in 0..cin_g {
                                    for t in 0..taps {
                                        data[(t * cin_g + ci) * cout_g + co] =
                                            weights[((g * cout_g + co) * cin_g + ci) * taps + t];
                                    }
                                }
                            }
                            Weights { k, n: cout_g, data }
                        })
                        .collect();
                    Box::new(Conv {
                        cin,
                        cout,
                        groups,
                        window,
                        in_level: level,
                        out_level,
                        rulebook: Some(rulebook),
                        weights: per_group,
                        bias,
                        fill: self.plan.slot_fills[slot].clone(),
                        act: None,
                    })
                };
                let slot = self.emit_named(&out_name, op, vec![slot], Some(out_level));
                Ok(Kind::Tokens {
                    slot,
                    level: out_level,
                    c: cout,
                })
            }
        }
    }

    fn emit_named(
        &mut self,
        name: &str,
        op: Box<dyn Op>,
        inputs: Vec<usize>,
        level: Option<usize>,
    ) -> usize {
        let slot = self.plan.slot(name, level);
        self.plan.push(node_name(self.node), op, inputs, slot);
        slot
    }
}

/// BatchNormalization as per-channel `(scale, shift)`.
pub fn batch_norm(node: &NodeProto, consts: &Constants) -> Result<(Vec<f32>, Vec<f32>)> {
    let get = |k: usize| -> Result<Vec<f32>> {
        let name = node
            .input
            .get(k)
            .with_context(|| format!("missing input {k}"))?;
        ensure!(
            consts.contains(name),
            "input {k} ('{name}') must be a constant"
        );
        consts.f32s(name)
    };
    let (gamma, beta, mean, var) = (get(1)?, get(2)?, get(3)?, get(4)?);
    let eps = attr_f32(node, "epsilon", Some(1e-5))?;
    ensure!(
        eps >= 0.0,
        "{}: epsilon must be >= 0, got {eps}",
        node_name(node)
    );
    let c = gamma.len();
    ensure!(
        beta.len() == c && mean.len() == c && var.len() == c,
        "BatchNormalization parameters differ in length"
    );
    let scale: Vec<f32> = gamma
        .iter()
        .zip(&var)
        .map(|(g, v)| g / (v + eps).sqrt())
        .collect();
    if let Some(i) = scale.iter().position(|s| !s.is_finite()) {
        bail!(
            "{}: channel {i} has variance {} + epsilon {eps}, which must be > 0",
            node_name(node),
            var[i]
        );
    }
    let shift = beta
        .iter()
        .zip(&mean)
        .zip(&scale)
        .map(|((b, m), s)| b - m * s)
        .collect();
    Ok((scale, shift))
}

/// A constant that broadcasts along axis 1 only, expanded to `c` values.
fn per_channel(shape: &[usize], rank: usize, c: usize, v: Vec<f32>) -> Option<Vec<f32>> {
    if shape.len() > rank {
        return None;
    }
    let offset = rank - shape.len();
    for (i, &d) in shape.iter().enumerate() {
        let axis = i + offset;
        if d != 1 && !(axis == 1 && d == c) {
            return None;
        }
    }
    match v.len() {
        1 => Some(vec![v[0]; c]),
        n if n == c => Some(v),
        _ => None,
    }
}

/// ONNX Reshape semantics (0 copies a dimension, one -1 is inferred).
fn reshape_target(shape: &[usize], target: &[i64]) -> Result<Vec<usize>> {
    let total: usize = shape.iter().product();
    let mut out: Vec<Option<usize>> = target
        .iter()
        .enumerate()
        .map(|(i, &d)| match d {
            0 => shape.get(i).copied(),
            -1 => None,
            d if d > 0 => Some(d as usize),
            _ => Some(usize::MAX),
        })
        .collect();
    ensure!(
        !out.contains(&Some(usize::MAX)),
        "invalid Reshape target {target:?}"
    );
    let known: usize = out.iter().flatten().product();
    match out.iter().filter(|d| d.is_none()).count() {
        0 => {}
        1 if known > 0 && total.is_multiple_of(known) => {
            *out.iter_mut().find(|d| d.is_none()).unwrap() = Some(total / known)
        }
        _ => bail!("cannot reshape {shape:?} to {target:?}"),
    }
    let out: Vec<usize> = out.into_iter().flatten().collect();
    ensure!(
        out.iter().product::<usize>() == total,
        "cannot reshape {shape:?} to {target:?}"
    );
    Ok(out)
}
