//! H.264 MP4 files decoded in-process (openh264 built from source), so the
//! bundled clip plays with no system package.

use super::mp4::Mp4H264;
use super::{Frame, Source};
use anyhow::{anyhow, Result};
use openh264::decoder::Decoder;
use openh264::formats::YUVSource;
use std::path::{Path, PathBuf};

/// Frames of an H.264 MP4 file.
pub struct Mp4Source {
    path: PathBuf,
    file_name: String,
    mp4: Mp4H264,
    decoder: Decoder,
    next: usize,
    packet: Vec<u8>,
}

impl Mp4Source {
    /// Opens and indexes the file; the first frame is decoded on `next_frame`.
    pub fn open(path: &Path) -> Result<Mp4Source> {
        let mp4 = Mp4H264::open(path)?;
        let decoder =
            Decoder::new().map_err(|e| anyhow!("video {}: H.264 decoder: {e}", path.display()))?;
        Ok(Mp4Source {
            path: path.to_path_buf(),
            file_name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            mp4,
            decoder,
            next: 0,
            packet: Vec::new(),
        })
    }
}

impl Source for Mp4Source {
    fn next_frame(&mut self) -> Result<Option<Frame>> {
        // A sample may decode to no picture (decoder still buffering): feed on.
        while self.next < self.mp4.len() {
            let i = self.next;
            self.next += 1;
            self.mp4.sample_annexb(i, &mut self.packet)?;
            if i == 0 {
                let mut first = self.mp4.parameter_sets_annexb();
                first.extend_from_slice(&self.packet);
                self.packet = first;
            }
            let decoded = self.decoder.decode(&self.packet).map_err(|e| {
                anyhow!(
                    "video {}: frame {}: corrupt H.264 data ({e})",
                    self.path.display(),
                    i + 1
                )
            })?;
            if let Some(yuv) = decoded {
                let (width, height) = yuv.dimensions();
                let mut rgb = vec![0u8; width * height * 3];
                yuv.write_rgb8(&mut rgb);
                return Ok(Some(Frame {
                    name: format!("{}#{}", self.file_name, i + 1),
                    width,
                    height,
                    rgb,
                }));
            }
        }
        Ok(None)
    }

    fn describe(&self) -> String {
        format!(
            "{} (H.264 {}×{}, {} frames, {:.1} fps, decoded in-process)",
            self.path.display(),
            self.mp4.width,
            self.mp4.height,
            self.mp4.len(),
            self.mp4.fps
        )
    }

    fn frame_count(&self) -> Option<usize> {
        Some(self.mp4.len())
    }

    fn fps(&self) -> f64 {
        self.mp4.fps
    }

    fn size(&self) -> Option<(usize, usize)> {
        Some((self.mp4.width, self.mp4.height))
    }
}
