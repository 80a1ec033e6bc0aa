//! The bundled MobileNetV2 ERSM package: it loads, its sparse suffix equals the
//! dense-masked reference on real photos, and it names what is in them.

mod common;

use common::*;
use ersm::ersm::{cpu, FeatureMap};
use ersm::model::ModelPackage;
use ersm::pipeline::{top1, Pipeline};
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
