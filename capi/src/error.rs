//! Status codes, failures and the panic boundary. [`boundary`] runs the body of every
//! `extern "C"` function: a panic never crosses into C (it becomes `braid_internal_error`), and
//! every failure stores a message in this thread's last-error slot (braid_get_last_error).

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use braid_core::{Error, ErrorClass};

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

/// A `braid_status_t` as received from C. Named `braid_status_t` in the header.
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct StatusArg(pub c_int);

// ---- errors and the panic boundary ---------------------------------------------------------

/// A failed call: its status and message.
#[derive(Debug, Clone)]
pub(crate) struct Fail {
    pub(crate) status: braid_status_t,
    pub(crate) msg: String,
}

impl Fail {
    pub(crate) fn arg(msg: impl Into<String>) -> Fail {
        Fail {
            status: braid_status_t::braid_invalid_argument,
            msg: format!("invalid argument: {}", msg.into()),
        }
    }

    pub(crate) fn usage(msg: impl Into<String>) -> Fail {
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

pub(crate) type CResult<T = ()> = Result<T, Fail>;

thread_local! {
    /// This thread's last failure message (what braid_get_last_error returns).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_last_error(func: &str, msg: &str) {
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
pub(crate) fn boundary(func: &'static str, f: impl FnOnce() -> CResult) -> braid_status_t {
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

// ---- exported functions: status and last error ---------------------------------------------

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
