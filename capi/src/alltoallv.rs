//! braid_all_to_allv and braid_iall_to_allv.

use std::ffi::c_void;

use crate::args::{dtype_of, DatatypeArg};
use crate::coll::coll_start;
use crate::comm::braid_comm_t;
use crate::error::{boundary, braid_status_t, CResult, Fail};
use crate::request::{braid_request_t, store_request};

// ---- exported functions: all_to_allv -------------------------------------------------------

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
        crate::stream::host_only(
            func,
            &[("sendbuf", a.send), ("recvbuf", a.recv.cast_const())],
        )?;
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
