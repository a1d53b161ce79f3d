//! The narrow NIC interface the ib transport is written against: the few verbs operations braid
//! uses, with two implementations: [`super::verbs`] (rdma-core through the `ibverbs` crate, in a
//! plugin library loaded at run time) and [`super::emulated`] (a userspace NIC for tests and
//! demos, never chosen silently).
//!
//! The shapes follow libibverbs so that the real provider is a thin mapping: a protection
//! domain is implied by the [`Nic`] (one per opened device), memory regions carry an lkey and an
//! rkey, a completion queue has a file descriptor that becomes readable after [`Cq::arm`] when a
//! completion arrives, and reliable-connected queue pairs move INIT -> RTR -> RTS in
//! [`Qp::connect`]. Numeric values (access flags, completion status codes, opcodes) are the
//! ones of `<infiniband/verbs.h>`.
//!
//! Ownership: a [`Qp`] uses the [`Cq`] it was created with; drop every queue pair before its
//! completion queue, and every queue pair and memory region before the [`Nic`].

use std::os::fd::RawFd;

/// Local write access (`IBV_ACCESS_LOCAL_WRITE`): the NIC may write the region for receives.
pub const ACCESS_LOCAL_WRITE: u32 = 1;
/// Remote write access (`IBV_ACCESS_REMOTE_WRITE`): peers may RDMA WRITE into the region.
pub const ACCESS_REMOTE_WRITE: u32 = 2;
/// Remote read access (`IBV_ACCESS_REMOTE_READ`).
pub const ACCESS_REMOTE_READ: u32 = 4;

/// Completion status codes (`enum ibv_wc_status`).
pub mod status {
    /// The operation completed.
    pub const SUCCESS: u32 = 0;
    /// Local length error (a receive buffer too small for the incoming SEND).
    pub const LOC_LEN_ERR: u32 = 1;
    /// Local QP operation error.
    pub const LOC_QP_OP_ERR: u32 = 2;
    /// Local protection error (bad lkey or address outside the local region).
    pub const LOC_PROT_ERR: u32 = 4;
    /// Work request flushed: the QP went to the error state before it ran.
    pub const WR_FLUSH_ERR: u32 = 5;
    /// Remote invalid request (e.g. a SEND longer than the remote receive buffer).
    pub const REM_INV_REQ_ERR: u32 = 9;
    /// Remote access error: bad rkey, out of the region's bounds, or no access right.
    pub const REM_ACCESS_ERR: u32 = 10;
    /// Remote operation error.
    pub const REM_OP_ERR: u32 = 11;
    /// Transport retry counter exceeded: the remote does not answer (dead peer).
    pub const RETRY_EXC_ERR: u32 = 12;
    /// Receiver-not-ready retry counter exceeded: the remote had no receive posted.
    pub const RNR_RETRY_EXC_ERR: u32 = 13;
    /// Fatal error.
    pub const FATAL_ERR: u32 = 19;
    /// General error.
    pub const GENERAL_ERR: u32 = 21;

    /// The text libibverbs' `ibv_wc_status_str` gives for `s` (the same strings, so that logs
    /// read the same on both providers).
    pub fn as_str(s: u32) -> &'static str {
        match s {
            0 => "success",
            1 => "local length error",
            2 => "local QP operation error",
            3 => "local EE context operation error",
            4 => "local protection error",
            5 => "Work Request Flushed Error",
            6 => "memory management operation error",
            7 => "bad response error",
            8 => "local access error",
            9 => "remote invalid request error",
            10 => "remote access error",
            11 => "remote operation error",
            12 => "transport retry counter exceeded",
            13 => "RNR retry counter exceeded",
            14 => "local RDD violation error",
            15 => "remote invalid RD request",
            16 => "aborted error",
            17 => "invalid EE context number",
            18 => "invalid EE context state",
            19 => "fatal error",
            20 => "response timeout error",
            21 => "general error",
            22 => "TM error",
            23 => "TM Rendezvous pending",
            _ => "unknown",
        }
    }
}

/// An error of a NIC call (not a completion: those are [`Wc`]s with a status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicError {
    /// The call that failed (`"ibv_reg_mr"`, `"ibv_post_send"`, ...).
    pub op: String,
    /// Why (the errno text for verbs).
    pub msg: String,
}

impl std::fmt::Display for NicError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.op, self.msg)
    }
}

impl NicError {
    /// An error of `op` with `msg`.
    pub fn new(op: impl Into<String>, msg: impl Into<String>) -> NicError {
        NicError {
            op: op.into(),
            msg: msg.into(),
        }
    }
}

/// Result of a NIC call.
pub type NicResult<T> = Result<T, NicError>;

/// Link layer of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLayer {
    /// InfiniBand (addressed by LID).
    InfiniBand,
    /// RoCE (addressed by GID).
    Ethernet,
    /// The emulated NIC (addressed by its socket address).
    Emulated,
}

/// What a port offers, from `ibv_query_port` / `ibv_query_gid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Device name (`mlx5_0`, `emu0`).
    pub device: String,
    /// Port number (1-based, as in verbs).
    pub port: u8,
    /// Local identifier (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// The GID at the configured index (all zero when unused).
    pub gid: [u8; 16],
    /// Active MTU in bytes.
    pub mtu: u32,
    /// Link speed in Mbit/s (0 when unknown).
    pub speed_mbps: u64,
    /// Link layer.
    pub link_layer: LinkLayer,
}

/// A registered memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mr {
    /// Provider-specific identity (what [`Nic::dereg_mr`] needs).
    pub id: u64,
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Local key (for scatter/gather entries of this process's work requests).
    pub lkey: u32,
    /// Remote key (what peers put in RDMA WRITEs into this region).
    pub rkey: u32,
}

/// The address of one queue pair: what the peer's [`Qp::connect`] needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QpAddr {
    /// Local identifier of the port (InfiniBand).
    pub lid: u16,
    /// GID (RoCE, or InfiniBand across subnets).
    pub gid: [u8; 16],
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number (24 bits).
    pub psn: u32,
    /// Provider address bytes: the emulated NIC's socket address; empty for verbs.
    pub nic_addr: Vec<u8>,
}

/// Connection parameters of a reliable-connected queue pair (the `ibv_modify_qp` attributes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectParams {
    /// Path MTU in bytes (256..4096).
    pub mtu: u32,
    /// Local ACK timeout exponent (4.096 us * 2^timeout).
    pub timeout: u8,
    /// Transport retries before `RETRY_EXC_ERR`.
    pub retry_cnt: u8,
    /// Receiver-not-ready retries before `RNR_RETRY_EXC_ERR` (7 = infinite in verbs).
    pub rnr_retry: u8,
    /// Minimum RNR NAK timer (verbs encoding).
    pub min_rnr_timer: u8,
    /// GID index (RoCE).
    pub gid_index: u8,
    /// Traffic class (RoCE DSCP << 2 / InfiniBand TClass).
    pub traffic_class: u8,
    /// Service level (InfiniBand).
    pub sl: u8,
    /// Whether the remote address is a GID (RoCE always; InfiniBand across subnets).
    pub use_gid: bool,
}

impl Default for ConnectParams {
    fn default() -> Self {
        ConnectParams {
            mtu: 4096,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            min_rnr_timer: 12,
            gid_index: 0,
            traffic_class: 0,
            sl: 0,
            use_gid: false,
        }
    }
}

/// One scatter/gather entry: `len` bytes at `addr` inside a region registered with `lkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Local key of the region holding it.
    pub lkey: u32,
}

/// The operation of a send work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    /// SEND: consumes one posted receive at the peer.
    Send,
    /// SEND with immediate data.
    SendImm(u32),
    /// RDMA WRITE into the peer's region: consumes no receive, gives the peer no completion.
    Write {
        /// Target address in the peer's region.
        remote_addr: u64,
        /// The peer region's rkey.
        rkey: u32,
    },
    /// RDMA WRITE WITH IMMEDIATE: the write, then one receive consumed at the peer, whose
    /// completion carries `imm` (and a byte length of the write).
    WriteImm {
        /// Target address in the peer's region.
        remote_addr: u64,
        /// The peer region's rkey.
        rkey: u32,
        /// Immediate data.
        imm: u32,
    },
}

/// A send work request (one scatter/gather entry, or none for zero bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendWr {
    /// Caller's id, returned in the completion.
    pub wr_id: u64,
    /// What to do.
    pub op: SendOp,
    /// The local bytes (None: zero length).
    pub sge: Option<Sge>,
    /// Whether a successful completion is reported (errors always are).
    pub signaled: bool,
}

/// Opcode of a work completion (`enum ibv_wc_opcode`, the ones braid uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcOpcode {
    /// A SEND (or SEND with immediate) completed.
    Send,
    /// An RDMA WRITE (or WRITE with immediate) completed.
    Write,
    /// A receive consumed by a SEND.
    Recv,
    /// A receive consumed by an RDMA WRITE WITH IMMEDIATE.
    RecvRdmaWithImm,
}

/// A work completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wc {
    /// The work request's id.
    pub wr_id: u64,
    /// Status ([`status`] codes); on error only `wr_id`, `status` and `qpn` are meaningful.
    pub status: u32,
    /// What completed.
    pub opcode: WcOpcode,
    /// Bytes received (receives only).
    pub byte_len: u32,
    /// Immediate data, when the message carried one.
    pub imm: Option<u32>,
    /// The local queue pair number.
    pub qpn: u32,
}

/// State of a queue pair (`enum ibv_qp_state`, the ones braid sees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpState {
    /// Created, not yet connected.
    Init,
    /// Ready to receive.
    Rtr,
    /// Ready to send.
    Rts,
    /// Error: every outstanding and later work request completes with `WR_FLUSH_ERR`.
    Error,
}

/// An opened device port with its protection domain.
pub trait Nic: Send + Sync {
    /// The port's properties.
    fn port(&self) -> PortInfo;
    /// Registers `len` bytes at `addr` with `access` ([`ACCESS_LOCAL_WRITE`] ...).
    ///
    /// # Safety
    /// The memory must stay valid (mapped, not freed) until [`Nic::dereg_mr`]; the NIC reads it
    /// for sends and writes it for receives and remote writes at any time in between.
    unsafe fn reg_mr(&self, addr: *mut u8, len: usize, access: u32) -> NicResult<Mr>;
    /// Deregisters a region; after it returns, the NIC no longer touches that memory.
    fn dereg_mr(&self, mr: &Mr) -> NicResult<()>;
    /// A completion queue of at least `depth` entries with its event file descriptor.
    fn create_cq(&self, depth: u32) -> NicResult<Box<dyn Cq>>;
    /// A reliable-connected queue pair (state INIT) whose send and receive completions go to
    /// `cq`, sized for `max_send` / `max_recv` outstanding work requests.
    fn create_qp(&self, cq: &dyn Cq, max_send: u32, max_recv: u32) -> NicResult<Box<dyn Qp>>;
    /// The text for a completion status (`ibv_wc_status_str`).
    fn status_str(&self, status: u32) -> String {
        status::as_str(status).to_string()
    }
    /// How GPU memory would reach this NIC (GPUDirect RDMA by dma-buf or nvidia_peermem, or
    /// staging through host memory); `user_disabled` forces staging. Default: staging (a NIC
    /// that cannot register device memory, such as the emulated one).
    fn gpu_path(&self, user_disabled: bool) -> super::verbs::GpuPath {
        let _ = user_disabled;
        super::verbs::GpuPath::HostStaging {
            reason: "this NIC cannot register device memory",
        }
    }
    /// Registers `len` bytes at `offset` of a dma-buf `fd` (device memory exported with
    /// `cuMemGetHandleForAddressRange`), addressed as `iova` onwards (`ibv_reg_dmabuf_mr`).
    /// Default: unsupported.
    ///
    /// # Safety
    /// The device memory must stay allocated until [`Nic::dereg_mr`].
    unsafe fn reg_dmabuf_mr(
        &self,
        fd: RawFd,
        offset: u64,
        len: usize,
        iova: u64,
        access: u32,
    ) -> NicResult<Mr> {
        let _ = (fd, offset, len, iova, access);
        Err(NicError::new(
            "ibv_reg_dmabuf_mr",
            "this NIC cannot register device memory",
        ))
    }
}

/// A completion queue.
pub trait Cq: Send {
    /// Moves up to `out.len()` completions into `out`; returns how many.
    fn poll(&mut self, out: &mut [Wc]) -> NicResult<usize>;
    /// Requests an event on the file descriptor for the next completion
    /// (`ibv_req_notify_cq`). Poll again after arming: a completion that arrived in between
    /// raises no event.
    fn arm(&mut self) -> NicResult<()>;
    /// Consumes a pending event, if any (`ibv_get_cq_event` + `ibv_ack_cq_events`, without
    /// blocking). Call when the descriptor was readable.
    fn take_event(&mut self) -> NicResult<()>;
    /// The descriptor that becomes readable on an event (non-blocking).
    fn fd(&self) -> RawFd;
    /// Provider identity (used by [`Nic::create_qp`]).
    fn handle(&self) -> u64;
}

/// A reliable-connected queue pair.
pub trait Qp: Send {
    /// This queue pair's address, for the peer.
    fn addr(&self) -> QpAddr;
    /// Connects to the peer's queue pair: INIT -> RTR -> RTS.
    fn connect(&mut self, remote: &QpAddr, params: &ConnectParams) -> NicResult<()>;
    /// Posts a send work request. Fails (`ENOMEM`-like) when the send queue is full.
    fn post_send(&mut self, wr: &SendWr) -> NicResult<()>;
    /// Posts a receive of up to `sge.len` bytes (None: for WRITE WITH IMMEDIATE and empty
    /// SENDs only).
    fn post_recv(&mut self, wr_id: u64, sge: Option<Sge>) -> NicResult<()>;
    /// Current state.
    fn state(&self) -> QpState;
}
