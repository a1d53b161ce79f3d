//! Ranks as processes on one host over the shared-memory transport (and mixed shm + tcp).
//!
//! The test binary re-runs itself as the ranks: with `BRAID_SHM_TEST_ROLE` set, the test
//! `rank_entry` acts as one rank (configured from `BRAID_*` variables); otherwise it does
//! nothing. The parent hosts the coordinator and checks the ranks' exit codes and output.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use braid::membership::Coordinator;
use braid::{Communicator, Config, ReduceOp};

const ROLE: &str = "BRAID_SHM_TEST_ROLE";

mod common;
use common::{check_all, dev_shm, env_of, finish, kill_rank_2_and_check, Ranks};

fn spawn(role: &str, coord: &str, n: usize, env: &dyn Fn(usize) -> Vec<(String, String)>) -> Ranks {
    common::spawn(ROLE, role, coord, n, env)
}

// ---- rank side -------------------------------------------------------------------------

fn collectives(c: &Communicator) {
    let (r, n) = (c.rank(), c.size());
    for &count in &[0usize, 1, 7, 1000, 65_537, (3 << 20) / 4 + 1] {
        let send: Vec<f32> = (0..count).map(|i| (r * 1000 + i % 1000) as f32).collect();
        let mut recv = vec![0f32; count];
        c.all_reduce(&send, &mut recv, ReduceOp::Sum).unwrap();
        for (i, v) in recv.iter().enumerate() {
            let want: usize = (0..n).map(|k| k * 1000 + i % 1000).sum();
            assert_eq!(*v, want as f32, "all_reduce count {count} at {i}");
        }
        let mut all = vec![0f32; count * n];
        c.all_gather(&send, &mut all).unwrap();
        for k in 0..n {
            for i in (0..count).step_by(97) {
                assert_eq!(all[k * count + i], (k * 1000 + i % 1000) as f32);
            }
        }
        let mut b: Vec<u32> = if r == 1 % n {
            (0..count as u32).collect()
        } else {
            vec![0; count]
        };
        c.broadcast(&mut b, 1 % n).unwrap();
        assert!(b.iter().enumerate().all(|(i, v)| *v == i as u32));
        let per = count / n + 1;
        let a2a: Vec<u64> = (0..per * n).map(|i| (r * 1_000_000 + i) as u64).collect();
        let mut got = vec![0u64; per * n];
        c.all_to_all(&a2a, &mut got).unwrap();
        for k in 0..n {
            for i in 0..per {
                assert_eq!(got[k * per + i], (k * 1_000_000 + r * per + i) as u64);
            }
        }
        // Ring exchange with point-to-point calls.
        let to = (r + 1) % n;
        let from = (r + n - 1) % n;
        let mine: Vec<i32> = (0..count).map(|i| (r * 7 + i) as i32).collect();
        let mut theirs = vec![0i32; count];
        if n > 1 {
            c.group()
                .send(&mine, to, 5)
                .unwrap()
                .recv(&mut theirs, from, 5)
                .unwrap()
                .run()
                .unwrap();
            assert!(theirs
                .iter()
                .enumerate()
                .all(|(i, v)| *v == (from * 7 + i) as i32));
        }
    }
    c.barrier().unwrap();
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
    println!("rank {r} transports {:?}", c.peer_transports());
    match role {
        "coll" => {
            assert!(c.peer_transports().iter().all(|(_, t)| *t == "shm"));
            assert_eq!(c.transport_name(), "shm");
            collectives(&c);
        }
        "mixed" => {
            let host = |k: usize| k / 2;
            for (p, t) in c.peer_transports() {
                let want = if host(p) == host(r) { "shm" } else { "tcp" };
                assert_eq!(t, want, "rank {r} -> {p}");
            }
            collectives(&c);
            for (p, tx, rx) in c.bytes_per_peer() {
                println!("rank {r} peer {p} tx {tx} rx {rx}");
            }
            // Every pair exchanged data in all_to_all, whatever its transport.
            assert!(c
                .bytes_per_peer()
                .iter()
                .all(|(_, tx, rx)| *tx > 0 && *rx > 0));
        }
        "kill" => common::all_reduce_until_error(&c, &mut vec![1f32; 4 << 20]),
        other => panic!("unknown role {other}"),
    }
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

#[test]
fn collectives_over_shm_processes() {
    let before = dev_shm();
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let ranks = spawn("coll", &addr, 3, &|_| env_of(&[("BRAID_TRANSPORT", "shm")]));
    let res = finish(ranks, Duration::from_secs(120));
    check_all(&res);
    let new: Vec<String> = dev_shm().difference(&before).cloned().collect();
    assert!(new.is_empty(), "files left in /dev/shm: {new:?}");
}

#[test]
fn mixed_shm_within_hosts_and_tcp_across() {
    let before = dev_shm();
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let ranks = spawn("mixed", &addr, 4, &|r| {
        env_of(&[("BRAID_HOST_ID", if r < 2 { "host-a" } else { "host-b" })])
    });
    let res = finish(ranks, Duration::from_secs(120));
    check_all(&res);
    let new: Vec<String> = dev_shm().difference(&before).cloned().collect();
    assert!(new.is_empty(), "files left in /dev/shm: {new:?}");
}

#[test]
fn forced_shm_across_hosts_is_an_error_naming_both() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let ranks = spawn("coll", &addr, 2, &|r| {
        env_of(&[
            ("BRAID_TRANSPORT", "shm"),
            ("BRAID_HOST_ID", if r == 0 { "host-a" } else { "host-b" }),
        ])
    });
    let res = finish(ranks, Duration::from_secs(60));
    for (r, (ok, s)) in res.iter().enumerate() {
        assert!(!ok, "rank {r} should fail:\n{s}");
        assert!(
            s.contains("INIT-ERR") && s.contains("host-a") && s.contains("host-b"),
            "rank {r}:\n{s}"
        );
    }
}

#[test]
fn killed_rank_is_reported_within_two_seconds() {
    let before = dev_shm();
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let ranks = spawn("kill", &addr, 3, &|_| env_of(&[("BRAID_TRANSPORT", "shm")]));
    // Wait until all ranks run collectives, then let them transfer a little.
    kill_rank_2_and_check(ranks, Duration::from_secs(2), &before);
}
