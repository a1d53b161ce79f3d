//! The conformance suite every byte transport must pass (tests only): ordered tagged messages
//! of any size, both directions at once, mismatches reported with the sender's meta, and the
//! ways a connection ends (death, goodbye, abort). Each transport's tests call these with a
//! function that makes a connected pair.

use std::time::{Duration, Instant};

use crate::{Completion, Conn, NetError, NetResult, Request, META_LEN};

/// Makes a connected pair (first = accepted side, second = connecting side).
pub type MakePair<'a> = &'a dyn Fn() -> (Box<dyn Conn>, Box<dyn Conn>);

/// Drives `c` until `r` completes, blocking in poll like the executor does.
pub fn wait(c: &mut dyn Conn, r: Request) -> NetResult<Completion> {
    let end = Instant::now() + Duration::from_secs(20);
    let mut fds = Vec::new();
    let mut scratch = Vec::new();
    loop {
        let moved = c.progress()?;
        if let Some(x) = c.test(r)? {
            return Ok(x);
        }
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
