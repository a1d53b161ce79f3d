//! Wire protocol between members and the coordinator.
//!
//! Every message is one frame over TCP:
//!
//! ```text
//! offset  size  field
//! 0       4     magic b"BRDC"
//! 4       2     protocol version (u16, big-endian), currently 1
//! 6       2     message type (u16, big-endian), see [`MsgType`]
//! 8       4     payload length (u32, big-endian), at most MAX_PAYLOAD (16 MiB)
//! 12      len   payload: JSON (serde_json) of the message's body
//! ```
//!
//! Every read has a deadline: the first byte of a frame may be awaited up to a caller-chosen
//! deadline (or, for an established member connection, until it closes or the service stops),
//! and once the first byte arrived the rest of the frame must follow within the frame timeout.
//! A peer speaking another protocol version gets an [`MsgType::Error`] frame whose message names
//! both versions, then the connection closes. Bad magic, truncated frames and oversize lengths
//! are reported as [`FrameError`]s; nothing here panics on peer input.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Member, View};

/// Frame magic.
pub(crate) const MAGIC: [u8; 4] = *b"BRDC";
/// Protocol version spoken by this build.
pub(crate) const VERSION: u16 = 1;
/// Header length in bytes.
pub(crate) const HEADER_LEN: usize = 12;
/// Largest accepted payload.
pub(crate) const MAX_PAYLOAD: usize = 16 << 20;
/// Longest single blocking read, so stop/abort flags are seen promptly.
const POLL_SLICE: Duration = Duration::from_millis(100);

/// Message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub(crate) enum MsgType {
    /// member → coordinator: a [`super::Registration`].
    Register = 1,
    /// coordinator → member: [`Registered`] (registration accepted, view pending).
    Registered = 2,
    /// coordinator → member: [`ViewMsg`].
    View = 3,
    /// either way: [`ErrorMsg`]; the sender closes the connection afterwards.
    Error = 4,
    /// member → coordinator: polite departure (empty JSON object).
    Goodbye = 5,
    /// member → coordinator: [`Heartbeat`] (any frame counts as a sign of life).
    Heartbeat = 6,
    /// member → coordinator: [`Ack`] — this member installed the view of an epoch.
    Ack = 7,
    /// member → coordinator: graceful leave (empty JSON object); the next view excludes it.
    Leave = 8,
    /// member → coordinator: [`Resync`] — this member's view broke (a peer was lost); please
    /// publish the next view.
    Resync = 9,
    /// member → coordinator: [`Rejoin`] — first message of a member reconnecting (after a
    /// coordinator restart or a lost connection), instead of a registration.
    Rejoin = 10,
    /// coordinator → client: [`Challenge`] (job token in force).
    Challenge = 11,
    /// client → coordinator: [`Auth`], the answer to a challenge.
    Auth = 12,
    /// anyone → coordinator: [`StatusReq`]; answered with [`MsgType::StatusReply`].
    StatusReq = 13,
    /// coordinator → client: the status as JSON.
    StatusReply = 14,
    /// coordinator → light member: [`Notice`] (a view change, without the member list).
    Notice = 15,
    /// anyone → coordinator: [`ViewReq`], answered with a [`MsgType::View`] (member id 0) of
    /// the group's current view, or an error; the connection then closes (readers outside
    /// the group find the servers this way).
    ViewReq = 16,
    /// anyone → coordinator: [`ReaderReq`], answered with a [`MsgType::ReaderGrant`] or an
    /// error; the connection then closes (push/pull readers register this way, without
    /// joining the view).
    ReaderReq = 17,
    /// coordinator → reader: [`ReaderGrantMsg`].
    ReaderGrant = 18,
    /// member → coordinator: [`Metric`] — the compute time of this member's pipeline stage in
    /// its last step (throughput-aware re-plans of elastic pipelines).
    Metric = 19,
    /// member → coordinator: [`CheckpointNote`] — a push/pull checkpoint of the group was
    /// written (shown by `braid-coordinator status`).
    Checkpoint = 20,
    /// coordinator → member that registered with [`super::Registration::view_deltas`]:
    /// [`ViewDeltaMsg`], the next view as a change of the last one sent on this connection.
    ViewDelta = 21,
    /// coordinator → members of a group that is not elastic: [`FailureMsg`], a member of the
    /// view was declared dead (no heartbeat within its timeout). An elastic group learns
    /// this from its next view instead.
    Failure = 22,
}

impl MsgType {
    /// Decodes a type number.
    pub(crate) fn from_u16(v: u16) -> Option<MsgType> {
        Some(match v {
            1 => MsgType::Register,
            2 => MsgType::Registered,
            3 => MsgType::View,
            4 => MsgType::Error,
            5 => MsgType::Goodbye,
            6 => MsgType::Heartbeat,
            7 => MsgType::Ack,
            8 => MsgType::Leave,
            9 => MsgType::Resync,
            10 => MsgType::Rejoin,
            11 => MsgType::Challenge,
            12 => MsgType::Auth,
            13 => MsgType::StatusReq,
            14 => MsgType::StatusReply,
            15 => MsgType::Notice,
            16 => MsgType::ViewReq,
            17 => MsgType::ReaderReq,
            18 => MsgType::ReaderGrant,
            19 => MsgType::Metric,
            20 => MsgType::Checkpoint,
            21 => MsgType::ViewDelta,
            22 => MsgType::Failure,
            _ => return None,
        })
    }
}

/// Body of [`MsgType::Registered`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Registered {
    /// The member id given to this registration.
    pub member_id: u64,
    /// Group joined.
    pub group: String,
    /// World size of the group.
    pub world_size: usize,
    /// Members registered so far, this one included.
    pub registered: usize,
    /// The member waits for admission into a running group (elastic join).
    #[serde(default)]
    pub joining: bool,
    /// With a job token: HMAC proving the coordinator knows the token too (hex).
    #[serde(default)]
    pub proof: Option<String>,
    /// A new registration's member secret (hex, 32 bytes): the member proves it with
    /// [`Auth::member`] when it rejoins, so nobody else can take its place. Sent once, in the
    /// acknowledgement of the registration (never in that of a rejoin).
    #[serde(default)]
    pub secret: Option<String>,
    /// Optional messages this coordinator understands ([`FEATURE_METRIC`],
    /// [`FEATURE_CHECKPOINT`]); absent from coordinators older than them, which drop a member
    /// that sends a message type they do not know. Members send those only when listed.
    #[serde(default)]
    pub features: Vec<String>,
}

/// [`Registered::features`]: the coordinator takes [`MsgType::Metric`].
pub(crate) const FEATURE_METRIC: &str = "metric";
/// [`Registered::features`]: the coordinator takes [`MsgType::Checkpoint`].
pub(crate) const FEATURE_CHECKPOINT: &str = "checkpoint";
/// Every optional message this coordinator takes.
pub(crate) fn features() -> Vec<String> {
    vec![FEATURE_METRIC.to_string(), FEATURE_CHECKPOINT.to_string()]
}

/// Body of [`MsgType::Heartbeat`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub(crate) struct Heartbeat {
    /// Epoch the member runs in.
    pub epoch: u64,
}

/// Body of [`MsgType::Ack`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Ack {
    /// Epoch installed.
    pub epoch: u64,
}

/// Body of [`MsgType::Resync`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Resync {
    /// Epoch whose view broke.
    pub epoch: u64,
    /// Member ids this member lost contact with.
    pub suspects: Vec<u64>,
}

/// Most blocks a [`Metric`] may describe.
pub(crate) const MAX_METRIC_BLOCKS: usize = 65536;

/// Body of [`MsgType::Metric`]: this member's pipeline stage `[first_block, end_block)` of a
/// pipeline whose block costs are `costs` took `seconds` of compute in its last step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Metric {
    /// Epoch the member runs in (reports of another epoch than the current view's are
    /// ignored).
    pub epoch: u64,
    /// Compute seconds of the stage in the last step (0: nothing measured; ignored).
    pub seconds: f64,
    /// First block of the stage.
    pub first_block: u64,
    /// One past the last block of the stage (equal to `first_block`: no stage; ignored).
    pub end_block: u64,
    /// Cost of every block of the pipeline (at most [`MAX_METRIC_BLOCKS`]).
    pub costs: Vec<f64>,
    /// The member's re-plan threshold (`BRAID_PIPELINE_REPLAN_GAIN`).
    pub gain: f64,
}

impl Metric {
    /// Checks the bounds of a report from the wire: `Ok(Some(blocks))` for a stage to account,
    /// `Ok(None)` for a valid report that says nothing (no time or no blocks), `Err` for one
    /// outside the protocol's bounds.
    pub(crate) fn check(&self) -> std::result::Result<Option<std::ops::Range<usize>>, String> {
        if self.costs.len() > MAX_METRIC_BLOCKS {
            return Err(format!(
                "{} block costs exceed the limit of {MAX_METRIC_BLOCKS}",
                self.costs.len()
            ));
        }
        if let Some((i, c)) = self
            .costs
            .iter()
            .enumerate()
            .find(|(_, c)| !(c.is_finite() && **c >= 0.0))
        {
            return Err(format!(
                "block {i} has cost {c}; costs must be finite and non-negative"
            ));
        }
        if !(self.seconds.is_finite() && self.seconds >= 0.0) {
            return Err(format!(
                "{} seconds is not a finite non-negative time",
                self.seconds
            ));
        }
        if !(self.gain.is_finite() && self.gain > 0.0) {
            return Err(format!(
                "re-plan gain {} is not a positive number",
                self.gain
            ));
        }
        let n = self.costs.len();
        let range = usize::try_from(self.first_block)
            .ok()
            .zip(usize::try_from(self.end_block).ok())
            .filter(|(a, b)| a <= b && *b <= n)
            .map(|(a, b)| a..b)
            .ok_or_else(|| {
                format!(
                    "stage [{}, {}) is not a range within the {n} blocks",
                    self.first_block, self.end_block
                )
            })?;
        if range.is_empty() || self.seconds == 0.0 {
            return Ok(None);
        }
        Ok(Some(range))
    }
}

/// Longest checkpoint directory in a [`CheckpointNote`] (bytes).
pub(crate) const MAX_CHECKPOINT_DIR: usize = 4096;
/// Longest checkpoint id in a [`CheckpointNote`].
pub(crate) const MAX_CHECKPOINT_ID: usize = 48;

/// Body of [`MsgType::Checkpoint`]: a push/pull checkpoint of the member's group is in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CheckpointNote {
    /// Checkpoint id (lowercase hex digits).
    pub id: String,
    /// The directory it was written to.
    pub dir: String,
    /// Its (smallest) version: the round boundary in sync mode.
    pub version: u64,
    /// Its largest part version.
    pub max_version: u64,
    /// Key parts in it.
    pub parts: u64,
    /// Bytes of its server files.
    pub bytes: u64,
}

impl CheckpointNote {
    /// Checks the bounds of a note from the wire.
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        if self.dir.is_empty() || self.dir.len() > MAX_CHECKPOINT_DIR {
            return Err(format!(
                "checkpoint directory of {} bytes (1 to {MAX_CHECKPOINT_DIR})",
                self.dir.len()
            ));
        }
        if self.dir.chars().any(char::is_control) {
            return Err("checkpoint directory with control characters".into());
        }
        if self.id.is_empty()
            || self.id.len() > MAX_CHECKPOINT_ID
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!("invalid checkpoint id {:?}", self.id));
        }
        if self.version > self.max_version {
            return Err(format!(
                "checkpoint version {} above its largest part version {}",
                self.version, self.max_version
            ));
        }
        Ok(())
    }
}

/// Body of [`MsgType::Rejoin`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Rejoin {
    /// Group.
    pub group: String,
    /// The member id assigned at registration.
    pub member_id: u64,
    /// Epoch the member runs in.
    pub epoch: u64,
    /// Random per connection (hex), for the job-token handshake.
    #[serde(default)]
    pub client_nonce: String,
    /// The member applies view deltas (as [`super::Registration::view_deltas`]; a restarted
    /// coordinator learns it here).
    #[serde(default)]
    pub view_deltas: bool,
}

/// Body of [`MsgType::Challenge`]: sent when the coordinator has a job token, and to every
/// rejoin (the member proves its member secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Challenge {
    /// Random per connection (hex).
    pub server_nonce: String,
    /// Whether the coordinator requires the job token ([`Auth::mac`]).
    #[serde(default = "yes")]
    pub token: bool,
}

fn yes() -> bool {
    true
}

/// Body of [`MsgType::Auth`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Auth {
    /// HMAC-SHA256(token, "braid-client" | server nonce | client nonce), hex (empty without a
    /// job token).
    #[serde(default)]
    pub mac: String,
    /// Rejoins: HMAC-SHA256(member secret, "braid-rejoin" | group | id | server nonce |
    /// client nonce), hex.
    #[serde(default)]
    pub member: Option<String>,
}

/// Body of [`MsgType::ReaderReq`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ReaderReq {
    /// Group whose servers the reader reads from.
    pub group: String,
    /// Random per connection (hex), for the job-token handshake.
    #[serde(default)]
    pub client_nonce: String,
}

/// Body of [`MsgType::ReaderGrant`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ReaderGrantMsg {
    /// The reader's id (from the coordinator's member-id counter; never reused).
    pub id: u64,
    /// The group's current view, with its nonce zeroed.
    pub view: View,
    /// `auth::reader_ticket(view key, group, id, epoch)`, hex.
    pub ticket: String,
    /// With a job token: HMAC proving the coordinator knows the token too (hex).
    #[serde(default)]
    pub proof: Option<String>,
}

/// Body of [`MsgType::StatusReq`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub(crate) struct StatusReq {
    /// Random per connection (hex), for the job-token handshake.
    #[serde(default)]
    pub client_nonce: String,
}

/// Body of [`MsgType::ViewReq`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ViewReq {
    /// Group.
    pub group: String,
    /// Random per connection (hex), for the job-token handshake.
    #[serde(default)]
    pub client_nonce: String,
}

/// Body of [`MsgType::Notice`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Notice {
    /// The receiver's member id.
    pub member_id: u64,
    /// Group.
    pub group: String,
    /// New epoch.
    pub epoch: u64,
    /// Members in the new view.
    pub size: usize,
    /// The receiver's rank in it (`None`: not a member any more).
    pub rank: Option<usize>,
}

/// Body of [`MsgType::Failure`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct FailureMsg {
    /// The receiver's member id.
    pub member_id: u64,
    /// Group.
    pub group: String,
    /// Epoch of the view the failed member belongs to.
    pub epoch: u64,
    /// The member declared dead.
    pub failed: u64,
    /// Why (e.g. "failure of 7 (no heartbeat for 10.2 s)").
    pub reason: String,
}

/// Body of [`MsgType::View`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ViewMsg {
    /// The receiver's member id.
    pub member_id: u64,
    /// The view.
    pub view: View,
    /// Why this view was made ("initial", "join of 5,6", "failure of 3: ...", ...).
    #[serde(default)]
    pub reason: String,
}

/// Body of [`MsgType::ViewDelta`]: the view of `epoch` is the view of `base_epoch` (the last
/// view this connection carried) without the members `left`, in the same order, followed by
/// `joined`. A member that does not hold the view of `base_epoch` cannot apply it: it
/// reconnects, and the rejoin brings the whole view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ViewDeltaMsg {
    /// The receiver's member id.
    pub member_id: u64,
    /// Group.
    pub group: String,
    /// The epoch of the view this delta applies to.
    pub base_epoch: u64,
    /// The new view's epoch.
    pub epoch: u64,
    /// The new view's nonce.
    pub nonce: u64,
    /// Ids of the members of the base view that are not in the new one.
    pub left: Vec<u64>,
    /// Members appended after those that stay (joiners, in rank order).
    pub joined: Vec<Member>,
    /// Why this view was made (as in [`ViewMsg::reason`]).
    #[serde(default)]
    pub reason: String,
}

/// Most members a [`ViewDeltaMsg`] may remove (a view never has more members).
const MAX_DELTA_LEFT: usize = 1 << 20;

impl ViewDeltaMsg {
    /// The new view: `base` (which must be the view of `base_epoch` of the same group) less
    /// `left`, then `joined`. Errors (as text) when the base does not match, an id in `left`
    /// is not in the base, or a joined id is already a member.
    pub(crate) fn apply(&self, base: &View) -> std::result::Result<View, String> {
        if base.group != self.group || base.epoch != self.base_epoch {
            return Err(format!(
                "a view delta for group {} epoch {} -> {} does not apply to the view held (group {} epoch {})",
                self.group, self.base_epoch, self.epoch, base.group, base.epoch
            ));
        }
        if self.epoch <= self.base_epoch || self.left.len() > MAX_DELTA_LEFT {
            return Err(format!(
                "a view delta from epoch {} to epoch {} with {} removals is not valid",
                self.base_epoch,
                self.epoch,
                self.left.len()
            ));
        }
        let gone: std::collections::HashSet<u64> = self.left.iter().copied().collect();
        let mut members: Vec<Member> = base
            .members
            .iter()
            .filter(|m| !gone.contains(&m.id))
            .cloned()
            .collect();
        if base.members.len() - members.len() != self.left.len() {
            return Err(format!(
                "a view delta to epoch {} removes members that are not in the view of epoch {}",
                self.epoch, self.base_epoch
            ));
        }
        let stay: std::collections::HashSet<u64> = members.iter().map(|m| m.id).collect();
        let mut seen = std::collections::HashSet::new();
        for m in &self.joined {
            if stay.contains(&m.id) || !seen.insert(m.id) {
                return Err(format!(
                    "a view delta to epoch {} adds member {} twice",
                    self.epoch, m.id
                ));
            }
        }
        members.extend(self.joined.iter().cloned());
        Ok(View {
            group: self.group.clone(),
            epoch: self.epoch,
            nonce: self.nonce,
            members,
        })
    }
}

/// Body of [`MsgType::Error`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ErrorMsg {
    /// Human-readable reason.
    pub message: String,
    /// Machine-readable reason where one applies: "retired" (the member was declared dead or
    /// left; its id is never accepted again), "unknown" (the coordinator has no record of the
    /// group), "auth" (job token refused).
    #[serde(default)]
    pub code: Option<String>,
}

/// Body of [`MsgType::Goodbye`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub(crate) struct Goodbye {}

/// One received frame (magic and length already validated; version not yet).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Frame {
    /// Protocol version of the sender.
    pub version: u16,
    /// Message type number.
    pub ty: u16,
    /// JSON payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// Decodes the JSON payload.
    pub(crate) fn body<T: for<'de> Deserialize<'de>>(&self) -> std::result::Result<T, String> {
        serde_json::from_slice(&self.payload).map_err(|e| e.to_string())
    }
}

/// Why no frame was read.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The peer closed the connection cleanly between frames.
    Closed,
    /// No frame started before the caller's deadline.
    Idle,
    /// A frame started but did not complete within the frame timeout.
    Stalled {
        /// Bytes of the frame received.
        got: usize,
    },
    /// The stop condition became true.
    Stopped,
    /// The connection closed in the middle of a frame.
    Truncated {
        /// Bytes of the frame received.
        got: usize,
        /// Bytes the frame should have had (header only, if the header was incomplete).
        want: usize,
    },
    /// The first four bytes were not the magic.
    BadMagic([u8; 4]),
    /// The length field exceeded the limit (at most [`MAX_PAYLOAD`]; smaller before the
    /// peer proved anything).
    Oversize {
        /// Declared length.
        len: u32,
        /// The limit in force.
        max: usize,
    },
    /// A socket error.
    Io(std::io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Closed => write!(f, "connection closed"),
            FrameError::Idle => write!(f, "no message before the deadline"),
            FrameError::Stalled { got } => {
                write!(f, "frame stalled after {got} bytes (frame timeout)")
            }
            FrameError::Stopped => write!(f, "stopped"),
            FrameError::Truncated { got, want } => {
                write!(
                    f,
                    "connection closed after {got} of {want} bytes of a frame"
                )
            }
            FrameError::BadMagic(m) => write!(
                f,
                "not the braid coordinator protocol (first bytes {:02x?}, expected \"BRDC\")",
                m
            ),
            FrameError::Oversize { len, max } => write!(
                f,
                "frame payload of {len} bytes exceeds the limit of {max} bytes"
            ),
            FrameError::Io(e) => write!(f, "socket error: {e}"),
        }
    }
}

enum Partial {
    Eof(usize),
    Timeout(usize),
    Stopped,
    Io(std::io::Error),
}

/// Where frames are read from: a socket (read in deadline-bounded slices) or, for the fuzz
/// entry points, a byte slice.
pub(crate) trait Wire: Read {
    /// Bounds the next blocking read to `d`.
    fn set_slice(&mut self, d: Duration) -> std::io::Result<()>;
}

impl Wire for TcpStream {
    fn set_slice(&mut self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))
    }
}

impl Wire for &[u8] {
    fn set_slice(&mut self, _d: Duration) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads exactly `buf.len()` bytes, in blocking reads of at most `slice`, until `deadline`
/// (`None`: no deadline) or until `stop()` is true (checked between reads).
fn read_full(
    s: &mut impl Wire,
    buf: &mut [u8],
    deadline: Option<Instant>,
    slice: Duration,
    stop: &dyn Fn() -> bool,
) -> std::result::Result<(), Partial> {
    let mut got = 0;
    while got < buf.len() {
        if stop() {
            return Err(Partial::Stopped);
        }
        let slice = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Partial::Timeout(got));
                }
                left.min(slice)
            }
            None => slice,
        };
        // A zero timeout is refused by set_read_timeout; the slice is never zero here.
        if let Err(e) = s.set_slice(slice.max(Duration::from_millis(1))) {
            return Err(Partial::Io(e));
        }
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(Partial::Eof(got)),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(Partial::Io(e)),
        }
    }
    Ok(())
}

/// Reads one frame. The first byte is awaited until `first_byte_deadline` (`None`: until the
/// peer closes or `stop()`); the rest must arrive within `frame_timeout` of the first byte.
/// `stop()` is checked at least every 100 ms.
pub(crate) fn read_frame(
    s: &mut TcpStream,
    first_byte_deadline: Option<Instant>,
    frame_timeout: Duration,
    stop: &dyn Fn() -> bool,
) -> std::result::Result<Frame, FrameError> {
    read_frame_sliced(s, first_byte_deadline, frame_timeout, POLL_SLICE, stop)
}

/// [`read_frame`] checking `stop()` every `slice` (for long idle waits whose wake-up comes
/// from a socket shutdown rather than from the flag).
pub(crate) fn read_frame_sliced(
    s: &mut TcpStream,
    first_byte_deadline: Option<Instant>,
    frame_timeout: Duration,
    slice: Duration,
    stop: &dyn Fn() -> bool,
) -> std::result::Result<Frame, FrameError> {
    read_frame_with(
        s,
        &Limits {
            first_byte: first_byte_deadline,
            frame_timeout,
            whole: None,
            max_payload: MAX_PAYLOAD,
            slice,
        },
        stop,
    )
}

/// How long and how large one frame may be.
pub(crate) struct Limits {
    /// The first byte must arrive by then (`None`: no deadline).
    pub first_byte: Option<Instant>,
    /// The rest must follow within this time of the first byte...
    pub frame_timeout: Duration,
    /// ...and the whole frame by this instant, if set (the handshake deadline of a connection
    /// that has not proved anything yet: a slow sender cannot stretch it).
    pub whole: Option<Instant>,
    /// Largest accepted payload (at most [`MAX_PAYLOAD`]).
    pub max_payload: usize,
    /// Longest single blocking read.
    pub slice: Duration,
}

/// Limits of a frame from a peer that has not proved anything yet: small, and complete by
/// `deadline`.
pub(crate) fn opening_limits(deadline: Instant, max_payload: usize) -> Limits {
    Limits {
        first_byte: Some(deadline),
        frame_timeout: deadline.saturating_duration_since(Instant::now()),
        whole: Some(deadline),
        max_payload: max_payload.min(MAX_PAYLOAD),
        slice: POLL_SLICE,
    }
}

/// Granularity of payload buffers: a declared length is never allocated up front, the buffer
/// grows by at most this much ahead of the bytes actually received.
const CHUNK: usize = 64 << 10;

/// Reads one frame within `lim`. Nothing sized by the peer is allocated beyond [`CHUNK`]
/// ahead of the bytes it actually sent.
pub(crate) fn read_frame_with(
    s: &mut impl Wire,
    lim: &Limits,
    stop: &dyn Fn() -> bool,
) -> std::result::Result<Frame, FrameError> {
    let mut hdr = [0u8; HEADER_LEN];
    match read_full(s, &mut hdr[..1], lim.first_byte, lim.slice, stop) {
        Ok(()) => {}
        Err(Partial::Eof(_)) => return Err(FrameError::Closed),
        Err(Partial::Timeout(_)) => return Err(FrameError::Idle),
        Err(Partial::Stopped) => return Err(FrameError::Stopped),
        Err(Partial::Io(e)) => return Err(FrameError::Io(e)),
    }
    let now = Instant::now();
    let mut frame_deadline = now.checked_add(lim.frame_timeout).unwrap_or(now);
    if let Some(w) = lim.whole {
        frame_deadline = frame_deadline.min(w);
    }
    let map = |p: Partial, base: usize, want: usize| match p {
        Partial::Eof(got) => FrameError::Truncated {
            got: base + got,
            want,
        },
        Partial::Timeout(got) => FrameError::Stalled { got: base + got },
        Partial::Stopped => FrameError::Stopped,
        Partial::Io(e) => FrameError::Io(e),
    };
    read_full(s, &mut hdr[1..], Some(frame_deadline), lim.slice, stop)
        .map_err(|p| map(p, 1, HEADER_LEN))?;
    let magic = [hdr[0], hdr[1], hdr[2], hdr[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let version = u16::from_be_bytes([hdr[4], hdr[5]]);
    let ty = u16::from_be_bytes([hdr[6], hdr[7]]);
    let len = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    let max = lim.max_payload.min(MAX_PAYLOAD);
    let want = usize::try_from(len).unwrap_or(usize::MAX);
    if want > max {
        return Err(FrameError::Oversize { len, max });
    }
    let mut payload = Vec::with_capacity(want.min(CHUNK));
    while payload.len() < want {
        let start = payload.len();
        payload.resize(start + (want - start).min(CHUNK), 0);
        read_full(
            s,
            &mut payload[start..],
            Some(frame_deadline),
            lim.slice,
            stop,
        )
        .map_err(|p| map(p, HEADER_LEN + start, HEADER_LEN + want))?;
    }
    Ok(Frame {
        version,
        ty,
        payload,
    })
}

/// Encodes a frame with an explicit version (tests use other versions).
pub(crate) fn encode_raw(version: u16, ty: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&version.to_be_bytes());
    v.extend_from_slice(&ty.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Encodes a message of this protocol version.
pub(crate) fn encode<T: Serialize>(ty: MsgType, body: &T) -> crate::error::Result<Vec<u8>> {
    let payload = serde_json::to_vec(body)
        .map_err(|e| crate::error::Error::Internal(format!("encoding {ty:?}: {e}")))?;
    if payload.len() > MAX_PAYLOAD {
        return Err(crate::error::Error::InvalidArgument(format!(
            "{ty:?} message of {} bytes exceeds the protocol limit of {MAX_PAYLOAD} bytes",
            payload.len()
        )));
    }
    Ok(encode_raw(VERSION, ty as u16, &payload))
}

/// An error frame with an optional machine-readable code (never fails: the message is plain
/// text).
pub(crate) fn encode_error_code(message: &str, code: Option<&str>) -> Vec<u8> {
    let body = ErrorMsg {
        message: message.to_string(),
        code: code.map(str::to_string),
    };
    let payload = serde_json::to_vec(&body).unwrap_or_else(|_| b"{\"message\":\"\"}".to_vec());
    encode_raw(VERSION, MsgType::Error as u16, &payload)
}

/// Writes a whole frame with a write deadline (one `write_all`, so frames are never torn
/// by concurrent writers holding the same lock).
pub(crate) fn write_bytes(
    s: &mut TcpStream,
    bytes: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    s.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    s.write_all(bytes)?;
    s.flush()
}

/// Fuzzing entry point: reads frames from `data` as the coordinator reads a connection (at
/// most 64 frames) and decodes each payload as every message body of the protocol (errors
/// are fine, panics are bugs).
#[doc(hidden)]
pub fn fuzz_decode_frame(data: &[u8]) {
    let mut src = data;
    let lim = Limits {
        first_byte: None,
        frame_timeout: Duration::from_secs(3600),
        whole: None,
        max_payload: MAX_PAYLOAD,
        slice: POLL_SLICE,
    };
    let mut last: Option<View> = None;
    for _ in 0..64 {
        let Ok(f) = read_frame_with(&mut src, &lim, &|| false) else {
            return;
        };
        let _ = MsgType::from_u16(f.ty);
        let _ = f.body::<super::Registration>();
        let _ = f.body::<Registered>();
        let _ = f.body::<Heartbeat>();
        let _ = f.body::<Ack>();
        let _ = f.body::<Resync>();
        let _ = f.body::<Metric>().map(|m| m.check());
        let _ = f.body::<CheckpointNote>().map(|c| c.check());
        let _ = f.body::<Rejoin>();
        let _ = f.body::<Challenge>();
        let _ = f.body::<Auth>();
        let _ = f.body::<StatusReq>();
        let _ = f.body::<ViewReq>();
        let _ = f.body::<ReaderReq>();
        let _ = f.body::<ReaderGrantMsg>();
        let _ = f.body::<Notice>();
        let _ = f.body::<FailureMsg>();
        if let Ok(v) = f.body::<ViewMsg>() {
            last = Some(v.view);
        }
        // A delta is applied to the last view decoded, as a member does.
        if let (Ok(d), Some(base)) = (f.body::<ViewDeltaMsg>(), last.as_ref()) {
            if let Ok(next) = d.apply(base) {
                last = Some(next);
            }
        }
        let _ = f.body::<ErrorMsg>();
        let _ = f.body::<Goodbye>();
        let _ = f.body::<serde_json::Value>();
    }
}
