//! all_to_allv (uneven counts, zero counts, 1-4 ranks, count mismatches, mismatched
//! collectives) and new communicators (split, create_group), with ranks as threads over the
//! in-process transport, real TCP sockets and shared memory. Expected values are closed forms.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use braid::config::TransportKind;
use braid::membership::Coordinator;
use braid::transport::mem::MemFabric;
use braid::{Communicator, Config, DataType, ErrorClass, ReduceOp};

fn cfg(addr: &str, n: usize, r: usize) -> Config {
    Config {
        coordinator: Some(addr.to_string()),
        world_size: Some(n),
        rank: Some(r),
        timeout: Duration::from_secs(30),
        init_timeout: Duration::from_secs(30),
        slice_bytes: 4096,
        ..Config::default()
    }
}

/// Runs `f` on `n` in-process ranks (threads) sharing one coordinator.
fn with_ranks(n: usize, f: impl Fn(&Communicator) + Send + Sync) {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let fabric = MemFabric::new();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (addr, fabric, f) = (addr.clone(), fabric.clone(), &f);
                s.spawn(move || {
                    let c = Communicator::init_in_process(cfg(&addr, n, r), fabric).unwrap();
                    f(&c);
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

/// Runs `f` on `n` ranks (threads) over real transports of `kind`.
fn with_net_ranks(n: usize, kind: TransportKind, f: impl Fn(&Communicator) + Send + Sync) {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (addr, f) = (addr.clone(), &f);
                s.spawn(move || {
                    let c = Communicator::init_with(Config {
                        transport: kind,
                        ..cfg(&addr, n, r)
                    })
                    .unwrap();
                    f(&c);
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

// ---- all_to_allv -----------------------------------------------------------------------

/// Elements rank `r` sends to rank `p` (zero for some pairs, a large block for others).
fn cnt(r: usize, p: usize, big: usize) -> usize {
    match (r + 2 * p) % 4 {
        0 => 0,
        1 => 1 + r,
        2 => big + p,
        _ => 3 + 2 * p,
    }
}

/// The i-th element rank `r` sends to rank `p`.
fn val(r: usize, p: usize, i: usize) -> i64 {
    (r as i64) * 1_000_000_000 + (p as i64) * 10_000_000 + i as i64
}

const SENTINEL: i64 = -7;

/// One uneven all_to_allv checked against the closed form: send blocks stored in reverse rank
/// order, receive blocks with a one-element gap before each (the gaps must stay untouched).
fn uneven(c: &Communicator, big: usize) {
    let (r, n) = (c.rank(), c.size());
    let sc: Vec<usize> = (0..n).map(|p| cnt(r, p, big)).collect();
    let rc: Vec<usize> = (0..n).map(|p| cnt(p, r, big)).collect();
    let mut sd = vec![0; n];
    let mut at = 0;
    for p in (0..n).rev() {
        sd[p] = at;
        at += sc[p];
    }
    let mut send = vec![0i64; at];
    for p in 0..n {
        for i in 0..sc[p] {
            send[sd[p] + i] = val(r, p, i);
        }
    }
    let mut rd = vec![0; n];
    let mut at = 0;
    for p in 0..n {
        at += 1;
        rd[p] = at;
        at += rc[p];
    }
    let mut recv = vec![SENTINEL; at + 1];
    c.all_to_allv(&send, &sc, &sd, &mut recv, &rc, &rd).unwrap();
    let mut want = vec![SENTINEL; at + 1];
    for p in 0..n {
        for i in 0..rc[p] {
            want[rd[p] + i] = val(p, r, i);
        }
    }
    assert!(recv == want, "rank {r} of {n}: all_to_allv (big {big})");
}

#[test]
fn all_to_allv_uneven_on_1_to_4_ranks() {
    for n in 1..=4 {
        with_ranks(n, |c| {
            for big in [0, 5, 3000, 70_000] {
                uneven(c, big);
            }
            // Zero counts everywhere.
            let z = vec![0usize; n];
            let mut none: [i64; 0] = [];
            c.all_to_allv::<i64>(&[], &z, &z, &mut none, &z, &z)
                .unwrap();
            // Interleaved with other collectives: the sequence numbers keep them apart.
            let mut x = vec![c.rank() as f32; 33];
            c.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap();
            uneven(c, 17);
            c.barrier().unwrap();
            uneven(c, 0);
            assert!(x.iter().all(|v| *v == (n * (n - 1) / 2) as f32));
        });
    }
}

#[test]
fn all_to_allv_raw_and_nonblocking() {
    with_ranks(3, |c| {
        let (r, n) = (c.rank(), c.size());
        // Equal blocks of 2 + rank elements... received as (2 + p) from p.
        let sc: Vec<usize> = vec![2 + r; n];
        let sd: Vec<usize> = (0..n).map(|p| p * (2 + r)).collect();
        let rc: Vec<usize> = (0..n).map(|p| 2 + p).collect();
        let rd: Vec<usize> = (0..n).map(|p| (0..p).map(|q| 2 + q).sum()).collect();
        let send: Vec<f64> = (0..n * (2 + r))
            .map(|i| (r * 100 + (i / (2 + r)) * 10 + i % (2 + r)) as f64)
            .collect();
        let total: usize = rc.iter().sum();
        let want: Vec<f64> = (0..n)
            .flat_map(|p| (0..2 + p).map(move |i| (p * 100 + r * 10 + i) as f64))
            .collect();
        let mut recv = vec![0f64; total];
        // SAFETY: the counts and displacements describe blocks inside `send` and `recv`.
        unsafe {
            c.all_to_allv_raw(
                DataType::F64,
                send.as_ptr().cast(),
                &sc,
                &sd,
                recv.as_mut_ptr().cast(),
                &rc,
                &rd,
            )
        }
        .unwrap();
        assert_eq!(recv, want);
        let mut recv2 = vec![0f64; total];
        let (sc2, sd2, rc2, rd2) = (sc.clone(), sd.clone(), rc.clone(), rd.clone());
        // SAFETY: as above; the buffers outlive the wait below and are not touched meanwhile.
        let h = unsafe {
            c.iall_to_allv_raw(
                DataType::F64,
                send.as_ptr().cast(),
                &sc2,
                &sd2,
                recv2.as_mut_ptr().cast(),
                &rc2,
                &rd2,
            )
        }
        .unwrap();
        // The arrays may go away once the call returned.
        drop((sc2, sd2, rc2, rd2));
        // A blocking collective issued meanwhile runs after it.
        let mut y = [1u32; 5];
        c.all_reduce_inplace(&mut y, ReduceOp::Sum).unwrap();
        h.wait().unwrap();
        assert_eq!(recv2, want);
        assert_eq!(y, [3; 5]);
        // In place (overlapping send and receive blocks) is refused before anything is sent.
        let mut buf = vec![0f64; 64];
        let p = buf.as_mut_ptr();
        // SAFETY: every block lies inside `buf`.
        let e = unsafe {
            c.all_to_allv_raw(
                DataType::F64,
                p.cast_const().cast(),
                &[2; 3],
                &[0, 2, 4],
                p.cast(),
                &[2; 3],
                &[1, 3, 5],
            )
        }
        .unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidArgument, "{e}");
        assert!(e.to_string().contains("in-place"), "{e}");
        // NULL buffers with counts.
        // SAFETY: NULL is refused before it is used.
        let e = unsafe {
            c.all_to_allv_raw(
                DataType::F64,
                std::ptr::null(),
                &[1; 3],
                &[0, 1, 2],
                recv.as_mut_ptr().cast(),
                &rc,
                &rd,
            )
        }
        .unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidArgument, "{e}");
        // Still usable.
        c.barrier().unwrap();
    });
}

#[test]
fn all_to_allv_argument_errors_are_not_sticky() {
    with_ranks(2, |c| {
        let r = c.rank();
        let send = [1i32; 8];
        let mut recv = [0i32; 8];
        let check = |e: braid::Error, what: &str| {
            assert_eq!(e.class(), ErrorClass::InvalidArgument, "{what}: {e}");
        };
        // Arrays of the wrong length.
        check(
            c.all_to_allv(&send, &[1], &[0], &mut recv, &[1, 1], &[0, 1])
                .unwrap_err(),
            "short array",
        );
        // A block outside the buffer, and a displacement that overflows.
        check(
            c.all_to_allv(&send, &[1, 1], &[0, 8], &mut recv, &[1, 1], &[0, 1])
                .unwrap_err(),
            "outside",
        );
        check(
            c.all_to_allv(
                &send,
                &[1, 1],
                &[0, usize::MAX],
                &mut recv,
                &[1, 1],
                &[0, 1],
            )
            .unwrap_err(),
            "overflow",
        );
        // Overlapping receive blocks.
        check(
            c.all_to_allv(&send, &[2, 2], &[0, 2], &mut recv, &[2, 2], &[0, 1])
                .unwrap_err(),
            "overlap",
        );
        // This rank's own counts differ.
        let mut sc = [1, 1];
        sc[r] = 2;
        let e = c
            .all_to_allv(&send, &sc, &[0, 2], &mut recv, &[1, 1], &[0, 2])
            .unwrap_err();
        assert!(e.to_string().contains("mismatch"), "{e}");
        check(e, "own block");
        // Zero-count blocks may have any displacement.
        c.all_to_allv(&send, &[0, 0], &[99, 99], &mut recv, &[0, 0], &[99, 99])
            .unwrap();
        c.all_to_allv(&send, &[2, 2], &[4, 0], &mut recv, &[2, 2], &[0, 2])
            .unwrap();
        assert_eq!(recv, [1, 1, 1, 1, 0, 0, 0, 0]);
    });
}

/// Runs `f` on 3 ranks and checks that every rank in `affected` fails with "mismatch"
/// within 10 s (the others may fail too, naming it, or succeed), never hanging. Every rank
/// keeps its communicator until all have their result (a rank that closes its connections at
/// once may make a slower one report the lost peer instead of the mismatch).
fn mismatch_case(affected: &[usize], f: impl Fn(&Communicator) -> braid::Result<()> + Send + Sync) {
    let errs = Mutex::new(Vec::new());
    let gate = Barrier::new(3);
    with_ranks(3, |c| {
        let t0 = Instant::now();
        let res = f(c);
        // A rank that only sent may learn of it at its next call.
        let res = res.and_then(|()| c.barrier());
        let took = t0.elapsed();
        assert!(
            took < Duration::from_secs(10),
            "rank {}: {took:?}",
            c.rank()
        );
        errs.lock().unwrap().push((c.rank(), res));
        gate.wait();
    });
    let errs = errs.into_inner().unwrap();
    for (r, res) in errs {
        match res {
            Err(e) => assert!(e.to_string().contains("mismatch"), "rank {r}: {e}"),
            Ok(()) => assert!(!affected.contains(&r), "rank {r} did not fail"),
        }
    }
}

#[test]
fn all_to_allv_count_mismatch_fails_on_the_affected_ranks() {
    // Rank 1 expects one element more from rank 0 than rank 0 sends it (and a large block
    // from rank 2, which is right).
    for big in [1usize, 100_000] {
        mismatch_case(&[0, 1], move |c| {
            let (r, n) = (c.rank(), c.size());
            let sc: Vec<usize> = (0..n).map(|p| if p == r { 1 } else { big }).collect();
            let mut rc = sc.clone();
            if r == 1 {
                rc[0] += 1;
            }
            let sd: Vec<usize> = (0..n).map(|p| p * big).collect();
            let rd: Vec<usize> = (0..n).map(|p| p * (big + 1)).collect();
            let send = vec![r as u8; n * big];
            let mut recv = vec![0u8; n * (big + 1)];
            c.all_to_allv(&send, &sc, &sd, &mut recv, &rc, &rd)
        });
    }
    // Rank 2 sends rank 0 fewer elements than rank 0 expects; rank 1 is not involved.
    mismatch_case(&[0, 2], |c| {
        let (r, n) = (c.rank(), c.size());
        let mut sc = vec![4usize; n];
        if r == 2 {
            sc[0] = 3;
        }
        let rc = vec![4usize; n];
        let d: Vec<usize> = (0..n).map(|p| 4 * p).collect();
        let send = vec![1f32; 4 * n];
        let mut recv = vec![0f32; 4 * n];
        c.all_to_allv(&send, &sc, &d, &mut recv, &rc, &d)
    });
}

#[test]
fn all_to_allv_against_another_collective_is_a_mismatch() {
    mismatch_case(&[0, 1, 2], |c| {
        let n = c.size();
        if c.rank() == 0 {
            let s = vec![1i64; n];
            let mut x = vec![0i64; n];
            let d: Vec<usize> = (0..n).collect();
            c.all_to_allv(&s, &vec![1; n], &d, &mut x, &vec![1; n], &d)
        } else {
            let s = vec![1i64; n];
            let mut x = vec![0i64; n];
            c.all_to_all(&s, &mut x)
        }
    });
}

// ---- split and create_group --------------------------------------------------------------

/// Every rank's parent rank, gathered over `c` (in `c`'s rank order).
fn parents(c: &Communicator, parent_rank: usize) -> Vec<u64> {
    let mut all = vec![0u64; c.size()];
    c.all_gather(&[parent_rank as u64], &mut all).unwrap();
    all
}

fn split_suite(c: &Communicator) {
    let (r, n) = (c.rank(), c.size());
    assert_eq!(n, 4);
    // Two colors; keys reverse the order.
    let sub = c.split(Some((r % 2) as u32), -(r as i64)).unwrap().unwrap();
    assert_eq!(sub.size(), 2);
    let order = if r % 2 == 0 { vec![2, 0] } else { vec![3, 1] };
    assert_eq!(sub.rank(), order.iter().position(|&x| x == r).unwrap());
    assert_eq!(
        parents(&sub, r),
        order.iter().map(|&x| x as u64).collect::<Vec<_>>()
    );
    // NOCOLOR ranks take part but get nothing; equal keys keep the parent order.
    let color = if r == 2 { None } else { Some(7) };
    let trio = c.split(color, 0).unwrap();
    assert_eq!(trio.is_none(), r == 2);
    // Interleave collectives on the parent and both children.
    for i in 0..20i64 {
        let mut a = vec![r as i64 + i; 100];
        c.all_reduce_inplace(&mut a, ReduceOp::Sum).unwrap();
        assert!(a.iter().all(|v| *v == 6 + 4 * i));
        let mut b = vec![r as i64 * i; 10];
        sub.all_reduce_inplace(&mut b, ReduceOp::Sum).unwrap();
        let want: i64 = order.iter().map(|&x| x as i64 * i).sum();
        assert!(b.iter().all(|v| *v == want));
        if let Some(t) = &trio {
            assert_eq!(t.size(), 3);
            assert_eq!(parents(t, r), vec![0, 1, 3]);
            let mut m = [r as f32 + i as f32];
            t.all_reduce_inplace(&mut m, ReduceOp::Max).unwrap();
            assert_eq!(m[0], 3.0 + i as f32);
        }
        uneven(&sub, 10 + i as usize);
        uneven(c, 100 + i as usize);
        let h = sub.iall_reduce(vec![1u8; 64], ReduceOp::Sum).unwrap();
        c.barrier().unwrap();
        assert_eq!(h.wait().unwrap(), vec![2u8; 64]);
    }
    // Splitting again with the same colors gives new, independent communicators.
    let again = c.split(Some((r % 2) as u32), -(r as i64)).unwrap().unwrap();
    assert_eq!(parents(&again, r), parents(&sub, r));
    // Children of children.
    let single = sub.split(Some(sub.rank() as u32), 0).unwrap().unwrap();
    assert_eq!((single.size(), single.rank()), (1, 0));
    single.barrier().unwrap();
    // Dropping a child leaves the parent and the other children working.
    drop(again);
    c.barrier().unwrap();
    sub.barrier().unwrap();
}

#[test]
fn split_in_process() {
    with_ranks(4, split_suite);
}

#[test]
fn split_over_tcp() {
    with_net_ranks(4, TransportKind::Tcp, |c| {
        split_suite(c);
        // The child has its own connections.
        let sub = c.split(Some(0), 0).unwrap().unwrap();
        assert_eq!(sub.transport_name(), "tcp");
        assert_ne!(sub.listen_addr(), c.listen_addr());
        uneven(&sub, 50_000);
    });
}

#[test]
fn split_over_shared_memory() {
    with_net_ranks(4, TransportKind::Auto, |c| {
        let sub = c.split(Some((c.rank() / 2) as u32), 0).unwrap().unwrap();
        assert_eq!(sub.transport_name(), "shm");
        for big in [3, 300_000] {
            uneven(&sub, big);
            uneven(c, big);
        }
        // Large all_to_allv with shared buffers still runs on the shm rings.
        let n = sub.size();
        let count = 1 << 18;
        let mut send = sub.alloc_shared::<f32>(count * n).unwrap();
        for (i, v) in send.iter_mut().enumerate() {
            *v = (sub.rank() * 10 + i / count) as f32;
        }
        let mut recv = sub.alloc_shared::<f32>(count * n).unwrap();
        let cs = vec![count; n];
        let ds: Vec<usize> = (0..n).map(|p| p * count).collect();
        sub.all_to_allv(&send, &cs, &ds, &mut recv, &cs, &ds)
            .unwrap();
        for p in 0..n {
            assert!(recv[p * count..(p + 1) * count]
                .iter()
                .all(|v| *v == (p * 10 + sub.rank()) as f32));
        }
    });
}

#[test]
fn create_group_on_a_subset_while_the_others_use_the_parent() {
    with_ranks(4, |c| {
        let r = c.rank();
        if r == 1 || r == 3 {
            // Members only; the new rank is the position in the list.
            let g = c.create_group(&[3, 1], 5).unwrap();
            assert_eq!(g.rank(), if r == 3 { 0 } else { 1 });
            assert_eq!(parents(&g, r), vec![3, 1]);
            for i in 0..50u32 {
                let mut x = [r as u32 + i; 16];
                g.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap();
                assert_eq!(x, [4 + 2 * i; 16]);
            }
            uneven(&g, 1000);
            // Same members and tag again: a new communicator (creations are counted).
            let g2 = c.create_group(&[3, 1], 5).unwrap();
            uneven(&g2, 3);
            g.barrier().unwrap();
        } else {
            // Meanwhile ranks 0 and 2 talk over the parent.
            let peer = 2 - r;
            for i in 0..50u64 {
                let mut got = [0u64; 4];
                c.group()
                    .send(&[r as u64 + i; 4], peer, i)
                    .unwrap()
                    .recv(&mut got, peer, i)
                    .unwrap()
                    .run()
                    .unwrap();
                assert_eq!(got, [peer as u64 + i; 4]);
            }
        }
        // Everyone back on the parent.
        let mut x = [1i32; 3];
        c.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap();
        assert_eq!(x, [4; 3]);
        // Concurrent creations over the same members, told apart by their tags.
        std::thread::scope(|s| {
            let a = s.spawn(|| c.create_group(&[0, 1, 2, 3], 1).unwrap());
            let b = s.spawn(|| c.create_group(&[3, 2, 1, 0], 2).unwrap());
            let (a, b) = (a.join().unwrap(), b.join().unwrap());
            assert_eq!(a.rank(), r);
            assert_eq!(b.rank(), 3 - r);
            let mut x = [r as u64; 2];
            a.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap();
            let mut y = [b.rank() as u64; 2];
            b.all_reduce_inplace(&mut y, ReduceOp::Max).unwrap();
            assert_eq!((x, y), ([6; 2], [3; 2]));
        });
    });
}

#[test]
fn create_group_argument_errors() {
    with_ranks(3, |c| {
        let r = c.rank();
        let others: Vec<usize> = (0..3).filter(|&x| x != r).collect();
        for (ranks, what) in [
            (vec![], "empty"),
            (vec![r, 3], "out of range"),
            (vec![r, r], "twice"),
            (others, "without this rank"),
        ] {
            let e = c.create_group(&ranks, 0).err().unwrap();
            assert_eq!(e.class(), ErrorClass::InvalidArgument, "{what}: {e}");
        }
        // The parent is unaffected, and a valid creation works afterwards.
        c.barrier().unwrap();
        let g = c.create_group(&[0, 1, 2], 0).unwrap();
        g.barrier().unwrap();
    });
}

#[test]
fn children_outlive_the_parent_and_the_coordinator() {
    let n = 3;
    let coord = Mutex::new(Some(Coordinator::bind("127.0.0.1:0").unwrap()));
    let addr = coord
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .local_addr()
        .to_string();
    let fabric = MemFabric::new();
    let gate = Barrier::new(n);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (addr, fabric, coord, gate) = (addr.clone(), fabric.clone(), &coord, &gate);
                s.spawn(move || {
                    let parent = Communicator::init_in_process(cfg(&addr, n, r), fabric).unwrap();
                    let child = parent.split(Some(0), -(r as i64)).unwrap().unwrap();
                    drop(parent);
                    child.barrier().unwrap();
                    gate.wait();
                    if r == 0 {
                        drop(coord.lock().unwrap().take());
                    }
                    gate.wait();
                    // No coordinator any more: a non-elastic communicator runs on.
                    for i in 0..20 {
                        uneven(&child, i * 7);
                        let mut x = [1f64; 9];
                        child.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap();
                        assert_eq!(x, [3.0; 9]);
                    }
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

#[test]
fn a_hosted_coordinator_lives_as_long_as_a_child() {
    // Rank 0 hosts the coordinator (torchrun convention); the parents are dropped, the child
    // still creates communicators through it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let n = 3;
    let fabric = MemFabric::new();
    let gate = Arc::new(Barrier::new(n));
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (addr, fabric, gate) = (addr.clone(), fabric.clone(), gate.clone());
                s.spawn(move || {
                    if r > 0 {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    let parent = Communicator::init_in_process(
                        Config {
                            host_coordinator: r == 0,
                            ..cfg(&addr, n, r)
                        },
                        fabric,
                    )
                    .unwrap();
                    let child = parent.create_group(&[2, 1, 0], 0).unwrap();
                    gate.wait();
                    drop(parent);
                    gate.wait();
                    let grandchild = child.split(Some(0), 0).unwrap().unwrap();
                    assert_eq!(grandchild.rank(), 2 - r);
                    uneven(&grandchild, 11);
                    uneven(&child, 12);
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

#[test]
fn the_coordinator_forgets_the_groups_of_dropped_communicators() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let fabric = MemFabric::new();
    let names = Mutex::new(Vec::new());
    let gate = Barrier::new(4);
    std::thread::scope(|s| {
        for r in 0..4 {
            let (addr, fabric, names, gate, coord) =
                (addr.clone(), fabric.clone(), &names, &gate, &coord);
            s.spawn(move || {
                let c = Communicator::init_in_process(cfg(&addr, 4, r), fabric).unwrap();
                let mut kids = Vec::new();
                for i in 0..5u32 {
                    kids.push(c.split(Some(i % 2 + r as u32 % 2), 0).unwrap().unwrap());
                }
                kids.push(c.create_group(&[0, 1, 2, 3], 1).unwrap());
                for k in &kids {
                    k.barrier().unwrap();
                    names.lock().unwrap().push(k.config().group.clone());
                }
                gate.wait();
                if r == 0 {
                    // Parent and children: 1 + 2 per split + 1.
                    let st = coord.status();
                    assert_eq!(st["groups"].as_array().unwrap().len(), 12, "{st}");
                }
                gate.wait();
            });
        }
    });
    let names = names.into_inner().unwrap();
    assert!(
        names
            .iter()
            .all(|n| n.len() <= 256 && n.starts_with("world~")),
        "{names:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = coord.status();
        if st["groups"].as_array().is_some_and(|g| g.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "groups left behind: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
