//! A bad model package gives a clear error naming the file and, where it
//! applies, the node; never a panic.

use ersm::model::{read_onnx, ModelPackage};
use prost::Message;
use std::path::{Path, PathBuf};
use tract_onnx::pb::{attribute_proto::AttributeType, AttributeProto, ModelProto, NodeProto};

const TINY: &str = "models/tiny";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ersm-model-errors-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        Path::new(TINY).join("manifest.json"),
        dir.join("manifest.json"),
    )
    .unwrap();
    dir
}

/// Writes a modified copy of the tiny model and loads it; returns the error text.
fn load_modified(name: &str, edit: impl FnOnce(&mut ModelProto)) -> String {
    let mut proto = read_onnx(&Path::new(TINY).join("model.onnx")).unwrap();
    edit(&mut proto);
    let dir = scratch(name);
    std::fs::write(dir.join("model.onnx"), proto.encode_to_vec()).unwrap();
    let err = match ModelPackage::load(&dir) {
        Ok(_) => panic!("{name}: loaded without error"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(&dir.join("model.onnx").display().to_string()),
        "{name}: error does not name the file: {err}"
    );
    err
}

fn energy_node(p: &mut ModelProto) -> &mut NodeProto {
    p.graph
        .as_mut()
        .unwrap()
        .node
        .iter_mut()
        .find(|n| n.op_type == "EnergyMask")
        .unwrap()
}

fn set_attr(node: &mut NodeProto, name: &str, f: Option<f32>, i: Option<i64>) {
    node.attribute.retain(|a| a.name != name);
    node.attribute.push(AttributeProto {
        name: name.into(),
        r#type: if f.is_some() {
            AttributeType::Float
        } else {
            AttributeType::Int
        } as i32,
        f: f.unwrap_or(0.0),
        i: i.unwrap_or(0),
        ..Default::default()
    });
}

fn assert_contains(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "expected {p:?} in: {err}");
    }
}

#[test]
fn the_shipped_tiny_model_loads() {
    let m = ModelPackage::load(TINY).unwrap();
    assert_eq!((m.cut.c, m.cut.h, m.cut.w), (24, 28, 28));
    assert_eq!(m.cut.node, "ersm");
}

#[test]
fn missing_package_and_files() {
    let err = format!(
        "{:#}",
        ModelPackage::load("models/no-such-model").unwrap_err()
    );
    assert_contains(&err, &["models/no-such-model", "not found"]);

    let dir = scratch("no-manifest");
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    let err = format!("{:#}", ModelPackage::load(&dir).unwrap_err());
    assert_contains(&err, &["manifest.json"]);

    let dir = scratch("no-onnx");
    let err = format!("{:#}", ModelPackage::load(&dir).unwrap_err());
    assert_contains(&err, &["model.onnx", "cannot open"]);
}

#[test]
fn not_onnx() {
    for (name, bytes) in [
        ("text", b"this is not a model at all\n".to_vec()),
        ("empty", vec![]),
        ("png", std::fs::read("models/images/chelsea.png").unwrap()),
    ] {
        let dir = scratch(name);
        std::fs::write(dir.join("model.onnx"), bytes).unwrap();
        let err = format!("{:#}", ModelPackage::load(&dir).unwrap_err());
        assert_contains(&err, &["model.onnx", "not an ONNX model"]);
    }
}

#[test]
fn bad_manifest() {
    let dir = scratch("bad-manifest");
    std::fs::copy(Path::new(TINY).join("model.onnx"), dir.join("model.onnx")).unwrap();
    let text = std::fs::read_to_string(dir.join("manifest.json"))
        .unwrap()
        .replace("\"crop\": 112", "\"crop\": 100");
    std::fs::write(dir.join("manifest.json"), text).unwrap();
    let err = format!("{:#}", ModelPackage::load(&dir).unwrap_err());
    assert_contains(&err, &["manifest.json", "crop"]);
}

#[test]
fn no_energy_layer() {
    let err = load_modified("no-energy", |p| {
        let n = energy_node(p);
        n.op_type = "Identity".into();
        n.domain.clear();
        n.input.truncate(1);
        n.attribute.clear();
    });
    assert_contains(&err, &["no energy layer", "EnergyMask"]);
}

#[test]
fn two_energy_layers() {
    let err = load_modified("two-energy", |p| {
        let g = p.graph.as_mut().unwrap();
        let i = g
            .node
            .iter()
            .position(|n| n.op_type == "EnergyMask")
            .unwrap();
        let mut second = g.node[i].clone();
        second.name = "ersm2".into();
        second.input[0] = "ersm.out".into();
        second.output[0] = "ersm2.out".into();
        for n in g.node.iter_mut().skip(i + 1) {
            n.input
                .iter_mut()
                .filter(|t| *t == "ersm.out")
                .for_each(|t| *t = "ersm2.out".into());
        }
        g.node.insert(i + 1, second);
    });
    assert_contains(&err, &["more than one energy layer", "'ersm'", "'ersm2'"]);
}

#[test]
fn wrong_domain() {
    let err = load_modified("domain", |p| energy_node(p).domain = "com.example".into());
    assert_contains(&err, &["EnergyMask node 'ersm'", "com.example"]);
}

#[test]
fn unsupported_op_after_the_cut_names_op_and_node() {
    let err = load_modified("unsupported", |p| {
        let g = p.graph.as_mut().unwrap();
        let n = g.node.iter_mut().find(|n| n.name == "b2.relu").unwrap();
        n.op_type = "LeakyRelu".into();
    });
    assert_contains(
        &err,
        &[
            "LeakyRelu node 'b2.relu'",
            "not supported by the sparse executor",
        ],
    );
}

#[test]
fn energy_weight_shape_mismatch() {
    let err = load_modified("shape", |p| {
        let g = p.graph.as_mut().unwrap();
        let t = g
            .initializer
            .iter_mut()
            .find(|t| t.name == "ersm.w")
            .unwrap();
        *t = tract_onnx::pb::TensorProto {
            name: "ersm.w".into(),
            dims: vec![16],
            data_type: 1,
            float_data: vec![0.1; 16],
            ..Default::default()
        };
    });
    assert_contains(
        &err,
        &["EnergyMask node 'ersm'", "16 values", "24 channels"],
    );
}

#[test]
fn conv_weight_shape_mismatch() {
    let err = load_modified("conv-shape", |p| {
        let g = p.graph.as_mut().unwrap();
        let t = g
            .initializer
            .iter_mut()
            .find(|t| t.name == "b1.expand.w")
            .unwrap();
        *t = tract_onnx::pb::TensorProto {
            name: "b1.expand.w".into(),
            dims: vec![64, 20, 1, 1],
            data_type: 1,
            float_data: vec![0.1; 64 * 20],
            ..Default::default()
        };
    });
    assert_contains(&err, &["Conv node 'b1.expand'", "20 input channels", "24"]);
}

#[test]
fn bad_attributes() {
    let cases: [(&str, Option<f32>, Option<i64>, &str); 5] = [
        ("lambda", Some(-0.5), None, "lambda must be"),
        ("tau", Some(0.0), None, "tau must be"),
        ("tau", Some(-1.0), None, "tau must be"),
        ("steps", None, Some(-2), "steps must be >= 0"),
        (
            "neighbourhood",
            None,
            Some(6),
            "neighbourhood must be 4 or 8",
        ),
    ];
    for (k, (attr, f, i, msg)) in cases.into_iter().enumerate() {
        let err = load_modified(&format!("attr{k}"), |p| {
            set_attr(energy_node(p), attr, f, i)
        });
        assert_contains(&err, &["EnergyMask node 'ersm'", msg]);
    }
}

#[test]
fn connection_across_the_cut() {
    let err = load_modified("skip", |p| {
        let g = p.graph.as_mut().unwrap();
        let n = g.node.iter_mut().find(|n| n.name == "b1.add").unwrap();
        n.input[1] = "pre.relu".into();
    });
    assert_contains(&err, &["Add node 'b1.add'", "'pre.relu'", "across the cut"]);
}
