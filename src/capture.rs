//! Capture in its own thread, handing frames over through a bounded queue:
//! live sources drop the oldest frame when inference falls behind, files
//! block the reader instead, so nothing is lost.

use crate::source::{Frame, Source, Stopper};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// What a full queue does with a new frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Drop the oldest queued frame (live sources, `--drop-frames`).
    DropOldest,
    /// Wait for room (files).
    Block,
}

/// Why the stream ended.
#[derive(Debug)]
pub enum End {
    /// The source reached its end.
    Finished,
    /// The source failed; the message names it.
    Failed(anyhow::Error),
}

/// What the consumer gets.
#[derive(Debug)]
pub enum Next {
    Frame(Frame),
    /// No frame within the timeout; the source may still deliver.
    Timeout,
    /// The stream is over (all queued frames were delivered first).
    End(End),
}

struct State {
    frames: VecDeque<Frame>,
    dropped: u64,
    skipped: u64,
    end: Option<End>,
}

/// A bounded frame queue between one producer and one consumer.
pub struct Queue {
    state: Mutex<State>,
    capacity: usize,
    policy: Policy,
    ready: Condvar,
    room: Condvar,
}

impl Queue {
    /// A queue of `capacity` frames (at least 1).
    pub fn new(capacity: usize, policy: Policy) -> Queue {
        Queue {
            state: Mutex::new(State {
                frames: VecDeque::new(),
                dropped: 0,
                skipped: 0,
                end: None,
            }),
            capacity: capacity.max(1),
            policy,
            ready: Condvar::new(),
            room: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a frame; returns false when the consumer has closed the queue.
    pub fn push(&self, frame: Frame, closed: &AtomicBool) -> bool {
        let mut s = self.lock();
        while s.frames.len() >= self.capacity {
            if closed.load(Ordering::SeqCst) {
                return false;
            }
            match self.policy {
                Policy::DropOldest => {
                    s.frames.pop_front();
                    s.dropped += 1;
                }
                Policy::Block => {
                    s = self
                        .room
                        .wait_timeout(s, Duration::from_millis(100))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        s.frames.push_back(frame);
        self.ready.notify_one();
        true
    }

    /// Marks the end of the stream.
    pub fn finish(&self, end: End) {
        let mut s = self.lock();
        s.end.get_or_insert(end);
        self.ready.notify_all();
    }

    /// Takes the next frame, waiting up to `timeout`.
    pub fn pop(&self, timeout: Duration) -> Next {
        let mut s = self.lock();
        if s.frames.is_empty() && s.end.is_none() {
            s = self
                .ready
                .wait_timeout_while(s, timeout, |s| s.frames.is_empty() && s.end.is_none())
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if let Some(f) = s.frames.pop_front() {
            self.room.notify_one();
            return Next::Frame(f);
        }
        match s.end.take() {
            Some(end) => {
                // Later pops see a finished stream rather than a fresh wait.
                s.end = Some(End::Finished);
                Next::End(end)
            }
            None => Next::Timeout,
        }
    }

    /// Frames dropped so far.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Inputs the source skipped so far (files it could not decode).
    pub fn skipped(&self) -> u64 {
        self.lock().skipped
    }

    /// Adds `n` to the inputs the source skipped.
    pub fn add_skipped(&self, n: u64) {
        self.lock().skipped += n;
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.lock().frames.len()
    }

    /// True when no frame waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A source read by a background thread.
pub struct Capture {
    /// The frames it has read.
    pub queue: Arc<Queue>,
    closed: Arc<AtomicBool>,
    /// The current source's stopper (replaced on reconnect).
    stopper: Arc<Mutex<Option<Stopper>>>,
}

/// How to re-open a live source after it fails (`--reconnect`).
pub type Reopen = Box<dyn FnMut() -> anyhow::Result<Box<dyn Source>> + Send>;

impl Capture {
    /// Starts reading `source` into a queue of `capacity` frames. With
    /// `reopen`, a failed or ended source is opened again (once a second)
    /// until that succeeds or the capture is closed.
    pub fn start(
        mut source: Box<dyn Source>,
        capacity: usize,
        policy: Policy,
        mut reopen: Option<Reopen>,
    ) -> std::io::Result<Capture> {
        let queue = Arc::new(Queue::new(capacity, policy));
        let closed = Arc::new(AtomicBool::new(false));
        let stopper = Arc::new(Mutex::new(source.stopper()));
        let (q, c, st) = (queue.clone(), closed.clone(), stopper.clone());
        std::thread::Builder::new()
            .name("capture".into())
            .spawn(move || loop {
                let end = loop {
                    if c.load(Ordering::SeqCst) {
                        return;
                    }
                    let before = source.skipped();
                    let next = crate::panics::catch(|| "source".into(), || source.next_frame());
                    q.add_skipped(source.skipped().saturating_sub(before));
                    match next {
                        Ok(Some(frame)) => {
                            if !q.push(frame, &c) {
                                return;
                            }
                        }
                        Ok(None) => break End::Finished,
                        Err(e) => break End::Failed(e),
                    }
                };
                let Some(reopen) = reopen.as_mut() else {
                    q.finish(end);
                    return;
                };
                match &end {
                    End::Failed(e) => log::warn!("{e:#}; reconnecting"),
                    End::Finished => log::warn!("stream ended; reconnecting"),
                }
                loop {
                    if c.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                    match reopen() {
                        Ok(s) => {
                            log::info!("reconnected: {}", s.describe());
                            *st.lock().unwrap_or_else(|p| p.into_inner()) = s.stopper();
                            source = s;
                            break;
                        }
                        Err(e) => log::debug!("reconnect failed: {e:#}"),
                    }
                }
            })?;
        Ok(Capture {
            queue,
            closed,
            stopper,
        })
    }

    /// Makes a stalled source fail (its subprocess is killed), so that a
    /// capture with a reopen function starts it again.
    pub fn restart(&self) {
        if let Some(stop) = &*self.stopper.lock().unwrap_or_else(|p| p.into_inner()) {
            stop();
        }
    }

    /// Stops reading: the thread ends at its next frame, and a subprocess
    /// it waits on is killed. A read blocked on standard input is left to
    /// end with the process.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.restart();
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.close();
    }
}
