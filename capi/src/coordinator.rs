//! A coordinator service hosted in the calling process (the rendezvous and membership
//! service communicators meet at).

use std::ffi::{c_char, c_int};

use braid_core::membership::{Coordinator, CoordinatorOptions};

use crate::args::{opt_str, put};
use crate::error::{boundary, braid_status_t, Fail};

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
