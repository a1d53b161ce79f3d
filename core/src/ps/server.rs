//! The push/pull server: owns the key parts the ring gives it, replicates every update to the
//! next server(s) of the ring before acknowledging it, and hands state over when the view
//! changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::chan::{close_all, Chan, Incoming, Limits, Outgoing};
use super::checkpoint::{self, Manifest, PartMeta};
use super::node::{connect_to, Cred, Node, Peer, ViewBook};
use super::pool::BufPool;
use super::shard::Ring;
use super::store::{Consistency, Event, KeyDump, Store};
use super::wire::{parts_len, permitted, Msg, PartRef, CLIENT_HDR, MAX_CKPT_CHUNK};
use super::PsOptions;
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
    chans: HashMap<u64, Arc<Chan>>,
    /// store request id → (member, client request, part index, user key)
    reqs: HashMap<u64, (u64, u64, usize, u64)>,
    aggs: HashMap<(u64, u64), Agg>,
    next_sreq: u64,
    rep_seq: u64,
    /// Replication sequence → (worker, request, replica server).
    rep_wait: HashMap<u64, (u64, u64, u64)>,
    changed_at: Instant,
    dedup: Dedup,
    /// Further live channels with members that also have one in `chans`.
    extra: Vec<(u64, Arc<Chan>)>,
    /// Pulls of keys that did not exist when they arrived: (store request, user key, store
    /// key, since). They wait for an init at most [`UNKNOWN_KEY_GRACE`].
    unknown_pulls: Vec<(u64, u64, u64, Instant)>,
    /// Servers whose connection broke in this view: not reconnected until the view changes.
    lost: std::collections::HashSet<u64>,
    /// Every part known to exist in the group (store key → user key, part index): created on
    /// some server and announced to all ([`Msg::Keys`]).
    dir: HashMap<u64, (u64, u32)>,
    /// Parts every copy of which was lost (store key → why): their pulls, pushes and inits fail
    /// for the rest of the job.
    lost_parts: HashMap<u64, String>,
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
#[derive(Default)]
struct Dedup {
    seen: HashMap<u64, Recent>,
}

/// An applied part of a worker's operation: (worker, op, part).
type Applied = (u64, u64, u64);

/// The (op, part) pairs of one worker, as a set and in arrival order.
type Recent = (
    std::collections::HashSet<(u64, u64)>,
    std::collections::VecDeque<(u64, u64)>,
);

/// Applied parts remembered per worker.
const DEDUP_KEEP: usize = 1 << 16;

impl Dedup {
    /// Whether (worker, op, part) was applied before. Op 0 is never deduplicated.
    fn seen(&self, worker: u64, op: u64, skey: u64) -> bool {
        op != 0
            && self
                .seen
                .get(&worker)
                .is_some_and(|(set, _)| set.contains(&(op, skey)))
    }

    /// The records of the parts `pick` selects, as (worker, op, part).
    fn export(&self, pick: impl Fn(u64) -> bool) -> Vec<Applied> {
        let mut out = Vec::new();
        for (w, (_, order)) in &self.seen {
            out.extend(
                order
                    .iter()
                    .filter(|(_, s)| pick(*s))
                    .map(|(op, s)| (*w, *op, *s)),
            );
        }
        out
    }

    /// Records (worker, op, part) as applied; false if it was recorded before. Op 0 is never
    /// deduplicated.
    fn first(&mut self, worker: u64, op: u64, skey: u64) -> bool {
        if op == 0 {
            return true;
        }
        let (set, order) = self.seen.entry(worker).or_default();
        if !set.insert((op, skey)) {
            return false;
        }
        order.push_back((op, skey));
        if order.len() > DEDUP_KEEP {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
        true
    }
}

/// Bytes at an offset of a message body: (offset, length).
type Span = (usize, usize);

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
/// the header, in chunks of at most half this; see [`apply_view`]).
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
            Some(dir) => Some((dir.clone(), open_restore(dir, &opts)?)),
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
        let mut directory = HashMap::new();
        if let Some((dir, m)) = &restore {
            directory = load_restore(node.me, &view, &opts, dir, m, &mut store)?;
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
                chans: HashMap::new(),
                reqs: HashMap::new(),
                aggs: HashMap::new(),
                next_sreq: 1,
                rep_seq: 1,
                rep_wait: HashMap::new(),
                // The first view of a group hands nothing over; joining a running group
                // (epoch > 1) is a change: parts are on their way to this server.
                changed_at: if view.epoch > 1 {
                    Instant::now()
                } else {
                    Instant::now()
                        .checked_sub(Duration::from_secs(3600))
                        .unwrap_or_else(Instant::now)
                },
                dedup: Dedup::default(),
                extra: Vec::new(),
                unknown_pulls: Vec::new(),
                lost: std::collections::HashSet::new(),
                dir: directory,
                lost_parts: HashMap::new(),
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

/// Reads and checks the checkpoint in `dir` (manifest and every file) for `BRAID_PS_RESTORE`.
fn open_restore(dir: &std::path::Path, opts: &PsOptions) -> Result<Manifest> {
    let t0 = Instant::now();
    let what = |e: String| {
        Error::InvalidArgument(format!(
            "BRAID_PS_RESTORE={}: {e}; this server does not start",
            dir.display()
        ))
    };
    let m = checkpoint::read_manifest(dir).map_err(what)?;
    if m.partition_bytes != opts.partition_bytes as u64 {
        return Err(what(format!(
            "the checkpoint was made with BRAID_PS_PARTITION_BYTES={}, this server uses {} (keys \
             would split into other parts)",
            m.partition_bytes, opts.partition_bytes
        )));
    }
    checkpoint::verify_files(dir, &m).map_err(what)?;
    let bytes: u64 = m.files.iter().map(|f| f.bytes).sum();
    tracing::info!(target: "braid::ps", "restore: checkpoint {} in {} checked: {} file(s), {} part(s), {bytes} bytes, version {}..{} ({:.2} s)", m.id, dir.display(), m.files.len(), m.parts.len(), m.version, m.max_version, t0.elapsed().as_secs_f64());
    Ok(m)
}

/// Loads the parts of a checked checkpoint that server `me` holds on the ring of `view` (owner
/// or replica) into `store`; returns the key directory of every part of the checkpoint.
fn load_restore(
    me: u64,
    view: &View,
    opts: &PsOptions,
    dir: &std::path::Path,
    m: &Manifest,
    store: &mut Store,
) -> Result<HashMap<u64, (u64, u32)>> {
    let ring = ring_of(view);
    let what = |e: String| {
        Error::InvalidArgument(format!(
            "BRAID_PS_RESTORE={}: {e}; this server does not start",
            dir.display()
        ))
    };
    let loaded = checkpoint::load_parts(dir, m, |s| ring.owners(s, opts.replicas).contains(&me))
        .map_err(what)?;
    let mut dumps = Vec::with_capacity(loaded.len());
    for (e, data) in loaded {
        let dt = DataType::parse(&e.dtype)
            .ok_or_else(|| what(format!("key {} part {}: dtype {}", e.k, e.p, e.dtype)))?;
        dumps.push(KeyDump::restored(e.s, dt, e.version, data)?);
    }
    let n = dumps.len();
    let _ = store.import(dumps);
    if m.mode != mode_name(opts.consistency) {
        tracing::warn!(target: "braid::ps", "server {me}: restoring a checkpoint of a group in {} mode into {} mode", m.mode, mode_name(opts.consistency));
    }
    tracing::info!(target: "braid::ps", "server {me}: restored {n} of {} part(s) of checkpoint {} (version {}..{}) from {}", m.parts.len(), m.id, m.version, m.max_version, dir.display());
    Ok(m.parts.iter().map(|p| (p.s, (p.k, p.p))).collect())
}

/// The name of a consistency mode as `BRAID_PS_MODE` spells it.
pub(crate) fn mode_name(c: Consistency) -> String {
    match c {
        Consistency::Sync => "sync".into(),
        Consistency::Async => "async".into(),
        Consistency::Bounded(t) => format!("bounded:{t}"),
    }
}

/// Takes in a checkpoint request from worker `from` (see [`super`], "Checkpoints, exactly").
fn accept_checkpoint(
    inner: &SInner,
    st: &mut SState,
    from: u64,
    req: u64,
    id: &str,
    dir: &str,
) -> std::result::Result<(), String> {
    if !checkpoint::valid_id(id) {
        return Err(format!("invalid checkpoint id {id:?}"));
    }
    let dir = checkpoint::check_dir(dir)?;
    if let Some(w) = &st.ckpt_writing {
        return Err(format!(
            "server {} is still writing checkpoint {w}: checkpoint {id} not taken",
            inner.me
        ));
    }
    if let Some(j) = &st.ckpt {
        return Err(format!(
            "server {} is taking checkpoint {}: checkpoint {id} not taken",
            inner.me, j.id
        ));
    }
    let me = Some(inner.me);
    if let Some((k, p)) = st
        .dir
        .iter()
        .find(|(s, _)| st.ring.owner(**s) == me && st.store.version(**s).is_none())
        .map(|(_, kp)| *kp)
    {
        return Err(format!(
            "key {k} part {p} has no copy on its owner, server {} (lost, or on its way after a \
             view change): checkpoint {id} not taken",
            inner.me
        ));
    }
    let sync = inner.opts.consistency == Consistency::Sync;
    let targets: Vec<(u64, u64)> = st
        .store
        .keys()
        .filter(|s| st.ring.owner(*s) == me)
        .map(|s| {
            let v = st.store.version(s).unwrap_or(0);
            let t = if sync {
                st.store.last_round(s, from).map_or(v, |r| r.max(v))
            } else {
                v
            };
            (s, t)
        })
        .collect();
    st.ckpt = Some(CkptJob {
        worker: from,
        req,
        id: id.to_string(),
        dir,
        targets,
        epoch: st.view.epoch,
        since: Instant::now(),
    });
    Ok(())
}

/// Starts writing the pending checkpoint once every part reached its version: each part's
/// version is pinned in the store (kept readable while the store goes on), and a thread copies
/// the parts one at a time, each under the state lock, and writes them. Fails it (answering
/// the worker) on a view change, a version no longer held, or after the operation timeout.
fn poll_checkpoint(inner: &Arc<SInner>, st: &mut SState, outbox: &mut Vec<Out>) {
    let Some(job) = &st.ckpt else {
        return;
    };
    let fail = |job: &CkptJob, msg: String, outbox: &mut Vec<Out>| {
        tracing::warn!(target: "braid::ps", "server {}: checkpoint {}: {msg}", inner.me, job.id);
        outbox.push((
            job.worker,
            i32::MAX,
            Msg::Fail {
                req: job.req,
                msg,
                retry: false,
            },
            Vec::new(),
        ));
    };
    if job.epoch != st.view.epoch {
        let msg = format!(
            "the view changed (epoch {} to {}) during checkpoint {}: not taken",
            job.epoch, st.view.epoch, job.id
        );
        if let Some(job) = st.ckpt.take() {
            fail(&job, msg, outbox);
        }
        return;
    }
    let ready = job
        .targets
        .iter()
        .all(|(s, t)| st.store.version(*s).map_or(true, |v| v >= *t));
    if !ready {
        if job.since.elapsed() > inner.timeout {
            let msg = format!(
                "the sync rounds checkpoint {} covers did not close within {:.0} s",
                job.id,
                inner.timeout.as_secs_f64()
            );
            if let Some(job) = st.ckpt.take() {
                fail(&job, msg, outbox);
            }
        }
        return;
    }
    let Some(job) = st.ckpt.take() else {
        return;
    };
    let mut metas = Vec::with_capacity(job.targets.len());
    let mut missing = None;
    for &(s, t) in &job.targets {
        let Some(&(k, p)) = st.dir.get(&s) else {
            missing = Some(format!(
                "part {s:#x} is not in the key directory: checkpoint {} not taken",
                job.id
            ));
            break;
        };
        let (Some(len), Some(dtype)) = (
            st.store.read_at(s, t).map(|d| d.len() as u64),
            st.store.dtype(s),
        ) else {
            missing = Some(format!(
                "key {k} part {p}: version {t} is no longer held (parts keep their last {} \
                 versions): checkpoint {} not taken",
                inner.opts.history.max(1),
                job.id
            ));
            break;
        };
        st.store.pin(s, t);
        metas.push(PartMeta {
            s,
            k,
            p,
            dtype,
            version: t,
            len,
        });
    }
    if let Some(msg) = missing {
        for m in &metas {
            st.store.unpin(m.s);
        }
        fail(&job, msg, outbox);
        return;
    }
    let known = st.dir.len() as u64;
    let epoch = st.view.epoch;
    st.ckpt_writing = Some(job.id.clone());
    let writer = inner.clone();
    let (worker, req, id) = (job.worker, job.req, job.id.clone());
    let spawned = std::thread::Builder::new()
        .name(format!("braid-ps-ckpt-{}", inner.me))
        .spawn(move || write_checkpoint(writer, job, metas, epoch, known));
    if let Err(e) = spawned {
        st.ckpt_writing = None;
        let job = CkptJob {
            worker,
            req,
            id,
            dir: std::path::PathBuf::new(),
            targets: Vec::new(),
            epoch,
            since: Instant::now(),
        };
        // The pins go with the thread that was not started.
        for s in st.store.keys().collect::<Vec<_>>() {
            st.store.unpin(s);
        }
        fail(
            &job,
            format!("cannot start the checkpoint writer thread: {e}"),
            outbox,
        );
    }
}

/// The checkpoint writer thread: copies each part at its pinned version under the state lock
/// (one part per lock hold, into a reused buffer), unpins it and writes it; then answers the
/// worker with the part entries and the file's entry (or the failure).
fn write_checkpoint(
    inner: Arc<SInner>,
    job: CkptJob,
    metas: Vec<PartMeta>,
    epoch: u64,
    known: u64,
) {
    let t0 = Instant::now();
    let mut longest = Duration::ZERO;
    let res = checkpoint::write_server_file(&job.dir, &job.id, inner.me, &metas, |i, buf| {
        let m = &metas[i];
        let mut st = lock(&inner.st);
        let held = Instant::now();
        let r = match st.store.read_at(m.s, m.version) {
            Some(d) => {
                buf.extend_from_slice(d);
                Ok(())
            }
            None => Err(format!(
                "key {} part {} left this server during the checkpoint",
                m.k, m.p
            )),
        };
        st.store.unpin(m.s);
        longest = longest.max(held.elapsed());
        r
    });
    let bytes: u64 = metas.iter().map(|m| m.len).sum();
    let write = t0.elapsed();
    let mut out = Vec::new();
    match res {
        Ok((file, parts)) => {
            tracing::info!(target: "braid::ps", "server {}: checkpoint {}: {} part(s), {bytes} bytes written to {} in {:.3} s (longest copy under the state lock {:.6} s)", inner.me, job.id, parts.len(), job.dir.join(&file.name).display(), write.as_secs_f64(), longest.as_secs_f64());
            for c in parts.chunks(MAX_CKPT_CHUNK) {
                out.push((
                    job.worker,
                    i32::MAX,
                    Msg::CkptParts {
                        req: job.req,
                        parts: c.to_vec(),
                    },
                    Vec::new(),
                ));
            }
            out.push((
                job.worker,
                i32::MAX,
                Msg::Checkpointed {
                    req: job.req,
                    file,
                    epoch,
                    known,
                    copy_us: longest.as_micros() as u64,
                    write_us: write.as_micros() as u64,
                },
                Vec::new(),
            ));
        }
        Err(e) => {
            tracing::error!(target: "braid::ps", "server {}: checkpoint {}: {e}", inner.me, job.id);
            out.push((
                job.worker,
                i32::MAX,
                Msg::Fail {
                    req: job.req,
                    msg: format!("server {}: checkpoint {}: {e}", inner.me, job.id),
                    retry: false,
                },
                Vec::new(),
            ));
        }
    }
    {
        let mut st = lock(&inner.st);
        for m in &metas {
            st.store.unpin(m.s);
        }
        st.ckpt_writing = None;
    }
    flush(&inner, out, Vec::new());
}

/// Fails a pending checkpoint whose deadline passed (called by the watcher).
fn expire_checkpoint(inner: &Arc<SInner>) {
    let mut out = Vec::new();
    {
        let mut guard = lock(&inner.st);
        let st = &mut *guard;
        if st.ckpt.is_none() {
            return;
        }
        poll_checkpoint(inner, st, &mut out);
    }
    flush(inner, out, Vec::new());
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
        match weak.upgrade() {
            Some(inner) => handle(&inner, from, msg, m.body()),
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
    let c = Arc::new(Chan::start(
        conn,
        &format!("s{me}-{from}"),
        limits,
        on_msg,
        on_close,
    )?);
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

/// Handles one message from member (or reader) `from`, whose role [`permitted`] it.
/// `Err(reason)`: a protocol error (a part list that does not add up); the caller closes the
/// connection with that reason.
fn handle(
    inner: &Arc<SInner>,
    from: u64,
    msg: Msg,
    body: &[u8],
) -> std::result::Result<(), String> {
    if inner.stop.load(Ordering::SeqCst) {
        // Leaving: the replicas take these parts over; the worker retries there after the
        // view change (what this server would apply now could be lost with it).
        if let Msg::Init { req, .. }
        | Msg::Push { req, .. }
        | Msg::Pull { req, .. }
        | Msg::PushState { req, .. }
        | Msg::PullState { req, .. } = msg
        {
            let fail = Msg::Fail {
                req,
                msg: format!("server {} is leaving: retry", inner.me),
                retry: true,
            };
            flush(inner, vec![(from, 0, fail, Vec::new())], Vec::new());
            return Ok(());
        }
    }
    let mut outbox: Vec<Out> = Vec::new();
    let mut reps: Vec<(u64, Msg, Arc<Vec<u8>>)> = Vec::new();
    // Parts created here, announced to every other server.
    let mut announced: Vec<(u64, u64, u32)> = Vec::new();
    {
        let mut guard = lock(&inner.st);
        let st = &mut *guard;
        let msg = match msg {
            Msg::Init {
                req,
                op,
                prio,
                dtype,
                parts,
            } => Ok((Write::Init, req, op, prio, dtype, parts)),
            Msg::Push {
                req,
                op,
                prio,
                dtype,
                parts,
            } => Ok((Write::Push, req, op, prio, dtype, parts)),
            Msg::PushState {
                req,
                op,
                prio,
                dtype,
                parts,
            } => Ok((Write::State, req, op, prio, dtype, parts)),
            other => Err(other),
        };
        let msg = match msg {
            Ok((write, req, wop, prio, dtype, parts)) => {
                let is_init = write == Write::Init;
                let kind = if is_init { Kind::Init } else { Kind::Push };
                let Some(dt) = dtype_of(&dtype) else {
                    outbox.push((
                        from,
                        0,
                        Msg::Fail {
                            req,
                            msg: format!("unknown dtype {dtype}"),
                            retry: false,
                        },
                        Vec::new(),
                    ));
                    flush(inner, outbox, reps);
                    return Ok(());
                };
                let total = parts_len(&parts).ok_or_else(|| {
                    format!(
                        "request {req}: {} parts whose lengths overflow or are too many",
                        parts.len()
                    )
                })?;
                if total != body.len() {
                    outbox.push((
                        from,
                        0,
                        Msg::Fail {
                            req,
                            msg: format!(
                                "message body has {} bytes, its parts say {total}",
                                body.len()
                            ),
                            retry: false,
                        },
                        Vec::new(),
                    ));
                    flush(inner, outbox, reps);
                    return Ok(());
                }
                st.aggs.insert(
                    (from, req),
                    Agg {
                        kind,
                        prio,
                        n: parts.len(),
                        done: 0,
                        versions: vec![0; parts.len()],
                        data: Vec::new(),
                        // Held at 1 while the parts are applied: the store acknowledges an
                        // async push at once, and the answer must not go out before the
                        // replications below are counted (an owner dying right after would
                        // lose an acknowledged update).
                        reps: 1,
                        failed: None,
                    },
                );
                if matches!(inner.opts.rule, super::UpdateRule::Custom(_)) {
                    let mut km = lock(&inner.keymap);
                    for p in &parts {
                        km.insert(p.s, p.k);
                    }
                }
                let mut off = 0;
                // Per replica: its parts, and where their bytes are in the body.
                let mut per_replica: BTreeMap<u64, (Vec<PartRef>, Vec<Span>)> = BTreeMap::new();
                for (i, p) in parts.iter().enumerate() {
                    let data = &body[off..off + p.n];
                    off += p.n;
                    let sreq = st.next_sreq;
                    st.next_sreq += 1;
                    st.reqs.insert(sreq, (from, req, i, p.k));
                    // Recorded only once applied (below): a part refused with "retry" must be
                    // applied when it comes back.
                    let dup = st.dedup.seen(from, wop, p.s);
                    let owner = st.ring.owner(p.s);
                    let evs = if owner != Some(inner.me) {
                        // Not (or no longer) this part's owner: the sender routes by an older
                        // view. Applying it here would land on a copy the owner never sees.
                        vec![Event::Error {
                            req: sreq,
                            key: p.s,
                            msg: format!(
                                "key {} part {} moved away: its owner at epoch {} is server {:?}",
                                p.k, p.p, st.view.epoch, owner
                            ),
                        }]
                    } else if let Some((why, _)) = missing_part(st, p.s) {
                        // Exists in the group but no copy is here: on its way (retry) or lost
                        // (an init must not create it afresh, a push has nothing to add to).
                        vec![Event::Error {
                            req: sreq,
                            key: p.s,
                            msg: why,
                        }]
                    } else if let Some(msg) = total_mismatch(st, p) {
                        vec![Event::Error {
                            req: sreq,
                            key: p.s,
                            msg,
                        }]
                    } else if dup {
                        // A retry of a part already applied (its acknowledgement was lost):
                        // acknowledge again without applying it twice, with the version that
                        // push leads to (sync: its round, perhaps still open).
                        vec![Event::PushAck {
                            req: sreq,
                            key: p.s,
                            version: st.store.ack_version(p.s, from).unwrap_or(0),
                        }]
                    } else if is_init {
                        match st.store.init(p.s, dt, data) {
                            Ok((created, evs)) => {
                                st.store.set_total(p.s, p.t);
                                if created {
                                    st.dir.insert(p.s, (p.k, p.p));
                                    announced.push((p.s, p.k, p.p));
                                }
                                let v = st.store.version(p.s).unwrap_or(0);
                                let mut e = evs;
                                e.push(Event::PushAck {
                                    req: sreq,
                                    key: p.s,
                                    version: v,
                                });
                                e
                            }
                            Err(e) => vec![Event::Error {
                                req: sreq,
                                key: p.s,
                                msg: e.to_string(),
                            }],
                        }
                    } else if write == Write::State {
                        match st.store.set_state(p.s, dt, data) {
                            Ok(()) => vec![Event::PushAck {
                                req: sreq,
                                key: p.s,
                                version: st.store.version(p.s).unwrap_or(0),
                            }],
                            Err(e) => vec![Event::Error {
                                req: sreq,
                                key: p.s,
                                msg: e.to_string(),
                            }],
                        }
                    } else {
                        match st.store.push(sreq, from, p.s, dt, data) {
                            Ok(evs) => evs,
                            Err(e) => vec![Event::Error {
                                req: sreq,
                                key: p.s,
                                msg: e.to_string(),
                            }],
                        }
                    };
                    let refused = evs
                        .iter()
                        .any(|e| matches!(e, Event::Error { req, .. } if *req == sreq));
                    apply_events(st, evs, &mut outbox);
                    if refused {
                        // Nothing applied here: nothing to replicate.
                        continue;
                    }
                    // A retry of a part applied before is replicated again (replicas skip what
                    // they hold): the first copy may have reached this server only as a
                    // replica, after it had seeded a new replica of its own.
                    if !dup {
                        st.dedup.first(from, wop, p.s);
                    }
                    for r in st.ring.owners(p.s, inner.opts.replicas).into_iter().skip(1) {
                        if r != inner.me {
                            let e = per_replica.entry(r).or_default();
                            e.0.push(*p);
                            e.1.push((off - p.n, p.n));
                        }
                    }
                }
                for (r, (ps, at)) in per_replica {
                    // The replica's copy of its parts, in a pooled buffer (a fresh one per
                    // push cost a page fault per 4 KiB).
                    let total = at.iter().map(|(_, n)| n).sum();
                    let data = lock(&inner.rep_bodies).fill(total, |b| {
                        for (o, n) in &at {
                            b.extend_from_slice(&body[*o..*o + *n]);
                        }
                    });
                    let seq = st.rep_seq;
                    st.rep_seq += 1;
                    st.rep_wait.insert(seq, (from, req, r));
                    if let Some(a) = st.aggs.get_mut(&(from, req)) {
                        a.reps += 1;
                    }
                    let op = match write {
                        Write::Init => Msg::Init {
                            req: 0,
                            op: wop,
                            prio: 0,
                            dtype: dtype.clone(),
                            parts: ps,
                        },
                        Write::Push => Msg::Push {
                            req: 0,
                            op: wop,
                            prio: 0,
                            dtype: dtype.clone(),
                            parts: ps,
                        },
                        Write::State => Msg::PushState {
                            req: 0,
                            op: wop,
                            prio: 0,
                            dtype: dtype.clone(),
                            parts: ps,
                        },
                    };
                    reps.push((
                        r,
                        Msg::Replicate {
                            seq,
                            worker: from,
                            op: Box::new(op),
                            rule: if write == Write::Push {
                                st.rule_spec.clone()
                            } else {
                                None
                            },
                        },
                        data,
                    ));
                }
                if let Some(a) = st.aggs.get_mut(&(from, req)) {
                    a.reps = a.reps.saturating_sub(1);
                }
                complete(st, from, req, &mut outbox);
                // A round this push closed may be what a pending checkpoint waits for.
                poll_checkpoint(inner, st, &mut outbox);
                None
            }
            Err(other) => Some(other),
        };
        let Some(msg) = msg else {
            drop(guard);
            flush(inner, outbox, reps);
            announce(inner, announced);
            return Ok(());
        };
        match msg {
            Msg::Pull {
                req,
                epoch: _,
                prio,
                parts,
                min,
                at,
            } => {
                if !matches!(parts_len(&parts), Some(n) if n <= inner.opts.partition_bytes) {
                    return Err(format!(
                        "pull {req}: {} parts, more than a request may ask for",
                        parts.len()
                    ));
                }
                st.aggs.insert(
                    (from, req),
                    Agg {
                        kind: Kind::Pull,
                        prio,
                        n: parts.len(),
                        done: 0,
                        versions: vec![0; parts.len()],
                        data: vec![Arc::default(); parts.len()],
                        reps: 0,
                        failed: None,
                    },
                );
                for (i, p) in parts.iter().enumerate() {
                    let sreq = st.next_sreq;
                    st.next_sreq += 1;
                    st.reqs.insert(sreq, (from, req, i, p.k));
                    let lost = st.lost_parts.get(&p.s).cloned();
                    let evs = match at {
                        _ if lost.is_some() => vec![Event::Error {
                            req: sreq,
                            key: p.s,
                            msg: lost.unwrap_or_default(),
                        }],
                        Some(v) => match st.store.read_shared_at(p.s, v) {
                            Some(d) if d.len() == p.n => vec![Event::Value {
                                req: sreq,
                                key: p.s,
                                version: v,
                                data: d,
                            }],
                            Some(d) => vec![Event::Error {
                                req: sreq,
                                key: p.s,
                                msg: format!(
                                    "key {} part {} has {} bytes, the request says {}",
                                    p.k,
                                    p.p,
                                    d.len(),
                                    p.n
                                ),
                            }],
                            None => vec![Event::Error {
                                req: sreq,
                                key: p.s,
                                msg: format!(
                                    "version {v} of key {} is not held (evicted or not reached)",
                                    p.k
                                ),
                            }],
                        },
                        None if st.ring.owner(p.s) != Some(inner.me) => vec![Event::Error {
                            req: sreq,
                            key: p.s,
                            msg: format!(
                                "key {} part {} moved away: this server does not own it at epoch {}",
                                p.k, p.p, st.view.epoch
                            ),
                        }],
                        None if missing_part(st, p.s).is_some() => vec![Event::Error {
                            req: sreq,
                            key: p.s,
                            msg: missing_part(st, p.s).map(|x| x.0).unwrap_or_default(),
                        }],
                        None if st.store.get(p.s).is_some_and(|(_, d)| d.len() != p.n) => {
                            let held = st.store.get(p.s).map_or(0, |(_, d)| d.len());
                            vec![Event::Error {
                                req: sreq,
                                key: p.s,
                                msg: format!(
                                    "key {} part {} has {} bytes, the pull asked for {}",
                                    p.k, p.p, held, p.n
                                ),
                            }]
                        }
                        None if total_mismatch(st, p).is_some() => vec![Event::Error {
                            req: sreq,
                            key: p.s,
                            msg: total_mismatch(st, p).unwrap_or_default(),
                        }],
                        None => match st.store.pull(sreq, from, p.s, min) {
                            Ok(e) => {
                                if st.store.version(p.s).is_none() {
                                    // Waits for an init; fails clearly if none comes soon.
                                    st.unknown_pulls.push((sreq, p.k, p.s, Instant::now()));
                                }
                                e
                            }
                            Err(e) => vec![Event::Error {
                                req: sreq,
                                key: p.s,
                                msg: e.to_string(),
                            }],
                        },
                    };
                    apply_events(st, evs, &mut outbox);
                }
                complete(st, from, req, &mut outbox);
            }
            Msg::SnapVer { req } => {
                outbox.push((
                    from,
                    0,
                    Msg::Snap {
                        req,
                        version: st.store.snapshot_version(),
                    },
                    Vec::new(),
                ));
            }
            Msg::Replicate {
                seq,
                worker,
                op,
                rule,
            } => {
                let mut off = 0;
                let op = match *op {
                    Msg::Init {
                        op, dtype, parts, ..
                    } => Some((Write::Init, op, dtype, parts)),
                    Msg::Push {
                        op, dtype, parts, ..
                    } => Some((Write::Push, op, dtype, parts)),
                    Msg::PushState {
                        op, dtype, parts, ..
                    } => Some((Write::State, op, dtype, parts)),
                    _ => None,
                };
                let Some((write, wop, dtype, parts)) = op else {
                    return Err(format!("replication {seq} carries no init or push"));
                };
                let is_init = write == Write::Init;
                // The rule the owner applied this push with (parsed once per change).
                let owner_rule = match rule {
                    None => None,
                    Some(spec) => {
                        let cached = st.rep_rule.as_ref().is_some_and(|(s, _)| *s == spec);
                        if !cached {
                            let r = super::UpdateRule::parse(&spec)
                                .map_err(|e| format!("replication {seq}: {e}"))?;
                            st.rep_rule = Some((spec, r));
                        }
                        st.rep_rule.as_ref().map(|(_, r)| r.clone())
                    }
                };
                if parts_len(&parts) != Some(body.len()) {
                    return Err(format!(
                        "replication {seq}: {} parts do not add up to its {} bytes",
                        parts.len(),
                        body.len()
                    ));
                }
                {
                    if matches!(inner.opts.rule, super::UpdateRule::Custom(_)) {
                        let mut km = lock(&inner.keymap);
                        for p in &parts {
                            km.insert(p.s, p.k);
                        }
                    }
                    {
                        if let Some(dt) = dtype_of(&dtype) {
                            for p in &parts {
                                // In bounds: the lengths add up to the body's (checked above).
                                let Some(data) = body.get(off..off + p.n) else {
                                    break;
                                };
                                off += p.n;
                                if is_init {
                                    st.dir.insert(p.s, (p.k, p.p));
                                }
                                if !st.dedup.first(worker, wop, p.s) {
                                    continue;
                                }
                                let r = match write {
                                    Write::Init => {
                                        let r = st.store.init(p.s, dt, data).map(|x| x.1);
                                        st.store.set_total(p.s, p.t);
                                        r
                                    }
                                    Write::Push => st.store.push_with(
                                        0,
                                        worker,
                                        p.s,
                                        dt,
                                        data,
                                        owner_rule.as_ref(),
                                    ),
                                    Write::State => {
                                        st.store.set_state(p.s, dt, data).map(|()| Vec::new())
                                    }
                                };
                                let evs = r.unwrap_or_else(|e| {
                                    // Only when this copy and the owner's disagree on the
                                    // view (a part not seeded here yet): the owner still
                                    // holds the update.
                                    tracing::warn!(target: "braid::ps", "server {}: replica of key {} part {} from server {from} not applied: {e}", inner.me, p.k, p.p);
                                    Vec::new()
                                });
                                apply_events(st, evs, &mut outbox);
                            }
                        }
                    }
                }
                outbox.push((from, i32::MAX, Msg::RepAck { seq }, Vec::new()));
            }
            Msg::RepAck { seq } => {
                if let Some((w, req, _)) = st.rep_wait.remove(&seq) {
                    if let Some(a) = st.aggs.get_mut(&(w, req)) {
                        a.reps = a.reps.saturating_sub(1);
                    }
                    complete(st, w, req, &mut outbox);
                }
            }
            Msg::Transfer { dumps, seen, keys } => {
                match serde_json::from_value::<Vec<KeyDump>>(dumps) {
                    Ok(d) => {
                        let n = d.len();
                        for (s, k, p) in keys {
                            st.dir.insert(s, (k, p));
                        }
                        for (w, op, skey) in seen {
                            st.dedup.first(w, op, skey);
                        }
                        let evs = st.store.import(d);
                        apply_events(st, evs, &mut outbox);
                        tracing::info!(target: "braid::ps", "server {}: received {n} key part(s) from server {from}", inner.me);
                    }
                    Err(e) => return Err(format!("undecodable transfer: {e}")),
                }
            }
            Msg::Keys { add } => {
                for (s, k, p) in add {
                    st.dir.insert(s, (k, p));
                }
            }
            Msg::Checkpoint { req, id, dir } => {
                match accept_checkpoint(inner, st, from, req, &id, &dir) {
                    Ok(()) => poll_checkpoint(inner, st, &mut outbox),
                    Err(msg) => {
                        tracing::warn!(target: "braid::ps", "server {}: checkpoint request of worker {from}: {msg}", inner.me);
                        outbox.push((
                            from,
                            i32::MAX,
                            Msg::Fail {
                                req,
                                msg,
                                retry: false,
                            },
                            Vec::new(),
                        ));
                    }
                }
            }
            Msg::SetRule { req, rule } => {
                let r = match st.store.rule() {
                    super::UpdateRule::Custom(_) => Err(format!(
                        "server {} runs a custom (callback) update rule, which cannot be \
                         replaced at run time: rule {rule:?} refused",
                        inner.me
                    )),
                    _ => super::UpdateRule::parse(&rule).map_err(|e| e.to_string()),
                };
                let answer = match r {
                    Ok(new) => {
                        let spec = new.spec();
                        if spec != st.rule_spec {
                            tracing::info!(target: "braid::ps", "server {}: update rule {} (from worker {from})", inner.me, spec.as_deref().unwrap_or("?"));
                        }
                        st.store.set_rule(new);
                        st.rule_spec = spec;
                        Msg::Ack {
                            req,
                            versions: Vec::new(),
                        }
                    }
                    Err(msg) => {
                        tracing::warn!(target: "braid::ps", "server {}: worker {from}: {msg}", inner.me);
                        Msg::Fail {
                            req,
                            msg,
                            retry: false,
                        }
                    }
                };
                if req != 0 {
                    outbox.push((from, i32::MAX, answer, Vec::new()));
                }
            }
            Msg::PullState { req, prio, parts } => {
                if !matches!(parts_len(&parts), Some(n) if n <= inner.opts.partition_bytes) {
                    return Err(format!(
                        "state pull {req}: {} parts, more than a request may ask for",
                        parts.len()
                    ));
                }
                let mut body = Vec::new();
                let mut versions = Vec::with_capacity(parts.len());
                let mut failed = None;
                for p in &parts {
                    let why = if st.ring.owner(p.s) != Some(inner.me) {
                        Some((
                            format!(
                                "key {} part {} moved away: this server does not own it at epoch {}",
                                p.k, p.p, st.view.epoch
                            ),
                            true,
                        ))
                    } else {
                        missing_part(st, p.s)
                    };
                    if let Some(w) = why {
                        failed = Some(w);
                        break;
                    }
                    match st.store.state(p.s) {
                        Some(d) if d.len() == p.n => {
                            body.extend_from_slice(&d);
                            versions.push(st.store.version(p.s).unwrap_or(0));
                        }
                        Some(d) => {
                            failed = Some((
                                format!(
                                    "key {} part {} has {} bytes, the request says {}",
                                    p.k,
                                    p.p,
                                    d.len(),
                                    p.n
                                ),
                                false,
                            ));
                            break;
                        }
                        None => {
                            failed = Some((
                                format!(
                                    "user key {} does not exist (nobody called init for it)",
                                    p.k
                                ),
                                false,
                            ));
                            break;
                        }
                    }
                }
                let answer = match failed {
                    Some((msg, retry)) => {
                        body.clear();
                        Msg::Fail { req, msg, retry }
                    }
                    None => Msg::Values { req, versions },
                };
                let body = if body.is_empty() {
                    Vec::new()
                } else {
                    vec![Arc::new(body)]
                };
                outbox.push((from, prio, answer, body));
            }
            Msg::Bye { reason } => {
                tracing::warn!(target: "braid::ps", "server {}: member {from} closes the connection: {reason}", inner.me);
            }
            // `permitted` lets nothing else reach a server.
            other => return Err(format!("unexpected {} message", other.kind())),
        }
    }
    flush(inner, outbox, reps);
    announce(inner, announced);
    Ok(())
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
fn flush(inner: &Arc<SInner>, outbox: Vec<Out>, reps: Vec<(u64, Msg, Arc<Vec<u8>>)>) {
    for (r, msg, body) in reps {
        match server_chan(inner, r) {
            Some(c) => send(&c, i32::MAX, &msg, body),
            None => {
                // The replica is unreachable: acknowledge without it (logged); the next view
                // change re-seeds a replica. A server that is leaving does not: its copy is
                // about to go, so the worker retries at the next owner instead.
                if let Msg::Replicate { seq, .. } = msg {
                    let mut out = Vec::new();
                    {
                        let mut st = lock(&inner.st);
                        if let Some((w, req, _)) = st.rep_wait.remove(&seq) {
                            let leaving = inner.stop.load(Ordering::SeqCst);
                            if let Some(a) = st.aggs.get_mut(&(w, req)) {
                                a.reps = a.reps.saturating_sub(1);
                                if leaving && a.failed.is_none() {
                                    a.failed = Some((
                                        format!("server {} is leaving: retry", inner.me),
                                        true,
                                    ));
                                }
                            }
                            complete(&mut st, w, req, &mut out);
                        }
                    }
                    flush(inner, out, Vec::new());
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

/// Applies a new view: worker set, ring, hand-over of key parts.
fn apply_view(inner: &Arc<SInner>, view: View) {
    let r = inner.opts.replicas;
    // Hellos of members of the new view are admitted from now on.
    inner.book.record(&view);
    // Connections to every server of the new view first (connecting blocks; the hand-over
    // below must be queued under the state lock, before any replication to the same server).
    let pre: HashMap<u64, Arc<Chan>> = servers_of(&view)
        .into_iter()
        .filter(|(id, _)| *id != inner.me)
        .filter_map(|(id, _)| server_chan_in(inner, id, Some(&view)).map(|c| (id, c)))
        .collect();
    let mut transfers: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut outbox = Vec::new();
    let dead: Vec<Arc<Chan>>;
    {
        let mut guard = lock(&inner.st);
        let st = &mut *guard;
        let old = std::mem::replace(&mut st.ring, ring_of(&view));
        let evs = st.store.set_workers(&workers_of(&view));
        apply_events(st, evs, &mut outbox);
        let keys: Vec<u64> = st.store.keys().collect();
        let mut drop_keys = Vec::new();
        for k in keys {
            let before = old.owners(k, r);
            let after = st.ring.owners(k, r);
            let was_owner = before.first() == Some(&inner.me);
            let now_owner = after.first() == Some(&inner.me);
            // The (new) owner seeds holders that did not have the part. An old owner that
            // lost the part hands it to the new owner (who may be new).
            let sender = now_owner
                || (was_owner && !after.contains(&inner.me))
                || (was_owner
                    && !before.is_empty()
                    && !after.first().is_some_and(|o| before.contains(o)));
            if sender {
                for h in &after {
                    if *h != inner.me && !before.contains(h) {
                        transfers.entry(*h).or_default().push(k);
                    }
                }
            }
            if !after.contains(&inner.me) {
                drop_keys.push(k);
            }
        }
        // Parts every holder of which left (died) are lost: this server, their new owner, fails
        // their requests from now on (the key directory says they existed).
        let alive: std::collections::HashSet<u64> = view.members.iter().map(|m| m.id).collect();
        let mut newly_lost = Vec::new();
        for (&s, &(k, p)) in &st.dir {
            if st.ring.owner(s) != Some(inner.me)
                || st.store.version(s).is_some()
                || st.lost_parts.contains_key(&s)
            {
                continue;
            }
            let before = old.owners(s, r);
            if !before.is_empty() && before.iter().all(|h| !alive.contains(h)) {
                newly_lost.push((
                    s,
                    format!(
                        "key {k} part {p} was lost: every server holding a copy ({before:?}) left \
                         the group by view epoch {} (BRAID_PS_REPLICAS={r}); its value is gone",
                        view.epoch
                    ),
                ));
            }
        }
        for (s, why) in newly_lost {
            tracing::error!(target: "braid::ps", "server {}: {why}", inner.me);
            st.lost_parts.insert(s, why);
        }
        // Servers new in this view learn the key directory.
        let old_servers: std::collections::HashSet<u64> =
            servers_of(&st.view).into_iter().map(|(id, _)| id).collect();
        let newcomers: Vec<u64> = servers_of(&view)
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| *id != inner.me && !old_servers.contains(id))
            .collect();
        let directory: Vec<(u64, u64, u32)> = if newcomers.is_empty() {
            Vec::new()
        } else {
            st.dir.iter().map(|(s, (k, p))| (*s, *k, *p)).collect()
        };
        // Parts this server no longer holds are removed after the hand-over below.
        st.view = view.clone();
        st.changed_at = Instant::now();
        st.lost.clear();
        // A checkpoint waiting for rounds fails: its parts may have moved.
        poll_checkpoint(inner, st, &mut outbox);
        let keep: std::collections::HashSet<u64> = view.members.iter().map(|m| m.id).collect();
        let gone: Vec<u64> = st
            .chans
            .keys()
            .filter(|id| !keep.contains(id))
            .copied()
            .collect();
        dead = gone
            .into_iter()
            .filter_map(|id| st.chans.remove(&id))
            .collect();
        // Requests of workers that are gone are dropped; replications waiting for a replica
        // that is gone count as done (this server still holds the update; the new view's
        // hand-over seeds the next replica from it).
        let mut gone_worker = Vec::new();
        let mut gone_replica = Vec::new();
        st.rep_wait.retain(|_, (w, req, r)| {
            if !keep.contains(w) {
                gone_worker.push((*w, *req));
                false
            } else if !keep.contains(r) {
                gone_replica.push((*w, *req));
                false
            } else {
                true
            }
        });
        for (w, req) in gone_worker {
            st.aggs.remove(&(w, req));
        }
        for (w, req) in gone_replica {
            if let Some(a) = st.aggs.get_mut(&(w, req)) {
                a.reps = a.reps.saturating_sub(1);
            }
            complete(st, w, req, &mut outbox);
        }
        let dumps: Vec<(u64, Vec<KeyDump>, Vec<Applied>)> = transfers
            .iter()
            .map(|(h, ks)| {
                let set: std::collections::HashSet<u64> = ks.iter().copied().collect();
                (
                    *h,
                    st.store.export(|k| set.contains(&k)),
                    st.dedup.export(|k| set.contains(&k)),
                )
            })
            .collect();
        // Parts this server no longer holds go in the same critical section as the export:
        // an update applied here after the export would be acknowledged and lost.
        let drop_set: std::collections::HashSet<u64> = drop_keys.into_iter().collect();
        let evs = st.store.remove(|k| drop_set.contains(&k));
        apply_events(st, evs, &mut outbox);
        // The hand-over is queued before anything else can be sent to those servers (the
        // channels are FIFO within a priority, and replication uses the same priority).
        let mut sends = Vec::new();
        let cap = server_hdr(&inner.opts) / 2;
        for (h, d, seen) in dumps {
            for (chunk, bytes) in chunk_dumps(d, cap) {
                let n = chunk.len();
                if bytes > cap {
                    tracing::error!(target: "braid::ps", "server {}: cannot hand key part {:#x} to server {h}: its state is {bytes} bytes encoded, over the {cap}-byte limit of a hand-over message", inner.me, chunk.first().map_or(0, KeyDump::key));
                    continue;
                }
                let in_chunk: std::collections::HashSet<u64> =
                    chunk.iter().map(KeyDump::key).collect();
                let keys = in_chunk
                    .iter()
                    .filter_map(|s| st.dir.get(s).map(|(k, p)| (*s, *k, *p)))
                    .collect();
                let seen = seen
                    .iter()
                    .filter(|x| in_chunk.contains(&x.2))
                    .copied()
                    .collect();
                match serde_json::to_value(&chunk) {
                    Ok(v) => sends.push((
                        h,
                        n,
                        Msg::Transfer {
                            dumps: v,
                            seen,
                            keys,
                        },
                    )),
                    Err(e) => {
                        tracing::error!(target: "braid::ps", "server {}: cannot encode {n} key part(s): {e}", inner.me)
                    }
                }
            }
        }
        for h in &newcomers {
            for add in directory.chunks(1 << 16) {
                sends.push((*h, 0, Msg::Keys { add: add.to_vec() }));
            }
        }
        for (h, n, m) in sends {
            match pre.get(&h).or_else(|| st.chans.get(&h)) {
                Some(c) => {
                    send(c, i32::MAX, &m, Arc::new(Vec::new()));
                    if n > 0 {
                        tracing::info!(target: "braid::ps", "server {}: handed {n} key part(s) to server {h}", inner.me);
                    }
                }
                None => {
                    tracing::warn!(target: "braid::ps", "server {}: cannot hand {n} key part(s) to server {h}: no connection", inner.me)
                }
            }
        }
        drop(guard);
    }
    close_all(dead);
    flush(inner, outbox, Vec::new());
}

/// Splits key dumps into hand-over messages of at most `cap` encoded bytes each (a single
/// larger dump gets a chunk of its own); with each chunk its encoded size.
fn chunk_dumps(dumps: Vec<KeyDump>, cap: usize) -> Vec<(Vec<KeyDump>, usize)> {
    let mut out: Vec<(Vec<KeyDump>, usize)> = Vec::new();
    for d in dumps {
        let n = serde_json::to_vec(&d).map_or(usize::MAX, |v| v.len().saturating_add(1));
        match out.last_mut() {
            Some((c, b)) if b.saturating_add(n) <= cap => {
                c.push(d);
                *b += n;
            }
            _ => out.push((vec![d], n)),
        }
    }
    out
}

fn spawn_watcher(
    inner: Arc<SInner>,
    client: Option<Arc<crate::membership::Client>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(client) = client else { return };
        while !inner.stop.load(Ordering::SeqCst) {
            expire_unknown_pulls(&inner);
            expire_checkpoint(&inner);
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
                        apply_view(&inner, view);
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
