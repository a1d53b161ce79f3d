//! `braid-perf topo`: the JSON it prints parses and names at least one core and PU, and two
//! processes on this host report the same host id.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn topo_json() -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_braid-perf"))
        .args(["topo", "--json"])
        .output()
        .expect("run braid-perf topo --json");
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "braid-perf topo --json failed: {}\n{so}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&so).unwrap_or_else(|e| panic!("not JSON ({e}):\n{so}"))
}

#[test]
fn topo_json_has_cores_and_pus() {
    let v = topo_json();
    assert!(v["cores"].as_u64().unwrap() > 0, "{v}");
    assert!(v["pus"].as_u64().unwrap() > 0, "{v}");
    assert!(v["packages"].as_u64().unwrap() > 0, "{v}");
    assert!(!v["numa_nodes"].as_array().unwrap().is_empty(), "{v}");
    let src = v["source"].as_str().unwrap();
    assert!(src == "hwloc" || src == "sysfs", "{v}");
    // The JSON is the library's Topology.
    let _: braid::topo::Topology = serde_json::from_value(v).unwrap();
}

#[test]
fn two_processes_on_this_host_share_a_host_id() {
    let a = topo_json();
    let b = topo_json();
    let (a, b) = (
        a["host_id"].as_str().unwrap(),
        b["host_id"].as_str().unwrap(),
    );
    assert!(!a.is_empty());
    assert_eq!(a, b);
    assert_eq!(a, braid::membership::local_host_id());
}

#[test]
fn topo_text_and_bad_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_braid-perf"))
        .arg("topo")
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("PU(s)"), "{s}");
    let bad = Command::new(env!("CARGO_BIN_EXE_braid-perf"))
        .args(["topo", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
