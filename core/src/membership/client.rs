//! The member side: [`rendezvous`] and the [`Client`] connection it leaves open.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::proto::{self, FrameError, MsgType};
use super::{Registration, View, LOG};
use crate::error::{Error, Result};

/// How often waits look at the abort flag.
const ABORT_SLICE: Duration = Duration::from_millis(100);
/// Longest single connection attempt.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(5);
/// Time allowed for the rest of a frame once it started.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Write deadline for the registration.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Write deadline for the goodbye in `Drop`.
const GOODBYE_TIMEOUT: Duration = Duration::from_millis(200);

/// This member's open connection to the coordinator, returned by [`rendezvous`].
///
/// Keep it for as long as the member belongs to the group: the coordinator sees a closed
/// connection as the member leaving (later versions send heartbeats and view changes over it).
/// Dropping it sends a polite goodbye (best effort, waiting at most about 200 ms) and closes
/// the connection; it never panics.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    coordinator: String,
    member_id: u64,
    group: String,
}

impl Client {
    /// This member's id.
    pub fn member_id(&self) -> u64 {
        self.member_id
    }

    /// The coordinator address as given to [`rendezvous`].
    pub fn coordinator(&self) -> &str {
        &self.coordinator
    }

    /// The group joined.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The local address of the connection to the coordinator (the interface this host uses to
    /// reach it).
    ///
    /// Errors: `Error::System` if the socket is no longer usable.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.stream
            .local_addr()
            .map_err(|e| Error::System(format!("coordinator connection: {e}")))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Ok(bytes) = proto::encode(MsgType::Goodbye, &proto::Goodbye::default()) {
            let _ = proto::write_bytes(&mut self.stream, &bytes, GOODBYE_TIMEOUT);
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

fn timeout(what: String, start: Instant) -> Error {
    Error::Timeout {
        what,
        secs: start.elapsed().as_secs_f64(),
    }
}

/// Connects to `addr`, retrying refused/failed attempts until `deadline`, checking `abort`
/// every 100 ms.
fn connect(addr: &str, deadline: Instant, abort: &AtomicBool, start: Instant) -> Result<TcpStream> {
    let mut backoff = Duration::from_millis(20);
    let mut last_err = String::from("no attempt made before the deadline");
    loop {
        if abort.load(Ordering::SeqCst) {
            return Err(Error::Aborted);
        }
        if Instant::now() >= deadline {
            return Err(timeout(
                format!("connecting to the coordinator at {addr} (last error: {last_err})"),
                start,
            ));
        }
        match addr.to_socket_addrs() {
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                return Err(Error::InvalidArgument(format!(
                    "coordinator address {addr:?}: {e} (expected HOST:PORT)"
                )));
            }
            Err(e) => last_err = format!("cannot resolve: {e}"),
            Ok(targets) => {
                for target in targets {
                    match connect_one(target, deadline, abort)? {
                        Ok(s) => return Ok(s),
                        Err(e) => last_err = e,
                    }
                }
            }
        }
        // Sleep the backoff in abort-checking slices.
        let until = (Instant::now() + backoff).min(deadline);
        while Instant::now() < until {
            if abort.load(Ordering::SeqCst) {
                return Err(Error::Aborted);
            }
            std::thread::sleep(
                until
                    .saturating_duration_since(Instant::now())
                    .min(ABORT_SLICE),
            );
        }
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// One connection attempt, run on a helper thread so that `abort` is seen every 100 ms even
/// while the kernel waits for a SYN answer. Outer `Err`: aborted; inner `Err`: the failure.
fn connect_one(
    target: SocketAddr,
    deadline: Instant,
    abort: &AtomicBool,
) -> Result<std::result::Result<TcpStream, String>> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(Err("deadline passed".into()));
    }
    let limit = left.min(CONNECT_ATTEMPT);
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("braid-connect".into())
        .spawn(move || {
            let _ = tx.send(TcpStream::connect_timeout(&target, limit));
        });
    if let Err(e) = spawned {
        return Ok(Err(format!("cannot start a connect thread: {e}")));
    }
    loop {
        if abort.load(Ordering::SeqCst) {
            return Err(Error::Aborted);
        }
        match rx.recv_timeout(ABORT_SLICE) {
            Ok(Ok(s)) => return Ok(Ok(s)),
            Ok(Err(e)) => return Ok(Err(format!("{target}: {e}"))),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Ok(Err(format!("{target}: connect thread ended")))
            }
        }
    }
}

/// Registers `reg` with the coordinator at `addr` (`host:port`) and waits until the group is
/// complete. Returns the open connection (keep it: dropping it leaves the group), this
/// member's id and the group's view (rank = index of this member in `view.members`).
///
/// A coordinator that is not up yet (connection refused) is retried until `deadline`.
/// `abort` is checked at least every 100 ms.
///
/// Errors:
/// * `Error::Coordinator` with the coordinator's text when it refuses the registration (world
///   size mismatch, rank taken or out of range, group complete, protocol version mismatch), or
///   when its reply is not valid protocol;
/// * `Error::Timeout` naming the address when the coordinator cannot be reached, or the view
///   is not complete, by `deadline`;
/// * `Error::Aborted` when `abort` became true;
/// * `Error::InvalidArgument` for a malformed address or registration;
/// * `Error::System` when the connection fails after it was made.
pub fn rendezvous(
    addr: &str,
    reg: &Registration,
    deadline: Instant,
    abort: &AtomicBool,
) -> Result<(Client, u64, View)> {
    let start = Instant::now();
    if reg.world_size == 0 {
        return Err(Error::InvalidArgument(
            "world size must be at least 1".into(),
        ));
    }
    if let Some(r) = reg.rank {
        if r >= reg.world_size {
            return Err(Error::InvalidArgument(format!(
                "requested rank {r} is not below the world size {}",
                reg.world_size
            )));
        }
    }
    let register = proto::encode(MsgType::Register, reg)?;
    let mut stream = connect(addr, deadline, abort, start)?;
    let _ = stream.set_nodelay(true);
    tracing::debug!(target: LOG, "connected to the coordinator at {addr}; registering in group {}", reg.group);
    let wt = deadline
        .saturating_duration_since(Instant::now())
        .min(WRITE_TIMEOUT);
    proto::write_bytes(&mut stream, &register, wt).map_err(|e| {
        Error::System(format!(
            "sending the registration to the coordinator at {addr}: {e}"
        ))
    })?;

    let stop = || abort.load(Ordering::SeqCst);
    let mut member_id: Option<u64> = None;
    let mut registered = 0usize;
    loop {
        let frame = match proto::read_frame(&mut stream, Some(deadline), FRAME_TIMEOUT, &stop) {
            Ok(f) => f,
            Err(FrameError::Stopped) => return Err(Error::Aborted),
            Err(FrameError::Idle) => {
                let progress = match member_id {
                    Some(id) => format!(
                        "registered as member {id}; {registered} of {} members had registered then",
                        reg.world_size
                    ),
                    None => "no acknowledgement of the registration".to_string(),
                };
                return Err(timeout(
                    format!(
                        "waiting for the view of group {} from the coordinator at {addr} ({progress})",
                        reg.group
                    ),
                    start,
                ));
            }
            Err(FrameError::Closed) => {
                return Err(Error::Coordinator(format!(
                    "the coordinator at {addr} closed the connection before publishing the view of group {}",
                    reg.group
                )))
            }
            Err(FrameError::Io(e)) => {
                return Err(Error::System(format!(
                    "connection to the coordinator at {addr}: {e}"
                )))
            }
            Err(e) => {
                return Err(Error::Coordinator(format!(
                    "invalid reply from the coordinator at {addr}: {e}"
                )))
            }
        };
        let ty = MsgType::from_u16(frame.ty);
        if frame.version != proto::VERSION {
            // An error frame is readable in any version: show the coordinator's own words.
            if ty == Some(MsgType::Error) {
                if let Ok(m) = frame.body::<proto::ErrorMsg>() {
                    return Err(Error::Coordinator(m.message));
                }
            }
            return Err(Error::Coordinator(format!(
                "the coordinator at {addr} speaks protocol v{}, this client speaks v{}",
                frame.version,
                proto::VERSION
            )));
        }
        let bad = |e: String| {
            Error::Coordinator(format!("invalid reply from the coordinator at {addr}: {e}"))
        };
        match ty {
            Some(MsgType::Error) => {
                let m: proto::ErrorMsg = frame.body().map_err(bad)?;
                return Err(Error::Coordinator(m.message));
            }
            Some(MsgType::Registered) => {
                let r: proto::Registered = frame.body().map_err(bad)?;
                if r.group != reg.group || r.world_size != reg.world_size {
                    return Err(bad(format!(
                        "acknowledged group {} of size {}, registered for group {} of size {}",
                        r.group, r.world_size, reg.group, reg.world_size
                    )));
                }
                tracing::debug!(target: LOG,
                    "registered as member {} in group {} ({}/{})",
                    r.member_id, r.group, r.registered, r.world_size);
                member_id = Some(r.member_id);
                registered = r.registered;
            }
            Some(MsgType::View) => {
                let v: proto::ViewMsg = frame.body().map_err(bad)?;
                check_view(reg, member_id, &v).map_err(bad)?;
                tracing::info!(target: LOG,
                    "group {}: view epoch {} with {} members; this is member {} at rank {:?}",
                    v.view.group, v.view.epoch, v.view.members.len(), v.member_id,
                    v.view.rank_of(v.member_id));
                let client = Client {
                    stream,
                    coordinator: addr.to_string(),
                    member_id: v.member_id,
                    group: reg.group.clone(),
                };
                return Ok((client, v.member_id, v.view));
            }
            _ => return Err(bad(format!("unexpected message type {}", frame.ty))),
        }
    }
}

/// Checks a received view against the registration.
fn check_view(
    reg: &Registration,
    acked: Option<u64>,
    v: &proto::ViewMsg,
) -> std::result::Result<(), String> {
    if acked.is_some_and(|id| id != v.member_id) {
        return Err(format!(
            "view addressed to member {}, registered as member {:?}",
            v.member_id, acked
        ));
    }
    if v.view.group != reg.group {
        return Err(format!(
            "view of group {}, expected {}",
            v.view.group, reg.group
        ));
    }
    if v.view.members.len() != reg.world_size {
        return Err(format!(
            "view with {} members, world size {}",
            v.view.members.len(),
            reg.world_size
        ));
    }
    let rank = v
        .view
        .rank_of(v.member_id)
        .ok_or_else(|| format!("view does not contain member {}", v.member_id))?;
    if reg.rank.is_some_and(|r| r != rank) {
        return Err(format!(
            "requested rank {:?}, view gives rank {rank}",
            reg.rank
        ));
    }
    Ok(())
}
