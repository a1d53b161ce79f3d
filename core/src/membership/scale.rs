//! Coordinator scale benchmark: view-change times of one elastic group of many *light* members,
//! all simulated in this process.
//!
//! [`view_change_bench`] binds a [`Coordinator`] on `127.0.0.1:0`, connects `members` simulated
//! light clients (nonblocking sockets multiplexed with `poll(2)` on the calling thread; the
//! coordinator itself runs a thread per connection) and registers them into the elastic group
//! `"scale"` (world size = `members`). Every client acknowledges each notice as soon as it
//! reads it, like a real light member. Then each round registers one more light joiner and
//! measures, from the moment its registration was written:
//! * the first and the last *existing* member reading the notice of the new epoch;
//! * the last acknowledgement written by the clients;
//! * the coordinator reporting every member installed the epoch ("stable"; observed by polling
//!   [`Coordinator::status`], so it is late by up to a few status calls, see
//!   [`ScaleReport::status_cost`]).
//!
//! A joiner's admission waits for the group's batching window (`join_window_ms`) and the
//! coordinator's 20 ms tick, so the notice times include that fixed delay.
//!
//! Every simulated member uses one socket here and the coordinator holds several descriptors
//! per connection, so the benchmark raises `RLIMIT_NOFILE` as far as it needs (and fails with a
//! clear error where it cannot).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::proto::{self, MsgType};
use super::{Coordinator, GroupPolicy, Registration};
use crate::error::{Error, Result};

/// Group name used by the benchmark.
const GROUP: &str = "scale";
/// File descriptors the coordinator holds per connection (the accepted stream, the clone kept
/// for shutdown, the reader clone and the closer clone), plus one for the simulated client.
const FDS_PER_MEMBER: u64 = 5;

/// Parameters of a run of [`view_change_bench_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleOptions {
    /// Members of the initial view (the group's world size); at least 1.
    pub members: usize,
    /// View changes to measure (one joiner each).
    pub rounds: usize,
    /// The group's batching window for joiners, in milliseconds.
    pub join_window_ms: u64,
    /// Longest wait for any one phase (registration, formation, a round) before giving up.
    pub phase_timeout: Duration,
    /// Most registrations in flight at once (connected, not yet answered).
    pub max_connecting: usize,
}

impl ScaleOptions {
    /// Defaults for `members` and `rounds`: 50 ms window, 10 min per phase, 64 registrations
    /// in flight.
    pub fn new(members: usize, rounds: usize) -> ScaleOptions {
        ScaleOptions {
            members,
            rounds,
            join_window_ms: 50,
            phase_timeout: Duration::from_secs(600),
            max_connecting: 64,
        }
    }
}

/// Minimum, median and maximum of a sample of durations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Smallest sample.
    pub min: Duration,
    /// Median (the upper one for an even count).
    pub median: Duration,
    /// Largest sample.
    pub max: Duration,
    /// Number of samples.
    pub n: usize,
}

impl Stats {
    /// Statistics of `samples` (all zero for none).
    pub fn of(samples: &[Duration]) -> Stats {
        let mut v = samples.to_vec();
        v.sort();
        match (v.first(), v.last()) {
            (Some(&min), Some(&max)) => Stats {
                min,
                median: v[v.len() / 2],
                max,
                n: v.len(),
            },
            _ => Stats::default(),
        }
    }
}

/// Times of one view change, from the joiner's registration being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundTimes {
    /// The new epoch.
    pub epoch: u64,
    /// Members in the new view.
    pub size: usize,
    /// The first existing member read the notice.
    pub first_notice: Duration,
    /// The last existing member read the notice.
    pub last_notice: Duration,
    /// The joiner read its notice.
    pub joiner_notice: Duration,
    /// The last acknowledgement was written by its client.
    pub all_acked: Duration,
    /// The coordinator reported every member installed the epoch.
    pub stable: Duration,
}

/// Result of [`view_change_bench`].
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleReport {
    /// Members of the initial view.
    pub members: usize,
    /// The group's batching window (ms).
    pub join_window_ms: u64,
    /// From the first connection to every member holding its registration answer.
    pub register: Duration,
    /// From the first connection to every member having read the epoch-1 notice.
    pub formation: Duration,
    /// From the last registration answer to the last epoch-1 notice read (the publication
    /// of the first view).
    pub formation_fanout: Duration,
    /// From the first connection to the coordinator reporting epoch 1 installed everywhere.
    pub formation_stable: Duration,
    /// Each measured view change.
    pub rounds: Vec<RoundTimes>,
    /// Statistics of [`RoundTimes::first_notice`] over the rounds.
    pub first_notice: Stats,
    /// Statistics of [`RoundTimes::last_notice`].
    pub last_notice: Stats,
    /// Statistics of `last_notice - first_notice` (the fan-out of one view change).
    pub fanout: Stats,
    /// Statistics of [`RoundTimes::all_acked`].
    pub all_acked: Stats,
    /// Statistics of [`RoundTimes::stable`].
    pub stable: Stats,
    /// Time of one [`Coordinator::status`] call, waiting for the coordinator's lock included
    /// (polled with pauses of four times the cheapest call, 1 to 100 ms, so the stable times
    /// are late by up to a pause and a call).
    pub status_cost: Stats,
    /// Peak resident set of the process (`VmHWM`), KiB, where readable.
    pub peak_rss_kib: Option<u64>,
    /// Threads of the process with every member connected, where readable.
    pub threads: Option<u64>,
    /// `RLIMIT_NOFILE` (soft) in force during the run.
    pub nofile_limit: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl std::fmt::Display for ScaleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "coordinator scale: {} light members, {} view changes, join window {} ms",
            self.members,
            self.rounds.len(),
            self.join_window_ms
        )?;
        writeln!(
            f,
            "formation: registered {:.1} ms, all notices {:.1} ms (last answer -> last notice {:.1} ms), stable {:.1} ms",
            ms(self.register),
            ms(self.formation),
            ms(self.formation_fanout),
            ms(self.formation_stable)
        )?;
        writeln!(
            f,
            "{:<34} {:>10} {:>10} {:>10}",
            "per view change (ms, from join)", "min", "median", "max"
        )?;
        let rows = [
            ("first member notified", &self.first_notice),
            ("last member notified", &self.last_notice),
            ("fan-out (last - first)", &self.fanout),
            ("all acks written", &self.all_acked),
            ("stable (coordinator)", &self.stable),
            ("status() call (probe cost)", &self.status_cost),
        ];
        for (name, s) in rows {
            writeln!(
                f,
                "{:<34} {:>10.2} {:>10.2} {:>10.2}",
                name,
                ms(s.min),
                ms(s.median),
                ms(s.max)
            )?;
        }
        for r in &self.rounds {
            writeln!(
                f,
                "  epoch {:>3} size {:>6}: first {:.2} last {:.2} joiner {:.2} acked {:.2} stable {:.2} ms",
                r.epoch,
                r.size,
                ms(r.first_notice),
                ms(r.last_notice),
                ms(r.joiner_notice),
                ms(r.all_acked),
                ms(r.stable)
            )?;
        }
        let opt = |v: Option<u64>| v.map_or("?".to_string(), |x| x.to_string());
        write!(
            f,
            "peak RSS {} KiB, threads {}, RLIMIT_NOFILE {}",
            opt(self.peak_rss_kib),
            opt(self.threads),
            self.nofile_limit
        )
    }
}

/// Runs the benchmark with [`ScaleOptions::new`]`(members, rounds)`.
///
/// Errors: `Error::InvalidArgument` for zero members; `Error::System` when the descriptor
/// limit cannot be raised far enough or a socket fails; `Error::Coordinator` when the
/// coordinator refuses or drops a member; `Error::Timeout` when a phase takes longer than
/// [`ScaleOptions::phase_timeout`]; `Error::Internal` when a member saw a wrong notice
/// sequence.
pub fn view_change_bench(members: usize, rounds: usize) -> Result<ScaleReport> {
    view_change_bench_with(&ScaleOptions::new(members, rounds))
}

/// Runs the benchmark with explicit options (see [`view_change_bench`]).
///
/// Errors: as [`view_change_bench`].
pub fn view_change_bench_with(opts: &ScaleOptions) -> Result<ScaleReport> {
    let (report, logs) = run(opts)?;
    verify(opts, &logs)?;
    Ok(report)
}

/// One notice as a member read it: epoch, size, rank.
type Seen = (u64, usize, Option<usize>);

/// A simulated light member.
struct Sim {
    stream: TcpStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    id: Option<u64>,
    notices: Vec<(Seen, Instant)>,
    /// An acknowledgement is queued; its epoch.
    ack_pending: Option<u64>,
    /// Epoch and time of the last acknowledgement written completely.
    acked: Option<(u64, Instant)>,
}

impl Sim {
    /// Writes what it can of the output buffer.
    fn flush(&mut self, now: Instant) -> std::io::Result<()> {
        while !self.wbuf.is_empty() {
            match self.stream.write(&self.wbuf) {
                Ok(0) => return Err(std::io::Error::from(ErrorKind::WriteZero)),
                Ok(n) => {
                    self.wbuf.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(ep) = self.ack_pending.take() {
            self.acked = Some((ep, now));
        }
        Ok(())
    }
}

/// What one iteration of the event loop saw.
#[derive(Default)]
struct Events {
    registered: usize,
}

struct Bench {
    coord: Coordinator,
    addr: SocketAddr,
    reg: Registration,
    sims: Vec<Sim>,
    pollfds: Vec<libc::pollfd>,
}

impl Bench {
    /// Connects one more member and writes its registration; returns when it was written.
    fn connect(&mut self) -> Result<Instant> {
        let i = self.sims.len();
        let stream = TcpStream::connect(self.addr).map_err(|e| {
            Error::System(format!(
                "simulated member {i}: cannot connect to the coordinator at {}: {e}",
                self.addr
            ))
        })?;
        let _ = stream.set_nodelay(true);
        stream
            .set_nonblocking(true)
            .map_err(|e| Error::System(format!("simulated member {i}: nonblocking: {e}")))?;
        let mut sim = Sim {
            stream,
            rbuf: Vec::new(),
            wbuf: proto::encode(MsgType::Register, &self.reg)?,
            id: None,
            notices: Vec::new(),
            ack_pending: None,
            acked: None,
        };
        let now = Instant::now();
        sim.flush(now)
            .map_err(|e| Error::System(format!("simulated member {i}: registration: {e}")))?;
        self.sims.push(sim);
        Ok(now)
    }

    /// One `poll(2)` over every member (at most `timeout_ms`), then reads, handles and writes.
    fn pump(&mut self, timeout_ms: i32) -> Result<Events> {
        self.pollfds.clear();
        self.pollfds.extend(self.sims.iter().map(|s| libc::pollfd {
            fd: s.stream.as_raw_fd(),
            events: libc::POLLIN | if s.wbuf.is_empty() { 0 } else { libc::POLLOUT },
            revents: 0,
        }));
        let nfds = libc::nfds_t::try_from(self.pollfds.len())
            .map_err(|_| Error::Internal("too many descriptors for poll".into()))?;
        // SAFETY: FFI call; `pollfds` is a valid, initialised array of `nfds` pollfd structs
        // that stays alive and unaliased for the duration of the call (poll writes `revents`).
        let rc = unsafe { libc::poll(self.pollfds.as_mut_ptr(), nfds, timeout_ms) };
        let mut ev = Events::default();
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                return Ok(ev);
            }
            return Err(Error::System(format!("poll: {e}")));
        }
        if rc == 0 {
            return Ok(ev);
        }
        let now = Instant::now();
        let mut chunk = [0u8; 16 << 10];
        for (i, (pfd, sim)) in self.pollfds.iter().zip(self.sims.iter_mut()).enumerate() {
            if pfd.revents == 0 {
                continue;
            }
            if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                let mut eof = false;
                loop {
                    match sim.stream.read(&mut chunk) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) => sim.rbuf.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(Error::Coordinator(format!(
                                "simulated member {i} (id {:?}): connection failed: {e}",
                                sim.id
                            )))
                        }
                    }
                }
                while let Some(f) = take_frame(&mut sim.rbuf, i)? {
                    handle(sim, i, &f, now, &mut ev)?;
                }
                if eof {
                    return Err(Error::Coordinator(format!(
                        "simulated member {i} (id {:?}): the coordinator closed the connection{}",
                        sim.id,
                        if sim.id.is_none() {
                            " before answering the registration (no thread for it? see RLIMIT_NPROC, \
                             /proc/sys/kernel/threads-max, and the connection limit)"
                        } else {
                            ""
                        }
                    )));
                }
            }
            if !sim.wbuf.is_empty() {
                sim.flush(now).map_err(|e| {
                    Error::Coordinator(format!(
                        "simulated member {i} (id {:?}): write failed: {e}",
                        sim.id
                    ))
                })?;
            }
        }
        Ok(ev)
    }

    /// Pumps until `done` holds, or fails after `deadline`.
    fn pump_until(
        &mut self,
        what: &str,
        started: Instant,
        deadline: Instant,
        done: impl Fn(&Bench) -> bool,
    ) -> Result<()> {
        while !done(self) {
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("coordinator scale benchmark: {what}"),
                    secs: started.elapsed().as_secs_f64(),
                });
            }
            self.pump(5)?;
        }
        Ok(())
    }

    /// Polls the coordinator's status until every member installed `epoch`; returns when that
    /// was seen and the costs of the status calls.
    fn wait_stable(
        &mut self,
        epoch: u64,
        size: usize,
        started: Instant,
        deadline: Instant,
        costs: &mut Vec<Duration>,
    ) -> Result<Instant> {
        let mut cheapest = Duration::MAX;
        loop {
            let t = Instant::now();
            let st = self.coord.status();
            let cost = t.elapsed();
            costs.push(cost);
            // A call's time includes waiting for the coordinator's lock; its cheapest one
            // estimates the work it takes.
            cheapest = cheapest.min(cost);
            if is_stable(&st, epoch, size) {
                return Ok(Instant::now());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("coordinator scale benchmark: epoch {epoch} never became stable"),
                    secs: started.elapsed().as_secs_f64(),
                });
            }
            // Keep the probe's work at about a fifth of the time.
            let pause = (cheapest * 4).clamp(Duration::from_millis(1), Duration::from_millis(100));
            let until = Instant::now() + pause;
            while Instant::now() < until {
                let left = until.saturating_duration_since(Instant::now());
                let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
                self.pump(ms)?;
            }
        }
    }

    /// Members (by index) that hold a notice of `epoch`.
    fn count_notified(&self, range: std::ops::Range<usize>, epoch: u64) -> usize {
        self.sims[range]
            .iter()
            .filter(|s| s.notices.iter().any(|((e, _, _), _)| *e == epoch))
            .count()
    }

    fn count_acked(&self, epoch: u64) -> usize {
        self.sims
            .iter()
            .filter(|s| s.acked.is_some_and(|(e, _)| e >= epoch))
            .count()
    }

    /// Earliest and latest time members in `range` read the notice of `epoch`.
    fn notice_span(&self, range: std::ops::Range<usize>, epoch: u64) -> Option<(Instant, Instant)> {
        let times = self.sims[range].iter().filter_map(|s| {
            s.notices
                .iter()
                .find(|((e, _, _), _)| *e == epoch)
                .map(|(_, t)| *t)
        });
        times.fold(None, |acc, t| match acc {
            None => Some((t, t)),
            Some((a, b)) => Some((a.min(t), b.max(t))),
        })
    }
}

/// Removes one complete frame from the front of `buf`, if there is one (`i` names the
/// simulated member in errors).
pub(super) fn take_frame(buf: &mut Vec<u8>, i: usize) -> Result<Option<proto::Frame>> {
    if buf.len() < proto::HEADER_LEN {
        return Ok(None);
    }
    if buf[..4] != proto::MAGIC {
        return Err(Error::Coordinator(format!(
            "simulated member {i}: not the coordinator protocol (first bytes {:02x?})",
            &buf[..4]
        )));
    }
    let len = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    if len > proto::MAX_PAYLOAD {
        return Err(Error::Coordinator(format!(
            "simulated member {i}: frame of {len} bytes exceeds the protocol limit"
        )));
    }
    if buf.len() < proto::HEADER_LEN + len {
        return Ok(None);
    }
    let f = proto::Frame {
        version: u16::from_be_bytes([buf[4], buf[5]]),
        ty: u16::from_be_bytes([buf[6], buf[7]]),
        payload: buf[proto::HEADER_LEN..proto::HEADER_LEN + len].to_vec(),
    };
    buf.drain(..proto::HEADER_LEN + len);
    Ok(Some(f))
}

/// Handles one frame from the coordinator: notices are recorded and acknowledged at once.
fn handle(sim: &mut Sim, i: usize, f: &proto::Frame, now: Instant, ev: &mut Events) -> Result<()> {
    let bad = |what: &str, e: String| {
        Error::Coordinator(format!("simulated member {i}: bad {what} frame: {e}"))
    };
    match MsgType::from_u16(f.ty) {
        Some(MsgType::Registered) => {
            let r: proto::Registered = f.body().map_err(|e| bad("registered", e))?;
            sim.id = Some(r.member_id);
            ev.registered += 1;
        }
        Some(MsgType::Notice) => {
            let n: proto::Notice = f.body().map_err(|e| bad("notice", e))?;
            if Some(n.member_id) != sim.id || n.group != GROUP {
                return Err(Error::Internal(format!(
                    "simulated member {i} (id {:?}) got a notice for member {} of group {}",
                    sim.id, n.member_id, n.group
                )));
            }
            sim.notices.push(((n.epoch, n.size, n.rank), now));
            sim.wbuf.extend_from_slice(&proto::encode(
                MsgType::Ack,
                &proto::Ack { epoch: n.epoch },
            )?);
            sim.ack_pending = Some(n.epoch);
        }
        Some(MsgType::Error) => {
            let m: proto::ErrorMsg = f.body().map_err(|e| bad("error", e))?;
            return Err(Error::Coordinator(format!(
                "simulated member {i} (id {:?}) refused: {}",
                sim.id, m.message
            )));
        }
        _ => {
            return Err(Error::Internal(format!(
                "simulated light member {i} got unexpected message type {}",
                f.ty
            )))
        }
    }
    Ok(())
}

/// Whether the status document shows group [`GROUP`] at `epoch` with `size` members, all of
/// which installed it.
fn is_stable(st: &serde_json::Value, epoch: u64, size: usize) -> bool {
    let Some(groups) = st["groups"].as_array() else {
        return false;
    };
    groups.iter().any(|g| {
        g["group"].as_str() == Some(GROUP)
            && g["epoch"].as_u64() == Some(epoch)
            && g["members"].as_array().is_some_and(|m| {
                m.len() == size
                    && m.iter()
                        .all(|m| m["installed_epoch"].as_u64().is_some_and(|e| e >= epoch))
            })
    })
}

/// A field of `/proc/self/status` (the number before the unit).
fn proc_status(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Raises `RLIMIT_NOFILE` to at least `need` (the hard limit too, where permitted); returns
/// the soft limit in force.
fn raise_nofile(need: u64) -> Result<u64> {
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
    if lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < need {
        let new = libc::rlimit {
            rlim_cur: need,
            rlim_max: if lim.rlim_max == libc::RLIM_INFINITY {
                lim.rlim_max
            } else {
                lim.rlim_max.max(need)
            },
        };
        // SAFETY: FFI call; `new` is a valid rlimit read by the call only.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::System(format!(
                "the benchmark needs about {need} file descriptors ({FDS_PER_MEMBER} per member: \
                 one client socket and the coordinator's descriptors), but RLIMIT_NOFILE is {} \
                 (hard {}) and cannot be raised ({e}); raise it (ulimit -n {need}, or as root) \
                 or use fewer members",
                lim.rlim_cur, lim.rlim_max
            )));
        }
        return Ok(need);
    }
    Ok(lim.rlim_cur)
}

/// Runs the benchmark; returns the report and every member's notices (by member index:
/// initial members first, then the joiners in order).
fn run(opts: &ScaleOptions) -> Result<(ScaleReport, Vec<Vec<Seen>>)> {
    if opts.members == 0 {
        return Err(Error::InvalidArgument(
            "the scale benchmark needs at least one member".into(),
        ));
    }
    let total = opts.members + opts.rounds;
    let need = FDS_PER_MEMBER * total as u64 + 64;
    let nofile_limit = raise_nofile(need)?;
    let coord = Coordinator::bind("127.0.0.1:0")?;
    let addr = coord.local_addr();
    let mut reg = Registration::worker(GROUP, opts.members, None, Vec::new());
    reg.elastic = true;
    reg.light = true;
    reg.heartbeat_timeout_ms = 0;
    reg.policy = GroupPolicy {
        min_size: 1,
        max_size: None,
        join_window_ms: opts.join_window_ms,
    };
    let mut b = Bench {
        coord,
        addr,
        reg,
        sims: Vec::with_capacity(total),
        pollfds: Vec::with_capacity(total),
    };
    let n = opts.members;

    // Formation: connect everybody (a bounded number of registrations in flight).
    let t0 = Instant::now();
    let deadline = t0 + opts.phase_timeout;
    let mut answered = 0usize;
    let mut last_answer = t0;
    while answered < n {
        while b.sims.len() < n && b.sims.len() - answered < opts.max_connecting.max(1) {
            b.connect()?;
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!(
                    "coordinator scale benchmark: registering {n} members ({answered} answered)"
                ),
                secs: t0.elapsed().as_secs_f64(),
            });
        }
        let ev = b.pump(5)?;
        if ev.registered > 0 {
            answered += ev.registered;
            last_answer = Instant::now();
        }
    }
    let register = last_answer - t0;
    b.pump_until("the epoch-1 notices", t0, deadline, |b| {
        b.count_notified(0..n, 1) == n
    })?;
    let (_, last1) = b
        .notice_span(0..n, 1)
        .ok_or_else(|| Error::Internal("no epoch-1 notice".into()))?;
    let threads = proc_status("Threads");
    b.pump_until("the epoch-1 acknowledgements", t0, deadline, |b| {
        b.count_acked(1) == n
    })?;
    let mut costs = Vec::new();
    let stable1 = b.wait_stable(1, n, t0, deadline, &mut costs)?;

    // View changes: one joiner each.
    let mut rounds = Vec::with_capacity(opts.rounds);
    for r in 0..opts.rounds {
        let epoch = 2 + r as u64;
        let size = n + r + 1;
        let tr = b.connect()?;
        let deadline = tr + opts.phase_timeout;
        let joiner = b.sims.len() - 1;
        b.pump_until(
            &format!("the notices of epoch {epoch}"),
            tr,
            deadline,
            |b| b.count_notified(0..size, epoch) == size,
        )?;
        b.pump_until(
            &format!("the acknowledgements of epoch {epoch}"),
            tr,
            deadline,
            |b| b.count_acked(epoch) == size,
        )?;
        let (first, last) = b
            .notice_span(0..joiner, epoch)
            .ok_or_else(|| Error::Internal(format!("no notice of epoch {epoch}")))?;
        let (jt, _) = b
            .notice_span(joiner..joiner + 1, epoch)
            .ok_or_else(|| Error::Internal(format!("joiner missed epoch {epoch}")))?;
        let acked = b
            .sims
            .iter()
            .filter_map(|s| s.acked.map(|(_, t)| t))
            .max()
            .unwrap_or(tr);
        let stable = b.wait_stable(epoch, size, tr, deadline, &mut costs)?;
        rounds.push(RoundTimes {
            epoch,
            size,
            first_notice: first.saturating_duration_since(tr),
            last_notice: last.saturating_duration_since(tr),
            joiner_notice: jt.saturating_duration_since(tr),
            all_acked: acked.saturating_duration_since(tr),
            stable: stable.saturating_duration_since(tr),
        });
    }
    let peak_rss_kib = proc_status("VmHWM");
    // Stop the coordinator before the members go, so their departures cost nothing.
    b.coord.shutdown();
    let logs = b
        .sims
        .iter()
        .map(|s| s.notices.iter().map(|(seen, _)| *seen).collect())
        .collect();
    let pick = |f: fn(&RoundTimes) -> Duration| -> Vec<Duration> { rounds.iter().map(f).collect() };
    let report = ScaleReport {
        members: n,
        join_window_ms: opts.join_window_ms,
        register,
        formation: last1 - t0,
        formation_fanout: last1.saturating_duration_since(last_answer),
        formation_stable: stable1 - t0,
        first_notice: Stats::of(&pick(|r| r.first_notice)),
        last_notice: Stats::of(&pick(|r| r.last_notice)),
        fanout: Stats::of(&pick(|r| r.last_notice.saturating_sub(r.first_notice))),
        all_acked: Stats::of(&pick(|r| r.all_acked)),
        stable: Stats::of(&pick(|r| r.stable)),
        status_cost: Stats::of(&costs),
        rounds,
        peak_rss_kib,
        threads,
        nofile_limit,
    };
    Ok((report, logs))
}

/// Checks every member read every epoch of its membership exactly once, in order, with sizes
/// growing by one per round and ranks forming `0..size` (joiners last).
fn verify(opts: &ScaleOptions, logs: &[Vec<Seen>]) -> Result<()> {
    let n = opts.members;
    let last = 1 + opts.rounds as u64;
    let fail = |m: String| Err(Error::Internal(format!("coordinator scale benchmark: {m}")));
    if logs.len() != n + opts.rounds {
        return fail(format!(
            "{} members, expected {}",
            logs.len(),
            n + opts.rounds
        ));
    }
    let mut ranks: Vec<Vec<bool>> = (0..opts.rounds + 1).map(|r| vec![false; n + r]).collect();
    for (i, log) in logs.iter().enumerate() {
        let first = if i < n { 1 } else { 2 + (i - n) as u64 };
        let epochs: Vec<u64> = log.iter().map(|s| s.0).collect();
        let want: Vec<u64> = (first..=last).collect();
        if epochs != want {
            return fail(format!(
                "member {i} read epochs {epochs:?}, expected {want:?}"
            ));
        }
        for &(epoch, size, rank) in log {
            let k = (epoch - 1) as usize;
            if size != n + k {
                return fail(format!(
                    "member {i}: epoch {epoch} has size {size}, expected {}",
                    n + k
                ));
            }
            let Some(rank) = rank.filter(|r| *r < size) else {
                return fail(format!(
                    "member {i}: epoch {epoch}: rank {rank:?} of {size}"
                ));
            };
            if i >= n && epoch == first && rank != i {
                return fail(format!(
                    "joiner {i} has rank {rank} in its first epoch {epoch}, expected {i}"
                ));
            }
            if std::mem::replace(&mut ranks[k][rank], true) {
                return fail(format!("epoch {epoch}: rank {rank} given twice"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_sees_every_epoch_once() {
        let opts = ScaleOptions {
            phase_timeout: Duration::from_secs(120),
            ..ScaleOptions::new(200, 2)
        };
        let (report, logs) = run(&opts).unwrap();
        verify(&opts, &logs).unwrap();
        assert_eq!(logs.len(), 202);
        for (i, log) in logs.iter().enumerate() {
            let first = if i < 200 { 1 } else { i as u64 - 198 };
            let epochs: Vec<u64> = log.iter().map(|s| s.0).collect();
            assert_eq!(epochs, (first..=3).collect::<Vec<_>>(), "member {i}");
            for &(epoch, size, _) in log {
                assert_eq!(size, 199 + epoch as usize, "member {i} epoch {epoch}");
            }
        }
        assert_eq!(report.rounds.len(), 2);
        assert_eq!(report.rounds[0].size, 201);
        assert_eq!(report.rounds[1].size, 202);
        for r in &report.rounds {
            // A join waits for the batching window.
            assert!(r.first_notice >= Duration::from_millis(opts.join_window_ms));
            assert!(r.first_notice <= r.last_notice && r.last_notice <= r.all_acked);
            assert!(r.all_acked <= r.stable + Duration::from_millis(1));
        }
        eprintln!("{report}");
    }

    #[test]
    fn zero_members_is_refused() {
        assert!(matches!(
            view_change_bench(0, 1),
            Err(Error::InvalidArgument(_))
        ));
    }

    /// `cargo test --release -p braid scale_1000 -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn scale_1000() {
        eprintln!("{}", view_change_bench(1000, 5).unwrap());
    }
}
