//! Coordinator benchmark with the simulated members in child processes
//! (`braid-coordinator bench --members N [--procs P] [--rounds R]`).
//!
//! [`coordinator_bench`] binds a [`Coordinator`] on `127.0.0.1:0` in the calling process and
//! starts `procs` child processes (the program `exe` with the hidden subcommand
//! [`MEMBERS_SUBCOMMAND`], see [`run_members`]), which together hold the `members` simulated
//! *light* members of the elastic group `"bench"`: real sockets, one full registration each,
//! every notice acknowledged as soon as it is read, and a heartbeat every
//! [`BenchOptions::heartbeat`] from the member's first notice on (registered with
//! [`BenchOptions::heartbeat_timeout`]), like a real member's client thread. Spreading the
//! members over processes keeps each process under its descriptor limit (20,000 here, hard).
//!
//! Phases, each measured on the monotonic clock shared by all processes:
//! 1. formation: every member registers (at most [`BenchOptions::max_connecting`] in flight
//!    per process) and reads the epoch-1 notice;
//! 2. `rounds` single joins: a joiner registers in one child; measured from its registration
//!    being written to the new view's notice read by every member (and acknowledged);
//! 3. steady state: the coordinator process's CPU (`utime + stime` of `/proc/self/stat`) over
//!    [`BenchOptions::steady`] of heartbeats and nothing else, as % of one core;
//! 4. a join storm: [`BenchOptions::storm`] joiners register at once (spread over the
//!    children), measured from the first registration written to the view holding them all read
//!    by every member. Skipped, with the reason, when the coordinator process would run out of
//!    descriptors.
//!
//! Per-thread CPU of the coordinator process (from `/proc/self/task/*/schedstat`, grouped by
//! thread name) is recorded for every phase: where the coordinator's time goes.
//!
//! Children talk to the parent in lines: commands on their stdin (`join K`, `stats`, `close`),
//! events on their stdout (`reg`, `ep`, `joined`, `stats`, `closing`, `err`). A child exits when
//! its stdin closes, so none outlives the benchmark.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::proto::{self, MsgType};
use super::scale::{take_frame, Stats};
use super::{Coordinator, GroupPolicy, Registration};
use crate::error::{Error, Result};

/// Group name used by the benchmark.
const GROUP: &str = "bench";
/// Hidden subcommand of `braid-coordinator` that runs a child's members ([`run_members`]).
pub const MEMBERS_SUBCOMMAND: &str = "bench-members";
/// Descriptors the coordinator holds per connection: the accepted stream, shared by its
/// reader, its writers and the accept loop's table (it held four before the stream was
/// shared).
pub const COORD_FDS_PER_CONN: u64 = 1;
/// Epoll token of the child's stdin.
const STDIN_TOKEN: u64 = u64::MAX;
/// No progress for this long in a phase: it failed (stalled).
const STALL: Duration = Duration::from_secs(30);

/// What the simulated members receive at a view change ([`BenchOptions::views`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Views {
    /// Light members: a notice (epoch, size, rank).
    #[default]
    Notice,
    /// Full members that take view deltas: the first view whole, then deltas.
    Delta,
    /// Full members without deltas: every view whole (O(members) bytes each).
    Whole,
}

impl Views {
    /// `notice`, `delta` or `whole`.
    pub fn as_str(self) -> &'static str {
        match self {
            Views::Notice => "notice",
            Views::Delta => "delta",
            Views::Whole => "whole",
        }
    }

    /// Parses what [`Views::as_str`] writes.
    ///
    /// Errors: `Error::InvalidArgument` for another word.
    pub fn parse(s: &str) -> Result<Views> {
        match s {
            "notice" => Ok(Views::Notice),
            "delta" => Ok(Views::Delta),
            "whole" => Ok(Views::Whole),
            _ => Err(Error::InvalidArgument(format!(
                "views {s:?}: expected notice, delta or whole"
            ))),
        }
    }
}

/// Parameters of [`coordinator_bench`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchOptions {
    /// Members of the initial view (the group's world size); at least 1.
    pub members: usize,
    /// Child processes holding the members; 1 to `members`.
    pub procs: usize,
    /// Single joins to measure.
    pub rounds: usize,
    /// The group's batching window for joiners, in milliseconds.
    pub join_window_ms: u64,
    /// Heartbeat interval of every member (zero: none).
    pub heartbeat: Duration,
    /// Heartbeat timeout the members register with (zero: never declared dead).
    pub heartbeat_timeout: Duration,
    /// Joiners of the storm (0: no storm).
    pub storm: usize,
    /// Length of the steady-state CPU measurement.
    pub steady: Duration,
    /// Longest wait for any one phase.
    pub phase_timeout: Duration,
    /// Most registrations in flight at once per child during formation.
    pub max_connecting: usize,
    /// What members receive at a view change.
    pub views: Views,
}

impl BenchOptions {
    /// Defaults for `members`: 2 processes, 5 rounds, the default batching window, heartbeat
    /// interval and timeout of [`crate::config::Config`] (500 ms, 1 s, 10 s), a storm of
    /// 1,000, 5 s of steady state, 10 min per phase, 64 registrations in flight per process.
    pub fn new(members: usize) -> BenchOptions {
        let cfg = crate::config::Config::default();
        BenchOptions {
            members,
            procs: 2,
            rounds: 5,
            join_window_ms: u64::try_from(cfg.join_window.as_millis()).unwrap_or(500),
            heartbeat: cfg.heartbeat,
            heartbeat_timeout: cfg.heartbeat_timeout,
            storm: 1000,
            steady: Duration::from_secs(5),
            phase_timeout: Duration::from_secs(600),
            max_connecting: 64,
            views: Views::Notice,
        }
    }
}

/// One measured single join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinRound {
    /// The new epoch.
    pub epoch: u64,
    /// Members in the new view.
    pub size: usize,
    /// The first member read the notice (from the joiner's registration written).
    pub first: Duration,
    /// The last member read the notice.
    pub last: Duration,
    /// The last acknowledgement was written.
    pub acked: Duration,
    /// Bytes of the view frames (payloads) all members read for this epoch.
    pub bytes: u64,
}

/// Steady-state heartbeat cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Steady {
    /// Length of the measurement.
    pub wall: Duration,
    /// The coordinator process's CPU, % of one core.
    pub cpu_pct: f64,
    /// The member processes' CPU together, % of one core.
    pub members_cpu_pct: f64,
    /// Heartbeats the members sent per second.
    pub heartbeats_per_s: f64,
    /// Heartbeat echoes the members read per second.
    pub echoes_per_s: f64,
}

/// Outcome of the join storm.
#[derive(Debug, Clone, PartialEq)]
pub enum Storm {
    /// Measured.
    Done {
        /// Joiners.
        joiners: usize,
        /// Epoch of the view holding them all.
        epoch: u64,
        /// View changes it took (1: all in one batch).
        views: u64,
        /// Members of that view.
        size: usize,
        /// From the first registration written to the last one written.
        written: Duration,
        /// To the first member reading that view.
        first: Duration,
        /// To the last member reading it.
        last: Duration,
        /// To the last acknowledgement written.
        acked: Duration,
    },
    /// Not run (no storm asked, or the coordinator would run out of descriptors).
    Skipped(String),
    /// Failed (the benchmark stops after it).
    Failed(String),
}

/// CPU of one group of threads (same name) in one phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadCost {
    /// Thread name (`comm`, at most 15 bytes).
    pub name: String,
    /// Threads of that name seen.
    pub threads: usize,
    /// Time on a CPU.
    pub cpu: Duration,
    /// Times scheduled onto a CPU (about the wake-ups).
    pub slices: u64,
}

/// Where the coordinator process's time went in one phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseCost {
    /// Phase name.
    pub phase: String,
    /// Its length.
    pub wall: Duration,
    /// By thread name, most CPU first.
    pub threads: Vec<ThreadCost>,
}

/// Result of [`coordinator_bench`].
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// Members of the initial view.
    pub members: usize,
    /// Member processes.
    pub procs: usize,
    /// What members received at view changes.
    pub views: Views,
    /// The group's batching window (ms).
    pub join_window_ms: u64,
    /// The members' heartbeat interval.
    pub heartbeat: Duration,
    /// From the start to every member holding its registration answer.
    pub register: Duration,
    /// From the start to every member having read the epoch-1 notice.
    pub formation: Duration,
    /// From the start to every epoch-1 acknowledgement written.
    pub formation_acked: Duration,
    /// The single joins.
    pub rounds: Vec<JoinRound>,
    /// Statistics of [`JoinRound::last`]: one join to the view read by all.
    pub join_view: Stats,
    /// Steady-state heartbeat cost (`None` when `steady` was zero).
    pub steady: Option<Steady>,
    /// Joiners asked for the storm.
    pub storm_size: usize,
    /// The storm.
    pub storm: Storm,
    /// Per-phase CPU by thread.
    pub profile: Vec<PhaseCost>,
    /// Accept-queue overflows (`TcpExt: ListenOverflows`, whole machine) during the formation
    /// and during the storm, where readable.
    pub listen_overflows: (Option<u64>, Option<u64>),
    /// Peak resident set of the coordinator process, KiB.
    pub peak_rss_kib: Option<u64>,
    /// Threads of the coordinator process at the end.
    pub threads: Option<u64>,
    /// Descriptors open in the coordinator process at the end.
    pub fds: Option<u64>,
    /// `RLIMIT_NOFILE` in force.
    pub nofile_limit: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl BenchReport {
    /// The one-line summary:
    /// `members=N join_view_ms=X storm_1000_ms=Y heartbeat_cpu_pct=Z` (the storm's size in
    /// its key; `nan` for what was not measured).
    pub fn summary(&self) -> String {
        let join = if self.join_view.n > 0 {
            format!("{:.1}", ms(self.join_view.median))
        } else {
            "nan".into()
        };
        let storm = match &self.storm {
            Storm::Done { last, .. } => format!("{:.1}", ms(*last)),
            _ => "nan".into(),
        };
        let cpu = self
            .steady
            .map_or("nan".into(), |s| format!("{:.2}", s.cpu_pct));
        format!(
            "members={} join_view_ms={join} storm_{}_ms={storm} heartbeat_cpu_pct={cpu}",
            self.members, self.storm_size
        )
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "coordinator bench: {} {} in {} processes, join window {} ms, heartbeat {:.1} s",
            self.members,
            match self.views {
                Views::Notice => "light members (view notices)",
                Views::Delta => "full members (whole first view, then view deltas)",
                Views::Whole => "full members (whole views, no deltas)",
            },
            self.procs,
            self.join_window_ms,
            self.heartbeat.as_secs_f64()
        )?;
        writeln!(
            f,
            "formation: registered {:.1} ms, epoch 1 read by all {:.1} ms, acknowledged {:.1} ms",
            ms(self.register),
            ms(self.formation),
            ms(self.formation_acked)
        )?;
        writeln!(
            f,
            "{:<36} {:>10} {:>10} {:>10}",
            "one join (ms, from registration)", "min", "median", "max"
        )?;
        let pick = |g: fn(&JoinRound) -> Duration| {
            Stats::of(&self.rounds.iter().map(g).collect::<Vec<_>>())
        };
        for (name, s) in [
            ("first member read the view", pick(|r| r.first)),
            ("all members read the view", pick(|r| r.last)),
            ("all acknowledgements written", pick(|r| r.acked)),
        ] {
            writeln!(
                f,
                "{:<36} {:>10.2} {:>10.2} {:>10.2}",
                name,
                ms(s.min),
                ms(s.median),
                ms(s.max)
            )?;
        }
        for r in &self.rounds {
            writeln!(
                f,
                "  epoch {:>3} size {:>6}: first {:.2} last {:.2} acked {:.2} ms, view bytes read by all members {} ({:.1} per member)",
                r.epoch,
                r.size,
                ms(r.first),
                ms(r.last),
                ms(r.acked),
                r.bytes,
                r.bytes as f64 / r.size.max(1) as f64
            )?;
        }
        match &self.steady {
            Some(s) => writeln!(
                f,
                "steady heartbeats over {:.1} s: coordinator process {:.2}% of a core, member processes {:.2}%; {:.0} heartbeats/s sent, {:.0} echoes/s read",
                s.wall.as_secs_f64(),
                s.cpu_pct,
                s.members_cpu_pct,
                s.heartbeats_per_s,
                s.echoes_per_s
            )?,
            None => writeln!(f, "steady heartbeats: not measured")?,
        }
        match &self.storm {
            Storm::Done {
                joiners,
                epoch,
                views,
                size,
                written,
                first,
                last,
                acked,
            } => writeln!(
                f,
                "join storm of {joiners}: registrations written in {:.1} ms; view epoch {epoch} (size {size}, {views} view change(s)) first read {:.1} ms, read by all {:.1} ms, acknowledged {:.1} ms",
                ms(*written),
                ms(*first),
                ms(*last),
                ms(*acked)
            )?,
            Storm::Skipped(why) => writeln!(f, "join storm of {}: skipped: {why}", self.storm_size)?,
            Storm::Failed(why) => writeln!(f, "join storm of {}: FAILED: {why}", self.storm_size)?,
        }
        writeln!(
            f,
            "coordinator process CPU by thread (ms on CPU / times scheduled):"
        )?;
        let mut names: Vec<String> = Vec::new();
        for p in &self.profile {
            for t in &p.threads {
                if !names.contains(&t.name) {
                    names.push(t.name.clone());
                }
            }
        }
        write!(f, "  {:<18} {:>8}", "thread", "count")?;
        for p in &self.profile {
            write!(
                f,
                " {:>24}",
                format!("{} ({:.1} s)", p.phase, p.wall.as_secs_f64())
            )?;
        }
        writeln!(f)?;
        for name in &names {
            let count = self
                .profile
                .iter()
                .flat_map(|p| p.threads.iter())
                .filter(|t| &t.name == name)
                .map(|t| t.threads)
                .max()
                .unwrap_or(0);
            write!(f, "  {:<18} {:>8}", name, count)?;
            for p in &self.profile {
                let cell = p
                    .threads
                    .iter()
                    .find(|t| &t.name == name)
                    .map_or("-".to_string(), |t| {
                        format!("{:.1} / {}", ms(t.cpu), t.slices)
                    });
                write!(f, " {:>24}", cell)?;
            }
            writeln!(f)?;
        }
        let opt = |v: Option<u64>| v.map_or("?".to_string(), |x| x.to_string());
        writeln!(
            f,
            "accept queue overflows (TcpExt ListenOverflows, whole machine): formation {}, storm {}",
            opt(self.listen_overflows.0),
            opt(self.listen_overflows.1)
        )?;
        write!(
            f,
            "coordinator process: peak RSS {} KiB, threads {}, descriptors {} (RLIMIT_NOFILE {})",
            opt(self.peak_rss_kib),
            opt(self.threads),
            opt(self.fds),
            self.nofile_limit
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Shared helpers.

/// `CLOCK_MONOTONIC` in nanoseconds (the same clock in every process of the machine).
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: FFI call; `ts` is a valid, writable timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit in force.
fn raise_nofile() -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: FFI call; `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(Error::System(format!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        )));
    }
    if lim.rlim_cur < lim.rlim_max {
        let new = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: FFI call; `new` is a valid rlimit read by the call only.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
            return Err(Error::System(format!(
                "setrlimit(RLIMIT_NOFILE, {}): {}",
                lim.rlim_max,
                std::io::Error::last_os_error()
            )));
        }
        return Ok(lim.rlim_max);
    }
    Ok(lim.rlim_cur)
}

/// `utime + stime` of `/proc/<pid>/stat` (`self` for this process), in seconds.
fn proc_cpu(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: FFI call without arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// `TcpExt: ListenOverflows` of `/proc/net/netstat`: connections whose handshake completed
/// while a listener's accept queue was full (the kernel drops the final ACK; the client, which
/// believes it is connected, waits for the SYN-ACK to be retransmitted after 1, 3, 7 s).
/// Counted for every socket of the network namespace.
fn listen_overflows() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = s.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?;
    let values = lines.next()?;
    let pos = names
        .split_whitespace()
        .position(|n| n == "ListenOverflows")?;
    values.split_whitespace().nth(pos)?.parse().ok()
}

/// Descriptors open in this process.
fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

/// A field of `/proc/self/status` (the number before the unit).
fn proc_status(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Per thread of this process: name, nanoseconds on a CPU, times scheduled.
type ThreadSnap = HashMap<u64, (String, u64, u64)>;

fn thread_snapshot() -> ThreadSnap {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u64>().ok()) else {
            continue;
        };
        let p = e.path();
        let name = std::fs::read_to_string(p.join("comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let Ok(ss) = std::fs::read_to_string(p.join("schedstat")) else {
            continue;
        };
        let v: Vec<u64> = ss
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() >= 3 {
            out.insert(tid, (name, v[0], v[2]));
        }
    }
    out
}

fn phase_cost(phase: &str, wall: Duration, a: &ThreadSnap, b: &ThreadSnap) -> PhaseCost {
    let mut by: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
    for (tid, (name, ns, slices)) in b {
        let (ns0, sl0) = a.get(tid).map_or((0, 0), |x| (x.1, x.2));
        let e = by.entry(name.clone()).or_default();
        e.0 += 1;
        e.1 += ns.saturating_sub(ns0);
        e.2 += slices.saturating_sub(sl0);
    }
    let mut threads: Vec<ThreadCost> = by
        .into_iter()
        .map(|(name, (n, ns, slices))| ThreadCost {
            name,
            threads: n,
            cpu: Duration::from_nanos(ns),
            slices,
        })
        .collect();
    threads.sort_by_key(|t| std::cmp::Reverse(t.cpu));
    PhaseCost {
        phase: phase.to_string(),
        wall,
        threads,
    }
}

// ---------------------------------------------------------------------------------------------
// The child: a swarm of simulated light members.

/// Parameters of one member process ([`run_members`]); passed on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembersOptions {
    /// The coordinator.
    pub addr: SocketAddr,
    /// Members to register at start.
    pub count: usize,
    /// The group's world size.
    pub world: usize,
    /// Batching window proposed for the group (ms).
    pub join_window_ms: u64,
    /// Heartbeat interval (zero: none).
    pub heartbeat: Duration,
    /// Heartbeat timeout registered with.
    pub heartbeat_timeout: Duration,
    /// Most registrations in flight at start.
    pub max_connecting: usize,
    /// What the members receive at a view change.
    pub views: Views,
}

impl MembersOptions {
    /// The arguments after [`MEMBERS_SUBCOMMAND`] that [`MembersOptions::from_args`] reads.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--addr".into(),
            self.addr.to_string(),
            "--count".into(),
            self.count.to_string(),
            "--world".into(),
            self.world.to_string(),
            "--window-ms".into(),
            self.join_window_ms.to_string(),
            "--heartbeat-ms".into(),
            self.heartbeat.as_millis().to_string(),
            "--timeout-ms".into(),
            self.heartbeat_timeout.as_millis().to_string(),
            "--max-connecting".into(),
            self.max_connecting.to_string(),
            "--views".into(),
            self.views.as_str().into(),
        ]
    }

    /// Parses what [`MembersOptions::to_args`] wrote.
    ///
    /// Errors: `Error::InvalidArgument` for a missing, unknown or malformed argument.
    pub fn from_args(args: &[String]) -> Result<MembersOptions> {
        let mut m: HashMap<&str, &str> = HashMap::new();
        let mut it = args.iter();
        while let Some(k) = it.next() {
            let Some(v) = it.next() else {
                return Err(Error::InvalidArgument(format!("{k} needs a value")));
            };
            m.insert(k.as_str(), v.as_str());
        }
        let get = |k: &str| -> Result<&str> {
            m.get(k)
                .copied()
                .ok_or_else(|| Error::InvalidArgument(format!("missing {k}")))
        };
        let num = |k: &str| -> Result<u64> {
            get(k)?
                .parse()
                .map_err(|e| Error::InvalidArgument(format!("{k}: {e}")))
        };
        let size = |k: &str| -> Result<usize> {
            usize::try_from(num(k)?).map_err(|e| Error::InvalidArgument(format!("{k}: {e}")))
        };
        let o = MembersOptions {
            addr: get("--addr")?
                .parse()
                .map_err(|e| Error::InvalidArgument(format!("--addr: {e}")))?,
            count: size("--count")?,
            world: size("--world")?,
            join_window_ms: num("--window-ms")?,
            heartbeat: Duration::from_millis(num("--heartbeat-ms")?),
            heartbeat_timeout: Duration::from_millis(num("--timeout-ms")?),
            max_connecting: size("--max-connecting")?.max(1),
            views: Views::parse(get("--views")?)?,
        };
        if m.len() != 8 {
            return Err(Error::InvalidArgument(format!(
                "unexpected arguments {args:?}"
            )));
        }
        Ok(o)
    }
}

/// One simulated member.
struct Member {
    stream: Option<TcpStream>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    id: Option<u64>,
    /// Last epoch read (0: none yet).
    epoch: u64,
    /// Members in that epoch's view.
    size: usize,
    /// An acknowledgement of this epoch is in `wbuf`.
    ack_pending: Option<u64>,
    /// In [`Swarm::pending`].
    queued: bool,
    /// Its nonblocking connect is under way.
    connecting: bool,
    /// Its registration is not written yet.
    reg_unwritten: bool,
    /// It belongs to the join batch under way.
    in_batch: bool,
}

/// Joiners asked by one `join` command, until every registration is written.
struct JoinBatch {
    k: usize,
    left: usize,
    first_ns: u64,
    last_ns: u64,
}

/// What the members of one process saw of an epoch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct EpStat {
    size: usize,
    seen: usize,
    acked: usize,
    first_ns: u64,
    last_ns: u64,
    acked_ns: u64,
    /// Bytes of view frames (payloads) read for this epoch.
    bytes: u64,
}

struct Swarm {
    opts: MembersOptions,
    reg: Vec<u8>,
    epfd: OwnedFd,
    members: Vec<Member>,
    registered: usize,
    reg_dirty: bool,
    epochs: BTreeMap<u64, EpStat>,
    dirty: BTreeSet<u64>,
    /// Heartbeats due: (time, member), earliest first.
    hb: BinaryHeap<std::cmp::Reverse<(Instant, usize)>>,
    /// Members with bytes left to write.
    pending: Vec<usize>,
    hb_sent: u64,
    hb_echo: u64,
    notices: u64,
    closing: bool,
    stdin_buf: Vec<u8>,
    stdin_eof: bool,
    out: String,
    batch: Option<JoinBatch>,
}

fn epoll_add(epfd: &OwnedFd, fd: i32, token: u64) -> Result<()> {
    epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, token, libc::EPOLLIN as u32)
}

fn epoll_ctl(epfd: &OwnedFd, op: i32, fd: i32, token: u64, events: u32) -> Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: FFI call; `epfd` and `fd` are open descriptors and `ev` is a valid epoll_event
    // read by the call only.
    if unsafe { libc::epoll_ctl(epfd.as_raw_fd(), op, fd, &mut ev) } != 0 {
        return Err(Error::System(format!(
            "epoll_ctl: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// A nonblocking TCP socket whose connect to `addr` (IPv4) is under way.
fn connect_nonblocking(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(v4) = addr else {
        return Err(std::io::Error::new(
            ErrorKind::Unsupported,
            "the benchmark's members connect over IPv4 only",
        ));
    };
    // SAFETY: FFI call without pointers.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: FFI call; `sa` is a valid sockaddr_in of the given length, read by the call only.
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(stream)
}

impl Swarm {
    fn new(opts: MembersOptions) -> Result<Swarm> {
        let mut reg = Registration::worker(GROUP, opts.world, None, Vec::new());
        reg.elastic = true;
        reg.light = opts.views == Views::Notice;
        reg.view_deltas = opts.views == Views::Delta;
        reg.heartbeat_timeout_ms = u64::try_from(opts.heartbeat_timeout.as_millis()).unwrap_or(0);
        reg.policy = GroupPolicy {
            min_size: 1,
            max_size: None,
            join_window_ms: opts.join_window_ms,
        };
        let reg = proto::encode(MsgType::Register, &reg)?;
        // SAFETY: FFI call without pointers.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(Error::System(format!(
                "epoll_create1: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` was just returned by epoll_create1 and is owned by nobody else.
        let epfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: FFI calls on descriptor 0 (our stdin), no pointers.
        unsafe {
            let fl = libc::fcntl(0, libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(0, libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
        }
        epoll_add(&epfd, 0, STDIN_TOKEN)?;
        Ok(Swarm {
            opts,
            reg,
            epfd,
            members: Vec::new(),
            registered: 0,
            reg_dirty: false,
            epochs: BTreeMap::new(),
            dirty: BTreeSet::new(),
            hb: BinaryHeap::new(),
            pending: Vec::new(),
            hb_sent: 0,
            hb_echo: 0,
            notices: 0,
            closing: false,
            stdin_buf: Vec::new(),
            stdin_eof: false,
            out: String::new(),
            batch: None,
        })
    }

    /// Starts a nonblocking connection of one more member (its registration is written once
    /// connected, see [`Swarm::connected`]).
    fn connect(&mut self, in_batch: bool) -> Result<()> {
        let i = self.members.len();
        let stream = connect_nonblocking(self.opts.addr).map_err(|e| {
            Error::System(format!(
                "member {i}: cannot connect to the coordinator at {}: {e}",
                self.opts.addr
            ))
        })?;
        let _ = stream.set_nodelay(true);
        epoll_ctl(
            &self.epfd,
            libc::EPOLL_CTL_ADD,
            stream.as_raw_fd(),
            i as u64,
            (libc::EPOLLIN | libc::EPOLLOUT) as u32,
        )?;
        self.members.push(Member {
            stream: Some(stream),
            rbuf: Vec::new(),
            wbuf: self.reg.clone(),
            id: None,
            epoch: 0,
            size: 0,
            ack_pending: None,
            queued: false,
            connecting: true,
            reg_unwritten: true,
            in_batch,
        });
        Ok(())
    }

    /// Member `i`'s connect finished: checks it and writes the registration.
    fn connected(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        let Some(s) = m.stream.as_ref() else {
            return Ok(());
        };
        match s.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => {
                return Err(Error::System(format!(
                    "member {i}: cannot connect to the coordinator at {}: {e}",
                    self.opts.addr
                )))
            }
        }
        if let Err(e) = s.peer_addr() {
            return Err(Error::System(format!(
                "member {i}: cannot connect to the coordinator at {}: {e}",
                self.opts.addr
            )));
        }
        m.connecting = false;
        epoll_ctl(
            &self.epfd,
            libc::EPOLL_CTL_MOD,
            s.as_raw_fd(),
            i as u64,
            libc::EPOLLIN as u32,
        )?;
        self.send(i, &[])
    }

    /// Member `i`'s registration was written.
    fn reg_written(&mut self, i: usize, now: u64) {
        if !self.members[i].in_batch {
            return;
        }
        if let Some(b) = self.batch.as_mut() {
            b.left = b.left.saturating_sub(1);
            b.first_ns = if b.first_ns == 0 {
                now
            } else {
                b.first_ns.min(now)
            };
            b.last_ns = b.last_ns.max(now);
            if b.left == 0 {
                let _ = writeln!(self.out, "joined {} {} {}", b.k, b.first_ns, b.last_ns);
                self.batch = None;
            }
        }
    }

    /// Queues `bytes` for member `i` and writes what it can.
    fn send(&mut self, i: usize, bytes: &[u8]) -> Result<()> {
        let m = &mut self.members[i];
        if m.stream.is_none() {
            return Ok(());
        }
        m.wbuf.extend_from_slice(bytes);
        if m.connecting {
            return Ok(());
        }
        self.flush(i)?;
        let m = &mut self.members[i];
        if !m.wbuf.is_empty() && !m.queued {
            m.queued = true;
            self.pending.push(i);
        }
        Ok(())
    }

    /// Writes what it can of member `i`'s buffer; counts an acknowledgement fully written.
    fn flush(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        let Some(s) = m.stream.as_mut() else {
            m.wbuf.clear();
            return Ok(());
        };
        while !m.wbuf.is_empty() {
            match s.write(&m.wbuf) {
                Ok(0) => return Err(Error::Coordinator(format!("member {i}: write returned 0"))),
                Ok(n) => {
                    m.wbuf.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if self.closing => {
                    let _ = e;
                    m.stream = None;
                    m.wbuf.clear();
                    return Ok(());
                }
                Err(e) => {
                    return Err(Error::Coordinator(format!(
                        "member {i} (id {:?}): write failed: {e}",
                        m.id
                    )))
                }
            }
        }
        if std::mem::replace(&mut m.reg_unwritten, false) {
            self.reg_written(i, mono_ns());
        }
        let m = &mut self.members[i];
        if let Some(ep) = m.ack_pending.take() {
            let now = mono_ns();
            let st = self.epochs.entry(ep).or_default();
            st.acked += 1;
            st.acked_ns = st.acked_ns.max(now);
            self.dirty.insert(ep);
        }
        Ok(())
    }

    /// Reads and handles what member `i` has to read.
    fn read(&mut self, i: usize) -> Result<()> {
        let mut chunk = [0u8; 4096];
        let mut eof = None;
        {
            let m = &mut self.members[i];
            let Some(s) = m.stream.as_mut() else {
                return Ok(());
            };
            loop {
                match s.read(&mut chunk) {
                    Ok(0) => {
                        eof = Some("the coordinator closed the connection".to_string());
                        break;
                    }
                    Ok(n) => m.rbuf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        eof = Some(format!("connection failed: {e}"));
                        break;
                    }
                }
            }
        }
        loop {
            let f = match take_frame(&mut self.members[i].rbuf, i) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) if self.closing => {
                    let _ = e;
                    break;
                }
                Err(e) => return Err(e),
            };
            self.handle(i, &f)?;
        }
        if let Some(why) = eof {
            let m = &mut self.members[i];
            m.stream = None;
            if !self.closing {
                return Err(Error::Coordinator(format!(
                    "member {i} (id {:?}): {why}{}",
                    m.id,
                    if m.id.is_none() {
                        " before answering the registration (with more than its max_unauthenticated \
                         handshakes open at once, default 256, it closes the oldest)"
                    } else {
                        ""
                    }
                )));
            }
        }
        Ok(())
    }

    fn handle(&mut self, i: usize, f: &proto::Frame) -> Result<()> {
        let bad = |what: &str, e: String| {
            Error::Coordinator(format!("member {i}: bad {what} frame: {e}"))
        };
        match MsgType::from_u16(f.ty) {
            Some(MsgType::Registered) => {
                let r: proto::Registered = f.body().map_err(|e| bad("registered", e))?;
                self.members[i].id = Some(r.member_id);
                self.registered += 1;
                self.reg_dirty = true;
            }
            Some(MsgType::Notice) => {
                let n: proto::Notice = f.body().map_err(|e| bad("notice", e))?;
                self.view_read(
                    i,
                    n.member_id,
                    &n.group,
                    n.epoch,
                    n.size,
                    n.rank,
                    f.payload.len(),
                )?;
            }
            Some(MsgType::View) => {
                let v: proto::ViewMsg = f.body().map_err(|e| bad("view", e))?;
                let rank = v.view.rank_of(v.member_id);
                let (size, epoch) = (v.view.members.len(), v.view.epoch);
                self.view_read(
                    i,
                    v.member_id,
                    &v.view.group,
                    epoch,
                    size,
                    rank,
                    f.payload.len(),
                )?;
            }
            Some(MsgType::ViewDelta) => {
                let d: proto::ViewDeltaMsg = f.body().map_err(|e| bad("view delta", e))?;
                let m = &self.members[i];
                if d.base_epoch != m.epoch || m.epoch == 0 {
                    return Err(Error::Internal(format!(
                        "member {i} (id {:?}) got a delta from epoch {} holding epoch {}",
                        m.id, d.base_epoch, m.epoch
                    )));
                }
                let size = (m.size + d.joined.len()).saturating_sub(d.left.len());
                // Rank: not rebuilt here (that needs the whole view); a member that left is
                // told so by its absence, which the benchmark never does.
                let rank = (!m.id.is_some_and(|id| d.left.contains(&id))).then_some(0);
                self.view_read(
                    i,
                    d.member_id,
                    &d.group,
                    d.epoch,
                    size,
                    rank,
                    f.payload.len(),
                )?;
            }
            Some(MsgType::Heartbeat) => self.hb_echo += 1,
            Some(MsgType::Error) => {
                let m: proto::ErrorMsg = f.body().map_err(|e| bad("error", e))?;
                return Err(Error::Coordinator(format!(
                    "member {i} (id {:?}) refused: {}",
                    self.members[i].id, m.message
                )));
            }
            _ => {
                return Err(Error::Internal(format!(
                    "member {i} got unexpected message type {}",
                    f.ty
                )))
            }
        }
        Ok(())
    }

    /// Member `i` read the view (or notice) of `epoch` with `size` members, giving it `rank`,
    /// in a frame of `bytes` payload bytes: checked, counted and acknowledged.
    #[allow(clippy::too_many_arguments)]
    fn view_read(
        &mut self,
        i: usize,
        member_id: u64,
        group: &str,
        epoch: u64,
        size: usize,
        rank: Option<usize>,
        bytes: usize,
    ) -> Result<()> {
        let now = mono_ns();
        let m = &mut self.members[i];
        if Some(member_id) != m.id || group != GROUP {
            return Err(Error::Internal(format!(
                "member {i} (id {:?}) got a view for member {member_id} of group {group}",
                m.id
            )));
        }
        if m.epoch != 0 && epoch != m.epoch + 1 {
            return Err(Error::Internal(format!(
                "member {i} (id {:?}) read epoch {epoch} after epoch {}",
                m.id, m.epoch
            )));
        }
        if !rank.is_some_and(|r| r < size) {
            return Err(Error::Internal(format!(
                "member {i} (id {:?}): epoch {epoch} gives rank {rank:?} of {size}",
                m.id
            )));
        }
        let first = m.epoch == 0;
        m.epoch = epoch;
        m.size = size;
        m.ack_pending = Some(epoch);
        self.notices += 1;
        let st = self.epochs.entry(epoch).or_default();
        st.size = size;
        st.seen += 1;
        st.bytes += bytes as u64;
        st.first_ns = if st.first_ns == 0 {
            now
        } else {
            st.first_ns.min(now)
        };
        st.last_ns = st.last_ns.max(now);
        self.dirty.insert(epoch);
        if first && !self.opts.heartbeat.is_zero() {
            self.hb
                .push(std::cmp::Reverse((Instant::now() + self.opts.heartbeat, i)));
        }
        let ack = proto::encode(MsgType::Ack, &proto::Ack { epoch })?;
        self.send(i, &ack)
    }

    /// Sends the heartbeats that are due; returns when the next one is.
    fn heartbeats(&mut self) -> Result<Option<Instant>> {
        let now = Instant::now();
        while let Some(&std::cmp::Reverse((due, i))) = self.hb.peek() {
            if due > now {
                return Ok(Some(due));
            }
            self.hb.pop();
            if self.members[i].stream.is_none() || self.closing {
                continue;
            }
            let epoch = self.members[i].epoch;
            let b = proto::encode(MsgType::Heartbeat, &proto::Heartbeat { epoch })?;
            self.send(i, &b)?;
            self.hb_sent += 1;
            self.hb
                .push(std::cmp::Reverse((now + self.opts.heartbeat, i)));
        }
        Ok(None)
    }

    /// Reads commands from stdin.
    fn commands(&mut self) -> Result<()> {
        let mut chunk = [0u8; 1024];
        loop {
            // SAFETY: FFI call; `chunk` is valid for writes of its length for the duration of
            // the call.
            let n = unsafe { libc::read(0, chunk.as_mut_ptr().cast(), chunk.len()) };
            if n == 0 {
                self.stdin_eof = true;
                break;
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    ErrorKind::WouldBlock => break,
                    ErrorKind::Interrupted => continue,
                    _ => return Err(Error::System(format!("reading commands: {e}"))),
                }
            }
            let n = usize::try_from(n).unwrap_or(0);
            self.stdin_buf.extend_from_slice(&chunk[..n]);
        }
        while let Some(pos) = self.stdin_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.stdin_buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line).trim().to_string();
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["join", k] => {
                    let k: usize = k
                        .parse()
                        .map_err(|e| Error::InvalidArgument(format!("join {k}: {e}")))?;
                    if self.batch.is_some() {
                        return Err(Error::InvalidArgument(
                            "join while a join is under way".into(),
                        ));
                    }
                    if k == 0 {
                        let _ = writeln!(self.out, "joined 0 0 0");
                        continue;
                    }
                    self.batch = Some(JoinBatch {
                        k,
                        left: k,
                        first_ns: 0,
                        last_ns: 0,
                    });
                    for _ in 0..k {
                        self.connect(true)?;
                    }
                }
                ["stats"] => {
                    let _ = writeln!(
                        self.out,
                        "stats {} {} {}",
                        self.hb_sent, self.hb_echo, self.notices
                    );
                }
                ["close"] => {
                    self.closing = true;
                    let _ = writeln!(self.out, "closing");
                }
                [] => {}
                _ => return Err(Error::InvalidArgument(format!("unknown command {line:?}"))),
            }
        }
        Ok(())
    }

    /// Writes the events of this iteration to stdout.
    fn report(&mut self) -> Result<()> {
        if self.reg_dirty {
            self.reg_dirty = false;
            let _ = writeln!(self.out, "reg {}", self.registered);
        }
        for ep in std::mem::take(&mut self.dirty) {
            if let Some(s) = self.epochs.get(&ep) {
                let _ = writeln!(
                    self.out,
                    "ep {ep} {} {} {} {} {} {} {}",
                    s.size, s.seen, s.acked, s.first_ns, s.last_ns, s.acked_ns, s.bytes
                );
            }
        }
        if !self.out.is_empty() {
            let mut o = std::io::stdout().lock();
            o.write_all(self.out.as_bytes())
                .and_then(|()| o.flush())
                .map_err(|e| Error::System(format!("writing to the benchmark: {e}")))?;
            self.out.clear();
        }
        Ok(())
    }

    fn run(&mut self) -> Result<()> {
        let mut to_connect = self.opts.count;
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        loop {
            while to_connect > 0
                && self.members.len() - self.registered.min(self.members.len())
                    < self.opts.max_connecting
            {
                self.connect(false)?;
                to_connect -= 1;
            }
            let next_hb = self.heartbeats()?;
            let pending = std::mem::take(&mut self.pending);
            for i in pending {
                self.members[i].queued = false;
                if self.members[i].connecting {
                    continue;
                }
                self.flush(i)?;
                let m = &mut self.members[i];
                if !m.wbuf.is_empty() && m.stream.is_some() {
                    m.queued = true;
                    self.pending.push(i);
                }
            }
            self.report()?;
            if self.stdin_eof {
                return Ok(());
            }
            let timeout_ms: i32 = if !self.pending.is_empty() {
                1
            } else {
                let cap = Duration::from_millis(100);
                let wait = next_hb.map_or(cap, |t| {
                    t.saturating_duration_since(Instant::now()).min(cap)
                });
                i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(100)
            };
            let cap = i32::try_from(events.len()).unwrap_or(1024);
            // SAFETY: FFI call; `events` is a valid, writable array of `cap` epoll_event
            // structs for the duration of the call.
            let n = unsafe {
                libc::epoll_wait(self.epfd.as_raw_fd(), events.as_mut_ptr(), cap, timeout_ms)
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::System(format!("epoll_wait: {e}")));
            }
            for ev in events.iter().take(usize::try_from(n).unwrap_or(0)) {
                let token = ev.u64;
                if token == STDIN_TOKEN {
                    self.commands()?;
                } else if let Ok(i) = usize::try_from(token) {
                    if i < self.members.len() {
                        if self.members[i].connecting {
                            self.connected(i)?;
                        }
                        if ev.events & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
                        {
                            self.read(i)?;
                        }
                    }
                }
            }
        }
    }
}

/// The member process: registers [`MembersOptions::count`] members, then serves them and the
/// benchmark's commands until its stdin closes. Errors are also written as an `err` line on
/// stdout.
///
/// Errors: `Error::System` for socket or descriptor failures, `Error::Coordinator` when the
/// coordinator refuses or drops a member, `Error::Internal` for a wrong notice sequence.
pub fn run_members(opts: MembersOptions) -> Result<()> {
    let r = raise_nofile()
        .and_then(|_| Swarm::new(opts))
        .and_then(|mut s| s.run());
    if let Err(e) = &r {
        let msg = e.to_string().replace('\n', " ");
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "err {msg}");
        let _ = o.flush();
    }
    r
}

// ---------------------------------------------------------------------------------------------
// The parent: coordinator and measurements.

/// An event from a member process.
enum Msg {
    Reg(usize),
    Ep(u64, EpStat),
    Joined(u64, u64),
    Stats(u64, u64, u64),
    Closing,
    Err(String),
    Gone,
}

fn parse_line(line: &str) -> Msg {
    let w: Vec<&str> = line.split_whitespace().collect();
    let n = |k: usize| w.get(k).and_then(|x| x.parse::<u64>().ok());
    let bad = || Msg::Err(format!("unreadable line {line:?}"));
    match w.first().copied() {
        Some("reg") => n(1).map_or_else(bad, |v| Msg::Reg(v as usize)),
        Some("ep") => match (n(1), n(2), n(3), n(4), n(5), n(6), n(7), n(8)) {
            (Some(e), Some(sz), Some(seen), Some(ack), Some(f), Some(l), Some(a), Some(b)) => {
                Msg::Ep(
                    e,
                    EpStat {
                        size: sz as usize,
                        seen: seen as usize,
                        acked: ack as usize,
                        first_ns: f,
                        last_ns: l,
                        acked_ns: a,
                        bytes: b,
                    },
                )
            }
            _ => bad(),
        },
        Some("joined") => match (n(2), n(3)) {
            (Some(f), Some(l)) => Msg::Joined(f, l),
            _ => bad(),
        },
        Some("stats") => match (n(1), n(2), n(3)) {
            (Some(a), Some(b), Some(c)) => Msg::Stats(a, b, c),
            _ => bad(),
        },
        Some("closing") => Msg::Closing,
        Some("err") => Msg::Err(line.get(4..).unwrap_or("").to_string()),
        _ => bad(),
    }
}

#[derive(Default)]
struct ChildState {
    registered: usize,
    epochs: HashMap<u64, EpStat>,
    joined: Option<(u64, u64)>,
    stats: Option<(u64, u64, u64)>,
    closing: bool,
}

/// Totals of an epoch over the member processes.
#[derive(Debug, Default, Clone, Copy)]
struct EpSum {
    size: usize,
    seen: usize,
    acked: usize,
    first_ns: u64,
    last_ns: u64,
    acked_ns: u64,
    bytes: u64,
}

struct Children {
    procs: Vec<Child>,
    stdins: Vec<Option<ChildStdin>>,
    rx: Receiver<(usize, Msg)>,
    st: Vec<ChildState>,
    /// Last time any event arrived.
    progress: Instant,
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stdins.clear();
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in &mut self.procs {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
}

impl Children {
    fn spawn(exe: &Path, opts: &[MembersOptions]) -> Result<Children> {
        let (tx, rx) = mpsc::channel();
        let mut c = Children {
            procs: Vec::new(),
            stdins: Vec::new(),
            rx,
            st: Vec::new(),
            progress: Instant::now(),
        };
        for (k, o) in opts.iter().enumerate() {
            let mut child = Command::new(exe)
                .arg(MEMBERS_SUBCOMMAND)
                .args(o.to_args())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| {
                    Error::System(format!(
                        "cannot start member process {k} ({}): {e}",
                        exe.display()
                    ))
                })?;
            c.stdins.push(child.stdin.take());
            let out = child.stdout.take();
            c.procs.push(child);
            c.st.push(ChildState::default());
            let Some(out) = out else {
                return Err(Error::Internal("member process without stdout".into()));
            };
            let tx = tx.clone();
            std::thread::Builder::new()
                .name("bench-rx".into())
                .spawn(move || {
                    for line in BufReader::new(out).lines() {
                        let Ok(line) = line else { break };
                        if tx.send((k, parse_line(&line))).is_err() {
                            return;
                        }
                    }
                    let _ = tx.send((k, Msg::Gone));
                })
                .map_err(|e| Error::System(format!("cannot start a reader thread: {e}")))?;
        }
        Ok(c)
    }

    fn send(&mut self, k: usize, line: &str) -> Result<()> {
        let Some(Some(s)) = self.stdins.get_mut(k) else {
            return Err(Error::Internal(format!("member process {k} has no stdin")));
        };
        s.write_all(format!("{line}\n").as_bytes())
            .and_then(|()| s.flush())
            .map_err(|e| Error::System(format!("member process {k}: {e}")))
    }

    /// Takes the events that arrive within `wait`.
    fn pump(&mut self, wait: Duration) -> Result<()> {
        let mut first = true;
        loop {
            let r = if first {
                self.rx.recv_timeout(wait)
            } else {
                self.rx.try_recv().map_err(|_| RecvTimeoutError::Timeout)
            };
            first = false;
            let (k, m) = match r {
                Ok(x) => x,
                Err(RecvTimeoutError::Timeout) => return Ok(()),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Internal("every member process is gone".into()))
                }
            };
            self.progress = Instant::now();
            let st = &mut self.st[k];
            match m {
                Msg::Reg(n) => st.registered = n,
                Msg::Ep(e, s) => {
                    st.epochs.insert(e, s);
                }
                Msg::Joined(f, l) => st.joined = Some((f, l)),
                Msg::Stats(a, b, c) => st.stats = Some((a, b, c)),
                Msg::Closing => st.closing = true,
                Msg::Err(e) => {
                    return Err(Error::Coordinator(format!(
                        "member process {k}: {e} ({} members registered; coordinator process: {} descriptors open, {} threads)",
                        self.registered(),
                        open_fds().map_or("?".into(), |v| v.to_string()),
                        proc_status("Threads").map_or("?".into(), |v| v.to_string()),
                    )))
                }
                Msg::Gone => {
                    if !st.closing {
                        return Err(Error::Coordinator(format!(
                            "member process {k} exited unexpectedly"
                        )));
                    }
                }
            }
        }
    }

    /// Pumps until `done` holds; fails after `timeout` or after [`STALL`] without events.
    fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Children) -> bool,
    ) -> Result<()> {
        let t0 = Instant::now();
        self.progress = t0;
        while !done(self) {
            let now = Instant::now();
            if now.duration_since(t0) >= timeout || now.duration_since(self.progress) >= STALL {
                return Err(Error::Timeout {
                    what: format!(
                        "coordinator bench: {what} ({}; {} registered; coordinator process: {} descriptors open, {} threads)",
                        if now.duration_since(t0) >= timeout {
                            "phase timeout"
                        } else {
                            "no progress for 30 s"
                        },
                        self.registered(),
                        open_fds().map_or("?".into(), |v| v.to_string()),
                        proc_status("Threads").map_or("?".into(), |v| v.to_string()),
                    ),
                    secs: t0.elapsed().as_secs_f64(),
                });
            }
            self.pump(Duration::from_millis(50))?;
        }
        Ok(())
    }

    fn registered(&self) -> usize {
        self.st.iter().map(|s| s.registered).sum()
    }

    fn epoch(&self, e: u64) -> EpSum {
        let mut s = EpSum::default();
        for c in &self.st {
            if let Some(x) = c.epochs.get(&e) {
                s.size = s.size.max(x.size);
                s.seen += x.seen;
                s.acked += x.acked;
                if x.seen > 0 {
                    s.first_ns = if s.first_ns == 0 {
                        x.first_ns
                    } else {
                        s.first_ns.min(x.first_ns)
                    };
                }
                s.last_ns = s.last_ns.max(x.last_ns);
                s.acked_ns = s.acked_ns.max(x.acked_ns);
                s.bytes += x.bytes;
            }
        }
        s
    }

    /// Every member of epoch `e` read and acknowledged it.
    fn complete(&self, e: u64) -> bool {
        let s = self.epoch(e);
        s.size > 0 && s.seen == s.size && s.acked == s.size
    }

    fn cpu(&self) -> f64 {
        self.procs
            .iter()
            .filter_map(|p| proc_cpu(&p.id().to_string()))
            .sum()
    }

    /// Asks every process for its counters: (heartbeats sent, echoes read).
    fn stats(&mut self, timeout: Duration) -> Result<(u64, u64)> {
        for s in &mut self.st {
            s.stats = None;
        }
        for k in 0..self.procs.len() {
            self.send(k, "stats")?;
        }
        self.wait("member statistics", timeout, |c| {
            c.st.iter().all(|s| s.stats.is_some())
        })?;
        Ok(self.st.iter().fold((0, 0), |(a, b), s| {
            let (x, y, _) = s.stats.unwrap_or_default();
            (a + x, b + y)
        }))
    }
}

fn since(ns: u64, from: u64) -> Duration {
    Duration::from_nanos(ns.saturating_sub(from))
}

/// Runs the benchmark: the coordinator here, the members in `opts.procs` processes of `exe`
/// (a program that runs [`run_members`] when its first argument is [`MEMBERS_SUBCOMMAND`]).
///
/// Errors: `Error::InvalidArgument` for zero members or processes; `Error::System` when a
/// process, socket or descriptor fails; `Error::Coordinator` when a member is refused or
/// dropped or a member process fails; `Error::Timeout` when a phase takes longer than
/// [`BenchOptions::phase_timeout`] or makes no progress for 30 s (the message names the
/// registrations and the coordinator process's descriptors and threads).
pub fn coordinator_bench(opts: &BenchOptions, exe: &Path) -> Result<BenchReport> {
    if opts.members == 0 || opts.procs == 0 || opts.procs > opts.members {
        return Err(Error::InvalidArgument(format!(
            "the coordinator bench needs at least one member and 1..=members processes (members {}, processes {})",
            opts.members, opts.procs
        )));
    }
    let nofile_limit = raise_nofile()?;
    let need = COORD_FDS_PER_CONN * (opts.members + opts.rounds) as u64 + 64;
    if need > nofile_limit {
        tracing::warn!(target: "braid::membership",
            "coordinator bench: {} members need about {need} descriptors in the coordinator process ({COORD_FDS_PER_CONN} per connection), above RLIMIT_NOFILE {nofile_limit}: expect the formation to stall",
            opts.members + opts.rounds);
    }
    let coord = Coordinator::bind("127.0.0.1:0")?;
    let n = opts.members;
    let p = opts.procs;
    let child_opts: Vec<MembersOptions> = (0..p)
        .map(|k| MembersOptions {
            addr: coord.local_addr(),
            count: n / p + usize::from(k < n % p),
            world: n,
            join_window_ms: opts.join_window_ms,
            heartbeat: opts.heartbeat,
            heartbeat_timeout: opts.heartbeat_timeout,
            max_connecting: opts.max_connecting,
            views: opts.views,
        })
        .collect();
    let mut profile = Vec::new();
    let mut snap = thread_snapshot();
    let mut t_phase = Instant::now();
    let mut phase_end = |name: &str, snap: &mut ThreadSnap, t: &mut Instant| {
        let s = thread_snapshot();
        profile.push(phase_cost(name, t.elapsed(), snap, &s));
        *snap = s;
        *t = Instant::now();
    };

    // 1. Formation.
    let lo0 = listen_overflows();
    let t0 = mono_ns();
    let mut c = Children::spawn(exe, &child_opts)?;
    c.wait("registering the members", opts.phase_timeout, |c| {
        c.registered() >= n
    })?;
    let register = since(mono_ns(), t0);
    c.wait("the epoch-1 view", opts.phase_timeout, |c| c.complete(1))?;
    let e1 = c.epoch(1);
    if e1.size != n {
        return Err(Error::Internal(format!(
            "epoch 1 has {} members, expected {n}",
            e1.size
        )));
    }
    phase_end("formation", &mut snap, &mut t_phase);
    let lo_formation = lo0
        .zip(listen_overflows())
        .map(|(a, b)| b.saturating_sub(a));

    // 2. Single joins.
    let mut epoch = 1u64;
    let mut size = n;
    let mut rounds = Vec::new();
    for r in 0..opts.rounds {
        let k = r % p;
        c.st[k].joined = None;
        c.send(k, "join 1")?;
        c.wait("a joiner's registration", opts.phase_timeout, |c| {
            c.st[k].joined.is_some()
        })?;
        let (tw, _) = c.st[k].joined.unwrap_or_default();
        epoch += 1;
        size += 1;
        let e = epoch;
        c.wait(
            &format!("the view of epoch {e} (one join)"),
            opts.phase_timeout,
            |c| c.complete(e),
        )?;
        let s = c.epoch(e);
        if s.size != size {
            return Err(Error::Internal(format!(
                "epoch {e} has {} members, expected {size}",
                s.size
            )));
        }
        rounds.push(JoinRound {
            epoch: e,
            size,
            first: since(s.first_ns, tw),
            last: since(s.last_ns, tw),
            acked: since(s.acked_ns, tw),
            bytes: s.bytes,
        });
    }
    phase_end("joins", &mut snap, &mut t_phase);

    // 3. Steady heartbeats.
    let steady = if opts.steady.is_zero() {
        None
    } else {
        // Let every member's heartbeat start (the last joiner's too).
        let until = Instant::now() + opts.heartbeat + Duration::from_millis(200);
        while Instant::now() < until {
            c.pump(Duration::from_millis(50))?;
        }
        let (hb0, echo0) = c.stats(Duration::from_secs(30))?;
        let s0 = Instant::now();
        phase_end("settle", &mut snap, &mut t_phase);
        let w0 = Instant::now();
        let cpu0 = proc_cpu("self").unwrap_or(0.0);
        let kids0 = c.cpu();
        let until = w0 + opts.steady;
        while Instant::now() < until {
            c.pump(
                until
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100)),
            )?;
        }
        let cpu1 = proc_cpu("self").unwrap_or(0.0);
        let kids1 = c.cpu();
        let wall = w0.elapsed();
        phase_end("steady", &mut snap, &mut t_phase);
        let (hb1, echo1) = c.stats(Duration::from_secs(30))?;
        let secs = wall.as_secs_f64().max(1e-9);
        // The counters were read around the window, a little wider than it.
        let span = s0.elapsed().as_secs_f64().max(1e-9);
        Some(Steady {
            wall,
            cpu_pct: (cpu1 - cpu0) / secs * 100.0,
            members_cpu_pct: (kids1 - kids0) / secs * 100.0,
            heartbeats_per_s: (hb1 - hb0) as f64 / span,
            echoes_per_s: (echo1 - echo0) as f64 / span,
        })
    };
    // No view may have changed since the last join (a member declared dead, say).
    if c.st.iter().any(|s| s.epochs.keys().any(|&k| k > epoch)) {
        return Err(Error::Coordinator(format!(
            "the view changed after epoch {epoch} without a join (a member declared dead?)"
        )));
    }

    // 4. Join storm.
    let mut lo_storm = None;
    let storm = if opts.storm == 0 {
        Storm::Skipped("no storm asked".into())
    } else {
        let open = open_fds().unwrap_or(0);
        let need = open + COORD_FDS_PER_CONN * opts.storm as u64 + 16;
        if need > nofile_limit {
            Storm::Skipped(format!(
                "{} more connections need about {} descriptors in the coordinator process ({COORD_FDS_PER_CONN} per connection: the accepted stream), which has {open} open of RLIMIT_NOFILE {nofile_limit} (the hard limit)",
                opts.storm,
                COORD_FDS_PER_CONN * opts.storm as u64
            ))
        } else {
            let lo0 = listen_overflows();
            let r = run_storm(&mut c, opts, epoch, size);
            lo_storm = lo0
                .zip(listen_overflows())
                .map(|(a, b)| b.saturating_sub(a));
            match r {
                Ok(s) => s,
                Err(e) => Storm::Failed(e.to_string()),
            }
        }
    };
    if !matches!(storm, Storm::Skipped(_)) {
        phase_end("storm", &mut snap, &mut t_phase);
    }
    let peak_rss_kib = proc_status("VmHWM");
    let threads = proc_status("Threads");
    let fds = open_fds();

    // Close: members first ignore the coordinator going away, then it stops, then they exit.
    let failed = matches!(storm, Storm::Failed(_));
    for k in 0..p {
        let _ = c.send(k, "close");
    }
    if !failed {
        c.wait("closing", Duration::from_secs(30), |c| {
            c.st.iter().all(|s| s.closing)
        })?;
    }
    let mut coord = coord;
    coord.shutdown();
    drop(c);

    Ok(BenchReport {
        members: n,
        procs: p,
        views: opts.views,
        join_window_ms: opts.join_window_ms,
        heartbeat: opts.heartbeat,
        register,
        formation: since(e1.last_ns, t0),
        formation_acked: since(e1.acked_ns, t0),
        join_view: Stats::of(&rounds.iter().map(|r| r.last).collect::<Vec<_>>()),
        rounds,
        steady,
        storm_size: opts.storm,
        storm,
        profile,
        listen_overflows: (lo_formation, lo_storm),
        peak_rss_kib,
        threads,
        fds,
        nofile_limit,
    })
}

/// The join storm: `opts.storm` joiners spread over the member processes.
fn run_storm(c: &mut Children, opts: &BenchOptions, epoch: u64, size: usize) -> Result<Storm> {
    let p = c.procs.len();
    for k in 0..p {
        c.st[k].joined = None;
        let share = opts.storm / p + usize::from(k < opts.storm % p);
        if share > 0 {
            c.send(k, &format!("join {share}"))?;
        } else {
            c.st[k].joined = Some((0, 0));
        }
    }
    c.wait("the storm's registrations", opts.phase_timeout, |c| {
        c.st.iter().all(|s| s.joined.is_some())
    })?;
    let written: Vec<(u64, u64)> =
        c.st.iter()
            .filter_map(|s| s.joined)
            .filter(|j| j.0 > 0)
            .collect();
    let start = written.iter().map(|j| j.0).min().unwrap_or(0);
    let end = written.iter().map(|j| j.1).max().unwrap_or(0);
    let want = size + opts.storm;
    // The view holding every joiner (joiners straddling two windows take two views).
    let found = |c: &Children| -> Option<u64> {
        (epoch + 1..epoch + 1 + opts.storm as u64)
            .take_while(|&e| c.epoch(e).size > 0)
            .find(|&e| c.epoch(e).size == want && c.complete(e))
    };
    c.wait(
        &format!("the view holding the {} joiners of the storm", opts.storm),
        opts.phase_timeout,
        |c| found(c).is_some(),
    )?;
    let e = found(c).unwrap_or(epoch + 1);
    let s = c.epoch(e);
    Ok(Storm::Done {
        joiners: opts.storm,
        epoch: e,
        views: e - epoch,
        size: s.size,
        written: since(end, start),
        first: since(s.first_ns, start),
        last: since(s.last_ns, start),
        acked: since(s.acked_ns, start),
    })
}

/// `braid-coordinator bench --state-machine N`: the coordinator's membership state machine
/// alone (no sockets, no disk) with one elastic group of `n` members: the cost of a heartbeat
/// and an acknowledgement, and of one join decision and one failure decision (each publishes
/// the next view). The report ends with one line
/// `state_machine members=N join_decision_ms=X failure_decision_ms=Y`.
///
/// Errors: as the state machine's (an `n` out of range, or a decision that did not publish).
pub fn state_machine_bench(n: usize) -> Result<String> {
    super::coordinator::state_machine_bench(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_options_round_trip() {
        let o = MembersOptions {
            addr: "127.0.0.1:4000".parse().unwrap(),
            count: 17,
            world: 100,
            join_window_ms: 50,
            heartbeat: Duration::from_millis(1000),
            heartbeat_timeout: Duration::from_millis(10000),
            max_connecting: 8,
            views: Views::Delta,
        };
        assert_eq!(MembersOptions::from_args(&o.to_args()).unwrap(), o);
        let mut bad = o.to_args();
        bad.push("--what".into());
        assert!(MembersOptions::from_args(&bad).is_err());
        assert!(MembersOptions::from_args(&bad[..3]).is_err());
    }

    #[test]
    fn lines_parse() {
        assert!(matches!(parse_line("reg 12"), Msg::Reg(12)));
        match parse_line("ep 3 10 9 8 100 200 300 4096") {
            Msg::Ep(3, s) => {
                assert_eq!((s.size, s.seen, s.acked), (10, 9, 8));
                assert_eq!((s.first_ns, s.last_ns, s.acked_ns), (100, 200, 300));
                assert_eq!(s.bytes, 4096);
            }
            _ => panic!("ep line"),
        }
        assert!(matches!(parse_line("joined 1 5 6"), Msg::Joined(5, 6)));
        assert!(matches!(parse_line("err boom"), Msg::Err(m) if m == "boom"));
        assert!(matches!(parse_line("ep 3"), Msg::Err(_)));
        assert!(matches!(parse_line("what"), Msg::Err(_)));
    }

    #[test]
    fn self_cpu_and_threads_are_readable() {
        assert!(proc_cpu("self").is_some());
        let s = thread_snapshot();
        assert!(!s.is_empty());
        assert!(open_fds().is_some_and(|n| n > 0));
    }
}
