//! The push/pull worker (and reader) side: splits keys into parts, routes each part to its
//! owner on the ring, waits for the answers, and re-routes what failed after a view change
//! (a server died: its replica took over) until the operation's deadline.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::chan::{
    close_all, Chan, ChanOpts, Drive, Incoming, Limits, OnPlace, Outgoing, Placement,
};
use super::checkpoint::{self, FileEntry, Manifest, PartEntry};
use super::node::{connect_to, Cred, Node};
use super::pool::{runs, BufPool, Loan, Seg};
use super::server::{mode_name, ring_of, servers_of, workers_of};
use super::shard::{split, Ring};
use super::wire::{permitted, Msg, PartRef, CLIENT_HDR, MAX_PARTS};
use super::Map;
use super::PsOptions;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::membership::{Client, Role, View};
use crate::types::{DataType, Element};
use braid_transport::PollFd;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Init,
    Push,
    Pull,
    Snap,
    Checkpoint,
    /// A [`Msg::SetRule`] (never re-sent).
    Rule,
    /// Reads the optimizer state (answered like a pull).
    PullState,
    /// Replaces the optimizer state (written like a push).
    PushState,
}

impl Kind {
    /// Requests carrying values (a body).
    fn writes(self) -> bool {
        matches!(self, Kind::Init | Kind::Push | Kind::PushState)
    }

    /// Requests answered with values.
    fn reads(self) -> bool {
        matches!(self, Kind::Pull | Kind::PullState)
    }
}

/// A request to one server (part of an operation).
struct WReq {
    op: u64,
    server: u64,
    kind: Kind,
    dtype: DataType,
    parts: Vec<(PartRef, usize)>,
    body: Src,
    min: Option<u64>,
    at: Option<u64>,
    prio: i32,
    /// A pull: how many of its parts were copied to the operation's memory from an early look
    /// at the answer ([`WInner::early_values`]).
    early: usize,
    /// A pull whose answer is being received straight into the operation's memory
    /// ([`WInner::place`]): it stays where it is until that ends (see [`PlaceGuard`]).
    placing: bool,
}

/// Where a write request's bytes are: its parts' offsets (`WReq::parts`) are into these.
#[derive(Clone)]
enum Src {
    /// A copy of the caller's values (a pooled buffer, shared with the channel sending it).
    Copy(Arc<Vec<u8>>),
    /// The caller's values themselves, lent while the call waits (see [`Lending`]).
    Lent(Arc<Loan>),
}

impl Src {
    /// No bytes (a request that carries none).
    fn none() -> Src {
        Src::Copy(Arc::default())
    }
}

/// Where a pull's values go: memory owned by the operation's handle (the caller's result
/// vector), written by the channel threads as answers arrive.
struct OutBuf {
    ptr: *mut u8,
    len: usize,
    /// The same memory lent for receiving answers straight into it ([`WInner::place`]),
    /// by a blocking call that takes it back before it returns.
    loan: Option<Arc<Loan>>,
}

impl OutBuf {
    const NONE: OutBuf = OutBuf {
        ptr: std::ptr::null_mut(),
        len: 0,
        loan: None,
    };

    /// Copies parts `from..to` of a pull's answer to where they go in this memory: `body`
    /// holds `parts`' bytes in order, `parts[i].1` is part `i`'s offset here. Every part up to
    /// `to` is checked to lie inside `body` and this memory; `false` (and nothing more copied)
    /// at the first that does not. The caller holds the worker state lock, with the operation
    /// this memory belongs to in `ops` (see the `Send` impl below).
    fn copy_parts(&self, parts: &[(PartRef, usize)], from: usize, to: usize, body: &[u8]) -> bool {
        let mut src = 0usize;
        for (i, (p, off)) in parts.iter().enumerate().take(to) {
            let in_body = src.checked_add(p.n).is_some_and(|e| e <= body.len());
            let in_out = off.checked_add(p.n).is_some_and(|e| e <= self.len);
            if !in_body || !in_out {
                return false;
            }
            if p.n > 0 && i >= from {
                // SAFETY: in bounds (checked above) of `body` and of the operation's output
                // memory, which stays allocated while the operation is in `ops`; the state
                // lock is held, so no other thread writes it.
                unsafe {
                    std::ptr::copy_nonoverlapping(body.as_ptr().add(src), self.ptr.add(*off), p.n);
                }
            }
            src += p.n;
        }
        true
    }
}

// SAFETY: an `OutBuf` is only dereferenced under the worker state lock while its operation is
// in `WState::ops`; the handle that owns the memory removes the operation under the same lock
// before the memory is freed (`PsHandle::drop` / `wait`), so no thread writes to freed memory.
unsafe impl Send for OutBuf {}

/// A user operation: one or more requests.
struct Op {
    outstanding: usize,
    out: OutBuf,
    versions: BTreeMap<(u64, u32), u64>,
    error: Option<Error>,
    deadline: Instant,
    /// A push_pull's pull: the push it must see (see [`WInner::stale_pull`]).
    after: Option<u64>,
}

struct WState {
    view: View,
    ring: Arc<Ring>,
    chans: Map<u64, Arc<Chan>>,
    next_req: u64,
    next_op: u64,
    reqs: Map<u64, WReq>,
    ops: Map<u64, Op>,
    retry: Vec<WReq>,
    /// Bytes and dtype of every key this worker has seen, to check later calls locally.
    keys: Map<u64, (DataType, usize)>,
    /// Pushes of push_pull calls (nobody waits on them; dropped when done).
    chained: Vec<u64>,
    /// Servers whose connection broke (or could not be made) in this view, with why and
    /// since when: not reconnected until the view changes (their requests wait in the retry
    /// list); requests for them fail once no new view came within [`WInner::lost_grace`].
    lost: Map<u64, (String, Instant)>,
    /// Checkpoint operations: what the servers answered so far.
    ckpts: Map<u64, CkptAcc>,
    /// The update rule this worker installed on the servers ([`KvWorker::set_rule`]), as
    /// [`super::UpdateRule::spec`] writes it: sent first on every connection made afterwards
    /// (servers that join later, reconnections).
    rule: Option<String>,
}

impl WState {
    /// Whether operation `o` finished: it failed, or every request of it was answered and,
    /// for a push_pull's pull, its push was acknowledged too (or failed). A push is
    /// acknowledged once every copy of its parts applied it, and the values a push_pull
    /// returns include that push: returned earlier, a server dying right after could lose
    /// what the caller already saw (with replicas, a sync round's pull is answered when the
    /// round closes, before its pushes are replicated).
    fn done(&self, o: &Op) -> bool {
        o.error.is_some()
            || (o.outstanding == 0
                && o.after.map_or(true, |p| {
                    self.ops
                        .get(&p)
                        .map_or(true, |q| q.outstanding == 0 || q.error.is_some())
                }))
    }

    /// Registers a new operation (no request sent yet) writing to `out`, failing at
    /// `deadline`; returns its id.
    fn new_op(&mut self, out: OutBuf, deadline: Instant) -> u64 {
        let op = self.next_op;
        self.next_op += 1;
        self.ops.insert(
            op,
            Op {
                outstanding: 0,
                out,
                versions: BTreeMap::new(),
                error: None,
                deadline,
                after: batch_push(),
            },
        );
        op
    }
}

/// What the servers answered to a checkpoint operation.
#[derive(Default)]
struct CkptAcc {
    /// By server: its file, the view epoch, its key directory's size, copy and write µs.
    files: BTreeMap<u64, (FileEntry, u64, u64, u64, u64)>,
    /// By server: the parts it wrote.
    parts: BTreeMap<u64, Vec<PartEntry>>,
    /// Part entries received in all.
    nparts: usize,
}

/// Most part entries a checkpoint's answers may hold (all servers together).
const MAX_CKPT_PARTS: usize = 1 << 22;

/// This worker's checkpoints: the periodic trigger and the last result.
#[derive(Default)]
struct CkptCtl {
    /// push_pull calls made.
    rounds: u64,
    /// A periodic checkpoint is due (taken at the next call with nothing queued).
    due: bool,
    /// A checkpoint of this worker is in progress.
    busy: bool,
    /// The last checkpoint this worker completed.
    last: Option<CheckpointInfo>,
}

/// A completed checkpoint (see [`KvWorker::checkpoint`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    /// The directory (absolute).
    pub dir: PathBuf,
    /// The checkpoint id.
    pub id: String,
    /// The smallest part version (sync: the round boundary).
    pub version: u64,
    /// The largest part version.
    pub max_version: u64,
    /// Key parts written.
    pub parts: usize,
    /// Bytes of the server files.
    pub bytes: u64,
    /// Servers (files).
    pub servers: usize,
    /// From the request to the manifest in place.
    pub seconds: f64,
    /// The longest time a server's state lock was held for the checkpoint (the copy of one
    /// part): what training waits for it at most, per part.
    pub copy_seconds: f64,
    /// The longest file write on a server (in the background).
    pub write_seconds: f64,
}

/// A checkpoint whose requests were sent.
struct Started {
    op: u64,
    id: String,
    dir: PathBuf,
    t0: Instant,
    deadline: Instant,
}

pub(crate) struct WInner {
    me: u64,
    my_host: String,
    opts: PsOptions,
    transports: Vec<Arc<dyn braid_transport::Transport>>,
    token: Option<Vec<u8>>,
    timeout: Duration,
    st: Mutex<WState>,
    cv: Condvar,
    /// The wake-up descriptors of threads waiting for an operation while they drive its
    /// connections ([`Driving`]): woken with `cv`'s waiters ([`WInner::wake`]).
    waiters: Mutex<Vec<i32>>,
    /// Threads waiting on `cv` for answers (not driving): a thread that stops driving a
    /// connection then wakes its channel thread to receive ([`Chan::unpark`]).
    cv_waiters: std::sync::atomic::AtomicUsize,
    stop: AtomicBool,
    /// Readers refresh their view from the coordinator (they are not members).
    reader: Option<(String, String)>,
    /// A reader's grant for the view in use: (reader id, epoch, ticket).
    ticket: Mutex<Option<(u64, u64, [u8; crate::membership::auth::MAC_LEN])>>,
    /// How long requests for a server whose connection broke wait for a new view (the server
    /// died: its replica takes over) before they fail naming it.
    lost_grace: Duration,
    /// Request bodies, reused once nobody else holds them (sent and answered): a fresh
    /// buffer per push would cost a page fault per 4 KiB of every large push.
    bodies: Mutex<BufPool>,
    /// The group (named in checkpoint manifests).
    group: String,
    /// The membership client (workers; readers have none): checkpoints are reported to the
    /// coordinator.
    client: Option<Arc<Client>>,
    /// Checkpoints (lock order: `ckpt` before `st`).
    ckpt: Mutex<CkptCtl>,
}

/// Request bodies kept for reuse, at most this many and [`BODY_POOL_BYTES`] of them.
const BODY_POOL: usize = 8;
/// See [`BODY_POOL`].
const BODY_POOL_BYTES: usize = 256 << 20;

/// Turns an operation's versions into what its handle returns (it owns the memory a pull's
/// values were written to).
type Finish<R> = Box<dyn FnOnce(BTreeMap<(u64, u32), u64>) -> R + Send>;

/// The completion handle of a push/pull operation.
pub struct PsHandle<R> {
    inner: Arc<WInner>,
    op: u64,
    finish: Option<Finish<R>>,
    /// Caller memory a non-blocking pull receives its answers into ([`KvWorker::pull_raw`]),
    /// taken back when the handle is dropped (after [`PsHandle::drop`] forgot the operation):
    /// nothing writes to it afterwards.
    recv: Option<Lending>,
    /// Caller memory a push is sent from ([`KvWorker::push_pull_lent`]), taken back after
    /// `recv`: nothing reads it afterwards.
    sent: Option<Lending>,
}

impl<R> std::fmt::Debug for PsHandle<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PsHandle").field("op", &self.op).finish()
    }
}

impl<R> PsHandle<R> {
    /// The handle, holding `recv` (the caller memory its answers are received into) until it
    /// is dropped.
    fn receiving(mut self, recv: Lending) -> Self {
        self.recv = Some(recv);
        self
    }

    /// The handle, holding `sent` (the caller memory its push is sent from) until it is
    /// dropped.
    fn sending(mut self, sent: Lending) -> Self {
        self.sent = Some(sent);
        self
    }

    /// Whether the operation finished (successfully or not); never blocks.
    pub fn test(&self) -> bool {
        let st = lock(&self.inner.st);
        let known = st.ops.get(&self.op);
        // A pull that receives into the caller's memory is done once no connection writes to
        // it either: the loan is held by this handle and the operation only (an answer's
        // placement lets go just after the answer completed the operation).
        let done = known.map_or(true, |o| st.done(o))
            && self
                .recv
                .as_ref()
                .and_then(|r| r.loan.as_ref())
                .map_or(true, |l| {
                    Arc::strong_count(l) <= 1 + usize::from(known.is_some())
                });
        if !done {
            // Its answers may arrive on a connection whose channel thread left receiving to
            // a thread that drove it (see `Chan::attach`).
            unpark_all(&st);
        }
        done
    }

    /// Waits for the operation. Errors: a server's refusal (`InvalidArgument`: wrong length,
    /// dtype, unknown key), `Timeout` after `BRAID_TIMEOUT` without an answer (servers lost
    /// and no replica took over).
    pub fn wait(mut self) -> Result<R> {
        let mut st = lock(&self.inner.st);
        // Set up at the first wait: the connections this thread receives on itself.
        let mut driving: Option<Option<Driving>> = None;
        let outcome = loop {
            let (done, deadline) = match st.ops.get(&self.op) {
                Some(o) => (st.done(o), o.deadline),
                None => break Err(Error::Internal("operation vanished".into())),
            };
            if done {
                break Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let o = st.ops.remove(&self.op);
                break Err(Error::Timeout {
                    what: format!(
                        "push/pull operation: {} request(s) unanswered",
                        o.map_or(0, |o| o.outstanding)
                    ),
                    secs: self.inner.timeout.as_secs_f64(),
                });
            }
            let d = driving.get_or_insert_with(|| Driving::start(&self.inner, &st, self.op));
            if let Some(d) = d {
                drop(st);
                d.turn(deadline);
                st = lock(&self.inner.st);
                continue;
            }
            st = self
                .inner
                .cv_wait(st, (deadline - now).min(Duration::from_millis(100)));
        };
        if let Some(Some(d)) = driving.take() {
            d.finish(&st);
        }
        outcome?;
        let o = st
            .ops
            .remove(&self.op)
            .ok_or_else(|| Error::Internal("operation vanished".into()))?;
        drop(st);
        if let Some(e) = o.error {
            return Err(e);
        }
        let f = self
            .finish
            .take()
            .ok_or_else(|| Error::Internal("handle already consumed".into()))?;
        Ok(f(o.versions))
    }
}

impl<R> Drop for PsHandle<R> {
    fn drop(&mut self) {
        if self.finish.is_some() {
            // Not waited for: forget the operation (late answers are ignored) before the
            // memory its answers would be written to goes away.
            lock(&self.inner.st).ops.remove(&self.op);
        }
        // Then `recv` (a field, dropped after this) takes the caller's memory back: it waits
        // for an answer still being received into it.
    }
}

/// Most connections a waiting thread drives itself ([`Driving`]); an operation spread over
/// more waits for the channel threads.
const DRIVE_MAX: usize = 8;

/// Operations moving more bytes than this (pulled or pushed) wait for the channel threads:
/// they receive the servers' answers (and send the requests) in parallel, where one waiting
/// thread would take them one after the other (measured: 4 MiB push_pull rounds ~7% slower
/// driven).
const DRIVE_BYTES: usize = 1 << 20;

/// A thread's wake-up descriptor, for waiting on it next to the connections it drives: an
/// eventfd made at the thread's first [`Driving`] (-1 before; -2 when none could be made),
/// closed when the thread ends.
struct Waker(std::cell::Cell<i32>);

impl Drop for Waker {
    fn drop(&mut self) {
        let fd = self.0.get();
        if fd >= 0 {
            // SAFETY: FFI; closes the eventfd this thread-local owns, once.
            unsafe {
                libc::close(fd);
            }
        }
    }
}

thread_local! {
    static WAKER: Waker = const { Waker(std::cell::Cell::new(-1)) };
}

/// This thread's wake-up descriptor (made now if needed), or `None` when none can be made.
fn own_waker() -> Option<i32> {
    WAKER
        .try_with(|w| {
            if w.0.get() == -1 {
                // SAFETY: FFI; eventfd(2) with valid flags returns a new descriptor or -1.
                let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
                w.0.set(if fd < 0 { -2 } else { fd });
            }
            w.0.get()
        })
        .ok()
        .filter(|fd| *fd >= 0)
}

/// Wakes the channel threads that left receiving to threads that no longer drive (see
/// [`Chan::unpark`]).
fn unpark_all(st: &WState) {
    for c in st.chans.values() {
        c.unpark();
    }
}

/// Makes a waiting thread's wake-up descriptor readable.
fn waker_poke(fd: i32) {
    let one: u64 = 1;
    // SAFETY: FFI; writes 8 bytes from a live u64 to an eventfd.
    unsafe {
        libc::write(fd, (&one as *const u64).cast::<libc::c_void>(), 8);
    }
}

/// A thread waiting for an operation that receives its answers itself: it drives the
/// connections of the operation's requests ([`Chan::drive`]) and waits on their descriptors
/// and its own wake-up descriptor. An answer then wakes the thread that waits for it, not a
/// channel thread that would then have to wake it (one wake-up less per answer, and the
/// largest part of a small operation's time on a busy host). Operations on connections that
/// cannot be driven (shared memory), or on more than [`DRIVE_MAX`] servers, wait on the
/// condition variable instead.
struct Driving {
    inner: Arc<WInner>,
    /// (server, its connection).
    chans: Vec<(u64, Arc<Chan>)>,
    waker: i32,
    fds: Vec<PollFd>,
    scratch: Vec<libc::pollfd>,
}

impl Driving {
    /// Starts driving the connections of operation `op`'s requests (with `st`, the state,
    /// locked), or `None` when it waits on the condition variable.
    fn start(inner: &Arc<WInner>, st: &WState, op: u64) -> Option<Driving> {
        let mut servers = Vec::new();
        let mut bytes = 0usize;
        for r in st.reqs.values().filter(|r| r.op == op) {
            servers.push(r.server);
            bytes = bytes.saturating_add(r.parts.iter().map(|(p, _)| p.n).sum());
        }
        if bytes > DRIVE_BYTES {
            return None;
        }
        let waker = own_waker()?;
        servers.sort_unstable();
        servers.dedup();
        if servers.is_empty() || servers.len() > DRIVE_MAX {
            return None;
        }
        let mut chans = Vec::with_capacity(servers.len());
        for s in servers {
            match st.chans.get(&s) {
                Some(c) if c.drivable() => chans.push((s, c.clone())),
                _ => return None,
            }
        }
        for (_, c) in &chans {
            c.attach();
        }
        lock(&inner.waiters).push(waker);
        Some(Driving {
            inner: inner.clone(),
            chans,
            waker,
            fds: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// One turn: drives the connections; when nothing moved, waits (until `deadline`, for
    /// at most 20 ms) for one of them or the wake-up descriptor. The caller then looks at
    /// its operation again.
    fn turn(&mut self, deadline: Instant) {
        self.fds.clear();
        let mut moved = false;
        let mut busy = false;
        for (_, c) in &self.chans {
            match c.drive(&mut self.fds) {
                Drive::Moved => moved = true,
                Drive::Busy => busy = true,
                Drive::Idle | Drive::Closed => {}
            }
        }
        if moved {
            return;
        }
        if busy {
            // Another thread works on a connection (it holds it only while it sends and
            // receives, never while it waits): look again as soon as it lets go. Waiting here
            // without that connection's descriptors could miss an answer that arrives after
            // its channel thread went back to waiting for its wake-up descriptor only
            // (measured: 256 KiB rounds, whose requests the channel threads send, took ~30%
            // longer with a 1 ms wait here).
            std::thread::yield_now();
            return;
        }
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(20));
        self.fds.push(PollFd {
            fd: self.waker,
            read: true,
            write: false,
        });
        let _ = braid_transport::wait_fds(&self.fds, wait, &mut self.scratch);
        if self.scratch.last().map_or(true, |p| p.revents != 0) {
            let mut b = [0u8; 8];
            // SAFETY: FFI; reads at most 8 bytes into a live buffer from this thread's
            // nonblocking eventfd.
            unsafe {
                libc::read(self.waker, b.as_mut_ptr().cast::<libc::c_void>(), 8);
            }
        }
    }

    /// Stops driving (with `st`, the state, locked). A connection with requests still
    /// unanswered (a push_pull's push acknowledged after its pull: a replicated push) or
    /// with a thread waiting for answers without driving gets its channel thread back to
    /// receive at once: an answer left unread until the next view would be sent again.
    fn finish(mut self, st: &WState) {
        self.stop(|server| st.reqs.values().any(|r| r.server == server));
    }

    fn stop(&mut self, pending: impl Fn(u64) -> bool) {
        if self.chans.is_empty() {
            return;
        }
        lock(&self.inner.waiters).retain(|&fd| fd != self.waker);
        let others = self.inner.cv_waiters.load(Ordering::SeqCst) > 0;
        for (server, c) in self.chans.drain(..) {
            c.detach();
            if others || pending(server) {
                c.unpark();
            }
        }
    }
}

impl Drop for Driving {
    /// Without [`Driving::finish`] (an unwinding wait): every channel thread receives again.
    fn drop(&mut self) {
        self.stop(|_| true);
    }
}

/// A push/pull worker process: `init`, `push`, `pull`, `push_pull` on keys spread over the
/// group's servers. Dropping it leaves the group.
pub struct KvWorker {
    inner: Arc<WInner>,
    watcher: Option<JoinHandle<()>>,
    node: Option<Node>,
}

impl std::fmt::Debug for KvWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvWorker")
            .field("member", &self.inner.me)
            .finish_non_exhaustive()
    }
}

/// What a pull returned: the values and the version (round) of every key part.
#[derive(Debug, Clone, PartialEq)]
pub struct Pulled<T> {
    /// Values, concatenated in the order of the keys asked for.
    pub values: Vec<T>,
    /// Smallest version over the parts read.
    pub version: u64,
}

impl KvWorker {
    /// Starts a worker: registers with the coordinator as a worker of the group and connects
    /// to the servers of the view.
    ///
    /// Errors: as `Communicator::init`.
    pub fn start(cfg: Config, opts: PsOptions) -> Result<KvWorker> {
        let timeout = cfg.timeout;
        let lost_grace = lost_grace(&cfg);
        let group = cfg.group.clone();
        let node = Node::start(
            cfg,
            Role::Worker,
            Box::new(|c: Box<dyn braid_transport::Conn>, p| {
                tracing::warn!(target: "braid::ps", "worker: dropping an unexpected connection from {} ({} {})", c.peer_desc(), p.role, p.id);
            }),
        )?;
        let view = node.first_view.clone();
        let my_host = node.host_id();
        let inner = Arc::new(WInner {
            me: node.me,
            my_host,
            opts,
            transports: node.transports.clone(),
            token: node.token.clone(),
            timeout,
            st: Mutex::new(new_state(view.clone())),
            cv: Condvar::new(),
            waiters: Mutex::new(Vec::new()),
            cv_waiters: std::sync::atomic::AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            reader: None,
            ticket: Mutex::new(None),
            lost_grace,
            bodies: Mutex::new(BufPool::new(BODY_POOL, BODY_POOL_BYTES)),
            group,
            client: Some(node.client.clone()),
            ckpt: Mutex::new(CkptCtl::default()),
        });
        node.client.installed(view.epoch);
        let watcher = spawn_watcher(inner.clone(), Some(node.client.clone()));
        Ok(KvWorker {
            inner,
            watcher: Some(watcher),
            node: Some(node),
        })
    }

    /// This worker's member id.
    pub fn member_id(&self) -> u64 {
        self.inner.me
    }

    /// Epoch of the view in use.
    pub fn epoch(&self) -> u64 {
        lock(&self.inner.st).view.epoch
    }

    /// Servers and workers in the view in use.
    pub fn sizes(&self) -> (usize, usize) {
        let st = lock(&self.inner.st);
        let s = servers_of(&st.view).len();
        let w = st
            .view
            .members
            .iter()
            .filter(|m| m.role == Role::Worker)
            .count();
        (s, w)
    }

    /// Creates keys with initial values (first writer wins; others' inits are checked for the
    /// same length and dtype). `lens[i]` elements of `vals` belong to `keys[i]`. Blocking.
    ///
    /// Errors: `InvalidArgument` for inconsistent lengths; a server's refusal; timeouts.
    pub fn init<T: Element>(&self, keys: &[u64], lens: &[usize], vals: &[T]) -> Result<()> {
        self.inner
            .write_op(Kind::Init, keys, lens, vals, 0)
            .and_then(|op| handle(&self.inner, op, |_| ()).wait())
    }

    /// Pushes gradients for `keys` (`lens[i]` elements each, concatenated in `vals`) with a
    /// priority (higher is sent first when queues build up). Servers aggregate per the group's
    /// consistency mode. The handle completes when every part was recorded and replicated.
    ///
    /// Errors: as [`KvWorker::init`].
    pub fn push<T: Element>(
        &self,
        keys: &[u64],
        lens: &[usize],
        vals: &[T],
        prio: i32,
    ) -> Result<PsHandle<()>> {
        let op = self.inner.push_op(keys, lens, vals, prio)?;
        Ok(handle(&self.inner, op, |_| ()))
    }

    /// As [`KvWorker::push`], without copying `vals` when it is at least 64 KiB: the push is
    /// sent from the caller's memory (smaller values are copied into the requests). Waiting
    /// for the handle, or dropping it, takes `vals` back (a connection that has not sent its
    /// part of them a second after the push failed, its server not reading, is closed).
    ///
    /// # Safety
    /// `vals` must stay valid and unmodified until the handle was waited for or dropped (what
    /// the servers receive is what `vals` holds while it is sent).
    pub unsafe fn push_lent<T: Element>(
        &self,
        keys: &[u64],
        lens: &[usize],
        vals: &[T],
        prio: i32,
    ) -> Result<PsHandle<()>> {
        let bytes: &[u8] = bytemuck::cast_slice(vals);
        // SAFETY: the caller keeps `vals` valid and unmodified until the handle is dropped.
        let lending = unsafe { Lending::of(&self.inner, bytes) };
        let op = self.inner.submit_to(
            Kind::Push,
            T::DTYPE,
            keys,
            lens,
            bytes,
            OutBuf::NONE,
            None,
            None,
            prio,
            lending.loan(),
        )?;
        Ok(handle(&self.inner, op, |_| ()).sending(lending))
    }

    /// Pulls `keys` (`lens[i]` elements each). `min_version`: wait until every part reached
    /// this version; `None`: sync/bounded mode — the round this worker last pushed to (so a
    /// push followed by a pull returns that round's aggregate); async — the latest.
    ///
    /// Errors: as [`KvWorker::init`]; pulling a key nobody initialised waits for it until the
    /// deadline.
    pub fn pull<T: Element>(
        &self,
        keys: &[u64],
        lens: &[usize],
        min_version: Option<u64>,
        prio: i32,
    ) -> Result<PsHandle<Pulled<T>>> {
        self.inner.pull_op::<T>(keys, lens, min_version, None, prio)
    }

    /// Push then pull of the same keys in one round trip (the pull is queued right behind the
    /// push on each server's connection): returns the aggregate of the round this push took
    /// part in (sync), or the value after it (async).
    ///
    /// Errors: as [`KvWorker::push`].
    pub fn push_pull<T: Element>(
        &self,
        keys: &[u64],
        lens: &[usize],
        vals: &[T],
        prio: i32,
    ) -> Result<PsHandle<Pulled<T>>> {
        self.inner.round_start();
        // As in `push_pull_raw`.
        let _batch = Batch::open();
        let push = self.inner.push_op(keys, lens, vals, prio)?;
        self.inner.chain(push);
        self.inner.pull_op::<T>(keys, lens, None, None, prio)
    }

    /// Writes a checkpoint of the group's push/pull state to directory `dir` (created if
    /// needed; relative paths are taken from the current directory, and every server must
    /// reach the same path: a shared or local file system) and returns what was written. See
    /// the module documentation of [`super`], "Checkpoints, exactly": every server writes the
    /// parts it owns at one consistent version (sync: the round this worker last pushed into;
    /// async/bounded: each part's current version), one file per server, then this worker
    /// writes the manifest, and the coordinator records the checkpoint (`braid-coordinator
    /// status`). The previous checkpoint in `dir` stays valid until the new manifest is in
    /// place; then its files are removed. Servers copy their state in memory and write in the
    /// background; this call blocks until the checkpoint is on disk. Every push this worker
    /// sent before the call is in it (sync: once its round closed). It first waits (up to
    /// `BRAID_TIMEOUT`) for a periodic checkpoint of this worker to finish and for what this
    /// worker sent to leave its queues.
    ///
    /// Errors: `InvalidArgument` for a bad path or a server's refusal (e.g. still writing an
    /// earlier checkpoint, a part without a copy, the view changed meanwhile); `PeerLost` when
    /// a server is lost before it answered; `System` for I/O errors writing the manifest;
    /// `Timeout`. Nothing is installed on error.
    pub fn checkpoint(&self, dir: impl AsRef<Path>) -> Result<CheckpointInfo> {
        let d = dir.as_ref();
        let name = d.to_str().ok_or_else(|| {
            Error::InvalidArgument(format!("checkpoint directory {} is not UTF-8", d.display()))
        })?;
        let dir = super::absolute("checkpoint directory", name)?;
        let deadline = Instant::now() + self.inner.timeout;
        loop {
            let mut c = lock(&self.inner.ckpt);
            if !c.busy {
                c.busy = true;
                break;
            }
            drop(c);
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "checkpoint: waiting for this worker's previous checkpoint".into(),
                    secs: self.inner.timeout.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let r = self
            .inner
            .start_checkpoint(&dir, Some(deadline))
            .and_then(|s| {
                s.ok_or_else(|| Error::Internal("checkpoint not started".into()))
                    .and_then(|s| self.inner.finish_checkpoint(s))
            });
        let mut c = lock(&self.inner.ckpt);
        c.busy = false;
        if let Ok(i) = &r {
            c.last = Some(i.clone());
        }
        r
    }

    /// The last checkpoint this worker completed (by [`KvWorker::checkpoint`] or
    /// periodically), if any.
    pub fn last_checkpoint(&self) -> Option<CheckpointInfo> {
        lock(&self.inner.ckpt).last.clone()
    }

    /// Installs update rule `rule` (a built-in one: [`UpdateRule::Sum`](super::UpdateRule) or
    /// [`UpdateRule::Sgd`](super::UpdateRule)) on every server of the view, blocking until
    /// each acknowledged it. The request is queued on each server's connection behind
    /// everything this worker queued before (requests waiting for a view change to be
    /// re-sent excepted), and servers use the rule for every update they apply after it (sync:
    /// the rounds that close after it); the optimizer state (momentum) of the keys is kept.
    /// Idempotent: every worker may send the same rule (as MXNet's `set_optimizer` on every
    /// worker; do so, so that whichever worker reaches a server first, the rule is there).
    /// This worker also sends the rule first on every connection it makes from now on (servers
    /// that join the view, reconnections), unless a server refused it. Replicas apply each replicated push with
    /// the rule its owner applied it with.
    ///
    /// Errors: `InvalidArgument` for a custom rule (it cannot be sent), or a server's refusal
    /// (a server running a custom callback rule); `PeerLost` naming a server lost before it
    /// answered; `Timeout` (BRAID_TIMEOUT).
    pub fn set_rule(&self, rule: &super::UpdateRule) -> Result<()> {
        let spec = rule.spec().ok_or_else(|| {
            Error::InvalidArgument(
                "a custom (callback) update rule cannot be installed at run time; only sum and \
                 sgd can"
                    .into(),
            )
        })?;
        // From now on new connections start with this rule (servers joining meanwhile);
        // restored when a server refuses it.
        let before = lock(&self.inner.st).rule.replace(spec.clone());
        let r = self
            .inner
            .send_rule(&spec)
            .and_then(|op| handle(&self.inner, op, |_| ()).wait());
        if let Err(e) = &r {
            if matches!(e, Error::InvalidArgument(_)) {
                let mut st = lock(&self.inner.st);
                if st.rule.as_deref() == Some(spec.as_str()) {
                    st.rule = before;
                }
            }
        }
        r
    }

    /// Reads the optimizer state (the Sgd rule's momentum buffers) of `keys` (`lens[i]`
    /// elements each, the keys' dtype) into `out`, laid out as a pull; zeros for keys that
    /// have none yet. Blocking.
    ///
    /// Errors: as [`KvWorker::pull_into`]; `InvalidArgument` for a key nobody initialised.
    pub fn pull_state_into<T: Element>(
        &self,
        keys: &[u64],
        lens: &[usize],
        out: &mut [T],
    ) -> Result<()> {
        check_out(lens, out.len())?;
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
        let buf = OutBuf {
            ptr: bytes.as_mut_ptr(),
            len: bytes.len(),
            loan: None,
        };
        let op = self.inner.submit_to(
            Kind::PullState,
            T::DTYPE,
            keys,
            lens,
            &[],
            buf,
            None,
            None,
            i32::MAX,
            None,
        )?;
        // `out` stays borrowed until the handle was waited for (or dropped on error, which
        // forgets the operation under the state lock).
        handle(&self.inner, op, |_| ()).wait()
    }

    /// Replaces the optimizer state of `keys` (laid out as a push; the keys' dtype and
    /// lengths), replicated like a push. Blocking. The servers use it from their next update.
    ///
    /// Errors: as [`KvWorker::push`]; `InvalidArgument` for a key nobody initialised.
    pub fn push_state<T: Element>(&self, keys: &[u64], lens: &[usize], vals: &[T]) -> Result<()> {
        let op = self.inner.submit(
            Kind::PushState,
            T::DTYPE,
            keys,
            lens,
            bytemuck::cast_slice(vals),
            None,
            None,
            i32::MAX,
        )?;
        handle(&self.inner, op, |_| ()).wait()
    }

    /// As [`KvWorker::pull`], blocking, with the values written straight into `out` (no
    /// result vector to allocate and fill); returns the version (the smallest over the
    /// parts). When `out` is at least 64 KiB, large answers are received into it without a
    /// copy; the call returns once nothing receives into it any more (a connection still
    /// receiving into it a second after the call failed, its server not sending, is closed).
    ///
    /// Errors: as [`KvWorker::pull`]; `InvalidArgument` when `out` does not hold the lengths'
    /// elements.
    pub fn pull_into<T: Element>(
        &self,
        keys: &[u64],
        lens: &[usize],
        out: &mut [T],
        min_version: Option<u64>,
        prio: i32,
    ) -> Result<u64> {
        check_out(lens, out.len())?;
        // Large answers are received straight into `out`, taken back when the handle is
        // dropped (at the end of its wait, or on an error), before this returns.
        // SAFETY: `out` holds the lengths' elements (checked) and is borrowed mutably until
        // the handle was dropped.
        unsafe { self.pull_raw::<T>(keys, lens, out.as_mut_ptr(), min_version, prio) }
            .and_then(|h| h.wait())
    }

    /// A receive loan of `out` (`n` elements) when it is large enough to receive answers
    /// straight into ([`LEND_MIN`]), given back when the returned guard is dropped.
    fn receiving<T: Element>(&self, out: *mut T, n: usize) -> Lending {
        let bytes = n * std::mem::size_of::<T>();
        Lending {
            inner: self.inner.clone(),
            // SAFETY: the caller's `out` is borrowed mutably (and not touched) until the
            // guard was dropped, which takes the loan back.
            loan: (bytes >= LEND_MIN).then(|| unsafe { Loan::new_mut(out.cast::<u8>(), bytes) }),
        }
    }

    /// As [`KvWorker::push_pull`], blocking, with the pulled values written straight into
    /// `out`; returns the version. Values of at least 64 KiB are sent from `vals` itself, not
    /// from a copy: the call returns once nothing holds them any more (requests still waiting
    /// for an answer or a retry then get a copy; a connection that has not sent its part of
    /// them a second after the call failed, its server not reading, is closed). The answers
    /// are received into `out` as in [`KvWorker::pull_into`].
    ///
    /// Errors: as [`KvWorker::pull_into`].
    pub fn push_pull_into<T: Element>(
        &self,
        keys: &[u64],
        lens: &[usize],
        vals: &[T],
        out: &mut [T],
        prio: i32,
    ) -> Result<u64> {
        check_out(lens, out.len())?;
        // SAFETY: `vals` is borrowed and `out` borrowed mutably for this whole call, which
        // drops the handle (taking both back) before it returns.
        unsafe { self.push_pull_lent(keys, lens, vals, out.as_mut_ptr(), prio) }
            .and_then(|h| h.wait())
    }

    /// [`KvWorker::push_pull_into`] of several arrays, one key each, all in flight together
    /// (each key's push and pull leave at once; the call then waits for every answer):
    /// `vals[i]` is pushed to `keys[i]` and its value pulled into `outs[i]`, neither copied
    /// (as in [`KvWorker::push_pull_into`]). Returns the smallest version over the keys.
    ///
    /// When a key's request cannot be sent (e.g. a length that differs from the key's), the
    /// keys before it were sent and are waited for (their values are in `outs`), the rest
    /// are not sent, and the call returns that error. Otherwise the first
    /// failed key's error, once every key's operation ended.
    ///
    /// Errors: as [`KvWorker::push_pull_into`]; `InvalidArgument` when the three slices'
    /// lengths differ, or `vals[i]` and `outs[i]` do.
    pub fn push_pull_into_each<T: Element>(
        &self,
        keys: &[u64],
        vals: &[&[T]],
        outs: &mut [&mut [T]],
        prio: i32,
    ) -> Result<u64> {
        if keys.len() != vals.len() || keys.len() != outs.len() {
            return Err(Error::InvalidArgument(format!(
                "{} keys, {} value arrays and {} output arrays",
                keys.len(),
                vals.len(),
                outs.len()
            )));
        }
        if let Some(i) = (0..keys.len()).find(|&i| vals[i].len() != outs[i].len()) {
            return Err(Error::InvalidArgument(format!(
                "key {}: {} values but an output of {} elements",
                keys[i],
                vals[i].len(),
                outs[i].len()
            )));
        }
        let mut started = Vec::with_capacity(keys.len());
        let mut refused = None;
        // Each key's requests leave as soon as they are queued (one batch per key, as in
        // `push_pull_into`): measured against one batch for every key (one write per server),
        // 2x2 async, 8 keys: 6.8% faster at 1 MiB per round, 10.5% at 256 KiB, 1.5% slower
        // at 16 MiB (medians of 8, 8 and 6 alternating runs).
        for ((k, v), o) in keys.iter().zip(vals).zip(outs.iter_mut()) {
            // SAFETY: `vals` and `outs` are borrowed for this whole call, which drops every
            // handle (taking the memory back) before it returns.
            match unsafe {
                self.push_pull_lent(std::slice::from_ref(k), &[v.len()], v, o.as_mut_ptr(), prio)
            } {
                Ok(h) => started.push(h),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        wait_each(started, refused)
    }

    /// A non-blocking [`KvWorker::push_pull_into`]: `vals` is sent from the caller's memory
    /// when it is at least 64 KiB (smaller values are copied into the requests), and the
    /// answers are received into `out` as in [`KvWorker::pull_raw`]. Waiting for the handle,
    /// or dropping it, takes both back (see [`KvWorker::push_pull_into`] for when a connection
    /// that still holds them is closed).
    ///
    /// # Safety
    /// As [`KvWorker::pull_raw`], and `vals` must stay valid and unmodified until the handle
    /// was waited for or dropped; `out` must not overlap `vals`.
    pub unsafe fn push_pull_lent<T: Element>(
        &self,
        keys: &[u64],
        lens: &[usize],
        vals: &[T],
        out: *mut T,
        prio: i32,
    ) -> Result<PsHandle<u64>> {
        let bytes: &[u8] = bytemuck::cast_slice(vals);
        // The values are sent from `vals` itself; the handle holds the loan until it is
        // dropped (here, on an error).
        // SAFETY: the caller keeps `vals` valid and unmodified until then.
        let lending = unsafe { Lending::of(&self.inner, bytes) };
        // The answers go straight into `out`, as in `pull_raw`.
        let receiving = self.receiving(out, lens.iter().sum());
        // SAFETY: forwarded from the caller.
        let h = unsafe {
            self.push_pull_from::<T>(
                keys,
                lens,
                vals,
                lending.loan(),
                out,
                receiving.loan(),
                prio,
            )
        }?;
        Ok(h.receiving(receiving).sending(lending))
    }

    /// As [`KvWorker::push_pull`], the pulled values written to caller memory (see
    /// [`KvWorker::pull_raw`]); `vals` is copied before the call returns.
    ///
    /// # Safety
    /// As [`KvWorker::pull_raw`].
    pub unsafe fn push_pull_raw<T: Element>(
        &self,
        keys: &[u64],
        lens: &[usize],
        vals: &[T],
        out: *mut T,
        prio: i32,
    ) -> Result<PsHandle<u64>> {
        // Large answers are received straight into `out`, taken back when the handle is
        // dropped (or here, on an error).
        let receiving = self.receiving(out, lens.iter().sum());
        // SAFETY: forwarded from the caller: `out` is neither read nor written by anyone else
        // until the handle was dropped, which takes the loan back.
        let h =
            unsafe { self.push_pull_from(keys, lens, vals, None, out, receiving.loan(), prio) }?;
        Ok(h.receiving(receiving))
    }

    /// [`KvWorker::push_pull_raw`], the push sent from `lent` (`vals`' bytes) when given, the
    /// answers received into `dest` (a receive loan of `out`) when given.
    ///
    /// # Safety
    /// As [`KvWorker::pull_raw`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn push_pull_from<T: Element>(
        &self,
        keys: &[u64],
        lens: &[usize],
        vals: &[T],
        lent: Option<Arc<Loan>>,
        out: *mut T,
        dest: Option<Arc<Loan>>,
        prio: i32,
    ) -> Result<PsHandle<u64>> {
        self.inner.round_start();
        // The push and the pull to each server leave together (one write, one wake-up of the
        // server), when the batch ends.
        let _batch = Batch::open();
        let push = self.inner.submit_to(
            Kind::Push,
            T::DTYPE,
            keys,
            lens,
            bytemuck::cast_slice(vals),
            OutBuf::NONE,
            None,
            None,
            prio,
            lent,
        )?;
        self.inner.chain(push);
        // SAFETY: forwarded from the caller.
        unsafe { self.pull_from::<T>(keys, lens, out, dest, None, prio) }
    }

    /// A non-blocking pull into caller memory (the C ABI's shape): the values of `keys`
    /// (`lens[i]` elements each) are written to `out` as the servers answer; the handle
    /// returns the version. Answers of at least 64 KiB in all are received straight into `out`
    /// (no copy), as in [`KvWorker::pull_into`]: the handle's [`PsHandle::test`] says done,
    /// and its wait or drop returns, only once nothing writes to `out` any more (a drop
    /// before the end waits for an answer being received into it; a connection still
    /// receiving into it a second later, its server not sending, is closed).
    ///
    /// # Safety
    /// `out` must be valid for writes of `lens.iter().sum()` elements of `T` and not be read
    /// or written by anyone else until the handle was waited for or dropped.
    pub unsafe fn pull_raw<T: Element>(
        &self,
        keys: &[u64],
        lens: &[usize],
        out: *mut T,
        min_version: Option<u64>,
        prio: i32,
    ) -> Result<PsHandle<u64>> {
        // Large answers are received straight into `out`, as in `push_pull_raw`.
        let receiving = self.receiving(out, lens.iter().sum());
        // SAFETY: as in `push_pull_raw`.
        let h = unsafe { self.pull_from(keys, lens, out, receiving.loan(), min_version, prio) }?;
        Ok(h.receiving(receiving))
    }

    /// [`KvWorker::pull_raw`], the answers received straight into `dest` (a receive loan of
    /// `out`, [`WInner::place`]) when given.
    ///
    /// # Safety
    /// As [`KvWorker::pull_raw`]; `dest`, when given, lends exactly `out`'s memory.
    unsafe fn pull_from<T: Element>(
        &self,
        keys: &[u64],
        lens: &[usize],
        out: *mut T,
        dest: Option<Arc<Loan>>,
        min_version: Option<u64>,
        prio: i32,
    ) -> Result<PsHandle<u64>> {
        let n: usize = lens.iter().sum();
        let len = n * std::mem::size_of::<T>();
        let buf = OutBuf {
            ptr: out.cast::<u8>(),
            len,
            loan: dest.filter(|l| l.len() == len),
        };
        let op = self.inner.submit_to(
            Kind::Pull,
            T::DTYPE,
            keys,
            lens,
            &[],
            buf,
            min_version,
            None,
            prio,
            None,
        )?;
        Ok(handle(&self.inner, op, |versions| {
            versions.values().copied().min().unwrap_or(0)
        }))
    }
}

/// Values (pushes) and outputs (pulls) of at least this many bytes are lent to the channels:
/// pushes are sent from the caller's values and answers received into the caller's output,
/// without a copy. Smaller ones are copied: the channel copies segments under 64 KiB together
/// anyway. Measured against 1 MiB (the threshold before), 2x2 async TCP, 8 keys, 8
/// alternating runs, medians: [`KvWorker::push_pull_into_each`] (an operation per key, keys of
/// 128 and 512 KiB now lent) 5.8% faster at 1 MiB per round and 21.1% at 4 MiB (sync 1 MiB:
/// 16.5%); one contiguous [`KvWorker::push_pull_into`] 8.7% faster at 256 KiB and level at
/// 512 KiB; the C ABI's path (`push_pull_raw`, whose answers are now received in place) 16.3%
/// faster at 256 KiB and 4.9% at 512 KiB.
const LEND_MIN: usize = 64 << 10;

/// A copied push body of at least this many bytes is set moving as soon as it is queued,
/// ahead of an open batch: its connection sends it while the caller copies the next server's
/// body ([`WInner::submit_to`]). Smaller ones leave with the batch (one write per server).
const SEND_EARLY: usize = 256 << 10;

/// How long [`Lending`] waits for a connection to send what it still holds of the caller's
/// values before it closes the connection (on a live one they leave within moments: the
/// server read the push before it answered the pull behind it).
const LOAN_GRACE: Duration = Duration::from_secs(1);

/// The caller's values lent to the push of a blocking push_pull: when dropped (before the
/// call returns, whether it succeeded or not) it takes the loan back, so the caller's memory
/// is neither read nor referenced afterwards:
/// - requests still kept for their answer or a retry (a replicated push is acknowledged after
///   its pull; a push retried after a view change) get a copy of their parts;
/// - what the connections still queue or send of it is waited for; a connection that holds it
///   for more than [`LOAN_GRACE`] (a server that stopped reading) is closed at once
///   ([`Chan::abort`]).
struct Lending {
    inner: Arc<WInner>,
    /// None: nothing lent (values too small to lend).
    loan: Option<Arc<Loan>>,
}

impl Lending {
    /// Lends `bytes` when they are at least [`LEND_MIN`]; smaller values lend nothing (they
    /// are copied into the requests).
    ///
    /// # Safety
    /// `bytes` stays valid and unmodified until the returned value is dropped.
    unsafe fn of(inner: &Arc<WInner>, bytes: &[u8]) -> Lending {
        Lending {
            inner: inner.clone(),
            // SAFETY: the caller's contract.
            loan: (bytes.len() >= LEND_MIN).then(|| unsafe { Loan::new(bytes) }),
        }
    }

    /// The loan, to hand out.
    fn loan(&self) -> Option<Arc<Loan>> {
        self.loan.clone()
    }
}

impl Drop for Lending {
    fn drop(&mut self) {
        if let Some(loan) = &self.loan {
            if Arc::strong_count(loan) > 1 {
                self.inner.take_back(loan);
            }
        }
    }
}

/// A pull's answer being received into the operation's memory ([`WInner::place`]), held by
/// the channel until it lets go: after the whole answer was handled (the request is gone
/// then), or when the connection was dropped first. Then nothing writes to that memory for
/// this request any more, and a request still waiting for its answer is sent again (it was
/// left where it was meanwhile, so that no other answer to it could be written to the same
/// memory at the same time).
struct PlaceGuard {
    inner: Weak<WInner>,
    req: u64,
}

impl Drop for PlaceGuard {
    fn drop(&mut self) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let mut st = lock(&inner.st);
        if !st.reqs.get(&self.req).is_some_and(|r| r.placing) {
            return;
        }
        if let Some(mut r) = st.reqs.remove(&self.req) {
            r.placing = false;
            inner.retry_or_fail(&mut st, r);
        }
        drop(st);
        inner.wake();
    }
}

/// What a [`Batch`] collects on its thread.
#[derive(Default)]
struct BatchState {
    /// The channels requests were queued on.
    chans: Vec<Arc<Chan>>,
    /// The ring the batch's requests are routed on (the first one's).
    ring: Option<Arc<Ring>>,
    /// The push of the push_pull this batch sends (its pull must see it).
    push: Option<u64>,
}

thread_local! {
    /// This thread's open [`Batch`], if any.
    static BATCH: std::cell::RefCell<Option<BatchState>> =
        const { std::cell::RefCell::new(None) };
}

/// The requests a thread queues while a batch is open (a push_pull's push and pull) are routed
/// on ONE ring, and go out when it closes (dropped), together per server (one write).
///
/// One ring: routed on two rings (a view change between the push and the pull), the pull of
/// a part could reach its new owner before the push, which still went to the old one (and
/// is retried there after the view change), and a sync-mode pull would then be answered with
/// the round before this worker's push. On one ring both go to the same server in order, or
/// both are retried in order.
struct Batch {
    outer: bool,
}

impl Batch {
    fn open() -> Batch {
        let nested = BATCH.with(|b| {
            let mut b = b.borrow_mut();
            let nested = b.is_some();
            b.get_or_insert_with(BatchState::default);
            nested
        });
        Batch { outer: !nested }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if self.outer {
            if let Some(b) = BATCH.with(|b| b.borrow_mut().take()) {
                for c in b.chans {
                    c.kick();
                }
            }
        }
    }
}

/// The ring to route on: the open batch's (pinned to `current` at its first request), else
/// `current`.
fn batch_ring(current: &Arc<Ring>) -> Arc<Ring> {
    BATCH.with(|b| match b.borrow_mut().as_mut() {
        Some(st) => st.ring.get_or_insert_with(|| current.clone()).clone(),
        None => current.clone(),
    })
}

/// The push of the push_pull this thread is sending, if any.
fn batch_push() -> Option<u64> {
    BATCH.with(|b| b.borrow().as_ref().and_then(|st| st.push))
}

/// Gets the requests queued on `chans` moving, or leaves that to the open batch.
fn kick_now_or_with_batch(chans: Vec<Arc<Chan>>) {
    let later = BATCH.with(|b| {
        let mut b = b.borrow_mut();
        match b.as_mut() {
            Some(st) => {
                for c in &chans {
                    if !st.chans.iter().any(|k| Arc::ptr_eq(k, c)) {
                        st.chans.push(c.clone());
                    }
                }
                true
            }
            None => false,
        }
    });
    if !later {
        for c in chans {
            c.kick();
        }
    }
}

/// Waits for every handle of `started` (in order; they are all in flight), then returns
/// `refused` if given, else the first error, else the smallest version.
fn wait_each(started: Vec<PsHandle<u64>>, refused: Option<Error>) -> Result<u64> {
    let mut first = refused;
    let mut version: Option<u64> = None;
    for h in started {
        match h.wait() {
            Ok(v) => version = Some(version.map_or(v, |m| m.min(v))),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    match first {
        Some(e) => Err(e),
        None => Ok(version.unwrap_or(0)),
    }
}

/// `InvalidArgument` unless an output of `have` elements holds the lengths' elements.
fn check_out(lens: &[usize], have: usize) -> Result<()> {
    let want: usize = lens.iter().sum();
    if want != have {
        return Err(Error::InvalidArgument(format!(
            "the output holds {have} elements, the lengths say {want}"
        )));
    }
    Ok(())
}

fn handle<R>(
    inner: &Arc<WInner>,
    op: u64,
    f: impl FnOnce(BTreeMap<(u64, u32), u64>) -> R + Send + 'static,
) -> PsHandle<R> {
    PsHandle {
        inner: inner.clone(),
        op,
        finish: Some(Box::new(f)),
        recv: None,
        sent: None,
    }
}

impl Drop for KvWorker {
    fn drop(&mut self) {
        self.inner.shutdown(self.watcher.take());
        drop(self.node.take());
    }
}

/// The first operation id of a worker: random (below 2^62, never 0), so that no two workers'
/// operations share an id even where member ids repeat (a fresh job restoring a checkpoint
/// whose parts carry the (worker, op) writes they include, see [`super::checkpoint`]).
fn first_op() -> u64 {
    (crate::membership::random_u64(0x6f70) >> 2).max(1)
}

fn new_state(view: View) -> WState {
    WState {
        ring: Arc::new(ring_of(&view)),
        view,
        chans: Map::default(),
        next_req: 1,
        next_op: first_op(),
        reqs: Map::default(),
        ops: Map::default(),
        retry: Vec::new(),
        keys: Map::default(),
        chained: Vec::new(),
        lost: Map::default(),
        ckpts: Map::default(),
        rule: None,
    }
}

/// How long requests for a server whose connection broke wait for the view change that a
/// dead server brings (the coordinator's failure detection plus a margin), before they fail.
fn lost_grace(cfg: &Config) -> Duration {
    cfg.heartbeat_timeout
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(2))
        .min(cfg.timeout)
}

impl WInner {
    /// Stops the watcher, then closes every server connection (what is queued goes out).
    fn shutdown(&self, watcher: Option<JoinHandle<()>>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = watcher {
            let _ = h.join();
        }
        let chans: Vec<Arc<Chan>> = lock(&self.st).chans.drain().map(|(_, c)| c).collect();
        close_all(chans);
    }

    /// The push of a push_pull: nobody waits on it; it is dropped once done (a failure is
    /// logged; the pull that follows it on the same connections reports the server's view).
    fn chain(&self, push: u64) {
        lock(&self.st).chained.push(push);
        // The pull submitted next in this batch must see this push.
        BATCH.with(|b| {
            if let Some(st) = b.borrow_mut().as_mut() {
                st.push = Some(push);
            }
        });
    }

    /// Whether the answer to pull request `id` (`r`) may miss its push_pull's push: a request
    /// of that push for one of the same parts was sent back for a retry (it waits in the retry
    /// list) or sent again after this pull (a larger request id). The server then answered the
    /// pull without the push (e.g. the push reached a server that had not installed the new
    /// view yet and was refused, "moved away", and the pull right behind it found the view
    /// installed): in sync mode that is the round before this worker's push. Such a pull is
    /// sent again, after the push.
    fn stale_pull(st: &WState, id: u64, r: &WReq) -> bool {
        let Some(push) = st.ops.get(&r.op).and_then(|o| o.after) else {
            return false;
        };
        // The push's requests retried or sent after this pull: almost always none (checked
        // on every answer of a push_pull, under the state lock, so nothing is built first).
        let mut later = st
            .retry
            .iter()
            .chain(st.reqs.iter().filter(|(qid, _)| **qid > id).map(|(_, q)| q))
            .filter(|q| q.op == push)
            .peekable();
        if later.peek().is_none() {
            return false;
        }
        let mine: HashSet<u64> = r.parts.iter().map(|(p, _)| p.s).collect();
        later.any(|q| q.parts.iter().any(|(p, _)| mine.contains(&p.s)))
    }

    /// Periodic checkpoints (`BRAID_PS_CHECKPOINT_EVERY`), at the start of a push_pull call:
    /// after every N-th call, the worker with the lowest member id of the view starts one once
    /// nothing it sent is still queued (else at a later call) and goes on; a thread waits for
    /// the servers and writes the manifest.
    fn round_start(self: &Arc<Self>) {
        let (Some(dir), n) = (self.opts.checkpoint_dir.clone(), self.opts.checkpoint_every) else {
            return;
        };
        if n == 0 {
            return;
        }
        {
            let mut c = lock(&self.ckpt);
            let done = c.rounds;
            c.rounds += 1;
            if done > 0 && done % n == 0 {
                c.due = true;
            }
            if !c.due || c.busy {
                return;
            }
            let lowest = workers_of(&lock(&self.st).view).into_iter().min() == Some(self.me);
            if !lowest {
                c.due = false;
                return;
            }
            c.busy = true;
            c.due = false;
        }
        let started = self.start_checkpoint(&dir, None);
        let mut c = lock(&self.ckpt);
        match started {
            Ok(Some(s)) => {
                let me = self.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("braid-ps-ckpt-w{}", self.me))
                    .spawn(move || {
                        let r = me.finish_checkpoint(s);
                        let mut c = lock(&me.ckpt);
                        c.busy = false;
                        match r {
                            Ok(i) => {
                                tracing::info!(target: "braid::ps", "member {}: periodic checkpoint {} (version {}) in {}: {:.3} s", me.me, i.id, i.version, i.dir.display(), i.seconds);
                                c.last = Some(i);
                            }
                            Err(e) => {
                                tracing::warn!(target: "braid::ps", "member {}: periodic checkpoint failed: {e}", me.me)
                            }
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(target: "braid::ps", "member {}: periodic checkpoint: no thread: {e}", self.me);
                    c.busy = false;
                }
            }
            Ok(None) => {
                // Requests still queued: at a later call.
                c.busy = false;
                c.due = true;
            }
            Err(e) => {
                tracing::warn!(target: "braid::ps", "member {}: periodic checkpoint not started: {e}", self.me);
                c.busy = false;
            }
        }
    }

    /// Sends a checkpoint request to every server of the ring, under the state lock once
    /// nothing this worker sent before is still queued or waiting to be re-sent (so each
    /// request is behind all of it, on every connection). `idle_by`: how long to wait for
    /// that; `None`: `Ok(None)` at once when something is still queued.
    fn start_checkpoint(
        self: &Arc<Self>,
        dir: &Path,
        idle_by: Option<Instant>,
    ) -> Result<Option<Started>> {
        let dir_s = dir
            .to_str()
            .ok_or_else(|| Error::InvalidArgument(format!("{} is not UTF-8", dir.display())))?;
        checkpoint::check_dir(dir_s).map_err(Error::InvalidArgument)?;
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::System(format!(
                "creating checkpoint directory {}: {e}",
                dir.display()
            ))
        })?;
        let t0 = Instant::now();
        let deadline = t0 + self.timeout;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Err(Error::Aborted);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "checkpoint: a stable view to send the requests in".into(),
                    secs: self.timeout.as_secs_f64(),
                });
            }
            let servers: Vec<u64> = lock(&self.st).ring.servers().to_vec();
            if servers.is_empty() {
                return Err(Error::InvalidUsage(
                    "checkpoint: no push/pull server in the view".into(),
                ));
            }
            for s in &servers {
                let _ = self.server_chan(*s);
            }
            let mut st = lock(&self.st);
            if st.ring.servers() != servers.as_slice() {
                continue;
            }
            // Everything sent before must leave first (a server handles a connection's
            // messages in order): nothing waits to be re-sent and nothing is still queued.
            let busy = !st.retry.is_empty()
                || st
                    .chans
                    .values()
                    .any(|c| c.closed().is_none() && c.queued() > 0);
            if busy {
                drop(st);
                match idle_by {
                    None => return Ok(None),
                    Some(t) if Instant::now() >= t => {
                        return Err(Error::Timeout {
                            what: "checkpoint: waiting for this worker's queued requests to go out"
                                .into(),
                            secs: self.timeout.as_secs_f64(),
                        })
                    }
                    Some(_) => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                }
            }
            let mut chans = Vec::with_capacity(servers.len());
            for s in &servers {
                match st.chans.get(s).filter(|c| c.closed().is_none()) {
                    Some(c) => chans.push((*s, c.clone())),
                    None => {
                        let why = st
                            .lost
                            .get(s)
                            .map_or_else(|| "no connection".to_string(), |x| x.0.clone());
                        return Err(Error::PeerLost {
                            rank: 0,
                            member: *s,
                            host: host_of(&st.view, *s),
                            detail: format!("checkpoint: push/pull server {s}: {why}"),
                        });
                    }
                }
            }
            let id = checkpoint::new_id(self.me);
            let op = st.new_op(OutBuf::NONE, deadline);
            st.ckpts.insert(op, CkptAcc::default());
            for (s, c) in chans {
                let req = st.next_req;
                st.next_req += 1;
                let msg = Msg::Checkpoint {
                    req,
                    id: id.clone(),
                    dir: dir_s.to_string(),
                };
                let sent = c
                    .send(Outgoing {
                        prio: i32::MAX,
                        hdr: msg.encode(),
                        body: Arc::new(Vec::new()),
                    })
                    .is_ok();
                let host = host_of(&st.view, s);
                let Some(o) = st.ops.get_mut(&op) else {
                    break;
                };
                if !sent {
                    o.error.get_or_insert(Error::PeerLost {
                        rank: 0,
                        member: s,
                        host,
                        detail: format!("checkpoint: push/pull server {s}: connection closed"),
                    });
                    break;
                }
                o.outstanding += 1;
                st.reqs.insert(
                    req,
                    WReq {
                        op,
                        server: s,
                        kind: Kind::Checkpoint,
                        dtype: DataType::U8,
                        parts: Vec::new(),
                        body: Src::none(),
                        min: None,
                        at: None,
                        prio: i32::MAX,
                        early: 0,
                        placing: false,
                    },
                );
            }
            tracing::debug!(target: "braid::ps", "member {}: checkpoint {id} requested from {} server(s)", self.me, servers.len());
            return Ok(Some(Started {
                op,
                id,
                dir: dir.to_path_buf(),
                t0,
                deadline,
            }));
        }
    }

    /// Waits for every server's answer to a started checkpoint, checks them, writes the
    /// manifest and reports the checkpoint to the coordinator.
    fn finish_checkpoint(&self, s: Started) -> Result<CheckpointInfo> {
        let mut st = lock(&self.st);
        let failed = loop {
            let (done, err) = match st.ops.get(&s.op) {
                Some(o) => (o.outstanding == 0, o.error.is_some()),
                None => break Some(Error::Internal("checkpoint operation vanished".into())),
            };
            if done || err {
                break None;
            }
            if self.stop.load(Ordering::SeqCst) {
                break Some(Error::Aborted);
            }
            let now = Instant::now();
            if now >= s.deadline {
                break Some(Error::Timeout {
                    what: format!("checkpoint {}: servers' answers", s.id),
                    secs: self.timeout.as_secs_f64(),
                });
            }
            st = self.cv_wait(st, (s.deadline - now).min(Duration::from_millis(100)));
        };
        let op = st.ops.remove(&s.op);
        let acc = st.ckpts.remove(&s.op).unwrap_or_default();
        st.reqs.retain(|_, r| r.op != s.op);
        drop(st);
        if let Some(e) = failed {
            return Err(e);
        }
        if let Some(e) = op.and_then(|o| o.error) {
            return Err(e);
        }
        let (mut m, copy_us, write_us) = self
            .manifest_of(&s.id, acc)
            .map_err(|e| Error::InvalidArgument(format!("checkpoint {}: {e}", s.id)))?;
        checkpoint::write_manifest(&s.dir, &mut m).map_err(Error::System)?;
        let info = CheckpointInfo {
            dir: s.dir.clone(),
            id: s.id.clone(),
            version: m.version,
            max_version: m.max_version,
            parts: m.parts.len(),
            bytes: m.files.iter().map(|f| f.bytes).sum(),
            servers: m.files.len(),
            seconds: s.t0.elapsed().as_secs_f64(),
            copy_seconds: copy_us as f64 * 1e-6,
            write_seconds: write_us as f64 * 1e-6,
        };
        if let Some(c) = &self.client {
            if let Err(e) = c.report_checkpoint(
                &info.id,
                &s.dir.to_string_lossy(),
                info.version,
                info.max_version,
                info.parts as u64,
                info.bytes,
            ) {
                tracing::warn!(target: "braid::ps", "member {}: checkpoint not reported to the coordinator: {e}", self.me);
            }
        }
        tracing::info!(target: "braid::ps", "member {}: checkpoint {} in {}: version {}, {} part(s), {} bytes, {} server(s), {:.3} s (longest server copy {:.3} s, write {:.3} s)", self.me, info.id, info.dir.display(), info.version, info.parts, info.bytes, info.servers, info.seconds, info.copy_seconds, info.write_seconds);
        Ok(info)
    }

    /// The manifest of a checkpoint from the servers' answers: every server at the same view
    /// epoch, no part twice, none missing from the key directory. Also the longest copy and
    /// write times (µs).
    fn manifest_of(
        &self,
        id: &str,
        mut acc: CkptAcc,
    ) -> std::result::Result<(Manifest, u64, u64), String> {
        let epochs: BTreeSet<u64> = acc.files.values().map(|f| f.1).collect();
        if epochs.len() > 1 {
            return Err(format!(
                "the view changed during the checkpoint (servers answered at epochs {epochs:?}); \
                 nothing was installed"
            ));
        }
        let mut files = Vec::with_capacity(acc.files.len());
        let mut parts = Vec::with_capacity(acc.nparts);
        let mut seen: HashMap<u64, u64> = HashMap::new();
        let (mut known, mut copy, mut write) = (0u64, 0u64, 0u64);
        for (i, (server, (f, _, k, c, w))) in acc.files.into_iter().enumerate() {
            known = known.max(k);
            copy = copy.max(c);
            write = write.max(w);
            for mut p in acc.parts.remove(&server).unwrap_or_default() {
                if let Some(other) = seen.insert(p.s, server) {
                    return Err(format!(
                        "key {} part {} was written by servers {other} and {server}",
                        p.k, p.p
                    ));
                }
                p.file = i as u32;
                parts.push(p);
            }
            files.push(f);
        }
        if (parts.len() as u64) < known {
            return Err(format!(
                "the servers wrote {} part(s), the key directory holds {known}: a part has no \
                 copy; nothing was installed",
                parts.len()
            ));
        }
        let version = parts.iter().map(|p| p.version).min().unwrap_or(0);
        let max_version = parts.iter().map(|p| p.version).max().unwrap_or(0);
        let m = Manifest {
            format: checkpoint::FORMAT.into(),
            format_version: checkpoint::FORMAT_VERSION,
            id: id.to_string(),
            group: self.group.clone(),
            mode: mode_name(self.opts.consistency),
            partition_bytes: self.opts.partition_bytes as u64,
            epoch: epochs.into_iter().next().unwrap_or(0),
            version,
            max_version,
            created_unix_ms: checkpoint::unix_ms(),
            files,
            parts,
            hash: String::new(),
        };
        m.validate()?;
        Ok((m, copy, write))
    }

    /// Sends a rule request to every server of the ring at the lowest priority (behind what is
    /// queued); returns the operation waiting for their acknowledgements.
    fn send_rule(self: &Arc<Self>, spec: &str) -> Result<u64> {
        let servers: Vec<u64> = lock(&self.st).ring.servers().to_vec();
        if servers.is_empty() {
            return Err(Error::InvalidUsage(
                "set_rule: no push/pull server in the view".into(),
            ));
        }
        let chans: Vec<(u64, Option<Arc<Chan>>)> =
            servers.iter().map(|s| (*s, self.server_chan(*s))).collect();
        let mut st = lock(&self.st);
        let op = st.new_op(OutBuf::NONE, Instant::now() + self.timeout);
        for (s, c) in chans {
            let req = st.next_req;
            st.next_req += 1;
            let msg = Msg::SetRule {
                req,
                rule: spec.to_string(),
            };
            let sent = c.is_some_and(|c| {
                c.send(Outgoing {
                    prio: i32::MIN,
                    hdr: msg.encode(),
                    body: Arc::new(Vec::new()),
                })
                .is_ok()
            });
            if !sent {
                let why = st
                    .lost
                    .get(&s)
                    .map_or_else(|| "no connection".to_string(), |x| x.0.clone());
                let host = host_of(&st.view, s);
                st.ops.remove(&op);
                st.reqs.retain(|_, r| r.op != op);
                return Err(Error::PeerLost {
                    rank: 0,
                    member: s,
                    host,
                    detail: format!("update rule: push/pull server {s}: {why}"),
                });
            }
            if let Some(o) = st.ops.get_mut(&op) {
                o.outstanding += 1;
            }
            st.reqs.insert(
                req,
                WReq {
                    op,
                    server: s,
                    kind: Kind::Rule,
                    dtype: DataType::U8,
                    parts: Vec::new(),
                    body: Src::none(),
                    min: None,
                    at: None,
                    prio: i32::MIN,
                    early: 0,
                    placing: false,
                },
            );
        }
        Ok(op)
    }

    /// Submits a push; returns its operation id.
    fn push_op<T: Element>(
        self: &Arc<Self>,
        keys: &[u64],
        lens: &[usize],
        vals: &[T],
        prio: i32,
    ) -> Result<u64> {
        self.write_op(Kind::Push, keys, lens, vals, prio)
    }

    /// Submits an init or a push of `vals`; returns its operation id.
    fn write_op<T: Element>(
        self: &Arc<Self>,
        kind: Kind,
        keys: &[u64],
        lens: &[usize],
        vals: &[T],
        prio: i32,
    ) -> Result<u64> {
        self.submit(
            kind,
            T::DTYPE,
            keys,
            lens,
            bytemuck::cast_slice(vals),
            None,
            None,
            prio,
        )
    }

    /// A pull whose answers are written straight into the result vector the handle returns.
    fn pull_op<T: Element>(
        self: &Arc<Self>,
        keys: &[u64],
        lens: &[usize],
        min: Option<u64>,
        at: Option<u64>,
        prio: i32,
    ) -> Result<PsHandle<Pulled<T>>> {
        let n: usize = lens.iter().sum();
        let mut values = vec![T::zeroed(); n];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut values);
        let out = OutBuf {
            ptr: bytes.as_mut_ptr(),
            len: bytes.len(),
            loan: None,
        };
        // The vector moves into the handle's closure; its heap buffer (what `out` points to)
        // does not move.
        let op = self.submit_to(
            Kind::Pull,
            T::DTYPE,
            keys,
            lens,
            &[],
            out,
            min,
            at,
            prio,
            None,
        )?;
        Ok(handle(self, op, move |versions| Pulled {
            values,
            version: versions.values().copied().min().unwrap_or(0),
        }))
    }

    /// Splits, routes and sends an operation; returns its id.
    #[allow(clippy::too_many_arguments)]
    fn submit(
        self: &Arc<Self>,
        kind: Kind,
        dtype: DataType,
        keys: &[u64],
        lens: &[usize],
        data: &[u8],
        min: Option<u64>,
        at: Option<u64>,
        prio: i32,
    ) -> Result<u64> {
        self.submit_to(
            kind,
            dtype,
            keys,
            lens,
            data,
            OutBuf::NONE,
            min,
            at,
            prio,
            None,
        )
    }

    /// As [`WInner::submit`], a pull writing its values to `out` (which must hold the
    /// lengths' bytes and stay valid while the operation is in `ops`); a write whose values
    /// are `lent` (`data` itself, see [`Lending`]) is sent from them without a copy.
    #[allow(clippy::too_many_arguments)]
    fn submit_to(
        self: &Arc<Self>,
        kind: Kind,
        dtype: DataType,
        keys: &[u64],
        lens: &[usize],
        data: &[u8],
        out: OutBuf,
        min: Option<u64>,
        at: Option<u64>,
        prio: i32,
        lent: Option<Arc<Loan>>,
    ) -> Result<u64> {
        if keys.len() != lens.len() {
            return Err(Error::InvalidArgument(format!(
                "{} keys but {} lengths",
                keys.len(),
                lens.len()
            )));
        }
        let es = dtype.size();
        let total: usize = lens.iter().sum::<usize>() * es;
        if kind.reads() && out.len != total {
            return Err(Error::Internal(format!(
                "pull buffer of {} bytes for {total}",
                out.len
            )));
        }
        if kind.writes() && data.len() != total {
            return Err(Error::InvalidArgument(format!(
                "values hold {} bytes, the lengths say {total} ({} elements of {})",
                data.len(),
                total / es,
                dtype.name()
            )));
        }
        let mut parts: Vec<(PartRef, usize)> = Vec::new();
        let mut off = 0;
        for (&k, &n) in keys.iter().zip(lens) {
            for p in split(k, n * es, es, self.opts.partition_bytes) {
                parts.push((
                    PartRef {
                        s: p.skey,
                        k,
                        p: p.index,
                        n: p.len,
                        t: (n * es) as u64,
                    },
                    off + p.offset,
                ));
            }
            off += n * es;
        }
        let mut st = lock(&self.st);
        for (&k, &n) in keys.iter().zip(lens) {
            match st.keys.get(&k) {
                Some(&(d, b)) if d != dtype || b != n * es => {
                    return Err(Error::InvalidArgument(format!(
                        "key {k} holds {} elements of {}; this call says {n} of {}",
                        b / d.size(),
                        d.name(),
                        dtype.name()
                    )))
                }
                Some(_) => {}
                None => {
                    if kind.writes() {
                        st.keys.insert(k, (dtype, n * es));
                    }
                }
            }
        }
        let op = st.new_op(out, Instant::now() + self.timeout);
        let mut reqs = route(
            &mut st,
            op,
            kind,
            dtype,
            parts,
            Src::none(),
            min,
            at,
            prio,
            self.opts.partition_bytes,
        );
        match lent {
            // The caller's values themselves (the parts' offsets are into them).
            Some(l) if kind.writes() && l.bytes().len() == data.len() => {
                for (_, r) in &mut reqs {
                    r.body = Src::Lent(l.clone());
                }
                for r in st.retry.iter_mut().filter(|r| r.op == op) {
                    r.body = Src::Lent(l.clone());
                }
            }
            _ if kind.writes() => {
                // One copy of the caller's values: each server's request gets its own parts,
                // contiguous, sent as they are. Those kept for a retry (in the state) get
                // theirs here; the others below.
                let mut pool = lock(&self.bodies);
                for r in st.retry.iter_mut().filter(|r| r.op == op) {
                    r.body = Src::Copy(compact(data, &mut r.parts, &mut pool));
                }
                drop(pool);
                drop(st);
                // Copied outside the state lock (answers to other operations are handled
                // meanwhile), one request at a time, each queued before the next is copied;
                // a large one is set moving at once (not with the batch), so its connection
                // sends it while this thread copies the next.
                for (id, mut r) in reqs {
                    let body = compact(data, &mut r.parts, &mut lock(&self.bodies));
                    let now = body.len() >= SEND_EARLY;
                    r.body = Src::Copy(body);
                    self.dispatch_kick(vec![(id, r)], now);
                }
                return Ok(op);
            }
            _ => {}
        }
        drop(st);
        self.dispatch(reqs);
        Ok(op)
    }

    /// Sends requests (connecting to servers as needed); what cannot be sent goes to the retry
    /// list.
    fn dispatch(self: &Arc<Self>, reqs: Vec<(u64, WReq)>) {
        self.dispatch_kick(reqs, false);
    }

    /// [`WInner::dispatch`], the connections set moving at once when `now`, even in an open
    /// batch (else with the batch, if one is open).
    fn dispatch_kick(self: &Arc<Self>, reqs: Vec<(u64, WReq)>, now: bool) {
        let mut kick: Vec<Arc<Chan>> = Vec::new();
        for (id, r) in reqs {
            let chan = self.server_chan(r.server);
            let msg = match r.kind {
                Kind::Init => Msg::Init {
                    req: id,
                    op: r.op,
                    prio: r.prio,
                    dtype: r.dtype.name().into(),
                    parts: r.parts.iter().map(|p| p.0).collect(),
                },
                Kind::Push => Msg::Push {
                    req: id,
                    op: r.op,
                    prio: r.prio,
                    dtype: r.dtype.name().into(),
                    parts: r.parts.iter().map(|p| p.0).collect(),
                },
                Kind::Pull => Msg::Pull {
                    req: id,
                    epoch: 0,
                    prio: r.prio,
                    parts: r.parts.iter().map(|p| p.0).collect(),
                    min: r.min,
                    at: r.at,
                },
                Kind::PullState => Msg::PullState {
                    req: id,
                    prio: r.prio,
                    parts: r.parts.iter().map(|p| p.0).collect(),
                },
                Kind::PushState => Msg::PushState {
                    req: id,
                    op: r.op,
                    prio: r.prio,
                    dtype: r.dtype.name().into(),
                    parts: r.parts.iter().map(|p| p.0).collect(),
                },
                // Checkpoint and rule requests are sent by `start_checkpoint` and `set_rule`
                // only (never re-sent).
                Kind::Snap | Kind::Checkpoint | Kind::Rule => Msg::SnapVer { req: id },
            };
            let segs = if r.kind.writes() {
                body_of(&r)
            } else {
                Vec::new()
            };
            let prio = r.prio;
            let mut st = lock(&self.st);
            let sent = chan
                .as_ref()
                .is_some_and(|c| c.send_segs_later(prio, msg.encode(), segs).is_ok());
            if sent {
                st.reqs.insert(id, r);
            } else {
                self.retry_or_fail(&mut st, r);
            }
            drop(st);
            if let Some(c) = chan {
                if !kick.iter().any(|k| Arc::ptr_eq(k, &c)) {
                    kick.push(c);
                }
            }
        }
        if now {
            for c in kick {
                c.kick();
            }
        } else {
            kick_now_or_with_batch(kick);
        }
    }

    /// Takes lent values back (see [`Lending`]): returns once `loan` is the only reference.
    /// It has no deadline of its own (returning while anything still reads the caller's memory
    /// would be unsound), but every holder lets go in bounded time: a connection in `chans` is
    /// aborted after [`LOAN_GRACE`]; one already dropped from `chans` ends within about 2 s
    /// ([`Chan::close`]); a request being re-sent outside the state lock is back in it within
    /// the connect deadline (5 s) and copied at the next look.
    fn take_back(&self, loan: &Arc<Loan>) {
        let since = Instant::now();
        let mut looks = 0u32;
        loop {
            let mut closing = Vec::new();
            {
                let mut g = lock(&self.st);
                let st = &mut *g;
                // Looked at again each time: a request re-sent meanwhile (a retry) is back in
                // the state by now.
                let mut pool = lock(&self.bodies);
                for r in st.reqs.values_mut().chain(st.retry.iter_mut()) {
                    if matches!(&r.body, Src::Lent(l) if Arc::ptr_eq(l, loan)) {
                        r.body = Src::Copy(compact(loan.bytes(), &mut r.parts, &mut pool));
                    }
                }
                drop(pool);
                if Arc::strong_count(loan) == 1 {
                    return;
                }
                if since.elapsed() >= LOAN_GRACE {
                    closing = st.chans.iter().map(|(s, c)| (*s, c.clone())).collect();
                }
            }
            // Asked outside the state lock: `holds` waits for a thread working on the
            // connection, which may need the state lock (in `on_msg`).
            closing.retain(|(_, c)| c.holds(loan));
            if !closing.is_empty() {
                let mut st = lock(&self.st);
                for (s, c) in &closing {
                    if st.chans.get(s).is_some_and(|x| Arc::ptr_eq(x, c)) {
                        st.chans.remove(s);
                    }
                    tracing::warn!(target: "braid::ps", "member {}: the connection to push/pull server {s} held a call's values {LOAN_GRACE:?} after the call ended (a push not sent, or an answer not received): closed", self.me);
                }
            }
            // Closed outside the state lock (its thread may need it to end), without trying
            // to send what it holds.
            for (_, c) in closing {
                c.abort();
            }
            looks += 1;
            if looks < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// A request that cannot be sent now: it waits in the retry list, unless its server's
    /// connection broke more than [`WInner::lost_grace`] ago without a new view (then it fails,
    /// naming the server and why).
    fn retry_or_fail(&self, st: &mut WState, r: WReq) {
        let gone = st
            .lost
            .get(&r.server)
            .filter(|(_, since)| since.elapsed() >= self.lost_grace)
            .map(|(why, _)| why.clone());
        match gone {
            Some(why) => {
                let host = st
                    .view
                    .members
                    .iter()
                    .find(|m| m.id == r.server)
                    .map(|m| m.hostname.clone())
                    .unwrap_or_default();
                if let Some(o) = st.ops.get_mut(&r.op) {
                    o.error.get_or_insert(Error::PeerLost {
                        rank: 0,
                        member: r.server,
                        host,
                        detail: format!(
                            "push/pull server {}: {why} (no new view within {:.1} s)",
                            r.server,
                            self.lost_grace.as_secs_f64()
                        ),
                    });
                    o.outstanding = o.outstanding.saturating_sub(1);
                }
                self.wake();
            }
            None => st.retry.push(r),
        }
    }

    /// Waits on `cv` for at most `dur` (with `st`, the state lock, given back meanwhile),
    /// counted as a thread waiting without driving: the channel threads receive for it.
    fn cv_wait<'a>(&self, st: MutexGuard<'a, WState>, dur: Duration) -> MutexGuard<'a, WState> {
        self.cv_waiters.fetch_add(1, Ordering::SeqCst);
        unpark_all(&st);
        let st = self
            .cv
            .wait_timeout(st, dur)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
        self.cv_waiters.fetch_sub(1, Ordering::SeqCst);
        st
    }

    /// Wakes the threads waiting for operations: on `cv`, and those driving connections
    /// ([`Driving`]) through their wake-up descriptors.
    ///
    /// `cv` is notified only when a thread waits on it: a waiter counts itself
    /// ([`WInner::cv_wait`]) with the state lock held, which every change it waits for takes
    /// too, so a change made after its last look finds it counted (a notification with no
    /// waiter is a futex call per answer for nothing).
    fn wake(&self) {
        if self.cv_waiters.load(Ordering::SeqCst) > 0 {
            self.cv.notify_all();
        }
        let own = WAKER.try_with(|w| w.0.get()).unwrap_or(-1);
        for &fd in lock(&self.waiters).iter() {
            if fd != own {
                waker_poke(fd);
            }
        }
    }

    /// Fails at once every request in flight on the connection to `server`: it closed the
    /// connection with a reason (a protocol error on either side), so they will not be
    /// answered on it.
    fn fail_server(&self, server: u64, why: &str) {
        tracing::warn!(target: "braid::ps", "member {}: server {server} closed the connection: {why}", self.me);
        let mut st = lock(&self.st);
        let st = &mut *st;
        let ids: Vec<u64> = st
            .reqs
            .iter()
            .filter(|(_, r)| r.server == server)
            .map(|(id, _)| *id)
            .collect();
        let host = st
            .view
            .members
            .iter()
            .find(|m| m.id == server)
            .map(|m| m.hostname.clone())
            .unwrap_or_default();
        for id in ids {
            if let Some(r) = st.reqs.remove(&id) {
                if let Some(o) = st.ops.get_mut(&r.op) {
                    o.error.get_or_insert(Error::PeerLost {
                        rank: 0,
                        member: server,
                        host: host.clone(),
                        detail: format!("push/pull server {server} closed the connection: {why}"),
                    });
                    o.outstanding = o.outstanding.saturating_sub(1);
                }
            }
        }
        // Refused, not dead: later requests for it fail at once too (until a new view).
        let past = Instant::now()
            .checked_sub(self.lost_grace)
            .unwrap_or_else(Instant::now);
        st.lost.insert(server, (why.to_string(), past));
        self.wake();
    }

    /// The hello credential for the view in use.
    fn cred(&self, st: &WState) -> Cred {
        match *lock(&self.ticket) {
            Some((id, epoch, ticket)) if self.reader.is_some() => {
                Cred::reader(id, epoch, ticket, self.opts.partition_bytes)
            }
            _ => Cred::member(
                self.me,
                &st.view,
                self.token.as_deref(),
                self.opts.partition_bytes,
            ),
        }
    }

    fn server_chan(self: &Arc<Self>, id: u64) -> Option<Arc<Chan>> {
        let (member, cred) = {
            let mut st = lock(&self.st);
            if st.lost.contains_key(&id) {
                return None;
            }
            if let Some(c) = st.chans.get(&id) {
                match c.closed() {
                    // Broke in this view (its `on_lost` may not have run yet): no reconnect
                    // until the view changes, as for a lost server.
                    Some(why) => {
                        st.lost.insert(id, (why, Instant::now()));
                        return None;
                    }
                    // Connected: the common case, every request (no credential made).
                    None => return Some(c.clone()),
                }
            }
            (
                st.view.members.iter().find(|m| m.id == id).cloned(),
                self.cred(&st),
            )
        };
        let m = member?;
        let deadline = Instant::now() + Duration::from_secs(5).min(self.timeout);
        let conn = match connect_to(&self.transports, &cred, &self.my_host, &m, deadline) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(target: "braid::ps", "member {}: cannot reach server {id}: {e}", self.me);
                lock(&self.st)
                    .lost
                    .entry(id)
                    .or_insert_with(|| (format!("cannot connect: {e}"), Instant::now()));
                return None;
            }
        };
        let weak = Arc::downgrade(self);
        let my_role = if self.reader.is_some() {
            Role::Reader
        } else {
            Role::Worker
        };
        let on_msg = Box::new(move |m: &Incoming| match weak.upgrade() {
            Some(inner) => inner.on_reply(id, my_role, m),
            None => Ok(()),
        });
        let weak = Arc::downgrade(self);
        let on_close = Box::new(move |why: String| {
            if let Some(inner) = weak.upgrade() {
                inner.on_lost(id, &why);
            }
        });
        let weak = Arc::downgrade(self);
        let on_place: OnPlace = Box::new(move |hdr: &[u8], segs: &[usize]| {
            weak.upgrade().and_then(|inner| inner.place(id, hdr, segs))
        });
        // Answers carry at most one partition of values (requests are split to fit).
        let limits = Limits {
            hdr: CLIENT_HDR,
            body: self.opts.partition_bytes,
        };
        // Early looks at large pull answers: their parts are copied out as they arrive.
        match Chan::start_with(
            conn,
            &format!("w{}-{id}", self.me),
            limits,
            on_msg,
            on_close,
            ChanOpts {
                early: true,
                coalesce: false,
            },
            Some(on_place),
        ) {
            Ok(c) => {
                let c = Arc::new(c);
                let mut st = lock(&self.st);
                let first = st.chans.get(&id).filter(|e| e.closed().is_none()).cloned();
                if let Some(first) = first {
                    // Another thread connected to this server meanwhile: its connection
                    // stays (requests may be on their way on it; replacing it would close
                    // it under them), this one goes before carrying anything.
                    drop(st);
                    c.close();
                    return Some(first);
                }
                if let Some(rule) = &st.rule {
                    // The rule this worker installed reaches a server before anything else
                    // this worker sends it (a server that joined later, a reconnection).
                    let _ = c.send(Outgoing {
                        prio: i32::MAX,
                        hdr: Msg::SetRule {
                            req: 0,
                            rule: rule.clone(),
                        }
                        .encode(),
                        body: Arc::new(Vec::new()),
                    });
                }
                st.chans.insert(id, c.clone());
                Some(c)
            }
            Err(e) => {
                tracing::warn!(target: "braid::ps", "member {}: {e}", self.me);
                None
            }
        }
    }

    /// A server connection ended: its requests are re-routed after the view changes.
    fn on_lost(&self, server: u64, why: &str) {
        tracing::warn!(target: "braid::ps", "member {}: connection to server {server} lost: {why}; its requests wait for the next view", self.me);
        let mut st = lock(&self.st);
        // An older connection may end after a newer one was made (new view): the server is
        // not lost then, but what went out on the old one is sent again (servers skip parts
        // they applied before).
        let newer = st.chans.get(&server).is_some_and(|c| c.closed().is_none());
        if !newer {
            st.chans.remove(&server);
            st.lost
                .entry(server)
                .or_insert_with(|| (why.to_string(), Instant::now()));
        }
        // In the order their operations were submitted (operation ids grow): a push_pull's
        // pull must be sent again after its push, or the new owner answers the pull with the
        // round before the push. Not by request id: a request routed again (a retry) gets a
        // new, larger id, so a push sent twice would sort after its pull.
        // A request whose answer is being received into its operation's memory stays until
        // that ends (`PlaceGuard`).
        let mut ids: Vec<(u64, u64)> = st
            .reqs
            .iter()
            .filter(|(_, r)| r.server == server && !r.placing)
            .map(|(id, r)| (r.op, *id))
            .collect();
        ids.sort_unstable();
        for (_, id) in ids {
            if let Some(r) = st.reqs.remove(&id) {
                st.retry.push(r);
            }
        }
        drop(st);
        self.wake();
    }

    /// Handles a message from server `server`. `Err`: the channel ends (a protocol error, or
    /// the server's goodbye); the requests in flight on it fail at once, naming the server.
    fn on_reply(
        &self,
        server: u64,
        my_role: Role,
        m: &Incoming,
    ) -> std::result::Result<(), String> {
        let r = self.on_reply_checked(server, my_role, m);
        match &r {
            Err(why) if why.starts_with("protocol error") => self.fail_server(server, why),
            Err(why) => self.fail_server(server, why.trim_start_matches("goodbye: ")),
            Ok(()) => {}
        }
        r
    }

    /// Where the body of an answer from `server` goes, asked by its channel once the header is
    /// in: a pull's answer whose segments are the request's parts, one each, for an operation
    /// that lent its memory (a blocking call, [`OutBuf::loan`]), is received straight into
    /// it. Not for a pull that may be stale (its answer would be thrown away), nor one whose
    /// parts were partly copied already. The request stays put until the channel lets go of
    /// the placement ([`PlaceGuard`]).
    fn place(self: &Arc<Self>, server: u64, hdr: &[u8], segs: &[usize]) -> Option<Placement> {
        let Ok(Msg::Values { req, .. }) = Msg::decode(hdr) else {
            return None;
        };
        let mut guard = lock(&self.st);
        let st = &mut *guard;
        let r = st.reqs.get(&req)?;
        let fits = r.server == server
            && r.kind == Kind::Pull
            && !r.placing
            && r.early == 0
            && segs.len() == r.parts.len()
            && segs.iter().zip(&r.parts).all(|(s, (p, _))| *s == p.n);
        if !fits || Self::stale_pull(st, req, r) {
            return None;
        }
        let o = st.ops.get(&r.op).filter(|o| o.error.is_none())?;
        let loan = o.out.loan.clone()?;
        let offs = r.parts.iter().map(|(_, off)| *off).collect();
        if let Some(r) = st.reqs.get_mut(&req) {
            r.placing = true;
        }
        Some(Placement {
            loan,
            offs,
            guard: Box::new(PlaceGuard {
                inner: Arc::downgrade(self),
                req,
            }),
        })
    }

    /// An early look at a pull's answer whose first `n` segments are in
    /// ([`Chan::start_with`]): the parts among them not copied yet go to the operation's
    /// memory now, while they are in the cache and the rest arrives. Only when the answer's
    /// segments are the request's parts, one each (a server sends a pull's answer so), and
    /// the answer would be used (not a stale pull); the whole message checks and copies the
    /// rest ([`WInner::on_reply_checked`]). Anything else waits for the whole message.
    fn early_values(&self, server: u64, m: &Incoming, n: usize) {
        let Ok(Msg::Values { req, .. }) = Msg::decode(&m.hdr) else {
            return;
        };
        let mut guard = lock(&self.st);
        let st = &mut *guard;
        let Some(r) = st.reqs.get(&req) else {
            return;
        };
        let segs = m.segments();
        let fits = r.server == server
            && r.kind == Kind::Pull
            && segs.len() == r.parts.len()
            && n <= segs.len()
            && segs.iter().zip(&r.parts).all(|(s, (p, _))| *s == p.n);
        if !fits || r.early >= n || Self::stale_pull(st, req, r) {
            return;
        }
        let Some(o) = st.ops.get(&r.op) else {
            return;
        };
        if !o.out.copy_parts(&r.parts, r.early, n, m.body()) {
            // The whole message reports it.
            return;
        }
        if let Some(r) = st.reqs.get_mut(&req) {
            r.early = n;
        }
    }

    fn on_reply_checked(
        &self,
        server: u64,
        my_role: Role,
        m: &Incoming,
    ) -> std::result::Result<(), String> {
        if let Some(n) = m.partial() {
            self.early_values(server, m, n);
            return Ok(());
        }
        let msg =
            Msg::decode(&m.hdr).map_err(|e| format!("protocol error: undecodable reply: {e}"))?;
        permitted(Role::Server, my_role, &msg).map_err(|e| format!("protocol error: {e}"))?;
        if let Msg::Bye { reason } = msg {
            // The server ends the connection: this side closes it too.
            return Err(format!("goodbye: {reason}"));
        }
        let mut st = lock(&self.st);
        let st = &mut *st;
        let req = match &msg {
            Msg::Ack { req, .. }
            | Msg::Values { req, .. }
            | Msg::Snap { req, .. }
            | Msg::Fail { req, .. }
            | Msg::Checkpointed { req, .. } => *req,
            Msg::CkptParts { req, parts } => {
                // A chunk of a checkpoint answer: kept until the server's last word.
                let Some(r) = st.reqs.get(req) else {
                    return Ok(());
                };
                if r.server != server || r.kind != Kind::Checkpoint {
                    return Err(format!(
                        "protocol error: checkpoint entries for request {req}, which is not a \
                         checkpoint request sent to it"
                    ));
                }
                let op = r.op;
                if let Some(acc) = st.ckpts.get_mut(&op) {
                    acc.nparts = acc.nparts.saturating_add(parts.len());
                    if acc.nparts > MAX_CKPT_PARTS {
                        if let Some(o) = st.ops.get_mut(&op) {
                            o.error.get_or_insert(Error::InvalidArgument(format!(
                                "checkpoint: the servers listed more than {MAX_CKPT_PARTS} parts"
                            )));
                        }
                        self.wake();
                    } else {
                        acc.parts
                            .entry(server)
                            .or_default()
                            .extend(parts.iter().cloned());
                    }
                }
                return Ok(());
            }
            _ => return Ok(()),
        };
        let Some(mut r) = st.reqs.remove(&req) else {
            return Ok(());
        };
        // Answered: whatever was received for it is in (see `PlaceGuard`).
        let placed = std::mem::take(&mut r.placing);
        if r.server != server {
            // Request ids are per worker: an answer names one sent on this connection.
            st.reqs.insert(req, r);
            return Err(format!(
                "protocol error: an answer to request {req}, which was not sent to it"
            ));
        }
        let op = r.op;
        match msg {
            Msg::Fail {
                msg, retry: true, ..
            } => {
                tracing::debug!(target: "braid::ps", "member {}: retrying request {req}: {msg}", self.me);
                st.retry.push(r);
                return Ok(());
            }
            Msg::Fail { msg, .. } => {
                if let Some(o) = st.ops.get_mut(&r.op) {
                    o.error.get_or_insert(Error::InvalidArgument(format!(
                        "server {}: {msg}",
                        r.server
                    )));
                    o.outstanding = o.outstanding.saturating_sub(1);
                }
            }
            Msg::Ack { versions, .. } => {
                if let Some(o) = st.ops.get_mut(&r.op) {
                    for ((p, _), v) in r.parts.iter().zip(versions) {
                        o.versions.insert((p.k, p.p), v);
                    }
                    o.outstanding = o.outstanding.saturating_sub(1);
                }
            }
            Msg::Values { .. } if Self::stale_pull(st, req, &r) => {
                tracing::debug!(target: "braid::ps", "member {}: pull request {req} was answered without its push_pull's push (sent again): pulling again after it", self.me);
                st.retry.push(r);
                return Ok(());
            }
            Msg::Values { versions, .. } => {
                if let Some(o) = st.ops.get_mut(&r.op) {
                    // The parts an early look copied are in already; a placed answer is in
                    // whole.
                    let bad = if m.placed() {
                        !placed
                    } else {
                        !o.out.copy_parts(&r.parts, r.early, r.parts.len(), m.body())
                    };
                    if bad {
                        o.error.get_or_insert(Error::Internal(format!(
                            "server {} answered with a short body",
                            r.server
                        )));
                    }
                    for ((p, _), v) in r.parts.iter().zip(versions) {
                        o.versions.insert((p.k, p.p), v);
                    }
                    o.outstanding = o.outstanding.saturating_sub(1);
                }
            }
            Msg::Checkpointed {
                file,
                epoch,
                known,
                copy_us,
                write_us,
                ..
            } => {
                if r.kind != Kind::Checkpoint {
                    st.reqs.insert(req, r);
                    return Err(format!(
                        "protocol error: a checkpoint answer to request {req}, which is not a \
                         checkpoint request"
                    ));
                }
                if let Some(acc) = st.ckpts.get_mut(&r.op) {
                    acc.files
                        .insert(server, (file, epoch, known, copy_us, write_us));
                }
                if let Some(o) = st.ops.get_mut(&r.op) {
                    o.outstanding = o.outstanding.saturating_sub(1);
                }
            }
            Msg::Snap { version, .. } => {
                if let Some(o) = st.ops.get_mut(&r.op) {
                    // (MAX, 0): the smallest version over servers; (MAX, 1): some server has
                    // no complete version yet.
                    match version {
                        Some(v) => {
                            let e = o.versions.entry((u64::MAX, 0)).or_insert(v);
                            *e = (*e).min(v);
                        }
                        None => {
                            o.versions.insert((u64::MAX, 1), 0);
                        }
                    }
                    o.outstanding = o.outstanding.saturating_sub(1);
                }
            }
            _ => {}
        }
        // Chained pushes (push_pull): a failed push fails nothing by itself; drop done ones.
        let done: Vec<u64> = st
            .chained
            .iter()
            .copied()
            .filter(|op| {
                st.ops
                    .get(op)
                    .map_or(true, |o| o.outstanding == 0 || o.error.is_some())
            })
            .collect();
        for op in done {
            st.chained.retain(|x| *x != op);
            if let Some(o) = st.ops.remove(&op) {
                if let Some(e) = o.error {
                    tracing::warn!(target: "braid::ps", "member {}: push of a push_pull failed: {e}", self.me);
                }
            }
        }
        // Waiters wait for an operation to finish: wake them when this answer finished one
        // (not for every answer: a push_pull's push acknowledgement that comes before its
        // pull's answer would wake the caller for nothing). A push_pull's push, once done, was
        // dropped above: its pull may be finished now.
        let finished = match st.ops.get(&op) {
            Some(o) => st.done(o),
            None => st.ops.values().any(|o| o.after == Some(op) && st.done(o)),
        };
        if finished {
            self.wake();
        }
        Ok(())
    }

    /// Re-routes the retry list over the current ring (called by the watcher).
    fn retry_now(self: &Arc<Self>) {
        let mut st = lock(&self.st);
        if st.retry.is_empty() {
            return;
        }
        let mut list = std::mem::take(&mut st.retry);
        // In the order their operations were submitted (a stable sort: requests of one
        // operation keep theirs), whatever order they failed in: a push_pull's pull after its
        // push (see `on_lost`).
        list.sort_by_key(|r| r.op);
        let now = Instant::now();
        let mut out = Vec::new();
        for r in list {
            if matches!(r.kind, Kind::Checkpoint | Kind::Rule) {
                // A checkpoint is not re-routed: it fails, and the next one starts afresh. A
                // rule goes to every server of the view: one lost before it acknowledged
                // fails the call (its successor learns the rule when this worker connects).
                let host = host_of(&st.view, r.server);
                let what = if r.kind == Kind::Rule {
                    "update rule"
                } else {
                    "checkpoint"
                };
                if let Some(o) = st.ops.get_mut(&r.op) {
                    o.error.get_or_insert(Error::PeerLost {
                        rank: 0,
                        member: r.server,
                        host,
                        detail: format!(
                            "{what}: push/pull server {} was lost before it answered",
                            r.server
                        ),
                    });
                    o.outstanding = o.outstanding.saturating_sub(1);
                }
                continue;
            }
            let alive = st
                .ops
                .get(&r.op)
                .is_some_and(|o| o.error.is_none() && now < o.deadline);
            if !alive {
                if let Some(o) = st.ops.get_mut(&r.op) {
                    o.outstanding = o.outstanding.saturating_sub(1);
                }
                continue;
            }
            if let Some(o) = st.ops.get_mut(&r.op) {
                o.outstanding = o.outstanding.saturating_sub(1);
            }
            let WReq {
                op,
                kind,
                dtype,
                parts,
                body,
                min,
                at,
                prio,
                ..
            } = r;
            out.extend(route(
                &mut st,
                op,
                kind,
                dtype,
                parts,
                body,
                min,
                at,
                prio,
                self.opts.partition_bytes,
            ));
        }
        drop(st);
        self.dispatch(out);
        self.wake();
    }

    fn apply_view(self: &Arc<Self>, view: View) {
        let mut st = lock(&self.st);
        st.ring = Arc::new(ring_of(&view));
        let keep: std::collections::HashSet<u64> = view.members.iter().map(|m| m.id).collect();
        let gone: Vec<u64> = st
            .chans
            .keys()
            .filter(|id| !keep.contains(id))
            .copied()
            .collect();
        let mut dead = Vec::new();
        // Connections that broke in the old view: servers that stay are reconnected on use.
        let broken: Vec<u64> = st
            .chans
            .iter()
            .filter(|(id, c)| keep.contains(id) && c.closed().is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in broken {
            if let Some(c) = st.chans.remove(&id) {
                dead.push(c);
            }
        }
        for id in gone {
            if let Some(c) = st.chans.remove(&id) {
                dead.push(c);
            }
            // In the order their operations were submitted (see `on_lost`).
            // Except those being received into their operation's memory (`PlaceGuard`).
            let mut ids: Vec<(u64, u64)> = st
                .reqs
                .iter()
                .filter(|(_, r)| r.server == id && !r.placing)
                .map(|(i, r)| (r.op, *i))
                .collect();
            ids.sort_unstable();
            for (_, i) in ids {
                if let Some(r) = st.reqs.remove(&i) {
                    st.retry.push(r);
                }
            }
        }
        st.view = view;
        st.lost.clear();
        drop(st);
        close_all(dead);
    }
}

/// The bytes of `parts` (offsets into `data`) in one buffer; the offsets become positions in
/// it. The buffer is a pooled one nobody else holds any more when there is one large enough.
fn compact(data: &[u8], parts: &mut [(PartRef, usize)], pool: &mut BufPool) -> Arc<Vec<u8>> {
    let total: usize = parts.iter().map(|(p, _)| p.n).sum();
    pool.fill(total, |b| {
        for (p, off) in parts.iter_mut() {
            let at = b.len();
            b.extend_from_slice(&data[*off..*off + p.n]);
            *off = at;
        }
    })
}

/// The body of write request `r`: its parts' bytes in order. A copy made for it is sent as
/// it is when it holds exactly those (else they are copied out of it); lent values are sent
/// from where they are, a segment per run of adjacent parts.
fn body_of(r: &WReq) -> Vec<Seg> {
    let total: usize = r.parts.iter().map(|(p, _)| p.n).sum();
    match &r.body {
        Src::Lent(l) => {
            // In bounds: the parts were cut from the lent values (`submit_to`).
            runs(r.parts.iter().map(|(p, off)| (*off, p.n)))
                .into_iter()
                .filter_map(|(off, n)| Seg::lent(l, off, n))
                .collect()
        }
        Src::Copy(b) => {
            let whole = total == b.len()
                && r.parts
                    .iter()
                    .try_fold(0usize, |at, (p, off)| (*off == at).then_some(at + p.n))
                    .is_some();
            if whole {
                // The request covers the copy in order: send it as it is.
                vec![Seg::Owned(b.clone())]
            } else {
                let mut out = Vec::with_capacity(total);
                for (p, off) in &r.parts {
                    out.extend_from_slice(&b[*off..*off + p.n]);
                }
                vec![Seg::Owned(Arc::new(out))]
            }
        }
    }
}

/// Groups parts by their owner on the current ring and registers one request per server.
#[allow(clippy::too_many_arguments)]
fn route(
    st: &mut WState,
    op: u64,
    kind: Kind,
    dtype: DataType,
    parts: Vec<(PartRef, usize)>,
    body: Src,
    min: Option<u64>,
    at: Option<u64>,
    prio: i32,
    cap: usize,
) -> Vec<(u64, WReq)> {
    let mut by: BTreeMap<u64, Vec<(PartRef, usize)>> = BTreeMap::new();
    let ring = batch_ring(&st.ring);
    if kind == Kind::Snap {
        for s in ring.servers() {
            by.insert(*s, Vec::new());
        }
    } else {
        for p in parts {
            match ring.owner(p.0.s) {
                Some(o) => by.entry(o).or_default().push(p),
                None => {
                    // No server at all: keep it for a retry.
                    st.retry.push(WReq {
                        op,
                        server: 0,
                        kind,
                        dtype,
                        parts: vec![p],
                        body: body.clone(),
                        min,
                        at,
                        prio,
                        early: 0,
                        placing: false,
                    });
                    if let Some(o) = st.ops.get_mut(&op) {
                        o.outstanding += 1;
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    for (server, ps) in by {
        for ps in chunks(ps, cap) {
            let id = st.next_req;
            st.next_req += 1;
            if let Some(o) = st.ops.get_mut(&op) {
                o.outstanding += 1;
            }
            out.push((
                id,
                WReq {
                    op,
                    server,
                    kind,
                    dtype,
                    parts: ps,
                    body: body.clone(),
                    min,
                    at,
                    prio,
                    early: 0,
                    placing: false,
                },
            ));
        }
    }
    out
}

/// Splits one server's parts into requests of at most `cap` bytes of values (the partition
/// size: what a server accepts in one message, and what its answer carries) and at most
/// [`MAX_PARTS`] parts. No parts (a snapshot-version request): one request.
fn chunks(ps: Vec<(PartRef, usize)>, cap: usize) -> Vec<Vec<(PartRef, usize)>> {
    let mut out = Vec::new();
    let mut cur: Vec<(PartRef, usize)> = Vec::new();
    let mut bytes = 0usize;
    for p in ps {
        if !cur.is_empty() && (bytes.saturating_add(p.0.n) > cap || cur.len() >= MAX_PARTS) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes = bytes.saturating_add(p.0.n);
        cur.push(p);
    }
    if !cur.is_empty() || out.is_empty() {
        out.push(cur);
    }
    out
}

fn spawn_watcher(inner: Arc<WInner>, client: Option<Arc<Client>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while !inner.stop.load(Ordering::SeqCst) {
            let cur = lock(&inner.st).view.epoch;
            let stop = AtomicBool::new(false);
            let deadline = Instant::now() + Duration::from_millis(50);
            match &client {
                Some(c) => match c.wait_epoch(cur + 1, deadline, &stop) {
                    Ok(top) => {
                        if let Some((view, reason)) = c.view_of(top) {
                            tracing::info!(target: "braid::ps", "member {}: view epoch {} ({reason})", inner.me, view.epoch);
                            inner.apply_view(view);
                            c.installed(top);
                        }
                    }
                    Err(Error::Timeout { .. }) => {}
                    Err(e) => {
                        tracing::error!(target: "braid::ps", "member {}: membership: {e}", inner.me);
                        std::thread::sleep(Duration::from_millis(200));
                    }
                },
                None => {
                    // A reader: while requests wait (a server died, or refused this reader's
                    // grant as stale), a new grant for the group's current view.
                    let waiting = !lock(&inner.st).retry.is_empty();
                    if waiting {
                        if let Some((addr, group)) = &inner.reader {
                            match crate::membership::fetch_reader_grant(
                                addr,
                                group,
                                inner.token.as_deref(),
                                Duration::from_secs(2),
                            ) {
                                Ok(g) if g.view.epoch != cur => {
                                    tracing::info!(target: "braid::ps", "reader {}: new grant (view epoch {})", g.id, g.view.epoch);
                                    *lock(&inner.ticket) = Some((g.id, g.view.epoch, g.ticket));
                                    inner.apply_view(g.view);
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    tracing::debug!(target: "braid::ps", "reader: refreshing the grant: {e}");
                                }
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            inner.retry_now();
        }
    })
}

/// A reader outside the training group: consistent snapshot reads of the servers' keys (every
/// key from the same completed round), without joining the group or blocking training.
pub struct KvReader {
    inner: Arc<WInner>,
    watcher: Option<JoinHandle<()>>,
    last: u64,
}

impl std::fmt::Debug for KvReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvReader")
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl KvReader {
    /// Connects to the servers of the group named in `cfg`: the coordinator grants this
    /// reader an id, the group's view and a ticket the servers check (the reader does not join
    /// the group). A grant that went stale (the view changed) is renewed when a request waits.
    ///
    /// Errors: coordinator unreachable or the group has no view; transports.
    pub fn connect(cfg: Config, opts: PsOptions) -> Result<KvReader> {
        crate::config::init_logging(&cfg.log);
        let addr = cfg.coordinator.clone().ok_or_else(|| {
            Error::InvalidArgument("coordinator unknown: set BRAID_COORDINATOR=host:port".into())
        })?;
        let token = cfg.job_token.as_ref().map(|t| t.0.clone());
        let grant = crate::membership::fetch_reader_grant(
            &addr,
            &cfg.group,
            token.as_deref(),
            cfg.init_timeout,
        )?;
        let me = grant.id;
        let view = grant.view;
        let epoch = view.epoch;
        let inner = Arc::new(WInner {
            me,
            my_host: cfg
                .host_id
                .clone()
                .unwrap_or_else(crate::membership::local_host_id),
            opts,
            transports: super::node::client_transports(&cfg)?,
            token,
            timeout: cfg.timeout,
            st: Mutex::new(new_state(view)),
            cv: Condvar::new(),
            waiters: Mutex::new(Vec::new()),
            cv_waiters: std::sync::atomic::AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            reader: Some((addr, cfg.group.clone())),
            ticket: Mutex::new(Some((me, epoch, grant.ticket))),
            lost_grace: lost_grace(&cfg),
            bodies: Mutex::new(BufPool::new(BODY_POOL, BODY_POOL_BYTES)),
            group: cfg.group.clone(),
            client: None,
            ckpt: Mutex::new(CkptCtl::default()),
        });
        let watcher = spawn_watcher(inner.clone(), None);
        Ok(KvReader {
            inner,
            watcher: Some(watcher),
            last: 0,
        })
    }

    /// Reads `keys` (`lens[i]` elements each) all at one completed version: the newest that
    /// every server holds for all its keys, and at least `min_version` and at least the
    /// version of this reader's previous snapshot (versions never go backwards). Returns the
    /// version and the values.
    ///
    /// Errors: `Timeout` when no such version is reached in time; a server's refusal.
    pub fn snapshot<T: Element>(
        &mut self,
        keys: &[u64],
        lens: &[usize],
        min_version: Option<u64>,
    ) -> Result<(u64, Vec<T>)> {
        let floor = self.last.max(min_version.unwrap_or(0));
        let end = Instant::now() + self.inner.timeout;
        loop {
            let op = self
                .inner
                .submit(Kind::Snap, T::DTYPE, &[], &[], &[], None, None, 0)?;
            let vers = handle(&self.inner, op, |v| v).wait()?;
            let version = if vers.contains_key(&(u64::MAX, 1)) {
                None
            } else {
                vers.get(&(u64::MAX, 0)).copied()
            };
            match version {
                Some(v) if v >= floor => {
                    match self
                        .inner
                        .pull_op::<T>(keys, lens, None, Some(v), 0)?
                        .wait()
                    {
                        Ok(p) => {
                            self.last = v;
                            return Ok((v, p.values));
                        }
                        Err(Error::InvalidArgument(m)) if m.contains("not held") => {}
                        Err(e) => return Err(e),
                    }
                }
                _ => {}
            }
            if Instant::now() >= end {
                return Err(Error::Timeout {
                    what: format!("a snapshot of version {floor} or newer"),
                    secs: self.inner.timeout.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for KvReader {
    fn drop(&mut self) {
        self.inner.shutdown(self.watcher.take());
    }
}

/// The host name of member `id` in `v` (empty if it is not there).
fn host_of(v: &View, id: u64) -> String {
    v.members
        .iter()
        .find(|m| m.id == id)
        .map(|m| m.hostname.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(op: u64, kind: Kind, parts: &[u64]) -> WReq {
        WReq {
            op,
            server: 7,
            kind,
            dtype: DataType::F32,
            parts: parts
                .iter()
                .map(|s| {
                    let p = PartRef {
                        s: *s,
                        k: *s,
                        p: 0,
                        n: 4,
                        t: 0,
                    };
                    (p, 0)
                })
                .collect(),
            body: Src::none(),
            min: None,
            at: None,
            prio: 0,
            early: 0,
            placing: false,
        }
    }

    /// A state with a push_pull's push and pull (the pull `after` the push) and a third,
    /// unrelated operation: (state, push, pull, third).
    fn push_pull_ops() -> (WState, u64, u64, u64) {
        let view = View {
            group: "g".into(),
            epoch: 1,
            nonce: 0,
            members: Vec::new(),
        };
        let mut st = new_state(view);
        let deadline = Instant::now() + Duration::from_secs(60);
        let push = st.new_op(OutBuf::NONE, deadline);
        let pull = st.new_op(OutBuf::NONE, deadline);
        let third = st.new_op(OutBuf::NONE, deadline);
        if let Some(o) = st.ops.get_mut(&pull) {
            o.after = Some(push);
        }
        (st, push, pull, third)
    }

    /// A push_pull's pull answer is not used when a request of its push for the same parts
    /// waits for a retry or was sent after the pull (the server answered without the push);
    /// it is when the push went first, for other parts, or when the pull has no push.
    #[test]
    fn a_pull_answered_without_its_push_is_stale() {
        let (mut st, push, pull, plain) = push_pull_ops();
        let r = req(pull, Kind::Pull, &[1, 2]);
        // The push (request 1) went before the pull (request 2): fresh.
        st.reqs.insert(1, req(push, Kind::Push, &[1, 2]));
        assert!(!WInner::stale_pull(&st, 2, &r));
        // Its part 2 sent again after the pull (request 3): stale.
        st.reqs.insert(3, req(push, Kind::Push, &[2]));
        assert!(WInner::stale_pull(&st, 2, &r));
        // Sent again for a part the pull does not read: fresh.
        st.reqs.remove(&3);
        st.reqs.insert(3, req(push, Kind::Push, &[9]));
        assert!(!WInner::stale_pull(&st, 2, &r));
        // Waiting for a retry, for part 1: stale; for another part only: fresh.
        st.retry.push(req(push, Kind::Push, &[1]));
        assert!(WInner::stale_pull(&st, 2, &r));
        st.retry.clear();
        st.retry.push(req(push, Kind::Push, &[5]));
        assert!(!WInner::stale_pull(&st, 2, &r));
        // Another operation's requests say nothing about this pull.
        st.retry.push(req(plain, Kind::Push, &[1, 2]));
        assert!(!WInner::stale_pull(&st, 2, &r));
        // A pull that is not a push_pull's is never stale.
        let lone = req(plain, Kind::Pull, &[1, 2]);
        st.retry.push(req(push, Kind::Push, &[1, 2]));
        assert!(!WInner::stale_pull(&st, 2, &lone));
    }

    /// A push_pull's pull is done once answered AND its push acknowledged (or failed, or
    /// dropped once done); a failed pull is done at once; a lone pull needs only its answers.
    #[test]
    fn a_push_pull_is_done_once_its_push_is_acknowledged_too() {
        let (mut st, push, pull, lone) = push_pull_ops();
        let deadline = Instant::now() + Duration::from_secs(60);
        let set = |st: &mut WState, op: u64, n: usize| {
            if let Some(o) = st.ops.get_mut(&op) {
                o.outstanding = n;
            }
        };
        set(&mut st, push, 2);
        set(&mut st, pull, 1);
        set(&mut st, lone, 0);
        let done = |st: &WState, op: u64| st.done(&st.ops[&op]);
        assert!(done(&st, lone));
        assert!(!done(&st, pull));
        // The pull answered, its push not yet acknowledged by every server: not done.
        set(&mut st, pull, 0);
        assert!(!done(&st, pull));
        set(&mut st, push, 0);
        assert!(done(&st, pull));
        // The push dropped once done (a push_pull's push nobody waits on), or failed: done.
        set(&mut st, push, 1);
        assert!(!done(&st, pull));
        if let Some(o) = st.ops.get_mut(&push) {
            o.error = Some(Error::Aborted);
        }
        assert!(done(&st, pull));
        st.ops.remove(&push);
        assert!(done(&st, pull));
        // A failed pull is done whatever its push does.
        let push2 = st.new_op(OutBuf::NONE, deadline);
        set(&mut st, push2, 3);
        if let Some(o) = st.ops.get_mut(&pull) {
            o.after = Some(push2);
            o.outstanding = 2;
            o.error = Some(Error::Aborted);
        }
        assert!(done(&st, pull));
    }
}
