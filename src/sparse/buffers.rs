//! Value buffers recycled across frames: a step's output comes from a free list
//! that the plan refills with values no longer read, so once a few frames have
//! passed the suffix allocates no buffer per op.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Free buffers kept at most (more than a suffix ever holds at once).
const KEEP: usize = 32;

/// A free list of `f32` buffers, shared by the frames one plan runs.
#[derive(Debug, Default)]
pub struct Buffers {
    free: Mutex<Vec<Vec<f32>>>,
    fresh: AtomicU64,
}

impl Buffers {
    /// A zero-filled buffer of `len` values: the smallest free one that fits,
    /// else a new one (rounded up to a power of two, so that frames whose
    /// keep ratio differs a little still find it again).
    pub fn take(&self, len: usize) -> Vec<f32> {
        let mut v = self.find(len);
        v.clear();
        v.resize(len, 0.0);
        v
    }

    /// A buffer of `len` values for an op that writes every one before
    /// reading any: what it holds is left from an earlier step, zeroed only
    /// where it grows. Zero-filling every output was 1–2 % of a frame's
    /// samples (`ersm bench`, CenterFace), all of it overwritten.
    pub fn take_for_writing(&self, len: usize) -> Vec<f32> {
        let mut v = self.find(len);
        if v.len() >= len {
            v.truncate(len);
        } else {
            v.resize(len, 0.0);
        }
        v
    }

    /// The smallest free buffer whose capacity fits `len` (of those, one
    /// already that long if there is one), else a new one.
    fn find(&self, len: usize) -> Vec<f32> {
        let found = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| (b.len() < len, b.capacity()))
                .map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        };
        found.unwrap_or_else(|| {
            self.fresh.fetch_add(1, Ordering::Relaxed);
            Vec::with_capacity(len.next_power_of_two())
        })
    }

    /// Returns a buffer to the free list.
    pub fn give(&self, v: Vec<f32>) {
        if v.capacity() == 0 {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < KEEP {
            free.push(v);
        } else if let Some(small) = free.iter_mut().min_by_key(|b| b.capacity()) {
            // Keep the larger of the two: it serves more requests.
            if small.capacity() < v.capacity() {
                *small = v;
            }
        }
    }

    /// Buffers allocated since the plan was built (free-list misses).
    pub fn fresh(&self) -> u64 {
        self.fresh.load(Ordering::Relaxed)
    }
}
