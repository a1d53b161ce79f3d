//! Receives from any rank: braid_recv_any, braid_irecv_any and braid_request_source.

use std::ffi::{c_int, c_void};

use crate::args::{comm_ref, dtype_of, put, DatatypeArg};
use crate::comm::braid_comm_t;
use crate::error::{boundary, braid_status_t, CResult, Fail};
use crate::group::in_group;
use crate::request::{braid_request, braid_request_t, finish, request_mut, reset_request};

/// Checks the arguments shared by braid_recv_any and braid_irecv_any.
fn check(func: &str, buf: *mut c_void, count: usize) -> CResult {
    if in_group() {
        return Err(Fail::usage(format!(
            "{func} cannot be issued inside a group (a group names its peers)"
        )));
    }
    if count > 0 && buf.is_null() {
        return Err(Fail::arg("buf is NULL"));
    }
    crate::stream::host_only(func, &[("buf", buf.cast_const())])
}

fn rank_out(r: usize) -> CResult<c_int> {
    c_int::try_from(r).map_err(|_| Fail::arg(format!("source rank {r} does not fit an int")))
}

/// Receives `count` elements into `buf`: the first message with `tag` from ANY rank of the
/// communicator (as MPI_ANY_SOURCE), and writes that rank to `*source`. Receives match
/// messages by source and tag, not by arrival: see braid_send. Blocks until done; refused
/// inside a group (braid_invalid_usage). Needs connections that can look at a message before
/// receiving it (tcp, shm; braid_invalid_argument over ib).
///
/// # Safety
/// `buf` valid for `count` elements for the duration of the call; `comm` is NULL or live;
/// `source` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn braid_recv_any(
    buf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    tag: u64,
    comm: braid_comm_t,
    source: *mut c_int,
) -> braid_status_t {
    boundary("braid_recv_any", || {
        if source.is_null() {
            return Err(Fail::arg("source is NULL"));
        }
        check("braid_recv_any", buf, count)?;
        // SAFETY: caller contract (a live communicator or NULL).
        let c = unsafe { comm_ref(comm) }?;
        let dtype = dtype_of(datatype)?;
        // SAFETY: the caller guarantees `buf` is valid for `count` elements during the call.
        let r = unsafe { c.comm.recv_any_raw(buf.cast(), count, dtype, tag) }?;
        // SAFETY: checked non-NULL; caller contract.
        unsafe { put(source, "source", rank_out(r)?) }
    })
}

/// Non-blocking braid_recv_any (request rules as braid_iall_reduce): once the request has
/// completed, braid_request_source gives the rank the message came from. Refused inside a
/// group.
///
/// # Safety
/// As braid_recv_any, for the lifetime of the operation; `req` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn braid_irecv_any(
    buf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    tag: u64,
    comm: braid_comm_t,
    req: *mut braid_request_t,
) -> braid_status_t {
    boundary("braid_irecv_any", || {
        // SAFETY: `req` is NULL or a valid out-pointer (caller contract).
        unsafe { reset_request(req) }?;
        check("braid_irecv_any", buf, count)?;
        // SAFETY: caller contract (a live communicator or NULL).
        let c = unsafe { comm_ref(comm) }?;
        let dtype = dtype_of(datatype)?;
        // SAFETY: the caller keeps `buf` valid until the request completes (documented).
        let (h, src) = unsafe { c.comm.irecv_any_raw(buf.cast(), count, dtype, tag) }?;
        let r = Box::into_raw(Box::new(braid_request {
            handle: Some(h),
            result: None,
            source: Some(src),
        }));
        // SAFETY: `req` was checked non-NULL by reset_request above.
        unsafe { req.write(r) };
        Ok(())
    })
}

/// Writes to `*source` the rank whose message a completed braid_irecv_any request received
/// (it waits for nothing: braid_invalid_usage while the request runs, or for a request of
/// another call; the failed request's status when it failed).
///
/// # Safety
/// `req` is NULL or a live request; `source` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn braid_request_source(
    req: braid_request_t,
    source: *mut c_int,
) -> braid_status_t {
    boundary("braid_request_source", || {
        if source.is_null() {
            return Err(Fail::arg("source is NULL"));
        }
        // SAFETY: caller contract.
        let r = unsafe { request_mut(req) }?;
        if r.source.is_none() {
            return Err(Fail::usage("not a braid_irecv_any request"));
        }
        match finish(r, false) {
            None => Err(Fail::usage("the receive has not completed yet")),
            Some(Err(f)) => Err(f),
            Some(Ok(())) => {
                let rank = r
                    .source
                    .as_ref()
                    .and_then(|s| s.rank())
                    .ok_or_else(|| Fail::usage("the receive completed without a source"))?;
                // SAFETY: checked non-NULL; caller contract.
                unsafe { put(source, "source", rank_out(rank)?) }
            }
        }
    })
}
