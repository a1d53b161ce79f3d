//! Push priorities end to end (`KvWorker::push(.., prio)`: "higher is sent first when queues
//! build up"): a large low-priority push (64 MiB in 64 parts) followed by a small
//! high-priority push on another key; the small one is acknowledged while the large one is
//! still pending.
//!
//! Deterministic, whatever the load: the server's update rule (a callback) holds the first
//! part of the large push until the small push is queued at the worker, so the worker's queue
//! has built up for sure; and it holds any part of the large push that comes after the small
//! push until the test saw the small push complete, so the large push cannot complete first.
//! Without priorities on the worker's connection (the small push queued behind every part of
//! the large one) the small push is applied after the last large part, and the large push
//! completes first: the test fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use braid::membership::Coordinator;
use braid::ps::{Consistency, KvServer, KvWorker, PsOptions, UpdateRule};
use braid::Config;

const BIG: u64 = 1;
const SMALL: u64 = 2;
const BIG_LEN: usize = 16 << 20; // 64 MiB of f32
const PART: usize = 1 << 20; // 64 parts

fn cfg(addr: &str) -> Config {
    Config {
        coordinator: Some(addr.to_string()),
        world_size: Some(2),
        group: "ps-prio".into(),
        timeout: Duration::from_secs(60),
        init_timeout: Duration::from_secs(30),
        transport: braid::config::TransportKind::Tcp,
        heartbeat: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

#[derive(Default)]
struct G {
    /// The rule was called for a part of the large push.
    entered: bool,
    /// The small push was queued: parts of the large push may go on.
    open_a: bool,
    /// The test saw the small push complete: parts after it may go on.
    open_b: bool,
    /// The small push was applied.
    small_applied: bool,
    /// Parts of the large push applied before the small one, and after it.
    big_before: usize,
    big_after: usize,
}

type Gate = Arc<(Mutex<G>, Condvar)>;

/// Waits on the gate until `until` holds (or a minute passed: the test then fails anyway).
fn wait(gate: &Gate, until: impl Fn(&G) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut g = gate.0.lock().unwrap();
    while !until(&g) && Instant::now() < deadline {
        g = gate.1.wait_timeout(g, Duration::from_millis(50)).unwrap().0;
    }
}

fn set(gate: &Gate, f: impl FnOnce(&mut G)) {
    f(&mut gate.0.lock().unwrap());
    gate.1.notify_all();
}

fn rule(gate: Gate) -> UpdateRule {
    UpdateRule::Custom(Arc::new(
        move |key, _dtype, value: &mut [u8], grad: &[u8]| {
            if key == BIG {
                set(&gate, |g| g.entered = true);
                wait(&gate, |g| g.open_a);
                let after = gate.0.lock().unwrap().small_applied;
                if after {
                    wait(&gate, |g| g.open_b);
                }
                set(&gate, |g| {
                    if after {
                        g.big_after += 1
                    } else {
                        g.big_before += 1
                    }
                });
            } else {
                set(&gate, |g| g.small_applied = true);
            }
            // value += grad (f32)
            for (v, d) in value.chunks_exact_mut(4).zip(grad.chunks_exact(4)) {
                let s = f32::from_ne_bytes([v[0], v[1], v[2], v[3]])
                    + f32::from_ne_bytes([d[0], d[1], d[2], d[3]]);
                v.copy_from_slice(&s.to_ne_bytes());
            }
            Ok(())
        },
    ))
}

fn once(round: usize) {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let gate: Gate = Arc::default();
    let opts = PsOptions {
        consistency: Consistency::Async,
        partition_bytes: PART,
        replicas: 0,
        ..PsOptions::default()
    };
    let server = {
        let (addr, mut opts) = (addr.clone(), opts.clone());
        opts.rule = rule(gate.clone());
        std::thread::spawn(move || KvServer::start(cfg(&addr), opts).unwrap())
    };
    let kv = KvWorker::start(cfg(&addr), opts).unwrap();
    let server = server.join().unwrap();
    kv.init(&[BIG, SMALL], &[BIG_LEN, 4], &vec![0f32; BIG_LEN + 4])
        .unwrap();
    let t0 = Instant::now();
    let big = kv
        .push(&[BIG], &[BIG_LEN], &vec![1f32; BIG_LEN], 0)
        .unwrap();
    // The server holds the first part it got: the rest of the large push queues up.
    wait(&gate, |g| g.entered);
    let small = kv.push(&[SMALL], &[4], &[2f32; 4], 10).unwrap();
    set(&gate, |g| g.open_a = true);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !small.test() {
        assert!(
            Instant::now() < deadline,
            "round {round}: the small push never completed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let t_small = t0.elapsed();
    assert!(
        !big.test(),
        "round {round}: the large low-priority push completed before the small one"
    );
    let (before, after) = {
        let g = gate.0.lock().unwrap();
        (g.big_before, g.big_after)
    };
    assert!(
        before < BIG_LEN * 4 / PART,
        "round {round}: every part of the large push was applied before the small one"
    );
    set(&gate, |g| g.open_b = true);
    small.wait().unwrap();
    big.wait().unwrap();
    let t_big = t0.elapsed();
    let g = gate.0.lock().unwrap();
    assert_eq!(g.big_before + g.big_after, BIG_LEN * 4 / PART);
    drop(g);
    eprintln!(
        "round {round}: small (prio 10) done after {:.1} ms with {before} of {} large parts \
         applied ({after} held); large (prio 0) done after {:.1} ms",
        t_small.as_secs_f64() * 1e3,
        BIG_LEN * 4 / PART,
        t_big.as_secs_f64() * 1e3
    );
    let p = kv
        .pull::<f32>(&[BIG, SMALL], &[BIG_LEN, 4], None, 0)
        .unwrap()
        .wait()
        .unwrap();
    assert!(p.values[..BIG_LEN].iter().all(|v| *v == 1.0));
    assert_eq!(p.values[BIG_LEN..], [2.0; 4]);
    drop(kv);
    drop(server);
}

#[test]
fn a_small_high_priority_push_overtakes_a_large_low_priority_one() {
    for round in 0..10 {
        once(round);
    }
}
