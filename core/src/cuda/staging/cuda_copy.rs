//! [`CudaCopy`]: the staging engine's copy engine on the CUDA driver API.
//!
//! - internal queue: a stream created with `CU_STREAM_NON_BLOCKING` (so it never synchronises
//!   implicitly with the legacy default stream, which may be a held user stream);
//! - copies: `cuMemcpyDtoHAsync` / `cuMemcpyHtoDAsync` between device memory and pinned host
//!   memory (`cuMemHostAlloc`, [`PinnedAlloc`]);
//! - marks: events (`CU_EVENT_DISABLE_TIMING`) recorded on the internal stream and polled with
//!   `cuEventQuery` (never `cuEventSynchronize`, which has no deadline);
//! - holds: an event recorded on the user's stream (its point: `cuStreamWaitEvent` makes the
//!   internal stream wait for it), then `cuLaunchHostFunc` of a host function that blocks on a
//!   condition variable until the worker releases it. The host function calls no CUDA function
//!   (the driver forbids it there).
//!
//! Every function goes through [`driver()`] first, so without a driver (or without a GPU) each
//! returns the driver's error ("no CUDA driver (libcuda.so.1 not found)").

use std::ffi::c_void;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::sys::{self, CUresult};

use super::{CopyEngine, HostMemory, Mark, StreamHold};
use crate::cuda::driver::{check, driver, PinnedAlloc};
use crate::cuda::{DevPtr, Stream};
use crate::error::{Error, Result};

/// The internal stream of one [`CudaCopy`].
struct Internal {
    device: i32,
    /// `CUstream`, kept as an address (the handle is an opaque token usable from any thread).
    stream: usize,
}

impl Internal {
    fn stream(&self) -> sys::CUstream {
        self.stream as sys::CUstream
    }

    /// Makes the engine's device current on the calling thread.
    fn bind(&self) -> Result<()> {
        driver()?.bind(self.device)
    }
}

impl Drop for Internal {
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        // SAFETY: the stream was created by CudaCopy::new and is not used after this; work
        // still queued on it completes before the driver frees it (cuStreamDestroy's rule).
        let r = unsafe { sys::cuStreamDestroy_v2(self.stream()) };
        if let Err(e) = check(r, "cuStreamDestroy") {
            tracing::warn!(target: "braid::cuda", "{e}");
        }
    }
}

/// The CUDA copy engine of a staging engine (one per communicator, on the rank's device).
pub struct CudaCopy {
    internal: Arc<Internal>,
}

impl CudaCopy {
    /// An engine on device `device` (its primary context), with its own internal stream.
    ///
    /// Errors: no driver, no such device, the driver's error.
    pub fn new(device: i32) -> Result<CudaCopy> {
        driver()?.bind(device)?;
        let mut s: sys::CUstream = std::ptr::null_mut();
        let flags = sys::CUstream_flags_enum::CU_STREAM_NON_BLOCKING as u32;
        // SAFETY: symbol checked by the driver probe; the context is current.
        let r = unsafe { sys::cuStreamCreate(&mut s, flags) };
        check(r, "cuStreamCreate")?;
        Ok(CudaCopy {
            internal: Arc::new(Internal {
                device,
                stream: s as usize,
            }),
        })
    }
}

/// A pinned allocation as [`HostMemory`].
struct Pinned(PinnedAlloc);

impl HostMemory for Pinned {
    fn as_ptr(&self) -> *mut u8 {
        self.0.as_ptr()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// An event, destroyed on drop.
struct Event(usize);

impl Event {
    /// A new event without timing, in the calling thread's current context.
    fn new() -> Result<Event> {
        let mut e: sys::CUevent = std::ptr::null_mut();
        let flags = sys::CUevent_flags_enum::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: symbol checked by the driver probe; a context is current (callers bind).
        let r = unsafe { sys::cuEventCreate(&mut e, flags) };
        check(r, "cuEventCreate")?;
        Ok(Event(e as usize))
    }

    fn raw(&self) -> sys::CUevent {
        self.0 as sys::CUevent
    }

    fn record(&self, stream: sys::CUstream) -> Result<()> {
        // SAFETY: a live event; `stream` is a live stream (the internal one, or the user's,
        // which the caller of the device API guarantees).
        check(
            unsafe { sys::cuEventRecord(self.raw(), stream) },
            "cuEventRecord",
        )
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the event is not used after this; pending work that records or waits for it
        // keeps its resources until it completes (cuEventDestroy's rule).
        let r = unsafe { sys::cuEventDestroy_v2(self.raw()) };
        if let Err(e) = check(r, "cuEventDestroy") {
            tracing::warn!(target: "braid::cuda", "{e}");
        }
    }
}

/// A mark: an event recorded on the internal stream.
struct CudaMark {
    event: Event,
    internal: Arc<Internal>,
}

impl Mark for CudaMark {
    fn wait(&self, deadline: Instant, abort: &dyn Fn() -> bool) -> Result<()> {
        self.internal.bind()?;
        let start = Instant::now();
        let mut nap = Duration::from_micros(2);
        loop {
            // SAFETY: a live event of this engine.
            let r = unsafe { sys::cuEventQuery(self.event.raw()) };
            if r == CUresult::CUDA_SUCCESS {
                return Ok(());
            }
            if r != CUresult::CUDA_ERROR_NOT_READY {
                return check(r, "cuEventQuery");
            }
            if abort() {
                return Err(Error::Aborted);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: "staging: device copies (or the work enqueued before the call on its stream)".into(),
                    secs: now.duration_since(start).as_secs_f64(),
                });
            }
            // Short naps first (a copy of a chunk takes microseconds), then up to 200 µs.
            if nap < Duration::from_micros(50) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(nap.min(deadline - now));
            }
            nap = (nap * 2).min(Duration::from_micros(200));
        }
    }
}

/// What the host function on a held user stream waits for.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn open(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }
}

/// The host function enqueued on a held user stream (runs on a driver thread; calls no CUDA
/// function). It blocks until the gate opens.
///
/// No deadline here, by design: releasing early would let the user's stream run on while the
/// staged job may still write its buffers. Release is guaranteed instead: the gate opens when
/// the job ends (the worker's every wait has a deadline and watches the abort flag), when it is
/// discarded (sticky error, drop of the stager after its grace period), or when a worker panic
/// unwinds through it: the hold's `Drop` opens it.
///
/// Caveat (CUDA's documentation of cuLaunchHostFunc): a host function "must not perform any
/// synchronization that may depend on outstanding CUDA work not mandated to run earlier", and
/// host functions of independent streams "may be serialized". This one waits for the staging
/// worker, whose copies run on the internal stream. A job's point precedes its own hold, and
/// one engine runs its jobs in FIFO order, so the holds of one engine cannot block each other.
/// But when a job's point depends on another host function (the application's own, or the hold
/// of another communicator's staging engine) that the driver serialises behind a blocked hold,
/// the two wait for each other until the job's deadline fails it. The way out is a stream
/// memory operation (`cuStreamWaitValue32` on a flag in mapped pinned memory that the worker
/// writes) instead of a blocking host function.
unsafe extern "C" fn hold_host_fn(user: *mut c_void) {
    // SAFETY: `user` is the reference Arc::into_raw made in `hold`, handed to this function
    // exactly once (cuLaunchHostFunc succeeded); it is taken back here and dropped at the end.
    let gate = unsafe { Arc::from_raw(user as *const Gate) };
    let mut open = gate.open.lock().unwrap_or_else(|p| p.into_inner());
    while !*open {
        open = gate.cv.wait(open).unwrap_or_else(|p| p.into_inner());
    }
}

struct CudaHold {
    /// The user stream's point (recorded before the host function).
    point: Event,
    gate: Arc<Gate>,
    internal: Arc<Internal>,
}

impl StreamHold for CudaHold {
    fn wait_point(&self) -> Result<()> {
        self.internal.bind()?;
        // SAFETY: live internal stream and event; waiting on an event of another context is
        // allowed.
        check(
            unsafe { sys::cuStreamWaitEvent(self.internal.stream(), self.point.raw(), 0) },
            "cuStreamWaitEvent",
        )
    }

    fn release(&self) {
        self.gate.open();
    }
}

impl Drop for CudaHold {
    fn drop(&mut self) {
        self.gate.open();
    }
}

impl CopyEngine for CudaCopy {
    fn alloc_host(&self, len: usize) -> Result<Box<dyn HostMemory>> {
        self.internal.bind()?;
        Ok(Box::new(Pinned(PinnedAlloc::new(len)?)))
    }

    fn hold(&self, stream: Stream) -> Result<Box<dyn StreamHold>> {
        // The application's thread: keep its current context (the stream's) if it has one.
        driver()?.ensure_context()?;
        let point = Event::new()?;
        point.record(stream.as_raw().cast())?;
        let gate = Arc::new(Gate::default());
        let user = Arc::into_raw(gate.clone()) as *mut c_void;
        // SAFETY: `user` is a counted reference to the gate, which hold_host_fn takes back;
        // the stream is the caller's live stream.
        let r = unsafe { sys::cuLaunchHostFunc(stream.as_raw().cast(), Some(hold_host_fn), user) };
        if let Err(e) = check(r, "cuLaunchHostFunc") {
            // SAFETY: the launch failed, so the host function never runs: the reference made
            // above is still ours to drop.
            drop(unsafe { Arc::from_raw(user as *const Gate) });
            return Err(e);
        }
        Ok(Box::new(CudaHold {
            point,
            gate,
            internal: self.internal.clone(),
        }))
    }

    unsafe fn copy_d2h(&self, dst: *mut u8, src: DevPtr, len: usize) -> Result<()> {
        self.internal.bind()?;
        // SAFETY: the caller guarantees both ranges until a later mark is reached.
        check(
            unsafe { sys::cuMemcpyDtoHAsync_v2(dst.cast(), src, len, self.internal.stream()) },
            "cuMemcpyDtoHAsync",
        )
    }

    unsafe fn copy_h2d(&self, dst: DevPtr, src: *const u8, len: usize) -> Result<()> {
        self.internal.bind()?;
        // SAFETY: as copy_d2h.
        check(
            unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src.cast(), len, self.internal.stream()) },
            "cuMemcpyHtoDAsync",
        )
    }

    fn mark(&self) -> Result<Box<dyn Mark>> {
        self.internal.bind()?;
        let event = Event::new()?;
        event.record(self.internal.stream())?;
        Ok(Box::new(CudaMark {
            event,
            internal: self.internal.clone(),
        }))
    }
}
