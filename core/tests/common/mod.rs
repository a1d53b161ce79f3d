//! Scaffolding shared by the multi-process tests: the test binary re-runs itself as the ranks
//! (an environment variable names the role), /dev/shm residue checks, and reading the member
//! id a push/pull server child prints.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Rank side of the kill -9 drills: prints RUNNING, then all-reduces `x` in place until a call
/// fails (prints `COLL-ERR after ...: error`, exits 4) or 60 s pass (exits 5).
pub fn all_reduce_until_error(c: &braid::Communicator, x: &mut [f32]) -> ! {
    println!("RUNNING");
    let t0 = Instant::now();
    loop {
        if let Err(e) = c.all_reduce_inplace(x, braid::ReduceOp::Max) {
            println!("COLL-ERR after {:?}: {e}", t0.elapsed());
            std::process::exit(4);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            std::process::exit(5);
        }
    }
}

/// Owned environment pairs.
pub fn env_of(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Names in /dev/shm now.
pub fn dev_shm() -> BTreeSet<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Children killed on drop (a failed assertion never leaves ranks behind).
pub struct Ranks(pub Vec<Child>);

impl Drop for Ranks {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `n` ranks of this test binary with `role_var=role`.
pub fn spawn(
    role_var: &str,
    role: &str,
    coord: &str,
    n: usize,
    env: &dyn Fn(usize) -> Vec<(String, String)>,
) -> Ranks {
    spawn_wrapped(role_var, role, coord, n, env, &|_| Vec::new())
}

/// [`spawn`], each rank under the command `wrap(rank)` returns (empty: none), e.g.
/// `unshare --pid --fork --kill-child`.
pub fn spawn_wrapped(
    role_var: &str,
    role: &str,
    coord: &str,
    n: usize,
    env: &dyn Fn(usize) -> Vec<(String, String)>,
    wrap: &dyn Fn(usize) -> Vec<String>,
) -> Ranks {
    let exe = std::env::current_exe().unwrap();
    let mut v = Vec::new();
    for r in 0..n {
        let w = wrap(r);
        let mut cmd = match w.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(["--exact", "rank_entry", "--nocapture", "--test-threads=1"])
            .env(role_var, role)
            .env("BRAID_COORDINATOR", coord)
            .env("BRAID_WORLD_SIZE", n.to_string())
            .env("BRAID_RANK", r.to_string())
            .env("BRAID_INIT_TIMEOUT", "30")
            .env("BRAID_TIMEOUT", "60")
            .env_remove("BRAID_HOST_ID")
            .env_remove("BRAID_TRANSPORT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, val) in env(r) {
            cmd.env(k, val);
        }
        v.push(cmd.spawn().unwrap());
    }
    Ranks(v)
}

/// Waits for every rank (deadline), returns (success, stdout+stderr) per rank.
pub fn finish(mut ranks: Ranks, limit: Duration) -> Vec<(bool, String)> {
    let end = Instant::now() + limit;
    let mut out = Vec::new();
    for c in ranks.0.iter_mut() {
        let st = loop {
            if let Some(st) = c.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < end, "ranks did not finish in {limit:?}");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut s = String::new();
        c.stdout.take().unwrap().read_to_string(&mut s).unwrap();
        c.stderr.take().unwrap().read_to_string(&mut s).unwrap();
        out.push((st.success(), s));
    }
    out
}

/// Every rank succeeded and printed RANK-OK.
pub fn check_all(res: &[(bool, String)]) {
    for (r, (ok, s)) in res.iter().enumerate() {
        assert!(ok, "rank {r} failed:\n{s}");
        assert!(s.contains("RANK-OK"), "rank {r}:\n{s}");
    }
}

/// Waits until every rank printed RUNNING, kills rank 2 with -9 after 0.3 s, and checks that
/// the others exit (code 4, COLL-ERR naming rank 2) within `limit` and that nothing new is
/// left in /dev/shm (compared with `before`).
pub fn kill_rank_2_and_check(mut ranks: Ranks, limit: Duration, before: &BTreeSet<String>) {
    let mut outs = Vec::new();
    for c in ranks.0.iter_mut() {
        let mut so = c.stdout.take().unwrap();
        let mut acc = Vec::new();
        let end = Instant::now() + Duration::from_secs(60);
        let mut b = [0u8; 256];
        while !String::from_utf8_lossy(&acc).contains("RUNNING") {
            assert!(Instant::now() < end, "rank did not start");
            let k = so.read(&mut b).unwrap();
            assert!(
                k > 0,
                "rank exited early: {}",
                String::from_utf8_lossy(&acc)
            );
            acc.extend_from_slice(&b[..k]);
        }
        outs.push((so, acc));
    }
    std::thread::sleep(Duration::from_millis(300));
    let victim = ranks.0[2].id();
    let st = Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t0 = Instant::now();
    for (i, c) in ranks.0.iter_mut().enumerate().take(2) {
        let st = loop {
            if let Some(st) = c.try_wait().unwrap() {
                break st;
            }
            assert!(
                t0.elapsed() < limit,
                "rank {i} still running {limit:?} after rank 2 was killed"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let (so, acc) = &mut outs[i];
        so.read_to_end(acc).unwrap();
        let text = String::from_utf8_lossy(acc);
        assert_eq!(st.code(), Some(4), "rank {i}: {text}");
        assert!(
            text.contains("COLL-ERR") && text.contains("rank 2"),
            "rank {i}: {text}"
        );
    }
    let _ = ranks.0[2].wait();
    drop(ranks);
    let new: Vec<String> = dev_shm().difference(before).cloned().collect();
    assert!(new.is_empty(), "files left in /dev/shm: {new:?}")
}

/// Reads a child's `SERVER id` line (a push/pull server process started by a test), then
/// keeps draining its stdout so it never blocks on the pipe.
pub fn server_id(c: &mut Child) -> u64 {
    use std::io::BufRead;
    let out = c.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(out).lines();
    for l in lines.by_ref() {
        let l = l.unwrap();
        // libtest's own "test child_server ... " may precede it on the line.
        if let Some(id) = l.split("SERVER ").nth(1) {
            std::thread::spawn(move || for _ in lines {});
            return id.trim().parse().unwrap();
        }
    }
    panic!("the server process printed no id");
}
