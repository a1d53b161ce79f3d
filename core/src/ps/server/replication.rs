//! Replication: an owner sends every write it applied to the part's other copies (the next
//! servers of the ring) and answers the worker once each acknowledged it; a replica applies
//! what its owner applied, with the owner's update rule.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::dispatch::{Effects, WriteReq};
use super::{apply_events, complete, dtype_of, flush, lock, Out, SInner, SState, Write};
use crate::ps::pool::{runs, Seg};
use crate::ps::wire::{parts_len, Msg, PartRef};

/// A replication to send: (replica server, message, the body's segments).
pub(super) type Rep = (u64, Msg, Vec<Seg>);

/// A byte range of a message body: (offset, length).
type Span = (usize, usize);

/// The replications of one write request being applied: per replica server, its parts and
/// where their bytes are in the request's body.
#[derive(Default)]
pub(super) struct FanOut {
    per_replica: BTreeMap<u64, (Vec<PartRef>, Vec<Span>)>,
}

impl FanOut {
    /// Part `p`, at byte `off` of the body, was applied here: every other copy gets it.
    pub(super) fn add(&mut self, inner: &SInner, st: &SState, p: &PartRef, off: usize) {
        if inner.opts.replicas == 0 {
            return;
        }
        for r in st.ring.owners(p.s, inner.opts.replicas).into_iter().skip(1) {
            if r != inner.me {
                let e = self.per_replica.entry(r).or_default();
                e.0.push(*p);
                e.1.push((off, p.n));
            }
        }
    }

    /// One replication message per replica server (sent after the state lock is released);
    /// the request's answer now also waits for each one's acknowledgement. With `shared` (the
    /// receive buffer `body` is the front of) the replicas' parts are sent from it as they
    /// are, one segment per run of adjacent parts; else copied.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn send(
        self,
        inner: &SInner,
        st: &mut SState,
        from: u64,
        w: &WriteReq,
        body: &[u8],
        shared: Option<&Arc<Vec<u8>>>,
        fx: &mut Effects,
    ) {
        let shared = shared.filter(|b| b.as_ptr() == body.as_ptr());
        for (r, (ps, at)) in self.per_replica {
            let data = match shared {
                Some(buf) => spans_of(buf, &at),
                None => None,
            };
            let data = data.unwrap_or_else(|| {
                // A copy of the replica's parts, in a pooled buffer (a fresh one per push
                // cost a page fault per 4 KiB).
                let total = at.iter().map(|(_, n)| n).sum();
                vec![Seg::Owned(lock(&inner.rep_bodies).fill(total, |b| {
                    for (o, n) in &at {
                        b.extend_from_slice(&body[*o..*o + *n]);
                    }
                }))]
            });
            let seq = st.rep_seq;
            st.rep_seq += 1;
            st.rep_wait.insert(seq, (from, w.req, r));
            if let Some(a) = st.aggs.get_mut(&(from, w.req)) {
                a.reps += 1;
            }
            let (op, dtype) = (w.op, w.dtype.clone());
            let op = match w.write {
                Write::Init => Msg::Init {
                    req: 0,
                    op,
                    prio: 0,
                    dtype,
                    parts: ps,
                },
                Write::Push => Msg::Push {
                    req: 0,
                    op,
                    prio: 0,
                    dtype,
                    parts: ps,
                },
                Write::State => Msg::PushState {
                    req: 0,
                    op,
                    prio: 0,
                    dtype,
                    parts: ps,
                },
            };
            fx.reps.push((
                r,
                Msg::Replicate {
                    seq,
                    worker: from,
                    op: Box::new(op),
                    rule: if w.write == Write::Push {
                        st.rule_spec.clone()
                    } else {
                        None
                    },
                },
                data,
            ));
        }
    }
}

/// The segments of `buf` that hold `spans` in order, adjacent spans joined; `None` if one is
/// out of bounds.
fn spans_of(buf: &Arc<Vec<u8>>, spans: &[Span]) -> Option<Vec<Seg>> {
    runs(spans.iter().copied())
        .into_iter()
        .map(|(o, n)| Seg::part(buf, o, n))
        .collect()
}

/// A replication as received: (sequence, the worker whose write it is, the write, the
/// owner's update rule).
pub(super) type Replication = (u64, u64, Msg, Option<String>);

/// Applies a replication from owner `from` (each part at most once per worker operation) and
/// acknowledges it.
pub(super) fn on_replicate(
    inner: &Arc<SInner>,
    st: &mut SState,
    from: u64,
    (seq, worker, op, rule): Replication,
    body: &[u8],
    fx: &mut Effects,
) -> std::result::Result<(), String> {
    let Ok(WriteReq {
        write,
        op: wop,
        dtype,
        parts,
        ..
    }) = WriteReq::of(op)
    else {
        return Err(format!("replication {seq} carries no init or push"));
    };
    // The rule the owner applied this push with (parsed once per change).
    let owner_rule = match rule {
        None => None,
        Some(spec) => {
            let cached = st.rep_rule.as_ref().is_some_and(|(s, _)| *s == spec);
            if !cached {
                let r = crate::ps::UpdateRule::parse(&spec)
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
    if matches!(inner.opts.rule, crate::ps::UpdateRule::Custom(_)) {
        let mut km = lock(&inner.keymap);
        for p in &parts {
            km.insert(p.s, p.k);
        }
    }
    if let Some(dt) = dtype_of(&dtype) {
        let mut off = 0;
        for p in &parts {
            // In bounds: the lengths add up to the body's (checked above).
            let Some(data) = body.get(off..off + p.n) else {
                break;
            };
            off += p.n;
            if write == Write::Init {
                st.dir.insert(p.s, (p.k, p.p));
            }
            if st.dedup.seen(worker, wop, p.s) {
                continue;
            }
            // A request id of its own, so the version its acknowledgement gives is recorded
            // with the write (nobody is answered for it).
            let sreq = st.next_sreq;
            st.next_sreq += 1;
            let r = match write {
                Write::Init => {
                    let r = st.store.init(p.s, dt, data).map(|x| x.1);
                    st.store.set_total(p.s, p.t);
                    r
                }
                Write::Push => st
                    .store
                    .push_with(sreq, worker, p.s, dt, data, owner_rule.as_ref()),
                Write::State => st.store.set_state(p.s, dt, data).map(|()| Vec::new()),
            };
            let evs = r.unwrap_or_else(|e| {
                // Only when this copy and the owner's disagree on the view (a part not seeded
                // here yet): the owner still holds the update.
                tracing::warn!(target: "braid::ps", "server {}: replica of key {} part {} from server {from} not applied: {e}", inner.me, p.k, p.p);
                Vec::new()
            });
            if write == Write::Push {
                super::dispatch::record(st, sreq, worker, wop, p.s, &evs);
            } else {
                let v = st.store.version(p.s).unwrap_or(super::NO_VERSION);
                st.dedup.first(worker, wop, p.s, v);
            }
            apply_events(st, evs, &mut fx.outbox);
        }
    }
    fx.outbox
        .push((from, i32::MAX, Msg::RepAck { seq }, Vec::new()));
    Ok(())
}

/// A replica acknowledged replication `seq`: its request may be answered now.
pub(super) fn on_rep_ack(st: &mut SState, seq: u64, fx: &mut Effects) {
    if let Some((w, req, _)) = st.rep_wait.remove(&seq) {
        if let Some(a) = st.aggs.get_mut(&(w, req)) {
            a.reps = a.reps.saturating_sub(1);
        }
        complete(st, w, req, &mut fx.outbox);
    }
}

/// Replication `seq` cannot be sent (its replica is unreachable): its request is answered
/// without it (logged); the next view change re-seeds a replica. A server that is leaving
/// fails the request for a retry instead: its copy is about to go, so the worker retries at
/// the next owner.
pub(super) fn unreachable(inner: &Arc<SInner>, seq: u64) {
    let mut out: Vec<Out> = Vec::new();
    {
        let mut st = lock(&inner.st);
        if let Some((w, req, _)) = st.rep_wait.remove(&seq) {
            let leaving = inner.stop.load(Ordering::SeqCst);
            if let Some(a) = st.aggs.get_mut(&(w, req)) {
                a.reps = a.reps.saturating_sub(1);
                if leaving && a.failed.is_none() {
                    a.failed = Some((format!("server {} is leaving: retry", inner.me), true));
                }
            }
            complete(&mut st, w, req, &mut out);
        }
    }
    flush(inner, out, Vec::new());
}
