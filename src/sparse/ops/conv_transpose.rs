//! ConvTranspose, the upsampling of FPN necks: only the ONNX builder lives
//! here, for the op is a [`Conv`] with a transposed window (its rulebook lists
//! the one input each output reads), whose CPU evaluation and GPU twin are
//! `conv.rs`'s. Its output is a new level, the input's upsampled.

use super::conv::{bias, equal_stride, fold_batch_norm, pack_groups, weight_shape};
use super::{Conv, OnnxNode, Tensor};
use crate::onnx::{attr_i64, attr_ints, attr_str};
use crate::sparse::{rulebook::Window, value::Shape};
use anyhow::{ensure, Result};

/// Builds a ConvTranspose whose kernel equals its stride and has no padding
/// (the upsampling of FPN necks): each output position reads the one input
/// position over it, so the output's active set is the input's upsampled
/// (models/README.md). A BatchNormalization after it folds in. It runs as a
/// [`Conv`] with a transposed window.
pub fn from_onnx(n: &mut OnnxNode<'_>) -> Result<Tensor> {
    let x = n.input(0)?;
    let node = n.node;
    let (wname, [cin, cout_g, kh, kw]) = weight_shape(n, "ConvTranspose", "transposed convs")?;
    let groups = attr_i64(node, "group", Some(1))? as usize;
    ensure!(
        groups >= 1 && cin % groups == 0,
        "group {groups} does not divide {cin} input channels"
    );
    let stride = equal_stride(n)?;
    ensure!(
        kh == stride && kw == stride,
        "only a transposed conv whose kernel equals its stride is supported (each output reads one input), got kernel {kh}×{kw}, stride {stride}"
    );
    ensure!(
        attr_ints(node, "output_shape")?.is_none(),
        "ConvTranspose's output_shape is not supported"
    );
    let zero = |attr: &str| -> Result<bool> {
        Ok(attr_ints(node, attr)?.is_none_or(|v| v.iter().all(|&p| p == 0)))
    };
    ensure!(
        zero("pads")? && zero("output_padding")?,
        "only a transposed conv without pads or output padding is supported"
    );
    if let Some(d) = attr_ints(node, "dilations")? {
        ensure!(
            d.iter().all(|&v| v == 1),
            "dilated transposed convs are not supported, dilations {d:?}"
        );
    }
    let auto_pad = attr_str(node, "auto_pad")?.unwrap_or_else(|| "NOTSET".into());
    ensure!(
        auto_pad == "NOTSET" || auto_pad == "VALID",
        "ConvTranspose auto_pad {auto_pad} is not supported"
    );
    let cout = cout_g * groups;
    let mut weights = n.consts.f32s(&wname)?;
    let mut bias = bias(n, cout, "ConvTranspose")?;
    // Weights are `cin × cout/g × kh × kw`: output channel g·cout/g + co.
    let (taps, cin_g) = (kh * kw, cin / groups);
    let channel = |i: usize| i / (cout_g * taps) / cin_g * cout_g + i / taps % cout_g;
    fold_batch_norm(n, &mut weights, &mut bias, channel, "transposed conv")?;
    let Shape::Tokens { level, c } = x.shape else {
        anyhow::bail!("a transposed conv of a value with no spatial extent is not supported");
    };
    ensure!(
        c == cin,
        "ConvTranspose expects {cin} input channels, the tensor has {c}"
    );
    let lv = n.lowered.levels[level].clone();
    let out_level = n
        .lowered
        .up_level(level, stride, lv.h * stride, lv.w * stride);
    let window = Window {
        kh,
        kw,
        stride,
        pad_top: 0,
        pad_left: 0,
        transposed: true,
    };
    let rulebook = n.lowered.rulebook(level, out_level, window);
    // ONNX ConvTranspose weights are `cin × cout/g × kh × kw`.
    let per_group = pack_groups(groups, cin_g, cout_g, taps, |g, ci, co, t| {
        weights[((g * cin_g + ci) * cout_g + co) * taps + t]
    });
    let op = Conv {
        cin,
        cout,
        groups,
        window,
        in_level: level,
        out_level,
        rulebook: Some(rulebook),
        weights: per_group,
        bias,
        fill: n.fill(x.slot).cloned(),
        act: None,
    };
    Ok(n.emit(
        op,
        vec![x.slot],
        Shape::Tokens {
            level: out_level,
            c: cout,
        },
    ))
}
