//! What survives servers' deaths (issue 16, replication semantics; README "Push/pull"): three
//! push/pull servers run as separate processes (this test binary re-run as `child_server`), a
//! coordinator and a worker run in the test process, over tcp. Two servers are killed with -9
//! at once:
//!
//! * `BRAID_PS_REPLICAS=1` (two copies of every part): the parts both of whose copies were on
//!   the killed servers are lost. Pulls, pushes and inits of those keys FAIL with an error naming
//!   the key (never zeros, stale values or a fresh init); every other key keeps its exact value.
//! * `BRAID_PS_REPLICAS=2` (three copies: every server holds every part): nothing is lost.
//!
//! Run: `cargo test -p braid --test ps_lost` (about 30 s).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use braid::membership::{self, Coordinator, Role};
use braid::ps::shard::{split, Ring};
use braid::ps::{Consistency, KvServer, KvWorker, PsOptions};
use braid::Config;

const GROUP: &str = "ps-lost";
const CHILD: &str = "PS_LOST_TEST_COORDINATOR";
const REPLICAS: &str = "PS_LOST_TEST_REPLICAS";
const LEN: usize = 16;
const KEYS: u64 = 48;

fn cfg(addr: &str) -> Config {
    Config {
        coordinator: Some(addr.to_string()),
        world_size: Some(4),
        group: GROUP.into(),
        timeout: Duration::from_secs(60),
        init_timeout: Duration::from_secs(60),
        transport: braid::config::TransportKind::Tcp,
        heartbeat: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(2),
        join_window: Duration::from_millis(200),
        log: std::env::var("BRAID_LOG").unwrap_or_else(|_| "warn".into()),
        ..Config::default()
    }
}

fn opts(replicas: usize) -> PsOptions {
    PsOptions {
        consistency: Consistency::Async,
        partition_bytes: 4096,
        replicas,
        ..PsOptions::default()
    }
}

/// The server process: serves until its stdin closes (the test ended) or it is killed.
#[test]
fn child_server() {
    let Ok(addr) = std::env::var(CHILD) else {
        return;
    };
    let replicas = std::env::var(REPLICAS).unwrap().parse().unwrap();
    let s = KvServer::start(cfg(&addr), opts(replicas)).unwrap();
    println!("SERVER {}", s.member_id());
    let mut b = [0u8; 1];
    let _ = std::io::stdin().read(&mut b);
    drop(s);
}

struct Server {
    child: Child,
    id: u64,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(addr: &str, replicas: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["child_server", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, addr)
        .env(REPLICAS, replicas.to_string())
        .env("BRAID_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Starts the group, kills two of the three servers with -9, and returns the worker, the keys
/// that lost every copy and those that kept one.
fn drill(replicas: usize) -> (KvWorker, Vec<u64>, Vec<u64>, Vec<Server>, Coordinator) {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let mut children: Vec<Child> = (0..3).map(|_| spawn_server(&addr, replicas)).collect();
    let worker = KvWorker::start(cfg(&addr), opts(replicas)).unwrap();
    let mut servers: Vec<Server> = children
        .drain(..)
        .map(|mut c| {
            let id = common::server_id(&mut c);
            Server { child: c, id }
        })
        .collect();
    let keys: Vec<u64> = (1..=KEYS).collect();
    let lens = vec![LEN; keys.len()];
    worker
        .init(&keys, &lens, &vec![0f32; LEN * keys.len()])
        .unwrap();
    worker
        .push(&keys, &lens, &vec![1f32; LEN * keys.len()], 0)
        .unwrap()
        .wait()
        .unwrap();
    // Which keys lose every copy when servers 0 and 1 die: the ring of the view in use.
    let view = membership::fetch_view(&addr, GROUP, None, Duration::from_secs(5)).unwrap();
    let ring = Ring::new(
        &view
            .members
            .iter()
            .filter(|m| m.role == Role::Server)
            .map(|m| (m.id, m.weight))
            .collect::<Vec<_>>(),
    );
    let victims = [servers[0].id, servers[1].id];
    let (mut lost, mut kept) = (Vec::new(), Vec::new());
    for &k in &keys {
        let s = split(k, LEN * 4, 4, 4096)[0].skey;
        let holders = ring.owners(s, replicas);
        assert_eq!(holders.len(), replicas + 1);
        if holders.iter().all(|h| victims.contains(h)) {
            lost.push(k);
        } else {
            kept.push(k);
        }
    }
    // Both at once: stopped first (a stopped process does nothing, while one killed first
    // would let the other, told of the death by a new view, seed a replica of the parts it
    // now owns on the survivor before it dies too), then killed.
    for s in &servers[..2] {
        // SAFETY: FFI; sends a signal to a child process of this test.
        unsafe {
            libc::kill(s.child.id() as libc::pid_t, libc::SIGSTOP);
        }
    }
    let _ = servers[0].child.kill();
    let _ = servers[1].child.kill();
    let _ = servers[0].child.wait();
    let _ = servers[1].child.wait();
    (worker, lost, kept, servers, coord)
}

#[test]
fn with_one_replica_two_deaths_lose_the_parts_they_both_held_and_pulls_of_them_fail() {
    let (worker, lost, kept, _servers, _coord) = drill(1);
    assert!(
        !lost.is_empty() && !kept.is_empty(),
        "the ring gave lost {lost:?} kept {kept:?}: pick other keys"
    );
    let t0 = Instant::now();
    // Every key that kept a copy: exact.
    for &k in &kept {
        let p = worker
            .pull::<f32>(&[k], &[LEN], None, 0)
            .unwrap()
            .wait()
            .unwrap_or_else(|e| panic!("key {k} kept a copy but its pull failed: {e}"));
        assert_eq!(p.values, vec![1f32; LEN], "key {k}");
    }
    // Every key that lost both copies: pulls fail naming the key, never zeros.
    for &k in &lost {
        let e = worker
            .pull::<f32>(&[k], &[LEN], None, 0)
            .unwrap()
            .wait()
            .map(|p| p.values)
            .expect_err(&format!("key {k} lost every copy, yet its pull answered"));
        let m = e.to_string();
        assert!(!matches!(e, braid::Error::Timeout { .. }), "key {k}: {m}");
        assert!(
            m.contains(&format!("key {k} ")) && m.contains("lost"),
            "key {k}: {m}"
        );
    }
    // A pull of several keys including a lost one fails as a whole, naming it.
    let k = lost[0];
    let e = worker
        .pull::<f32>(&[kept[0], k], &[LEN, LEN], None, 0)
        .unwrap()
        .wait()
        .unwrap_err();
    assert!(e.to_string().contains(&format!("key {k} ")), "{e}");
    // A restarted worker's init does not bring the key back with its initial values, and a
    // push has nothing to add to.
    let e = worker.init(&[k], &[LEN], &[0f32; LEN]).unwrap_err();
    assert!(e.to_string().contains("lost"), "{e}");
    let e = worker
        .push(&[k], &[LEN], &[1f32; LEN], 0)
        .unwrap()
        .wait()
        .unwrap_err();
    assert!(e.to_string().contains("lost"), "{e}");
    let e = worker
        .pull::<f32>(&[k], &[LEN], None, 0)
        .unwrap()
        .wait()
        .map(|p| p.values)
        .unwrap_err();
    assert!(e.to_string().contains("lost"), "{e}");
    eprintln!(
        "{} key(s) lost, {} kept; checked in {:?}",
        lost.len(),
        kept.len(),
        t0.elapsed()
    );
}

#[test]
fn with_two_replicas_two_deaths_lose_nothing() {
    let (worker, lost, kept, _servers, _coord) = drill(2);
    // Three copies on three servers: every key kept one.
    assert!(lost.is_empty(), "{lost:?}");
    let lens = vec![LEN; kept.len()];
    let p = worker
        .pull::<f32>(&kept, &lens, None, 0)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(p.values, vec![1f32; LEN * kept.len()]);
    // And the group goes on: a push lands on the survivor.
    worker
        .push(&kept, &lens, &vec![1f32; LEN * kept.len()], 0)
        .unwrap()
        .wait()
        .unwrap();
    let p = worker
        .pull::<f32>(&kept, &lens, None, 0)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(p.values, vec![2f32; LEN * kept.len()]);
}
