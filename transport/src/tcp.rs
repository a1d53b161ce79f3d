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
//! A new socket first sends a 28-byte socket hello (magic `BRDT`, version, index, socket count,
//! stripe size, connection id, length of the caller's hello), then the caller's hello bytes on
//! socket 0. The listener drops sockets whose hello is not this protocol, with a log line.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::reqs::ReqTable;
use crate::{
    Completion, Conn, ConnectHandle, DeviceProps, Listener, Meta, NetError, NetResult, PollFd,
    PtrSupport, Request, Transport, META_LEN,
};

const FRAME_MAGIC: [u8; 4] = *b"BRDF";
const HELLO_MAGIC: [u8; 4] = *b"BRDT";
/// Version of the TCP wire protocol.
pub const PROTO_VERSION: u16 = 1;
const HDR: usize = 64;
const SOCK_HELLO: usize = 28;
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

fn random_u64() -> u64 {
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
    t ^ ((std::process::id() as u64) << 32) ^ (&b as *const _ as u64)
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
        let l = TcpListener::bind(SocketAddr::new(self.opts.bind, 0))
            .map_err(|e| NetError::io(format!("bind {}", self.opts.bind), e))?;
        l.set_nonblocking(true)
            .map_err(|e| NetError::io("set_nonblocking", e))?;
        let addr = l.local_addr().map_err(|e| NetError::io("local_addr", e))?;
        let handle = ConnectHandle {
            transport: "tcp".into(),
            addr: addr.to_string().into_bytes(),
        };
        Ok((
            Box::new(TcpListen {
                listener: l,
                transport: self.clone(),
                pending: Vec::new(),
                groups: HashMap::new(),
            }),
            handle,
        ))
    }

    fn connect(
        &self,
        handle: &ConnectHandle,
        hello: &[u8],
        deadline: Instant,
    ) -> NetResult<Box<dyn Conn>> {
        if handle.transport != "tcp" {
            return Err(NetError::Protocol(format!(
                "tcp cannot connect to a {} handle",
                handle.transport
            )));
        }
        if hello.len() > MAX_HELLO {
            return Err(NetError::Protocol("hello larger than 4 KiB".into()));
        }
        let addr: SocketAddr = std::str::from_utf8(&handle.addr)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| NetError::Protocol("tcp handle does not hold an address".into()))?;
        let n = self.opts.streams;
        let conn_id = random_u64();
        let mut socks = Vec::with_capacity(n);
        for i in 0..n {
            let s = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(NetError::Timeout(format!("connecting to {addr}")));
                }
                match TcpStream::connect_timeout(&addr, left) {
                    Ok(s) => break s,
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) if e.kind() == ErrorKind::TimedOut => {
                        return Err(NetError::Timeout(format!("connecting to {addr}")))
                    }
                    Err(e) => return Err(NetError::io(format!("connect {addr}"), e)),
                }
            };
            self.setup_socket(&s)?;
            let mut h = Vec::with_capacity(SOCK_HELLO + hello.len());
            h.extend_from_slice(&HELLO_MAGIC);
            h.extend_from_slice(&PROTO_VERSION.to_le_bytes());
            h.extend_from_slice(&(i as u16).to_le_bytes());
            h.extend_from_slice(&(n as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            h.extend_from_slice(
                &(self.opts.stripe_min.min(u32::MAX as usize) as u32).to_le_bytes(),
            );
            h.extend_from_slice(&conn_id.to_le_bytes());
            let hl = if i == 0 { hello.len() } else { 0 };
            h.extend_from_slice(&(hl as u32).to_le_bytes());
            if i == 0 {
                h.extend_from_slice(hello);
            }
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
    buf: Vec<u8>,
    since: Instant,
}

struct Group {
    socks: Vec<Option<TcpStream>>,
    hello: Vec<u8>,
    stripe_min: usize,
    since: Instant,
    peer: SocketAddr,
}

/// Listening socket of the TCP transport.
pub struct TcpListen {
    listener: TcpListener,
    transport: TcpTransport,
    pending: Vec<PendingSock>,
    groups: HashMap<u64, Group>,
}

enum HelloState {
    Incomplete,
    Done {
        index: usize,
        nsock: usize,
        stripe_min: usize,
        conn_id: u64,
        hello: Vec<u8>,
    },
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
    let mut idb = [0u8; 8];
    idb.copy_from_slice(&b[16..24]);
    let conn_id = u64::from_le_bytes(idb);
    let hl = u32at(24) as usize;
    if nsock == 0 || nsock > MAX_STREAMS || index >= nsock || hl > MAX_HELLO || stripe_min == 0 {
        return HelloState::Bad(format!(
            "bad socket hello (index {index}, sockets {nsock}, hello {hl} bytes)"
        ));
    }
    if (index > 0 && hl > 0) || b.len() > SOCK_HELLO + hl {
        return HelloState::Bad("socket hello followed by unexpected bytes".into());
    }
    if b.len() < SOCK_HELLO + hl {
        return HelloState::Incomplete;
    }
    HelloState::Done {
        index,
        nsock,
        stripe_min,
        conn_id,
        hello: b[SOCK_HELLO..].to_vec(),
    }
}

impl TcpListen {
    fn read_pending(p: &mut PendingSock) -> Result<HelloState, String> {
        loop {
            let want = match parse_sock_hello(&p.buf) {
                HelloState::Incomplete => {
                    if p.buf.len() < SOCK_HELLO {
                        SOCK_HELLO - p.buf.len()
                    } else {
                        let hl = u32::from_le_bytes([p.buf[24], p.buf[25], p.buf[26], p.buf[27]])
                            as usize;
                        SOCK_HELLO + hl - p.buf.len()
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
}

impl Listener for TcpListen {
    fn accept(&mut self) -> NetResult<Option<crate::Accepted>> {
        loop {
            match self.listener.accept() {
                Ok((s, peer)) => {
                    if let Err(e) = s.set_nonblocking(true) {
                        tracing::warn!(target: "braid::net", "dropping connection from {peer}: {e}");
                        continue;
                    }
                    if let Err(e) = self.transport.setup_socket(&s) {
                        tracing::warn!(target: "braid::net", "dropping connection from {peer}: {e}");
                        continue;
                    }
                    self.pending.push(PendingSock {
                        stream: s,
                        peer,
                        buf: Vec::new(),
                        since: Instant::now(),
                    });
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
        let now = Instant::now();
        let mut i = 0;
        while i < self.pending.len() {
            let res = Self::read_pending(&mut self.pending[i]);
            match res {
                Ok(HelloState::Incomplete) => {
                    if now.duration_since(self.pending[i].since) > HELLO_TIMEOUT {
                        let p = self.pending.swap_remove(i);
                        tracing::warn!(target: "braid::net", "dropping connection from {}: no hello within {:?}", p.peer, HELLO_TIMEOUT);
                    } else {
                        i += 1;
                    }
                }
                Ok(HelloState::Bad(why)) | Err(why) => {
                    let p = self.pending.swap_remove(i);
                    tracing::warn!(target: "braid::net", "dropping connection from {}: {why}", p.peer);
                }
                Ok(HelloState::Done {
                    index,
                    nsock,
                    stripe_min,
                    conn_id,
                    hello,
                }) => {
                    let p = self.pending.swap_remove(i);
                    let g = self.groups.entry(conn_id).or_insert_with(|| Group {
                        socks: (0..nsock).map(|_| None).collect(),
                        hello: Vec::new(),
                        stripe_min,
                        since: now,
                        peer: p.peer,
                    });
                    if g.socks.len() != nsock
                        || g.socks[index].is_some()
                        || g.stripe_min != stripe_min
                    {
                        tracing::warn!(target: "braid::net", "dropping connection from {}: inconsistent socket hello", p.peer);
                        continue;
                    }
                    if index == 0 {
                        g.hello = hello;
                    }
                    g.socks[index] = Some(p.stream);
                }
            }
        }
        // Complete groups become connections; stale partial groups are dropped.
        let done: Option<u64> = self
            .groups
            .iter()
            .find(|(_, g)| g.socks.iter().all(|s| s.is_some()))
            .map(|(k, _)| *k);
        self.groups.retain(|_, g| {
            let stale = now.duration_since(g.since) > HELLO_TIMEOUT;
            if stale {
                tracing::warn!(target: "braid::net", "dropping partial connection from {}: sockets missing", g.peer);
            }
            !stale
        });
        if let Some(k) = done {
            if let Some(g) = self.groups.remove(&k) {
                let socks: Vec<TcpStream> = g.socks.into_iter().flatten().collect();
                let conn = TcpConn::new(socks, g.stripe_min, g.peer.to_string());
                return Ok(Some((Box::new(conn), g.hello)));
            }
        }
        Ok(None)
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.listener.as_raw_fd())
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
    fn new(streams: Vec<TcpStream>, stripe_min: usize, peer: String) -> TcpConn {
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
        if sock.re == RXBUF {
            return Ok(0);
        }
        let free = RXBUF - sock.re;
        // SAFETY: re < RXBUF, so the pointer and `free` bytes lie inside rbuf.
        let p = unsafe { sock.rbuf.as_mut_ptr().add(sock.re) };
        match sys_read(sock.stream.as_raw_fd(), p, free)? {
            Io::Done(k) => {
                sock.re += k;
                Ok(k)
            }
            Io::Again => Ok(0),
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
                    // SAFETY: the pointer is inside the posted receive buffer, `need` bytes
                    // remain in it.
                    let p = unsafe { rx.ptr.add(rx.done) };
                    match sys_read(sock.stream.as_raw_fd(), p, need)? {
                        Io::Done(k) => {
                            rx.done += k;
                            moved = true;
                        }
                        Io::Again => return Ok(moved),
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
        // Eager: try to write now (the common small-message case completes here).
        for p in 0..n {
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
        if let Err(e) = self.progress_rx(0) {
            return Err(self.fail(e));
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
        let th = std::thread::spawn(move || t2.connect(&h2, b"hello-123", deadline).unwrap());
        let (a, hello) = loop {
            if let Some(x) = l.accept().unwrap() {
                break x;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(hello, b"hello-123");
        (a, th.join().unwrap())
    }

    fn default_pair() -> (Box<dyn Conn>, Box<dyn Conn>) {
        pair(TcpOptions::default())
    }

    #[test]
    fn conformance() {
        conf::exchange(&default_pair, conf::SIZES);
        conf::both_directions_at_once(&default_pair);
        conf::mismatch_is_reported_with_meta(&default_pair);
        conf::death_goodbye_and_abort(&default_pair);
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
        let th = std::thread::spawn(move || t.connect(&h, b"ok", deadline).unwrap());
        let end = Instant::now() + Duration::from_secs(5);
        let got = loop {
            if let Some((_, hello)) = l.accept().unwrap() {
                break hello;
            }
            assert!(Instant::now() < end);
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(got, b"ok");
        th.join().unwrap();
        // The strangers were closed by the listener.
        let mut b = [0u8; 1];
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
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
