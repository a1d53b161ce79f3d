//! The progress engine: jobs, blocking runs on the caller's thread, the queue and thread of
//! non-blocking operations, and their completion handles.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::coll::{order, select, Algo, CollKind, Op, Plan, PlanCtx};
use crate::error::{Error, Result};
use crate::exec::{P2pBatch, P2pOp, Sig};
use crate::mem::RawBuf;
use crate::types::{DataType, ReduceOp};

use super::{lock, poison, Communicator, Inner, Poison, State};

const PLAN_CACHE: usize = 32;

/// What a job does.
#[derive(Debug, Clone)]
pub(super) enum JobDesc {
    Coll {
        kind: CollKind,
        dtype: DataType,
        op: ReduceOp,
        count: usize,
        root: usize,
    },
    P2p(Vec<P2pOp>),
    /// An all_to_allv: the exchange with every peer (receives, then sends; their signatures'
    /// sequence numbers are set when the job runs) and the copy of this rank's own block
    /// (source, destination), if it is not empty.
    AllToAllV {
        ops: Vec<P2pOp>,
        local: Option<(RawBuf, RawBuf)>,
    },
}

impl JobDesc {
    /// Argument checks every job passes before it is run or queued (so before anything is
    /// sent, for the Rust and the C entry points alike): the reduction operator must apply to
    /// the element type (no bitwise operator on floats).
    fn check(&self) -> Result<()> {
        match self {
            JobDesc::Coll {
                kind, dtype, op, ..
            } => op.check(*dtype).map_err(|e| match e {
                Error::InvalidArgument(m) => {
                    Error::InvalidArgument(format!("{}: {m}", kind.name()))
                }
                e => e,
            }),
            // Point-to-point and data-movement jobs carry no operator.
            _ => Ok(()),
        }
    }
}

/// A job's outcome and the buffers it owned.
type Outcome = (Result<()>, Box<dyn Any + Send>);
/// Turns a job's owned buffers into what its handle returns.
type Finisher<R> = Box<dyn FnOnce(Box<dyn Any + Send>) -> R + Send>;

pub(super) struct Slot {
    res: Mutex<Option<Outcome>>,
    cv: Condvar,
}

pub(super) struct Job {
    desc: JobDesc,
    bufs: [RawBuf; 2],
    pub(super) keep: Box<dyn Any + Send>,
    pub(super) slot: Arc<Slot>,
}

// SAFETY (Send for P2pOp is derived from RawBuf's): a job owns (`keep`) the buffers its raw
// views point into, so moving it to the progress thread keeps them valid.

/// The completion handle of a non-blocking operation.
pub struct Handle<R> {
    slot: Arc<Slot>,
    finish: Option<Finisher<R>>,
    /// The communicator's panic state: a job whose progress thread died never completes.
    poison: Arc<Poison>,
}

impl<R> Handle<R> {
    /// Whether the operation has completed (successfully or not); never blocks. Also `true`
    /// when it never will (the communicator's progress thread panicked or ended):
    /// [`Handle::wait`] then returns the error.
    pub fn test(&self) -> bool {
        lock(&self.slot.res).is_some() || self.poison.orphaned().is_some()
    }

    /// Waits at most `timeout` for the operation to complete, without consuming the handle:
    /// `true` when it has completed (successfully or not; [`Handle::wait`] then returns its
    /// result at once), `false` when `timeout` passed first (the operation keeps running and
    /// the handle stays valid). Sleeps on the completion (no spinning) and never blocks past
    /// `timeout`; `Duration::ZERO` is [`Handle::test`]. A `timeout` too large for the clock
    /// waits as [`Handle::wait`] does (the operation itself is bounded by `BRAID_TIMEOUT`).
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut g = lock(&self.slot.res);
        loop {
            if g.is_some() || self.poison.orphaned().is_some() {
                return true;
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(l) if !l.is_zero() => l,
                    _ => return false,
                },
                None => Duration::from_millis(100),
            };
            g = self
                .slot
                .cv
                .wait_timeout(g, left.min(Duration::from_millis(100)))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Waits for completion and returns the operation's result (its buffers, for operations
    /// that own them). The operation itself is bounded by `BRAID_TIMEOUT` (every wait inside
    /// it has that deadline).
    ///
    /// Errors: the operation's error; `Internal` ("... panicked: ...") within ~0.1 s when the
    /// communicator's progress thread panicked (or ended) before completing it: the
    /// communicator is then failed for good (a sticky error).
    pub fn wait(mut self) -> Result<R> {
        let mut g = lock(&self.slot.res);
        loop {
            if let Some((res, keep)) = g.take() {
                drop(g);
                res?;
                let f = self
                    .finish
                    .take()
                    .ok_or_else(|| Error::Internal("handle already consumed".into()))?;
                return Ok(f(keep));
            }
            if let Some(e) = self.poison.orphaned() {
                return Err(e);
            }
            g = self
                .slot
                .cv
                .wait_timeout(g, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

impl Communicator {
    /// Runs a job on the calling thread, after any queued non-blocking jobs.
    pub(super) fn run_blocking(&self, desc: JobDesc, bufs: [RawBuf; 2]) -> Result<()> {
        desc.check()?;
        let mut q = lock(&self.inner.queue);
        if q.outstanding > 0 && matches!(desc, JobDesc::P2p(_)) {
            // Sends and receives join the non-blocking ones in flight on the progress thread
            // (an isend whose receiver first waits for a message of this rank completes only
            // once this receive runs: waiting for it first would deadlock).
            drop(q);
            return self
                .submit(desc, bufs, Box::new(()), |_| ())
                .and_then(|h| h.wait());
        }
        while q.outstanding > 0 {
            // Queued jobs of a dead progress thread never complete.
            if let Some(e) = self.inner.poison.orphaned() {
                return Err(e);
            }
            q = self
                .inner
                .qcv
                .wait_timeout(q, Duration::from_millis(50))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        if q.closed {
            return Err(Error::InvalidUsage("communicator is closed".into()));
        }
        if let Some(e) = self.inner.poison.error() {
            return Err(e);
        }
        // The queue lock is held while the call runs so that operations issued meanwhile
        // by other threads are ordered after it.
        let mut st = lock(&self.inner.state);
        let inner = &self.inner;
        // A panic inside braid becomes the communicator's sticky error (not the caller's).
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_job(inner, &mut st, desc, bufs)
        })) {
            Ok(r) => r,
            Err(payload) => {
                drop(st);
                Err(poison(inner, "an operation", &*payload))
            }
        }
    }

    /// Queues a job for the progress thread.
    pub(super) fn submit<R: 'static>(
        &self,
        desc: JobDesc,
        bufs: [RawBuf; 2],
        keep: Box<dyn Any + Send>,
        finish: impl FnOnce(Box<dyn Any + Send>) -> R + Send + 'static,
    ) -> Result<Handle<R>> {
        desc.check()?;
        if let Some(e) = self.inner.poison.orphaned() {
            return Err(e);
        }
        let slot = Arc::new(Slot {
            res: Mutex::new(None),
            cv: Condvar::new(),
        });
        {
            let mut q = lock(&self.inner.queue);
            if q.closed {
                return Err(Error::InvalidUsage("communicator is closed".into()));
            }
            q.jobs.push_back(Job {
                desc,
                bufs,
                keep,
                slot: slot.clone(),
            });
            q.outstanding += 1;
        }
        self.ensure_progress_thread()?;
        self.inner.qcv.notify_all();
        Ok(Handle {
            slot,
            finish: Some(Box::new(finish)),
            poison: self.inner.poison.clone(),
        })
    }

    pub(super) fn ensure_progress_thread(&self) -> Result<()> {
        let mut g = lock(&self.progress);
        if g.is_some() {
            return Ok(());
        }
        let inner = self.inner.clone();
        let h = std::thread::Builder::new()
            .name(format!("braid-progress-{}", self.rank()))
            .spawn(move || {
                // BRAID_CPU_AFFINITY wins; otherwise, on a machine with several NUMA nodes, the
                // progress thread (and the staging it first touches) stays on this rank's node.
                let cpus = inner.cfg.cpu_affinity.clone().or_else(|| {
                    crate::topo::local_numa_cpus().filter(|_| crate::topo::numa_node_count() > 1)
                });
                if let Some(cpus) = cpus {
                    crate::topo::pin_current_thread(&cpus);
                }
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    progress_loop(inner.clone())
                }));
                if let Err(payload) = run {
                    let e = poison(&inner, "the progress thread", &*payload);
                    // Its jobs can no longer complete: fail them (the handles of jobs it held
                    // see the poison).
                    let jobs: Vec<Job> = {
                        let mut q = lock(&inner.queue);
                        q.outstanding = 0;
                        q.jobs.drain(..).collect()
                    };
                    for j in jobs {
                        *lock(&j.slot.res) = Some((Err(e.clone()), j.keep));
                        j.slot.cv.notify_all();
                    }
                    inner.poison.progress_gone.store(true, Ordering::SeqCst);
                    inner.qcv.notify_all();
                }
            })
            .map_err(|e| Error::System(format!("spawning the progress thread: {e}")))?;
        *g = Some(h);
        Ok(())
    }
}

/// Marks the communicator failed and tells every peer why.
pub(super) fn fail_state(st: &mut State, e: Error) {
    if st.error.is_none() {
        st.error = Some(e.clone());
    }
    let reason = e.to_string();
    for p in st.peers.iter_mut().flatten() {
        p.conn.abort(&reason);
    }
    st.exec.matcher.reset();
}

/// Refuses work on a failed or aborted communicator.
fn check_usable(inner: &Inner, st: &mut State) -> Result<()> {
    if let Some(e) = &st.error {
        return Err(e.clone());
    }
    if inner.abort.load(Ordering::Relaxed) {
        fail_state(st, Error::Aborted);
        return Err(Error::Aborted);
    }
    Ok(())
}

fn note_failure(inner: &Inner, st: &mut State, e: &Error) {
    if e.is_sticky() {
        tracing::error!(target: "braid::coll", "rank {}: {e}", inner.rank);
        fail_state(st, e.clone());
        tell_unconnected(inner, e);
    }
}

/// Lazy connections: tells the peers not connected yet that this communicator failed (see
/// [`super::connect::Dialer::tell_failure`]); `fail_state` tells the connected ones.
pub(super) fn tell_unconnected(inner: &Inner, e: &Error) {
    if let Some(d) = &inner.dial {
        d.tell_failure(&e.to_string());
    }
}

/// The peers of `need` (other than this rank) that are not connected.
fn unconnected(inner: &Inner, st: &State, need: impl IntoIterator<Item = usize>) -> Vec<usize> {
    need.into_iter()
        .filter(|&p| p != inner.rank && st.peers.get(p).is_some_and(|x| x.is_none()))
        .collect()
}

/// Lazy connections (BRAID_LAZY_CONNECT=1): connects the peers of `need` not connected yet,
/// before a job uses them (see [`super::connect::Dialer::ensure`]). Nothing to do (and no
/// allocation) when connections are eager or every peer named is connected.
fn connect_first_use(
    inner: &Inner,
    st: &mut State,
    need: impl IntoIterator<Item = usize>,
) -> Result<()> {
    let Some(d) = &inner.dial else {
        return Ok(());
    };
    let mut missing = unconnected(inner, st, need);
    if missing.is_empty() {
        return Ok(());
    }
    d.ensure(&mut st.peers, &mut missing)
}

/// The peers a plan sends to or receives from.
fn plan_peers(plan: &Plan) -> impl Iterator<Item = usize> + '_ {
    plan.steps.iter().filter_map(|s| match s.op {
        Op::Send { peer, .. } | Op::Recv { peer, .. } | Op::RecvReduce { peer, .. } => Some(peer),
        _ => None,
    })
}

fn run_job(inner: &Inner, st: &mut State, desc: JobDesc, bufs: [RawBuf; 2]) -> Result<()> {
    check_usable(inner, st)?;
    let res = match desc {
        JobDesc::Coll {
            kind,
            dtype,
            op,
            count,
            root,
        } => {
            let ctx = PlanCtx {
                kind,
                rank: inner.rank,
                size: inner.size,
                count,
                dtype,
                op,
                root,
                slice_bytes: inner.cfg.slice_bytes,
            };
            let bytes = count * dtype.size();
            if crate::direct::supports(kind)
                && inner.direct
                && bytes >= inner.cfg.shm_direct_min.max(1)
                && !inner.policy.forced(kind)
            {
                // The single-copy path exchanges with every peer.
                if let Err(e) = connect_first_use(inner, st, 0..inner.size) {
                    note_failure(inner, st, &e);
                    return Err(e);
                }
                let sig = Sig {
                    kind,
                    dtype,
                    op,
                    algo: Algo::Direct,
                    root: root as u32,
                    slice_kib: 0,
                    count: count as u64,
                    seq: st.seq,
                };
                let State {
                    peers,
                    exec,
                    remote,
                    ..
                } = st;
                let r = crate::direct::run(
                    exec,
                    peers,
                    &inner.regions,
                    remote,
                    &ctx,
                    bufs,
                    sig,
                    inner.all_shm,
                    inner.cma
                        && match inner.cfg.shm_cma {
                            crate::config::CmaUse::Never => false,
                            crate::config::CmaUse::Auto => {
                                matches!(kind, CollKind::AllReduce | CollKind::AllToAll)
                            }
                            crate::config::CmaUse::All => true,
                        },
                );
                match r {
                    Ok(crate::direct::Outcome::Done(n)) => {
                        st.seq += 1;
                        st.direct_bytes += n;
                        return Ok(());
                    }
                    Ok(crate::direct::Outcome::Fallback) => {}
                    Err(e) => {
                        st.seq += 1;
                        note_failure(inner, st, &e);
                        return Err(e);
                    }
                }
            }
            let algo = inner.policy.choose(kind, inner.size, bytes)?;
            let cached = match &st.last_plan {
                Some((c, a, p)) if *c == ctx && *a == algo => Some(p.clone()),
                _ => st.plans.get(&(ctx, algo)).cloned(),
            };
            let plan = match cached {
                Some(p) => p,
                None => {
                    let p = match &inner.ring {
                        Some(ring) if order::follows_ring(algo) => {
                            order::plan_in_order(&ctx, algo, ring)?
                        }
                        _ => select::plan(&ctx, algo)?,
                    };
                    let p = Arc::new(p);
                    if st.plans.len() >= PLAN_CACHE {
                        st.plans.clear();
                    }
                    st.plans.insert((ctx, algo), p.clone());
                    p
                }
            };
            if !matches!(&st.last_plan, Some((c, a, _)) if *c == ctx && *a == algo) {
                st.last_plan = Some((ctx, algo, plan.clone()));
            }
            if let Err(e) = connect_first_use(inner, st, plan_peers(&plan)) {
                note_failure(inner, st, &e);
                return Err(e);
            }
            let sig = Sig {
                kind,
                dtype,
                op,
                algo,
                root: root as u32,
                slice_kib: (inner.cfg.slice_bytes / 1024) as u32,
                count: count as u64,
                seq: st.seq,
            };
            st.seq += 1;
            let State { peers, exec, .. } = st;
            exec.run_plan(peers, &ctx, &plan, bufs, &sig)
        }
        JobDesc::P2p(ops) => connect_first_use(inner, st, op_ranks(inner, &ops)).and_then(|()| {
            let State { peers, exec, .. } = st;
            exec.run_p2p(peers, ops)
        }),
        JobDesc::AllToAllV { mut ops, local } => {
            // Ordered with the other collectives: the sequence number is the message tag.
            let seq = st.seq;
            st.seq += 1;
            for o in ops.iter_mut() {
                o.sig.seq = seq;
            }
            let copied = match local {
                Some((src, dst)) if src.len() == dst.len() => src.at(0, src.len()).and_then(|ps| {
                    dst.at(0, dst.len())
                        .map(|pd| crate::mem::copy(pd, ps, src.len()))
                }),
                Some(_) => Err(Error::Internal(
                    "all_to_allv: own block lengths differ".into(),
                )),
                None => Ok(()),
            };
            copied
                .and_then(|()| connect_first_use(inner, st, op_ranks(inner, &ops)))
                .and_then(|()| {
                    let State { peers, exec, .. } = st;
                    exec.run_p2p(peers, ops)
                })
        }
    };
    if let Err(e) = &res {
        note_failure(inner, st, e);
    }
    res
}

pub(super) fn complete(inner: &Inner, slot: Arc<Slot>, keep: Box<dyn Any + Send>, res: Result<()>) {
    *lock(&slot.res) = Some((res, keep));
    slot.cv.notify_all();
    let mut q = lock(&inner.queue);
    q.outstanding = q.outstanding.saturating_sub(1);
    drop(q);
    inner.qcv.notify_all();
}

type InFlight = (P2pBatch, Arc<Slot>, Box<dyn Any + Send>);

/// A non-blocking point-to-point job of the progress thread whose peers are being connected
/// (lazy connections): it begins once they are, after the earlier waiting jobs that share a
/// peer with it (per-peer issue order), while the jobs in flight keep progressing.
struct Waiting {
    ops: Vec<P2pOp>,
    slot: Arc<Slot>,
    keep: Box<dyn Any + Send>,
    /// BRAID_TIMEOUT after it started waiting.
    deadline: Instant,
}

fn shares_peer(inner: &Inner, a: &[P2pOp], b: &[P2pOp]) -> bool {
    op_ranks(inner, a).any(|x| op_ranks(inner, b).any(|y| x == y))
}

/// The ranks a group of point-to-point operations may use (every other rank for a receive
/// from any source).
fn op_ranks<'a>(inner: &Inner, ops: &'a [P2pOp]) -> impl Iterator<Item = usize> + 'a {
    let (me, n) = (inner.rank, inner.size);
    ops.iter().flat_map(move |o| o.ranks(me, n))
}

/// Begins a point-to-point job on the progress thread (its peers connected): it joins the jobs
/// in flight, or completes at once with its error.
fn begin_p2p(
    inner: &Inner,
    st: &mut State,
    inflight: &mut Vec<InFlight>,
    ops: Vec<P2pOp>,
    slot: Arc<Slot>,
    keep: Box<dyn Any + Send>,
) {
    let begun = check_usable(inner, st).and_then(|_| {
        let State { peers, exec, .. } = st;
        exec.p2p_begin(peers, ops)
    });
    match begun {
        Ok(b) => inflight.push((b, slot, keep)),
        Err(e) => complete(inner, slot, keep, Err(e)),
    }
}

/// Polls the connections of the waiting jobs (without blocking) and begins those whose peers
/// are connected, in issue order per peer; a job whose connection failed or timed out
/// completes with the error. Returns the connection change count read before polling (to
/// wait on with [`super::connect::Dialer::wait`]).
fn start_waiting(
    inner: &Inner,
    waiting: &mut VecDeque<Waiting>,
    inflight: &mut Vec<InFlight>,
) -> u64 {
    let Some(d) = &inner.dial else {
        return 0;
    };
    let gen = d.gen();
    let mut st = lock(&inner.state);
    // Peers of earlier jobs still waiting: later jobs with them wait too.
    let mut held: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < waiting.len() {
        let need = unconnected(inner, &st, op_ranks(inner, &waiting[i].ops));
        let polled = check_usable(inner, &mut st).and_then(|()| {
            if need.is_empty() {
                Ok(true)
            } else {
                d.poll(&mut st.peers, &need)
            }
        });
        let res = match polled {
            Ok(false) if Instant::now() >= waiting[i].deadline => {
                Err(d.timed_out(&st.peers, &need))
            }
            r => r,
        };
        match res {
            Ok(true) if !op_ranks(inner, &waiting[i].ops).any(|r| held.contains(&r)) => {
                if let Some(w) = waiting.remove(i) {
                    begin_p2p(inner, &mut st, inflight, w.ops, w.slot, w.keep);
                }
            }
            Ok(_) => {
                held.extend(op_ranks(inner, &waiting[i].ops));
                i += 1;
            }
            Err(e) => {
                note_failure(inner, &mut st, &e);
                if let Some(w) = waiting.remove(i) {
                    complete(inner, w.slot, w.keep, Err(e));
                }
            }
        }
    }
    gen
}

/// The test hook of [`Communicator::inject_progress_panic`].
fn injected_panic(inner: &Inner) {
    if inner.poison.inject.swap(false, Ordering::SeqCst) {
        #[allow(clippy::panic)] // the hook's whole point: a panic, as a bug would cause
        {
            panic!("injected panic (Communicator::inject_progress_panic)");
        }
    }
}

/// The progress thread: runs queued jobs in issue order. Point-to-point groups are posted and
/// kept in flight together (so an `isend` followed by an `irecv` cannot deadlock); a collective
/// waits until every earlier point-to-point group completed.
fn progress_loop(inner: Arc<Inner>) {
    let mut inflight: Vec<InFlight> = Vec::new();
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    loop {
        injected_panic(&inner);
        let next = {
            let mut q = lock(&inner.queue);
            loop {
                if inner.poison.inject.load(Ordering::Relaxed) {
                    break None;
                }
                let front_p2p = q.jobs.front().map(|j| matches!(j.desc, JobDesc::P2p(_)));
                let busy = !inflight.is_empty() || !waiting.is_empty();
                match front_p2p {
                    Some(true) => break q.jobs.pop_front(),
                    Some(false) if !busy => break q.jobs.pop_front(),
                    Some(false) => break None,
                    None if busy => break None,
                    None => {
                        if inner.stop.load(Ordering::Relaxed) {
                            return;
                        }
                        q = inner
                            .qcv
                            .wait_timeout(q, Duration::from_millis(100))
                            .map(|(g, _)| g)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                }
            }
        };
        injected_panic(&inner);
        match next {
            Some(Job {
                desc: JobDesc::P2p(ops),
                slot,
                keep,
                ..
            }) => {
                let mut st = lock(&inner.state);
                // Lazy connections: a job whose peers are not all connected (or that follows a
                // waiting job with a peer in common) waits without holding up the others.
                let wait = inner.dial.is_some()
                    && (waiting.iter().any(|w| shares_peer(&inner, &w.ops, &ops))
                        || !unconnected(&inner, &st, op_ranks(&inner, &ops)).is_empty());
                if wait {
                    drop(st);
                    waiting.push_back(Waiting {
                        ops,
                        slot,
                        keep,
                        deadline: Instant::now() + inner.cfg.timeout,
                    });
                    start_waiting(&inner, &mut waiting, &mut inflight);
                } else {
                    begin_p2p(&inner, &mut st, &mut inflight, ops, slot, keep);
                }
            }
            Some(job) => {
                let mut st = lock(&inner.state);
                let res = run_job(&inner, &mut st, job.desc, job.bufs);
                drop(st);
                complete(&inner, job.slot, job.keep, res);
            }
            None => {
                if !waiting.is_empty() {
                    let gen = start_waiting(&inner, &mut waiting, &mut inflight);
                    if inflight.is_empty() {
                        // Only connections to wait for (new jobs are looked at within 5 ms).
                        if let (Some(d), false) = (&inner.dial, waiting.is_empty()) {
                            d.wait(gen, Duration::from_millis(5));
                        }
                        continue;
                    }
                }
                let mut st = lock(&inner.state);
                let mut failed: Option<Error> = None;
                let mut progressed = false;
                {
                    let State { peers, exec, .. } = &mut *st;
                    for (b, _, _) in inflight.iter_mut() {
                        match exec.p2p_step(peers, b) {
                            Ok(p) => progressed |= p,
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    if failed.is_none() && !progressed {
                        if let Some((b, _, _)) = inflight.iter_mut().find(|(b, _, _)| !b.finished())
                        {
                            if let Err(e) = exec.p2p_idle(peers, b, Duration::from_millis(1)) {
                                failed = Some(e);
                            }
                        }
                    }
                }
                if let Some(e) = failed {
                    note_failure(&inner, &mut st, &e);
                    drop(st);
                    for (_, slot, keep) in inflight.drain(..) {
                        complete(&inner, slot, keep, Err(e.clone()));
                    }
                } else {
                    drop(st);
                    let mut i = 0;
                    while i < inflight.len() {
                        if inflight[i].0.finished() {
                            let (_, slot, keep) = inflight.swap_remove(i);
                            complete(&inner, slot, keep, Ok(()));
                        } else {
                            i += 1;
                        }
                    }
                }
            }
        }
    }
}
