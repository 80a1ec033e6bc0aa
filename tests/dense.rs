//! The dense baseline: tract's run of the whole network equals prefix + dense
//! suffix, equals ONNX Runtime's logits, and equals ERSM when every token is kept.

use ersm::ersm::UnaryHead;
use ersm::package::ModelPackage;
use ersm::pipeline::Pipeline;
use ersm::prefix::TractNet;

fn probe(n: usize) -> Vec<f32> {
    // The input export.py gave ONNX Runtime: x[i] = sin(0.01 i).
    (0..n).map(|i| (0.01 * i as f64).sin() as f32).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn matches_onnxruntime(dir: &str) {
    let m = ModelPackage::load(dir).unwrap();
    // ONNX Runtime's dense logits for the probe, saved at export.
    let name = std::path::Path::new(dir)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    let path = format!("tests/data/{name}_onnxruntime_logits.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let expected: Vec<f32> = json["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let x = probe(m.manifest.input.shape.iter().product());
    let pipeline = Pipeline::new(m, ersm::ersm::Device::Cpu);
    let (logits, _) = pipeline.dense_from_input(&x).unwrap();
    let d = max_abs_diff(&logits, &expected);
    assert!(
        d <= 1e-4,
        "{dir}: tract dense vs onnxruntime: max |diff| {d}"
    );
}

#[test]
fn dense_baseline_matches_onnxruntime_tiny() {
    matches_onnxruntime("models/tiny");
}

#[test]
fn dense_baseline_matches_onnxruntime_mobilenet_v2() {
    matches_onnxruntime("models/mobilenet_v2_ersm");
}

#[test]
fn whole_graph_equals_prefix_plus_dense_suffix() {
    let m = ModelPackage::load("models/tiny").unwrap();
    let whole = TractNet::new(&m.dense_proto, &m.manifest.input.shape, "whole").unwrap();
    let x = probe(3 * 112 * 112);
    let split = m.dense_suffix.run(&m.prefix.run(&x).unwrap()).unwrap();
    let d = max_abs_diff(&whole.run(&x).unwrap(), &split);
    assert!(d <= 1e-5, "max |diff| {d}");
}

#[test]
fn ersm_keeping_every_token_equals_dense() {
    let mut m = ModelPackage::load("models/tiny").unwrap();
    if let UnaryHead::Linear { b, .. } = &mut m.energy.head {
        *b = -1e6;
    }
    let pipeline = Pipeline::new(m, ersm::ersm::Device::Cpu);
    let x = probe(3 * 112 * 112);
    let r = pipeline.ersm_from_input(&x).unwrap();
    let (sparse, mask) = (r.logits, r.mask);
    assert_eq!(mask.keep_ratio(), 1.0);
    let (dense, _) = pipeline.dense_from_input(&x).unwrap();
    let d = max_abs_diff(&sparse, &dense);
    assert!(d <= 1e-4, "max |diff| {d}");
}

#[test]
fn top1_margin_is_the_softmax_gap() {
    use ersm::logits::top1_margin;
    // Two equal logits: no margin. One dominant: nearly 1.
    assert!(top1_margin(&[2.0, 2.0, -1.0]).abs() < 1e-6);
    assert!(top1_margin(&[30.0, 0.0, 0.0]) > 0.999);
    // exp(1) / (exp(1) + 2) - 1 / (exp(1) + 2), by hand.
    let e = 1f32.exp();
    let want = (e - 1.0) / (e + 2.0);
    assert!((top1_margin(&[1.0, 0.0, 0.0]) - want).abs() < 1e-6);
    // A NaN logit is never sure.
    assert_eq!(top1_margin(&[f32::NAN, 1.0]), 0.0);
}
