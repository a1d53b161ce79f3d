//! `braid-run`: starts N local ranks of a command, like `mpirun -n N` or `torchrun
//! --nproc-per-node N`.
//!
//! It starts an embedded coordinator on 127.0.0.1 (unless `--coordinator` names one), spawns
//! the ranks with the `BRAID_*` rendezvous variables set, prefixes their output lines with
//! `[rank] `, and stops all ranks when one fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use braid::membership::Coordinator;

const USAGE: &str = "\
usage: braid-run -n N [--coordinator HOST:PORT] [--] CMD [ARGS...]

Starts N processes of CMD on this host, one per rank, and waits for them.

options:
  -n, --nproc N              number of ranks to start (1 or more)
  --coordinator HOST:PORT    use this coordinator instead of starting one on 127.0.0.1
  -h, --help                 this text

Each rank gets BRAID_COORDINATOR, BRAID_WORLD_SIZE=N, BRAID_RANK=i, BRAID_LOCAL_RANK=i,
BRAID_LOCAL_SIZE=N and LOCAL_RANK=i in its environment; its stdin is /dev/null. Every line
a rank writes to stdout (stderr) appears on braid-run's stdout (stderr) prefixed with `[i] `.

If a rank fails (non-zero exit or a signal), the others get SIGTERM, then SIGKILL after 3 s,
and braid-run exits with the failed rank's exit code (128+signal if it was killed). SIGINT
and SIGTERM sent to braid-run are forwarded to the ranks. Exit 0 when all ranks exited 0.
";

/// Grace period between SIGTERM and SIGKILL when stopping ranks.
const KILL_GRACE: Duration = Duration::from_secs(3);
/// How long to wait for the output of exited ranks to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

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

/// Sends `sig` to the process group of a rank (each rank leads its own group, so helpers it
/// started are reached too).
fn signal_group(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: FFI; kill(2) takes plain integers. `-pid` names the process group led by the
    // rank, which is still our unreaped child (so the id cannot have been reused).
    unsafe {
        libc::kill(-pid, sig);
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        _ => "unknown signal",
    }
}

/// `exited with status 3` / `was killed by signal 9 (SIGKILL)`.
fn describe(st: &ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!(
            "was killed by signal {s} ({}){}",
            signal_name(s),
            if st.core_dumped() {
                " (core dumped)"
            } else {
                ""
            }
        ),
        _ => format!("ended ({st})"),
    }
}

fn exit_code_of(st: &ExitStatus) -> u8 {
    match (st.code(), st.signal()) {
        (Some(c), _) => u8::try_from(c & 0xff).unwrap_or(1).max(1),
        (None, Some(s)) => u8::try_from((128 + s).min(255)).unwrap_or(255),
        _ => 1,
    }
}

struct Opts {
    n: usize,
    coordinator: Option<String>,
    cmd: Vec<String>,
}

/// `Ok(None)`: help was asked for.
fn parse_args(args: Vec<String>) -> Result<Option<Opts>, String> {
    let mut n: Option<usize> = None;
    let mut coordinator = None;
    let mut it = args.into_iter();
    let parse_n = |v: &str| -> Result<usize, String> {
        match v.parse::<usize>() {
            Ok(k) if (1..=65536).contains(&k) => Ok(k),
            _ => Err(format!("-n {v}: expected a number of ranks, 1 or more")),
        }
    };
    let mut cmd = Vec::new();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--" => {
                cmd.extend(it.by_ref());
                break;
            }
            "-n" | "--nproc" => {
                let v = it.next().ok_or_else(|| format!("{a} needs a number"))?;
                n = Some(parse_n(&v)?);
            }
            "--coordinator" => {
                coordinator = Some(it.next().ok_or("--coordinator needs HOST:PORT")?);
            }
            s if s.starts_with("--nproc=") => n = Some(parse_n(&s["--nproc=".len()..])?),
            s if s.starts_with("--coordinator=") => {
                coordinator = Some(s["--coordinator=".len()..].to_string())
            }
            s if s.starts_with("-n") && s.len() > 2 => n = Some(parse_n(&s[2..])?),
            s if s.starts_with('-') => return Err(format!("unknown option {s:?}")),
            _ => {
                cmd.push(a);
                cmd.extend(it.by_ref());
                break;
            }
        }
    }
    let n = n.ok_or("missing -n N (number of ranks)")?;
    if cmd.is_empty() {
        return Err("missing the command to run".into());
    }
    Ok(Some(Opts {
        n,
        coordinator,
        cmd,
    }))
}

/// Copies lines from a rank's pipe to our stdout or stderr with a `[rank] ` prefix; each line
/// is written with one call under the stream's lock, so lines of different ranks never mix.
fn pump(rank: usize, src: impl Read, to_stderr: bool) {
    let mut r = BufReader::new(src);
    let mut line = Vec::new();
    let prefix = format!("[{rank}] ");
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {
                let mut out = Vec::with_capacity(prefix.len() + line.len() + 1);
                out.extend_from_slice(prefix.as_bytes());
                out.extend_from_slice(&line);
                if !line.ends_with(b"\n") {
                    out.push(b'\n');
                }
                // Write errors (closed stdout) are ignored: keep draining so the rank never
                // blocks on a full pipe.
                if to_stderr {
                    let _ = std::io::stderr().lock().write_all(&out);
                } else {
                    let mut o = std::io::stdout().lock();
                    let _ = o.write_all(&out);
                    let _ = o.flush();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

struct Rank {
    child: Child,
    pid: u32,
    status: Option<ExitStatus>,
}

fn spawn_rank(
    opts: &Opts,
    addr: &str,
    i: usize,
    pumps: &mut Vec<JoinHandle<()>>,
) -> std::io::Result<Rank> {
    let mut cmd = Command::new(&opts.cmd[0]);
    cmd.args(&opts.cmd[1..])
        .env("BRAID_COORDINATOR", addr)
        .env("BRAID_WORLD_SIZE", opts.n.to_string())
        .env("BRAID_RANK", i.to_string())
        .env("BRAID_LOCAL_RANK", i.to_string())
        .env("BRAID_LOCAL_SIZE", opts.n.to_string())
        .env("LOCAL_RANK", i.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
    // is async-signal-safe. It makes the rank receive SIGTERM if braid-run dies (ranks lead
    // their own process groups, so they would otherwise outlive it).
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    if let Some(out) = child.stdout.take() {
        if let Ok(h) = std::thread::Builder::new()
            .name(format!("braid-run-out-{i}"))
            .spawn(move || pump(i, out, false))
        {
            pumps.push(h);
        }
    }
    if let Some(err) = child.stderr.take() {
        if let Ok(h) = std::thread::Builder::new()
            .name(format!("braid-run-err-{i}"))
            .spawn(move || pump(i, err, true))
        {
            pumps.push(h);
        }
    }
    Ok(Rank {
        child,
        pid,
        status: None,
    })
}

/// Waits for all ranks; stops the others when one fails. Returns the first failure.
fn supervise(ranks: &mut [Rank]) -> Option<(usize, ExitStatus)> {
    let mut failed: Option<(usize, ExitStatus)> = None;
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;
    loop {
        let sig = SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            eprintln!(
                "braid-run: got signal {sig} ({}); forwarding it to the ranks",
                signal_name(sig)
            );
            for r in ranks.iter().filter(|r| r.status.is_none()) {
                signal_group(r.pid, sig);
            }
        }
        for i in 0..ranks.len() {
            if ranks[i].status.is_some() {
                continue;
            }
            let st = match ranks[i].child.try_wait() {
                Ok(Some(st)) => st,
                Ok(None) => continue,
                Err(e) => {
                    eprintln!("braid-run: cannot wait for rank {i}: {e}");
                    continue;
                }
            };
            ranks[i].status = Some(st);
            if !st.success() && failed.is_none() {
                failed = Some((i, st));
                eprintln!(
                    "braid-run: rank {i} (pid {}) {}",
                    ranks[i].pid,
                    describe(&st)
                );
                let others: Vec<&Rank> = ranks.iter().filter(|r| r.status.is_none()).collect();
                if !others.is_empty() {
                    eprintln!("braid-run: stopping the other ranks");
                    for r in others {
                        signal_group(r.pid, libc::SIGTERM);
                    }
                    kill_at = Some(Instant::now() + KILL_GRACE);
                }
            }
        }
        if ranks.iter().all(|r| r.status.is_some()) {
            return failed;
        }
        if let Some(t) = kill_at {
            if !killed && Instant::now() >= t {
                killed = true;
                for (i, r) in ranks.iter().enumerate().filter(|(_, r)| r.status.is_none()) {
                    eprintln!(
                        "braid-run: rank {i} (pid {}) did not stop within {} s of SIGTERM; killing it",
                        r.pid,
                        KILL_GRACE.as_secs()
                    );
                    signal_group(r.pid, libc::SIGKILL);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1).collect()) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("braid-run: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let filter = std::env::var("BRAID_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "warn".into());
    braid::config::init_logging(&filter);
    install_handlers();

    let mut _coordinator: Option<Coordinator> = None;
    let addr = match &opts.coordinator {
        Some(a) => a.clone(),
        None => match Coordinator::bind("127.0.0.1:0") {
            Ok(c) => {
                let a = c.local_addr().to_string();
                _coordinator = Some(c);
                a
            }
            Err(e) => {
                eprintln!("braid-run: cannot start the coordinator: {e}");
                return ExitCode::FAILURE;
            }
        },
    };

    let mut ranks = Vec::with_capacity(opts.n);
    let mut pumps = Vec::new();
    for i in 0..opts.n {
        match spawn_rank(&opts, &addr, i, &mut pumps) {
            Ok(r) => ranks.push(r),
            Err(e) => {
                eprintln!("braid-run: cannot start rank {i} ({}): {e}", opts.cmd[0]);
                for r in &ranks {
                    signal_group(r.pid, libc::SIGKILL);
                }
                for r in &mut ranks {
                    let _ = r.child.wait();
                }
                return ExitCode::from(127);
            }
        }
    }

    let failed = supervise(&mut ranks);

    // Let the output of the ranks drain (a helper a rank left behind may keep a pipe open;
    // do not wait for it forever).
    let drain_end = Instant::now() + DRAIN_TIMEOUT;
    while pumps.iter().any(|h| !h.is_finished()) && Instant::now() < drain_end {
        std::thread::sleep(Duration::from_millis(5));
    }
    for h in pumps.into_iter().filter(|h| h.is_finished()) {
        let _ = h.join();
    }
    let _ = std::io::stdout().flush();
    drop(_coordinator);

    match failed {
        Some((_, st)) => ExitCode::from(exit_code_of(&st)),
        None => ExitCode::SUCCESS,
    }
}
