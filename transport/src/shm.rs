//! Shared-memory transport for peers on the same host.
//!
//! One connection = one anonymous shared segment (`memfd_create`, never a file on disk) and
//! one Unix `SOCK_SEQPACKET` socket. The listener binds an abstract-namespace socket name
//! (nothing is left on disk when a process dies); the connector creates the segment and two
//! eventfds and hands them over with `SCM_RIGHTS` together with its hello. The socket then stays
//! open for the connection's life: its hang-up means the peer process is gone.
//!
//! Segment layout: a header page (magic, version, ring size), one control page per side, then
//! two single-producer single-consumer byte rings (side 0 → side 1, side 1 → side 0). The
//! connector picks the ring size ([`ShmOptions::ring_bytes`]); the acceptor takes it from the
//! hello and the header, checked against the segment's real length. The segment is mapped
//! without `MAP_POPULATE`: ring pages are allocated as messages first reach them. Side `s`'s
//! control page holds, each on its own 128-byte line: the head of ring `s` (bytes published by
//! side `s`), the tail of ring `s` (bytes consumed by the other side), side `s`'s "waiting"
//! flag, its state (open, goodbye, abort) and its abort reason.
//!
//! A message is a 64-byte frame header (magic, tag, length, 32 meta bytes) followed by the
//! payload, both written with wrap-around at any byte offset. Large payloads stream through the
//! ring in chunks (`chunk_bytes`): the sender publishes its head after each chunk so that the
//! receiver copies out while the sender copies in (a pipelined two-copy path).
//! A frame that finds the ring drained and fits before the write position is written at the
//! start of the ring instead, behind a padding frame (`BRDP`, its length running exactly to the
//! ring's end): small messages keep cycling through the first pages of the ring, which the
//! lazy mapping then never grows beyond.
//!
//! Waiting: before the executor blocks in `poll(2)` it asks [`Conn::poll_fds`]; this spins for
//! `spin`, then sets the side's "waiting" flag and re-checks the rings (a ready ring signals its
//! own eventfd so the poll returns at once). A side that publishes head or tail checks the
//! peer's flag afterwards and writes the peer's eventfd when it is set. Both use sequentially
//! consistent fences, so one of the two always sees the other. On an oversubscribed host (more
//! same-host ranks than CPUs, [`ShmOptions::oversubscribed`]) `poll_fds` does not spin: the
//! caller yields the CPU between looks instead ([`Conn::oversubscribed`]), since a spinning
//! waiter keeps the peer it waits for off the CPU.
//!
//! Single copy: a send of at least [`ShmOptions::direct_min`] bytes (never below the ring
//! size, so that no send that could complete through the ring alone now waits for the receiver)
//! whose buffer lies in a region registered with the transport's [`Regions`] travels as a
//! "direct" frame: the header is followed by a [`RegionDesc`] instead of the payload. The
//! receiver maps the sender's region (cached, [`RemoteMaps`]), copies the payload straight into
//! the posted receive, and acknowledges on its control page (`DACK`: count of direct frames it
//! finished, low bit = copied). The send completes at the acknowledgement; until then no later
//! frame of this side is written. When the receiver cannot map the region it acknowledges
//! with the low bit clear and the sender streams the payload through the ring as usual, so the
//! receive is matched by the next frame (one log line; never a wrong result).
//!
//! Goodbye and abort set the side's state (abort also writes the reason into the segment),
//! signal the peer and shut the socket down; a peer that dies without either is seen as a
//! socket hang-up and reported as [`NetError::Lost`].
//!
//! Strangers: any process of the host can connect to an abstract socket (the names are listed
//! in `/proc/net/unix`), and a peer can write anything into the shared segment. So:
//! - the listener refuses a connector of another uid at once (`SO_PEERCRED`, with a log line
//!   naming its pid and uid), sends every other one a fresh random challenge, and keeps at
//!   most 128 connections waiting for their hello (10 s each); the connector
//!   likewise talks only to a listener of its own uid;
//! - the hello answers the challenge and the [`HelloCheck`] (the job-token MAC, above) runs
//!   BEFORE anything the peer passed is mapped;
//! - only a sealed memfd (`F_SEAL_SHRINK | F_SEAL_GROW`) of exactly the stated size is
//!   mapped: the peer cannot truncate it under the mapping (which would kill this process
//!   with SIGBUS); segments and regions made here are sealed so (with `F_SEAL_SEAL`); the
//!   passed eventfds must be eventfds (made non-blocking);
//! - every index read from the segment (heads, tails, direct-frame acknowledgements) is
//!   checked: it moves only forward and stays within a ring of the other index; anything else
//!   is a [`NetError::Protocol`] naming the peer, never an out-of-bounds copy or a panic;
//! - a direct frame is mapped only from the peer's own process (its `SO_PEERCRED` pid) and
//!   only from a sealed region ([`crate::region`]), else it falls back to the ring.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::region::{RegionDesc, Regions, RemoteMaps, DESC_LEN};
use crate::reqs::ReqTable;
use crate::{
    Arrival, Challenge, Completion, Conn, ConnectHandle, DeviceProps, HelloCheck, HelloFn,
    Listener, Meta, NetError, NetResult, Peeked, PollFd, PtrSupport, Request, Transport,
    CHALLENGE_LEN, META_LEN,
};

const SEG_MAGIC: u64 = u64::from_le_bytes(*b"BRDSHM01");
const HELLO_MAGIC: [u8; 4] = *b"BRDS";
const FRAME_MAGIC: [u8; 4] = *b"BRDM";
const DIRECT_MAGIC: [u8; 4] = *b"BRDD";
/// A padding frame: the writer skipped to the start of its ring (see [`ShmConn::progress_tx`]).
const PAD_MAGIC: [u8; 4] = *b"BRDP";
/// Bytes after a direct frame's header (a [`RegionDesc`], padded).
const DBODY: usize = 64;
/// Version of the shared-memory protocol (2: direct frames and the `DACK` word).
pub const PROTO_VERSION: u16 = 3;
const HDR: usize = 64;
const PAGE: usize = 4096;
const OFF_HEAD: usize = 0;
const OFF_TAIL: usize = 128;
const OFF_WAIT: usize = 256;
const OFF_STATE: usize = 384;
const OFF_RLEN: usize = 512;
const OFF_DACK: usize = 640;
const OFF_REASON: usize = 1024;
const MAX_REASON: usize = PAGE - OFF_REASON;
const RINGS: usize = 3 * PAGE;
const ST_BYE: u64 = 1;
const ST_ABORT: u64 = 2;
const HELLO_FIXED: usize = 28;
const MAX_HELLO: usize = 4096;
const MAX_POSTED: usize = 4096;
const NFDS: usize = 3;
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most accepted connections that may wait for their hello at once (more are closed at once).
const MAX_PENDING: usize = 128;
/// The acceptor's first message on every connection: this magic and a fresh [`Challenge`].
const CHAL_MAGIC: [u8; 4] = *b"BRDC";
const CHAL_MSG: usize = 4 + CHALLENGE_LEN;
/// Receives of at least this many bytes posted with plain `irecv` go past the cache (the copy
/// out of the ring uses non-temporal stores), like glibc's memcpy does for large copies: at this
/// size the destination does not stay in cache anyway, and the stores skip reading it first.
const NT_MIN_MSG: usize = 4 << 20;
/// Receives smaller than this never use non-temporal stores, whatever the hint.
const NT_MIN_COPY: usize = 16 << 10;
/// How often a busy connection checks its socket for a hang-up.
const SOCK_CHECK: Duration = Duration::from_millis(1);

/// Options of the shared-memory transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShmOptions {
    /// Bytes of each of the two rings of a connection. Only the connecting side's value counts:
    /// it creates the segment and states the size in its hello and in the segment header; the
    /// accepting side uses that size (checked against the sealed memfd's real length before it
    /// maps anything), whatever its own option says. Ring pages are mapped lazily (touched as
    /// messages flow), so an idle connection costs about three pages of memory.
    pub ring_bytes: usize,
    /// Largest copy between two publications of a ring index (pipelining unit).
    pub chunk_bytes: usize,
    /// How long `poll_fds` spins on the rings before the caller blocks in `poll(2)`.
    pub spin: Duration,
    /// Whether this host runs more ranks than there are CPUs for them ([`Conn::oversubscribed`]:
    /// waiters yield instead of spinning). `None` decides it from the connections: with every
    /// same-host pair connected (a full mesh), a process with `k` open shm connections shares
    /// the host with `k` other ranks, compared with the CPUs this process may run on.
    pub oversubscribed: Option<bool>,
    /// Sends of at least this many bytes (and at least `ring_bytes`) from a registered region
    /// go single-copy (see the module docs). `usize::MAX`: never.
    pub direct_min: usize,
}

impl Default for ShmOptions {
    fn default() -> Self {
        ShmOptions {
            ring_bytes: 4 << 20,
            chunk_bytes: 256 << 10,
            spin: Duration::from_micros(20),
            oversubscribed: None,
            direct_min: usize::MAX,
        }
    }
}

/// What the connections of one transport know about the load of the host.
#[derive(Debug)]
struct Load {
    /// Open connections made by this transport (other same-host ranks in a full mesh).
    live: AtomicUsize,
    /// CPUs this process may run on.
    cpus: usize,
    /// [`ShmOptions::oversubscribed`].
    force: Option<bool>,
}

impl Load {
    fn oversubscribed(&self) -> bool {
        self.force
            .unwrap_or_else(|| self.live.load(Ordering::Relaxed) + 1 > self.cpus)
    }
}

/// Counts one open connection in its transport's [`Load`] while it lives.
struct LiveGuard(Arc<Load>);

impl LiveGuard {
    fn new(load: &Arc<Load>) -> LiveGuard {
        load.live.fetch_add(1, Ordering::Relaxed);
        LiveGuard(load.clone())
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The shared-memory transport.
#[derive(Debug, Clone)]
pub struct ShmTransport {
    opts: ShmOptions,
    load: Arc<Load>,
    regions: Option<Arc<Regions>>,
}

impl ShmTransport {
    /// A shared-memory transport with these options.
    pub fn new(opts: ShmOptions) -> NetResult<ShmTransport> {
        if opts.ring_bytes < 2 * HDR || opts.ring_bytes > (1 << 30) {
            return Err(NetError::Unavailable(format!(
                "shm ring of {} bytes: expected 128 B ..= 1 GiB",
                opts.ring_bytes
            )));
        }
        if opts.chunk_bytes == 0 {
            return Err(NetError::Unavailable("shm chunk of 0 bytes".into()));
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let load = Arc::new(Load {
            live: AtomicUsize::new(0),
            cpus,
            force: opts.oversubscribed,
        });
        Ok(ShmTransport {
            opts,
            load,
            regions: None,
        })
    }

    /// As [`ShmTransport::new`], with single-copy sends from the regions of `regions` (see
    /// the module docs).
    pub fn with_regions(opts: ShmOptions, regions: Arc<Regions>) -> NetResult<ShmTransport> {
        let mut t = ShmTransport::new(opts)?;
        t.regions = Some(regions);
        Ok(t)
    }
}

fn last_err(op: &str) -> NetError {
    NetError::io(op, std::io::Error::last_os_error())
}

fn random_u64() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        if f.read_exact(&mut b).is_ok() {
            return u64::from_le_bytes(b);
        }
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ ((std::process::id() as u64) << 32)
}

/// A Unix socket address in the abstract namespace (leading NUL byte, no file).
fn abstract_addr(name: &[u8]) -> NetResult<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if name.is_empty() || name.len() + 1 > a.sun_path.len() {
        return Err(NetError::Protocol("bad shm socket name".into()));
    }
    for (i, &c) in name.iter().enumerate() {
        a.sun_path[i + 1] = c as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    Ok((a, len as libc::socklen_t))
}

fn new_socket(nonblock: bool) -> NetResult<OwnedFd> {
    let mut ty = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
    if nonblock {
        ty |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: plain system call without pointers.
    let fd = unsafe { libc::socket(libc::AF_UNIX, ty, 0) };
    if fd < 0 {
        return Err(last_err("socket(AF_UNIX)"));
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Bounds blocking sends and connects on `fd` by `deadline` (SO_SNDTIMEO; at least 1 ms).
fn send_deadline(fd: RawFd, deadline: Instant) -> NetResult<()> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let tv = libc::timeval {
        tv_sec: left.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_usec: left.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the option value points to a live timeval whose size is passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(last_err("setsockopt(SO_SNDTIMEO)"));
    }
    Ok(())
}

fn set_nonblocking(fd: RawFd) -> NetResult<()> {
    // SAFETY: fcntl on an open descriptor, no pointers.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(last_err("fcntl(O_NONBLOCK)"));
    }
    Ok(())
}

fn new_eventfd() -> NetResult<OwnedFd> {
    // SAFETY: plain system call without pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(last_err("eventfd"));
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd; failure (EAGAIN at the counter's
    // maximum) means it is already signalled.
    unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}

fn drain(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64; the eventfd is non-blocking.
    unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
}

/// The credentials (pid, uid, gid) of the process at the other end of the unix socket `fd`,
/// as the kernel recorded them at connect (SO_PEERCRED).
fn peer_cred(fd: RawFd) -> Option<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the option value points to a live ucred whose size is passed in `len`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some(cred)
}

/// This process's effective uid: the only user whose processes may connect.
fn my_uid() -> u32 {
    // SAFETY: plain system call without arguments.
    unsafe { libc::geteuid() }
}

/// Refuses a peer of another user (or of unknown credentials); `Ok` gives its pid.
fn check_cred(cred: Option<libc::ucred>, uid: u32) -> Result<u32, String> {
    match cred {
        None => Err("cannot read its credentials (SO_PEERCRED)".into()),
        Some(c) if c.uid != uid => Err(format!(
            "pid {} runs as uid {}, not as this process's uid {uid}",
            c.pid, c.uid
        )),
        Some(c) => Ok(c.pid as u32),
    }
}

/// The error for a value read from the shared segment that the protocol does not allow: the
/// peer wrote garbage into it (or something else did). Logged once here, naming the peer.
fn corrupt(desc: &str, what: String) -> NetError {
    tracing::warn!(target: "braid::shm", "{desc}: corrupt shared segment: {what}; closing the connection");
    NetError::Protocol(format!("{desc}: corrupt shared segment: {what}"))
}

/// Re-reads the consumer's tail of `side`'s ring (written by the peer) into `peer_tail`,
/// checking that it only moves forward and never passes what was published (`head`).
fn load_tail(seg: &Seg, side: usize, head: u64, peer_tail: &mut u64, desc: &str) -> NetResult<()> {
    let t = seg.atom(block(side) + OFF_TAIL).load(Ordering::Acquire);
    if t < *peer_tail || t > head {
        return Err(corrupt(
            desc,
            format!(
                "the peer's tail of our ring is {t}: expected {} ..= {head}",
                *peer_tail
            ),
        ));
    }
    *peer_tail = t;
    Ok(())
}

/// Re-reads the producer's head of `side`'s ring (written by the peer) into `peer_head`,
/// checking that it only moves forward and never runs more than a ring (`r`) ahead of what
/// this side consumed (`tail`).
fn load_head(
    seg: &Seg,
    side: usize,
    tail: u64,
    peer_head: &mut u64,
    r: u64,
    desc: &str,
) -> NetResult<()> {
    let h = seg.atom(block(side) + OFF_HEAD).load(Ordering::Acquire);
    if h < *peer_head || h < tail || h - tail > r {
        return Err(corrupt(
            desc,
            format!(
                "the head of the peer's ring is {h}: expected {} ..= {} (ring of {r} bytes)",
                (*peer_head).max(tail),
                tail.saturating_add(r)
            ),
        ));
    }
    *peer_head = h;
    Ok(())
}

/// A mapping of a connection's shared segment.
struct Seg {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; shared state inside it is accessed
// through atomics or through byte copies ordered by them, from whichever thread owns the Conn.
unsafe impl Send for Seg {}

impl Seg {
    /// Maps `len` bytes of the memfd `fd` lazily: no `MAP_POPULATE`, so a page of the rings is
    /// allocated (and counted in either process's RSS) only when a message first reaches it.
    /// Pages are only ever touched inside `len`, which the caller made or checked with fstat
    /// on a memfd sealed against shrinking, so a fault is never a SIGBUS.
    fn map(fd: RawFd, len: usize) -> NetResult<Seg> {
        // SAFETY: maps `len` bytes of the memfd `fd` (sized by the caller or checked with fstat);
        // the result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_err("mmap of the shm segment"));
        }
        Ok(Seg {
            base: p as *mut u8,
            len,
        })
    }

    /// The atomic u64 at byte offset `off` (8-aligned, inside the header or control pages).
    fn atom(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off % 8 == 0 && off + 8 <= RINGS);
        // SAFETY: `off` is a constant-derived, 8-aligned offset inside the first RINGS bytes of
        // a page-aligned mapping that lives as long as `self`; AtomicU64 has the layout of u64,
        // and the other process accesses these words only atomically too.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    fn ptr(&self, off: usize) -> *mut u8 {
        debug_assert!(off <= self.len);
        // SAFETY: off is inside the mapping (callers pass offsets below len).
        unsafe { self.base.add(off) }
    }
}

impl Drop for Seg {
    fn drop(&mut self) {
        // SAFETY: base/len describe a mapping made by Seg::map and not unmapped before.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// Publication protocol: after storing an index, wake `side` if it announced that it sleeps.
fn wake_if_waiting(seg: &Seg, side: usize, efd: RawFd) {
    fence(Ordering::SeqCst);
    if seg.atom(block(side) + OFF_WAIT).load(Ordering::Relaxed) != 0 {
        signal(efd);
    }
}

/// The error for a frame header `h` that does not match the posted receive (`tag`, `len`),
/// with the sender's meta; `None` when it matches.
fn mismatch(h: &[u8], tag: u64, len: usize) -> Option<NetError> {
    let (got_tag, got_len) = (u64_at(h, 8), u64_at(h, 16));
    if got_tag == tag && got_len == len as u64 {
        return None;
    }
    Some(NetError::Mismatch {
        expected_tag: tag,
        expected_len: len as u64,
        got_tag,
        got_len,
        meta: meta_of(h),
    })
}

/// The sender's meta bytes of frame header `h`.
fn meta_of(h: &[u8]) -> [u8; META_LEN] {
    let mut meta = [0u8; META_LEN];
    meta.copy_from_slice(&h[32..32 + META_LEN]);
    meta
}

/// Free bytes in `side`'s ring of `r` bytes written up to `head`, re-reading the consumer's
/// tail into `peer_tail` when fewer than `need` seem free; `None` when there are still fewer.
///
/// Errors: the tail read from the segment is out of range ([`load_tail`]).
fn room(
    seg: &Seg,
    side: usize,
    head: u64,
    peer_tail: &mut u64,
    r: u64,
    need: u64,
    desc: &str,
) -> NetResult<Option<u64>> {
    let mut free = r - (head - *peer_tail);
    if free < need {
        load_tail(seg, side, head, peer_tail, desc)?;
        free = r - (head - *peer_tail);
    }
    Ok((free >= need).then_some(free))
}

fn block(side: usize) -> usize {
    PAGE * (1 + side)
}

/// Copies `n` bytes from `src` into the ring of `r` bytes at `ring`, starting at stream
/// position `pos` (wrapping around).
///
/// # Safety
/// `ring` must be valid for `r` writable bytes, `src` for `n` readable bytes, `n <= r`, and the
/// ring bytes written must not be read concurrently (the SPSC indices guarantee it).
unsafe fn ring_write(ring: *mut u8, r: usize, pos: u64, src: *const u8, n: usize) {
    let off = (pos % r as u64) as usize;
    let first = n.min(r - off);
    // SAFETY: off + first <= r and n - first <= r, per the caller's contract.
    unsafe {
        std::ptr::copy_nonoverlapping(src, ring.add(off), first);
        if n > first {
            std::ptr::copy_nonoverlapping(src.add(first), ring, n - first);
        }
    }
}

/// Copies `n` bytes from `src` to `dst`; with `nt`, bypassing the cache for the destination
/// (non-temporal stores: no read-for-ownership of `dst`, no eviction of the ring), followed by
/// a store fence so that the bytes are visible before any later publication.
///
/// # Safety
/// As `std::ptr::copy_nonoverlapping`.
unsafe fn copy_out(dst: *mut u8, src: *const u8, n: usize, nt: bool) {
    if nt {
        // SAFETY: the caller's contract.
        unsafe { crate::region::stream_copy_raw(dst, src, n) };
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, n) };
    }
}

/// Copies `n` bytes out of the ring at stream position `pos` into `dst` (see [`copy_out`] for
/// `nt`).
///
/// # Safety
/// As [`ring_write`], with `dst` valid for `n` writable bytes.
unsafe fn ring_read(ring: *const u8, r: usize, pos: u64, dst: *mut u8, n: usize, nt: bool) {
    let off = (pos % r as u64) as usize;
    let first = n.min(r - off);
    // SAFETY: as in ring_write.
    unsafe {
        copy_out(dst, ring.add(off), first, nt);
        if n > first {
            copy_out(dst.add(first), ring, n - first, nt);
        }
    }
}

fn encode_hdr(tag: u64, len: u64, meta: &Meta) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[0..4].copy_from_slice(&FRAME_MAGIC);
    h[8..16].copy_from_slice(&tag.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    h[32..32 + META_LEN].copy_from_slice(meta);
    h
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(x)
}

struct Tx {
    tag: u64,
    meta: Meta,
    ptr: *const u8,
    len: usize,
    hdr_done: bool,
    done: usize,
    req: u64,
    /// Send single-copy: where the payload lives.
    direct: Option<RegionDesc>,
    /// The direct frame is written; waiting for the receiver's acknowledgement.
    awaiting: bool,
}

struct Rx {
    tag: u64,
    ptr: *mut u8,
    len: usize,
    /// Copy out with non-temporal stores ([`copy_out`]).
    nt: bool,
    got_hdr: bool,
    done: usize,
    req: u64,
}

/// One side of a shared-memory connection.
pub struct ShmConn {
    seg: Seg,
    side: usize,
    ring: usize,
    chunk: usize,
    spin: Duration,
    sock: OwnedFd,
    efd_me: OwnedFd,
    efd_peer: OwnedFd,
    /// Producer position in this side's ring, published and cached consumer tail.
    head: u64,
    head_pub: u64,
    peer_tail: u64,
    /// Consumer position in the peer's ring, published and cached producer head.
    tail: u64,
    tail_pub: u64,
    peer_head: u64,
    tx: VecDeque<Tx>,
    rx: VecDeque<Rx>,
    sends: ReqTable,
    recvs: ReqTable,
    error: Option<NetError>,
    closed_local: bool,
    bye_received: bool,
    peer_gone: bool,
    last_sock_check: Instant,
    /// Calls of `progress_inner` (see there).
    sock_tick: u32,
    bytes_tx: u64,
    bytes_rx: u64,
    desc: String,
    /// The peer's pid (SO_PEERCRED), where known: the only owner whose regions are mapped.
    peer_pid: Option<u32>,
    live: LiveGuard,
    regions: Option<Arc<Regions>>,
    direct_min: usize,
    remote: RemoteMaps,
    /// Direct frames written by this side / finished (acknowledged) by this side.
    dsent: u64,
    dacked: u64,
    direct_tx: u64,
    direct_rx: u64,
    direct_warned: bool,
    /// [`Conn::peek`] found no header and no receive is posted since: a published header
    /// makes the connection ready (see [`ShmConn::rx_ready`]).
    peeking: bool,
}

// SAFETY: the raw pointers in Tx/Rx point into buffers that the caller of isend/irecv promised
// to keep valid until completion, whichever thread drives the connection; Seg is Send.
unsafe impl Send for ShmConn {}

impl ShmConn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        seg: Seg,
        side: usize,
        ring: usize,
        opts: &ShmOptions,
        sock: OwnedFd,
        efd_me: OwnedFd,
        efd_peer: OwnedFd,
        desc: String,
        peer_pid: Option<u32>,
        load: &Arc<Load>,
        regions: Option<Arc<Regions>>,
    ) -> ShmConn {
        ShmConn {
            seg,
            side,
            ring,
            // A copy never spans more than the ring (ring_read/ring_write need n <= r).
            chunk: opts.chunk_bytes.min(ring),
            spin: opts.spin,
            sock,
            efd_me,
            efd_peer,
            head: 0,
            head_pub: 0,
            peer_tail: 0,
            tail: 0,
            tail_pub: 0,
            peer_head: 0,
            tx: VecDeque::new(),
            rx: VecDeque::new(),
            sends: ReqTable::default(),
            recvs: ReqTable::default(),
            error: None,
            closed_local: false,
            bye_received: false,
            peer_gone: false,
            last_sock_check: Instant::now(),
            sock_tick: 0,
            bytes_tx: 0,
            bytes_rx: 0,
            desc,
            peer_pid,
            live: LiveGuard::new(load),
            regions,
            direct_min: opts.direct_min.max(ring),
            remote: RemoteMaps::new(),
            dsent: 0,
            dacked: 0,
            direct_tx: 0,
            direct_rx: 0,
            direct_warned: false,
            peeking: false,
        }
    }

    /// The acknowledgement word of direct frames finished by `side`.
    fn dack(&self, side: usize) -> &AtomicU64 {
        self.seg.atom(block(side) + OFF_DACK)
    }

    fn peer(&self) -> usize {
        1 - self.side
    }
    /// Head of this side's ring (written here).
    fn my_head(&self) -> &AtomicU64 {
        self.seg.atom(block(self.side) + OFF_HEAD)
    }
    /// Tail of this side's ring (written by the peer).
    fn my_ring_tail(&self) -> &AtomicU64 {
        self.seg.atom(block(self.side) + OFF_TAIL)
    }
    /// Head of the peer's ring (written by the peer).
    fn peer_ring_head(&self) -> &AtomicU64 {
        self.seg.atom(block(self.peer()) + OFF_HEAD)
    }
    /// Tail of the peer's ring (written here).
    fn peer_ring_tail(&self) -> &AtomicU64 {
        self.seg.atom(block(self.peer()) + OFF_TAIL)
    }
    fn waiting(&self, side: usize) -> &AtomicU64 {
        self.seg.atom(block(side) + OFF_WAIT)
    }
    fn state(&self, side: usize) -> &AtomicU64 {
        self.seg.atom(block(side) + OFF_STATE)
    }
    fn ring_ptr(&self, side: usize) -> *mut u8 {
        self.seg.ptr(RINGS + side * self.ring)
    }

    fn wake_peer_if_waiting(&self) {
        wake_if_waiting(&self.seg, self.peer(), self.efd_peer.as_raw_fd());
    }

    fn publish_head(&mut self) {
        if self.head != self.head_pub {
            self.head_pub = self.head;
            self.my_head().store(self.head, Ordering::Release);
            self.wake_peer_if_waiting();
        }
    }

    fn publish_tail(&mut self) {
        if self.tail != self.tail_pub {
            self.tail_pub = self.tail;
            self.peer_ring_tail().store(self.tail, Ordering::Release);
            self.wake_peer_if_waiting();
        }
    }

    fn complete(&mut self, send: bool, req: u64, len: usize) {
        if send {
            self.bytes_tx += len as u64;
            self.sends.part_done(req);
        } else {
            self.bytes_rx += len as u64;
            self.recvs.part_done(req);
        }
    }

    /// Copies queued sends into this side's ring as far as there is room.
    ///
    /// Errors: an index or acknowledgement read from the segment is out of range.
    fn progress_tx(&mut self) -> NetResult<bool> {
        let r = self.ring as u64;
        let ring = self.ring_ptr(self.side);
        let mut moved = false;
        while let Some(t) = self.tx.front_mut() {
            if t.awaiting {
                let w = self
                    .seg
                    .atom(block(1 - self.side) + OFF_DACK)
                    .load(Ordering::Acquire);
                if w >> 1 > self.dsent {
                    return Err(corrupt(
                        &self.desc,
                        format!(
                            "the peer acknowledged {} direct frames, {} were sent",
                            w >> 1,
                            self.dsent
                        ),
                    ));
                }
                if w >> 1 < self.dsent {
                    break;
                }
                moved = true;
                if w & 1 == 1 {
                    let (req, len) = (t.req, t.len);
                    self.tx.pop_front();
                    self.direct_tx += len as u64;
                    self.sends.part_done(req);
                    continue;
                }
                // The receiver could not map the region: stream the payload instead.
                t.awaiting = false;
                t.direct = None;
            }
            if let Some(d) = t.direct {
                let need = (HDR + DBODY) as u64;
                if room(
                    &self.seg,
                    self.side,
                    self.head,
                    &mut self.peer_tail,
                    r,
                    need,
                    &self.desc,
                )?
                .is_none()
                {
                    break;
                }
                let mut f = [0u8; HDR + DBODY];
                f[..HDR].copy_from_slice(&encode_hdr(t.tag, t.len as u64, &t.meta));
                f[0..4].copy_from_slice(&DIRECT_MAGIC);
                f[HDR..HDR + DESC_LEN].copy_from_slice(&d.encode());
                // SAFETY: as for a header below: `need` free ring bytes start at head.
                unsafe { ring_write(ring, self.ring, self.head, f.as_ptr(), f.len()) };
                self.head += f.len() as u64;
                t.awaiting = true;
                self.dsent += 1;
                moved = true;
                break;
            }
            if !t.hdr_done {
                // Compaction: a frame that finds the ring drained and fits in the part before
                // the write position goes to the start of the ring instead, behind a padding
                // frame to the ring's end. Small messages then cycle through the first pages
                // (kept in cache, and the only ring pages ever allocated: the segment is mapped
                // lazily) instead of walking the whole ring. Only then: the frame still fits
                // at once (free bytes after the padding = the offset), so no send that would
                // complete through the ring alone now waits for the receiver.
                let off = self.head % r;
                let pad = r - off;
                if off != 0 && pad >= HDR as u64 && (HDR + t.len) as u64 <= off {
                    if self.peer_tail != self.head {
                        load_tail(
                            &self.seg,
                            self.side,
                            self.head,
                            &mut self.peer_tail,
                            &self.desc,
                        )?;
                    }
                    if self.peer_tail == self.head {
                        let mut h = [0u8; HDR];
                        h[0..4].copy_from_slice(&PAD_MAGIC);
                        h[16..24].copy_from_slice(&pad.to_le_bytes());
                        // SAFETY: the ring is empty (tail == head), so all `r` bytes are free;
                        // HDR <= pad bytes from head to the ring's end.
                        unsafe { ring_write(ring, self.ring, self.head, h.as_ptr(), HDR) };
                        self.head += pad;
                        moved = true;
                    }
                }
            }
            let need = if t.hdr_done { 1 } else { HDR as u64 };
            let Some(mut free) = room(
                &self.seg,
                self.side,
                self.head,
                &mut self.peer_tail,
                r,
                need,
                &self.desc,
            )?
            else {
                break;
            };
            if !t.hdr_done {
                let h = encode_hdr(t.tag, t.len as u64, &t.meta);
                // SAFETY: the ring is `r` bytes of the mapping; free >= HDR bytes starting at
                // head are not read by the consumer until published.
                unsafe { ring_write(ring, self.ring, self.head, h.as_ptr(), HDR) };
                self.head += HDR as u64;
                free -= HDR as u64;
                t.hdr_done = true;
                moved = true;
            }
            while t.done < t.len {
                if free == 0 {
                    load_tail(
                        &self.seg,
                        self.side,
                        self.head,
                        &mut self.peer_tail,
                        &self.desc,
                    )?;
                    free = r - (self.head - self.peer_tail);
                    if free == 0 {
                        break;
                    }
                }
                let k = (free as usize).min(t.len - t.done).min(self.chunk);
                // SAFETY: t.ptr..+len is the posted send buffer (isend contract); k bytes of
                // free ring space start at head.
                unsafe { ring_write(ring, self.ring, self.head, t.ptr.add(t.done), k) };
                t.done += k;
                self.head += k as u64;
                free -= k as u64;
                moved = true;
                if t.done < t.len {
                    // Let the consumer start on this chunk while the next is copied.
                    self.head_pub = self.head;
                    self.seg
                        .atom(block(self.side) + OFF_HEAD)
                        .store(self.head, Ordering::Release);
                    wake_if_waiting(&self.seg, 1 - self.side, self.efd_peer.as_raw_fd());
                }
            }
            if t.done < t.len {
                break;
            }
            let (req, len) = (t.req, t.len);
            self.tx.pop_front();
            self.complete(true, req, len);
        }
        self.publish_head();
        Ok(moved)
    }

    /// Skips the padding frame `h` at the tail (`avail` bytes published from there): the writer
    /// went back to the start of its ring. The padding runs exactly to the ring's end and was
    /// published with its header.
    fn skip_pad(&mut self, h: &[u8], avail: u64) -> NetResult<()> {
        let r = self.ring as u64;
        let pad = u64_at(h, 16);
        if pad != r - self.tail % r || pad < HDR as u64 || pad > avail {
            return Err(corrupt(
                &self.desc,
                format!(
                    "a padding frame of {pad} bytes at ring offset {} ({avail} published)",
                    self.tail % r
                ),
            ));
        }
        self.tail += pad;
        self.tail_pub = self.tail;
        self.seg
            .atom(block(1 - self.side) + OFF_TAIL)
            .store(self.tail, Ordering::Release);
        wake_if_waiting(&self.seg, 1 - self.side, self.efd_peer.as_raw_fd());
        Ok(())
    }

    /// The header of the next frame in the peer's ring, padding skipped, once published.
    fn head_frame(&mut self) -> NetResult<Option<[u8; HDR]>> {
        let ring = self.ring_ptr(self.peer());
        loop {
            load_head(
                &self.seg,
                1 - self.side,
                self.tail,
                &mut self.peer_head,
                self.ring as u64,
                &self.desc,
            )?;
            let avail = self.peer_head - self.tail;
            if avail < HDR as u64 {
                return Ok(None);
            }
            let mut h = [0u8; HDR];
            // SAFETY: HDR published bytes start at tail in the peer's ring.
            unsafe { ring_read(ring, self.ring, self.tail, h.as_mut_ptr(), HDR, false) };
            if h[0..4] != PAD_MAGIC {
                return Ok(Some(h));
            }
            self.skip_pad(&h, avail)?;
        }
    }

    /// Copies data from the peer's ring into posted receives.
    fn progress_rx(&mut self) -> NetResult<bool> {
        let ring = self.ring_ptr(self.peer());
        let mut moved = false;
        let res = loop {
            let Some(rx) = self.rx.front_mut() else {
                break Ok(());
            };
            let mut avail = self.peer_head - self.tail;
            if !rx.got_hdr {
                if avail < HDR as u64 {
                    if let Err(e) = load_head(
                        &self.seg,
                        1 - self.side,
                        self.tail,
                        &mut self.peer_head,
                        self.ring as u64,
                        &self.desc,
                    ) {
                        break Err(e);
                    }
                    avail = self.peer_head - self.tail;
                    if avail < HDR as u64 {
                        break Ok(());
                    }
                }
                let mut h = [0u8; HDR];
                // SAFETY: HDR published bytes start at tail in the peer's ring.
                unsafe { ring_read(ring, self.ring, self.tail, h.as_mut_ptr(), HDR, false) };
                if h[0..4] == PAD_MAGIC {
                    if let Err(e) = self.skip_pad(&h, avail) {
                        break Err(e);
                    }
                    moved = true;
                    continue;
                }
                if h[0..4] == DIRECT_MAGIC {
                    if avail < (HDR + DBODY) as u64 {
                        // Header and body are published together; look again.
                        if let Err(e) = load_head(
                            &self.seg,
                            1 - self.side,
                            self.tail,
                            &mut self.peer_head,
                            self.ring as u64,
                            &self.desc,
                        ) {
                            break Err(e);
                        }
                        avail = self.peer_head - self.tail;
                        if avail < (HDR + DBODY) as u64 {
                            break Ok(());
                        }
                    }
                    if let Some(e) = mismatch(&h, rx.tag, rx.len) {
                        break Err(e);
                    }
                    let meta = meta_of(&h);
                    let mut body = [0u8; DBODY];
                    // SAFETY: DBODY published bytes follow the header in the peer's ring.
                    unsafe {
                        ring_read(
                            ring,
                            self.ring,
                            self.tail + HDR as u64,
                            body.as_mut_ptr(),
                            DBODY,
                            false,
                        )
                    };
                    let copied = match RegionDesc::decode(&body) {
                        // Only the peer's own regions are mapped (never another process's
                        // memory that the peer names).
                        Some(d) if self.peer_pid.is_some_and(|p| p != d.pid) => {
                            if !self.direct_warned {
                                self.direct_warned = true;
                                tracing::warn!(target: "braid::shm", "{}: a direct frame names a region of process {}, not of the peer; copying through the ring", self.desc, d.pid);
                            }
                            false
                        }
                        Some(d) => match self.remote.resolve(&d, rx.len) {
                            Ok(src) => {
                                // SAFETY: src..+len is readable (a live mapping of the
                                // sender's region, checked by resolve); the sender does not
                                // write it until acknowledged; rx.ptr..+len is the posted
                                // receive buffer (irecv contract), which cannot overlap a
                                // mapping private to this connection's cache.
                                unsafe { copy_out(rx.ptr, src, rx.len, rx.nt) };
                                true
                            }
                            Err(e) => {
                                if !self.direct_warned {
                                    self.direct_warned = true;
                                    tracing::warn!(target: "braid::shm", "{}: cannot map the sender's region ({e}); falling back to copies through the ring", self.desc);
                                }
                                false
                            }
                        },
                        None => false,
                    };
                    self.tail += (HDR + DBODY) as u64;
                    moved = true;
                    self.dacked += 1;
                    if copied {
                        let (req, len) = (rx.req, rx.len);
                        self.rx.pop_front();
                        self.recvs.set_meta(req, meta);
                        self.direct_rx += len as u64;
                        self.recvs.part_done(req);
                    }
                    self.seg
                        .atom(block(self.side) + OFF_DACK)
                        .store((self.dacked << 1) | u64::from(copied), Ordering::Release);
                    self.tail_pub = self.tail;
                    self.seg
                        .atom(block(1 - self.side) + OFF_TAIL)
                        .store(self.tail, Ordering::Release);
                    wake_if_waiting(&self.seg, 1 - self.side, self.efd_peer.as_raw_fd());
                    continue;
                }
                if h[0..4] != FRAME_MAGIC {
                    break Err(corrupt(&self.desc, "bad magic in a frame header".into()));
                }
                if let Some(e) = mismatch(&h, rx.tag, rx.len) {
                    break Err(e);
                }
                let req = rx.req;
                rx.got_hdr = true;
                self.tail += HDR as u64;
                avail -= HDR as u64;
                moved = true;
                self.recvs.set_meta(req, meta_of(&h));
            }
            let Some(rx) = self.rx.front_mut() else {
                break Ok(());
            };
            let mut bad = None;
            while rx.done < rx.len {
                if avail == 0 {
                    if let Err(e) = load_head(
                        &self.seg,
                        1 - self.side,
                        self.tail,
                        &mut self.peer_head,
                        self.ring as u64,
                        &self.desc,
                    ) {
                        bad = Some(e);
                        break;
                    }
                    avail = self.peer_head - self.tail;
                    if avail == 0 {
                        break;
                    }
                }
                let k = (avail as usize).min(rx.len - rx.done).min(self.chunk);
                // SAFETY: k published bytes start at tail; rx.ptr..+len is the posted receive
                // buffer (irecv contract).
                unsafe { ring_read(ring, self.ring, self.tail, rx.ptr.add(rx.done), k, rx.nt) };
                rx.done += k;
                self.tail += k as u64;
                avail -= k as u64;
                moved = true;
                if rx.done < rx.len {
                    self.tail_pub = self.tail;
                    self.seg
                        .atom(block(1 - self.side) + OFF_TAIL)
                        .store(self.tail, Ordering::Release);
                    wake_if_waiting(&self.seg, 1 - self.side, self.efd_peer.as_raw_fd());
                }
            }
            if let Some(e) = bad {
                break Err(e);
            }
            if rx.done < rx.len {
                break Ok(());
            }
            let (req, len) = (rx.req, rx.len);
            self.rx.pop_front();
            self.complete(false, req, len);
        };
        self.publish_tail();
        res.map(|()| moved)
    }

    fn fail(&mut self, e: NetError) -> NetError {
        if self.error.is_none() {
            self.error = Some(e);
        }
        self.error
            .clone()
            .unwrap_or(NetError::Lost("connection failed".into()))
    }

    fn check(&self) -> NetResult<()> {
        match &self.error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Non-blocking look at the socket: EOF or an error means the peer is gone.
    fn check_sock(&mut self) {
        self.last_sock_check = Instant::now();
        if self.peer_gone {
            return;
        }
        let mut b = [0u8; 64];
        // Bounded: a peer that keeps sending cannot hold the caller here.
        for _ in 0..16 {
            // SAFETY: reads at most 64 bytes into a live local buffer.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    b.as_mut_ptr() as *mut libc::c_void,
                    b.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                continue; // nothing is sent after the hello; ignore
            }
            if n == 0 {
                self.peer_gone = true;
                return;
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => return,
                std::io::ErrorKind::Interrupted => continue,
                _ => {
                    self.peer_gone = true;
                    return;
                }
            }
        }
    }

    fn peer_reason(&self) -> String {
        let b = block(self.peer());
        let n = (self.seg.atom(b + OFF_RLEN).load(Ordering::Acquire) as usize).min(MAX_REASON);
        let mut v = vec![0u8; n];
        // SAFETY: the reason area is MAX_REASON bytes inside the peer's control page, written
        // before the peer published ST_ABORT (read with Acquire by the caller).
        unsafe { std::ptr::copy_nonoverlapping(self.seg.ptr(b + OFF_REASON), v.as_mut_ptr(), n) };
        String::from_utf8_lossy(&v).into_owned()
    }

    fn progress_inner(&mut self) -> NetResult<bool> {
        let woke = self.waiting(self.side).load(Ordering::Relaxed) != 0;
        if woke {
            self.waiting(self.side).store(0, Ordering::Relaxed);
            drain(self.efd_me.as_raw_fd());
        }
        let mut moved = self.progress_tx()?;
        moved |= self.progress_rx()?;
        // The clock is read every 16th call only (a busy connection is progressed millions of
        // times a second; a blocked one is woken by the socket's hang-up anyway).
        self.sock_tick = self.sock_tick.wrapping_add(1);
        if woke || (self.sock_tick % 16 == 0 && self.last_sock_check.elapsed() >= SOCK_CHECK) {
            self.check_sock();
        }
        match self.state(self.peer()).load(Ordering::Acquire) {
            ST_ABORT => return Err(NetError::PeerAborted(self.peer_reason())),
            ST_BYE => self.bye_received = true,
            _ => {}
        }
        if !(self.peer_gone || self.bye_received) {
            return Ok(moved);
        }
        // The peer is leaving: nothing more will be published after what is in the ring.
        load_head(
            &self.seg,
            self.peer(),
            self.tail,
            &mut self.peer_head,
            self.ring as u64,
            &self.desc,
        )?;
        let drained = self.peer_head == self.tail;
        if self.bye_received {
            if !self.rx.is_empty() && drained {
                return Err(NetError::Closed(format!(
                    "{} closed its communicator while a receive was pending",
                    self.desc
                )));
            }
            if !self.tx.is_empty() && self.peer_gone {
                return Err(NetError::Closed(format!(
                    "{} closed the connection while a send was pending",
                    self.desc
                )));
            }
            return Ok(moved);
        }
        // What the peer published before it died can still be received, by a posted receive
        // or one about to be posted for a header that a peek waits for.
        if (!self.rx.is_empty() || self.peeking) && !drained {
            return Ok(moved);
        }
        Err(NetError::Lost(format!(
            "{} closed the connection without a goodbye (process died?)",
            self.desc
        )))
    }

    /// Whether progress() would move something now (read-only look at the rings).
    fn ready(&self) -> bool {
        // Values read from the segment may be garbage: an out-of-range one counts as ready, so
        // that progress() runs and reports it.
        if self.tx.front().is_some_and(|t| t.awaiting) {
            return self.dack(self.peer()).load(Ordering::Acquire) >> 1 >= self.dsent
                || self.rx_ready();
        }
        if let Some(t) = self.tx.front() {
            let need = if t.hdr_done { 1 } else { HDR as u64 };
            let tail = self.my_ring_tail().load(Ordering::Acquire);
            match self.head.checked_sub(tail) {
                Some(used) if used <= self.ring as u64 => {
                    if self.ring as u64 - used >= need {
                        return true;
                    }
                }
                _ => return true,
            }
        }
        self.rx_ready()
    }

    /// The receive half of [`ShmConn::ready`] (and the peer's state).
    fn rx_ready(&self) -> bool {
        let need = match self.rx.front() {
            Some(r) if r.got_hdr => Some(1),
            Some(_) => Some(HDR as u64),
            // Someone waits for the next header (peek).
            None if self.peeking => Some(HDR as u64),
            None => None,
        };
        if let Some(need) = need {
            let head = self.peer_ring_head().load(Ordering::Acquire);
            if head.checked_sub(self.tail).map_or(true, |a| a >= need) {
                return true;
            }
        }
        let st = self.state(self.peer()).load(Ordering::Acquire);
        st == ST_ABORT || (st == ST_BYE && !self.bye_received)
    }

    fn shutdown_sock(&self) {
        // SAFETY: shutdown on an open socket owned by self.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl Conn for ShmConn {
    unsafe fn isend(
        &mut self,
        tag: u64,
        meta: &Meta,
        buf: *const u8,
        len: usize,
    ) -> NetResult<Option<Request>> {
        self.check()?;
        if self.sends.pending() + self.recvs.pending() >= MAX_POSTED {
            return Ok(None);
        }
        let req = self.sends.post(1);
        let direct = if len >= self.direct_min {
            self.regions.as_ref().and_then(|r| r.lookup(buf, len))
        } else {
            None
        };
        self.tx.push_back(Tx {
            tag,
            meta: *meta,
            ptr: buf,
            len,
            hdr_done: false,
            done: 0,
            req,
            direct,
            awaiting: false,
        });
        if self.tx.len() == 1 {
            if let Err(e) = self.progress_tx() {
                return Err(self.fail(e));
            }
        }
        Ok(Some(Request {
            send: true,
            seq: req,
        }))
    }

    unsafe fn irecv(&mut self, tag: u64, buf: *mut u8, len: usize) -> NetResult<Option<Request>> {
        // SAFETY: the caller's contract is irecv's.
        unsafe { self.irecv_hint(tag, buf, len, len >= NT_MIN_MSG) }
    }

    unsafe fn irecv_hint(
        &mut self,
        tag: u64,
        buf: *mut u8,
        len: usize,
        stream: bool,
    ) -> NetResult<Option<Request>> {
        self.check()?;
        if self.sends.pending() + self.recvs.pending() >= MAX_POSTED {
            return Ok(None);
        }
        self.peeking = false;
        let req = self.recvs.post(1);
        self.rx.push_back(Rx {
            tag,
            ptr: buf,
            len,
            nt: stream && len >= NT_MIN_COPY,
            got_hdr: false,
            done: 0,
            req,
        });
        if self.rx.len() == 1 {
            if let Err(e) = self.progress_rx() {
                return Err(self.fail(e));
            }
        }
        Ok(Some(Request {
            send: false,
            seq: req,
        }))
    }

    fn progress(&mut self) -> NetResult<bool> {
        self.check()?;
        match self.progress_inner() {
            Ok(m) => Ok(m),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn can_peek(&self) -> bool {
        true
    }

    fn peek(&mut self) -> NetResult<Option<Peeked>> {
        self.check()?;
        if !self.rx.is_empty() {
            return Ok(None);
        }
        let h = match self.head_frame() {
            Ok(h) => h,
            Err(e) => return Err(self.fail(e)),
        };
        if let Some(h) = h {
            if h[0..4] != FRAME_MAGIC && h[0..4] != DIRECT_MAGIC {
                let e = corrupt(&self.desc, "bad magic in a frame header".into());
                return Err(self.fail(e));
            }
            self.peeking = false;
            return Ok(Some(Peeked {
                tag: u64_at(&h, 8),
                len: u64_at(&h, 16),
                meta: meta_of(&h),
            }));
        }
        self.peeking = true;
        self.progress()?;
        Ok(None)
    }

    fn test(&mut self, req: Request) -> NetResult<Option<Completion>> {
        let t = if req.send {
            &mut self.sends
        } else {
            &mut self.recvs
        };
        t.test(req, self.error.as_ref())
    }

    fn pending(&self) -> usize {
        self.sends.pending() + self.recvs.pending()
    }

    fn poll_fds(&self, out: &mut Vec<PollFd>) {
        out.push(PollFd {
            fd: self.sock.as_raw_fd(),
            read: true,
            write: false,
        });
        out.push(PollFd {
            fd: self.efd_me.as_raw_fd(),
            read: true,
            write: false,
        });
        if self.error.is_some() || self.closed_local {
            return;
        }
        // Oversubscribed: the caller already yielded between looks; spinning here would only
        // keep the peer off the CPU.
        let spin = if self.live.0.oversubscribed() {
            Duration::ZERO
        } else {
            self.spin
        };
        let end = Instant::now() + spin;
        loop {
            if self.ready() {
                signal(self.efd_me.as_raw_fd());
                return;
            }
            if Instant::now() >= end {
                break;
            }
            std::hint::spin_loop();
        }
        self.waiting(self.side).store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.ready() {
            signal(self.efd_me.as_raw_fd());
        }
    }

    fn abort(&mut self, reason: &str) {
        if self.closed_local {
            return;
        }
        self.closed_local = true;
        let b = block(self.side);
        let r = &reason.as_bytes()[..reason.len().min(MAX_REASON)];
        // SAFETY: the reason area (MAX_REASON bytes of this side's control page) is written only
        // by this side and read by the peer after it sees ST_ABORT (Release below).
        unsafe { std::ptr::copy_nonoverlapping(r.as_ptr(), self.seg.ptr(b + OFF_REASON), r.len()) };
        self.seg
            .atom(b + OFF_RLEN)
            .store(r.len() as u64, Ordering::Relaxed);
        self.state(self.side).store(ST_ABORT, Ordering::Release);
        signal(self.efd_peer.as_raw_fd());
        self.shutdown_sock();
        if self.error.is_none() {
            self.error = Some(NetError::Closed("connection aborted locally".into()));
        }
    }

    fn goodbye(&mut self) {
        if self.closed_local {
            return;
        }
        self.closed_local = true;
        if self.error.is_none() {
            // Let queued sends reach the ring first (bounded wait), like tcp's goodbye.
            let end = Instant::now() + Duration::from_millis(500);
            while !self.tx.is_empty() && Instant::now() < end {
                if self.progress_tx().is_err() {
                    break;
                }
                if !self.tx.is_empty() {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            self.state(self.side).store(ST_BYE, Ordering::Release);
            signal(self.efd_peer.as_raw_fd());
        }
        self.shutdown_sock();
    }

    fn peer_desc(&self) -> String {
        self.desc.clone()
    }

    fn bytes(&self) -> (u64, u64) {
        (self.bytes_tx, self.bytes_rx)
    }

    fn direct_bytes(&self) -> (u64, u64) {
        (self.direct_tx, self.direct_rx)
    }

    fn oversubscribed(&self) -> bool {
        self.live.0.oversubscribed()
    }
}

struct PendingSock {
    fd: OwnedFd,
    since: Instant,
    /// The challenge sent on this connection.
    challenge: Challenge,
    /// The connector's pid (SO_PEERCRED).
    pid: u32,
}

/// Listening socket of the shared-memory transport (abstract namespace: nothing on disk).
///
/// Anyone on the host can connect to an abstract socket, so every connection is checked
/// before anything it passes is mapped: the connector's credentials (same uid as this
/// process), a fresh challenge answered by its hello (the [`HelloCheck`]), and the segment
/// (a sealed memfd of the size its hello states).
pub struct ShmListen {
    fd: OwnedFd,
    /// An epoll set of the listening socket and the pending connections: what [`Listener::fd`]
    /// returns, so that a caller polling it also wakes when a hello arrives.
    ep: OwnedFd,
    opts: ShmOptions,
    load: Arc<Load>,
    pending: Vec<PendingSock>,
    regions: Option<Arc<Regions>>,
    check: Option<HelloCheck>,
    /// The only uid whose processes are admitted (this process's effective uid).
    uid: u32,
    /// How long an accepted connection may take to send its hello ([`HELLO_TIMEOUT`]).
    hello_timeout: Duration,
    /// Most connections waiting for their hello at once ([`MAX_PENDING`]).
    max_pending: usize,
}

enum HelloRead {
    Again,
    Conn(Box<ShmConn>, Vec<u8>),
    Bad(String),
}

/// Sends the challenge message on a freshly accepted (non-blocking) connection.
fn send_challenge(fd: RawFd, c: &Challenge) -> Result<(), String> {
    let mut m = [0u8; CHAL_MSG];
    m[..4].copy_from_slice(&CHAL_MAGIC);
    m[4..].copy_from_slice(c);
    // SAFETY: sends CHAL_MSG bytes from a live local buffer.
    let n = unsafe {
        libc::send(
            fd,
            m.as_ptr() as *const libc::c_void,
            m.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n != m.len() as isize {
        return Err(format!(
            "sending the challenge: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Reads the acceptor's challenge from the blocking socket `fd`, waiting until `deadline`.
fn recv_challenge(fd: RawFd, deadline: Instant, name: &str) -> NetResult<Challenge> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(NetError::Timeout(format!(
                "waiting for the challenge of shm socket {name}"
            )));
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, 1000) as libc::c_int;
        // SAFETY: polls one live pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(NetError::io("poll (shm challenge)", e));
        }
        if r == 0 {
            continue;
        }
        let mut m = [0u8; CHAL_MSG + 1];
        // SAFETY: reads at most CHAL_MSG + 1 bytes into a live local buffer.
        let n = unsafe {
            libc::recv(
                fd,
                m.as_mut_ptr() as *mut libc::c_void,
                m.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) {
                continue;
            }
            return Err(NetError::io(
                format!("reading the challenge of shm socket {name}"),
                e,
            ));
        }
        if n == 0 {
            return Err(NetError::Closed(format!(
                "shm socket {name} closed the connection before its challenge (refused?)"
            )));
        }
        if n as usize != CHAL_MSG || m[..4] != CHAL_MAGIC {
            return Err(NetError::Protocol(format!(
                "shm socket {name} sent no braid challenge"
            )));
        }
        let mut c = [0u8; CHALLENGE_LEN];
        c.copy_from_slice(&m[4..CHAL_MSG]);
        return Ok(c);
    }
}

/// Checks that `fd` is an eventfd and makes it non-blocking (a peer could pass a pipe or a
/// socket instead, on which a signal or a drain would block). Where /proc is not mounted, the
/// non-blocking flag alone keeps every access from blocking.
fn check_eventfd(fd: RawFd) -> Result<(), String> {
    if let Ok(t) = std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        if t.as_os_str() != "anon_inode:[eventfd]" {
            return Err(format!("{} instead of an eventfd", t.display()));
        }
    }
    set_nonblocking(fd).map_err(|e| e.to_string())
}

/// Adds `fd` to (or, with `add` false, removes it from) the epoll set `ep` (readable events).
fn ep_ctl(ep: RawFd, fd: RawFd, add: bool) -> NetResult<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: fd as u64,
    };
    let op = if add {
        libc::EPOLL_CTL_ADD
    } else {
        libc::EPOLL_CTL_DEL
    };
    // SAFETY: epoll_ctl on open descriptors with a live event struct.
    if unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } != 0 {
        return Err(last_err("epoll_ctl"));
    }
    Ok(())
}

impl ShmListen {
    /// Removes pending connection `i` (and its socket from the epoll set).
    fn take_pending(&mut self, i: usize) -> PendingSock {
        let p = self.pending.swap_remove(i);
        let _ = ep_ctl(self.ep.as_raw_fd(), p.fd.as_raw_fd(), false);
        p
    }

    fn read_hello(&self, p: &PendingSock) -> HelloRead {
        let mut buf = [0u8; HELLO_FIXED + MAX_HELLO + 1];
        let mut cbuf = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        // SAFETY: msg points to a live iovec and control buffer of the stated sizes.
        let n = unsafe {
            libc::recvmsg(
                p.fd.as_raw_fd(),
                &mut msg,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => {
                    HelloRead::Again
                }
                _ => HelloRead::Bad(e.to_string()),
            };
        }
        // Take ownership of every descriptor received, so that all are closed on any error.
        let mut fds: Vec<OwnedFd> = Vec::new();
        // SAFETY: CMSG_* walk the control buffer filled by recvmsg within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const libc::c_int;
                    let cnt = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize)
                        / std::mem::size_of::<libc::c_int>();
                    for i in 0..cnt {
                        let fd = std::ptr::read_unaligned(data.add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if n == 0 {
            return HelloRead::Bad("closed before sending its hello".into());
        }
        let b = &buf[..n as usize];
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return HelloRead::Bad("hello too large".into());
        }
        if b.len() < HELLO_FIXED || b[..4] != HELLO_MAGIC {
            return HelloRead::Bad("not a braid shm hello (bad magic)".into());
        }
        let ver = u16::from_le_bytes([b[4], b[5]]);
        if ver != PROTO_VERSION {
            return HelloRead::Bad(format!(
                "shm protocol version {ver}, this build speaks {PROTO_VERSION}"
            ));
        }
        let ring = u64_at(b, 8);
        let seg_len = u64_at(b, 16);
        let hl = u32::from_le_bytes([b[24], b[25], b[26], b[27]]) as usize;
        if hl > MAX_HELLO || b.len() != HELLO_FIXED + hl {
            return HelloRead::Bad("bad hello length".into());
        }
        if !(2 * HDR as u64..=(1 << 30)).contains(&ring) || seg_len != (RINGS as u64) + 2 * ring {
            return HelloRead::Bad(format!("bad ring size {ring} / segment {seg_len}"));
        }
        let (ring, seg_len) = (ring as usize, seg_len as usize);
        if fds.len() != NFDS {
            return HelloRead::Bad(format!("{} descriptors instead of {NFDS}", fds.len()));
        }
        let hello = &b[HELLO_FIXED..];
        // The layer above checks that the hello answers this connection's challenge (the
        // job-token MAC) before anything the peer passed is mapped.
        if let Some(check) = &self.check {
            if let Err(why) = check(&p.challenge, hello, Some(p.pid)) {
                return HelloRead::Bad(why);
            }
        }
        // Map only a sealed memfd of the stated size: the peer cannot truncate it later.
        if let Err(why) = crate::region::check_sealed(fds[0].as_raw_fd(), seg_len as u64, true) {
            return HelloRead::Bad(why);
        }
        for fd in &fds[1..] {
            if let Err(why) = check_eventfd(fd.as_raw_fd()) {
                return HelloRead::Bad(why);
            }
        }
        let seg = match Seg::map(fds[0].as_raw_fd(), seg_len) {
            Ok(s) => s,
            Err(e) => return HelloRead::Bad(e.to_string()),
        };
        if seg.atom(0).load(Ordering::Acquire) != SEG_MAGIC
            || seg.atom(16).load(Ordering::Acquire) != ring as u64
        {
            return HelloRead::Bad("segment without the braid magic or of another ring".into());
        }
        let mut it = fds.into_iter().skip(1);
        let (Some(efd0), Some(efd1)) = (it.next(), it.next()) else {
            return HelloRead::Bad("missing eventfds".into());
        };
        let sock = match p.fd.try_clone() {
            Ok(s) => s,
            Err(e) => return HelloRead::Bad(e.to_string()),
        };
        // Side 1: wakes on efd1, wakes the connector on efd0.
        let conn = ShmConn::new(
            seg,
            1,
            ring,
            &self.opts,
            sock,
            efd1,
            efd0,
            format!("shm peer pid {}", p.pid),
            Some(p.pid),
            &self.load,
            self.regions.clone(),
        );
        HelloRead::Conn(Box::new(conn), hello.to_vec())
    }

    /// Accepts what waits in the backlog: refuses processes of other users at once, and sends
    /// the others their challenge (at most [`MAX_PENDING`] wait for their hello at once).
    fn accept_new(&mut self) {
        let mut over = 0usize;
        // One log line per call, however many strangers knock at once.
        let (mut refused, mut last_refused) = (0usize, String::new());
        loop {
            // SAFETY: accept4 without address output.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock => break,
                    std::io::ErrorKind::Interrupted => continue,
                    _ => {
                        tracing::warn!(target: "braid::shm", "accept failed: {e}");
                        break;
                    }
                }
            }
            // SAFETY: fd is a fresh descriptor returned by accept4.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let pid = match check_cred(peer_cred(fd.as_raw_fd()), self.uid) {
                Ok(pid) => pid,
                Err(why) => {
                    refused += 1;
                    last_refused = why;
                    continue;
                }
            };
            if self.pending.len() >= self.max_pending {
                self.reap_closed();
            }
            if self.pending.len() >= self.max_pending {
                over += 1;
                continue;
            }
            let challenge = match crate::new_challenge() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(target: "braid::shm", "dropping shm connection from pid {pid}: {e}");
                    continue;
                }
            };
            if let Err(why) = send_challenge(fd.as_raw_fd(), &challenge) {
                tracing::warn!(target: "braid::shm", "dropping shm connection from pid {pid}: {why}");
                continue;
            }
            if let Err(e) = ep_ctl(self.ep.as_raw_fd(), fd.as_raw_fd(), true) {
                tracing::warn!(target: "braid::shm", "dropping shm connection from pid {pid}: {e}");
                continue;
            }
            self.pending.push(PendingSock {
                fd,
                since: Instant::now(),
                challenge,
                pid,
            });
        }
        if refused > 0 {
            tracing::warn!(target: "braid::shm", "refused {refused} shm connection(s) of other users; the last: {last_refused}");
        }
        if over > 0 {
            tracing::warn!(target: "braid::shm", "dropped {over} shm connection(s): {} connections already wait for their hello", self.max_pending);
        }
    }
}

impl Listener for ShmListen {
    fn accept_challenged(&mut self) -> NetResult<Option<Arrival>> {
        Ok(self
            .poll_arrival()
            .map(|(c, hello, challenge, pid)| Arrival {
                conn: c,
                hello,
                challenge,
                peer_pid: Some(pid),
            }))
    }

    fn set_hello_check(&mut self, check: HelloCheck) {
        self.check = Some(check);
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.ep.as_raw_fd())
    }
}

/// A connection that passed every check: the connection, its hello, the challenge it
/// answered, the connector's pid.
type ShmArrival = (Box<ShmConn>, Vec<u8>, Challenge, u32);

impl ShmListen {
    /// [`Listener::accept_challenged`], with the concrete connection.
    fn poll_arrival(&mut self) -> Option<ShmArrival> {
        // The waiting connections first: those that closed or timed out free their slots
        // before new connections are counted against the cap.
        if let Some(a) = self.scan_pending() {
            return Some(a);
        }
        self.accept_new();
        self.scan_pending()
    }

    /// Drops waiting connections that their connector closed or that timed out (their slots
    /// count against the cap), leaving any hello that arrived in place.
    fn reap_closed(&mut self) {
        let mut i = 0;
        while i < self.pending.len() {
            let p = &self.pending[i];
            let mut b = [0u8; 1];
            // SAFETY: peeks at most one byte into a live local buffer.
            let n = unsafe {
                libc::recv(
                    p.fd.as_raw_fd(),
                    b.as_mut_ptr() as *mut libc::c_void,
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            let open = n > 0
                || (n < 0
                    && matches!(
                        std::io::Error::last_os_error().kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ));
            if open && p.since.elapsed() <= self.hello_timeout {
                i += 1;
                continue;
            }
            let p = self.take_pending(i);
            tracing::warn!(target: "braid::shm", "dropping shm connection from pid {}: closed or no hello within {:?}", p.pid, self.hello_timeout);
        }
    }

    /// Reads the hellos that arrived; drops connections that failed or timed out.
    fn scan_pending(&mut self) -> Option<ShmArrival> {
        let mut i = 0;
        while i < self.pending.len() {
            match self.read_hello(&self.pending[i]) {
                HelloRead::Again => {
                    if self.pending[i].since.elapsed() > self.hello_timeout {
                        let p = self.take_pending(i);
                        tracing::warn!(target: "braid::shm", "dropping shm connection from pid {}: no hello within {:?}", p.pid, self.hello_timeout);
                    } else {
                        i += 1;
                    }
                }
                HelloRead::Bad(why) => {
                    let p = self.take_pending(i);
                    tracing::warn!(target: "braid::shm", "dropping shm connection from pid {}: {why}", p.pid);
                }
                HelloRead::Conn(c, hello) => {
                    let p = self.take_pending(i);
                    return Some((c, hello, p.challenge, p.pid));
                }
            }
        }
        None
    }
}

impl ShmTransport {
    fn listen_shm(&self) -> NetResult<(ShmListen, ConnectHandle)> {
        let fd = new_socket(true)?;
        let name = format!("braid-shm-{}-{:016x}", std::process::id(), random_u64()).into_bytes();
        let (addr, len) = abstract_addr(&name)?;
        // SAFETY: addr is a live sockaddr_un of `len` meaningful bytes.
        if unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                len,
            )
        } != 0
        {
            return Err(last_err("bind (abstract unix socket)"));
        }
        // SAFETY: plain system call on an open socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
            return Err(last_err("listen (unix socket)"));
        }
        // SAFETY: plain system call without pointers.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(last_err("epoll_create1"));
        }
        // SAFETY: ep is a fresh descriptor owned by nobody else.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        ep_ctl(ep.as_raw_fd(), fd.as_raw_fd(), true)?;
        Ok((
            ShmListen {
                fd,
                ep,
                opts: self.opts.clone(),
                load: self.load.clone(),
                pending: Vec::new(),
                regions: self.regions.clone(),
                check: None,
                uid: my_uid(),
                hello_timeout: HELLO_TIMEOUT,
                max_pending: MAX_PENDING,
            },
            ConnectHandle {
                transport: "shm".into(),
                addr: name,
            },
        ))
    }

    /// Connects (see [`Transport::connect_challenged`]): checks that the listener runs as this
    /// user, reads its challenge, then sends the hello with a fresh sealed segment.
    fn connect_shm(
        &self,
        handle: &ConnectHandle,
        hello: HelloFn<'_>,
        deadline: Instant,
    ) -> NetResult<ShmConn> {
        self.connect_shm_or_give_up(handle, hello, deadline, &|| false)
    }

    /// [`Transport::connect_or_give_up`]: `give_up` is asked while the listener refuses.
    fn connect_shm_or_give_up(
        &self,
        handle: &ConnectHandle,
        hello: HelloFn<'_>,
        deadline: Instant,
        give_up: &dyn Fn() -> bool,
    ) -> NetResult<ShmConn> {
        if handle.transport != "shm" {
            return Err(NetError::Protocol(format!(
                "shm cannot connect to a {} handle",
                handle.transport
            )));
        }
        let (addr, alen) = abstract_addr(&handle.addr)?;
        let name = String::from_utf8_lossy(&handle.addr).into_owned();
        let sock = loop {
            let s = new_socket(false)?;
            // A listener whose backlog is full must not hold us past the deadline.
            send_deadline(s.as_raw_fd(), deadline)?;
            // SAFETY: addr is a live sockaddr_un of `alen` meaningful bytes.
            let r = unsafe {
                libc::connect(
                    s.as_raw_fd(),
                    &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                    alen,
                )
            };
            if r == 0 {
                break s;
            }
            let e = std::io::Error::last_os_error();
            let retry = matches!(
                e.raw_os_error(),
                Some(libc::ECONNREFUSED | libc::ENOENT | libc::EAGAIN | libc::EINTR)
            );
            if !retry {
                return Err(NetError::io(format!("connect to shm socket {name}"), e));
            }
            if Instant::now() >= deadline {
                return Err(NetError::Timeout(format!(
                    "connecting to shm socket {name}"
                )));
            }
            if give_up() {
                return Err(NetError::Timeout(format!(
                    "connecting to shm socket {name}: gave up (the caller's view of the peer is stale)"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Anyone can bind an abstract name: talk only to a listener of this user.
        let pid = check_cred(peer_cred(sock.as_raw_fd()), my_uid()).map_err(|why| {
            NetError::Unavailable(format!("refusing shm socket {name}: its listener {why}"))
        })?;
        let challenge = recv_challenge(sock.as_raw_fd(), deadline, &name)?;
        let hello = hello(&challenge);
        if hello.len() > MAX_HELLO {
            return Err(NetError::Protocol("hello larger than 4 KiB".into()));
        }
        let ring = self.opts.ring_bytes;
        let seg_len = RINGS + 2 * ring;
        let mfd = crate::region::sealed_memfd(c"braid-shm", seg_len)?;
        let seg = Seg::map(mfd.as_raw_fd(), seg_len)?;
        seg.atom(8).store(PROTO_VERSION as u64, Ordering::Relaxed);
        seg.atom(16).store(ring as u64, Ordering::Relaxed);
        seg.atom(0).store(SEG_MAGIC, Ordering::Release);
        let efd0 = new_eventfd()?;
        let efd1 = new_eventfd()?;

        let mut msg_b = Vec::with_capacity(HELLO_FIXED + hello.len());
        msg_b.extend_from_slice(&HELLO_MAGIC);
        msg_b.extend_from_slice(&PROTO_VERSION.to_le_bytes());
        msg_b.extend_from_slice(&[0, 0]);
        msg_b.extend_from_slice(&(ring as u64).to_le_bytes());
        msg_b.extend_from_slice(&(seg_len as u64).to_le_bytes());
        msg_b.extend_from_slice(&(hello.len() as u32).to_le_bytes());
        msg_b.extend_from_slice(&hello);
        let fds: [libc::c_int; NFDS] = [mfd.as_raw_fd(), efd0.as_raw_fd(), efd1.as_raw_fd()];
        let mut cbuf = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: msg_b.as_mut_ptr() as *mut libc::c_void,
            iov_len: msg_b.len(),
        };
        // SAFETY: msghdr is plain data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(&fds) as u32) } as usize;
        msg.msg_controllen = space as _;
        send_deadline(sock.as_raw_fd(), deadline)?;
        // SAFETY: the control buffer (128 bytes) is larger than `space`; CMSG_FIRSTHDR points
        // into it and CMSG_DATA has room for the NFDS descriptors.
        let n = unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            if c.is_null() {
                return Err(NetError::Protocol("control buffer too small".into()));
            }
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(&fds) as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(c),
                std::mem::size_of_val(&fds),
            );
            libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            return Err(last_err(&format!("sending the shm hello to {name}")));
        }
        set_nonblocking(sock.as_raw_fd())?;
        // Side 0: wakes on efd0, wakes the acceptor on efd1. The memfd closes here; the
        // mappings keep the segment alive and nothing names it.
        Ok(ShmConn::new(
            seg,
            0,
            ring,
            &self.opts,
            sock,
            efd0,
            efd1,
            format!("shm peer pid {pid}"),
            Some(pid),
            &self.load,
            self.regions.clone(),
        ))
    }
}

impl Transport for ShmTransport {
    fn name(&self) -> &'static str {
        "shm"
    }

    fn devices(&self) -> NetResult<Vec<DeviceProps>> {
        Ok(vec![DeviceProps {
            name: "shm".into(),
            speed_mbps: 0,
            latency_us: 0.0,
            ptr_support: PtrSupport {
                host: true,
                cuda: false,
            },
        }])
    }

    fn listen(&self, _dev: usize) -> NetResult<(Box<dyn Listener>, ConnectHandle)> {
        let (l, h) = self.listen_shm()?;
        Ok((Box::new(l), h))
    }

    fn connect_challenged(
        &self,
        handle: &ConnectHandle,
        hello: HelloFn<'_>,
        deadline: Instant,
    ) -> NetResult<Box<dyn Conn>> {
        Ok(Box::new(self.connect_shm(handle, hello, deadline)?))
    }

    fn connect_or_give_up(
        &self,
        handle: &ConnectHandle,
        hello: HelloFn<'_>,
        deadline: Instant,
        give_up: &dyn Fn() -> bool,
    ) -> NetResult<Box<dyn Conn>> {
        Ok(Box::new(self.connect_shm_or_give_up(
            handle, hello, deadline, give_up,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance as conf;

    /// Accepts on `l` until an arrival or 5 s.
    fn accept_one(l: &mut ShmListen) -> Option<ShmArrival> {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Some(a) = l.poll_arrival() {
                return Some(a);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    /// Keeps accepting on `l` for `d`, asserting that nothing arrives.
    fn accept_nothing(l: &mut ShmListen, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            assert!(l.poll_arrival().is_none(), "a connection was accepted");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A connected pair of concrete connections (accepted side 1, connecting side 0) and the
    /// arrival's hello, challenge and pid; the connector runs in a thread (it waits for the
    /// challenge that accepting sends).
    fn raw_pair(
        t: &ShmTransport,
        hello: &'static [u8],
    ) -> (ShmConn, ShmConn, Vec<u8>, Challenge, u32) {
        let (mut l, h) = t.listen_shm().unwrap();
        let t2 = t.clone();
        let th = std::thread::spawn(move || {
            t2.connect_shm(
                &h,
                &|_| hello.to_vec(),
                Instant::now() + Duration::from_secs(5),
            )
        });
        let (a, got, challenge, pid) = accept_one(&mut l).expect("no arrival");
        let b = th.join().unwrap().unwrap();
        (*a, b, got, challenge, pid)
    }

    fn pair(opts: ShmOptions) -> (Box<dyn Conn>, Box<dyn Conn>) {
        let t = ShmTransport::new(opts).unwrap();
        let (a, b, hello, _, _) = raw_pair(&t, b"hello-123");
        assert_eq!(hello, b"hello-123");
        (Box::new(a), Box::new(b))
    }

    fn default_pair() -> (Box<dyn Conn>, Box<dyn Conn>) {
        pair(ShmOptions::default())
    }

    fn drive(a: &mut dyn Conn, b: &mut dyn Conn, ra: Request, rb: Request) {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            a.progress().unwrap();
            b.progress().unwrap();
            if a.test(ra).unwrap().is_some() && b.test(rb).unwrap().is_some() {
                return;
            }
            assert!(Instant::now() < end, "transfer did not finish");
        }
    }

    #[test]
    fn shm_direct_sends_from_registered_regions() {
        let regions = Regions::new();
        let opts = ShmOptions {
            ring_bytes: 64 << 10,
            direct_min: 1,
            ..ShmOptions::default()
        };
        let t = ShmTransport::with_regions(opts, regions.clone()).unwrap();
        let (a, b, _, _, _) = raw_pair(&t, b"x");
        let (mut a, mut b): (Box<dyn Conn>, Box<dyn Conn>) = (Box::new(a), Box::new(b));
        let n = 1 << 20;
        let reg = regions.alloc(n).unwrap();
        // SAFETY: the region has n writable bytes, not otherwise accessed here.
        let src = unsafe { std::slice::from_raw_parts_mut(reg.as_ptr(), n) };
        for (i, x) in src.iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }
        let plain: Vec<u8> = (0..n).map(|i| (i % 13) as u8).collect();
        let meta = [7u8; META_LEN];
        for round in 0..3 {
            let mut dst = vec![0u8; n];
            // Direct (registered) then through the ring (a plain Vec), in one direction.
            // SAFETY: buffers outlive the transfers (driven to completion below).
            let rs = unsafe { a.isend(round, &meta, src.as_ptr(), n) }
                .unwrap()
                .unwrap();
            // SAFETY: as above.
            let rr = unsafe { b.irecv(round, dst.as_mut_ptr(), n) }
                .unwrap()
                .unwrap();
            drive(a.as_mut(), b.as_mut(), rs, rr);
            assert!(dst == src, "direct payload differs");
            let mut dst2 = vec![0u8; n];
            // SAFETY: as above.
            let rs = unsafe { a.isend(9, &meta, plain.as_ptr(), n) }
                .unwrap()
                .unwrap();
            // SAFETY: as above.
            let rr = unsafe { b.irecv(9, dst2.as_mut_ptr(), n) }
                .unwrap()
                .unwrap();
            drive(a.as_mut(), b.as_mut(), rs, rr);
            assert!(dst2 == plain);
        }
        assert_eq!(a.direct_bytes(), (3 * n as u64, 0));
        assert_eq!(b.direct_bytes(), (0, 3 * n as u64));
        assert_eq!(a.bytes().0, 3 * n as u64);
    }

    /// A listener that is gone refuses: connect_or_give_up stops when asked to, long before
    /// its deadline.
    #[test]
    fn connecting_to_a_gone_listener_gives_up_when_asked() {
        let t = ShmTransport::new(ShmOptions::default()).unwrap();
        let (l, h) = t.listen(0).unwrap();
        drop(l);
        let t0 = Instant::now();
        let give_up = || t0.elapsed() > Duration::from_millis(200);
        let deadline = t0 + Duration::from_secs(60);
        let e = match t.connect_or_give_up(&h, &|c| c.to_vec(), deadline, &give_up) {
            Ok(_) => panic!("connected to a closed listener"),
            Err(e) => e,
        };
        assert!(matches!(e, NetError::Timeout(_)), "{e}");
        assert!(e.to_string().contains("gave up"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    }

    #[test]
    fn shm_conformance() {
        conf::exchange(&default_pair, conf::SIZES);
        conf::both_directions_at_once(&default_pair);
        conf::mismatch_is_reported_with_meta(&default_pair);
        conf::peek_shows_the_next_header(&default_pair);
        conf::death_goodbye_and_abort(&default_pair);
        conf::delivered_before_death_is_received(&default_pair);
    }

    #[test]
    fn shm_small_ring_wraps_and_backpressures() {
        let small = || {
            pair(ShmOptions {
                ring_bytes: 4096 + 13,
                chunk_bytes: 1000,
                spin: Duration::ZERO,
                oversubscribed: None,
                direct_min: usize::MAX,
            })
        };
        conf::exchange(&small, conf::SIZES);
        conf::both_directions_at_once(&small);
    }

    #[test]
    fn shm_nt_copy_out_matches_memcpy() {
        let src: Vec<u8> = (0..70_000u32).map(|i| (i * 31 + 7) as u8).collect();
        for (so, dof, n) in [
            (0, 0, 65_000),
            (3, 5, 50_001),
            (1, 63, 1024),
            (0, 1, 4097),
            (7, 0, 1000),
        ] {
            let mut dst = vec![0xAAu8; 70_100];
            // SAFETY: both ranges lie inside the vectors.
            unsafe { copy_out(dst.as_mut_ptr().add(dof), src.as_ptr().add(so), n, true) };
            assert_eq!(&dst[dof..dof + n], &src[so..so + n], "{so} {dof} {n}");
            assert!(dst[..dof].iter().all(|&b| b == 0xAA));
            assert!(dst[dof + n..].iter().all(|&b| b == 0xAA));
        }
    }

    #[test]
    fn shm_streaming_receives_wrap_and_backpressure() {
        // Receives of NT_MIN_MSG bytes and more are copied out with non-temporal stores; an odd
        // ring and chunk make every copy start and end unaligned and wrap around.
        let odd = || {
            pair(ShmOptions {
                ring_bytes: (256 << 10) + 13,
                chunk_bytes: 50_001,
                spin: Duration::ZERO,
                oversubscribed: None,
                direct_min: usize::MAX,
            })
        };
        conf::exchange(&odd, &[NT_MIN_MSG + 3, 17, NT_MIN_MSG, 100_000]);
        conf::exchange(&default_pair, &[NT_MIN_MSG + 1, NT_MIN_MSG - 1]);
    }

    #[test]
    fn shm_oversubscription_follows_open_connections() {
        let t = ShmTransport::new(ShmOptions::default()).unwrap();
        let cpus = t.load.cpus;
        assert!(!t.load.oversubscribed());
        // k open connections: k + 1 ranks on the host.
        let mut guards: Vec<LiveGuard> = (1..cpus).map(|_| LiveGuard::new(&t.load)).collect();
        assert!(
            !t.load.oversubscribed(),
            "{} connections, {cpus} cpus",
            guards.len()
        );
        guards.push(LiveGuard::new(&t.load));
        assert!(
            t.load.oversubscribed(),
            "{} connections, {cpus} cpus",
            guards.len()
        );
        drop(guards);
        assert!(!t.load.oversubscribed());
        let forced = ShmTransport::new(ShmOptions {
            oversubscribed: Some(true),
            ..ShmOptions::default()
        })
        .unwrap();
        assert!(forced.load.oversubscribed());
        let (a, b) = pair(ShmOptions {
            oversubscribed: Some(false),
            ..ShmOptions::default()
        });
        assert!(!a.oversubscribed() && !b.oversubscribed());
    }

    #[test]
    fn shm_strangers_are_dropped() {
        let t = ShmTransport::new(ShmOptions::default()).unwrap();
        let (mut l, h) = t.listen(0).unwrap();
        let s = raw_connect(&h);
        let junk = b"GET / HTTP/1.0\r\n\r\n garbage garbage garbage";
        send_fds(s.as_raw_fd(), junk, &[]);
        // A real connection still gets through.
        let t2 = t.clone();
        let th = std::thread::spawn(move || {
            t2.connect_challenged(
                &h,
                &|_| b"ok".to_vec(),
                Instant::now() + Duration::from_secs(5),
            )
            .map(|_| ())
        });
        let end = Instant::now() + Duration::from_secs(5);
        let got = loop {
            if let Some(a) = l.accept_challenged().unwrap() {
                break a.hello;
            }
            assert!(Instant::now() < end);
            std::thread::sleep(Duration::from_millis(1));
        };
        th.join().unwrap().unwrap();
        assert_eq!(got, b"ok");
        // The stranger got its challenge, then was closed by the listener.
        let c = recv_timeout(s.as_raw_fd(), 2000).expect("no challenge");
        assert_eq!(c.len(), CHAL_MSG);
        assert_eq!(recv_timeout(s.as_raw_fd(), 2000), Some(Vec::new()));
    }

    #[test]
    fn shm_throughput_report() {
        // Not a speed goal: prints the pipelined copy rate for a few ring/chunk settings
        // (run with --nocapture --ignored to see it).
        if std::env::var_os("BRAID_SHM_BENCH").is_none() {
            return;
        }
        for (ring, chunk) in [
            (1 << 20, 64 << 10),
            (1 << 20, 256 << 10),
            (2 << 20, 256 << 10),
            (4 << 20, 256 << 10),
            (4 << 20, 512 << 10),
            (16 << 20, 1 << 20),
        ] {
            let (mut a, mut b) = pair(ShmOptions {
                ring_bytes: ring,
                chunk_bytes: chunk,
                spin: Duration::from_micros(
                    std::env::var("BRAID_SHM_BENCH")
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(20),
                ),
                oversubscribed: None,
                direct_min: usize::MAX,
            });
            let n = 64 << 20;
            let iters = 10;
            let th = std::thread::spawn(move || {
                let src = vec![1u8; n];
                for i in 0..iters {
                    // SAFETY: src outlives the request.
                    let s = unsafe { a.isend(i, &[0; META_LEN], src.as_ptr(), n) }
                        .unwrap()
                        .unwrap();
                    conf::wait(a.as_mut(), s).unwrap();
                }
            });
            let mut dst = vec![7u8; n];
            let t0 = Instant::now();
            for i in 0..iters {
                // SAFETY: dst outlives the request.
                let r = unsafe { b.irecv(i, dst.as_mut_ptr(), n) }.unwrap().unwrap();
                conf::wait(b.as_mut(), r).unwrap();
            }
            let dt = t0.elapsed().as_secs_f64();
            th.join().unwrap();
            println!(
                "ring {} KiB chunk {} KiB: {:.2} GB/s",
                ring >> 10,
                chunk >> 10,
                (n * iters as usize) as f64 / dt / 1e9
            );
        }
    }

    // ---- hardening (issue 16): strangers, credentials, seals, corrupt indices ----

    /// A plain blocking unix socket connected to the listener behind `h` (a stranger).
    fn raw_connect(h: &ConnectHandle) -> OwnedFd {
        let (addr, alen) = abstract_addr(&h.addr).unwrap();
        let s = new_socket(false).unwrap();
        // SAFETY: addr is a live sockaddr_un of alen meaningful bytes.
        let r = unsafe {
            libc::connect(
                s.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                alen,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        s
    }

    /// Sends `bytes` with the descriptors `fds` (SCM_RIGHTS) in one message.
    fn send_fds(sock: RawFd, bytes: &[u8], fds: &[RawFd]) {
        let mut cbuf = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        // SAFETY: msghdr is plain data.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            // SAFETY: size computation.
            msg.msg_controllen = unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) } as _;
            // SAFETY: the 128-byte control buffer holds the header and fds.len() <= 8 ints.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr() as *const u8,
                    libc::CMSG_DATA(c),
                    fds.len() * 4,
                );
            }
        }
        // SAFETY: msg describes live buffers.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        assert_eq!(
            n,
            bytes.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// One message (and the descriptors it carried) within `ms`; `Some(empty)` at EOF, `None`
    /// on timeout.
    fn recv_msg_fds(sock: RawFd, ms: i32) -> Option<(Vec<u8>, Vec<OwnedFd>)> {
        let mut p = libc::pollfd {
            fd: sock,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        if unsafe { libc::poll(&mut p, 1, ms) } <= 0 {
            return None;
        }
        let mut buf = vec![0u8; 8192];
        let mut cbuf = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        // SAFETY: msg describes live buffers.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            return Some((Vec::new(), Vec::new()));
        }
        let mut fds = Vec::new();
        // SAFETY: walks the control buffer filled by recvmsg.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let data = libc::CMSG_DATA(c) as *const libc::c_int;
                let cnt = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..cnt {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        buf.truncate(n as usize);
        Some((buf, fds))
    }

    fn recv_timeout(sock: RawFd, ms: i32) -> Option<Vec<u8>> {
        recv_msg_fds(sock, ms).map(|(b, _)| b)
    }

    /// A shm hello message for a segment of `ring`-byte rings.
    fn hello_msg(ring: usize, hello: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&HELLO_MAGIC);
        m.extend_from_slice(&PROTO_VERSION.to_le_bytes());
        m.extend_from_slice(&[0, 0]);
        m.extend_from_slice(&(ring as u64).to_le_bytes());
        m.extend_from_slice(&((RINGS + 2 * ring) as u64).to_le_bytes());
        m.extend_from_slice(&(hello.len() as u32).to_le_bytes());
        m.extend_from_slice(hello);
        m
    }

    /// A stranger's segment for `ring`-byte rings: a memfd named `name` with a valid-looking
    /// header, sealed (shrink, grow) or not.
    fn stranger_segment(name: &std::ffi::CStr, ring: usize, sealed: bool) -> OwnedFd {
        let len = RINGS + 2 * ring;
        // SAFETY: NUL-terminated name.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain system call.
        let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
        assert_eq!(r, 0);
        let mut h = [0u8; 24];
        h[0..8].copy_from_slice(&SEG_MAGIC.to_le_bytes());
        h[8..16].copy_from_slice(&(PROTO_VERSION as u64).to_le_bytes());
        h[16..24].copy_from_slice(&(ring as u64).to_le_bytes());
        // SAFETY: writes 24 bytes from a live buffer at offset 0.
        let r = unsafe { libc::pwrite(fd.as_raw_fd(), h.as_ptr() as *const libc::c_void, 24, 0) };
        assert_eq!(r, 24);
        if sealed {
            // SAFETY: plain system call.
            let r = unsafe {
                libc::fcntl(
                    fd.as_raw_fd(),
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
                )
            };
            assert_eq!(r, 0);
        }
        fd
    }

    /// Whether this process maps a memfd called `name`.
    fn mapped(name: &str) -> bool {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .contains(&format!("/memfd:{name} "))
    }

    /// A stranger connects, reads its challenge (sent when `l` accepts) and passes `seg` (plus
    /// two eventfds) with the hello `hello`; returns its socket and the challenge.
    fn stranger_hello(
        l: &mut ShmListen,
        h: &ConnectHandle,
        ring: usize,
        seg: &OwnedFd,
        hello: &[u8],
    ) -> (OwnedFd, Vec<u8>) {
        let s = raw_connect(h);
        assert!(l.poll_arrival().is_none());
        let c = recv_timeout(s.as_raw_fd(), 2000).unwrap_or_default();
        let (e0, e1) = (new_eventfd().unwrap(), new_eventfd().unwrap());
        send_fds(
            s.as_raw_fd(),
            &hello_msg(ring, hello),
            &[seg.as_raw_fd(), e0.as_raw_fd(), e1.as_raw_fd()],
        );
        (s, c)
    }

    /// A unix socket that speaks the shm handshake by hand.
    struct RawShm {
        s: OwnedFd,
        challenge: Option<Challenge>,
    }

    impl conf::RawPeer for RawShm {
        fn challenge(&self) -> Option<Challenge> {
            self.challenge
        }

        fn dropped(&mut self, within: Duration) -> bool {
            let ms = within.as_millis().min(i32::MAX as u128) as i32;
            recv_timeout(self.s.as_raw_fd(), ms).is_some_and(|m| m.is_empty())
        }
    }

    fn raw_shm(h: &ConnectHandle, declared: Option<usize>) -> Box<dyn conf::RawPeer> {
        let s = raw_connect(h);
        let challenge = recv_timeout(s.as_raw_fd(), 10_000).and_then(|m| {
            (m.len() == CHAL_MSG && m[..4] == CHAL_MAGIC).then(|| {
                let mut c = [0u8; CHALLENGE_LEN];
                c.copy_from_slice(&m[4..]);
                c
            })
        });
        if let (Some(_), Some(n)) = (challenge, declared) {
            // The hello's length field declares n bytes; none follow.
            let mut m = hello_msg(4096, &[]);
            m[24..28].copy_from_slice(&(n.min(u32::MAX as usize) as u32).to_le_bytes());
            send_fds(s.as_raw_fd(), &m, &[]);
        }
        Box::new(RawShm { s, challenge })
    }

    #[test]
    fn shm_challenge_response() {
        let t = ShmTransport::new(ShmOptions::default()).unwrap();
        let t2 = t.clone();
        let listen = move |timeout: Duration, cap: usize| {
            let (mut l, h) = t2.listen_shm().unwrap();
            l.hello_timeout = timeout;
            l.max_pending = cap;
            (Box::new(l) as Box<dyn Listener>, h)
        };
        conf::challenges(&conf::Kit {
            transport: &t,
            listen: &listen,
            raw: &raw_shm,
        });
    }

    #[test]
    fn shm_unsealed_segment_of_a_stranger_is_refused_and_never_mapped() {
        // The SIGBUS attack: a stranger passes a memfd it can truncate after we map it. An
        // unsealed (or half-sealed) segment is refused before mmap; a sealed one of this user
        // with a good hello is accepted (and then cannot shrink).
        let t = ShmTransport::new(ShmOptions::default()).unwrap();
        let (mut l, h) = t.listen_shm().unwrap();
        let ring = 4096;
        let unsealed = stranger_segment(c"braid-test-unsealed", ring, false);
        let (s, c) = stranger_hello(&mut l, &h, ring, &unsealed, b"hi");
        assert_eq!(c.len(), CHAL_MSG, "no challenge before the hello");
        accept_nothing(&mut l, Duration::from_millis(300));
        assert!(
            !mapped("braid-test-unsealed"),
            "an unsealed stranger segment was mapped"
        );
        assert_eq!(
            recv_timeout(s.as_raw_fd(), 2000),
            Some(Vec::new()),
            "not closed"
        );
        // Only shrink sealed: still refused (it could grow and be shrunk... no: but it is not
        // what the protocol asks for).
        // SAFETY: plain system call.
        let half = stranger_segment(c"braid-test-halfsealed", ring, false);
        // SAFETY: plain system call on a sealable memfd.
        let r = unsafe { libc::fcntl(half.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(r, 0);
        let (_s2, _) = stranger_hello(&mut l, &h, ring, &half, b"hi");
        accept_nothing(&mut l, Duration::from_millis(300));
        assert!(!mapped("braid-test-halfsealed"));
        // Sealed: accepted, mapped, and truncating it fails.
        let sealed = stranger_segment(c"braid-test-sealed", ring, true);
        let (_s3, _) = stranger_hello(&mut l, &h, ring, &sealed, b"hi");
        let (_conn, hello, _, pid) = accept_one(&mut l).expect("sealed segment refused");
        assert_eq!(hello, b"hi");
        assert_eq!(pid, std::process::id());
        assert!(mapped("braid-test-sealed"));
        // SAFETY: plain system call.
        assert_ne!(unsafe { libc::ftruncate(sealed.as_raw_fd(), 0) }, 0);
    }

    #[test]
    fn shm_hello_check_runs_before_anything_is_mapped() {
        let t = ShmTransport::new(ShmOptions::default()).unwrap();
        let (mut l, h) = t.listen_shm().unwrap();
        // The check sees the challenge sent on this connection: accept only hellos that echo it.
        l.set_hello_check(Box::new(|c: &Challenge, hello: &[u8], _pid| {
            if hello == c {
                Ok(())
            } else {
                Err("not the challenge".into())
            }
        }));
        let ring = 4096;
        let seg = stranger_segment(c"braid-test-badmac", ring, true);
        let (s, _) = stranger_hello(&mut l, &h, ring, &seg, b"not the challenge");
        // The listener's fd wakes a poller when a pending connection's hello arrives.
        let mut pfd = libc::pollfd {
            fd: l.fd().unwrap(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 2000) };
        assert_eq!(r, 1, "fd not readable");
        accept_nothing(&mut l, Duration::from_millis(300));
        assert!(
            !mapped("braid-test-badmac"),
            "mapped before the hello check"
        );
        assert_eq!(
            recv_timeout(s.as_raw_fd(), 2000),
            Some(Vec::new()),
            "not closed"
        );
        // A connector that answers the challenge gets through.
        let t2 = t.clone();
        let th = std::thread::spawn(move || {
            t2.connect_shm(&h, &|c| c.to_vec(), Instant::now() + Duration::from_secs(5))
                .map(|_| ())
        });
        let (_, hello, c, _) = accept_one(&mut l).expect("a good hello was refused");
        assert_eq!(hello, c);
        th.join().unwrap().unwrap();
    }

    #[test]
    fn shm_challenge_differs_per_connection() {
        let t = ShmTransport::new(ShmOptions::default()).unwrap();
        let (mut l, h) = t.listen(0).unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (t2, h2) = (t.clone(), h.clone());
            let th = std::thread::spawn(move || {
                t2.connect_challenged(
                    &h2,
                    &|c| c.to_vec(),
                    Instant::now() + Duration::from_secs(5),
                )
                .map(|_| ())
            });
            let end = Instant::now() + Duration::from_secs(5);
            let a = loop {
                if let Some(a) = l.accept_challenged().unwrap() {
                    break a;
                }
                assert!(Instant::now() < end, "no arrival");
                std::thread::sleep(Duration::from_millis(1));
            };
            th.join().unwrap().unwrap();
            assert_eq!(
                a.hello, a.challenge,
                "the hello was not built from the challenge"
            );
            assert_ne!(a.challenge, [0; CHALLENGE_LEN]);
            assert_eq!(a.peer_pid, Some(std::process::id()));
            assert!(!seen.contains(&a.challenge), "challenge repeated");
            seen.push(a.challenge);
        }
    }

    #[test]
    fn shm_connector_segment_is_sealed_against_truncation() {
        // The test plays the listener: it receives the connector's segment as a peer would,
        // and cannot truncate it (so it could never SIGBUS the connector).
        let fd = new_socket(false).unwrap();
        let name =
            format!("braid-test-seal-{}-{:x}", std::process::id(), random_u64()).into_bytes();
        let (addr, len) = abstract_addr(&name).unwrap();
        // SAFETY: addr is a live sockaddr_un.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                len,
            )
        };
        assert_eq!(r, 0);
        // SAFETY: plain system call.
        assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), 4) }, 0);
        let h = ConnectHandle {
            transport: "shm".into(),
            addr: name,
        };
        let t = ShmTransport::new(ShmOptions {
            ring_bytes: 8192,
            ..ShmOptions::default()
        })
        .unwrap();
        let th = std::thread::spawn(move || {
            t.connect_shm(&h, &|c| c.to_vec(), Instant::now() + Duration::from_secs(5))
                .map(|_| ())
        });
        // SAFETY: accept without address output.
        let c = unsafe { libc::accept(fd.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut()) };
        assert!(c >= 0);
        // SAFETY: fresh descriptor.
        let c = unsafe { OwnedFd::from_raw_fd(c) };
        let mut m = [0u8; CHAL_MSG];
        m[..4].copy_from_slice(&CHAL_MAGIC);
        m[4..].copy_from_slice(&[9u8; CHALLENGE_LEN]);
        send_fds(c.as_raw_fd(), &m, &[]);
        let (hello, fds) = recv_msg_fds(c.as_raw_fd(), 5000).expect("no hello");
        th.join().unwrap().unwrap();
        assert_eq!(&hello[HELLO_FIXED..], &[9u8; CHALLENGE_LEN]);
        assert_eq!(fds.len(), NFDS);
        let seg = fds[0].as_raw_fd();
        // SAFETY: plain system calls on a received descriptor.
        let seals = unsafe { libc::fcntl(seg, libc::F_GET_SEALS) };
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want, "seals {seals:#x}");
        // SAFETY: as above.
        let r = unsafe { libc::ftruncate(seg, 0) };
        assert_ne!(r, 0, "the segment could be truncated");
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EPERM)
        );
        // SAFETY: as above (the seals cannot be removed or added either).
        let r = unsafe { libc::fcntl(seg, libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert_ne!(r, 0);
    }

    /// In a forked child (async-signal-safe calls only): exits 1 when `fd` delivers bytes
    /// within 5 s, 0 when it was closed without any, 2 when nothing came.
    ///
    /// # Safety
    /// Only in a forked child; `fd` is a socket of that child.
    unsafe fn exit_by_reply(fd: libc::c_int) -> ! {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is a live pollfd; the caller owns `fd`.
        if unsafe { libc::poll(&mut p, 1, 5000) } != 1 {
            // SAFETY: _exit is async-signal-safe and ends the child at once.
            unsafe { libc::_exit(2) };
        }
        let mut b = [0u8; 64];
        // SAFETY: `b` is a live 64-byte buffer.
        let n = unsafe {
            libc::recv(
                fd,
                b.as_mut_ptr() as *mut libc::c_void,
                64,
                libc::MSG_DONTWAIT,
            )
        };
        // SAFETY: as above.
        unsafe { libc::_exit(if n > 0 { 1 } else { 0 }) }
    }

    #[test]
    fn shm_peer_of_another_uid_is_refused() {
        let t = ShmTransport::new(ShmOptions::default()).unwrap();
        // 1. Any user: a listener that admits only another uid refuses this process before
        //    sending a challenge (so the connector fails at once, nothing is read or mapped).
        let (mut l, h) = t.listen_shm().unwrap();
        l.uid = my_uid().wrapping_add(1);
        let t2 = t.clone();
        let th = std::thread::spawn(move || {
            t2.connect_shm(&h, &|c| c.to_vec(), Instant::now() + Duration::from_secs(5))
                .map(|_| ())
        });
        accept_nothing(&mut l, Duration::from_millis(200));
        match th.join().unwrap() {
            Err(NetError::Closed(m)) => assert!(m.contains("before its challenge"), "{m}"),
            other => panic!("a connector of another uid got {other:?}"),
        }
        assert!(l.pending.is_empty());
        let e = check_cred(
            Some(libc::ucred {
                pid: 4242,
                uid: 7,
                gid: 7,
            }),
            8,
        )
        .unwrap_err();
        assert!(e.contains("pid 4242") && e.contains("uid 7"), "{e}");
        // 2. As root: a real process of another uid (a forked child that drops to nobody)
        //    connects and passes a sealed segment without waiting: it is refused, never mapped.
        if my_uid() != 0 {
            return;
        }
        let (mut l, h) = t.listen_shm().unwrap();
        let (addr, alen) = abstract_addr(&h.addr).unwrap();
        let ring = 4096;
        let msg = hello_msg(ring, b"hi");
        // SAFETY: the child uses only async-signal-safe system calls on memory prepared before
        // the fork, and leaves with _exit.
        let child = unsafe { libc::fork() };
        assert!(child >= 0);
        if child == 0 {
            // SAFETY: as above.
            unsafe {
                if libc::syscall(libc::SYS_setgid, 65534) != 0
                    || libc::syscall(libc::SYS_setuid, 65534) != 0
                {
                    libc::_exit(10);
                }
                let s = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
                if libc::connect(s, &addr as *const _ as *const libc::sockaddr, alen) != 0 {
                    libc::_exit(11);
                }
                let m =
                    libc::memfd_create(c"braid-test-otheruid".as_ptr(), libc::MFD_ALLOW_SEALING);
                let len = (RINGS + 2 * ring) as libc::off_t;
                if m < 0 || libc::ftruncate(m, len) != 0 {
                    libc::_exit(12);
                }
                libc::pwrite(
                    m,
                    SEG_MAGIC.to_le_bytes().as_ptr() as *const libc::c_void,
                    8,
                    0,
                );
                libc::fcntl(
                    m,
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
                );
                let fds = [m, libc::eventfd(0, 0), libc::eventfd(0, 0)];
                let mut cbuf = [0u64; 16];
                let mut iov = libc::iovec {
                    iov_base: msg.as_ptr() as *mut libc::c_void,
                    iov_len: msg.len(),
                };
                let mut mh: libc::msghdr = std::mem::zeroed();
                mh.msg_iov = &mut iov;
                mh.msg_iovlen = 1;
                mh.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
                mh.msg_controllen = libc::CMSG_SPACE(12) as _;
                let c = libc::CMSG_FIRSTHDR(&mh);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(12) as _;
                std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(c), 12);
                // The listener may already have closed the socket: that is the refusal too.
                libc::sendmsg(s, &mh, libc::MSG_NOSIGNAL);
                // 0: closed without a challenge (refused); 1: got something; 2: nothing in 5 s.
                exit_by_reply(s);
            }
        }
        let end = Instant::now() + Duration::from_secs(10);
        let status = loop {
            assert!(
                l.poll_arrival().is_none(),
                "a process of another uid was accepted"
            );
            let mut st = 0;
            // SAFETY: waits for our own child without blocking.
            let r = unsafe { libc::waitpid(child, &mut st, libc::WNOHANG) };
            if r == child {
                break st;
            }
            assert!(Instant::now() < end, "the child did not finish");
            std::thread::sleep(Duration::from_millis(2));
        };
        assert!(libc::WIFEXITED(status), "child status {status}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "child of another uid was not refused at once"
        );
        assert!(!mapped("braid-test-otheruid"));
        assert!(l.pending.is_empty());

        // 3. As root: a listener of another uid (a forked child as nobody, on a name of its
        //    own) is refused by the connector before it reads anything or sends its segment.
        let name = format!(
            "braid-test-nobody-{}-{:x}",
            std::process::id(),
            random_u64()
        );
        let (addr, alen) = abstract_addr(name.as_bytes()).unwrap();
        let msg = [0u8; CHAL_MSG];
        // SAFETY: as for the first child.
        let child = unsafe { libc::fork() };
        assert!(child >= 0);
        if child == 0 {
            // SAFETY: as above.
            unsafe {
                if libc::syscall(libc::SYS_setgid, 65534) != 0
                    || libc::syscall(libc::SYS_setuid, 65534) != 0
                {
                    libc::_exit(10);
                }
                let s = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
                if libc::bind(s, &addr as *const _ as *const libc::sockaddr, alen) != 0
                    || libc::listen(s, 4) != 0
                {
                    libc::_exit(11);
                }
                let mut p = libc::pollfd {
                    fd: s,
                    events: libc::POLLIN,
                    revents: 0,
                };
                if libc::poll(&mut p, 1, 5000) != 1 {
                    libc::_exit(2);
                }
                let c = libc::accept(s, std::ptr::null_mut(), std::ptr::null_mut());
                libc::send(
                    c,
                    msg.as_ptr() as *const libc::c_void,
                    msg.len(),
                    libc::MSG_NOSIGNAL,
                );
                // 0: the connector closed without a hello; 1: it sent one; 2: nothing in 5 s.
                exit_by_reply(c);
            }
        }
        let h = ConnectHandle {
            transport: "shm".into(),
            addr: name.into_bytes(),
        };
        let r = t.connect_shm(&h, &|c| c.to_vec(), Instant::now() + Duration::from_secs(5));
        let mut st = 0;
        // SAFETY: waits for our own child.
        let w = unsafe { libc::waitpid(child, &mut st, 0) };
        assert_eq!(w, child);
        match r {
            Err(NetError::Unavailable(m)) => assert!(m.contains("uid 65534"), "{m}"),
            Err(e) => panic!("a listener of another uid: {e}"),
            Ok(_) => panic!("connected to a listener of another uid"),
        }
        assert!(libc::WIFEXITED(st), "child status {st}");
        assert_eq!(
            libc::WEXITSTATUS(st),
            0,
            "the connector sent a hello to another uid"
        );
    }

    #[test]
    fn shm_pending_connections_are_capped() {
        let t = ShmTransport::new(ShmOptions::default()).unwrap();
        let (mut l, h) = t.listen_shm().unwrap();
        // (Accepting as they come: a full backlog would block the next connect.)
        let silent: Vec<OwnedFd> = (0..MAX_PENDING + 5)
            .map(|_| {
                let s = raw_connect(&h);
                assert!(l.poll_arrival().is_none());
                s
            })
            .collect();
        accept_nothing(&mut l, Duration::from_millis(50));
        assert_eq!(l.pending.len(), MAX_PENDING);
        // The extra ones were closed without a challenge.
        // The waiting ones got their challenge.
        let got: Vec<usize> = silent
            .iter()
            .map(|s| recv_timeout(s.as_raw_fd(), 1000).map_or(usize::MAX, |m| m.len()))
            .collect();
        assert_eq!(got.iter().filter(|&&n| n == 0).count(), 5, "{got:?}");
        assert_eq!(got.iter().filter(|&&n| n == CHAL_MSG).count(), MAX_PENDING);
        // Silence past the deadline frees the slots.
        l.hello_timeout = Duration::ZERO;
        accept_nothing(&mut l, Duration::from_millis(10));
        assert!(l.pending.is_empty());
        // Nothing is left to wake a poller of the listener.
        let mut pfd = libc::pollfd {
            fd: l.fd().unwrap(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0);
    }

    /// Drives `c` until `progress` fails (the error) or 2 s pass (panics).
    fn until_error(c: &mut ShmConn) -> NetError {
        let end = Instant::now() + Duration::from_secs(2);
        loop {
            let mut fds = Vec::new();
            c.poll_fds(&mut fds);
            if let Err(e) = c.progress() {
                return e;
            }
            assert!(Instant::now() < end, "no error from a corrupt segment");
        }
    }

    fn assert_corrupt(e: NetError) {
        let m = e.to_string();
        assert!(matches!(e, NetError::Protocol(_)), "{m}");
        assert!(m.contains("shm peer pid") && m.contains("corrupt"), "{m}");
    }

    /// Messages from b to a, more than b's ring in all (so that b has re-read the tail).
    fn warm_up(a: &mut ShmConn, b: &mut ShmConn) {
        let src = [5u8; 4000];
        for i in 0..5 {
            let mut dst = [0u8; 4000];
            // SAFETY: buffers outlive the transfer (driven to completion).
            let rs = unsafe { b.isend(i, &[0; META_LEN], src.as_ptr(), 4000) }
                .unwrap()
                .unwrap();
            // SAFETY: as above.
            let rr = unsafe { a.irecv(i, dst.as_mut_ptr(), 4000) }
                .unwrap()
                .unwrap();
            drive(a, b, rr, rs);
            assert_eq!(dst, src);
        }
        assert!(b.peer_tail > 3);
    }

    #[test]
    fn shm_corrupt_ring_indices_are_protocol_errors() {
        let opts = ShmOptions {
            ring_bytes: 8192,
            ..ShmOptions::default()
        };
        let t = ShmTransport::new(opts.clone()).unwrap();
        let mut dst = vec![0u8; 4096];
        let src = vec![1u8; 4096];
        // The receiver a (side 1) reads the head of side 0's ring, which the peer b writes.
        // 1. Head moved backwards (below what a consumed).
        let (mut a, mut b, ..) = raw_pair(&t, b"x");
        warm_up(&mut a, &mut b);
        b.seg.atom(block(0) + OFF_HEAD).store(1, Ordering::Release);
        // SAFETY: dst outlives the connection's use of it (a fails, then drops).
        let r = unsafe { a.irecv(2, dst.as_mut_ptr(), 4096) };
        assert_corrupt(match r {
            Err(e) => e,
            Ok(_) => until_error(&mut a),
        });
        // 2. Head more than a ring ahead.
        let (mut a, mut b, ..) = raw_pair(&t, b"x");
        warm_up(&mut a, &mut b);
        b.seg
            .atom(block(0) + OFF_HEAD)
            .store(u64::MAX - 7, Ordering::Release);
        // SAFETY: as above.
        let r = unsafe { a.irecv(2, dst.as_mut_ptr(), 4096) };
        assert_corrupt(match r {
            Err(e) => e,
            Ok(_) => until_error(&mut a),
        });
        // 3. The sender b reads the tail of its ring, written by a: past what b published.
        let (mut a, mut b, ..) = raw_pair(&t, b"x");
        warm_up(&mut a, &mut b);
        a.seg
            .atom(block(0) + OFF_TAIL)
            .store(1 << 40, Ordering::Release);
        // Fill b's ring so that it must re-read the tail.
        let mut err = None;
        for i in 0..4 {
            // SAFETY: src outlives the connection's use of it.
            if let Err(e) = unsafe { b.isend(10 + i, &[0; META_LEN], src.as_ptr(), 4096) } {
                err = Some(e);
                break;
            }
        }
        assert_corrupt(err.unwrap_or_else(|| until_error(&mut b)));
        // The error is sticky and the connection stays usable for reporting.
        assert!(b.progress().is_err());
        // 4. Tail moved backwards.
        let (mut a, mut b, ..) = raw_pair(&t, b"x");
        warm_up(&mut a, &mut b);
        a.seg.atom(block(0) + OFF_TAIL).store(3, Ordering::Release);
        let mut err = None;
        for i in 0..4 {
            // SAFETY: as above.
            if let Err(e) = unsafe { b.isend(10 + i, &[0; META_LEN], src.as_ptr(), 4096) } {
                err = Some(e);
                break;
            }
        }
        assert_corrupt(err.unwrap_or_else(|| until_error(&mut b)));
    }

    #[test]
    fn shm_corrupt_direct_acknowledgement_is_a_protocol_error() {
        let regions = Regions::new();
        let opts = ShmOptions {
            ring_bytes: 64 << 10,
            direct_min: 1,
            ..ShmOptions::default()
        };
        let t = ShmTransport::with_regions(opts, regions.clone()).unwrap();
        let (a, mut b, ..) = raw_pair(&t, b"x");
        let n = 1 << 20;
        let reg = regions.alloc(n).unwrap();
        // SAFETY: the region outlives the connection's use of it.
        let r = unsafe { b.isend(1, &[0; META_LEN], reg.as_ptr(), n) }
            .unwrap()
            .unwrap();
        assert!(b.tx.front().is_some_and(|t| t.awaiting), "not sent direct");
        // The receiver claims to have finished 5 direct frames (only one was sent).
        a.seg
            .atom(block(1) + OFF_DACK)
            .store((5 << 1) | 1, Ordering::Release);
        assert_corrupt(until_error(&mut b));
        assert!(b.test(r).is_err());
    }

    #[test]
    fn shm_direct_falls_back_to_the_ring_for_an_unsealed_region() {
        // A region whose memfd is not sealed is never mapped by the receiver: the payload
        // arrives through the ring instead (right bytes, no single-copy bytes counted).
        let regions = Regions::new();
        let opts = ShmOptions {
            ring_bytes: 64 << 10,
            direct_min: 1,
            ..ShmOptions::default()
        };
        let t = ShmTransport::with_regions(opts, regions.clone()).unwrap();
        let (mut a, mut b, ..) = raw_pair(&t, b"x");
        let n = 256 << 10;
        let reg = regions.alloc_unsealed(n).unwrap();
        // SAFETY: the region has n writable bytes.
        let s = unsafe { std::slice::from_raw_parts_mut(reg.as_ptr(), n) };
        for (i, x) in s.iter_mut().enumerate() {
            *x = (i % 241) as u8;
        }
        let mut dst = vec![0u8; n];
        // SAFETY: buffers outlive the transfer.
        let rs = unsafe { b.isend(3, &[1; META_LEN], reg.as_ptr(), n) }
            .unwrap()
            .unwrap();
        // SAFETY: as above.
        let rr = unsafe { a.irecv(3, dst.as_mut_ptr(), n) }.unwrap().unwrap();
        drive(&mut a, &mut b, rr, rs);
        assert!(dst == s, "payload differs");
        assert_eq!(a.direct_bytes(), (0, 0));
        assert_eq!(b.direct_bytes(), (0, 0));
        assert!(a.remote.is_empty(), "the unsealed region was mapped");
    }

    /// A connected pair between two transports: `tc` connects to a listener of `tl`. Returns
    /// (accepted side of `tl`, connecting side of `tc`).
    fn raw_pair_between(tl: &ShmTransport, tc: &ShmTransport) -> (ShmConn, ShmConn) {
        let (mut l, h) = tl.listen_shm().unwrap();
        let t2 = tc.clone();
        let th = std::thread::spawn(move || {
            t2.connect_shm(
                &h,
                &|_| b"x".to_vec(),
                Instant::now() + Duration::from_secs(5),
            )
        });
        let (a, ..) = accept_one(&mut l).expect("no arrival");
        let b = th.join().unwrap().unwrap();
        (*a, b)
    }

    /// Pages of `seg` from byte `from` to `to` that exist in the segment's memfd (mincore).
    fn resident_pages(seg: &Seg, from: usize, to: usize) -> usize {
        let n = (to - from).div_ceil(PAGE);
        let mut v = vec![0u8; n];
        // SAFETY: [from, to) lies inside the page-aligned mapping of seg (from a multiple of
        // PAGE); v has one byte per page.
        let r = unsafe {
            libc::mincore(
                seg.ptr(from) as *mut libc::c_void,
                to - from,
                v.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        v.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[test]
    fn shm_ring_size_is_the_connectors_and_may_differ_between_ends() {
        // Each connection's rings have the size the connecting side configured (it creates the
        // segment); the acceptor takes it from the hello and header, whatever its own option.
        let opts = |ring| ShmOptions {
            ring_bytes: ring,
            chunk_bytes: 16 << 10,
            spin: Duration::ZERO,
            ..ShmOptions::default()
        };
        let small = ShmTransport::new(opts(64 << 10)).unwrap();
        let big = ShmTransport::new(opts(1 << 20)).unwrap();
        for (tl, tc, want) in [(&small, &big, 1 << 20), (&big, &small, 64 << 10)] {
            let (a, b) = raw_pair_between(tl, tc);
            assert_eq!((a.ring, b.ring), (want, want));
            assert_eq!(a.seg.len, RINGS + 2 * want);
            assert_eq!(a.seg.atom(16).load(Ordering::Relaxed), want as u64);
        }
        // Messages larger than either ring, both ways, on connections made in both directions.
        let mk = |tl: &ShmTransport, tc: &ShmTransport| -> (Box<dyn Conn>, Box<dyn Conn>) {
            let (a, b) = raw_pair_between(tl, tc);
            (Box::new(a), Box::new(b))
        };
        let sizes = &[(3 << 20) + 7, 1, (64 << 10) + 1, 200_000, 0];
        conf::exchange(&|| mk(&small, &big), sizes);
        conf::exchange(&|| mk(&big, &small), sizes);
        conf::exchange(
            &|| {
                let (a, b) = mk(&small, &big);
                (b, a)
            },
            sizes,
        );
        conf::both_directions_at_once(&|| mk(&small, &big));
        conf::both_directions_at_once(&|| mk(&big, &small));
    }

    #[test]
    fn shm_small_messages_stay_at_the_start_of_the_ring() {
        // A drained ring takes the next small frame back to offset 0 (behind a padding frame):
        // 2,000 messages of 3 KiB, one at a time, allocate a few pages of a 4 MiB ring, not
        // the 6 MB they add up to; interleaved sizes keep arriving intact.
        let ring = 4 << 20;
        let t = ShmTransport::new(ShmOptions {
            ring_bytes: ring,
            spin: Duration::ZERO,
            ..ShmOptions::default()
        })
        .unwrap();
        let (mut a, mut b, ..) = raw_pair(&t, b"x");
        let meta = [3u8; META_LEN];
        let mut total = 0u64;
        for i in 0..2000usize {
            let n = [3072, 1, 0, 4000, 777][i % 5];
            let src: Vec<u8> = (0..n).map(|k| (k + i) as u8).collect();
            let mut dst = vec![0u8; n];
            // SAFETY: the buffers outlive the transfer (driven to completion below).
            let rs = unsafe { b.isend(i as u64, &meta, src.as_ptr(), n) }
                .unwrap()
                .unwrap();
            // SAFETY: as above.
            let rr = unsafe { a.irecv(i as u64, dst.as_mut_ptr(), n) }
                .unwrap()
                .unwrap();
            drive(&mut b, &mut a, rs, rr);
            assert!(dst == src, "message {i} differs");
            total += n as u64;
        }
        assert_eq!(a.bytes().1, total);
        let pages = resident_pages(&b.seg, RINGS, RINGS + ring);
        assert!(pages <= 3, "{pages} pages of the ring allocated");
        // A forged padding frame that does not run to the ring's end is an error naming it.
        let off = (b.head % ring as u64) as usize;
        let mut h = [0u8; HDR];
        h[0..4].copy_from_slice(&PAD_MAGIC);
        h[16..24].copy_from_slice(&100u64.to_le_bytes());
        // SAFETY: HDR bytes at the write position of side 0's ring, inside the mapping.
        unsafe { ring_write(b.ring_ptr(0), ring, b.head, h.as_ptr(), HDR) };
        assert!(off + HDR <= ring);
        b.seg
            .atom(block(0) + OFF_HEAD)
            .store(b.head + 100, Ordering::Release);
        let mut dst = [0u8; 8];
        // SAFETY: the buffer outlives the request (the connection fails below).
        let err = match unsafe { a.irecv(99, dst.as_mut_ptr(), 8) } {
            Err(e) => e,
            Ok(rr) => {
                let rr = rr.unwrap();
                let end = Instant::now() + Duration::from_secs(5);
                loop {
                    if let Err(e) = a.progress() {
                        break e;
                    }
                    if let Err(e) = a.test(rr) {
                        break e;
                    }
                    assert!(Instant::now() < end, "the forged padding was accepted");
                }
            }
        };
        assert!(
            err.to_string().contains("padding frame of 100 bytes"),
            "{err}"
        );
    }

    #[test]
    fn shm_segment_is_mapped_lazily() {
        // Nothing of the rings exists before a message reaches it (no MAP_POPULATE): an idle
        // connection costs its header and control pages only; a message allocates the ring
        // pages it passes through and no more.
        let ring = 4 << 20;
        let t = ShmTransport::new(ShmOptions {
            ring_bytes: ring,
            spin: Duration::ZERO,
            ..ShmOptions::default()
        })
        .unwrap();
        let (mut a, mut b, ..) = raw_pair(&t, b"x");
        let end = RINGS + 2 * ring;
        assert_eq!(
            resident_pages(&a.seg, RINGS, end),
            0,
            "rings populated up front"
        );
        assert!(resident_pages(&b.seg, 0, RINGS) <= 3);
        // 256 KiB (plus a 64-byte frame header) from the connector (side 0) to the acceptor.
        let n = 256 << 10;
        let src: Vec<u8> = (0..n).map(|i| (i % 199) as u8).collect();
        let mut dst = vec![0u8; n];
        // SAFETY: the buffers outlive the transfer (driven to completion below).
        let rs = unsafe { b.isend(1, &[0; META_LEN], src.as_ptr(), n) }
            .unwrap()
            .unwrap();
        // SAFETY: as above.
        let rr = unsafe { a.irecv(1, dst.as_mut_ptr(), n) }.unwrap().unwrap();
        drive(&mut b, &mut a, rs, rr);
        assert!(dst == src);
        let pages = (n + HDR).div_ceil(PAGE);
        let side0 = resident_pages(&b.seg, RINGS, RINGS + ring);
        assert!(
            (pages..=pages + 1).contains(&side0),
            "{side0} pages of the sending ring exist, expected {pages}"
        );
        assert_eq!(
            resident_pages(&a.seg, RINGS + ring, end),
            0,
            "idle ring populated"
        );
    }
}
