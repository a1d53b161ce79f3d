//! The CUDA driver, loaded at first use: probe, initialisation, the rank's device, pointer
//! kinds, device and pinned allocations.
//!
//! cudarc loads libcuda lazily and panics when it (or a symbol) is missing, so [`driver`] first
//! opens the library itself and checks every symbol braid calls; only then does any cudarc
//! function run. After that probe succeeded, cudarc's loader finds the same library (it tries
//! `libcuda.so` and `libcuda.so.1`, as the probe does).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Mutex, OnceLock};

use cudarc::driver::sys::{self, CUresult};

use super::{DevPtr, DeviceInfo};
use crate::config;
use crate::error::{Error, Result};

/// Names the probe tries, in order (the driver package installs `libcuda.so.1`; `libcuda.so`
/// only comes with development packages).
const LIBCUDA: [&str; 2] = ["libcuda.so.1", "libcuda.so"];

/// Every driver symbol braid calls (cudarc would panic at the first call of a missing one).
const SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetPCIBusId",
    "cuDevicePrimaryCtxRetain",
    "cuCtxSetCurrent",
    "cuCtxGetCurrent",
    "cuCtxSynchronize",
    "cuPointerGetAttribute",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuMemcpyHtoD_v2",
    "cuMemcpyDtoH_v2",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamWaitEvent",
    "cuLaunchHostFunc",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventSynchronize",
    "cuEventDestroy_v2",
];

/// The loaded, initialised driver.
pub struct Driver {
    version: i32,
    count: i32,
    /// Retained primary contexts per device ordinal (kept for the life of the process, as the
    /// CUDA runtime keeps them).
    contexts: Mutex<HashMap<i32, usize>>,
}

static DRIVER: OnceLock<std::result::Result<Driver, String>> = OnceLock::new();

/// The driver, loaded and initialised at the first call; an error says why it cannot be used
/// ("no CUDA driver (libcuda.so.1 not found)", "no CUDA device", the driver's message). The
/// outcome is cached: later calls are cheap.
pub fn driver() -> Result<&'static Driver> {
    match DRIVER.get_or_init(load) {
        Ok(d) => Ok(d),
        Err(why) => Err(Error::System(why.clone())),
    }
}

/// True when this process already has libcuda loaded (the application, or braid, uses CUDA).
/// Without it no pointer of this process can be device memory, and no driver is loaded to ask.
/// Cheap enough for every host call: a "no" is remembered for 100 ms (a process that loads
/// CUDA later is seen within that), a "yes" for good.
pub fn loaded_in_process() -> bool {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    static YES: AtomicBool = AtomicBool::new(false);
    static NEXT_CHECK_MS: AtomicU64 = AtomicU64::new(0);
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    if YES.load(Ordering::Relaxed) {
        return true;
    }
    let now_ms = EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64;
    if now_ms < NEXT_CHECK_MS.load(Ordering::Relaxed) {
        return false;
    }
    let yes = DRIVER.get().is_some_and(|d| d.is_ok())
        || LIBCUDA.iter().any(|name| {
            let Ok(c) = std::ffi::CString::new(*name) else {
                return false;
            };
            // SAFETY: RTLD_NOLOAD only looks the library up (it loads nothing and runs no
            // initialisers); the handle returned adds a reference that dlclose drops again.
            let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
            if h.is_null() {
                return false;
            }
            // SAFETY: `h` came from dlopen above.
            unsafe { libc::dlclose(h) };
            true
        });
    if yes {
        YES.store(true, Ordering::Relaxed);
    } else {
        NEXT_CHECK_MS.store(now_ms + 100, Ordering::Relaxed);
    }
    yes
}

fn load() -> std::result::Result<Driver, String> {
    let mut lib = None;
    for name in LIBCUDA {
        // SAFETY: loading libcuda runs its initialisers, which only set up the driver's state.
        if let Ok(l) = unsafe { libloading::Library::new(name) } {
            lib = Some((name, l));
            break;
        }
    }
    let Some((name, lib)) = lib else {
        return Err("no CUDA driver (libcuda.so.1 not found)".into());
    };
    for sym in SYMBOLS {
        // SAFETY: only the symbol's presence is checked; it is not called through this type.
        if unsafe { lib.get::<*const c_void>(sym.as_bytes()) }.is_err() {
            return Err(format!(
                "the CUDA driver {name} lacks {sym} (driver too old: braid needs CUDA 12 or newer)"
            ));
        }
    }
    // cudarc opens the library again by its own candidate names; check it finds it, so that
    // no later call can panic.
    // SAFETY: a load attempt, as above.
    if !unsafe { sys::is_culib_present() } {
        return Err(format!(
            "the CUDA driver was found as {name}, but not under the names cudarc loads (libcuda.so, libcuda.so.1)"
        ));
    }
    // The library stays loaded: cudarc holds its own handle for the life of the process.
    drop(lib);
    // SAFETY: every symbol used below was checked above.
    unsafe {
        check(sys::cuInit(0), "cuInit").map_err(|e| e.to_string())?;
        let mut version: c_int = 0;
        check(sys::cuDriverGetVersion(&mut version), "cuDriverGetVersion")
            .map_err(|e| e.to_string())?;
        let mut count: c_int = 0;
        check(sys::cuDeviceGetCount(&mut count), "cuDeviceGetCount").map_err(|e| e.to_string())?;
        if count <= 0 {
            return Err(format!(
                "no CUDA device (driver {} loaded)",
                version_string(version)
            ));
        }
        tracing::info!(target: "braid::cuda", "CUDA driver {} ({name}), {count} device(s)", version_string(version));
        Ok(Driver {
            version,
            count,
            contexts: Mutex::new(HashMap::new()),
        })
    }
}

/// "13.0" for 13000.
pub fn version_string(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// Turns a driver result into a braid error naming the call: "cuMemAlloc_v2:
/// CUDA_ERROR_OUT_OF_MEMORY (out of memory)".
pub fn check(r: CUresult, what: &str) -> Result<()> {
    if r == CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    Err(Error::System(format!("{what}: {}", describe(r))))
}

/// The driver's name and text of a result code.
pub fn describe(r: CUresult) -> String {
    let mut name: *const c_char = std::ptr::null();
    let mut text: *const c_char = std::ptr::null();
    // SAFETY: only called after the probe found these symbols; the driver returns pointers to
    // static strings (or leaves them NULL for unknown codes).
    let (n, t) = unsafe {
        (
            sys::cuGetErrorName(r, &mut name),
            sys::cuGetErrorString(r, &mut text),
        )
    };
    let s = |ok: CUresult, p: *const c_char| {
        if ok == CUresult::CUDA_SUCCESS && !p.is_null() {
            // SAFETY: non-NULL pointers from the driver point to NUL-terminated static text.
            Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        } else {
            None
        }
    };
    match (s(n, name), s(t, text)) {
        (Some(n), Some(t)) => format!("{n} ({t})"),
        (Some(n), None) => n,
        _ => format!("CUresult {}", r as i32),
    }
}

impl Driver {
    /// `cuDriverGetVersion` (13000 for CUDA 13.0).
    pub fn version(&self) -> i32 {
        self.version
    }

    /// Number of devices.
    pub fn device_count(&self) -> i32 {
        self.count
    }

    /// The devices of this machine.
    pub fn devices(&self) -> Result<Vec<DeviceInfo>> {
        let mut out = Vec::new();
        for ordinal in 0..self.count {
            // SAFETY: symbols checked by the probe; buffers are sized as passed.
            unsafe {
                let mut dev = 0;
                check(sys::cuDeviceGet(&mut dev, ordinal), "cuDeviceGet")?;
                let mut name = [0 as c_char; 256];
                check(
                    sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as c_int, dev),
                    "cuDeviceGetName",
                )?;
                let mut mem = 0usize;
                check(sys::cuDeviceTotalMem_v2(&mut mem, dev), "cuDeviceTotalMem")?;
                let mut bus = [0 as c_char; 64];
                check(
                    sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), bus.len() as c_int, dev),
                    "cuDeviceGetPCIBusId",
                )?;
                out.push(DeviceInfo {
                    ordinal,
                    name: CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned(),
                    total_mem: mem,
                    pci_bus_id: CStr::from_ptr(bus.as_ptr()).to_string_lossy().into_owned(),
                });
            }
        }
        Ok(out)
    }

    /// The device this rank uses: `BRAID_CUDA_DEVICE`, else `BRAID_LOCAL_RANK` or `LOCAL_RANK`
    /// (as braid-run and torchrun set them) modulo the number of devices, else 0.
    pub fn selected_device(&self) -> Result<i32> {
        select_device(
            config::var("BRAID_CUDA_DEVICE").as_deref(),
            config::var("BRAID_LOCAL_RANK")
                .or_else(|| config::var("LOCAL_RANK"))
                .as_deref(),
            self.count,
        )
    }

    /// Makes `device`'s primary context current on the calling thread (retaining it once per
    /// process).
    pub fn bind(&self, device: i32) -> Result<()> {
        if device < 0 || device >= self.count {
            return Err(Error::InvalidArgument(format!(
                "CUDA device {device} does not exist ({} device(s))",
                self.count
            )));
        }
        let ctx = {
            let mut map = self.contexts.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(&device) {
                Some(c) => *c as sys::CUcontext,
                None => {
                    let mut dev = 0;
                    let mut ctx: sys::CUcontext = std::ptr::null_mut();
                    // SAFETY: symbols checked by the probe; `device` is in range.
                    unsafe {
                        check(sys::cuDeviceGet(&mut dev, device), "cuDeviceGet")?;
                        check(
                            sys::cuDevicePrimaryCtxRetain(&mut ctx, dev),
                            "cuDevicePrimaryCtxRetain",
                        )?;
                    }
                    map.insert(device, ctx as usize);
                    ctx
                }
            }
        };
        // SAFETY: `ctx` is a retained primary context (never released).
        check(unsafe { sys::cuCtxSetCurrent(ctx) }, "cuCtxSetCurrent")
    }

    /// Binds the selected device unless the calling thread already has a current context (the
    /// application's).
    pub fn ensure_context(&self) -> Result<()> {
        let mut cur: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: symbol checked by the probe.
        check(unsafe { sys::cuCtxGetCurrent(&mut cur) }, "cuCtxGetCurrent")?;
        if cur.is_null() {
            self.bind(self.selected_device()?)?;
        }
        Ok(())
    }
}

/// The device choice of [`Driver::selected_device`], from the variables' values.
pub fn select_device(explicit: Option<&str>, local_rank: Option<&str>, count: i32) -> Result<i32> {
    if let Some(v) = explicit {
        let d: i32 = v.trim().parse().map_err(|_| {
            Error::InvalidArgument(format!("BRAID_CUDA_DEVICE={v:?} is not a device ordinal"))
        })?;
        if d < 0 || d >= count {
            return Err(Error::InvalidArgument(format!(
                "BRAID_CUDA_DEVICE={d}, but this machine has {count} CUDA device(s)"
            )));
        }
        return Ok(d);
    }
    if let Some(v) = local_rank {
        let r: i64 = v
            .trim()
            .parse()
            .map_err(|_| Error::InvalidArgument(format!("LOCAL_RANK={v:?} is not an integer")))?;
        if r >= 0 && count > 0 {
            return Ok((r % i64::from(count)) as i32);
        }
    }
    Ok(0)
}

/// Where a pointer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtrKind {
    /// Host memory (pageable or pinned), or any pointer of a process without CUDA.
    Host,
    /// Device memory of this device ordinal.
    Device(i32),
    /// Managed (unified) memory, reachable from the host and from this device.
    Managed(i32),
}

/// What kind of memory `ptr` points to (`cuPointerGetAttribute`). In a process that has not
/// loaded libcuda every pointer is host memory, and nothing is loaded to find that out.
pub fn pointer_kind(ptr: *const c_void) -> PtrKind {
    if ptr.is_null() || !loaded_in_process() {
        return PtrKind::Host;
    }
    let Ok(drv) = driver() else {
        return PtrKind::Host;
    };
    if drv.ensure_context().is_err() {
        return PtrKind::Host;
    }
    let mut mem_type: u32 = 0;
    let mut ordinal: c_int = 0;
    let mut managed: u32 = 0;
    // SAFETY: symbols checked by the probe; each attribute is written to a value of the size
    // the driver documents (CUmemorytype: an enum; device ordinal: int; is_managed: a bool
    // written as an unsigned int).
    unsafe {
        let a = sys::cuPointerGetAttribute(
            (&mut mem_type as *mut u32).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            ptr as DevPtr,
        );
        if a != CUresult::CUDA_SUCCESS {
            // CUDA_ERROR_INVALID_VALUE: memory the driver does not know (ordinary host memory).
            return PtrKind::Host;
        }
        if sys::cuPointerGetAttribute(
            (&mut ordinal as *mut c_int).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            ptr as DevPtr,
        ) != CUresult::CUDA_SUCCESS
        {
            ordinal = 0;
        }
        if sys::cuPointerGetAttribute(
            (&mut managed as *mut u32).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_IS_MANAGED,
            ptr as DevPtr,
        ) != CUresult::CUDA_SUCCESS
        {
            managed = 0;
        }
    }
    if managed != 0 {
        PtrKind::Managed(ordinal)
    } else if mem_type == sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
        PtrKind::Device(ordinal)
    } else {
        PtrKind::Host
    }
}

/// Device memory braid allocated (`cuMemAlloc`), freed on drop.
#[derive(Debug)]
pub struct DeviceAlloc {
    ptr: DevPtr,
    len: usize,
    device: i32,
}

impl DeviceAlloc {
    /// `len` bytes on `device` (the selected device when `None`).
    pub fn new(len: usize, device: Option<i32>) -> Result<DeviceAlloc> {
        let drv = driver()?;
        let device = match device {
            Some(d) => d,
            None => drv.selected_device()?,
        };
        drv.bind(device)?;
        let mut ptr: DevPtr = 0;
        // SAFETY: symbol checked by the probe; the context is current.
        let r = unsafe { sys::cuMemAlloc_v2(&mut ptr, len.max(1)) };
        check(r, "cuMemAlloc")?;
        Ok(DeviceAlloc { ptr, len, device })
    }

    /// The buffer.
    pub fn buf(&self) -> super::DeviceBuf {
        // SAFETY: the allocation lives as long as `self`.
        unsafe { super::DeviceBuf::from_raw(self.ptr, self.len, self.device) }
    }

    /// The device address.
    pub fn ptr(&self) -> DevPtr {
        self.ptr
    }

    /// Gives the allocation up without freeing it (for [`free_device`] later).
    pub fn into_raw(self) -> DevPtr {
        let p = self.ptr;
        std::mem::forget(self);
        p
    }

    /// Copies `src` to the start of the buffer (synchronous).
    pub fn copy_from_host(&self, src: &[u8]) -> Result<()> {
        if src.len() > self.len {
            return Err(Error::InvalidArgument(format!(
                "copy of {} bytes into a {}-byte device buffer",
                src.len(),
                self.len
            )));
        }
        driver()?.bind(self.device)?;
        // SAFETY: `src` is valid for its length, which fits in the allocation.
        check(
            unsafe { sys::cuMemcpyHtoD_v2(self.ptr, src.as_ptr().cast(), src.len()) },
            "cuMemcpyHtoD",
        )
    }

    /// Copies the start of the buffer to `dst` (synchronous).
    pub fn copy_to_host(&self, dst: &mut [u8]) -> Result<()> {
        if dst.len() > self.len {
            return Err(Error::InvalidArgument(format!(
                "copy of {} bytes out of a {}-byte device buffer",
                dst.len(),
                self.len
            )));
        }
        driver()?.bind(self.device)?;
        // SAFETY: `dst` is valid for its length, which fits in the allocation.
        check(
            unsafe { sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), self.ptr, dst.len()) },
            "cuMemcpyDtoH",
        )
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        if let Err(e) = free_device(self.ptr, self.device) {
            tracing::warn!(target: "braid::cuda", "freeing device memory: {e}");
        }
    }
}

/// Frees device memory from [`DeviceAlloc::into_raw`] (`braid_mem_free_device`).
pub fn free_device(ptr: DevPtr, device: i32) -> Result<()> {
    let drv = driver()?;
    drv.bind(device)?;
    // SAFETY: the caller passes memory from cuMemAlloc that is no longer in use.
    check(unsafe { sys::cuMemFree_v2(ptr) }, "cuMemFree")
}

/// Page-locked host memory (`cuMemHostAlloc`, portable), freed on drop: the staging buffers.
#[derive(Debug)]
pub struct PinnedAlloc {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the allocation is plain memory owned by this value.
unsafe impl Send for PinnedAlloc {}
// SAFETY: shared access hands out only the raw pointer; users synchronise their own writes.
unsafe impl Sync for PinnedAlloc {}

impl PinnedAlloc {
    /// `len` bytes of pinned host memory (the calling thread needs a current context).
    pub fn new(len: usize) -> Result<PinnedAlloc> {
        driver()?.ensure_context()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: symbol checked by the probe; flag 1 = CU_MEMHOSTALLOC_PORTABLE.
        let r = unsafe { sys::cuMemHostAlloc(&mut p, len.max(1), 1) };
        check(r, "cuMemHostAlloc")?;
        Ok(PinnedAlloc { ptr: p.cast(), len })
    }

    /// The memory.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PinnedAlloc {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from cuMemHostAlloc and is not used after this.
        let r = unsafe { sys::cuMemFreeHost(self.ptr.cast()) };
        if let Err(e) = check(r, "cuMemFreeHost") {
            tracing::warn!(target: "braid::cuda", "{e}");
        }
    }
}

/// Waits until everything enqueued on `stream` has completed (`cuStreamSynchronize`).
pub fn synchronize(stream: super::Stream) -> Result<()> {
    driver()?.ensure_context()?;
    // SAFETY: symbol checked by the probe; the caller passes a live stream (or the default).
    check(
        unsafe { sys::cuStreamSynchronize(stream.0 as sys::CUstream) },
        "cuStreamSynchronize",
    )
}

/// Enqueues a device-to-device copy of `len` bytes on `stream` (`cuMemcpyDtoDAsync`).
///
/// # Safety
/// `dst` and `src` are device memory valid for `len` bytes until the copy completes on
/// `stream`, a live stream (or the default).
pub unsafe fn copy_d2d_async(
    dst: DevPtr,
    src: DevPtr,
    len: usize,
    stream: super::Stream,
) -> Result<()> {
    if len == 0 || dst == src {
        return Ok(());
    }
    driver()?.ensure_context()?;
    // SAFETY: symbol checked by the probe; ranges per this function's contract.
    check(
        unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, len, stream.0 as sys::CUstream) },
        "cuMemcpyDtoDAsync",
    )
}

/// Copies `dst.len()` bytes of device memory at `src` to the host, after everything enqueued
/// on the device so far (`cuCtxSynchronize`, then `cuMemcpyDtoH`): the staging of push/pull
/// values that live on the GPU.
pub fn copy_from_device(dst: &mut [u8], src: DevPtr) -> Result<()> {
    if dst.is_empty() {
        return Ok(());
    }
    driver()?.ensure_context()?;
    // SAFETY: symbols checked by the probe; `dst` is valid for its length and the caller
    // passes device memory of at least that length.
    unsafe {
        check(sys::cuCtxSynchronize(), "cuCtxSynchronize")?;
        check(
            sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), src, dst.len()),
            "cuMemcpyDtoH",
        )
    }
}

/// Copies `src` to device memory at `dst` (synchronous), after everything enqueued on the
/// device so far.
pub fn copy_to_device(dst: DevPtr, src: &[u8]) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    driver()?.ensure_context()?;
    // SAFETY: as copy_from_device.
    unsafe {
        check(sys::cuCtxSynchronize(), "cuCtxSynchronize")?;
        check(
            sys::cuMemcpyHtoD_v2(dst, src.as_ptr().cast(), src.len()),
            "cuMemcpyHtoD",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choice_follows_the_variables() {
        assert_eq!(select_device(None, None, 4).ok(), Some(0));
        assert_eq!(select_device(Some("2"), Some("3"), 4).ok(), Some(2));
        assert_eq!(select_device(None, Some("5"), 4).ok(), Some(1));
        assert!(select_device(Some("4"), None, 4)
            .unwrap_err()
            .to_string()
            .contains("has 4 CUDA device(s)"));
        assert!(select_device(Some("x"), None, 4).is_err());
        assert!(select_device(None, Some("x"), 4).is_err());
    }

    #[test]
    fn without_a_driver_every_entry_says_why() {
        if LIBCUDA.iter().any(|n| {
            // SAFETY: a load attempt.
            unsafe { libloading::Library::new(*n) }.is_ok()
        }) {
            eprintln!("a CUDA driver is installed: the no-driver checks do not apply here");
            return;
        }
        let e = driver().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("no CUDA driver (libcuda.so.1 not found)"), "{e}");
        assert!(!loaded_in_process());
        assert_eq!(
            pointer_kind(&e as *const String as *const c_void),
            PtrKind::Host
        );
        assert!(DeviceAlloc::new(64, None).is_err());
        assert!(PinnedAlloc::new(64).is_err());
        assert!(super::super::available().is_err());
    }
}
