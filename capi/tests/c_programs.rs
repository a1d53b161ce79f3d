//! Builds the C test programs of `tests/c/` against libbraid.so and runs them under braid-run
//! on 1-4 ranks; then installs braid with `make install` into a temporary prefix and builds
//! `examples/allreduce.c` with pkg-config.
//!
//! Needs `target/<profile>/braid-run` (`cargo build --workspace --bins`, as `make test` does)
//! and a C compiler (`cc`).

// Tests report failures by panicking; no user-reachable path is here.
#![allow(clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

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

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("braid-capi-{name}-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&d) {
        panic!("{}: {e}", d.display());
    }
    d
}

fn require(p: &Path, hint: &str) {
    assert!(p.exists(), "{} is missing: {hint}", p.display());
}

/// Runs a command to completion with a deadline; returns (success, combined output).
fn run(cmd: &mut Command, what: &str) -> (bool, String) {
    let out_path = scratch("out").join(format!("{}.log", what.replace(['/', ' '], "_")));
    let log = match std::fs::File::create(&out_path) {
        Ok(f) => f,
        Err(e) => panic!("{}: {e}", out_path.display()),
    };
    let log2 = match log.try_clone() {
        Ok(f) => f,
        Err(e) => panic!("{e}"),
    };
    let mut child = match cmd.stdout(log).stderr(log2).stdin(Stdio::null()).spawn() {
        Ok(c) => c,
        Err(e) => panic!("{what}: spawning: {e}"),
    };
    let deadline = Instant::now() + RUN_TIMEOUT;
    let ok = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let text = std::fs::read_to_string(&out_path).unwrap_or_default();
                panic!("{what}: no exit after {RUN_TIMEOUT:?}; output:\n{text}");
            }
            Err(e) => panic!("{what}: wait: {e}"),
        }
    };
    (ok, std::fs::read_to_string(&out_path).unwrap_or_default())
}

/// Builds libbraid.so/.a of this profile: `cargo test` builds this crate's library only as a
/// unit-test harness, so the cdylib may be missing or stale. Once per test process.
fn build_lib() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo())
            .args(["build", "-p", "braid-capi", "--lib"]);
        if target_dir().file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let (ok, out) = run(&mut cmd, "cargo build libbraid");
        assert!(ok, "cargo build -p braid-capi --lib:\n{out}");
    });
}

/// Compiles tests/c/<name>.c against the header and libbraid.so of this build.
fn build(name: &str, out_dir: &Path) -> PathBuf {
    build_lib();
    let target = target_dir();
    require(
        &target.join("libbraid.so"),
        "build the workspace (cargo build --workspace)",
    );
    let exe = out_dir.join(name);
    let src = repo().join("tests/c").join(format!("{name}.c"));
    let mut cmd = Command::new("cc");
    cmd.args(["-std=c11", "-g", "-pthread", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(repo().join("include"))
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .arg("-L")
        .arg(&target)
        .arg("-lbraid");
    let (ok, out) = run(&mut cmd, &format!("cc {name}"));
    assert!(ok, "compiling {}:\n{out}", src.display());
    exe
}

/// Runs `exe` on `n` ranks under braid-run with libbraid.so from `libdir`.
fn launch(exe: &Path, n: usize, libdir: &Path) -> (bool, String) {
    launch_env(exe, n, libdir, &[])
}

/// As [`launch`], with extra environment variables for every rank.
fn launch_env(exe: &Path, n: usize, libdir: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let braid_run = target_dir().join("braid-run");
    require(
        &braid_run,
        "build the binaries first: cargo build --workspace --bins",
    );
    let mut cmd = Command::new(&braid_run);
    cmd.arg("-n")
        .arg(n.to_string())
        .arg("--")
        .arg(exe)
        .env("LD_LIBRARY_PATH", libdir)
        .env("BRAID_TIMEOUT", "60")
        .env("BRAID_INIT_TIMEOUT", "60")
        .env_remove("BRAID_GROUP");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let name = exe.file_name().map(|s| s.to_string_lossy().into_owned());
    run(&mut cmd, &format!("{}-{n}", name.unwrap_or_default()))
}

fn check_program(name: &str, ranks: &[usize]) {
    let dir = scratch(name);
    let exe = build(name, &dir);
    for &n in ranks {
        let (ok, out) = launch(&exe, n, &target_dir());
        assert!(ok, "{name} on {n} ranks failed:\n{out}");
        assert_eq!(
            out.matches(&format!("{name} ok")).count(),
            n,
            "{name} on {n} ranks: not every rank reported success:\n{out}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn elastic_join_through_the_c_abi() {
    let dir = scratch("elastic");
    let exe = build("elastic", &dir);
    let mut cmd = Command::new(target_dir().join("braid-run"));
    cmd.args(["-n", "2", "--join", "1@1", "--"])
        .arg(&exe)
        .env("LD_LIBRARY_PATH", target_dir())
        .env("BRAID_TIMEOUT", "60")
        .env("BRAID_INIT_TIMEOUT", "60")
        .env("BRAID_TRANSPORT", "tcp")
        .env_remove("BRAID_GROUP");
    let (ok, out) = run(&mut cmd, "elastic");
    assert!(ok, "elastic failed:\n{out}");
    assert_eq!(out.matches("elastic ok").count(), 3, "{out}");
    assert_eq!(out.matches("1 view change(s)").count(), 2, "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn collectives() {
    check_program("collectives", &[1, 2, 3, 4]);
}

#[test]
fn p2p_ring_and_groups() {
    check_program("p2p", &[2, 3, 4]);
}

#[test]
fn nonblocking_overlap() {
    check_program("nonblocking", &[2, 3]);
}

#[test]
fn invalid_arguments_and_abort() {
    check_program("errors", &[1, 2, 3]);
}

/// Pipeline planning: closed-form plans and re-plans over explicit member lists, argument
/// errors with messages, plans over the view that agree on every rank (1-4 ranks, not
/// elastic: braid_pipeline_report is refused). Then the metric channel: on an elastic group
/// of 3, rank 1 reports four times the stage time of the others until the coordinator
/// publishes a re-weigh view; there its weight is the lowest and a re-plan gives it fewer
/// blocks.
#[test]
fn pipeline_plans_replans_and_reweigh() {
    check_program("pipeline", &[1, 2, 3, 4]);
    let dir = scratch("pipeline-elastic");
    let exe = build("pipeline", &dir);
    let elastic = dir.join("pipeline-elastic");
    if let Err(e) = std::fs::copy(&exe, &elastic) {
        panic!("{}: {e}", elastic.display());
    }
    let env = [("BRAID_ELASTIC", "1"), ("BRAID_TRANSPORT", "tcp")];
    let (ok, out) = launch_env(&elastic, 3, &target_dir(), &env);
    assert!(ok, "pipeline (elastic) failed:\n{out}");
    assert_eq!(out.matches("pipeline reweigh ok").count(), 3, "{out}");
    assert_eq!(out.matches("pipeline ok").count(), 3, "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mismatched_collective_fails_on_every_rank() {
    check_program("mismatch", &[2, 3]);
}

/// What the torch backend needs: int16, band/bor/bxor (refused on floats before anything is
/// sent), braid_wait_for, braid_igroup_end, and a coordinator from braid_coordinator_start
/// joined by two communicators on threads of each rank.
#[test]
fn backend_abi_int16_bitwise_wait_for_igroup_coordinator() {
    check_program("backend", &[1, 2, 3]);
}

/// braid_all_to_allv / braid_iall_to_allv (uneven, zero counts, argument errors, a count
/// mismatch giving "mismatch" on both ranks of the pair), braid_comm_split (colors, keys,
/// BRAID_SPLIT_NOCOLOR) and braid_comm_create_group (a subset in reversed order), interleaved
/// with collectives on the parent; the new communicators outlive the parent.
#[test]
fn all_to_allv_split_and_create_group() {
    check_program("groups", &[1, 2, 3, 4]);
}

/// Push/pull: `braid-run -n 4`, launcher indices 0 and 1 are servers, 2 and 3 workers, sync
/// mode with the large key split over both servers. Run twice: the default rule (sum), and a C
/// update callback given to braid_kv_server_start_with_update, which must win over
/// BRAID_PS_RULE (sgd would refuse the int64 key).
#[test]
fn push_pull_servers_and_workers() {
    let dir = scratch("kv");
    let exe = build("kv", &dir);
    for (what, callback, rule) in [("sum", "0", "sum"), ("callback", "1", "sgd:0.5")] {
        let done = dir.join(format!("done-{what}"));
        if let Err(e) = std::fs::create_dir_all(&done) {
            panic!("{}: {e}", done.display());
        }
        let done_s = done.to_string_lossy().into_owned();
        let env = [
            ("BRAID_GROUP", "kv"),
            ("BRAID_PS_MODE", "sync"),
            ("BRAID_PS_RULE", rule),
            ("BRAID_PS_PARTITION_BYTES", "1024"),
            ("BRAID_PS_REPLICAS", "1"),
            ("BRAID_KV_TEST_CALLBACK", callback),
            ("BRAID_KV_TEST_DIR", done_s.as_str()),
        ];
        let (ok, out) = launch_env(&exe, 4, &target_dir(), &env);
        assert!(ok, "kv ({what}) failed:\n{out}");
        assert_eq!(out.matches("kv ok").count(), 4, "kv ({what}):\n{out}");
        assert_eq!(
            out.matches("kv ok (server").count(),
            2,
            "kv ({what}):\n{out}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn make_install_and_pkg_config() {
    if Command::new("pkg-config")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("pkg-config not found (make deps installs it): skipping");
        return;
    }
    let profile = target_dir()
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "debug".into());
    let prefix = scratch("prefix");
    let mut make = Command::new("make");
    make.current_dir(repo())
        .arg("install")
        .arg(format!("PREFIX={}", prefix.display()))
        .arg(format!("PROFILE={profile}"))
        .arg("NO_BUILD=1");
    build_lib();
    let (ok, out) = run(&mut make, "make install");
    assert!(ok, "make install failed:\n{out}");
    let pc_path = prefix.join("lib/pkgconfig");
    let flags = match Command::new("pkg-config")
        .args(["--cflags", "--libs", "braid"])
        .env("PKG_CONFIG_PATH", &pc_path)
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => panic!("pkg-config braid: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => panic!("pkg-config: {e}"),
    };
    let exe = prefix.join("allreduce");
    let mut cc = Command::new("cc");
    cc.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&exe)
        .arg(repo().join("examples/allreduce.c"))
        .args(flags.split_whitespace());
    let (ok, out) = run(&mut cc, "cc allreduce");
    assert!(ok, "building examples/allreduce.c with `{flags}`:\n{out}");
    let (ok, out) = launch(&exe, 2, &prefix.join("lib"));
    assert!(ok, "examples/allreduce.c on 2 ranks:\n{out}");
    assert_eq!(out.matches("sum = 3 (expected 3)").count(), 2, "{out}");
    let _ = std::fs::remove_dir_all(&prefix);
}

/// The device-buffer entry points without a CUDA driver (this machine, CI): every `_stream`
/// form, braid_mem_alloc_device and braid_cuda_available report "no CUDA driver (libcuda.so.1
/// not found)" as braid_system_error; argument errors come first; host forms keep working.
#[test]
fn cuda_entry_points_without_a_driver() {
    check_program("cuda", &[1, 2]);
}
