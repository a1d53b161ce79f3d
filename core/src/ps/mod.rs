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
//!   bounded staleness; versions; update rules (sum, MXNet's SGD with momentum, weight decay,
//!   rescale and clipping, user callback).
//! * Priorities: every request carries the caller's priority; each connection sends its queued
//!   messages highest priority first, handing the transport at most about 8 MiB ahead
//!   (`chan.rs`: two parts at the default partition size, so the link never idles between
//!   parts), so a small urgent push queued behind a large one (split in parts of
//!   [`PsOptions::partition_bytes`]) overtakes all but about 8 MiB of it; the
//!   server answers in the order it received and queues its answers by the same priority.
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
//! * Checkpoints ([`KvWorker::checkpoint`], or every N push_pull rounds with
//!   `BRAID_PS_CHECKPOINT_DIR` and `BRAID_PS_CHECKPOINT_EVERY`): every server writes the parts
//!   it owns at one consistent version in the background, one file per server; the worker
//!   that asked writes the manifest last ([`checkpoint`]).
//!   Servers started with `BRAID_PS_RESTORE=DIR` load it, with any number of servers.
//!
//! # Update rules at run time
//! * [`KvWorker::set_rule`] (C `braid_kv_set_rule`) sends a built-in rule (`sum`, `sgd:...`,
//!   see [`UpdateRule::parse`]) to every server of the view, behind everything the worker
//!   queued before, and returns once each acknowledged it; servers use it for every update
//!   they apply afterwards (sync: the rounds that close afterwards). Idempotent; call it on
//!   every worker (as MXNet's `set_optimizer`). A server running a callback rule refuses it.
//!   The worker sends the rule first on every connection it makes later, so servers that join
//!   the view get it before anything else from that worker.
//! * Replicas apply each replicated push with the rule its owner applied it with (carried in
//!   the replication), so the copies, momentum included, stay identical even while the rule
//!   reaches the servers at different times. (Sync rounds that a view change closes, without
//!   a push, are closed by each copy with its own rule: the same once every server got it.)
//! * The optimizer state (the SGD momentum, one buffer per key part, same dtype and length as
//!   the value, zero at its first use) lives next to the value, is kept when the rule changes,
//!   replicated with every update, and moves with the part when the view changes (a replica
//!   that takes a dead server's parts over has the momentum too). Read and replace it with
//!   [`KvWorker::pull_state_into`] / [`KvWorker::push_state`] (C `braid_kv_pull_state`,
//!   `braid_kv_push_state`). Checkpoints ([`checkpoint`]) hold the values only: a restored
//!   group starts its momentum at zero (save it with `pull_state_into` if needed).
//!
//! # Checkpoints, exactly
//! * Who: any worker may call [`KvWorker::checkpoint`]. Periodic checkpoints are taken by the
//!   worker with the lowest member id of the view: at the start of its push_pull call after
//!   every N-th one (N = `BRAID_PS_CHECKPOINT_EVERY`), once nothing it sent is still queued
//!   (otherwise at its next call); it goes on training while the servers write.
//! * When: the request reaches each server behind everything the asking worker sent before
//!   (it is queued only once that all left the worker's queues, and a server handles a
//!   connection's messages in order). A server takes
//!   every part it owns at `T` = its current version (async and bounded: the version vector
//!   recorded per part in the manifest); in sync mode `T` = the round the asking worker last
//!   pushed into, waiting for that round to close when it is still open. Since no sync round
//!   closes without the asking worker's push, the parts are at one round boundary: every key
//!   pushed in the same rounds has the same version in the checkpoint (the manifest's
//!   `version`).
//! * Pin, copy, write: the server pins those versions in its store (kept readable beyond the
//!   history while it goes on serving; see [`store::Store::pin`]) and a thread copies the parts
//!   one at a time, each under the state lock, into one reused buffer, and writes them: the
//!   server stops serving for at most one part's copy at a time (a partition), and holds no
//!   second copy of its state (only the versions that changed while pinned). The answer lists
//!   the parts and checksums.
//!   The asking worker checks that every server answered at the same view epoch and that no
//!   part is missing or twice, then writes the manifest (temporary name, fsync, rename) and
//!   tells the coordinator (`braid-coordinator status` shows the last checkpoint). A
//!   checkpoint fails as a whole (nothing installed; the previous one stays) when a server is
//!   lost, the view changes, or a server is still writing the previous one.
//! * Restore: a server started with `BRAID_PS_RESTORE=DIR` checks the manifest and every file
//!   (length, header, checksums) BEFORE it registers, and refuses to start naming the file
//!   that is missing, truncated or corrupt; then it loads the parts it owns or replicates on
//!   the ring of its first view. Start every server of the group with it, in a fresh job or
//!   once the old servers have left the view. Parts restart at their checkpoint versions with
//!   no open round; workers continue from there (sync: their next push is round `version + 1`).
//! * Retries across a restore: servers record, for every (worker, operation, part) write they
//!   apply, the version its acknowledgement gives (sync: its round; async: the version after
//!   it; a held bounded push: once applied). A checkpoint at version `T` carries, per part, the
//!   latest records with versions at most `T` (the writes its value includes), and a restored
//!   server loads them: a retried push whose acknowledgement was lost when every server died
//!   is acknowledged, not applied twice, while one applied only after the checkpoint (its
//!   effect lost) is applied again. Operation ids start at a random value per worker, so a
//!   fresh job's workers (member ids count from 1 again) never match an old job's records.

pub(crate) mod chan;
pub mod checkpoint;
pub(crate) mod node;
mod pool;
pub mod server;
pub mod shard;
pub mod store;
pub(crate) mod wire;
pub mod worker;

pub use server::KvServer;
pub use store::{Consistency, SgdParams, StoreBytes, UpdateRule};
pub use worker::{CheckpointInfo, KvReader, KvWorker, PsHandle, Pulled};

/// The hash maps of the push/pull hot paths (requests, aggregations, channels, applied
/// writes): foldhash, seeded per process, so lookups cost a few multiplications instead of
/// SipHash rounds while keys chosen by a peer still cannot be made to collide at will.
pub(crate) type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The JSON form of a push/pull message header as it travels (binary or JSON), or why it does
/// not decode: for tests and tools that look at raw connections.
#[doc(hidden)]
pub fn header_json(hdr: &[u8]) -> std::result::Result<String, String> {
    wire::Msg::decode(hdr).map(|m| String::from_utf8_lossy(&m.encode_json()).into_owned())
}

use crate::error::{Error, Result};

/// Push/pull settings (the same on every member of a group).
#[derive(Debug, Clone)]
pub struct PsOptions {
    /// Consistency (`BRAID_PS_MODE`: `sync`, `async` or `bounded:TAU`; default sync).
    pub consistency: Consistency,
    /// Server update rule (`BRAID_PS_RULE`: `sum`, `sgd:LR` or
    /// `sgd:lr=LR,momentum=M,wd=WD,rescale=R,clip=C`, see [`UpdateRule::parse`]; default sum).
    /// Workers may replace it at run time ([`KvWorker::set_rule`]).
    pub rule: UpdateRule,
    /// Values larger than this are split into parts over servers (`BRAID_PS_PARTITION_BYTES`,
    /// default 4 MiB).
    pub partition_bytes: usize,
    /// Extra copies of every part on the next servers of the ring (`BRAID_PS_REPLICAS`,
    /// default 1).
    pub replicas: usize,
    /// Completed versions kept per part for snapshot reads, the current one included
    /// (`BRAID_PS_HISTORY`, 1 to [`MAX_HISTORY`]; default 4). Each costs the part's bytes on
    /// its server: 1 keeps only the current values (readers' snapshots then retry more often
    /// while workers push).
    pub history: usize,
    /// Servers measure their reduction bandwidth at start and publish it as their ring weight
    /// (`BRAID_PS_PLACEMENT=bandwidth`; default `equal`: the configured `BRAID_WEIGHT`).
    pub weigh_by_bandwidth: bool,
    /// Workers: directory of the periodic checkpoints (`BRAID_PS_CHECKPOINT_DIR`; with
    /// [`PsOptions::checkpoint_every`]).
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// Workers: a checkpoint every this many push_pull rounds (`BRAID_PS_CHECKPOINT_EVERY`;
    /// 0: none).
    pub checkpoint_every: u64,
    /// Servers: load the checkpoint in this directory at start (`BRAID_PS_RESTORE`).
    pub restore: Option<std::path::PathBuf>,
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
            checkpoint_dir: None,
            checkpoint_every: 0,
            restore: None,
        }
    }
}

/// Largest push/pull partition accepted from the environment (a part is one message).
pub const MAX_PARTITION_BYTES: usize = 1 << 30;
/// Most extra copies of a part accepted from the environment.
pub const MAX_REPLICAS: usize = 64;
/// Most versions per part kept for snapshot reads accepted from the environment.
pub const MAX_HISTORY: usize = 64;

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
            o.rule = UpdateRule::parse(&r)
                .map_err(|e| Error::InvalidArgument(format!("BRAID_PS_RULE={r}: {e}")))?;
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
        if let Some(h) = get("BRAID_PS_HISTORY") {
            o.history = h
                .trim()
                .parse()
                .ok()
                .filter(|x| (1..=MAX_HISTORY).contains(x))
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "BRAID_PS_HISTORY={h}: expected 1 to {MAX_HISTORY} versions"
                    ))
                })?;
        }
        let dir = get("BRAID_PS_CHECKPOINT_DIR").filter(|d| !d.trim().is_empty());
        let every = get("BRAID_PS_CHECKPOINT_EVERY").filter(|d| !d.trim().is_empty());
        match (dir, every) {
            (None, None) => {}
            (Some(d), Some(n)) => {
                o.checkpoint_every = n.trim().parse().ok().filter(|x| *x > 0).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "BRAID_PS_CHECKPOINT_EVERY={n}: expected a number of rounds, 1 or more"
                    ))
                })?;
                o.checkpoint_dir = Some(absolute("BRAID_PS_CHECKPOINT_DIR", &d)?);
            }
            (Some(d), None) => {
                return Err(Error::InvalidArgument(format!(
                    "BRAID_PS_CHECKPOINT_DIR={d} needs BRAID_PS_CHECKPOINT_EVERY=N (rounds)"
                )))
            }
            (None, Some(n)) => {
                return Err(Error::InvalidArgument(format!(
                    "BRAID_PS_CHECKPOINT_EVERY={n} needs BRAID_PS_CHECKPOINT_DIR=DIR"
                )))
            }
        }
        if let Some(d) = get("BRAID_PS_RESTORE").filter(|d| !d.trim().is_empty()) {
            o.restore = Some(absolute("BRAID_PS_RESTORE", &d)?);
        }
        Ok(o)
    }
}

/// `dir` as an absolute path (relative to the current directory), checked as a checkpoint
/// directory ([`checkpoint::check_dir`]).
pub(crate) fn absolute(name: &str, dir: &str) -> Result<std::path::PathBuf> {
    let p = std::path::Path::new(dir);
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::System(format!("{name}={dir}: current directory: {e}")))?
            .join(p)
    };
    let s = abs
        .to_str()
        .ok_or_else(|| Error::InvalidArgument(format!("{name}={dir}: not UTF-8")))?;
    checkpoint::check_dir(s).map_err(|e| Error::InvalidArgument(format!("{name}={dir}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(k: &'static str, v: &'static str) -> Result<PsOptions> {
        PsOptions::from_lookup(move |n| (n == k).then(|| v.to_string()))
    }

    #[test]
    fn update_rules_from_the_environment() {
        assert!(matches!(
            with("BRAID_PS_RULE", "sum").unwrap().rule,
            UpdateRule::Sum
        ));
        let r = with("BRAID_PS_RULE", "sgd:0.25").unwrap().rule;
        assert!(matches!(r, UpdateRule::Sgd(p) if p == SgdParams::lr(0.25)));
        let r = with(
            "BRAID_PS_RULE",
            "sgd:lr=0.1,momentum=0.9,wd=1e-4,rescale=0.5,clip=5",
        )
        .unwrap()
        .rule;
        assert_eq!(
            r.spec().as_deref(),
            Some("sgd:lr=0.1,momentum=0.9,wd=0.0001,rescale=0.5,clip=5.0")
        );
        for (bad, field) in [
            ("sgd:lr=0.1,momentum=x", "momentum=x"),
            ("sgd:momentum=0.9", "lr is required"),
            ("adam", "expected sum"),
        ] {
            let e = with("BRAID_PS_RULE", bad).unwrap_err().to_string();
            assert!(e.contains("BRAID_PS_RULE") && e.contains(field), "{e}");
        }
    }

    #[test]
    fn sizes_and_counts_from_the_environment_are_bounded() {
        assert!(with("BRAID_PS_REPLICAS", "2").is_ok());
        for bad in ["65", "18446744073709551615", "-1", "x"] {
            let e = with("BRAID_PS_REPLICAS", bad).unwrap_err().to_string();
            assert!(e.contains("BRAID_PS_REPLICAS"), "{e}");
        }
        assert!(with("BRAID_PS_PARTITION_BYTES", "1G").is_ok());
        assert_eq!(with("BRAID_PS_HISTORY", "1").unwrap().history, 1);
        assert_eq!(PsOptions::default().history, 4);
        for bad in ["0", "65", "-1", "x"] {
            let e = with("BRAID_PS_HISTORY", bad).unwrap_err().to_string();
            assert!(e.contains("BRAID_PS_HISTORY"), "{e}");
        }
        let both = |d: &'static str, n: &'static str| {
            PsOptions::from_lookup(move |k| match k {
                "BRAID_PS_CHECKPOINT_DIR" => Some(d.to_string()),
                "BRAID_PS_CHECKPOINT_EVERY" => Some(n.to_string()),
                _ => None,
            })
        };
        let o = both("/tmp/ck", "5").unwrap();
        assert_eq!(o.checkpoint_every, 5);
        assert_eq!(
            o.checkpoint_dir.as_deref(),
            Some(std::path::Path::new("/tmp/ck"))
        );
        assert!(both("rel", "5")
            .unwrap()
            .checkpoint_dir
            .unwrap()
            .is_absolute());
        for bad in ["0", "-1", "x"] {
            let e = both("/tmp/ck", bad).unwrap_err().to_string();
            assert!(e.contains("BRAID_PS_CHECKPOINT_EVERY"), "{e}");
        }
        let e = with("BRAID_PS_CHECKPOINT_DIR", "/tmp/ck")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs BRAID_PS_CHECKPOINT_EVERY"), "{e}");
        let e = with("BRAID_PS_CHECKPOINT_EVERY", "3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs BRAID_PS_CHECKPOINT_DIR"), "{e}");
        let r = with("BRAID_PS_RESTORE", "/tmp/ck").unwrap();
        assert_eq!(r.restore.as_deref(), Some(std::path::Path::new("/tmp/ck")));
        for bad in ["4", "2G", "1T"] {
            let e = with("BRAID_PS_PARTITION_BYTES", bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("BRAID_PS_PARTITION_BYTES"), "{e}");
        }
    }
}
