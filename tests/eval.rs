//! Evaluation tools on the small model and the committed photos: structure
//! and invariants, not scores.

mod common;

use common::Scratch;
use ersm::ersm::Device;
use ersm::eval::deletion::{self, kept_after, order, steps, Ranking};
use ersm::eval::{analyse_inputs, load_inputs, sparsity, Analysed};
use ersm::logits::top1;
use ersm::package::ModelPackage;
use ersm::pipeline::Pipeline;
use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn pipeline() -> Pipeline {
    Pipeline::new(
        ModelPackage::load(root().join("models/tiny")).unwrap(),
        Device::Cpu,
    )
}

fn analysed(p: &Pipeline) -> Vec<Analysed> {
    let (analysed, failed) = analyse_inputs(p, &[root().join("models/images")], 1).unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    analysed
}

fn tmp(name: &str) -> Scratch {
    Scratch::path("eval", name)
}

#[test]
fn deletion_steps_remove_more_tokens_each_time() {
    let p = pipeline();
    let images = analysed(&p);
    let c = p.model.cut.c;
    let fr = steps(0.1);
    assert_eq!(fr.len(), 10);
    assert_eq!(fr[0], 0.0);
    for a in &images {
        let n = a.mask.energies.len();
        for ranking in [Ranking::Energy, Ranking::Magnitude, Ranking::Random] {
            let ord = order(a, c, ranking, 7);
            let mut sorted = ord.clone();
            sorted.sort_unstable();
            assert_eq!(
                sorted,
                (0..n as u32).collect::<Vec<_>>(),
                "not a permutation"
            );
            let mut prev: Option<Vec<u32>> = None;
            for &f in &fr {
                let kept = kept_after(&ord, f);
                assert!(!kept.is_empty());
                assert!(kept.windows(2).all(|w| w[0] < w[1]));
                if let Some(prev) = &prev {
                    assert!(kept.len() < prev.len(), "{ranking:?} at {f}");
                    assert!(kept.iter().all(|t| prev.binary_search(t).is_ok()));
                }
                prev = Some(kept);
            }
        }
        // Energy order: highest energy first.
        let ord = order(a, c, Ranking::Energy, 0);
        let e = &a.mask.energies;
        assert!(ord.windows(2).all(|w| e[w[0] as usize] >= e[w[1] as usize]));
    }
}

#[test]
fn keeping_every_token_gives_the_dense_prediction() {
    let p = pipeline();
    let images = analysed(&p);
    for a in &images {
        let n = a.mask.energies.len() as u32;
        let logits = a.logits_with(&p, &(0..n).collect::<Vec<_>>()).unwrap();
        assert_eq!(top1(&logits), top1(&a.dense_logits), "{}", a.name);
        let err = logits
            .iter()
            .zip(&a.dense_logits)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 1e-3, "{}: max |Δ| {err}", a.name);
    }
    let r = deletion::run(&p, &images, 0.25, 2).unwrap();
    for c in &r.curves {
        assert_eq!(c.points[0].deleted, 0.0);
        assert_eq!(c.points[0].agreement, 1.0, "{:?}", c.ranking);
        assert!(c.agreement_area >= 0.0 && c.agreement_area <= 1.0);
    }
}

#[test]
fn results_are_deterministic_for_a_seed() {
    let p = pipeline();
    let images = analysed(&p);
    let c = p.model.cut.c;
    assert_eq!(
        order(&images[0], c, Ranking::Random, 3),
        order(&images[0], c, Ranking::Random, 3)
    );
    assert_ne!(
        order(&images[0], c, Ranking::Random, 3),
        order(&images[0], c, Ranking::Random, 4)
    );
    let a = serde_json::to_string(&deletion::run(&p, &images, 0.2, 2).unwrap()).unwrap();
    let b = serde_json::to_string(&deletion::run(&p, &images, 0.2, 2).unwrap()).unwrap();
    assert_eq!(a, b);
    let s = sparsity::of(&p, &images).unwrap();
    assert_eq!(s.images.len(), 4);
    assert_eq!(s.histogram.iter().sum::<usize>(), 4);
    assert!(s.min <= s.mean && s.mean <= s.max);
    // No fallback: the compute is the sparse suffix's alone, never above dense.
    assert!(s.fallback_rate.is_none());
    assert!((0.0..=1.0).contains(&s.agreement));
    assert!(s
        .images
        .iter()
        .all(|k| !k.fell_back && k.compute > 0.0 && k.compute <= 1.0));
    // Agreement on the images the dense network is sure of counts exactly those.
    let sure: Vec<_> = s
        .images
        .iter()
        .filter(|k| k.dense_margin >= sparsity::SURE_MARGIN)
        .collect();
    assert!(s
        .images
        .iter()
        .all(|k| (0.0..=1.0).contains(&k.dense_margin)));
    assert_eq!(s.sure_images, sure.len());
    match s.sure_agreement {
        Some(a) => {
            let want = sure.iter().filter(|k| k.agrees).count() as f64 / sure.len() as f64;
            assert!((a - want).abs() < 1e-12);
        }
        None => assert!(sure.is_empty()),
    }
}

#[test]
fn a_bad_image_is_named_and_the_rest_are_evaluated() {
    let dir = tmp("folder");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["chelsea.png", "coffee.png"] {
        std::fs::copy(root().join("models/images").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let out = tmp("out");
    let o = Command::new(env!("CARGO_BIN_EXE_ersm"))
        .args(["eval", "sparsity", "--model"])
        .arg(root().join("models/tiny"))
        .arg("--images")
        .arg(&dir)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stdout.contains("broken.png") && stderr.contains("broken.png"),
        "{stdout}\n{stderr}"
    );
    let csv = std::fs::read_to_string(out.join("sparsity.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    let svg = std::fs::read_to_string(out.join("sparsity.svg")).unwrap();
    assert!(svg.contains("<svg"));
    // Deletion on the same folder writes its CSV, JSON and plot too.
    let o = Command::new(env!("CARGO_BIN_EXE_ersm"))
        .args([
            "eval", "deletion", "--step", "0.25", "--seeds", "1", "--model",
        ])
        .arg(root().join("models/tiny"))
        .arg("--images")
        .arg(&dir)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let csv = std::fs::read_to_string(out.join("deletion.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3 * 4, "{csv}");
    for f in ["deletion.json", "deletion.svg"] {
        assert!(out.join(f).exists(), "{f}");
    }
}

#[test]
fn videos_give_every_nth_frame_beside_photos() {
    let clip = root().join("models/streams/vtest.mp4");
    let photo = root().join("models/images/coffee.png");
    let (frames, failed) = load_inputs(&[clip.clone(), photo], 60).unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    let names: Vec<&str> = frames.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        ["vtest.mp4#1", "vtest.mp4#61", "vtest.mp4#121", "coffee.png"]
    );
    // Every frame of a video is a different picture, decoded whole.
    assert_eq!(frames[0].rgb.len(), frames[0].width * frames[0].height * 3);
    assert_ne!(frames[0].rgb, frames[1].rgb);
    assert!(load_inputs(std::slice::from_ref(&clip), 0).is_err());
    // A file that is no video is refused, named, before anything runs.
    let junk = tmp("junk.mp4");
    std::fs::write(&junk, b"not a video at all").unwrap();
    let err = format!(
        "{:#}",
        load_inputs(&[clip, junk.to_path_buf()], 60).unwrap_err()
    );
    assert!(err.contains("junk.mp4"), "{err}");
    // The command line takes a clip beside a folder, with --every.
    let out = tmp("video-out");
    let o = Command::new(env!("CARGO_BIN_EXE_ersm"))
        .args(["eval", "sparsity", "--every", "75", "--model"])
        .arg(root().join("models/tiny"))
        .arg("--images")
        .arg(root().join("models/streams/vtest.mp4"))
        .arg("--images")
        .arg(root().join("models/images"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let csv = std::fs::read_to_string(out.join("sparsity.csv")).unwrap();
    let rows: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(rows.len(), 2 + 4, "{csv}");
    assert_eq!(&rows[..2], ["vtest.mp4#1", "vtest.mp4#76"], "{csv}");
}

#[test]
fn mask_and_bench_plot_write_their_files() {
    let png = tmp("mask.png");
    let o = Command::new(env!("CARGO_BIN_EXE_ersm"))
        .args(["mask", "--model"])
        .arg(root().join("models/tiny"))
        .arg(root().join("models/images/coffee.png"))
        .arg("--out")
        .arg(&png)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&png).unwrap();
    let src = image::open(root().join("models/images/coffee.png")).unwrap();
    assert_eq!((img.width(), img.height()), (src.width(), src.height()));
    let o = Command::new(env!("CARGO_BIN_EXE_ersm"))
        .args(["mask", "--out", "/tmp/x.png"])
        .arg(root().join("models/images/missing.png"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.png"));
    let svg = tmp("bench.svg");
    let o = Command::new(env!("CARGO_BIN_EXE_ersm"))
        .args(["bench", "--frames", "4", "--warmup", "0", "--model"])
        .arg(root().join("models/tiny"))
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("ideal ERSM") && text.contains("dense"));
}

#[test]
fn occlusion_reports_every_condition_deterministically() {
    use ersm::eval::occlusion;
    let p = pipeline();
    let dir = tmp("occl");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["chelsea.png", "coffee.png"] {
        std::fs::copy(root().join("models/images").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("zz_truncated.jpg"), b"\xff\xd8\xff").unwrap();
    let (frames, failed) = load_inputs(&[dir.to_path_buf()], 1).unwrap();
    let r = occlusion::run(&p, &frames, &[0.25], 2).unwrap();
    assert_eq!(failed.len(), 1);
    assert!(failed[0].contains("zz_truncated.jpg"), "{failed:?}");
    assert_eq!(r.images, 2);
    assert_eq!(r.conditions.len(), 3);
    for c in &r.conditions {
        assert_eq!(c.cases, 2 * 2 * 2);
        for v in [
            c.ersm_flip_rate,
            c.dense_flip_rate,
            c.occluder_dropped,
            c.all_dropped,
        ] {
            assert!((0.0..=1.0).contains(&v), "{c:?}");
        }
        assert!(c.ersm_kl >= -1e-9 && c.dense_kl >= -1e-9, "{c:?}");
    }
    let again = occlusion::run(&p, &frames, &[0.25], 2).unwrap();
    assert_eq!(
        serde_json::to_string(&r).unwrap(),
        serde_json::to_string(&again).unwrap()
    );
    assert_eq!(r.csv().lines().count(), 4);
    assert!(occlusion::run(&p, &frames, &[1.5], 2).is_err());
}
