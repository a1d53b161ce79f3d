//! Fuzz entry points (not part of the API): each function feeds arbitrary bytes to one decoder
//! or state machine of this crate that a peer can reach, the way the network would, and must
//! return without panicking, aborting, hanging or allocating much more than the input. The
//! libFuzzer targets in `fuzz/` and the smoke test (`make fuzz-smoke`) call these.

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use crate::{Conn, ConnectHandle, Meta, Request, META_LEN};

/// Largest byte stream a stateful target writes into a socket (below the default socket
/// buffer, so the writes never block).
const MAX_STREAM: usize = 64 * 1024;

/// [`ConnectHandle::decode`]; a handle that decodes must encode back to the same bytes.
pub fn connect_handle(data: &[u8]) {
    if let Ok(h) = ConnectHandle::decode(data) {
        assert_eq!(h.encode(), data, "connect handle does not round-trip");
    }
}

/// A connected pair of `AF_UNIX` stream sockets.
fn socketpair() -> Option<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: FFI; socketpair writes two descriptors into a live array of two.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return None;
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe { Some((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))) }
}

/// Writes all of `b` to the blocking socket `fd`, then shuts its write side down.
fn feed(fd: &OwnedFd, b: &[u8]) {
    use std::os::fd::AsRawFd;
    let mut off = 0;
    while off < b.len() {
        let rest = &b[off..];
        // SAFETY: FFI; `rest` is a live slice; MSG_NOSIGNAL: EPIPE instead of SIGPIPE.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                rest.as_ptr().cast::<libc::c_void>(),
                rest.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n <= 0 {
            break;
        }
        off += n as usize;
    }
    // SAFETY: FFI on an open socket.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
}

/// A little-endian reader over the fuzz input.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn u8(&mut self) -> u8 {
        let (v, rest) = self.0.split_first().map_or((0, &[][..]), |(v, r)| (*v, r));
        self.0 = rest;
        v
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn rest(self) -> &'a [u8] {
        self.0
    }
}

/// Drives posted receives on `conn` until they all completed, the connection failed, or
/// nothing moves any more (the byte stream is finite and already written).
fn drive(conn: &mut dyn Conn, reqs: &[Request]) {
    drive_requests(conn, reqs, 3, Duration::from_micros(50));
}

/// Drives `conn` until every request of `reqs` completed, the connection failed, or nothing
/// moved for `idle_limit` looks in a row (`nap` apart). Shared by the fuzz targets of both
/// crates.
pub fn drive_requests(conn: &mut dyn Conn, reqs: &[Request], idle_limit: u32, nap: Duration) {
    let mut idle = 0;
    let mut done = vec![false; reqs.len()];
    while idle < idle_limit {
        let moved = match conn.progress() {
            Ok(m) => m,
            Err(_) => return,
        };
        for (i, r) in reqs.iter().enumerate() {
            if !done[i] {
                match conn.test(*r) {
                    Ok(Some(_)) => done[i] = true,
                    Ok(None) => {}
                    Err(_) => return,
                }
            }
        }
        if done.iter().all(|d| *d) {
            return;
        }
        if moved {
            idle = 0;
        } else {
            idle += 1;
            std::thread::sleep(nap);
        }
    }
}

/// Accepts from `l` until it has nothing left to do: its descriptor stayed quiet twice in a
/// row (2 ms each), it failed, or 1000 rounds passed.
fn accept_until_quiet(l: &mut dyn crate::Listener) -> Vec<crate::Arrival> {
    let mut arrivals = Vec::new();
    let mut scratch = Vec::new();
    let mut quiet = 0;
    for _ in 0..1000 {
        match l.accept_challenged() {
            Ok(Some(a)) => {
                arrivals.push(a);
                quiet = 0;
                continue;
            }
            Ok(None) => {}
            Err(_) => break,
        }
        let Some(fd) = l.fd() else { break };
        let pf = [crate::PollFd {
            fd,
            read: true,
            write: false,
        }];
        if crate::wait_fds(&pf, Duration::from_millis(2), &mut scratch).unwrap_or(false) {
            quiet = 0;
        } else {
            quiet += 1;
            if quiet >= 2 {
                break;
            }
        }
    }
    arrivals
}

/// The TCP transport's receive path (frame headers, striping, control frames, abort reasons):
/// one input = the receives a collective posts and the byte stream a peer sends on each socket
/// of the connection.
///
/// Layout: `h` (bit 0: two sockets, else one; bits 1..4: receives - 1), stripe size (u16),
/// split point of the stream between the sockets (u16), then per receive its tag (u8) and
/// length (u16), then the stream.
pub fn tcp_frames(data: &[u8]) {
    let mut b = Bytes(data);
    let h = b.u8();
    let nsock = 1 + (h & 1) as usize;
    let nrecv = 1 + ((h >> 1) & 7) as usize;
    let stripe_min = 1 + b.u16() as usize;
    let split = b.u16() as usize;
    let posts: Vec<(u64, usize)> = (0..nrecv)
        .map(|_| (b.u8() as u64, b.u16() as usize))
        .collect();
    let stream = b.rest();
    let stream = &stream[..stream.len().min(MAX_STREAM)];
    let split = if nsock == 1 {
        stream.len()
    } else {
        split.min(stream.len())
    };
    let parts = [&stream[..split], &stream[split..]];
    let mut peers = Vec::new();
    let mut streams = Vec::new();
    for part in parts.iter().take(nsock) {
        let Some((mine, theirs)) = socketpair() else {
            return;
        };
        feed(&theirs, part);
        peers.push(theirs);
        let s = std::net::TcpStream::from(mine);
        if s.set_nonblocking(true).is_err() {
            return;
        }
        streams.push(s);
    }
    let mut conn = crate::tcp::TcpConn::new(streams, stripe_min, "fuzz peer".into());
    let mut bufs: Vec<Vec<u8>> = posts.iter().map(|(_, n)| vec![0u8; *n]).collect();
    let mut reqs = Vec::new();
    for (buf, (tag, _)) in bufs.iter_mut().zip(&posts) {
        // SAFETY: `buf` outlives `conn` (dropped below, before `bufs`) and is not touched
        // until then.
        match unsafe { conn.irecv(*tag, buf.as_mut_ptr(), buf.len()) } {
            Ok(Some(r)) => reqs.push(r),
            _ => break,
        }
    }
    drive(&mut conn, &reqs);
    let zero: Meta = [0; META_LEN];
    let msg = [7u8; 16];
    // SAFETY: `msg` outlives `conn`.
    let _ = unsafe { conn.isend(1, &zero, msg.as_ptr(), msg.len()) };
    let _ = conn.progress();
    conn.goodbye();
    conn.abort("fuzz");
    drop(conn);
    drop(bufs);
    drop(peers);
}

/// A connected pair of TCP-transport connections over a local socket pair (one socket each),
/// for targets of the layers above that want a real transport without a listener.
pub fn tcp_pair() -> Option<(Box<dyn Conn>, Box<dyn Conn>)> {
    let (a, b) = socketpair()?;
    let a = std::net::TcpStream::from(a);
    let b = std::net::TcpStream::from(b);
    a.set_nonblocking(true).ok()?;
    b.set_nonblocking(true).ok()?;
    Some((
        Box::new(crate::tcp::TcpConn::new(vec![a], 1 << 20, "fuzz a".into())),
        Box::new(crate::tcp::TcpConn::new(vec![b], 1 << 20, "fuzz b".into())),
    ))
}

/// Reads everything `fd` holds now (nonblocking).
fn drain_socket(fd: &OwnedFd) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: FFI; reads into a live buffer.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
}

/// A `tcp_frames` input: the byte streams a real TCP connection of `nsock` sockets (stripe
/// `stripe_min`) writes for `msgs` (tag, payload), then `end` (0: nothing, 1: goodbye,
/// 2: abort), with matching receives posted.
fn tcp_seed(nsock: usize, stripe_min: u16, msgs: &[(u8, Vec<u8>)], end: u8) -> Vec<u8> {
    let mut ours = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..nsock {
        let Some((a, b)) = socketpair() else {
            return Vec::new();
        };
        let a = std::net::TcpStream::from(a);
        let _ = a.set_nonblocking(true);
        streams.push(a);
        ours.push(b);
    }
    let mut conn = crate::tcp::TcpConn::new(streams, stripe_min as usize, "seed".into());
    let zero: Meta = [0; META_LEN];
    for (tag, m) in msgs {
        // SAFETY: `msgs` outlives `conn`.
        let _ = unsafe { conn.isend(u64::from(*tag), &zero, m.as_ptr(), m.len()) };
    }
    for _ in 0..100 {
        if conn.pending() == 0 {
            break;
        }
        let _ = conn.progress();
    }
    match end {
        1 => conn.goodbye(),
        2 => conn.abort("seed abort"),
        _ => {}
    }
    drop(conn);
    let s: Vec<Vec<u8>> = ours.iter().map(drain_socket).collect();
    let mut out = vec![((msgs.len().max(1) - 1) as u8) << 1 | (nsock == 2) as u8];
    out.extend_from_slice(&(stripe_min - 1).to_le_bytes());
    out.extend_from_slice(&(s[0].len() as u16).to_le_bytes());
    for (tag, m) in msgs {
        out.push(*tag);
        out.extend_from_slice(&(m.len() as u16).to_le_bytes());
    }
    for x in &s {
        out.extend_from_slice(x);
    }
    out
}

/// The ib transport's decoders of peer-controlled bytes: the connect handle address, the queue
/// pair handshake, control message headers, the emulated NIC's address (the first byte picks
/// one).
pub fn ib_wire(data: &[u8]) {
    crate::ib::fuzz_decoders(data);
}

/// Seed inputs made by the real encoders: (target, file name, bytes); see
/// `braid::fuzzing::seeds`.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out: Vec<(&'static str, String, Vec<u8>)> = Vec::new();
    for (name, bytes) in crate::ib::fuzz_seeds() {
        out.push(("ib_wire", name, bytes));
    }
    for (name, t, addr) in [
        ("tcp", "tcp", b"127.0.0.1:40000".to_vec()),
        ("shm", "shm", b"braid-shm-1234-5678".to_vec()),
        ("mem", "mem", 7u64.to_le_bytes().to_vec()),
    ] {
        let h = ConnectHandle {
            transport: t.into(),
            addr,
        };
        out.push(("connect_handle", format!("seed-{name}"), h.encode()));
    }
    let small = vec![(5u8, vec![1u8; 40]), (6, Vec::new()), (5, vec![2u8; 300])];
    out.push((
        "tcp_frames",
        "seed-one-socket".into(),
        tcp_seed(1, 256, &small, 1),
    ));
    out.push((
        "tcp_frames",
        "seed-striped".into(),
        tcp_seed(2, 64, &[(9, vec![3u8; 1000]), (9, vec![4u8; 100])], 1),
    ));
    out.push((
        "tcp_frames",
        "seed-abort".into(),
        tcp_seed(1, 256, &small[..1], 2),
    ));

    // tcp_accept: socket hellos (layout of tcp.rs) followed by a data frame for the
    // receive (tag 1, 64 bytes) the target posts.
    let frame = tcp_seed(1, 256, &[(1, vec![5u8; 64])], 0)[8..].to_vec();
    let sock_hello = |index: u16, nsock: u16, hello: &[u8]| {
        let mut h = b"BRDT".to_vec();
        h.extend_from_slice(&crate::tcp::PROTO_VERSION.to_le_bytes());
        h.extend_from_slice(&index.to_le_bytes());
        h.extend_from_slice(&nsock.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes());
        h.extend_from_slice(&64u32.to_le_bytes());
        h.extend_from_slice(&[0u8; SECRET_LEN]);
        h.extend_from_slice(&(hello.len() as u32).to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(hello);
        h
    };
    let socket = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u16).to_le_bytes());
        out.extend_from_slice(b);
    };
    let mut one = vec![0u8];
    socket(
        &mut one,
        &[sock_hello(0, 1, b"caller hello"), frame.clone()].concat(),
    );
    out.push(("tcp_accept", "seed-one-socket".into(), one));
    let mut two = vec![1u8 | 4 | 8];
    socket(
        &mut two,
        &[sock_hello(0, 2, b"caller hello"), frame].concat(),
    );
    socket(&mut two, &sock_hello(1, 2, b""));
    out.push(("tcp_accept", "seed-two-sockets".into(), two));

    // shm_ring: one receive (tag 5, 100 bytes), the connector sends it, progress; then the
    // same with a corrupt head index of ring 0 (control page of side 0 at 4096) and with
    // garbage over the first frame header (ring 0 at 3 * 4096).
    let clean = vec![1u8, 5, 100, 0, 2, 5, 100, 0, 1, 1];
    out.push(("shm_ring", "seed-clean".into(), clean.clone()));
    let mut head = vec![1u8, 5, 100, 0, 2, 5, 100, 0, 3];
    head.extend_from_slice(&4096u16.to_le_bytes());
    head.extend_from_slice(&u64::MAX.to_le_bytes());
    head.push(1);
    out.push(("shm_ring", "seed-bad-head".into(), head));
    let mut junk = vec![1u8, 5, 100, 0, 2, 5, 100, 0, 0];
    junk.extend_from_slice(&(3 * 4096u16).to_le_bytes());
    junk.push(16);
    junk.extend_from_slice(b"BRDMgarbagegarb!");
    junk.push(1);
    out.push(("shm_ring", "seed-bad-frame".into(), junk));

    // shm_accept: a valid hello (layout of shm.rs: magic, version, ring, segment length,
    // hello length, hello) with a segment header (magic, version, ring) in the memfd.
    let ring = 4096u64;
    let seg_len = 3 * 4096 + 2 * ring;
    let shm_input = |f: u8, hello: &[u8]| {
        let mut v = vec![f];
        v.extend_from_slice(&((seg_len / 256) as u16).to_le_bytes());
        v.push(24);
        v.extend_from_slice(b"BRDSHM01");
        v.extend_from_slice(&u64::from(crate::shm::PROTO_VERSION).to_le_bytes());
        v.extend_from_slice(&ring.to_le_bytes());
        v.extend_from_slice(b"BRDS");
        v.extend_from_slice(&crate::shm::PROTO_VERSION.to_le_bytes());
        v.extend_from_slice(&[0, 0]);
        v.extend_from_slice(&ring.to_le_bytes());
        v.extend_from_slice(&seg_len.to_le_bytes());
        v.extend_from_slice(&(hello.len() as u32).to_le_bytes());
        v.extend_from_slice(hello);
        v
    };
    out.push((
        "shm_accept",
        "seed-sealed".into(),
        shm_input(1 | 2 | 4, b"fuzz"),
    ));
    out.push((
        "shm_accept",
        "seed-unsealed-shrunk".into(),
        shm_input(1 | 4 | 16, b"fuzz"),
    ));
    out.push((
        "shm_accept",
        "seed-checked".into(),
        shm_input(1 | 2 | 4 | 32, b"\xffno"),
    ));
    out.push((
        "shm_accept",
        "seed-extra-fd".into(),
        shm_input(1 | 2 | 4 | 8, b""),
    ));
    out
}

/// Closes `s` with a reset (SO_LINGER 0), so fuzzing leaves no TIME_WAIT sockets behind.
fn close_hard(s: std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: FFI; the option value is a live linger struct of the stated size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast::<libc::c_void>(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

/// Offset of the connection secret in a tcp socket hello, and its length (see tcp.rs).
const SECRET_AT: usize = 16;
const SECRET_LEN: usize = 16;
/// Length of the listener's challenge frame, whose last 16 bytes are the connection secret.
const CHAL_FRAME: usize = 8 + crate::CHALLENGE_LEN + SECRET_LEN;

/// The TCP listener's accept path (challenge, socket hellos, grouping sockets into striped
/// connections, the hello check) on a fresh listener, then the accepted connection's receive
/// path: one input = what up to four client sockets send.
///
/// Layout: `h` (bits 0..1: sockets - 1; bit 2: copy the connection secret from socket 0's
/// challenge into the other sockets' hellos, as a real connector does; bit 3: install a hello
/// check refusing hellos that start with 0xff), then per socket its bytes as `[len u16][bytes]`.
/// Bytes past a socket's hello are the connection's frames.
pub fn tcp_accept(data: &[u8]) {
    use crate::Transport;
    use std::io::{Read, Write};
    let mut b = Bytes(data);
    let h = b.u8();
    let nsock = 1 + (h & 3) as usize;
    let mut sends: Vec<Vec<u8>> = Vec::new();
    for _ in 0..nsock {
        let n = b.u16() as usize;
        let rest = b.0;
        let n = n.min(rest.len());
        sends.push(rest[..n].to_vec());
        b.0 = &rest[n..];
    }
    let Ok(t) = crate::tcp::TcpTransport::new(crate::tcp::TcpOptions::default()) else {
        return;
    };
    let Ok((mut l, handle)) = t.listen(0) else {
        return;
    };
    if h & 8 != 0 {
        l.set_hello_check(Box::new(|_, hello: &[u8], _| match hello.first() {
            Some(&0xff) => Err("refused by the fuzz target".into()),
            _ => Ok(()),
        }));
    }
    let Some(addr) = std::str::from_utf8(&handle.addr)
        .ok()
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
    else {
        return;
    };
    let mut socks = Vec::new();
    let mut secret = [0u8; SECRET_LEN];
    for (i, bytes) in sends.iter_mut().enumerate() {
        let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            break;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        if h & 4 != 0 {
            // Read the challenge frame (the listener sends it once it accepted the socket).
            let mut f = [0u8; CHAL_FRAME];
            let mut got = 0;
            let end = std::time::Instant::now() + Duration::from_secs(2);
            while got < CHAL_FRAME && std::time::Instant::now() < end {
                let _ = l.accept_challenged();
                let _ = s.set_nonblocking(true);
                match (&s).read(&mut f[got..]) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(_) => std::thread::sleep(Duration::from_micros(100)),
                }
                let _ = s.set_nonblocking(false);
            }
            if i == 0 {
                secret.copy_from_slice(&f[CHAL_FRAME - SECRET_LEN..]);
            } else if bytes.len() >= SECRET_AT + SECRET_LEN {
                bytes[SECRET_AT..SECRET_AT + SECRET_LEN].copy_from_slice(&secret);
            }
        }
        let _ = (&s).write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        socks.push(s);
    }
    // Accept until the listener has nothing left to do (its descriptor stays quiet).
    let mut arrivals = accept_until_quiet(&mut *l);
    let mut bufs: Vec<Vec<u8>> = arrivals.iter().map(|_| vec![0u8; 64]).collect();
    for (a, buf) in arrivals.iter_mut().zip(bufs.iter_mut()) {
        // SAFETY: `buf` outlives the connection (`arrivals` is dropped before `bufs`).
        if let Ok(Some(r)) = unsafe { a.conn.irecv(1, buf.as_mut_ptr(), buf.len()) } {
            drive(&mut *a.conn, &[r]);
        }
        a.conn.abort("fuzz");
    }
    drop(arrivals);
    drop(bufs);
    for s in socks {
        close_hard(s);
    }
    drop(l);
}

/// Ring size of the `shm_ring` target's connections (small, so that frames wrap).
const SHM_RING: usize = 1024;
/// Segment length for that ring size: a header page, a control page per side, two rings (the
/// layout in shm.rs's module documentation).
const SHM_SEG: usize = 3 * 4096 + 2 * SHM_RING;

/// The mappings of shm segments in this process (start addresses), from /proc/self/maps.
fn shm_mappings() -> Vec<(usize, usize)> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    maps.lines()
        .filter(|l| l.contains("memfd:braid-shm"))
        .filter_map(|l| {
            let range = l.split_whitespace().next()?;
            let (a, b) = range.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect()
}

/// The shared-memory transport's receive and send paths under a peer that writes anything
/// anywhere in the shared segment (ring contents, head and tail indices, states, abort
/// reasons, direct-copy descriptors), as another process of the same user can: a real
/// connection pair (in this process), the acceptor side posting receives, the connector side
/// sending real messages, and the input's writes into the segment between progress calls.
///
/// Layout: `h` (bits 0..1: receives posted on the acceptor side), per receive its tag (u8)
/// and length (u16), then operations, each an opcode byte: `op % 4 == 0`: write `[off u16]
/// [n u8][n bytes]` at segment offset `off`; `1`: progress both sides; `2`: the connector
/// sends `[tag u8][len u16]` bytes; `3`: write the u64 `[off u16][v u64]` at offset `off & !7`.
pub fn shm_ring(data: &[u8]) {
    use crate::Transport;
    if !shm_mappings().is_empty() {
        return; // a segment of an earlier input is still mapped: offsets would be ambiguous
    }
    let opts = crate::shm::ShmOptions {
        ring_bytes: SHM_RING,
        ..Default::default()
    };
    let Ok(t) = crate::shm::ShmTransport::new(opts) else {
        return;
    };
    let Ok((mut l, handle)) = t.listen(0) else {
        return;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let connector = std::thread::spawn(move || {
        t.connect_challenged(&handle, &|_| b"fuzz".to_vec(), deadline)
            .ok()
    });
    let mut acc = None;
    while acc.is_none() && std::time::Instant::now() < deadline && !connector.is_finished() {
        match l.accept_challenged() {
            Ok(Some(a)) => acc = Some(a.conn),
            Ok(None) => std::thread::sleep(Duration::from_micros(20)),
            Err(_) => break,
        }
    }
    while acc.is_none() && std::time::Instant::now() < deadline {
        match l.accept_challenged() {
            Ok(Some(a)) => acc = Some(a.conn),
            Ok(None) => std::thread::sleep(Duration::from_micros(20)),
            Err(_) => break,
        }
    }
    let Ok(Some(mut sender)) = connector.join() else {
        return;
    };
    let Some(mut victim) = acc else {
        return;
    };
    let maps = shm_mappings();
    let Some(&(base, end)) = maps.first() else {
        return;
    };
    // SAFETY: `base` is the start of a live mapping of the segment of this pair (both sides
    // keep it mapped until they are dropped below) of at least 8 readable bytes.
    let magic = unsafe { std::ptr::read_volatile(base as *const u64) };
    if end - base < SHM_SEG || magic != u64::from_le_bytes(*b"BRDSHM01") {
        return;
    }
    let seg = base as *mut u8;
    let mut b = Bytes(data);
    let h = b.u8();
    let posts: Vec<(u64, usize)> = (0..(h & 3))
        .map(|_| (u64::from(b.u8()), b.u16() as usize))
        .collect();
    let mut bufs: Vec<Vec<u8>> = posts.iter().map(|(_, n)| vec![0u8; *n]).collect();
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let mut reqs = Vec::new();
    for (buf, (tag, _)) in bufs.iter_mut().zip(&posts) {
        // SAFETY: `buf` outlives `victim` (dropped before `bufs`).
        if let Ok(Some(r)) = unsafe { victim.irecv(*tag, buf.as_mut_ptr(), buf.len()) } {
            reqs.push(r);
        }
    }
    let zero: Meta = [0; META_LEN];
    let mut ops = 0;
    while !b.0.is_empty() && ops < 256 {
        ops += 1;
        match b.u8() % 4 {
            0 => {
                let off = b.u16() as usize % SHM_SEG;
                let n = (b.u8() as usize).min(SHM_SEG - off).min(b.0.len());
                let (w, rest) = b.0.split_at(n);
                // SAFETY: off + n <= SHM_SEG, inside the live mapping; the other side reads
                // the segment only inside its own calls, on this thread.
                unsafe { std::ptr::copy_nonoverlapping(w.as_ptr(), seg.add(off), n) };
                b.0 = rest;
            }
            1 => {
                for _ in 0..4 {
                    let _ = victim.progress();
                    let _ = sender.progress();
                }
            }
            2 => {
                let tag = u64::from(b.u8());
                let n = (b.u16() as usize).min(4 * SHM_RING);
                sent.push(vec![0x5a; n]);
                if let Some(m) = sent.last() {
                    // SAFETY: `sent` outlives `sender` (dropped before it); the vector's
                    // heap buffer does not move when `sent` grows.
                    let _ = unsafe { sender.isend(tag, &zero, m.as_ptr(), m.len()) };
                }
            }
            _ => {
                let off = (b.u16() as usize % SHM_SEG) & !7;
                let v = u64::from_le_bytes([
                    b.u8(),
                    b.u8(),
                    b.u8(),
                    b.u8(),
                    b.u8(),
                    b.u8(),
                    b.u8(),
                    b.u8(),
                ]);
                // SAFETY: off + 8 <= SHM_SEG (off is a multiple of 8 below it), inside the
                // live mapping; aligned for u64 (the mapping is page-aligned).
                unsafe { std::ptr::write_volatile(seg.add(off) as *mut u64, v) };
            }
        }
    }
    drive(&mut *victim, &reqs);
    victim.abort("fuzz");
    let _ = sender.progress();
    drop(victim);
    drop(sender);
    drop(bufs);
    drop(sent);
    drop(l);
}

/// A new descriptor from a libc call returning one (or -1).
fn owned(fd: libc::c_int) -> Option<OwnedFd> {
    // SAFETY: a non-negative result of the calls below is a fresh descriptor owned by nobody.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A memfd of `len` bytes starting with `head`, sealed against size changes with `seal`.
fn fuzz_memfd(len: usize, head: &[u8], seal: bool) -> Option<OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: FFI with a NUL-terminated name.
    let fd = owned(unsafe {
        libc::memfd_create(
            c"braid-fuzz".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    })?;
    // SAFETY: plain system calls on an open memfd; `head` is a live slice.
    unsafe {
        if libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) != 0 {
            return None;
        }
        let n = head.len().min(len);
        libc::pwrite(fd.as_raw_fd(), head.as_ptr().cast::<libc::c_void>(), n, 0);
        if seal {
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            );
        }
    }
    Some(fd)
}

/// The shared-memory listener's accept path (credentials, challenge, hello, the descriptors
/// passed with it: a segment memfd, sealed or not, of any size and content, eventfds or other
/// descriptors), as a local process connecting to the listener's abstract socket can drive
/// it; an accepted connection is then used after the peer tried to shrink its segment (a
/// mapped unsealed segment would kill the process with SIGBUS).
///
/// Layout: flags `f` (bit 0: pass a memfd; 1: seal it; 2: pass two eventfds, else two pipe
/// ends; 3: pass one more descriptor; 4: shrink the memfd after the connection is accepted;
/// 5: install a hello check refusing hellos that start with 0xff), memfd size (u16, in 256
/// byte units), `n` (u8) and the memfd's first `n` bytes, then the hello message.
pub fn shm_accept(data: &[u8]) {
    use crate::Transport;
    use std::os::fd::AsRawFd;
    let mut b = Bytes(data);
    let f = b.u8();
    let size = b.u16() as usize * 256;
    let n = b.u8() as usize;
    let rest = b.rest();
    let (head, hello) = rest.split_at(n.min(rest.len()));
    let Ok(t) = crate::shm::ShmTransport::new(crate::shm::ShmOptions::default()) else {
        return;
    };
    let Ok((mut l, handle)) = t.listen(0) else {
        return;
    };
    if f & 32 != 0 {
        l.set_hello_check(Box::new(|_, h: &[u8], _| match h.first() {
            Some(&0xff) => Err("refused by the fuzz target".into()),
            _ => Ok(()),
        }));
    }
    // The listener's abstract socket name.
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if handle.addr.len() + 1 > sa.sun_path.len() {
        return;
    }
    for (i, c) in handle.addr.iter().enumerate() {
        sa.sun_path[i + 1] = *c as libc::c_char;
    }
    let salen =
        (std::mem::size_of::<libc::sa_family_t>() + 1 + handle.addr.len()) as libc::socklen_t;
    // SAFETY: FFI; creates a socket.
    let Some(sock) =
        owned(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) })
    else {
        return;
    };
    // SAFETY: FFI; `sa` is a live sockaddr_un of the stated length.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&sa as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            salen,
        )
    };
    if r != 0 {
        return;
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut memfd = None;
    if f & 1 != 0 {
        let Some(m) = fuzz_memfd(size, head, f & 2 != 0) else {
            return;
        };
        // SAFETY: FFI; duplicates an open descriptor.
        memfd = owned(unsafe { libc::fcntl(m.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) });
        fds.push(m);
    }
    for _ in 0..2 {
        if f & 4 != 0 {
            // SAFETY: FFI; creates an eventfd.
            if let Some(e) = owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) }) {
                fds.push(e);
            }
        } else {
            let mut p = [0 as libc::c_int; 2];
            // SAFETY: FFI; writes two descriptors into a live array.
            if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } == 0 {
                fds.extend(owned(p[0]));
                drop(owned(p[1]));
            }
        }
    }
    if f & 8 != 0 {
        // SAFETY: FFI; creates an eventfd.
        fds.extend(owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) }));
    }
    // The listener sends its challenge once it accepted the socket.
    let _ = l.accept_challenged();
    // The hello, with the descriptors.
    let raw: Vec<libc::c_int> = fds.iter().map(|x| x.as_raw_fd()).collect();
    let mut cbuf = [0u64; 16];
    let clen = std::mem::size_of_val(raw.as_slice());
    let mut iov = libc::iovec {
        iov_base: hello.as_ptr() as *mut libc::c_void,
        iov_len: hello.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast::<libc::c_void>();
        // SAFETY: CMSG_SPACE is a pure size computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(clen as u32) } as _;
        // SAFETY: the control buffer (128 bytes) holds one header and up to 4 descriptors;
        // CMSG_FIRSTHDR points into it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(clen as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), clen);
        }
    }
    // SAFETY: `msg` points to live buffers of the stated sizes (the hello is only read).
    unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    drop(fds);
    // Accept until the listener has nothing left to do.
    let mut arrivals = accept_until_quiet(&mut *l);
    if f & 16 != 0 {
        if let Some(m) = &memfd {
            // SAFETY: plain system call on an open memfd (fails when it is sealed).
            unsafe { libc::ftruncate(m.as_raw_fd(), 0) };
        }
    }
    let mut bufs: Vec<Vec<u8>> = arrivals.iter().map(|_| vec![0u8; 64]).collect();
    let m = [1u8; 16];
    let zero: Meta = [0; META_LEN];
    for (a, buf) in arrivals.iter_mut().zip(bufs.iter_mut()) {
        // SAFETY: `buf` outlives the connection (`arrivals` is dropped before `bufs`).
        if let Ok(Some(r)) = unsafe { a.conn.irecv(1, buf.as_mut_ptr(), buf.len()) } {
            drive(&mut *a.conn, &[r]);
        }
        // SAFETY: `m` outlives the connection (`arrivals` is dropped before it).
        let _ = unsafe { a.conn.isend(1, &zero, m.as_ptr(), m.len()) };
        let _ = a.conn.progress();
        a.conn.abort("fuzz");
    }
    drop(arrivals);
    drop(bufs);
    drop(sock);
    drop(memfd);
    drop(l);
}
