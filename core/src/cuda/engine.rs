//! Per communicator: which engine runs a device call (NCCL or staging), the NCCL communicator's
//! life (created lazily, rebuilt at view changes, aborted on failures), the staging engine.
//!
//! **The decision.** At the first device call, and at the first device call after the
//! communicator's view changed (`update()` adopted a new epoch), every rank contributes a small
//! fixed-size record over the host communicator (`all_gather`): its `BRAID_DEVICE_ENGINE`,
//! whether NCCL can run here (library loaded, a GPU) and why not, the NCCL version, a hash of
//! its host id, its device and the device's PCI bus id. Every rank then computes the same
//! answer from the same records ([`decide`]):
//! - the settings differ: an error on every rank;
//! - `staging`: staging;
//! - NCCL needs every rank able to run it, one NCCL version, and no two ranks on one GPU (NCCL
//!   refuses that); `auto` falls back to staging otherwise, `nccl` is an error naming the ranks
//!   that cannot.
//!
//! The first device call after a view change is therefore collective (as `ncclCommInitRank`
//! is): every rank of the view makes one; later calls follow the usual rules (collectives on
//! all ranks, point-to-point on the ranks involved).
//!
//! **NCCL's life.** With NCCL chosen, rank 0 calls `ncclGetUniqueId` and broadcasts the 128
//! bytes over the host communicator (no extra rendezvous), and every rank calls
//! `ncclCommInitRank`. A watcher thread per NCCL communicator polls the host communicator's
//! failure probe (braid's failure detector removed a rank, the communicator failed or was
//! aborted) and `ncclCommGetAsyncError`; on either it calls `ncclCommAbort` (so work on the
//! streams never hangs: NCCL has no timeouts of its own) and records the error, naming the lost
//! rank where braid knows it, as the sticky [`DeviceSlot::async_error`]. At a view change the
//! old communicator is destroyed (aborted when it had failed) and a new one made for the new
//! view; the communicator's drop ends it the same way.
//!
//! **Per call.** Collectives NCCL has (all_reduce, broadcast, reduce, all_gather,
//! reduce_scatter; data movement of any type as bytes) go to NCCL on the user's stream;
//! all_to_all, gather and scatter run as grouped `ncclSend`/`ncclRecv` (as torch's
//! ProcessGroupNCCL does), point-to-point groups inside `ncclGroupStart`/`End` (NCCL matches
//! them in order per peer: tags are not used), barrier as a 1-element all_reduce on an internal
//! device word. Reductions NCCL cannot do (16-bit integers, bitwise operators, bfloat16 and
//! `avg` before NCCL 2.10), and every call when the engine is staging, go to the [`Stager`]
//! (on a private sub-communicator split from this one).
//!
//! Arguments are checked before anything is enqueued, with the host raw API's messages.
//!
//! NCCL's lifecycle calls sit behind [`NcclBackend`], implemented by the loaded NCCL
//! ([`SystemNccl`]) and, in the tests, by a test double (for the id hand-off and lifecycle
//! only; no data moves through it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::nccl::{self, NcclLib, RawComm, UniqueId, UNIQUE_ID_BYTES};
use super::staging::{self, CudaCopy, Stager};
use super::{driver, DevPtr, DeviceP2p, Stream};
use crate::coll::CollKind;
use crate::comm::{Communicator, FailureProbe, RawColl};
use crate::error::{Error, Result};

#[cfg(test)]
mod tests;

/// How often the watcher polls the failure probe and NCCL's asynchronous error.
const WATCH_POLL: Duration = Duration::from_millis(5);

/// How long the watcher waits for a call in progress on the NCCL communicator before it
/// aborts the communicator under it (the call is then presumably stuck in NCCL, and the abort
/// is what unblocks it).
const ABORT_GRACE: Duration = Duration::from_secs(2);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `BRAID_DEVICE_ENGINE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Setting {
    /// NCCL where every rank can use it, else staging.
    Auto,
    /// NCCL or an error.
    Nccl,
    /// Always staging.
    Staging,
}

impl Setting {
    fn code(self) -> u64 {
        match self {
            Setting::Auto => 0,
            Setting::Nccl => 1,
            Setting::Staging => 2,
        }
    }

    fn name_of(code: u64) -> &'static str {
        match code {
            0 => "auto",
            1 => "nccl",
            2 => "staging",
            _ => "an invalid value",
        }
    }

    /// Parses a value (`None` or empty: auto).
    pub(crate) fn parse(v: Option<&str>) -> Result<Setting> {
        match v.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("auto") => Ok(Setting::Auto),
            Some("nccl") => Ok(Setting::Nccl),
            Some("staging") => Ok(Setting::Staging),
            Some(_) => Err(Error::InvalidArgument(format!(
                "BRAID_DEVICE_ENGINE={:?}: expected auto, nccl or staging",
                v.unwrap_or("")
            ))),
        }
    }
}

/// The engine that runs a communicator's device calls on one view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Engine {
    /// NCCL.
    Nccl,
    /// Staging through pinned host buffers over braid's transports.
    Staging,
}

/// Why a rank cannot run NCCL (record codes).
const CAN: u64 = 0;
const NO_NCCL: u64 = 1;
const NO_GPU: u64 = 2;

/// What a rank can do, for the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Capability {
    /// `Ok(NCCL version)`, or why NCCL cannot run here (`NO_NCCL` / `NO_GPU`, the message).
    pub nccl: std::result::Result<i32, (u64, String)>,
    /// The device ordinal this rank uses.
    pub device: i32,
    /// Its PCI bus id ("" when unknown).
    pub pci_bus_id: String,
}

/// A communicator of an [`NcclBackend`] (the `ncclComm_t` as an integer for the real one).
pub(crate) type Token = usize;

/// NCCL's lifecycle, as the engine uses it: the decision's inputs, the unique id, init, abort,
/// destroy, the asynchronous error. [`SystemNccl`] is the loaded library; the tests use a
/// double (id hand-off and lifecycle only).
pub(crate) trait NcclBackend: Send + Sync {
    /// Whether this rank can run NCCL, and on which GPU.
    fn capability(&self) -> Capability;
    /// `ncclGetUniqueId`.
    fn unique_id(&self) -> Result<UniqueId>;
    /// `ncclCommInitRank` on `device`.
    fn init_rank(&self, nranks: usize, id: &UniqueId, rank: usize, device: i32) -> Result<Token>;
    /// `ncclCommAbort` (the token is gone afterwards).
    fn abort(&self, c: Token) -> Result<()>;
    /// `ncclCommDestroy` (the token is gone afterwards).
    fn destroy(&self, c: Token) -> Result<()>;
    /// `ncclCommGetAsyncError`: `Ok(Some(text))` once the communicator failed.
    fn async_error(&self, c: Token) -> Result<Option<String>>;
    /// The library that runs the data calls (`None`: a test double, which moves no data).
    fn lib(&self) -> Option<&'static NcclLib>;
}

/// The loaded NCCL and the CUDA driver.
pub(crate) struct SystemNccl;

impl NcclBackend for SystemNccl {
    fn capability(&self) -> Capability {
        let drv = match driver::driver() {
            Ok(d) => d,
            Err(e) => {
                return Capability {
                    nccl: Err((NO_GPU, e.to_string())),
                    device: -1,
                    pci_bus_id: String::new(),
                }
            }
        };
        let device = match drv.selected_device() {
            Ok(d) => d,
            Err(e) => {
                return Capability {
                    nccl: Err((NO_GPU, e.to_string())),
                    device: -1,
                    pci_bus_id: String::new(),
                }
            }
        };
        let pci_bus_id = drv
            .devices()
            .ok()
            .and_then(|ds| ds.into_iter().find(|d| d.ordinal == device))
            .map(|d| d.pci_bus_id)
            .unwrap_or_default();
        let nccl = match nccl::library() {
            Ok(l) => Ok(l.version()),
            Err(e) => Err((NO_NCCL, e.to_string())),
        };
        Capability {
            nccl,
            device,
            pci_bus_id,
        }
    }

    fn unique_id(&self) -> Result<UniqueId> {
        nccl::library()?.unique_id()
    }

    fn init_rank(&self, nranks: usize, id: &UniqueId, rank: usize, device: i32) -> Result<Token> {
        Ok(nccl::library()?.comm_init_rank(nranks, id, rank, device)? as Token)
    }

    fn abort(&self, c: Token) -> Result<()> {
        // SAFETY: tokens come from init_rank and are ended once (CommCell::end).
        unsafe { nccl::library()?.comm_abort(c as RawComm) }
    }

    fn destroy(&self, c: Token) -> Result<()> {
        // SAFETY: as for abort.
        unsafe { nccl::library()?.comm_destroy(c as RawComm) }
    }

    fn async_error(&self, c: Token) -> Result<Option<String>> {
        // SAFETY: called only while the token is live (under CommCell's lock, before its end).
        unsafe { nccl::library()?.async_error(c as RawComm) }
    }

    fn lib(&self) -> Option<&'static NcclLib> {
        nccl::library().ok()
    }
}

// ---- the decision --------------------------------------------------------------------------

/// Words of one rank's record.
pub(crate) const RECORD_WORDS: usize = 12;
const MAGIC: u64 = 0x6272_6169_6465_7601; // "braidev" 1
const PCI_WORDS: usize = 4;

/// One rank's contribution to the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    /// `Setting::code`, or 255 for a value that did not parse.
    pub setting: u64,
    /// `CAN`, `NO_NCCL` or `NO_GPU`.
    pub why: u64,
    /// NCCL version (0 when none).
    pub version: u64,
    /// FNV-1a of the host id.
    pub host: u64,
    /// Device ordinal.
    pub device: i64,
    /// PCI bus id (at most 32 bytes).
    pub pci: String,
}

impl Record {
    pub(crate) fn new(setting: Option<Setting>, cap: &Capability, host_id: &str) -> Record {
        let (why, version) = match &cap.nccl {
            Ok(v) => (CAN, u64::try_from(*v).unwrap_or(0)),
            Err((w, _)) => (*w, 0),
        };
        Record {
            setting: setting.map_or(255, Setting::code),
            why,
            version,
            host: fnv1a(host_id.as_bytes()),
            device: i64::from(cap.device),
            pci: cap.pci_bus_id.chars().take(PCI_WORDS * 8).collect(),
        }
    }

    pub(crate) fn to_words(&self) -> [u64; RECORD_WORDS] {
        let mut w = [0u64; RECORD_WORDS];
        w[0] = MAGIC;
        w[1] = self.setting;
        w[2] = self.why;
        w[3] = self.version;
        w[4] = self.host;
        w[5] = self.device as u64;
        let mut pci = [0u8; PCI_WORDS * 8];
        let b = self.pci.as_bytes();
        let n = b.len().min(pci.len());
        pci[..n].copy_from_slice(&b[..n]);
        for (i, c) in pci.chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            w[6 + i] = u64::from_le_bytes(a);
        }
        w
    }

    pub(crate) fn from_words(w: &[u64]) -> Result<Record> {
        if w.len() != RECORD_WORDS || w[0] != MAGIC {
            return Err(Error::Internal(
                "device engine decision: a malformed record (ranks of different braid versions?)"
                    .into(),
            ));
        }
        let mut pci = Vec::with_capacity(PCI_WORDS * 8);
        for x in &w[6..6 + PCI_WORDS] {
            pci.extend_from_slice(&x.to_le_bytes());
        }
        while pci.last() == Some(&0) {
            pci.pop();
        }
        Ok(Record {
            setting: w[1],
            why: w[2],
            version: w[3],
            host: w[4],
            device: w[5] as i64,
            pci: String::from_utf8_lossy(&pci).into_owned(),
        })
    }
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The engine of a view from every rank's record (rank = index): the same answer on every
/// rank, since every rank decides from the same records.
///
/// Errors: [`Error::InvalidUsage`] when the settings differ or `nccl` is forced and NCCL
/// cannot run (naming the ranks and why); [`Error::InvalidArgument`] for a setting that did
/// not parse (naming the rank).
pub(crate) fn decide(recs: &[Record]) -> Result<Engine> {
    let Some(first) = recs.first() else {
        return Err(Error::Internal(
            "device engine decision without ranks".into(),
        ));
    };
    if let Some((r, _)) = recs.iter().enumerate().find(|(_, x)| x.setting == 255) {
        return Err(Error::InvalidArgument(format!(
            "BRAID_DEVICE_ENGINE on rank {r} is not auto, nccl or staging"
        )));
    }
    if recs.iter().any(|x| x.setting != first.setting) {
        let list: Vec<String> = recs
            .iter()
            .enumerate()
            .map(|(r, x)| format!("rank {r}: {}", Setting::name_of(x.setting)))
            .collect();
        return Err(Error::InvalidUsage(format!(
            "BRAID_DEVICE_ENGINE differs between ranks ({}); it must be equal on all ranks",
            list.join(", ")
        )));
    }
    let setting = match first.setting {
        0 => Setting::Auto,
        1 => Setting::Nccl,
        _ => Setting::Staging,
    };
    if setting == Setting::Staging {
        return Ok(Engine::Staging);
    }
    // Why each rank cannot take part in an NCCL communicator.
    let mut cannot: Vec<String> = Vec::new();
    for (r, x) in recs.iter().enumerate() {
        match x.why {
            CAN => {}
            NO_NCCL => cannot.push(format!("rank {r} (NCCL not loaded there)")),
            _ => cannot.push(format!("rank {r} (no usable CUDA device there)")),
        }
    }
    for (r, x) in recs.iter().enumerate() {
        if x.why != CAN || x.pci.is_empty() {
            continue;
        }
        let others: Vec<String> = recs
            .iter()
            .enumerate()
            .filter(|(q, y)| *q != r && y.why == CAN && y.host == x.host && y.pci == x.pci)
            .map(|(q, _)| q.to_string())
            .collect();
        if !others.is_empty() {
            cannot.push(format!(
                "rank {r} (shares GPU {} with rank {}; NCCL needs one GPU per rank)",
                x.pci,
                others.join(", ")
            ));
        }
    }
    if cannot.is_empty() {
        let versions: std::collections::BTreeSet<u64> = recs.iter().map(|x| x.version).collect();
        if versions.len() > 1 {
            let list: Vec<String> = recs
                .iter()
                .enumerate()
                .map(|(r, x)| format!("rank {r}: {}", nccl::version_string(x.version as i32)))
                .collect();
            cannot.push(format!(
                "the ranks load different NCCL versions ({})",
                list.join(", ")
            ));
        }
    }
    if cannot.is_empty() {
        return Ok(Engine::Nccl);
    }
    match setting {
        Setting::Nccl => Err(Error::InvalidUsage(format!(
            "BRAID_DEVICE_ENGINE=nccl, but NCCL cannot run on {}",
            cannot.join(", ")
        ))),
        _ => {
            tracing::info!(target: "braid::cuda", "device calls use the staging engine: NCCL cannot run on {}", cannot.join(", "));
            Ok(Engine::Staging)
        }
    }
}

// ---- the NCCL communicator and its watcher -------------------------------------------------

/// The first error of a generation (sticky).
#[derive(Default)]
struct ErrCell(Mutex<Option<Error>>);

impl ErrCell {
    fn set(&self, e: Error) {
        let mut g = lock(&self.0);
        if g.is_none() {
            *g = Some(e);
        }
    }

    fn get(&self) -> Option<Error> {
        lock(&self.0).clone()
    }
}

/// One NCCL communicator, shared by the calling thread and the watcher; ended exactly once.
struct CommCell {
    backend: Arc<dyn NcclBackend>,
    token: Token,
    /// Held by calls on the communicator (the watcher takes it to poll and to end it).
    busy: Mutex<()>,
    /// Aborted or destroyed (no call may use the token any more).
    ended: AtomicBool,
}

impl CommCell {
    /// Runs `f` on the live communicator; `Err(why)` once it ended.
    fn with<R>(&self, why: impl Fn() -> Error, f: impl FnOnce(Token) -> Result<R>) -> Result<R> {
        let _g = lock(&self.busy);
        if self.ended.load(Ordering::SeqCst) {
            return Err(why());
        }
        f(self.token)
    }

    /// Aborts or destroys the communicator unless that was done already. The caller holds
    /// `busy`, or gave up waiting for it (a call stuck in NCCL, which the abort unblocks).
    fn end(&self, abort: bool) {
        if self.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        let r = if abort {
            self.backend.abort(self.token)
        } else {
            self.backend.destroy(self.token)
        };
        if let Err(e) = r {
            tracing::warn!(target: "braid::cuda", "ending the NCCL communicator: {e}");
        }
    }

    /// Ends it from the calling (user) thread: no call is in progress.
    fn end_now(&self, abort: bool) {
        let _g = lock(&self.busy);
        self.end(abort);
    }
}

struct Watcher {
    stop: mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    fn start(cell: Arc<CommCell>, probe: FailureProbe, err: Arc<ErrCell>) -> Result<Watcher> {
        let (stop, rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("braid-nccl-watch".into())
            .spawn(move || watch(&cell, &*probe, &err, &rx))
            .map_err(|e| Error::System(format!("starting the NCCL watcher thread: {e}")))?;
        Ok(Watcher {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop();
    }
}

fn watch(
    cell: &CommCell,
    probe: &(dyn Fn() -> Option<Error> + Send + Sync),
    err: &ErrCell,
    rx: &mpsc::Receiver<()>,
) {
    loop {
        match rx.recv_timeout(WATCH_POLL) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        if cell.ended.load(Ordering::SeqCst) {
            return;
        }
        let mut failure = probe();
        if failure.is_none() {
            // Polled only when no call is in progress (the token is live under the lock).
            if let Ok(_g) = cell.busy.try_lock() {
                if !cell.ended.load(Ordering::SeqCst) {
                    match cell.backend.async_error(cell.token) {
                        Ok(None) => {}
                        Ok(Some(msg)) => {
                            // braid's detector may know who went: prefer its error.
                            failure = Some(probe().unwrap_or_else(|| {
                                Error::System(format!("NCCL communicator failed: {msg}"))
                            }));
                        }
                        Err(e) => failure = Some(e),
                    }
                }
            }
        }
        let Some(e) = failure else { continue };
        tracing::warn!(target: "braid::cuda", "aborting the NCCL communicator: {e}");
        err.set(e);
        // Wait a little for a call in progress; past that it is stuck in NCCL: abort under it.
        let until = Instant::now() + ABORT_GRACE;
        loop {
            if let Ok(_g) = cell.busy.try_lock() {
                cell.end(true);
                return;
            }
            if Instant::now() >= until {
                cell.end(true);
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

struct NcclRun {
    cell: Arc<CommCell>,
    watcher: Watcher,
    /// The host communicator's failure probe of this view.
    probe: FailureProbe,
    version: i32,
}

/// The engines of one view.
struct Generation {
    epoch: u64,
    rank: usize,
    size: usize,
    engine: Engine,
    device: i32,
    nccl: Option<NcclRun>,
    stager: Option<Stager>,
    /// A device word for barriers on NCCL.
    scratch: Option<driver::DeviceAlloc>,
    err: Arc<ErrCell>,
}

impl Generation {
    /// Ends the engines: the watcher, then the NCCL communicator (destroyed, or aborted when it
    /// failed or the host communicator reports a failure), then the staging engine.
    fn end(mut self) {
        if let Some(mut run) = self.nccl.take() {
            run.watcher.stop();
            let failed = self.err.get().is_some() || (run.probe)().is_some();
            run.cell.end_now(failed);
        }
        drop(self.stager.take());
        drop(self.scratch.take());
    }
}

// ---- the slot -----------------------------------------------------------------------------

#[derive(Default)]
struct SlotState {
    /// `None`: the loaded NCCL ([`SystemNccl`]).
    backend: Option<Arc<dyn NcclBackend>>,
    /// `None`: `BRAID_DEVICE_ENGINE`.
    setting: Option<Setting>,
    gen: Option<Generation>,
}

/// The device engines of one communicator.
#[derive(Default)]
pub(crate) struct DeviceSlot {
    state: Mutex<SlotState>,
    /// The current generation's sticky error (readable while a call holds `state`).
    err: Mutex<Option<Arc<ErrCell>>>,
}

impl DeviceSlot {
    /// Enqueues a device collective on `stream`.
    pub(crate) fn coll(
        &self,
        comm: &Communicator,
        c: RawColl,
        send: DevPtr,
        recv: DevPtr,
        stream: Stream,
    ) -> Result<()> {
        driver::driver()?;
        check_coll(comm.rank(), comm.size(), &c, send, recv)?;
        let mut st = lock(&self.state);
        self.prepare_locked(&mut st, comm)?;
        let Some(g) = st.gen.as_mut() else {
            return Err(Error::Internal("device engine not prepared".into()));
        };
        if let Some(e) = g.err.get() {
            return Err(e);
        }
        let nccl_version = g.nccl.as_ref().map(|r| r.version);
        match nccl_version {
            Some(v) if nccl_can(&c, v) => {
                if c.kind == CollKind::AllToAll && send == recv && c.count > 0 && g.size > 1 {
                    return Err(Error::InvalidArgument(
                        "all_to_all: in place (send == recv) is not supported on device buffers with the NCCL engine".into(),
                    ));
                }
                let r = nccl_coll(g, &c, send, recv, stream);
                record_if_sticky(&g.err, &r);
                r
            }
            _ => {
                let stager = stager_of(g, comm)?;
                // SAFETY: the caller of coll_device_raw guarantees the buffers and stream.
                unsafe { stager.coll(c, send, recv, stream) }
            }
        }
    }

    /// Enqueues a group of device point-to-point operations on `stream`.
    pub(crate) fn p2p(&self, comm: &Communicator, ops: &[DeviceP2p], stream: Stream) -> Result<()> {
        driver::driver()?;
        check_p2p(comm.rank(), comm.size(), ops, true)?;
        let mut st = lock(&self.state);
        self.prepare_locked(&mut st, comm)?;
        let Some(g) = st.gen.as_mut() else {
            return Err(Error::Internal("device engine not prepared".into()));
        };
        if let Some(e) = g.err.get() {
            return Err(e);
        }
        if g.nccl.is_none() {
            // Staging runs on braid's transports: no send to self.
            check_p2p(comm.rank(), comm.size(), ops, false)?;
        }
        if ops.is_empty() {
            return Ok(());
        }
        if g.nccl.is_some() {
            let r = nccl_p2p(g, ops, stream);
            record_if_sticky(&g.err, &r);
            return r;
        }
        let stager = stager_of(g, comm)?;
        // SAFETY: the caller of p2p_device_raw guarantees the buffers and stream.
        unsafe { stager.p2p(ops, stream) }
    }

    /// "nccl" or "staging": the engine of the current generation, once a device call chose
    /// it (None before, or while a call holds the slot).
    pub(crate) fn engine_name(&self) -> Option<String> {
        let st = self.state.try_lock().ok()?;
        st.gen.as_ref().map(|g| {
            match g.engine {
                Engine::Nccl => "nccl",
                Engine::Staging => "staging",
            }
            .to_string()
        })
    }

    /// The sticky asynchronous error of device calls (NCCL's, the watcher's, the staging
    /// engine's).
    pub(crate) fn async_error(&self) -> Option<Error> {
        if let Some(e) = lock(&self.err).as_ref().and_then(|c| c.get()) {
            return Some(e);
        }
        // The staging engine's, unless a call is in progress (it reports it itself).
        let st = self.state.try_lock().ok()?;
        st.gen.as_ref()?.stager.as_ref()?.error()
    }

    /// Ends the engines (communicator dropped): the NCCL communicator is destroyed (aborted
    /// when it failed), the staging engine stopped.
    pub(crate) fn shutdown(&self) {
        let g = lock(&self.state).gen.take();
        if let Some(g) = g {
            g.end();
        }
    }

    /// Test hook: NCCL's role played by `backend`, and the engine setting.
    #[cfg(test)]
    pub(crate) fn use_backend(&self, backend: Arc<dyn NcclBackend>, setting: Option<Setting>) {
        let mut st = lock(&self.state);
        st.backend = Some(backend);
        st.setting = setting;
    }

    /// Makes the engines of the communicator's current view (collective at the first device
    /// call of a view: see the module documentation) and returns the engine. (The tests call
    /// it, and [`Communicator::prepare_device`].)
    pub(crate) fn prepare(&self, comm: &Communicator) -> Result<Engine> {
        let mut st = lock(&self.state);
        self.prepare_locked(&mut st, comm)
    }

    fn prepare_locked(&self, st: &mut SlotState, comm: &Communicator) -> Result<Engine> {
        let (epoch, rank, size) = (comm.view().epoch, comm.rank(), comm.size());
        if let Some(g) = &st.gen {
            if g.epoch == epoch && g.rank == rank && g.size == size {
                return Ok(g.engine);
            }
        }
        // A new view: end the old engines first.
        if let Some(old) = st.gen.take() {
            tracing::info!(target: "braid::cuda", "view epoch {} -> {epoch}: rebuilding the device engines", old.epoch);
            old.end();
            *lock(&self.err) = None;
        }
        let backend: Arc<dyn NcclBackend> = match &st.backend {
            Some(b) => b.clone(),
            None => Arc::new(SystemNccl),
        };
        let setting = match st.setting {
            Some(s) => Some(s),
            None => Setting::parse(crate::config::var("BRAID_DEVICE_ENGINE").as_deref()).ok(),
        };
        let cap = backend.capability();
        let host_id = comm
            .view()
            .members
            .get(rank)
            .map(|m| m.host_id.clone())
            .unwrap_or_default();
        let mine = Record::new(setting, &cap, &host_id).to_words();
        let mut all = vec![0u64; RECORD_WORDS * size];
        comm.all_gather(&mine, &mut all)?;
        let recs = all
            .chunks_exact(RECORD_WORDS)
            .map(Record::from_words)
            .collect::<Result<Vec<_>>>()?;
        let engine = decide(&recs).map_err(|e| match (&e, &cap.nccl) {
            (Error::InvalidUsage(m), Err((_, why))) => {
                Error::InvalidUsage(format!("{m}; on this rank ({rank}): {why}"))
            }
            _ => e,
        })?;
        let err = Arc::new(ErrCell::default());
        let mut gen = Generation {
            epoch,
            rank,
            size,
            engine,
            device: cap.device,
            nccl: None,
            stager: None,
            scratch: None,
            err: err.clone(),
        };
        if engine == Engine::Nccl {
            let id = hand_out_id(comm, &*backend)?;
            let token = backend.init_rank(size, &id, rank, cap.device)?;
            let cell = Arc::new(CommCell {
                backend: backend.clone(),
                token,
                busy: Mutex::new(()),
                ended: AtomicBool::new(false),
            });
            let probe = comm.failure_probe();
            let watcher = match Watcher::start(cell.clone(), probe.clone(), err.clone()) {
                Ok(w) => w,
                Err(e) => {
                    cell.end_now(true);
                    return Err(e);
                }
            };
            if backend.lib().is_some() {
                // The barrier's device word, made now (cuMemAlloc may synchronise the device:
                // not on the barrier's path).
                gen.scratch = driver::DeviceAlloc::new(8, Some(cap.device)).ok();
            }
            gen.nccl = Some(NcclRun {
                cell,
                watcher,
                probe,
                version: cap.nccl.as_ref().copied().unwrap_or(0),
            });
            tracing::info!(target: "braid::cuda", "rank {rank} of {size}: NCCL communicator on device {} (view epoch {epoch})", cap.device);
        }
        *lock(&self.err) = Some(err);
        st.gen = Some(gen);
        Ok(engine)
    }
}

/// Rank 0 makes the unique id and broadcasts it over the host communicator (a status byte
/// first, so a failure on rank 0 is an error on every rank instead of a hang).
fn hand_out_id(comm: &Communicator, backend: &dyn NcclBackend) -> Result<UniqueId> {
    let mut buf = [0u8; 1 + UNIQUE_ID_BYTES];
    let mut local = None;
    if comm.rank() == 0 {
        match backend.unique_id() {
            Ok(id) => {
                buf[0] = 1;
                buf[1..].copy_from_slice(&id.internal);
            }
            Err(e) => local = Some(e),
        }
    }
    comm.broadcast(&mut buf, 0)?;
    if let Some(e) = local {
        return Err(e);
    }
    if buf[0] != 1 {
        return Err(Error::Remote {
            rank: 0,
            host: comm
                .view()
                .members
                .first()
                .map(|m| m.hostname.clone())
                .unwrap_or_default(),
            detail: "ncclGetUniqueId failed there".into(),
        });
    }
    let mut id = UniqueId {
        internal: [0; UNIQUE_ID_BYTES],
    };
    id.internal.copy_from_slice(&buf[1..]);
    Ok(id)
}

fn record_if_sticky(err: &ErrCell, r: &Result<()>) {
    if let Err(e) = r {
        if !matches!(e, Error::InvalidArgument(_) | Error::InvalidUsage(_)) {
            err.set(e.clone());
        }
    }
}

fn stager_of<'g>(g: &'g mut Generation, comm: &Communicator) -> Result<&'g Stager> {
    if g.stager.is_none() {
        let chunk = staging::chunk_bytes_from_env()?;
        let sub = comm.split(Some(0), comm.rank() as i64)?.ok_or_else(|| {
            Error::Internal("staging: the private sub-communicator was not made".into())
        })?;
        let copy = Arc::new(CudaCopy::new(g.device)?);
        g.stager = Some(Stager::new(sub, copy, chunk)?);
    }
    g.stager
        .as_ref()
        .ok_or_else(|| Error::Internal("staging engine missing".into()))
}

// ---- argument checks (the host raw API's messages) -----------------------------------------

/// Checks a device collective's arguments on rank `rank` of `n` before anything is enqueued:
/// the kind, the root, the count (overflow), the operator for the type, NULL buffers with a
/// nonzero length. Returns the (send, recv) byte lengths.
pub(crate) fn check_coll(
    rank: usize,
    n: usize,
    c: &RawColl,
    send: DevPtr,
    recv: DevPtr,
) -> Result<(usize, usize)> {
    if c.kind.rooted() && c.root >= n {
        return Err(Error::InvalidArgument(format!(
            "root {} is not a rank of this communicator of {n} ranks",
            c.root
        )));
    }
    let (sl, rl) = c.byte_lens(rank, n)?;
    if (sl > 0 && send == 0) || (rl > 0 && recv == 0) {
        return Err(Error::InvalidArgument(format!(
            "{}: NULL buffer for {} bytes",
            c.kind.name(),
            if sl > 0 && send == 0 { sl } else { rl }
        )));
    }
    if matches!(
        c.kind,
        CollKind::AllReduce | CollKind::Reduce | CollKind::ReduceScatter
    ) {
        c.op.check(c.dtype).map_err(|e| match e {
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("{}: {m}", c.kind.name())),
            e => e,
        })?;
    }
    Ok((sl, rl))
}

/// Checks a device point-to-point group's arguments (peers, counts, NULL buffers).
/// `allow_self`: a rank may send to itself (NCCL matches a send and a receive to self in one
/// group, as the 1-GPU checks of perf/gpu_check use; braid's host transports do not).
pub(crate) fn check_p2p(rank: usize, n: usize, ops: &[DeviceP2p], allow_self: bool) -> Result<()> {
    for o in ops {
        if o.peer >= n || (o.peer == rank && !allow_self) {
            return Err(Error::InvalidArgument(format!(
                "peer {} is not another rank of this communicator (rank {rank} of {n})",
                o.peer
            )));
        }
        let len = o
            .count
            .checked_mul(o.dtype.size())
            .ok_or_else(|| Error::InvalidArgument("count overflows".into()))?;
        if len > 0 && o.buf == 0 {
            return Err(Error::InvalidArgument("send/recv: NULL buffer".into()));
        }
    }
    Ok(())
}

/// Whether NCCL (of `version`) runs this collective: data movement always (as bytes);
/// reductions when NCCL has the type and the operator.
pub(crate) fn nccl_can(c: &RawColl, version: i32) -> bool {
    match c.kind {
        CollKind::AllReduce | CollKind::Reduce | CollKind::ReduceScatter => {
            nccl::nccl_dtype(c.dtype, version).is_some() && nccl::nccl_op(c.op, version).is_some()
        }
        CollKind::P2p | CollKind::AllToAllV => false,
        _ => true,
    }
}

// ---- the NCCL data path -------------------------------------------------------------------

fn no_lib() -> Error {
    Error::Internal("the NCCL engine has no library to run data calls".into())
}

/// Runs `f` on the live NCCL communicator of `g`.
fn on_nccl<R>(g: &Generation, f: impl FnOnce(&'static NcclLib, RawComm) -> Result<R>) -> Result<R> {
    let run = g
        .nccl
        .as_ref()
        .ok_or_else(|| Error::Internal("no NCCL communicator".into()))?;
    let lib = run.cell.backend.lib().ok_or_else(no_lib)?;
    let err = g.err.clone();
    run.cell.with(
        move || err.get().unwrap_or(Error::Aborted),
        |t| f(lib, t as RawComm),
    )
}

/// Grouped send/recv pairs: `(send?, device address, bytes, peer)`.
fn grouped(
    lib: &NcclLib,
    comm: RawComm,
    ops: &[(bool, DevPtr, usize, usize)],
    stream: Stream,
) -> Result<()> {
    lib.group_start()?;
    let mut first = Ok(());
    for &(send, buf, bytes, peer) in ops {
        // SAFETY: the caller of the device API guarantees the buffers and the stream; `comm` is
        // live (CommCell::with).
        let r = unsafe {
            if send {
                lib.send(buf, bytes, nccl::BYTES, peer, comm, stream)
            } else {
                lib.recv(buf, bytes, nccl::BYTES, peer, comm, stream)
            }
        };
        if r.is_err() {
            first = r;
            break;
        }
    }
    // The group is always closed, also after an error inside it.
    let end = lib.group_end();
    first.and(end)
}

fn nccl_coll(
    g: &mut Generation,
    c: &RawColl,
    send: DevPtr,
    recv: DevPtr,
    stream: Stream,
) -> Result<()> {
    let (rank, n) = (g.rank, g.size);
    let version = g.nccl.as_ref().map_or(0, |r| r.version);
    let es = c.dtype.size();
    let blk = c.count * es; // checked by check_coll
    if c.kind == CollKind::Barrier && g.scratch.is_none() {
        g.scratch = Some(driver::DeviceAlloc::new(8, Some(g.device))?);
    }
    let scratch = g.scratch.as_ref().map_or(0, |s| s.ptr());
    let red = || -> Result<(i32, i32)> {
        match (
            nccl::nccl_dtype(c.dtype, version),
            nccl::nccl_op(c.op, version),
        ) {
            (Some(d), Some(o)) => Ok((d, o)),
            _ => Err(Error::Internal(
                "a reduction NCCL cannot run was routed to it".into(),
            )),
        }
    };
    on_nccl(g, |lib, comm| {
        // SAFETY: for every call below, the caller of the device API guarantees the buffers (for
        // the lengths check_coll computed) and the stream; `comm` is live (CommCell::with).
        unsafe {
            match c.kind {
                CollKind::AllReduce => {
                    let (d, o) = red()?;
                    lib.all_reduce(send, recv, c.count, d, o, comm, stream)
                }
                CollKind::Reduce => {
                    let (d, o) = red()?;
                    lib.reduce(send, recv, c.count, d, o, c.root, comm, stream)
                }
                CollKind::ReduceScatter => {
                    let (d, o) = red()?;
                    lib.reduce_scatter(send, recv, c.count, d, o, comm, stream)
                }
                CollKind::Broadcast => {
                    lib.broadcast(send, recv, blk, nccl::BYTES, c.root, comm, stream)
                }
                CollKind::AllGather => lib.all_gather(send, recv, blk, nccl::BYTES, comm, stream),
                CollKind::Barrier => {
                    lib.all_reduce(scratch, scratch, 1, nccl::BYTES, 0, comm, stream)
                }
                CollKind::AllToAll => {
                    let mut ops = Vec::with_capacity(2 * n);
                    for p in 0..n {
                        ops.push((true, send + (p * blk) as u64, blk, p));
                        ops.push((false, recv + (p * blk) as u64, blk, p));
                    }
                    grouped(lib, comm, &ops, stream)
                }
                CollKind::Gather => {
                    let mut ops = Vec::with_capacity(n + 1);
                    let own = recv + (rank * blk) as u64;
                    let in_place = rank == c.root && send == own;
                    if rank == c.root {
                        for p in 0..n {
                            if !(in_place && p == rank) {
                                ops.push((false, recv + (p * blk) as u64, blk, p));
                            }
                        }
                    }
                    if !in_place {
                        ops.push((true, send, blk, c.root));
                    }
                    grouped(lib, comm, &ops, stream)
                }
                CollKind::Scatter => {
                    let mut ops = Vec::with_capacity(n + 1);
                    let own = send + (rank * blk) as u64;
                    let in_place = rank == c.root && recv == own;
                    if rank == c.root {
                        for p in 0..n {
                            if !(in_place && p == rank) {
                                ops.push((true, send + (p * blk) as u64, blk, p));
                            }
                        }
                    }
                    if !in_place {
                        ops.push((false, recv, blk, c.root));
                    }
                    grouped(lib, comm, &ops, stream)
                }
                CollKind::P2p | CollKind::AllToAllV => Err(Error::Internal(
                    "not a collective of the NCCL engine".into(),
                )),
            }
        }
    })
}

fn nccl_p2p(g: &Generation, ops: &[DeviceP2p], stream: Stream) -> Result<()> {
    let list: Vec<(bool, DevPtr, usize, usize)> = ops
        .iter()
        .map(|o| (o.send, o.buf, o.count * o.dtype.size(), o.peer)) // checked by check_p2p
        .collect();
    on_nccl(g, |lib, comm| grouped(lib, comm, &list, stream))
}
