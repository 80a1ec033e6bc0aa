//! The worker threads a run computes on. One rayon pool, created once, serves
//! tract (as its executor, for the prefix and the dense baseline) and the sparse
//! suffix (token rows split across it), so neither oversubscribes the other.

use anyhow::{Context, Result};
use rayon::prelude::*;
use std::sync::Arc;
use tract_linalg::multithread::{multithread_tract_scope, Executor};

/// The threads a pipeline runs on: the calling thread alone, or a pool.
#[derive(Clone, Debug, Default)]
pub struct Threads {
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl Threads {
    /// The calling thread only.
    pub fn single() -> Threads {
        Threads { pool: None }
    }

    /// `n` threads (1 means the calling thread only).
    pub fn new(n: usize) -> Result<Threads> {
        anyhow::ensure!(n >= 1, "thread count must be at least 1");
        if n == 1 {
            return Ok(Threads::single());
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("ersm-{i}"))
            .build()
            .with_context(|| format!("starting {n} worker threads"))?;
        Ok(Threads {
            pool: Some(Arc::new(pool)),
        })
    }

    /// Cores this process may use (affinity and cgroup limits included).
    pub fn available() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// Number of threads.
    pub fn count(&self) -> usize {
        self.pool.as_ref().map_or(1, |p| p.current_num_threads())
    }

    /// Runs `f` with tract's matrix products and the sparse ops on these threads.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            None => multithread_tract_scope(Executor::SingleThread, f),
            Some(pool) => {
                let exec = Executor::MultiThread(pool.clone());
                pool.install(|| multithread_tract_scope(exec, f))
            }
        }
    }
}

/// Calls `f(first_row, rows)` on contiguous chunks of `out` (rows of `width`
/// values), in parallel when called inside [`Threads::install`] with more than
/// one thread. Every row is computed by the same code whatever the chunking, so
/// results do not depend on the thread count.
pub fn par_rows<F>(out: &mut [f32], width: usize, min_rows: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let rows = out.len().checked_div(width).unwrap_or(0);
    let threads = if rayon::current_thread_index().is_some() {
        rayon::current_num_threads()
    } else {
        1
    };
    if threads <= 1 || rows < 2 * min_rows.max(1) {
        f(0, out);
        return;
    }
    let chunk = rows.div_ceil(threads).max(min_rows);
    out.par_chunks_mut(chunk * width)
        .enumerate()
        .for_each(|(i, c)| f(i * chunk, c));
}
