//! Tests of the `braid-run` launcher binary.

#![allow(clippy::unwrap_used, clippy::panic)] // test helpers outside #[test] functions

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn braid_run() -> Command {
    Command::new(env!("CARGO_BIN_EXE_braid-run"))
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let d = std::env::temp_dir().join(format!("braid-run-{name}-{}-{nanos}", std::process::id()));
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

#[test]
fn three_ranks_say_hello() {
    let out = braid_run()
        .args(["-n", "3", "--", "sh", "-c"])
        .arg(
            "echo hi from $BRAID_RANK; \
             echo env $BRAID_WORLD_SIZE $BRAID_LOCAL_RANK $BRAID_LOCAL_SIZE $LOCAL_RANK; \
             echo coord $BRAID_COORDINATOR; echo to stderr $BRAID_RANK >&2",
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}\n{stdout}\n{stderr}", out.status);
    for i in 0..3 {
        assert!(stdout.contains(&format!("[{i}] hi from {i}\n")), "{stdout}");
        assert!(
            stdout.contains(&format!("[{i}] env 3 {i} 3 {i}\n")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("[{i}] coord 127.0.0.1:")),
            "{stdout}"
        );
        assert!(
            stderr.contains(&format!("[{i}] to stderr {i}\n")),
            "{stderr}"
        );
    }
    // Every line is prefixed (no torn lines).
    assert!(stdout.lines().all(|l| l.starts_with('[')), "{stdout}");
    assert_eq!(stdout.lines().count(), 9, "{stdout}");
}

#[test]
fn a_failing_rank_stops_the_others() {
    let dir = temp_dir("fail");
    // Ranks 0 and 2 start a helper `sleep 30` (in their process group) and wait for it;
    // rank 1 waits until both have written their helper's pid, then exits 3.
    let script = r#"
        d="$TEST_DIR"
        if [ "$BRAID_RANK" = 1 ]; then
            i=0
            while [ ! -f "$d/pid.0" ] || [ ! -f "$d/pid.2" ]; do
                i=$((i+1)); [ $i -gt 200 ] && break; sleep 0.05
            done
            exit 3
        fi
        sleep 30 &
        echo $! > "$d/tmp.$BRAID_RANK"; mv "$d/tmp.$BRAID_RANK" "$d/pid.$BRAID_RANK"
        wait
    "#;
    let t = Instant::now();
    let out = braid_run()
        .args(["-n", "3", "--", "sh", "-c", script])
        .env("TEST_DIR", &dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let elapsed = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert!(
        stderr.lines().any(
            |l| l.starts_with("braid-run: rank 1 (pid ") && l.ends_with("exited with status 3")
        ),
        "{stderr}"
    );
    for r in [0, 2] {
        let pid: u32 = std::fs::read_to_string(dir.join(format!("pid.{r}")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        while !gone(pid) {
            assert!(Instant::now() < end, "sleeper {pid} of rank {r} still runs");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_rank_is_reported_with_its_signal() {
    let out = braid_run()
        .args(["-n", "2", "--", "sh", "-c"])
        .arg("if [ $BRAID_RANK = 0 ]; then kill -9 $$; fi; sleep 30")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 9), "{stderr}");
    assert!(
        stderr.contains("rank 0 (pid ") && stderr.contains("was killed by signal 9 (SIGKILL)"),
        "{stderr}"
    );
}

#[test]
fn sigterm_is_forwarded_to_the_ranks() {
    let child = braid_run()
        .args(["-n", "2", "--", "sleep", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(out.status.code(), Some(128 + 15), "{stderr}");
    assert!(
        stderr.contains("was killed by signal 15 (SIGTERM)"),
        "{stderr}"
    );
}

#[test]
fn usage_errors_and_help() {
    let out = braid_run().arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("usage: braid-run -n N"));
    for args in [
        &["true"][..],
        &["-n", "0", "true"],
        &["-n", "2"],
        &["-x", "-n", "1", "true"],
    ] {
        let out = braid_run().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("braid-run: "));
    }
    let out = braid_run()
        .args(["-n", "1", "/nonexistent/cmd"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127));
}
