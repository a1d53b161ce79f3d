//! The coordinator service: accepts member connections, runs rendezvous per group and
//! publishes views.
//!
//! Threads: the accept thread; one thread per connection only while it handshakes (at most
//! `max_unauthenticated`); one event loop (epoll, [`super::coord_loop`]) serving every
//! registered member's connection (frames decoded incrementally, heartbeats and
//! acknowledgements handled there, writes never blocking: each member has a bounded outgoing
//! queue and is dropped, as a failure, when it fills); the ticker (heartbeat timeouts,
//! batching windows); the persister, which writes the state file off the state lock (one
//! write for any number of changes) and then sends the frames those changes produced, so no
//! member sees a view a restarted coordinator would not know. Member ids stay below the
//! persisted high-water mark, written [`ID_BLOCK`] ahead of use. Nothing under the state lock
//! blocks on a socket or the disk (except an id allocation that found no persisted id left).
//!
//! Costs at scale (`braid-coordinator bench`): one descriptor per connection (its handshake
//! thread or the event loop reads it, writers share it behind the queue's lock, and the accept
//! loop keeps the same `Arc` to shut it down); members are found by id
//! through a per-group index, so a heartbeat or an acknowledgement costs O(1) under the state
//! lock, and the per-event check of `decide` reads counters instead of scanning the group;
//! the ticker scans a group for heartbeat timeouts only when its earliest deadline passed.
//! The listener has a backlog of [`LISTEN_BACKLOG`] and the accept thread sleeps in `poll(2)`
//! (woken by shutdown), so a join storm waits neither in SYN retransmits nor in sleeps.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::coord_loop::{recv_now, Decoder, IdMap, IdSet, Link, Poller};
use super::proto::{self, Frame, FrameError, MsgType};
use super::{auth, random_u64, GroupPolicy, Member, Registration, Role, View, LOG};
use crate::error::{Error, Result};

/// Longest accepted group name.
const MAX_GROUP: usize = 256;
/// Longest accepted host id / host name.
const MAX_NAME: usize = 1024;
/// Largest accepted connect handle.
const MAX_HANDLE: usize = 64 << 10;
/// Largest accepted world size.
const MAX_WORLD: usize = 1 << 20;
/// Write deadline for frames sent by the coordinator.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest blocking read of an established member connection (`shutdown` wakes those reads by
/// shutting the sockets down, so this only bounds the wake-ups of idle members).
const IDLE_SLICE: Duration = Duration::from_secs(1);
/// How long `shutdown` waits for its threads.
const JOIN_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest first frame of a connection (before the peer proved anything): a registration with
/// the largest connect handle (hex-encoded, so twice its size) plus its names and policy.
pub(crate) const MAX_OPENING: usize = 2 * MAX_HANDLE + 32 * 1024;
/// Largest answer to a challenge.
const MAX_AUTH: usize = 4 << 10;
/// Length of a member secret.
const SECRET_LEN: usize = 32;
/// Largest id high-water mark accepted from a state file (ids stay far from overflow).
const MAX_ID: u64 = 1 << 62;
/// Longest accepted duration in a registration (join window, heartbeat timeout): one day.
const MAX_MS: u64 = 24 * 3600 * 1000;
/// Largest epoch accepted from a state file.
const MAX_EPOCH: u64 = 1 << 62;
/// Backlog of the listening socket (the kernel caps it at `net.core.somaxconn`, 4096 on
/// current kernels): a join storm of thousands of members queues there instead of overflowing
/// into SYN retransmits (1, 3, 7 s) with the default backlog of 128.
pub(crate) const LISTEN_BACKLOG: i32 = 4096;
/// Longest sleep of the accept thread in `poll(2)` (shutdown wakes it at once; this only
/// bounds how long a missed wake-up could delay it).
const ACCEPT_POLL: Duration = Duration::from_secs(1);
/// How often the ticker recounts a group's bookkeeping (index, counters, earliest heartbeat
/// deadline) from scratch, whatever happened: a safety net, O(members) once a second.
const AUDIT: Duration = Duration::from_secs(1);
/// Most work (members × blocks²) a re-weigh decision may plan, under the state lock; larger
/// pipelines are not re-weighed (logged once per group).
const REWEIGH_BUDGET: usize = 1 << 24;

/// Tunables of a [`Coordinator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorOptions {
    /// How long a new connection may take to send its first message and, with a job token or
    /// for a rejoin, to answer the challenge (default 10 s): the whole of it, however slowly
    /// the bytes trickle in. A connection that has not finished by then is closed.
    pub handshake_timeout: Duration,
    /// How long the rest of a frame may take once its first byte arrived (default 10 s).
    pub frame_timeout: Duration,
    /// Most connections served at once (default 16384); more are closed at once with a
    /// warning.
    pub max_connections: usize,
    /// Job token (`BRAID_JOB_TOKEN`): when set, every client must answer an HMAC-SHA256
    /// challenge keyed by it.
    pub job_token: Option<Vec<u8>>,
    /// File where the id high-water mark and the views are persisted
    /// (`BRAID_COORDINATOR_STATE`); read at start when it exists.
    pub state_file: Option<PathBuf>,
    /// Stack size of the handshake threads (one per connection until it registers; default
    /// 256 KiB).
    pub thread_stack: usize,
    /// Most connections still in their handshake at once (default 1024): when one more
    /// arrives, the oldest of them is closed (with a log line), so idle or slow connections
    /// cannot keep a real member out for longer than it takes it to register. The default lets
    /// a join storm of about a thousand members handshake at once on a loaded machine (with
    /// 256, storm joiners whose threads had not run yet were closed as "oldest"); each open
    /// handshake holds a thread, a descriptor and at most one opening frame (160 KiB), so
    /// 1024 of them bound a flood to about 160 MiB.
    pub max_unauthenticated: usize,
    /// Most bytes waiting to be written to one registered member (default 16 MiB, at least
    /// one frame): a member that stops reading is dropped, as a failure, when its queue would
    /// grow past this, so it never delays what the others receive.
    pub max_queued: usize,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        CoordinatorOptions {
            handshake_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(10),
            max_connections: 16384,
            job_token: None,
            state_file: None,
            thread_stack: 256 << 10,
            max_unauthenticated: 1024,
            max_queued: 16 << 20,
        }
    }
}

impl CoordinatorOptions {
    /// Options from the environment: `BRAID_JOB_TOKEN` and `BRAID_COORDINATOR_STATE`.
    pub fn from_env() -> CoordinatorOptions {
        let get = crate::config::var;
        CoordinatorOptions {
            job_token: get("BRAID_JOB_TOKEN").map(String::into_bytes),
            state_file: get("BRAID_COORDINATOR_STATE").map(PathBuf::from),
            ..CoordinatorOptions::default()
        }
    }
}

/// A member's connection as the group sees it.
struct Entry {
    id: u64,
    reg: Registration,
    peer: SocketAddr,
    /// `None` while the member is disconnected (after a coordinator restart, until it
    /// rejoins).
    writer: Option<Arc<Link>>,
    last_seen: Instant,
    /// Highest epoch this member acknowledged as installed.
    acked: u64,
    /// It announced a graceful leave.
    leaving: bool,
    /// It asked for a resync of this epoch, naming these suspects.
    resync: Option<(u64, Vec<u64>)>,
    /// Issued at registration; a rejoin must prove it (see `auth::rejoin_mac`).
    secret: [u8; SECRET_LEN],
    /// When its last heartbeat was echoed (see [`echo_due`]).
    echoed: Option<Instant>,
    /// The epoch of the last view queued on its current connection (0: none): the base a
    /// view delta for it is computed from (see [`view_frames`]).
    sent: u64,
}

/// The reading side of a [`Link`], owned by its connection thread: buffered (a small frame is
/// one `recv`, not three), and the read timeout is set only when it changes.
struct Sock<'a> {
    sock: &'a TcpStream,
    slice: Option<Duration>,
    buf: Box<[u8]>,
    at: usize,
    end: usize,
}

impl<'a> Sock<'a> {
    fn new(sock: &'a TcpStream) -> Sock<'a> {
        Sock {
            sock,
            slice: None,
            buf: vec![0u8; 4096].into_boxed_slice(),
            at: 0,
            end: 0,
        }
    }
}

impl Read for Sock<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.end {
            if out.len() >= self.buf.len() {
                return self.sock.read(out);
            }
            let n = self.sock.read(&mut self.buf)?;
            self.at = 0;
            self.end = n;
        }
        let n = out.len().min(self.end - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Sock<'_> {
    /// Bytes read from the socket but not consumed yet (handed to the event loop).
    fn leftover(&self) -> Vec<u8> {
        self.buf[self.at..self.end].to_vec()
    }
}

impl proto::Wire for Sock<'_> {
    fn set_slice(&mut self, d: Duration) -> std::io::Result<()> {
        if self.slice != Some(d) {
            self.sock.set_read_timeout(Some(d))?;
            self.slice = Some(d);
        }
        Ok(())
    }
}

impl Entry {
    fn member(&self) -> Member {
        Member {
            id: self.id,
            host_id: self.reg.host_id.clone(),
            hostname: self.reg.hostname.clone(),
            pid: self.reg.pid,
            role: self.reg.role,
            handle: self.reg.handle.clone(),
            numa: self.reg.numa,
            weight: self.reg.weight,
        }
    }
}

/// One entry of a group's history.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Hist {
    epoch: u64,
    size: usize,
    reason: String,
    /// Seconds since the Unix epoch.
    at: f64,
}

/// One rendezvous namespace.
struct Group {
    world_size: usize,
    elastic: bool,
    policy: GroupPolicy,
    /// Members of the current view (in view order) — or, before the first view, registrations
    /// in arrival order. Dead members are removed at once (the view still lists them until the
    /// next epoch).
    entries: Vec<Entry>,
    /// Registered joiners waiting for admission (elastic groups), in id order.
    joiners: Vec<Entry>,
    /// Members removed from the current view but still connected until they say goodbye
    /// (leavers); they get the next view so they know they are out.
    leavers: Vec<(u64, Arc<Link>, SocketAddr)>,
    /// The published view, if any.
    view: Option<View>,
    /// When the first waiting joiner registered.
    join_wait: Option<Instant>,
    /// Why the next view is needed (removals).
    reasons: Vec<String>,
    /// Retired ids of this group and why (refused if they come back).
    retired: HashMap<u64, String>,
    history: Vec<Hist>,
    /// Pipeline metrics reported by the members (throughput-aware re-weighing).
    pipeline: PipelineMetrics,
    /// The last push/pull checkpoint a member reported (not persisted).
    checkpoint: Option<CheckpointSeen>,
    /// Index and counters over `entries` and `joiners` (see [`Book`]).
    book: Book,
}

/// Where a member sits in its group.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Entry(usize),
    Joiner(usize),
}

/// A group's bookkeeping, so that the per-event work (a heartbeat, an acknowledgement, the
/// quick check of `decide`, the tick) does not scan the group. Rebuilt by [`Group::reindex`]
/// after every change of `entries`/`joiners` other than an append, and after every new view;
/// kept up to date in between by the few places that change what it counts (appends, acks,
/// rejoins, leaves, resyncs). An index slot is checked before use (a stale one falls back to
/// a search); `unacked` is exact; `flagged` may only over-count (a member flagged twice),
/// which sends `decide` down its full path, and that recounts. The ticker rebuilds it once a
/// second in any case ([`AUDIT`]), so no slip can hold a view back for longer.
#[derive(Debug, Default)]
struct Book {
    /// Position of each member by id.
    index: IdMap<Slot>,
    /// Entries that have not acknowledged the current view's epoch.
    unacked: usize,
    /// Entries leaving or asking for a resync (at least).
    flagged: usize,
    /// No heartbeat deadline of an entry or joiner is before this (`None`: no deadline).
    next_deadline: Option<Instant>,
    /// When the ticker rebuilds this from scratch next.
    next_audit: Option<Instant>,
}

/// When `e` is declared dead if it stays silent (`None`: never).
fn hb_deadline(e: &Entry) -> Option<Instant> {
    if e.reg.heartbeat_timeout_ms == 0 {
        return None;
    }
    e.last_seen
        .checked_add(Duration::from_millis(e.reg.heartbeat_timeout_ms))
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

impl Group {
    /// Rebuilds the [`Book`] from `entries`, `joiners` and the view (O(members)).
    fn reindex(&mut self) {
        let epoch = self.view.as_ref().map_or(0, |v| v.epoch);
        let b = &mut self.book;
        b.index.clear();
        b.unacked = 0;
        b.flagged = 0;
        b.next_deadline = None;
        for (i, e) in self.entries.iter().enumerate() {
            b.index.insert(e.id, Slot::Entry(i));
            b.unacked += usize::from(e.acked < epoch);
            b.flagged += usize::from(e.leaving || e.resync.is_some());
            b.next_deadline = earliest(b.next_deadline, hb_deadline(e));
        }
        for (i, e) in self.joiners.iter().enumerate() {
            b.index.insert(e.id, Slot::Joiner(i));
            b.next_deadline = earliest(b.next_deadline, hb_deadline(e));
        }
    }

    /// Where member `id` is (entries or joiners), checked against the vectors: a stale slot
    /// (a bookkeeping slip) falls back to a search.
    fn slot(&self, id: u64) -> Option<Slot> {
        let slot = *self.book.index.get(&id)?;
        let ok = match slot {
            Slot::Entry(i) => self.entries.get(i).is_some_and(|e| e.id == id),
            Slot::Joiner(i) => self.joiners.get(i).is_some_and(|e| e.id == id),
        };
        if ok {
            return Some(slot);
        }
        tracing::debug!(target: LOG, "coordinator: stale index slot of member {id}");
        if let Some(i) = self.entries.iter().position(|e| e.id == id) {
            return Some(Slot::Entry(i));
        }
        self.joiners
            .iter()
            .position(|e| e.id == id)
            .map(Slot::Joiner)
    }

    /// Member `id` of the current entries (not a joiner).
    fn entry(&self, id: u64) -> Option<&Entry> {
        match self.slot(id)? {
            Slot::Entry(i) => self.entries.get(i),
            Slot::Joiner(_) => None,
        }
    }

    /// Member `id` of the current entries (not a joiner), mutably.
    fn entry_mut(&mut self, id: u64) -> Option<&mut Entry> {
        match self.slot(id)? {
            Slot::Entry(i) => self.entries.get_mut(i),
            Slot::Joiner(_) => None,
        }
    }

    /// Member `id`, an entry or a joiner.
    fn any(&self, id: u64) -> Option<&Entry> {
        match self.slot(id)? {
            Slot::Entry(i) => self.entries.get(i),
            Slot::Joiner(i) => self.joiners.get(i),
        }
    }

    /// Member `id`, an entry or a joiner, mutably.
    fn any_mut(&mut self, id: u64) -> Option<&mut Entry> {
        match self.slot(id)? {
            Slot::Entry(i) => self.entries.get_mut(i),
            Slot::Joiner(i) => self.joiners.get_mut(i),
        }
    }

    /// Appends an entry (O(1) bookkeeping).
    fn push_entry(&mut self, e: Entry) {
        let epoch = self.view.as_ref().map_or(0, |v| v.epoch);
        let b = &mut self.book;
        b.index.insert(e.id, Slot::Entry(self.entries.len()));
        b.unacked += usize::from(e.acked < epoch);
        b.flagged += usize::from(e.leaving || e.resync.is_some());
        b.next_deadline = earliest(b.next_deadline, hb_deadline(&e));
        self.entries.push(e);
    }

    /// Appends a joiner (O(1) bookkeeping).
    fn push_joiner(&mut self, e: Entry) {
        let b = &mut self.book;
        b.index.insert(e.id, Slot::Joiner(self.joiners.len()));
        b.next_deadline = earliest(b.next_deadline, hb_deadline(&e));
        self.joiners.push(e);
    }

    /// Removes joiner `id` (if it is one).
    fn remove_joiner(&mut self, id: u64) -> Option<Entry> {
        let Slot::Joiner(i) = self.slot(id)? else {
            return None;
        };
        let e = self.joiners.remove(i);
        self.reindex();
        Some(e)
    }

    /// Records that entry `id` acknowledged `epoch`.
    fn ack(&mut self, id: u64, epoch: u64) {
        let cur = self.view.as_ref().map_or(0, |v| v.epoch);
        if let Some(e) = self.entry_mut(id) {
            let before = e.acked;
            e.acked = e.acked.max(epoch);
            if before < cur && e.acked >= cur {
                self.book.unacked = self.book.unacked.saturating_sub(1);
            }
        }
    }
}

/// A push/pull checkpoint reported by a member, for the status.
#[derive(Debug, Clone, Serialize)]
struct CheckpointSeen {
    id: String,
    dir: String,
    version: u64,
    max_version: u64,
    parts: u64,
    bytes: u64,
    /// Who reported it.
    member: u64,
    /// When it was reported (seconds since the Unix epoch, coordinator clock).
    at: f64,
}

/// What the members of a group reported of their pipeline stages.
#[derive(Debug, Default)]
struct PipelineMetrics {
    /// Block costs of the latest report, and their fingerprint.
    costs: Vec<f64>,
    costs_key: u64,
    /// Each member's measured stage, by id.
    stages: HashMap<u64, MeasuredStage>,
    /// A pipeline too large to re-plan under the lock was reported (logged once).
    too_large: bool,
    /// The last decision: (epoch, fewest reports of a stage then), so that a decision runs
    /// once per round of reports rather than on every report.
    decided: (u64, u32),
}

/// One member's measured pipeline stage (see [`fold_metric`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MeasuredStage {
    /// Epoch of the reports.
    pub epoch: u64,
    /// The stage's blocks.
    pub blocks: Range<usize>,
    /// Fingerprint of the block costs the member reported ([`costs_key`]).
    pub costs_key: u64,
    /// Measured throughput (stage cost per second), smoothed.
    pub weight: f64,
    /// Reports folded in this epoch.
    pub reports: u32,
    /// The member's re-plan threshold.
    pub gain: f64,
}

/// Smoothing factor of the measured throughput (weight of the newest sample).
const EWMA_ALPHA: f64 = 0.5;

/// Fingerprint of a block-cost list (members of one pipeline report the same list).
pub(crate) fn costs_key(costs: &[f64]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    costs.len().hash(&mut h);
    for c in costs {
        c.to_bits().hash(&mut h);
    }
    h.finish()
}

/// Folds one report (`sample` = stage cost / seconds) into a member's measured stage: an
/// exponential moving average (alpha 0.5) while the epoch, the stage and the costs stay the
/// same, a fresh start otherwise.
pub(crate) fn fold_metric(
    prev: Option<&MeasuredStage>,
    epoch: u64,
    blocks: Range<usize>,
    costs_key: u64,
    sample: f64,
    gain: f64,
) -> MeasuredStage {
    match prev {
        Some(p) if p.epoch == epoch && p.blocks == blocks && p.costs_key == costs_key => {
            MeasuredStage {
                epoch,
                blocks,
                costs_key,
                weight: EWMA_ALPHA * sample + (1.0 - EWMA_ALPHA) * p.weight,
                reports: p.reports.saturating_add(1),
                gain,
            }
        }
        _ => MeasuredStage {
            epoch,
            blocks,
            costs_key,
            weight: sample,
            reports: 1,
            gain,
        },
    }
}

/// Whether the stages' blocks tile `0..n_blocks` exactly (no gap, no overlap, none empty).
fn tiles(n_blocks: usize, stages: &[(u64, MeasuredStage)]) -> bool {
    let mut order: Vec<&Range<usize>> = stages.iter().map(|(_, s)| &s.blocks).collect();
    order.sort_by_key(|b| (b.start, b.end));
    let mut at = 0;
    for b in order {
        if b.start != at || b.end <= b.start {
            return false;
        }
        at = b.end;
    }
    at == n_blocks
}

/// A re-weigh decided by [`reweigh_decision`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reweigh {
    /// New weight of every member, in view order.
    pub weights: Vec<f64>,
    /// Predicted gain: 1 - best / current largest stage time.
    pub gain: f64,
}

/// Whether to re-weigh a pipeline's members, and how. `members`: the view's (id, published
/// weight) in view order; `costs`: the pipeline's block costs; `stages`: the members' measured
/// stages (id, stage), those of other members or epochs already left out.
///
/// Decides only when the measured stages are complete: at least two of them, each reported at
/// least twice, tiling the blocks exactly (a member with a stage that has not reported leaves
/// a gap; two members reporting one range — a replicated stage — overlap: no decision). Then
/// the measured throughputs are scaled so that the reporting members' mean weight equals
/// their published mean (members without a stage keep their published weight); `current` is
/// the largest stage time (stage cost / scaled weight) of the current stages, `best` that of
/// an optimal plan over the view with the scaled weights, and the predicted gain
/// 1 - best/current must exceed `threshold`. So must the gain over a plan made with the view's
/// published weights (measured as well): when those already give about the best plan (the
/// members' weights were re-weighed before and the stages were not re-planned since), a new
/// view would change nothing, and none is proposed.
pub(crate) fn reweigh_decision(
    members: &[(u64, f64)],
    costs: &[f64],
    stages: &[(u64, MeasuredStage)],
    threshold: f64,
) -> Option<Reweigh> {
    if stages.len() < 2 || stages.iter().any(|(_, s)| s.reports < 2) {
        return None;
    }
    if !tiles(costs.len(), stages) {
        return None;
    }
    let published: HashMap<u64, f64> = members.iter().copied().collect();
    let mut pub_sum = 0.0;
    let mut meas_sum = 0.0;
    for (id, s) in stages {
        pub_sum += published.get(id)?;
        if !(s.weight.is_finite() && s.weight > 0.0) {
            return None;
        }
        meas_sum += s.weight;
    }
    let factor = pub_sum / meas_sum;
    let measured: HashMap<u64, &MeasuredStage> = stages.iter().map(|(id, s)| (*id, s)).collect();
    let weights: Vec<f64> = members
        .iter()
        .map(|(id, w)| measured.get(id).map_or(*w, |s| s.weight * factor))
        .collect();
    if weights.iter().any(|w| !(w.is_finite() && *w > 0.0)) {
        return None;
    }
    let current = stages
        .iter()
        .map(|(_, s)| {
            let cost: f64 = costs[s.blocks.clone()].iter().sum();
            cost / (s.weight * factor)
        })
        .fold(0.0, f64::max);
    let list: Vec<(u64, f64)> = members
        .iter()
        .zip(&weights)
        .map(|((id, _), w)| (*id, *w))
        .collect();
    let best = super::pipeline::plan_pipeline(costs, &list).ok()?.max_cost;
    if !(current.is_finite() && current > 0.0) {
        return None;
    }
    let gain = 1.0 - best / current;
    if gain <= threshold {
        return None;
    }
    // What the view's own weights would plan, timed with the measured weights.
    let by_view = super::pipeline::plan_pipeline(costs, members).ok()?;
    let new_weight: HashMap<u64, f64> = list.iter().copied().collect();
    let view_time = by_view
        .stages
        .iter()
        .map(|st| {
            let cost: f64 = costs[st.blocks.clone()].iter().sum();
            cost / new_weight.get(&st.member).copied().unwrap_or(f64::NAN)
        })
        .fold(0.0, f64::max);
    if !(view_time.is_finite() && 1.0 - best / view_time > threshold) {
        return None;
    }
    Some(Reweigh { weights, gain })
}

struct State {
    /// Next member id (one counter for all groups; ids are never reused).
    next_id: u64,
    /// Ids below this may have been handed out (persisted before use).
    id_high_water: u64,
    groups: HashMap<String, Group>,
    /// Snapshots of this state taken for the state file (a later one is never overwritten
    /// by an earlier one).
    snap_gen: u64,
}

/// A row of the service's connection table: the socket and its thread.
type Conn = (Arc<Link>, JoinHandle<()>);

struct Shared {
    opts: CoordinatorOptions,
    state: Mutex<State>,
    stop: AtomicBool,
    /// Open connections by key: the socket (to shut it down at once) and the thread. A
    /// connection's thread removes its own row when it ends (the accept loop spawns it while
    /// holding this lock, so the row is always there first).
    conns: Mutex<HashMap<u64, Conn>>,
    /// Keys of the connections still in their handshake (keys grow: the first is the oldest).
    pending: Mutex<BTreeSet<u64>>,
    /// Registrations accepted per group since this service started (not persisted; kept after
    /// a group is forgotten), for the status: "members came and all left".
    tally: Mutex<BTreeMap<String, u64>>,
    /// The member connections' epoll set (the event loop waits on it).
    poller: Poller,
    /// Registered connections handed over to the event loop, not yet taken by it.
    inbox: Mutex<Vec<Handover>>,
    /// Work of the persister thread (filled under the state lock, so frames go out in the
    /// order of the state changes that made them).
    work: Mutex<Work>,
    work_cv: Condvar,
    /// Ids below this are covered by the state file (persisted high-water mark).
    durable_high: AtomicU64,
    /// The generation of the last snapshot written to the state file.
    written_gen: Mutex<u64>,
}

impl Shared {
    /// The coordinator's shared state around `state` (as loaded: its next id is durable).
    fn new(opts: CoordinatorOptions, state: State, poller: Poller) -> Shared {
        let durable = state.next_id;
        Shared {
            opts,
            state: Mutex::new(state),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            pending: Mutex::new(BTreeSet::new()),
            tally: Mutex::new(BTreeMap::new()),
            poller,
            inbox: Mutex::new(Vec::new()),
            work: Mutex::new(Work::default()),
            work_cv: Condvar::new(),
            durable_high: AtomicU64::new(durable),
            written_gen: Mutex::new(0),
        }
    }
}

/// What the persister thread has to do.
#[derive(Default)]
struct Work {
    /// The state changed: write the state file.
    dirty: bool,
    /// Frames to send once the state that produced them is on disk.
    publish: Publish,
}

/// A registered connection, handed from its handshake thread to the event loop.
struct Handover {
    key: u64,
    link: Arc<Link>,
    peer: SocketAddr,
    id: u64,
    group: String,
    /// Bytes the handshake read beyond its last frame.
    leftover: Vec<u8>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Ids handed out between two writes of the state file.
const ID_BLOCK: u64 = 1024;
/// How often the ticker looks at heartbeats and batching windows.
const TICK: Duration = Duration::from_millis(20);

/// The coordinator service, running on background threads (accept, handshakes, the event
/// loop, the ticker and the persister). Dropping it shuts it down.
///
/// It can be embedded in any process (like torch's `TCPStore`): `braid-run` embeds one, the
/// torchrun convention has rank 0 host one, and `braid-coordinator` runs one standalone.
pub struct Coordinator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    ticker: Option<JoinHandle<()>>,
    /// The event loop serving registered members.
    looper: Option<JoinHandle<()>>,
    /// The persister (state file, then the frames that waited for it).
    persister: Option<JoinHandle<()>>,
    /// Dropped by `shutdown` to wake the accept thread from `poll(2)`.
    wake: Option<UnixStream>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    /// Binds the service to `addr` (`"127.0.0.1:0"` picks a free port; see
    /// [`Coordinator::local_addr`]) and starts serving with default options.
    ///
    /// Errors: `Error::System` when the address cannot be bound or a thread cannot start.
    pub fn bind(addr: &str) -> Result<Coordinator> {
        Coordinator::bind_with(addr, CoordinatorOptions::default())
    }

    /// Like [`Coordinator::bind`] with explicit options.
    ///
    /// Errors: as [`Coordinator::bind`]; `Error::InvalidArgument` for zero timeouts.
    pub fn bind_with(addr: &str, opts: CoordinatorOptions) -> Result<Coordinator> {
        if opts.handshake_timeout.is_zero() || opts.frame_timeout.is_zero() {
            return Err(Error::InvalidArgument(
                "coordinator timeouts must be positive".into(),
            ));
        }
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::System(format!("cannot bind the coordinator to {addr}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::System(format!("coordinator address: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::System(format!("coordinator listener: {e}")))?;
        // SAFETY: `listener` owns this descriptor, a bound listening TCP socket, for the
        // whole call; listen(2) on it again only changes its backlog.
        if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
            tracing::warn!(target: LOG,
                "coordinator: cannot raise the listen backlog to {LISTEN_BACKLOG}: {}",
                std::io::Error::last_os_error());
        }
        let (wake, woken) = UnixStream::pair()
            .map_err(|e| Error::System(format!("coordinator wake-up socket: {e}")))?;
        let state = load_state(&opts)?;
        let poller = Poller::new()
            .map_err(|e| Error::System(format!("coordinator event loop (epoll): {e}")))?;
        let shared = Arc::new(Shared::new(opts, state, poller));
        if shared.opts.state_file.is_some() {
            // Ids for the first registrations, persisted before anyone asks.
            let mut st = lock(&shared.state);
            st.id_high_water = st.next_id.saturating_add(ID_BLOCK);
            if let Err(e) = persist_now(&shared, &mut st) {
                tracing::warn!(target: LOG, "coordinator: cannot persist its state: {e}");
                st.id_high_water = st.next_id;
            }
        }
        // A thread that cannot start stops those already started.
        let failed = |e: std::io::Error| {
            shared.stop.store(true, Ordering::SeqCst);
            shared.poller.wake();
            shared.work_cv.notify_all();
            Error::System(format!("cannot start the coordinator thread: {e}"))
        };
        let sh = Arc::clone(&shared);
        let looper = std::thread::Builder::new()
            .name("braid-coord-loop".into())
            .spawn(move || event_loop(sh))
            .map_err(failed)?;
        let sh = Arc::clone(&shared);
        let persister = std::thread::Builder::new()
            .name("braid-coord-persist".into())
            .spawn(move || persist_loop(sh))
            .map_err(failed)?;
        let sh = Arc::clone(&shared);
        let ticker = std::thread::Builder::new()
            .name("braid-coord-tick".into())
            .spawn(move || tick_loop(sh))
            .map_err(failed)?;
        let sh = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("braid-coord-accept".into())
            .spawn(move || accept_loop(listener, woken, sh))
            .map_err(failed)?;
        tracing::info!(target: LOG, "coordinator listening on {local}");
        Ok(Coordinator {
            addr: local,
            shared,
            accept: Some(accept),
            ticker: Some(ticker),
            looper: Some(looper),
            persister: Some(persister),
            wake: Some(wake),
        })
    }

    /// The service's status as JSON: per group the current view (epoch, members with rank,
    /// id, host, pid, role, heartbeat age), waiting joiners, the history of epochs with
    /// their reasons, `live` (members and joiners still registered) and `registered_total`
    /// (registrations accepted since this service started). At the top: `live_members` (over
    /// all groups), `registered_total` (all groups, forgotten ones included) and
    /// `past_groups` (groups whose members all left, so forgotten: name and
    /// `registered_total`). "Members came and all left" is `registered_total > 0 &&
    /// live_members == 0`. The same document `braid-coordinator status ADDR` prints.
    pub fn status(&self) -> serde_json::Value {
        status_json(&self.shared)
    }

    /// The address the service is bound to (with the port chosen when binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Members currently registered in `group` (for tests).
    #[cfg(test)]
    pub(crate) fn registered(&self, group: &str) -> usize {
        lock(&self.shared.state)
            .groups
            .get(group)
            .map_or(0, |g| g.entries.len())
    }

    /// Stops the service: closes the listener and every connection and joins the threads,
    /// waiting at most about 3 s (threads that do not finish by then are left to finish on
    /// their own). Idempotent; also done by `Drop`.
    pub fn shutdown(&mut self) {
        if self.shared.stop.swap(true, Ordering::SeqCst) && self.accept.is_none() {
            return;
        }
        let deadline = Instant::now() + JOIN_TIMEOUT;
        // Its peer closing wakes the accept thread's poll.
        drop(self.wake.take());
        if let Some(h) = self.accept.take() {
            join_until(h, deadline, "accept");
        }
        if let Some(h) = self.ticker.take() {
            join_until(h, deadline, "tick");
        }
        self.shared.poller.wake();
        if let Some(h) = self.looper.take() {
            join_until(h, deadline, "event loop");
        }
        self.shared.work_cv.notify_all();
        if let Some(h) = self.persister.take() {
            join_until(h, deadline, "persister");
        }
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        for (link, _) in conns.values() {
            link.close();
        }
        for (_, (_, h)) in conns {
            join_until(h, deadline, "connection");
        }
        tracing::info!(target: LOG, "coordinator on {} stopped", self.addr);
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn join_until(h: JoinHandle<()>, deadline: Instant, what: &str) {
    while !h.is_finished() {
        if Instant::now() >= deadline {
            tracing::warn!(target: LOG, "coordinator {what} thread did not stop in time; leaving it");
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = h.join();
}

/// Waits until the listener has a connection to accept, `woken` is readable (shutdown) or
/// `timeout` passed.
fn wait_accept(listener: &TcpListener, woken: &UnixStream, timeout: Duration) {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: woken.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fds` is a valid array of two pollfd for the whole call (its length is passed),
    // and both descriptors are owned by `listener` and `woken`, borrowed for the call.
    let _ = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
}

fn accept_loop(listener: TcpListener, woken: UnixStream, sh: Arc<Shared>) {
    let mut next_key = 0u64;
    // Evictions of handshaking connections since the last log line (logged at most once a
    // second, so a flood does not flood the log too).
    let mut evicted = 0u64;
    let mut last_log: Option<Instant> = None;
    while !sh.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let mut conns = lock(&sh.conns);
                if conns.len() >= sh.opts.max_connections {
                    tracing::warn!(target: LOG,
                        "coordinator: refusing connection from {peer}: {} connections open",
                        conns.len());
                    continue;
                }
                let link = Arc::new(Link::new(stream));
                next_key += 1;
                let key = next_key;
                {
                    let mut pending = lock(&sh.pending);
                    while pending.len() >= sh.opts.max_unauthenticated.max(1) {
                        let Some(old) = pending.pop_first() else {
                            break;
                        };
                        if let Some((l, _)) = conns.get(&old) {
                            l.close();
                            evicted += 1;
                        }
                    }
                    pending.insert(key);
                }
                if evicted > 0 && last_log.map_or(true, |t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(target: LOG,
                        "coordinator: closed {evicted} connection(s) that had not finished their handshake: more than {} were open at once (a flood of idle or slow connections?); the oldest go first",
                        sh.opts.max_unauthenticated.max(1));
                    evicted = 0;
                    last_log = Some(Instant::now());
                }
                let sh2 = Arc::clone(&sh);
                let link2 = Arc::clone(&link);
                match std::thread::Builder::new()
                    .name("braid-coord-conn".into())
                    .stack_size(sh.opts.thread_stack.max(64 << 10))
                    .spawn(move || serve(link2, peer, sh2, key))
                {
                    Ok(h) => {
                        conns.insert(key, (link, h));
                    }
                    Err(e) => {
                        unpend(&sh, key);
                        tracing::warn!(target: LOG, "coordinator: no thread for {peer}: {e}")
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_accept(&listener, &woken, ACCEPT_POLL);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(target: LOG, "coordinator: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The connection `key` finished its handshake (or ended): it no longer counts against
/// [`CoordinatorOptions::max_unauthenticated`].
fn unpend(sh: &Shared, key: u64) {
    lock(&sh.pending).remove(&key);
}

/// Sends an error frame (best effort) and logs the refusal.
fn refuse(s: &Link, peer: SocketAddr, message: &str) {
    refuse_code(s, peer, message, None);
}

fn refuse_code(s: &Link, peer: SocketAddr, message: &str, code: Option<&str>) {
    tracing::info!(target: LOG, "coordinator: refused {peer}: {message}");
    let _ = s.send(&proto::encode_error_code(message, code), WRITE_TIMEOUT);
}

/// Serves one connection's handshake. A registered member's connection is handed over to
/// the event loop; any other ends here: the socket is shut down (others may still hold the
/// link for a moment, so dropping ours would not close it) and its row leaves the service's
/// table.
fn serve(link: Arc<Link>, peer: SocketAddr, sh: Arc<Shared>, key: u64) {
    let mut handed = false;
    serve_inner(&link, peer, &sh, key, &mut handed);
    unpend(&sh, key);
    if !handed {
        link.close();
        lock(&sh.conns).remove(&key);
    }
}

/// What the first frame asked for.
enum Opening {
    Register(Registration),
    Rejoin(proto::Rejoin),
    Status,
    ViewReq(String),
    Reader(String),
}

/// What the handshake established: the coordinator's proof of the job token (if any), and
/// for a challenged connection the server nonce and the client's answer.
struct Handshake {
    proof: Option<String>,
    server_nonce: String,
    answer: Option<proto::Auth>,
}

fn serve_inner(writer: &Arc<Link>, peer: SocketAddr, sh: &Shared, key: u64, handed: &mut bool) {
    let _ = writer.sock.set_nodelay(true);
    let _ = writer.sock.set_nonblocking(false);
    let mut reader = Sock::new(&writer.sock);
    let now = Instant::now();
    let hs_deadline = now.checked_add(sh.opts.handshake_timeout).unwrap_or(now);

    // 1. The first frame must be a registration, a rejoin or a request, small, and complete
    //    within the handshake timeout.
    let Some(frame) = read_checked(&mut reader, writer, peer, hs_deadline, MAX_OPENING, sh) else {
        return;
    };
    let opening = match MsgType::from_u16(frame.ty) {
        Some(MsgType::Register) => frame.body::<Registration>().map(Opening::Register),
        Some(MsgType::Rejoin) => frame.body::<proto::Rejoin>().map(Opening::Rejoin),
        Some(MsgType::StatusReq) => frame.body::<proto::StatusReq>().map(|_| Opening::Status),
        Some(MsgType::ViewReq) => frame
            .body::<proto::ViewReq>()
            .map(|r| Opening::ViewReq(r.group)),
        Some(MsgType::ReaderReq) => frame
            .body::<proto::ReaderReq>()
            .map(|r| Opening::Reader(r.group)),
        _ => {
            tracing::warn!(target: LOG,
                "coordinator: dropping {peer}: first message has type {}, expected a registration",
                frame.ty);
            refuse(
                writer,
                peer,
                &format!(
                    "expected a registration (message type {}), got message type {}",
                    MsgType::Register as u16,
                    frame.ty
                ),
            );
            return;
        }
    };
    let opening = match opening {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(target: LOG, "coordinator: dropping {peer}: bad first message: {e}");
            refuse(writer, peer, &format!("malformed registration: {e}"));
            return;
        }
    };
    let client_nonce = match &opening {
        Opening::Register(r) => r.client_nonce.clone(),
        Opening::Rejoin(r) => r.client_nonce.clone(),
        Opening::Status => frame
            .body::<proto::StatusReq>()
            .map(|r| r.client_nonce)
            .unwrap_or_default(),
        Opening::ViewReq(_) => frame
            .body::<proto::ViewReq>()
            .map(|r| r.client_nonce)
            .unwrap_or_default(),
        Opening::Reader(_) => frame
            .body::<proto::ReaderReq>()
            .map(|r| r.client_nonce)
            .unwrap_or_default(),
    };

    // 2. Challenge-response: the job token when there is one; a rejoin proves its member
    //    secret too (even without a token).
    let token = sh.opts.job_token.as_deref();
    let hs = if token.is_some() || matches!(opening, Opening::Rejoin(_)) {
        match challenge(
            &mut reader,
            writer,
            peer,
            hs_deadline,
            sh,
            token,
            &client_nonce,
        ) {
            Some(hs) => hs,
            None => return,
        }
    } else {
        Handshake {
            proof: None,
            server_nonce: String::new(),
            answer: None,
        }
    };
    let proof = hs.proof.clone();

    // 3. Admission.
    let (id, group) = match opening {
        Opening::ViewReq(group) => {
            let view = lock(&sh.state)
                .groups
                .get(&group)
                .and_then(|g| g.view.clone());
            match view {
                Some(mut v) => {
                    // The nonce keys the view's data connections: it goes only to members.
                    v.nonce = 0;
                    let mut doc =
                        serde_json::json!({"member_id": 0, "view": v, "reason": "view request"});
                    if let Some(p) = proof {
                        doc["proof"] = serde_json::Value::String(p);
                    }
                    let bytes = proto::encode_raw(
                        proto::VERSION,
                        MsgType::View as u16,
                        &serde_json::to_vec(&doc).unwrap_or_default(),
                    );
                    let _ = writer.send(&bytes, WRITE_TIMEOUT);
                }
                None => refuse_code(
                    writer,
                    peer,
                    &format!("group {group} has no view (not formed, or unknown)"),
                    Some("unknown"),
                ),
            }
            return;
        }
        Opening::Reader(group) => {
            match grant_reader(sh, &group, peer, proof) {
                Ok(bytes) => {
                    let _ = writer.send(&bytes, WRITE_TIMEOUT);
                }
                Err((msg, code)) => refuse_code(writer, peer, &msg, code),
            }
            return;
        }
        Opening::Status => {
            let body = status_json(sh);
            let mut doc = serde_json::json!({ "status": body });
            if let Some(p) = proof {
                doc["proof"] = serde_json::Value::String(p);
            }
            match serde_json::to_vec(&doc) {
                Ok(payload) => {
                    let bytes =
                        proto::encode_raw(proto::VERSION, MsgType::StatusReply as u16, &payload);
                    let _ = writer.send(&bytes, WRITE_TIMEOUT);
                }
                Err(e) => refuse(writer, peer, &format!("status: {e}")),
            }
            return;
        }
        Opening::Register(reg) => match register(sh, reg, peer, writer, proof) {
            Ok((id, group, _)) => {
                unpend(sh, key);
                (id, group)
            }
            Err((msg, code)) => {
                refuse_code(writer, peer, &msg, code);
                return;
            }
        },
        Opening::Rejoin(rj) => match rejoin(sh, &rj, peer, writer, &hs, &client_nonce) {
            Ok(_) => {
                unpend(sh, key);
                (rj.member_id, rj.group)
            }
            Err((msg, code)) => {
                refuse_code(writer, peer, &msg, code);
                return;
            }
        },
    };

    // 4. Member messages until goodbye or disconnect: served by the event loop.
    lock(&sh.inbox).push(Handover {
        key,
        link: Arc::clone(writer),
        peer,
        id,
        group,
        leftover: reader.leftover(),
    });
    *handed = true;
    sh.poller.wake();
}

/// A reader's grant: a fresh id (never reused), the group's view without its nonce, and the
/// ticket the group's push/pull servers check (keyed by the view key, which needs the nonce).
fn grant_reader(
    sh: &Shared,
    group: &str,
    peer: SocketAddr,
    proof: Option<String>,
) -> std::result::Result<Vec<u8>, Refusal> {
    let (id, mut view) = {
        let mut st = lock(&sh.state);
        let Some(view) = st.groups.get(group).and_then(|g| g.view.clone()) else {
            return Err((
                format!("group {group} has no view (not formed, or unknown)"),
                Some("unknown"),
            ));
        };
        let id = alloc_id(sh, &mut st).map_err(|m| (m, None))?;
        (id, view)
    };
    let key = auth::view_key(sh.opts.job_token.as_deref(), view.nonce);
    let ticket = auth::reader_ticket(&key, group, id, view.epoch);
    view.nonce = 0;
    tracing::info!(target: LOG,
        "coordinator: group {group}: reader {id} registered from {peer} (view epoch {})",
        view.epoch);
    proto::encode(
        MsgType::ReaderGrant,
        &proto::ReaderGrantMsg {
            id,
            view,
            ticket: super::to_hex(&ticket),
            proof,
        },
    )
    .map_err(|e| (e.to_string(), None))
}

/// Runs the challenge-response. With a job token, the client must prove it; the answer is
/// returned for the caller's own checks (a rejoin's member proof).
fn challenge(
    reader: &mut Sock<'_>,
    writer: &Link,
    peer: SocketAddr,
    deadline: Instant,
    sh: &Shared,
    token: Option<&[u8]>,
    client_nonce: &str,
) -> Option<Handshake> {
    let server_nonce = super::random_nonce();
    let ch = match proto::encode(
        MsgType::Challenge,
        &proto::Challenge {
            server_nonce: server_nonce.clone(),
            token: token.is_some(),
        },
    ) {
        Ok(b) => b,
        Err(_) => return None,
    };
    if writer.send(&ch, WRITE_TIMEOUT).is_err() {
        return None;
    }
    let Some(f) = read_checked(reader, writer, peer, deadline, MAX_AUTH, sh) else {
        if token.is_some() {
            tracing::warn!(target: LOG, "coordinator: refused {peer}: no answer to the job-token challenge (BRAID_JOB_TOKEN missing on that side?)");
        } else {
            tracing::warn!(target: LOG, "coordinator: refused {peer}: no answer to the rejoin challenge");
        }
        return None;
    };
    let answer = if MsgType::from_u16(f.ty) == Some(MsgType::Auth) {
        f.body::<proto::Auth>().ok()
    } else {
        None
    };
    let Some(answer) = answer else {
        tracing::warn!(target: LOG, "coordinator: refused {peer}: message type {} is not an answer to the challenge", f.ty);
        refuse_code(
            writer,
            peer,
            "expected the answer to the challenge",
            Some("auth"),
        );
        return None;
    };
    let proof = match token {
        None => None,
        Some(token) => {
            if !auth::check_client(token, &server_nonce, client_nonce, &answer.mac) {
                tracing::warn!(target: LOG, "coordinator: refused {peer}: job token missing or wrong");
                refuse_code(
                    writer,
                    peer,
                    "job token rejected: this coordinator requires BRAID_JOB_TOKEN and the answer did not prove it",
                    Some("auth"),
                );
                return None;
            }
            Some(auth::server_mac(token, client_nonce, &server_nonce))
        }
    };
    Some(Handshake {
        proof,
        server_nonce,
        answer: Some(answer),
    })
}

/// Whether member `e`'s heartbeat at `now` is to be echoed (and if so, notes it). A member
/// stops trusting its connection after its silence timeout, which is its heartbeat timeout
/// (the client's `silence`): an echo at least every quarter of that timeout keeps it well
/// informed, so heartbeats sent more often are echoed only that often (each echo is a write
/// and a wake-up of the member). Without a timeout, every heartbeat is echoed.
fn echo_due(e: &mut Entry, now: Instant) -> bool {
    let every = Duration::from_millis(e.reg.heartbeat_timeout_ms / 4);
    let due = every.is_zero()
        || e.echoed
            .map_or(true, |t| now.saturating_duration_since(t) >= every);
    if due {
        e.echoed = Some(now);
    }
    due
}

/// What the event loop does with a member's connection after one of its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Keep serving it.
    Go,
    /// It ends: after a goodbye (true) or a violation (false).
    End(bool),
}

/// Handles one frame of registered member `id` (the event loop, one frame at a time).
fn on_member_frame(
    f: Frame,
    writer: &Link,
    peer: SocketAddr,
    sh: &Shared,
    id: u64,
    group: &str,
) -> Flow {
    {
        if f.version != proto::VERSION {
            tracing::warn!(target: LOG,
                "coordinator: member {id} ({peer}) switched to protocol v{}; dropping it",
                f.version);
            return Flow::End(false);
        }
        let ty = MsgType::from_u16(f.ty);
        {
            let mut st = lock(&sh.state);
            let Some(g) = st.groups.get_mut(group) else {
                return Flow::End(matches!(ty, Some(MsgType::Goodbye)));
            };
            let now = Instant::now();
            if let Some(e) = g.any_mut(id) {
                e.last_seen = now;
            } else if !g.leavers.iter().any(|l| l.0 == id) {
                // Declared dead meanwhile: its connection is being closed.
                let why = g.retired.get(&id).cloned().unwrap_or_default();
                drop(st);
                refuse_code(
                    writer,
                    peer,
                    &format!("member {id} was removed from group {group} ({why}); its id is retired: join again as a new member"),
                    Some("retired"),
                );
                return Flow::End(false);
            }
            let publish = match ty {
                Some(MsgType::Heartbeat) => {
                    // Echo, so a member can tell it is cut off when the echoes stop.
                    let epoch = g.view.as_ref().map_or(0, |v| v.epoch);
                    let due = g.any_mut(id).map_or(true, |e| echo_due(e, now));
                    drop(st);
                    if !due {
                        return Flow::Go;
                    }
                    if let Ok(b) = proto::encode(MsgType::Heartbeat, &proto::Heartbeat { epoch }) {
                        let _ = writer.send(&b, WRITE_TIMEOUT);
                    }
                    return Flow::Go;
                }
                Some(MsgType::Goodbye) => return Flow::End(true),
                Some(MsgType::Ack) => match f.body::<proto::Ack>() {
                    Ok(a) => {
                        g.ack(id, a.epoch);
                        decide(sh, &mut st, group, now)
                    }
                    Err(_) => Vec::new(),
                },
                Some(MsgType::Leave) => {
                    if let Some(e) = g.entry_mut(id) {
                        if !e.leaving {
                            tracing::info!(target: LOG, "coordinator: group {group}: member {id} announced its leave");
                            e.leaving = true;
                            g.book.flagged += 1;
                            g.reasons.push(format!("leave of {id}"));
                        }
                    } else if g.remove_joiner(id).is_some() {
                        g.retired.insert(id, "left before admission".into());
                    }
                    decide(sh, &mut st, group, now)
                }
                Some(MsgType::Resync) => match f.body::<proto::Resync>() {
                    Ok(r) => {
                        let cur = g.view.as_ref().map_or(0, |v| v.epoch);
                        if r.epoch >= cur {
                            if let Some(e) = g.entry_mut(id) {
                                tracing::info!(target: LOG,
                                    "coordinator: group {group}: member {id} asks for a resync of epoch {} (suspects {:?})",
                                    r.epoch, r.suspects);
                                e.resync = Some((r.epoch, r.suspects));
                                g.book.flagged += 1;
                            }
                        }
                        decide(sh, &mut st, group, now)
                    }
                    Err(_) => Vec::new(),
                },
                Some(MsgType::Metric) => match f.body::<proto::Metric>() {
                    Ok(m) => on_metric(sh, &mut st, group, id, &m),
                    Err(e) => {
                        tracing::debug!(target: LOG, "coordinator: member {id} ({peer}): unreadable metric: {e}");
                        Vec::new()
                    }
                },
                Some(MsgType::Checkpoint) => {
                    match f
                        .body::<proto::CheckpointNote>()
                        .and_then(|c| c.check().map(|()| c))
                    {
                        Ok(c) => {
                            tracing::info!(target: LOG, "coordinator: group {group}: checkpoint {} (version {}) in {} reported by member {id}", c.id, c.version, c.dir);
                            g.checkpoint = Some(CheckpointSeen {
                                id: c.id,
                                dir: c.dir,
                                version: c.version,
                                max_version: c.max_version,
                                parts: c.parts,
                                bytes: c.bytes,
                                member: id,
                                at: unix_now(),
                            });
                        }
                        Err(e) => {
                            tracing::debug!(target: LOG, "coordinator: member {id} ({peer}): checkpoint note refused: {e}");
                        }
                    }
                    Vec::new()
                }
                Some(MsgType::Register) | Some(MsgType::Rejoin) => {
                    drop(st);
                    refuse(
                        writer,
                        peer,
                        &format!("this connection is already registered as member {id}"),
                    );
                    return Flow::End(false);
                }
                _ => {
                    tracing::warn!(target: LOG,
                        "coordinator: member {id} ({peer}) sent unexpected message type {}; dropping it",
                        f.ty);
                    return Flow::End(false);
                }
            };
            queue(sh, publish);
        }
    }
    Flow::Go
}

/// A member connection as the event loop holds it.
struct Served {
    link: Arc<Link>,
    peer: SocketAddr,
    id: u64,
    group: String,
    dec: Decoder,
}

/// The event loop lets events gather for this long after a batch of fewer than
/// [`GATHER_BELOW`] events.
const GATHER: Duration = Duration::from_millis(2);
const GATHER_BELOW: usize = 64;

/// Bytes one connection may deliver per turn of the loop before the others get theirs.
const READ_TURN: usize = 256 << 10;

/// The event loop: serves every registered member's connection (reads, heartbeats,
/// acknowledgements and every other member message; flushes the outgoing queues) on one
/// thread, until the service stops.
fn event_loop(sh: Arc<Shared>) {
    let mut conns: IdMap<Served> = IdMap::default();
    // Connections with bytes left to read after their turn, and those holding part of a
    // frame (checked against the frame timeout).
    let mut again: Vec<u64> = Vec::new();
    let mut partial: BTreeSet<u64> = BTreeSet::new();
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut ready: Vec<(u64, u32)> = Vec::new();
    let mut scratch = vec![0u8; 64 << 10];
    let mut last_wake = Instant::now();
    while !sh.stop.load(Ordering::SeqCst) {
        let timeout = if again.is_empty() {
            IDLE_SLICE
        } else {
            Duration::ZERO
        };
        // Fewer wake-ups: after a small batch, let events gather for a moment (heartbeats
        // come every second; a view waits at most this much longer).
        if ready.len() < GATHER_BELOW && again.is_empty() {
            let since = last_wake.elapsed();
            if since < GATHER {
                std::thread::sleep(GATHER - since);
            }
        }
        sh.poller.wait(&mut evs, &mut ready, timeout);
        last_wake = Instant::now();
        if sh.stop.load(Ordering::SeqCst) {
            break;
        }
        let arrived = std::mem::take(&mut *lock(&sh.inbox));
        for h in arrived {
            let fd = h.link.sock.as_raw_fd();
            let key = h.key;
            let partial_in = !h.leftover.is_empty();
            conns.insert(
                key,
                Served {
                    link: h.link,
                    peer: h.peer,
                    id: h.id,
                    group: h.group,
                    dec: Decoder::new(h.leftover),
                },
            );
            if let Err(e) = sh.poller.add(fd, key) {
                tracing::warn!(target: LOG, "coordinator: cannot watch member {} ({}): {e}; dropping it", h.id, h.peer);
                end_served(&sh, &mut conns, key, false);
                continue;
            }
            if partial_in {
                again.push(key);
            }
        }
        // (key, whether to read until the socket says it is empty)
        let mut turn: Vec<(u64, bool)> = again.drain(..).map(|k| (k, true)).collect();
        for &(key, events) in &ready {
            if events & (libc::EPOLLOUT as u32) != 0 {
                if let Some(c) = conns.get(&key) {
                    c.link.flush();
                }
            }
            let hup = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
            if events & (hup | libc::EPOLLIN as u32) != 0 {
                turn.push((key, events & hup != 0));
            }
        }
        turn.sort_unstable();
        turn.dedup_by(|a, b| {
            if a.0 == b.0 {
                b.1 |= a.1;
                true
            } else {
                false
            }
        });
        let now = Instant::now();
        for (key, drain) in turn {
            match read_served(&sh, &mut conns, key, &mut scratch, now, drain) {
                Some(Flow::Go) => {}
                Some(Flow::End(polite)) => {
                    partial.remove(&key);
                    end_served(&sh, &mut conns, key, polite);
                    continue;
                }
                None => again.push(key),
            }
            if conns.get(&key).is_some_and(|c| c.dec.started.is_some()) {
                partial.insert(key);
            } else {
                partial.remove(&key);
            }
        }
        // Frames begun but not finished within the frame timeout.
        let now = Instant::now();
        let stalled: Vec<u64> = partial
            .iter()
            .copied()
            .filter(|k| {
                conns.get(k).and_then(|c| c.dec.started).map_or(true, |t| {
                    now.saturating_duration_since(t) > sh.opts.frame_timeout
                })
            })
            .collect();
        for key in stalled {
            partial.remove(&key);
            if let Some(c) = conns.get(&key) {
                let e = FrameError::Stalled {
                    got: c.dec.partial(),
                };
                tracing::warn!(target: LOG, "coordinator: member {} ({}): {e}; dropping it", c.id, c.peer);
                end_served(&sh, &mut conns, key, false);
            }
        }
    }
    // Stopping: the membership stays as it is (and as persisted) for a restart.
    for (_, c) in conns {
        sh.poller.remove(c.link.sock.as_raw_fd());
    }
}

/// Reads what connection `key` delivered (at most [`READ_TURN`] bytes) and handles its
/// frames. `None`: more may be waiting (its next turn comes after the others').
///
/// A read shorter than the buffer emptied the socket, and the edge-triggered epoll set
/// reports any byte arriving after it: so the loop reads again only after a full buffer, or
/// when `drain` (the peer closed or the socket failed: read on to the end).
fn read_served(
    sh: &Shared,
    conns: &mut IdMap<Served>,
    key: u64,
    scratch: &mut [u8],
    now: Instant,
    drain: bool,
) -> Option<Flow> {
    let Some(c) = conns.get_mut(&key) else {
        // Ended earlier in this turn.
        return Some(Flow::Go);
    };
    let fd = c.link.sock.as_raw_fd();
    let mut got = 0usize;
    let mut eof = false;
    let mut empty = false;
    loop {
        // Frames already in the buffer first (the handshake's leftover).
        loop {
            match c.dec.next(proto::MAX_PAYLOAD) {
                Ok(Some(f)) => {
                    if let Flow::End(p) = on_member_frame(f, &c.link, c.peer, sh, c.id, &c.group) {
                        return Some(Flow::End(p));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(target: LOG, "coordinator: member {} ({}): {e}; dropping it", c.id, c.peer);
                    return Some(Flow::End(false));
                }
            }
        }
        c.dec.note(now);
        if eof {
            if c.dec.partial() > 0 {
                let e = FrameError::Truncated {
                    got: c.dec.partial(),
                    want: c.dec.want(),
                };
                tracing::warn!(target: LOG, "coordinator: member {} ({}): {e}; dropping it", c.id, c.peer);
            }
            return Some(Flow::End(false));
        }
        if empty {
            return Some(Flow::Go);
        }
        if got >= READ_TURN {
            return None;
        }
        match recv_now(fd, scratch) {
            Ok(0) => eof = true,
            Ok(n) => {
                got += n;
                c.dec.push(&scratch[..n]);
                empty = n < scratch.len() && !drain;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(Flow::Go),
            Err(e) => {
                if !sh.stop.load(Ordering::SeqCst) {
                    tracing::warn!(target: LOG, "coordinator: member {} ({}): {}; dropping it", c.id, c.peer, FrameError::Io(e));
                }
                return Some(Flow::End(false));
            }
        }
    }
}

/// Connection `key` ended: the member departs (`polite`: after a goodbye), the socket is shut
/// down and its row leaves the service's table.
fn end_served(sh: &Shared, conns: &mut IdMap<Served>, key: u64, polite: bool) {
    let Some(c) = conns.remove(&key) else {
        return;
    };
    sh.poller.remove(c.link.sock.as_raw_fd());
    depart(sh, c.id, &c.group, c.peer, &c.link, polite);
    c.link.close();
    lock(&sh.conns).remove(&key);
}

/// Reads one frame, handling protocol errors (warning with the peer address, error frame where
/// useful). `None`: the connection is to be closed.
fn read_checked(
    reader: &mut Sock<'_>,
    writer: &Link,
    peer: SocketAddr,
    deadline: Instant,
    max_payload: usize,
    sh: &Shared,
) -> Option<Frame> {
    let stop = || sh.stop.load(Ordering::SeqCst);
    let mut lim = proto::opening_limits(deadline, max_payload);
    lim.frame_timeout = lim.frame_timeout.min(sh.opts.frame_timeout);
    match proto::read_frame_with(reader, &lim, &stop) {
        Ok(f) if f.version != proto::VERSION => {
            let msg = format!(
                "coordinator speaks protocol v{}, client sent v{}",
                proto::VERSION,
                f.version
            );
            tracing::warn!(target: LOG, "coordinator: dropping {peer}: {msg}");
            refuse(writer, peer, &msg);
            None
        }
        Ok(f) => Some(f),
        Err(FrameError::Stopped) => None,
        Err(FrameError::Closed) => {
            tracing::debug!(target: LOG, "coordinator: {peer} closed without registering");
            None
        }
        Err(FrameError::Idle) | Err(FrameError::Stalled { .. }) => {
            tracing::warn!(target: LOG,
                "coordinator: dropping {peer}: handshake not complete within {:.1} s",
                sh.opts.handshake_timeout.as_secs_f64());
            None
        }
        Err(e @ FrameError::Oversize { .. }) => {
            tracing::warn!(target: LOG, "coordinator: dropping {peer}: {e}");
            refuse(writer, peer, &e.to_string());
            None
        }
        Err(e) => {
            tracing::warn!(target: LOG, "coordinator: dropping {peer}: {e}");
            None
        }
    }
}

fn validate(reg: &Registration) -> std::result::Result<(), String> {
    if reg.group.is_empty() || reg.group.len() > MAX_GROUP {
        return Err(format!("group name must have 1 to {MAX_GROUP} bytes"));
    }
    if reg.world_size == 0 || reg.world_size > MAX_WORLD {
        return Err(format!(
            "world size {} of group {} is not in 1..={MAX_WORLD}",
            reg.world_size, reg.group
        ));
    }
    if let Some(r) = reg.rank {
        if r >= reg.world_size {
            return Err(format!(
                "requested rank {r} is not below the world size {} of group {}",
                reg.world_size, reg.group
            ));
        }
    }
    if reg.host_id.len() > MAX_NAME || reg.hostname.len() > MAX_NAME {
        return Err(format!(
            "host id and host name must have at most {MAX_NAME} bytes"
        ));
    }
    if reg.handle.len() > MAX_HANDLE {
        return Err(format!(
            "connect handle of {} bytes exceeds {MAX_HANDLE} bytes",
            reg.handle.len()
        ));
    }
    if !(reg.weight.is_finite() && reg.weight > 0.0) {
        return Err(format!("weight {} is not a positive number", reg.weight));
    }
    if reg.policy.join_window_ms > MAX_MS {
        return Err(format!(
            "join window of {} ms exceeds {MAX_MS} ms",
            reg.policy.join_window_ms
        ));
    }
    if reg.heartbeat_timeout_ms > MAX_MS {
        return Err(format!(
            "heartbeat timeout of {} ms exceeds {MAX_MS} ms",
            reg.heartbeat_timeout_ms
        ));
    }
    if reg.policy.min_size > MAX_WORLD || reg.policy.max_size.is_some_and(|m| m > MAX_WORLD) {
        return Err(format!("elastic sizes must be at most {MAX_WORLD}"));
    }
    if reg.role != Role::Worker && reg.role != Role::Server && reg.role != Role::Reader {
        return Err(format!("role {} is not supported", reg.role));
    }
    Ok(())
}

type Publish = Vec<(Arc<Link>, SocketAddr, Vec<u8>)>;
type Refusal = (String, Option<&'static str>);

/// Allocates a member id. With a state file, every id handed out is below the high-water
/// mark on disk: the persister writes the mark [`ID_BLOCK`] ahead when half a block is left
/// (off the state lock), and only when none is left is it written here, under the lock.
fn alloc_id(sh: &Shared, st: &mut State) -> std::result::Result<u64, String> {
    if st.next_id >= MAX_ID {
        return Err("the coordinator ran out of member ids".into());
    }
    if sh.opts.state_file.is_some() {
        if st.next_id.saturating_add(ID_BLOCK / 2) >= st.id_high_water {
            st.id_high_water = st.next_id.saturating_add(ID_BLOCK);
            mark_dirty(sh);
        }
        if st.next_id >= sh.durable_high.load(Ordering::SeqCst) {
            if let Err(e) = persist_now(sh, st) {
                return Err(format!("coordinator cannot persist its state: {e}"));
            }
        }
    }
    let id = st.next_id;
    st.next_id += 1;
    Ok(id)
}

/// Registers a member; on success returns its id, its group and the frames to send (views if
/// this registration completed the group). `Err`: the refusal text.
fn register(
    sh: &Shared,
    reg: Registration,
    peer: SocketAddr,
    writer: &Arc<Link>,
    proof: Option<String>,
) -> std::result::Result<(u64, String, Publish), Refusal> {
    validate(&reg).map_err(|m| (m, None))?;
    let mut st = lock(&sh.state);
    let group_name = reg.group.clone();
    let mut joining = false;
    if let Some(g) = st.groups.get(&group_name) {
        if let Some(v) = &g.view {
            if !g.elastic {
                return Err((
                    format!(
                        "group {} is complete ({} members); elastic join is not enabled (BRAID_ELASTIC=1)",
                        group_name,
                        v.members.len()
                    ),
                    None,
                ));
            }
            joining = true;
        } else {
            if g.world_size != reg.world_size {
                return Err((format!(
                    "group {} has world size {} (set by its first registration); this registration says {}",
                    group_name, g.world_size, reg.world_size
                ), None));
            }
            if let Some(r) = reg.rank {
                if let Some(other) = g.entries.iter().find(|e| e.reg.rank == Some(r)) {
                    if !g.elastic {
                        return Err((
                            format!(
                            "rank {r} of group {} is already taken by member {} (host {}, pid {})",
                            group_name, other.id, other.reg.hostname, other.reg.pid
                        ),
                            None,
                        ));
                    }
                    joining = true;
                }
            }
        }
    }
    let mut secret = [0u8; SECRET_LEN];
    braid_transport::random_bytes(&mut secret).map_err(|e| {
        (
            format!("coordinator cannot draw a member secret: {e}"),
            None,
        )
    })?;
    let id = alloc_id(sh, &mut st).map_err(|m| (m, None))?;
    let st = &mut *st;
    let group = st
        .groups
        .entry(group_name.clone())
        .or_insert_with(|| Group {
            world_size: reg.world_size,
            elastic: reg.elastic,
            policy: reg.policy.clone(),
            entries: Vec::new(),
            joiners: Vec::new(),
            leavers: Vec::new(),
            view: None,
            join_wait: None,
            reasons: Vec::new(),
            retired: HashMap::new(),
            history: Vec::new(),
            pipeline: PipelineMetrics::default(),
            checkpoint: None,
            book: Book::default(),
        });
    let registered = if joining {
        group.joiners.len() + 1
    } else {
        group.entries.len() + 1
    };
    let ack = proto::encode(
        MsgType::Registered,
        &proto::Registered {
            member_id: id,
            group: group_name.clone(),
            world_size: group.world_size,
            registered,
            joining,
            proof,
            secret: Some(super::to_hex(&secret)),
            features: proto::features(),
        },
    )
    .map_err(|e| (e.to_string(), None))?;
    // From now on the connection's writes never block (queued, bounded). The acknowledgement
    // is written under the state lock so that it always precedes the view (queued for the
    // persister under the lock, after it).
    writer.go_queued(sh.opts.max_queued, format!("member {id} ({peer})"));
    if let Err(e) = writer.send(&ack, WRITE_TIMEOUT) {
        tracing::info!(target: LOG,
            "coordinator: member {id} ({peer}) vanished while registering: {e}; id retired");
        if group.entries.is_empty() && group.joiners.is_empty() && group.view.is_none() {
            st.groups.remove(&group_name);
        }
        return Err((format!("acknowledgement failed: {e}"), None));
    }
    *lock(&sh.tally).entry(group_name.clone()).or_insert(0) += 1;
    let entry = Entry {
        id,
        reg,
        peer,
        writer: Some(Arc::clone(writer)),
        last_seen: Instant::now(),
        acked: 0,
        leaving: false,
        resync: None,
        secret,
        echoed: None,
        sent: 0,
    };
    if joining {
        tracing::info!(target: LOG,
            "coordinator: group {group_name}: member {id} waits to join (host {}, pid {}, from {peer})",
            entry.reg.hostname, entry.reg.pid);
        group.push_joiner(entry);
        if group.join_wait.is_none() {
            group.join_wait = Some(Instant::now());
        }
        let publish = decide(sh, st, &group_name, Instant::now());
        queue(sh, publish);
        return Ok((id, group_name, Vec::new()));
    }
    tracing::info!(target: LOG,
        "coordinator: group {group_name}: member {id} registered ({}/{}; host {}, pid {}, rank {}, from {peer})",
        group.entries.len() + 1, group.world_size, entry.reg.hostname, entry.reg.pid,
        entry.reg.rank.map_or("any".to_string(), |r| r.to_string()));
    group.push_entry(entry);
    let mut publish = Vec::new();
    if group.entries.len() == group.world_size {
        let view = complete(&group_name, group);
        group.reindex();
        group.history.push(Hist {
            epoch: view.epoch,
            size: view.members.len(),
            reason: "initial".into(),
            at: unix_now(),
        });
        publish = view_frames(group, &view, "initial", None);
        tracing::info!(target: LOG,
            "coordinator: group {group_name} complete: view epoch {} with {} members",
            view.epoch, view.members.len());
        mark_dirty(sh);
    }
    queue(sh, publish);
    Ok((id, group_name, Vec::new()))
}

/// A member reconnecting (after a coordinator restart or a lost connection).
fn rejoin(
    sh: &Shared,
    rj: &proto::Rejoin,
    peer: SocketAddr,
    writer: &Arc<Link>,
    hs: &Handshake,
    client_nonce: &str,
) -> std::result::Result<Publish, Refusal> {
    let mut st = lock(&sh.state);
    let Some(g) = st.groups.get_mut(&rj.group) else {
        return Err((format!(
            "the coordinator has no record of group {} (was it restarted without BRAID_COORDINATOR_STATE?); member {} cannot rejoin",
            rj.group, rj.member_id
        ), Some("unknown")));
    };
    if let Some(why) = g.retired.get(&rj.member_id) {
        return Err((format!(
            "member {} was removed from group {} ({why}); its id is retired: join again as a new member",
            rj.member_id, rj.group
        ), Some("retired")));
    }
    let registered = g.entries.len();
    let world_size = g.world_size;
    let view = g.view.clone();
    let reason = g
        .history
        .last()
        .map(|h| h.reason.clone())
        .unwrap_or_default();
    let cur = g.view.as_ref().map_or(0, |v| v.epoch);
    let Some(slot) = g.slot(rj.member_id) else {
        return Err((
            format!(
            "member {} is not a member of group {}; its id is retired: join again as a new member",
            rj.member_id, rj.group
        ),
            Some("retired"),
        ));
    };
    let book = &mut g.book;
    let e = match slot {
        Slot::Entry(i) => g.entries.get_mut(i),
        Slot::Joiner(i) => g.joiners.get_mut(i),
    };
    let Some(e) = e else {
        return Err((
            format!(
            "member {} is not a member of group {}; its id is retired: join again as a new member",
            rj.member_id, rj.group
        ),
            Some("retired"),
        ));
    };
    // Only the member itself can take its place: it proves the secret issued at its
    // registration (a stranger who learnt the id from a status reply cannot).
    let proved = hs
        .answer
        .as_ref()
        .and_then(|a| a.member.as_deref())
        .is_some_and(|m| {
            auth::check_rejoin(
                &e.secret,
                &rj.group,
                rj.member_id,
                &hs.server_nonce,
                client_nonce,
                m,
            )
        });
    if !proved {
        tracing::warn!(target: LOG,
            "coordinator: group {}: refused a rejoin as member {} from {peer}: it did not prove the member's secret (member {} keeps its connection{})",
            rj.group, rj.member_id, rj.member_id,
            e.writer.as_ref().map_or(String::new(), |_| format!(" from {}", e.peer)));
        return Err((
            format!(
                "rejoin refused: this connection did not prove it is member {} of group {}",
                rj.member_id, rj.group
            ),
            Some("auth"),
        ));
    }
    let ack = proto::encode(
        MsgType::Registered,
        &proto::Registered {
            member_id: e.id,
            group: rj.group.clone(),
            world_size,
            registered,
            joining: false,
            proof: hs.proof.clone(),
            secret: None,
            features: proto::features(),
        },
    )
    .map_err(|e| (e.to_string(), None))?;
    writer.go_queued(
        sh.opts.max_queued,
        format!("member {} ({peer})", rj.member_id),
    );
    writer
        .send(&ack, WRITE_TIMEOUT)
        .map_err(|e| (format!("acknowledgement failed: {e}"), None))?;
    if let Some(old) = e.writer.replace(Arc::clone(writer)) {
        old.close();
    }
    e.peer = peer;
    e.last_seen = Instant::now();
    if matches!(slot, Slot::Entry(_)) && e.acked < cur && rj.epoch >= cur {
        book.unacked = book.unacked.saturating_sub(1);
    }
    e.acked = e.acked.max(rj.epoch);
    e.reg.view_deltas = rj.view_deltas;
    tracing::info!(target: LOG, "coordinator: group {}: member {} reconnected from {peer} (epoch {})",
        rj.group, rj.member_id, rj.epoch);
    // Resend the current view if the member is behind.
    let mut publish = Vec::new();
    if let Some(v) = &view {
        if rj.epoch < v.epoch && v.rank_of(rj.member_id).is_some() {
            if let Some(b) = view_frame(e, v, &reason) {
                publish.push((Arc::clone(writer), peer, b));
            }
        }
    }
    // A member of the view holds the current view now (it ran in it, or it was just
    // resent): the base of its next delta. A joiner gets whole views until admitted.
    e.sent = match slot {
        Slot::Entry(_) => cur,
        Slot::Joiner(_) => 0,
    };
    queue(sh, publish);
    Ok(Vec::new())
}

/// The frame announcing `view` to `e` (a whole view, or a notice for light members).
fn view_frame(e: &Entry, view: &View, reason: &str) -> Option<Vec<u8>> {
    let r = if e.reg.light {
        proto::encode(
            MsgType::Notice,
            &proto::Notice {
                member_id: e.id,
                group: view.group.clone(),
                epoch: view.epoch,
                size: view.members.len(),
                rank: view.rank_of(e.id),
            },
        )
    } else {
        proto::encode(
            MsgType::View,
            &proto::ViewMsg {
                member_id: e.id,
                view: view.clone(),
                reason: reason.to_string(),
            },
        )
    };
    match r {
        Ok(b) => Some(b),
        Err(err) => {
            tracing::error!(target: LOG, "coordinator: cannot encode view: {err}");
            None
        }
    }
}

/// How the next view differs from the view of epoch `base`: the members of `base` in `left`
/// are out, those that stay keep their order, `joined` follow.
struct Delta<'a> {
    base: u64,
    left: &'a [u64],
    joined: &'a [Member],
}

/// `{"member_id":ID,` + `rest`: a frame body encoded once for every receiver, with the
/// receiver's id spliced in (`rest` is the encoding's tail after its member id).
fn splice(ty: MsgType, id: u64, rest: &str) -> Vec<u8> {
    let payload = format!("{{\"member_id\":{id},{rest}");
    proto::encode_raw(proto::VERSION, ty as u16, payload.as_bytes())
}

/// Frames announcing `view` to every connected member of the group (members, joiners,
/// leavers). Light members get a small notice; members that take deltas and hold the view of
/// `delta.base` (the last one queued on their connection) get the delta; the others the whole
/// view. Each body is encoded at most once (the member id is spliced in), the whole view only
/// if someone needs it. Records in each entry the epoch queued to it.
fn view_frames(g: &mut Group, view: &View, reason: &str, delta: Option<Delta<'_>>) -> Publish {
    let mut out = Vec::new();
    let reason_json = serde_json::to_string(reason).unwrap_or_else(|_| "\"\"".into());
    // The whole view after `"member_id":N,` (views of thousands of members: encoded once,
    // at first need).
    let mut whole: Option<String> = None;
    let make_whole = || {
        let body = serde_json::to_string(view).unwrap_or_default();
        format!("\"view\":{body},\"reason\":{reason_json}}}")
    };
    // The delta after `"member_id":0,` (its first field), encoded once.
    let delta_rest: Option<(u64, String)> = delta.and_then(|d| {
        let msg = proto::ViewDeltaMsg {
            member_id: 0,
            group: view.group.clone(),
            base_epoch: d.base,
            epoch: view.epoch,
            nonce: view.nonce,
            left: d.left.to_vec(),
            joined: d.joined.to_vec(),
            reason: reason.to_string(),
        };
        let s = serde_json::to_string(&msg).ok()?;
        let rest = s.strip_prefix("{\"member_id\":0,")?.to_string();
        Some((d.base, rest))
    });
    // Ranks for the notices of light members (built only if there is one).
    let mut rank_of: Option<IdMap<usize>> = None;
    let mut notice = |id: u64| {
        let ranks = rank_of.get_or_insert_with(|| {
            view.members
                .iter()
                .enumerate()
                .map(|(r, m)| (m.id, r))
                .collect()
        });
        proto::encode(
            MsgType::Notice,
            &proto::Notice {
                member_id: id,
                group: view.group.clone(),
                epoch: view.epoch,
                size: view.members.len(),
                rank: ranks.get(&id).copied(),
            },
        )
        .ok()
    };
    for e in g.entries.iter_mut() {
        let Some(w) = &e.writer else { continue };
        let bytes = if e.reg.light {
            notice(e.id)
        } else {
            match &delta_rest {
                Some((base, rest)) if e.reg.view_deltas && e.sent == *base => {
                    Some(splice(MsgType::ViewDelta, e.id, rest))
                }
                _ => Some(splice(
                    MsgType::View,
                    e.id,
                    whole.get_or_insert_with(&make_whole),
                )),
            }
        };
        if let Some(b) = bytes {
            out.push((Arc::clone(w), e.peer, b));
            e.sent = view.epoch;
        }
    }
    for e in g.joiners.iter() {
        let Some(w) = &e.writer else { continue };
        let bytes = if e.reg.light {
            notice(e.id)
        } else {
            Some(splice(
                MsgType::View,
                e.id,
                whole.get_or_insert_with(&make_whole),
            ))
        };
        if let Some(b) = bytes {
            out.push((Arc::clone(w), e.peer, b));
        }
    }
    for (id, w, peer) in &g.leavers {
        out.push((
            Arc::clone(w),
            *peer,
            splice(MsgType::View, *id, whole.get_or_insert_with(&make_whole)),
        ));
    }
    out
}

/// Orders the group's entries by rank (requested ranks first, then free positions in arrival
/// order) and makes the epoch-1 view.
fn complete(name: &str, group: &mut Group) -> View {
    let n = group.world_size;
    let mut slots: Vec<Option<Entry>> = (0..n).map(|_| None).collect();
    let mut unrequested = Vec::new();
    for e in group.entries.drain(..) {
        match e.reg.rank {
            Some(r) if r < n && slots[r].is_none() => slots[r] = Some(e),
            _ => unrequested.push(e),
        }
    }
    let mut rest = unrequested.into_iter();
    for slot in slots.iter_mut() {
        if slot.is_none() {
            *slot = rest.next();
        }
    }
    group.entries = slots.into_iter().flatten().collect();
    let view = View {
        group: name.to_string(),
        epoch: 1,
        nonce: random_u64(group.entries.first().map_or(0, |e| e.id)),
        members: group.entries.iter().map(Entry::member).collect(),
    };
    group.view = Some(view.clone());
    view
}

/// Retires a member of the current view (dead or gone): it is removed now and excluded from
/// the next view.
fn retire(g: &mut Group, id: u64, why: String) -> Option<Entry> {
    let Slot::Entry(pos) = g.slot(id)? else {
        return None;
    };
    let e = g.entries.remove(pos);
    g.reindex();
    g.retired.insert(id, why.clone());
    g.reasons.push(why);
    Some(e)
}

/// A member's connection ended.
fn depart(
    sh: &Shared,
    id: u64,
    group_name: &str,
    peer: SocketAddr,
    conn: &Arc<Link>,
    polite: bool,
) -> Publish {
    let mut st = lock(&sh.state);
    if sh.stop.load(Ordering::SeqCst) {
        // Shutting down: the membership stays as it is (and as persisted) for a restart.
        return Vec::new();
    }
    let stopping = false;
    let Some(g) = st.groups.get_mut(group_name) else {
        return Vec::new();
    };
    let how = if polite { "left" } else { "disconnected" };
    if let Some(pos) = g.leavers.iter().position(|l| l.0 == id) {
        g.leavers.remove(pos);
        return Vec::new();
    }
    // The member rejoined on another connection meanwhile (and proved it): this old one
    // ending says nothing about the member.
    let superseded = g
        .any(id)
        .and_then(|e| e.writer.as_ref())
        .is_some_and(|w| !Arc::ptr_eq(w, conn));
    if superseded {
        tracing::debug!(target: LOG, "coordinator: group {group_name}: an old connection of member {id} ({peer}) ended");
        return Vec::new();
    }
    if g.remove_joiner(id).is_some() {
        g.retired.insert(id, format!("{how} before admission"));
        tracing::info!(target: LOG, "coordinator: group {group_name}: joiner {id} ({peer}) {how} before admission; id retired");
        if g.joiners.is_empty() {
            g.join_wait = None;
        }
    } else {
        match &g.view {
            None => {
                g.entries.retain(|e| e.id != id);
                g.reindex();
                tracing::info!(target: LOG,
                    "coordinator: group {group_name}: member {id} ({peer}) {how} before the view was complete; id retired ({}/{} registered)",
                    g.entries.len(), g.world_size);
            }
            Some(v) => {
                let rank = v.rank_of(id);
                let epoch = v.epoch;
                let is_current = g.entry(id).is_some_and(|e| e.writer.is_some());
                if !is_current {
                    return Vec::new();
                }
                if polite || stopping {
                    tracing::info!(target: LOG,
                        "coordinator: group {group_name}: member {id} (rank {rank:?}, {peer}) {how} after view epoch {epoch}");
                } else {
                    tracing::warn!(target: LOG,
                        "coordinator: group {group_name}: member {id} (rank {rank:?}, {peer}) {how} after view epoch {epoch}");
                }
                let why = if polite {
                    format!("leave of {id}")
                } else {
                    format!("failure of {id} (connection to the coordinator lost)")
                };
                retire(g, id, why);
            }
        }
    }
    if g.entries.is_empty() && g.joiners.is_empty() {
        tracing::info!(target: LOG,
            "coordinator: group {group_name}: all members gone; group forgotten");
        st.groups.remove(group_name);
        mark_dirty(sh);
        return Vec::new();
    }
    if stopping {
        return Vec::new();
    }
    let publish = decide(sh, &mut st, group_name, Instant::now());
    queue(sh, publish);
    Vec::new()
}

/// Rank of each member of `view`, by id.
fn ranks(view: &View) -> HashMap<u64, usize> {
    view.members
        .iter()
        .enumerate()
        .map(|(r, m)| (m.id, r))
        .collect()
}

/// Records a published view in the group's history (the last 1000 kept).
fn record_history(g: &mut Group, next: &View, reason: &str) {
    g.history.push(Hist {
        epoch: next.epoch,
        size: next.members.len(),
        reason: reason.to_string(),
        at: unix_now(),
    });
    if g.history.len() > 1000 {
        g.history.remove(0);
    }
}

/// Publishes the next view of an elastic group when one is due. Called with the state lock
/// held after every event; returns the frames to send once the lock is released.
fn decide(sh: &Shared, st: &mut State, name: &str, now: Instant) -> Publish {
    let Some(g) = st.groups.get_mut(name) else {
        return Vec::new();
    };
    if !g.elastic {
        return Vec::new();
    }
    // Cheap exit first (this runs on every acknowledgement and every tick, under the lock):
    // nobody gone, leaving or asking for a resync, and no join that is both due and possible.
    let view_len = match &g.view {
        Some(v) => v.members.len(),
        None => return Vec::new(),
    };
    // (The counters of the book, O(1): see `Book` for why they are safe to trust here.)
    let quiet = g.entries.len() == view_len && g.book.flagged == 0;
    if quiet {
        let window = Duration::from_millis(g.policy.join_window_ms);
        let joins_due = !g.joiners.is_empty()
            && g.join_wait
                .is_some_and(|t| now.saturating_duration_since(t) >= window);
        if !joins_due || g.book.unacked > 0 {
            return Vec::new();
        }
    }
    // The full path scans the group anyway: recount, so an over-count cannot linger.
    g.reindex();
    // The current view's epoch, nonce and ids (not a copy of the whole view: at 100,000
    // members that alone costs more than the rest).
    let Some((epoch, nonce, view_ids)) = g.view.as_ref().map(|v| {
        (
            v.epoch,
            v.nonce,
            v.members.iter().map(|m| m.id).collect::<Vec<u64>>(),
        )
    }) else {
        return Vec::new();
    };
    // Members of the view that are gone (retired) or leaving.
    let live: IdSet = g
        .entries
        .iter()
        .filter(|e| !e.leaving)
        .map(|e| e.id)
        .collect();
    let gone: Vec<u64> = view_ids
        .iter()
        .copied()
        .filter(|id| !live.contains(id))
        .collect();
    let resync: Vec<&Entry> = g
        .entries
        .iter()
        .filter(|e| e.resync.as_ref().is_some_and(|(ep, _)| *ep >= epoch))
        .collect();
    // A resync waits until every suspect is dead or asks too (a killed process's connection
    // closes at once; a hung one is declared dead after its heartbeat timeout).
    let quiet_ids: IdSet = g
        .entries
        .iter()
        .filter(|o| o.resync.is_none() && !o.leaving)
        .map(|o| o.id)
        .collect();
    let unresolved = resync.iter().any(|e| {
        e.resync
            .as_ref()
            .is_some_and(|(_, sus)| sus.iter().any(|s| quiet_ids.contains(s)))
    });
    let stable = g.entries.iter().all(|e| e.acked >= epoch || e.leaving);
    let window = Duration::from_millis(g.policy.join_window_ms);
    let joins_due = !g.joiners.is_empty()
        && g.join_wait
            .is_some_and(|t| now.saturating_duration_since(t) >= window);
    let want_resync = !resync.is_empty() && !unresolved;
    if gone.is_empty() && !want_resync && !(joins_due && stable) {
        return Vec::new();
    }
    let gone_set: IdSet = gone.iter().copied().collect();
    let keep: Vec<u64> = view_ids
        .iter()
        .copied()
        .filter(|id| !gone_set.contains(id))
        .collect();
    let room = g
        .policy
        .max_size
        .map_or(usize::MAX, |m| m.saturating_sub(keep.len()));
    // Joiners are admitted when their window passed, or along with a failure-driven change.
    let admit = if joins_due || !gone.is_empty() || want_resync {
        g.joiners.len().min(room)
    } else {
        0
    };
    let new_size = keep.len() + admit;
    if new_size < g.policy.min_size.max(1) {
        if !g.reasons.iter().any(|r| r.starts_with("waiting")) {
            tracing::warn!(target: LOG,
                "coordinator: group {name}: the next view would have {new_size} members, below the minimum {}; waiting for joiners",
                g.policy.min_size);
            g.reasons
                .push(format!("waiting for {} members", g.policy.min_size));
        }
        return Vec::new();
    }
    if gone.is_empty() && admit == 0 && !want_resync {
        return Vec::new();
    }
    let admitted: Vec<Entry> = g.joiners.drain(..admit).collect();
    let mut reasons: Vec<String> = g
        .reasons
        .drain(..)
        .filter(|r| !r.starts_with("waiting"))
        .collect();
    for l in g.entries.iter().filter(|e| e.leaving) {
        let r = format!("leave of {}", l.id);
        if !reasons.contains(&r) {
            reasons.push(r);
        }
    }
    if !admitted.is_empty() {
        let ids: Vec<String> = admitted.iter().map(|e| e.id.to_string()).collect();
        reasons.push(format!("join of {}", ids.join(",")));
    }
    if reasons.is_empty() {
        let who: Vec<String> = resync.iter().map(|e| e.id.to_string()).collect();
        reasons.push(format!("resync asked by {}", who.join(",")));
    }
    let reason = reasons.join("; ");
    // Leavers move out of the entries but get this view.
    let leaving: Vec<Entry> = if g.entries.iter().any(|e| e.leaving) {
        let (out, stay): (Vec<Entry>, Vec<Entry>) = g.entries.drain(..).partition(|e| e.leaving);
        g.entries = stay;
        out
    } else {
        Vec::new()
    };
    for l in leaving {
        g.retired
            .insert(l.id, format!("left at epoch {}", epoch.saturating_add(1)));
        if let Some(w) = l.writer {
            g.leavers.push((l.id, w, l.peer));
        }
    }
    // Order: members that stay keep their relative order; joiners last, in id order.
    let rank_of: IdMap<usize> = view_ids
        .iter()
        .enumerate()
        .map(|(r, id)| (*id, r))
        .collect();
    let key = |e: &Entry| rank_of.get(&e.id).copied().unwrap_or(usize::MAX);
    // Usually in order already (entries keep the view's order between views).
    if !g.entries.windows(2).all(|w| key(&w[0]) <= key(&w[1])) {
        g.entries.sort_by_cached_key(key);
    }
    let mut admitted = admitted;
    admitted.sort_by_key(|e| e.id);
    let joined: Vec<Member> = admitted.iter().map(Entry::member).collect();
    g.entries.extend(admitted);
    for e in g.entries.iter_mut() {
        e.resync = None;
    }
    // The next view's members: the current view's less those gone (moved, not copied: at
    // 100,000 members copying them costs more than the rest of the decision), then the
    // joined. The entries are in that order; should they not be, they are the truth.
    let mut members: Vec<Member> = g.view.take().map(|v| v.members).unwrap_or_default();
    members.retain(|m| !gone_set.contains(&m.id));
    members.extend(joined.iter().cloned());
    let consistent = members.len() == g.entries.len()
        && members.iter().zip(&g.entries).all(|(m, e)| m.id == e.id);
    if !consistent {
        tracing::debug!(target: LOG, "coordinator: group {name}: the view's members are rebuilt from the entries");
        members = g.entries.iter().map(Entry::member).collect();
    }
    let next = View {
        group: name.to_string(),
        epoch: epoch.saturating_add(1),
        nonce: random_u64(nonce),
        members,
    };
    g.join_wait = if g.joiners.is_empty() {
        None
    } else {
        Some(now)
    };
    record_history(g, &next, &reason);
    tracing::info!(target: LOG,
        "coordinator: group {name}: view epoch {} with {} members ({reason})",
        next.epoch, next.members.len());
    let delta = Delta {
        base: epoch,
        left: &gone,
        joined: &joined,
    };
    // (A rebuilt view is not the delta's: whole views then.)
    let publish = view_frames(g, &next, &reason, consistent.then_some(delta));
    g.view = Some(next);
    g.reindex();
    mark_dirty(sh);
    publish
}

/// A member's pipeline metric: folded into its measured stage; when the group is quiet (no
/// view change under way) and the measurements are complete, a re-weigh view may follow.
fn on_metric(sh: &Shared, st: &mut State, name: &str, id: u64, m: &proto::Metric) -> Publish {
    let Some(g) = st.groups.get_mut(name) else {
        return Vec::new();
    };
    let Some(view) = g.view.as_ref() else {
        return Vec::new();
    };
    if !g.elastic || m.epoch != view.epoch || view.rank_of(id).is_none() {
        return Vec::new();
    }
    let blocks = match m.check() {
        Ok(Some(b)) => b,
        Ok(None) => return Vec::new(),
        Err(e) => {
            tracing::debug!(target: LOG, "coordinator: group {name}: member {id}: metric refused: {e}");
            return Vec::new();
        }
    };
    let cost: f64 = m.costs[blocks.clone()].iter().sum();
    let sample = cost / m.seconds;
    if !(sample.is_finite() && sample > 0.0) {
        return Vec::new();
    }
    let key = costs_key(&m.costs);
    let p = &mut g.pipeline;
    if p.costs_key != key || p.costs.len() != m.costs.len() {
        p.costs = m.costs.clone();
        p.costs_key = key;
    }
    let folded = fold_metric(p.stages.get(&id), m.epoch, blocks, key, sample, m.gain);
    p.stages.insert(id, folded);
    let epoch = view.epoch;
    p.stages.retain(|_, s| s.epoch == epoch);
    // Only between view changes: nobody joining, leaving, gone or installing.
    let quiet = g.entries.len() == view.members.len()
        && g.joiners.is_empty()
        && g.entries
            .iter()
            .all(|e| e.acked >= epoch && !e.leaving && e.resync.is_none());
    if !quiet {
        return Vec::new();
    }
    let members: Vec<(u64, f64)> = view.members.iter().map(|m| (m.id, m.weight)).collect();
    let work = members
        .len()
        .saturating_mul(p.costs.len())
        .saturating_mul(p.costs.len());
    if work > REWEIGH_BUDGET {
        if !p.too_large {
            p.too_large = true;
            tracing::warn!(target: LOG,
                "coordinator: group {name}: a pipeline of {} blocks over {} members is too large to re-weigh here; not re-weighed",
                p.costs.len(), members.len());
        }
        return Vec::new();
    }
    let stages: Vec<(u64, MeasuredStage)> = p
        .stages
        .iter()
        .filter(|(_, s)| s.costs_key == key)
        .map(|(k, s)| (*k, s.clone()))
        .collect();
    // One decision per round: when every stage has reported once more since the last one.
    let round = stages.iter().map(|(_, s)| s.reports).min().unwrap_or(0);
    if p.decided.0 == epoch && round <= p.decided.1 {
        return Vec::new();
    }
    let threshold = stages.iter().map(|(_, s)| s.gain).fold(0.0, f64::max);
    let decision = reweigh_decision(&members, &p.costs, &stages, threshold);
    if round >= 2 && tiles(p.costs.len(), &stages) {
        p.decided = (epoch, round);
    }
    let Some(r) = decision else {
        return Vec::new();
    };
    publish_reweigh(sh, st, name, &r)
}

/// Publishes the next view of a quiet group: the same members in the same order, with the
/// weights of `r`.
fn publish_reweigh(sh: &Shared, st: &mut State, name: &str, r: &Reweigh) -> Publish {
    let Some(g) = st.groups.get_mut(name) else {
        return Vec::new();
    };
    let Some(view) = g.view.clone() else {
        return Vec::new();
    };
    // Entries of a quiet group are the view's members; keep the view's order.
    let rank_of = ranks(&view);
    g.entries
        .sort_by_key(|e| rank_of.get(&e.id).copied().unwrap_or(usize::MAX));
    let weight: HashMap<u64, f64> = view
        .members
        .iter()
        .zip(&r.weights)
        .map(|(m, w)| (m.id, *w))
        .collect();
    for e in g.entries.iter_mut() {
        if let Some(w) = weight.get(&e.id) {
            e.reg.weight = *w;
        }
    }
    let reason = format!("reweigh: predicted gain {:.0}%", r.gain * 100.0);
    let next = View {
        group: name.to_string(),
        epoch: view.epoch.saturating_add(1),
        nonce: random_u64(view.nonce),
        members: g.entries.iter().map(Entry::member).collect(),
    };
    record_history(g, &next, &reason);
    g.pipeline.stages.clear();
    let weights: Vec<String> = next
        .members
        .iter()
        .map(|m| format!("{}:{:.3}", m.id, m.weight))
        .collect();
    tracing::info!(target: LOG,
        "coordinator: group {name}: view epoch {} with {} members ({reason}; weights {})",
        next.epoch, next.members.len(), weights.join(" "));
    // A re-weigh changes every member's record: whole views.
    let publish = view_frames(g, &next, &reason, None);
    g.view = Some(next);
    g.reindex();
    mark_dirty(sh);
    publish
}

/// Heartbeat timeouts and batching windows.
fn tick_loop(sh: Arc<Shared>) {
    while !sh.stop.load(Ordering::SeqCst) {
        std::thread::sleep(TICK);
        let now = Instant::now();
        let mut publish = Vec::new();
        let mut close = Vec::new();
        {
            let mut st = lock(&sh.state);
            let names: Vec<String> = st.groups.keys().cloned().collect();
            for name in names {
                if let Some(g) = st.groups.get_mut(&name) {
                    if !g.elastic || g.view.is_none() {
                        continue;
                    }
                    if g.book.next_audit.map_or(true, |t| now >= t) {
                        g.reindex();
                        g.book.next_audit = now.checked_add(AUDIT);
                    }
                    // Nobody can be overdue before the earliest deadline.
                    if g.book.next_deadline.map_or(true, |d| now <= d) {
                        publish.extend(decide(&sh, &mut st, &name, now));
                        continue;
                    }
                    let dead: Vec<(u64, Duration)> = g
                        .entries
                        .iter()
                        .chain(g.joiners.iter())
                        .filter(|e| e.reg.heartbeat_timeout_ms > 0)
                        .filter(|e| {
                            now.saturating_duration_since(e.last_seen)
                                > Duration::from_millis(e.reg.heartbeat_timeout_ms)
                        })
                        .map(|e| (e.id, now.saturating_duration_since(e.last_seen)))
                        .collect();
                    for (id, age) in dead {
                        let why = format!(
                            "failure of {id} (no heartbeat for {:.1} s)",
                            age.as_secs_f64()
                        );
                        tracing::warn!(target: LOG, "coordinator: group {name}: member {id} declared dead: no heartbeat for {:.1} s", age.as_secs_f64());
                        let e = match retire(g, id, why.clone()) {
                            Some(e) => Some(e),
                            None => {
                                let j = g.remove_joiner(id);
                                if j.is_some() {
                                    g.retired.insert(id, why.clone());
                                }
                                j
                            }
                        };
                        if let Some(w) = e.and_then(|e| e.writer) {
                            close.push(w);
                        }
                    }
                    // The next deadline, from the survivors.
                    g.reindex();
                }
                publish.extend(decide(&sh, &mut st, &name, now));
            }
            queue(&sh, std::mem::take(&mut publish));
        }
        let bye = proto::encode_error_code(
            "declared dead: no heartbeat within the timeout; the id is retired",
            Some("retired"),
        );
        for w in close {
            let _ = w.send(&bye, Duration::from_millis(200));
            w.close();
        }
    }
}

/// What the state file holds.
#[derive(Serialize, Deserialize)]
struct Persisted {
    /// Ids below this may have been handed out.
    id_high_water: u64,
    groups: Vec<PersistedGroup>,
}

#[derive(Serialize, Deserialize)]
struct PersistedGroup {
    world_size: usize,
    elastic: bool,
    policy: GroupPolicy,
    view: View,
    /// Heartbeat timeout of each member (ms), by id.
    heartbeat_ms: Vec<(u64, u64)>,
    history: Vec<Hist>,
    /// Each member's secret (hex), by id, so members can prove themselves when they rejoin
    /// a restarted coordinator. (The file is written readable by its owner only.)
    #[serde(default)]
    secrets: Vec<(u64, String)>,
}

/// What the state file is to hold now (taken under the state lock: no I/O), with its
/// generation.
fn snapshot(st: &mut State) -> (u64, Persisted) {
    st.snap_gen += 1;
    let doc = Persisted {
        id_high_water: st.id_high_water.max(st.next_id),
        groups: st
            .groups
            .values()
            .filter_map(|g| {
                let view = g.view.clone()?;
                Some(PersistedGroup {
                    world_size: g.world_size,
                    elastic: g.elastic,
                    policy: g.policy.clone(),
                    heartbeat_ms: g
                        .entries
                        .iter()
                        .map(|e| (e.id, e.reg.heartbeat_timeout_ms))
                        .collect(),
                    view,
                    history: g.history.clone(),
                    secrets: g
                        .entries
                        .iter()
                        .map(|e| (e.id, super::to_hex(&e.secret)))
                        .collect(),
                })
            })
            .collect(),
    };
    (st.snap_gen, doc)
}

/// Writes a snapshot to the state file (temporary file + rename, so a crash never leaves half
/// a file; mode 0600: it holds the members' secrets), unless a later snapshot was written
/// already. Then ids below its high-water mark are covered.
fn write_snapshot(sh: &Shared, gen: u64, doc: &Persisted) -> std::io::Result<()> {
    let Some(path) = &sh.opts.state_file else {
        return Ok(());
    };
    let bytes = serde_json::to_vec(doc).map_err(std::io::Error::other)?;
    let mut written = lock(&sh.written_gen);
    if *written >= gen {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, &bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    *written = gen;
    sh.durable_high
        .fetch_max(doc.id_high_water, Ordering::SeqCst);
    Ok(())
}

/// Writes the state file now, under the state lock (only when no persisted id is left to
/// hand out, which the persister's write-ahead makes rare).
fn persist_now(sh: &Shared, st: &mut State) -> std::io::Result<()> {
    if sh.opts.state_file.is_none() {
        return Ok(());
    }
    let (gen, doc) = snapshot(st);
    write_snapshot(sh, gen, &doc)
}

/// Asks the persister to write the state file (coalesced: one write covers every change
/// before it). Call with the state lock held.
fn mark_dirty(sh: &Shared) {
    if sh.opts.state_file.is_none() {
        return;
    }
    lock(&sh.work).dirty = true;
    sh.work_cv.notify_one();
}

/// Queues frames for the persister thread, which sends them once the state that produced
/// them is on disk (at once without a state file). Call with the state lock held, so that
/// frames go out in the order of the changes that made them.
fn queue(sh: &Shared, publish: Publish) {
    if publish.is_empty() {
        return;
    }
    lock(&sh.work).publish.extend(publish);
    sh.work_cv.notify_one();
}

/// The persister: writes the state file when it changed (one write for any number of
/// changes, off the state lock) and then sends the frames queued before the write, so a
/// member never sees a view that a restarted coordinator would not know. Sends never block
/// (registered members' connections are in queued mode).
fn persist_loop(sh: Arc<Shared>) {
    loop {
        let (dirty, publish, stopping) = {
            let mut w = lock(&sh.work);
            while !w.dirty && w.publish.is_empty() && !sh.stop.load(Ordering::SeqCst) {
                w = sh
                    .work_cv
                    .wait_timeout(w, Duration::from_secs(1))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            (
                std::mem::take(&mut w.dirty),
                std::mem::take(&mut w.publish),
                sh.stop.load(Ordering::SeqCst),
            )
        };
        if dirty {
            let (gen, doc) = snapshot(&mut lock(&sh.state));
            if let Err(e) = write_snapshot(&sh, gen, &doc) {
                tracing::error!(target: LOG, "coordinator: cannot persist its state: {e}");
            }
        }
        if !stopping {
            for (w, peer, bytes) in publish {
                if let Err(e) = w.send(&bytes, WRITE_TIMEOUT) {
                    tracing::info!(target: LOG, "coordinator: cannot send a view to {peer}: {e}");
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// Reads the state file, if any: ids continue above the high-water mark; each group's view is
/// restored with its members waiting to reconnect (each has its heartbeat timeout to do so).
fn load_state(opts: &CoordinatorOptions) -> Result<State> {
    let Some(path) = &opts.state_file else {
        return Ok(State {
            next_id: 1,
            id_high_water: 1,
            groups: HashMap::new(),
            snap_gen: 0,
        });
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(State {
                next_id: 1,
                id_high_water: 1,
                groups: HashMap::new(),
                snap_gen: 0,
            })
        }
        Err(e) => {
            return Err(Error::System(format!(
                "coordinator state file {}: {e}",
                path.display()
            )))
        }
    };
    let st = state_from_bytes(Some(&bytes), Instant::now()).map_err(|e| {
        Error::System(format!(
            "coordinator state file {} is not valid: {e}",
            path.display()
        ))
    })?;
    tracing::info!(target: LOG, "coordinator: state restored from {}; ids continue at {}", path.display(), st.next_id);
    Ok(st)
}

/// Checks one persisted group (the file may be damaged or hostile: nothing in it may make
/// the coordinator panic or overflow later).
fn check_persisted(pg: &PersistedGroup, high: u64) -> std::result::Result<(), String> {
    let v = &pg.view;
    let name = &v.group;
    if name.is_empty() || name.len() > MAX_GROUP {
        return Err(format!("a group name has {} bytes", name.len()));
    }
    if pg.world_size == 0 || pg.world_size > MAX_WORLD {
        return Err(format!(
            "group {name}: world size {} is not in 1..={MAX_WORLD}",
            pg.world_size
        ));
    }
    if v.epoch == 0 || v.epoch > MAX_EPOCH {
        return Err(format!("group {name}: epoch {} is out of range", v.epoch));
    }
    if v.members.is_empty() || v.members.len() > MAX_WORLD {
        return Err(format!("group {name}: {} members", v.members.len()));
    }
    let mut seen = std::collections::HashSet::new();
    for m in &v.members {
        if m.id == 0 || m.id >= high {
            return Err(format!(
                "group {name}: member id {} is not below the high-water mark {high}",
                m.id
            ));
        }
        if !seen.insert(m.id) {
            return Err(format!("group {name}: member id {} appears twice", m.id));
        }
        if m.host_id.len() > MAX_NAME || m.hostname.len() > MAX_NAME || m.handle.len() > MAX_HANDLE
        {
            return Err(format!("group {name}: member {} is too large", m.id));
        }
        if !(m.weight.is_finite() && m.weight > 0.0) {
            return Err(format!(
                "group {name}: member {} has weight {}",
                m.id, m.weight
            ));
        }
    }
    if pg.policy.min_size > MAX_WORLD
        || pg.policy.max_size.is_some_and(|m| m > MAX_WORLD)
        || pg.policy.join_window_ms > MAX_MS
    {
        return Err(format!("group {name}: policy out of range"));
    }
    if pg.history.len() > 100_000 {
        return Err(format!(
            "group {name}: history of {} entries",
            pg.history.len()
        ));
    }
    Ok(())
}

/// The state a state file describes (`None`: no file, a fresh state). Never panics, whatever
/// the bytes.
fn state_from_bytes(bytes: Option<&[u8]>, now: Instant) -> std::result::Result<State, String> {
    let mut st = State {
        next_id: 1,
        id_high_water: 1,
        groups: HashMap::new(),
        snap_gen: 0,
    };
    let Some(bytes) = bytes else {
        return Ok(st);
    };
    let doc: Persisted = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if doc.id_high_water > MAX_ID {
        return Err(format!(
            "id high-water mark {} is out of range (at most {MAX_ID})",
            doc.id_high_water
        ));
    }
    st.next_id = doc.id_high_water.max(1);
    st.id_high_water = st.next_id;
    let unknown: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 0));
    for pg in doc.groups {
        check_persisted(&pg, st.next_id)?;
        if st.groups.contains_key(&pg.view.group) {
            return Err(format!("group {} appears twice", pg.view.group));
        }
        let hb: HashMap<u64, u64> = pg.heartbeat_ms.iter().copied().collect();
        let secrets: HashMap<u64, [u8; SECRET_LEN]> = pg
            .secrets
            .iter()
            .filter_map(|(id, hex)| {
                let b = super::from_hex(hex)?;
                Some((*id, <[u8; SECRET_LEN]>::try_from(b.as_slice()).ok()?))
            })
            .collect();
        let entries = pg
            .view
            .members
            .iter()
            .map(|m| Entry {
                id: m.id,
                reg: Registration {
                    group: pg.view.group.clone(),
                    world_size: pg.world_size,
                    rank: None,
                    host_id: m.host_id.clone(),
                    hostname: m.hostname.clone(),
                    pid: m.pid,
                    role: m.role,
                    handle: m.handle.clone(),
                    numa: m.numa,
                    weight: m.weight,
                    elastic: pg.elastic,
                    policy: pg.policy.clone(),
                    // A member that never reconnects is declared dead after its timeout (at
                    // least 10 s after the restart, even for members without heartbeats).
                    heartbeat_timeout_ms: hb
                        .get(&m.id)
                        .copied()
                        .filter(|t| *t > 0)
                        .unwrap_or(10_000)
                        .min(MAX_MS),
                    light: false,
                    client_nonce: String::new(),
                    // Said again by the member's rejoin.
                    view_deltas: false,
                },
                peer: unknown,
                writer: None,
                last_seen: now,
                acked: pg.view.epoch,
                leaving: false,
                resync: None,
                // A member without a persisted secret (a file of an older version) cannot
                // prove itself: a random secret nobody knows; it is declared dead after its
                // timeout and the group goes on without it.
                secret: secrets.get(&m.id).copied().unwrap_or_else(|| {
                    let mut s = [0u8; SECRET_LEN];
                    for (i, c) in s.chunks_mut(8).enumerate() {
                        c.copy_from_slice(&random_u64(m.id ^ i as u64).to_le_bytes());
                    }
                    s
                }),
                echoed: None,
                sent: 0,
            })
            .collect();
        tracing::info!(target: LOG,
            "coordinator: restored group {} at epoch {} with {} members (waiting for them to reconnect)",
            pg.view.group, pg.view.epoch, pg.view.members.len());
        let name = pg.view.group.clone();
        let mut group = Group {
            world_size: pg.world_size,
            elastic: pg.elastic,
            policy: pg.policy,
            entries,
            joiners: Vec::new(),
            leavers: Vec::new(),
            view: Some(pg.view),
            join_wait: None,
            reasons: Vec::new(),
            retired: HashMap::new(),
            history: pg.history,
            pipeline: PipelineMetrics::default(),
            checkpoint: None,
            book: Book::default(),
        };
        group.reindex();
        st.groups.insert(name, group);
    }
    Ok(st)
}

/// Fuzzing entry point: builds the coordinator state a state file with these bytes
/// describes (errors are fine, panics are bugs).
#[doc(hidden)]
pub fn fuzz_load_state(data: &[u8]) {
    let _ = state_from_bytes(Some(data), Instant::now());
}

/// The status document (see [`Coordinator::status`]).
fn status_json(sh: &Shared) -> serde_json::Value {
    let st = lock(&sh.state);
    let tally = lock(&sh.tally).clone();
    let now = Instant::now();
    let mut groups: Vec<serde_json::Value> = st
        .groups
        .iter()
        .map(|(name, g)| {
            let members: Vec<serde_json::Value> = match &g.view {
                Some(v) => v
                    .members
                    .iter()
                    .enumerate()
                    .map(|(rank, m)| {
                        let e = g.entry(m.id);
                        serde_json::json!({
                            "rank": rank,
                            "id": m.id,
                            "host": m.hostname,
                            "host_id": m.host_id,
                            "pid": m.pid,
                            "role": m.role,
                            "weight": m.weight,
                            "alive": e.is_some(),
                            "connected": e.is_some_and(|e| e.writer.is_some()),
                            "installed_epoch": e.map(|e| e.acked),
                            "leaving": e.is_some_and(|e| e.leaving),
                            "heartbeat_age_s": e.map(|e| now.saturating_duration_since(e.last_seen).as_secs_f64()),
                        })
                    })
                    .collect(),
                None => g
                    .entries
                    .iter()
                    .map(|e| serde_json::json!({"id": e.id, "host": e.reg.hostname, "pid": e.reg.pid, "registered": true}))
                    .collect(),
            };
            let joiners: Vec<serde_json::Value> = g
                .joiners
                .iter()
                .map(|e| serde_json::json!({"id": e.id, "host": e.reg.hostname, "pid": e.reg.pid,
                    "waiting_s": now.saturating_duration_since(e.last_seen).as_secs_f64()}))
                .collect();
            serde_json::json!({
                "group": name,
                "elastic": g.elastic,
                "world_size": g.world_size,
                "policy": g.policy,
                "epoch": g.view.as_ref().map(|v| v.epoch),
                "size": g.view.as_ref().map(|v| v.members.len()),
                "members": members,
                "joiners": joiners,
                "history": g.history,
                "checkpoint": g.checkpoint,
                "live": g.entries.len() + g.joiners.len(),
                "registered_total": tally.get(name).copied().unwrap_or(0),
            })
        })
        .collect();
    groups.sort_by(|a, b| a["group"].as_str().cmp(&b["group"].as_str()));
    let live: usize = st
        .groups
        .values()
        .map(|g| g.entries.len() + g.joiners.len())
        .sum();
    let past: Vec<serde_json::Value> = tally
        .iter()
        .filter(|(name, _)| !st.groups.contains_key(*name))
        .map(|(name, n)| serde_json::json!({"group": name, "registered_total": n}))
        .collect();
    serde_json::json!({
        "next_member_id": st.next_id,
        "groups": groups,
        "live_members": live,
        "registered_total": tally.values().sum::<u64>(),
        "past_groups": past,
    })
}

/// Whether a state file with these bytes would be accepted (tests).
#[cfg(test)]
pub(crate) fn state_ok(data: &[u8]) -> bool {
    state_from_bytes(Some(data), Instant::now()).is_ok()
}

/// The bench's group, by name.
fn sm_group<'a>(st: &'a mut State, name: &str) -> Result<&'a mut Group> {
    st.groups
        .get_mut(name)
        .ok_or_else(|| Error::Internal("state machine bench: group lost".into()))
}

/// The state machine alone, without sockets or disk (`braid-coordinator bench
/// --state-machine N`): one elastic group of `n` members in a view; times a heartbeat and an
/// acknowledgement (per event), one join decision (the next view, with its delta frame body
/// encoded: members hold the last view) and one failure decision; then, apart, encoding the
/// whole view once (what a member (re)connecting, or one without deltas, costs). Returns the report, ending with one line
/// `state_machine members=N join_decision_ms=X failure_decision_ms=Y`.
///
/// Errors: `Error::InvalidArgument` for `n` outside 1..=`MAX_WORLD`; `Error::System` when the
/// service's pieces cannot be made; `Error::Internal` when a decision did not publish the
/// view it should have.
pub(crate) fn state_machine_bench(n: usize) -> Result<String> {
    if n == 0 || n >= MAX_WORLD {
        return Err(Error::InvalidArgument(format!(
            "state machine members {n} not in 1..{MAX_WORLD}"
        )));
    }
    let name = "sm";
    let poller = Poller::new().map_err(|e| Error::System(format!("epoll: {e}")))?;
    let state = State {
        next_id: 1,
        id_high_water: 1,
        groups: HashMap::new(),
        snap_gen: 0,
    };
    let sh = Shared::new(CoordinatorOptions::default(), state, poller);
    // Nothing is persisted here: no id is durable.
    sh.durable_high.store(0, Ordering::SeqCst);
    let unknown = SocketAddr::from(([127, 0, 0, 1], 0));
    let entry = |id: u64| {
        let mut reg = Registration::worker(name, n, None, id.to_le_bytes().to_vec());
        reg.elastic = true;
        reg.heartbeat_timeout_ms = 10_000;
        reg.hostname = format!("host{}", id % 1000);
        reg.host_id = reg.hostname.clone();
        Entry {
            id,
            reg,
            peer: unknown,
            writer: None,
            last_seen: Instant::now(),
            acked: 1,
            leaving: false,
            resync: None,
            secret: [0u8; SECRET_LEN],
            echoed: None,
            sent: 0,
        }
    };
    let t = Instant::now();
    let mut st = lock(&sh.state);
    let entries: Vec<Entry> = (1..=n as u64).map(entry).collect();
    let view = View {
        group: name.into(),
        epoch: 1,
        nonce: 7,
        members: entries.iter().map(Entry::member).collect(),
    };
    let mut g = Group {
        world_size: n,
        elastic: true,
        policy: GroupPolicy {
            min_size: 1,
            max_size: None,
            join_window_ms: 0,
        },
        entries,
        joiners: Vec::new(),
        leavers: Vec::new(),
        view: Some(view),
        join_wait: None,
        reasons: Vec::new(),
        retired: HashMap::new(),
        history: Vec::new(),
        pipeline: PipelineMetrics::default(),
        checkpoint: None,
        book: Book::default(),
    };
    g.reindex();
    st.groups.insert(name.into(), g);
    st.next_id = n as u64 + 1;
    let build = t.elapsed();
    // Per event: a heartbeat (what the event loop does under the lock) and the quick check.
    let t = Instant::now();
    for id in 1..=n as u64 {
        let now = Instant::now();
        if let Some(e) = sm_group(&mut st, name)?.any_mut(id) {
            e.last_seen = now;
        }
        let _ = decide(&sh, &mut st, name, now);
    }
    let heartbeat_ns = t.elapsed().as_nanos() as f64 / n as f64;
    // One join: the decision publishes epoch 2 with n + 1 members.
    let joiner = n as u64 + 1;
    st.next_id = joiner + 1;
    {
        let g = sm_group(&mut st, name)?;
        g.push_joiner(entry(joiner));
        g.join_wait = Instant::now().checked_sub(Duration::from_secs(1));
    }
    let t = Instant::now();
    let _ = decide(&sh, &mut st, name, Instant::now());
    let join = t.elapsed();
    let v = sm_group(&mut st, name)?
        .view
        .as_ref()
        .map(|v| (v.epoch, v.members.len()));
    if v != Some((2, n + 1)) {
        return Err(Error::Internal(format!(
            "state machine bench: the join published {v:?}"
        )));
    }
    // Everyone acknowledges epoch 2.
    let t = Instant::now();
    for id in 1..=joiner {
        sm_group(&mut st, name)?.ack(id, 2);
        let _ = decide(&sh, &mut st, name, Instant::now());
    }
    let ack_ns = t.elapsed().as_nanos() as f64 / joiner as f64;
    // One failure (a member in the middle of the view).
    let t = Instant::now();
    let dead = (n as u64) / 2 + 1;
    retire(
        sm_group(&mut st, name)?,
        dead,
        format!("failure of {dead} (connection to the coordinator lost)"),
    );
    let _ = decide(&sh, &mut st, name, Instant::now());
    let failure = t.elapsed();
    let v = sm_group(&mut st, name)?
        .view
        .as_ref()
        .map(|v| (v.epoch, v.members.len()));
    if v != Some((3, n)) {
        return Err(Error::Internal(format!(
            "state machine bench: the failure published {v:?}"
        )));
    }
    // Apart: the whole view, encoded once (sent on (re)connects and to members without
    // deltas; its bytes are O(members) per receiver).
    let t = Instant::now();
    let whole_bytes = sm_group(&mut st, name)?
        .view
        .as_ref()
        .and_then(|v| serde_json::to_string(v).ok())
        .map_or(0, |b| b.len());
    let whole = t.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(format!(
        "state machine alone (no sockets, no disk), one elastic group of {n} members:\n\
         build {:.1} ms; heartbeat + quick check {heartbeat_ns:.0} ns; acknowledgement + check {ack_ns:.0} ns\n\
         join decision (epoch 2, {} members, delta encoded once) {:.2} ms\n\
         failure decision (epoch 3, {n} members, delta encoded once) {:.2} ms\n\
         whole view encoded once (for a (re)connect): {:.2} ms, {:.1} MB\n\
         state_machine members={n} join_decision_ms={:.2} failure_decision_ms={:.2}",
        ms(build),
        n + 1,
        ms(join),
        ms(failure),
        ms(whole),
        whole_bytes as f64 / 1e6,
        ms(join),
        ms(failure),
    ))
}
