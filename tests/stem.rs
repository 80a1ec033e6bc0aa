//! The graph rewrites of tract's nets: the prefix's first conv run as a
//! product over gathered patches gives tract's own stem conv's values, and
//! graphs whose stem is not such a conv are left alone; a stride-2 depthwise
//! conv runs as ersm's op (`ersm::strided_depthwise`) with the conv's values.

mod common;

use common::*;
use ersm::prefix::TractNet;

/// A stem conv on the image, then a ReLU and a 1×1 conv after it.
fn stem_net(seed: u64, cin: usize, k: usize, stride: usize, pads: [usize; 4]) -> (Builder, String) {
    let mut b = Builder::new(seed);
    let x = b.conv("image", cin, 8, k, stride, pads, 1);
    let x = b.op("Relu", &[&x], vec![]);
    let y = b.conv(&x, 8, 5, 1, 1, [0; 4], 1);
    (b, y)
}

fn image(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
        .collect()
}

#[test]
fn patched_stems_match_tracts_conv() {
    for (seed, (cin, k, stride, pads, h, w)) in [
        (3, 3, 2, [1, 1, 1, 1], 32, 32),
        (3, 3, 2, [1, 1, 1, 1], 31, 29),
        (3, 3, 1, [1, 1, 1, 1], 17, 20),
        (1, 5, 2, [2, 1, 0, 2], 23, 18),
        (4, 7, 3, [3, 3, 3, 3], 40, 33),
        (3, 2, 2, [0, 0, 0, 0], 16, 16),
    ]
    .into_iter()
    .enumerate()
    {
        let (b, out) = stem_net(seed as u64, cin, k, stride, pads);
        let proto = b.model(("image", &[1, cin, h, w]), &out);
        let shape = [1, cin, h, w];
        let plain = TractNet::new(&proto, &shape, "plain").unwrap();
        let patched = TractNet::from_image(&proto, &shape, "patched").unwrap();
        assert!(plain.patches().is_none());
        assert!(patched.patches().is_some(), "stem {seed} not rewritten");
        assert_eq!(plain.output_shape, patched.output_shape);
        // Two images in turn: the second reuses the first one's patch buffer.
        for x in [image(cin * h * w), image(cin * h * w + 5)[5..].to_vec()] {
            let (a, p) = (plain.run(&x).unwrap(), patched.run(&x).unwrap());
            assert!(rel_err(&p, &a) < 1e-5, "stem {seed}: {}", rel_err(&p, &a));
        }
    }
}

#[test]
fn a_stem_with_valid_auto_pad_is_patched_without_padding() {
    use tract_onnx::pb::{attribute_proto::AttributeType, AttributeProto};
    let (b, out) = stem_net(9, 3, 3, 2, [0; 4]);
    let mut proto = b.model(("image", &[1, 3, 21, 17]), &out);
    let stem = &mut proto.graph.as_mut().unwrap().node[0];
    stem.attribute.retain(|a| a.name != "pads");
    stem.attribute.push(AttributeProto {
        name: "auto_pad".into(),
        r#type: AttributeType::String as i32,
        s: b"VALID".to_vec(),
        ..Default::default()
    });
    let shape = [1, 3, 21, 17];
    let plain = TractNet::new(&proto, &shape, "plain").unwrap();
    let patched = TractNet::from_image(&proto, &shape, "patched").unwrap();
    assert_eq!(patched.patches().unwrap().shape(), [1, 27, 10, 8]);
    let x = image(3 * 21 * 17);
    let (a, p) = (plain.run(&x).unwrap(), patched.run(&x).unwrap());
    assert!(rel_err(&p, &a) < 1e-5, "{}", rel_err(&p, &a));
}

#[test]
fn stems_that_are_not_a_plain_image_conv_stay_as_they_are() {
    // The image read twice.
    let (mut b, y) = stem_net(1, 3, 3, 2, [1; 4]);
    let side = b.op(
        "ReduceMean",
        &["image"],
        vec![attr_ints("axes", &[1, 2, 3])],
    );
    let out = b.op("Add", &[&y, &side], vec![]);
    let twice = b.model(("image", &[1, 3, 16, 16]), &out);
    // Grouped, and a 1×1 stem (nothing to gather).
    let mut g = Builder::new(2);
    let x = g.conv("image", 4, 8, 3, 2, [1; 4], 2);
    let grouped = g.model(("image", &[1, 4, 16, 16]), &x);
    let mut o = Builder::new(3);
    let x = o.conv("image", 3, 8, 1, 1, [0; 4], 1);
    let pointwise = o.model(("image", &[1, 3, 16, 16]), &x);
    // Too many channels for an image.
    let mut m = Builder::new(4);
    let x = m.conv("image", 8, 8, 3, 1, [1; 4], 1);
    let wide = m.model(("image", &[1, 8, 16, 16]), &x);
    for (what, proto, c) in [
        ("twice", twice, 3),
        ("grouped", grouped, 4),
        ("pointwise", pointwise, 3),
        ("wide", wide, 8),
    ] {
        let net = TractNet::from_image(&proto, &[1, c, 16, 16], what).unwrap();
        assert!(net.patches().is_none(), "{what} was rewritten");
        assert_eq!(
            net.run(&image(c * 256)).unwrap().len(),
            net.output_shape.iter().product::<usize>()
        );
    }
}

/// The initializer `name` of `proto`'s graph.
fn initializer(proto: &tract_onnx::pb::ModelProto, name: &str) -> Vec<f32> {
    let graph = proto.graph.as_ref().unwrap();
    let t = graph.initializer.iter().find(|t| t.name == name).unwrap();
    t.float_data.clone()
}

/// A depthwise 3×3 conv by its definition: `out[c][oy][ox]` is the bias plus
/// every tap inside the image.
fn depthwise_by_definition(
    x: &[f32],
    [c, h, w]: [usize; 3],
    weights: &[f32],
    bias: &[f32],
    stride: usize,
    [pt, pl, pb, pr]: [usize; 4],
) -> Vec<f32> {
    let (oh, ow) = (
        (h + pt + pb - 3) / stride + 1,
        (w + pl + pr - 3) / stride + 1,
    );
    let mut out = Vec::with_capacity(c * oh * ow);
    for ch in 0..c {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut sum = bias[ch] as f64;
                for ky in 0..3 {
                    for kx in 0..3 {
                        let (y, x0) = (
                            (oy * stride + ky) as isize - pt as isize,
                            (ox * stride + kx) as isize - pl as isize,
                        );
                        if y >= 0 && x0 >= 0 && (y as usize) < h && (x0 as usize) < w {
                            let v = x[ch * h * w + y as usize * w + x0 as usize];
                            sum += (weights[ch * 9 + ky * 3 + kx] * v) as f64;
                        }
                    }
                }
                out.push(sum as f32);
            }
        }
    }
    out
}

#[test]
fn stride_2_depthwise_convs_run_as_ersms_op_with_the_convs_values() {
    // After a stride-1 conv (which stays tract's), as in MobileNetV2's blocks.
    for (seed, (c, h, w, pads)) in [
        (12, 30, 40, [1, 1, 1, 1]),
        (8, 17, 23, [1, 1, 1, 1]),
        (5, 16, 16, [0, 0, 1, 1]),
    ]
    .into_iter()
    .enumerate()
    {
        let mut b = Builder::new(seed as u64 + 40);
        let x = b.conv("image", c, c, 1, 1, [0; 4], 1);
        let y = b.conv(&x, c, c, 3, 2, pads, c);
        let proto = b.model(("image", &[1, c, h, w]), &y);
        let shape = [1, c, h, w];
        let whole = TractNet::new(&proto, &shape, "whole").unwrap();
        let input = image(c * h * w);
        let ops: Vec<String> = whole
            .profile(&input)
            .unwrap()
            .into_iter()
            .map(|(op, ..)| op)
            .collect();
        assert!(
            ops.iter().any(|op| op == "ErsmDepthwiseS2"),
            "case {seed}: {ops:?}"
        );
        // The 1×1 conv's output, by tract, is the depthwise conv's input.
        let mut first = Builder::new(seed as u64 + 40);
        let x1 = first.conv("image", c, c, 1, 1, [0; 4], 1);
        let mid = TractNet::new(&first.model(("image", &[1, c, h, w]), &x1), &shape, "first")
            .unwrap()
            .run(&input)
            .unwrap();
        let expected = depthwise_by_definition(
            &mid,
            [c, h, w],
            &initializer(&proto, "w2"),
            &initializer(&proto, "b2"),
            2,
            pads,
        );
        let got = whole.run(&input).unwrap();
        assert!(
            rel_err(&got, &expected) < 1e-5,
            "case {seed}: {}",
            rel_err(&got, &expected)
        );
    }
}

/// A stem followed by an inverted-residual block (MobileNetV2's first): the
/// fused block reads the image and gathers each patch row as it expands it,
/// with the values of tract's own convs; two images in turn (its scratch
/// rows reused), on two threads.
#[test]
fn the_first_fused_block_gathers_the_stems_patches_itself() {
    for (seed, (h, w, stride)) in [(320, 256, 2), (201, 330, 2)].into_iter().enumerate() {
        let mut b = Builder::new(20 + seed as u64);
        let x = b.conv("image", 3, 16, 3, stride, [1; 4], 1);
        let x = b.op("Relu", &[&x], vec![]);
        let x = b.conv(&x, 16, 16, 3, 1, [1; 4], 16);
        let x = b.op("Relu", &[&x], vec![]);
        let y = b.conv(&x, 16, 8, 1, 1, [0; 4], 1);
        let shape = [1, 3, h, w];
        let proto = b.model(("image", &shape), &y);
        let plain = TractNet::new(&proto, &shape, "plain").unwrap();
        let fused = TractNet::from_image(&proto, &shape, "fused").unwrap();
        assert!(!plain.stem_fused());
        assert!(fused.stem_fused(), "{h}×{w}: the stem was not fused");
        let threads = ersm::threads::Threads::new(2).unwrap();
        for x in [image(3 * h * w), image(3 * h * w + 5)[5..].to_vec()] {
            let (a, f) = threads.install(|| (plain.run(&x).unwrap(), fused.run(&x).unwrap()));
            assert!(rel_err(&f, &a) < 1e-5, "{h}×{w}: {}", rel_err(&f, &a));
        }
    }
}
