//! The state file's format: what a snapshot of the state holds (the id high-water mark, each
//! formed group's view, policy, history and members' heartbeat timeouts and secrets), and the
//! state such a file describes, checked so that no file, however damaged or hostile, makes
//! the coordinator panic or overflow later.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::super::{random_u64, GroupPolicy, Registration, View, LOG};
use super::{
    Entry, Group, Hist, State, MAX_EPOCH, MAX_GROUP, MAX_HANDLE, MAX_ID, MAX_MS, MAX_NAME,
    MAX_WORLD, SECRET_LEN,
};

/// What the state file holds.
#[derive(Serialize, Deserialize)]
pub(in crate::membership) struct Persisted {
    /// Ids below this may have been handed out.
    pub(in crate::membership) id_high_water: u64,
    groups: Vec<PersistedGroup>,
}

/// One formed group in the state file.
#[derive(Serialize, Deserialize)]
struct PersistedGroup {
    world_size: usize,
    elastic: bool,
    policy: GroupPolicy,
    view: View,
    /// Heartbeat timeout of each member (ms), by id.
    heartbeat_ms: Vec<(u64, u64)>,
    history: Vec<Hist>,
    /// Each member's secret (hex), by id, so members can prove themselves when they rejoin
    /// a restarted coordinator. (The file is written readable by its owner only.)
    #[serde(default)]
    secrets: Vec<(u64, String)>,
}

/// What the state file is to hold now (taken under the state lock: no I/O), with its
/// generation (a later snapshot has a higher one).
pub(in crate::membership) fn snapshot(st: &mut State) -> (u64, Persisted) {
    st.snap_gen += 1;
    let doc = Persisted {
        id_high_water: st.id_high_water.max(st.next_id),
        groups: st
            .groups
            .values()
            .filter_map(|g| {
                let view = g.view.clone()?;
                Some(PersistedGroup {
                    world_size: g.world_size,
                    elastic: g.elastic,
                    policy: g.policy.clone(),
                    heartbeat_ms: g
                        .entries
                        .iter()
                        .map(|e| (e.id, e.reg.heartbeat_timeout_ms))
                        .collect(),
                    view,
                    history: g.history.clone(),
                    secrets: g
                        .entries
                        .iter()
                        .map(|e| (e.id, super::super::to_hex(&e.secret)))
                        .collect(),
                })
            })
            .collect(),
    };
    (st.snap_gen, doc)
}

/// Checks one persisted group (the file may be damaged or hostile: nothing in it may make
/// the coordinator panic or overflow later).
fn check_persisted(pg: &PersistedGroup, high: u64) -> std::result::Result<(), String> {
    let v = &pg.view;
    let name = &v.group;
    if name.is_empty() || name.len() > MAX_GROUP {
        return Err(format!("a group name has {} bytes", name.len()));
    }
    if pg.world_size == 0 || pg.world_size > MAX_WORLD {
        return Err(format!(
            "group {name}: world size {} is not in 1..={MAX_WORLD}",
            pg.world_size
        ));
    }
    if v.epoch == 0 || v.epoch > MAX_EPOCH {
        return Err(format!("group {name}: epoch {} is out of range", v.epoch));
    }
    if v.members.is_empty() || v.members.len() > MAX_WORLD {
        return Err(format!("group {name}: {} members", v.members.len()));
    }
    let mut seen = std::collections::HashSet::new();
    for m in &v.members {
        if m.id == 0 || m.id >= high {
            return Err(format!(
                "group {name}: member id {} is not below the high-water mark {high}",
                m.id
            ));
        }
        if !seen.insert(m.id) {
            return Err(format!("group {name}: member id {} appears twice", m.id));
        }
        if m.host_id.len() > MAX_NAME || m.hostname.len() > MAX_NAME || m.handle.len() > MAX_HANDLE
        {
            return Err(format!("group {name}: member {} is too large", m.id));
        }
        if !(m.weight.is_finite() && m.weight > 0.0) {
            return Err(format!(
                "group {name}: member {} has weight {}",
                m.id, m.weight
            ));
        }
    }
    if pg.policy.min_size > MAX_WORLD
        || pg.policy.max_size.is_some_and(|m| m > MAX_WORLD)
        || pg.policy.join_window_ms > MAX_MS
    {
        return Err(format!("group {name}: policy out of range"));
    }
    if pg.history.len() > 100_000 {
        return Err(format!(
            "group {name}: history of {} entries",
            pg.history.len()
        ));
    }
    Ok(())
}

/// The state a state file describes (`None`: no file, a fresh state). Never panics, whatever
/// the bytes.
///
/// Members are restored disconnected, as if last seen at `now`. The state does not persist
/// ids until the I/O layer says so ([`State::set_persist_ids`]).
pub(in crate::membership) fn state_from_bytes(
    bytes: Option<&[u8]>,
    now: Instant,
) -> std::result::Result<State, String> {
    let mut st = State::new(false);
    let Some(bytes) = bytes else {
        return Ok(st);
    };
    let doc: Persisted = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if doc.id_high_water > MAX_ID {
        return Err(format!(
            "id high-water mark {} is out of range (at most {MAX_ID})",
            doc.id_high_water
        ));
    }
    st.next_id = doc.id_high_water.max(1);
    st.id_high_water = st.next_id;
    st.durable_ids = st.next_id;
    let unknown: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 0));
    for pg in doc.groups {
        check_persisted(&pg, st.next_id)?;
        if st.groups.contains_key(&pg.view.group) {
            return Err(format!("group {} appears twice", pg.view.group));
        }
        let hb: HashMap<u64, u64> = pg.heartbeat_ms.iter().copied().collect();
        let secrets: HashMap<u64, [u8; SECRET_LEN]> = pg
            .secrets
            .iter()
            .filter_map(|(id, hex)| {
                let b = super::super::from_hex(hex)?;
                Some((*id, <[u8; SECRET_LEN]>::try_from(b.as_slice()).ok()?))
            })
            .collect();
        let entries = pg
            .view
            .members
            .iter()
            .map(|m| Entry {
                id: m.id,
                reg: Registration {
                    group: pg.view.group.clone(),
                    world_size: pg.world_size,
                    rank: None,
                    host_id: m.host_id.clone(),
                    hostname: m.hostname.clone(),
                    pid: m.pid,
                    role: m.role,
                    handle: m.handle.clone(),
                    numa: m.numa,
                    weight: m.weight,
                    elastic: pg.elastic,
                    policy: pg.policy.clone(),
                    // A member that never reconnects is declared dead after its timeout (at
                    // least 10 s after the restart, even for members without heartbeats).
                    heartbeat_timeout_ms: hb
                        .get(&m.id)
                        .copied()
                        .filter(|t| *t > 0)
                        .unwrap_or(10_000)
                        .min(MAX_MS),
                    light: false,
                    client_nonce: String::new(),
                    // Said again by the member's rejoin.
                    view_deltas: false,
                },
                peer: unknown,
                conn: None,
                last_seen: now,
                acked: pg.view.epoch,
                leaving: false,
                resync: None,
                // A member without a persisted secret (a file of an older version) cannot
                // prove itself: a random secret nobody knows; it is declared dead after its
                // timeout and the group goes on without it.
                secret: secrets.get(&m.id).copied().unwrap_or_else(|| {
                    let mut s = [0u8; SECRET_LEN];
                    for (i, c) in s.chunks_mut(8).enumerate() {
                        c.copy_from_slice(&random_u64(m.id ^ i as u64).to_le_bytes());
                    }
                    s
                }),
                echoed: None,
                sent: 0,
            })
            .collect();
        tracing::info!(target: LOG,
            "coordinator: restored group {} at epoch {} with {} members (waiting for them to reconnect)",
            pg.view.group, pg.view.epoch, pg.view.members.len());
        let name = pg.view.group.clone();
        let group = Group::new(
            pg.world_size,
            pg.elastic,
            pg.policy,
            entries,
            Some(pg.view),
            pg.history,
        );
        st.groups.insert(name, group);
    }
    Ok(st)
}

/// Fuzzing entry point: builds the coordinator state a state file with these bytes
/// describes (errors are fine, panics are bugs).
#[doc(hidden)]
pub fn fuzz_load_state(data: &[u8]) {
    let _ = state_from_bytes(Some(data), Instant::now());
}

/// Whether a state file with these bytes would be accepted (tests).
#[cfg(test)]
pub(crate) fn state_ok(data: &[u8]) -> bool {
    state_from_bytes(Some(data), Instant::now()).is_ok()
}
