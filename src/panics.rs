//! Panics as errors. A panic inside a dependency (tract, openh264) or ersm is
//! caught where a frame, a model load or a command ends and becomes an error
//! naming what failed; the user never sees a backtrace, and a stream goes on
//! past a frame that panicked.

use anyhow::{anyhow, Result};
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    /// The last panic's message and location on this thread (set by the hook).
    static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Replaces the default panic printout (message, location, backtrace hint)
/// with a record that [`catch`] turns into the error message.
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = match info.payload().downcast_ref::<&str>() {
            Some(s) => (*s).to_string(),
            None => info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "unknown cause".into()),
        };
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        log::debug!("panic: {msg}{at}");
        LAST.with(|l| *l.borrow_mut() = Some(format!("{msg}{at}")));
    }));
}

/// Runs `f`; a panic inside it becomes an error "`what`: internal error (…)".
pub fn catch<T>(what: impl FnOnce() -> String, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = LAST.with(|l| l.borrow_mut().take()).unwrap_or_else(|| {
                payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown cause".into())
            });
            Err(anyhow!("{}: internal error (a panic: {msg})", what()))
        }
    }
}
