//! Membership: the coordinator service, its client, and views.
//!
//! The coordinator ([`Coordinator`], embeddable like torch's `TCPStore`, or standalone as the
//! `braid-coordinator` binary) runs rendezvous for named groups ("world" by default). Each member
//! connects, sends a [`Registration`] (world size, optional requested rank, host, pid, role and
//! an opaque transport connect handle) and waits in [`rendezvous`] until the group is complete.
//! The coordinator then publishes a [`View`] to every member: the epoch, a random nonce (which
//! authenticates data connections between members of this view) and the members ordered by
//! rank (rank = index in [`View::members`]).
//!
//! Rules:
//! * Member ids are `u64` from one counter per coordinator, strictly increasing and never
//!   reused, not even for a registration that was dropped (like pids).
//! * A group's world size is fixed by its first registration; a registration with another world
//!   size is refused.
//! * Requested ranks are honoured (a duplicate request or a rank not below the world size is
//!   refused); members without a request fill the free positions in arrival order.
//! * A member whose connection drops before the view is complete is removed (its id retired),
//!   so a restarted process can register again. A group nobody waits in any more is forgotten.
//! * A group whose view is published refuses further registrations (elastic join comes later:
//!   a later view has a higher epoch, members that stay keep their relative order, joiners come
//!   last).
//! * After the view is published each member keeps its [`Client`] connection open (later:
//!   heartbeats and view changes). A group whose members have all disconnected is forgotten, so
//!   a long-running coordinator can serve successive jobs.
//!
//! The wire protocol is in `proto` (length-prefixed JSON frames with magic and version).
//! Logs use the target `braid::membership`.
//!
//! # Elastic groups
//! A group whose first registration says `elastic` changes its view while it runs:
//! * a registration arriving while the group runs is a *joiner*; joiners arriving within the
//!   group's batching window are admitted together, when every member has installed the current
//!   view (so changes never overlap), within `min_size..=max_size`;
//! * a member that leaves (`Leave`), closes its connection, or sends no frame for its heartbeat
//!   timeout is removed at the next epoch; its id is retired and refused if it comes back;
//! * a member whose data connections broke asks for a `Resync`; the coordinator publishes the
//!   next view as soon as every member it named is either dead or asking too;
//! * members that stay keep their relative order; joiners come last, in id order;
//! * members of a pipeline report their stages' compute times (`Metric`, see
//!   `Communicator::report_pipeline_metric`); once every stage reported twice in the current
//!   view and a plan with the measured throughputs is predicted to shorten the slowest stage
//!   by more than `BRAID_PIPELINE_REPLAN_GAIN`, the coordinator publishes a view with the same
//!   members in the same order, re-weighed (reason "reweigh: predicted gain NN%").
//!
//! Every view change is sent to every connected member of the group; members install it at a
//! point they agree on (see `Communicator::update`) and acknowledge it (`Ack`).
//! With a state file the coordinator persists the id high-water mark, the views and the
//! members' secrets, so after a restart it never reuses an id and members reconnect with
//! `Rejoin`.
//!
//! # Hardening
//! * Each registration's acknowledgement carries a random member secret; a `Rejoin` is always
//!   challenged (even without a job token) and must prove it, so a stranger who learnt a
//!   member id (status replies list them) cannot take that member's place.
//! * View nonces (which key the data connections) reach members only: status replies carry
//!   none and [`fetch_view`] returns the view with `nonce = 0`.
//! * Push/pull readers register in the reader role with [`fetch_reader_grant`]: a fresh id
//!   from the member-id counter, the view without its nonce, and a ticket for the servers.
//! * Before a peer proved anything its frames are small (a registration with the largest
//!   handle fits), must arrive whole within the handshake timeout, and at most
//!   `max_unauthenticated` such connections are open (the oldest is closed for a new one);
//!   no buffer is sized by a declared length beyond what actually arrived.

pub(crate) mod auth;
pub mod bench;
mod client;
mod coord_loop;
mod coord_state;
mod coordinator;
pub mod pipeline;
mod proto;
pub mod scale;
#[cfg(test)]
mod tests;

use std::io::Read;

use serde::{Deserialize, Serialize};

pub use client::{
    coordinator_status, fetch_reader_grant, fetch_view, rendezvous, rendezvous_with, Client,
    ClientOptions, ReaderGrant, Watch, WatchFn,
};
#[doc(hidden)]
pub use coordinator::fuzz_load_state;
pub use coordinator::{Coordinator, CoordinatorOptions};
#[doc(hidden)]
pub use proto::fuzz_decode_frame;

/// Log target of this module.
pub(crate) const LOG: &str = "braid::membership";

/// What a member does in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A training rank taking part in collectives (the only role the coordinator accepts in
    /// this version).
    Worker,
    /// A parameter server (push/pull); reserved.
    Server,
    /// A read-only consumer of parameters (inference); reserved.
    Reader,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Worker => "worker",
            Role::Server => "server",
            Role::Reader => "reader",
        })
    }
}

/// One member of a [`View`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Member id: unique per coordinator, never reused.
    pub id: u64,
    /// Host id (members with equal host ids share a host; see [`local_host_id`]).
    pub host_id: String,
    /// Host name, for messages.
    pub hostname: String,
    /// Process id on its host, for messages.
    pub pid: u32,
    /// Role.
    pub role: Role,
    /// Opaque connect-handle bytes (a `braid_transport::ConnectHandle`, encoded). Hex-encoded
    /// in JSON.
    #[serde(with = "hex_bytes")]
    pub handle: Vec<u8>,
    /// NUMA node the member runs on, where known.
    #[serde(default)]
    pub numa: Option<u32>,
    /// Relative throughput reported at registration (`BRAID_WEIGHT`; pipeline planning).
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// A membership view: who is in a group, in rank order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct View {
    /// Group (namespace on the coordinator).
    pub group: String,
    /// Epoch: 1 for the first view of a group; each later view of the group has a higher one.
    pub epoch: u64,
    /// Random per view; members present it when they connect to each other so connections of
    /// another view or job are rejected.
    pub nonce: u64,
    /// Members; rank = index.
    pub members: Vec<Member>,
}

impl View {
    /// The rank of member `id` in this view, if it is a member.
    pub fn rank_of(&self, id: u64) -> Option<usize> {
        self.members.iter().position(|m| m.id == id)
    }

    /// Number of members.
    pub fn size(&self) -> usize {
        self.members.len()
    }
}

/// What a member sends to register.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    /// Group to join (e.g. "world"); 1 to 256 bytes.
    pub group: String,
    /// World size of the group (at least 1); must equal that of the group's first registration.
    pub world_size: usize,
    /// Requested rank (must be below `world_size` and not requested by another member), or
    /// `None` to take a free position in arrival order.
    pub rank: Option<usize>,
    /// Host id ([`local_host_id`] unless overridden).
    pub host_id: String,
    /// Host name ([`local_hostname`]).
    pub hostname: String,
    /// Process id.
    pub pid: u32,
    /// Role (only [`Role::Worker`] is accepted in this version).
    pub role: Role,
    /// Opaque connect-handle bytes published to the other members (at most 64 KiB). Hex-encoded
    /// in JSON.
    #[serde(with = "hex_bytes")]
    pub handle: Vec<u8>,
    /// NUMA node of the registering process, where known (published in the view).
    #[serde(default)]
    pub numa: Option<u32>,
    /// Relative throughput of this member (published in the view; pipeline planning).
    #[serde(default = "one")]
    pub weight: f64,
    /// The group is elastic (joins and failures change the view). Fixed by the group's first
    /// registration; a registration that arrives while an elastic group runs is a joiner.
    #[serde(default)]
    pub elastic: bool,
    /// Elastic policy proposed for the group (the first registration's policy is used).
    #[serde(default)]
    pub policy: GroupPolicy,
    /// The coordinator declares this member dead after this many milliseconds without a
    /// frame from it (0: never).
    #[serde(default)]
    pub heartbeat_timeout_ms: u64,
    /// A light member receives view-change notices (epoch, size, its rank) instead of whole
    /// views (monitors, readers, scale tests).
    #[serde(default)]
    pub light: bool,
    /// Random per connection (hex), for the job-token handshake.
    #[serde(default)]
    pub client_nonce: String,
    /// This member applies view deltas: after the first whole view on a connection, the
    /// coordinator may send each next view as the members that left and joined
    /// (O(changes) bytes instead of O(members)). Members that do not say so (older clients)
    /// get whole views.
    #[serde(default)]
    pub view_deltas: bool,
}

/// Elastic policy of a group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupPolicy {
    /// No view smaller than this is published.
    pub min_size: usize,
    /// No view larger than this is published (`None`: no limit).
    pub max_size: Option<usize>,
    /// Batching window for joiners, in milliseconds.
    pub join_window_ms: u64,
}

impl Default for GroupPolicy {
    fn default() -> Self {
        GroupPolicy {
            min_size: 1,
            max_size: None,
            join_window_ms: 500,
        }
    }
}

impl Registration {
    /// A worker registration for this process (host id, host name and pid filled in).
    pub fn worker(group: &str, world_size: usize, rank: Option<usize>, handle: Vec<u8>) -> Self {
        Registration {
            group: group.to_string(),
            world_size,
            rank,
            host_id: local_host_id(),
            hostname: local_hostname(),
            pid: std::process::id(),
            role: Role::Worker,
            handle,
            numa: crate::topo::local_numa_node(),
            weight: 1.0,
            elastic: false,
            policy: GroupPolicy::default(),
            heartbeat_timeout_ms: 0,
            light: false,
            client_nonce: String::new(),
            view_deltas: true,
        }
    }
}

/// This host's name (`gethostname(2)`; falls back to `/proc/sys/kernel/hostname`, then
/// `"localhost"`).
pub fn local_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: FFI call; `buf` is valid for writes of `buf.len()` bytes for the duration of the
    // call, and gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast::<libc::c_char>(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
        if !name.is_empty() {
            return name;
        }
    }
    match std::fs::read_to_string("/proc/sys/kernel/hostname") {
        Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => "localhost".to_string(),
    }
}

/// This host's id: `/proc/sys/kernel/random/boot_id` + `":"` + host name (just the host name
/// where the boot id cannot be read). Two processes have the same host id exactly when they
/// run on the same (booted instance of a) machine, even inside containers with equal host
/// names. `BRAID_HOST_ID` overrides it at the communicator level.
pub fn local_host_id() -> String {
    let host = local_hostname();
    match std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        Ok(b) if !b.trim().is_empty() => format!("{}:{host}", b.trim()),
        _ => host,
    }
}

/// The local IP address this host uses to reach `addr` (`host:port`), found by routing only
/// (a UDP socket is connected, nothing is sent). Useful as the default address a member
/// listens on for its peers.
///
/// Errors: `Error::InvalidArgument` for an address that does not resolve,
/// `Error::System` where no route exists.
pub fn local_ip_towards(addr: &str) -> crate::error::Result<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    let target = addr
        .to_socket_addrs()
        .map_err(|e| crate::error::Error::InvalidArgument(format!("address {addr}: {e}")))?
        .next()
        .ok_or_else(|| {
            crate::error::Error::InvalidArgument(format!("address {addr} resolves to nothing"))
        })?;
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = std::net::UdpSocket::bind(bind)
        .map_err(|e| crate::error::Error::System(format!("udp socket: {e}")))?;
    sock.connect(target)
        .map_err(|e| crate::error::Error::System(format!("no route to {addr}: {e}")))?;
    Ok(sock
        .local_addr()
        .map_err(|e| crate::error::Error::System(format!("local address towards {addr}: {e}")))?
        .ip())
}

/// A random u64 for view nonces: `/dev/urandom`, or (where it cannot be read) the
/// process-randomly keyed SipHash of the time and a per-call value.
pub(crate) fn random_u64(salt: u64) -> u64 {
    let mut b = [0u8; 8];
    let from_dev = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    let v = match from_dev {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(salt);
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            h.write_u32(std::process::id());
            h.finish()
        }
    };
    // 0 is reserved for "no view" on the data path.
    v.max(1)
}

/// Serde helpers: bytes as a lower-case hex string (half the size of a JSON number array, which
/// matters for views of thousands of members within the frame limit).
/// Lower-case hex of bytes.
pub(crate) fn to_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(b.len() * 2);
    for &x in b {
        out.push(char::from(DIGITS[usize::from(x >> 4)]));
        out.push(char::from(DIGITS[usize::from(x & 15)]));
    }
    out
}

/// Bytes of a hex string (`None` if it is not one).
pub(crate) fn from_hex(s: &str) -> Option<Vec<u8>> {
    let nib = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return None;
    }
    b.chunks(2)
        .map(|p| Some((nib(p[0])? << 4) | nib(p[1])?))
        .collect()
}

/// 16 random bytes as hex (handshake nonces).
pub(crate) fn random_nonce() -> String {
    let a = random_u64(1).to_le_bytes();
    let b = random_u64(2).to_le_bytes();
    let mut v = a.to_vec();
    v.extend_from_slice(&b);
    to_hex(&v)
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(b.len() * 2);
        for &x in b {
            out.push(char::from(DIGITS[usize::from(x >> 4)]));
            out.push(char::from(DIGITS[usize::from(x & 15)]));
        }
        s.serialize_str(&out)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        let nib = |c: u8| -> Result<u8, D::Error> {
            match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                b'A'..=b'F' => Ok(c - b'A' + 10),
                _ => Err(serde::de::Error::custom("handle is not a hex string")),
            }
        };
        let b = s.as_bytes();
        if b.len() % 2 != 0 {
            return Err(serde::de::Error::custom(
                "handle hex string has an odd length",
            ));
        }
        b.chunks(2)
            .map(|p| Ok((nib(p[0])? << 4) | nib(p[1])?))
            .collect()
    }
}
