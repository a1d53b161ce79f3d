//! The staging engine: device data copied through pinned host buffers in pipelined chunks and
//! carried by braid's own transports, so any braid transport serves device buffers (issue 14,
//! "Engines" item 2).
//!
//! Calls are stream-ordered as in NCCL: a call enqueues a job and returns at once; the job
//! starts only after everything enqueued earlier on the user's stream, and later work on the
//! user's stream waits for it. A `Stager` (one per communicator) owns a private
//! sub-communicator and one worker thread that runs the jobs in FIFO order, so every rank runs
//! them in the same order whatever host calls happen on the parent communicator.
//!
//! Per job, on the worker:
//! 1. at the call, the user's stream is *held*: its current end is captured (an event) and a
//!    host function that blocks until the worker releases it is enqueued after it;
//! 2. the internal copy queue waits for the captured point;
//! 3. pipeline over a ring of [`SLOTS`] pinned slots: device-to-host copies of chunk `i + K - 1`
//!    are enqueued before the host collective of chunk `i` runs (on the sub-communicator's
//!    blocking raw API, on the pinned slot), then the host-to-device copies of chunk `i`'s
//!    result; one in-order internal queue makes slot reuse safe (a slot's next device-to-host
//!    copy is queued after its last host-to-device copy), and a mark (event) after each chunk's
//!    device-to-host copies says when the host may touch the slot;
//! 4. a final mark is waited for (every result is in device memory) and the user's stream is
//!    released.
//!
//! How calls are cut into chunks: `plan` (elementwise collectives and point-to-point 1:1,
//! the rank-blocked collectives per block segment).
//!
//! Errors: the first error of a job is recorded as the sticky error (`Stager::error`); the
//! sub-communicator is aborted (peers fail fast instead of waiting for this rank); the held
//! stream is released; queued jobs fail at once (their streams released too) and later calls
//! return the error. A user stream is released on every path (success, error, worker panic,
//! drop): the hold is released by its `Drop`.
//!
//! The device side sits behind [`CopyEngine`]: [`CudaCopy`] (the CUDA driver) in production, a
//! host emulation in the tests, which run the pipeline's chunking and ordering logic on
//! machines without a GPU.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{DevPtr, DeviceP2p, Stream};
use crate::comm::{Communicator, RawColl, RawP2p};
use crate::error::{Error, Result};

mod cuda_copy;
pub(crate) mod plan;

#[cfg(test)]
pub(crate) mod host;
#[cfg(test)]
mod tests;

pub use cuda_copy::CudaCopy;
use plan::{HostOp, Plan, Step};

/// Pinned slots in the ring: while the host collective runs on one, the device-to-host copies
/// of the next `SLOTS - 1` chunks proceed.
pub const SLOTS: usize = 4;

/// The smallest chunk a `Stager` accepts (tests use it to run many chunks).
pub const MIN_CHUNK_BYTES: usize = 64;

/// `BRAID_STAGING_CHUNK_BYTES`'s default.
pub const DEFAULT_CHUNK_BYTES: usize = 4 << 20;

/// The chunk size from `BRAID_STAGING_CHUNK_BYTES` (default 4M; 4K to 1G).
///
/// Errors: [`Error::InvalidArgument`] naming the variable for a malformed or out-of-range
/// value.
pub fn chunk_bytes_from_env() -> Result<usize> {
    parse_chunk_bytes(crate::config::var("BRAID_STAGING_CHUNK_BYTES").as_deref())
}

/// Parses a `BRAID_STAGING_CHUNK_BYTES` value (`None` or empty: the default).
pub fn parse_chunk_bytes(v: Option<&str>) -> Result<usize> {
    let Some(s) = v.filter(|s| !s.trim().is_empty()) else {
        return Ok(DEFAULT_CHUNK_BYTES);
    };
    match crate::config::parse_bytes(s) {
        Some(b) if (4 << 10..=1 << 30).contains(&b) => Ok(b),
        _ => Err(Error::InvalidArgument(format!(
            "BRAID_STAGING_CHUNK_BYTES={s}: expected a byte size from 4K to 1G (e.g. 4M)"
        ))),
    }
}

/// Pinned (page-locked) host memory from [`CopyEngine::alloc_host`].
pub trait HostMemory: Send + Sync {
    /// The first byte.
    fn as_ptr(&self) -> *mut u8;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// True when empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A point of the internal queue (an event recorded after what was enqueued so far).
pub trait Mark: Send {
    /// Blocks until everything enqueued on the internal queue before the mark has completed.
    ///
    /// Errors: [`Error::Timeout`] at `deadline`; [`Error::Aborted`] as soon as `abort()` says
    /// true (it is polled); the device's error.
    fn wait(&self, deadline: Instant, abort: &dyn Fn() -> bool) -> Result<()>;
}

/// A user stream held at the point it had reached when the hold was made: work enqueued on
/// the stream later does not start before [`StreamHold::release`] (or the hold's drop, which
/// must release it: a held stream is never left blocked).
pub trait StreamHold: Send {
    /// Makes the internal queue wait (asynchronously) until the user stream has completed what
    /// was enqueued on it before the hold.
    fn wait_point(&self) -> Result<()>;
    /// Lets the user stream go on (idempotent).
    fn release(&self);
}

/// The device side of the staging engine: an in-order internal copy queue, pinned memory and
/// user-stream synchronisation. One engine serves one `Stager`, whose worker thread alone
/// enqueues on the internal queue; [`CopyEngine::hold`] is called from the application's
/// threads.
pub trait CopyEngine: Send + Sync {
    /// `len` bytes of pinned host memory (the copies' host side).
    fn alloc_host(&self, len: usize) -> Result<Box<dyn HostMemory>>;

    /// Holds `stream` at its current end (see [`StreamHold`]).
    fn hold(&self, stream: Stream) -> Result<Box<dyn StreamHold>>;

    /// Enqueues a copy of `len` bytes from device address `src` to host `dst` on the internal
    /// queue.
    ///
    /// # Safety
    /// `dst` (pinned memory of this engine) and `src` must stay valid for `len` bytes until a
    /// later [`Mark`] has been waited for.
    unsafe fn copy_d2h(&self, dst: *mut u8, src: DevPtr, len: usize) -> Result<()>;

    /// Enqueues a copy of `len` bytes from host `src` to device address `dst` on the internal
    /// queue.
    ///
    /// # Safety
    /// As [`CopyEngine::copy_d2h`].
    unsafe fn copy_h2d(&self, dst: DevPtr, src: *const u8, len: usize) -> Result<()>;

    /// A mark after everything enqueued on the internal queue so far.
    fn mark(&self) -> Result<Box<dyn Mark>>;
}

/// One queued job.
struct Job {
    plan: Plan,
    /// Released when the job is dropped (done, failed or discarded).
    hold: Box<dyn StreamHold>,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// No more jobs: the worker ends once the queue is empty.
    closing: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    cv: Condvar,
    /// The sticky error.
    error: Mutex<Option<Error>>,
    /// Fail everything now (drop after its grace period).
    stop: AtomicBool,
    /// The private sub-communicator.
    comm: Communicator,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn error(&self) -> Option<Error> {
        if let Some(e) = lock(&self.error).clone() {
            return Some(e);
        }
        if self.stop.load(Ordering::SeqCst) {
            return Some(Error::Aborted);
        }
        None
    }

    /// Records `e` as the sticky error (the first one stays) and aborts the sub-communicator
    /// so that peers waiting for this rank fail instead of waiting for their deadline.
    fn fail(&self, e: Error) {
        {
            let mut g = lock(&self.error);
            if g.is_none() {
                tracing::warn!(target: "braid::coll", "rank {}: staged device call failed: {e}", self.comm.rank());
                *g = Some(e);
            }
        }
        self.comm.abort();
    }
}

/// The staging engine of one communicator (see the module documentation).
pub(crate) struct Stager {
    shared: Arc<Shared>,
    copy: Arc<dyn CopyEngine>,
    chunk_bytes: usize,
    n: usize,
    rank: usize,
    worker: Option<JoinHandle<()>>,
}

impl Stager {
    /// Starts the engine on `comm`, a private sub-communicator (the engine's
    /// `comm.split(Some(0), rank)`); collective over it: every rank calls `new` at the same
    /// point. The ranks agree on the chunk size (the smallest of theirs) so they cut calls
    /// alike.
    ///
    /// Errors: `chunk_bytes` below [`MIN_CHUNK_BYTES`]; the agreement's error; pinned memory
    /// refused; the thread not started.
    pub(crate) fn new(
        comm: Communicator,
        copy: Arc<dyn CopyEngine>,
        chunk_bytes: usize,
    ) -> Result<Stager> {
        if chunk_bytes < MIN_CHUNK_BYTES {
            return Err(Error::InvalidArgument(format!(
                "staging chunk of {chunk_bytes} bytes: at least {MIN_CHUNK_BYTES} needed"
            )));
        }
        let mine = chunk_bytes as u64;
        let mut agreed = 0u64;
        let c = RawColl {
            kind: crate::coll::CollKind::AllReduce,
            dtype: crate::types::DataType::U64,
            op: crate::types::ReduceOp::Min,
            count: 1,
            root: 0,
        };
        // SAFETY: both buffers are u64s on this stack frame, valid for the blocking call.
        unsafe {
            comm.coll_raw(
                c,
                (&mine as *const u64).cast(),
                (&mut agreed as *mut u64).cast(),
            )?
        };
        let chunk_bytes = usize::try_from(agreed)
            .unwrap_or(chunk_bytes)
            .max(MIN_CHUNK_BYTES);
        if chunk_bytes != mine as usize {
            tracing::info!(target: "braid::coll", "staging: chunk of {chunk_bytes} bytes (the smallest of the ranks'; this rank asked {mine})");
        }
        let ring = Ring::new(&*copy, chunk_bytes)?;
        let (n, rank) = (comm.size(), comm.rank());
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            cv: Condvar::new(),
            error: Mutex::new(None),
            stop: AtomicBool::new(false),
            comm,
        });
        let worker = {
            let (shared, copy) = (shared.clone(), copy.clone());
            std::thread::Builder::new()
                .name(format!("braid-staging-{rank}"))
                .spawn(move || worker(shared, copy, ring))
                .map_err(|e| Error::System(format!("starting the staging thread: {e}")))?
        };
        Ok(Stager {
            shared,
            copy,
            chunk_bytes,
            n,
            rank,
            worker: Some(worker),
        })
    }

    /// The chunk size the ranks agreed on.
    #[allow(dead_code)]
    pub(crate) fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    /// Enqueues a collective on device buffers after what is enqueued on `stream`; returns at
    /// once. Lengths and in-place rules: those of `Communicator::coll_raw`. A call without data
    /// (count 0, except barrier) is a no-op.
    ///
    /// Errors (at once): the sticky error; a bad argument (root, overflow, NULL device pointer
    /// of a significant buffer, a kind that is not a collective); the device refusing the hold.
    ///
    /// # Safety
    /// `send` and `recv` must be device memory valid for the lengths the collective implies on
    /// this rank until the work has completed on `stream`.
    pub(crate) unsafe fn coll(
        &self,
        c: RawColl,
        send: DevPtr,
        recv: DevPtr,
        stream: Stream,
    ) -> Result<()> {
        if let Some(e) = self.error() {
            return Err(e);
        }
        let plan = Plan::coll(c, send, recv, self.n, self.rank, self.chunk_bytes)?;
        self.submit(plan, stream)
    }

    /// Enqueues a group of point-to-point operations on device buffers after what is enqueued
    /// on `stream`; returns at once.
    ///
    /// Errors: as [`Stager::coll`].
    ///
    /// # Safety
    /// As [`Stager::coll`], for every buffer of the group; receive buffers must not overlap
    /// anything else of the group.
    pub(crate) unsafe fn p2p(&self, ops: &[DeviceP2p], stream: Stream) -> Result<()> {
        if let Some(e) = self.error() {
            return Err(e);
        }
        let plan = Plan::p2p(ops, self.n, self.chunk_bytes)?;
        self.submit(plan, stream)
    }

    /// First error of a job that failed after its call returned (sticky); later calls return
    /// it at once.
    pub(crate) fn error(&self) -> Option<Error> {
        self.shared.error()
    }

    fn submit(&self, plan: Plan, stream: Stream) -> Result<()> {
        if plan.steps() == 0 {
            return Ok(());
        }
        let hold = self.copy.hold(stream)?;
        let mut q = lock(&self.shared.queue);
        if q.closing {
            // `hold` is dropped here: the stream is released.
            return Err(Error::InvalidUsage(
                "the staging engine is shut down".into(),
            ));
        }
        q.jobs.push_back(Job { plan, hold });
        drop(q);
        self.shared.cv.notify_all();
        Ok(())
    }
}

impl Drop for Stager {
    /// Lets the worker finish the queued jobs for min(BRAID_TIMEOUT, 10 s); then fails what is
    /// left (aborting the sub-communicator), releasing every held stream; joins the worker.
    fn drop(&mut self) {
        lock(&self.shared.queue).closing = true;
        self.shared.cv.notify_all();
        let Some(h) = self.worker.take() else {
            return;
        };
        let grace = self
            .shared
            .comm
            .config()
            .timeout
            .min(Duration::from_secs(10));
        let end = Instant::now() + grace;
        while !h.is_finished() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(2));
        }
        if !h.is_finished() {
            tracing::warn!(target: "braid::coll", "rank {}: staging engine dropped with device calls pending for {:.1} s; failing them", self.rank, grace.as_secs_f64());
            self.shared.stop.store(true, Ordering::SeqCst);
            self.shared.comm.abort();
            self.shared.cv.notify_all();
        }
        let _ = h.join();
        // Jobs the worker did not take (it ended early): their streams are released here.
        let left: Vec<Job> = lock(&self.shared.queue).jobs.drain(..).collect();
        drop(left);
    }
}

/// The ring of pinned slots.
struct Ring {
    mem: Box<dyn HostMemory>,
    slot: usize,
}

impl Ring {
    fn new(copy: &dyn CopyEngine, slot: usize) -> Result<Ring> {
        // Every slot starts 64-byte aligned (the host collectives read typed elements there).
        let slot = slot
            .checked_next_multiple_of(64)
            .ok_or_else(|| Error::InvalidArgument("staging chunk too large".into()))?;
        let len = slot
            .checked_mul(SLOTS)
            .ok_or_else(|| Error::InvalidArgument("staging chunk too large".into()))?;
        Ok(Ring {
            mem: copy.alloc_host(len)?,
            slot,
        })
    }

    /// Grows the slots to `need` bytes (only between jobs, when no copy is in flight).
    fn ensure(&mut self, copy: &dyn CopyEngine, need: usize) -> Result<()> {
        if need > self.slot {
            tracing::debug!(target: "braid::coll", "staging: slots grow to {need} bytes");
            *self = Ring::new(copy, need)?;
        }
        Ok(())
    }

    fn slot_ptr(&self, i: usize) -> *mut u8 {
        // In bounds: (i % SLOTS) * slot < SLOTS * slot = the allocation's length.
        self.mem.as_ptr().wrapping_add((i % SLOTS) * self.slot)
    }
}

fn worker(shared: Arc<Shared>, copy: Arc<dyn CopyEngine>, mut ring: Ring) {
    loop {
        let job = {
            let mut q = lock(&shared.queue);
            loop {
                if let Some(j) = q.jobs.pop_front() {
                    break Some(j);
                }
                if q.closing {
                    break None;
                }
                q = shared
                    .cv
                    .wait_timeout(q, Duration::from_millis(100))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        };
        let Some(job) = job else {
            return;
        };
        if shared.error().is_some() {
            // Fail fast: dropping the job releases its stream.
            continue;
        }
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            run_job(&shared, &*copy, &mut ring, &job)
        }));
        let r = match r {
            Ok(r) => r,
            Err(_) => Err(Error::Internal("the staging worker panicked".into())),
        };
        if let Err(e) = r {
            // Whatever this job enqueued must be done before its stream goes on (its copies
            // write the user's buffers) and before the slots are used again.
            drain(&shared, &*copy);
            shared.fail(e);
        }
        drop(job);
    }
}

/// Waits (bounded, ignoring the abort flag) for the internal queue to run dry.
fn drain(shared: &Shared, copy: &dyn CopyEngine) {
    let limit = shared.comm.config().timeout.min(Duration::from_secs(10));
    match copy.mark() {
        Ok(m) => {
            if let Err(e) = m.wait(Instant::now() + limit, &|| false) {
                tracing::warn!(target: "braid::coll", "staging: the copy queue did not drain: {e}");
            }
        }
        Err(e) => {
            tracing::warn!(target: "braid::coll", "staging: the copy queue did not drain: {e}")
        }
    }
}

fn run_job(shared: &Shared, copy: &dyn CopyEngine, ring: &mut Ring, job: &Job) -> Result<()> {
    let comm = &shared.comm;
    let timeout = comm.config().timeout;
    let probe = comm.failure_probe();
    let abort = || shared.stop.load(Ordering::Relaxed) || probe().is_some();
    // A wait's error, or the reason the communicator failed (a lost peer) when it was cut short.
    let why = |e: Error| match e {
        Error::Aborted | Error::Timeout { .. } => probe().unwrap_or(e),
        e => e,
    };
    let plan = &job.plan;
    ring.ensure(copy, plan.slot_bytes())?;
    job.hold.wait_point()?;
    let steps = plan.steps();
    let mut inflight: VecDeque<(Step, Box<dyn Mark>)> = VecDeque::with_capacity(SLOTS);
    // Enqueues step `j`'s device-to-host copies into its slot, then its mark. The mark also
    // follows the host-to-device copies of the slot's previous step (enqueued before), so once
    // it is reached the host may overwrite the slot even when the step copies nothing in.
    let issue = |j: usize, inflight: &mut VecDeque<(Step, Box<dyn Mark>)>| -> Result<()> {
        let step = plan.step(j);
        let base = ring.slot_ptr(j);
        for c in &step.d2h {
            // SAFETY: `c.off + c.len <= step.bytes <= ring.slot` (the plan's layout, and the
            // ring was grown to the plan's largest step), so the destination lies in the slot;
            // the device range is the caller's (Stager::coll's contract). The slot is not
            // touched by the host until this step's mark is reached.
            unsafe { copy.copy_d2h(base.wrapping_add(c.off), c.dev, c.len)? };
        }
        inflight.push_back((step, copy.mark()?));
        Ok(())
    };
    for j in 0..steps.min(SLOTS - 1) {
        issue(j, &mut inflight)?;
    }
    for i in 0..steps {
        let ahead = i + SLOTS - 1;
        if ahead < steps {
            // Slot of step i-1, whose host-to-device copies are already queued before.
            issue(ahead, &mut inflight)?;
        }
        let Some((step, mark)) = inflight.pop_front() else {
            return Err(Error::Internal("staging: pipeline out of step".into()));
        };
        mark.wait(Instant::now() + timeout, &abort).map_err(why)?;
        let base = ring.slot_ptr(i);
        host_op(comm, &step.op, base)?;
        for c in &step.h2d {
            // SAFETY: as in `issue`: the source lies in this step's slot, which the host no
            // longer writes; the slot's next device-to-host copy is queued after this one.
            unsafe { copy.copy_h2d(c.dev, base.wrapping_add(c.off), c.len)? };
        }
    }
    let done = copy.mark()?;
    done.wait(Instant::now() + timeout, &abort).map_err(why)
}

/// Runs a step's host collective on its slot (blocking).
fn host_op(comm: &Communicator, op: &HostOp, base: *mut u8) -> Result<()> {
    match op {
        HostOp::Coll { c, send, recv } => {
            let s = send.map_or(std::ptr::null(), |o| base.wrapping_add(o).cast_const());
            let r = recv.map_or(std::ptr::null_mut(), |o| base.wrapping_add(o));
            // SAFETY: the plan's offsets and lengths for this count lie inside the slot (see
            // `plan`), whose device-to-host copies have completed (its mark was reached).
            unsafe { comm.coll_raw(*c, s, r) }
        }
        HostOp::P2p(pieces) => {
            let ops: Vec<RawP2p> = pieces
                .iter()
                .map(|p| RawP2p {
                    send: p.send,
                    buf: base.wrapping_add(p.off),
                    count: p.count,
                    dtype: p.dtype,
                    peer: p.peer,
                    tag: p.tag,
                })
                .collect();
            // SAFETY: the pieces are disjoint ranges of the slot (the plan packs them one
            // after the other), complete from the device.
            unsafe { comm.p2p_raw(&ops) }
        }
    }
}
