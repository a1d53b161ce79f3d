//! The push/pull server's data port of a running job (`braid-perf push_pull --drill`: 1 server,
//! 2 workers over tcp; the port found in /proc), with and without a job token:
//!
//! * garbage: random bytes, a truncated socket hello, a hello that is not push/pull's, a
//!   member id nobody has, a reader's hello (id >= 2^63, never announced by the coordinator)
//!   followed by a truncated prefix, a bad magic, a 4 GiB header length or a write (roles), a
//!   worker's id replayed by a stranger followed by a push, a hand-over or a replication
//!   (server-only messages), slow senders and 200 connections at once. Each stranger is
//!   refused with a log line naming its address; no process crashes; the workers finish with
//!   `#wrong 0`, no lost update and no error;
//! * the confirmed attack (issue 16): a reader's hello then a message whose body length is
//!   2^40 (today: "memory allocation of 1099511627776 bytes failed", SIGABRT, without a token).
//!
//! Run: `cargo build --workspace --bins && cargo test -p braid-adversary --test push_pull`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use braid_adversary::*;

const HOLD: Duration = Duration::from_millis(200);
const READER: u64 = (1 << 63) | 4242;

fn server_port(job: &Job, p: &mut Problems) -> Option<u16> {
    let ports = tcp_ports(job.server().pid());
    if ports.is_empty() {
        p.add("the server has no listening tcp port");
    }
    ports.first().copied()
}

fn garbage(token: bool) {
    let _g = serial();
    let mut job = Job::start(Kind::PushPull("tcp"), token, 4.0);
    let mut p = Problems::default();
    let Some(port) = server_port(&job, &mut p) else {
        p.check("push/pull garbage", &job.dump());
        return;
    };
    // Worker ids, as a stranger sees them (without a token: the status request; with one:
    // guessed, ids are small counters).
    let ids = coord_status(&job.addr)
        .map(|s| member_ids(&s, "ps"))
        .unwrap_or_else(|| vec![2, 3]);
    let worker = ids.last().copied().unwrap_or(3);
    let slow = Slow::tcp(port, 10, tcp_hello1(&ps_hello(READER)));
    let reader = |extra: &[u8]| {
        let mut v = tcp_hello1(&ps_hello(READER));
        v.extend_from_slice(extra);
        v
    };
    let push = br#"{"t":"Push","req":1,"op":1,"prio":0,"dtype":"f64","parts":[{"s":0,"k":0,"p":0,"n":8}]}"#;
    let mut random = random_bytes(2048);
    random[0] = 0xff;
    let cases: Vec<(String, Vec<u8>)> = vec![
        ("random bytes".into(), random),
        ("truncated socket hello".into(), b"BRDT\x01".to_vec()),
        (
            "not a push/pull hello".into(),
            tcp_hello1(b"BRPX\x01\x02\x03\x04\x05\x06\x07\x08"),
        ),
        (
            "a member id nobody has".into(),
            tcp_hello1(&ps_hello(123_456)),
        ),
        (
            "reader hello, truncated prefix".into(),
            reader(&tcp_frame(1, 0, 1, 1, 16)),
        ),
        (
            "reader hello, bad magic".into(),
            reader(&tcp_msg(
                1,
                b"XXXX\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
            )),
        ),
        (
            "reader hello, 4 GiB header length".into(),
            reader(&tcp_msg(1, &ps_prefix(u32::MAX, 0))),
        ),
        (
            "reader hello, then a write (role)".into(),
            reader(&ps_msg_tcp(push, &[0u8; 8])),
        ),
        (format!("worker {worker}'s id replayed, then a push"), {
            let mut v = tcp_hello1(&ps_hello(worker));
            v.extend_from_slice(&ps_msg_tcp(push, &1e9f64.to_le_bytes()));
            v
        }),
    ];
    let mut cases = cases;
    for (what, hdr) in [
        (
            "a hand-over (server only)",
            br#"{"t":"Transfer","dumps":{},"seen":[]}"#.to_vec(),
        ),
        (
            "a replication (server only)",
            br#"{"t":"Replicate","seq":1,"worker":2,"op":{"t":"SnapVer","req":1}}"#.to_vec(),
        ),
    ] {
        let mut v = tcp_hello1(&ps_hello(worker));
        v.extend_from_slice(&ps_msg_tcp(&hdr, &[]));
        cases.push((format!("worker {worker}'s id replayed, then {what}"), v));
    }
    let (ok, failed) = tcp_send_all(port, cases, HOLD);
    for f in failed {
        p.add(format!("{f}: could not connect"));
    }
    let n = tcp_many(port, 200, b"BRDT", Duration::from_millis(500));
    eprintln!("{n} of 200 connections at once connected");
    job.attacks_done(&mut p);
    drop(slow);
    p.verdict(job.finish());
    for u in unlogged(&job.server().lines(), &ok) {
        p.add(format!("no refusal in the server's log for: {u}"));
    }
    p.check(&format!("push/pull garbage (token: {token})"), &job.dump());
}

#[test]
fn push_pull_port_garbage_without_token() {
    garbage(false);
}

#[test]
fn push_pull_port_garbage_with_token() {
    garbage(true);
}

/// Confirmed attack 1: a reader's hello, then a body length of 2^40.
fn huge_body(token: bool) {
    let _g = serial();
    let mut job = Job::start(Kind::PushPull("tcp"), token, 3.0);
    let mut p = Problems::default();
    let Some(port) = server_port(&job, &mut p) else {
        p.check("push/pull huge body", &job.dump());
        return;
    };
    let mut bytes = tcp_hello1(&ps_hello(READER));
    bytes.extend_from_slice(&tcp_msg(1, &ps_prefix(2, 1 << 40)));
    bytes.extend_from_slice(&tcp_msg(2, b"{}"));
    let (ok, failed) = tcp_send_all(
        port,
        vec![("reader hello, body length 2^40".into(), bytes)],
        Duration::from_millis(500),
    );
    for f in failed {
        p.add(format!("{f}: could not connect"));
    }
    if let Some(st) = job.procs[0].exited() {
        p.add(format!("the server died: {st}"));
    }
    p.verdict(job.finish());
    for u in unlogged(&job.server().lines(), &ok) {
        p.add(format!("no refusal in the server's log for: {u}"));
    }
    p.check(
        &format!("push/pull huge body (token: {token})"),
        &job.dump(),
    );
}

#[test]
fn push_pull_huge_body_length_is_refused_without_token() {
    huge_body(false);
}

#[test]
fn push_pull_huge_body_length_is_refused_with_token() {
    huge_body(true);
}
