//! An overlay writer on its own thread, fed through a bounded queue, so
//! that an output never holds inference up: a frame that finds the queue
//! full is dropped (and counted), an encoder that stops reading is killed
//! when the output ends, and a failure is kept to be reported.

use crate::overlay::{OverlayWriter, FINISH_LIMIT};
use crate::source::Stopper;
use anyhow::{Context, Result};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One picture: `height × width × 3` RGB bytes, width, height.
type Picture = (Vec<u8>, usize, usize);

/// A writer running on its own thread.
pub struct Relay {
    /// The option that named it and where it goes, for messages.
    target: String,
    tx: Option<SyncSender<Picture>>,
    thread: Option<JoinHandle<Result<()>>>,
    stop: Stopper,
    dropped: u64,
}

impl Relay {
    /// Starts `writer` on a thread taking up to `depth` pictures ahead;
    /// `label` (`--overlay`, `--output`) names it in messages.
    pub fn start(label: &str, mut writer: OverlayWriter, depth: usize) -> Result<Relay> {
        let target = format!("{label} {}", writer.target());
        let stop = writer.stopper();
        let (tx, rx) = sync_channel::<Picture>(depth.max(1));
        let thread = std::thread::Builder::new()
            .name("ersm-output".into())
            .spawn(move || -> Result<()> {
                for (rgb, w, h) in rx {
                    // An error drops the receiver: later sends see it closed.
                    writer.write(&rgb, w, h)?;
                }
                writer.finish()
            })
            .context("starting an output thread")?;
        Ok(Relay {
            target,
            tx: Some(tx),
            thread: Some(thread),
            stop,
            dropped: 0,
        })
    }

    /// Where it writes, as the summary names it.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Hands a picture over without waiting; false once the writer has
    /// failed (`finish` says why). A full queue drops the picture.
    pub fn send(&mut self, picture: Picture) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        match tx.try_send(picture) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.dropped += 1;
                true
            }
            Err(TrySendError::Disconnected(_)) => {
                self.tx = None;
                false
            }
        }
    }

    /// Pictures dropped because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Ends the output: the queue drains, the file or stream is finished.
    /// A writer that has not ended `FINISH_LIMIT` plus a few seconds later
    /// (an encoder that stopped reading) is stopped. Returns what failed.
    pub fn finish(mut self) -> Option<String> {
        drop(self.tx.take());
        let thread = self.thread.take()?;
        let deadline = Instant::now() + FINISH_LIMIT + Duration::from_secs(5);
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let stalled = !thread.is_finished();
        if stalled {
            (self.stop)();
        }
        match thread.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) if stalled => Some(format!(
                "{}: the writer stalled and was stopped ({e:#})",
                self.target
            )),
            Ok(Err(e)) => Some(format!("{}: {e:#}", self.target)),
            Err(_) => Some(format!("{}: output thread panicked", self.target)),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            drop(self.tx.take());
            if !t.is_finished() {
                (self.stop)();
            }
            let _ = t.join();
        }
    }
}
