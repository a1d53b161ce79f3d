//! Member ids stay monotonic across a coordinator killed with SIGKILL in the middle of a join
//! storm and restarted on the same state file (`BRAID_COORDINATOR_STATE`): the state file is
//! written off the coordinator's state lock, in batches, and every id handed out must still be
//! below the high-water mark a restart continues from.
//!
//! Run: `cargo test -p braid --test coord_restart`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test] functions

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use braid::membership::Registration;

/// Starts `braid-coordinator` on a free port with `state` as its state file; returns the
/// child and its address.
fn start(state: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_braid-coordinator"))
        .args(["--bind", "127.0.0.1:0"])
        .env_remove("BRAID_JOB_TOKEN")
        .env("BRAID_COORDINATOR_STATE", state)
        .env("BRAID_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start braid-coordinator");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("braid-coordinator listening on ")
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_string();
    (child, addr)
}

fn frame(ty: u16, body: &[u8]) -> Vec<u8> {
    let mut v = b"BRDC".to_vec();
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&ty.to_be_bytes());
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Registers in elastic group "g" (world 1: the first registration forms it, the others
/// join); returns the socket (kept open: the member stays) and its id, or `None` when the
/// coordinator is gone.
fn register(addr: &str) -> Option<(TcpStream, u64)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut r = Registration::worker("g", 1, None, vec![1, 2, 3]);
    r.elastic = true;
    r.light = true;
    r.policy.join_window_ms = 50;
    s.write_all(&frame(1, &serde_json::to_vec(&r).unwrap()))
        .ok()?;
    let mut hdr = [0u8; 12];
    s.read_exact(&mut hdr).ok()?;
    let len = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    assert!(len < 1 << 20);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    let ty = u16::from_be_bytes([hdr[6], hdr[7]]);
    assert_eq!(
        ty,
        2,
        "expected Registered: {}",
        String::from_utf8_lossy(&body)
    );
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    Some((s, v["member_id"].as_u64().unwrap()))
}

#[test]
fn ids_keep_increasing_after_a_kill_in_the_middle_of_a_join_storm() {
    let dir = std::env::temp_dir().join(format!("braid-coord-restart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state.json");
    let _ = std::fs::remove_file(&state);
    let mut floor = 0u64;
    for round in 0..3 {
        let (mut child, addr) = start(&state);
        // The first registration after a restart is above every id handed out before.
        let (first, id0) = register(&addr).expect("first registration");
        assert!(
            id0 > floor,
            "round {round}: id {id0} after ids up to {floor}"
        );
        // A storm: 4 threads registering as fast as they can, keeping their connections.
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(id0));
        let count = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (addr, stop, max, count) =
                    (addr.clone(), stop.clone(), max.clone(), count.clone());
                std::thread::spawn(move || {
                    let mut keep = Vec::new();
                    let mut last = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let Some((s, id)) = register(&addr) else {
                            break;
                        };
                        assert!(
                            id > last,
                            "ids out of order on one thread: {id} after {last}"
                        );
                        last = id;
                        max.fetch_max(id, Ordering::SeqCst);
                        count.fetch_add(1, Ordering::SeqCst);
                        keep.push(s);
                    }
                    keep.len()
                })
            })
            .collect();
        // Kill it mid-storm, past a block of ids (so the write-ahead of the high-water mark
        // has run at least once), at a point that varies by round.
        let want = 1100 + 300 * round as u64;
        let end = Instant::now() + Duration::from_secs(60);
        while count.load(Ordering::SeqCst) < want {
            assert!(
                Instant::now() < end,
                "storm too slow: {}",
                count.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        stop.store(true, Ordering::SeqCst);
        let kept: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        drop(first);
        floor = max.load(Ordering::SeqCst);
        eprintln!("round {round}: killed after {kept} joiners; highest id acknowledged {floor}");
    }
    let (mut child, addr) = start(&state);
    let (_s, id) = register(&addr).expect("registration after the last restart");
    assert!(id > floor, "id {id} after ids up to {floor}");
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
