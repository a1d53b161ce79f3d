//! include/braid.h is cbindgen's output for capi/src/lib.rs, committed; this test fails when
//! it is stale and rewrites it with `UPDATE_HEADER=1`. It also checks that the header compiles
//! as C11 and C++17 with -Wall -Wextra -Werror.

// Tests report failures by panicking; no user-reachable path is here.
#![allow(clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn capi_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn header_path() -> PathBuf {
    capi_dir().join("../include/braid.h")
}

fn generate() -> String {
    let dir = capi_dir();
    let config = match cbindgen::Config::from_file(dir.join("cbindgen.toml")) {
        Ok(c) => c,
        Err(e) => panic!("cbindgen.toml: {e}"),
    };
    let bindings = match cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
    {
        Ok(b) => b,
        Err(e) => panic!("cbindgen: {e}"),
    };
    let mut out = Vec::new();
    bindings.write(&mut out);
    match String::from_utf8(out) {
        Ok(s) => s,
        Err(e) => panic!("cbindgen output is not UTF-8: {e}"),
    }
}

#[test]
fn header_is_current() {
    let fresh = generate();
    let path = header_path();
    if std::env::var_os("UPDATE_HEADER").is_some_and(|v| v == "1") {
        if let Err(e) = std::fs::write(&path, &fresh) {
            panic!("writing {}: {e}", path.display());
        }
    } else {
        check_current(&fresh, &path);
    }
    compiles_as_c11_and_cpp17();
}

fn check_current(fresh: &str, path: &Path) {
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/braid.h is stale: regenerate it with \
         `UPDATE_HEADER=1 cargo test -p braid-capi --test header` and commit it"
    );
}

fn compile(compiler: &str, std: &str, ext: &str, out_dir: &Path) {
    let src = out_dir.join(format!("inc.{ext}"));
    let body = "#include <braid.h>\n\
        int main(void) {\n\
            braid_config_t c = BRAID_CONFIG_INITIALIZER;\n\
            int v = 0;\n\
            (void)c;\n\
            if (braid_get_version(&v) != braid_success) return 1;\n\
            return v == BRAID_VERSION_CODE ? 0 : 1;\n\
        }\n";
    let body = if ext == "cpp" {
        body.replace("main(void)", "main()")
    } else {
        body.to_string()
    };
    if let Err(e) = std::fs::write(&src, body) {
        panic!("writing {}: {e}", src.display());
    }
    let include = capi_dir().join("../include");
    let out = Command::new(compiler)
        .arg(format!("-std={std}"))
        .args([
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-fsyntax-only",
            "-I",
        ])
        .arg(&include)
        .arg(&src)
        .output();
    match out {
        Ok(o) => assert!(
            o.status.success(),
            "{compiler} -std={std} rejects braid.h:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("running {compiler}: {e}"),
    }
}

/// The header compiles as C11 and C++17 with -Wall -Wextra -Werror -pedantic. Called from
/// header_is_current, so that it sees the header that test may just have written.
fn compiles_as_c11_and_cpp17() {
    let dir = std::env::temp_dir().join(format!("braid-header-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("{}: {e}", dir.display());
    }
    compile("gcc", "c11", "c", &dir);
    compile("g++", "c++17", "cpp", &dir);
    let _ = std::fs::remove_dir_all(&dir);
}
