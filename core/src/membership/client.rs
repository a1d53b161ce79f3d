//! The member side: [`rendezvous`] and the [`Client`] connection it leaves open.

use std::collections::{BTreeMap, VecDeque};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::proto::{self, FrameError, MsgType};
use super::{auth, Registration, View, LOG};
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
/// Most pipeline metric reports queued for the membership thread (older ones are dropped).
const MAX_QUEUED_METRICS: usize = 8;

/// Options of a member's coordinator connection.
#[derive(Clone, Default)]
pub struct ClientOptions {
    /// Job token (`BRAID_JOB_TOKEN`) for the HMAC challenge-response; `None`: no token.
    pub token: Option<Vec<u8>>,
    /// Heartbeat interval (`BRAID_HEARTBEAT`); zero: no heartbeats.
    pub heartbeat: Duration,
    /// With heartbeats: the coordinator answers each one; no frame from it for this long
    /// (`BRAID_HEARTBEAT_TIMEOUT`) means this member is cut off (it has presumably been
    /// declared dead): watchers are told and the client reconnects. Zero: not checked.
    pub silence: Duration,
}

/// What a [`Client`] tells its watcher (see [`Client::set_watch`]).
#[derive(Debug)]
pub enum Watch<'a> {
    /// A view was announced (with its reason).
    View(&'a View, &'a str),
    /// No word from the coordinator for the silence timeout, or it refuses this member: this
    /// member is presumably declared dead.
    Isolated(String),
    /// The connection to the coordinator is back (this member was not declared dead).
    Reconnected,
    /// A member of this group's view was declared dead (no heartbeat within its timeout):
    /// its id and the coordinator's reason. Only groups that are not elastic get this; an
    /// elastic group learns it from its next view.
    Failed(u64, &'a str),
}

/// A watcher callback.
pub type WatchFn = Box<dyn Fn(Watch<'_>) + Send + Sync>;

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("token", &self.token.as_ref().map(|_| ".."))
            .field("heartbeat", &self.heartbeat)
            .finish()
    }
}

/// What the member knows of the membership (updated by the client's thread).
#[derive(Debug, Default)]
struct MState {
    /// Epoch this member installed (told by the communicator).
    installed: u64,
    /// Views received with an epoch above the installed one.
    views: BTreeMap<u64, (View, String)>,
    /// The last view received (whole, or rebuilt from a delta): the base of the next delta.
    last: Option<View>,
    /// Notices received (light members): epoch → (size, rank).
    notices: BTreeMap<u64, (usize, Option<usize>)>,
    /// Set when the coordinator retired this member (declared dead, or left).
    expelled: Option<String>,
    /// The last refusal or failure talking to the coordinator.
    coordinator_error: Option<String>,
    /// Whether the connection to the coordinator is up.
    connected: bool,
}

struct Shared {
    addr: String,
    group: String,
    member_id: u64,
    /// The member secret issued at registration (proves this member when it rejoins).
    secret: Option<Vec<u8>>,
    opts: ClientOptions,
    writer: Mutex<Option<TcpStream>>,
    state: Mutex<MState>,
    cv: Condvar,
    stop: AtomicBool,
    watch: Mutex<Option<WatchFn>>,
    /// Encoded frames the membership thread sends on its next round (pipeline metrics: the
    /// caller never waits for the network).
    outbox: Mutex<VecDeque<Vec<u8>>>,
    /// The optional messages the coordinator takes ([`feature_bits`] of its registration
    /// reply; renewed at every reconnection, which may reach another coordinator build).
    features: AtomicU8,
    /// This member registered as applying view deltas (said again when it rejoins).
    view_deltas: bool,
}

/// [`Shared::features`]: pipeline metrics.
const FEAT_METRIC: u8 = 1;
/// [`Shared::features`]: checkpoint notes.
const FEAT_CHECKPOINT: u8 = 2;

/// The feature bits of a coordinator's registration reply.
fn feature_bits(r: &proto::Registered) -> u8 {
    let mut b = 0;
    for f in &r.features {
        match f.as_str() {
            proto::FEATURE_METRIC => b |= FEAT_METRIC,
            proto::FEATURE_CHECKPOINT => b |= FEAT_CHECKPOINT,
            _ => {}
        }
    }
    b
}

fn notify(sh: &Shared, w: Watch<'_>) {
    if let Some(f) = lock(&sh.watch).as_ref() {
        f(w);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// This member's open connection to the coordinator, returned by [`rendezvous`].
///
/// Keep it for as long as the member belongs to the group: the coordinator sees a closed
/// connection as the member leaving. A background thread sends heartbeats, receives view
/// changes, and reconnects (with `Rejoin`) when the connection to the coordinator breaks, e.g.
/// after a coordinator restart. Dropping it sends a polite goodbye (best effort, waiting at
/// most about 200 ms) and closes the connection; it never panics.
pub struct Client {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("coordinator", &self.shared.addr)
            .field("member_id", &self.shared.member_id)
            .field("group", &self.shared.group)
            .finish_non_exhaustive()
    }
}

impl Client {
    #[allow(clippy::too_many_arguments)]
    fn start(
        stream: TcpStream,
        addr: &str,
        group: &str,
        member_id: u64,
        secret: Option<Vec<u8>>,
        opts: ClientOptions,
        installed: u64,
        features: u8,
        view: View,
        view_deltas: bool,
    ) -> Result<Client> {
        let reader = stream
            .try_clone()
            .map_err(|e| Error::System(format!("coordinator connection: {e}")))?;
        let shared = Arc::new(Shared {
            addr: addr.to_string(),
            group: group.to_string(),
            member_id,
            secret,
            opts,
            writer: Mutex::new(Some(stream)),
            state: Mutex::new(MState {
                installed,
                connected: true,
                last: Some(view),
                ..MState::default()
            }),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            watch: Mutex::new(None),
            outbox: Mutex::new(VecDeque::new()),
            features: AtomicU8::new(features),
            view_deltas,
        });
        let sh = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("braid-member".into())
            .spawn(move || member_thread(sh, reader))
            .map_err(|e| Error::System(format!("spawning the membership thread: {e}")))?;
        Ok(Client {
            shared,
            thread: Some(thread),
        })
    }

    /// This member's id.
    pub fn member_id(&self) -> u64 {
        self.shared.member_id
    }

    /// Installs (replaces) the watcher: called on the client's thread for every announced
    /// view and when the coordinator goes silent or comes back. Keep it short.
    pub fn set_watch(&self, f: WatchFn) {
        *lock(&self.shared.watch) = Some(f);
    }

    /// The coordinator address as given to [`rendezvous`].
    pub fn coordinator(&self) -> &str {
        &self.shared.addr
    }

    /// The group joined.
    pub fn group(&self) -> &str {
        &self.shared.group
    }

    /// The local address of the connection to the coordinator (the interface this host uses to
    /// reach it).
    ///
    /// Errors: `Error::System` if the socket is no longer usable.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        match &*lock(&self.shared.writer) {
            Some(s) => s
                .local_addr()
                .map_err(|e| Error::System(format!("coordinator connection: {e}"))),
            None => Err(Error::System("not connected to the coordinator".into())),
        }
    }

    /// Records that this member installed the view of `epoch` and acknowledges it to the
    /// coordinator (views up to that epoch are forgotten).
    pub fn installed(&self, epoch: u64) {
        {
            let mut st = lock(&self.shared.state);
            st.installed = st.installed.max(epoch);
            st.views = st.views.split_off(&(epoch + 1));
        }
        self.send(MsgType::Ack, &proto::Ack { epoch });
    }

    /// The epoch this member installed last.
    pub fn installed_epoch(&self) -> u64 {
        lock(&self.shared.state).installed
    }

    /// The highest epoch announced by the coordinator (the installed one when none is newer).
    pub fn announced_epoch(&self) -> u64 {
        let st = lock(&self.shared.state);
        st.views
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            .max(st.installed)
    }

    /// The announced view of `epoch` and why it was made, if it was received.
    pub fn view_of(&self, epoch: u64) -> Option<(View, String)> {
        lock(&self.shared.state).views.get(&epoch).cloned()
    }

    /// Why the coordinator retired this member, if it did (declared dead, or left). Such a
    /// member can never rejoin with its id.
    pub fn expelled(&self) -> Option<String> {
        lock(&self.shared.state).expelled.clone()
    }

    /// Whether the connection to the coordinator is up, and the last error seen on it.
    pub fn coordinator_state(&self) -> (bool, Option<String>) {
        let st = lock(&self.shared.state);
        (st.connected, st.coordinator_error.clone())
    }

    /// Light members: the last notice received (epoch, size, rank).
    pub fn last_notice(&self) -> Option<(u64, usize, Option<usize>)> {
        lock(&self.shared.state)
            .notices
            .iter()
            .next_back()
            .map(|(e, (s, r))| (*e, *s, *r))
    }

    /// Announces a graceful leave: the next view excludes this member.
    pub fn leave(&self) {
        self.send(MsgType::Leave, &serde_json::json!({}));
    }

    /// Tells the coordinator that the view of `epoch` broke (contact lost with `suspects`)
    /// and the next view is needed.
    pub fn resync(&self, epoch: u64, suspects: Vec<u64>) {
        self.send(MsgType::Resync, &proto::Resync { epoch, suspects });
    }

    /// Reports the compute time of this member's pipeline stage in its last step: blocks
    /// `blocks` of a pipeline whose block costs are `costs` took `seconds`, in the view of
    /// `epoch`; `gain` is this member's re-plan threshold (`BRAID_PIPELINE_REPLAN_GAIN`). The
    /// coordinator smooths the measured throughput of each member and, for elastic groups,
    /// publishes a view with re-weighed members when that is predicted to shorten the slowest
    /// stage by more than the threshold.
    ///
    /// Returns at once: the report is queued and sent by the membership thread within about
    /// 100 ms (when reports pile up faster than that, the oldest queued ones are dropped).
    /// A report with `seconds` 0 or an empty stage is sent but ignored by the coordinator.
    ///
    /// Errors: `InvalidArgument` for more than 65536 blocks, a cost that is negative or not
    /// finite, `seconds` negative or not finite, `gain` not a positive finite number, or
    /// `blocks` not within the costs.
    pub fn report_pipeline_metric(
        &self,
        epoch: u64,
        seconds: f64,
        blocks: std::ops::Range<usize>,
        costs: &[f64],
        gain: f64,
    ) -> Result<()> {
        let to64 = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        let m = proto::Metric {
            epoch,
            seconds,
            first_block: to64(blocks.start),
            end_block: to64(blocks.end),
            costs: costs.to_vec(),
            gain,
        };
        m.check()
            .map_err(|e| Error::InvalidArgument(format!("pipeline metric: {e}")))?;
        if self.shared.features.load(Ordering::SeqCst) & FEAT_METRIC == 0 {
            // An older coordinator would drop this member for an unknown message type.
            return Err(Error::InvalidUsage(format!(
                "the coordinator at {} does not take pipeline metrics (it is older than this \
                 libbraid): throughput-aware re-plans need a coordinator of this braid version",
                self.shared.addr
            )));
        }
        let bytes = proto::encode(MsgType::Metric, &m)?;
        let mut q = lock(&self.shared.outbox);
        while q.len() >= MAX_QUEUED_METRICS {
            q.pop_front();
        }
        q.push_back(bytes);
        Ok(())
    }

    /// Tells the coordinator that a push/pull checkpoint of this member's group is in place
    /// (`braid-coordinator status` shows the last one): checkpoint `id` in directory `dir`, at
    /// version `version` (its smallest part version; `max_version` the largest), `parts` key
    /// parts, `bytes` bytes. Best effort: sent at once on the coordinator connection, lost if
    /// that is down.
    ///
    /// Errors: `InvalidArgument` for a directory longer than 4096 bytes or with control
    /// characters, an id that is not 1 to 48 lowercase hex digits, or `version > max_version`
    /// (nothing is sent).
    pub fn report_checkpoint(
        &self,
        id: &str,
        dir: &str,
        version: u64,
        max_version: u64,
        parts: u64,
        bytes: u64,
    ) -> Result<()> {
        let note = proto::CheckpointNote {
            id: id.to_string(),
            dir: dir.to_string(),
            version,
            max_version,
            parts,
            bytes,
        };
        note.check()
            .map_err(|e| Error::InvalidArgument(format!("checkpoint note: {e}")))?;
        if self.shared.features.load(Ordering::SeqCst) & FEAT_CHECKPOINT == 0 {
            // An older coordinator would drop this member for an unknown message type.
            tracing::debug!(target: LOG, "member {}: the coordinator at {} predates checkpoint notes; not telling it", self.shared.member_id, self.shared.addr);
            return Ok(());
        }
        self.send(MsgType::Checkpoint, &note);
        Ok(())
    }

    /// Waits until the coordinator announced a view with an epoch of at least `min_epoch`
    /// (or retired this member), checking `abort` every 100 ms. Returns the highest announced
    /// epoch.
    ///
    /// Errors: `Error::Timeout` at `deadline` (naming the coordinator and its state),
    /// `Error::Aborted`, `Error::Coordinator` when this member was retired.
    pub fn wait_epoch(&self, min_epoch: u64, deadline: Instant, abort: &AtomicBool) -> Result<u64> {
        let start = Instant::now();
        let mut st = lock(&self.shared.state);
        loop {
            if let Some(why) = &st.expelled {
                return Err(Error::Coordinator(why.clone()));
            }
            let top = st.views.keys().next_back().copied().unwrap_or(0);
            if top >= min_epoch {
                return Ok(top);
            }
            if abort.load(Ordering::SeqCst) {
                return Err(Error::Aborted);
            }
            let now = Instant::now();
            if now >= deadline {
                let coord = if st.connected {
                    "connected".to_string()
                } else {
                    format!(
                        "not connected ({})",
                        st.coordinator_error.as_deref().unwrap_or("reconnecting")
                    )
                };
                return Err(timeout(
                    format!(
                        "waiting for view epoch {min_epoch} of group {} from the coordinator at {} ({coord})",
                        self.shared.group, self.shared.addr
                    ),
                    start,
                ));
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, (deadline - now).min(ABORT_SLICE))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn send<T: serde::Serialize>(&self, ty: MsgType, body: &T) {
        send_on(&self.shared, ty, body);
    }
}

fn send_on<T: serde::Serialize>(sh: &Shared, ty: MsgType, body: &T) {
    let Ok(bytes) = proto::encode(ty, body) else {
        return;
    };
    send_bytes(sh, ty, &bytes);
}

/// Sends an encoded frame of type `ty` (best effort: a failed write shuts the connection
/// down, and the membership thread reconnects).
fn send_bytes(sh: &Shared, ty: MsgType, bytes: &[u8]) {
    let mut w = lock(&sh.writer);
    if let Some(s) = w.as_mut() {
        if let Err(e) = proto::write_bytes(s, bytes, WRITE_TIMEOUT) {
            tracing::debug!(target: LOG, "member {}: sending {ty:?} to the coordinator: {e}", sh.member_id);
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(s) = lock(&self.shared.writer).as_mut() {
            if let Ok(bytes) = proto::encode(MsgType::Goodbye, &proto::Goodbye::default()) {
                let _ = proto::write_bytes(s, &bytes, GOODBYE_TIMEOUT);
            }
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.shared.cv.notify_all();
        if let Some(h) = self.thread.take() {
            let end = Instant::now() + Duration::from_secs(2);
            while !h.is_finished() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(2));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

/// The membership thread: heartbeats, incoming views, reconnection.
fn member_thread(sh: Arc<Shared>, mut reader: TcpStream) {
    let stop = || sh.stop.load(Ordering::SeqCst);
    let hb = sh.opts.heartbeat;
    let mut next_hb = Instant::now() + hb;
    let mut last_rx = Instant::now();
    loop {
        if stop() {
            return;
        }
        let now = Instant::now();
        if !hb.is_zero()
            && !sh.opts.silence.is_zero()
            && now.duration_since(last_rx) > sh.opts.silence
        {
            let msg = format!(
                "no word from the coordinator at {} for {:.1} s: it is stopped, or this member is cut off from it (and presumably declared dead)",
                sh.addr,
                now.duration_since(last_rx).as_secs_f64()
            );
            tracing::warn!(target: LOG, "member {}: {msg}; reconnecting", sh.member_id);
            notify(&sh, Watch::Isolated(msg.clone()));
            {
                let mut st = lock(&sh.state);
                st.connected = false;
                st.coordinator_error = Some(msg);
            }
            if let Some(w) = lock(&sh.writer).take() {
                let _ = w.shutdown(std::net::Shutdown::Both);
            }
            match reconnect(&sh) {
                Some(r) => {
                    reader = r;
                    notify(&sh, Watch::Reconnected);
                }
                None => return,
            }
            last_rx = Instant::now();
            next_hb = Instant::now();
            continue;
        }
        if !hb.is_zero() && now >= next_hb {
            let epoch = lock(&sh.state).installed;
            send_on(&sh, MsgType::Heartbeat, &proto::Heartbeat { epoch });
            next_hb = now + hb;
        }
        let queued: Vec<Vec<u8>> = lock(&sh.outbox).drain(..).collect();
        for bytes in queued {
            send_bytes(&sh, MsgType::Metric, &bytes);
        }
        let until = if hb.is_zero() {
            now + ABORT_SLICE
        } else {
            next_hb.min(now + ABORT_SLICE)
        };
        match proto::read_frame(&mut reader, Some(until), FRAME_TIMEOUT, &stop) {
            Ok(f) => {
                last_rx = Instant::now();
                if !handle_frame(&sh, &f) {
                    return;
                }
            }
            Err(FrameError::Idle) => {}
            Err(FrameError::Stopped) => return,
            Err(e) => {
                if stop() {
                    return;
                }
                tracing::warn!(target: LOG, "member {}: connection to the coordinator at {} lost ({e}); reconnecting",
                    sh.member_id, sh.addr);
                {
                    let mut st = lock(&sh.state);
                    st.connected = false;
                    st.coordinator_error = Some(format!("connection lost: {e}"));
                }
                *lock(&sh.writer) = None;
                match reconnect(&sh) {
                    Some(r) => {
                        reader = r;
                        notify(&sh, Watch::Reconnected);
                    }
                    None => return,
                }
                last_rx = Instant::now();
                next_hb = Instant::now();
            }
        }
    }
}

/// Handles one frame from the coordinator; false: stop the thread (retired).
fn handle_frame(sh: &Shared, f: &proto::Frame) -> bool {
    match MsgType::from_u16(f.ty) {
        Some(MsgType::View) => match f.body::<proto::ViewMsg>() {
            Ok(v) if v.member_id == sh.member_id && v.view.group == sh.group => {
                announce(sh, v.view, v.reason);
            }
            Ok(_) => {
                tracing::warn!(target: LOG, "member {}: ignoring a view addressed to another member", sh.member_id)
            }
            Err(e) => {
                tracing::warn!(target: LOG, "member {}: bad view from the coordinator: {e}", sh.member_id)
            }
        },
        Some(MsgType::ViewDelta) => match f.body::<proto::ViewDeltaMsg>() {
            Ok(d) if d.member_id == sh.member_id && d.group == sh.group => {
                let built = match &lock(&sh.state).last {
                    Some(base) => d.apply(base),
                    None => Err("no view held to apply a view delta to".to_string()),
                };
                match built {
                    Ok(view) => announce(sh, view, d.reason),
                    Err(why) => {
                        // Cannot happen with a coordinator that tracks what it sent; recover
                        // anyway: the rejoin on a new connection brings the whole view.
                        tracing::warn!(target: LOG, "member {}: {why}; reconnecting for the whole view", sh.member_id);
                        if let Some(w) = lock(&sh.writer).as_ref() {
                            let _ = w.shutdown(std::net::Shutdown::Both);
                        }
                    }
                }
            }
            Ok(_) => {
                tracing::warn!(target: LOG, "member {}: ignoring a view delta addressed to another member", sh.member_id)
            }
            Err(e) => {
                tracing::warn!(target: LOG, "member {}: bad view delta from the coordinator: {e}", sh.member_id)
            }
        },
        Some(MsgType::Failure) => match f.body::<proto::FailureMsg>() {
            Ok(m) if m.member_id == sh.member_id && m.group == sh.group => {
                tracing::warn!(target: LOG, "member {}: the coordinator declared member {} of view epoch {} dead: {}",
                    sh.member_id, m.failed, m.epoch, m.reason);
                notify(sh, Watch::Failed(m.failed, &m.reason));
            }
            Ok(_) => {
                tracing::warn!(target: LOG, "member {}: ignoring a failure notice addressed to another member", sh.member_id)
            }
            Err(e) => {
                tracing::warn!(target: LOG, "member {}: bad failure notice from the coordinator: {e}", sh.member_id)
            }
        },
        Some(MsgType::Notice) => {
            if let Ok(n) = f.body::<proto::Notice>() {
                lock(&sh.state).notices.insert(n.epoch, (n.size, n.rank));
                sh.cv.notify_all();
            }
        }
        Some(MsgType::Error) => {
            let m: proto::ErrorMsg = f.body().unwrap_or(proto::ErrorMsg {
                message: "unreadable error".into(),
                code: None,
            });
            let mut st = lock(&sh.state);
            if m.code.as_deref() == Some("retired") {
                tracing::error!(target: LOG, "member {}: {}", sh.member_id, m.message);
                st.expelled = Some(m.message.clone());
                drop(st);
                notify(sh, Watch::Isolated(m.message));
                sh.cv.notify_all();
                return false;
            }
            tracing::warn!(target: LOG, "member {}: coordinator: {}", sh.member_id, m.message);
            st.coordinator_error = Some(m.message);
        }
        _ => {
            tracing::debug!(target: LOG, "member {}: ignoring message type {} from the coordinator", sh.member_id, f.ty);
        }
    }
    true
}

/// A view received (whole or rebuilt from a delta): kept as the base of the next delta, and
/// announced when it is newer than the installed one.
fn announce(sh: &Shared, view: View, reason: String) {
    let mut st = lock(&sh.state);
    if !st.last.as_ref().is_some_and(|l| view.epoch < l.epoch) {
        st.last = Some(view.clone());
    }
    if view.epoch > st.installed {
        tracing::info!(target: LOG, "member {}: view epoch {} announced ({} members; {})",
            sh.member_id, view.epoch, view.members.len(), reason);
        drop(st);
        notify(sh, Watch::View(&view, &reason));
        lock(&sh.state).views.insert(view.epoch, (view, reason));
    } else {
        drop(st);
    }
    sh.cv.notify_all();
}

/// Reconnects and rejoins, retrying with backoff until stopped. `None`: stopped or retired.
fn reconnect(sh: &Shared) -> Option<TcpStream> {
    let mut backoff = Duration::from_millis(50);
    loop {
        // Sleep the backoff in slices, watching the stop flag.
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            if sh.stop.load(Ordering::SeqCst) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
        let deadline = Instant::now() + CONNECT_ATTEMPT;
        // Stopping (the client dropped) interrupts a connect that waits on an unreachable
        // coordinator, so that dropping the client never waits for it.
        let mut stream = match connect(&sh.addr, deadline, &sh.stop, Instant::now()) {
            Ok(s) => s,
            Err(Error::Aborted) => return None,
            Err(_) => continue,
        };
        let _ = stream.set_nodelay(true);
        let (installed, client_nonce) = (lock(&sh.state).installed, super::random_nonce());
        let Ok(first) = proto::encode(
            MsgType::Rejoin,
            &proto::Rejoin {
                group: sh.group.clone(),
                member_id: sh.member_id,
                epoch: installed,
                client_nonce: client_nonce.clone(),
                view_deltas: sh.view_deltas,
            },
        ) else {
            return None;
        };
        let stop = || sh.stop.load(Ordering::SeqCst);
        let member = Rejoining {
            secret: sh.secret.as_deref().unwrap_or(&[]),
            group: &sh.group,
            id: sh.member_id,
        };
        match open(
            &mut stream,
            &first,
            &sh.opts,
            &client_nonce,
            deadline,
            &stop,
            &sh.addr,
            Some(&member),
        ) {
            Ok((f, server_nonce)) => match MsgType::from_u16(f.ty) {
                Some(MsgType::Registered) => {
                    if let Err(e) = check_proof(
                        &f,
                        &sh.opts,
                        &client_nonce,
                        server_nonce.as_deref(),
                        &sh.addr,
                    ) {
                        lock(&sh.state).coordinator_error = Some(e.to_string());
                        continue;
                    }
                    let Ok(writer) = stream.try_clone() else {
                        continue;
                    };
                    let bits = f
                        .body::<proto::Registered>()
                        .map_or(0, |r| feature_bits(&r));
                    sh.features.store(bits, Ordering::SeqCst);
                    *lock(&sh.writer) = Some(writer);
                    {
                        let mut st = lock(&sh.state);
                        st.connected = true;
                        st.coordinator_error = None;
                    }
                    tracing::info!(target: LOG, "member {}: reconnected to the coordinator at {}", sh.member_id, sh.addr);
                    return Some(stream);
                }
                Some(MsgType::Error) => {
                    let m: proto::ErrorMsg = f.body().unwrap_or(proto::ErrorMsg {
                        message: "unreadable error".into(),
                        code: None,
                    });
                    let mut st = lock(&sh.state);
                    if m.code.as_deref() == Some("retired") {
                        tracing::error!(target: LOG, "member {}: {}", sh.member_id, m.message);
                        st.expelled = Some(m.message.clone());
                        drop(st);
                        notify(sh, Watch::Isolated(m.message));
                        sh.cv.notify_all();
                        return None;
                    }
                    if st.coordinator_error.as_deref() != Some(m.message.as_str()) {
                        tracing::error!(target: LOG, "member {}: the coordinator refused to take it back: {}", sh.member_id, m.message);
                    }
                    st.coordinator_error = Some(m.message);
                    backoff = Duration::from_secs(2);
                }
                _ => continue,
            },
            Err(e) => {
                lock(&sh.state).coordinator_error = Some(e.to_string());
            }
        }
    }
}

/// Who a rejoining member is (its proof answers the coordinator's challenge).
struct Rejoining<'a> {
    secret: &'a [u8],
    group: &'a str,
    id: u64,
}

/// Sends the opening message and answers a challenge (job token; for a rejoin, the member
/// secret); returns the first other frame and the server nonce of a job-token challenge (if
/// there was one).
#[allow(clippy::too_many_arguments)]
fn open(
    stream: &mut TcpStream,
    first: &[u8],
    opts: &ClientOptions,
    client_nonce: &str,
    deadline: Instant,
    stop: &dyn Fn() -> bool,
    addr: &str,
    rejoining: Option<&Rejoining<'_>>,
) -> Result<(proto::Frame, Option<String>)> {
    let wt = deadline
        .saturating_duration_since(Instant::now())
        .min(WRITE_TIMEOUT);
    proto::write_bytes(stream, first, wt)
        .map_err(|e| Error::System(format!("sending to the coordinator at {addr}: {e}")))?;
    let mut server_nonce = None;
    loop {
        let f = match proto::read_frame(stream, Some(deadline), FRAME_TIMEOUT, stop) {
            Ok(f) => f,
            Err(FrameError::Stopped) => return Err(Error::Aborted),
            Err(FrameError::Idle) => {
                return Err(Error::Timeout {
                    what: format!("waiting for the coordinator at {addr} to answer"),
                    secs: 0.0,
                })
            }
            Err(FrameError::Closed) => {
                return Err(Error::Coordinator(format!(
                    "the coordinator at {addr} closed the connection"
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
        if f.version == proto::VERSION && MsgType::from_u16(f.ty) == Some(MsgType::Challenge) {
            let ch: proto::Challenge = f.body().map_err(|e| {
                Error::Coordinator(format!(
                    "invalid challenge from the coordinator at {addr}: {e}"
                ))
            })?;
            let mac = match (&opts.token, ch.token) {
                (Some(token), true) => auth::client_mac(token, &ch.server_nonce, client_nonce),
                (None, true) => {
                    return Err(Error::Coordinator(format!(
                        "the coordinator at {addr} requires a job token: set BRAID_JOB_TOKEN"
                    )))
                }
                (_, false) => String::new(),
            };
            let member = rejoining
                .map(|r| auth::rejoin_mac(r.secret, r.group, r.id, &ch.server_nonce, client_nonce));
            let answer = proto::encode(MsgType::Auth, &proto::Auth { mac, member })?;
            proto::write_bytes(stream, &answer, WRITE_TIMEOUT)
                .map_err(|e| Error::System(format!("sending to the coordinator at {addr}: {e}")))?;
            if ch.token {
                server_nonce = Some(ch.server_nonce);
            }
            continue;
        }
        return Ok((f, server_nonce));
    }
}

/// With a token, the coordinator's acknowledgement must prove it knows the token too.
fn check_proof(
    f: &proto::Frame,
    opts: &ClientOptions,
    client_nonce: &str,
    server_nonce: Option<&str>,
    addr: &str,
) -> Result<()> {
    let Some(token) = &opts.token else {
        return Ok(());
    };
    let proof = serde_json::from_slice::<serde_json::Value>(&f.payload)
        .ok()
        .and_then(|v| v.get("proof").and_then(|p| p.as_str()).map(str::to_string));
    match (server_nonce, proof) {
        (Some(sn), Some(p)) if auth::check_server(token, client_nonce, sn, &p) => Ok(()),
        (None, _) => Err(Error::Coordinator(format!(
            "BRAID_JOB_TOKEN is set but the coordinator at {addr} does not ask for it (it runs without a job token)"
        ))),
        _ => Err(Error::Coordinator(format!(
            "the coordinator at {addr} could not prove it knows the job token"
        ))),
    }
}

/// One request/answer exchange with the coordinator at `addr` outside any membership (status,
/// view requests): connects, sends the message `make(client_nonce)` builds, answers a job-token
/// challenge, and returns the body of the answer of type `want` (checking the coordinator's
/// proof). An error frame becomes `Error::Coordinator` with the coordinator's words.
fn ask<T: for<'de> serde::Deserialize<'de>>(
    addr: &str,
    token: Option<&[u8]>,
    timeout_after: Duration,
    make: impl FnOnce(String) -> Result<Vec<u8>>,
    want: MsgType,
    what: &str,
) -> Result<T> {
    let start = Instant::now();
    let deadline = start + timeout_after;
    let never = AtomicBool::new(false);
    let mut stream = connect(addr, deadline, &never, start)?;
    let client_nonce = super::random_nonce();
    let first = make(client_nonce.clone())?;
    let opts = ClientOptions {
        token: token.map(<[u8]>::to_vec),
        heartbeat: Duration::ZERO,
        silence: Duration::ZERO,
    };
    let (f, server_nonce) = open(
        &mut stream,
        &first,
        &opts,
        &client_nonce,
        deadline,
        &|| false,
        addr,
        None,
    )?;
    match MsgType::from_u16(f.ty) {
        Some(t) if t == want => {
            check_proof(&f, &opts, &client_nonce, server_nonce.as_deref(), addr)?;
            f.body().map_err(|e| {
                Error::Coordinator(format!(
                    "invalid {what} from the coordinator at {addr}: {e}"
                ))
            })
        }
        Some(MsgType::Error) => {
            let m: proto::ErrorMsg = f.body().map_err(Error::Coordinator)?;
            Err(Error::Coordinator(m.message))
        }
        _ => Err(Error::Coordinator(format!(
            "unexpected reply type {} from the coordinator at {addr}",
            f.ty
        ))),
    }
}

/// Fetches the current view of `group` from the coordinator at `addr` without joining it.
/// The view's nonce is zero: it keys the view's data connections and goes only to members
/// (push/pull readers use [`fetch_reader_grant`]).
///
/// Errors: as [`coordinator_status`]; `Error::Coordinator` when the group has no view.
pub fn fetch_view(
    addr: &str,
    group: &str,
    token: Option<&[u8]>,
    timeout_after: Duration,
) -> Result<View> {
    let make = |client_nonce| {
        proto::encode(
            MsgType::ViewReq,
            &proto::ViewReq {
                group: group.to_string(),
                client_nonce,
            },
        )
    };
    ask::<proto::ViewMsg>(addr, token, timeout_after, make, MsgType::View, "view").map(|v| v.view)
}

/// What the coordinator grants a push/pull reader: a fresh id, the group's view, and a ticket.
#[derive(Clone, PartialEq)]
pub struct ReaderGrant {
    /// The reader's id: from the coordinator's member-id counter, never reused (a reader
    /// whose view went stale asks for a new grant, with a new id).
    pub id: u64,
    /// The group's view when the grant was made, with `nonce = 0` (readers never learn the
    /// view nonce).
    pub view: View,
    /// `HMAC(view key, "braid-reader" | group | id | epoch)`: the group's push/pull servers
    /// recompute it from their own view to admit this reader; the reader MACs its hello
    /// with it.
    pub ticket: [u8; 32],
}

impl std::fmt::Debug for ReaderGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderGrant")
            .field("id", &self.id)
            .field("group", &self.view.group)
            .field("epoch", &self.view.epoch)
            .field("members", &self.view.members.len())
            .field("ticket", &"..")
            .finish()
    }
}

/// Registers with the coordinator at `addr` in the reader role (not joining the training
/// view: no view change, no heartbeats needed) and returns a grant for the current view of
/// `group`. With a job token the request is authenticated by the same challenge as
/// registrations; without one anyone may get a grant (as anyone may register).
///
/// Errors: as [`coordinator_status`]; `Error::Coordinator` when the group has no view, or the
/// reply is malformed.
pub fn fetch_reader_grant(
    addr: &str,
    group: &str,
    token: Option<&[u8]>,
    timeout_after: Duration,
) -> Result<ReaderGrant> {
    let make = |client_nonce| {
        proto::encode(
            MsgType::ReaderReq,
            &proto::ReaderReq {
                group: group.to_string(),
                client_nonce,
            },
        )
    };
    let g: proto::ReaderGrantMsg = ask(
        addr,
        token,
        timeout_after,
        make,
        MsgType::ReaderGrant,
        "reader grant",
    )?;
    let ticket = super::from_hex(&g.ticket)
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| {
            Error::Coordinator(format!(
                "invalid reader grant from the coordinator at {addr}: bad ticket"
            ))
        })?;
    if g.view.group != group {
        return Err(Error::Coordinator(format!(
            "invalid reader grant from the coordinator at {addr}: view of group {}, asked for {group}",
            g.view.group
        )));
    }
    Ok(ReaderGrant {
        id: g.id,
        view: g.view,
        ticket,
    })
}

/// Asks the coordinator at `addr` for its status (the JSON of [`super::Coordinator::status`]).
///
/// Errors: as [`rendezvous`] (unreachable, refused, token rejected) within `timeout`.
pub fn coordinator_status(
    addr: &str,
    token: Option<&[u8]>,
    timeout_after: Duration,
) -> Result<serde_json::Value> {
    let make = |client_nonce| proto::encode(MsgType::StatusReq, &proto::StatusReq { client_nonce });
    let v: serde_json::Value = ask(
        addr,
        token,
        timeout_after,
        make,
        MsgType::StatusReply,
        "status",
    )?;
    Ok(v.get("status").cloned().unwrap_or(serde_json::Value::Null))
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
    rendezvous_with(addr, reg, &ClientOptions::default(), deadline, abort)
}

/// [`rendezvous`] with options: a job token, and heartbeats sent by the returned client.
///
/// A registration of an elastic group (`reg.elastic`) that arrives while the group runs waits
/// for admission at the next view change (the returned view is the first that contains this
/// member).
///
/// Errors: as [`rendezvous`]; `Error::Coordinator` when the job token is refused or the
/// coordinator cannot prove it knows it.
pub fn rendezvous_with(
    addr: &str,
    reg: &Registration,
    opts: &ClientOptions,
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
    let client_nonce = super::random_nonce();
    let mut reg = reg.clone();
    reg.client_nonce = client_nonce.clone();
    let reg = &reg;
    let register = proto::encode(MsgType::Register, reg)?;
    let mut stream = connect(addr, deadline, abort, start)?;
    let _ = stream.set_nodelay(true);
    tracing::debug!(target: LOG, "connected to the coordinator at {addr}; registering in group {}", reg.group);
    let stop = || abort.load(Ordering::SeqCst);
    let (first, server_nonce) = match open(
        &mut stream,
        &register,
        opts,
        &client_nonce,
        deadline,
        &stop,
        addr,
        None,
    ) {
        Err(Error::Timeout { .. }) => {
            return Err(timeout(
                format!(
                    "waiting for the view of group {} from the coordinator at {addr} (no acknowledgement of the registration)",
                    reg.group
                ),
                start,
            ))
        }
        Err(Error::Coordinator(m)) if m.contains("closed the connection") => {
            return Err(Error::Coordinator(format!(
                "the coordinator at {addr} closed the connection before publishing the view of group {}",
                reg.group
            )))
        }
        other => other?,
    };
    let mut pending = Some(first);
    let mut member_id: Option<u64> = None;
    let mut registered = 0usize;
    let mut joining = false;
    let mut secret: Option<Vec<u8>> = None;
    let mut features = 0u8;
    loop {
        let next = match pending.take() {
            Some(f) => Ok(f),
            None => proto::read_frame(&mut stream, Some(deadline), FRAME_TIMEOUT, &stop),
        };
        let frame = match next {
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
                check_proof(&frame, opts, &client_nonce, server_nonce.as_deref(), addr)?;
                let r: proto::Registered = frame.body().map_err(bad)?;
                joining = r.joining;
                if r.group != reg.group || (r.world_size != reg.world_size && !r.joining) {
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
                secret = r.secret.as_deref().and_then(super::from_hex);
                features = feature_bits(&r);
            }
            Some(MsgType::View) => {
                let v: proto::ViewMsg = frame.body().map_err(bad)?;
                if v.view.rank_of(v.member_id).is_none() && reg.elastic {
                    // A view change of the running group that does not admit us yet.
                    continue;
                }
                check_view(reg, member_id, joining, &v).map_err(bad)?;
                tracing::info!(target: LOG,
                    "group {}: view epoch {} with {} members; this is member {} at rank {:?}",
                    v.view.group, v.view.epoch, v.view.members.len(), v.member_id,
                    v.view.rank_of(v.member_id));
                let client = Client::start(
                    stream,
                    addr,
                    &reg.group,
                    v.member_id,
                    secret,
                    opts.clone(),
                    0,
                    features,
                    v.view.clone(),
                    reg.view_deltas,
                )?;
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
    joining: bool,
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
    if v.view.members.len() != reg.world_size && !reg.elastic {
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
    if !joining && !reg.elastic && reg.rank.is_some_and(|r| r != rank) {
        return Err(format!(
            "requested rank {:?}, view gives rank {rank}",
            reg.rank
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_messages_only_to_coordinators_that_list_them() {
        // A coordinator older than the optional messages sends no `features`: nothing is sent
        // that it would drop the member for.
        let old: proto::Registered =
            serde_json::from_str(r#"{"member_id":1,"group":"g","world_size":2,"registered":1}"#)
                .unwrap();
        assert_eq!(feature_bits(&old), 0);
        let new = proto::Registered {
            features: proto::features(),
            ..old.clone()
        };
        assert_eq!(feature_bits(&new), FEAT_METRIC | FEAT_CHECKPOINT);
        let unknown = proto::Registered {
            features: vec!["from-the-future".into(), proto::FEATURE_METRIC.into()],
            ..old
        };
        assert_eq!(feature_bits(&unknown), FEAT_METRIC);
    }
}
