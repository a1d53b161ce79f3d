//! `braid-perf -G 1` (device buffers) on a machine without a GPU (CI): it refuses at once with
//! the reason and a non-zero status, before starting any rank, and never panics; under a
//! launcher (one rank) the same. A machine with a CUDA driver runs perf/gpu_check instead.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn perf() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_braid-perf"))
}

fn has_driver() -> bool {
    [
        "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
        "/usr/lib64/libcuda.so.1",
        "/usr/lib/libcuda.so.1",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists())
}

#[test]
fn device_buffers_without_a_gpu_exit_1_with_the_reason() {
    if has_driver() {
        eprintln!("a CUDA driver is installed here: perf/gpu_check covers -G 1");
        return;
    }
    for (coll, extra) in [
        ("all_reduce", &[][..]),
        ("sendrecv", &["--ranks", "2"][..]),
        ("all_gather", &["-b", "8", "-e", "1M"][..]),
    ] {
        let t0 = Instant::now();
        let out = Command::new(perf())
            .args([coll, "-G", "1"])
            .args(extra)
            .output()
            .expect("braid-perf");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{coll}: {err}");
        assert!(
            err.contains("-G 1: system error: no CUDA driver (libcuda.so.1 not found)"),
            "{coll}: {err}"
        );
        assert!(!err.contains("panicked"), "{coll}: {err}");
        assert!(out.stdout.is_empty(), "{coll}: no rank started");
        assert!(t0.elapsed() < Duration::from_secs(30), "refused at once");
    }
    // -G takes 0 or 1; -G 1 does not combine with -R 1 (usage errors: status 2).
    for args in [
        &["all_reduce", "-G", "2"][..],
        &["all_reduce", "-G", "1", "-R", "1"][..],
    ] {
        let out = Command::new(perf())
            .args(args)
            .output()
            .expect("braid-perf");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}
