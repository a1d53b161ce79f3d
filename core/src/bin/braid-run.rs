//! `braid-run`: starts N local ranks of a command, like `mpirun -n N` or `torchrun
//! --nproc-per-node N`.
//!
//! It starts an embedded coordinator on 127.0.0.1 (unless `--coordinator` names one), spawns
//! the ranks with the `BRAID_*` rendezvous variables set, prefixes their output lines with
//! `[rank] `, and stops all ranks when one fails.
//!
//! Elastic drills: `--join K@T` starts K more processes (joiners, admitted by the coordinator)
//! T seconds after the start, and `--kill R@T` sends SIGKILL to the process started as rank R
//! at time T. Killed processes do not count as failures.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use braid::membership::Coordinator;

const USAGE: &str = "\
usage: braid-run -n N [--coordinator HOST:PORT] [--join K@SECONDS]... [--kill RANK@SECONDS]...
                 [--] CMD [ARGS...]

Starts N processes of CMD on this host, one per rank, and waits for them.

options:
  -n, --nproc N              number of ranks to start (1 or more)
  --coordinator HOST:PORT    use this coordinator instead of starting one on 127.0.0.1
  --join K@SECONDS           start K more processes (1 or more) as joiners SECONDS (a decimal
                             number, 0 or more) after the start; repeatable
  --kill RANK@SECONDS        send SIGKILL to rank RANK (0 <= RANK < N) SECONDS after the
                             start, a resilience drill; repeatable. RANK means rank RANK at
                             start: ranks change when the view changes, but processes keep
                             their launcher index, and the process killed is the one started
                             as rank RANK (launcher index RANK)
  -h, --help                 this text

Each rank gets BRAID_COORDINATOR, BRAID_WORLD_SIZE=N, BRAID_RANK=i, BRAID_LOCAL_RANK=i,
BRAID_LOCAL_SIZE=N, LOCAL_RANK=i and BRAID_RUN_INDEX=i in its environment; its stdin is
/dev/null. Every line a rank writes to stdout (stderr) appears on braid-run's stdout (stderr)
prefixed with `[i] `.

With --join or --kill the job is elastic: every process also gets BRAID_ELASTIC=1. Joiners
get launcher indices j = N, N+1, ... in the order they start, and BRAID_COORDINATOR,
BRAID_WORLD_SIZE=N (the initial size), BRAID_ELASTIC=1, BRAID_RUN_INDEX=j,
BRAID_LOCAL_RANK=j, LOCAL_RANK=j, BRAID_LOCAL_SIZE=(N + all joiners) and no BRAID_RANK (the
coordinator assigns their rank when it admits them); their output is prefixed with `[j] `.
Scheduled joins and kills that are due after every process has exited are dropped.

If a process fails (non-zero exit or a signal) the others get SIGTERM, then SIGKILL after
3 s, and no more joiners are started. The verdict names the process that failed first: of
the failures seen within 2 s of the first one, a death by a signal braid-run did not send
(a crash, kill -9) before a non-zero exit (ranks that exit because a peer died are
consequences), then the earliest; braid-run exits with that process's exit code (128+signal
if it was killed). Processes killed by --kill are not failures. SIGINT and SIGTERM sent to
braid-run are forwarded to the processes. Exit 0 when every process that braid-run did not
kill exited 0.

When braid-run starts the coordinator (no --coordinator) and BRAID_JOB_TOKEN is not set, it
generates a random job token (32 random bytes, hex) for the coordinator and every process,
so the job's coordinator and data connections are authenticated. With --coordinator the
environment's BRAID_JOB_TOKEN (if any) is passed on unchanged.
";

/// Grace period between SIGTERM and SIGKILL when stopping ranks.
const KILL_GRACE: Duration = Duration::from_secs(3);
/// How long to wait for the output of exited ranks to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Failures seen within this window of the first one compete for the verdict: the reaper may
/// see a killed rank and the peers that exit because of it in either order, and on a loaded
/// host a killed process can take long to finish dying (its sockets close, its peers see that
/// and exit, before it becomes a zombie). The verdict is given when every process has ended
/// or the window has passed, whichever comes first.
const VERDICT_WINDOW: Duration = Duration::from_secs(2);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The end of a child, as the reaper saw it.
#[derive(Debug, Clone, Copy)]
struct Death {
    status: ExitStatus,
    /// When the reaper saw it (it wakes as soon as a child ends).
    at: Instant,
}

/// Children reaped by the reaper thread, by pid. Its lock is held while a child is spawned
/// (std reaps a child whose exec failed itself) and while a signal is sent (a pid not in the
/// map is still our child, alive or a zombie, so it cannot have been reused).
#[derive(Default)]
struct Reaper {
    dead: Mutex<HashMap<u32, Death>>,
    cv: Condvar,
}

impl Reaper {
    /// Starts the thread that reaps every child as soon as it ends and records when.
    fn start() -> std::io::Result<Arc<Reaper>> {
        let r = Arc::new(Reaper::default());
        let me = r.clone();
        std::thread::Builder::new()
            .name("braid-run-reaper".into())
            .spawn(move || me.run())?;
        Ok(r)
    }

    fn run(&self) {
        loop {
            // SAFETY: an all-zero siginfo_t is a valid out-parameter for waitid(2).
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: FFI; `info` is a valid siginfo_t. WNOWAIT leaves the child a zombie: it
            // is reaped below under the lock.
            let rc =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if rc != 0 {
                // EINTR, or ECHILD (no child yet, or all reaped): look again shortly.
                if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                continue;
            }
            let at = Instant::now();
            // SAFETY: waitid with WEXITED filled in the child fields of `info`.
            let pid = unsafe { info.si_pid() };
            let mut dead = lock(&self.dead);
            let mut status: libc::c_int = 0;
            // SAFETY: FFI; `status` is a valid out-parameter. `pid` is a zombie child (seen
            // above), so this returns at once.
            let got = unsafe { libc::waitpid(pid, &mut status, 0) };
            if got == pid {
                if let Ok(pid) = u32::try_from(pid) {
                    dead.insert(
                        pid,
                        Death {
                            status: ExitStatus::from_raw(status),
                            at,
                        },
                    );
                }
                self.cv.notify_all();
            }
        }
    }

    /// Sends `sig` to the process group of child `pid` unless the child has been reaped.
    fn signal(&self, pid: u32, sig: libc::c_int) {
        let dead = lock(&self.dead);
        if !dead.contains_key(&pid) {
            signal_group(pid, sig);
        }
    }

    /// Waits up to `t` for a child to end.
    fn nap(&self, t: Duration) {
        let g = lock(&self.dead);
        let _ = self.cv.wait_timeout(g, t);
    }
}

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
/// started are reached too). Call it through [`Reaper::signal`].
fn signal_group(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: FFI; kill(2) takes plain integers. `-pid` names the process group led by the
    // rank, which is still our unreaped child (Reaper::signal checks under the reaper's lock),
    // so the id cannot have been reused.
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

/// A scheduled action of an elastic drill.
#[derive(Debug, Clone, Copy)]
enum Action {
    /// Start this many joiners.
    Join(usize),
    /// SIGKILL the process with this launcher index.
    Kill(usize),
}

/// An [`Action`] due `at` after the start.
#[derive(Debug, Clone, Copy)]
struct Event {
    at: Duration,
    action: Action,
}

struct Opts {
    n: usize,
    coordinator: Option<String>,
    /// Job token for every process (BRAID_JOB_TOKEN), when braid-run sets one.
    token: Option<String>,
    /// Sorted by time; events due at the same time keep the command-line order.
    events: Vec<Event>,
    cmd: Vec<String>,
}

impl Opts {
    /// Whether the job is elastic (any --join or --kill).
    fn elastic(&self) -> bool {
        !self.events.is_empty()
    }

    /// Number of processes braid-run starts over the whole run (ranks and joiners).
    fn total(&self) -> usize {
        self.n
            + self
                .events
                .iter()
                .map(|e| match e.action {
                    Action::Join(k) => k,
                    Action::Kill(_) => 0,
                })
                .sum::<usize>()
    }
}

/// Parses the `X@SECONDS` value of `opt` (`--join` or `--kill`) into X and the time.
fn parse_at(opt: &str, v: &str, what: &str) -> Result<(usize, Duration), String> {
    let (x, t) = v
        .split_once('@')
        .ok_or_else(|| format!("{opt} {v}: expected {what}@SECONDS"))?;
    let x = x
        .trim()
        .parse::<usize>()
        .map_err(|_| format!("{opt} {v}: {what} must be a whole number, not {x:?}"))?;
    let secs = t
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite())
        .ok_or_else(|| format!("{opt} {v}: SECONDS must be a number, not {t:?}"))?;
    if secs < 0.0 {
        return Err(format!("{opt} {v}: SECONDS must be 0 or more"));
    }
    let at = Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{opt} {v}: SECONDS {t:?} is too large"))?;
    Ok((x, at))
}

fn parse_join(v: &str) -> Result<Event, String> {
    let (k, at) = parse_at("--join", v, "K")?;
    if !(1..=65536).contains(&k) {
        return Err(format!(
            "--join {v}: K (the number of joiners) must be 1 or more"
        ));
    }
    Ok(Event {
        at,
        action: Action::Join(k),
    })
}

fn parse_kill(v: &str) -> Result<Event, String> {
    let (r, at) = parse_at("--kill", v, "RANK")?;
    Ok(Event {
        at,
        action: Action::Kill(r),
    })
}

/// `Ok(None)`: help was asked for.
fn parse_args(args: Vec<String>) -> Result<Option<Opts>, String> {
    let mut n: Option<usize> = None;
    let mut coordinator = None;
    let mut events = Vec::new();
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
            "--join" => {
                let v = it.next().ok_or("--join needs K@SECONDS")?;
                events.push(parse_join(&v)?);
            }
            "--kill" => {
                let v = it.next().ok_or("--kill needs RANK@SECONDS")?;
                events.push(parse_kill(&v)?);
            }
            s if s.starts_with("--nproc=") => n = Some(parse_n(&s["--nproc=".len()..])?),
            s if s.starts_with("--coordinator=") => {
                coordinator = Some(s["--coordinator=".len()..].to_string())
            }
            s if s.starts_with("--join=") => events.push(parse_join(&s["--join=".len()..])?),
            s if s.starts_with("--kill=") => events.push(parse_kill(&s["--kill=".len()..])?),
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
    for e in &events {
        if let Action::Kill(r) = e.action {
            if r >= n {
                return Err(format!(
                    "--kill {r}@{}: RANK must be below N = {n} (a rank at start)",
                    e.at.as_secs_f64()
                ));
            }
        }
    }
    if cmd.is_empty() {
        return Err("missing the command to run".into());
    }
    // Stable: events due at the same time keep the command-line order.
    events.sort_by_key(|e| e.at);
    Ok(Some(Opts {
        n,
        coordinator,
        token: None,
        events,
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

/// A process braid-run started: an initial rank or a joiner.
struct Proc {
    pid: u32,
    /// Launcher index: the initial rank (below N) or N, N+1, ... for joiners.
    index: usize,
    joiner: bool,
    /// braid-run sent it SIGKILL for a --kill: its end is not a failure.
    killed: bool,
    /// Signals braid-run sent it to stop it (a failure elsewhere, or a forwarded signal), as
    /// a bit mask (bit `sig`).
    sent: u64,
    status: Option<ExitStatus>,
    /// When the reaper saw it end.
    ended: Option<Instant>,
}

impl Proc {
    /// `rank 3` / `joiner [5]`, for messages.
    fn label(&self) -> String {
        if self.joiner {
            format!("joiner [{}]", self.index)
        } else {
            format!("rank {}", self.index)
        }
    }
}

/// Starts launcher index `index` (a rank if below N, else a joiner).
fn spawn_proc(
    opts: &Opts,
    addr: &str,
    index: usize,
    pumps: &mut Vec<JoinHandle<()>>,
    reaper: &Reaper,
) -> std::io::Result<Proc> {
    let joiner = index >= opts.n;
    let mut cmd = Command::new(&opts.cmd[0]);
    cmd.args(&opts.cmd[1..])
        .env("BRAID_COORDINATOR", addr)
        .env("BRAID_WORLD_SIZE", opts.n.to_string())
        .env("BRAID_LOCAL_RANK", index.to_string())
        .env("LOCAL_RANK", index.to_string())
        .env("BRAID_RUN_INDEX", index.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(t) = &opts.token {
        cmd.env("BRAID_JOB_TOKEN", t);
    }
    if joiner {
        // The coordinator assigns a joiner's rank when it admits it; never pass on one that
        // braid-run's own environment may hold.
        cmd.env_remove("BRAID_RANK")
            .env("BRAID_LOCAL_SIZE", opts.total().to_string())
            .env("BRAID_ELASTIC", "1");
    } else {
        cmd.env("BRAID_RANK", index.to_string())
            .env("BRAID_LOCAL_SIZE", opts.n.to_string());
        if opts.elastic() {
            cmd.env("BRAID_ELASTIC", "1");
        }
    }
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
    // is async-signal-safe. It makes the rank receive SIGTERM if braid-run dies (ranks lead
    // their own process groups, so they would otherwise outlive it).
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    // Under the reaper's lock: std waits for a child whose exec failed itself, and the reaper
    // must not take that child from it.
    let mut child = {
        let _g = lock(&reaper.dead);
        cmd.spawn()?
    };
    let pid = child.id();
    if let Some(out) = child.stdout.take() {
        if let Ok(h) = std::thread::Builder::new()
            .name(format!("braid-run-out-{index}"))
            .spawn(move || pump(index, out, false))
        {
            pumps.push(h);
        }
    }
    if let Some(err) = child.stderr.take() {
        if let Ok(h) = std::thread::Builder::new()
            .name(format!("braid-run-err-{index}"))
            .spawn(move || pump(index, err, true))
        {
            pumps.push(h);
        }
    }
    Ok(Proc {
        pid,
        index,
        joiner,
        killed: false,
        sent: 0,
        status: None,
        ended: None,
    })
}

/// Seconds since `start`, for messages.
fn secs_since(start: Instant) -> String {
    format!("{:.2}", start.elapsed().as_secs_f64())
}

/// Supervises the processes: runs the scheduled joins and kills, and stops all processes when
/// one that was not killed on purpose fails.
struct Supervisor<'a> {
    opts: &'a Opts,
    addr: &'a str,
    reaper: Arc<Reaper>,
    start: Instant,
    procs: Vec<Proc>,
    pumps: Vec<JoinHandle<()>>,
    /// Index of the next event of `opts.events` to run.
    next_event: usize,
    /// Indices (into `procs`) of the processes that failed, in the order they were seen.
    failures: Vec<usize>,
    /// When the first failure was seen.
    first_failure: Option<Instant>,
    /// The verdict: which process failed first (None: braid-run's own failure) and the exit
    /// code.
    verdict: Option<(Option<usize>, u8)>,
    /// Stopping (a failure, or a forwarded signal): no more events run.
    stopping: bool,
    /// When the processes that ignore SIGTERM get SIGKILL.
    kill_at: Option<Instant>,
    sigkill_sent: bool,
}

/// How a failure competes for the verdict (smaller first): a death by a signal braid-run did
/// not send (a crash, kill -9: also when braid-run had just sent it SIGTERM), then a non-zero
/// exit, then a death by a signal braid-run sent to stop it.
fn failure_class(p: &Proc) -> u8 {
    match p.status.and_then(|s| s.signal()) {
        Some(sig) if !p.was_sent(sig) => 0,
        Some(_) => 2,
        None => 1,
    }
}

impl Proc {
    /// Sends `sig` to its process group (unless it has been reaped) and remembers that.
    fn stop_with(&mut self, reaper: &Reaper, sig: libc::c_int) {
        if let Ok(bit) = u32::try_from(sig) {
            self.sent |= 1u64.checked_shl(bit).unwrap_or(0);
        }
        reaper.signal(self.pid, sig);
    }

    fn was_sent(&self, sig: i32) -> bool {
        u32::try_from(sig)
            .ok()
            .and_then(|b| 1u64.checked_shl(b))
            .is_some_and(|m| self.sent & m != 0)
    }
}

impl Supervisor<'_> {
    fn running(&self) -> impl Iterator<Item = &Proc> {
        self.procs.iter().filter(|p| p.status.is_none())
    }

    /// Stops the job: SIGTERM to every running process, SIGKILL after the grace period, no
    /// more events.
    fn stop_all(&mut self) {
        if self.stopping && self.kill_at.is_some() {
            return;
        }
        self.stopping = true;
        let reaper = self.reaper.clone();
        let mut any = false;
        for p in self.procs.iter_mut().filter(|p| p.status.is_none()) {
            p.stop_with(&reaper, libc::SIGTERM);
            any = true;
        }
        if any {
            self.kill_at = Some(Instant::now() + KILL_GRACE);
        }
    }

    /// braid-run itself failed (a joiner could not be started): that is the verdict.
    fn fail_here(&mut self, code: u8) {
        if self.verdict.is_none() {
            self.verdict = Some((None, code));
            if self.running().next().is_some() {
                eprintln!("braid-run: stopping the other ranks");
            }
        }
        self.stop_all();
    }

    /// Decides which failure came first, once the window after the first one has passed (or
    /// every process has ended), and says so.
    fn decide(&mut self, force: bool) {
        let Some(t0) = self.first_failure else {
            return;
        };
        if self.verdict.is_some() || (!force && t0.elapsed() < VERDICT_WINDOW) {
            return;
        }
        let window_end = t0 + VERDICT_WINDOW;
        let first = self
            .failures
            .iter()
            .copied()
            .filter(|&i| self.procs[i].ended.is_some_and(|t| t <= window_end))
            .min_by_key(|&i| (failure_class(&self.procs[i]), self.procs[i].ended, i));
        let Some(first) = first else {
            return;
        };
        let p = &self.procs[first];
        let Some(st) = p.status else {
            return;
        };
        eprintln!("braid-run: {} (pid {}) {}", p.label(), p.pid, describe(&st));
        self.verdict = Some((Some(first), exit_code_of(&st)));
        if self.procs.iter().any(|q| q.sent != 0) {
            eprintln!("braid-run: stopping the other ranks");
        }
        let first_label = p.label();
        for &i in &self.failures {
            if i != first {
                self.consequence(i, &first_label);
            }
        }
    }

    /// Reports a failure after the first one.
    fn consequence(&self, i: usize, first: &str) {
        let q = &self.procs[i];
        // Deaths by the signal braid-run sent to stop the job say nothing new.
        if failure_class(q) == 2 {
            return;
        }
        if let Some(st) = q.status {
            eprintln!(
                "braid-run: {} (pid {}) {} (after {first} failed)",
                q.label(),
                q.pid,
                describe(&st)
            );
        }
    }

    fn run_event(&mut self, action: Action) {
        match action {
            Action::Join(k) => {
                let first = self.procs.len();
                let last = first + k - 1;
                let which = if k == 1 {
                    format!("[{first}]")
                } else {
                    format!("[{first}]..[{last}]")
                };
                eprintln!(
                    "braid-run: starting {k} joiner(s) {which} at {} s",
                    secs_since(self.start)
                );
                for j in first..=last {
                    match spawn_proc(self.opts, self.addr, j, &mut self.pumps, &self.reaper) {
                        Ok(p) => self.procs.push(p),
                        Err(e) => {
                            eprintln!(
                                "braid-run: cannot start joiner [{j}] ({}): {e}",
                                self.opts.cmd[0]
                            );
                            self.fail_here(127);
                            return;
                        }
                    }
                }
            }
            Action::Kill(r) => {
                let t = secs_since(self.start);
                let Some(p) = self.procs.get_mut(r) else {
                    return;
                };
                if p.killed {
                    eprintln!("braid-run: [{r}] (pid {}) was killed already; not killing it again at {t} s", p.pid);
                } else if p.status.is_some() {
                    eprintln!(
                        "braid-run: [{r}] (pid {}) has exited already; nothing to kill at {t} s",
                        p.pid
                    );
                } else {
                    eprintln!("braid-run: killing [{r}] (pid {}) at {t} s", p.pid);
                    p.killed = true;
                    self.reaper.signal(p.pid, libc::SIGKILL);
                }
            }
        }
    }

    /// Runs the events that are due.
    fn run_due_events(&mut self) {
        while !self.stopping {
            let Some(e) = self.opts.events.get(self.next_event).copied() else {
                return;
            };
            if self.start.elapsed() < e.at {
                return;
            }
            self.next_event += 1;
            self.run_event(e.action);
        }
    }

    /// Takes in the processes the reaper saw end, in the order it saw them.
    fn reap(&mut self) {
        let mut ended: Vec<(Instant, usize, ExitStatus)> = {
            let dead = lock(&self.reaper.dead);
            self.procs
                .iter()
                .enumerate()
                .filter(|(_, p)| p.status.is_none())
                .filter_map(|(i, p)| dead.get(&p.pid).map(|d| (d.at, i, d.status)))
                .collect()
        };
        ended.sort_by_key(|e| (e.0, e.1));
        for (at, i, st) in ended {
            let p = &mut self.procs[i];
            p.status = Some(st);
            p.ended = Some(at);
            if p.killed {
                eprintln!(
                    "braid-run: [{}] (pid {}) {} (killed by --kill; not a failure)",
                    p.index,
                    p.pid,
                    describe(&st)
                );
            } else if !st.success() {
                self.failures.push(i);
                if self.first_failure.is_none() {
                    self.first_failure = Some(at);
                }
                match self.verdict {
                    Some((Some(first), _)) => {
                        let label = self.procs[first].label();
                        self.consequence(i, &label);
                    }
                    Some((None, _)) => self.consequence(i, "braid-run"),
                    None => {}
                }
                self.stop_all();
            }
        }
    }

    /// Waits until every process has exited. Returns the exit code of the verdict.
    fn run(&mut self) -> Option<u8> {
        loop {
            let sig = SIGNAL.swap(0, Ordering::SeqCst);
            if sig != 0 {
                eprintln!(
                    "braid-run: got signal {sig} ({}); forwarding it to the ranks",
                    signal_name(sig)
                );
                let reaper = self.reaper.clone();
                for p in self.procs.iter_mut().filter(|p| p.status.is_none()) {
                    p.stop_with(&reaper, sig);
                }
                // The job is being stopped: start no joiners, kill no one.
                self.stopping = true;
            }
            self.run_due_events();
            self.reap();
            let all_ended = self.running().next().is_none();
            self.decide(all_ended);
            if all_ended {
                let left = self.opts.events.len() - self.next_event;
                if left > 0 && !self.stopping {
                    eprintln!(
                        "braid-run: every process has exited; dropping {left} scheduled --join/--kill"
                    );
                }
                return self.verdict.map(|v| v.1);
            }
            if let Some(t) = self.kill_at {
                if !self.sigkill_sent && Instant::now() >= t {
                    self.sigkill_sent = true;
                    let reaper = self.reaper.clone();
                    for p in self.procs.iter_mut().filter(|p| p.status.is_none()) {
                        eprintln!(
                            "braid-run: {} (pid {}) did not stop within {} s of SIGTERM; killing it",
                            p.label(),
                            p.pid,
                            KILL_GRACE.as_secs()
                        );
                        p.stop_with(&reaper, libc::SIGKILL);
                    }
                }
            }
            // Wake when a child ends, else every 20 ms, earlier for the next event.
            let mut nap = Duration::from_millis(20);
            if !self.stopping {
                if let Some(e) = self.opts.events.get(self.next_event) {
                    nap = nap.min(e.at.saturating_sub(self.start.elapsed()));
                }
            }
            self.reaper.nap(nap);
        }
    }
}

/// A fresh job token: 32 random bytes from the kernel, in hex.
fn new_token() -> Result<String, String> {
    let mut b = [0u8; 32];
    braid::transport::random_bytes(&mut b).map_err(|e| e.to_string())?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn main() -> ExitCode {
    let mut opts = match parse_args(std::env::args().skip(1).collect()) {
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
    let filter = braid::config::var("BRAID_LOG").unwrap_or_else(|| "warn".into());
    braid::config::init_logging(&filter);
    install_handlers();

    // The reaper runs before the first child starts.
    let reaper = match Reaper::start() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("braid-run: cannot start the reaper thread: {e}");
            return ExitCode::FAILURE;
        }
    };

    // The embedded coordinator stays up until every process (joiners included) has exited.
    // It and every process share a job token: the environment's, else a fresh one.
    let mut _coordinator: Option<Coordinator> = None;
    let addr = match &opts.coordinator {
        Some(a) => a.clone(),
        None => {
            let token = match braid::config::var("BRAID_JOB_TOKEN") {
                Some(t) => t,
                None => match new_token() {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("braid-run: cannot generate a job token: {e}");
                        return ExitCode::FAILURE;
                    }
                },
            };
            let copts = braid::membership::CoordinatorOptions {
                job_token: Some(token.clone().into_bytes()),
                ..braid::membership::CoordinatorOptions::from_env()
            };
            opts.token = Some(token);
            match Coordinator::bind_with("127.0.0.1:0", copts) {
                Ok(c) => {
                    let a = c.local_addr().to_string();
                    _coordinator = Some(c);
                    a
                }
                Err(e) => {
                    eprintln!("braid-run: cannot start the coordinator: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };

    // Scheduled times count from here.
    let start = Instant::now();
    let mut procs = Vec::with_capacity(opts.total());
    let mut pumps = Vec::new();
    for i in 0..opts.n {
        match spawn_proc(&opts, &addr, i, &mut pumps, &reaper) {
            Ok(p) => procs.push(p),
            Err(e) => {
                eprintln!("braid-run: cannot start rank {i} ({}): {e}", opts.cmd[0]);
                for p in &procs {
                    reaper.signal(p.pid, libc::SIGKILL);
                }
                // Wait (briefly) until the reaper has seen them end.
                let end = Instant::now() + KILL_GRACE;
                while Instant::now() < end
                    && procs
                        .iter()
                        .any(|p| !lock(&reaper.dead).contains_key(&p.pid))
                {
                    reaper.nap(Duration::from_millis(20));
                }
                return ExitCode::from(127);
            }
        }
    }

    let mut sup = Supervisor {
        opts: &opts,
        addr: &addr,
        reaper,
        start,
        procs,
        pumps,
        next_event: 0,
        failures: Vec::new(),
        first_failure: None,
        verdict: None,
        stopping: false,
        kill_at: None,
        sigkill_sent: false,
    };
    let failed = sup.run();
    let pumps = std::mem::take(&mut sup.pumps);

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
        Some(code) => ExitCode::from(code),
        None => ExitCode::SUCCESS,
    }
}
