//! BRAID_CPU_AFFINITY: the communicator's progress thread runs pinned to the configured CPUs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use braid::membership::Coordinator;
use braid::transport::mem::MemFabric;
use braid::{Communicator, Config, ReduceOp};

fn status_field(path: &std::path::Path, key: &str) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    s.lines().find_map(|l| {
        l.strip_prefix(key)
            .map(|v| v.trim_start_matches(':').trim().to_string())
    })
}

#[test]
fn progress_thread_is_pinned() {
    // The last CPU this process may use (so that the pin differs from the default mask where
    // there is more than one).
    let allowed = status_field("/proc/self/status".as_ref(), "Cpus_allowed_list").unwrap();
    let cpu = *braid::topo::parse_cpu_list(&allowed)
        .unwrap()
        .last()
        .unwrap();

    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let cfg = Config {
        coordinator: Some(coord.local_addr().to_string()),
        world_size: Some(1),
        rank: Some(0),
        cpu_affinity: Some(vec![cpu]),
        timeout: std::time::Duration::from_secs(30),
        ..Config::default()
    };
    let c = Communicator::init_in_process(cfg, MemFabric::new()).unwrap();
    // A non-blocking call starts the progress thread.
    let out = c
        .iall_reduce(vec![1i64; 16], ReduceOp::Sum)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(out, vec![1i64; 16]);

    let mut found = false;
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with("braid-progress") {
            let list = status_field(&t.path().join("status"), "Cpus_allowed_list").unwrap();
            assert_eq!(
                braid::topo::parse_cpu_list(&list),
                Some(vec![cpu]),
                "{list}"
            );
            found = true;
        }
    }
    assert!(found, "no progress thread found");
}
