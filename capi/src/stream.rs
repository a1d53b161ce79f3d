//! CUDA device buffers: the `_stream` form of every collective and of send/recv (NCCL's
//! argument order plus a trailing `void *stream`), device allocations, the async error, and the
//! pointer-kind checks the plain forms use to refuse device memory.

use std::ffi::{c_char, c_int, c_void};

use braid_core::coll::CollKind;
use braid_core::cuda::{self, driver, pointer_kind, DevPtr, DeviceP2p, PtrKind, Stream};
use braid_core::RawColl;

use crate::args::{comm_ref, dtype_of, put, rank_arg, DatatypeArg, RedopArg};
use crate::coll::{coll_start, resolve};
use crate::comm::braid_comm_t;
use crate::error::{boundary, braid_status_t, CResult, Fail};
use crate::group::{in_group, record_device_op};

/// Refuses device memory in a plain (host) form: "braid_all_reduce: sendbuf is CUDA device
/// memory (device 0); use braid_all_reduce_stream". Costs nothing measurable in a process
/// that has not loaded libcuda.
pub(crate) fn host_only(func: &str, bufs: &[(&str, *const c_void)]) -> CResult {
    if !driver::loaded_in_process() {
        return Ok(());
    }
    for (name, p) in bufs {
        if let PtrKind::Device(d) = pointer_kind(*p) {
            return Err(Fail::arg(format!(
                "{name} is CUDA device memory (device {d}); {func} takes host memory: use \
                 {func}_stream"
            )));
        }
    }
    Ok(())
}

/// Checks that every non-NULL buffer of a `_stream` form is device (or managed) memory.
fn device_only(func: &str, bufs: &[(&str, *const c_void)]) -> CResult {
    // Without a driver, say so (before looking at pointers).
    driver::driver().map_err(Fail::from)?;
    let base = func.strip_suffix("_stream").unwrap_or(func);
    for (name, p) in bufs {
        if p.is_null() {
            continue;
        }
        if pointer_kind(*p) == PtrKind::Host {
            return Err(Fail::arg(format!(
                "{name} is host memory; {func} takes CUDA device memory (use {base} for host \
                 buffers; host and device buffers cannot be mixed in one call)"
            )));
        }
    }
    Ok(())
}

struct StreamColl {
    kind: CollKind,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    dtype: DatatypeArg,
    op: Option<RedopArg>,
    root: Option<c_int>,
}

/// Body of every `_stream` collective.
///
/// # Safety
/// The buffer contracts of the public function: device memory valid until the work completes
/// on `stream`; `comm` NULL or live; `stream` NULL or a live CUDA stream.
unsafe fn coll_stream(
    func: &'static str,
    a: StreamColl,
    comm: braid_comm_t,
    stream: *mut c_void,
) -> braid_status_t {
    boundary(func, || {
        // SAFETY: caller contract.
        let c = unsafe { coll_start(comm, None) }?;
        let (dtype, op, root) = resolve(c, a.dtype, a.op, a.root)?;
        device_only(
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
        // SAFETY: this function's contract.
        unsafe {
            c.comm
                .coll_device_raw(rc, a.send as DevPtr, a.recv as DevPtr, Stream(stream))
        }?;
        Ok(())
    })
}

/// Stream form of braid_all_reduce: `sendbuf`/`recvbuf` are CUDA device memory; the call is
/// enqueued on `stream` (NULL: the default stream) and returns at once, as ncclAllReduce.
/// Errors found before enqueueing are returned; later ones by braid_comm_get_async_error and
/// the next device call. Host memory here, or a device pointer in braid_all_reduce, is
/// braid_invalid_argument. Without a CUDA driver: braid_system_error ("no CUDA driver
/// (libcuda.so.1 not found)").
///
/// # Safety
/// The buffers are device (or managed) memory valid for `count` elements until the work
/// completes on `stream`; `comm` is NULL or live; `stream` is NULL or a live CUDA stream of the
/// calling thread's context.
#[no_mangle]
pub unsafe extern "C" fn braid_all_reduce_stream(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    op: RedopArg,
    comm: braid_comm_t,
    stream: *mut c_void,
) -> braid_status_t {
    let a = StreamColl {
        kind: CollKind::AllReduce,
        send: sendbuf,
        recv: recvbuf,
        count,
        dtype: datatype,
        op: Some(op),
        root: None,
    };
    // SAFETY: this function's contract.
    unsafe { coll_stream("braid_all_reduce_stream", a, comm, stream) }
}

/// Stream form of braid_reduce_scatter (device buffers, enqueued on `stream`; see
/// braid_all_reduce_stream).
///
/// # Safety
/// As braid_all_reduce_stream, with braid_reduce_scatter's lengths.
#[no_mangle]
pub unsafe extern "C" fn braid_reduce_scatter_stream(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    recvcount: usize,
    datatype: DatatypeArg,
    op: RedopArg,
    comm: braid_comm_t,
    stream: *mut c_void,
) -> braid_status_t {
    let a = StreamColl {
        kind: CollKind::ReduceScatter,
        send: sendbuf,
        recv: recvbuf,
        count: recvcount,
        dtype: datatype,
        op: Some(op),
        root: None,
    };
    // SAFETY: this function's contract.
    unsafe { coll_stream("braid_reduce_scatter_stream", a, comm, stream) }
}

/// Stream form of braid_all_gather (device buffers, enqueued on `stream`; see
/// braid_all_reduce_stream).
///
/// # Safety
/// As braid_all_reduce_stream, with braid_all_gather's lengths.
#[no_mangle]
pub unsafe extern "C" fn braid_all_gather_stream(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    sendcount: usize,
    datatype: DatatypeArg,
    comm: braid_comm_t,
    stream: *mut c_void,
) -> braid_status_t {
    let a = StreamColl {
        kind: CollKind::AllGather,
        send: sendbuf,
        recv: recvbuf,
        count: sendcount,
        dtype: datatype,
        op: None,
        root: None,
    };
    // SAFETY: this function's contract.
    unsafe { coll_stream("braid_all_gather_stream", a, comm, stream) }
}

/// Stream form of braid_broadcast (device buffers, enqueued on `stream`; see
/// braid_all_reduce_stream).
///
/// # Safety
/// As braid_all_reduce_stream, with braid_broadcast's lengths.
#[no_mangle]
pub unsafe extern "C" fn braid_broadcast_stream(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    root: c_int,
    comm: braid_comm_t,
    stream: *mut c_void,
) -> braid_status_t {
    let a = StreamColl {
        kind: CollKind::Broadcast,
        send: sendbuf,
        recv: recvbuf,
        count,
        dtype: datatype,
        op: None,
        root: Some(root),
    };
    // SAFETY: this function's contract.
    unsafe { coll_stream("braid_broadcast_stream", a, comm, stream) }
}

/// Stream form of braid_reduce (device buffers, enqueued on `stream`; see
/// braid_all_reduce_stream).
///
/// # Safety
/// As braid_all_reduce_stream, with braid_reduce's lengths.
#[no_mangle]
pub unsafe extern "C" fn braid_reduce_stream(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    op: RedopArg,
    root: c_int,
    comm: braid_comm_t,
    stream: *mut c_void,
) -> braid_status_t {
    let a = StreamColl {
        kind: CollKind::Reduce,
        send: sendbuf,
        recv: recvbuf,
        count,
        dtype: datatype,
        op: Some(op),
        root: Some(root),
    };
    // SAFETY: this function's contract.
    unsafe { coll_stream("braid_reduce_stream", a, comm, stream) }
}

/// Stream form of braid_all_to_all (device buffers, enqueued on `stream`; see
/// braid_all_reduce_stream).
///
/// # Safety
/// As braid_all_reduce_stream, with braid_all_to_all's lengths.
#[no_mangle]
pub unsafe extern "C" fn braid_all_to_all_stream(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    comm: braid_comm_t,
    stream: *mut c_void,
) -> braid_status_t {
    let a = StreamColl {
        kind: CollKind::AllToAll,
        send: sendbuf,
        recv: recvbuf,
        count,
        dtype: datatype,
        op: None,
        root: None,
    };
    // SAFETY: this function's contract.
    unsafe { coll_stream("braid_all_to_all_stream", a, comm, stream) }
}

/// Stream form of braid_gather (device buffers, enqueued on `stream`; see
/// braid_all_reduce_stream).
///
/// # Safety
/// As braid_all_reduce_stream, with braid_gather's lengths.
#[no_mangle]
pub unsafe extern "C" fn braid_gather_stream(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    sendcount: usize,
    datatype: DatatypeArg,
    root: c_int,
    comm: braid_comm_t,
    stream: *mut c_void,
) -> braid_status_t {
    let a = StreamColl {
        kind: CollKind::Gather,
        send: sendbuf,
        recv: recvbuf,
        count: sendcount,
        dtype: datatype,
        op: None,
        root: Some(root),
    };
    // SAFETY: this function's contract.
    unsafe { coll_stream("braid_gather_stream", a, comm, stream) }
}

/// Stream form of braid_scatter (device buffers, enqueued on `stream`; see
/// braid_all_reduce_stream).
///
/// # Safety
/// As braid_all_reduce_stream, with braid_scatter's lengths.
#[no_mangle]
pub unsafe extern "C" fn braid_scatter_stream(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    recvcount: usize,
    datatype: DatatypeArg,
    root: c_int,
    comm: braid_comm_t,
    stream: *mut c_void,
) -> braid_status_t {
    let a = StreamColl {
        kind: CollKind::Scatter,
        send: sendbuf,
        recv: recvbuf,
        count: recvcount,
        dtype: datatype,
        op: None,
        root: Some(root),
    };
    // SAFETY: this function's contract.
    unsafe { coll_stream("braid_scatter_stream", a, comm, stream) }
}

/// Stream form of braid_barrier: enqueued on `stream`; work enqueued on `stream` after it
/// starts once every rank's stream has reached its barrier.
///
/// # Safety
/// `comm` is NULL or live; `stream` is NULL or a live CUDA stream.
#[no_mangle]
pub unsafe extern "C" fn braid_barrier_stream(
    comm: braid_comm_t,
    stream: *mut c_void,
) -> braid_status_t {
    let a = StreamColl {
        kind: CollKind::Barrier,
        send: std::ptr::null(),
        recv: std::ptr::null_mut(),
        count: 0,
        dtype: DatatypeArg(0),
        op: None,
        root: None,
    };
    // SAFETY: this function's contract.
    unsafe { coll_stream("braid_barrier_stream", a, comm, stream) }
}

/// Body of braid_send_stream / braid_recv_stream.
///
/// # Safety
/// The public functions' contracts.
#[allow(clippy::too_many_arguments)]
unsafe fn p2p_stream(
    func: &'static str,
    send: bool,
    buf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    peer: c_int,
    tag: u64,
    comm: braid_comm_t,
    stream: *mut c_void,
) -> braid_status_t {
    boundary(func, || {
        let res = (|| {
            // SAFETY: caller contract.
            let c = unsafe { comm_ref(comm) }?;
            let dtype = dtype_of(datatype)?;
            let peer = rank_arg("peer", peer, c.comm.size())?;
            if count > 0 && buf.is_null() {
                return Err(Fail::arg("buf is NULL"));
            }
            device_only(func, &[("buf", buf.cast_const())])?;
            Ok((
                c,
                DeviceP2p {
                    send,
                    buf: buf as DevPtr,
                    count,
                    dtype,
                    peer,
                    tag,
                },
            ))
        })();
        if in_group() {
            // Recorded; braid_group_end enqueues the group (on this stream).
            return record_device_op(comm, res.map(|(_, op)| op), Stream(stream));
        }
        let (c, op) = res?;
        // SAFETY: this function's contract.
        unsafe { c.comm.p2p_device_raw(&[op], Stream(stream)) }?;
        Ok(())
    })
}

/// Stream form of braid_send: `buf` is CUDA device memory; enqueued on `stream`. Between
/// braid_group_start and braid_group_end it is recorded, and braid_group_end enqueues the
/// group's device sends and receives together on their stream (one stream per group; a group
/// holds host or device operations, not both).
///
/// # Safety
/// `buf` is device memory valid for `count` elements until the send completes on `stream`;
/// `comm` is NULL or live; `stream` is NULL or a live CUDA stream.
#[no_mangle]
pub unsafe extern "C" fn braid_send_stream(
    buf: *const c_void,
    count: usize,
    datatype: DatatypeArg,
    peer: c_int,
    tag: u64,
    comm: braid_comm_t,
    stream: *mut c_void,
) -> braid_status_t {
    // SAFETY: this function's contract.
    unsafe {
        p2p_stream(
            "braid_send_stream",
            true,
            buf.cast_mut(),
            count,
            datatype,
            peer,
            tag,
            comm,
            stream,
        )
    }
}

/// Stream form of braid_recv (see braid_send_stream).
///
/// # Safety
/// As braid_send_stream; `buf` does not overlap another buffer of its group.
#[no_mangle]
pub unsafe extern "C" fn braid_recv_stream(
    buf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    peer: c_int,
    tag: u64,
    comm: braid_comm_t,
    stream: *mut c_void,
) -> braid_status_t {
    // SAFETY: this function's contract.
    unsafe {
        p2p_stream(
            "braid_recv_stream",
            false,
            buf,
            count,
            datatype,
            peer,
            tag,
            comm,
            stream,
        )
    }
}

/// Stream form of braid_all_to_allv: device buffers, enqueued on `stream` (this rank's own
/// block as a device-to-device copy, the others as one group of sends and receives, as
/// ProcessGroupNCCL does). The four arrays are read during the call only.
///
/// # Safety
/// As braid_all_to_allv for the arrays; the buffers are device memory valid until the work
/// completes on `stream`; `comm` is NULL or live; `stream` is NULL or a live CUDA stream.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn braid_all_to_allv_stream(
    sendbuf: *const c_void,
    sendcounts: *const usize,
    sdispls: *const usize,
    recvbuf: *mut c_void,
    recvcounts: *const usize,
    rdispls: *const usize,
    datatype: DatatypeArg,
    comm: braid_comm_t,
    stream: *mut c_void,
) -> braid_status_t {
    boundary("braid_all_to_allv_stream", || {
        // SAFETY: caller contract.
        let c = unsafe { coll_start(comm, None) }?;
        let dtype = dtype_of(datatype)?;
        let (n, me) = (c.comm.size(), c.comm.rank());
        let arr = |p: *const usize, what: &str| -> CResult<&[usize]> {
            if p.is_null() {
                return Err(Fail::arg(format!("{what} is NULL")));
            }
            // SAFETY: non-NULL and valid for `n` reads (contract); size_t is usize.
            Ok(unsafe { std::slice::from_raw_parts(p, n) })
        };
        let (sc, sd, rc, rd) = (
            arr(sendcounts, "sendcounts")?,
            arr(sdispls, "sdispls")?,
            arr(recvcounts, "recvcounts")?,
            arr(rdispls, "rdispls")?,
        );
        device_only(
            "braid_all_to_allv_stream",
            &[("sendbuf", sendbuf), ("recvbuf", recvbuf.cast_const())],
        )?;
        let es = dtype.size() as u64;
        let off = |base: *const c_void, displ: usize| -> CResult<DevPtr> {
            (displ as u64)
                .checked_mul(es)
                .and_then(|b| (base as u64).checked_add(b))
                .ok_or_else(|| Fail::arg("displacement overflows"))
        };
        let mut ops = Vec::with_capacity(2 * n);
        for j in 0..n {
            if j == me {
                continue;
            }
            if sc[j] > 0 {
                ops.push(DeviceP2p {
                    send: true,
                    buf: off(sendbuf, sd[j])?,
                    count: sc[j],
                    dtype,
                    peer: j,
                    tag: u64::MAX - 1,
                });
            }
            if rc[j] > 0 {
                ops.push(DeviceP2p {
                    send: false,
                    buf: off(recvbuf.cast_const(), rd[j])?,
                    count: rc[j],
                    dtype,
                    peer: j,
                    tag: u64::MAX - 1,
                });
            }
        }
        if sc[me] != rc[me] {
            return Err(Fail::arg(format!(
                "sendcounts[{me}] = {} but recvcounts[{me}] = {}: this rank's own block must \
                 have one length",
                sc[me], rc[me]
            )));
        }
        let own = (sc[me] as u64)
            .checked_mul(es)
            .ok_or_else(|| Fail::arg("count overflows"))?;
        // SAFETY: this function's contract (device memory valid until the stream completes).
        unsafe {
            driver::copy_d2d_async(
                off(recvbuf.cast_const(), rd[me])?,
                off(sendbuf, sd[me])?,
                own as usize,
                Stream(stream),
            )
        }
        .map_err(Fail::from)?;
        if !ops.is_empty() {
            // SAFETY: this function's contract.
            unsafe { c.comm.p2p_device_raw(&ops, Stream(stream)) }?;
        }
        Ok(())
    })
}

/// Allocates `size` bytes of CUDA device memory on the calling rank's device
/// (`BRAID_CUDA_DEVICE`, else the local rank; like ncclMemAlloc) and writes its address to
/// `*ptr`. Free it with braid_mem_free_device.
///
/// Errors: braid_invalid_argument (NULL `ptr`); braid_system_error without a CUDA driver or
/// device, or when the device is out of memory (the driver's message).
///
/// # Safety
/// `ptr` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_mem_alloc_device(
    size: usize,
    ptr: *mut *mut c_void,
) -> braid_status_t {
    boundary("braid_mem_alloc_device", || {
        if ptr.is_null() {
            return Err(Fail::arg("ptr is NULL"));
        }
        let a = driver::DeviceAlloc::new(size, None).map_err(Fail::from)?;
        let p = a.into_raw();
        // SAFETY: caller contract (checked non-NULL above).
        unsafe { put(ptr, "ptr", p as *mut c_void) }
    })
}

/// Frees memory from braid_mem_alloc_device. NULL is a no-op.
///
/// # Safety
/// `ptr` is NULL or from braid_mem_alloc_device, not freed yet, and no work still uses it.
#[no_mangle]
pub unsafe extern "C" fn braid_mem_free_device(ptr: *mut c_void) -> braid_status_t {
    boundary("braid_mem_free_device", || {
        if ptr.is_null() {
            return Ok(());
        }
        let device = match pointer_kind(ptr) {
            PtrKind::Device(d) | PtrKind::Managed(d) => d,
            PtrKind::Host => {
                return Err(Fail::arg(
                    "ptr is not CUDA device memory (not from braid_mem_alloc_device)",
                ))
            }
        };
        driver::free_device(ptr as DevPtr, device).map_err(Fail::from)
    })
}

/// The first error of a device call of `comm` that failed after the call returned (on its
/// stream), as ncclCommGetAsyncError: writes braid_success, or the error's status (and makes
/// its message this thread's last error). Sticky.
///
/// # Safety
/// `comm` is NULL or live; `async_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_comm_get_async_error(
    comm: braid_comm_t,
    async_error: *mut braid_status_t,
) -> braid_status_t {
    boundary("braid_comm_get_async_error", || {
        // SAFETY: caller contract.
        let c = unsafe { comm_ref(comm) }?;
        match c.comm.device_error() {
            None => {
                // SAFETY: caller contract.
                unsafe { put(async_error, "async_error", braid_status_t::braid_success) }
            }
            Some(e) => {
                let f = Fail::from(e);
                // SAFETY: caller contract.
                unsafe { put(async_error, "async_error", f.status) }?;
                crate::error::set_last_error("braid_comm_get_async_error", &f.msg);
                Ok(())
            }
        }
    })
}

/// Whether CUDA device buffers can be used in this process: braid_success, and a one-line
/// description ("CUDA driver 13.0, device 0 of 1: NVIDIA H100 80GB HBM3; NCCL 2.27.3 (path)")
/// written to `info` (`len` bytes, NUL-terminated, truncated to fit; NULL/0: not written); or
/// braid_system_error with the reason as the last error ("no CUDA driver (libcuda.so.1 not
/// found)").
///
/// # Safety
/// `info` is NULL or valid for `len` bytes of writes.
#[no_mangle]
pub unsafe extern "C" fn braid_cuda_available(info: *mut c_char, len: usize) -> braid_status_t {
    boundary("braid_cuda_available", || {
        let i = cuda::available().map_err(Fail::from)?;
        let dev = i
            .devices
            .iter()
            .find(|d| d.ordinal == i.device)
            .map(|d| d.name.clone())
            .unwrap_or_default();
        let nccl = match &i.nccl {
            Ok(n) => format!("NCCL {} ({})", n.version_string(), n.path),
            Err(why) => format!("no NCCL: {why}"),
        };
        let text = format!(
            "CUDA driver {}, device {} of {}: {dev}; {nccl}",
            driver::version_string(i.driver_version),
            i.device,
            i.devices.len()
        );
        if !info.is_null() && len > 0 {
            let n = text.len().min(len - 1);
            // SAFETY: `info` is valid for `len` bytes (contract); n + 1 <= len.
            unsafe {
                std::ptr::copy_nonoverlapping(text.as_ptr(), info.cast::<u8>(), n);
                *info.add(n) = 0;
            }
        }
        Ok(())
    })
}
