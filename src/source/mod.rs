//! Frame sources. For now: still images from files and folders.

pub mod images;

/// One decoded RGB frame.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Where it came from (file name), for logs and errors.
    pub name: String,
    pub width: usize,
    pub height: usize,
    /// `height × width × 3` bytes, row-major RGB.
    pub rgb: Vec<u8>,
}
