//! The coordinator's membership state machine: groups, their members and joiners, the
//! decisions that make views, and what the state file holds. Nothing here touches a socket,
//! a thread, a lock or the state file (the I/O layer is [`super::coordinator`], as quinn
//! separates QUIC from its sockets): time comes in as `now`, connections are opaque keys (the
//! I/O layer's `conns` keys), randomness (member secrets, view nonces) comes from the usual
//! helpers, and every transition returns what is to be done as data:
//!
//! * [`Out`]s: frames to write to a connection and connections to shut down. Views
//!   ([`Publish`]) go out only once the state that produced them is durable (the I/O layer
//!   hands them to its persister under the state lock, so they keep the order of the changes
//!   that made them); the others ([`Effects::now`]: heartbeat echoes, refusals, the goodbye of
//!   a member declared dead) at once, after the lock is released.
//! * A dirty flag ([`State::take_dirty`]): the state file is to be rewritten.
//! * Id reservations: ids are handed out below `id_high_water`, which is raised
//!   [`ID_BLOCK`] ahead (and the state marked dirty) when half a block is left; an id is
//!   handed out only below the mark the I/O layer reported durable ([`State::note_durable`]);
//!   when none is left ([`State::ids_short`]) the I/O layer writes the state first.
//!
//! The one write a transition asks for in-line is a registration's (or rejoin's)
//! acknowledgement: it is handed to a closure before the member enters the state, so that it
//! precedes every frame a later change sends that member, and a failed write leaves the
//! state as it was.
//!
//! Files: this one (state, bookkeeping, registrations, rejoins, member messages, departures,
//! the tick, the status), [`views`] (decisions and view frames, pipeline re-weighing, the
//! state-machine bench), [`persist`] (the state file's format, loading and checking it).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::proto::{self, Frame, MsgType};
use super::{auth, GroupPolicy, Member, Registration, Role, View, LOG};

mod persist;
#[cfg(test)]
mod tests;
mod views;

pub use persist::fuzz_load_state;
#[cfg(test)]
pub(crate) use persist::state_ok;
pub(super) use persist::{snapshot, state_from_bytes, Persisted};
pub(crate) use views::state_machine_bench;
use views::PipelineMetrics;
use views::{complete, decide, on_metric, retire, splice, view_frame, view_frames};
#[cfg(test)]
pub(crate) use views::{fold_metric, reweigh_decision, MeasuredStage};

/// Longest accepted group name.
pub(super) const MAX_GROUP: usize = 256;
/// Longest accepted host id / host name.
const MAX_NAME: usize = 1024;
/// Largest accepted connect handle.
pub(super) const MAX_HANDLE: usize = 64 << 10;
/// Largest accepted world size.
const MAX_WORLD: usize = 1 << 20;
/// Length of a member secret.
const SECRET_LEN: usize = 32;
/// Largest id high-water mark accepted from a state file (ids stay far from overflow).
const MAX_ID: u64 = 1 << 62;
/// Longest accepted duration in a registration (join window, heartbeat timeout): one day.
const MAX_MS: u64 = 24 * 3600 * 1000;
/// Largest epoch accepted from a state file.
const MAX_EPOCH: u64 = 1 << 62;
/// How often the ticker recounts a group's bookkeeping (index, counters, earliest heartbeat
/// deadline) from scratch, whatever happened: a safety net, O(members) once a second.
const AUDIT: Duration = Duration::from_secs(1);
/// Most work (members × blocks²) a re-weigh decision may plan, under the state lock; larger
/// pipelines are not re-weighed (logged once per group).
const REWEIGH_BUDGET: usize = 1 << 24;
/// Ids handed out between two writes of the state file.
pub(super) const ID_BLOCK: u64 = 1024;

/// A hasher for maps keyed by ids and connection keys (small integers the service chose, not
/// the peers): one multiplication instead of SipHash on the per-heartbeat path.
#[derive(Default, Clone, Copy)]
pub(super) struct IdHash(u64);

impl std::hash::Hasher for IdHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A map keyed by ids or connection keys.
pub(super) type IdMap<V> = std::collections::HashMap<u64, V, std::hash::BuildHasherDefault<IdHash>>;

/// A set of ids.
pub(super) type IdSet = std::collections::HashSet<u64, std::hash::BuildHasherDefault<IdHash>>;

/// What a transition asks the I/O layer to do with a connection (by its key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Out {
    /// Write `frame` to connection `conn` (queued: never blocks); `peer` names it in log
    /// lines.
    Send {
        conn: u64,
        peer: SocketAddr,
        frame: Vec<u8>,
    },
    /// Shut connection `conn` down (after the frames queued before).
    Close { conn: u64 },
}

impl Out {
    /// The connection this is for.
    pub(super) fn conn(&self) -> u64 {
        match self {
            Out::Send { conn, .. } | Out::Close { conn } => *conn,
        }
    }

    /// A frame for connection `conn`.
    pub(super) fn send(conn: u64, peer: SocketAddr, frame: Vec<u8>) -> Out {
        Out::Send { conn, peer, frame }
    }
}

/// Frames announcing views, to send once the state that produced them is durable, in order.
pub(super) type Publish = Vec<Out>;

/// A refusal: the message and its machine-readable code ("retired", "unknown", "auth").
pub(super) type Refusal = (String, Option<&'static str>);

/// What a transition produced besides its state change.
#[derive(Debug, Default)]
pub(super) struct Effects {
    /// Views: sent once the state that produced them is durable, in order.
    pub(super) publish: Publish,
    /// Echoes, refusals, shutdowns: done at once (after the state lock is released), in
    /// order.
    pub(super) now: Vec<Out>,
}

/// A refusal to write to `conn` (with the log line the coordinator writes for every
/// refusal).
pub(super) fn refusal(conn: u64, peer: SocketAddr, message: &str, code: Option<&str>) -> Out {
    tracing::info!(target: LOG, "coordinator: refused {peer}: {message}");
    Out::send(conn, peer, proto::encode_error_code(message, code))
}

/// A member's connection as the group sees it.
struct Entry {
    id: u64,
    reg: Registration,
    peer: SocketAddr,
    /// Key of its connection (the I/O layer's); `None` while the member is disconnected
    /// (after a coordinator restart, until it rejoins).
    conn: Option<u64>,
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
    /// view delta for it is computed from (see [`views::view_frames`]).
    sent: u64,
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
    /// (leavers), as (id, connection key, peer); they get the next view so they know they
    /// are out.
    leavers: Vec<(u64, u64, SocketAddr)>,
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
    /// A group of `world_size` with these `entries` and `view` (a new group: none and none;
    /// a restored or benchmarked one: its members), nothing else yet.
    fn new(
        world_size: usize,
        elastic: bool,
        policy: GroupPolicy,
        entries: Vec<Entry>,
        view: Option<View>,
        history: Vec<Hist>,
    ) -> Group {
        let mut g = Group {
            world_size,
            elastic,
            policy,
            entries,
            joiners: Vec::new(),
            leavers: Vec::new(),
            view,
            join_wait: None,
            reasons: Vec::new(),
            retired: HashMap::new(),
            history,
            pipeline: PipelineMetrics::default(),
            checkpoint: None,
            book: Book::default(),
        };
        g.reindex();
        g
    }

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

/// The coordinator's whole membership state (behind the I/O layer's state lock).
pub(super) struct State {
    /// Next member id (one counter for all groups; ids are never reused).
    pub(super) next_id: u64,
    /// Ids below this may have been handed out (persisted before use).
    pub(super) id_high_water: u64,
    groups: HashMap<String, Group>,
    /// Snapshots of this state taken for the state file (a later one is never overwritten
    /// by an earlier one).
    snap_gen: u64,
    /// The I/O layer persists this state (it has a state file): ids are handed out only
    /// below [`State::durable_ids`].
    persist_ids: bool,
    /// Ids below this are covered by the state file (as the I/O layer reported).
    durable_ids: u64,
    /// The state changed in a way the state file records since [`State::take_dirty`].
    dirty: bool,
    /// Registrations accepted per group since this service started (not persisted; kept
    /// after a group is forgotten), for the status: "members came and all left".
    tally: BTreeMap<String, u64>,
}

impl State {
    /// A fresh state (no groups; ids start at 1). `persist_ids`: the I/O layer writes a
    /// state file, so ids must be durable before they are handed out.
    pub(super) fn new(persist_ids: bool) -> State {
        State {
            next_id: 1,
            id_high_water: 1,
            groups: HashMap::new(),
            snap_gen: 0,
            persist_ids,
            durable_ids: 1,
            dirty: false,
            tally: BTreeMap::new(),
        }
    }

    /// Says whether ids must be durable before they are handed out (a state file is
    /// written); a loaded state's next id counts as durable.
    pub(super) fn set_persist_ids(&mut self, on: bool) {
        self.persist_ids = on;
        self.durable_ids = self.durable_ids.max(self.next_id);
    }

    /// Notes that the state file changed (the I/O layer writes it, off the lock).
    fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Whether the state file is to be rewritten (and clears the flag).
    pub(super) fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// The I/O layer wrote a snapshot with this id high-water mark: ids below it are
    /// durable.
    pub(super) fn note_durable(&mut self, high: u64) {
        self.durable_ids = self.durable_ids.max(high);
    }

    /// Whether the next id cannot be handed out before the state file is written (no
    /// durable id left). Raises the reservation first when it is due, so the write the I/O
    /// layer then does covers a whole block.
    pub(super) fn ids_short(&mut self) -> bool {
        if !self.persist_ids || self.next_id >= MAX_ID {
            return false;
        }
        self.reserve_ids();
        self.next_id >= self.durable_ids
    }

    /// Raises the id high-water mark [`ID_BLOCK`] ahead when half a block is left (the state
    /// file is then to be written).
    fn reserve_ids(&mut self) {
        if self.next_id.saturating_add(ID_BLOCK / 2) >= self.id_high_water {
            self.id_high_water = self.next_id.saturating_add(ID_BLOCK);
            self.mark_dirty();
        }
    }

    /// The current view of `group`, if it has one.
    pub(super) fn view(&self, group: &str) -> Option<View> {
        self.groups.get(group).and_then(|g| g.view.clone())
    }

    /// Members currently registered in `group` (entries, not joiners).
    #[cfg(test)]
    pub(super) fn registered(&self, group: &str) -> usize {
        self.groups.get(group).map_or(0, |g| g.entries.len())
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// What the handshake established: the coordinator's proof of the job token (if any), and
/// for a challenged connection the server nonce and the client's answer.
pub(super) struct Handshake {
    pub(super) proof: Option<String>,
    pub(super) server_nonce: String,
    pub(super) answer: Option<proto::Auth>,
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
pub(super) enum Flow {
    /// Keep serving it.
    Go,
    /// It ends: after a goodbye (true) or a violation (false).
    End(bool),
}

/// Handles one frame of registered member `id` on connection `conn` (the event loop, one
/// frame at a time): what to do with the connection, and the outputs.
pub(super) fn on_member_frame(
    st: &mut State,
    f: Frame,
    conn: u64,
    peer: SocketAddr,
    id: u64,
    group: &str,
    now: Instant,
) -> (Flow, Effects) {
    let mut fx = Effects::default();
    if f.version != proto::VERSION {
        tracing::warn!(target: LOG,
            "coordinator: member {id} ({peer}) switched to protocol v{}; dropping it",
            f.version);
        return (Flow::End(false), fx);
    }
    let ty = MsgType::from_u16(f.ty);
    let Some(g) = st.groups.get_mut(group) else {
        return (Flow::End(matches!(ty, Some(MsgType::Goodbye))), fx);
    };
    if let Some(e) = g.any_mut(id) {
        e.last_seen = now;
    } else if !g.leavers.iter().any(|l| l.0 == id) {
        // Declared dead meanwhile: its connection is being closed.
        let why = g.retired.get(&id).cloned().unwrap_or_default();
        fx.now.push(refusal(
            conn,
            peer,
            &format!("member {id} was removed from group {group} ({why}); its id is retired: join again as a new member"),
            Some("retired"),
        ));
        return (Flow::End(false), fx);
    }
    fx.publish = match ty {
        Some(MsgType::Heartbeat) => {
            // Echo, so a member can tell it is cut off when the echoes stop.
            let epoch = g.view.as_ref().map_or(0, |v| v.epoch);
            let due = g.any_mut(id).map_or(true, |e| echo_due(e, now));
            if due {
                if let Ok(b) = proto::encode(MsgType::Heartbeat, &proto::Heartbeat { epoch }) {
                    fx.now.push(Out::send(conn, peer, b));
                }
            }
            return (Flow::Go, fx);
        }
        Some(MsgType::Goodbye) => return (Flow::End(true), fx),
        Some(MsgType::Ack) => match f.body::<proto::Ack>() {
            Ok(a) => {
                g.ack(id, a.epoch);
                decide(st, group, now)
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
            decide(st, group, now)
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
                decide(st, group, now)
            }
            Err(_) => Vec::new(),
        },
        Some(MsgType::Metric) => match f.body::<proto::Metric>() {
            Ok(m) => on_metric(st, group, id, &m),
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
            fx.now.push(refusal(
                conn,
                peer,
                &format!("this connection is already registered as member {id}"),
                None,
            ));
            return (Flow::End(false), fx);
        }
        _ => {
            tracing::warn!(target: LOG,
                "coordinator: member {id} ({peer}) sent unexpected message type {}; dropping it",
                f.ty);
            return (Flow::End(false), fx);
        }
    };
    (Flow::Go, fx)
}

/// Checks a registration's fields (sizes, ranges, role).
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

/// Allocates a member id. With a state file, every id handed out is below the high-water
/// mark on disk: the persister writes the mark [`ID_BLOCK`] ahead when half a block is left
/// (off the state lock), and when none is left ([`State::ids_short`]) the I/O layer writes it
/// before it calls a transition that allocates, under the lock.
pub(super) fn alloc_id(st: &mut State) -> std::result::Result<u64, String> {
    if st.next_id >= MAX_ID {
        return Err("the coordinator ran out of member ids".into());
    }
    if st.persist_ids {
        st.reserve_ids();
        if st.next_id >= st.durable_ids {
            return Err(format!(
                "coordinator cannot persist its state: member id {} is not durable yet",
                st.next_id
            ));
        }
    }
    let id = st.next_id;
    st.next_id += 1;
    Ok(id)
}

/// Registers a member on connection `conn`; on success returns its id, its group and the
/// frames to send (views if this registration completed the group). `Err`: the refusal text.
///
/// The acknowledgement goes to `write_ack` (with the member's id) before the member enters the state (the I/O layer
/// writes it without blocking, under the state lock, so it precedes every frame a later
/// change sends the member); when that write fails the registration is refused and the state
/// stays as it was (the id is spent).
pub(super) fn register(
    st: &mut State,
    reg: Registration,
    conn: u64,
    peer: SocketAddr,
    proof: Option<String>,
    now: Instant,
    write_ack: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> std::result::Result<(u64, String, Publish), Refusal> {
    validate(&reg).map_err(|m| (m, None))?;
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
    let id = alloc_id(st).map_err(|m| (m, None))?;
    let group = st.groups.entry(group_name.clone()).or_insert_with(|| {
        Group::new(
            reg.world_size,
            reg.elastic,
            reg.policy.clone(),
            Vec::new(),
            None,
            Vec::new(),
        )
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
    // The acknowledgement is written before anything else can be sent to this member, so
    // that it always precedes the view (queued for the persister after it).
    if let Err(e) = write_ack(id, &ack) {
        tracing::info!(target: LOG,
            "coordinator: member {id} ({peer}) vanished while registering: {e}; id retired");
        if group.entries.is_empty() && group.joiners.is_empty() && group.view.is_none() {
            st.groups.remove(&group_name);
        }
        return Err((format!("acknowledgement failed: {e}"), None));
    }
    *st.tally.entry(group_name.clone()).or_insert(0) += 1;
    let entry = Entry {
        id,
        reg,
        peer,
        conn: Some(conn),
        last_seen: now,
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
            group.join_wait = Some(now);
        }
        let publish = decide(st, &group_name, now);
        return Ok((id, group_name, publish));
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
        st.mark_dirty();
    }
    Ok((id, group_name, publish))
}

/// A member reconnecting on connection `conn` (after a coordinator restart or a lost
/// connection). The acknowledgement goes to `write_ack` first (as in [`register`]); a failed
/// write refuses the rejoin and leaves the member as it was. The outputs: the current view if
/// the member is behind, and the shutdown of its previous connection.
#[allow(clippy::too_many_arguments)]
pub(super) fn rejoin(
    st: &mut State,
    rj: &proto::Rejoin,
    conn: u64,
    peer: SocketAddr,
    hs: &Handshake,
    client_nonce: &str,
    now: Instant,
    write_ack: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> std::result::Result<Effects, Refusal> {
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
            e.conn.map_or(String::new(), |_| format!(" from {}", e.peer)));
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
    write_ack(rj.member_id, &ack).map_err(|e| (format!("acknowledgement failed: {e}"), None))?;
    let mut fx = Effects::default();
    if let Some(old) = e.conn.replace(conn) {
        fx.now.push(Out::Close { conn: old });
    }
    e.peer = peer;
    e.last_seen = now;
    if matches!(slot, Slot::Entry(_)) && e.acked < cur && rj.epoch >= cur {
        book.unacked = book.unacked.saturating_sub(1);
    }
    e.acked = e.acked.max(rj.epoch);
    e.reg.view_deltas = rj.view_deltas;
    tracing::info!(target: LOG, "coordinator: group {}: member {} reconnected from {peer} (epoch {})",
        rj.group, rj.member_id, rj.epoch);
    // Resend the current view if the member is behind (the view is not copied: at 100,000
    // members a copy per rejoin would make a restart's rejoins quadratic).
    if let Some(v) = &g.view {
        if rj.epoch < v.epoch && matches!(slot, Slot::Entry(_)) {
            if let Some(b) = view_frame(e, v, &reason) {
                fx.publish.push(Out::send(conn, peer, b));
            }
        }
    }
    // A member of the view holds the current view now (it ran in it, or it was just
    // resent): the base of its next delta. A joiner gets whole views until admitted.
    e.sent = match slot {
        Slot::Entry(_) => cur,
        Slot::Joiner(_) => 0,
    };
    Ok(fx)
}

/// Member `id`'s connection `conn` ended (`polite`: after a goodbye). (The I/O layer does
/// not call this while it shuts down: the membership stays as it is, and as persisted, for a
/// restart.)
pub(super) fn depart(
    st: &mut State,
    id: u64,
    group_name: &str,
    peer: SocketAddr,
    conn: u64,
    polite: bool,
    now: Instant,
) -> Publish {
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
    let superseded = g.any(id).and_then(|e| e.conn).is_some_and(|c| c != conn);
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
                let is_current = g.entry(id).is_some_and(|e| e.conn.is_some());
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
        st.mark_dirty();
        return Vec::new();
    }
    if stopping {
        return Vec::new();
    }
    decide(st, group_name, now)
}

/// The ticker's turn at `now`: heartbeat timeouts (a member silent for longer than its
/// timeout is declared dead: retired, sent a goodbye and its connection shut down) and
/// batching windows (a decision for every elastic group).
pub(super) fn tick(st: &mut State, now: Instant) -> Effects {
    let mut fx = Effects::default();
    let mut close: Vec<(u64, SocketAddr)> = Vec::new();
    let names: Vec<String> = st.groups.keys().cloned().collect();
    for name in names {
        if let Some(g) = st.groups.get_mut(&name) {
            if g.view.is_none() {
                continue;
            }
            if g.book.next_audit.map_or(true, |t| now >= t) {
                g.reindex();
                g.book.next_audit = now.checked_add(AUDIT);
            }
            // Nobody can be overdue before the earliest deadline.
            if g.book.next_deadline.map_or(true, |d| now <= d) {
                fx.publish.extend(decide(st, &name, now));
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
                if let Some(e) = e {
                    if let Some(c) = e.conn {
                        close.push((c, e.peer));
                    }
                }
                if !g.elastic {
                    // No next view will say it: tell the others at once, so that their
                    // operations waiting on this member fail instead of hanging.
                    fx.now.extend(failure_frames(g, &name, id, &why));
                }
            }
            // The next deadline, from the survivors.
            g.reindex();
        }
        fx.publish.extend(decide(st, &name, now));
    }
    if !close.is_empty() {
        let bye = proto::encode_error_code(
            "declared dead: no heartbeat within the timeout; the id is retired",
            Some("retired"),
        );
        for (conn, peer) in close {
            fx.now.push(Out::send(conn, peer, bye.clone()));
            fx.now.push(Out::Close { conn });
        }
    }
    fx
}

/// The frames telling every connected member of the (not elastic) group `g` that member
/// `failed` was declared dead, and why (the body encoded once, each receiver's id spliced in).
fn failure_frames(g: &Group, name: &str, failed: u64, why: &str) -> Vec<Out> {
    let msg = proto::FailureMsg {
        member_id: 0,
        group: name.to_string(),
        epoch: g.view.as_ref().map_or(0, |v| v.epoch),
        failed,
        reason: why.to_string(),
    };
    let rest = serde_json::to_string(&msg)
        .ok()
        .and_then(|s| s.strip_prefix("{\"member_id\":0,").map(str::to_string));
    let Some(rest) = rest else {
        tracing::error!(target: LOG, "coordinator: cannot encode a failure notice");
        return Vec::new();
    };
    g.entries
        .iter()
        .filter_map(|e| {
            Some(Out::send(
                e.conn?,
                e.peer,
                splice(MsgType::Failure, e.id, &rest),
            ))
        })
        .collect()
}

/// The status document at `now` (see `Coordinator::status`).
pub(super) fn status_json(st: &State, now: Instant) -> serde_json::Value {
    let tally = &st.tally;
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
                            "connected": e.is_some_and(|e| e.conn.is_some()),
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
