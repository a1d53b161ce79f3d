//! What servers, workers and readers share: transports, registration with the coordinator
//! (with a role), the data-connection hello, and the acceptor.
//!
//! The hello answers the acceptor's fresh challenge (so it cannot be replayed) and is bound to
//! a view: magic `BRPH`, version, claim (member or reader), id, view epoch, partition size,
//! then `HMAC(key, "braid-ps" | challenge | those fields)`, where the key is
//! `auth::view_key(job token, view nonce)` for a member (the nonce reaches members only) and
//! the coordinator's reader ticket for a reader. [`admit`] checks it, with or without a job
//! token; nothing sized by the peer is allocated before.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use braid_transport::{Arrival, Challenge, Conn, ConnectHandle, Listener, Transport};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::membership::{self, auth, Client, ClientOptions, Member, Registration, Role, View};

const HELLO_MAGIC: &[u8; 4] = b"BRPH";
/// Hello format version (2: challenged, bound to a view; 3: the messages that follow may have
/// binary headers, see `wire`, so a build that reads JSON only is refused at the hello).
const HELLO_VERSION: u8 = 3;
/// The hello claims membership of the view (its role is the one the view gives the id).
const CLAIM_MEMBER: u8 = 1;
/// The hello claims a reader grant from the coordinator.
const CLAIM_READER: u8 = 2;
/// Magic, version, claim, id, epoch, partition size.
const FIELDS_LEN: usize = 4 + 1 + 1 + 8 + 8 + 8;
/// Length of a hello: its fields and their MAC.
pub(crate) const HELLO_LEN: usize = FIELDS_LEN + auth::MAC_LEN;

/// Views a process keeps for checking hellos (members may connect with the view before or
/// after the one this process installed).
const BOOK_KEEP: usize = 8;
/// How long a hello naming a view this process has not heard of yet waits for it.
const PENDING_WAIT: Duration = Duration::from_secs(5);
/// Connections waiting for their view at most.
const PENDING_MAX: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a connecting side proves in its hello: a member of the view of `epoch` (keyed by
/// `auth::view_key(token, view nonce)`), or a reader with a coordinator grant (keyed by its
/// ticket).
#[derive(Clone)]
pub(crate) struct Cred {
    claim: u8,
    id: u64,
    epoch: u64,
    partition: u64,
    key: [u8; auth::MAC_LEN],
}

impl Cred {
    /// Member `id` of `view`.
    pub(crate) fn member(id: u64, view: &View, token: Option<&[u8]>, partition: usize) -> Cred {
        Cred {
            claim: CLAIM_MEMBER,
            id,
            epoch: view.epoch,
            partition: partition as u64,
            key: auth::view_key(token, view.nonce),
        }
    }

    /// Reader `id` with the coordinator's `ticket` for view `epoch`.
    pub(crate) fn reader(
        id: u64,
        epoch: u64,
        ticket: [u8; auth::MAC_LEN],
        partition: usize,
    ) -> Cred {
        Cred {
            claim: CLAIM_READER,
            id,
            epoch,
            partition: partition as u64,
            key: ticket,
        }
    }

    /// The hello answering `challenge`.
    pub(crate) fn hello(&self, challenge: &Challenge) -> Vec<u8> {
        let mut h = Vec::with_capacity(HELLO_LEN);
        h.extend_from_slice(HELLO_MAGIC);
        h.push(HELLO_VERSION);
        h.push(self.claim);
        h.extend_from_slice(&self.id.to_le_bytes());
        h.extend_from_slice(&self.epoch.to_le_bytes());
        h.extend_from_slice(&self.partition.to_le_bytes());
        let m = hello_mac(&self.key, challenge, &h);
        h.extend_from_slice(&m);
        h
    }
}

/// `HMAC(key, "braid-ps" | challenge | hello fields)`.
fn hello_mac(key: &[u8], challenge: &Challenge, fields: &[u8]) -> [u8; auth::MAC_LEN] {
    auth::mac(key, &[&b"braid-ps"[..], &challenge[..], fields])
}

/// A decoded (not yet verified) hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    /// Claims a reader grant (else membership of the view).
    pub reader: bool,
    /// Member or reader id.
    pub id: u64,
    /// The view epoch the hello is bound to.
    pub epoch: u64,
    /// The connecting side's partition size (`BRAID_PS_PARTITION_BYTES`).
    pub partition: u64,
}

/// Decodes a hello (its MAC is checked by [`admit`]).
pub(crate) fn decode_hello(h: &[u8]) -> std::result::Result<Hello, String> {
    if h.len() < 6 || &h[..4] != HELLO_MAGIC {
        return Err("not a braid push/pull hello".into());
    }
    if h[4] != HELLO_VERSION {
        return Err(format!(
            "push/pull hello version {} (this build speaks {HELLO_VERSION})",
            h[4]
        ));
    }
    if h.len() != HELLO_LEN {
        return Err(format!("hello of {} bytes, expected {HELLO_LEN}", h.len()));
    }
    let u = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let reader = match h[5] {
        CLAIM_MEMBER => false,
        CLAIM_READER => true,
        c => return Err(format!("hello claims an unknown role {c}")),
    };
    Ok(Hello {
        reader,
        id: u(6),
        epoch: u(14),
        partition: u(22),
    })
}

/// Views by epoch, and the coordinator client that announces newer ones.
type Book = (BTreeMap<u64, View>, Option<Arc<Client>>);

/// The views this process knows, for checking hellos: those it installed (the last
/// [`BOOK_KEEP`]) and those its coordinator client announced.
#[derive(Default)]
pub(crate) struct ViewBook {
    st: Mutex<Book>,
}

impl ViewBook {
    /// Records a view (installed or about to be).
    pub(crate) fn record(&self, v: &View) {
        let mut st = lock(&self.st);
        st.0.insert(v.epoch, v.clone());
        while st.0.len() > BOOK_KEEP {
            st.0.pop_first();
        }
    }

    fn set_client(&self, c: Arc<Client>) {
        lock(&self.st).1 = Some(c);
    }

    /// The view of `epoch` and the newest view known.
    fn lookup(&self, epoch: u64) -> (Option<View>, Option<View>) {
        let client = lock(&self.st).1.clone();
        if let Some(c) = &client {
            // Announced, maybe not installed yet.
            let top = c.announced_epoch();
            for e in [epoch, top] {
                if let Some((v, _)) = c.view_of(e) {
                    self.record(&v);
                }
            }
        }
        let st = lock(&self.st);
        (
            st.0.get(&epoch).cloned(),
            st.0.last_key_value().map(|(_, v)| v.clone()),
        )
    }
}

/// Who a connection was admitted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Peer {
    /// Member or reader id.
    pub id: u64,
    /// The role: the view's for a member, [`Role::Reader`] for a reader.
    pub role: Role,
    /// Its partition size.
    pub partition: u64,
}

/// Why a hello was not admitted (yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// It names a view this process has not heard of: check again shortly.
    Wait,
    /// Refused, with the reason.
    No(String),
}

/// Checks a hello against the challenge it answers and the views this process knows: a member
/// must be in the view it names (and not gone from a newer one) and MAC with that view's key; a
/// reader must name the newest view and MAC with the ticket the coordinator issued for it.
pub(crate) fn admit(
    book: &ViewBook,
    token: Option<&[u8]>,
    group: &str,
    challenge: &Challenge,
    hello: &[u8],
) -> std::result::Result<Peer, Refused> {
    let h = decode_hello(hello).map_err(Refused::No)?;
    let (view, newest) = book.lookup(h.epoch);
    let Some(newest) = newest else {
        // No view yet (still registering).
        return Err(Refused::Wait);
    };
    let Some(view) = view else {
        return Err(if h.epoch > newest.epoch {
            Refused::Wait
        } else {
            Refused::No(format!(
                "{} {} names view epoch {}, which is stale (newest {})",
                if h.reader { "reader" } else { "member" },
                h.id,
                h.epoch,
                newest.epoch
            ))
        });
    };
    let key = auth::view_key(token, view.nonce);
    let (role, key) = if h.reader {
        if h.epoch != newest.epoch {
            return Err(Refused::No(format!(
                "reader {} names view epoch {}, the group is at {}: stale grant",
                h.id, h.epoch, newest.epoch
            )));
        }
        (
            Role::Reader,
            auth::reader_ticket(&key, group, h.id, h.epoch),
        )
    } else {
        let Some(m) = view.members.iter().find(|m| m.id == h.id) else {
            return Err(Refused::No(format!(
                "member {} is not in view epoch {}",
                h.id, h.epoch
            )));
        };
        if newest.epoch > view.epoch && newest.rank_of(h.id).is_none() {
            return Err(Refused::No(format!(
                "member {} left the group at view epoch {}",
                h.id, newest.epoch
            )));
        }
        if m.role == Role::Reader {
            return Err(Refused::No(format!(
                "member {} has no push/pull role",
                h.id
            )));
        }
        (m.role, key)
    };
    let tag = &hello[FIELDS_LEN..];
    if !auth::verify(
        &key,
        &[&b"braid-ps"[..], &challenge[..], &hello[..FIELDS_LEN]],
        tag,
    ) {
        return Err(Refused::No(format!(
            "{} {} (view epoch {}): wrong MAC (not answering this connection's challenge, or \
             without the view's key or the job token)",
            if h.reader { "reader" } else { "member" },
            h.id,
            h.epoch
        )));
    }
    Ok(Peer {
        id: h.id,
        role,
        partition: h.partition,
    })
}

/// A push/pull process's membership and transports.
pub(crate) struct Node {
    pub me: u64,
    pub client: Arc<Client>,
    pub transports: Vec<Arc<dyn Transport>>,
    pub token: Option<Vec<u8>>,
    pub first_view: View,
    /// Views known to this process (hello checks; the server records each view it applies).
    pub book: Arc<ViewBook>,
    acceptor: Option<JoinHandle<()>>,
    acceptor_stop: Arc<AtomicBool>,
}

/// What the acceptor hands over: a connection and who it was admitted as.
pub(crate) type OnConn = Box<dyn FnMut(Box<dyn Conn>, Peer) + Send>;

impl Node {
    /// Listens, registers with `role` (an elastic group) and waits for the first view that
    /// contains this process. Accepted connections go to `on_conn` once their hello passed
    /// [`admit`] (strangers, stale views, wrong MACs are dropped with a log line).
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
        let book = Arc::new(ViewBook::default());
        let acceptor = spawn_acceptor(
            listeners,
            acceptor_stop.clone(),
            Gate {
                book: book.clone(),
                token: token.clone(),
                group: cfg.group.clone(),
            },
            on_conn,
        )?;
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
        let client = Arc::new(client);
        book.record(&view);
        book.set_client(client.clone());
        Ok(Node {
            me,
            client,
            transports,
            token,
            first_view: view,
            book,
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

/// Connects (on host `my_host`, proving `cred`) to member `m`.
pub(crate) fn connect_to(
    transports: &[Arc<dyn Transport>],
    cred: &Cred,
    my_host: &str,
    m: &Member,
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
    let hello = |c: &Challenge| cred.hello(c);
    t.connect_challenged(&h, &hello, deadline)
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

/// What the acceptor checks hellos against.
#[derive(Clone)]
struct Gate {
    book: Arc<ViewBook>,
    token: Option<Vec<u8>>,
    group: String,
}

impl Gate {
    fn admit(&self, challenge: &Challenge, hello: &[u8]) -> std::result::Result<Peer, Refused> {
        admit(
            &self.book,
            self.token.as_deref(),
            &self.group,
            challenge,
            hello,
        )
    }
}

fn spawn_acceptor(
    mut listeners: Vec<Box<dyn Listener>>,
    stop: Arc<AtomicBool>,
    gate: Gate,
    mut on_conn: OnConn,
) -> Result<JoinHandle<()>> {
    for l in listeners.iter_mut() {
        // Checked before the transport commits anything to the peer; a hello naming a view not
        // heard of yet passes here and waits below.
        let g = gate.clone();
        l.set_hello_check(Box::new(move |c, h, _pid| match g.admit(c, h) {
            Err(Refused::No(why)) => Err(format!("refusing a push/pull hello: {why}")),
            _ => Ok(()),
        }));
    }
    std::thread::Builder::new()
        .name("braid-ps-accept".into())
        .spawn(move || {
            let mut scratch = Vec::new();
            let mut pf = Vec::new();
            // Connections whose hello names a view not heard of yet, with their deadline.
            let mut pending: Vec<(Arrival, Instant)> = Vec::new();
            let mut take = |a: Arrival, since: Option<Instant>, pending: &mut Vec<_>| {
                match gate.admit(&a.challenge, &a.hello) {
                    Ok(p) => on_conn(a.conn, p),
                    Err(Refused::Wait) => match since {
                        Some(t) if t.elapsed() >= PENDING_WAIT => tracing::warn!(target: "braid::ps",
                            "dropping connection from {}: its hello names a view this process never heard of", a.conn.peer_desc()),
                        _ if since.is_none() && pending.len() >= PENDING_MAX => tracing::warn!(target: "braid::ps",
                            "dropping connection from {}: too many connections waiting for a view", a.conn.peer_desc()),
                        _ => pending.push((a, since.unwrap_or_else(Instant::now))),
                    },
                    Err(Refused::No(why)) => tracing::warn!(target: "braid::ps",
                        "dropping connection from {}: {why}", a.conn.peer_desc()),
                }
            };
            while !stop.load(Ordering::Relaxed) {
                let mut got = false;
                for l in listeners.iter_mut() {
                    match l.accept_challenged() {
                        Ok(Some(a)) => {
                            got = true;
                            take(a, None, &mut pending);
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(target: "braid::ps", "accept: {e}"),
                    }
                }
                for (a, since) in std::mem::take(&mut pending) {
                    take(a, Some(since), &mut pending);
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
                    // Connections waiting for a view are looked at again soon.
                    let ms = if pending.is_empty() { 20 } else { 10 };
                    let _ = braid_transport::wait_fds(&pf, Duration::from_millis(ms), &mut scratch);
                }
            }
        })
        .map_err(|e| Error::System(format!("spawning the accept thread: {e}")))
}
