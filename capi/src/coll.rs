//! Blocking collectives, and [`coll`], the body every collective shares (blocking when it is
//! given no request, non-blocking otherwise).

use std::ffi::{c_int, c_void};

use braid_core::coll::CollKind;
use braid_core::{RawColl, ReduceOp};

use crate::args::{comm_ref, dtype_of, op_of, rank_arg, DatatypeArg, RedopArg};
use crate::comm::{braid_comm, braid_comm_t};
use crate::error::{boundary, braid_status_t, CResult, Fail};
use crate::group::in_group;
use crate::request::{braid_request_t, reset_request, store_request};

// ---- collectives (shared body) -------------------------------------------------------------

pub(crate) struct CollArgs {
    pub(crate) kind: CollKind,
    pub(crate) send: *const c_void,
    pub(crate) recv: *mut c_void,
    pub(crate) count: usize,
    pub(crate) dtype: DatatypeArg,
    pub(crate) op: Option<RedopArg>,
    pub(crate) root: Option<c_int>,
}

/// The start shared by every collective entry point: clears `*req` (non-blocking forms),
/// resolves `comm` and refuses collectives inside a group.
///
/// # Safety
/// `req` is None or holds NULL or a valid out-pointer; `comm` is NULL or a live communicator.
pub(crate) unsafe fn coll_start<'a>(
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

/// The datatype, operator (Sum when the collective has none) and root (0 when it has none)
/// of a collective's C arguments, checked.
pub(crate) fn resolve(
    c: &braid_comm,
    dtype: DatatypeArg,
    op: Option<RedopArg>,
    root: Option<c_int>,
) -> CResult<(braid_core::DataType, ReduceOp, usize)> {
    let dtype = dtype_of(dtype)?;
    let op = match op {
        Some(o) => op_of(o)?,
        None => ReduceOp::Sum,
    };
    let root = match root {
        Some(r) => rank_arg("root", r, c.comm.size())?,
        None => 0,
    };
    Ok((dtype, op, root))
}

/// Body of every collective: blocking when `req` is None, else non-blocking.
///
/// # Safety
/// The buffer and handle contracts of the public function that calls it.
pub(crate) unsafe fn coll(
    func: &'static str,
    a: CollArgs,
    comm: braid_comm_t,
    req: Option<*mut braid_request_t>,
) -> braid_status_t {
    boundary(func, || {
        // SAFETY: caller contract (`req` NULL or writable, `comm` NULL or live).
        let c = unsafe { coll_start(comm, req) }?;
        let (dtype, op, root) = resolve(c, a.dtype, a.op, a.root)?;
        crate::stream::host_only(
            func,
            &[("sendbuf", a.send), ("recvbuf", a.recv.cast_const())],
        )?;
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

pub(crate) fn barrier_args() -> CollArgs {
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
