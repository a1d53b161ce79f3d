//! The conformance suite every byte transport must pass (tests only): ordered tagged messages
//! of any size, both directions at once, mismatches reported with the sender's meta, and the
//! ways a connection ends (death, goodbye, abort); and the listener's challenge–response
//! handshake (fresh challenge per connection, bounded hello, hello deadline, cap on waiting
//! connections, hello check). Each transport's tests call these with a function that makes a
//! connected pair, or with a [`Kit`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{
    Arrival, Challenge, Completion, Conn, ConnectHandle, Listener, NetError, NetResult, Peeked,
    Request, Transport, CHALLENGE_LEN, META_LEN,
};

/// Makes a connected pair (first = accepted side, second = connecting side).
pub type MakePair<'a> = &'a dyn Fn() -> (Box<dyn Conn>, Box<dyn Conn>);

/// Drives `c` until `r` completes, blocking in poll like the executor does.
pub fn wait(c: &mut dyn Conn, r: Request) -> NetResult<Completion> {
    let end = Instant::now() + Duration::from_secs(20);
    let mut fds = Vec::new();
    let mut scratch = Vec::new();
    loop {
        // A connection error matters only to a request that did not complete: the last
        // message of a peer that then died has been delivered.
        let progressed = c.progress();
        if let Some(x) = c.test(r)? {
            return Ok(x);
        }
        let moved = progressed?;
        if !moved {
            fds.clear();
            c.poll_fds(&mut fds);
            if fds.is_empty() {
                std::thread::yield_now();
            } else {
                crate::wait_fds(&fds, Duration::from_millis(100), &mut scratch)?;
            }
        }
        assert!(Instant::now() < end, "timeout");
    }
}

/// Sizes every transport must carry.
pub const SIZES: &[usize] = &[0, 1, 63, 64, 65, 4096, 100_000, 3 << 20, 7];

/// Sends messages of `sizes` one way, all posted before any is waited for; checks data, meta
/// and byte counters.
pub fn exchange(pair: MakePair, sizes: &[usize]) {
    let (mut a, mut b) = pair();
    let bufs: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&n| (0..n).map(|i| (i * 7 + n) as u8).collect())
        .collect();
    let mut outs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
    let mut meta = [0u8; META_LEN];
    meta[0] = 42;
    let mut sreqs = vec![];
    let mut rreqs = vec![];
    for (k, buf) in bufs.iter().enumerate() {
        // SAFETY: test buffers outlive the requests (waited below).
        let r = unsafe { a.isend(k as u64, &meta, buf.as_ptr(), buf.len()) };
        sreqs.push(r.unwrap().unwrap());
    }
    for (k, out) in outs.iter_mut().enumerate() {
        // SAFETY: as above.
        let r = unsafe { b.irecv(k as u64, out.as_mut_ptr(), out.len()) };
        rreqs.push(r.unwrap().unwrap());
    }
    let th = std::thread::spawn(move || {
        for r in sreqs {
            wait(a.as_mut(), r).unwrap();
        }
        a
    });
    for r in rreqs {
        let c = wait(b.as_mut(), r).unwrap();
        assert_eq!(c.meta[0], 42);
    }
    let a = th.join().unwrap();
    assert_eq!(outs, bufs);
    let total: usize = sizes.iter().sum();
    assert_eq!(a.bytes().0, total as u64);
    assert_eq!(b.bytes().1, total as u64);
}

/// 1 MiB each way at the same time on one connection.
pub fn both_directions_at_once(pair: MakePair) {
    let (mut a, mut b) = pair();
    let n = 1 << 20;
    let th = std::thread::spawn(move || {
        let src: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; n];
        // SAFETY: buffers outlive the requests (waited below).
        let s = unsafe { a.isend(1, &[1; META_LEN], src.as_ptr(), n) };
        // SAFETY: as above.
        let r = unsafe { a.irecv(2, dst.as_mut_ptr(), n) };
        let (s, r) = (s.unwrap().unwrap(), r.unwrap().unwrap());
        wait(a.as_mut(), s).unwrap();
        wait(a.as_mut(), r).unwrap();
        assert!(dst.iter().enumerate().all(|(i, &x)| x == (i % 241) as u8));
        // Kept open until the other side has its message too: dropping it now is a death
        // without goodbye, which the other side may see before it drains the data.
        a
    });
    let src: Vec<u8> = (0..n).map(|i| (i % 241) as u8).collect();
    let mut dst = vec![0u8; n];
    // SAFETY: as above.
    let s = unsafe { b.isend(2, &[2; META_LEN], src.as_ptr(), n) };
    // SAFETY: as above.
    let r = unsafe { b.irecv(1, dst.as_mut_ptr(), n) };
    let (s, r) = (s.unwrap().unwrap(), r.unwrap().unwrap());
    wait(b.as_mut(), s).unwrap();
    assert_eq!(wait(b.as_mut(), r).unwrap().meta, [1; META_LEN]);
    drop(th.join().unwrap());
    assert!(dst.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));
}

/// Peeks at `c` until a header shows, blocking in poll between looks.
fn peek_wait(c: &mut dyn Conn) -> Peeked {
    let end = Instant::now() + Duration::from_secs(20);
    let (mut fds, mut scratch) = (Vec::new(), Vec::new());
    loop {
        if let Some(p) = c.peek().unwrap() {
            return p;
        }
        fds.clear();
        c.poll_fds(&mut fds);
        if fds.is_empty() {
            std::thread::yield_now();
        } else {
            crate::wait_fds(&fds, Duration::from_millis(100), &mut scratch).unwrap();
        }
        assert!(Instant::now() < end, "timeout");
    }
}

/// [`Conn::peek`] shows the next message's tag, length and meta without taking it; receives
/// then take the messages in order, a small one and one large enough for any single-copy path.
pub fn peek_shows_the_next_header(pair: MakePair) {
    let (mut a, mut b) = pair();
    assert!(b.can_peek());
    assert_eq!(b.peek().unwrap(), None);
    let x = [3u8; 5];
    let y: Vec<u8> = (0..3usize << 20).map(|i| (i % 253) as u8).collect();
    let (m1, m2) = ([1u8; META_LEN], [2u8; META_LEN]);
    let th = std::thread::spawn(move || {
        // SAFETY: the buffers live until the requests complete (waited below).
        let s1 = unsafe { a.isend(7, &m1, x.as_ptr(), x.len()) }
            .unwrap()
            .unwrap();
        // SAFETY: as above.
        let s2 = unsafe { a.isend(9, &m2, y.as_ptr(), y.len()) }
            .unwrap()
            .unwrap();
        wait(a.as_mut(), s1).unwrap();
        wait(a.as_mut(), s2).unwrap();
        (a, y)
    });
    let first = peek_wait(b.as_mut());
    assert_eq!((first.tag, first.len, first.meta), (7, 5, m1));
    assert_eq!(b.peek().unwrap(), Some(first), "peek took the message");
    let mut out = [0u8; 5];
    // SAFETY: `out` outlives the request (waited below).
    let r = unsafe { b.irecv(7, out.as_mut_ptr(), 5) }.unwrap().unwrap();
    assert_eq!(wait(b.as_mut(), r).unwrap().meta, m1);
    assert_eq!(out, [3u8; 5]);
    let second = peek_wait(b.as_mut());
    assert_eq!((second.tag, second.len, second.meta), (9, 3 << 20, m2));
    let mut big = vec![0u8; 3 << 20];
    // SAFETY: as above.
    let r = unsafe { b.irecv(9, big.as_mut_ptr(), big.len()) }
        .unwrap()
        .unwrap();
    wait(b.as_mut(), r).unwrap();
    let (a, y) = th.join().unwrap();
    assert!(big == y);
    assert_eq!(b.peek().unwrap(), None);
    drop(a);
}

/// A receive of another length reports the sender's meta and both lengths.
pub fn mismatch_is_reported_with_meta(pair: MakePair) {
    let (mut a, mut b) = pair();
    let buf = [1u8; 16];
    let mut out = [0u8; 8];
    let meta = [9u8; META_LEN];
    // SAFETY: buffers outlive the requests.
    unsafe { a.isend(5, &meta, buf.as_ptr(), 16) }.unwrap();
    std::thread::sleep(Duration::from_millis(20));
    // SAFETY: as above.
    let e = match unsafe { b.irecv(5, out.as_mut_ptr(), 8) } {
        Ok(Some(r)) => wait(b.as_mut(), r).unwrap_err(),
        Ok(None) => panic!("backpressure"),
        Err(e) => e,
    };
    match e {
        NetError::Mismatch {
            expected_len,
            got_len,
            meta,
            ..
        } => {
            assert_eq!((expected_len, got_len), (8, 16));
            assert_eq!(meta, [9u8; META_LEN]);
        }
        other => panic!("{other}"),
    }
}

/// Death (drop without goodbye) → `Lost`; goodbye → idle fine, a pending receive `Closed`,
/// data sent before it still delivered; abort → the reason reaches a peer blocked in poll.
pub fn death_goodbye_and_abort(pair: MakePair) {
    let (a, mut b) = pair();
    let mut out = [0u8; 8];
    // SAFETY: out outlives the request (waited below).
    let r = unsafe { b.irecv(1, out.as_mut_ptr(), 8) }.unwrap().unwrap();
    drop(a);
    assert!(matches!(wait(b.as_mut(), r), Err(NetError::Lost(_))));

    let (mut a, mut b) = pair();
    a.goodbye();
    drop(a);
    std::thread::sleep(Duration::from_millis(50));
    assert!(b.progress().is_ok());
    // SAFETY: as above.
    let r = unsafe { b.irecv(1, out.as_mut_ptr(), 8) };
    let res = match r {
        Ok(Some(r)) => wait(b.as_mut(), r).map(|_| ()),
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    assert!(matches!(res, Err(NetError::Closed(_))), "{res:?}");

    let (mut a, mut b) = pair();
    let src = [5u8; 8];
    // SAFETY: src outlives the request (goodbye flushes it).
    unsafe { a.isend(3, &[0; META_LEN], src.as_ptr(), 8) }.unwrap();
    a.goodbye();
    drop(a);
    // SAFETY: as above.
    let r = unsafe { b.irecv(3, out.as_mut_ptr(), 8) }.unwrap().unwrap();
    wait(b.as_mut(), r).unwrap();
    assert_eq!(out, src);

    let (mut a, mut b) = pair();
    // SAFETY: as above.
    let r = unsafe { b.irecv(1, out.as_mut_ptr(), 8) }.unwrap().unwrap();
    let th = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        a.abort("rank 3 lost");
        a
    });
    let e = wait(b.as_mut(), r).unwrap_err();
    assert!(
        matches!(&e, NetError::PeerAborted(r) if r == "rank 3 lost"),
        "{e}"
    );
    th.join().unwrap();
}

/// A message whose send completed before its sender died (no goodbye) is still received,
/// also when the receive is posted after the death: a completed send has been delivered (as
/// tcp's kernel buffers, shm's rings and RC's acknowledgements make it). The death is
/// reported to the receive after it.
pub fn delivered_before_death_is_received(pair: MakePair) {
    let (mut a, mut b) = pair();
    let src: Vec<u8> = (0..200u8).collect();
    // SAFETY: src outlives the request (waited below).
    let s = unsafe { a.isend(4, &[6; META_LEN], src.as_ptr(), src.len()) }
        .unwrap()
        .unwrap();
    wait(a.as_mut(), s).unwrap();
    drop(a);
    std::thread::sleep(Duration::from_millis(100));
    if b.can_peek() {
        let p = peek_wait(b.as_mut());
        assert_eq!((p.tag, p.len, p.meta), (4, 200, [6; META_LEN]));
    }
    let mut out = vec![0u8; 200];
    // SAFETY: out outlives the request (waited below).
    let r = unsafe { b.irecv(4, out.as_mut_ptr(), 200) }
        .unwrap()
        .unwrap();
    assert_eq!(wait(b.as_mut(), r).unwrap().meta, [6; META_LEN]);
    assert_eq!(out, src);
    // SAFETY: as above.
    let res = match unsafe { b.irecv(5, out.as_mut_ptr(), 8) } {
        Ok(Some(r)) => wait(b.as_mut(), r).map(|_| ()),
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    assert!(matches!(res, Err(NetError::Lost(_))), "{res:?}");
}

/// A peer that speaks a transport's connection handshake by hand (tests of the listener).
pub trait RawPeer: Send {
    /// The challenge the listener sent first (`None`: it closed the connection instead).
    fn challenge(&self) -> Option<Challenge>;
    /// Whether the listener closed this connection within `within`.
    fn dropped(&mut self, within: Duration) -> bool;
}

/// Makes a listener with a hello deadline and a cap on connections waiting for their hello.
pub type ListenFn<'a> = &'a dyn Fn(Duration, usize) -> (Box<dyn Listener>, ConnectHandle);

/// Opens a raw connection to a listener (see [`Kit::raw`]).
pub type RawFn<'a> = &'a (dyn Fn(&ConnectHandle, Option<usize>) -> Box<dyn RawPeer> + Sync);

/// What the challenge–response tests need from a transport.
pub struct Kit<'a> {
    /// The transport (its `connect_challenged` is used).
    pub transport: &'a dyn Transport,
    /// A listener with this hello deadline and cap on connections waiting for their hello.
    pub listen: ListenFn<'a>,
    /// Opens a connection by hand and reads the challenge (waiting at most 10 s); then, with
    /// `Some(n)`, sends a hello declaring `n` bytes (where the wire states a length, only the
    /// length; else `min(n, 4097)` bytes), with `None` nothing.
    pub raw: RawFn<'a>,
}

/// A listener polled by a thread of its own, as the acceptor threads above do.
struct Polled {
    got: Arc<Mutex<Vec<Arrival>>>,
    stop: Arc<AtomicBool>,
    th: Option<std::thread::JoinHandle<()>>,
}

impl Polled {
    fn start(mut l: Box<dyn Listener>) -> Polled {
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, st) = (got.clone(), stop.clone());
        let th = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match l.accept_challenged() {
                    Ok(Some(a)) => g.lock().unwrap().push(a),
                    Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        Polled {
            got,
            stop,
            th: Some(th),
        }
    }

    /// The next arrival, waiting at most `within`.
    fn next(&self, within: Duration) -> Option<Arrival> {
        let end = Instant::now() + within;
        loop {
            {
                let mut g = self.got.lock().unwrap();
                if !g.is_empty() {
                    return Some(g.remove(0));
                }
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }
}

impl Drop for Polled {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.th.take() {
            let _ = t.join();
        }
    }
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// One small message from `a` to `b`.
fn ping(a: &mut dyn Conn, b: &mut dyn Conn) {
    let src = [3u8, 1, 4, 1, 5];
    let mut dst = [0u8; 5];
    // SAFETY: both buffers outlive the requests (waited below).
    let s = unsafe { a.isend(9, &[0; META_LEN], src.as_ptr(), 5) }
        .unwrap()
        .unwrap();
    // SAFETY: as above.
    let r = unsafe { b.irecv(9, dst.as_mut_ptr(), 5) }.unwrap().unwrap();
    wait(b, r).unwrap();
    wait(a, s).unwrap();
    assert_eq!(dst, src);
}

/// Connects with a hello that echoes the challenge (plus `tag`), returns the connection and
/// the challenge the connector was given.
fn connect_echo(k: &Kit, h: &ConnectHandle, tag: u8) -> NetResult<(Box<dyn Conn>, Challenge)> {
    let seen: Mutex<Option<Challenge>> = Mutex::new(None);
    let c = k.transport.connect_challenged(
        h,
        &|ch| {
            *seen.lock().unwrap() = Some(*ch);
            let mut v = ch.to_vec();
            v.push(tag);
            v
        },
        deadline(),
    )?;
    let ch = seen
        .lock()
        .unwrap()
        .expect("the hello was built without a challenge");
    Ok((c, ch))
}

/// The connector gets the listener's challenge before it sends its hello; the challenge is
/// fresh (random, never repeated) on every connection; the arrival carries it with the hello;
/// the connection works after the handshake.
pub fn challenge_fresh_per_connection(k: &Kit) {
    let (l, h) = (k.listen)(Duration::from_secs(10), 128);
    let acc = Polled::start(l);
    let mut seen: Vec<Challenge> = Vec::new();
    for tag in 0..4u8 {
        let (mut c, ch) = connect_echo(k, &h, tag).unwrap();
        let mut a = acc.next(Duration::from_secs(10)).expect("no arrival");
        assert_eq!(a.challenge, ch, "the connector saw another challenge");
        assert_eq!(&a.hello[..CHALLENGE_LEN], &ch[..]);
        assert_eq!(a.hello[CHALLENGE_LEN..], [tag]);
        assert_ne!(ch, [0u8; CHALLENGE_LEN], "a zero challenge");
        assert!(
            !seen.contains(&ch),
            "challenge repeated on a new connection"
        );
        seen.push(ch);
        ping(c.as_mut(), a.conn.as_mut());
        ping(a.conn.as_mut(), c.as_mut());
    }
}

/// A hello longer than 4 KiB is refused: by the connector, and by the listener as soon as the
/// length is known (long before its hello deadline), without the connection ever arriving.
pub fn long_hello_refused(k: &Kit) {
    let (l, h) = (k.listen)(Duration::from_secs(120), 128);
    let acc = Polled::start(l);
    let big = vec![7u8; 4097];
    assert!(k
        .transport
        .connect_challenged(&h, &|_| big.clone(), deadline())
        .is_err());
    for n in [4097, u32::MAX as usize] {
        let mut raw = (k.raw)(&h, Some(n));
        assert!(raw.challenge().is_some(), "no challenge");
        assert!(
            raw.dropped(Duration::from_secs(30)),
            "a hello declaring {n} bytes was not refused"
        );
    }
    assert_eq!(acc.count(), 0, "an oversized hello arrived");
    let (mut c, _) = connect_echo(k, &h, 1).unwrap();
    let mut a = acc.next(Duration::from_secs(10)).expect("no arrival");
    ping(c.as_mut(), a.conn.as_mut());
}

/// At most `cap` connections wait for their hello: one more is closed before it gets a
/// challenge; once the waiting ones go away a real connection gets through.
pub fn pending_cap(k: &Kit) {
    let (l, h) = (k.listen)(Duration::from_secs(120), 3);
    let acc = Polled::start(l);
    let silent: Vec<Box<dyn RawPeer>> = (0..3).map(|_| (k.raw)(&h, None)).collect();
    for s in &silent {
        assert!(
            s.challenge().is_some(),
            "a connection under the cap got no challenge"
        );
    }
    let mut over = (k.raw)(&h, None);
    assert!(
        over.challenge().is_none(),
        "a 4th connection got a challenge (cap 3)"
    );
    assert!(over.dropped(Duration::from_secs(10)));
    drop(silent);
    let (mut c, _) = connect_echo(k, &h, 2).unwrap();
    let mut a = acc.next(Duration::from_secs(10)).expect("no arrival");
    ping(c.as_mut(), a.conn.as_mut());
}

/// A connection that takes its challenge and stays silent is dropped at the hello deadline;
/// one that sends a hello that fails the listener's check is dropped at once; others arrive.
pub fn hello_deadline_and_check(k: &Kit) {
    let (mut l, h) = (k.listen)(Duration::from_millis(300), 128);
    l.set_hello_check(Box::new(|ch: &Challenge, hello: &[u8], _pid| {
        if hello.len() == CHALLENGE_LEN + 1 && hello[..CHALLENGE_LEN] == ch[..] {
            Ok(())
        } else {
            Err("does not answer the challenge".into())
        }
    }));
    let acc = Polled::start(l);
    let mut silent = (k.raw)(&h, None);
    assert!(silent.challenge().is_some());
    assert!(
        silent.dropped(Duration::from_secs(30)),
        "a silent connection outlived the hello deadline"
    );
    // A hello that does not answer the challenge (a replay of another one) fails the check.
    let replayed = [0x5au8; CHALLENGE_LEN + 1];
    let mut c = k
        .transport
        .connect_challenged(&h, &|_| replayed.to_vec(), deadline())
        .unwrap();
    let (mut good, _) = connect_echo(k, &h, 3).unwrap();
    let mut a = acc.next(Duration::from_secs(10)).expect("no arrival");
    assert_eq!(a.hello[CHALLENGE_LEN..], [3], "the replayed hello arrived");
    ping(good.as_mut(), a.conn.as_mut());
    // The refused connection was closed by the listener.
    let end = Instant::now() + Duration::from_secs(10);
    while c.progress().is_ok() {
        assert!(Instant::now() < end, "the refused connection stayed open");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(acc.count(), 0);
}

/// Every challenge–response test.
pub fn challenges(k: &Kit) {
    challenge_fresh_per_connection(k);
    long_hello_refused(k);
    pending_cap(k);
    hello_deadline_and_check(k);
}
