//! The device memory a GPU suffix reuses frame after frame, and its step
//! launches, recorded once per input address. Every launch is sized for its
//! level's positions and reads the token counts in device memory, so one
//! frame's launches are every frame's: after the first, a frame allocates
//! nothing and the host only replays the list.

use super::device::Device;
use super::frame::FrameLayout;
use super::DeviceTokens;
use crate::sparse::launch::{Launch, Pool};
use crate::sparse::value::Shape;
use anyhow::Result;

/// Each output's shape and the pool buffer holding it (`None` when it is
/// the input: a suffix with no steps).
pub(super) type Outputs = Vec<(Shape, Option<usize>)>;

/// The launches of every step for one input address, and where the outputs
/// lie.
pub(super) struct Recorded {
    /// Address of the gathered rows the first step reads.
    pub rows: u64,
    pub launches: Vec<Launch>,
    pub outputs: Outputs,
}

/// A device-path frame (sets, rulebooks, steps) captured as one graph, for
/// the kept list and rows at these addresses, and where its output lies
/// (the graph holds the addresses it was captured with).
pub(super) struct Captured<G> {
    pub rows: u64,
    pub tokens: DeviceTokens,
    pub graph: G,
    pub outputs: Outputs,
}

/// Appends `item`, keeping the newest few: lists keyed by buffer addresses,
/// which move only when the energy kernel's buffers are reallocated
/// (another feature map shape).
pub(super) fn keep_newest<T>(list: &mut Vec<T>, item: T) {
    if list.len() >= 4 {
        list.remove(0);
    }
    list.push(item);
}

/// The buffers of a frame, allocated at the first one, and the frames
/// captured as graphs (`G`, the device's graph).
pub(super) struct Workspace<B, G> {
    /// Index map and token list of every level (sets layout).
    pub sets: B,
    /// Every rulebook's table (tables layout).
    pub tables: B,
    /// Each level's token count, one `u32` each.
    pub counts: B,
    /// Gathered rows from the host: level 0's positions × C.
    pub input: B,
    /// A kept list from the host and its count, laid out as the energy
    /// kernel leaves them.
    pub kept: B,
    pub kept_count: B,
    /// The prefix maps the suffix reads (its taps), written every frame.
    pub taps: Vec<B>,
    /// A stream's held flags and gate shifts (the layout's stream buffer),
    /// written when a frame's differ from none.
    pub stream: B,
    /// True while `stream` holds no held flag and no shift.
    pub stream_clear: bool,
    /// The steps' outputs, with each buffer's length.
    pub pool: Vec<(B, usize)>,
    /// The step launches recorded so far, one list per input address.
    pub recorded: Vec<Recorded>,
    /// Device-path frames captured so far, one per pair of addresses.
    pub graphs: Vec<Captured<G>>,
    /// Whether to capture frames (off once the device has said it does not).
    pub capture: bool,
}

impl<B, G> Workspace<B, G> {
    /// Allocates the frame buffers of `layout` for `channels`-wide rows and
    /// prefix maps of `taps` values each.
    pub fn new<D: Device<Buf = B, Graph = G>>(
        device: &D,
        layout: &FrameLayout,
        channels: usize,
        taps: &[usize],
    ) -> Result<Workspace<B, G>> {
        let all = layout.positions[0];
        // Zeros: no frame has held anything yet.
        let mut stream = device.alloc(layout.stream_len)?;
        device.write(&mut stream, 0, &vec![0.0; layout.stream_len.max(1)])?;
        Ok(Workspace {
            stream,
            stream_clear: true,
            sets: device.alloc(layout.sets_len)?,
            tables: device.alloc(layout.tables_len.max(1))?,
            counts: device.alloc(layout.positions.len())?,
            input: device.alloc(all * channels)?,
            kept: device.alloc(all)?,
            kept_count: device.alloc(1)?,
            taps: taps
                .iter()
                .map(|&n| device.alloc(n))
                .collect::<Result<_>>()?,
            pool: Vec::new(),
            recorded: Vec::new(),
            graphs: Vec::new(),
            capture: true,
        })
    }
}

/// Hands out the pool's buffers while a frame's launches are recorded:
/// values whose lives do not overlap share one, as launches run in order
/// on one stream and a buffer is rewritten only after its last reader.
pub(super) struct Recorder<'a, D: Device> {
    device: &'a D,
    pool: &'a mut Vec<(D::Buf, usize)>,
    busy: Vec<bool>,
}

impl<'a, D: Device> Recorder<'a, D> {
    /// A recorder drawing on `pool`, all of it free.
    pub fn new(device: &'a D, pool: &'a mut Vec<(D::Buf, usize)>) -> Recorder<'a, D> {
        let busy = vec![false; pool.len()];
        Recorder { device, pool, busy }
    }

    /// Buffer `i` is read no more by later steps.
    pub fn release(&mut self, i: usize) {
        self.busy[i] = false;
    }
}

impl<D: Device> Pool for Recorder<'_, D> {
    fn alloc(&mut self, n: usize) -> Result<(u64, usize)> {
        let n = n.max(1);
        let fits = (0..self.pool.len())
            .filter(|&i| !self.busy[i] && self.pool[i].1 >= n)
            .min_by_key(|&i| self.pool[i].1);
        let i = match fits {
            Some(i) => i,
            None => {
                self.pool.push((self.device.alloc(n)?, n));
                self.busy.push(false);
                self.pool.len() - 1
            }
        };
        self.busy[i] = true;
        Ok((self.device.ptr(&self.pool[i].0), i))
    }
}
