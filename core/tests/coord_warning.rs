//! `braid-coordinator` warns (one line on stderr) when it listens on a non-loopback address
//! without a job token, and stays quiet on loopback or with a token.
//!
//! Run: `cargo test -p braid --test coord_warning`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test] functions

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts the coordinator, waits for its "listening" line, stops it with SIGTERM and returns
/// its stderr.
fn run(bind: &str, token: Option<&str>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_braid-coordinator"));
    cmd.args(["--bind", bind])
        .env_remove("BRAID_JOB_TOKEN")
        .env_remove("BRAID_COORDINATOR_STATE")
        .env("BRAID_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(t) = token {
        cmd.env("BRAID_JOB_TOKEN", t);
    }
    let mut child = cmd.spawn().expect("start braid-coordinator");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert!(
        line.starts_with("braid-coordinator listening on"),
        "{line:?}"
    );
    // SAFETY: FFI; the pid is our own child's, which has not been reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("braid-coordinator did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

#[test]
fn warns_without_a_token_on_a_non_loopback_address() {
    let err = run("0.0.0.0:0", None);
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].contains("BRAID_JOB_TOKEN"), "{err}");
}

#[test]
fn quiet_on_loopback_or_with_a_token() {
    let err = run("127.0.0.1:0", None);
    assert!(!err.contains("BRAID_JOB_TOKEN"), "{err}");
    let err = run("0.0.0.0:0", Some("s3cret"));
    assert!(!err.contains("BRAID_JOB_TOKEN"), "{err}");
}
