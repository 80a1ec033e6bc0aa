//! USB/UVC cameras through native V4L2: mmap streaming, YUYV or MJPEG.
//! The ioctl structures are the 64-bit Linux layouts (x86_64, aarch64).

use super::convert::{mjpeg_to_rgb, yuyv_to_rgb};
use super::{Frame, Source, SourceOptions};
use anyhow::{bail, Result};
use std::path::Path;

/// Four-character pixel format code.
const fn fourcc(c: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*c)
}

/// Packed 4:2:2.
pub const YUYV: u32 = fourcc(b"YUYV");
/// Motion-JPEG.
pub const MJPG: u32 = fourcc(b"MJPG");

/// Name of a fourcc, for messages.
pub fn fourcc_name(f: u32) -> String {
    String::from_utf8_lossy(&f.to_le_bytes()).into_owned()
}

#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
mod sys {
    //! Structures and requests from `linux/videodev2.h`.

    #[repr(C)]
    pub struct Capability {
        pub driver: [u8; 16],
        pub card: [u8; 32],
        pub bus_info: [u8; 32],
        pub version: u32,
        pub capabilities: u32,
        pub device_caps: u32,
        pub reserved: [u32; 3],
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct PixFormat {
        pub width: u32,
        pub height: u32,
        pub pixelformat: u32,
        pub field: u32,
        pub bytesperline: u32,
        pub sizeimage: u32,
        pub colorspace: u32,
        pub priv_: u32,
        pub flags: u32,
        pub ycbcr_enc: u32,
        pub quantization: u32,
        pub xfer_func: u32,
    }

    /// `struct v4l2_format`: the union holds pointers, so it is 8-aligned.
    #[repr(C)]
    pub struct Format {
        pub type_: u32,
        pub _pad: u32,
        pub pix: PixFormat,
        pub _rest: [u8; 200 - 48],
    }

    #[repr(C)]
    pub struct RequestBuffers {
        pub count: u32,
        pub type_: u32,
        pub memory: u32,
        pub capabilities: u32,
        pub flags: u8,
        pub reserved: [u8; 3],
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct Timecode {
        pub type_: u32,
        pub flags: u32,
        pub frames: u8,
        pub seconds: u8,
        pub minutes: u8,
        pub hours: u8,
        pub userbits: [u8; 4],
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct Buffer {
        pub index: u32,
        pub type_: u32,
        pub bytesused: u32,
        pub flags: u32,
        pub field: u32,
        pub timestamp: libc::timeval,
        pub timecode: Timecode,
        pub sequence: u32,
        pub memory: u32,
        /// `m.offset` for mmap buffers (the union is 8 bytes).
        pub offset: u64,
        pub length: u32,
        pub reserved2: u32,
        pub request_fd: u32,
    }

    #[repr(C)]
    pub struct Fract {
        pub numerator: u32,
        pub denominator: u32,
    }

    #[repr(C)]
    pub struct StreamParm {
        pub type_: u32,
        pub capability: u32,
        pub capturemode: u32,
        pub timeperframe: Fract,
        pub extendedmode: u32,
        pub readbuffers: u32,
        pub _rest: [u8; 200 - 24],
    }

    const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | ((b'V' as u64) << 8) | nr
    }
    const R: u64 = 2;
    const W: u64 = 1;
    pub const QUERYCAP: u64 = ioc(R, 0, std::mem::size_of::<Capability>());
    pub const S_FMT: u64 = ioc(R | W, 5, std::mem::size_of::<Format>());
    pub const REQBUFS: u64 = ioc(R | W, 8, std::mem::size_of::<RequestBuffers>());
    pub const QUERYBUF: u64 = ioc(R | W, 9, std::mem::size_of::<Buffer>());
    pub const QBUF: u64 = ioc(R | W, 15, std::mem::size_of::<Buffer>());
    pub const DQBUF: u64 = ioc(R | W, 17, std::mem::size_of::<Buffer>());
    pub const STREAMON: u64 = ioc(W, 18, std::mem::size_of::<i32>());
    pub const STREAMOFF: u64 = ioc(W, 19, std::mem::size_of::<i32>());
    pub const G_PARM: u64 = ioc(R | W, 21, std::mem::size_of::<StreamParm>());
    pub const S_PARM: u64 = ioc(R | W, 22, std::mem::size_of::<StreamParm>());

    pub const BUF_TYPE_VIDEO_CAPTURE: u32 = 1;
    pub const MEMORY_MMAP: u32 = 1;
    pub const CAP_VIDEO_CAPTURE: u32 = 0x1;
    pub const CAP_STREAMING: u32 = 0x0400_0000;
    pub const CAP_DEVICE_CAPS: u32 = 0x8000_0000;
    pub const FIELD_ANY: u32 = 0;

    const _: () = assert!(std::mem::size_of::<Format>() == 208);
    const _: () = assert!(std::mem::size_of::<Buffer>() == 88);
    const _: () = assert!(std::mem::size_of::<StreamParm>() == 204);
    const _: () = assert!(std::mem::size_of::<Capability>() == 104);
}

/// Buffers the driver fills in turn.
const BUFFERS: u32 = 4;

/// An open, streaming V4L2 capture device.
pub struct V4l2Source {
    path: String,
    card: String,
    fd: i32,
    width: usize,
    height: usize,
    stride: usize,
    format: u32,
    fps: f64,
    /// (address, length) of each mmap'd buffer.
    maps: Vec<(*mut libc::c_void, usize)>,
    count: usize,
}

// SAFETY: the mmap'd buffers belong to this source alone and are only
// touched by the thread that owns it.
unsafe impl Send for V4l2Source {}

#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn ioctl<T>(fd: i32, req: u64, arg: &mut T) -> std::io::Result<()> {
    loop {
        // SAFETY: `arg` is the structure `req` is defined with (sizes are
        // checked at compile time above).
        let r = unsafe { libc::ioctl(fd, req as _, arg as *mut T) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
impl V4l2Source {
    /// Opens `path`, negotiates a mode (MJPEG first above 640×480, where USB 2
    /// bandwidth makes YUYV slow; YUYV otherwise) and starts streaming.
    pub fn open(path: &Path, opts: &SourceOptions) -> Result<V4l2Source> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let name = path.display().to_string();
        if !path.exists() {
            bail!("camera {name}: no such device (is it plugged in? `ls /dev/video*` lists the cameras)");
        }
        let c = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: a NUL-terminated path.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            bail!(
                "camera {name}: cannot open: {}",
                std::io::Error::last_os_error()
            );
        }
        let mut src = V4l2Source {
            path: name.clone(),
            card: String::new(),
            fd,
            width: 0,
            height: 0,
            stride: 0,
            format: 0,
            fps: 0.0,
            maps: Vec::new(),
            count: 0,
        };
        src.setup(opts)
            .map_err(|e| e.context(format!("camera {name}")))?;
        Ok(src)
    }

    fn setup(&mut self, opts: &SourceOptions) -> Result<()> {
        // SAFETY (all `zeroed` below): plain-old-data ioctl structures.
        let mut cap: sys::Capability = unsafe { std::mem::zeroed() };
        ioctl(self.fd, sys::QUERYCAP, &mut cap)
            .map_err(|e| anyhow::anyhow!("not a V4L2 device ({e})"))?;
        let caps = if cap.capabilities & sys::CAP_DEVICE_CAPS != 0 {
            cap.device_caps
        } else {
            cap.capabilities
        };
        self.card = cstr(&cap.card);
        if caps & sys::CAP_VIDEO_CAPTURE == 0 || caps & sys::CAP_STREAMING == 0 {
            bail!("'{}' is not a streaming video capture device", self.card);
        }
        let (w, h) = if opts.width > 0 && opts.height > 0 {
            (opts.width as u32, opts.height as u32)
        } else {
            (1280, 720)
        };
        let order = if w * h > 640 * 480 {
            [MJPG, YUYV]
        } else {
            [YUYV, MJPG]
        };
        let mut granted = None;
        for f in order {
            let mut fmt: sys::Format = unsafe { std::mem::zeroed() };
            fmt.type_ = sys::BUF_TYPE_VIDEO_CAPTURE;
            fmt.pix.width = w;
            fmt.pix.height = h;
            fmt.pix.pixelformat = f;
            fmt.pix.field = sys::FIELD_ANY;
            if ioctl(self.fd, sys::S_FMT, &mut fmt).is_ok() && fmt.pix.pixelformat == f {
                granted = Some(fmt.pix);
                break;
            }
        }
        let Some(pix) = granted else {
            bail!("'{}' offers neither YUYV nor MJPEG", self.card);
        };
        self.width = pix.width as usize;
        self.height = pix.height as usize;
        self.format = pix.pixelformat;
        self.stride = (pix.bytesperline as usize).max(self.width * 2);
        if opts.fps > 0.0 {
            let mut parm: sys::StreamParm = unsafe { std::mem::zeroed() };
            parm.type_ = sys::BUF_TYPE_VIDEO_CAPTURE;
            parm.timeperframe = sys::Fract {
                numerator: 1000,
                denominator: (opts.fps * 1000.0).round() as u32,
            };
            if let Err(e) = ioctl(self.fd, sys::S_PARM, &mut parm) {
                log::warn!("{}: cannot set {} fps: {e}", self.path, opts.fps);
            }
        }
        let mut parm: sys::StreamParm = unsafe { std::mem::zeroed() };
        parm.type_ = sys::BUF_TYPE_VIDEO_CAPTURE;
        if ioctl(self.fd, sys::G_PARM, &mut parm).is_ok() && parm.timeperframe.numerator > 0 {
            self.fps = parm.timeperframe.denominator as f64 / parm.timeperframe.numerator as f64;
        }
        let mut req = sys::RequestBuffers {
            count: BUFFERS,
            type_: sys::BUF_TYPE_VIDEO_CAPTURE,
            memory: sys::MEMORY_MMAP,
            capabilities: 0,
            flags: 0,
            reserved: [0; 3],
        };
        ioctl(self.fd, sys::REQBUFS, &mut req)
            .map_err(|e| anyhow::anyhow!("cannot get mmap buffers: {e}"))?;
        if req.count < 2 {
            bail!("driver granted {} buffers, need at least 2", req.count);
        }
        for i in 0..req.count {
            let mut buf = self.buffer(i);
            ioctl(self.fd, sys::QUERYBUF, &mut buf)
                .map_err(|e| anyhow::anyhow!("cannot query buffer {i}: {e}"))?;
            // SAFETY: maps the driver buffer at the offset the driver gave.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    buf.length as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    self.fd,
                    buf.offset as libc::off_t,
                )
            };
            if addr == libc::MAP_FAILED {
                bail!("cannot map buffer {i}: {}", std::io::Error::last_os_error());
            }
            self.maps.push((addr, buf.length as usize));
            ioctl(self.fd, sys::QBUF, &mut buf)
                .map_err(|e| anyhow::anyhow!("cannot queue buffer {i}: {e}"))?;
        }
        let mut t = sys::BUF_TYPE_VIDEO_CAPTURE as i32;
        ioctl(self.fd, sys::STREAMON, &mut t)
            .map_err(|e| anyhow::anyhow!("cannot start streaming: {e}"))?;
        log::info!(
            "{} '{}': granted {}×{} {} @ {:.1} fps ({} mmap buffers)",
            self.path,
            self.card,
            self.width,
            self.height,
            fourcc_name(self.format),
            self.fps,
            self.maps.len()
        );
        Ok(())
    }

    /// Waits for the next filled buffer, converts it and queues it again.
    /// The outer error ends the stream; the inner one is a corrupt frame.
    fn dequeue(&mut self) -> Result<Result<(Vec<u8>, usize, usize)>> {
        // Waits up to 5 s per frame: a camera that stops delivering is an error,
        // not a hang.
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, 5000) };
            if r > 0 {
                break;
            }
            if r == 0 {
                bail!("camera {}: no frame for 5 s", self.path);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                bail!("camera {}: poll failed: {e}", self.path);
            }
        }
        let mut buf = self.buffer(0);
        if let Err(e) = ioctl(self.fd, sys::DQBUF, &mut buf) {
            if e.raw_os_error() == Some(libc::ENODEV) {
                bail!(
                    "camera {} disconnected after {} frames",
                    self.path,
                    self.count
                );
            }
            bail!("camera {}: cannot dequeue a frame: {e}", self.path);
        }
        let (addr, len) = self.maps[buf.index as usize];
        // SAFETY: the driver filled `bytesused` bytes of this mapped buffer and
        // does not touch it until it is queued again below.
        let data = unsafe {
            std::slice::from_raw_parts(addr as *const u8, (buf.bytesused as usize).min(len))
        };
        let converted = match self.format {
            YUYV => yuyv_to_rgb(data, self.width, self.height, self.stride)
                .map(|rgb| (rgb, self.width, self.height)),
            _ => mjpeg_to_rgb(data),
        };
        let requeue = ioctl(self.fd, sys::QBUF, &mut buf);
        self.count += 1;
        if let Err(e) = requeue {
            bail!("camera {}: cannot re-queue buffer: {e}", self.path);
        }
        Ok(converted)
    }

    fn buffer(&self, index: u32) -> sys::Buffer {
        // SAFETY: plain-old-data.
        let mut b: sys::Buffer = unsafe { std::mem::zeroed() };
        b.index = index;
        b.type_ = sys::BUF_TYPE_VIDEO_CAPTURE;
        b.memory = sys::MEMORY_MMAP;
        b
    }
}

#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
impl Source for V4l2Source {
    fn next_frame(&mut self) -> Result<Option<Frame>> {
        loop {
            match self.dequeue()? {
                Ok((rgb, width, height)) => {
                    return Ok(Some(Frame {
                        name: format!("{}#{}", self.path, self.count),
                        width,
                        height,
                        rgb,
                    }))
                }
                // One corrupt frame from a USB camera is common; skip it loudly.
                Err(e) => {
                    log::warn!("camera {}: frame {}: {e:#}; skipped", self.path, self.count)
                }
            }
        }
    }

    fn size(&self) -> Option<(usize, usize)> {
        Some((self.width, self.height))
    }

    fn describe(&self) -> String {
        format!(
            "{} '{}' ({}×{} {} @ {:.1} fps, V4L2 mmap)",
            self.path,
            self.card,
            self.width,
            self.height,
            fourcc_name(self.format),
            self.fps
        )
    }

    fn is_live(&self) -> bool {
        true
    }

    fn fps(&self) -> f64 {
        self.fps
    }
}

#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
impl Drop for V4l2Source {
    fn drop(&mut self) {
        let mut t = sys::BUF_TYPE_VIDEO_CAPTURE as i32;
        let _ = ioctl(self.fd, sys::STREAMOFF, &mut t);
        for &(addr, len) in &self.maps {
            // SAFETY: unmapping what setup mapped.
            unsafe { libc::munmap(addr, len) };
        }
        // SAFETY: our own descriptor.
        unsafe { libc::close(self.fd) };
    }
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
impl V4l2Source {
    /// V4L2 exists on 64-bit Linux builds only.
    pub fn open(path: &Path, _opts: &SourceOptions) -> Result<V4l2Source> {
        bail!(
            "camera {}: V4L2 capture needs a 64-bit Linux build",
            path.display()
        )
    }
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
impl Source for V4l2Source {
    fn next_frame(&mut self) -> Result<Option<Frame>> {
        Ok(None)
    }
    fn describe(&self) -> String {
        self.path.clone()
    }
}
