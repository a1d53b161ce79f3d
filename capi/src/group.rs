//! Point-to-point (braid_send, braid_recv) and groups (braid_group_start, braid_group_end,
//! braid_igroup_end), with this thread's open group. The non-blocking braid_isend and
//! braid_irecv are in `nonblocking.rs`; they share [`p2p`].

use std::cell::RefCell;
use std::ffi::{c_int, c_void};

use braid_core::cuda::{DeviceP2p, Stream};
use braid_core::RawP2p;

use crate::args::{comm_ref, dtype_of, rank_arg, DatatypeArg};
use crate::comm::{braid_comm, braid_comm_t};
use crate::error::{boundary, braid_status_t, CResult, Fail};
use crate::request::{braid_request, braid_request_t, reset_request, store_request};

// ---- point-to-point and groups -------------------------------------------------------------

thread_local! {
    /// This thread's open group (braid_group_start .. braid_group_end).
    static GROUP: RefCell<GroupState> = RefCell::new(GroupState::default());
}

pub(crate) fn in_group() -> bool {
    GROUP.try_with(|g| g.borrow().depth > 0).unwrap_or(false)
}

/// This thread's open group: the sends and receives issued since braid_group_start.
#[derive(Default)]
struct GroupState {
    depth: u32,
    comm: Option<*const braid_comm>,
    ops: Vec<RawP2p>,
    /// Device operations (braid_send_stream / braid_recv_stream) and their stream.
    dev_ops: Vec<DeviceP2p>,
    stream: Option<Stream>,
    failed: Option<Fail>,
}

impl GroupState {
    /// Records the first failure of a call inside the group.
    fn fail(&mut self, f: &Fail) {
        if self.failed.is_none() {
            self.failed = Some(f.clone());
        }
    }

    /// Checks that `comm` is the group's communicator (setting it on the first call).
    fn same_comm(&mut self, this: *const braid_comm) -> CResult {
        match self.comm {
            Some(p) if p != this => Err(Fail::usage(
                "a group may hold operations of one communicator only",
            )),
            _ => {
                self.comm = Some(this);
                Ok(())
            }
        }
    }
}

/// Records a device send/recv (`_stream` form) in this thread's open group; `op` is the
/// checked operation or the failure of its checks (then the group will not run).
pub(crate) fn record_device_op(
    comm: braid_comm_t,
    op: CResult<DeviceP2p>,
    stream: Stream,
) -> CResult {
    GROUP
        .try_with(|g| {
            let mut g = g.borrow_mut();
            let res = op.and_then(|op| {
                g.same_comm(comm.cast_const())?;
                if !g.ops.is_empty() {
                    return Err(Fail::usage(
                        "a group holds host operations (braid_send/braid_recv) or device \
                         operations (braid_send_stream/braid_recv_stream), not both",
                    ));
                }
                match g.stream {
                    Some(s) if s != stream => Err(Fail::usage(
                        "the device operations of a group must use one stream",
                    )),
                    _ => {
                        g.stream = Some(stream);
                        g.dev_ops.push(op);
                        Ok(())
                    }
                }
            });
            if let Err(f) = &res {
                g.fail(f);
            }
            res
        })
        .unwrap_or_else(|_| Err(Fail::usage("thread is exiting")))
}

pub(crate) struct P2pArgs {
    pub(crate) send: bool,
    pub(crate) buf: *mut c_void,
    pub(crate) count: usize,
    pub(crate) dtype: DatatypeArg,
    pub(crate) peer: c_int,
    pub(crate) tag: u64,
}

/// Body of braid_send/recv/isend/irecv.
///
/// # Safety
/// The buffer and handle contracts of the public function that calls it.
pub(crate) unsafe fn p2p(
    func: &'static str,
    a: P2pArgs,
    comm: braid_comm_t,
    req: Option<*mut braid_request_t>,
) -> braid_status_t {
    boundary(func, || {
        if let Some(r) = req {
            // SAFETY: `req` is NULL or a valid out-pointer (caller contract).
            unsafe { reset_request(r) }?;
        }
        let grouped = in_group();
        let res = (|| {
            // SAFETY: caller contract (a live communicator or NULL).
            let c = unsafe { comm_ref(comm) }?;
            let dtype = dtype_of(a.dtype)?;
            let peer = rank_arg("peer", a.peer, c.comm.size())?;
            if a.count > 0 && a.buf.is_null() {
                return Err(Fail::arg("buf is NULL"));
            }
            crate::stream::host_only(func, &[("buf", a.buf.cast_const())])?;
            let op = RawP2p {
                send: a.send,
                buf: a.buf.cast(),
                count: a.count,
                dtype,
                peer,
                tag: a.tag,
            };
            if grouped {
                if req.is_some() {
                    return Err(Fail::usage(
                        "braid_isend/braid_irecv cannot be issued inside a group; use \
                         braid_send/braid_recv there (braid_group_end runs them)",
                    ));
                }
                return GROUP
                    .try_with(|g| {
                        let mut g = g.borrow_mut();
                        g.same_comm(comm.cast_const())?;
                        if !g.dev_ops.is_empty() {
                            return Err(Fail::usage(
                                "a group holds host operations (braid_send/braid_recv) or \
                                 device operations (braid_send_stream/braid_recv_stream), not \
                                 both",
                            ));
                        }
                        g.ops.push(op);
                        Ok(())
                    })
                    .unwrap_or_else(|_| Err(Fail::usage("thread is exiting")));
            }
            match req {
                None => {
                    // SAFETY: the caller guarantees `buf` is valid for `count` elements for
                    // the duration of the call.
                    unsafe { c.comm.p2p_raw(&[op]) }?;
                }
                Some(r) => {
                    // SAFETY: as above, until the request completes (documented).
                    let h = unsafe { c.comm.ip2p_raw(&[op]) }?;
                    // SAFETY: `r` was checked non-NULL by reset_request above.
                    unsafe { store_request(r, h) };
                }
            }
            Ok(())
        })();
        if grouped {
            if let Err(f) = &res {
                // The group will not run: braid_group_end reports the first failure.
                let _ = GROUP.try_with(|g| g.borrow_mut().fail(f));
            }
        }
        res
    })
}

// ---- exported functions: point-to-point and groups -----------------------------------------

/// Sends `count` elements of `buf` to rank `peer` with `tag` (the receive must name this rank,
/// or any rank, and the same tag, count and datatype). A receive takes the first message from
/// its source with its tag, whatever was sent before it with other tags (as MPI and Gloo
/// match; such earlier messages are held for their receives, up to BRAID_P2P_HOLD_BYTES);
/// messages with the same tag match in order. Between braid_group_start and braid_group_end the
/// send is only recorded (`buf` must stay valid until braid_group_end returns) and runs there
/// with the group's other sends and receives; otherwise it blocks until done.
///
/// # Safety
/// `buf` valid for `count` elements (NULL allowed when count is 0) until the send completes;
/// `comm` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn braid_send(
    buf: *const c_void,
    count: usize,
    datatype: DatatypeArg,
    peer: c_int,
    tag: u64,
    comm: braid_comm_t,
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
    unsafe { p2p("braid_send", a, comm, None) }
}

/// Receives `count` elements into `buf` from rank `peer` with `tag`. Grouping as braid_send.
///
/// # Safety
/// `buf` valid for `count` elements, not overlapping any other buffer of its group, until the
/// receive completes; `comm` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn braid_recv(
    buf: *mut c_void,
    count: usize,
    datatype: DatatypeArg,
    peer: c_int,
    tag: u64,
    comm: braid_comm_t,
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
    unsafe { p2p("braid_recv", a, comm, None) }
}

/// Opens a group on this thread: braid_send/braid_recv calls until the matching
/// braid_group_end are recorded, not run, and braid_group_end runs them all at once (so a ring
/// exchange cannot deadlock). Groups nest; only the outermost braid_group_end runs the group.
/// A group holds operations of one communicator; collectives and braid_isend/braid_irecv are
/// refused inside a group (braid_invalid_usage). The group is per thread (thread-local state).
#[no_mangle]
pub extern "C" fn braid_group_start() -> braid_status_t {
    boundary("braid_group_start", || {
        GROUP
            .try_with(|g| {
                let mut g = g.borrow_mut();
                g.depth = g.depth.saturating_add(1);
            })
            .map_err(|_| Fail::usage("thread is exiting"))
    })
}

/// Closes a group opened by braid_group_start; the outermost one runs the recorded operations
/// (blocking until all complete) and returns their status. If a call inside the group failed
/// (bad argument, a second communicator), nothing runs and that call's status is returned
/// again. braid_invalid_usage without an open group.
#[no_mangle]
pub extern "C" fn braid_group_end() -> braid_status_t {
    boundary("braid_group_end", || {
        let taken = GROUP
            .try_with(|g| {
                let mut g = g.borrow_mut();
                if g.depth == 0 {
                    return Err(Fail::usage("braid_group_end without braid_group_start"));
                }
                g.depth -= 1;
                if g.depth > 0 {
                    return Ok(None);
                }
                Ok(Some(std::mem::take(&mut *g)))
            })
            .map_err(|_| Fail::usage("thread is exiting"))??;
        let Some(g) = taken else { return Ok(()) };
        if let Some(f) = g.failed {
            return Err(Fail {
                status: f.status,
                msg: format!("group not run: a call in it failed: {}", f.msg),
            });
        }
        let Some(comm) = g.comm else { return Ok(()) };
        // SAFETY: the pointer was a live communicator when the operations were recorded; using
        // it after braid_comm_destroy is undefined behaviour per the documented contract.
        let c = unsafe { comm_ref(comm.cast_mut()) }?;
        if !g.dev_ops.is_empty() {
            // SAFETY: device buffers stay valid until the work completes on the stream
            // (documented on braid_send_stream/braid_recv_stream).
            unsafe {
                c.comm
                    .p2p_device_raw(&g.dev_ops, g.stream.unwrap_or_default())
            }?;
            return Ok(());
        }
        // SAFETY: the buffers of recorded operations stay valid until braid_group_end returns
        // (documented on braid_send/braid_recv).
        unsafe { c.comm.p2p_raw(&g.ops) }?;
        Ok(())
    })
}

/// Non-blocking braid_group_end: closes the outermost group opened by braid_group_start and
/// STARTS its recorded sends and receives (all posted together, as braid_group_end runs them,
/// so a ring exchange cannot deadlock) on the communicator's progress thread, writing to
/// `*req` one request that completes when all of them have completed (braid_test,
/// braid_wait, braid_wait_for; free it with braid_request_free). The buffers of the recorded
/// operations must stay valid and untouched until the request has completed (not only until
/// this call returns). An empty group gives a request that is already complete. Operations
/// run in issue order with the communicator's other non-blocking operations.
///
/// Errors (`*req` is NULL after any of them): braid_invalid_argument for a NULL `req` (the
/// group stays open); braid_invalid_usage without an open group, or when the group to close is
/// nested (braid_igroup_end only closes the outermost group: close inner ones with
/// braid_group_end; the group stays open); if a call inside the group failed (bad argument, a
/// second communicator), nothing runs, the group is closed and that call's status is returned
/// again, as braid_group_end does.
///
/// # Safety
/// `req` is NULL or valid for a write; the recorded operations' communicator is live and their
/// buffers stay valid until the request completes.
#[no_mangle]
pub unsafe extern "C" fn braid_igroup_end(req: *mut braid_request_t) -> braid_status_t {
    boundary("braid_igroup_end", || {
        // SAFETY: `req` is NULL or a valid out-pointer (caller contract).
        unsafe { reset_request(req) }?;
        let taken = GROUP
            .try_with(|g| {
                let mut g = g.borrow_mut();
                match g.depth {
                    0 => Err(Fail::usage("braid_igroup_end without braid_group_start")),
                    1 => Ok(std::mem::take(&mut *g)),
                    d => Err(Fail::usage(format!(
                        "braid_igroup_end closes the outermost group only, and {d} groups are \
                         open: close the inner ones with braid_group_end"
                    ))),
                }
            })
            .map_err(|_| Fail::usage("thread is exiting"))??;
        if let Some(f) = taken.failed {
            return Err(Fail {
                status: f.status,
                msg: format!("group not run: a call in it failed: {}", f.msg),
            });
        }
        if !taken.dev_ops.is_empty() {
            return Err(Fail::usage(
                "a group of device operations completes on its stream: close it with \
                 braid_group_end (nothing was run)",
            ));
        }
        let h = match taken.comm {
            Some(comm) if !taken.ops.is_empty() => {
                // SAFETY: the pointer was a live communicator when the operations were
                // recorded; using it after braid_comm_destroy is undefined behaviour per the
                // documented contract.
                let c = unsafe { comm_ref(comm.cast_mut()) }?;
                // SAFETY: the buffers of the recorded operations stay valid until the request
                // completes (this function's contract).
                Some(unsafe { c.comm.ip2p_raw(&taken.ops) }?)
            }
            _ => None,
        };
        let r = Box::into_raw(Box::new(braid_request {
            result: if h.is_none() { Some(Ok(())) } else { None },
            handle: h,
            source: None,
        }));
        // SAFETY: `req` was checked non-NULL by reset_request above.
        unsafe { req.write(r) };
        Ok(())
    })
}
