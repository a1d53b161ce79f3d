//! `braid-coordinator`: the standalone braid membership service.
//!
//! Runs a [`braid::membership::Coordinator`] until SIGINT or SIGTERM. Prints
//! `braid-coordinator listening on ADDR` on stdout once bound; logs go to stderr, filtered by
//! `BRAID_LOG` (default `warn`).

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use braid::membership::bench::{BenchOptions, MEMBERS_SUBCOMMAND};
use braid::membership::Coordinator;

const USAGE: &str = "\
usage: braid-coordinator [--bind HOST:PORT] [--state FILE]
       braid-coordinator status HOST:PORT [--json]
       braid-coordinator bench --members N [--procs P] [--rounds R] [--window-ms MS]
                               [--storm K] [--steady-s S] [--timeout-s S]
                               [--views notice|delta|whole]
       braid-coordinator bench --state-machine N

Runs the braid membership service (rendezvous of ranks, elastic views, heartbeats) until
SIGINT or SIGTERM. Ranks find it through BRAID_COORDINATOR=HOST:PORT.

options:
  --bind HOST:PORT   address to listen on (default 0.0.0.0:29400; port 0 picks a free one)
  --state FILE       persist the member-id high-water mark and the views in FILE, and restore
                     them at start (default: BRAID_COORDINATOR_STATE); members reconnect to a
                     restarted coordinator and ids are never reused
  -h, --help         this text

`status HOST:PORT` asks a running coordinator for its groups: current view (epoch, members
with rank, id, host, pid, weight, heartbeat age), waiting joiners, the last push/pull
checkpoint a member reported (version, time, directory) and the history of epochs with their
reasons (initial, join, leave, failure, reweigh); as text, or the raw JSON with --json.

`bench` measures a coordinator in this process with N simulated light members (real sockets,
heartbeats at BRAID_HEARTBEAT's default interval) in P child processes (default 2): formation,
R single joins (default 5), S seconds of steady heartbeats (default 5; the coordinator
process's CPU), a storm of K joiners in one batching window (default 1000; MS default 500).
--views says what members receive at a view change: `notice` (default: light members, a
notice of epoch, size and rank), `delta` (full members: the first view whole, then view
deltas) or `whole` (full members without deltas: every view whole); each join round prints the
view bytes all members read. It prints its tables, then one line
`members=N join_view_ms=X storm_1000_ms=Y heartbeat_cpu_pct=Z` (nan: not measured).
`bench --state-machine N` times the membership state machine alone (no sockets, no disk) with
one elastic group of N members: a heartbeat, an acknowledgement, one join decision and one
failure decision; it ends with one line
`state_machine members=N join_decision_ms=X failure_decision_ms=Y`.

BRAID_JOB_TOKEN: when set, clients must prove the token (HMAC-SHA256 challenge-response; the
token never crosses the wire); `status` uses it too. Without it, listening on an address other
than loopback prints a warning on stderr.
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

/// `braid-coordinator status ADDR [--json]`.
fn status(args: &[String]) -> ExitCode {
    let mut addr = None;
    let mut json = false;
    for a in args {
        match a.as_str() {
            "--json" => json = true,
            s if !s.starts_with('-') && addr.is_none() => addr = Some(s.to_string()),
            other => {
                eprintln!("braid-coordinator status: unexpected argument {other:?}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(addr) = addr else {
        eprintln!("braid-coordinator status: needs HOST:PORT\n\n{USAGE}");
        return ExitCode::from(2);
    };
    let token = braid::config::var("BRAID_JOB_TOKEN");
    let st = match braid::membership::coordinator_status(
        &addr,
        token.as_deref().map(str::as_bytes),
        Duration::from_secs(10),
    ) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("braid-coordinator status: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&st).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    let _ = writeln!(
        out,
        "coordinator {addr}: next member id {}",
        st["next_member_id"]
    );
    for g in st["groups"].as_array().cloned().unwrap_or_default() {
        let _ = writeln!(
            out,
            "group {} ({}): epoch {} size {}",
            g["group"].as_str().unwrap_or("?"),
            if g["elastic"] == true {
                "elastic"
            } else {
                "fixed"
            },
            g["epoch"],
            g["size"]
        );
        let _ = writeln!(
            out,
            "  {:>5} {:>8} {:<20} {:>8} {:>7} {:>8} {:>10} {:>9}",
            "rank", "id", "host", "pid", "role", "weight", "heartbeat", "state"
        );
        for m in g["members"].as_array().cloned().unwrap_or_default() {
            let age = m["heartbeat_age_s"]
                .as_f64()
                .map_or("-".to_string(), |a| format!("{a:.1} s"));
            let state = if m["alive"] == false {
                "dead"
            } else if m["leaving"] == true {
                "leaving"
            } else if m["connected"] == false {
                "away"
            } else {
                "ok"
            };
            let weight = m["weight"]
                .as_f64()
                .map_or("-".to_string(), |w| format!("{w:.3}"));
            let _ = writeln!(
                out,
                "  {:>5} {:>8} {:<20} {:>8} {:>7} {:>8} {:>10} {:>9}",
                m["rank"].to_string(),
                m["id"].to_string(),
                m["host"].as_str().unwrap_or("?"),
                m["pid"].to_string(),
                m["role"].as_str().unwrap_or("?"),
                weight,
                age,
                state
            );
        }
        for j in g["joiners"].as_array().cloned().unwrap_or_default() {
            let _ = writeln!(
                out,
                "  joiner {} (host {}, pid {}) waiting",
                j["id"],
                j["host"].as_str().unwrap_or("?"),
                j["pid"]
            );
        }
        match g["checkpoint"].as_object() {
            Some(c) => {
                let version = match (c["version"].as_u64(), c["max_version"].as_u64()) {
                    (Some(a), Some(b)) if a != b => format!("{a} (parts up to {b})"),
                    (Some(a), _) => a.to_string(),
                    _ => "?".into(),
                };
                let _ = writeln!(
                    out,
                    "  last checkpoint: version {version} at {:.3} in {} (id {}, {} parts, {} bytes, member {})",
                    c["at"].as_f64().unwrap_or(0.0),
                    c["dir"].as_str().unwrap_or("?"),
                    c["id"].as_str().unwrap_or("?"),
                    c["parts"],
                    c["bytes"],
                    c["member"]
                );
            }
            None => {
                let _ = writeln!(out, "  last checkpoint: none");
            }
        }
        let _ = writeln!(out, "  history:");
        for h in g["history"].as_array().cloned().unwrap_or_default() {
            let _ = writeln!(
                out,
                "    epoch {:>4} size {:>5} at {:.3}: {}",
                h["epoch"].to_string(),
                h["size"].to_string(),
                h["at"].as_f64().unwrap_or(0.0),
                h["reason"].as_str().unwrap_or("")
            );
        }
    }
    ExitCode::SUCCESS
}

/// `braid-coordinator bench ...`.
fn bench(args: &[String]) -> ExitCode {
    let filter = braid::config::var("BRAID_LOG").unwrap_or_else(|| "warn".into());
    braid::config::init_logging(&filter);
    if args.first().map(String::as_str) == Some("--state-machine") {
        let n = match args.get(1).map(|v| v.parse::<usize>()) {
            Some(Ok(n)) if args.len() == 2 => n,
            _ => {
                eprintln!("braid-coordinator bench: --state-machine needs one count\n\n{USAGE}");
                return ExitCode::from(2);
            }
        };
        return match braid::membership::bench::state_machine_bench(n) {
            Ok(r) => {
                let _ = writeln!(std::io::stdout().lock(), "{r}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("braid-coordinator bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let parsed = (|| -> Result<BenchOptions, String> {
        let mut members = None;
        let mut o = BenchOptions::new(1);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = |name: &str| -> Result<f64, String> {
                let v = it.next().ok_or_else(|| format!("{name} needs a value"))?;
                let x: f64 = v.parse().map_err(|e| format!("{name} {v:?}: {e}"))?;
                if x.is_finite() && x >= 0.0 {
                    Ok(x)
                } else {
                    Err(format!("{name} {v:?}: not a count"))
                }
            };
            match a.as_str() {
                "--members" => members = Some(val(a)? as usize),
                "--procs" => o.procs = val(a)? as usize,
                "--rounds" => o.rounds = val(a)? as usize,
                "--window-ms" => o.join_window_ms = val(a)? as u64,
                "--storm" => o.storm = val(a)? as usize,
                "--steady-s" => o.steady = Duration::from_secs_f64(val(a)?),
                "--timeout-s" => o.phase_timeout = Duration::from_secs_f64(val(a)?),
                "--views" => {
                    let v = it.next().ok_or("--views needs a value")?;
                    o.views =
                        braid::membership::bench::Views::parse(v).map_err(|e| e.to_string())?;
                }
                other => return Err(format!("unexpected argument {other:?}")),
            }
        }
        o.members = members.ok_or("needs --members N")?;
        Ok(o)
    })();
    let opts = match parsed {
        Ok(o) => o,
        Err(e) => {
            eprintln!("braid-coordinator bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "braid-coordinator bench: cannot find this program to start the members: {e}"
            );
            return ExitCode::FAILURE;
        }
    };
    match braid::membership::bench::coordinator_bench(&opts, &exe) {
        Ok(r) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{r}");
            let _ = writeln!(out, "{}", r.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("braid-coordinator bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The hidden `bench-members` subcommand: a member process of `bench`.
fn bench_members(args: &[String]) -> ExitCode {
    let filter = braid::config::var("BRAID_LOG").unwrap_or_else(|| "warn".into());
    braid::config::init_logging(&filter);
    let r = braid::membership::bench::MembersOptions::from_args(args)
        .and_then(braid::membership::bench::run_members);
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("braid-coordinator {MEMBERS_SUBCOMMAND}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match argv.first().map(String::as_str) {
        Some("status") => return status(&argv[1..]),
        Some("bench") => return bench(&argv[1..]),
        Some(MEMBERS_SUBCOMMAND) => return bench_members(&argv[1..]),
        _ => {}
    }
    let mut bind = String::from("0.0.0.0:29400");
    let mut opts = braid::membership::CoordinatorOptions::from_env();
    let mut args = argv.into_iter();
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
            "--state" => match args.next() {
                Some(v) => opts.state_file = Some(v.into()),
                None => {
                    eprintln!("braid-coordinator: --state needs FILE\n\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            other => {
                eprintln!("braid-coordinator: unknown argument {other:?}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let filter = braid::config::var("BRAID_LOG").unwrap_or_else(|| "warn".into());
    braid::config::init_logging(&filter);
    install_handlers();

    let has_token = opts.job_token.is_some();
    let mut coord = match Coordinator::bind_with(&bind, opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("braid-coordinator: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !has_token && !coord.local_addr().ip().is_loopback() {
        eprintln!(
            "braid-coordinator: warning: listening on {} without a job token: anyone who can reach this port can register in or disturb a job; set BRAID_JOB_TOKEN to the same secret here and in every rank's environment",
            coord.local_addr()
        );
    }
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
