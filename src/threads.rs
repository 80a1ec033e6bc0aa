//! The worker threads a run computes on. One rayon pool, created once, serves
//! tract (as its executor, for the prefix and the dense baseline) and the sparse
//! suffix (token rows split across it), so neither oversubscribes the other.

use anyhow::{Context, Result};
use rayon::prelude::*;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
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

    /// Runs `f` with tract's matrix products and the sparse ops on these
    /// threads, the other threads kept awake ([`team`]) until it returns.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            None => multithread_tract_scope(Executor::SingleThread, f),
            Some(pool) => {
                let exec = Executor::MultiThread(pool.clone());
                pool.install(|| multithread_tract_scope(exec, || team(f)))
            }
        }
    }
}

/// Calls `f(first_row, rows)` on contiguous chunks of `out` (rows of `width`
/// values), in parallel when called inside [`Threads::install`] with more than
/// one thread: on the [`team`]'s spinning threads inside one, else through
/// rayon. Every row is computed by the same code whatever the chunking, so
/// results do not depend on the thread count.
pub fn par_rows<F>(out: &mut [f32], width: usize, min_rows: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let rows = out.len().checked_div(width).unwrap_or(0);
    let threads = pool_threads();
    // Inside a team's chunk, a nested call runs on its own thread: the team is
    // busy with the outer job.
    if threads <= 1 || rows < 2 * min_rows.max(1) || IN_CHUNK.with(Cell::get) {
        f(0, out);
        return;
    }
    let team = TEAM.with(Cell::get);
    let chunk = rows.div_ceil(threads).max(min_rows);
    if team.is_null() {
        out.par_chunks_mut(chunk * width)
            .enumerate()
            .for_each(|(i, c)| f(i * chunk, c));
        return;
    }
    let (base, len) = (SendPtr(out.as_mut_ptr()), out.len());
    let run = |i: usize| {
        let start = i * chunk * width;
        let n = (chunk * width).min(len - start);
        // SAFETY: chunk i covers out[start..start + n], inside `out`, and
        // each chunk index is run exactly once, so no two calls alias.
        let rows = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
        f(i * chunk, rows)
    };
    // SAFETY: TEAM is set only while its team lives (inside `team`, on
    // this thread).
    unsafe { &*team }.run(rows.div_ceil(chunk), &run);
}

/// Threads of the pool the caller runs on; 1 outside any pool (rayon's
/// global pool is never used).
pub(crate) fn pool_threads() -> usize {
    match rayon::current_thread_index() {
        Some(_) => rayon::current_num_threads(),
        None => 1,
    }
}

/// A raw pointer that may cross to the team's threads: each touches only
/// the part it claimed (a chunk of `par_rows`, a band of rows).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: every user writes disjoint parts through it, and waits for all
// (`par_rows`: disjoint chunks).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    /// The team the calling thread leads, while [`team`] runs.
    static TEAM: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
    /// Whether this thread is running one of a team's chunks.
    static IN_CHUNK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the other threads of the current pool held awake, taking
/// [`par_rows`]'s chunks and any rayon job (tract's) as soon as it appears:
/// a frame runs dozens of parallel steps of 0.05–0.3 ms, and a rayon worker
/// that has gone to sleep between two of them takes longer to wake than a
/// step lasts (on this project's 2-core VMs, a 140 µs step split in two
/// through rayon took 140 µs; handed to a spinning thread, 59). The threads
/// are woken once, spin through `f` (yielding the core now and then), and go
/// back to the pool when it returns. Outside a pool of two or more threads,
/// or inside a team already, `f` just runs.
pub fn team<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let threads = pool_threads();
    if threads <= 1 || !TEAM.with(Cell::get).is_null() {
        return f();
    }
    let team = Team::default();
    rayon::scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| team.help());
        }
        // Stops the helpers however `f` ends, a panic included.
        struct Lead<'a>(&'a Team);
        impl Drop for Lead<'_> {
            fn drop(&mut self) {
                TEAM.with(|t| t.set(std::ptr::null()));
                self.0.stop.store(true, Ordering::Release);
            }
        }
        let _lead = Lead(&team);
        TEAM.with(|t| t.set(&team));
        f()
    })
}

/// Jobs handed to spinning threads: the lead publishes one (a chunk count and
/// a closure on its stack), everyone claims chunk indices until none is left,
/// and the lead waits for the last one to finish before it returns.
#[derive(Default)]
struct Team {
    /// `generation << 40 | chunks << 20 | next chunk to claim`.
    claim: AtomicU64,
    /// The current job's closure: a `*const &(dyn Fn(usize) + Sync)`.
    job: AtomicPtr<()>,
    /// Chunks of the current job not finished yet.
    pending: AtomicUsize,
    stop: AtomicBool,
    /// The first panic of a chunk, raised again on the lead once every chunk
    /// of the job has ended (the closure lives on the lead's stack until then).
    panic: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

const FIELD: u64 = (1 << 20) - 1;
/// A helper idle this long starts to nap: a CPU frame's serial stretches
/// (the energy layer, 0.3–0.4 ms) stay under it, GPU stages do not.
const NAP_AFTER: std::time::Duration = std::time::Duration::from_millis(1);
/// How long a napping helper sleeps between looks for work.
const NAP: std::time::Duration = std::time::Duration::from_micros(100);

impl Team {
    /// Runs `f(0..chunks)` across the team; returns when all have run.
    fn run(&self, chunks: usize, f: &(dyn Fn(usize) + Sync)) {
        if chunks as u64 > FIELD {
            return (0..chunks).for_each(f);
        }
        let job: *const &(dyn Fn(usize) + Sync) = &f;
        self.job.store(job as *mut (), Ordering::Relaxed);
        self.pending.store(chunks, Ordering::Relaxed);
        let generation = (self.claim.load(Ordering::Relaxed) >> 40) + 1;
        self.claim
            .store(generation << 40 | (chunks as u64) << 20, Ordering::Release);
        while self.claim_one() {}
        while self.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        let panic = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
    }

    /// Claims and runs one chunk of the current job; false when none is left.
    fn claim_one(&self) -> bool {
        let mut cur = self.claim.load(Ordering::Acquire);
        loop {
            let (chunks, next) = ((cur >> 20) & FIELD, cur & FIELD);
            if next >= chunks {
                return false;
            }
            match self.claim.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    // SAFETY: a chunk of this job is claimed and not yet
                    // finished, so the lead is still waiting in `run` and
                    // `job` is this job's closure.
                    let f = unsafe {
                        *(self.job.load(Ordering::Acquire) as *const &(dyn Fn(usize) + Sync))
                    };
                    IN_CHUNK.with(|c| c.set(true));
                    let ran =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(next as usize)));
                    IN_CHUNK.with(|c| c.set(false));
                    if let Err(p) = ran {
                        let mut first = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                        first.get_or_insert(p);
                    }
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                    return true;
                }
                Err(now) => cur = now,
            }
        }
    }

    /// A helper's loop: claim chunks as jobs appear, until the lead stops.
    fn help(&self) {
        // The lead can pick its own helper job off its deque if something in
        // `f` waits on rayon; spinning there would wait for itself.
        if std::ptr::eq(TEAM.with(Cell::get), self) {
            return;
        }
        let mut idle = 0u32;
        let mut idle_since = std::time::Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            // The team's chunks first, then any rayon job the pool has
            // (tract's, in the prefix): an awake thread takes both at once.
            if self.claim_one() || rayon::yield_now() == Some(rayon::Yield::Executed) {
                idle = 0;
                continue;
            }
            if idle == 0 {
                idle_since = std::time::Instant::now();
            }
            idle = idle.wrapping_add(1);
            if !idle.is_multiple_of(1024) {
                std::hint::spin_loop();
            } else if idle_since.elapsed() < NAP_AFTER {
                std::thread::yield_now();
            } else {
                // A long wait (a GPU stage, say): nap instead of burning the
                // core, at the cost of up to a nap's delay when work returns.
                std::thread::sleep(NAP);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row r of a `width`-wide buffer holds r·1000 + column, however it was split.
    fn fill(out: &mut [f32], width: usize, min_rows: usize) {
        par_rows(out, width, min_rows, |first, rows| {
            for (i, row) in rows.chunks_exact_mut(width).enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = ((first + i) * 1000 + j) as f32;
                }
            }
        });
    }

    /// `f`'s result, or a failure (not a hung test) when it deadlocks.
    fn within<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .expect("the team did not finish within 60 s")
    }

    fn expected(rows: usize, width: usize) -> Vec<f32> {
        (0..rows * width)
            .map(|k| ((k / width) * 1000 + k % width) as f32)
            .collect()
    }

    #[test]
    fn a_team_runs_every_chunk_once_job_after_job() {
        for n in [2, 3, 4] {
            within(move || {
                let threads = Threads::new(n).unwrap();
                threads.install(|| {
                    team(|| {
                        for job in 0..2000 {
                            let (rows, width) = (1 + job % 97, 1 + job % 5);
                            let mut out = vec![f32::NAN; rows * width];
                            fill(&mut out, width, 1 + job % 3);
                            assert_eq!(out, expected(rows, width), "job {job} on {n} threads");
                        }
                    })
                })
            });
        }
    }

    #[test]
    fn nested_rows_inside_a_chunk_run_on_its_thread() {
        let out = within(|| {
            Threads::new(3).unwrap().install(|| {
                team(|| {
                    let mut out = vec![0.0f32; 64 * 8];
                    par_rows(&mut out, 8, 1, |first, rows| {
                        // An inner split of this chunk's rows, as a one-row GEMM
                        // inside a conv chunk does.
                        par_rows(rows, 8, 1, |inner, sub| {
                            for (i, row) in sub.chunks_exact_mut(8).enumerate() {
                                for (j, v) in row.iter_mut().enumerate() {
                                    *v = ((first + inner + i) * 1000 + j) as f32;
                                }
                            }
                        });
                    });
                    out
                })
            })
        });
        assert_eq!(out, expected(64, 8));
    }

    #[test]
    fn a_panic_in_any_chunk_reaches_the_caller_after_every_chunk_ends() {
        // Two threads, 64 rows: chunks start at rows 0 and 32.
        for bad in [0, 1] {
            let caught = within(move || {
                let threads = Threads::new(2).unwrap();
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    threads.install(|| {
                        let mut out = vec![0.0f32; 64];
                        par_rows(&mut out, 1, 8, |first, _| {
                            assert!(first != bad * 32, "chunk {bad} fails");
                            std::thread::sleep(std::time::Duration::from_millis(20));
                        });
                    })
                }))
                .is_err()
            });
            assert!(caught, "the panic of chunk {bad} was lost");
        }
    }

    #[test]
    fn a_panic_in_a_team_reaches_the_caller_and_the_pool_goes_on() {
        let threads = Threads::new(2).unwrap();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            threads.install(|| team(|| panic!("inside the team")))
        }));
        assert!(caught.is_err());
        let mut out = vec![0.0f32; 40 * 3];
        threads.install(|| team(|| fill(&mut out, 3, 1)));
        assert_eq!(out, expected(40, 3));
    }
}
