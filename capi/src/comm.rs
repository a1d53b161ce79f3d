//! Communicators: creation (braid_comm_init, braid_comm_init_rank), rank, size, member id and
//! epoch, abort, elastic membership (update, leave, sync from the oldest member) and
//! destruction. New communicators from an existing one are in `split.rs`.

use std::ffi::{c_char, c_int, c_void};
use std::mem::size_of;

use braid_core::coll::CollKind;
use braid_core::Communicator;

use crate::args::{comm_ref, put, DatatypeArg};
use crate::coll::{coll, CollArgs};
use crate::config::{braid_config_t, config_of};
use crate::error::{boundary, braid_status_t, CResult, Fail};
use crate::BRAID_CONFIG_VERSION;

// ---- opaque objects ------------------------------------------------------------------------

/// A communicator (opaque). Created by braid_comm_init / braid_comm_init_rank, freed by
/// braid_comm_destroy.
pub struct braid_comm {
    pub(crate) comm: Communicator,
    /// Buffers from braid_mem_alloc not yet freed, by address.
    pub(crate) mem: std::sync::Mutex<std::collections::HashMap<usize, braid_core::SharedBuf<u8>>>,
}

/// Handle of a communicator. Using it after braid_comm_destroy is undefined behaviour (the
/// library cannot detect a dangling pointer).
pub type braid_comm_t = *mut braid_comm;

// ---- exported functions: communicators -----------------------------------------------------

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
