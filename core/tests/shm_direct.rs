//! Single-copy transfers between ranks (processes on one host) whose buffers come from
//! `Communicator::alloc_shared`, or lie on the heap (cross-memory attach): every single-copy
//! collective (in-place and out-of-place, counts not divisible by the rank count, 2 and 3
//! ranks) and send/recv, with proof that the payload did not cross the shm rings (byte
//! counters); the fallbacks (heap buffers without cross-memory attach, refused cross-memory
//! attach, regions that cannot be mapped); a rank killed mid-call.
//!
//! The test binary re-runs itself as the ranks (see core/tests/shm.rs).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use braid::membership::Coordinator;
use braid::{Communicator, Config, Element, ReduceOp, SharedBuf};

const ROLE: &str = "BRAID_SHM_DIRECT_TEST_ROLE";

mod common;
use common::{check_all, dev_shm, env_of, finish, kill_rank_2_and_check, Ranks};

fn spawn(role: &str, coord: &str, n: usize, env: &dyn Fn(usize) -> Vec<(String, String)>) -> Ranks {
    common::spawn(ROLE, role, coord, n, env)
}

// ---- rank side -------------------------------------------------------------------------

/// A buffer from the communicator's shared allocator, filled from `v`.
fn shared<T: Element>(c: &Communicator, v: &[T]) -> SharedBuf<T> {
    let mut b = c.alloc_shared::<T>(v.len()).unwrap();
    b.copy_from_slice(v);
    assert!(v.is_empty() || c.is_shared(b.as_ptr() as *const u8, std::mem::size_of_val(v)));
    b
}

fn ring_bytes(c: &Communicator) -> u64 {
    c.bytes_per_peer().iter().map(|(_, tx, rx)| tx + rx).sum()
}

/// All-reduces over shared buffers (in-place and out-of-place, several types, ops and counts
/// not divisible by the rank count); `mine_shared`: whether this rank passes shared buffers
/// (false on one rank = the fallback test). Returns the payload bytes all-reduced.
fn all_reduces(c: &Communicator, mine_shared: bool) -> u64 {
    let (r, n) = (c.rank(), c.size());
    let mut payload = 0u64;
    for &count in &[1024usize, 4099, 65_537, (3 << 20) / 4 + 1] {
        let send: Vec<f32> = (0..count).map(|i| (r * 1000 + i % 1000) as f32).collect();
        let want = |i: usize| (0..n).map(|k| k * 1000 + i % 1000).sum::<usize>() as f32;
        // Out-of-place.
        let mut recv = vec![0f32; count];
        if mine_shared {
            let s = shared(c, &send);
            let mut d = shared(c, &recv);
            c.all_reduce(&s, &mut d, ReduceOp::Sum).unwrap();
            recv.copy_from_slice(&d);
        } else {
            c.all_reduce(&send, &mut recv, ReduceOp::Sum).unwrap();
        }
        for (i, v) in recv.iter().enumerate() {
            assert_eq!(*v, want(i), "all_reduce count {count} at {i}");
        }
        // In-place, twice on the same buffer (cached peer mappings).
        let mut b = shared(c, &send);
        let mut h = send.clone();
        for round in 0..2 {
            if mine_shared {
                c.all_reduce_inplace(&mut b, ReduceOp::Sum).unwrap();
            } else {
                c.all_reduce_inplace(&mut h, ReduceOp::Sum).unwrap();
            }
            let got: &[f32] = if mine_shared { &b } else { &h };
            for (i, v) in got.iter().enumerate() {
                let w = want(i) * (n as f32).powi(round);
                assert_eq!(
                    *v, w,
                    "in-place all_reduce count {count} round {round} at {i}"
                );
            }
        }
        payload += 3 * (count * 4) as u64;
        // Integers with max, doubles with avg.
        let si: Vec<i32> = (0..count)
            .map(|i| ((i * 7 + r * 13) % 101) as i32)
            .collect();
        let mut di = c.alloc_shared::<i32>(count).unwrap();
        if mine_shared {
            let s = shared(c, &si);
            c.all_reduce(&s, &mut di, ReduceOp::Max).unwrap();
        } else {
            let mut v = vec![0i32; count];
            c.all_reduce(&si, &mut v, ReduceOp::Max).unwrap();
            di.copy_from_slice(&v);
        }
        for (i, v) in di.iter().enumerate() {
            let w = (0..n)
                .map(|k| ((i * 7 + k * 13) % 101) as i32)
                .max()
                .unwrap();
            assert_eq!(*v, w, "max at {i}");
        }
        let sd: Vec<f64> = (0..count).map(|i| (r * 4 + i % 8) as f64).collect();
        let mut dd = shared(c, &sd);
        if mine_shared {
            c.all_reduce_inplace(&mut dd, ReduceOp::Avg).unwrap();
        } else {
            let mut v = sd.clone();
            c.all_reduce_inplace(&mut v, ReduceOp::Avg).unwrap();
            dd.copy_from_slice(&v);
        }
        for (i, v) in dd.iter().enumerate() {
            let w = (0..n).map(|k| (k * 4 + i % 8) as f64).sum::<f64>() / n as f64;
            assert!((v - w).abs() < 1e-9, "avg at {i}: {v} vs {w}");
        }
        payload += 2 * (count * 4 + count * 8) as u64;
        // Bitwise (int16 xor in place, not counted in the payload): rank r holds h | 1 << r,
        // so the result is (h if n is odd) | (2^n - 1).
        let sx: Vec<i16> = (0..count)
            .map(|i| ((i % 251) as i16) << 4 | 1 << r)
            .collect();
        let mut bx = shared(c, &sx);
        if mine_shared {
            c.all_reduce_inplace(&mut bx, ReduceOp::Bxor).unwrap();
        } else {
            let mut v = sx.clone();
            c.all_reduce_inplace(&mut v, ReduceOp::Bxor).unwrap();
            bx.copy_from_slice(&v);
        }
        for (i, v) in bx.iter().enumerate() {
            let h = if n % 2 == 1 {
                ((i % 251) as i16) << 4
            } else {
                0
            };
            assert_eq!(*v, h | ((1 << n) - 1), "bxor at {i}");
        }
    }
    payload
}

/// A buffer filled from `v`: from the communicator's shared allocator, or on the heap.
fn mk<T: Element>(
    c: &Communicator,
    v: &[T],
    heap: bool,
) -> Box<dyn std::ops::DerefMut<Target = [T]>> {
    if heap {
        Box::new(v.to_vec())
    } else {
        Box::new(shared(c, v))
    }
}

/// Reduce-scatter, all-gather and broadcast over shared buffers (`heap`: ordinary heap buffers
/// instead), in place and out of place (count per rank not a multiple of anything). Returns
/// the bytes this rank should have copied single-copy from peers (at least).
fn other_collectives(c: &Communicator, heap: bool) -> u64 {
    let (r, n) = (c.rank(), c.size());
    let k = 70_001usize; // per-rank block
    let mut moved = 0u64;
    // reduce_scatter: block q of rank r's input is (r + 1) * (q * 10 + i % 10).
    let input: Vec<f32> = (0..n * k)
        .map(|x| ((r + 1) * ((x / k) * 10 + x % k % 10)) as f32)
        .collect();
    let tri = (n * (n + 1) / 2) as f32;
    let want = |i: usize| tri * (r * 10 + i % 10) as f32;
    let s = mk(c, &input, heap);
    let mut out = mk(c, &vec![0f32; k], heap);
    c.reduce_scatter(&s, &mut out, ReduceOp::Sum).unwrap();
    assert!(
        out.iter().enumerate().all(|(i, v)| *v == want(i)),
        "reduce_scatter"
    );
    let mut b = mk(c, &input, heap);
    c.reduce_scatter_inplace(&mut b, ReduceOp::Sum).unwrap();
    assert!(
        b[r * k..(r + 1) * k]
            .iter()
            .enumerate()
            .all(|(i, v)| *v == want(i)),
        "reduce_scatter_inplace"
    );
    moved += 2 * ((n - 1) * k * 4) as u64;
    // all_gather: rank q contributes q * 1000 + i % 1000.
    let mine: Vec<f32> = (0..k).map(|i| (r * 1000 + i % 1000) as f32).collect();
    let s = mk(c, &mine, heap);
    let mut all = mk(c, &vec![0f32; n * k], heap);
    c.all_gather(&s, &mut all).unwrap();
    let ok = |v: &[f32]| {
        v.iter()
            .enumerate()
            .all(|(x, v)| *v == ((x / k) * 1000 + x % k % 1000) as f32)
    };
    assert!(ok(&all), "all_gather");
    let mut b = mk(c, &vec![0f32; n * k], heap);
    b[r * k..(r + 1) * k].copy_from_slice(&mine);
    c.all_gather_inplace(&mut b).unwrap();
    assert!(ok(&b), "all_gather_inplace");
    moved += 2 * ((n - 1) * k * 4) as u64;
    // broadcast from rank 1 (in place), and from rank 0 into heap receive buffers.
    let mut b = mk(c, &vec![0u32; k], heap);
    if r == 1 {
        b.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as u32 * 3);
    }
    c.broadcast(&mut b, 1).unwrap();
    assert!(
        b.iter().enumerate().all(|(i, v)| *v == i as u32 * 3),
        "broadcast"
    );
    let src = mk(c, &(0..k as u32).collect::<Vec<_>>(), heap);
    let mut plain = vec![0u32; k];
    c.broadcast_from(&src, &mut plain, 0).unwrap();
    assert!(
        plain.iter().enumerate().all(|(i, v)| *v == i as u32),
        "broadcast_from"
    );
    if r != 0 {
        moved += (k * 4) as u64;
    }
    // reduce to the last rank: the sum of (q + 1) * (i % 100); other ranks pass no receive
    // buffer.
    let root = n - 1;
    let x: Vec<f32> = (0..k).map(|i| ((r + 1) * (i % 100)) as f32).collect();
    let s = mk(c, &x, heap);
    let mut out = mk(c, &vec![0f32; if r == root { k } else { 0 }], heap);
    c.reduce(&s, &mut out, ReduceOp::Sum, root).unwrap();
    if r == root {
        assert!(
            out.iter()
                .enumerate()
                .all(|(i, v)| *v == tri * (i % 100) as f32),
            "reduce"
        );
    }
    let mut b = mk(c, &x, heap);
    c.reduce_inplace(&mut b, ReduceOp::Sum, 0).unwrap();
    let w = |i: usize| if r == 0 { tri * (i % 100) as f32 } else { x[i] };
    assert!(
        b.iter().enumerate().all(|(i, v)| *v == w(i)),
        "reduce_inplace"
    );
    moved += 2 * ((n - 1) * (k / n) * 4) as u64;
    // all_to_all: block j of rank r's input is r * 100 + j * 10 + i % 10.
    let a2a: Vec<f32> = (0..n * k)
        .map(|x| (r * 100 + (x / k) * 10 + x % k % 10) as f32)
        .collect();
    let s = mk(c, &a2a, heap);
    let mut out = mk(c, &vec![0f32; n * k], heap);
    c.all_to_all(&s, &mut out).unwrap();
    assert!(
        out.iter()
            .enumerate()
            .all(|(x, v)| *v == ((x / k) * 100 + r * 10 + x % k % 10) as f32),
        "all_to_all"
    );
    moved += ((n - 1) * k * 4) as u64;
    // gather to rank 0 (out of place) and rank 1 (in place).
    let s = mk(c, &mine, heap);
    let mut g = mk(c, &vec![0f32; if r == 0 { n * k } else { 0 }], heap);
    c.gather(&s, &mut g, 0).unwrap();
    assert!(r != 0 || ok(&g), "gather");
    let mut b = mk(c, &vec![0f32; n * k], heap);
    b[r * k..(r + 1) * k].copy_from_slice(&mine);
    c.gather_inplace(&mut b, 1).unwrap();
    assert!(r != 1 || ok(&b), "gather_inplace");
    // scatter from rank 0 (out of place) and rank 1 (in place).
    let every: Vec<f32> = (0..n * k)
        .map(|x| ((x / k) * 1000 + x % k % 1000) as f32)
        .collect();
    let s = mk(c, if r == 0 { &every[..] } else { &[] }, heap);
    let mut sc = mk(c, &vec![0f32; k], heap);
    c.scatter(&s, &mut sc, 0).unwrap();
    assert!(sc[..] == mine[..], "scatter");
    let mut b = mk(c, &if r == 1 { every } else { vec![0f32; n * k] }, heap);
    c.scatter_inplace(&mut b, 1).unwrap();
    assert!(b[r * k..(r + 1) * k] == mine[..], "scatter_inplace");
    moved += match r {
        0 => (k * 4) as u64,     // gather to 1, scatter from 1
        1 => (k * 4) as u64,     // gather to 0, scatter from 0
        _ => 4 * (k * 4) as u64, // both, twice
    };
    moved
}

/// In-place all-to-all (never single-copy: a rank would overwrite blocks its peers still
/// read): the result is right.
fn all_to_all_in_place(c: &Communicator, heap: bool) {
    let (r, n) = (c.rank(), c.size());
    let k = 70_001usize;
    let a2a: Vec<f32> = (0..n * k)
        .map(|x| (r * 100 + (x / k) * 10 + x % k % 10) as f32)
        .collect();
    let mut b = mk(c, &a2a, heap);
    c.all_to_all_inplace(&mut b).unwrap();
    assert!(
        b.iter()
            .enumerate()
            .all(|(x, v)| *v == ((x / k) * 100 + r * 10 + x % k % 10) as f32),
        "all_to_all_inplace"
    );
}

/// Ring exchange of `count` f32 with send/recv; `shared_send`: the send buffer is shared.
fn sendrecv(c: &Communicator, count: usize, shared_send: bool) {
    let (r, n) = (c.rank(), c.size());
    let to = (r + 1) % n;
    let from = (r + n - 1) % n;
    let mine: Vec<f32> = (0..count).map(|i| (r * 7 + i % 1000) as f32).collect();
    let mut theirs = c.alloc_shared::<f32>(count).unwrap();
    let s = shared(c, &mine);
    let src: &[f32] = if shared_send { &s } else { &mine };
    c.group()
        .send(src, to, 5)
        .unwrap()
        .recv(&mut theirs, from, 5)
        .unwrap()
        .run()
        .unwrap();
    for (i, v) in theirs.iter().enumerate() {
        assert_eq!(*v, (from * 7 + i % 1000) as f32, "sendrecv at {i}");
    }
}

fn rank_main(role: &str) {
    let mut cfg = Config::from_env().unwrap();
    cfg.timeout = Duration::from_secs(60);
    let c = match Communicator::init_with(cfg) {
        Ok(c) => c,
        Err(e) => {
            println!("INIT-ERR: {e}");
            std::process::exit(3);
        }
    };
    let r = c.rank();
    match role {
        "direct" => {
            assert!(c.peer_transports().iter().all(|(_, t)| *t == "shm"));
            let ring0 = ring_bytes(&c);
            let payload = all_reduces(&c, true);
            let ring1 = ring_bytes(&c);
            let direct = c.direct_bytes();
            println!(
                "rank {r}: all_reduce payload {payload} ring bytes {} single-copy {direct}",
                ring1 - ring0
            );
            // Only handshakes crossed the rings; the payload was read from peers' memory.
            assert!(
                ring1 - ring0 < payload / 50,
                "ring bytes {} for payload {payload}",
                ring1 - ring0
            );
            assert!(
                direct >= payload / 4,
                "single-copy bytes {direct} for payload {payload}"
            );
            let d0 = c.direct_bytes();
            let r0 = ring_bytes(&c);
            let want = other_collectives(&c, false);
            let (d1, r1) = (c.direct_bytes(), ring_bytes(&c));
            println!(
                "rank {r}: other collectives single-copy {} ring bytes {}",
                d1 - d0,
                r1 - r0
            );
            assert!(
                d1 - d0 >= want,
                "other collectives: single-copy {} < {want}",
                d1 - d0
            );
            assert!(
                r1 - r0 < 16 << 10,
                "other collectives: ring bytes {}",
                r1 - r0
            );
            all_to_all_in_place(&c, false);
            let direct = c.direct_bytes();
            let ring1 = ring_bytes(&c);
            // Sends of at least the shm ring size (4 MiB) go single-copy.
            let count = (5 << 20) / 4 + 3;
            sendrecv(&c, count, true);
            let ring2 = ring_bytes(&c);
            let d2 = c.direct_bytes() - direct;
            println!(
                "rank {r}: sendrecv ring bytes {} single-copy {d2}",
                ring2 - ring1
            );
            assert_eq!(d2, (count * 4) as u64);
            assert!(ring2 - ring1 < 4096);
            // A send from a heap buffer to a shared receive buffer goes through the rings.
            sendrecv(&c, count, false);
            assert_eq!(c.direct_bytes() - direct, d2);
            assert!(ring_bytes(&c) - ring2 >= 2 * (count * 4) as u64);
        }
        "fallback" => {
            // Rank 0 passes heap buffers: everyone takes the usual path, same results.
            let ring0 = ring_bytes(&c);
            let payload = all_reduces(&c, r != 0);
            let ring1 = ring_bytes(&c);
            println!(
                "rank {r}: ring bytes {} single-copy {}",
                ring1 - ring0,
                c.direct_bytes()
            );
            assert_eq!(c.direct_bytes(), 0);
            assert!(ring1 - ring0 >= payload / 2);
        }
        "cma" => {
            // Heap buffers (and, second, heap on rank 0 only) with BRAID_SHM_CMA=auto:
            // all-reduces and all-to-alls are single-copy by cross-memory attach; the other
            // collectives use the rings.
            for mixed in [false, true] {
                let (d0, ring0) = (c.direct_bytes(), ring_bytes(&c));
                let payload = all_reduces(&c, mixed && r != 0);
                let (d1, ring1) = (c.direct_bytes(), ring_bytes(&c));
                println!(
                    "rank {r}: heap all_reduce (mixed {mixed}) payload {payload} ring bytes {} single-copy {}",
                    ring1 - ring0,
                    d1 - d0
                );
                assert!(ring1 - ring0 < payload / 50, "ring bytes {}", ring1 - ring0);
                assert!(d1 - d0 >= payload / 4, "single-copy bytes {}", d1 - d0);
            }
            // Non-blocking all-reduce of an owned vector: single-copy as well.
            let d0 = c.direct_bytes();
            let v: Vec<f64> = (0..100_003).map(|i| (r + i % 7) as f64).collect();
            let v = c.iall_reduce(v, ReduceOp::Sum).unwrap().wait().unwrap();
            let n = c.size();
            assert!(v
                .iter()
                .enumerate()
                .all(|(i, x)| *x == (0..n).map(|q| (q + i % 7) as f64).sum::<f64>()));
            assert!(c.direct_bytes() > d0, "iall_reduce was not single-copy");
            // All-to-all too; the other collectives use the rings.
            let (r, n, k) = (c.rank(), c.size(), 1usize << 18);
            let d0 = c.direct_bytes();
            let a2a: Vec<u32> = (0..n * k).map(|x| (r * 100 + x / k) as u32).collect();
            let mut out = vec![0u32; n * k];
            c.all_to_all(&a2a, &mut out).unwrap();
            assert!(out
                .iter()
                .enumerate()
                .all(|(x, v)| *v == ((x / k) * 100 + r) as u32));
            let d1 = c.direct_bytes();
            assert_eq!(d1 - d0, ((n - 1) * k * 4) as u64, "all_to_all single-copy");
            other_collectives(&c, true);
            // (other_collectives runs one out-of-place all_to_all of 70,001 f32 per block.)
            assert_eq!(
                c.direct_bytes() - d1,
                ((n - 1) * 70_001 * 4) as u64,
                "auto: only all-reduce and all-to-all use cross-memory attach"
            );
        }
        "cma-all" => {
            // BRAID_SHM_CMA=1: every single-copy collective takes heap buffers.
            let (d0, r0) = (c.direct_bytes(), ring_bytes(&c));
            let want = other_collectives(&c, true);
            let (d1, r1) = (c.direct_bytes(), ring_bytes(&c));
            println!(
                "rank {r}: heap collectives single-copy {} ring bytes {}",
                d1 - d0,
                r1 - r0
            );
            assert!(d1 - d0 >= want, "single-copy {} < {want}", d1 - d0);
            assert!(r1 - r0 < 16 << 10, "ring bytes {}", r1 - r0);
            all_to_all_in_place(&c, true);
        }
        "cma-refused" => {
            // Rank 1 runs in its own pid namespace: the pid it announces names another
            // process (or none) here, so the cookie check fails: everyone uses the rings.
            let ring0 = ring_bytes(&c);
            let payload = all_reduces(&c, false);
            println!(
                "rank {r}: ring bytes {} single-copy {}",
                ring_bytes(&c) - ring0,
                c.direct_bytes()
            );
            assert_eq!(c.direct_bytes(), 0);
            assert!(ring_bytes(&c) - ring0 >= payload / 2);
        }
        "region-refused" => {
            // Rank 1 runs in its own pid namespace: the region descriptors it announces name
            // a process that is not it, so rank 0 cannot map its buffers: the collectives fall
            // back on every rank, sends stream through the ring; the results are right.
            all_reduces(&c, true);
            println!("rank {r}: single-copy {}", c.direct_bytes());
            assert_eq!(c.direct_bytes(), 0);
            sendrecv(&c, (5 << 20) / 4 + 3, true);
        }
        "off" => {
            // BRAID_SHM_DIRECT=0: shared buffers, usual path.
            all_reduces(&c, true);
            sendrecv(&c, (5 << 20) / 4, true);
            assert_eq!(c.direct_bytes(), 0);
        }
        "kill" | "kill-heap" => {
            // Shared buffers, or heap buffers (cross-memory attach).
            let mut x = mk(&c, &vec![1.0f32; 4 << 20], role == "kill-heap");
            c.all_reduce_inplace(&mut x, ReduceOp::Max).unwrap();
            assert!(c.direct_bytes() > 0, "the single-copy path was not taken");
            common::all_reduce_until_error(&c, &mut x)
        }
        other => panic!("unknown role {other}"),
    }
    c.barrier().unwrap();
    drop(c);
    println!("RANK-OK");
}

#[test]
fn rank_entry() {
    if let Ok(role) = std::env::var(ROLE) {
        rank_main(&role);
    }
}

// ---- parent side -----------------------------------------------------------------------

fn run(role: &str, n: usize, extra: &[(&str, &str)]) {
    run_wrapped(role, n, extra, &|_| Vec::new());
}

/// Runs `role` on `n` ranks (each under `wrap(rank)`, see `common::spawn_wrapped`) with the
/// shm transport and single-copy from 4 KiB; checks every rank succeeded and nothing was left
/// in /dev/shm. Returns every rank's output.
fn run_wrapped(
    role: &str,
    n: usize,
    extra: &[(&str, &str)],
    wrap: &dyn Fn(usize) -> Vec<String>,
) -> Vec<(bool, String)> {
    let before = dev_shm();
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let mut env = vec![("BRAID_TRANSPORT", "shm"), ("BRAID_SHM_DIRECT_MIN", "4096")];
    env.extend_from_slice(extra);
    let ranks = common::spawn_wrapped(ROLE, role, &addr, n, &|_| env_of(&env), wrap);
    let res = finish(ranks, Duration::from_secs(180));
    check_all(&res);
    for (r, (_, s)) in res.iter().enumerate() {
        println!("rank {r}:\n{s}");
    }
    let new: Vec<String> = dev_shm().difference(&before).cloned().collect();
    assert!(new.is_empty(), "files left in /dev/shm: {new:?}");
    res
}

#[test]
fn single_copy_two_ranks() {
    run("direct", 2, &[]);
}

#[test]
fn single_copy_three_ranks() {
    run("direct", 3, &[]);
}

#[test]
fn one_rank_with_heap_buffers_falls_back() {
    run("fallback", 3, &[("BRAID_SHM_CMA", "0")]);
}

#[test]
fn heap_buffers_single_copy_by_cross_memory_attach() {
    run("cma", 2, &[]);
    run("cma", 3, &[]);
}

#[test]
fn heap_buffers_every_collective_with_cma_1() {
    run("cma-all", 3, &[("BRAID_SHM_CMA", "1")]);
}

/// Runs `role` on 2 ranks, rank 1 in a new pid namespace (`unshare --pid`, root only): the pid
/// it announces means nothing (or another process) to rank 0. Returns every rank's output.
fn run_rank_1_in_own_pid_namespace(role: &str) -> Option<Vec<(bool, String)>> {
    let probe = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "true"])
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        // Not root (or no util-linux): the case cannot be built here; say so loudly.
        eprintln!("SKIPPED: unshare --pid is not permitted here (needs root)");
        assert!(
            !nix_is_root(),
            "unshare --pid failed although this process is root"
        );
        return None;
    }
    Some(run_wrapped(role, 2, &[], &|r| {
        if r == 1 {
            ["unshare", "--pid", "--fork", "--kill-child"]
                .map(String::from)
                .to_vec()
        } else {
            Vec::new()
        }
    }))
}

/// Cross-memory attach to a pid that names another process is refused by the cookie check;
/// the ranks fall back to the rings.
#[test]
fn cross_memory_attach_to_the_wrong_process_falls_back() {
    if let Some(res) = run_rank_1_in_own_pid_namespace("cma-refused") {
        assert!(
            res.iter()
                .any(|(_, s)| s.contains("cross-memory attach to rank")),
            "no rank logged the refusal"
        );
    }
}

/// A shared region a peer cannot map (its descriptor names another process): collectives fall
/// back on every rank, sends stream through the ring.
#[test]
fn unmappable_regions_fall_back() {
    if let Some(res) = run_rank_1_in_own_pid_namespace("region-refused") {
        assert!(
            res.iter()
                .any(|(_, s)| s.contains("single-copy all_reduce unavailable")),
            "no rank logged the fallback"
        );
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn single_copy_off() {
    run("off", 2, &[("BRAID_SHM_DIRECT", "0")]);
}

#[test]
fn killed_rank_mid_single_copy_is_reported() {
    for role in ["kill", "kill-heap"] {
        let before = dev_shm();
        let coord = Coordinator::bind("127.0.0.1:0").unwrap();
        let addr = coord.local_addr().to_string();
        let ranks = spawn(role, &addr, 3, &|_| env_of(&[("BRAID_TRANSPORT", "shm")]));
        kill_rank_2_and_check(ranks, Duration::from_secs(3), &before);
    }
}
