//! The staging pipeline on the host copy engine ([`HostCopy`]): every collective kind and
//! point-to-point against closed-form results, many sizes around the chunk (64-byte chunks, so
//! many chunks run), in place, stream order, errors and drop. Ranks are threads over the
//! in-process transport; each stager gets a private `split` of its rank's communicator, as the
//! engine does. Every wait has a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use super::host::{Flag, HostCopy, Mem};
use super::plan::coll_lens;
use super::*;
use crate::coll::CollKind;
use crate::membership::Coordinator;
use crate::transport::mem::MemFabric;
use crate::types::{DataType, ReduceOp};
use crate::Config;

const LIMIT: Duration = Duration::from_secs(30);
const CHUNK: usize = 64;

fn cfg(addr: &str, n: usize, r: usize, timeout: Duration) -> Config {
    Config {
        coordinator: Some(addr.to_string()),
        world_size: Some(n),
        rank: Some(r),
        timeout,
        init_timeout: Duration::from_secs(30),
        slice_bytes: 4096,
        ..Config::default()
    }
}

/// Runs `f(rank, stager, engine)` on `n` in-process ranks, each with a stager on a private
/// split of its communicator (chunk `chunk`, copies delayed by `slow`).
fn with_stagers(
    n: usize,
    chunk: usize,
    slow: Duration,
    timeout: Duration,
    f: impl Fn(usize, Stager, Arc<HostCopy>) + Send + Sync,
) {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let fabric = MemFabric::new();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (addr, fabric, f) = (addr.clone(), fabric.clone(), &f);
                s.spawn(move || {
                    let c =
                        Communicator::init_in_process(cfg(&addr, n, r, timeout), fabric).unwrap();
                    let sub = c.split(Some(0), r as i64).unwrap().unwrap();
                    let copy = HostCopy::new(slow);
                    let st = Stager::new(sub, copy.clone(), chunk).unwrap();
                    f(r, st, copy);
                })
            })
            .collect();
        for h in hs {
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p);
            }
        }
    });
}

/// Input element `e` of rank `r` (exact in every dtype used).
fn x(r: usize, e: usize) -> f64 {
    (r * 1009 + e * 3 + 1) as f64
}

fn encode(dtype: DataType, v: &[f64]) -> Vec<u8> {
    match dtype {
        DataType::F64 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DataType::I32 => v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect(),
        d => panic!("{d:?}"),
    }
}

fn decode(dtype: DataType, b: &[u8]) -> Vec<f64> {
    match dtype {
        DataType::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        DataType::I32 => b
            .chunks_exact(4)
            .map(|c| f64::from(i32::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        d => panic!("{d:?}"),
    }
}

const SENTINEL: f64 = -7.0;

/// Elements per chunk the plan uses for `kind` (the sizes tested sit around it).
fn per_chunk(kind: CollKind, n: usize, es: usize) -> usize {
    let fp = match kind {
        CollKind::AllGather | CollKind::ReduceScatter => n,
        CollKind::AllToAll => 2 * n,
        CollKind::Gather | CollKind::Scatter => n + 1,
        _ => 1,
    };
    (CHUNK / (fp * es)).max(1)
}

fn counts(kind: CollKind, n: usize, es: usize) -> Vec<usize> {
    if kind == CollKind::Barrier {
        return vec![0];
    }
    let m = per_chunk(kind, n, es);
    let mut v = vec![0, 1, m - 1, m, m + 1, 5 * m + 3, 37];
    v.sort_unstable();
    v.dedup();
    v
}

/// One staged collective and what its buffers must hold once its stream has run.
struct Case {
    what: String,
    dtype: DataType,
    bufs: Vec<(Mem, Vec<f64>)>,
}

/// Builds buffers for one call on rank `r`, enqueues it, returns the expected contents.
#[allow(clippy::too_many_arguments)]
fn stage_coll(
    st: &Stager,
    s: Stream,
    kind: CollKind,
    dtype: DataType,
    count: usize,
    root: usize,
    in_place: bool,
    n: usize,
    r: usize,
) -> Case {
    let es = dtype.size();
    let c = RawColl {
        kind,
        dtype,
        op: ReduceOp::Sum,
        count,
        root,
    };
    let (sl, rl) = coll_lens(&c, n, r).unwrap();
    let (sn, rn) = (sl / es, rl / es);
    let cnt = count;
    let sum = |e: usize| (0..n).map(|q| x(q, e)).sum::<f64>();
    // Expected receive buffer (out of place) and input.
    let input: Vec<f64> = (0..sn).map(|e| x(r, e)).collect();
    let expect: Vec<f64> = (0..rn)
        .map(|i| match kind {
            CollKind::AllReduce => sum(i),
            CollKind::Broadcast => x(root, i),
            CollKind::Reduce => sum(i),
            CollKind::AllGather | CollKind::Gather => x(i / cnt, i % cnt),
            CollKind::ReduceScatter => sum(r * cnt + i),
            CollKind::AllToAll => x(i / cnt, r * cnt + i % cnt),
            CollKind::Scatter => x(root, r * cnt + i),
            _ => unreachable!(),
        })
        .collect();
    let what = format!(
        "{} {dtype:?} count {count} root {root} in_place {in_place} rank {r}/{n}",
        kind.name()
    );
    let mem = |len: usize, v: &[f64]| {
        let m = Mem::new(len * es);
        m.write(0, &encode(dtype, v));
        m
    };
    let addr = |m: &Mem| if m.len() == 0 { 0 } else { m.addr() };
    let mut bufs = Vec::new();
    if !in_place {
        let sm = mem(sn, &input);
        let rm = mem(rn, &vec![SENTINEL; rn]);
        // SAFETY: both buffers are kept (in the case) until the stream has run.
        unsafe { st.coll(c, addr(&sm), addr(&rm), s).unwrap() };
        bufs.push((sm, input));
        bufs.push((rm, expect));
        return Case { what, dtype, bufs };
    }
    // In place (nccl.h's rules); one buffer.
    let blk = cnt * es;
    let (buf, send, recv, after): (Mem, u64, u64, Vec<f64>) = match kind {
        CollKind::AllReduce | CollKind::Broadcast | CollKind::Reduce => {
            let init = if kind == CollKind::Broadcast && r != root {
                vec![SENTINEL; cnt]
            } else {
                input.clone()
            };
            let m = mem(cnt, &init);
            let a = addr(&m);
            let after = if kind == CollKind::Reduce && r != root {
                init
            } else {
                expect.clone()
            };
            (m, a, a, after)
        }
        CollKind::AllGather => {
            let mut init = vec![SENTINEL; n * cnt];
            init[r * cnt..(r + 1) * cnt].copy_from_slice(&input);
            let m = mem(n * cnt, &init);
            let a = addr(&m);
            (m, a + (r * blk) as u64, a, expect.clone())
        }
        CollKind::ReduceScatter => {
            let m = mem(n * cnt, &input);
            let a = addr(&m);
            let mut after = input.clone();
            after[r * cnt..(r + 1) * cnt].copy_from_slice(&expect);
            (m, a, a + (r * blk) as u64, after)
        }
        CollKind::AllToAll => {
            let m = mem(n * cnt, &input);
            let a = addr(&m);
            (m, a, a, expect.clone())
        }
        _ => unreachable!(),
    };
    // SAFETY: the buffer is kept (in the case) until the stream has run.
    unsafe { st.coll(c, send, recv, s).unwrap() };
    bufs.push((buf, after));
    Case { what, dtype, bufs }
}

fn check(case: &Case) {
    for (i, (m, want)) in case.bufs.iter().enumerate() {
        let got = decode(case.dtype, &m.read());
        assert_eq!(&got, want, "{} (buffer {i})", case.what);
    }
}

fn all_collectives(n: usize, root: usize, slow: Duration) {
    with_stagers(n, CHUNK, slow, LIMIT, |r, st, copy| {
        let s = copy.stream();
        for kind in [
            CollKind::AllReduce,
            CollKind::Broadcast,
            CollKind::Reduce,
            CollKind::AllGather,
            CollKind::ReduceScatter,
            CollKind::AllToAll,
            CollKind::Gather,
            CollKind::Scatter,
            CollKind::Barrier,
        ] {
            for dtype in [DataType::F64, DataType::I32] {
                // Every call of a kind is queued back to back, then the stream is synced once:
                // the queue and the ring run many jobs in a row.
                let mut cases = Vec::new();
                for count in counts(kind, n, dtype.size()) {
                    let places: &[bool] = match kind {
                        CollKind::Gather | CollKind::Scatter | CollKind::Barrier => &[false],
                        _ => &[false, true],
                    };
                    for &in_place in places {
                        cases.push(stage_coll(&st, s, kind, dtype, count, root, in_place, n, r));
                    }
                }
                assert!(copy.sync(s, LIMIT), "{} did not finish", kind.name());
                assert_eq!(st.error(), None);
                for c in &cases {
                    check(c);
                }
            }
        }
        // Every hold was released (the stream went on after each job).
        assert_eq!(
            copy.holds.load(Ordering::SeqCst),
            copy.releases.load(Ordering::SeqCst)
        );
    });
}

#[test]
fn every_collective_on_three_ranks() {
    all_collectives(3, 1, Duration::from_micros(20));
}

#[test]
fn every_collective_on_two_ranks_and_one() {
    all_collectives(2, 1, Duration::ZERO);
    all_collectives(1, 0, Duration::ZERO);
}

#[test]
fn point_to_point_groups() {
    let n = 3;
    with_stagers(n, CHUNK, Duration::from_micros(10), LIMIT, |r, st, copy| {
        let s = copy.stream();
        let next = (r + 1) % n;
        let prev = (r + n - 1) % n;
        // Per group: `a` f64 to the next rank (tag 7), `b` i32 to the one after (tag 9), and
        // the matching receives; zero counts, one element, around the chunk (8 f64, 16 i32),
        // many chunks.
        let mut keep = Vec::new();
        for (a, b) in [(0, 5), (1, 0), (7, 15), (8, 16), (9, 17), (43, 100), (0, 0)] {
            let sa = Mem::new(a * 8);
            sa.write(
                0,
                &encode(DataType::F64, &(0..a).map(|e| x(r, e)).collect::<Vec<_>>()),
            );
            let ra = Mem::new(a * 8);
            let sb = Mem::new(b * 4);
            let vb: Vec<f64> = (0..b).map(|e| x(r, 5000 + e)).collect();
            sb.write(0, &encode(DataType::I32, &vb));
            let rb = Mem::new(b * 4);
            let p = |send: bool, m: &Mem, count: usize, dtype: DataType, peer: usize, tag: u64| {
                DeviceP2p {
                    send,
                    buf: m.addr(),
                    count,
                    dtype,
                    peer,
                    tag,
                }
            };
            let ops = [
                p(true, &sa, a, DataType::F64, next, 7),
                p(false, &ra, a, DataType::F64, prev, 7),
                p(true, &sb, b, DataType::I32, (r + 2) % n, 9),
                p(false, &rb, b, DataType::I32, (r + n - 2) % n, 9),
            ];
            // SAFETY: the buffers are kept until the stream has run.
            unsafe { st.p2p(&ops, s).unwrap() };
            keep.push((a, b, sa, ra, sb, rb));
        }
        assert!(copy.sync(s, LIMIT));
        assert_eq!(st.error(), None);
        for (a, b, _sa, ra, _sb, rb) in &keep {
            let want_a: Vec<f64> = (0..*a).map(|e| x(prev, e)).collect();
            assert_eq!(decode(DataType::F64, &ra.read()), want_a, "a={a} rank {r}");
            let from = (r + n - 2) % n;
            let want_b: Vec<f64> = (0..*b).map(|e| x(from, 5000 + e)).collect();
            assert_eq!(decode(DataType::I32, &rb.read()), want_b, "b={b} rank {r}");
        }
    });
}

#[test]
fn stream_order_is_kept() {
    let n = 2;
    let barrier = Barrier::new(n);
    with_stagers(n, CHUNK, Duration::from_micros(20), LIMIT, |r, st, copy| {
        let count = 100;
        let s = copy.stream();
        let buf = Arc::new(Mem::new(count * 8));
        // A user "kernel" writes the input, but only once the gate opens (after both jobs were
        // enqueued): a job that did not wait for it would read zeros.
        let gate = Arc::new(Flag::default());
        {
            let (g, b) = (gate.clone(), buf.clone());
            let v = encode(
                DataType::F64,
                &(0..count).map(|e| x(r, e)).collect::<Vec<_>>(),
            );
            copy.enqueue(s, move || {
                assert!(g.wait_until(Instant::now() + LIMIT));
                b.write(0, &v);
            });
        }
        let c = RawColl {
            kind: CollKind::AllReduce,
            dtype: DataType::F64,
            op: ReduceOp::Sum,
            count,
            root: 0,
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let read = |copy: &HostCopy| {
            let (b, seen) = (buf.clone(), seen.clone());
            copy.enqueue(s, move || seen.lock().unwrap().push(b.read()));
        };
        // SAFETY: `buf` lives until the end (after the sync).
        unsafe { st.coll(c, buf.addr(), buf.addr(), s).unwrap() };
        read(&copy);
        // SAFETY: as above.
        unsafe { st.coll(c, buf.addr(), buf.addr(), s).unwrap() };
        read(&copy);
        barrier.wait();
        std::thread::sleep(Duration::from_millis(20));
        gate.set();
        assert!(copy.sync(s, LIMIT));
        assert_eq!(st.error(), None);
        let seen = seen.lock().unwrap();
        let sum: Vec<f64> = (0..count).map(|e| (0..n).map(|q| x(q, e)).sum()).collect();
        let twice: Vec<f64> = sum.iter().map(|v| v * n as f64).collect();
        assert_eq!(decode(DataType::F64, &seen[0]), sum, "first read");
        assert_eq!(decode(DataType::F64, &seen[1]), twice, "second read");
    });
}

/// After a failure: the sticky error, the held streams released (their next work runs), later
/// calls refused at once.
fn assert_failed(st: &Stager, copy: &HostCopy, s: Stream, c: RawColl, m: &Mem) {
    assert!(copy.sync(s, LIMIT), "the held stream was not released");
    let e = st.error();
    assert!(e.is_some(), "no sticky error");
    // SAFETY: a refused call touches nothing.
    let again = unsafe { st.coll(c, m.addr(), m.addr(), s) };
    assert_eq!(again.err(), e);
    assert_eq!(
        copy.holds.load(Ordering::SeqCst),
        copy.releases.load(Ordering::SeqCst)
    );
}

#[test]
fn mismatched_job_fails_both_ranks_and_releases_streams() {
    with_stagers(
        2,
        CHUNK,
        Duration::ZERO,
        Duration::from_secs(10),
        |r, st, copy| {
            let s = copy.stream();
            // 10 and 11 f64: the second chunk differs (2 against 3 elements).
            let count = 10 + r;
            let m = Mem::new(count * 8);
            let c = RawColl {
                kind: CollKind::AllReduce,
                dtype: DataType::F64,
                op: ReduceOp::Sum,
                count,
                root: 0,
            };
            // SAFETY: `m` lives until the end.
            unsafe { st.coll(c, m.addr(), m.addr(), s).unwrap() };
            // A second job, queued behind the failing one, fails fast and is released too.
            // SAFETY: as above.
            let _ = unsafe { st.coll(c, m.addr(), m.addr(), s) };
            assert_failed(&st, &copy, s, c, &m);
        },
    );
}

#[test]
fn copy_failure_fails_the_job_here_and_on_the_peer() {
    with_stagers(
        2,
        CHUNK,
        Duration::ZERO,
        Duration::from_secs(10),
        |r, st, copy| {
            if r == 1 {
                copy.fail_after.store(5, Ordering::SeqCst);
            }
            let s = copy.stream();
            let count = 100;
            let m = Mem::new(count * 8);
            let c = RawColl {
                kind: CollKind::AllReduce,
                dtype: DataType::F64,
                op: ReduceOp::Sum,
                count,
                root: 0,
            };
            // SAFETY: `m` lives until the end.
            unsafe { st.coll(c, m.addr(), m.addr(), s).unwrap() };
            // SAFETY: as above.
            let _ = unsafe { st.coll(c, m.addr(), m.addr(), s) };
            assert_failed(&st, &copy, s, c, &m);
            if r == 1 {
                let e = st.error().unwrap().to_string();
                assert!(e.contains("injected copy failure"), "{e}");
            }
        },
    );
}

#[test]
fn drop_fails_stuck_jobs_and_releases_their_streams() {
    // One rank; BRAID_TIMEOUT 1 s, so the drop's grace period is 1 s.
    with_stagers(
        1,
        CHUNK,
        Duration::ZERO,
        Duration::from_secs(1),
        |_, st, copy| {
            let (s1, s2) = (copy.stream(), copy.stream());
            let gate = Arc::new(Flag::default());
            {
                let g = gate.clone();
                copy.enqueue(s1, move || {
                    assert!(g.wait_until(Instant::now() + LIMIT));
                });
            }
            let m = Mem::new(64 * 8);
            let c = RawColl {
                kind: CollKind::AllReduce,
                dtype: DataType::F64,
                op: ReduceOp::Sum,
                count: 64,
                root: 0,
            };
            // Job A waits behind the closed gate on s1; job B (on s2) waits behind job A.
            // SAFETY: `m` outlives the stager and the streams' work.
            unsafe { st.coll(c, m.addr(), m.addr(), s1).unwrap() };
            // SAFETY: as above.
            unsafe { st.coll(c, m.addr(), m.addr(), s2).unwrap() };
            let ran = Arc::new(Flag::default());
            {
                let f = ran.clone();
                copy.enqueue(s2, move || f.set());
            }
            drop(st);
            assert!(
                ran.wait_until(Instant::now() + LIMIT),
                "job B's stream was not released"
            );
            gate.set();
            assert!(copy.sync(s1, LIMIT), "job A's stream was not released");
            assert_eq!(
                copy.holds.load(Ordering::SeqCst),
                copy.releases.load(Ordering::SeqCst)
            );
        },
    );
}

#[test]
fn bad_arguments_fail_at_once() {
    with_stagers(2, CHUNK, Duration::ZERO, LIMIT, |_, st, copy| {
        let s = copy.stream();
        let m = Mem::new(64);
        let c = RawColl {
            kind: CollKind::Broadcast,
            dtype: DataType::F64,
            op: ReduceOp::Sum,
            count: 8,
            root: 2,
        };
        // SAFETY: refused calls touch nothing.
        unsafe {
            assert!(st.coll(c, m.addr(), m.addr(), s).is_err());
            let c = RawColl { root: 0, ..c };
            assert!(st.coll(c, 0, 0, s).is_err());
            let c = RawColl {
                kind: CollKind::P2p,
                ..c
            };
            assert!(st.coll(c, m.addr(), m.addr(), s).is_err());
            let c = RawColl {
                count: usize::MAX / 2,
                ..c
            };
            assert!(st.coll(c, m.addr(), m.addr(), s).is_err());
            let op = DeviceP2p {
                send: true,
                buf: m.addr(),
                count: 1,
                dtype: DataType::F64,
                peer: 2,
                tag: 0,
            };
            assert!(st.p2p(&[op], s).is_err());
        }
        assert_eq!(st.error(), None);
        assert_eq!(copy.holds.load(Ordering::SeqCst), 0);
    });
}

#[test]
fn chunk_size_setting() {
    assert_eq!(parse_chunk_bytes(None).unwrap(), 4 << 20);
    assert_eq!(parse_chunk_bytes(Some("")).unwrap(), 4 << 20);
    assert_eq!(parse_chunk_bytes(Some("64K")).unwrap(), 64 << 10);
    assert_eq!(parse_chunk_bytes(Some("1G")).unwrap(), 1 << 30);
    for bad in ["1K", "2G", "x", "-1"] {
        let e = parse_chunk_bytes(Some(bad)).unwrap_err().to_string();
        assert!(e.contains("BRAID_STAGING_CHUNK_BYTES"), "{e}");
    }
}

#[test]
fn ranks_agree_on_the_chunk() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let fabric = MemFabric::new();
    std::thread::scope(|s| {
        for r in 0..2 {
            let (addr, fabric) = (addr.clone(), fabric.clone());
            s.spawn(move || {
                let c = Communicator::init_in_process(cfg(&addr, 2, r, LIMIT), fabric).unwrap();
                let sub = c.split(Some(0), r as i64).unwrap().unwrap();
                let st = Stager::new(sub, HostCopy::new(Duration::ZERO), 64 << r).unwrap();
                assert_eq!(st.chunk_bytes(), 64);
            });
        }
    });
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    assert!(Stager::new(
        Communicator::init_in_process(cfg(&addr, 1, 0, LIMIT), MemFabric::new()).unwrap(),
        HostCopy::new(Duration::ZERO),
        MIN_CHUNK_BYTES - 1
    )
    .is_err());
}

#[test]
fn cuda_engine_without_a_driver_says_why() {
    if crate::cuda::driver::driver().is_ok() {
        return; // a machine with a GPU: the device check covers it
    }
    let e = CudaCopy::new(0)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    let d = crate::cuda::driver::driver()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert_eq!(e, d);
    assert!(!e.is_empty());
}
