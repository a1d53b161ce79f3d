//! [`HostCopy`]: a copy engine for tests on machines without a GPU. Its "device memory" is host
//! memory (a [`DevPtr`] is a host address), its internal queue and the user "streams" are
//! emulated in-order queues: one thread per queue running closures in order. A [`Stream`] is
//! then a token naming an emulated stream ([`HostCopy::stream`]); tests put their own work on
//! it ([`HostCopy::enqueue`]) to check the stream order of staged jobs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::Layout;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{CopyEngine, HostMemory, Mark, StreamHold};
use crate::cuda::{DevPtr, Stream};
use crate::error::{Error, Result};

type Task = Box<dyn FnOnce() + Send>;

/// How long an emulated wait (a stream point, a held stream) blocks at most, so that a broken
/// engine fails a test instead of hanging it.
const EMU_LIMIT: Duration = Duration::from_secs(60);

/// An emulated in-order queue.
struct EmuQueue {
    tx: Mutex<Option<mpsc::Sender<Task>>>,
    th: Mutex<Option<JoinHandle<()>>>,
}

impl EmuQueue {
    fn new(name: String) -> Arc<EmuQueue> {
        let (tx, rx) = mpsc::channel::<Task>();
        let th = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                while let Ok(t) = rx.recv() {
                    t();
                }
            })
            .unwrap();
        Arc::new(EmuQueue {
            tx: Mutex::new(Some(tx)),
            th: Mutex::new(Some(th)),
        })
    }

    fn push(&self, t: Task) -> Result<()> {
        let g = self.tx.lock().unwrap();
        match g.as_ref().map(|tx| tx.send(t)) {
            Some(Ok(())) => Ok(()),
            _ => Err(Error::System("emulated queue closed".into())),
        }
    }

    /// Runs what is queued, then ends the thread.
    fn close(&self) {
        self.tx.lock().unwrap().take();
        if let Some(h) = self.th.lock().unwrap().take() {
            let _ = h.join();
        }
    }
}

/// A one-shot flag.
#[derive(Default)]
pub(crate) struct Flag {
    set: Mutex<bool>,
    cv: Condvar,
}

impl Flag {
    pub(crate) fn set(&self) {
        *self.set.lock().unwrap() = true;
        self.cv.notify_all();
    }

    /// Waits until set or `deadline`; true when set.
    pub(crate) fn wait_until(&self, deadline: Instant) -> bool {
        let mut g = self.set.lock().unwrap();
        while !*g {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
        true
    }
}

/// Host memory standing in for device (or pinned) memory: 64-byte aligned, zeroed.
pub(crate) struct Mem {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory owned by the value; tests and queues synchronise their accesses (stream
// order), as with device memory.
unsafe impl Send for Mem {}
// SAFETY: as Send.
unsafe impl Sync for Mem {}

impl Mem {
    pub(crate) fn new(len: usize) -> Mem {
        let layout = Layout::from_size_align(len.max(1), 64).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Mem { ptr, len }
    }

    /// The "device address".
    pub(crate) fn addr(&self) -> DevPtr {
        self.ptr as DevPtr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Copies `src` in at byte `off` (no staged job may be using the memory).
    pub(crate) fn write(&self, off: usize, src: &[u8]) {
        assert!(off + src.len() <= self.len);
        // SAFETY: in bounds (checked); no concurrent access (the caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len()) };
    }

    /// A copy of the contents.
    pub(crate) fn read(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        // SAFETY: in bounds; no concurrent writer (the caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, v.as_mut_ptr(), self.len) };
        v
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len.max(1), 64).unwrap();
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// Copies `len` bytes between raw addresses (a queued copy).
///
/// # Safety
/// Both ranges valid and disjoint.
unsafe fn raw_copy(dst: usize, src: usize, len: usize) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) };
}

struct Pinned(Arc<Mem>);

impl HostMemory for Pinned {
    fn as_ptr(&self) -> *mut u8 {
        self.0.ptr
    }
    fn len(&self) -> usize {
        self.0.len
    }
}

/// The host copy engine.
pub(crate) struct HostCopy {
    internal: Arc<EmuQueue>,
    streams: Mutex<HashMap<usize, Arc<EmuQueue>>>,
    next: AtomicUsize,
    /// Pinned allocations stay alive as long as the engine (queued copies may still use them).
    allocs: Mutex<Vec<Arc<Mem>>>,
    /// Copy calls fail ("injected copy failure") once this many have been made.
    pub(crate) fail_after: AtomicUsize,
    copies: AtomicUsize,
    /// Each queued copy first sleeps this long (makes ordering bugs show).
    slow: Duration,
    /// Holds made and holds released, for the tests.
    pub(crate) holds: AtomicUsize,
    pub(crate) releases: Arc<AtomicUsize>,
}

impl HostCopy {
    pub(crate) fn new(slow: Duration) -> Arc<HostCopy> {
        Arc::new(HostCopy {
            internal: EmuQueue::new("emu-internal".into()),
            streams: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(1),
            allocs: Mutex::new(Vec::new()),
            fail_after: AtomicUsize::new(usize::MAX),
            copies: AtomicUsize::new(0),
            slow,
            holds: AtomicUsize::new(0),
            releases: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// A new emulated user stream.
    pub(crate) fn stream(&self) -> Stream {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        self.queue(Stream(id as *mut c_void));
        Stream(id as *mut c_void)
    }

    fn queue(&self, s: Stream) -> Arc<EmuQueue> {
        let id = s.as_raw() as usize;
        self.streams
            .lock()
            .unwrap()
            .entry(id)
            .or_insert_with(|| EmuQueue::new(format!("emu-stream-{id}")))
            .clone()
    }

    /// Enqueues user work on stream `s`.
    pub(crate) fn enqueue(&self, s: Stream, f: impl FnOnce() + Send + 'static) {
        self.queue(s).push(Box::new(f)).unwrap();
    }

    /// Waits until everything enqueued on `s` so far has run (false at the deadline).
    pub(crate) fn sync(&self, s: Stream, limit: Duration) -> bool {
        let f = Arc::new(Flag::default());
        let g = f.clone();
        self.enqueue(s, move || g.set());
        f.wait_until(Instant::now() + limit)
    }

    fn count_copy(&self) -> Result<()> {
        if self.copies.fetch_add(1, Ordering::SeqCst) >= self.fail_after.load(Ordering::SeqCst) {
            return Err(Error::System("injected copy failure".into()));
        }
        Ok(())
    }

    fn push_copy(&self, dst: usize, src: usize, len: usize) -> Result<()> {
        self.count_copy()?;
        let slow = self.slow;
        self.internal.push(Box::new(move || {
            if !slow.is_zero() {
                std::thread::sleep(slow);
            }
            // SAFETY: the CopyEngine contract: both ranges valid until a later mark is reached
            // (pinned memory lives as long as the engine); device and pinned ranges never
            // overlap.
            unsafe { raw_copy(dst, src, len) };
        }))
    }
}

impl Drop for HostCopy {
    fn drop(&mut self) {
        self.internal.close();
        for q in self.streams.lock().unwrap().values() {
            q.close();
        }
    }
}

struct HostMark(Arc<Flag>);

impl Mark for HostMark {
    fn wait(&self, deadline: Instant, abort: &dyn Fn() -> bool) -> Result<()> {
        let start = Instant::now();
        loop {
            let now = Instant::now();
            if self
                .0
                .wait_until(deadline.min(now + Duration::from_millis(5)))
            {
                return Ok(());
            }
            if abort() {
                return Err(Error::Aborted);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "emulated device copies".into(),
                    secs: start.elapsed().as_secs_f64(),
                });
            }
        }
    }
}

struct HostHold {
    point: Arc<Flag>,
    gate: Arc<Flag>,
    internal: Arc<EmuQueue>,
    released: Arc<AtomicUsize>,
    done: std::sync::atomic::AtomicBool,
}

impl StreamHold for HostHold {
    fn wait_point(&self) -> Result<()> {
        let p = self.point.clone();
        self.internal.push(Box::new(move || {
            p.wait_until(Instant::now() + EMU_LIMIT);
        }))
    }

    fn release(&self) {
        if !self.done.swap(true, Ordering::SeqCst) {
            self.released.fetch_add(1, Ordering::SeqCst);
        }
        self.gate.set();
    }
}

impl Drop for HostHold {
    fn drop(&mut self) {
        self.release();
    }
}

impl CopyEngine for HostCopy {
    fn alloc_host(&self, len: usize) -> Result<Box<dyn HostMemory>> {
        let m = Arc::new(Mem::new(len));
        self.allocs.lock().unwrap().push(m.clone());
        Ok(Box::new(Pinned(m)))
    }

    fn hold(&self, stream: Stream) -> Result<Box<dyn StreamHold>> {
        let q = self.queue(stream);
        let (point, gate) = (Arc::new(Flag::default()), Arc::new(Flag::default()));
        let p = point.clone();
        q.push(Box::new(move || p.set()))?;
        let g = gate.clone();
        q.push(Box::new(move || {
            g.wait_until(Instant::now() + EMU_LIMIT);
        }))?;
        self.holds.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(HostHold {
            point,
            gate,
            internal: self.internal.clone(),
            released: self.releases.clone(),
            done: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    unsafe fn copy_d2h(&self, dst: *mut u8, src: DevPtr, len: usize) -> Result<()> {
        self.push_copy(dst as usize, src as usize, len)
    }

    unsafe fn copy_h2d(&self, dst: DevPtr, src: *const u8, len: usize) -> Result<()> {
        self.push_copy(dst as usize, src as usize, len)
    }

    fn mark(&self) -> Result<Box<dyn Mark>> {
        let f = Arc::new(Flag::default());
        let g = f.clone();
        self.internal.push(Box::new(move || g.set()))?;
        Ok(Box::new(HostMark(f)))
    }
}
