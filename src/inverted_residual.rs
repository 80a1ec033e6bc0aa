//! MobileNetV2's inverted-residual block — 1×1 expansion, ReLU, 3×3
//! depthwise conv at stride 2 or 1, ReLU, 1×1 projection, and the residual
//! add of a stride-1 block — as one op of tract's nets, run row by row so
//! the expanded tensor never leaves cache.
//!
//! At CenterFace's 640×480 the first such block expands 16 channels to 96 at
//! 240×320: a 29.5 MB tensor that tract writes, packs, reads for the
//! depthwise conv and writes again at 120×160 before the projection reads
//! it. Those passes are memory-bound (the 118 M multiply-add expansion ran
//! at about 20 G/s against 65 G/s for the same products on cached token
//! rows). Here each output row needs three expanded input rows: they are
//! computed as they come (a matrix product per row, bias and activation in
//! the same pass, then split by column parity as
//! [`crate::strided_depthwise`] does at stride 2, or padded at stride 1),
//! kept in a ring of three, and the depthwise rows go to the projection two
//! output rows at a time (the block's input rows added after it when the
//! block is residual). Values equal tract's to rounding (the products sum
//! in another order).

use crate::depthwise_row::{depthwise_row, TapRow};
use crate::rowgemm::{Epilogue, Line};
use crate::stem::Patches;
use crate::strided_depthwise::{depthwise_3x3, split_row};
use anyhow::Result;
use tract_core::internal::*;
use tract_core::ops::binary::TypedBinOp;
use tract_core::ops::cnn::{Conv, KernelFormat};
use tract_core::ops::nn::DataFormat;

/// Output rows per projection product.
const ROWS: usize = 2;

/// Input width below which a block stays tract's.
const MIN_WIDTH: usize = 24;

/// Expanded tensor size below which a block stays tract's: about a core's
/// L2, under which tract's whole-tensor passes are not memory-bound.
const MIN_EXPANDED_BYTES: usize = 1 << 20;

/// Replaces every f32 chain 1×1 conv → ReLU(6) → 3×3 depthwise conv (stride
/// 2 or 1) → ReLU(6) → 1×1 conv (→ an add of the chain's input) of `model`
/// whose inner tensors nothing else reads by one [`InvertedResidual`];
/// returns how many.
pub fn rewrite(model: &mut TypedModel) -> Result<usize> {
    rewrite_from(
        model,
        Size {
            width: MIN_WIDTH,
            bytes: MIN_EXPANDED_BYTES,
        },
    )
}

/// The smallest block [`rewrite`] takes: input width and expanded bytes.
#[derive(Clone, Copy)]
struct Size {
    width: usize,
    bytes: usize,
}

fn rewrite_from(model: &mut TypedModel, min: Size) -> Result<usize> {
    let mut found = Vec::new();
    for id in 0..model.nodes.len() {
        if let Some(chain) = chain(model, id, min)? {
            found.push(chain);
        }
    }
    for c in &found {
        let mut patch = TypedModelPatch::default();
        let (e, d, p) = (
            &model.nodes[c.expand],
            &model.nodes[c.depthwise],
            &model.nodes[c.project],
        );
        let mut taps = vec![patch.tap_model(model, e.inputs[0])?];
        for outlet in [
            e.inputs[1],
            e.inputs[2],
            d.inputs[1],
            d.inputs[2],
            p.inputs[1],
            p.inputs[2],
        ] {
            taps.push(patch.tap_model(model, outlet)?);
        }
        let name = format!("{}.fused", p.name);
        let out = patch.wire_node(name, c.op.clone(), &taps)?;
        patch.shunt_outside(model, OutletId::new(c.last, 0), out[0])?;
        patch.apply(model)?;
    }
    Ok(found.len())
}

/// Lets the fused block that reads `model`'s input, when that input is the
/// patch tensor of `stem` and the block its only reader, gather the patches
/// itself, row by row as it expands them: the input becomes the image. At
/// 640×480 the patch tensor is 8 MB a frame, written and read back (1.0 ms
/// of the prefix on two threads); a patch row is 35 KB, used at once.
/// Returns whether it did.
pub fn fuse_stem(model: &mut TypedModel, stem: &Patches) -> Result<bool> {
    let source = model.input_outlets()?[0];
    let shape = &model.outlet_fact(source)?.shape;
    if shape.as_concrete() != Some(&stem.shape()[..]) {
        return Ok(false);
    }
    let succ = &model.nodes[source.node].outputs[source.slot].successors;
    let [inlet] = succ.as_slice() else {
        return Ok(false);
    };
    let id = inlet.node;
    let Some(op) = model.nodes[id].op_as::<InvertedResidual>() else {
        return Ok(false);
    };
    if inlet.slot != 0 || op.residual || op.stem.is_some() {
        return Ok(false);
    }
    let op = InvertedResidual {
        stem: Some(stem.clone()),
        ..op.clone()
    };
    model.nodes[id].op = Box::new(op);
    model.set_input_fact(0, f32::fact(stem.image_shape()))?;
    Ok(true)
}

/// One block found: its three convs' nodes, the node whose output the op
/// takes over (the projection or the residual add), and the op.
struct Chain {
    expand: usize,
    depthwise: usize,
    project: usize,
    last: usize,
    op: InvertedResidual,
}

/// The block ending at node `id` (its projection), if the graph has one there.
fn chain(model: &TypedModel, id: usize, min: Size) -> Result<Option<Chain>> {
    let Some((cp, ce)) = pointwise(model, id) else {
        return Ok(None);
    };
    let Some((after_dw, act2)) = activation(model, model.nodes[id].inputs[0].node) else {
        return Ok(None);
    };
    let Some(d) = depthwise_3x3(model, after_dw)? else {
        return Ok(None);
    };
    if d.channels != ce || !single_use(model, after_dw) {
        return Ok(None);
    }
    let dw = &model.nodes[after_dw];
    let Some((expand, act1)) = activation(model, dw.inputs[0].node) else {
        return Ok(None);
    };
    let Some((ce2, cin)) = pointwise(model, expand) else {
        return Ok(None);
    };
    if ce2 != ce || !single_use(model, expand) {
        return Ok(None);
    }
    // The expansion's input has the depthwise conv's input size (both 1×1).
    let input = model.node_input_facts(expand)?[0].shape.as_concrete();
    let [h, w] = d.input;
    let [oh, ow] = d.output;
    let out = model.nodes[id].outputs[0].fact.shape.as_concrete();
    if input != Some(&[d.batch, cin, h, w]) || out != Some(&[d.batch, cp, oh, ow]) {
        return Ok(None);
    }
    // Small maps stay tract's: their expanded tensor stays in cache anyway,
    // and a product per row of a few columns costs more than it saves (the
    // classifier's 14×14 and 7×7 blocks ran 2× slower fused).
    if w < min.width || ce * h * w * 4 < min.bytes {
        return Ok(None);
    }
    // A stride-1 block whose projection's only reader adds the block's input.
    let x = model.nodes[expand].inputs[0];
    let residual = (d.stride == 1 && cp == cin && [oh, ow] == [h, w] && single_use(model, id))
        .then(|| model.nodes[id].outputs[0].successors[0].node)
        .filter(|&add| {
            let node = &model.nodes[add];
            node.op_as::<TypedBinOp>().is_some()
                && node.op().name() == "Add"
                && node.inputs.len() == 2
                && node.inputs.contains(&x)
                && node.inputs.contains(&OutletId::new(id, 0))
                && node.outputs[0].fact.shape.as_concrete() == Some(&[d.batch, cp, oh, ow])
        });
    let op = InvertedResidual {
        channels: [cin, ce, cp],
        input: [h, w],
        output: [oh, ow],
        stride: d.stride,
        pad: d.pad,
        caps: [act1, act2],
        residual: residual.is_some(),
        stem: None,
    };
    Ok(Some(Chain {
        expand,
        depthwise: after_dw,
        project: id,
        last: residual.unwrap_or(id),
        op,
    }))
}

/// `(cout, cin)` when node `id` is an f32 1×1 conv, one group, stride 1, no
/// padding, with its kernel and bias beside it.
fn pointwise(model: &TypedModel, id: usize) -> Option<(usize, usize)> {
    let node = &model.nodes[id];
    let conv = node.op_as::<Conv>()?;
    let spec = &conv.pool_spec;
    let facts = model.node_input_facts(id).ok()?;
    let (cin, cout) = (spec.input_channels, spec.output_channels);
    let unpadded = spec
        .computed_padding(&[1usize, 1])
        .iter()
        .all(|p| p.pad_before == 0 && p.pad_after == 0);
    let ok = conv.q_params.is_none()
        && conv.group == 1
        && spec.data_format == DataFormat::NCHW
        && conv.kernel_fmt == KernelFormat::OIHW
        && spec.kernel_shape.as_slice() == [1, 1]
        && *spec.strides() == [1, 1][..]
        && unpadded
        && node.inputs.len() == 3
        && facts.iter().all(|f| f.datum_type == f32::datum_type())
        && facts[1].shape.as_concrete() == Some(&[cout, cin, 1, 1])
        && facts[2].shape.volume() == cout.to_dim();
    ok.then_some((cout, cin))
}

/// When node `id` is a ReLU (`Max` with zero), or a ReLU6 (`Min` with a
/// constant after such a `Max`), read by one node only: the node it reads
/// and its cap (the bits of the `Min` constant; `u32::MAX` for none).
fn activation(model: &TypedModel, id: usize) -> Option<(usize, u32)> {
    let (mut id, mut cap) = (id, u32::MAX);
    if let Some(c) = with_constant(model, id, "Min") {
        cap = c.to_bits();
        if !single_use(model, id) {
            return None;
        }
        id = model.nodes[id].inputs[0].node;
    }
    let zero = with_constant(model, id, "Max")?;
    (zero == 0.0 && single_use(model, id)).then(|| (model.nodes[id].inputs[0].node, cap))
}

/// The scalar constant of node `id` when it is the binary op `name` of a
/// tensor and a uniform f32 constant (in that order).
fn with_constant(model: &TypedModel, id: usize, name: &str) -> Option<f32> {
    let node = &model.nodes[id];
    node.op_as::<TypedBinOp>()?;
    if node.op().name() != name || node.inputs.len() != 2 {
        return None;
    }
    let fact = model.outlet_fact(node.inputs[1]).ok()?;
    let konst = fact.konst.as_ref()?;
    let values = konst.try_as_plain_ram().ok()?;
    let values = values.as_slice::<f32>().ok()?;
    let first = *values.first()?;
    values
        .iter()
        .all(|&v| v.to_bits() == first.to_bits())
        .then_some(first)
}

/// Whether node `id`'s one output is read by exactly one node, and is not a
/// graph output.
fn single_use(model: &TypedModel, id: usize) -> bool {
    let node = &model.nodes[id];
    node.outputs.len() == 1
        && node.outputs[0].successors.len() == 1
        && !model.outputs.contains(&OutletId::new(id, 0))
}

/// The fused block on `[n, cin, h, w]` f32; inputs (image, expansion kernel
/// and bias, depthwise kernel and bias, projection kernel and bias), OIHW.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct InvertedResidual {
    /// Input, expanded and output channels.
    channels: [usize; 3],
    input: [usize; 2],
    output: [usize; 2],
    /// The depthwise conv's stride, 1 or 2 (both axes).
    stride: usize,
    /// The depthwise conv's top and left padding.
    pad: [usize; 2],
    /// After the expansion and after the depthwise conv: the bits of the
    /// ReLU's upper bound, `u32::MAX` for none.
    caps: [u32; 2],
    /// Whether the block's input is added to its output.
    residual: bool,
    /// When the block's expansion is the prefix's rewritten stem: the op
    /// reads the image and gathers each patch row as it expands it
    /// ([`fuse_stem`]), instead of a patch tensor gathered beforehand.
    stem: Option<Patches>,
}

impl Op for InvertedResidual {
    fn name(&self) -> StaticName {
        "ErsmInvertedResidual".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?} at {:?}, stride {}{}",
            self.channels,
            self.input,
            self.stride,
            match (self.residual, &self.stem) {
                (true, _) => ", residual",
                (false, Some(_)) => ", patches of the image gathered row by row",
                (false, None) => "",
            }
        )])
    }

    op_as_typed_op!();
}

/// Per-thread scratch: the ring of expanded rows (split by column parity at
/// stride 2, padded at stride 1), one expanded row before that, and the
/// depthwise rows awaiting the projection.
struct Scratch {
    raw: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    /// The input row each ring slot holds.
    slot_row: [Option<usize>; 3],
    dw: Vec<f32>,
    /// With a stem: the patch row being expanded.
    patch: Vec<f32>,
}

impl InvertedResidual {
    /// Values per channel row of a ring slot: the parity split's even half
    /// at stride 2, the padded row at stride 1.
    fn slot_len(&self) -> usize {
        self.output[1] + if self.stride == 2 { 1 } else { 2 }
    }

    /// Input values per image: the image's with a stem, else the map's.
    fn image_len(&self) -> usize {
        match &self.stem {
            Some(p) => p.image_shape().iter().product(),
            None => self.channels[0] * self.input[0] * self.input[1],
        }
    }

    fn cap(bits: u32) -> f32 {
        if bits == u32::MAX {
            f32::INFINITY
        } else {
            f32::from_bits(bits)
        }
    }

    /// Output rows `rows` of image `n` into `out` (the whole output tensor).
    #[allow(clippy::too_many_arguments)]
    fn band(
        &self,
        x: &[f32],
        w: [&[f32]; 6],
        n: usize,
        rows: std::ops::Range<usize>,
        s: &mut Scratch,
        out: *mut f32,
    ) {
        let [_, ce, cp] = self.channels;
        let [h, iw] = self.input;
        let [oh, ow] = self.output;
        let [we, be, wd, bd, wp, bp] = w;
        let (cap1, cap2) = (Self::cap(self.caps[0]), Self::cap(self.caps[1]));
        let per_image = self.image_len();
        let x = &x[n * per_image..(n + 1) * per_image];
        s.slot_row = [None; 3];
        let mut oy = rows.start;
        while oy < rows.end {
            let count = ROWS.min(rows.end - oy);
            for r in 0..count {
                let y_out = oy + r;
                // The three input rows of this output row, in the ring.
                let mut slots = [None; 3];
                for (ky, slot) in slots.iter_mut().enumerate() {
                    let Some(y) = (self.stride * y_out + ky)
                        .checked_sub(self.pad[0])
                        .filter(|&y| y < h)
                    else {
                        continue;
                    };
                    let at = y % 3;
                    if s.slot_row[at] != Some(y) {
                        self.expand_row(x, we, be, cap1, y, at, s);
                        s.slot_row[at] = Some(y);
                    }
                    *slot = Some(at);
                }
                let la = self.slot_len();
                for c in 0..ce {
                    let row = &mut s.dw[c * ROWS * ow + r * ow..c * ROWS * ow + (r + 1) * ow];
                    let mut taps: [TapRow<'_>; 3] = [[&[]; 3]; 3];
                    let mut ks = [[0.0; 3]; 3];
                    let mut m = 0;
                    for (ky, slot) in slots.iter().enumerate() {
                        let Some(at) = slot else { continue };
                        let a = &s.a[(at * ce + c) * la..(at * ce + c + 1) * la];
                        taps[m] = if self.stride == 2 {
                            let b = &s.b[(at * ce + c) * ow..(at * ce + c + 1) * ow];
                            [a, b, &a[1..]]
                        } else {
                            [a, &a[1..], &a[2..]]
                        };
                        ks[m] = [
                            wd[c * 9 + 3 * ky],
                            wd[c * 9 + 3 * ky + 1],
                            wd[c * 9 + 3 * ky + 2],
                        ];
                        m += 1;
                    }
                    depthwise_row::<true>(row, &taps[..m], &ks[..m], bd[c], cap2);
                }
            }
            // out[n, :, oy..oy + count, :] = wp · dw + bp: each channel's rows
            // are contiguous in the output.
            let dst = n * cp * oh * ow + oy * ow;
            // SAFETY: out holds [n, cp, oh, ow]; the product writes cp rows of
            // count·ow values from dst with row stride oh·ow, inside it, and
            // only this band's rows. wp is cp × ce, dw ce × count·ow (row
            // stride ROWS·ow).
            unsafe {
                crate::rowgemm::sgemm_with(
                    cp,
                    ce,
                    count * ow,
                    wp.as_ptr(),
                    ce,
                    s.dw.as_ptr(),
                    ROWS * ow,
                    0.0,
                    out.add(dst),
                    oh * ow,
                    Epilogue {
                        start: Some(Line::Rows(bp)),
                        ..Default::default()
                    },
                );
            }
            if self.residual {
                // Same shape as the input: add the block's input rows.
                for c in 0..cp {
                    let from = c * h * iw + oy * ow;
                    let xs = &x[from..from + count * ow];
                    // SAFETY: the rows just written above, inside `out`.
                    let ys = unsafe {
                        std::slice::from_raw_parts_mut(out.add(dst + c * oh * ow), count * ow)
                    };
                    ys.iter_mut().zip(xs).for_each(|(y, &v)| *y += v);
                }
            }
            oy += count;
        }
    }

    /// Expands input row `y` (all channels) into ring slot `at`, activated
    /// and split by column parity.
    #[allow(clippy::too_many_arguments)]
    fn expand_row(
        &self,
        x: &[f32],
        we: &[f32],
        be: &[f32],
        cap: f32,
        y: usize,
        at: usize,
        s: &mut Scratch,
    ) {
        let [cin, ce, _] = self.channels;
        let [h, w] = self.input;
        let ow = self.output[1];
        assert!(y < h);
        // The row's cin channels: rows of the map (stride h·w), or the
        // patch row gathered from the image now.
        let (rows, stride) = match &self.stem {
            Some(p) => {
                p.gather_row(x, y, &mut s.patch);
                (&s.patch[..], w)
            }
            None => (&x[y * w..], h * w),
        };
        assert!(rows.len() >= (cin - 1) * stride + w);
        let la = self.slot_len();
        let pl = self.pad[1];
        // At stride 1 the product goes straight into the ring slot's padded
        // rows (row stride la) and is activated there: no copy of the
        // expanded row. At stride 2 it goes to a row buffer, split below.
        let in_place = self.stride == 1 && pl + w <= la;
        let (dst, rsc) = if in_place {
            (s.a[at * ce * la + pl..].as_mut_ptr(), la)
        } else {
            (s.raw.as_mut_ptr(), w)
        };
        // SAFETY: the assert bounds every read of the rows (cin rows of w
        // values, `stride` apart); we is ce × cin; dst holds ce rows of w
        // values, rsc apart (the slot's ce rows of la ≥ pl + w, or raw).
        // The product activates the rows as it stores them.
        unsafe {
            crate::rowgemm::sgemm_with(
                ce,
                cin,
                w,
                we.as_ptr(),
                cin,
                rows.as_ptr(),
                stride,
                0.0,
                dst,
                rsc,
                Epilogue {
                    add: Some(Line::Rows(be)),
                    clamp: Some((0.0, cap)),
                    ..Default::default()
                },
            );
        }
        if in_place {
            let slot = &mut s.a[at * ce * la..(at + 1) * ce * la];
            for a in slot.chunks_exact_mut(la) {
                // a[i] is input column i - pad_left, zero in the padding.
                a[..pl].fill(0.0);
                a[pl + w..].fill(0.0);
            }
            return;
        }
        for c in 0..ce {
            let row = &s.raw[c * w..(c + 1) * w];
            let a = &mut s.a[(at * ce + c) * la..(at * ce + c + 1) * la];
            if self.stride == 2 {
                let b = &mut s.b[(at * ce + c) * ow..(at * ce + c + 1) * ow];
                split_row(row, self.pad[1], a, b);
            } else {
                // a[i] is input column i - pad_left, zero in the padding.
                let pl = pl.min(la);
                let n = row.len().min(la - pl);
                a[..pl].fill(0.0);
                a[pl..pl + n].copy_from_slice(&row[..n]);
                a[pl + n..].fill(0.0);
            }
        }
    }
}

impl EvalOp for InvertedResidual {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let [cin, ce, cp] = self.channels;
        let [h, w] = self.input;
        let [oh, ow] = self.output;
        let shape = inputs[0].shape().to_vec();
        let want = match &self.stem {
            Some(p) => p.image_shape(),
            None => [1, cin, h, w],
        };
        anyhow::ensure!(
            shape.len() == 4 && shape[1..] == want[1..],
            "ErsmInvertedResidual: input {shape:?}, built for [n, {}, {}, {}]",
            want[1],
            want[2],
            want[3]
        );
        let views = inputs
            .iter()
            .map(|t| t.try_as_plain_ram())
            .collect::<TractResult<Vec<_>>>()?;
        let slices = views
            .iter()
            .map(|v| v.as_slice::<f32>())
            .collect::<TractResult<Vec<_>>>()?;
        let weights = [
            slices[1], slices[2], slices[3], slices[4], slices[5], slices[6],
        ];
        let n = shape[0];
        // SAFETY: f32 has no invalid bit patterns, and every output row is
        // written (filled with its bias, then accumulated) by one band.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&[n, cp, oh, ow])? };
        let base = crate::threads::SendPtr(
            out.try_as_plain_ram_mut()?
                .as_slice_mut::<f32>()?
                .as_mut_ptr(),
        );
        // One unit of work per ROWS output rows of one image; the threads
        // take contiguous runs of them.
        let units_per_image = oh.div_ceil(ROWS);
        let mut units = vec![0f32; n * units_per_image];
        crate::threads::par_rows(&mut units, 1, 4, |first, run| {
            let mut s = Scratch {
                raw: vec![0.0; ce * w],
                a: vec![0.0; 3 * ce * self.slot_len()],
                // The odd half of the parity split: stride 2 only.
                b: vec![0.0; if self.stride == 2 { 3 * ce * ow } else { 0 }],
                slot_row: [None; 3],
                dw: vec![0.0; ce * ROWS * ow],
                patch: vec![0.0; if self.stem.is_some() { cin * w } else { 0 }],
            };
            let (start, end) = (first, first + run.len());
            let mut u = start;
            while u < end {
                let img = u / units_per_image;
                let last = end.min((img + 1) * units_per_image);
                let rows = (u % units_per_image) * ROWS
                    ..((last - 1) % units_per_image * ROWS + ROWS).min(oh);
                self.band(slices[0], weights, img, rows, &mut s, base.get());
                u = last;
            }
        });
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for InvertedResidual {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.to_tvec();
        anyhow::ensure!(
            shape.len() == 4,
            "ErsmInvertedResidual reads a rank-4 input"
        );
        shape[1] = self.channels[2].to_dim();
        shape[2] = self.output[0].to_dim();
        shape[3] = self.output[1].to_dim();
        Ok(tvec!(f32::fact(shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let [cin, ce, cp] = self.channels;
        let [h, w] = self.input;
        let [oh, ow] = self.output;
        let macs = cin * ce * h * w + ce * oh * ow * 9 + ce * cp * oh * ow;
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            inputs[0].shape[0].clone() * macs
        )))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tract_nets::{run, wire_conv, Rng};

    /// Every block, whatever its size.
    const ANY: Size = Size { width: 0, bytes: 0 };

    /// A conv with random weights scaled to its fan-in, `pad` on every side.
    fn conv(
        model: &mut TypedModel,
        x: OutletId,
        rng: &mut Rng,
        [cin, cout, k, stride, group, pad]: [usize; 6],
    ) -> OutletId {
        let kernel = rng.values(
            cout * cin / group * k * k,
            1.0 / ((cin / group * k * k) as f32).sqrt(),
        );
        let kernel = kernel.into_shape(&[cout, cin / group, k, k]).unwrap();
        let bias = rng.values(cout, 0.5);
        wire_conv(model, x, kernel, bias, [stride, group], [pad; 4])
    }

    fn act(model: &mut TypedModel, x: OutletId, cap: Option<f32>) -> OutletId {
        let n = model.nodes.len();
        let zero = model
            .add_const(format!("zero{n}"), tensor4(&[[[[0f32]]]]))
            .unwrap();
        let y = model
            .wire_node(format!("relu{n}"), tract_core::ops::math::max(), &[x, zero])
            .unwrap()[0];
        let Some(cap) = cap else { return y };
        let c = model
            .add_const(format!("cap{n}"), tensor4(&[[[[cap]]]]))
            .unwrap();
        model
            .wire_node(format!("min{n}"), tract_core::ops::math::min(), &[y, c])
            .unwrap()[0]
    }

    /// expand → act → depthwise → act → project (→ + input) → a ReLU.
    fn block(
        n: usize,
        [cin, ce, cp]: [usize; 3],
        [h, w]: [usize; 2],
        cap: Option<f32>,
        stride: usize,
        residual: bool,
    ) -> TypedModel {
        let mut rng = Rng((cin * ce * cp * h * w) as u64);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([n, cin, h, w])).unwrap();
        let y = conv(&mut model, x, &mut rng, [cin, ce, 1, 1, 1, 0]);
        let y = act(&mut model, y, cap);
        let y = conv(&mut model, y, &mut rng, [ce, ce, 3, stride, ce, 1]);
        let y = act(&mut model, y, cap);
        let mut y = conv(&mut model, y, &mut rng, [ce, cp, 1, 1, 1, 0]);
        if residual {
            y = model
                .wire_node("add", tract_core::ops::math::add(), &[x, y])
                .unwrap()[0];
        }
        let y = act(&mut model, y, None);
        model.select_output_outlets(&[y]).unwrap();
        model
    }

    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
        let den: f32 = b.iter().map(|y| y * y).sum();
        (num / den.max(1e-30)).sqrt()
    }

    #[test]
    fn equals_tracts_convs_to_rounding() {
        // Strides 2 and 1 (with and without the residual add), odd and even
        // sizes, one and several bands, ReLU and ReLU6, batches, and a pool
        // of three threads.
        for (n, ch, hw, cap, stride, residual) in [
            (1, [16, 96, 24], [24, 32], None, 2, false),
            (1, [8, 48, 16], [17, 23], Some(6.0), 2, false),
            (2, [4, 12, 8], [9, 10], None, 2, false),
            (1, [3, 6, 5], [2, 3], Some(6.0), 2, false),
            (1, [8, 24, 8], [40, 12], None, 2, false),
            (1, [24, 144, 24], [20, 16], None, 1, true),
            (2, [8, 48, 8], [17, 11], Some(6.0), 1, true),
            (1, [8, 32, 12], [21, 9], Some(6.0), 1, false),
            (1, [4, 8, 4], [1, 1], None, 1, true),
        ] {
            let case = format!("{ch:?} at {hw:?}, stride {stride}, residual {residual}");
            let reference = block(n, ch, hw, cap, stride, residual);
            let mut fused = reference.clone();
            assert_eq!(rewrite_from(&mut fused, ANY).unwrap(), 1, "{case}");
            let last = fused
                .nodes
                .iter()
                .rev()
                .find(|n| n.op_is::<InvertedResidual>());
            let op = last.unwrap().op_as::<InvertedResidual>().unwrap();
            assert_eq!(op.residual, residual, "{case}");
            let x = Rng(7)
                .values(n * ch[0] * hw[0] * hw[1], 2.0)
                .into_shape(&[n, ch[0], hw[0], hw[1]])
                .unwrap();
            let threads = crate::threads::Threads::new(3).unwrap();
            let (a, b) = threads.install(|| (run(reference, &x), run(fused, &x)));
            assert_eq!(a.len(), b.len());
            assert!(rel_err(&b, &a) < 1e-5, "{case}: {}", rel_err(&b, &a));
        }
    }

    #[test]
    fn leaves_blocks_whose_inner_tensors_are_read_elsewhere() {
        let mut model = block(1, [4, 8, 4], [8, 8], None, 2, false);
        // The expansion's ReLU also becomes a graph output.
        let relu = model
            .nodes
            .iter()
            .find(|n| n.name.starts_with("relu"))
            .unwrap()
            .id;
        let mut outputs = model.outputs.clone();
        outputs.push(OutletId::new(relu, 0));
        model.select_output_outlets(&outputs).unwrap();
        assert_eq!(rewrite_from(&mut model, ANY).unwrap(), 0);
    }

    #[test]
    fn small_maps_stay_tracts_and_large_ones_are_fused() {
        // MobileNetV2's 7×7 and 14×14 blocks, then CenterFace's 120×160.
        let mut small = block(1, [160, 960, 160], [7, 7], Some(6.0), 1, true);
        assert_eq!(rewrite(&mut small).unwrap(), 0);
        let mut narrow = block(1, [64, 384, 64], [14, 14], Some(6.0), 1, true);
        assert_eq!(rewrite(&mut narrow).unwrap(), 0);
        let mut large = block(1, [24, 144, 24], [120, 160], None, 1, true);
        assert_eq!(rewrite(&mut large).unwrap(), 1);
    }
}
