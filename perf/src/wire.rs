//! `braid-perf wire_ceiling`: the most any push/pull over TCP can reach on this host, measured.
//!
//! ```text
//! braid-perf wire_ceiling --workers W --servers S [-b MIN] [-e MAX] [-f FACTOR] [-n ITERS]
//!     [-w WARMUP] [--sum]
//! ```
//!
//! The traffic of `braid-perf push_pull` with everything else taken away: every worker has one
//! TCP connection (loopback) to every server; a round sends SIZE/S bytes to each server and
//! reads as many back, and each server reads the whole chunk before it writes it back, as a
//! pull answer follows its push. No framing, no arithmetic, no copies but the kernel's, a
//! thread per connection end, preallocated buffers: what is left is the kernel's TCP path
//! and the scheduler, so no parameter server (braid's or ps-lite's) can move more bytes over
//! TCP on this machine. With `--sum` each server also adds every chunk it reads into an f32
//! sum (braid's SIMD kernel) and writes the sum back, as a server that aggregates must (and
//! as `pslite.sh --server-sum` does): the ceiling of an aggregating push/pull over TCP here.
//! Columns as push_pull's: `size round_us agg_GB/s`, where round_us is
//! the largest mean round of any connection after the warmup and agg_GB/s = 2 (push + pull)
//! x SIZE x W / round_us / 1e3.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Instant;

use braid::config::parse_bytes;

const USAGE: &str = "usage: braid-perf wire_ceiling --workers W --servers S [-b MIN] [-e MAX] [-f FACTOR] [-n ITERS] [-w WARMUP] [--sum]";

struct Args {
    workers: usize,
    servers: usize,
    min: usize,
    max: usize,
    factor: usize,
    iters: usize,
    warmup: usize,
    sum: bool,
}

fn parse(argv: &[String]) -> Result<Args, String> {
    let mut a = Args {
        workers: 2,
        servers: 2,
        min: 1 << 20,
        max: 1 << 20,
        factor: 4,
        iters: 10,
        warmup: 2,
        sum: false,
    };
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{k} needs a value\n{USAGE}"))
        };
        let num = |v: String| -> Result<usize, String> {
            parse_bytes(&v).ok_or_else(|| format!("{k} {v}: not a number\n{USAGE}"))
        };
        if k == "--sum" {
            a.sum = true;
            continue;
        }
        match k.as_str() {
            "--workers" => a.workers = num(val()?)?,
            "--servers" => a.servers = num(val()?)?,
            "-b" => a.min = num(val()?)?,
            "-e" => a.max = num(val()?)?,
            "-f" => a.factor = num(val()?)?,
            "-n" => a.iters = num(val()?)?,
            "-w" => a.warmup = num(val()?)?,
            _ => return Err(format!("unknown argument {k}\n{USAGE}")),
        }
    }
    if a.workers == 0 || a.servers == 0 || a.iters == 0 || a.factor < 2 {
        return Err(format!(
            "workers, servers and -n must be at least 1, -f at least 2\n{USAGE}"
        ));
    }
    if a.min < 4 * a.servers || a.max < a.min {
        return Err(format!(
            "sizes: {} to {} bytes (at least one f32 per server)\n{USAGE}",
            a.min, a.max
        ));
    }
    Ok(a)
}

/// One size: the largest mean round (seconds) over the workers' connections.
fn measure(a: &Args, size: usize) -> Result<f64, String> {
    let chunk = size / a.servers / 4 * 4;
    let sum = a.sum;
    let rounds = a.warmup + a.iters;
    let (warmup, iters) = (a.warmup, a.iters);
    let listeners: Vec<TcpListener> = (0..a.servers)
        .map(|_| TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}")))
        .collect::<Result<_, _>>()?;
    let mut dial = Vec::new();
    for _ in 0..a.workers {
        for l in &listeners {
            let addr = l.local_addr().map_err(|e| format!("local_addr: {e}"))?;
            dial.push(TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?);
        }
    }
    let mut accepted = Vec::new();
    for l in &listeners {
        for _ in 0..a.workers {
            accepted.push(l.accept().map_err(|e| format!("accept: {e}"))?.0);
        }
    }
    for s in dial.iter().chain(accepted.iter()) {
        s.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    }
    std::thread::scope(|sc| -> Result<f64, String> {
        // Servers: a thread per connection reads a whole chunk, then writes it back.
        for mut s in accepted {
            sc.spawn(move || -> Result<(), String> {
                let mut buf = vec![0u8; chunk];
                let mut acc = vec![0u8; if sum { chunk } else { 0 }];
                for _ in 0..rounds {
                    s.read_exact(&mut buf)
                        .map_err(|e| format!("server read: {e}"))?;
                    if sum {
                        braid::reduce::reduce_inplace(
                            braid::DataType::F32,
                            braid::ReduceOp::Sum,
                            &mut acc,
                            &buf,
                        )
                        .map_err(|e| format!("sum: {e}"))?;
                        s.write_all(&acc)
                    } else {
                        s.write_all(&buf)
                    }
                    .map_err(|e| format!("server write: {e}"))?;
                }
                Ok(())
            });
        }
        // Workers: a thread per connection writes its chunk, then reads the answer.
        let ends: Vec<_> = dial
            .into_iter()
            .map(|mut s| {
                sc.spawn(move || -> Result<f64, String> {
                    let src = vec![0u8; chunk];
                    let mut dst = vec![0u8; chunk];
                    let mut t0 = Instant::now();
                    for r in 0..rounds {
                        if r == warmup {
                            t0 = Instant::now();
                        }
                        s.write_all(&src)
                            .map_err(|e| format!("worker write: {e}"))?;
                        s.read_exact(&mut dst)
                            .map_err(|e| format!("worker read: {e}"))?;
                    }
                    Ok(t0.elapsed().as_secs_f64() / iters as f64)
                })
            })
            .collect();
        let mut worst = 0f64;
        for e in ends {
            let secs = e
                .join()
                .map_err(|_| "a worker thread panicked".to_string())??;
            worst = worst.max(secs);
        }
        Ok(worst)
    })
}

/// Runs `braid-perf wire_ceiling`.
pub fn main(argv: &[String]) -> ExitCode {
    let a = match parse(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("braid-perf wire_ceiling: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "# braid-perf wire_ceiling: {} workers, {} servers, tcp loopback, a thread per connection end, {}, iters {}, warmup {}",
        a.workers,
        a.servers,
        if a.sum { "servers sum (f32)" } else { "no arithmetic" },
        a.iters,
        a.warmup
    );
    println!("# {:>10} {:>12} {:>9}", "size(B)", "round_us", "agg_GB/s");
    for size in crate::size_steps(a.min, a.max, a.factor) {
        match measure(&a, size) {
            Ok(secs) => {
                let us = secs * 1e6;
                let agg = 2.0 * size as f64 * a.workers as f64 / us / 1e3;
                println!("{size:>12} {us:>12.1} {agg:>9.3}");
            }
            Err(e) => {
                eprintln!("braid-perf wire_ceiling: {e}");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}
