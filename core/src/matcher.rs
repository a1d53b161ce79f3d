//! Matching of point-to-point receives to messages by tag and source, as MPI, Gloo and
//! torch.distributed do: a receive takes the first message from its source (or from any rank,
//! [`ANY_SOURCE`]) whose tag is its own, whatever was sent before it. Collectives never come
//! here: their messages match in order, by sequence number.
//!
//! A receive is not posted on a connection until the header of the message it will take has
//! arrived ([`braid_transport::Conn::peek`]): then it is posted for exactly that message, so
//! the data lands in the receiver's buffer with no copy, and the transport's single-copy paths
//! work as before. A message that arrives while receives wait on its sender and that none of
//! them wants (another tag) is received into a buffer of its own and held for a later receive
//! (one copy), up to a cap on the bytes held ([`UNEXPECTED_BYTES`], `BRAID_P2P_HOLD_BYTES`);
//! past the cap it stays in the connection, and what waits behind it waits until
//! `BRAID_TIMEOUT`, whose error names the message. A message whose tag matches but whose type
//! or length differs is a mismatch, reported before any data moves.
//!
//! Connections that cannot peek (ib) keep the transport's in-order matching.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use braid_transport::{Meta, Peeked, Request};

use crate::coll::CollKind;
use crate::error::{Error, Result};
use crate::exec::{net_error, Peer, Sig};
use crate::mem::RawBuf;

/// The `peer` of a receive from any rank ([`crate::Communicator::recv_any`]).
pub(crate) const ANY_SOURCE: usize = usize::MAX;

/// Default cap on the bytes of messages held for receives not posted yet
/// (`BRAID_P2P_HOLD_BYTES`).
pub(crate) const UNEXPECTED_BYTES: usize = 64 << 20;

/// A receive waiting for its message.
struct Want {
    id: u64,
    /// A rank, or [`ANY_SOURCE`].
    peer: usize,
    sig: Sig,
    meta: Meta,
    ptr: *mut u8,
    len: usize,
}

/// A receive posted on a connection.
enum Active {
    /// Into the buffer of receive `id`.
    User { id: u64, req: Request },
    /// A message no receive wanted, into a buffer of its own.
    Hold {
        req: Request,
        tag: u64,
        meta: Meta,
        data: Vec<u8>,
    },
}

/// A message received before its receive was posted.
struct Held {
    tag: u64,
    meta: Meta,
    data: Vec<u8>,
    /// Arrival order across ranks (any-source receives take the oldest).
    arrival: u64,
}

/// Receives matched by tag and source (see the module documentation).
pub(crate) struct Matcher {
    next_id: u64,
    wants: VecDeque<Want>,
    /// Per rank: the receive posted on its connection, if any.
    active: Vec<Option<Active>>,
    /// Per rank: messages held, in arrival order.
    held: Vec<VecDeque<Held>>,
    held_bytes: usize,
    /// Cap on `held_bytes`.
    pub budget: usize,
    arrivals: u64,
    /// Receives that completed: (id, source rank).
    done: Vec<(u64, usize)>,
    /// Per rank: the header at the head of its connection that nothing took (for errors).
    stalled: Vec<Option<String>>,
    /// Where the next look at the connections starts (any-source fairness).
    rotate: usize,
}

// SAFETY: the raw pointers in `Want` point into receive buffers that the caller of the
// point-to-point operation keeps valid until the operation completes or the communicator
// fails (then `reset` forgets them); which thread drives the matcher does not matter.
unsafe impl Send for Matcher {}

impl Matcher {
    pub(crate) fn new() -> Matcher {
        Matcher {
            next_id: 0,
            wants: VecDeque::new(),
            active: Vec::new(),
            held: Vec::new(),
            held_bytes: 0,
            budget: UNEXPECTED_BYTES,
            arrivals: 0,
            done: Vec::new(),
            stalled: Vec::new(),
            rotate: 0,
        }
    }

    /// Registers a receive into `buf` from `peer` (or [`ANY_SOURCE`]) with signature `sig`;
    /// returns its id for [`Matcher::take_done`].
    pub(crate) fn post(&mut self, peer: usize, buf: &RawBuf, sig: Sig) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        self.wants.push_back(Want {
            id,
            peer,
            sig,
            meta: sig.encode(),
            ptr: buf.at(0, buf.len())?,
            len: buf.len(),
        });
        Ok(id)
    }

    /// The source rank of receive `id`, once it completed.
    pub(crate) fn take_done(&mut self, id: u64) -> Option<usize> {
        let i = self.done.iter().position(|d| d.0 == id)?;
        Some(self.done.swap_remove(i).1)
    }

    /// Forgets every receive (the communicator failed; its connections are aborted).
    pub(crate) fn reset(&mut self) {
        self.wants.clear();
        self.active.iter_mut().for_each(|a| *a = None);
        self.done.clear();
    }

    /// Whether nothing waits and nothing is posted.
    pub(crate) fn idle(&self) -> bool {
        self.wants.is_empty() && self.active.iter().all(|a| a.is_none())
    }

    /// One round: completes posted receives, serves waiting receives from held messages,
    /// looks at the connections of ranks that receives wait on and posts what matches, per
    /// rank until nothing more moves there. Returns whether anything moved.
    pub(crate) fn step(&mut self, peers: &mut [Option<Peer>], me: usize) -> Result<bool> {
        let n = peers.len();
        if self.active.len() < n {
            self.active.resize_with(n, || None);
            self.held.resize_with(n, VecDeque::new);
            self.stalled.resize(n, None);
        }
        let mut moved = self.serve_held(me)?;
        self.rotate = (self.rotate + 1) % n.max(1);
        for k in 0..n {
            let p = (self.rotate + k) % n;
            let Some(peer) = peers[p].as_mut() else {
                continue;
            };
            loop {
                if self.active[p].is_some() {
                    match self.complete(peer, p, me)? {
                        None => break,
                        Some(held) => {
                            moved = true;
                            // A held message goes to its receive before anything after it
                            // from this rank is looked at (same tags match in order).
                            if held {
                                self.serve_held(me)?;
                            }
                            continue;
                        }
                    }
                }
                if !self
                    .wants
                    .iter()
                    .any(|w| w.peer == p || w.peer == ANY_SOURCE)
                {
                    break;
                }
                if !self.look(peer, p, me)? {
                    break;
                }
                moved = true;
            }
        }
        Ok(moved)
    }

    /// Tests the receive posted on rank `p`'s connection: `None` while it runs, else whether
    /// it held a message (rather than filling a receive's buffer).
    fn complete(&mut self, peer: &mut Peer, p: usize, me: usize) -> Result<Option<bool>> {
        let req = match &self.active[p] {
            Some(Active::User { req, .. } | Active::Hold { req, .. }) => *req,
            None => return Ok(None),
        };
        let what = || format!("a receive from rank {p}");
        // A small message is often complete already (posting it copied what had arrived):
        // test first, move bytes only when it is not.
        let mut c = peer
            .conn
            .test(req)
            .map_err(|e| net_error(peer, e, me, &what()))?;
        if c.is_none() {
            peer.conn
                .progress()
                .map_err(|e| net_error(peer, e, me, &what()))?;
            c = peer
                .conn
                .test(req)
                .map_err(|e| net_error(peer, e, me, &what()))?;
        }
        if c.is_none() {
            return Ok(None);
        }
        Ok(Some(match self.active[p].take() {
            Some(Active::User { id, .. }) => {
                self.done.push((id, p));
                false
            }
            Some(Active::Hold {
                tag, meta, data, ..
            }) => {
                self.arrivals += 1;
                self.held[p].push_back(Held {
                    tag,
                    meta,
                    data,
                    arrival: self.arrivals,
                });
                true
            }
            None => false,
        }))
    }

    /// Serves waiting receives, in posting order, from the messages held.
    fn serve_held(&mut self, me: usize) -> Result<bool> {
        if self.held_bytes == 0 && self.held.iter().all(|h| h.is_empty()) {
            return Ok(false);
        }
        let mut moved = false;
        let mut i = 0;
        while i < self.wants.len() {
            let w = &self.wants[i];
            let tag = w.sig.seq;
            // The oldest held message with this tag from the receive's source(s).
            let mut best: Option<(usize, usize, u64)> = None;
            for (p, q) in self.held.iter().enumerate() {
                if w.peer != ANY_SOURCE && w.peer != p {
                    continue;
                }
                if let Some(j) = q.iter().position(|h| h.tag == tag) {
                    let a = q[j].arrival;
                    if best.map_or(true, |b| a < b.2) {
                        best = Some((p, j, a));
                    }
                }
            }
            let Some((p, j, _)) = best else {
                i += 1;
                continue;
            };
            let h = self.held[p]
                .remove(j)
                .ok_or_else(|| Error::Internal("held message".into()))?;
            self.held_bytes -= h.data.len();
            let Some(w) = self.wants.remove(i) else {
                break;
            };
            check(&w, p, me, &h.meta, h.data.len() as u64)?;
            // SAFETY: `w.ptr..+len` is the receive's buffer (valid until it completes, see
            // `Matcher`'s Send note); `check` made the lengths equal; the held buffer is ours.
            unsafe { std::ptr::copy_nonoverlapping(h.data.as_ptr(), w.ptr, w.len) };
            self.done.push((w.id, p));
            moved = true;
        }
        Ok(moved)
    }

    /// Looks at the head of rank `p`'s connection (nothing posted there) and posts the
    /// receive that wants it, or holds it.
    fn look(&mut self, peer: &mut Peer, p: usize, me: usize) -> Result<bool> {
        if !peer.conn.can_peek() {
            // Receives from such ranks are posted at once (`Exec::p2p_begin`), and any-source
            // receives are refused where a connection cannot peek.
            return Ok(false);
        }
        let what = || format!("a receive from rank {p}");
        let Some(h) = peer
            .conn
            .peek()
            .map_err(|e| net_error(peer, e, me, &what()))?
        else {
            return Ok(false);
        };
        let sig = Sig::decode(&h.meta);
        if sig.map(|s| s.kind) != Some(CollKind::P2p) {
            // The rank has gone on to a collective: this is not for a point-to-point receive.
            self.stalled[p] = Some(format!(
                "rank {p} sent {} next",
                Sig::describe_meta(&h.meta)
            ));
            return Ok(false);
        }
        if let Some(i) = self
            .wants
            .iter()
            .position(|w| (w.peer == p || w.peer == ANY_SOURCE) && w.sig.seq == h.tag)
        {
            check(&self.wants[i], p, me, &h.meta, h.len)?;
            self.stalled[p] = None;
            return self.post_user(peer, p, me, i);
        }
        self.hold(peer, p, me, &h)
    }

    /// Posts waiting receive `i` on rank `p`'s connection.
    fn post_user(&mut self, peer: &mut Peer, p: usize, me: usize, i: usize) -> Result<bool> {
        let w = &self.wants[i];
        // SAFETY: the receive's buffer stays valid until it completes or the communicator
        // fails (see `Matcher`'s Send note); it overlaps no other posted buffer.
        let r = unsafe { peer.conn.irecv(w.sig.seq, w.ptr, w.len) }
            .map_err(|e| net_error(peer, e, me, &w.sig.describe_dir(false, p)))?;
        let Some(req) = r else {
            return Ok(false);
        };
        let id = w.id;
        self.wants.remove(i);
        self.active[p] = Some(Active::User { id, req });
        Ok(true)
    }

    /// Receives the message at the head of rank `p`'s connection into a buffer of its own
    /// (no receive wants it yet), within the cap on held bytes.
    fn hold(&mut self, peer: &mut Peer, p: usize, me: usize, h: &Peeked) -> Result<bool> {
        let len = usize::try_from(h.len).unwrap_or(usize::MAX);
        if len > self.budget.saturating_sub(self.held_bytes) {
            self.stalled[p] = Some(format!(
                "rank {p} sent {} ({} bytes) that no receive wants; holding it would pass \
                 BRAID_P2P_HOLD_BYTES ({} bytes, {} held)",
                Sig::describe_meta(&h.meta),
                h.len,
                self.budget,
                self.held_bytes
            ));
            return Ok(false);
        }
        let mut data = vec![0u8; len];
        // SAFETY: `data` is owned by the matcher until the receive completes; its heap buffer
        // does not move when the Vec does; the connection is aborted (dropped first, see
        // `State`) before the matcher could drop it while posted.
        let r = unsafe { peer.conn.irecv(h.tag, data.as_mut_ptr(), len) }
            .map_err(|e| net_error(peer, e, me, "a receive held for a later tag"))?;
        let Some(req) = r else {
            return Ok(false);
        };
        self.held_bytes += len;
        self.stalled[p] = None;
        self.active[p] = Some(Active::Hold {
            req,
            tag: h.tag,
            meta: h.meta,
            data,
        });
        Ok(true)
    }

    /// What the waiting receives wait for and what arrived instead (for a timeout's message);
    /// empty when nothing waits.
    pub(crate) fn describe(&self) -> String {
        let mut s = String::new();
        for w in self.wants.iter().take(4) {
            let from = if w.peer == ANY_SOURCE {
                "any rank".to_string()
            } else {
                format!("rank {}", w.peer)
            };
            s.push_str(&format!("; waiting for tag {} from {from}", w.sig.seq));
        }
        for (p, q) in self.held.iter().enumerate() {
            for h in q.iter().take(4) {
                s.push_str(&format!(
                    "; held from rank {p}: tag {} ({} bytes)",
                    h.tag,
                    h.data.len()
                ));
            }
        }
        for st in self.stalled.iter().flatten() {
            s.push_str(&format!("; {st}"));
        }
        s
    }
}

/// The mismatch error when rank `p`'s message (`meta`, `len` bytes) under receive `w`'s tag
/// differs from what `w` expects (type or count).
fn check(w: &Want, p: usize, me: usize, meta: &Meta, len: u64) -> Result<()> {
    if *meta == w.meta && len == w.len as u64 {
        return Ok(());
    }
    let remote = match Sig::decode(meta) {
        Some(s) => s.describe_dir(true, me),
        None => Sig::describe_meta(meta),
    };
    Err(Error::Mismatch {
        rank: me,
        peer: p,
        local: format!("{} expecting {} bytes", w.sig.describe_dir(false, p), w.len),
        remote: format!("{remote} sending {len} bytes"),
    })
}

/// A receive's source slot: `usize::MAX` until the receive completed, then the rank.
pub(crate) type SourceSlot = Arc<AtomicUsize>;

/// Stores `rank` in `slot` (if any).
pub(crate) fn set_source(slot: &Option<SourceSlot>, rank: usize) {
    if let Some(s) = slot {
        s.store(rank, Ordering::Release);
    }
}
