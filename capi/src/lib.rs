//! braid's C ABI: `libbraid.so` / `libbraid.a`, declared by `include/braid.h`.
//!
//! The header is generated from this file by cbindgen (`capi/cbindgen.toml`; the test
//! `capi/tests/header.rs` checks that the committed header is current, and rewrites it with
//! `UPDATE_HEADER=1`). The rules every function follows (status codes, last error, NULL
//! handling, threads, in-place calls) are stated in the header's preamble, which lives in
//! `cbindgen.toml`.
//!
//! Every `extern "C"` function runs inside [`boundary`]: a panic never crosses into C (it
//! becomes `braid_internal_error`), and every failure stores a message in this thread's
//! last-error slot.
//!
//! Thread-local state (the only mutable state outside communicators and requests): the last
//! error message and the pending `braid_group_start`/`braid_group_end` group of this thread.

#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::mem::{offset_of, size_of};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use braid_core::coll::CollKind;
use braid_core::membership::{Coordinator, CoordinatorOptions};
use braid_core::ps::{KvServer, KvWorker, PsHandle, PsOptions, UpdateRule};
use braid_core::{
    Communicator, Config, DataType, Element, Error, ErrorClass, Handle, RawColl, RawP2p, ReduceOp,
};

mod pipeline;

// ---- version -------------------------------------------------------------------------------

/// Major version of this header (the library's is returned by braid_get_version).
pub const BRAID_VERSION_MAJOR: c_int = 0;
/// Minor version of this header.
pub const BRAID_VERSION_MINOR: c_int = 1;
/// Patch version of this header.
pub const BRAID_VERSION_PATCH: c_int = 0;
/// Version of `braid_config_t` this header describes (its fields are append-only).
pub const BRAID_CONFIG_VERSION: u32 = 1;

const _: () = assert!(
    BRAID_VERSION_MAJOR as u32 == braid_core::VERSION.0
        && BRAID_VERSION_MINOR as u32 == braid_core::VERSION.1
        && BRAID_VERSION_PATCH as u32 == braid_core::VERSION.2,
    "the C version macros must match braid::VERSION"
);

// ---- enums ---------------------------------------------------------------------------------

/// Status of a braid call. Every function that can fail returns one; on failure
/// braid_get_last_error() says why.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum braid_status_t {
    /// The call succeeded.
    braid_success = 0,
    /// A bad argument: NULL pointer, out-of-range rank/root/peer, invalid datatype or
    /// operator value, bad configuration. Reported before anything is sent; the communicator
    /// stays usable.
    braid_invalid_argument = 1,
    /// A call that is wrong in this state: ranks issued mismatched collectives, use after
    /// braid_comm_abort, a group mixing communicators, braid_group_end without
    /// braid_group_start. Sticky on the communicator when it comes from communication.
    braid_invalid_usage = 2,
    /// The operating system failed a call (socket, thread, memory). Sticky.
    braid_system_error = 3,
    /// A peer was lost or reported an error (or the coordinator failed). Sticky.
    braid_remote_error = 4,
    /// A deadline passed (BRAID_TIMEOUT, BRAID_INIT_TIMEOUT, config timeout_s). Sticky.
    braid_timeout = 5,
    /// A bug in braid (including a caught Rust panic). Sticky.
    braid_internal_error = 6,
    /// An operation has not completed yet. Reserved for non-blocking communicator set-up;
    /// not returned by this release (braid_test reports progress through its `done` flag).
    braid_in_progress = 7,
}

/// Element type of a buffer. Values other than those listed give braid_invalid_argument.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum braid_datatype_t {
    /// int8_t.
    braid_int8 = 0,
    /// uint8_t.
    braid_uint8 = 1,
    /// int32_t.
    braid_int32 = 2,
    /// uint32_t.
    braid_uint32 = 3,
    /// int64_t.
    braid_int64 = 4,
    /// uint64_t.
    braid_uint64 = 5,
    /// IEEE 754 half precision (binary16), passed as 16-bit patterns.
    braid_float16 = 6,
    /// bfloat16, passed as 16-bit patterns.
    braid_bfloat16 = 7,
    /// float.
    braid_float32 = 8,
    /// double.
    braid_float64 = 9,
    /// int16_t.
    braid_int16 = 10,
}

/// Reduction operator. Values other than those listed give braid_invalid_argument. The bitwise
/// operators (braid_band, braid_bor, braid_bxor) apply to the integer datatypes only: with
/// braid_float16, braid_bfloat16, braid_float32 or braid_float64 a call returns
/// braid_invalid_argument naming the operator and the datatype, before anything is sent (the
/// communicator stays usable).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum braid_redop_t {
    /// Sum.
    braid_sum = 0,
    /// Product.
    braid_prod = 1,
    /// Minimum.
    braid_min = 2,
    /// Maximum.
    braid_max = 3,
    /// Average: the sum divided by the number of ranks (integer division for integer types).
    braid_avg = 4,
    /// Bitwise AND (integer datatypes only).
    braid_band = 5,
    /// Bitwise OR (integer datatypes only).
    braid_bor = 6,
    /// Bitwise exclusive OR (integer datatypes only).
    braid_bxor = 7,
}

/// A `braid_datatype_t` as received from C: any int (an out-of-range value must not become a
/// Rust enum). Named `braid_datatype_t` in the header.
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct DatatypeArg(pub c_int);

/// A `braid_redop_t` as received from C. Named `braid_redop_t` in the header.
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct RedopArg(pub c_int);

/// A `braid_status_t` as received from C. Named `braid_status_t` in the header.
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct StatusArg(pub c_int);

// ---- configuration -------------------------------------------------------------------------

/// Configuration of braid_comm_init. Initialise it with BRAID_CONFIG_INITIALIZER or
/// braid_config_init(), then set the fields you need; fields left unset come from the
/// environment (BRAID_COORDINATOR, BRAID_WORLD_SIZE, BRAID_RANK, BRAID_TIMEOUT,
/// BRAID_TRANSPORT, ... as set by braid-run, torchrun, mpirun or SLURM). Set fields win over
/// the environment. Strings are read during braid_comm_init only.
///
/// Compatibility: fields are only ever appended. `size` (sizeof(braid_config_t) of the
/// caller's header) and `version` let a newer library read an older caller's struct (fields
/// beyond `size` count as unset) and an older library ignore a newer caller's extra fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct braid_config_t {
    /// sizeof(braid_config_t) as the caller compiled it.
    pub size: usize,
    /// BRAID_CONFIG_VERSION as the caller compiled it (must not be 0).
    pub version: u32,
    /// Coordinator address "host:port"; NULL: unset.
    pub coordinator: *const c_char,
    /// Number of ranks (>= 1); -1: unset.
    pub world_size: c_int,
    /// This process's rank (0 <= rank < world_size); -1: unset (the coordinator assigns
    /// ranks by arrival).
    pub rank: c_int,
    /// Deadline in seconds of every blocking wait of an operation; <= 0: unset.
    pub timeout_s: f64,
    /// Transport between ranks ("auto", "tcp", ...; see BRAID_TRANSPORT); NULL: unset.
    pub transport: *const c_char,
    /// Job token (as BRAID_JOB_TOKEN: the coordinator and every rank must present the same
    /// one; HMAC-SHA256, never sent); NULL: unset (the environment decides).
    pub job_token: *const c_char,
}

// ---- opaque objects ------------------------------------------------------------------------

/// A communicator (opaque). Created by braid_comm_init / braid_comm_init_rank, freed by
/// braid_comm_destroy.
pub struct braid_comm {
    comm: Communicator,
    /// Buffers from braid_mem_alloc not yet freed, by address.
    mem: std::sync::Mutex<std::collections::HashMap<usize, braid_core::SharedBuf<u8>>>,
}

/// Handle of a communicator. Using it after braid_comm_destroy is undefined behaviour (the
/// library cannot detect a dangling pointer).
pub type braid_comm_t = *mut braid_comm;

/// A non-blocking operation (opaque). Created by the braid_i* functions, freed by
/// braid_request_free.
pub struct braid_request {
    handle: Option<Handle<()>>,
    result: Option<Result<(), Fail>>,
}

/// Handle of a non-blocking operation. Using it after braid_request_free is undefined
/// behaviour.
pub type braid_request_t = *mut braid_request;

// ---- errors and the panic boundary ---------------------------------------------------------

/// A failed call: its status and message.
#[derive(Debug, Clone)]
struct Fail {
    status: braid_status_t,
    msg: String,
}

impl Fail {
    fn arg(msg: impl Into<String>) -> Fail {
        Fail {
            status: braid_status_t::braid_invalid_argument,
            msg: format!("invalid argument: {}", msg.into()),
        }
    }

    fn usage(msg: impl Into<String>) -> Fail {
        Fail {
            status: braid_status_t::braid_invalid_usage,
            msg: format!("invalid usage: {}", msg.into()),
        }
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail {
            status: status_of(e.class()),
            msg: e.to_string(),
        }
    }
}

/// The status code of an error class.
fn status_of(c: ErrorClass) -> braid_status_t {
    match c {
        ErrorClass::InvalidArgument => braid_status_t::braid_invalid_argument,
        ErrorClass::InvalidUsage => braid_status_t::braid_invalid_usage,
        ErrorClass::System => braid_status_t::braid_system_error,
        ErrorClass::Remote => braid_status_t::braid_remote_error,
        ErrorClass::Timeout => braid_status_t::braid_timeout,
        ErrorClass::Internal => braid_status_t::braid_internal_error,
    }
}

type CResult<T = ()> = Result<T, Fail>;

thread_local! {
    /// This thread's last failure message (what braid_get_last_error returns).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
    /// This thread's open group (braid_group_start .. braid_group_end).
    static GROUP: RefCell<GroupState> = RefCell::new(GroupState::default());
}

fn set_last_error(func: &str, msg: &str) {
    let text = format!("{func}: {msg}").replace('\0', " ");
    let c = CString::new(text).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Runs the body of an `extern "C"` function: catches panics (internal error) and records the
/// message of a failure in this thread's last error.
fn boundary(func: &'static str, f: impl FnOnce() -> CResult) -> braid_status_t {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => braid_status_t::braid_success,
        Ok(Err(fail)) => {
            set_last_error(func, &fail.msg);
            fail.status
        }
        Err(p) => {
            set_last_error(
                func,
                &format!("internal error: panic inside braid: {}", panic_message(&*p)),
            );
            braid_status_t::braid_internal_error
        }
    }
}

// ---- argument helpers ----------------------------------------------------------------------

/// The communicator behind a handle.
///
/// # Safety
/// `comm` is NULL or a handle from braid_comm_init* not yet destroyed.
unsafe fn comm_ref<'a>(comm: braid_comm_t) -> CResult<&'a braid_comm> {
    // SAFETY: per this function's contract, a non-NULL `comm` points to a live braid_comm
    // (created by Box::into_raw in braid_comm_init*, freed only by braid_comm_destroy).
    unsafe { comm.cast_const().as_ref() }.ok_or_else(|| Fail::arg("comm is NULL"))
}

fn dtype_of(d: DatatypeArg) -> CResult<DataType> {
    Ok(match d.0 {
        0 => DataType::I8,
        1 => DataType::U8,
        2 => DataType::I32,
        3 => DataType::U32,
        4 => DataType::I64,
        5 => DataType::U64,
        6 => DataType::F16,
        7 => DataType::BF16,
        8 => DataType::F32,
        9 => DataType::F64,
        10 => DataType::I16,
        v => return Err(Fail::arg(format!("datatype {v} is not a braid_datatype_t"))),
    })
}

fn op_of(o: RedopArg) -> CResult<ReduceOp> {
    Ok(match o.0 {
        0 => ReduceOp::Sum,
        1 => ReduceOp::Prod,
        2 => ReduceOp::Min,
        3 => ReduceOp::Max,
        4 => ReduceOp::Avg,
        5 => ReduceOp::Band,
        6 => ReduceOp::Bor,
        7 => ReduceOp::Bxor,
        v => return Err(Fail::arg(format!("op {v} is not a braid_redop_t"))),
    })
}

fn rank_arg(what: &str, v: c_int, size: usize) -> CResult<usize> {
    match usize::try_from(v) {
        Ok(r) if r < size => Ok(r),
        _ => Err(Fail::arg(format!(
            "{what} {v} is not a rank of this communicator (size {size})"
        ))),
    }
}

/// Writes `v` through an out-pointer.
///
/// # Safety
/// `p` is NULL or valid for a write of `T`.
unsafe fn put<T>(p: *mut T, what: &str, v: T) -> CResult {
    if p.is_null() {
        return Err(Fail::arg(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL, and valid for writes per this function's contract.
    unsafe { p.write(v) };
    Ok(())
}

fn in_group() -> bool {
    GROUP.try_with(|g| g.borrow().depth > 0).unwrap_or(false)
}

/// Stores a new request in `*req` (which was checked non-NULL by the caller).
///
/// # Safety
/// `req` is valid for a write.
unsafe fn store_request(req: *mut braid_request_t, h: Handle<()>) {
    let r = Box::into_raw(Box::new(braid_request {
        handle: Some(h),
        result: None,
    }));
    // SAFETY: the caller checked `req` and guarantees it is valid for a write.
    unsafe { req.write(r) };
}

/// Clears `*req` (so a failed call leaves NULL) or fails when `req` is NULL.
///
/// # Safety
/// `req` is NULL or valid for a write.
unsafe fn reset_request(req: *mut braid_request_t) -> CResult {
    // SAFETY: forwarded contract.
    unsafe { put(req, "req", std::ptr::null_mut()) }
}

// ---- collectives (shared body) -------------------------------------------------------------

struct CollArgs {
    kind: CollKind,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    dtype: DatatypeArg,
    op: Option<RedopArg>,
    root: Option<c_int>,
}

/// The start shared by every collective entry point: clears `*req` (non-blocking forms),
/// resolves `comm` and refuses collectives inside a group.
///
/// # Safety
/// `req` is None or holds NULL or a valid out-pointer; `comm` is NULL or a live communicator.
unsafe fn coll_start<'a>(
    comm: braid_comm_t,
    req: Option<*mut braid_request_t>,
) -> CResult<&'a braid_comm> {
    if let Some(r) = req {
        // SAFETY: `req` is NULL or a valid out-pointer (caller contract).
        unsafe { reset_request(r) }?;
    }
    // SAFETY: caller contract (a live communicator or NULL).
    let c = unsafe { comm_ref(comm) }?;
    if in_group() {
        return Err(Fail::usage(
            "collectives cannot be issued between braid_group_start and braid_group_end \
             (groups hold braid_send/braid_recv only)",
        ));
    }
    Ok(c)
}

/// Body of every collective: blocking when `req` is None, else non-blocking.
///
/// # Safety
/// The buffer and handle contracts of the public function that calls it.
unsafe fn coll(
    func: &'static str,
    a: CollArgs,
    comm: braid_comm_t,
    req: Option<*mut braid_request_t>,
) -> braid_status_t {
    boundary(func, || {
        // SAFETY: caller contract (`req` NULL or writable, `comm` NULL or live).
        let c = unsafe { coll_start(comm, req) }?;
        let dtype = dtype_of(a.dtype)?;
        let op = match a.op {
            Some(o) => op_of(o)?,
            None => ReduceOp::Sum,
        };
        let root = match a.root {
            Some(r) => rank_arg("root", r, c.comm.size())?,
            None => 0,
        };
        let rc = RawColl {
            kind: a.kind,
            dtype,
            op,
            count: a.count,
            root,
        };
        match req {
            None => {
                // SAFETY: the caller guarantees the buffers are valid for the lengths this
                // collective implies (documented per function) for the duration of the call.
                unsafe { c.comm.coll_raw(rc, a.send.cast(), a.recv.cast()) }?;
            }
            Some(r) => {
                // SAFETY: as above, and the caller keeps the buffers valid and untouched until
                // the request completes (documented on every braid_i* function).
                let h = unsafe { c.comm.icoll_raw(rc, a.send.cast(), a.recv.cast()) }?;
                // SAFETY: `r` was checked non-NULL by reset_request above.
                unsafe { store_request(r, h) };
            }
        }
        Ok(())
    })
}

// ---- point-to-point and groups -------------------------------------------------------------

/// This thread's open group: the sends and receives issued since braid_group_start.
#[derive(Default)]
struct GroupState {
    depth: u32,
    comm: Option<*const braid_comm>,
    ops: Vec<RawP2p>,
    failed: Option<Fail>,
}

struct P2pArgs {
    send: bool,
    buf: *mut c_void,
    count: usize,
    dtype: DatatypeArg,
    peer: c_int,
    tag: u64,
}

/// Body of braid_send/recv/isend/irecv.
///
/// # Safety
/// The buffer and handle contracts of the public function that calls it.
unsafe fn p2p(
    func: &'static str,
    a: P2pArgs,
    comm: braid_comm_t,
    req: Option<*mut braid_request_t>,
) -> braid_status_t {
    boundary(func, || {
        if let Some(r) = req {
            // SAFETY: `req` is NULL or a valid out-pointer (caller contract).
            unsafe { reset_request(r) }?;
        }
        let grouped = in_group();
        let res = (|| {
            // SAFETY: caller contract (a live communicator or NULL).
            let c = unsafe { comm_ref(comm) }?;
            let dtype = dtype_of(a.dtype)?;
            let peer = rank_arg("peer", a.peer, c.comm.size())?;
            if a.count > 0 && a.buf.is_null() {
                return Err(Fail::arg("buf is NULL"));
            }
            let op = RawP2p {
                send: a.send,
                buf: a.buf.cast(),
                count: a.count,
                dtype,
                peer,
                tag: a.tag,
            };
            if grouped {
                if req.is_some() {
                    return Err(Fail::usage(
                        "braid_isend/braid_irecv cannot be issued inside a group; use \
                         braid_send/braid_recv there (braid_group_end runs them)",
                    ));
                }
                return GROUP
                    .try_with(|g| {
                        let mut g = g.borrow_mut();
                        let this = comm.cast_const();
                        match g.comm {
                            Some(p) if p != this => Err(Fail::usage(
                                "a group may hold operations of one communicator only",
                            )),
                            _ => {
                                g.comm = Some(this);
                                g.ops.push(op);
                                Ok(())
                            }
                        }
                    })
                    .unwrap_or_else(|_| Err(Fail::usage("thread is exiting")));
            }
            match req {
                None => {
                    // SAFETY: the caller guarantees `buf` is valid for `count` elements for
                    // the duration of the call.
                    unsafe { c.comm.p2p_raw(&[op]) }?;
                }
                Some(r) => {
                    // SAFETY: as above, until the request completes (documented).
                    let h = unsafe { c.comm.ip2p_raw(&[op]) }?;
                    // SAFETY: `r` was checked non-NULL by reset_request above.
                    unsafe { store_request(r, h) };
                }
            }
            Ok(())
        })();
        if grouped {
            if let Err(f) = &res {
                // The group will not run: braid_group_end reports the first failure.
                let _ = GROUP.try_with(|g| {
                    let mut g = g.borrow_mut();
                    if g.failed.is_none() {
                        g.failed = Some(f.clone());
                    }
                });
            }
        }
        res
    })
}

// ---- exported functions: library -----------------------------------------------------------

/// Writes the library's version as MAJOR*10000 + MINOR*100 + PATCH to `*version` (compare with
/// BRAID_VERSION_CODE of the header you compiled with).
///
/// # Safety
/// `version` is NULL (braid_invalid_argument) or valid for writing an int.
#[no_mangle]
pub unsafe extern "C" fn braid_get_version(version: *mut c_int) -> braid_status_t {
    boundary("braid_get_version", || {
        let v = BRAID_VERSION_MAJOR * 10000 + BRAID_VERSION_MINOR * 100 + BRAID_VERSION_PATCH;
        // SAFETY: caller contract.
        unsafe { put(version, "version", v) }
    })
}

/// A static, human-readable name of a status ("braid_success", ...; "unknown braid status"
/// for other values). Never NULL; never fails.
#[no_mangle]
pub extern "C" fn braid_status_string(status: StatusArg) -> *const c_char {
    let s: &'static CStr = match status.0 {
        0 => c"braid_success: no error",
        1 => c"braid_invalid_argument: invalid argument",
        2 => c"braid_invalid_usage: invalid usage",
        3 => c"braid_system_error: system error",
        4 => c"braid_remote_error: remote error (peer lost or failed)",
        5 => c"braid_timeout: timeout",
        6 => c"braid_internal_error: internal error",
        7 => c"braid_in_progress: operation in progress",
        _ => c"unknown braid status",
    };
    s.as_ptr()
}

/// This thread's last failure message ("" if no call of this thread has failed). The message
/// names the function and the cause (for a collective mismatch it contains "mismatch" and
/// both signatures). The pointer stays valid until this thread's next braid call. A successful
/// call does not clear it. Never NULL.
#[no_mangle]
pub extern "C" fn braid_get_last_error() -> *const c_char {
    catch_unwind(|| {
        LAST_ERROR
            .try_with(|e| e.borrow().as_ptr())
            .unwrap_or(c"".as_ptr())
    })
    .unwrap_or(c"".as_ptr())
}

/// Initialises `*config` with "everything unset" (the values of BRAID_CONFIG_INITIALIZER).
///
/// # Safety
/// `config` is NULL (braid_invalid_argument) or valid for writing a braid_config_t.
#[no_mangle]
pub unsafe extern "C" fn braid_config_init(config: *mut braid_config_t) -> braid_status_t {
    boundary("braid_config_init", || {
        let c = braid_config_t {
            size: size_of::<braid_config_t>(),
            version: BRAID_CONFIG_VERSION,
            coordinator: std::ptr::null(),
            world_size: -1,
            rank: -1,
            timeout_s: 0.0,
            transport: std::ptr::null(),
            job_token: std::ptr::null(),
        };
        // SAFETY: caller contract.
        unsafe { put(config, "config", c) }
    })
}

// ---- exported functions: communicators -----------------------------------------------------

/// Reads a field of a caller's config if its `size` covers it.
macro_rules! field {
    ($cfg:expr, $size:expr, $f:ident) => {
        if $size >= offset_of!(braid_config_t, $f) + size_of_field(|c: &braid_config_t| &c.$f) {
            // SAFETY: the caller's struct is at least `size` bytes long (contract of
            // braid_comm_init) and this field lies inside it; read_unaligned tolerates any
            // alignment.
            Some(unsafe { std::ptr::addr_of!((*$cfg).$f).read_unaligned() })
        } else {
            None
        }
    };
}

fn size_of_field<T>(_: impl Fn(&braid_config_t) -> &T) -> usize {
    size_of::<T>()
}

/// Reads an optional C string argument.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn opt_str(p: *const c_char, what: &str) -> CResult<Option<String>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL and NUL-terminated per contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(|s| Some(s.to_string()))
        .map_err(|_| Fail::arg(format!("{what} is not UTF-8")))
}

/// Builds a communicator from an optional caller config (unset fields from the environment).
///
/// # Safety
/// `config` is NULL or points to at least `config->size` readable bytes.
unsafe fn init_comm(config: *const braid_config_t) -> CResult<Box<braid_comm>> {
    // SAFETY: forwarded contract.
    let cfg = unsafe { config_of(config) }?;
    let comm = Communicator::init_with(cfg)?;
    Ok(Box::new(braid_comm {
        comm,
        mem: std::sync::Mutex::new(std::collections::HashMap::new()),
    }))
}

/// The configuration of an optional caller config: set fields win, unset ones come from the
/// environment.
///
/// # Safety
/// `config` is NULL or points to at least `config->size` readable bytes whose string fields
/// are NULL or NUL-terminated.
unsafe fn config_of(config: *const braid_config_t) -> CResult<Config> {
    let mut over: Vec<(&'static str, String)> = Vec::new();
    if !config.is_null() {
        // SAFETY: non-NULL; the first field is always present (the caller's struct begins with
        // `size_t size`).
        let size = unsafe { std::ptr::addr_of!((*config).size).read_unaligned() };
        if size < offset_of!(braid_config_t, version) + size_of::<u32>() {
            return Err(Fail::arg(format!(
                "config->size is {size}: initialise the config with BRAID_CONFIG_INITIALIZER or \
                 braid_config_init"
            )));
        }
        let version = field!(config, size, version).unwrap_or(0);
        if version == 0 {
            return Err(Fail::arg(
                "config->version is 0: initialise the config with BRAID_CONFIG_INITIALIZER or \
                 braid_config_init",
            ));
        }
        if let Some(p) = field!(config, size, coordinator) {
            // SAFETY: a non-NULL field is a NUL-terminated string (documented).
            if let Some(s) = unsafe { opt_str(p, "config->coordinator") }? {
                over.push(("BRAID_COORDINATOR", s));
            }
        }
        if let Some(n) = field!(config, size, world_size) {
            match n {
                -1 => {}
                n if n >= 1 => over.push(("BRAID_WORLD_SIZE", n.to_string())),
                n => {
                    return Err(Fail::arg(format!(
                        "config->world_size is {n}: expected >= 1 or -1 (unset)"
                    )))
                }
            }
        }
        if let Some(r) = field!(config, size, rank) {
            match r {
                -1 => {}
                r if r >= 0 => over.push(("BRAID_RANK", r.to_string())),
                r => {
                    return Err(Fail::arg(format!(
                        "config->rank is {r}: expected >= 0 or -1 (unset)"
                    )))
                }
            }
        }
        if let Some(t) = field!(config, size, timeout_s) {
            if t.is_nan() || t > braid_core::config::MAX_SECS {
                return Err(Fail::arg(format!(
                    "config->timeout_s is {t}: expected a finite number of seconds up to {:e} \
                     (<= 0: unset)",
                    braid_core::config::MAX_SECS
                )));
            }
            if t > 0.0 {
                over.push(("BRAID_TIMEOUT", format!("{t}")));
            }
        }
        if let Some(p) = field!(config, size, transport) {
            // SAFETY: as for coordinator.
            if let Some(s) = unsafe { opt_str(p, "config->transport") }? {
                over.push(("BRAID_TRANSPORT", s));
            }
        }
        if let Some(p) = field!(config, size, job_token) {
            // SAFETY: a non-NULL field is a NUL-terminated string (documented).
            if let Some(s) = unsafe { opt_str(p, "config->job_token") }? {
                over.push(("BRAID_JOB_TOKEN", s));
            }
        }
    }
    // Set fields win; everything else comes from the environment as Config::from_env reads it
    // (and unknown BRAID_* names warn, as there).
    let cfg = Config::from_lookup(|k| {
        over.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
            .or_else(|| braid_core::config::var(k))
    })?;
    cfg.announce();
    Ok(cfg)
}

/// Creates a communicator (collective over all ranks of the job: every rank must call it).
/// `config` may be NULL: everything comes from the environment (as set by braid-run,
/// torchrun, mpirun or SLURM). On failure `*comm` is set to NULL.
///
/// Errors: braid_invalid_argument (NULL `comm`, bad config or environment), braid_remote_error
/// (coordinator unreachable or refusing), braid_timeout (BRAID_INIT_TIMEOUT passed),
/// braid_system_error.
///
/// # Safety
/// `comm` is NULL or valid for a write; `config` is NULL or a braid_config_t initialised as
/// documented whose string fields are NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn braid_comm_init(
    comm: *mut braid_comm_t,
    config: *const braid_config_t,
) -> braid_status_t {
    boundary("braid_comm_init", || {
        // SAFETY: caller contract.
        unsafe { put(comm, "comm", std::ptr::null_mut()) }?;
        // SAFETY: caller contract.
        let c = unsafe { init_comm(config) }?;
        // SAFETY: checked non-NULL above; caller contract.
        unsafe { comm.write(Box::into_raw(c)) };
        Ok(())
    })
}

/// Creates a communicator of `nranks` ranks in which this process is `rank`, meeting at the
/// coordinator "host:port" `coordinator` (like ncclCommInitRank, with the coordinator address
/// in the role of the unique id). The coordinator must be running (braid-run starts one and
/// exports BRAID_COORDINATOR; or run braid-coordinator). `coordinator` may be NULL: taken from
/// the environment. Other settings come from the environment. On failure `*comm` is NULL.
///
/// Errors: as braid_comm_init; braid_invalid_argument when nranks < 1 or rank is not in
/// [0, nranks).
///
/// # Safety
/// `comm` is NULL or valid for a write; `coordinator` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn braid_comm_init_rank(
    comm: *mut braid_comm_t,
    nranks: c_int,
    rank: c_int,
    coordinator: *const c_char,
) -> braid_status_t {
    boundary("braid_comm_init_rank", || {
        // SAFETY: caller contract.
        unsafe { put(comm, "comm", std::ptr::null_mut()) }?;
        if nranks < 1 {
            return Err(Fail::arg(format!("nranks is {nranks}: expected >= 1")));
        }
        if rank < 0 || rank >= nranks {
            return Err(Fail::arg(format!("rank {rank} is not in [0, {nranks})")));
        }
        let cfg = braid_config_t {
            size: size_of::<braid_config_t>(),
            version: BRAID_CONFIG_VERSION,
            coordinator,
            world_size: nranks,
            rank,
            timeout_s: 0.0,
            transport: std::ptr::null(),
            job_token: std::ptr::null(),
        };
        // SAFETY: `cfg` is a full struct; `coordinator` is NULL or NUL-terminated (contract).
        let c = unsafe { init_comm(&cfg) }?;
        // SAFETY: checked non-NULL above; caller contract.
        unsafe { comm.write(Box::into_raw(c)) };
        Ok(())
    })
}

/// Writes this process's rank in `comm` to `*rank`.
///
/// # Safety
/// `comm` is NULL or a live communicator; `rank` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_comm_rank(comm: braid_comm_t, rank: *mut c_int) -> braid_status_t {
    boundary("braid_comm_rank", || {
        // SAFETY: caller contract.
        let c = unsafe { comm_ref(comm) }?;
        let r = c_int::try_from(c.comm.rank()).map_err(|_| Fail::arg("rank overflows int"))?;
        // SAFETY: caller contract.
        unsafe { put(rank, "rank", r) }
    })
}

/// Writes the number of ranks of `comm` to `*size`.
///
/// # Safety
/// `comm` is NULL or a live communicator; `size` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_comm_size(comm: braid_comm_t, size: *mut c_int) -> braid_status_t {
    boundary("braid_comm_size", || {
        // SAFETY: caller contract.
        let c = unsafe { comm_ref(comm) }?;
        let n = c_int::try_from(c.comm.size()).map_err(|_| Fail::arg("size overflows int"))?;
        // SAFETY: caller contract.
        unsafe { put(size, "size", n) }
    })
}

/// Aborts `comm`: pending and later operations on it fail (braid_invalid_usage, "communicator
/// aborted"; that error is sticky) and the peers are told, so they fail instead of hanging.
/// May be called from any thread at any time, also while another thread is blocked in a call
/// on `comm`; returns quickly. braid_comm_destroy is still needed to free it.
///
/// # Safety
/// `comm` is NULL or a live communicator.
#[no_mangle]
pub unsafe extern "C" fn braid_comm_abort(comm: braid_comm_t) -> braid_status_t {
    boundary("braid_comm_abort", || {
        // SAFETY: caller contract.
        let c = unsafe { comm_ref(comm) }?;
        c.comm.abort();
        Ok(())
    })
}

/// Writes this process's member id (assigned by the coordinator, never reused) to `*id`.
///
/// # Safety
/// `comm` is NULL or a live communicator; `id` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_comm_member_id(comm: braid_comm_t, id: *mut u64) -> braid_status_t {
    boundary("braid_comm_member_id", || {
        // SAFETY: caller contract.
        let c = unsafe { comm_ref(comm) }?;
        // SAFETY: caller contract.
        unsafe { put(id, "id", c.comm.member_id()) }
    })
}

/// Writes the epoch of the membership view `comm` runs on to `*epoch`.
///
/// # Safety
/// `comm` is NULL or a live communicator; `epoch` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_comm_epoch(comm: braid_comm_t, epoch: *mut u64) -> braid_status_t {
    boundary("braid_comm_epoch", || {
        // SAFETY: caller contract.
        let c = unsafe { comm_ref(comm) }?;
        // SAFETY: caller contract.
        unsafe { put(epoch, "epoch", c.comm.view().epoch) }
    })
}

/// Elastic groups (BRAID_ELASTIC=1): adopts the next membership view, if there is one, at a
/// point every member agrees on (collective over the current view; call it on every rank
/// between training steps). `*changed` is set to 1 when the view changed (rank and size may
/// differ: read them again; then call braid_sync_from_oldest so joiners get the state), else 0.
/// After a failure (braid_remote_error from a collective: a peer was lost) it moves the
/// survivors into the next view without the lost member and clears the error. No other call
/// on `comm` may run concurrently.
///
/// Errors: the sticky error on groups that are not elastic; braid_invalid_usage after abort or
/// after this member left; braid_remote_error when the coordinator removed this member;
/// braid_timeout when no view arrives within BRAID_INIT_TIMEOUT.
///
/// # Safety
/// `comm` is NULL or a live communicator not used by another thread during the call; `changed`
/// is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_comm_update(
    comm: braid_comm_t,
    changed: *mut c_int,
) -> braid_status_t {
    boundary("braid_comm_update", || {
        if changed.is_null() {
            return Err(Fail::arg("changed is NULL"));
        }
        // SAFETY: non-NULL `comm` is live and not shared during this call (contract).
        let c = unsafe { comm.as_mut() }.ok_or_else(|| Fail::arg("comm is NULL"))?;
        let v = c.comm.update()?;
        // SAFETY: caller contract; checked non-NULL.
        unsafe { put(changed, "changed", c_int::from(v)) }
    })
}

/// Elastic groups: announces a graceful leave. Keep calling collectives and braid_comm_update
/// as usual; the update that excludes this member sets `*changed` and braid_comm_has_left
/// reports 1; then destroy the communicator.
///
/// # Safety
/// `comm` is NULL or a live communicator not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn braid_comm_leave(comm: braid_comm_t) -> braid_status_t {
    boundary("braid_comm_leave", || {
        // SAFETY: caller contract.
        let c = unsafe { comm.as_mut() }.ok_or_else(|| Fail::arg("comm is NULL"))?;
        c.comm.leave()?;
        Ok(())
    })
}

/// Writes 1 to `*left` when this member left the group (see braid_comm_leave), else 0.
///
/// # Safety
/// `comm` is NULL or a live communicator; `left` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_comm_has_left(
    comm: braid_comm_t,
    left: *mut c_int,
) -> braid_status_t {
    boundary("braid_comm_has_left", || {
        // SAFETY: caller contract.
        let c = unsafe { comm_ref(comm) }?;
        // SAFETY: caller contract.
        unsafe { put(left, "left", c_int::from(c.comm.has_left())) }
    })
}

/// Broadcasts `count` elements of `buf` from the member with the smallest id (the oldest) to
/// every rank, in place: after a view change, joiners receive the current parameters.
/// Collective.
///
/// # Safety
/// `buf` valid for `count` elements for the duration of the call; `comm` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn braid_sync_from_oldest(
    buf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    comm: braid_comm_t,
) -> braid_status_t {
    let root = {
        // SAFETY: caller contract.
        match unsafe { comm_ref(comm) } {
            Ok(c) => c_int::try_from(c.comm.oldest_rank()).unwrap_or(0),
            Err(_) => 0,
        }
    };
    let a = CollArgs {
        kind: CollKind::Broadcast,
        send: buf.cast_const(),
        recv: buf,
        count,
        dtype: datatype,
        op: None,
        root: Some(root),
    };
    // SAFETY: this function's contract.
    unsafe { coll("braid_sync_from_oldest", a, comm, None) }
}

/// Frees `comm` and everything it holds (connections, threads). Valid after braid_comm_abort.
/// Operations still running are failed first; their requests stay valid until freed. No other
/// thread may use `comm` during or after this call (use after destroy is undefined
/// behaviour). NULL is a no-op returning braid_success.
///
/// # Safety
/// `comm` is NULL or a live communicator not used by any other thread.
#[no_mangle]
pub unsafe extern "C" fn braid_comm_destroy(comm: braid_comm_t) -> braid_status_t {
    boundary("braid_comm_destroy", || {
        if !comm.is_null() {
            // SAFETY: `comm` came from Box::into_raw in braid_comm_init* and is freed once
            // (caller contract).
            drop(unsafe { Box::from_raw(comm) });
        }
        Ok(())
    })
}

// ---- exported functions: coordinator ------------------------------------------------------

/// A coordinator service (opaque): the rendezvous and membership service communicators meet
/// at, hosted in this process. Created by braid_coordinator_start, stopped and freed by
/// braid_coordinator_destroy.
pub struct braid_coordinator {
    coord: Coordinator,
}

/// Handle of a coordinator. Using it after braid_coordinator_destroy is undefined behaviour.
pub type braid_coordinator_t = *mut braid_coordinator;

/// Starts a coordinator service in this process, listening on `bind_addr` ("host:port"; port 0
/// picks a free port, see braid_coordinator_port; NULL means "0.0.0.0:0"), before any
/// communicator exists: a launcher (e.g. rank 0 of a torch.distributed process group) starts
/// it, publishes "its-host:port", and every rank (this process's too) then calls
/// braid_comm_init with a braid_config_t whose `coordinator` is that address (and whose
/// `job_token` is `job_token`, when one is set). `job_token` NULL or "": no token (any client
/// is accepted); otherwise every client must answer an HMAC-SHA256 challenge keyed by it
/// (BRAID_JOB_TOKEN). Nothing is read from the environment. The service runs on its own
/// threads until braid_coordinator_destroy. On failure `*coord` is set to NULL.
///
/// Errors: braid_invalid_argument (NULL `coord`, strings not UTF-8); braid_system_error (the
/// address cannot be bound, e.g. the port is in use or the host is not local; threads cannot
/// start).
///
/// # Safety
/// `coord` is NULL or valid for a write; `bind_addr` and `job_token` are NULL or
/// NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn braid_coordinator_start(
    bind_addr: *const c_char,
    job_token: *const c_char,
    coord: *mut braid_coordinator_t,
) -> braid_status_t {
    boundary("braid_coordinator_start", || {
        // SAFETY: caller contract.
        unsafe { put(coord, "coord", std::ptr::null_mut()) }?;
        // SAFETY: caller contract (NULL or NUL-terminated).
        let addr =
            unsafe { opt_str(bind_addr, "bind_addr") }?.unwrap_or_else(|| "0.0.0.0:0".to_string());
        // SAFETY: as above.
        let token = unsafe { opt_str(job_token, "job_token") }?.filter(|t| !t.is_empty());
        let opts = CoordinatorOptions {
            job_token: token.map(String::into_bytes),
            ..CoordinatorOptions::default()
        };
        let c = Coordinator::bind_with(&addr, opts)?;
        let b = Box::new(braid_coordinator { coord: c });
        // SAFETY: checked non-NULL above; caller contract.
        unsafe { coord.write(Box::into_raw(b)) };
        Ok(())
    })
}

/// Writes the TCP port the coordinator listens on to `*port` (the port chosen by the system
/// when it was started on port 0).
///
/// # Safety
/// `coord` is NULL or a live coordinator; `port` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_coordinator_port(
    coord: braid_coordinator_t,
    port: *mut c_int,
) -> braid_status_t {
    boundary("braid_coordinator_port", || {
        // SAFETY: per contract, a non-NULL `coord` came from Box::into_raw in
        // braid_coordinator_start and has not been destroyed.
        let c = unsafe { coord.cast_const().as_ref() }.ok_or_else(|| Fail::arg("coord is NULL"))?;
        let p = c_int::from(c.coord.local_addr().port());
        // SAFETY: caller contract.
        unsafe { put(port, "port", p) }
    })
}

/// Writes the coordinator's status document (JSON, the one `braid-coordinator status ADDR`
/// prints), NUL-terminated, into `buf` (`cap` bytes) and its length without the NUL to `*len`.
/// The document holds: `next_member_id`; `groups`, one object per group with members
/// registered now: `group`, `elastic`, `world_size`, `epoch` and `size` of the current view
/// (null before the first view), `members` (rank, id, host, pid, role, alive, heartbeat age,
/// ...), `joiners`, `history`, `checkpoint`, `live` (members and joiners registered now) and
/// `registered_total` (registrations this coordinator accepted for the group since it
/// started); `live_members` (members and joiners registered now, over all groups);
/// `registered_total` (registrations since it started, over all groups, forgotten ones
/// included); `past_groups` (groups whose members all left and that the coordinator forgot:
/// `group`, `registered_total`). "Members came and all left" is `registered_total > 0` and
/// `live_members == 0`.
///
/// Errors: braid_invalid_argument for a NULL `coord` or `len`, a NULL `buf` with `cap` > 0,
/// or `cap` smaller than the length + 1: then `*len` is the length needed (without the NUL)
/// and `buf` is left untouched (call again with a buffer of `*len + 1` bytes; the document
/// may have grown meanwhile).
///
/// # Safety
/// `coord` is NULL or a live coordinator; `buf` is NULL or valid for writing `cap` bytes;
/// `len` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_coordinator_status(
    coord: braid_coordinator_t,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> braid_status_t {
    boundary("braid_coordinator_status", || {
        // SAFETY: per contract, a non-NULL `coord` came from Box::into_raw in
        // braid_coordinator_start and has not been destroyed.
        let c = unsafe { coord.cast_const().as_ref() }.ok_or_else(|| Fail::arg("coord is NULL"))?;
        if len.is_null() {
            return Err(Fail::arg("len is NULL"));
        }
        let doc = c.coord.status().to_string();
        let n = doc.len();
        // SAFETY: checked non-NULL above; caller contract.
        unsafe { len.write(n) };
        if buf.is_null() && cap > 0 {
            return Err(Fail::arg("buf is NULL"));
        }
        if cap <= n {
            return Err(Fail::arg(format!(
                "buffer of {cap} bytes is too small: the status needs {} (length {n} + NUL); \
                 *len holds the length",
                n + 1
            )));
        }
        // SAFETY: `buf` is non-NULL (cap > n >= 0) and valid for `cap` > n bytes (contract);
        // the JSON text holds no NUL and does not overlap `buf` (it is our own String).
        unsafe {
            std::ptr::copy_nonoverlapping(doc.as_ptr(), buf.cast::<u8>(), n);
            buf.add(n).write(0);
        }
        Ok(())
    })
}

/// Stops the coordinator (closes its listener and connections, waiting a few seconds at most
/// for its threads) and frees it. Destroy it after the communicators that met at it: members
/// that lose their coordinator may fail later membership operations. NULL is a no-op
/// returning braid_success; the handle is invalid afterwards.
///
/// # Safety
/// `coord` is NULL or a live coordinator not used by any other thread.
#[no_mangle]
pub unsafe extern "C" fn braid_coordinator_destroy(coord: braid_coordinator_t) -> braid_status_t {
    boundary("braid_coordinator_destroy", || {
        if !coord.is_null() {
            // SAFETY: `coord` came from Box::into_raw in braid_coordinator_start and is freed
            // once (caller contract).
            drop(unsafe { Box::from_raw(coord) });
        }
        Ok(())
    })
}

// ---- exported functions: shared memory -----------------------------------------------------

/// Allocates `size` zeroed bytes of shared memory registered with `comm` (like NCCL's
/// ncclMemAlloc + ncclCommRegister) and writes its address (page-aligned) to `*ptr`. When all
/// ranks of a call are on one host and pass buffers from braid_mem_alloc, the call copies
/// each byte once, straight out of the peer's buffer (all-reduce; large send/recv; see
/// BRAID_SHM_DIRECT); any other buffers work as before. Free it with braid_mem_free on the
/// same communicator; braid_comm_destroy frees what is left.
///
/// Errors: braid_invalid_argument (NULL `ptr` or `comm`), braid_system_error (no memory).
///
/// # Safety
/// `comm` is NULL or a live communicator; `ptr` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_mem_alloc(
    comm: braid_comm_t,
    size: usize,
    ptr: *mut *mut c_void,
) -> braid_status_t {
    boundary("braid_mem_alloc", || {
        // SAFETY: caller contract.
        let c = unsafe { comm_ref(comm) }?;
        if ptr.is_null() {
            return Err(Fail::arg("ptr is NULL"));
        }
        let mut b = c.comm.alloc_shared::<u8>(size.max(1)).map_err(Fail::from)?;
        let p = b.as_mut_ptr();
        c.mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p as usize, b);
        // SAFETY: caller contract (checked non-NULL above).
        unsafe { put(ptr, "ptr", p as *mut c_void) }
    })
}

/// Frees a buffer from braid_mem_alloc on `comm`. NULL is a no-op.
///
/// Errors: braid_invalid_argument when `ptr` is not a live buffer of braid_mem_alloc on
/// `comm`.
///
/// # Safety
/// `comm` is NULL or a live communicator; no call may still use the buffer.
#[no_mangle]
pub unsafe extern "C" fn braid_mem_free(comm: braid_comm_t, ptr: *mut c_void) -> braid_status_t {
    boundary("braid_mem_free", || {
        // SAFETY: caller contract.
        let c = unsafe { comm_ref(comm) }?;
        if ptr.is_null() {
            return Ok(());
        }
        let b = c
            .mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(ptr as usize));
        match b {
            Some(b) => {
                drop(b);
                Ok(())
            }
            None => Err(Fail::arg(
                "ptr is not a buffer of braid_mem_alloc on this communicator",
            )),
        }
    })
}

// ---- exported functions: collectives -------------------------------------------------------

/// All-reduce: `recvbuf[i]` = op over all ranks of `sendbuf[i]`, i < count, on every rank.
/// In place when sendbuf == recvbuf.
///
/// # Safety
/// `sendbuf` and `recvbuf` are valid for `count` elements of `datatype` for the duration of
/// the call (NULL allowed when count is 0); `comm` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn braid_all_reduce(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    op: RedopArg,
    comm: braid_comm_t,
) -> braid_status_t {
    let a = CollArgs {
        kind: CollKind::AllReduce,
        send: sendbuf,
        recv: recvbuf,
        count,
        dtype: datatype,
        op: Some(op),
        root: None,
    };
    // SAFETY: this function's contract.
    unsafe { coll("braid_all_reduce", a, comm, None) }
}

/// Reduce-scatter: rank r receives in `recvbuf` (recvcount elements) block r of the reduction
/// of all ranks' `sendbuf` (nranks*recvcount elements). In place when
/// recvbuf == sendbuf + rank*recvcount*sizeof(datatype).
///
/// # Safety
/// `sendbuf` valid for nranks*recvcount elements, `recvbuf` for recvcount, for the duration
/// of the call; `comm` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn braid_reduce_scatter(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    recvcount: usize,
    datatype: DatatypeArg,
    op: RedopArg,
    comm: braid_comm_t,
) -> braid_status_t {
    let a = CollArgs {
        kind: CollKind::ReduceScatter,
        send: sendbuf,
        recv: recvbuf,
        count: recvcount,
        dtype: datatype,
        op: Some(op),
        root: None,
    };
    // SAFETY: this function's contract.
    unsafe { coll("braid_reduce_scatter", a, comm, None) }
}

/// All-gather: every rank receives in `recvbuf` (nranks*sendcount elements) the `sendbuf`
/// (sendcount elements) of every rank, rank r's at offset r*sendcount. In place when
/// sendbuf == recvbuf + rank*sendcount*sizeof(datatype).
///
/// # Safety
/// `sendbuf` valid for sendcount elements, `recvbuf` for nranks*sendcount, for the duration of
/// the call; `comm` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn braid_all_gather(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    sendcount: usize,
    datatype: DatatypeArg,
    comm: braid_comm_t,
) -> braid_status_t {
    let a = CollArgs {
        kind: CollKind::AllGather,
        send: sendbuf,
        recv: recvbuf,
        count: sendcount,
        dtype: datatype,
        op: None,
        root: None,
    };
    // SAFETY: this function's contract.
    unsafe { coll("braid_all_gather", a, comm, None) }
}

/// Broadcast: copies `count` elements of the root's `sendbuf` to every rank's `recvbuf`.
/// `sendbuf` is significant only on the root (may be NULL elsewhere). In place when
/// sendbuf == recvbuf.
///
/// # Safety
/// `sendbuf` (root) and `recvbuf` valid for `count` elements for the duration of the call;
/// `comm` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn braid_broadcast(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    root: c_int,
    comm: braid_comm_t,
) -> braid_status_t {
    let a = CollArgs {
        kind: CollKind::Broadcast,
        send: sendbuf,
        recv: recvbuf,
        count,
        dtype: datatype,
        op: None,
        root: Some(root),
    };
    // SAFETY: this function's contract.
    unsafe { coll("braid_broadcast", a, comm, None) }
}

/// Reduce: the root's `recvbuf[i]` = op over all ranks of `sendbuf[i]`, i < count. `recvbuf`
/// is significant only on the root (may be NULL elsewhere). In place when sendbuf == recvbuf.
///
/// # Safety
/// `sendbuf` and `recvbuf` (root) valid for `count` elements for the duration of the call;
/// `comm` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn braid_reduce(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    op: RedopArg,
    root: c_int,
    comm: braid_comm_t,
) -> braid_status_t {
    let a = CollArgs {
        kind: CollKind::Reduce,
        send: sendbuf,
        recv: recvbuf,
        count,
        dtype: datatype,
        op: Some(op),
        root: Some(root),
    };
    // SAFETY: this function's contract.
    unsafe { coll("braid_reduce", a, comm, None) }
}

/// All-to-all: block j (`count` elements) of rank i's `sendbuf` lands in block i of rank j's
/// `recvbuf`; both buffers hold nranks*count elements. In place when sendbuf == recvbuf.
///
/// # Safety
/// Both buffers valid for nranks*count elements for the duration of the call; `comm` is NULL
/// or live.
#[no_mangle]
pub unsafe extern "C" fn braid_all_to_all(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    comm: braid_comm_t,
) -> braid_status_t {
    let a = CollArgs {
        kind: CollKind::AllToAll,
        send: sendbuf,
        recv: recvbuf,
        count,
        dtype: datatype,
        op: None,
        root: None,
    };
    // SAFETY: this function's contract.
    unsafe { coll("braid_all_to_all", a, comm, None) }
}

/// Gather: the root's `recvbuf` (nranks*sendcount elements) receives every rank's `sendbuf`
/// (sendcount elements), rank r's at offset r*sendcount. `recvbuf` is significant only on the
/// root. In place (root) when sendbuf == recvbuf + root*sendcount*sizeof(datatype).
///
/// # Safety
/// `sendbuf` valid for sendcount elements, `recvbuf` (root) for nranks*sendcount, for the
/// duration of the call; `comm` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn braid_gather(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    sendcount: usize,
    datatype: DatatypeArg,
    root: c_int,
    comm: braid_comm_t,
) -> braid_status_t {
    let a = CollArgs {
        kind: CollKind::Gather,
        send: sendbuf,
        recv: recvbuf,
        count: sendcount,
        dtype: datatype,
        op: None,
        root: Some(root),
    };
    // SAFETY: this function's contract.
    unsafe { coll("braid_gather", a, comm, None) }
}

/// Scatter: rank r's `recvbuf` (recvcount elements) receives block r of the root's `sendbuf`
/// (nranks*recvcount elements). `sendbuf` is significant only on the root. In place (root)
/// when recvbuf == sendbuf + root*recvcount*sizeof(datatype).
///
/// # Safety
/// `sendbuf` (root) valid for nranks*recvcount elements, `recvbuf` for recvcount, for the
/// duration of the call; `comm` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn braid_scatter(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    recvcount: usize,
    datatype: DatatypeArg,
    root: c_int,
    comm: braid_comm_t,
) -> braid_status_t {
    let a = CollArgs {
        kind: CollKind::Scatter,
        send: sendbuf,
        recv: recvbuf,
        count: recvcount,
        dtype: datatype,
        op: None,
        root: Some(root),
    };
    // SAFETY: this function's contract.
    unsafe { coll("braid_scatter", a, comm, None) }
}

/// Barrier: returns once every rank has entered it.
///
/// # Safety
/// `comm` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn braid_barrier(comm: braid_comm_t) -> braid_status_t {
    // SAFETY: this function's contract.
    unsafe { coll("braid_barrier", barrier_args(), comm, None) }
}

fn barrier_args() -> CollArgs {
    CollArgs {
        kind: CollKind::Barrier,
        send: std::ptr::null(),
        recv: std::ptr::null_mut(),
        count: 0,
        dtype: DatatypeArg(0),
        op: None,
        root: None,
    }
}

/// Sends `count` elements of `buf` to rank `peer` with `tag` (the receive must name this rank
/// and the same tag, count and datatype). Between braid_group_start and braid_group_end the
/// send is only recorded (`buf` must stay valid until braid_group_end returns) and runs there
/// with the group's other sends and receives; otherwise it blocks until done.
///
/// # Safety
/// `buf` valid for `count` elements (NULL allowed when count is 0) until the send completes;
/// `comm` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn braid_send(
    buf: *const c_void,
    count: usize,
    datatype: DatatypeArg,
    peer: c_int,
    tag: u64,
    comm: braid_comm_t,
) -> braid_status_t {
    let a = P2pArgs {
        send: true,
        buf: buf.cast_mut(),
        count,
        dtype: datatype,
        peer,
        tag,
    };
    // SAFETY: this function's contract.
    unsafe { p2p("braid_send", a, comm, None) }
}

/// Receives `count` elements into `buf` from rank `peer` with `tag`. Grouping as braid_send.
///
/// # Safety
/// `buf` valid for `count` elements, not overlapping any other buffer of its group, until the
/// receive completes; `comm` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn braid_recv(
    buf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    peer: c_int,
    tag: u64,
    comm: braid_comm_t,
) -> braid_status_t {
    let a = P2pArgs {
        send: false,
        buf,
        count,
        dtype: datatype,
        peer,
        tag,
    };
    // SAFETY: this function's contract.
    unsafe { p2p("braid_recv", a, comm, None) }
}

/// Opens a group on this thread: braid_send/braid_recv calls until the matching
/// braid_group_end are recorded, not run, and braid_group_end runs them all at once (so a ring
/// exchange cannot deadlock). Groups nest; only the outermost braid_group_end runs the group.
/// A group holds operations of one communicator; collectives and braid_isend/braid_irecv are
/// refused inside a group (braid_invalid_usage). The group is per thread (thread-local state).
#[no_mangle]
pub extern "C" fn braid_group_start() -> braid_status_t {
    boundary("braid_group_start", || {
        GROUP
            .try_with(|g| {
                let mut g = g.borrow_mut();
                g.depth = g.depth.saturating_add(1);
            })
            .map_err(|_| Fail::usage("thread is exiting"))
    })
}

/// Closes a group opened by braid_group_start; the outermost one runs the recorded operations
/// (blocking until all complete) and returns their status. If a call inside the group failed
/// (bad argument, a second communicator), nothing runs and that call's status is returned
/// again. braid_invalid_usage without an open group.
#[no_mangle]
pub extern "C" fn braid_group_end() -> braid_status_t {
    boundary("braid_group_end", || {
        let taken = GROUP
            .try_with(|g| {
                let mut g = g.borrow_mut();
                if g.depth == 0 {
                    return Err(Fail::usage("braid_group_end without braid_group_start"));
                }
                g.depth -= 1;
                if g.depth > 0 {
                    return Ok(None);
                }
                Ok(Some(std::mem::take(&mut *g)))
            })
            .map_err(|_| Fail::usage("thread is exiting"))??;
        let Some(g) = taken else { return Ok(()) };
        if let Some(f) = g.failed {
            return Err(Fail {
                status: f.status,
                msg: format!("group not run: a call in it failed: {}", f.msg),
            });
        }
        let Some(comm) = g.comm else { return Ok(()) };
        // SAFETY: the pointer was a live communicator when the operations were recorded; using
        // it after braid_comm_destroy is undefined behaviour per the documented contract.
        let c = unsafe { comm_ref(comm.cast_mut()) }?;
        // SAFETY: the buffers of recorded operations stay valid until braid_group_end returns
        // (documented on braid_send/braid_recv).
        unsafe { c.comm.p2p_raw(&g.ops) }?;
        Ok(())
    })
}

/// Non-blocking braid_group_end: closes the outermost group opened by braid_group_start and
/// STARTS its recorded sends and receives (all posted together, as braid_group_end runs them,
/// so a ring exchange cannot deadlock) on the communicator's progress thread, writing to
/// `*req` one request that completes when all of them have completed (braid_test,
/// braid_wait, braid_wait_for; free it with braid_request_free). The buffers of the recorded
/// operations must stay valid and untouched until the request has completed (not only until
/// this call returns). An empty group gives a request that is already complete. Operations
/// run in issue order with the communicator's other non-blocking operations.
///
/// Errors (`*req` is NULL after any of them): braid_invalid_argument for a NULL `req` (the
/// group stays open); braid_invalid_usage without an open group, or when the group to close is
/// nested (braid_igroup_end only closes the outermost group: close inner ones with
/// braid_group_end; the group stays open); if a call inside the group failed (bad argument, a
/// second communicator), nothing runs, the group is closed and that call's status is returned
/// again, as braid_group_end does.
///
/// # Safety
/// `req` is NULL or valid for a write; the recorded operations' communicator is live and their
/// buffers stay valid until the request completes.
#[no_mangle]
pub unsafe extern "C" fn braid_igroup_end(req: *mut braid_request_t) -> braid_status_t {
    boundary("braid_igroup_end", || {
        // SAFETY: `req` is NULL or a valid out-pointer (caller contract).
        unsafe { reset_request(req) }?;
        let taken = GROUP
            .try_with(|g| {
                let mut g = g.borrow_mut();
                match g.depth {
                    0 => Err(Fail::usage("braid_igroup_end without braid_group_start")),
                    1 => Ok(std::mem::take(&mut *g)),
                    d => Err(Fail::usage(format!(
                        "braid_igroup_end closes the outermost group only, and {d} groups are \
                         open: close the inner ones with braid_group_end"
                    ))),
                }
            })
            .map_err(|_| Fail::usage("thread is exiting"))??;
        if let Some(f) = taken.failed {
            return Err(Fail {
                status: f.status,
                msg: format!("group not run: a call in it failed: {}", f.msg),
            });
        }
        let h = match taken.comm {
            Some(comm) if !taken.ops.is_empty() => {
                // SAFETY: the pointer was a live communicator when the operations were
                // recorded; using it after braid_comm_destroy is undefined behaviour per the
                // documented contract.
                let c = unsafe { comm_ref(comm.cast_mut()) }?;
                // SAFETY: the buffers of the recorded operations stay valid until the request
                // completes (this function's contract).
                Some(unsafe { c.comm.ip2p_raw(&taken.ops) }?)
            }
            _ => None,
        };
        let r = Box::into_raw(Box::new(braid_request {
            result: if h.is_none() { Some(Ok(())) } else { None },
            handle: h,
        }));
        // SAFETY: `req` was checked non-NULL by reset_request above.
        unsafe { req.write(r) };
        Ok(())
    })
}

// ---- exported functions: non-blocking ------------------------------------------------------

/// Non-blocking braid_all_reduce: starts it and writes a request to `*req` (NULL on failure).
/// The buffers must stay valid and untouched until braid_test reports done or braid_wait
/// returns. Non-blocking operations run in issue order on a progress thread of the
/// communicator; a blocking call issued later runs after them.
///
/// # Safety
/// As braid_all_reduce, for the lifetime of the operation; `req` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_iall_reduce(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    op: RedopArg,
    comm: braid_comm_t,
    req: *mut braid_request_t,
) -> braid_status_t {
    let a = CollArgs {
        kind: CollKind::AllReduce,
        send: sendbuf,
        recv: recvbuf,
        count,
        dtype: datatype,
        op: Some(op),
        root: None,
    };
    // SAFETY: this function's contract.
    unsafe { coll("braid_iall_reduce", a, comm, Some(req)) }
}

/// Non-blocking braid_reduce_scatter (request rules as braid_iall_reduce).
///
/// # Safety
/// As braid_reduce_scatter, for the lifetime of the operation; `req` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn braid_ireduce_scatter(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    recvcount: usize,
    datatype: DatatypeArg,
    op: RedopArg,
    comm: braid_comm_t,
    req: *mut braid_request_t,
) -> braid_status_t {
    let a = CollArgs {
        kind: CollKind::ReduceScatter,
        send: sendbuf,
        recv: recvbuf,
        count: recvcount,
        dtype: datatype,
        op: Some(op),
        root: None,
    };
    // SAFETY: this function's contract.
    unsafe { coll("braid_ireduce_scatter", a, comm, Some(req)) }
}

/// Non-blocking braid_all_gather (request rules as braid_iall_reduce).
///
/// # Safety
/// As braid_all_gather, for the lifetime of the operation; `req` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn braid_iall_gather(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    sendcount: usize,
    datatype: DatatypeArg,
    comm: braid_comm_t,
    req: *mut braid_request_t,
) -> braid_status_t {
    let a = CollArgs {
        kind: CollKind::AllGather,
        send: sendbuf,
        recv: recvbuf,
        count: sendcount,
        dtype: datatype,
        op: None,
        root: None,
    };
    // SAFETY: this function's contract.
    unsafe { coll("braid_iall_gather", a, comm, Some(req)) }
}

/// Non-blocking braid_broadcast (request rules as braid_iall_reduce).
///
/// # Safety
/// As braid_broadcast, for the lifetime of the operation; `req` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn braid_ibroadcast(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    root: c_int,
    comm: braid_comm_t,
    req: *mut braid_request_t,
) -> braid_status_t {
    let a = CollArgs {
        kind: CollKind::Broadcast,
        send: sendbuf,
        recv: recvbuf,
        count,
        dtype: datatype,
        op: None,
        root: Some(root),
    };
    // SAFETY: this function's contract.
    unsafe { coll("braid_ibroadcast", a, comm, Some(req)) }
}

/// Non-blocking braid_reduce (request rules as braid_iall_reduce).
///
/// # Safety
/// As braid_reduce, for the lifetime of the operation; `req` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn braid_ireduce(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    op: RedopArg,
    root: c_int,
    comm: braid_comm_t,
    req: *mut braid_request_t,
) -> braid_status_t {
    let a = CollArgs {
        kind: CollKind::Reduce,
        send: sendbuf,
        recv: recvbuf,
        count,
        dtype: datatype,
        op: Some(op),
        root: Some(root),
    };
    // SAFETY: this function's contract.
    unsafe { coll("braid_ireduce", a, comm, Some(req)) }
}

/// Non-blocking braid_all_to_all (request rules as braid_iall_reduce).
///
/// # Safety
/// As braid_all_to_all, for the lifetime of the operation; `req` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn braid_iall_to_all(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    comm: braid_comm_t,
    req: *mut braid_request_t,
) -> braid_status_t {
    let a = CollArgs {
        kind: CollKind::AllToAll,
        send: sendbuf,
        recv: recvbuf,
        count,
        dtype: datatype,
        op: None,
        root: None,
    };
    // SAFETY: this function's contract.
    unsafe { coll("braid_iall_to_all", a, comm, Some(req)) }
}

/// Non-blocking braid_gather (request rules as braid_iall_reduce).
///
/// # Safety
/// As braid_gather, for the lifetime of the operation; `req` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn braid_igather(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    sendcount: usize,
    datatype: DatatypeArg,
    root: c_int,
    comm: braid_comm_t,
    req: *mut braid_request_t,
) -> braid_status_t {
    let a = CollArgs {
        kind: CollKind::Gather,
        send: sendbuf,
        recv: recvbuf,
        count: sendcount,
        dtype: datatype,
        op: None,
        root: Some(root),
    };
    // SAFETY: this function's contract.
    unsafe { coll("braid_igather", a, comm, Some(req)) }
}

/// Non-blocking braid_scatter (request rules as braid_iall_reduce).
///
/// # Safety
/// As braid_scatter, for the lifetime of the operation; `req` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn braid_iscatter(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    recvcount: usize,
    datatype: DatatypeArg,
    root: c_int,
    comm: braid_comm_t,
    req: *mut braid_request_t,
) -> braid_status_t {
    let a = CollArgs {
        kind: CollKind::Scatter,
        send: sendbuf,
        recv: recvbuf,
        count: recvcount,
        dtype: datatype,
        op: None,
        root: Some(root),
    };
    // SAFETY: this function's contract.
    unsafe { coll("braid_iscatter", a, comm, Some(req)) }
}

/// Non-blocking braid_barrier (request rules as braid_iall_reduce).
///
/// # Safety
/// `comm` is NULL or live; `req` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn braid_ibarrier(
    comm: braid_comm_t,
    req: *mut braid_request_t,
) -> braid_status_t {
    // SAFETY: this function's contract.
    unsafe { coll("braid_ibarrier", barrier_args(), comm, Some(req)) }
}

/// Non-blocking braid_send (request rules as braid_iall_reduce). Refused inside a group.
///
/// # Safety
/// As braid_send, for the lifetime of the operation; `req` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn braid_isend(
    buf: *const c_void,
    count: usize,
    datatype: DatatypeArg,
    peer: c_int,
    tag: u64,
    comm: braid_comm_t,
    req: *mut braid_request_t,
) -> braid_status_t {
    let a = P2pArgs {
        send: true,
        buf: buf.cast_mut(),
        count,
        dtype: datatype,
        peer,
        tag,
    };
    // SAFETY: this function's contract.
    unsafe { p2p("braid_isend", a, comm, Some(req)) }
}

/// Non-blocking braid_recv (request rules as braid_iall_reduce). Refused inside a group.
///
/// # Safety
/// As braid_recv, for the lifetime of the operation; `req` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn braid_irecv(
    buf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    peer: c_int,
    tag: u64,
    comm: braid_comm_t,
    req: *mut braid_request_t,
) -> braid_status_t {
    let a = P2pArgs {
        send: false,
        buf,
        count,
        dtype: datatype,
        peer,
        tag,
    };
    // SAFETY: this function's contract.
    unsafe { p2p("braid_irecv", a, comm, Some(req)) }
}

// ---- exported functions: all_to_allv and new communicators ----------------------------------

/// The `color` of braid_comm_split that puts a rank in no new communicator (its `*newcomm`
/// is set to NULL), like NCCL_SPLIT_NOCOLOR / MPI_UNDEFINED.
pub const BRAID_SPLIT_NOCOLOR: c_int = -1;

/// `n` entries of a C array argument of all_to_allv.
///
/// # Safety
/// `p` is NULL or valid for reading `n` size_t values for the lifetime `'a`.
unsafe fn size_array<'a>(p: *const usize, n: usize, what: &str) -> CResult<&'a [usize]> {
    if p.is_null() {
        return Err(Fail::arg(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and valid for `n` reads (contract); size_t is usize.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// The arguments of braid_all_to_allv / braid_iall_to_allv.
struct AllToAllVArgs {
    send: *const c_void,
    sendcounts: *const usize,
    sdispls: *const usize,
    recv: *mut c_void,
    recvcounts: *const usize,
    rdispls: *const usize,
    dtype: DatatypeArg,
}

/// Body of braid_all_to_allv (blocking when `req` is None) and braid_iall_to_allv.
///
/// # Safety
/// The buffer, array and handle contracts of the public functions that call it.
unsafe fn all_to_allv(
    func: &'static str,
    a: AllToAllVArgs,
    comm: braid_comm_t,
    req: Option<*mut braid_request_t>,
) -> braid_status_t {
    boundary(func, || {
        // SAFETY: caller contract (`req` NULL or writable, `comm` NULL or live).
        let c = unsafe { coll_start(comm, req) }?;
        let dtype = dtype_of(a.dtype)?;
        let n = c.comm.size();
        // SAFETY: each array is NULL or holds one entry per rank (caller contract); they are
        // read during this call only.
        let (sc, sd, rc, rd) = unsafe {
            (
                size_array(a.sendcounts, n, "sendcounts")?,
                size_array(a.sdispls, n, "sdispls")?,
                size_array(a.recvcounts, n, "recvcounts")?,
                size_array(a.rdispls, n, "rdispls")?,
            )
        };
        let (s, r) = (a.send.cast::<u8>(), a.recv.cast::<u8>());
        match req {
            None => {
                // SAFETY: the caller guarantees every block the counts and displacements
                // describe is valid for the duration of the call.
                unsafe { c.comm.all_to_allv_raw(dtype, s, sc, sd, r, rc, rd) }?;
            }
            Some(q) => {
                // SAFETY: as above, until the request completes (documented).
                let h = unsafe { c.comm.iall_to_allv_raw(dtype, s, sc, sd, r, rc, rd) }?;
                // SAFETY: `q` was checked non-NULL by reset_request above.
                unsafe { store_request(q, h) };
            }
        }
        Ok(())
    })
}

/// All-to-all with a count and a displacement per rank (MPI_Alltoallv): this rank sends
/// `sendcounts[p]` elements starting at element `sdispls[p]` of `sendbuf` to rank p, and
/// receives `recvcounts[p]` elements from rank p into `recvbuf` starting at element
/// `rdispls[p]`. The four arrays have one entry per rank (counts and displacements in
/// elements) and are read during the call only. Rank p's `sendcounts[r]` must equal rank r's
/// `recvcounts[p]`: a disagreement fails on both ranks (non-success status, message containing
/// "mismatch"; sticky), as does a rank calling another collective meanwhile. Zero counts are
/// allowed (the displacement is then ignored; the buffer may be NULL when all its counts are
/// 0). Send blocks may overlap one another; receive blocks may not (braid_invalid_argument).
/// There is no in-place form: send and receive blocks must not overlap (refused with
/// braid_invalid_argument when detected; undefined otherwise). One rank: a local copy.
/// Refused between braid_group_start and braid_group_end (braid_invalid_usage).
///
/// Errors: braid_invalid_argument (NULL arrays, NULL buffer with non-zero counts, bad
/// datatype, overflowing or overlapping blocks, this rank's own send and receive counts
/// differ), before anything is sent; otherwise as every collective.
///
/// # Safety
/// The arrays are NULL or hold one entry per rank. For every rank p, `sendbuf` is valid for
/// reading elements `sdispls[p]`..`sdispls[p]+sendcounts[p]` and `recvbuf` for writing
/// elements `rdispls[p]`..`rdispls[p]+recvcounts[p]`, for the duration of the call; `comm`
/// is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn braid_all_to_allv(
    sendbuf: *const c_void,
    sendcounts: *const usize,
    sdispls: *const usize,
    recvbuf: *mut c_void,
    recvcounts: *const usize,
    rdispls: *const usize,
    datatype: DatatypeArg,
    comm: braid_comm_t,
) -> braid_status_t {
    let a = AllToAllVArgs {
        send: sendbuf,
        sendcounts,
        sdispls,
        recv: recvbuf,
        recvcounts,
        rdispls,
        dtype: datatype,
    };
    // SAFETY: this function's contract.
    unsafe { all_to_allv("braid_all_to_allv", a, comm, None) }
}

/// Non-blocking braid_all_to_allv (request rules as braid_iall_reduce). The four arrays are
/// read during the call only (they may be freed when it returns); the buffers belong to the
/// operation until it completes.
///
/// # Safety
/// As braid_all_to_allv, the buffers for the lifetime of the operation; `req` is NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn braid_iall_to_allv(
    sendbuf: *const c_void,
    sendcounts: *const usize,
    sdispls: *const usize,
    recvbuf: *mut c_void,
    recvcounts: *const usize,
    rdispls: *const usize,
    datatype: DatatypeArg,
    comm: braid_comm_t,
    req: *mut braid_request_t,
) -> braid_status_t {
    let a = AllToAllVArgs {
        send: sendbuf,
        sendcounts,
        sdispls,
        recv: recvbuf,
        recvcounts,
        rdispls,
        dtype: datatype,
    };
    // SAFETY: this function's contract.
    unsafe { all_to_allv("braid_iall_to_allv", a, comm, Some(req)) }
}

/// Stores a new communicator handle in `*newcomm` (checked non-NULL by the caller).
///
/// # Safety
/// `newcomm` is valid for a write.
unsafe fn store_comm(newcomm: *mut braid_comm_t, comm: Communicator) {
    let b = Box::into_raw(Box::new(braid_comm {
        comm,
        mem: std::sync::Mutex::new(std::collections::HashMap::new()),
    }));
    // SAFETY: the caller checked `newcomm` and guarantees it is valid for a write.
    unsafe { newcomm.write(b) };
}

/// Splits `comm` (like ncclCommSplit / MPI_Comm_split): collective over all ranks of `comm`.
/// Ranks with the same `color` (>= 0) form a new communicator, ranked by `key`, then by rank
/// in `comm`; a rank passing BRAID_SPLIT_NOCOLOR takes part and gets `*newcomm` = NULL. The
/// new communicator is independent of `comm` (its own connections; it keeps working after
/// braid_comm_destroy(comm)); free it with braid_comm_destroy. It meets its members through
/// the coordinator `comm` used (see braid_comm_create_group). Refused between
/// braid_group_start and braid_group_end (braid_invalid_usage). On failure `*newcomm` is NULL.
///
/// Errors: braid_invalid_argument (NULL `comm` or `newcomm`, color < -1), before anything is
/// sent; as braid_all_gather for the exchange of colors and keys; as braid_comm_init for the
/// creation (braid_timeout when members do not all arrive within BRAID_INIT_TIMEOUT).
///
/// # Safety
/// `comm` is NULL or live; `newcomm` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_comm_split(
    comm: braid_comm_t,
    color: c_int,
    key: c_int,
    newcomm: *mut braid_comm_t,
) -> braid_status_t {
    boundary("braid_comm_split", || {
        // SAFETY: caller contract.
        unsafe { put(newcomm, "newcomm", std::ptr::null_mut()) }?;
        // SAFETY: caller contract.
        let c = unsafe { comm_ref(comm) }?;
        if in_group() {
            return Err(Fail::usage(
                "braid_comm_split cannot be issued between braid_group_start and braid_group_end",
            ));
        }
        let color = match color {
            BRAID_SPLIT_NOCOLOR => None,
            c if c >= 0 => Some(c as u32),
            c => {
                return Err(Fail::arg(format!(
                    "color {c}: expected >= 0 or BRAID_SPLIT_NOCOLOR (-1)"
                )))
            }
        };
        if let Some(sub) = c.comm.split(color, i64::from(key))? {
            // SAFETY: checked non-NULL above; caller contract.
            unsafe { store_comm(newcomm, sub) };
        }
        Ok(())
    })
}

/// Creates a communicator of the ranks `ranks[0..nranks]` of `comm` (like
/// MPI_Comm_create_group; torch's new_group): collective over the listed ranks only (the
/// others do not call it). The caller's rank in the new communicator is its position in
/// `ranks`; the ranks must be distinct ranks of `comm`, include the caller, and be passed in
/// the same order by every member. `tag` (>= 0) tells apart creations that run at the same
/// time over overlapping members; creations with the same members and tag are matched in the
/// order they are made. The new communicator meets its members through the coordinator `comm`
/// used (BRAID_COORDINATOR; with the same job token) under a group name derived from `comm`'s;
/// it is not elastic, has its own connections and keeps working after
/// braid_comm_destroy(comm) (also without the coordinator, once created). Free it with
/// braid_comm_destroy. Refused between braid_group_start and braid_group_end
/// (braid_invalid_usage). On failure `*newcomm` is NULL and `comm` is unaffected.
///
/// Errors: braid_invalid_argument (NULL `comm`, `ranks` or `newcomm`, nranks < 1, a rank out
/// of range or listed twice, the caller not listed, tag < 0); as braid_comm_init for the
/// creation (braid_timeout when members do not all arrive within BRAID_INIT_TIMEOUT).
///
/// # Safety
/// `comm` is NULL or live; `ranks` is NULL or valid for reading `nranks` ints; `newcomm` is
/// NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_comm_create_group(
    comm: braid_comm_t,
    ranks: *const c_int,
    nranks: c_int,
    tag: c_int,
    newcomm: *mut braid_comm_t,
) -> braid_status_t {
    boundary("braid_comm_create_group", || {
        // SAFETY: caller contract.
        unsafe { put(newcomm, "newcomm", std::ptr::null_mut()) }?;
        // SAFETY: caller contract.
        let c = unsafe { comm_ref(comm) }?;
        if in_group() {
            return Err(Fail::usage(
                "braid_comm_create_group cannot be issued between braid_group_start and \
                 braid_group_end",
            ));
        }
        let n = usize::try_from(nranks)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| Fail::arg(format!("nranks is {nranks}: expected >= 1")))?;
        if ranks.is_null() {
            return Err(Fail::arg("ranks is NULL"));
        }
        let tag = u32::try_from(tag).map_err(|_| Fail::arg(format!("tag {tag}: expected >= 0")))?;
        // SAFETY: non-NULL and valid for `nranks` reads (contract).
        let list = unsafe { std::slice::from_raw_parts(ranks, n) };
        let size = c.comm.size();
        let list = list
            .iter()
            .map(|&r| rank_arg("ranks entry", r, size))
            .collect::<CResult<Vec<usize>>>()?;
        let sub = c.comm.create_group(&list, tag)?;
        // SAFETY: checked non-NULL above; caller contract.
        unsafe { store_comm(newcomm, sub) };
        Ok(())
    })
}

// ---- exported functions: requests ----------------------------------------------------------

/// The request behind a handle.
///
/// # Safety
/// `req` is NULL or a request not yet freed, used by this thread only.
unsafe fn req_mut<'a>(req: braid_request_t) -> CResult<&'a mut braid_request> {
    // SAFETY: per contract, a non-NULL `req` came from Box::into_raw in store_request and has
    // not been freed; requests must not be used from two threads at once (documented).
    unsafe { req.as_mut() }.ok_or_else(|| Fail::arg("req is NULL"))
}

/// Waits for a request's operation (if not yet done) and returns its outcome.
fn finish(r: &mut braid_request, block: bool) -> Option<CResult> {
    if r.result.is_none() {
        let h = r.handle.take()?;
        if !block && !h.test() {
            r.handle = Some(h);
            return None;
        }
        r.result = Some(h.wait().map_err(Fail::from));
    }
    r.result.clone()
}

/// Checks a request without blocking: `*done` = 1 and the operation's status returned when it
/// has completed (its buffers may be used again), `*done` = 0 and braid_success while it runs.
/// May be called again after completion (same status).
///
/// # Safety
/// `req` is NULL or a live request; `done` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn braid_test(req: braid_request_t, done: *mut c_int) -> braid_status_t {
    boundary("braid_test", || {
        if done.is_null() {
            return Err(Fail::arg("done is NULL"));
        }
        // SAFETY: caller contract.
        let r = unsafe { req_mut(req) }?;
        let out = finish(r, false);
        // SAFETY: checked non-NULL; caller contract.
        unsafe { done.write(c_int::from(out.is_some())) };
        out.unwrap_or(Ok(()))
    })
}

/// Blocks until the request's operation has completed and returns its status (bounded by the
/// communicator's timeout). May be called again (same status). The request still has to be
/// freed with braid_request_free.
///
/// # Safety
/// `req` is NULL or a live request.
#[no_mangle]
pub unsafe extern "C" fn braid_wait(req: braid_request_t) -> braid_status_t {
    boundary("braid_wait", || {
        // SAFETY: caller contract.
        let r = unsafe { req_mut(req) }?;
        finish(r, true).unwrap_or_else(|| Err(Fail::usage("request holds no operation")))
    })
}

/// Waits at most `timeout_s` seconds for the request's operation: when it has completed,
/// `*done` = 1 and the operation's status is returned (as braid_wait: its buffers may be used
/// again; may be called again, same status); when the time ran out first, `*done` = 0 and
/// braid_success (the request stays valid and its operation keeps running). Sleeps (no busy
/// loop) and does not block past the deadline; `timeout_s` = 0 is braid_test, INFINITY is
/// braid_wait (bounded by the communicator's timeout). The request still has to be freed with
/// braid_request_free.
///
/// Errors: braid_invalid_argument for a NULL `req` or `done`, or a `timeout_s` that is NaN or
/// negative (`*done` is 0 after an argument error when `done` is not NULL);
/// braid_invalid_usage for a request that holds no operation.
///
/// # Safety
/// `req` is NULL or a live request; `done` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn braid_wait_for(
    req: braid_request_t,
    timeout_s: f64,
    done: *mut c_int,
) -> braid_status_t {
    boundary("braid_wait_for", || {
        // SAFETY: caller contract.
        unsafe { put(done, "done", 0) }?;
        if timeout_s.is_nan() || timeout_s < 0.0 {
            return Err(Fail::arg(format!(
                "timeout_s is {timeout_s}: expected a number of seconds >= 0"
            )));
        }
        // Too large for a Duration (INFINITY included): no deadline of this call's own.
        let timeout =
            std::time::Duration::try_from_secs_f64(timeout_s).unwrap_or(std::time::Duration::MAX);
        // SAFETY: caller contract.
        let r = unsafe { req_mut(req) }?;
        if r.result.is_none() {
            match &r.handle {
                None => return Err(Fail::usage("request holds no operation")),
                Some(h) => {
                    if !h.wait_timeout(timeout) {
                        return Ok(());
                    }
                }
            }
        }
        let out = finish(r, true).unwrap_or_else(|| Err(Fail::usage("request holds no operation")));
        // SAFETY: checked non-NULL by `put` above; caller contract.
        unsafe { done.write(1) };
        out
    })
}

/// Frees a request. An incomplete operation is waited for first (its buffers are in use until
/// then), and if its failure had not been reported by braid_test/braid_wait, that status is
/// returned. NULL is a no-op returning braid_success. The handle is invalid afterwards.
///
/// # Safety
/// `req` is NULL or a live request not used by any other thread.
#[no_mangle]
pub unsafe extern "C" fn braid_request_free(req: braid_request_t) -> braid_status_t {
    boundary("braid_request_free", || {
        if req.is_null() {
            return Ok(());
        }
        // SAFETY: `req` came from Box::into_raw in store_request and is freed once (contract).
        let mut r = unsafe { Box::from_raw(req) };
        let reported = r.result.is_some();
        let out = finish(&mut r, true);
        drop(r);
        match out {
            Some(Err(f)) if !reported => Err(f),
            _ => Ok(()),
        }
    })
}

// ---- push/pull: parameter servers ----------------------------------------------------------
//
// Servers (braid_kv_server_start*) and workers (braid_kv_worker_start) are members of one
// push/pull group (BRAID_GROUP); BRAID_WORLD_SIZE counts both at start. Settings that must be
// the same on every member come from the environment (PsOptions::from_env): BRAID_PS_MODE
// (sync | async | bounded:TAU), BRAID_PS_RULE (sum | sgd:LR | sgd:lr=..,momentum=..,wd=..,
// rescale=..,clip=..; replaceable at run time: braid_kv_set_rule), BRAID_PS_PARTITION_BYTES,
// BRAID_PS_REPLICAS.

/// A push/pull server (opaque). Created by braid_kv_server_start or
/// braid_kv_server_start_with_update, freed by braid_kv_server_destroy.
pub struct braid_kv_server {
    server: KvServer,
}

/// Handle of a push/pull server. Using it after braid_kv_server_destroy is undefined
/// behaviour.
pub type braid_kv_server_t = *mut braid_kv_server;

/// A push/pull worker (opaque). Created by braid_kv_worker_start, freed by
/// braid_kv_worker_destroy.
pub struct braid_kv_worker {
    worker: KvWorker,
}

/// Handle of a push/pull worker. Using it after braid_kv_worker_destroy is undefined
/// behaviour.
pub type braid_kv_worker_t = *mut braid_kv_worker;

/// A non-blocking push, pull or push-pull (opaque). Created by braid_kv_push, braid_kv_pull
/// and braid_kv_push_pull, freed by braid_kv_request_free.
pub struct braid_kv_request {
    pending: Option<Box<dyn KvPending>>,
    result: Option<CResult<u64>>,
}

/// Handle of a push/pull operation. Using it after braid_kv_request_free is undefined
/// behaviour.
pub type braid_kv_request_t = *mut braid_kv_request;

/// A server update rule written in C: updates the `bytes` bytes of `value` (elements of
/// `dtype`) in place from `grad` (as many bytes: the sum of a sync round's pushes, or one push
/// in async/bounded mode) and returns 0; any other return value leaves the value unchanged
/// (async/bounded: the push fails with braid_invalid_argument; sync: the round closes with the
/// value unchanged). A value larger than BRAID_PS_PARTITION_BYTES is split into parts that are
/// updated separately: `value` and `grad` are then one part. `key` identifies the part: in
/// this release it is braid's store key of the part (a hash of the caller's key and the part
/// index), not the caller's key. Called on braid's server threads (on every replica of the
/// part); `user` is the pointer given to braid_kv_server_start_with_update. It must not call
/// braid functions on the same server.
pub type braid_kv_update_fn = Option<
    unsafe extern "C" fn(
        key: u64,
        dtype: DatatypeArg,
        value: *mut c_void,
        grad: *const c_void,
        bytes: usize,
        user: *mut c_void,
    ) -> c_int,
>;

/// An operation in flight, whatever its element type.
trait KvPending {
    /// Whether it finished (never blocks).
    fn ready(&self) -> bool;
    /// Waits for it, writes pulled values to the caller's buffer, returns the version.
    fn complete(self: Box<Self>) -> CResult<u64>;
}

/// A push: completes when every part was recorded (and replicated).
struct PushPending(PsHandle<()>);

impl KvPending for PushPending {
    fn ready(&self) -> bool {
        self.0.test()
    }

    fn complete(self: Box<Self>) -> CResult<u64> {
        self.0.wait()?;
        Ok(0)
    }
}

/// A pull (or push-pull): braid writes its values straight to the caller's `out` as the
/// servers answer (no intermediate copy); dropping it (braid_kv_request_free) stops that.
struct PullPending(PsHandle<u64>);

impl KvPending for PullPending {
    fn ready(&self) -> bool {
        self.0.test()
    }

    fn complete(self: Box<Self>) -> CResult<u64> {
        Ok(self.0.wait()?)
    }
}

/// A C update callback and its user pointer.
struct UpdateCallback {
    f: unsafe extern "C" fn(
        u64,
        DatatypeArg,
        *mut c_void,
        *const c_void,
        usize,
        *mut c_void,
    ) -> c_int,
    user: *mut c_void,
}

// SAFETY: braid_kv_server_start_with_update's contract: the callback and `user` may be used
// from any thread (the caller synchronises whatever `user` shares with other threads).
unsafe impl Send for UpdateCallback {}
// SAFETY: as for Send.
unsafe impl Sync for UpdateCallback {}

impl UpdateCallback {
    fn call(
        &self,
        key: u64,
        dtype: DataType,
        value: &mut [u8],
        grad: &[u8],
    ) -> braid_core::Result<()> {
        if value.len() != grad.len() {
            return Err(Error::Internal(format!(
                "update rule: value of {} bytes, gradient of {} bytes",
                value.len(),
                grad.len()
            )));
        }
        // SAFETY: `value` is valid for writing and `grad` for reading `value.len()` bytes for
        // the call; the function pointer and `user` are valid on this thread (contract of
        // braid_kv_server_start_with_update).
        let rc = unsafe {
            (self.f)(
                key,
                DatatypeArg(dtype_code(dtype)),
                value.as_mut_ptr().cast(),
                grad.as_ptr().cast(),
                value.len(),
                self.user,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "update callback returned {rc} for key {key}; value unchanged"
            )))
        }
    }
}

/// The braid_datatype_t code of a data type.
fn dtype_code(d: DataType) -> c_int {
    c_int::from(d as u8)
}

/// Runs `$f::<T>($args)` with `T` the Rust element type of `$dtype` (a `DataType`).
macro_rules! with_element {
    ($dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            DataType::I8 => $f::<i8>($($arg),*),
            DataType::U8 => $f::<u8>($($arg),*),
            DataType::I16 => $f::<i16>($($arg),*),
            DataType::I32 => $f::<i32>($($arg),*),
            DataType::U32 => $f::<u32>($($arg),*),
            DataType::I64 => $f::<i64>($($arg),*),
            DataType::U64 => $f::<u64>($($arg),*),
            DataType::F32 => $f::<f32>($($arg),*),
            DataType::F64 => $f::<f64>($($arg),*),
            DataType::F16 => $f::<half::f16>($($arg),*),
            DataType::BF16 => $f::<half::bf16>($($arg),*),
        }
    };
}

/// A slice over a C array of `n` elements (NULL allowed when `n` is 0).
///
/// # Safety
/// `p` is NULL or valid for reading `n` elements of `T` for `'a`.
unsafe fn c_slice<'a, T>(p: *const T, n: usize, what: &str) -> CResult<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Fail::arg(format!("{what} is NULL")));
    }
    if !p.is_aligned() {
        return Err(Fail::arg(format!(
            "{what} is not aligned for its element type"
        )));
    }
    if n.checked_mul(size_of::<T>())
        .map_or(true, |b| b > isize::MAX as usize)
    {
        return Err(Fail::arg(format!("{what}: {n} elements is too large")));
    }
    // SAFETY: non-NULL, aligned, not too large, and valid for `n` elements (contract).
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// The keys, lengths and element count of a push/pull call.
struct KvKeys<'a> {
    keys: &'a [u64],
    lens: &'a [usize],
    total: usize,
}

/// Reads the `keys` and `lens` arrays of a call.
///
/// # Safety
/// `keys` and `lens` are NULL or valid for `nkeys` elements for `'a`.
unsafe fn kv_keys<'a>(keys: *const u64, lens: *const usize, nkeys: usize) -> CResult<KvKeys<'a>> {
    // SAFETY: forwarded contract.
    let keys = unsafe { c_slice(keys, nkeys, "keys") }?;
    // SAFETY: forwarded contract.
    let lens = unsafe { c_slice(lens, nkeys, "lens") }?;
    let total = lens
        .iter()
        .try_fold(0usize, |a, &n| a.checked_add(n))
        .ok_or_else(|| Fail::arg("the lengths overflow size_t"))?;
    Ok(KvKeys { keys, lens, total })
}

/// The worker behind a handle.
///
/// # Safety
/// `worker` is NULL or a handle from braid_kv_worker_start not yet destroyed.
unsafe fn kv_worker_ref<'a>(worker: braid_kv_worker_t) -> CResult<&'a braid_kv_worker> {
    // SAFETY: per this function's contract, a non-NULL `worker` points to a live
    // braid_kv_worker (Box::into_raw in braid_kv_worker_start, freed only by
    // braid_kv_worker_destroy).
    unsafe { worker.cast_const().as_ref() }.ok_or_else(|| Fail::arg("worker is NULL"))
}

/// Starts a server from an optional config and an optional update rule overriding
/// BRAID_PS_RULE.
///
/// # Safety
/// `server` is NULL or writable; `config` as for braid_comm_init.
unsafe fn start_server(
    server: *mut braid_kv_server_t,
    config: *const braid_config_t,
    rule: Option<UpdateRule>,
) -> CResult {
    // SAFETY: caller contract.
    unsafe { put(server, "server", std::ptr::null_mut()) }?;
    // SAFETY: caller contract.
    let cfg = unsafe { config_of(config) }?;
    let mut opts = PsOptions::from_env()?;
    if let Some(r) = rule {
        opts.rule = r;
    }
    let s = KvServer::start(cfg, opts)?;
    let b = Box::into_raw(Box::new(braid_kv_server { server: s }));
    // SAFETY: checked non-NULL by `put` above; caller contract.
    unsafe { server.write(b) };
    Ok(())
}

/// Starts a push/pull server: registers with the coordinator as a server of the group
/// (BRAID_GROUP) and serves pushes and pulls on braid's threads until
/// braid_kv_server_destroy. Blocks until the group has formed (all BRAID_WORLD_SIZE servers and
/// workers registered; bounded by BRAID_INIT_TIMEOUT), so servers and workers must start
/// concurrently (separate processes or threads). `config` may be NULL: everything comes from
/// the environment (as for braid_comm_init). Consistency mode, update rule, partition size and
/// replicas come from BRAID_PS_MODE, BRAID_PS_RULE, BRAID_PS_PARTITION_BYTES and
/// BRAID_PS_REPLICAS (the same on every member). On failure `*server` is set to NULL.
///
/// Errors: as braid_comm_init; braid_invalid_argument for a malformed BRAID_PS_* variable.
///
/// # Safety
/// `server` is NULL or valid for a write; `config` as for braid_comm_init.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_server_start(
    server: *mut braid_kv_server_t,
    config: *const braid_config_t,
) -> braid_status_t {
    boundary("braid_kv_server_start", || {
        // SAFETY: this function's contract.
        unsafe { start_server(server, config, None) }
    })
}

/// Starts a push/pull server (as braid_kv_server_start) whose update rule is `update` (called
/// with `user`) instead of BRAID_PS_RULE. Every server of a group should use the same rule.
///
/// Errors: as braid_kv_server_start; braid_invalid_argument when `update` is NULL.
///
/// # Safety
/// As braid_kv_server_start; `update` is a function that may be called from any thread until
/// braid_kv_server_destroy returns, and `user` (passed to it unchanged, may be NULL) stays
/// valid and usable from those threads until then (the caller synchronises what it shares).
#[no_mangle]
pub unsafe extern "C" fn braid_kv_server_start_with_update(
    server: *mut braid_kv_server_t,
    config: *const braid_config_t,
    update: braid_kv_update_fn,
    user: *mut c_void,
) -> braid_status_t {
    boundary("braid_kv_server_start_with_update", || {
        let Some(f) = update else {
            // SAFETY: caller contract.
            unsafe { put(server, "server", std::ptr::null_mut()) }?;
            return Err(Fail::arg("update is NULL"));
        };
        let cb = UpdateCallback { f, user };
        let rule = UpdateRule::Custom(Arc::new(
            move |key: u64, dtype: DataType, value: &mut [u8], grad: &[u8]| {
                cb.call(key, dtype, value, grad)
            },
        ));
        // SAFETY: this function's contract.
        unsafe { start_server(server, config, Some(rule)) }
    })
}

/// Stops a server and frees it: it leaves the group (with BRAID_PS_REPLICAS >= 1 its replicas
/// take over its keys). Call it once the workers are done. NULL is a no-op returning
/// braid_success. The handle is invalid afterwards.
///
/// # Safety
/// `server` is NULL or a live server not used by any other thread.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_server_destroy(server: braid_kv_server_t) -> braid_status_t {
    boundary("braid_kv_server_destroy", || {
        if !server.is_null() {
            // SAFETY: `server` came from Box::into_raw in start_server and is freed once
            // (caller contract).
            drop(unsafe { Box::from_raw(server) });
        }
        Ok(())
    })
}

/// Writes to `*workers` the number of workers in the view this server runs on (the group's
/// current membership, updated as workers join, leave or die). A dedicated server process can
/// poll it and stop once workers came and all left.
///
/// Errors: braid_invalid_argument (NULL `server` or `workers`).
///
/// # Safety
/// `server` is NULL or a live server; `workers` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_server_workers(
    server: braid_kv_server_t,
    workers: *mut usize,
) -> braid_status_t {
    boundary("braid_kv_server_workers", || {
        // SAFETY: per contract, a non-NULL `server` came from Box::into_raw in start_server and
        // has not been destroyed.
        let s =
            unsafe { server.cast_const().as_ref() }.ok_or_else(|| Fail::arg("server is NULL"))?;
        let n = s.server.sizes().0;
        // SAFETY: caller contract.
        unsafe { put(workers, "workers", n) }
    })
}

/// Starts a push/pull worker: registers with the coordinator as a worker of the group
/// (BRAID_GROUP) and connects to its servers. Blocks until the group has formed (see
/// braid_kv_server_start). `config` may be NULL. Settings as for braid_kv_server_start. On
/// failure `*worker` is set to NULL.
///
/// Errors: as braid_kv_server_start.
///
/// # Safety
/// `worker` is NULL or valid for a write; `config` as for braid_comm_init.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_worker_start(
    worker: *mut braid_kv_worker_t,
    config: *const braid_config_t,
) -> braid_status_t {
    boundary("braid_kv_worker_start", || {
        // SAFETY: caller contract.
        unsafe { put(worker, "worker", std::ptr::null_mut()) }?;
        // SAFETY: caller contract.
        let cfg = unsafe { config_of(config) }?;
        let w = KvWorker::start(cfg, PsOptions::from_env()?)?;
        let b = Box::into_raw(Box::new(braid_kv_worker { worker: w }));
        // SAFETY: checked non-NULL by `put` above; caller contract.
        unsafe { worker.write(b) };
        Ok(())
    })
}

/// Writes a checkpoint of the group's push/pull state to directory `dir` (created if needed;
/// a relative path is taken from the current directory; every server must reach the same
/// path), blocking until it is on disk: every server writes the parts it owns at one
/// consistent version (sync: the round this worker last pushed into), one file per server,
/// then this worker writes `manifest.json` last, so the previous checkpoint in `dir` stays
/// valid until the new one is complete. Servers copy their state in memory and write in the
/// background. The coordinator records it (`braid-coordinator status`). Servers started with
/// BRAID_PS_RESTORE=`dir` load it, with any number of servers. Periodic checkpoints:
/// BRAID_PS_CHECKPOINT_DIR and BRAID_PS_CHECKPOINT_EVERY.
///
/// Errors: braid_invalid_argument (NULL `worker` or `dir`, a path that is not UTF-8 or too
/// long, a server's refusal, e.g. still writing an earlier checkpoint or the view changed
/// meanwhile), braid_remote_error when a server is lost before it answered,
/// braid_system_error (I/O writing the manifest), braid_timeout (BRAID_TIMEOUT). Nothing is
/// installed on error.
///
/// # Safety
/// `worker` is NULL or live; `dir` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_checkpoint(
    worker: braid_kv_worker_t,
    dir: *const c_char,
) -> braid_status_t {
    boundary("braid_kv_checkpoint", || {
        // SAFETY: caller contract.
        let w = unsafe { kv_worker_ref(worker) }?;
        // SAFETY: caller contract (NULL or NUL-terminated).
        let dir = unsafe { opt_str(dir, "dir") }?.ok_or_else(|| Fail::arg("dir is NULL"))?;
        w.worker.checkpoint(dir)?;
        Ok(())
    })
}

/// Installs update rule `rule` on every push/pull server of the view, blocking until each
/// acknowledged it (bounded by BRAID_TIMEOUT). `rule` is spelt as BRAID_PS_RULE: `sum`,
/// `sgd:LR`, or `sgd:lr=LR,momentum=M,wd=WD,rescale=R,clip=C` (any subset, `lr` required;
/// defaults momentum 0, wd 0, rescale 1, no clipping; a negative clip means none): MXNet 1.9's
/// SGD (sgd_update / sgd_mom_update: g = clip(rescale * grad); without momentum
/// w = (1 - lr*wd)*w - lr*g; with momentum mom = momentum*mom - lr*wd*w - lr*g, w += mom),
/// float keys only (float16/bfloat16 computed in float32). The momentum buffer is kept per key
/// on the servers (zero at its first use), survives rule changes, moves with the key when a
/// server leaves or dies (replicas keep it), and can be read and replaced with
/// braid_kv_pull_state / braid_kv_push_state. The request is queued on each server's
/// connection behind everything this worker queued before; servers use the rule for every
/// update applied after it (sync mode: the rounds that close after it). Idempotent: call it on
/// every worker with the same rule. Afterwards this worker also sends the rule to servers that
/// join the view later, before anything else it sends them.
///
/// Errors: braid_invalid_argument (NULL `worker` or `rule`, a malformed rule naming the bad
/// field, a server running a callback rule from braid_kv_server_start_with_update, which
/// cannot be replaced), braid_remote_error naming a server lost before it answered,
/// braid_timeout. On error some servers may already use the new rule: call it again.
///
/// # Safety
/// `worker` is NULL or live; `rule` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_set_rule(
    worker: braid_kv_worker_t,
    rule: *const c_char,
) -> braid_status_t {
    boundary("braid_kv_set_rule", || {
        // SAFETY: caller contract.
        let w = unsafe { kv_worker_ref(worker) }?;
        // SAFETY: caller contract (NULL or NUL-terminated).
        let spec = unsafe { opt_str(rule, "rule") }?.ok_or_else(|| Fail::arg("rule is NULL"))?;
        let r = UpdateRule::parse(&spec)?;
        w.worker.set_rule(&r)?;
        Ok(())
    })
}

fn kv_pull_state<T: Element>(w: &KvWorker, k: &KvKeys<'_>, out: *mut c_void) -> CResult {
    let bytes = k
        .total
        .checked_mul(size_of::<T>())
        .filter(|b| *b <= isize::MAX as usize)
        .ok_or_else(|| Fail::arg("the lengths are too large"))?;
    if bytes == 0 {
        w.pull_state_into::<T>(k.keys, k.lens, &mut [])?;
        return Ok(());
    }
    if out.is_null() {
        return Err(Fail::arg("out is NULL"));
    }
    if !out.cast::<T>().is_aligned() {
        return Err(Fail::arg("out is not aligned for its element type"));
    }
    // SAFETY: non-NULL, aligned, not too large, and valid for writing `total` elements for the
    // call (contract of braid_kv_pull_state); nobody else uses it meanwhile.
    let o = unsafe { std::slice::from_raw_parts_mut(out.cast::<T>(), k.total) };
    w.pull_state_into(k.keys, k.lens, o)?;
    Ok(())
}

fn kv_push_state<T: Element>(w: &KvWorker, k: &KvKeys<'_>, vals: *const c_void) -> CResult {
    // SAFETY: `vals` is NULL or valid for `total` elements for the call (contract of
    // braid_kv_push_state).
    let v = unsafe { c_slice(vals.cast::<T>(), k.total, "vals") }?;
    w.push_state(k.keys, k.lens, v)?;
    Ok(())
}

/// Reads the server-side optimizer state of `nkeys` keys (the momentum buffers of the sgd
/// rule, see braid_kv_set_rule) into `out`, laid out as braid_kv_pull's output (`lens[i]`
/// elements of `dtype`, the keys' datatype, concatenated); zeros for a key that has no state
/// yet (no update with momentum so far). Blocking. For MXNet's save_optimizer_states.
///
/// Errors: as braid_kv_pull; braid_invalid_argument for a key nobody initialised.
///
/// # Safety
/// `worker` is NULL or live; `keys` and `lens` valid for `nkeys` elements; `out` valid for
/// writing the sum of `lens` elements of `dtype` for the call.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_pull_state(
    worker: braid_kv_worker_t,
    keys: *const u64,
    lens: *const usize,
    nkeys: usize,
    out: *mut c_void,
    dtype: DatatypeArg,
) -> braid_status_t {
    boundary("braid_kv_pull_state", || {
        // SAFETY: caller contract.
        let w = unsafe { kv_worker_ref(worker) }?;
        let dtype = dtype_of(dtype)?;
        // SAFETY: caller contract.
        let k = unsafe { kv_keys(keys, lens, nkeys) }?;
        with_element!(dtype, kv_pull_state(&w.worker, &k, out))
    })
}

/// Replaces the server-side optimizer state of `nkeys` keys (laid out as braid_kv_push's
/// values; the keys' datatype and lengths) with `vals`, replicated like a push, blocking until
/// every part was stored and replicated. The servers use it from their next update. For
/// MXNet's load_optimizer_states.
///
/// Errors: as braid_kv_push; braid_invalid_argument for a key nobody initialised or a length
/// or datatype that is not the key's.
///
/// # Safety
/// `worker` is NULL or live; `keys` and `lens` valid for `nkeys` elements; `vals` valid for
/// reading the sum of `lens` elements of `dtype` for the call.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_push_state(
    worker: braid_kv_worker_t,
    keys: *const u64,
    lens: *const usize,
    nkeys: usize,
    vals: *const c_void,
    dtype: DatatypeArg,
) -> braid_status_t {
    boundary("braid_kv_push_state", || {
        // SAFETY: caller contract.
        let w = unsafe { kv_worker_ref(worker) }?;
        let dtype = dtype_of(dtype)?;
        // SAFETY: caller contract.
        let k = unsafe { kv_keys(keys, lens, nkeys) }?;
        with_element!(dtype, kv_push_state(&w.worker, &k, vals))
    })
}

/// Stops a worker and frees it (it leaves the group). Wait for or free its requests first:
/// operations still in flight afterwards fail, possibly only after BRAID_TIMEOUT. NULL is a
/// no-op returning braid_success. The handle is invalid afterwards.
///
/// # Safety
/// `worker` is NULL or a live worker not used by any other thread.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_worker_destroy(worker: braid_kv_worker_t) -> braid_status_t {
    boundary("braid_kv_worker_destroy", || {
        if !worker.is_null() {
            // SAFETY: `worker` came from Box::into_raw in braid_kv_worker_start and is freed
            // once (caller contract).
            drop(unsafe { Box::from_raw(worker) });
        }
        Ok(())
    })
}

fn kv_init<T: Element>(w: &KvWorker, k: &KvKeys<'_>, vals: *const c_void) -> CResult {
    // SAFETY: `vals` is NULL or valid for `total` elements for the call (contract of
    // braid_kv_init).
    let v = unsafe { c_slice(vals.cast::<T>(), k.total, "vals") }?;
    w.init(k.keys, k.lens, v)?;
    Ok(())
}

/// Creates `nkeys` keys with initial values, blocking until every server holding a part
/// answered. Key `keys[i]` holds `lens[i]` elements of `datatype`; the values are concatenated
/// in `vals` (sum of `lens` elements). The first init of a key wins; later inits (other
/// workers) must agree on its length and datatype, else braid_invalid_argument. Every key must
/// be initialised (by some worker) before it is pushed. `keys` and `lens` may be NULL when
/// `nkeys` is 0, `vals` when the lengths sum to 0. Every datatype is accepted, float16 and
/// bfloat16 included (16-bit patterns; the servers sum them and run the sgd rule in float32 and
/// round back).
///
/// Errors: braid_invalid_argument (NULL or misaligned arrays, bad datatype, lengths that
/// contradict what this worker saw before, a server's refusal), braid_timeout (no answer within
/// BRAID_TIMEOUT).
///
/// # Safety
/// `worker` is NULL or live; `keys` and `lens` valid for `nkeys` elements and `vals` for the
/// sum of `lens` elements of `datatype`, for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_init(
    worker: braid_kv_worker_t,
    keys: *const u64,
    lens: *const usize,
    nkeys: usize,
    vals: *const c_void,
    datatype: DatatypeArg,
) -> braid_status_t {
    boundary("braid_kv_init", || {
        // SAFETY: caller contract.
        let w = unsafe { kv_worker_ref(worker) }?;
        let dtype = dtype_of(datatype)?;
        // SAFETY: caller contract.
        let k = unsafe { kv_keys(keys, lens, nkeys) }?;
        with_element!(dtype, kv_init(&w.worker, &k, vals))
    })
}

/// Stores a new push/pull request in `*req` (checked non-NULL by the caller).
///
/// # Safety
/// `req` is valid for a write.
unsafe fn store_kv_request(req: *mut braid_kv_request_t, p: Box<dyn KvPending>) {
    let r = Box::into_raw(Box::new(braid_kv_request {
        pending: Some(p),
        result: None,
    }));
    // SAFETY: the caller checked `req` and guarantees it is valid for a write.
    unsafe { req.write(r) };
}

fn kv_push<T: Element>(
    w: &KvWorker,
    k: &KvKeys<'_>,
    vals: *const c_void,
    prio: c_int,
) -> CResult<Box<dyn KvPending>> {
    // SAFETY: `vals` is NULL or valid for `total` elements for the call (contract of
    // braid_kv_push).
    let v = unsafe { c_slice(vals.cast::<T>(), k.total, "vals") }?;
    let h = w.push(k.keys, k.lens, v, prio)?;
    Ok(Box::new(PushPending(h)))
}

fn kv_pull<T: Element>(
    w: &KvWorker,
    k: &KvKeys<'_>,
    push: Option<*const c_void>,
    out: *mut c_void,
    min_version: Option<u64>,
    prio: c_int,
) -> CResult<Box<dyn KvPending>> {
    let bytes = k
        .total
        .checked_mul(size_of::<T>())
        .filter(|b| *b <= isize::MAX as usize)
        .ok_or_else(|| Fail::arg("the lengths are too large"))?;
    if bytes > 0 && out.is_null() {
        return Err(Fail::arg("out is NULL"));
    }
    let out = out.cast::<T>();
    let handle = match push {
        Some(vals) => {
            // SAFETY: `vals` is NULL or valid for `total` elements for the call (contract of
            // braid_kv_push_pull).
            let v = unsafe { c_slice(vals.cast::<T>(), k.total, "vals") }?;
            // SAFETY: `out` is valid for `total` elements until the request completes or is
            // freed (contract of braid_kv_push_pull); freeing it forgets the operation first.
            unsafe { w.push_pull_raw(k.keys, k.lens, v, out, prio) }?
        }
        // SAFETY: as above (contract of braid_kv_pull).
        None => unsafe { w.pull_raw::<T>(k.keys, k.lens, out, min_version, prio) }?,
    };
    Ok(Box::new(PullPending(handle)))
}

/// Pushes gradients for `nkeys` keys (arrays as braid_kv_init; every key initialised before)
/// with priority `prio` (higher is sent first when queues build up) and writes a request to
/// `*req` (NULL on failure). Servers aggregate per BRAID_PS_MODE and apply BRAID_PS_RULE (or
/// the rule set with braid_kv_set_rule, or the server's callback). `vals` is copied before the call returns (it may be reused at once).
/// The request completes when every part was recorded and replicated; braid_kv_wait writes
/// version 0 for a push.
///
/// Errors: as braid_kv_init, e.g. braid_invalid_argument naming the key when a length or
/// datatype differs from the key's; a server's refusal is reported by braid_kv_wait.
///
/// # Safety
/// `worker` is NULL or live; `keys`, `lens` and `vals` as for braid_kv_init; `req` is NULL or
/// valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_push(
    worker: braid_kv_worker_t,
    keys: *const u64,
    lens: *const usize,
    nkeys: usize,
    vals: *const c_void,
    datatype: DatatypeArg,
    prio: c_int,
    req: *mut braid_kv_request_t,
) -> braid_status_t {
    boundary("braid_kv_push", || {
        // SAFETY: caller contract.
        unsafe { put(req, "req", std::ptr::null_mut()) }?;
        // SAFETY: caller contract.
        let w = unsafe { kv_worker_ref(worker) }?;
        let dtype = dtype_of(datatype)?;
        // SAFETY: caller contract.
        let k = unsafe { kv_keys(keys, lens, nkeys) }?;
        let p = with_element!(dtype, kv_push(&w.worker, &k, vals, prio))?;
        // SAFETY: `req` checked non-NULL above; caller contract.
        unsafe { store_kv_request(req, p) };
        Ok(())
    })
}

/// Pulls `nkeys` keys (arrays as braid_kv_init) into `out` (the sum of `lens` elements of
/// `datatype`, concatenated in key order) and writes a request to `*req` (NULL on failure).
/// `min_version` >= 0: the values of a version at least that (waits for it); -1: the default:
/// sync and bounded mode: the round this worker last pushed to (a push followed by a pull
/// returns that round's aggregate); async mode: the latest. The values are written to `out`
/// when braid_kv_wait returns (or braid_kv_test reports done); braid_kv_wait reports the
/// smallest version over the parts read. Pulling a key nobody initialised waits for it until
/// BRAID_TIMEOUT.
///
/// Errors: as braid_kv_init; braid_invalid_argument when `min_version` < -1.
///
/// # Safety
/// `worker` is NULL or live; `keys` and `lens` valid for `nkeys` elements for the call; `out`
/// valid for writing the sum of `lens` elements of `datatype` and untouched until the request
/// completes (braid_kv_wait, braid_kv_test reporting done, or braid_kv_request_free); `req`
/// is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_pull(
    worker: braid_kv_worker_t,
    keys: *const u64,
    lens: *const usize,
    nkeys: usize,
    out: *mut c_void,
    datatype: DatatypeArg,
    min_version: i64,
    prio: c_int,
    req: *mut braid_kv_request_t,
) -> braid_status_t {
    boundary("braid_kv_pull", || {
        // SAFETY: caller contract.
        unsafe { put(req, "req", std::ptr::null_mut()) }?;
        // SAFETY: caller contract.
        let w = unsafe { kv_worker_ref(worker) }?;
        let dtype = dtype_of(datatype)?;
        let min = match min_version {
            -1 => None,
            v => Some(u64::try_from(v).map_err(|_| {
                Fail::arg(format!(
                    "min_version is {v}: expected a version >= 0 or -1 (default)"
                ))
            })?),
        };
        // SAFETY: caller contract.
        let k = unsafe { kv_keys(keys, lens, nkeys) }?;
        let p = with_element!(dtype, kv_pull(&w.worker, &k, None, out, min, prio))?;
        // SAFETY: `req` checked non-NULL above; caller contract.
        unsafe { store_kv_request(req, p) };
        Ok(())
    })
}

/// Pushes `vals` and pulls the same keys into `out` in one round trip (arrays as
/// braid_kv_init); writes a request to `*req` (NULL on failure). Sync mode: the result is the
/// aggregate of the round this push took part in; async: the value after it. `vals` is copied
/// before the call returns; `out` is written when the request completes (in place, out ==
/// vals, is allowed). braid_kv_wait reports the version pulled.
///
/// Errors: as braid_kv_push.
///
/// # Safety
/// As braid_kv_push for `vals` and braid_kv_pull for `out`.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_push_pull(
    worker: braid_kv_worker_t,
    keys: *const u64,
    lens: *const usize,
    nkeys: usize,
    vals: *const c_void,
    out: *mut c_void,
    datatype: DatatypeArg,
    prio: c_int,
    req: *mut braid_kv_request_t,
) -> braid_status_t {
    boundary("braid_kv_push_pull", || {
        // SAFETY: caller contract.
        unsafe { put(req, "req", std::ptr::null_mut()) }?;
        // SAFETY: caller contract.
        let w = unsafe { kv_worker_ref(worker) }?;
        let dtype = dtype_of(datatype)?;
        // SAFETY: caller contract.
        let k = unsafe { kv_keys(keys, lens, nkeys) }?;
        let p = with_element!(dtype, kv_pull(&w.worker, &k, Some(vals), out, None, prio))?;
        // SAFETY: `req` checked non-NULL above; caller contract.
        unsafe { store_kv_request(req, p) };
        Ok(())
    })
}

/// Waits for a push/pull request (if not yet done; not blocking when `block` is false) and
/// returns its outcome.
fn kv_finish(r: &mut braid_kv_request, block: bool) -> Option<CResult<u64>> {
    if r.result.is_none() {
        let p = r.pending.take()?;
        if !block && !p.ready() {
            r.pending = Some(p);
            return None;
        }
        r.result = Some(p.complete());
    }
    r.result.clone()
}

/// The push/pull request behind a handle.
///
/// # Safety
/// `req` is NULL or a request not yet freed, used by this thread only.
unsafe fn kv_req_mut<'a>(req: braid_kv_request_t) -> CResult<&'a mut braid_kv_request> {
    // SAFETY: per contract, a non-NULL `req` came from Box::into_raw in store_kv_request and
    // has not been freed; requests must not be used from two threads at once (documented).
    unsafe { req.as_mut() }.ok_or_else(|| Fail::arg("req is NULL"))
}

/// Blocks until a push/pull request completes (bounded by BRAID_TIMEOUT) and returns its
/// status; a pull's values are in its `out` buffer afterwards. `*version` (when `version` is
/// not NULL) receives the version pulled (the smallest over the parts read; 0 for a push). May
/// be called again (same status and version). The request still has to be freed with
/// braid_kv_request_free.
///
/// Errors: a server's refusal (braid_invalid_argument: wrong length or datatype, a push to a
/// key never initialised), braid_timeout (no answer within BRAID_TIMEOUT).
///
/// # Safety
/// `req` is NULL or a live request; `version` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_wait(
    req: braid_kv_request_t,
    version: *mut u64,
) -> braid_status_t {
    boundary("braid_kv_wait", || {
        // SAFETY: caller contract.
        let r = unsafe { kv_req_mut(req) }?;
        let v =
            kv_finish(r, true).unwrap_or_else(|| Err(Fail::usage("request holds no operation")))?;
        if !version.is_null() {
            // SAFETY: non-NULL; caller contract.
            unsafe { version.write(v) };
        }
        Ok(())
    })
}

/// Checks a push/pull request without blocking: `*done` = 1 and the operation's status when it
/// has completed (a pull's values are then in `out`), `*done` = 0 and braid_success while it
/// runs. May be called again after completion (same status).
///
/// # Safety
/// `req` is NULL or a live request; `done` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_test(
    req: braid_kv_request_t,
    done: *mut c_int,
) -> braid_status_t {
    boundary("braid_kv_test", || {
        if done.is_null() {
            return Err(Fail::arg("done is NULL"));
        }
        // SAFETY: caller contract.
        let r = unsafe { kv_req_mut(req) }?;
        let out = kv_finish(r, false);
        // SAFETY: checked non-NULL; caller contract.
        unsafe { done.write(c_int::from(out.is_some())) };
        out.map_or(Ok(()), |o| o.map(|_| ()))
    })
}

/// Frees a push/pull request. An incomplete operation is waited for first (a pull's values are
/// written to `out`), and if its failure had not been reported by braid_kv_test/braid_kv_wait,
/// that status is returned. NULL is a no-op returning braid_success. The handle is invalid
/// afterwards.
///
/// # Safety
/// `req` is NULL or a live request not used by any other thread.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_request_free(req: braid_kv_request_t) -> braid_status_t {
    boundary("braid_kv_request_free", || {
        if req.is_null() {
            return Ok(());
        }
        // SAFETY: `req` came from Box::into_raw in store_kv_request and is freed once
        // (contract).
        let mut r = unsafe { Box::from_raw(req) };
        let reported = r.result.is_some();
        let out = kv_finish(&mut r, true);
        drop(r);
        match out {
            Some(Err(f)) if !reported => Err(f),
            _ => Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_core() {
        for (i, d) in DataType::ALL.iter().enumerate() {
            assert_eq!(dtype_of(DatatypeArg(i as c_int)).ok(), Some(*d));
        }
        for (i, o) in ReduceOp::ALL.iter().enumerate() {
            assert_eq!(op_of(RedopArg(i as c_int)).ok(), Some(*o));
        }
        for d in DataType::ALL {
            assert_eq!(dtype_of(DatatypeArg(dtype_code(d))).ok(), Some(d));
        }
        assert!(dtype_of(DatatypeArg(11)).is_err());
        assert!(op_of(RedopArg(-1)).is_err());
        assert!(op_of(RedopArg(8)).is_err());
        // The C enums and the core codes agree value by value.
        assert_eq!(
            dtype_of(DatatypeArg(braid_datatype_t::braid_int16 as c_int)).ok(),
            Some(DataType::I16)
        );
        for (c, o) in [
            (braid_redop_t::braid_sum, ReduceOp::Sum),
            (braid_redop_t::braid_prod, ReduceOp::Prod),
            (braid_redop_t::braid_min, ReduceOp::Min),
            (braid_redop_t::braid_max, ReduceOp::Max),
            (braid_redop_t::braid_avg, ReduceOp::Avg),
            (braid_redop_t::braid_band, ReduceOp::Band),
            (braid_redop_t::braid_bor, ReduceOp::Bor),
            (braid_redop_t::braid_bxor, ReduceOp::Bxor),
        ] {
            assert_eq!(op_of(RedopArg(c as c_int)).ok(), Some(o));
        }
    }
}
