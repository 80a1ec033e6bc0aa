//! `ersm run --output URI` as a person watching a headless device uses it:
//! the viewer page in a real browser, the MJPEG stream, `/metrics` and
//! `/status` while the run goes on, clients that misbehave, a port in use,
//! Ctrl-C, and the RTP stream through ffmpeg. Uses the small test model on
//! the bundled clip, looped.

use crate::common::{self, Scratch};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn ersm(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ersm"));
    c.arg("run")
        .args(["--model", &root().join("models/tiny").to_string_lossy()])
        .args(["--threads", "1"])
        .args(args);
    c
}

/// A running `ersm run` whose stderr is collected as it comes.
struct Run {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
    addr: String,
}

impl Run {
    /// Starts a looped run serving on a free loopback port and waits for
    /// the line that names the address.
    fn start(extra: &[&str]) -> Run {
        let mut child = ersm(&["--loop", "--output", "http://127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ersm starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("live view on http://").nth(1) {
                    let _ = tx.send(rest.split('/').next().unwrap_or("").to_string());
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no 'live view on' line:\n{}", stderr.lock().unwrap()));
        Run {
            child: Some(child),
            stderr,
            addr,
        }
    }

    /// Ctrl-C, then the exit status and the summary.
    fn interrupt(mut self) -> (ExitStatus, String, String) {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGINT);
        }
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "ersm did not stop on Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        // Let the reader thread take the last lines.
        std::thread::sleep(Duration::from_millis(200));
        let err = self.stderr.lock().unwrap().clone();
        (status, out, err)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One request over a fresh connection: status code, head, body (by
/// Content-Length when given, else to the end of the connection).
fn request(addr: &str, raw: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connects");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(raw).unwrap();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).expect("reads the response head");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push_str(&line);
    }
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    let mut body = Vec::new();
    match length {
        // A HEAD answer has no body whatever its length says; the server
        // closes the connection, so anything it sent would show here.
        Some(n) if !raw.starts_with(b"HEAD ") => {
            body.resize(n, 0);
            r.read_exact(&mut body).expect("reads the body");
        }
        _ => {
            r.read_to_end(&mut body).expect("reads the body");
        }
    }
    (code, head, body)
}

fn get(addr: &str, path: &str) -> (u16, String, Vec<u8>) {
    request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// `/metrics`, checked line by line against the text format: HELP and TYPE
/// before each family, numeric values, histogram buckets cumulative and
/// ending at `_count`. Returns every sample by its full name.
fn metrics(addr: &str) -> BTreeMap<String, f64> {
    let (code, head, body) = get(addr, "/metrics");
    assert_eq!(code, 200);
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let text = String::from_utf8(body).unwrap();
    let mut samples = BTreeMap::new();
    let mut typed = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(typed.contains_key(family), "no TYPE for {line}");
        assert!(
            samples.insert(series.to_string(), v).is_none(),
            "duplicate {series}"
        );
    }
    // Buckets cumulative; +Inf equals the count.
    for (name, kind) in &typed {
        if kind != "histogram" {
            continue;
        }
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for (k, v) in samples.range(format!("{name}_bucket")..) {
            let Some(rest) = k.strip_prefix(&format!("{name}_bucket{{")) else {
                break;
            };
            let (labels, le) = rest.rsplit_once("le=\"").unwrap();
            let le = le.trim_end_matches("\"}");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            series.entry(labels.to_string()).or_default().push((le, *v));
        }
        assert!(!series.is_empty(), "{name} has no buckets");
        for (labels, mut b) in series {
            b.sort_by(|x, y| x.0.total_cmp(&y.0));
            assert!(b.windows(2).all(|w| w[0].1 <= w[1].1), "{name} {labels}");
            let labels = labels.trim_end_matches(',');
            let count = if labels.is_empty() {
                format!("{name}_count")
            } else {
                format!("{name}_count{{{labels}}}")
            };
            assert_eq!(b.last().unwrap().1, samples[&count], "{count}");
        }
    }
    samples
}

fn status(addr: &str) -> serde_json::Value {
    let (code, head, body) = get(addr, "/status");
    assert_eq!(code, 200);
    assert!(head.contains("application/json"), "{head}");
    serde_json::from_slice(&body).unwrap()
}

/// Waits until the run has processed `n` frames.
fn wait_frames(addr: &str, n: u64) {
    let start = Instant::now();
    while status(addr)["frames"].as_u64().unwrap() < n {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "fewer than {n} frames in 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Opens `/stream.mjpg` and returns the reader past the response head.
fn open_stream(addr: &str) -> (u16, String, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET /stream.mjpg HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push_str(&line);
    }
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap();
    (code, head, r)
}

/// The next JPEG part of an MJPEG stream.
fn next_part(r: &mut BufReader<TcpStream>) -> Vec<u8> {
    let mut len = None;
    loop {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "stream ended");
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Content-Length: ") {
            len = Some(v.parse::<usize>().unwrap());
        } else if l.is_empty() && len.is_some() {
            break;
        }
    }
    let mut jpeg = vec![0; len.unwrap()];
    r.read_exact(&mut jpeg).unwrap();
    jpeg
}

fn decode(jpeg: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(jpeg, image::ImageFormat::Jpeg)
        .expect("a JPEG that decodes")
        .to_rgb8()
}

/// Pixels that are the overlay's green outline of kept tokens (after JPEG).
fn outline_pixels(img: &image::RgbImage) -> usize {
    img.pixels()
        .filter(|p| p[1] > 180 && p[0] < 110 && p[2] < 110)
        .count()
}

#[test]
fn serves_the_viewer_metrics_status_and_a_live_mjpeg_stream() {
    let run = Run::start(&[]);
    let addr = run.addr.clone();
    assert!(
        addr.starts_with("127.0.0.1:"),
        "binds loopback by default: {addr}"
    );
    wait_frames(&addr, 3);

    let (code, head, page) = get(&addr, "/");
    assert_eq!(code, 200);
    assert!(head.contains("text/html"));
    let page = String::from_utf8(page).unwrap();
    for part in ["stream.mjpg", "status", "<canvas"] {
        assert!(page.contains(part), "viewer lacks {part}");
    }

    // /status and /metrics change as frames are processed.
    let s1 = status(&addr);
    let m1 = metrics(&addr);
    std::thread::sleep(Duration::from_millis(1500));
    let s2 = status(&addr);
    let m2 = metrics(&addr);
    assert!(s2["frames"].as_u64() > s1["frames"].as_u64(), "{s1}\n{s2}");
    assert!(m2["ersm_frames_total"] > m1["ersm_frames_total"]);
    assert_eq!(s2["running"], true);
    assert_eq!(s2["model"], "ersm-tiny");
    let keep = s2["last"]["keep"].as_f64().unwrap();
    assert!(keep > 0.0 && keep <= 1.0, "{s2}");
    assert!(
        s2["agreement"].as_f64().is_some(),
        "dense runs beside: {s2}"
    );
    assert!(s2["ersm_ms_p50"].as_f64().unwrap() > 0.0);
    assert!(!s2["recent"]["ersm_ms"].as_array().unwrap().is_empty());
    for series in [
        "ersm_stage_latency_seconds_count{path=\"ersm\",stage=\"total\"}",
        "ersm_stage_latency_seconds_count{path=\"dense\",stage=\"suffix\"}",
        "ersm_keep_ratio",
        "ersm_agreement_ratio",
        "ersm_capture_dropped_frames_total",
        "ersm_resident_memory_bytes",
    ] {
        assert!(m2.contains_key(series), "/metrics lacks {series}");
    }
    assert!(m2["ersm_stage_latency_seconds_count{path=\"ersm\",stage=\"total\"}"] > 0.0);

    // MJPEG: parts that decode, at the frame's size, and change over time.
    let (code, head, mut r) = open_stream(&addr);
    assert_eq!(code, 200);
    assert!(
        head.contains("multipart/x-mixed-replace; boundary="),
        "{head}"
    );
    let first = decode(&next_part(&mut r));
    assert_eq!(first.dimensions(), (768, 576));
    assert!(outline_pixels(&first) > 200, "no kept-token outline drawn");
    let mut changed = false;
    for _ in 0..10 {
        let next = decode(&next_part(&mut r));
        if next.as_raw() != first.as_raw() {
            changed = true;
            break;
        }
    }
    assert!(changed, "ten MJPEG frames all equal to the first");
    drop(r);
    let (code, _, snap) = get(&addr, "/frame.jpg");
    assert_eq!(code, 200);
    assert_eq!(decode(&snap).dimensions(), (768, 576));

    let (code, _, body) = get(&addr, "/nowhere");
    assert_eq!(code, 404, "{}", String::from_utf8_lossy(&body));
    let (code, head, body) = request(
        &addr,
        format!("HEAD /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
    );
    assert_eq!(code, 200);
    assert!(
        body.is_empty() && head.contains("Content-Length: "),
        "{head}"
    );

    let (status, out, err) = run.interrupt();
    assert!(status.success(), "{err}");
    assert!(out.contains("interrupted (Ctrl-C)"), "{out}\n{err}");
    assert!(
        TcpStream::connect(&addr).is_err(),
        "still listening after the run ended"
    );
}

#[test]
fn misbehaving_clients_never_stall_the_run_and_memory_stays_flat() {
    let run = Run::start(&[]);
    let addr = run.addr.clone();
    wait_frames(&addr, 3);

    // Malformed, oversized and non-GET requests get their 4xx.
    let (code, _, _) = request(&addr, b"BLAH\x00\x01 nonsense\r\n\r\n");
    assert_eq!(code, 400);
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    let (code, _, _) = request(&addr, huge.as_bytes());
    assert_eq!(code, 431);
    let (code, head, _) = request(
        &addr,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    );
    assert_eq!(code, 405);
    assert!(head.contains("Allow: GET, HEAD"), "{head}");

    // A viewer that connects and never reads: frames keep coming and the
    // server keeps answering.
    let mut stuck = TcpStream::connect(&addr).unwrap();
    write!(stuck, "GET /stream.mjpg HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    // A client that connects and never sends a request.
    let silent = TcpStream::connect(&addr).unwrap();
    let before = status(&addr)["frames"].as_u64().unwrap();
    let asked = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let after = status(&addr)["frames"].as_u64().unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "/status slow with a stuck viewer"
    );
    assert!(
        after > before,
        "no frame processed while a viewer was stuck"
    );

    // Viewers are capped; a rejected one gets 503.
    let mut viewers: Vec<_> = (0..4).map(|_| open_stream(&addr)).collect();
    let codes: Vec<u16> = viewers.iter().map(|v| v.0).collect();
    // The stuck viewer holds one of the four places until its write times out.
    assert!(
        codes.contains(&503),
        "five viewers at once were all served: {codes:?}"
    );
    viewers.clear();
    drop(stuck);
    drop(silent);

    // Many connects and disconnects (bounded, loopback only): some closed at
    // once, some after half a request line.
    let rss = |m: &BTreeMap<String, f64>| m["ersm_resident_memory_bytes"] / (1024.0 * 1024.0);
    let rss_start = rss(&metrics(&addr));
    for i in 0..300 {
        let mut s = TcpStream::connect(&addr).unwrap();
        if i % 3 == 0 {
            let _ = s.write_all(b"GET /sta");
        }
    }
    // Viewers attached and detached again and again, each taking a frame.
    for _ in 0..30 {
        let (code, _, mut r) = open_stream(&addr);
        if code == 200 {
            decode(&next_part(&mut r));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let s = status(&addr);
    let m = metrics(&addr);
    let grew = rss(&m) - rss_start;
    assert!(
        grew < 40.0,
        "resident memory grew {grew:.1} MiB over the client churn"
    );
    assert!(s["running"] == true && s["failed"] == 0, "{s}");

    let (status, out, err) = run.interrupt();
    assert!(status.success(), "{err}");
    assert!(out.contains("interrupted (Ctrl-C)"), "{out}\n{err}");
}

#[test]
fn a_port_in_use_fails_at_start_up_naming_it() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let start = Instant::now();
    let o = ersm(&["--output", &format!("http://127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(&format!("port {port} is already in use")),
        "{err}"
    );
    // Before the model is loaded or a frame is read.
    assert!(!err.contains("worker thread"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(20));
    for (bad, says) in [
        ("http://:notaport", "is not a port"),
        ("gopher://x", "unknown scheme"),
        ("rtp://127.0.0.1", "needs a port"),
    ] {
        let o = ersm(&["--output", bad])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{bad}: {err}");
    }
}

#[test]
fn rtp_output_streams_h264_packets_while_the_run_goes_on() {
    if !common::have_ffmpeg() {
        return;
    }
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let port = sock.local_addr().unwrap().port();
    let child = ersm(&[
        "--output",
        &format!("rtp://127.0.0.1:{port}"),
        "--max-frames",
        "40",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut seqs = Vec::new();
    let mut buf = [0u8; 2048];
    while seqs.len() < 20 {
        let n = sock.recv(&mut buf).expect("RTP packets arrive");
        assert!(n > 12, "short packet");
        assert_eq!(buf[0] >> 6, 2, "RTP version 2");
        assert_eq!(buf[1] & 0x7f, 96, "dynamic payload type (H.264)");
        seqs.push(u16::from_be_bytes([buf[2], buf[3]]));
    }
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0].wrapping_add(1)),
        "sequence numbers in order on loopback: {seqs:?}"
    );
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let sdp = err
        .split_whitespace()
        .find(|w| w.ends_with(".sdp`") || w.ends_with(".sdp"))
        .map(|w| w.trim_end_matches('`'))
        .unwrap_or_else(|| panic!("the log names the SDP file: {err}"));
    assert!(
        !Path::new(sdp).exists(),
        "{sdp} outlived the stream it describes"
    );
}

/// A viewer that stops reading is dropped within the write timeout (5 s)
/// plus a frame or two, and idle sockets never keep `/metrics` from a scrape.
#[test]
fn a_stuck_viewer_is_dropped_in_seconds_and_idle_sockets_never_starve_scrapes() {
    let run = Run::start(&[]);
    wait_frames(&run.addr, 3);
    let mut stuck = TcpStream::connect(&run.addr).unwrap();
    write!(stuck, "GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let start = Instant::now();
    while status(&run.addr)["viewers"] != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the viewer never counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let attached = Instant::now();
    while status(&run.addr)["viewers"] != 0 {
        assert!(
            attached.elapsed() < Duration::from_secs(8),
            "a viewer that reads nothing still held after {:?}",
            attached.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(stuck);
    // Twenty idle sockets opened again and again while scraping: every
    // scrape is answered.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (addr, stop) = (run.addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if held.len() == 20 {
                    held.remove(0);
                }
                held.push(TcpStream::connect(&addr).unwrap());
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let answered = (0..40)
        .filter(|_| {
            std::thread::sleep(Duration::from_millis(25));
            get(&run.addr, "/metrics").0 == 200
        })
        .count();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    churn.join().unwrap();
    assert_eq!(answered, 40, "scrapes answered while idle sockets churn");
}

/// An RTSP server that refuses the connection fails its output at once:
/// the log, `/status`, `/metrics` and the summary say so while the run
/// goes on, and the run ends non-zero.
#[test]
fn a_failed_stream_output_is_reported_while_the_run_goes_on() {
    if !common::have_ffmpeg() {
        return;
    }
    // Port 1 on loopback: nothing listens there.
    let url = "rtsp://127.0.0.1:1/refused";
    let run = Run::start(&["--output", url]);
    let start = Instant::now();
    let errors = loop {
        let st = status(&run.addr);
        let e = st["output_errors"].as_array().unwrap().clone();
        if !e.is_empty() {
            break e;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no output error in /status after 60 s: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(errors[0].as_str().unwrap().contains(url), "{errors:?}");
    assert_eq!(metrics(&run.addr)["ersm_output_errors_total"], 1.0);
    // Inference goes on without the output.
    let before = status(&run.addr)["frames"].as_u64().unwrap();
    wait_frames(&run.addr, before + 5);
    let (code, out, err) = run.interrupt();
    assert!(
        !code.success(),
        "a failed output ends the run non-zero:\n{out}"
    );
    assert!(out.contains("output failed") && out.contains(url), "{out}");
    assert!(err.contains("no more frames sent there"), "{err}");
}

/// The browser test's tools, or why they are missing.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let find = |names: &[&str]| {
        names.iter().find_map(|n| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join(n))
                .find(|p| p.is_file())
        })
    };
    let chromium = find(&["chromium", "chromium-browser", "google-chrome"]);
    let driver = find(&["chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        _ => {
            assert!(
                std::env::var("ERSM_REQUIRE_BROWSER").as_deref() != Ok("1"),
                "chromium and chromedriver are required (ERSM_REQUIRE_BROWSER=1) but not found"
            );
            println!("SKIPPED: chromium or chromedriver not found (Debian: apt install chromium chromium-driver)");
            None
        }
    }
}

/// A WebDriver command: method, path, JSON body; the `value` of the answer.
fn webdriver(port: u16, method: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let (code, _, out) = request(
        &format!("127.0.0.1:{port}"),
        format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(code, 200, "{method} {path}: {v}");
    v["value"].clone()
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|&c| c != b'=' && c != b'\n')
        .map(val)
        .collect();
    bytes
        .chunks(4)
        .flat_map(|c| {
            let n = c.iter().fold(0u32, |n, &v| n << 6 | v as u32) << (6 * (4 - c.len()));
            n.to_be_bytes()[1..c.len()].to_vec()
        })
        .collect()
}

/// What the browser test reads off the page: the viewer's own counters, the
/// live image's decoded width, and where the image and the plots are.
const SCRIPT: &str = "const r = (id) => { const b = document.getElementById(id).getBoundingClientRect(); \
    return {x: b.x, y: b.y, width: b.width, height: b.height}; }; \
    return [window.ersmViewer, document.getElementById('live').naturalWidth, r('live'), r('latency'), r('keepplot')];";

#[test]
fn headless_chromium_draws_the_live_image_and_the_plots() {
    let Some((chromium, driver)) = browser() else {
        return;
    };
    let run = Run::start(&[]);
    let addr = run.addr.clone();
    wait_frames(&addr, 3);
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut chromedriver = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "chromedriver did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let caps = serde_json::json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
        "binary": chromium,
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,960", "--hide-scrollbars"],
    }}}});
    let session = webdriver(port, "POST", "/session", &caps)["sessionId"]
        .as_str()
        .unwrap()
        .to_string();
    let s = format!("/session/{session}");
    webdriver(
        port,
        "POST",
        &format!("{s}/url"),
        &serde_json::json!({"url": format!("http://{addr}/")}),
    );
    // Wait until the page has polled /status a few times and drawn points.
    let start = Instant::now();
    let state = loop {
        let v = webdriver(
            port,
            "POST",
            &format!("{s}/execute/sync"),
            &serde_json::json!({"script": SCRIPT, "args": []}),
        );
        if v[0]["polls"].as_u64().unwrap_or(0) >= 4 && v[1].as_u64().unwrap_or(0) > 0 {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "the page never showed the run: {v}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(state[1], 768, "the live image is the frame: {state}");
    assert!(state[0]["points"].as_u64().unwrap() > 10, "{state}");
    let png = base64_decode(
        webdriver(
            port,
            "GET",
            &format!("{s}/screenshot"),
            &serde_json::Value::Null,
        )
        .as_str()
        .unwrap(),
    );
    let _ = request(
        &format!("127.0.0.1:{port}"),
        format!("DELETE {s} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let _ = chromedriver.kill();
    let _ = chromedriver.wait();
    let shot = image::load_from_memory(&png).unwrap().to_rgb8();
    // Kept for a person to look at, overwritten by the next run.
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("live-viewer.png");
    shot.save(&out).unwrap();
    println!("screenshot: {}", out.display());
    // Each element's region of the screenshot, as the page laid it out.
    let region = |i: usize| {
        let r = &state[i];
        let f = |k: &str| r[k].as_f64().unwrap().max(0.0) as u32;
        let (x, y) = (f("x"), f("y"));
        let w = f("width").min(shot.width().saturating_sub(x));
        let h = f("height").min(shot.height().saturating_sub(y));
        assert!(
            w > 50 && h > 50,
            "element {i} is not on the screenshot: {r}"
        );
        image::imageops::crop_imm(&shot, x, y, w, h).to_image()
    };
    let count = |img: &image::RgbImage, rgb: [u8; 3]| {
        img.pixels()
            .filter(|p| (0..3).all(|k| (p[k] as i32 - rgb[k] as i32).abs() <= 12))
            .count()
    };
    // The live image: not blank, with the overlay's kept-token outlines.
    let live = region(2);
    let mean = live.pixels().map(|p| p[1] as f64).sum::<f64>() / live.pixels().len() as f64;
    let var = live
        .pixels()
        .map(|p| (p[1] as f64 - mean).powi(2))
        .sum::<f64>()
        / live.pixels().len() as f64;
    assert!(
        var > 100.0,
        "live image blank (variance {var:.0}) in {}",
        out.display()
    );
    assert!(
        outline_pixels(&live) > 500,
        "no outlines in the live image, {}",
        out.display()
    );
    // The plots: ERSM orange and dense blue latency lines, keep green line,
    // in the page's CSS colours.
    let (latency, keep) = (region(3), region(4));
    for (what, img, rgb) in [
        ("ERSM latency line", &latency, [0xff, 0x8c, 0x1a]),
        ("dense latency line", &latency, [0x4e, 0xa1, 0xff]),
        ("keep ratio line", &keep, [0x3e, 0xcf, 0x6e]),
    ] {
        let n = count(img, rgb);
        assert!(n > 100, "{what}: {n} pixels in {}", out.display());
    }
    let (status, out, err) = run.interrupt();
    assert!(status.success() && out.contains("interrupted"), "{err}");
}

#[test]
fn an_output_path_writes_overlays_and_a_missing_ffmpeg_names_its_package() {
    let dir = Scratch::path("live", "out");
    let o = ersm(&["--output", &dir.to_string_lossy(), "--max-frames", "3"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pngs = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(pngs, 3);
    // The caption is drawn in: white text pixels in the top band.
    let img = image::open(dir.join("frame_000001.png")).unwrap().to_rgb8();
    let white = image::imageops::crop_imm(&img, 0, 0, img.width(), 40)
        .to_image()
        .pixels()
        .filter(|p| p.0 == [255, 255, 255])
        .count();
    assert!(white > 200, "no caption text: {white} white pixels");

    // --output twice, beside --overlay: every one of them gets every frame.
    let dirs: Vec<Scratch> = (0..3)
        .map(|i| Scratch::path("live", &format!("multi{i}")))
        .collect();
    let names: Vec<String> = dirs
        .iter()
        .map(|d| d.to_string_lossy().into_owned())
        .collect();
    let o = ersm(&[
        "--output",
        &names[0],
        "--output",
        &names[1],
        "--overlay",
        &names[2],
        "--max-frames",
        "3",
    ])
    .stdin(Stdio::null())
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for d in &dirs {
        assert_eq!(std::fs::read_dir(d).unwrap().count(), 3, "{}", d.display());
    }

    // No ffmpeg on PATH: an RTP output fails before the first frame, naming
    // the package to install.
    let empty = Scratch::dir("live", "nopath");
    let o = ersm(&["--output", "rtp://127.0.0.1:5004", "--max-frames", "3"])
        .env("PATH", &empty)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("apt install ffmpeg"), "{err}");
}

/// Whether something listens on this loopback TCP port (read from
/// /proc/net/tcp, so the listener's one connection is not spent on asking).
fn listening(port: u16) -> bool {
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&format!(":{port:04X}")) && f[3] == "0A"
        })
    })
}

#[test]
fn rtsp_output_publishes_a_stream_a_player_can_record() {
    if !common::have_ffmpeg() {
        return;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("rtsp://127.0.0.1:{port}/ersm");
    let file = Scratch::path("live", "rtsp.mkv");
    // ffmpeg as the RTSP server that takes the published stream and records it.
    let mut server = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-rtsp_flags",
            "listen",
        ])
        .args(["-i", &url, "-c", "copy"])
        .arg(&file)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !listening(port) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "ffmpeg did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = ersm(&["--output", &url, "--max-frames", "40"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let start = Instant::now();
    while server.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the recording did not end with the stream"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args([
            "-show_entries",
            "stream=codec_name,width,height,nb_read_frames",
        ])
        .args(["-of", "csv=p=0"])
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&probe.stdout);
    let fields: Vec<&str> = text.trim().split(',').collect();
    assert_eq!(&fields[..3], ["h264", "768", "576"], "{text}");
    // The painter skips frames it has no time for: with the other tests
    // of this binary running beside it on two cores, 2 of 40 got through
    // once. A player recording any H.264 frame of the right size is what
    // this checks.
    let frames: usize = fields[3].parse().unwrap();
    assert!(frames >= 1, "{frames} frames recorded");
}
