//! Lazy connections (BRAID_LAZY_CONNECT, on by default): a peer is connected at the first
//! operation that exchanges data with it, by either side (a higher rank asks the lower one to
//! dial it), so programs that work with connections made at init work the same. Ranks are
//! threads over the in-process transport (one test over tcp); the connections a rank holds
//! are read with `Communicator::connected_peers`, the connections made are counted by
//! [`Counting`]. Expected values are closed forms.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use braid::membership::Coordinator;
use braid::transport::mem::{MemFabric, MemTransport};
use braid::transport::{
    Challenge, Conn, ConnectHandle, DeviceProps, HelloFn, Listener, NetResult, Transport,
};
use braid::{Communicator, Config, Error, ReduceOp};

/// Runs `f(rank, communicator)` on `n` in-process ranks; `lazy` sets BRAID_LAZY_CONNECT.
fn with_ranks(
    n: usize,
    lazy: bool,
    timeout: Duration,
    f: impl Fn(usize, Communicator) + Send + Sync,
) {
    with_ranks_over(n, lazy, timeout, false, f)
}

/// [`with_ranks`], over tcp with `tcp` (ranks are still threads of this process).
fn with_ranks_over(
    n: usize,
    lazy: bool,
    timeout: Duration,
    tcp: bool,
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
                    transport: braid::config::TransportKind::Tcp,
                    ..Config::default()
                };
                let c = if tcp {
                    Communicator::init_with(cfg).unwrap()
                } else {
                    Communicator::init_in_process(cfg, fabric).unwrap()
                };
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
fn asking_a_lower_peer_that_died_before_first_use_names_it() {
    // Rank 0 is gone before any operation: rank 1, the higher rank, asks it to connect at its
    // first receive; the request cannot be delivered and the receive fails at once (not at
    // BRAID_TIMEOUT, 60 s here) naming rank 0 and its host.
    let done = Barrier::new(2);
    with_ranks(2, true, Duration::from_secs(60), |r, c| {
        let host = c.view().members[0].hostname.clone();
        if r == 0 {
            drop(c);
            done.wait();
            return;
        }
        done.wait();
        let t = Instant::now();
        let mut b = [0u8; 3];
        let e = c.recv(&mut b, 0, 0).unwrap_err();
        match &e {
            Error::PeerLost {
                rank,
                host: h,
                detail,
                ..
            } => {
                assert_eq!(*rank, 0, "{e}");
                assert_eq!(*h, host, "{e}");
                assert!(detail.contains("asking it to connect"), "{e}");
            }
            other => panic!("expected PeerLost naming rank 0, got {other}"),
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
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

/// A non-blocking chain: rank 1's isend to rank 2 must progress while its irecv from rank 0
/// waits; rank 0 sends only after rank 2 forwarded. It completes with connections made at init
/// and with lazy ones (rank 1 asks rank 0 to connect: rank 0's acceptor side dials while its
/// application waits in recv(2); rank 1's progress thread keeps the isend going meanwhile).
fn nonblocking_chain(lazy: bool) {
    // rank 1: isend(2) then irecv(0); rank 2: recv(1) then send(0); rank 0: recv(2) then send(1)
    with_ranks(3, lazy, Duration::from_secs(20), |r, c| {
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

#[test]
fn a_nonblocking_chain_completes_with_eager_connections() {
    nonblocking_chain(false);
}

#[test]
fn a_nonblocking_chain_completes_with_lazy_connections() {
    let t = Instant::now();
    nonblocking_chain(true);
    // Well under BRAID_TIMEOUT (20 s): nothing waited for an application.
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
}

/// A small blocking send to a rank that is busy elsewhere, then a barrier: with 6 ranks the
/// dissemination barrier pairs ranks at distances 1 and 2 (and 4 = -2) only, never 0 and 3.
/// Rank 3 sends to rank 0 first (over tcp it is buffered: it completes before rank 0
/// receives; the in-process transport would wait for the receive); rank 0 receives only after
/// the barrier. Eager connections complete it; lazy ones too (rank 3 asks rank 0, whose
/// acceptor side dials while its application is in the barrier).
fn send_then_barrier(lazy: bool) {
    const N: usize = 6;
    with_ranks_over(N, lazy, Duration::from_secs(20), true, |r, c| {
        match r {
            3 => {
                c.send(&[3u32, 33], 0, 5).unwrap();
                c.barrier().unwrap();
            }
            0 => {
                c.barrier().unwrap();
                let mut b = [0u32; 2];
                c.recv(&mut b, 3, 5).unwrap();
                assert_eq!(b, [3, 33]);
            }
            _ => c.barrier().unwrap(),
        }
        if lazy {
            // The barrier's peers (r ± 1, r ± 2), and the pair 0-3.
            let mut want: Vec<usize> = [1, 2, N - 1, N - 2].iter().map(|d| (r + d) % N).collect();
            if r == 0 || r == 3 {
                want.push(3 - r);
            }
            want.sort_unstable();
            want.dedup();
            assert_eq!(c.connected_peers(), want, "rank {r}");
        }
    });
}

#[test]
fn a_send_then_a_barrier_that_does_not_pair_them_completes_with_eager_connections() {
    send_then_barrier(false);
}

#[test]
fn a_send_then_a_barrier_that_does_not_pair_them_completes_with_lazy_connections() {
    let t = Instant::now();
    send_then_barrier(true);
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
}

/// A transport that counts the connections it makes: data connections and dial-back requests
/// (flag 2 of the hello's flags, bytes 6..8).
struct Counting {
    inner: MemTransport,
    data: Arc<AtomicUsize>,
    asks: Arc<AtomicUsize>,
}

impl Transport for Counting {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn devices(&self) -> NetResult<Vec<DeviceProps>> {
        self.inner.devices()
    }
    fn listen(&self, dev: usize) -> NetResult<(Box<dyn Listener>, ConnectHandle)> {
        self.inner.listen(dev)
    }
    fn connect_challenged(
        &self,
        handle: &ConnectHandle,
        hello: HelloFn<'_>,
        deadline: Instant,
    ) -> NetResult<Box<dyn Conn>> {
        let ask = AtomicBool::new(false);
        let c = self.inner.connect_challenged(
            handle,
            &|ch: &Challenge| {
                let h = hello(ch);
                ask.store(h.len() > 8 && h[6] & 2 != 0, Ordering::SeqCst);
                h
            },
            deadline,
        )?;
        if ask.load(Ordering::SeqCst) {
            self.asks.fetch_add(1, Ordering::SeqCst);
        } else {
            self.data.fetch_add(1, Ordering::SeqCst);
        }
        Ok(c)
    }
}

#[test]
fn both_ends_of_every_pair_first_using_it_at_once_make_one_connection() {
    // Every rank starts a non-blocking exchange with every other rank at once (both ends of
    // every pair need it at the same moment: the lower one dials, the higher one asks), then
    // an all-to-all: exactly one data connection per pair (a request that finds the pair
    // being connected is not answered with a second dial).
    const N: usize = 6;
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let fabric = MemFabric::new();
    let (data, asks) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    std::thread::scope(|s| {
        for r in 0..N {
            let (addr, fabric) = (addr.clone(), fabric.clone());
            let (data, asks) = (data.clone(), asks.clone());
            s.spawn(move || {
                let cfg = Config {
                    coordinator: Some(addr),
                    world_size: Some(N),
                    rank: Some(r),
                    shm_direct: false,
                    timeout: Duration::from_secs(20),
                    ..Config::default()
                };
                assert!(cfg.lazy_connect, "lazy connections are the default");
                let t = Counting {
                    inner: MemTransport::new(fabric),
                    data,
                    asks,
                };
                let c = Communicator::init_with_transports(cfg, vec![Arc::new(t)]).unwrap();
                let mut hs = Vec::new();
                for p in (0..N).filter(|&p| p != r) {
                    hs.push(c.isend(vec![r as u8; 100], p, 9).unwrap());
                }
                let mut rs = Vec::new();
                for p in (0..N).filter(|&p| p != r) {
                    rs.push((p, c.irecv(vec![0u8; 100], p, 9).unwrap()));
                }
                for h in hs {
                    h.wait().unwrap();
                }
                for (p, h) in rs {
                    assert_eq!(h.wait().unwrap(), vec![p as u8; 100]);
                }
                assert_eq!(c.connected_peers(), everyone_but(N, r));
                let send: Vec<u32> = (0..N).map(|q| (r * 10 + q) as u32).collect();
                let mut got = vec![0u32; N];
                c.all_to_all(&send, &mut got).unwrap();
                assert_eq!(got, (0..N).map(|q| (q * 10 + r) as u32).collect::<Vec<_>>());
                c.barrier().unwrap();
            });
        }
    });
    assert_eq!(data.load(Ordering::SeqCst), N * (N - 1) / 2, "one per pair");
    // Requests: one per pair at most, unless a lower rank took over 2 s to connect (asked
    // again); none where the lower rank's connection came first.
    println!("dial-back requests: {}", asks.load(Ordering::SeqCst));
}

#[test]
fn lazy_connections_over_tcp_complete_the_chain_and_an_all_reduce() {
    // The real tcp acceptor serves the dial-back requests (ranks are threads, each with its
    // own listener): the non-blocking chain, then an all-reduce.
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    std::thread::scope(|s| {
        for r in 0..3 {
            let addr = addr.clone();
            s.spawn(move || {
                let cfg = Config {
                    coordinator: Some(addr),
                    world_size: Some(3),
                    rank: Some(r),
                    transport: braid::config::TransportKind::Tcp,
                    timeout: Duration::from_secs(20),
                    ..Config::default()
                };
                let c = Communicator::init_with(cfg).unwrap();
                assert_eq!(c.connected_peers(), Vec::<usize>::new(), "nothing at init");
                let big = 4 << 20;
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
                        assert_eq!(h2.wait().unwrap(), vec![7u8; 16]);
                    }
                    _ => {
                        let mut b = vec![0u8; big];
                        c.recv(&mut b, 1, 3).unwrap();
                        c.send(&b[..16], 0, 1).unwrap();
                    }
                }
                let mut x = [r as u64 + 1];
                c.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap();
                assert_eq!(x, [6]);
            });
        }
    });
}
