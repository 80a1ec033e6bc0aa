//! The bundled face detector package (`models/centerface_ersm`): it loads as
//! a detector whose suffix reads the prefix's stride-4 map; its sparse
//! outputs, behind its gates (after the first stride-16 block, and before
//! the heads), equal the multi-pass dense-masked reference on a real photo;
//! without the gates and with every token kept they are the dense
//! network's; it finds the dense network's faces; and `ersm run` reports
//! faces, writes them to --jsonl and covers them with --anonymize.

mod common;

use common::*;
use ersm::answer::Answer;
use ersm::ersm::{cpu, FeatureMap};
use ersm::package::ModelPackage;
use ersm::pipeline::Pipeline;
use ersm::source::images;
use std::path::Path;
use std::process::{Command, Stdio};

const MODEL: &str = "models/centerface_ersm";
/// A NASA portrait (public domain, scikit-image's `astronaut`): one face.
const FACE: &str = "models/images/astronaut.png";

fn pipeline() -> Pipeline {
    Pipeline::new(
        ModelPackage::load(MODEL).expect("the face package loads"),
        ersm::ersm::Device::Cpu,
    )
}

/// The prefix's maps of the astronaut photo under `p` and the energy
/// layer's mask of them.
fn photo_mask(p: &Pipeline) -> (ersm::pipeline::PrefixMaps, ersm::ersm::TokenMask) {
    let m = &p.model;
    let frame = images::load(Path::new(FACE)).unwrap();
    let maps = p.features(&p.preprocess(&frame).unwrap()).unwrap();
    let mask = cpu::compute(
        FeatureMap::new(&maps.features, m.cut.c, m.cut.h, m.cut.w).unwrap(),
        &m.energy,
    )
    .unwrap();
    (maps, mask)
}

#[test]
fn loads_as_a_detector_reading_the_stride_4_map() {
    let p = pipeline();
    let m = &p.model;
    assert!(m.reader.is_detector());
    assert_eq!((m.cut.c, m.cut.h, m.cut.w), (32, 60, 80));
    let taps: Vec<(usize, usize, usize)> = m.cut.taps.iter().map(|t| (t.c, t.h, t.w)).collect();
    assert_eq!(taps, vec![(24, 120, 160)], "the stride-4 lateral's map");
    assert_eq!(m.plan.outputs.len(), 4, "heatmap, scale, offset, landmarks");
}

/// The shipped package's gates (its later energy layers: after the first
/// stride-16 block, and on the FPN's stride-4 sum before the heads): on a
/// photo the sparse outputs equal the multi-pass dense-masked reference,
/// each gate keeps the reference's set, and each narrows its level (and so
/// every level behind it).
#[test]
fn sparse_outputs_equal_the_dense_masked_reference_on_a_photo() {
    let p = pipeline();
    let m = &p.model;
    let gates: Vec<_> = m.plan.gates().collect();
    let shapes: Vec<_> = gates.iter().map(|g| (g.c, g.h, g.w)).collect();
    assert_eq!(
        shapes,
        vec![(64, 30, 40), (24, 120, 160)],
        "the package's gates"
    );
    let (maps, mask) = photo_mask(&p);
    let keep = mask.keep_ratio();
    assert!(
        keep > 0.0 && keep < 0.9,
        "the head keeps part of a portrait, kept {keep:.3}"
    );
    let (got, run) = sparse_frame(m, &maps.features, &maps.taps, &mask.kept);
    let (want, lists) = dense_masked_gated(m, &maps.features, &maps.taps, &mask.kept);
    let err = rel_err(&got, &want);
    assert!(err <= 1e-4, "relative error {err}");
    for (k, gate) in gates.iter().enumerate() {
        assert_eq!(run.sets[gate.out_level].coords, lists[k], "gate {k}'s set");
        let (kept, of) = (
            run.sets[gate.out_level].len(),
            run.sets[gate.in_level].len(),
        );
        assert!(
            kept > 0 && kept < of,
            "gate {k} narrows its level: {kept} of {of}"
        );
    }
}

/// The package without its gates, every token kept: the sparse suffix is
/// the dense network's.
#[test]
fn every_token_kept_without_the_gates_is_the_dense_network() {
    let dir = Scratch::dir("centerface", "gateless");
    std::fs::copy(
        Path::new(MODEL).join("manifest.json"),
        dir.join("manifest.json"),
    )
    .unwrap();
    let proto = without_gates(&Path::new(MODEL).join("model.onnx"));
    std::fs::write(
        dir.join("model.onnx"),
        prost::Message::encode_to_vec(&proto),
    )
    .unwrap();
    let p = Pipeline::new(
        ModelPackage::load(&*dir).expect("the package without its gate loads"),
        ersm::ersm::Device::Cpu,
    );
    let m = &p.model;
    assert_eq!(m.plan.gates().count(), 0);
    let (maps, _) = photo_mask(&p);
    let all: Vec<u32> = (0..(m.cut.h * m.cut.w) as u32).collect();
    let dense = p.dense_logits(&maps).unwrap();
    let err = rel_err(&sparse_with(m, &maps.features, &maps.taps, &all), &dense);
    assert!(
        err <= 1e-4,
        "every token kept vs dense: relative error {err}"
    );
}

/// The package with an original network as its dense baseline
/// (`dense_model`, as a package with a fine-tuned suffix ships): here the
/// original is the package's network without its energy layer and with the
/// scale head's first bias moved by 0.5.
fn with_original(name: &str, edit: impl FnOnce(&mut tract_onnx::pb::ModelProto)) -> Scratch {
    let dir = Scratch::dir("centerface", name);
    let model = Path::new(MODEL).join("model.onnx");
    std::fs::copy(&model, dir.join("model.onnx")).unwrap();
    let text = std::fs::read_to_string(Path::new(MODEL).join("manifest.json")).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    manifest["dense_model"] = "original.onnx".into();
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    let original = without_energy_layer(&model, |p| {
        let g = p.graph.as_mut().unwrap();
        let bias = g
            .initializer
            .iter_mut()
            .find(|t| t.name == "head.reg_conv.bias");
        shift_first_value(bias.expect("the scale head's bias"), 0.5);
        edit(p);
    });
    std::fs::write(
        dir.join("original.onnx"),
        prost::Message::encode_to_vec(&original),
    )
    .unwrap();
    dir
}

#[test]
fn an_original_network_reading_the_stride_4_map_is_the_dense_baseline() {
    let dir = with_original("original", |_| ());
    let p = Pipeline::new(ModelPackage::load(&*dir).unwrap(), ersm::ersm::Device::Cpu);
    let m = &p.model;
    assert!(m.baseline.is_some());
    let frame = images::load(Path::new(FACE)).unwrap();
    let maps = p.features(&p.preprocess(&frame).unwrap()).unwrap();
    let own = dense_suffix_with(m, &maps.features, &maps.taps);
    let original = p.dense_logits(&maps).unwrap();
    // The outputs are handed over in the package's order (heatmap, scale,
    // offset, landmarks): only the scale map's first channel moved, by 0.5.
    let (hw, n) = (m.cut.h * 2 * m.cut.w * 2, own.len());
    assert_eq!(original.len(), n);
    let moved: Vec<usize> = (0..n)
        .filter(|&i| (own[i] - original[i]).abs() > 1e-6)
        .collect();
    assert_eq!(moved.first(), Some(&hw), "the scale map's first value");
    assert_eq!(
        moved.last(),
        Some(&(2 * hw - 1)),
        "its first channel's last"
    );
    for &i in &moved {
        assert!(((original[i] - own[i]) - 0.5).abs() < 1e-4, "value {i}");
    }
    // Every dense figure of a frame is the original's.
    assert_eq!(p.run_dense(&frame).unwrap().logits, original);
    // At another input size the original's layers after the cut follow.
    let m = ModelPackage::load_sized(&*dir, Some((320, 256))).expect("loads at 320x256");
    let p = Pipeline::new(m, ersm::ersm::Device::Cpu);
    let maps = p.features(&p.preprocess(&frame).unwrap()).unwrap();
    let own = dense_suffix_with(&p.model, &maps.features, &maps.taps);
    let original = p.dense_logits(&maps).unwrap();
    assert_eq!((own.len(), original.len()), (15 * 64 * 80, 15 * 64 * 80));
    assert!((original[64 * 80] - own[64 * 80] - 0.5).abs() < 1e-4);

    // An original without one of the package's outputs is refused.
    let dir = with_original("original-outputs", |p| {
        p.graph
            .as_mut()
            .unwrap()
            .output
            .retain(|o| o.name != "landmarks");
    });
    let err = format!("{:#}", ModelPackage::load(&*dir).expect_err("refused"));
    for want in [
        "original.onnx",
        "outputs (heatmap, scale, offset)",
        "landmarks",
    ] {
        assert!(err.contains(want), "{err}");
    }
}

#[test]
fn finds_the_face_dense_finds() {
    let p = pipeline();
    let frame = images::load(Path::new(FACE)).unwrap();
    let read = |v: &[f32]| p.model.reader.read(v, frame.width, frame.height).unwrap();
    let dense = read(&p.run_dense(&frame).unwrap().logits);
    let ersm = read(&p.run_ersm(&frame).unwrap().logits);
    let (Answer::Faces(d), Answer::Faces(e)) = (&dense, &ersm) else {
        panic!("a detector answers with faces");
    };
    assert_eq!(d.len(), 1, "dense finds the astronaut's face: {d:?}");
    assert_eq!(e.len(), 1, "ERSM finds it too: {e:?}");
    assert!(d[0].iou(&e[0]) > 0.8, "{d:?} vs {e:?}");
    // In frame pixels: the face is in the upper middle of the 512×512 photo.
    let (cx, cy) = ((d[0].x1 + d[0].x2) / 2.0, (d[0].y1 + d[0].y2) / 2.0);
    assert!(
        (150.0..350.0).contains(&cx) && (50.0..250.0).contains(&cy),
        "{d:?}"
    );
}

/// On a stream (`with_tracking`, the manifest's `track` section) the
/// first frame holds nothing and runs the package's own gates (a refresh),
/// the frame after a face keeps every token around it at the energy layer
/// while its gate runs at the stream's offset (keeping less), the face is
/// still found, every `refresh`-th frame runs the package's gates again,
/// and a new stream forgets it all.
#[test]
fn a_stream_keeps_the_tokens_around_the_last_frames_face() {
    let plain = pipeline();
    let p = pipeline()
        .with_tracking()
        .expect("the face package has stream settings");
    let track = p.model.manifest.track.clone().unwrap();
    assert!(track.gate_offsets.contains_key("ersm.gate"), "{track:?}");
    assert!(track.refresh >= 2, "{track:?}");
    let frame = images::load(Path::new(FACE)).unwrap();
    let first = p.run_ersm(&frame).unwrap();
    let untracked = plain.run_ersm(&frame).unwrap();
    assert_eq!(first.mask.kept, untracked.mask.kept);
    assert_eq!(
        first.tokens, untracked.tokens,
        "a refresh: the package's gates"
    );
    let gate = p.model.plan.gates().next().unwrap().out_level;
    let (w, h) = (
        p.model.manifest.input.shape[3],
        p.model.manifest.input.shape[2],
    );
    let faces = p.model.reader.read(&first.logits, w, h).unwrap();
    assert_eq!(faces.faces().len(), 1, "{faces:?}");
    let held = ersm::track::held_tokens(
        faces.faces(),
        (w, h),
        (p.model.cut.w, p.model.cut.h),
        track.margin,
    );
    assert!(!held.is_empty());
    let second = p.run_ersm(&frame).unwrap();
    for i in &held {
        assert!(
            second.mask.kept.binary_search(i).is_ok(),
            "held token {i} dropped"
        );
    }
    assert!(
        second.tokens[gate] < first.tokens[gate],
        "the stream's gate keeps less, the face held: {} vs {}",
        second.tokens[gate],
        first.tokens[gate]
    );
    let found = p
        .model
        .reader
        .read(&second.logits, frame.width, frame.height)
        .unwrap();
    let dense = p
        .model
        .reader
        .read(
            &p.run_dense(&frame).unwrap().logits,
            frame.width,
            frame.height,
        )
        .unwrap();
    assert_eq!(found.faces().len(), 1);
    assert!(found.faces()[0].iou(&dense.faces()[0]) > 0.8);
    let gated: Vec<usize> = (2..=track.refresh)
        .map(|_| p.run_ersm(&frame).unwrap().tokens[gate])
        .collect();
    let n = gated.len();
    assert!(
        gated[n - 1] > gated[n - 2] && gated[n - 2] == second.tokens[gate],
        "frame {} refreshes: the gate's tokens over frames 3..: {gated:?}",
        track.refresh + 1
    );
    p.new_stream();
    assert_eq!(
        p.run_ersm(&frame).unwrap().tokens,
        first.tokens,
        "a new stream starts empty"
    );
    // A classifier has no stream settings.
    let classifier = Pipeline::new(
        ModelPackage::load("models/mobilenet_v2_ersm").unwrap(),
        ersm::ersm::Device::Cpu,
    );
    let err = format!("{:#}", classifier.with_tracking().err().unwrap());
    assert!(err.contains("track"), "{err}");
}

/// With `track.predict` a face is also held where its motion carries it:
/// after the astronaut's face moves 48 pixels right, the next frame's
/// stream holds (and the next frame's energy layer keeps) the tokens around
/// its box moved 48 pixels further, some of which its box and margin alone
/// would not hold.
#[test]
fn a_stream_with_prediction_holds_a_face_where_it_is_going() {
    let dir = Scratch::dir("centerface", "predict");
    std::fs::copy(Path::new(MODEL).join("model.onnx"), dir.join("model.onnx")).unwrap();
    let text = std::fs::read_to_string(Path::new(MODEL).join("manifest.json")).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["track"]["predict"] = serde_json::json!(true);
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    let p = Pipeline::new(
        ModelPackage::load(&*dir).expect("the package with prediction loads"),
        ersm::ersm::Device::Cpu,
    )
    .with_tracking()
    .unwrap();
    assert!(
        p.placement().contains("carried by their motion"),
        "{}",
        p.placement()
    );
    let a = images::load(Path::new(FACE)).unwrap();
    let shift = 48;
    let mut b = a.clone();
    for row in b.rgb.chunks_exact_mut(a.width * 3) {
        row.copy_within(..(a.width - shift) * 3, shift * 3);
        row[..shift * 3].fill(0);
    }
    let (w, h) = (
        p.model.manifest.input.shape[3],
        p.model.manifest.input.shape[2],
    );
    let faces = |r: &ersm::pipeline::ErsmResult| {
        p.model
            .reader
            .read(&r.logits, w, h)
            .unwrap()
            .faces()
            .to_vec()
    };
    let fa = faces(&p.run_ersm(&a).unwrap());
    let fb = faces(&p.run_ersm(&b).unwrap());
    assert_eq!((fa.len(), fb.len()), (1, 1), "{fa:?} {fb:?}");
    let moved = fb[0].x1 - fa[0].x1;
    assert!(
        (50.0..70.0).contains(&moved),
        "48 source pixels at the input: {moved}"
    );
    let carried = ersm::track::carried(&fb, &fa);
    let cut = (p.model.cut.w, p.model.cut.h);
    let margin = p.model.manifest.track.as_ref().unwrap().margin;
    let ahead = ersm::track::held_tokens(&carried, (w, h), cut, margin);
    let here = ersm::track::held_tokens(&fb, (w, h), cut, margin);
    assert!(ahead.iter().any(|i| here.binary_search(i).is_err()));
    let held = p.held();
    for i in ahead.iter().chain(&here) {
        assert!(held.binary_search(i).is_ok(), "token {i} not held");
    }
    let next = p.run_ersm(&b).unwrap();
    for i in &held {
        assert!(
            next.mask.kept.binary_search(i).is_ok(),
            "held token {i} dropped"
        );
    }
}

#[test]
fn run_reports_faces_and_anonymizes_them() {
    let dir = Scratch::dir("centerface", "anonymize");
    let jsonl = dir.join("faces.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_ersm"))
        .args(["run", "--model", MODEL, "--source", FACE, "--warmup", "0"])
        .args(["--anonymize", "solid", "--overlay"])
        .arg(dir.join("frames"))
        .arg("--jsonl")
        .arg(&jsonl)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("faces: recall 1.000 of 1 dense faces"),
        "{text}"
    );
    let rec: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&jsonl)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let faces = rec["faces"].as_array().expect("faces in the record");
    assert_eq!(faces.len(), 1, "{rec}");
    assert_eq!(rec["dense_faces"].as_array().unwrap().len(), 1, "{rec}");
    assert!(rec.get("top1").is_none(), "a detector has no top-1: {rec}");
    // The written frame is the photo with a black box over the face.
    let png = std::fs::read_dir(dir.join("frames"))
        .unwrap()
        .next()
        .expect("one frame written")
        .unwrap()
        .path();
    let img = image::open(&png).unwrap().to_rgb8();
    let orig = image::open(FACE).unwrap().to_rgb8();
    let b: Vec<f32> = faces[0]["bbox"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let (cx, cy) = (((b[0] + b[2]) / 2.0) as u32, ((b[1] + b[3]) / 2.0) as u32);
    assert_eq!(
        img.get_pixel(cx, cy).0,
        [0, 0, 0],
        "the face's centre is covered"
    );
    assert_eq!(
        img.get_pixel(5, 5),
        orig.get_pixel(5, 5),
        "a corner is untouched"
    );
    // A classifier has no faces to cover.
    let out = Command::new(env!("CARGO_BIN_EXE_ersm"))
        .args([
            "run",
            "--model",
            "models/tiny",
            "--source",
            FACE,
            "--anonymize",
            "blur",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a face detector"),
        "{err}"
    );
}

/// `--input-size`: the detector at another input size (its cut and levels
/// follow), still equal to its dense-masked reference and finding the face;
/// a classifier, or a size CenterFace cannot take, is refused.
#[test]
fn another_input_size() {
    let m = ModelPackage::load_sized(MODEL, Some((320, 256))).expect("loads at 320x256");
    assert_eq!((m.cut.h, m.cut.w), (32, 40));
    let p = Pipeline::new(m, ersm::ersm::Device::Cpu);
    let m = &p.model;
    let (maps, mask) = photo_mask(&p);
    let (got, run) = sparse_frame(m, &maps.features, &maps.taps, &mask.kept);
    let (want, lists) = dense_masked_gated(m, &maps.features, &maps.taps, &mask.kept);
    assert!(rel_err(&got, &want) <= 1e-4);
    let levels: Vec<_> = m.plan.gates().map(|g| (g.h, g.w)).collect();
    assert_eq!(levels, vec![(16, 20), (64, 80)], "the gates' levels follow");
    for (k, gate) in m.plan.gates().enumerate() {
        assert_eq!(run.sets[gate.out_level].coords, lists[k], "gate {k}'s set");
    }
    let frame = images::load(Path::new(FACE)).unwrap();
    let faces = m
        .reader
        .read(&p.run_dense(&frame).unwrap().logits, 512, 512)
        .unwrap();
    assert_eq!(faces.faces().len(), 1, "{faces:?}");
    for (dir, size, msg) in [
        (MODEL, (330, 256), "multiples of 32"),
        ("models/tiny", (320, 256), "crops a centred square"),
    ] {
        let err = format!(
            "{:#}",
            ModelPackage::load_sized(dir, Some(size)).unwrap_err()
        );
        assert!(err.contains(msg) && err.contains("--input-size"), "{err}");
    }
}

/// `run` on a video or a single photo takes the source's resolution
/// (rounded up to multiples of 32) as the detector's input unless
/// `--input-size` says otherwise; a photo folder keeps the package's size.
#[test]
fn run_takes_the_source_resolution_as_its_input() {
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ersm"))
            .args([
                "run",
                "--model",
                MODEL,
                "--max-frames",
                "1",
                "--warmup",
                "0",
            ])
            .args(["--compare", "none"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    };
    // The bundled clip is 768×576.
    let err = run(&[]);
    assert!(err.contains("input 768×576: the source's 768×576"), "{err}");
    let err = run(&["--input-size", "320x256"]);
    assert!(!err.contains("the source's"), "{err}");
    // The astronaut photo is 512×512; the bundled photos' folder mixes sizes.
    let err = run(&["--source", FACE]);
    assert!(err.contains("input 512×512: the source's 512×512"), "{err}");
    let err = run(&["--source", "models/images"]);
    assert!(!err.contains("the source's"), "{err}");
}
