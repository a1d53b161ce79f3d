//! The coordinator service: accepts member connections, runs rendezvous per group and
//! publishes views.
//!
//! Threads: the accept thread; one thread per connection only while it handshakes (at most
//! `max_unauthenticated`); one event loop (epoll, [`super::coord_loop`]) serving every
//! registered member's connection (frames decoded incrementally, heartbeats and
//! acknowledgements handled there, writes never blocking: each member has a bounded outgoing
//! queue and is dropped, as a failure, when it fills); the ticker (heartbeat timeouts,
//! batching windows); the persister, which writes the state file off the state lock (one
//! write for any number of changes) and then sends the frames those changes produced, so no
//! member sees a view a restarted coordinator would not know. Member ids stay below the
//! persisted high-water mark, written [`ID_BLOCK`] ahead of use. Nothing under the state lock
//! blocks on a socket or the disk (except an id allocation that found no persisted id left).
//!
//! This is the I/O layer only: the membership state and its transitions are the pure state
//! machine of [`super::coord_state`]. Threads lock the state to call a transition, hand the
//! views it produced and its dirty flag to the persister (under the lock, so frames keep the
//! order of the changes that made them) and do the rest of its outputs (echoes, refusals,
//! shutdowns) after releasing it, through the table of connections by key (`conns`). The
//! one write under the lock is a registration's acknowledgement, queued without blocking
//! (it must precede every view the member is sent).
//!
//! Costs at scale (`braid-coordinator bench`): one descriptor per connection (its handshake
//! thread or the event loop reads it, writers share it behind the queue's lock, and the accept
//! loop keeps the same `Arc` to shut it down); members are found by id
//! through a per-group index, so a heartbeat or an acknowledgement costs O(1) under the state
//! lock, and the per-event check of `decide` reads counters instead of scanning the group;
//! the ticker scans a group for heartbeat timeouts only when its earliest deadline passed.
//! The listener has a backlog of [`LISTEN_BACKLOG`] and the accept thread sleeps in `poll(2)`
//! (woken by shutdown), so a join storm waits neither in SYN retransmits nor in sleeps.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::coord_loop::{recv_now, Decoder, Link, Poller};
use super::coord_state::{
    self, snapshot, state_from_bytes, Flow, Handshake, IdMap, Out, Persisted, Publish, Refusal,
    State, ID_BLOCK, MAX_HANDLE,
};
use super::proto::{self, Frame, FrameError, MsgType};
use super::{auth, Registration, LOG};
use crate::error::{Error, Result};

pub use super::coord_state::fuzz_load_state;
pub(crate) use super::coord_state::state_machine_bench;
#[cfg(test)]
pub(crate) use super::coord_state::{fold_metric, reweigh_decision, state_ok, MeasuredStage};

/// Write deadline for frames sent by the coordinator.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest blocking read of an established member connection (`shutdown` wakes those reads by
/// shutting the sockets down, so this only bounds the wake-ups of idle members).
const IDLE_SLICE: Duration = Duration::from_secs(1);
/// How long `shutdown` waits for its threads.
const JOIN_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest first frame of a connection (before the peer proved anything): a registration with
/// the largest connect handle (hex-encoded, so twice its size) plus its names and policy.
pub(crate) const MAX_OPENING: usize = 2 * MAX_HANDLE + 32 * 1024;
/// Largest answer to a challenge.
const MAX_AUTH: usize = 4 << 10;
/// Backlog of the listening socket (the kernel caps it at `net.core.somaxconn`, 4096 on
/// current kernels): a join storm of thousands of members queues there instead of overflowing
/// into SYN retransmits (1, 3, 7 s) with the default backlog of 128.
pub(crate) const LISTEN_BACKLOG: i32 = 4096;
/// Longest sleep of the accept thread in `poll(2)` (shutdown wakes it at once; this only
/// bounds how long a missed wake-up could delay it).
const ACCEPT_POLL: Duration = Duration::from_secs(1);

/// Tunables of a [`Coordinator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorOptions {
    /// How long a new connection may take to send its first message and, with a job token or
    /// for a rejoin, to answer the challenge (default 10 s): the whole of it, however slowly
    /// the bytes trickle in. A connection that has not finished by then is closed.
    pub handshake_timeout: Duration,
    /// How long the rest of a frame may take once its first byte arrived (default 10 s).
    pub frame_timeout: Duration,
    /// Most connections served at once (default 16384); more are closed at once with a
    /// warning.
    pub max_connections: usize,
    /// Job token (`BRAID_JOB_TOKEN`): when set, every client must answer an HMAC-SHA256
    /// challenge keyed by it.
    pub job_token: Option<Vec<u8>>,
    /// File where the id high-water mark and the views are persisted
    /// (`BRAID_COORDINATOR_STATE`); read at start when it exists.
    pub state_file: Option<PathBuf>,
    /// Stack size of the handshake threads (one per connection until it registers; default
    /// 256 KiB).
    pub thread_stack: usize,
    /// Most connections still in their handshake at once (default 1024): when one more
    /// arrives, the oldest of them is closed (with a log line), so idle or slow connections
    /// cannot keep a real member out for longer than it takes it to register. The default lets
    /// a join storm of about a thousand members handshake at once on a loaded machine (with
    /// 256, storm joiners whose threads had not run yet were closed as "oldest"); each open
    /// handshake holds a thread, a descriptor and at most one opening frame (160 KiB), so
    /// 1024 of them bound a flood to about 160 MiB.
    pub max_unauthenticated: usize,
    /// Most bytes waiting to be written to one registered member (default 16 MiB, at least
    /// one frame): a member that stops reading is dropped, as a failure, when its queue would
    /// grow past this, so it never delays what the others receive.
    pub max_queued: usize,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        CoordinatorOptions {
            handshake_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(10),
            max_connections: 16384,
            job_token: None,
            state_file: None,
            thread_stack: 256 << 10,
            max_unauthenticated: 1024,
            max_queued: 16 << 20,
        }
    }
}

impl CoordinatorOptions {
    /// Options from the environment: `BRAID_JOB_TOKEN` and `BRAID_COORDINATOR_STATE`.
    pub fn from_env() -> CoordinatorOptions {
        let get = crate::config::var;
        CoordinatorOptions {
            job_token: get("BRAID_JOB_TOKEN").map(String::into_bytes),
            state_file: get("BRAID_COORDINATOR_STATE").map(PathBuf::from),
            ..CoordinatorOptions::default()
        }
    }
}

/// The reading side of a [`Link`], owned by its connection thread: buffered (a small frame is
/// one `recv`, not three), and the read timeout is set only when it changes.
struct Sock<'a> {
    sock: &'a TcpStream,
    slice: Option<Duration>,
    buf: Box<[u8]>,
    at: usize,
    end: usize,
}

impl<'a> Sock<'a> {
    fn new(sock: &'a TcpStream) -> Sock<'a> {
        Sock {
            sock,
            slice: None,
            buf: vec![0u8; 4096].into_boxed_slice(),
            at: 0,
            end: 0,
        }
    }
}

impl Read for Sock<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.end {
            if out.len() >= self.buf.len() {
                return self.sock.read(out);
            }
            let n = self.sock.read(&mut self.buf)?;
            self.at = 0;
            self.end = n;
        }
        let n = out.len().min(self.end - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Sock<'_> {
    /// Bytes read from the socket but not consumed yet (handed to the event loop).
    fn leftover(&self) -> Vec<u8> {
        self.buf[self.at..self.end].to_vec()
    }
}

impl proto::Wire for Sock<'_> {
    fn set_slice(&mut self, d: Duration) -> std::io::Result<()> {
        if self.slice != Some(d) {
            self.sock.set_read_timeout(Some(d))?;
            self.slice = Some(d);
        }
        Ok(())
    }
}

/// A row of the service's connection table: the socket and its thread.
type Conn = (Arc<Link>, JoinHandle<()>);

struct Shared {
    opts: CoordinatorOptions,
    state: Mutex<State>,
    stop: AtomicBool,
    /// Open connections by key: the socket (to shut it down at once) and the thread. A
    /// connection's thread removes its own row when it ends (the accept loop spawns it while
    /// holding this lock, so the row is always there first).
    conns: Mutex<HashMap<u64, Conn>>,
    /// Keys of the connections still in their handshake (keys grow: the first is the oldest).
    pending: Mutex<BTreeSet<u64>>,
    /// The member connections' epoll set (the event loop waits on it).
    poller: Poller,
    /// Registered connections handed over to the event loop, not yet taken by it.
    inbox: Mutex<Vec<Handover>>,
    /// Work of the persister thread (filled under the state lock, so frames go out in the
    /// order of the state changes that made them).
    work: Mutex<Work>,
    work_cv: Condvar,
    /// The generation of the last snapshot written to the state file.
    written_gen: Mutex<u64>,
}

impl Shared {
    /// The coordinator's shared state around `state` (as loaded: its next id is durable).
    fn new(opts: CoordinatorOptions, mut state: State, poller: Poller) -> Shared {
        state.set_persist_ids(opts.state_file.is_some());
        Shared {
            opts,
            state: Mutex::new(state),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            pending: Mutex::new(BTreeSet::new()),
            poller,
            inbox: Mutex::new(Vec::new()),
            work: Mutex::new(Work::default()),
            work_cv: Condvar::new(),
            written_gen: Mutex::new(0),
        }
    }
}

/// What the persister thread has to do.
#[derive(Default)]
struct Work {
    /// The state changed: write the state file.
    dirty: bool,
    /// Frames (by connection key) to send once the state that produced them is on disk.
    publish: Publish,
}

/// A registered connection, handed from its handshake thread to the event loop.
struct Handover {
    key: u64,
    link: Arc<Link>,
    peer: SocketAddr,
    id: u64,
    group: String,
    /// Bytes the handshake read beyond its last frame.
    leftover: Vec<u8>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How often the ticker looks at heartbeats and batching windows.
const TICK: Duration = Duration::from_millis(20);

/// The coordinator service, running on background threads (accept, handshakes, the event
/// loop, the ticker and the persister). Dropping it shuts it down.
///
/// It can be embedded in any process (like torch's `TCPStore`): `braid-run` embeds one, the
/// torchrun convention has rank 0 host one, and `braid-coordinator` runs one standalone.
pub struct Coordinator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    ticker: Option<JoinHandle<()>>,
    /// The event loop serving registered members.
    looper: Option<JoinHandle<()>>,
    /// The persister (state file, then the frames that waited for it).
    persister: Option<JoinHandle<()>>,
    /// Dropped by `shutdown` to wake the accept thread from `poll(2)`.
    wake: Option<UnixStream>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    /// Binds the service to `addr` (`"127.0.0.1:0"` picks a free port; see
    /// [`Coordinator::local_addr`]) and starts serving with default options.
    ///
    /// Errors: `Error::System` when the address cannot be bound or a thread cannot start.
    pub fn bind(addr: &str) -> Result<Coordinator> {
        Coordinator::bind_with(addr, CoordinatorOptions::default())
    }

    /// Like [`Coordinator::bind`] with explicit options.
    ///
    /// Errors: as [`Coordinator::bind`]; `Error::InvalidArgument` for zero timeouts.
    pub fn bind_with(addr: &str, opts: CoordinatorOptions) -> Result<Coordinator> {
        if opts.handshake_timeout.is_zero() || opts.frame_timeout.is_zero() {
            return Err(Error::InvalidArgument(
                "coordinator timeouts must be positive".into(),
            ));
        }
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::System(format!("cannot bind the coordinator to {addr}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::System(format!("coordinator address: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::System(format!("coordinator listener: {e}")))?;
        // SAFETY: `listener` owns this descriptor, a bound listening TCP socket, for the
        // whole call; listen(2) on it again only changes its backlog.
        if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
            tracing::warn!(target: LOG,
                "coordinator: cannot raise the listen backlog to {LISTEN_BACKLOG}: {}",
                std::io::Error::last_os_error());
        }
        let (wake, woken) = UnixStream::pair()
            .map_err(|e| Error::System(format!("coordinator wake-up socket: {e}")))?;
        let state = load_state(&opts)?;
        let poller = Poller::new()
            .map_err(|e| Error::System(format!("coordinator event loop (epoll): {e}")))?;
        let shared = Arc::new(Shared::new(opts, state, poller));
        if shared.opts.state_file.is_some() {
            // Ids for the first registrations, persisted before anyone asks.
            let mut st = lock(&shared.state);
            st.id_high_water = st.next_id.saturating_add(ID_BLOCK);
            if let Err(e) = persist_now(&shared, &mut st) {
                tracing::warn!(target: LOG, "coordinator: cannot persist its state: {e}");
                st.id_high_water = st.next_id;
            }
        }
        // A thread that cannot start stops those already started.
        let failed = |e: std::io::Error| {
            shared.stop.store(true, Ordering::SeqCst);
            shared.poller.wake();
            shared.work_cv.notify_all();
            Error::System(format!("cannot start the coordinator thread: {e}"))
        };
        let sh = Arc::clone(&shared);
        let looper = std::thread::Builder::new()
            .name("braid-coord-loop".into())
            .spawn(move || event_loop(sh))
            .map_err(failed)?;
        let sh = Arc::clone(&shared);
        let persister = std::thread::Builder::new()
            .name("braid-coord-persist".into())
            .spawn(move || persist_loop(sh))
            .map_err(failed)?;
        let sh = Arc::clone(&shared);
        let ticker = std::thread::Builder::new()
            .name("braid-coord-tick".into())
            .spawn(move || tick_loop(sh))
            .map_err(failed)?;
        let sh = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("braid-coord-accept".into())
            .spawn(move || accept_loop(listener, woken, sh))
            .map_err(failed)?;
        tracing::info!(target: LOG, "coordinator listening on {local}");
        Ok(Coordinator {
            addr: local,
            shared,
            accept: Some(accept),
            ticker: Some(ticker),
            looper: Some(looper),
            persister: Some(persister),
            wake: Some(wake),
        })
    }

    /// The service's status as JSON: per group the current view (epoch, members with rank,
    /// id, host, pid, role, heartbeat age), waiting joiners, the history of epochs with
    /// their reasons, `live` (members and joiners still registered) and `registered_total`
    /// (registrations accepted since this service started). At the top: `live_members` (over
    /// all groups), `registered_total` (all groups, forgotten ones included) and
    /// `past_groups` (groups whose members all left, so forgotten: name and
    /// `registered_total`). "Members came and all left" is `registered_total > 0 &&
    /// live_members == 0`. The same document `braid-coordinator status ADDR` prints.
    pub fn status(&self) -> serde_json::Value {
        status_json(&self.shared)
    }

    /// The address the service is bound to (with the port chosen when binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Members currently registered in `group` (for tests).
    #[cfg(test)]
    pub(crate) fn registered(&self, group: &str) -> usize {
        lock(&self.shared.state).registered(group)
    }

    /// Stops the service: closes the listener and every connection and joins the threads,
    /// waiting at most about 3 s (threads that do not finish by then are left to finish on
    /// their own). Idempotent; also done by `Drop`.
    pub fn shutdown(&mut self) {
        if self.shared.stop.swap(true, Ordering::SeqCst) && self.accept.is_none() {
            return;
        }
        let deadline = Instant::now() + JOIN_TIMEOUT;
        // Its peer closing wakes the accept thread's poll.
        drop(self.wake.take());
        if let Some(h) = self.accept.take() {
            join_until(h, deadline, "accept");
        }
        if let Some(h) = self.ticker.take() {
            join_until(h, deadline, "tick");
        }
        self.shared.poller.wake();
        if let Some(h) = self.looper.take() {
            join_until(h, deadline, "event loop");
        }
        self.shared.work_cv.notify_all();
        if let Some(h) = self.persister.take() {
            join_until(h, deadline, "persister");
        }
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        for (link, _) in conns.values() {
            link.close();
        }
        for (_, (_, h)) in conns {
            join_until(h, deadline, "connection");
        }
        tracing::info!(target: LOG, "coordinator on {} stopped", self.addr);
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn join_until(h: JoinHandle<()>, deadline: Instant, what: &str) {
    while !h.is_finished() {
        if Instant::now() >= deadline {
            tracing::warn!(target: LOG, "coordinator {what} thread did not stop in time; leaving it");
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = h.join();
}

/// Waits until the listener has a connection to accept, `woken` is readable (shutdown) or
/// `timeout` passed.
fn wait_accept(listener: &TcpListener, woken: &UnixStream, timeout: Duration) {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: woken.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fds` is a valid array of two pollfd for the whole call (its length is passed),
    // and both descriptors are owned by `listener` and `woken`, borrowed for the call.
    let _ = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
}

fn accept_loop(listener: TcpListener, woken: UnixStream, sh: Arc<Shared>) {
    let mut next_key = 0u64;
    // Evictions of handshaking connections since the last log line (logged at most once a
    // second, so a flood does not flood the log too).
    let mut evicted = 0u64;
    let mut last_log: Option<Instant> = None;
    while !sh.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let mut conns = lock(&sh.conns);
                if conns.len() >= sh.opts.max_connections {
                    tracing::warn!(target: LOG,
                        "coordinator: refusing connection from {peer}: {} connections open",
                        conns.len());
                    continue;
                }
                let link = Arc::new(Link::new(stream));
                next_key += 1;
                let key = next_key;
                {
                    let mut pending = lock(&sh.pending);
                    while pending.len() >= sh.opts.max_unauthenticated.max(1) {
                        let Some(old) = pending.pop_first() else {
                            break;
                        };
                        if let Some((l, _)) = conns.get(&old) {
                            l.close();
                            evicted += 1;
                        }
                    }
                    pending.insert(key);
                }
                if evicted > 0 && last_log.map_or(true, |t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(target: LOG,
                        "coordinator: closed {evicted} connection(s) that had not finished their handshake: more than {} were open at once (a flood of idle or slow connections?); the oldest go first",
                        sh.opts.max_unauthenticated.max(1));
                    evicted = 0;
                    last_log = Some(Instant::now());
                }
                let sh2 = Arc::clone(&sh);
                let link2 = Arc::clone(&link);
                match std::thread::Builder::new()
                    .name("braid-coord-conn".into())
                    .stack_size(sh.opts.thread_stack.max(64 << 10))
                    .spawn(move || serve(link2, peer, sh2, key))
                {
                    Ok(h) => {
                        conns.insert(key, (link, h));
                    }
                    Err(e) => {
                        unpend(&sh, key);
                        tracing::warn!(target: LOG, "coordinator: no thread for {peer}: {e}")
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_accept(&listener, &woken, ACCEPT_POLL);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(target: LOG, "coordinator: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The connection `key` finished its handshake (or ended): it no longer counts against
/// [`CoordinatorOptions::max_unauthenticated`].
fn unpend(sh: &Shared, key: u64) {
    lock(&sh.pending).remove(&key);
}

/// Sends an error frame (best effort) and logs the refusal.
fn refuse(s: &Link, peer: SocketAddr, message: &str) {
    refuse_code(s, peer, message, None);
}

fn refuse_code(s: &Link, peer: SocketAddr, message: &str, code: Option<&str>) {
    tracing::info!(target: LOG, "coordinator: refused {peer}: {message}");
    let _ = s.send(&proto::encode_error_code(message, code), WRITE_TIMEOUT);
}

/// Serves one connection's handshake. A registered member's connection is handed over to
/// the event loop; any other ends here: the socket is shut down (others may still hold the
/// link for a moment, so dropping ours would not close it) and its row leaves the service's
/// table.
fn serve(link: Arc<Link>, peer: SocketAddr, sh: Arc<Shared>, key: u64) {
    let mut handed = false;
    serve_inner(&link, peer, &sh, key, &mut handed);
    unpend(&sh, key);
    if !handed {
        link.close();
        lock(&sh.conns).remove(&key);
    }
}

/// What the first frame asked for.
enum Opening {
    Register(Registration),
    Rejoin(proto::Rejoin),
    Status,
    ViewReq(String),
    Reader(String),
}

fn serve_inner(writer: &Arc<Link>, peer: SocketAddr, sh: &Shared, key: u64, handed: &mut bool) {
    let _ = writer.sock.set_nodelay(true);
    let _ = writer.sock.set_nonblocking(false);
    let mut reader = Sock::new(&writer.sock);
    let now = Instant::now();
    let hs_deadline = now.checked_add(sh.opts.handshake_timeout).unwrap_or(now);

    // 1. The first frame must be a registration, a rejoin or a request, small, and complete
    //    within the handshake timeout.
    let Some(frame) = read_checked(&mut reader, writer, peer, hs_deadline, MAX_OPENING, sh) else {
        return;
    };
    let opening = match MsgType::from_u16(frame.ty) {
        Some(MsgType::Register) => frame.body::<Registration>().map(Opening::Register),
        Some(MsgType::Rejoin) => frame.body::<proto::Rejoin>().map(Opening::Rejoin),
        Some(MsgType::StatusReq) => frame.body::<proto::StatusReq>().map(|_| Opening::Status),
        Some(MsgType::ViewReq) => frame
            .body::<proto::ViewReq>()
            .map(|r| Opening::ViewReq(r.group)),
        Some(MsgType::ReaderReq) => frame
            .body::<proto::ReaderReq>()
            .map(|r| Opening::Reader(r.group)),
        _ => {
            tracing::warn!(target: LOG,
                "coordinator: dropping {peer}: first message has type {}, expected a registration",
                frame.ty);
            refuse(
                writer,
                peer,
                &format!(
                    "expected a registration (message type {}), got message type {}",
                    MsgType::Register as u16,
                    frame.ty
                ),
            );
            return;
        }
    };
    let opening = match opening {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(target: LOG, "coordinator: dropping {peer}: bad first message: {e}");
            refuse(writer, peer, &format!("malformed registration: {e}"));
            return;
        }
    };
    let client_nonce = match &opening {
        Opening::Register(r) => r.client_nonce.clone(),
        Opening::Rejoin(r) => r.client_nonce.clone(),
        Opening::Status => frame
            .body::<proto::StatusReq>()
            .map(|r| r.client_nonce)
            .unwrap_or_default(),
        Opening::ViewReq(_) => frame
            .body::<proto::ViewReq>()
            .map(|r| r.client_nonce)
            .unwrap_or_default(),
        Opening::Reader(_) => frame
            .body::<proto::ReaderReq>()
            .map(|r| r.client_nonce)
            .unwrap_or_default(),
    };

    // 2. Challenge-response: the job token when there is one; a rejoin proves its member
    //    secret too (even without a token).
    let token = sh.opts.job_token.as_deref();
    let hs = if token.is_some() || matches!(opening, Opening::Rejoin(_)) {
        match challenge(
            &mut reader,
            writer,
            peer,
            hs_deadline,
            sh,
            token,
            &client_nonce,
        ) {
            Some(hs) => hs,
            None => return,
        }
    } else {
        Handshake {
            proof: None,
            server_nonce: String::new(),
            answer: None,
        }
    };
    let proof = hs.proof.clone();

    // 3. Admission.
    let (id, group) = match opening {
        Opening::ViewReq(group) => {
            let view = lock(&sh.state).view(&group);
            match view {
                Some(mut v) => {
                    // The nonce keys the view's data connections: it goes only to members.
                    v.nonce = 0;
                    let mut doc =
                        serde_json::json!({"member_id": 0, "view": v, "reason": "view request"});
                    if let Some(p) = proof {
                        doc["proof"] = serde_json::Value::String(p);
                    }
                    let bytes = proto::encode_raw(
                        proto::VERSION,
                        MsgType::View as u16,
                        &serde_json::to_vec(&doc).unwrap_or_default(),
                    );
                    let _ = writer.send(&bytes, WRITE_TIMEOUT);
                }
                None => refuse_code(
                    writer,
                    peer,
                    &format!("group {group} has no view (not formed, or unknown)"),
                    Some("unknown"),
                ),
            }
            return;
        }
        Opening::Reader(group) => {
            match grant_reader(sh, &group, peer, proof) {
                Ok(bytes) => {
                    let _ = writer.send(&bytes, WRITE_TIMEOUT);
                }
                Err((msg, code)) => refuse_code(writer, peer, &msg, code),
            }
            return;
        }
        Opening::Status => {
            let body = status_json(sh);
            let mut doc = serde_json::json!({ "status": body });
            if let Some(p) = proof {
                doc["proof"] = serde_json::Value::String(p);
            }
            match serde_json::to_vec(&doc) {
                Ok(payload) => {
                    let bytes =
                        proto::encode_raw(proto::VERSION, MsgType::StatusReply as u16, &payload);
                    let _ = writer.send(&bytes, WRITE_TIMEOUT);
                }
                Err(e) => refuse(writer, peer, &format!("status: {e}")),
            }
            return;
        }
        Opening::Register(reg) => match register(sh, reg, peer, key, writer, proof) {
            Ok((id, group)) => {
                unpend(sh, key);
                (id, group)
            }
            Err((msg, code)) => {
                refuse_code(writer, peer, &msg, code);
                return;
            }
        },
        Opening::Rejoin(rj) => match rejoin(sh, &rj, peer, key, writer, &hs, &client_nonce) {
            Ok(_) => {
                unpend(sh, key);
                (rj.member_id, rj.group)
            }
            Err((msg, code)) => {
                refuse_code(writer, peer, &msg, code);
                return;
            }
        },
    };

    // 4. Member messages until goodbye or disconnect: served by the event loop.
    lock(&sh.inbox).push(Handover {
        key,
        link: Arc::clone(writer),
        peer,
        id,
        group,
        leftover: reader.leftover(),
    });
    *handed = true;
    sh.poller.wake();
}

/// A reader's grant: a fresh id (never reused), the group's view without its nonce, and the
/// ticket the group's push/pull servers check (keyed by the view key, which needs the nonce).
fn grant_reader(
    sh: &Shared,
    group: &str,
    peer: SocketAddr,
    proof: Option<String>,
) -> std::result::Result<Vec<u8>, Refusal> {
    let (id, mut view) = {
        let mut st = lock(&sh.state);
        let Some(view) = st.view(group) else {
            return Err((
                format!("group {group} has no view (not formed, or unknown)"),
                Some("unknown"),
            ));
        };
        reserve_ids(sh, &mut st)?;
        let id = coord_state::alloc_id(&mut st);
        // The allocation may have raised the id reservation.
        queue(sh, &mut st, Vec::new());
        (id.map_err(|m| (m, None))?, view)
    };
    let key = auth::view_key(sh.opts.job_token.as_deref(), view.nonce);
    let ticket = auth::reader_ticket(&key, group, id, view.epoch);
    view.nonce = 0;
    tracing::info!(target: LOG,
        "coordinator: group {group}: reader {id} registered from {peer} (view epoch {})",
        view.epoch);
    proto::encode(
        MsgType::ReaderGrant,
        &proto::ReaderGrantMsg {
            id,
            view,
            ticket: super::to_hex(&ticket),
            proof,
        },
    )
    .map_err(|e| (e.to_string(), None))
}

/// Runs the challenge-response. With a job token, the client must prove it; the answer is
/// returned for the caller's own checks (a rejoin's member proof).
fn challenge(
    reader: &mut Sock<'_>,
    writer: &Link,
    peer: SocketAddr,
    deadline: Instant,
    sh: &Shared,
    token: Option<&[u8]>,
    client_nonce: &str,
) -> Option<Handshake> {
    let server_nonce = super::random_nonce();
    let ch = match proto::encode(
        MsgType::Challenge,
        &proto::Challenge {
            server_nonce: server_nonce.clone(),
            token: token.is_some(),
        },
    ) {
        Ok(b) => b,
        Err(_) => return None,
    };
    if writer.send(&ch, WRITE_TIMEOUT).is_err() {
        return None;
    }
    let Some(f) = read_checked(reader, writer, peer, deadline, MAX_AUTH, sh) else {
        if token.is_some() {
            tracing::warn!(target: LOG, "coordinator: refused {peer}: no answer to the job-token challenge (BRAID_JOB_TOKEN missing on that side?)");
        } else {
            tracing::warn!(target: LOG, "coordinator: refused {peer}: no answer to the rejoin challenge");
        }
        return None;
    };
    let answer = if MsgType::from_u16(f.ty) == Some(MsgType::Auth) {
        f.body::<proto::Auth>().ok()
    } else {
        None
    };
    let Some(answer) = answer else {
        tracing::warn!(target: LOG, "coordinator: refused {peer}: message type {} is not an answer to the challenge", f.ty);
        refuse_code(
            writer,
            peer,
            "expected the answer to the challenge",
            Some("auth"),
        );
        return None;
    };
    let proof = match token {
        None => None,
        Some(token) => {
            if !auth::check_client(token, &server_nonce, client_nonce, &answer.mac) {
                tracing::warn!(target: LOG, "coordinator: refused {peer}: job token missing or wrong");
                refuse_code(
                    writer,
                    peer,
                    "job token rejected: this coordinator requires BRAID_JOB_TOKEN and the answer did not prove it",
                    Some("auth"),
                );
                return None;
            }
            Some(auth::server_mac(token, client_nonce, &server_nonce))
        }
    };
    Some(Handshake {
        proof,
        server_nonce,
        answer: Some(answer),
    })
}

/// Handles one frame of registered member `id` on connection `key` (the event loop, one frame
/// at a time): the state machine's transition under the state lock, what it asks for after.
fn on_member_frame(
    f: Frame,
    key: u64,
    link: &Link,
    peer: SocketAddr,
    sh: &Shared,
    id: u64,
    group: &str,
) -> Flow {
    let now = Instant::now();
    let (flow, outs) = {
        let mut st = lock(&sh.state);
        let (flow, fx) = coord_state::on_member_frame(&mut st, f, key, peer, id, group, now);
        queue(sh, &mut st, fx.publish);
        (flow, fx.now)
    };
    run(sh, outs, Some((key, link)));
    flow
}

/// The connection of key `conn`: `local` when it is that one, else from the service's table
/// (`None`: it ended).
fn link_of(sh: &Shared, conn: u64, local: Option<(u64, &Link)>, f: impl FnOnce(&Link)) {
    if let Some((k, l)) = local {
        if k == conn {
            return f(l);
        }
    }
    let link = lock(&sh.conns).get(&conn).map(|(l, _)| Arc::clone(l));
    if let Some(l) = link {
        f(&l);
    }
}

/// Does at once what a transition asked for besides views (after the state lock is
/// released): writes (queued, never blocking; best effort) and shutdowns, in order. `local`:
/// the caller's own connection (found without the table).
fn run(sh: &Shared, outs: Vec<Out>, local: Option<(u64, &Link)>) {
    for o in outs {
        match o {
            Out::Send { conn, frame, .. } => link_of(sh, conn, local, |l| {
                let _ = l.send(&frame, WRITE_TIMEOUT);
            }),
            Out::Close { conn } => link_of(sh, conn, local, Link::close),
        }
    }
}

/// A member connection as the event loop holds it.
struct Served {
    link: Arc<Link>,
    peer: SocketAddr,
    id: u64,
    group: String,
    dec: Decoder,
}

/// The event loop lets events gather for this long after a batch of fewer than
/// [`GATHER_BELOW`] events.
const GATHER: Duration = Duration::from_millis(2);
const GATHER_BELOW: usize = 64;

/// Bytes one connection may deliver per turn of the loop before the others get theirs.
const READ_TURN: usize = 256 << 10;

/// The event loop: serves every registered member's connection (reads, heartbeats,
/// acknowledgements and every other member message; flushes the outgoing queues) on one
/// thread, until the service stops.
fn event_loop(sh: Arc<Shared>) {
    let mut conns: IdMap<Served> = IdMap::default();
    // Connections with bytes left to read after their turn, and those holding part of a
    // frame (checked against the frame timeout).
    let mut again: Vec<u64> = Vec::new();
    let mut partial: BTreeSet<u64> = BTreeSet::new();
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut ready: Vec<(u64, u32)> = Vec::new();
    let mut scratch = vec![0u8; 64 << 10];
    let mut last_wake = Instant::now();
    while !sh.stop.load(Ordering::SeqCst) {
        let timeout = if again.is_empty() {
            IDLE_SLICE
        } else {
            Duration::ZERO
        };
        // Fewer wake-ups: after a small batch, let events gather for a moment (heartbeats
        // come every second; a view waits at most this much longer).
        if ready.len() < GATHER_BELOW && again.is_empty() {
            let since = last_wake.elapsed();
            if since < GATHER {
                std::thread::sleep(GATHER - since);
            }
        }
        sh.poller.wait(&mut evs, &mut ready, timeout);
        last_wake = Instant::now();
        if sh.stop.load(Ordering::SeqCst) {
            break;
        }
        let arrived = std::mem::take(&mut *lock(&sh.inbox));
        for h in arrived {
            let fd = h.link.sock.as_raw_fd();
            let key = h.key;
            let partial_in = !h.leftover.is_empty();
            conns.insert(
                key,
                Served {
                    link: h.link,
                    peer: h.peer,
                    id: h.id,
                    group: h.group,
                    dec: Decoder::new(h.leftover),
                },
            );
            if let Err(e) = sh.poller.add(fd, key) {
                tracing::warn!(target: LOG, "coordinator: cannot watch member {} ({}): {e}; dropping it", h.id, h.peer);
                end_served(&sh, &mut conns, key, false);
                continue;
            }
            if partial_in {
                again.push(key);
            }
        }
        // (key, whether to read until the socket says it is empty)
        let mut turn: Vec<(u64, bool)> = again.drain(..).map(|k| (k, true)).collect();
        for &(key, events) in &ready {
            if events & (libc::EPOLLOUT as u32) != 0 {
                if let Some(c) = conns.get(&key) {
                    c.link.flush();
                }
            }
            let hup = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
            if events & (hup | libc::EPOLLIN as u32) != 0 {
                turn.push((key, events & hup != 0));
            }
        }
        turn.sort_unstable();
        turn.dedup_by(|a, b| {
            if a.0 == b.0 {
                b.1 |= a.1;
                true
            } else {
                false
            }
        });
        let now = Instant::now();
        for (key, drain) in turn {
            match read_served(&sh, &mut conns, key, &mut scratch, now, drain) {
                Some(Flow::Go) => {}
                Some(Flow::End(polite)) => {
                    partial.remove(&key);
                    end_served(&sh, &mut conns, key, polite);
                    continue;
                }
                None => again.push(key),
            }
            if conns.get(&key).is_some_and(|c| c.dec.started.is_some()) {
                partial.insert(key);
            } else {
                partial.remove(&key);
            }
        }
        // Frames begun but not finished within the frame timeout.
        let now = Instant::now();
        let stalled: Vec<u64> = partial
            .iter()
            .copied()
            .filter(|k| {
                conns.get(k).and_then(|c| c.dec.started).map_or(true, |t| {
                    now.saturating_duration_since(t) > sh.opts.frame_timeout
                })
            })
            .collect();
        for key in stalled {
            partial.remove(&key);
            if let Some(c) = conns.get(&key) {
                let e = FrameError::Stalled {
                    got: c.dec.partial(),
                };
                tracing::warn!(target: LOG, "coordinator: member {} ({}): {e}; dropping it", c.id, c.peer);
                end_served(&sh, &mut conns, key, false);
            }
        }
    }
    // Stopping: the membership stays as it is (and as persisted) for a restart.
    for (_, c) in conns {
        sh.poller.remove(c.link.sock.as_raw_fd());
    }
}

/// Reads what connection `key` delivered (at most [`READ_TURN`] bytes) and handles its
/// frames. `None`: more may be waiting (its next turn comes after the others').
///
/// A read shorter than the buffer emptied the socket, and the edge-triggered epoll set
/// reports any byte arriving after it: so the loop reads again only after a full buffer, or
/// when `drain` (the peer closed or the socket failed: read on to the end).
fn read_served(
    sh: &Shared,
    conns: &mut IdMap<Served>,
    key: u64,
    scratch: &mut [u8],
    now: Instant,
    drain: bool,
) -> Option<Flow> {
    let Some(c) = conns.get_mut(&key) else {
        // Ended earlier in this turn.
        return Some(Flow::Go);
    };
    let fd = c.link.sock.as_raw_fd();
    let mut got = 0usize;
    let mut eof = false;
    let mut empty = false;
    loop {
        // Frames already in the buffer first (the handshake's leftover).
        loop {
            match c.dec.next(proto::MAX_PAYLOAD) {
                Ok(Some(f)) => {
                    if let Flow::End(p) =
                        on_member_frame(f, key, &c.link, c.peer, sh, c.id, &c.group)
                    {
                        return Some(Flow::End(p));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(target: LOG, "coordinator: member {} ({}): {e}; dropping it", c.id, c.peer);
                    return Some(Flow::End(false));
                }
            }
        }
        c.dec.note(now);
        if eof {
            if c.dec.partial() > 0 {
                let e = FrameError::Truncated {
                    got: c.dec.partial(),
                    want: c.dec.want(),
                };
                tracing::warn!(target: LOG, "coordinator: member {} ({}): {e}; dropping it", c.id, c.peer);
            }
            return Some(Flow::End(false));
        }
        if empty {
            return Some(Flow::Go);
        }
        if got >= READ_TURN {
            return None;
        }
        match recv_now(fd, scratch) {
            Ok(0) => eof = true,
            Ok(n) => {
                got += n;
                c.dec.push(&scratch[..n]);
                empty = n < scratch.len() && !drain;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(Flow::Go),
            Err(e) => {
                if !sh.stop.load(Ordering::SeqCst) {
                    tracing::warn!(target: LOG, "coordinator: member {} ({}): {}; dropping it", c.id, c.peer, FrameError::Io(e));
                }
                return Some(Flow::End(false));
            }
        }
    }
}

/// Connection `key` ended: the member departs (`polite`: after a goodbye), the socket is shut
/// down and its row leaves the service's table.
fn end_served(sh: &Shared, conns: &mut IdMap<Served>, key: u64, polite: bool) {
    let Some(c) = conns.remove(&key) else {
        return;
    };
    sh.poller.remove(c.link.sock.as_raw_fd());
    depart(sh, c.id, &c.group, c.peer, key, polite);
    c.link.close();
    lock(&sh.conns).remove(&key);
}

/// Reads one frame, handling protocol errors (warning with the peer address, error frame where
/// useful). `None`: the connection is to be closed.
fn read_checked(
    reader: &mut Sock<'_>,
    writer: &Link,
    peer: SocketAddr,
    deadline: Instant,
    max_payload: usize,
    sh: &Shared,
) -> Option<Frame> {
    let stop = || sh.stop.load(Ordering::SeqCst);
    let mut lim = proto::opening_limits(deadline, max_payload);
    lim.frame_timeout = lim.frame_timeout.min(sh.opts.frame_timeout);
    match proto::read_frame_with(reader, &lim, &stop) {
        Ok(f) if f.version != proto::VERSION => {
            let msg = format!(
                "coordinator speaks protocol v{}, client sent v{}",
                proto::VERSION,
                f.version
            );
            tracing::warn!(target: LOG, "coordinator: dropping {peer}: {msg}");
            refuse(writer, peer, &msg);
            None
        }
        Ok(f) => Some(f),
        Err(FrameError::Stopped) => None,
        Err(FrameError::Closed) => {
            tracing::debug!(target: LOG, "coordinator: {peer} closed without registering");
            None
        }
        Err(FrameError::Idle) | Err(FrameError::Stalled { .. }) => {
            tracing::warn!(target: LOG,
                "coordinator: dropping {peer}: handshake not complete within {:.1} s",
                sh.opts.handshake_timeout.as_secs_f64());
            None
        }
        Err(e @ FrameError::Oversize { .. }) => {
            tracing::warn!(target: LOG, "coordinator: dropping {peer}: {e}");
            refuse(writer, peer, &e.to_string());
            None
        }
        Err(e) => {
            tracing::warn!(target: LOG, "coordinator: dropping {peer}: {e}");
            None
        }
    }
}

/// Makes sure the next member id is durable before a transition hands it out: when no
/// persisted id is left, the state file is written now, under the state lock (the
/// persister's write-ahead makes this rare).
fn reserve_ids(sh: &Shared, st: &mut State) -> std::result::Result<(), Refusal> {
    if st.ids_short() {
        if let Err(e) = persist_now(sh, st) {
            return Err((format!("coordinator cannot persist its state: {e}"), None));
        }
    }
    Ok(())
}

/// Switches `writer` to queued mode (its writes never block from now on) and writes the
/// acknowledgement of member `id` to it.
fn write_ack(
    sh: &Shared,
    writer: &Link,
    peer: SocketAddr,
    id: u64,
    ack: &[u8],
) -> std::io::Result<()> {
    writer.go_queued(sh.opts.max_queued, format!("member {id} ({peer})"));
    writer.send(ack, WRITE_TIMEOUT)
}

/// Registers a member on connection `key` ([`coord_state::register`]); returns its id and
/// group. The acknowledgement is written under the state lock, without blocking, so that it
/// precedes every view the member is sent. `Err`: the refusal.
fn register(
    sh: &Shared,
    reg: Registration,
    peer: SocketAddr,
    key: u64,
    writer: &Arc<Link>,
    proof: Option<String>,
) -> std::result::Result<(u64, String), Refusal> {
    let mut st = lock(&sh.state);
    reserve_ids(sh, &mut st)?;
    let mut ack = |id: u64, b: &[u8]| write_ack(sh, writer, peer, id, b);
    let res = coord_state::register(&mut st, reg, key, peer, proof, Instant::now(), &mut ack);
    match res {
        Ok((id, group, publish)) => {
            queue(sh, &mut st, publish);
            Ok((id, group))
        }
        Err(refusal) => {
            // An id may have been spent (and a reservation raised).
            queue(sh, &mut st, Vec::new());
            Err(refusal)
        }
    }
}

/// A member reconnecting on connection `key` ([`coord_state::rejoin`]; the acknowledgement is
/// written as in [`register`]).
fn rejoin(
    sh: &Shared,
    rj: &proto::Rejoin,
    peer: SocketAddr,
    key: u64,
    writer: &Arc<Link>,
    hs: &Handshake,
    client_nonce: &str,
) -> std::result::Result<(), Refusal> {
    let outs = {
        let mut st = lock(&sh.state);
        let mut ack = |id: u64, b: &[u8]| write_ack(sh, writer, peer, id, b);
        let fx = coord_state::rejoin(
            &mut st,
            rj,
            key,
            peer,
            hs,
            client_nonce,
            Instant::now(),
            &mut ack,
        )?;
        queue(sh, &mut st, fx.publish);
        fx.now
    };
    run(sh, outs, None);
    Ok(())
}

/// Member `id`'s connection `key` ended ([`coord_state::depart`]); nothing changes while the
/// service shuts down (the membership stays as it is, and as persisted, for a restart).
fn depart(sh: &Shared, id: u64, group: &str, peer: SocketAddr, key: u64, polite: bool) {
    let mut st = lock(&sh.state);
    if sh.stop.load(Ordering::SeqCst) {
        return;
    }
    let publish = coord_state::depart(&mut st, id, group, peer, key, polite, Instant::now());
    queue(sh, &mut st, publish);
}

/// Heartbeat timeouts and batching windows ([`coord_state::tick`]), every [`TICK`].
fn tick_loop(sh: Arc<Shared>) {
    while !sh.stop.load(Ordering::SeqCst) {
        std::thread::sleep(TICK);
        let now = Instant::now();
        let outs = {
            let mut st = lock(&sh.state);
            let fx = coord_state::tick(&mut st, now);
            queue(&sh, &mut st, fx.publish);
            fx.now
        };
        run(&sh, outs, None);
    }
}

/// Writes a snapshot to the state file (temporary file + rename, so a crash never leaves half
/// a file; mode 0600: it holds the members' secrets), unless a later snapshot was written
/// already. Then ids below its high-water mark are covered (the caller tells the state:
/// [`State::note_durable`]; not here, where the state lock may not be taken).
fn write_snapshot(sh: &Shared, gen: u64, doc: &Persisted) -> std::io::Result<()> {
    let Some(path) = &sh.opts.state_file else {
        return Ok(());
    };
    let bytes = serde_json::to_vec(doc).map_err(std::io::Error::other)?;
    let mut written = lock(&sh.written_gen);
    if *written >= gen {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, &bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    *written = gen;
    Ok(())
}

/// Writes the state file now, under the state lock (only when no persisted id is left to
/// hand out, which the persister's write-ahead makes rare).
fn persist_now(sh: &Shared, st: &mut State) -> std::io::Result<()> {
    if sh.opts.state_file.is_none() {
        return Ok(());
    }
    let (gen, doc) = snapshot(st);
    write_snapshot(sh, gen, &doc)?;
    st.note_durable(doc.id_high_water);
    Ok(())
}

/// Hands what a transition produced to the persister thread: its views, which the
/// persister sends once the state that produced them is on disk (at once without a state
/// file), and the state's dirty flag (the persister writes the state file, one write for
/// every change before it). Call with the state lock held, right after the transition, so
/// that frames go out in the order of the changes that made them.
fn queue(sh: &Shared, st: &mut State, publish: Publish) {
    let dirty = st.take_dirty() && sh.opts.state_file.is_some();
    if publish.is_empty() && !dirty {
        return;
    }
    {
        let mut w = lock(&sh.work);
        w.dirty |= dirty;
        w.publish.extend(publish);
    }
    sh.work_cv.notify_one();
}

/// The persister: writes the state file when it changed (one write for any number of
/// changes, off the state lock) and then sends the frames queued before the write, so a
/// member never sees a view that a restarted coordinator would not know. Sends never block
/// (registered members' connections are in queued mode).
fn persist_loop(sh: Arc<Shared>) {
    loop {
        let (dirty, publish, stopping) = {
            let mut w = lock(&sh.work);
            while !w.dirty && w.publish.is_empty() && !sh.stop.load(Ordering::SeqCst) {
                w = sh
                    .work_cv
                    .wait_timeout(w, Duration::from_secs(1))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            (
                std::mem::take(&mut w.dirty),
                std::mem::take(&mut w.publish),
                sh.stop.load(Ordering::SeqCst),
            )
        };
        if dirty {
            let (gen, doc) = snapshot(&mut lock(&sh.state));
            match write_snapshot(&sh, gen, &doc) {
                Ok(()) => lock(&sh.state).note_durable(doc.id_high_water),
                Err(e) => {
                    tracing::error!(target: LOG, "coordinator: cannot persist its state: {e}")
                }
            }
        }
        if !stopping {
            // The connections, by key (one look-up of the table for the whole batch).
            let links: Vec<Option<Arc<Link>>> = {
                let conns = lock(&sh.conns);
                publish
                    .iter()
                    .map(|o| conns.get(&o.conn()).map(|(l, _)| Arc::clone(l)))
                    .collect()
            };
            for (o, link) in publish.into_iter().zip(links) {
                match (o, link) {
                    (Out::Send { peer, frame, .. }, Some(l)) => {
                        if let Err(e) = l.send(&frame, WRITE_TIMEOUT) {
                            tracing::info!(target: LOG, "coordinator: cannot send a view to {peer}: {e}");
                        }
                    }
                    (Out::Send { peer, .. }, None) => {
                        tracing::info!(target: LOG, "coordinator: cannot send a view to {peer}: connection closed");
                    }
                    (Out::Close { .. }, Some(l)) => l.close(),
                    (Out::Close { .. }, None) => {}
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// Reads the state file, if any: ids continue above the high-water mark; each group's view is
/// restored with its members waiting to reconnect (each has its heartbeat timeout to do so).
fn load_state(opts: &CoordinatorOptions) -> Result<State> {
    let Some(path) = &opts.state_file else {
        return Ok(State::new(false));
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::new(false)),
        Err(e) => {
            return Err(Error::System(format!(
                "coordinator state file {}: {e}",
                path.display()
            )))
        }
    };
    let st = state_from_bytes(Some(&bytes), Instant::now()).map_err(|e| {
        Error::System(format!(
            "coordinator state file {} is not valid: {e}",
            path.display()
        ))
    })?;
    tracing::info!(target: LOG, "coordinator: state restored from {}; ids continue at {}", path.display(), st.next_id);
    Ok(st)
}

/// The status document (see [`Coordinator::status`]).
fn status_json(sh: &Shared) -> serde_json::Value {
    coord_state::status_json(&lock(&sh.state), Instant::now())
}
