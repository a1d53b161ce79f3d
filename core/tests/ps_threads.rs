//! Push/pull with servers and workers as threads of one process over real TCP and a real
//! coordinator (the multi-process drills are in perf/tests/ps.rs).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use braid::membership::Coordinator;
use braid::ps::{Consistency, KvReader, KvServer, KvWorker, PsOptions, UpdateRule};
use braid::Config;

fn cfg(addr: &str, n: usize) -> Config {
    Config {
        coordinator: Some(addr.to_string()),
        world_size: Some(n),
        group: "ps".into(),
        timeout: Duration::from_secs(20),
        init_timeout: Duration::from_secs(30),
        transport: braid::config::TransportKind::Tcp,
        heartbeat: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(3),
        join_window: Duration::from_millis(100),
        ..Config::default()
    }
}

/// Starts `n` servers on threads of scope `s` (joined for their `KvServer`).
fn start_servers<'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    n: usize,
    addr: &str,
    world: usize,
    opts: &PsOptions,
) -> Vec<std::thread::ScopedJoinHandle<'scope, KvServer>> {
    (0..n)
        .map(|_| {
            let (addr, opts) = (addr.to_string(), opts.clone());
            s.spawn(move || KvServer::start(cfg(&addr, world), opts).unwrap())
        })
        .collect()
}

#[test]
fn sync_push_pull_two_workers_two_servers() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions {
        partition_bytes: 1024,
        ..PsOptions::default()
    };
    std::thread::scope(|s| {
        let servers = start_servers(s, 2, &addr, 4, &opts);
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let (addr, opts) = (addr.clone(), opts.clone());
                s.spawn(move || {
                    let kv = KvWorker::start(cfg(&addr, 4), opts).unwrap();
                    let keys = [1u64, 2, 3];
                    let lens = [4usize, 1000, 1];
                    let zeros = vec![0f32; 1005];
                    kv.init(&keys, &lens, &zeros).unwrap();
                    for round in 1..=5u64 {
                        let g: Vec<f32> = (0..1005)
                            .map(|i| (w as f32 + 1.0) * (i as f32 + round as f32))
                            .collect();
                        let p = kv.push_pull(&keys, &lens, &g, 0).unwrap().wait().unwrap();
                        assert_eq!(p.version, round);
                        for (i, v) in p.values.iter().enumerate() {
                            let want = 3.0 * (i as f32 + round as f32);
                            assert_eq!(*v, want, "round {round} element {i}");
                        }
                    }
                    // Bad input: wrong length for a known key.
                    let e = kv.push(&[1], &[5], &[0f32; 5], 0).err().unwrap();
                    assert!(e.to_string().contains("key 1"), "{e}");
                    kv
                })
            })
            .collect();
        let ws: Vec<KvWorker> = workers.into_iter().map(|h| h.join().unwrap()).collect();
        // A reader sees a consistent snapshot: round 5 everywhere.
        let mut r = KvReader::connect(cfg(&addr, 4), opts.clone()).unwrap();
        let (v, vals) = r.snapshot::<f32>(&[1, 2, 3], &[4, 1000, 1], None).unwrap();
        assert_eq!(v, 5);
        assert_eq!(vals[0], 3.0 * 5.0);
        assert_eq!(vals[1004], 3.0 * (1004.0 + 5.0));
        drop(ws);
        let ss: Vec<KvServer> = servers.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(ss.iter().all(|s| s.parts_held() > 0));
    });
}

#[test]
fn async_and_sgd_rule() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions {
        consistency: Consistency::Async,
        rule: UpdateRule::sgd(0.5),
        ..PsOptions::default()
    };
    std::thread::scope(|s| {
        let server = {
            let (addr, opts) = (addr.clone(), opts.clone());
            s.spawn(move || KvServer::start(cfg(&addr, 2), opts).unwrap())
        };
        let kv = KvWorker::start(cfg(&addr, 2), opts.clone()).unwrap();
        kv.init(&[9], &[3], &[10f64, 10.0, 10.0]).unwrap();
        for _ in 0..4 {
            kv.push(&[9], &[3], &[1f64, 2.0, 4.0], 0)
                .unwrap()
                .wait()
                .unwrap();
        }
        let p = kv.pull::<f64>(&[9], &[3], None, 0).unwrap().wait().unwrap();
        assert_eq!(p.values, vec![8.0, 6.0, 2.0]);
        assert_eq!(p.version, 4);
        drop(kv);
        drop(server.join().unwrap());
    });
}

/// A pull of large and small parts from one server: answered from the store's buffers (large
/// parts sent as they are, small ones copied together), the values exact; a reader's snapshot
/// (a pull at a version) too.
#[test]
fn a_pull_of_large_and_small_parts_is_exact() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions {
        consistency: Consistency::Async,
        ..PsOptions::default()
    };
    std::thread::scope(|s| {
        let server = {
            let (addr, opts) = (addr.clone(), opts.clone());
            s.spawn(move || KvServer::start(cfg(&addr, 2), opts).unwrap())
        };
        let kv = KvWorker::start(cfg(&addr, 2), opts.clone()).unwrap();
        let keys = [1u64, 2, 3, 4, 5];
        let lens = [40_000usize, 3, 20_000, 5, 10];
        let n: usize = lens.iter().sum();
        kv.init(&keys, &lens, &vec![0f32; n]).unwrap();
        let g: Vec<f32> = (0..n).map(|i| i as f32).collect();
        for round in 1..=3u64 {
            let p = kv.push_pull(&keys, &lens, &g, 0).unwrap().wait().unwrap();
            assert_eq!(p.version, round);
            for (i, v) in p.values.iter().enumerate() {
                assert_eq!(*v, round as f32 * i as f32, "round {round} element {i}");
            }
        }
        let mut r = KvReader::connect(cfg(&addr, 2), opts.clone()).unwrap();
        let (v, vals) = r.snapshot::<f32>(&keys, &lens, None).unwrap();
        assert_eq!(v, 3);
        for (i, x) in vals.iter().enumerate() {
            assert_eq!(*x, 3.0 * i as f32, "snapshot element {i}");
        }
        drop(r);
        drop(kv);
        drop(server.join().unwrap());
    });
}

/// Async sum: every acknowledged push must be in the final value, whatever server goes away.
#[test]
fn a_server_that_goes_away_loses_no_acknowledged_update() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions {
        consistency: Consistency::Async,
        partition_bytes: 64,
        ..PsOptions::default()
    };
    let keys: Vec<u64> = (0..16).collect();
    let lens = vec![32usize; 16]; // 128 bytes per key: 2 parts each
    std::thread::scope(|s| {
        let mut servers = start_servers(s, 3, &addr, 5, &opts);
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (addr, opts, keys, lens) =
                    (addr.clone(), opts.clone(), keys.clone(), lens.clone());
                s.spawn(move || {
                    let kv = KvWorker::start(cfg(&addr, 5), opts).unwrap();
                    kv.init(&keys, &lens, &vec![0u64; 512]).unwrap();
                    for _ in 0..60 {
                        kv.push(&keys, &lens, &vec![1u64; 512], 0)
                            .unwrap()
                            .wait()
                            .unwrap();
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    kv
                })
            })
            .collect();
        // Take one server away mid-run.
        std::thread::sleep(Duration::from_millis(150));
        let victim = servers.remove(1).join().unwrap();
        let victim_id = victim.member_id();
        drop(victim);
        let ws: Vec<KvWorker> = workers.into_iter().map(|h| h.join().unwrap()).collect();
        let p = ws[0]
            .pull::<u64>(&keys, &lens, None, 0)
            .unwrap()
            .wait()
            .unwrap();
        let bad: Vec<(usize, u64)> = p
            .values
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, v)| *v != 120)
            .collect();
        assert!(
            bad.is_empty(),
            "lost or duplicated updates (element, value): {bad:?}"
        );
        assert_eq!(ws[0].sizes().0, 2, "server {victim_id} left the view");
        drop(ws);
        for h in servers {
            drop(h.join().unwrap());
        }
    });
}

/// A server joining takes over about a third of the parts; values are kept.
#[test]
fn a_joining_server_takes_its_share_and_values_are_kept() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions {
        consistency: Consistency::Async,
        ..PsOptions::default()
    };
    let keys: Vec<u64> = (0..300).collect();
    let lens = vec![2usize; 300];
    std::thread::scope(|s| {
        let servers = start_servers(s, 2, &addr, 3, &opts);
        let kv = KvWorker::start(cfg(&addr, 3), opts.clone()).unwrap();
        let vals: Vec<f32> = (0..600).map(|i| i as f32).collect();
        kv.init(&keys, &lens, &vals).unwrap();
        kv.push(&keys, &lens, &vec![1f32; 600], 0)
            .unwrap()
            .wait()
            .unwrap();
        let ss: Vec<KvServer> = servers.into_iter().map(|h| h.join().unwrap()).collect();
        let before: Vec<usize> = ss.iter().map(|s| s.parts_held()).collect();
        // A third server joins the running group.
        let joiner = KvServer::start(cfg(&addr, 3), opts.clone()).unwrap();
        let t0 = std::time::Instant::now();
        while kv.sizes().0 < 3 || joiner.parts_held() == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the new server got nothing"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        let held = joiner.parts_held();
        // With one replica, every part is on 2 of the servers; the new one holds about 2/3.
        assert!(
            held > 100 && held < 300,
            "joiner holds {held} parts (before: {before:?})"
        );
        kv.push(&keys, &lens, &vec![1f32; 600], 0)
            .unwrap()
            .wait()
            .unwrap();
        let p = kv
            .pull::<f32>(&keys, &lens, None, 0)
            .unwrap()
            .wait()
            .unwrap();
        for (i, v) in p.values.iter().enumerate() {
            assert_eq!(*v, i as f32 + 2.0, "element {i}");
        }
        drop(kv);
        drop(joiner);
        drop(ss);
    });
}

/// Sync mode: a worker that goes away does not hang the others; its round closes with the
/// survivors after the view change.
#[test]
fn sync_rounds_close_without_a_worker_that_left() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions::default();
    std::thread::scope(|s| {
        let server = {
            let (addr, opts) = (addr.clone(), opts.clone());
            s.spawn(move || KvServer::start(cfg(&addr, 4), opts).unwrap())
        };
        let hs: Vec<_> = (0..3)
            .map(|w| {
                let (addr, opts) = (addr.clone(), opts.clone());
                s.spawn(move || {
                    let kv = KvWorker::start(cfg(&addr, 4), opts).unwrap();
                    kv.init(&[5], &[4], &[0i64; 4]).unwrap();
                    let rounds = if w == 2 { 2 } else { 6 };
                    let mut last = Vec::new();
                    for _ in 0..rounds {
                        let p = kv
                            .push_pull(&[5], &[4], &[1i64; 4], 0)
                            .unwrap()
                            .wait()
                            .unwrap();
                        last.push(p.values[0]);
                    }
                    (w, last)
                })
            })
            .collect();
        for h in hs {
            let (w, sums) = h.join().unwrap();
            if w != 2 {
                assert_eq!(&sums[..2], &[3, 3], "worker {w}");
                assert!(
                    sums[2..].iter().all(|v| *v == 2 || *v == 3),
                    "worker {w}: {sums:?}"
                );
                assert_eq!(*sums.last().unwrap(), 2, "worker {w}: {sums:?}");
            }
        }
        drop(server.join().unwrap());
    });
}

/// Readers under concurrent pushes: every snapshot has all keys from one round, and versions
/// never go backwards.
#[test]
fn readers_never_see_a_torn_snapshot() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions::default();
    let keys: Vec<u64> = (100..120).collect();
    let lens = vec![8usize; 20];
    std::thread::scope(|s| {
        let servers = start_servers(s, 2, &addr, 4, &opts);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ws: Vec<_> = (0..2)
            .map(|_| {
                let (addr, opts, keys, lens, stop) = (
                    addr.clone(),
                    opts.clone(),
                    keys.clone(),
                    lens.clone(),
                    stop.clone(),
                );
                s.spawn(move || {
                    let kv = KvWorker::start(cfg(&addr, 4), opts).unwrap();
                    kv.init(&keys, &lens, &vec![0f64; 160]).unwrap();
                    // Both workers run the same number of rounds (a sync round needs both).
                    let _ = &stop;
                    for r in 1..=150 {
                        let round = f64::from(r);
                        // Round r pushes r everywhere: the sync aggregate is 2r.
                        kv.push_pull(&keys, &lens, &vec![round; 160], 0)
                            .unwrap()
                            .wait()
                            .unwrap();
                    }
                    kv
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let mut r = KvReader::connect(cfg(&addr, 4), opts.clone()).unwrap();
        let mut last = 0;
        for _ in 0..20 {
            let (v, vals) = r.snapshot::<f64>(&keys, &lens, None).unwrap();
            assert!(v >= last, "version went back from {last} to {v}");
            last = v;
            let want = 2.0 * v as f64;
            assert!(
                vals.iter().all(|x| *x == want),
                "torn snapshot at version {v}: {:?}",
                &vals[..10]
            );
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let ws: Vec<KvWorker> = ws.into_iter().map(|h| h.join().unwrap()).collect();
        drop(ws);
        for h in servers {
            drop(h.join().unwrap());
        }
    });
}

/// Bandwidth-aware placement: servers publish their measured bandwidth as their ring weight.
#[test]
fn servers_can_weigh_themselves_by_measured_bandwidth() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions {
        weigh_by_bandwidth: true,
        consistency: Consistency::Async,
        ..PsOptions::default()
    };
    std::thread::scope(|s| {
        let server = {
            let (addr, opts) = (addr.clone(), opts.clone());
            s.spawn(move || KvServer::start(cfg(&addr, 2), opts).unwrap())
        };
        let kv = KvWorker::start(cfg(&addr, 2), opts).unwrap();
        let st =
            braid::membership::coordinator_status(&addr, None, Duration::from_secs(5)).unwrap();
        let members = st["groups"][0]["members"].as_array().unwrap().clone();
        let srv = members.iter().find(|m| m["role"] == "server").unwrap();
        let w = srv["weight"].as_f64().unwrap();
        assert!(
            w > 0.0 && w != 1.0,
            "server weight {w} is not a measurement"
        );
        kv.init(&[1], &[1], &[0u32]).unwrap();
        drop(kv);
        drop(server.join().unwrap());
    });
}

/// Bad input gets clear errors and the server keeps serving others.
#[test]
fn bad_input_is_refused_clearly_and_others_are_served() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions {
        consistency: Consistency::Async,
        ..PsOptions::default()
    };
    std::thread::scope(|s| {
        let server = {
            let (addr, opts) = (addr.clone(), opts.clone());
            s.spawn(move || KvServer::start(cfg(&addr, 3), opts).unwrap())
        };
        let other = {
            let (addr, opts) = (addr.clone(), opts.clone());
            s.spawn(move || {
                let kv = KvWorker::start(cfg(&addr, 3), opts).unwrap();
                kv.init(&[7], &[3], &[1i32, 2, 3]).unwrap();
                // Pushing a different length or dtype for a key the server knows: refused
                // by the server (this worker never saw key 8 locally).
                std::thread::sleep(Duration::from_millis(300));
                let e = kv
                    .push(&[8], &[5], &[1f32; 5], 0)
                    .unwrap()
                    .wait()
                    .unwrap_err();
                assert!(e.to_string().contains("server"), "{e}");
                let e = kv
                    .push(&[8], &[4], &[1i64; 4], 0)
                    .and_then(|h| h.wait())
                    .unwrap_err();
                assert!(e.to_string().contains("key"), "{e}");
                // Pulling a different length: refused naming the key (was an internal
                // "short body" error).
                let e = kv
                    .pull::<f32>(&[8], &[5], None, 0)
                    .unwrap()
                    .wait()
                    .unwrap_err();
                assert!(
                    e.to_string().contains("key 8") && e.to_string().contains("asked for 20"),
                    "{e}"
                );
                assert!(!e.to_string().contains("internal"), "{e}");
                for _ in 0..20 {
                    kv.push(&[7], &[3], &[1i32, 1, 1], 0)
                        .unwrap()
                        .wait()
                        .unwrap();
                }
                kv
            })
        };
        let kv = KvWorker::start(cfg(&addr, 3), opts).unwrap();
        kv.init(&[8], &[4], &[0f32; 4]).unwrap();
        // Unknown key: a clear error after a short grace period, not a hang.
        let t0 = std::time::Instant::now();
        let e = kv
            .pull::<f32>(&[12345], &[4], None, 0)
            .unwrap()
            .wait()
            .unwrap_err();
        assert!(
            e.to_string().contains("12345") && e.to_string().contains("does not exist"),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(10));
        // Local checks: lengths that don't add up.
        let e = kv.push(&[8], &[4, 4], &[0f32; 8], 0).unwrap_err();
        assert!(e.to_string().contains("keys"), "{e}");
        let o = other.join().unwrap();
        let p = o.pull::<i32>(&[7], &[3], None, 0).unwrap().wait().unwrap();
        assert_eq!(
            p.values,
            vec![21, 22, 23],
            "the other worker was served throughout"
        );
        drop(o);
        drop(kv);
        drop(server.join().unwrap());
    });
}

/// Bounded staleness (tau = 1): a fast worker is held when it gets more than one push ahead
/// of the slowest; every push is applied once.
#[test]
fn bounded_staleness_holds_a_fast_worker() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions {
        consistency: Consistency::Bounded(1),
        ..PsOptions::default()
    };
    std::thread::scope(|s| {
        let servers = start_servers(s, 2, &addr, 4, &opts);
        let slow_done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let hs: Vec<_> = (0..2)
            .map(|w| {
                let (addr, opts, slow_done) = (addr.clone(), opts.clone(), slow_done.clone());
                s.spawn(move || {
                    let kv = KvWorker::start(cfg(&addr, 4), opts).unwrap();
                    kv.init(&[1, 2], &[2, 2], &[0u64; 4]).unwrap();
                    std::thread::sleep(Duration::from_millis(300));
                    let mut max_lead = 0i64;
                    for i in 1..=6u64 {
                        if w == 1 {
                            std::thread::sleep(Duration::from_millis(80));
                        }
                        kv.push(&[1, 2], &[2, 2], &[1u64; 4], 0)
                            .unwrap()
                            .wait()
                            .unwrap();
                        if w == 1 {
                            slow_done.store(i, std::sync::atomic::Ordering::SeqCst);
                        } else {
                            let lead = i as i64
                                - slow_done.load(std::sync::atomic::Ordering::SeqCst) as i64;
                            max_lead = max_lead.max(lead);
                        }
                    }
                    (w, max_lead, kv)
                })
            })
            .collect();
        let mut kvs = Vec::new();
        for h in hs {
            let (w, lead, kv) = h.join().unwrap();
            if w == 0 {
                // Acknowledged pushes of the fast worker: at most tau + 1 ahead of the slow
                // one's acknowledged pushes (one in flight).
                assert!(lead <= 2, "fast worker ran {lead} pushes ahead");
            }
            kvs.push(kv);
        }
        let p = kvs[0]
            .pull::<u64>(&[1, 2], &[2, 2], None, 0)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(p.values, vec![12; 4]);
        drop(kvs);
        for h in servers {
            drop(h.join().unwrap());
        }
    });
}

/// Pulls into caller memory: `pull_into` / `push_pull_into` give what `pull` / `push_pull`
/// give; a wrong output length is refused; a pull handle dropped before its answers arrive
/// is forgotten (the worker keeps serving, nothing is written after the drop).
#[test]
fn pulls_into_caller_memory() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions {
        consistency: Consistency::Async,
        partition_bytes: 256,
        ..PsOptions::default()
    };
    std::thread::scope(|s| {
        let servers = start_servers(s, 2, &addr, 3, &opts);
        let kv = KvWorker::start(cfg(&addr, 3), opts.clone()).unwrap();
        // Keys of 100 and 300 f32 (the second split into parts over both servers).
        let (keys, lens) = ([5u64, 6], [100usize, 300]);
        let init: Vec<f32> = (0..400).map(|i| i as f32).collect();
        kv.init(&keys, &lens, &init).unwrap();
        let mut out = vec![-1f32; 400];
        let v = kv.pull_into(&keys, &lens, &mut out, None, 0).unwrap();
        assert_eq!(out, init);
        let p = kv
            .pull::<f32>(&keys, &lens, None, 0)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!((p.values, p.version), (init.clone(), v));
        let v2 = kv
            .push_pull_into(&keys, &lens, &vec![1f32; 400], &mut out, 0)
            .unwrap();
        assert!(v2 > v, "version {v2} after {v}");
        let want: Vec<f32> = init.iter().map(|x| x + 1.0).collect();
        assert_eq!(out, want);
        let e = kv
            .pull_into(&keys, &lens, &mut out[..399], None, 0)
            .unwrap_err();
        assert!(e.to_string().contains("400"), "{e}");
        for _ in 0..50 {
            let mut tmp = vec![0f32; 400];
            // SAFETY: `tmp` outlives the handle, which is dropped unwaited right away.
            let h = unsafe { kv.pull_raw(&keys, &lens, tmp.as_mut_ptr(), None, 0) }.unwrap();
            drop(h);
            tmp.fill(7.0);
            drop(tmp);
        }
        let p = kv
            .pull::<f32>(&keys, &lens, None, 0)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(p.values, want);
        drop(kv);
        for h in servers {
            drop(h.join().unwrap());
        }
    });
}

/// Non-blocking pulls of large values (the C ABI's path, `pull_raw` / `push_pull_raw`) receive
/// the answers straight into the caller's memory: the values are right, `test` says done only
/// when they are all in, and a handle dropped while answers are being received into that
/// memory waits for them, so nothing is written to it after the drop (a sentinel written
/// right after each drop is intact a moment later).
#[test]
fn raw_pulls_receive_into_caller_memory_and_stop_at_drop() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions {
        consistency: Consistency::Async,
        partition_bytes: 1 << 20,
        ..PsOptions::default()
    };
    std::thread::scope(|s| {
        let servers = start_servers(s, 2, &addr, 3, &opts);
        let kv = KvWorker::start(cfg(&addr, 3), opts.clone()).unwrap();
        // 6 MiB in two keys, parts of 1 MiB over both servers.
        let (keys, lens) = ([40u64, 41], [1usize << 20, 1 << 19]);
        let n = lens.iter().sum::<usize>();
        let init: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
        kv.init(&keys, &lens, &init).unwrap();
        let mut out = vec![-1f32; n];
        // SAFETY: `out` is not touched until `test` said done (nothing writes to it then).
        let h = unsafe { kv.pull_raw(&keys, &lens, out.as_mut_ptr(), None, 0) }.unwrap();
        let t0 = std::time::Instant::now();
        while !h.test() {
            assert!(t0.elapsed() < Duration::from_secs(20), "pull never done");
            std::thread::yield_now();
        }
        // Done: every answer is in `out` already (read before the wait).
        assert!(out == init, "pulled values differ");
        let v = h.wait().unwrap();
        let ones = vec![1f32; n];
        // SAFETY: as above.
        let h = unsafe { kv.push_pull_raw(&keys, &lens, &ones, out.as_mut_ptr(), 0) }.unwrap();
        assert!(h.wait().unwrap() > v);
        let want: Vec<f32> = init.iter().map(|x| x + 1.0).collect();
        assert!(out == want, "push_pull values differ");
        let mut tmp = vec![0f32; n];
        for i in 0..30 {
            // SAFETY: `tmp` outlives the handle, dropped unwaited after a while (answers
            // arriving then), before `tmp` is written again.
            let h = unsafe { kv.pull_raw(&keys, &lens, tmp.as_mut_ptr(), None, 0) }.unwrap();
            std::thread::sleep(Duration::from_micros(200 * (i % 10)));
            drop(h);
            tmp.fill(7.0);
            std::thread::sleep(Duration::from_millis(5));
            assert!(
                tmp.iter().all(|x| *x == 7.0),
                "drop {i}: answers written after the handle was dropped"
            );
        }
        let p = kv
            .pull::<f32>(&keys, &lens, None, 0)
            .unwrap()
            .wait()
            .unwrap();
        assert!(p.values == want, "values changed");
        drop(kv);
        for h in servers {
            drop(h.join().unwrap());
        }
    });
}

/// `push_pull_into_each`: several keys, each with its own arrays, in flight together (one lent
/// key of 2 MiB over both servers, a small one), exact async values; refused before sending
/// when the slices disagree; a key refused mid-call (a wrong length) leaves the keys before it
/// sent and waited for, the rest unsent.
#[test]
fn push_pull_into_each_keys_in_flight_together() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions {
        consistency: Consistency::Async,
        partition_bytes: 1 << 20,
        ..PsOptions::default()
    };
    std::thread::scope(|s| {
        let servers = start_servers(s, 2, &addr, 3, &opts);
        let kv = KvWorker::start(cfg(&addr, 3), opts.clone()).unwrap();
        let (big, small) = (1usize << 19, 3usize);
        kv.init(&[50, 51], &[big, small], &vec![1f32; big + small])
            .unwrap();
        let g50: Vec<f32> = (0..big).map(|i| (i % 9) as f32).collect();
        let g51 = vec![2f32; small];
        let (mut o50, mut o51) = (vec![0f32; big], vec![0f32; small]);
        let v = kv
            .push_pull_into_each(&[50, 51], &[&g50, &g51], &mut [&mut o50, &mut o51], 0)
            .unwrap();
        assert!(v >= 1, "version {v}");
        assert!(
            o50.iter()
                .enumerate()
                .all(|(i, x)| *x == 1.0 + (i % 9) as f32),
            "key 50 values"
        );
        assert_eq!(o51, vec![3f32; small], "key 51 values");
        // Refused before anything is sent.
        let e = kv
            .push_pull_into_each(&[50], &[&g50, &g51], &mut [&mut o50], 0)
            .unwrap_err();
        assert!(e.to_string().contains("1 keys, 2 value arrays"), "{e}");
        let e = kv
            .push_pull_into_each(&[51], &[&g51], &mut [&mut o50], 0)
            .unwrap_err();
        assert!(e.to_string().contains("key 51"), "{e}");
        // Key 51 sent, key 50 refused (a wrong length), key 52 never sent.
        let short = vec![1f32; 4];
        let mut o_short = vec![0f32; 4];
        let mut o52 = vec![0f32; 2];
        let e = kv
            .push_pull_into_each(
                &[51, 50, 52],
                &[&g51, &short, &[5.0, 5.0]],
                &mut [&mut o51, &mut o_short, &mut o52],
                0,
            )
            .unwrap_err();
        assert!(e.to_string().contains("key 50"), "{e}");
        assert_eq!(
            o51,
            vec![5f32; small],
            "key 51 pushed again before the refusal"
        );
        assert_eq!(o52, vec![0f32; 2], "key 52 was not sent");
        let p = kv
            .pull::<f32>(&[50], &[big], None, 0)
            .unwrap()
            .wait()
            .unwrap();
        assert!(p.values == o50, "key 50 unchanged by the refused call");
        // Keys at the lending threshold (64 KiB: lent) and just under it (copied), in flight
        // with the 2 MiB key, three rounds.
        let (at, under) = (1usize << 14, (1usize << 14) - 1);
        kv.init(&[54, 55], &[at, under], &vec![0f32; at + under])
            .unwrap();
        let g54: Vec<f32> = (0..at).map(|i| (i % 5) as f32).collect();
        let g55: Vec<f32> = (0..under).map(|i| (i % 3) as f32).collect();
        let (mut o54, mut o55) = (vec![0f32; at], vec![0f32; under]);
        let before = o50.clone();
        for round in 1..=3 {
            kv.push_pull_into_each(
                &[54, 50, 55],
                &[&g54, &g50, &g55],
                &mut [&mut o54, &mut o50, &mut o55],
                0,
            )
            .unwrap();
            let r = round as f32;
            assert!(
                o54.iter()
                    .enumerate()
                    .all(|(i, x)| *x == r * (i % 5) as f32),
                "key 54 after round {round}"
            );
            assert!(
                o55.iter()
                    .enumerate()
                    .all(|(i, x)| *x == r * (i % 3) as f32),
                "key 55 after round {round}"
            );
            assert!(
                o50.iter()
                    .zip(&before)
                    .enumerate()
                    .all(|(i, (x, b))| *x == b + r * (i % 9) as f32),
                "key 50 after round {round}"
            );
        }
        // A push sent from the caller's memory (lent at 64 KiB), then a pull.
        // SAFETY: `g54` is not modified until the handle was waited for.
        unsafe { kv.push_lent(&[54], &[at], &g54, 0) }
            .unwrap()
            .wait()
            .unwrap();
        let p = kv
            .pull::<f32>(&[54], &[at], None, 0)
            .unwrap()
            .wait()
            .unwrap();
        assert!(
            p.values
                .iter()
                .enumerate()
                .all(|(i, x)| *x == 4.0 * (i % 5) as f32),
            "key 54 after push_lent"
        );
        drop(kv);
        for h in servers {
            drop(h.join().unwrap());
        }
    });
}

/// A key of three parts pushed with another total length whose first parts happen to have the
/// same sizes (2 parts of 64 bytes against 3): refused by every server holding a part, and the
/// key is unchanged (before, the matching parts were applied: a partial update).
#[test]
fn a_wrong_total_length_is_refused_on_every_part() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions {
        consistency: Consistency::Async,
        partition_bytes: 64,
        ..PsOptions::default()
    };
    std::thread::scope(|s| {
        let servers = start_servers(s, 2, &addr, 4, &opts);
        let init: Vec<f32> = (0..48).map(|i| i as f32).collect();
        let a = {
            let (addr, opts, init) = (addr.clone(), opts.clone(), init.clone());
            s.spawn(move || {
                let kv = KvWorker::start(cfg(&addr, 4), opts).unwrap();
                kv.init(&[20], &[48], &init).unwrap();
                kv
            })
        };
        let kv = KvWorker::start(cfg(&addr, 4), opts).unwrap();
        let a = a.join().unwrap();
        // This worker never saw key 20: only the servers can tell the length is wrong.
        let e = kv
            .push(&[20], &[32], &[1f32; 32], 0)
            .and_then(|h| h.wait())
            .unwrap_err();
        assert!(
            e.to_string().contains("key 20") && e.to_string().contains("wrong length"),
            "{e}"
        );
        let e = kv
            .pull::<f32>(&[20], &[32], None, 0)
            .and_then(|h| h.wait())
            .unwrap_err();
        assert!(e.to_string().contains("wrong length"), "{e}");
        let p = a
            .pull::<f32>(&[20], &[48], None, 0)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(p.values, init, "a refused push changed the key");
        assert_eq!(p.version, 0);
        drop((a, kv));
        for h in servers {
            drop(h.join().unwrap());
        }
    });
}
