//! Message dispatch: one handler per message type a server takes in. [`handle`] checks the
//! server is not leaving, takes the state lock, runs the message's handler and, once the lock
//! is released, sends what the handler produced ([`Effects`]). Who may send what was checked
//! before (admission: [`permitted`](super::permitted), in the channel's `on_msg`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::replication;
use super::{
    announce, apply_events, ckpt, complete, dtype_of, flush, handover, lock, missing_part,
    total_mismatch, use_for_replies, Agg, Kind, Out, SInner, SState, Write,
};
use crate::ps::store::Event;
use crate::ps::wire::{parts_len, Msg, PartRef};

/// What handling one message produced, sent once the state lock is released: answers, the
/// replications of an applied write, and the parts created here (announced to the other
/// servers).
#[derive(Default)]
pub(super) struct Effects {
    pub(super) outbox: Vec<Out>,
    pub(super) reps: Vec<replication::Rep>,
    pub(super) announced: Vec<(u64, u64, u32)>,
}

/// A worker's write request: an init, a push, or a replacement of the optimizer state.
pub(super) struct WriteReq {
    pub(super) write: Write,
    pub(super) req: u64,
    /// The worker's operation id (the same on retries).
    pub(super) op: u64,
    pub(super) prio: i32,
    pub(super) dtype: String,
    pub(super) parts: Vec<PartRef>,
}

impl WriteReq {
    /// The write an init, a push or an optimizer-state write asks for; any other message
    /// back.
    pub(super) fn of(msg: Msg) -> std::result::Result<WriteReq, Msg> {
        let (write, req, op, prio, dtype, parts) = match msg {
            Msg::Init {
                req,
                op,
                prio,
                dtype,
                parts,
            } => (Write::Init, req, op, prio, dtype, parts),
            Msg::Push {
                req,
                op,
                prio,
                dtype,
                parts,
            } => (Write::Push, req, op, prio, dtype, parts),
            Msg::PushState {
                req,
                op,
                prio,
                dtype,
                parts,
            } => (Write::State, req, op, prio, dtype, parts),
            other => return Err(other),
        };
        Ok(WriteReq {
            write,
            req,
            op,
            prio,
            dtype,
            parts,
        })
    }
}

/// Handles one message from member (or reader) `from`, whose role
/// [`permitted`](super::permitted) it; `via`: the channel it came in on, for a worker's or
/// reader's (see [`use_for_replies`]). `shared`: the receive buffer `body` is the front of,
/// when the message's handling may keep ranges of it (a push forwarded to the replicas as it
/// is). `Err(reason)`: a protocol error (a part list that does not add up); the caller closes
/// the connection with that reason.
pub(super) fn handle(
    inner: &Arc<SInner>,
    from: u64,
    via: Option<&Arc<crate::ps::chan::Chan>>,
    msg: Msg,
    body: &[u8],
    shared: Option<&Arc<Vec<u8>>>,
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
    let mut fx = Effects::default();
    let r = {
        let mut guard = lock(&inner.st);
        let st = &mut *guard;
        if let Some(c) = via {
            use_for_replies(st, from, c);
        }
        match WriteReq::of(msg) {
            Ok(w) => on_write(inner, st, from, w, body, shared, &mut fx),
            Err(msg) => match msg {
                Msg::Pull {
                    req,
                    epoch: _,
                    prio,
                    parts,
                    min,
                    at,
                } => on_pull(inner, st, from, (req, prio, parts, min, at), &mut fx),
                Msg::SnapVer { req } => {
                    on_snap_ver(st, from, req, &mut fx);
                    Ok(())
                }
                Msg::Replicate {
                    seq,
                    worker,
                    op,
                    rule,
                } => replication::on_replicate(
                    inner,
                    st,
                    from,
                    (seq, worker, *op, rule),
                    body,
                    &mut fx,
                ),
                Msg::RepAck { seq } => {
                    replication::on_rep_ack(st, seq, &mut fx);
                    Ok(())
                }
                Msg::Transfer { dumps, seen, keys } => {
                    handover::on_transfer(inner, st, from, dumps, seen, keys, &mut fx)
                }
                Msg::Keys { add } => {
                    on_keys(st, add);
                    Ok(())
                }
                Msg::Checkpoint { req, id, dir } => {
                    ckpt::on_checkpoint(inner, st, from, req, &id, &dir, &mut fx);
                    Ok(())
                }
                Msg::SetRule { req, rule } => {
                    on_set_rule(inner, st, from, req, &rule, &mut fx);
                    Ok(())
                }
                Msg::PullState { req, prio, parts } => {
                    on_pull_state(inner, st, from, req, prio, &parts, &mut fx)
                }
                Msg::Bye { reason } => {
                    tracing::warn!(target: "braid::ps", "server {}: member {from} closes the connection: {reason}", inner.me);
                    Ok(())
                }
                // `permitted` lets nothing else reach a server.
                other => Err(format!("unexpected {} message", other.kind())),
            },
        }
    };
    // Sent with the state lock released, also when the message turned out to be a protocol
    // error (what it produced before that is answered).
    flush(inner, fx.outbox, fx.reps);
    announce(inner, fx.announced);
    r
}

/// A refusal of request `req` of member `from` (no retry).
fn refuse(fx: &mut Effects, from: u64, req: u64, msg: String) {
    fx.outbox.push((
        from,
        0,
        Msg::Fail {
            req,
            msg,
            retry: false,
        },
        Vec::new(),
    ));
}

/// An init, a push or an optimizer-state write: each part is applied (or refused) by the
/// store, the applied ones are replicated to the part's other copies ([`replication`]), and
/// the answer goes out once every part is done and every replication acknowledged.
fn on_write(
    inner: &Arc<SInner>,
    st: &mut SState,
    from: u64,
    w: WriteReq,
    body: &[u8],
    shared: Option<&Arc<Vec<u8>>>,
    fx: &mut Effects,
) -> std::result::Result<(), String> {
    let req = w.req;
    let kind = if w.write == Write::Init {
        Kind::Init
    } else {
        Kind::Push
    };
    let Some(dt) = dtype_of(&w.dtype) else {
        refuse(fx, from, req, format!("unknown dtype {}", w.dtype));
        return Ok(());
    };
    let total = parts_len(&w.parts).ok_or_else(|| {
        format!(
            "request {req}: {} parts whose lengths overflow or are too many",
            w.parts.len()
        )
    })?;
    if total != body.len() {
        let msg = format!(
            "message body has {} bytes, its parts say {total}",
            body.len()
        );
        refuse(fx, from, req, msg);
        return Ok(());
    }
    st.aggs.insert(
        (from, req),
        Agg {
            kind,
            prio: w.prio,
            n: w.parts.len(),
            done: 0,
            versions: vec![0; w.parts.len()],
            data: Vec::new(),
            // Held at 1 while the parts are applied: the store acknowledges an async push at
            // once, and the answer must not go out before the replications below are counted
            // (an owner dying right after would lose an acknowledged update).
            reps: 1,
            failed: None,
        },
    );
    if matches!(inner.opts.rule, crate::ps::UpdateRule::Custom(_)) {
        let mut km = lock(&inner.keymap);
        for p in &w.parts {
            km.insert(p.s, p.k);
        }
    }
    let mut off = 0;
    let mut fan = replication::FanOut::default();
    for (i, p) in w.parts.iter().enumerate() {
        let data = &body[off..off + p.n];
        if apply_part(inner, st, from, &w, dt, i, p, data, fx) {
            fan.add(inner, st, p, off);
        }
        off += p.n;
    }
    fan.send(inner, st, from, &w, body, shared, fx);
    if let Some(a) = st.aggs.get_mut(&(from, req)) {
        a.reps = a.reps.saturating_sub(1);
    }
    complete(st, from, req, &mut fx.outbox);
    // A round this push closed may be what a pending checkpoint waits for.
    ckpt::poll_checkpoint(inner, st, &mut fx.outbox);
    Ok(())
}

/// Applies part `i` (`p`, its bytes `data`) of write request `w` from member `from`, or
/// refuses it (not the owner, no copy here, another whole-key length, a store error); a
/// retry of a part applied before is acknowledged again without applying it twice. Whether
/// the part is to be replicated (not refused).
#[allow(clippy::too_many_arguments)]
fn apply_part(
    inner: &Arc<SInner>,
    st: &mut SState,
    from: u64,
    w: &WriteReq,
    dt: crate::types::DataType,
    i: usize,
    p: &PartRef,
    data: &[u8],
    fx: &mut Effects,
) -> bool {
    let sreq = st.next_sreq;
    st.next_sreq += 1;
    st.reqs.insert(sreq, (from, w.req, i, p.k));
    // Recorded only once applied (below): a part refused with "retry" must be applied when it
    // comes back.
    let dup = st.dedup.seen(from, w.op, p.s);
    let owner = st.ring.owner(p.s);
    let evs = if owner != Some(inner.me) {
        // Not (or no longer) this part's owner: the sender routes by an older view. Applying
        // it here would land on a copy the owner never sees.
        vec![Event::Error {
            req: sreq,
            key: p.s,
            msg: format!(
                "key {} part {} moved away: its owner at epoch {} is server {:?}",
                p.k, p.p, st.view.epoch, owner
            ),
        }]
    } else if let Some((why, _)) = missing_part(st, p.s) {
        // Exists in the group but no copy is here: on its way (retry) or lost (an init must
        // not create it afresh, a push has nothing to add to).
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
        // A retry of a part already applied (its acknowledgement was lost): acknowledge again
        // without applying it twice, with the version that push leads to (sync: its round,
        // perhaps still open).
        vec![Event::PushAck {
            req: sreq,
            key: p.s,
            version: st.store.ack_version(p.s, from).unwrap_or(0),
        }]
    } else {
        let r = match w.write {
            Write::Init => st.store.init(p.s, dt, data).map(|(created, evs)| {
                st.store.set_total(p.s, p.t);
                if created {
                    st.dir.insert(p.s, (p.k, p.p));
                    fx.announced.push((p.s, p.k, p.p));
                }
                let v = st.store.version(p.s).unwrap_or(0);
                let mut e = evs;
                e.push(Event::PushAck {
                    req: sreq,
                    key: p.s,
                    version: v,
                });
                e
            }),
            Write::State => st.store.set_state(p.s, dt, data).map(|()| {
                vec![Event::PushAck {
                    req: sreq,
                    key: p.s,
                    version: st.store.version(p.s).unwrap_or(0),
                }]
            }),
            Write::Push => st.store.push(sreq, from, p.s, dt, data),
        };
        r.unwrap_or_else(|e| {
            vec![Event::Error {
                req: sreq,
                key: p.s,
                msg: e.to_string(),
            }]
        })
    };
    let refused = evs
        .iter()
        .any(|e| matches!(e, Event::Error { req, .. } if *req == sreq));
    if !refused && !dup {
        record(st, sreq, from, w.op, p.s, &evs);
    }
    apply_events(st, evs, &mut fx.outbox);
    // Refused: nothing applied here, nothing to replicate. A retry of a part applied before is
    // replicated again (replicas skip what they hold): the first copy may have reached this
    // server only as a replica, after it had seeded a new replica of its own.
    !refused
}

/// Most held writes awaiting their acknowledgement's version (see [`record`]).
const HELD_KEEP: usize = 1 << 16;

/// Records the write (worker, op) to part `skey`, request `sreq`, as applied, with the version
/// of its acknowledgement among `evs`; without one (a held bounded push) the version is
/// recorded when the acknowledgement comes ([`apply_events`]).
pub(super) fn record(st: &mut SState, sreq: u64, worker: u64, op: u64, skey: u64, evs: &[Event]) {
    let ack = evs.iter().find_map(|e| match e {
        Event::PushAck { req, version, .. } if *req == sreq => Some(*version),
        _ => None,
    });
    st.dedup
        .first(worker, op, skey, ack.unwrap_or(super::NO_VERSION));
    if ack.is_none() && op != 0 {
        // Bounded: a held push whose part moves away is never acknowledged here. Forgetting
        // such entries only leaves their records out of checkpoints (a retry across a restore
        // would then be applied again, as before these records existed).
        if st.held.len() >= HELD_KEEP {
            st.held.clear();
        }
        st.held.insert(sreq, (worker, op));
    }
}

/// A pull (request `req`, priority, parts, wait for at least version `min`, or read exactly
/// version `at`): each part answers from the store now or when its round closes (sync), or
/// fails; the answer goes out once every part is done, from the store's buffers.
type PullReq = (u64, i32, Vec<PartRef>, Option<u64>, Option<u64>);

fn on_pull(
    inner: &Arc<SInner>,
    st: &mut SState,
    from: u64,
    (req, prio, parts, min, at): PullReq,
    fx: &mut Effects,
) -> std::result::Result<(), String> {
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
        let evs = pull_part(inner, st, from, sreq, p, min, at);
        apply_events(st, evs, &mut fx.outbox);
    }
    complete(st, from, req, &mut fx.outbox);
    Ok(())
}

/// The store's answer to part `p` of a pull (store request `sreq`), or why it fails.
fn pull_part(
    inner: &Arc<SInner>,
    st: &mut SState,
    from: u64,
    sreq: u64,
    p: &PartRef,
    min: Option<u64>,
    at: Option<u64>,
) -> Vec<Event> {
    let error = |msg: String| {
        vec![Event::Error {
            req: sreq,
            key: p.s,
            msg,
        }]
    };
    if let Some(lost) = st.lost_parts.get(&p.s) {
        return error(lost.clone());
    }
    if let Some(v) = at {
        return match st.store.read_shared_at(p.s, v) {
            Some(d) if d.len() == p.n => vec![Event::Value {
                req: sreq,
                key: p.s,
                version: v,
                data: d,
            }],
            Some(d) => error(format!(
                "key {} part {} has {} bytes, the request says {}",
                p.k,
                p.p,
                d.len(),
                p.n
            )),
            None => error(format!(
                "version {v} of key {} is not held (evicted or not reached)",
                p.k
            )),
        };
    }
    if st.ring.owner(p.s) != Some(inner.me) {
        return error(format!(
            "key {} part {} moved away: this server does not own it at epoch {}",
            p.k, p.p, st.view.epoch
        ));
    }
    if let Some((why, _)) = missing_part(st, p.s) {
        return error(why);
    }
    if let Some(held) = st
        .store
        .get(p.s)
        .map(|(_, d)| d.len())
        .filter(|&n| n != p.n)
    {
        return error(format!(
            "key {} part {} has {} bytes, the pull asked for {}",
            p.k, p.p, held, p.n
        ));
    }
    if let Some(msg) = total_mismatch(st, p) {
        return error(msg);
    }
    match st.store.pull(sreq, from, p.s, min) {
        Ok(e) => {
            if st.store.version(p.s).is_none() {
                // Waits for an init; fails clearly if none comes soon.
                st.unknown_pulls.push((sreq, p.k, p.s, Instant::now()));
            }
            e
        }
        Err(e) => error(e.to_string()),
    }
}

/// The version a snapshot read would see.
fn on_snap_ver(st: &mut SState, from: u64, req: u64, fx: &mut Effects) {
    fx.outbox.push((
        from,
        0,
        Msg::Snap {
            req,
            version: st.store.snapshot_version(),
        },
        Vec::new(),
    ));
}

/// Parts another server created (the key directory).
fn on_keys(st: &mut SState, add: Vec<(u64, u64, u32)>) {
    for (s, k, p) in add {
        st.dir.insert(s, (k, p));
    }
}

/// Installs a built-in update rule (a server running a custom callback rule refuses);
/// request 0 is not answered.
fn on_set_rule(
    inner: &Arc<SInner>,
    st: &mut SState,
    from: u64,
    req: u64,
    rule: &str,
    fx: &mut Effects,
) {
    let r = match st.store.rule() {
        crate::ps::UpdateRule::Custom(_) => Err(format!(
            "server {} runs a custom (callback) update rule, which cannot be replaced at run \
             time: rule {rule:?} refused",
            inner.me
        )),
        _ => crate::ps::UpdateRule::parse(rule).map_err(|e| e.to_string()),
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
        fx.outbox.push((from, i32::MAX, answer, Vec::new()));
    }
}

/// Reads the optimizer state of `parts` (all of them, or a failure naming the first that
/// cannot be read).
fn on_pull_state(
    inner: &Arc<SInner>,
    st: &mut SState,
    from: u64,
    req: u64,
    prio: i32,
    parts: &[PartRef],
    fx: &mut Effects,
) -> std::result::Result<(), String> {
    if !matches!(parts_len(parts), Some(n) if n <= inner.opts.partition_bytes) {
        return Err(format!(
            "state pull {req}: {} parts, more than a request may ask for",
            parts.len()
        ));
    }
    let mut body = Vec::new();
    let mut versions = Vec::with_capacity(parts.len());
    let mut failed = None;
    for p in parts {
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
    fx.outbox.push((from, prio, answer, body));
    Ok(())
}
