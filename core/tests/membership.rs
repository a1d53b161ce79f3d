//! Membership through the public API: the standalone coordinator binary, and two coordinators
//! in one process.

#![allow(clippy::unwrap_used, clippy::panic)] // test helpers outside #[test] functions

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::thread;
use std::time::{Duration, Instant};

use braid::membership::{local_host_id, rendezvous, Coordinator, Registration, Role};

fn deadline(s: u64) -> Instant {
    Instant::now() + Duration::from_secs(s)
}

fn join_all(
    addr: &str,
    group: &str,
    n: usize,
) -> Vec<(braid::membership::Client, u64, braid::membership::View)> {
    let hs: Vec<_> = (0..n)
        .map(|i| {
            let addr = addr.to_string();
            let reg = Registration::worker(group, n, Some(n - 1 - i), vec![i as u8]);
            thread::spawn(move || rendezvous(&addr, &reg, deadline(20), &AtomicBool::new(false)))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
}

#[test]
fn standalone_coordinator_serves_a_rendezvous_and_stops_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_braid-coordinator"))
        .args(["--bind", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("braid-coordinator listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let res = join_all(&addr, "world", 3);
    let view = &res[0].2;
    assert_eq!(view.epoch, 1);
    for (i, (client, id, v)) in res.iter().enumerate() {
        assert_eq!(v, view);
        assert_eq!(client.member_id(), *id);
        // Member i requested rank n-1-i.
        assert_eq!(v.rank_of(*id), Some(2 - i));
        assert_eq!(v.members[2 - i].handle, vec![i as u8]);
        assert_eq!(v.members[2 - i].role, Role::Worker);
        assert_eq!(v.members[2 - i].host_id, local_host_id());
    }
    drop(res);
    let t = Instant::now();
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let st = child.wait().unwrap();
    assert!(st.success(), "{st:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn coordinator_help() {
    let out = Command::new(env!("CARGO_BIN_EXE_braid-coordinator"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--bind HOST:PORT"));
}

#[test]
fn two_coordinators_in_one_process_are_independent() {
    let a = Coordinator::bind("127.0.0.1:0").unwrap();
    let b = Coordinator::bind("127.0.0.1:0").unwrap();
    let ra = join_all(&a.local_addr().to_string(), "world", 2);
    let rb = join_all(&b.local_addr().to_string(), "world", 3);
    assert_eq!(ra[0].2.members.len(), 2);
    assert_eq!(rb[0].2.members.len(), 3);
    assert_ne!(ra[0].2.nonce, rb[0].2.nonce);
    // Each coordinator counts its own ids from the same start.
    let min_a = ra.iter().map(|r| r.1).min().unwrap();
    let min_b = rb.iter().map(|r| r.1).min().unwrap();
    assert_eq!(min_a, min_b);
}
