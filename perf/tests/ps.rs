//! Multi-process fault drills for push/pull (issue 6, "Fault tolerance" and "Tests"): real
//! server and worker processes of `braid-perf push_pull --drill` under `braid-run`, over tcp,
//! with `BRAID_HEARTBEAT=0.2` and `BRAID_HEARTBEAT_TIMEOUT=2`:
//!
//! 1. a server killed with -9 mid-training (3 servers, 2 workers, replicas 1, async Sum): no
//!    acknowledged update is lost (the final value is exact), the workers exit 0;
//! 2. a worker killed with -9 in sync mode (3 workers, 2 servers): the survivors' rounds keep
//!    closing, every aggregate is exact for the workers that took part, the last ones hold
//!    exactly the survivors, versions grow by 1 per round;
//! 3. two servers join mid-run (async Sum): key parts move to them, values are kept (exact
//!    final value);
//! 4. bad input through a real process pair: a wrong length, a dtype mismatch and a pull of an
//!    unknown key get clear errors while another worker keeps pushing (exact final value);
//!    a push to an unknown key is refused.
//!
//! The drill's checks (see `perf/src/pushpull.rs`, `--drill`) make a lost acknowledged update
//! visible: in async mode every push adds 1 to every element and to the pusher's tally slot,
//! each worker waits for the acknowledgement, and worker 0 finally checks that every element
//! equals the sum of the acknowledged counts; in sync mode worker w pushes `2^w * (i % 7 + 1)`
//! so every aggregate names the workers in it. Every drill process prints a final line
//! `# push_pull: rounds R versions A..B #wrong W lost-updates L errors E partial-rounds P
//! final-mask M max-round-ms T worker I ...`, which the tests parse.
//!
//! `braid-run` is a binary of the `braid` crate: build it first (`cargo build --workspace
//! --bins`). Run with `--test-threads=1` on small machines.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// What one `braid-run` of the drill printed.
struct Run {
    ok: bool,
    status: String,
    stdout: String,
    stderr: String,
    secs: f64,
}

impl Run {
    fn dump(&self) -> String {
        format!(
            "braid-run {} after {:.1} s\n---- stdout ----\n{}\n---- stderr ----\n{}",
            self.status, self.secs, self.stdout, self.stderr
        )
    }

    /// Lines braid-run relayed from launcher index `idx` (prefix removed).
    fn of(&self, idx: usize) -> Vec<String> {
        let p = format!("[{idx}] ");
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix(&p).map(str::to_string))
            .collect()
    }

    /// The final drill line of every worker, by launcher index.
    fn finals(&self) -> BTreeMap<usize, Final> {
        let mut m = BTreeMap::new();
        for l in self.stdout.lines() {
            let Some(rest) = l.strip_prefix('[') else {
                continue;
            };
            let Some((idx, text)) = rest.split_once("] ") else {
                continue;
            };
            if let (Ok(idx), Some(f)) = (idx.parse(), Final::parse(text)) {
                m.insert(idx, f);
            }
        }
        m
    }
}

/// `# push_pull: rounds R versions A..B #wrong W lost-updates L errors E partial-rounds P
/// final-mask M max-round-ms T worker I ...`
#[derive(Debug, Clone)]
struct Final {
    rounds: u64,
    versions: (u64, u64),
    wrong: u64,
    lost: u64,
    errors: u64,
    partial: u64,
    final_mask: u64,
    max_round_ms: f64,
    text: String,
}

impl Final {
    fn parse(s: &str) -> Option<Final> {
        let rest = s.strip_prefix("# push_pull: ")?;
        let w: Vec<&str> = rest.split_whitespace().collect();
        let val = |name: &str| {
            w.iter()
                .position(|x| *x == name)
                .and_then(|i| w.get(i + 1))
                .copied()
        };
        let num = |name: &str| val(name).and_then(|v| v.parse::<u64>().ok());
        let (a, b) = val("versions")?.split_once("..")?;
        Some(Final {
            rounds: num("rounds")?,
            versions: (a.parse().ok()?, b.parse().ok()?),
            wrong: num("#wrong")?,
            lost: num("lost-updates")?,
            errors: num("errors")?,
            partial: num("partial-rounds")?,
            final_mask: u64::from_str_radix(val("final-mask")?.trim_start_matches("0b"), 2).ok()?,
            max_round_ms: val("max-round-ms")?.parse().ok()?,
            text: s.to_string(),
        })
    }

    fn clean(&self) -> bool {
        self.wrong == 0 && self.lost == 0 && self.errors == 0
    }
}

/// `braid-run DRILLS -- braid-perf push_pull --drill ARGS` over tcp with fast failure
/// detection; stopped (and reported) after `limit`.
fn drill(drills: &[&str], args: &[&str], limit: Duration) -> Run {
    let mut c = Command::new(bin("braid-run"));
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("BRAID_")) {
            c.env_remove(k);
        }
    }
    c.args(drills)
        .arg("--")
        .arg(perf())
        .args(["push_pull", "--drill", "--op-timeout", "20"])
        .args(args)
        .env("BRAID_TRANSPORT", "tcp")
        .env("BRAID_HEARTBEAT", "0.2")
        .env("BRAID_HEARTBEAT_TIMEOUT", "2")
        .env("BRAID_LOG", "braid::ps=debug,warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = c.spawn().expect("braid-run");
    // Read the pipes while it runs (a full pipe would block it).
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let ro = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut so, &mut s);
        s
    });
    let re = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut se, &mut s);
        s
    });
    let mut status = None;
    while t0.elapsed() < limit {
        if let Some(st) = child.try_wait().unwrap() {
            status = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = t0.elapsed().as_secs_f64();
    let (ok, status) = match status {
        Some(st) => (st.success(), format!("{st}")),
        None => {
            // Hung: SIGTERM (braid-run forwards it), then SIGKILL.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(4));
            let _ = child.kill();
            let _ = child.wait();
            (false, format!("HUNG (stopped after {} s)", limit.as_secs()))
        }
    };
    let run = Run {
        ok,
        status,
        stdout: ro.join().unwrap(),
        stderr: re.join().unwrap(),
        secs,
    };
    for (i, f) in run.finals() {
        eprintln!("[{i}] {}", f.text);
    }
    eprintln!("braid-run {} after {:.1} s", run.status, run.secs);
    run
}

/// Asserts that launcher indices `workers` each printed a clean final line; returns them.
fn clean_finals(run: &Run, workers: &[usize]) -> Vec<Final> {
    let f = run.finals();
    workers
        .iter()
        .map(|i| {
            let x = f
                .get(i)
                .unwrap_or_else(|| panic!("worker [{i}] printed no final line\n{}", run.dump()));
            assert!(
                x.clean(),
                "worker [{i}]: wrong values, lost updates or errors: {}\n{}",
                x.text,
                run.dump()
            );
            x.clone()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. A server killed with -9
// ---------------------------------------------------------------------------------------------

#[test]
fn server_killed_with_sigkill_loses_no_acknowledged_update() {
    // Launcher indices 0..3 are servers, 3 and 4 workers; server [0] dies at 3 s of 8.
    let run = drill(
        &["-n", "5", "--kill", "0@3"],
        &[
            "--workers",
            "2",
            "--servers",
            "3",
            "--replicas",
            "1",
            "--mode",
            "async",
            "--duration",
            "8",
            "--keys",
            "4",
            "--len",
            "1024",
            "--partition",
            "8K",
            "--report",
            "100000",
        ],
        Duration::from_secs(60),
    );
    assert!(run.ok, "{}", run.dump());
    assert!(
        run.stderr.contains("braid-run: killing [0] (pid"),
        "{}",
        run.dump()
    );
    let f = clean_finals(&run, &[3, 4]);
    // Worker 0 checked the totals: every acknowledged push of both workers is in every element.
    assert!(f[0].text.contains(" expected "), "{}", f[0].text);
    // Server [0] held parts before it died, so the kill hit owned data.
    assert!(
        run.of(0)
            .iter()
            .any(|l| l.starts_with("# server [0]") && !l.contains(": parts 0 ")),
        "{}",
        run.dump()
    );
    // The survivors took over: a later epoch on the other servers.
    assert!(
        run.of(1).iter().any(|l| l.contains(" epoch 2")),
        "{}",
        run.dump()
    );
    eprintln!(
        "FIGURE server kill: rounds {} + {}, longest round {:.0} ms / {:.0} ms",
        f[0].rounds, f[1].rounds, f[0].max_round_ms, f[1].max_round_ms
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A worker killed with -9 in sync mode
// ---------------------------------------------------------------------------------------------

#[test]
fn worker_killed_with_sigkill_in_sync_mode_rounds_close_with_the_survivors() {
    // Servers [0] [1]; workers [2] [3] [4] (bits 1, 2, 4); [4] dies at 2.5 s. 400 rounds
    // paced by 10 ms take at least 4 s.
    let run = drill(
        &["-n", "5", "--kill", "4@2.5"],
        &[
            "--workers",
            "3",
            "--servers",
            "2",
            "--mode",
            "sync",
            "--rounds",
            "400",
            "--pace",
            "10",
            "--keys",
            "4",
            "--len",
            "1024",
            "--partition",
            "8K",
            "--report",
            "100",
        ],
        Duration::from_secs(60),
    );
    assert!(run.ok, "{}", run.dump());
    let f = clean_finals(&run, &[2, 3]);
    for x in &f {
        assert_eq!(x.rounds, 400, "{}", x.text);
        // One version per round, none skipped or repeated.
        assert_eq!(x.versions.1 - x.versions.0, 399, "{}", x.text);
        // Killed mid-run: some rounds with all three, the last ones with the survivors only.
        assert!(
            x.partial > 0 && x.partial < 400,
            "{}\n{}",
            x.text,
            run.dump()
        );
        assert_eq!(x.final_mask, 0b011, "{}", x.text);
    }
    assert!(
        !run.finals().contains_key(&4),
        "the killed worker printed a final line\n{}",
        run.dump()
    );
    eprintln!(
        "FIGURE worker kill (sync): longest round {:.0} ms / {:.0} ms (heartbeat timeout 2 s)",
        f[0].max_round_ms, f[1].max_round_ms
    );
}

// ---------------------------------------------------------------------------------------------
// 3. A server joins
// ---------------------------------------------------------------------------------------------

#[test]
fn servers_join_mid_run_keys_move_and_values_are_kept() {
    // Servers [0] [1], workers [2] [3]; joiners [4] (at 2 s) and [5] (at 4 s) are servers.
    // The workers run 10 s: a joiner must be up while they run (a server that never sees a
    // worker serves on), and on a loaded machine (CPU hogs in the test loops) a process has
    // taken 3 s to come up.
    let run = drill(
        &["-n", "4", "--join", "1@2", "--join", "1@4"],
        &[
            "--workers",
            "2",
            "--servers",
            "2",
            "--join-role",
            "server",
            "--mode",
            "async",
            "--duration",
            "10",
            "--keys",
            "8",
            "--len",
            "1024",
            "--partition",
            "8K",
            "--report",
            "100000",
        ],
        Duration::from_secs(60),
    );
    // Keys moved: each joiner came to hold parts.
    for j in [4, 5] {
        assert!(
            run.of(j)
                .iter()
                .any(|l| l.starts_with(&format!("# server [{j}]")) && !l.contains(": parts 0 ")),
            "joining server [{j}] never held a part\n{}",
            run.dump()
        );
    }
    assert!(run.ok, "{}", run.dump());
    clean_finals(&run, &[2, 3]);
}

// ---------------------------------------------------------------------------------------------
// 3b. Bounded staleness as processes: a fast worker is held back by a straggler
// ---------------------------------------------------------------------------------------------

fn max_lead(f: &Final) -> u64 {
    f.text
        .split(" max-lead ")
        .nth(1)
        .and_then(|x| x.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no max-lead in {}", f.text))
}

#[test]
fn bounded_staleness_holds_a_fast_worker_across_processes() {
    // Servers [0] [1]; workers [2] (fast) and [3] (30 ms slower per round); tau = 1.
    let run = drill(
        &["-n", "4"],
        &[
            "--workers",
            "2",
            "--servers",
            "2",
            "--mode",
            "bounded:1",
            "--rounds",
            "40",
            "--slow",
            "30",
            "--keys",
            "4",
            "--len",
            "256",
            "--report",
            "100000",
        ],
        Duration::from_secs(60),
    );
    assert!(run.ok, "{}", run.dump());
    // Clean: every push applied once, totals right, no worker ever more than tau + 1 ahead
    // (each worker checks that after every acknowledged push).
    let f = clean_finals(&run, &[2, 3]);
    let fast = max_lead(&f[0]);
    // Without the bound the fast worker would finish 40 rounds while the straggler did ~1.
    assert!(
        (1..=2).contains(&fast),
        "fast worker's lead {fast} (tau 1)\n{}",
        run.dump()
    );
    assert!(max_lead(&f[1]) <= 2, "{}", f[1].text);
}

// ---------------------------------------------------------------------------------------------
// 4. Bad input through a real process pair
// ---------------------------------------------------------------------------------------------

fn bad_input_run() -> Run {
    // Server [0]; worker [1] pushes for 6 s; worker [2] sends the bad requests meanwhile.
    drill(
        &["-n", "3"],
        &[
            "--workers",
            "2",
            "--servers",
            "1",
            "--mode",
            "async",
            "--duration",
            "6",
            "--keys",
            "4",
            "--len",
            "1024",
            "--bad-input",
            "--report",
            "100000",
        ],
        Duration::from_secs(60),
    )
}

#[test]
fn bad_input_gets_clear_errors_and_the_server_keeps_serving_others() {
    let run = bad_input_run();
    let bad = run.of(2);
    for (what, want) in [
        (
            "wrong length",
            "wrong length: expected 8192 bytes, got 8200",
        ),
        (
            "dtype mismatch",
            "dtype mismatch: expected double, got float",
        ),
        (
            "pull of an unknown key",
            "user key 888888 does not exist (nobody called init for it)",
        ),
    ] {
        assert!(
            bad.iter()
                .any(|l| l.starts_with(&format!("# bad-input {what}: ")) && l.contains(want)),
            "{what}: no refusal with {want:?}\n{}",
            run.dump()
        );
    }
    assert!(
        bad.iter().any(|l| l.contains("a good pull afterwards: ok")),
        "{}",
        run.dump()
    );
    // The other worker never noticed: exact totals.
    let f = clean_finals(&run, &[1]);
    assert!(f[0].rounds > 0, "{}", f[0].text);
}

#[test]
fn push_to_an_unknown_key_is_refused() {
    let run = bad_input_run();
    assert!(
        run.of(2)
            .iter()
            .any(|l| l.starts_with("# bad-input push to an unknown key: refused: ")),
        "a push to a key nobody initialised was not refused\n{}",
        run.dump()
    );
}
