//! Input files must be regular files: a FIFO would block a read for ever, and
//! a directory or a device would be read as nonsense.

use anyhow::{bail, Context, Result};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

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
