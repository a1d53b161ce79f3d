//! The non-blocking forms (braid_i*) of the collectives and of send/recv: each starts the
//! operation and writes a request to `*req` (see `request.rs`).

use std::ffi::{c_int, c_void};

use braid_core::coll::CollKind;

use crate::args::{DatatypeArg, RedopArg};
use crate::coll::{barrier_args, coll, CollArgs};
use crate::comm::braid_comm_t;
use crate::error::braid_status_t;
use crate::group::{p2p, P2pArgs};
use crate::request::braid_request_t;

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
