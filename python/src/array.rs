//! Frames between numpy and ersm: an `H × W × 3` uint8 array is read in
//! place when it is C-contiguous RGB; BGR (OpenCV's order) is swapped into
//! a copy. Anything else is a `TypeError` or `ValueError` saying what was
//! given and what would do.

use numpy::ndarray::Array3;
use numpy::prelude::*;
use numpy::{dtype, PyArray3, PyReadonlyArray3, PyUntypedArray};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// A frame's pixels, borrowed from numpy or swapped into a copy.
pub enum Pixels<'py> {
    Borrowed(PyReadonlyArray3<'py, u8>),
    Owned(Vec<u8>),
}

impl Pixels<'_> {
    /// `height × width × 3` bytes, row-major RGB.
    pub fn rgb(&self) -> &[u8] {
        match self {
            // Contiguity was checked when the frame was read.
            Pixels::Borrowed(a) => a.as_slice().unwrap_or(&[]),
            Pixels::Owned(v) => v,
        }
    }
}

/// A frame as ersm reads it: its pixels and size.
pub struct FrameIn<'py> {
    pub pixels: Pixels<'py>,
    pub width: usize,
    pub height: usize,
}

/// Reads `obj` as an `H × W × 3` uint8 frame (`bgr`: channels in OpenCV's
/// order). The largest side ersm takes is the CLI's (16384).
pub fn frame<'py>(obj: &Bound<'py, PyAny>, bgr: bool) -> PyResult<FrameIn<'py>> {
    let any = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "frame: expected a numpy array of H×W×3 uint8, got {}",
            type_name(obj)
        ))
    })?;
    let py = obj.py();
    if !any.dtype().is_equiv_to(&dtype::<u8>(py)) {
        return Err(PyTypeError::new_err(format!(
            "frame: expected dtype uint8, got {} (convert with frame.astype(numpy.uint8) if the values are 0-255)",
            any.dtype()
        )));
    }
    let shape = any.shape().to_vec();
    if shape.len() != 3 || shape[2] != 3 {
        return Err(PyValueError::new_err(format!(
            "frame: expected shape (H, W, 3), got {shape:?}"
        )));
    }
    let (height, width) = (shape[0], shape[1]);
    let max = ersm::source::MAX_FRAME_SIDE;
    if height == 0 || width == 0 || height > max || width > max {
        return Err(PyValueError::new_err(format!(
            "frame: {width}×{height} pixels; each side must be 1 to {max}"
        )));
    }
    if !any.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "frame: the array is not C-contiguous (a slice or a transposed view); pass numpy.ascontiguousarray(frame)",
        ));
    }
    let typed = any.cast::<PyArray3<u8>>()?;
    let ro = typed
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("frame: {e}")))?;
    let pixels = if bgr {
        let mut v = ro
            .as_slice()
            .map_err(|e| PyValueError::new_err(format!("frame: {e}")))?
            .to_vec();
        for px in v.chunks_exact_mut(3) {
            px.swap(0, 2);
        }
        Pixels::Owned(v)
    } else {
        Pixels::Borrowed(ro)
    };
    Ok(FrameIn {
        pixels,
        width,
        height,
    })
}

/// An owned RGB buffer as an `H × W × 3` numpy array, without a copy.
pub fn to_numpy(py: Python<'_>, rgb: Vec<u8>, width: usize, height: usize) -> PyResult<Py<PyAny>> {
    let a = Array3::from_shape_vec((height, width, 3), rgb)
        .map_err(|e| PyValueError::new_err(format!("frame of {width}×{height}: {e}")))?;
    Ok(PyArray3::from_owned_array(py, a).into_any().unbind())
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "an object".into())
}
