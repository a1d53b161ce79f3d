//! Every environment variable is read through the one configuration table
//! (`braid::config::var`, `Config::from_env`): a scan of the sources for environment reads
//! outside `core/src/config.rs`, and the unknown-name warning.
//!
//! Run: `cargo test -p braid --test runtime_env`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

/// Environment reads outside config.rs that are justified, as (path from the workspace root,
/// text of the line with the read).
const ALLOWED: &[(&str, &str)] = &[
    // A benchmark knob of the shm transport's own unit tests (inside #[cfg(test)]); the
    // transport crate sits below braid's configuration and never reads the environment
    // otherwise.
    (
        "transport/src/shm.rs",
        "if std::env::var_os(\"BRAID_SHM_BENCH\").is_none() {",
    ),
    ("transport/src/shm.rs", "std::env::var(\"BRAID_SHM_BENCH\")"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The environment reads in `text`: (line number, line) of every call of `env::var`,
/// `env::var_os`, `env::vars`, `env::vars_os`, `getenv`, or of `var`/`var_os` imported from
/// `std::env`.
fn env_reads(text: &str) -> Vec<(usize, String)> {
    let imported = text.lines().any(|l| {
        let l = l.trim();
        l.starts_with("use std::env::") && (l.contains("var") || l.contains('*'))
    });
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let squeezed: String = code.chars().filter(|c| !c.is_whitespace()).collect();
        let hit = [
            "env::var(",
            "env::var_os(",
            "env::vars(",
            "env::vars_os(",
            "getenv(",
        ]
        .iter()
        .any(|p| squeezed.contains(p))
            || (imported
                && ["var(", "var_os(", "vars(", "vars_os("].iter().any(|p| {
                    squeezed.match_indices(p).any(|(at, _)| {
                        // A bare call, not a method or another name ending in `var`.
                        at == 0
                            || !squeezed.as_bytes()[at - 1].is_ascii_alphanumeric()
                                && squeezed.as_bytes()[at - 1] != b'_'
                                && squeezed.as_bytes()[at - 1] != b'.'
                                && squeezed.as_bytes()[at - 1] != b':'
                    })
                }));
        if hit {
            out.push((i + 1, line.trim().to_string()));
        }
    }
    out
}

#[test]
fn the_scanner_finds_environment_reads() {
    let src = "fn f() {\n    let a = std::env::var(\"BRAID_X\");\n    let b = std::env::var_os(\n        \"BRAID_Y\");\n    let c = env :: vars();\n    let d = braid::config::var(\"BRAID_Z\"); // not a raw read\n}\n";
    let got: Vec<usize> = env_reads(src).into_iter().map(|(l, _)| l).collect();
    assert_eq!(got, vec![2, 3, 5]);
    let imported = "use std::env::var;\nfn f() { let a = var(\"X\"); let b = x.var(\"Y\"); }\n";
    assert_eq!(env_reads(imported).len(), 1);
}

#[test]
fn no_environment_variable_is_read_outside_the_config_table() {
    let root = root();
    let mut files = Vec::new();
    for d in ["core/src", "capi/src", "perf/src", "transport/src"] {
        rust_files(&root.join(d), &mut files);
    }
    assert!(files.len() > 20, "{} files", files.len());
    let mut bad = Vec::new();
    for f in &files {
        let rel = f
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if rel == "core/src/config.rs" {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for (line, code) in env_reads(&text) {
            let allowed = ALLOWED.iter().any(|(p, l)| *p == rel && code.contains(l));
            if !allowed {
                bad.push(format!("{rel}:{line}: {code}"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "environment read outside core/src/config.rs (use braid::config::var and add a row to \
         config::VARS):\n{}",
        bad.join("\n")
    );
}

#[test]
fn every_braid_name_in_the_sources_is_in_the_table() {
    // A `"BRAID_..."` string literal in the library sources names a variable of the table
    // (whatever reads it), so that the unknown-name warning never fires for braid's own names.
    let root = root();
    let mut files = Vec::new();
    for d in ["core/src", "capi/src", "perf/src"] {
        rust_files(&root.join(d), &mut files);
    }
    let known: Vec<&str> = braid::config::VARS.iter().map(|v| v.name).collect();
    let mut bad = Vec::new();
    for f in &files {
        // config.rs holds the table itself (and names of its own tests).
        if f.ends_with("core/src/config.rs") {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for (i, _) in text.match_indices("\"BRAID_") {
            let name: String = text[i + 1..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            let whole = text[i + 1 + name.len()..].starts_with('"');
            if whole && name.len() > "BRAID_".len() && !known.contains(&name.as_str()) {
                bad.push(format!("{}: {name}", f.display()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "names not in config::VARS:\n{}",
        bad.join("\n")
    );
}

#[test]
fn unknown_braid_names_are_reported_and_refused() {
    // Run in a child process: the environment of this test process is shared by its threads.
    if std::env::var_os("RUNTIME_ENV_CHILD").is_some() {
        // Config::from_env says so on stderr (through the BRAID_LOG logger it installs).
        let c = braid::Config::from_env().unwrap();
        assert_eq!(c.group, "g7");
        let unknown = braid::config::warn_unknown_vars();
        assert_eq!(unknown, vec!["BRAID_TIMEOUTT".to_string()]);
        // A name outside the table is never read, even when it is set.
        assert_eq!(braid::config::var("RUNTIME_ENV_CHILD"), None);
        assert_eq!(braid::config::var("BRAID_TIMEOUTT"), None);
        assert_eq!(braid::config::var("BRAID_GROUP").as_deref(), Some("g7"));
        return;
    }
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "unknown_braid_names_are_reported_and_refused",
        "--nocapture",
    ])
    .env("RUNTIME_ENV_CHILD", "1")
    .env("BRAID_TIMEOUTT", "5")
    .env("BRAID_GROUP", "g7");
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("BRAID_") && k != "BRAID_GROUP" && k != "BRAID_TIMEOUTT" {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{}\n{stderr}",
        String::from_utf8_lossy(&out.stdout),
    );
    assert!(
        stderr.contains("unknown environment variable BRAID_TIMEOUTT"),
        "{stderr}"
    );
    assert!(
        stderr.contains("RUNTIME_ENV_CHILD is not in braid's configuration table"),
        "{stderr}"
    );
}

#[test]
fn bad_durations_in_the_environment_are_errors_not_panics() {
    // Config::from_env through the real environment (a child process per value).
    if let Some(v) = std::env::var_os("RUNTIME_ENV_TIMEOUT_CHILD") {
        let v = v.to_string_lossy().into_owned();
        let r = std::panic::catch_unwind(braid::Config::from_env);
        let e = r
            .unwrap_or_else(|_| panic!("BRAID_TIMEOUT={v}: panicked"))
            .expect_err("accepted");
        assert!(e.to_string().contains("BRAID_TIMEOUT"), "{e}");
        return;
    }
    for v in ["1e30", "-1", "NaN", "inf", "-inf", "1e-300"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "bad_durations_in_the_environment_are_errors_not_panics",
                "--nocapture",
            ])
            .env("RUNTIME_ENV_TIMEOUT_CHILD", v)
            .env("BRAID_TIMEOUT", v)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "BRAID_TIMEOUT={v}:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
