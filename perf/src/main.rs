//! `braid-perf`: nccl-tests for braid.
//!
//! ```text
//! braid-perf all_reduce|reduce_scatter|all_gather|broadcast|reduce|all_to_all|gather|scatter|sendrecv
//!     [-b MIN] [-e MAX] [-f FACTOR] [-n ITERS] [-w WARMUP] [-d DTYPE] [-o OP] [-r ROOT]
//!     [--ranks N] [--transport tcp|shm|ib|auto] [-R 0|1] [-G 0|1] [--json FILE] [-v] [--elastic [--duration S]]
//! braid-perf kernels [-b MIN] [-e MAX]     # reduction kernel vs memcpy bandwidth, one process
//! braid-perf topo [--json]                 # this host's topology (hwloc, sysfs fallback)
//! ```
//!
//! `-R 1` (as nccl-tests' `-R`): user buffers are allocated with braid's shared-memory
//! allocator (`Communicator::alloc_shared`), so that same-host ranks copy each byte once,
//! straight out of the peer's buffer; `-R 0` (default): ordinary heap buffers. The header says
//! which were used.
//!
//! `-G 1` (nccl-tests' default: device buffers): buffers are
//! CUDA device memory (cuMemAlloc on the rank's device: `BRAID_CUDA_DEVICE`, else the local
//! rank), and each call is enqueued on the default stream through braid's device engines
//! (NCCL, or staging through pinned host buffers; `BRAID_DEVICE_ENGINE=auto|nccl|staging`).
//! The header names the device, driver and NCCL; `# device engine: ...` follows the table.
//! Without a usable GPU it exits with status 1 at once, printing the reason ("no CUDA driver
//! (libcuda.so.1 not found)").
//!
//! Under a launcher (braid-run, torchrun, mpirun: `BRAID_COORDINATOR`, `MASTER_ADDR`, ... set)
//! each process is one rank. Otherwise `--ranks N` (default 2) starts N local ranks as child
//! processes with an embedded coordinator.
//!
//! Columns follow nccl-tests: `size count type redop root`, then for out-of-place and in-place
//! `time algbw busbw #wrong`. Time is the maximum over ranks of the mean per iteration; #wrong
//! counts elements that differ from the closed-form expected result of a separate checked run.
//! After the table rank 0 prints `# Peak RSS (max over ranks)`, then the machine-readable lines
//! `peak_rss_mib max=X mean=Y ranks=N` (VmHWM of /proc/self/status over ranks) and `init_s=S`
//! (wall time of `Communicator::init`, rendezvous and connection set-up, of the slowest rank).
//!
//! `--elastic --duration S` (elastic groups: run under `braid-run --join/--kill`, or with
//! `BRAID_ELASTIC=1`) loops the collective at one size (`-e` if given, else `-b`) for S seconds, calling
//! `update()` between iterations and recovering from lost peers. Every rank prints
//! `# view epoch=E size=N rank=R` when it starts and on every view change, and rank 0 prints a
//! progress row per second (`time epoch size steps step_us busbw #wrong`). Expected values are
//! computed for the current view, so #wrong stays exact while the size changes. The last line
//! of each rank is `# elastic: steps completed C failed F view changes V epoch E size N
//! #wrong W` (failed: iterations whose collectives failed, e.g. after a peer was lost). A
//! joiner prints `# joined: ...` (join latency) at its first step; after a failure each rank
//! prints `# recovered: ...` at its first completed step. Exit status 0 when no element was
//! wrong.

use std::io::Write;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use braid::config::{parse_bytes, TransportKind};
use braid::membership::Coordinator;
use braid::{Communicator, Config, DataType, Element, ReduceOp};
use half::{bf16, f16};

mod check;
mod device;
mod pushpull;
mod wire;
use check::PerfElem;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coll {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
    Reduce,
    AllToAll,
    Gather,
    Scatter,
    SendRecv,
}

impl Coll {
    fn parse(s: &str) -> Option<Coll> {
        Some(match s {
            "all_reduce" | "allreduce" => Coll::AllReduce,
            "reduce_scatter" | "reducescatter" => Coll::ReduceScatter,
            "all_gather" | "allgather" => Coll::AllGather,
            "broadcast" => Coll::Broadcast,
            "reduce" => Coll::Reduce,
            "all_to_all" | "alltoall" => Coll::AllToAll,
            "gather" => Coll::Gather,
            "scatter" => Coll::Scatter,
            "sendrecv" => Coll::SendRecv,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            Coll::AllReduce => "all_reduce",
            Coll::ReduceScatter => "reduce_scatter",
            Coll::AllGather => "all_gather",
            Coll::Broadcast => "broadcast",
            Coll::Reduce => "reduce",
            Coll::AllToAll => "all_to_all",
            Coll::Gather => "gather",
            Coll::Scatter => "scatter",
            Coll::SendRecv => "sendrecv",
        }
    }
    /// nccl-tests bus bandwidth factor.
    fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Coll::AllReduce => 2.0 * (n - 1.0) / n,
            Coll::ReduceScatter
            | Coll::AllGather
            | Coll::AllToAll
            | Coll::Gather
            | Coll::Scatter => (n - 1.0) / n,
            Coll::Broadcast | Coll::Reduce | Coll::SendRecv => 1.0,
        }
    }
    fn reduces(self) -> bool {
        matches!(self, Coll::AllReduce | Coll::ReduceScatter | Coll::Reduce)
    }
    fn rooted(self) -> bool {
        matches!(
            self,
            Coll::Broadcast | Coll::Reduce | Coll::Gather | Coll::Scatter
        )
    }
    /// Whether `size` counts the whole n-block buffer (count per rank = size / n).
    fn size_is_total(self) -> bool {
        matches!(
            self,
            Coll::ReduceScatter | Coll::AllGather | Coll::AllToAll | Coll::Gather | Coll::Scatter
        )
    }
}

#[derive(Debug, Clone)]
struct Args {
    coll: Coll,
    min: usize,
    max: usize,
    factor: usize,
    iters: usize,
    warmup: usize,
    dtype: DataType,
    op: ReduceOp,
    root: usize,
    ranks: usize,
    transport: Option<String>,
    json: Option<String>,
    verbose: bool,
    /// `--elastic`: loop for `duration` seconds through view changes.
    elastic: bool,
    duration: f64,
    /// `-e` was given.
    max_set: bool,
    /// `-R 1`: buffers from `Communicator::alloc_shared`.
    register: bool,
    /// `-G 1`: CUDA device buffers.
    device: bool,
    raw: Vec<String>,
}

const USAGE: &str = "usage: braid-perf all_reduce|reduce_scatter|all_gather|broadcast|reduce|all_to_all|gather|scatter|sendrecv \
[-b MIN] [-e MAX] [-f FACTOR] [-n ITERS] [-w WARMUP] [-d DTYPE] [-o OP] [-r ROOT] [--ranks N] \
[--transport tcp|shm|ib|auto] [-R 0|1] [-G 0|1] [--json FILE] [-v] [--elastic [--duration SECONDS]]\n       braid-perf kernels [-b MIN] [-e MAX]\n       braid-perf topo [--json]\n       braid-perf push_pull --workers W --servers S [-b MIN] [-e MAX] [-f F] [-n ITERS] [--keys K] [--mode sync|async|bounded:TAU]\n       braid-perf wire_ceiling --workers W --servers S [-b MIN] [-e MAX] [-f F] [-n ITERS] [-w WARMUP]\n\
sizes take K/M/G suffixes; DTYPE: int8 uint8 int16 int32 uint32 int64 uint64 half bfloat16 float double; OP: sum prod min max avg band bor bxor (bitwise: integer DTYPEs)";

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut it = argv.iter();
    let first = it.next().ok_or(USAGE)?;
    let coll =
        Coll::parse(first).ok_or_else(|| format!("unknown collective '{first}'\n{USAGE}"))?;
    let mut a = Args {
        coll,
        min: 32 << 20,
        max: 32 << 20,
        factor: 2,
        iters: 20,
        warmup: 5,
        dtype: DataType::F32,
        op: ReduceOp::Sum,
        root: 0,
        ranks: 2,
        transport: None,
        json: None,
        verbose: false,
        elastic: false,
        duration: 10.0,
        max_set: false,
        register: false,
        device: false,
        raw: argv.to_vec(),
    };
    let mut max_set = false;
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let size = |s: String| parse_bytes(&s).ok_or_else(|| format!("{flag} {s}: not a size"));
        let num = |s: String| {
            s.parse::<usize>()
                .map_err(|_| format!("{flag} {s}: not a number"))
        };
        match flag.as_str() {
            "-b" | "--minbytes" => a.min = size(val()?)?,
            "-e" | "--maxbytes" => {
                a.max = size(val()?)?;
                max_set = true;
            }
            "-f" | "--stepfactor" => a.factor = num(val()?)?,
            "-n" | "--iters" => a.iters = num(val()?)?,
            "-w" | "--warmup_iters" => a.warmup = num(val()?)?,
            "-d" | "--datatype" => {
                let v = val()?;
                a.dtype = DataType::parse(&v).ok_or_else(|| format!("unknown dtype '{v}'"))?
            }
            "-o" | "--op" => {
                let v = val()?;
                a.op = ReduceOp::parse(&v).ok_or_else(|| format!("unknown op '{v}'"))?
            }
            "-r" | "--root" => a.root = num(val()?)?,
            "-R" | "--register" => {
                a.register = match val()?.as_str() {
                    "0" => false,
                    "1" => true,
                    v => return Err(format!("-R {v}: expected 0 or 1")),
                }
            }
            "-G" | "--device" => {
                a.device = match val()?.as_str() {
                    "0" => false,
                    "1" => true,
                    v => return Err(format!("-G {v}: expected 0 or 1")),
                }
            }
            "--ranks" => a.ranks = num(val()?)?,
            "--transport" => {
                let v = val()?;
                if TransportKind::parse(&v).is_none() {
                    return Err(format!("--transport {v}: expected tcp, shm, ib or auto"));
                }
                a.transport = Some(v)
            }
            "--json" => a.json = Some(val()?),
            "-v" | "--verbose" => a.verbose = true,
            "--elastic" => a.elastic = true,
            "--duration" => {
                let v = val()?;
                a.duration = v
                    .parse::<f64>()
                    .ok()
                    .filter(|d| d.is_finite() && *d > 0.0)
                    .ok_or_else(|| {
                        format!("--duration {v}: expected a positive number of seconds")
                    })?;
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown option '{other}'\n{USAGE}")),
        }
    }
    a.max_set = max_set;
    if !max_set && a.max < a.min {
        a.max = a.min;
    }
    if a.min > a.max {
        return Err(format!("-b {} is larger than -e {}", a.min, a.max));
    }
    if a.factor < 2 {
        return Err("-f must be at least 2".into());
    }
    if a.iters == 0 {
        return Err("-n must be at least 1".into());
    }
    if a.ranks == 0 {
        return Err("--ranks must be at least 1".into());
    }
    if a.device && (a.register || a.elastic) {
        return Err("-G 1 cannot be combined with -R 1 or --elastic".into());
    }
    if a.coll.reduces() && !a.op.supports(a.dtype) {
        return Err(format!(
            "-o {} needs an integer datatype, not -d {}",
            a.op, a.dtype
        ));
    }
    Ok(a)
}

fn under_launcher() -> bool {
    [
        "BRAID_COORDINATOR",
        "MASTER_ADDR",
        "OMPI_COMM_WORLD_RANK",
        "SLURM_PROCID",
    ]
    .iter()
    .any(|k| braid::config::var(k).is_some())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(|s| s.as_str()) == Some("kernels") {
        return kernels(&argv[1..]);
    }
    if argv.first().map(|s| s.as_str()) == Some("topo") {
        return topo(&argv[1..]);
    }
    if argv.first().map(|s| s.as_str()) == Some("push_pull") {
        return pushpull::main(&argv[1..]);
    }
    if argv.first().map(|s| s.as_str()) == Some("wire_ceiling") {
        return wire::main(&argv[1..]);
    }
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("braid-perf: {e}");
            return ExitCode::from(2);
        }
    };
    if args.device {
        // Refuse at once, before any rank starts, where there is no GPU to use.
        if let Err(e) = device::describe() {
            eprintln!("braid-perf: {e}");
            return ExitCode::from(1);
        }
    }
    if under_launcher() {
        match run_rank(&args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("braid-perf: {e}");
                ExitCode::from(1)
            }
        }
    } else {
        spawn_local(&args)
    }
}

/// Starts `args.ranks` child processes of this program with an embedded coordinator.
fn spawn_local(args: &Args) -> ExitCode {
    let coord = match Coordinator::bind_with(
        "127.0.0.1:0",
        braid::membership::CoordinatorOptions::from_env(),
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("braid-perf: starting the coordinator: {e}");
            return ExitCode::from(1);
        }
    };
    let addr = coord.local_addr().to_string();
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("braid-perf: {e}");
            return ExitCode::from(1);
        }
    };
    let mut children: Vec<Child> = Vec::new();
    for r in 0..args.ranks {
        let mut cmd = Command::new(&exe);
        cmd.args(&args.raw)
            .env("BRAID_COORDINATOR", &addr)
            .env("BRAID_WORLD_SIZE", args.ranks.to_string())
            .env("BRAID_RANK", r.to_string())
            .stdin(Stdio::null());
        if let Some(t) = &args.transport {
            cmd.env("BRAID_TRANSPORT", t);
        }
        if args.elastic {
            cmd.env("BRAID_ELASTIC", "1");
        }
        if r != 0 {
            cmd.stdout(Stdio::null());
        }
        match cmd.spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                eprintln!("braid-perf: starting rank {r}: {e}");
                for mut c in children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return ExitCode::from(1);
            }
        }
    }
    // Wait for all; if one fails, stop the others.
    let mut status: Vec<Option<std::process::ExitStatus>> = vec![None; children.len()];
    let mut failed = false;
    while status.iter().any(|s| s.is_none()) {
        for (r, c) in children.iter_mut().enumerate() {
            if status[r].is_some() {
                continue;
            }
            if let Ok(Some(s)) = c.try_wait() {
                if !s.success() && !failed {
                    failed = true;
                    eprintln!("braid-perf: rank {r} failed ({s}); stopping the others");
                }
                status[r] = Some(s);
            }
        }
        if failed {
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end && status.iter().any(|s| s.is_none()) {
                for (r, c) in children.iter_mut().enumerate() {
                    if status[r].is_none() {
                        if let Ok(Some(s)) = c.try_wait() {
                            status[r] = Some(s);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            for (r, c) in children.iter_mut().enumerate() {
                if status[r].is_none() {
                    let _ = c.kill();
                    status[r] = c.wait().ok();
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(coord);
    if status
        .iter()
        .all(|s| s.map(|s| s.success()).unwrap_or(false))
    {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    size: usize,
    count: usize,
    dtype: String,
    redop: String,
    root: i64,
    oop_time_us: f64,
    oop_algbw: f64,
    oop_busbw: f64,
    oop_wrong: u64,
    ip_time_us: f64,
    ip_algbw: f64,
    ip_busbw: f64,
    ip_wrong: u64,
}

fn run_rank(args: &Args) -> Result<bool, String> {
    let mut cfg = Config::from_env().map_err(|e| e.to_string())?;
    if let Some(t) = &args.transport {
        cfg.transport = TransportKind::parse(t).unwrap_or(TransportKind::Auto);
    }
    if args.elastic {
        cfg.elastic = true;
        let t_init = Instant::now();
        let comm = Communicator::init_with(cfg).map_err(|e| e.to_string())?;
        return match args.dtype {
            DataType::I8 => elastic::<i8>(comm, args, t_init),
            DataType::U8 => elastic::<u8>(comm, args, t_init),
            DataType::I16 => elastic::<i16>(comm, args, t_init),
            DataType::I32 => elastic::<i32>(comm, args, t_init),
            DataType::U32 => elastic::<u32>(comm, args, t_init),
            DataType::I64 => elastic::<i64>(comm, args, t_init),
            DataType::U64 => elastic::<u64>(comm, args, t_init),
            DataType::F16 => elastic::<f16>(comm, args, t_init),
            DataType::BF16 => elastic::<bf16>(comm, args, t_init),
            DataType::F32 => elastic::<f32>(comm, args, t_init),
            DataType::F64 => elastic::<f64>(comm, args, t_init),
        };
    }
    let t_init = Instant::now();
    let comm = Communicator::init_with(cfg).map_err(|e| e.to_string())?;
    let init_s = t_init.elapsed().as_secs_f64();
    let rows = match args.dtype {
        DataType::I8 => bench::<i8>(&comm, args),
        DataType::U8 => bench::<u8>(&comm, args),
        DataType::I16 => bench::<i16>(&comm, args),
        DataType::I32 => bench::<i32>(&comm, args),
        DataType::U32 => bench::<u32>(&comm, args),
        DataType::I64 => bench::<i64>(&comm, args),
        DataType::U64 => bench::<u64>(&comm, args),
        DataType::F16 => bench::<f16>(&comm, args),
        DataType::BF16 => bench::<bf16>(&comm, args),
        DataType::F32 => bench::<f32>(&comm, args),
        DataType::F64 => bench::<f64>(&comm, args),
    }
    .map_err(|e| format!("rank {}: {e}", comm.rank()))?;
    let wrong: u64 = rows.iter().map(|r| r.oop_wrong + r.ip_wrong).sum();
    // Peak memory over ranks (max and sum), and the slowest rank's init time.
    let rss = [peak_rss_kib()];
    let mut rss_max = [0u64];
    comm.all_reduce(&rss, &mut rss_max, ReduceOp::Max)
        .map_err(|e| e.to_string())?;
    let mut rss_sum = [0u64];
    comm.all_reduce(&rss, &mut rss_sum, ReduceOp::Sum)
        .map_err(|e| e.to_string())?;
    let mut init_max = [0f64];
    comm.all_reduce(&[init_s], &mut init_max, ReduceOp::Max)
        .map_err(|e| e.to_string())?;
    if comm.rank() == 0 {
        let avg = if rows.is_empty() {
            0.0
        } else {
            rows.iter()
                .map(|r| (r.oop_busbw + r.ip_busbw) / 2.0)
                .sum::<f64>()
                / rows.len() as f64
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "# Out of bounds values : {wrong} {}",
            if wrong == 0 { "OK" } else { "FAILED" }
        );
        let _ = writeln!(out, "# Avg bus bandwidth    : {avg:.3}");
        let _ = writeln!(
            out,
            "# Peak RSS (max over ranks) : {:.1} MiB",
            rss_max[0] as f64 / 1024.0
        );
        // Machine-readable: peak RSS (VmHWM) per rank, and Communicator::init's wall time
        // (rendezvous and connection set-up) of the slowest rank.
        let _ = writeln!(
            out,
            "peak_rss_mib max={:.1} mean={:.1} ranks={}",
            rss_max[0] as f64 / 1024.0,
            rss_sum[0] as f64 / 1024.0 / comm.size().max(1) as f64,
            comm.size()
        );
        let _ = writeln!(out, "init_s={:.3}", init_max[0]);
        if let Some(path) = &args.json {
            let doc = serde_json::json!({
                "collective": args.coll.name(),
                "ranks": comm.size(),
                "transport": comm.transport_name(),
                "dtype": args.dtype.name(),
                "op": args.op.name(),
                "iters": args.iters,
                "warmup": args.warmup,
                "rows": rows,
                "wrong": wrong,
                "avg_busbw": avg,
                "peak_rss_kib": rss_max[0],
                "peak_rss_mean_kib": rss_sum[0] / comm.size().max(1) as u64,
                "init_s": init_max[0],
            });
            if let Err(e) =
                std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
            {
                eprintln!("braid-perf: writing {path}: {e}");
            }
        }
    }
    if args.verbose {
        let kinds = comm.peer_transports();
        let mut s = format!("# rank {} bytes per peer:", comm.rank());
        for (p, tx, rx) in comm.bytes_per_peer() {
            let t = kinds
                .iter()
                .find(|(r, _)| *r == p)
                .map(|(_, t)| *t)
                .unwrap_or("?");
            s.push_str(&format!(" [peer {p} via {t}: sent {tx} recv {rx}]"));
        }
        s.push_str(&format!(" single-copy read {}", comm.direct_bytes()));
        eprintln!("{s}");
    }
    Ok(wrong == 0)
}

/// Buffers and sizes of one view in the elastic loop.
struct ElasticBufs<T: Element> {
    n: usize,
    rank: usize,
    per: usize,
    size_eff: usize,
    root: usize,
    b: Bufs<T>,
}

fn elastic_bufs<T: PerfElem>(comm: &Communicator, a: &Args) -> ElasticBufs<T> {
    let (n, rank) = (comm.size(), comm.rank());
    let es = T::DTYPE.size();
    // One size: -e if given, else -b.
    let size = if a.max_set { a.max } else { a.min };
    let unit = if a.coll.size_is_total() { es * n } else { es };
    let size_eff = (size / unit) * unit;
    let total = size_eff / es;
    let per = if a.coll.size_is_total() {
        total / n
    } else {
        total
    };
    let root = a.root.min(n - 1);
    let b = check::buffers::<T>(a.coll_kind(), n, rank, per, root, false, a.op);
    let b = match place(comm, a, b) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("braid-perf: -R 1: {e}; using heap buffers");
            check::buffers::<T>(a.coll_kind(), n, rank, per, root, false, a.op)
        }
    };
    ElasticBufs {
        n,
        rank,
        per,
        size_eff,
        root,
        b,
    }
}

fn view_line(comm: &Communicator) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "# view epoch={} size={} rank={}",
        comm.view().epoch,
        comm.size(),
        comm.rank()
    );
    let _ = out.flush();
}

/// The `--elastic` loop (see the module docs).
fn elastic<T: PerfElem>(mut comm: Communicator, a: &Args, t_init: Instant) -> Result<bool, String> {
    let start = Instant::now();
    // A joiner (admitted into a running group) reports its join latency at its first step.
    let mut joined = (comm.view().epoch > 1).then_some(start.duration_since(t_init));
    // When a step failed: recovery is reported at the first step completed afterwards.
    let mut failed_at: Option<Instant> = None;
    let mut completed = 0u64;
    let mut failed = 0u64;
    let mut changes = 0u64;
    let mut wrong_total = 0u64;
    // Shared state handed to joiners: the job's step count.
    let mut state = [0u64];
    comm.sync_from_oldest(&mut state)
        .map_err(|e| format!("initial sync: {e}"))?;
    view_line(&comm);
    let mut eb = elastic_bufs::<T>(&comm, a);
    let mut last_print = Instant::now();
    let mut window = (0u64, 0.0f64, 0u64); // steps, seconds, wrong since the last print
    let mut normal_step_s: Vec<f64> = Vec::new();
    loop {
        let t0 = Instant::now();
        let mut ok = true;
        // 1. The step, checked against the current view.
        let a2 = Args {
            root: eb.root,
            ..a.clone()
        };
        match call(&comm, &a2, &mut eb.b, false) {
            Ok(()) => {
                let w = check::count_wrong(
                    a.coll_kind(),
                    eb.n,
                    eb.rank,
                    eb.per,
                    eb.root,
                    false,
                    a.op,
                    &eb.b.recv,
                );
                wrong_total += w;
                window.2 += w;
                completed += 1;
                state[0] += 1;
                if let Some(adm) = joined.take() {
                    println!(
                        "# joined: admitted {:.1} ms after registering, first collective completed {:.1} ms after registering",
                        adm.as_secs_f64() * 1e3,
                        t_init.elapsed().as_secs_f64() * 1e3
                    );
                }
                if let Some(f) = failed_at.take() {
                    println!(
                        "# recovered: first collective in epoch {} (size {}) completed {:.1} ms after the failure was seen",
                        comm.view().epoch,
                        comm.size(),
                        f.elapsed().as_secs_f64() * 1e3
                    );
                }
            }
            Err(e) => {
                failed += 1;
                ok = false;
                failed_at.get_or_insert_with(Instant::now);
                eprintln!("# step failed (epoch {}): {e}", comm.view().epoch);
            }
        }
        let step_s = t0.elapsed().as_secs_f64();
        // 2. Stop together: the first rank whose time is up stops everyone.
        let mut stop = false;
        if ok {
            let mut f = [u8::from(start.elapsed().as_secs_f64() >= a.duration)];
            match comm.all_reduce_inplace(&mut f, ReduceOp::Max) {
                Ok(()) => stop = f[0] == 1,
                Err(e) => {
                    failed += 1;
                    failed_at.get_or_insert_with(Instant::now);
                    eprintln!("# control all-reduce failed: {e}");
                }
            }
        }
        if stop {
            break;
        }
        // 3. Adopt a new view if there is one.
        let tu = Instant::now();
        match comm.update() {
            Ok(true) => {
                changes += 1;
                if comm.has_left() {
                    break;
                }
                comm.sync_from_oldest(&mut state)
                    .map_err(|e| format!("sync after the view change: {e}"))?;
                let switch = step_s + tu.elapsed().as_secs_f64();
                view_line(&comm);
                normal_step_s.sort_by(f64::total_cmp);
                let median = normal_step_s.get(normal_step_s.len() / 2).copied();
                if comm.rank() == 0 {
                    println!(
                        "# switch to epoch {}: step + update took {:.3} ms (median step before: {})",
                        comm.view().epoch,
                        switch * 1e3,
                        median.map_or("n/a".to_string(), |m| format!("{:.3} ms", m * 1e3))
                    );
                }
                normal_step_s.clear();
                eb = elastic_bufs::<T>(&comm, a);
            }
            Ok(false) => {
                if ok {
                    normal_step_s.push(step_s + tu.elapsed().as_secs_f64());
                    if normal_step_s.len() > 4096 {
                        normal_step_s.drain(..2048);
                    }
                }
            }
            Err(e) => {
                return Err(format!(
                    "member {}: update failed: {e} (steps completed {completed}, failed {failed})",
                    comm.member_id()
                ))
            }
        }
        if ok {
            window.0 += 1;
            window.1 += step_s;
        }
        if comm.rank() == 0 && last_print.elapsed() >= Duration::from_secs(1) {
            let us = if window.0 > 0 {
                window.1 / window.0 as f64 * 1e6
            } else {
                0.0
            };
            let busbw = if us > 0.0 {
                eb.size_eff as f64 / us / 1e3 * a.coll.bus_factor(eb.n)
            } else {
                0.0
            };
            println!(
                "  {:>7.1} epoch {:>4} size {:>4} steps {:>8} step_us {:>10.2} busbw {:>8.3} #wrong {}",
                start.elapsed().as_secs_f64(),
                comm.view().epoch,
                eb.n,
                state[0],
                us,
                busbw,
                window.2
            );
            window = (0, 0.0, 0);
            last_print = Instant::now();
        }
    }
    println!(
        "# elastic: steps completed {completed} failed {failed} view changes {changes} epoch {} size {} #wrong {wrong_total}",
        comm.view().epoch,
        comm.size()
    );
    Ok(wrong_total == 0)
}

/// The sizes a sweep runs: `min`, then each times `factor` (capped at `max`), up to `max`
/// (`factor` at least 2: every caller checks it).
pub(crate) fn size_steps(min: usize, max: usize, factor: usize) -> Vec<usize> {
    let mut out = vec![min];
    let mut size = min;
    while size < max {
        size = size.saturating_mul(factor).min(max);
        out.push(size);
    }
    out
}

pub(crate) fn peak_rss_kib() -> u64 {
    proc_status_kib("VmHWM:")
}

/// This process's resident memory now, KiB.
pub(crate) fn rss_kib() -> u64 {
    proc_status_kib("VmRSS:")
}

fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// A benchmark buffer: heap memory, or braid shared memory (`-R 1`).
enum Mem<T: Element> {
    Heap(Vec<T>),
    Shared(braid::SharedBuf<T>),
}

impl<T: Element> std::ops::Deref for Mem<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Mem::Heap(v) => v,
            Mem::Shared(s) => s,
        }
    }
}

impl<T: Element> std::ops::DerefMut for Mem<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            Mem::Heap(v) => v,
            Mem::Shared(s) => s,
        }
    }
}

struct Bufs<T: Element> {
    send: Mem<T>,
    recv: Mem<T>,
}

/// With `-R 1`, moves the buffers into braid shared memory (empty ones stay as they are).
fn place<T: PerfElem>(comm: &Communicator, a: &Args, b: Bufs<T>) -> braid::Result<Bufs<T>> {
    if !a.register {
        return Ok(b);
    }
    let move_in = |m: Mem<T>| -> braid::Result<Mem<T>> {
        if m.is_empty() {
            return Ok(m);
        }
        let mut s = comm.alloc_shared::<T>(m.len())?;
        s.copy_from_slice(&m);
        Ok(Mem::Shared(s))
    };
    Ok(Bufs {
        send: move_in(b.send)?,
        recv: move_in(b.recv)?,
    })
}

/// Runs one call of the collective (out-of-place or in-place).
fn call<T: PerfElem>(
    comm: &Communicator,
    a: &Args,
    b: &mut Bufs<T>,
    inplace: bool,
) -> braid::Result<()> {
    let (n, r) = (comm.size(), comm.rank());
    match (a.coll, inplace) {
        (Coll::AllReduce, false) => comm.all_reduce(&b.send, &mut b.recv, a.op),
        (Coll::AllReduce, true) => comm.all_reduce_inplace(&mut b.recv, a.op),
        (Coll::ReduceScatter, false) => comm.reduce_scatter(&b.send, &mut b.recv, a.op),
        (Coll::ReduceScatter, true) => comm.reduce_scatter_inplace(&mut b.recv, a.op),
        (Coll::AllGather, false) => comm.all_gather(&b.send, &mut b.recv),
        (Coll::AllGather, true) => comm.all_gather_inplace(&mut b.recv),
        (Coll::Broadcast, false) => comm.broadcast_from(&b.send, &mut b.recv, a.root),
        (Coll::Broadcast, true) => comm.broadcast(&mut b.recv, a.root),
        (Coll::Reduce, false) => comm.reduce(&b.send, &mut b.recv, a.op, a.root),
        (Coll::Reduce, true) => comm.reduce_inplace(&mut b.recv, a.op, a.root),
        (Coll::AllToAll, false) => comm.all_to_all(&b.send, &mut b.recv),
        (Coll::AllToAll, true) => comm.all_to_all_inplace(&mut b.recv),
        (Coll::Gather, false) => comm.gather(&b.send, &mut b.recv, a.root),
        (Coll::Gather, true) => comm.gather_inplace(&mut b.recv, a.root),
        (Coll::Scatter, false) => comm.scatter(&b.send, &mut b.recv, a.root),
        (Coll::Scatter, true) => comm.scatter_inplace(&mut b.recv, a.root),
        (Coll::SendRecv, _) => {
            if n == 1 {
                if inplace {
                    let half = b.recv.len() / 2;
                    b.recv.copy_within(..half, half);
                } else {
                    b.recv.copy_from_slice(&b.send);
                }
                return Ok(());
            }
            let next = (r + 1) % n;
            let prev = (r + n - 1) % n;
            if inplace {
                // "In-place" sendrecv: receive into a second half of the same allocation.
                let half = b.recv.len() / 2;
                let (s, d) = b.recv.split_at_mut(half);
                comm.group().send(s, next, 0)?.recv(d, prev, 0)?.run()
            } else {
                comm.group()
                    .send(&b.send, next, 0)?
                    .recv(&mut b.recv, prev, 0)?
                    .run()
            }
        }
    }
}

fn bench<T: PerfElem>(comm: &Communicator, a: &Args) -> braid::Result<Vec<Row>> {
    let (n, rank) = (comm.size(), comm.rank());
    let es = T::DTYPE.size();
    if a.coll.rooted() && a.root >= n {
        return Err(braid::Error::InvalidArgument(format!(
            "-r {} is not a rank (ranks: {n})",
            a.root
        )));
    }
    if rank == 0 {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "# braid-perf {}: {n} ranks, transport {}, dtype {}, op {}, iters {}, warmup {}",
            a.coll.name(),
            comm.transport_name(),
            a.dtype,
            if a.coll.reduces() {
                a.op.name()
            } else {
                "none"
            },
            a.iters,
            a.warmup
        );
        if a.device {
            device::header(&mut out);
        } else {
            let _ = writeln!(
                out,
                "# buffers: {}",
                if a.register {
                    "registered (-R 1: braid shared memory, Communicator::alloc_shared)"
                } else {
                    "heap (-R 0)"
                }
            );
        }
        let _ = writeln!(out, "#");
        let _ = writeln!(
            out,
            "# {:>10} {:>12} {:>8} {:>6} {:>6} {:>10} {:>8} {:>8} {:>6} {:>10} {:>8} {:>8} {:>6}",
            "", "", "", "", "", "out-of-place", "", "", "", "in-place", "", "", ""
        );
        let _ = writeln!(
            out,
            "# {:>10} {:>12} {:>8} {:>6} {:>6} {:>10} {:>8} {:>8} {:>6} {:>10} {:>8} {:>8} {:>6}",
            "size",
            "count",
            "type",
            "redop",
            "root",
            "time",
            "algbw",
            "busbw",
            "#wrong",
            "time",
            "algbw",
            "busbw",
            "#wrong"
        );
        let _ = writeln!(
            out,
            "# {:>10} {:>12} {:>8} {:>6} {:>6} {:>10} {:>8} {:>8} {:>6} {:>10} {:>8} {:>8} {:>6}",
            "(B)",
            "(elements)",
            "",
            "",
            "",
            "(us)",
            "(GB/s)",
            "(GB/s)",
            "",
            "(us)",
            "(GB/s)",
            "(GB/s)",
            ""
        );
    }
    let mut rows = Vec::new();
    for size in size_steps(a.min, a.max, a.factor) {
        // Elements per rank-block and total.
        let unit = if a.coll.size_is_total() { es * n } else { es };
        let size_eff = (size / unit) * unit;
        let total = size_eff / es;
        let per = if a.coll.size_is_total() {
            total / n
        } else {
            total
        };
        let mut res = [(0.0f64, 0u64); 2];
        if a.device {
            res = device::measure::<T>(comm, a, per)?;
        }
        for (k, inplace) in [false, true].into_iter().enumerate().filter(|_| !a.device) {
            let b = check::buffers::<T>(a.coll_kind(), n, rank, per, a.root, inplace, a.op);
            let mut b = place(comm, a, b)?;
            for _ in 0..a.warmup {
                call(comm, a, &mut b, inplace)?;
            }
            comm.barrier()?;
            let t0 = Instant::now();
            for _ in 0..a.iters {
                call(comm, a, &mut b, inplace)?;
            }
            let mean_us = t0.elapsed().as_secs_f64() * 1e6 / a.iters as f64;
            // Checked run on fresh inputs (the timed buffers are freed first, so peak RSS
            // shows the library's own memory on top of one set of buffers).
            drop(b);
            let b = check::buffers::<T>(a.coll_kind(), n, rank, per, a.root, inplace, a.op);
            let mut b = place(comm, a, b)?;
            call(comm, a, &mut b, inplace)?;
            let wrong =
                check::count_wrong(a.coll_kind(), n, rank, per, a.root, inplace, a.op, &b.recv);
            let t = [mean_us];
            let mut tmax = [0.0f64];
            comm.all_reduce(&t, &mut tmax, ReduceOp::Max)?;
            let w = [wrong];
            let mut wsum = [0u64];
            comm.all_reduce(&w, &mut wsum, ReduceOp::Sum)?;
            res[k] = (tmax[0], wsum[0]);
        }
        let algbw = |t: f64| {
            if t > 0.0 {
                size_eff as f64 / t / 1e3
            } else {
                0.0
            }
        };
        let f = a.coll.bus_factor(n);
        let row = Row {
            size: size_eff,
            count: total,
            dtype: a.dtype.name().into(),
            redop: if a.coll.reduces() {
                a.op.name().into()
            } else {
                "none".into()
            },
            root: if a.coll.rooted() { a.root as i64 } else { -1 },
            oop_time_us: res[0].0,
            oop_algbw: algbw(res[0].0),
            oop_busbw: algbw(res[0].0) * f,
            oop_wrong: res[0].1,
            ip_time_us: res[1].0,
            ip_algbw: algbw(res[1].0),
            ip_busbw: algbw(res[1].0) * f,
            ip_wrong: res[1].1,
        };
        if rank == 0 {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "  {:>10} {:>12} {:>8} {:>6} {:>6} {:>10.2} {:>8.3} {:>8.3} {:>6} {:>10.2} {:>8.3} {:>8.3} {:>6}",
                row.size, row.count, row.dtype, row.redop, row.root,
                row.oop_time_us, row.oop_algbw, row.oop_busbw, row.oop_wrong,
                row.ip_time_us, row.ip_algbw, row.ip_busbw, row.ip_wrong
            );
            let _ = out.flush();
        }
        rows.push(row);
    }
    if a.device && rank == 0 {
        device::footer(comm, &mut std::io::stdout().lock());
    }
    Ok(rows)
}

impl Args {
    fn coll_kind(&self) -> check::Kind {
        match self.coll {
            Coll::AllReduce => check::Kind::AllReduce,
            Coll::ReduceScatter => check::Kind::ReduceScatter,
            Coll::AllGather => check::Kind::AllGather,
            Coll::Broadcast => check::Kind::Broadcast,
            Coll::Reduce => check::Kind::Reduce,
            Coll::AllToAll => check::Kind::AllToAll,
            Coll::Gather => check::Kind::Gather,
            Coll::Scatter => check::Kind::Scatter,
            Coll::SendRecv => check::Kind::SendRecv,
        }
    }
}

/// `braid-perf kernels`: reduction kernel bandwidth against memcpy, in one process.
fn kernels(argv: &[String]) -> ExitCode {
    let mut min = 1usize << 20;
    let mut max = 256usize << 20;
    let mut it = argv.iter();
    while let Some(f) = it.next() {
        let v = it.next().and_then(|s| parse_bytes(s));
        match (f.as_str(), v) {
            ("-b", Some(v)) => min = v,
            ("-e", Some(v)) => max = v,
            _ => {
                eprintln!("usage: braid-perf kernels [-b MIN] [-e MAX]");
                return ExitCode::from(2);
            }
        }
    }
    println!("# reduction kernel (f32 sum, acc += b: 3 bytes moved per byte) vs memcpy (2 bytes moved per byte), single thread");
    println!(
        "# {:>10} {:>14} {:>14} {:>8}",
        "size(B)", "reduce(GB/s)", "memcpy(GB/s)", "ratio"
    );
    let mut size = min.max(4096);
    loop {
        let iters = ((1usize << 30) / size).clamp(3, 200);
        let red = braid::reduce::bench_bandwidth(size, iters);
        let cp = memcpy_bw(size, iters);
        println!(
            "  {:>10} {:>14.2} {:>14.2} {:>8.2}",
            size,
            red,
            cp,
            if cp > 0.0 { red / cp } else { 0.0 }
        );
        if size >= max {
            break;
        }
        size = (size * 4).min(max);
    }
    ExitCode::SUCCESS
}

/// `braid-perf topo [--json]`: this host's topology as text, or as JSON with `--json`.
fn topo(argv: &[String]) -> ExitCode {
    let json = match argv {
        [] => false,
        [f] if f == "--json" => true,
        _ => {
            eprintln!("usage: braid-perf topo [--json]");
            return ExitCode::from(2);
        }
    };
    // The hwloc fallback warning goes to stderr (BRAID_LOG filter).
    let log = Config::from_env().map_or_else(|_| "warn".to_string(), |c| c.log);
    braid::config::init_logging(&log);
    let t = braid::topo::discover();
    let text = if json {
        match serde_json::to_string_pretty(&t) {
            Ok(s) => s + "\n",
            Err(e) => {
                eprintln!("braid-perf topo: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        t.to_string()
    };
    // A closed pipe (`| head`) is not worth a panic.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

fn memcpy_bw(bytes: usize, iters: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src);
    let t = Instant::now();
    for _ in 0..iters {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    let s = t.elapsed().as_secs_f64();
    (2 * bytes * iters) as f64 / s / 1e9
}

#[allow(dead_code)]
fn _assert_elements() {
    fn is<T: Element>() {}
    is::<f16>();
    is::<bf16>();
}
