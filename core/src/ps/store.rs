//! The server side of push/pull as a pure state machine: one server's keys.
//!
//! A [`Store`] holds the keys a server owns and turns calls (`init`, `push`, `pull`,
//! `set_workers`, ...) into [`Event`]s for the network layer to send. It does no I/O, starts no
//! threads and reads no clock, and it never iterates a hash map: the same sequence of calls on
//! two stores built alike gives the same events and the same state, so a replica that runs the
//! same operations stays identical (state-machine replication), and [`Store::export`] /
//! [`Store::import`] move or seed the full state of some keys.
//!
//! # Keys and values
//! A key's value is a byte array of elements of a [`DataType`]; its dtype and length (in bytes,
//! a multiple of the element size; 0 is allowed) are fixed by [`Store::init`] (first writer
//! wins) and checked on every push. A push to a key that was never initialised is an error
//! ("call init first"); a pull of such a key waits until the key is initialised.
//!
//! # Versions
//! A key starts at version 0 (its init value). Sync mode: version = number of closed rounds.
//! Async and bounded mode: version = number of pushes applied. The store keeps the last
//! `history` versions of each key (the current one included) for snapshot reads
//! ([`Store::snapshot_version`], [`Store::read_at`]).
//!
//! # Consistency
//! - [`Consistency::Sync`]: round `r` (1-based) collects one push from every worker of the current
//!   worker set ([`Store::set_workers`]); a worker pushing again before its round closed goes
//!   into its next round (per-worker queue: nothing dropped, nothing counted twice). A push is
//!   acknowledged as soon as it is recorded ([`Event::PushAck`] with the round number). When
//!   every current worker pushed into the oldest open round, the round closes: the update rule
//!   runs once with the sum of the round's pushes and the version becomes `r`. A worker that
//!   joins the set takes part from the oldest open round; a worker that leaves no longer holds
//!   rounds back (its recorded pushes stay in their rounds). Pushes from workers outside the
//!   set are refused.
//! - [`Consistency::Async`]: each push is applied on arrival (version + 1) and acknowledged at
//!   once; any worker id may push.
//! - [`Consistency::Bounded`]`(tau)`: applied on arrival like async, but a worker of the set
//!   whose count of processed pushes on the key would exceed the smallest count among the
//!   current workers plus `tau` is held: its push is queued, unacknowledged, and applied (then
//!   acknowledged) when the slowest worker catches up, in arrival order per worker. A worker
//!   that leaves the set has its held pushes applied; a worker that joins starts at the count
//!   of the slowest remaining worker (so it does not stall everyone). `Bounded(0)` would admit
//!   no push at all (every push puts its worker one ahead), so it is treated as `Bounded(1)`.
//!   Pushes from workers outside the set are refused.
//!
//! # Update rules
//! - [`UpdateRule::Sum`]: sync: the value becomes the sum of the round's pushes (ps-lite's
//!   aggregation: workers pull the aggregated gradient); async/bounded: value += push.
//! - [`UpdateRule::Sgd`]: MXNet's SGD (`sgd_update` / `sgd_mom_update` of MXNet 1.9) applied
//!   to the gradient g (the round sum in sync, each push in async/bounded), with
//!   `g' = clip(rescale × g)` (clip only when `clip` is set):
//!   without momentum `value = (1 - lr × wd) × value - lr × g'`; with momentum
//!   `mom = momentum × mom - lr × wd × value - lr × g'`, `value += mom`. The momentum buffer
//!   is per key (same dtype and length as the value), starts at zero at the key's first update
//!   with momentum, and is kept when the rule changes ([`Store::set_rule`]); it moves with the
//!   key ([`Store::export`]) and can be read and replaced ([`Store::state`],
//!   [`Store::set_state`]). Float dtypes only: f32 computed in f32 (as MXNet), f64 in f64, f16
//!   and bf16 in f32 and rounded back; pushes to integer keys are refused.
//! - [`UpdateRule::Custom`]: called with the key, its dtype, the value (to update in place) and
//!   the round sum (sync) or the push (async/bounded). It works on a copy: if it fails, the
//!   value is unchanged. In async/bounded mode the push gets an [`Event::Error`] and no ack;
//!   in sync mode the round still closes (its version holds the previous value, so nothing
//!   waits forever) and an [`Event::RuleFailed`] is emitted.
//!
//! # Pulls
//! `pull(min_version)` answers with the key's current value once its version is at least
//! `min_version`; deferred pulls are answered (in arrival order) at the first change that
//! satisfies them, so a waiting pull gets exactly the first version that qualifies. With
//! `None`: sync: the round this worker last pushed into (push-then-pull returns the round the
//! worker took part in; a worker that never pushed, e.g. an inference reader, gets the latest);
//! bounded: waits until every push this worker made to the key before the pull is applied;
//! async: the latest.
//!
//! Errors in one request ([`Event::Error`]) never disturb other requests or keys.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::reduce::{reduce_inplace, reduce_into};
use crate::types::{DataType, ReduceOp};

/// A request id, chosen by the caller (the network layer) and echoed in events.
pub type ReqId = u64;

/// When pushes are applied (see the [module documentation](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Consistency {
    /// Rounds: a round closes when every current worker pushed into it.
    Sync,
    /// Each push is applied on arrival.
    Async,
    /// Applied on arrival, but no worker runs more than `tau` pushes ahead of the slowest one
    /// (`Bounded(0)` is treated as `Bounded(1)`).
    Bounded(u64),
}

/// A user update rule: `(key, dtype, value, aggregated gradient)`; updates `value` in place
/// (same length as the gradient). An `Err` leaves the value unchanged.
pub type UpdateFn = dyn Fn(u64, DataType, &mut [u8], &[u8]) -> Result<()> + Send + Sync;

/// How a server turns pushed gradients into the value workers pull.
#[derive(Clone)]
pub enum UpdateRule {
    /// Sync: value = sum of the round's pushes; async/bounded: value += push.
    Sum,
    /// MXNet's SGD (see [`SgdParams`]; float dtypes only).
    Sgd(SgdParams),
    /// A user callback (see [`UpdateFn`]).
    Custom(Arc<UpdateFn>),
}

/// The parameters of [`UpdateRule::Sgd`], as MXNet's `SGD` optimizer names them (see the
/// [module documentation](self) for the formulas).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdParams {
    /// Learning rate.
    pub lr: f64,
    /// Momentum (0: none, no state kept).
    pub momentum: f64,
    /// Weight decay.
    pub wd: f64,
    /// Factor applied to the gradient first (MXNet's `rescale_grad`; 1 by default).
    pub rescale: f64,
    /// Clip the rescaled gradient to `[-clip, clip]` (MXNet's `clip_gradient`; `None`: no
    /// clipping).
    pub clip: Option<f64>,
}

impl SgdParams {
    /// Plain SGD with learning rate `lr` (no momentum, no weight decay, no clipping).
    pub fn lr(lr: f64) -> SgdParams {
        SgdParams {
            lr,
            momentum: 0.0,
            wd: 0.0,
            rescale: 1.0,
            clip: None,
        }
    }
}

impl UpdateRule {
    /// Plain SGD with learning rate `lr` ([`SgdParams::lr`]).
    pub fn sgd(lr: f64) -> UpdateRule {
        UpdateRule::Sgd(SgdParams::lr(lr))
    }

    /// Parses a rule as `BRAID_PS_RULE` and `braid_kv_set_rule` spell it: `sum`, `sgd:LR`, or
    /// `sgd:lr=LR,momentum=M,wd=WD,rescale=R,clip=C` (any subset of the fields in any order,
    /// `lr` required; defaults momentum 0, wd 0, rescale 1, no clipping; a negative `clip`
    /// means no clipping, as MXNet's `clip_gradient`). Every number must be finite.
    ///
    /// Errors: [`Error::InvalidArgument`] naming the rule and the bad field.
    pub fn parse(spec: &str) -> Result<UpdateRule> {
        let s = spec.trim();
        let bad = |why: String| Error::InvalidArgument(format!("update rule {spec:?}: {why}"));
        if s == "sum" {
            return Ok(UpdateRule::Sum);
        }
        let Some(rest) = s.strip_prefix("sgd:") else {
            return Err(bad(
                "expected sum, sgd:LR or sgd:lr=LR,momentum=M,wd=WD,rescale=R,clip=C".into(),
            ));
        };
        let num = |field: &str, v: &str| -> Result<f64> {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| bad(format!("{field}={v}: expected a finite number")))
        };
        if !rest.contains('=') {
            return Ok(UpdateRule::sgd(num("lr", rest)?));
        }
        let mut p = SgdParams::lr(0.0);
        let mut seen: Vec<&str> = Vec::new();
        for item in rest.split(',') {
            let Some((k, v)) = item.split_once('=') else {
                return Err(bad(format!("{item:?}: expected FIELD=VALUE")));
            };
            let k = k.trim();
            if seen.contains(&k) {
                return Err(bad(format!("field {k} given twice")));
            }
            match k {
                "lr" => p.lr = num(k, v)?,
                "momentum" => p.momentum = num(k, v)?,
                "wd" => p.wd = num(k, v)?,
                "rescale" => p.rescale = num(k, v)?,
                "clip" => {
                    let c = num(k, v)?;
                    p.clip = (c >= 0.0).then_some(c);
                }
                other => {
                    return Err(bad(format!(
                        "unknown field {other:?} (fields: lr, momentum, wd, rescale, clip)"
                    )))
                }
            }
            seen.push(k);
        }
        if !seen.contains(&"lr") {
            return Err(bad("lr is required (sgd:lr=LR,...)".into()));
        }
        Ok(UpdateRule::Sgd(p))
    }

    /// The rule in the syntax of [`UpdateRule::parse`] (every field written, numbers exact),
    /// `None` for a custom rule.
    pub fn spec(&self) -> Option<String> {
        match self {
            UpdateRule::Sum => Some("sum".into()),
            UpdateRule::Sgd(p) => {
                let mut s = format!(
                    "sgd:lr={:?},momentum={:?},wd={:?},rescale={:?}",
                    p.lr, p.momentum, p.wd, p.rescale
                );
                if let Some(c) = p.clip {
                    s.push_str(&format!(",clip={c:?}"));
                }
                Some(s)
            }
            UpdateRule::Custom(_) => None,
        }
    }
}

impl fmt::Debug for UpdateRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateRule::Sum => f.write_str("Sum"),
            UpdateRule::Sgd(p) => f.debug_tuple("Sgd").field(p).finish(),
            UpdateRule::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// What a store asks the network layer to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A push is accepted (applied, or recorded in its open round): ack it (after replication).
    PushAck {
        /// The push.
        req: ReqId,
        /// Its key.
        key: u64,
        /// Sync: the round the push belongs to; async/bounded: the version after applying it.
        version: u64,
    },
    /// A pull (possibly deferred) is answered with this value.
    Value {
        /// The pull.
        req: ReqId,
        /// Its key.
        key: u64,
        /// The version of `data`.
        version: u64,
        /// The value at `version`: the store's own buffer, shared (never written again while
        /// it is shared: the store writes a new version elsewhere, or copies it first), so a
        /// pull is answered without copying the value.
        data: Arc<Vec<u8>>,
    },
    /// A request failed (wrong length or dtype, key not initialised, worker not in the set,
    /// update rule failed, key moved away, cancelled); the store keeps serving the others.
    Error {
        /// The failed request.
        req: ReqId,
        /// Its key.
        key: u64,
        /// What went wrong (names the key, and what was expected and got).
        msg: String,
    },
    /// Sync mode: the custom update rule failed when round `version` closed. The round closed
    /// anyway with the previous value (its aggregate is dropped); no request failed, this is
    /// for the log.
    RuleFailed {
        /// The key.
        key: u64,
        /// The round that closed.
        version: u64,
        /// The rule's error.
        msg: String,
    },
}

impl Event {
    /// The request this event answers (`None` for [`Event::RuleFailed`]).
    pub fn req(&self) -> Option<ReqId> {
        match self {
            Event::PushAck { req, .. } | Event::Value { req, .. } | Event::Error { req, .. } => {
                Some(*req)
            }
            Event::RuleFailed { .. } => None,
        }
    }

    /// The key of this event.
    pub fn key(&self) -> u64 {
        match self {
            Event::PushAck { key, .. }
            | Event::Value { key, .. }
            | Event::Error { key, .. }
            | Event::RuleFailed { key, .. } => *key,
        }
    }
}

/// (De)serialises a [`DataType`] as its wire code.
mod dtype_code {
    use super::DataType;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        d: &DataType,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_u8(*d as u8)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<DataType, D::Error> {
        let c = u8::deserialize(d)?;
        DataType::from_code(c).ok_or_else(|| D::Error::custom(format!("unknown dtype code {c}")))
    }
}

/// When a waiting pull can be answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Until {
    /// The key's version is at least this.
    Version(u64),
    /// Bounded mode: `worker` has had at least `count` pushes processed on the key.
    Done { worker: u64, count: u64 },
}

/// A pull not answered yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pull {
    req: ReqId,
    until: Until,
}

/// An open sync round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Round {
    /// Sum of the pushes recorded so far.
    acc: Vec<u8>,
    /// Who pushed into it.
    pushers: BTreeSet<u64>,
}

/// A bounded-mode push waiting for the slowest worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Held {
    req: ReqId,
    grad: Vec<u8>,
}

/// The bytes a store holds, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreBytes {
    /// Current values.
    pub values: usize,
    /// Older versions kept for snapshot reads (the history) and checkpoints.
    pub kept: usize,
    /// Open sync rounds' sums (and the buffer kept for the next one's) and bounded-mode
    /// pushes held back.
    pub pending: usize,
    /// Optimizer state (momentum).
    pub optimizer: usize,
}

/// One key's full state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    #[serde(with = "dtype_code")]
    dtype: DataType,
    version: u64,
    value: Val,
    /// Older kept versions, oldest first (at most `history - 1`).
    old: VecDeque<(u64, Val)>,
    /// Sync: open rounds by number (contiguous from `version + 1`).
    rounds: BTreeMap<u64, Round>,
    /// Sync: the last round each worker pushed into.
    last_round: BTreeMap<u64, u64>,
    /// Bounded: pushes processed (applied or failed) per worker.
    done: BTreeMap<u64, u64>,
    /// Bounded: held pushes per worker, in arrival order.
    held: BTreeMap<u64, VecDeque<Held>>,
    /// Waiting pulls, in arrival order.
    pulls: Vec<Pull>,
    /// A version kept readable beyond the history for a checkpoint ([`Store::pin`]).
    #[serde(skip)]
    pin: Option<u64>,
    /// The optimizer state (the Sgd rule's momentum buffer; same dtype and length as the
    /// value), created at the first update that needs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mom: Option<Vec<u8>>,
    /// Bytes of the whole user key this part belongs to (0: unknown, e.g. restored from a
    /// checkpoint before any init re-stated it).
    #[serde(default)]
    total: u64,
    /// Sync: the buffer of the last version dropped from the history, kept for the next
    /// round's sum (not part of the key's state).
    #[serde(skip)]
    spare: Spare,
}

/// A buffer kept for reuse ([`Entry::spare`]): not state, so it is neither compared nor
/// cloned, and it does not travel.
#[derive(Debug, Default)]
struct Spare(Option<Vec<u8>>);

impl Clone for Spare {
    fn clone(&self) -> Spare {
        Spare(None)
    }
}

impl PartialEq for Spare {
    fn eq(&self, _: &Spare) -> bool {
        true
    }
}

/// What the per-key logic needs from the store.
struct Cfg<'a> {
    mode: Consistency,
    rule: &'a UpdateRule,
    history: usize,
    workers: &'a BTreeSet<u64>,
}

/// A value buffer, shared with the pull answers being sent ([`Event::Value`]): copy on write
/// (a version is never written while an answer holds it). Serialised as the bytes it holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Val(Arc<Vec<u8>>);

impl Val {
    fn new(v: Vec<u8>) -> Val {
        Val(Arc::new(v))
    }

    /// The buffer for reuse when nothing else holds it, else an empty one.
    fn into_vec(self) -> Vec<u8> {
        Arc::try_unwrap(self.0).unwrap_or_default()
    }
}

impl std::ops::Deref for Val {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl Serialize for Val {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.as_slice().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Val {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Val, D::Error> {
        Vec::<u8>::deserialize(d).map(Val::new)
    }
}

fn error(req: ReqId, key: u64, msg: String) -> Event {
    Event::Error { req, key, msg }
}

impl Entry {
    fn new(dtype: DataType, value: Vec<u8>) -> Entry {
        Entry {
            dtype,
            version: 0,
            value: Val::new(value),
            old: VecDeque::new(),
            rounds: BTreeMap::new(),
            last_round: BTreeMap::new(),
            done: BTreeMap::new(),
            held: BTreeMap::new(),
            pulls: Vec::new(),
            pin: None,
            spare: Spare::default(),
            mom: None,
            total: 0,
        }
    }

    fn pinned(&self, version: u64) -> bool {
        self.pin == Some(version)
    }

    /// Older versions kept, the pinned one (which does not count against the history) aside.
    fn kept(&self) -> usize {
        let pinned = self
            .pin
            .is_some_and(|p| self.old.iter().any(|(v, _)| *v == p));
        self.old.len() - usize::from(pinned)
    }

    /// Drops the oldest versions beyond the history (never the pinned one).
    fn trim(&mut self, history: usize) {
        while self.kept() + 1 > history.max(1) {
            let i = self
                .old
                .iter()
                .position(|(v, _)| !self.pinned(*v))
                .unwrap_or(0);
            if let Some((_, v)) = self.old.remove(i) {
                self.recycle(v);
            }
        }
    }

    /// Keeps the buffer of a version no longer kept for the next sync round's sum, when no
    /// answer holds it any more (a new round's sum then needs no fresh memory: for large
    /// parts, fresh memory costs a page fault per page every round).
    fn recycle(&mut self, v: Val) {
        // Sync mode only (where workers pushed rounds): nothing else takes it.
        if !self.last_round.is_empty() && self.spare.0.is_none() && v.len() == self.value.len() {
            let b = v.into_vec();
            if !b.is_empty() {
                self.spare.0 = Some(b);
            }
        }
    }

    /// The buffer of the version the next commit drops (the oldest kept one that is not
    /// pinned) when the history is full, else a new one.
    fn spare_buf(&mut self, history: usize) -> Vec<u8> {
        if self.kept() + 1 < history {
            return Vec::new();
        }
        match self.old.iter().position(|(v, _)| !self.pinned(*v)) {
            // A version an answer being sent still holds is left to it.
            Some(i) => self
                .old
                .remove(i)
                .map(|(_, b)| b.into_vec())
                .unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// Makes `next` the value of version + 1.
    fn commit(&mut self, history: usize, next: Vec<u8>) {
        let prev = std::mem::replace(&mut self.value, Val::new(next));
        if history > 1 || self.pinned(self.version) {
            self.old.push_back((self.version, prev));
        } else {
            self.recycle(prev);
        }
        self.version += 1;
        self.trim(history);
    }

    /// Applies `f` to a copy of the value and commits it as version + 1. With `history == 1`
    /// `f` runs in place, so it must check before it writes (the built-in rules do).
    fn update(
        &mut self,
        history: usize,
        f: impl FnOnce(&mut [u8]) -> std::result::Result<(), String>,
    ) -> std::result::Result<(), String> {
        if history <= 1 && !self.pinned(self.version) {
            // Copies first if an answer being sent holds the value.
            f(Arc::make_mut(&mut self.value.0).as_mut_slice())?;
            self.version += 1;
            let pin = self.pin;
            self.old.retain(|(v, _)| Some(*v) == pin);
            return Ok(());
        }
        // Reuse the buffer of the version this commit drops.
        let mut buf = self.spare_buf(history);
        buf.clear();
        buf.extend_from_slice(&self.value);
        f(&mut buf)?;
        self.commit(history, buf);
        Ok(())
    }

    /// Applies one gradient with the rule (async/bounded push, or a sync round's sum for the
    /// rules other than `Sum`).
    fn apply(&mut self, key: u64, cfg: &Cfg<'_>, grad: &[u8]) -> std::result::Result<(), String> {
        let dtype = self.dtype;
        match cfg.rule {
            UpdateRule::Sum if cfg.history > 1 => {
                // One pass (next = value + grad) instead of a copy of the value followed by an
                // in-place sum: the new version is written once, the old one kept as it is.
                let mut buf = self.spare_buf(cfg.history);
                buf.resize(self.value.len(), 0);
                reduce_into(dtype, ReduceOp::Sum, &mut buf, &self.value, grad)
                    .map_err(|e| e.to_string())?;
                self.commit(cfg.history, buf);
                Ok(())
            }
            UpdateRule::Sum => self.update(cfg.history, |v| {
                reduce_inplace(dtype, ReduceOp::Sum, v, grad).map_err(|e| e.to_string())
            }),
            UpdateRule::Sgd(p) => {
                let p = *p;
                if p.momentum == 0.0 {
                    return self.update(cfg.history, |v| sgd(dtype, v, grad, &p, None));
                }
                let mut mom = match self.mom.take() {
                    Some(m) if m.len() == self.value.len() => m,
                    Some(m) => {
                        let n = m.len();
                        self.mom = Some(m);
                        return Err(format!(
                            "sgd: momentum buffer of {n} bytes for a value of {}",
                            self.value.len()
                        ));
                    }
                    None => vec![0u8; self.value.len()],
                };
                let r = self.update(cfg.history, |v| sgd(dtype, v, grad, &p, Some(&mut mom)));
                self.mom = Some(mom);
                r
            }
            UpdateRule::Custom(f) => {
                let mut next = self.value.to_vec();
                f(key, dtype, &mut next, grad).map_err(|e| e.to_string())?;
                self.commit(cfg.history, next);
                Ok(())
            }
        }
    }

    fn read(&self, version: u64) -> Option<&[u8]> {
        if version == self.version {
            return Some(self.value.as_slice());
        }
        self.old
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, b)| b.as_slice())
    }

    fn done(&self, worker: u64) -> u64 {
        self.done.get(&worker).copied().unwrap_or(0)
    }

    fn held_len(&self, worker: u64) -> u64 {
        self.held.get(&worker).map_or(0, |q| q.len() as u64)
    }

    fn ready(&self, until: &Until) -> bool {
        match until {
            Until::Version(v) => self.version >= *v,
            Until::Done { worker, count } => self.done(*worker) >= *count,
        }
    }

    /// Answers the waiting pulls that can be answered now, in arrival order.
    fn release_pulls(&mut self, key: u64, out: &mut Vec<Event>) {
        if self.pulls.is_empty() {
            return;
        }
        let pulls = std::mem::take(&mut self.pulls);
        for p in pulls {
            if self.ready(&p.until) {
                out.push(Event::Value {
                    req: p.req,
                    key,
                    version: self.version,
                    data: Arc::clone(&self.value.0),
                });
            } else {
                self.pulls.push(p);
            }
        }
    }

    /// Checks a push's dtype and length against the key.
    fn check(&self, key: u64, dtype: DataType, len: usize) -> Option<String> {
        if dtype != self.dtype {
            return Some(format!(
                "key {key}: dtype mismatch: expected {}, got {dtype}",
                self.dtype
            ));
        }
        if len != self.value.len() {
            return Some(format!(
                "key {key}: wrong length: expected {} bytes, got {len}",
                self.value.len()
            ));
        }
        None
    }

    /// Sync: closes every complete round, oldest first, answering pulls after each.
    fn close_rounds(&mut self, key: u64, cfg: &Cfg<'_>, out: &mut Vec<Event>) {
        loop {
            let next = self.version + 1;
            let complete = self
                .rounds
                .get(&next)
                .is_some_and(|r| cfg.workers.iter().all(|w| r.pushers.contains(w)));
            if !complete {
                return;
            }
            let Some(round) = self.rounds.remove(&next) else {
                return;
            };
            let result = match cfg.rule {
                UpdateRule::Sum => {
                    self.commit(cfg.history, round.acc);
                    Ok(())
                }
                _ => {
                    let r = self.apply(key, cfg, &round.acc);
                    // The sum's buffer serves the next round.
                    if self.spare.0.is_none() {
                        self.spare.0 = Some(round.acc);
                    }
                    r
                }
            };
            if let Err(msg) = result {
                let same = self.value.to_vec();
                self.commit(cfg.history, same);
                out.push(Event::RuleFailed {
                    key,
                    version: self.version,
                    msg: format!("key {key}: update rule failed on round {next}: {msg}"),
                });
            }
            self.release_pulls(key, out);
        }
    }

    /// Bounded: whether `worker`'s next push may be applied now.
    fn admissible(&self, worker: u64, cfg: &Cfg<'_>, tau: u64) -> bool {
        if !cfg.workers.contains(&worker) {
            return true;
        }
        let min = cfg.workers.iter().map(|w| self.done(*w)).min().unwrap_or(0);
        self.done(worker) < min.saturating_add(tau)
    }

    /// Bounded/async: applies one push and acks it (or reports the rule's failure).
    fn apply_push(
        &mut self,
        key: u64,
        cfg: &Cfg<'_>,
        worker: u64,
        req: ReqId,
        grad: &[u8],
        out: &mut Vec<Event>,
    ) {
        match self.apply(key, cfg, grad) {
            Ok(()) => out.push(Event::PushAck {
                req,
                key,
                version: self.version,
            }),
            Err(msg) => out.push(error(
                req,
                key,
                format!("key {key}: update rule failed: {msg}"),
            )),
        }
        if matches!(cfg.mode, Consistency::Bounded(_)) {
            *self.done.entry(worker).or_insert(0) += 1;
        }
    }

    /// Bounded: applies the held pushes that became admissible (workers in id order, each
    /// worker's pushes in arrival order), until none is.
    fn release_held(&mut self, key: u64, cfg: &Cfg<'_>, tau: u64, out: &mut Vec<Event>) {
        loop {
            let mut progressed = false;
            let workers: Vec<u64> = self.held.keys().copied().collect();
            for w in workers {
                while self.held_len(w) > 0 && self.admissible(w, cfg, tau) {
                    let Some(h) = self.held.get_mut(&w).and_then(|q| q.pop_front()) else {
                        break;
                    };
                    self.apply_push(key, cfg, w, h.req, &h.grad, out);
                    progressed = true;
                }
            }
            self.held.retain(|_, q| !q.is_empty());
            if !progressed {
                return;
            }
        }
    }

    /// Makes every progress the current state allows (rounds, held pushes, pulls).
    fn settle(&mut self, key: u64, cfg: &Cfg<'_>, out: &mut Vec<Event>) {
        match cfg.mode {
            Consistency::Sync => self.close_rounds(key, cfg, out),
            Consistency::Bounded(tau) => self.release_held(key, cfg, tau.max(1), out),
            Consistency::Async => {}
        }
        self.release_pulls(key, out);
    }
}

/// MXNet's SGD step on one element type (see the module documentation): `w` the weight, `g`
/// the gradient, `m` the momentum (when there is one); returns the new weight.
trait SgdFloat:
    Copy
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Neg<Output = Self>
{
    fn of(x: f64) -> Self;
}

impl SgdFloat for f32 {
    fn of(x: f64) -> f32 {
        x as f32
    }
}

impl SgdFloat for f64 {
    fn of(x: f64) -> f64 {
        x
    }
}

/// [`SgdParams`] in the element type the step computes in.
#[derive(Clone, Copy)]
struct SgdK<F> {
    lr: F,
    momentum: F,
    wd: F,
    rescale: F,
    clip: Option<F>,
    one: F,
}

impl<F: SgdFloat> SgdK<F> {
    fn new(p: &SgdParams) -> SgdK<F> {
        SgdK {
            lr: F::of(p.lr),
            momentum: F::of(p.momentum),
            wd: F::of(p.wd),
            rescale: F::of(p.rescale),
            clip: p.clip.map(F::of),
            one: F::of(1.0),
        }
    }

    /// One element, as MXNet 1.9's SGDKernel / SGDMomKernel write it.
    #[inline]
    fn step(&self, w: F, g: F, m: Option<&mut F>) -> F {
        let k = self;
        match (m, k.clip) {
            (None, None) => (k.one - k.lr * k.wd) * w - (k.lr * k.rescale) * g,
            (None, Some(c)) => (k.one - k.lr * k.wd) * w - k.lr * clamp(k.rescale * g, c),
            (Some(m), None) => {
                *m = k.momentum * *m - k.lr * k.wd * w - k.lr * k.rescale * g;
                w + *m
            }
            (Some(m), Some(c)) => {
                *m = k.momentum * *m - k.lr * k.wd * w - k.lr * clamp(k.rescale * g, c);
                w + *m
            }
        }
    }
}

/// `x` clipped to `[-c, c]` (NaN stays NaN), as mshadow's `clip`.
#[inline]
fn clamp<F: SgdFloat>(x: F, c: F) -> F {
    if x > c {
        c
    } else if x < -c {
        -c
    } else {
        x
    }
}

/// MXNet's SGD over a value (see the module documentation), float dtypes only; `mom`: the
/// momentum buffer (same length), when the rule has momentum. Checks before writing.
fn sgd(
    dtype: DataType,
    value: &mut [u8],
    grad: &[u8],
    p: &SgdParams,
    mom: Option<&mut Vec<u8>>,
) -> std::result::Result<(), String> {
    if value.len() != grad.len()
        || value.len() % dtype.size() != 0
        || mom.as_ref().is_some_and(|m| m.len() != value.len())
    {
        return Err(format!(
            "sgd: lengths {} and {} bytes of {dtype}",
            value.len(),
            grad.len()
        ));
    }
    if !dtype.is_float() {
        return Err(format!(
            "the Sgd update rule needs a float dtype, got {dtype}"
        ));
    }
    match dtype {
        DataType::F32 => {
            let k = SgdK::<f32>::new(p);
            elems::<4>(value, grad, mom, |w, g, m| {
                let mut mm = m.map(f32::from_ne_bytes);
                let w = k.step(f32::from_ne_bytes(w), f32::from_ne_bytes(g), mm.as_mut());
                (w.to_ne_bytes(), mm.map(f32::to_ne_bytes))
            })
        }
        DataType::F64 => {
            let k = SgdK::<f64>::new(p);
            elems::<8>(value, grad, mom, |w, g, m| {
                let mut mm = m.map(f64::from_ne_bytes);
                let w = k.step(f64::from_ne_bytes(w), f64::from_ne_bytes(g), mm.as_mut());
                (w.to_ne_bytes(), mm.map(f64::to_ne_bytes))
            })
        }
        DataType::F16 => {
            let k = SgdK::<f32>::new(p);
            elems::<2>(value, grad, mom, |w, g, m| {
                let mut mm = m.map(|m| f16::from_ne_bytes(m).to_f32());
                let w = k.step(
                    f16::from_ne_bytes(w).to_f32(),
                    f16::from_ne_bytes(g).to_f32(),
                    mm.as_mut(),
                );
                (
                    f16::from_f32(w).to_ne_bytes(),
                    mm.map(|m| f16::from_f32(m).to_ne_bytes()),
                )
            })
        }
        _ => {
            let k = SgdK::<f32>::new(p);
            elems::<2>(value, grad, mom, |w, g, m| {
                let mut mm = m.map(|m| bf16::from_ne_bytes(m).to_f32());
                let w = k.step(
                    bf16::from_ne_bytes(w).to_f32(),
                    bf16::from_ne_bytes(g).to_f32(),
                    mm.as_mut(),
                );
                (
                    bf16::from_f32(w).to_ne_bytes(),
                    mm.map(|m| bf16::from_f32(m).to_ne_bytes()),
                )
            })
        }
    }
    Ok(())
}

/// Runs `f` over the N-byte elements of `value`, `grad` and `mom` (when given; any
/// alignment), writing back the value and the momentum.
fn elems<const N: usize>(
    value: &mut [u8],
    grad: &[u8],
    mom: Option<&mut Vec<u8>>,
    f: impl Fn([u8; N], [u8; N], Option<[u8; N]>) -> ([u8; N], Option<[u8; N]>),
) {
    let arr = |b: &[u8]| {
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        a
    };
    match mom {
        None => {
            for (v, g) in value.chunks_exact_mut(N).zip(grad.chunks_exact(N)) {
                let (w, _) = f(arr(v), arr(g), None);
                v.copy_from_slice(&w);
            }
        }
        Some(mom) => {
            for ((v, g), m) in value
                .chunks_exact_mut(N)
                .zip(grad.chunks_exact(N))
                .zip(mom.chunks_exact_mut(N))
            {
                let (w, mm) = f(arr(v), arr(g), Some(arr(m)));
                v.copy_from_slice(&w);
                if let Some(mm) = mm {
                    m.copy_from_slice(&mm);
                }
            }
        }
    }
}

/// The full state of one key, from [`Store::export`], for [`Store::import`]: dtype, value,
/// version, kept history, open sync rounds (their sums and who pushed), per-worker counters,
/// held bounded-mode pushes and waiting pulls (a key that is not initialised yet but has
/// waiting pulls is dumped too). Serialisable with serde; the store's configuration
/// (consistency, rule, history, worker set) is not part of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyDump {
    key: u64,
    entry: Option<Entry>,
    waiting: Vec<Pull>,
}

impl KeyDump {
    /// The key.
    pub fn key(&self) -> u64 {
        self.key
    }

    /// The key's version, `None` if it is not initialised (only waiting pulls).
    pub fn version(&self) -> Option<u64> {
        self.entry.as_ref().map(|e| e.version)
    }

    /// A key restored from a checkpoint: `value` (elements of `dtype`) at `version`, with no
    /// history, open round or request.
    ///
    /// Errors: [`Error::InvalidArgument`] if `value` is not a whole number of elements.
    pub fn restored(key: u64, dtype: DataType, version: u64, value: Vec<u8>) -> Result<KeyDump> {
        if value.len() % dtype.size() != 0 {
            return Err(Error::InvalidArgument(format!(
                "key {key}: {} bytes is not a whole number of {dtype} elements",
                value.len()
            )));
        }
        let mut e = Entry::new(dtype, value);
        e.version = version;
        Ok(KeyDump {
            key,
            entry: Some(e),
            waiting: Vec::new(),
        })
    }

    /// Drops the requests in flight (waiting pulls and held, unacknowledged pushes), keeping
    /// the acknowledged state: for moving keys to a new owner whose clients will retry, as
    /// opposed to seeding a replica that serves the same requests.
    pub fn strip_requests(&mut self) {
        self.waiting.clear();
        if let Some(e) = &mut self.entry {
            e.pulls.clear();
            e.held.clear();
        }
    }
}

/// One server's keys: the push/pull state machine (see the [module documentation](self)).
/// Not thread-safe: the caller locks.
#[derive(Debug, Clone)]
pub struct Store {
    consistency: Consistency,
    rule: UpdateRule,
    history: usize,
    workers: BTreeSet<u64>,
    keys: BTreeMap<u64, Entry>,
    /// Pulls of keys not initialised yet.
    waiting: BTreeMap<u64, Vec<Pull>>,
}

impl Store {
    /// An empty store. `history`: completed versions kept per key for snapshot reads, the
    /// current one included (0 is taken as 1). The worker set starts empty: in sync and
    /// bounded mode call [`Store::set_workers`] before the first push.
    pub fn new(consistency: Consistency, rule: UpdateRule, history: usize) -> Store {
        Store {
            consistency,
            rule,
            history: history.max(1),
            workers: BTreeSet::new(),
            keys: BTreeMap::new(),
            waiting: BTreeMap::new(),
        }
    }

    /// The consistency mode.
    pub fn consistency(&self) -> Consistency {
        self.consistency
    }

    /// The current worker set, ascending.
    pub fn workers(&self) -> impl Iterator<Item = u64> + '_ {
        self.workers.iter().copied()
    }

    /// Sets the workers whose pushes a sync round waits for and among which bounded staleness
    /// is measured (the current membership view's workers; order and duplicates do not
    /// matter). A smaller set may close open rounds (a dead worker's round closes with the
    /// survivors) and release held pushes and waiting pulls: returns those events, keys in
    /// ascending order.
    pub fn set_workers(&mut self, workers: &[u64]) -> Vec<Event> {
        let new: BTreeSet<u64> = workers.iter().copied().collect();
        let old = std::mem::replace(&mut self.workers, new);
        let cfg = Cfg {
            mode: self.consistency,
            rule: &self.rule,
            history: self.history,
            workers: &self.workers,
        };
        let mut out = Vec::new();
        for (&key, e) in self.keys.iter_mut() {
            if matches!(cfg.mode, Consistency::Bounded(_)) {
                // Joiners start at the slowest staying (else old) worker's count.
                let base = old
                    .intersection(cfg.workers)
                    .map(|w| e.done(*w))
                    .min()
                    .or_else(|| old.iter().map(|w| e.done(*w)).min())
                    .unwrap_or(0);
                for w in cfg.workers.difference(&old) {
                    let d = e.done.entry(*w).or_insert(0);
                    *d = (*d).max(base);
                }
            }
            e.settle(key, &cfg, &mut out);
        }
        out
    }

    /// Creates `key` with `dtype` and `value` at version 0 (first writer wins) and answers
    /// the pulls that waited for it. Returns whether this call created the key; a later init
    /// is not an error and changes nothing (`Ok((false, []))`).
    ///
    /// Errors: [`Error::InvalidArgument`] if `value.len()` is not a multiple of the element
    /// size, or the key exists with another dtype or length.
    pub fn init(&mut self, key: u64, dtype: DataType, value: &[u8]) -> Result<(bool, Vec<Event>)> {
        if value.len() % dtype.size() != 0 {
            return Err(Error::InvalidArgument(format!(
                "key {key}: init with {} bytes, not a multiple of the {dtype} element size ({})",
                value.len(),
                dtype.size()
            )));
        }
        if let Some(e) = self.keys.get(&key) {
            if let Some(msg) = e.check(key, dtype, value.len()) {
                return Err(Error::InvalidArgument(format!("init: {msg}")));
            }
            return Ok((false, Vec::new()));
        }
        let mut e = Entry::new(dtype, value.to_vec());
        e.pulls = self.waiting.remove(&key).unwrap_or_default();
        let mut out = Vec::new();
        e.release_pulls(key, &mut out);
        self.keys.insert(key, e);
        Ok((true, out))
    }

    /// A push of gradient `grad` by `worker` to `key` (see the module documentation for what
    /// each mode does). Request errors (key not initialised, dtype or length mismatch, worker
    /// not in the set in sync/bounded mode, Sgd on an integer key, the custom rule failing in
    /// async/bounded mode) come back as [`Event::Error`] and change nothing.
    ///
    /// Errors (`Err`): only internal ones.
    pub fn push(
        &mut self,
        req: ReqId,
        worker: u64,
        key: u64,
        dtype: DataType,
        grad: &[u8],
    ) -> Result<Vec<Event>> {
        self.push_with(req, worker, key, dtype, grad, None)
    }

    /// As [`Store::push`], with `rule` (when given) instead of the store's rule for whatever
    /// this push applies (a replica applies an operation with the rule its owner used, so the
    /// copies stay identical whatever rule each was told to use meanwhile).
    ///
    /// Errors: as [`Store::push`].
    pub fn push_with(
        &mut self,
        req: ReqId,
        worker: u64,
        key: u64,
        dtype: DataType,
        grad: &[u8],
        rule: Option<&UpdateRule>,
    ) -> Result<Vec<Event>> {
        let cfg = Cfg {
            mode: self.consistency,
            rule: rule.unwrap_or(&self.rule),
            history: self.history,
            workers: &self.workers,
        };
        let mut out = Vec::new();
        let Some(e) = self.keys.get_mut(&key) else {
            out.push(error(
                req,
                key,
                format!("key {key} not initialised: call init first"),
            ));
            return Ok(out);
        };
        if let Some(msg) = e.check(key, dtype, grad.len()) {
            out.push(error(req, key, msg));
            return Ok(out);
        }
        if matches!(cfg.rule, UpdateRule::Sgd(_)) && !dtype.is_float() {
            out.push(error(
                req,
                key,
                format!("key {key}: the Sgd update rule needs a float dtype, got {dtype}"),
            ));
            return Ok(out);
        }
        if cfg.mode != Consistency::Async && !cfg.workers.contains(&worker) {
            out.push(error(
                req,
                key,
                format!("key {key}: worker {worker} is not in the current worker set"),
            ));
            return Ok(out);
        }
        match cfg.mode {
            Consistency::Async => {
                e.apply_push(key, &cfg, worker, req, grad, &mut out);
            }
            Consistency::Sync => {
                let last = e.last_round.get(&worker).copied().unwrap_or(0);
                let r = last.max(e.version) + 1;
                let spare = &mut e.spare;
                let round = e.rounds.entry(r).or_insert_with(|| Round {
                    acc: Vec::new(),
                    pushers: BTreeSet::new(),
                });
                if round.pushers.is_empty() {
                    // The buffer of a version the history dropped, when there is one.
                    let mut acc = spare.0.take().unwrap_or_default();
                    acc.clear();
                    acc.extend_from_slice(grad);
                    round.acc = acc;
                } else {
                    reduce_inplace(dtype, ReduceOp::Sum, &mut round.acc, grad)?;
                }
                round.pushers.insert(worker);
                e.last_round.insert(worker, r);
                out.push(Event::PushAck {
                    req,
                    key,
                    version: r,
                });
            }
            Consistency::Bounded(tau) => {
                if e.held_len(worker) > 0 || !e.admissible(worker, &cfg, tau.max(1)) {
                    e.held.entry(worker).or_default().push_back(Held {
                        req,
                        grad: grad.to_vec(),
                    });
                } else {
                    e.apply_push(key, &cfg, worker, req, grad, &mut out);
                }
            }
        }
        e.settle(key, &cfg, &mut out);
        Ok(out)
    }

    /// A pull of `key` by `worker` (any id: readers need not be workers), answered with
    /// [`Event::Value`] now or when the key reaches the wanted version. `min_version`: `None`
    /// = this worker's own last pushed round in sync mode (the latest if it never pushed),
    /// all its earlier pushes applied in bounded mode, the latest in async mode. A pull of a
    /// key not initialised yet waits for its init (see [`Store::cancel_pull`] to give up).
    ///
    /// Errors (`Err`): none today (kept for symmetry with [`Store::push`]).
    pub fn pull(
        &mut self,
        req: ReqId,
        worker: u64,
        key: u64,
        min_version: Option<u64>,
    ) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        let Some(e) = self.keys.get_mut(&key) else {
            self.waiting.entry(key).or_default().push(Pull {
                req,
                until: Until::Version(min_version.unwrap_or(0)),
            });
            return Ok(out);
        };
        let until = match (min_version, self.consistency) {
            (Some(v), _) => Until::Version(v),
            (None, Consistency::Async) => Until::Version(e.version),
            (None, Consistency::Sync) => {
                Until::Version(e.last_round.get(&worker).copied().unwrap_or(0))
            }
            (None, Consistency::Bounded(_)) => Until::Done {
                worker,
                count: e.done(worker) + e.held_len(worker),
            },
        };
        e.pulls.push(Pull { req, until });
        e.release_pulls(key, &mut out);
        Ok(out)
    }

    /// Gives up a waiting pull: returns an [`Event::Error`] with `msg` for it, or nothing if
    /// no pull `req` is waiting (already answered, or unknown).
    pub fn cancel_pull(&mut self, req: ReqId, msg: &str) -> Vec<Event> {
        let mut out = Vec::new();
        let lists = self
            .keys
            .iter_mut()
            .map(|(k, e)| (*k, &mut e.pulls))
            .chain(self.waiting.iter_mut().map(|(k, p)| (*k, p)));
        for (key, pulls) in lists {
            pulls.retain(|p| {
                if p.req == req {
                    out.push(error(req, key, format!("key {key}: {msg}")));
                    false
                } else {
                    true
                }
            });
        }
        self.waiting.retain(|_, p| !p.is_empty());
        out
    }

    /// The highest version V such that every key of this store still keeps V among its
    /// completed versions (at most the smallest latest version over the keys): every key can
    /// be read at V with [`Store::read_at`], a consistent snapshot in sync mode. `None` if the
    /// store has no key or the kept versions do not overlap.
    pub fn snapshot_version(&self) -> Option<u64> {
        let lowest = self.keys.values().min_by_key(|e| e.version)?;
        std::iter::once(lowest.version)
            .chain(lowest.old.iter().rev().map(|(v, _)| *v))
            .find(|v| self.keys.values().all(|e| e.read(*v).is_some()))
    }

    /// The value of `key` at `version`, if the key exists and that version is kept.
    pub fn read_at(&self, key: u64, version: u64) -> Option<&[u8]> {
        self.keys.get(&key)?.read(version)
    }

    /// As [`Store::read_at`], the store's buffer itself (shared, see [`Event::Value`]).
    pub fn read_shared_at(&self, key: u64, version: u64) -> Option<Arc<Vec<u8>>> {
        let e = self.keys.get(&key)?;
        if version == e.version {
            return Some(Arc::clone(&e.value.0));
        }
        e.old
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, b)| Arc::clone(&b.0))
    }

    /// The current value and version of `key`.
    pub fn get(&self, key: u64) -> Option<(u64, &[u8])> {
        self.keys.get(&key).map(|e| (e.version, e.value.as_slice()))
    }

    /// The dtype of `key`.
    pub fn dtype(&self, key: u64) -> Option<DataType> {
        self.keys.get(&key).map(|e| e.dtype)
    }

    /// The full state of the keys (initialised, or with waiting pulls) for which `pick` is
    /// true, in ascending key order (see [`KeyDump`]).
    pub fn export(&self, pick: impl Fn(u64) -> bool) -> Vec<KeyDump> {
        let keys: BTreeSet<u64> = self
            .keys
            .keys()
            .chain(self.waiting.keys())
            .copied()
            .filter(|k| pick(*k))
            .collect();
        keys.into_iter()
            .map(|key| KeyDump {
                key,
                entry: self.keys.get(&key).cloned(),
                waiting: self.waiting.get(&key).cloned().unwrap_or_default(),
            })
            .collect()
    }

    /// Installs exported keys (in the order given), replacing keys of the same id (the pulls
    /// waiting here for them are kept, after the dump's), trimming history to this store's,
    /// and makes the progress this store's worker set allows: returns those events. Import
    /// into a store with the same consistency mode as the exporter's.
    pub fn import(&mut self, dumps: Vec<KeyDump>) -> Vec<Event> {
        let cfg = Cfg {
            mode: self.consistency,
            rule: &self.rule,
            history: self.history,
            workers: &self.workers,
        };
        let mut out = Vec::new();
        for d in dumps {
            let key = d.key;
            let mut here: Vec<Pull> = self.waiting.remove(&key).unwrap_or_default();
            match d.entry {
                Some(mut e) => {
                    if let Some(prev) = self.keys.remove(&key) {
                        here.extend(prev.pulls);
                    }
                    e.trim(cfg.history);
                    e.pulls.extend(d.waiting);
                    e.pulls.extend(here);
                    e.settle(key, &cfg, &mut out);
                    self.keys.insert(key, e);
                }
                None => {
                    if let Some(e) = self.keys.get_mut(&key) {
                        e.pulls.extend(d.waiting);
                        e.release_pulls(key, &mut out);
                    } else {
                        let mut w = d.waiting;
                        w.extend(here);
                        if !w.is_empty() {
                            self.waiting.insert(key, w);
                        }
                    }
                }
            }
        }
        out
    }

    /// Drops the keys for which `pick` is true (after moving them to a new owner). Their
    /// waiting pulls and held pushes get an [`Event::Error`] ("moved away"), returned in
    /// ascending key order, so clients retry against the new owner.
    pub fn remove(&mut self, pick: impl Fn(u64) -> bool) -> Vec<Event> {
        let gone: BTreeSet<u64> = self
            .keys
            .keys()
            .chain(self.waiting.keys())
            .copied()
            .filter(|k| pick(*k))
            .collect();
        let mut out = Vec::new();
        for key in gone {
            let msg = || format!("key {key} moved away from this server: retry");
            let mut reqs: Vec<ReqId> = Vec::new();
            if let Some(e) = self.keys.remove(&key) {
                reqs.extend(e.pulls.iter().map(|p| p.req));
                reqs.extend(e.held.values().flatten().map(|h| h.req));
            }
            if let Some(p) = self.waiting.remove(&key) {
                reqs.extend(p.iter().map(|p| p.req));
            }
            out.extend(reqs.into_iter().map(|r| error(r, key, msg())));
        }
        out
    }

    /// Bytes of the current values held (every initialised key's value; not the kept older
    /// versions, open rounds or optimizer state).
    pub fn value_bytes(&self) -> usize {
        self.keys.values().map(|e| e.value.len()).sum()
    }

    /// The bytes this store holds, by kind (see [`StoreBytes`]).
    pub fn bytes(&self) -> StoreBytes {
        let mut b = StoreBytes::default();
        for e in self.keys.values() {
            b.values += e.value.len();
            b.kept += e.old.iter().map(|(_, v)| v.len()).sum::<usize>();
            b.pending += e.rounds.values().map(|r| r.acc.len()).sum::<usize>()
                + e.spare.0.as_ref().map_or(0, |s| s.len())
                + e.held
                    .values()
                    .flat_map(|q| q.iter())
                    .map(|h| h.grad.len())
                    .sum::<usize>();
            b.optimizer += e.mom.as_ref().map_or(0, |m| m.len());
        }
        b
    }

    /// The initialised keys, ascending.
    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.keys.keys().copied()
    }

    /// The version to acknowledge again for `worker`'s push to `key` that was already applied
    /// (a retry whose first acknowledgement was lost): in sync mode the round that push went
    /// into, which may still be open (acknowledging the current version instead would let the
    /// worker's pull return the round before its own push); otherwise the current version.
    pub fn ack_version(&self, key: u64, worker: u64) -> Option<u64> {
        let e = self.keys.get(&key)?;
        Some(
            e.version
                .max(e.last_round.get(&worker).copied().unwrap_or(0)),
        )
    }

    /// Bytes of the whole user key part `key` belongs to, if known.
    pub fn total(&self, key: u64) -> Option<u64> {
        self.keys.get(&key).map(|e| e.total).filter(|t| *t > 0)
    }

    /// Records the whole key's byte length of part `key` where it is not known yet (the first
    /// init that states it; later ones are checked against it by the caller).
    pub fn set_total(&mut self, key: u64, total: u64) {
        if let Some(e) = self.keys.get_mut(&key) {
            if e.total == 0 {
                e.total = total;
            }
        }
    }

    /// The current version of `key`.
    pub fn version(&self, key: u64) -> Option<u64> {
        self.keys.get(&key).map(|e| e.version)
    }

    /// Keeps version `version` of `key` readable with [`Store::read_at`], beyond the history,
    /// until [`Store::unpin`]: a checkpoint copies its parts one at a time while the store goes
    /// on. One pin per key (a new one replaces the old). Returns false, pinning nothing, when
    /// the key does not hold that version.
    pub fn pin(&mut self, key: u64, version: u64) -> bool {
        let h = self.history;
        match self.keys.get_mut(&key) {
            Some(e) if e.read(version).is_some() => {
                e.pin = Some(version);
                e.trim(h);
                true
            }
            _ => false,
        }
    }

    /// Ends the pin of `key`, if any (versions beyond the history go).
    pub fn unpin(&mut self, key: u64) {
        let h = self.history;
        if let Some(e) = self.keys.get_mut(&key) {
            e.pin = None;
            e.trim(h);
        }
    }

    /// Sync mode: the round `worker` last pushed into on `key` (closed or open), if it pushed.
    pub fn last_round(&self, key: u64, worker: u64) -> Option<u64> {
        self.keys.get(&key)?.last_round.get(&worker).copied()
    }

    /// The update rule.
    pub fn rule(&self) -> &UpdateRule {
        &self.rule
    }

    /// Replaces the update rule for every update applied from now on (sync: the rounds that
    /// close from now on). The keys' optimizer state (momentum) is kept.
    pub fn set_rule(&mut self, rule: UpdateRule) {
        self.rule = rule;
    }

    /// The optimizer state of `key` (the Sgd rule's momentum buffer, same dtype and length as
    /// the value; zeros when the key has none yet), `None` when the key is not initialised.
    pub fn state(&self, key: u64) -> Option<Vec<u8>> {
        let e = self.keys.get(&key)?;
        Some(e.mom.clone().unwrap_or_else(|| vec![0u8; e.value.len()]))
    }

    /// Replaces the optimizer state of `key` (see [`Store::state`]).
    ///
    /// Errors: [`Error::InvalidArgument`] when the key is not initialised or `dtype` and the
    /// length are not the key's.
    pub fn set_state(&mut self, key: u64, dtype: DataType, state: &[u8]) -> Result<()> {
        let e = self.keys.get_mut(&key).ok_or_else(|| {
            Error::InvalidArgument(format!("key {key} not initialised: call init first"))
        })?;
        if let Some(msg) = e.check(key, dtype, state.len()) {
            return Err(Error::InvalidArgument(format!("optimizer state: {msg}")));
        }
        e.mom = Some(state.to_vec());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: DataType = DataType::F32;

    fn b(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_ne_bytes()).collect()
    }

    fn f(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn ack(req: ReqId, key: u64, version: u64) -> Event {
        Event::PushAck { req, key, version }
    }

    fn val(req: ReqId, key: u64, version: u64, v: &[f32]) -> Event {
        Event::Value {
            req,
            key,
            version,
            data: Arc::new(b(v)),
        }
    }

    fn store(mode: Consistency, rule: UpdateRule, history: usize, workers: &[u64]) -> Store {
        let mut s = Store::new(mode, rule, history);
        assert!(s.set_workers(workers).is_empty());
        s
    }

    fn err_msg(ev: &[Event]) -> &str {
        match ev {
            [Event::Error { msg, .. }] => msg,
            _ => panic!("expected one error, got {ev:?}"),
        }
    }

    /// A sync round's sum goes into the buffer of a version the store no longer keeps (no
    /// fresh memory each round), never into one an answer still holds.
    #[test]
    fn sync_rounds_reuse_dropped_buffers_but_not_held_ones() {
        for history in [1, 3] {
            let mut s = store(Consistency::Sync, UpdateRule::Sum, history, &[1, 2]);
            s.init(7, F, &b(&[0., 0.])).unwrap();
            let mut held = None;
            // With a history of 1: the buffer of the version the last round's close dropped,
            // when no answer held it.
            let mut dropped: Option<*const u8> = None;
            for r in 1..=6u64 {
                let x = r as f32;
                let before = s.keys.get(&7).unwrap().value.as_ptr();
                s.push(10 * r, 1, 7, F, &b(&[x, 1.])).unwrap();
                if let Some(p) = dropped {
                    let e = s.keys.get(&7).unwrap();
                    let acc = e.rounds.values().next().unwrap().acc.as_ptr();
                    assert_eq!(acc, p, "round {r} sums into the dropped version's buffer");
                }
                let ev = s.push(10 * r + 1, 2, 7, F, &b(&[x, 2.])).unwrap();
                assert_eq!(ev, [ack(10 * r + 1, 7, r)], "history {history}");
                let ans = s.pull(10 * r + 2, 1, 7, None).unwrap();
                assert_eq!(ans, [val(10 * r + 2, 7, r, &[2. * x, 3.])]);
                if r == 2 {
                    // An answer being sent holds round 2's buffer from here on.
                    if let [Event::Value { data, .. }] = &ans[..] {
                        held = Some(data.clone());
                    }
                }
                // The value and the older versions kept, plus at most one buffer for the
                // next round's sum.
                let bytes = s.bytes();
                assert_eq!(bytes.values, 8);
                assert!(bytes.pending <= 8, "history {history}: {bytes:?}");
                // This close dropped version r - 1 (round 2's is held by an answer).
                dropped = (history == 1 && r - 1 != 2).then_some(before);
            }
            assert_eq!(f(held.as_deref().unwrap()), [4., 3.], "history {history}");
        }
        // With a rule other than the sum, the sum's buffer serves the next round.
        let sgd = UpdateRule::Sgd(SgdParams::lr(1.0));
        let mut s = store(Consistency::Sync, sgd, 2, &[1, 2]);
        s.init(7, F, &b(&[0., 0.])).unwrap();
        for r in 1..=3u64 {
            s.push(10 * r, 1, 7, F, &b(&[1., 1.])).unwrap();
            s.push(10 * r + 1, 2, 7, F, &b(&[1., 1.])).unwrap();
            assert_eq!(s.bytes().pending, 8);
        }
        let ans = s.pull(99, 1, 7, None).unwrap();
        assert_eq!(ans, [val(99, 7, 3, &[-6., -6.])]);
    }

    #[test]
    fn sync_two_workers() {
        let mut s = store(Consistency::Sync, UpdateRule::Sum, 1, &[1, 2]);
        assert_eq!(s.init(7, F, &b(&[0., 0.])).unwrap(), (true, vec![]));
        assert_eq!(s.push(1, 1, 7, F, &b(&[1., 2.])).unwrap(), [ack(1, 7, 1)]);
        // Pull waits for the round this worker took part in.
        assert!(s.pull(2, 1, 7, None).unwrap().is_empty());
        // Early second push of worker 1: next round, acked at once, not counted in round 1.
        assert_eq!(s.push(3, 1, 7, F, &b(&[10., 20.])).unwrap(), [ack(3, 7, 2)]);
        assert_eq!(s.version(7), Some(0));
        // A pull for version 2 waits too.
        assert!(s.pull(4, 9, 7, Some(2)).unwrap().is_empty());
        assert_eq!(
            s.push(5, 2, 7, F, &b(&[3., 4.])).unwrap(),
            [ack(5, 7, 1), val(2, 7, 1, &[4., 6.])]
        );
        assert_eq!(s.version(7), Some(1));
        // Worker 2 pushed round 1 only: its pull is answered at once; worker 1's waits.
        assert_eq!(s.pull(6, 2, 7, None).unwrap(), [val(6, 7, 1, &[4., 6.])]);
        assert!(s.pull(7, 1, 7, None).unwrap().is_empty());
        // A reader that never pushed gets the latest.
        assert_eq!(s.pull(8, 100, 7, None).unwrap(), [val(8, 7, 1, &[4., 6.])]);
        assert_eq!(
            s.push(9, 2, 7, F, &b(&[30., 40.])).unwrap(),
            [
                ack(9, 7, 2),
                val(4, 7, 2, &[40., 60.]),
                val(7, 7, 2, &[40., 60.])
            ]
        );
        // Three early pushes of worker 1 queue into rounds 3, 4, 5; each closes exactly once.
        for (i, r) in (3..=5).enumerate() {
            let g = [r as f32, 0.];
            assert_eq!(
                s.push(20 + i as u64, 1, 7, F, &b(&g)).unwrap(),
                [ack(20 + i as u64, 7, r)]
            );
        }
        assert!(s.pull(30, 1, 7, Some(4)).unwrap().is_empty());
        assert_eq!(s.push(31, 2, 7, F, &b(&[0., 1.])).unwrap(), [ack(31, 7, 3)]);
        assert_eq!(
            s.push(32, 2, 7, F, &b(&[0., 1.])).unwrap(),
            [ack(32, 7, 4), val(30, 7, 4, &[4., 1.])]
        );
        assert_eq!(s.version(7), Some(4));
        assert_eq!(s.push(33, 2, 7, F, &b(&[0., 2.])).unwrap(), [ack(33, 7, 5)]);
        assert_eq!(f(s.get(7).unwrap().1), [5., 2.]);
        assert!(s.rounds_open(7) == 0);
    }

    /// What the store holds, by kind: current values, the history's older versions (at most
    /// `history - 1` per key), open sync rounds.
    #[test]
    fn bytes_by_kind() {
        let mut s = store(Consistency::Async, UpdateRule::Sum, 3, &[1]);
        s.init(7, F, &b(&[0.; 4])).unwrap();
        s.init(8, F, &b(&[0.; 2])).unwrap();
        let none = StoreBytes::default();
        assert_eq!(s.bytes(), StoreBytes { values: 24, ..none });
        for r in 0..5 {
            s.push(r + 1, 1, 7, F, &b(&[1.; 4])).unwrap();
        }
        // Key 7 keeps two older versions of 16 bytes; key 8 none.
        assert_eq!(
            s.bytes(),
            StoreBytes {
                values: 24,
                kept: 32,
                ..none
            }
        );
        let mut y = store(Consistency::Sync, UpdateRule::Sum, 1, &[1, 2]);
        y.init(7, F, &b(&[0.; 4])).unwrap();
        y.push(1, 1, 7, F, &b(&[1.; 4])).unwrap();
        // Round 1 is open (worker 2 has not pushed): its sum is held.
        let one_sum = StoreBytes {
            values: 16,
            pending: 16,
            ..none
        };
        assert_eq!(y.bytes(), one_sum);
        y.push(2, 2, 7, F, &b(&[1.; 4])).unwrap();
        // Closed: the version it replaced is kept for the next round's sum.
        assert_eq!(y.bytes(), one_sum);
        y.push(3, 1, 7, F, &b(&[1.; 4])).unwrap();
        // ... which holds it now: no more memory than before.
        assert_eq!(y.bytes(), one_sum);
    }

    /// A retried push that was already applied is acknowledged again with the round it went
    /// into (still open), not the current version: a worker pulling after that acknowledgement
    /// must get its own round, not the one before.
    #[test]
    fn sync_ack_version_of_an_applied_push_is_its_round() {
        let mut s = store(Consistency::Sync, UpdateRule::Sum, 1, &[1, 2]);
        s.init(7, F, &b(&[0., 0.])).unwrap();
        assert_eq!(s.ack_version(7, 1), Some(0));
        assert_eq!(s.push(1, 1, 7, F, &b(&[1., 2.])).unwrap(), [ack(1, 7, 1)]);
        assert_eq!(s.version(7), Some(0));
        assert_eq!(s.ack_version(7, 1), Some(1));
        assert_eq!(s.ack_version(7, 2), Some(0));
        s.push(2, 2, 7, F, &b(&[1., 2.])).unwrap();
        assert_eq!(s.version(7), Some(1));
        assert_eq!(
            (s.ack_version(7, 1), s.ack_version(7, 2)),
            (Some(1), Some(1))
        );
        assert_eq!(s.ack_version(8, 1), None);
    }

    impl Store {
        fn rounds_open(&self, key: u64) -> usize {
            self.keys[&key].rounds.len()
        }
    }

    /// Any interleaving of 3 workers × 6 rounds: each worker's pull after its push returns
    /// exactly its round, with the closed-form sum.
    #[test]
    fn sync_interleavings_closed_form() {
        let grad = |w: u64, r: u64| [(w * 100 + r) as f32];
        let sum = |r: u64| [(100 + 200 + 300 + 3 * r) as f32];
        for seed in 0..200u64 {
            let mut s = store(Consistency::Sync, UpdateRule::Sum, 3, &[1, 2, 3]);
            s.init(0, F, &b(&[0.])).unwrap();
            let mut next = [1u64; 3];
            let mut x = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut req = 0;
            let mut pulls: BTreeMap<ReqId, u64> = BTreeMap::new();
            let mut answered = 0;
            while next.iter().any(|&r| r <= 6) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let w = (x >> 33) % 3;
                if next[w as usize] > 6 {
                    continue;
                }
                let r = next[w as usize];
                next[w as usize] += 1;
                req += 1;
                let mut ev = s.push(req, w + 1, 0, F, &b(&grad(w + 1, r))).unwrap();
                assert_eq!(ev.remove(0), ack(req, 0, r));
                req += 1;
                pulls.insert(req, r);
                ev.extend(s.pull(req, w + 1, 0, None).unwrap());
                for e in ev {
                    let Event::Value {
                        req, version, data, ..
                    } = e
                    else {
                        panic!("{e:?}")
                    };
                    assert_eq!(pulls[&req], version, "seed {seed}");
                    assert_eq!(f(&data), sum(version), "seed {seed}");
                    answered += 1;
                }
            }
            assert_eq!(answered, 18);
            assert_eq!(s.version(0), Some(6));
        }
    }

    #[test]
    fn async_mode() {
        let mut s = store(Consistency::Async, UpdateRule::Sum, 1, &[]);
        s.init(3, F, &b(&[1., 1.])).unwrap();
        assert_eq!(s.push(1, 1, 3, F, &b(&[1., 2.])).unwrap(), [ack(1, 3, 1)]);
        assert_eq!(s.push(2, 42, 3, F, &b(&[1., 2.])).unwrap(), [ack(2, 3, 2)]);
        assert_eq!(s.pull(3, 1, 3, None).unwrap(), [val(3, 3, 2, &[3., 5.])]);
        assert!(s.pull(4, 1, 3, Some(4)).unwrap().is_empty());
        assert_eq!(s.push(5, 2, 3, F, &b(&[1., 0.])).unwrap(), [ack(5, 3, 3)]);
        assert_eq!(
            s.push(6, 2, 3, F, &b(&[1., 0.])).unwrap(),
            [ack(6, 3, 4), val(4, 3, 4, &[5., 5.])]
        );
        // A pull of a key that does not exist yet waits for its init.
        assert!(s.pull(7, 1, 4, None).unwrap().is_empty());
        assert!(s.pull(8, 1, 4, Some(1)).unwrap().is_empty());
        let (created, ev) = s.init(4, F, &b(&[9.])).unwrap();
        assert!(created);
        assert_eq!(ev, [val(7, 4, 0, &[9.])]);
        assert_eq!(
            s.push(9, 1, 4, F, &b(&[1.])).unwrap(),
            [ack(9, 4, 1), val(8, 4, 1, &[10.])]
        );
        // Second init: not an error, no change.
        assert_eq!(s.init(4, F, &b(&[0.])).unwrap(), (false, vec![]));
        assert_eq!(f(s.get(4).unwrap().1), [10.]);
    }

    #[test]
    fn bounded_staleness_tau_1() {
        let mut s = store(Consistency::Bounded(1), UpdateRule::Sum, 1, &[1, 2]);
        s.init(0, F, &b(&[0.])).unwrap();
        // Worker 1 may be one push ahead of worker 2 ...
        assert_eq!(s.push(1, 1, 0, F, &b(&[1.])).unwrap(), [ack(1, 0, 1)]);
        // ... but not two: its second and third pushes are held (no ack).
        assert!(s.push(2, 1, 0, F, &b(&[2.])).unwrap().is_empty());
        assert!(s.push(3, 1, 0, F, &b(&[4.])).unwrap().is_empty());
        assert_eq!(s.version(0), Some(1));
        // Its pull waits for its own held pushes.
        assert!(s.pull(4, 1, 0, None).unwrap().is_empty());
        // Worker 2's pull does not wait.
        assert_eq!(s.pull(5, 2, 0, None).unwrap(), [val(5, 0, 1, &[1.])]);
        // The slow worker catches up by one: exactly one held push is released.
        assert_eq!(
            s.push(6, 2, 0, F, &b(&[10.])).unwrap(),
            [ack(6, 0, 2), ack(2, 0, 3)]
        );
        assert_eq!(
            s.push(7, 2, 0, F, &b(&[20.])).unwrap(),
            [ack(7, 0, 4), ack(3, 0, 5), val(4, 0, 5, &[37.])]
        );
        // Now worker 2 is the fast one: one ahead is fine, two are not.
        assert_eq!(s.push(8, 2, 0, F, &b(&[0.])).unwrap(), [ack(8, 0, 6)]);
        assert_eq!(s.push(9, 2, 0, F, &b(&[0.])).unwrap(), [ack(9, 0, 7)]);
        assert!(s.push(10, 2, 0, F, &b(&[0.])).unwrap().is_empty());
        // Worker 1 leaves: worker 2 is alone and its held push goes through.
        assert_eq!(s.set_workers(&[2]), [ack(10, 0, 8)]);
        // A worker outside the set cannot push.
        assert!(err_msg(&s.push(11, 1, 0, F, &b(&[0.])).unwrap()).contains("worker 1 is not in"));
        // A joiner starts at the slowest count: no one is held because of it.
        assert!(s.set_workers(&[2, 3]).is_empty());
        assert_eq!(s.push(12, 2, 0, F, &b(&[1.])).unwrap(), [ack(12, 0, 9)]);
        assert!(s.push(13, 2, 0, F, &b(&[1.])).unwrap().is_empty());
        assert_eq!(
            s.push(14, 3, 0, F, &b(&[1.])).unwrap(),
            [ack(14, 0, 10), ack(13, 0, 11)]
        );
    }

    #[test]
    fn bounded_leaver_held_pushes_applied() {
        let mut s = store(Consistency::Bounded(0), UpdateRule::Sum, 1, &[1, 2, 3]);
        s.init(0, F, &b(&[0.])).unwrap();
        assert_eq!(s.push(1, 1, 0, F, &b(&[1.])).unwrap(), [ack(1, 0, 1)]);
        assert!(s.push(2, 1, 0, F, &b(&[1.])).unwrap().is_empty());
        // Worker 1 (the one with a held push) dies: its push is applied, not lost.
        assert_eq!(s.set_workers(&[2, 3]), [ack(2, 0, 2)]);
    }

    /// Random interleavings of 3 workers with tau = 2: no applied push ever puts a worker of
    /// the set more than tau ahead of the slowest, every push is acked exactly once, in order.
    #[test]
    fn bounded_interleavings_invariant() {
        let tau = 2;
        for seed in 0..100u64 {
            let mut s = store(Consistency::Bounded(tau), UpdateRule::Sum, 1, &[1, 2, 3]);
            s.init(0, DataType::I64, &0i64.to_ne_bytes()).unwrap();
            let mut x = seed;
            let mut acked = BTreeSet::new();
            let mut total = 0i64;
            for req in 0..60u64 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let w = (x >> 33) % 3 + 1;
                let g = (req as i64 + 1) * 7;
                total += g;
                for e in s.push(req, w, 0, DataType::I64, &g.to_ne_bytes()).unwrap() {
                    let Event::PushAck { req, .. } = e else {
                        panic!("{e:?}")
                    };
                    assert!(acked.insert(req));
                    let e = &s.keys[&0];
                    let min = [1, 2, 3].iter().map(|w| e.done(*w)).min().unwrap();
                    let max = [1, 2, 3].iter().map(|w| e.done(*w)).max().unwrap();
                    assert!(max <= min + tau, "seed {seed}");
                }
            }
            // Everyone leaves: every held push is applied.
            for e in s.set_workers(&[]) {
                let Event::PushAck { req, .. } = e else {
                    panic!("{e:?}")
                };
                assert!(acked.insert(req));
            }
            assert_eq!(acked.len(), 60);
            assert_eq!(s.get(0).unwrap().1, total.to_ne_bytes());
            assert_eq!(s.version(0), Some(60));
        }
    }

    #[test]
    fn shrink_closes_round_with_survivors() {
        let mut s = store(Consistency::Sync, UpdateRule::Sum, 1, &[1, 2, 3]);
        s.init(0, F, &b(&[0.])).unwrap();
        s.init(1, F, &b(&[0.])).unwrap();
        s.push(1, 1, 0, F, &b(&[1.])).unwrap();
        s.push(2, 2, 0, F, &b(&[2.])).unwrap();
        s.push(3, 2, 0, F, &b(&[20.])).unwrap(); // worker 2, round 2
        s.push(4, 3, 1, F, &b(&[5.])).unwrap(); // key 1: the dying worker pushed
        assert!(s.pull(5, 1, 0, None).unwrap().is_empty());
        assert!(s.pull(6, 9, 0, Some(2)).unwrap().is_empty());
        // Worker 3 dies: key 0's round 1 closes with 1 and 2; key 1's round keeps worker 3's
        // acknowledged push and waits for the survivors.
        assert_eq!(s.set_workers(&[1, 2]), [val(5, 0, 1, &[3.])]);
        assert_eq!(s.version(1), Some(0));
        assert_eq!(s.push(7, 1, 1, F, &b(&[1.])).unwrap(), [ack(7, 1, 1)]);
        assert_eq!(s.push(8, 2, 1, F, &b(&[1.])).unwrap(), [ack(8, 1, 1)]);
        assert_eq!(s.version(1), Some(1));
        assert_eq!(f(s.get(1).unwrap().1), [7.]);
        // Worker 2 dies too: round 2 (only worker 2 pushed... and 1 did not) waits for 1.
        assert!(s.set_workers(&[1]).is_empty());
        assert_eq!(
            s.push(9, 1, 0, F, &b(&[10.])).unwrap(),
            [ack(9, 0, 2), val(6, 0, 2, &[30.])]
        );
        // A joiner is waited for from the next round on.
        assert!(s.set_workers(&[1, 4]).is_empty());
        assert_eq!(s.push(10, 1, 0, F, &b(&[1.])).unwrap(), [ack(10, 0, 3)]);
        assert_eq!(s.version(0), Some(2));
        assert_eq!(s.push(11, 4, 0, F, &b(&[1.])).unwrap(), [ack(11, 0, 3)]);
        assert_eq!(s.version(0), Some(3));
        // Cascade: worker 1 ran two rounds ahead; its partner leaves, both rounds close.
        s.push(12, 1, 0, F, &b(&[1.])).unwrap();
        s.push(13, 1, 0, F, &b(&[2.])).unwrap();
        assert!(s.pull(14, 1, 0, Some(4)).unwrap().is_empty());
        assert!(s.pull(15, 1, 0, None).unwrap().is_empty());
        assert_eq!(
            s.set_workers(&[1]),
            [val(14, 0, 4, &[1.]), val(15, 0, 5, &[2.])]
        );
    }

    #[test]
    fn history_snapshot_read_at() {
        let mut s = store(Consistency::Sync, UpdateRule::Sum, 2, &[1]);
        assert_eq!(s.snapshot_version(), None);
        s.init(1, F, &b(&[0.])).unwrap();
        s.init(2, F, &b(&[0.])).unwrap();
        assert_eq!(s.snapshot_version(), Some(0));
        s.push(1, 1, 1, F, &b(&[1.])).unwrap();
        // Key 1 keeps {0, 1}, key 2 {0}.
        assert_eq!(s.snapshot_version(), Some(0));
        s.push(2, 1, 1, F, &b(&[2.])).unwrap();
        // Key 1 keeps {1, 2}, key 2 {0}: no common version.
        assert_eq!(s.snapshot_version(), None);
        s.push(3, 1, 2, F, &b(&[10.])).unwrap();
        assert_eq!(s.snapshot_version(), Some(1));
        assert_eq!(s.read_at(1, 1), Some(&b(&[1.])[..]));
        assert_eq!(s.read_at(1, 2), Some(&b(&[2.])[..]));
        assert_eq!(s.read_at(1, 0), None);
        assert_eq!(s.read_at(2, 1), Some(&b(&[10.])[..]));
        assert_eq!(s.read_at(2, 0), Some(&b(&[0.])[..]));
        assert_eq!(s.read_at(3, 0), None);
        s.push(4, 1, 2, F, &b(&[20.])).unwrap();
        assert_eq!(s.snapshot_version(), Some(2));
        // Async with history 3: versions per push.
        let mut a = store(Consistency::Async, UpdateRule::Sum, 3, &[]);
        a.init(0, F, &b(&[0.])).unwrap();
        for i in 0..5 {
            a.push(i, 0, 0, F, &b(&[1.])).unwrap();
        }
        assert_eq!(a.read_at(0, 5), Some(&b(&[5.])[..]));
        assert_eq!(a.read_at(0, 3), Some(&b(&[3.])[..]));
        assert_eq!(a.read_at(0, 2), None);
        assert_eq!(a.snapshot_version(), Some(5));
    }

    /// Runs `ops` on `s`, collecting the events.
    fn run(s: &mut Store, ops: &[(u8, ReqId, u64, u64, f32)]) -> Vec<Event> {
        let mut out = Vec::new();
        for &(op, req, w, key, g) in ops {
            match op {
                0 => out.extend(s.push(req, w, key, F, &b(&[g, -g])).unwrap()),
                1 => out.extend(s.pull(req, w, key, None).unwrap()),
                2 => out.extend(s.init(key, F, &b(&[g, g])).unwrap().1),
                _ => out.extend(s.set_workers(&[w])),
            }
        }
        out
    }

    fn round_trip(mode: Consistency, rule: UpdateRule) {
        let mut a = store(mode, rule.clone(), 3, &[1, 2]);
        let setup: &[(u8, ReqId, u64, u64, f32)] = &[
            (2, 0, 0, 10, 1.),
            (2, 0, 0, 11, 2.),
            (0, 1, 1, 10, 1.),
            (0, 2, 1, 10, 2.),
            (0, 3, 1, 10, 3.),
            (0, 4, 2, 10, 4.),
            (1, 5, 1, 10, 0.),
            (0, 6, 2, 11, 5.),
            (1, 7, 2, 11, 0.),
            (1, 8, 2, 12, 0.), // key 12 not initialised: waits
        ];
        run(&mut a, setup);
        let dumps = a.export(|_| true);
        assert_eq!(
            dumps.iter().map(KeyDump::key).collect::<Vec<_>>(),
            [10, 11, 12]
        );
        assert_eq!(dumps[2].version(), None);
        let json = serde_json::to_string(&dumps).unwrap();
        let back: Vec<KeyDump> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, dumps);
        let mut r = store(mode, rule, 3, &[1, 2]);
        assert!(r.import(back).is_empty());
        assert_eq!(r.export(|_| true), dumps);
        let rest: &[(u8, ReqId, u64, u64, f32)] = &[
            (0, 20, 2, 10, 7.),
            (0, 21, 2, 10, 8.),
            (0, 22, 1, 11, 9.),
            (1, 23, 1, 11, 0.),
            (2, 0, 0, 12, 3.),
            (0, 24, 2, 10, 1.),
            (0, 25, 1, 12, 1.),
            (0, 26, 2, 12, 1.),
            (1, 27, 2, 10, 0.),
            (3, 0, 1, 0, 0.), // worker 2 leaves
            (0, 28, 1, 10, 1.),
            (0, 29, 1, 10, 1.),
            (1, 30, 1, 10, 0.),
        ];
        let ea = run(&mut a, rest);
        let er = run(&mut r, rest);
        assert!(ea.len() > 10, "{ea:?}");
        assert_eq!(ea, er);
        assert_eq!(a.export(|_| true), r.export(|_| true));
        for k in [10, 11, 12] {
            for v in 0..8 {
                assert_eq!(a.read_at(k, v), r.read_at(k, v));
            }
        }
    }

    #[test]
    fn export_import_round_trip() {
        round_trip(Consistency::Sync, UpdateRule::Sum);
        round_trip(Consistency::Sync, UpdateRule::sgd(0.5));
        round_trip(Consistency::Async, UpdateRule::Sum);
        round_trip(Consistency::Bounded(1), UpdateRule::Sum);
    }

    #[test]
    fn export_pick_remove_migrate() {
        let mut a = store(Consistency::Sync, UpdateRule::Sum, 1, &[1, 2]);
        for k in 0..6 {
            a.init(k, F, &b(&[k as f32])).unwrap();
        }
        a.push(1, 1, 3, F, &b(&[1.])).unwrap(); // open round on key 3
        a.pull(2, 1, 3, None).unwrap(); // waiting
        a.pull(3, 1, 9, None).unwrap(); // waiting for init of key 9
        let odd = |k: u64| k % 2 == 1;
        let mut dumps = a.export(odd);
        assert_eq!(
            dumps.iter().map(KeyDump::key).collect::<Vec<_>>(),
            [1, 3, 5, 9]
        );
        for d in &mut dumps {
            d.strip_requests();
        }
        let mut ev = a.remove(odd);
        ev.sort_by_key(|e| e.req());
        assert_eq!(ev.len(), 2);
        assert!(matches!(&ev[0], Event::Error { req: 2, key: 3, msg } if msg.contains("moved")));
        assert!(matches!(&ev[1], Event::Error { req: 3, key: 9, .. }));
        assert_eq!(a.keys().collect::<Vec<_>>(), [0, 2, 4]);
        // The new owner (history 1) continues the open round.
        let mut n = store(Consistency::Sync, UpdateRule::Sum, 1, &[1, 2]);
        assert!(n.import(dumps).is_empty());
        assert_eq!(n.keys().collect::<Vec<_>>(), [1, 3, 5]);
        assert_eq!(n.push(4, 2, 3, F, &b(&[2.])).unwrap(), [ack(4, 3, 1)]);
        assert_eq!(n.get(3).unwrap(), (1, &b(&[3.])[..]));
        // Retried pull.
        assert_eq!(n.pull(5, 1, 3, None).unwrap(), [val(5, 3, 1, &[3.])]);
    }

    #[test]
    fn errors_do_not_disturb_others() {
        let mut s = store(Consistency::Sync, UpdateRule::Sum, 1, &[1, 2]);
        s.init(1, F, &b(&[0., 0.])).unwrap();
        s.init(2, F, &b(&[0., 0.])).unwrap();
        assert_eq!(s.push(1, 1, 1, F, &b(&[1., 1.])).unwrap(), [ack(1, 1, 1)]);
        let m = err_msg(&s.push(2, 2, 1, F, &b(&[1.])).unwrap()).to_string();
        assert!(
            m.contains("key 1") && m.contains("expected 8") && m.contains("got 4"),
            "{m}"
        );
        let m = err_msg(&s.push(3, 2, 1, DataType::I32, &[0; 8]).unwrap()).to_string();
        assert!(
            m.contains("key 1") && m.contains("float") && m.contains("int32"),
            "{m}"
        );
        let ev = s.push(4, 2, 77, F, &b(&[1., 1.])).unwrap();
        assert_eq!(
            ev,
            [Event::Error {
                req: 4,
                key: 77,
                msg: "key 77 not initialised: call init first".into()
            }]
        );
        let m = err_msg(&s.push(5, 3, 1, F, &b(&[1., 1.])).unwrap()).to_string();
        assert!(
            m.contains("worker 3 is not in the current worker set"),
            "{m}"
        );
        // Nothing was recorded by the failed pushes: round 1 of key 1 still waits for worker
        // 2, and its sum holds worker 1's push only.
        assert_eq!(s.version(1), Some(0));
        assert_eq!(s.push(6, 2, 1, F, &b(&[2., 2.])).unwrap(), [ack(6, 1, 1)]);
        assert_eq!(s.get(1).unwrap(), (1, &b(&[3., 3.])[..]));
        // Key 2 untouched and working.
        assert_eq!(s.version(2), Some(0));
        s.push(7, 1, 2, F, &b(&[1., 0.])).unwrap();
        s.push(8, 2, 2, F, &b(&[1., 0.])).unwrap();
        assert_eq!(s.get(2).unwrap(), (1, &b(&[2., 0.])[..]));
        // Init errors.
        assert!(s.init(1, DataType::I32, &[0; 8]).is_err());
        assert!(s.init(1, F, &[0; 4]).is_err());
        assert!(s.init(9, F, &[0; 3]).is_err());
        assert_eq!(s.init(1, F, &[0; 8]).unwrap(), (false, vec![]));
        assert_eq!(s.get(1).unwrap(), (1, &b(&[3., 3.])[..]));
        // Cancelling a pull that waits for an unknown key.
        assert!(s.pull(9, 1, 55, None).unwrap().is_empty());
        let ev = s.cancel_pull(9, "no such key");
        assert!(
            matches!(&ev[..], [Event::Error { req: 9, key: 55, msg }] if msg.contains("no such key"))
        );
        assert!(s.cancel_pull(9, "again").is_empty());
        assert!(s.init(55, F, &[]).unwrap().1.is_empty());
    }

    #[test]
    fn sgd_f32_and_integer_error() {
        let mut s = store(Consistency::Async, UpdateRule::sgd(0.5), 1, &[]);
        s.init(0, F, &b(&[1., 2.])).unwrap();
        assert_eq!(s.push(1, 1, 0, F, &b(&[2., 4.])).unwrap(), [ack(1, 0, 1)]);
        assert_eq!(s.get(0).unwrap().1, b(&[0., 0.]));
        s.init(1, DataType::I32, &[0; 8]).unwrap();
        let m = err_msg(&s.push(2, 1, 1, DataType::I32, &[1; 8]).unwrap()).to_string();
        assert!(
            m.contains("Sgd") && m.contains("int32") && m.contains("key 1"),
            "{m}"
        );
        assert_eq!(s.version(1), Some(0));
        // f16, f64, bf16 (halves computed in f32).
        s.init(2, DataType::F16, &f16::from_f32(1.0).to_ne_bytes())
            .unwrap();
        s.push(3, 1, 2, DataType::F16, &f16::from_f32(0.5).to_ne_bytes())
            .unwrap();
        assert_eq!(s.get(2).unwrap().1, f16::from_f32(0.75).to_ne_bytes());
        s.init(3, DataType::BF16, &bf16::from_f32(1.0).to_ne_bytes())
            .unwrap();
        s.push(4, 1, 3, DataType::BF16, &bf16::from_f32(1.0).to_ne_bytes())
            .unwrap();
        assert_eq!(s.get(3).unwrap().1, bf16::from_f32(0.5).to_ne_bytes());
        s.init(4, DataType::F64, &3f64.to_ne_bytes()).unwrap();
        s.push(5, 1, 4, DataType::F64, &1f64.to_ne_bytes()).unwrap();
        assert_eq!(s.get(4).unwrap().1, 2.5f64.to_ne_bytes());
        // Sync: value -= lr * (sum of the round), history 2 keeps the weights before.
        let mut s = store(Consistency::Sync, UpdateRule::sgd(0.5), 2, &[1, 2]);
        s.init(0, F, &b(&[1., 2.])).unwrap();
        s.push(1, 1, 0, F, &b(&[1., 1.])).unwrap();
        s.push(2, 2, 0, F, &b(&[3., 3.])).unwrap();
        assert_eq!(s.get(0).unwrap(), (1, &b(&[-1., 0.])[..]));
        assert_eq!(s.read_at(0, 0), Some(&b(&[1., 2.])[..]));
    }

    #[test]
    fn custom_rule() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        // value = 2 * value + grad; fails when the gradient's first element is negative.
        let rule = UpdateRule::Custom(Arc::new(move |key, dtype, v: &mut [u8], g: &[u8]| {
            seen2.lock().unwrap().push((key, dtype, f(g)));
            if f(g)[0] < 0. {
                return Err(Error::InvalidArgument("negative".into()));
            }
            let out: Vec<f32> = f(v).iter().zip(f(g)).map(|(v, g)| 2. * v + g).collect();
            v.copy_from_slice(&b(&out));
            Ok(())
        }));
        assert_eq!(format!("{rule:?}"), "Custom(..)");
        let mut s = store(Consistency::Sync, rule.clone(), 1, &[1, 2]);
        s.init(5, F, &b(&[1.])).unwrap();
        s.push(1, 1, 5, F, &b(&[1.])).unwrap();
        s.push(2, 2, 5, F, &b(&[2.])).unwrap();
        // Called once, with the round's sum.
        assert_eq!(*seen.lock().unwrap(), [(5, F, vec![3.])]);
        assert_eq!(s.get(5).unwrap(), (1, &b(&[5.])[..]));
        // Failing in sync mode: the round closes with the previous value.
        s.push(3, 1, 5, F, &b(&[-1.])).unwrap();
        assert!(s.pull(4, 1, 5, None).unwrap().is_empty());
        let ev = s.push(5, 2, 5, F, &b(&[-2.])).unwrap();
        assert_eq!(ev[0], ack(5, 5, 2));
        assert!(
            matches!(&ev[1], Event::RuleFailed { key: 5, version: 2, msg } if msg.contains("negative"))
        );
        assert_eq!(ev[2], val(4, 5, 2, &[5.]));
        // Async: each push; a failure is the push's error and changes nothing.
        let mut a = store(Consistency::Async, rule, 2, &[]);
        a.init(5, F, &b(&[1.])).unwrap();
        assert_eq!(a.push(1, 1, 5, F, &b(&[1.])).unwrap(), [ack(1, 5, 1)]);
        let m = err_msg(&a.push(2, 1, 5, F, &b(&[-1.])).unwrap()).to_string();
        assert!(
            m.contains("update rule failed") && m.contains("negative"),
            "{m}"
        );
        assert_eq!(a.get(5).unwrap(), (1, &b(&[3.])[..]));
        assert_eq!(a.read_at(5, 0), Some(&b(&[1.])[..]));
    }

    #[test]
    fn a_pinned_version_outlives_the_history_until_unpinned() {
        for history in [1, 2, 3] {
            // Async: each push is a version.
            let mut s = store(Consistency::Async, UpdateRule::Sum, history, &[]);
            s.init(0, F, &b(&[1.])).unwrap();
            s.push(1, 1, 0, F, &b(&[1.])).unwrap();
            assert!(s.pin(0, 1));
            assert!(!s.pin(0, 9));
            for i in 0..5 {
                s.push(2 + i, 1, 0, F, &b(&[1.])).unwrap();
            }
            assert_eq!(s.get(0).unwrap(), (6, &b(&[7.])[..]));
            assert_eq!(s.read_at(0, 1), Some(&b(&[2.])[..]), "history {history}");
            // The history still holds its own versions besides the pinned one.
            for v in 7 - history as u64..=6 {
                assert!(s.read_at(0, v).is_some(), "history {history} version {v}");
            }
            assert_eq!(s.read_at(0, 2), None);
            s.unpin(0);
            assert_eq!(s.read_at(0, 1), None);
            assert_eq!(s.get(0).unwrap(), (6, &b(&[7.])[..]));
            // Sync with a custom-free rule: rounds commit the same way.
            let mut y = store(Consistency::Sync, UpdateRule::sgd(-1.0), history, &[1]);
            y.init(0, F, &b(&[0.])).unwrap();
            assert!(y.pin(0, 0));
            for i in 0..4 {
                y.push(i, 1, 0, F, &b(&[2.])).unwrap();
            }
            assert_eq!(y.get(0).unwrap(), (4, &b(&[8.])[..]));
            assert_eq!(y.read_at(0, 0), Some(&b(&[0.])[..]));
            y.unpin(0);
            assert_eq!(y.read_at(0, 0), None);
        }
    }

    #[test]
    fn replicas_stay_identical() {
        let mut a = store(Consistency::Bounded(2), UpdateRule::Sum, 2, &[1, 2, 3]);
        let mut r = a.clone();
        let mut x = 7u64;
        for req in 0..300u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (op, w, key) = ((x >> 60) % 4, (x >> 40) % 4 + 1, (x >> 20) % 3);
            let ops = [(op as u8, req, w, key, (req % 5) as f32)];
            assert_eq!(run(&mut a, &ops), run(&mut r, &ops));
        }
        assert_eq!(a.export(|_| true), r.export(|_| true));
    }

    fn f16s(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|x| f16::from_f32(*x).to_ne_bytes())
            .collect()
    }

    fn rule(spec: &str) -> UpdateRule {
        UpdateRule::parse(spec).unwrap()
    }

    fn params(spec: &str) -> SgdParams {
        match rule(spec) {
            UpdateRule::Sgd(p) => p,
            other => panic!("{spec}: {other:?}"),
        }
    }

    #[test]
    fn rule_syntax() {
        assert!(matches!(rule("sum"), UpdateRule::Sum));
        assert_eq!(params("sgd:0.5"), SgdParams::lr(0.5));
        assert_eq!(params(" sgd:lr=0.5 "), SgdParams::lr(0.5));
        let p = params("sgd:clip=5,lr=0.1,momentum=0.9,wd=1e-4,rescale=0.5");
        assert_eq!(
            p,
            SgdParams {
                lr: 0.1,
                momentum: 0.9,
                wd: 1e-4,
                rescale: 0.5,
                clip: Some(5.0)
            }
        );
        // A negative clip is MXNet's "no clipping"; 0 clips to 0.
        assert_eq!(params("sgd:lr=1,clip=-1").clip, None);
        assert_eq!(params("sgd:lr=1,clip=0").clip, Some(0.0));
        // The spec round-trips exactly.
        for spec in [
            "sum",
            "sgd:0.1",
            "sgd:lr=0.1,momentum=0.9,wd=0.0001,rescale=0.3333333333333333,clip=5",
            "sgd:lr=1e-300,momentum=-0.5",
        ] {
            let r = rule(spec);
            let again = rule(&r.spec().unwrap());
            assert_eq!(format!("{r:?}"), format!("{again:?}"), "{spec}");
        }
        let custom = UpdateRule::Custom(Arc::new(|_, _, _: &mut [u8], _: &[u8]| Ok(())));
        assert!(custom.spec().is_none());
        for (bad, names) in [
            ("sgd:", "lr"),
            ("sgd:x", "lr=x"),
            ("sgd:lr=0.1,momentum=abc", "momentum=abc"),
            ("sgd:lr=0.1,mom=0.9", "\"mom\""),
            ("sgd:momentum=0.9", "lr is required"),
            ("sgd:lr=0.1,lr=0.2", "lr given twice"),
            ("sgd:lr=inf", "lr=inf"),
            ("sgd:lr=0.1,wd", "\"wd\""),
            ("adam:0.1", "expected sum"),
            ("sgd:lr=0.1,clip=nan", "clip=nan"),
        ] {
            let e = UpdateRule::parse(bad).unwrap_err().to_string();
            assert!(e.contains(names) && e.contains(bad), "{bad}: {e}");
        }
    }

    /// MXNet's formulas in f64, element by element (the hand computation).
    fn mx_step(p: &SgdParams, w: f64, g: f64, m: &mut f64) -> f64 {
        let mut g = p.rescale * g;
        if let Some(c) = p.clip {
            g = g.clamp(-c, c);
        }
        if p.momentum == 0.0 {
            w - p.lr * (g + p.wd * w)
        } else {
            *m = p.momentum * *m - p.lr * (g + p.wd * w);
            w + *m
        }
    }

    fn close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            let tol = 1e-6 * w.abs().max(1.0);
            assert!((*g as f64 - w).abs() <= tol, "got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn sgd_as_mxnet_sync_two_workers() {
        for spec in [
            "sgd:lr=0.1,momentum=0.9,wd=0.01,rescale=0.5",
            "sgd:lr=0.1,wd=0.01,rescale=0.5",
            "sgd:lr=0.2,momentum=0.5,rescale=2,clip=1.5",
            "sgd:lr=0.2,rescale=2,clip=1.5",
        ] {
            let p = params(spec);
            let mut s = store(Consistency::Sync, rule(spec), 2, &[1, 2]);
            let w0 = [1.0f32, -2.0, 0.5, 3.0];
            s.init(9, F, &b(&w0)).unwrap();
            let mut w: Vec<f64> = w0.iter().map(|x| *x as f64).collect();
            let mut m = vec![0f64; w.len()];
            let rounds: [([f32; 4], [f32; 4]); 3] = [
                ([0.5, -1.0, 2.0, 0.25], [0.5, 3.0, -0.5, 0.75]),
                ([1.0, 1.0, -4.0, 0.0], [-2.0, 0.5, 0.25, 1.0]),
                ([0.125, -0.5, 0.0, 2.0], [0.0, 0.0, 1.0, -1.0]),
            ];
            for (r, (g1, g2)) in rounds.iter().enumerate() {
                s.push(1, 1, 9, F, &b(g1)).unwrap();
                assert_eq!(s.version(9), Some(r as u64), "{spec}: round still open");
                s.push(2, 2, 9, F, &b(g2)).unwrap();
                assert_eq!(s.version(9), Some(r as u64 + 1));
                for i in 0..w.len() {
                    let g = g1[i] as f64 + g2[i] as f64;
                    w[i] = mx_step(&p, w[i], g, &mut m[i]);
                }
                close(&f(s.get(9).unwrap().1), &w);
                let st = f(&s.state(9).unwrap());
                if p.momentum == 0.0 {
                    assert!(st.iter().all(|x| *x == 0.0), "{spec}: no state: {st:?}");
                } else {
                    close(&st, &m);
                }
            }
        }
    }

    #[test]
    fn sgd_f16_momentum_and_f16_sum() {
        // Exactly representable steps: m = 0.5m - 0.25g, w += m.
        let mut s = store(Consistency::Async, rule("sgd:lr=0.25,momentum=0.5"), 1, &[]);
        let h = DataType::F16;
        s.init(1, h, &f16s(&[1.0, -1.0])).unwrap();
        s.push(1, 1, 1, h, &f16s(&[2.0, -4.0])).unwrap();
        assert_eq!(s.get(1).unwrap().1, f16s(&[0.5, 0.0]));
        assert_eq!(s.state(1).unwrap(), f16s(&[-0.5, 1.0]));
        s.push(2, 1, 1, h, &f16s(&[2.0, 0.0])).unwrap();
        assert_eq!(s.get(1).unwrap().1, f16s(&[-0.25, 0.5]));
        assert_eq!(s.state(1).unwrap(), f16s(&[-0.75, 0.5]));
        // bf16 the same way.
        let bh = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|x| bf16::from_f32(*x).to_ne_bytes())
                .collect()
        };
        s.init(2, DataType::BF16, &bh(&[1.0])).unwrap();
        s.push(3, 1, 2, DataType::BF16, &bh(&[2.0])).unwrap();
        assert_eq!(s.get(2).unwrap().1, bh(&[0.5]));
        // Sum on f16: sync rounds add the pushes (through f32).
        let mut s = store(Consistency::Sync, UpdateRule::Sum, 1, &[1, 2]);
        s.init(3, h, &f16s(&[0.0, 0.0, 0.0])).unwrap();
        s.push(1, 1, 3, h, &f16s(&[0.5, 0.25, -1.0])).unwrap();
        s.push(2, 2, 3, h, &f16s(&[1.5, 0.75, 65504.0])).unwrap();
        assert_eq!(s.get(3).unwrap(), (1, &f16s(&[2.0, 1.0, 65503.0])[..]));
        // Async: value += push.
        let mut s = store(Consistency::Async, UpdateRule::Sum, 2, &[]);
        s.init(3, h, &f16s(&[1.0])).unwrap();
        s.push(1, 1, 3, h, &f16s(&[0.5])).unwrap();
        s.push(2, 2, 3, h, &f16s(&[0.25])).unwrap();
        assert_eq!(s.get(3).unwrap(), (2, &f16s(&[1.75])[..]));
    }

    #[test]
    fn rule_change_keeps_state_and_state_moves_with_the_key() {
        let mut s = store(Consistency::Async, rule("sgd:lr=0.5,momentum=0.5"), 2, &[]);
        s.init(4, F, &b(&[1.0])).unwrap();
        s.push(1, 1, 4, F, &b(&[1.0])).unwrap();
        // m = -0.5, w = 0.5
        assert_eq!(f(&s.state(4).unwrap()), [-0.5]);
        // Plain SGD meanwhile: the momentum stays as it is.
        s.set_rule(rule("sgd:lr=0.5"));
        s.push(2, 1, 4, F, &b(&[1.0])).unwrap();
        assert_eq!(f(s.get(4).unwrap().1), [0.0]);
        assert_eq!(f(&s.state(4).unwrap()), [-0.5]);
        // Back to momentum: it goes on from the kept buffer: m = -0.25 - 0.5 = -0.75.
        s.set_rule(rule("sgd:lr=0.5,momentum=0.5"));
        s.push(3, 1, 4, F, &b(&[1.0])).unwrap();
        assert_eq!(f(s.get(4).unwrap().1), [-0.75]);
        assert_eq!(f(&s.state(4).unwrap()), [-0.75]);
        // The state moves with the key.
        let mut t = Store::new(Consistency::Async, rule("sgd:lr=0.5,momentum=0.5"), 2);
        t.import(s.export(|_| true));
        assert_eq!(t.state(4), s.state(4));
        let json = serde_json::to_value(s.export(|_| true)).unwrap();
        let back: Vec<KeyDump> = serde_json::from_value(json).unwrap();
        assert_eq!(back, s.export(|_| true));
        // Replaced state; checked against the key.
        s.set_state(4, F, &b(&[2.0])).unwrap();
        s.push(4, 1, 4, F, &b(&[0.0])).unwrap();
        // m = 0.5 * 2 = 1, w = -0.75 + 1
        assert_eq!(f(s.get(4).unwrap().1), [0.25]);
        let e = s.set_state(4, F, &b(&[1.0, 2.0])).unwrap_err().to_string();
        assert!(e.contains("key 4") && e.contains("length"), "{e}");
        let e = s
            .set_state(4, DataType::F64, &[0; 4])
            .unwrap_err()
            .to_string();
        assert!(e.contains("dtype"), "{e}");
        assert!(s.set_state(5, F, &b(&[1.0])).is_err());
        assert_eq!(s.state(5), None);
        // A key without state reads as zeros.
        s.init(6, F, &b(&[1.0, 1.0])).unwrap();
        assert_eq!(f(&s.state(6).unwrap()), [0.0, 0.0]);
        // A dump without the state field (an older server's) has none.
        let mut j = serde_json::to_value(t.export(|_| true)).unwrap();
        j[0]["entry"].as_object_mut().unwrap().remove("mom");
        let old: Vec<KeyDump> = serde_json::from_value(j).unwrap();
        let mut u = Store::new(Consistency::Async, UpdateRule::Sum, 2);
        u.import(old);
        assert_eq!(f(&u.state(4).unwrap()), [0.0]);
    }

    #[test]
    fn replica_applies_the_owners_rule() {
        // The owner switched to momentum SGD; the replica was not told (yet): it applies what
        // the replication carries, and both stay identical.
        let r1 = rule("sgd:lr=0.1,momentum=0.9,wd=0.1");
        let mut owner = store(Consistency::Sync, r1.clone(), 2, &[1, 2]);
        let mut replica = store(Consistency::Sync, UpdateRule::Sum, 2, &[1, 2]);
        for st in [&mut owner, &mut replica] {
            st.init(1, F, &b(&[1.0, 2.0])).unwrap();
        }
        for (w, g) in [
            (1, [1.0, 1.0]),
            (2, [0.5, -3.0]),
            (1, [2.0, 0.0]),
            (2, [0.0, 1.0]),
        ] {
            owner.push(0, w, 1, F, &b(&g)).unwrap();
            replica
                .push_with(0, w, 1, F, &b(&g), Some(owner.rule()))
                .unwrap();
        }
        assert_eq!(owner.version(1), Some(2));
        assert_eq!(owner.export(|_| true), replica.export(|_| true));
        assert!(matches!(replica.rule(), UpdateRule::Sum));
    }
}
