//! The `ersm` binary as a user runs it.

mod common;

use common::Scratch;

use std::process::{Command, Output};

fn ersm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ersm"))
        .args(args)
        .output()
        .expect("ersm runs")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn tmp(name: &str) -> Scratch {
    Scratch::path("cli", name)
}

#[test]
fn help_explains_every_option() {
    let (out, _) = text(&ersm(&["--help"]));
    for word in ["bench", "inspect"] {
        assert!(out.contains(word), "--help lacks {word}: {out}");
    }
    let (out, _) = text(&ersm(&["bench", "--help"]));
    for opt in [
        "--model", "--images", "--frames", "--warmup", "--json", "--device",
    ] {
        assert!(out.contains(opt), "bench --help lacks {opt}: {out}");
    }
    let (out, _) = text(&ersm(&["inspect", "--help"]));
    for opt in ["--model", "--keep"] {
        assert!(out.contains(opt), "inspect --help lacks {opt}: {out}");
    }
}

#[test]
fn bench_prints_table_and_writes_json() {
    let json = tmp("bench.json");
    let o = ersm(&[
        "bench",
        "--frames",
        "4",
        "--warmup",
        "1",
        "--json",
        json.to_str().unwrap(),
        "--threads",
        "2",
        "--profile",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "bench failed: {err}");
    assert!(
        out.contains("threads 2"),
        "table lacks the thread count:\n{out}"
    );
    for row in [
        "where an ERSM frame's network time goes",
        "Conv1x1",
        "prefix by tract op",
    ] {
        assert!(out.contains(row), "--profile lacks {row}:\n{out}");
    }
    for row in [
        "Pre-Process",
        "Prefix",
        "ERSM",
        "Suffix",
        "Total",
        "FPS",
        "keep ratio",
        "ideal",
        "agreement",
    ] {
        assert!(out.contains(row), "table lacks {row}:\n{out}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in [
        "model",
        "frames",
        "keep_ratio",
        "ideal_speedup",
        "speedup",
        "suffix_speedup",
        "agreement",
        "stages",
        "threads",
    ] {
        assert!(v.get(key).is_some(), "JSON lacks {key}: {v}");
    }
    assert_eq!(v["frames"], 4);
    assert_eq!(v["threads"], 2);
    // The shipped head, at each of the 28×28 tokens: two depthwise-separable
    // convs on 32 channels (3×3 depthwise, then 1×1), then 16 hidden units on
    // 32 channels and 16 weights.
    assert_eq!(
        v["energy_macs"],
        (2 * (9 * 32 + 32 * 32) + 16 * 32 + 16) * 28 * 28
    );
    let keep = v["keep_ratio"].as_f64().unwrap();
    assert!(keep > 0.0 && keep <= 1.0);
    for mode in ["ersm", "dense"] {
        for stage in ["preprocess", "prefix", "suffix", "total", "network"] {
            let s = &v["stages"][mode][stage];
            assert!(
                s["p50_ms"].as_f64().unwrap() >= 0.0
                    && s["p95_ms"].as_f64().unwrap() >= s["p50_ms"].as_f64().unwrap(),
                "{mode}/{stage}: {s}"
            );
        }
    }
}

#[test]
fn inspect_shows_cut_ops_and_flops() {
    let o = ersm(&["inspect", "--keep", "0.25"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    for part in [
        "cut",
        "energy node 'ersm'",
        "prefix (",
        "suffix (",
        "DepthwiseConv",
        "dropped tokens hold the package's fill vectors (34 tensors; zero elsewhere)",
        "GFLOPs dense",
        "at keep 0.25",
    ] {
        assert!(out.contains(part), "inspect lacks {part}:\n{out}");
    }
}

#[test]
fn inspect_says_when_dropped_tokens_hold_fill_vectors() {
    use prost::Message;
    // The tiny package with a fill on one of its token maps (b4.relu6, 48 channels).
    let dir = tmp("fills");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy("models/tiny/manifest.json", dir.join("manifest.json")).unwrap();
    let proto = common::with_fills_attr(
        ersm::model::read_onnx(std::path::Path::new("models/tiny/model.onnx")).unwrap(),
        &[("b4.relu6".into(), vec![0.5; 48])],
    );
    std::fs::write(dir.join("model.onnx"), proto.encode_to_vec()).unwrap();
    let o = ersm(&["inspect", "--model", dir.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("dropped tokens hold the package's fill vectors (1 tensor; zero elsewhere)"),
        "inspect does not say what dropped tokens hold:\n{out}"
    );
}

#[test]
fn bad_model_path_is_a_clear_error() {
    let o = ersm(&["bench", "--model", "no/such/model", "--frames", "1"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("no/such/model") && err.contains("not found"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn device_cpu_runs_and_cuda_without_gpu_is_a_clear_error() {
    let o = ersm(&["bench", "--device", "cpu", "--frames", "1", "--warmup", "0"]);
    assert!(o.status.success(), "{}", text(&o).1);
    if !ersm::gpu::driver_present() {
        let o = ersm(&["bench", "--device", "cuda", "--frames", "1"]);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            err.contains("--device cuda") && err.contains("libcuda"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        let o = ersm(&[
            "bench", "--device", "auto", "--frames", "1", "--warmup", "0",
        ]);
        let (_, err) = text(&o);
        assert!(o.status.success(), "{err}");
        assert!(
            err.contains("energy layer on CPU"),
            "auto should say it fell back: {err}"
        );
    }
}

#[test]
fn bad_image_is_named_and_the_rest_still_used() {
    let dir = tmp("images");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("broken.png"), b"not a png").unwrap();
    std::fs::copy("models/images/coffee.png", dir.join("coffee.png")).unwrap();
    let o = ersm(&[
        "bench",
        "--images",
        dir.to_str().unwrap(),
        "--frames",
        "2",
        "--warmup",
        "0",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("broken.png"),
        "warning should name the bad file: {err}"
    );
    assert!(out.contains("Total"));
}

#[test]
fn numeric_options_are_bounded_with_clear_errors() {
    for args in [
        &["run", "--stall-timeout", "inf"][..],
        &["run", "--stall-timeout", "1e30"],
        &["run", "--stall-timeout", "NaN"],
        &["run", "--queue", "0"],
        &["run", "--input-width", "100000"],
        &["bench", "--frames", "0"],
        &["bench", "--threads", "0"],
        &["run", "--threads", "5000"],
        &["eval", "deletion", "--step", "1e-9"],
        &["eval", "occlusion", "--grid", "100000"],
        &["eval", "occlusion", "--sizes", "0.2,7"],
        &["inspect", "--keep", "0"],
    ] {
        let o = ersm(args);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("must be between") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    let (out, _) = text(&ersm(&["run", "--help"]));
    assert!(
        out.contains("[0.1–86400]"),
        "the range is in the help: {out}"
    );
}

#[test]
fn bench_output_paths_are_checked_before_the_work() {
    for flag in ["--json", "--plot"] {
        let t = std::time::Instant::now();
        let o = ersm(&[
            "bench",
            "--frames",
            "1000",
            flag,
            "/nonexistent-dir/out.file",
        ]);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{flag}: {err}");
        assert!(
            err.contains(flag)
                && err.contains("/nonexistent-dir/out.file")
                && err.contains("cannot write"),
            "{flag}: {err}"
        );
        assert!(
            !err.contains("Os {") && !err.contains("BackendError"),
            "{err}"
        );
        // 1000 frames would take many seconds: the error came first.
        assert!(
            t.elapsed().as_secs() < 20,
            "{flag}: failed only after the work"
        );
    }
    // Two outputs in one file, however it is spelled, are refused.
    let dir = tmp("same-output");
    let a = dir.join("out.json");
    let b = dir.join("sub/../out.json");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let (a, b) = (a.to_string_lossy(), b.to_string_lossy());
    let o = ersm(&["bench", "--frames", "1000", "--json", &a, "--dump", &b]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--json and --dump name the same file"),
        "{err}"
    );
}

/// A reader that goes away ends ersm quietly; a full disk is an error that
/// says so; neither is a panic.
#[test]
fn closed_or_full_stdout() {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ersm"))
        .args(["inspect", "--model", "models/tiny"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader closes before ersm writes (the model loads first).
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "closed pipe: {:?} {err}", out.status);
    assert!(!err.contains("panic"), "{err}");
    if std::path::Path::new("/dev/full").exists() {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_ersm"))
            .args(["inspect", "--model", "models/tiny"])
            .stdout(full)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a full disk is an error");
        assert!(
            err.contains("writing to standard output") && !err.contains("panic"),
            "{err}"
        );
    }
}

/// More threads than the process may use are capped, with a warning.
#[test]
fn threads_above_the_cores_are_capped() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let o = ersm(&[
        "bench",
        "--model",
        "models/tiny",
        "--frames",
        "1",
        "--threads",
        "1000",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("--threads 1000") && err.contains("core(s)"),
        "{err}"
    );
    assert!(out.contains(&format!("threads {cores}")), "{out}");
}
