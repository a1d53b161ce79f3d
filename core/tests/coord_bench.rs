//! `braid-coordinator bench` at a small size (200 light members in 2 member processes, a storm
//! of 200 joiners: below the coordinator's 256 handshakes in flight, so none is evicted on a
//! loaded machine) prints its tables and the summary line with sane numbers (no timing
//! targets), and leaves no member process behind.
//!
//! Run: `cargo test -p braid --test coord_bench`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test] functions

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the bench with `args`; returns (exit success, stdout, stderr). Killed after 240 s.
fn bench(args: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_braid-coordinator"))
        .arg("bench")
        .args(args)
        .env_remove("BRAID_JOB_TOKEN")
        .env_remove("BRAID_COORDINATOR_STATE")
        .env("BRAID_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start braid-coordinator bench");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = t_out.join().unwrap();
    let err = t_err.join().unwrap();
    let Some(status) = status else {
        panic!("bench still running after 240 s\nstdout:\n{out}\nstderr:\n{err}");
    };
    (status.success(), out, err)
}

/// The value of `key=` in the summary line, as a number.
fn field(line: &str, key: &str) -> f64 {
    let v = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    v.parse()
        .unwrap_or_else(|e| panic!("{key}={v} in {line:?}: {e}"))
}

#[test]
fn small_bench_prints_sane_summary() {
    let (ok, out, err) = bench(&[
        "--members",
        "200",
        "--procs",
        "2",
        "--rounds",
        "3",
        "--window-ms",
        "50",
        "--steady-s",
        "1",
        "--storm",
        "200",
        "--timeout-s",
        "120",
    ]);
    assert!(ok, "bench failed\nstdout:\n{out}\nstderr:\n{err}");
    let last = out.lines().last().unwrap_or("");
    let keys: Vec<&str> = last
        .split_whitespace()
        .map(|kv| kv.split('=').next().unwrap_or(""))
        .collect();
    assert_eq!(
        keys,
        [
            "members",
            "join_view_ms",
            "storm_200_ms",
            "heartbeat_cpu_pct"
        ],
        "summary line {last:?}\nstdout:\n{out}"
    );
    assert_eq!(field(last, "members"), 200.0, "{out}");
    let join = field(last, "join_view_ms");
    // A join waits for the 50 ms batching window; a minute would be a hang.
    assert!(
        join.is_finite() && (40.0..60_000.0).contains(&join),
        "{out}"
    );
    let storm = field(last, "storm_200_ms");
    assert!(
        storm.is_finite() && (40.0..120_000.0).contains(&storm),
        "{out}"
    );
    let cpu = field(last, "heartbeat_cpu_pct");
    assert!(cpu.is_finite() && (0.0..=800.0).contains(&cpu), "{out}");
    // The tables came first.
    assert!(out.contains("formation:"), "{out}");
    assert!(out.contains("epoch   4 size    203"), "{out}");
    assert!(out.contains("join storm of 200:"), "{out}");
    assert!(out.contains("size 403"), "{out}");
    assert!(out.contains("steady heartbeats over"), "{out}");
    // Registered members are served by the event loop (no thread per connection).
    assert!(out.contains("braid-coord-loo"), "{out}");
    // 200 members, one heartbeat a second each.
    let hb: f64 = out
        .lines()
        .find_map(|l| l.split("; ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no heartbeat rate in\n{out}"));
    assert!((100.0..400.0).contains(&hb), "heartbeats/s {hb}\n{out}");
}

#[test]
fn bad_arguments_are_refused() {
    let (ok, _, err) = bench(&["--procs", "2"]);
    assert!(!ok);
    assert!(err.contains("needs --members N"), "{err}");
    let (ok, _, err) = bench(&["--members", "2", "--procs", "3"]);
    assert!(!ok);
    assert!(err.contains("1..=members processes"), "{err}");
    // The members' subcommand refuses a malformed command line.
    let out = Command::new(env!("CARGO_BIN_EXE_braid-coordinator"))
        .args(["bench-members", "--count"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn state_machine_bench_prints_its_summary() {
    let (ok, out, err) = bench(&["--state-machine", "100000"]);
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    let last = out.lines().last().unwrap_or_default();
    assert!(last.starts_with("state_machine members=100000 "), "{out}");
    for key in ["join_decision_ms", "failure_decision_ms"] {
        let v = field(last, key);
        assert!(v.is_finite() && v > 0.0, "{key} in {out}");
    }
    eprintln!("{out}");
    let (ok, _, err) = bench(&["--state-machine", "0"]);
    assert!(!ok && err.contains("not in 1.."), "{err}");
}

/// Bytes per member of each join round's view (the round lines' "(X per member)").
fn per_member_bytes(out: &str) -> Vec<f64> {
    out.lines()
        .filter(|l| l.contains("view bytes read by all members"))
        .filter_map(|l| {
            l.rsplit_once('(')?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn full_members_read_deltas_of_a_few_bytes_and_whole_views_grow_with_the_group() {
    let run = |views: &str| {
        let (ok, out, err) = bench(&[
            "--members",
            "120",
            "--procs",
            "2",
            "--rounds",
            "2",
            "--window-ms",
            "20",
            "--steady-s",
            "0",
            "--storm",
            "0",
            "--views",
            views,
            "--timeout-s",
            "120",
        ]);
        assert!(
            ok,
            "bench --views {views} failed\nstdout:\n{out}\nstderr:\n{err}"
        );
        let b = per_member_bytes(&out);
        assert_eq!(b.len(), 2, "{out}");
        (b, out)
    };
    let (delta, out_d) = run("delta");
    let (whole, out_w) = run("whole");
    assert!(out_d.contains("view deltas"), "{out_d}");
    assert!(out_w.contains("no deltas"), "{out_w}");
    // A join's delta is one member record (a few hundred bytes); a whole view of 121 members
    // is over 100 records.
    for (d, w) in delta.iter().zip(&whole) {
        assert!(*d < 1000.0, "delta bytes per member {d}\n{out_d}");
        assert!(
            *w > 20.0 * *d,
            "whole {w} vs delta {d} bytes per member\n{out_w}"
        );
    }
}
