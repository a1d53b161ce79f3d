//! The push/pull server: owns the key parts the ring gives it, replicates every update to the
//! next server(s) of the ring before acknowledging it, and hands state over when the view
//! changes.
//!
//! By concern: admission (who may send what: the hello's role and ticket in [`super::node`],
//! then every message against [`permitted`] in the channel's `on_msg`, here), message
//! dispatch (one handler per message type: [`dispatch`]), replication ([`replication`]),
//! hand-over of parts when the view changes ([`handover`]) and checkpoints ([`ckpt`]); the
//! store's state machine ([`super::store`]) knows nothing of sockets.

mod ckpt;
mod dispatch;
mod handover;
mod replication;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::chan::{close_all, Chan, ChanOpts, Incoming, Limits, Outgoing};
use super::checkpoint::{self, Manifest, PartEntry, PartMeta};
use super::node::{connect_to, Cred, Node, Peer, ViewBook};
use super::pool::BufPool;
use super::shard::Ring;
use super::store::{Consistency, Event, KeyDump, Store};
use super::wire::{permitted, Msg, PartRef, CKPT_CHUNK_BYTES, CLIENT_HDR, MAX_CKPT_CHUNK};
use super::{Map, PsOptions};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::membership::{Role, View};
use crate::types::DataType;

/// A message to a member (member, priority, message, body): the body is the concatenation of
/// its segments (none: no body). A pull's answer lists the store's buffers of its parts
/// ([`Event::Value`]), sent as they are ([`Chan::send_segments`]): no copy.
type Out = (u64, i32, Msg, Vec<Arc<Vec<u8>>>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Init,
    Push,
    Pull,
}

/// What a worker's write request does to its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    Init,
    Push,
    /// Replaces the optimizer state.
    State,
}

/// One client request being answered (its parts may complete at different times).
struct Agg {
    kind: Kind,
    prio: i32,
    n: usize,
    done: usize,
    versions: Vec<u64>,
    /// A pull's answer per part (the store's buffers, shared).
    data: Vec<Arc<Vec<u8>>>,
    /// Replications not yet acknowledged.
    reps: usize,
    failed: Option<(String, bool)>,
}

struct SState {
    view: View,
    ring: Ring,
    store: Store,
    chans: Map<u64, Arc<Chan>>,
    /// store request id → (member, client request, part index, user key)
    reqs: Map<u64, (u64, u64, usize, u64)>,
    aggs: Map<(u64, u64), Agg>,
    next_sreq: u64,
    rep_seq: u64,
    /// Replication sequence → (worker, request, replica server).
    rep_wait: Map<u64, (u64, u64, u64)>,
    changed_at: Instant,
    dedup: Dedup,
    /// Writes recorded in `dedup` whose acknowledgement is still to come (held bounded
    /// pushes): store request → (worker, op); the acknowledgement's version is recorded.
    held: Map<u64, (u64, u64)>,
    /// Further live channels with members that also have one in `chans`.
    extra: Vec<(u64, Arc<Chan>)>,
    /// Pulls of keys that did not exist when they arrived: (store request, user key, store
    /// key, since). They wait for an init at most [`UNKNOWN_KEY_GRACE`].
    unknown_pulls: Vec<(u64, u64, u64, Instant)>,
    /// Servers whose connection broke in this view: not reconnected until the view changes.
    lost: std::collections::HashSet<u64>,
    /// Every part known to exist in the group (store key → user key, part index): created on
    /// some server and announced to all ([`Msg::Keys`]).
    dir: Map<u64, (u64, u32)>,
    /// Parts every copy of which was lost (store key → why): their pulls, pushes and inits fail
    /// for the rest of the job.
    lost_parts: Map<u64, String>,
    /// A checkpoint request waiting for the sync rounds it covers to close.
    ckpt: Option<CkptJob>,
    /// The id of the checkpoint whose file is being written (its copy of the state is held
    /// until then; a further request is refused meanwhile).
    ckpt_writing: Option<String>,
    /// The store's update rule as [`super::UpdateRule::spec`] writes it (`None`: custom),
    /// sent with every replication so replicas apply what the owner applied.
    rule_spec: Option<String>,
    /// The last rule a replication carried, parsed.
    rep_rule: Option<(String, super::UpdateRule)>,
}

/// A checkpoint request taken in (see the module documentation of [`super`], "Checkpoints,
/// exactly").
struct CkptJob {
    worker: u64,
    req: u64,
    id: String,
    dir: std::path::PathBuf,
    /// The parts this server owns and the version of each to write.
    targets: Vec<(u64, u64)>,
    /// The view it was taken in (a view change fails it).
    epoch: u64,
    since: Instant,
}

/// How long after a view change a part this server now owns may still be on its way (the
/// hand-over); requests for it are retried meanwhile, and fail as lost afterwards.
const HANDOVER_GRACE: Duration = Duration::from_secs(5);

/// A request for part `p` stating another whole-key length than the one this part was
/// initialised with: refused, so that a wrong length is never applied to the parts whose own
/// size happens to match.
fn total_mismatch(st: &SState, p: &PartRef) -> Option<String> {
    let held = st.store.total(p.s)?;
    (p.t != 0 && p.t != held).then(|| {
        format!(
            "key {}: wrong length: expected {held} bytes, got {}",
            p.k, p.t
        )
    })
}

/// Why `skey` cannot be served by this server (its owner), if it cannot: a part that exists in
/// the group but no copy of which reached this server. `Some((msg, retry))`.
fn missing_part(st: &mut SState, skey: u64) -> Option<(String, bool)> {
    if let Some(why) = st.lost_parts.get(&skey) {
        return Some((why.clone(), false));
    }
    if st.store.version(skey).is_some() {
        return None;
    }
    let (k, p) = *st.dir.get(&skey)?;
    if st.changed_at.elapsed() < HANDOVER_GRACE {
        return Some((
            format!("key {k} part {p} is on its way to its new owner: retry"),
            true,
        ));
    }
    let why = format!(
        "key {k} part {p} was lost: no copy of it reached its owner (this server) after the \
         view change at epoch {}; its value is gone",
        st.view.epoch
    );
    st.lost_parts.insert(skey, why.clone());
    Some((why, false))
}

/// How long a pull of a key nobody initialised waits (another worker's init may be on its
/// way, first writer wins) before it fails with a clear error.
const UNKNOWN_KEY_GRACE: Duration = Duration::from_secs(3);

/// Fails pulls that waited too long for a key nobody initialised.
fn expire_unknown_pulls(inner: &Arc<SInner>) {
    let mut out = Vec::new();
    {
        let mut guard = lock(&inner.st);
        let st = &mut *guard;
        if st.unknown_pulls.is_empty() {
            return;
        }
        let list = std::mem::take(&mut st.unknown_pulls);
        for (sreq, key, skey, since) in list {
            if st.store.version(skey).is_some() || !st.reqs.contains_key(&sreq) {
                continue;
            }
            if since.elapsed() < UNKNOWN_KEY_GRACE {
                st.unknown_pulls.push((sreq, key, skey, since));
                continue;
            }
            let evs = st.store.cancel_pull(
                sreq,
                &format!("user key {key} does not exist (nobody called init for it)"),
            );
            apply_events(st, evs, &mut out);
        }
    }
    flush(inner, out, Vec::new());
}

/// Parts of worker operations already applied (so a retry after a lost acknowledgement is
/// not applied twice); the most recent [`DEDUP_KEEP`] per worker. Replicas record the same.
/// Each record keeps the version its write leads to (the version of its acknowledgement: sync,
/// the round it went into; async, the version after it; [`NO_VERSION`] while a bounded push is
/// held), so a checkpoint at version `T` carries the records of exactly the writes its values
/// include ([`Dedup::applied_upto`]), and a server restored from it does not apply them again.
///
/// A worker numbers its operations upwards from a random start, so its records are kept
/// ordered by (op, part): every request looks up, adds and drops records at the two ends of
/// that order, which stay in cache (a hash set of 64 Ki records per worker missed the cache
/// twice per part, about 7% of a server thread's time with small values), and the oldest
/// record is the first one.
#[derive(Default)]
struct Dedup {
    seen: Map<u64, Recent>,
}

/// An applied part of a worker's operation: (worker, op, part, version).
type Applied = (u64, u64, u64, u64);

/// The version of a record whose write is not applied yet (a held bounded push).
const NO_VERSION: u64 = u64::MAX;

/// The (op, part) pairs of one worker with their versions, oldest op first.
type Recent = BTreeMap<(u64, u64), u64>;

/// Applied parts remembered per worker.
const DEDUP_KEEP: usize = 1 << 16;

/// Most records a checkpoint carries per part (the latest by version): the writes a worker
/// may still retry after every server died are the few it had in flight.
const CKPT_APPLIED_KEEP: usize = 256;

impl Dedup {
    /// Whether (worker, op, part) was applied before. Op 0 is never deduplicated.
    fn seen(&self, worker: u64, op: u64, skey: u64) -> bool {
        op != 0
            && self
                .seen
                .get(&worker)
                .is_some_and(|set| set.contains_key(&(op, skey)))
    }

    /// The records of the parts `pick` selects, as (worker, op, part, version).
    fn export(&self, pick: impl Fn(u64) -> bool) -> Vec<Applied> {
        let mut out = Vec::new();
        for (w, set) in &self.seen {
            out.extend(
                set.iter()
                    .filter(|((_, s), _)| pick(*s))
                    .map(|(&(op, s), &v)| (*w, op, s, v)),
            );
        }
        out
    }

    /// For each part of `upto` (part → version `T`): the (worker, op) records of the writes
    /// its value at `T` includes (version at most `T`), the latest [`CKPT_APPLIED_KEEP`] by
    /// version, ascending.
    fn applied_upto(&self, upto: &HashMap<u64, u64>) -> HashMap<u64, Vec<(u64, u64)>> {
        let mut by: HashMap<u64, Vec<(u64, u64, u64)>> = HashMap::new();
        for (w, set) in &self.seen {
            for (&(op, s), &v) in set {
                if upto.get(&s).is_some_and(|t| v <= *t) {
                    by.entry(s).or_default().push((v, *w, op));
                }
            }
        }
        by.into_iter()
            .map(|(s, mut r)| {
                r.sort_unstable();
                let from = r.len().saturating_sub(CKPT_APPLIED_KEEP);
                (s, r[from..].iter().map(|&(_, w, op)| (w, op)).collect())
            })
            .collect()
    }

    /// Records (worker, op, part) as applied, leading to `version`; false if it was recorded
    /// before. Op 0 is never deduplicated. Past [`DEDUP_KEEP`] records of the worker, its
    /// oldest (lowest op) goes.
    fn first(&mut self, worker: u64, op: u64, skey: u64, version: u64) -> bool {
        if op == 0 {
            return true;
        }
        let set = self.seen.entry(worker).or_default();
        match set.entry((op, skey)) {
            std::collections::btree_map::Entry::Occupied(_) => return false,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(version);
            }
        }
        if set.len() > DEDUP_KEEP {
            set.pop_first();
        }
        true
    }

    /// The held write (worker, op, part) was applied, leading to `version`.
    fn applied(&mut self, worker: u64, op: u64, skey: u64, version: u64) {
        if let Some(v) = self
            .seen
            .get_mut(&worker)
            .and_then(|set| set.get_mut(&(op, skey)))
        {
            if *v == NO_VERSION {
                *v = version;
            }
        }
    }
}

/// Replication bodies kept for reuse: at most this many, and [`REP_POOL_BYTES`] of them.
const REP_POOL: usize = 8;
/// See [`REP_POOL`].
const REP_POOL_BYTES: usize = 256 << 20;

struct SInner {
    me: u64,
    my_host: String,
    opts: PsOptions,
    transports: Vec<Arc<dyn braid_transport::Transport>>,
    token: Option<Vec<u8>>,
    timeout: Duration,
    st: Mutex<SState>,
    stop: AtomicBool,
    /// Store key → user key, for user update rules.
    keymap: Arc<Mutex<HashMap<u64, u64>>>,
    /// Bodies of replication messages, reused once sent.
    rep_bodies: Mutex<BufPool>,
    /// Views known to this process (the acceptor checks hellos against them).
    book: Arc<ViewBook>,
}

/// The largest header a server accepts from another server (hand-overs carry key state in
/// the header, in chunks of at most half this; see [`handover::apply_view`]).
fn server_hdr(opts: &PsOptions) -> usize {
    let per_part = opts
        .history
        .saturating_add(8)
        .saturating_mul(opts.partition_bytes)
        .saturating_mul(4);
    per_part.saturating_add(CLIENT_HDR).max(64 << 20)
}

/// A push/pull server process (see the module docs). Dropping it leaves the group (the
/// replicas take over its keys).
pub struct KvServer {
    inner: Arc<SInner>,
    watcher: Option<JoinHandle<()>>,
    node: Option<Node>,
}

impl std::fmt::Debug for KvServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvServer")
            .field("member", &self.inner.me)
            .finish_non_exhaustive()
    }
}

type Slot = Arc<Mutex<Option<Arc<SInner>>>>;
/// A connection accepted before the server state exists.
type Early = (Box<dyn braid_transport::Conn>, Peer);

impl KvServer {
    /// Starts a server: registers with the coordinator as a server of the group and serves
    /// until dropped.
    ///
    /// Errors: as `Communicator::init` (configuration, coordinator, transports).
    pub fn start(cfg: Config, opts: PsOptions) -> Result<KvServer> {
        let slot: Slot = Arc::new(Mutex::new(None));
        let early: Arc<Mutex<Vec<Early>>> = Arc::default();
        let on_conn = {
            let slot = slot.clone();
            let early = early.clone();
            Box::new(move |c: Box<dyn braid_transport::Conn>, id: Peer| {
                // Holding `early` while looking at `slot` closes the gap with start() moving the
                // early connections over.
                let mut e = lock(&early);
                let inner = lock(&slot).clone();
                match inner {
                    Some(inner) => {
                        drop(e);
                        adopt(&inner, c, id)
                    }
                    None => e.push((c, id)),
                }
            })
        };
        let timeout = cfg.timeout;
        // A checkpoint to restore is checked in full before this server joins the group: a
        // missing, truncated or corrupt file refuses the start, naming the file.
        let restore = match &opts.restore {
            Some(dir) => Some((dir.clone(), ckpt::open_restore(dir, &opts)?)),
            None => None,
        };
        let mut cfg = cfg;
        if opts.weigh_by_bandwidth {
            // Bandwidth-aware placement: this server's measured reduction bandwidth is its weight
            // on the ring (published at registration), so faster servers own more parts.
            let gbps = crate::reduce::bench_bandwidth(16 << 20, 8);
            if gbps > 0.0 {
                tracing::info!(target: "braid::ps", "server: measured {gbps:.2} GB/s; using it as ring weight");
                cfg.weight = gbps;
            }
        }
        let node = Node::start(cfg, Role::Server, on_conn)?;
        let view = node.first_view.clone();
        let ring = ring_of(&view);
        // User update rules see the caller's key, not the part's store key.
        let keymap: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
        let rule = match &opts.rule {
            super::UpdateRule::Custom(f) => {
                let (f, km) = (f.clone(), keymap.clone());
                super::UpdateRule::Custom(Arc::new(move |sk, dt, v: &mut [u8], g: &[u8]| {
                    let k = lock(&km).get(&sk).copied().unwrap_or(sk);
                    f(k, dt, v, g)
                }))
            }
            other => other.clone(),
        };
        let rule_spec = rule.spec();
        let mut store = Store::new(opts.consistency, rule, opts.history.max(1));
        let _ = store.set_workers(&workers_of(&view));
        let mut directory = Map::default();
        let mut dedup = Dedup::default();
        if let Some((dir, m)) = &restore {
            directory = ckpt::load_restore(node.me, &view, &opts, dir, m, &mut store, &mut dedup)?;
            if matches!(opts.rule, super::UpdateRule::Custom(_)) {
                let mut km = lock(&keymap);
                for (s, (k, _)) in &directory {
                    km.insert(*s, *k);
                }
            }
        }
        let my_host = node.host_id();
        let inner = Arc::new(SInner {
            me: node.me,
            my_host,
            opts,
            transports: node.transports.clone(),
            token: node.token.clone(),
            timeout,
            st: Mutex::new(SState {
                view: view.clone(),
                ring,
                store,
                chans: Map::default(),
                reqs: Map::default(),
                aggs: Map::default(),
                next_sreq: 1,
                rep_seq: 1,
                rep_wait: Map::default(),
                // The first view of a group hands nothing over; joining a running group
                // (epoch > 1) is a change: parts are on their way to this server.
                changed_at: if view.epoch > 1 {
                    Instant::now()
                } else {
                    Instant::now()
                        .checked_sub(Duration::from_secs(3600))
                        .unwrap_or_else(Instant::now)
                },
                dedup,
                held: Map::default(),
                extra: Vec::new(),
                unknown_pulls: Vec::new(),
                lost: std::collections::HashSet::new(),
                dir: directory,
                lost_parts: Map::default(),
                ckpt: None,
                ckpt_writing: None,
                rule_spec,
                rep_rule: None,
            }),
            stop: AtomicBool::new(false),
            keymap,
            rep_bodies: Mutex::new(BufPool::new(REP_POOL, REP_POOL_BYTES)),
            book: node.book.clone(),
        });
        let pending: Vec<Early> = {
            let mut e = lock(&early);
            *lock(&slot) = Some(inner.clone());
            e.drain(..).collect()
        };
        for (c, id) in pending {
            adopt(&inner, c, id);
        }
        node.client.installed(view.epoch);
        tracing::info!(target: "braid::ps", "server {} up (epoch {}, {} servers)", node.me, view.epoch, servers_of(&view).len());
        let mut s = KvServer {
            inner: inner.clone(),
            watcher: None,
            node: Some(node),
        };
        s.watcher = Some(spawn_watcher(
            inner,
            s.node.as_ref().map(|n| n.client.clone()),
        ));
        Ok(s)
    }

    /// This server's member id.
    pub fn member_id(&self) -> u64 {
        self.inner.me
    }

    /// Key parts held (owned or replicated).
    pub fn parts_held(&self) -> usize {
        lock(&self.inner.st).store.keys().count()
    }

    /// Bytes of the current values of the key parts held (owned or replicated).
    pub fn value_bytes(&self) -> usize {
        lock(&self.inner.st).store.value_bytes()
    }

    /// The bytes this server's store holds, by kind (values, kept versions, open rounds,
    /// optimizer state).
    pub fn store_bytes(&self) -> super::StoreBytes {
        lock(&self.inner.st).store.bytes()
    }

    /// Bytes of the receive buffers of this server's connections (each keeps the size of the
    /// largest recent message body it received): the in-flight memory of pushes.
    pub fn receive_buffer_bytes(&self) -> usize {
        let st = lock(&self.inner.st);
        st.chans
            .values()
            .chain(st.extra.iter().map(|(_, c)| c))
            .map(|c| c.receive_buffer())
            .sum()
    }

    /// The epoch of the view this server runs on.
    pub fn epoch(&self) -> u64 {
        lock(&self.inner.st).view.epoch
    }

    /// Workers and servers in the view this server runs on.
    pub fn sizes(&self) -> (usize, usize) {
        let st = lock(&self.inner.st);
        (workers_of(&st.view).len(), servers_of(&st.view).len())
    }
}

impl Drop for KvServer {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.watcher.take() {
            let _ = h.join();
        }
        let chans: Vec<Arc<Chan>> = {
            let mut st = lock(&self.inner.st);
            let mut v: Vec<Arc<Chan>> = st.chans.drain().map(|(_, c)| c).collect();
            v.extend(st.extra.drain(..).map(|(_, c)| c));
            v
        };
        close_all(chans);
        drop(self.node.take());
    }
}

pub(crate) fn workers_of(v: &View) -> Vec<u64> {
    v.members
        .iter()
        .filter(|m| m.role == Role::Worker)
        .map(|m| m.id)
        .collect()
}

pub(crate) fn servers_of(v: &View) -> Vec<(u64, f64)> {
    v.members
        .iter()
        .filter(|m| m.role == Role::Server)
        .map(|m| (m.id, m.weight))
        .collect()
}

pub(crate) fn ring_of(v: &View) -> Ring {
    Ring::new(&servers_of(v))
}

/// The name of a consistency mode as `BRAID_PS_MODE` spells it.
pub(crate) fn mode_name(c: Consistency) -> String {
    match c {
        Consistency::Sync => "sync".into(),
        Consistency::Async => "async".into(),
        Consistency::Bounded(t) => format!("bounded:{t}"),
    }
}

/// Takes an accepted connection (its hello admitted, see [`super::node::admit`]) into
/// service.
fn adopt(inner: &Arc<SInner>, conn: Box<dyn braid_transport::Conn>, peer: Peer) {
    if inner.stop.load(Ordering::SeqCst) {
        return;
    }
    if let Err(e) = make_chan(inner, conn, peer) {
        tracing::warn!(target: "braid::ps", "server {}: {e}", inner.me);
    }
}

/// Registers a new channel with member `id`: it becomes the one replies go out on unless a
/// live one exists; a second live channel (both sides connected at once) is kept too, never
/// closed under the peer's feet (it may carry messages in flight).
fn register_chan(st: &mut SState, id: u64, c: Arc<Chan>) -> Arc<Chan> {
    match st.chans.get(&id) {
        Some(old) if old.closed().is_none() => {
            st.extra.retain(|(_, x)| x.closed().is_none());
            st.extra.push((id, c));
            old.clone()
        }
        _ => {
            if let Some(old) = st.chans.insert(id, c.clone()) {
                st.extra.push((id, old));
            }
            st.extra.retain(|(_, x)| x.closed().is_none());
            c
        }
    }
}

/// A worker or reader sends on one connection at a time (it opens another only once it gave
/// up the first, which this server may not have noticed yet, e.g. after being stopped): the
/// one that carries its requests now is the one it reads answers on, so it becomes the one
/// replies go out on (`via`: the channel a message from `from` came in on).
fn use_for_replies(st: &mut SState, from: u64, via: &Arc<Chan>) {
    if st.chans.get(&from).is_some_and(|c| Arc::ptr_eq(c, via)) {
        return;
    }
    st.extra
        .retain(|(_, x)| !Arc::ptr_eq(x, via) && x.closed().is_none());
    if let Some(old) = st.chans.insert(from, via.clone()) {
        if old.closed().is_none() {
            st.extra.push((from, old));
        }
    }
}

/// Starts a channel with member `from` and registers it before any of its messages is handled
/// (so replies always find a channel); returns the channel replies to `from` go out on.
fn make_chan(
    inner: &Arc<SInner>,
    conn: Box<dyn braid_transport::Conn>,
    peer: Peer,
) -> Result<Arc<Chan>> {
    let from = peer.id;
    let part = inner.opts.partition_bytes;
    // What the protocol allows this peer: a request (or replication) carries at most one
    // partition of values; headers are small except a server's hand-over.
    let limits = Limits {
        hdr: if peer.role == Role::Server {
            server_hdr(&inner.opts)
        } else {
            CLIENT_HDR
        },
        body: part,
    };
    let weak = Arc::downgrade(inner);
    let gate: Arc<(Mutex<bool>, std::sync::Condvar)> = Arc::default();
    let g2 = gate.clone();
    // This channel, for a worker's or reader's messages: see `use_for_replies`.
    let this: Arc<std::sync::OnceLock<std::sync::Weak<Chan>>> = Arc::default();
    let this2 = this.clone();
    let on_msg = Box::new(move |m: &Incoming| {
        {
            let mut open = lock(&g2.0);
            while !*open {
                open =
                    g2.1.wait_timeout(open, Duration::from_millis(50))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        if peer.partition != part as u64 {
            return Err(format!(
                "partition size mismatch: this server uses {part} bytes, member {from} {} \
                 (BRAID_PS_PARTITION_BYTES must be the same on every member of the group)",
                peer.partition
            ));
        }
        let msg = Msg::decode(&m.hdr).map_err(|e| format!("undecodable header: {e}"))?;
        permitted(peer.role, Role::Server, &msg)?;
        let via = this2.get().and_then(std::sync::Weak::upgrade);
        match weak.upgrade() {
            Some(inner) => {
                dispatch::handle(&inner, from, via.as_ref(), msg, m.body(), m.body_buf())
            }
            None => Ok(()),
        }
    });
    let me = inner.me;
    let weak = Arc::downgrade(inner);
    let on_close = Box::new(move |why: String| {
        tracing::info!(target: "braid::ps", "server {me}: connection with {} {from} ended: {why}", peer.role);
        if let Some(inner) = weak.upgrade() {
            let mut st = lock(&inner.st);
            if st
                .view
                .members
                .iter()
                .any(|m| m.id == from && m.role == Role::Server)
            {
                st.lost.insert(from);
            }
        }
    });
    // A worker's push and pull that arrive together are answered in one write (one wake-up
    // of the worker), unless a callback rule may make handling a push slow.
    let opts = ChanOpts {
        early: false,
        coalesce: !matches!(inner.opts.rule, crate::ps::UpdateRule::Custom(_)),
    };
    let c = Arc::new(Chan::start_with(
        conn,
        &format!("s{me}-{from}"),
        limits,
        on_msg,
        on_close,
        opts,
        None,
    )?);
    if peer.role != Role::Server {
        let _ = this.set(Arc::downgrade(&c));
    }
    let out = register_chan(&mut lock(&inner.st), from, c);
    *lock(&gate.0) = true;
    gate.1.notify_all();
    Ok(out)
}

/// The channel to server `id`, connecting when there is none.
fn server_chan(inner: &Arc<SInner>, id: u64) -> Option<Arc<Chan>> {
    server_chan_in(inner, id, None)
}

/// As [`server_chan`], finding the member in `view` when given (a view not installed yet).
fn server_chan_in(inner: &Arc<SInner>, id: u64, view: Option<&View>) -> Option<Arc<Chan>> {
    let (existing, member) = {
        let st = lock(&inner.st);
        let live = st.chans.get(&id).filter(|c| c.closed().is_none()).cloned();
        if live.is_none() && view.is_none() && st.lost.contains(&id) {
            return None;
        }
        let v = view.unwrap_or(&st.view);
        let cred = Cred::member(
            inner.me,
            v,
            inner.token.as_deref(),
            inner.opts.partition_bytes,
        );
        (
            live,
            v.members
                .iter()
                .find(|m| m.id == id)
                .cloned()
                .map(|m| (m, cred)),
        )
    };
    if existing.is_some() {
        return existing;
    }
    let (m, cred) = member?;
    let deadline = Instant::now() + Duration::from_secs(10).min(inner.timeout);
    let peer = Peer {
        id,
        role: Role::Server,
        partition: inner.opts.partition_bytes as u64,
    };
    match connect_to(&inner.transports, &cred, &inner.my_host, &m, deadline)
        .and_then(|c| make_chan(inner, c, peer))
    {
        Ok(c) => {
            lock(&inner.st).chans.insert(id, c.clone());
            Some(c)
        }
        Err(e) => {
            tracing::warn!(target: "braid::ps", "server {}: cannot reach server {id}: {e}", inner.me);
            None
        }
    }
}

fn send(ch: &Chan, prio: i32, m: &Msg, body: Arc<Vec<u8>>) {
    let _ = ch.send(Outgoing {
        prio,
        hdr: m.encode(),
        body,
    });
}

fn dtype_of(name: &str) -> Option<DataType> {
    DataType::parse(name)
}

/// Tells every other server of the view about parts created here (the key directory).
fn announce(inner: &Arc<SInner>, add: Vec<(u64, u64, u32)>) {
    if add.is_empty() {
        return;
    }
    let others: Vec<u64> = {
        let st = lock(&inner.st);
        servers_of(&st.view)
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| *id != inner.me)
            .collect()
    };
    let msg = Msg::Keys { add };
    for id in others {
        if let Some(c) = server_chan(inner, id) {
            send(&c, i32::MAX, &msg, Arc::new(Vec::new()));
        }
    }
}

/// Sends what `handle` produced (outside the state lock).
fn flush(inner: &Arc<SInner>, outbox: Vec<Out>, reps: Vec<replication::Rep>) {
    for (r, msg, body) in reps {
        match server_chan(inner, r) {
            Some(c) => {
                let _ = c.send_segs(i32::MAX, msg.encode(), body);
            }
            None => {
                if let Msg::Replicate { seq, .. } = msg {
                    replication::unreachable(inner, seq);
                }
            }
        }
    }
    if outbox.is_empty() {
        return;
    }
    let chans: HashMap<u64, Arc<Chan>> = {
        let st = lock(&inner.st);
        outbox
            .iter()
            .filter_map(|(m, ..)| st.chans.get(m).map(|c| (*m, c.clone())))
            .collect()
    };
    for (m, prio, msg, segs) in outbox {
        match chans.get(&m) {
            // A pull answer of several parts goes out from the store's buffers of its parts.
            Some(c) => {
                let _ = c.send_segments(prio, msg.encode(), segs);
            }
            None => {
                tracing::debug!(target: "braid::ps", "server {}: no connection to member {m} for {msg:?}", inner.me)
            }
        }
    }
}

/// Records store events into the requests they answer.
fn apply_events(st: &mut SState, evs: Vec<Event>, outbox: &mut Vec<Out>) {
    for ev in evs {
        match &ev {
            Event::PushAck { req, key, version } => {
                if let Some((w, op)) = st.held.remove(req) {
                    st.dedup.applied(w, op, *key, *version);
                }
            }
            Event::Error { req, .. } => {
                st.held.remove(req);
            }
            _ => {}
        }
        let (sreq, skey, res) = match ev {
            Event::PushAck { req, key, version } => (req, key, Ok((version, None))),
            Event::Value {
                req,
                key,
                version,
                data,
            } => (req, key, Ok((version, Some(data)))),
            Event::Error { req, key, msg } => (req, key, Err(msg)),
            Event::RuleFailed { key, version, msg } => {
                tracing::error!(target: "braid::ps", "update rule failed on part {key:#x} at round {version}: {msg}");
                continue;
            }
        };
        let Some((w, creq, idx, ukey)) = st.reqs.remove(&sreq) else {
            continue;
        };
        if let Some(a) = st.aggs.get_mut(&(w, creq)) {
            match res {
                Ok((v, d)) => {
                    if let Some(x) = a.versions.get_mut(idx) {
                        *x = v;
                    }
                    if let (Some(d), Some(slot)) = (d, a.data.get_mut(idx)) {
                        *slot = d;
                    }
                }
                Err(msg) => {
                    // Shortly after a view change a part may be on its way to this server
                    // (hand-over): the worker retries. Otherwise the error is final.
                    let retry = msg.contains("moved away")
                        || msg.contains("is on its way")
                        || (msg.contains("not initialised")
                            && st.changed_at.elapsed() < Duration::from_secs(5));
                    // Name the caller's key, not the part's store key.
                    let msg = msg.replace(&format!("key {skey}"), &format!("key {ukey}"));
                    if a.failed.is_none() {
                        a.failed = Some((msg, retry));
                    }
                }
            }
            a.done += 1;
        }
        complete(st, w, creq, outbox);
    }
}

/// Answers request (w, req) when all its parts are done and replicated.
fn complete(st: &mut SState, w: u64, req: u64, outbox: &mut Vec<Out>) {
    let ready = st
        .aggs
        .get(&(w, req))
        .is_some_and(|a| a.done >= a.n && a.reps == 0);
    if !ready {
        return;
    }
    let Some(a) = st.aggs.remove(&(w, req)) else {
        return;
    };
    if let Some((msg, retry)) = a.failed {
        outbox.push((w, a.prio, Msg::Fail { req, msg, retry }, Vec::new()));
        return;
    }
    match a.kind {
        Kind::Init | Kind::Push => outbox.push((
            w,
            a.prio,
            Msg::Ack {
                req,
                versions: a.versions,
            },
            Vec::new(),
        )),
        Kind::Pull => {
            // Sent from the store's buffers (see `Out`).
            let body = a.data;
            outbox.push((
                w,
                a.prio,
                Msg::Values {
                    req,
                    versions: a.versions,
                },
                body,
            ));
        }
    }
}

fn spawn_watcher(
    inner: Arc<SInner>,
    client: Option<Arc<crate::membership::Client>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(client) = client else { return };
        while !inner.stop.load(Ordering::SeqCst) {
            expire_unknown_pulls(&inner);
            ckpt::expire_checkpoint(&inner);
            let cur = lock(&inner.st).view.epoch;
            let stop = AtomicBool::new(false);
            let deadline = Instant::now() + Duration::from_millis(200);
            match client.wait_epoch(cur + 1, deadline, &stop) {
                Ok(top) => {
                    if let Some((view, reason)) = client.view_of(top) {
                        tracing::info!(target: "braid::ps", "server {}: view epoch {} ({reason})", inner.me, view.epoch);
                        if view.rank_of(inner.me).is_none() {
                            client.installed(view.epoch);
                            return;
                        }
                        handover::apply_view(&inner, view);
                        client.installed(top);
                    }
                }
                Err(Error::Timeout { .. }) => {}
                Err(e) => {
                    tracing::error!(target: "braid::ps", "server {}: membership: {e}", inner.me);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The records a checkpoint at version T carries are those of the writes its values
    /// include: versions at most T, held pushes once applied, the latest per part.
    #[test]
    fn dedup_records_carry_the_version_their_write_leads_to() {
        let mut d = Dedup::default();
        // Worker 1: ops 10, 11 on part 5 (versions 3, 4); op 12 held (bounded), later applied
        // at version 6. Worker 2: op 10 on part 5 (version 5) and on part 9 (version 1).
        assert!(d.first(1, 10, 5, 3));
        assert!(d.first(1, 11, 5, 4));
        assert!(d.first(1, 12, 5, NO_VERSION));
        assert!(d.first(2, 10, 5, 5));
        assert!(d.first(2, 10, 9, 1));
        assert!(!d.first(1, 10, 5, 7), "recorded twice");
        assert!(
            d.first(1, 0, 5, 1) && !d.seen(1, 0, 5),
            "op 0 is never recorded"
        );
        assert!(d.seen(1, 12, 5) && !d.seen(3, 10, 5));
        let at = |d: &Dedup, t5: u64, t9: u64| {
            let mut m = d.applied_upto(&HashMap::from([(5, t5), (9, t9)]));
            (
                m.remove(&5).unwrap_or_default(),
                m.remove(&9).unwrap_or_default(),
            )
        };
        assert_eq!(at(&d, 4, 0), (vec![(1, 10), (1, 11)], vec![]));
        assert_eq!(
            at(&d, 6, 1),
            (vec![(1, 10), (1, 11), (2, 10)], vec![(2, 10)])
        );
        // The held push is applied: from then on a checkpoint at its version carries it.
        d.applied(1, 12, 5, 6);
        d.applied(1, 10, 5, 9);
        assert_eq!(at(&d, 6, 1).0, vec![(1, 10), (1, 11), (2, 10), (1, 12)]);
        // Hand-over keeps the versions.
        let mut moved: Vec<Applied> = d.export(|s| s == 5);
        moved.sort_unstable();
        assert_eq!(
            moved,
            vec![(1, 10, 5, 3), (1, 11, 5, 4), (1, 12, 5, 6), (2, 10, 5, 5)]
        );
        // At most CKPT_APPLIED_KEEP per part, the latest by version.
        let mut d = Dedup::default();
        for op in 1..=(CKPT_APPLIED_KEEP as u64 + 10) {
            d.first(3, op, 5, op);
        }
        let kept = at(&d, u64::MAX - 1, 0).0;
        assert_eq!(kept.len(), CKPT_APPLIED_KEEP);
        assert_eq!(kept.first(), Some(&(3, 11)));
        assert_eq!(kept.last(), Some(&(3, CKPT_APPLIED_KEEP as u64 + 10)));
    }

    /// Past DEDUP_KEEP records of a worker, its oldest operation's records go first (a worker
    /// numbers its operations upwards), whatever order they were recorded in; other workers'
    /// records stay.
    #[test]
    fn dedup_forgets_a_workers_oldest_operations_first() {
        let mut d = Dedup::default();
        let base = 1u64 << 40;
        // Records handed over from another server arrive before this server's own, older
        // operations included.
        assert!(d.first(1, base + 3, 7, 1));
        assert!(d.first(2, 5, 7, 1));
        for op in (base + 10)..(base + 10 + DEDUP_KEEP as u64) {
            assert!(d.first(1, op, 9, 2));
        }
        // DEDUP_KEEP + 1 records: the lowest op went.
        assert!(!d.seen(1, base + 3, 7));
        assert!(d.seen(1, base + 10, 9));
        assert!(d.first(1, base + 2, 7, 3), "forgotten, so recorded anew");
        // Recorded and at once the oldest again: dropped as the set is over its bound.
        assert!(!d.seen(1, base + 2, 7));
        assert!(d.first(1, base + 10 + DEDUP_KEEP as u64, 9, 4));
        assert!(!d.seen(1, base + 10, 9) && d.seen(1, base + 11, 9));
        assert!(!d.first(1, base + 11, 9, 5), "still recorded");
        assert!(d.seen(2, 5, 7), "another worker's records are its own");
        assert_eq!(d.seen.get(&1).map(|s| s.len()), Some(DEDUP_KEEP));
    }
}
