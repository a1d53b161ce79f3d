//! The in-process matrix: every collective through the real executor, with ranks as threads
//! over the in-process transport (N = 1, 2, 3, 4, 5, 8), several dtypes, every op, sizes 0, 1,
//! primes, not divisible by N, several slices; in-place and out-of-place; each algorithm.
//! Expected values are closed forms.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use braid::membership::Coordinator;
use braid::transport::mem::MemFabric;
use braid::{Communicator, Config, Element, ReduceOp};
use half::{bf16, f16};

fn with_ranks(n: usize, algo: &str, f: impl Fn(&Communicator) + Send + Sync) {
    with_hosts(n, algo, &[], f)
}

/// Like `with_ranks`, with a host id per rank (empty: all on this host).
fn with_hosts(n: usize, algo: &str, hosts: &[&str], f: impl Fn(&Communicator) + Send + Sync) {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let fabric = MemFabric::new();
    let f = Arc::new(f);
    std::thread::scope(|s| {
        for r in 0..n {
            let (addr, fabric, f) = (addr.clone(), fabric.clone(), f.clone());
            let algo = algo.to_string();
            s.spawn(move || {
                let cfg = Config {
                    coordinator: Some(addr),
                    world_size: Some(n),
                    rank: Some(r),
                    algo,
                    slice_bytes: 4096,
                    small_bytes: 256,
                    timeout: std::time::Duration::from_secs(30),
                    host_id: hosts.get(r).map(|h| h.to_string()),
                    ..Config::default()
                };
                let c = Communicator::init_in_process(cfg, fabric).unwrap();
                assert_eq!(c.rank(), r);
                assert_eq!(c.size(), n);
                f(&c);
            });
        }
    });
}

trait T: Element + PartialEq + std::fmt::Debug {
    fn of(v: i64) -> Self;
    fn comb(op: ReduceOp, a: Self, b: Self) -> Self;
    fn divn(self, n: usize) -> Self;
}
macro_rules! ints { ($($t:ty),*) => {$(
    impl T for $t {
        fn of(v: i64) -> Self { v as $t }
        fn comb(op: ReduceOp, a: Self, b: Self) -> Self {
            match op { ReduceOp::Sum | ReduceOp::Avg => a.wrapping_add(b), ReduceOp::Prod => a.wrapping_mul(b),
                       ReduceOp::Min => a.min(b), ReduceOp::Max => a.max(b),
                       ReduceOp::Band => a & b, ReduceOp::Bor => a | b, ReduceOp::Bxor => a ^ b }
        }
        fn divn(self, n: usize) -> Self { self / n as $t }
    }
)*}; }
ints!(i8, u8, i16, i32, u32, i64, u64);
macro_rules! floats {
    ($t:ty, $to:expr, $from:expr) => {
        impl T for $t {
            fn of(v: i64) -> Self {
                $from(v as f64)
            }
            fn comb(op: ReduceOp, a: Self, b: Self) -> Self {
                let (x, y): (f64, f64) = ($to(a), $to(b));
                $from(match op {
                    ReduceOp::Sum | ReduceOp::Avg => x + y,
                    ReduceOp::Prod => x * y,
                    ReduceOp::Min => x.min(y),
                    ReduceOp::Max => x.max(y),
                    ReduceOp::Band | ReduceOp::Bor | ReduceOp::Bxor => {
                        unreachable!("bitwise operators are refused on floats")
                    }
                })
            }
            fn divn(self, n: usize) -> Self {
                $from($to(self) / n as f64)
            }
        }
    };
}
floats!(f32, |v: f32| v as f64, |v: f64| v as f32);
floats!(f64, |v: f64| v, |v: f64| v);
floats!(f16, |v: f16| v.to_f64(), f16::from_f64);
floats!(bf16, |v: bf16| v.to_f64(), bf16::from_f64);

fn v<X: T>(op: ReduceOp, n: usize, r: usize, i: usize) -> X {
    match op {
        ReduceOp::Prod => X::of(if r == i % n { 2 } else { 1 }),
        _ => X::of(((r * 7 + i * 3) % 5) as i64 + 1),
    }
}
fn red<X: T>(op: ReduceOp, n: usize, i: usize) -> X {
    let mut a = v::<X>(op, n, 0, i);
    for r in 1..n {
        a = X::comb(op, a, v(op, n, r, i));
    }
    if op == ReduceOp::Avg {
        a = a.divn(n);
    }
    a
}
fn d<X: T>(r: usize, k: usize) -> X {
    X::of(((r * 13 + k) % 97) as i64 + 1)
}

const COUNTS: [usize; 8] = [0, 1, 2, 7, 13, 97, 1031, 5000];

fn reductions<X: T>(c: &Communicator) {
    let (n, r) = (c.size(), c.rank());
    for &cnt in &COUNTS {
        for op in ReduceOp::ALL {
            if !op.supports(X::DTYPE) {
                continue; // see bitwise_operators_are_refused_on_floats
            }
            let ctx = format!("{} n={n} count={cnt} op={op}", X::DTYPE);
            let want: Vec<X> = (0..cnt).map(|i| red(op, n, i)).collect();
            let mine: Vec<X> = (0..cnt).map(|i| v(op, n, r, i)).collect();
            // all_reduce out-of-place and in-place
            let mut out = vec![X::default(); cnt];
            c.all_reduce(&mine, &mut out, op).unwrap();
            assert_eq!(out, want, "all_reduce {ctx}");
            let mut b = mine.clone();
            c.all_reduce_inplace(&mut b, op).unwrap();
            assert_eq!(b, want, "all_reduce_inplace {ctx}");
            // reduce to the last rank
            let root = n - 1;
            let mut out = vec![X::default(); if r == root { cnt } else { 0 }];
            c.reduce(&mine, &mut out, op, root).unwrap();
            if r == root {
                assert_eq!(out, want, "reduce {ctx}");
            }
            let mut b = mine.clone();
            c.reduce_inplace(&mut b, op, root).unwrap();
            if r == root {
                assert_eq!(b, want, "reduce_inplace {ctx}");
            } else {
                assert_eq!(b, mine, "reduce_inplace leaves non-roots alone {ctx}");
            }
            // reduce_scatter: per-rank count cnt
            let big: Vec<X> = (0..cnt * n).map(|i| v(op, n, r, i)).collect();
            let wb: Vec<X> = (0..cnt).map(|i| red(op, n, r * cnt + i)).collect();
            let mut out = vec![X::default(); cnt];
            c.reduce_scatter(&big, &mut out, op).unwrap();
            assert_eq!(out, wb, "reduce_scatter {ctx}");
            let mut b = big.clone();
            c.reduce_scatter_inplace(&mut b, op).unwrap();
            assert_eq!(
                &b[r * cnt..(r + 1) * cnt],
                &wb[..],
                "reduce_scatter_inplace {ctx}"
            );
        }
    }
}

fn movement<X: T>(c: &Communicator) {
    let (n, r) = (c.size(), c.rank());
    for &cnt in &COUNTS {
        let ctx = format!("{} n={n} count={cnt}", X::DTYPE);
        let mine: Vec<X> = (0..cnt).map(|k| d(r, k)).collect();
        let all: Vec<X> = (0..n * cnt)
            .map(|x| d(x / cnt.max(1), x % cnt.max(1)))
            .collect();
        // all_gather
        let mut out = vec![X::default(); n * cnt];
        c.all_gather(&mine, &mut out).unwrap();
        assert_eq!(out, all, "all_gather {ctx}");
        let mut b = vec![X::default(); n * cnt];
        b[r * cnt..(r + 1) * cnt].copy_from_slice(&mine);
        c.all_gather_inplace(&mut b).unwrap();
        assert_eq!(b, all, "all_gather_inplace {ctx}");
        for root in [0, n / 2, n - 1] {
            let rctx = format!("{ctx} root={root}");
            let rootdata: Vec<X> = (0..cnt).map(|k| d(root, k)).collect();
            // broadcast
            let mut b = if r == root {
                rootdata.clone()
            } else {
                vec![X::default(); cnt]
            };
            c.broadcast(&mut b, root).unwrap();
            assert_eq!(b, rootdata, "broadcast {rctx}");
            let send = if r == root { rootdata.clone() } else { vec![] };
            let mut out = vec![X::default(); cnt];
            c.broadcast_from(&send, &mut out, root).unwrap();
            assert_eq!(out, rootdata, "broadcast_from {rctx}");
            // gather
            let mut out = vec![X::default(); if r == root { n * cnt } else { 0 }];
            c.gather(&mine, &mut out, root).unwrap();
            if r == root {
                assert_eq!(out, all, "gather {rctx}");
            }
            let mut b = vec![X::default(); n * cnt];
            b[r * cnt..(r + 1) * cnt].copy_from_slice(&mine);
            c.gather_inplace(&mut b, root).unwrap();
            if r == root {
                assert_eq!(b, all, "gather_inplace {rctx}");
            }
            // scatter
            let send = if r == root { all.clone() } else { vec![] };
            let mut out = vec![X::default(); cnt];
            c.scatter(&send, &mut out, root).unwrap();
            assert_eq!(out, mine, "scatter {rctx}");
            let mut b = if r == root {
                all.clone()
            } else {
                vec![X::default(); n * cnt]
            };
            c.scatter_inplace(&mut b, root).unwrap();
            assert_eq!(
                &b[r * cnt..(r + 1) * cnt],
                &mine[..],
                "scatter_inplace {rctx}"
            );
        }
        // all_to_all: block j from rank r = g(r, j, k)
        let g =
            |from: usize, to: usize, k: usize| X::of(((from * 31 + to * 17 + k) % 97) as i64 + 1);
        let send: Vec<X> = (0..n * cnt)
            .map(|x| g(r, x / cnt.max(1), x % cnt.max(1)))
            .collect();
        let want: Vec<X> = (0..n * cnt)
            .map(|x| g(x / cnt.max(1), r, x % cnt.max(1)))
            .collect();
        let mut out = vec![X::default(); n * cnt];
        c.all_to_all(&send, &mut out).unwrap();
        assert_eq!(out, want, "all_to_all {ctx}");
        let mut b = send.clone();
        c.all_to_all_inplace(&mut b).unwrap();
        assert_eq!(b, want, "all_to_all_inplace {ctx}");
        c.barrier().unwrap();
    }
}

fn p2p(c: &Communicator) {
    let (n, r) = (c.size(), c.rank());
    if n == 1 {
        return;
    }
    let next = (r + 1) % n;
    let prev = (r + n - 1) % n;
    // Ring exchange with a group (cannot deadlock), several sizes, two tags.
    for cnt in [0usize, 1, 100, 70_000] {
        let a: Vec<u32> = (0..cnt).map(|k| (r * 1000 + k) as u32).collect();
        let b: Vec<u32> = (0..cnt).map(|k| (r * 7 + k) as u32).collect();
        let mut ra = vec![0u32; cnt];
        let mut rb = vec![0u32; cnt];
        c.group()
            .send(&a, next, 1)
            .unwrap()
            .send(&b, next, 2)
            .unwrap()
            .recv(&mut ra, prev, 1)
            .unwrap()
            .recv(&mut rb, prev, 2)
            .unwrap()
            .run()
            .unwrap();
        assert_eq!(
            ra,
            (0..cnt)
                .map(|k| (prev * 1000 + k) as u32)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            rb,
            (0..cnt).map(|k| (prev * 7 + k) as u32).collect::<Vec<_>>()
        );
    }
    // Blocking send/recv along a pipeline 0 -> 1 -> ... -> n-1.
    let mut x = [0f64; 3];
    if r > 0 {
        c.recv(&mut x, r - 1, 9).unwrap();
    }
    x[0] += 1.0;
    x[r % 3] += r as f64;
    if r + 1 < n {
        c.send(&x, r + 1, 9).unwrap();
    } else {
        assert_eq!(
            x[0],
            n as f64 + (0..n).filter(|k| k % 3 == 0).map(|k| k as f64).sum::<f64>() - 0.0
        );
    }
}

/// Receives match messages by tag (out of order) and by source (any rank), as MPI and Gloo.
fn p2p_matching(c: &Communicator) {
    let (n, r) = (c.size(), c.rank());
    if n == 1 {
        assert!(c.recv_any(&mut [0u8; 4], 1).is_err());
        return;
    }
    let next = (r + 1) % n;
    let prev = (r + n - 1) % n;
    // Two tags sent in one order, received in the other: the large one (held or not) and a
    // small one; then two messages of one tag, which match in order.
    let small: Vec<u32> = (0..5).map(|k| (r * 10 + k) as u32).collect();
    let large: Vec<u32> = (0..70_000).map(|k| (r + k) as u32).collect();
    let h1 = c.isend(small, next, 11).unwrap();
    let h2 = c.isend(large, next, 12).unwrap();
    let h3 = c.isend(vec![1i16; 3], next, 13).unwrap();
    let h4 = c.isend(vec![2i16; 3], next, 13).unwrap();
    // (A blocking call waits for this rank's earlier non-blocking ones: receive with irecv.)
    let g2 = c.irecv(vec![0i16; 3], prev, 13).unwrap();
    let g1 = c.irecv(vec![0u32; 70_000], prev, 12).unwrap();
    let g0 = c.irecv(vec![0u32; 5], prev, 11).unwrap();
    let got_large = g1.wait().unwrap();
    let got_small = g0.wait().unwrap();
    let first = g2.wait().unwrap();
    let second = c.irecv(vec![0i16; 3], prev, 13).unwrap().wait().unwrap();
    for h in [h1, h2] {
        h.wait().unwrap();
    }
    h3.wait().unwrap();
    h4.wait().unwrap();
    assert!(got_large
        .iter()
        .enumerate()
        .all(|(k, &x)| x == (prev + k) as u32));
    assert_eq!(
        got_small,
        (0..5).map(|k| (prev * 10 + k) as u32).collect::<Vec<_>>()
    );
    assert_eq!((first, second), (vec![1; 3], vec![2; 3]));
    // Any source: rank 0 takes one message from every other rank, in whatever order they come,
    // blocking and non-blocking; the source is reported.
    if r == 0 {
        let mut seen = vec![false; n];
        for i in 1..n {
            let (v, src) = if i % 2 == 0 {
                c.irecv_any(vec![0i64; 4], 20).unwrap().wait().unwrap()
            } else {
                let mut v = vec![0i64; 4];
                let src = c.recv_any(&mut v, 20).unwrap();
                (v, src)
            };
            assert!(src > 0 && src < n && !seen[src], "source {src}");
            seen[src] = true;
            assert_eq!(v, vec![src as i64; 4]);
        }
    } else {
        c.send(&[r as i64; 4], 0, 20).unwrap();
    }
    c.barrier().unwrap();
}

fn nonblocking(c: &Communicator) {
    let (n, r) = (c.size(), c.rank());
    let h1 = c
        .iall_reduce(vec![r as i64 + 1; 1000], ReduceOp::Sum)
        .unwrap();
    let h2 = c.iall_gather(vec![r as u8; 3]).unwrap();
    let h3 = c
        .ibroadcast(
            if r == 0 {
                vec![5.0f32; 10]
            } else {
                vec![0.0; 10]
            },
            0,
        )
        .unwrap();
    let h4 = c.ibarrier().unwrap();
    let h5 = c.ireduce_scatter(vec![1i32; 4 * n], ReduceOp::Sum).unwrap();
    let h6 = c
        .iall_to_all((0..n).map(|j| (r * n + j) as u32).collect())
        .unwrap();
    let h7 = c.igather(vec![r as u16 as u8; 2], 0).unwrap();
    let h8 = c
        .iscatter(
            if r == 0 {
                (0..n as u64).collect()
            } else {
                vec![]
            },
            1,
            0,
        )
        .unwrap();
    // A blocking call issued after non-blocking ones runs after them.
    let mut z = [1u32];
    c.all_reduce_inplace(&mut z, ReduceOp::Sum).unwrap();
    assert_eq!(z[0] as usize, n);
    let s: i64 = (1..=n as i64).sum();
    assert_eq!(h1.wait().unwrap(), vec![s; 1000]);
    assert_eq!(
        h2.wait().unwrap(),
        (0..n).flat_map(|k| [k as u8; 3]).collect::<Vec<_>>()
    );
    assert_eq!(h3.wait().unwrap(), vec![5.0f32; 10]);
    h4.wait().unwrap();
    assert_eq!(h5.wait().unwrap(), vec![n as i32; 4]);
    assert_eq!(
        h6.wait().unwrap(),
        (0..n).map(|j| (j * n + r) as u32).collect::<Vec<_>>()
    );
    let g = h7.wait().unwrap();
    if r == 0 {
        assert_eq!(g, (0..n).flat_map(|k| [k as u8; 2]).collect::<Vec<_>>());
    }
    assert_eq!(h8.wait().unwrap(), vec![r as u64]);
    if n > 1 {
        let next = (r + 1) % n;
        let prev = (r + n - 1) % n;
        let hs = c.isend(vec![r as u32; 5], next, 3).unwrap();
        let hr = c.irecv(vec![0u32; 5], prev, 3).unwrap();
        assert_eq!(hr.wait().unwrap(), vec![prev as u32; 5]);
        assert!(hs.test() || hs.wait().is_ok());
    }
}

fn full_suite(c: &Communicator) {
    reductions::<f32>(c);
    reductions::<i32>(c);
    movement::<u8>(c);
    movement::<f64>(c);
    p2p(c);
    p2p_matching(c);
    nonblocking(c);
}

#[test]
fn matrix_n1_n2_n3() {
    for n in [1, 2, 3] {
        for algo in [
            "all_reduce=ring,broadcast=chain,reduce=chain",
            "all_reduce=recdoubling,broadcast=tree,reduce=tree",
        ] {
            with_ranks(n, algo, full_suite);
        }
    }
}

#[test]
fn matrix_n4_n5() {
    for n in [4, 5] {
        for algo in [
            "all_reduce=ring,broadcast=chain,reduce=chain",
            "all_reduce=recdoubling,broadcast=tree,reduce=tree",
        ] {
            with_ranks(n, algo, full_suite);
        }
    }
}

#[test]
fn matrix_n8() {
    for algo in [
        "all_reduce=ring,broadcast=chain,reduce=chain",
        "all_reduce=recdoubling,broadcast=tree,reduce=tree",
    ] {
        with_ranks(8, algo, |c| {
            reductions::<f32>(c);
            movement::<i32>(c);
            p2p(c);
        });
    }
}

#[test]
fn every_dtype_all_reduce_and_gather() {
    with_ranks(3, "", |c| {
        reductions::<i8>(c);
        reductions::<u8>(c);
        reductions::<u32>(c);
        reductions::<i64>(c);
        reductions::<u64>(c);
        reductions::<f16>(c);
        reductions::<bf16>(c);
        reductions::<f64>(c);
        movement::<f16>(c);
        movement::<bf16>(c);
        movement::<i64>(c);
    });
}

/// Bitwise all-reduce with closed forms: rank r holds h | 1 << r at element i, h = (i % 16) << 4
/// (bits shared by every rank above bits owned by one rank each), so AND = h | (n == 1),
/// OR = h | (2^n - 1), XOR = (h if n is odd) | (2^n - 1). Blocking in place and out of place,
/// and non-blocking; counts include 0 and counts not divisible by n.
fn bitwise_closed_forms<X: T>(c: &Communicator) {
    let (n, r) = (c.size(), c.rank());
    let low = (1i64 << n) - 1;
    for &cnt in &COUNTS {
        let h = |i: usize| ((i % 16) as i64) << 4;
        let mine: Vec<X> = (0..cnt).map(|i| X::of(h(i) | 1 << r)).collect();
        for (op, want) in [
            (
                ReduceOp::Band,
                (0..cnt)
                    .map(|i| X::of(h(i) | i64::from(n == 1)))
                    .collect::<Vec<X>>(),
            ),
            (ReduceOp::Bor, (0..cnt).map(|i| X::of(h(i) | low)).collect()),
            (
                ReduceOp::Bxor,
                (0..cnt)
                    .map(|i| X::of((if n % 2 == 1 { h(i) } else { 0 }) | low))
                    .collect(),
            ),
        ] {
            let ctx = format!("{} n={n} count={cnt} op={op}", X::DTYPE);
            let mut out = vec![X::default(); cnt];
            c.all_reduce(&mine, &mut out, op).unwrap();
            assert_eq!(out, want, "all_reduce {ctx}");
            let mut b = mine.clone();
            c.all_reduce_inplace(&mut b, op).unwrap();
            assert_eq!(b, want, "all_reduce_inplace {ctx}");
            let b = c.iall_reduce(mine.clone(), op).unwrap().wait().unwrap();
            assert_eq!(b, want, "iall_reduce {ctx}");
        }
    }
}

#[test]
fn bitwise_and_int16_all_reduce_on_1_2_3_ranks() {
    for n in [1, 2, 3] {
        for algo in [
            "all_reduce=ring,reduce=chain",
            "all_reduce=recdoubling,reduce=tree",
        ] {
            with_ranks(n, algo, |c| {
                // int16: every operator (bitwise included) through all_reduce, reduce and
                // reduce_scatter.
                reductions::<i16>(c);
                bitwise_closed_forms::<i8>(c);
                bitwise_closed_forms::<u8>(c);
                bitwise_closed_forms::<i16>(c);
                bitwise_closed_forms::<i32>(c);
                bitwise_closed_forms::<u32>(c);
                bitwise_closed_forms::<i64>(c);
                bitwise_closed_forms::<u64>(c);
            });
        }
    }
}

#[test]
fn bitwise_operators_are_refused_on_floats() {
    for n in [1, 2] {
        with_ranks(n, "", |c| {
            fn refused<X: T>(c: &Communicator) {
                for op in [ReduceOp::Band, ReduceOp::Bor, ReduceOp::Bxor] {
                    let a = vec![X::of(1); 5];
                    let mut b = vec![X::of(2); 5];
                    let check = |e: braid::Error| {
                        assert_eq!(e.class(), braid::ErrorClass::InvalidArgument, "{e}");
                        let m = e.to_string();
                        assert!(m.contains(op.name()), "{m}");
                        assert!(m.contains(X::DTYPE.name()), "{m}");
                    };
                    check(c.all_reduce(&a, &mut b, op).unwrap_err());
                    assert_eq!(b, vec![X::of(2); 5], "nothing written");
                    check(c.all_reduce_inplace(&mut b, op).unwrap_err());
                    let mut one = vec![X::of(2); 5];
                    check(c.reduce(&a, &mut one, op, 0).unwrap_err());
                    let big = vec![X::of(1); 5 * c.size()];
                    check(c.reduce_scatter(&big, &mut b, op).unwrap_err());
                    // Non-blocking forms are refused at the call, not at the wait.
                    check(c.iall_reduce(a.clone(), op).err().unwrap());
                    check(c.ireduce(a.clone(), op, 0).err().unwrap());
                }
            }
            refused::<f16>(c);
            refused::<bf16>(c);
            refused::<f32>(c);
            refused::<f64>(c);
            // Nothing was sent: the communicator is in step and usable.
            let mut x = vec![1f32; 7];
            c.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap();
            assert_eq!(x, vec![c.size() as f32; 7]);
            let mut y = vec![6i16; 3];
            c.all_reduce_inplace(&mut y, ReduceOp::Band).unwrap();
            assert_eq!(y, vec![6i16; 3]);
        });
    }
}

#[test]
fn handle_wait_timeout_returns_at_the_deadline() {
    with_ranks(2, "", |c| {
        if c.rank() == 1 {
            std::thread::sleep(std::time::Duration::from_millis(800));
        }
        let h = c
            .iall_reduce(vec![1i16 << c.rank(); 9], ReduceOp::Bor)
            .unwrap();
        if c.rank() == 0 {
            let t = std::time::Instant::now();
            assert!(!h.wait_timeout(std::time::Duration::from_millis(100)));
            let dt = t.elapsed();
            assert!(
                dt >= std::time::Duration::from_millis(100)
                    && dt < std::time::Duration::from_millis(700),
                "{dt:?}"
            );
            assert!(!h.wait_timeout(std::time::Duration::ZERO));
            assert!(!h.test());
        }
        assert!(h.wait_timeout(std::time::Duration::from_secs(30)));
        assert!(h.test());
        // Completed: wait_timeout stays true, wait returns at once.
        assert!(h.wait_timeout(std::time::Duration::ZERO));
        assert!(h.wait_timeout(std::time::Duration::MAX));
        assert_eq!(h.wait().unwrap(), vec![3i16; 9]);
    });
}

#[test]
fn argument_errors_are_not_sticky() {
    with_ranks(2, "", |c| {
        let a = [1f32; 4];
        let mut b = [0f32; 5];
        let e = c.all_reduce(&a, &mut b, ReduceOp::Sum).unwrap_err();
        assert_eq!(e.class(), braid::ErrorClass::InvalidArgument);
        assert!(c.broadcast(&mut b, 7).is_err());
        assert!(c.send(&a, c.rank(), 0).is_err());
        let mut g = [0f32; 3];
        assert!(c.all_gather(&a, &mut g).is_err());
        // The communicator still works.
        let mut x = [1f32; 4];
        c.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap();
        assert_eq!(x, [2.0; 4]);
    });
}

#[test]
fn mismatched_collectives_fail_on_every_rank() {
    // Rank 0 all-reduces 1000 floats, rank 1 1001.
    with_ranks(2, "", |c| {
        let n = if c.rank() == 0 { 1000 } else { 1001 };
        let mut x = vec![1f32; n];
        let e = c.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("count=1000") && s.contains("count=1001"), "{s}");
        // Sticky.
        assert!(c.barrier().is_err());
    });
    // One rank broadcasts while the other all-reduces.
    with_ranks(2, "", |c| {
        let mut x = vec![1f32; 64];
        let res = if c.rank() == 0 {
            c.broadcast(&mut x, 0)
        } else {
            c.all_reduce_inplace(&mut x, ReduceOp::Sum)
        };
        // The receiving side fails at once; a rank that only sent fails at its next call.
        let e = match res {
            Err(e) => e,
            Ok(()) => c.barrier().unwrap_err(),
        };
        let s = e.to_string();
        assert!(
            s.contains("broadcast") || s.contains("all_reduce") || s.contains("aborted"),
            "{s}"
        );
    });
}

#[test]
fn two_communicators_in_one_process() {
    // Two independent groups on one coordinator and two fabrics, used at the same time.
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let fa = MemFabric::new();
    let fb = MemFabric::new();
    std::thread::scope(|s| {
        for r in 0..2 {
            let (addr, fa, fb) = (addr.clone(), fa.clone(), fb.clone());
            s.spawn(move || {
                let mk = |g: &str, f| {
                    let cfg = Config {
                        coordinator: Some(addr.clone()),
                        world_size: Some(2),
                        rank: Some(r),
                        group: g.into(),
                        ..Config::default()
                    };
                    Communicator::init_in_process(cfg, f).unwrap()
                };
                let a = mk("a", fa);
                let b = mk("b", fb);
                for i in 0..20 {
                    let mut x = [i as f64; 8];
                    let mut y = [10.0 * i as f64; 8];
                    a.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap();
                    b.all_reduce_inplace(&mut y, ReduceOp::Max).unwrap();
                    assert_eq!(x, [2.0 * i as f64; 8]);
                    assert_eq!(y, [10.0 * i as f64; 8]);
                }
                assert_ne!(a.member_id(), b.member_id());
            });
        }
    });
}

#[test]
fn abort_fails_pending_and_later_calls() {
    with_ranks(2, "", |c| {
        if c.rank() == 0 {
            // Rank 1 never joins this all-reduce; abort from another thread unblocks us.
            std::thread::scope(|s| {
                s.spawn(|| {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    c.abort();
                });
                let mut x = [1f32; 16];
                let e = c.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap_err();
                assert!(matches!(e, braid::Error::Aborted), "{e}");
            });
            assert!(c.barrier().is_err());
        } else {
            // Rank 1 learns that rank 0 aborted, instead of hanging.
            std::thread::sleep(std::time::Duration::from_millis(400));
            let e = c.barrier().unwrap_err();
            assert_eq!(e.class(), braid::ErrorClass::Remote, "{e}");
        }
    });
}

#[test]
fn rings_keep_each_hosts_ranks_together() {
    // Hosts a, b, a, b: the ring is 0, 2, 1, 3, so it crosses between hosts once each way.
    let hosts = ["a", "b", "a", "b"];
    let algo = "all_reduce=ring,reduce_scatter=ring,all_gather=ring,broadcast=chain,reduce=chain";
    with_hosts(4, algo, &hosts, |c| {
        assert_eq!(c.ring_order(), vec![0, 2, 1, 3]);
        // Every rank's NUMA node travels with the view.
        assert_eq!(c.numa_nodes().len(), 4);
        // (Threads may migrate between nodes on a multi-node machine: compare presence only.)
        assert_eq!(
            c.numa_nodes()[c.rank()].is_some(),
            braid::topo::local_numa_node().is_some()
        );
        // A ring all-reduce only talks to the ring neighbours.
        let mut x = vec![1.0f32; 100_000];
        c.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap();
        assert!(x.iter().all(|v| *v == 4.0));
        let ring = c.ring_order();
        let pos = ring.iter().position(|r| *r == c.rank()).unwrap();
        let next = ring[(pos + 1) % 4];
        let prev = ring[(pos + 3) % 4];
        for (p, tx, rx) in c.bytes_per_peer() {
            if p == next {
                assert!(tx > 0, "rank {} sends to {p}", c.rank());
            } else {
                assert_eq!(
                    tx,
                    0,
                    "rank {} sent to {p}, not its ring successor {next}",
                    c.rank()
                );
            }
            if p == prev {
                assert!(rx > 0);
            } else {
                assert_eq!(rx, 0, "rank {} received from {p}", c.rank());
            }
        }
        // Results stay in rank order for every collective.
        reductions::<f32>(c);
        movement::<i32>(c);
        p2p(c);
    });
}

#[test]
fn dropping_with_an_unmatched_receive_does_not_hang() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let fabric = MemFabric::new();
    std::thread::scope(|s| {
        for r in 0..2 {
            let (addr, fabric) = (addr.clone(), fabric.clone());
            s.spawn(move || {
                let cfg = Config {
                    coordinator: Some(addr),
                    world_size: Some(2),
                    rank: Some(r),
                    timeout: std::time::Duration::from_secs(600),
                    ..Config::default()
                };
                let c = Communicator::init_in_process(cfg, fabric).unwrap();
                c.barrier().unwrap();
                if r == 0 {
                    // Nobody ever sends this.
                    let h = c.irecv(vec![0u8; 16], 1, 77).unwrap();
                    let t0 = std::time::Instant::now();
                    drop(c);
                    let took = t0.elapsed();
                    assert!(took < std::time::Duration::from_secs(11), "{took:?}");
                    assert!(took >= std::time::Duration::from_secs(9), "{took:?}");
                    let e = h.wait().unwrap_err();
                    assert!(matches!(e, braid::Error::Aborted), "{e}");
                } else {
                    // Stay alive (silent) past rank 0's grace period of 10 s.
                    std::thread::sleep(std::time::Duration::from_secs(12));
                }
            });
        }
    });
}

/// Runs `f` on 2 ranks (threads over the in-process transport) with timeouts `timeout_s` (per
/// rank) and the point-to-point hold cap `hold`.
fn two_ranks(timeout_s: [u64; 2], hold: usize, f: impl Fn(&Communicator) + Send + Sync) {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let fabric = MemFabric::new();
    let f = &f;
    std::thread::scope(|s| {
        for (r, secs) in timeout_s.into_iter().enumerate() {
            let (addr, fabric) = (addr.clone(), fabric.clone());
            s.spawn(move || {
                let cfg = Config {
                    coordinator: Some(addr),
                    world_size: Some(2),
                    rank: Some(r),
                    timeout: std::time::Duration::from_secs(secs),
                    p2p_hold_bytes: hold,
                    ..Config::default()
                };
                f(&Communicator::init_in_process(cfg, fabric).unwrap());
            });
        }
    });
}

#[test]
fn a_message_past_the_hold_cap_is_named_when_the_receive_times_out() {
    // Rank 0's sends wait for rank 1 (in-process sends complete when received): only rank 1
    // times out, and its error reaches rank 0 as an abort.
    two_ranks([30, 2], 1000, |c| {
        if c.rank() == 0 {
            // Held (under the cap), then one past the cap, then the one rank 1 wants.
            let a = c.isend(vec![1u8; 600], 1, 1).unwrap();
            let b = c.isend(vec![2u8; 600], 1, 2).unwrap();
            let w = c.isend(vec![3u8; 4], 1, 3).unwrap();
            for h in [a, b, w] {
                let _ = h.wait();
            }
        } else {
            let e = c.recv(&mut [0u8; 4], 0, 3).unwrap_err().to_string();
            assert!(e.contains("waiting for tag 3 from rank 0"), "{e}");
            assert!(e.contains("held from rank 0: tag 1 (600 bytes)"), "{e}");
            assert!(
                e.contains("tag=2") && e.contains("BRAID_P2P_HOLD_BYTES"),
                "{e}"
            );
        }
    });
}

#[test]
fn same_tag_other_length_is_a_mismatch_before_data_moves() {
    two_ranks([20, 20], 64 << 20, |c| {
        if c.rank() == 0 {
            let _ = c.send(&[1.0f32; 8], 1, 4);
        } else {
            let mut got = [0f32; 4];
            let e = c.recv_any(&mut got, 4).unwrap_err().to_string();
            assert!(e.contains("mismatch") && e.contains("count=8"), "{e}");
            assert!(e.contains("count=4"), "{e}");
            assert_eq!(got, [0.0; 4]);
        }
    });
}
