//! Requests of non-blocking operations (the braid_i* functions and braid_igroup_end): test,
//! wait and free.

use std::ffi::c_int;

use braid_core::Handle;

use crate::args::put;
use crate::error::{boundary, braid_status_t, CResult, Fail};

// ---- opaque objects ------------------------------------------------------------------------

/// A non-blocking operation (opaque). Created by the braid_i* functions, freed by
/// braid_request_free.
pub struct braid_request {
    pub(crate) handle: Option<Handle<()>>,
    pub(crate) result: Option<Result<(), Fail>>,
    /// The source of a receive from any rank (braid_irecv_any), for braid_request_source.
    pub(crate) source: Option<braid_core::AnySource>,
}

/// Handle of a non-blocking operation. Using it after braid_request_free is undefined
/// behaviour.
pub type braid_request_t = *mut braid_request;

/// Stores a new request in `*req` (which was checked non-NULL by the caller).
///
/// # Safety
/// `req` is valid for a write.
pub(crate) unsafe fn store_request(req: *mut braid_request_t, h: Handle<()>) {
    let r = Box::into_raw(Box::new(braid_request {
        handle: Some(h),
        result: None,
        source: None,
    }));
    // SAFETY: the caller checked `req` and guarantees it is valid for a write.
    unsafe { req.write(r) };
}

/// Clears `*req` (so a failed call leaves NULL) or fails when `req` is NULL.
///
/// # Safety
/// `req` is NULL or valid for a write.
pub(crate) unsafe fn reset_request(req: *mut braid_request_t) -> CResult {
    // SAFETY: forwarded contract.
    unsafe { put(req, "req", std::ptr::null_mut()) }
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

/// The request behind a handle, for the other modules of the ABI.
///
/// # Safety
/// As [`req_mut`].
pub(crate) unsafe fn request_mut<'a>(req: braid_request_t) -> CResult<&'a mut braid_request> {
    // SAFETY: forwarded contract.
    unsafe { req_mut(req) }
}

/// Waits for a request's operation (if not yet done) and returns its outcome.
pub(crate) fn finish(r: &mut braid_request, block: bool) -> Option<CResult> {
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
