//! braid byte transports.
//!
//! A transport moves tagged messages between two endpoints. It is small and non-blocking, in
//! the shape of NCCL's `ncclNet_t`:
//!
//! * [`Transport::devices`] lists what the transport can use,
//! * [`Transport::listen`] opens a [`Listener`] and returns the [`ConnectHandle`] (a small
//!   versioned blob: magic, version, addresses) that the rendezvous carries to peers,
//! * [`Transport::connect_challenged`] and [`Listener::accept_challenged`] make a [`Conn`]: the
//!   acceptor sends a fresh [`Challenge`] first, the connector's hello answers it,
//! * [`Transport::register`] registers a memory region (a no-op for tcp),
//! * [`Conn::isend`] / [`Conn::irecv`] post tagged operations and return a [`Request`] or
//!   `None` ("not now": backpressure is a value, not an error), [`Conn::test`] asks whether a
//!   request completed, [`Conn::progress`] moves bytes, [`Conn::peek`] shows the next incoming
//!   message's header before a receive is posted for it (so that the layer above can match
//!   receives by tag, or from any source),
//! * connections close when dropped.
//!
//! Messages on one connection are matched in order: the n-th message sent is received by the
//! n-th receive posted on the other side. The receiver states the tag and the exact length it
//! expects; a message that differs is reported ([`NetError::Mismatch`]) with the sender's
//! [`Meta`] so that the layer above can say what the peer was doing. Nothing here knows about
//! collectives, ranks or membership.

use std::os::fd::RawFd;

pub mod cma;
#[cfg(test)]
mod conformance;
#[doc(hidden)]
pub mod fuzzing;
pub mod handle;
pub mod ib;
pub mod mem;
pub mod region;
mod reqs;
pub mod shm;
pub mod tcp;

pub use handle::ConnectHandle;

/// Number of opaque bytes a sender attaches to every message (like an RDMA immediate, larger).
pub const META_LEN: usize = 32;

/// Opaque bytes that travel with every message; the layer above encodes what it needs.
pub type Meta = [u8; META_LEN];

/// Errors of a transport.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    /// An operating-system call failed.
    #[error("{op}: {msg}")]
    Io {
        /// What was being done.
        op: String,
        /// The OS error text.
        msg: String,
    },
    /// The peer went away: connection reset or closed without a goodbye.
    #[error("connection lost: {0}")]
    Lost(String),
    /// The peer closed the connection cleanly (sent a goodbye) while something was expected.
    #[error("peer closed the connection: {0}")]
    Closed(String),
    /// The peer sent an abort notice with this reason.
    #[error("peer aborted: {0}")]
    PeerAborted(String),
    /// The incoming message does not match the posted receive (tag or length).
    #[error("message mismatch: expected tag {expected_tag} len {expected_len}, got tag {got_tag} len {got_len}")]
    Mismatch {
        /// Tag the receiver posted.
        expected_tag: u64,
        /// Length the receiver posted.
        expected_len: u64,
        /// Tag on the wire.
        got_tag: u64,
        /// Length on the wire.
        got_len: u64,
        /// The sender's meta bytes.
        meta: Meta,
    },
    /// Bytes on the wire that are not this protocol (bad magic, version, truncated frame).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A connect or accept did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The transport cannot be used here (no device, unsupported pointer kind, ...).
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl NetError {
    pub(crate) fn io(op: impl Into<String>, e: std::io::Error) -> Self {
        NetError::Io {
            op: op.into(),
            msg: e.to_string(),
        }
    }
}

/// Result type of this crate.
pub type NetResult<T> = Result<T, NetError>;

/// Which pointers a device accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PtrSupport {
    /// Host memory.
    pub host: bool,
    /// CUDA device memory.
    pub cuda: bool,
}

/// Properties of one device of a transport.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceProps {
    /// Device name (interface name for tcp).
    pub name: String,
    /// Link speed in Mbit/s, 0 when unknown.
    pub speed_mbps: u64,
    /// Typical one-way latency in microseconds, 0 when unknown.
    pub latency_us: f64,
    /// Which pointers `isend`/`irecv` accept.
    pub ptr_support: PtrSupport,
}

/// An opaque registration of a memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemHandle {
    /// Transport-specific key (0 for transports that need no registration).
    pub key: u64,
}

/// A file descriptor to wait on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollFd {
    /// The descriptor.
    pub fd: RawFd,
    /// Whether readability means progress is possible.
    pub read: bool,
    /// Whether writability means progress is possible.
    pub write: bool,
}

/// A posted operation on a [`Conn`]. Requests of one direction complete in posting order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// True for a send, false for a receive.
    pub send: bool,
    /// Position in that direction's posting order.
    pub seq: u64,
}

/// A completed receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Bytes transferred.
    pub len: usize,
    /// The sender's meta bytes (zero for a send completion).
    pub meta: Meta,
}

/// The header of the next incoming message, seen by [`Conn::peek`] before any receive takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peeked {
    /// The sender's tag.
    pub tag: u64,
    /// The message's length in bytes.
    pub len: u64,
    /// The sender's meta bytes.
    pub meta: Meta,
}

/// A byte transport.
pub trait Transport: Send + Sync {
    /// Short name ("tcp", "mem", ...).
    fn name(&self) -> &'static str;
    /// Devices usable by this transport; an empty list means it cannot be used here.
    fn devices(&self) -> NetResult<Vec<DeviceProps>>;
    /// Starts listening on device `dev`; the handle tells peers how to connect.
    fn listen(&self, dev: usize) -> NetResult<(Box<dyn Listener>, ConnectHandle)>;
    /// Connects to the listener behind `handle`: reads the acceptor's [`Challenge`], then
    /// sends the hello that `hello` builds from it. Blocks until connected or `deadline`.
    /// The hello is at most 4 KiB.
    fn connect_challenged(
        &self,
        handle: &ConnectHandle,
        hello: HelloFn<'_>,
        deadline: std::time::Instant,
    ) -> NetResult<Box<dyn Conn>>;
    /// As [`Transport::connect_challenged`], but while the peer's listener refuses
    /// connections (not listening yet, or gone) it asks `give_up` between attempts and stops
    /// with [`NetError::Timeout`] when that returns true, instead of retrying until
    /// `deadline`: the caller's idea of the peer may be stale (a newer membership view has
    /// dropped it). The default asks once, before connecting.
    fn connect_or_give_up(
        &self,
        handle: &ConnectHandle,
        hello: HelloFn<'_>,
        deadline: std::time::Instant,
        give_up: &dyn Fn() -> bool,
    ) -> NetResult<Box<dyn Conn>> {
        if give_up() {
            return Err(NetError::Timeout("gave up before connecting".into()));
        }
        self.connect_challenged(handle, hello, deadline)
    }
    /// Registers a memory region for zero-copy transfers (a no-op for transports that do not
    /// need it). The region must stay valid until deregistered.
    fn register(&self, _ptr: *const u8, _len: usize) -> NetResult<MemHandle> {
        Ok(MemHandle { key: 0 })
    }
    /// Releases a registration.
    fn deregister(&self, _mh: MemHandle) -> NetResult<()> {
        Ok(())
    }
}

/// Length of the challenge an acceptor sends first on every new connection.
pub const CHALLENGE_LEN: usize = 16;

/// A fresh random challenge the acceptor sends before anything else; the connector's hello
/// answers it (the layer above MACs it), so a captured hello cannot be replayed.
pub type Challenge = [u8; CHALLENGE_LEN];

/// Builds the connector's hello (at most 4 KiB) from the acceptor's challenge.
pub type HelloFn<'a> = &'a (dyn Fn(&Challenge) -> Vec<u8> + Sync);

/// A check of a hello against the challenge it answers, run by the listener BEFORE it commits
/// anything to the peer (the shm transport maps a peer's segment only after it passes).
/// The arguments: the challenge sent, the hello received, and the connecting process's pid
/// where the transport knows it (SO_PEERCRED for shm; `None` for tcp). An `Err(reason)` drops
/// the connection with one log line naming the peer and the reason.
pub type HelloCheck = Box<dyn Fn(&Challenge, &[u8], Option<u32>) -> Result<(), String> + Send>;

/// A connection just accepted by [`Listener::accept_challenged`].
pub struct Arrival {
    /// The connection.
    pub conn: Box<dyn Conn>,
    /// The hello bytes its connector sent in answer to `challenge`.
    pub hello: Vec<u8>,
    /// The challenge this listener sent on this connection (fresh, random).
    pub challenge: Challenge,
    /// The connecting process's pid, where the transport knows it (SO_PEERCRED on local
    /// sockets); `None` otherwise.
    pub peer_pid: Option<u32>,
}

/// Random bytes from the kernel (getrandom), for challenges and nonces. Falls back to
/// /dev/urandom; fails only when neither is usable.
pub fn random_bytes(out: &mut [u8]) -> NetResult<()> {
    let mut done = 0;
    while done < out.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `out`.
        let n = unsafe {
            libc::getrandom(
                out[done..].as_mut_ptr() as *mut libc::c_void,
                out.len() - done,
                0,
            )
        };
        if n > 0 {
            done += n as usize;
            continue;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        use std::io::Read;
        return std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut out[done..]))
            .map_err(|e| NetError::io("reading random bytes", e));
    }
    Ok(())
}

/// A fresh random challenge.
pub fn new_challenge() -> NetResult<Challenge> {
    let mut c = [0u8; CHALLENGE_LEN];
    random_bytes(&mut c)?;
    Ok(c)
}

/// A listening endpoint.
pub trait Listener: Send {
    /// Non-blocking accept with challenge–response: the listener sends every new connection a
    /// fresh [`Challenge`] first, reads the hello that answers it (within a deadline; a cap
    /// bounds how many such connections wait at once), runs the [`HelloCheck`] if one is set,
    /// and returns the connection with its hello and challenge. Connections from strangers
    /// (bad magic, version, truncated or oversized hello, failed check) are dropped with a log
    /// line and never returned.
    fn accept_challenged(&mut self) -> NetResult<Option<Arrival>>;
    /// Installs a check run on every hello before the connection is returned (and, for
    /// transports that map peer memory, before anything is mapped). Default: ignored.
    fn set_hello_check(&mut self, check: HelloCheck) {
        let _ = check;
    }
    /// A file descriptor that becomes readable when `accept_challenged` may make progress, if
    /// any.
    fn fd(&self) -> Option<RawFd>;
}

/// One connection to a peer: ordered, tagged, bidirectional messages.
pub trait Conn: Send {
    /// Posts a send of `len` bytes at `buf` with `tag` and `meta`. Returns `Ok(None)` when the
    /// connection cannot take more posted work now (call [`Conn::progress`] and retry).
    ///
    /// # Safety
    /// `buf..buf+len` must be readable and must not be written until the request completed
    /// (per [`Conn::test`]) or the connection is dropped.
    unsafe fn isend(
        &mut self,
        tag: u64,
        meta: &Meta,
        buf: *const u8,
        len: usize,
    ) -> NetResult<Option<Request>>;

    /// Posts a receive of exactly `len` bytes with `tag` into `buf`. Returns `Ok(None)` when the
    /// connection cannot take more posted work now.
    ///
    /// # Safety
    /// `buf..buf+len` must be writable and not accessed by anyone else until the request
    /// completed or the connection is dropped.
    unsafe fn irecv(&mut self, tag: u64, buf: *mut u8, len: usize) -> NetResult<Option<Request>>;

    /// As [`Conn::irecv`], with a hint about the destination: `stream` says that the received
    /// bytes are not read again soon (a large result buffer), so a transport that copies may
    /// write them past the cache; `!stream` says that they are (a staging buffer reduced at
    /// once), so it should not. Plain [`Conn::irecv`] lets the transport decide by `len`.
    /// Default: [`Conn::irecv`].
    ///
    /// # Safety
    /// As [`Conn::irecv`].
    unsafe fn irecv_hint(
        &mut self,
        tag: u64,
        buf: *mut u8,
        len: usize,
        stream: bool,
    ) -> NetResult<Option<Request>> {
        let _ = stream;
        // SAFETY: the caller's contract is irecv's.
        unsafe { self.irecv(tag, buf, len) }
    }

    /// Moves bytes for every posted request; returns whether anything moved. Errors are sticky.
    fn progress(&mut self) -> NetResult<bool>;

    /// Whether [`Conn::peek`] works on this connection (every transport of this crate's
    /// does; default false).
    fn can_peek(&self) -> bool {
        false
    }

    /// The tag, length and meta of the next incoming message, once its header has arrived,
    /// without taking it: the message stays first in line for the next receive posted. Only
    /// answers while no receive is posted on this connection (`Ok(None)` otherwise, and while
    /// the header has not arrived). Reads ahead as [`Conn::progress`] does, so a connection's
    /// errors are reported here too. After a `None`, waiting on [`Conn::poll_fds`] wakes when
    /// a header arrives. Default: `Ok(None)` (see [`Conn::can_peek`]).
    fn peek(&mut self) -> NetResult<Option<Peeked>> {
        Ok(None)
    }

    /// Whether `req` completed (does not call `progress`). A receive completion carries the
    /// sender's meta.
    fn test(&mut self, req: Request) -> NetResult<Option<Completion>>;

    /// Number of posted requests not yet completed.
    fn pending(&self) -> usize;

    /// File descriptors to wait on and the readiness that matters now. Nothing is pushed when
    /// the connection cannot be waited on through file descriptors (in-process transport).
    /// Hang-ups and errors matter always (the caller polls for them even when `read` is false).
    fn poll_fds(&self, out: &mut Vec<PollFd>);

    /// Best effort: tells the peer that this side aborts, with a reason, and stops all I/O.
    fn abort(&mut self, reason: &str);

    /// Best effort: tells the peer that this side closes cleanly.
    fn goodbye(&mut self);

    /// A short description of the remote end (address), for error messages.
    fn peer_desc(&self) -> String;

    /// Bytes sent and received over this connection so far (payload only).
    fn bytes(&self) -> (u64, u64);

    /// Payload bytes sent and received so far by single-copy transfers, which the receiver
    /// copied straight out of the sender's registered memory ([`region`]); these are not
    /// counted by [`Conn::bytes`]. Default: none.
    fn direct_bytes(&self) -> (u64, u64) {
        (0, 0)
    }

    /// Whether a rank waiting on this connection should yield the CPU between looks rather
    /// than spin or block at once: the peer is a process on this host, and this host runs more
    /// such processes than there are CPUs for them, so a spinning waiter keeps off the CPU the
    /// very peer it waits for, and a blocked one pays a full wake-up. Default: false.
    fn oversubscribed(&self) -> bool {
        false
    }

    /// Event-driven use: the caller promises to call [`Conn::progress`] after posting, and to
    /// wait on [`Conn::poll_fds`] (asked afresh each time) whenever a round of calls moved
    /// nothing. The connection may then hold the writes of [`Conn::isend`] until the next
    /// `progress` (messages posted back to back go out in one system call), and skip reading a
    /// socket that came up empty until `poll_fds` is asked again (no read that can only say
    /// "nothing yet"). Default: ignored.
    fn set_event_driven(&mut self, _on: bool) {}

    /// Whether [`Conn::isend`] and [`Conn::flush`] never read from the connection, so that a
    /// thread may post and write a message while the thread that receives waits on
    /// [`Conn::poll_fds`] (a read there could take data that the waiting thread then never
    /// hears of). Default: false.
    fn writes_apart(&self) -> bool {
        false
    }

    /// Writes what was posted, as far as the connection takes it now, without reading; whether
    /// anything moved. Default: nothing (see [`Conn::writes_apart`]).
    fn flush(&mut self) -> NetResult<bool> {
        Ok(false)
    }
}

/// Waits until one of `fds` is ready (per its `read`/`write` flags; hang-ups and errors always
/// count) or `timeout` passes. Returns whether any descriptor is ready. Interrupted waits count
/// as ready (the caller re-checks everything anyway).
pub fn wait_fds(
    fds: &[PollFd],
    timeout: std::time::Duration,
    scratch: &mut Vec<libc::pollfd>,
) -> NetResult<bool> {
    scratch.clear();
    for p in fds {
        let mut ev = libc::POLLRDHUP;
        if p.read {
            ev |= libc::POLLIN;
        }
        if p.write {
            ev |= libc::POLLOUT;
        }
        scratch.push(libc::pollfd {
            fd: p.fd,
            events: ev,
            revents: 0,
        });
    }
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: the pointer and length describe `scratch`, a live, initialised vector of pollfd.
    let n = unsafe { libc::poll(scratch.as_mut_ptr(), scratch.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(true);
        }
        return Err(NetError::io("poll", e));
    }
    Ok(n > 0)
}
