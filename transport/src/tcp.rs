//! TCP transport.
//!
//! One connection = one or more sockets (`streams`). A message of at least two
//! `stripe_min` bytes is split into up to `streams` parts, part `i` on socket `i`; smaller
//! messages travel on socket 0. Every socket is a FIFO, and both ends split a message of a
//! given length the same way (the connector's stripe size is adopted by the acceptor), so parts
//! are matched without sequence numbers.
//!
//! Each part is preceded by a 64-byte frame header: magic `BRDF`, kind (data, abort,
//! goodbye), part index, part count, tag, total length, 32 meta bytes. Sends go straight from
//! the caller's buffer (`writev` of header + payload; queued small messages are coalesced into
//! one `writev`); receives of large payloads go straight into the caller's buffer, small ones
//! through a 64 KiB per-socket read buffer so that several small frames cost one `read`.
//! Nothing is allocated per message once the queues have grown to their working size.
//!
//! The listener sends every accepted socket a 40-byte challenge frame first (magic `BRDC`,
//! version, a fresh random challenge, a fresh random connection secret). The connector reads it
//! (within its deadline) and answers with a 40-byte socket hello (magic `BRDT`, version, index,
//! socket count, stripe size, connection secret, length of the caller's hello), followed on
//! socket 0 by the caller's hello, which the caller built from socket 0's challenge
//! ([`Transport::connect_challenged`]). Sockets 1.. of a striped connection present the secret
//! that socket 0 received, so nobody but that connector can add a stripe to the connection.
//! The listener bounds the hello's declared length (4 KiB) before reading it, drops sockets
//! whose hello is not this protocol or does not arrive within the hello deadline (10 s), and
//! closes new sockets at once while 128 connections already wait for their hello; each with a
//! log line naming the peer.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::reqs::ReqTable;
use crate::{
    random_bytes, Arrival, Challenge, Completion, Conn, ConnectHandle, DeviceProps, HelloCheck,
    HelloFn, Listener, Meta, NetError, NetResult, Peeked, PollFd, PtrSupport, Request, Transport,
    CHALLENGE_LEN, META_LEN,
};

const FRAME_MAGIC: [u8; 4] = *b"BRDF";
const HELLO_MAGIC: [u8; 4] = *b"BRDT";
const CHAL_MAGIC: [u8; 4] = *b"BRDC";
/// Version of the TCP wire protocol.
pub const PROTO_VERSION: u16 = 2;
const HDR: usize = 64;
const SOCK_HELLO: usize = 40;
const SECRET_LEN: usize = 16;
/// A random per-connection secret that sockets 1.. of a striped connection present.
type Secret = [u8; SECRET_LEN];
/// Length of the challenge frame a listener sends first on every socket.
const CHAL_FRAME: usize = 8 + CHALLENGE_LEN + SECRET_LEN;
/// Most connections that may wait for their hello at once on one listener (sockets whose
/// hello has not arrived, plus striped connections whose other sockets have not); more are
/// closed at once.
pub const MAX_PENDING: usize = 128;
const KIND_DATA: u8 = 1;
const KIND_ABORT: u8 = 2;
const KIND_BYE: u8 = 3;
const RXBUF: usize = 64 * 1024;
/// Payload remainders at least this large are read straight into the caller's buffer.
const DIRECT_READ: usize = 16 * 1024;
const MAX_POSTED: usize = 4096;
const MAX_HELLO: usize = 4096;
const MAX_REASON: usize = 4096;
const MAX_STREAMS: usize = 64;
const MAX_IOV: usize = 64;
const NO_REQ: u64 = u64::MAX;
/// How long the listener waits for a connecting socket to finish its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of the TCP transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpOptions {
    /// Sockets per connection (1..=64).
    pub streams: usize,
    /// Smallest part of a striped message, in bytes.
    pub stripe_min: usize,
    /// Address to listen on.
    pub bind: IpAddr,
    /// SO_SNDBUF/SO_RCVBUF to request, if any (the kernel's autotuning otherwise).
    pub sock_buf: Option<usize>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            streams: 1,
            stripe_min: 256 * 1024,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            sock_buf: None,
        }
    }
}

/// The TCP transport.
#[derive(Debug, Clone)]
pub struct TcpTransport {
    opts: TcpOptions,
}

impl TcpTransport {
    /// A TCP transport with these options.
    pub fn new(opts: TcpOptions) -> NetResult<TcpTransport> {
        if !(1..=MAX_STREAMS).contains(&opts.streams) {
            return Err(NetError::Unavailable(format!(
                "tcp streams must be 1..={MAX_STREAMS}, got {}",
                opts.streams
            )));
        }
        Ok(TcpTransport { opts })
    }

    fn setup_socket(&self, s: &TcpStream) -> NetResult<()> {
        s.set_nodelay(true)
            .map_err(|e| NetError::io("setsockopt TCP_NODELAY", e))?;
        if let Some(sz) = self.opts.sock_buf {
            set_buf(s.as_raw_fd(), sz);
        }
        Ok(())
    }
}

fn set_buf(fd: RawFd, sz: usize) {
    let v: libc::c_int = sz.min(i32::MAX as usize) as libc::c_int;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: fd is an open socket owned by the caller; the option value is a c_int that
        // lives across the call and its size is passed.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Sends on a non-blocking socket without raising SIGPIPE (EPIPE comes back instead).
fn send_nosignal(fd: RawFd, b: &[u8]) -> std::io::Result<usize> {
    // SAFETY: FFI; `b` is a live slice of b.len() readable bytes.
    let r = unsafe {
        libc::send(
            fd,
            b.as_ptr().cast::<libc::c_void>(),
            b.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Reads exactly `buf.len()` bytes from a blocking socket by `deadline`. `Ok(false)`: the peer
/// closed (or reset) the connection first.
fn read_by(s: &TcpStream, buf: &mut [u8], deadline: Instant, what: &str) -> NetResult<bool> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(NetError::Timeout(what.to_string()));
        }
        s.set_read_timeout(Some(left))
            .map_err(|e| NetError::io("set_read_timeout", e))?;
        let mut r: &TcpStream = s;
        match r.read(&mut buf[got..]) {
            Ok(0) => return Ok(false),
            Ok(k) => got += k,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ) =>
            {
                return Ok(false)
            }
            Err(e) => return Err(NetError::io(what, e)),
        }
    }
    Ok(true)
}

/// The frame a listener sends first on every accepted socket: magic `BRDC`, version, two
/// zero bytes, the socket's fresh challenge, and the connection secret that the connector's
/// other sockets of this connection present (meaningful on the first socket only).
fn encode_challenge(ch: &Challenge, secret: &Secret) -> [u8; CHAL_FRAME] {
    let mut f = [0u8; CHAL_FRAME];
    f[0..4].copy_from_slice(&CHAL_MAGIC);
    f[4..6].copy_from_slice(&PROTO_VERSION.to_le_bytes());
    f[8..8 + CHALLENGE_LEN].copy_from_slice(ch);
    f[8 + CHALLENGE_LEN..].copy_from_slice(secret);
    f
}

fn decode_challenge(f: &[u8; CHAL_FRAME]) -> NetResult<(Challenge, Secret)> {
    if f[0..4] != CHAL_MAGIC {
        return Err(NetError::Protocol(
            "the listener did not send a braid tcp challenge (bad magic)".into(),
        ));
    }
    let ver = u16::from_le_bytes([f[4], f[5]]);
    if ver != PROTO_VERSION {
        return Err(NetError::Protocol(format!(
            "the listener speaks tcp protocol version {ver}, this build {PROTO_VERSION}"
        )));
    }
    let mut ch = [0u8; CHALLENGE_LEN];
    ch.copy_from_slice(&f[8..8 + CHALLENGE_LEN]);
    let mut secret = [0u8; SECRET_LEN];
    secret.copy_from_slice(&f[8 + CHALLENGE_LEN..]);
    Ok((ch, secret))
}

/// A socket hello: magic `BRDT`, version, socket index, socket count, 2 zero bytes, stripe
/// size (u32), connection secret (zero on socket 0), length of the caller's hello (u32), 4 zero
/// bytes; then, on socket 0, the caller's hello.
fn encode_sock_hello(
    index: usize,
    nsock: usize,
    stripe_min: usize,
    secret: &Secret,
    hello: &[u8],
) -> Vec<u8> {
    let mut h = Vec::with_capacity(SOCK_HELLO + hello.len());
    h.extend_from_slice(&HELLO_MAGIC);
    h.extend_from_slice(&PROTO_VERSION.to_le_bytes());
    h.extend_from_slice(&(index as u16).to_le_bytes());
    h.extend_from_slice(&(nsock as u16).to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&(stripe_min.min(u32::MAX as usize) as u32).to_le_bytes());
    h.extend_from_slice(secret);
    h.extend_from_slice(&(hello.len() as u32).to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(hello);
    h
}

impl TcpTransport {
    /// Opens one socket to `addr` and reads the listener's challenge frame. A listener that
    /// closes the socket before its challenge (too many connections waiting there) is retried
    /// until `deadline`, as is a refused connection.
    fn open_socket(
        &self,
        addr: SocketAddr,
        deadline: Instant,
        give_up: &dyn Fn() -> bool,
    ) -> NetResult<(TcpStream, Challenge, Secret)> {
        // Between attempts: wait a little, unless the caller gives up.
        let pause = || {
            if give_up() {
                return Err(NetError::Timeout(format!(
                    "connecting to {addr}: gave up (the caller's view of the peer is stale)"
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            std::thread::sleep(left.min(Duration::from_millis(20)));
            Ok(())
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NetError::Timeout(format!("connecting to {addr}")));
            }
            let s = match TcpStream::connect_timeout(&addr, left) {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    pause()?;
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::TimedOut => {
                    return Err(NetError::Timeout(format!("connecting to {addr}")))
                }
                Err(e) => return Err(NetError::io(format!("connect {addr}"), e)),
            };
            self.setup_socket(&s)?;
            let mut f = [0u8; CHAL_FRAME];
            let what = format!("waiting for the challenge of {addr}");
            if !read_by(&s, &mut f, deadline, &what)? {
                tracing::debug!(target: "braid::net", "{addr} closed the connection before its challenge; retrying");
                pause()?;
                continue;
            }
            let (ch, secret) = decode_challenge(&f)?;
            return Ok((s, ch, secret));
        }
    }

    /// A listener with the default hello deadline and pending cap (tests change them).
    fn listen_tcp(&self) -> NetResult<(TcpListen, ConnectHandle)> {
        let l = TcpListener::bind(SocketAddr::new(self.opts.bind, 0))
            .map_err(|e| NetError::io(format!("bind {}", self.opts.bind), e))?;
        l.set_nonblocking(true)
            .map_err(|e| NetError::io("set_nonblocking", e))?;
        let addr = l.local_addr().map_err(|e| NetError::io("local_addr", e))?;
        let handle = ConnectHandle {
            transport: "tcp".into(),
            addr: addr.to_string().into_bytes(),
        };
        let ep = epoll_new();
        epoll_ctl(&ep, libc::EPOLL_CTL_ADD, l.as_raw_fd());
        Ok((
            TcpListen {
                listener: l,
                transport: self.clone(),
                pending: Vec::new(),
                groups: HashMap::new(),
                hello_timeout: HELLO_TIMEOUT,
                max_pending: MAX_PENDING,
                check: None,
                ep,
            },
            handle,
        ))
    }
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn devices(&self) -> NetResult<Vec<DeviceProps>> {
        Ok(vec![DeviceProps {
            name: format!("tcp:{}", self.opts.bind),
            speed_mbps: 0,
            latency_us: 0.0,
            ptr_support: PtrSupport {
                host: true,
                cuda: false,
            },
        }])
    }

    fn listen(&self, _dev: usize) -> NetResult<(Box<dyn Listener>, ConnectHandle)> {
        let (l, h) = self.listen_tcp()?;
        Ok((Box::new(l), h))
    }

    fn connect_challenged(
        &self,
        handle: &ConnectHandle,
        hello: HelloFn<'_>,
        deadline: Instant,
    ) -> NetResult<Box<dyn Conn>> {
        self.connect_or_give_up(handle, hello, deadline, &|| false)
    }

    fn connect_or_give_up(
        &self,
        handle: &ConnectHandle,
        hello: HelloFn<'_>,
        deadline: Instant,
        give_up: &dyn Fn() -> bool,
    ) -> NetResult<Box<dyn Conn>> {
        if handle.transport != "tcp" {
            return Err(NetError::Protocol(format!(
                "tcp cannot connect to a {} handle",
                handle.transport
            )));
        }
        let addr: SocketAddr = std::str::from_utf8(&handle.addr)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| NetError::Protocol("tcp handle does not hold an address".into()))?;
        let n = self.opts.streams;
        let mut secret: Secret = [0; SECRET_LEN];
        let mut socks = Vec::with_capacity(n);
        for i in 0..n {
            let (s, challenge, sec) = self.open_socket(addr, deadline, give_up)?;
            // Socket 0 answers its challenge with the caller's hello and learns the connection
            // secret; the other sockets present that secret, so only this connector can add
            // sockets to this connection.
            let h = if i == 0 {
                secret = sec;
                let body = hello(&challenge);
                if body.len() > MAX_HELLO {
                    return Err(NetError::Protocol("hello larger than 4 KiB".into()));
                }
                encode_sock_hello(0, n, self.opts.stripe_min, &[0; SECRET_LEN], &body)
            } else {
                encode_sock_hello(i, n, self.opts.stripe_min, &secret, &[])
            };
            let left = deadline.saturating_duration_since(Instant::now());
            s.set_write_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| NetError::io("set_write_timeout", e))?;
            (&s).write_all(&h)
                .map_err(|e| NetError::io(format!("sending hello to {addr}"), e))?;
            s.set_nonblocking(true)
                .map_err(|e| NetError::io("set_nonblocking", e))?;
            socks.push(s);
        }
        Ok(Box::new(TcpConn::new(
            socks,
            self.opts.stripe_min,
            addr.to_string(),
        )))
    }
}

struct PendingSock {
    stream: TcpStream,
    peer: SocketAddr,
    /// Socket hello bytes received so far (at most SOCK_HELLO + MAX_HELLO).
    buf: Vec<u8>,
    since: Instant,
    /// The challenge sent on this socket.
    challenge: Challenge,
    /// The connection secret sent on this socket (the key of its group if it is socket 0).
    secret: Secret,
    /// The challenge frame and how much of it went out.
    out: [u8; CHAL_FRAME],
    sent: usize,
}

struct Group {
    socks: Vec<Option<TcpStream>>,
    hello: Vec<u8>,
    challenge: Challenge,
    stripe_min: usize,
    since: Instant,
    peer: SocketAddr,
}

/// Listening socket of the TCP transport.
///
/// Every accepted socket gets a challenge frame at once; its socket hello must arrive within
/// the hello deadline, and at most `max_pending` sockets and incomplete striped connections
/// wait at a time (more are closed at once). The caller's hello is at most 4 KiB and its
/// declared length is checked before anything is read into memory.
pub struct TcpListen {
    listener: TcpListener,
    transport: TcpTransport,
    pending: Vec<PendingSock>,
    /// Striped connections whose first socket arrived, by connection secret.
    groups: HashMap<Secret, Group>,
    hello_timeout: Duration,
    max_pending: usize,
    check: Option<HelloCheck>,
    /// An epoll set of the listening socket and the pending sockets, so that one descriptor
    /// ([`Listener::fd`]) wakes the caller for new sockets and for hellos alike (`None` if
    /// epoll is unavailable: then only new sockets wake it).
    ep: Option<OwnedFd>,
}

fn epoll_new() -> Option<OwnedFd> {
    // SAFETY: FFI without pointers; a valid descriptor is owned by nobody else.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor this function owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn epoll_ctl(ep: &Option<OwnedFd>, op: libc::c_int, fd: RawFd) {
    let Some(ep) = ep else {
        return;
    };
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
        u64: fd as u64,
    };
    // SAFETY: FFI; `ev` lives across the call; both descriptors are open (a failure, e.g. a
    // descriptor already removed, only costs a wake-up).
    unsafe {
        libc::epoll_ctl(ep.as_raw_fd(), op, fd, &mut ev);
    }
}

/// A socket hello that arrived whole.
struct SockHello {
    index: usize,
    nsock: usize,
    stripe_min: usize,
    secret: Secret,
    hello: Vec<u8>,
}

enum HelloState {
    Incomplete,
    Done(SockHello),
    Bad(String),
}

fn parse_sock_hello(b: &[u8]) -> HelloState {
    if b.len() < SOCK_HELLO {
        if !b.is_empty() && b[..b.len().min(4)] != HELLO_MAGIC[..b.len().min(4)] {
            return HelloState::Bad("not a braid transport hello (bad magic)".into());
        }
        return HelloState::Incomplete;
    }
    if b[..4] != HELLO_MAGIC {
        return HelloState::Bad("not a braid transport hello (bad magic)".into());
    }
    let u16at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let ver = u16at(4);
    if ver != PROTO_VERSION {
        return HelloState::Bad(format!(
            "tcp protocol version {ver}, this build speaks {PROTO_VERSION}"
        ));
    }
    let index = u16at(6) as usize;
    let nsock = u16at(8) as usize;
    let stripe_min = u32at(12) as usize;
    let mut secret = [0u8; SECRET_LEN];
    secret.copy_from_slice(&b[16..32]);
    let hl = u32at(32) as usize;
    if nsock == 0 || nsock > MAX_STREAMS || index >= nsock || hl > MAX_HELLO || stripe_min == 0 {
        return HelloState::Bad(format!(
            "bad socket hello (index {index}, sockets {nsock}, hello {hl} bytes, at most {MAX_HELLO})"
        ));
    }
    if (index > 0 && hl > 0) || b.len() > SOCK_HELLO + hl {
        return HelloState::Bad("socket hello followed by unexpected bytes".into());
    }
    if b.len() < SOCK_HELLO + hl {
        return HelloState::Incomplete;
    }
    HelloState::Done(SockHello {
        index,
        nsock,
        stripe_min,
        secret,
        hello: b[SOCK_HELLO..].to_vec(),
    })
}

impl TcpListen {
    /// Sends what is left of the challenge frame, then reads the socket hello, never more
    /// than its declared (and bounded) length.
    fn read_pending(p: &mut PendingSock) -> Result<HelloState, String> {
        while p.sent < CHAL_FRAME {
            match send_nosignal(p.stream.as_raw_fd(), &p.out[p.sent..]) {
                Ok(k) => p.sent += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(HelloState::Incomplete),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("sending the challenge: {e}")),
            }
        }
        loop {
            let want = match parse_sock_hello(&p.buf) {
                HelloState::Incomplete => {
                    if p.buf.len() < SOCK_HELLO {
                        SOCK_HELLO - p.buf.len()
                    } else {
                        // parse_sock_hello bounded this length (<= MAX_HELLO).
                        let hl = u32::from_le_bytes([p.buf[32], p.buf[33], p.buf[34], p.buf[35]])
                            as usize;
                        (SOCK_HELLO + hl).saturating_sub(p.buf.len())
                    }
                }
                other => return Ok(other),
            };
            let mut tmp = [0u8; 512];
            let take = want.min(tmp.len());
            match p.stream.read(&mut tmp[..take]) {
                Ok(0) => return Err("closed before finishing its hello".into()),
                Ok(k) => p.buf.extend_from_slice(&tmp[..k]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(HelloState::Incomplete),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Removes pending socket `i` (and from the epoll set).
    fn take_pending(&mut self, i: usize) -> PendingSock {
        let p = self.pending.swap_remove(i);
        epoll_ctl(&self.ep, libc::EPOLL_CTL_DEL, p.stream.as_raw_fd());
        p
    }

    /// Takes new sockets off the listening socket: each gets its challenge frame at once, or
    /// is closed at once when `max_pending` connections already wait for their hello.
    fn accept_new(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, peer)) => {
                    let waiting = self.pending.len() + self.groups.len();
                    if waiting >= self.max_pending {
                        tracing::warn!(target: "braid::net", "refusing connection from {peer}: {waiting} connections already wait for their hello (at most {})", self.max_pending);
                        continue;
                    }
                    if let Err(e) = s.set_nonblocking(true) {
                        tracing::warn!(target: "braid::net", "dropping connection from {peer}: {e}");
                        continue;
                    }
                    if let Err(e) = self.transport.setup_socket(&s) {
                        tracing::warn!(target: "braid::net", "dropping connection from {peer}: {e}");
                        continue;
                    }
                    let mut fresh = [0u8; CHALLENGE_LEN + SECRET_LEN];
                    if let Err(e) = random_bytes(&mut fresh) {
                        tracing::warn!(target: "braid::net", "dropping connection from {peer}: {e}");
                        continue;
                    }
                    let mut challenge = [0u8; CHALLENGE_LEN];
                    challenge.copy_from_slice(&fresh[..CHALLENGE_LEN]);
                    let mut secret = [0u8; SECRET_LEN];
                    secret.copy_from_slice(&fresh[CHALLENGE_LEN..]);
                    let mut p = PendingSock {
                        out: encode_challenge(&challenge, &secret),
                        stream: s,
                        peer,
                        buf: Vec::new(),
                        since: Instant::now(),
                        challenge,
                        secret,
                        sent: 0,
                    };
                    // A fresh socket's send buffer is empty: the frame goes out whole here.
                    match send_nosignal(p.stream.as_raw_fd(), &p.out) {
                        Ok(k) => p.sent = k,
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::WouldBlock | ErrorKind::Interrupted
                            ) => {}
                        Err(e) => {
                            tracing::warn!(target: "braid::net", "dropping connection from {peer}: sending the challenge: {e}");
                            continue;
                        }
                    }
                    epoll_ctl(&self.ep, libc::EPOLL_CTL_ADD, p.stream.as_raw_fd());
                    self.pending.push(p);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: report but keep the listener.
                    tracing::warn!(target: "braid::net", "accept failed: {e}");
                    break;
                }
            }
        }
    }

    /// Puts a socket whose hello arrived into its connection: socket 0 opens it (after the
    /// hello check), the others join the connection whose secret they present. Returns the
    /// socket when its connection's first socket is still pending (try again later).
    fn place(&mut self, p: PendingSock, h: SockHello, now: Instant) -> Option<PendingSock> {
        if h.index == 0 {
            if let Some(check) = &self.check {
                if let Err(why) = check(&p.challenge, &h.hello, None) {
                    tracing::warn!(target: "braid::net", "dropping connection from {}: {why}", p.peer);
                    return None;
                }
            }
            let mut socks: Vec<Option<TcpStream>> = (0..h.nsock).map(|_| None).collect();
            socks[0] = Some(p.stream);
            self.groups.insert(
                p.secret,
                Group {
                    socks,
                    hello: h.hello,
                    challenge: p.challenge,
                    stripe_min: h.stripe_min,
                    since: now,
                    peer: p.peer,
                },
            );
            return None;
        }
        match self.groups.get_mut(&h.secret) {
            Some(g)
                if g.peer.ip() == p.peer.ip()
                    && g.socks.len() == h.nsock
                    && g.stripe_min == h.stripe_min
                    && g.socks[h.index].is_none() =>
            {
                g.socks[h.index] = Some(p.stream);
                None
            }
            Some(g) => {
                tracing::warn!(target: "braid::net", "dropping connection from {}: socket hello inconsistent with the connection from {} it names", p.peer, g.peer);
                None
            }
            None if self.pending.iter().any(|q| q.secret == h.secret) => Some(p),
            None => {
                tracing::warn!(target: "braid::net", "dropping connection from {}: a stripe socket for no connection this listener opened", p.peer);
                None
            }
        }
    }
}

impl Listener for TcpListen {
    fn accept_challenged(&mut self) -> NetResult<Option<Arrival>> {
        let now = Instant::now();
        let mut done: Vec<(PendingSock, SockHello)> = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            let res = Self::read_pending(&mut self.pending[i]);
            match res {
                Ok(HelloState::Incomplete) => {
                    if now.duration_since(self.pending[i].since) > self.hello_timeout {
                        let p = self.take_pending(i);
                        tracing::warn!(target: "braid::net", "dropping connection from {}: no hello within {:?}", p.peer, self.hello_timeout);
                    } else {
                        i += 1;
                    }
                }
                Ok(HelloState::Bad(why)) | Err(why) => {
                    let p = self.take_pending(i);
                    tracing::warn!(target: "braid::net", "dropping connection from {}: {why}", p.peer);
                }
                Ok(HelloState::Done(h)) => {
                    let p = self.take_pending(i);
                    done.push((p, h));
                }
            }
        }
        // New sockets after the pending ones were read: sockets that went away no longer
        // count against the cap. Their hellos are read on the next call (epoll wakes it).
        self.accept_new();
        // First sockets first: they open the connections that the other sockets join.
        done.sort_by_key(|(_, h)| h.index != 0);
        let mut later = Vec::new();
        for (p, h) in done {
            if let Some(p) = self.place(p, h, now) {
                later.push(p);
            }
        }
        // Its hello stays in its buffer: it is placed again on the next call.
        for p in later {
            epoll_ctl(&self.ep, libc::EPOLL_CTL_ADD, p.stream.as_raw_fd());
            self.pending.push(p);
        }
        // Complete groups become connections; stale partial groups are dropped.
        let ready: Option<Secret> = self
            .groups
            .iter()
            .find(|(_, g)| g.socks.iter().all(|s| s.is_some()))
            .map(|(k, _)| *k);
        let timeout = self.hello_timeout;
        self.groups.retain(|_, g| {
            let stale = now.duration_since(g.since) > timeout && g.socks.iter().any(|s| s.is_none());
            if stale {
                tracing::warn!(target: "braid::net", "dropping partial connection from {}: sockets missing after {timeout:?}", g.peer);
            }
            !stale
        });
        if let Some(k) = ready {
            if let Some(g) = self.groups.remove(&k) {
                let socks: Vec<TcpStream> = g.socks.into_iter().flatten().collect();
                let conn = TcpConn::new(socks, g.stripe_min, g.peer.to_string());
                return Ok(Some(Arrival {
                    conn: Box::new(conn),
                    hello: g.hello,
                    challenge: g.challenge,
                    peer_pid: None,
                }));
            }
        }
        Ok(None)
    }

    fn set_hello_check(&mut self, check: HelloCheck) {
        self.check = Some(check);
    }

    fn fd(&self) -> Option<RawFd> {
        Some(match &self.ep {
            Some(ep) => ep.as_raw_fd(),
            None => self.listener.as_raw_fd(),
        })
    }
}

struct Tx {
    hdr: [u8; HDR],
    ptr: *const u8,
    len: usize,
    /// Bytes written, header included.
    done: usize,
    req: u64,
}

struct Rx {
    tag: u64,
    total: u64,
    part: u16,
    nparts: u16,
    ptr: *mut u8,
    len: usize,
    got_hdr: bool,
    done: usize,
    req: u64,
}

struct Sock {
    stream: TcpStream,
    tx: VecDeque<Tx>,
    rx: VecDeque<Rx>,
    rbuf: Box<[u8]>,
    rs: usize,
    re: usize,
    eof: bool,
    /// Event-driven mode: the last read came up short, so the socket is (most likely) empty;
    /// no read until the caller asks for [`Conn::poll_fds`] again.
    drained: std::cell::Cell<bool>,
}

/// A TCP connection (one or more sockets).
pub struct TcpConn {
    socks: Vec<Sock>,
    stripe_min: usize,
    peer: String,
    sends: ReqTable,
    recvs: ReqTable,
    error: Option<NetError>,
    bye_received: bool,
    closed_local: bool,
    bytes_tx: u64,
    bytes_rx: u64,
    iov: Vec<libc::iovec>,
    /// See [`Conn::set_event_driven`].
    event_driven: bool,
}

// SAFETY: the raw pointers inside Tx/Rx point into buffers that the caller of isend/irecv
// promised to keep valid until completion; that promise does not depend on which thread drives
// the connection, so moving the connection to another thread is sound.
unsafe impl Send for TcpConn {}

fn encode_hdr(kind: u8, part: u16, nparts: u16, tag: u64, total: u64, meta: &Meta) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[0..4].copy_from_slice(&FRAME_MAGIC);
    h[4] = kind;
    h[6..8].copy_from_slice(&part.to_le_bytes());
    h[8..10].copy_from_slice(&nparts.to_le_bytes());
    h[16..24].copy_from_slice(&tag.to_le_bytes());
    h[24..32].copy_from_slice(&total.to_le_bytes());
    h[32..32 + META_LEN].copy_from_slice(meta);
    h
}

struct Hdr {
    kind: u8,
    part: u16,
    nparts: u16,
    tag: u64,
    total: u64,
    meta: Meta,
}

fn decode_hdr(b: &[u8]) -> NetResult<Hdr> {
    if b[0..4] != FRAME_MAGIC {
        return Err(NetError::Protocol(
            "corrupt frame: bad magic in a frame header".into(),
        ));
    }
    let mut meta = [0u8; META_LEN];
    meta.copy_from_slice(&b[32..32 + META_LEN]);
    let u64at = |o: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(x)
    };
    let kind = b[4];
    if !(KIND_DATA..=KIND_BYE).contains(&kind) {
        return Err(NetError::Protocol(format!(
            "corrupt frame: unknown kind {kind}"
        )));
    }
    Ok(Hdr {
        kind,
        part: u16::from_le_bytes([b[6], b[7]]),
        nparts: u16::from_le_bytes([b[8], b[9]]),
        tag: u64at(16),
        total: u64at(24),
        meta,
    })
}

/// How many parts a message of `len` bytes is split into.
fn nparts(len: usize, nsock: usize, stripe_min: usize) -> usize {
    if nsock <= 1 || len < 2 * stripe_min {
        1
    } else {
        (len / stripe_min).min(nsock)
    }
}

/// Offset and length of part `i` of `n`.
fn part_range(len: usize, n: usize, i: usize) -> (usize, usize) {
    let a = (len as u128 * i as u128 / n as u128) as usize;
    let b = (len as u128 * (i as u128 + 1) / n as u128) as usize;
    (a, b - a)
}

enum Io {
    Done(usize),
    Again,
    Eof,
}

fn sys_read(fd: RawFd, ptr: *mut u8, len: usize) -> NetResult<Io> {
    loop {
        // SAFETY: callers pass a pointer to `len` writable bytes (the read buffer, or a posted
        // receive buffer that the irecv contract keeps valid and unaliased until completion).
        let n = unsafe { libc::read(fd, ptr as *mut libc::c_void, len) };
        if n > 0 {
            return Ok(Io::Done(n as usize));
        }
        if n == 0 {
            return Ok(Io::Eof);
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            ErrorKind::WouldBlock => return Ok(Io::Again),
            ErrorKind::Interrupted => continue,
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                return Err(NetError::Lost(format!("read: {e}")))
            }
            _ => return Err(NetError::io("read", e)),
        }
    }
}

impl TcpConn {
    pub(crate) fn new(streams: Vec<TcpStream>, stripe_min: usize, peer: String) -> TcpConn {
        TcpConn {
            socks: streams
                .into_iter()
                .map(|s| Sock {
                    stream: s,
                    tx: VecDeque::new(),
                    rx: VecDeque::new(),
                    rbuf: vec![0u8; RXBUF].into_boxed_slice(),
                    rs: 0,
                    re: 0,
                    eof: false,
                    drained: std::cell::Cell::new(false),
                })
                .collect(),
            stripe_min,
            peer,
            sends: ReqTable::default(),
            recvs: ReqTable::default(),
            error: None,
            bye_received: false,
            closed_local: false,
            bytes_tx: 0,
            bytes_rx: 0,
            iov: Vec::with_capacity(MAX_IOV),
            event_driven: false,
        }
    }

    fn fail(&mut self, e: NetError) -> NetError {
        if self.error.is_none() {
            // A peer that aborts sends its reason and goes away; our write may fail before we
            // read it. Look for that reason in what is left to read.
            let e = match e {
                NetError::Lost(d) => match self.scan_for_abort() {
                    Some(reason) => NetError::PeerAborted(reason),
                    None => NetError::Lost(d),
                },
                other => other,
            };
            self.error = Some(e);
        }
        self.error
            .clone()
            .unwrap_or(NetError::Lost("connection failed".into()))
    }

    /// Reads what is left on socket 0 (for at most 100 ms), skipping data frames, and returns
    /// the reason of an abort frame if the peer sent one. Only used once the connection is
    /// broken: it consumes the stream.
    fn scan_for_abort(&mut self) -> Option<String> {
        let end = Instant::now() + Duration::from_millis(100);
        let mut skip = match self.socks.first()?.rx.front() {
            Some(rx) if rx.got_hdr => rx.len - rx.done,
            _ => 0,
        };
        let nsock = self.socks.len();
        loop {
            let sock = &mut self.socks[0];
            let buffered = sock.re - sock.rs;
            if skip > 0 && buffered > 0 {
                let k = skip.min(buffered);
                sock.rs += k;
                skip -= k;
                continue;
            }
            if skip == 0 && buffered >= HDR {
                let h = decode_hdr(&sock.rbuf[sock.rs..sock.rs + HDR]).ok()?;
                match h.kind {
                    KIND_ABORT => {
                        let len = (h.total as usize).min(MAX_REASON);
                        if buffered >= HDR + len {
                            let r = &sock.rbuf[sock.rs + HDR..sock.rs + HDR + len];
                            return Some(String::from_utf8_lossy(r).into_owned());
                        }
                    }
                    KIND_BYE => return None,
                    _ => {
                        let n = (h.nparts as usize).clamp(1, nsock);
                        skip = part_range(h.total as usize, n, 0).1;
                        sock.rs += HDR;
                        continue;
                    }
                }
            }
            if Instant::now() > end {
                return None;
            }
            match self.fill(0) {
                Ok(0) => {
                    if self.socks[0].eof {
                        return None;
                    }
                    std::thread::sleep(Duration::from_micros(500));
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    fn check(&self) -> NetResult<()> {
        match &self.error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn complete(&mut self, send: bool, req: u64, len: usize) {
        if req == NO_REQ {
            return;
        }
        if send {
            self.bytes_tx += len as u64;
            self.sends.part_done(req);
        } else {
            self.bytes_rx += len as u64;
            self.recvs.part_done(req);
        }
    }

    /// Writes as much queued data of socket `i` as the kernel takes.
    fn progress_tx(&mut self, i: usize) -> NetResult<bool> {
        let mut moved = false;
        loop {
            let sock = &mut self.socks[i];
            if sock.tx.is_empty() {
                return Ok(moved);
            }
            self.iov.clear();
            for t in sock.tx.iter() {
                if self.iov.len() + 2 > MAX_IOV {
                    break;
                }
                if t.done < HDR {
                    self.iov.push(libc::iovec {
                        iov_base: t.hdr[t.done..].as_ptr() as *mut libc::c_void,
                        iov_len: HDR - t.done,
                    });
                    if t.len > 0 {
                        self.iov.push(libc::iovec {
                            iov_base: t.ptr as *mut libc::c_void,
                            iov_len: t.len,
                        });
                    }
                } else {
                    // SAFETY: done - HDR < len, so the pointer stays inside the posted buffer.
                    let p = unsafe { t.ptr.add(t.done - HDR) };
                    self.iov.push(libc::iovec {
                        iov_base: p as *mut libc::c_void,
                        iov_len: t.len - (t.done - HDR),
                    });
                }
                // Coalesce only small frames behind the first.
                if t.len >= DIRECT_READ {
                    break;
                }
            }
            // sendmsg with MSG_NOSIGNAL rather than writev: a peer that went away must give
            // EPIPE, not SIGPIPE (which kills C programs that did not ignore it).
            // SAFETY: zeroed msghdr is a valid "no address, no control data" header.
            let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
            mh.msg_iov = self.iov.as_mut_ptr();
            mh.msg_iovlen = self.iov.len() as _;
            // SAFETY: every iovec points into a header owned by a queued Tx (alive until popped
            // below, after the call) or into a posted send buffer kept valid by the isend
            // contract; the count matches the vector; `mh` lives across the call.
            let n = unsafe { libc::sendmsg(sock.stream.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return match e.kind() {
                    ErrorKind::WouldBlock => Ok(moved),
                    ErrorKind::Interrupted => continue,
                    ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe => Err(NetError::Lost(format!("write: {e}"))),
                    _ => Err(NetError::io("write", e)),
                };
            }
            moved = true;
            let mut n = n as usize;
            while n > 0 {
                let Some(t) = self.socks[i].tx.front_mut() else {
                    break;
                };
                let rem = HDR + t.len - t.done;
                if n >= rem {
                    n -= rem;
                    let (req, len) = (t.req, t.len);
                    self.socks[i].tx.pop_front();
                    self.complete(true, req, len);
                } else {
                    t.done += n;
                    n = 0;
                }
            }
            // Zero-length frames written exactly at the boundary are complete too.
        }
    }

    /// Reads into socket `i`'s buffer; returns bytes read, or marks EOF.
    fn fill(&mut self, i: usize) -> NetResult<usize> {
        let sock = &mut self.socks[i];
        if sock.eof {
            return Ok(0);
        }
        if sock.rs == sock.re {
            sock.rs = 0;
            sock.re = 0;
        } else if sock.re == RXBUF && sock.rs > 0 {
            sock.rbuf.copy_within(sock.rs..sock.re, 0);
            sock.re -= sock.rs;
            sock.rs = 0;
        }
        if sock.re == RXBUF || (self.event_driven && sock.drained.get()) {
            return Ok(0);
        }
        let free = RXBUF - sock.re;
        // SAFETY: re < RXBUF, so the pointer and `free` bytes lie inside rbuf.
        let p = unsafe { sock.rbuf.as_mut_ptr().add(sock.re) };
        match sys_read(sock.stream.as_raw_fd(), p, free)? {
            Io::Done(k) => {
                sock.re += k;
                // A short read emptied the socket (what arrives later makes it readable).
                sock.drained.set(self.event_driven && k < free);
                Ok(k)
            }
            Io::Again => {
                sock.drained.set(self.event_driven);
                Ok(0)
            }
            Io::Eof => {
                sock.eof = true;
                Ok(0)
            }
        }
    }

    fn lost_or_closed(&self, what: &str) -> NetError {
        if self.bye_received {
            NetError::Closed(format!("{} closed the connection while {what}", self.peer))
        } else {
            NetError::Lost(format!(
                "{} closed the connection without a goodbye while {what} (process died or network cut?)",
                self.peer
            ))
        }
    }

    /// Parses control frames at the head of socket 0 when no receive is posted there.
    fn idle_control(&mut self) -> NetResult<()> {
        let sock = &self.socks[0];
        if sock.re - sock.rs < HDR {
            return Ok(());
        }
        let h = decode_hdr(&sock.rbuf[sock.rs..sock.rs + HDR])?;
        match h.kind {
            KIND_BYE => {
                self.bye_received = true;
                self.socks[0].rs += HDR;
                Ok(())
            }
            KIND_ABORT => {
                let len = (h.total as usize).min(MAX_REASON);
                let sock = &self.socks[0];
                if sock.re - sock.rs < HDR + len {
                    return Ok(());
                }
                let reason =
                    String::from_utf8_lossy(&sock.rbuf[sock.rs + HDR..sock.rs + HDR + len])
                        .into_owned();
                Err(NetError::PeerAborted(reason))
            }
            _ => Ok(()),
        }
    }

    fn progress_rx(&mut self, i: usize) -> NetResult<bool> {
        let mut moved = false;
        loop {
            if self.socks[i].rx.is_empty() {
                // Nothing posted: read ahead (bounded) to notice control frames and EOF.
                let k = self.fill(i)?;
                moved |= k > 0;
                if i == 0 {
                    self.idle_control()?;
                }
                let sock = &self.socks[i];
                if sock.eof && i == 0 && !self.bye_received && sock.re - sock.rs < HDR {
                    return Err(self.lost_or_closed("idle"));
                }
                return Ok(moved);
            }
            let buffered = self.socks[i].re - self.socks[i].rs;
            let got_hdr = self.socks[i].rx.front().map(|r| r.got_hdr).unwrap_or(true);
            if !got_hdr {
                if buffered < HDR {
                    let k = self.fill(i)?;
                    if k == 0 {
                        if self.socks[i].eof {
                            return Err(self.lost_or_closed("a receive was pending"));
                        }
                        return Ok(moved);
                    }
                    moved = true;
                    continue;
                }
                let sock = &self.socks[i];
                let h = decode_hdr(&sock.rbuf[sock.rs..sock.rs + HDR])?;
                if h.kind == KIND_BYE {
                    self.bye_received = true;
                    return Err(NetError::Closed(format!(
                        "{} closed its communicator while a receive was pending",
                        self.peer
                    )));
                }
                if h.kind == KIND_ABORT {
                    self.idle_control()?;
                    // Reason not complete yet.
                    let k = self.fill(i)?;
                    if k == 0 && self.socks[i].eof {
                        return Err(NetError::PeerAborted("(reason truncated)".into()));
                    }
                    if k == 0 {
                        return Ok(moved);
                    }
                    continue;
                }
                let Some(rx) = self.socks[i].rx.front() else {
                    continue;
                };
                if h.tag != rx.tag || h.total != rx.total {
                    return Err(NetError::Mismatch {
                        expected_tag: rx.tag,
                        expected_len: rx.total,
                        got_tag: h.tag,
                        got_len: h.total,
                        meta: h.meta,
                    });
                }
                if h.part != rx.part || h.nparts != rx.nparts {
                    return Err(NetError::Protocol(format!(
                        "stripe mismatch: expected part {}/{}, got {}/{}",
                        rx.part, rx.nparts, h.part, h.nparts
                    )));
                }
                let req = rx.req;
                if h.part == 0 && req != NO_REQ {
                    self.recvs.set_meta(req, h.meta);
                }
                let sock = &mut self.socks[i];
                sock.rs += HDR;
                if let Some(rx) = sock.rx.front_mut() {
                    rx.got_hdr = true;
                }
                moved = true;
            }
            // Payload.
            let sock = &mut self.socks[i];
            let Some(rx) = sock.rx.front_mut() else {
                continue;
            };
            let need = rx.len - rx.done;
            if need > 0 {
                let buffered = sock.re - sock.rs;
                if buffered > 0 {
                    let k = buffered.min(need);
                    // SAFETY: rx.ptr + done .. + k lies inside the posted receive buffer
                    // (done + k <= len) and the source lies inside rbuf[rs..re].
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            sock.rbuf.as_ptr().add(sock.rs),
                            rx.ptr.add(rx.done),
                            k,
                        );
                    }
                    sock.rs += k;
                    rx.done += k;
                    moved = true;
                } else if need >= DIRECT_READ {
                    if self.event_driven && sock.drained.get() {
                        return Ok(moved);
                    }
                    // SAFETY: the pointer is inside the posted receive buffer, `need` bytes
                    // remain in it.
                    let p = unsafe { rx.ptr.add(rx.done) };
                    match sys_read(sock.stream.as_raw_fd(), p, need)? {
                        Io::Done(k) => {
                            rx.done += k;
                            sock.drained.set(self.event_driven && k < need);
                            moved = true;
                        }
                        Io::Again => {
                            sock.drained.set(self.event_driven);
                            return Ok(moved);
                        }
                        Io::Eof => {
                            sock.eof = true;
                            return Err(self.lost_or_closed("a receive was pending"));
                        }
                    }
                } else {
                    let k = self.fill(i)?;
                    if k == 0 {
                        if self.socks[i].eof {
                            return Err(self.lost_or_closed("a receive was pending"));
                        }
                        return Ok(moved);
                    }
                    moved = true;
                    continue;
                }
            }
            let sock = &mut self.socks[i];
            if let Some(rx) = sock.rx.front() {
                if rx.done == rx.len {
                    let (req, len) = (rx.req, rx.len);
                    sock.rx.pop_front();
                    self.complete(false, req, len);
                    moved = true;
                }
            }
        }
    }

    fn progress_all(&mut self) -> NetResult<bool> {
        let mut moved = false;
        for i in 0..self.socks.len() {
            moved |= self.progress_tx(i)?;
            moved |= self.progress_rx(i)?;
        }
        Ok(moved)
    }

    /// Writes a control frame on socket 0 if it can go out whole without splitting a frame
    /// in progress (best effort, bounded wait).
    fn send_control(&mut self, kind: u8, payload: &[u8], wait: Duration) {
        let Some(s0) = self.socks.first() else {
            return;
        };
        if s0.tx.front().map(|t| t.done > 0).unwrap_or(false) && kind == KIND_ABORT {
            return; // a frame is half-written; the peer will see the connection close instead.
        }
        let hdr = encode_hdr(kind, 0, 1, 0, payload.len() as u64, &[0u8; META_LEN]);
        let mut frame = hdr.to_vec();
        frame.extend_from_slice(payload);
        if kind == KIND_BYE {
            // Queue behind pending data so it arrives after it.
            let hdr = encode_hdr(kind, 0, 1, 0, 0, &[0u8; META_LEN]);
            self.socks[0].tx.push_back(Tx {
                hdr,
                ptr: std::ptr::null(),
                len: 0,
                done: 0,
                req: NO_REQ,
            });
            let end = Instant::now() + wait;
            while !self.socks[0].tx.is_empty() && Instant::now() < end {
                if self.progress_tx(0).is_err() {
                    return;
                }
                if !self.socks[0].tx.is_empty() {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            return;
        }
        // Abort: write the frame directly, ignoring queued data.
        let end = Instant::now() + wait;
        let mut off = 0;
        while off < frame.len() && Instant::now() < end {
            let rest = &frame[off..];
            // SAFETY: FFI; `rest` is a live slice; MSG_NOSIGNAL: EPIPE instead of SIGPIPE.
            let r = unsafe {
                libc::send(
                    self.socks[0].stream.as_raw_fd(),
                    rest.as_ptr().cast::<libc::c_void>(),
                    rest.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            let r = if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(r as usize)
            };
            match r {
                Ok(k) => off += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if off == 0 {
                        return; // nothing written: do not block an abort on a full socket
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

impl Conn for TcpConn {
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
        let n = nparts(len, self.socks.len(), self.stripe_min);
        let req = self.sends.post(n as u32);
        for p in 0..n {
            let (off, plen) = part_range(len, n, p);
            self.socks[p].tx.push_back(Tx {
                hdr: encode_hdr(KIND_DATA, p as u16, n as u16, tag, len as u64, meta),
                // SAFETY: off + plen <= len; the caller guarantees buf..buf+len is valid.
                ptr: unsafe { buf.add(off) },
                len: plen,
                done: 0,
                req,
            });
        }
        // Eager: try to write now (the common small-message case completes here), unless the
        // caller drives the connection by events: then the next `progress` writes whatever was
        // posted until then in one go.
        for p in 0..if self.event_driven { 0 } else { n } {
            if let Err(e) = self.progress_tx(p) {
                return Err(self.fail(e));
            }
        }
        Ok(Some(Request {
            send: true,
            seq: req,
        }))
    }

    unsafe fn irecv(&mut self, tag: u64, buf: *mut u8, len: usize) -> NetResult<Option<Request>> {
        self.check()?;
        if self.sends.pending() + self.recvs.pending() >= MAX_POSTED {
            return Ok(None);
        }
        let n = nparts(len, self.socks.len(), self.stripe_min);
        let req = self.recvs.post(n as u32);
        for p in 0..n {
            let (off, plen) = part_range(len, n, p);
            self.socks[p].rx.push_back(Rx {
                tag,
                total: len as u64,
                part: p as u16,
                nparts: n as u16,
                // SAFETY: off + plen <= len; the caller guarantees buf..buf+len is valid.
                ptr: unsafe { buf.add(off) },
                len: plen,
                got_hdr: false,
                done: 0,
                req,
            });
        }
        // Posted: an error from here on is sticky and reported by `test`, which still reports
        // this receive complete if it completed first (the last message of a peer that then
        // died is read before its death is noticed).
        if let Err(e) = self.progress_rx(0) {
            self.fail(e);
        }
        Ok(Some(Request {
            send: false,
            seq: req,
        }))
    }

    fn progress(&mut self) -> NetResult<bool> {
        self.check()?;
        match self.progress_all() {
            Ok(m) => Ok(m),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn can_peek(&self) -> bool {
        true
    }

    fn peek(&mut self) -> NetResult<Option<Peeked>> {
        self.check()?;
        if self.socks.iter().any(|s| !s.rx.is_empty()) {
            return Ok(None);
        }
        // Nothing posted: progress reads ahead (bounded by the read buffer) and handles the
        // control frames at the head of socket 0.
        if let Err(e) = self.progress_all() {
            return Err(self.fail(e));
        }
        let sock = &self.socks[0];
        if sock.re - sock.rs < HDR {
            return Ok(None);
        }
        let h = match decode_hdr(&sock.rbuf[sock.rs..sock.rs + HDR]) {
            Ok(h) => h,
            Err(e) => return Err(self.fail(e)),
        };
        if h.kind != KIND_DATA || h.part != 0 {
            return Ok(None);
        }
        Ok(Some(Peeked {
            tag: h.tag,
            len: h.total,
            meta: h.meta,
        }))
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
        for s in &self.socks {
            // The caller waits for readiness next: read again after it.
            s.drained.set(false);
            if s.eof {
                continue;
            }
            out.push(PollFd {
                fd: s.stream.as_raw_fd(),
                read: !s.rx.is_empty() || s.re - s.rs < RXBUF,
                write: !s.tx.is_empty(),
            });
        }
    }

    fn writes_apart(&self) -> bool {
        true
    }

    fn flush(&mut self) -> NetResult<bool> {
        self.check()?;
        let mut moved = false;
        for i in 0..self.socks.len() {
            match self.progress_tx(i) {
                Ok(m) => moved |= m,
                Err(e) => return Err(self.fail(e)),
            }
        }
        Ok(moved)
    }

    fn set_event_driven(&mut self, on: bool) {
        self.event_driven = on;
        for s in &self.socks {
            s.drained.set(false);
        }
    }

    fn abort(&mut self, reason: &str) {
        if self.closed_local {
            return;
        }
        self.closed_local = true;
        let r = &reason.as_bytes()[..reason.len().min(MAX_REASON)];
        self.send_control(KIND_ABORT, r, Duration::from_millis(100));
        for s in &self.socks {
            let _ = s.stream.shutdown(Shutdown::Both);
        }
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
            self.send_control(KIND_BYE, &[], Duration::from_millis(500));
        }
        for s in &self.socks {
            let _ = s.stream.shutdown(Shutdown::Write);
        }
    }

    fn peer_desc(&self) -> String {
        self.peer.clone()
    }

    fn bytes(&self) -> (u64, u64) {
        (self.bytes_tx, self.bytes_rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance as conf;

    fn pair(opts: TcpOptions) -> (Box<dyn Conn>, Box<dyn Conn>) {
        let t = TcpTransport::new(opts).unwrap();
        let (mut l, h) = t.listen(0).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let t2 = t.clone();
        let h2 = h.clone();
        let th = std::thread::spawn(move || {
            t2.connect_challenged(&h2, &|_| b"hello-123".to_vec(), deadline)
                .unwrap()
        });
        let a = loop {
            if let Some(x) = l.accept_challenged().unwrap() {
                break x;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(a.hello, b"hello-123");
        (a.conn, th.join().unwrap())
    }

    fn default_pair() -> (Box<dyn Conn>, Box<dyn Conn>) {
        pair(TcpOptions::default())
    }

    #[test]
    fn conformance() {
        conf::exchange(&default_pair, conf::SIZES);
        conf::both_directions_at_once(&default_pair);
        conf::mismatch_is_reported_with_meta(&default_pair);
        conf::peek_shows_the_next_header(&default_pair);
        conf::death_goodbye_and_abort(&default_pair);
        conf::delivered_before_death_is_received(&default_pair);
    }

    /// Event-driven mode (the push/pull channel's): a send is written at the next `progress`
    /// or `flush` (several in one go), not by `isend`; a socket that came up empty is read
    /// again only after `poll_fds`; `flush` writes without reading.
    #[test]
    fn event_driven_writes_at_progress_and_reads_after_poll() {
        let (mut a, mut b) = default_pair();
        a.set_event_driven(true);
        assert!(a.writes_apart());
        let meta = [0u8; META_LEN];
        let one = [7u8; 100];
        let two = [8u8; 200];
        let mut got = [0u8; 300];
        // SAFETY: the buffers outlive the requests (the test waits for them below).
        let (s1, s2) = unsafe {
            (
                a.isend(1, &meta, one.as_ptr(), one.len()).unwrap().unwrap(),
                a.isend(2, &meta, two.as_ptr(), two.len()).unwrap().unwrap(),
            )
        };
        assert_eq!(a.bytes().0, 0, "isend wrote in event-driven mode");
        // b receives the first message; a's flush writes both and reads nothing.
        // SAFETY: as above.
        let r1 = unsafe { b.irecv(1, got.as_mut_ptr(), 100) }
            .unwrap()
            .unwrap();
        assert!(a.flush().unwrap());
        assert!(a.bytes().0 >= 300);
        assert!(a.test(s1).unwrap().is_some() && a.test(s2).unwrap().is_some());
        let end = Instant::now() + Duration::from_secs(5);
        while b.test(r1).unwrap().is_none() {
            assert!(Instant::now() < end);
            b.progress().unwrap();
        }
        // a waits for a message: its read comes up empty, then b sends.
        // SAFETY: as above.
        let r = unsafe { a.irecv(3, got.as_mut_ptr(), 50) }
            .unwrap()
            .unwrap();
        a.progress().unwrap();
        // SAFETY: as above.
        let s3 = unsafe { b.isend(3, &meta, one.as_ptr(), 50) }
            .unwrap()
            .unwrap();
        while b.test(s3).unwrap().is_none() {
            assert!(Instant::now() < end);
            b.progress().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        // The data is there, but a does not look before it asked for its poll set.
        a.progress().unwrap();
        assert!(a.test(r).unwrap().is_none(), "read before poll_fds");
        let mut fds = Vec::new();
        a.poll_fds(&mut fds);
        let mut scratch = Vec::new();
        assert!(crate::wait_fds(&fds, Duration::from_secs(5), &mut scratch).unwrap());
        while a.test(r).unwrap().is_none() {
            assert!(Instant::now() < end);
            a.progress().unwrap();
        }
        assert_eq!(&got[..50], &one[..50]);
        // The plain mode is unchanged: isend writes at once.
        // SAFETY: as above.
        let s4 = unsafe { b.isend(4, &meta, two.as_ptr(), 200) }
            .unwrap()
            .unwrap();
        assert!(b.test(s4).unwrap().is_some());
    }

    /// A socket that speaks the handshake by hand.
    struct RawTcp {
        s: TcpStream,
        challenge: Option<Challenge>,
        secret: Secret,
    }

    impl RawTcp {
        fn open(h: &ConnectHandle) -> RawTcp {
            let addr: SocketAddr = std::str::from_utf8(&h.addr).unwrap().parse().unwrap();
            let s = TcpStream::connect(addr).unwrap();
            let mut f = [0u8; CHAL_FRAME];
            let end = Instant::now() + Duration::from_secs(10);
            let got = read_by(&s, &mut f, end, "challenge").unwrap();
            let (challenge, secret) = match got {
                true => {
                    let (c, k) = decode_challenge(&f).unwrap();
                    (Some(c), k)
                }
                false => (None, [0; SECRET_LEN]),
            };
            RawTcp {
                s,
                challenge,
                secret,
            }
        }

        fn send(&mut self, b: &[u8]) {
            let _ = self.s.write_all(b);
        }
    }

    impl conf::RawPeer for RawTcp {
        fn challenge(&self) -> Option<Challenge> {
            self.challenge
        }

        fn dropped(&mut self, within: Duration) -> bool {
            self.s.set_read_timeout(Some(within)).unwrap();
            let mut b = [0u8; 1];
            match self.s.read(&mut b) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            }
        }
    }

    fn raw(h: &ConnectHandle, declared: Option<usize>) -> Box<dyn conf::RawPeer> {
        let mut r = RawTcp::open(h);
        if let (Some(_), Some(n)) = (r.challenge, declared) {
            let mut hdr = encode_sock_hello(0, 1, 4096, &[0; SECRET_LEN], &[]);
            hdr[32..36].copy_from_slice(&(n.min(u32::MAX as usize) as u32).to_le_bytes());
            r.send(&hdr);
        }
        Box::new(r)
    }

    #[test]
    fn challenge_response() {
        let t = TcpTransport::new(TcpOptions::default()).unwrap();
        let t2 = t.clone();
        let listen = move |timeout: Duration, cap: usize| {
            let (mut l, h) = t2.listen_tcp().unwrap();
            l.hello_timeout = timeout;
            l.max_pending = cap;
            (Box::new(l) as Box<dyn Listener>, h)
        };
        conf::challenges(&conf::Kit {
            transport: &t,
            listen: &listen,
            raw: &raw,
        });
    }

    #[test]
    fn striped_messages() {
        let striped = || {
            pair(TcpOptions {
                streams: 3,
                stripe_min: 4096,
                ..Default::default()
            })
        };
        conf::exchange(
            &striped,
            &[0, 1, 8191, 8192, 12289, 1 << 20, 5, (4 << 20) + 3],
        );
        conf::both_directions_at_once(&striped);
    }

    /// Sockets 1.. of a striped connection must present the secret that socket 0 received: a
    /// stranger's stripe (a guessed secret, or the secret of its own socket that opened no
    /// connection) is dropped, and the real striped connection is made.
    #[test]
    fn strangers_cannot_add_a_stripe() {
        let t = TcpTransport::new(TcpOptions {
            streams: 2,
            stripe_min: 4096,
            ..Default::default()
        })
        .unwrap();
        let (mut l, h) = t.listen(0).unwrap();
        // The listener is polled by a thread of its own while the strangers talk to it, until
        // a connection arrives.
        let poller = std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(30);
            while Instant::now() < end {
                if let Some(a) = l.accept_challenged().unwrap() {
                    return Some(a);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            None
        });
        let mut guess = RawTcp::open(&h);
        assert!(guess.challenge.is_some());
        guess.send(&encode_sock_hello(1, 2, 4096, &[0x11; SECRET_LEN], &[]));
        let mut own = RawTcp::open(&h);
        let own_secret = own.secret;
        own.send(&encode_sock_hello(1, 2, 4096, &own_secret, &[]));
        use conf::RawPeer;
        assert!(guess.dropped(Duration::from_secs(10)));
        assert!(own.dropped(Duration::from_secs(10)));
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut c = t
            .connect_challenged(&h, &|_| b"ok".to_vec(), deadline)
            .unwrap();
        let mut a = poller
            .join()
            .unwrap()
            .expect("the real connection did not arrive");
        assert_eq!(a.hello, b"ok");
        // A message large enough to use both sockets.
        let src: Vec<u8> = (0..65536).map(|i| i as u8).collect();
        let mut dst = vec![0u8; 65536];
        // SAFETY: buffers outlive the requests (waited below).
        let sreq = unsafe { c.isend(1, &[0; META_LEN], src.as_ptr(), src.len()) }
            .unwrap()
            .unwrap();
        // SAFETY: as above.
        let rreq = unsafe { a.conn.irecv(1, dst.as_mut_ptr(), dst.len()) }
            .unwrap()
            .unwrap();
        std::thread::scope(|s| {
            s.spawn(|| conf::wait(c.as_mut(), sreq).unwrap());
            conf::wait(a.conn.as_mut(), rreq).unwrap();
        });
        assert_eq!(dst, src);
    }

    #[test]
    fn strangers_are_dropped() {
        let t = TcpTransport::new(TcpOptions::default()).unwrap();
        let (mut l, h) = t.listen(0).unwrap();
        let addr: SocketAddr = std::str::from_utf8(&h.addr).unwrap().parse().unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n garbage garbage garbage")
            .unwrap();
        let mut s2 = TcpStream::connect(addr).unwrap();
        let mut bad = HELLO_MAGIC.to_vec();
        bad.extend_from_slice(&[0xff; 40]);
        s2.write_all(&bad).unwrap();
        // A real connection still gets through.
        let deadline = Instant::now() + Duration::from_secs(5);
        let th = std::thread::spawn(move || {
            t.connect_challenged(&h, &|_| b"ok".to_vec(), deadline)
                .unwrap()
        });
        let end = Instant::now() + Duration::from_secs(5);
        let got = loop {
            if let Some(a) = l.accept_challenged().unwrap() {
                break a.hello;
            }
            assert!(Instant::now() < end);
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(got, b"ok");
        th.join().unwrap();
        // The strangers were closed by the listener.
        let mut b = [0u8; CHAL_FRAME + 1];
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut n = 0;
        loop {
            match s.read(&mut b[n..]) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
            assert!(n <= CHAL_FRAME, "the listener sent more than its challenge");
        }
    }

    /// A listener that is gone refuses: connect_or_give_up stops when asked to, long before
    /// its deadline (a member installing a stale view must not wait for a dead peer).
    #[test]
    fn connecting_to_a_gone_listener_gives_up_when_asked() {
        let t = TcpTransport::new(TcpOptions::default()).unwrap();
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
    fn split_rule() {
        assert_eq!(nparts(100, 4, 4096), 1);
        assert_eq!(nparts(8192, 4, 4096), 2);
        assert_eq!(nparts(1 << 20, 4, 4096), 4);
        let mut total = 0;
        for i in 0..3 {
            let (o, l) = part_range(1000, 3, i);
            assert_eq!(o, total);
            total += l;
        }
        assert_eq!(total, 1000);
    }
}
