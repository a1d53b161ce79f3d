//! Decisions and views: the next view of a group (joins, leaves, failures, resyncs, within
//! the group's policy), the first view of a complete group, the frames announcing a view to
//! each connected member, pipeline re-weighing from the members' metrics, and the bench of
//! the state machine alone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::{Duration, Instant};

use super::super::proto::{self, MsgType};
use super::super::{random_u64, GroupPolicy, Member, Registration, View, LOG};
use super::{
    unix_now, Entry, Group, Hist, IdMap, IdSet, Out, Publish, Slot, State, MAX_WORLD,
    REWEIGH_BUDGET, SECRET_LEN,
};
use crate::error::{Error, Result};

/// What the members of a group reported of their pipeline stages.
#[derive(Debug, Default)]
pub(super) struct PipelineMetrics {
    /// Block costs of the latest report, and their fingerprint.
    costs: Vec<f64>,
    costs_key: u64,
    /// Each member's measured stage, by id.
    stages: HashMap<u64, MeasuredStage>,
    /// A pipeline too large to re-plan under the lock was reported (logged once).
    too_large: bool,
    /// The last decision: (epoch, fewest reports of a stage then), so that a decision runs
    /// once per round of reports rather than on every report.
    decided: (u64, u32),
}

/// One member's measured pipeline stage (see [`fold_metric`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MeasuredStage {
    /// Epoch of the reports.
    pub epoch: u64,
    /// The stage's blocks.
    pub blocks: Range<usize>,
    /// Fingerprint of the block costs the member reported ([`costs_key`]).
    pub costs_key: u64,
    /// Measured throughput (stage cost per second), smoothed.
    pub weight: f64,
    /// Reports folded in this epoch.
    pub reports: u32,
    /// The member's re-plan threshold.
    pub gain: f64,
}

/// Smoothing factor of the measured throughput (weight of the newest sample).
const EWMA_ALPHA: f64 = 0.5;

/// Fingerprint of a block-cost list (members of one pipeline report the same list).
pub(crate) fn costs_key(costs: &[f64]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    costs.len().hash(&mut h);
    for c in costs {
        c.to_bits().hash(&mut h);
    }
    h.finish()
}

/// Folds one report (`sample` = stage cost / seconds) into a member's measured stage: an
/// exponential moving average (alpha 0.5) while the epoch, the stage and the costs stay the
/// same, a fresh start otherwise.
pub(crate) fn fold_metric(
    prev: Option<&MeasuredStage>,
    epoch: u64,
    blocks: Range<usize>,
    costs_key: u64,
    sample: f64,
    gain: f64,
) -> MeasuredStage {
    match prev {
        Some(p) if p.epoch == epoch && p.blocks == blocks && p.costs_key == costs_key => {
            MeasuredStage {
                epoch,
                blocks,
                costs_key,
                weight: EWMA_ALPHA * sample + (1.0 - EWMA_ALPHA) * p.weight,
                reports: p.reports.saturating_add(1),
                gain,
            }
        }
        _ => MeasuredStage {
            epoch,
            blocks,
            costs_key,
            weight: sample,
            reports: 1,
            gain,
        },
    }
}

/// Whether the stages' blocks tile `0..n_blocks` exactly (no gap, no overlap, none empty).
fn tiles(n_blocks: usize, stages: &[(u64, MeasuredStage)]) -> bool {
    let mut order: Vec<&Range<usize>> = stages.iter().map(|(_, s)| &s.blocks).collect();
    order.sort_by_key(|b| (b.start, b.end));
    let mut at = 0;
    for b in order {
        if b.start != at || b.end <= b.start {
            return false;
        }
        at = b.end;
    }
    at == n_blocks
}

/// A re-weigh decided by [`reweigh_decision`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reweigh {
    /// New weight of every member, in view order.
    pub weights: Vec<f64>,
    /// Predicted gain: 1 - best / current largest stage time.
    pub gain: f64,
}

/// Whether to re-weigh a pipeline's members, and how. `members`: the view's (id, published
/// weight) in view order; `costs`: the pipeline's block costs; `stages`: the members' measured
/// stages (id, stage), those of other members or epochs already left out.
///
/// Decides only when the measured stages are complete: at least two of them, each reported at
/// least twice, tiling the blocks exactly (a member with a stage that has not reported leaves
/// a gap; two members reporting one range — a replicated stage — overlap: no decision). Then
/// the measured throughputs are scaled so that the reporting members' mean weight equals
/// their published mean (members without a stage keep their published weight); `current` is
/// the largest stage time (stage cost / scaled weight) of the current stages, `best` that of
/// an optimal plan over the view with the scaled weights, and the predicted gain
/// 1 - best/current must exceed `threshold`. So must the gain over a plan made with the view's
/// published weights (measured as well): when those already give about the best plan (the
/// members' weights were re-weighed before and the stages were not re-planned since), a new
/// view would change nothing, and none is proposed.
pub(crate) fn reweigh_decision(
    members: &[(u64, f64)],
    costs: &[f64],
    stages: &[(u64, MeasuredStage)],
    threshold: f64,
) -> Option<Reweigh> {
    if stages.len() < 2 || stages.iter().any(|(_, s)| s.reports < 2) {
        return None;
    }
    if !tiles(costs.len(), stages) {
        return None;
    }
    let published: HashMap<u64, f64> = members.iter().copied().collect();
    let mut pub_sum = 0.0;
    let mut meas_sum = 0.0;
    for (id, s) in stages {
        pub_sum += published.get(id)?;
        if !(s.weight.is_finite() && s.weight > 0.0) {
            return None;
        }
        meas_sum += s.weight;
    }
    let factor = pub_sum / meas_sum;
    let measured: HashMap<u64, &MeasuredStage> = stages.iter().map(|(id, s)| (*id, s)).collect();
    let weights: Vec<f64> = members
        .iter()
        .map(|(id, w)| measured.get(id).map_or(*w, |s| s.weight * factor))
        .collect();
    if weights.iter().any(|w| !(w.is_finite() && *w > 0.0)) {
        return None;
    }
    let current = stages
        .iter()
        .map(|(_, s)| {
            let cost: f64 = costs[s.blocks.clone()].iter().sum();
            cost / (s.weight * factor)
        })
        .fold(0.0, f64::max);
    let list: Vec<(u64, f64)> = members
        .iter()
        .zip(&weights)
        .map(|((id, _), w)| (*id, *w))
        .collect();
    let best = super::super::pipeline::plan_pipeline(costs, &list)
        .ok()?
        .max_cost;
    if !(current.is_finite() && current > 0.0) {
        return None;
    }
    let gain = 1.0 - best / current;
    if gain <= threshold {
        return None;
    }
    // What the view's own weights would plan, timed with the measured weights.
    let by_view = super::super::pipeline::plan_pipeline(costs, members).ok()?;
    let new_weight: HashMap<u64, f64> = list.iter().copied().collect();
    let view_time = by_view
        .stages
        .iter()
        .map(|st| {
            let cost: f64 = costs[st.blocks.clone()].iter().sum();
            cost / new_weight.get(&st.member).copied().unwrap_or(f64::NAN)
        })
        .fold(0.0, f64::max);
    if !(view_time.is_finite() && 1.0 - best / view_time > threshold) {
        return None;
    }
    Some(Reweigh { weights, gain })
}

/// The frame announcing `view` to `e` (a whole view, or a notice for light members).
pub(super) fn view_frame(e: &Entry, view: &View, reason: &str) -> Option<Vec<u8>> {
    if e.reg.light {
        notice_frame(e.id, view, view.rank_of(e.id))
    } else {
        Some(splice(MsgType::View, e.id, &whole_rest(view, reason)))
    }
}

/// A light member's notice of `view` (its `rank` in it, if any).
fn notice_frame(id: u64, view: &View, rank: Option<usize>) -> Option<Vec<u8>> {
    let r = proto::encode(
        MsgType::Notice,
        &proto::Notice {
            member_id: id,
            group: view.group.clone(),
            epoch: view.epoch,
            size: view.members.len(),
            rank,
        },
    );
    match r {
        Ok(b) => Some(b),
        Err(err) => {
            tracing::error!(target: LOG, "coordinator: cannot encode a view notice: {err}");
            None
        }
    }
}

/// A [`proto::ViewMsg`] body after its `"member_id":N,` (see [`splice`]): the whole view and
/// the reason, encoded without copying the view.
fn whole_rest(view: &View, reason: &str) -> String {
    let body = serde_json::to_string(view).unwrap_or_default();
    let reason_json = serde_json::to_string(reason).unwrap_or_else(|_| "\"\"".into());
    format!("\"view\":{body},\"reason\":{reason_json}}}")
}

/// How the next view differs from the view of epoch `base`: the members of `base` in `left`
/// are out, those that stay keep their order, `joined` follow.
pub(super) struct Delta<'a> {
    base: u64,
    left: &'a [u64],
    joined: &'a [Member],
}

/// `{"member_id":ID,` + `rest`: a frame body encoded once for every receiver, with the
/// receiver's id spliced in (`rest` is the encoding's tail after its member id).
pub(super) fn splice(ty: MsgType, id: u64, rest: &str) -> Vec<u8> {
    let payload = format!("{{\"member_id\":{id},{rest}");
    proto::encode_raw(proto::VERSION, ty as u16, payload.as_bytes())
}

/// Frames announcing `view` to every connected member of the group (members, joiners,
/// leavers). Light members get a small notice; members that take deltas and hold the view of
/// `delta.base` (the last one queued on their connection) get the delta; the others the whole
/// view. Each body is encoded at most once (the member id is spliced in), the whole view only
/// if someone needs it. Records in each entry the epoch queued to it.
pub(super) fn view_frames(
    g: &mut Group,
    view: &View,
    reason: &str,
    delta: Option<Delta<'_>>,
) -> Publish {
    let mut out = Vec::new();
    // The whole view after `"member_id":N,` (views of thousands of members: encoded once,
    // at first need).
    let mut whole: Option<String> = None;
    let make_whole = || whole_rest(view, reason);
    // The delta after `"member_id":0,` (its first field), encoded once.
    let delta_rest: Option<(u64, String)> = delta.and_then(|d| {
        let msg = proto::ViewDeltaMsg {
            member_id: 0,
            group: view.group.clone(),
            base_epoch: d.base,
            epoch: view.epoch,
            nonce: view.nonce,
            left: d.left.to_vec(),
            joined: d.joined.to_vec(),
            reason: reason.to_string(),
        };
        let s = serde_json::to_string(&msg).ok()?;
        let rest = s.strip_prefix("{\"member_id\":0,")?.to_string();
        Some((d.base, rest))
    });
    // Ranks for the notices of light members (built only if there is one).
    let mut rank_of: Option<IdMap<usize>> = None;
    let mut notice = |id: u64| {
        let ranks = rank_of.get_or_insert_with(|| {
            view.members
                .iter()
                .enumerate()
                .map(|(r, m)| (m.id, r))
                .collect()
        });
        notice_frame(id, view, ranks.get(&id).copied())
    };
    for e in g.entries.iter_mut() {
        let Some(conn) = e.conn else { continue };
        let bytes = if e.reg.light {
            notice(e.id)
        } else {
            match &delta_rest {
                Some((base, rest)) if e.reg.view_deltas && e.sent == *base => {
                    Some(splice(MsgType::ViewDelta, e.id, rest))
                }
                _ => Some(splice(
                    MsgType::View,
                    e.id,
                    whole.get_or_insert_with(&make_whole),
                )),
            }
        };
        if let Some(b) = bytes {
            out.push(Out::send(conn, e.peer, b));
            e.sent = view.epoch;
        }
    }
    for e in g.joiners.iter() {
        let Some(conn) = e.conn else { continue };
        let bytes = if e.reg.light {
            notice(e.id)
        } else {
            Some(splice(
                MsgType::View,
                e.id,
                whole.get_or_insert_with(&make_whole),
            ))
        };
        if let Some(b) = bytes {
            out.push(Out::send(conn, e.peer, b));
        }
    }
    for (id, conn, peer) in &g.leavers {
        out.push(Out::send(
            *conn,
            *peer,
            splice(MsgType::View, *id, whole.get_or_insert_with(&make_whole)),
        ));
    }
    out
}

/// Orders the group's entries by rank (requested ranks first, then free positions in arrival
/// order) and makes the epoch-1 view.
pub(super) fn complete(name: &str, group: &mut Group) -> View {
    let n = group.world_size;
    let mut slots: Vec<Option<Entry>> = (0..n).map(|_| None).collect();
    let mut unrequested = Vec::new();
    for e in group.entries.drain(..) {
        match e.reg.rank {
            Some(r) if r < n && slots[r].is_none() => slots[r] = Some(e),
            _ => unrequested.push(e),
        }
    }
    let mut rest = unrequested.into_iter();
    for slot in slots.iter_mut() {
        if slot.is_none() {
            *slot = rest.next();
        }
    }
    group.entries = slots.into_iter().flatten().collect();
    let view = View {
        group: name.to_string(),
        epoch: 1,
        nonce: random_u64(group.entries.first().map_or(0, |e| e.id)),
        members: group.entries.iter().map(Entry::member).collect(),
    };
    group.view = Some(view.clone());
    view
}

/// Retires a member of the current view (dead or gone): it is removed now and excluded from
/// the next view.
pub(super) fn retire(g: &mut Group, id: u64, why: String) -> Option<Entry> {
    let Slot::Entry(pos) = g.slot(id)? else {
        return None;
    };
    let e = g.entries.remove(pos);
    g.reindex();
    g.retired.insert(id, why.clone());
    g.reasons.push(why);
    Some(e)
}

/// Rank of each member of `view`, by id.
fn ranks(view: &View) -> HashMap<u64, usize> {
    view.members
        .iter()
        .enumerate()
        .map(|(r, m)| (m.id, r))
        .collect()
}

/// Records a published view in the group's history (the last 1000 kept).
fn record_history(g: &mut Group, next: &View, reason: &str) {
    g.history.push(Hist {
        epoch: next.epoch,
        size: next.members.len(),
        reason: reason.to_string(),
        at: unix_now(),
    });
    if g.history.len() > 1000 {
        g.history.remove(0);
    }
}

/// Publishes the next view of an elastic group when one is due. Called with the state lock
/// held after every event; returns the frames to send once the lock is released.
pub(super) fn decide(st: &mut State, name: &str, now: Instant) -> Publish {
    let Some(g) = st.groups.get_mut(name) else {
        return Vec::new();
    };
    if !g.elastic {
        return Vec::new();
    }
    // Cheap exit first (this runs on every acknowledgement and every tick, under the lock):
    // nobody gone, leaving or asking for a resync, and no join that is both due and possible.
    let view_len = match &g.view {
        Some(v) => v.members.len(),
        None => return Vec::new(),
    };
    // (The counters of the book, O(1): see `Book` for why they are safe to trust here.)
    let quiet = g.entries.len() == view_len && g.book.flagged == 0;
    if quiet {
        let window = Duration::from_millis(g.policy.join_window_ms);
        let joins_due = !g.joiners.is_empty()
            && g.join_wait
                .is_some_and(|t| now.saturating_duration_since(t) >= window);
        if !joins_due || g.book.unacked > 0 {
            return Vec::new();
        }
    }
    // The full path scans the group anyway: recount, so an over-count cannot linger.
    g.reindex();
    // The current view's epoch, nonce and ids (not a copy of the whole view: at 100,000
    // members that alone costs more than the rest).
    let Some((epoch, nonce, view_ids)) = g.view.as_ref().map(|v| {
        (
            v.epoch,
            v.nonce,
            v.members.iter().map(|m| m.id).collect::<Vec<u64>>(),
        )
    }) else {
        return Vec::new();
    };
    // Members of the view that are gone (retired) or leaving.
    let live: IdSet = g
        .entries
        .iter()
        .filter(|e| !e.leaving)
        .map(|e| e.id)
        .collect();
    let gone: Vec<u64> = view_ids
        .iter()
        .copied()
        .filter(|id| !live.contains(id))
        .collect();
    let resync: Vec<&Entry> = g
        .entries
        .iter()
        .filter(|e| e.resync.as_ref().is_some_and(|(ep, _)| *ep >= epoch))
        .collect();
    // A resync waits until every suspect is dead or asks too (a killed process's connection
    // closes at once; a hung one is declared dead after its heartbeat timeout).
    let quiet_ids: IdSet = g
        .entries
        .iter()
        .filter(|o| o.resync.is_none() && !o.leaving)
        .map(|o| o.id)
        .collect();
    let unresolved = resync.iter().any(|e| {
        e.resync
            .as_ref()
            .is_some_and(|(_, sus)| sus.iter().any(|s| quiet_ids.contains(s)))
    });
    let stable = g.entries.iter().all(|e| e.acked >= epoch || e.leaving);
    let window = Duration::from_millis(g.policy.join_window_ms);
    let joins_due = !g.joiners.is_empty()
        && g.join_wait
            .is_some_and(|t| now.saturating_duration_since(t) >= window);
    let want_resync = !resync.is_empty() && !unresolved;
    if gone.is_empty() && !want_resync && !(joins_due && stable) {
        return Vec::new();
    }
    let gone_set: IdSet = gone.iter().copied().collect();
    let keep: Vec<u64> = view_ids
        .iter()
        .copied()
        .filter(|id| !gone_set.contains(id))
        .collect();
    let room = g
        .policy
        .max_size
        .map_or(usize::MAX, |m| m.saturating_sub(keep.len()));
    // Joiners are admitted when their window passed, or along with a failure-driven change.
    let admit = if joins_due || !gone.is_empty() || want_resync {
        g.joiners.len().min(room)
    } else {
        0
    };
    let new_size = keep.len() + admit;
    if new_size < g.policy.min_size.max(1) {
        if !g.reasons.iter().any(|r| r.starts_with("waiting")) {
            tracing::warn!(target: LOG,
                "coordinator: group {name}: the next view would have {new_size} members, below the minimum {}; waiting for joiners",
                g.policy.min_size);
            g.reasons
                .push(format!("waiting for {} members", g.policy.min_size));
        }
        return Vec::new();
    }
    if gone.is_empty() && admit == 0 && !want_resync {
        return Vec::new();
    }
    let admitted: Vec<Entry> = g.joiners.drain(..admit).collect();
    let mut reasons: Vec<String> = g
        .reasons
        .drain(..)
        .filter(|r| !r.starts_with("waiting"))
        .collect();
    for l in g.entries.iter().filter(|e| e.leaving) {
        let r = format!("leave of {}", l.id);
        if !reasons.contains(&r) {
            reasons.push(r);
        }
    }
    if !admitted.is_empty() {
        let ids: Vec<String> = admitted.iter().map(|e| e.id.to_string()).collect();
        reasons.push(format!("join of {}", ids.join(",")));
    }
    if reasons.is_empty() {
        let who: Vec<String> = resync.iter().map(|e| e.id.to_string()).collect();
        reasons.push(format!("resync asked by {}", who.join(",")));
    }
    let reason = reasons.join("; ");
    // Leavers move out of the entries but get this view.
    let leaving: Vec<Entry> = if g.entries.iter().any(|e| e.leaving) {
        let (out, stay): (Vec<Entry>, Vec<Entry>) = g.entries.drain(..).partition(|e| e.leaving);
        g.entries = stay;
        out
    } else {
        Vec::new()
    };
    for l in leaving {
        g.retired
            .insert(l.id, format!("left at epoch {}", epoch.saturating_add(1)));
        if let Some(c) = l.conn {
            g.leavers.push((l.id, c, l.peer));
        }
    }
    // Order: members that stay keep their relative order; joiners last, in id order.
    let rank_of: IdMap<usize> = view_ids
        .iter()
        .enumerate()
        .map(|(r, id)| (*id, r))
        .collect();
    let key = |e: &Entry| rank_of.get(&e.id).copied().unwrap_or(usize::MAX);
    // Usually in order already (entries keep the view's order between views).
    if !g.entries.windows(2).all(|w| key(&w[0]) <= key(&w[1])) {
        g.entries.sort_by_cached_key(key);
    }
    let mut admitted = admitted;
    admitted.sort_by_key(|e| e.id);
    let joined: Vec<Member> = admitted.iter().map(Entry::member).collect();
    g.entries.extend(admitted);
    for e in g.entries.iter_mut() {
        e.resync = None;
    }
    // The next view's members: the current view's less those gone (moved, not copied: at
    // 100,000 members copying them costs more than the rest of the decision), then the
    // joined. The entries are in that order; should they not be, they are the truth.
    let mut members: Vec<Member> = g.view.take().map(|v| v.members).unwrap_or_default();
    members.retain(|m| !gone_set.contains(&m.id));
    members.extend(joined.iter().cloned());
    let consistent = members.len() == g.entries.len()
        && members.iter().zip(&g.entries).all(|(m, e)| m.id == e.id);
    if !consistent {
        tracing::debug!(target: LOG, "coordinator: group {name}: the view's members are rebuilt from the entries");
        members = g.entries.iter().map(Entry::member).collect();
    }
    let next = View {
        group: name.to_string(),
        epoch: epoch.saturating_add(1),
        nonce: random_u64(nonce),
        members,
    };
    g.join_wait = if g.joiners.is_empty() {
        None
    } else {
        Some(now)
    };
    record_history(g, &next, &reason);
    tracing::info!(target: LOG,
        "coordinator: group {name}: view epoch {} with {} members ({reason})",
        next.epoch, next.members.len());
    let delta = Delta {
        base: epoch,
        left: &gone,
        joined: &joined,
    };
    // (A rebuilt view is not the delta's: whole views then.)
    let publish = view_frames(g, &next, &reason, consistent.then_some(delta));
    g.view = Some(next);
    g.reindex();
    st.mark_dirty();
    publish
}

/// A member's pipeline metric: folded into its measured stage; when the group is quiet (no
/// view change under way) and the measurements are complete, a re-weigh view may follow.
pub(super) fn on_metric(st: &mut State, name: &str, id: u64, m: &proto::Metric) -> Publish {
    let Some(g) = st.groups.get_mut(name) else {
        return Vec::new();
    };
    let Some(view) = g.view.as_ref() else {
        return Vec::new();
    };
    if !g.elastic || m.epoch != view.epoch || view.rank_of(id).is_none() {
        return Vec::new();
    }
    let blocks = match m.check() {
        Ok(Some(b)) => b,
        Ok(None) => return Vec::new(),
        Err(e) => {
            tracing::debug!(target: LOG, "coordinator: group {name}: member {id}: metric refused: {e}");
            return Vec::new();
        }
    };
    let cost: f64 = m.costs[blocks.clone()].iter().sum();
    let sample = cost / m.seconds;
    if !(sample.is_finite() && sample > 0.0) {
        return Vec::new();
    }
    let key = costs_key(&m.costs);
    let p = &mut g.pipeline;
    if p.costs_key != key || p.costs.len() != m.costs.len() {
        p.costs = m.costs.clone();
        p.costs_key = key;
    }
    let folded = fold_metric(p.stages.get(&id), m.epoch, blocks, key, sample, m.gain);
    p.stages.insert(id, folded);
    let epoch = view.epoch;
    p.stages.retain(|_, s| s.epoch == epoch);
    // Only between view changes: nobody joining, leaving, gone or installing.
    let quiet = g.entries.len() == view.members.len()
        && g.joiners.is_empty()
        && g.entries
            .iter()
            .all(|e| e.acked >= epoch && !e.leaving && e.resync.is_none());
    if !quiet {
        return Vec::new();
    }
    let members: Vec<(u64, f64)> = view.members.iter().map(|m| (m.id, m.weight)).collect();
    let work = members
        .len()
        .saturating_mul(p.costs.len())
        .saturating_mul(p.costs.len());
    if work > REWEIGH_BUDGET {
        if !p.too_large {
            p.too_large = true;
            tracing::warn!(target: LOG,
                "coordinator: group {name}: a pipeline of {} blocks over {} members is too large to re-weigh here; not re-weighed",
                p.costs.len(), members.len());
        }
        return Vec::new();
    }
    let stages: Vec<(u64, MeasuredStage)> = p
        .stages
        .iter()
        .filter(|(_, s)| s.costs_key == key)
        .map(|(k, s)| (*k, s.clone()))
        .collect();
    // One decision per round: when every stage has reported once more since the last one.
    let round = stages.iter().map(|(_, s)| s.reports).min().unwrap_or(0);
    if p.decided.0 == epoch && round <= p.decided.1 {
        return Vec::new();
    }
    let threshold = stages.iter().map(|(_, s)| s.gain).fold(0.0, f64::max);
    let decision = reweigh_decision(&members, &p.costs, &stages, threshold);
    if round >= 2 && tiles(p.costs.len(), &stages) {
        p.decided = (epoch, round);
    }
    let Some(r) = decision else {
        return Vec::new();
    };
    publish_reweigh(st, name, &r)
}

/// Publishes the next view of a quiet group: the same members in the same order, with the
/// weights of `r`.
fn publish_reweigh(st: &mut State, name: &str, r: &Reweigh) -> Publish {
    let Some(g) = st.groups.get_mut(name) else {
        return Vec::new();
    };
    let Some(view) = g.view.clone() else {
        return Vec::new();
    };
    // Entries of a quiet group are the view's members; keep the view's order.
    let rank_of = ranks(&view);
    g.entries
        .sort_by_key(|e| rank_of.get(&e.id).copied().unwrap_or(usize::MAX));
    let weight: HashMap<u64, f64> = view
        .members
        .iter()
        .zip(&r.weights)
        .map(|(m, w)| (m.id, *w))
        .collect();
    for e in g.entries.iter_mut() {
        if let Some(w) = weight.get(&e.id) {
            e.reg.weight = *w;
        }
    }
    let reason = format!("reweigh: predicted gain {:.0}%", r.gain * 100.0);
    let next = View {
        group: name.to_string(),
        epoch: view.epoch.saturating_add(1),
        nonce: random_u64(view.nonce),
        members: g.entries.iter().map(Entry::member).collect(),
    };
    record_history(g, &next, &reason);
    g.pipeline.stages.clear();
    let weights: Vec<String> = next
        .members
        .iter()
        .map(|m| format!("{}:{:.3}", m.id, m.weight))
        .collect();
    tracing::info!(target: LOG,
        "coordinator: group {name}: view epoch {} with {} members ({reason}; weights {})",
        next.epoch, next.members.len(), weights.join(" "));
    // A re-weigh changes every member's record: whole views.
    let publish = view_frames(g, &next, &reason, None);
    g.view = Some(next);
    g.reindex();
    st.mark_dirty();
    publish
}

/// The bench's group, by name.
fn sm_group<'a>(st: &'a mut State, name: &str) -> Result<&'a mut Group> {
    st.groups
        .get_mut(name)
        .ok_or_else(|| Error::Internal("state machine bench: group lost".into()))
}

/// The state machine alone, without sockets or disk (`braid-coordinator bench
/// --state-machine N`): one elastic group of `n` members in a view; times a heartbeat and an
/// acknowledgement (per event), one join decision (the next view, with its delta frame body
/// encoded: members hold the last view) and one failure decision; then, apart, encoding the
/// whole view once (what a member (re)connecting, or one without deltas, costs). Returns the report, ending with one line
/// `state_machine members=N join_decision_ms=X failure_decision_ms=Y`.
///
/// Errors: `Error::InvalidArgument` for `n` outside 1..=`MAX_WORLD`; `Error::Internal` when a
/// decision did not publish the view it should have.
pub(crate) fn state_machine_bench(n: usize) -> Result<String> {
    if n == 0 || n >= MAX_WORLD {
        return Err(Error::InvalidArgument(format!(
            "state machine members {n} not in 1..{MAX_WORLD}"
        )));
    }
    let name = "sm";
    // Nothing is persisted here.
    let mut st = State::new(false);
    let unknown = SocketAddr::from(([127, 0, 0, 1], 0));
    let entry = |id: u64| {
        let mut reg = Registration::worker(name, n, None, id.to_le_bytes().to_vec());
        reg.elastic = true;
        reg.heartbeat_timeout_ms = 10_000;
        reg.hostname = format!("host{}", id % 1000);
        reg.host_id = reg.hostname.clone();
        Entry {
            id,
            reg,
            peer: unknown,
            conn: None,
            last_seen: Instant::now(),
            acked: 1,
            leaving: false,
            resync: None,
            secret: [0u8; SECRET_LEN],
            echoed: None,
            sent: 0,
        }
    };
    let t = Instant::now();
    let entries: Vec<Entry> = (1..=n as u64).map(entry).collect();
    let view = View {
        group: name.into(),
        epoch: 1,
        nonce: 7,
        members: entries.iter().map(Entry::member).collect(),
    };
    let policy = GroupPolicy {
        min_size: 1,
        max_size: None,
        join_window_ms: 0,
    };
    let g = Group::new(n, true, policy, entries, Some(view), Vec::new());
    st.groups.insert(name.into(), g);
    st.next_id = n as u64 + 1;
    let build = t.elapsed();
    // Per event: a heartbeat (what the event loop does under the lock) and the quick check.
    let t = Instant::now();
    for id in 1..=n as u64 {
        let now = Instant::now();
        if let Some(e) = sm_group(&mut st, name)?.any_mut(id) {
            e.last_seen = now;
        }
        let _ = decide(&mut st, name, now);
    }
    let heartbeat_ns = t.elapsed().as_nanos() as f64 / n as f64;
    // One join: the decision publishes epoch 2 with n + 1 members.
    let joiner = n as u64 + 1;
    st.next_id = joiner + 1;
    {
        let g = sm_group(&mut st, name)?;
        g.push_joiner(entry(joiner));
        g.join_wait = Instant::now().checked_sub(Duration::from_secs(1));
    }
    let t = Instant::now();
    let _ = decide(&mut st, name, Instant::now());
    let join = t.elapsed();
    let v = sm_group(&mut st, name)?
        .view
        .as_ref()
        .map(|v| (v.epoch, v.members.len()));
    if v != Some((2, n + 1)) {
        return Err(Error::Internal(format!(
            "state machine bench: the join published {v:?}"
        )));
    }
    // Everyone acknowledges epoch 2.
    let t = Instant::now();
    for id in 1..=joiner {
        sm_group(&mut st, name)?.ack(id, 2);
        let _ = decide(&mut st, name, Instant::now());
    }
    let ack_ns = t.elapsed().as_nanos() as f64 / joiner as f64;
    // One failure (a member in the middle of the view).
    let t = Instant::now();
    let dead = (n as u64) / 2 + 1;
    retire(
        sm_group(&mut st, name)?,
        dead,
        format!("failure of {dead} (connection to the coordinator lost)"),
    );
    let _ = decide(&mut st, name, Instant::now());
    let failure = t.elapsed();
    let v = sm_group(&mut st, name)?
        .view
        .as_ref()
        .map(|v| (v.epoch, v.members.len()));
    if v != Some((3, n)) {
        return Err(Error::Internal(format!(
            "state machine bench: the failure published {v:?}"
        )));
    }
    // Apart: the whole view, encoded once (sent on (re)connects and to members without
    // deltas; its bytes are O(members) per receiver).
    let t = Instant::now();
    let whole_bytes = sm_group(&mut st, name)?
        .view
        .as_ref()
        .and_then(|v| serde_json::to_string(v).ok())
        .map_or(0, |b| b.len());
    let whole = t.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(format!(
        "state machine alone (no sockets, no disk), one elastic group of {n} members:\n\
         build {:.1} ms; heartbeat + quick check {heartbeat_ns:.0} ns; acknowledgement + check {ack_ns:.0} ns\n\
         join decision (epoch 2, {} members, delta encoded once) {:.2} ms\n\
         failure decision (epoch 3, {n} members, delta encoded once) {:.2} ms\n\
         whole view encoded once (for a (re)connect): {:.2} ms, {:.1} MB\n\
         state_machine members={n} join_decision_ms={:.2} failure_decision_ms={:.2}",
        ms(build),
        n + 1,
        ms(join),
        ms(failure),
        ms(whole),
        whole_bytes as f64 / 1e6,
        ms(join),
        ms(failure),
    ))
}
