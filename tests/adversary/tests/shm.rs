//! The shared-memory sockets of a running job's ranks (2 ranks, `braid-perf all_reduce
//! --elastic` over shm): abstract Unix sockets any local process finds in /proc/net/unix.
//! With and without a job token:
//!
//! * garbage: random bytes, a truncated hello, huge ring / segment / hello lengths, a hello
//!   without descriptors, eventfds where the segment should be, a segment of the wrong size or
//!   without the magic, a valid-looking segment with a hello of wrong ids, the same replayed,
//!   idle connections and 100 connections at once. Each attack adds a refusal line to the
//!   rank's log (checked one attack at a time), no process crashes, the job finishes with
//!   `#wrong 0` and no view change;
//!   (the garbage cases include a valid-looking segment truncated after it was passed);
//! * the confirmed attack (issue 16): a valid-looking, unsealed memfd segment passed to a
//!   process and truncated after it mapped it must not kill it. A collective rank does not
//!   touch a stranger's segment after its connections are up, but a push/pull server (over
//!   shm) reads a reader's rings as soon as it admits it: SIGBUS today. The server must refuse
//!   the segment (unsealed, or a stranger's credentials) and say so in its log.
//!
//! Run: `cargo build --workspace --bins && cargo test -p braid-adversary --test shm`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use braid_adversary::*;

const RING: u64 = 64 << 10;

fn refusals(p: &Proc) -> usize {
    p.lines().iter().filter(|l| is_refusal(l)).count()
}

/// Waits up to 1 s for `p`'s refusal count to exceed `before`.
fn refused_since(p: &Proc, before: usize) -> bool {
    let end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < end {
        if refusals(p) > before {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A valid-looking connection attempt: the fixed hello, `hello` inside, and the segment plus two
/// eventfds.
fn send_segment(sock: &OwnedFd, seg: &OwnedFd, hello: &[u8]) -> bool {
    let e0 = eventfd();
    let e1 = eventfd();
    let len = shm_seg_len(RING);
    unix_send(
        sock.as_raw_fd(),
        &shm_hello(RING, len, hello.len() as u32, hello),
        &[seg.as_raw_fd(), e0.as_raw_fd(), e1.as_raw_fd()],
    )
}

fn garbage(token: bool) {
    let _g = serial();
    let mut job = Job::start(Kind::Collective("shm"), token, 7.0);
    let mut p = Problems::default();
    let len = shm_seg_len(RING);
    let mut idle = Vec::new();
    for rank in 0..job.procs.len() {
        let pid = job.procs[rank].pid();
        let names = unix_listeners(pid);
        if names.is_empty() {
            p.add(format!(
                "rank {rank}: no abstract socket found in /proc/net/unix"
            ));
        }
        for name in names {
            for _ in 0..10 {
                if let Some(s) = unix_connect(&name) {
                    idle.push(s);
                }
            }
            let hello = data_hello(0x5eed, 1, 0, 123_456);
            type Attack = Box<dyn Fn(&OwnedFd) -> bool>;
            let h2 = hello.clone();
            let h3 = hello.clone();
            let h4 = hello.clone();
            let h5 = hello.clone();
            let h6 = hello.clone();
            let h7 = hello.clone();
            let cases: Vec<(&str, Attack)> = vec![
                (
                    "random bytes",
                    Box::new(|s| unix_send(s.as_raw_fd(), &random_bytes(512), &[])),
                ),
                (
                    "truncated hello",
                    Box::new(|s| unix_send(s.as_raw_fd(), b"BRDS\x02\x00\x00\x00\x01", &[])),
                ),
                (
                    "ring of 2^40 bytes",
                    Box::new(|s| {
                        let r = 1u64 << 40;
                        unix_send(s.as_raw_fd(), &shm_hello(r, shm_seg_len(r), 0, &[]), &[])
                    }),
                ),
                (
                    "hello length 4 GiB",
                    Box::new(move |s| {
                        unix_send(s.as_raw_fd(), &shm_hello(RING, len, u32::MAX, &[]), &[])
                    }),
                ),
                (
                    "no descriptors",
                    Box::new(move |s| {
                        unix_send(s.as_raw_fd(), &shm_hello(RING, len, 40, &h2), &[])
                    }),
                ),
                (
                    "eventfds instead of a segment",
                    Box::new(move |s| {
                        let (a, b, c) = (eventfd(), eventfd(), eventfd());
                        unix_send(
                            s.as_raw_fd(),
                            &shm_hello(RING, len, 40, &h3),
                            &[a.as_raw_fd(), b.as_raw_fd(), c.as_raw_fd()],
                        )
                    }),
                ),
                (
                    "segment of the wrong size",
                    Box::new(move |s| send_segment(s, &fake_segment(len / 2, RING), &h4)),
                ),
                (
                    "segment without the magic",
                    Box::new(move |s| {
                        let seg = fake_segment(len, RING);
                        truncate(&seg, 0);
                        truncate(&seg, len);
                        send_segment(s, &seg, &h5)
                    }),
                ),
                (
                    "valid-looking segment, hello with wrong ids",
                    Box::new(move |s| send_segment(s, &fake_segment(len, RING), &h6)),
                ),
                (
                    "the same hello replayed",
                    Box::new(move |s| send_segment(s, &fake_segment(len, RING), &h7)),
                ),
                (
                    "segment truncated after it was passed",
                    Box::new(move |s| {
                        let seg = fake_segment(len, RING);
                        let ok = send_segment(s, &seg, &hello);
                        std::thread::sleep(Duration::from_millis(50));
                        truncate(&seg, 0);
                        ok
                    }),
                ),
            ];
            for (what, attack) in cases {
                let before = refusals(&job.procs[rank]);
                let Some(s) = unix_connect(&name) else {
                    p.add(format!("rank {rank}: {what}: could not connect"));
                    continue;
                };
                if !attack(&s) {
                    p.add(format!("rank {rank}: {what}: could not send"));
                }
                if !refused_since(&job.procs[rank], before) {
                    p.add(format!("rank {rank}: {what}: no refusal in its log"));
                }
                drop(s);
            }
            let many: Vec<OwnedFd> = (0..100).filter_map(|_| unix_connect(&name)).collect();
            eprintln!("rank {rank}: {} of 100 connections at once", many.len());
            std::thread::sleep(Duration::from_millis(300));
            drop(many);
        }
    }
    job.attacks_done(&mut p);
    drop(idle);
    p.verdict(job.finish());
    p.check(&format!("shm garbage (token: {token})"), &job.dump());
}

#[test]
fn shm_socket_garbage_without_token() {
    garbage(false);
}

#[test]
fn shm_socket_garbage_with_token() {
    garbage(true);
}

/// Confirmed attack 3: a segment truncated after the target mapped it. `hello` is what the
/// stranger claims inside (its id or rank).
fn truncated_segment(kind: Kind, token: bool) {
    let _g = serial();
    let mut job = Job::start(kind, token, 4.0);
    let mut p = Problems::default();
    let len = shm_seg_len(RING);
    let targets: Vec<usize> = match kind {
        Kind::Collective(_) => (0..job.procs.len()).collect(),
        Kind::PushPull(_) => vec![0],
    };
    let ids = coord_status(&job.addr)
        .map(|s| member_ids(&s, "world"))
        .unwrap_or_else(|| vec![1, 2]);
    for t in targets {
        let pid = job.procs[t].pid();
        let names = unix_listeners(pid);
        if names.is_empty() {
            p.add(format!("{}: no abstract socket", job.procs[t].name));
        }
        for name in names {
            for delay_ms in [20u64, 200] {
                let before = refusals(&job.procs[t]);
                let hello = match kind {
                    // A reader's hello (id >= 2^63): admitted without a token today.
                    Kind::PushPull(_) => ps_hello((1 << 63) | 77),
                    Kind::Collective(_) => {
                        data_hello(0x5eed, 2, 0, ids.first().copied().unwrap_or(1))
                    }
                };
                let Some(s) = unix_connect(&name) else {
                    p.add(format!("{}: could not connect", job.procs[t].name));
                    continue;
                };
                let seg = fake_segment(len, RING);
                if !send_segment(&s, &seg, &hello) {
                    p.add(format!("{}: could not send", job.procs[t].name));
                }
                std::thread::sleep(Duration::from_millis(delay_ms));
                truncate(&seg, 0);
                std::thread::sleep(Duration::from_millis(400));
                if let Some(st) = job.procs[t].exited() {
                    p.add(format!(
                        "{} died after its segment was truncated ({delay_ms} ms): {st}",
                        job.procs[t].name
                    ));
                    break;
                }
                if !refused_since(&job.procs[t], before) {
                    p.add(format!(
                        "{}: no refusal of the unsealed segment in its log ({delay_ms} ms)",
                        job.procs[t].name
                    ));
                }
                drop(s);
            }
        }
    }
    p.verdict(job.finish());
    p.check(
        &format!("shm truncated segment {kind:?} (token: {token})"),
        &job.dump(),
    );
}

#[test]
fn shm_truncated_segment_does_not_kill_a_push_pull_server_without_token() {
    truncated_segment(Kind::PushPull("shm"), false);
}

#[test]
fn shm_truncated_segment_does_not_kill_a_push_pull_server_with_token() {
    truncated_segment(Kind::PushPull("shm"), true);
}
