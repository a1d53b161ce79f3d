//! Shared memory registered with a communicator: braid_mem_alloc and braid_mem_free.

use std::ffi::c_void;

use crate::args::{comm_ref, put};
use crate::comm::braid_comm_t;
use crate::error::{boundary, braid_status_t, Fail};

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
