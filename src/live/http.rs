//! The embedded HTTP server of `--output http://HOST:PORT`: the viewer page
//! (`/`), the overlay as an MJPEG stream (`/stream.mjpg`) and as single
//! JPEGs (`/frame.jpg`), `/metrics` in Prometheus text format and `/status`
//! as JSON.
//!
//! Built on std's `TcpListener` with `httparse` for the request head rather
//! than on a server crate: tiny_http, the small synchronous one, sets no
//! socket timeouts and starts a thread for every connection, so a client
//! that connects and never reads would hold a thread for ever. Here every
//! socket has read and write timeouts, connections and MJPEG viewers are
//! capped, and nothing the server does makes the inference loop wait: it
//! only ever reads the newest frame and the statistics.

pub use super::frames::Frames;
use super::frames::Wait;
use super::stats::Stats;
use anyhow::{Context, Result};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// MJPEG viewers at once: each costs a JPEG encode a frame on the device.
pub const MAX_VIEWERS: usize = 4;
/// A request head larger than this is refused (431).
const MAX_HEAD: usize = 8 * 1024;
/// The request head must arrive within this, however slowly it trickles.
const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// A client that takes no bytes for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes the kernel may queue for one MJPEG viewer (a frame or two).
const VIEWER_SEND_BUFFER: usize = 64 * 1024;
/// The multipart boundary of the MJPEG stream.
const BOUNDARY: &str = "ersm-frame";

const VIEWER: &str = include_str!("viewer.html");

/// What the connection threads share.
struct Shared {
    stats: Arc<Mutex<Stats>>,
    frames: Arc<Frames>,
    stop: AtomicBool,
    connections: AtomicUsize,
    /// Connections that have not sent a byte yet, oldest first: when every
    /// place is taken, the oldest of them gives its place to a newcomer,
    /// so idle sockets cannot starve a scrape of `/metrics`.
    idle: Mutex<VecDeque<(u64, TcpStream)>>,
}

impl Shared {
    /// Frees the place of the oldest connection that has said nothing yet;
    /// false when every connection is busy.
    fn evict_idle(&self) -> bool {
        let oldest = self
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        match oldest {
            Some((_, s)) => {
                // Its read returns at once and its thread ends.
                let _ = s.shutdown(std::net::Shutdown::Both);
                true
            }
            None => false,
        }
    }

    /// Connection `id` has spoken (or ended): it keeps its place.
    fn not_idle(&self, id: u64) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(i, _)| *i != id);
    }
}

impl Shared {
    /// `render` of the statistics, with the process's memory read now.
    fn read_stats<T>(&self, render: impl FnOnce(&Stats) -> T) -> T {
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.set_rss_bytes(crate::report::rss_mib() * 1024.0 * 1024.0);
        render(&s)
    }
}

/// A bound listener, not yet serving (bound before the model loads, so a
/// port in use fails the run at once).
pub struct Bound {
    listener: TcpListener,
    addr: SocketAddr,
}

impl Bound {
    /// Binds `addr`; a port in use or an address not of this machine is an
    /// error naming the `--output`.
    pub fn bind(addr: SocketAddr, uri: &str) -> Result<Bound> {
        let listener = TcpListener::bind(addr).map_err(|e| match e.kind() {
            ErrorKind::AddrInUse => anyhow::anyhow!(
                "--output {uri}: port {} is already in use (another ersm, or another server); \
                 choose another port, or port 0 for any free one",
                addr.port()
            ),
            ErrorKind::AddrNotAvailable => anyhow::anyhow!(
                "--output {uri}: {} is not an address of this machine",
                addr.ip()
            ),
            ErrorKind::PermissionDenied => anyhow::anyhow!(
                "--output {uri}: not allowed to listen on port {} (ports below 1024 need privileges)",
                addr.port()
            ),
            _ => anyhow::anyhow!("--output {uri}: cannot listen on {addr}: {e}"),
        })?;
        let addr = listener.local_addr().context("listener address")?;
        Ok(Bound { listener, addr })
    }

    /// The address bound (with the real port when 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A running server; stops when finished or dropped.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts serving `stats` and `frames` on `bound`'s listener.
    pub fn start(bound: Bound, stats: Arc<Mutex<Stats>>, frames: Arc<Frames>) -> Result<Server> {
        let shared = Arc::new(Shared {
            stats,
            frames,
            stop: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            idle: Mutex::new(VecDeque::new()),
        });
        let s = shared.clone();
        let listener = bound.listener;
        let accept = std::thread::Builder::new()
            .name("ersm-http".into())
            .spawn(move || accept_loop(listener, s))
            .context("starting the HTTP server thread")?;
        Ok(Server {
            addr: bound.addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting; open streams end at their next frame. Connection
    /// threads are not waited for: each ends within its socket timeouts.
    pub fn finish(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.frames.close();
        if let Some(t) = self.accept.take() {
            // accept() blocks: a connection of our own wakes it.
            let wake = match self.addr {
                SocketAddr::V4(a) if a.ip().is_unspecified() => {
                    SocketAddr::from((Ipv4Addr::LOCALHOST, a.port()))
                }
                SocketAddr::V6(a) if a.ip().is_unspecified() => {
                    SocketAddr::from((Ipv6Addr::LOCALHOST, a.port()))
                }
                a => a,
            };
            if TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Decrements a counter when a connection (or a viewer) ends, however it ends.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let door = Door::start();
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors, say: back off instead of spinning.
                log::debug!("http accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        if shared.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS
            && !shared.evict_idle()
        {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            door.refuse(stream);
            continue;
        }
        next_id += 1;
        let id = next_id;
        if let Ok(clone) = stream.try_clone() {
            shared
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back((id, clone));
        }
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("ersm-http-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let _slot = Slot(&s.connections);
                if let Err(e) = serve(stream, &s, id) {
                    log::debug!("http: {e}");
                }
                s.not_idle(id);
            });
        if spawned.is_err() {
            shared.not_idle(id);
            shared.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Refused sockets held open, on one thread, long enough to close gently.
/// Dropping a socket whose request has not been read resets the
/// connection, and the client then sees a broken pipe or a reset instead
/// of the 503; reading in `accept_loop` itself would stall every other
/// client behind one slow one.
struct Door {
    held: Option<mpsc::SyncSender<TcpStream>>,
}

/// Sockets the door holds at once; beyond this they are dropped at once.
const DOOR_HELD: usize = 64;
/// How long a refused socket is drained before it is dropped.
const DOOR_LINGER: Duration = Duration::from_millis(500);

impl Door {
    fn start() -> Door {
        let (tx, rx) = mpsc::sync_channel(DOOR_HELD);
        let held = std::thread::Builder::new()
            .name("ersm-http-door".into())
            .stack_size(64 * 1024)
            .spawn(move || Door::drain(rx))
            .ok()
            .map(|_| tx);
        Door { held }
    }

    /// Answers 503 and hands the socket to the door thread to close.
    fn refuse(&self, mut stream: TcpStream) {
        let _ = respond(
            &mut stream,
            503,
            "text/plain",
            b"too many connections\n",
            false,
        );
        let _ = stream.shutdown(std::net::Shutdown::Write);
        if stream.set_nonblocking(true).is_ok() {
            if let Some(tx) = &self.held {
                let _ = tx.try_send(stream);
            }
        }
    }

    /// Reads and drops what each held socket's client still sends, closing
    /// it at end of stream or after `DOOR_LINGER`; ends with the accept loop.
    fn drain(rx: mpsc::Receiver<TcpStream>) {
        let mut held: Vec<(TcpStream, Instant)> = Vec::new();
        let mut sink = [0u8; 4096];
        loop {
            // Blocks while nothing is held, polls every 10 ms while something is.
            let next = if held.is_empty() {
                rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                rx.recv_timeout(Duration::from_millis(10))
            };
            match next {
                Ok(s) => held.push((s, Instant::now() + DOOR_LINGER)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) if held.is_empty() => return,
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
            }
            let now = Instant::now();
            held.retain_mut(|(s, until)| {
                if now >= *until {
                    return false;
                }
                loop {
                    match s.read(&mut sink) {
                        Ok(0) => return false,
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => return false,
                    }
                }
            });
        }
    }
}

/// A parsed request line.
struct Request {
    method: String,
    path: String,
}

/// Why a request head could not be read.
enum HeadError {
    /// The client closed before sending a request.
    Closed,
    Malformed,
    TooLarge,
    TimedOut,
    Io(std::io::Error),
}

/// Reads and parses the request head (the body, if any, is never read);
/// `spoke` is called at the first byte.
fn read_head(
    stream: &mut TcpStream,
    spoke: impl FnOnce(),
) -> std::result::Result<Request, HeadError> {
    let mut spoke = Some(spoke);
    let start = Instant::now();
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    loop {
        let left = HEAD_DEADLINE.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(HeadError::TimedOut);
        }
        stream.set_read_timeout(Some(left)).map_err(HeadError::Io)?;
        let n = match stream.read(&mut buf[len..]) {
            Ok(0) if len == 0 => return Err(HeadError::Closed),
            Ok(0) => return Err(HeadError::Malformed),
            Ok(n) => {
                if let Some(f) = spoke.take() {
                    f();
                }
                n
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(HeadError::TimedOut)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(HeadError::Io(e)),
        };
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                return Ok(Request {
                    method: req.method.unwrap_or_default().to_string(),
                    path: req.path.unwrap_or_default().to_string(),
                })
            }
            Ok(httparse::Status::Partial) if len == MAX_HEAD => return Err(HeadError::TooLarge),
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::Malformed),
        }
    }
}

/// Answers a request that is refused, then closes gently: what the client
/// still sends is read and dropped for a moment, so the close does not reset
/// the connection before the client has read why.
fn refuse(stream: &mut TcpStream, status: u16, why: &[u8]) -> std::io::Result<()> {
    respond(stream, status, "text/plain", why, false)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < 256 * 1024 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
    Ok(())
}

/// Serves one connection: one request, then close.
fn serve(mut stream: TcpStream, shared: &Shared, id: u64) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let req = match read_head(&mut stream, || shared.not_idle(id)) {
        Ok(r) => r,
        Err(HeadError::Closed) => return Ok(()),
        Err(HeadError::Malformed) => return refuse(&mut stream, 400, b"malformed request\n"),
        Err(HeadError::TooLarge) => return refuse(&mut stream, 431, b"request head too large\n"),
        Err(HeadError::TimedOut) => return refuse(&mut stream, 408, b"request timed out\n"),
        Err(HeadError::Io(e)) => return Err(e),
    };
    let head = match req.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => return refuse(&mut stream, 405, b"only GET and HEAD are served\n"),
    };
    let path = req.path.split(['?', '#']).next().unwrap_or("");
    match path {
        "/" | "/index.html" => respond(
            &mut stream,
            200,
            "text/html; charset=utf-8",
            VIEWER.as_bytes(),
            head,
        ),
        "/metrics" => {
            let text = shared.read_stats(Stats::prometheus);
            respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                text.as_bytes(),
                head,
            )
        }
        "/status" => {
            let doc = shared.read_stats(Stats::status);
            respond(
                &mut stream,
                200,
                "application/json",
                doc.to_string().as_bytes(),
                head,
            )
        }
        "/frame.jpg" => match shared.frames.snapshot() {
            Some(jpeg) => respond(&mut stream, 200, "image/jpeg", &jpeg, head),
            None => respond(
                &mut stream,
                503,
                "text/plain",
                b"no frame yet (or the run has ended)\n",
                head,
            ),
        },
        "/stream.mjpg" => stream_mjpeg(&mut stream, shared, head),
        "/favicon.ico" => respond(&mut stream, 204, "image/x-icon", b"", head),
        _ => respond(&mut stream, 404, "text/plain", b"not found\n", head),
    }
}

/// Writes all of `data` within `limit` in all: the socket's write timeout
/// bounds each write, and a client that takes a few bytes now and then
/// would otherwise restart it every time.
fn write_within(stream: &mut TcpStream, mut data: &[u8], limit: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + limit;
    while !data.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn set_send_buffer(stream: &TcpStream, bytes: usize) {
    use std::os::fd::AsRawFd;
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket and an int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        log::debug!("http: SO_SNDBUF: {}", std::io::Error::last_os_error());
    }
}

/// The overlay as `multipart/x-mixed-replace` JPEG parts, one per new frame,
/// until the client goes, stops reading (the write timeout) or the run ends.
fn stream_mjpeg(stream: &mut TcpStream, shared: &Shared, head: bool) -> std::io::Result<()> {
    let frames = &shared.frames;
    if frames.viewers.fetch_add(1, Ordering::SeqCst) >= MAX_VIEWERS {
        frames.viewers.fetch_sub(1, Ordering::SeqCst);
        let msg = format!("at most {MAX_VIEWERS} viewers at once\n");
        return respond(stream, 503, "text/plain", msg.as_bytes(), false);
    }
    let _viewer = Slot(&frames.viewers);
    // A small send buffer: a viewer that stops reading blocks the next
    // write within a frame or two, and WRITE_TIMEOUT then drops it, instead
    // of the kernel queueing seconds of frames first.
    set_send_buffer(stream, VIEWER_SEND_BUFFER);
    let set_viewers = || {
        let n = frames.viewers.load(Ordering::SeqCst);
        let mut s = shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.set_viewers(n);
    };
    set_viewers();
    let result = (|| {
        write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary={BOUNDARY}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        )?;
        if head {
            return Ok(());
        }
        let mut generation = 0;
        while !shared.stop.load(Ordering::SeqCst) {
            match frames.wait_newer(generation, Duration::from_secs(1)) {
                Wait::Frame(g, jpeg) => {
                    generation = g;
                    let mut part = format!(
                        "--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
                        jpeg.len()
                    )
                    .into_bytes();
                    part.extend_from_slice(&jpeg);
                    part.extend_from_slice(b"\r\n");
                    write_within(stream, &part, WRITE_TIMEOUT)?;
                }
                Wait::TimedOut => {}
                Wait::Closed => break,
            }
        }
        write!(stream, "--{BOUNDARY}--\r\n")
    })();
    drop(_viewer);
    set_viewers();
    result
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// A whole response, then the connection closes.
fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    head: bool,
) -> std::io::Result<()> {
    let allow = if status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    write!(
        stream,
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n{allow}Connection: close\r\n\r\n",
        reason(status),
        body.len()
    )?;
    if !head {
        stream.write_all(body)?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::stats::Info;

    fn get_status(addr: SocketAddr) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // In two writes with a pause, so a 503 and the close can come
        // between them: the second write must not meet a reset.
        c.write_all(b"GET /status HTTP/1.1\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        c.write_all(b"Host: x\r\n\r\n").unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn idle_sockets_give_way_and_busy_ones_send_the_rest_to_the_door() {
        let bound = Bound::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), "test").unwrap();
        let stats = Arc::new(Mutex::new(Stats::new(Info::default())));
        let server = Server::start(bound, stats, Arc::new(Frames::default())).unwrap();
        let addr = server.addr();
        // Silent clients fill every place, yet a scrape is served: the
        // oldest silent one gives its place up.
        let silent: Vec<_> = (0..MAX_CONNECTIONS + 4)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        for _ in 0..3 {
            let answer = get_status(addr);
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
        drop(silent);
        std::thread::sleep(Duration::from_millis(300));
        // Clients in the middle of a request keep their places: a newcomer
        // is refused at the door and reads why.
        let busy: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|_| {
                let mut c = TcpStream::connect(addr).unwrap();
                c.write_all(b"GET /sta").unwrap();
                c
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..3 {
            let answer = get_status(addr);
            assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
            assert!(answer.ends_with("too many connections\n"), "{answer}");
        }
        drop(busy);
    }
}
