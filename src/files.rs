//! Input files must be regular files: a FIFO would block a read for ever, and
//! a directory or a device would be read as nonsense.

use anyhow::{bail, Context, Result};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Fails unless `path` is (or links to) a regular file; `what` names it in the error.
pub fn ensure_regular(path: &Path, what: &str) -> Result<()> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("{what} {}: cannot open", path.display()))?;
    let t = meta.file_type();
    if t.is_file() {
        return Ok(());
    }
    let kind = if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    bail!("{what} {}: is {kind}, not a regular file", path.display())
}

/// Why `path` cannot be used, in the system's words ("No such file or
/// directory", "Too many levels of symbolic links"), for an error message.
pub fn why_missing(path: &Path) -> String {
    match std::fs::metadata(path) {
        Err(e) => e.to_string(),
        Ok(_) => "not a file or folder ersm can read".into(),
    }
}

/// Creates (or truncates) the output file `path` now, so that a missing
/// folder or a read-only place fails before the work instead of after it.
pub fn ensure_writable(path: &Path, what: &str) -> Result<()> {
    std::fs::File::create(path)
        .map(drop)
        .with_context(|| format!("{what} {}: cannot write", path.display()))
}

/// The variable naming a folder that holds the bundled `models/` (the
/// Python package sets it to its own copy).
pub const DATA_VAR: &str = "ERSM_DATA";

/// A bundled path such as `models/mobilenet_v2_ersm`: as given, relative to
/// the working directory, when it is there; else under `$ERSM_DATA`; else
/// beside the crate that built this library.
pub fn bundled(rel: &str) -> PathBuf {
    let here = PathBuf::from(rel);
    if here.exists() {
        return here;
    }
    if let Some(dir) = std::env::var_os(DATA_VAR) {
        let there = Path::new(&dir).join(rel);
        if there.exists() {
            return there;
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}
