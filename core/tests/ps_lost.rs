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
/// Set for the servers stopped with SIGSTOP ([`stopped_server_drill`] and the pull test).
const STALL: &str = "PS_LOST_TEST_STALL";
/// With [`STALL`]: the partition size of the server's options (else the default).
const PARTS: &str = "PS_LOST_TEST_PARTS";
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

/// One server and one worker, whose heartbeats may stop for a minute without a view change
/// (a stopped server stays in the view).
fn stall_cfg(addr: &str) -> Config {
    Config {
        group: "ps-lost-stall".into(),
        world_size: Some(2),
        heartbeat_timeout: Duration::from_secs(60),
        ..cfg(addr)
    }
}

fn stall_opts() -> PsOptions {
    PsOptions {
        consistency: Consistency::Async,
        ..PsOptions::default()
    }
}

/// [`stall_opts`] with parts of `bytes` (a whole value in one part, one answer).
fn stall_opts_parts(bytes: usize) -> PsOptions {
    PsOptions {
        partition_bytes: bytes,
        ..stall_opts()
    }
}

/// The server process: serves until its stdin closes (the test ended) or it is killed.
#[test]
fn child_server() {
    let Ok(addr) = std::env::var(CHILD) else {
        return;
    };
    let replicas = std::env::var(REPLICAS).unwrap().parse().unwrap();
    let s = if std::env::var(STALL).is_ok() {
        let o = match std::env::var(PARTS) {
            Ok(b) => stall_opts_parts(b.parse().unwrap()),
            Err(_) => stall_opts(),
        };
        KvServer::start(stall_cfg(&addr), o).unwrap()
    } else {
        KvServer::start(cfg(&addr), opts(replicas)).unwrap()
    };
    println!("SERVER {}", s.member_id());
    let mut b = [0u8; 1];
    // A stop and continue (SIGSTOP, SIGCONT) may interrupt the read.
    while let Err(e) = std::io::stdin().read(&mut b) {
        if e.kind() != std::io::ErrorKind::Interrupted {
            break;
        }
    }
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
    server_command(addr, replicas).spawn().unwrap()
}

fn server_command(addr: &str, replicas: usize) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["child_server", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, addr)
        .env(REPLICAS, replicas.to_string())
        .env(
            "BRAID_LOG",
            std::env::var("BRAID_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    c
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

/// Stops process `pid` (SIGSTOP) and waits until it is stopped.
fn stop(pid: libc::pid_t) {
    // SAFETY: FFI; sends a signal to a child process of this test.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stopped = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap()
        .contains(") T ")
    {
        assert!(Instant::now() < stopped, "the server did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The drill of the two tests below: 64 MiB of f32 sent by `send` from the caller's memory to
/// one server (`send` may also pull into `out`), first while it runs, then while it is stopped
/// (SIGSTOP: stopped, not dead; the heartbeat timeout here is a minute, so it stays in the
/// view). 64 MiB is more than the socket buffers take (here up to 32 MiB received and 4 MiB
/// sent are buffered), so the connection still holds some of the values when the call fails.
/// The call returns the error within its timeout plus a grace, and nothing holds the caller's
/// values any more: the connection that still held what it could not send was closed (the
/// values are overwritten and freed while the server is still stopped). Once the server
/// resumes, the worker goes on over a new connection; of the push that failed, only requests
/// the server had received whole are applied.
fn stopped_server_drill(send: impl Fn(&KvWorker, &[f32], &mut [f32]) -> braid::Result<()>) {
    const N: usize = 16 << 20;
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let child = server_command(&addr, 0).env(STALL, "1").spawn().unwrap();
    let mut wc = stall_cfg(&addr);
    // Every operation's deadline, the failing one's too. An unoptimised build (the server is
    // this test binary) needs more for the 64 MiB push_pull after the resume: the server
    // first applies what it had received, in its debug-build kernels (3 s was seen to run
    // out there, 1 run in about 25 with two tests at once).
    let timeout = Duration::from_secs(if cfg!(debug_assertions) { 8 } else { 3 });
    wc.timeout = timeout;
    let worker = KvWorker::start(wc, stall_opts()).unwrap();
    let mut server = Server { child, id: 0 };
    server.id = common::server_id(&mut server.child);
    worker.init(&[7], &[N], &vec![0f32; N]).unwrap();
    let mut out = vec![0f32; N];
    send(&worker, &vec![1f32; N], &mut out).unwrap();
    worker.pull_into(&[7], &[N], &mut out, None, 0).unwrap();
    assert!(out.iter().all(|v| *v == 1.0), "first push");

    let pid = server.child.id() as libc::pid_t;
    stop(pid);
    let vals = vec![2f32; N];
    let t0 = Instant::now();
    let e = send(&worker, &vals, &mut out).expect_err("a push to a stopped server was answered");
    let took = t0.elapsed();
    // The values are free again: overwritten and freed while the server is still stopped.
    drop(vals);
    let scribble = vec![9f32; N];
    eprintln!("failed after {took:?}: {e}");
    assert!(
        took < timeout + Duration::from_secs(9),
        "took {took:?} (timeout {timeout:?}, grace 1 s): {e}"
    );
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    worker
        .push_pull_into(&[7], &[N], &vec![4f32; N], &mut out, 0)
        .unwrap();
    // The failed push's requests (one per 4 MiB part) that were whole in the socket buffers
    // when the server stopped were applied when it resumed; the others not at all; never the
    // values written after the call returned.
    for (i, part) in out.chunks(1 << 20).enumerate() {
        assert!(
            (part[0] == 5.0 || part[0] == 7.0) && part.iter().all(|v| *v == part[0]),
            "part {i} after the resume: {:?}..{:?}",
            &part[..4],
            &part[part.len() - 4..]
        );
    }
    drop(scribble);
}

/// A blocking `push_pull_into` of large values sends them from the caller's memory: the
/// stopped-server drill.
#[test]
fn a_push_pull_into_a_stopped_server_fails_and_gives_its_values_back() {
    stopped_server_drill(|w, vals, out| {
        w.push_pull_into(&[7], &[vals.len()], vals, out, 0)
            .map(drop)
    });
}

/// A non-blocking `push_lent` (the C ABI's braid_kv_push_nocopy) sends large values from the
/// caller's memory until its handle is waited for: the stopped-server drill.
#[test]
fn a_lent_push_to_a_stopped_server_fails_and_gives_its_values_back() {
    stopped_server_drill(|w, vals, _| {
        // SAFETY: `vals` is not modified until the handle was waited for (here).
        unsafe { w.push_lent(&[7], &[vals.len()], vals, 0) }.and_then(|h| h.wait())
    });
}

/// A blocking `pull_into` of large values receives the answers straight into the caller's
/// memory. A server stopped while it sends them (stopped, not dead: it stays in the view)
/// leaves an answer half received: the pull fails within its timeout plus a grace, the
/// connection that was receiving into the caller's memory is closed, and nothing is written
/// there after the call returned, not even once the server resumes. The worker then goes on
/// over a new connection.
#[test]
fn a_pull_into_from_a_server_stopped_mid_answer_fails_and_writes_nothing_after() {
    // 64 MiB of f32 in one part: one answer, much more than the socket buffers hold, so the
    // server is stopped while it sends it unless the stop falls between two pulls.
    const N: usize = 16 << 20;
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let child = server_command(&addr, 0)
        .env(STALL, "1")
        .env(PARTS, (N * 4).to_string())
        .spawn()
        .unwrap();
    let mut wc = stall_cfg(&addr);
    wc.timeout = Duration::from_secs(3);
    let worker = KvWorker::start(wc, stall_opts_parts(N * 4)).unwrap();
    let mut server = Server { child, id: 0 };
    server.id = common::server_id(&mut server.child);
    worker.init(&[7], &[N], &vec![1f32; N]).unwrap();
    let pid = server.child.id() as libc::pid_t;
    // A stop between two pulls finds no answer half received (the call then fails at its
    // timeout, with nothing to take back): tried again, a few times at most.
    for attempt in 0..4 {
        let mut out = vec![0f32; N];
        worker.pull_into(&[7], &[N], &mut out, None, 0).unwrap();
        assert!(
            out.iter().all(|v| *v == 1.0),
            "attempt {attempt}: first pull"
        );
        // Pulls one right after the other; the server is stopped while they run.
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            stop(pid);
        });
        let mut pulls = 0;
        let (e, took) = loop {
            let t0 = Instant::now();
            if let Err(e) = worker.pull_into(&[7], &[N], &mut out, None, 0) {
                break (e, t0.elapsed());
            }
            pulls += 1;
            assert!(pulls < 10_000, "the pulls never failed");
        };
        stopper.join().unwrap();
        // The caller's memory is its own again: written now, it must stay as written.
        out.fill(9.0);
        eprintln!("attempt {attempt}: pull {pulls} failed after {took:?}: {e}");
        assert!(
            took < Duration::from_secs(12),
            "took {took:?} (timeout 3 s, grace 1 s): {e}"
        );
        // SAFETY: FFI; sends a signal to a child process of this test.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        let mut again = vec![0f32; N];
        worker.pull_into(&[7], &[N], &mut again, None, 0).unwrap();
        assert!(again.iter().all(|v| *v == 1.0), "the pull after the resume");
        // What the server still sent of the failed pull's answers once it resumed went
        // nowhere near `out`.
        std::thread::sleep(Duration::from_millis(300));
        if let Some(i) = out.iter().position(|v| *v != 9.0) {
            panic!(
                "the failed pull wrote element {i} after it returned: {}",
                out[i]
            );
        }
        // Past the timeout: the grace ran, a connection held the memory (was receiving).
        if took >= Duration::from_millis(3900) {
            return;
        }
    }
    eprintln!("no attempt stopped the server inside an answer; checked without that");
}
