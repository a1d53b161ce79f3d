//! Push/pull: sharded parameter servers, in the style of ps-lite and BytePS, on braid's
//! membership service and transports.
//!
//! * Roles: servers ([`KvServer`]) and workers ([`KvWorker`]) are members of one elastic group
//!   (registered with their role); readers ([`KvReader`]) fetch the group's view and read
//!   consistent snapshots without joining it.
//! * Keys are `u64`; values are typed arrays. Values larger than
//!   [`PsOptions::partition_bytes`] are split into parts; parts map to servers by consistent
//!   hashing with virtual nodes ([`shard`]), weighted by member weight (`BRAID_WEIGHT`, e.g.
//!   measured throughput), so a server joining or leaving moves about 1/servers of the parts.
//! * Servers run a deterministic state machine per part ([`store`]): sync rounds, async, or
//!   bounded staleness; versions; update rules (sum, SGD, user callback).
//! * Every update is forwarded to the next [`PsOptions::replicas`] servers of the ring and
//!   acknowledged only once they applied it, so a killed server loses no acknowledged update:
//!   when the view changes, the replica owns the parts and seeds a new replica; workers re-route
//!   what was in flight.
//! * Messages: [`wire`] headers over [`chan`] channels on braid transports (tcp or shm). A
//!   connection is admitted only with a hello bound to the current view and the acceptor's
//!   challenge (`node.rs`); message lengths are bounded by the partition size before anything
//!   is allocated; who may send what is decided in one place ([`wire`]'s `permitted`); a
//!   protocol error closes that connection only, with a goodbye naming the reason.
//! * When every copy of a part is lost (more servers died at once than `replicas`), requests
//!   for its key fail naming it, for the rest of the job (see the README, "Replication,
//!   exactly").

pub(crate) mod chan;
pub(crate) mod node;
pub mod server;
pub mod shard;
pub mod store;
pub(crate) mod wire;
pub mod worker;

pub use server::KvServer;
pub use store::{Consistency, UpdateRule};
pub use worker::{KvReader, KvWorker, PsHandle, Pulled};

use crate::error::{Error, Result};

/// Push/pull settings (the same on every member of a group).
#[derive(Debug, Clone)]
pub struct PsOptions {
    /// Consistency (`BRAID_PS_MODE`: `sync`, `async` or `bounded:TAU`; default sync).
    pub consistency: Consistency,
    /// Server update rule (`BRAID_PS_RULE`: `sum` or `sgd:LR`; default sum).
    pub rule: UpdateRule,
    /// Values larger than this are split into parts over servers (`BRAID_PS_PARTITION_BYTES`,
    /// default 4 MiB).
    pub partition_bytes: usize,
    /// Extra copies of every part on the next servers of the ring (`BRAID_PS_REPLICAS`,
    /// default 1).
    pub replicas: usize,
    /// Completed versions kept per part for snapshot reads (default 4).
    pub history: usize,
    /// Servers measure their reduction bandwidth at start and publish it as their ring weight
    /// (`BRAID_PS_PLACEMENT=bandwidth`; default `equal`: the configured `BRAID_WEIGHT`).
    pub weigh_by_bandwidth: bool,
}

impl Default for PsOptions {
    fn default() -> Self {
        PsOptions {
            consistency: Consistency::Sync,
            rule: UpdateRule::Sum,
            partition_bytes: 4 << 20,
            replicas: 1,
            history: 4,
            weigh_by_bandwidth: false,
        }
    }
}

/// Largest push/pull partition accepted from the environment (a part is one message).
pub const MAX_PARTITION_BYTES: usize = 1 << 30;
/// Most extra copies of a part accepted from the environment.
pub const MAX_REPLICAS: usize = 64;

impl PsOptions {
    /// Settings from the environment (`BRAID_PS_*`).
    ///
    /// Errors: `InvalidArgument` for malformed values.
    pub fn from_env() -> Result<PsOptions> {
        PsOptions::from_lookup(crate::config::var)
    }

    /// Settings from a lookup function.
    ///
    /// Errors: `InvalidArgument` for malformed values.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<PsOptions> {
        let mut o = PsOptions::default();
        if let Some(m) = get("BRAID_PS_MODE") {
            o.consistency = match m.trim() {
                "sync" => Consistency::Sync,
                "async" => Consistency::Async,
                s if s.starts_with("bounded:") => {
                    Consistency::Bounded(s["bounded:".len()..].parse().map_err(|_| {
                        Error::InvalidArgument(format!("BRAID_PS_MODE={m}: expected bounded:TAU"))
                    })?)
                }
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "BRAID_PS_MODE={m}: expected sync, async or bounded:TAU"
                    )))
                }
            };
        }
        if let Some(r) = get("BRAID_PS_RULE") {
            o.rule = match r.trim() {
                "sum" => UpdateRule::Sum,
                s if s.starts_with("sgd:") => UpdateRule::Sgd {
                    lr: s["sgd:".len()..]
                        .parse()
                        .ok()
                        .filter(|x: &f64| x.is_finite())
                        .ok_or_else(|| {
                            Error::InvalidArgument(format!("BRAID_PS_RULE={r}: expected sgd:LR"))
                        })?,
                },
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "BRAID_PS_RULE={r}: expected sum or sgd:LR"
                    )))
                }
            };
        }
        if let Some(b) = get("BRAID_PS_PARTITION_BYTES") {
            o.partition_bytes = crate::config::parse_bytes(&b)
                .filter(|x| (8..=MAX_PARTITION_BYTES).contains(x))
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "BRAID_PS_PARTITION_BYTES={b}: expected a size from 8 bytes to 1 GiB"
                    ))
                })?;
        }
        if let Some(p) = get("BRAID_PS_PLACEMENT") {
            o.weigh_by_bandwidth = match p.trim() {
                "bandwidth" => true,
                "equal" => false,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "BRAID_PS_PLACEMENT={p}: expected equal or bandwidth"
                    )))
                }
            };
        }
        if let Some(r) = get("BRAID_PS_REPLICAS") {
            o.replicas = r
                .trim()
                .parse()
                .ok()
                .filter(|x| *x <= MAX_REPLICAS)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "BRAID_PS_REPLICAS={r}: expected 0, 1, 2, ... up to {MAX_REPLICAS}"
                    ))
                })?;
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(k: &'static str, v: &'static str) -> Result<PsOptions> {
        PsOptions::from_lookup(move |n| (n == k).then(|| v.to_string()))
    }

    #[test]
    fn sizes_and_counts_from_the_environment_are_bounded() {
        assert!(with("BRAID_PS_REPLICAS", "2").is_ok());
        for bad in ["65", "18446744073709551615", "-1", "x"] {
            let e = with("BRAID_PS_REPLICAS", bad).unwrap_err().to_string();
            assert!(e.contains("BRAID_PS_REPLICAS"), "{e}");
        }
        assert!(with("BRAID_PS_PARTITION_BYTES", "1G").is_ok());
        for bad in ["4", "2G", "1T"] {
            let e = with("BRAID_PS_PARTITION_BYTES", bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("BRAID_PS_PARTITION_BYTES"), "{e}");
        }
    }
}
