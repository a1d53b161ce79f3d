//! The connection handshake: the acceptor thread, data hellos and their checks, the stash of
//! accepted connections, and the connection of a view's peers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use braid_transport::{Challenge, Conn, ConnectHandle, Listener, Transport};

use crate::config::TransportKind;
use crate::error::{Error, Result};
use crate::exec::Peer;
use crate::membership::{auth, View};

use super::setup::decode_handles;
use super::{lock, panic_message};

const HELLO_MAGIC: &[u8; 4] = b"BRDA";
/// Version 2 (the dial-back flag, [`HELLO_DIAL_BACK`], came later: a build without it takes
/// a request for a data connection from a higher rank, and refuses it with a log line).
const HELLO_VERSION: u16 = 2;

/// Starts the thread that accepts data connections on every listener and puts them in the
/// stash. Every listener first runs [`hello_check`] on each hello (before it commits anything
/// to the peer); the thread checks the hello's form and job-token MAC, and the stash checks the
/// rest (view MAC over this connection's challenge, member, pid) as soon as the view of the
/// hello's epoch is known. Connections that fail are dropped with a log line naming the peer
/// and the reason.
pub(super) fn spawn_acceptor(
    mut listeners: Vec<(Box<dyn Listener>, &'static str)>,
    stash: Arc<Stash>,
    stop: Arc<AtomicBool>,
    token: Option<Vec<u8>>,
) -> Result<JoinHandle<()>> {
    for (listener, _) in listeners.iter_mut() {
        listener.set_hello_check(hello_check(stash.clone()));
    }
    std::thread::Builder::new()
        .name("braid-accept".into())
        .spawn(move || {
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                accept_loop(&mut listeners, &stash, &stop, token.as_deref())
            }));
            if let Err(p) = run {
                // No more connections can arrive: waiters for them fail at once, naming why.
                let why = format!("the accept thread panicked: {}", panic_message(&*p));
                tracing::error!(target: "braid::net", "{why}");
                *lock(&stash.dead) = Some(why);
                stash.cv.notify_all();
            }
        })
        .map_err(|e| Error::System(format!("spawning the accept thread: {e}")))
}

/// The accept thread's loop (see [`spawn_acceptor`]), until `stop`.
fn accept_loop(
    listeners: &mut [(Box<dyn Listener>, &'static str)],
    stash: &Stash,
    stop: &AtomicBool,
    token: Option<&[u8]>,
) {
    let mut scratch = Vec::new();
    let mut pf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut got = false;
        for (listener, name) in listeners.iter_mut() {
            match listener.accept_challenged() {
                Ok(Some(a)) => {
                    got = true;
                    let t = token;
                    let parsed = parse_hello(&a.hello, t)
                        .and_then(|h| check_token(&h, &a.challenge, t).map(|()| h));
                    match parsed {
                        Ok(h) => stash.push(Arrived {
                            conn: a.conn,
                            hello: h,
                            challenge: a.challenge,
                            peer_pid: a.peer_pid,
                            transport: name,
                            at: Instant::now(),
                            verified: false,
                        }),
                        Err(why) => {
                            tracing::warn!(target: "braid::net", "dropping data connection from {}: {why}", a.conn.peer_desc());
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(target: "braid::net", "{name} accept: {e}");
                }
            }
        }
        if got {
            continue;
        }
        pf.clear();
        let mut fd_less = false;
        for (listener, _) in listeners.iter() {
            match listener.fd() {
                Some(fd) => pf.push(braid_transport::PollFd {
                    fd,
                    read: true,
                    write: false,
                }),
                None => fd_less = true,
            }
        }
        if fd_less || pf.is_empty() {
            std::thread::sleep(Duration::from_micros(200));
        } else {
            let _ = braid_transport::wait_fds(&pf, Duration::from_millis(20), &mut scratch);
        }
    }
}

/// Length of a data hello's fields (magic, version, flags, epoch, rank, member id), which its
/// MACs cover.
const HELLO_FIELDS: usize = 32;
/// Flag of a data hello: a job-token MAC follows the view MAC.
const HELLO_HAS_TOKEN: u16 = 1;
/// Flag of a data hello: not a data connection but a request from a higher rank of a lazily
/// connected view that the acceptor's rank (a lower one) connect to it ([`lazy`]). The flag is
/// covered by the MACs; the rank dialed is the one the hello names, at the address the
/// acceptor's own view gives for it.
const HELLO_DIAL_BACK: u16 = 2;
/// Domain label of a data hello's view MAC.
const HELLO_LABEL: &[u8] = b"braid-data";
/// Domain label of a data hello's job-token MAC.
const HELLO_TOKEN_LABEL: &[u8] = b"braid-data-token";

fn hello_fields(
    epoch: u64,
    rank: usize,
    member: u64,
    token: bool,
    dial_back: bool,
) -> [u8; HELLO_FIELDS] {
    let mut f = [0u8; HELLO_FIELDS];
    f[0..4].copy_from_slice(HELLO_MAGIC);
    f[4..6].copy_from_slice(&HELLO_VERSION.to_le_bytes());
    let flags =
        if token { HELLO_HAS_TOKEN } else { 0 } | if dial_back { HELLO_DIAL_BACK } else { 0 };
    f[6..8].copy_from_slice(&flags.to_le_bytes());
    f[8..16].copy_from_slice(&epoch.to_le_bytes());
    f[16..24].copy_from_slice(&(rank as u64).to_le_bytes());
    f[24..32].copy_from_slice(&member.to_le_bytes());
    f
}

/// The data-connection hello that answers the acceptor's `challenge`: the fields, then
/// `HMAC(view_key, "braid-data" | challenge | fields)` with `view_key = auth::view_key(token,
/// nonce)`, then with a job token `HMAC(token, "braid-data-token" | challenge | fields)`. The
/// view nonce never crosses the wire; the challenge is fresh per connection, so a captured
/// hello answers no other connection.
fn hello_bytes(
    challenge: &Challenge,
    nonce: u64,
    epoch: u64,
    rank: usize,
    member: u64,
    token: Option<&[u8]>,
) -> Vec<u8> {
    hello_bytes_as(challenge, nonce, epoch, rank, member, token, false)
}

/// [`hello_bytes`], or with `dial_back` the hello of a dial-back request ([`HELLO_DIAL_BACK`]).
fn hello_bytes_as(
    challenge: &Challenge,
    nonce: u64,
    epoch: u64,
    rank: usize,
    member: u64,
    token: Option<&[u8]>,
    dial_back: bool,
) -> Vec<u8> {
    let f = hello_fields(epoch, rank, member, token.is_some(), dial_back);
    let key = auth::view_key(token, nonce);
    let mut h = Vec::with_capacity(HELLO_FIELDS + 2 * auth::MAC_LEN);
    h.extend_from_slice(&f);
    h.extend_from_slice(&auth::mac(&key, &[HELLO_LABEL, challenge, &f]));
    if let Some(t) = token {
        h.extend_from_slice(&auth::mac(t, &[HELLO_TOKEN_LABEL, challenge, &f]));
    }
    h
}

/// A parsed data-connection hello (its form checked, its MACs not yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    epoch: u64,
    rank: usize,
    member: u64,
    /// A dial-back request ([`HELLO_DIAL_BACK`]), not a data connection.
    dial_back: bool,
    /// The bytes the MACs cover.
    fields: [u8; HELLO_FIELDS],
    /// `HMAC(view_key, "braid-data" | challenge | fields)`.
    mac: [u8; auth::MAC_LEN],
    /// With a job token: `HMAC(token, "braid-data-token" | challenge | fields)`.
    token_mac: Option<[u8; auth::MAC_LEN]>,
}

/// Parses a data-connection hello: magic, version, length, and whether it carries a job-token
/// MAC exactly when this rank has a token.
pub(crate) fn parse_hello(
    h: &[u8],
    token: Option<&[u8]>,
) -> std::result::Result<Hello, &'static str> {
    if h.len() < HELLO_FIELDS || &h[..4] != HELLO_MAGIC {
        return Err("not a braid hello");
    }
    if u16::from_le_bytes([h[4], h[5]]) != HELLO_VERSION {
        return Err("another braid hello version");
    }
    let flags = u16::from_le_bytes([h[6], h[7]]);
    let has_token = flags & HELLO_HAS_TOKEN != 0;
    let want = HELLO_FIELDS + auth::MAC_LEN * if has_token { 2 } else { 1 };
    if h.len() != want {
        return Err("malformed braid hello (length)");
    }
    match (token.is_some(), has_token) {
        (false, true) => return Err("the peer authenticates with a job token, this rank has none"),
        (true, false) => return Err("no job-token MAC"),
        _ => {}
    }
    let u = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let mut fields = [0u8; HELLO_FIELDS];
    fields.copy_from_slice(&h[..HELLO_FIELDS]);
    let mut mac = [0u8; auth::MAC_LEN];
    mac.copy_from_slice(&h[HELLO_FIELDS..HELLO_FIELDS + auth::MAC_LEN]);
    let token_mac = has_token.then(|| {
        let mut m = [0u8; auth::MAC_LEN];
        m.copy_from_slice(&h[HELLO_FIELDS + auth::MAC_LEN..]);
        m
    });
    Ok(Hello {
        epoch: u(8),
        rank: usize::try_from(u(16)).unwrap_or(usize::MAX),
        member: u(24),
        dial_back: flags & HELLO_DIAL_BACK != 0,
        fields,
        mac,
        token_mac,
    })
}

/// With a job token: checks the hello's job-token MAC over `challenge` (possible before the
/// view is known, so strangers without the token are refused at once).
fn check_token(
    h: &Hello,
    challenge: &Challenge,
    token: Option<&[u8]>,
) -> std::result::Result<(), &'static str> {
    match (token, h.token_mac) {
        (None, _) => Ok(()),
        (Some(t), Some(m)) => {
            if auth::verify(t, &[HELLO_TOKEN_LABEL, challenge, &h.fields], &m) {
                Ok(())
            } else {
                Err("wrong job-token MAC")
            }
        }
        (Some(_), None) => Err("no job-token MAC"),
    }
}

/// What a rank knows of a view to check data hellos against: its nonce, and (member id, pid)
/// by rank.
#[derive(Debug, Clone)]
struct KnownView {
    nonce: u64,
    members: Vec<(u64, u32)>,
}

impl KnownView {
    fn of(v: &View) -> KnownView {
        KnownView {
            nonce: v.nonce,
            members: v.members.iter().map(|m| (m.id, m.pid)).collect(),
        }
    }
}

/// The check every listener runs on a hello before it commits anything to the peer (the shm
/// transport maps a peer's segment only after it): the form, with a job token its token MAC,
/// and when this rank knows the view of the hello's epoch, the view MAC, the member and (shm) the connecting pid. A
/// hello for a view this rank does not know yet passes here (no key to check it with without
/// a token) and is checked when the view is known ([`Stash::learn`]).
fn hello_check(stash: Arc<Stash>) -> braid_transport::HelloCheck {
    Box::new(
        move |challenge: &Challenge, hello: &[u8], pid: Option<u32>| {
            let token = stash.token.as_deref();
            let h = match parse_hello(hello, token)
                .and_then(|h| check_token(&h, challenge, token).map(|()| h))
            {
                Ok(h) => h,
                Err(why) => return Err(format!("refusing a data connection: {why}")),
            };
            match stash.known(h.epoch) {
            Some(v) => stash.check(&h, challenge, pid, &v).map_err(|why| {
                format!(
                    "refusing a data connection claiming rank {} of view epoch {} (member {}): {why}",
                    h.rank, h.epoch, h.member
                )
            }),
            None => Ok(()),
        }
        },
    )
}

/// An accepted data connection with a well-formed hello, waiting to be claimed by a view
/// installation. `verified`: its hello was checked against the view of its epoch.
struct Arrived {
    conn: Box<dyn Conn>,
    hello: Hello,
    challenge: Challenge,
    peer_pid: Option<u32>,
    transport: &'static str,
    at: Instant,
    verified: bool,
}

/// Takes an accepted connection of `view` as rank `rank`'s connection to the lower rank that
/// sent it: checks it (the view MAC for one not verified on arrival), refuses it (and returns
/// None) when it does not come from a lower rank or that rank is connected already, else puts
/// the peer in `peers` and returns its rank and the transport's name. Shared by eager set-up
/// and lazy first use.
fn claim(
    stash: &Stash,
    view: &View,
    rank: usize,
    peers: &mut [Option<Peer>],
    a: Arrived,
) -> Option<(usize, &'static str)> {
    if a.hello.dial_back {
        // Served by the acceptor (Stash::push, Stash::installed), never a rank's connection.
        tracing::debug!(target: "braid::net", "dropping a dial-back request of rank {} (view epoch {}): this rank connects eagerly", a.hello.rank, a.hello.epoch);
        return None;
    }
    if !a.verified {
        // learn() checked the connections of this view and push() checks later ones: this is
        // only a second line of defence.
        if let Err(why) = stash.check(&a.hello, &a.challenge, a.peer_pid, &KnownView::of(view)) {
            refuse(&a, &why);
            return None;
        }
        stash.remember(&a.hello.mac);
    }
    let r = a.hello.rank;
    if r >= rank {
        refuse(
            &a,
            &format!("rank {r} does not connect to rank {rank} (lower ranks do)"),
        );
        return None;
    }
    if peers[r].is_some() {
        refuse(&a, &format!("rank {r} is connected already"));
        return None;
    }
    let transport = a.transport;
    peers[r] = Some(Peer {
        conn: a.conn,
        rank: r,
        member: view.members[r].id,
        host: view.members[r].hostname.clone(),
    });
    Some((r, transport))
}

fn refuse(a: &Arrived, why: &str) {
    tracing::warn!(target: "braid::net", "dropping data connection from {} claiming rank {} of view epoch {} (member {}): {why}",
        a.conn.peer_desc(), a.hello.rank, a.hello.epoch, a.hello.member);
}

/// Data connections accepted and not yet claimed. Connections for a view this rank has not
/// installed yet wait here (a faster peer may connect first); connections of an epoch this
/// rank already installed, or older than [`STASH_MAX_AGE`], are dropped. With lazy connections
/// (BRAID_LAZY_CONNECT) the installed view's connections wait here too, until their first use
/// claims them, however long that takes.
///
/// A connection is verified as soon as the view of its epoch is known (at once when it is, or
/// when [`Stash::learn`] learns it) and dropped if it fails; only verified connections are
/// claimed. Unverified connections are capped ([`Stash::unverified_cap`]; the oldest goes).
pub(super) struct Stash {
    list: Mutex<Vec<Arrived>>,
    cv: Condvar,
    /// Connections of epochs below this are stale.
    floor: std::sync::atomic::AtomicU64,
    /// The job token, if any.
    token: Option<Vec<u8>>,
    /// Views this rank knows, by epoch (at most [`STASH_VIEWS`], none below `floor`).
    views: Mutex<std::collections::BTreeMap<u64, KnownView>>,
    /// Size of the largest view known (scales the cap on unverified connections).
    largest: std::sync::atomic::AtomicUsize,
    /// View MACs of recent hellos, to name a replay as such.
    seen: Mutex<VecDeque<[u8; auth::MAC_LEN]>>,
    /// Set when the accept thread died (a panic): connecting fails with it at once.
    dead: Mutex<Option<String>>,
    /// The installed view connects lazily: its connections (epoch `floor`) are kept.
    lazy: AtomicBool,
    /// The communicator of this epoch failed (epoch, reason): its connections are aborted
    /// with the reason as they arrive (the peer fails at once, naming this rank, instead of
    /// waiting on a connection nobody claims).
    failed: Mutex<Option<(u64, String)>>,
    /// The connections of the installed view when it connects lazily: dial-back requests of
    /// its epoch are handed to it. Lock order: `list` before `links`.
    links: Mutex<Option<Arc<Dialer>>>,
}

/// How long an unclaimed connection is kept.
const STASH_MAX_AGE: Duration = Duration::from_secs(300);
/// Views kept to check hellos against.
const STASH_VIEWS: usize = 16;
/// Hello MACs remembered to recognise a replay.
const SEEN_MACS: usize = 1024;
/// Unverified connections kept at least (more for large views: twice the largest view).
const MIN_UNVERIFIED: usize = 64;

impl Stash {
    /// A stash for a rank of a group of `world` ranks (scales the cap on unverified
    /// connections before the first view is known).
    pub(super) fn new(token: Option<Vec<u8>>, world: usize) -> Stash {
        Stash {
            list: Mutex::new(Vec::new()),
            cv: Condvar::new(),
            floor: std::sync::atomic::AtomicU64::new(0),
            token,
            views: Mutex::new(std::collections::BTreeMap::new()),
            largest: std::sync::atomic::AtomicUsize::new(world),
            seen: Mutex::new(VecDeque::new()),
            dead: Mutex::new(None),
            lazy: AtomicBool::new(false),
            failed: Mutex::new(None),
            links: Mutex::new(None),
        }
    }

    /// The view of `epoch`, if this rank knows it.
    fn known(&self, epoch: u64) -> Option<KnownView> {
        lock(&self.views).get(&epoch).cloned()
    }

    /// Checks a hello against the challenge it answered and the view of its epoch: the rank
    /// belongs to the member it names, the view MAC (key `auth::view_key(token, nonce)`), and
    /// the connecting process's pid where the transport knows it (0: not visible from this pid
    /// namespace).
    fn check(
        &self,
        h: &Hello,
        challenge: &Challenge,
        peer_pid: Option<u32>,
        v: &KnownView,
    ) -> std::result::Result<(), String> {
        let Some(&(id, pid)) = v.members.get(h.rank) else {
            return Err(format!(
                "not a member of this view (it has {} ranks)",
                v.members.len()
            ));
        };
        if id != h.member {
            return Err(format!(
                "not a member of this view (rank {} is member {id})",
                h.rank
            ));
        }
        let key = auth::view_key(self.token.as_deref(), v.nonce);
        if !auth::verify(&key, &[HELLO_LABEL, challenge, &h.fields], &h.mac) {
            return Err(if lock(&self.seen).contains(&h.mac) {
                "replayed (the hello answers another connection's challenge)".into()
            } else {
                "wrong MAC".into()
            });
        }
        if let Some(p) = peer_pid {
            if p != 0 && p != pid {
                return Err(format!(
                    "the connecting process is pid {p}, member {id} is pid {pid}"
                ));
            }
        }
        Ok(())
    }

    /// Most unverified connections kept at once.
    fn unverified_cap(&self) -> usize {
        MIN_UNVERIFIED.max(2 * self.largest.load(Ordering::Relaxed))
    }

    fn push(&self, mut a: Arrived) {
        let mut l = lock(&self.list);
        let floor = self.floor.load(Ordering::SeqCst);
        let lazy = self.lazy.load(Ordering::SeqCst);
        l.retain(|x| {
            x.hello.epoch >= floor
                && (x.at.elapsed() < STASH_MAX_AGE
                    || (lazy && x.verified && x.hello.epoch == floor))
        });
        if a.hello.epoch < floor {
            tracing::debug!(target: "braid::net", "dropping a data connection of old epoch {} from {}", a.hello.epoch, a.conn.peer_desc());
            return;
        }
        if let Some(v) = self.known(a.hello.epoch) {
            if let Err(why) = self.check(&a.hello, &a.challenge, a.peer_pid, &v) {
                refuse(&a, &why);
                return;
            }
            self.remember(&a.hello.mac);
            a.verified = true;
            if a.hello.dial_back {
                // A higher rank asks this one to connect to it: served at once when its view
                // is the installed lazy one, else kept until that view is installed.
                let links = lock(&self.links).clone();
                if let Some(d) = links.filter(|d| d.epoch() == a.hello.epoch) {
                    drop(l);
                    d.asked_by(a.hello.rank);
                    return;
                }
            } else if let Some((e, why)) = lock(&self.failed).as_ref() {
                if *e == a.hello.epoch {
                    a.conn.abort(why);
                    return;
                }
            }
        } else {
            let cap = self.unverified_cap();
            let n = l.iter().filter(|x| !x.verified).count();
            if n >= cap {
                if let Some(i) = l.iter().position(|x| !x.verified) {
                    let old = l.remove(i);
                    refuse(&old, &format!("{n} connections for views this rank does not know yet wait (at most {cap}); dropping the oldest"));
                }
            }
        }
        l.push(a);
        drop(l);
        self.cv.notify_all();
        self.wake_links();
    }

    /// Remembers the view MAC of a hello that verified, so that a copy of it on another
    /// connection is named a replay. Only verified hellos: a forged one is never "seen".
    fn remember(&self, mac: &[u8; auth::MAC_LEN]) {
        let mut seen = lock(&self.seen);
        if seen.len() >= SEEN_MACS {
            seen.pop_front();
        }
        seen.push_back(*mac);
    }

    /// Learns a view (announced or being installed): hellos of its epoch are checked from now
    /// on as they arrive, and those waiting are checked now (failures dropped).
    pub(super) fn learn(&self, view: &View) {
        if view.epoch < self.floor.load(Ordering::SeqCst) {
            return;
        }
        let kv = KnownView::of(view);
        {
            let mut vs = lock(&self.views);
            if vs.contains_key(&view.epoch) {
                return;
            }
            vs.insert(view.epoch, kv.clone());
            while vs.len() > STASH_VIEWS {
                vs.pop_first();
            }
        }
        self.largest
            .fetch_max(view.members.len(), Ordering::Relaxed);
        let mut l = lock(&self.list);
        l.retain_mut(|a| {
            if a.verified || a.hello.epoch != view.epoch {
                return true;
            }
            match self.check(&a.hello, &a.challenge, a.peer_pid, &kv) {
                Ok(()) => {
                    self.remember(&a.hello.mac);
                    a.verified = true;
                    true
                }
                Err(why) => {
                    refuse(a, &why);
                    false
                }
            }
        });
        let asks = self.take_asks(&mut l);
        drop(l);
        self.cv.notify_all();
        asks.serve();
    }

    /// Takes the verified dial-back requests of the installed lazy view out of `l` (to be
    /// served once the list lock is released).
    fn take_asks(&self, l: &mut Vec<Arrived>) -> Asks {
        let Some(d) = lock(&self.links).clone() else {
            return Asks(None, Vec::new());
        };
        let mut ranks = Vec::new();
        let mut i = 0;
        while i < l.len() {
            let h = &l[i].hello;
            if l[i].verified && h.dial_back && h.epoch == d.epoch() {
                ranks.push(l.swap_remove(i).hello.rank);
            } else {
                i += 1;
            }
        }
        Asks(Some(d), ranks)
    }

    /// Marks epochs up to `epoch` installed (their connections are stale now).
    /// The communicator of view `epoch` failed: its connections waiting here, and those that
    /// arrive later, are aborted with `reason`.
    pub(super) fn fail(&self, epoch: u64, reason: &str) {
        *lock(&self.failed) = Some((epoch, reason.to_string()));
        lock(&self.list).retain_mut(|a| {
            if a.verified && a.hello.epoch == epoch {
                a.conn.abort(reason);
                false
            } else {
                true
            }
        });
    }

    /// With `links` (the view connects lazily), the connections of `epoch` itself are kept
    /// (and still accepted) for their first use, and its dial-back requests go to `links`
    /// (those that arrived before are served now).
    pub(super) fn installed(&self, epoch: u64, links: Option<Arc<Dialer>>) {
        let lazy = links.is_some();
        let floor = if lazy { epoch } else { epoch + 1 };
        self.lazy.store(lazy, Ordering::SeqCst);
        self.floor.store(floor, Ordering::SeqCst);
        let asks = {
            let mut l = lock(&self.list);
            l.retain(|x| x.hello.epoch >= floor);
            *lock(&self.links) = links;
            self.take_asks(&mut l)
        };
        lock(&self.views).retain(|e, _| *e >= floor);
        asks.serve();
    }

    /// Forgets `d` (its view is replaced, or the communicator dropped): no more dial-back
    /// requests go to it.
    pub(super) fn forget(&self, d: &Arc<Dialer>) {
        let _l = lock(&self.list);
        let mut g = lock(&self.links);
        if g.as_ref().is_some_and(|x| Arc::ptr_eq(x, d)) {
            *g = None;
        }
    }

    /// Wakes the waiters for connections of a lazily connected view (see [`Dialer`]).
    fn wake_links(&self) {
        let d = lock(&self.links).clone();
        if let Some(d) = d {
            d.wake();
        }
    }
}

/// Dial-back requests taken out of the stash, to be served by `.0` without the list lock.
struct Asks(Option<Arc<Dialer>>, Vec<usize>);

impl Asks {
    fn serve(self) {
        if let Some(d) = self.0 {
            for r in self.1 {
                d.asked_by(r);
            }
        }
    }
}

/// The peers (indexed by rank) and the transport name used for each, by rank.
type Connected = (Vec<Option<Peer>>, Vec<(usize, &'static str)>);

/// Checks, with BRAID_TRANSPORT=shm, that every rank of `view` is on this rank's host: every
/// rank checks every pair, so all fail at once instead of waiting for a connect.
pub(super) fn check_shm_hosts(kind: TransportKind, view: &View, rank: usize) -> Result<()> {
    if kind != TransportKind::Shm {
        return Ok(());
    }
    let me = &view.members[rank];
    for (j, m) in view.members.iter().enumerate() {
        if m.host_id != me.host_id {
            return Err(Error::InvalidArgument(format!(
                "BRAID_TRANSPORT=shm, but rank {j} is on host {} (host id {}) and rank {rank} on host {} (host id {}): shared memory works only within one host (use auto or tcp)",
                m.hostname, m.host_id, me.hostname, me.host_id
            )));
        }
    }
    Ok(())
}

/// The transport this rank connects to rank `j` over, and `j`'s handle for it: the first of
/// `transports` that `j` also listens on (shm only when the host ids are equal).
fn pick<'t>(
    transports: &'t [Arc<dyn Transport>],
    view: &View,
    rank: usize,
    j: usize,
) -> Result<(&'t Arc<dyn Transport>, ConnectHandle)> {
    let (me, m) = (&view.members[rank], &view.members[j]);
    let hs = decode_handles(&m.handle)
        .map_err(|e| Error::Coordinator(format!("rank {j}'s connect handle: {e}")))?;
    let same_host = m.host_id == me.host_id;
    let pick = transports.iter().find_map(|t| {
        if t.name() == "shm" && !same_host {
            return None;
        }
        hs.iter()
            .find(|h| h.transport == t.name())
            .map(|h| (t, h.clone()))
    });
    pick.ok_or_else(|| {
        let theirs: Vec<&str> = hs.iter().map(|h| h.transport.as_str()).collect();
        let mine: Vec<&str> = transports.iter().map(|t| t.name()).collect();
        Error::InvalidArgument(format!(
            "no transport in common with rank {j} on host {} (this rank offers {}, it offers {}; same host: {same_host}); set the same BRAID_TRANSPORT on all ranks",
            m.hostname,
            mine.join(","),
            theirs.join(",")
        ))
    })
}

/// The transport each peer is reached over, by rank (without this rank), known before any
/// connection: to a higher rank the one this rank picks ([`pick`]); from a lower rank the one
/// that rank picks (the first of its handles, in its order of preference, that this rank
/// also listens on). A peer without one is left out (connecting to it fails, naming it).
pub(super) fn planned_transports(
    transports: &[Arc<dyn Transport>],
    view: &View,
    rank: usize,
) -> Vec<(usize, &'static str)> {
    let me = &view.members[rank];
    let mut out = Vec::with_capacity(view.members.len().saturating_sub(1));
    for (j, m) in view.members.iter().enumerate() {
        let name = if j > rank {
            pick(transports, view, rank, j).ok().map(|(t, _)| t.name())
        } else if j < rank {
            let same_host = m.host_id == me.host_id;
            decode_handles(&m.handle).ok().and_then(|hs| {
                hs.iter().find_map(|h| {
                    transports
                        .iter()
                        .find(|t| t.name() == h.transport && (same_host || t.name() != "shm"))
                        .map(|t| t.name())
                })
            })
        } else {
            None
        };
        if let Some(n) = name {
            out.push((j, n));
        }
    }
    out
}

/// Connects this rank to rank `j` of `view` (the lower rank of a pair connects). While `j`
/// refuses, `give_up` is asked between attempts: `Some(e)` stops with `e`. Errors name the
/// peer: `PeerLost` (rank, member, host) when it cannot be reached by `deadline`;
/// `InvalidArgument` when it offers no transport this rank has.
#[allow(clippy::too_many_arguments)]
fn dial(
    transports: &[Arc<dyn Transport>],
    view: &View,
    rank: usize,
    member: u64,
    token: Option<&[u8]>,
    j: usize,
    deadline: Instant,
    give_up: &dyn Fn() -> Option<Error>,
) -> Result<(Peer, &'static str)> {
    let m = &view.members[j];
    let (transport, h) = pick(transports, view, rank, j)?;
    tracing::debug!(target: "braid::init", "rank {rank} -> rank {j}: {}", transport.name());
    let hello = |c: &Challenge| hello_bytes(c, view.nonce, view.epoch, rank, member, token);
    let conn = transport
        .connect_or_give_up(&h, &hello, deadline, &|| give_up().is_some())
        .map_err(|e| {
            give_up().unwrap_or_else(|| Error::PeerLost {
                rank: j,
                member: m.id,
                host: m.hostname.clone(),
                detail: format!("connecting: {e}"),
            })
        })?;
    Ok((
        Peer {
            conn,
            rank: j,
            member: m.id,
            host: m.hostname.clone(),
        },
        transport.name(),
    ))
}

/// Connects to every peer: to higher ranks over the first transport of `transports` that the
/// peer also listens on (shm only when the host ids are equal), and accepts from lower ranks.
/// Returns the peers and the transport name used for each.
#[allow(clippy::too_many_arguments)]
pub(super) fn connect_peers(
    transports: &[Arc<dyn Transport>],
    kind: TransportKind,
    view: &View,
    rank: usize,
    member: u64,
    stash: &Stash,
    token: Option<&[u8]>,
    deadline: Instant,
    abort: &AtomicBool,
    superseded: &dyn Fn() -> bool,
) -> Result<Connected> {
    let size = view.members.len();
    let mut peers: Vec<Option<Peer>> = (0..size).map(|_| None).collect();
    let mut names: Vec<Option<&'static str>> = vec![None; size];
    // Connections of this view that arrived before are checked now; later ones on arrival.
    stash.learn(view);
    check_shm_hosts(kind, view, rank)?;
    // Connect to every higher rank; accept from every lower one.
    for j in rank + 1..size {
        // A peer of a stale view may be dead (its listener refuses): stop retrying once a
        // newer view is announced, as the accept loop below does, instead of at the deadline.
        let give_up = || {
            if abort.load(Ordering::Relaxed) {
                Some(Error::Aborted)
            } else if superseded() {
                Some(Error::Coordinator(format!(
                    "view epoch {} was superseded while connecting to rank {j}",
                    view.epoch
                )))
            } else {
                None
            }
        };
        let (peer, name) = dial(transports, view, rank, member, token, j, deadline, &give_up)?;
        names[j] = Some(name);
        peers[j] = Some(peer);
    }
    let mut missing = rank;
    let mut list = lock(&stash.list);
    while missing > 0 {
        // Claim the verified connections of this view; keep those of later epochs. Only a
        // connection whose hello verified (view MAC over its own challenge, member, pid) takes
        // a rank, so a forged one that arrived first cannot.
        let mut i = 0;
        while i < list.len() {
            let h = list[i].hello;
            if h.epoch > view.epoch {
                i += 1;
                continue;
            }
            let a = list.swap_remove(i);
            if h.epoch < view.epoch {
                tracing::debug!(target: "braid::net", "dropping a data connection of old epoch {} from {}", h.epoch, a.conn.peer_desc());
                continue;
            }
            let Some((r, transport)) = claim(stash, view, rank, &mut peers, a) else {
                continue;
            };
            names[r] = Some(transport);
            missing -= 1;
        }
        if missing == 0 {
            break;
        }
        if abort.load(Ordering::Relaxed) {
            return Err(Error::Aborted);
        }
        if let Some(why) = lock(&stash.dead).clone() {
            return Err(Error::Internal(format!("rank {rank}: {why}")));
        }
        if superseded() {
            return Err(Error::Coordinator(format!(
                "view epoch {} was superseded while connecting",
                view.epoch
            )));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let who: Vec<String> = (0..rank)
                .filter(|r| peers[*r].is_none())
                .map(|r| format!("rank {r} ({})", view.members[r].hostname))
                .collect();
            return Err(Error::Timeout {
                what: format!(
                    "waiting for connections from {} (view epoch {})",
                    who.join(", "),
                    view.epoch
                ),
                secs: 0.0,
            });
        }
        list = stash
            .cv
            .wait_timeout(list, left.min(Duration::from_millis(50)))
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
    drop(list);
    let used = names
        .iter()
        .enumerate()
        .filter_map(|(r, n)| n.map(|n| (r, n)))
        .collect();
    Ok((peers, used))
}

mod lazy;
pub(super) use lazy::Dialer;

#[cfg(test)]
mod data_hello_tests;
