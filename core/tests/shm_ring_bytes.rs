//! `BRAID_SHM_RING_BYTES` end to end: ranks as processes on one host over shm, with rings of
//! 64 KiB and 128 KiB (the ranks disagree: each connection takes its connector's size) and
//! messages many times larger than a ring, every collective checked; each rank finds its shm
//! segments in /proc/self/maps and checks their sizes (one per peer, header and control pages
//! plus two rings of one of the configured sizes). An invalid value stops the rank before it
//! registers, with an error naming the variable.
//!
//! The test binary re-runs itself as the ranks (see core/tests/shm.rs).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use braid::membership::Coordinator;
use braid::{Communicator, Config, ReduceOp};

const ROLE: &str = "BRAID_SHM_RING_TEST_ROLE";
/// The ring sizes the parent gave the ranks (comma-separated bytes), for the rank's check.
const RINGS_VAR: &str = "BRAID_SHM_RING_TEST_SIZES";
/// Header page and two control pages in front of the rings (transport/src/shm.rs).
const SEG_PAGES: usize = 3 * 4096;

mod common;
use common::{check_all, dev_shm, env_of, finish, Ranks};

fn spawn(role: &str, coord: &str, n: usize, env: &dyn Fn(usize) -> Vec<(String, String)>) -> Ranks {
    common::spawn(ROLE, role, coord, n, env)
}

// ---- rank side -------------------------------------------------------------------------

/// Lengths of this process's mappings of shm connection segments.
fn shm_segments() -> Vec<usize> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter(|l| l.contains("/memfd:braid-shm "))
        .map(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            usize::from_str_radix(b, 16).unwrap() - usize::from_str_radix(a, 16).unwrap()
        })
        .collect()
}

fn collectives(c: &Communicator) {
    let (r, n) = (c.rank(), c.size());
    // Up to ~3 MiB per message: 48 times a 64 KiB ring.
    for &count in &[1usize, 1000, 16_385, 65_537, (3 << 20) / 4 + 1] {
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
        let mut b: Vec<u32> = if r == 1 {
            (0..count as u32).collect()
        } else {
            vec![0; count]
        };
        c.broadcast(&mut b, 1).unwrap();
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
        let (to, from) = ((r + 1) % n, (r + n - 1) % n);
        let mine: Vec<i32> = (0..count).map(|i| (r * 7 + i) as i32).collect();
        let mut theirs = vec![0i32; count];
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
    c.barrier().unwrap();
}

fn rank_main(role: &str) {
    let mut cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            println!("CONFIG-ERR: {e}");
            std::process::exit(3);
        }
    };
    cfg.timeout = Duration::from_secs(60);
    let c = match Communicator::init_with(cfg) {
        Ok(c) => c,
        Err(e) => {
            println!("INIT-ERR: {e}");
            std::process::exit(4);
        }
    };
    assert_eq!(role, "coll");
    let r = c.rank();
    assert!(c.peer_transports().iter().all(|(_, t)| *t == "shm"));
    collectives(&c);
    let allowed: Vec<usize> = std::env::var(RINGS_VAR)
        .unwrap()
        .split(',')
        .map(|s| SEG_PAGES + 2 * s.parse::<usize>().unwrap())
        .collect();
    let segs = shm_segments();
    println!("rank {r} shm segments {segs:?} (allowed {allowed:?})");
    assert_eq!(segs.len(), c.size() - 1, "one segment per peer");
    assert!(segs.iter().all(|s| allowed.contains(s)), "{segs:?}");
    // Bytes went through the rings (BRAID_SHM_DIRECT=0: no single-copy path).
    assert_eq!(c.direct_bytes(), 0);
    assert!(c
        .bytes_per_peer()
        .iter()
        .all(|(_, tx, rx)| *tx > 0 && *rx > 0));
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
fn small_rings_of_different_sizes_carry_large_messages() {
    let before = dev_shm();
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    // Ranks 0 and 2: 64 KiB rings; rank 1: 128 KiB (written as 128K).
    let ranks = spawn("coll", &addr, 3, &|r| {
        env_of(&[
            ("BRAID_TRANSPORT", "shm"),
            ("BRAID_SHM_DIRECT", "0"),
            (
                "BRAID_SHM_RING_BYTES",
                if r == 1 { "128K" } else { "65536" },
            ),
            (RINGS_VAR, "65536,131072"),
        ])
    });
    let res = finish(ranks, Duration::from_secs(120));
    check_all(&res);
    // Both sizes were used (each connection has its connector's size; rank 1 makes at least
    // one of its two connections whichever side connects).
    let all: String = res.iter().map(|(_, s)| s.as_str()).collect();
    for ring in [64usize << 10, 128 << 10] {
        let seg = format!("{}", SEG_PAGES + 2 * ring);
        assert!(all.contains(&seg), "no segment of {seg} bytes:\n{all}");
    }
    let new: Vec<String> = dev_shm().difference(&before).cloned().collect();
    assert!(new.is_empty(), "files left in /dev/shm: {new:?}");
}

#[test]
fn an_invalid_ring_size_is_a_clear_error() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    for bad in ["5000", "2G", "0", "big"] {
        let ranks = spawn("coll", &addr, 1, &|_| {
            env_of(&[
                ("BRAID_TRANSPORT", "shm"),
                ("BRAID_SHM_RING_BYTES", bad),
                (RINGS_VAR, "4096"),
            ])
        });
        let res = finish(ranks, Duration::from_secs(60));
        let (ok, s) = &res[0];
        assert!(!ok, "BRAID_SHM_RING_BYTES={bad} accepted:\n{s}");
        assert!(
            s.contains("CONFIG-ERR") && s.contains(&format!("BRAID_SHM_RING_BYTES={bad}")),
            "BRAID_SHM_RING_BYTES={bad}:\n{s}"
        );
        if bad == "5000" {
            assert!(s.contains("multiple of 4K"), "{s}");
        }
    }
}
