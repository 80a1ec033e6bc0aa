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
        bail!("image source {}: not found", path.display());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("image source {}: cannot list", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("image source {}: no PNG or JPEG files", path.display());
    }
    Ok(files)
}

/// Decodes one image file to RGB8; the error names the file.
pub fn load(path: &Path) -> Result<Frame> {
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
