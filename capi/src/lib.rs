//! braid's C ABI: `libbraid.so` / `libbraid.a`, declared by `include/braid.h`.
//!
//! The header is generated from this crate by cbindgen (`capi/cbindgen.toml`; the test
//! `capi/tests/header.rs` checks that the committed header is current, and rewrites it with
//! `UPDATE_HEADER=1`). The rules every function follows (status codes, last error, NULL
//! handling, threads, in-place calls) are stated in the header's preamble, which lives in
//! `cbindgen.toml`.
//!
//! Every `extern "C"` function runs inside `boundary` (`error.rs`): a panic never crosses into
//! C (it becomes `braid_internal_error`), and every failure stores a message in this thread's
//! last-error slot.
//!
//! Thread-local state (the only mutable state outside communicators and requests): the last
//! error message and the pending `braid_group_start`/`braid_group_end` group of this thread.

#![allow(non_camel_case_types)]

// The modules, one per handle or family of calls. cbindgen writes the header's functions in
// source order: this file's first, then each module's in the order of these `mod` lines (the
// order of the header; keep each on its own line with its comment, so that rustfmt does not
// sort them).
// Status codes, the last error, the panic boundary; braid_status_string, braid_get_last_error.
mod error;
// Argument checks: the datatype and operator enums, handles, out-pointers, strings.
mod args;
// braid_config_t and braid_config_init.
mod config;
// Communicators: init, rank/size, abort, elastic update/leave, destroy.
mod comm;
// A coordinator service in this process.
mod coordinator;
// braid_mem_alloc / braid_mem_free.
mod mem;
// Blocking collectives and the body all collectives share.
mod coll;
// Point-to-point and groups.
mod group;
// Non-blocking collectives and point-to-point (braid_i*).
mod nonblocking;
// Receives from any rank: braid_recv_any, braid_irecv_any, braid_request_source.
mod any_source;
// braid_all_to_allv / braid_iall_to_allv.
mod alltoallv;
// braid_comm_split / braid_comm_create_group.
mod split;
// Requests: test, wait, free.
mod request;
// Push/pull: parameter servers and workers.
mod kv;
// Pipeline planning.
mod pipeline;
// CUDA device buffers: the _stream forms, device allocations, the async error.
mod stream;

pub use crate::{
    alltoallv::*, args::*, coll::*, comm::*, config::*, coordinator::*, error::*, group::*, kv::*,
    mem::*, nonblocking::*, pipeline::*, request::*, split::*, stream::*,
};

use std::ffi::c_int;

// ---- version -------------------------------------------------------------------------------

/// Major version of this header (the library's is returned by braid_get_version).
pub const BRAID_VERSION_MAJOR: c_int = 0;
/// Minor version of this header.
pub const BRAID_VERSION_MINOR: c_int = 1;
/// Patch version of this header.
pub const BRAID_VERSION_PATCH: c_int = 0;
/// Version of `braid_config_t` this header describes (its fields are append-only).
pub const BRAID_CONFIG_VERSION: u32 = 1;

const _: () = assert!(
    BRAID_VERSION_MAJOR as u32 == braid_core::VERSION.0
        && BRAID_VERSION_MINOR as u32 == braid_core::VERSION.1
        && BRAID_VERSION_PATCH as u32 == braid_core::VERSION.2,
    "the C version macros must match braid::VERSION"
);

// ---- exported functions: library -----------------------------------------------------------

/// Writes the library's version as MAJOR*10000 + MINOR*100 + PATCH to `*version` (compare with
/// BRAID_VERSION_CODE of the header you compiled with).
///
/// # Safety
/// `version` is NULL (braid_invalid_argument) or valid for writing an int.
#[no_mangle]
pub unsafe extern "C" fn braid_get_version(version: *mut c_int) -> braid_status_t {
    boundary("braid_get_version", || {
        let v = BRAID_VERSION_MAJOR * 10000 + BRAID_VERSION_MINOR * 100 + BRAID_VERSION_PATCH;
        // SAFETY: caller contract.
        unsafe { put(version, "version", v) }
    })
}
