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

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use braid_transport::mem::{MemFabric, MemTransport};
use braid_transport::region::{Regions, RemoteMaps};
use braid_transport::shm::{ShmOptions, ShmTransport};
use braid_transport::tcp::{TcpOptions, TcpTransport};
use braid_transport::{Challenge, Conn, ConnectHandle, Listener, Transport};

use crate::coll::{order, select, Algo, CollKind, Plan, PlanCtx};
use crate::config::{Config, TransportKind};
use crate::error::{Error, Result};
use crate::exec::{Exec, P2pBatch, P2pOp, Peer, Sig};
use crate::mem::RawBuf;
use crate::membership::{self, auth, Client, ClientOptions, Coordinator, Registration, Role, View};
use crate::types::{DataType, Element, ReduceOp};

const HELLO_MAGIC: &[u8; 4] = b"BRDA";
const HELLO_VERSION: u16 = 2;
const PLAN_CACHE: usize = 32;

/// What a job does.
#[derive(Debug, Clone)]
enum JobDesc {
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

struct Slot {
    res: Mutex<Option<Outcome>>,
    cv: Condvar,
}

struct Job {
    desc: JobDesc,
    bufs: [RawBuf; 2],
    keep: Box<dyn Any + Send>,
    slot: Arc<Slot>,
}

// SAFETY (Send for P2pOp is derived from RawBuf's): a job owns (`keep`) the buffers its raw
// views point into, so moving it to the progress thread keeps them valid.

struct State {
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
    client: Mutex<Option<Client>>,
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
    device: crate::cuda::engine::DeviceSlot,
}

impl Inner {
    /// An inner that runs nothing (before the first view is installed, or after this member
    /// left): every operation fails with `InvalidUsage`.
    fn placeholder(
        cfg: Config,
        policy: select::Policy,
        member: u64,
        view: View,
        abort: Arc<AtomicBool>,
        regions: Arc<Regions>,
    ) -> Inner {
        let why = if view.rank_of(member).is_some() {
            format!("view epoch {} is not installed", view.epoch)
        } else {
            format!("member {member} left the group at epoch {}", view.epoch)
        };
        Inner {
            rank: 0,
            size: view.members.len(),
            member,
            view,
            policy,
            transport: "none",
            peer_transports: Vec::new(),
            ring: None,
            listen_addr: String::new(),
            state: Mutex::new(State {
                peers: Vec::new(),
                exec: Exec::new(0, cfg.spin, cfg.timeout, abort.clone()),
                seq: 0,
                error: Some(Error::InvalidUsage(why)),
                plans: HashMap::new(),
                last_plan: None,
                remote: RemoteMaps::new(),
                direct_bytes: 0,
            }),
            cfg,
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                outstanding: 0,
                closed: false,
            }),
            qcv: Condvar::new(),
            abort,
            stop: AtomicBool::new(false),
            regions,
            direct: false,
            all_shm: false,
            cma: false,
            poison: Arc::new(Poison::default()),
        }
    }
}

/// Builds the communicator state of an installed view.
#[allow(clippy::too_many_arguments)]
fn assemble(
    cfg: Config,
    policy: select::Policy,
    transports: &[Arc<dyn Transport>],
    handles: &[ConnectHandle],
    view: View,
    rank: usize,
    member: u64,
    peers: Vec<Option<Peer>>,
    peer_transports: Vec<(usize, &'static str)>,
    abort: Arc<AtomicBool>,
    regions: Arc<Regions>,
) -> Inner {
    let size = view.members.len();
    let all_shm =
        peer_transports.len() + 1 == size && peer_transports.iter().all(|(_, t)| *t == "shm");
    let direct = cfg.shm_direct
        && (2..=crate::direct::MAX_RANKS).contains(&size)
        && cfg.transport != TransportKind::Tcp
        && cfg.transport != TransportKind::Ib
        && view
            .members
            .iter()
            .all(|m| m.host_id == view.members[0].host_id);
    // Cross-memory attach for private buffers (BRAID_SHM_CMA): only where peers may attach
    // without weakening this process, or where the user opted in (1).
    let cma = direct
        && all_shm
        && cfg.shm_cma != crate::config::CmaUse::Never
        && {
            let r =
                braid_transport::cma::allow_peers_with(cfg.shm_cma == crate::config::CmaUse::All);
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| match &r {
            Ok(s) => tracing::debug!(target: "braid::init", "cross-memory attach: {s}"),
            Err(s) => tracing::info!(target: "braid::init", "cross-memory attach unavailable: {s}; private buffers use the shm rings"),
        });
            r.is_ok()
        };
    let transport = match peer_transports.first() {
        Some((_, t)) if peer_transports.iter().all(|(_, x)| x == t) => *t,
        Some(_) => "mixed",
        None => transports.first().map(|t| t.name()).unwrap_or("none"),
    };
    let listen_addr = handles
        .iter()
        .find(|h| h.transport == "tcp")
        .or(handles.first())
        .map(|h| String::from_utf8_lossy(&h.addr).into_owned())
        .unwrap_or_default();
    let ring = {
        let hosts: Vec<&str> = view.members.iter().map(|m| m.host_id.as_str()).collect();
        let ring = order::host_ring(&hosts);
        if ring.iter().enumerate().all(|(v, r)| v == *r) {
            None
        } else {
            tracing::info!(target: "braid::topo", "ring order by host: {ring:?}");
            Some(ring)
        }
    };
    let exec = Exec::new(rank, cfg.spin, cfg.timeout, abort.clone());
    Inner {
        rank,
        size,
        member,
        view,
        policy,
        transport,
        peer_transports,
        ring,
        listen_addr,
        cfg,
        state: Mutex::new(State {
            peers,
            exec,
            seq: 0,
            error: None,
            plans: HashMap::new(),
            last_plan: None,
            remote: RemoteMaps::new(),
            direct_bytes: 0,
        }),
        queue: Mutex::new(Queue {
            jobs: VecDeque::new(),
            outstanding: 0,
            closed: false,
        }),
        qcv: Condvar::new(),
        abort,
        stop: AtomicBool::new(false),
        regions,
        direct,
        all_shm,
        cma,
        poison: Arc::new(Poison::default()),
    }
}

/// The membership watcher of an installed view: a later view that drops a member of this one
/// for a failure, or this member losing the coordinator, trips the executor so that waits on
/// such peers fail at once (a graceful leave trips nothing: the leaver takes part until the
/// switch).
fn tripwire(trip: Arc<crate::exec::Tripwire>, ids: Vec<u64>, me: u64) -> membership::WatchFn {
    Box::new(move |w| match w {
        membership::Watch::View(v, why) => {
            if v.rank_of(me).is_none() {
                return;
            }
            let failed: Vec<(u64, String)> = ids
                .iter()
                .filter(|id| v.rank_of(**id).is_none() && why.contains(&format!("failure of {id}")))
                .map(|id| (*id, why.to_string()))
                .collect();
            if !failed.is_empty() {
                if let Ok(mut d) = trip.dropped.lock() {
                    d.extend(failed);
                }
                trip.set.store(true, Ordering::SeqCst);
            }
        }
        membership::Watch::Isolated(msg) => {
            if let Ok(mut i) = trip.isolated.lock() {
                *i = Some(msg);
            }
            trip.set.store(true, Ordering::SeqCst);
        }
        membership::Watch::Reconnected => {
            if let Ok(mut i) = trip.isolated.lock() {
                *i = None;
            }
        }
    })
}

/// Starts the thread that accepts data connections on every listener and puts them in the
/// stash. Every listener first runs [`hello_check`] on each hello (before it commits anything
/// to the peer); the thread checks the hello's form and job-token MAC, and the stash checks the
/// rest (view MAC over this connection's challenge, member, pid) as soon as the view of the
/// hello's epoch is known. Connections that fail are dropped with a log line naming the peer
/// and the reason.
fn spawn_acceptor(
    mut listeners: Vec<(Box<dyn Listener>, &'static str)>,
    stash: Arc<Stash>,
    stop: Arc<AtomicBool>,
    token: Option<Vec<u8>>,
) -> Result<JoinHandle<()>> {
    for (listener, _) in listeners.iter_mut() {
        listener.set_hello_check(hello_check(stash.clone()));
    }
    std::thread::Builder::new()
        .name("braid-accept".into())
        .spawn(move || {
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                accept_loop(&mut listeners, &stash, &stop, token.as_deref())
            }));
            if let Err(p) = run {
                // No more connections can arrive: waiters for them fail at once, naming why.
                let why = format!("the accept thread panicked: {}", panic_message(&*p));
                tracing::error!(target: "braid::net", "{why}");
                *lock(&stash.dead) = Some(why);
                stash.cv.notify_all();
            }
        })
        .map_err(|e| Error::System(format!("spawning the accept thread: {e}")))
}

/// The accept thread's loop (see [`spawn_acceptor`]), until `stop`.
fn accept_loop(
    listeners: &mut [(Box<dyn Listener>, &'static str)],
    stash: &Stash,
    stop: &AtomicBool,
    token: Option<&[u8]>,
) {
    let mut scratch = Vec::new();
    let mut pf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut got = false;
        for (listener, name) in listeners.iter_mut() {
            match listener.accept_challenged() {
                Ok(Some(a)) => {
                    got = true;
                    let t = token;
                    let parsed = parse_hello(&a.hello, t)
                        .and_then(|h| check_token(&h, &a.challenge, t).map(|()| h));
                    match parsed {
                        Ok(h) => stash.push(Arrived {
                            conn: a.conn,
                            hello: h,
                            challenge: a.challenge,
                            peer_pid: a.peer_pid,
                            transport: name,
                            at: Instant::now(),
                            verified: false,
                        }),
                        Err(why) => {
                            tracing::warn!(target: "braid::net", "dropping data connection from {}: {why}", a.conn.peer_desc());
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(target: "braid::net", "{name} accept: {e}");
                }
            }
        }
        if got {
            continue;
        }
        pf.clear();
        let mut fd_less = false;
        for (listener, _) in listeners.iter() {
            match listener.fd() {
                Some(fd) => pf.push(braid_transport::PollFd {
                    fd,
                    read: true,
                    write: false,
                }),
                None => fd_less = true,
            }
        }
        if fd_less || pf.is_empty() {
            std::thread::sleep(Duration::from_micros(200));
        } else {
            let _ = braid_transport::wait_fds(&pf, Duration::from_millis(20), &mut scratch);
        }
    }
}

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

fn bytes_of<T: Element>(s: &[T]) -> &[u8] {
    bytemuck::cast_slice(s)
}

fn bytes_of_mut<T: Element>(s: &mut [T]) -> &mut [u8] {
    bytemuck::cast_slice_mut(s)
}

fn invalid<T>(msg: String) -> Result<T> {
    Err(Error::InvalidArgument(msg))
}

/// Length of a data hello's fields (magic, version, flags, epoch, rank, member id), which its
/// MACs cover.
const HELLO_FIELDS: usize = 32;
/// Flag of a data hello: a job-token MAC follows the view MAC.
const HELLO_HAS_TOKEN: u16 = 1;
/// Domain label of a data hello's view MAC.
const HELLO_LABEL: &[u8] = b"braid-data";
/// Domain label of a data hello's job-token MAC.
const HELLO_TOKEN_LABEL: &[u8] = b"braid-data-token";

fn hello_fields(epoch: u64, rank: usize, member: u64, token: bool) -> [u8; HELLO_FIELDS] {
    let mut f = [0u8; HELLO_FIELDS];
    f[0..4].copy_from_slice(HELLO_MAGIC);
    f[4..6].copy_from_slice(&HELLO_VERSION.to_le_bytes());
    let flags = if token { HELLO_HAS_TOKEN } else { 0 };
    f[6..8].copy_from_slice(&flags.to_le_bytes());
    f[8..16].copy_from_slice(&epoch.to_le_bytes());
    f[16..24].copy_from_slice(&(rank as u64).to_le_bytes());
    f[24..32].copy_from_slice(&member.to_le_bytes());
    f
}

/// The data-connection hello that answers the acceptor's `challenge`: the fields, then
/// `HMAC(view_key, "braid-data" | challenge | fields)` with `view_key = auth::view_key(token,
/// nonce)`, then with a job token `HMAC(token, "braid-data-token" | challenge | fields)`. The
/// view nonce never crosses the wire; the challenge is fresh per connection, so a captured
/// hello answers no other connection.
fn hello_bytes(
    challenge: &Challenge,
    nonce: u64,
    epoch: u64,
    rank: usize,
    member: u64,
    token: Option<&[u8]>,
) -> Vec<u8> {
    let f = hello_fields(epoch, rank, member, token.is_some());
    let key = auth::view_key(token, nonce);
    let mut h = Vec::with_capacity(HELLO_FIELDS + 2 * auth::MAC_LEN);
    h.extend_from_slice(&f);
    h.extend_from_slice(&auth::mac(&key, &[HELLO_LABEL, challenge, &f]));
    if let Some(t) = token {
        h.extend_from_slice(&auth::mac(t, &[HELLO_TOKEN_LABEL, challenge, &f]));
    }
    h
}

/// A parsed data-connection hello (its form checked, its MACs not yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    epoch: u64,
    rank: usize,
    member: u64,
    /// The bytes the MACs cover.
    fields: [u8; HELLO_FIELDS],
    /// `HMAC(view_key, "braid-data" | challenge | fields)`.
    mac: [u8; auth::MAC_LEN],
    /// With a job token: `HMAC(token, "braid-data-token" | challenge | fields)`.
    token_mac: Option<[u8; auth::MAC_LEN]>,
}

/// Parses a data-connection hello: magic, version, length, and whether it carries a job-token
/// MAC exactly when this rank has a token.
pub(crate) fn parse_hello(
    h: &[u8],
    token: Option<&[u8]>,
) -> std::result::Result<Hello, &'static str> {
    if h.len() < HELLO_FIELDS || &h[..4] != HELLO_MAGIC {
        return Err("not a braid hello");
    }
    if u16::from_le_bytes([h[4], h[5]]) != HELLO_VERSION {
        return Err("another braid hello version");
    }
    let has_token = u16::from_le_bytes([h[6], h[7]]) & HELLO_HAS_TOKEN != 0;
    let want = HELLO_FIELDS + auth::MAC_LEN * if has_token { 2 } else { 1 };
    if h.len() != want {
        return Err("malformed braid hello (length)");
    }
    match (token.is_some(), has_token) {
        (false, true) => return Err("the peer authenticates with a job token, this rank has none"),
        (true, false) => return Err("no job-token MAC"),
        _ => {}
    }
    let u = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let mut fields = [0u8; HELLO_FIELDS];
    fields.copy_from_slice(&h[..HELLO_FIELDS]);
    let mut mac = [0u8; auth::MAC_LEN];
    mac.copy_from_slice(&h[HELLO_FIELDS..HELLO_FIELDS + auth::MAC_LEN]);
    let token_mac = has_token.then(|| {
        let mut m = [0u8; auth::MAC_LEN];
        m.copy_from_slice(&h[HELLO_FIELDS + auth::MAC_LEN..]);
        m
    });
    Ok(Hello {
        epoch: u(8),
        rank: usize::try_from(u(16)).unwrap_or(usize::MAX),
        member: u(24),
        fields,
        mac,
        token_mac,
    })
}

/// With a job token: checks the hello's job-token MAC over `challenge` (possible before the
/// view is known, so strangers without the token are refused at once).
fn check_token(
    h: &Hello,
    challenge: &Challenge,
    token: Option<&[u8]>,
) -> std::result::Result<(), &'static str> {
    match (token, h.token_mac) {
        (None, _) => Ok(()),
        (Some(t), Some(m)) => {
            if auth::verify(t, &[HELLO_TOKEN_LABEL, challenge, &h.fields], &m) {
                Ok(())
            } else {
                Err("wrong job-token MAC")
            }
        }
        (Some(_), None) => Err("no job-token MAC"),
    }
}

/// What a rank knows of a view to check data hellos against: its nonce, and (member id, pid)
/// by rank.
#[derive(Debug, Clone)]
struct KnownView {
    nonce: u64,
    members: Vec<(u64, u32)>,
}

impl KnownView {
    fn of(v: &View) -> KnownView {
        KnownView {
            nonce: v.nonce,
            members: v.members.iter().map(|m| (m.id, m.pid)).collect(),
        }
    }
}

/// The check every listener runs on a hello before it commits anything to the peer (the shm
/// transport maps a peer's segment only after it): the form, with a job token its token MAC,
/// and when this rank knows the view of the hello's epoch, the view MAC, the member and (shm) the connecting pid. A
/// hello for a view this rank does not know yet passes here (no key to check it with without
/// a token) and is checked when the view is known ([`Stash::learn`]).
fn hello_check(stash: Arc<Stash>) -> braid_transport::HelloCheck {
    Box::new(
        move |challenge: &Challenge, hello: &[u8], pid: Option<u32>| {
            let token = stash.token.as_deref();
            let h = match parse_hello(hello, token)
                .and_then(|h| check_token(&h, challenge, token).map(|()| h))
            {
                Ok(h) => h,
                Err(why) => return Err(format!("refusing a data connection: {why}")),
            };
            match stash.known(h.epoch) {
            Some(v) => stash.check(&h, challenge, pid, &v).map_err(|why| {
                format!(
                    "refusing a data connection claiming rank {} of view epoch {} (member {}): {why}",
                    h.rank, h.epoch, h.member
                )
            }),
            None => Ok(()),
        }
        },
    )
}

/// An accepted data connection with a well-formed hello, waiting to be claimed by a view
/// installation. `verified`: its hello was checked against the view of its epoch.
struct Arrived {
    conn: Box<dyn Conn>,
    hello: Hello,
    challenge: Challenge,
    peer_pid: Option<u32>,
    transport: &'static str,
    at: Instant,
    verified: bool,
}

fn refuse(a: &Arrived, why: &str) {
    tracing::warn!(target: "braid::net", "dropping data connection from {} claiming rank {} of view epoch {} (member {}): {why}",
        a.conn.peer_desc(), a.hello.rank, a.hello.epoch, a.hello.member);
}

/// Data connections accepted and not yet claimed. Connections for a view this rank has not
/// installed yet wait here (a faster peer may connect first); connections of an epoch this
/// rank already installed, or older than [`STASH_MAX_AGE`], are dropped.
///
/// A connection is verified as soon as the view of its epoch is known (at once when it is, or
/// when [`Stash::learn`] learns it) and dropped if it fails; only verified connections are
/// claimed. Unverified connections are capped ([`Stash::unverified_cap`]; the oldest goes).
struct Stash {
    list: Mutex<Vec<Arrived>>,
    cv: Condvar,
    /// Connections of epochs below this are stale.
    floor: std::sync::atomic::AtomicU64,
    /// The job token, if any.
    token: Option<Vec<u8>>,
    /// Views this rank knows, by epoch (at most [`STASH_VIEWS`], none below `floor`).
    views: Mutex<std::collections::BTreeMap<u64, KnownView>>,
    /// Size of the largest view known (scales the cap on unverified connections).
    largest: std::sync::atomic::AtomicUsize,
    /// View MACs of recent hellos, to name a replay as such.
    seen: Mutex<VecDeque<[u8; auth::MAC_LEN]>>,
    /// Set when the accept thread died (a panic): connecting fails with it at once.
    dead: Mutex<Option<String>>,
}

/// How long an unclaimed connection is kept.
const STASH_MAX_AGE: Duration = Duration::from_secs(300);
/// Views kept to check hellos against.
const STASH_VIEWS: usize = 16;
/// Hello MACs remembered to recognise a replay.
const SEEN_MACS: usize = 1024;
/// Unverified connections kept at least (more for large views: twice the largest view).
const MIN_UNVERIFIED: usize = 64;

impl Stash {
    /// A stash for a rank of a group of `world` ranks (scales the cap on unverified
    /// connections before the first view is known).
    fn new(token: Option<Vec<u8>>, world: usize) -> Stash {
        Stash {
            list: Mutex::new(Vec::new()),
            cv: Condvar::new(),
            floor: std::sync::atomic::AtomicU64::new(0),
            token,
            views: Mutex::new(std::collections::BTreeMap::new()),
            largest: std::sync::atomic::AtomicUsize::new(world),
            seen: Mutex::new(VecDeque::new()),
            dead: Mutex::new(None),
        }
    }

    /// The view of `epoch`, if this rank knows it.
    fn known(&self, epoch: u64) -> Option<KnownView> {
        lock(&self.views).get(&epoch).cloned()
    }

    /// Checks a hello against the challenge it answered and the view of its epoch: the rank
    /// belongs to the member it names, the view MAC (key `auth::view_key(token, nonce)`), and
    /// the connecting process's pid where the transport knows it (0: not visible from this pid
    /// namespace).
    fn check(
        &self,
        h: &Hello,
        challenge: &Challenge,
        peer_pid: Option<u32>,
        v: &KnownView,
    ) -> std::result::Result<(), String> {
        let Some(&(id, pid)) = v.members.get(h.rank) else {
            return Err(format!(
                "not a member of this view (it has {} ranks)",
                v.members.len()
            ));
        };
        if id != h.member {
            return Err(format!(
                "not a member of this view (rank {} is member {id})",
                h.rank
            ));
        }
        let key = auth::view_key(self.token.as_deref(), v.nonce);
        if !auth::verify(&key, &[HELLO_LABEL, challenge, &h.fields], &h.mac) {
            return Err(if lock(&self.seen).contains(&h.mac) {
                "replayed (the hello answers another connection's challenge)".into()
            } else {
                "wrong MAC".into()
            });
        }
        if let Some(p) = peer_pid {
            if p != 0 && p != pid {
                return Err(format!(
                    "the connecting process is pid {p}, member {id} is pid {pid}"
                ));
            }
        }
        Ok(())
    }

    /// Most unverified connections kept at once.
    fn unverified_cap(&self) -> usize {
        MIN_UNVERIFIED.max(2 * self.largest.load(Ordering::Relaxed))
    }

    fn push(&self, mut a: Arrived) {
        let mut l = lock(&self.list);
        let floor = self.floor.load(Ordering::SeqCst);
        l.retain(|x| x.hello.epoch >= floor && x.at.elapsed() < STASH_MAX_AGE);
        if a.hello.epoch < floor {
            tracing::debug!(target: "braid::net", "dropping a data connection of old epoch {} from {}", a.hello.epoch, a.conn.peer_desc());
            return;
        }
        if let Some(v) = self.known(a.hello.epoch) {
            if let Err(why) = self.check(&a.hello, &a.challenge, a.peer_pid, &v) {
                refuse(&a, &why);
                return;
            }
            self.remember(&a.hello.mac);
            a.verified = true;
        } else {
            let cap = self.unverified_cap();
            let n = l.iter().filter(|x| !x.verified).count();
            if n >= cap {
                if let Some(i) = l.iter().position(|x| !x.verified) {
                    let old = l.remove(i);
                    refuse(&old, &format!("{n} connections for views this rank does not know yet wait (at most {cap}); dropping the oldest"));
                }
            }
        }
        l.push(a);
        drop(l);
        self.cv.notify_all();
    }

    /// Remembers the view MAC of a hello that verified, so that a copy of it on another
    /// connection is named a replay. Only verified hellos: a forged one is never "seen".
    fn remember(&self, mac: &[u8; auth::MAC_LEN]) {
        let mut seen = lock(&self.seen);
        if seen.len() >= SEEN_MACS {
            seen.pop_front();
        }
        seen.push_back(*mac);
    }

    /// Learns a view (announced or being installed): hellos of its epoch are checked from now
    /// on as they arrive, and those waiting are checked now (failures dropped).
    fn learn(&self, view: &View) {
        if view.epoch < self.floor.load(Ordering::SeqCst) {
            return;
        }
        let kv = KnownView::of(view);
        {
            let mut vs = lock(&self.views);
            if vs.contains_key(&view.epoch) {
                return;
            }
            vs.insert(view.epoch, kv.clone());
            while vs.len() > STASH_VIEWS {
                vs.pop_first();
            }
        }
        self.largest
            .fetch_max(view.members.len(), Ordering::Relaxed);
        let mut l = lock(&self.list);
        l.retain_mut(|a| {
            if a.verified || a.hello.epoch != view.epoch {
                return true;
            }
            match self.check(&a.hello, &a.challenge, a.peer_pid, &kv) {
                Ok(()) => {
                    self.remember(&a.hello.mac);
                    a.verified = true;
                    true
                }
                Err(why) => {
                    refuse(a, &why);
                    false
                }
            }
        });
        drop(l);
        self.cv.notify_all();
    }

    /// Marks epochs up to `epoch` installed (their connections are stale now).
    fn installed(&self, epoch: u64) {
        self.floor.store(epoch + 1, Ordering::SeqCst);
        lock(&self.list).retain(|x| x.hello.epoch > epoch);
        lock(&self.views).retain(|e, _| *e > epoch);
    }
}

#[cfg(test)]
mod data_hello_tests {
    //! The data-hello checks of the stash, without a coordinator: a forged connection that
    //! arrived before the view was known loses to the real one, replays are named, the
    //! connecting pid must be the member's, unverified connections are capped.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use braid_transport::mem::{MemFabric, MemTransport};

    fn view(nonce: u64) -> View {
        let m = |id: u64, pid: u32| membership::Member {
            id,
            host_id: "h".into(),
            hostname: "h".into(),
            pid,
            role: Role::Worker,
            handle: Vec::new(),
            numa: None,
            weight: 1.0,
        };
        View {
            group: "g".into(),
            epoch: 1,
            nonce,
            members: vec![m(10, 100), m(11, 101)],
        }
    }

    /// One end of a fresh in-process connection.
    fn conn() -> Box<dyn Conn> {
        let t = MemTransport::new(MemFabric::new());
        let (mut l, h) = t.listen(0).unwrap();
        let th = std::thread::spawn(move || {
            let d = Instant::now() + Duration::from_secs(5);
            t.connect_challenged(&h, &|_| vec![1], d).unwrap()
        });
        let a = loop {
            if let Some(a) = l.accept_challenged().unwrap() {
                break a;
            }
            std::thread::yield_now();
        };
        drop(th.join().unwrap());
        a.conn
    }

    fn arrived(
        hello: &[u8],
        challenge: Challenge,
        pid: Option<u32>,
        token: Option<&[u8]>,
    ) -> Arrived {
        Arrived {
            conn: conn(),
            hello: parse_hello(hello, token).unwrap(),
            challenge,
            peer_pid: pid,
            transport: "mem",
            at: Instant::now(),
            verified: false,
        }
    }

    #[test]
    fn a_forged_connection_that_came_first_does_not_win() {
        for token in [None, Some(&b"t0ken"[..])] {
            let s = Stash::new(token.map(|t| t.to_vec()), 2);
            let v = view(77);
            let (c1, c2) = ([1u8; 16], [2u8; 16]);
            // A stranger who does not know the view nonce claims rank 0 first.
            let forged = hello_bytes(&c1, 78, 1, 0, 10, token);
            let real = hello_bytes(&c2, 77, 1, 0, 10, token);
            s.push(arrived(&forged, c1, None, token));
            s.push(arrived(&real, c2, None, token));
            assert_eq!(lock(&s.list).len(), 2, "unknown view: both wait unverified");
            s.learn(&v);
            let l = lock(&s.list);
            assert_eq!(l.len(), 1);
            assert!(l[0].verified);
            assert_eq!(l[0].challenge, c2);
        }
    }

    #[test]
    fn replays_wrong_members_and_pids_are_refused() {
        let s = Stash::new(None, 2);
        let v = view(77);
        s.learn(&v);
        let kv = KnownView::of(&v);
        let c = [5u8; 16];
        let h = parse_hello(&hello_bytes(&c, 77, 1, 1, 11, None), None).unwrap();
        assert_eq!(s.check(&h, &c, None, &kv), Ok(()));
        assert_eq!(s.check(&h, &c, Some(101), &kv), Ok(()));
        // 0: the peer's pid is not visible from this pid namespace.
        assert_eq!(s.check(&h, &c, Some(0), &kv), Ok(()));
        assert!(s
            .check(&h, &c, Some(4242), &kv)
            .unwrap_err()
            .contains("pid 4242"));
        // The same hello on a connection with another challenge.
        let other = [6u8; 16];
        assert_eq!(s.check(&h, &other, None, &kv).unwrap_err(), "wrong MAC");
        s.push(arrived(&hello_bytes(&c, 77, 1, 1, 11, None), c, None, None));
        assert!(lock(&s.list)[0].verified);
        assert!(s
            .check(&h, &other, None, &kv)
            .unwrap_err()
            .starts_with("replayed"));
        // A rank that is another member's, a rank past the view.
        let wrong = parse_hello(&hello_bytes(&c, 77, 1, 1, 10, None), None).unwrap();
        assert!(s
            .check(&wrong, &c, None, &kv)
            .unwrap_err()
            .contains("not a member"));
        let past = parse_hello(&hello_bytes(&c, 77, 1, 7, 10, None), None).unwrap();
        assert!(s
            .check(&past, &c, None, &kv)
            .unwrap_err()
            .contains("not a member"));
        // A hello pushed for a known view that fails is not kept.
        s.push(arrived(
            &hello_bytes(&other, 1, 1, 0, 10, None),
            other,
            None,
            None,
        ));
        assert_eq!(lock(&s.list).len(), 1);
    }

    #[test]
    fn hello_form_and_token_mac() {
        let c = [9u8; 16];
        let tok = &b"t0ken"[..];
        let with = hello_bytes(&c, 77, 1, 0, 10, Some(tok));
        let without = hello_bytes(&c, 77, 1, 0, 10, None);
        assert!(parse_hello(&with, None).is_err());
        assert!(parse_hello(&without, Some(tok)).is_err());
        assert!(parse_hello(&without[..40], None).is_err());
        assert!(parse_hello(b"GET / HTTP/1.0\r\n\r\n..............", None).is_err());
        let h = parse_hello(&with, Some(tok)).unwrap();
        assert_eq!(check_token(&h, &c, Some(tok)), Ok(()));
        assert!(check_token(&h, &[0u8; 16], Some(tok)).is_err());
        assert!(check_token(&h, &c, Some(b"guess")).is_err());
        // The check every listener runs: refuses a token MAC that does not answer the challenge
        // even for a view it does not know; for a known view checks the view MAC too.
        let s = Arc::new(Stash::new(Some(tok.to_vec()), 2));
        let check = hello_check(s.clone());
        assert!(check(&c, &with, None).is_ok());
        assert!(check(&[0u8; 16], &with, None).is_err());
        let stranger = hello_bytes(&c, 78, 1, 0, 10, Some(tok));
        assert!(
            check(&c, &stranger, None).is_ok(),
            "view unknown: checked later"
        );
        s.learn(&view(77));
        assert!(check(&c, &stranger, None).is_err());
        assert!(check(&c, &with, None).is_ok());
        // A local (shm) peer's pid must be the member's, before anything is mapped.
        assert!(check(&c, &with, Some(100)).is_ok());
        let e = check(&c, &with, Some(4242)).unwrap_err();
        assert!(e.contains("pid"), "{e}");
    }

    #[test]
    fn unverified_connections_are_capped() {
        let s = Stash::new(None, 2);
        for i in 0..MIN_UNVERIFIED + 5 {
            let c = [i as u8; 16];
            s.push(arrived(&hello_bytes(&c, 1, 9, 0, 10, None), c, None, None));
        }
        let l = lock(&s.list);
        assert_eq!(l.len(), MIN_UNVERIFIED);
        // The oldest went.
        assert_eq!(l[0].challenge, [5u8; 16]);
    }
}

const HANDLES_MAGIC: &[u8; 4] = b"BRDL";

/// The peers (indexed by rank) and the transport name used for each, by rank.
type Connected = (Vec<Option<Peer>>, Vec<(usize, &'static str)>);

/// Encodes the connect handles of every transport a rank listens on (the membership handle):
/// magic `BRDL`, a count (u8), then per handle a u16 LE length and `ConnectHandle::encode()`.
pub(crate) fn encode_handles(hs: &[ConnectHandle]) -> Vec<u8> {
    let mut v = HANDLES_MAGIC.to_vec();
    v.push(hs.len().min(255) as u8);
    for h in hs.iter().take(255) {
        let b = h.encode();
        v.extend_from_slice(&(b.len().min(u16::MAX as usize) as u16).to_le_bytes());
        v.extend_from_slice(&b[..b.len().min(u16::MAX as usize)]);
    }
    v
}

/// Decodes [`encode_handles`] output (or a single bare handle).
pub(crate) fn decode_handles(b: &[u8]) -> std::result::Result<Vec<ConnectHandle>, String> {
    if b.len() < 5 || &b[..4] != HANDLES_MAGIC {
        return ConnectHandle::decode(b)
            .map(|h| vec![h])
            .map_err(|e| e.to_string());
    }
    let n = b[4] as usize;
    let mut off = 5;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = b
            .get(off..off + 2)
            .map(|x| u16::from_le_bytes([x[0], x[1]]) as usize)
            .ok_or("truncated handle list")?;
        let blob = b
            .get(off + 2..off + 2 + len)
            .ok_or("truncated handle list")?;
        out.push(ConnectHandle::decode(blob).map_err(|e| e.to_string())?);
        off += 2 + len;
    }
    if off != b.len() {
        return Err("trailing bytes after the handle list".into());
    }
    Ok(out)
}

/// Builds the transports the configuration allows, in order of preference (shm is used only
/// between ranks with the same host id).
pub(crate) fn make_transport(cfg: &Config) -> Result<Vec<Arc<dyn Transport>>> {
    make_transport_with(cfg, None)
}

/// As [`make_transport`]; with `regions`, shm sends from those regions may go single-copy
/// (BRAID_SHM_DIRECT).
pub(crate) fn make_transport_with(
    cfg: &Config,
    regions: Option<Arc<Regions>>,
) -> Result<Vec<Arc<dyn Transport>>> {
    let shm = || -> Result<Arc<dyn Transport>> {
        let opts = ShmOptions {
            ring_bytes: cfg.shm_ring_bytes,
            spin: cfg.shm_spin,
            direct_min: if cfg.shm_direct { 1 } else { usize::MAX },
            ..ShmOptions::default()
        };
        let t = match &regions {
            Some(r) if cfg.shm_direct => ShmTransport::with_regions(opts, r.clone()),
            _ => ShmTransport::new(opts),
        }
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(Arc::new(t))
    };
    match cfg.transport {
        TransportKind::Shm => return Ok(vec![shm()?]),
        TransportKind::Auto => {
            // ib between hosts where this rank has a usable device; tcp otherwise (a peer
            // without ib publishes no ib handle, so the pair falls back to tcp).
            let mut v = vec![shm()?];
            match make_ib(cfg, regions.as_deref()) {
                Ok(t) => v.push(t),
                Err(reason) => {
                    static ONCE: std::sync::Once = std::sync::Once::new();
                    ONCE.call_once(
                        || tracing::info!(target: "braid::ib", "no RDMA device: {reason}"),
                    );
                }
            }
            v.push(make_tcp(cfg)?);
            return Ok(v);
        }
        TransportKind::Ib => {
            return make_ib(cfg, regions.as_deref())
                .map(|t| vec![t])
                .map_err(|reason| {
                    Error::InvalidArgument(format!("BRAID_TRANSPORT=ib: no RDMA device: {reason}"))
                })
        }
        TransportKind::Tcp => {}
    }
    Ok(vec![make_tcp(cfg)?])
}

/// The address this rank listens on (BRAID_BIND_ADDR, else the interface towards the
/// coordinator, else loopback).
fn bind_ip(cfg: &Config) -> Result<std::net::IpAddr> {
    Ok(match &cfg.bind_addr {
        Some(a) => a.parse().map_err(|_| {
            Error::InvalidArgument(format!("BRAID_BIND_ADDR={a}: not an IP address"))
        })?,
        None => cfg
            .coordinator
            .as_deref()
            .and_then(|a| membership::local_ip_towards(a).ok())
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
    })
}

/// The ib transport per BRAID_IB_*, or why there is none.
fn make_ib(
    cfg: &Config,
    regions: Option<&Regions>,
) -> std::result::Result<Arc<dyn Transport>, String> {
    use braid_transport::ib::{IbOptions, IbTransport, Provider};
    let bind = bind_ip(cfg).map_err(|e| e.to_string())?;
    let t = IbTransport::new(IbOptions {
        provider: if cfg.ib.emulated {
            Provider::Emulated
        } else {
            Provider::Verbs
        },
        device: cfg.ib.device.clone(),
        port: cfg.ib.port,
        gid_index: cfg.ib.gid_index,
        traffic_class: cfg.ib.traffic_class,
        qps_per_peer: cfg.ib.qps_per_peer,
        bind,
        plugin: cfg.ib.plugin.clone(),
    })
    .map_err(|e| match e {
        braid_transport::NetError::Unavailable(r) => r,
        other => other.to_string(),
    })?;
    if let Some(r) = regions {
        t.attach_regions(r);
    }
    Ok(Arc::new(t))
}

fn make_tcp(cfg: &Config) -> Result<Arc<dyn Transport>> {
    let bind = bind_ip(cfg)?;
    let t = TcpTransport::new(TcpOptions {
        streams: cfg.tcp_streams,
        stripe_min: cfg.tcp_stripe_min,
        bind,
        sock_buf: None,
    })
    .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    Ok(Arc::new(t))
}

impl Communicator {
    /// Creates a communicator from the environment (`BRAID_*`, or torchrun/MPI/SLURM
    /// variables): rendezvous through the coordinator, then connections to every peer.
    ///
    /// Errors: invalid configuration; coordinator unreachable or refusing (after
    /// `BRAID_INIT_TIMEOUT`); peers not connecting in time.
    pub fn init() -> Result<Communicator> {
        let cfg = Config::from_env()?;
        Communicator::init_with(cfg)
    }

    /// Creates a communicator from an explicit configuration over the transport it names.
    pub fn init_with(cfg: Config) -> Result<Communicator> {
        crate::config::init_logging(&cfg.log);
        let regions = Regions::new();
        let ts = make_transport_with(&cfg, Some(regions.clone()))?;
        Communicator::init_on(cfg, ts, regions)
    }

    /// Creates a communicator over the in-process transport of `fabric` (ranks as threads of
    /// one process; for tests and examples). The coordinator is still used for rendezvous.
    pub fn init_in_process(cfg: Config, fabric: Arc<MemFabric>) -> Result<Communicator> {
        Communicator::init_with_transports(cfg, vec![Arc::new(MemTransport::new(fabric))])
    }

    /// Creates a communicator over `transports` (each peer is reached over the first of them
    /// that it also listens on). For tests that wrap or instrument a transport.
    #[doc(hidden)]
    pub fn init_with_transports(
        cfg: Config,
        transports: Vec<Arc<dyn Transport>>,
    ) -> Result<Communicator> {
        Communicator::init_on(cfg, transports, Regions::new())
    }

    /// Joins a running elastic group (configuration from the environment, as
    /// [`Communicator::init`], with `BRAID_ELASTIC` forced on): registers with the coordinator
    /// and returns once the running ranks admitted this process at their next view change
    /// (when they call [`Communicator::update`]). Rank = position in the new view (joiners
    /// come after the members that stay). Call [`Communicator::sync_from_oldest`] next, as the
    /// running ranks do after their `update()` returned true, to receive the current state.
    ///
    /// If the group is still forming (its first view not yet published), this process becomes
    /// one of its initial ranks instead.
    ///
    /// Errors: as [`Communicator::init`]; `Error::Timeout` if not admitted within
    /// `BRAID_INIT_TIMEOUT`.
    pub fn join() -> Result<Communicator> {
        let mut cfg = Config::from_env()?;
        cfg.elastic = true;
        Communicator::init_with(cfg)
    }

    fn init_on(
        cfg: Config,
        transports: Vec<Arc<dyn Transport>>,
        regions: Arc<Regions>,
    ) -> Result<Communicator> {
        let deadline = Instant::now() + cfg.init_timeout;
        let world = cfg.world_size.ok_or_else(|| {
            Error::InvalidArgument(
                "world size unknown: set BRAID_WORLD_SIZE (or WORLD_SIZE), or launch with braid-run"
                    .into(),
            )
        })?;
        let coord_addr = cfg.coordinator.clone().ok_or_else(|| {
            Error::InvalidArgument(
                "coordinator unknown: set BRAID_COORDINATOR=host:port (or MASTER_ADDR and MASTER_PORT), or launch with braid-run"
                    .into(),
            )
        })?;
        let policy = select::Policy::parse(&cfg.algo, cfg.small_bytes)?;
        let token: Option<Vec<u8>> = cfg.job_token.as_ref().map(|t| t.0.clone());
        let coordinator = if cfg.host_coordinator {
            Some(Arc::new(Coordinator::bind_with(
                &coord_addr,
                membership::CoordinatorOptions {
                    job_token: token.clone(),
                    state_file: cfg.coordinator_state.clone(),
                    ..membership::CoordinatorOptions::default()
                },
            )?))
        } else {
            None
        };

        let mut listeners: Vec<(Box<dyn Listener>, &'static str)> = Vec::new();
        let mut handles: Vec<ConnectHandle> = Vec::new();
        for t in &transports {
            let (l, h) = t
                .listen(0)
                .map_err(|e| Error::System(format!("{} listen: {e}", t.name())))?;
            listeners.push((l, t.name()));
            handles.push(h);
        }
        let stash = Arc::new(Stash::new(token.clone(), world));
        let acceptor_stop = Arc::new(AtomicBool::new(false));
        let acceptor = spawn_acceptor(
            listeners,
            stash.clone(),
            acceptor_stop.clone(),
            token.clone(),
        )?;

        let abort = Arc::new(AtomicBool::new(false));
        let reg = Registration {
            group: cfg.group.clone(),
            world_size: world,
            rank: cfg.rank,
            host_id: cfg
                .host_id
                .clone()
                .unwrap_or_else(membership::local_host_id),
            hostname: membership::local_hostname(),
            pid: std::process::id(),
            role: Role::Worker,
            handle: encode_handles(&handles),
            numa: crate::topo::local_numa_node(),
            weight: cfg.weight,
            elastic: cfg.elastic,
            policy: membership::GroupPolicy {
                min_size: cfg.min_size,
                max_size: cfg.max_size,
                join_window_ms: cfg.join_window.as_millis() as u64,
            },
            heartbeat_timeout_ms: if cfg.elastic {
                cfg.heartbeat_timeout.as_millis() as u64
            } else {
                0
            },
            light: false,
            client_nonce: String::new(),
        };
        let copts = ClientOptions {
            token: token.clone(),
            heartbeat: if cfg.elastic {
                cfg.heartbeat
            } else {
                Duration::ZERO
            },
            silence: if cfg.elastic {
                cfg.heartbeat_timeout
            } else {
                Duration::ZERO
            },
        };
        let stop_acceptor = |acc: JoinHandle<()>| {
            acceptor_stop.store(true, Ordering::Relaxed);
            let _ = acc.join();
        };
        let (client, member, view) =
            match membership::rendezvous_with(&coord_addr, &reg, &copts, deadline, &abort) {
                Ok(x) => x,
                Err(e) => {
                    stop_acceptor(acceptor);
                    return Err(e);
                }
            };
        let names: Vec<&str> = transports.iter().map(|t| t.name()).collect();
        tracing::info!(target: "braid::init", "member {member} epoch {} size {} transports {}", view.epoch, view.members.len(), names.join(","));
        let mut comm = Communicator {
            inner: Arc::new(Inner::placeholder(
                cfg,
                policy,
                member,
                view.clone(),
                abort,
                regions.clone(),
            )),
            progress: Mutex::new(None),
            acceptor: Some(acceptor),
            acceptor_stop,
            client: Mutex::new(Some(client)),
            coordinator,
            transports,
            handles,
            stash,
            token,
            left: false,
            attempted: 0,
            regions,
            subgroups: Mutex::new(HashMap::new()),
            device: crate::cuda::engine::DeviceSlot::default(),
        };
        comm.install(view, deadline)?;
        Ok(comm)
    }

    /// Connects to the members of `view` and makes it this communicator's view. The old
    /// view's connections are closed (after everything sent on them was delivered).
    fn install(&mut self, view: View, deadline: Instant) -> Result<()> {
        let member = self.inner.member;
        self.attempted = self.attempted.max(view.epoch);
        let old_peers = std::mem::take(&mut lock(&self.inner.state).peers);
        for mut p in old_peers.into_iter().flatten() {
            p.conn.goodbye();
        }
        let Some(rank) = view.rank_of(member) else {
            // Not in the new view: this member left.
            self.left = true;
            if let Some(c) = lock(&self.client).as_ref() {
                c.installed(view.epoch);
            }
            self.stash.installed(view.epoch);
            tracing::info!(target: "braid::init", "member {member}: not in view epoch {}; left the group", view.epoch);
            let cfg = self.inner.cfg.clone();
            let policy = self.inner.policy.clone();
            self.inner = Arc::new(Inner::placeholder(
                cfg,
                policy,
                member,
                view,
                Arc::new(AtomicBool::new(false)),
                self.regions.clone(),
            ));
            return Ok(());
        };
        let abort = Arc::new(AtomicBool::new(false));
        let superseded = || {
            lock(&self.client)
                .as_ref()
                .is_some_and(|c| c.announced_epoch() > view.epoch || c.expelled().is_some())
        };
        let res = connect_peers(
            &self.transports,
            self.inner.cfg.transport,
            &view,
            rank,
            member,
            &self.stash,
            self.token.as_deref(),
            deadline,
            &abort,
            &superseded,
        );
        let (peers, peer_transports) = match res {
            Ok(x) => x,
            Err(e) => {
                // The communicator stays on its old view, failed: update() moves on.
                fail_state(&mut lock(&self.inner.state), e.clone());
                return Err(e);
            }
        };
        let cfg = self.inner.cfg.clone();
        let policy = self.inner.policy.clone();
        let inner = assemble(
            cfg,
            policy,
            &self.transports,
            &self.handles,
            view,
            rank,
            member,
            peers,
            peer_transports,
            abort,
            self.regions.clone(),
        );
        let epoch = inner.view.epoch;
        let trip = lock(&inner.state).exec.trip.clone();
        let ids: Vec<u64> = inner.view.members.iter().map(|m| m.id).collect();
        self.inner = Arc::new(inner);
        self.stash.installed(epoch);
        if let Some(c) = lock(&self.client).as_ref() {
            // Views announced from now on are known to the acceptor at once: hellos of faster
            // peers are checked as they arrive.
            let tw = tripwire(trip, ids, member);
            let stash = self.stash.clone();
            c.set_watch(Box::new(move |w| {
                if let membership::Watch::View(v, _) = &w {
                    stash.learn(v);
                }
                tw(w)
            }));
            c.installed(epoch);
        }
        tracing::info!(target: "braid::init", "member {member}: installed view epoch {epoch}: rank {rank} of {}", self.inner.size);
        Ok(())
    }

    /// Waits for queued non-blocking operations and stops the progress thread (it restarts
    /// on the next non-blocking call, on the then current view).
    fn quiesce(&mut self) -> Result<()> {
        let end = Instant::now() + self.inner.cfg.timeout;
        {
            let mut q = lock(&self.inner.queue);
            while q.outstanding > 0 {
                if Instant::now() >= end {
                    return Err(Error::Timeout {
                        what: format!(
                            "update(): waiting for {} pending non-blocking operations",
                            q.outstanding
                        ),
                        secs: self.inner.cfg.timeout.as_secs_f64(),
                    });
                }
                q = self
                    .inner
                    .qcv
                    .wait_timeout(q, Duration::from_millis(20))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.qcv.notify_all();
        if let Some(h) = lock(&self.progress).take() {
            let _ = h.join();
        }
        // The thread is gone: the next non-blocking call starts a new one, which must not see
        // the stop request (an update() that kept the view keeps this `inner`).
        self.inner.stop.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Adopts the next membership view, if there is one, at a point all members agree on.
    ///
    /// Call it from the training loop between steps, on every rank (it is collective over the
    /// current view). Returns `Ok(true)` when the view changed: rank and size may differ, new
    /// members are connected, collectives include them; the caller then typically runs
    /// [`Communicator::sync_from_oldest`] so joiners receive the current state. Returns
    /// `Ok(false)` when nothing changed (cost: one 8-byte all-reduce; nothing is asked of the
    /// coordinator, which pushes announcements to members).
    ///
    /// After a failure (a collective returned `PeerLost`, or a peer aborted), `update()` moves
    /// the survivors into the next view that excludes the lost member: it asks the coordinator
    /// for a resync and waits (at most `BRAID_INIT_TIMEOUT`) for that view, then returns
    /// `Ok(true)`; the sticky error is cleared. Non-blocking operations still pending are waited
    /// for first.
    ///
    /// After [`Communicator::leave`], the update that excludes this member returns `Ok(true)`
    /// with [`Communicator::has_left`] true; later collectives fail with `InvalidUsage`.
    ///
    /// On a group that is not elastic (`BRAID_ELASTIC` unset) it returns `Ok(false)`, or the
    /// sticky error if the communicator failed.
    ///
    /// Errors: the sticky error on non-elastic groups; `Error::Aborted` after
    /// [`Communicator::abort`]; `Error::Coordinator` when the coordinator retired this member
    /// (declared dead, e.g. after a network partition: it may join again as a new member);
    /// `Error::Timeout` when no view arrives in time.
    pub fn update(&mut self) -> Result<bool> {
        if self.left {
            return Err(Error::InvalidUsage(format!(
                "member {} left the group at epoch {}",
                self.inner.member, self.inner.view.epoch
            )));
        }
        let sticky = self.error();
        if !self.inner.cfg.elastic {
            return match sticky {
                Some(e) => Err(e),
                None => Ok(false),
            };
        }
        if matches!(sticky, Some(Error::Aborted)) || self.inner.abort.load(Ordering::SeqCst) {
            return Err(Error::Aborted);
        }
        if let Some(why) = lock(&self.client).as_ref().and_then(|c| c.expelled()) {
            return Err(Error::Coordinator(why));
        }
        self.quiesce()?;
        let cur = self.inner.view.epoch;
        let announced = lock(&self.client)
            .as_ref()
            .map_or(cur, |c| c.announced_epoch());
        // 1. Healthy: agree on the highest announced epoch.
        let mut target = None;
        if sticky.is_none() && self.attempted <= cur {
            let mut v = [announced];
            match self.all_reduce_inplace(&mut v, ReduceOp::Max) {
                Ok(()) if v[0] <= cur => return Ok(false),
                Ok(()) => target = Some(v[0]),
                Err(e) => {
                    tracing::warn!(target: "braid::init", "member {}: update() agreement failed: {e}; resynchronising", self.inner.member);
                }
            }
        }
        let deadline = Instant::now() + self.inner.cfg.init_timeout;
        let start = Instant::now();
        let mut round = 0u32;
        loop {
            round += 1;
            let epoch = match target.take() {
                Some(e) => e,
                None => {
                    // 2. Failed: ask for the next view and wait for it.
                    let base = cur.max(self.attempted);
                    let suspects = self.suspects();
                    let guard = lock(&self.client);
                    let Some(c) = guard.as_ref() else {
                        return Err(Error::InvalidUsage("no coordinator connection".into()));
                    };
                    c.resync(base, suspects);
                    let abort = self.inner.abort.clone();
                    c.wait_epoch(base + 1, deadline, &abort)?
                }
            };
            let got = {
                let guard = lock(&self.client);
                let Some(c) = guard.as_ref() else {
                    return Err(Error::InvalidUsage("no coordinator connection".into()));
                };
                c.view_of(epoch).or_else(|| {
                    // Agreed on an epoch whose view this member missed (it reconnected meanwhile):
                    // take the newest.
                    let top = c.announced_epoch();
                    c.view_of(top)
                })
            };
            let Some((view, reason)) = got else {
                if Instant::now() >= deadline {
                    return Err(Error::Timeout {
                        what: format!("update(): view epoch {epoch} never arrived"),
                        secs: start.elapsed().as_secs_f64(),
                    });
                }
                continue;
            };
            let ep = view.epoch;
            match self.install(view, deadline) {
                Ok(()) => {
                    tracing::info!(target: "braid::init", "member {}: view epoch {ep} ({reason}) after {:.3} s, {round} round(s)",
                        self.inner.member, start.elapsed().as_secs_f64());
                    return Ok(true);
                }
                Err(e) => {
                    if let Some(why) = lock(&self.client).as_ref().and_then(|c| c.expelled()) {
                        return Err(Error::Coordinator(why));
                    }
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    tracing::warn!(target: "braid::init", "member {}: installing view epoch {ep} failed: {e}; trying the next one", self.inner.member);
                }
            }
        }
    }

    /// Member ids named by the sticky error (the peers this member lost).
    fn suspects(&self) -> Vec<u64> {
        let view = &self.inner.view;
        match self.error() {
            Some(Error::PeerLost { member, .. }) => vec![member],
            Some(Error::Remote { rank, .. }) => {
                view.members.get(rank).map(|m| m.id).into_iter().collect()
            }
            _ => Vec::new(),
        }
    }

    /// Announces a graceful leave to the coordinator. Keep running the training loop (with
    /// [`Communicator::update`] between steps) until `update()` returns true and
    /// [`Communicator::has_left`] is true: the other members adopt a view without this member
    /// at that point, and nothing fails.
    ///
    /// Errors: `InvalidUsage` when the group is not elastic or this member already left.
    pub fn leave(&mut self) -> Result<()> {
        if !self.inner.cfg.elastic {
            return Err(Error::InvalidUsage(
                "leave() needs an elastic group (BRAID_ELASTIC=1)".into(),
            ));
        }
        if self.left {
            return Err(Error::InvalidUsage("this member already left".into()));
        }
        match lock(&self.client).as_ref() {
            Some(c) => {
                c.leave();
                Ok(())
            }
            None => Err(Error::InvalidUsage("no coordinator connection".into())),
        }
    }

    /// Whether this member left the group (see [`Communicator::leave`]).
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// Elastic pipelines: reports that this member's stage, blocks `blocks` of a pipeline whose
    /// block costs are `costs`, took `seconds` of compute (excluding waits) in the last step.
    /// The coordinator follows each member's measured throughput (stage cost per second,
    /// smoothed) and, when every stage has reported at least twice in the current view and a
    /// plan with the measured weights is predicted to shorten the slowest stage by more than
    /// `BRAID_PIPELINE_REPLAN_GAIN`, publishes a view with the same members re-weighed
    /// (reason "reweigh: ..."); [`Communicator::update`] adopts it like any view change, and
    /// a re-plan over the new view's weights gives slow members fewer blocks.
    ///
    /// Returns at once: the report is sent by the membership thread (never on the caller's
    /// thread). `seconds` 0 or an empty stage is accepted and ignored.
    ///
    /// Errors: `InvalidUsage` when the group is not elastic or this member left;
    /// `InvalidArgument` for more than 65536 blocks, a negative or non-finite cost or time, or
    /// `blocks` not within `costs`.
    pub fn report_pipeline_metric(
        &self,
        seconds: f64,
        blocks: std::ops::Range<usize>,
        costs: &[f64],
    ) -> Result<()> {
        if !self.inner.cfg.elastic {
            return Err(Error::InvalidUsage(
                "pipeline metrics need an elastic group (BRAID_ELASTIC=1)".into(),
            ));
        }
        if self.left {
            return Err(Error::InvalidUsage("this member left the group".into()));
        }
        let epoch = self.inner.view.epoch;
        let gain = self.inner.cfg.pipeline_replan_gain;
        match lock(&self.client).as_ref() {
            Some(c) => c.report_pipeline_metric(epoch, seconds, blocks, costs, gain),
            None => Err(Error::InvalidUsage("no coordinator connection".into())),
        }
    }

    /// Broadcasts `buf` from the member with the smallest id (the oldest member) to all: after
    /// a view change, joiners start from the current parameters. Collective; call it on every
    /// rank, once per buffer, in the same order.
    ///
    /// Errors: as [`Communicator::broadcast`].
    pub fn sync_from_oldest<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        let root = self.oldest_rank();
        self.broadcast(buf, root)
    }

    /// The rank of the member with the smallest id.
    pub fn oldest_rank(&self) -> usize {
        self.inner
            .view
            .members
            .iter()
            .enumerate()
            .min_by_key(|(_, m)| m.id)
            .map_or(0, |(r, _)| r)
    }

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
    /// order, without this rank.
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
        }
        self.inner.qcv.notify_all();
    }

    // ---- internals -------------------------------------------------------------------

    fn check_root(&self, root: usize) -> Result<()> {
        if root >= self.size() {
            return invalid(format!(
                "root {root} is not a rank of this communicator of {} ranks",
                self.size()
            ));
        }
        Ok(())
    }

    /// Runs a job on the calling thread, after any queued non-blocking jobs.
    fn run_blocking(&self, desc: JobDesc, bufs: [RawBuf; 2]) -> Result<()> {
        desc.check()?;
        let mut q = lock(&self.inner.queue);
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
    fn submit<R: 'static>(
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

    fn ensure_progress_thread(&self) -> Result<()> {
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

    fn coll<T: Element>(
        &self,
        kind: CollKind,
        op: ReduceOp,
        count: usize,
        root: usize,
        send: RawBuf,
        recv: RawBuf,
    ) -> Result<()> {
        self.run_blocking(
            JobDesc::Coll {
                kind,
                dtype: T::DTYPE,
                op,
                count,
                root,
            },
            [send, recv],
        )
    }

    /// Splits an in-place buffer of `n` equal blocks: (block count, whole buffer, this rank's
    /// block).
    fn own_block<T: Element>(&self, what: &str, buf: &mut [T]) -> Result<(usize, RawBuf, RawBuf)> {
        let n = self.size();
        if buf.len() % n != 0 {
            return invalid(format!(
                "{what}: {} elements are not a multiple of {n} ranks",
                buf.len()
            ));
        }
        let c = buf.len() / n;
        let es = T::DTYPE.size();
        let all = RawBuf::from_mut(bytes_of_mut(buf));
        let mine = sub(all, self.rank() * c * es, c * es)?;
        Ok((c, all, mine))
    }

    // ---- collectives -----------------------------------------------------------------

    /// All-reduce: `recv[i] = send_0[i] ⊕ … ⊕ send_{n-1}[i]` on every rank.
    ///
    /// Errors: `send.len() != recv.len()`.
    pub fn all_reduce<T: Element>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        if send.len() != recv.len() {
            return invalid(format!(
                "all_reduce: send has {} elements, recv {}",
                send.len(),
                recv.len()
            ));
        }
        let n = send.len();
        self.coll::<T>(
            CollKind::AllReduce,
            op,
            n,
            0,
            RawBuf::from_slice(bytes_of(send)),
            RawBuf::from_mut(bytes_of_mut(recv)),
        )
    }

    /// In-place all-reduce of `buf`.
    pub fn all_reduce_inplace<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let n = buf.len();
        let b = RawBuf::from_mut(bytes_of_mut(buf));
        self.coll::<T>(CollKind::AllReduce, op, n, 0, b, b)
    }

    /// Reduce-scatter: `send` holds `n` blocks of `recv.len()` elements; rank r receives the
    /// reduction of everyone's block r.
    ///
    /// Errors: `send.len() != recv.len() * n`.
    pub fn reduce_scatter<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let n = self.size();
        if send.len() != recv.len() * n {
            return invalid(format!(
                "reduce_scatter: send has {} elements, expected recv ({}) × ranks ({n})",
                send.len(),
                recv.len()
            ));
        }
        let c = recv.len();
        self.coll::<T>(
            CollKind::ReduceScatter,
            op,
            c,
            0,
            RawBuf::from_slice(bytes_of(send)),
            RawBuf::from_mut(bytes_of_mut(recv)),
        )
    }

    /// In-place reduce-scatter: `buf` holds `n` blocks; the result lands in this rank's block
    /// (`buf[rank*c..(rank+1)*c]`), the other blocks are left unspecified.
    ///
    /// Errors: `buf.len()` not a multiple of the rank count.
    pub fn reduce_scatter_inplace<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let (c, all, mine) = self.own_block("reduce_scatter_inplace", buf)?;
        self.coll::<T>(CollKind::ReduceScatter, op, c, 0, all, mine)
    }

    /// All-gather: `recv` gets every rank's `send`, in rank order.
    ///
    /// Errors: `recv.len() != send.len() * n`.
    pub fn all_gather<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let n = self.size();
        if recv.len() != send.len() * n {
            return invalid(format!(
                "all_gather: recv has {} elements, expected send ({}) × ranks ({n})",
                recv.len(),
                send.len()
            ));
        }
        self.coll::<T>(
            CollKind::AllGather,
            ReduceOp::Sum,
            send.len(),
            0,
            RawBuf::from_slice(bytes_of(send)),
            RawBuf::from_mut(bytes_of_mut(recv)),
        )
    }

    /// In-place all-gather: this rank's contribution is already in its block of `buf`.
    ///
    /// Errors: `buf.len()` not a multiple of the rank count.
    pub fn all_gather_inplace<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        let (c, all, mine) = self.own_block("all_gather_inplace", buf)?;
        self.coll::<T>(CollKind::AllGather, ReduceOp::Sum, c, 0, mine, all)
    }

    /// In-place broadcast: the root's `buf` is copied into every rank's `buf`.
    ///
    /// Errors: root out of range.
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.check_root(root)?;
        let n = buf.len();
        let b = RawBuf::from_mut(bytes_of_mut(buf));
        self.coll::<T>(CollKind::Broadcast, ReduceOp::Sum, n, root, b, b)
    }

    /// Out-of-place broadcast: the root's `send` lands in every rank's `recv` (`send` is
    /// significant only at the root and may be empty elsewhere).
    ///
    /// Errors: root out of range; at the root `send.len() != recv.len()`.
    pub fn broadcast_from<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        root: usize,
    ) -> Result<()> {
        self.check_root(root)?;
        if self.rank() == root && send.len() != recv.len() {
            return invalid(format!(
                "broadcast: root send has {} elements, recv {}",
                send.len(),
                recv.len()
            ));
        }
        let n = recv.len();
        self.coll::<T>(
            CollKind::Broadcast,
            ReduceOp::Sum,
            n,
            root,
            RawBuf::from_slice(bytes_of(send)),
            RawBuf::from_mut(bytes_of_mut(recv)),
        )
    }

    /// Reduce to the root: the root's `recv` gets the reduction of every rank's `send`
    /// (`recv` is significant only at the root and may be empty elsewhere).
    ///
    /// Errors: root out of range; at the root `send.len() != recv.len()`.
    pub fn reduce<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        self.check_root(root)?;
        if self.rank() == root && send.len() != recv.len() {
            return invalid(format!(
                "reduce: send has {} elements, root recv {}",
                send.len(),
                recv.len()
            ));
        }
        let n = send.len();
        self.coll::<T>(
            CollKind::Reduce,
            op,
            n,
            root,
            RawBuf::from_slice(bytes_of(send)),
            RawBuf::from_mut(bytes_of_mut(recv)),
        )
    }

    /// In-place reduce: the root's `buf` is replaced by the reduction; other ranks' `buf` is
    /// left unchanged.
    pub fn reduce_inplace<T: Element>(
        &self,
        buf: &mut [T],
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        self.check_root(root)?;
        let n = buf.len();
        let b = RawBuf::from_mut(bytes_of_mut(buf));
        self.coll::<T>(CollKind::Reduce, op, n, root, b, b)
    }

    /// All-to-all: block j of `send` goes to rank j; block j of `recv` comes from rank j
    /// (blocks of `send.len() / n` elements).
    ///
    /// Errors: lengths differ or are not a multiple of the rank count.
    pub fn all_to_all<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let n = self.size();
        if send.len() != recv.len() || send.len() % n != 0 {
            return invalid(format!(
                "all_to_all: send {} and recv {} elements must be equal multiples of {n} ranks",
                send.len(),
                recv.len()
            ));
        }
        self.coll::<T>(
            CollKind::AllToAll,
            ReduceOp::Sum,
            send.len() / n,
            0,
            RawBuf::from_slice(bytes_of(send)),
            RawBuf::from_mut(bytes_of_mut(recv)),
        )
    }

    /// In-place all-to-all on `buf` (uses a scratch copy of one rank's share).
    pub fn all_to_all_inplace<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        let n = self.size();
        if buf.len() % n != 0 {
            return invalid(format!(
                "all_to_all_inplace: {} elements are not a multiple of {n} ranks",
                buf.len()
            ));
        }
        let c = buf.len() / n;
        let b = RawBuf::from_mut(bytes_of_mut(buf));
        self.coll::<T>(CollKind::AllToAll, ReduceOp::Sum, c, 0, b, b)
    }

    /// Gather to the root: block r of the root's `recv` gets rank r's `send` (`recv` is
    /// significant only at the root).
    ///
    /// Errors: root out of range; at the root `recv.len() != send.len() * n`.
    pub fn gather<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<()> {
        self.check_root(root)?;
        let n = self.size();
        if self.rank() == root && recv.len() != send.len() * n {
            return invalid(format!(
                "gather: root recv has {} elements, expected send ({}) × ranks ({n})",
                recv.len(),
                send.len()
            ));
        }
        self.coll::<T>(
            CollKind::Gather,
            ReduceOp::Sum,
            send.len(),
            root,
            RawBuf::from_slice(bytes_of(send)),
            RawBuf::from_mut(bytes_of_mut(recv)),
        )
    }

    /// In-place gather: `buf` has `n` blocks on every rank; rank r's contribution is its block
    /// r; the root's `buf` ends up with every block.
    pub fn gather_inplace<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.check_root(root)?;
        let (c, all, mine) = self.own_block("gather_inplace", buf)?;
        self.coll::<T>(CollKind::Gather, ReduceOp::Sum, c, root, mine, all)
    }

    /// Scatter from the root: rank r's `recv` gets block r of the root's `send` (`send` is
    /// significant only at the root).
    ///
    /// Errors: root out of range; at the root `send.len() != recv.len() * n`.
    pub fn scatter<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<()> {
        self.check_root(root)?;
        let n = self.size();
        if self.rank() == root && send.len() != recv.len() * n {
            return invalid(format!(
                "scatter: root send has {} elements, expected recv ({}) × ranks ({n})",
                send.len(),
                recv.len()
            ));
        }
        self.coll::<T>(
            CollKind::Scatter,
            ReduceOp::Sum,
            recv.len(),
            root,
            RawBuf::from_slice(bytes_of(send)),
            RawBuf::from_mut(bytes_of_mut(recv)),
        )
    }

    /// In-place scatter: `buf` has `n` blocks on every rank; rank r's block r receives block r
    /// of the root's `buf`.
    pub fn scatter_inplace<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.check_root(root)?;
        let (c, all, mine) = self.own_block("scatter_inplace", buf)?;
        self.coll::<T>(CollKind::Scatter, ReduceOp::Sum, c, root, all, mine)
    }

    /// Barrier: returns once every rank has entered it.
    pub fn barrier(&self) -> Result<()> {
        self.run_blocking(
            JobDesc::Coll {
                kind: CollKind::Barrier,
                dtype: DataType::U8,
                op: ReduceOp::Sum,
                count: 0,
                root: 0,
            },
            [RawBuf::empty(), RawBuf::empty()],
        )
    }

    // ---- point-to-point ----------------------------------------------------------------

    fn check_peer(&self, peer: usize) -> Result<()> {
        if peer >= self.size() || peer == self.rank() {
            return invalid(format!(
                "peer {peer} is not another rank of this communicator (rank {} of {})",
                self.rank(),
                self.size()
            ));
        }
        Ok(())
    }

    fn p2p_sig<T: Element>(count: usize, tag: u64) -> Sig {
        Sig {
            kind: CollKind::P2p,
            dtype: T::DTYPE,
            op: ReduceOp::Sum,
            algo: Algo::P2p,
            root: 0,
            slice_kib: 0,
            count: count as u64,
            seq: tag,
        }
    }

    /// Sends `buf` to `peer` with `tag`. Messages between two ranks are matched in order; the
    /// receiver's tag, type and count must match (else both sides get an error naming both).
    pub fn send<T: Element>(&self, buf: &[T], peer: usize, tag: u64) -> Result<()> {
        self.check_peer(peer)?;
        let op = P2pOp {
            send: true,
            peer,
            buf: RawBuf::from_slice(bytes_of(buf)),
            sig: Self::p2p_sig::<T>(buf.len(), tag),
        };
        self.run_blocking(JobDesc::P2p(vec![op]), [RawBuf::empty(), RawBuf::empty()])
    }

    /// Receives into `buf` from `peer` with `tag` (see [`Communicator::send`]).
    pub fn recv<T: Element>(&self, buf: &mut [T], peer: usize, tag: u64) -> Result<()> {
        self.check_peer(peer)?;
        let n = buf.len();
        let op = P2pOp {
            send: false,
            peer,
            buf: RawBuf::from_mut(bytes_of_mut(buf)),
            sig: Self::p2p_sig::<T>(n, tag),
        };
        self.run_blocking(JobDesc::P2p(vec![op]), [RawBuf::empty(), RawBuf::empty()])
    }

    /// Starts a group of point-to-point operations: post many sends and receives, then
    /// [`Group::run`] waits for all of them, so exchange patterns cannot deadlock.
    pub fn group(&self) -> Group<'_, '_> {
        Group {
            comm: self,
            ops: Vec::new(),
            _bufs: std::marker::PhantomData,
        }
    }

    // ---- non-blocking forms ----------------------------------------------------------

    /// Non-blocking in-place all-reduce; the handle returns the buffer.
    pub fn iall_reduce<T: Element>(&self, mut buf: Vec<T>, op: ReduceOp) -> Result<Handle<Vec<T>>> {
        let n = buf.len();
        let b = RawBuf::from_mut(bytes_of_mut(&mut buf));
        self.submit_coll::<T, _>(CollKind::AllReduce, op, n, 0, [b, b], buf, |v| v)
    }

    /// Non-blocking reduce-scatter; the handle returns this rank's reduced block.
    pub fn ireduce_scatter<T: Element>(
        &self,
        send: Vec<T>,
        op: ReduceOp,
    ) -> Result<Handle<Vec<T>>> {
        let n = self.size();
        if send.len() % n != 0 {
            return invalid(format!(
                "reduce_scatter: {} elements are not a multiple of {n} ranks",
                send.len()
            ));
        }
        let c = send.len() / n;
        let mut recv = vec![T::default(); c];
        let s = RawBuf::from_slice(bytes_of(&send));
        let r = RawBuf::from_mut(bytes_of_mut(&mut recv));
        self.submit_coll::<T, _>(
            CollKind::ReduceScatter,
            op,
            c,
            0,
            [s, r],
            (send, recv),
            |(_, r)| r,
        )
    }

    /// Non-blocking all-gather; the handle returns the gathered buffer (`n × send.len()`).
    pub fn iall_gather<T: Element>(&self, send: Vec<T>) -> Result<Handle<Vec<T>>> {
        let c = send.len();
        let mut recv = vec![T::default(); c * self.size()];
        let s = RawBuf::from_slice(bytes_of(&send));
        let r = RawBuf::from_mut(bytes_of_mut(&mut recv));
        self.submit_coll::<T, _>(
            CollKind::AllGather,
            ReduceOp::Sum,
            c,
            0,
            [s, r],
            (send, recv),
            |(_, r)| r,
        )
    }

    /// Non-blocking in-place broadcast from `root`.
    pub fn ibroadcast<T: Element>(&self, mut buf: Vec<T>, root: usize) -> Result<Handle<Vec<T>>> {
        self.check_root(root)?;
        let n = buf.len();
        let b = RawBuf::from_mut(bytes_of_mut(&mut buf));
        self.submit_coll::<T, _>(
            CollKind::Broadcast,
            ReduceOp::Sum,
            n,
            root,
            [b, b],
            buf,
            |v| v,
        )
    }

    /// Non-blocking in-place reduce to `root` (other ranks get their buffer back unchanged).
    pub fn ireduce<T: Element>(
        &self,
        mut buf: Vec<T>,
        op: ReduceOp,
        root: usize,
    ) -> Result<Handle<Vec<T>>> {
        self.check_root(root)?;
        let n = buf.len();
        let b = RawBuf::from_mut(bytes_of_mut(&mut buf));
        self.submit_coll::<T, _>(CollKind::Reduce, op, n, root, [b, b], buf, |v| v)
    }

    /// Non-blocking all-to-all; the handle returns the received blocks.
    pub fn iall_to_all<T: Element>(&self, send: Vec<T>) -> Result<Handle<Vec<T>>> {
        let n = self.size();
        if send.len() % n != 0 {
            return invalid(format!(
                "all_to_all: {} elements are not a multiple of {n} ranks",
                send.len()
            ));
        }
        let mut recv = vec![T::default(); send.len()];
        let s = RawBuf::from_slice(bytes_of(&send));
        let r = RawBuf::from_mut(bytes_of_mut(&mut recv));
        let c = send.len() / n;
        self.submit_coll::<T, _>(
            CollKind::AllToAll,
            ReduceOp::Sum,
            c,
            0,
            [s, r],
            (send, recv),
            |(_, r)| r,
        )
    }

    /// Non-blocking gather to `root`; the handle returns the gathered buffer at the root and
    /// an empty vector elsewhere.
    pub fn igather<T: Element>(&self, send: Vec<T>, root: usize) -> Result<Handle<Vec<T>>> {
        self.check_root(root)?;
        let c = send.len();
        let rl = if self.rank() == root {
            c * self.size()
        } else {
            0
        };
        let mut recv = vec![T::default(); rl];
        let s = RawBuf::from_slice(bytes_of(&send));
        let r = RawBuf::from_mut(bytes_of_mut(&mut recv));
        self.submit_coll::<T, _>(
            CollKind::Gather,
            ReduceOp::Sum,
            c,
            root,
            [s, r],
            (send, recv),
            |(_, r)| r,
        )
    }

    /// Non-blocking scatter from `root` of blocks of `count` elements (`send` significant only
    /// at the root, where it must hold `count × n` elements).
    pub fn iscatter<T: Element>(
        &self,
        send: Vec<T>,
        count: usize,
        root: usize,
    ) -> Result<Handle<Vec<T>>> {
        self.check_root(root)?;
        if self.rank() == root && send.len() != count * self.size() {
            return invalid(format!(
                "scatter: root send has {} elements, expected {count} × {} ranks",
                send.len(),
                self.size()
            ));
        }
        let mut recv = vec![T::default(); count];
        let s = RawBuf::from_slice(bytes_of(&send));
        let r = RawBuf::from_mut(bytes_of_mut(&mut recv));
        self.submit_coll::<T, _>(
            CollKind::Scatter,
            ReduceOp::Sum,
            count,
            root,
            [s, r],
            (send, recv),
            |(_, r)| r,
        )
    }

    /// Non-blocking barrier.
    pub fn ibarrier(&self) -> Result<Handle<()>> {
        self.submit(
            JobDesc::Coll {
                kind: CollKind::Barrier,
                dtype: DataType::U8,
                op: ReduceOp::Sum,
                count: 0,
                root: 0,
            },
            [RawBuf::empty(), RawBuf::empty()],
            Box::new(()),
            |_| (),
        )
    }

    /// Non-blocking send; the handle returns the buffer.
    pub fn isend<T: Element>(&self, buf: Vec<T>, peer: usize, tag: u64) -> Result<Handle<Vec<T>>> {
        self.igroup_with(vec![P2p::Send { buf, peer, tag }], |mut v| {
            v.pop().unwrap_or_default()
        })
    }

    /// Non-blocking receive into `buf` (its length is the count); the handle returns it.
    pub fn irecv<T: Element>(&self, buf: Vec<T>, peer: usize, tag: u64) -> Result<Handle<Vec<T>>> {
        self.igroup_with(vec![P2p::Recv { buf, peer, tag }], |mut v| {
            v.pop().unwrap_or_default()
        })
    }

    /// Non-blocking group of point-to-point operations on owned buffers; the handle returns
    /// the buffers in the order given.
    pub fn igroup<T: Element>(&self, ops: Vec<P2p<T>>) -> Result<Handle<Vec<Vec<T>>>> {
        self.igroup_with(ops, |v| v)
    }

    fn igroup_with<T: Element, R: 'static>(
        &self,
        ops: Vec<P2p<T>>,
        finish: fn(Vec<Vec<T>>) -> R,
    ) -> Result<Handle<R>> {
        let mut bufs: Vec<Vec<T>> = Vec::with_capacity(ops.len());
        let mut pops = Vec::with_capacity(ops.len());
        for o in ops {
            let (send, mut buf, peer, tag) = match o {
                P2p::Send { buf, peer, tag } => (true, buf, peer, tag),
                P2p::Recv { buf, peer, tag } => (false, buf, peer, tag),
            };
            self.check_peer(peer)?;
            let rb = RawBuf::from_mut(bytes_of_mut(&mut buf));
            pops.push(P2pOp {
                send,
                peer,
                buf: rb,
                sig: Self::p2p_sig::<T>(buf.len(), tag),
            });
            bufs.push(buf);
        }
        self.submit(
            JobDesc::P2p(pops),
            [RawBuf::empty(), RawBuf::empty()],
            Box::new(bufs),
            move |k| match k.downcast::<Vec<Vec<T>>>() {
                Ok(b) => finish(*b),
                Err(_) => finish(Vec::new()),
            },
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_coll<T: Element, K: Send + 'static>(
        &self,
        kind: CollKind,
        op: ReduceOp,
        count: usize,
        root: usize,
        bufs: [RawBuf; 2],
        keep: K,
        finish: fn(K) -> Vec<T>,
    ) -> Result<Handle<Vec<T>>> {
        self.submit(
            JobDesc::Coll {
                kind,
                dtype: T::DTYPE,
                op,
                count,
                root,
            },
            bufs,
            Box::new(keep),
            move |k| match k.downcast::<K>() {
                Ok(b) => finish(*b),
                Err(_) => Vec::new(),
            },
        )
    }
}

/// One collective call on raw buffers ([`Communicator::coll_raw`], the C ABI's entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawColl {
    /// Which collective.
    pub kind: CollKind,
    /// Element type.
    pub dtype: DataType,
    /// Reduction operator (ignored by non-reductions).
    pub op: ReduceOp,
    /// Element count as NCCL counts it: all_reduce, broadcast, reduce: the buffer; reduce_scatter:
    /// the per-rank result (recvcount); all_gather: the per-rank input (sendcount); all_to_all,
    /// gather, scatter: the per-rank block.
    pub count: usize,
    /// Root rank (rooted collectives).
    pub root: usize,
}

impl RawColl {
    /// Byte lengths of its (send, recv) buffers on rank `rank` of `n` (0 where a buffer is
    /// not significant on that rank); the root must already be checked. Host and device
    /// forms share it.
    pub(crate) fn byte_lens(&self, rank: usize, n: usize) -> Result<(usize, usize)> {
        let es = self.dtype.size();
        let is_root = rank == self.root;
        let blk = self
            .count
            .checked_mul(es)
            .ok_or_else(|| Error::InvalidArgument("count overflows".into()))?;
        let all = blk
            .checked_mul(n)
            .ok_or_else(|| Error::InvalidArgument("count overflows".into()))?;
        Ok(match self.kind {
            CollKind::AllReduce => (blk, blk),
            CollKind::ReduceScatter => (all, blk),
            CollKind::AllGather => (blk, all),
            CollKind::Broadcast => (if is_root { blk } else { 0 }, blk),
            CollKind::Reduce => (blk, if is_root { blk } else { 0 }),
            CollKind::AllToAll => (all, all),
            CollKind::Gather => (blk, if is_root { all } else { 0 }),
            CollKind::Scatter => (if is_root { all } else { 0 }, blk),
            CollKind::Barrier => (0, 0),
            CollKind::P2p => {
                return Err(Error::InvalidArgument(
                    "point-to-point has calls of its own (p2p_raw, p2p_device_raw)".into(),
                ))
            }
            CollKind::AllToAllV => {
                return Err(Error::InvalidArgument(
                    "all_to_allv has calls of its own (all_to_allv_raw; on device buffers braid_all_to_allv_stream)".into(),
                ))
            }
        })
    }
}

/// One point-to-point operation on a raw buffer ([`Communicator::p2p_raw`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawP2p {
    /// Send (true) or receive.
    pub send: bool,
    /// The buffer.
    pub buf: *mut u8,
    /// Element count.
    pub count: usize,
    /// Element type.
    pub dtype: DataType,
    /// The other rank.
    pub peer: usize,
    /// Tag (must match the other side's).
    pub tag: u64,
}

impl Communicator {
    /// Byte lengths of the (send, recv) buffers of a raw collective on this rank.
    fn raw_lens(&self, c: &RawColl) -> Result<(usize, usize)> {
        if c.kind.rooted() {
            self.check_root(c.root)?;
        }
        c.byte_lens(self.rank(), self.size())
    }

    fn raw_bufs(&self, c: &RawColl, send: *const u8, recv: *mut u8) -> Result<[RawBuf; 2]> {
        let (sl, rl) = self.raw_lens(c)?;
        if (sl > 0 && send.is_null()) || (rl > 0 && recv.is_null()) {
            return invalid(format!(
                "{}: NULL buffer for {} bytes",
                c.kind.name(),
                if sl > 0 && send.is_null() { sl } else { rl }
            ));
        }
        // SAFETY: the caller of coll_raw/icoll_raw guarantees these ranges are valid.
        Ok(unsafe {
            [
                RawBuf::from_raw(send as *mut u8, sl),
                RawBuf::from_raw(recv, rl),
            ]
        })
    }

    /// Runs a collective on raw buffers (blocking). In-place follows nccl.h: `send == recv`
    /// (all_gather: `send == recv + rank*count*size`; reduce_scatter:
    /// `recv == send + rank*count*size`).
    ///
    /// # Safety
    /// `send` and `recv` must be valid for the lengths the collective implies on this rank (see
    /// [`RawColl::count`]) for the duration of the call; buffers not significant on this rank
    /// may be NULL.
    pub unsafe fn coll_raw(&self, c: RawColl, send: *const u8, recv: *mut u8) -> Result<()> {
        let bufs = self.raw_bufs(&c, send, recv)?;
        self.run_blocking(
            JobDesc::Coll {
                kind: c.kind,
                dtype: c.dtype,
                op: c.op,
                count: c.count,
                root: c.root,
            },
            bufs,
        )
    }

    /// Starts a collective on raw buffers; the handle completes when it is done.
    ///
    /// # Safety
    /// As [`Communicator::coll_raw`], and the buffers must stay valid and untouched until the
    /// handle reports completion (`test` true or `wait` returned).
    pub unsafe fn icoll_raw(
        &self,
        c: RawColl,
        send: *const u8,
        recv: *mut u8,
    ) -> Result<Handle<()>> {
        let bufs = self.raw_bufs(&c, send, recv)?;
        self.submit(
            JobDesc::Coll {
                kind: c.kind,
                dtype: c.dtype,
                op: c.op,
                count: c.count,
                root: c.root,
            },
            bufs,
            Box::new(()),
            |_| (),
        )
    }

    fn raw_p2p_ops(&self, ops: &[RawP2p]) -> Result<Vec<P2pOp>> {
        let mut out = Vec::with_capacity(ops.len());
        for o in ops {
            self.check_peer(o.peer)?;
            let len = o
                .count
                .checked_mul(o.dtype.size())
                .ok_or_else(|| Error::InvalidArgument("count overflows".into()))?;
            if len > 0 && o.buf.is_null() {
                return invalid("send/recv: NULL buffer".into());
            }
            out.push(P2pOp {
                send: o.send,
                peer: o.peer,
                // SAFETY: the caller of p2p_raw/ip2p_raw guarantees the range is valid.
                buf: unsafe { RawBuf::from_raw(o.buf, len) },
                sig: Sig {
                    kind: CollKind::P2p,
                    dtype: o.dtype,
                    op: ReduceOp::Sum,
                    algo: Algo::P2p,
                    root: 0,
                    slice_kib: 0,
                    count: o.count as u64,
                    seq: o.tag,
                },
            });
        }
        Ok(out)
    }

    /// Runs a group of point-to-point operations on raw buffers (blocking).
    ///
    /// # Safety
    /// Every buffer must be valid for `count` elements for the duration of the call; receive
    /// buffers must not overlap anything else of the group.
    pub unsafe fn p2p_raw(&self, ops: &[RawP2p]) -> Result<()> {
        let ops = self.raw_p2p_ops(ops)?;
        if ops.is_empty() {
            return Ok(());
        }
        self.run_blocking(JobDesc::P2p(ops), [RawBuf::empty(), RawBuf::empty()])
    }

    /// Starts a group of point-to-point operations on raw buffers.
    ///
    /// # Safety
    /// As [`Communicator::p2p_raw`], until the handle reports completion.
    pub unsafe fn ip2p_raw(&self, ops: &[RawP2p]) -> Result<Handle<()>> {
        let ops = self.raw_p2p_ops(ops)?;
        self.submit(
            JobDesc::P2p(ops),
            [RawBuf::empty(), RawBuf::empty()],
            Box::new(()),
            |_| (),
        )
    }
}

/// The arguments of one all_to_allv call on this rank (buffers as raw views).
struct VArgs<'a> {
    dtype: DataType,
    send: RawBuf,
    send_counts: &'a [usize],
    send_displs: &'a [usize],
    recv: RawBuf,
    recv_counts: &'a [usize],
    recv_displs: &'a [usize],
}

/// Checks one side (send or receive) of an all_to_allv layout and returns, per rank, the
/// (byte offset, byte length) of its block, and the bytes the blocks span from the start of
/// the buffer. `len`: the buffer's length in elements, when known (the Rust form); blocks of
/// zero elements are not checked (their displacement is ignored, as in MPI).
fn alltoallv_blocks(
    side: &str,
    n: usize,
    es: usize,
    len: Option<usize>,
    counts: &[usize],
    displs: &[usize],
) -> Result<(Vec<(usize, usize)>, usize)> {
    if counts.len() != n || displs.len() != n {
        return invalid(format!(
            "all_to_allv: {side} counts ({}) and displacements ({}) must have one entry per rank ({n})",
            counts.len(),
            displs.len()
        ));
    }
    let mut blocks = Vec::with_capacity(n);
    let mut extent = 0usize;
    for (p, (&c, &d)) in counts.iter().zip(displs).enumerate() {
        if c == 0 {
            blocks.push((0, 0));
            continue;
        }
        let end = d.checked_add(c).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "all_to_allv: {side} block of rank {p} (displacement {d}, count {c}) overflows"
            ))
        })?;
        if let Some(len) = len {
            if end > len {
                return invalid(format!(
                    "all_to_allv: {side} block of rank {p} (elements {d}..{end}) lies outside the {side} buffer of {len} elements"
                ));
            }
        }
        let (off, bytes, end_b) = match (d.checked_mul(es), c.checked_mul(es), end.checked_mul(es))
        {
            (Some(o), Some(b), Some(e)) => (o, b, e),
            _ => {
                return invalid(format!(
                    "all_to_allv: {side} block of rank {p} (displacement {d}, count {c}) overflows in bytes"
                ))
            }
        };
        extent = extent.max(end_b);
        blocks.push((off, bytes));
    }
    Ok((blocks, extent))
}

/// Whether any two of the (start, length) byte ranges `a` overlap one another (`within`), or
/// any range of `a` overlaps one of `b`. Empty ranges overlap nothing. Returns the indices of
/// a pair found.
fn first_overlap(
    a: &[(usize, usize)],
    b: &[(usize, usize)],
    within: bool,
) -> Option<(usize, usize)> {
    let sorted = |v: &[(usize, usize)]| {
        let mut s: Vec<(usize, usize, usize)> = v
            .iter()
            .enumerate()
            .filter(|(_, r)| r.1 > 0)
            .map(|(i, r)| (r.0, r.0.saturating_add(r.1), i))
            .collect();
        s.sort_unstable();
        s
    };
    let sa = sorted(a);
    if within {
        // Sorted by start: a range overlaps an earlier one iff it starts before the largest end
        // seen so far.
        let mut reach: Option<(usize, usize)> = None;
        for &(st, en, i) in &sa {
            if let Some((e, j)) = reach {
                if st < e {
                    return Some((j, i));
                }
            }
            if reach.map_or(true, |(e, _)| en > e) {
                reach = Some((en, i));
            }
        }
        return None;
    }
    let sb = sorted(b);
    let (mut i, mut j) = (0, 0);
    while i < sa.len() && j < sb.len() {
        let (x, y) = (sa[i], sb[j]);
        if x.0 < y.1 && y.0 < x.1 {
            return Some((x.2, y.2));
        }
        if x.1 <= y.1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    None
}

impl Communicator {
    /// Checks an all_to_allv call and builds its job (nothing is sent here).
    fn alltoallv_job(
        &self,
        a: VArgs<'_>,
        send_len: Option<usize>,
        recv_len: Option<usize>,
    ) -> Result<JobDesc> {
        let (n, me) = (self.size(), self.rank());
        let es = a.dtype.size();
        let (sb, _) = alltoallv_blocks("send", n, es, send_len, a.send_counts, a.send_displs)?;
        let (rb, _) = alltoallv_blocks("recv", n, es, recv_len, a.recv_counts, a.recv_displs)?;
        if a.send_counts[me] != a.recv_counts[me] {
            return invalid(format!(
                "all_to_allv: count mismatch for this rank's own block: sends {} elements to itself, receives {}",
                a.send_counts[me], a.recv_counts[me]
            ));
        }
        if let Some((x, y)) = first_overlap(&rb, &[], true) {
            return invalid(format!(
                "all_to_allv: the receive blocks of ranks {x} and {y} overlap"
            ));
        }
        // Absolute addresses: the send and receive buffers must not overlap (in place is not
        // supported; the Rust form cannot alias them, the raw form is checked here).
        let abs = |b: &RawBuf, v: &[(usize, usize)]| -> Result<Vec<(usize, usize)>> {
            v.iter()
                .map(|&(o, l)| {
                    if l == 0 {
                        Ok((0, 0))
                    } else {
                        b.at(o, l).map(|p| (p as usize, l))
                    }
                })
                .collect()
        };
        let (sa, ra) = (abs(&a.send, &sb)?, abs(&a.recv, &rb)?);
        if let Some((x, y)) = first_overlap(&sa, &ra, false) {
            return invalid(format!(
                "all_to_allv: the send block for rank {x} overlaps the receive block of rank {y} (in-place all_to_allv is not supported)"
            ));
        }
        let block = |b: RawBuf, (o, l): (usize, usize)| -> Result<RawBuf> {
            if l == 0 {
                Ok(RawBuf::empty())
            } else {
                sub(b, o, l)
            }
        };
        let mut ops = Vec::with_capacity(2 * n.saturating_sub(1));
        // Receives first (from rank-1, rank-2, ...), then sends (to rank+1, rank+2, ...): every
        // pair exchanges one message each way, empty ones included, so that every rank checks
        // both counts of every pair.
        for k in 1..n {
            let p = (me + n - k) % n;
            ops.push(P2pOp {
                send: false,
                peer: p,
                buf: block(a.recv, rb[p])?,
                sig: Sig::all_to_allv(a.dtype, a.recv_counts[p], a.send_counts[p], 0),
            });
        }
        for k in 1..n {
            let p = (me + k) % n;
            ops.push(P2pOp {
                send: true,
                peer: p,
                buf: block(a.send, sb[p])?,
                sig: Sig::all_to_allv(a.dtype, a.send_counts[p], a.recv_counts[p], 0),
            });
        }
        let local = if sb[me].1 > 0 {
            Some((block(a.send, sb[me])?, block(a.recv, rb[me])?))
        } else {
            None
        };
        Ok(JobDesc::AllToAllV { ops, local })
    }

    /// All-to-all with a count and a displacement per rank (`MPI_Alltoallv`; torch's
    /// `all_to_all_single` with uneven splits): this rank sends
    /// `send[send_displs[p]..][..send_counts[p]]` to rank p and receives `recv_counts[p]`
    /// elements from rank p into `recv[recv_displs[p]..]`. Counts and displacements are in
    /// elements, one per rank; rank p's `send_counts[r]` must equal rank r's `recv_counts[p]`.
    /// Blocks of zero elements are allowed (their displacement is ignored); send blocks may
    /// overlap, receive blocks may not. One rank: a local copy. Not in place (`send` and `recv`
    /// are distinct by the borrow rules). Ordered with the other collectives (all ranks call it
    /// at the same point), never on the single-copy paths.
    ///
    /// Errors (before anything is sent, the communicator stays usable):
    /// [`Error::InvalidArgument`] when an array does not have one entry per rank, a block lies
    /// outside its buffer (checked arithmetic), receive blocks overlap, or this rank's own send
    /// and receive counts differ. A count that disagrees with the peer's
    /// ([`Error::Mismatch`], sticky, "collective mismatch" naming both sides) fails on both
    /// ranks of the pair; a rank that called another collective meanwhile gives the same error.
    pub fn all_to_allv<T: Element>(
        &self,
        send: &[T],
        send_counts: &[usize],
        send_displs: &[usize],
        recv: &mut [T],
        recv_counts: &[usize],
        recv_displs: &[usize],
    ) -> Result<()> {
        let (sl, rl) = (send.len(), recv.len());
        let job = self.alltoallv_job(
            VArgs {
                dtype: T::DTYPE,
                send: RawBuf::from_slice(bytes_of(send)),
                send_counts,
                send_displs,
                recv: RawBuf::from_mut(bytes_of_mut(recv)),
                recv_counts,
                recv_displs,
            },
            Some(sl),
            Some(rl),
        )?;
        self.run_blocking(job, [RawBuf::empty(), RawBuf::empty()])
    }

    /// Raw views of an all_to_allv's buffers, spanning every block (the raw forms cannot know
    /// the buffers' lengths: they trust the counts and displacements, as MPI does).
    #[allow(clippy::too_many_arguments)]
    fn raw_alltoallv_job(
        &self,
        dtype: DataType,
        send: *const u8,
        send_counts: &[usize],
        send_displs: &[usize],
        recv: *mut u8,
        recv_counts: &[usize],
        recv_displs: &[usize],
    ) -> Result<JobDesc> {
        let (n, es) = (self.size(), dtype.size());
        let (_, sx) = alltoallv_blocks("send", n, es, None, send_counts, send_displs)?;
        let (_, rx) = alltoallv_blocks("recv", n, es, None, recv_counts, recv_displs)?;
        if (sx > 0 && send.is_null()) || (rx > 0 && recv.is_null()) {
            return invalid(format!(
                "all_to_allv: NULL {} buffer with non-zero counts",
                if sx > 0 && send.is_null() {
                    "send"
                } else {
                    "receive"
                }
            ));
        }
        // SAFETY: the caller of all_to_allv_raw/iall_to_allv_raw guarantees that every block
        // its counts and displacements describe is valid: `sx`/`rx` bytes from the start span
        // exactly those blocks.
        let (sbuf, rbuf) = unsafe {
            (
                RawBuf::from_raw(send as *mut u8, sx),
                RawBuf::from_raw(recv, rx),
            )
        };
        self.alltoallv_job(
            VArgs {
                dtype,
                send: sbuf,
                send_counts,
                send_displs,
                recv: rbuf,
                recv_counts,
                recv_displs,
            },
            None,
            None,
        )
    }

    /// [`Communicator::all_to_allv`] on raw buffers (the C ABI's entry; blocking). Counts and
    /// displacements are read during the call only.
    ///
    /// Errors: as [`Communicator::all_to_allv`] (the blocks are not checked against buffer
    /// lengths, which are unknown here); NULL buffers with non-zero counts; send and receive
    /// blocks that overlap (in place is not supported).
    ///
    /// # Safety
    /// For every rank p, `send + send_displs[p]*size` must be valid for reading
    /// `send_counts[p]` elements of `dtype`, and `recv + recv_displs[p]*size` for writing
    /// `recv_counts[p]` elements, for the duration of the call.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn all_to_allv_raw(
        &self,
        dtype: DataType,
        send: *const u8,
        send_counts: &[usize],
        send_displs: &[usize],
        recv: *mut u8,
        recv_counts: &[usize],
        recv_displs: &[usize],
    ) -> Result<()> {
        let job = self.raw_alltoallv_job(
            dtype,
            send,
            send_counts,
            send_displs,
            recv,
            recv_counts,
            recv_displs,
        )?;
        self.run_blocking(job, [RawBuf::empty(), RawBuf::empty()])
    }

    /// Starts [`Communicator::all_to_allv_raw`] on the progress thread; the handle completes
    /// when it is done. Counts and displacements are read during the call only (they may be
    /// freed when it returns).
    ///
    /// # Safety
    /// As [`Communicator::all_to_allv_raw`], and the buffers must stay valid and untouched
    /// (the send blocks unmodified, the receive blocks unread) until the handle reports
    /// completion.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn iall_to_allv_raw(
        &self,
        dtype: DataType,
        send: *const u8,
        send_counts: &[usize],
        send_displs: &[usize],
        recv: *mut u8,
        recv_counts: &[usize],
        recv_displs: &[usize],
    ) -> Result<Handle<()>> {
        let job = self.raw_alltoallv_job(
            dtype,
            send,
            send_counts,
            send_displs,
            recv,
            recv_counts,
            recv_displs,
        )?;
        self.submit(
            job,
            [RawBuf::empty(), RawBuf::empty()],
            Box::new(()),
            |_| (),
        )
    }
}

/// The group name of a communicator created from the group `parent` (view `epoch`): `label`
/// says how it was created, `ids` are its members' ids (sorted), `k` counts earlier creations
/// with the same label and members. Every member computes the same name; member ids are never
/// reused by a coordinator, so names of different member sets never collide. Bounded length
/// (the coordinator accepts at most 256 bytes): a readable prefix of the parent's name and a
/// SHA-256 digest of everything.
fn subgroup_name(parent: &str, epoch: u64, label: &str, ids: &[u64], k: u64) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"braid subgroup v1\0");
    h.update((parent.len() as u64).to_le_bytes());
    h.update(parent.as_bytes());
    h.update(epoch.to_le_bytes());
    h.update((label.len() as u64).to_le_bytes());
    h.update(label.as_bytes());
    h.update((ids.len() as u64).to_le_bytes());
    for id in ids {
        h.update(id.to_le_bytes());
    }
    h.update(k.to_le_bytes());
    let d = h.finalize();
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    let mut cut = parent.len().min(64);
    while !parent.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{hex}", &parent[..cut])
}

impl Communicator {
    /// Creates a communicator of the ranks `ranks` of this one, like `MPI_Comm_create_group`
    /// (torch's `new_group`): collective over the listed ranks only (the others do not call
    /// it). The new rank of a member is its position in `ranks`; every member must pass the
    /// same list. `tag` tells apart creations that may run at the same time over overlapping
    /// member sets; creations with the same members and tag are told apart by their order
    /// (members must create them in the same order).
    ///
    /// The new communicator is independent: it meets its members through the same coordinator
    /// (and job token) as this one, under a group name derived from this group's name, view
    /// epoch, the members' ids, `tag` and that order; it is not elastic, has its own
    /// connections and threads, and works on after this communicator is dropped (a
    /// coordinator hosted by this process lives on until the last communicator sharing it is
    /// dropped). Its collectives never interfere with this communicator's.
    ///
    /// Blocks until every member called it (at most `BRAID_INIT_TIMEOUT`).
    ///
    /// Errors: [`Error::InvalidArgument`] when `ranks` is empty, has a rank out of range or
    /// twice, or does not include this rank; [`Error::InvalidUsage`] after this member left
    /// an elastic group; as [`Communicator::init`] otherwise (`Error::Timeout` when members
    /// do not all arrive in time). This communicator is unaffected by any of them.
    pub fn create_group(&self, ranks: &[usize], tag: u32) -> Result<Communicator> {
        self.make_group(ranks, &format!("group:{tag}"))
    }

    /// Splits this communicator, like `ncclCommSplit` / `MPI_Comm_split` (torch's
    /// `split_group`): collective over all ranks of this communicator. Ranks passing the same
    /// `Some(color)` form a new communicator, ordered by `key`, then by rank in this one;
    /// `None` takes part but gets no communicator (`Ok(None)`). Built on
    /// [`Communicator::create_group`] after an all-gather of every rank's (color, key); the
    /// new communicators have its properties.
    ///
    /// Errors: as [`Communicator::all_gather`] (the exchange of colors and keys) and
    /// [`Communicator::create_group`].
    pub fn split(&self, color: Option<u32>, key: i64) -> Result<Option<Communicator>> {
        let n = self.size();
        let mine = [color.map_or(-1, i64::from), key];
        let mut all = vec![0i64; 2 * n];
        self.all_gather(&mine, &mut all)?;
        let Some(color) = color else {
            return Ok(None);
        };
        let mut members: Vec<(i64, usize)> = all
            .chunks_exact(2)
            .enumerate()
            .filter(|(_, ck)| ck[0] == i64::from(color))
            .map(|(r, ck)| (ck[1], r))
            .collect();
        members.sort_unstable();
        let ranks: Vec<usize> = members.iter().map(|m| m.1).collect();
        self.make_group(&ranks, "split").map(Some)
    }

    /// Creates the communicator of `ranks` (see [`Communicator::create_group`]); `label`
    /// separates kinds of creation.
    fn make_group(&self, ranks: &[usize], label: &str) -> Result<Communicator> {
        let (n, me) = (self.size(), self.rank());
        if self.left {
            return Err(Error::InvalidUsage(format!(
                "member {} left the group; it cannot create communicators from it",
                self.inner.member
            )));
        }
        if ranks.is_empty() {
            return invalid("create_group: no ranks".into());
        }
        let mut seen = vec![false; n];
        for &r in ranks {
            if r >= n {
                return invalid(format!(
                    "create_group: rank {r} is not a rank of this communicator of {n} ranks"
                ));
            }
            if std::mem::replace(&mut seen[r], true) {
                return invalid(format!("create_group: rank {r} is listed twice"));
            }
        }
        let Some(new_rank) = ranks.iter().position(|&r| r == me) else {
            return invalid(format!(
                "create_group: this rank ({me}) is not in the ranks listed; only members call it"
            ));
        };
        let view = &self.inner.view;
        let mut ids = Vec::with_capacity(ranks.len());
        for &r in ranks {
            match view.members.get(r) {
                Some(m) => ids.push(m.id),
                None => return Err(Error::Internal(format!("no member at rank {r}"))),
            }
        }
        ids.sort_unstable();
        let k = {
            let mut g = lock(&self.subgroups);
            let c = g.entry((label.to_string(), ids.clone())).or_insert(0);
            let k = *c;
            *c += 1;
            k
        };
        let mut cfg = self.inner.cfg.clone();
        cfg.group = subgroup_name(&cfg.group, view.epoch, label, &ids, k);
        cfg.world_size = Some(ranks.len());
        cfg.rank = Some(new_rank);
        cfg.host_coordinator = false;
        cfg.elastic = false;
        tracing::info!(target: "braid::init", "rank {me}: creating communicator {} of {} ranks (rank {new_rank} in it)", cfg.group, ranks.len());
        let regions = Regions::new();
        // In-process ranks share one fabric: keep the parent's transport (every listen makes
        // a new endpoint); otherwise fresh transports of the same configuration.
        let transports = if self.transports.iter().any(|t| t.name() == "mem") {
            self.transports.clone()
        } else {
            make_transport_with(&cfg, Some(regions.clone()))?
        };
        let mut child = Communicator::init_on(cfg, transports, regions)?;
        child.coordinator = self.coordinator.clone();
        Ok(child)
    }
}

/// A point-to-point operation of a non-blocking group ([`Communicator::igroup`]).
pub enum P2p<T> {
    /// Send `buf` to `peer` with `tag`.
    Send {
        /// The data.
        buf: Vec<T>,
        /// Destination rank.
        peer: usize,
        /// Tag.
        tag: u64,
    },
    /// Receive `buf.len()` elements from `peer` with `tag`.
    Recv {
        /// The destination (its length is the count).
        buf: Vec<T>,
        /// Source rank.
        peer: usize,
        /// Tag.
        tag: u64,
    },
}

/// A group of blocking point-to-point operations on borrowed buffers
/// ([`Communicator::group`]).
pub struct Group<'c, 'b> {
    comm: &'c Communicator,
    ops: Vec<P2pOp>,
    _bufs: std::marker::PhantomData<&'b mut [u8]>,
}

impl<'c, 'b> Group<'c, 'b> {
    /// Adds a send of `buf` to `peer`.
    pub fn send<T: Element>(mut self, buf: &'b [T], peer: usize, tag: u64) -> Result<Self> {
        self.comm.check_peer(peer)?;
        self.ops.push(P2pOp {
            send: true,
            peer,
            buf: RawBuf::from_slice(bytes_of(buf)),
            sig: Communicator::p2p_sig::<T>(buf.len(), tag),
        });
        Ok(self)
    }

    /// Adds a receive into `buf` from `peer`.
    pub fn recv<T: Element>(mut self, buf: &'b mut [T], peer: usize, tag: u64) -> Result<Self> {
        self.comm.check_peer(peer)?;
        let n = buf.len();
        self.ops.push(P2pOp {
            send: false,
            peer,
            buf: RawBuf::from_mut(bytes_of_mut(buf)),
            sig: Communicator::p2p_sig::<T>(n, tag),
        });
        Ok(self)
    }

    /// Posts every operation and waits for all of them.
    pub fn run(self) -> Result<()> {
        if self.ops.is_empty() {
            return Ok(());
        }
        self.comm
            .run_blocking(JobDesc::P2p(self.ops), [RawBuf::empty(), RawBuf::empty()])
    }
}

fn sub(b: RawBuf, off: usize, len: usize) -> Result<RawBuf> {
    let p = b.at(off, len)?;
    // SAFETY: p..p+len lies inside `b` (checked by at), which the caller keeps alive for the
    // operation.
    Ok(unsafe { RawBuf::from_raw(p, len) })
}

/// Marks the communicator failed and tells every peer why.
fn fail_state(st: &mut State, e: Error) {
    if st.error.is_none() {
        st.error = Some(e.clone());
    }
    let reason = e.to_string();
    for p in st.peers.iter_mut().flatten() {
        p.conn.abort(&reason);
    }
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
    }
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
        JobDesc::P2p(ops) => {
            let State { peers, exec, .. } = st;
            exec.run_p2p(peers, ops)
        }
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
            match copied {
                Ok(()) => {
                    let State { peers, exec, .. } = st;
                    exec.run_p2p(peers, ops)
                }
                Err(e) => Err(e),
            }
        }
    };
    if let Err(e) = &res {
        note_failure(inner, st, e);
    }
    res
}

fn complete(inner: &Inner, slot: Arc<Slot>, keep: Box<dyn Any + Send>, res: Result<()>) {
    *lock(&slot.res) = Some((res, keep));
    slot.cv.notify_all();
    let mut q = lock(&inner.queue);
    q.outstanding = q.outstanding.saturating_sub(1);
    drop(q);
    inner.qcv.notify_all();
}

type InFlight = (P2pBatch, Arc<Slot>, Box<dyn Any + Send>);

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
    loop {
        injected_panic(&inner);
        let next = {
            let mut q = lock(&inner.queue);
            loop {
                if inner.poison.inject.load(Ordering::Relaxed) {
                    break None;
                }
                let front_p2p = q.jobs.front().map(|j| matches!(j.desc, JobDesc::P2p(_)));
                match front_p2p {
                    Some(true) => break q.jobs.pop_front(),
                    Some(false) if inflight.is_empty() => break q.jobs.pop_front(),
                    Some(false) => break None,
                    None if !inflight.is_empty() => break None,
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
                let begun = check_usable(&inner, &mut st).and_then(|_| {
                    let State { peers, exec, .. } = &mut *st;
                    exec.p2p_begin(peers, ops)
                });
                drop(st);
                match begun {
                    Ok(b) => inflight.push((b, slot, keep)),
                    Err(e) => complete(&inner, slot, keep, Err(e)),
                }
            }
            Some(job) => {
                let mut st = lock(&inner.state);
                let res = run_job(&inner, &mut st, job.desc, job.bufs);
                drop(st);
                complete(&inner, job.slot, job.keep, res);
            }
            None => {
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

/// Connects to every peer: to higher ranks over the first transport of `transports` that the
/// peer also listens on (shm only when the host ids are equal), and accepts from lower ranks.
/// Returns the peers and the transport name used for each.
#[allow(clippy::too_many_arguments)]
fn connect_peers(
    transports: &[Arc<dyn Transport>],
    kind: TransportKind,
    view: &View,
    rank: usize,
    member: u64,
    stash: &Stash,
    token: Option<&[u8]>,
    deadline: Instant,
    abort: &AtomicBool,
    superseded: &dyn Fn() -> bool,
) -> Result<Connected> {
    let size = view.members.len();
    let mut peers: Vec<Option<Peer>> = (0..size).map(|_| None).collect();
    let mut names: Vec<Option<&'static str>> = vec![None; size];
    // Connections of this view that arrived before are checked now; later ones on arrival.
    stash.learn(view);
    let hello = |c: &Challenge| hello_bytes(c, view.nonce, view.epoch, rank, member, token);
    let me = &view.members[rank];
    if kind == TransportKind::Shm {
        // Every rank checks every pair, so all fail at once instead of waiting for a connect.
        for (j, m) in view.members.iter().enumerate() {
            if m.host_id != me.host_id {
                return Err(Error::InvalidArgument(format!(
                    "BRAID_TRANSPORT=shm, but rank {j} is on host {} (host id {}) and rank {rank} on host {} (host id {}): shared memory works only within one host (use auto or tcp)",
                    m.hostname, m.host_id, me.hostname, me.host_id
                )));
            }
        }
    }
    // Connect to every higher rank; accept from every lower one.
    for (j, m) in view.members.iter().enumerate().skip(rank + 1) {
        let hs = decode_handles(&m.handle)
            .map_err(|e| Error::Coordinator(format!("rank {j}'s connect handle: {e}")))?;
        let same_host = m.host_id == me.host_id;
        let pick = transports.iter().find_map(|t| {
            if t.name() == "shm" && !same_host {
                return None;
            }
            hs.iter()
                .find(|h| h.transport == t.name())
                .map(|h| (t, h.clone()))
        });
        let Some((transport, h)) = pick else {
            let theirs: Vec<&str> = hs.iter().map(|h| h.transport.as_str()).collect();
            let mine: Vec<&str> = transports.iter().map(|t| t.name()).collect();
            return Err(Error::InvalidArgument(format!(
                "no transport in common with rank {j} on host {} (this rank offers {}, it offers {}; same host: {same_host}); set the same BRAID_TRANSPORT on all ranks",
                m.hostname,
                mine.join(","),
                theirs.join(",")
            )));
        };
        names[j] = Some(transport.name());
        tracing::debug!(target: "braid::init", "rank {rank} -> rank {j}: {}", transport.name());
        // A peer of a stale view may be dead (its listener refuses): stop retrying once a
        // newer view is announced, as the accept loop below does, instead of at the deadline.
        let give_up = || abort.load(Ordering::Relaxed) || superseded();
        let conn = transport
            .connect_or_give_up(&h, &hello, deadline, &give_up)
            .map_err(|e| {
                if abort.load(Ordering::Relaxed) {
                    Error::Aborted
                } else if superseded() {
                    Error::Coordinator(format!(
                        "view epoch {} was superseded while connecting to rank {j}",
                        view.epoch
                    ))
                } else {
                    Error::PeerLost {
                        rank: j,
                        member: m.id,
                        host: m.hostname.clone(),
                        detail: format!("connecting: {e}"),
                    }
                }
            })?;
        peers[j] = Some(Peer {
            conn,
            rank: j,
            member: m.id,
            host: m.hostname.clone(),
        });
    }
    let mut missing = rank;
    let mut list = lock(&stash.list);
    while missing > 0 {
        // Claim the verified connections of this view; keep those of later epochs. Only a
        // connection whose hello verified (view MAC over its own challenge, member, pid) takes
        // a rank, so a forged one that arrived first cannot.
        let mut i = 0;
        while i < list.len() {
            let h = list[i].hello;
            if h.epoch > view.epoch {
                i += 1;
                continue;
            }
            let a = list.swap_remove(i);
            if h.epoch < view.epoch {
                tracing::debug!(target: "braid::net", "dropping a data connection of old epoch {} from {}", h.epoch, a.conn.peer_desc());
                continue;
            }
            if !a.verified {
                // learn() checked the connections of this view and push() checks later ones:
                // this is only a second line of defence.
                if let Err(why) =
                    stash.check(&a.hello, &a.challenge, a.peer_pid, &KnownView::of(view))
                {
                    refuse(&a, &why);
                    continue;
                }
                stash.remember(&a.hello.mac);
            }
            let r = h.rank;
            if r >= rank {
                refuse(
                    &a,
                    &format!("rank {r} does not connect to rank {rank} (lower ranks do)"),
                );
                continue;
            }
            if peers[r].is_some() {
                refuse(&a, &format!("rank {r} is connected already"));
                continue;
            }
            peers[r] = Some(Peer {
                conn: a.conn,
                rank: r,
                member: view.members[r].id,
                host: view.members[r].hostname.clone(),
            });
            names[r] = Some(a.transport);
            missing -= 1;
        }
        if missing == 0 {
            break;
        }
        if abort.load(Ordering::Relaxed) {
            return Err(Error::Aborted);
        }
        if let Some(why) = lock(&stash.dead).clone() {
            return Err(Error::Internal(format!("rank {rank}: {why}")));
        }
        if superseded() {
            return Err(Error::Coordinator(format!(
                "view epoch {} was superseded while connecting",
                view.epoch
            )));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let who: Vec<String> = (0..rank)
                .filter(|r| peers[*r].is_none())
                .map(|r| format!("rank {r} ({})", view.members[r].hostname))
                .collect();
            return Err(Error::Timeout {
                what: format!(
                    "waiting for connections from {} (view epoch {})",
                    who.join(", "),
                    view.epoch
                ),
                secs: 0.0,
            });
        }
        list = stash
            .cv
            .wait_timeout(list, left.min(Duration::from_millis(50)))
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
    drop(list);
    let used = names
        .iter()
        .enumerate()
        .filter_map(|(r, n)| n.map(|n| (r, n)))
        .collect();
    Ok((peers, used))
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
        self.acceptor_stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        drop(lock(&self.client).take());
        // A hosted coordinator stops with the last communicator that shares it.
        drop(self.coordinator.take());
    }
}
