//! Frame sources: camera pixel formats on committed sample buffers, the
//! bundled clip against ffmpeg's decode, truncated files, URIs, the queue.

mod common;

use common::{have_ffmpeg, Scratch};
use ersm::capture::{End, Next, Policy, Queue};
use ersm::source::convert::{mjpeg_to_rgb, yuyv_to_rgb};
use ersm::source::video::Mp4Source;
use ersm::source::{Frame, Source, Uri};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn clip() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/streams/vtest.mp4")
}

fn png(path: &Path) -> (Vec<u8>, usize, usize) {
    let img = image::open(path).unwrap().to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    (img.into_raw(), w, h)
}

/// (mean, max) absolute difference of two equal-length byte buffers.
fn diff(a: &[u8], b: &[u8]) -> (f64, u8) {
    assert_eq!(a.len(), b.len());
    let mut sum = 0u64;
    let mut max = 0u8;
    for (&x, &y) in a.iter().zip(b) {
        let d = x.abs_diff(y);
        sum += d as u64;
        max = max.max(d);
    }
    (sum as f64 / a.len() as f64, max)
}

#[test]
fn yuyv_matches_ffmpeg_conversion() {
    let yuyv = std::fs::read(data("chelsea_160x120.yuyv")).unwrap();
    let rgb = yuyv_to_rgb(&yuyv, 160, 120, 320).unwrap();
    let (want, w, h) = png(&data("chelsea_160x120_yuyv_ffmpeg.png"));
    assert_eq!((w, h), (160, 120));
    let (mean, max) = diff(&rgb, &want);
    println!("YUYV vs ffmpeg: mean {mean:.3}, max {max}");
    assert!(
        mean < 2.0 && max <= 4,
        "YUYV vs ffmpeg: mean {mean:.3}, max {max}"
    );
    // A padded stride (as some drivers use) gives the same picture.
    let mut padded = vec![0u8; 336 * 120];
    for y in 0..120 {
        padded[y * 336..y * 336 + 320].copy_from_slice(&yuyv[y * 320..(y + 1) * 320]);
    }
    assert_eq!(yuyv_to_rgb(&padded, 160, 120, 336).unwrap(), rgb);
    // Bad buffers are errors, not panics.
    assert!(yuyv_to_rgb(&yuyv[..1000], 160, 120, 320).is_err());
    assert!(yuyv_to_rgb(&yuyv, 159, 120, 320).is_err());
}

#[test]
fn mjpeg_without_huffman_tables_decodes_like_with_them() {
    let full = std::fs::read(data("chelsea_160x120.mjpeg")).unwrap();
    let stripped = std::fs::read(data("chelsea_160x120_nodht.mjpeg")).unwrap();
    assert!(stripped.len() < full.len());
    let (a, w, h) = mjpeg_to_rgb(&full).unwrap();
    let (b, w2, h2) = mjpeg_to_rgb(&stripped).unwrap();
    assert_eq!((w, h, w2, h2), (160, 120, 160, 120));
    // The standard tables put back are the ones the encoder used.
    assert_eq!(a, b);
    let (want, _, _) = png(&data("chelsea_160x120_mjpeg_ffmpeg.png"));
    let (mean, max) = diff(&b, &want);
    println!("MJPEG vs ffmpeg: mean {mean:.3}, max {max}");
    assert!(
        mean < 1.5 && max <= 16,
        "MJPEG vs ffmpeg: mean {mean:.3}, max {max}"
    );
    assert!(mjpeg_to_rgb(b"not a jpeg").is_err());
    assert!(mjpeg_to_rgb(&stripped[..stripped.len() / 3]).is_err());
}

#[test]
fn bundled_clip_matches_ffmpeg_decode() {
    let mut src = Mp4Source::open(&clip()).unwrap();
    assert_eq!(src.frame_count(), Some(150));
    assert!((src.fps() - 10.0).abs() < 1e-6, "fps {}", src.fps());
    let mut ours: Vec<Frame> = Vec::new();
    while let Some(f) = src.next_frame().unwrap() {
        ours.push(f);
    }
    assert_eq!(ours.len(), 150);
    assert!(ours.iter().all(|f| (f.width, f.height) == (768, 576)));
    if !have_ffmpeg() {
        return;
    }
    let n = 20;
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-i"])
        .arg(clip())
        .args([
            "-frames:v",
            &n.to_string(),
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let size = 768 * 576 * 3;
    assert_eq!(out.stdout.len(), n * size);
    let (mut worst_mean, mut worst_max) = (0.0f64, 0u8);
    for (i, (f, want)) in ours.iter().zip(out.stdout.chunks(size)).enumerate() {
        let (mean, max) = diff(&f.rgb, want);
        (worst_mean, worst_max) = (worst_mean.max(mean), worst_max.max(max));
        // Same H.264 pictures; only the YUV → RGB conversion and chroma
        // upsampling differ between openh264's and swscale's.
        assert!(
            mean < 1.5 && max <= 8,
            "frame {i}: mean {mean:.3}, max {max}"
        );
    }
    println!("clip vs ffmpeg over {n} frames: worst mean {worst_mean:.3}, worst max {worst_max}");
}

/// MP4s the in-process decoder cannot play (B-frames: ffmpeg's and most
/// cameras' default; HEVC) are decoded by ffmpeg: every frame, in display
/// order, equal to ffmpeg's own decode.
#[test]
fn b_frames_and_hevc_play_through_ffmpeg_in_display_order() {
    if !have_ffmpeg() {
        return;
    }
    let dir = Scratch::path("sources", "reordered");
    std::fs::create_dir_all(&dir).unwrap();
    let src = "nullsrc=s=112x112:r=10,geq=lum='clip(X+Y/2+N*9,0,255)':cb=128:cr=128,format=yuv420p";
    for (name, codec) in [
        (
            "bf.mp4",
            &[
                "-c:v",
                "libx264",
                "-bf",
                "3",
                "-x264-params",
                "b-adapt=0:scenecut=0",
            ][..],
        ),
        (
            "hevc.mp4",
            &[
                "-c:v",
                "libx265",
                "-tag:v",
                "hvc1",
                "-x265-params",
                "log-level=none",
            ][..],
        ),
    ] {
        let path = dir.join(name);
        let made = Command::new("ffmpeg")
            .args([
                "-v",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                src,
                "-frames:v",
                "16",
            ])
            .args(codec)
            .arg(&path)
            .status()
            .unwrap();
        if !made.success() {
            println!("SKIPPED {name}: this ffmpeg cannot encode it");
            continue;
        }
        let mut source = ersm::source::open(
            &Uri::File(path.clone()),
            &ersm::source::SourceOptions::default(),
        )
        .unwrap();
        assert!(
            source.describe().contains("ffmpeg"),
            "{}",
            source.describe()
        );
        let mut ours = Vec::new();
        while let Some(f) = source.next_frame().unwrap() {
            ours.push(f.rgb);
        }
        let want = Command::new("ffmpeg")
            .args(["-v", "error", "-i"])
            .arg(&path)
            .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
            .output()
            .unwrap();
        let frames: Vec<&[u8]> = want.stdout.chunks(112 * 112 * 3).collect();
        assert_eq!(ours.len(), 16, "{name}");
        assert_eq!(frames.len(), 16, "{name}");
        for (i, (a, b)) in ours.iter().zip(&frames).enumerate() {
            assert!(
                a.as_slice() == *b,
                "{name}: frame {i} differs from ffmpeg's"
            );
        }
        // Display order: the test pattern brightens frame by frame.
        let mean = |f: &[u8]| f.iter().map(|&v| v as f64).sum::<f64>() / f.len() as f64;
        assert!(
            ours.windows(2).all(|w| mean(&w[1]) >= mean(&w[0])),
            "{name}"
        );
    }
}

#[test]
fn truncated_mp4_gives_frames_then_a_clear_error() {
    let bytes = std::fs::read(clip()).unwrap();
    let path = Scratch::path("sources", "trunc.mp4");
    std::fs::write(&path, &bytes[..bytes.len() * 2 / 5]).unwrap();
    let mut src = Mp4Source::open(&path).unwrap();
    let mut n = 0;
    let err = loop {
        match src.next_frame() {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("truncated file ended cleanly after {n} frames"),
            Err(e) => break format!("{e:#}"),
        }
    };
    assert!(n > 10 && n < 150, "{n} frames before the cut");
    assert!(
        err.contains("truncated") && err.contains("trunc.mp4"),
        "{err}"
    );
    // Cut before the index: refused at open, naming the file.
    std::fs::write(&path, &bytes[..200]).unwrap();
    let err = format!("{:#}", Mp4Source::open(&path).err().unwrap());
    assert!(err.contains("trunc.mp4") && err.contains("moov"), "{err}");
    std::fs::write(&path, b"not a video at all").unwrap();
    let err = format!("{:#}", Mp4Source::open(&path).err().unwrap());
    assert!(err.contains("not an MP4"), "{err}");
}

#[test]
fn uris_normalise_like_jetson_inference() {
    let cases: &[(&str, Uri)] = &[
        ("v4l2:///dev/video1", Uri::V4l2("/dev/video1".into())),
        ("/dev/video0", Uri::V4l2("/dev/video0".into())),
        ("csi://0", Uri::Csi(0)),
        ("1", Uri::Csi(1)),
        (
            "rtsp://cam.local:8554/live",
            Uri::Url("rtsp://cam.local:8554/live".into()),
        ),
        ("file:///data/clip.mp4", Uri::File("/data/clip.mp4".into())),
        // RFC 8089: the local host named, and percent-encoded characters.
        (
            "file://localhost/data/my%20clip.mp4",
            Uri::File("/data/my clip.mp4".into()),
        ),
        ("file:///a%2Fb%25.mp4", Uri::File("/a/b%.mp4".into())),
        ("clip.mkv", Uri::File("clip.mkv".into())),
        (
            "raw://-?w=640&h=480",
            Uri::Raw {
                width: 640,
                height: 480,
            },
        ),
    ];
    for (s, want) in cases {
        assert_eq!(&Uri::parse(s).unwrap(), want, "{s}");
    }
    for bad in [
        "",
        "file:///clip%2",
        "file:///clip%zz.mp4",
        "csi://front",
        "raw://-?w=640",
        "raw://file?w=1&h=1",
        "v4l2://",
    ] {
        assert!(Uri::parse(bad).is_err(), "{bad:?} accepted");
    }
}

fn frame(i: usize) -> Frame {
    Frame {
        name: format!("f{i}"),
        width: 1,
        height: 1,
        rgb: vec![i as u8; 3],
    }
}

#[test]
fn live_queue_drops_oldest_and_file_queue_keeps_all() {
    let closed = AtomicBool::new(false);
    let q = Queue::new(3, Policy::DropOldest);
    for i in 0..10 {
        assert!(q.push(frame(i), &closed));
    }
    assert_eq!(q.dropped(), 7);
    q.finish(End::Finished);
    let names: Vec<String> = std::iter::from_fn(|| match q.pop(Duration::ZERO) {
        Next::Frame(f) => Some(f.name),
        _ => None,
    })
    .collect();
    assert_eq!(names, ["f7", "f8", "f9"]);

    // Blocking: a fast producer and a slow consumer lose nothing.
    let q = std::sync::Arc::new(Queue::new(2, Policy::Block));
    let producer = {
        let q = q.clone();
        std::thread::spawn(move || {
            let closed = AtomicBool::new(false);
            for i in 0..50 {
                assert!(q.push(frame(i), &closed));
            }
            q.finish(End::Finished);
        })
    };
    let mut got = Vec::new();
    loop {
        match q.pop(Duration::from_secs(5)) {
            Next::Frame(f) => {
                assert!(q.len() <= 2);
                got.push(f.rgb[0] as usize);
                std::thread::sleep(Duration::from_millis(1));
            }
            Next::End(End::Finished) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    producer.join().unwrap();
    assert_eq!(got, (0..50).collect::<Vec<_>>());
    assert_eq!(q.dropped(), 0);
}

#[test]
fn unknown_schemes_huge_frames_and_symlink_loops_are_named() {
    let e = format!("{:#}", Uri::parse("foo://bar").unwrap_err());
    assert!(e.contains("unknown scheme 'foo://'"), "{e}");
    for big in [
        "raw://-?w=100000&h=100000",
        "raw://-?w=18446744073709551615&h=18446744073709551615",
    ] {
        let e = format!("{:#}", Uri::parse(big).unwrap_err());
        assert!(e.contains("larger than the limit"), "{big}: {e}");
    }
    let dir = Scratch::dir("sources", "loop");
    let (a, b) = (dir.join("a"), dir.join("b"));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    let e = format!("{:#}", ersm::source::images::list(&a).unwrap_err());
    assert!(e.to_lowercase().contains("symbolic links"), "{e}");
    let opts = ersm::source::SourceOptions::default();
    let e = match ersm::source::open(&Uri::File(a.clone()), &opts) {
        Ok(_) => panic!("a symlink loop opened"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.to_lowercase().contains("symbolic links"), "{e}");
}

/// Offset of the first `kind` box's payload (after size and type) in `b`.
fn box_payload(b: &[u8], kind: &[u8; 4]) -> usize {
    b.windows(4).position(|w| w == kind).expect("box present") + 4
}

#[test]
fn mp4_tables_the_file_cannot_hold_are_refused_before_allocating() {
    let bytes = std::fs::read(clip()).unwrap();
    let path = Scratch::path("sources", "tables.mp4");
    // stsz: version/flags, sample_size, sample_count. A fixed size of 1 byte
    // and 4 294 967 295 samples used to allocate 16 GB.
    let mut b = bytes.clone();
    let at = box_payload(&b, b"stsz");
    b[at + 4..at + 8].copy_from_slice(&1u32.to_be_bytes());
    b[at + 8..at + 12].copy_from_slice(&u32::MAX.to_be_bytes());
    std::fs::write(&path, &b).unwrap();
    let t = std::time::Instant::now();
    let err = format!("{:#}", Mp4Source::open(&path).err().unwrap());
    assert!(
        err.contains("stsz") && err.contains("more than the file"),
        "{err}"
    );
    assert!(t.elapsed().as_secs() < 5);
    // stco: a chunk offset past the end of the file is a clear error when
    // that frame is reached, never a slice panic.
    let mut b = bytes.clone();
    let at = box_payload(&b, b"stco");
    b[at + 8..at + 12].copy_from_slice(&u32::MAX.to_be_bytes());
    std::fs::write(&path, &b).unwrap();
    let err = match Mp4Source::open(&path) {
        Err(e) => format!("{e:#}"),
        Ok(mut src) => loop {
            match src.next_frame() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("a chunk past the end played"),
                Err(e) => break format!("{e:#}"),
            }
        },
    };
    assert!(err.contains("tables.mp4"), "{err}");
}
