//! Deterministic, bounded fuzzing of everything that parses outside input: the
//! manifest, the ONNX loader and cut, the MP4 demuxer, the MJPEG and YUYV
//! converters and the raw stdin reader. Each case must give a result or an
//! error, never a panic, a hang or a huge allocation. Seeds are fixed;
//! `ERSM_FUZZ_ITERS` multiplies the iterations (default 1).

mod common;

use common::{Rng, Scratch};
use ersm::model::{read_onnx, Manifest};
use ersm::package::ModelPackage;
use ersm::source::convert::{mjpeg_to_rgb, yuyv_to_rgb};
use ersm::source::mp4::Mp4H264;
use ersm::source::raw::{RawFrames, RawRead};
use std::path::Path;

fn iters(base: usize) -> usize {
    let k: usize = std::env::var("ERSM_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    base * k.max(1)
}

fn scratch(name: &str) -> Scratch {
    Scratch::dir("fuzz", name)
}

/// `bytes` with a few random bytes flipped, or cut short, or both.
fn mutate(rng: &mut Rng, bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for _ in 0..rng.int(1, 8) {
        let i = rng.int(0, b.len() - 1);
        b[i] = match rng.int(0, 3) {
            0 => b[i] ^ (1 << rng.int(0, 7)),
            1 => 0xff,
            2 => 0,
            _ => rng.next_u64() as u8,
        };
    }
    if rng.int(0, 3) == 0 {
        b.truncate(rng.int(0, b.len()));
    }
    b
}

#[test]
fn manifest_parser() {
    let text = std::fs::read_to_string("models/tiny/manifest.json").unwrap();
    let dir = scratch("manifest");
    let path = dir.join("manifest.json");
    let extremes = [
        "0",
        "-1",
        "1e39",
        "-1e39",
        "1e-45",
        "4294967296",
        "18446744073709551615",
        "null",
        "\"x\"",
        "[]",
        "1.5",
    ];
    let mut rng = Rng::new(11);
    let numbers: Vec<(usize, usize)> = {
        // Spans of every number in the text, to replace with extremes.
        let b = text.as_bytes();
        let mut v = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i].is_ascii_digit() || b[i] == b'-' {
                let s = i;
                while i < b.len() && (b[i].is_ascii_digit() || b"-.eE+".contains(&b[i])) {
                    i += 1;
                }
                v.push((s, i));
            } else {
                i += 1;
            }
        }
        v
    };
    for _ in 0..iters(300) {
        let case = if rng.coin() {
            let (s, e) = numbers[rng.int(0, numbers.len() - 1)];
            let x = extremes[rng.int(0, extremes.len() - 1)];
            format!("{}{x}{}", &text[..s], &text[e..]).into_bytes()
        } else {
            mutate(&mut rng, text.as_bytes())
        };
        std::fs::write(&path, &case).unwrap();
        // Either a manifest that passed every check, or an error naming the file.
        if let Err(e) = Manifest::read(&path) {
            assert!(format!("{e:#}").contains("manifest"), "{e:#}");
        }
    }
}

#[test]
fn onnx_loader_and_cut() {
    let bytes = std::fs::read("models/tiny/model.onnx").unwrap();
    let dir = scratch("onnx");
    std::fs::copy("models/tiny/manifest.json", dir.join("manifest.json")).unwrap();
    let mut rng = Rng::new(12);
    let (mut loaded, mut refused) = (0, 0);
    for _ in 0..iters(60) {
        std::fs::write(dir.join("model.onnx"), mutate(&mut rng, &bytes)).unwrap();
        match ModelPackage::load(&dir) {
            Ok(_) => loaded += 1,
            Err(e) => {
                refused += 1;
                assert!(format!("{e:#}").contains("model"), "{e:#}");
            }
        }
    }
    assert!(refused > 0, "no mutation was refused ({loaded} loaded)");
    // And the decoded graph itself, mutated field by field.
    let proto = read_onnx(Path::new("models/tiny/model.onnx")).unwrap();
    for k in 0..iters(40) {
        let mut p = proto.clone();
        let g = p.graph.as_mut().unwrap();
        let mut r = Rng::new(100 + k as u64);
        let n = r.int(0, g.node.len() - 1);
        match r.int(0, 4) {
            0 => g.node[n].input.clear(),
            1 => g.node[n].op_type = "Nonsense".into(),
            2 => {
                if let Some(a) = g.node[n].attribute.first_mut() {
                    a.ints = vec![-1, 1 << 40];
                    a.i = -7;
                    a.f = f32::NAN;
                }
            }
            3 => {
                let t = r.int(0, g.initializer.len() - 1);
                g.initializer[t].dims = vec![1 << 20, 1 << 20];
            }
            _ => {
                let m = r.int(0, g.node.len() - 1);
                g.node.swap(n, m)
            }
        }
        let _ = ModelPackage::from_proto(
            p,
            Manifest::read(Path::new("models/tiny/manifest.json")).unwrap(),
            Path::new("fuzzed.onnx"),
        );
    }
}

/// Offsets of every box of `kind` in `b` (at its size field).
fn boxes(b: &[u8], kind: &[u8; 4]) -> Vec<usize> {
    b.windows(4)
        .enumerate()
        .filter(|(_, w)| w == kind)
        .map(|(i, _)| i.saturating_sub(4))
        .collect()
}

#[test]
fn mp4_demuxer() {
    let bytes = std::fs::read("models/streams/vtest.mp4").unwrap();
    let dir = scratch("mp4");
    let path = dir.join("clip.mp4");
    let mut rng = Rng::new(13);
    let tables: Vec<usize> = [
        b"stsz", b"stco", b"stsc", b"co64", b"moov", b"trak", b"avcC",
    ]
    .iter()
    .flat_map(|k| boxes(&bytes, k))
    .collect();
    let mut sample = Vec::new();
    for _ in 0..iters(120) {
        let mut b = if rng.coin() {
            mutate(&mut rng, &bytes)
        } else {
            bytes.clone()
        };
        // Box sizes and table counts out of range.
        if !tables.is_empty() && rng.coin() {
            let at = tables[rng.int(0, tables.len() - 1)] + 4 * rng.int(0, 3);
            let v: u32 = match rng.int(0, 3) {
                0 => u32::MAX,
                1 => 0,
                2 => 1 << 31,
                _ => rng.next_u64() as u32,
            };
            if at + 4 <= b.len() {
                b[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
        }
        std::fs::write(&path, &b).unwrap();
        if let Ok(m) = Mp4H264::open(&path) {
            let _ = m.parameter_sets_annexb();
            for i in 0..m.len().min(5) {
                let _ = m.sample_annexb(i, &mut sample);
            }
        }
    }
}

#[test]
fn mjpeg_and_yuyv_converters() {
    let jpeg = std::fs::read("tests/data/chelsea_160x120.mjpeg").unwrap();
    let yuyv = std::fs::read("tests/data/chelsea_160x120.yuyv").unwrap();
    let mut rng = Rng::new(14);
    for _ in 0..iters(150) {
        let _ = mjpeg_to_rgb(&mutate(&mut rng, &jpeg));
        let b = mutate(&mut rng, &yuyv);
        let (w, h) = (rng.int(0, 400), rng.int(0, 300));
        let stride = if rng.coin() { w * 2 } else { rng.int(0, 1000) };
        let _ = yuyv_to_rgb(&b, w, h, stride);
    }
    // Sizes that overflow.
    let _ = yuyv_to_rgb(&yuyv, usize::MAX / 2, 3, usize::MAX / 2);
    let _ = yuyv_to_rgb(&yuyv, 1 << 40, 1 << 40, 1 << 41);
}

#[test]
fn raw_reader() {
    let mut rng = Rng::new(15);
    for _ in 0..iters(200) {
        let (w, h) = (rng.int(1, 64), rng.int(1, 64));
        let len = rng.int(0, 4 * w * h * 3);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let mut frames = RawFrames::new(std::io::Cursor::new(bytes), "fuzz".into(), w, h);
        let mut n = 0;
        loop {
            match frames.read() {
                Ok(RawRead::Frame(f)) => {
                    assert_eq!(f.rgb.len(), w * h * 3);
                    n += 1;
                }
                Ok(_) | Err(_) => break,
            }
            assert!(n <= 4, "more frames than bytes");
        }
    }
}
