//! `braid-perf push_pull`: parameter-server throughput and round latency, with all_reduce of
//! the same bytes over the same workers in the same run.
//!
//! ```text
//! braid-perf push_pull --workers W --servers S [-b MIN] [-e MAX] [-f FACTOR] [-n ITERS]
//!     [-w WARMUP] [--keys K] [--mode sync|async|bounded:TAU] [--transport tcp|shm|auto]
//!     [--replicas R] [--partition BYTES] [--api blocking|raw|each]
//! braid-perf push_pull --drill --workers W --servers S [--rounds N] [--duration S] [--pace MS]
//!     [--len ELEMS] [--keys K] [--report N] [--join-role server|worker] [--bad-input]
//!     [--op-timeout S] [--mode ...] [--replicas R] [--partition BYTES]
//! braid-perf push_pull --ckpt-bench DIR --workers W --servers S [--state BYTES] [-b BYTES]
//!     [--rounds N] [--ckpt-every N] [--mode ...] [--replicas R] [--partition BYTES]
//! ```
//!
//! `--ckpt-bench` measures checkpoints of the servers' state (see `ckpt_bench`): `--state`
//! bytes (default 1 GiB) in keys of one partition each, training rounds that push_pull `-b`
//! bytes per worker (default 16 MiB), a periodic checkpoint into DIR every `--ckpt-every`
//! rounds (default 20) while training goes on; it prints round times without and during a
//! checkpoint, the checkpoint's time, the longest server copy (the time a server's state lock
//! was held) and write, and the time to check the checkpoint as a restore does.
//!
//! `--drill` is the fault-drill loop (see `drill` below: rounds on fixed keys, no all_reduce
//! communicator, checks that detect a lost acknowledged update); under `braid-run --join`,
//! `--join-role server` makes the joiners (launcher index from `BRAID_WORLD_SIZE` on) servers.
//!
//! Without a launcher it starts W + S local processes of itself (servers first) with an
//! embedded coordinator; under `braid-run` a process with `BRAID_RUN_INDEX` below S (or
//! `BRAID_PS_ROLE=server`) is a server, the others workers. SIZE is the bytes each worker
//! pushes per round (f32), spread over K keys (default 8; parts of at most the partition size
//! go to servers by consistent hashing). A round is one `push_pull` of all keys per worker.
//! Columns: `size count keys` then push/pull `round_us` (max over workers of the mean),
//! `pp_GB/s` (bytes pushed + pulled per worker per second), `agg_GB/s` (× workers), `#wrong`
//! (sync: every round's aggregate is checked exactly; async/bounded: the final value after all
//! rounds), then all_reduce of SIZE bytes over the W workers: `ar_us`, `ar_busbw`. `--api raw`
//! runs the rounds through the non-blocking `push_pull_raw` and its handle's `wait` (the path
//! of the C ABI's braid_kv_push_pull + braid_kv_wait) instead of the blocking
//! `push_pull_into`; the header line then ends with `, api raw`. `--api each` runs them
//! through `push_pull_into_each`, every key its own slice of the buffers (the path of the C
//! ABI's braid_kv_push_pull_waitv, which `braid.kv`'s `push_pull_wait` of a key list takes);
//! the header line then ends with `, api each`.

use std::io::Write;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use braid::config::parse_bytes;
use braid::membership::Coordinator;
use braid::ps::{Consistency, KvServer, KvWorker, PsOptions};
use braid::{Communicator, Config, ReduceOp};

struct Args {
    workers: usize,
    servers: usize,
    min: usize,
    max: usize,
    factor: usize,
    iters: usize,
    warmup: usize,
    keys: usize,
    mode: Option<String>,
    transport: Option<String>,
    replicas: Option<String>,
    partition: Option<String>,
    drill: Drill,
    /// `--ckpt-bench DIR`.
    ckpt_dir: Option<String>,
    /// `--state BYTES` (checkpoint bench).
    state: usize,
    /// `--ckpt-every N` (checkpoint bench).
    ckpt_every: u64,
    /// `--api`: which worker call runs the rounds.
    api: Api,
}

/// The worker call a round goes through (`--api`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    /// The blocking `push_pull_into` of every key at once (one buffer).
    Blocking,
    /// The non-blocking `push_pull_raw` + `wait` (the C ABI's braid_kv_push_pull +
    /// braid_kv_wait, which braid.kv and the MXNet kvstores use).
    Raw,
    /// `push_pull_into_each`, one slice per key (the C ABI's braid_kv_push_pull_waitv).
    Each,
}

/// Settings of the `--drill` loop mode (fault drills; see [`drill`]).
#[derive(Debug, Clone)]
struct Drill {
    on: bool,
    rounds: Option<usize>,
    duration: Option<f64>,
    pace_ms: u64,
    /// Extra pause per round of the last worker (a straggler, for bounded staleness).
    slow_ms: u64,
    len: usize,
    report: usize,
    join_server: bool,
    bad_input: bool,
    op_timeout: Option<f64>,
}

const USAGE: &str = "usage: braid-perf push_pull --workers W --servers S [-b MIN] [-e MAX] [-f FACTOR] [-n ITERS] [-w WARMUP] [--keys K] [--mode sync|async|bounded:TAU] [--transport tcp|shm|auto] [--replicas R] [--partition BYTES] [--api blocking|raw|each]
       braid-perf push_pull --drill --workers W --servers S [--rounds N] [--duration S] [--pace MS] [--slow MS] [--len ELEMS] [--keys K] [--report N] [--join-role server|worker] [--bad-input] [--op-timeout S] [--mode ...] [--replicas R] [--partition BYTES]
       braid-perf push_pull --ckpt-bench DIR --workers W --servers S [--state BYTES] [-b BYTES] [--rounds N] [--ckpt-every N] [--mode ...] [--replicas R] [--partition BYTES]";

fn parse(argv: &[String]) -> Result<Args, String> {
    let mut a = Args {
        workers: 2,
        servers: 2,
        min: 4096,
        max: 16 << 20,
        factor: 4,
        iters: 20,
        warmup: 3,
        keys: 8,
        mode: None,
        transport: None,
        replicas: None,
        partition: None,
        drill: Drill {
            on: false,
            rounds: None,
            duration: None,
            pace_ms: 0,
            slow_ms: 0,
            len: 1024,
            report: 50,
            join_server: false,
            bad_input: false,
            op_timeout: None,
        },
        ckpt_dir: None,
        state: 1 << 30,
        ckpt_every: 20,
        api: Api::Blocking,
    };
    let mut it = argv.iter();
    let mut max_set = false;
    while let Some(f) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{f} needs a value"))
        };
        let num = |s: String| {
            s.parse::<usize>()
                .map_err(|_| format!("{f} {s}: not a number"))
        };
        let size = |s: String| parse_bytes(&s).ok_or_else(|| format!("{f} {s}: not a size"));
        let secs = |s: String| {
            s.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| format!("{f} {s}: not a number of seconds"))
        };
        match f.as_str() {
            "--workers" => a.workers = num(val()?)?,
            "--servers" => a.servers = num(val()?)?,
            "-b" | "--minbytes" => a.min = size(val()?)?,
            "-e" | "--maxbytes" => {
                a.max = size(val()?)?;
                max_set = true;
            }
            "-f" | "--stepfactor" => a.factor = num(val()?)?,
            "-n" | "--iters" => a.iters = num(val()?)?,
            "-w" | "--warmup_iters" => a.warmup = num(val()?)?,
            "--keys" => a.keys = num(val()?)?,
            "--mode" => a.mode = Some(val()?),
            "--transport" => a.transport = Some(val()?),
            "--replicas" => a.replicas = Some(val()?),
            "--partition" => a.partition = Some(val()?),
            "--drill" => a.drill.on = true,
            "--rounds" => a.drill.rounds = Some(num(val()?)?),
            "--duration" => a.drill.duration = Some(secs(val()?)?),
            "--pace" => a.drill.pace_ms = num(val()?)? as u64,
            "--slow" => a.drill.slow_ms = num(val()?)? as u64,
            "--len" => a.drill.len = num(val()?)?,
            "--report" => a.drill.report = num(val()?)?.max(1),
            "--join-role" => {
                a.drill.join_server = match val()?.as_str() {
                    "server" => true,
                    "worker" => false,
                    r => return Err(format!("--join-role {r}: expected server or worker")),
                }
            }
            "--bad-input" => a.drill.bad_input = true,
            "--op-timeout" => a.drill.op_timeout = Some(secs(val()?)?),
            "--ckpt-bench" => a.ckpt_dir = Some(val()?),
            "--state" => a.state = size(val()?)?,
            "--ckpt-every" => a.ckpt_every = num(val()?)?.max(1) as u64,
            "--api" => {
                a.api = match val()?.as_str() {
                    "raw" => Api::Raw,
                    "each" => Api::Each,
                    "blocking" => Api::Blocking,
                    r => return Err(format!("--api {r}: expected blocking, raw or each")),
                }
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if !max_set && a.max < a.min {
        a.max = a.min;
    }
    if a.workers == 0 || a.servers == 0 || a.keys == 0 || a.iters == 0 || a.factor < 2 {
        return Err(format!(
            "--workers, --servers, --keys, -n must be >= 1 and -f >= 2\n{USAGE}"
        ));
    }
    if a.drill.on && (a.workers > 20 || (a.drill.bad_input && a.workers < 2)) {
        return Err(
            "--drill: --workers must be at most 20 (and at least 2 with --bad-input)".into(),
        );
    }
    if a.min > a.max {
        return Err(format!("-b {} is larger than -e {}", a.min, a.max));
    }
    Ok(a)
}

/// Entry point of `braid-perf push_pull ...`.
pub fn main(argv: &[String]) -> ExitCode {
    let a = match parse(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("braid-perf: {e}");
            return ExitCode::from(2);
        }
    };
    let launched = braid::config::var("BRAID_COORDINATOR").is_some();
    let res = if launched { run(&a) } else { spawn(&a, argv) };
    match res {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("braid-perf push_pull: {e}");
            ExitCode::from(1)
        }
    }
}

fn spawn(a: &Args, argv: &[String]) -> Result<bool, String> {
    let coord = Coordinator::bind_with(
        "127.0.0.1:0",
        braid::membership::CoordinatorOptions::from_env(),
    )
    .map_err(|e| e.to_string())?;
    let addr = coord.local_addr().to_string();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let n = a.workers + a.servers;
    let mut kids = Vec::new();
    for i in 0..n {
        let mut c = Command::new(&exe);
        c.arg("push_pull")
            .args(argv)
            .env("BRAID_COORDINATOR", &addr)
            .env("BRAID_WORLD_SIZE", n.to_string())
            .env("BRAID_RUN_INDEX", i.to_string())
            .env_remove("BRAID_RANK")
            .stdin(Stdio::null());
        if i != a.servers && (a.ckpt_dir.is_none() || i < a.servers) {
            c.stdout(Stdio::null());
        }
        kids.push(
            c.spawn()
                .map_err(|e| format!("starting process {i}: {e}"))?,
        );
    }
    let mut ok = true;
    for (i, mut k) in kids.into_iter().enumerate() {
        let st = k.wait().map_err(|e| e.to_string())?;
        if !st.success() {
            eprintln!("braid-perf push_pull: process {i} failed ({st})");
            ok = false;
        }
    }
    drop(coord);
    Ok(ok)
}

fn opts(a: &Args) -> Result<PsOptions, String> {
    let mut env: Vec<(&str, String)> = Vec::new();
    if let Some(m) = &a.mode {
        env.push(("BRAID_PS_MODE", m.clone()));
    }
    if let Some(r) = &a.replicas {
        env.push(("BRAID_PS_REPLICAS", r.clone()));
    }
    if let Some(p) = &a.partition {
        env.push(("BRAID_PS_PARTITION_BYTES", p.clone()));
    }
    PsOptions::from_lookup(|k| {
        env.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
            .or_else(|| braid::config::var(k))
    })
    .map_err(|e| e.to_string())
}

fn base_cfg(a: &Args) -> Result<Config, String> {
    let mut cfg = Config::from_env().map_err(|e| e.to_string())?;
    if cfg.group == "world" {
        cfg.group = "ps".into();
    }
    if let Some(t) = &a.transport {
        cfg.transport = braid::config::TransportKind::parse(t)
            .ok_or_else(|| format!("--transport {t}: expected tcp, shm, ib or auto"))?;
    }
    cfg.rank = None;
    Ok(cfg)
}

fn run(a: &Args) -> Result<bool, String> {
    let idx: usize = braid::config::var("BRAID_RUN_INDEX")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // Joiners of braid-run have launcher indices from BRAID_WORLD_SIZE on.
    let initial: usize = braid::config::var("BRAID_WORLD_SIZE")
        .and_then(|s| s.parse().ok())
        .unwrap_or(a.workers + a.servers);
    let role_server = match braid::config::var("BRAID_PS_ROLE").as_deref() {
        Some("server") => true,
        Some("worker") => false,
        _ if idx >= initial => a.drill.join_server,
        _ => idx < a.servers,
    };
    let o = opts(a)?;
    let mut cfg = base_cfg(a)?;
    if role_server {
        // Before any value: the process's own memory (code, libraries, threads).
        let base_kib = crate::rss_kib();
        let s = KvServer::start(cfg, o).map_err(|e| e.to_string())?;
        // Serve until every worker has left the view (after having seen one).
        let mut seen = false;
        let mut shown = (usize::MAX, u64::MAX);
        // The most value bytes held at once, against this process's peak RSS at the end.
        let mut held_max = 0usize;
        // The most bytes stored at once (values, kept versions, open rounds, optimizer state)
        // and the largest receive buffers (in-flight pushes).
        let (mut stored_max, mut rbuf_max) = (0usize, 0usize);
        loop {
            let (w, _) = s.sizes();
            seen |= w > 0;
            let b = s.store_bytes();
            held_max = held_max.max(b.values);
            stored_max = stored_max.max(b.values + b.kept + b.pending + b.optimizer);
            rbuf_max = rbuf_max.max(s.receive_buffer_bytes());
            if seen && w == 0 {
                break;
            }
            if a.drill.on {
                let now = (s.parts_held(), s.epoch());
                if now != shown {
                    shown = now;
                    println!(
                        "# server [{idx}] member {}: parts {} epoch {}",
                        s.member_id(),
                        now.0,
                        now.1
                    );
                    let _ = std::io::stdout().flush();
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Memory of this server against what it stores (issue 17: RSS <= 2x the stored bytes
        // plus what is in flight). On stderr, which push_pull's launcher does not silence.
        // held: current values; stored: everything the store keeps (the history's older
        // versions too); rbuf: receive buffers; base: the process before the server started.
        // rss_over_stored = (peak RSS - base - rbuf) / stored.
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        let rss = crate::peak_rss_kib() as f64 / 1024.0;
        let base = base_kib as f64 / 1024.0;
        let (held, stored, rbuf) = (mib(held_max), mib(stored_max), mib(rbuf_max));
        let over = |x: f64, d: f64| if d > 0.0 { x / d } else { 0.0 };
        // One write (stderr is unbuffered: eprintln! may write a line in pieces, and the
        // servers share the launcher's stderr, so their lines could interleave).
        let line = format!(
            "# server [{idx}] member {}: peak_rss_mib={rss:.1} held_mib={held:.1} rss_over_held={:.2} stored_mib={stored:.1} rbuf_mib={rbuf:.1} base_mib={base:.1} rss_over_stored={:.2}\n",
            s.member_id(),
            over(rss, held),
            over(rss - base - rbuf, stored)
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
        return Ok(true);
    }
    if a.drill.on {
        if let Some(t) = a.drill.op_timeout {
            cfg.timeout = Duration::from_secs_f64(t);
        }
        return drill(a, cfg, o, idx.saturating_sub(a.servers));
    }
    if let Some(dir) = &a.ckpt_dir {
        return ckpt_bench(a, cfg, o, idx.saturating_sub(a.servers), dir);
    }
    worker(a, cfg, o, idx.saturating_sub(a.servers))
}

fn worker(a: &Args, cfg: Config, o: PsOptions, widx: usize) -> Result<bool, String> {
    let mode = o.consistency;
    let kv = KvWorker::start(cfg.clone(), o.clone()).map_err(|e| e.to_string())?;
    // The workers' own communicator for the all_reduce comparison (and agreement on results).
    let mut ccfg = cfg;
    ccfg.group = format!("{}-ar", ccfg.group);
    ccfg.world_size = Some(a.workers);
    ccfg.rank = Some(widx);
    ccfg.elastic = false;
    let comm = Communicator::init_with(ccfg).map_err(|e| e.to_string())?;
    let w = comm.size();
    let rank = comm.rank();
    let (ns, _) = kv.sizes();
    if rank == 0 {
        println!(
            "# braid-perf push_pull: {w} workers, {ns} servers, mode {:?}, replicas {}, partition {} B, iters {}, warmup {}{}",
            mode, o.replicas, o.partition_bytes, a.iters, a.warmup,
            match a.api {
                Api::Blocking => "",
                Api::Raw => ", api raw",
                Api::Each => ", api each",
            }
        );
        println!(
            "# {:>10} {:>10} {:>5} {:>11} {:>9} {:>9} {:>7}   {:>10} {:>9}",
            "size(B)",
            "count",
            "keys",
            "round_us",
            "pp_GB/s",
            "agg_GB/s",
            "#wrong",
            "ar_us",
            "ar_busbw"
        );
    }
    let mut wrong_total = 0u64;
    // Worker w pushes (w+1) * (i % 7 + 1): the sum over workers is known exactly.
    let tri = (w * (w + 1) / 2) as f32;
    for (si, size) in crate::size_steps(a.min, a.max, a.factor)
        .into_iter()
        .enumerate()
    {
        let si = si as u64;
        let count = (size / 4).max(a.keys);
        let keys: Vec<u64> = (0..a.keys as u64).map(|k| si * 1_000_000 + k).collect();
        let mut lens = vec![count / a.keys; a.keys];
        lens[0] += count % a.keys;
        let grad: Vec<f32> = (0..count)
            .map(|i| (rank as f32 + 1.0) * ((i % 7) as f32 + 1.0))
            .collect();
        kv.init(&keys, &lens, &vec![0f32; count])
            .map_err(|e| e.to_string())?;
        comm.barrier().map_err(|e| e.to_string())?;
        let mut wrong = 0u64;
        let rounds = a.warmup + a.iters;
        let mut t_timed = 0.0f64;
        // The pulled values land in one buffer reused every round (push_pull_into), as a
        // training loop's parameter tensor would.
        let mut out = vec![0f32; count];
        for r in 0..rounds {
            let t0 = Instant::now();
            let done = match a.api {
                // SAFETY: `out` holds `count` elements (the sum of `lens`) and is neither read
                // nor written until the handle was waited for (here, at once).
                Api::Raw => unsafe { kv.push_pull_raw(&keys, &lens, &grad, out.as_mut_ptr(), 0) }
                    .and_then(|h| h.wait()),
                Api::Each => {
                    let vals = split_at_lens(&grad, &lens);
                    let mut outs = split_at_lens_mut(&mut out, &lens);
                    kv.push_pull_into_each(&keys, &vals, &mut outs, 0)
                }
                Api::Blocking => kv.push_pull_into(&keys, &lens, &grad, &mut out, 0),
            };
            done.map_err(|e| format!("round {r}: {e}"))?;
            if r >= a.warmup {
                t_timed += t0.elapsed().as_secs_f64();
            }
            if mode == Consistency::Sync {
                for (i, v) in out.iter().enumerate() {
                    if *v != tri * ((i % 7) as f32 + 1.0) {
                        wrong += 1;
                    }
                }
            }
        }
        if mode != Consistency::Sync {
            // Every push of every worker is in the final value.
            comm.barrier().map_err(|e| e.to_string())?;
            let p = kv
                .pull::<f32>(&keys, &lens, None, 0)
                .and_then(|h| h.wait())
                .map_err(|e| e.to_string())?;
            comm.barrier().map_err(|e| e.to_string())?;
            for (i, v) in p.values.iter().enumerate() {
                if *v != rounds as f32 * tri * ((i % 7) as f32 + 1.0) {
                    wrong += 1;
                }
            }
        }
        let us = t_timed / a.iters as f64 * 1e6;
        // all_reduce of the same bytes over the same workers.
        let mut buf = grad.clone();
        for _ in 0..a.warmup {
            comm.all_reduce_inplace(&mut buf, ReduceOp::Sum)
                .map_err(|e| e.to_string())?;
        }
        comm.barrier().map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        for _ in 0..a.iters {
            comm.all_reduce_inplace(&mut buf, ReduceOp::Sum)
                .map_err(|e| e.to_string())?;
        }
        let ar_us = t0.elapsed().as_secs_f64() / a.iters as f64 * 1e6;
        let mut m = [us, ar_us];
        comm.all_reduce_inplace(&mut m, ReduceOp::Max)
            .map_err(|e| e.to_string())?;
        let mut wsum = [wrong];
        comm.all_reduce_inplace(&mut wsum, ReduceOp::Sum)
            .map_err(|e| e.to_string())?;
        wrong_total += wsum[0];
        let bytes = (count * 4) as f64;
        let pp = 2.0 * bytes / m[0] / 1e3;
        let ar_busbw = if w > 1 {
            bytes / m[1] / 1e3 * 2.0 * (w as f64 - 1.0) / w as f64
        } else {
            0.0
        };
        if rank == 0 {
            println!(
                "  {:>10} {:>10} {:>5} {:>11.1} {:>9.3} {:>9.3} {:>7}   {:>10.1} {:>9.3}",
                count * 4,
                count,
                a.keys,
                m[0],
                pp,
                pp * w as f64,
                wsum[0],
                m[1],
                ar_busbw
            );
            let _ = std::io::stdout().flush();
        }
    }
    if rank == 0 {
        println!(
            "# Out of bounds values : {wrong_total} {}",
            if wrong_total == 0 { "OK" } else { "FAILED" }
        );
    }
    comm.barrier().map_err(|e| e.to_string())?;
    drop(comm);
    drop(kv);
    Ok(wrong_total == 0)
}

/// Quantile `q` of `v` (sorted here); 0 for none.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// `--ckpt-bench DIR`: `--state` bytes in keys of one partition each (worker 0 initialises
/// them, in 64 MiB calls); every worker then runs `--rounds` sync rounds of push_pull over the
/// first `-b` bytes of keys (its working set), timing each; the worker with the lowest member
/// id takes a periodic checkpoint into DIR every `--ckpt-every` rounds (the library's
/// `BRAID_PS_CHECKPOINT_*` mechanism) while training goes on. The trigger worker prints
/// round-time quantiles of the rounds that overlapped no checkpoint and of those that did,
/// each checkpoint's total time, longest server copy and longest server write, and how long
/// checking the last checkpoint takes as a restore does (manifest and every file read once).
fn ckpt_bench(
    a: &Args,
    cfg: Config,
    mut o: PsOptions,
    widx: usize,
    dir: &str,
) -> Result<bool, String> {
    let dir = std::path::absolute(dir).map_err(|e| format!("--ckpt-bench {dir}: {e}"))?;
    o.checkpoint_dir = Some(dir.clone());
    o.checkpoint_every = a.ckpt_every;
    let part = o.partition_bytes.max(4) / 4 * 4;
    let nkeys = a.state.div_ceil(part).max(1);
    let key_elems = part / 4;
    let ws_keys = (a.min.div_ceil(part)).clamp(1, nkeys);
    let rounds = a.drill.rounds.unwrap_or(60);
    let mode = o.consistency;
    let replicas = o.replicas;
    let (coord, group, token) = (
        cfg.coordinator.clone().unwrap_or_default(),
        cfg.group.clone(),
        cfg.job_token.as_ref().map(|t| t.0.clone()),
    );
    let kv = KvWorker::start(cfg, o).map_err(|e| e.to_string())?;
    wait_for_view(&kv, a, "")?;
    // The worker with the lowest member id takes the periodic checkpoints and reports.
    let view =
        braid::membership::fetch_view(&coord, &group, token.as_deref(), Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
    let trigger = view
        .members
        .iter()
        .filter(|m| m.role == braid::membership::Role::Worker)
        .map(|m| m.id)
        .min()
        == Some(kv.member_id());
    let keys: Vec<u64> = (0..nkeys as u64).collect();
    let lens = vec![key_elems; nkeys];
    let ti = Instant::now();
    if widx == 0 {
        let per = ((64usize << 20) / part).max(1);
        let zeros = vec![0f32; per * key_elems];
        for (k, l) in keys.chunks(per).zip(lens.chunks(per)) {
            kv.init(k, l, &zeros[..l.len() * key_elems])
                .map_err(|e| format!("init: {e}"))?;
        }
    } else {
        kv.init(
            &keys[..ws_keys],
            &lens[..ws_keys],
            &vec![0f32; ws_keys * key_elems],
        )
        .map_err(|e| format!("init: {e}"))?;
    }
    let init_s = ti.elapsed().as_secs_f64();
    if widx == 0 {
        // The other workers wait in their first round for this worker's push.
        println!(
            "# push_pull checkpoint bench: {} workers, {} servers, mode {mode:?}, replicas {replicas}, state {} B in {nkeys} keys of {part} B, working set {} B per worker per round, {rounds} rounds, a checkpoint every {} rounds into {} (init {init_s:.1} s)",
            a.workers,
            a.servers,
            nkeys * part,
            ws_keys * part,
            a.ckpt_every,
            dir.display()
        );
        let _ = std::io::stdout().flush();
    }
    let grad = vec![1f32; ws_keys * key_elems];
    let mut out = vec![0f32; ws_keys * key_elems];
    let mut spans: Vec<(f64, f64)> = Vec::with_capacity(rounds);
    let mut ckpts: Vec<(f64, braid::ps::CheckpointInfo)> = Vec::new();
    let base = Instant::now();
    for r in 0..rounds {
        let s = base.elapsed().as_secs_f64();
        kv.push_pull_into(&keys[..ws_keys], &lens[..ws_keys], &grad, &mut out, 0)
            .map_err(|e| format!("round {r}: {e}"))?;
        let e = base.elapsed().as_secs_f64();
        spans.push((s, e));
        if let Some(i) = kv.last_checkpoint() {
            if ckpts.last().map_or(true, |(_, c)| c.id != i.id) {
                ckpts.push((e, i));
            }
        }
    }
    if !trigger {
        return Ok(true);
    }
    // The last checkpoint may finish after the last round.
    let end = Instant::now() + Duration::from_secs(120);
    let triggers = (rounds.saturating_sub(1) as u64) / a.ckpt_every;
    while (ckpts.len() as u64) < triggers && Instant::now() < end {
        if let Some(i) = kv.last_checkpoint() {
            if ckpts.last().map_or(true, |(_, c)| c.id != i.id) {
                ckpts.push((base.elapsed().as_secs_f64(), i));
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if (ckpts.len() as u64) < triggers {
        println!(
            "# {} of {triggers} checkpoints completed (a due one waits for the next round while the previous is written)",
            ckpts.len()
        );
    }
    if ckpts.is_empty() && triggers > 0 {
        return Ok(false);
    }
    // A round overlaps a checkpoint when it ran between the request (completion minus the
    // checkpoint's time) and the moment its completion was seen.
    let during = |s: f64, e: f64| {
        ckpts
            .iter()
            .any(|(seen, c)| s < *seen && e > *seen - c.seconds - 1e-3)
    };
    let warm = 3.min(spans.len());
    let (mut quiet, mut busy): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    for &(s, e) in &spans[warm..] {
        if during(s, e) {
            busy.push((e - s) * 1e3);
        } else {
            quiet.push((e - s) * 1e3);
        }
    }
    let (qn, bn) = (quiet.len(), busy.len());
    let (q50, q90, qmax) = (
        quantile(&mut quiet, 0.5),
        quantile(&mut quiet, 0.9),
        quantile(&mut quiet, 1.0),
    );
    let (b50, b90, bmax) = (
        quantile(&mut busy, 0.5),
        quantile(&mut busy, 0.9),
        quantile(&mut busy, 1.0),
    );
    println!(
        "# round_ms without a checkpoint: median {q50:.2} p90 {q90:.2} max {qmax:.2} ({qn} rounds)"
    );
    if bn > 0 {
        println!(
            "# round_ms during a checkpoint:  median {b50:.2} p90 {b90:.2} max {bmax:.2} ({bn} rounds); slowdown median {:+.1}%, max round {:+.1} ms",
            if q50 > 0.0 { (b50 / q50 - 1.0) * 100.0 } else { 0.0 },
            bmax - qmax
        );
    }
    for (_, c) in &ckpts {
        println!(
            "# checkpoint {}: versions {}..{}, {} B in {} part(s), {} file(s): total {:.3} s ({:.2} GB/s), longest server copy {:.3} s (state lock held), longest server write {:.3} s",
            c.id,
            c.version,
            c.max_version,
            c.bytes,
            c.parts,
            c.servers,
            c.seconds,
            c.bytes as f64 / c.seconds.max(1e-9) / 1e9,
            c.copy_seconds,
            c.write_seconds
        );
    }
    if ckpts.is_empty() {
        // No checkpoint asked for (--ckpt-every above --rounds): the baseline alone.
        return Ok(true);
    }
    let tv = Instant::now();
    let m = braid::ps::checkpoint::read_manifest(&dir)?;
    braid::ps::checkpoint::verify_files(&dir, &m)?;
    let vs = tv.elapsed().as_secs_f64();
    let bytes: u64 = m.files.iter().map(|f| f.bytes).sum();
    println!(
        "# restore check of checkpoint {} (manifest, every file read and checksummed once, one reader): {vs:.3} s ({:.2} GB/s)",
        m.id,
        bytes as f64 / vs.max(1e-9) / 1e9
    );
    let _ = std::io::stdout().flush();
    Ok(true)
}

/// A count of updates held in an f64 element (a whole number), or None.
fn count_of(v: f64) -> Option<u64> {
    (v >= 0.0 && v.fract() == 0.0 && v < 9.0e15).then_some(v as u64)
}

/// What a drill worker saw: printed as its final line.
#[derive(Debug, Default)]
struct Tally {
    rounds: u64,
    first_version: Option<u64>,
    last_version: u64,
    wrong: u64,
    lost: u64,
    errors: u64,
    partial: u64,
    final_mask: u64,
    max_round: f64,
}

impl Tally {
    fn version(&mut self, v: u64) {
        self.first_version.get_or_insert(v);
        self.last_version = v;
    }

    fn print(&self, widx: usize, extra: &str) {
        println!(
            "# push_pull: rounds {} versions {}..{} #wrong {} lost-updates {} errors {} partial-rounds {} final-mask {:#b} max-round-ms {:.1} worker {widx}{extra}",
            self.rounds,
            self.first_version.unwrap_or(0),
            self.last_version,
            self.wrong,
            self.lost,
            self.errors,
            self.partial,
            self.final_mask,
            self.max_round * 1e3
        );
        let _ = std::io::stdout().flush();
    }

    fn ok(&self) -> bool {
        self.wrong == 0 && self.lost == 0 && self.errors == 0
    }
}

/// `--drill`: push/pull rounds on fixed keys (no all_reduce communicator, so a lost worker
/// cannot take the others down through it), checked so that a lost acknowledged update, a
/// duplicated one or a version going backwards is counted.
///
/// Keys `0..K` hold `--len` f64 elements each; key K (the tally) and key K+1 (done) hold one
/// element per worker. Every worker prints `# round ...` every `--report` rounds and a final
/// line `# push_pull: rounds R versions A..B #wrong W lost-updates L errors E partial-rounds P
/// final-mask M worker I`.
///
/// * async + Sum: a round is one push of +1 to every element of every key plus +1 to the
///   worker's own tally slot, waited for (acknowledged), then a pull: the worker's tally slot
///   must equal its count of acknowledged pushes, every element at least that, and the pull's
///   version (the smallest part version) the smallest count read (in async mode a part's
///   version is the number of pushes it applied, and each push adds 1 to all its elements).
///   At the end each worker adds its count to its done slot; worker 0 then polls until every
///   worker's done slot is set and checks that every element equals the sum of the counts
///   (lost-updates: how many acknowledged updates are missing) and every tally slot its
///   worker's count.
/// * sync: worker w pushes `2^w * (i % 7 + 1)` to element i of each key with push_pull; every
///   element of the round's aggregate must be `mask * (i % 7 + 1)` with `mask` a set of
///   workers that holds w itself (else the update is lost), never regains a worker once all
///   were seen, and the version must grow by exactly 1 per round. `partial-rounds` counts
///   rounds whose mask is not the set of all workers (after a worker died); `final-mask` is
///   the last round's mask.
/// * `--bad-input` (async): the last worker sends a wrong length, a dtype mismatch, a push to
///   an unknown key and a pull of an unknown key, expects a clear error for each, then pulls
///   a good key; it pushes nothing that counts, prints `# bad-input: verdict OK|FAILED` and
///   exits 0 either way (so braid-run does not stop the others).
fn drill(a: &Args, cfg: Config, o: PsOptions, widx: usize) -> Result<bool, String> {
    let d = &a.drill;
    if widx >= a.workers {
        return Err(format!(
            "--drill: worker index {widx} is not below --workers {} (joining workers are not supported)",
            a.workers
        ));
    }
    if d.bad_input && widx + 1 == a.workers {
        return bad_input(a, cfg, o);
    }
    let mode = o.consistency;
    let kv = KvWorker::start(cfg, o.clone()).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    // Everyone in the view first, so the first sync round waits for all workers.
    wait_for_view(&kv, a, "--drill: ")?;
    let (k, l, w) = (a.keys, d.len, a.workers);
    let main_keys: Vec<u64> = (0..k as u64).collect();
    let main_lens = vec![l; k];
    let mut all_keys = main_keys.clone();
    all_keys.extend([k as u64, k as u64 + 1]);
    let mut all_lens = main_lens.clone();
    all_lens.extend([w, w]);
    kv.init(&all_keys, &all_lens, &vec![0f64; k * l + 2 * w])
        .map_err(|e| format!("init: {e}"))?;
    if widx == 0 {
        println!(
            "# push_pull drill: {w} workers, {} servers, mode {mode:?}, replicas {}, partition {} B, {k} keys x {l} f64, rounds {:?}, duration {:?}",
            a.servers, o.replicas, o.partition_bytes, d.rounds, d.duration
        );
    }
    let mut t = Tally::default();
    let deadline = d.duration.map(|s| t0 + Duration::from_secs_f64(s));
    let max_rounds = d
        .rounds
        .unwrap_or(if deadline.is_some() { usize::MAX } else { 100 });
    let full: u64 = (1u64 << w) - 1;
    let me_bit = 1u64 << widx;
    let scale = |i: usize| (i % l % 7 + 1) as f64;
    // async: +1 everywhere and on the own tally slot; sync: 2^w * (i % 7 + 1).
    let mut grad_async = vec![1f64; k * l + w];
    for x in &mut grad_async[k * l..] {
        *x = 0.0;
    }
    grad_async[k * l + widx] = 1.0;
    let grad_sync: Vec<f64> = (0..k * l).map(|i| me_bit as f64 * scale(i)).collect();
    let tally_keys = &all_keys[..k + 1];
    let tally_lens = &all_lens[..k + 1];
    let mut acked = 0u64;
    let mut max_lead = 0u64;
    let mut prev_masks: Vec<u64> = vec![full; k * l];
    let mut seen_full = false;
    let mut prev_version: Option<u64> = None;
    while (t.rounds as usize) < max_rounds && deadline.map_or(true, |e| Instant::now() < e) {
        let r = t.rounds + 1;
        let tr = Instant::now();
        if mode == Consistency::Sync {
            let p = match kv
                .push_pull(&main_keys, &main_lens, &grad_sync, 0)
                .and_then(|h| h.wait())
            {
                Ok(p) => p,
                Err(e) => {
                    println!("# round {r}: push_pull failed: {e}");
                    t.errors += 1;
                    break;
                }
            };
            let mut lost_here = false;
            let mut partial = false;
            let mut masks = vec![0u64; k * l];
            for (i, v) in p.values.iter().enumerate() {
                let m = count_of(v / scale(i))
                    .filter(|m| (*m as f64) * scale(i) == *v)
                    .filter(|m| m & !full == 0);
                let Some(m) = m else {
                    t.wrong += 1;
                    continue;
                };
                masks[i] = m;
                if m & me_bit == 0 {
                    lost_here = true;
                }
                if m != full {
                    partial = true;
                }
                if seen_full && m & !prev_masks[i] != 0 {
                    // A worker came back into a round after having been left out.
                    t.wrong += 1;
                }
            }
            seen_full |= masks.iter().all(|m| *m == full);
            if seen_full {
                prev_masks = masks;
            }
            t.final_mask = p.values.first().map_or(0, |v| (v / scale(0)) as u64);
            t.lost += u64::from(lost_here);
            t.partial += u64::from(partial);
            if prev_version.is_some_and(|pv| p.version != pv + 1) {
                println!(
                    "# round {r}: version {} after {prev_version:?} (expected +1)",
                    p.version
                );
                t.wrong += 1;
            }
            prev_version = Some(p.version);
            t.version(p.version);
        } else {
            if let Err(e) = kv
                .push(tally_keys, tally_lens, &grad_async, 0)
                .and_then(|h| h.wait())
            {
                println!("# round {r}: push failed: {e}");
                t.errors += 1;
                break;
            }
            acked += 1;
            let p = match kv
                .pull::<f64>(tally_keys, tally_lens, None, 0)
                .and_then(|h| h.wait())
            {
                Ok(p) => p,
                Err(e) => {
                    println!("# round {r}: pull failed: {e}");
                    t.errors += 1;
                    break;
                }
            };
            let mut low = u64::MAX;
            for v in &p.values[..k * l] {
                match count_of(*v) {
                    Some(c) => low = low.min(c),
                    None => t.wrong += 1,
                }
            }
            let tally: Vec<u64> = p.values[k * l..]
                .iter()
                .map(|v| count_of(*v).unwrap_or(u64::MAX))
                .collect();
            let mine = tally[widx];
            if let Consistency::Bounded(tau) = mode {
                let tau = tau.max(1);
                // Acknowledged pushes ahead of the slowest other worker's applied ones: at most
                // tau + 1 (tau rounds of lead plus the push just acknowledged).
                let slowest = tally
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != widx)
                    .map(|(_, c)| *c)
                    .min()
                    .unwrap_or(acked);
                let lead = acked.saturating_sub(slowest);
                max_lead = max_lead.max(lead);
                if lead > tau + 1 {
                    println!("# round {r}: {lead} pushes ahead of the slowest worker (tau {tau})");
                    t.wrong += 1;
                }
            }
            if mine != acked || low < acked {
                println!(
                    "# round {r}: acknowledged {acked} pushes, own tally {mine}, smallest element {low}"
                );
                t.wrong += 1;
                t.lost = t.lost.max(acked.saturating_sub(mine.min(low)));
            }
            let sum: u64 = tally.iter().fold(0u64, |s, x| s.saturating_add(*x));
            if p.version != low.min(sum) {
                println!(
                    "# round {r}: pull version {} but smallest count read {}",
                    p.version,
                    low.min(sum)
                );
                t.wrong += 1;
            }
            if prev_version.is_some_and(|pv| p.version < pv) {
                println!(
                    "# round {r}: version went back from {prev_version:?} to {}",
                    p.version
                );
                t.wrong += 1;
            }
            prev_version = Some(p.version);
            t.version(p.version);
        }
        t.rounds = r;
        t.max_round = t.max_round.max(tr.elapsed().as_secs_f64());
        if r % d.report as u64 == 0 {
            let (s, wn) = kv.sizes();
            println!(
                "# round {r} worker {widx}: version {} epoch {} servers {s} workers {wn} at {:.2} s",
                t.last_version,
                kv.epoch(),
                t0.elapsed().as_secs_f64()
            );
            let _ = std::io::stdout().flush();
        }
        let pause = d.pace_ms + if widx + 1 == w { d.slow_ms } else { 0 };
        if pause > 0 {
            std::thread::sleep(Duration::from_millis(pause));
        }
    }
    let mut extra = String::new();
    if mode != Consistency::Sync && t.errors == 0 {
        // Announce the count, then (worker 0) wait for everyone's and check the totals.
        let mut done = vec![0f64; w];
        done[widx] = acked as f64;
        if let Err(e) = kv
            .push(&[k as u64 + 1], &[w], &done, 0)
            .and_then(|h| h.wait())
        {
            println!("# done push failed: {e}");
            t.errors += 1;
        }
        let counted: Vec<usize> = (0..w).filter(|i| !(d.bad_input && i + 1 == w)).collect();
        let wait_all = widx == 0;
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let p = kv
                .pull::<f64>(&all_keys, &all_lens, None, 0)
                .and_then(|h| h.wait())
                .map_err(|e| format!("final pull: {e}"))?;
            let tally = &p.values[k * l..k * l + w];
            let dn = &p.values[k * l + w..];
            let ready = !wait_all || counted.iter().all(|i| dn[*i] > 0.0);
            if ready || Instant::now() >= end {
                let expected: f64 = if wait_all {
                    counted.iter().map(|i| dn[*i]).sum()
                } else {
                    acked as f64
                };
                let mut lost = 0u64;
                let mut over = 0u64;
                let mut low = f64::INFINITY;
                for v in &p.values[..k * l] {
                    low = low.min(*v);
                    if wait_all && *v > expected {
                        over += 1;
                    }
                }
                lost += count_of(expected - low.min(expected)).unwrap_or(u64::MAX);
                for i in &counted {
                    if wait_all || *i == widx {
                        let want = if *i == widx { acked as f64 } else { dn[*i] };
                        lost += count_of(want - tally[*i].min(want)).unwrap_or(u64::MAX);
                        if wait_all && tally[*i] > want {
                            over += 1;
                        }
                    }
                }
                if !ready {
                    println!(
                        "# final: not every worker reported its count within 60 s: done {dn:?}"
                    );
                    t.errors += 1;
                }
                t.lost = t.lost.max(lost);
                t.wrong += over;
                extra = format!(
                    " expected {expected} smallest {low} tally {tally:?} version {}",
                    p.version
                );
                if matches!(mode, Consistency::Bounded(_)) {
                    extra.push_str(&format!(" max-lead {max_lead}"));
                }
                if low < expected {
                    // Where updates are missing: runs of equal values, per key.
                    for (key, vals) in p.values[..k * l].chunks(l.max(1)).enumerate() {
                        let mut i = 0;
                        while i < vals.len() {
                            let mut j = i;
                            while j + 1 < vals.len() && vals[j + 1] == vals[i] {
                                j += 1;
                            }
                            if vals[i] < expected {
                                println!(
                                    "# final: key {key} elements {i}..={j} hold {} (expected {expected})",
                                    vals[i]
                                );
                            }
                            i = j + 1;
                        }
                    }
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    } else if mode == Consistency::Sync {
        extra = format!(" full-mask {full:#b}");
    }
    t.print(widx, &extra);
    drop(kv);
    Ok(t.ok())
}

/// `--drill --bad-input`: the last worker's wrong requests (see [`drill`]).
fn bad_input(a: &Args, mut cfg: Config, o: PsOptions) -> Result<bool, String> {
    // A pull of an unknown key fails after the servers' grace period (3 s), at the latest at
    // the operation's deadline.
    cfg.timeout = cfg.timeout.min(Duration::from_secs(4));
    let kv = KvWorker::start(cfg, o).map_err(|e| e.to_string())?;
    let l = a.drill.len;
    // Wait until key 0 and 1 exist (pulling registers no length here).
    kv.pull::<f64>(&[0, 1], &[l, l], Some(0), 0)
        .and_then(|h| h.wait())
        .map_err(|e| format!("bad-input: first pull: {e}"))?;
    let mut refused = 0;
    let mut check = |what: &str, r: braid::Result<()>, want: &str| match r {
        Err(e) if e.to_string().contains(want) => {
            refused += 1;
            println!("# bad-input {what}: refused: {e}");
        }
        Err(e) => println!("# bad-input {what}: unexpected error: {e}"),
        Ok(()) => println!("# bad-input {what}: accepted!"),
    };
    let t = Instant::now();
    check(
        "wrong length",
        kv.push(&[0], &[l + 1], &vec![1f64; l + 1], 0)
            .and_then(|h| h.wait()),
        "wrong length",
    );
    check(
        "dtype mismatch",
        kv.push(&[1], &[2 * l], &vec![1f32; 2 * l], 0)
            .and_then(|h| h.wait()),
        "dtype mismatch",
    );
    check(
        "push to an unknown key",
        kv.push(&[777_777], &[4], &[1f64; 4], 0)
            .and_then(|h| h.wait()),
        "not initialised",
    );
    check(
        "pull of an unknown key",
        kv.pull::<f64>(&[888_888], &[4], None, 0)
            .and_then(|h| h.wait())
            .map(|_| ()),
        "does not exist",
    );
    let took = t.elapsed().as_secs_f64();
    // The server still answers this process.
    let good = kv
        .pull::<f64>(&[2 % a.keys as u64], &[l], None, 0)
        .and_then(|h| h.wait());
    let good_ok = good.is_ok();
    println!(
        "# bad-input: {refused} of 4 refused in {took:.2} s; a good pull afterwards: {}",
        match good {
            Ok(p) => format!("ok (version {})", p.version),
            Err(e) => format!("failed: {e}"),
        }
    );
    let _ = std::io::stdout().flush();
    println!(
        "# bad-input: verdict {}",
        if refused == 4 && good_ok {
            "OK"
        } else {
            "FAILED"
        }
    );
    drop(kv);
    // Exit 0 either way (the verdict is in the lines): a failure would make braid-run stop the
    // other processes, whose totals are the other half of the check.
    Ok(true)
}

/// Waits (at most 60 s) until the worker's view holds `--servers` servers and `--workers`
/// workers; the error names what it has, after `prefix`.
fn wait_for_view(kv: &KvWorker, a: &Args, prefix: &str) -> Result<(), String> {
    let t0 = Instant::now();
    loop {
        let (s, w) = kv.sizes();
        if s >= a.servers && w >= a.workers {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "{prefix}the view has {s} servers and {w} workers after 60 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `buf` cut into consecutive slices of `lens` elements (their sum is `buf.len()`).
fn split_at_lens<'a>(mut buf: &'a [f32], lens: &[usize]) -> Vec<&'a [f32]> {
    lens.iter()
        .map(|&n| {
            let (head, rest) = buf.split_at(n);
            buf = rest;
            head
        })
        .collect()
}

/// [`split_at_lens`], mutable.
fn split_at_lens_mut<'a>(mut buf: &'a mut [f32], lens: &[usize]) -> Vec<&'a mut [f32]> {
    lens.iter()
        .map(|&n| {
            let (head, rest) = std::mem::take(&mut buf).split_at_mut(n);
            buf = rest;
            head
        })
        .collect()
}
