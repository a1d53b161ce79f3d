//! What the push/pull benchmarks print (issue 17's measurements rely on it): the servers'
//! memory lines of `braid-perf push_pull` (values, everything stored, receive buffers, the
//! ratio judged by `perf/ps_compare`), `BRAID_PS_HISTORY` reaching the servers, and the rows of
//! `braid-perf wire_ceiling` with and without `--sum`. Short runs over tcp loopback; no speed
//! is judged here (perf/ps_compare does that).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

fn perf() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_braid-perf"))
}

/// `key=value` fields of a `# server [i] member M: ...` line.
fn fields(line: &str) -> BTreeMap<String, f64> {
    line.split_whitespace()
        .filter_map(|t| t.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// Runs push_pull (2 workers, 2 servers, async r0, 1 MiB per worker, 4 keys) and returns the
/// servers' memory lines, parsed.
fn servers_memory(history: Option<&str>) -> Vec<BTreeMap<String, f64>> {
    let mut cmd = Command::new(perf());
    cmd.args([
        "push_pull",
        "--workers",
        "2",
        "--servers",
        "2",
        "--keys",
        "4",
        "--mode",
        "async",
        "--replicas",
        "0",
        "--transport",
        "tcp",
        "-b",
        "1M",
        "-e",
        "1M",
        "-n",
        "6",
        "-w",
        "1",
    ]);
    if let Some(h) = history {
        cmd.env("BRAID_PS_HISTORY", h);
    }
    let out = cmd.output().unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "push_pull failed\n{so}\n{se}");
    let row = so
        .lines()
        .find(|l| l.trim_start().starts_with("1048576"))
        .unwrap_or_else(|| panic!("no 1 MiB row\n{so}"));
    assert_eq!(row.split_whitespace().nth(6), Some("0"), "#wrong: {row}");
    let lines: Vec<_> = se
        .lines()
        .filter(|l| l.starts_with("# server ["))
        .map(fields)
        .collect();
    assert_eq!(lines.len(), 2, "one memory line per server\n{se}");
    lines
}

#[test]
fn push_pull_servers_report_their_memory_by_kind() {
    let mut held_all = 0.0;
    for m in servers_memory(None) {
        for k in [
            "peak_rss_mib",
            "held_mib",
            "stored_mib",
            "rbuf_mib",
            "base_mib",
            "rss_over_held",
            "rss_over_stored",
        ] {
            assert!(m.contains_key(k), "{k} missing: {m:?}");
        }
        // With the default history (4 versions kept) a server stores more than its values
        // once it has seen several pushes; its RSS covers what it stores.
        assert!(m["stored_mib"] > m["held_mib"], "{m:?}");
        assert!(m["peak_rss_mib"] > m["base_mib"], "{m:?}");
        assert!(m["rss_over_stored"] > 0.0, "{m:?}");
        held_all += m["held_mib"];
    }
    // 4 keys of 256 KiB (each worker pushes the same keys): 1 MiB held over both servers.
    assert!((held_all - 1.0).abs() < 0.05, "held {held_all} MiB");
    // BRAID_PS_HISTORY=1 keeps the current values only (async: no open rounds).
    for m in servers_memory(Some("1")) {
        assert!((m["stored_mib"] - m["held_mib"]).abs() < 1e-9, "{m:?}");
    }
}

#[test]
fn wire_ceiling_prints_a_row_per_size_with_and_without_sums() {
    for sum in [false, true] {
        let mut cmd = Command::new(perf());
        cmd.args([
            "wire_ceiling",
            "--workers",
            "2",
            "--servers",
            "2",
            "-b",
            "64K",
            "-e",
            "256K",
            "-f",
            "4",
            "-n",
            "3",
            "-w",
            "1",
        ]);
        if sum {
            cmd.arg("--sum");
        }
        let out = cmd.output().unwrap();
        let so = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{so}");
        assert!(
            so.contains(if sum {
                "servers sum (f32)"
            } else {
                "no arithmetic"
            }),
            "{so}"
        );
        let rows: Vec<Vec<f64>> = so
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
            .collect();
        assert_eq!(rows.len(), 2, "{so}");
        for (r, size) in rows.iter().zip([65536.0, 262144.0]) {
            // size, round_us, agg_GB/s = 2 x size x workers / round_us / 1e3
            assert_eq!(r[0], size);
            assert!(r[1] > 0.0 && r[2] > 0.0, "{so}");
            let agg = 2.0 * size * 2.0 / r[1] / 1e3;
            assert!((agg - r[2]).abs() <= 0.002 + 0.01 * agg, "{so}");
        }
    }
    // Bad arguments: a clear error, exit status 2.
    let out = Command::new(perf())
        .args(["wire_ceiling", "--workers", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 1"));
}

/// `--api raw` (push_pull_raw + wait, the C ABI's braid_kv_push_pull path) and `--api each`
/// (push_pull_into_each, one slice per key, the C ABI's braid_kv_push_pull_waitv path) run
/// exact sync rounds (every round's aggregate checked) with keys of 2 MiB (lent, not copied)
/// and say so in the header; an unknown `--api` is refused.
#[test]
fn push_pull_api_raw_and_each_run_exact_sync_rounds() {
    for api in ["raw", "each"] {
        let out = Command::new(perf())
            .args([
                "push_pull",
                "--workers",
                "2",
                "--servers",
                "2",
                "--keys",
                "4",
                "--mode",
                "sync",
                "--replicas",
                "0",
                "--transport",
                "tcp",
                "-b",
                "8M",
                "-e",
                "8M",
                "-n",
                "4",
                "-w",
                "1",
                "--api",
                api,
            ])
            .output()
            .unwrap();
        let (so, se) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "--api {api} failed\n{so}\n{se}");
        assert!(
            so.lines().any(|l| l.starts_with("# braid-perf push_pull:")
                && l.ends_with(&format!(", api {api}"))),
            "--api {api}: header\n{so}"
        );
        let row = so
            .lines()
            .find(|l| l.trim_start().starts_with("8388608"))
            .unwrap_or_else(|| panic!("--api {api}: no 8 MiB row\n{so}"));
        assert_eq!(row.split_whitespace().nth(6), Some("0"), "#wrong: {row}");
    }
    let out = Command::new(perf())
        .args([
            "push_pull",
            "--workers",
            "1",
            "--servers",
            "1",
            "--api",
            "copy",
        ])
        .output()
        .unwrap();
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "--api copy accepted");
    assert!(se.contains("expected blocking, raw or each"), "{se}");
}
