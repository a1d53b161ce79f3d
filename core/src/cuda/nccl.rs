//! NCCL, loaded at run time: the library search, its function table, the NCCL communicator.
//!
//! NCCL is never a build or link dependency. [`library`] finds it at the first call:
//! 1. `BRAID_NCCL_LIBRARY` (a path): if set, that file or an error naming it (no fallback);
//! 2. `libnccl.so.2`, then `libnccl.so`, on the dynamic loader's search path;
//! 3. `libnccl.so.2` in each directory of `BRAID_NCCL_DIRS` (colon-separated; the Python
//!    package passes the `nvidia/nccl/lib` directories of the `nvidia-nccl-cu13`/`-cu12` pip
//!    packages).
//!
//! cudarc's own NCCL loader is not used: it does not try `libnccl.so.2` and panics on a missing
//! library or symbol. braid opens the library itself and resolves its own function table: a
//! missing required symbol is an error naming it; optional ones (`ncclCommShrink`,
//! `ncclMemAlloc`/`ncclMemFree`, `ncclCommInitRankConfig`, `ncclGetLastError`) are `None` when
//! absent. The ABI types are declared here from `nccl.h` (stable since NCCL 2.0): enums are C
//! `int`s, so a result code this build does not know (a newer NCCL's) is a number, never
//! undefined behaviour.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use super::{driver, NcclInfo, Stream};
use crate::config;
use crate::error::{Error, Result};
use crate::types::{DataType, ReduceOp};

/// An NCCL communicator handle (`ncclComm_t`).
pub type RawComm = *mut c_void;

/// Bytes of an `ncclUniqueId` (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// `ncclUniqueId`: the opaque token rank 0 creates and every rank passes to
/// `ncclCommInitRank` (braid hands it out over the host communicator).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UniqueId {
    /// The bytes, as NCCL wrote them.
    pub internal: [u8; UNIQUE_ID_BYTES],
}

/// `ncclResult_t` codes (`nccl.h`).
pub mod result {
    /// `ncclSuccess`.
    pub const SUCCESS: i32 = 0;
    /// `ncclUnhandledCudaError`.
    pub const UNHANDLED_CUDA_ERROR: i32 = 1;
    /// `ncclSystemError`.
    pub const SYSTEM_ERROR: i32 = 2;
    /// `ncclInternalError`.
    pub const INTERNAL_ERROR: i32 = 3;
    /// `ncclInvalidArgument`.
    pub const INVALID_ARGUMENT: i32 = 4;
    /// `ncclInvalidUsage`.
    pub const INVALID_USAGE: i32 = 5;
    /// `ncclRemoteError`.
    pub const REMOTE_ERROR: i32 = 6;
    /// `ncclInProgress` (non-blocking communicators).
    pub const IN_PROGRESS: i32 = 7;
}

/// `ncclDataType_t` codes (`nccl.h`; bfloat16 since NCCL 2.10).
mod dt {
    pub const INT8: i32 = 0;
    pub const UINT8: i32 = 1;
    pub const INT32: i32 = 2;
    pub const UINT32: i32 = 3;
    pub const INT64: i32 = 4;
    pub const UINT64: i32 = 5;
    pub const FLOAT16: i32 = 6;
    pub const FLOAT32: i32 = 7;
    pub const FLOAT64: i32 = 8;
    pub const BFLOAT16: i32 = 9;
}

/// `ncclRedOp_t` codes (`nccl.h`; `ncclAvg` since NCCL 2.10).
mod op {
    pub const SUM: i32 = 0;
    pub const PROD: i32 = 1;
    pub const MAX: i32 = 2;
    pub const MIN: i32 = 3;
    pub const AVG: i32 = 4;
}

/// The first NCCL with bfloat16 and `ncclAvg`.
const V2_10: i32 = 21000;

/// NCCL's code for `dtype` in reductions, if the loaded version (`version`) has one. 16-bit
/// integers have none (data movement sends them as bytes).
pub fn nccl_dtype(dtype: DataType, version: i32) -> Option<i32> {
    Some(match dtype {
        DataType::I8 => dt::INT8,
        DataType::U8 => dt::UINT8,
        DataType::I32 => dt::INT32,
        DataType::U32 => dt::UINT32,
        DataType::I64 => dt::INT64,
        DataType::U64 => dt::UINT64,
        DataType::F16 => dt::FLOAT16,
        DataType::F32 => dt::FLOAT32,
        DataType::F64 => dt::FLOAT64,
        DataType::BF16 if version >= V2_10 => dt::BFLOAT16,
        DataType::BF16 | DataType::I16 => return None,
    })
}

/// NCCL's byte type (data movement of any element type is a byte copy).
pub const BYTES: i32 = dt::UINT8;

/// NCCL's code for `op`, if it has one: the bitwise operators have none; `Avg` needs NCCL 2.10.
pub fn nccl_op(o: ReduceOp, version: i32) -> Option<i32> {
    Some(match o {
        ReduceOp::Sum => op::SUM,
        ReduceOp::Prod => op::PROD,
        ReduceOp::Max => op::MAX,
        ReduceOp::Min => op::MIN,
        ReduceOp::Avg if version >= V2_10 => op::AVG,
        ReduceOp::Avg | ReduceOp::Band | ReduceOp::Bor | ReduceOp::Bxor => return None,
    })
}

type R = c_int;
type StreamT = *mut c_void;

/// The function table (every entry resolved from the loaded library).
#[derive(Clone, Copy)]
struct Fns {
    get_version: unsafe extern "C" fn(*mut c_int) -> R,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> R,
    comm_init_rank: unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> R,
    comm_abort: unsafe extern "C" fn(RawComm) -> R,
    comm_destroy: unsafe extern "C" fn(RawComm) -> R,
    comm_get_async_error: unsafe extern "C" fn(RawComm, *mut R) -> R,
    get_error_string: unsafe extern "C" fn(R) -> *const c_char,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        RawComm,
        StreamT,
    ) -> R,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        RawComm,
        StreamT,
    ) -> R,
    reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        c_int,
        RawComm,
        StreamT,
    ) -> R,
    all_gather:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, RawComm, StreamT) -> R,
    reduce_scatter: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        RawComm,
        StreamT,
    ) -> R,
    send: unsafe extern "C" fn(*const c_void, usize, c_int, c_int, RawComm, StreamT) -> R,
    recv: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, RawComm, StreamT) -> R,
    group_start: unsafe extern "C" fn() -> R,
    group_end: unsafe extern "C" fn() -> R,
    // Optional (newer NCCLs).
    get_last_error: Option<unsafe extern "C" fn(RawComm) -> *const c_char>,
    mem_alloc: Option<unsafe extern "C" fn(*mut *mut c_void, usize) -> R>,
    mem_free: Option<unsafe extern "C" fn(*mut c_void) -> R>,
    /// `ncclCommShrink(comm, excludeRanks, count, newcomm, config, flags)` (2.27+).
    comm_shrink: Option<
        unsafe extern "C" fn(RawComm, *mut c_int, c_int, *mut RawComm, *mut c_void, c_int) -> R,
    >,
    /// `ncclCommInitRankConfig(comm, nranks, id, rank, config)` (2.14+).
    comm_init_rank_config:
        Option<unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int, *mut c_void) -> R>,
}

/// Symbols braid needs; a library without one of them is not used.
pub const REQUIRED: &[&str] = &[
    "ncclGetVersion",
    "ncclGetUniqueId",
    "ncclCommInitRank",
    "ncclCommAbort",
    "ncclCommDestroy",
    "ncclCommGetAsyncError",
    "ncclGetErrorString",
    "ncclAllReduce",
    "ncclBroadcast",
    "ncclReduce",
    "ncclAllGather",
    "ncclReduceScatter",
    "ncclSend",
    "ncclRecv",
    "ncclGroupStart",
    "ncclGroupEnd",
];

/// The loaded NCCL library.
pub struct NcclLib {
    info: NcclInfo,
    fns: Fns,
    /// Keeps the library mapped (the function pointers point into it).
    _lib: libloading::Library,
}

impl std::fmt::Debug for NcclLib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclLib").field("info", &self.info).finish()
    }
}

/// One place the search looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Candidate {
    /// `BRAID_NCCL_LIBRARY`: used alone, no fallback.
    Explicit(String),
    /// A name for the dynamic loader's search path.
    Loader(&'static str),
    /// `libnccl.so.2` in a directory of `BRAID_NCCL_DIRS`.
    Dir(String),
}

impl Candidate {
    fn path(&self) -> String {
        match self {
            Candidate::Explicit(p) | Candidate::Dir(p) => p.clone(),
            Candidate::Loader(n) => (*n).to_string(),
        }
    }
}

/// Where the search looks, in order, for the values of `BRAID_NCCL_LIBRARY` (`explicit`) and
/// `BRAID_NCCL_DIRS` (`dirs`). A pure function, so the order is testable without the
/// environment.
pub(crate) fn candidates(explicit: Option<&str>, dirs: Option<&str>) -> Vec<Candidate> {
    if let Some(p) = explicit.filter(|p| !p.trim().is_empty()) {
        return vec![Candidate::Explicit(p.to_string())];
    }
    let mut out = vec![
        Candidate::Loader("libnccl.so.2"),
        Candidate::Loader("libnccl.so"),
    ];
    for d in dirs
        .unwrap_or("")
        .split(':')
        .filter(|d| !d.trim().is_empty())
    {
        let p = std::path::Path::new(d.trim()).join("libnccl.so.2");
        out.push(Candidate::Dir(p.to_string_lossy().into_owned()));
    }
    out
}

/// Finds and loads NCCL from the given variable values (see [`candidates`]); the error says
/// what was tried and why each failed.
pub(crate) fn find(
    explicit: Option<&str>,
    dirs: Option<&str>,
) -> std::result::Result<NcclLib, String> {
    let cands = candidates(explicit, dirs);
    let mut tried = Vec::new();
    for c in &cands {
        match open(&c.path()) {
            Ok(lib) => return Ok(lib),
            Err(why) => {
                if let Candidate::Explicit(p) = c {
                    return Err(format!("BRAID_NCCL_LIBRARY={p}: {why}"));
                }
                tried.push(format!("{} ({why})", c.path()));
            }
        }
    }
    Err(format!(
        "NCCL not found: set BRAID_NCCL_LIBRARY (tried: {})",
        tried.join("; ")
    ))
}

/// One symbol of `lib` as a value of type `T` (a function pointer).
///
/// # Safety
/// `T` must be the symbol's true type.
unsafe fn sym<T: Copy>(lib: &libloading::Library, name: &str) -> std::result::Result<T, String> {
    // SAFETY: per the contract.
    unsafe { lib.get::<T>(name.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| format!("{name}: {e}"))
}

/// Loads one file and resolves the function table.
fn open(path: &str) -> std::result::Result<NcclLib, String> {
    // SAFETY: loading a shared library runs its initialisers; NCCL's only set up its own state.
    // A library that is not NCCL is rejected below by its symbols, before anything is called.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| format!("cannot load: {e}"))?;
    let missing: Vec<&str> = REQUIRED
        .iter()
        .copied()
        .filter(|s| {
            // SAFETY: only the symbol's presence is checked.
            unsafe { lib.get::<*const c_void>(s.as_bytes()) }.is_err()
        })
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "not a usable NCCL: missing symbol(s) {}",
            missing.join(", ")
        ));
    }
    // SAFETY: for every `sym` below, each field's type is the C signature nccl.h declares
    // for that symbol, and the symbols stay valid while `lib` is kept with the table.
    let fns = unsafe {
        Fns {
            get_version: sym(&lib, "ncclGetVersion")?,
            get_unique_id: sym(&lib, "ncclGetUniqueId")?,
            comm_init_rank: sym(&lib, "ncclCommInitRank")?,
            comm_abort: sym(&lib, "ncclCommAbort")?,
            comm_destroy: sym(&lib, "ncclCommDestroy")?,
            comm_get_async_error: sym(&lib, "ncclCommGetAsyncError")?,
            get_error_string: sym(&lib, "ncclGetErrorString")?,
            all_reduce: sym(&lib, "ncclAllReduce")?,
            broadcast: sym(&lib, "ncclBroadcast")?,
            reduce: sym(&lib, "ncclReduce")?,
            all_gather: sym(&lib, "ncclAllGather")?,
            reduce_scatter: sym(&lib, "ncclReduceScatter")?,
            send: sym(&lib, "ncclSend")?,
            recv: sym(&lib, "ncclRecv")?,
            group_start: sym(&lib, "ncclGroupStart")?,
            group_end: sym(&lib, "ncclGroupEnd")?,
            get_last_error: sym(&lib, "ncclGetLastError").ok(),
            mem_alloc: sym(&lib, "ncclMemAlloc").ok(),
            mem_free: sym(&lib, "ncclMemFree").ok(),
            comm_shrink: sym(&lib, "ncclCommShrink").ok(),
            comm_init_rank_config: sym(&lib, "ncclCommInitRankConfig").ok(),
        }
    };
    let mut version: c_int = 0;
    // SAFETY: resolved above; writes one int.
    let r = unsafe { (fns.get_version)(&mut version) };
    if r != result::SUCCESS {
        return Err(format!("ncclGetVersion failed (ncclResult_t {r})"));
    }
    Ok(NcclLib {
        info: NcclInfo {
            version,
            path: path.to_string(),
        },
        fns,
        _lib: lib,
    })
}

static LIBRARY: OnceLock<std::result::Result<NcclLib, String>> = OnceLock::new();

/// NCCL, found and loaded at the first call (cached); an error says why not ("NCCL not
/// found: set BRAID_NCCL_LIBRARY (tried: ...)", or the `BRAID_NCCL_LIBRARY` file and why it
/// cannot be used).
pub fn library() -> Result<&'static NcclLib> {
    let r = LIBRARY.get_or_init(|| {
        let explicit = config::var("BRAID_NCCL_LIBRARY");
        let dirs = config::var("BRAID_NCCL_DIRS");
        let r = find(explicit.as_deref(), dirs.as_deref());
        match &r {
            Ok(l) => tracing::info!(target: "braid::cuda", "NCCL {} loaded from {}", l.info.version_string(), l.info.path),
            Err(e) => tracing::info!(target: "braid::cuda", "{e}"),
        }
        r
    });
    match r {
        Ok(l) => Ok(l),
        Err(e) => Err(Error::System(e.clone())),
    }
}

/// "2.27.3" for 22703 (and "2.9.9" for 2909, NCCL's code before 2.10).
pub fn version_string(code: i32) -> String {
    if code >= 10000 {
        format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, (code % 1000) / 100, code % 100)
    }
}

impl NcclLib {
    /// Version and path.
    pub fn info(&self) -> NcclInfo {
        self.info.clone()
    }

    /// `ncclGetVersion`'s code.
    pub fn version(&self) -> i32 {
        self.info.version
    }

    /// Whether this NCCL has `ncclCommShrink` (2.27+).
    pub fn has_shrink(&self) -> bool {
        self.fns.comm_shrink.is_some()
    }

    /// Whether this NCCL has `ncclCommInitRankConfig` (2.14+).
    pub fn has_init_rank_config(&self) -> bool {
        self.fns.comm_init_rank_config.is_some()
    }

    /// NCCL's text for a result code (`ncclGetErrorString`).
    pub fn error_string(&self, r: i32) -> String {
        // SAFETY: resolved at load; NCCL returns a static string (or NULL for unknown codes).
        let p = unsafe { (self.fns.get_error_string)(r) };
        if p.is_null() {
            return format!("ncclResult_t {r}");
        }
        // SAFETY: a NUL-terminated static string from NCCL.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// `ncclGetLastError(comm)` where the library has it: NCCL's last detailed message.
    ///
    /// # Safety
    /// `comm` must be NULL or a live communicator of this library.
    pub unsafe fn last_error(&self, comm: RawComm) -> Option<String> {
        let f = self.fns.get_last_error?;
        // SAFETY: per the contract; NCCL returns a static (thread-local) buffer or NULL.
        let p = unsafe { f(comm) };
        if p.is_null() {
            return None;
        }
        // SAFETY: NUL-terminated text from NCCL.
        let s = unsafe { CStr::from_ptr(p) }
            .to_string_lossy()
            .trim()
            .to_string();
        (!s.is_empty()).then_some(s)
    }

    /// Turns a result code into a braid error naming the call: "ncclAllReduce: invalid
    /// argument (...: NCCL's last message)". `Ok` for `ncclSuccess`.
    ///
    /// # Safety
    /// `comm` must be NULL or a live communicator of this library.
    pub unsafe fn check(&self, r: i32, what: &str, comm: RawComm) -> Result<()> {
        if r == result::SUCCESS {
            return Ok(());
        }
        let mut msg = format!("{what}: {}", self.error_string(r));
        // SAFETY: per the contract.
        if let Some(last) = unsafe { self.last_error(comm) } {
            msg.push_str(": ");
            msg.push_str(&last);
        }
        Err(match r {
            result::INVALID_ARGUMENT => Error::InvalidArgument(msg),
            result::INVALID_USAGE => Error::InvalidUsage(msg),
            _ => Error::System(msg),
        })
    }

    /// `ncclGetUniqueId` (rank 0 of a new NCCL communicator).
    pub fn unique_id(&self) -> Result<UniqueId> {
        let mut id = UniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        // SAFETY: resolved at load; writes 128 bytes into `id`.
        let r = unsafe { (self.fns.get_unique_id)(&mut id) };
        // SAFETY: NULL communicator.
        unsafe { self.check(r, "ncclGetUniqueId", std::ptr::null_mut()) }?;
        Ok(id)
    }

    /// `ncclCommInitRank` on `device` (made current on the calling thread first): rank `rank`
    /// of `nranks`, every rank passing the same `id`. Blocks until every rank has joined.
    pub fn comm_init_rank(
        &self,
        nranks: usize,
        id: &UniqueId,
        rank: usize,
        device: i32,
    ) -> Result<RawComm> {
        let n = c_int::try_from(nranks)
            .map_err(|_| Error::InvalidArgument(format!("{nranks} ranks: too many for NCCL")))?;
        let r = c_int::try_from(rank)
            .map_err(|_| Error::InvalidArgument(format!("rank {rank}: too large for NCCL")))?;
        driver::driver()?.bind(device)?;
        let mut comm: RawComm = std::ptr::null_mut();
        // SAFETY: resolved at load; the device's context is current; `comm` receives the handle.
        let res = unsafe { (self.fns.comm_init_rank)(&mut comm, n, *id, r) };
        // SAFETY: NULL communicator (the new one may be half-made).
        unsafe { self.check(res, "ncclCommInitRank", std::ptr::null_mut()) }?;
        if comm.is_null() {
            return Err(Error::Internal(
                "ncclCommInitRank returned no communicator".into(),
            ));
        }
        Ok(comm)
    }

    /// `ncclCommAbort`: ends the communicator at once, cancelling its uncompleted operations.
    ///
    /// # Safety
    /// `comm` must be a live communicator of this library; it is gone afterwards.
    pub unsafe fn comm_abort(&self, comm: RawComm) -> Result<()> {
        // SAFETY: per the contract.
        let r = unsafe { (self.fns.comm_abort)(comm) };
        // SAFETY: the communicator is gone: NULL.
        unsafe { self.check(r, "ncclCommAbort", std::ptr::null_mut()) }
    }

    /// `ncclCommDestroy`: ends the communicator after its operations completed.
    ///
    /// # Safety
    /// As [`NcclLib::comm_abort`].
    pub unsafe fn comm_destroy(&self, comm: RawComm) -> Result<()> {
        // SAFETY: per the contract.
        let r = unsafe { (self.fns.comm_destroy)(comm) };
        // SAFETY: the communicator is gone: NULL.
        unsafe { self.check(r, "ncclCommDestroy", std::ptr::null_mut()) }
    }

    /// `ncclCommGetAsyncError`: `Ok(None)` while the communicator is healthy, `Ok(Some(text))`
    /// once an asynchronous error occurred (a peer lost, a network failure).
    ///
    /// # Safety
    /// `comm` must be a live communicator of this library.
    pub unsafe fn async_error(&self, comm: RawComm) -> Result<Option<String>> {
        let mut e: R = result::SUCCESS;
        // SAFETY: per the contract; writes one int.
        let r = unsafe { (self.fns.comm_get_async_error)(comm, &mut e) };
        // SAFETY: per the contract.
        unsafe { self.check(r, "ncclCommGetAsyncError", comm) }?;
        if e == result::SUCCESS || e == result::IN_PROGRESS {
            return Ok(None);
        }
        let mut msg = self.error_string(e);
        // SAFETY: per the contract.
        if let Some(last) = unsafe { self.last_error(comm) } {
            msg.push_str(": ");
            msg.push_str(&last);
        }
        Ok(Some(msg))
    }

    /// `ncclGroupStart`.
    pub fn group_start(&self) -> Result<()> {
        // SAFETY: resolved at load; no arguments.
        let r = unsafe { (self.fns.group_start)() };
        // SAFETY: NULL communicator.
        unsafe { self.check(r, "ncclGroupStart", std::ptr::null_mut()) }
    }

    /// `ncclGroupEnd` (launches the group's operations).
    pub fn group_end(&self) -> Result<()> {
        // SAFETY: resolved at load; no arguments.
        let r = unsafe { (self.fns.group_end)() };
        // SAFETY: NULL communicator.
        unsafe { self.check(r, "ncclGroupEnd", std::ptr::null_mut()) }
    }

    /// `ncclAllReduce` (`dtype`/`op`: NCCL codes from [`nccl_dtype`]/[`nccl_op`]).
    ///
    /// # Safety
    /// `comm` live; buffers device memory valid for `count` elements until the work completes
    /// on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn all_reduce(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: i32,
        op: i32,
        comm: RawComm,
        stream: Stream,
    ) -> Result<()> {
        // SAFETY: per the contract.
        let r = unsafe {
            (self.fns.all_reduce)(
                send as *const c_void,
                recv as *mut c_void,
                count,
                dtype,
                op,
                comm,
                stream.as_raw(),
            )
        };
        // SAFETY: per the contract.
        unsafe { self.check(r, "ncclAllReduce", comm) }
    }

    /// `ncclBroadcast` from `root`.
    ///
    /// # Safety
    /// As [`NcclLib::all_reduce`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn broadcast(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: i32,
        root: usize,
        comm: RawComm,
        stream: Stream,
    ) -> Result<()> {
        let root = rank_arg(root)?;
        // SAFETY: per the contract.
        let r = unsafe {
            (self.fns.broadcast)(
                send as *const c_void,
                recv as *mut c_void,
                count,
                dtype,
                root,
                comm,
                stream.as_raw(),
            )
        };
        // SAFETY: per the contract.
        unsafe { self.check(r, "ncclBroadcast", comm) }
    }

    /// `ncclReduce` to `root`.
    ///
    /// # Safety
    /// As [`NcclLib::all_reduce`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn reduce(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: i32,
        op: i32,
        root: usize,
        comm: RawComm,
        stream: Stream,
    ) -> Result<()> {
        let root = rank_arg(root)?;
        // SAFETY: per the contract.
        let r = unsafe {
            (self.fns.reduce)(
                send as *const c_void,
                recv as *mut c_void,
                count,
                dtype,
                op,
                root,
                comm,
                stream.as_raw(),
            )
        };
        // SAFETY: per the contract.
        unsafe { self.check(r, "ncclReduce", comm) }
    }

    /// `ncclAllGather` (`count`: per rank).
    ///
    /// # Safety
    /// As [`NcclLib::all_reduce`].
    pub unsafe fn all_gather(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: i32,
        comm: RawComm,
        stream: Stream,
    ) -> Result<()> {
        // SAFETY: per the contract.
        let r = unsafe {
            (self.fns.all_gather)(
                send as *const c_void,
                recv as *mut c_void,
                count,
                dtype,
                comm,
                stream.as_raw(),
            )
        };
        // SAFETY: per the contract.
        unsafe { self.check(r, "ncclAllGather", comm) }
    }

    /// `ncclReduceScatter` (`count`: per rank, the result).
    ///
    /// # Safety
    /// As [`NcclLib::all_reduce`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn reduce_scatter(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: i32,
        op: i32,
        comm: RawComm,
        stream: Stream,
    ) -> Result<()> {
        // SAFETY: per the contract.
        let r = unsafe {
            (self.fns.reduce_scatter)(
                send as *const c_void,
                recv as *mut c_void,
                count,
                dtype,
                op,
                comm,
                stream.as_raw(),
            )
        };
        // SAFETY: per the contract.
        unsafe { self.check(r, "ncclReduceScatter", comm) }
    }

    /// `ncclSend` to `peer`.
    ///
    /// # Safety
    /// As [`NcclLib::all_reduce`].
    pub unsafe fn send(
        &self,
        buf: u64,
        count: usize,
        dtype: i32,
        peer: usize,
        comm: RawComm,
        stream: Stream,
    ) -> Result<()> {
        let peer = rank_arg(peer)?;
        // SAFETY: per the contract.
        let r = unsafe {
            (self.fns.send)(
                buf as *const c_void,
                count,
                dtype,
                peer,
                comm,
                stream.as_raw(),
            )
        };
        // SAFETY: per the contract.
        unsafe { self.check(r, "ncclSend", comm) }
    }

    /// `ncclRecv` from `peer`.
    ///
    /// # Safety
    /// As [`NcclLib::all_reduce`].
    pub unsafe fn recv(
        &self,
        buf: u64,
        count: usize,
        dtype: i32,
        peer: usize,
        comm: RawComm,
        stream: Stream,
    ) -> Result<()> {
        let peer = rank_arg(peer)?;
        // SAFETY: per the contract.
        let r = unsafe {
            (self.fns.recv)(
                buf as *mut c_void,
                count,
                dtype,
                peer,
                comm,
                stream.as_raw(),
            )
        };
        // SAFETY: per the contract.
        unsafe { self.check(r, "ncclRecv", comm) }
    }

    /// `ncclMemAlloc` where the library has it (memory NCCL can register cheaply).
    pub fn mem_alloc(&self, len: usize) -> Result<u64> {
        let Some(f) = self.fns.mem_alloc else {
            return Err(Error::InvalidUsage(format!(
                "NCCL {} has no ncclMemAlloc (2.19 or newer needed)",
                self.info.version_string()
            )));
        };
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: resolved at load; writes one pointer.
        let r = unsafe { f(&mut p, len) };
        // SAFETY: NULL communicator.
        unsafe { self.check(r, "ncclMemAlloc", std::ptr::null_mut()) }?;
        Ok(p as u64)
    }

    /// `ncclMemFree`.
    ///
    /// # Safety
    /// `ptr` must come from [`NcclLib::mem_alloc`] and be unused.
    pub unsafe fn mem_free(&self, ptr: u64) -> Result<()> {
        let Some(f) = self.fns.mem_free else {
            return Err(Error::InvalidUsage("this NCCL has no ncclMemFree".into()));
        };
        // SAFETY: per the contract.
        let r = unsafe { f(ptr as *mut c_void) };
        // SAFETY: NULL communicator.
        unsafe { self.check(r, "ncclMemFree", std::ptr::null_mut()) }
    }
}

fn rank_arg(r: usize) -> Result<c_int> {
    c_int::try_from(r).map_err(|_| Error::InvalidArgument(format!("rank {r}: too large for NCCL")))
}

/// An NCCL communicator this value owns: destroyed on drop unless aborted or destroyed before.
#[derive(Debug)]
pub struct NcclComm {
    lib: &'static NcclLib,
    raw: RawComm,
    rank: usize,
    nranks: usize,
}

// SAFETY: an ncclComm_t may be used from any thread (one at a time: `&mut` for the ending
// calls, and NCCL serialises enqueues on one communicator internally).
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// `ncclCommInitRank` with the loaded library on `device` (see [`NcclLib::comm_init_rank`]).
    pub fn init_rank(nranks: usize, id: &UniqueId, rank: usize, device: i32) -> Result<NcclComm> {
        let lib = library()?;
        let raw = lib.comm_init_rank(nranks, id, rank, device)?;
        Ok(NcclComm {
            lib,
            raw,
            rank,
            nranks,
        })
    }

    /// The handle (for the [`NcclLib`] calls).
    pub fn raw(&self) -> RawComm {
        self.raw
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn nranks(&self) -> usize {
        self.nranks
    }

    /// The library.
    pub fn lib(&self) -> &'static NcclLib {
        self.lib
    }

    /// `ncclCommGetAsyncError` (see [`NcclLib::async_error`]).
    pub fn async_error(&self) -> Result<Option<String>> {
        // SAFETY: `raw` is live while `self` is.
        unsafe { self.lib.async_error(self.raw) }
    }

    /// `ncclCommAbort`.
    pub fn abort(mut self) -> Result<()> {
        let raw = std::mem::replace(&mut self.raw, std::ptr::null_mut());
        // SAFETY: `raw` was live and is not used again.
        unsafe { self.lib.comm_abort(raw) }
    }

    /// `ncclCommDestroy`.
    pub fn destroy(mut self) -> Result<()> {
        let raw = std::mem::replace(&mut self.raw, std::ptr::null_mut());
        // SAFETY: `raw` was live and is not used again.
        unsafe { self.lib.comm_destroy(raw) }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.raw.is_null() {
            return;
        }
        let raw = std::mem::replace(&mut self.raw, std::ptr::null_mut());
        // SAFETY: `raw` was live and is not used again.
        if let Err(e) = unsafe { self.lib.comm_destroy(raw) } {
            tracing::warn!(target: "braid::cuda", "{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_order_is_explicit_alone_else_loader_then_dirs() {
        assert_eq!(
            candidates(Some("/opt/nccl/lib/libnccl.so.2"), Some("/a:/b")),
            vec![Candidate::Explicit("/opt/nccl/lib/libnccl.so.2".into())]
        );
        assert_eq!(
            candidates(None, Some("/a::/b/ ")),
            vec![
                Candidate::Loader("libnccl.so.2"),
                Candidate::Loader("libnccl.so"),
                Candidate::Dir("/a/libnccl.so.2".into()),
                Candidate::Dir("/b/libnccl.so.2".into()),
            ]
        );
        assert_eq!(
            candidates(Some(""), None),
            vec![
                Candidate::Loader("libnccl.so.2"),
                Candidate::Loader("libnccl.so")
            ]
        );
    }

    #[test]
    fn an_explicit_missing_file_is_an_error_naming_it() {
        let e = find(
            Some("/nonexistent/braid-test/libnccl.so.2"),
            Some("/also/not"),
        )
        .err()
        .unwrap_or_default();
        assert!(
            e.starts_with("BRAID_NCCL_LIBRARY=/nonexistent/braid-test/libnccl.so.2: cannot load"),
            "{e}"
        );
        assert!(!e.contains("/also/not"), "no fallback: {e}");
    }

    #[test]
    fn a_library_that_is_not_nccl_is_refused_naming_the_missing_symbols() {
        // libm is on every glibc system: it loads, and it has none of NCCL's symbols.
        let e = find(Some("libm.so.6"), None).err().unwrap_or_default();
        assert!(
            e.starts_with("BRAID_NCCL_LIBRARY=libm.so.6: not a usable NCCL: missing symbol(s) ncclGetVersion, ncclGetUniqueId,"),
            "{e}"
        );
        assert!(e.contains("ncclGroupEnd"), "{e}");
    }

    #[test]
    fn absent_nccl_says_how_to_point_at_it_and_what_was_tried() {
        if open("libnccl.so.2").is_ok() || open("libnccl.so").is_ok() {
            return; // a machine with NCCL on the loader path
        }
        let dir = std::env::temp_dir().join(format!("braid-nccl-absent-{}", std::process::id()));
        let d = dir.to_string_lossy().into_owned();
        let e = find(None, Some(&d)).err().unwrap_or_default();
        assert!(
            e.starts_with("NCCL not found: set BRAID_NCCL_LIBRARY"),
            "{e}"
        );
        assert!(e.contains("libnccl.so.2 (cannot load"), "{e}");
        assert!(e.contains("libnccl.so (cannot load"), "{e}");
        assert!(e.contains(&format!("{d}/libnccl.so.2 (cannot load")), "{e}");
        // A directory whose libnccl.so.2 is not NCCL: named with the reason, and the search
        // goes on (and here ends absent).
        std::fs::create_dir_all(&dir).ok();
        let fake = dir.join("libnccl.so.2");
        let libm = [
            "/lib/x86_64-linux-gnu/libm.so.6",
            "/usr/lib64/libm.so.6",
            "/lib64/libm.so.6",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
        if let Some(libm) = libm {
            std::fs::copy(libm, &fake).ok();
            let e = find(None, Some(&format!("/nonexistent-braid:{d}")))
                .err()
                .unwrap_or_default();
            assert!(
                e.contains(&format!(
                    "{d}/libnccl.so.2 (not a usable NCCL: missing symbol(s) ncclGetVersion"
                )),
                "{e}"
            );
            assert!(
                e.contains("/nonexistent-braid/libnccl.so.2 (cannot load"),
                "{e}"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn versions_print_as_nccl_does() {
        assert_eq!(version_string(22703), "2.27.3");
        assert_eq!(version_string(21903), "2.19.3");
        assert_eq!(version_string(2909), "2.9.9");
        assert_eq!(
            NcclInfo {
                version: 22805,
                path: "x".into()
            }
            .version_string(),
            "2.28.5"
        );
    }

    #[test]
    fn types_and_operators_map_to_nccls_where_it_has_them() {
        assert_eq!(nccl_dtype(DataType::F32, 22703), Some(7));
        assert_eq!(nccl_dtype(DataType::F16, 22703), Some(6));
        assert_eq!(nccl_dtype(DataType::F64, 22703), Some(8));
        assert_eq!(nccl_dtype(DataType::BF16, 22703), Some(9));
        assert_eq!(nccl_dtype(DataType::BF16, 2909), None);
        assert_eq!(nccl_dtype(DataType::I16, 22703), None);
        assert_eq!(nccl_dtype(DataType::U64, 22703), Some(5));
        assert_eq!(nccl_op(ReduceOp::Max, 22703), Some(2));
        assert_eq!(nccl_op(ReduceOp::Min, 22703), Some(3));
        assert_eq!(nccl_op(ReduceOp::Avg, 22703), Some(4));
        assert_eq!(nccl_op(ReduceOp::Avg, 2909), None);
        for o in [ReduceOp::Band, ReduceOp::Bor, ReduceOp::Bxor] {
            assert_eq!(nccl_op(o, 22703), None);
        }
    }
}
