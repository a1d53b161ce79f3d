//! Checkpoints of the push/pull servers' state, as a multi-process drill (issue 17,
//! "Checkpoints"): servers are separate processes (this test binary re-run as `child_server`),
//! the coordinator and two workers run in the test process, over tcp, in sync mode with the
//! update rule value += round sum (`sgd:-1`), so every version of every element has a closed
//! form and a lost or doubled round shows.
//!
//! 1. Three servers; the workers train, with periodic checkpoints every 4 push_pull rounds
//!    (taken by the worker with the lowest id while training goes on) and one explicit
//!    checkpoint (by the other worker); `braid-coordinator status` shows the last one.
//! 2. Every server is killed with -9; two servers start with `BRAID_PS_RESTORE` (a different
//!    number of servers); the same workers continue from the checkpoint's version: every value
//!    exact, versions continuing from it, and a periodic checkpoint of the restored servers.
//! 3. A copy of a checkpoint with a corrupt file, and one with a truncated file: a server
//!    started with it refuses to start (before registering), naming the file.
//!
//! Run: `cargo test -p braid --test ps_checkpoint` (about 15 s).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use braid::membership::{self, Coordinator, Role};
use braid::ps::checkpoint::{read_manifest, verify_files, HEADER_LEN};
use braid::ps::{CheckpointInfo, Consistency, KvServer, KvWorker, PsOptions, UpdateRule};
use braid::Config;

const GROUP: &str = "ps-ckpt";
const CHILD: &str = "PS_CKPT_TEST_COORDINATOR";
const RESTORE: &str = "PS_CKPT_TEST_RESTORE";
const KEYS: [u64; 4] = [1, 2, 3, 4];
/// f64 elements per key: with 4 KiB partitions keys 1 and 2 have 2 and 6 parts; key 4 is
/// empty.
const LENS: [usize; 4] = [1000, 3000, 1, 0];
const TOTAL: usize = 4001;
const PARTS: usize = 2 + 6 + 1 + 1;

fn cfg(addr: &str) -> Config {
    Config {
        coordinator: Some(addr.to_string()),
        world_size: Some(5),
        group: GROUP.into(),
        timeout: Duration::from_secs(30),
        init_timeout: Duration::from_secs(30),
        transport: braid::config::TransportKind::Tcp,
        heartbeat: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(2),
        join_window: Duration::from_millis(200),
        log: std::env::var("BRAID_LOG").unwrap_or_else(|_| "warn".into()),
        ..Config::default()
    }
}

fn opts() -> PsOptions {
    PsOptions {
        consistency: Consistency::Sync,
        rule: UpdateRule::sgd(-1.0),
        partition_bytes: 4096,
        replicas: 1,
        ..PsOptions::default()
    }
}

/// Every element at `version`: its initial value plus `version` round sums of both workers.
fn expected(version: u64) -> Vec<f64> {
    (0..TOTAL)
        .map(|i| (i % 7) as f64 + version as f64 * 3.0 * ((i % 5) + 1) as f64)
        .collect()
}

/// Worker `w`'s gradient (the same every round).
fn grad(w: usize) -> Vec<f64> {
    (0..TOTAL)
        .map(|i| (w as f64 + 1.0) * ((i % 5) + 1) as f64)
        .collect()
}

/// The server process: serves (restoring from `RESTORE` when set) until its stdin closes or it
/// is killed; a refused start prints `REFUSED: ...` on stderr and exits with status 3.
#[test]
fn child_server() {
    let Ok(addr) = std::env::var(CHILD) else {
        return;
    };
    let mut o = opts();
    o.restore = std::env::var_os(RESTORE).map(PathBuf::from);
    match KvServer::start(cfg(&addr), o) {
        Ok(s) => {
            println!("SERVER {}", s.member_id());
            let mut b = [0u8; 1];
            let _ = std::io::stdin().read(&mut b);
            drop(s);
        }
        Err(e) => {
            eprintln!("REFUSED: {e}");
            std::process::exit(3);
        }
    }
}

fn child(addr: &str, restore: Option<&Path>) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["child_server", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, addr)
        .env("BRAID_LOG", "warn");
    if let Some(d) = restore {
        c.env(RESTORE, d);
    }
    c
}

struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(addr: &str, restore: Option<&Path>) -> Server {
    let child = child(addr, restore)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    Server { child }
}

/// Waits for the child's `SERVER id` line.
fn server_up(s: &mut Server) -> u64 {
    common::server_id(&mut s.child)
}

/// Rounds `from+1..=to` of push_pull on both workers (in lockstep: sync mode), each answer
/// checked exactly.
fn train(ws: &[KvWorker], from: u64, to: u64) {
    std::thread::scope(|s| {
        for (w, kv) in ws.iter().enumerate() {
            s.spawn(move || {
                let g = grad(w);
                let mut out = vec![0f64; TOTAL];
                for r in from + 1..=to {
                    let v = kv
                        .push_pull_into(&KEYS, &LENS, &g, &mut out, 0)
                        .unwrap_or_else(|e| panic!("worker {w} round {r}: {e}"));
                    assert_eq!(v, r, "worker {w}: version of round {r}");
                    assert!(out == expected(r), "worker {w}: values of round {r}");
                }
            });
        }
    });
}

/// Waits until `kv` completed a checkpoint of `version`.
fn wait_checkpoint(kv: &KvWorker, version: u64) -> CheckpointInfo {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(i) = kv.last_checkpoint().filter(|i| i.version == version) {
            return i;
        }
        assert!(
            Instant::now() < end,
            "no checkpoint of version {version} (last: {:?})",
            kv.last_checkpoint()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("braid-ps-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Starts a server with `BRAID_PS_RESTORE=dir` expecting a refusal; returns its stderr.
fn refused(addr: &str, dir: &Path) -> String {
    let out = child(addr, Some(dir))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(3), "{err}");
    err
}

fn group_status(coord: &Coordinator) -> serde_json::Value {
    coord.status()["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == GROUP)
        .cloned()
        .unwrap()
}

#[test]
fn train_checkpoint_kill_every_server_restore_on_fewer_and_continue_exactly() {
    let t0 = Instant::now();
    let dir_p = tmpdir("periodic");
    let dir_e = tmpdir("explicit");
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();

    // 1. Three servers, two workers; periodic checkpoints every 4 rounds.
    let mut servers: Vec<Server> = (0..3).map(|_| spawn_server(&addr, None)).collect();
    let ws: Vec<KvWorker> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let addr = addr.clone();
                let dir = dir_p.clone();
                s.spawn(move || {
                    let mut o = opts();
                    o.checkpoint_dir = Some(dir);
                    o.checkpoint_every = 4;
                    KvWorker::start(cfg(&addr), o).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for s in &mut servers {
        server_up(s);
    }
    for kv in &ws {
        kv.init(&KEYS, &LENS, &expected(0)).unwrap();
    }
    let (lo, hi) = if ws[0].member_id() < ws[1].member_id() {
        (0, 1)
    } else {
        (1, 0)
    };
    // The periodic checkpoint of version 4 is taken at the start of the 5th round.
    train(&ws, 0, 6);
    let p4 = wait_checkpoint(&ws[lo], 4);
    assert_eq!(
        (p4.max_version, p4.parts, p4.servers),
        (4, PARTS, 3),
        "{p4:?}"
    );
    // Any worker may ask for one; in sync mode it is the round it last took part in.
    let e6 = ws[hi].checkpoint(&dir_e).unwrap();
    assert_eq!(
        (e6.version, e6.max_version, e6.parts, e6.servers),
        (6, 6, PARTS, 3),
        "{e6:?}"
    );
    assert!(ws[hi].last_checkpoint() == Some(e6.clone()));
    // Training goes on; the periodic checkpoint of version 8 is written meanwhile.
    train(&ws, 6, 11);
    let p8 = wait_checkpoint(&ws[lo], 8);
    let m = read_manifest(&dir_p).unwrap();
    verify_files(&dir_p, &m).unwrap();
    assert_eq!(
        (m.version, m.max_version, m.id.as_str()),
        (8, 8, p8.id.as_str())
    );
    assert_eq!(
        (m.files.len(), m.parts.len(), m.mode.as_str()),
        (3, PARTS, "sync")
    );
    let me = read_manifest(&dir_e).unwrap();
    verify_files(&dir_e, &me).unwrap();
    assert_eq!(me.version, 6);
    // Only the newest checkpoint's files stay in a directory.
    let files = std::fs::read_dir(&dir_p).unwrap().count();
    assert_eq!(files, 4, "3 server files and the manifest");

    // The coordinator shows the last checkpoint (version, time, directory).
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let g = group_status(&coord);
        if g["checkpoint"]["id"] == p8.id.as_str() {
            assert_eq!(g["checkpoint"]["version"], 8);
            assert_eq!(g["checkpoint"]["dir"], dir_p.to_str().unwrap());
            assert!(g["checkpoint"]["at"].as_f64().unwrap() > 1.6e9);
            break;
        }
        assert!(Instant::now() < end, "status: {g}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_braid-coordinator"))
        .args(["status", &addr])
        .env_remove("BRAID_JOB_TOKEN")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("last checkpoint: version 8 at "), "{text}");
    assert!(text.contains(dir_p.to_str().unwrap()), "{text}");

    // 2. Every server killed with -9.
    for s in &mut servers {
        let _ = s.child.kill();
        let _ = s.child.wait();
    }
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let v = membership::fetch_view(&addr, GROUP, None, Duration::from_secs(5)).unwrap();
        if !v.members.iter().any(|m| m.role == Role::Server) {
            break;
        }
        assert!(Instant::now() < end, "the killed servers stay in {v:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Two servers (not three) restore the periodic checkpoint written while training went on.
    let mut restored: Vec<Server> = (0..2).map(|_| spawn_server(&addr, Some(&dir_p))).collect();
    for s in &mut restored {
        server_up(s);
    }
    let end = Instant::now() + Duration::from_secs(15);
    while ws.iter().any(|kv| kv.sizes().0 != 2) {
        assert!(
            Instant::now() < end,
            "the workers never saw the two servers"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for kv in &ws {
        let p = kv
            .pull::<f64>(&KEYS, &LENS, None, 0)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(p.version, 8);
        assert!(p.values == expected(8), "restored values differ");
    }
    // The workers continue from version 8 (their rounds 9 and 10 are done again).
    train(&ws, 8, 12);
    // A periodic checkpoint of the restored servers (12 push_pull calls were made).
    let p9 = wait_checkpoint(&ws[lo], 9);
    assert_eq!((p9.servers, p9.parts), (2, PARTS), "{p9:?}");
    let m = read_manifest(&dir_p).unwrap();
    verify_files(&dir_p, &m).unwrap();

    // 3. A corrupt file and a truncated file: refused before registering, naming the file.
    let before = coord.status()["next_member_id"].clone();
    let big = me
        .files
        .iter()
        .max_by_key(|f| f.bytes)
        .unwrap()
        .name
        .clone();
    let dir_c = tmpdir("corrupt");
    copy_dir(&dir_e, &dir_c);
    let path = dir_c.join(&big);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = HEADER_LEN as usize + (bytes.len() - HEADER_LEN as usize) / 2;
    bytes[at] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();
    let err = refused(&addr, &dir_c);
    assert!(
        err.contains(path.to_str().unwrap()) && err.contains("checksum mismatch"),
        "{err}"
    );
    let dir_t = tmpdir("truncated");
    copy_dir(&dir_e, &dir_t);
    let path = dir_t.join(&big);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 8)
        .unwrap();
    let err = refused(&addr, &dir_t);
    assert!(
        err.contains(path.to_str().unwrap()) && err.contains("truncated"),
        "{err}"
    );
    assert_eq!(
        coord.status()["next_member_id"],
        before,
        "a refused server registered"
    );
    drop(ws);
    drop(restored);
    for d in [dir_p, dir_e, dir_c, dir_t] {
        let _ = std::fs::remove_dir_all(d);
    }
    eprintln!("checkpoint drill: {:.1} s", t0.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// In-process: a checkpoint waits for the sync round its worker pushed into; async version
// vectors; restore into a fresh job with another number of servers.
// ---------------------------------------------------------------------------------------------

fn cfg_n(addr: &str, group: &str, n: usize) -> Config {
    Config {
        group: group.into(),
        world_size: Some(n),
        ..cfg(addr)
    }
}

/// Starts `servers` servers and `workers` workers of `group` as threads.
fn group_of(
    addr: &str,
    group: &str,
    servers: usize,
    workers: usize,
    o: &PsOptions,
) -> (Vec<KvServer>, Vec<KvWorker>) {
    let n = servers + workers;
    std::thread::scope(|s| {
        let sh: Vec<_> = (0..servers)
            .map(|_| s.spawn(|| KvServer::start(cfg_n(addr, group, n), o.clone()).unwrap()))
            .collect();
        let wh: Vec<_> = (0..workers)
            .map(|_| s.spawn(|| KvWorker::start(cfg_n(addr, group, n), o.clone()).unwrap()))
            .collect();
        (
            sh.into_iter().map(|h| h.join().unwrap()).collect(),
            wh.into_iter().map(|h| h.join().unwrap()).collect(),
        )
    })
}

#[test]
fn sync_checkpoint_waits_for_the_open_round_then_restores_into_a_fresh_job() {
    let dir = tmpdir("open-round");
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let o = opts();
    let (servers, ws) = group_of(&addr, "ckpt-open", 2, 2, &o);
    for kv in &ws {
        kv.init(&KEYS, &LENS, &expected(0)).unwrap();
    }
    train(&ws, 0, 1);
    // Worker 0 pushes round 2 (acknowledged: recorded in the open round) and asks for a
    // checkpoint; worker 1 pushes round 2 only later. The checkpoint is of round 2.
    let (info, waited) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            ws[0]
                .push(&KEYS, &LENS, &grad(0), 0)
                .unwrap()
                .wait()
                .unwrap();
            let t = Instant::now();
            let info = ws[0].checkpoint(&dir).unwrap();
            (info, t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(400));
        let p = ws[1]
            .push_pull(&KEYS, &LENS, &grad(1), 0)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(p.version, 2);
        assert!(p.values == expected(2));
        a.join().unwrap()
    });
    assert_eq!((info.version, info.max_version, info.servers), (2, 2, 2));
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    drop(ws);
    drop(servers);

    // A fresh job (new coordinator, three servers, one worker) restores it.
    let coord2 = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr2 = coord2.local_addr().to_string();
    let o2 = PsOptions {
        restore: Some(dir.clone()),
        ..opts()
    };
    let (servers, ws) = group_of(&addr2, "ckpt-fresh", 3, 1, &o2);
    let p = ws[0]
        .pull::<f64>(&KEYS, &LENS, None, 0)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(p.version, 2);
    assert!(p.values == expected(2));
    // Alone now: round 3 adds this worker's gradient once.
    let p = ws[0]
        .push_pull(&KEYS, &LENS, &grad(0), 0)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(p.version, 3);
    let want: Vec<f64> = expected(2)
        .iter()
        .zip(grad(0))
        .map(|(e, g)| e + g)
        .collect();
    assert!(p.values == want);
    drop(ws);
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn async_checkpoint_records_each_parts_version_and_restores_on_one_server() {
    let dir = tmpdir("async");
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let o = PsOptions {
        consistency: Consistency::Async,
        rule: UpdateRule::Sum,
        partition_bytes: 4096,
        replicas: 1,
        ..PsOptions::default()
    };
    let (servers, ws) = group_of(&addr, "ckpt-async", 2, 1, &o);
    let kv = &ws[0];
    kv.init(&[7, 8], &[600, 5], &[1f32; 605]).unwrap();
    for _ in 0..3 {
        kv.push(&[7], &[600], &[2f32; 600], 0)
            .unwrap()
            .wait()
            .unwrap();
    }
    kv.push(&[8], &[5], &[5f32; 5], 0).unwrap().wait().unwrap();
    let info = kv.checkpoint(&dir).unwrap();
    // The version vector: key 7 (one part) applied 3 pushes, key 8 one.
    assert_eq!((info.version, info.max_version, info.parts), (1, 3, 2));
    let m = read_manifest(&dir).unwrap();
    assert_eq!(m.mode, "async");
    let v: std::collections::BTreeMap<u64, u64> =
        m.parts.iter().map(|p| (p.k, p.version)).collect();
    assert_eq!(v, [(7, 3), (8, 1)].into_iter().collect());
    drop(ws);
    drop(servers);

    let coord2 = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr2 = coord2.local_addr().to_string();
    let o2 = PsOptions {
        restore: Some(dir.clone()),
        ..o
    };
    let (servers, ws) = group_of(&addr2, "ckpt-async2", 1, 1, &o2);
    let p = ws[0]
        .pull::<f32>(&[7, 8], &[600, 5], None, 0)
        .unwrap()
        .wait()
        .unwrap();
    let mut want = vec![7f32; 600];
    want.extend([6f32; 5]);
    assert_eq!(p.values, want);
    // Pushes go on from the restored versions.
    ws[0]
        .push(&[8], &[5], &[1f32; 5], 0)
        .unwrap()
        .wait()
        .unwrap();
    let p = ws[0]
        .pull::<f32>(&[8], &[5], None, 0)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!((p.version, p.values), (2, vec![7f32; 5]));
    // A server of another partition size refuses the checkpoint, naming the setting.
    let o3 = PsOptions {
        restore: Some(dir.clone()),
        partition_bytes: 8192,
        ..PsOptions::default()
    };
    let e = KvServer::start(cfg_n(&addr2, "ckpt-other", 2), o3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("BRAID_PS_PARTITION_BYTES=4096"), "{e}");
    drop(ws);
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}
