//! The C ABI between braid and its verbs plugin, `libbraid_ibverbs.so`.
//!
//! libbraid must not depend on libibverbs at run time (a machine without rdma-core still loads
//! it), so the real verbs provider lives in a separate shared library that [`super::verbs`]
//! opens with `dlopen`, as NCCL loads its net plugins. The plugin exports one symbol,
//! [`PLUGIN_SYMBOL`] (`braid_ibverbs_plugin_v1`), a function returning a pointer to a static
//! [`PluginV1`]: a versioned table of `extern "C"` functions over plain C types only.
//!
//! This file is compiled into both sides: braid-transport (`crate::ib::verbs_abi`) and the
//! plugin crate `braid-ibverbs` (through `#[path]`), so the two always agree on the layout of
//! the version they were built from; [`PluginV1::abi_version`] and [`PluginV1::struct_size`]
//! catch a plugin from another build.
//!
//! Conventions of every function of the table:
//! - the return value is 0 on success, else a positive errno-like code; the text of the last
//!   failure of the calling thread (`"<verbs call>: <errno text>"`, e.g.
//!   `"ibv_reg_mr: Cannot allocate memory"`) is then available from [`PluginV1::last_error`];
//! - handles (`*mut c_void`) are opaque, created and destroyed only by the plugin;
//! - no function unwinds across the boundary (the plugin catches panics and reports them as
//!   errors) and none blocks.
//!
//! Immediate data is passed in host byte order here; the plugin converts to and from the
//! network order of `ibv_send_wr.imm_data` / `ibv_wc.imm_data`.

use std::ffi::{c_char, c_int, c_void};

/// The ABI version of [`PluginV1`].
pub const ABI_VERSION: u32 = 1;

/// The symbol the plugin exports (NUL-terminated, for `dlsym`): an
/// `extern "C" fn() -> *const PluginV1`.
pub const PLUGIN_SYMBOL: &[u8] = b"braid_ibverbs_plugin_v1\0";

/// The plugin's file name (what `dlopen` looks for next to libbraid, or on the loader path).
pub const PLUGIN_FILE: &str = "libbraid_ibverbs.so";

/// The type of the exported [`PLUGIN_SYMBOL`].
pub type PluginEntry = unsafe extern "C" fn() -> *const PluginV1;

/// Link layer value of [`PortAttrV1::link_layer`]: InfiniBand (also verbs' "unspecified").
pub const LINK_LAYER_INFINIBAND: u8 = 1;
/// Link layer value of [`PortAttrV1::link_layer`]: Ethernet (RoCE).
pub const LINK_LAYER_ETHERNET: u8 = 2;

/// [`SendWrV1::opcode`]: SEND.
pub const OP_SEND: u32 = 0;
/// [`SendWrV1::opcode`]: SEND with immediate data.
pub const OP_SEND_IMM: u32 = 1;
/// [`SendWrV1::opcode`]: RDMA WRITE.
pub const OP_WRITE: u32 = 2;
/// [`SendWrV1::opcode`]: RDMA WRITE WITH IMMEDIATE.
pub const OP_WRITE_IMM: u32 = 3;

/// [`WcV1::opcode`] values are `enum ibv_wc_opcode`: a SEND completed.
pub const WC_SEND: u32 = 0;
/// [`WcV1::opcode`]: an RDMA WRITE completed.
pub const WC_RDMA_WRITE: u32 = 1;
/// [`WcV1::opcode`]: a receive consumed by a SEND.
pub const WC_RECV: u32 = 128;
/// [`WcV1::opcode`]: a receive consumed by an RDMA WRITE WITH IMMEDIATE.
pub const WC_RECV_RDMA_WITH_IMM: u32 = 129;

/// Queue pair states of [`PluginV1::qp_state`] (`enum ibv_qp_state`).
pub mod qps {
    /// RESET.
    pub const RESET: u32 = 0;
    /// INIT.
    pub const INIT: u32 = 1;
    /// Ready to receive.
    pub const RTR: u32 = 2;
    /// Ready to send.
    pub const RTS: u32 = 3;
    /// Send queue drained.
    pub const SQD: u32 = 4;
    /// Send queue error.
    pub const SQE: u32 = 5;
    /// Error.
    pub const ERR: u32 = 6;
}

/// Properties of the opened port (`ibv_query_port` + `ibv_query_gid`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PortAttrV1 {
    /// Device name, NUL-terminated (truncated to 63 bytes).
    pub device: [c_char; 64],
    /// Port number (1-based).
    pub port: u8,
    /// [`LINK_LAYER_INFINIBAND`] or [`LINK_LAYER_ETHERNET`].
    pub link_layer: u8,
    /// Local identifier (0 on RoCE).
    pub lid: u16,
    /// `enum ibv_port_state` (4 = ACTIVE).
    pub state: u32,
    /// Active MTU in bytes.
    pub mtu: u32,
    /// GID at the opened GID index.
    pub gid: [u8; 16],
    /// Link speed in Mbit/s (0 when unknown).
    pub speed_mbps: u64,
}

impl Default for PortAttrV1 {
    fn default() -> Self {
        PortAttrV1 {
            device: [0; 64],
            port: 0,
            link_layer: 0,
            lid: 0,
            state: 0,
            mtu: 0,
            gid: [0; 16],
            speed_mbps: 0,
        }
    }
}

/// A registered memory region.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct MrV1 {
    /// The plugin's handle (what [`PluginV1::dereg_mr`] takes).
    pub handle: u64,
    /// Start address (the IOVA for dma-buf regions).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Local key.
    pub lkey: u32,
    /// Remote key.
    pub rkey: u32,
}

/// The address of a queue pair, for the peer's connect.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct QpAddrV1 {
    /// Local identifier of the port.
    pub lid: u16,
    /// Padding (zero).
    pub _pad: u16,
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number (24 bits).
    pub psn: u32,
    /// GID.
    pub gid: [u8; 16],
}

/// Connection parameters (the `ibv_modify_qp` attributes of RTR and RTS); the fields of
/// `nic::ConnectParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnectParamsV1 {
    /// Path MTU in bytes (256..4096); the plugin lowers it to the port's active MTU.
    pub mtu: u32,
    /// Local ACK timeout exponent.
    pub timeout: u8,
    /// Transport retries.
    pub retry_cnt: u8,
    /// RNR retries (7 = infinite).
    pub rnr_retry: u8,
    /// Minimum RNR NAK timer.
    pub min_rnr_timer: u8,
    /// Source GID index.
    pub gid_index: u8,
    /// Traffic class.
    pub traffic_class: u8,
    /// Service level.
    pub sl: u8,
    /// 1: the remote is addressed by GID (always on RoCE).
    pub use_gid: u8,
}

/// One scatter/gather entry.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SgeV1 {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Local key.
    pub lkey: u32,
}

/// A send work request.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SendWrV1 {
    /// Caller's id.
    pub wr_id: u64,
    /// [`OP_SEND`], [`OP_SEND_IMM`], [`OP_WRITE`] or [`OP_WRITE_IMM`].
    pub opcode: u32,
    /// Immediate data (host order), for the `*_IMM` opcodes.
    pub imm: u32,
    /// Remote address (WRITEs).
    pub remote_addr: u64,
    /// Remote key (WRITEs).
    pub rkey: u32,
    /// 1: signaled (`IBV_SEND_SIGNALED`).
    pub signaled: u32,
    /// 1: `sge` is used; 0: zero-length request.
    pub has_sge: u32,
    /// Padding (zero).
    pub _pad: u32,
    /// The local bytes.
    pub sge: SgeV1,
}

/// A work completion.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct WcV1 {
    /// The work request's id.
    pub wr_id: u64,
    /// `enum ibv_wc_status`.
    pub status: u32,
    /// `enum ibv_wc_opcode` (meaningless on error).
    pub opcode: u32,
    /// Bytes received.
    pub byte_len: u32,
    /// Immediate data (host order), valid when `has_imm` is 1.
    pub imm: u32,
    /// 1: `imm` is valid.
    pub has_imm: u32,
    /// Local queue pair number.
    pub qpn: u32,
    /// Vendor error syndrome (errors only).
    pub vendor_err: u32,
    /// Padding (zero).
    pub _pad: u32,
}

/// The function table of ABI version 1. Every pointer is set; the table is static in the
/// plugin and lives as long as the plugin stays loaded (braid never unloads it).
#[repr(C)]
pub struct PluginV1 {
    /// [`ABI_VERSION`] of the plugin.
    pub abi_version: u32,
    /// `size_of::<PluginV1>()` in the plugin.
    pub struct_size: u32,
    /// NUL-terminated description (plugin name and version).
    pub name: *const c_char,

    /// Writes the NUL-separated names of the RDMA devices into `buf` (at most `cap` bytes,
    /// names that do not fit are left out) and their number into `count`. Fails when
    /// `ibv_get_device_list` fails; zero devices is a success with `count` 0.
    pub list_devices: unsafe extern "C" fn(buf: *mut c_char, cap: usize, count: *mut u32) -> c_int,
    /// Opens `device` (NUL-terminated name, or null: the first device) at `port` with
    /// `gid_index`: `ibv_open_device`, `ibv_alloc_pd`, `ibv_query_port` (the port must be
    /// ACTIVE), `ibv_query_gid`. Fails with a reason naming the missing devices when there
    /// are none ("no RDMA devices found (ibv_get_device_list)").
    pub open: unsafe extern "C" fn(
        device: *const c_char,
        port: u8,
        gid_index: u8,
        ctx: *mut *mut c_void,
    ) -> c_int,
    /// Closes a context (`ibv_dealloc_pd`, `ibv_close_device`). Everything created from it
    /// must be destroyed first.
    pub close: unsafe extern "C" fn(ctx: *mut c_void) -> c_int,
    /// The opened port's properties (as queried at open).
    pub port_attr: unsafe extern "C" fn(ctx: *mut c_void, out: *mut PortAttrV1) -> c_int,
    /// `ibv_reg_mr` of `len` bytes at `addr` with `access` (`IBV_ACCESS_*`).
    pub reg_mr: unsafe extern "C" fn(
        ctx: *mut c_void,
        addr: *mut c_void,
        len: usize,
        access: u32,
        out: *mut MrV1,
    ) -> c_int,
    /// `ibv_reg_dmabuf_mr` (GPUDirect RDMA: device memory exported as a dma-buf): `len` bytes
    /// at `offset` of the dma-buf `fd`, addressed by the NIC at `iova`. `EOPNOTSUPP` when
    /// libibverbs or the device lacks it.
    pub reg_dmabuf_mr: unsafe extern "C" fn(
        ctx: *mut c_void,
        offset: u64,
        len: usize,
        iova: u64,
        fd: c_int,
        access: u32,
        out: *mut MrV1,
    ) -> c_int,
    /// Whether the device supports dma-buf registration: 1 yes, 0 no (NCCL's probe:
    /// `ibv_reg_dmabuf_mr` with fd -1 fails with EBADF only when supported).
    pub dmabuf_supported: unsafe extern "C" fn(ctx: *mut c_void) -> c_int,
    /// `ibv_dereg_mr` of a region's handle.
    pub dereg_mr: unsafe extern "C" fn(handle: u64) -> c_int,
    /// A completion queue of at least `depth` entries on a completion channel whose
    /// descriptor (non-blocking) is written to `fd`.
    pub create_cq: unsafe extern "C" fn(
        ctx: *mut c_void,
        depth: u32,
        cq: *mut *mut c_void,
        fd: *mut c_int,
    ) -> c_int,
    /// Destroys a completion queue and its channel (no queue pair may use it any more).
    pub destroy_cq: unsafe extern "C" fn(cq: *mut c_void) -> c_int,
    /// Polls up to `n` completions into `out`; their number goes to `got`.
    pub poll_cq:
        unsafe extern "C" fn(cq: *mut c_void, out: *mut WcV1, n: u32, got: *mut u32) -> c_int,
    /// `ibv_req_notify_cq(cq, 0)`.
    pub arm_cq: unsafe extern "C" fn(cq: *mut c_void) -> c_int,
    /// Consumes one pending channel event without blocking (`ibv_get_cq_event` +
    /// `ibv_ack_cq_events`); `got` is 1 when there was one, 0 when none was pending.
    pub take_cq_event: unsafe extern "C" fn(cq: *mut c_void, got: *mut u32) -> c_int,
    /// A reliable-connected queue pair in state INIT on `cq` (send and receive completions),
    /// with one SGE per request, all access rights; its address goes to `addr`.
    pub create_qp: unsafe extern "C" fn(
        ctx: *mut c_void,
        cq: *mut c_void,
        max_send: u32,
        max_recv: u32,
        qp: *mut *mut c_void,
        addr: *mut QpAddrV1,
    ) -> c_int,
    /// Destroys a queue pair.
    pub destroy_qp: unsafe extern "C" fn(qp: *mut c_void) -> c_int,
    /// INIT -> RTR -> RTS towards `remote`.
    pub connect_qp: unsafe extern "C" fn(
        qp: *mut c_void,
        remote: *const QpAddrV1,
        params: *const ConnectParamsV1,
    ) -> c_int,
    /// Posts one send work request.
    pub post_send: unsafe extern "C" fn(qp: *mut c_void, wr: *const SendWrV1) -> c_int,
    /// Posts one receive (`sge` null: zero length).
    pub post_recv: unsafe extern "C" fn(qp: *mut c_void, wr_id: u64, sge: *const SgeV1) -> c_int,
    /// The queue pair's state ([`qps`]) from `ibv_query_qp`.
    pub qp_state: unsafe extern "C" fn(qp: *mut c_void, state: *mut u32) -> c_int,
    /// `ibv_wc_status_str`: a static NUL-terminated string.
    pub wc_status_str: unsafe extern "C" fn(status: u32) -> *const c_char,
    /// Copies the calling thread's last error text (NUL-terminated, truncated to `cap`) into
    /// `buf`; returns its full length without the NUL (0: no error recorded).
    pub last_error: unsafe extern "C" fn(buf: *mut c_char, cap: usize) -> usize,
}

// SAFETY: the table is immutable static data (function pointers and a pointer to a static
// string); sharing it between threads is sound.
unsafe impl Sync for PluginV1 {}
// SAFETY: as above; nothing in it is tied to a thread.
unsafe impl Send for PluginV1 {}
