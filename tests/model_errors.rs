//! A bad model package gives a clear error naming the file and, where it
//! applies, the node; never a panic.

mod common;

use common::{fill_tensor as fill, Scratch};
use ersm::model::{read_onnx, MAX_CHANNELS};
use ersm::package::ModelPackage;
use prost::Message;
use std::path::Path;
use tract_onnx::pb::{
    attribute_proto::AttributeType, AttributeProto, ModelProto, NodeProto, TensorProto,
};

const TINY: &str = "models/tiny";

fn scratch(name: &str) -> Scratch {
    let dir = Scratch::dir("model-errors", name);
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

/// A head that flattens with `Reshape` to `[-1]` leaves a vector, not a
/// `[1, N]` row: the Add of the bias after its MatMul must broadcast over it
/// (it was refused as "a 1-channel tensor"), and the answers are unchanged.
#[test]
fn a_vector_head_reshaped_to_minus_one_runs_as_the_row_one() {
    let mut proto = read_onnx(&Path::new(TINY).join("model.onnx")).unwrap();
    let graph = proto.graph.as_mut().unwrap();
    let shape = graph
        .initializer
        .iter_mut()
        .find(|t| t.name == "head.shape")
        .expect("the tiny model reshapes with a constant 'head.shape'");
    *shape = TensorProto {
        name: "head.shape".into(),
        dims: vec![1],
        data_type: 7,
        int64_data: vec![-1],
        ..Default::default()
    };
    let dir = scratch("reshape-vector");
    std::fs::write(dir.join("model.onnx"), proto.encode_to_vec()).unwrap();
    let vector = ModelPackage::load(&dir).unwrap();
    let row = ModelPackage::load(TINY).unwrap();
    let frame = ersm::source::Frame {
        name: "noise".into(),
        width: 96,
        height: 80,
        rgb: (0..96 * 80 * 3).map(|i| (i * 7919 % 251) as u8).collect(),
    };
    let run = |m: ModelPackage| {
        let p = ersm::pipeline::Pipeline::new(m, ersm::ersm::Device::Cpu);
        (p.run_ersm(&frame).unwrap(), p.run_dense(&frame).unwrap())
    };
    let ((ev, dv), (er, dr)) = (run(vector), run(row));
    assert_eq!(ev.mask.kept, er.mask.kept);
    assert_eq!(ev.logits, er.logits);
    assert_eq!(dv.logits, dr.logits);
    assert_eq!(ev.logits.len(), 10);
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

/// A second energy layer is a gate inside the suffix: what the cut's sets
/// for the whole suffix (its stride rule, fills) it may not set.
#[test]
fn a_second_energy_layer_setting_the_stride_rule() {
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
        second.attribute.push(AttributeProto {
            name: "stride_rule".into(),
            r#type: AttributeType::String as i32,
            s: b"centre".to_vec(),
            ..Default::default()
        });
        for n in g.node.iter_mut().skip(i + 1) {
            n.input
                .iter_mut()
                .filter(|t| *t == "ersm.out")
                .for_each(|t| *t = "ersm2.out".into());
        }
        g.node.insert(i + 1, second);
    });
    assert_contains(
        &err,
        &["'ersm2'", "'stride_rule' is set on the first energy layer"],
    );
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
    let cases: [(&str, Option<f32>, Option<i64>, &str); 6] = [
        (
            "steps",
            None,
            Some(1_000_000),
            "steps must be between 0 and 100",
        ),
        ("lambda", Some(-0.5), None, "lambda must be"),
        ("tau", Some(0.0), None, "tau must be"),
        ("tau", Some(-1.0), None, "tau must be"),
        ("steps", None, Some(-2), "steps must be between 0 and 100"),
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

/// A suffix node may read a map the prefix computes (random_detector's
/// parity test runs them); the image itself, or an output computed before
/// the cut, is refused with the node and tensor named.
#[test]
fn what_may_cross_the_cut() {
    let err = load_modified("skip-image", |p| {
        let g = p.graph.as_mut().unwrap();
        let n = g.node.iter_mut().find(|n| n.name == "b1.add").unwrap();
        n.input[1] = "image".into();
    });
    assert_contains(
        &err,
        &["Add node 'b1.add'", "graph input 'image'", "cross the cut"],
    );
    let err = load_modified("output-before-cut", |p| {
        let g = p.graph.as_mut().unwrap();
        g.output.push(tract_onnx::pb::ValueInfoProto {
            name: "pre.pw".into(),
            ..Default::default()
        });
    });
    assert_contains(&err, &["graph output 'pre.pw'", "before the energy layer"]);
}

#[test]
fn unknown_stride_rule() {
    let err = load_modified("stride-rule", |p| {
        let n = energy_node(p);
        n.attribute.push(AttributeProto {
            name: "stride_rule".into(),
            r#type: AttributeType::String as i32,
            s: b"median".to_vec(),
            ..Default::default()
        });
    });
    assert_contains(
        &err,
        &["EnergyMask node 'ersm'", "stride_rule must be", "median"],
    );
}

/// Sets the energy node's `fills` attribute to `tensors`.
fn set_fills(p: &mut ModelProto, tensors: Vec<TensorProto>) {
    common::set_energy_attr(p, common::fills_attr(tensors));
}

#[test]
fn bad_fill_vectors_are_refused_by_name() {
    // b4.relu6 is a token map of the tiny suffix (48 channels).
    let ok = ModelPackage::load(TINY).unwrap();
    let c = ok.plan.fillable["b4.relu6"];
    let channels = format!("{c} channels");
    let cases: Vec<(&str, Vec<TensorProto>, Vec<&str>)> = vec![
        (
            "fill-channels",
            vec![fill("b4.relu6", vec![0.5; c + 1])],
            vec!["fill for 'b4.relu6'", &channels],
        ),
        (
            "fill-unknown",
            vec![fill("no.such.tensor", vec![0.5; 4])],
            vec!["'no.such.tensor'", "no such tensor after the energy layer"],
        ),
        (
            "fill-dense",
            vec![fill("head.pool", vec![0.5; 4])],
            vec!["'head.pool'", "no spatial extent"],
        ),
        (
            "fill-nan",
            vec![fill("b4.relu6", vec![f32::NAN; c])],
            vec!["EnergyMask node 'ersm'", "'b4.relu6'", "NaN", "finite"],
        ),
        (
            "fill-twice",
            vec![
                fill("b4.relu6", vec![0.5; c]),
                fill("b4.relu6", vec![0.5; c]),
            ],
            vec!["'b4.relu6'", "second fill"],
        ),
        (
            "fill-unnamed",
            vec![fill("", vec![0.5; c])],
            vec!["EnergyMask node 'ersm'", "no name"],
        ),
        (
            "fill-int",
            vec![TensorProto {
                data_type: 7,
                ..fill("b4.relu6", vec![])
            }],
            vec!["'b4.relu6'", "must be FLOAT"],
        ),
    ];
    for (name, tensors, want) in cases {
        let err = load_modified(name, |p| set_fills(p, tensors));
        assert_contains(&err, &want);
    }
    let err = load_modified("fill-not-tensors", |p| {
        set_attr(energy_node(p), "fills", Some(1.0), None)
    });
    assert_contains(&err, &["'fills' must be a list of tensors"]);
}

#[test]
fn a_package_with_fill_vectors_loads_and_attaches_them() {
    let mut proto = read_onnx(&Path::new(TINY).join("model.onnx")).unwrap();
    let c = ModelPackage::load(TINY).unwrap().plan.fillable["b4.relu6"];
    set_fills(&mut proto, vec![fill("b4.relu6", vec![0.25; c])]);
    let dir = scratch("fill-ok");
    std::fs::write(dir.join("model.onnx"), proto.encode_to_vec()).unwrap();
    let m = ModelPackage::load(&dir).unwrap();
    let slot = m.plan.tensors["b4.relu6"];
    assert_eq!(m.plan.slot_fills[slot].as_deref(), Some(&vec![0.25; c][..]));
    assert_eq!(m.plan.fill_count(), 1);
}

/// A package folder with the tiny model and a manifest edited by `edit`.
fn with_manifest(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Scratch {
    let dir = scratch(name);
    std::fs::copy(Path::new(TINY).join("model.onnx"), dir.join("model.onnx")).unwrap();
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut m);
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    dir
}

#[test]
fn bad_fallback_margin_and_dense_model() {
    for (k, (field, value, msg)) in [
        (
            "fallback",
            serde_json::json!({"margin": 1.5}),
            "fallback.margin must be",
        ),
        (
            "fallback",
            serde_json::json!({"margin": -0.1}),
            "fallback.margin must be",
        ),
        (
            "dense_model",
            serde_json::json!("model.onnx"),
            "dense_model must name another",
        ),
        (
            "dense_model",
            serde_json::json!("missing.onnx"),
            "missing.onnx",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = with_manifest(&format!("manifest{k}"), |m| m[field] = value.clone());
        let err = format!("{:#}", ModelPackage::load(&dir).expect_err("refused"));
        assert_contains(&err, &[msg]);
    }
}

/// The original network of the tiny model: its energy layer removed, the
/// suffix reading the prefix output directly.
fn tiny_original(edit_weights: impl FnOnce(&mut ModelProto)) -> ModelProto {
    common::without_energy_layer(&Path::new(TINY).join("model.onnx"), edit_weights)
}

#[test]
fn dense_model_is_the_baseline_and_must_share_the_prefix() {
    use ersm::ersm::Device;
    use ersm::pipeline::Pipeline;
    // The original with a changed suffix weight: the baseline differs from the
    // package's own dense path, and the pipeline's dense result follows it.
    let last_init = |p: &mut ModelProto| {
        let g = p.graph.as_mut().unwrap();
        let t = g
            .initializer
            .iter_mut()
            .rev()
            .find(|t| t.float_data.len() > 1 || t.raw_data.len() > 4)
            .unwrap();
        common::shift_first_value(t, 3.0);
    };
    let dir = with_manifest("baseline", |m| m["dense_model"] = "original.onnx".into());
    std::fs::write(
        dir.join("original.onnx"),
        tiny_original(last_init).encode_to_vec(),
    )
    .unwrap();
    let m = ModelPackage::load(&dir).unwrap();
    assert!(m.baseline.is_some());
    let x: Vec<f32> = (0..3 * 112 * 112)
        .map(|i| ((i % 97) as f32 / 97.0) - 0.5)
        .collect();
    let features = m.prefix.run(&x).unwrap();
    let own = m.dense_suffix.run(&features).unwrap();
    let original = m.baseline_suffix().run(&features).unwrap();
    assert!(own.iter().zip(&original).any(|(a, b)| (a - b).abs() > 1e-3));
    let p = Pipeline::new(m, Device::Cpu);
    let (dense, _) = p.dense_from_input(&x).unwrap();
    assert_eq!(dense, original);

    // An original whose prefix differs is refused, naming the weight.
    let first_init = |p: &mut ModelProto| {
        let g = p.graph.as_mut().unwrap();
        let t = &mut g.initializer[0];
        if t.raw_data.is_empty() {
            t.float_data[0] += 1.0;
        } else {
            t.raw_data[0] ^= 0x40;
        }
    };
    let dir = with_manifest("baseline-prefix", |m| {
        m["dense_model"] = "original.onnx".into()
    });
    std::fs::write(
        dir.join("original.onnx"),
        tiny_original(first_init).encode_to_vec(),
    )
    .unwrap();
    let err = format!("{:#}", ModelPackage::load(&dir).expect_err("refused"));
    assert_contains(&err, &["original.onnx", "must share the package's prefix"]);
}

#[test]
fn fallback_needs_a_margin_in_the_manifest() {
    use ersm::ersm::Device;
    use ersm::pipeline::Pipeline;
    let m = ModelPackage::load(TINY).unwrap();
    let err = format!(
        "{:#}",
        Pipeline::new(m, Device::Cpu).with_fallback().err().unwrap()
    );
    assert_contains(&err, &["models/tiny", "sets no fallback margin"]);
    // A margin of 1 re-runs every frame densely: the result is the dense one.
    let dir = with_manifest("fallback-all", |m| {
        m["fallback"] = serde_json::json!({"margin": 1.0})
    });
    let p = Pipeline::new(ModelPackage::load(&dir).unwrap(), Device::Cpu)
        .with_fallback()
        .unwrap();
    let x: Vec<f32> = (0..3 * 112 * 112)
        .map(|i| ((i % 89) as f32 / 89.0) - 0.5)
        .collect();
    let r = p.ersm_from_input(&x).unwrap();
    let (sparse, fell_back) = (r.logits, r.fell_back);
    let (dense, _) = p.dense_from_input(&x).unwrap();
    assert!(fell_back);
    assert_eq!(sparse, dense);
}

#[test]
fn paths_that_are_not_regular_files_are_refused_by_name() {
    // A directory or a device where the ONNX file should be.
    let dir = scratch("onnx-dir");
    std::fs::create_dir(dir.join("model.onnx")).unwrap();
    let err = format!("{:#}", ModelPackage::load(&dir).unwrap_err());
    assert_contains(&err, &["model.onnx", "is a directory"]);
    let dir = scratch("onnx-dev");
    std::os::unix::fs::symlink("/dev/null", dir.join("model.onnx")).unwrap();
    let err = format!("{:#}", ModelPackage::load(&dir).unwrap_err());
    assert_contains(&err, &["model.onnx", "is a character device"]);
    // FIFOs would block a read for ever: refused before opening.
    let dir = scratch("fifo");
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    let fifo_ok = |p: &Path| {
        std::process::Command::new("mkfifo")
            .arg(p)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !fifo_ok(&dir.join("manifest.json")) || !fifo_ok(&dir.join("x.jpg")) {
        println!("SKIPPED: the FIFO cases (no mkfifo)");
        return;
    }
    let err = format!("{:#}", ModelPackage::load(&dir).unwrap_err());
    assert_contains(&err, &["manifest.json", "is a FIFO"]);
    let err = format!(
        "{:#}",
        ersm::source::images::load(&dir.join("x.jpg")).unwrap_err()
    );
    assert_contains(&err, &["x.jpg", "is a FIFO"]);
}

#[test]
fn manifest_numbers_are_bounded_and_finite() {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "input",
            serde_json::json!({"name": "image", "shape": [1, 3, 100000, 100000]}),
            "H and W must be between 1 and 4096",
        ),
        (
            "scale",
            serde_json::json!(0.0),
            "preprocess.scale must be in (0, 1]",
        ),
        (
            "scale",
            serde_json::json!(-1.0),
            "preprocess.scale must be in (0, 1]",
        ),
        ("scale", serde_json::json!(1e39), "preprocess.scale"),
        (
            "mean",
            serde_json::json!([1e30, 0.0, 0.0]),
            "preprocess.mean must hold finite values",
        ),
        (
            "std",
            serde_json::json!([1e-45, 1.0, 1.0]),
            "preprocess.std must hold finite values",
        ),
        (
            "resize_short",
            serde_json::json!(1u64 << 40),
            "resize_short",
        ),
    ];
    for (k, (field, value, msg)) in cases.into_iter().enumerate() {
        let dir = with_manifest(&format!("numbers{k}"), |m| {
            if field == "input" {
                m["input"] = value.clone();
            } else {
                m["preprocess"][field] = value.clone();
            }
        });
        let err = format!("{:#}", ModelPackage::load(&dir).expect_err("refused"));
        assert_contains(&err, &["manifest", msg]);
    }
}

#[test]
fn manifest_input_shape_must_match_the_graph() {
    // The tiny graph declares [1, 3, 112, 112]; a manifest (with a matching
    // crop) asking for 96×96 is refused at load, naming both.
    // So is 4096×4096 (within the limit, but not what the graph was built for:
    // it used to run for minutes at 1.2 GB).
    for side in [96, 4096] {
        let dir = with_manifest(&format!("declared-shape-{side}"), |m| {
            m["input"]["shape"] = serde_json::json!([1, 3, side, side]);
            m["preprocess"]["crop"] = serde_json::json!(side);
            m["preprocess"]["resize_short"] = serde_json::json!(side + 14);
        });
        let err = format!("{:#}", ModelPackage::load(&dir).expect_err("refused"));
        assert_contains(
            &err,
            &["declared with dimension 2 = 112", &format!("says {side}")],
        );
    }
}

#[test]
fn non_finite_weights_are_refused_at_load_by_name() {
    for (k, bad) in [f32::NAN, f32::INFINITY].into_iter().enumerate() {
        let mut name = String::new();
        let err = load_modified(&format!("nan{k}"), |p| {
            let g = p.graph.as_mut().unwrap();
            let e = g.node.iter().find(|n| n.op_type == "EnergyMask").unwrap();
            name = e.input[1].clone();
            let t = g.initializer.iter_mut().find(|t| t.name == name).unwrap();
            if t.raw_data.is_empty() {
                t.float_data[0] = bad;
            } else {
                t.raw_data[..4].copy_from_slice(&bad.to_le_bytes());
            }
        });
        assert_contains(
            &err,
            &[&format!("constant '{name}'"), "weights must be finite"],
        );
    }
}

#[test]
fn string_initializer_is_refused_not_a_panic() {
    let err = load_modified("string-init", |p| {
        let g = p.graph.as_mut().unwrap();
        g.initializer.push(tract_onnx::pb::TensorProto {
            name: "words".into(),
            data_type: 8,
            dims: vec![1],
            string_data: vec![b"hello".to_vec()],
            ..Default::default()
        });
    });
    assert_contains(&err, &["initializer 'words'", "STRING", "cannot load"]);
}

#[test]
fn too_many_channels_at_the_cut_are_refused() {
    // A 1×1 conv to MAX_CHANNELS + 1 channels on a 4×4 input, then the energy
    // layer and global pooling: small weights, a feature map over the limit.
    let c = MAX_CHANNELS + 1;
    let mut b = common::Builder::new(3);
    let x = b.conv("image", 3, c, 1, 1, [0, 0, 0, 0], 1);
    let x = common::energy(&mut b, &x, c, 0.3, 0, 4);
    let y = b.op("GlobalAveragePool", &[&x], vec![]);
    let proto = b.model(("image", &[1, 3, 4, 4]), &y);
    let err = match ModelPackage::from_proto(proto, common::manifest(4, 4), Path::new("wide.onnx"))
    {
        Ok(_) => panic!("a {c}-channel cut loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert_contains(
        &err,
        &[
            "wide.onnx",
            &format!("{c}×4×4"),
            "channels must be between 1 and 8192",
        ],
    );
}

/// Puts `convs` 3×3 conv layers (24 → 24 channels, weights `dims`) ahead of
/// the tiny model's linear unary head.
fn with_head_convs(p: &mut ModelProto, convs: usize, dims: &[i64]) {
    let g = p.graph.as_mut().unwrap();
    for i in 0..convs {
        for (name, d) in [
            (format!("ersm.conv{i}.w"), dims.to_vec()),
            (format!("ersm.conv{i}.b"), vec![dims[0]]),
        ] {
            let len: i64 = d.iter().product();
            g.initializer.push(tract_onnx::pb::TensorProto {
                name: name.clone(),
                dims: d,
                data_type: 1,
                float_data: vec![0.01; len as usize],
                ..Default::default()
            });
        }
    }
    let node = energy_node(p);
    let mut inputs = vec![node.input[0].clone()];
    for i in 0..convs {
        inputs.push(format!("ersm.conv{i}.w"));
        inputs.push(format!("ersm.conv{i}.b"));
    }
    inputs.extend(node.input[1..].iter().cloned());
    node.input = inputs;
    set_attr(node, "convs", None, Some(convs as i64));
}

#[test]
fn a_unary_head_with_conv_layers_loads() {
    let mut proto = read_onnx(&Path::new(TINY).join("model.onnx")).unwrap();
    with_head_convs(&mut proto, 2, &[24, 24, 3, 3]);
    let dir = scratch("conv-head");
    std::fs::write(dir.join("model.onnx"), proto.encode_to_vec()).unwrap();
    let m = ModelPackage::load(&dir).unwrap();
    let (h, w) = (m.cut.h, m.cut.w);
    assert_eq!(
        m.energy.head.describe(),
        "3×3 conv 24→24, 3×3 conv 24→24, then linear"
    );
    // Two 3×3 convs of 24 channels and the 24-weight linear head per token.
    assert_eq!(
        m.energy.head.macs(h, w),
        ((2 * 24 * 24 * 9 + 24) * h * w) as u64
    );
}

#[test]
fn bad_unary_head_convs_are_refused_by_name() {
    let cases: [(&str, usize, Vec<i64>, &str); 4] = [
        ("even", 1, vec![24, 24, 2, 2], "conv 0 weight"),
        (
            "flat",
            1,
            vec![24, 24],
            "must be a constant [Cout, 24 / groups, k, k]",
        ),
        ("groups", 1, vec![24, 5, 3, 3], "conv 0 weight"),
        (
            "head",
            1,
            vec![16, 24, 3, 3],
            "unary weight has 24 values, the head's input has 16 channels",
        ),
    ];
    for (name, convs, dims, msg) in cases {
        let err = load_modified(&format!("conv-{name}"), |p| {
            with_head_convs(p, convs, &dims)
        });
        assert_contains(&err, &["EnergyMask node 'ersm'", msg]);
    }
    let err = load_modified("conv-count", |p| {
        with_head_convs(p, 1, &[24, 24, 3, 3]);
        set_attr(energy_node(p), "convs", None, Some(2));
    });
    assert_contains(
        &err,
        &[
            "EnergyMask node 'ersm'",
            "conv 1 weight (input 3, 'ersm.w')",
        ],
    );
    let err = load_modified("conv-inputs", |p| {
        with_head_convs(p, 1, &[24, 24, 3, 3]);
        energy_node(p).input.pop();
    });
    assert_contains(&err, &["with 1 conv layers, expected 5 inputs"]);
    let err = load_modified("conv-many", |p| {
        set_attr(energy_node(p), "convs", None, Some(17))
    });
    assert_contains(&err, &["convs must be between 0 and 16"]);
}

fn set_ints(node: &mut NodeProto, name: &str, v: &[i64]) {
    node.attribute.retain(|a| a.name != name);
    node.attribute.push(AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    });
}

#[test]
fn a_dilated_unary_head_loads_and_bad_dilations_are_refused() {
    let mut proto = read_onnx(&Path::new(TINY).join("model.onnx")).unwrap();
    with_head_convs(&mut proto, 2, &[24, 24, 3, 3]);
    set_ints(energy_node(&mut proto), "conv_dilations", &[1, 4]);
    let dir = scratch("conv-head-dilated");
    std::fs::write(dir.join("model.onnx"), proto.encode_to_vec()).unwrap();
    let m = ModelPackage::load(&dir).unwrap();
    assert_eq!(
        m.energy.head.describe(),
        "3×3 conv 24→24, 3×3 dilated 4 conv 24→24, then linear"
    );
    for (name, v) in [
        ("short", vec![2]),
        ("zero", vec![1, 0]),
        ("wide", vec![65, 1]),
    ] {
        let err = load_modified(&format!("conv-dilation-{name}"), |p| {
            with_head_convs(p, 2, &[24, 24, 3, 3]);
            set_ints(energy_node(p), "conv_dilations", &v);
        });
        assert_contains(
            &err,
            &[
                "EnergyMask node 'ersm'",
                "conv_dilations must hold 2 values between 1 and 64",
            ],
        );
    }
    let err = load_modified("conv-relu-two", |p| {
        with_head_convs(p, 2, &[24, 24, 3, 3]);
        set_ints(energy_node(p), "conv_relu", &[1, 2]);
    });
    assert_contains(
        &err,
        &[
            "EnergyMask node 'ersm'",
            "conv_relu must hold 2 values of 0 or 1, got [1, 2]",
        ],
    );
}

#[test]
fn a_fill_on_an_alias_is_refused_naming_its_source() {
    use common::*;
    let mut b = Builder::new(3);
    let x = b.conv("image", 3, 4, 1, 1, [0; 4], 1);
    let x = energy(&mut b, &x, 4, 0.5, 0, 4);
    let y = b.conv(&x, 4, 4, 1, 1, [0; 4], 1);
    let alias = b.op("Identity", &[&y], vec![]);
    let z = b.conv(&alias, 4, 4, 3, 1, [1; 4], 4);
    let out = b.op("GlobalAveragePool", &[&z], vec![]);
    let proto = with_fills_attr(
        b.model(("image", &[1, 3, 8, 8]), &out),
        &[(alias.clone(), vec![0.5; 4])],
    );
    let err = match ModelPackage::from_proto(proto, manifest(8, 8), Path::new("alias/model.onnx")) {
        Ok(_) => panic!("a fill on an alias loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert_contains(
        &err,
        &[
            &format!("'{alias}'"),
            "Identity or Dropout",
            &format!("'{y}'"),
        ],
    );
}

#[test]
fn a_transposed_conv_whose_kernel_is_not_its_stride_is_refused_by_name() {
    // The first random network with an upsampling step.
    let (proto, h, w) = (0..64u64)
        .map(|seed| (common::random_network(seed, 9, 9, 8), 9, 9))
        .find(|(p, ..)| {
            p.graph
                .as_ref()
                .unwrap()
                .node
                .iter()
                .any(|n| n.op_type == "ConvTranspose")
        })
        .expect("some random network upsamples");
    let mut proto = proto;
    let node = proto
        .graph
        .as_mut()
        .unwrap()
        .node
        .iter_mut()
        .find(|n| n.op_type == "ConvTranspose")
        .unwrap();
    let name = node.name.clone();
    let strides = node
        .attribute
        .iter_mut()
        .find(|a| a.name == "strides")
        .unwrap();
    strides.ints = vec![3, 3];
    let err = ModelPackage::from_proto(proto, common::manifest(h, w), Path::new("t/model.onnx"))
        .err()
        .map(|e| format!("{e:#}"))
        .expect("refused");
    assert_contains(
        &err,
        &[
            &format!("ConvTranspose node '{name}'"),
            "kernel equals its stride",
            "kernel 2×2, stride 3",
        ],
    );
}

/// A detector's manifest: its decoder, threshold and NMS overlap are
/// checked, `resize` must be the input size and excludes a crop, and a
/// classifier's network (one output of logits) is not CenterFace's four
/// maps.
#[test]
fn bad_detector_manifests() {
    let detector = |threshold: f64, nms: f64| serde_json::json!({"decoder": "centerface", "threshold": threshold, "nms_iou": nms});
    let cases = [
        (
            "decoder",
            serde_json::json!({"decoder": "yolo", "threshold": 0.5}),
            "detector.decoder \"yolo\"",
        ),
        (
            "threshold",
            detector(1.5, 0.3),
            "detector.threshold must be in (0, 1)",
        ),
        (
            "nms",
            detector(0.5, 0.0),
            "detector.nms_iou must be in (0, 1]",
        ),
        (
            "classifier-as-detector",
            detector(0.5, 0.3),
            "four output maps of 1, 2, 2 and 10 channels",
        ),
    ];
    for (name, value, msg) in cases {
        let dir = with_manifest(&format!("detector-{name}"), |m| m["detector"] = value);
        let err = format!("{:#}", ModelPackage::load(&dir).expect_err(name));
        assert_contains(&err, &[msg]);
    }
    let dir = with_manifest("detector-resize-and-crop", |m| {
        m["preprocess"]["resize"] = serde_json::json!([112, 112]);
    });
    let err = format!("{:#}", ModelPackage::load(&dir).expect_err("refused"));
    assert_contains(&err, &["give resize, or resize_short and crop, not both"]);
    // resize alone must equal the input's [W, H].
    let dir = with_manifest("detector-resize-mismatch", |m| {
        let p = m["preprocess"].as_object_mut().unwrap();
        p.remove("crop");
        p.remove("resize_short");
        p.insert("resize".into(), serde_json::json!([96, 112]));
    });
    let err = format!("{:#}", ModelPackage::load(&dir).expect_err("refused"));
    assert_contains(&err, &["preprocess.resize [96, 112]", "112×112"]);
    // Stream settings: a detector's only, within their limits.
    let dir = with_manifest("track-on-a-classifier", |m| {
        m["track"] = serde_json::json!({"margin": 2});
    });
    let err = format!("{:#}", ModelPackage::load(&dir).expect_err("refused"));
    assert_contains(&err, &["track", "needs a detector section"]);
    for (name, track, msg) in [
        (
            "margin",
            serde_json::json!({"margin": 65}),
            "track.margin must be at most 64",
        ),
        (
            "frames",
            serde_json::json!({"margin": 2, "frames": 0}),
            "track.frames must be 1-100",
        ),
        (
            "refresh",
            serde_json::json!({"margin": 2, "refresh": 1}),
            "track.refresh must be 0 (never) or 2-10000",
        ),
        (
            "new-tokens",
            serde_json::json!({"margin": 2, "new_tokens": 101}),
            "track.new_tokens must be 0 (never) or 1-100",
        ),
        (
            "offset",
            serde_json::json!({"margin": 2, "gate_offsets": {"ersm.gate": 1e9}}),
            "track.gate_offsets.ersm.gate must be finite",
        ),
        (
            "key",
            serde_json::json!({"margin": 2, "gates": {}}),
            "unknown field `gates`",
        ),
    ] {
        let dir = with_manifest(&format!("track-{name}"), |m| {
            m["detector"] = detector(0.5, 0.3);
            m["track"] = track;
        });
        let err = format!("{:#}", ModelPackage::load(&dir).expect_err(name));
        assert_contains(&err, &[msg]);
    }
}

/// A gate named in the stream settings that the suffix does not hold is
/// refused by name when the stream is tracked, with the gates it has.
#[test]
fn track_names_a_gate_the_suffix_has() {
    let dir = Scratch::dir("model_errors", "track-gate-name");
    for f in std::fs::read_dir("models/centerface_ersm").unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
        }
    }
    let path = dir.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    m["track"]["gate_offsets"] = serde_json::json!({"ersm.gat": 1.0});
    std::fs::write(&path, m.to_string()).unwrap();
    let p =
        ersm::pipeline::Pipeline::new(ModelPackage::load(&*dir).unwrap(), ersm::ersm::Device::Cpu);
    let err = format!("{:#}", p.with_tracking().err().expect("refused"));
    assert_contains(
        &err,
        &[
            "no gate 'ersm.gat'",
            "ersm.gate",
            "ersm.peak",
            "track.gate_offsets",
        ],
    );
}

/// A network with two outputs and no decoder named runs in the tests, but
/// a package loaded from a folder must say how its outputs are read.
#[test]
fn several_outputs_need_a_decoder() {
    let err = load_modified("two-outputs", |p| {
        let g = p.graph.as_mut().unwrap();
        let second = g
            .node
            .iter()
            .rev()
            .find(|n| n.op_type == "Conv")
            .unwrap()
            .output[0]
            .clone();
        g.output.push(tract_onnx::pb::ValueInfoProto {
            name: second,
            ..Default::default()
        });
    });
    assert_contains(&err, &["the graph has 2", "names its decoder"]);
}

/// A misspelt or unknown key or attribute is an error naming it, never a
/// silent default: manifest keys at every level, the input's layout and
/// colour, the output's name, and the energy node's attributes.
#[test]
fn unknown_keys_and_attributes_are_named() {
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 5] = [
        (
            "key",
            |m| m["labelz"] = serde_json::json!([]),
            "unknown field `labelz`",
        ),
        (
            "preprocess-key",
            |m| m["preprocess"]["crop_size"] = serde_json::json!(112),
            "unknown field `crop_size`",
        ),
        (
            "colour",
            |m| m["input"]["colour"] = serde_json::json!("BGR"),
            "input.colour \"BGR\"",
        ),
        (
            "layout",
            |m| m["input"]["layout"] = serde_json::json!("NHWC"),
            "input.layout \"NHWC\"",
        ),
        (
            "output",
            |m| m["output"]["name"] = serde_json::json!("probs"),
            "output.name is 'probs'",
        ),
    ];
    for (name, edit, msg) in cases {
        let dir = with_manifest(&format!("unknown-{name}"), edit);
        let err = format!("{:#}", ModelPackage::load(&dir).expect_err(name));
        assert_contains(&err, &[msg]);
    }
    for (attr, hint) in [
        ("neighborhood", "did you mean 'neighbourhood'"),
        ("fill", "did you mean 'fills'"),
    ] {
        let err = load_modified(&format!("attr-{attr}"), |p| {
            energy_node(p).attribute.push(AttributeProto {
                name: attr.into(),
                r#type: AttributeType::Int as i32,
                i: 8,
                ..Default::default()
            });
        });
        assert_contains(&err, &[&format!("unknown attribute '{attr}'"), hint]);
    }
}

/// A graph whose output is a feature map is not a classifier: its values
/// must be one logit per label.
#[test]
fn a_feature_map_is_not_logits() {
    let err = load_modified("feature-map-output", |p| {
        let g = p.graph.as_mut().unwrap();
        g.output[0].name = "ersm.out".into();
    });
    assert_contains(&err, &["values) and the manifest lists 10 labels"]);
}
