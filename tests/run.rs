//! `ersm run` as a user runs it: sources, the summary after every kind of
//! ending, per-frame records and overlays. Uses the small test model.

mod common;

use common::Scratch;
/// `--output`: the live view, metrics and streams (in this binary to save a link).
#[path = "run/live.rs"]
mod live;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> String {
    root().join("models/tiny").to_string_lossy().into_owned()
}

fn ersm(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ersm"));
    c.arg("run").args(["--model", &tiny()]).args(args);
    c
}

fn output(mut c: Command) -> (Output, String, String) {
    let o = c.stdin(Stdio::null()).output().expect("ersm runs");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    (o, out, err)
}

fn tmp(name: &str) -> Scratch {
    Scratch::path("run", name)
}

/// The summary table is there and says how many frames ran and how it ended.
fn assert_summary(out: &str, frames: usize, ending: &str) {
    for row in [
        "Pre-Process",
        "Prefix",
        "Suffix",
        "Total",
        "FPS",
        "keep ratio",
    ] {
        assert!(out.contains(row), "summary lacks {row}:\n{out}");
    }
    assert!(
        out.contains(&format!(" {frames} processed")),
        "expected {frames} frames:\n{out}"
    );
    assert!(out.contains(ending), "expected ending '{ending}':\n{out}");
}

/// A JSON-lines file's records.
fn json_lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn image_folder_with_dense_comparison_and_jsonl() {
    let jsonl = tmp("images.jsonl");
    let images = root().join("models/images");
    let (o, out, err) = output(ersm(&[
        "--source",
        images.to_str().unwrap(),
        "--jsonl",
        jsonl.to_str().unwrap(),
        "--warmup",
        "0",
    ]));
    assert!(o.status.success(), "{err}");
    assert_summary(&out, 4, "end of stream");
    assert!(
        out.contains("top-1 agreement") && out.contains("dense p50"),
        "{out}"
    );
    let lines = json_lines(&jsonl);
    assert_eq!(lines.len(), 4);
    for (i, rec) in lines.iter().enumerate() {
        assert_eq!(rec["frame"], i);
        let keep = rec["keep_ratio"].as_f64().unwrap();
        assert!(keep > 0.0 && keep <= 1.0);
        assert!(rec["ersm_ms"]["total"].as_f64().unwrap() > 0.0);
        assert!(rec["dense_ms"]["suffix"].as_f64().unwrap() > 0.0);
        assert!(rec["agree"].is_boolean());
    }
    assert_eq!(lines[1]["name"], "chelsea.png");
    // The summary's agreement on sure frames counts what the records say.
    let sure: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|r| r["dense_margin"].as_f64().unwrap() >= 0.3)
        .collect();
    let sure_agree = sure.iter().filter(|r| r["agree"] == true).count();
    let expected = match sure.len() {
        0 => "-".to_string(),
        n => format!("{:.1} %", 100.0 * sure_agree as f64 / n as f64),
    };
    assert!(
        out.contains(&format!(
            "{expected} on the {} frame(s) the dense network is sure of",
            sure.len()
        )),
        "{out}"
    );
    for rec in &lines {
        let m = rec["dense_margin"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&m), "{rec}");
    }
}

/// `--dump` writes what `bench --dump` writes for the same frames: the
/// kept tokens and both modes' logits, line for line with `--jsonl`.
#[test]
fn dump_records_kept_tokens_and_logits_as_bench_does() {
    let (dump, jsonl, bench) = (
        tmp("run-dump.jsonl"),
        tmp("run-dump-records.jsonl"),
        tmp("bench-dump.jsonl"),
    );
    let images = root().join("models/images");
    let (o, _, err) = output(ersm(&[
        "--source",
        images.to_str().unwrap(),
        "--dump",
        dump.to_str().unwrap(),
        "--jsonl",
        jsonl.to_str().unwrap(),
        "--warmup",
        "0",
    ]));
    assert!(o.status.success(), "{err}");
    let (dumped, records) = (json_lines(&dump), json_lines(&jsonl));
    assert_eq!(dumped.len(), 4);
    let argmax = |v: &serde_json::Value| -> usize {
        let l: Vec<f64> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        (0..l.len()).fold(0, |b, i| if l[i] > l[b] { i } else { b })
    };
    for (d, r) in dumped.iter().zip(&records) {
        assert_eq!(d["image"], r["name"]);
        assert_eq!(d["kept"].as_array().unwrap().len(), r["kept_tokens"]);
        assert_eq!(argmax(&d["logits"]), r["top1"]);
        assert_eq!(argmax(&d["dense_logits"]), r["dense_top1"]);
    }
    let b = Command::new(env!("CARGO_BIN_EXE_ersm"))
        .args([
            "bench",
            "--model",
            &tiny(),
            "--images",
            images.to_str().unwrap(),
        ])
        .args([
            "--frames",
            "4",
            "--warmup",
            "0",
            "--dump",
            bench.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    for (d, e) in dumped.iter().zip(&json_lines(&bench)) {
        assert_eq!(d["image"], e["image"]);
        assert_eq!(d["kept"], e["kept"], "{}", d["image"]);
        for key in ["logits", "dense_logits"] {
            let (x, y) = (d[key].as_array().unwrap(), e[key].as_array().unwrap());
            assert_eq!(x.len(), y.len());
            for (a, b) in x.iter().zip(y) {
                assert!(
                    (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-4,
                    "{key}"
                );
            }
        }
    }
    // One file for both logs would hold a mix of the two.
    let (o, _, err) = output(ersm(&[
        "--source",
        images.to_str().unwrap(),
        "--dump",
        dump.to_str().unwrap(),
        "--jsonl",
        dump.to_str().unwrap(),
    ]));
    assert!(!o.status.success());
    assert!(
        err.contains("--jsonl and --dump name the same file"),
        "{err}"
    );
}

#[test]
fn compare_none_runs_ersm_alone() {
    let images = root().join("models/images/coffee.png");
    let (o, out, err) = output(ersm(&[
        "--source",
        images.to_str().unwrap(),
        "--compare",
        "none",
    ]));
    assert!(o.status.success(), "{err}");
    assert_summary(&out, 1, "end of stream");
    assert!(!out.contains("top-1 agreement"), "{out}");
}

fn raw_frames(n: usize, w: usize, h: usize) -> Vec<u8> {
    (0..n * w * h * 3).map(|i| (i * 7 % 251) as u8).collect()
}

fn run_with_stdin(args: &[&str], bytes: Vec<u8>) -> (Output, String, String) {
    let mut child = ersm(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || {
        let _ = stdin.write_all(&bytes);
    });
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    (o, out, err)
}

#[test]
fn raw_stdin_frames() {
    let (o, out, err) = run_with_stdin(&["--source", "raw://-?w=64&h=48"], raw_frames(5, 64, 48));
    assert!(o.status.success(), "{err}");
    assert_summary(&out, 5, "end of stream");
}

#[test]
fn raw_stdin_with_the_wrong_frame_size_says_so_and_still_summarises() {
    // 5 frames of 64×48 read as 50×50: 6 whole frames, then 1080 bytes.
    let (o, out, err) = run_with_stdin(&["--source", "raw://-?w=50&h=50"], raw_frames(5, 64, 48));
    assert!(!o.status.success());
    assert!(
        err.contains("truncated frame 7") && err.contains("is the frame size right"),
        "{err}"
    );
    assert_summary(&out, 6, "source error");
}

#[test]
fn truncated_mp4_ends_with_message_and_summary() {
    let bytes = std::fs::read(root().join("models/streams/vtest.mp4")).unwrap();
    let path = tmp("cut.mp4");
    std::fs::write(&path, &bytes[..bytes.len() / 4]).unwrap();
    let (o, out, err) = output(ersm(&[
        "--source",
        path.to_str().unwrap(),
        "--compare",
        "none",
    ]));
    assert!(!o.status.success());
    assert!(
        err.contains("truncated") && err.contains("cut.mp4"),
        "{err}"
    );
    let n: usize = out
        .split(" processed")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no frame count:\n{out}"));
    assert!(n > 5 && n < 150, "{n} frames from a quarter of the clip");
    assert!(out.contains("source error"), "{out}");
}

#[test]
fn missing_camera_names_the_device() {
    let (o, _, err) = output(ersm(&["--source", "v4l2:///dev/video99"]));
    assert!(!o.status.success());
    assert!(
        err.contains("/dev/video99") && err.contains("no such device"),
        "{err}"
    );
    let (o, _, err) = output(ersm(&["--source", "/no/such/clip.mp4"]));
    assert!(!o.status.success());
    assert!(err.contains("/no/such/clip.mp4"), "{err}");
}

#[test]
fn missing_tools_name_the_package() {
    let empty = tmp("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    for (src, want) in [
        ("rtsp://127.0.0.1:1/none", "apt install ffmpeg"),
        ("csi://0", "gstreamer1.0-tools"),
    ] {
        let mut c = ersm(&["--source", src]);
        c.env("PATH", &empty);
        let (o, _, err) = output(c);
        assert!(!o.status.success());
        assert!(
            err.contains("not found") && err.contains(want),
            "{src}: {err}"
        );
    }
}

#[test]
fn stalled_stdin_ends_the_run_with_summary() {
    let mut child = ersm(&["--source", "raw://-?w=32&h=32", "--stall-timeout", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // One frame, then silence with the pipe held open.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&raw_frames(1, 32, 32)).unwrap();
    let o = wait_timeout(child, Duration::from_secs(60));
    drop(stdin);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("stalled"), "{err}");
    assert_summary(&out, 1, "stalled");
}

fn wait_timeout(mut child: Child, limit: Duration) -> Output {
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < limit, "ersm did not end within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Ctrl-C at a terminal signals the whole foreground group: ffmpeg, in its
/// own group, is not cut short, ersm finishes the video, and the run ends
/// cleanly (ffmpeg used to exit 255 and fail the run).
#[test]
fn ctrl_c_while_writing_a_video_overlay_finishes_it() {
    if !common::have_ffmpeg() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let video = tmp("ctrlc.mp4");
    let child = ersm(&["--loop", "--overlay", video.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: signalling the group of our own child, as a terminal would.
    unsafe {
        libc::kill(-(child.id() as libc::pid_t), libc::SIGINT);
    }
    let o = wait_timeout(child, Duration::from_secs(60));
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("interrupted (Ctrl-C)"), "{out}");
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args(["-show_entries", "stream=nb_read_frames", "-of", "csv=p=0"])
        .arg(&video)
        .output()
        .unwrap();
    let frames: usize = String::from_utf8_lossy(&probe.stdout)
        .trim()
        .parse()
        .unwrap();
    assert!(
        frames > 0,
        "the video holds the frames written before Ctrl-C"
    );
}

#[test]
fn ctrl_c_prints_the_summary_of_what_ran() {
    let jsonl = tmp("ctrlc.jsonl");
    let child = ersm(&[
        "--loop",
        "--jsonl",
        jsonl.to_str().unwrap(),
        "--compare",
        "none",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Wait for a few frames to be processed (the records are buffered, so
    // wait on the status lines instead: at least one per 2 s).
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let o = wait_timeout(child, Duration::from_secs(30));
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("interrupted (Ctrl-C)"), "{out}\n{err}");
    let n = std::fs::read_to_string(&jsonl).unwrap().lines().count();
    assert!(n > 0, "no frame before Ctrl-C");
    assert_summary(&out, n, "interrupted");
}

#[test]
fn overlay_png_sequence_outlines_kept_tokens() {
    let dir = tmp("overlay");
    let images = root().join("models/images");
    let (o, out, err) = output(ersm(&[
        "--source",
        images.to_str().unwrap(),
        "--overlay",
        dir.to_str().unwrap(),
        "--compare",
        "none",
    ]));
    assert!(o.status.success(), "{err}");
    assert_summary(&out, 4, "end of stream");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 4);
    // Same size as the source frame; kept tokens outlined in pure green.
    let img = image::open(&files[1]).unwrap().to_rgb8();
    let src = image::open(images.join("chelsea.png")).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), src.dimensions());
    let green = img.pixels().filter(|p| p.0 == [0, 255, 0]).count();
    assert!(green > 100, "{green} outline pixels");
    assert_ne!(img.as_raw(), src.as_raw());
}

#[test]
fn run_help_lists_the_options() {
    let mut help = Command::new(env!("CARGO_BIN_EXE_ersm"));
    help.args(["run", "--help"]);
    let (_, out, _) = output(help);
    for opt in [
        "--source",
        "--compare",
        "--device",
        "--input-width",
        "--input-height",
        "--input-fps",
        "--loop",
        "--reconnect",
        "--jsonl",
        "--overlay",
        "v4l2://",
        "csi://",
        "rtsp://",
        "raw://",
    ] {
        assert!(out.contains(opt), "run --help lacks {opt}: {out}");
    }
}

/// A folder with stand-in `ffprobe` and `ffmpeg` scripts: ffprobe reports
/// 64×48, ffmpeg runs `body` (a shell snippet) in place of decoding.
fn fake_ffmpeg(name: &str, body: &str) -> Scratch {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmp(name);
    std::fs::create_dir_all(&dir).unwrap();
    for (tool, script) in [
        ("ffprobe", "#!/bin/sh\necho 64,48,N/A\n".to_string()),
        ("ffmpeg", format!("#!/bin/sh\n{body}\n")),
    ] {
        let p = dir.join(tool);
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

fn with_path(mut c: Command, dir: &Path) -> Command {
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    c.env("PATH", path);
    c
}

#[test]
fn crashed_subprocess_is_reported_with_its_last_words() {
    // Two frames, then a crash.
    let dir = fake_ffmpeg(
        "crash",
        "head -c 18432 /dev/zero\necho 'rtsp://cam: Connection reset by peer' >&2\nexit 1",
    );
    let c = with_path(ersm(&["--source", "rtsp://cam/live"]), &dir);
    let (o, out, err) = output(c);
    assert!(!o.status.success());
    assert!(
        err.contains("ffmpeg exited with") && err.contains("Connection reset by peer"),
        "{err}"
    );
    assert_summary(&out, 2, "source error");
}

/// An encoder that stops reading (a file's ffmpeg gone to sleep, an RTSP
/// server stuck in its handshake) never holds inference up: every frame
/// runs, the summary comes, and the stalled writer is stopped and named
/// within its time limit.
#[test]
fn outputs_whose_encoder_stops_reading_never_hold_the_run() {
    let dir = fake_ffmpeg(
        "deaf",
        "case \"$*\" in *-version*) echo 'ffmpeg version fake'; exit 0;; esac\nexec sleep 600",
    );
    let video = tmp("deaf.mp4");
    let runs: Vec<_> = [
        vec!["--overlay", video.to_str().unwrap()],
        vec!["--output", "rtsp://127.0.0.1:18554/live"],
    ]
    .into_iter()
    .map(|extra| {
        let mut args = vec!["--max-frames", "30"];
        args.extend(extra);
        let c = with_path(ersm(&args), &dir);
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = output(c);
            (t.elapsed(), r)
        })
    })
    .collect();
    for run in runs {
        let (took, (o, out, err)) = run.join().unwrap();
        assert!(took < Duration::from_secs(40), "took {took:?}");
        assert_summary(&out, 30, "frame limit reached");
        assert!(!o.status.success(), "{out}");
        assert!(err.contains("stalled and was stopped"), "{err}");
    }
}

/// With `--reconnect`, a network source that is down at start is tried
/// again until it comes up, and the run then goes on as usual.
#[test]
fn reconnect_waits_for_a_source_that_is_down_at_start() {
    if !common::have_ffmpeg() {
        return;
    }
    use std::io::{BufRead, BufReader};
    // A free port, closed again: nothing listens there yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/vtest.mp4");
    let child = ersm(&["--source", &url, "--reconnect", "--max-frames", "5"])
        .args(["--compare", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let clip = std::fs::read(root().join("models/streams/vtest.mp4")).unwrap();
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(8) {
            let Ok(mut c) = conn else { continue };
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                clip.len()
            );
            let _ = c
                .write_all(head.as_bytes())
                .and_then(|()| c.write_all(&clip));
        }
    });
    let o = wait_timeout(child, Duration::from_secs(60));
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(err.contains("trying again"), "{err}");
    assert_summary(&out, 5, "frame limit reached");
}

/// A network source that accepts and then says nothing fails at start-up
/// within `--stall-timeout`, naming it, instead of probing for ever.
#[test]
fn a_silent_network_source_fails_within_the_stall_timeout() {
    if !common::have_ffmpeg() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        // Hold every connection open without a word.
        let held: Vec<_> = listener.incoming().take(4).collect();
        std::thread::sleep(Duration::from_secs(120));
        drop(held);
    });
    for url in [
        format!("rtsp://127.0.0.1:{port}/x"),
        format!("http://127.0.0.1:{port}/x.mp4"),
    ] {
        let t = Instant::now();
        let (o, _, err) = output(ersm(&["--source", &url, "--stall-timeout", "2"]));
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{url}: {:?}",
            t.elapsed()
        );
        assert!(!o.status.success());
        assert!(
            err.contains(&format!("source {url}: no answer within 2 s")),
            "{err}"
        );
    }
}

#[test]
fn stalled_subprocess_is_killed_and_summarised() {
    let dir = fake_ffmpeg("stall", "head -c 9216 /dev/zero\nexec sleep 600");
    let c = with_path(
        ersm(&["--source", "rtsp://cam/live", "--stall-timeout", "1"]),
        &dir,
    );
    let t = Instant::now();
    let (o, out, err) = output(c);
    assert!(t.elapsed() < Duration::from_secs(60));
    assert!(!o.status.success());
    assert!(err.contains("stalled"), "{err}");
    assert_summary(&out, 1, "stalled");
}

#[test]
fn reconnect_reopens_a_live_source_that_drops() {
    // Each start gives 2 frames then fails; with --reconnect the run goes on.
    let dir = fake_ffmpeg("reconnect", "head -c 18432 /dev/zero\nexit 1");
    let c = with_path(
        ersm(&[
            "--source",
            "rtsp://cam/live",
            "--reconnect",
            "--max-frames",
            "5",
        ]),
        &dir,
    );
    let (o, out, err) = output(c);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("reconnected"), "{err}");
    assert_summary(&out, 5, "frame limit");
}

#[test]
fn video_file_through_real_ffmpeg() {
    if !common::have_ffmpeg() {
        return;
    }
    // An MJPEG AVI: not H.264 MP4, so ersm hands it to ffmpeg.
    let avi = tmp("clip.avi");
    let st = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y", "-i"])
        .arg(root().join("models/streams/vtest.mp4"))
        .args(["-frames:v", "6", "-c:v", "mjpeg", "-q:v", "5"])
        .arg(&avi)
        .status()
        .unwrap();
    assert!(st.success());
    let video = tmp("overlay.mp4");
    let (o, out, err) = output(ersm(&[
        "--source",
        avi.to_str().unwrap(),
        "--overlay",
        video.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{err}");
    assert!(out.contains("via ffmpeg"), "{out}");
    assert_summary(&out, 6, "end of stream");
    // The overlay video has the frames.
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args([
            "-show_entries",
            "stream=nb_read_frames,width,height",
            "-of",
            "csv=p=0",
        ])
        .arg(&video)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&probe.stdout).trim(), "768,576,6");
}

/// A copy of the tiny package whose manifest sets a fallback margin.
fn tiny_with_fallback(name: &str, margin: f64) -> Scratch {
    let dir = tmp(name);
    std::fs::create_dir_all(&dir).unwrap();
    let src = root().join("models/tiny");
    std::fs::copy(src.join("model.onnx"), dir.join("model.onnx")).unwrap();
    let text = std::fs::read_to_string(src.join("manifest.json")).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["fallback"] = serde_json::json!({ "margin": margin });
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    dir
}

#[test]
fn fallback_is_counted_in_the_summary_records_and_bench() {
    // Margin 1: every frame is unsure, so every frame re-runs densely and
    // agrees with dense; the suffix compute includes both runs.
    let model = tiny_with_fallback("fallback", 1.0);
    let jsonl = tmp("fallback.jsonl");
    let images = root().join("models/images");
    let mut c = Command::new(env!("CARGO_BIN_EXE_ersm"));
    c.args(["run", "--model", model.to_str().unwrap(), "--fallback"])
        .args(["--source", images.to_str().unwrap(), "--warmup", "0"])
        .args(["--jsonl", jsonl.to_str().unwrap()]);
    let (o, out, err) = output(c);
    assert!(o.status.success(), "{err}");
    assert_summary(&out, 4, "end of stream");
    assert!(out.contains("100.0 % of frames re-run densely"), "{out}");
    assert!(out.contains("top-1 agreement 100.0 %"), "{out}");
    let compute: f64 = out
        .split("suffix compute ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("summary gives the suffix compute");
    assert!(compute > 1.0, "sparse plus dense: {compute}\n{out}");
    for line in std::fs::read_to_string(&jsonl).unwrap().lines() {
        let rec: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(rec["fell_back"], true);
    }

    let json = tmp("fallback-bench.json");
    let mut c = Command::new(env!("CARGO_BIN_EXE_ersm"));
    c.args(["bench", "--model", model.to_str().unwrap(), "--fallback"])
        .args([
            "--frames",
            "2",
            "--warmup",
            "0",
            "--json",
            json.to_str().unwrap(),
        ]);
    let (o, _, err) = output(c);
    assert!(o.status.success(), "{err}");
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(b["fallback_rate"], 1.0);
    assert!(b["suffix_macs_ersm"].as_f64().unwrap() > b["suffix_macs_dense"].as_f64().unwrap());

    // Without --fallback nothing is re-run, and a package without a margin refuses it.
    let mut c = Command::new(env!("CARGO_BIN_EXE_ersm"));
    c.args([
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--frames",
        "1",
        "--json",
    ])
    .arg(json.to_str().unwrap());
    let (o, _, err) = output(c);
    assert!(o.status.success(), "{err}");
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(b.get("fallback_rate").is_none(), "{b}");
    let (o, _, err) = output(ersm(&["--fallback", "--max-frames", "1"]));
    assert!(!o.status.success());
    assert!(err.contains("sets no fallback margin"), "{err}");
}

#[test]
fn a_run_that_processed_nothing_exits_non_zero_without_nan() {
    // A folder whose only image does not decode.
    let dir = tmp("undecodable");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("broken.png"), b"not a png at all").unwrap();
    let (o, out, err) = output(ersm(&["--source", dir.to_str().unwrap()]));
    assert!(!o.status.success(), "exit 0 with nothing processed:\n{out}");
    assert!(out.contains("no frame was processed"), "{out}");
    assert!(out.contains("1 unreadable inputs skipped"), "{out}");
    assert!(err.contains("no frame of"), "{err}");
    assert!(
        !out.contains("NaN") && !out.to_lowercase().contains("nan "),
        "{out}"
    );
}

#[test]
fn a_jsonl_write_error_still_summarises_then_exits_non_zero() {
    if !Path::new("/dev/full").exists() {
        println!("SKIPPED: no /dev/full here");
        return;
    }
    let images = root().join("models/images");
    let (o, out, err) = output(ersm(&[
        "--source",
        images.to_str().unwrap(),
        "--jsonl",
        "/dev/full",
        "--warmup",
        "0",
    ]));
    assert!(!o.status.success(), "exit 0 after a failed --jsonl:\n{out}");
    assert_summary(&out, 4, "end of stream");
    assert!(out.contains("output failed   --jsonl"), "{out}");
    assert!(out.contains("0 failed"), "frames counted as failed:\n{out}");
    assert!(err.contains("--jsonl"), "{err}");
}

#[test]
fn frames_with_non_finite_values_fail_and_are_not_counted() {
    use ersm::model::read_onnx;
    use prost::Message;
    // The tiny model with its last layer's weights at 3e38: the logits
    // overflow to ±inf or NaN. The weights themselves are finite, so the
    // package loads; each frame must then fail, not report class 0.
    let dir = tmp("overflow-model");
    std::fs::create_dir_all(&dir).unwrap();
    let tiny = root().join("models/tiny");
    std::fs::copy(tiny.join("manifest.json"), dir.join("manifest.json")).unwrap();
    let mut proto = read_onnx(&tiny.join("model.onnx")).unwrap();
    let g = proto.graph.as_mut().unwrap();
    let w = g
        .node
        .iter()
        .rev()
        .find(|n| n.op_type == "Conv" || n.op_type == "Gemm")
        .unwrap()
        .input[1]
        .clone();
    let t = g.initializer.iter_mut().find(|t| t.name == w).unwrap();
    if t.raw_data.is_empty() {
        t.float_data.iter_mut().for_each(|v| *v = 3e38);
    } else {
        for c in t.raw_data.chunks_exact_mut(4) {
            c.copy_from_slice(&3e38f32.to_le_bytes());
        }
    }
    std::fs::write(dir.join("model.onnx"), proto.encode_to_vec()).unwrap();
    let images = root().join("models/images");
    let mut c = Command::new(env!("CARGO_BIN_EXE_ersm"));
    c.args(["run", "--model", dir.to_str().unwrap(), "--source"])
        .arg(&images);
    let (o, out, err) = output(c);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("0 processed") || out.contains("no frame was processed"),
        "{out}"
    );
    assert!(err.contains("non-finite"), "the log names the cause: {err}");
    assert!(!out.contains("agreement 100"), "{out}");
    // bench leaves every failed frame out, and says so when none is left.
    let mut c = Command::new(env!("CARGO_BIN_EXE_ersm"));
    c.args(["bench", "--frames", "3", "--model", dir.to_str().unwrap()]);
    let (o, out, err) = output(c);
    assert!(!o.status.success(), "{out}");
    assert!(
        err.contains("no frame could be timed (") && err.contains("non-finite"),
        "{err}"
    );
}

#[test]
fn reconnect_restarts_a_stalled_source_and_outlasts_a_failing_one() {
    // One frame per start, then silence: each stall restarts it.
    let dir = fake_ffmpeg("reconnect-stall", "head -c 9216 /dev/zero\nexec sleep 600");
    let c = with_path(
        ersm(&[
            "--source",
            "rtsp://cam/live",
            "--reconnect",
            "--stall-timeout",
            "1",
            "--max-frames",
            "3",
        ]),
        &dir,
    );
    let t = Instant::now();
    let (o, out, err) = output(c);
    assert!(t.elapsed() < Duration::from_secs(60));
    assert!(o.status.success(), "{err}");
    assert!(err.contains("restarting the source"), "{err}");
    assert_summary(&out, 3, "frame limit");

    // A source that never comes back: the run waits (well past the stall
    // timeout) until Ctrl-C, then summarises.
    let dir = fake_ffmpeg("reconnect-dead", "exit 1");
    let child = with_path(
        ersm(&[
            "--source",
            "rtsp://cam/live",
            "--reconnect",
            "--stall-timeout",
            "1",
        ]),
        &dir,
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let mut child = child;
    assert!(
        child.try_wait().unwrap().is_none(),
        "--reconnect gave up on a failing source"
    );
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let o = wait_timeout(child, Duration::from_secs(30));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("interrupted (Ctrl-C)"), "{out}");
}

#[test]
fn an_overlay_encoder_that_dies_makes_the_run_exit_non_zero() {
    // ffmpeg starts, reads nothing and exits: the overlay cannot be written.
    let dir = fake_ffmpeg("overlay-dies", "exit 1");
    let images = root().join("models/images");
    let video = tmp("overlay-dies.mp4");
    let c = with_path(
        ersm(&[
            "--source",
            images.to_str().unwrap(),
            "--overlay",
            video.to_str().unwrap(),
            "--warmup",
            "0",
        ]),
        &dir,
    );
    let (o, out, err) = output(c);
    assert!(
        !o.status.success(),
        "exit 0 with a dead encoder:\n{out}\n{err}"
    );
    assert_summary(&out, 4, "end of stream");
    assert!(out.contains("output failed   --overlay"), "{out}");
}

#[test]
fn jsonl_and_overlay_paths_are_checked_before_the_first_frame() {
    let images = root().join("models/images");
    for (flag, path) in [
        ("--jsonl", "/nonexistent-dir/frames.jsonl"),
        ("--overlay", "/nonexistent-dir/overlay.mp4"),
    ] {
        let (o, out, err) = output(ersm(&["--source", images.to_str().unwrap(), flag, path]));
        assert!(!o.status.success(), "{flag}: {out}");
        assert!(
            err.contains(path),
            "{flag}: the error names the path: {err}"
        );
        assert!(
            !out.contains("processed"),
            "{flag}: frames ran first:\n{out}"
        );
    }
}

/// A run that ends within its warm-up (one image, or --warmup above the
/// frames) is timed on the warm-up frames and says so: never NaN.
#[test]
fn a_run_within_its_warm_up_is_timed_on_it() {
    let (o, out, err) = output(ersm(&["--max-frames", "3", "--warmup", "5"]));
    assert!(o.status.success(), "{err}");
    assert_summary(&out, 3, "frame limit");
    assert!(
        out.contains("percentiles over 3 frames the run ended within the warm-up"),
        "{out}"
    );
    assert!(!out.contains("NaN"), "{out}");
}

/// An output that cannot be written is named by the option that gave it
/// (a PNG folder under a file: no ffmpeg needed).
#[test]
fn a_bad_output_path_is_named_by_its_option() {
    for flag in ["--overlay", "--output"] {
        let (o, _, err) = output(ersm(&["--max-frames", "1", flag, "/dev/null/frames"]));
        assert!(!o.status.success());
        assert!(
            err.contains(&format!("{flag} /dev/null/frames: cannot create folder")),
            "{flag}: {err}"
        );
    }
}

/// An ffmpeg that never answers `-version` is named as broken within a few
/// seconds, before the model loads, instead of holding the run forever.
#[test]
fn an_ffmpeg_that_hangs_on_version_is_reported() {
    let dir = fake_ffmpeg("hangs", "exec sleep 1000");
    let out = tmp("hangs-out").join("x.mp4");
    let c = with_path(
        ersm(&["--max-frames", "1", "--overlay", out.to_str().unwrap()]),
        &dir,
    );
    let t = Instant::now();
    let (o, _, err) = output(c);
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    assert!(!o.status.success());
    assert!(err.contains("ffmpeg -version` did not answer"), "{err}");
}
