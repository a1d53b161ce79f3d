//! What servers, workers and readers share: transports, registration with the coordinator
//! (with a role), the data-connection hello, and the acceptor.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use braid_transport::{Conn, ConnectHandle, Listener, Transport};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::membership::{self, auth, Client, ClientOptions, Member, Registration, Role, View};

const HELLO_MAGIC: &[u8; 4] = b"BRPH";

/// A data-connection hello: magic, member id of the connecting side, MAC with a job token.
pub(crate) fn hello(member: u64, token: Option<&[u8]>) -> Vec<u8> {
    let mut h = HELLO_MAGIC.to_vec();
    h.extend_from_slice(&member.to_le_bytes());
    if let Some(t) = token {
        let m = auth::data_mac(t, &h);
        h.extend_from_slice(&m);
    }
    h
}

/// The member id of a hello, checked (and authenticated with a token).
pub(crate) fn parse_hello(
    h: &[u8],
    token: Option<&[u8]>,
) -> std::result::Result<u64, &'static str> {
    if h.len() < 12 || &h[..4] != HELLO_MAGIC {
        return Err("not a braid push/pull hello");
    }
    match token {
        None if h.len() == 12 => {}
        None => return Err("the peer authenticates with a job token, this process has none"),
        Some(t) => {
            if h.len() != 12 + auth::MAC_LEN || !auth::check_data(t, &h[..12], &h[12..]) {
                return Err("missing or wrong job-token MAC");
            }
        }
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[4..12]);
    Ok(u64::from_le_bytes(b))
}

/// A push/pull process's membership and transports.
pub(crate) struct Node {
    pub me: u64,
    pub client: Arc<Client>,
    pub transports: Vec<Arc<dyn Transport>>,
    pub token: Option<Vec<u8>>,
    pub first_view: View,
    acceptor: Option<JoinHandle<()>>,
    acceptor_stop: Arc<AtomicBool>,
}

/// What the acceptor hands over: a connection and the member id it claims.
pub(crate) type OnConn = Box<dyn FnMut(Box<dyn Conn>, u64) + Send>;

impl Node {
    /// Listens, registers with `role` (an elastic group) and waits for the first view that
    /// contains this process. Accepted connections go to `on_conn` (authenticated; strangers
    /// are dropped with a log line).
    pub(crate) fn start(cfg: Config, role: Role, on_conn: OnConn) -> Result<Node> {
        crate::config::init_logging(&cfg.log);
        let deadline = Instant::now() + cfg.init_timeout;
        let world = cfg.world_size.ok_or_else(|| {
            Error::InvalidArgument(
                "world size unknown: set BRAID_WORLD_SIZE (workers + servers at start)".into(),
            )
        })?;
        let addr = cfg.coordinator.clone().ok_or_else(|| {
            Error::InvalidArgument("coordinator unknown: set BRAID_COORDINATOR=host:port".into())
        })?;
        let token = cfg.job_token.as_ref().map(|t| t.0.clone());
        let transports = crate::comm::make_transport(&cfg)?;
        let mut listeners: Vec<Box<dyn Listener>> = Vec::new();
        let mut handles: Vec<ConnectHandle> = Vec::new();
        for t in &transports {
            let (l, h) = t
                .listen(0)
                .map_err(|e| Error::System(format!("{} listen: {e}", t.name())))?;
            listeners.push(l);
            handles.push(h);
        }
        let acceptor_stop = Arc::new(AtomicBool::new(false));
        let acceptor = spawn_acceptor(listeners, acceptor_stop.clone(), token.clone(), on_conn)?;
        let mut reg = Registration::worker(
            &cfg.group,
            world,
            None,
            crate::comm::encode_handles(&handles),
        );
        reg.role = role;
        reg.elastic = true;
        reg.weight = cfg.weight;
        if let Some(h) = &cfg.host_id {
            reg.host_id = h.clone();
        }
        reg.policy = membership::GroupPolicy {
            min_size: cfg.min_size,
            max_size: cfg.max_size,
            join_window_ms: cfg.join_window.as_millis() as u64,
        };
        reg.heartbeat_timeout_ms = cfg.heartbeat_timeout.as_millis() as u64;
        let copts = ClientOptions {
            token: token.clone(),
            heartbeat: cfg.heartbeat,
            silence: cfg.heartbeat_timeout,
        };
        let abort = AtomicBool::new(false);
        let (client, me, view) =
            match membership::rendezvous_with(&addr, &reg, &copts, deadline, &abort) {
                Ok(x) => x,
                Err(e) => {
                    acceptor_stop.store(true, Ordering::SeqCst);
                    let _ = acceptor.join();
                    return Err(e);
                }
            };
        Ok(Node {
            me,
            client: Arc::new(client),
            transports,
            token,
            first_view: view,
            acceptor: Some(acceptor),
            acceptor_stop,
        })
    }

    /// This process's host id (as published in the view).
    pub(crate) fn host_id(&self) -> String {
        self.first_view
            .members
            .iter()
            .find(|x| x.id == self.me)
            .map(|x| x.host_id.clone())
            .unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.acceptor_stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

/// Connects from member `me` (on host `my_host`) to member `m`.
pub(crate) fn connect_to(
    transports: &[Arc<dyn Transport>],
    me: u64,
    my_host: &str,
    m: &Member,
    token: Option<&[u8]>,
    deadline: Instant,
) -> Result<Box<dyn Conn>> {
    let hs = crate::comm::decode_handles(&m.handle)
        .map_err(|e| Error::Coordinator(format!("member {}'s connect handle: {e}", m.id)))?;
    let same_host = m.host_id == my_host;
    let pick = transports.iter().find_map(|t| {
        if t.name() == "shm" && !same_host {
            return None;
        }
        hs.iter()
            .find(|h| h.transport == t.name())
            .map(|h| (t, h.clone()))
    });
    let Some((t, h)) = pick else {
        return Err(Error::InvalidArgument(format!(
            "no transport in common with member {} on host {}",
            m.id, m.hostname
        )));
    };
    t.connect(&h, &hello(me, token), deadline)
        .map_err(|e| Error::PeerLost {
            rank: 0,
            member: m.id,
            host: m.hostname.clone(),
            detail: format!("connecting: {e}"),
        })
}

/// A reader's transports (it does not listen): the configured ones.
pub(crate) fn client_transports(cfg: &Config) -> Result<Vec<Arc<dyn Transport>>> {
    crate::comm::make_transport(cfg)
}

fn spawn_acceptor(
    mut listeners: Vec<Box<dyn Listener>>,
    stop: Arc<AtomicBool>,
    token: Option<Vec<u8>>,
    mut on_conn: OnConn,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("braid-ps-accept".into())
        .spawn(move || {
            let mut scratch = Vec::new();
            let mut pf = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let mut got = false;
                for l in listeners.iter_mut() {
                    match l.accept() {
                        Ok(Some((c, h))) => {
                            got = true;
                            match parse_hello(&h, token.as_deref()) {
                                Ok(id) => on_conn(c, id),
                                Err(why) => tracing::warn!(target: "braid::ps", "dropping connection from {}: {why}", c.peer_desc()),
                            }
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(target: "braid::ps", "accept: {e}"),
                    }
                }
                if got {
                    continue;
                }
                pf.clear();
                for l in listeners.iter() {
                    if let Some(fd) = l.fd() {
                        pf.push(braid_transport::PollFd {
                            fd,
                            read: true,
                            write: false,
                        });
                    }
                }
                if pf.is_empty() {
                    std::thread::sleep(Duration::from_millis(1));
                } else {
                    let _ = braid_transport::wait_fds(&pf, Duration::from_millis(20), &mut scratch);
                }
            }
        })
        .map_err(|e| Error::System(format!("spawning the accept thread: {e}")))
}
