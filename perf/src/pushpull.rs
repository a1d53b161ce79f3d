//! `braid-perf push_pull`: parameter-server throughput and round latency, with all_reduce of
//! the same bytes over the same workers in the same run.
//!
//! ```text
//! braid-perf push_pull --workers W --servers S [-b MIN] [-e MAX] [-f FACTOR] [-n ITERS]
//!     [-w WARMUP] [--keys K] [--mode sync|async|bounded:TAU] [--transport tcp|shm|auto]
//!     [--replicas R] [--partition BYTES]
//! ```
//!
//! Without a launcher it starts W + S local processes of itself (servers first) with an
//! embedded coordinator; under `braid-run` a process with `BRAID_RUN_INDEX` below S (or
//! `BRAID_PS_ROLE=server`) is a server, the others workers. SIZE is the bytes each worker
//! pushes per round (f32), spread over K keys (default 8; parts of at most the partition size
//! go to servers by consistent hashing). A round is one `push_pull` of all keys per worker.
//! Columns: `size count keys` then push/pull `round_us` (max over workers of the mean),
//! `pp_GB/s` (bytes pushed + pulled per worker per second), `agg_GB/s` (× workers), `#wrong`
//! (sync: every round's aggregate is checked exactly; async/bounded: the final value after all
//! rounds), then all_reduce of SIZE bytes over the W workers: `ar_us`, `ar_busbw`.

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
}

const USAGE: &str = "usage: braid-perf push_pull --workers W --servers S [-b MIN] [-e MAX] [-f FACTOR] [-n ITERS] [-w WARMUP] [--keys K] [--mode sync|async|bounded:TAU] [--transport tcp|shm|auto] [--replicas R] [--partition BYTES]";

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
    let launched = std::env::var_os("BRAID_COORDINATOR").is_some();
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
        if i != a.servers {
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
            .or_else(|| std::env::var(k).ok().filter(|v| !v.is_empty()))
    })
    .map_err(|e| e.to_string())
}

fn base_cfg(a: &Args) -> Result<Config, String> {
    let mut cfg = Config::from_env().map_err(|e| e.to_string())?;
    if cfg.group == "world" {
        cfg.group = "ps".into();
    }
    if let Some(t) = &a.transport {
        cfg.transport = match t.as_str() {
            "tcp" => braid::config::TransportKind::Tcp,
            "shm" => braid::config::TransportKind::Shm,
            _ => braid::config::TransportKind::Auto,
        };
    }
    cfg.rank = None;
    Ok(cfg)
}

fn run(a: &Args) -> Result<bool, String> {
    let idx: usize = std::env::var("BRAID_RUN_INDEX")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let role_server = match std::env::var("BRAID_PS_ROLE").ok().as_deref() {
        Some("server") => true,
        Some("worker") => false,
        _ => idx < a.servers,
    };
    let o = opts(a)?;
    let cfg = base_cfg(a)?;
    if role_server {
        let s = KvServer::start(cfg, o).map_err(|e| e.to_string())?;
        // Serve until every worker has left the view (after having seen one).
        let mut seen = false;
        loop {
            let (w, _) = s.sizes();
            seen |= w > 0;
            if seen && w == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        return Ok(true);
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
            "# braid-perf push_pull: {w} workers, {ns} servers, mode {:?}, replicas {}, partition {} B, iters {}, warmup {}",
            mode, o.replicas, o.partition_bytes, a.iters, a.warmup
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
    let mut size = a.min;
    let mut si = 0u64;
    // Worker w pushes (w+1) * (i % 7 + 1): the sum over workers is known exactly.
    let tri = (w * (w + 1) / 2) as f32;
    loop {
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
        for r in 0..rounds {
            let t0 = Instant::now();
            let p = kv
                .push_pull(&keys, &lens, &grad, 0)
                .and_then(|h| h.wait())
                .map_err(|e| format!("round {r}: {e}"))?;
            if r >= a.warmup {
                t_timed += t0.elapsed().as_secs_f64();
            }
            if mode == Consistency::Sync {
                for (i, v) in p.values.iter().enumerate() {
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
        if size >= a.max {
            break;
        }
        size = size.saturating_mul(a.factor).min(a.max);
        si += 1;
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
