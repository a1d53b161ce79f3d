//! A panic inside braid's progress thread becomes the communicator's sticky error: pending
//! operations' `wait()` returns it (never a hang), later calls fail at once with it.
//!
//! Ranks are threads over the in-process transport; the panic comes from the test hook
//! `Communicator::inject_progress_panic`.
//!
//! Run: `cargo test -p braid --test runtime_panic`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use braid::membership::Coordinator;
use braid::transport::mem::MemFabric;
use braid::{Communicator, Config, Error, ReduceOp};

/// Runs `f(rank, comm, barrier)` on two in-process ranks.
fn two_ranks(f: impl Fn(usize, &Communicator, &Barrier) + Send + Sync) {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let fabric = MemFabric::new();
    let bar = Arc::new(Barrier::new(2));
    let f = Arc::new(f);
    std::thread::scope(|s| {
        for r in 0..2 {
            let (addr, fabric, f, bar) = (addr.clone(), fabric.clone(), f.clone(), bar.clone());
            s.spawn(move || {
                let cfg = Config {
                    coordinator: Some(addr),
                    world_size: Some(2),
                    rank: Some(r),
                    // Long: a hang would show as the test running into its own guard below,
                    // not as an operation timing out.
                    timeout: Duration::from_secs(300),
                    ..Config::default()
                };
                let c = Communicator::init_in_process(cfg, fabric).unwrap();
                f(r, &c, &bar);
            });
        }
    });
}

fn is_panic_error(e: &Error) -> bool {
    matches!(e, Error::Internal(m) if m.contains("panicked") && m.contains("inject_progress_panic"))
}

#[test]
fn a_panic_in_the_progress_thread_fails_pending_and_later_operations() {
    two_ranks(|rank, c, bar| {
        if rank == 1 {
            // Rank 1 takes no part until rank 0 is done.
            bar.wait();
            return;
        }
        // In flight on the progress thread: a receive nobody sends (a point-to-point group
        // stays in flight), and behind it a non-blocking all-reduce rank 1 never joins.
        let recv = c.irecv(vec![0u8; 16], 1, 7).unwrap();
        let red = c.iall_reduce(vec![1.0f32; 64], ReduceOp::Sum).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!recv.test() && !red.test());
        c.inject_progress_panic().unwrap();

        // Every waiter wakes with the panic, within seconds (the operations' own deadline
        // is 300 s).
        let t = Instant::now();
        assert!(
            recv.wait_timeout(Duration::from_secs(20)),
            "irecv handle hangs"
        );
        let e = recv.wait().unwrap_err();
        assert!(is_panic_error(&e), "{e:?}");
        let e = red.wait().unwrap_err();
        assert!(is_panic_error(&e), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());

        // Sticky: later calls, blocking or not, fail at once.
        let e = c.error().expect("no sticky error");
        assert!(is_panic_error(&e), "{e:?}");
        let mut x = vec![1.0f32; 8];
        let t = Instant::now();
        let e = c.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap_err();
        assert!(is_panic_error(&e), "{e:?}");
        match c.iall_reduce(vec![1.0f32; 8], ReduceOp::Sum) {
            Err(e) => assert!(is_panic_error(&e), "{e:?}"),
            Ok(h) => {
                let e = h.wait().unwrap_err();
                assert!(is_panic_error(&e), "{e:?}");
            }
        }
        let e = c.barrier().unwrap_err();
        assert!(is_panic_error(&e), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        bar.wait();
    });
}

#[test]
fn a_panic_while_idle_fails_the_next_operations() {
    two_ranks(|rank, c, bar| {
        if rank == 0 {
            c.inject_progress_panic().unwrap();
            // The progress thread panics at once; the next non-blocking call must not hang
            // on a thread that is gone.
            let t = Instant::now();
            while c.error().is_none() && t.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let e = c
                .error()
                .expect("the panic did not become the sticky error");
            assert!(is_panic_error(&e), "{e:?}");
            let r = c.ibarrier().and_then(|h| h.wait());
            assert!(is_panic_error(&r.unwrap_err()));
        }
        bar.wait();
    });
}
