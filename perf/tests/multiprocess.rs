//! Multi-process tests over TCP: every collective through braid-run and braid-perf (whose
//! #wrong column checks closed-form results), and fault drills (kill -9, mismatched
//! collectives).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use braid::membership::Coordinator;

fn perf() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_braid-perf"))
}

fn bin(name: &str) -> PathBuf {
    // Workspace binaries land next to braid-perf.
    let p = perf().with_file_name(name);
    assert!(
        p.exists(),
        "{} not built (run cargo build --workspace --bins)",
        p.display()
    );
    p
}

fn run_ok(args: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let mut cmd = Command::new(bin("braid-run"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("braid-run");
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    let se = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{so}\n{se}",
        out.status
    );
    assert!(so.contains("Out of bounds values : 0 OK"), "{so}\n{se}");
    (so, se)
}

fn every_collective(transport: &str) {
    let p = perf();
    let p = p.to_str().unwrap();
    for coll in [
        "all_reduce",
        "reduce_scatter",
        "all_gather",
        "broadcast",
        "reduce",
        "all_to_all",
        "gather",
        "scatter",
        "sendrecv",
    ] {
        for (n, dtype, extra) in [("3", "float", "-r 2"), ("4", "int32", "-r 1")] {
            let mut args = vec![
                "-n", n, "--", p, coll, "-b", "1K", "-e", "1M", "-f", "32", "-n", "2", "-w", "1",
                "-d", dtype, "-v",
            ];
            args.extend(extra.split_whitespace());
            if coll == "all_reduce" || coll == "reduce_scatter" || coll == "reduce" {
                args.extend(["-o", "max"]);
            }
            let out = run_ok(&args, &[("BRAID_TRANSPORT", transport)]);
            // -v reports which transport carried each peer's bytes.
            assert!(out.1.contains(&format!("via {transport}")), "{}", out.1);
        }
    }
}

#[test]
fn every_collective_over_tcp_with_braid_run() {
    every_collective("tcp");
}

#[test]
fn every_collective_over_shm_with_braid_run() {
    every_collective("shm");
}

/// Lazy connections (the default) between processes over real tcp and shm listeners: a
/// sendrecv ring on 6 ranks (each rank sends to r+1 and receives from r-1 in one group, so
/// both ends of every pair first need it at once: the lower one dials, the higher one asks it
/// to) completes with exact results, and not every pair is connected (braid-perf also runs
/// small collectives and barriers of its own, which connect their peers: the barrier's at
/// distances 1 and 2, never 3); BRAID_LAZY_CONNECT=0 connects every pair at init. `-v` lists
/// the peers each rank holds a connection to.
#[test]
fn lazy_connections_connect_only_the_peers_used_over_tcp_and_shm() {
    let p = perf();
    let p = p.to_str().unwrap();
    for transport in ["tcp", "shm"] {
        for lazy in ["1", "0"] {
            let args = [
                "-n", "6", "--", p, "sendrecv", "-b", "1K", "-e", "256K", "-f", "16", "-n", "2",
                "-w", "1", "-v",
            ];
            let (so, se) = run_ok(
                &args,
                &[("BRAID_TRANSPORT", transport), ("BRAID_LAZY_CONNECT", lazy)],
            );
            let lines: Vec<&str> = se
                .lines()
                .filter(|l| l.contains("bytes per peer"))
                .collect();
            assert_eq!(lines.len(), 6, "{transport} lazy={lazy}\n{so}\n{se}");
            let mut total = 0;
            for l in lines {
                let peers = l.matches("[peer ").count();
                total += peers;
                assert!(l.contains(&format!("via {transport}")), "{l}");
                if lazy == "1" {
                    assert!((2..=5).contains(&peers), "{transport}: {l}\n{se}");
                } else {
                    assert_eq!(peers, 5, "{transport} eager: {l}\n{se}");
                }
            }
            if lazy == "1" {
                assert!(total < 6 * 5, "{transport}: every pair connected\n{se}");
            }
        }
    }
}

/// `-R 1`: buffers from braid's shared-memory allocator; on one host all_reduce and sendrecv
/// copy single-copy (counted by `-v` as "single-copy read"), results still exact. `-R 0`
/// (heap buffers): all_reduce is single-copy through cross-memory attach (BRAID_SHM_CMA=auto),
/// sendrecv is not, and with BRAID_SHM_CMA=0 nothing is read from peers' memory.
#[test]
fn registered_buffers_take_the_single_copy_path() {
    let p = perf();
    let p = p.to_str().unwrap();
    let single_copy = |se: &str| -> u64 {
        se.lines()
            .filter_map(|l| l.split("single-copy read ").nth(1))
            .map(|v| v.trim().parse::<u64>().unwrap())
            .sum()
    };
    for (coll, n, size) in [
        ("all_reduce", "2", "2M"),
        ("all_reduce", "3", "3M"),
        ("sendrecv", "2", "8M"),
    ] {
        for (reg, cma, extra) in [
            ("1", "auto", &["-o", "sum"][..]),
            ("0", "auto", &[][..]),
            ("0", "0", &[][..]),
        ] {
            let mut args = vec![
                "-n", n, "--", p, coll, "-b", size, "-e", size, "-n", "2", "-w", "1", "-R", reg,
                "-v",
            ];
            args.extend(extra);
            let (so, se) = run_ok(&args, &[("BRAID_TRANSPORT", "shm"), ("BRAID_SHM_CMA", cma)]);
            let read = single_copy(&se);
            assert!(
                so.contains(if reg == "1" {
                    "# buffers: registered"
                } else {
                    "# buffers: heap"
                }),
                "{so}"
            );
            let expect_single_copy = reg == "1" || (coll == "all_reduce" && cma == "auto");
            assert_eq!(
                read > 0,
                expect_single_copy,
                "{coll} -R {reg} BRAID_SHM_CMA={cma} on {n} ranks read {read} bytes single-copy:\n{so}\n{se}"
            );
        }
    }
}

#[test]
fn all_reduce_ops_dtypes_algorithms_and_striping() {
    let p = perf();
    let p = p.to_str().unwrap();
    for (dtype, op) in [
        ("half", "sum"),
        ("bfloat16", "avg"),
        ("double", "prod"),
        ("int8", "min"),
        ("uint64", "sum"),
    ] {
        run_ok(
            &[
                "-n",
                "3",
                "--",
                p,
                "all_reduce",
                "-b",
                "8",
                "-e",
                "512K",
                "-f",
                "64",
                "-n",
                "2",
                "-w",
                "1",
                "-d",
                dtype,
                "-o",
                op,
            ],
            &[],
        );
    }
    // Forced algorithms and striping over 3 sockets per peer.
    for algo in ["all_reduce=ring", "all_reduce=recdoubling"] {
        run_ok(
            &[
                "-n",
                "5",
                "--",
                p,
                "all_reduce",
                "-b",
                "4",
                "-e",
                "256K",
                "-f",
                "16",
                "-n",
                "2",
                "-w",
                "0",
            ],
            &[("BRAID_ALGO", algo)],
        );
    }
    run_ok(
        &[
            "-n",
            "2",
            "--",
            p,
            "all_reduce",
            "-b",
            "1M",
            "-e",
            "4M",
            "-n",
            "2",
            "-w",
            "1",
        ],
        &[
            ("BRAID_TCP_STREAMS", "3"),
            ("BRAID_TCP_STRIPE_MIN", "65536"),
        ],
    );
}

/// Starts `n` braid-perf ranks directly (no braid-run) with per-rank arguments.
fn start_ranks(coord: &Coordinator, n: usize, args: impl Fn(usize) -> Vec<String>) -> Vec<Child> {
    let addr = coord.local_addr().to_string();
    (0..n)
        .map(|r| {
            Command::new(perf())
                .args(args(r))
                .env("BRAID_COORDINATOR", &addr)
                .env("BRAID_WORLD_SIZE", n.to_string())
                .env("BRAID_RANK", r.to_string())
                .env("BRAID_TRANSPORT", "tcp")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn braid-perf")
        })
        .collect()
}

fn wait_all(children: Vec<Child>, limit: Duration) -> Vec<(bool, String, Duration)> {
    let t0 = Instant::now();
    children
        .into_iter()
        .map(|mut c| {
            loop {
                if let Some(_s) = c.try_wait().unwrap() {
                    break;
                }
                if t0.elapsed() > limit {
                    let _ = c.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let el = t0.elapsed();
            let out = c.wait_with_output().unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
                el,
            )
        })
        .collect()
}

#[test]
fn kill_minus_9_is_reported_by_every_survivor_within_two_seconds() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let mut ranks = start_ranks(&coord, 4, |_| {
        "all_reduce -b 8M -e 8M -n 100000 -w 0"
            .split_whitespace()
            .map(String::from)
            .collect()
    });
    // Let the loop run, then kill rank 2.
    std::thread::sleep(Duration::from_millis(1500));
    let mut victim = ranks.remove(2);
    assert!(victim.try_wait().unwrap().is_none(), "rank 2 ended early");
    victim.kill().unwrap(); // SIGKILL
    let t0 = Instant::now();
    let _ = victim.wait();
    let res = wait_all(ranks, Duration::from_secs(20));
    for (ok, err, _) in &res {
        assert!(!ok, "a survivor exited 0");
        assert!(err.contains("rank 2"), "error does not name rank 2: {err}");
    }
    let slowest = t0.elapsed();
    eprintln!(
        "survivors exited {:.3} s after the kill",
        slowest.as_secs_f64()
    );
    // The bound is 2 s; allow scheduling slack on a loaded 2-core CI machine.
    assert!(
        slowest < Duration::from_secs(4),
        "survivors took {slowest:?}"
    );
}

#[test]
fn mismatched_counts_fail_on_every_rank() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let ranks = start_ranks(&coord, 2, |r| {
        let b = if r == 0 { "4000" } else { "4004" };
        format!("all_reduce -b {b} -e {b} -n 1 -w 0")
            .split_whitespace()
            .map(String::from)
            .collect()
    });
    for (ok, err, _) in wait_all(ranks, Duration::from_secs(30)) {
        assert!(!ok);
        assert!(
            err.contains("mismatch") && err.contains("count=1000") && err.contains("count=1001"),
            "{err}"
        );
    }
}

#[test]
fn broadcast_against_all_reduce_fails_on_every_rank() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let ranks = start_ranks(&coord, 2, |r| {
        let c = if r == 0 { "broadcast" } else { "all_reduce" };
        format!("{c} -b 4K -e 4K -n 1 -w 0")
            .split_whitespace()
            .map(String::from)
            .collect()
    });
    let res = wait_all(ranks, Duration::from_secs(30));
    // Rank 1 receives the broadcast's data and names both calls, unless rank 0's abort notice
    // reaches it first. Rank 0, whose broadcast only sent, completes it and fails at its next
    // call with a mismatch naming rank 1's call. Both fail with a mismatch naming the calls.
    for (ok, err, _) in &res {
        assert!(!ok);
        assert!(err.contains("mismatch"), "{err}");
    }
    let all: String = res.iter().map(|r| r.1.as_str()).collect();
    assert!(all.contains("all_reduce(float, sum, count=1024"), "{all}");
}

#[test]
fn a_stopped_peer_is_caught_by_the_deadline() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    // BRAID_TIMEOUT (2 s) comes before the failure detector (10 s by default).
    stop_drill(
        2,
        |r| braid_vars(&addr, 2, r),
        &[("BRAID_TIMEOUT", "2")],
        1,
        &["timeout", "rank 1"],
        (Duration::from_millis(1500), Duration::from_secs(6)),
    );
}

/// The rendezvous variables of rank `r` of `n` with the coordinator at `addr`.
fn braid_vars(addr: &str, n: usize, r: usize) -> Vec<(&'static str, String)> {
    vec![
        ("BRAID_COORDINATOR", addr.to_string()),
        ("BRAID_WORLD_SIZE", n.to_string()),
        ("BRAID_RANK", r.to_string()),
    ]
}

/// Heartbeats every 0.5 s, a member silent for 2 s is dead; the operation timeout (60 s) is
/// far away, so only the failure detector can end the drills below in time.
const FAST_DETECTOR: [(&str, &str); 3] = [
    ("BRAID_TIMEOUT", "60"),
    ("BRAID_HEARTBEAT", "0.5"),
    ("BRAID_HEARTBEAT_TIMEOUT", "2"),
];

/// A TCP port free on 127.0.0.1 a moment ago (for rank 0 to host the coordinator on).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The stop drill: `n` ranks of `braid-perf all_reduce` in a long loop over tcp, each started
/// with `rendezvous(rank)` (its variables) and `env`; after 1.5 s rank `victim` is stopped
/// (SIGSTOP), the others awaited (at most 30 s), then the victim killed. Asserts that every
/// other rank failed with an error containing all of `expect`, between `min` and `max` after
/// the stop.
fn stop_drill(
    n: usize,
    rendezvous: impl Fn(usize) -> Vec<(&'static str, String)>,
    env: &[(&str, &str)],
    victim: usize,
    expect: &[&str],
    (min, max): (Duration, Duration),
) {
    let mut ranks: Vec<Child> = (0..n)
        .map(|r| {
            Command::new(perf())
                .args("all_reduce -b 64K -e 64K -n 100000000 -w 0".split_whitespace())
                .envs(rendezvous(r))
                .env("BRAID_TRANSPORT", "tcp")
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let victim = ranks.remove(victim);
    let st = Command::new("kill")
        .args(["-STOP", &victim.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t0 = Instant::now();
    let res = wait_all(ranks, Duration::from_secs(30));
    let took = t0.elapsed();
    let _ = Command::new("kill")
        .args(["-KILL", &victim.id().to_string()])
        .status();
    let _ = victim.wait_with_output();
    for (ok, err, _) in &res {
        assert!(!ok, "a survivor exited 0");
        assert!(expect.iter().all(|e| err.contains(e)), "{err}");
    }
    eprintln!(
        "the others ended {:.2} s after the stop ({env:?})",
        took.as_secs_f64()
    );
    assert!(took >= min && took < max, "{took:?}");
}

/// A group that is not elastic has braid's failure detector too: a member that stops (a hung
/// or stopped process keeps its sockets open, so no connection breaks) is declared dead by the
/// coordinator after its heartbeat timeout, and every survivor's operation fails with an
/// error naming it, long before the operation timeout.
#[test]
fn a_stopped_member_of_a_fixed_group_is_reported_within_the_heartbeat_timeout() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    // Dead 2 s after its last heartbeat (sent at most 0.5 s before the stop); the rest of the
    // bound is slack for a loaded 2-core machine. The operation timeout is 60 s.
    stop_drill(
        3,
        |r| braid_vars(&addr, 3, r),
        &FAST_DETECTOR,
        2,
        &["peer lost: rank 2", "no heartbeat for"],
        (Duration::from_millis(1000), Duration::from_secs(10)),
    );
}

/// The coordinator itself may be what stops: rank 0 hosts it (torchrun's variables, as the
/// torch backend does). Nobody is left to declare rank 0 dead; the others hear nothing from
/// the coordinator for their heartbeat timeout, and their operations, stuck as long, fail
/// with an error saying so. (A job that moves is never failed by a silent coordinator.)
#[test]
fn a_stopped_rank_hosting_the_coordinator_fails_the_others_stuck_operations() {
    let port = free_port();
    stop_drill(
        3,
        |r| {
            vec![
                ("MASTER_ADDR", "127.0.0.1".into()),
                ("MASTER_PORT", port.to_string()),
                ("RANK", r.to_string()),
                ("WORLD_SIZE", "3".into()),
            ]
        },
        &FAST_DETECTOR,
        0,
        &["no word from the coordinator", "no progress for"],
        (Duration::from_millis(1500), Duration::from_secs(12)),
    );
}

#[test]
fn torchrun_variables_work_with_rank_zero_hosting_the_coordinator() {
    let port = free_port();
    let children: Vec<Child> = (0..3)
        .map(|r| {
            Command::new(perf())
                .args("all_gather -b 1K -e 64K -f 8 -n 2 -w 1".split_whitespace())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", "3")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (ok, err, _) in wait_all(children, Duration::from_secs(60)) {
        assert!(ok, "{err}");
    }
}
