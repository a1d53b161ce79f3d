//! Push/pull messages. Values travel in the message body, concatenated in the order of the
//! header's parts. Headers: the frequent messages (requests, answers, replications) in a fixed
//! binary form ([`binary`]), the rest as JSON; both forms decode everywhere.

use serde::{Deserialize, Serialize};

mod binary;

/// First byte of a binary header (a JSON header starts with `{`).
pub(crate) const BINARY_MARK: u8 = binary::MARK;

use super::checkpoint::{FileEntry, PartEntry};
use crate::membership::Role;

/// Most parts in one request (workers split larger requests): bounds the header a client may
/// send ([`CLIENT_HDR`]).
pub(crate) const MAX_PARTS: usize = 4096;

/// Largest header a worker or reader may send, and a server may send to them: room for
/// [`MAX_PARTS`] part references (and the versions of an answer) with a wide margin.
pub(crate) const CLIENT_HDR: usize = 1 << 20;

/// Most part entries in one [`Msg::CkptParts`] (well inside [`CLIENT_HDR`]).
pub(crate) const MAX_CKPT_CHUNK: usize = 2048;

/// Header bytes a [`Msg::CkptParts`] is held to, about (well inside [`CLIENT_HDR`]; one entry
/// with its most applied-write records fits).
pub(crate) const CKPT_CHUNK_BYTES: usize = 256 << 10;

/// One part of a key in a request: its store key, user key, part index, byte length, and the
/// byte length of the whole key (so that every server holding a part can refuse a request for
/// another length, even where its own part happens to have the same size).
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
    /// Bytes of the whole key (0: not stated).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub t: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
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
    /// `rule`: the update rule the owner applied it with (see [`super::store::UpdateRule::spec`];
    /// absent for a custom rule: the replica's own), so replicas stay identical to the owner
    /// when a worker replaces the rule at run time ([`Msg::SetRule`]).
    Replicate {
        seq: u64,
        worker: u64,
        op: Box<Msg>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rule: Option<String>,
    },
    /// Replica → owner: operation `seq` applied.
    RepAck { seq: u64 },
    /// Server → server: parts that exist in the group (store key, user key, part index), so a
    /// server that comes to own a part every copy of which was lost knows it existed and fails
    /// its pulls instead of answering with nothing (or a fresh init).
    Keys { add: Vec<(u64, u64, u32)> },
    /// Goodbye before a channel ends on a protocol error: why (the peer fails what it has in
    /// flight on this connection at once).
    Bye { reason: String },
    /// Worker → server: write the parts this server owns, at one consistent version, to
    /// directory `dir` as checkpoint `id` (see [`super::checkpoint`]). Answered with zero or
    /// more [`Msg::CkptParts`] and then [`Msg::Checkpointed`], or a [`Msg::Fail`].
    Checkpoint { req: u64, id: String, dir: String },
    /// Server → worker: the entries of some of the parts written for checkpoint request `req`
    /// (at most [`MAX_CKPT_CHUNK`] per message; more may follow).
    CkptParts { req: u64, parts: Vec<PartEntry> },
    /// Server → worker: this server's file of checkpoint request `req` is on disk. `epoch`:
    /// the view the parts were taken in; `known`: parts in this server's key directory;
    /// `copy_us`: the longest hold of the server's state lock for a part's copy; `write_us`:
    /// how long copying and writing the file took.
    Checkpointed {
        req: u64,
        file: FileEntry,
        epoch: u64,
        known: u64,
        copy_us: u64,
        write_us: u64,
    },
    /// Worker → server: use update rule `rule` (see [`super::store::UpdateRule::parse`]) for
    /// every update applied from now on. Answered with an [`Msg::Ack`] (no versions) or a
    /// [`Msg::Fail`] (a server with a custom rule, a malformed rule). `req` 0: not answered.
    SetRule { req: u64, rule: String },
    /// Worker → server: the optimizer state (momentum) of these parts, answered like a pull
    /// ([`Msg::Values`]; zeros where a part has none).
    PullState {
        req: u64,
        #[serde(default)]
        prio: i32,
        parts: Vec<PartRef>,
    },
    /// Worker → server: replaces the optimizer state of these parts (replicated like a push).
    /// Body: the states. `op` as for `Init`.
    PushState {
        req: u64,
        op: u64,
        #[serde(default)]
        prio: i32,
        dtype: String,
        parts: Vec<PartRef>,
    },
    /// Server → server: full state of keys (migration, seeding a new replica).
    Transfer {
        dumps: serde_json::Value,
        /// The (worker, op, part, version) applications the moved parts have seen, so a
        /// retry that crosses the hand-over is not applied twice (version: of the write's
        /// acknowledgement, `u64::MAX` while held).
        #[serde(default)]
        seen: Vec<(u64, u64, u64, u64)>,
        /// The moved parts' entries of the key directory (see [`Msg::Keys`]).
        #[serde(default)]
        keys: Vec<(u64, u64, u32)>,
    },
}

/// Who may send a message to whom, in one place: `Ok` or the reason it is refused (a protocol
/// error: the receiver closes the connection). `from` is the sender's role as admitted by the
/// receiver's hello check (readers are not members), `to` the receiver's.
///
/// * To a server: workers (members of the view) may init, push, ask for a checkpoint, set the
///   update rule and read or replace the optimizer state;
///   workers and readers may pull and ask for the snapshot version; only servers may
///   replicate, acknowledge a replication, hand state over (transfer) or announce keys.
/// * To a worker or reader: only servers, and only answers.
/// * A goodbye from anyone.
pub(crate) fn permitted(from: Role, to: Role, m: &Msg) -> std::result::Result<(), String> {
    let ok = match (to, m) {
        (_, Msg::Bye { .. }) => true,
        (Role::Server, Msg::Init { .. } | Msg::Push { .. }) => from == Role::Worker,
        (Role::Server, Msg::Pull { .. } | Msg::SnapVer { .. }) => {
            matches!(from, Role::Worker | Role::Reader)
        }
        (
            Role::Server,
            Msg::Checkpoint { .. }
            | Msg::SetRule { .. }
            | Msg::PullState { .. }
            | Msg::PushState { .. },
        ) => from == Role::Worker,
        (
            Role::Server,
            Msg::Replicate { .. } | Msg::RepAck { .. } | Msg::Transfer { .. } | Msg::Keys { .. },
        ) => from == Role::Server,
        (Role::Server, _) => false,
        (
            Role::Worker | Role::Reader,
            Msg::Ack { .. }
            | Msg::Values { .. }
            | Msg::Snap { .. }
            | Msg::Fail { .. }
            | Msg::CkptParts { .. }
            | Msg::Checkpointed { .. },
        ) => from == Role::Server,
        (Role::Worker | Role::Reader, _) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a {from} may not send a {} message to a {to}",
            m.kind()
        ))
    }
}

/// The total byte length of `parts`, checked: `None` when it overflows or a request holds more
/// than [`MAX_PARTS`] parts.
pub(crate) fn parts_len(parts: &[PartRef]) -> Option<usize> {
    if parts.len() > MAX_PARTS {
        return None;
    }
    parts.iter().try_fold(0usize, |a, p| a.checked_add(p.n))
}

impl Msg {
    /// The message's type name (for logs and refusals).
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Msg::Init { .. } => "Init",
            Msg::Push { .. } => "Push",
            Msg::Pull { .. } => "Pull",
            Msg::SnapVer { .. } => "SnapVer",
            Msg::Ack { .. } => "Ack",
            Msg::Values { .. } => "Values",
            Msg::Snap { .. } => "Snap",
            Msg::Fail { .. } => "Fail",
            Msg::Replicate { .. } => "Replicate",
            Msg::RepAck { .. } => "RepAck",
            Msg::Keys { .. } => "Keys",
            Msg::Bye { .. } => "Bye",
            Msg::Transfer { .. } => "Transfer",
            Msg::Checkpoint { .. } => "Checkpoint",
            Msg::CkptParts { .. } => "CkptParts",
            Msg::Checkpointed { .. } => "Checkpointed",
            Msg::SetRule { .. } => "SetRule",
            Msg::PullState { .. } => "PullState",
            Msg::PushState { .. } => "PushState",
        }
    }

    /// Encodes the header: binary where the message has a binary form, else JSON.
    pub(crate) fn encode(&self) -> Vec<u8> {
        binary::encode(self).unwrap_or_else(|| self.encode_json())
    }

    /// Encodes the header as JSON (every message has this form).
    pub(crate) fn encode_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a header, binary or JSON.
    pub(crate) fn decode(b: &[u8]) -> std::result::Result<Msg, String> {
        if b.first() == Some(&binary::MARK) {
            binary::decode(b)
        } else {
            serde_json::from_slice(b).map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push() -> Msg {
        Msg::Push {
            req: 1,
            op: 1,
            prio: 0,
            dtype: "float".into(),
            parts: Vec::new(),
        }
    }

    #[test]
    fn roles_in_one_place() {
        let rep = Msg::Replicate {
            seq: 1,
            worker: 2,
            op: Box::new(push()),
            rule: None,
        };
        assert!(permitted(Role::Worker, Role::Server, &push()).is_ok());
        assert!(permitted(Role::Reader, Role::Server, &push()).is_err());
        assert!(permitted(Role::Server, Role::Server, &push()).is_err());
        assert!(permitted(Role::Server, Role::Server, &rep).is_ok());
        let e = permitted(Role::Worker, Role::Server, &rep).unwrap_err();
        assert!(e.contains("worker may not send a Replicate"), "{e}");
        assert!(permitted(Role::Reader, Role::Server, &Msg::SnapVer { req: 1 }).is_ok());
        let ack = Msg::Ack {
            req: 1,
            versions: Vec::new(),
        };
        assert!(permitted(Role::Server, Role::Worker, &ack).is_ok());
        assert!(permitted(Role::Worker, Role::Server, &ack).is_err());
        assert!(permitted(Role::Worker, Role::Worker, &ack).is_err());
        let ck = Msg::Checkpoint {
            req: 1,
            id: "01".into(),
            dir: "/tmp".into(),
        };
        assert!(permitted(Role::Worker, Role::Server, &ck).is_ok());
        assert!(permitted(Role::Reader, Role::Server, &ck).is_err());
        assert!(permitted(Role::Server, Role::Server, &ck).is_err());
        let parts = Msg::CkptParts {
            req: 1,
            parts: Vec::new(),
        };
        assert!(permitted(Role::Server, Role::Worker, &parts).is_ok());
        assert!(permitted(Role::Worker, Role::Server, &parts).is_err());
        let rule = Msg::SetRule {
            req: 1,
            rule: "sgd:0.1".into(),
        };
        let pull_state = Msg::PullState {
            req: 1,
            prio: 0,
            parts: Vec::new(),
        };
        let push_state = Msg::PushState {
            req: 1,
            op: 1,
            prio: 0,
            dtype: "float".into(),
            parts: Vec::new(),
        };
        for m in [&rule, &pull_state, &push_state] {
            assert!(permitted(Role::Worker, Role::Server, m).is_ok(), "{m:?}");
            assert!(permitted(Role::Reader, Role::Server, m).is_err(), "{m:?}");
            assert!(permitted(Role::Server, Role::Server, m).is_err(), "{m:?}");
            assert!(permitted(Role::Server, Role::Worker, m).is_err(), "{m:?}");
            assert_eq!(Msg::decode(&m.encode()).as_ref(), Ok(m));
        }
        // A replication written by an older server (no rule) still decodes.
        let old = br#"{"t":"Replicate","seq":1,"worker":2,"op":{"t":"Push","req":0,"op":1,"dtype":"float","parts":[]}}"#;
        assert!(matches!(
            Msg::decode(old),
            Ok(Msg::Replicate { rule: None, .. })
        ));
    }

    fn hot() -> Vec<Msg> {
        let parts = vec![
            PartRef {
                s: u64::MAX,
                k: 7,
                p: 3,
                n: 4096,
                t: 1 << 40,
            },
            PartRef {
                s: 1,
                k: 0,
                p: 0,
                n: 0,
                t: 0,
            },
        ];
        let w = |ty: u8, parts: Vec<PartRef>| {
            binary::write(ty, 9, 1 << 62, -5, "float16".into(), parts)
        };
        let mut v = vec![
            w(binary::INIT, parts.clone()),
            w(binary::PUSH, parts.clone()),
            w(binary::PUSH_STATE, Vec::new()),
            Msg::Pull {
                req: 1,
                epoch: 2,
                prio: i32::MAX,
                parts: parts.clone(),
                min: Some(0),
                at: None,
            },
            Msg::Pull {
                req: 1,
                epoch: 2,
                prio: i32::MIN,
                parts: parts.clone(),
                min: None,
                at: Some(u64::MAX),
            },
            Msg::PullState {
                req: 3,
                prio: 1,
                parts: parts.clone(),
            },
            Msg::SnapVer { req: 4 },
            Msg::Ack {
                req: 5,
                versions: vec![1, u64::MAX],
            },
            Msg::Values {
                req: 6,
                versions: Vec::new(),
            },
            Msg::Snap {
                req: 7,
                version: None,
            },
            Msg::Snap {
                req: 7,
                version: Some(3),
            },
            Msg::Fail {
                req: 8,
                msg: "part 3 of key 7: «no»".into(),
                retry: true,
            },
            Msg::Fail {
                req: 8,
                msg: String::new(),
                retry: false,
            },
            Msg::RepAck { seq: 10 },
        ];
        for rule in [None, Some("sgd:lr=0.1".to_string())] {
            v.push(Msg::Replicate {
                seq: 11,
                worker: 12,
                op: Box::new(w(binary::PUSH, parts.clone())),
                rule,
            });
        }
        v
    }

    #[test]
    fn frequent_messages_travel_in_binary_and_round_trip() {
        for m in hot() {
            let b = m.encode();
            assert_eq!(b[0], binary::MARK, "{m:?}");
            assert_eq!(Msg::decode(&b).as_ref(), Ok(&m));
            // The JSON form of the same message still decodes (both forms are read).
            let j = m.encode_json();
            assert_eq!(j[0], b'{');
            assert_eq!(Msg::decode(&j).as_ref(), Ok(&m));
            // Cut anywhere, or with a byte after it: refused, never a panic.
            for n in 0..b.len() {
                assert!(Msg::decode(&b[..n]).is_err(), "{m:?} cut at {n}");
            }
            let mut long = b.clone();
            long.push(0);
            let e = Msg::decode(&long).unwrap_err();
            assert!(e.contains("1 bytes after the"), "{e}");
        }
        // Rare messages, and a replication of one, travel as JSON.
        for m in [
            Msg::Bye { reason: "x".into() },
            Msg::Keys {
                add: vec![(1, 2, 3)],
            },
            Msg::Replicate {
                seq: 1,
                worker: 2,
                op: Box::new(Msg::SnapVer { req: 1 }),
                rule: None,
            },
        ] {
            let b = m.encode();
            if let Msg::Replicate { .. } = m {
                // A replication of a binary message is binary too.
                assert_eq!(b[0], binary::MARK);
            } else {
                assert_eq!(b[0], b'{', "{m:?}");
            }
            assert_eq!(Msg::decode(&b).as_ref(), Ok(&m));
        }
        let nested = Msg::Replicate {
            seq: 1,
            worker: 2,
            op: Box::new(Msg::Replicate {
                seq: 3,
                worker: 4,
                op: Box::new(push()),
                rule: None,
            }),
            rule: None,
        };
        assert_eq!(nested.encode()[0], b'{');
        assert_eq!(Msg::decode(&nested.encode()).as_ref(), Ok(&nested));
    }

    #[test]
    fn malformed_binary_headers_are_refused() {
        let mark = binary::MARK;
        let bad: Vec<(Vec<u8>, &str)> = vec![
            (vec![mark], "ends inside"),
            (vec![mark, 99], "unknown binary message type 99"),
            (vec![mark, 0], "unknown binary message type 0"),
            // A replication holding a replication.
            (
                [&[mark, 9][..], &[0; 16], &[0], &[9]].concat(),
                "replication inside a replication",
            ),
            // Snap with a flag byte of 2.
            ([&[mark, 7][..], &[0; 8], &[2]].concat(), "flag byte 2"),
            // Ack claiming 2^32-1 versions in 4 bytes: refused before anything is allocated.
            (
                [&[mark, 5][..], &[0; 8], &u32::MAX.to_le_bytes()].concat(),
                "a list of 4294967295 items",
            ),
            // Fail with a message that is not UTF-8.
            (
                [
                    &[mark, 8][..],
                    &[0; 8],
                    &2u32.to_le_bytes(),
                    &[0xff, 0xfe],
                    &[0],
                ]
                .concat(),
                "not UTF-8",
            ),
        ];
        for (b, want) in bad {
            let e = Msg::decode(&b).unwrap_err();
            assert!(e.contains(want), "{b:?}: {e} (want {want})");
        }
    }

    #[test]
    fn part_lengths_are_checked() {
        let p = |n| PartRef {
            s: 1,
            k: 1,
            p: 0,
            n,
            t: 0,
        };
        assert_eq!(parts_len(&[p(3), p(4)]), Some(7));
        assert_eq!(parts_len(&[p(usize::MAX), p(1)]), None);
        assert_eq!(parts_len(&vec![p(1); MAX_PARTS + 1]), None);
    }
}
