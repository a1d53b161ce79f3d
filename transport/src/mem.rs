//! In-process transport: ranks as threads of one process, for fast deterministic tests.
//!
//! A [`MemFabric`] plays the network: listeners register on it and connections are made
//! through it (no global state; each test makes its own fabric). A send is matched with the
//! receive posted on the other side and copied once, from the sender's buffer straight into
//! the receiver's, by whichever side drives progress first.
//!
//! Connecting follows the tcp transport's handshake: the listener sends each new connection a
//! fresh challenge (when [`Listener::accept_challenged`] runs), the connector answers with its
//! hello, and the listener bounds the hello (4 KiB), its deadline, and how many connections
//! wait for one at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{
    new_challenge, Arrival, Challenge, Completion, Conn, ConnectHandle, DeviceProps, HelloCheck,
    HelloFn, Listener, Meta, NetError, NetResult, Peeked, PollFd, PtrSupport, Request, Transport,
    META_LEN,
};

/// The in-process "network".
#[derive(Default)]
pub struct MemFabric {
    next: AtomicU64,
    listeners: Mutex<HashMap<u64, mpsc::Sender<ConnectReq>>>,
}

impl MemFabric {
    /// A new, empty fabric.
    pub fn new() -> Arc<MemFabric> {
        Arc::new(MemFabric::default())
    }
}

/// The in-process transport over one fabric.
#[derive(Clone)]
pub struct MemTransport {
    fabric: Arc<MemFabric>,
}

impl MemTransport {
    /// A transport on `fabric`.
    pub fn new(fabric: Arc<MemFabric>) -> MemTransport {
        MemTransport { fabric }
    }
}

struct PSend {
    tag: u64,
    meta: Meta,
    ptr: *const u8,
    len: usize,
    seq: u64,
}

struct PRecv {
    tag: u64,
    ptr: *mut u8,
    len: usize,
    seq: u64,
}

#[derive(Default)]
struct Chan {
    sends: VecDeque<PSend>,
    recvs: VecDeque<PRecv>,
    /// Completed sends (count, in order).
    send_done: u64,
    /// Completed receives, with their metas (front = oldest not yet forgotten).
    recv_done: u64,
    recv_meta: VecDeque<(u64, Meta)>,
    error: Option<NetError>,
    bytes: u64,
}

// SAFETY: the raw pointers in PSend/PRecv are only dereferenced while matching, under the
// channel's mutex, and point into buffers the posting side promised (isend/irecv contracts) to
// keep valid until completion or until the connection is dropped (Drop fails the channel
// before returning, so no pointer of a dropped side is used afterwards).
unsafe impl Send for Chan {}

#[derive(Default)]
struct Shared {
    /// dir[0]: side 0 → side 1, dir[1]: side 1 → side 0.
    dir: [Mutex<Chan>; 2],
    closed: [Mutex<Option<bool>>; 2], // Some(true) = goodbye, Some(false) = dropped/aborted
    abort_reason: [Mutex<Option<String>>; 2],
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One side of an in-process connection.
pub struct MemConn {
    shared: Arc<Shared>,
    side: usize,
    sends_posted: u64,
    recvs_posted: u64,
    desc: String,
    done_local: bool,
}

impl MemConn {
    fn out_dir(&self) -> usize {
        self.side
    }
    fn in_dir(&self) -> usize {
        1 - self.side
    }

    /// Matches heads of one direction; returns whether anything moved.
    fn match_dir(chan: &mut Chan) -> bool {
        let mut moved = false;
        while chan.error.is_none() && !chan.sends.is_empty() && !chan.recvs.is_empty() {
            let (Some(s), Some(r)) = (chan.sends.front(), chan.recvs.front()) else {
                break;
            };
            if s.tag != r.tag || s.len != r.len {
                chan.error = Some(NetError::Mismatch {
                    expected_tag: r.tag,
                    expected_len: r.len as u64,
                    got_tag: s.tag,
                    got_len: s.len as u64,
                    meta: s.meta,
                });
                break;
            }
            if s.len > 0 {
                // SAFETY: both buffers are valid for `len` bytes per the isend/irecv contracts;
                // they belong to different posted requests and do not overlap (a receive buffer
                // is exclusively the receiver's until completion).
                unsafe { std::ptr::copy_nonoverlapping(s.ptr, r.ptr, s.len) };
            }
            let meta = s.meta;
            let (sseq, rseq, len) = (s.seq, r.seq, s.len);
            chan.sends.pop_front();
            chan.recvs.pop_front();
            chan.send_done = sseq + 1;
            chan.recv_done = rseq + 1;
            chan.recv_meta.push_back((rseq, meta));
            chan.bytes += len as u64;
            moved = true;
        }
        moved
    }

    fn peer_state(&self) -> Option<bool> {
        *lock(&self.shared.closed[1 - self.side])
    }
}

impl Conn for MemConn {
    unsafe fn isend(
        &mut self,
        tag: u64,
        meta: &Meta,
        buf: *const u8,
        len: usize,
    ) -> NetResult<Option<Request>> {
        self.progress()?;
        let seq = self.sends_posted;
        self.sends_posted += 1;
        let mut c = lock(&self.shared.dir[self.out_dir()]);
        c.sends.push_back(PSend {
            tag,
            meta: *meta,
            ptr: buf,
            len,
            seq,
        });
        Self::match_dir(&mut c);
        Ok(Some(Request { send: true, seq }))
    }

    unsafe fn irecv(&mut self, tag: u64, buf: *mut u8, len: usize) -> NetResult<Option<Request>> {
        self.progress()?;
        let seq = self.recvs_posted;
        self.recvs_posted += 1;
        let mut c = lock(&self.shared.dir[self.in_dir()]);
        c.recvs.push_back(PRecv {
            tag,
            ptr: buf,
            len,
            seq,
        });
        Self::match_dir(&mut c);
        Ok(Some(Request { send: false, seq }))
    }

    fn progress(&mut self) -> NetResult<bool> {
        if let Some(r) = lock(&self.shared.abort_reason[1 - self.side]).clone() {
            return Err(NetError::PeerAborted(r));
        }
        if self.done_local {
            return Err(NetError::Closed("connection closed locally".into()));
        }
        let mut moved = false;
        // Like a network, the sender never sees the receiver's verdict on its message: a
        // mismatch is reported by the receiver (with the sender's meta), whose layer above
        // then aborts the connection with a reason the sender receives.
        for d in [self.in_dir(), self.out_dir()] {
            let mut c = lock(&self.shared.dir[d]);
            moved |= Self::match_dir(&mut c);
            if d == self.in_dir() {
                if let Some(e) = &c.error {
                    return Err(e.clone());
                }
            }
        }
        match self.peer_state() {
            Some(false) => {
                // An abort sets the reason before it closes: a reason that appeared since the
                // check above explains the close.
                if let Some(r) = lock(&self.shared.abort_reason[1 - self.side]).clone() {
                    return Err(NetError::PeerAborted(r));
                }
                Err(NetError::Lost(format!("{} dropped", self.desc)))
            }
            Some(true) => {
                let pending_recv = lock(&self.shared.dir[self.in_dir()]).recvs.len();
                if pending_recv > 0 {
                    Err(NetError::Closed(format!(
                        "{} closed while a receive was pending",
                        self.desc
                    )))
                } else {
                    Ok(moved)
                }
            }
            None => Ok(moved),
        }
    }

    fn can_peek(&self) -> bool {
        true
    }

    fn peek(&mut self) -> NetResult<Option<Peeked>> {
        self.progress()?;
        let c = lock(&self.shared.dir[self.in_dir()]);
        if !c.recvs.is_empty() {
            return Ok(None);
        }
        Ok(c.sends.front().map(|s| Peeked {
            tag: s.tag,
            len: s.len as u64,
            meta: s.meta,
        }))
    }

    fn test(&mut self, req: Request) -> NetResult<Option<Completion>> {
        if req.send {
            let c = lock(&self.shared.dir[self.out_dir()]);
            if req.seq < c.send_done {
                return Ok(Some(Completion {
                    len: 0,
                    meta: [0; META_LEN],
                }));
            }
            return Ok(None);
        }
        let mut c = lock(&self.shared.dir[self.in_dir()]);
        if req.seq < c.recv_done {
            let meta = c
                .recv_meta
                .iter()
                .find(|(s, _)| *s == req.seq)
                .map(|(_, m)| *m)
                .unwrap_or([0; META_LEN]);
            // Forget metas older than this one (requests are tested roughly in order).
            while c.recv_meta.len() > 1024 {
                c.recv_meta.pop_front();
            }
            return Ok(Some(Completion { len: 0, meta }));
        }
        match &c.error {
            Some(e) => Err(e.clone()),
            None => Ok(None),
        }
    }

    fn pending(&self) -> usize {
        let s = lock(&self.shared.dir[self.out_dir()]).sends.len();
        let r = lock(&self.shared.dir[self.in_dir()]).recvs.len();
        s + r
    }

    fn poll_fds(&self, _out: &mut Vec<PollFd>) {}

    fn abort(&mut self, reason: &str) {
        *lock(&self.shared.abort_reason[self.side]) = Some(reason.to_string());
        self.fail_local(false);
    }

    fn goodbye(&mut self) {
        self.fail_local(true);
    }

    fn peer_desc(&self) -> String {
        self.desc.clone()
    }

    fn bytes(&self) -> (u64, u64) {
        let tx = lock(&self.shared.dir[self.out_dir()]).bytes;
        let rx = lock(&self.shared.dir[self.in_dir()]).bytes;
        (tx, rx)
    }
}

impl MemConn {
    /// Marks this side closed and forgets its posted pointers, so the peer never touches this
    /// side's buffers after it went away.
    fn fail_local(&mut self, clean: bool) {
        if self.done_local {
            return;
        }
        self.done_local = true;
        {
            let mut st = lock(&self.shared.closed[self.side]);
            if st.is_none() {
                *st = Some(clean);
            }
        }
        let mut o = lock(&self.shared.dir[self.out_dir()]);
        o.sends.clear();
        drop(o);
        let mut i = lock(&self.shared.dir[self.in_dir()]);
        i.recvs.clear();
    }
}

impl Drop for MemConn {
    fn drop(&mut self) {
        self.fail_local(false);
    }
}

/// Largest hello a listener takes.
const MAX_HELLO: usize = 4096;
/// How long a listener waits for the hello of a connection it sent a challenge.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections that may wait for their hello at once on one listener.
const MAX_PENDING: usize = 128;

/// A connection request on the fabric: the listener's side of the new connection, where its
/// challenge goes, and where the connector's hello comes from.
struct ConnectReq {
    conn: MemConn,
    challenge: mpsc::Sender<Challenge>,
    hello: mpsc::Receiver<Vec<u8>>,
}

/// A connection that was sent its challenge and whose hello has not arrived.
struct MemPending {
    conn: MemConn,
    hello: mpsc::Receiver<Vec<u8>>,
    challenge: Challenge,
    since: Instant,
}

/// Listener of the in-process transport. Like the tcp listener it sends every connection a
/// fresh challenge first, waits at most the hello deadline for the answer, lets at most
/// `max_pending` connections wait at once, and refuses hellos over 4 KiB.
pub struct MemListener {
    rx: mpsc::Receiver<ConnectReq>,
    id: u64,
    fabric: Arc<MemFabric>,
    pending: Vec<MemPending>,
    hello_timeout: Duration,
    max_pending: usize,
    check: Option<HelloCheck>,
}

impl MemListener {
    /// Takes new connection requests off the fabric and sends each its challenge (or refuses
    /// it when `max_pending` connections already wait).
    fn take_new(&mut self) {
        while let Ok(req) = self.rx.try_recv() {
            let who = req.conn.desc.clone();
            if self.pending.len() >= self.max_pending {
                tracing::warn!(target: "braid::net", "refusing connection from {who}: {} connections already wait for their hello (at most {})", self.pending.len(), self.max_pending);
                continue;
            }
            let challenge = match new_challenge() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(target: "braid::net", "dropping connection from {who}: {e}");
                    continue;
                }
            };
            if req.challenge.send(challenge).is_err() {
                continue; // the connector gave up already
            }
            self.pending.push(MemPending {
                conn: req.conn,
                hello: req.hello,
                challenge,
                since: Instant::now(),
            });
        }
    }
}

impl Listener for MemListener {
    fn accept_challenged(&mut self) -> NetResult<Option<Arrival>> {
        let got = self.scan();
        // New requests after the pending ones were looked at: connections that went away no
        // longer count against the cap.
        self.take_new();
        Ok(got)
    }

    fn set_hello_check(&mut self, check: HelloCheck) {
        self.check = Some(check);
    }

    fn fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

impl MemListener {
    /// Looks at the connections waiting for their hello: returns the first whose hello arrived
    /// and passed the checks; drops those past the deadline or gone.
    fn scan(&mut self) -> Option<Arrival> {
        let now = Instant::now();
        let mut i = 0;
        while i < self.pending.len() {
            match self.pending[i].hello.try_recv() {
                Ok(hello) => {
                    let p = self.pending.swap_remove(i);
                    if hello.len() > MAX_HELLO {
                        tracing::warn!(target: "braid::net", "dropping connection from {}: hello of {} bytes (at most {MAX_HELLO})", p.conn.desc, hello.len());
                        continue;
                    }
                    if let Some(check) = &self.check {
                        if let Err(why) = check(&p.challenge, &hello, None) {
                            tracing::warn!(target: "braid::net", "dropping connection from {}: {why}", p.conn.desc);
                            continue;
                        }
                    }
                    return Some(Arrival {
                        conn: Box::new(p.conn),
                        hello,
                        challenge: p.challenge,
                        peer_pid: None,
                    });
                }
                Err(mpsc::TryRecvError::Empty) => {
                    if now.duration_since(self.pending[i].since) > self.hello_timeout {
                        let p = self.pending.swap_remove(i);
                        tracing::warn!(target: "braid::net", "dropping connection from {}: no hello within {:?}", p.conn.desc, self.hello_timeout);
                    } else {
                        i += 1;
                    }
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    let p = self.pending.swap_remove(i);
                    tracing::warn!(target: "braid::net", "dropping connection from {}: closed before finishing its hello", p.conn.desc);
                }
            }
        }
        None
    }
}

impl Drop for MemListener {
    fn drop(&mut self) {
        lock(&self.fabric.listeners).remove(&self.id);
    }
}

/// The connector's end of a connection request: its side of the connection, where the
/// listener's challenge arrives, and where its hello goes.
pub(crate) struct Opened {
    pub(crate) conn: MemConn,
    pub(crate) challenge: mpsc::Receiver<Challenge>,
    pub(crate) hello: mpsc::Sender<Vec<u8>>,
    pub(crate) listener: u64,
}

impl MemTransport {
    /// A listener with this hello deadline and cap on waiting connections.
    pub(crate) fn listen_with(
        &self,
        hello_timeout: Duration,
        max_pending: usize,
    ) -> (MemListener, ConnectHandle) {
        let id = self.fabric.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        lock(&self.fabric.listeners).insert(id, tx);
        (
            MemListener {
                rx,
                id,
                fabric: self.fabric.clone(),
                pending: Vec::new(),
                hello_timeout,
                max_pending,
                check: None,
            },
            ConnectHandle {
                transport: "mem".into(),
                addr: id.to_le_bytes().to_vec(),
            },
        )
    }

    /// Asks the listener behind `handle` for a connection (it answers with a challenge).
    pub(crate) fn open(&self, handle: &ConnectHandle) -> NetResult<Opened> {
        if handle.transport != "mem" || handle.addr.len() != 8 {
            return Err(NetError::Protocol("not a mem connect handle".into()));
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&handle.addr);
        let id = u64::from_le_bytes(b);
        let k = self.fabric.next.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Shared::default());
        let mine = MemConn {
            shared: shared.clone(),
            side: 0,
            sends_posted: 0,
            recvs_posted: 0,
            desc: format!("mem listener {id}"),
            done_local: false,
        };
        let theirs = MemConn {
            shared,
            side: 1,
            sends_posted: 0,
            recvs_posted: 0,
            desc: format!("mem connector {k}"),
            done_local: false,
        };
        let (ctx, crx) = mpsc::channel();
        let (htx, hrx) = mpsc::channel();
        let tx = lock(&self.fabric.listeners)
            .get(&id)
            .cloned()
            .ok_or_else(|| NetError::Lost(format!("no mem listener {id}")))?;
        tx.send(ConnectReq {
            conn: theirs,
            challenge: ctx,
            hello: hrx,
        })
        .map_err(|_| NetError::Lost(format!("mem listener {id} is gone")))?;
        Ok(Opened {
            conn: mine,
            challenge: crx,
            hello: htx,
            listener: id,
        })
    }
}

impl Transport for MemTransport {
    fn name(&self) -> &'static str {
        "mem"
    }

    fn devices(&self) -> NetResult<Vec<DeviceProps>> {
        Ok(vec![DeviceProps {
            name: "mem".into(),
            speed_mbps: 0,
            latency_us: 0.0,
            ptr_support: PtrSupport {
                host: true,
                cuda: false,
            },
        }])
    }

    fn listen(&self, _dev: usize) -> NetResult<(Box<dyn Listener>, ConnectHandle)> {
        let (l, h) = self.listen_with(HELLO_TIMEOUT, MAX_PENDING);
        Ok((Box::new(l), h))
    }

    fn connect_challenged(
        &self,
        handle: &ConnectHandle,
        hello: HelloFn<'_>,
        deadline: Instant,
    ) -> NetResult<Box<dyn Conn>> {
        // A listener that refuses the connection before its challenge (too many connections
        // waiting there) is asked again until the deadline.
        let (o, challenge) = loop {
            let o = self.open(handle)?;
            let left = deadline.saturating_duration_since(Instant::now());
            match o.challenge.recv_timeout(left) {
                Ok(c) => break (o, c),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(NetError::Timeout(format!(
                        "waiting for the challenge of mem listener {}",
                        o.listener
                    )))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(NetError::Lost(format!(
                            "mem listener {} refused the connection",
                            o.listener
                        )));
                    }
                    std::thread::sleep(left.min(Duration::from_millis(1)));
                }
            }
        };
        let id = o.listener;
        let body = hello(&challenge);
        if body.len() > MAX_HELLO {
            return Err(NetError::Protocol("hello larger than 4 KiB".into()));
        }
        o.hello
            .send(body)
            .map_err(|_| NetError::Lost(format!("mem listener {id} dropped the connection")))?;
        Ok(Box::new(o.conn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance as conf;

    fn pair(t: &MemTransport) -> (Box<dyn Conn>, Box<dyn Conn>) {
        let (mut l, h) = t.listen(0).unwrap();
        let t2 = t.clone();
        let th = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            t2.connect_challenged(&h, &|_| b"hi".to_vec(), deadline)
                .unwrap()
        });
        let a = loop {
            if let Some(a) = l.accept_challenged().unwrap() {
                break a;
            }
            std::thread::yield_now();
        };
        assert_eq!(a.hello, b"hi");
        (a.conn, th.join().unwrap())
    }

    #[test]
    fn send_recv_and_mismatch() {
        let t = MemTransport::new(MemFabric::new());
        let (mut b, mut a) = pair(&t);
        let src = [1u8, 2, 3, 4];
        let mut dst = [0u8; 4];
        let meta = [7u8; META_LEN];
        // SAFETY: buffers outlive the requests.
        let s = unsafe { a.isend(3, &meta, src.as_ptr(), 4) }
            .unwrap()
            .unwrap();
        // SAFETY: as above.
        let r = unsafe { b.irecv(3, dst.as_mut_ptr(), 4) }.unwrap().unwrap();
        assert!(a.test(s).unwrap().is_some());
        assert_eq!(b.test(r).unwrap().unwrap().meta, meta);
        assert_eq!(dst, src);
        // SAFETY: as above.
        unsafe { a.isend(4, &meta, src.as_ptr(), 4) }.unwrap();
        // SAFETY: as above.
        unsafe { b.irecv(4, dst.as_mut_ptr(), 2) }.unwrap();
        assert!(matches!(b.progress(), Err(NetError::Mismatch { .. })));
        drop(a);
        assert!(b.progress().is_err());
    }

    #[test]
    fn conformance() {
        let t = MemTransport::new(MemFabric::new());
        let mk = || pair(&t);
        conf::exchange(&mk, conf::SIZES);
        conf::both_directions_at_once(&mk);
        conf::mismatch_is_reported_with_meta(&mk);
        conf::peek_shows_the_next_header(&mk);
        // Not death_goodbye_and_abort: a mem connection forgets the sends still posted when it
        // closes (it holds no copies), so data sent just before a goodbye may not arrive.
    }

    /// A connection request made by hand.
    struct RawMem {
        o: Opened,
        challenge: Option<Challenge>,
    }

    impl conf::RawPeer for RawMem {
        fn challenge(&self) -> Option<Challenge> {
            self.challenge
        }

        fn dropped(&mut self, within: Duration) -> bool {
            let end = Instant::now() + within;
            while Instant::now() < end {
                if self.o.conn.progress().is_err() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            false
        }
    }

    #[test]
    fn challenge_response() {
        let t = MemTransport::new(MemFabric::new());
        let t2 = t.clone();
        let listen = move |timeout: Duration, cap: usize| {
            let (l, h) = t2.listen_with(timeout, cap);
            (Box::new(l) as Box<dyn Listener>, h)
        };
        let t3 = t.clone();
        let raw = move |h: &ConnectHandle, declared: Option<usize>| {
            let o = t3.open(h).unwrap();
            let challenge = o.challenge.recv_timeout(Duration::from_secs(10)).ok();
            if let (Some(_), Some(n)) = (challenge, declared) {
                let _ = o.hello.send(vec![0u8; n.min(MAX_HELLO + 1)]);
            }
            Box::new(RawMem { o, challenge }) as Box<dyn conf::RawPeer>
        };
        conf::challenges(&conf::Kit {
            transport: &t,
            listen: &listen,
            raw: &raw,
        });
    }
}
