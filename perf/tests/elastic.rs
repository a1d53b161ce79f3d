//! Multi-process tests of elastic membership (issue 4), with real processes, a real
//! `braid-coordinator` and `braid-perf --elastic` loops whose `#wrong` check is exact for the
//! current view:
//!
//! * two ranks in an all-reduce loop, two more join while it runs (tcp and shm): the first two
//!   are never restarted and never fail a step;
//! * kill -9 of one of four ranks mid-loop: the survivors are told which member they lost, move
//!   to a view of three and go on; the dead id is never reused and a later joiner gets a higher
//!   id;
//! * a network cut (network namespaces, a veth link set down): the cut rank is declared dead
//!   within the heartbeat timeout and the others continue; the cut rank does not hang; the
//!   same cut in a group that is not elastic: every rank fails with an error saying what
//!   happened (the others name the cut rank, the cut rank hears nothing from the
//!   coordinator) within the heartbeat timeout + 5 s;
//! * a joiner with a wrong job token, one without a token and strangers on a data port are
//!   refused or dropped, and the job is unaffected.
//!
//! Every test polls or reads what the processes print (`# view ...`, `# elastic: ...`, log
//! lines, `braid-coordinator status --json`) and prints the figures it observed (join
//! latency, recovery time, time to declare a cut rank dead) on stderr (`--nocapture`).
//! Timing is asserted only as "within the heartbeat timeout + 5 s"; everything else has
//! generous limits for a loaded 2-core machine.
//!
//! `braid-run` and `braid-coordinator` are binaries of the `braid` crate: build them first
//! (`cargo build --workspace --bins`). The network-cut test needs root (`ip netns`); without
//! it the test fails and says why.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::*;

// ---------------------------------------------------------------------------------------------
// Binaries and processes
// ---------------------------------------------------------------------------------------------

/// The lines braid-run relayed from launcher index `idx` (prefix `[idx] ` removed).
fn of_index(lines: &[Line], idx: usize) -> Vec<Line> {
    let p = format!("[{idx}] ");
    lines
        .iter()
        .filter_map(|l| {
            l.text.strip_prefix(&p).map(|t| Line {
                at: l.at,
                stderr: l.stderr,
                text: t.to_string(),
            })
        })
        .collect()
}

/// The `# view epoch=E size=N rank=R` lines, as (E, N, R), in order.
fn views(lines: &[Line]) -> Vec<(u64, usize, usize)> {
    lines
        .iter()
        .filter(|l| !l.stderr)
        .filter_map(|l| parse_view(&l.text))
        .collect()
}

/// The time of the first `# view` line for `epoch`.
fn view_at(lines: &[Line], epoch: u64) -> Option<Instant> {
    lines
        .iter()
        .find(|l| !l.stderr && parse_view(&l.text).is_some_and(|v| v.0 == epoch))
        .map(|l| l.at)
}

fn finals(lines: &[Line]) -> Vec<Final> {
    lines
        .iter()
        .filter(|l| !l.stderr)
        .filter_map(|l| parse_final(&l.text))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Coordinator
// ---------------------------------------------------------------------------------------------

struct Coord {
    proc: Proc,
    addr: String,
}

/// Starts `braid-coordinator --bind BIND` and waits for its `listening on` line.
fn start_coordinator(bind: &str, env: &[(&str, &str)]) -> Coord {
    let mut c = clean(&bin("braid-coordinator"));
    c.args(["--bind", bind]);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut proc = Proc::spawn("braid-coordinator", c);
    let l = proc
        .wait_line(Duration::from_secs(30), |l| {
            !l.stderr && l.text.starts_with("braid-coordinator listening on ")
        })
        .unwrap_or_else(|| panic!("the coordinator did not start\n{}", proc.dump()));
    let addr = l.text.rsplit(' ').next().unwrap().to_string();
    Coord { proc, addr }
}

/// `braid-coordinator status ADDR --json`, None when it fails.
fn status(addr: &str, token: Option<&str>) -> Option<Value> {
    let mut c = clean(&bin("braid-coordinator"));
    c.args(["status", addr, "--json"]);
    if let Some(t) = token {
        c.env("BRAID_JOB_TOKEN", t);
    }
    let out = c.stderr(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Polls `status --json` in the background (the coordinator forgets a group once all its
/// members are gone, so what the test checks afterwards must be seen while the job runs).
struct Poller {
    stop: Arc<AtomicBool>,
    snaps: Arc<Mutex<Vec<(Instant, Value)>>>,
    thread: Option<JoinHandle<()>>,
}

impl Poller {
    fn start(addr: &str, token: Option<&str>) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let snaps = Arc::new(Mutex::new(Vec::new()));
        let (a, t, s, sn) = (
            addr.to_string(),
            token.map(String::from),
            stop.clone(),
            snaps.clone(),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if let Some(v) = status(&a, t.as_deref()) {
                    sn.lock().unwrap().push((Instant::now(), v));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Poller {
            stop,
            snaps,
            thread: Some(thread),
        }
    }

    fn snaps(&self) -> Vec<(Instant, Value)> {
        self.snaps.lock().unwrap().clone()
    }

    /// Waits for a snapshot that satisfies `pred`.
    fn wait(&self, limit: Duration, pred: impl Fn(&Value) -> bool) -> Option<(Instant, Value)> {
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = self.snaps().into_iter().find(|(_, v)| pred(v)) {
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn finish(&mut self) -> Vec<(Instant, Value)> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.snaps()
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The members of the first snapshot at `epoch` with `size` members.
fn members_at(snaps: &[(Instant, Value)], epoch: u64, size: usize) -> Option<Vec<Member>> {
    snaps.iter().find_map(|(_, v)| {
        view_of(v).and_then(|(e, ms)| (e == epoch && ms.len() == size).then_some(ms))
    })
}

/// The longest history seen (the last snapshot while the group existed).
fn longest_history(snaps: &[(Instant, Value)]) -> Vec<(u64, usize, String)> {
    snaps
        .iter()
        .map(|(_, v)| history(v))
        .max_by_key(|h| h.len())
        .unwrap_or_default()
}

/// `braid-run -n ... --coordinator ADDR [drills] -- braid-perf ARGS`.
fn braid_run(coord: &str, drills: &[&str], perf_args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut c = clean(&bin("braid-run"));
    c.args(drills).args(["--coordinator", coord, "--"]);
    c.arg(perf()).args(perf_args);
    for (k, v) in env {
        c.env(k, v);
    }
    Proc::spawn("braid-run", c)
}

// ---------------------------------------------------------------------------------------------
// 1. Join while running
// ---------------------------------------------------------------------------------------------

fn join_while_running(transport: &str) {
    let coord = start_coordinator("127.0.0.1:0", &[]);
    let mut poll = Poller::start(&coord.addr, None);
    let mut run = braid_run(
        &coord.addr,
        &["-n", "2", "--join", "2@2"],
        &[
            "all_reduce",
            "--elastic",
            "--duration",
            "6",
            "-b",
            "64K",
            "--transport",
            transport,
        ],
        &[("BRAID_TRANSPORT", transport)],
    );
    let st = run.finish(Duration::from_secs(90));
    let snaps = poll.finish();
    let all = run.lines();
    let ctx = || format!("{}\n{}", run.dump(), coord.proc.dump());
    assert!(
        st.is_some_and(|s| s.success()),
        "braid-run ({transport}): {st:?}\n{}",
        ctx()
    );

    // Launcher indices 0..4, nothing else: braid-run started each process once.
    for l in &all {
        if let Some(rest) = l.text.strip_prefix('[') {
            let idx: usize = rest
                .split(']')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(99);
            assert!(
                idx < 4,
                "unexpected launcher index in {:?}\n{}",
                l.text,
                ctx()
            );
        }
    }
    let failure_lines: Vec<&Line> = all
        .iter()
        .filter(|l| {
            l.text.contains("# step failed")
                || l.text.contains("# control all-reduce failed")
                || l.text.contains("update() agreement failed")
                || l.text.contains("peer lost")
        })
        .collect();
    assert!(
        failure_lines.is_empty(),
        "something failed during a join: {failure_lines:?}\n{}",
        ctx()
    );

    // The first two: epoch 1 of 2, then epoch 2 of 4, same rank; one final line each.
    for i in 0..2 {
        let li = of_index(&all, i);
        assert_eq!(
            views(&li),
            vec![(1, 2, i), (2, 4, i)],
            "[{i}] views ({transport})\n{}",
            ctx()
        );
        let f = finals(&li);
        assert_eq!(f.len(), 1, "[{i}] final lines\n{}", ctx());
        let f = f[0];
        assert!(
            f.failed == 0 && f.changes == 1 && f.epoch == 2 && f.size == 4 && f.wrong == 0,
            "[{i}] {f:?}\n{}",
            ctx()
        );
        assert!(f.completed > 0, "[{i}] {f:?}");
    }
    // The joiners: only epoch 2 of 4, ranks 2 and 3.
    let mut joiner_ranks = Vec::new();
    for j in 2..4 {
        let lj = of_index(&all, j);
        let v = views(&lj);
        assert!(
            v.len() == 1 && v[0].0 == 2 && v[0].1 == 4 && (v[0].2 == 2 || v[0].2 == 3),
            "[{j}] views {v:?} ({transport})\n{}",
            ctx()
        );
        joiner_ranks.push(v[0].2);
        let f = finals(&lj);
        assert!(
            f.len() == 1
                && f[0].failed == 0
                && f[0].changes == 0
                && f[0].epoch == 2
                && f[0].size == 4
                && f[0].wrong == 0
                && f[0].completed > 0,
            "[{j}] {f:?}\n{}",
            ctx()
        );
    }
    joiner_ranks.sort_unstable();
    assert_eq!(joiner_ranks, vec![2, 3], "{}", ctx());
    // Every process ran the same steps in epoch 2: the first two ran more (epoch 1 too).
    let steps: Vec<u64> = (0..4)
        .map(|i| finals(&of_index(&all, i))[0].completed)
        .collect();
    assert!(
        steps[0] == steps[1] && steps[2] == steps[3] && steps[0] > steps[2],
        "steps completed per process: {steps:?}"
    );

    // The coordinator's view: same ids and pids for ranks 0 and 1 before and after (never
    // restarted); the joiners have new, higher ids; both admitted in one view change.
    let before = members_at(&snaps, 1, 2).unwrap_or_else(|| {
        panic!(
            "no status snapshot of epoch 1 with 2 members: {snaps:?}\n{}",
            ctx()
        )
    });
    let after = members_at(&snaps, 2, 4).unwrap_or_else(|| {
        panic!(
            "no status snapshot of epoch 2 with 4 members: {snaps:?}\n{}",
            ctx()
        )
    });
    assert_eq!(
        &after[..2],
        &before[..],
        "ranks 0 and 1 changed id or pid across the join"
    );
    let old_max = before.iter().map(|m| m.id).max().unwrap();
    let old_pids: Vec<u64> = before.iter().map(|m| m.pid).collect();
    for m in &after[2..] {
        assert!(m.id > old_max, "joiner {m:?} has an id below {old_max}");
        assert!(!old_pids.contains(&m.pid), "joiner {m:?}");
    }
    let h = longest_history(&snaps);
    // Members leaving at the end of the job may add "leave of ..." epochs after these two.
    assert!(
        h.len() >= 2 && h[2..].iter().all(|e| e.2.starts_with("leave of")),
        "history {h:?}"
    );
    assert_eq!((h[0].0, h[0].1, h[0].2.as_str()), (1, 2, "initial"));
    let join_reason = format!(
        "join of {},{}",
        after[2].id.min(after[3].id),
        after[2].id.max(after[3].id)
    );
    let join_reason_rev = format!(
        "join of {},{}",
        after[2].id.max(after[3].id),
        after[2].id.min(after[3].id)
    );
    assert!(
        h[1].0 == 2 && h[1].1 == 4 && (h[1].2 == join_reason || h[1].2 == join_reason_rev),
        "history {h:?}, expected {join_reason:?}"
    );

    // Figures: from braid-run starting the joiners to each joiner's first completed collective
    // (the `# view` line is printed after sync_from_oldest, a broadcast in the new view).
    let started = all
        .iter()
        .find(|l| l.stderr && l.text.starts_with("braid-run: starting 2 joiner(s)"))
        .map(|l| l.at)
        .unwrap_or_else(|| panic!("no joiner start line\n{}", ctx()));
    let lat: Vec<String> = (0..4)
        .map(|i| {
            let t = view_at(&of_index(&all, i), 2).unwrap();
            format!("[{i}] {:.3} s", since(started, t))
        })
        .collect();
    let switch = of_index(&all, 0)
        .into_iter()
        .find(|l| l.text.starts_with("# switch to epoch 2"))
        .map(|l| l.text)
        .unwrap_or_default();
    eprintln!(
        "FIGURE join ({transport}): joiners started -> '# view epoch=2 size=4' (first collective in the new view): {}; rank 0: {switch}",
        lat.join(", ")
    );
}

#[test]
fn two_join_a_running_all_reduce_loop_over_tcp() {
    join_while_running("tcp");
}

#[test]
fn two_join_a_running_all_reduce_loop_over_shm() {
    join_while_running("shm");
}

// ---------------------------------------------------------------------------------------------
// 2. kill -9 of one of four
// ---------------------------------------------------------------------------------------------

#[test]
fn kill_minus_9_of_one_of_four_survivors_shrink_and_a_later_joiner_gets_a_higher_id() {
    let coord = start_coordinator("127.0.0.1:0", &[]);
    let mut poll = Poller::start(&coord.addr, None);
    let mut run = braid_run(
        &coord.addr,
        &["-n", "4", "--kill", "2@3", "--join", "1@5.5"],
        &["all_reduce", "--elastic", "--duration", "9", "-b", "64K"],
        &[("BRAID_TRANSPORT", "tcp")],
    );
    let st = run.finish(Duration::from_secs(90));
    let snaps = poll.finish();
    let all = run.lines();
    let ctx = || format!("{}\n{}", run.dump(), coord.proc.dump());
    assert!(
        st.is_some_and(|s| s.success()),
        "braid-run: {st:?}\n{}",
        ctx()
    );

    // The killed process: `braid-run: killing [2] (pid P) at T s`.
    let kill_line = all
        .iter()
        .find(|l| l.stderr && l.text.starts_with("braid-run: killing [2] (pid "))
        .cloned()
        .unwrap_or_else(|| panic!("no kill line\n{}", ctx()));
    let dead_pid: u64 = kill_line.text["braid-run: killing [2] (pid ".len()..]
        .split(')')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap();
    let before = members_at(&snaps, 1, 4)
        .unwrap_or_else(|| panic!("no status snapshot of epoch 1 with 4 members\n{}", ctx()));
    let dead = before
        .iter()
        .find(|m| m.pid == dead_pid)
        .unwrap_or_else(|| panic!("pid {dead_pid} not in {before:?}"))
        .id;
    let old_max = before.iter().map(|m| m.id).max().unwrap();

    // Survivors [0], [1], [3]: told which member they lost (PeerLost naming it, directly or
    // inside a peer's abort), then epoch 2 of 3 and epoch 3 of 4 in the same relative order.
    let lost = format!("(member {dead}, host ");
    for (i, r2) in [(0usize, 0usize), (1, 1), (3, 2)] {
        let li = of_index(&all, i);
        let named = li
            .iter()
            .filter(|l| l.stderr && l.text.contains("peer lost") && l.text.contains(&lost))
            .count();
        assert!(
            named > 0,
            "[{i}] never reported losing member {dead}\n{}",
            ctx()
        );
        assert_eq!(
            views(&li),
            vec![(1, 4, i), (2, 3, r2), (3, 4, r2)],
            "[{i}] views\n{}",
            ctx()
        );
        let f = finals(&li);
        assert!(
            f.len() == 1
                && f[0].epoch == 3
                && f[0].size == 4
                && f[0].changes == 2
                && f[0].wrong == 0,
            "[{i}] {f:?}\n{}",
            ctx()
        );
    }
    // The killed process printed no final line; the joiner [4] joined epoch 3 as rank 3.
    assert!(finals(&of_index(&all, 2)).is_empty(), "{}", ctx());
    let l4 = of_index(&all, 4);
    assert_eq!(views(&l4), vec![(3, 4, 3)], "[4] views\n{}", ctx());
    let f4 = finals(&l4);
    assert!(
        f4.len() == 1 && f4[0].failed == 0 && f4[0].wrong == 0 && f4[0].epoch == 3,
        "[4] {f4:?}\n{}",
        ctx()
    );

    // Coordinator: failure of the dead id, then the join of a higher id; the dead id never
    // comes back.
    let h = longest_history(&snaps);
    // Members leaving at the end of the job may add "leave of ..." epochs after these three.
    assert!(
        h.len() >= 3 && h[3..].iter().all(|e| e.2.starts_with("leave of")),
        "history {h:?}\n{}",
        ctx()
    );
    assert!(
        h[1].0 == 2 && h[1].1 == 3 && h[1].2.starts_with(&format!("failure of {dead} (")),
        "history {h:?}: expected the failure of {dead}"
    );
    let after = members_at(&snaps, 3, 4)
        .unwrap_or_else(|| panic!("no status snapshot of epoch 3 with 4 members\n{}", ctx()));
    let joiner = after[3];
    assert!(
        joiner.id > old_max && joiner.id > dead,
        "joiner {joiner:?}: id not above every earlier id ({before:?})"
    );
    assert_eq!(
        h[2],
        (3, 4, format!("join of {}", joiner.id)),
        "history {h:?}"
    );
    for (_, v) in &snaps {
        if let Some((e, ms)) = view_of(v) {
            if e >= 2 {
                assert!(
                    ms.iter().all(|m| m.id != dead && m.pid != dead_pid),
                    "dead member {dead} in epoch {e}: {ms:?}"
                );
            }
            assert!(
                v["next_member_id"].as_u64().is_some_and(|n| n > ms
                    .iter()
                    .map(|m| m.id)
                    .max()
                    .unwrap_or(0)),
                "next_member_id not above the members' ids: {v}"
            );
        }
    }
    // Ranks 0, 1 and 3 at start kept their ids and pids.
    let kept: Vec<Member> = before.iter().filter(|m| m.id != dead).copied().collect();
    for (k, a) in kept.iter().zip(&after[..3]) {
        assert_eq!((k.id, k.pid), (a.id, a.pid), "{before:?} -> {after:?}");
    }

    // Figures: recovery = kill -> the last survivor's first collective in epoch 2.
    let recovered = [0usize, 1, 3]
        .iter()
        .filter_map(|&i| view_at(&of_index(&all, i), 2))
        .max()
        .unwrap();
    let rec_lines: Vec<String> = all
        .iter()
        .filter(|l| l.text.contains("# recovered") || l.text.contains("# switch to epoch"))
        .map(|l| l.text.clone())
        .collect();
    let join_start = all
        .iter()
        .find(|l| l.stderr && l.text.starts_with("braid-run: starting 1 joiner(s)"))
        .map(|l| l.at)
        .unwrap();
    eprintln!(
        "FIGURE recovery: kill -9 -> last survivor's '# view epoch=2 size=3' {:.3} s; joiner start -> its '# view epoch=3' {:.3} s; {rec_lines:?}",
        since(kill_line.at, recovered),
        since(join_start, view_at(&l4, 3).unwrap()),
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Network cut (network namespaces)
// ---------------------------------------------------------------------------------------------

/// Runs `ip ARGS`; Err with its output when it fails.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace with a veth pair to the host; removed on drop.
struct NetNs {
    ns: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
}

impl NetNs {
    fn create() -> Result<NetNs, String> {
        // Tests of one process run in parallel: a namespace per test (process id and a
        // count), and a /30 of its own: 10.213.X.Y, unlikely to collide with anything else.
        static MADE: AtomicU32 = AtomicU32::new(0);
        let (pid, k) = (std::process::id(), MADE.fetch_add(1, Ordering::SeqCst) % 4);
        let key = pid.wrapping_mul(4) + k;
        let (x, y) = ((key / 64) % 256, (key % 64) * 4);
        let n = NetNs {
            ns: format!("braid-el-{pid}-{k}"),
            host_if: format!("bdh{pid}{k}"),
            host_ip: format!("10.213.{x}.{}", y + 1),
            ns_ip: format!("10.213.{x}.{}", y + 2),
        };
        let ns_if = format!("bdn{pid}{k}");
        ip(&["netns", "add", &n.ns])?;
        ip(&[
            "link", "add", &n.host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &n.ns])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", n.host_ip),
            "dev",
            &n.host_if,
        ])?;
        ip(&["link", "set", &n.host_if, "up"])?;
        ip(&[
            "netns",
            "exec",
            &n.ns,
            "ip",
            "addr",
            "add",
            &format!("{}/30", n.ns_ip),
            "dev",
            &ns_if,
        ])?;
        ip(&["netns", "exec", &n.ns, "ip", "link", "set", &ns_if, "up"])?;
        ip(&["netns", "exec", &n.ns, "ip", "link", "set", "lo", "up"])?;
        Ok(n)
    }
}

impl NetNs {
    /// braid-perf as rank `r` of 3 over tcp with the coordinator at `coord`, run in the
    /// namespace (`in_ns`) or on the host, bound to that side's address, heartbeats every
    /// 0.2 s and `hb_timeout` seconds of heartbeat timeout; the caller adds the arguments.
    fn rank_cmd(&self, in_ns: bool, coord: &str, r: usize, hb_timeout: &str) -> Command {
        let mut c = if in_ns {
            let mut c = clean(Path::new("ip"));
            c.args(["netns", "exec", &self.ns]).arg(perf());
            c
        } else {
            clean(&perf())
        };
        c.env("BRAID_COORDINATOR", coord)
            .env("BRAID_WORLD_SIZE", "3")
            .env("BRAID_RANK", r.to_string())
            .env("BRAID_TRANSPORT", "tcp")
            .env("BRAID_HEARTBEAT", "0.2")
            .env("BRAID_HEARTBEAT_TIMEOUT", hb_timeout)
            .env(
                "BRAID_BIND_ADDR",
                if in_ns { &self.ns_ip } else { &self.host_ip },
            );
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it the host end.
        let _ = ip(&["netns", "del", &self.ns]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

/// Lets the ranks' loop run a little (1.5 s) before the cut; none may have ended.
fn run_then_cut_soon(ranks: &mut [Proc]) {
    std::thread::sleep(Duration::from_millis(1500));
    for (r, p) in ranks.iter_mut().enumerate() {
        assert!(
            p.exited().is_none(),
            "rank {r} ended before the cut\n{}",
            p.dump()
        );
    }
}

const HEARTBEAT_TIMEOUT_S: f64 = 2.0;

#[test]
fn a_rank_whose_link_is_cut_is_declared_dead_and_the_others_continue() {
    // Created first, dropped last (after every process below has been stopped).
    let net = NetNs::create().unwrap_or_else(|e| {
        panic!(
            "this test needs network namespaces (root, iproute2): {e}. It cuts a rank's link \
             with `ip link set ... down`; it cannot run without them"
        )
    });
    let coord = start_coordinator(&format!("{}:0", net.host_ip), &[]);
    let hb_timeout = HEARTBEAT_TIMEOUT_S.to_string();
    let rank = |r: usize, in_ns: bool| -> Proc {
        let mut c = net.rank_cmd(in_ns, &coord.addr, r, &hb_timeout);
        c.args(["all_reduce", "--elastic", "--duration", "14", "-b", "64K"])
            .env("BRAID_ELASTIC", "1");
        if in_ns {
            // The cut rank errors out by itself: its collective hits BRAID_TIMEOUT (4 s), then
            // update() waits at most BRAID_INIT_TIMEOUT (5 s) for a view from the coordinator
            // it can no longer reach, and fails.
            c.env("BRAID_TIMEOUT", "4").env("BRAID_INIT_TIMEOUT", "5");
        } else {
            // Far above the bound checked below: the survivors must move on because the
            // coordinator declared the cut rank dead, not because a collective timed out.
            c.env("BRAID_TIMEOUT", "60");
        }
        Proc::spawn(
            &format!("rank {r}{}", if in_ns { " (in the namespace)" } else { "" }),
            c,
        )
    };
    let mut ranks = vec![rank(0, false), rank(1, false), rank(2, true)];
    let ctx = |ranks: &[Proc], coord: &Coord| {
        let mut s: String = ranks.iter().map(Proc::dump).collect();
        s.push_str(&coord.proc.dump());
        s
    };
    for r in 0..3 {
        let got = ranks[r].wait_line(Duration::from_secs(60), |l| {
            parse_view(&l.text) == Some((1, 3, r))
        });
        assert!(
            got.is_some(),
            "rank {r} did not start\n{}",
            ctx(&ranks, &coord)
        );
    }
    let (_, snap) = {
        let mut poll = Poller::start(&coord.addr, None);
        let s = poll.wait(Duration::from_secs(20), |v| {
            view_of(v).is_some_and(|(e, ms)| e == 1 && ms.len() == 3)
        });
        poll.finish();
        s.unwrap_or_else(|| panic!("no status of epoch 1\n{}", ctx(&ranks, &coord)))
    };
    let (_, members) = view_of(&snap).unwrap();
    let cut_pid = u64::from(ranks[2].pid());
    let cut_id = members
        .iter()
        .find(|m| m.pid == cut_pid)
        .unwrap_or_else(|| panic!("pid {cut_pid} (ip netns exec braid-perf) not in {members:?}"))
        .id;
    // Let the loop run a little, then cut the link.
    run_then_cut_soon(&mut ranks);
    let mut poll = Poller::start(&coord.addr, None);
    let cut = Instant::now();
    ip(&["link", "set", &net.host_if, "down"]).unwrap();

    let bound = Duration::from_secs_f64(HEARTBEAT_TIMEOUT_S + 5.0);
    let failure = format!("failure of {cut_id} (");
    let declared = poll.wait(bound, |v| {
        history(v).iter().any(|h| h.2.starts_with(&failure))
    });
    // The survivors' first collective in a view of 2 (the `# view` line follows a broadcast).
    let mut moved = Vec::new();
    for (r, p) in ranks.iter_mut().enumerate().take(2) {
        let left = bound.saturating_sub(cut.elapsed());
        moved.push(p.wait_line(left, |l| parse_view(&l.text) == Some((2, 2, r))));
    }
    // The cut rank must end by itself (see its BRAID_TIMEOUT/BRAID_INIT_TIMEOUT above).
    let cut_status = ranks[2].wait_exit(Duration::from_secs(25).saturating_sub(cut.elapsed()));
    let cut_ended = cut.elapsed();
    // Survivors: give them the rest of their --duration (14 s from their start, the cut came
    // at least 1.5 s after it), then stop whatever still runs.
    let mut survivor_status = Vec::new();
    for p in ranks.iter_mut().take(2) {
        let left = Duration::from_secs(22).saturating_sub(cut.elapsed());
        survivor_status.push(p.finish(left));
    }
    ranks[2].finish(Duration::from_secs(1));
    poll.finish();
    let dump = ctx(&ranks, &coord);

    // Figures first (also when an assertion below fails).
    let declared_s = declared.as_ref().map(|(t, _)| since(cut, *t));
    let dead_line = coord
        .proc
        .lines()
        .into_iter()
        .find(|l| l.text.contains(&format!("member {cut_id} declared dead")));
    eprintln!(
        "FIGURE network cut (heartbeat 0.2 s, timeout {HEARTBEAT_TIMEOUT_S} s): status history shows the failure {:?} s after the cut (coordinator log line {:?} s after: {:?}); survivors' '# view epoch=2 size=2' after {:?} s; the cut rank exited after {:.3} s with {:?}",
        declared_s,
        dead_line.as_ref().map(|l| since(cut, l.at)),
        dead_line.as_ref().map(|l| l.text.clone()),
        moved.iter().map(|m| m.as_ref().map(|l| since(cut, l.at))).collect::<Vec<_>>(),
        secs(cut_ended),
        cut_status,
    );

    // Declared dead within the heartbeat timeout (+ 5 s slack), for no heartbeat.
    let (_, dv) = declared.unwrap_or_else(|| {
        panic!("member {cut_id} was not declared dead within {bound:?} of the cut\n{dump}")
    });
    let reason = history(&dv)
        .into_iter()
        .find(|h| h.2.starts_with(&failure))
        .unwrap();
    assert!(
        reason.1 == 2 && reason.2.contains("no heartbeat"),
        "{reason:?}\n{dump}"
    );
    // The others continue with a view of 2 within the same bound.
    for (r, m) in moved.iter().enumerate() {
        assert!(
            m.is_some(),
            "rank {r} did not reach '# view epoch=2 size=2 rank={r}' within {bound:?} of the cut \
             (member {cut_id} declared dead after {declared_s:?} s)\n{dump}"
        );
    }
    for (r, st) in survivor_status.iter().enumerate() {
        assert!(st.is_some_and(|s| s.success()), "rank {r}: {st:?}\n{dump}");
        let f = finals(&ranks[r].lines());
        assert!(
            f.len() == 1 && f[0].epoch == 2 && f[0].size == 2 && f[0].wrong == 0,
            "rank {r}: {f:?}\n{dump}"
        );
    }
    // The cut rank did not hang: it exited by itself, non-zero, with update() failing
    // (a timeout waiting for a view it cannot receive, or a retired/removed id).
    let st =
        cut_status.unwrap_or_else(|| panic!("the cut rank hung (stopped by the test)\n{dump}"));
    assert!(!st.success(), "the cut rank exited 0\n{dump}");
    let why = ranks[2]
        .lines()
        .into_iter()
        .find(|l| l.stderr && l.text.contains("update failed"))
        .unwrap_or_else(|| panic!("the cut rank did not report a failed update()\n{dump}"));
    assert!(
        ["timeout", "retired", "removed"]
            .iter()
            .any(|w| why.text.contains(w)),
        "{why:?}"
    );
    assert!(
        views(&ranks[2].lines()).iter().all(|v| v.0 == 1),
        "the cut rank adopted a later view\n{dump}"
    );
}

/// The same cut in a group that is NOT elastic (as torch's groups are): nobody re-forms it, so
/// every rank must fail, each with an error that says what happened, long before the
/// operation timeout (60 s here): the two on the host name the cut rank ("no heartbeat": the
/// coordinator declared it dead and sent them a failure notice), the cut rank says it hears
/// nothing from the coordinator while its operation is stuck.
#[test]
fn a_cut_rank_of_a_fixed_group_is_reported_on_both_sides_of_the_cut() {
    let net = NetNs::create()
        .unwrap_or_else(|e| panic!("this test needs network namespaces (root, iproute2): {e}"));
    let coord = start_coordinator(&format!("{}:0", net.host_ip), &[]);
    let hb_timeout = HEARTBEAT_TIMEOUT_S.to_string();
    let mut ranks: Vec<Proc> = (0..3)
        .map(|r| {
            let mut c = net.rank_cmd(r == 2, &coord.addr, r, &hb_timeout);
            c.args([
                "all_reduce",
                "-b",
                "64K",
                "-e",
                "64K",
                "-n",
                "100000000",
                "-w",
                "0",
            ])
            .env("BRAID_TIMEOUT", "60");
            Proc::spawn(&format!("rank {r}"), c)
        })
        .collect();
    let mut poll = Poller::start(&coord.addr, None);
    let formed = poll.wait(Duration::from_secs(60), |v| {
        view_of(v).is_some_and(|(e, ms)| e == 1 && ms.len() == 3)
    });
    poll.finish();
    let dump = |ranks: &[Proc]| -> String {
        let mut s: String = ranks.iter().map(Proc::dump).collect();
        s.push_str(&coord.proc.dump());
        s
    };
    assert!(formed.is_some(), "the group did not form\n{}", dump(&ranks));
    run_then_cut_soon(&mut ranks);
    let cut = Instant::now();
    ip(&["link", "set", &net.host_if, "down"]).unwrap();
    let bound = Duration::from_secs_f64(HEARTBEAT_TIMEOUT_S + 5.0);
    let ended: Vec<(Option<ExitStatus>, Duration)> = ranks
        .iter_mut()
        .map(|p| {
            let st = p.wait_exit(bound.saturating_sub(cut.elapsed()));
            (st, cut.elapsed())
        })
        .collect();
    for p in ranks.iter_mut() {
        p.finish(Duration::from_secs(1));
    }
    let dump = dump(&ranks);
    eprintln!(
        "FIGURE fixed group, network cut (heartbeat 0.2 s, timeout {HEARTBEAT_TIMEOUT_S} s): ranks ended after {:?} s",
        ended.iter().map(|e| secs(e.1)).collect::<Vec<_>>()
    );
    let expect: [&[&str]; 3] = [
        &["peer lost: rank 2", "no heartbeat for"],
        &["peer lost: rank 2", "no heartbeat for"],
        &["no word from the coordinator", "no progress for"],
    ];
    for (r, (st, _)) in ended.iter().enumerate() {
        let st = st.unwrap_or_else(|| panic!("rank {r} did not end within {bound:?}\n{dump}"));
        assert!(!st.success(), "rank {r} exited 0\n{dump}");
        let err: String = ranks[r]
            .lines()
            .iter()
            .filter(|l| l.stderr)
            .map(|l| l.text.clone() + "\n")
            .collect();
        eprintln!("rank {r}: {}", err.trim_end().lines().last().unwrap_or(""));
        assert!(
            expect[r].iter().all(|e| err.contains(e)),
            "rank {r}: {err}\n{dump}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Wrong token, no token, strangers on a data port
// ---------------------------------------------------------------------------------------------

/// Listening TCP ports of process `pid` (from /proc: its socket inodes in /proc/net/tcp*).
fn listening_ports(pid: u32) -> Vec<u16> {
    let mut inodes = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in rd.flatten() {
            if let Ok(t) = std::fs::read_link(e.path()) {
                let t = t.to_string_lossy().to_string();
                if let Some(i) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    inodes.push(i.to_string());
                }
            }
        }
    }
    let mut ports = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(s) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in s.lines().skip(1) {
            let c: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if c.len() > 9 && c[3] == "0A" && inodes.iter().any(|i| i == c[9]) {
                if let Some(p) = c[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                {
                    ports.push(p);
                }
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// A well-formed tcp socket hello (transport/src/tcp.rs) followed by a braid data hello
/// (core/src/comm.rs) whose job-token MAC is wrong.
/// A forged tcp data-connection hello (tcp protocol 2, data hello 2) answering a listener's
/// challenge: right socket hello, right form, a job-token MAC made without the token.
fn forged_hello(member: u64) -> Vec<u8> {
    let mut inner = Vec::new();
    inner.extend_from_slice(b"BRDA");
    inner.extend_from_slice(&2u16.to_le_bytes()); // data hello version
    inner.extend_from_slice(&HAS_TOKEN.to_le_bytes()); // flags: carries a job-token MAC
    inner.extend_from_slice(&1u64.to_le_bytes()); // epoch
    inner.extend_from_slice(&1u64.to_le_bytes()); // rank
    inner.extend_from_slice(&member.to_le_bytes());
    inner.extend_from_slice(&[0xab; 32]); // view MAC: we do not know the view nonce
    inner.extend_from_slice(&[0xcd; 32]); // HMAC-SHA256 of a token we do not know
    let mut h = Vec::new();
    h.extend_from_slice(b"BRDT");
    h.extend_from_slice(&2u16.to_le_bytes()); // tcp protocol version
    h.extend_from_slice(&0u16.to_le_bytes()); // socket index
    h.extend_from_slice(&1u16.to_le_bytes()); // sockets
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&65536u32.to_le_bytes()); // stripe size
    h.extend_from_slice(&[0; 16]); // connection secret (zero on socket 0)
    h.extend_from_slice(&(inner.len() as u32).to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&inner);
    h
}

/// The data hello's "has a job-token MAC" flag.
const HAS_TOKEN: u16 = 1;

#[test]
fn a_wrong_token_joiner_and_data_port_strangers_are_refused_and_the_job_is_unaffected() {
    let mut coord = start_coordinator("127.0.0.1:0", &[("BRAID_JOB_TOKEN", "a")]);
    let mut run = braid_run(
        &coord.addr,
        &["-n", "2"],
        &["all_reduce", "--elastic", "--duration", "8", "-b", "64K"],
        &[
            ("BRAID_TRANSPORT", "tcp"),
            ("BRAID_JOB_TOKEN", "a"),
            ("BRAID_ELASTIC", "1"),
        ],
    );
    let ctx = |run: &Proc, coord: &Coord, extra: &str| {
        format!("{}\n{}\n{extra}", run.dump(), coord.proc.dump())
    };
    for i in 0..2 {
        let want = format!("[{i}] # view epoch=1 size=2 rank={i}");
        assert!(
            run.wait_line(Duration::from_secs(60), |l| l.text == want)
                .is_some(),
            "[{i}] did not start\n{}",
            ctx(&run, &coord, "")
        );
    }

    // A joiner with the wrong token, one without a token.
    let stranger = |token: Option<&str>| -> (Option<ExitStatus>, String) {
        let mut c = clean(&perf());
        c.args(["all_reduce", "--elastic", "--duration", "3", "-b", "64K"])
            .env("BRAID_COORDINATOR", &coord.addr)
            .env("BRAID_WORLD_SIZE", "2")
            .env("BRAID_ELASTIC", "1")
            .env("BRAID_TRANSPORT", "tcp");
        if let Some(t) = token {
            c.env("BRAID_JOB_TOKEN", t);
        }
        let mut p = Proc::spawn(&format!("joiner with token {token:?}"), c);
        let st = p.finish(Duration::from_secs(30));
        (st, p.dump())
    };
    let (st_b, out_b) = stranger(Some("b"));
    let (st_none, out_none) = stranger(None);
    let extra = format!("{out_b}\n{out_none}");
    assert!(
        st_b.is_some_and(|s| !s.success()),
        "the wrong-token joiner: {st_b:?}\n{}",
        ctx(&run, &coord, &extra)
    );
    assert!(out_b.contains("job token"), "{out_b}");
    assert!(
        st_none.is_some_and(|s| !s.success()),
        "the joiner without a token: {st_none:?}\n{}",
        ctx(&run, &coord, &extra)
    );
    assert!(
        out_none.contains("job token") && out_none.contains("BRAID_JOB_TOKEN"),
        "{out_none}"
    );
    // The coordinator logs the refusal with the address.
    assert!(
        coord
            .proc
            .wait_line(Duration::from_secs(5), |l| {
                l.text.contains("refused 127.0.0.1:") && l.text.contains("job token")
            })
            .is_some(),
        "no refusal in the coordinator's log\n{}",
        ctx(&run, &coord, &extra)
    );
    // status needs the token too.
    assert!(
        status(&coord.addr, None).is_none(),
        "status without the token worked"
    );
    let snap = status(&coord.addr, Some("a")).expect("status with the token");
    let (epoch, members) = view_of(&snap).unwrap();
    assert_eq!((epoch, members.len()), (1, 2), "{snap}");
    assert_eq!(history(&snap).len(), 1, "{snap}");

    // Strangers on the ranks' data ports: junk, a forged hello with a wrong token MAC, and a
    // connection closed at once. Each is dropped with a log line naming its address.
    let mut expect = Vec::new();
    for m in &members {
        let ports = listening_ports(m.pid as u32);
        assert!(!ports.is_empty(), "no listening port for {m:?}");
        for port in ports {
            for what in ["junk", "forged", "close"] {
                let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                    continue;
                };
                let local = s.local_addr().unwrap().to_string();
                match what {
                    "junk" => {
                        let _ = s.write_all(&[0x42; 300]);
                    }
                    "forged" => {
                        // The listener's challenge frame (40 bytes) comes first.
                        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut ch = [0u8; 40];
                        let _ = s.read_exact(&mut ch);
                        let _ = s.write_all(&forged_hello(m.id));
                    }
                    _ => {}
                }
                std::thread::sleep(Duration::from_millis(200));
                drop(s);
                expect.push((m.rank, what, local));
            }
        }
    }
    let st = run.finish(Duration::from_secs(60));
    let all = run.lines();
    let dump = ctx(&run, &coord, &extra);
    assert!(st.is_some_and(|s| s.success()), "braid-run: {st:?}\n{dump}");
    assert!(!expect.is_empty());
    let mut forged_dropped = false;
    for (rank, what, local) in &expect {
        let li = of_index(&all, *rank);
        let dropped = li
            .iter()
            .find(|l| l.stderr && l.text.contains("dropping") && l.text.contains(local.as_str()));
        assert!(
            dropped.is_some(),
            "rank {rank} did not drop the stranger {local} ({what})\n{dump}"
        );
        if *what == "forged" && dropped.unwrap().text.contains("job-token MAC") {
            forged_dropped = true;
        }
    }
    // At least one forged hello got past the socket hello and was refused for its MAC.
    assert!(
        forged_dropped,
        "no forged hello was refused for its job-token MAC\n{dump}"
    );
    // The job is unaffected: no failure, no view change, all values right.
    for i in 0..2 {
        let li = of_index(&all, i);
        assert_eq!(views(&li), vec![(1, 2, i)], "[{i}]\n{dump}");
        let f = finals(&li);
        assert!(
            f.len() == 1
                && f[0].failed == 0
                && f[0].changes == 0
                && f[0].epoch == 1
                && f[0].wrong == 0,
            "[{i}] {f:?}\n{dump}"
        );
    }
    assert!(
        !all.iter().any(|l| l.text.contains("# step failed")
            || l.text.contains("# control all-reduce failed")
            || l.text.contains("peer lost")),
        "{dump}"
    );
    let by_rank: BTreeMap<usize, usize> = expect.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry(e.0).or_insert(0) += 1;
        m
    });
    eprintln!("strangers dropped per rank: {by_rank:?}");
}
