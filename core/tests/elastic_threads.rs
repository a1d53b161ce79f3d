//! Elastic membership with ranks as threads of one process over real TCP sockets and a real
//! coordinator: joiners admitted into a running loop, a member that goes away, a graceful
//! leave, job tokens. (Multi-process drills with kill -9 are in perf/tests/elastic.rs.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use braid::config::Secret;
use braid::membership::{Coordinator, CoordinatorOptions};
use braid::{Communicator, Config, Error, ReduceOp};

fn cfg(addr: &str, n: usize) -> Config {
    Config {
        coordinator: Some(addr.to_string()),
        world_size: Some(n),
        timeout: Duration::from_secs(20),
        init_timeout: Duration::from_secs(30),
        transport: braid::config::TransportKind::Tcp,
        elastic: true,
        join_window: Duration::from_millis(200),
        heartbeat: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(3),
        ..Config::default()
    }
}

/// One step: all-reduce of each rank's member id, checked against the view; then an
/// agreement on whether to stop (true: stop now, on every rank).
fn step(c: &Communicator, stop: &AtomicBool) -> braid::Result<bool> {
    let mut x = vec![c.member_id() as f64; 1000];
    c.all_reduce_inplace(&mut x, ReduceOp::Sum)?;
    let want: f64 = c.view().members.iter().map(|m| m.id as f64).sum();
    assert!(x.iter().all(|v| *v == want), "got {} want {want}", x[0]);
    let mut f = [u32::from(stop.load(Ordering::SeqCst))];
    c.all_reduce_inplace(&mut f, ReduceOp::Max)?;
    Ok(f[0] == 1)
}

#[test]
fn joiners_are_admitted_into_a_running_loop_and_get_the_state() {
    // Both joiners must land in ONE view (epoch 2): a join window wide enough that a loaded
    // machine starting the two joiner threads some time apart still batches them.
    let wide = |addr: &str| Config {
        join_window: Duration::from_secs(2),
        ..cfg(addr, 2)
    };
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let four = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(Barrier::new(3));
    std::thread::scope(|s| {
        for _ in 0..2 {
            let (addr, four, stop, started) =
                (addr.clone(), four.clone(), stop.clone(), started.clone());
            s.spawn(move || {
                let mut c = Communicator::init_with(wide(&addr)).unwrap();
                let first_id = c.member_id();
                started.wait();
                let mut params = vec![1.5f32; 4096];
                while !step(&c, &stop).unwrap() {
                    if c.update().unwrap() {
                        c.sync_from_oldest(&mut params).unwrap();
                        if c.size() == 4 {
                            four.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                assert_eq!(c.member_id(), first_id);
                assert!(c.rank() < 2, "members that stay keep their order first");
                assert_eq!(c.view().epoch, 2);
            });
        }
        started.wait();
        std::thread::sleep(Duration::from_millis(300));
        let mut joiners = Vec::new();
        for _ in 0..2 {
            let (addr, four, stop) = (addr.clone(), four.clone(), stop.clone());
            joiners.push(s.spawn(move || {
                let c0 = Instant::now();
                let mut c = Communicator::init_with(wide(&addr)).unwrap();
                let mut params = vec![0f32; 4096];
                c.sync_from_oldest(&mut params).unwrap();
                assert!(params.iter().all(|v| *v == 1.5));
                assert_eq!(c.size(), 4);
                assert!(c.rank() >= 2, "joiners come last");
                four.fetch_add(1, Ordering::SeqCst);
                let admitted = c0.elapsed();
                while !step(&c, &stop).unwrap() {
                    assert!(!c.update().unwrap());
                }
                admitted
            }));
        }
        let t0 = Instant::now();
        while four.load(Ordering::SeqCst) < 4 {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "joiners not admitted"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        for j in joiners {
            let t = j.join().unwrap();
            eprintln!("joiner admitted after {:.3} s", t.as_secs_f64());
        }
    });
    // Both joiners came in one view, epoch 2. (The members' goodbyes may still be under way:
    // the group may be gone, or hold later views made by those departures.)
    let st = coord.status();
    if let Some(g) = st["groups"].as_array().unwrap().first() {
        let joins: Vec<_> = g["history"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["reason"].as_str().unwrap_or("").contains("join"))
            .collect();
        assert_eq!(joins.len(), 1, "{st}");
        assert_eq!(
            (&joins[0]["epoch"], &joins[0]["size"]),
            (&2.into(), &4.into()),
            "{st}"
        );
    }
}

/// Runs `n` ranks in a loop of steps; `act(rank_at_start, step, comm)` may act on a rank
/// (leave, vanish). Returns per thread: (member id, final size or None if it left/vanished,
/// failed steps).
fn run_group(
    addr: &str,
    n: usize,
    steps: usize,
    act: impl Fn(usize, usize, &mut Communicator) -> bool + Sync,
) -> Vec<(u64, Option<usize>, usize)> {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                let act = &act;
                let addr = addr.to_string();
                s.spawn(move || {
                    let mut c = Communicator::init_with(Config {
                        rank: Some(i),
                        ..cfg(&addr, n)
                    })
                    .unwrap();
                    let id = c.member_id();
                    let never = AtomicBool::new(false);
                    let mut failed = 0;
                    let mut done = 0;
                    while done < steps {
                        if !act(i, done, &mut c) {
                            return (id, None, failed);
                        }
                        match step(&c, &never) {
                            Ok(_) => done += 1,
                            Err(e) => {
                                failed += 1;
                                eprintln!("rank {i} (member {id}) step {done}: {e}");
                            }
                        }
                        match c.update() {
                            Ok(_) if c.has_left() => return (id, None, failed),
                            Ok(_) => {}
                            Err(e) => panic!("rank {i}: update: {e}"),
                        }
                    }
                    // Agree on the end: all survivors reach `steps` at different times; a final
                    // barrier keeps the last collectives matched.
                    c.barrier().unwrap();
                    (id, Some(c.size()), failed)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn non_blocking_calls_run_after_an_update_that_kept_the_view() {
    // update() stops the progress thread; a later non-blocking call must start a new one
    // (it once found the stop request still set and never ran: a hang).
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    std::thread::scope(|s| {
        for i in 0..2 {
            let addr = addr.clone();
            s.spawn(move || {
                let mut c = Communicator::init_with(Config {
                    rank: Some(i),
                    ..cfg(&addr, 2)
                })
                .unwrap();
                for round in 0..3 {
                    let h = c.iall_reduce(vec![1u32; 8], ReduceOp::Sum).unwrap();
                    assert_eq!(h.wait().unwrap(), vec![2u32; 8], "round {round}");
                    assert!(!c.update().unwrap(), "no view change expected");
                    let h = c.iall_reduce(vec![3u32; 8], ReduceOp::Sum).unwrap();
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while !h.test() {
                        assert!(Instant::now() < deadline, "round {round}: never ran");
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    assert_eq!(h.wait().unwrap(), vec![6u32; 8]);
                }
            });
        }
    });
}

#[test]
fn graceful_leave_changes_the_view_and_nothing_fails() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let seen = std::sync::Mutex::new(None);
    let out = run_group(&addr, 3, 40, |i, step, c| {
        if i == 1 && step == 10 && !c.has_left() {
            c.leave().unwrap();
        }
        if i == 0 && step == 39 {
            // The status, over the network, as `braid-coordinator status` prints it.
            *seen.lock().unwrap() = Some(
                braid::membership::coordinator_status(&addr, None, Duration::from_secs(5)).unwrap(),
            );
        }
        true
    });
    assert_eq!(out[1].1, None, "rank 1 left");
    for (k, o) in out.iter().enumerate().filter(|(k, _)| *k != 1) {
        assert_eq!(o.1, Some(2), "rank {k}");
        assert_eq!(o.2, 0, "rank {k}: no step failed");
    }
    let st = seen.lock().unwrap().take().unwrap();
    assert_eq!(st["groups"][0]["size"], 2, "{st}");
    let hist = st["groups"][0]["history"].as_array().unwrap().clone();
    assert!(
        hist.iter().any(|h| h["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("leave of {}", out[1].0))),
        "{hist:?}"
    );
}

#[test]
fn a_member_that_vanishes_is_replaced_by_a_smaller_view() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    // Rank 2 aborts mid-loop (its peers get its abort reason) and goes away.
    let out = run_group(&addr, 4, 30, |i, step, c| {
        if i == 2 && step == 10 {
            c.abort();
            return false;
        }
        true
    });
    assert_eq!(out[2].1, None);
    for k in [0, 1, 3] {
        assert_eq!(out[k].1, Some(3), "rank {k} continues with 3");
        assert!(out[k].2 <= 2, "rank {k}: {} failed steps", out[k].2);
    }
    // The dead id is retired; a new member gets a higher id.
    let c = std::thread::spawn({
        let addr = addr.clone();
        move || {
            Communicator::init_with(Config {
                world_size: Some(1),
                group: "other".into(),
                ..cfg(&addr, 1)
            })
            .unwrap()
            .member_id()
        }
    })
    .join()
    .unwrap();
    assert!(out.iter().all(|o| o.0 < c), "ids only grow");
}

#[test]
fn job_token_is_required_and_checked_both_ways() {
    let coord = Coordinator::bind_with(
        "127.0.0.1:0",
        CoordinatorOptions {
            job_token: Some(b"s3cret".to_vec()),
            ..CoordinatorOptions::default()
        },
    )
    .unwrap();
    let addr = coord.local_addr().to_string();
    let with = |t: Option<&str>, n: usize, group: &str| Config {
        job_token: t.map(|t| Secret(t.as_bytes().to_vec())),
        group: group.into(),
        init_timeout: Duration::from_secs(5),
        ..cfg(&addr, n)
    };
    // Wrong token and no token are refused with clear errors.
    let e = Communicator::init_with(with(Some("guess"), 1, "g"))
        .err()
        .unwrap();
    assert!(
        matches!(&e, Error::Coordinator(m) if m.contains("job token rejected")),
        "{e}"
    );
    let e = Communicator::init_with(with(None, 1, "g")).err().unwrap();
    assert!(
        matches!(&e, Error::Coordinator(m) if m.contains("requires a job token")),
        "{e}"
    );
    // The right token works, and data flows.
    std::thread::scope(|s| {
        for _ in 0..2 {
            let cfg = with(Some("s3cret"), 2, "ok");
            s.spawn(move || {
                let c = Communicator::init_with(cfg).unwrap();
                let mut x = [1u64];
                c.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap();
                assert_eq!(x[0], 2);
            });
        }
    });
    // A member with a token against a coordinator without one is refused too.
    let plain = Coordinator::bind("127.0.0.1:0").unwrap();
    let e = Communicator::init_with(Config {
        coordinator: Some(plain.local_addr().to_string()),
        ..with(Some("s3cret"), 1, "g")
    })
    .err()
    .unwrap();
    assert!(
        matches!(&e, Error::Coordinator(m) if m.contains("does not ask for it")),
        "{e}"
    );
}

#[test]
fn coordinator_restart_with_state_keeps_the_job_and_ids() {
    let dir = std::env::temp_dir().join(format!("braid-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("coord.json");
    let _ = std::fs::remove_file(&state);
    let opts = || CoordinatorOptions {
        state_file: Some(state.clone()),
        ..CoordinatorOptions::default()
    };
    let mut coord = Coordinator::bind_with("127.0.0.1:0", opts()).unwrap();
    let addr = coord.local_addr().to_string();
    let restarted = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let (addr, stop) = (addr.clone(), stop.clone());
                s.spawn(move || {
                    let mut c = Communicator::init_with(cfg(&addr, 2)).unwrap();
                    let mut grew = false;
                    while !step(&c, &stop).unwrap() {
                        if c.update().unwrap() {
                            grew = c.size() == 3;
                            let mut p = [7u32; 16];
                            c.sync_from_oldest(&mut p).unwrap();
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    (c.member_id(), grew)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        coord.shutdown();
        drop(coord);
        std::thread::sleep(Duration::from_millis(300));
        let coord2 = Coordinator::bind_with(&addr, opts()).unwrap();
        restarted.store(true, Ordering::SeqCst);
        // Members reconnect; a joiner is admitted through the restarted coordinator.
        let t0 = Instant::now();
        loop {
            let st = coord2.status();
            let m = st["groups"][0]["members"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if m.len() == 2 && m.iter().all(|x| x["connected"] == true) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "members did not reconnect: {st}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let j = {
            let (addr, stop) = (addr.clone(), stop.clone());
            s.spawn(move || {
                let c = Communicator::init_with(cfg(&addr, 2)).unwrap();
                let mut p = [0u32; 16];
                c.sync_from_oldest(&mut p).unwrap();
                assert_eq!(p, [7u32; 16]);
                let mut c = c;
                while !step(&c, &stop).unwrap() {
                    assert!(!c.update().unwrap());
                }
                c.member_id()
            })
        };
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::SeqCst);
        let joiner = j.join().unwrap();
        for h in hs {
            let (id, grew) = h.join().unwrap();
            assert!(grew, "the running members grew to 3");
            assert!(
                id < joiner,
                "ids continue above the persisted high-water mark"
            );
        }
        drop(coord2);
    });
    assert!(restarted.load(Ordering::SeqCst));
    let _ = std::fs::remove_dir_all(&dir);
}
