//! `ersm._ersm`: the Python extension. `Net` loads a model package and
//! processes numpy frames; `VideoSource` and `VideoOutput` read and write
//! streams by the CLI's URIs; `cli` runs the command line itself. The
//! Python package (`ersm/__init__.py`) re-exports these with their stubs.

mod array;
mod net;
mod video;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    _ersm,
    Error,
    PyException,
    "What ersm could not do: a bad model package, a frame it cannot read, a source or output that failed. The message is the command line's."
);

/// An ersm failure as a Python exception carrying the CLI's message (the
/// whole chain of context, as `error: …` prints it).
pub(crate) fn error(e: anyhow::Error) -> PyErr {
    Error::new_err(format!("{e:#}"))
}

/// Runs the `ersm` command line with `argv` (without the program name) and
/// returns its exit status; `python -m ersm` calls it.
#[pyfunction]
fn cli(py: Python<'_>, argv: Vec<String>) -> i32 {
    let args = std::iter::once("ersm".to_string()).chain(argv);
    py.detach(move || ersm::cli::main(args))
}

#[pymodule]
fn _ersm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("Error", m.py().get_type::<Error>())?;
    m.add_function(wrap_pyfunction!(cli, m)?)?;
    m.add_class::<net::Net>()?;
    m.add_class::<net::Result>()?;
    m.add_class::<net::Class>()?;
    m.add_class::<net::Face>()?;
    m.add_class::<net::Dense>()?;
    m.add_class::<video::VideoSource>()?;
    m.add_class::<video::VideoOutput>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
