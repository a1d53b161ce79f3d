//! Set-up: the transports a rank listens on and their handles, rendezvous with the
//! coordinator, and the installation of a view (connections, communicator state).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use braid_transport::mem::{MemFabric, MemTransport};
use braid_transport::region::{Regions, RemoteMaps};
use braid_transport::shm::{ShmOptions, ShmTransport};
use braid_transport::tcp::{TcpOptions, TcpTransport};
use braid_transport::{ConnectHandle, Listener, Transport};

use crate::coll::{order, select};
use crate::config::{Config, TransportKind};
use crate::error::{Error, Result};
use crate::exec::{Exec, Peer};
use crate::membership::{self, ClientOptions, Coordinator, Registration, Role, View};

use super::connect::{
    check_shm_hosts, connect_peers, planned_transports, spawn_acceptor, Dialer, Stash,
};
use super::progress::fail_state;
use super::{lock, Communicator, Inner, Poison, Queue, State};

impl Inner {
    /// An inner that runs nothing (before the first view is installed, or after this member
    /// left): every operation fails with `InvalidUsage`.
    fn placeholder(
        cfg: Config,
        policy: select::Policy,
        member: u64,
        view: View,
        abort: Arc<AtomicBool>,
        regions: Arc<Regions>,
    ) -> Inner {
        let why = if view.rank_of(member).is_some() {
            format!("view epoch {} is not installed", view.epoch)
        } else {
            format!("member {member} left the group at epoch {}", view.epoch)
        };
        Inner {
            rank: 0,
            size: view.members.len(),
            member,
            view,
            policy,
            transport: "none",
            peer_transports: Vec::new(),
            ring: None,
            listen_addr: String::new(),
            state: Mutex::new(State {
                peers: Vec::new(),
                exec: Exec::new(0, cfg.spin, cfg.timeout, abort.clone()),
                seq: 0,
                error: Some(Error::InvalidUsage(why)),
                plans: HashMap::new(),
                last_plan: None,
                remote: RemoteMaps::new(),
                direct_bytes: 0,
            }),
            cfg,
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                outstanding: 0,
                closed: false,
            }),
            qcv: Condvar::new(),
            abort,
            stop: AtomicBool::new(false),
            regions,
            direct: false,
            all_shm: false,
            cma: false,
            poison: Arc::new(Poison::default()),
            dial: None,
        }
    }
}

/// What lazy connections need besides the view: the stash, the job token and the membership
/// client.
type Lazy = (
    Arc<Stash>,
    Option<Vec<u8>>,
    Arc<Mutex<Option<membership::Client>>>,
);

/// Builds the communicator state of an installed view.
#[allow(clippy::too_many_arguments)]
fn assemble(
    cfg: Config,
    policy: select::Policy,
    transports: &[Arc<dyn Transport>],
    handles: &[ConnectHandle],
    view: View,
    rank: usize,
    member: u64,
    peers: Vec<Option<Peer>>,
    peer_transports: Vec<(usize, &'static str)>,
    abort: Arc<AtomicBool>,
    regions: Arc<Regions>,
    lazy: Option<Lazy>,
) -> Inner {
    let size = view.members.len();
    let all_shm =
        peer_transports.len() + 1 == size && peer_transports.iter().all(|(_, t)| *t == "shm");
    let direct = cfg.shm_direct
        && (2..=crate::direct::MAX_RANKS).contains(&size)
        && cfg.transport != TransportKind::Tcp
        && cfg.transport != TransportKind::Ib
        && view
            .members
            .iter()
            .all(|m| m.host_id == view.members[0].host_id);
    // Cross-memory attach for private buffers (BRAID_SHM_CMA): only where peers may attach
    // without weakening this process, or where the user opted in (1).
    let cma = direct
        && all_shm
        && cfg.shm_cma != crate::config::CmaUse::Never
        && {
            let r =
                braid_transport::cma::allow_peers_with(cfg.shm_cma == crate::config::CmaUse::All);
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| match &r {
            Ok(s) => tracing::debug!(target: "braid::init", "cross-memory attach: {s}"),
            Err(s) => tracing::info!(target: "braid::init", "cross-memory attach unavailable: {s}; private buffers use the shm rings"),
        });
            r.is_ok()
        };
    let transport = match peer_transports.first() {
        Some((_, t)) if peer_transports.iter().all(|(_, x)| x == t) => *t,
        Some(_) => "mixed",
        None => transports.first().map(|t| t.name()).unwrap_or("none"),
    };
    let listen_addr = handles
        .iter()
        .find(|h| h.transport == "tcp")
        .or(handles.first())
        .map(|h| String::from_utf8_lossy(&h.addr).into_owned())
        .unwrap_or_default();
    let ring = {
        let hosts: Vec<&str> = view.members.iter().map(|m| m.host_id.as_str()).collect();
        let ring = order::host_ring(&hosts);
        if ring.iter().enumerate().all(|(v, r)| v == *r) {
            None
        } else {
            tracing::info!(target: "braid::topo", "ring order by host: {ring:?}");
            Some(ring)
        }
    };
    let mut exec = Exec::new(rank, cfg.spin, cfg.timeout, abort.clone());
    exec.matcher.budget = cfg.p2p_hold_bytes;
    let dial = lazy.map(|(stash, token, client)| {
        Dialer::new(
            transports.to_vec(),
            stash,
            token,
            client,
            view.clone(),
            rank,
            member,
            cfg.timeout,
            abort.clone(),
            exec.trip.clone(),
        )
    });
    Inner {
        rank,
        size,
        member,
        view,
        policy,
        transport,
        peer_transports,
        ring,
        listen_addr,
        cfg,
        state: Mutex::new(State {
            peers,
            exec,
            seq: 0,
            error: None,
            plans: HashMap::new(),
            last_plan: None,
            remote: RemoteMaps::new(),
            direct_bytes: 0,
        }),
        queue: Mutex::new(Queue {
            jobs: VecDeque::new(),
            outstanding: 0,
            closed: false,
        }),
        qcv: Condvar::new(),
        abort,
        stop: AtomicBool::new(false),
        regions,
        direct,
        all_shm,
        cma,
        poison: Arc::new(Poison::default()),
        dial,
    }
}

/// The membership watcher of an installed view: a later view that drops a member of this one
/// for a failure, or this member losing the coordinator, trips the executor so that waits on
/// such peers fail at once (a graceful leave trips nothing: the leaver takes part until the
/// switch).
fn tripwire(trip: Arc<crate::exec::Tripwire>, ids: Vec<u64>, me: u64) -> membership::WatchFn {
    Box::new(move |w| match w {
        membership::Watch::View(v, why) => {
            if v.rank_of(me).is_none() {
                return;
            }
            let failed: Vec<(u64, String)> = ids
                .iter()
                .filter(|id| v.rank_of(**id).is_none() && why.contains(&format!("failure of {id}")))
                .map(|id| (*id, why.to_string()))
                .collect();
            if !failed.is_empty() {
                trip.drop_members(failed);
            }
        }
        membership::Watch::Isolated(msg) => {
            if let Ok(mut i) = trip.isolated.lock() {
                *i = Some(msg);
            }
            trip.set.store(true, Ordering::SeqCst);
        }
        membership::Watch::Reconnected => {
            if let Ok(mut i) = trip.isolated.lock() {
                *i = None;
            }
        }
        membership::Watch::Failed(id, why) => {
            if ids.contains(&id) && id != me {
                trip.drop_members([(id, why.to_string())]);
            }
        }
    })
}

const HANDLES_MAGIC: &[u8; 4] = b"BRDL";

/// Encodes the connect handles of every transport a rank listens on (the membership handle):
/// magic `BRDL`, a count (u8), then per handle a u16 LE length and `ConnectHandle::encode()`.
pub(crate) fn encode_handles(hs: &[ConnectHandle]) -> Vec<u8> {
    let mut v = HANDLES_MAGIC.to_vec();
    v.push(hs.len().min(255) as u8);
    for h in hs.iter().take(255) {
        let b = h.encode();
        v.extend_from_slice(&(b.len().min(u16::MAX as usize) as u16).to_le_bytes());
        v.extend_from_slice(&b[..b.len().min(u16::MAX as usize)]);
    }
    v
}

/// Decodes [`encode_handles`] output (or a single bare handle).
pub(crate) fn decode_handles(b: &[u8]) -> std::result::Result<Vec<ConnectHandle>, String> {
    if b.len() < 5 || &b[..4] != HANDLES_MAGIC {
        return ConnectHandle::decode(b)
            .map(|h| vec![h])
            .map_err(|e| e.to_string());
    }
    let n = b[4] as usize;
    let mut off = 5;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = b
            .get(off..off + 2)
            .map(|x| u16::from_le_bytes([x[0], x[1]]) as usize)
            .ok_or("truncated handle list")?;
        let blob = b
            .get(off + 2..off + 2 + len)
            .ok_or("truncated handle list")?;
        out.push(ConnectHandle::decode(blob).map_err(|e| e.to_string())?);
        off += 2 + len;
    }
    if off != b.len() {
        return Err("trailing bytes after the handle list".into());
    }
    Ok(out)
}

/// Builds the transports the configuration allows, in order of preference (shm is used only
/// between ranks with the same host id).
pub(crate) fn make_transport(cfg: &Config) -> Result<Vec<Arc<dyn Transport>>> {
    make_transport_with(cfg, None)
}

/// As [`make_transport`]; with `regions`, shm sends from those regions may go single-copy
/// (BRAID_SHM_DIRECT).
pub(crate) fn make_transport_with(
    cfg: &Config,
    regions: Option<Arc<Regions>>,
) -> Result<Vec<Arc<dyn Transport>>> {
    let shm = || -> Result<Arc<dyn Transport>> {
        let opts = ShmOptions {
            ring_bytes: cfg.shm_ring_bytes,
            spin: cfg.shm_spin,
            direct_min: if cfg.shm_direct { 1 } else { usize::MAX },
            ..ShmOptions::default()
        };
        let t = match &regions {
            Some(r) if cfg.shm_direct => ShmTransport::with_regions(opts, r.clone()),
            _ => ShmTransport::new(opts),
        }
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(Arc::new(t))
    };
    match cfg.transport {
        TransportKind::Shm => return Ok(vec![shm()?]),
        TransportKind::Auto => {
            // ib between hosts where this rank has a usable device; tcp otherwise (a peer
            // without ib publishes no ib handle, so the pair falls back to tcp).
            let mut v = vec![shm()?];
            match make_ib(cfg, regions.as_deref()) {
                Ok(t) => v.push(t),
                Err(reason) => {
                    static ONCE: std::sync::Once = std::sync::Once::new();
                    ONCE.call_once(
                        || tracing::info!(target: "braid::ib", "no RDMA device: {reason}"),
                    );
                }
            }
            v.push(make_tcp(cfg)?);
            return Ok(v);
        }
        TransportKind::Ib => {
            return make_ib(cfg, regions.as_deref())
                .map(|t| vec![t])
                .map_err(|reason| {
                    Error::InvalidArgument(format!("BRAID_TRANSPORT=ib: no RDMA device: {reason}"))
                })
        }
        TransportKind::Tcp => {}
    }
    Ok(vec![make_tcp(cfg)?])
}

/// The address this rank listens on (BRAID_BIND_ADDR, else the interface towards the
/// coordinator, else loopback).
fn bind_ip(cfg: &Config) -> Result<std::net::IpAddr> {
    Ok(match &cfg.bind_addr {
        Some(a) => a.parse().map_err(|_| {
            Error::InvalidArgument(format!("BRAID_BIND_ADDR={a}: not an IP address"))
        })?,
        None => cfg
            .coordinator
            .as_deref()
            .and_then(|a| membership::local_ip_towards(a).ok())
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
    })
}

/// The ib transport per BRAID_IB_*, or why there is none.
fn make_ib(
    cfg: &Config,
    regions: Option<&Regions>,
) -> std::result::Result<Arc<dyn Transport>, String> {
    use braid_transport::ib::{IbOptions, IbTransport, Provider};
    let bind = bind_ip(cfg).map_err(|e| e.to_string())?;
    let t = IbTransport::new(IbOptions {
        provider: if cfg.ib.emulated {
            Provider::Emulated
        } else {
            Provider::Verbs
        },
        device: cfg.ib.device.clone(),
        port: cfg.ib.port,
        gid_index: cfg.ib.gid_index,
        traffic_class: cfg.ib.traffic_class,
        qps_per_peer: cfg.ib.qps_per_peer,
        bind,
        plugin: cfg.ib.plugin.clone(),
    })
    .map_err(|e| match e {
        braid_transport::NetError::Unavailable(r) => r,
        other => other.to_string(),
    })?;
    if let Some(r) = regions {
        t.attach_regions(r);
    }
    Ok(Arc::new(t))
}

fn make_tcp(cfg: &Config) -> Result<Arc<dyn Transport>> {
    let bind = bind_ip(cfg)?;
    let t = TcpTransport::new(TcpOptions {
        streams: cfg.tcp_streams,
        stripe_min: cfg.tcp_stripe_min,
        bind,
        sock_buf: None,
    })
    .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    Ok(Arc::new(t))
}

impl Communicator {
    /// Creates a communicator from the environment (`BRAID_*`, or torchrun/MPI/SLURM
    /// variables): rendezvous through the coordinator; peers are connected at their first use
    /// (`BRAID_LAZY_CONNECT=1`, the default) or here, every one (`BRAID_LAZY_CONNECT=0`).
    ///
    /// Errors: invalid configuration; coordinator unreachable or refusing (after
    /// `BRAID_INIT_TIMEOUT`); peers not connecting in time.
    pub fn init() -> Result<Communicator> {
        let cfg = Config::from_env()?;
        Communicator::init_with(cfg)
    }

    /// Creates a communicator from an explicit configuration over the transport it names.
    pub fn init_with(cfg: Config) -> Result<Communicator> {
        crate::config::init_logging(&cfg.log);
        let regions = Regions::new();
        let ts = make_transport_with(&cfg, Some(regions.clone()))?;
        Communicator::init_on(cfg, ts, regions)
    }

    /// Creates a communicator over the in-process transport of `fabric` (ranks as threads of
    /// one process; for tests and examples). The coordinator is still used for rendezvous.
    pub fn init_in_process(cfg: Config, fabric: Arc<MemFabric>) -> Result<Communicator> {
        Communicator::init_with_transports(cfg, vec![Arc::new(MemTransport::new(fabric))])
    }

    /// Creates a communicator over `transports` (each peer is reached over the first of them
    /// that it also listens on). For tests that wrap or instrument a transport.
    #[doc(hidden)]
    pub fn init_with_transports(
        cfg: Config,
        transports: Vec<Arc<dyn Transport>>,
    ) -> Result<Communicator> {
        Communicator::init_on(cfg, transports, Regions::new())
    }

    /// Joins a running elastic group (configuration from the environment, as
    /// [`Communicator::init`], with `BRAID_ELASTIC` forced on): registers with the coordinator
    /// and returns once the running ranks admitted this process at their next view change
    /// (when they call [`Communicator::update`]). Rank = position in the new view (joiners
    /// come after the members that stay). Call [`Communicator::sync_from_oldest`] next, as the
    /// running ranks do after their `update()` returned true, to receive the current state.
    ///
    /// If the group is still forming (its first view not yet published), this process becomes
    /// one of its initial ranks instead.
    ///
    /// Errors: as [`Communicator::init`]; `Error::Timeout` if not admitted within
    /// `BRAID_INIT_TIMEOUT`.
    pub fn join() -> Result<Communicator> {
        let mut cfg = Config::from_env()?;
        cfg.elastic = true;
        Communicator::init_with(cfg)
    }

    pub(super) fn init_on(
        cfg: Config,
        transports: Vec<Arc<dyn Transport>>,
        regions: Arc<Regions>,
    ) -> Result<Communicator> {
        let deadline = Instant::now() + cfg.init_timeout;
        let world = cfg.world_size.ok_or_else(|| {
            Error::InvalidArgument(
                "world size unknown: set BRAID_WORLD_SIZE (or WORLD_SIZE), or launch with braid-run"
                    .into(),
            )
        })?;
        let coord_addr = cfg.coordinator.clone().ok_or_else(|| {
            Error::InvalidArgument(
                "coordinator unknown: set BRAID_COORDINATOR=host:port (or MASTER_ADDR and MASTER_PORT), or launch with braid-run"
                    .into(),
            )
        })?;
        let policy = select::Policy::parse(&cfg.algo, cfg.small_bytes)?;
        let token: Option<Vec<u8>> = cfg.job_token.as_ref().map(|t| t.0.clone());
        let coordinator = if cfg.host_coordinator {
            Some(Arc::new(Coordinator::bind_with(
                &coord_addr,
                membership::CoordinatorOptions {
                    job_token: token.clone(),
                    state_file: cfg.coordinator_state.clone(),
                    ..membership::CoordinatorOptions::default()
                },
            )?))
        } else {
            None
        };

        let mut listeners: Vec<(Box<dyn Listener>, &'static str)> = Vec::new();
        let mut handles: Vec<ConnectHandle> = Vec::new();
        for t in &transports {
            let (l, h) = t
                .listen(0)
                .map_err(|e| Error::System(format!("{} listen: {e}", t.name())))?;
            listeners.push((l, t.name()));
            handles.push(h);
        }
        let stash = Arc::new(Stash::new(token.clone(), world));
        let acceptor_stop = Arc::new(AtomicBool::new(false));
        let acceptor = spawn_acceptor(
            listeners,
            stash.clone(),
            acceptor_stop.clone(),
            token.clone(),
        )?;

        let abort = Arc::new(AtomicBool::new(false));
        let reg = Registration {
            group: cfg.group.clone(),
            world_size: world,
            rank: cfg.rank,
            host_id: cfg
                .host_id
                .clone()
                .unwrap_or_else(membership::local_host_id),
            hostname: membership::local_hostname(),
            pid: std::process::id(),
            role: Role::Worker,
            handle: encode_handles(&handles),
            numa: crate::topo::local_numa_node(),
            weight: cfg.weight,
            elastic: cfg.elastic,
            policy: membership::GroupPolicy {
                min_size: cfg.min_size,
                max_size: cfg.max_size,
                join_window_ms: cfg.join_window.as_millis() as u64,
            },
            // Every group heartbeats: an elastic one drops a silent member from its next
            // view; one that is not elastic is told of it (a failure notice), so operations
            // waiting on a stopped or cut-off member fail within this timeout, not at
            // BRAID_TIMEOUT.
            heartbeat_timeout_ms: cfg.heartbeat_timeout.as_millis() as u64,
            light: false,
            view_deltas: true,
            client_nonce: String::new(),
        };
        let copts = ClientOptions {
            token: token.clone(),
            heartbeat: cfg.heartbeat,
            silence: cfg.heartbeat_timeout,
        };
        let stop_acceptor = |acc: JoinHandle<()>| {
            acceptor_stop.store(true, Ordering::Relaxed);
            let _ = acc.join();
        };
        let (client, member, view) =
            match membership::rendezvous_with(&coord_addr, &reg, &copts, deadline, &abort) {
                Ok(x) => x,
                Err(e) => {
                    stop_acceptor(acceptor);
                    return Err(e);
                }
            };
        let names: Vec<&str> = transports.iter().map(|t| t.name()).collect();
        tracing::info!(target: "braid::init", "member {member} epoch {} size {} transports {}", view.epoch, view.members.len(), names.join(","));
        let mut comm = Communicator {
            inner: Arc::new(Inner::placeholder(
                cfg,
                policy,
                member,
                view.clone(),
                abort,
                regions.clone(),
            )),
            progress: Mutex::new(None),
            acceptor: Some(acceptor),
            acceptor_stop,
            client: Arc::new(Mutex::new(Some(client))),
            coordinator,
            transports,
            handles,
            stash,
            token,
            left: false,
            attempted: 0,
            regions,
            subgroups: Mutex::new(HashMap::new()),
            device: crate::cuda::engine::DeviceSlot::default(),
        };
        let lazy = comm.inner.cfg.lazy_connect;
        comm.install(view, deadline, lazy)?;
        Ok(comm)
    }

    /// Connects to the members of `view` and makes it this communicator's view. The old
    /// view's connections are closed (after everything sent on them was delivered). With
    /// `lazy` (BRAID_LAZY_CONNECT=1, views installed at init) peers are connected at their
    /// first use instead ([`super::connect::Dialer`]); views adopted by `update()` connect
    /// every pair here, so that a member of the new view that died is found before `update()`
    /// returns (the next view is tried).
    pub(super) fn install(&mut self, view: View, deadline: Instant, lazy: bool) -> Result<()> {
        let member = self.inner.member;
        self.attempted = self.attempted.max(view.epoch);
        if let Some(d) = &self.inner.dial {
            d.close();
        }
        let old_peers = std::mem::take(&mut lock(&self.inner.state).peers);
        for mut p in old_peers.into_iter().flatten() {
            p.conn.goodbye();
        }
        let Some(rank) = view.rank_of(member) else {
            // Not in the new view: this member left.
            self.left = true;
            if let Some(c) = lock(&self.client).as_ref() {
                c.installed(view.epoch);
            }
            self.stash.installed(view.epoch, None);
            tracing::info!(target: "braid::init", "member {member}: not in view epoch {}; left the group", view.epoch);
            let cfg = self.inner.cfg.clone();
            let policy = self.inner.policy.clone();
            self.inner = Arc::new(Inner::placeholder(
                cfg,
                policy,
                member,
                view,
                Arc::new(AtomicBool::new(false)),
                self.regions.clone(),
            ));
            return Ok(());
        };
        let abort = Arc::new(AtomicBool::new(false));
        let superseded = || {
            lock(&self.client)
                .as_ref()
                .is_some_and(|c| c.announced_epoch() > view.epoch || c.expelled().is_some())
        };
        let res = if lazy {
            // Peers are connected at their first use (connect::Dialer); the connections of
            // this view that arrive meanwhile are checked against it and kept in the stash.
            self.stash.learn(&view);
            check_shm_hosts(self.inner.cfg.transport, &view, rank).map(|()| {
                let none = (0..view.members.len()).map(|_| None).collect();
                (none, planned_transports(&self.transports, &view, rank))
            })
        } else {
            connect_peers(
                &self.transports,
                self.inner.cfg.transport,
                &view,
                rank,
                member,
                &self.stash,
                self.token.as_deref(),
                deadline,
                &abort,
                &superseded,
            )
        };
        let (peers, peer_transports) = match res {
            Ok(x) => x,
            Err(e) => {
                // The communicator stays on its old view, failed: update() moves on.
                fail_state(&mut lock(&self.inner.state), e.clone());
                return Err(e);
            }
        };
        let cfg = self.inner.cfg.clone();
        let policy = self.inner.policy.clone();
        let inner = assemble(
            cfg,
            policy,
            &self.transports,
            &self.handles,
            view,
            rank,
            member,
            peers,
            peer_transports,
            abort,
            self.regions.clone(),
            lazy.then(|| (self.stash.clone(), self.token.clone(), self.client.clone())),
        );
        let epoch = inner.view.epoch;
        let trip = lock(&inner.state).exec.trip.clone();
        if !inner.cfg.elastic {
            // Nobody re-forms this group: losing the coordinator fails only operations that
            // are stuck as long (see `Tripwire::isolated_after_ms`).
            trip.isolated_after_ms.store(
                inner.cfg.heartbeat_timeout.as_millis() as u64,
                Ordering::Relaxed,
            );
        }
        let ids: Vec<u64> = inner.view.members.iter().map(|m| m.id).collect();
        self.inner = Arc::new(inner);
        self.stash.installed(epoch, self.inner.dial.clone());
        if let Some(c) = lock(&self.client).as_ref() {
            // Views announced from now on are known to the acceptor at once: hellos of faster
            // peers are checked as they arrive.
            let tw = tripwire(trip, ids, member);
            let stash = self.stash.clone();
            c.set_watch(Box::new(move |w| {
                if let membership::Watch::View(v, _) = &w {
                    stash.learn(v);
                }
                tw(w)
            }));
            c.installed(epoch);
        }
        tracing::info!(target: "braid::init", "member {member}: installed view epoch {epoch}: rank {rank} of {}", self.inner.size);
        Ok(())
    }
}
