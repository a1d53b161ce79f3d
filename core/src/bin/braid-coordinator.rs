//! `braid-coordinator`: the standalone braid membership service.
//!
//! Runs a [`braid::membership::Coordinator`] until SIGINT or SIGTERM. Prints
//! `braid-coordinator listening on ADDR` on stdout once bound; logs go to stderr, filtered by
//! `BRAID_LOG` (default `warn`).

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use braid::membership::Coordinator;

const USAGE: &str = "\
usage: braid-coordinator [--bind HOST:PORT]

Runs the braid membership service (rendezvous of ranks) until SIGINT or SIGTERM.
Ranks find it through BRAID_COORDINATOR=HOST:PORT.

options:
  --bind HOST:PORT   address to listen on (default 0.0.0.0:29400; port 0 picks a free one)
  -h, --help         this text

Prints `braid-coordinator listening on ADDR` on stdout once bound.
Logs go to stderr; BRAID_LOG sets the filter (e.g. info, braid::membership=debug).
";

/// The last signal received (0: none). Written only by the signal handler.
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

fn install_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: FFI; `on_signal` is an `extern "C" fn(c_int)` that only stores to an atomic,
        // which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

fn main() -> ExitCode {
    let mut bind = String::from("0.0.0.0:29400");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--bind" => match args.next() {
                Some(v) => bind = v,
                None => {
                    eprintln!("braid-coordinator: --bind needs HOST:PORT\n\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            s if s.starts_with("--bind=") => bind = s["--bind=".len()..].to_string(),
            other => {
                eprintln!("braid-coordinator: unknown argument {other:?}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let filter = std::env::var("BRAID_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "warn".into());
    braid::config::init_logging(&filter);
    install_handlers();

    let mut coord = match Coordinator::bind(&bind) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("braid-coordinator: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "braid-coordinator listening on {}", coord.local_addr());
    let _ = out.flush();
    drop(out);

    while SIGNAL.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let sig = SIGNAL.load(Ordering::SeqCst);
    tracing::info!(target: "braid::membership", "signal {sig}: stopping the coordinator");
    coord.shutdown();
    ExitCode::SUCCESS
}
