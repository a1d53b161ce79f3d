//! Push/pull messages (JSON headers; values travel in the message body, concatenated in the
//! order of the header's parts).

use serde::{Deserialize, Serialize};

/// One part of a key in a request: its store key, user key, part index and byte length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PartRef {
    /// Store key.
    pub s: u64,
    /// User key.
    pub k: u64,
    /// Part index.
    pub p: u32,
    /// Bytes.
    pub n: usize,
}

/// Messages between workers/readers and servers, and between servers. `prio` (higher first):
/// the request's priority, which its answer inherits on the server's send queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t")]
pub(crate) enum Msg {
    /// Creates keys (first writer wins). Body: the values. `op`: the worker's operation id,
    /// the same on retries (servers apply an operation's part at most once).
    Init {
        req: u64,
        op: u64,
        #[serde(default)]
        prio: i32,
        dtype: String,
        parts: Vec<PartRef>,
    },
    /// Pushes gradients. Body: the gradients. `op` as for `Init`.
    Push {
        req: u64,
        op: u64,
        #[serde(default)]
        prio: i32,
        dtype: String,
        parts: Vec<PartRef>,
    },
    /// Pulls values: at least version `min` (None: the store's default), or exactly version
    /// `at` (snapshot reads).
    Pull {
        req: u64,
        epoch: u64,
        #[serde(default)]
        prio: i32,
        parts: Vec<PartRef>,
        min: Option<u64>,
        at: Option<u64>,
    },
    /// Asks for the server's snapshot version.
    SnapVer { req: u64 },
    /// Push/init acknowledged (all parts recorded and replicated).
    Ack { req: u64, versions: Vec<u64> },
    /// Pull answer. Body: the values in request order.
    Values { req: u64, versions: Vec<u64> },
    /// Snapshot version answer.
    Snap { req: u64, version: Option<u64> },
    /// A request failed; `retry` says it may succeed against the current owner after a view
    /// change (the worker retries), otherwise it is the caller's error.
    Fail { req: u64, msg: String, retry: bool },
    /// Server → replica server: apply this operation (same order as on the owner). Body: data.
    Replicate { seq: u64, worker: u64, op: Box<Msg> },
    /// Replica → owner: operation `seq` applied.
    RepAck { seq: u64 },
    /// Server → server: full state of keys (migration, seeding a new replica).
    Transfer {
        dumps: serde_json::Value,
        /// The (worker, op, part) applications the moved parts have seen, so a retry that
        /// crosses the hand-over is not applied twice.
        #[serde(default)]
        seen: Vec<(u64, u64, u64)>,
    },
}

impl Msg {
    /// Encodes the header.
    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a header.
    pub(crate) fn decode(b: &[u8]) -> std::result::Result<Msg, String> {
        serde_json::from_slice(b).map_err(|e| e.to_string())
    }
}
