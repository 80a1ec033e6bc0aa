//! A panic becomes an error naming what failed, with the panic's message and
//! location, and the caller goes on.

use ersm::panics::{catch, install_hook};

#[test]
fn a_panic_is_an_error_naming_the_frame() {
    install_hook();
    let r: anyhow::Result<u32> = catch(|| "frame 7".into(), || panic!("index out of range"));
    let e = format!("{:#}", r.unwrap_err());
    assert!(
        e.starts_with("frame 7: internal error (a panic: index out of range"),
        "{e}"
    );
    assert!(e.contains("tests/panics.rs"), "the location is kept: {e}");
    // The next call is unaffected.
    assert_eq!(catch(|| "frame 8".into(), || Ok(8)).unwrap(), 8);
    let r: anyhow::Result<()> = catch(|| "frame 9".into(), || anyhow::bail!("plain error"));
    assert_eq!(format!("{:#}", r.unwrap_err()), "plain error");
}
