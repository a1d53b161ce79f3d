//! The tcp data ports of a running job's ranks (2 ranks, `braid-perf all_reduce --elastic`
//! over tcp; ports found in /proc), attacked with and without a job token: random bytes,
//! truncated and oversized socket hellos, a hello that is not braid's, hellos with wrong ids
//! (another view's nonce, a member id nobody has, a future epoch), the same hello replayed on
//! a second connection, a hello followed by a frame header with a huge length, slow senders
//! (idle connections, one byte per second) and 200 connections at once. Each refused
//! connection is named (by its address) in a "dropping" line of the rank's log; no process
//! crashes; the job finishes with `#wrong 0` and no view change.
//!
//! Run: `cargo build --workspace --bins && cargo test -p braid-adversary --test tcp_data`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::time::{Duration, Instant};

use braid_adversary::*;

const HOLD: Duration = Duration::from_millis(150);

fn garbage(token: bool) {
    let _g = serial();
    let mut job = Job::start(Kind::Collective("tcp"), token, 5.0);
    let mut p = Problems::default();
    let mut attackers: Vec<(String, String)> = Vec::new();
    let ids = coord_status(&job.addr)
        .map(|s| member_ids(&s, "world"))
        .unwrap_or_else(|| vec![1, 2]);
    let member = ids.first().copied().unwrap_or(1);
    let mut slows = Vec::new();
    for (rank, pid) in job.pids().into_iter().enumerate() {
        let ports = tcp_ports(pid);
        if ports.is_empty() {
            p.add(format!("rank {rank}: no listening tcp port found"));
        }
        for port in ports {
            slows.push(Slow::tcp(
                port,
                10,
                tcp_hello1(&data_hello(1, 1, 0, member)),
            ));
            let wrong_ids = tcp_hello1(&data_hello(0x5eed, 1, 0, 123_456));
            let mut random = random_bytes(2048);
            random[0] = 0xff;
            let cases: Vec<(&str, Vec<u8>)> = vec![
                ("random bytes", random),
                ("truncated socket hello", b"BRDT\x01\x00\x00".to_vec()),
                (
                    "socket hello with a 4 GiB hello length",
                    tcp_hello(0, 1, 65536, 7, u32::MAX, &[]),
                ),
                (
                    "socket hello with 65535 sockets",
                    tcp_hello(9, u16::MAX, 65536, 8, 0, &[]),
                ),
                (
                    "socket hello with stripe 0",
                    tcp_hello(0, 1, 0, 9, 40, &data_hello(1, 1, 0, member)),
                ),
                ("not a braid hello", tcp_hello1(&random_bytes(40))),
                (
                    "hello truncated inside the braid hello",
                    tcp_hello(0, 1, 65536, 10, 40, &data_hello(1, 1, 0, member)[..20]),
                ),
                ("hello with wrong nonce and member id", wrong_ids.clone()),
                ("the same hello replayed", wrong_ids),
                (
                    "hello claiming rank 0 of a future epoch",
                    tcp_hello1(&data_hello(0x5eed, 2, 0, member)),
                ),
                ("hello then a 2^62-byte frame", {
                    let mut v = tcp_hello1(&data_hello(0x5eed, 1, 0, member));
                    v.extend_from_slice(&tcp_frame(1, 0, 1, 1, 1 << 62));
                    v
                }),
            ];
            let cases = cases
                .into_iter()
                .map(|(w, b)| (format!("rank {rank}: {w}"), b))
                .collect();
            let (ok, failed) = tcp_send_all(port, cases, HOLD);
            attackers.extend(ok);
            for f in failed {
                p.add(format!("{f}: could not connect"));
            }
            let n = tcp_many(port, 200, b"BRDT", Duration::from_millis(500));
            eprintln!("rank {rank}: {n} of 200 connections at once connected");
        }
    }
    job.attacks_done(&mut p);
    drop(slows);
    p.verdict(job.finish());
    for u in unlogged(&job.procs_log(), &attackers) {
        p.add(format!("no refusal in the ranks' logs for: {u}"));
    }
    p.check(&format!("tcp data garbage (token: {token})"), &job.dump());
}

#[test]
fn tcp_data_port_garbage_without_token() {
    garbage(false);
}

#[test]
fn tcp_data_port_garbage_with_token() {
    garbage(true);
}

/// A stranger who knows the view (as a man in the middle of rank 0's coordinator connection
/// sees it, nonce included) connects to rank 1's data port as rank 0 BEFORE rank 0 does (a
/// proxy holds rank 0's view back until the stranger is in: the race made deterministic).
/// The first connection must not win by arriving first: the stranger is refused (it cannot
/// answer the acceptor's challenge, nor MAC the hello with a token), rank 1 takes the real
/// rank 0, and the job runs undisturbed.
fn first_comer(token: bool) {
    let _g = serial();
    let proxy = std::cell::OnceCell::new();
    let mut job = Job::launch(Kind::Collective("tcp"), token, 4.0, &|i, addr| {
        if i == 0 {
            proxy.get_or_init(|| CoordProxy::start(addr)).addr.clone()
        } else {
            addr.to_string()
        }
    });
    let proxy = proxy.get().unwrap();
    let mut p = Problems::default();
    // The real view, as a man in the middle sees it (the strongest stranger: it knows the
    // view's nonce).
    let view = proxy.held_view(Duration::from_secs(60)).unwrap_or_default();
    let leaked = view_request(&job.addr, "world")
        .and_then(|v| v["view"]["nonce"].as_u64())
        .filter(|n| *n != 0 && Some(*n) == view["view"]["nonce"].as_u64());
    eprintln!(
        "a ViewReq {} the view's nonce to a stranger",
        if leaked.is_some() {
            "gives"
        } else {
            "does not give"
        }
    );
    let nonce = view["view"]["nonce"].as_u64();
    let epoch = view["view"]["epoch"].as_u64().unwrap_or(1);
    let id0 = view["view"]["members"][0]["id"].as_u64();
    let mut attacker = None;
    match (nonce, id0) {
        (Some(nonce), Some(id0)) => {
            let pid1 = job.procs[1].pid();
            let end = Instant::now() + Duration::from_secs(10);
            let mut ports = tcp_ports(pid1);
            while ports.is_empty() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
                ports = tcp_ports(pid1);
            }
            for port in ports {
                if let Some(mut s) = tcp_connect(port) {
                    let local = s.local_addr().unwrap().to_string();
                    let _ = s.write_all(&tcp_hello1(&data_hello(nonce, epoch, 0, id0)));
                    attacker = Some((s, local));
                }
            }
            if attacker.is_none() {
                p.add("could not connect to rank 1's data port");
            }
        }
        _ => p.add(format!("no view seen: {view}")),
    }
    // Rank 1 sees the stranger first; then rank 0 gets its view and connects.
    std::thread::sleep(Duration::from_millis(500));
    proxy.release();
    std::thread::sleep(Duration::from_millis(2500));
    let local = attacker.map(|(s, l)| {
        drop(s);
        l
    });
    p.verdict(job.finish());
    if let Some(l) = local {
        for u in unlogged(&job.procs[1].lines(), &[("a stranger as rank 0".into(), l)]) {
            p.add(format!("no refusal in rank 1's log for: {u}"));
        }
    }
    p.check(
        &format!("tcp data first comer as rank 0 (token: {token})"),
        &job.dump(),
    );
}

#[test]
fn tcp_data_port_a_stranger_arriving_first_as_rank_0_is_refused_without_token() {
    first_comer(false);
}

#[test]
fn tcp_data_port_a_stranger_arriving_first_as_rank_0_is_refused_with_token() {
    first_comer(true);
}
