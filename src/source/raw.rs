//! rgb24 frames of a fixed size from a byte stream: standard input
//! (`raw://-?w=W&h=H`), or the stdout of an ffmpeg/GStreamer subprocess.

use super::{Frame, Source};
use anyhow::{bail, Result};
use std::io::{ErrorKind, Read};

/// Reads whole `width × height × 3` frames from a stream.
pub struct RawFrames<R> {
    reader: R,
    /// Names the stream in frame names and errors.
    pub label: String,
    pub width: usize,
    pub height: usize,
    count: usize,
}

/// How a frame read ended.
pub enum RawRead {
    Frame(Frame),
    /// The stream ended on a frame boundary.
    End,
    /// The stream ended inside a frame: `got` of the frame's bytes arrived.
    Partial {
        got: usize,
    },
}

impl<R: Read> RawFrames<R> {
    /// Frames of `width × height` from `reader`.
    pub fn new(reader: R, label: String, width: usize, height: usize) -> RawFrames<R> {
        RawFrames {
            reader,
            label,
            width,
            height,
            count: 0,
        }
    }

    /// Frames read so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes in one frame.
    pub fn frame_bytes(&self) -> usize {
        self.width * self.height * 3
    }

    /// Reads one frame; I/O errors other than end of stream are errors.
    pub fn read(&mut self) -> Result<RawRead> {
        let mut rgb = vec![0u8; self.frame_bytes()];
        let mut got = 0;
        while got < rgb.len() {
            match self.reader.read(&mut rgb[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => bail!(
                    "{}: read failed after {} frames: {e}",
                    self.label,
                    self.count
                ),
            }
        }
        if got == 0 {
            return Ok(RawRead::End);
        }
        if got < rgb.len() {
            return Ok(RawRead::Partial { got });
        }
        self.count += 1;
        Ok(RawRead::Frame(Frame {
            name: format!("{}#{}", self.label, self.count),
            width: self.width,
            height: self.height,
            rgb,
        }))
    }
}

/// rgb24 frames on standard input. Not live: the pipe's back-pressure paces
/// the writer, so nothing is dropped unless `--drop-frames` asks.
pub struct RawSource {
    frames: RawFrames<std::io::Stdin>,
}

impl RawSource {
    /// Frames of `width × height` from standard input.
    pub fn stdin(width: usize, height: usize) -> Result<RawSource> {
        Ok(RawSource {
            frames: RawFrames::new(std::io::stdin(), "stdin".into(), width, height),
        })
    }
}

impl Source for RawSource {
    fn next_frame(&mut self) -> Result<Option<Frame>> {
        match self.frames.read()? {
            RawRead::Frame(f) => Ok(Some(f)),
            RawRead::End => Ok(None),
            RawRead::Partial { got } => bail!(
                "stdin: truncated frame {}: got {got} of {} bytes ({}×{}×3 rgb24); is the frame size right?",
                self.frames.count() + 1,
                self.frames.frame_bytes(),
                self.frames.width,
                self.frames.height
            ),
        }
    }

    fn size(&self) -> Option<(usize, usize)> {
        Some((self.frames.width, self.frames.height))
    }

    fn describe(&self) -> String {
        format!("stdin (rgb24 {}×{})", self.frames.width, self.frames.height)
    }
}
