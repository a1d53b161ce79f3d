//! Tests of `braid-run`'s elastic drills: `--join K@SECONDS` and `--kill RANK@SECONDS`.
//!
//! Multi-process, with shell commands for ranks (no communicator needed).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn braid_run() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_braid-run"));
    // The launcher's own environment must not leak into what the tests check.
    c.env_remove("BRAID_ELASTIC")
        .env_remove("BRAID_RUN_INDEX")
        .stdin(Stdio::null());
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let d = std::env::temp_dir().join(format!(
        "braid-run-elastic-{name}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Whether a process is gone (no such pid, or a zombie waiting to be reaped by init).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

/// The time in seconds that a `braid-run: ... at T s` line reports.
fn reported_secs(line: &str) -> f64 {
    let rest = line
        .rsplit_once(" at ")
        .unwrap_or_else(|| panic!("no time in {line:?}"))
        .1;
    rest.strip_suffix(" s")
        .unwrap_or_else(|| panic!("no time in {line:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("no time in {line:?}"))
}

/// The line of `out` that starts with `prefix`.
fn line_starting<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{out}"))
}

/// Runs braid-run to completion; returns its output and how long it ran.
fn run(args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let out = braid_run().args(args).output().unwrap();
    (out, t.elapsed())
}

#[test]
fn joiners_start_after_their_delay_with_the_joiner_environment() {
    // Each process prints its environment and its start time (ns since the epoch).
    let script = "echo start $(date +%s%N) idx=$BRAID_RUN_INDEX rank=${BRAID_RANK-none} \
                  ws=$BRAID_WORLD_SIZE el=${BRAID_ELASTIC-unset} lr=$BRAID_LOCAL_RANK \
                  LR=$LOCAL_RANK ls=$BRAID_LOCAL_SIZE coord=$BRAID_COORDINATOR; sleep 1";
    let t0 = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let out = braid_run()
        // A rank braid-run inherits must not reach the joiners.
        .env("BRAID_RANK", "77")
        .args([
            "-n",
            "2",
            "--join",
            "1@1.5",
            "--join=2@1",
            "--",
            "sh",
            "-c",
            script,
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{:?}\n{stdout}\n{stderr}", out.status);

    // The 2 joiners due at 1 s start first and get indices 2 and 3; the one due at 1.5 s gets 4.
    let l = line_starting(&stderr, "braid-run: starting 2 joiner(s) [2]..[3] at ");
    let t = reported_secs(l);
    assert!((1.0..2.0).contains(&t), "{l}");
    let l = line_starting(&stderr, "braid-run: starting 1 joiner(s) [4] at ");
    let t = reported_secs(l);
    assert!((1.5..2.5).contains(&t), "{l}");

    let mut coords = Vec::new();
    for (idx, due) in [(0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0), (4, 1.5)] {
        let l = line_starting(&stdout, &format!("[{idx}] start "));
        let f: Vec<&str> = l.split_whitespace().collect();
        let started = Duration::from_nanos(f[2].parse().unwrap()).saturating_sub(t0);
        let started = started.as_secs_f64();
        if idx < 2 {
            assert!(started < 1.0, "{l}: rank started late ({started} s)");
            assert_eq!(
                f[3..10].join(" "),
                format!("idx={idx} rank={idx} ws=2 el=1 lr={idx} LR={idx} ls=2"),
                "{l}"
            );
        } else {
            assert!(started >= due, "{l}: joiner started early ({started} s)");
            assert_eq!(
                f[3..10].join(" "),
                format!("idx={idx} rank=none ws=2 el=1 lr={idx} LR={idx} ls=5"),
                "{l}"
            );
        }
        coords.push(f[10].to_string());
    }
    // Every process, joiners included, reaches the same (embedded) coordinator.
    assert!(coords[0].starts_with("coord=127.0.0.1:"), "{stdout}");
    assert!(coords.iter().all(|c| c == &coords[0]), "{stdout}");
    assert!(stdout.lines().all(|l| l.starts_with('[')), "{stdout}");
}

#[test]
fn without_drills_the_job_is_not_elastic() {
    let (out, _) = run(&[
        "-n",
        "2",
        "--",
        "sh",
        "-c",
        "echo idx=$BRAID_RUN_INDEX el=${BRAID_ELASTIC-unset}",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for i in 0..2 {
        assert!(
            stdout.contains(&format!("[{i}] idx={i} el=unset\n")),
            "{stdout}"
        );
    }
}

#[test]
fn kill_stops_the_right_process_and_is_not_a_failure() {
    let dir = temp_dir("kill");
    // Process 1 runs a helper (in its process group) and waits for it; the others run 3 s.
    let script = r#"
        echo pid $$
        if [ "$BRAID_RUN_INDEX" = 1 ]; then
            sleep 30 &
            echo $! > "$TEST_DIR/tmp"; mv "$TEST_DIR/tmp" "$TEST_DIR/helper"
            wait
        else
            sleep 3
        fi
        echo done
    "#;
    let t = Instant::now();
    let out = braid_run()
        .env("TEST_DIR", &dir)
        .args(["-n", "3", "--kill", "1@1", "--", "sh", "-c", script])
        .output()
        .unwrap();
    let elapsed = t.elapsed();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{:?}\n{stdout}\n{stderr}", out.status);

    let pid1 = line_starting(&stdout, "[1] pid ")["[1] pid ".len()..].to_string();
    let l = line_starting(&stderr, "braid-run: killing [1] (pid ");
    assert!(l.contains(&format!("(pid {pid1}) at ")), "{l}\n{stdout}");
    let at = reported_secs(l);
    assert!((1.0..2.0).contains(&at), "{l}");
    assert!(
        stderr.contains("was killed by signal 9 (SIGKILL) (killed by --kill; not a failure)"),
        "{stderr}"
    );
    // The kill did not stop the others: they ran to their end.
    assert!(!stderr.contains("stopping the other ranks"), "{stderr}");
    assert!(stdout.contains("[0] done\n"), "{stdout}");
    assert!(stdout.contains("[2] done\n"), "{stdout}");
    assert!(!stdout.contains("[1] done"), "{stdout}");
    assert!(elapsed >= Duration::from_millis(2900), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");

    // The whole process group went: the helper of process 1 is gone too.
    let helper: u32 = std::fs::read_to_string(dir.join("helper"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while !gone(helper) {
        assert!(Instant::now() < end, "helper {helper} of [1] still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kill_then_join_replaces_a_process() {
    let (out, elapsed) = run(&[
        "-n",
        "2",
        "--kill",
        "0@0.3",
        "--join",
        "1@0.8",
        "--",
        "sh",
        "-c",
        "echo up $BRAID_RUN_INDEX; sleep 2",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{:?}\n{stdout}\n{stderr}", out.status);
    let kill = line_starting(&stderr, "braid-run: killing [0] (pid ");
    let join = line_starting(&stderr, "braid-run: starting 1 joiner(s) [2] at ");
    assert!(reported_secs(kill) >= 0.3, "{kill}");
    assert!(reported_secs(join) >= 0.8, "{join}");
    assert!(reported_secs(kill) < reported_secs(join), "{stderr}");
    for i in 0..3 {
        assert!(stdout.contains(&format!("[{i}] up {i}\n")), "{stdout}");
    }
    assert!(elapsed >= Duration::from_millis(2700), "{elapsed:?}");
}

#[test]
fn a_failing_process_that_was_not_killed_still_fails_the_job() {
    // Rank 0 is killed by the drill; rank 2 then fails on its own: braid-run stops rank 1 and
    // exits with rank 2's code.
    let (out, elapsed) = run(&[
        "-n",
        "3",
        "--kill",
        "0@0.3",
        "--",
        "sh",
        "-c",
        "if [ $BRAID_RUN_INDEX = 2 ]; then sleep 1; exit 5; fi; sleep 30",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert!(stderr.contains("braid-run: killing [0] (pid "), "{stderr}");
    assert!(
        stderr.lines().any(
            |l| l.starts_with("braid-run: rank 2 (pid ") && l.ends_with("exited with status 5")
        ),
        "{stderr}"
    );
    assert!(stderr.contains("stopping the other ranks"), "{stderr}");
}

#[test]
fn a_failing_joiner_fails_the_job_and_cancels_later_joins() {
    let (out, elapsed) = run(&[
        "-n",
        "1",
        "--join",
        "1@0.3",
        "--join",
        "1@3",
        "--",
        "sh",
        "-c",
        "if [ $BRAID_RUN_INDEX = 1 ]; then exit 4; fi; sleep 30",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("braid-run: joiner [1] (pid ")
                && l.ends_with("exited with status 4")),
        "{stderr}"
    );
    // The stopped job starts no more joiners.
    assert!(!stderr.contains("joiner(s) [2]"), "{stderr}");
}

#[test]
fn kill_of_a_process_that_already_exited_is_a_no_op() {
    let (out, _) = run(&[
        "-n",
        "2",
        "--kill",
        "0@0.5",
        "--",
        "sh",
        "-c",
        "[ $BRAID_RUN_INDEX = 0 ] || sleep 1.5",
    ]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("braid-run: [0] (pid ") && stderr.contains("has exited already"),
        "{stderr}"
    );
    assert!(!stderr.contains("killing [0]"), "{stderr}");
}

#[test]
fn drills_due_after_every_process_exited_are_dropped() {
    let (out, elapsed) = run(&["-n", "1", "--join", "1@5", "--", "true"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
    assert!(stderr.contains("dropping 1 scheduled"), "{stderr}");
}

#[test]
fn usage_errors() {
    let help = braid_run().arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = text(&help.stdout);
    assert!(help.contains("--join K@SECONDS"), "{help}");
    assert!(help.contains("--kill RANK@SECONDS"), "{help}");
    assert!(help.contains("launcher index"), "{help}");

    for (args, says) in [
        (&["-n", "2", "--join", "0@1", "true"][..], "1 or more"),
        (&["-n", "2", "--join", "1@-1", "true"], "0 or more"),
        (&["-n", "2", "--join", "1", "true"], "K@SECONDS"),
        (&["-n", "2", "--join", "x@1", "true"], "whole number"),
        (&["-n", "2", "--join", "1@soon", "true"], "must be a number"),
        (&["-n", "2", "--join", "1@nan", "true"], "must be a number"),
        (&["-n", "2", "--join=1@inf", "true"], "must be a number"),
        (&["-n", "2", "--join"], "needs K@SECONDS"),
        (&["-n", "2", "--kill", "2@1", "true"], "below N = 2"),
        (&["--kill", "5@1", "-n", "2", "true"], "below N = 2"),
        (&["-n", "2", "--kill", "1@-0.5", "true"], "0 or more"),
        (&["-n", "2", "--kill=-1@1", "true"], "whole number"),
        (&["-n", "2", "--kill", "1@1"], "missing the command"),
        (&["--join", "1@1", "true"], "missing -n"),
    ] {
        let out = braid_run().args(args).output().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("braid-run: "), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
