//! Hand-over: when the view changes, the parts this server held and no longer owns (or now
//! must seed as a new replica of) go to their new holders; what other servers hand over is
//! imported here ([`on_transfer`]).

use std::sync::Arc;

use super::dispatch::Effects;
use super::*;

/// Applies a new view: worker set, ring, hand-over of key parts.
pub(super) fn apply_view(inner: &Arc<SInner>, view: View) {
    let r = inner.opts.replicas;
    // Hellos of members of the new view are admitted from now on.
    inner.book.record(&view);
    // Connections to every server of the new view first (connecting blocks; the hand-over
    // below must be queued under the state lock, before any replication to the same server).
    let pre: HashMap<u64, Arc<Chan>> = servers_of(&view)
        .into_iter()
        .filter(|(id, _)| *id != inner.me)
        .filter_map(|(id, _)| server_chan_in(inner, id, Some(&view)).map(|c| (id, c)))
        .collect();
    let mut transfers: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut outbox = Vec::new();
    let dead: Vec<Arc<Chan>>;
    {
        let mut guard = lock(&inner.st);
        let st = &mut *guard;
        let old = std::mem::replace(&mut st.ring, ring_of(&view));
        let evs = st.store.set_workers(&workers_of(&view));
        apply_events(st, evs, &mut outbox);
        let keys: Vec<u64> = st.store.keys().collect();
        let mut drop_keys = Vec::new();
        for k in keys {
            let before = old.owners(k, r);
            let after = st.ring.owners(k, r);
            let was_owner = before.first() == Some(&inner.me);
            let now_owner = after.first() == Some(&inner.me);
            // The (new) owner seeds holders that did not have the part. An old owner that
            // lost the part hands it to the new owner (who may be new).
            let sender = now_owner
                || (was_owner && !after.contains(&inner.me))
                || (was_owner
                    && !before.is_empty()
                    && !after.first().is_some_and(|o| before.contains(o)));
            if sender {
                for h in &after {
                    if *h != inner.me && !before.contains(h) {
                        transfers.entry(*h).or_default().push(k);
                    }
                }
            }
            if !after.contains(&inner.me) {
                drop_keys.push(k);
            }
        }
        // Parts every holder of which left (died) are lost: this server, their new owner, fails
        // their requests from now on (the key directory says they existed).
        let alive: std::collections::HashSet<u64> = view.members.iter().map(|m| m.id).collect();
        let mut newly_lost = Vec::new();
        for (&s, &(k, p)) in &st.dir {
            if st.ring.owner(s) != Some(inner.me)
                || st.store.version(s).is_some()
                || st.lost_parts.contains_key(&s)
            {
                continue;
            }
            let before = old.owners(s, r);
            if !before.is_empty() && before.iter().all(|h| !alive.contains(h)) {
                newly_lost.push((
                    s,
                    format!(
                        "key {k} part {p} was lost: every server holding a copy ({before:?}) left \
                         the group by view epoch {} (BRAID_PS_REPLICAS={r}); its value is gone",
                        view.epoch
                    ),
                ));
            }
        }
        for (s, why) in newly_lost {
            tracing::error!(target: "braid::ps", "server {}: {why}", inner.me);
            st.lost_parts.insert(s, why);
        }
        // Servers new in this view learn the key directory.
        let old_servers: std::collections::HashSet<u64> =
            servers_of(&st.view).into_iter().map(|(id, _)| id).collect();
        let newcomers: Vec<u64> = servers_of(&view)
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| *id != inner.me && !old_servers.contains(id))
            .collect();
        let directory: Vec<(u64, u64, u32)> = if newcomers.is_empty() {
            Vec::new()
        } else {
            st.dir.iter().map(|(s, (k, p))| (*s, *k, *p)).collect()
        };
        // Parts this server no longer holds are removed after the hand-over below.
        st.view = view.clone();
        st.changed_at = Instant::now();
        st.lost.clear();
        // A checkpoint waiting for rounds fails: its parts may have moved.
        ckpt::poll_checkpoint(inner, st, &mut outbox);
        let keep: std::collections::HashSet<u64> = view.members.iter().map(|m| m.id).collect();
        let gone: Vec<u64> = st
            .chans
            .keys()
            .filter(|id| !keep.contains(id))
            .copied()
            .collect();
        dead = gone
            .into_iter()
            .filter_map(|id| st.chans.remove(&id))
            .collect();
        // Requests of workers that are gone are dropped; replications waiting for a replica
        // that is gone count as done (this server still holds the update; the new view's
        // hand-over seeds the next replica from it).
        let mut gone_worker = Vec::new();
        let mut gone_replica = Vec::new();
        st.rep_wait.retain(|_, (w, req, r)| {
            if !keep.contains(w) {
                gone_worker.push((*w, *req));
                false
            } else if !keep.contains(r) {
                gone_replica.push((*w, *req));
                false
            } else {
                true
            }
        });
        for (w, req) in gone_worker {
            st.aggs.remove(&(w, req));
        }
        for (w, req) in gone_replica {
            if let Some(a) = st.aggs.get_mut(&(w, req)) {
                a.reps = a.reps.saturating_sub(1);
            }
            complete(st, w, req, &mut outbox);
        }
        let dumps: Vec<(u64, Vec<KeyDump>, Vec<Applied>)> = transfers
            .iter()
            .map(|(h, ks)| {
                let set: std::collections::HashSet<u64> = ks.iter().copied().collect();
                (
                    *h,
                    st.store.export(|k| set.contains(&k)),
                    st.dedup.export(|k| set.contains(&k)),
                )
            })
            .collect();
        // Parts this server no longer holds go in the same critical section as the export:
        // an update applied here after the export would be acknowledged and lost.
        let drop_set: std::collections::HashSet<u64> = drop_keys.into_iter().collect();
        let evs = st.store.remove(|k| drop_set.contains(&k));
        apply_events(st, evs, &mut outbox);
        // The hand-over is queued before anything else can be sent to those servers (the
        // channels are FIFO within a priority, and replication uses the same priority).
        let mut sends = Vec::new();
        let cap = server_hdr(&inner.opts) / 2;
        for (h, d, seen) in dumps {
            for (chunk, bytes) in chunk_dumps(d, cap) {
                let n = chunk.len();
                if bytes > cap {
                    tracing::error!(target: "braid::ps", "server {}: cannot hand key part {:#x} to server {h}: its state is {bytes} bytes encoded, over the {cap}-byte limit of a hand-over message", inner.me, chunk.first().map_or(0, KeyDump::key));
                    continue;
                }
                let in_chunk: std::collections::HashSet<u64> =
                    chunk.iter().map(KeyDump::key).collect();
                let keys = in_chunk
                    .iter()
                    .filter_map(|s| st.dir.get(s).map(|(k, p)| (*s, *k, *p)))
                    .collect();
                let seen = seen
                    .iter()
                    .filter(|x| in_chunk.contains(&x.2))
                    .copied()
                    .collect();
                match serde_json::to_value(&chunk) {
                    Ok(v) => sends.push((
                        h,
                        n,
                        Msg::Transfer {
                            dumps: v,
                            seen,
                            keys,
                        },
                    )),
                    Err(e) => {
                        tracing::error!(target: "braid::ps", "server {}: cannot encode {n} key part(s): {e}", inner.me)
                    }
                }
            }
        }
        for h in &newcomers {
            for add in directory.chunks(1 << 16) {
                sends.push((*h, 0, Msg::Keys { add: add.to_vec() }));
            }
        }
        for (h, n, m) in sends {
            match pre.get(&h).or_else(|| st.chans.get(&h)) {
                Some(c) => {
                    send(c, i32::MAX, &m, Arc::new(Vec::new()));
                    if n > 0 {
                        tracing::info!(target: "braid::ps", "server {}: handed {n} key part(s) to server {h}", inner.me);
                    }
                }
                None => {
                    tracing::warn!(target: "braid::ps", "server {}: cannot hand {n} key part(s) to server {h}: no connection", inner.me)
                }
            }
        }
        drop(guard);
    }
    close_all(dead);
    flush(inner, outbox, Vec::new());
}

/// Splits key dumps into hand-over messages of at most `cap` encoded bytes each (a single
/// larger dump gets a chunk of its own); with each chunk its encoded size.
fn chunk_dumps(dumps: Vec<KeyDump>, cap: usize) -> Vec<(Vec<KeyDump>, usize)> {
    let mut out: Vec<(Vec<KeyDump>, usize)> = Vec::new();
    for d in dumps {
        let n = serde_json::to_vec(&d).map_or(usize::MAX, |v| v.len().saturating_add(1));
        match out.last_mut() {
            Some((c, b)) if b.saturating_add(n) <= cap => {
                c.push(d);
                *b += n;
            }
            _ => out.push((vec![d], n)),
        }
    }
    out
}

/// Parts another server handed over (its dumps, the operations already applied to them, and
/// their place in the key directory).
pub(super) fn on_transfer(
    inner: &Arc<SInner>,
    st: &mut SState,
    from: u64,
    dumps: serde_json::Value,
    seen: Vec<(u64, u64, u64, u64)>,
    keys: Vec<(u64, u64, u32)>,
    fx: &mut Effects,
) -> std::result::Result<(), String> {
    match serde_json::from_value::<Vec<KeyDump>>(dumps) {
        Ok(d) => {
            let n = d.len();
            for (s, k, p) in keys {
                st.dir.insert(s, (k, p));
            }
            for (w, op, skey, v) in seen {
                st.dedup.first(w, op, skey, v);
            }
            let evs = st.store.import(d);
            apply_events(st, evs, &mut fx.outbox);
            tracing::info!(target: "braid::ps", "server {}: received {n} key part(s) from server {from}", inner.me);
            Ok(())
        }
        Err(e) => Err(format!("undecodable transfer: {e}")),
    }
}
