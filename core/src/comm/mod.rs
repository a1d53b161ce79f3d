//! The communicator: the public API of braid.
//!
//! # Buffers, in-place calls and aliasing
//! Out-of-place calls take a send slice and a receive slice (Rust's borrow rules keep them
//! disjoint). In-place calls (`*_inplace`) take one slice; their layout is stated per method.
//! Buffers that are "significant only at the root" may be empty on other ranks.
//!
//! # Blocking and non-blocking
//! Blocking calls are driven by the calling thread (no hand-off, lowest latency). Non-blocking
//! calls (`i*`) take owned buffers, return a [`Handle`] and run, in issue order, on a progress
//! thread of the communicator (started at the first non-blocking call). A blocking call issued
//! after non-blocking ones runs after them. All ranks must issue collectives in the same order.
//!
//! # Threads
//! A `Communicator` is `Send + Sync`; calls from several threads are serialised in the order
//! they take the communicator's lock (that order must match across ranks, so in practice issue
//! collectives from one thread). [`Communicator::abort`] may be called from any thread at any
//! time and never blocks for long.
//!
//! # Errors
//! Argument errors ([`Error::InvalidArgument`]) are reported before anything is sent and leave
//! the communicator usable. Any other error is sticky: the communicator tells its peers (so they
//! fail too, naming the cause, instead of hanging) and every later call returns the same error.

// The communicator, its state and accessors live here; the rest, by concern:
// - setup: transports and handles, rendezvous, installing a view;
// - connect: the acceptor, data hellos, the stash of accepted connections, connecting peers;
// - elastic: update/leave/sync_from_oldest;
// - typed: the typed collectives and point-to-point (blocking, group, non-blocking);
// - raw: the raw API of the C ABI and all_to_allv;
// - progress: jobs, blocking runs, the progress thread, handles;
// - group: create_group and split.
mod connect;
mod elastic;
mod group;
mod progress;
mod raw;
mod setup;
mod typed;

pub use progress::Handle;
pub use raw::{AnySource, RawColl, RawP2p};
pub use typed::{Group, P2p};

pub(crate) use connect::parse_hello;
pub(crate) use setup::{decode_handles, encode_handles, make_transport};

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use braid_transport::region::{Regions, RemoteMaps};
use braid_transport::{ConnectHandle, Transport};

use crate::coll::{select, Algo, Plan, PlanCtx};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::exec::{Exec, Peer};
use crate::mem::RawBuf;
use crate::membership::{Client, Coordinator, View};
use crate::types::Element;

use connect::{Dialer, Stash};
use progress::{complete, fail_state, tell_unconnected, Job};

struct State {
    /// Declared (so dropped) before `exec`: the connections go before the buffers that the
    /// point-to-point matcher may have posted on them.
    peers: Vec<Option<Peer>>,
    exec: Exec,
    seq: u64,
    error: Option<Error>,
    plans: HashMap<(PlanCtx, Algo), Arc<Plan>>,
    /// The plan of the last call (a training loop repeats the same calls: no hashing).
    last_plan: Option<(PlanCtx, Algo, Arc<Plan>)>,
    /// Peers' shared regions mapped by single-copy calls.
    remote: RemoteMaps,
    /// Bytes read straight from peers' memory by single-copy collectives.
    direct_bytes: u64,
}

/// Non-blocking jobs not yet completed (queued or in flight), in issue order.
struct Queue {
    jobs: VecDeque<Job>,
    /// Jobs submitted and not yet completed (queued + running + point-to-point in flight).
    outstanding: usize,
    closed: bool,
}

struct Inner {
    rank: usize,
    size: usize,
    member: u64,
    view: View,
    cfg: Config,
    policy: select::Policy,
    transport: &'static str,
    peer_transports: Vec<(usize, &'static str)>,
    /// Host-contiguous ring order for ring and chain algorithms (None when rank order already
    /// keeps each host's ranks together).
    ring: Option<Vec<usize>>,
    listen_addr: String,
    state: Mutex<State>,
    queue: Mutex<Queue>,
    qcv: Condvar,
    abort: Arc<AtomicBool>,
    stop: AtomicBool,
    /// The communicator's shared regions ([`Communicator::alloc_shared`]).
    regions: Arc<Regions>,
    /// Large all-reduces try the single-copy path (decided from the view and the
    /// configuration alone, so all ranks agree): BRAID_SHM_DIRECT, 2..=8 ranks, one host,
    /// transport not forced to tcp.
    direct: bool,
    /// Every peer is reached through shared memory.
    all_shm: bool,
    /// Cross-memory attach may be used for private buffers (BRAID_SHM_CMA, and the system
    /// permits it without weakening this process unless the user opted in).
    cma: bool,
    /// Set when a braid thread of this communicator panicked (shared with its handles).
    poison: Arc<Poison>,
    /// Lazy connections (BRAID_LAZY_CONNECT=1, the default): how peers are connected at
    /// their first use. `None`: every peer was connected when the view was installed.
    dial: Option<Arc<Dialer>>,
}

/// The state a panic leaves behind, shared by a communicator's [`Inner`] and its handles: a
/// panic in the progress thread (or in an operation) becomes a sticky error every waiter wakes
/// with, never a hang.
#[derive(Default)]
struct Poison {
    /// `err` is set (checked first: the hot path takes no lock).
    set: AtomicBool,
    /// The panic, as the error every pending and later operation fails with.
    err: Mutex<Option<Error>>,
    /// The progress thread died (its jobs can no longer complete). A progress thread that
    /// returns normally (stop requested, nothing pending) does not set it: `update()` starts
    /// a new one.
    progress_gone: AtomicBool,
    /// Test hook ([`Communicator::inject_progress_panic`]): the progress thread panics at its
    /// next step.
    inject: AtomicBool,
}

impl Poison {
    fn error(&self) -> Option<Error> {
        if !self.set.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.err).clone()
    }

    /// Why a job that has not completed never will: the panic, or the end of the progress
    /// thread. `None`: it still may.
    fn orphaned(&self) -> Option<Error> {
        if !self.set.load(Ordering::Acquire) && !self.progress_gone.load(Ordering::Acquire) {
            return None;
        }
        self.error().or_else(|| {
            self.progress_gone.load(Ordering::SeqCst).then(|| {
                Error::Internal("the progress thread ended before the operation completed".into())
            })
        })
    }
}

/// The text of a panic payload.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-text panic payload)".to_string()
    }
}

/// Turns a panic of a braid thread into the communicator's sticky error: every pending
/// operation completes with it, later ones fail with it at once, peers are told.
fn poison(inner: &Inner, what: &str, payload: &(dyn Any + Send)) -> Error {
    let e = Error::Internal(format!(
        "rank {}: {what} panicked: {}",
        inner.rank,
        panic_message(payload)
    ));
    tracing::error!(target: "braid::coll", "{e}");
    {
        let mut g = lock(&inner.poison.err);
        if g.is_none() {
            *g = Some(e.clone());
        }
        inner.poison.set.store(true, Ordering::Release);
    }
    // The state may be half-updated by the panic: tell the peers (best effort; a second
    // panic here must not escape either).
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut st = lock(&inner.state);
        fail_state(&mut st, e.clone());
    }));
    inner.qcv.notify_all();
    e
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// See [`Communicator::failure_probe`].
pub(crate) type FailureProbe = Arc<dyn Fn() -> Option<Error> + Send + Sync>;

/// A group of ranks that run collectives together.
pub struct Communicator {
    inner: Arc<Inner>,
    progress: Mutex<Option<JoinHandle<()>>>,
    acceptor: Option<JoinHandle<()>>,
    acceptor_stop: Arc<AtomicBool>,
    /// The membership client (shared with the lazy connections of the installed view).
    client: Arc<Mutex<Option<Client>>>,
    /// The coordinator this process hosts (`host_coordinator`), shared with the communicators
    /// created from this one ([`Communicator::create_group`], [`Communicator::split`]): it
    /// stops when the last of them is dropped.
    coordinator: Option<Arc<Coordinator>>,
    /// Transports this rank listens on (kept for connections of later views).
    transports: Vec<Arc<dyn Transport>>,
    /// Their connect handles (published at registration).
    handles: Vec<ConnectHandle>,
    /// Accepted data connections not yet claimed by a view.
    stash: Arc<Stash>,
    /// Job token for data-connection hellos.
    token: Option<Vec<u8>>,
    /// This member left the group (it is not in the installed view).
    left: bool,
    /// Highest epoch whose installation was attempted.
    attempted: u64,
    /// Shared regions of this communicator (kept across views).
    regions: Arc<Regions>,
    /// Communicators created from this one so far, per (kind of creation, sorted member ids):
    /// the members of a new communicator count their creations with the same member set
    /// alike, so the n-th creation gets the same group name on all of them.
    subgroups: Mutex<HashMap<(String, Vec<u64>), u64>>,
    /// Device-buffer engines (NCCL, staging), created at the first device call and rebuilt
    /// after view changes.
    pub(super) device: crate::cuda::engine::DeviceSlot,
}

impl Communicator {
    /// This rank (0-based position in the view).
    pub fn rank(&self) -> usize {
        self.inner.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.inner.size
    }

    /// This process's member id (assigned by the coordinator; never reused).
    pub fn member_id(&self) -> u64 {
        self.inner.member
    }

    /// The membership view this communicator runs on (epoch, members in rank order).
    pub fn view(&self) -> &View {
        &self.inner.view
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    /// Name of the transport between ranks ("tcp", "shm", "ib", "mem"), or "mixed" when peers are
    /// reached over different transports (see [`Communicator::peer_transports`]).
    pub fn transport_name(&self) -> &'static str {
        self.inner.transport
    }

    /// The transport used to reach each peer rank: (rank, "shm" | "tcp" | "ib" | "mem"), in rank
    /// order, without this rank. With lazy connections (`BRAID_LAZY_CONNECT=1`) it is the
    /// transport a peer is or will be connected over (see [`Communicator::connected_peers`]).
    pub fn peer_transports(&self) -> Vec<(usize, &'static str)> {
        self.inner.peer_transports.clone()
    }

    /// The NUMA node of every rank (index = rank), as each reported it at registration.
    pub fn numa_nodes(&self) -> Vec<Option<u32>> {
        self.inner.view.members.iter().map(|m| m.numa).collect()
    }

    /// The ring order used by ring and chain algorithms: ranks grouped host by host (identity
    /// when rank order already keeps each host's ranks together).
    pub fn ring_order(&self) -> Vec<usize> {
        match &self.inner.ring {
            Some(r) => r.clone(),
            None => (0..self.size()).collect(),
        }
    }

    /// Where this rank accepts data connections from peers (for tcp, `ip:port`; without tcp,
    /// the address of the first transport it listens on).
    pub fn listen_addr(&self) -> &str {
        &self.inner.listen_addr
    }

    /// The peer ranks this rank holds a connection to, in rank order. With lazy connections
    /// (`BRAID_LAZY_CONNECT=1`, the default) a peer is connected at the first operation that
    /// exchanges data with it (a ring all-reduce connects the two ring neighbours, an
    /// all-to-all every peer); with `BRAID_LAZY_CONNECT=0`, and for views adopted by
    /// [`Communicator::update`], every peer is connected when the view is installed.
    pub fn connected_peers(&self) -> Vec<usize> {
        let st = lock(&self.inner.state);
        st.peers.iter().flatten().map(|p| p.rank).collect()
    }

    /// Payload bytes (sent, received) per peer rank so far, over all transports.
    pub fn bytes_per_peer(&self) -> Vec<(usize, u64, u64)> {
        let st = lock(&self.inner.state);
        st.peers
            .iter()
            .flatten()
            .map(|p| {
                let (t, r) = p.conn.bytes();
                (p.rank, t, r)
            })
            .collect()
    }

    /// Bytes this rank moved straight between its buffers and peers' memory by single-copy
    /// transfers over [`Communicator::alloc_shared`] buffers (collectives: bytes read from and
    /// written to peers' buffers; receives of large sends: bytes copied out of the sender's
    /// buffer), in the current view. These bytes do not cross the shm rings and are not
    /// counted by [`Communicator::bytes_per_peer`].
    pub fn direct_bytes(&self) -> u64 {
        let st = lock(&self.inner.state);
        st.direct_bytes
            + st.peers
                .iter()
                .flatten()
                .map(|p| p.conn.direct_bytes().1)
                .sum::<u64>()
    }

    /// Allocates `len` zeroed elements in shared memory registered with this communicator
    /// (like NCCL's `ncclMemAlloc` + `ncclCommRegister`). When all ranks of a call pass such
    /// buffers and share one host, the call copies each byte once, straight out of the peer's
    /// buffer (see [`crate::shared`] and `BRAID_SHM_DIRECT`); with any other buffers it behaves
    /// exactly as before. The buffer is freed (unmapped) when dropped; it may outlive the
    /// communicator (it is then an ordinary buffer).
    ///
    /// Errors: `len * size_of::<T>()` overflows ([`Error::InvalidArgument`]); the system
    /// refuses the memory ([`Error::System`]).
    pub fn alloc_shared<T: Element>(&self, len: usize) -> Result<crate::shared::SharedBuf<T>> {
        let bytes = len.checked_mul(T::DTYPE.size()).ok_or_else(|| {
            Error::InvalidArgument(format!("alloc_shared: {len} elements overflow"))
        })?;
        let r = self
            .regions
            .alloc(bytes)
            .map_err(|e| Error::System(format!("alloc_shared of {bytes} bytes: {e}")))?;
        Ok(crate::shared::SharedBuf::new(r, len))
    }

    /// Whether `len` bytes at `ptr` lie inside one buffer from [`Communicator::alloc_shared`]
    /// of this communicator.
    pub fn is_shared(&self, ptr: *const u8, len: usize) -> bool {
        self.regions.lookup(ptr, len).is_some()
    }

    /// The sticky error, if an operation failed.
    pub fn error(&self) -> Option<Error> {
        if let Some(e) = self.inner.poison.error() {
            return Some(e);
        }
        lock(&self.inner.state).error.clone()
    }

    /// The device engines of this communicator.
    pub(crate) fn device_slot(&self) -> &crate::cuda::engine::DeviceSlot {
        &self.device
    }

    /// A check, cheap and callable from any thread, of whether this communicator (on its
    /// current view) can no longer complete operations: aborted, failed (sticky error), or a
    /// rank of the view removed by the coordinator for a failure (braid's failure detector), or
    /// this member isolated from the coordinator. The NCCL watcher polls it to abort the NCCL
    /// communicator (NCCL has no timeouts of its own).
    pub(crate) fn failure_probe(&self) -> FailureProbe {
        let inner = self.inner.clone();
        Arc::new(move || {
            if inner.abort.load(Ordering::Relaxed) {
                return Some(Error::Aborted);
            }
            if let Some(e) = inner.poison.error() {
                return Some(e);
            }
            // Never wait behind a running blocking call: its result shows up next time.
            let Ok(st) = inner.state.try_lock() else {
                return None;
            };
            if let Some(e) = st.error.clone() {
                return Some(e);
            }
            let trip = st.exec.trip.clone();
            drop(st);
            if !trip.set.load(Ordering::Relaxed) {
                return None;
            }
            let dropped = trip.dropped.lock().map(|d| d.clone()).unwrap_or_default();
            for (id, why) in dropped {
                if let Some(rank) = inner.view.rank_of(id) {
                    let host = inner.view.members[rank].hostname.clone();
                    return Some(Error::PeerLost {
                        rank,
                        member: id,
                        host,
                        detail: format!("removed from the group by the coordinator: {why}"),
                    });
                }
            }
            let iso = trip.isolated.lock().ok().and_then(|g| g.clone());
            iso.map(Error::Coordinator)
        })
    }

    /// Test hook: makes this communicator's progress thread panic at its next step (starting
    /// it if needed), as a bug inside braid would. Not for applications.
    #[doc(hidden)]
    pub fn inject_progress_panic(&self) -> Result<()> {
        self.inner.poison.inject.store(true, Ordering::SeqCst);
        self.ensure_progress_thread()?;
        self.inner.qcv.notify_all();
        Ok(())
    }

    /// Aborts the communicator: pending and later operations fail with [`Error::Aborted`],
    /// peers are told (so they fail instead of hanging). Never blocks for long; safe from any
    /// thread. [`Drop`] is still needed to release resources.
    pub fn abort(&self) {
        self.inner.abort.store(true, Ordering::SeqCst);
        // If no operation runs, close the connections now; otherwise the running operation
        // sees the flag within ~50 ms and its error path does it.
        if let Ok(mut st) = self.inner.state.try_lock() {
            fail_state(&mut st, Error::Aborted);
            tell_unconnected(&self.inner, &Error::Aborted);
        }
        self.inner.qcv.notify_all();
    }
}

fn bytes_of<T: Element>(s: &[T]) -> &[u8] {
    bytemuck::cast_slice(s)
}

fn bytes_of_mut<T: Element>(s: &mut [T]) -> &mut [u8] {
    bytemuck::cast_slice_mut(s)
}

fn invalid<T>(msg: String) -> Result<T> {
    Err(Error::InvalidArgument(msg))
}

fn sub(b: RawBuf, off: usize, len: usize) -> Result<RawBuf> {
    let p = b.at(off, len)?;
    // SAFETY: p..p+len lies inside `b` (checked by at), which the caller keeps alive for the
    // operation.
    Ok(unsafe { RawBuf::from_raw(p, len) })
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // Device engines first: the NCCL communicator and the staging worker end before the
        // connections they may still be using.
        self.device.shutdown();
        // Let queued non-blocking operations finish for a while; what is still pending after
        // min(BRAID_TIMEOUT, 10 s) is aborted (its handles report Aborted, peers are told), so
        // dropping a communicator never blocks for long.
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.qcv.notify_all();
        if let Some(h) = lock(&self.progress).take() {
            let grace = self.inner.cfg.timeout.min(Duration::from_secs(10));
            let end = Instant::now() + grace;
            while !h.is_finished() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !h.is_finished() {
                tracing::warn!(target: "braid::coll", "rank {}: communicator dropped with operations pending for {:.1} s; aborting them", self.inner.rank, grace.as_secs_f64());
                self.inner.abort.store(true, Ordering::SeqCst);
            }
            let _ = h.join();
        }
        let queued: Vec<Job> = {
            let mut q = lock(&self.inner.queue);
            q.closed = true;
            q.jobs.drain(..).collect()
        };
        for j in queued {
            complete(
                &self.inner,
                j.slot,
                j.keep,
                Err(Error::InvalidUsage("communicator destroyed".into())),
            );
        }
        {
            let mut st = lock(&self.inner.state);
            if st.error.is_none() {
                for p in st.peers.iter_mut().flatten() {
                    p.conn.goodbye();
                }
            }
        }
        if let Some(d) = &self.inner.dial {
            d.close();
        }
        self.acceptor_stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        drop(lock(&self.client).take());
        // A hosted coordinator stops with the last communicator that shares it.
        drop(self.coordinator.take());
    }
}
