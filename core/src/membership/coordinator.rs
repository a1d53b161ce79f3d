//! The coordinator service: accepts member connections (one thread each), runs rendezvous per
//! group and publishes views.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::proto::{self, Frame, FrameError, MsgType};
use super::{random_u64, Member, Registration, Role, View, LOG};
use crate::error::{Error, Result};

/// Longest accepted group name.
const MAX_GROUP: usize = 256;
/// Longest accepted host id / host name.
const MAX_NAME: usize = 1024;
/// Largest accepted connect handle.
const MAX_HANDLE: usize = 64 << 10;
/// Largest accepted world size.
const MAX_WORLD: usize = 1 << 20;
/// Write deadline for frames sent by the coordinator.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest blocking read of an established member connection (`shutdown` wakes those reads by
/// shutting the sockets down, so this only bounds the wake-ups of idle members).
const IDLE_SLICE: Duration = Duration::from_secs(1);
/// How long `shutdown` waits for its threads.
const JOIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Tunables of a [`Coordinator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorOptions {
    /// How long a new connection may take to send its first message (default 30 s); a
    /// connection that says nothing is dropped afterwards.
    pub handshake_timeout: Duration,
    /// How long the rest of a frame may take once its first byte arrived (default 10 s).
    pub frame_timeout: Duration,
    /// Most connections served at once (default 4096); more are closed at once with a warning.
    pub max_connections: usize,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        CoordinatorOptions {
            handshake_timeout: Duration::from_secs(30),
            frame_timeout: Duration::from_secs(10),
            max_connections: 4096,
        }
    }
}

/// A member's connection as the group sees it.
struct Entry {
    id: u64,
    reg: Registration,
    peer: SocketAddr,
    writer: Arc<Mutex<TcpStream>>,
}

/// One rendezvous namespace.
struct Group {
    world_size: usize,
    /// Registered members, in arrival order (before the view) or rank order (after).
    entries: Vec<Entry>,
    /// The published view, if any.
    view: Option<View>,
}

struct State {
    /// Next member id (one counter for all groups; ids are never reused).
    next_id: u64,
    groups: HashMap<String, Group>,
}

struct Shared {
    opts: CoordinatorOptions,
    state: Mutex<State>,
    stop: AtomicBool,
    /// Open connections (a clone to shut them down at once) and their threads.
    conns: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The coordinator service, running on background threads (an accept thread and one thread per
/// connection). Dropping it shuts it down.
///
/// It can be embedded in any process (like torch's `TCPStore`): `braid-run` embeds one, the
/// torchrun convention has rank 0 host one, and `braid-coordinator` runs one standalone.
pub struct Coordinator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    /// Binds the service to `addr` (`"127.0.0.1:0"` picks a free port; see
    /// [`Coordinator::local_addr`]) and starts serving with default options.
    ///
    /// Errors: `Error::System` when the address cannot be bound or a thread cannot start.
    pub fn bind(addr: &str) -> Result<Coordinator> {
        Coordinator::bind_with(addr, CoordinatorOptions::default())
    }

    /// Like [`Coordinator::bind`] with explicit options.
    ///
    /// Errors: as [`Coordinator::bind`]; `Error::InvalidArgument` for zero timeouts.
    pub fn bind_with(addr: &str, opts: CoordinatorOptions) -> Result<Coordinator> {
        if opts.handshake_timeout.is_zero() || opts.frame_timeout.is_zero() {
            return Err(Error::InvalidArgument(
                "coordinator timeouts must be positive".into(),
            ));
        }
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::System(format!("cannot bind the coordinator to {addr}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::System(format!("coordinator address: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::System(format!("coordinator listener: {e}")))?;
        let shared = Arc::new(Shared {
            opts,
            state: Mutex::new(State {
                next_id: 1,
                groups: HashMap::new(),
            }),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let sh = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("braid-coord-accept".into())
            .spawn(move || accept_loop(listener, sh))
            .map_err(|e| Error::System(format!("cannot start the coordinator thread: {e}")))?;
        tracing::info!(target: LOG, "coordinator listening on {local}");
        Ok(Coordinator {
            addr: local,
            shared,
            accept: Some(accept),
        })
    }

    /// The address the service is bound to (with the port chosen when binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Members currently registered in `group` (for tests).
    #[cfg(test)]
    pub(crate) fn registered(&self, group: &str) -> usize {
        lock(&self.shared.state)
            .groups
            .get(group)
            .map_or(0, |g| g.entries.len())
    }

    /// Stops the service: closes the listener and every connection and joins the threads,
    /// waiting at most about 3 s (threads that do not finish by then are left to finish on
    /// their own). Idempotent; also done by `Drop`.
    pub fn shutdown(&mut self) {
        if self.shared.stop.swap(true, Ordering::SeqCst) && self.accept.is_none() {
            return;
        }
        let deadline = Instant::now() + JOIN_TIMEOUT;
        if let Some(h) = self.accept.take() {
            join_until(h, deadline, "accept");
        }
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        for (s, _) in &conns {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for (_, h) in conns {
            join_until(h, deadline, "connection");
        }
        tracing::info!(target: LOG, "coordinator on {} stopped", self.addr);
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn join_until(h: JoinHandle<()>, deadline: Instant, what: &str) {
    while !h.is_finished() {
        if Instant::now() >= deadline {
            tracing::warn!(target: LOG, "coordinator {what} thread did not stop in time; leaving it");
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = h.join();
}

fn accept_loop(listener: TcpListener, sh: Arc<Shared>) {
    while !sh.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let mut conns = lock(&sh.conns);
                conns.retain(|(_, h)| !h.is_finished());
                if conns.len() >= sh.opts.max_connections {
                    tracing::warn!(target: LOG,
                        "coordinator: refusing connection from {peer}: {} connections open",
                        conns.len());
                    continue;
                }
                let clone = match stream.try_clone() {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(target: LOG, "coordinator: connection from {peer}: {e}");
                        continue;
                    }
                };
                let sh2 = Arc::clone(&sh);
                match std::thread::Builder::new()
                    .name("braid-coord-conn".into())
                    .spawn(move || serve(stream, peer, sh2))
                {
                    Ok(h) => conns.push((clone, h)),
                    Err(e) => {
                        tracing::warn!(target: LOG, "coordinator: no thread for {peer}: {e}")
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(target: LOG, "coordinator: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Sends an error frame (best effort) and logs the refusal.
fn refuse(s: &Mutex<TcpStream>, peer: SocketAddr, message: &str) {
    tracing::info!(target: LOG, "coordinator: refused {peer}: {message}");
    let _ = proto::write_bytes(&mut lock(s), &proto::encode_error(message), WRITE_TIMEOUT);
}

/// Serves one connection until it closes, then shuts the socket down (the service keeps a
/// clone of it until the thread is reaped, so dropping ours would not close it).
fn serve(stream: TcpStream, peer: SocketAddr, sh: Arc<Shared>) {
    let closer = stream.try_clone();
    serve_inner(stream, peer, sh);
    if let Ok(c) = closer {
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
}

fn serve_inner(stream: TcpStream, peer: SocketAddr, sh: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_nonblocking(false);
    let mut reader = match stream.try_clone() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(target: LOG, "coordinator: connection from {peer}: {e}");
            return;
        }
    };
    let writer = Arc::new(Mutex::new(stream));
    let stop = || sh.stop.load(Ordering::SeqCst);

    // 1. The first frame must be a registration, within the handshake timeout.
    let first = read_checked(
        &mut reader,
        &writer,
        peer,
        Some(Instant::now() + sh.opts.handshake_timeout),
        &sh,
    );
    let Some(frame) = first else { return };
    if MsgType::from_u16(frame.ty) != Some(MsgType::Register) {
        tracing::warn!(target: LOG,
            "coordinator: dropping {peer}: first message has type {}, expected a registration",
            frame.ty);
        refuse(
            &writer,
            peer,
            &format!(
                "expected a registration (message type {}), got message type {}",
                MsgType::Register as u16,
                frame.ty
            ),
        );
        return;
    }
    let reg: Registration = match frame.body() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(target: LOG, "coordinator: dropping {peer}: bad registration: {e}");
            refuse(&writer, peer, &format!("malformed registration: {e}"));
            return;
        }
    };
    let (id, group, publish) = match register(&sh, reg, peer, &writer) {
        Ok(x) => x,
        Err(msg) => {
            refuse(&writer, peer, &msg);
            return;
        }
    };
    publish_view(publish);

    // 2. Keep the connection until goodbye or disconnect. (Heartbeats and view changes of
    //    elastic membership will make this a loop over messages.)
    let polite = match proto::read_frame_sliced(
        &mut reader,
        None,
        sh.opts.frame_timeout,
        IDLE_SLICE,
        &stop,
    ) {
        Ok(f) if f.version != proto::VERSION => {
            tracing::warn!(target: LOG,
                "coordinator: member {id} ({peer}) switched to protocol v{}; dropping it",
                f.version);
            false
        }
        Ok(f) => match MsgType::from_u16(f.ty) {
            Some(MsgType::Goodbye) => true,
            Some(MsgType::Register) => {
                refuse(
                    &writer,
                    peer,
                    &format!("this connection is already registered as member {id}"),
                );
                false
            }
            _ => {
                tracing::warn!(target: LOG,
                    "coordinator: member {id} ({peer}) sent unexpected message type {}; dropping it",
                    f.ty);
                false
            }
        },
        Err(FrameError::Closed) | Err(FrameError::Stopped) => false,
        Err(e) => {
            tracing::warn!(target: LOG, "coordinator: member {id} ({peer}): {e}; dropping it");
            false
        }
    };
    depart(&sh, id, &group, peer, polite);
}

/// Reads one frame, handling protocol errors (warning with the peer address, error frame where
/// useful). `None`: the connection is to be closed.
fn read_checked(
    reader: &mut TcpStream,
    writer: &Mutex<TcpStream>,
    peer: SocketAddr,
    deadline: Option<Instant>,
    sh: &Shared,
) -> Option<Frame> {
    let stop = || sh.stop.load(Ordering::SeqCst);
    match proto::read_frame(reader, deadline, sh.opts.frame_timeout, &stop) {
        Ok(f) if f.version != proto::VERSION => {
            let msg = format!(
                "coordinator speaks protocol v{}, client sent v{}",
                proto::VERSION,
                f.version
            );
            tracing::warn!(target: LOG, "coordinator: dropping {peer}: {msg}");
            refuse(writer, peer, &msg);
            None
        }
        Ok(f) => Some(f),
        Err(FrameError::Stopped) => None,
        Err(FrameError::Closed) => {
            tracing::debug!(target: LOG, "coordinator: {peer} closed without registering");
            None
        }
        Err(e @ FrameError::Oversize { .. }) => {
            tracing::warn!(target: LOG, "coordinator: dropping {peer}: {e}");
            refuse(writer, peer, &e.to_string());
            None
        }
        Err(e) => {
            tracing::warn!(target: LOG, "coordinator: dropping {peer}: {e}");
            None
        }
    }
}

fn validate(reg: &Registration) -> std::result::Result<(), String> {
    if reg.group.is_empty() || reg.group.len() > MAX_GROUP {
        return Err(format!("group name must have 1 to {MAX_GROUP} bytes"));
    }
    if reg.world_size == 0 || reg.world_size > MAX_WORLD {
        return Err(format!(
            "world size {} of group {} is not in 1..={MAX_WORLD}",
            reg.world_size, reg.group
        ));
    }
    if let Some(r) = reg.rank {
        if r >= reg.world_size {
            return Err(format!(
                "requested rank {r} is not below the world size {} of group {}",
                reg.world_size, reg.group
            ));
        }
    }
    if reg.host_id.len() > MAX_NAME || reg.hostname.len() > MAX_NAME {
        return Err(format!(
            "host id and host name must have at most {MAX_NAME} bytes"
        ));
    }
    if reg.handle.len() > MAX_HANDLE {
        return Err(format!(
            "connect handle of {} bytes exceeds {MAX_HANDLE} bytes",
            reg.handle.len()
        ));
    }
    if reg.role != Role::Worker {
        return Err(format!(
            "role {} is not supported by this coordinator (only worker)",
            reg.role
        ));
    }
    Ok(())
}

type Publish = Vec<(Arc<Mutex<TcpStream>>, SocketAddr, Vec<u8>)>;

/// Registers a member; on success returns its id, its group and the view frames to send if
/// this registration completed the group. `Err`: the refusal text.
fn register(
    sh: &Shared,
    reg: Registration,
    peer: SocketAddr,
    writer: &Arc<Mutex<TcpStream>>,
) -> std::result::Result<(u64, String, Publish), String> {
    validate(&reg)?;
    let mut st = lock(&sh.state);
    let st = &mut *st;
    let group_name = reg.group.clone();
    if let Some(g) = st.groups.get(&group_name) {
        if let Some(v) = &g.view {
            return Err(format!(
                "group {} is complete ({} members); elastic join is not enabled",
                group_name,
                v.members.len()
            ));
        }
        if g.world_size != reg.world_size {
            return Err(format!(
                "group {} has world size {} (set by its first registration); this registration says {}",
                group_name, g.world_size, reg.world_size
            ));
        }
        if let Some(r) = reg.rank {
            if let Some(other) = g.entries.iter().find(|e| e.reg.rank == Some(r)) {
                return Err(format!(
                    "rank {r} of group {} is already taken by member {} (host {}, pid {})",
                    group_name, other.id, other.reg.hostname, other.reg.pid
                ));
            }
        }
    }
    let id = st.next_id;
    st.next_id += 1;
    let group = st
        .groups
        .entry(group_name.clone())
        .or_insert_with(|| Group {
            world_size: reg.world_size,
            entries: Vec::new(),
            view: None,
        });
    let ack = proto::encode(
        MsgType::Registered,
        &proto::Registered {
            member_id: id,
            group: group_name.clone(),
            world_size: group.world_size,
            registered: group.entries.len() + 1,
        },
    )
    .map_err(|e| e.to_string())?;
    // The acknowledgement is written under the state lock so that it always precedes the view
    // (which may be published by another connection's thread right after the lock is released).
    if let Err(e) = proto::write_bytes(&mut lock(writer), &ack, WRITE_TIMEOUT) {
        tracing::info!(target: LOG,
            "coordinator: member {id} ({peer}) vanished while registering: {e}; id retired");
        if group.entries.is_empty() {
            st.groups.remove(&group_name);
        }
        return Err(format!("acknowledgement failed: {e}"));
    }
    tracing::info!(target: LOG,
        "coordinator: group {group_name}: member {id} registered ({}/{}; host {}, pid {}, rank {}, from {peer})",
        group.entries.len() + 1, group.world_size, reg.hostname, reg.pid,
        reg.rank.map_or("any".to_string(), |r| r.to_string()));
    group.entries.push(Entry {
        id,
        reg,
        peer,
        writer: Arc::clone(writer),
    });
    let mut publish = Vec::new();
    if group.entries.len() == group.world_size {
        let view = complete(&group_name, group);
        for e in &group.entries {
            match proto::encode(
                MsgType::View,
                &proto::ViewMsg {
                    member_id: e.id,
                    view: view.clone(),
                },
            ) {
                Ok(bytes) => publish.push((Arc::clone(&e.writer), e.peer, bytes)),
                Err(err) => {
                    tracing::error!(target: LOG, "coordinator: cannot encode view: {err}")
                }
            }
        }
        tracing::info!(target: LOG,
            "coordinator: group {group_name} complete: view epoch {} with {} members",
            view.epoch, view.members.len());
    }
    Ok((id, group_name, publish))
}

/// Orders the group's entries by rank (requested ranks first, then free positions in arrival
/// order) and makes the epoch-1 view.
fn complete(name: &str, group: &mut Group) -> View {
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
        members: group
            .entries
            .iter()
            .map(|e| Member {
                id: e.id,
                host_id: e.reg.host_id.clone(),
                hostname: e.reg.hostname.clone(),
                pid: e.reg.pid,
                role: e.reg.role,
                handle: e.reg.handle.clone(),
                numa: e.reg.numa,
            })
            .collect(),
    };
    group.view = Some(view.clone());
    view
}

fn publish_view(publish: Publish) {
    for (w, peer, bytes) in publish {
        if let Err(e) = proto::write_bytes(&mut lock(&w), &bytes, WRITE_TIMEOUT) {
            tracing::warn!(target: LOG, "coordinator: cannot send the view to {peer}: {e}");
        }
    }
}

/// A member's connection ended.
fn depart(sh: &Shared, id: u64, group_name: &str, peer: SocketAddr, polite: bool) {
    let mut st = lock(&sh.state);
    let Some(g) = st.groups.get_mut(group_name) else {
        return;
    };
    let how = if polite { "left" } else { "disconnected" };
    match &g.view {
        None => {
            g.entries.retain(|e| e.id != id);
            tracing::info!(target: LOG,
                "coordinator: group {group_name}: member {id} ({peer}) {how} before the view was complete; id retired ({}/{} registered)",
                g.entries.len(), g.world_size);
            if g.entries.is_empty() {
                st.groups.remove(group_name);
            }
        }
        Some(v) => {
            let rank = v.rank_of(id);
            let epoch = v.epoch;
            if polite || sh.stop.load(Ordering::SeqCst) {
                tracing::info!(target: LOG,
                    "coordinator: group {group_name}: member {id} (rank {rank:?}, {peer}) {how} after view epoch {epoch}");
            } else {
                tracing::warn!(target: LOG,
                    "coordinator: group {group_name}: member {id} (rank {rank:?}, {peer}) {how} after view epoch {epoch}");
            }
            g.entries.retain(|e| e.id != id);
            if g.entries.is_empty() {
                tracing::info!(target: LOG,
                    "coordinator: group {group_name}: all members gone; group forgotten");
                st.groups.remove(group_name);
            }
        }
    }
}
