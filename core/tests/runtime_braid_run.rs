//! braid-run's verdict after a crash (it names the rank that failed first, and exits with its
//! status, whatever order the processes are reaped in) and its job token.
//!
//! Multi-process. The ranks are shell scripts, or this test binary run again with
//! `RUNTIME_RUN_ROLE` set (a real communicator).
//!
//! Run: `cargo test -p braid --test runtime_braid_run`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn braid_run() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_braid-run"));
    // The launcher's own environment must not leak into what the tests check.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("BRAID_") {
            c.env_remove(k);
        }
    }
    c.stdin(Stdio::null());
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The verdict line of braid-run (the first `braid-run: rank ...` line without "(after").
fn verdict(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("braid-run: rank ") && !l.contains("(after "))
        .unwrap_or_else(|| panic!("no verdict line in:\n{stderr}"))
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let d = std::env::temp_dir().join(format!(
        "braid-runtime-run-{name}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn the_verdict_names_the_killed_rank_not_the_survivors_that_exit_after_it() {
    // Rank 2 (the last one reaped by index) kills itself with SIGKILL once ranks 0 and 1
    // watch it; they exit 1 within a few milliseconds of its death (they see it a zombie or
    // gone), as ranks that lose a peer do. Before the fix braid-run named whichever it reaped
    // first (rank 0 "exited with status 1") and exited 1.
    let script = r#"
        d="$TEST_DIR"
        if [ "$BRAID_RANK" = 2 ]; then
            echo $$ > "$d/tmp"; mv "$d/tmp" "$d/victim"
            i=0
            while [ ! -f "$d/ready.0" ] || [ ! -f "$d/ready.1" ]; do
                i=$((i+1)); [ $i -gt 400 ] && exit 9; sleep 0.01
            done
            sleep 0.05
            kill -9 $$
        fi
        i=0
        while [ ! -f "$d/victim" ]; do i=$((i+1)); [ $i -gt 400 ] && exit 8; sleep 0.01; done
        read -r p < "$d/victim"
        touch "$d/ready.$BRAID_RANK"
        while :; do
            line=""
            read -r line < "/proc/$p/stat" 2>/dev/null || exit 1
            case "$line" in *") Z "*) exit 1 ;; esac
            sleep 0.001
        done
    "#;
    for trial in 0..10 {
        let dir = temp_dir(&format!("verdict{trial}"));
        let out = braid_run()
            .args(["-n", "3", "--", "sh", "-c", script])
            .env("TEST_DIR", &dir)
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        let v = verdict(&stderr);
        assert!(
            v.starts_with("braid-run: rank 2 (pid ")
                && v.ends_with("was killed by signal 9 (SIGKILL)"),
            "trial {trial}: verdict {v:?}\n{stderr}"
        );
        assert_eq!(out.status.code(), Some(137), "trial {trial}:\n{stderr}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Rank side of the real-communicator drill: all-reduces until rank `RUNTIME_VICTIM` kills
/// itself with SIGKILL after 20 calls; the others exit 1 when a call fails.
fn rank_main() {
    let c = match braid::Communicator::init() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("init: {e}");
            std::process::exit(3);
        }
    };
    let victim: usize = std::env::var("RUNTIME_VICTIM").unwrap().parse().unwrap();
    let mut x = vec![1.0f32; 1024];
    let t0 = Instant::now();
    for i in 0.. {
        if c.rank() == victim && i == 20 {
            // SAFETY: FFI; kill(2) on this process.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        if let Err(e) = c.all_reduce_inplace(&mut x, braid::ReduceOp::Max) {
            eprintln!("all_reduce failed after {i} calls: {e}");
            std::process::exit(1);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            std::process::exit(5);
        }
    }
}

#[test]
fn a_rank_killed_in_a_real_job_is_named_by_the_verdict() {
    if std::env::var_os("RUNTIME_RUN_ROLE").is_some() {
        rank_main();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    for trial in 0..10 {
        let victim = ["2", "1"][trial % 2];
        let t = Instant::now();
        let out: Output = braid_run()
            .args(["-n", "3", "--"])
            .arg(&exe)
            .args([
                "--exact",
                "a_rank_killed_in_a_real_job_is_named_by_the_verdict",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("RUNTIME_RUN_ROLE", "rank")
            .env("RUNTIME_VICTIM", victim)
            .env("BRAID_TIMEOUT", "30")
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        let v = verdict(&stderr);
        assert!(
            v.starts_with(&format!("braid-run: rank {victim} (pid "))
                && v.ends_with("was killed by signal 9 (SIGKILL)"),
            "trial {trial}: verdict {v:?}\n{stderr}"
        );
        assert_eq!(out.status.code(), Some(137), "trial {trial}:\n{stderr}");
        assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    }
}

/// Rank side of the token test: the job token braid-run set is there; a registration without
/// it is refused; with it the rank joins.
fn token_rank_main() {
    let token = braid::config::var("BRAID_JOB_TOKEN").unwrap_or_default();
    println!("token-len {}", token.len());
    let hex = token.chars().all(|c| c.is_ascii_hexdigit());
    println!("token-hex {hex}");
    let cfg = braid::Config::from_env().unwrap();
    assert!(cfg.job_token.is_some());
    let stranger = braid::Config {
        job_token: None,
        init_timeout: Duration::from_secs(10),
        ..cfg.clone()
    };
    match braid::Communicator::init_with(stranger) {
        Ok(_) => println!("stranger admitted"),
        Err(e) => println!("stranger refused: {e}"),
    }
    let wrong = braid::Config {
        job_token: Some(braid::config::Secret(b"not the token".to_vec())),
        init_timeout: Duration::from_secs(10),
        ..cfg.clone()
    };
    match braid::Communicator::init_with(wrong) {
        Ok(_) => println!("wrong token admitted"),
        Err(e) => println!("wrong token refused: {e}"),
    }
    match braid::Communicator::init_with(cfg) {
        Ok(c) => println!("member admitted as rank {}", c.rank()),
        Err(e) => println!("member refused: {e}"),
    }
}

#[test]
fn braid_run_authenticates_its_jobs_with_a_fresh_token() {
    if std::env::var_os("RUNTIME_TOKEN_ROLE").is_some() {
        token_rank_main();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = braid_run()
        .args(["-n", "1", "--"])
        .arg(&exe)
        .args([
            "--exact",
            "braid_run_authenticates_its_jobs_with_a_fresh_token",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RUNTIME_TOKEN_ROLE", "rank")
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for want in [
        "token-len 64",
        "[0] token-hex true",
        "[0] stranger refused: ",
        "[0] wrong token refused: ",
        "[0] member admitted as rank 0",
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}\n{stderr}");
    }

    // Two jobs get different tokens; every rank of a job the same one.
    let tokens = |n: &str| -> Vec<String> {
        let out = braid_run()
            .args(["-n", n, "--", "sh", "-c", "echo tok $BRAID_JOB_TOKEN"])
            .output()
            .unwrap();
        assert!(out.status.success());
        text(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once("tok ").map(|(_, t)| t.to_string()))
            .collect()
    };
    let a = tokens("3");
    let b = tokens("1");
    assert_eq!(a.len(), 3, "{a:?}");
    assert!(a.iter().all(|t| t == &a[0] && t.len() == 64), "{a:?}");
    assert_eq!(b.len(), 1);
    assert_ne!(a[0], b[0]);

    // A token in braid-run's environment is used as it is.
    let out = braid_run()
        .args(["-n", "2", "--", "sh", "-c", "echo tok $BRAID_JOB_TOKEN"])
        .env("BRAID_JOB_TOKEN", "s3cret")
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success());
    assert_eq!(stdout.matches("tok s3cret\n").count(), 2, "{stdout}");
}
