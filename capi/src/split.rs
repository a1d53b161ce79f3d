//! New communicators from an existing one: braid_comm_split and braid_comm_create_group.

use std::ffi::c_int;

use braid_core::Communicator;

use crate::args::{comm_ref, put, rank_arg};
use crate::comm::{braid_comm, braid_comm_t};
use crate::error::{boundary, braid_status_t, CResult, Fail};
use crate::group::in_group;

// ---- exported functions: new communicators -------------------------------------------------

/// The `color` of braid_comm_split that puts a rank in no new communicator (its `*newcomm`
/// is set to NULL), like NCCL_SPLIT_NOCOLOR / MPI_UNDEFINED.
pub const BRAID_SPLIT_NOCOLOR: c_int = -1;

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
