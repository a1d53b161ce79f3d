//! The coordinator's I/O pieces for established member connections: the connection handle
//! ([`Link`]) with its bounded, non-blocking outgoing queue, the epoll set ([`Poller`]) that
//! one event-loop thread waits on for every member connection, and the incremental frame
//! decoder ([`Decoder`]) that turns the bytes a connection delivered into frames.
//!
//! A connection starts in blocking mode (its handshake runs on a thread of its own, with write
//! timeouts). When it registers it switches to queued mode ([`Link::go_queued`]): from then on
//! a send never blocks: it writes what the socket takes at once (`MSG_DONTWAIT`) and queues
//! the rest, which the event loop writes when the socket becomes writable. A member whose
//! queue would pass its bound (it stopped reading) is dropped: its socket is shut down, which
//! the event loop sees as a lost connection (a failure), and a line names it.

use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::proto::{self, Frame, FrameError};
use super::LOG;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One connection's socket, shared by its handshake thread or the event loop (which read
/// it), the threads that write frames to it (one at a time, under `out`) and the accept
/// loop's table (which shuts it down): one descriptor per connection.
pub(super) struct Link {
    pub(super) sock: TcpStream,
    out: Mutex<Out>,
    /// Set once the connection was dropped for a full queue or a write error.
    broken: AtomicBool,
    /// Bytes wait in the queue (read without the lock by the event loop).
    waiting: AtomicBool,
}

/// The writing side of a [`Link`].
struct Out {
    /// Blocking mode: the write timeout last set on the socket (set again only when it
    /// changes).
    timeout: Option<Duration>,
    /// Queued mode (after registration): bytes not yet taken by the socket.
    queue: Option<Queue>,
}

/// Bytes waiting for the socket of a queued-mode [`Link`].
struct Queue {
    bytes: Vec<u8>,
    /// Bytes of `bytes` already written.
    sent: usize,
    /// Most bytes waiting at once.
    bound: usize,
    /// Who this is, for the log line when it is dropped ("member 7 (127.0.0.1:4000)").
    who: String,
}

impl Queue {
    fn pending(&self) -> usize {
        self.bytes.len() - self.sent
    }
}

/// Writes as much of `buf` as the socket takes without blocking; returns how much it took.
fn send_now(fd: RawFd, buf: &[u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        // SAFETY: `rest` is a valid, initialised byte slice for the whole call (pointer and
        // length from the same slice) and `fd` is the open socket of a live `Link`.
        let n = unsafe {
            libc::send(
                fd,
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return Ok(done),
                _ => return Err(e),
            }
        }
        // n >= 0 here and at most rest.len().
        done += usize::try_from(n).unwrap_or(0);
    }
    Ok(done)
}

/// Reads what the socket holds without blocking (`Ok(0)`: the peer closed).
pub(super) fn recv_now(fd: RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid, writable byte slice for the whole call (pointer and
        // length from the same slice) and `fd` is the open socket of a live `Link`.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(usize::try_from(n).unwrap_or(0));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Link {
    pub(super) fn new(sock: TcpStream) -> Link {
        Link {
            sock,
            out: Mutex::new(Out {
                timeout: None,
                queue: None,
            }),
            broken: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
        }
    }

    /// Switches to queued mode: from now on [`Link::send`] never blocks, and at most `bound`
    /// bytes wait (beyond one frame, which is always accepted into an empty queue).
    pub(super) fn go_queued(&self, bound: usize, who: String) {
        let mut out = lock(&self.out);
        if out.queue.is_none() {
            out.queue = Some(Queue {
                bytes: Vec::new(),
                sent: 0,
                bound,
                who,
            });
        }
    }

    /// Sends a whole frame: in blocking mode with a write deadline (like
    /// `proto::write_bytes`); in queued mode without blocking (what the socket does not take
    /// now is queued; `Err` when the connection was dropped, now or before).
    pub(super) fn send(&self, bytes: &[u8], timeout: Duration) -> std::io::Result<()> {
        let mut out = lock(&self.out);
        let out = &mut *out;
        let Some(q) = out.queue.as_mut() else {
            let t = Some(timeout.max(Duration::from_millis(1)));
            if out.timeout != t {
                self.sock.set_write_timeout(t)?;
                out.timeout = t;
            }
            use std::io::Write;
            (&self.sock).write_all(bytes)?;
            return (&self.sock).flush();
        };
        if self.broken.load(Ordering::SeqCst) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "connection dropped",
            ));
        }
        let mut at = 0;
        if q.pending() == 0 {
            at = match send_now(self.sock.as_raw_fd(), bytes) {
                Ok(n) => n,
                Err(e) => {
                    self.fail_locked(q, &format!("write failed: {e}"), false);
                    return Err(e);
                }
            };
            if at == bytes.len() {
                return Ok(());
            }
        }
        let rest = bytes.len() - at;
        if q.pending() > 0 && q.pending().saturating_add(rest) > q.bound {
            let msg = format!(
                "{} bytes wait to be written to it (bound {} bytes): it does not read",
                q.pending().saturating_add(rest),
                q.bound
            );
            self.fail_locked(q, &msg, true);
            return Err(std::io::Error::other("outgoing queue full"));
        }
        if q.sent > 0 && q.sent >= q.bytes.len() / 2 {
            q.bytes.drain(..q.sent);
            q.sent = 0;
        }
        q.bytes.extend_from_slice(&bytes[at..]);
        // Flag first, then try once more: a writable edge the event loop saw before the flag
        // was set found nothing to do, so the space it announced is used here.
        self.waiting.store(true, Ordering::SeqCst);
        self.flush_locked(q);
        Ok(())
    }

    /// Writes what waits in the queue (the event loop, when the socket became writable).
    pub(super) fn flush(&self) {
        if !self.waiting.load(Ordering::SeqCst) {
            return;
        }
        let mut out = lock(&self.out);
        if let Some(q) = out.queue.as_mut() {
            self.flush_locked(q);
        }
    }

    fn flush_locked(&self, q: &mut Queue) {
        if q.pending() == 0 || self.broken.load(Ordering::SeqCst) {
            return;
        }
        match send_now(self.sock.as_raw_fd(), &q.bytes[q.sent..]) {
            Ok(n) => {
                q.sent += n;
                if q.pending() == 0 {
                    q.bytes.clear();
                    q.sent = 0;
                    self.waiting.store(false, Ordering::SeqCst);
                }
            }
            Err(e) => {
                let msg = format!("write failed: {e}");
                self.fail_locked(q, &msg, false);
            }
        }
    }

    /// Bytes waiting in the queue (0 in blocking mode).
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        lock(&self.out).queue.as_ref().map_or(0, Queue::pending)
    }

    /// Drops the connection (once): a log line naming it, the queue freed, the socket shut
    /// down (the event loop then sees it end, as a failure).
    fn fail_locked(&self, q: &mut Queue, why: &str, full: bool) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            if full {
                tracing::warn!(target: LOG, "coordinator: {}: {why}; dropping it", q.who);
            } else {
                // The peer is gone: the event loop sees the connection end and logs that.
                tracing::debug!(target: LOG, "coordinator: {}: {why}; dropping it", q.who);
            }
        }
        q.bytes = Vec::new();
        q.sent = 0;
        self.waiting.store(false, Ordering::SeqCst);
        self.close();
    }

    /// Shuts the socket down both ways (wakes its reader; the peer sees the close).
    pub(super) fn close(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

/// Token of the poller's wake-up descriptor.
const WAKE: u64 = u64::MAX;

/// An epoll set over the member connections plus an eventfd to wake its waiter.
pub(super) struct Poller {
    ep: OwnedFd,
    wake: OwnedFd,
}

fn cvt(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Poller {
    pub(super) fn new() -> std::io::Result<Poller> {
        // SAFETY: plain system calls without pointers; each returned descriptor is checked
        // and then owned by exactly one `OwnedFd`.
        let ep = unsafe { OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        // SAFETY: as above.
        let wake = unsafe {
            OwnedFd::from_raw_fd(cvt(libc::eventfd(
                0,
                libc::EFD_NONBLOCK | libc::EFD_CLOEXEC,
            ))?)
        };
        let p = Poller { ep, wake };
        p.ctl(
            libc::EPOLL_CTL_ADD,
            p.wake.as_raw_fd(),
            WAKE,
            libc::EPOLLIN as u32,
        )?;
        Ok(p)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, events: u32) -> std::io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the call; both descriptors are open (the
        // epoll set is owned by `self`, `fd` by the caller's live socket).
        cvt(unsafe { libc::epoll_ctl(self.ep.as_raw_fd(), op, fd, &mut ev) }).map(|_| ())
    }

    /// Watches `fd` (edge-triggered: readable, writable, closed) under `token`.
    pub(super) fn add(&self, fd: RawFd, token: u64) -> std::io::Result<()> {
        let ev = libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET;
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, ev as u32)
    }

    /// Stops watching `fd`.
    pub(super) fn remove(&self, fd: RawFd) {
        let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
    }

    /// Wakes [`Poller::wait`].
    pub(super) fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: `one` is 8 valid bytes for the call; the eventfd is owned by `self`.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Waits up to `timeout` for events; fills `out` with (token, events). The wake-up
    /// descriptor is drained and reported as token [`WAKE`] only through `woken`.
    pub(super) fn wait(
        &self,
        evs: &mut [libc::epoll_event],
        out: &mut Vec<(u64, u32)>,
        timeout: Duration,
    ) -> bool {
        out.clear();
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        let cap = libc::c_int::try_from(evs.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `evs` is a valid, writable array of `cap` epoll_event for the call; the
        // epoll set is owned by `self`.
        let n = unsafe { libc::epoll_wait(self.ep.as_raw_fd(), evs.as_mut_ptr(), cap, ms) };
        let mut woken = false;
        for ev in evs.iter().take(usize::try_from(n).unwrap_or(0)) {
            let (token, events) = (ev.u64, ev.events);
            if token == WAKE {
                woken = true;
                let mut b = [0u8; 8];
                // SAFETY: `b` is 8 writable bytes for the call; the eventfd is owned by
                // `self` and non-blocking.
                let _ = unsafe { libc::read(self.wake.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
            } else {
                out.push((token, events));
            }
        }
        woken
    }
}

/// Turns the bytes a connection delivered into frames. The declared length is checked as
/// soon as a header is in (at most `max_payload`), and the buffer holds only bytes that
/// actually arrived (at most one frame plus one read's worth beyond it).
pub(super) struct Decoder {
    buf: Vec<u8>,
    at: usize,
    /// When the first byte of the incomplete frame in `buf` arrived.
    pub(super) started: Option<Instant>,
}

impl Decoder {
    pub(super) fn new(leftover: Vec<u8>) -> Decoder {
        Decoder {
            buf: leftover,
            at: 0,
            started: None,
        }
    }

    /// Appends received bytes.
    pub(super) fn push(&mut self, bytes: &[u8]) {
        if self.at > 0 && self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes the incomplete frame in the buffer should have (its header's, while the header
    /// is incomplete).
    pub(super) fn want(&self) -> usize {
        let rest = &self.buf[self.at..];
        if rest.len() < proto::HEADER_LEN {
            return proto::HEADER_LEN;
        }
        let len = u32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]);
        proto::HEADER_LEN.saturating_add(usize::try_from(len).unwrap_or(usize::MAX))
    }

    /// Bytes of an incomplete frame held.
    pub(super) fn partial(&self) -> usize {
        self.buf.len() - self.at
    }

    /// The next complete frame, if one is in; a header that is not the protocol's or
    /// declares too long a payload is an error.
    pub(super) fn next(&mut self, max_payload: usize) -> Result<Option<Frame>, FrameError> {
        let rest = &self.buf[self.at..];
        if rest.len() < proto::HEADER_LEN {
            if rest.len() >= 4 && rest[..4] != proto::MAGIC {
                return Err(FrameError::BadMagic([rest[0], rest[1], rest[2], rest[3]]));
            }
            self.compact();
            return Ok(None);
        }
        let magic = [rest[0], rest[1], rest[2], rest[3]];
        if magic != proto::MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = u16::from_be_bytes([rest[4], rest[5]]);
        let ty = u16::from_be_bytes([rest[6], rest[7]]);
        let len = u32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]);
        let max = max_payload.min(proto::MAX_PAYLOAD);
        let want = usize::try_from(len).unwrap_or(usize::MAX);
        if want > max {
            return Err(FrameError::Oversize { len, max });
        }
        if rest.len() - proto::HEADER_LEN < want {
            self.compact();
            return Ok(None);
        }
        let payload = rest[proto::HEADER_LEN..proto::HEADER_LEN + want].to_vec();
        self.at += proto::HEADER_LEN + want;
        if self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        }
        Ok(Some(Frame {
            version,
            ty,
            payload,
        }))
    }

    /// Moves an incomplete frame to the front of the buffer.
    fn compact(&mut self) {
        if self.at > 0 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
    }

    /// Notes the time the incomplete frame started (call after `next` returned `None`).
    pub(super) fn note(&mut self, now: Instant) {
        if self.partial() == 0 {
            self.started = None;
        } else if self.started.is_none() {
            self.started = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn decoder_splits_frames_at_any_boundary() {
        let a = proto::encode_raw(proto::VERSION, 5, b"{\"epoch\":1}");
        let b = proto::encode_raw(proto::VERSION, 6, b"");
        let c = proto::encode_raw(proto::VERSION, 7, &[b'x'; 300]);
        let all: Vec<u8> = [a.clone(), b.clone(), c.clone()].concat();
        for cut in 1..all.len() {
            for step in [1, 3, 7, cut] {
                let mut d = Decoder::new(Vec::new());
                let mut got = Vec::new();
                for chunk in all.chunks(step) {
                    d.push(chunk);
                    while let Some(f) = d.next(1 << 20).unwrap() {
                        got.push(f);
                    }
                }
                assert_eq!(got.len(), 3, "cut {cut} step {step}");
                assert_eq!(got[0].ty, 5);
                assert_eq!(got[0].payload, b"{\"epoch\":1}");
                assert_eq!(got[1].payload, b"");
                assert_eq!(got[2].payload.len(), 300);
                assert_eq!(d.partial(), 0);
            }
        }
    }

    #[test]
    fn decoder_refuses_bad_headers_before_allocating() {
        let mut d = Decoder::new(Vec::new());
        d.push(b"HTTP");
        assert!(matches!(d.next(1024), Err(FrameError::BadMagic(_))));
        let mut big = proto::encode_raw(proto::VERSION, 5, b"");
        big[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut d = Decoder::new(Vec::new());
        d.push(&big);
        assert!(matches!(
            d.next(1024),
            Err(FrameError::Oversize { max: 1024, .. })
        ));
        // A header alone holds nothing sized by its declared length.
        let mut d = Decoder::new(Vec::new());
        let mut hdr = proto::encode_raw(proto::VERSION, 5, b"");
        hdr[8..12].copy_from_slice(&1000u32.to_be_bytes());
        d.push(&hdr);
        assert!(d.next(1 << 20).unwrap().is_none());
        assert!(d.buf.capacity() < 1000);
        d.note(Instant::now());
        assert!(d.started.is_some());
    }

    #[test]
    fn a_full_queue_drops_the_connection_and_never_blocks() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let link = Link::new(s);
        link.go_queued(1 << 20, "member 9 (test)".into());
        let frame = vec![7u8; 64 << 10];
        let t = Instant::now();
        let mut sent = 0usize;
        let err = loop {
            match link.send(&frame, Duration::from_secs(5)) {
                Ok(()) => sent += frame.len(),
                Err(e) => break e,
            }
            assert!(sent < 64 << 20, "the queue never filled");
        };
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(err.to_string().contains("queue full"), "{err}");
        assert_eq!(link.queued(), 0);
        // The peer sees the connection end once it read what was sent.
        let mut c = c;
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        loop {
            match std::io::Read::read(&mut c, &mut buf) {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(total <= sent, "{total} > {sent}");
        assert!(link.send(b"x", Duration::from_secs(1)).is_err());
    }
}
