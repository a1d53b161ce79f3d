//! The emulated NIC: a userspace reliable-connected device that speaks the [`super::nic`]
//! interface over TCP. **It is a test and demo device**: the ib transport uses it only when
//! asked for it by name (never as a silent fallback for missing RDMA hardware), and it gives
//! none of the performance of RDMA: every byte goes through the kernel's TCP stack and a thread
//! of this process.
//!
//! # What of RC it emulates
//!
//! - Memory regions with lkey/rkey (one random key serves as both) and access rights; SGEs are
//!   checked against the local table (`LOC_PROT_ERR`), RDMA WRITE targets against the
//!   responder's table (rkey, `[addr, addr + len)` inside the region, `ACCESS_REMOTE_WRITE`)
//!   *before* any byte is placed (`REM_ACCESS_ERR`, both QPs to Error).
//! - SEND / SEND with immediate consume the responder's next posted receive (too long:
//!   `LOC_LEN_ERR` there, `REM_INV_REQ_ERR` at the requester); RDMA WRITE; RDMA WRITE with
//!   immediate (the write, then one receive consumed with opcode `RecvRdmaWithImm`).
//! - Reliable, in-order delivery per QP, with send completions reported only once the
//!   responder acknowledged that the data is placed in its memory, as RC hardware does.
//!   Requests are pipelined (the requester does not wait for one ACK before sending the next).
//! - Receiver-not-ready: a SEND / WRITE_IMM finding no receive waits and is retried at the
//!   `min_rnr_timer` interval (the verbs table, at least 1 ms) up to `rnr_retry` times (7:
//!   forever), then `RNR_RETRY_EXC_ERR` at the requester, whose QP goes to Error.
//! - Dead peer: socket EOF/reset, or no answer for `(retry_cnt + 1)` ACK timeouts (the verbs
//!   `timeout` exponent, clamped to 100 ms..2 s per try): every outstanding (sent, unacknowledged)
//!   WR completes with `RETRY_EXC_ERR`, the QP goes to Error and later WRs flush
//!   (`WR_FLUSH_ERR`). A peer QP that went away while nothing was outstanding is noticed by the
//!   next WR, which completes with `RETRY_EXC_ERR` at once.
//! - Error state: every posted and later WR completes with `WR_FLUSH_ERR`.
//! - Completion queues with an eventfd that becomes readable when a completion arrives after
//!   [`Cq::arm`].
//!
//! # What it does not
//!
//! RDMA READ and atomics, SRQs, multiple SGEs, inline data, PSN-level retransmission (TCP is
//! reliable), path migration, CQ overrun errors (a CQ grows past its depth with a log line; it
//! is bounded by the posted WRs anyway). A QP in Error answers new requests at once with a NAK
//! (`RETRY_EXC_ERR` at the requester) where hardware stays silent until the requester's
//! retries run out. Packets reaching a QP still in INIT wait (at most 10 s, with keep-alives to
//! the requester) instead of being dropped and retried.
//!
//! # Wire and threads
//!
//! One NIC = one TCP listener on `bind:0` and one thread (`braid-emu-nic`) that accepts
//! connections. [`QpAddr::nic_addr`] carries the NIC's socket address and a random per-QP
//! 16-byte secret; [`Qp::connect`] opens one socket from the local QP to the peer's NIC and
//! presents the peer QP's number and secret in a fixed-size hello. The socket carries this QP's
//! requests one way and the responder's ACK/NAK frames back (each QP pair uses two sockets, one
//! per direction). A connection whose hello does not name a live QP with its secret (or that
//! sends nothing within 2 s) is dropped with a log line; at most 16 hellos are awaited at once,
//! and nothing is allocated from anything a stranger sends. All frames have fixed sizes; payload
//! lengths are checked against the target (receive buffer or region) before anything is read,
//! and payloads are read from the socket straight into the target memory.
//!
//! Blocking reads on per-socket threads were chosen over an epoll loop: each accepted
//! connection gets a responder thread (it places data in memory and answers), each connected
//! QP a sender thread (it walks the send queue) and an ACK reader thread. That keeps every state
//! machine a straight-line function with no partial-frame bookkeeping, and large transfers are
//! streamed in 1 MiB system calls with no extra copy. Sockets use short receive/send timeouts
//! (50 ms) so that every wait checks its deadline and the stop flags; nothing sleeps in the data
//! path except the RNR back-off (a condition-variable wait that a posted receive ends early).
//!
//! Memory safety: the NIC reads and writes registered memory only with raw `send`/`recv` system
//! calls made while holding the read side of the region table's lock, after checking that the
//! range is still registered; [`Nic::dereg_mr`] takes the write side, so once it returns the
//! NIC never touches that memory again.

use super::nic::{
    self, status, ConnectParams, Cq, LinkLayer, Mr, Nic, NicError, NicResult, PortInfo, Qp, QpAddr,
    QpState, SendOp, SendWr, Sge, Wc, WcOpcode,
};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MAGIC: [u8; 8] = *b"BRAIDEMU";
const VERSION: u32 = 1;
const SECRET_LEN: usize = 16;
/// magic 8, version 4, target qpn 4, secret 16, source qpn 4, rnr_retry 1, min_rnr_timer 1, pad 2.
const HELLO_LEN: usize = 40;
/// magic 8, status 4.
const REPLY_LEN: usize = 12;
/// op 1, pad 3, seq 4, len 4, imm 4, remote_addr 8, rkey 4, pad 4.
const REQ_LEN: usize = 32;
/// kind 1, pad 3, status 4, seq 4, pad 4.
const RESP_LEN: usize = 16;

const OP_SEND: u8 = 1;
const OP_SEND_IMM: u8 = 2;
const OP_WRITE: u8 = 3;
const OP_WRITE_IMM: u8 = 4;

const R_ACK: u8 = 1;
const R_NAK: u8 = 2;
const R_WAIT: u8 = 3;

/// Socket receive/send timeout: how often blocked I/O re-checks deadlines and stop flags.
const SLICE: Duration = Duration::from_millis(50);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const RTR_WAIT: Duration = Duration::from_secs(10);
const KEEPALIVE: Duration = Duration::from_millis(100);
/// A frame that started arriving must keep progressing at least this often.
const STALL_TIMEOUT: Duration = Duration::from_secs(5);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const QP_DROP_WAIT: Duration = Duration::from_secs(2);
const MAX_HANDSHAKES: usize = 16;
const CHUNK: u64 = 1 << 20;

/// Handles of completion queues, unique across every emulated NIC of the process.
static NEXT_HANDLE: AtomicU64 = AtomicU64::new(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_lock<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn random_u32() -> NicResult<u32> {
    let mut b = [0u8; 4];
    crate::random_bytes(&mut b).map_err(|e| NicError::new("getrandom", e.to_string()))?;
    Ok(u32::from_le_bytes(b))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_be_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_be_bytes(w)
}

/// Options of [`open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmuOptions {
    /// Address the NIC's listener binds (port chosen by the system).
    pub bind: IpAddr,
    /// Device name reported by [`Nic::port`].
    pub name: String,
}

impl Default for EmuOptions {
    fn default() -> Self {
        EmuOptions {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            name: "emu0".to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Socket I/O on raw descriptors (send/recv with MSG_NOSIGNAL; timeouts set on the socket).

enum Io {
    Data(usize),
    Eof,
    Again,
    Err(std::io::Error),
}

fn io_result(n: isize) -> Io {
    if n > 0 {
        return Io::Data(n as usize);
    }
    if n == 0 {
        return Io::Eof;
    }
    let e = std::io::Error::last_os_error();
    match e.kind() {
        std::io::ErrorKind::WouldBlock
        | std::io::ErrorKind::TimedOut
        | std::io::ErrorKind::Interrupted => Io::Again,
        _ => Io::Err(e),
    }
}

/// # Safety
/// `ptr..ptr + len` must be writable memory that nothing frees during the call.
unsafe fn recv_raw(fd: RawFd, ptr: *mut u8, len: usize) -> Io {
    // SAFETY: the caller guarantees the range is writable for the duration of the call.
    let n = unsafe { libc::recv(fd, ptr as *mut libc::c_void, len, 0) };
    io_result(n)
}

/// # Safety
/// `ptr..ptr + len` must be readable memory that nothing frees during the call.
unsafe fn send_raw(fd: RawFd, ptr: *const u8, len: usize) -> Io {
    if len == 0 {
        return Io::Data(0);
    }
    // SAFETY: the caller guarantees the range is readable; MSG_NOSIGNAL: EPIPE, not SIGPIPE.
    let n = unsafe { libc::send(fd, ptr as *const libc::c_void, len, libc::MSG_NOSIGNAL) };
    io_result(n)
}

/// Why an I/O loop ended early.
enum End {
    /// A stop flag was raised (or the QP went to Error).
    Stop,
    /// The peer closed.
    Eof,
    /// A socket error.
    Io(std::io::Error),
    /// A deadline passed.
    Timeout,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Stop => write!(f, "stopped"),
            End::Eof => write!(f, "connection closed"),
            End::Io(e) => write!(f, "{e}"),
            End::Timeout => write!(f, "timed out"),
        }
    }
}

/// Reads all of `buf`; `on_idle(bytes so far)` runs after every socket timeout and decides
/// whether to keep waiting.
fn read_full(
    fd: RawFd,
    buf: &mut [u8],
    on_idle: &mut dyn FnMut(usize) -> Result<(), End>,
) -> Result<(), End> {
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        // SAFETY: `rest` is a live, exclusively borrowed slice.
        match unsafe { recv_raw(fd, rest.as_mut_ptr(), rest.len()) } {
            Io::Data(n) => got += n,
            Io::Eof => return Err(End::Eof),
            Io::Again => on_idle(got)?,
            Io::Err(e) => return Err(End::Io(e)),
        }
    }
    Ok(())
}

/// Writes all of `buf`, with `on_idle` as in [`read_full`].
fn write_full(
    fd: RawFd,
    buf: &[u8],
    on_idle: &mut dyn FnMut(usize) -> Result<(), End>,
) -> Result<(), End> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        // SAFETY: `rest` is a live slice.
        match unsafe { send_raw(fd, rest.as_ptr(), rest.len()) } {
            Io::Data(n) => done += n,
            Io::Eof => return Err(End::Eof),
            Io::Again => on_idle(done)?,
            Io::Err(e) => return Err(End::Io(e)),
        }
    }
    Ok(())
}

/// An idle policy: stop when `stop()`; before the first byte wait at most `first` (None:
/// forever); once bytes flowed, give up after [`STALL_TIMEOUT`] without progress.
fn patience(
    stop: &dyn Fn() -> bool,
    first: Option<Duration>,
) -> impl FnMut(usize) -> Result<(), End> + '_ {
    let start = Instant::now();
    let mut last = (0usize, start);
    move |got| {
        if stop() {
            return Err(End::Stop);
        }
        let now = Instant::now();
        if got != last.0 {
            last = (got, now);
        }
        if got == 0 {
            if let Some(f) = first {
                if now.duration_since(start) > f {
                    return Err(End::Timeout);
                }
            }
        } else if now.duration_since(last.1) > STALL_TIMEOUT {
            return Err(End::Timeout);
        }
        Ok(())
    }
}

fn prepare_socket(s: &TcpStream) -> NicResult<()> {
    let e = |e: std::io::Error| NicError::new("emulated NIC socket", e.to_string());
    s.set_nodelay(true).map_err(e)?;
    s.set_read_timeout(Some(SLICE)).map_err(e)?;
    s.set_write_timeout(Some(SLICE)).map_err(e)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// NIC state shared by its threads, queue pairs and completion queues.

#[derive(Debug, Clone, Copy)]
struct MrEntry {
    id: u64,
    addr: u64,
    len: u64,
    access: u32,
}

type MrTable = HashMap<u32, MrEntry>;

/// Whether `[addr, addr + len)` lies inside the region of `key` and the region grants `access`.
fn region_ok(mrs: &MrTable, key: u32, addr: u64, len: u64, access: u32) -> bool {
    let Some(e) = mrs.get(&key) else {
        return false;
    };
    if e.access & access != access {
        return false;
    }
    let (Some(end), Some(region_end)) = (addr.checked_add(len), e.addr.checked_add(e.len)) else {
        return false;
    };
    addr >= e.addr && end <= region_end
}

struct NicInner {
    name: String,
    addr: SocketAddr,
    stop: AtomicBool,
    mrs: RwLock<MrTable>,
    next_id: AtomicU64,
    qps: Mutex<HashMap<u32, Weak<QpShared>>>,
    cqs: Mutex<HashMap<u64, Weak<CqShared>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    handshakes: AtomicUsize,
}

/// A userspace emulated NIC (see the module documentation). Create with [`open`].
pub struct EmuNic {
    inner: Arc<NicInner>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for EmuNic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmuNic")
            .field("name", &self.inner.name)
            .field("addr", &self.inner.addr)
            .finish()
    }
}

/// Opens an emulated NIC: binds its listener and starts its thread.
pub fn open(opts: EmuOptions) -> NicResult<Arc<EmuNic>> {
    let e = |what: &'static str| move |e: std::io::Error| NicError::new(what, e.to_string());
    let listener = TcpListener::bind((opts.bind, 0)).map_err(e("emulated NIC bind"))?;
    listener
        .set_nonblocking(true)
        .map_err(e("emulated NIC listener"))?;
    let addr = listener.local_addr().map_err(e("emulated NIC listener"))?;
    let inner = Arc::new(NicInner {
        name: opts.name,
        addr,
        stop: AtomicBool::new(false),
        mrs: RwLock::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        qps: Mutex::new(HashMap::new()),
        cqs: Mutex::new(HashMap::new()),
        threads: Mutex::new(Vec::new()),
        handshakes: AtomicUsize::new(0),
    });
    let nic = inner.clone();
    let acceptor = std::thread::Builder::new()
        .name("braid-emu-nic".to_string())
        .spawn(move || accept_loop(nic, listener))
        .map_err(e("spawning the emulated NIC thread"))?;
    tracing::debug!(target: "braid::ib", %addr, name = %inner.name, "emulated NIC opened");
    Ok(Arc::new(EmuNic {
        inner,
        acceptor: Mutex::new(Some(acceptor)),
    }))
}

impl EmuNic {
    /// The socket address of the NIC's listener.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }
}

impl Drop for EmuNic {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(h) = lock(&self.acceptor).take() {
            let _ = h.join();
        }
        let threads = std::mem::take(&mut *lock(&self.inner.threads));
        for h in threads {
            let _ = h.join();
        }
        tracing::debug!(target: "braid::ib", addr = %self.inner.addr, "emulated NIC closed");
    }
}

fn accept_loop(nic: Arc<NicInner>, listener: TcpListener) {
    let fd = listener.as_raw_fd();
    while !nic.stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, 100) };
        if r <= 0 {
            continue;
        }
        loop {
            match listener.accept() {
                Ok((s, peer)) => admit(&nic, s, peer),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(target: "braid::ib", error = %e, "emulated NIC accept failed");
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
        lock(&nic.threads).retain(|h| !h.is_finished());
    }
}

fn admit(nic: &Arc<NicInner>, s: TcpStream, peer: SocketAddr) {
    if nic.handshakes.load(Ordering::SeqCst) >= MAX_HANDSHAKES {
        tracing::warn!(target: "braid::ib", %peer, "emulated NIC: too many pending hellos, connection dropped");
        return;
    }
    nic.handshakes.fetch_add(1, Ordering::SeqCst);
    let n = nic.clone();
    match std::thread::Builder::new()
        .name("braid-emu-conn".to_string())
        .spawn(move || serve_connection(n, s, peer))
    {
        Ok(h) => lock(&nic.threads).push(h),
        Err(e) => {
            nic.handshakes.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(target: "braid::ib", %peer, error = %e, "emulated NIC: cannot start a connection thread");
        }
    }
}

fn secret_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The hello of a requester, validated: the QP it names and its RNR settings.
fn read_hello(nic: &Arc<NicInner>, s: &TcpStream) -> Result<(Arc<QpShared>, u8, u8), String> {
    prepare_socket(s).map_err(|e| e.to_string())?;
    let mut hello = [0u8; HELLO_LEN];
    // One deadline for the whole hello: a trickle of bytes does not extend it.
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    read_full(s.as_raw_fd(), &mut hello, &mut |_| {
        if nic.stop.load(Ordering::SeqCst) {
            Err(End::Stop)
        } else if Instant::now() > deadline {
            Err(End::Timeout)
        } else {
            Ok(())
        }
    })
    .map_err(|e| format!("no complete hello ({e})"))?;
    if hello[..8] != MAGIC || u32_at(&hello, 8) != VERSION {
        return Err("bad magic or version".to_string());
    }
    let qpn = u32_at(&hello, 12);
    let qp = lock(&nic.qps)
        .get(&qpn)
        .and_then(Weak::upgrade)
        .ok_or_else(|| format!("no queue pair {qpn}"))?;
    if !secret_eq(&hello[16..16 + SECRET_LEN], &qp.secret) {
        return Err(format!("wrong secret for queue pair {qpn}"));
    }
    if qp.stop.load(Ordering::SeqCst) {
        return Err(format!("queue pair {qpn} is being destroyed"));
    }
    Ok((qp, hello[36], hello[37]))
}

fn serve_connection(nic: Arc<NicInner>, s: TcpStream, peer: SocketAddr) {
    let hello = read_hello(&nic, &s);
    nic.handshakes.fetch_sub(1, Ordering::SeqCst);
    let (qp, rnr_retry, min_rnr_timer) = match hello {
        Ok(h) => h,
        Err(why) => {
            tracing::warn!(target: "braid::ib", %peer, %why, "emulated NIC: connection without a valid queue-pair hello dropped");
            return;
        }
    };
    {
        let mut g = lock(&qp.inner);
        if g.inbound_active {
            drop(g);
            tracing::warn!(target: "braid::ib", %peer, qpn = qp.qpn, "emulated NIC: queue pair already has a requester, connection dropped");
            return;
        }
        g.inbound_active = true;
        g.inbound = s.try_clone().ok();
    }
    let mut reply = [0u8; REPLY_LEN];
    reply[..8].copy_from_slice(&MAGIC);
    let stop = || nic.stop.load(Ordering::SeqCst) || qp.stop.load(Ordering::SeqCst);
    let fd = s.as_raw_fd();
    if write_full(fd, &reply, &mut patience(&stop, Some(HANDSHAKE_TIMEOUT))).is_ok() {
        tracing::debug!(target: "braid::ib", %peer, qpn = qp.qpn, "emulated NIC: requester connected");
        let r = Responder {
            nic: &nic,
            qp: &qp,
            fd,
            rnr_retry,
            rnr_interval: rnr_interval(min_rnr_timer),
            stop: &stop,
        };
        r.run();
    }
    let _ = s.shutdown(Shutdown::Both);
    let mut g = lock(&qp.inner);
    g.inbound_active = false;
    g.inbound = None;
    qp.cv.notify_all();
}

/// The verbs `min_rnr_timer` encoding, at least 1 ms.
fn rnr_interval(t: u8) -> Duration {
    const US: [u64; 32] = [
        655_360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1280, 1920, 2560, 3840,
        5120, 7680, 10_240, 15_360, 20_480, 30_720, 40_960, 61_440, 81_920, 122_880, 163_840,
        245_760, 327_680, 491_520,
    ];
    let us = US.get(usize::from(t)).copied().unwrap_or(655_360);
    Duration::from_micros(us.max(1000))
}

/// How long a requester waits without any answer before declaring the peer dead.
fn ack_budget(p: &ConnectParams) -> Duration {
    let per_try = if p.timeout == 0 || p.timeout >= 31 {
        Duration::from_secs(2)
    } else {
        Duration::from_nanos(4096u64 << p.timeout)
    };
    let per_try = per_try.clamp(Duration::from_millis(100), Duration::from_secs(2));
    per_try * (u32::from(p.retry_cnt.min(7)) + 1)
}

// ---------------------------------------------------------------------------------------------
// Completion queues.

struct CqShared {
    handle: u64,
    depth: usize,
    queue: Mutex<VecDeque<Wc>>,
    armed: AtomicBool,
    efd: OwnedFd,
}

impl CqShared {
    fn push(&self, wc: Wc) {
        {
            let mut q = lock(&self.queue);
            if q.len() == self.depth {
                tracing::warn!(target: "braid::ib", depth = self.depth, "emulated completion queue is over its depth");
            }
            q.push_back(wc);
        }
        if self.armed.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd.
            let _ = unsafe {
                libc::write(
                    self.efd.as_raw_fd(),
                    &one as *const u64 as *const libc::c_void,
                    8,
                )
            };
        }
    }
}

/// A completion queue of an [`EmuNic`].
pub struct EmuCq {
    shared: Arc<CqShared>,
    nic: Arc<NicInner>,
}

impl Drop for EmuCq {
    fn drop(&mut self) {
        lock(&self.nic.cqs).remove(&self.shared.handle);
    }
}

impl Cq for EmuCq {
    fn poll(&mut self, out: &mut [Wc]) -> NicResult<usize> {
        let mut q = lock(&self.shared.queue);
        let mut n = 0;
        while n < out.len() {
            let Some(wc) = q.pop_front() else { break };
            out[n] = wc;
            n += 1;
        }
        Ok(n)
    }

    fn arm(&mut self) -> NicResult<()> {
        self.shared.armed.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn take_event(&mut self) -> NicResult<()> {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our non-blocking eventfd.
        let _ = unsafe {
            libc::read(
                self.shared.efd.as_raw_fd(),
                &mut v as *mut u64 as *mut libc::c_void,
                8,
            )
        };
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.shared.efd.as_raw_fd()
    }

    fn handle(&self) -> u64 {
        self.shared.handle
    }
}

// ---------------------------------------------------------------------------------------------
// Queue pairs.

#[derive(Debug, Clone, Copy)]
struct Inflight {
    wr_id: u64,
    opcode: WcOpcode,
    signaled: bool,
    seq: u32,
}

struct QpInner {
    state: QpState,
    recvs: VecDeque<(u64, Option<Sge>)>,
    pending: VecDeque<SendWr>,
    inflight: VecDeque<Inflight>,
    next_seq: u32,
    /// The peer's responder closed while nothing was outstanding.
    peer_dead: bool,
    outbound: Option<TcpStream>,
    inbound: Option<TcpStream>,
    inbound_active: bool,
}

struct QpShared {
    qpn: u32,
    psn: u32,
    secret: [u8; SECRET_LEN],
    nic: Arc<NicInner>,
    cq: Arc<CqShared>,
    max_send: usize,
    max_recv: usize,
    base: Instant,
    /// Milliseconds since `base` of the last sign of life of the peer (or of a new request).
    activity: AtomicU64,
    stop: AtomicBool,
    inner: Mutex<QpInner>,
    cv: Condvar,
}

fn send_opcode(op: &SendOp) -> WcOpcode {
    match op {
        SendOp::Send | SendOp::SendImm(_) => WcOpcode::Send,
        SendOp::Write { .. } | SendOp::WriteImm { .. } => WcOpcode::Write,
    }
}

impl QpShared {
    fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.activity.store(ms, Ordering::SeqCst);
    }

    fn idle_for(&self) -> Duration {
        let now = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(now.saturating_sub(self.activity.load(Ordering::SeqCst)))
    }

    fn wait<'a>(&self, g: MutexGuard<'a, QpInner>, d: Duration) -> MutexGuard<'a, QpInner> {
        match self.cv.wait_timeout(g, d) {
            Ok((g, _)) => g,
            Err(e) => e.into_inner().0,
        }
    }

    fn complete(&self, wr_id: u64, st: u32, opcode: WcOpcode, byte_len: u32, imm: Option<u32>) {
        self.cq.push(Wc {
            wr_id,
            status: st,
            opcode,
            byte_len,
            imm,
            qpn: self.qpn,
        });
    }

    /// Moves the QP to Error: the first outstanding WR completes with `head` (if given), the
    /// other outstanding ones with `outstanding`, everything else flushes.
    fn fail(&self, g: &mut QpInner, head: Option<u32>, outstanding: u32) {
        if g.state == QpState::Error {
            return;
        }
        tracing::debug!(target: "braid::ib", qpn = self.qpn, ?head, "emulated queue pair to Error");
        g.state = QpState::Error;
        let mut head = head;
        while let Some(w) = g.inflight.pop_front() {
            let st = head.take().unwrap_or(outstanding);
            self.complete(w.wr_id, st, w.opcode, 0, None);
        }
        while let Some(wr) = g.pending.pop_front() {
            self.complete(wr.wr_id, status::WR_FLUSH_ERR, send_opcode(&wr.op), 0, None);
        }
        while let Some((id, _)) = g.recvs.pop_front() {
            self.complete(id, status::WR_FLUSH_ERR, WcOpcode::Recv, 0, None);
        }
        if let Some(s) = &g.outbound {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.cv.notify_all();
    }

    /// The peer does not answer: outstanding WRs get `RETRY_EXC_ERR`.
    fn dead(&self) {
        let mut g = lock(&self.inner);
        if g.state != QpState::Error {
            tracing::warn!(target: "braid::ib", qpn = self.qpn, "emulated queue pair: peer does not answer (transport retry counter exceeded)");
        }
        self.fail(&mut g, None, status::RETRY_EXC_ERR);
    }

    /// The WR `seq` failed locally: once every earlier WR completed, it completes with `st`
    /// and the QP goes to Error.
    fn local_error(&self, seq: u32, st: u32) {
        let mut g = lock(&self.inner);
        loop {
            if g.state == QpState::Error || self.stop.load(Ordering::SeqCst) {
                return;
            }
            if g.inflight.front().map(|w| w.seq) == Some(seq) {
                self.fail(&mut g, Some(st), status::WR_FLUSH_ERR);
                return;
            }
            g = self.wait(g, Duration::from_millis(100));
        }
    }
}

/// A reliable-connected queue pair of an [`EmuNic`].
pub struct EmuQp {
    shared: Arc<QpShared>,
    threads: Vec<JoinHandle<()>>,
}

fn encode_addr(sa: SocketAddr, secret: &[u8; SECRET_LEN]) -> Vec<u8> {
    let mut v = Vec::with_capacity(35);
    match sa.ip() {
        IpAddr::V4(ip) => {
            v.push(4);
            v.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            v.push(6);
            v.extend_from_slice(&ip.octets());
        }
    }
    v.extend_from_slice(&sa.port().to_be_bytes());
    v.extend_from_slice(secret);
    v
}

pub(crate) fn decode_addr(b: &[u8]) -> Option<(SocketAddr, [u8; SECRET_LEN])> {
    let (ip, rest): (IpAddr, &[u8]) = match b.first()? {
        4 if b.len() == 1 + 4 + 2 + SECRET_LEN => {
            let mut o = [0u8; 4];
            o.copy_from_slice(b.get(1..5)?);
            (IpAddr::V4(Ipv4Addr::from(o)), b.get(5..)?)
        }
        6 if b.len() == 1 + 16 + 2 + SECRET_LEN => {
            let mut o = [0u8; 16];
            o.copy_from_slice(b.get(1..17)?);
            (IpAddr::V6(Ipv6Addr::from(o)), b.get(17..)?)
        }
        _ => return None,
    };
    let port = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]);
    let mut secret = [0u8; SECRET_LEN];
    secret.copy_from_slice(rest.get(2..2 + SECRET_LEN)?);
    Some((SocketAddr::new(ip, port), secret))
}

impl Qp for EmuQp {
    fn addr(&self) -> QpAddr {
        let gid = match self.shared.nic.addr.ip() {
            IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
            IpAddr::V6(ip) => ip.octets(),
        };
        QpAddr {
            lid: 0,
            gid,
            qpn: self.shared.qpn,
            psn: self.shared.psn,
            nic_addr: encode_addr(self.shared.nic.addr, &self.shared.secret),
        }
    }

    fn connect(&mut self, remote: &QpAddr, params: &ConnectParams) -> NicResult<()> {
        const OP: &str = "ibv_modify_qp";
        let qp = &self.shared;
        if lock(&qp.inner).state != QpState::Init {
            return Err(NicError::new(OP, "queue pair is not in INIT (EINVAL)"));
        }
        let (sa, secret) = decode_addr(&remote.nic_addr)
            .ok_or_else(|| NicError::new(OP, "not an emulated NIC address (EINVAL)"))?;
        let s = TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT)
            .map_err(|e| NicError::new(OP, format!("connecting to emulated NIC {sa}: {e}")))?;
        prepare_socket(&s)?;
        let mut hello = [0u8; HELLO_LEN];
        hello[..8].copy_from_slice(&MAGIC);
        hello[8..12].copy_from_slice(&VERSION.to_be_bytes());
        hello[12..16].copy_from_slice(&remote.qpn.to_be_bytes());
        hello[16..32].copy_from_slice(&secret);
        hello[32..36].copy_from_slice(&qp.qpn.to_be_bytes());
        hello[36] = params.rnr_retry;
        hello[37] = params.min_rnr_timer;
        let stop = || qp.stop.load(Ordering::SeqCst);
        let fd = s.as_raw_fd();
        let mut reply = [0u8; REPLY_LEN];
        write_full(fd, &hello, &mut patience(&stop, Some(CONNECT_TIMEOUT)))
            .and_then(|()| read_full(fd, &mut reply, &mut patience(&stop, Some(CONNECT_TIMEOUT))))
            .map_err(|e| {
                NicError::new(
                    OP,
                    format!("emulated NIC {sa} refused queue pair {} ({e})", remote.qpn),
                )
            })?;
        if reply[..8] != MAGIC || u32_at(&reply, 8) != 0 {
            return Err(NicError::new(
                OP,
                format!("emulated NIC {sa} sent a bad reply"),
            ));
        }
        let e = |e: std::io::Error| NicError::new(OP, e.to_string());
        let for_reader = s.try_clone().map_err(e)?;
        let for_state = s.try_clone().map_err(e)?;
        let budget = ack_budget(params);
        {
            let mut g = lock(&qp.inner);
            if g.state != QpState::Init {
                return Err(NicError::new(OP, "queue pair is not in INIT (EINVAL)"));
            }
            g.state = QpState::Rts;
            g.outbound = Some(for_state);
            qp.cv.notify_all();
        }
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(f)
                .map_err(|e| NicError::new(OP, format!("spawning a queue-pair thread: {e}")))
        };
        let (q1, q2) = (qp.clone(), qp.clone());
        let started =
            spawn("braid-emu-qp-tx", Box::new(move || sender(q1, s, budget))).and_then(|h1| {
                self.threads.push(h1);
                spawn(
                    "braid-emu-qp-rx",
                    Box::new(move || ack_reader(q2, for_reader, budget)),
                )
            });
        match started {
            Ok(h2) => {
                self.threads.push(h2);
                tracing::debug!(target: "braid::ib", qpn = qp.qpn, remote_qpn = remote.qpn, %sa, "emulated queue pair connected");
                Ok(())
            }
            Err(err) => {
                let mut g = lock(&qp.inner);
                qp.fail(&mut g, None, status::WR_FLUSH_ERR);
                Err(err)
            }
        }
    }

    fn post_send(&mut self, wr: &SendWr) -> NicResult<()> {
        let qp = &self.shared;
        let mut g = lock(&qp.inner);
        match g.state {
            QpState::Error => {
                qp.complete(wr.wr_id, status::WR_FLUSH_ERR, send_opcode(&wr.op), 0, None);
                return Ok(());
            }
            QpState::Init | QpState::Rtr => {
                return Err(NicError::new(
                    "ibv_post_send",
                    "queue pair not ready to send (EINVAL)",
                ))
            }
            QpState::Rts => {}
        }
        if g.pending.len() + g.inflight.len() >= qp.max_send {
            return Err(NicError::new("ibv_post_send", "send queue full (ENOMEM)"));
        }
        g.pending.push_back(*wr);
        qp.cv.notify_all();
        Ok(())
    }

    fn post_recv(&mut self, wr_id: u64, sge: Option<Sge>) -> NicResult<()> {
        let qp = &self.shared;
        let mut g = lock(&qp.inner);
        if g.state == QpState::Error {
            qp.complete(wr_id, status::WR_FLUSH_ERR, WcOpcode::Recv, 0, None);
            return Ok(());
        }
        if g.recvs.len() >= qp.max_recv {
            return Err(NicError::new(
                "ibv_post_recv",
                "receive queue full (ENOMEM)",
            ));
        }
        g.recvs.push_back((wr_id, sge));
        qp.cv.notify_all();
        Ok(())
    }

    fn state(&self) -> QpState {
        lock(&self.shared.inner).state
    }
}

impl Drop for EmuQp {
    fn drop(&mut self) {
        let qp = &self.shared;
        qp.stop.store(true, Ordering::SeqCst);
        {
            let g = lock(&qp.inner);
            for s in [&g.outbound, &g.inbound].into_iter().flatten() {
                let _ = s.shutdown(Shutdown::Both);
            }
            qp.cv.notify_all();
        }
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        let deadline = Instant::now() + QP_DROP_WAIT;
        let mut g = lock(&qp.inner);
        while g.inbound_active {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(target: "braid::ib", qpn = qp.qpn, "emulated queue pair: responder still busy at destroy");
                break;
            }
            g = qp.wait(g, deadline - now);
        }
        drop(g);
        lock(&qp.nic.qps).remove(&qp.qpn);
    }
}

// ---------------------------------------------------------------------------------------------
// Requester side: the sender walks the send queue, the ACK reader completes WRs.

fn sender(qp: Arc<QpShared>, s: TcpStream, budget: Duration) {
    let fd = s.as_raw_fd();
    let mut on_idle = |_: usize| {
        if qp.stop.load(Ordering::SeqCst) {
            return Err(End::Stop);
        }
        if qp.idle_for() > budget {
            return Err(End::Timeout);
        }
        Ok(())
    };
    loop {
        let (wr, seq) = {
            let mut g = lock(&qp.inner);
            let wr = loop {
                if qp.stop.load(Ordering::SeqCst) || g.state == QpState::Error {
                    return;
                }
                if let Some(wr) = g.pending.pop_front() {
                    break wr;
                }
                g = qp.wait(g, Duration::from_millis(100));
            };
            let seq = g.next_seq;
            g.next_seq = g.next_seq.wrapping_add(1);
            if g.inflight.is_empty() {
                qp.touch();
            }
            g.inflight.push_back(Inflight {
                wr_id: wr.wr_id,
                opcode: send_opcode(&wr.op),
                signaled: wr.signaled,
                seq,
            });
            if g.peer_dead {
                tracing::warn!(target: "braid::ib", qpn = qp.qpn, "emulated queue pair: the peer went away");
                qp.fail(&mut g, None, status::RETRY_EXC_ERR);
                return;
            }
            (wr, seq)
        };
        let sge = wr.sge.filter(|s| s.len > 0);
        let len = sge.map_or(0, |s| s.len);
        if let Some(sge) = sge {
            let ok = region_ok(
                &read_lock(&qp.nic.mrs),
                sge.lkey,
                sge.addr,
                u64::from(len),
                0,
            );
            if !ok {
                tracing::warn!(target: "braid::ib", qpn = qp.qpn, wr_id = wr.wr_id, "emulated queue pair: local protection error");
                qp.local_error(seq, status::LOC_PROT_ERR);
                return;
            }
        }
        let mut hdr = [0u8; REQ_LEN];
        let (op, imm, raddr, rkey) = match wr.op {
            SendOp::Send => (OP_SEND, 0, 0, 0),
            SendOp::SendImm(imm) => (OP_SEND_IMM, imm, 0, 0),
            SendOp::Write { remote_addr, rkey } => (OP_WRITE, 0, remote_addr, rkey),
            SendOp::WriteImm {
                remote_addr,
                rkey,
                imm,
            } => (OP_WRITE_IMM, imm, remote_addr, rkey),
        };
        hdr[0] = op;
        hdr[4..8].copy_from_slice(&seq.to_be_bytes());
        hdr[8..12].copy_from_slice(&len.to_be_bytes());
        hdr[12..16].copy_from_slice(&imm.to_be_bytes());
        hdr[16..24].copy_from_slice(&raddr.to_be_bytes());
        hdr[24..28].copy_from_slice(&rkey.to_be_bytes());
        match write_full(fd, &hdr, &mut on_idle) {
            Ok(()) => {}
            Err(End::Stop) => return,
            Err(_) => {
                qp.dead();
                return;
            }
        }
        if let Some(sge) = sge {
            let total = u64::from(len);
            let mut off = 0u64;
            while off < total {
                let n = (total - off).min(CHUNK);
                let r = {
                    let mrs = read_lock(&qp.nic.mrs);
                    if !region_ok(&mrs, sge.lkey, sge.addr + off, n, 0) {
                        None
                    } else {
                        // SAFETY: the range lies in a registered region (the caller of reg_mr
                        // keeps it mapped until dereg_mr), and dereg_mr waits for this read lock.
                        Some(unsafe { send_raw(fd, (sge.addr + off) as *const u8, n as usize) })
                    }
                };
                match r {
                    None => {
                        tracing::warn!(target: "braid::ib", qpn = qp.qpn, "emulated queue pair: region deregistered during a send");
                        qp.local_error(seq, status::LOC_PROT_ERR);
                        return;
                    }
                    Some(Io::Data(k)) => {
                        off += k as u64;
                        qp.touch();
                    }
                    Some(Io::Again) => match on_idle(0) {
                        Ok(()) => {}
                        Err(End::Stop) => return,
                        Err(_) => {
                            qp.dead();
                            return;
                        }
                    },
                    Some(Io::Eof) | Some(Io::Err(_)) => {
                        qp.dead();
                        return;
                    }
                }
            }
        }
        qp.touch();
    }
}

fn ack_reader(qp: Arc<QpShared>, s: TcpStream, budget: Duration) {
    let fd = s.as_raw_fd();
    loop {
        let mut buf = [0u8; RESP_LEN];
        let r = read_full(fd, &mut buf, &mut |_| {
            if qp.stop.load(Ordering::SeqCst) {
                return Err(End::Stop);
            }
            let g = lock(&qp.inner);
            if g.state == QpState::Error {
                return Err(End::Stop);
            }
            if !g.inflight.is_empty() && qp.idle_for() > budget {
                return Err(End::Timeout);
            }
            Ok(())
        });
        match r {
            Ok(()) => {}
            Err(End::Stop) => return,
            Err(End::Timeout) => {
                qp.dead();
                return;
            }
            Err(End::Eof) | Err(End::Io(_)) => {
                let mut g = lock(&qp.inner);
                if g.state == QpState::Error || qp.stop.load(Ordering::SeqCst) {
                    return;
                }
                if g.inflight.is_empty() {
                    tracing::debug!(target: "braid::ib", qpn = qp.qpn, "emulated queue pair: peer closed");
                    g.peer_dead = true;
                } else {
                    drop(g);
                    qp.dead();
                }
                return;
            }
        }
        qp.touch();
        let seq = u32_at(&buf, 8);
        let mut g = lock(&qp.inner);
        let front = g.inflight.front().copied();
        match (buf[0], front) {
            (R_WAIT, _) => {}
            (R_ACK, Some(f)) if f.seq == seq => {
                g.inflight.pop_front();
                if f.signaled {
                    qp.complete(f.wr_id, status::SUCCESS, f.opcode, 0, None);
                }
                qp.cv.notify_all();
            }
            (R_NAK, Some(f)) if f.seq == seq => {
                let st = match u32_at(&buf, 4) {
                    s @ (status::REM_INV_REQ_ERR
                    | status::REM_ACCESS_ERR
                    | status::REM_OP_ERR
                    | status::RETRY_EXC_ERR
                    | status::RNR_RETRY_EXC_ERR) => s,
                    _ => status::REM_OP_ERR,
                };
                tracing::warn!(target: "braid::ib", qpn = qp.qpn, wr_id = f.wr_id, status = status::as_str(st), "emulated queue pair: request refused by the responder");
                qp.fail(&mut g, Some(st), status::WR_FLUSH_ERR);
                return;
            }
            _ => {
                tracing::warn!(target: "braid::ib", qpn = qp.qpn, kind = buf[0], seq, "emulated queue pair: unexpected answer from the responder");
                qp.fail(&mut g, None, status::RETRY_EXC_ERR);
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Responder side.

enum Refuse {
    /// Answer with a NAK of this status (then drain until the requester closes).
    Nak(u32),
    /// The connection or the QP went away: close without answering.
    Gone,
}

enum Place {
    Access,
    Gone,
}

struct Responder<'a> {
    nic: &'a NicInner,
    qp: &'a QpShared,
    fd: RawFd,
    rnr_retry: u8,
    rnr_interval: Duration,
    stop: &'a dyn Fn() -> bool,
}

/// A receive completion to queue: work request id, opcode, length, immediate.
type RecvDone = (u64, WcOpcode, u64, Option<u32>);

impl Responder<'_> {
    fn run(&self) {
        loop {
            let mut hdr = [0u8; REQ_LEN];
            if read_full(self.fd, &mut hdr, &mut patience(self.stop, None)).is_err() {
                return;
            }
            let op = hdr[0];
            let seq = u32_at(&hdr, 4);
            let len = u64::from(u32_at(&hdr, 8));
            let imm = u32_at(&hdr, 12);
            let raddr = u64_at(&hdr, 16);
            let rkey = u32_at(&hdr, 24);
            let r = match self.wait_rtr(seq) {
                Err(e) => Err(e),
                Ok(()) => match op {
                    OP_SEND => self.on_send(seq, len, None),
                    OP_SEND_IMM => self.on_send(seq, len, Some(imm)),
                    OP_WRITE => self.on_write(seq, len, raddr, rkey, None),
                    OP_WRITE_IMM => self.on_write(seq, len, raddr, rkey, Some(imm)),
                    _ => {
                        tracing::warn!(target: "braid::ib", qpn = self.qp.qpn, op, "emulated NIC: unknown request, connection closed");
                        Err(Refuse::Gone)
                    }
                },
            };
            match r {
                Ok(done) => {
                    // The ACK leaves before the receive completion is queued, as a NIC acks
                    // placed data by itself: once the receiving process sees the completion,
                    // its exit cannot take the requester's ACK with it.
                    let acked = self.answer(R_ACK, 0, seq).is_ok();
                    if let Some((wr_id, opcode, len, imm)) = done {
                        self.finish_recv(wr_id, opcode, len, imm);
                    }
                    if !acked {
                        return;
                    }
                }
                Err(Refuse::Gone) => return,
                Err(Refuse::Nak(st)) => {
                    if self.answer(R_NAK, st, seq).is_ok() {
                        self.drain();
                    }
                    return;
                }
            }
        }
    }

    fn answer(&self, kind: u8, st: u32, seq: u32) -> Result<(), End> {
        let mut b = [0u8; RESP_LEN];
        b[0] = kind;
        b[4..8].copy_from_slice(&st.to_be_bytes());
        b[8..12].copy_from_slice(&seq.to_be_bytes());
        write_full(self.fd, &b, &mut patience(self.stop, Some(STALL_TIMEOUT)))
    }

    /// Reads and discards until the requester closes (so that the NAK is not lost to a reset).
    fn drain(&self) {
        let mut scratch = vec![0u8; 64 * 1024];
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while Instant::now() < deadline && !(self.stop)() {
            // SAFETY: `scratch` is a live, exclusively owned buffer.
            match unsafe { recv_raw(self.fd, scratch.as_mut_ptr(), scratch.len()) } {
                Io::Data(_) | Io::Again => {}
                Io::Eof | Io::Err(_) => return,
            }
        }
    }

    /// Waits (bounded, with keep-alives) until the QP is at least RTR.
    fn wait_rtr(&self, seq: u32) -> Result<(), Refuse> {
        let qp = self.qp;
        let deadline = Instant::now() + RTR_WAIT;
        let mut g = lock(&qp.inner);
        loop {
            match g.state {
                QpState::Rtr | QpState::Rts => return Ok(()),
                QpState::Error => return Err(Refuse::Nak(status::RETRY_EXC_ERR)),
                QpState::Init => {}
            }
            if (self.stop)() || Instant::now() >= deadline {
                return Err(Refuse::Gone);
            }
            g = qp.wait(g, KEEPALIVE);
            if matches!(g.state, QpState::Init) {
                drop(g);
                self.answer(R_WAIT, 0, seq).map_err(|_| Refuse::Gone)?;
                g = lock(&qp.inner);
            }
        }
    }

    /// Takes the next posted receive, waiting for one per the RNR settings.
    fn take_recv(&self, seq: u32) -> Result<(u64, Option<Sge>), Refuse> {
        let qp = self.qp;
        let start = Instant::now();
        let deadline =
            (self.rnr_retry != 7).then(|| start + self.rnr_interval * u32::from(self.rnr_retry));
        let mut keepalive = start + KEEPALIVE;
        let mut g = lock(&qp.inner);
        loop {
            if g.state == QpState::Error {
                return Err(Refuse::Nak(status::RETRY_EXC_ERR));
            }
            if let Some(r) = g.recvs.pop_front() {
                return Ok(r);
            }
            if (self.stop)() {
                return Err(Refuse::Gone);
            }
            let now = Instant::now();
            if let Some(d) = deadline {
                if now >= d {
                    drop(g);
                    tracing::debug!(target: "braid::ib", qpn = qp.qpn, "emulated NIC: receiver not ready, retries exhausted");
                    return Err(Refuse::Nak(status::RNR_RETRY_EXC_ERR));
                }
            }
            if now >= keepalive {
                drop(g);
                self.answer(R_WAIT, 0, seq).map_err(|_| Refuse::Gone)?;
                keepalive = now + KEEPALIVE;
                g = lock(&qp.inner);
                continue;
            }
            let until = deadline.map_or(keepalive, |d| d.min(keepalive));
            g = qp.wait(g, until.saturating_duration_since(now));
        }
    }

    /// Puts a receive taken by [`Self::take_recv`] back (the request did not consume it).
    fn untake(&self, r: (u64, Option<Sge>)) {
        let mut g = lock(&self.qp.inner);
        if g.state == QpState::Error {
            self.qp
                .complete(r.0, status::WR_FLUSH_ERR, WcOpcode::Recv, 0, None);
        } else {
            g.recvs.push_front(r);
        }
    }

    /// Completes a consumed receive (flushed if the QP went to Error meanwhile).
    fn finish_recv(&self, wr_id: u64, opcode: WcOpcode, len: u64, imm: Option<u32>) {
        let g = lock(&self.qp.inner);
        let st = if g.state == QpState::Error {
            status::WR_FLUSH_ERR
        } else {
            status::SUCCESS
        };
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        self.qp.complete(wr_id, st, opcode, len, imm);
    }

    /// A responder-side error: the consumed receive (if any) completes with `st`, the QP goes
    /// to Error.
    fn fail_here(&self, recv: Option<(u64, u32)>) {
        let mut g = lock(&self.qp.inner);
        if let Some((wr_id, st)) = recv {
            self.qp.complete(wr_id, st, WcOpcode::Recv, 0, None);
        }
        self.qp.fail(&mut g, None, status::WR_FLUSH_ERR);
    }

    /// Reads `len` bytes from the socket into `[addr, addr + len)` of the region `key`,
    /// re-checking the region before every system call.
    fn place(&self, key: u32, addr: u64, len: u64, access: u32) -> Result<(), Place> {
        let mut off = 0u64;
        let mut last = Instant::now();
        while off < len {
            let n = (len - off).min(CHUNK);
            let r = {
                let mrs = read_lock(&self.nic.mrs);
                if !region_ok(&mrs, key, addr + off, n, access) {
                    return Err(Place::Access);
                }
                // SAFETY: the range lies in a registered region (its owner keeps it mapped
                // until dereg_mr, which waits for this read lock).
                unsafe { recv_raw(self.fd, (addr + off) as *mut u8, n as usize) }
            };
            match r {
                Io::Data(k) => {
                    off += k as u64;
                    last = Instant::now();
                }
                Io::Again => {
                    if (self.stop)() || last.elapsed() > STALL_TIMEOUT {
                        return Err(Place::Gone);
                    }
                }
                Io::Eof | Io::Err(_) => return Err(Place::Gone),
            }
        }
        Ok(())
    }

    /// Places a SEND; returns the receive completion to queue once it is acknowledged.
    fn on_send(&self, seq: u32, len: u64, imm: Option<u32>) -> Result<Option<RecvDone>, Refuse> {
        let (wr_id, sge) = self.take_recv(seq)?;
        let cap = sge.map_or(0, |s| u64::from(s.len));
        if len > cap {
            tracing::warn!(target: "braid::ib", qpn = self.qp.qpn, len, cap, "emulated NIC: SEND longer than the receive buffer");
            self.fail_here(Some((wr_id, status::LOC_LEN_ERR)));
            return Err(Refuse::Nak(status::REM_INV_REQ_ERR));
        }
        if let Some(sge) = sge.filter(|_| len > 0) {
            let ok = region_ok(
                &read_lock(&self.nic.mrs),
                sge.lkey,
                sge.addr,
                len,
                nic::ACCESS_LOCAL_WRITE,
            );
            let placed = if ok {
                self.place(sge.lkey, sge.addr, len, nic::ACCESS_LOCAL_WRITE)
            } else {
                Err(Place::Access)
            };
            match placed {
                Ok(()) => {}
                Err(Place::Access) => {
                    tracing::warn!(target: "braid::ib", qpn = self.qp.qpn, wr_id, "emulated NIC: receive buffer outside its region");
                    self.fail_here(Some((wr_id, status::LOC_PROT_ERR)));
                    return Err(Refuse::Nak(status::REM_OP_ERR));
                }
                Err(Place::Gone) => {
                    self.untake((wr_id, Some(sge)));
                    return Err(Refuse::Gone);
                }
            }
        }
        Ok(Some((wr_id, WcOpcode::Recv, len, imm)))
    }

    fn on_write(
        &self,
        seq: u32,
        len: u64,
        raddr: u64,
        rkey: u32,
        imm: Option<u32>,
    ) -> Result<Option<RecvDone>, Refuse> {
        let recv = match imm {
            Some(_) => Some(self.take_recv(seq)?),
            None => None,
        };
        if len > 0 {
            let access = nic::ACCESS_REMOTE_WRITE;
            let ok = region_ok(&read_lock(&self.nic.mrs), rkey, raddr, len, access);
            let placed = if ok {
                self.place(rkey, raddr, len, access)
            } else {
                Err(Place::Access)
            };
            match placed {
                Ok(()) => {}
                Err(Place::Access) => {
                    tracing::warn!(target: "braid::ib", qpn = self.qp.qpn, rkey, raddr, len, "emulated NIC: RDMA WRITE refused (remote access error)");
                    if let Some(r) = recv {
                        self.untake(r);
                    }
                    self.fail_here(None);
                    return Err(Refuse::Nak(status::REM_ACCESS_ERR));
                }
                Err(Place::Gone) => {
                    if let Some(r) = recv {
                        self.untake(r);
                    }
                    return Err(Refuse::Gone);
                }
            }
        }
        Ok(recv.map(|(wr_id, _)| (wr_id, WcOpcode::RecvRdmaWithImm, len, imm)))
    }
}

// ---------------------------------------------------------------------------------------------
// The Nic implementation.

impl Nic for EmuNic {
    fn port(&self) -> PortInfo {
        let gid = match self.inner.addr.ip() {
            IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
            IpAddr::V6(ip) => ip.octets(),
        };
        PortInfo {
            device: self.inner.name.clone(),
            port: 1,
            lid: 0,
            gid,
            mtu: 4096,
            speed_mbps: 0,
            link_layer: LinkLayer::Emulated,
        }
    }

    unsafe fn reg_mr(&self, addr: *mut u8, len: usize, access: u32) -> NicResult<Mr> {
        const OP: &str = "ibv_reg_mr";
        let a = addr as u64;
        let l = len as u64;
        if (addr.is_null() && len > 0) || a.checked_add(l).is_none() {
            return Err(NicError::new(OP, "bad address or length (EINVAL)"));
        }
        let mut mrs = self.inner.mrs.write().unwrap_or_else(|e| e.into_inner());
        let mut key = 0;
        for _ in 0..16 {
            let k = random_u32()?;
            if k != 0 && !mrs.contains_key(&k) {
                key = k;
                break;
            }
        }
        if key == 0 {
            return Err(NicError::new(OP, "no free key (ENOMEM)"));
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::SeqCst);
        mrs.insert(
            key,
            MrEntry {
                id,
                addr: a,
                len: l,
                access,
            },
        );
        Ok(Mr {
            id,
            addr: a,
            len: l,
            lkey: key,
            rkey: key,
        })
    }

    fn dereg_mr(&self, mr: &Mr) -> NicResult<()> {
        let mut mrs = self.inner.mrs.write().unwrap_or_else(|e| e.into_inner());
        match mrs.get(&mr.lkey) {
            Some(e) if e.id == mr.id => {
                mrs.remove(&mr.lkey);
                Ok(())
            }
            _ => Err(NicError::new(
                "ibv_dereg_mr",
                "unknown memory region (EINVAL)",
            )),
        }
    }

    fn create_cq(&self, depth: u32) -> NicResult<Box<dyn Cq>> {
        // SAFETY: FFI; eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(NicError::new(
                "ibv_create_cq",
                std::io::Error::last_os_error().to_string(),
            ));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        let handle = NEXT_HANDLE.fetch_add(1, Ordering::SeqCst);
        let shared = Arc::new(CqShared {
            handle,
            depth: depth.max(1) as usize,
            queue: Mutex::new(VecDeque::new()),
            armed: AtomicBool::new(false),
            efd,
        });
        lock(&self.inner.cqs).insert(handle, Arc::downgrade(&shared));
        Ok(Box::new(EmuCq {
            shared,
            nic: self.inner.clone(),
        }))
    }

    fn create_qp(&self, cq: &dyn Cq, max_send: u32, max_recv: u32) -> NicResult<Box<dyn Qp>> {
        const OP: &str = "ibv_create_qp";
        if max_send == 0 || max_recv == 0 {
            return Err(NicError::new(OP, "queue sizes must be positive (EINVAL)"));
        }
        let cq = lock(&self.inner.cqs)
            .get(&cq.handle())
            .and_then(Weak::upgrade)
            .ok_or_else(|| NicError::new(OP, "completion queue of another device (EINVAL)"))?;
        let mut secret = [0u8; SECRET_LEN];
        crate::random_bytes(&mut secret).map_err(|e| NicError::new(OP, e.to_string()))?;
        let psn = random_u32()? & 0x00ff_ffff;
        let mut qps = lock(&self.inner.qps);
        let mut qpn = 0;
        for _ in 0..16 {
            let n = random_u32()? & 0x00ff_ffff;
            if n != 0 && !qps.contains_key(&n) {
                qpn = n;
                break;
            }
        }
        if qpn == 0 {
            return Err(NicError::new(OP, "no free queue pair number (ENOMEM)"));
        }
        let shared = Arc::new(QpShared {
            qpn,
            psn,
            secret,
            nic: self.inner.clone(),
            cq,
            max_send: max_send as usize,
            max_recv: max_recv as usize,
            base: Instant::now(),
            activity: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            inner: Mutex::new(QpInner {
                state: QpState::Init,
                recvs: VecDeque::new(),
                pending: VecDeque::new(),
                inflight: VecDeque::new(),
                next_seq: psn,
                peer_dead: false,
                outbound: None,
                inbound: None,
                inbound_active: false,
            }),
            cv: Condvar::new(),
        });
        qps.insert(qpn, Arc::downgrade(&shared));
        Ok(Box::new(EmuQp {
            shared,
            threads: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ib::nic::{ACCESS_LOCAL_WRITE, ACCESS_REMOTE_WRITE};
    use std::io::{Read, Write};

    const T: Duration = Duration::from_secs(10);

    fn nic() -> Arc<EmuNic> {
        open(EmuOptions::default()).unwrap()
    }

    /// A registered buffer (deregistered on drop). `guard` bytes on both sides stay unregistered.
    struct Reg {
        nic: Arc<EmuNic>,
        buf: Vec<u8>,
        guard: usize,
        mr: Mr,
    }

    impl Reg {
        fn new(nic: &Arc<EmuNic>, len: usize, guard: usize, fill: u8, access: u32) -> Reg {
            let mut buf = vec![fill; len + 2 * guard];
            // SAFETY: the buffer outlives the registration (deregistered in Drop first).
            let mr = unsafe { nic.reg_mr(buf.as_mut_ptr().add(guard), len, access) }.unwrap();
            Reg {
                nic: nic.clone(),
                buf,
                guard,
                mr,
            }
        }
        fn data(&self) -> &[u8] {
            &self.buf[self.guard..self.buf.len() - self.guard]
        }
        fn data_mut(&mut self) -> &mut [u8] {
            let g = self.guard;
            let l = self.buf.len();
            &mut self.buf[g..l - g]
        }
        fn sge(&self, off: usize, len: usize) -> Sge {
            Sge {
                addr: self.mr.addr + off as u64,
                len: len as u32,
                lkey: self.mr.lkey,
            }
        }
        fn guards_are(&self, fill: u8) -> bool {
            let l = self.buf.len();
            self.buf[..self.guard].iter().all(|b| *b == fill)
                && self.buf[l - self.guard..].iter().all(|b| *b == fill)
        }
    }

    impl Drop for Reg {
        fn drop(&mut self) {
            let _ = self.nic.dereg_mr(&self.mr);
        }
    }

    /// Drop order = field order: queue pair, completion queue, NIC.
    struct Side {
        qp: Box<dyn Qp>,
        cq: Box<dyn Cq>,
        nic: Arc<EmuNic>,
    }

    fn side(nic: &Arc<EmuNic>, depth: u32) -> Side {
        let cq = nic.create_cq(256).unwrap();
        let qp = nic.create_qp(&*cq, depth, depth).unwrap();
        Side {
            qp,
            cq,
            nic: nic.clone(),
        }
    }

    fn pair_with(a: &Arc<EmuNic>, b: &Arc<EmuNic>, p: ConnectParams, depth: u32) -> (Side, Side) {
        let mut x = side(a, depth);
        let mut y = side(b, depth);
        let (xa, ya) = (x.qp.addr(), y.qp.addr());
        x.qp.connect(&ya, &p).unwrap();
        y.qp.connect(&xa, &p).unwrap();
        assert_eq!(x.qp.state(), QpState::Rts);
        (x, y)
    }

    fn pair() -> (Side, Side) {
        pair_with(&nic(), &nic(), ConnectParams::default(), 16)
    }

    fn wait_wc(cq: &mut dyn Cq, timeout: Duration) -> Wc {
        let end = Instant::now() + timeout;
        let mut wc = [Wc {
            wr_id: 0,
            status: 0,
            opcode: WcOpcode::Send,
            byte_len: 0,
            imm: None,
            qpn: 0,
        }];
        loop {
            if cq.poll(&mut wc).unwrap() == 1 {
                return wc[0];
            }
            assert!(Instant::now() < end, "no completion within {timeout:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn no_wc(cq: &mut dyn Cq, for_: Duration) {
        std::thread::sleep(for_);
        let mut wc = [wait_dummy()];
        assert_eq!(
            cq.poll(&mut wc).unwrap(),
            0,
            "unexpected completion {:?}",
            wc[0]
        );
    }

    fn wait_dummy() -> Wc {
        Wc {
            wr_id: 0,
            status: 0,
            opcode: WcOpcode::Send,
            byte_len: 0,
            imm: None,
            qpn: 0,
        }
    }

    fn wait_state(qp: &dyn Qp, s: QpState) {
        let end = Instant::now() + T;
        while qp.state() != s {
            assert!(Instant::now() < end, "queue pair never reached {s:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn send_wr(wr_id: u64, op: SendOp, sge: Option<Sge>) -> SendWr {
        SendWr {
            wr_id,
            op,
            sge,
            signaled: true,
        }
    }

    fn write_op(dst: &Reg, off: u64) -> SendOp {
        SendOp::Write {
            remote_addr: dst.mr.addr + off,
            rkey: dst.mr.rkey,
        }
    }

    fn send_recv_on(a: &mut Side, b: &mut Side) {
        for (i, size) in [0usize, 1, 4096, 5 << 20].into_iter().enumerate() {
            let mut src = Reg::new(&a.nic, size.max(1), 0, 0, 0);
            src.data_mut()[..size].copy_from_slice(&pattern(size, i as u8));
            let dst = Reg::new(&b.nic, size + 16, 8, 0xEE, ACCESS_LOCAL_WRITE);
            b.qp.post_recv(100 + i as u64, Some(dst.sge(0, size + 16)))
                .unwrap();
            let imm = (i % 2 == 1).then_some(0xdead_0000 + i as u32);
            let op = imm.map_or(SendOp::Send, SendOp::SendImm);
            let sge = (size > 0).then(|| src.sge(0, size));
            a.qp.post_send(&send_wr(i as u64, op, sge)).unwrap();
            let s = wait_wc(&mut *a.cq, T);
            assert_eq!((s.wr_id, s.status, s.opcode), (i as u64, 0, WcOpcode::Send));
            let r = wait_wc(&mut *b.cq, T);
            assert_eq!(r.status, status::SUCCESS, "{}", status::as_str(r.status));
            assert_eq!(
                (r.wr_id, r.opcode, r.byte_len as usize, r.imm),
                (100 + i as u64, WcOpcode::Recv, size, imm)
            );
            assert_eq!(r.qpn, b.qp.addr().qpn);
            assert!(dst.data()[..size] == src.data()[..size], "size {size}");
            assert!(dst.data()[size..].iter().all(|b| *b == 0xEE));
            assert!(dst.guards_are(0xEE));
        }
    }

    #[test]
    fn emulated_send_recv_sizes() {
        let (mut a, mut b) = pair();
        send_recv_on(&mut a, &mut b);
        // And the other direction on the same pair.
        send_recv_on(&mut b, &mut a);
    }

    #[test]
    fn emulated_one_nic_two_qps() {
        let n = nic();
        let (mut a, mut b) = pair_with(&n, &n, ConnectParams::default(), 16);
        send_recv_on(&mut a, &mut b);
        let mut src = Reg::new(&n, 1000, 0, 0, 0);
        src.data_mut().copy_from_slice(&pattern(1000, 9));
        let dst = Reg::new(&n, 1000, 16, 0, ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE);
        a.qp.post_send(&send_wr(1, write_op(&dst, 0), Some(src.sge(0, 1000))))
            .unwrap();
        assert_eq!(wait_wc(&mut *a.cq, T).status, 0);
        assert_eq!(dst.data(), src.data());
    }

    #[test]
    fn emulated_write_and_write_imm() {
        let (mut a, mut b) = pair();
        let len = 3 << 20;
        let mut src = Reg::new(&a.nic, len, 0, 0, 0);
        src.data_mut().copy_from_slice(&pattern(len, 3));
        let dst = Reg::new(
            &b.nic,
            len + 100,
            32,
            0x11,
            ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE,
        );
        // Plain WRITE at offset 100: no receive consumed, no completion at the responder.
        b.qp.post_recv(7, None).unwrap();
        a.qp.post_send(&send_wr(1, write_op(&dst, 100), Some(src.sge(0, len))))
            .unwrap();
        let w = wait_wc(&mut *a.cq, T);
        assert_eq!((w.wr_id, w.status, w.opcode), (1, 0, WcOpcode::Write));
        assert!(dst.data()[100..] == src.data()[..]);
        assert!(dst.data()[..100].iter().all(|b| *b == 0x11));
        no_wc(&mut *b.cq, Duration::from_millis(50));
        // WRITE WITH IMMEDIATE of 10 bytes at offset 0: consumes the receive.
        let op = SendOp::WriteImm {
            remote_addr: dst.mr.addr,
            rkey: dst.mr.rkey,
            imm: 0x1234_5678,
        };
        a.qp.post_send(&send_wr(2, op, Some(src.sge(5, 10))))
            .unwrap();
        let w = wait_wc(&mut *a.cq, T);
        assert_eq!((w.wr_id, w.status, w.opcode), (2, 0, WcOpcode::Write));
        let r = wait_wc(&mut *b.cq, T);
        assert_eq!(
            (r.wr_id, r.status, r.opcode, r.byte_len, r.imm),
            (7, 0, WcOpcode::RecvRdmaWithImm, 10, Some(0x1234_5678))
        );
        assert_eq!(&dst.data()[..10], &src.data()[5..15]);
        assert!(dst.guards_are(0x11));
        // Unsignaled successful WRs report nothing; pipelined WRs complete in order.
        let mut wr = send_wr(3, write_op(&dst, 0), Some(src.sge(0, 64)));
        wr.signaled = false;
        a.qp.post_send(&wr).unwrap();
        for id in 4..10 {
            a.qp.post_send(&send_wr(id, write_op(&dst, 0), Some(src.sge(0, 4096))))
                .unwrap();
        }
        for id in 4..10 {
            let w = wait_wc(&mut *a.cq, T);
            assert_eq!((w.wr_id, w.status), (id, 0));
        }
    }

    /// Posts a WRITE that must fail with REM_ACCESS_ERR, then another WR that must flush.
    fn expect_access_error(access: u32, off: i64, len: usize, key_delta: u32) {
        let (mut a, mut b) = pair();
        let src = Reg::new(&a.nic, 8192, 0, 0x77, 0);
        let dst = Reg::new(&b.nic, 4096, 64, 0xAB, access);
        let op = SendOp::Write {
            remote_addr: (dst.mr.addr as i64 + off) as u64,
            rkey: dst.mr.rkey.wrapping_add(key_delta),
        };
        b.qp.post_recv(50, None).unwrap();
        a.qp.post_send(&send_wr(1, op, Some(src.sge(0, len))))
            .unwrap();
        a.qp.post_send(&send_wr(2, write_op(&dst, 0), Some(src.sge(0, 16))))
            .unwrap();
        let w = wait_wc(&mut *a.cq, T);
        assert_eq!((w.wr_id, w.status), (1, status::REM_ACCESS_ERR));
        let w = wait_wc(&mut *a.cq, T);
        assert_eq!((w.wr_id, w.status), (2, status::WR_FLUSH_ERR));
        assert_eq!(a.qp.state(), QpState::Error);
        wait_state(&*b.qp, QpState::Error);
        let r = wait_wc(&mut *b.cq, T);
        assert_eq!((r.wr_id, r.status), (50, status::WR_FLUSH_ERR));
        // Later WRs flush at once.
        a.qp.post_send(&send_wr(3, write_op(&dst, 0), Some(src.sge(0, 16))))
            .unwrap();
        let w = wait_wc(&mut *a.cq, T);
        assert_eq!((w.wr_id, w.status), (3, status::WR_FLUSH_ERR));
        assert!(dst.buf.iter().all(|b| *b == 0xAB), "a byte was written");
    }

    #[test]
    fn emulated_bad_rkey() {
        expect_access_error(ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE, 0, 16, 1);
    }

    #[test]
    fn emulated_out_of_bounds_write() {
        let rw = ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE;
        expect_access_error(rw, 4096 - 10, 100, 0);
        expect_access_error(rw, -1, 8, 0);
        expect_access_error(rw, 0, 4097, 0);
    }

    #[test]
    fn emulated_write_without_remote_write() {
        expect_access_error(ACCESS_LOCAL_WRITE, 0, 16, 0);
    }

    #[test]
    fn emulated_dereg_then_write() {
        let (mut a, b) = pair();
        let src = Reg::new(&a.nic, 64, 0, 1, 0);
        let mut dst = vec![0u8; 64];
        // SAFETY: `dst` outlives the registration.
        let mr = unsafe {
            b.nic.reg_mr(
                dst.as_mut_ptr(),
                64,
                ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE,
            )
        }
        .unwrap();
        let op = SendOp::Write {
            remote_addr: mr.addr,
            rkey: mr.rkey,
        };
        a.qp.post_send(&send_wr(1, op, Some(src.sge(0, 64))))
            .unwrap();
        assert_eq!(wait_wc(&mut *a.cq, T).status, 0);
        assert!(dst.iter().all(|b| *b == 1));
        dst.fill(0);
        b.nic.dereg_mr(&mr).unwrap();
        assert!(b.nic.dereg_mr(&mr).is_err());
        a.qp.post_send(&send_wr(2, op, Some(src.sge(0, 64))))
            .unwrap();
        let w = wait_wc(&mut *a.cq, T);
        assert_eq!((w.wr_id, w.status), (2, status::REM_ACCESS_ERR));
        assert!(dst.iter().all(|b| *b == 0));
        wait_state(&*b.qp, QpState::Error);
    }

    #[test]
    fn emulated_local_protection_error() {
        for case in 0..3 {
            let (mut a, mut b) = pair();
            let src = Reg::new(&a.nic, 100, 0, 0, 0);
            let dst = Reg::new(&b.nic, 1000, 0, 0, ACCESS_LOCAL_WRITE);
            b.qp.post_recv(9, Some(dst.sge(0, 1000))).unwrap();
            let sge = match case {
                0 => Sge {
                    lkey: src.mr.lkey.wrapping_add(1),
                    ..src.sge(0, 10)
                },
                1 => src.sge(50, 51),
                _ => Sge {
                    addr: src.mr.addr - 1,
                    ..src.sge(0, 10)
                },
            };
            a.qp.post_send(&send_wr(1, SendOp::Send, Some(sge)))
                .unwrap();
            let w = wait_wc(&mut *a.cq, T);
            assert_eq!(
                (w.wr_id, w.status),
                (1, status::LOC_PROT_ERR),
                "case {case}"
            );
            assert_eq!(a.qp.state(), QpState::Error);
            // Nothing reached the responder: its receive is still posted.
            no_wc(&mut *b.cq, Duration::from_millis(20));
            assert_eq!(b.qp.state(), QpState::Rts);
        }
    }

    #[test]
    fn emulated_send_too_long() {
        let (mut a, mut b) = pair();
        let src = Reg::new(&a.nic, 32, 0, 5, 0);
        let dst = Reg::new(&b.nic, 16, 16, 0, ACCESS_LOCAL_WRITE);
        b.qp.post_recv(1, Some(dst.sge(0, 16))).unwrap();
        b.qp.post_recv(2, Some(dst.sge(0, 16))).unwrap();
        a.qp.post_send(&send_wr(5, SendOp::Send, Some(src.sge(0, 32))))
            .unwrap();
        let w = wait_wc(&mut *a.cq, T);
        assert_eq!((w.wr_id, w.status), (5, status::REM_INV_REQ_ERR));
        let r = wait_wc(&mut *b.cq, T);
        assert_eq!((r.wr_id, r.status), (1, status::LOC_LEN_ERR));
        let r = wait_wc(&mut *b.cq, T);
        assert_eq!((r.wr_id, r.status), (2, status::WR_FLUSH_ERR));
        assert_eq!(a.qp.state(), QpState::Error);
        assert_eq!(b.qp.state(), QpState::Error);
        assert!(dst.buf.iter().all(|b| *b == 0));
        // A receive without a buffer takes only empty SENDs.
        let (mut a, mut b) = pair();
        let src = Reg::new(&a.nic, 1, 0, 5, 0);
        b.qp.post_recv(3, None).unwrap();
        a.qp.post_send(&send_wr(6, SendOp::Send, Some(src.sge(0, 1))))
            .unwrap();
        assert_eq!(wait_wc(&mut *a.cq, T).status, status::REM_INV_REQ_ERR);
        assert_eq!(wait_wc(&mut *b.cq, T).status, status::LOC_LEN_ERR);
    }

    #[test]
    fn emulated_rnr_late_receive_succeeds() {
        let (mut a, mut b) = pair();
        let mut src = Reg::new(&a.nic, 100, 0, 0, 0);
        src.data_mut().copy_from_slice(&pattern(100, 1));
        let dst = Reg::new(&b.nic, 100, 0, 0, ACCESS_LOCAL_WRITE);
        a.qp.post_send(&send_wr(1, SendOp::Send, Some(src.sge(0, 100))))
            .unwrap();
        // Longer than the ACK budget: the responder's keep-alives hold the requester.
        no_wc(&mut *a.cq, Duration::from_millis(1200));
        b.qp.post_recv(2, Some(dst.sge(0, 100))).unwrap();
        let w = wait_wc(&mut *a.cq, T);
        assert_eq!((w.wr_id, w.status), (1, 0));
        let r = wait_wc(&mut *b.cq, T);
        assert_eq!((r.wr_id, r.status, r.byte_len), (2, 0, 100));
        assert_eq!(dst.data(), src.data());
    }

    #[test]
    fn emulated_rnr_retry_exceeded() {
        let p = ConnectParams {
            rnr_retry: 0,
            ..ConnectParams::default()
        };
        let (mut a, b) = pair_with(&nic(), &nic(), p, 16);
        a.qp.post_send(&send_wr(1, SendOp::Send, None)).unwrap();
        a.qp.post_send(&send_wr(2, SendOp::Send, None)).unwrap();
        let w = wait_wc(&mut *a.cq, T);
        assert_eq!((w.wr_id, w.status), (1, status::RNR_RETRY_EXC_ERR));
        assert_eq!(wait_wc(&mut *a.cq, T).status, status::WR_FLUSH_ERR);
        assert_eq!(a.qp.state(), QpState::Error);
        // The responder is not in error, and WRITE WITH IMMEDIATE needs a receive too.
        assert_eq!(b.qp.state(), QpState::Rts);
        let p = ConnectParams {
            rnr_retry: 3,
            ..ConnectParams::default()
        };
        let (mut a, b2) = pair_with(&nic(), &b.nic, p, 16);
        let dst = Reg::new(&b2.nic, 8, 0, 0, ACCESS_REMOTE_WRITE);
        let op = SendOp::WriteImm {
            remote_addr: dst.mr.addr,
            rkey: dst.mr.rkey,
            imm: 1,
        };
        a.qp.post_send(&send_wr(3, op, None)).unwrap();
        let w = wait_wc(&mut *a.cq, T);
        assert_eq!((w.wr_id, w.status), (3, status::RNR_RETRY_EXC_ERR));
    }

    #[test]
    fn emulated_peer_dropped_mid_transfer() {
        let (mut a, b) = pair();
        let len = 5 << 20;
        let src = Reg::new(&a.nic, len, 0, 3, 0);
        let dst = Reg::new(&b.nic, len, 0, 0, ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE);
        // A SEND held by the responder (no receive posted, infinite RNR retry) keeps the
        // writes behind it outstanding.
        a.qp.post_send(&send_wr(0, SendOp::Send, None)).unwrap();
        for id in 1..6 {
            a.qp.post_send(&send_wr(id, write_op(&dst, 0), Some(src.sge(0, len))))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        let start = Instant::now();
        let Side { qp, cq, nic } = b;
        drop(qp);
        drop(dst);
        drop(cq);
        drop(nic);
        let w = wait_wc(&mut *a.cq, Duration::from_secs(2));
        assert_eq!((w.wr_id, w.status), (0, status::RETRY_EXC_ERR));
        assert!(start.elapsed() < Duration::from_secs(2));
        for id in 1..6 {
            let w = wait_wc(&mut *a.cq, Duration::from_secs(2));
            assert_eq!(w.wr_id, id);
            assert!(
                w.status == status::RETRY_EXC_ERR || w.status == status::WR_FLUSH_ERR,
                "{}",
                status::as_str(w.status)
            );
        }
        assert_eq!(a.qp.state(), QpState::Error);
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn emulated_peer_gone_while_idle() {
        let (mut a, b) = pair();
        drop(b);
        std::thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        a.qp.post_send(&send_wr(1, SendOp::Send, None)).unwrap();
        let w = wait_wc(&mut *a.cq, Duration::from_secs(2));
        assert_eq!((w.wr_id, w.status), (1, status::RETRY_EXC_ERR));
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn emulated_silent_peer_times_out() {
        // A fake responder that accepts the hello and then never answers.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let fake = QpAddr {
            qpn: 77,
            nic_addr: encode_addr(l.local_addr().unwrap(), &[9; SECRET_LEN]),
            ..QpAddr::default()
        };
        let th = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut h = [0u8; HELLO_LEN];
            s.read_exact(&mut h).unwrap();
            assert_eq!(u32_at(&h, 12), 77);
            let mut reply = [0u8; REPLY_LEN];
            reply[..8].copy_from_slice(&MAGIC);
            s.write_all(&reply).unwrap();
            // Hold the socket open without answering until the requester closes.
            let mut sink = [0u8; 1024];
            while s.read(&mut sink).map(|n| n > 0).unwrap_or(false) {}
        });
        let n = nic();
        let mut a = side(&n, 4);
        let p = ConnectParams {
            timeout: 10,
            retry_cnt: 2,
            ..ConnectParams::default()
        };
        a.qp.connect(&fake, &p).unwrap();
        let start = Instant::now();
        a.qp.post_send(&send_wr(1, SendOp::Send, None)).unwrap();
        let w = wait_wc(&mut *a.cq, Duration::from_secs(3));
        assert_eq!((w.wr_id, w.status), (1, status::RETRY_EXC_ERR));
        let el = start.elapsed();
        assert!(
            el >= Duration::from_millis(250) && el < Duration::from_secs(2),
            "{el:?}"
        );
        drop(a);
        th.join().unwrap();
    }

    #[test]
    fn emulated_strangers_are_ignored() {
        let n = nic();
        let mut b = side(&n, 4);
        let baddr = b.qp.addr();
        let port = n.local_addr();
        let mut strangers = Vec::new();
        // Garbage.
        let mut s = TcpStream::connect(port).unwrap();
        s.write_all(&[0xff; 4000]).unwrap();
        strangers.push(s);
        // A well-formed hello with the right queue pair and a wrong secret.
        let mut s = TcpStream::connect(port).unwrap();
        let mut h = [0u8; HELLO_LEN];
        h[..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_be_bytes());
        h[12..16].copy_from_slice(&baddr.qpn.to_be_bytes());
        h[36] = 7;
        s.write_all(&h).unwrap();
        s.write_all(&[0u8; REQ_LEN]).unwrap();
        strangers.push(s);
        // A connection that says nothing.
        strangers.push(TcpStream::connect(port).unwrap());
        // A truncated hello.
        let mut s = TcpStream::connect(port).unwrap();
        s.write_all(&MAGIC).unwrap();
        strangers.push(s);
        // Each is dropped: the NIC closes them without answering.
        for mut s in strangers {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 16];
            let start = Instant::now();
            match s.read(&mut b) {
                Ok(0) => {}
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
                Ok(k) => panic!("a stranger got {k} bytes"),
            }
            assert!(start.elapsed() < Duration::from_secs(3));
        }
        // The NIC and the targeted queue pair still work.
        let mut a = side(&nic(), 4);
        let aaddr = a.qp.addr();
        a.qp.connect(&baddr, &ConnectParams::default()).unwrap();
        b.qp.connect(&aaddr, &ConnectParams::default()).unwrap();
        let dst = Reg::new(&n, 16, 0, 0, ACCESS_LOCAL_WRITE);
        b.qp.post_recv(1, Some(dst.sge(0, 16))).unwrap();
        a.qp.post_send(&send_wr(2, SendOp::SendImm(5), None))
            .unwrap();
        assert_eq!(wait_wc(&mut *a.cq, T).status, 0);
        let r = wait_wc(&mut *b.cq, T);
        assert_eq!((r.wr_id, r.status, r.imm), (1, 0, Some(5)));
        // A second requester for the same queue pair, even with the secret, is refused.
        let mut c = side(&nic(), 4);
        assert!(c.qp.connect(&baddr, &ConnectParams::default()).is_err());
        // Connecting with a wrong secret fails.
        let mut d = side(&nic(), 4);
        let mut wrong = baddr.clone();
        let l = wrong.nic_addr.len();
        wrong.nic_addr[l - 1] ^= 1;
        assert!(d.qp.connect(&wrong, &ConnectParams::default()).is_err());
    }

    #[test]
    fn emulated_cq_fd_event() {
        let (mut a, mut b) = pair();
        let fd = b.cq.fd();
        let readable = |ms: i32| {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, ms) == 1 }
        };
        assert!(!readable(0));
        b.cq.arm().unwrap();
        assert!(!readable(20));
        b.qp.post_recv(1, None).unwrap();
        a.qp.post_send(&send_wr(1, SendOp::Send, None)).unwrap();
        assert!(readable(5000), "no event after arm + completion");
        b.cq.take_event().unwrap();
        assert!(!readable(0));
        assert_eq!(wait_wc(&mut *b.cq, T).status, 0);
        // Not armed: no event.
        b.qp.post_recv(2, None).unwrap();
        a.qp.post_send(&send_wr(2, SendOp::Send, None)).unwrap();
        assert_eq!(wait_wc(&mut *b.cq, T).status, 0);
        assert!(!readable(20));
    }

    #[test]
    fn emulated_queue_bounds_and_states() {
        let n = nic();
        let mut x = side(&n, 2);
        assert!(x.qp.post_send(&send_wr(1, SendOp::Send, None)).is_err());
        assert_eq!(x.qp.state(), QpState::Init);
        let mut y = side(&n, 2);
        let (xa, ya) = (x.qp.addr(), y.qp.addr());
        x.qp.connect(&ya, &ConnectParams::default()).unwrap();
        assert!(x.qp.connect(&ya, &ConnectParams::default()).is_err());
        y.qp.connect(&xa, &ConnectParams::default()).unwrap();
        // No receive at y: the SENDs wait (RNR, infinite retry), filling x's send queue.
        x.qp.post_send(&send_wr(1, SendOp::Send, None)).unwrap();
        x.qp.post_send(&send_wr(2, SendOp::Send, None)).unwrap();
        assert!(x.qp.post_send(&send_wr(3, SendOp::Send, None)).is_err());
        y.qp.post_recv(1, None).unwrap();
        y.qp.post_recv(2, None).unwrap();
        assert_eq!(wait_wc(&mut *x.cq, T).wr_id, 1);
        assert_eq!(wait_wc(&mut *x.cq, T).wr_id, 2);
        y.qp.post_recv(3, None).unwrap();
        y.qp.post_recv(4, None).unwrap();
        assert!(y.qp.post_recv(5, None).is_err());
        // A CQ of another NIC is refused.
        let other = nic();
        let cq = other.create_cq(4).unwrap();
        assert!(n.create_qp(&*cq, 4, 4).is_err());
        assert_eq!(n.port().link_layer, LinkLayer::Emulated);
        assert_eq!(n.port().device, "emu0");
    }
}
