//! The verbs provider without RDMA hardware, and the link-time claims of the issue:
//! - `verbs::open` on a machine without RDMA devices returns the human reason (no panic), both
//!   with the plugin given explicitly and found next to the executable;
//! - a missing or foreign plugin is a reason too;
//! - libbraid.so (and this test executable, which links braid-transport) has no dependency on
//!   libibverbs in `ldd`, while the plugin libbraid_ibverbs.so does link it.
//!
//! The plugin and libbraid.so are built here (`cargo build -p braid-ibverbs` / `-p braid-capi
//! --lib`, this test's profile): `cargo test -p braid-transport` does not build them, and a
//! missing one must fail the test, not skip it. Needs `ldd` and rdma-core's libibverbs.so.1
//! (Makefile `deps`).

// Tests report failures by panicking; no user-reachable path is here.
#![allow(clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use braid_transport::ib::verbs::{self, VerbsOptions};

const BUILD_TIMEOUT: Duration = Duration::from_secs(1200);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// target/<profile>/: the parent of the deps/ directory holding this test executable.
fn target_dir() -> PathBuf {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => panic!("current_exe: {e}"),
    };
    match exe.parent().and_then(Path::parent) {
        Some(d) => d.to_path_buf(),
        None => panic!("no target directory above {}", exe.display()),
    }
}

/// `cargo build -p <pkg> --lib` for this test's profile and target directory, with a deadline.
fn cargo_build(pkg: &str) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = target_dir();
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo())
        .args(["build", "-p", pkg, "--lib"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(root) = target.parent() {
        cmd.env("CARGO_TARGET_DIR", root);
    }
    if target.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("cargo build -p {pkg}: spawning: {e}"),
    };
    let deadline = Instant::now() + BUILD_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("cargo build -p {pkg}: no exit after {BUILD_TIMEOUT:?}");
            }
            Err(e) => panic!("cargo build -p {pkg}: wait: {e}"),
        }
    }
    let out = match child.wait_with_output() {
        Ok(o) => o,
        Err(e) => panic!("cargo build -p {pkg}: {e}"),
    };
    assert!(
        out.status.success(),
        "cargo build -p {pkg} --lib failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// target/<profile>/libbraid_ibverbs.so, built once per test process.
fn plugin() -> PathBuf {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| cargo_build("braid-ibverbs"));
    let p = target_dir().join("libbraid_ibverbs.so");
    assert!(
        p.is_file(),
        "{} missing after cargo build -p braid-ibverbs",
        p.display()
    );
    p
}

/// target/<profile>/libbraid.so, built once per test process.
fn libbraid() -> PathBuf {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| cargo_build("braid-capi"));
    let p = target_dir().join("libbraid.so");
    assert!(
        p.is_file(),
        "{} missing after cargo build -p braid-capi",
        p.display()
    );
    p
}

fn ldd(p: &Path) -> String {
    let out = match Command::new("ldd").arg(p).stdin(Stdio::null()).output() {
        Ok(o) => o,
        Err(e) => panic!("ldd {}: {e} (ldd is needed for this test)", p.display()),
    };
    assert!(
        out.status.success(),
        "ldd {} failed: {}",
        p.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether this machine has RDMA devices (then open may succeed, and the no-device checks do
/// not apply).
fn has_rdma_devices() -> bool {
    std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some())
}

fn check_no_device(
    what: &str,
    r: Result<std::sync::Arc<dyn braid_transport::ib::nic::Nic>, String>,
) {
    match r {
        Ok(nic) => {
            assert!(
                has_rdma_devices(),
                "{what}: opened {:?} on a machine without /sys/class/infiniband",
                nic.port()
            );
            eprintln!(
                "{what}: this machine has an RDMA device: opened {:?}",
                nic.port()
            );
        }
        Err(e) if has_rdma_devices() => {
            eprintln!("{what}: RDMA device present but not opened: {e}");
        }
        Err(e) => {
            eprintln!("{what}: {e}");
            assert!(
                e.contains("no RDMA devices found"),
                "{what}: reason does not name the missing devices: {e}"
            );
            assert!(
                e.contains("ibv_get_device_list"),
                "{what}: reason does not name the verbs call: {e}"
            );
        }
    }
}

#[test]
fn open_without_devices_gives_the_reason() {
    let opts = VerbsOptions {
        plugin: Some(plugin()),
        ..VerbsOptions::default()
    };
    check_no_device("explicit plugin", verbs::open(&opts));
    // The same again: the plugin stays loaded and a second open behaves the same.
    check_no_device("explicit plugin, again", verbs::open(&opts));
    // A named device, too.
    let named = VerbsOptions {
        device: Some("mlx5_0".into()),
        ..opts
    };
    check_no_device("named device", verbs::open(&named));
}

#[test]
fn plugin_is_found_next_to_the_executable() {
    // target/<profile>/libbraid_ibverbs.so is the parent directory of this executable's
    // deps/: the search finds it without a path.
    let _ = plugin();
    check_no_device("searched plugin", verbs::open(&VerbsOptions::default()));
    match verbs::list_devices(None) {
        Ok(devs) => assert!(has_rdma_devices() || devs.is_empty(), "devices {devs:?}"),
        // ibv_get_device_list itself may fail without kernel support: a reason, not a panic.
        Err(e) => assert!(e.contains("ibv_get_device_list"), "{e}"),
    }
}

#[test]
fn missing_or_foreign_plugin_is_a_reason() {
    let missing = VerbsOptions {
        plugin: Some(PathBuf::from("/nonexistent/dir/libbraid_ibverbs.so")),
        ..VerbsOptions::default()
    };
    match verbs::open(&missing) {
        Ok(_) => panic!("opened a nonexistent plugin"),
        Err(e) => {
            assert!(e.contains("not loadable"), "{e}");
            assert!(e.contains("/nonexistent/dir/libbraid_ibverbs.so"), "{e}");
        }
    }
    // A shared library that is not a braid plugin: loadable, but without the entry point.
    let libc_path = [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/libc.so.6",
        "/usr/lib/libc.so.6",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file());
    if let Some(p) = libc_path {
        let foreign = VerbsOptions {
            plugin: Some(p),
            ..VerbsOptions::default()
        };
        match verbs::open(&foreign) {
            Ok(_) => panic!("libc accepted as the verbs plugin"),
            Err(e) => assert!(e.contains("braid_ibverbs_plugin_v1"), "{e}"),
        }
    }
}

#[test]
fn libbraid_does_not_link_libibverbs() {
    let lib = libbraid();
    let out = ldd(&lib);
    assert!(
        !out.contains("libibverbs"),
        "{} links libibverbs:\n{out}",
        lib.display()
    );
    assert!(
        !out.contains("braid_ibverbs"),
        "{} links the plugin:\n{out}",
        lib.display()
    );
    // This test executable links braid-transport (the ib module with the verbs loader) and
    // does not need libibverbs either.
    if let Ok(exe) = std::env::current_exe() {
        let out = ldd(&exe);
        assert!(
            !out.contains("libibverbs"),
            "{} links libibverbs:\n{out}",
            exe.display()
        );
    }
}

#[test]
fn plugin_links_libibverbs() {
    let p = plugin();
    let out = ldd(&p);
    assert!(
        out.contains("libibverbs.so"),
        "{} does not link libibverbs:\n{out}",
        p.display()
    );
    assert!(
        !out.contains("not found"),
        "{} has unresolved dependencies:\n{out}",
        p.display()
    );
}
