//! Lazy connections (BRAID_LAZY_CONNECT=1, the default): the peers of the view installed at
//! init are connected at their first use, by either side, without the other side's
//! application.
//!
//! The lower rank of a pair is the only one that dials a data connection, so there is never
//! more than one per pair. A higher rank that needs a lower one asks it to dial: it connects to
//! the lower rank's listener with a dial-back hello (the data hello with
//! [`super::HELLO_DIAL_BACK`] set, under the same MACs), which the lower rank's acceptor hands
//! to [`Dialer::asked_by`]. The lower rank then dials the higher one from a connector thread,
//! at the address its OWN view gives for that rank (never one taken from the request), exactly
//! as its application would at first use. The connection waits, dialed, in [`Link::Ready`]
//! until the lower rank's application claims it, and, accepted, in the higher rank's [`Stash`]
//! until the higher rank claims it. So a higher rank waits for the lower rank's dial, not for
//! its application.
//!
//! Every connection of the view is made by connector threads (at most [`MAX_CONNECTORS`] at
//! once); the application and the progress thread only start them and wait or poll
//! ([`Dialer::ensure`], [`Dialer::poll`]). One state per peer ([`Link`]) is shared by the
//! application and the acceptor side: a dial-back request and a first use never both dial.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use braid_transport::{Challenge, Transport};

use crate::comm::{lock, panic_message};
use crate::error::{Error, Result};
use crate::exec::{Peer, Tripwire};
use crate::membership::{Client, View};

use super::{claim, dial, hello_bytes_as, pick, Stash};

/// How long telling one peer of a failure may take ([`Dialer::tell_failure`]).
const TELL_DEADLINE: Duration = Duration::from_secs(2);
/// Connector threads of one view at most (more connections wait their turn).
const MAX_CONNECTORS: usize = 8;
/// A lower rank asked to connect that has not connected after this long is asked again (its
/// acceptor may have dropped the request: too many connections of a view it did not know yet).
const ASK_AGAIN: Duration = Duration::from_secs(2);

/// The connection state of one peer.
enum Link {
    /// Not connected, nothing under way.
    Idle,
    /// A connector thread dials it (a higher rank) or asks it to dial (a lower rank).
    Busy,
    /// A lower rank was asked to dial this rank (at that instant): its connection arrives in
    /// the stash.
    Asked(Instant),
    /// Dialed (a higher rank): waits for the communicator to take it.
    Ready(Peer),
    /// The communicator holds the connection, or it was aborted to tell the peer of this
    /// communicator's failure.
    Taken,
    /// Connecting failed; the error names the peer.
    Failed(Error),
    /// Asking a lower rank to connect failed at this instant (the error names it): reported
    /// after [`TELL_DEADLINE`], unless its connection arrives meanwhile (a rank that failed
    /// tells the higher ranks so before it goes: that reason is the better error).
    Lost(Error, Instant),
}

struct Links {
    /// By rank.
    slots: Vec<Link>,
    /// Bumped at every change (and every connection the stash accepts): waiters sleep only
    /// while it is unchanged.
    gen: u64,
    /// The communicator failed with this reason: connections made from now on tell the peer
    /// (they are aborted with it).
    failed: Option<String>,
    /// The view was replaced or the communicator dropped: connections made from now on are
    /// closed, refusing peers are given up.
    closed: bool,
    /// Peers for the connector threads, in order.
    tasks: VecDeque<usize>,
    /// Connector threads running.
    workers: usize,
}

/// Lazy connections of one installed view: the peers a job needs are connected before it runs
/// (see the module documentation).
pub(in crate::comm) struct Dialer {
    transports: Vec<Arc<dyn Transport>>,
    /// Accepted connections (those of this view wait here for their first use).
    stash: Arc<Stash>,
    /// Job token for data-connection hellos.
    token: Option<Vec<u8>>,
    /// The membership client (shared with the communicator): a newer view or an expulsion
    /// stops retrying a peer whose listener refuses.
    client: Arc<Mutex<Option<Client>>>,
    view: View,
    rank: usize,
    member: u64,
    /// BRAID_TIMEOUT: the deadline of every connection and every wait for one.
    timeout: Duration,
    /// The communicator's abort flag.
    abort: Arc<AtomicBool>,
    /// The membership's news about the view's members.
    trip: Arc<Tripwire>,
    links: Mutex<Links>,
    cv: Condvar,
}

/// Why waiting on `peer` should stop: the membership dropped it for a failure (`PeerLost`),
/// or this member lost the coordinator.
fn tripped(trip: &Tripwire, view: &View, peer: usize) -> Option<Error> {
    if !trip.set.load(Ordering::Relaxed) {
        return None;
    }
    let m = &view.members[peer];
    let dropped = trip.dropped.lock().map(|d| d.clone()).unwrap_or_default();
    if let Some((_, why)) = dropped.iter().find(|(id, _)| *id == m.id) {
        return Some(Error::PeerLost {
            rank: peer,
            member: m.id,
            host: m.hostname.clone(),
            detail: format!("removed from the group by the coordinator: {why}"),
        });
    }
    let iso = trip.isolated.lock().ok().and_then(|g| g.clone());
    iso.map(Error::Coordinator)
}

impl Dialer {
    /// The lazy connections of `view` for its rank `rank` (member `member`); nothing is
    /// connected yet.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::comm) fn new(
        transports: Vec<Arc<dyn Transport>>,
        stash: Arc<Stash>,
        token: Option<Vec<u8>>,
        client: Arc<Mutex<Option<Client>>>,
        view: View,
        rank: usize,
        member: u64,
        timeout: Duration,
        abort: Arc<AtomicBool>,
        trip: Arc<Tripwire>,
    ) -> Arc<Dialer> {
        let n = view.members.len();
        Arc::new(Dialer {
            transports,
            stash,
            token,
            client,
            view,
            rank,
            member,
            timeout,
            abort,
            trip,
            links: Mutex::new(Links {
                slots: (0..n).map(|_| Link::Idle).collect(),
                gen: 0,
                failed: None,
                closed: false,
                tasks: VecDeque::new(),
                workers: 0,
            }),
            cv: Condvar::new(),
        })
    }

    /// The epoch of this view.
    pub(in crate::comm) fn epoch(&self) -> u64 {
        self.view.epoch
    }

    /// Wakes the waiters (the stash accepted a connection).
    pub(in crate::comm) fn wake(&self) {
        lock(&self.links).gen += 1;
        self.cv.notify_all();
    }

    /// The acceptor received a verified dial-back request of this view from rank `r`: dials
    /// it (from a connector thread) unless it is connected or being connected. Never blocks.
    pub(in crate::comm) fn asked_by(self: &Arc<Self>, r: usize) {
        let n = self.view.members.len();
        if r <= self.rank || r >= n {
            tracing::warn!(target: "braid::net", "rank {}: ignoring a dial-back request from rank {r} of view epoch {} (only a higher rank asks a lower one)", self.rank, self.view.epoch);
            return;
        }
        let mut g = lock(&self.links);
        if g.closed {
            return;
        }
        if matches!(g.slots[r], Link::Idle | Link::Failed(_)) {
            tracing::debug!(target: "braid::net", "rank {}: rank {r} asks to be connected to", self.rank);
            self.start(&mut g, r);
        }
    }

    /// Hands peer `p` to a connector thread (starting one if fewer than [`MAX_CONNECTORS`]
    /// run).
    fn start(self: &Arc<Self>, g: &mut Links, p: usize) {
        g.slots[p] = Link::Busy;
        g.tasks.push_back(p);
        g.gen += 1;
        if g.workers < MAX_CONNECTORS {
            g.workers += 1;
            let d = self.clone();
            let spawned = std::thread::Builder::new()
                .name("braid-connect".into())
                .spawn(move || d.connector());
            if let Err(e) = spawned {
                g.workers -= 1;
                tracing::warn!(target: "braid::net", "rank {}: spawning a connector thread: {e}", self.rank);
                if g.workers == 0 {
                    // Nobody would run the queued connections: they fail.
                    let err = Error::System(format!("spawning a connector thread: {e}"));
                    while let Some(q) = g.tasks.pop_front() {
                        g.slots[q] = Link::Failed(err.clone());
                    }
                }
            }
        }
        self.cv.notify_all();
    }

    /// A connector thread: connects the queued peers, then ends.
    fn connector(self: Arc<Self>) {
        loop {
            let p = {
                let mut g = lock(&self.links);
                match g.tasks.pop_front() {
                    Some(p) => p,
                    None => {
                        g.workers -= 1;
                        return;
                    }
                }
            };
            let run =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.connect_one(p)));
            if let Err(payload) = run {
                let e = Error::Internal(format!(
                    "rank {}: the connector thread panicked connecting rank {p}: {}",
                    self.rank,
                    panic_message(&*payload)
                ));
                tracing::error!(target: "braid::net", "{e}");
                self.settle(p, Link::Failed(e));
            }
        }
    }

    /// Sets peer `p`'s state to `next` if a connector still owns it ([`Link::Busy`]), and
    /// wakes the waiters.
    fn settle(&self, p: usize, next: Link) {
        let mut g = lock(&self.links);
        if matches!(g.slots[p], Link::Busy) {
            g.slots[p] = next;
        }
        g.gen += 1;
        drop(g);
        self.cv.notify_all();
    }

    /// Why a connection to `p` under way should stop: abort, the membership dropped `p`, a
    /// newer view, or this view replaced.
    fn give_up(&self, p: usize) -> Option<Error> {
        if self.abort.load(Ordering::Relaxed) {
            return Some(Error::Aborted);
        }
        if let Some(e) = tripped(&self.trip, &self.view, p) {
            return Some(e);
        }
        let (closed, superseded) = (lock(&self.links).closed, self.superseded());
        (closed || superseded).then(|| {
            Error::Coordinator(format!(
                "view epoch {} was {} while connecting to rank {p}",
                self.view.epoch,
                if closed { "replaced" } else { "superseded" }
            ))
        })
    }

    /// Whether a newer view was announced or this member was expelled (without blocking: a
    /// client lock held elsewhere counts as no news).
    fn superseded(&self) -> bool {
        match self.client.try_lock() {
            Ok(g) => g
                .as_ref()
                .is_some_and(|c| c.announced_epoch() > self.view.epoch || c.expelled().is_some()),
            Err(_) => false,
        }
    }

    /// A connector's work on peer `p`: dials a higher rank, or asks a lower one to dial.
    fn connect_one(&self, p: usize) {
        let rank = self.rank;
        let telling = lock(&self.links).failed.clone();
        if p < rank {
            if telling.is_some() {
                // Its connection is aborted with the reason when it arrives (Stash::fail).
                self.settle(p, Link::Idle);
                return;
            }
            let next = match self.ask(p) {
                Ok(()) => Link::Asked(Instant::now()),
                Err(e) => Link::Lost(e, Instant::now()),
            };
            self.settle(p, next);
            return;
        }
        let deadline = Instant::now()
            + if telling.is_some() {
                TELL_DEADLINE
            } else {
                self.timeout
            };
        // Telling a peer of this communicator's failure goes on after an abort.
        let give_up = || match telling {
            Some(_) => None,
            None => self.give_up(p),
        };
        let token = self.token.as_deref();
        let res = dial(
            &self.transports,
            &self.view,
            rank,
            self.member,
            token,
            p,
            deadline,
            &give_up,
        );
        let mut g = lock(&self.links);
        let (failed, closed) = (g.failed.clone(), g.closed);
        let (next, tell): (Link, Option<(Peer, String)>) = match (res, failed) {
            (Ok((peer, _)), Some(reason)) => (Link::Taken, Some((peer, reason))),
            (Ok((mut peer, name)), None) => {
                if closed {
                    drop(g);
                    peer.conn.goodbye();
                    self.settle(p, Link::Idle);
                    return;
                }
                tracing::debug!(target: "braid::net", "rank {rank}: connected to rank {p} over {name}");
                (Link::Ready(peer), None)
            }
            (Err(e), Some(_)) if telling.is_none() && !closed => {
                // The communicator failed meanwhile (an abort gave up the dial): dial again
                // to tell the peer.
                tracing::debug!(target: "braid::net", "rank {rank}: connecting to rank {p}: {e}; connecting again to tell it of the failure");
                g.tasks.push_front(p);
                return;
            }
            (Err(e), _) => {
                if telling.is_some() {
                    tracing::debug!(target: "braid::net", "rank {rank}: telling rank {p} of the failure: {e}");
                }
                (Link::Failed(e), None)
            }
        };
        if matches!(g.slots[p], Link::Busy) {
            g.slots[p] = next;
        }
        g.gen += 1;
        drop(g);
        self.cv.notify_all();
        if let Some((mut peer, reason)) = tell {
            peer.conn.abort(&reason);
        }
    }

    /// Asks the lower rank `p` to connect to this rank: a connection to its listener with the
    /// dial-back hello, closed at once. Errors name `p`: `PeerLost` when it cannot be reached
    /// by BRAID_TIMEOUT; `InvalidArgument` when it offers no transport this rank has.
    fn ask(&self, p: usize) -> Result<()> {
        let (view, rank, member) = (&self.view, self.rank, self.member);
        let m = &view.members[p];
        let (transport, h) = pick(&self.transports, view, rank, p)?;
        let token = self.token.as_deref();
        let hello =
            |c: &Challenge| hello_bytes_as(c, view.nonce, view.epoch, rank, member, token, true);
        let deadline = Instant::now() + self.timeout;
        let conn = transport
            .connect_or_give_up(&h, &hello, deadline, &|| self.give_up(p).is_some())
            .map_err(|e| {
                self.give_up(p).unwrap_or_else(|| Error::PeerLost {
                    rank: p,
                    member: m.id,
                    host: m.hostname.clone(),
                    detail: format!("asking it to connect to rank {rank} (lazy connections): {e}"),
                })
            })?;
        drop(conn);
        tracing::debug!(target: "braid::net", "rank {rank}: asked rank {p} to connect over {}", transport.name());
        Ok(())
    }

    /// One round of connecting the peers of `need` (ranks not connected in `peers`), without
    /// blocking: claims the lower ranks' connections waiting in the stash and takes the dialed
    /// ones, starts connecting the others (a lower rank asked again after [`ASK_AGAIN`]).
    /// `Ok(true)`: every peer of `need` is connected. Errors (naming the peer): connecting
    /// failed; `Aborted`; the accept thread died; the membership dropped a peer waited for.
    pub(in crate::comm) fn poll(
        self: &Arc<Self>,
        peers: &mut [Option<Peer>],
        need: &[usize],
    ) -> Result<bool> {
        let rank = self.rank;
        let view = &self.view;
        let mut claimed = Vec::new();
        if need.iter().any(|&p| p < rank && peers[p].is_none()) {
            let mut list = lock(&self.stash.list);
            // Claim the verified connections of this view from the lower ranks awaited;
            // refuse those from ranks that do not connect to this one; keep the rest (later
            // uses, later views).
            let mut i = 0;
            while i < list.len() {
                let h = list[i].hello;
                if h.epoch != view.epoch
                    || h.dial_back
                    || (h.rank < rank && (!need.contains(&h.rank) || peers[h.rank].is_some()))
                {
                    i += 1;
                    continue;
                }
                let a = list.swap_remove(i);
                if let Some((r, transport)) = claim(&self.stash, view, rank, peers, a) {
                    tracing::debug!(target: "braid::net", "rank {rank}: connection from rank {r} over {transport} claimed at first use");
                    claimed.push(r);
                }
            }
        }
        let mut g = lock(&self.links);
        for r in claimed {
            g.slots[r] = Link::Taken;
        }
        let mut done = true;
        for &p in need {
            if p == rank || p >= peers.len() || peers[p].is_some() {
                continue;
            }
            let again = match &g.slots[p] {
                Link::Ready(_) => {
                    if let Link::Ready(peer) = std::mem::replace(&mut g.slots[p], Link::Taken) {
                        peers[p] = Some(peer);
                    }
                    continue;
                }
                Link::Failed(e) => return Err(e.clone()),
                Link::Lost(e, at) if at.elapsed() >= TELL_DEADLINE => return Err(e.clone()),
                Link::Lost(..) => false,
                Link::Taken => {
                    let why = g.failed.clone().unwrap_or_else(|| "closed".into());
                    return Err(Error::Internal(format!(
                        "rank {rank}: the connection to rank {p} is gone: this communicator failed ({why})"
                    )));
                }
                Link::Idle => true,
                Link::Asked(at) => at.elapsed() >= ASK_AGAIN,
                Link::Busy => false,
            };
            if again {
                self.start(&mut g, p);
            }
            done = false;
        }
        drop(g);
        if done {
            return Ok(true);
        }
        if self.abort.load(Ordering::Relaxed) {
            return Err(Error::Aborted);
        }
        if let Some(why) = lock(&self.stash.dead).clone() {
            return Err(Error::Internal(format!("rank {rank}: {why}")));
        }
        let waited = need
            .iter()
            .filter(|&&p| p < peers.len() && peers[p].is_none());
        if let Some(e) = waited
            .filter(|&&p| p != rank)
            .find_map(|&p| tripped(&self.trip, view, p))
        {
            return Err(e);
        }
        Ok(false)
    }

    /// The change count, read before a [`Dialer::poll`] whose result is waited on with
    /// [`Dialer::wait`].
    pub(in crate::comm) fn gen(&self) -> u64 {
        lock(&self.links).gen
    }

    /// Waits at most `d` for a change since `gen`.
    pub(in crate::comm) fn wait(&self, gen: u64, d: Duration) {
        let g = lock(&self.links);
        if g.gen != gen {
            return;
        }
        drop(
            self.cv
                .wait_timeout(g, d)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0),
        );
    }

    /// The error of peers of `need` still not connected at the deadline (BRAID_TIMEOUT).
    pub(in crate::comm) fn timed_out(&self, peers: &[Option<Peer>], need: &[usize]) -> Error {
        let rank = self.rank;
        let who: Vec<String> = need
            .iter()
            .filter(|&&p| p != rank && p < peers.len() && peers[p].is_none())
            .map(|&p| format!("rank {p} ({})", self.view.members[p].hostname))
            .collect();
        Error::Timeout {
            what: format!(
                "rank {rank}: waiting for the connection with {} (view epoch {}; lazy connections, BRAID_LAZY_CONNECT=1: the lower rank of a pair connects, asked by the higher one)",
                who.join(", "),
                self.view.epoch
            ),
            secs: self.timeout.as_secs_f64(),
        }
    }

    /// Connects the peers of `need` that are not connected yet, waiting for them (by
    /// BRAID_TIMEOUT). Errors name the peer: `PeerLost` (cannot connect or ask it to connect,
    /// or dropped by the membership), `InvalidArgument` (no transport in common), `Timeout`
    /// (no connection in time); `Aborted`; `Coordinator` (isolated, or the view superseded
    /// while a peer refused).
    pub(in crate::comm) fn ensure(
        self: &Arc<Self>,
        peers: &mut [Option<Peer>],
        need: &mut Vec<usize>,
    ) -> Result<()> {
        need.retain(|&p| p != self.rank && p < peers.len() && peers[p].is_none());
        if need.is_empty() {
            return Ok(());
        }
        need.sort_unstable();
        need.dedup();
        let deadline = Instant::now() + self.timeout;
        loop {
            let gen = self.gen();
            if self.poll(peers, need)? {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timed_out(peers, need));
            }
            self.wait(gen, left.min(Duration::from_millis(50)));
        }
    }

    /// The communicator failed with `reason` (sticky error or abort): tells the peers that
    /// have no connection with this rank in use, once. Connections that arrive from lower
    /// ranks are aborted with the reason ([`Stash::fail`]); dialed connections not taken yet
    /// are aborted; the higher ranks not connected are connected to by connector threads
    /// (at most [`TELL_DEADLINE`] each) and aborted, best effort. Never blocks.
    pub(in crate::comm) fn tell_failure(self: &Arc<Self>, reason: &str) {
        {
            let mut g = lock(&self.links);
            if g.failed.is_some() {
                return;
            }
            g.failed = Some(reason.to_string());
        }
        self.stash.fail(self.view.epoch, reason);
        let mut ready = Vec::new();
        let mut g = lock(&self.links);
        for p in self.rank + 1..g.slots.len() {
            if matches!(g.slots[p], Link::Ready(_)) {
                if let Link::Ready(peer) = std::mem::replace(&mut g.slots[p], Link::Taken) {
                    ready.push(peer);
                }
            } else if matches!(g.slots[p], Link::Idle | Link::Failed(_)) && !g.closed {
                self.start(&mut g, p);
            }
        }
        drop(g);
        for mut p in ready {
            p.conn.abort(reason);
        }
    }

    /// The view is replaced or the communicator dropped: no more dial-back requests are
    /// served, connections made from now on are closed, and dialed ones not taken are closed
    /// now.
    pub(in crate::comm) fn close(self: &Arc<Self>) {
        self.stash.forget(self);
        let mut ready = Vec::new();
        {
            let mut g = lock(&self.links);
            g.closed = true;
            g.gen += 1;
            for s in g.slots.iter_mut() {
                if matches!(s, Link::Ready(_)) {
                    if let Link::Ready(peer) = std::mem::replace(s, Link::Idle) {
                        ready.push(peer);
                    }
                }
            }
        }
        self.cv.notify_all();
        for mut p in ready {
            p.conn.goodbye();
        }
    }
}
