//! The newest encoded overlay the HTTP server hands to viewers: published
//! by the painter, waited for by MJPEG streams and snapshot requests, and
//! encoded only while someone wants it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long `/frame.jpg` waits for a fresh frame.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(3);
/// A frame older than this is not served as the current one.
const SNAPSHOT_FRESH: Duration = Duration::from_secs(1);

/// The newest encoded overlay, and whether anyone wants one: the painter
/// encodes JPEGs only while a viewer is connected or a snapshot was asked for.
#[derive(Default)]
pub struct Frames {
    latest: Mutex<Latest>,
    fresh: Condvar,
    /// MJPEG streams being served.
    pub(super) viewers: AtomicUsize,
    closed: AtomicBool,
}

#[derive(Default)]
struct Latest {
    generation: u64,
    jpeg: Option<(Arc<Vec<u8>>, Instant)>,
    snapshot_asked: Option<Instant>,
}

/// What waiting for a frame gave.
pub(super) enum Wait {
    Frame(u64, Arc<Vec<u8>>),
    TimedOut,
    Closed,
}

impl Frames {
    /// Whether a JPEG of the next frame would be read by anyone.
    pub fn wanted(&self) -> bool {
        if self.viewers.load(Ordering::Relaxed) > 0 {
            return true;
        }
        let l = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        l.snapshot_asked
            .is_some_and(|t| t.elapsed() < SNAPSHOT_WAIT)
    }

    /// Makes `jpeg` the newest frame and wakes the viewers.
    pub fn publish(&self, jpeg: Vec<u8>) {
        let mut l = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        l.generation += 1;
        l.jpeg = Some((Arc::new(jpeg), Instant::now()));
        l.snapshot_asked = None;
        drop(l);
        self.fresh.notify_all();
    }

    /// No more frames: viewers' streams end.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.fresh.notify_all();
    }

    /// The first frame newer than `generation`, waiting at most `timeout`.
    pub(super) fn wait_newer(&self, generation: u64, timeout: Duration) -> Wait {
        let deadline = Instant::now() + timeout;
        let mut l = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Wait::Closed;
            }
            if l.generation > generation {
                if let Some((jpeg, _)) = &l.jpeg {
                    return Wait::Frame(l.generation, jpeg.clone());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Wait::TimedOut;
            }
            l = self
                .fresh
                .wait_timeout(l, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A frame at most `SNAPSHOT_FRESH` old, asking the painter for one if
    /// there is none.
    pub(super) fn snapshot(&self) -> Option<Arc<Vec<u8>>> {
        let generation = {
            let mut l = self.latest.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((jpeg, at)) = &l.jpeg {
                if at.elapsed() < SNAPSHOT_FRESH {
                    return Some(jpeg.clone());
                }
            }
            l.snapshot_asked = Some(Instant::now());
            l.generation
        };
        match self.wait_newer(generation, SNAPSHOT_WAIT) {
            Wait::Frame(_, jpeg) => Some(jpeg),
            Wait::TimedOut | Wait::Closed => None,
        }
    }
}
