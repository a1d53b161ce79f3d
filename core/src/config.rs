//! Configuration: every environment variable braid reads, in ONE table ([`VARS`]), read once
//! into an immutable [`Config`]. `docs/config.md` is generated from the table (a test keeps it
//! current: run `UPDATE_DOCS=1 cargo test -p braid config` after changing the table).
//!
//! Unknown `BRAID_*` variables produce a warning (a typo should not silently do nothing).
//! When the `BRAID_*` rendezvous variables are unset, the conventions of other launchers are
//! accepted: torchrun's `MASTER_ADDR`/`MASTER_PORT`/`RANK`/`WORLD_SIZE` (rank 0 hosts the
//! coordinator), Open MPI's `OMPI_COMM_WORLD_RANK`/`OMPI_COMM_WORLD_SIZE`, SLURM's
//! `SLURM_PROCID`/`SLURM_NTASKS`.

use std::time::Duration;

use crate::error::{Error, Result};

/// One environment variable.
#[derive(Debug, Clone, Copy)]
pub struct VarSpec {
    /// Name.
    pub name: &'static str,
    /// Value type as documented.
    pub ty: &'static str,
    /// Default ("" = unset).
    pub default: &'static str,
    /// What it does.
    pub doc: &'static str,
}

/// Every `BRAID_*` variable.
pub const VARS: &[VarSpec] = &[
    VarSpec { name: "BRAID_COORDINATOR", ty: "host:port", default: "",
        doc: "Address of the coordinator service. Unset: MASTER_ADDR:MASTER_PORT (rank 0 hosts it), else an error." },
    VarSpec { name: "BRAID_WORLD_SIZE", ty: "integer", default: "",
        doc: "Number of ranks. Unset: WORLD_SIZE, OMPI_COMM_WORLD_SIZE or SLURM_NTASKS." },
    VarSpec { name: "BRAID_RANK", ty: "integer", default: "",
        doc: "Requested rank (optional). Unset: RANK, OMPI_COMM_WORLD_RANK or SLURM_PROCID; else the coordinator assigns by arrival." },
    VarSpec { name: "BRAID_LOCAL_RANK", ty: "integer", default: "",
        doc: "Set by braid-run: index of this process among the ranks braid-run started on this host (also exported as LOCAL_RANK)." },
    VarSpec { name: "BRAID_LOCAL_SIZE", ty: "integer", default: "",
        doc: "Set by braid-run: number of ranks braid-run started on this host." },
    VarSpec { name: "BRAID_RUN_INDEX", ty: "integer", default: "",
        doc: "Set by braid-run: the launcher index of this process (0..N-1 for the initial ranks, N and up for joiners started by --join); stable across view changes, unlike the rank." },
    VarSpec { name: "BRAID_GROUP", ty: "string", default: "world",
        doc: "Rendezvous namespace on the coordinator, so several communicators can share one coordinator." },
    VarSpec { name: "BRAID_TIMEOUT", ty: "seconds", default: "600",
        doc: "Deadline of every blocking wait of an operation (a silent peer is reported after this long)." },
    VarSpec { name: "BRAID_INIT_TIMEOUT", ty: "seconds", default: "300",
        doc: "Deadline for rendezvous and connection set-up." },
    VarSpec { name: "BRAID_LAZY_CONNECT", ty: "0|1", default: "1",
        doc: "1: a peer is connected at the first operation that exchanges data with it (as NCCL does), so a ring all-reduce on N ranks opens O(N) connections, not O(N²); an all-to-all still connects every pair when it runs. Either side of a pair may need it first, whatever the other side's application is doing: the lower rank dials, and a higher rank asks the lower rank's acceptor to dial it (an authenticated dial-back request; the address dialed comes from the lower rank's own view), so programs that work with connections made at init work the same (a non-blocking operation waiting for its connection holds up no other one, except later ones with the same peer, which keep their order). Errors of connecting name the peer and fail that operation (at most BRAID_TIMEOUT). Applies to the view installed at init (and by create_group/split); a view adopted by update() (elastic groups) connects every pair. 0: every pair is connected at init. Must be equal on all ranks." },
    VarSpec { name: "BRAID_TRANSPORT", ty: "auto|tcp|shm|ib", default: "auto",
        doc: "Transport between ranks. auto: shared memory between ranks with the same host id; between hosts ib (RDMA verbs) where both ends have a usable device, else tcp (a rank without one logs once \"no RDMA device: <reason>\"); tcp, shm or ib forces one (shm between different hosts is an error; ib without a usable device is an error naming the reason)." },
    VarSpec { name: "BRAID_IB_PROVIDER", ty: "verbs|emulated", default: "verbs",
        doc: "NIC behind the ib transport. verbs: rdma-core, through the plugin library libbraid_ibverbs.so, loaded at run time (libbraid itself does not need libibverbs). emulated: braid's userspace NIC over TCP with reliable-connected semantics (rkeys and bounds enforced, RNR, retry errors), a test and demo device that is never chosen unless named here; it is not a speed claim. Must be equal on all ranks." },
    VarSpec { name: "BRAID_IB_DEVICE", ty: "string", default: "",
        doc: "RDMA device name (as ibv_devices lists it, e.g. mlx5_0). Unset: the first device." },
    VarSpec { name: "BRAID_IB_PORT", ty: "integer", default: "1",
        doc: "Port number of the RDMA device (1-based)." },
    VarSpec { name: "BRAID_IB_GID_INDEX", ty: "integer", default: "0",
        doc: "GID table index used for RoCE addressing (see show_gids; RoCE v2 is often 3)." },
    VarSpec { name: "BRAID_IB_TC", ty: "integer", default: "0",
        doc: "Traffic class of the queue pairs (RoCE: DSCP << 2), 0..255." },
    VarSpec { name: "BRAID_IB_QPS_PER_PEER", ty: "integer", default: "2",
        doc: "Data queue pairs per peer connection (1..16); large messages are striped over them in 512 KiB chunks. A connection also has one control queue pair. Peers with different values use the smaller." },
    VarSpec { name: "BRAID_IB_PLUGIN", ty: "path", default: "",
        doc: "Path of the verbs plugin library. Unset: libbraid_ibverbs.so next to libbraid (or the executable, or its parent directory), else the dynamic loader's search path." },
    VarSpec { name: "BRAID_CUDA_DEVICE", ty: "integer", default: "",
        doc: "CUDA device ordinal of this rank for device-buffer calls (one rank per GPU). Unset: LOCAL_RANK (as torchrun sets it) modulo the number of devices, else 0." },
    VarSpec { name: "BRAID_NCCL_LIBRARY", ty: "path", default: "",
        doc: "Path of the NCCL library (libnccl.so.2) used as the engine of device-buffer collectives. Unset: libnccl.so.2, then libnccl.so on the dynamic loader's path, then the nvidia-nccl-cu13 / nvidia-nccl-cu12 pip packages' nvidia/nccl/lib under BRAID_NCCL_DIRS." },
    VarSpec { name: "BRAID_NCCL_DIRS", ty: "paths", default: "",
        doc: "Colon-separated directories searched for libnccl.so.2 after the loader path (the Python package sets it to the nvidia/nccl/lib directories of the installed nvidia-nccl-cu* packages)." },
    VarSpec { name: "BRAID_DEVICE_ENGINE", ty: "auto|nccl|staging", default: "auto",
        doc: "Engine of device-buffer calls. auto: NCCL when every rank has it loaded and a GPU of its own, else staging through pinned host buffers over braid's transports. nccl: NCCL or an error. staging: always staging. Must be equal on all ranks." },
    VarSpec { name: "BRAID_STAGING_CHUNK_BYTES", ty: "bytes", default: "4M",
        doc: "Pipelining unit of the staging engine: device data is copied to and from pinned host buffers in chunks of this size, overlapped with the transport (4K to 1G)." },
    VarSpec { name: "BRAID_SHM_SPIN", ty: "microseconds", default: "20",
        doc: "How long the shared-memory transport spins on its rings before the waiting rank blocks in poll(2) (on top of BRAID_SPIN_US)." },
    VarSpec { name: "BRAID_SHM_RING_BYTES", ty: "bytes", default: "4M",
        doc: "Size of each of the two rings of a shared-memory connection (one connection per same-host peer pair). A multiple of 4K (the page size), 4K to 1G. The connecting rank's value sizes a connection (it creates the segment; the other end reads the size from it), so ranks may differ. Ring pages are allocated as messages first reach them, not up front: a connection costs at most 2 × this per rank of the pair, and an idle one about 12K. Larger messages stream through the ring in pieces." },
    VarSpec { name: "BRAID_SHM_DIRECT", ty: "0|1", default: "1",
        doc: "1: when every rank of a communicator is on one host (shared memory to every peer) copy each byte once, straight out of (or into) the peer's buffer: all-reduce, reduce-scatter, all-gather, broadcast, reduce, all-to-all (not in place), gather and scatter whose buffers lie in memory from Communicator::alloc_shared (braid_mem_alloc), or in private memory through cross-memory attach (BRAID_SHM_CMA); sends of at least the shm ring size from alloc_shared memory. Must be equal on all ranks. 0: always copy through the shm rings." },
    VarSpec { name: "BRAID_SHM_CMA", ty: "auto|0|1", default: "auto",
        doc: "Single-copy collectives (BRAID_SHM_DIRECT) for buffers in ordinary private memory: the kernel copies each byte once with cross-memory attach (process_vm_readv/writev), where the system permits it (same user; not forbidden by seccomp; where refused, a warning is logged once and those buffers use the shm rings). auto: for all-reduce and all-to-all (where it measured faster than the rings on the 2-core reference machine: all-reduce +5-35%, all-to-all +35-50%; the pipelined rings were as fast or faster for the other collectives), and only where peers may attach without braid changing this process's security settings (no Yama, or Yama ptrace_scope 0); with ptrace_scope 1 auto uses the rings and logs once how to enable it. 1: for every single-copy collective, and with Yama ptrace_scope 1 braid calls prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY) (as UCX does), which lets ANY process of this user ptrace this one: opt in only where that is acceptable. 0: never (only buffers from Communicator::alloc_shared are single-copy). May differ between ranks (they agree per call)." },
    VarSpec { name: "BRAID_SHM_DIRECT_MIN", ty: "bytes", default: "1M",
        doc: "Smallest collective (bytes per rank: count × element size) that tries the single-copy path of BRAID_SHM_DIRECT (smaller ones use the rings: the path costs three small handshakes). Must be equal on all ranks." },
    VarSpec { name: "BRAID_TCP_STREAMS", ty: "integer", default: "1",
        doc: "TCP sockets per peer pair; messages of at least BRAID_TCP_STRIPE_MIN bytes are striped over them." },
    VarSpec { name: "BRAID_TCP_STRIPE_MIN", ty: "bytes", default: "262144",
        doc: "Smallest part of a striped TCP message." },
    VarSpec { name: "BRAID_BIND_ADDR", ty: "IP address", default: "",
        doc: "Address this rank listens on for peers. Unset: the local address used to reach the coordinator." },
    VarSpec { name: "BRAID_HOST_ID", ty: "string", default: "",
        doc: "Overrides the host id (ranks with the same host id are on one host). Unset: boot id + hostname." },
    VarSpec { name: "BRAID_CPU_AFFINITY", ty: "CPU list", default: "",
        doc: "CPUs (e.g. `0-3,8`) the communicator's progress thread is pinned to when it starts. Unset: not pinned." },
    VarSpec { name: "BRAID_ALGO", ty: "list", default: "",
        doc: "Forces algorithms, for benchmarking: `ring`, or per collective `all_reduce=recdoubling,broadcast=chain`." },
    VarSpec { name: "BRAID_SMALL_BYTES", ty: "bytes", default: "65536",
        doc: "All-reduce messages up to this size use the latency-optimal algorithm." },
    VarSpec { name: "BRAID_SLICE_BYTES", ty: "bytes", default: "524288",
        doc: "Pipelining unit of ring and chain algorithms (must be equal on all ranks; it is checked)." },
    VarSpec { name: "BRAID_P2P_HOLD_BYTES", ty: "bytes", default: "64M",
        doc: "Point-to-point: a message that arrives while receives wait on its sender, but with a tag none of them wants, is received into a buffer of its own and held for a later receive, up to this many bytes held per communicator. Past that it stays in the connection, and receives behind it wait (until BRAID_TIMEOUT, whose error names the message)." },
    VarSpec { name: "BRAID_SPIN_US", ty: "microseconds", default: "200",
        doc: "How long a waiting rank polls without sleeping before it blocks in poll(2)." },
    VarSpec { name: "BRAID_ELASTIC", ty: "0|1", default: "0",
        doc: "1: the group is elastic. A process that registers while the group is forming becomes an initial rank; one that registers while it runs joins at the next epoch (Communicator::update on the running ranks)." },
    VarSpec { name: "BRAID_MIN_SIZE", ty: "integer", default: "1",
        doc: "Elastic groups: the coordinator publishes no view smaller than this (survivors of a failure wait in update() until joiners make up the size)." },
    VarSpec { name: "BRAID_MAX_SIZE", ty: "integer", default: "",
        doc: "Elastic groups: the coordinator publishes no view larger than this; further joiners wait. Unset: no limit." },
    VarSpec { name: "BRAID_JOIN_WINDOW", ty: "seconds", default: "0.5",
        doc: "Elastic groups: joiners arriving within this window of the first waiting joiner are admitted in one view change." },
    VarSpec { name: "BRAID_HEARTBEAT", ty: "seconds", default: "1",
        doc: "Interval of a member's heartbeats to the coordinator." },
    VarSpec { name: "BRAID_HEARTBEAT_TIMEOUT", ty: "seconds", default: "10",
        doc: "A member silent for this long is declared dead by the coordinator (its id is retired): every group's operations waiting on it fail naming it (an elastic group's next view excludes it). A member that hears nothing from the coordinator for this long fails its operations stuck as long." },
    VarSpec { name: "BRAID_JOB_TOKEN", ty: "string", default: "",
        doc: "Shared secret of the job. Set: registering with the coordinator needs it (HMAC-SHA256 challenge-response; the token never crosses the wire) and data connections between ranks carry a MAC keyed by it. Must be equal for the coordinator and every rank." },
    VarSpec { name: "BRAID_COORDINATOR_STATE", ty: "path", default: "",
        doc: "For a process hosting the coordinator (braid-run, braid-coordinator, rank 0): file where it persists the member-id high-water mark and the views, so a restarted coordinator never reuses an id and members can reconnect." },
    VarSpec { name: "BRAID_WEIGHT", ty: "number", default: "1",
        doc: "This member's relative throughput, published in the view (pipeline planning balances blocks by it)." },
    VarSpec { name: "BRAID_PIPELINE_REPLAN_GAIN", ty: "number", default: "0.1",
        doc: "Elastic pipelines: sent with each stage's step-time report (braid_pipeline_report, Communicator::report_pipeline_metric); the coordinator publishes a view re-weighing the members by their measured throughput when that is predicted to shorten the slowest stage by more than this fraction (0.1: 10%). Must be a positive number." },
    VarSpec { name: "BRAID_PIPELINE_SLOWDOWN", ty: "number", default: "1",
        doc: "Read only by the elastic_pipeline example (integrations/python/examples/elastic_pipeline.py), not by libbraid: that process sleeps so its stage's compute takes this many times as long (>= 1), to show a slow stage losing blocks." },
    VarSpec { name: "BRAID_PS_MODE", ty: "sync|async|bounded:TAU", default: "sync",
        doc: "Push/pull consistency: sync rounds (a round closes when every worker pushed), async (each push applied on arrival), or bounded staleness (no worker more than TAU pushes ahead of the slowest)." },
    VarSpec { name: "BRAID_PS_RULE", ty: "sum|sgd:LR|sgd:lr=LR,momentum=M,wd=WD,rescale=R,clip=C", default: "sum",
        doc: "Push/pull server update rule: sum of the pushes (sync: the round's aggregate), or MXNet's SGD on the gradient (sync: the round's sum; float keys): g = clip(R × gradient) (clip only with C >= 0), without momentum value = (1 - LR × WD) × value - LR × g, with momentum mom = M × mom - LR × WD × value - LR × g, value += mom (a momentum buffer per key, zero at first). sgd:LR is sgd:lr=LR; fields in any order, lr required, defaults momentum 0, wd 0, rescale 1, no clipping. Workers can replace it at run time (KvWorker::set_rule, braid_kv_set_rule)." },
    VarSpec { name: "BRAID_PS_PARTITION_BYTES", ty: "bytes", default: "4M",
        doc: "Push/pull values larger than this are split into parts spread over servers." },
    VarSpec { name: "BRAID_PS_REPLICAS", ty: "integer", default: "1",
        doc: "Extra copies R of every push/pull part on the next servers of the ring; updates are acknowledged once every copy applied them, so any R servers may die at once without losing an acknowledged update; a part all of whose copies died fails its pulls naming the key (README, \"Replication, exactly\")." },
    VarSpec { name: "BRAID_PS_HISTORY", ty: "integer", default: "4",
        doc: "Push/pull servers: completed versions kept per part for readers' snapshot reads, the current one included (1 to 64). Each costs the part's bytes on its server: 1 keeps only the current values (snapshots then retry more often while workers push)." },
    VarSpec { name: "BRAID_PS_PLACEMENT", ty: "equal|bandwidth", default: "equal",
        doc: "bandwidth: each push/pull server measures its reduction bandwidth at start and uses it as its weight on the ring (faster servers own more parts); equal: BRAID_WEIGHT." },
    VarSpec { name: "BRAID_PS_CHECKPOINT_DIR", ty: "path", default: "",
        doc: "Push/pull workers: directory of periodic checkpoints of the servers' state (with BRAID_PS_CHECKPOINT_EVERY; relative to the current directory; every server must reach the same path). The worker with the lowest member id of the view starts one at the start of its push_pull call after every N-th one, once nothing it sent is still queued, and keeps training: each server pins the parts it owns at one version (sync: a round boundary) and writes its file in the background, copying one part at a time under its lock, then that worker writes manifest.json last (temporary name and rename: a crash leaves the previous checkpoint intact) and reports it to the coordinator (braid-coordinator status). Explicit: KvWorker::checkpoint, braid_kv_checkpoint." },
    VarSpec { name: "BRAID_PS_CHECKPOINT_EVERY", ty: "integer", default: "",
        doc: "Push/pull workers: take a periodic checkpoint into BRAID_PS_CHECKPOINT_DIR every this many push_pull rounds (1 or more; both variables or neither)." },
    VarSpec { name: "BRAID_PS_RESTORE", ty: "path", default: "",
        doc: "Push/pull servers: load the checkpoint in this directory at start, with any number of servers (each loads the parts it owns or replicates on the ring of its first view). The manifest and every file are checked (lengths, checksums) before the server registers; a missing, truncated or corrupt file refuses the start with an error naming the file. Start every server of the group with it (a fresh job, or after the old servers left the view) and the same BRAID_PS_PARTITION_BYTES; workers continue from the checkpoint's versions." },
    VarSpec { name: "BRAID_PS_ROLE", ty: "server|worker", default: "",
        doc: "braid-perf push_pull under a launcher: this process's role (default: the first --servers launcher indices are servers)." },
    VarSpec { name: "BRAID_LOG", ty: "filter", default: "warn",
        doc: "Log filter (tracing EnvFilter syntax, e.g. `info` or `braid::net=debug`); logs go to stderr. Read by libbraid, braid-run and braid-coordinator." },
    VarSpec { name: "BRAID_LIBRARY", ty: "path", default: "",
        doc: "Python package only (not read by libbraid): the libbraid.so that `import braid` loads instead of the one installed inside the package." },
    VarSpec { name: "BRAID_PS_SERVERS", ty: "int", default: "0",
        doc: "Python package only (`braid.mxnet`, not read by libbraid): the number of dedicated push/pull server processes (`python -m braid.mxnet.server`) of a `braid_dist_async` job; 0: each worker process runs a server (DMLC_NUM_SERVER is used when unset)." },
    VarSpec { name: "BRAID_PREBUILT_LIB", ty: "path", default: "",
        doc: "Python package build only (`pip install ./integrations/python`): install this libbraid.so instead of building one with cargo." },
    VarSpec { name: "BRAID_CARGO", ty: "path", default: "",
        doc: "Python package build only: the cargo executable that builds libbraid." },
];

/// Variables of other launchers that braid reads when the `BRAID_*` rendezvous variables are
/// unset (torchrun, Open MPI, SLURM). [`var`] accepts these names too.
pub const FOREIGN: &[VarSpec] = &[
    VarSpec { name: "LOCAL_RANK", ty: "integer", default: "",
        doc: "torchrun: this rank's index on its host; picks the CUDA device when BRAID_CUDA_DEVICE is unset." },
    VarSpec { name: "MASTER_ADDR", ty: "host", default: "",
        doc: "torchrun: with MASTER_PORT, the coordinator address when BRAID_COORDINATOR is unset (rank 0 hosts it)." },
    VarSpec { name: "MASTER_PORT", ty: "port", default: "",
        doc: "torchrun: see MASTER_ADDR." },
    VarSpec { name: "RANK", ty: "integer", default: "",
        doc: "torchrun: the rank when BRAID_RANK is unset." },
    VarSpec { name: "WORLD_SIZE", ty: "integer", default: "",
        doc: "torchrun: the number of ranks when BRAID_WORLD_SIZE is unset." },
    VarSpec { name: "OMPI_COMM_WORLD_RANK", ty: "integer", default: "",
        doc: "Open MPI: the rank when BRAID_RANK and RANK are unset." },
    VarSpec { name: "OMPI_COMM_WORLD_SIZE", ty: "integer", default: "",
        doc: "Open MPI: the number of ranks when BRAID_WORLD_SIZE and WORLD_SIZE are unset." },
    VarSpec { name: "SLURM_PROCID", ty: "integer", default: "",
        doc: "SLURM: the rank when no other rank variable is set." },
    VarSpec { name: "SLURM_NTASKS", ty: "integer", default: "",
        doc: "SLURM: the number of ranks when no other size variable is set." },
];

/// Longest duration braid accepts from the environment (about 31 years): larger values are a
/// configuration error, never an overflow in `Duration`/`Instant` arithmetic.
pub const MAX_SECS: f64 = 1e9;
/// Longest spin time (`BRAID_SPIN_US`, `BRAID_SHM_SPIN`) in microseconds (10 s).
pub const MAX_SPIN_US: usize = 10_000_000;
/// Largest pipelining unit (`BRAID_SLICE_BYTES`): 1 GiB.
pub const MAX_SLICE_BYTES: usize = 1 << 30;
/// Largest shm ring (`BRAID_SHM_RING_BYTES`): 1 GiB (the transport's own bound).
pub const MAX_SHM_RING_BYTES: usize = 1 << 30;
/// `BRAID_SHM_RING_BYTES` must be a multiple of this (the page size of x86-64 and most arm64).
const SHM_PAGE: usize = 4096;
/// Largest world size braid accepts (`BRAID_WORLD_SIZE`, `BRAID_MIN_SIZE`, `BRAID_MAX_SIZE`).
pub const MAX_WORLD: usize = 1 << 24;

/// Reads one environment variable through the table: its value when it is set, valid UTF-8 and
/// not empty. Every environment read of braid goes through here (a test scans the sources).
///
/// `name` must be a row of [`VARS`] or [`FOREIGN`]; any other name is refused (`None`, with an
/// error logged), so a variable cannot be read without being documented.
pub fn var(name: &str) -> Option<String> {
    if !VARS.iter().chain(FOREIGN).any(|v| v.name == name) {
        tracing::error!(target: "braid::init", "environment variable {name} is not in braid's configuration table; not read");
        return None;
    }
    match std::env::var_os(name) {
        None => None,
        Some(v) => match v.into_string() {
            Ok(s) if s.is_empty() => None,
            Ok(s) => Some(s),
            Err(_) => {
                tracing::warn!(target: "braid::init", "{name} is not valid UTF-8; ignored");
                None
            }
        },
    }
}

/// Logs a warning for every `BRAID_*` variable of the environment that is not in [`VARS`]
/// (a typo should not silently do nothing). Returns the unknown names.
pub fn warn_unknown_vars() -> Vec<String> {
    let mut unknown = Vec::new();
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("BRAID_") && !VARS.iter().any(|v| v.name == k) {
            tracing::warn!(target: "braid::init", "unknown environment variable {k} (see docs/config.md)");
            unknown.push(k.into_owned());
        }
    }
    unknown
}

/// Which single-copy collectives may use cross-memory attach for private buffers
/// (`BRAID_SHM_CMA`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmaUse {
    /// Never (`0`).
    Never,
    /// All-reduce and all-to-all (`auto`, the default).
    Auto,
    /// Every single-copy collective (`1`).
    All,
}

/// Transport choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// Best available.
    Auto,
    /// TCP only.
    Tcp,
    /// Shared memory only (all ranks on one host).
    Shm,
    /// RDMA verbs only (BRAID_IB_PROVIDER picks the NIC).
    Ib,
}

impl TransportKind {
    /// Parses a BRAID_TRANSPORT value (`auto`, `tcp`, `shm`, `ib`; any case).
    pub fn parse(s: &str) -> Option<TransportKind> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Some(TransportKind::Auto),
            "tcp" => Some(TransportKind::Tcp),
            "shm" => Some(TransportKind::Shm),
            "ib" => Some(TransportKind::Ib),
            _ => None,
        }
    }
}

/// Settings of the ib transport (`BRAID_IB_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IbConfig {
    /// BRAID_IB_PROVIDER is `emulated`.
    pub emulated: bool,
    /// BRAID_IB_DEVICE.
    pub device: Option<String>,
    /// BRAID_IB_PORT.
    pub port: u8,
    /// BRAID_IB_GID_INDEX.
    pub gid_index: u8,
    /// BRAID_IB_TC.
    pub traffic_class: u8,
    /// BRAID_IB_QPS_PER_PEER.
    pub qps_per_peer: usize,
    /// BRAID_IB_PLUGIN.
    pub plugin: Option<std::path::PathBuf>,
}

/// Immutable configuration of one communicator.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Coordinator address.
    pub coordinator: Option<String>,
    /// Whether this process should host the coordinator (torchrun convention, rank 0).
    pub host_coordinator: bool,
    /// Number of ranks.
    pub world_size: Option<usize>,
    /// Requested rank.
    pub rank: Option<usize>,
    /// Rendezvous namespace.
    pub group: String,
    /// Per-operation deadline.
    pub timeout: Duration,
    /// Set-up deadline.
    pub init_timeout: Duration,
    /// Transport.
    pub transport: TransportKind,
    /// Sockets per peer.
    pub tcp_streams: usize,
    /// Smallest stripe.
    pub tcp_stripe_min: usize,
    /// Listen address.
    pub bind_addr: Option<String>,
    /// Host id override.
    pub host_id: Option<String>,
    /// CPUs the progress thread is pinned to (BRAID_CPU_AFFINITY); `None`: not pinned.
    pub cpu_affinity: Option<Vec<u32>>,
    /// Algorithm overrides (raw text of BRAID_ALGO).
    pub algo: String,
    /// Small all-reduce threshold.
    pub small_bytes: usize,
    /// Pipelining unit.
    pub slice_bytes: usize,
    /// Cap on bytes of point-to-point messages held for later receives (BRAID_P2P_HOLD_BYTES).
    pub p2p_hold_bytes: usize,
    /// Spin time before blocking.
    pub spin: Duration,
    /// Spin time of the shared-memory transport before blocking.
    pub shm_spin: Duration,
    /// Bytes of each shm ring of the connections this rank makes (BRAID_SHM_RING_BYTES).
    pub shm_ring_bytes: usize,
    /// Single-copy transfers between same-host ranks from shared regions (BRAID_SHM_DIRECT).
    pub shm_direct: bool,
    /// Peers are connected at their first use, not when a view is installed
    /// (BRAID_LAZY_CONNECT).
    pub lazy_connect: bool,
    /// Single-copy collectives also for private buffers, by cross-memory attach
    /// (BRAID_SHM_CMA).
    pub shm_cma: CmaUse,
    /// Smallest collective (bytes per rank) that tries the single-copy path
    /// (BRAID_SHM_DIRECT_MIN).
    pub shm_direct_min: usize,
    /// Log filter.
    pub log: String,
    /// Elastic group (BRAID_ELASTIC).
    pub elastic: bool,
    /// Smallest view the coordinator publishes (elastic groups).
    pub min_size: usize,
    /// Largest view the coordinator publishes (elastic groups); `None`: no limit.
    pub max_size: Option<usize>,
    /// Batching window for joiners.
    pub join_window: Duration,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Heartbeat timeout.
    pub heartbeat_timeout: Duration,
    /// Shared secret of the job (BRAID_JOB_TOKEN).
    pub job_token: Option<Secret>,
    /// Where a hosted coordinator persists its state.
    pub coordinator_state: Option<std::path::PathBuf>,
    /// This member's weight (pipeline planning).
    pub weight: f64,
    /// Predicted gain above which the coordinator re-weighs a pipeline's members
    /// (BRAID_PIPELINE_REPLAN_GAIN; sent with each pipeline metric report).
    pub pipeline_replan_gain: f64,
    /// The ib transport's settings.
    pub ib: IbConfig,
}

/// A secret string (a job token): compared and used, never printed (`Debug` shows
/// `Secret(..)`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Default for Config {
    fn default() -> Self {
        // The defaults in VARS always parse.
        match Config::from_lookup(|_| None) {
            Ok(c) => c,
            Err(_) => Config {
                coordinator: None,
                host_coordinator: false,
                world_size: None,
                rank: None,
                group: "world".into(),
                timeout: Duration::from_secs(600),
                init_timeout: Duration::from_secs(300),
                transport: TransportKind::Auto,
                tcp_streams: 1,
                tcp_stripe_min: 262144,
                bind_addr: None,
                host_id: None,
                cpu_affinity: None,
                algo: String::new(),
                small_bytes: 65536,
                slice_bytes: 524288,
                p2p_hold_bytes: 64 << 20,
                spin: Duration::from_micros(200),
                shm_spin: Duration::from_micros(20),
                shm_ring_bytes: 4 << 20,
                shm_direct: true,
                lazy_connect: true,
                shm_cma: CmaUse::Auto,
                shm_direct_min: 1 << 20,
                log: "warn".into(),
                elastic: false,
                min_size: 1,
                max_size: None,
                join_window: Duration::from_millis(500),
                heartbeat: Duration::from_secs(1),
                heartbeat_timeout: Duration::from_secs(10),
                job_token: None,
                coordinator_state: None,
                weight: 1.0,
                pipeline_replan_gain: 0.1,
                ib: IbConfig {
                    emulated: false,
                    device: None,
                    port: 1,
                    gid_index: 0,
                    traffic_class: 0,
                    qps_per_peer: 2,
                    plugin: None,
                },
            },
        }
    }
}

fn default_of(name: &str) -> &'static str {
    VARS.iter()
        .find(|v| v.name == name)
        .map(|v| v.default)
        .unwrap_or("")
}

/// Parses a byte size with an optional K/M/G suffix (powers of 1024).
pub fn parse_bytes(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, mul) = match s.chars().last()?.to_ascii_uppercase() {
        'K' => (&s[..s.len() - 1], 1usize << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<usize>().ok()?.checked_mul(mul)
}

/// A duration in seconds from variable `name`: finite, at most [`MAX_SECS`], and positive (or,
/// with `allow_zero`, zero). Never panics (unlike `Duration::from_secs_f64`).
pub fn parse_duration(name: &str, s: &str, allow_zero: bool) -> Result<Duration> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| Error::InvalidArgument(format!("{name}={s}: not a number of seconds")))?;
    let ok = v.is_finite() && v <= MAX_SECS && (v > 0.0 || (allow_zero && v == 0.0));
    let d = if ok {
        Duration::try_from_secs_f64(v).ok()
    } else {
        None
    };
    match d {
        Some(d) if allow_zero || !d.is_zero() => Ok(d),
        _ => Err(Error::InvalidArgument(format!(
            "{name}={s}: must be a number of seconds {} and at most {MAX_SECS:e}",
            if allow_zero { "0 or more" } else { "above 0" }
        ))),
    }
}

fn parse_secs(name: &str, s: &str) -> Result<Duration> {
    parse_duration(name, s, false)
}

fn parse_usize(name: &str, s: &str) -> Result<usize> {
    s.trim()
        .parse()
        .map_err(|_| Error::InvalidArgument(format!("{name}={s}: not a non-negative integer")))
}

/// An integer of variable `name` in `lo..=hi`.
fn parse_in(name: &str, s: &str, lo: usize, hi: usize) -> Result<usize> {
    let v = parse_usize(name, s)?;
    if !(lo..=hi).contains(&v) {
        return Err(Error::InvalidArgument(format!(
            "{name}={s}: expected {lo}..={hi}"
        )));
    }
    Ok(v)
}

fn parse_size(name: &str, s: &str) -> Result<usize> {
    parse_bytes(s).ok_or_else(|| {
        Error::InvalidArgument(format!("{name}={s}: not a byte size (e.g. 4096, 64K, 1M)"))
    })
}

impl Config {
    /// Reads the process environment through [`var`] (warns about unknown `BRAID_*` names,
    /// see [`Config::announce`]).
    ///
    /// Errors: `InvalidArgument` naming the variable for a malformed or out-of-range value.
    pub fn from_env() -> Result<Config> {
        let cfg = Config::from_lookup(var)?;
        cfg.announce();
        Ok(cfg)
    }

    /// Installs the `BRAID_LOG` logger (unless the application has one) and warns about
    /// unknown `BRAID_*` names of the environment (through it, so the warning is seen). Every
    /// path from the environment to a communicator calls it: [`Config::from_env`], the C ABI.
    pub fn announce(&self) {
        init_logging(&self.log);
        warn_unknown_vars();
    }

    /// Builds a configuration from a lookup function (for tests and embedding).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let val = |name: &str| get(name).unwrap_or_else(|| default_of(name).to_string());
        let opt = |name: &str| get(name).filter(|s| !s.is_empty());

        let mut host_coordinator = false;
        let coordinator = match opt("BRAID_COORDINATOR") {
            Some(c) => Some(c),
            None => match (get("MASTER_ADDR"), get("MASTER_PORT")) {
                (Some(a), Some(p)) => {
                    host_coordinator = true; // decided below by rank
                    Some(format!("{a}:{p}"))
                }
                _ => None,
            },
        };
        let world_size = match opt("BRAID_WORLD_SIZE")
            .or_else(|| get("WORLD_SIZE"))
            .or_else(|| get("OMPI_COMM_WORLD_SIZE"))
            .or_else(|| get("SLURM_NTASKS"))
        {
            Some(s) => Some(parse_in("BRAID_WORLD_SIZE", &s, 1, MAX_WORLD)?),
            None => None,
        };
        let rank = match opt("BRAID_RANK")
            .or_else(|| get("RANK"))
            .or_else(|| get("OMPI_COMM_WORLD_RANK"))
            .or_else(|| get("SLURM_PROCID"))
        {
            Some(s) => Some(parse_in("BRAID_RANK", &s, 0, MAX_WORLD - 1)?),
            None => None,
        };
        if let (Some(r), Some(n)) = (rank, world_size) {
            if r >= n {
                return Err(Error::InvalidArgument(format!(
                    "rank {r} is not below the world size {n}"
                )));
            }
        }
        // torchrun convention: rank 0 hosts the coordinator at MASTER_ADDR:MASTER_PORT.
        host_coordinator = host_coordinator && rank == Some(0);

        let transport = TransportKind::parse(&val("BRAID_TRANSPORT")).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "BRAID_TRANSPORT={}: expected auto, tcp, shm or ib",
                val("BRAID_TRANSPORT")
            ))
        })?;
        let ib = IbConfig {
            emulated: match val("BRAID_IB_PROVIDER").to_ascii_lowercase().as_str() {
                "verbs" => false,
                "emulated" => true,
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "BRAID_IB_PROVIDER={other}: expected verbs or emulated"
                    )))
                }
            },
            device: opt("BRAID_IB_DEVICE"),
            port: parse_in("BRAID_IB_PORT", &val("BRAID_IB_PORT"), 1, 255)? as u8,
            gid_index: parse_in("BRAID_IB_GID_INDEX", &val("BRAID_IB_GID_INDEX"), 0, 255)? as u8,
            traffic_class: parse_in("BRAID_IB_TC", &val("BRAID_IB_TC"), 0, 255)? as u8,
            qps_per_peer: parse_in(
                "BRAID_IB_QPS_PER_PEER",
                &val("BRAID_IB_QPS_PER_PEER"),
                1,
                16,
            )?,
            plugin: opt("BRAID_IB_PLUGIN").map(std::path::PathBuf::from),
        };
        let tcp_streams = parse_usize("BRAID_TCP_STREAMS", &val("BRAID_TCP_STREAMS"))?;
        if !(1..=64).contains(&tcp_streams) {
            return Err(Error::InvalidArgument(format!(
                "BRAID_TCP_STREAMS={tcp_streams}: expected 1..=64"
            )));
        }
        let slice_bytes = parse_size("BRAID_SLICE_BYTES", &val("BRAID_SLICE_BYTES"))?;
        if !(4096..=MAX_SLICE_BYTES).contains(&slice_bytes) {
            return Err(Error::InvalidArgument(format!(
                "BRAID_SLICE_BYTES={slice_bytes}: must be 4096 to {MAX_SLICE_BYTES} bytes"
            )));
        }
        let cpu_affinity = match opt("BRAID_CPU_AFFINITY") {
            Some(s) => match crate::topo::parse_cpu_list(&s) {
                Some(cpus) if !cpus.is_empty() => Some(cpus),
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "BRAID_CPU_AFFINITY={s}: expected a CPU list such as 0-3,8"
                    )))
                }
            },
            None => None,
        };
        let spin_us = parse_in("BRAID_SPIN_US", &val("BRAID_SPIN_US"), 0, MAX_SPIN_US)?;
        let shm_spin_us = parse_in("BRAID_SHM_SPIN", &val("BRAID_SHM_SPIN"), 0, MAX_SPIN_US)?;
        let shm_ring_bytes = parse_size("BRAID_SHM_RING_BYTES", &val("BRAID_SHM_RING_BYTES"))?;
        if shm_ring_bytes % SHM_PAGE != 0
            || !(SHM_PAGE..=MAX_SHM_RING_BYTES).contains(&shm_ring_bytes)
        {
            return Err(Error::InvalidArgument(format!(
                "BRAID_SHM_RING_BYTES={}: must be a multiple of 4K (the page size) from 4K to 1G \
                 ({shm_ring_bytes} bytes)",
                val("BRAID_SHM_RING_BYTES")
            )));
        }
        let shm_direct = match val("BRAID_SHM_DIRECT").trim() {
            "0" | "" | "false" | "no" => false,
            "1" | "true" | "yes" => true,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "BRAID_SHM_DIRECT={other}: expected 0 or 1"
                )))
            }
        };
        let lazy_connect = match val("BRAID_LAZY_CONNECT").trim() {
            "0" | "false" | "no" => false,
            "1" | "" | "true" | "yes" => true,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "BRAID_LAZY_CONNECT={other}: expected 0 or 1"
                )))
            }
        };
        let shm_cma = match val("BRAID_SHM_CMA").trim() {
            "0" | "false" | "no" => CmaUse::Never,
            "auto" | "" => CmaUse::Auto,
            "1" | "true" | "yes" => CmaUse::All,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "BRAID_SHM_CMA={other}: expected auto, 0 or 1"
                )))
            }
        };
        let elastic = match val("BRAID_ELASTIC").trim() {
            "0" | "" | "false" | "no" => false,
            "1" | "true" | "yes" => true,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "BRAID_ELASTIC={other}: expected 0 or 1"
                )))
            }
        };
        let min_size = parse_in("BRAID_MIN_SIZE", &val("BRAID_MIN_SIZE"), 0, MAX_WORLD)?.max(1);
        let max_size = match opt("BRAID_MAX_SIZE") {
            Some(s) => Some(parse_in("BRAID_MAX_SIZE", &s, 1, MAX_WORLD)?),
            None => None,
        };
        if let Some(m) = max_size {
            if m < min_size {
                return Err(Error::InvalidArgument(format!(
                    "BRAID_MAX_SIZE={m} is below BRAID_MIN_SIZE={min_size}"
                )));
            }
        }
        let heartbeat = parse_secs("BRAID_HEARTBEAT", &val("BRAID_HEARTBEAT"))?;
        let heartbeat_timeout =
            parse_secs("BRAID_HEARTBEAT_TIMEOUT", &val("BRAID_HEARTBEAT_TIMEOUT"))?;
        if heartbeat_timeout <= heartbeat {
            return Err(Error::InvalidArgument(format!(
                "BRAID_HEARTBEAT_TIMEOUT ({} s) must exceed BRAID_HEARTBEAT ({} s)",
                heartbeat_timeout.as_secs_f64(),
                heartbeat.as_secs_f64()
            )));
        }
        let join_window = parse_duration("BRAID_JOIN_WINDOW", &val("BRAID_JOIN_WINDOW"), true)?;
        let weight: f64 = {
            let s = val("BRAID_WEIGHT");
            match s.trim().parse::<f64>() {
                Ok(w) if w.is_finite() && w > 0.0 => w,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "BRAID_WEIGHT={s}: expected a positive number"
                    )))
                }
            }
        };
        let pipeline_replan_gain: f64 = {
            let s = val("BRAID_PIPELINE_REPLAN_GAIN");
            match s.trim().parse::<f64>() {
                Ok(g) if g.is_finite() && g > 0.0 => g,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "BRAID_PIPELINE_REPLAN_GAIN={s}: expected a positive number"
                    )))
                }
            }
        };
        Ok(Config {
            coordinator,
            host_coordinator,
            world_size,
            rank,
            group: val("BRAID_GROUP"),
            timeout: parse_secs("BRAID_TIMEOUT", &val("BRAID_TIMEOUT"))?,
            init_timeout: parse_secs("BRAID_INIT_TIMEOUT", &val("BRAID_INIT_TIMEOUT"))?,
            transport,
            tcp_streams,
            tcp_stripe_min: parse_size("BRAID_TCP_STRIPE_MIN", &val("BRAID_TCP_STRIPE_MIN"))?
                .max(4096),
            bind_addr: opt("BRAID_BIND_ADDR"),
            host_id: opt("BRAID_HOST_ID"),
            cpu_affinity,
            algo: val("BRAID_ALGO"),
            small_bytes: parse_size("BRAID_SMALL_BYTES", &val("BRAID_SMALL_BYTES"))?,
            slice_bytes,
            p2p_hold_bytes: parse_size("BRAID_P2P_HOLD_BYTES", &val("BRAID_P2P_HOLD_BYTES"))?,
            spin: Duration::from_micros(spin_us as u64),
            shm_spin: Duration::from_micros(shm_spin_us as u64),
            shm_ring_bytes,
            shm_direct,
            lazy_connect,
            shm_cma,
            shm_direct_min: parse_size("BRAID_SHM_DIRECT_MIN", &val("BRAID_SHM_DIRECT_MIN"))?,
            log: val("BRAID_LOG"),
            elastic,
            min_size,
            max_size,
            join_window,
            heartbeat,
            heartbeat_timeout,
            job_token: opt("BRAID_JOB_TOKEN").map(|t| Secret(t.into_bytes())),
            coordinator_state: opt("BRAID_COORDINATOR_STATE").map(std::path::PathBuf::from),
            weight,
            pipeline_replan_gain,
            ib,
        })
    }

    /// The variable table as Markdown (the content of docs/config.md).
    pub fn markdown_table() -> String {
        let mut s = String::from(
            "# braid environment variables\n\n\
             Generated from `core/src/config.rs` (`VARS`); do not edit by hand.\n\n\
             | variable | type | default | meaning |\n|---|---|---|---|\n",
        );
        let row = |s: &mut String, v: &VarSpec| {
            let d = if v.default.is_empty() {
                "(unset)".to_string()
            } else {
                format!("`{}`", v.default)
            };
            s.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                v.name, v.ty, d, v.doc
            ));
        };
        for v in VARS {
            row(&mut s, v);
        }
        s.push_str(
            "\n## Variables of other launchers\n\n\
             Read only when the `BRAID_*` variable they stand in for is unset.\n\n\
             | variable | type | default | meaning |\n|---|---|---|---|\n",
        );
        for v in FOREIGN {
            row(&mut s, v);
        }
        s
    }
}

/// Installs a stderr logger with the `BRAID_LOG` filter, once per process (later calls do
/// nothing; an application's own subscriber wins).
pub fn init_logging(filter: &str) {
    let f = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(f)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_parse() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.timeout, Duration::from_secs(600));
        assert_eq!(c.group, "world");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn torchrun_convention() {
        let c = cfg(&[
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("RANK", "0"),
            ("WORLD_SIZE", "4"),
        ])
        .unwrap();
        assert_eq!(c.coordinator.as_deref(), Some("127.0.0.1:29500"));
        assert!(c.host_coordinator);
        assert_eq!(c.world_size, Some(4));
        let c1 = cfg(&[
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
        ])
        .unwrap();
        assert!(!c1.host_coordinator);
    }

    #[test]
    fn mpi_and_slurm() {
        let c = cfg(&[("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "3")]).unwrap();
        assert_eq!((c.rank, c.world_size), (Some(2), Some(3)));
        let c = cfg(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")]).unwrap();
        assert_eq!((c.rank, c.world_size), (Some(1), Some(2)));
        // BRAID_* wins.
        let c = cfg(&[
            ("SLURM_PROCID", "1"),
            ("BRAID_RANK", "0"),
            ("SLURM_NTASKS", "2"),
        ])
        .unwrap();
        assert_eq!(c.rank, Some(0));
    }

    #[test]
    fn bad_values_are_clear_errors() {
        for (k, v) in [
            ("BRAID_TIMEOUT", "x"),
            ("BRAID_TIMEOUT", "-1"),
            ("BRAID_TRANSPORT", "carrier-pigeon"),
            ("BRAID_LAZY_CONNECT", "sometimes"),
            ("BRAID_IB_PROVIDER", "softroce"),
            ("BRAID_IB_QPS_PER_PEER", "0"),
            ("BRAID_IB_QPS_PER_PEER", "17"),
            ("BRAID_IB_PORT", "0"),
            ("BRAID_IB_TC", "256"),
            ("BRAID_TCP_STREAMS", "0"),
            ("BRAID_SLICE_BYTES", "12Q"),
            ("BRAID_WORLD_SIZE", "0"),
            ("BRAID_CPU_AFFINITY", "3-1"),
            ("BRAID_CPU_AFFINITY", "a,b"),
            ("BRAID_CPU_AFFINITY", ","),
        ] {
            let e = cfg(&[(k, v)]).unwrap_err();
            assert!(
                e.to_string().contains(k) || e.to_string().contains("world size"),
                "{e}"
            );
        }
        assert!(cfg(&[("BRAID_RANK", "4"), ("BRAID_WORLD_SIZE", "4")]).is_err());
    }

    #[test]
    fn durations_from_the_environment_are_validated() {
        // Each of these made Duration::from_secs_f64 panic or overflowed Instant arithmetic.
        for k in [
            "BRAID_TIMEOUT",
            "BRAID_INIT_TIMEOUT",
            "BRAID_HEARTBEAT",
            "BRAID_HEARTBEAT_TIMEOUT",
            "BRAID_JOIN_WINDOW",
        ] {
            for v in [
                "1e30", "1e10", "-1", "-0.5", "NaN", "nan", "inf", "-inf", "infinity", "1e-12", "",
                "x", "1s",
            ] {
                if k == "BRAID_JOIN_WINDOW" && (v.is_empty() || v == "1e-12") {
                    continue; // empty = unset; a window may be (about) 0
                }
                let r = std::panic::catch_unwind(|| cfg(&[(k, v)]));
                let r = r.unwrap_or_else(|_| panic!("{k}={v} panicked"));
                if v.is_empty() {
                    continue;
                }
                let e = r.expect_err(&format!("{k}={v} accepted"));
                assert!(e.to_string().contains(k), "{k}={v}: {e}");
                assert!(matches!(e, Error::InvalidArgument(_)), "{k}={v}: {e:?}");
            }
        }
        // Good values still parse; a join window may be 0.
        let c = cfg(&[("BRAID_TIMEOUT", "1e9"), ("BRAID_JOIN_WINDOW", "0")]).unwrap();
        assert_eq!(c.timeout, Duration::from_secs(1_000_000_000));
        assert_eq!(c.join_window, Duration::ZERO);
        assert_eq!(
            cfg(&[("BRAID_TIMEOUT", "0.25")]).unwrap().timeout,
            Duration::from_millis(250)
        );
        // The parser never panics, whatever the text.
        for v in [
            "1e308",
            "-1e308",
            "4.9e-324",
            "18446744073709551616",
            "0x10",
        ] {
            assert!(
                parse_duration("X", v, true).is_err() || v == "4.9e-324",
                "{v}"
            );
        }
    }

    #[test]
    fn sizes_from_the_environment_are_validated() {
        for (k, v) in [
            ("BRAID_SLICE_BYTES", "2G"),
            ("BRAID_SLICE_BYTES", "18446744073709551615"),
            ("BRAID_SLICE_BYTES", "99999999999G"),
            ("BRAID_SLICE_BYTES", "-1"),
            ("BRAID_SMALL_BYTES", "-4K"),
            ("BRAID_TCP_STRIPE_MIN", "1T"),
            ("BRAID_SHM_DIRECT_MIN", "NaN"),
            ("BRAID_SPIN_US", "18446744073709551615"),
            ("BRAID_SPIN_US", "-1"),
            ("BRAID_SHM_SPIN", "100000000"),
            ("BRAID_WORLD_SIZE", "18446744073709551615"),
            ("BRAID_WORLD_SIZE", "-2"),
            ("BRAID_MIN_SIZE", "99999999999"),
            ("BRAID_MAX_SIZE", "99999999999"),
            ("BRAID_TCP_STREAMS", "65"),
            ("BRAID_RANK", "-1"),
            ("BRAID_RANK", "18446744073709551615"),
            ("BRAID_WEIGHT", "inf"),
            ("BRAID_WEIGHT", "NaN"),
            ("BRAID_WEIGHT", "-1"),
            ("BRAID_PIPELINE_REPLAN_GAIN", "0"),
            ("BRAID_PIPELINE_REPLAN_GAIN", "-0.5"),
            ("BRAID_PIPELINE_REPLAN_GAIN", "inf"),
            ("BRAID_PIPELINE_REPLAN_GAIN", "ten percent"),
        ] {
            let r = std::panic::catch_unwind(|| cfg(&[(k, v)]));
            let e = r
                .unwrap_or_else(|_| panic!("{k}={v} panicked"))
                .expect_err(&format!("{k}={v} accepted"));
            assert!(e.to_string().contains(k), "{k}={v}: {e}");
        }
        let c = cfg(&[("BRAID_SLICE_BYTES", "1G"), ("BRAID_SPIN_US", "0")]).unwrap();
        assert_eq!(c.slice_bytes, 1 << 30);
        assert_eq!(c.spin, Duration::ZERO);
        assert_eq!(c.pipeline_replan_gain, 0.1);
        let c = cfg(&[("BRAID_PIPELINE_REPLAN_GAIN", "0.25")]).unwrap();
        assert_eq!(c.pipeline_replan_gain, 0.25);
    }

    #[test]
    fn shm_ring_bytes() {
        assert_eq!(cfg(&[]).unwrap().shm_ring_bytes, 4 << 20);
        for (v, want) in [
            ("64K", 64 << 10),
            ("4096", 4096),
            ("12K", 12 << 10),
            ("1G", 1 << 30),
        ] {
            assert_eq!(
                cfg(&[("BRAID_SHM_RING_BYTES", v)]).unwrap().shm_ring_bytes,
                want,
                "{v}"
            );
        }
        for v in [
            "0",
            "2048",
            "4097",
            "100000",
            "2G",
            "-4K",
            "lots",
            "18446744073709551615",
        ] {
            let e = cfg(&[("BRAID_SHM_RING_BYTES", v)])
                .expect_err(v)
                .to_string();
            assert!(e.contains("BRAID_SHM_RING_BYTES"), "{v}: {e}");
        }
        let e = cfg(&[("BRAID_SHM_RING_BYTES", "4097")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("multiple of 4K"), "{e}");
    }

    #[test]
    fn var_reads_only_names_in_the_table() {
        // PATH is set in every test environment, but it is not braid's to read.
        assert!(std::env::var_os("PATH").is_some());
        assert_eq!(var("PATH"), None);
        assert_eq!(var("BRAID_NOT_A_VARIABLE"), None);
        // Every row (and every foreign name) is readable.
        for v in VARS.iter().chain(FOREIGN) {
            let _ = var(v.name);
        }
        let names: std::collections::HashSet<_> =
            VARS.iter().chain(FOREIGN).map(|v| v.name).collect();
        assert_eq!(names.len(), VARS.len() + FOREIGN.len(), "duplicate rows");
        assert!(VARS.iter().all(|v| v.name.starts_with("BRAID_")));
    }

    #[test]
    fn cpu_affinity() {
        assert_eq!(cfg(&[]).unwrap().cpu_affinity, None);
        let c = cfg(&[("BRAID_CPU_AFFINITY", "0-3,8")]).unwrap();
        assert_eq!(c.cpu_affinity, Some(vec![0, 1, 2, 3, 8]));
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("8"), Some(8));
        assert_eq!(parse_bytes("64K"), Some(65536));
        assert_eq!(parse_bytes("256M"), Some(256 << 20));
        assert_eq!(parse_bytes("1g"), Some(1 << 30));
        assert_eq!(parse_bytes("M"), None);
    }

    #[test]
    fn docs_are_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/config.md");
        let want = Config::markdown_table();
        if std::env::var("UPDATE_DOCS").is_ok() {
            std::fs::write(path, &want).unwrap();
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "docs/config.md is stale: run UPDATE_DOCS=1 cargo test -p braid config"
        );
    }
}
