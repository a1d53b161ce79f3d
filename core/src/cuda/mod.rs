//! CUDA device buffers: collectives and point-to-point on GPU memory, stream-ordered as in NCCL.
//!
//! Nothing here is a build or link dependency: the CUDA driver (libcuda) and NCCL are loaded at
//! the first device call (through `cudarc` with dynamic loading, after probing that the library
//! is there, because cudarc panics when it is not). One libbraid serves machines with and
//! without GPUs; on a machine without them every device entry point returns an error that says
//! why ([`available`]).
//!
//! Layers:
//! - [`driver`]: loads libcuda, binds this thread to the rank's device (primary context), turns
//!   `CUresult`s into braid errors; pointer kinds; device and pinned allocations.
//! - [`nccl`]: finds and loads NCCL (`BRAID_NCCL_LIBRARY`, `libnccl.so.2`, the pip packages'
//!   directories), its function table, the NCCL communicator wrapper.
//! - [`staging`]: the staging engine: device data copied through pinned host buffers in
//!   pipelined chunks over any braid transport (a copy engine behind a trait, so the pipeline is
//!   tested with a host copy engine on machines without a GPU).
//! - `engine`: per communicator, picks NCCL or staging for each call, creates the NCCL
//!   communicator lazily (unique id handed out over the communicator) and rebuilds it at every
//!   view change; a watcher aborts it when braid's failure detector sees a rank go.
//! - `api`: the device forms of the [`Communicator`](crate::Communicator) API.

pub(crate) mod api;
pub mod driver;
pub(crate) mod engine;
pub mod nccl;
pub mod staging;

use std::ffi::c_void;

pub use api::DeviceP2p;
pub use driver::{pointer_kind, PtrKind};

use crate::error::Result;

/// A device address (`CUdeviceptr`).
pub type DevPtr = u64;

/// A CUDA stream (`CUstream` / `cudaStream_t`, the same object): calls on device buffers are
/// enqueued on it and return at once; completion is observed through the stream. The null
/// stream is the default (legacy) stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream(pub *mut c_void);

// SAFETY: a CUstream handle is an opaque token the driver accepts from any thread.
unsafe impl Send for Stream {}
// SAFETY: as for Send; braid never dereferences it.
unsafe impl Sync for Stream {}

impl Stream {
    /// The default (legacy) stream.
    pub const DEFAULT: Stream = Stream(std::ptr::null_mut());

    /// The raw handle.
    pub fn as_raw(self) -> *mut c_void {
        self.0
    }
}

impl Default for Stream {
    fn default() -> Self {
        Stream::DEFAULT
    }
}

/// A region of device memory: a raw device pointer, its length in bytes and its device.
///
/// braid does not own the memory (see [`driver::DeviceAlloc`] for memory it allocates).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceBuf {
    ptr: DevPtr,
    len: usize,
    device: i32,
}

impl DeviceBuf {
    /// Wraps `len` bytes at device address `ptr` on CUDA device `device`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be device memory of `device` (or managed memory) that stays allocated
    /// until every call using it has completed on its stream.
    pub unsafe fn from_raw(ptr: DevPtr, len: usize, device: i32) -> DeviceBuf {
        DeviceBuf { ptr, len, device }
    }

    /// The device address.
    pub fn ptr(&self) -> DevPtr {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The CUDA device ordinal.
    pub fn device(&self) -> i32 {
        self.device
    }
}

/// One CUDA device as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Ordinal.
    pub ordinal: i32,
    /// Name ("NVIDIA H100 80GB HBM3").
    pub name: String,
    /// Memory in bytes.
    pub total_mem: usize,
    /// PCI bus id ("0000:1b:00.0").
    pub pci_bus_id: String,
}

/// NCCL as loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclInfo {
    /// `ncclGetVersion`'s code (e.g. 22703 for 2.27.3).
    pub version: i32,
    /// The library file loaded.
    pub path: String,
}

impl NcclInfo {
    /// "2.27.3".
    pub fn version_string(&self) -> String {
        nccl::version_string(self.version)
    }
}

/// What [`available`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaInfo {
    /// `cuDriverGetVersion` (e.g. 13000 for CUDA 13.0).
    pub driver_version: i32,
    /// The devices of this machine.
    pub devices: Vec<DeviceInfo>,
    /// The ordinal this rank uses (`BRAID_CUDA_DEVICE`, else `LOCAL_RANK`).
    pub device: i32,
    /// NCCL, or why it is not there (device calls then go to the staging engine).
    pub nccl: std::result::Result<NcclInfo, String>,
}

/// Whether this process can use CUDA device buffers, and with what: the driver version, the
/// devices, the one this rank uses and NCCL. An error says why not: "no CUDA driver
/// (libcuda.so.1 not found)", "no CUDA device", the driver's own message.
pub fn available() -> Result<CudaInfo> {
    let drv = driver::driver()?;
    let devices = drv.devices()?;
    let device = drv.selected_device()?;
    let nccl = match nccl::library() {
        Ok(lib) => Ok(lib.info()),
        Err(e) => Err(e.to_string()),
    };
    Ok(CudaInfo {
        driver_version: drv.version(),
        devices,
        device,
        nccl,
    })
}
