//! Lazy connections (BRAID_LAZY_CONNECT): a peer is connected at the first operation that
//! exchanges data with it. Ranks are threads over the in-process transport; the connections a
//! rank holds are read with `Communicator::connected_peers`. Expected values are closed forms.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Barrier};
use std::time::Duration;

use braid::membership::Coordinator;
use braid::transport::mem::MemFabric;
use braid::{Communicator, Config, Error, ReduceOp};

/// Runs `f(rank, communicator)` on `n` in-process ranks; `lazy` sets BRAID_LAZY_CONNECT.
fn with_ranks(
    n: usize,
    lazy: bool,
    timeout: Duration,
    f: impl Fn(usize, Communicator) + Send + Sync,
) {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let fabric = MemFabric::new();
    let f = Arc::new(f);
    std::thread::scope(|s| {
        for r in 0..n {
            let (addr, fabric, f) = (addr.clone(), fabric.clone(), f.clone());
            s.spawn(move || {
                let cfg = Config {
                    coordinator: Some(addr),
                    world_size: Some(n),
                    rank: Some(r),
                    lazy_connect: lazy,
                    // The single-copy path exchanges with every peer: keep it out of the counts.
                    shm_direct: false,
                    slice_bytes: 4096,
                    timeout,
                    ..Config::default()
                };
                let c = Communicator::init_in_process(cfg, fabric).unwrap();
                assert_eq!(c.rank(), r);
                f(r, c);
            });
        }
    });
}

fn everyone_but(n: usize, r: usize) -> Vec<usize> {
    (0..n).filter(|&p| p != r).collect()
}

#[test]
fn a_ring_all_reduce_connects_the_ring_neighbours_and_all_to_all_connects_everyone() {
    const N: usize = 8;
    with_ranks(N, true, Duration::from_secs(60), |r, c| {
        assert_eq!(c.connected_peers(), Vec::<usize>::new(), "nothing at init");
        // 200 000 f32 (800 KB): the ring all-reduce by default.
        let len = 200_000;
        let send: Vec<f32> = (0..len).map(|i| (r * 7 + i % 13) as f32).collect();
        let mut recv = vec![0f32; len];
        c.all_reduce(&send, &mut recv, ReduceOp::Sum).unwrap();
        for (i, x) in recv.iter().enumerate() {
            let want: usize = (0..N).map(|q| q * 7 + i % 13).sum();
            assert_eq!(*x, want as f32, "element {i}");
        }
        let mut ring = vec![(r + 1) % N, (r + N - 1) % N];
        ring.sort_unstable();
        assert_eq!(
            c.connected_peers(),
            ring,
            "rank {r}: the ring neighbours only"
        );
        // A second ring all-reduce connects nothing more.
        c.all_reduce_inplace(&mut recv, ReduceOp::Max).unwrap();
        assert_eq!(c.connected_peers(), ring);
        // All-to-all: every pair.
        let send: Vec<u64> = (0..N).map(|q| (r * 100 + q) as u64).collect();
        let mut got = vec![0u64; N];
        c.all_to_all(&send, &mut got).unwrap();
        let want: Vec<u64> = (0..N).map(|q| (q * 100 + r) as u64).collect();
        assert_eq!(got, want);
        assert_eq!(c.connected_peers(), everyone_but(N, r));
    });
}

#[test]
fn point_to_point_connects_only_the_pair() {
    const N: usize = 4;
    with_ranks(N, true, Duration::from_secs(60), |r, c| {
        // 3 -> 0 (the higher rank sends first: it waits for 0's connection), then 1 -> 2.
        match r {
            0 => {
                let mut b = [0u32; 3];
                c.recv(&mut b, 3, 7).unwrap();
                assert_eq!(b, [3, 30, 300]);
                assert_eq!(c.connected_peers(), vec![3]);
            }
            3 => {
                c.send(&[3u32, 30, 300], 0, 7).unwrap();
                assert_eq!(c.connected_peers(), vec![0]);
            }
            1 => {
                c.send(&[1u8], 2, 1).unwrap();
                assert_eq!(c.connected_peers(), vec![2]);
            }
            _ => {
                let mut b = [0u8];
                c.recv(&mut b, 1, 1).unwrap();
                assert_eq!(b, [1]);
                assert_eq!(c.connected_peers(), vec![1]);
            }
        }
        // A barrier afterwards still works (its own peers are connected at their first use).
        c.barrier().unwrap();
    });
}

#[test]
fn eager_set_up_connects_everyone_at_init() {
    const N: usize = 5;
    with_ranks(N, false, Duration::from_secs(60), |r, c| {
        assert_eq!(c.connected_peers(), everyone_but(N, r));
        let mut v = [r as u64 + 1];
        c.all_reduce_inplace(&mut v, ReduceOp::Sum).unwrap();
        assert_eq!(v, [(N * (N + 1) / 2) as u64]);
    });
}

#[test]
fn connecting_to_a_peer_that_died_before_first_use_names_it() {
    // Rank 1 is gone (its communicator dropped, its listener closed) before any operation:
    // rank 0, the lower rank, connects at its first send and fails naming rank 1 and its host.
    let done = Barrier::new(2);
    with_ranks(2, true, Duration::from_secs(20), |r, c| {
        let host = c.view().members[1].hostname.clone();
        if r == 1 {
            drop(c);
            done.wait();
            return;
        }
        done.wait();
        let e = c.send(&[1u8, 2, 3], 1, 0).unwrap_err();
        match &e {
            Error::PeerLost {
                rank,
                host: h,
                detail,
                ..
            } => {
                assert_eq!(*rank, 1, "{e}");
                assert_eq!(*h, host, "{e}");
                assert!(detail.contains("connecting"), "{e}");
            }
            other => panic!("expected PeerLost naming rank 1, got {other}"),
        }
        // Sticky: the next call fails with it too.
        assert_eq!(c.barrier().unwrap_err().to_string(), e.to_string());
    });
}

#[test]
fn waiting_for_a_lower_peer_that_died_before_first_use_names_it() {
    // Rank 0 is gone before any operation: rank 1, the higher rank, waits for its connection
    // at its first receive until BRAID_TIMEOUT, then fails naming rank 0 and its host.
    let done = Barrier::new(2);
    with_ranks(2, true, Duration::from_secs(2), |r, c| {
        let host = c.view().members[0].hostname.clone();
        if r == 0 {
            drop(c);
            done.wait();
            return;
        }
        done.wait();
        let mut b = [0u8; 3];
        let e = c.recv(&mut b, 0, 0).unwrap_err();
        match &e {
            Error::Timeout { what, .. } => {
                assert!(what.contains(&format!("rank 0 ({host})")), "{e}");
            }
            other => panic!("expected a Timeout naming rank 0, got {other}"),
        }
    });
}

#[test]
fn an_elastic_group_is_lazy_at_init_and_a_view_adopted_by_update_connects_every_pair() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    std::thread::scope(|s| {
        for _ in 0..4 {
            let addr = addr.clone();
            s.spawn(move || {
                let cfg = Config {
                    coordinator: Some(addr),
                    world_size: Some(4),
                    timeout: Duration::from_secs(20),
                    init_timeout: Duration::from_secs(30),
                    transport: braid::config::TransportKind::Tcp,
                    elastic: true,
                    join_window: Duration::from_millis(200),
                    heartbeat: Duration::from_millis(200),
                    heartbeat_timeout: Duration::from_secs(3),
                    lazy_connect: true,
                    ..Config::default()
                };
                let mut c = Communicator::init_with(cfg).unwrap();
                let r = c.rank();
                assert_eq!(c.connected_peers(), Vec::<usize>::new(), "nothing at init");
                // An 8-byte all-reduce on 4 ranks: recursive doubling, partners r^1 and r^2.
                let mut x = [1u64 << r];
                c.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap();
                assert_eq!(x, [15]);
                let mut partners = vec![r ^ 1, r ^ 2];
                partners.sort_unstable();
                assert_eq!(c.connected_peers(), partners);
                // Rank 3 leaves; the others adopt the view of three.
                let leaver = r == 3;
                if leaver {
                    c.leave().unwrap();
                }
                loop {
                    let mut x = [1u64];
                    c.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap();
                    assert_eq!(x, [c.size() as u64]);
                    if c.update().unwrap() {
                        break;
                    }
                }
                if leaver {
                    assert!(c.has_left());
                    return;
                }
                assert_eq!(c.size(), 3);
                assert_eq!(c.connected_peers(), everyone_but(3, c.rank()));
                let mut x = [c.rank() as u64 + 1];
                c.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap();
                assert_eq!(x, [6]);
            });
        }
    });
}

#[test]
fn a_lower_rank_that_aborts_before_first_use_tells_the_higher_rank_waiting_for_it() {
    // Rank 0 aborts without ever connecting to rank 1, which waits for rank 0's connection at
    // its first receive: rank 0 connects only to tell it, and rank 1 fails at once naming
    // rank 0 (not at BRAID_TIMEOUT, 60 s here).
    with_ranks(2, true, Duration::from_secs(60), |r, c| {
        if r == 0 {
            c.abort();
            assert!(matches!(c.barrier(), Err(Error::Aborted)));
            return;
        }
        let mut b = [0u8; 3];
        match c.recv(&mut b, 0, 0) {
            Err(Error::Remote { rank, detail, .. }) => {
                assert_eq!(rank, 0);
                assert!(detail.contains("abort"), "{detail}");
            }
            other => panic!("expected Remote naming rank 0, got {other:?}"),
        }
    });
}

#[test]
fn a_higher_rank_that_aborts_before_first_use_refuses_the_lower_ranks_connection() {
    // Rank 1 aborts (and stays, its listener open); rank 0 connects to it at its first
    // receive and is told at once by the aborted rank's acceptor.
    let done = Barrier::new(2);
    with_ranks(2, true, Duration::from_secs(60), |r, c| {
        if r == 1 {
            c.abort();
            done.wait();
            return;
        }
        let mut b = [0u8; 3];
        let got = c.recv(&mut b, 1, 0);
        done.wait();
        match got {
            Err(Error::Remote { rank, .. }) => assert_eq!(rank, 1),
            other => panic!("expected Remote naming rank 1, got {other:?}"),
        }
    });
}

/// Why lazy connections are off by default: a non-blocking chain (rank 1's isend to rank 2
/// must progress while its irecv from rank 0 waits; rank 0 sends only after rank 2 forwarded)
/// completes with connections made at init. With BRAID_LAZY_CONNECT=1 it waits until
/// BRAID_TIMEOUT (rank 1's progress thread stops at the irecv waiting for rank 0's connection).
#[test]
fn a_nonblocking_chain_completes_with_eager_connections() {
    // rank 1: isend(2) then irecv(0); rank 2: recv(1) then send(0); rank 0: recv(2) then send(1)
    with_ranks(3, false, Duration::from_secs(20), |r, c| {
        let big = 8 << 20;
        match r {
            0 => {
                let mut b = vec![0u8; 16];
                c.recv(&mut b, 2, 1).unwrap();
                c.send(&b, 1, 2).unwrap();
            }
            1 => {
                let h1 = c.isend(vec![7u8; big], 2, 3).unwrap();
                let h2 = c.irecv(vec![0u8; 16], 0, 2).unwrap();
                h1.wait().unwrap();
                h2.wait().unwrap();
            }
            _ => {
                let mut b = vec![0u8; big];
                c.recv(&mut b, 1, 3).unwrap();
                c.send(&b[..16], 0, 1).unwrap();
            }
        }
    });
}
