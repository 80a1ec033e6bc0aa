//! The bundled MobileNetV2 ERSM package: it loads, its sparse suffix equals the
//! dense-masked reference on real photos, and it names what is in them.

mod common;

use common::*;
use ersm::ersm::{cpu, FeatureMap};
use ersm::logits::top1;
use ersm::package::ModelPackage;
use ersm::pipeline::Pipeline;
use ersm::source::images;

const MODEL: &str = "models/mobilenet_v2_ersm";

fn pipeline() -> Pipeline {
    Pipeline::new(
        ModelPackage::load(MODEL).expect("shipped model loads"),
        ersm::ersm::Device::Cpu,
    )
}

#[test]
fn loads_with_the_expected_cut() {
    let p = pipeline();
    let m = &p.model;
    assert_eq!((m.cut.c, m.cut.h, m.cut.w), (32, 28, 28));
    assert_eq!(m.manifest.labels.len(), 1000);
    assert_eq!(m.plan.levels.len(), 3, "28×28, 14×14 and 7×7 token sets");
}

#[test]
fn sparse_suffix_equals_dense_masked_reference_on_photos() {
    let p = pipeline();
    let m = &p.model;
    for name in ["chelsea.png", "coffee.png"] {
        let frame = images::load(&std::path::Path::new("models/images").join(name)).unwrap();
        let input = p.preprocess(&frame).unwrap();
        let x = m.prefix.run(&input).unwrap();
        let mask = cpu::compute(
            FeatureMap::new(&x, m.cut.c, m.cut.h, m.cut.w).unwrap(),
            &m.energy,
        )
        .unwrap();
        let err = rel_err(&sparse(m, &x, &mask.kept), &dense_masked(m, &x, &mask.kept));
        assert!(err <= 1e-4, "{name}: relative error {err}");
    }
}

#[test]
fn names_the_cat_and_the_cup() {
    let p = pipeline();
    for (name, accepted) in [
        ("chelsea.png", &["tabby", "tiger cat", "Egyptian cat"][..]),
        ("coffee.png", &["cup", "espresso", "coffee mug"][..]),
    ] {
        let frame = images::load(&std::path::Path::new("models/images").join(name)).unwrap();
        let dense = p.manifest_label(top1(&p.run_dense(&frame).unwrap().logits));
        let ersm = p.run_ersm(&frame).unwrap();
        let sparse = p.manifest_label(top1(&ersm.logits));
        assert!(
            accepted.contains(&dense.as_str()),
            "{name}: dense says {dense}"
        );
        assert!(
            accepted.contains(&sparse.as_str()),
            "{name}: ERSM says {sparse} (keep {:.2})",
            ersm.mask.keep_ratio()
        );
    }
}

/// The package sets a fallback margin (chosen on training views): with it,
/// a photo whose sparse answer is unsure gets the dense answer, and one that
/// is sure keeps its sparse answer.
#[test]
fn fallback_gives_the_dense_answer_on_unsure_photos() {
    let p = pipeline()
        .with_fallback()
        .expect("the package sets a fallback margin");
    let margin = p.model.manifest.fallback.as_ref().unwrap().margin;
    assert!(margin > 0.0 && margin < 1.0, "margin {margin}");
    let plain = pipeline();
    let mut fell = 0;
    for file in std::fs::read_dir("models/images").unwrap() {
        let path = file.unwrap().path();
        let Ok(frame) = images::load(&path) else {
            continue;
        };
        let sparse = plain.run_ersm(&frame).unwrap();
        let dense = plain.run_dense(&frame).unwrap();
        let got = p.run_ersm(&frame).unwrap();
        let unsure = ersm::logits::top1_margin(&sparse.logits) < margin;
        assert_eq!(got.fell_back, unsure, "{}", path.display());
        let want = if unsure {
            &dense.logits
        } else {
            &sparse.logits
        };
        assert_eq!(top1(&got.logits), top1(want), "{}", path.display());
        fell += usize::from(unsure);
    }
    assert!(
        fell > 0,
        "no bundled photo was unsure: the test would not see a fallback"
    );
}
