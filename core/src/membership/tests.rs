//! Unit tests of the coordinator, the client and the protocol.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::proto::{self, MsgType};
use super::*;
use crate::error::Error;

fn reg(group: &str, n: usize, rank: Option<usize>) -> Registration {
    Registration::worker(group, n, rank, vec![rank.map_or(0xff, |r| r as u8), 1, 2])
}

fn secs(s: f64) -> Instant {
    Instant::now() + Duration::from_secs_f64(s)
}

fn coord() -> (Coordinator, String) {
    let c = Coordinator::bind("127.0.0.1:0").unwrap();
    let a = c.local_addr().to_string();
    (c, a)
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let end = secs(10.0);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Spawns a rendezvous on a thread.
fn spawn_rdv(
    addr: &str,
    r: Registration,
) -> thread::JoinHandle<crate::error::Result<(Client, u64, View)>> {
    let addr = addr.to_string();
    thread::spawn(move || rendezvous(&addr, &r, secs(20.0), &AtomicBool::new(false)))
}

/// Spawns `n` elastic members of `group` (world 2, join window 5 s) that register with
/// `opts` and acknowledge their first view as a communicator does.
fn spawn_members(
    addr: &str,
    opts: &ClientOptions,
    group: &'static str,
    n: usize,
    within_s: f64,
) -> Vec<thread::JoinHandle<(Client, u64, View)>> {
    (0..n)
        .map(|_| {
            let (addr, opts) = (addr.to_string(), opts.clone());
            thread::spawn(move || {
                let r = rendezvous_with(
                    &addr,
                    &elastic_reg(group, 2, 5000),
                    &opts,
                    secs(within_s),
                    &AtomicBool::new(false),
                )
                .unwrap();
                r.0.installed(r.2.epoch);
                r
            })
        })
        .collect()
}

/// Registers over a raw socket; returns the socket and the acknowledged member id.
fn raw_register(addr: &str, r: &Registration) -> (TcpStream, u64) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&proto::encode(MsgType::Register, r).unwrap())
        .unwrap();
    let f = proto::read_frame(&mut s, Some(secs(5.0)), Duration::from_secs(5), &|| false).unwrap();
    assert_eq!(
        f.ty,
        MsgType::Registered as u16,
        "{:?}",
        String::from_utf8_lossy(&f.payload)
    );
    let ack: proto::Registered = f.body().unwrap();
    (s, ack.member_id)
}

/// Reads frames until the coordinator closes; returns the error messages seen.
fn drain_until_closed(s: &mut TcpStream) -> Vec<String> {
    let mut msgs = Vec::new();
    loop {
        match proto::read_frame(s, Some(secs(5.0)), Duration::from_secs(5), &|| false) {
            Ok(f) => {
                if f.ty == MsgType::Error as u16 {
                    msgs.push(f.body::<proto::ErrorMsg>().unwrap().message);
                }
            }
            Err(proto::FrameError::Closed) | Err(proto::FrameError::Io(_)) => return msgs,
            Err(e) => panic!("coordinator did not close the connection: {e}"),
        }
    }
}

/// Sends a rejoin over a raw socket, answers the challenge with `member` as the member proof
/// (no job token), and returns the error messages until the coordinator closes.
fn raw_rejoin(addr: &str, group: &str, id: u64, member: Option<String>) -> Vec<String> {
    let mut s = TcpStream::connect(addr).unwrap();
    let rj = proto::Rejoin {
        group: group.into(),
        member_id: id,
        epoch: 1,
        client_nonce: "c0ffee".into(),
        view_deltas: false,
    };
    s.write_all(&proto::encode(MsgType::Rejoin, &rj).unwrap())
        .unwrap();
    let f = proto::read_frame(&mut s, Some(secs(5.0)), Duration::from_secs(5), &|| false).unwrap();
    assert_eq!(
        f.ty,
        MsgType::Challenge as u16,
        "a rejoin is always challenged"
    );
    let ch: proto::Challenge = f.body().unwrap();
    assert!(!ch.token);
    let auth = proto::Auth {
        mac: String::new(),
        member,
    };
    s.write_all(&proto::encode(MsgType::Auth, &auth).unwrap())
        .unwrap();
    drain_until_closed(&mut s)
}

fn refusal(addr: &str, r: &Registration) -> String {
    match rendezvous(addr, r, secs(10.0), &AtomicBool::new(false)) {
        Err(Error::Coordinator(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn frames_round_trip_and_reject_garbage() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mut a = TcpStream::connect(addr).unwrap();
    let (mut b, _) = l.accept().unwrap();
    let body = proto::ErrorMsg {
        message: "hé".into(),
        code: None,
    };
    a.write_all(&proto::encode(MsgType::Error, &body).unwrap())
        .unwrap();
    let f = proto::read_frame(&mut b, Some(secs(5.0)), Duration::from_secs(5), &|| false).unwrap();
    assert_eq!((f.version, f.ty), (proto::VERSION, MsgType::Error as u16));
    assert_eq!(f.body::<proto::ErrorMsg>().unwrap(), body);
    // Oversize length.
    a.write_all(&[b'B', b'R', b'D', b'C', 0, 1, 0, 1, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    let e =
        proto::read_frame(&mut b, Some(secs(5.0)), Duration::from_secs(5), &|| false).unwrap_err();
    assert!(matches!(e, proto::FrameError::Oversize { .. }), "{e}");
    // Bad magic.
    a.write_all(b"GET / HTTP/1").unwrap(); // exactly one header long
    let e =
        proto::read_frame(&mut b, Some(secs(5.0)), Duration::from_secs(5), &|| false).unwrap_err();
    assert!(matches!(e, proto::FrameError::BadMagic(_)), "{e}");
    // Idle deadline and stop flag.
    let t = Instant::now();
    let e =
        proto::read_frame(&mut b, Some(secs(0.2)), Duration::from_secs(5), &|| false).unwrap_err();
    assert!(matches!(e, proto::FrameError::Idle), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2));
    let e = proto::read_frame(&mut b, None, Duration::from_secs(5), &|| true).unwrap_err();
    assert!(matches!(e, proto::FrameError::Stopped), "{e}");
    // Stalled frame (header started, rest never comes) and truncation.
    a.write_all(b"BRD").unwrap();
    let e = proto::read_frame(&mut b, Some(secs(5.0)), Duration::from_millis(200), &|| {
        false
    })
    .unwrap_err();
    assert!(matches!(e, proto::FrameError::Stalled { got: 3 }), "{e}");
    a.write_all(&proto::encode_raw(1, 1, b"{}")[..8]).unwrap();
    drop(a);
    let e =
        proto::read_frame(&mut b, Some(secs(5.0)), Duration::from_secs(5), &|| false).unwrap_err();
    assert!(
        matches!(e, proto::FrameError::Truncated { got: 8, want: 12 }),
        "{e}"
    );
}

#[test]
fn handles_travel_as_hex() {
    let mut r = reg("world", 2, Some(1));
    r.handle = vec![0, 0x7f, 0xff, 0x10];
    let j = serde_json::to_string(&r).unwrap();
    assert!(j.contains("\"handle\":\"007fff10\""), "{j}");
    assert_eq!(serde_json::from_str::<Registration>(&j).unwrap(), r);
    for bad in ["\"0\"", "\"zz\"", "[1,2]"] {
        let j2 = j.replace("\"007fff10\"", bad);
        assert!(serde_json::from_str::<Registration>(&j2).is_err(), "{j2}");
    }
}

#[test]
fn host_names_and_ids() {
    let h = local_hostname();
    assert!(!h.is_empty());
    let id = local_host_id();
    assert!(id.ends_with(&h), "{id} / {h}");
    assert_eq!(id, local_host_id());
    assert_ne!(random_u64(1), random_u64(1));
}

#[test]
fn single_member_view() {
    let (c, addr) = coord();
    let r = reg("world", 1, None);
    let (client, id, view) = rendezvous(&addr, &r, secs(10.0), &AtomicBool::new(false)).unwrap();
    assert_eq!(client.member_id(), id);
    assert_eq!(client.group(), "world");
    assert_eq!(view.epoch, 1);
    assert_ne!(view.nonce, 0);
    assert_eq!(view.members.len(), 1);
    let m = &view.members[0];
    assert_eq!(
        (m.id, &m.host_id, &m.hostname, m.pid, m.role, &m.handle),
        (id, &r.host_id, &r.hostname, r.pid, Role::Worker, &r.handle)
    );
    assert_eq!(view.rank_of(id), Some(0));
    assert!(client.local_addr().unwrap().ip().is_loopback());
    drop(c);
}

#[test]
fn requested_ranks_are_honoured_and_free_positions_filled_in_arrival_order() {
    let (c, addr) = coord();
    // Arrival order: A(any), B(rank 2), C(any), D(rank 0).
    let wants = [None, Some(2), None, Some(0)];
    let mut handles = Vec::new();
    for (i, w) in wants.iter().enumerate() {
        handles.push(spawn_rdv(&addr, reg("world", 4, *w)));
        if i < 3 {
            wait_until("registration", || c.registered("world") == i + 1);
        }
    }
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    let ids: Vec<u64> = results.iter().map(|r| r.1).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids by arrival: {ids:?}"
    );
    let view = &results[0].2;
    for r in &results {
        assert_eq!(&r.2, view, "all members see the same view");
    }
    // rank 0 = D, rank 1 = A, rank 2 = B, rank 3 = C.
    let by_rank: Vec<u64> = view.members.iter().map(|m| m.id).collect();
    assert_eq!(by_rank, vec![ids[3], ids[0], ids[1], ids[2]]);
    assert_eq!(view.members[2].handle[0], 2);
}

#[test]
fn ids_strictly_increase_across_groups_and_after_a_dropped_registration() {
    let (c, addr) = coord();
    let (_a, id_a, _) = rendezvous(
        &addr,
        &reg("a", 1, None),
        secs(10.0),
        &AtomicBool::new(false),
    )
    .unwrap();
    // Registered in group b, then the process "dies" before the view.
    let (s, id_dropped) = raw_register(&addr, &reg("b", 2, Some(0)));
    assert!(id_dropped > id_a);
    assert_eq!(c.registered("b"), 1);
    drop(s);
    wait_until("retirement", || c.registered("b") == 0);
    // The restarted process gets the same rank again, with a new id.
    let h0 = spawn_rdv(&addr, reg("b", 2, Some(0)));
    let h1 = spawn_rdv(&addr, reg("b", 2, None));
    let (_c0, id0, v0) = h0.join().unwrap().unwrap();
    let (_c1, id1, v1) = h1.join().unwrap().unwrap();
    assert_eq!(v0, v1);
    assert!(id0 > id_dropped && id1 > id_dropped);
    assert_ne!(id0, id1);
    assert_eq!(v0.rank_of(id0), Some(0));
    assert!(!v0.members.iter().any(|m| m.id == id_dropped));
    let (_d, id_d, _) = rendezvous(
        &addr,
        &reg("c", 1, None),
        secs(10.0),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert!(id_d > id0.max(id1));
}

#[test]
fn refusals_are_clear_errors() {
    let (c, addr) = coord();
    let (_s, _) = raw_register(&addr, &reg("world", 3, Some(1)));
    // World size mismatch.
    let m = refusal(&addr, &reg("world", 4, None));
    assert!(m.contains("world size 3") && m.contains("says 4"), "{m}");
    // Duplicate requested rank.
    let m = refusal(&addr, &reg("world", 3, Some(1)));
    assert!(m.contains("rank 1") && m.contains("already taken"), "{m}");
    // Rank not below the world size: refused by the client before sending...
    let e = rendezvous(
        &addr,
        &reg("world", 3, Some(3)),
        secs(5.0),
        &AtomicBool::new(false),
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    // ... and by the coordinator.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&proto::encode(MsgType::Register, &reg("world", 3, Some(7))).unwrap())
        .unwrap();
    let m = drain_until_closed(&mut s);
    assert!(
        m[0].contains("rank 7 is not below the world size 3"),
        "{m:?}"
    );
    // A weight that is not a positive number.
    let mut r = reg("world", 3, None);
    r.weight = -1.0;
    let m = refusal(&addr, &r);
    assert!(m.contains("weight -1"), "{m}");
    assert_eq!(c.registered("world"), 1);
    // Complete group.
    let h0 = spawn_rdv(&addr, reg("world", 3, None));
    let h2 = spawn_rdv(&addr, reg("world", 3, None));
    let done: Vec<_> = [h0, h2]
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    let m = refusal(&addr, &reg("world", 3, None));
    assert_eq!(
        m,
        "group world is complete (3 members); elastic join is not enabled (BRAID_ELASTIC=1)"
    );
    drop(done);
}

#[test]
fn other_protocol_version_gets_a_clear_message() {
    let (c, addr) = coord();
    let mut s = TcpStream::connect(&addr).unwrap();
    let payload = serde_json::to_vec(&reg("world", 2, None)).unwrap();
    s.write_all(&proto::encode_raw(2, MsgType::Register as u16, &payload))
        .unwrap();
    let msgs = drain_until_closed(&mut s);
    assert_eq!(
        msgs,
        vec!["coordinator speaks protocol v1, client sent v2".to_string()]
    );
    assert_eq!(c.registered("world"), 0);
}

#[test]
fn client_validates_replies() {
    // A "coordinator" that answers with garbage, with another version, or not at all.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let server = thread::spawn(move || {
        let replies: Vec<Vec<u8>> = vec![
            b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
            proto::encode_raw(2, MsgType::Registered as u16, b"{}"),
            proto::encode_raw(2, MsgType::Error as u16, b"{\"message\":\"v2 says no\"}"),
            proto::encode_raw(1, MsgType::View as u16, b"not json"),
            proto::encode_raw(1, 77, b"{}"),
        ];
        for r in replies {
            let (mut s, _) = l.accept().unwrap();
            let _ = proto::read_frame(&mut s, Some(secs(5.0)), Duration::from_secs(5), &|| false);
            s.write_all(&r).unwrap();
            thread::sleep(Duration::from_millis(100));
        }
    });
    let expect = [
        "not the braid coordinator protocol",
        "speaks protocol v2, this client speaks v1",
        "v2 says no",
        "invalid reply",
        "unexpected message type 77",
    ];
    for want in expect {
        match rendezvous(
            &addr,
            &reg("world", 2, None),
            secs(10.0),
            &AtomicBool::new(false),
        ) {
            Err(Error::Coordinator(m)) => assert!(m.contains(want), "{m} / {want}"),
            other => panic!("{other:?}"),
        }
    }
    server.join().unwrap();
}

#[test]
fn garbage_connections_do_not_disturb_a_concurrent_rendezvous() {
    let opts = CoordinatorOptions {
        handshake_timeout: Duration::from_millis(500),
        frame_timeout: Duration::from_millis(500),
        ..CoordinatorOptions::default()
    };
    let c = Coordinator::bind_with("127.0.0.1:0", opts).unwrap();
    let addr = c.local_addr().to_string();
    let garbage: Vec<Vec<u8>> = vec![
        // Random bytes.
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect(),
        // Truncated header, then close.
        b"BRDC\x00".to_vec(),
        // Truncated payload, then close.
        proto::encode_raw(1, 1, b"{\"group\":\"world\"}")[..20].to_vec(),
        // Oversize length.
        vec![b'B', b'R', b'D', b'C', 0, 1, 0, 1, 0x7f, 0xff, 0xff, 0xff],
        // Valid frame, payload not a registration.
        proto::encode_raw(1, 1, b"[1,2,3]"),
        // Valid frame of the wrong type.
        proto::encode_raw(1, MsgType::View as u16, b"{}"),
        // Half a header that never completes (stalls; dropped after the frame timeout).
        b"BRD".to_vec(),
        // Nothing at all (dropped after the handshake timeout).
        Vec::new(),
    ];
    let mut bad = Vec::new();
    let mut clients = Vec::new();
    for (i, g) in garbage.into_iter().enumerate() {
        let close = i < 3;
        let a = addr.clone();
        bad.push(thread::spawn(move || {
            let mut s = TcpStream::connect(&a).unwrap();
            s.write_all(&g).unwrap();
            if close {
                return;
            }
            // The coordinator must close the connection (maybe after an error frame).
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let t = Instant::now();
            let mut buf = [0u8; 256];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(4),
                "garbage connection {i} not dropped"
            );
        }));
        if i % 3 == 0 {
            clients.push(spawn_rdv(&addr, reg("world", 3, None)));
        }
    }
    let results: Vec<_> = clients
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    for b in bad {
        b.join().unwrap();
    }
    assert_eq!(results.len(), 3);
    let v = &results[0].2;
    assert_eq!(v.members.len(), 3);
    assert!(results.iter().all(|r| &r.2 == v));
    assert_eq!(c.registered("world"), 3);
}

#[test]
fn abort_stops_a_waiting_rendezvous_promptly() {
    let (c, addr) = coord();
    let abort = Arc::new(AtomicBool::new(false));
    let a2 = Arc::clone(&abort);
    let setter = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        a2.store(true, std::sync::atomic::Ordering::SeqCst);
        Instant::now()
    });
    let e = rendezvous(&addr, &reg("world", 2, None), secs(30.0), &abort).unwrap_err();
    let set_at = setter.join().unwrap();
    assert_eq!(e, Error::Aborted);
    assert!(
        set_at.elapsed() < Duration::from_millis(500),
        "{:?}",
        set_at.elapsed()
    );
    wait_until("retirement", || c.registered("world") == 0);

    // Also while the coordinator is unreachable.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap().to_string();
    drop(l);
    let abort = Arc::new(AtomicBool::new(false));
    let a2 = Arc::clone(&abort);
    let setter = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        a2.store(true, std::sync::atomic::Ordering::SeqCst);
        Instant::now()
    });
    let e = rendezvous(&dead, &reg("world", 2, None), secs(30.0), &abort).unwrap_err();
    let set_at = setter.join().unwrap();
    assert_eq!(e, Error::Aborted);
    assert!(
        set_at.elapsed() < Duration::from_millis(500),
        "{:?}",
        set_at.elapsed()
    );
}

#[test]
fn deadline_when_the_group_never_completes() {
    let (c, addr) = coord();
    let t = Instant::now();
    let e = rendezvous(
        &addr,
        &reg("world", 2, None),
        secs(0.5),
        &AtomicBool::new(false),
    )
    .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2));
    match &e {
        Error::Timeout { what, secs } => {
            assert!(what.contains(&addr) && what.contains("1 of 2"), "{what}");
            assert!(*secs >= 0.4, "{secs}");
        }
        other => panic!("{other:?}"),
    }
    wait_until("retirement", || c.registered("world") == 0);
}

#[test]
fn unreachable_coordinator_is_retried_until_the_deadline() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let e = rendezvous(
        &addr,
        &reg("world", 1, None),
        secs(0.4),
        &AtomicBool::new(false),
    )
    .unwrap_err();
    match &e {
        Error::Timeout { what, .. } => assert!(what.contains(&addr), "{what}"),
        other => panic!("{other:?}"),
    }
    // A coordinator that comes up late is found.
    let h = spawn_rdv(&addr, reg("world", 1, None));
    thread::sleep(Duration::from_millis(300));
    let c = Coordinator::bind(&addr).unwrap();
    let (_client, _, v) = h.join().unwrap().unwrap();
    assert_eq!(v.members.len(), 1);
    drop(c);
    // A malformed address is an argument error, not a retry loop.
    let e = rendezvous(
        "no-port",
        &reg("world", 1, None),
        secs(5.0),
        &AtomicBool::new(false),
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

#[test]
fn completed_group_is_forgotten_when_all_members_left() {
    let (c, addr) = coord();
    let h0 = spawn_rdv(&addr, reg("world", 2, None));
    let h1 = spawn_rdv(&addr, reg("world", 2, None));
    let a = h0.join().unwrap().unwrap();
    let b = h1.join().unwrap().unwrap();
    assert_eq!(c.registered("world"), 2);
    drop(a);
    wait_until("departure", || c.registered("world") == 1);
    // Still complete while a member remains.
    let m = refusal(&addr, &reg("world", 2, None));
    assert!(m.contains("complete (2 members)"), "{m}");
    drop(b);
    wait_until("group forgotten", || c.registered("world") == 0);
    let (_x, _, v) = rendezvous(
        &addr,
        &reg("world", 1, None),
        secs(10.0),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(v.epoch, 1);
}

#[test]
fn shutdown_is_prompt_with_open_connections() {
    let (mut c, addr) = coord();
    let waiting = spawn_rdv(&addr, reg("world", 2, None));
    let (_done, _, _) = rendezvous(
        &addr,
        &reg("other", 1, None),
        secs(10.0),
        &AtomicBool::new(false),
    )
    .unwrap();
    wait_until("registration", || c.registered("world") == 1);
    let idle = TcpStream::connect(&addr).unwrap();
    let t = Instant::now();
    c.shutdown();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    c.shutdown(); // idempotent
    let e = waiting.join().unwrap().unwrap_err();
    assert!(matches!(e, Error::Coordinator(_) | Error::System(_)), "{e}");
    drop(idle);
}

fn elastic_reg(group: &str, n: usize, hb_ms: u64) -> Registration {
    let mut r = reg(group, n, None);
    r.elastic = true;
    r.heartbeat_timeout_ms = hb_ms;
    r.policy.join_window_ms = 100;
    r
}

#[test]
fn a_member_declared_dead_is_refused_when_it_comes_back() {
    let (c, addr) = coord();
    // Member 1 sends heartbeats (through its client); member 2 registers raw and stays silent.
    let h = {
        let addr = addr.clone();
        thread::spawn(move || {
            rendezvous_with(
                &addr,
                &elastic_reg("g", 2, 5000),
                &ClientOptions {
                    token: None,
                    heartbeat: Duration::from_millis(100),
                    silence: Duration::ZERO,
                },
                secs(10.0),
                &AtomicBool::new(false),
            )
            .unwrap()
        })
    };
    let (mut silent, id) = raw_register(&addr, &elastic_reg("g", 2, 400));
    let (client, _, view) = h.join().unwrap();
    client.installed(view.epoch);
    // The silent member gets its view, then is declared dead after 400 ms without a frame.
    let msgs = drain_until_closed(&mut silent);
    assert!(msgs.iter().any(|m| m.contains("declared dead")), "{msgs:?}");
    // The survivor is told: the next view excludes it.
    let top = client
        .wait_epoch(2, secs(10.0), &AtomicBool::new(false))
        .unwrap();
    let (v2, why) = client.view_of(top).unwrap();
    assert_eq!(v2.members.len(), 1);
    assert!(
        why.contains(&format!("failure of {id}")) && why.contains("heartbeat"),
        "{why}"
    );
    // It comes back with its old id: refused, its id is retired.
    let m = raw_rejoin(&addr, "g", id, Some("00".into()));
    assert!(
        m[0].contains("retired") && m[0].contains(&id.to_string()),
        "{m:?}"
    );
    // The history records why.
    let st = c.status();
    let hist = st["groups"][0]["history"].as_array().unwrap();
    assert!(
        hist.iter()
            .any(|h| h["reason"].as_str().unwrap().contains("no heartbeat")),
        "{st}"
    );
}

#[test]
fn a_join_storm_is_admitted_in_few_view_changes() {
    let (c, addr) = coord();
    let opts = ClientOptions {
        token: None,
        heartbeat: Duration::from_millis(200),
        silence: Duration::ZERO,
    };
    // A running group of 2 (members acknowledge their views as a communicator does).
    let first: Vec<_> = spawn_members(&addr, &opts, "s", 2, 20.0);
    let first: Vec<_> = first.into_iter().map(|h| h.join().unwrap()).collect();
    // 32 light joiners (membership clients without a data plane) at once.
    let t0 = Instant::now();
    let joiners: Vec<_> = spawn_members(&addr, &opts, "s", 32, 30.0);
    // The running members follow the views as they come (as update() would).
    let stop = Arc::new(AtomicBool::new(false));
    let followers: Vec<_> = first
        .into_iter()
        .map(|(client, _, _)| {
            let stop = stop.clone();
            thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let top = client.announced_epoch();
                    if top > client.installed_epoch() {
                        client.installed(top);
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                client
            })
        })
        .collect();
    let joined: Vec<_> = joiners.into_iter().map(|h| h.join().unwrap()).collect();
    let admitted = t0.elapsed();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _clients: Vec<_> = followers.into_iter().map(|h| h.join().unwrap()).collect();
    let st = c.status();
    let g = &st["groups"][0];
    let epochs = g["epoch"].as_u64().unwrap();
    eprintln!(
        "32 joiners admitted in {:.3} s over {} view change(s)",
        admitted.as_secs_f64(),
        epochs - 1
    );
    assert_eq!(g["size"], 34, "{st}");
    assert!(
        epochs - 1 <= 4,
        "32 joiners took {} view changes",
        epochs - 1
    );
    // Ids of the joiners are above those of the running members; ranks follow ids.
    let last = &joined.iter().max_by_key(|r| r.2.epoch).unwrap().2;
    let ids: Vec<u64> = last.members.iter().map(|m| m.id).collect();
    assert!(ids[2..].windows(2).all(|w| w[0] < w[1]), "{ids:?}");
}

// ---------------------------------------------------------------------------------------------
// Hardening (issue 16).

#[test]
fn reader_grant_has_a_fresh_id_no_nonce_and_a_ticket_for_the_view() {
    let (_c, addr) = coord();
    // No view yet: refused.
    let e = fetch_reader_grant(&addr, "r", None, Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("no view"), "{e}");
    let (client, me, view) = rendezvous(
        &addr,
        &reg("r", 1, None),
        secs(10.0),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_ne!(view.nonce, 0);
    let g1 = fetch_reader_grant(&addr, "r", None, Duration::from_secs(5)).unwrap();
    let g2 = fetch_reader_grant(&addr, "r", None, Duration::from_secs(5)).unwrap();
    // Ids come from the member-id counter: above the member's, never reused.
    assert!(g1.id > me && g2.id > g1.id, "{me} {g1:?} {g2:?}");
    assert_eq!(g1.view.nonce, 0, "readers never learn the view nonce");
    assert_eq!(g1.view.epoch, view.epoch);
    assert_eq!(g1.view.members, view.members);
    let key = auth::view_key(None, view.nonce);
    assert_eq!(g1.ticket, auth::reader_ticket(&key, "r", g1.id, view.epoch));
    assert_eq!(g2.ticket, auth::reader_ticket(&key, "r", g2.id, view.epoch));
    assert_ne!(g1.ticket, g2.ticket);
    // Registering a reader changes nothing in the group.
    let st = _c.status();
    assert_eq!(st["groups"][0]["epoch"], 1, "{st}");
    assert_eq!(st["groups"][0]["size"], 1, "{st}");
    let later = Registration::worker("other", 1, None, vec![1]);
    let (_c2, id2, _) = rendezvous(&addr, &later, secs(10.0), &AtomicBool::new(false)).unwrap();
    assert!(id2 > g2.id, "member ids continue above reader ids");
    drop(client);
}

#[test]
fn reader_grant_with_a_job_token() {
    let c = Coordinator::bind_with(
        "127.0.0.1:0",
        CoordinatorOptions {
            job_token: Some(b"tok".to_vec()),
            ..CoordinatorOptions::default()
        },
    )
    .unwrap();
    let addr = c.local_addr().to_string();
    let opts = ClientOptions {
        token: Some(b"tok".to_vec()),
        ..ClientOptions::default()
    };
    let (_m, _, view) = rendezvous_with(
        &addr,
        &reg("t", 1, None),
        &opts,
        secs(10.0),
        &AtomicBool::new(false),
    )
    .unwrap();
    let g = fetch_reader_grant(&addr, "t", Some(b"tok"), Duration::from_secs(5)).unwrap();
    assert_eq!(g.view.nonce, 0);
    let key = auth::view_key(Some(b"tok"), view.nonce);
    assert_eq!(g.ticket, auth::reader_ticket(&key, "t", g.id, view.epoch));
    assert!(fetch_reader_grant(&addr, "t", None, Duration::from_secs(5)).is_err());
    assert!(fetch_reader_grant(&addr, "t", Some(b"bad"), Duration::from_secs(5)).is_err());
}

#[test]
fn view_requests_and_status_never_carry_the_view_nonce() {
    let (c, addr) = coord();
    let (_m, _, view) = rendezvous(
        &addr,
        &reg("n", 1, None),
        secs(10.0),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_ne!(view.nonce, 0);
    let v = fetch_view(&addr, "n", None, Duration::from_secs(5)).unwrap();
    assert_eq!(
        v.nonce, 0,
        "a view request is unauthenticated without a job token"
    );
    assert_eq!(v.members, view.members);
    let st = coordinator_status(&addr, None, Duration::from_secs(5)).unwrap();
    let text = st.to_string();
    assert!(!text.contains(&view.nonce.to_string()), "{text}");
    assert!(!c.status().to_string().contains(&view.nonce.to_string()));
}

#[test]
fn a_forged_rejoin_cannot_take_a_live_members_place() {
    let (c, addr) = coord();
    let opts = ClientOptions {
        token: None,
        heartbeat: Duration::from_millis(100),
        silence: Duration::ZERO,
    };
    let members: Vec<_> = spawn_members(&addr, &opts, "f", 2, 20.0);
    let members: Vec<_> = members.into_iter().map(|h| h.join().unwrap()).collect();
    let victim = members[0].1;
    // A stranger names the victim's id (visible in status replies): without a proof, and with
    // a wrong one.
    for proof in [None, Some("00".repeat(32))] {
        let m = raw_rejoin(&addr, "f", victim, proof);
        assert!(
            m.iter()
                .any(|m| m.contains("rejoin refused") && m.contains(&victim.to_string())),
            "{m:?}"
        );
    }
    // The victim keeps its connection and its place.
    thread::sleep(Duration::from_millis(500));
    let st = c.status();
    let g = &st["groups"][0];
    assert_eq!(g["epoch"], 1, "{st}");
    for m in g["members"].as_array().unwrap() {
        assert_eq!(m["alive"], true, "{st}");
        assert_eq!(m["connected"], true, "{st}");
    }
    assert!(members[0].0.coordinator_state().0);
    assert!(members[0].0.expelled().is_none());
    // The group still works: a joiner is admitted and both members get the view.
    let (j, jid, jv) = rendezvous_with(
        &addr,
        &elastic_reg("f", 2, 5000),
        &opts,
        secs(20.0),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(jv.members.len(), 3);
    assert!(jv.rank_of(victim).is_some_and(|r| r < 2), "{jv:?}");
    assert_eq!(jv.rank_of(jid), Some(2));
    for (client, _, _) in &members {
        assert_eq!(
            client
                .wait_epoch(2, secs(10.0), &AtomicBool::new(false))
                .unwrap(),
            2
        );
    }
    drop(j);
}

#[test]
fn a_member_rejoins_with_its_secret_after_losing_its_connection() {
    let dir = std::env::temp_dir().join(format!("braid-coord-rejoin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state.json");
    let _ = std::fs::remove_file(&state);
    let opts = || CoordinatorOptions {
        state_file: Some(state.clone()),
        ..CoordinatorOptions::default()
    };
    let mut c = Coordinator::bind_with("127.0.0.1:0", opts()).unwrap();
    let addr = c.local_addr().to_string();
    let copts = ClientOptions {
        token: None,
        heartbeat: Duration::from_millis(100),
        silence: Duration::ZERO,
    };
    let (client, id, _) = rendezvous_with(
        &addr,
        &elastic_reg("s", 1, 5000),
        &copts,
        secs(10.0),
        &AtomicBool::new(false),
    )
    .unwrap();
    client.installed(1);
    // The state file holds the member's secret and is private to its owner.
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&state).unwrap();
        assert_eq!(meta.permissions().mode() & 0o077, 0);
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
        assert_eq!(doc["groups"][0]["secrets"][0][0], id, "{doc}");
    }
    // The coordinator restarts on the same port; the member proves itself and rejoins.
    c.shutdown();
    drop(c);
    let c = (0..100)
        .find_map(|_| {
            Coordinator::bind_with(&addr, opts())
                .map_err(|_| thread::sleep(Duration::from_millis(50)))
                .ok()
        })
        .unwrap();
    wait_until("the member to reconnect", || {
        c.status()["groups"][0]["members"][0]["connected"] == true
    });
    assert!(client.expelled().is_none());
    // A stranger still cannot take its place.
    let m = raw_rejoin(&addr, "s", id, Some("11".repeat(32)));
    assert!(m.iter().any(|m| m.contains("rejoin refused")), "{m:?}");
    thread::sleep(Duration::from_millis(300));
    assert_eq!(c.status()["groups"][0]["members"][0]["connected"], true);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_handshake_has_a_deadline_for_the_whole_first_frame() {
    assert!(CoordinatorOptions::default().handshake_timeout <= Duration::from_secs(10));
    let c = Coordinator::bind_with(
        "127.0.0.1:0",
        CoordinatorOptions {
            handshake_timeout: Duration::from_millis(500),
            frame_timeout: Duration::from_secs(10),
            ..CoordinatorOptions::default()
        },
    )
    .unwrap();
    let addr = c.local_addr().to_string();
    // A connection that sends nothing is closed after the deadline.
    let idle = TcpStream::connect(&addr).unwrap();
    let t = Instant::now();
    assert!(closed_within(&idle, Duration::from_secs(4)));
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    // A slow sender (one byte every 100 ms of a valid registration) cannot stretch it.
    let bytes = proto::encode(MsgType::Register, &reg("slow", 1, None)).unwrap();
    let mut slow = TcpStream::connect(&addr).unwrap();
    let t = Instant::now();
    let mut closed = false;
    for chunk in bytes.chunks(1) {
        if slow.write_all(chunk).is_err() {
            closed = true;
            break;
        }
        thread::sleep(Duration::from_millis(100));
        if t.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    if !closed {
        closed = closed_within(&slow, Duration::from_secs(1));
    }
    assert!(
        closed,
        "a slow sender kept its connection for {:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(c.registered("slow"), 0);
}

#[test]
fn a_huge_declared_length_is_refused_before_the_payload() {
    let (c, addr) = coord();
    let mut s = TcpStream::connect(&addr).unwrap();
    // A header announcing the protocol's largest payload, and no payload: refused at once
    // (an unauthenticated first frame is small), not awaited or allocated.
    let mut h = proto::encode_raw(proto::VERSION, MsgType::Register as u16, b"");
    h[8..12].copy_from_slice(&(proto::MAX_PAYLOAD as u32).to_be_bytes());
    s.write_all(&h).unwrap();
    let t = Instant::now();
    let m = drain_until_closed(&mut s);
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(m.iter().any(|m| m.contains("exceeds the limit")), "{m:?}");
    // A registration with the largest connect handle still fits.
    let big = Registration::worker("big", 1, None, vec![0xab; 64 << 10]);
    let (_m, _, v) = rendezvous(&addr, &big, secs(10.0), &AtomicBool::new(false)).unwrap();
    assert_eq!(v.members[0].handle.len(), 64 << 10);
    assert_eq!(c.registered("big"), 1);
}

#[test]
fn many_idle_connections_do_not_keep_a_member_out() {
    let (_c, addr) = coord();
    let cap = CoordinatorOptions::default().max_unauthenticated;
    let idle: Vec<TcpStream> = (0..cap + 44)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    // The oldest handshaking connections are closed to make room.
    thread::sleep(Duration::from_millis(300));
    for (i, s) in idle[..44].iter().enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(5)),
            "idle connection {i}"
        );
    }
    // A real member registers at once.
    let (_m, _, v) = rendezvous(
        &addr,
        &reg("real", 1, None),
        secs(5.0),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(v.members.len(), 1);
    // The newest idle connections are still open (the member's arrival closed the oldest).
    assert!(!closed_within(&idle[cap + 43], Duration::from_millis(100)));
}

/// Whether the coordinator closes `s` within `d` (a read returns end-of-file or a reset,
/// not a timeout).
fn closed_within(s: &TcpStream, d: Duration) -> bool {
    s.set_read_timeout(Some(d)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match (&*s).read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn garbage_state_files_and_frames_never_panic() {
    // A tiny deterministic generator (no dependency).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for n in 0..2000 {
        let len = (next() % 200) as usize;
        let mut v: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if n % 2 == 0 && v.len() >= 12 {
            v[..4].copy_from_slice(&proto::MAGIC);
            v[4..6].copy_from_slice(&proto::VERSION.to_be_bytes());
        }
        fuzz_decode_frame(&v);
        fuzz_load_state(&v);
    }
    // Frames: a declared length far beyond the bytes, every message type with junk.
    let mut h = proto::encode_raw(1, 1, b"");
    h[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    fuzz_decode_frame(&h);
    for ty in 0..20u16 {
        for body in [&b"{}"[..], b"[]", b"null", b"{\"view\":{}}", b"\xff\xfe"] {
            fuzz_decode_frame(&proto::encode_raw(1, ty, body));
        }
    }
    // State files: hostile numbers are refused, not panicked on later.
    let member = r#"{"id":3,"host_id":"h","hostname":"h","pid":1,"role":"worker","handle":"00"}"#;
    let group = |hw: &str, ws: &str, epoch: &str, members: &str| {
        format!(
            r#"{{"id_high_water":{hw},"groups":[{{"world_size":{ws},"elastic":true,"policy":{{"min_size":1,"max_size":null,"join_window_ms":1}},"view":{{"group":"g","epoch":{epoch},"nonce":1,"members":[{members}]}},"heartbeat_ms":[[3,1]],"history":[]}}]}}"#
        )
    };
    let good = group("10", "1", "1", member);
    assert!(super::coordinator::state_ok(good.as_bytes()), "{good}");
    for bad in [
        group("18446744073709551615", "1", "1", member),
        group("10", "0", "1", member),
        group("10", "1", "18446744073709551615", member),
        group("10", "1", "0", member),
        group("2", "1", "1", member),
        group("10", "1", "1", &format!("{member},{member}")),
        group("10", "1", "1", &member.replace("\"00\"", "\"0\"")),
    ] {
        fuzz_load_state(bad.as_bytes());
        assert!(!super::coordinator::state_ok(bad.as_bytes()), "{bad}");
    }
    // A coordinator never starts on such a file (today's code started, then panicked on the
    // first registration when the id counter overflowed).
    let dir = std::env::temp_dir().join(format!("braid-coord-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.json");
    std::fs::write(&path, group("18446744073709551615", "1", "1", member)).unwrap();
    let e = Coordinator::bind_with(
        "127.0.0.1:0",
        CoordinatorOptions {
            state_file: Some(path.clone()),
            ..CoordinatorOptions::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn deeply_nested_json_does_not_overflow_a_connection_thread() {
    let (c, addr) = coord();
    for ty in [
        MsgType::Register,
        MsgType::Rejoin,
        MsgType::StatusReq,
        MsgType::ReaderReq,
    ] {
        let mut body = String::from("{\"group\":\"x\",\"junk\":");
        body.push_str(&"[".repeat(100_000));
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&proto::encode_raw(
            proto::VERSION,
            ty as u16,
            body.as_bytes(),
        ))
        .unwrap();
        let m = drain_until_closed(&mut s);
        assert!(m.iter().any(|m| m.contains("malformed")), "{m:?}");
    }
    // The coordinator still serves.
    let (_m, _, v) = rendezvous(
        &addr,
        &reg("after", 1, None),
        secs(10.0),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(v.members.len(), 1);
    drop(c);
}

#[test]
fn an_elastic_policy_that_would_overflow_time_is_refused() {
    let (c, addr) = coord();
    let mut r = elastic_reg("p", 1, 0);
    r.policy.join_window_ms = u64::MAX;
    let m = refusal(&addr, &r);
    assert!(m.contains("join window"), "{m}");
    let mut r = elastic_reg("p", 1, 0);
    r.heartbeat_timeout_ms = u64::MAX;
    let m = refusal(&addr, &r);
    assert!(m.contains("heartbeat timeout"), "{m}");
    assert_eq!(c.registered("p"), 0);
}

#[test]
fn a_proved_rejoin_replaces_the_old_connection_without_retiring_the_member() {
    let (c, addr) = coord();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&proto::encode(MsgType::Register, &elastic_reg("p", 1, 0)).unwrap())
        .unwrap();
    let f = proto::read_frame(&mut s, Some(secs(5.0)), Duration::from_secs(5), &|| false).unwrap();
    let ack: proto::Registered = f.body().unwrap();
    let secret = from_hex(ack.secret.as_deref().unwrap()).unwrap();
    assert_eq!(secret.len(), 32);
    let id = ack.member_id;
    wait_until("the view", || c.status()["groups"][0]["epoch"] == 1);
    // The same member comes back on a new connection (its old one still open) and proves it.
    let mut r = TcpStream::connect(&addr).unwrap();
    let rj = proto::Rejoin {
        group: "p".into(),
        member_id: id,
        epoch: 1,
        client_nonce: "abcd".into(),
        view_deltas: false,
    };
    r.write_all(&proto::encode(MsgType::Rejoin, &rj).unwrap())
        .unwrap();
    let f = proto::read_frame(&mut r, Some(secs(5.0)), Duration::from_secs(5), &|| false).unwrap();
    let ch: proto::Challenge = f.body().unwrap();
    let auth = proto::Auth {
        mac: String::new(),
        member: Some(auth::rejoin_mac(&secret, "p", id, &ch.server_nonce, "abcd")),
    };
    r.write_all(&proto::encode(MsgType::Auth, &auth).unwrap())
        .unwrap();
    let f = proto::read_frame(&mut r, Some(secs(5.0)), Duration::from_secs(5), &|| false).unwrap();
    assert_eq!(f.ty, MsgType::Registered as u16);
    let again: proto::Registered = f.body().unwrap();
    assert_eq!(again.member_id, id);
    assert!(again.secret.is_none(), "the secret is sent once");
    // The old connection is closed; the member stays, on its new connection.
    let _ = drain_until_closed(&mut s);
    thread::sleep(Duration::from_millis(300));
    let st = c.status();
    let m = &st["groups"][0]["members"][0];
    assert_eq!(m["alive"], true, "{st}");
    assert_eq!(m["connected"], true, "{st}");
    assert_eq!(st["groups"][0]["epoch"], 1, "{st}");
    drop(r);
}

// ---------------------------------------------------------------------------------------------
// Pipeline metrics and throughput-aware re-weighing (issue 19).

use super::coordinator::{fold_metric, reweigh_decision, MeasuredStage};

fn measured(blocks: std::ops::Range<usize>, weight: f64, reports: u32) -> MeasuredStage {
    MeasuredStage {
        epoch: 1,
        blocks,
        costs_key: 0,
        weight,
        reports,
        gain: 0.1,
    }
}

/// Four equal members with 3 of 12 unit blocks each; member 2 runs at a quarter of the speed
/// of the others (measured throughput: stage cost / seconds).
/// Members (id, published weight) and their measured stages.
type Measured = (Vec<(u64, f64)>, Vec<(u64, MeasuredStage)>);

fn slow_second(reports: u32) -> Measured {
    let members = vec![(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0)];
    let stages = vec![
        (1, measured(0..3, 3.0, reports)),
        (2, measured(3..6, 0.75, reports)),
        (3, measured(6..9, 3.0, reports)),
        (4, measured(9..12, 3.0, reports)),
    ];
    (members, stages)
}

#[test]
fn a_slow_stage_is_reweighed_when_the_gain_passes_the_threshold() {
    let (members, stages) = slow_second(2);
    let r = reweigh_decision(&members, &[1.0; 12], &stages, 0.1).expect("a re-weigh");
    // Scaled so that the reporting members' mean weight stays 1: 3 : 0.75 over a sum of 9.75.
    let want = [12.0 / 9.75, 3.0 / 9.75, 12.0 / 9.75, 12.0 / 9.75];
    for (w, x) in r.weights.iter().zip(want) {
        assert!((w - x).abs() < 1e-12, "{:?}", r.weights);
    }
    assert!((r.weights.iter().sum::<f64>() / 4.0 - 1.0).abs() < 1e-12);
    // Current: 3 blocks / (3/9.75) = 9.75; best: member 2 keeps 1 block (3.25), the others 4,
    // 4 and 3 (4 / (12/9.75) = 3.25): gain 1 - 3.25/9.75 = 2/3.
    assert!((r.gain - 2.0 / 3.0).abs() < 1e-9, "{}", r.gain);
    let list: Vec<(u64, f64)> = members
        .iter()
        .zip(&r.weights)
        .map(|((id, _), w)| (*id, *w))
        .collect();
    let plan = super::pipeline::plan_pipeline(&[1.0; 12], &list).unwrap();
    assert_eq!(plan.stage_of(2).unwrap().blocks.len(), 1, "{plan:?}");
    // The same measurements under a higher threshold: no re-weigh.
    assert_eq!(reweigh_decision(&members, &[1.0; 12], &stages, 0.7), None);
}

#[test]
fn no_reweigh_below_the_threshold_or_without_complete_measurements() {
    // 5% slower: no plan with whole blocks does better than 3 blocks each.
    let members = vec![(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0)];
    let even: Vec<(u64, MeasuredStage)> = (0..4)
        .map(|i| {
            let w = if i == 1 { 3.0 / 1.05 } else { 3.0 };
            (i as u64 + 1, measured(3 * i..3 * i + 3, w, 5))
        })
        .collect();
    assert_eq!(reweigh_decision(&members, &[1.0; 12], &even, 0.1), None);
    // A stage reported only once so far: wait.
    let (m, mut s) = slow_second(2);
    s[1].1.reports = 1;
    assert_eq!(reweigh_decision(&m, &[1.0; 12], &s, 0.1), None);
    // Fewer than two reporting stages.
    assert_eq!(
        reweigh_decision(&m, &[1.0; 12], &[(1, measured(0..12, 1.0, 9))], 0.1),
        None
    );
    assert_eq!(reweigh_decision(&m, &[1.0; 12], &[], 0.1), None);
    // A member with a stage that has not reported leaves a gap: wait.
    let (m, s) = slow_second(3);
    assert_eq!(reweigh_decision(&m, &[1.0; 12], &s[..3], 0.1), None);
    // Reports of a pipeline with more blocks than the stages cover.
    assert_eq!(reweigh_decision(&m, &[1.0; 13], &s, 0.1), None);
    // A reporter outside the view.
    let (m, mut s) = slow_second(3);
    s[3].0 = 99;
    assert_eq!(reweigh_decision(&m, &[1.0; 12], &s, 0.1), None);
}

#[test]
fn a_view_already_weighed_by_the_measurements_is_not_reweighed_again() {
    // The re-weigh view was published but the stages were not re-planned: the same
    // measurements would propose the same weights again, which would change nothing.
    let (members, stages) = slow_second(2);
    let r = reweigh_decision(&members, &[1.0; 12], &stages, 0.1).expect("a re-weigh");
    let reweighed: Vec<(u64, f64)> = members
        .iter()
        .zip(&r.weights)
        .map(|((id, _), w)| (*id, *w))
        .collect();
    assert_eq!(reweigh_decision(&reweighed, &[1.0; 12], &stages, 0.1), None);
    // Once re-planned (member 2 keeps 1 block) and measured again: balanced, nothing to do.
    let replanned = vec![
        (1, measured(0..4, 4.0, 2)),
        (2, measured(4..5, 1.0, 2)),
        (3, measured(5..9, 4.0, 2)),
        (4, measured(9..12, 3.0, 2)),
    ];
    assert_eq!(
        reweigh_decision(&reweighed, &[1.0; 12], &replanned, 0.1),
        None
    );
}

#[test]
fn replicated_stages_are_not_reweighed() {
    // Members 1 and 2 hold the same stage (replicas), 3 and 4 the other; 2 is slow.
    let members = vec![(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0)];
    let stages = vec![
        (1, measured(0..6, 6.0, 4)),
        (2, measured(0..6, 1.0, 4)),
        (3, measured(6..12, 6.0, 4)),
        (4, measured(6..12, 6.0, 4)),
    ];
    assert_eq!(reweigh_decision(&members, &[1.0; 12], &stages, 0.1), None);
    // Overlapping (not equal) ranges are refused as well.
    let stages = vec![(1, measured(0..7, 1.0, 4)), (3, measured(6..12, 6.0, 4))];
    assert_eq!(reweigh_decision(&members, &[1.0; 12], &stages, 0.1), None);
}

#[test]
fn members_without_a_stage_keep_their_published_weight() {
    // Five members, 4 blocks: member 5 (published weight 2) has no stage; member 2 is slow.
    let members = vec![(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 2.0)];
    let stages = vec![
        (1, measured(0..1, 1.0, 2)),
        (2, measured(1..2, 0.2, 2)),
        (3, measured(2..3, 1.0, 2)),
        (4, measured(3..4, 1.0, 2)),
    ];
    let r = reweigh_decision(&members, &[1.0; 4], &stages, 0.1).expect("a re-weigh");
    assert_eq!(r.weights[4], 2.0);
    assert!((r.weights[..4].iter().sum::<f64>() - 4.0).abs() < 1e-12);
    assert!(r.weights[1] < r.weights[0], "{:?}", r.weights);
}

#[test]
fn measured_throughput_is_smoothed_and_reset_per_epoch() {
    let a = fold_metric(None, 3, 0..4, 7, 4.0, 0.1);
    assert_eq!((a.weight, a.reports), (4.0, 1));
    let b = fold_metric(Some(&a), 3, 0..4, 7, 2.0, 0.1);
    assert_eq!((b.weight, b.reports), (3.0, 2));
    let c = fold_metric(Some(&b), 3, 0..4, 7, 3.0, 0.2);
    assert_eq!((c.weight, c.reports, c.gain), (3.0, 3, 0.2));
    // A new epoch, another stage or other costs start over.
    for d in [
        fold_metric(Some(&c), 4, 0..4, 7, 8.0, 0.1),
        fold_metric(Some(&c), 3, 0..5, 7, 8.0, 0.1),
        fold_metric(Some(&c), 3, 0..4, 8, 8.0, 0.1),
    ] {
        assert_eq!((d.weight, d.reports), (8.0, 1));
    }
}

#[test]
fn metric_messages_are_bounded() {
    let ok = proto::Metric {
        epoch: 1,
        seconds: 0.5,
        first_block: 2,
        end_block: 5,
        costs: vec![1.0; 10],
        gain: 0.1,
    };
    assert_eq!(ok.check(), Ok(Some(2..5)));
    // Valid but saying nothing: no time, or no blocks.
    let none = [
        proto::Metric {
            seconds: 0.0,
            ..ok.clone()
        },
        proto::Metric {
            end_block: 2,
            ..ok.clone()
        },
    ];
    for m in none {
        assert_eq!(m.check(), Ok(None), "{m:?}");
    }
    let mut bad_cost = ok.clone();
    bad_cost.costs[3] = -1.0;
    let mut nan_cost = ok.clone();
    nan_cost.costs[0] = f64::NAN;
    let bad = [
        (
            proto::Metric {
                costs: vec![0.0; proto::MAX_METRIC_BLOCKS + 1],
                end_block: 1,
                ..ok.clone()
            },
            "limit",
        ),
        (bad_cost, "block 3"),
        (nan_cost, "block 0"),
        (
            proto::Metric {
                seconds: -1.0,
                ..ok.clone()
            },
            "seconds",
        ),
        (
            proto::Metric {
                seconds: f64::INFINITY,
                ..ok.clone()
            },
            "seconds",
        ),
        (
            proto::Metric {
                gain: 0.0,
                ..ok.clone()
            },
            "gain",
        ),
        (
            proto::Metric {
                gain: f64::NAN,
                ..ok.clone()
            },
            "gain",
        ),
        (
            proto::Metric {
                end_block: 11,
                ..ok.clone()
            },
            "within",
        ),
        (
            proto::Metric {
                first_block: 6,
                ..ok.clone()
            },
            "within",
        ),
        (
            proto::Metric {
                first_block: u64::MAX,
                end_block: u64::MAX,
                ..ok.clone()
            },
            "within",
        ),
    ];
    for (m, what) in bad {
        let e = m.check().expect_err(what);
        assert!(e.contains(what), "{e}");
    }
    // On the wire: a frame with a non-number cost does not decode; the largest one fits.
    let f = proto::Frame {
        version: proto::VERSION,
        ty: MsgType::Metric as u16,
        payload:
            br#"{"epoch":1,"seconds":1,"first_block":0,"end_block":1,"costs":[null],"gain":0.1}"#
                .to_vec(),
    };
    assert!(f.body::<proto::Metric>().is_err());
    let big = proto::Metric {
        costs: vec![1.0e300; proto::MAX_METRIC_BLOCKS],
        ..ok
    };
    assert!(proto::encode(MsgType::Metric, &big).is_ok());
    assert_eq!(MsgType::from_u16(19), Some(MsgType::Metric));
}

/// End to end: three elastic members (communicators as threads over TCP) report their stage
/// times every step; member at rank 1 is four times slower. The coordinator publishes a
/// re-weigh view (same members, same order) in which its weight is the lowest, and a plan over
/// that view gives it fewer blocks.
#[test]
fn a_slow_stage_gets_a_lower_weight_in_a_reweigh_view() {
    let (c, addr) = coord();
    let costs = [1.0f64; 12];
    let outs: Vec<(u64, View, View, crate::Communicator)> = thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|i| {
                let addr = addr.clone();
                s.spawn(move || {
                    let mut comm = crate::Communicator::init_with(crate::Config {
                        coordinator: Some(addr),
                        world_size: Some(3),
                        rank: Some(i),
                        timeout: Duration::from_secs(20),
                        init_timeout: Duration::from_secs(30),
                        transport: crate::config::TransportKind::Tcp,
                        elastic: true,
                        heartbeat: Duration::from_millis(200),
                        heartbeat_timeout: Duration::from_secs(5),
                        ..crate::Config::default()
                    })
                    .unwrap();
                    let first = comm.view().clone();
                    let me = comm.member_id();
                    let plan = pipeline::plan_for_view(&costs, &first).unwrap();
                    let blocks = plan.stage_of(me).unwrap().blocks.clone();
                    let speed = if i == 1 { 250.0 } else { 1000.0 };
                    let end = secs(30.0);
                    loop {
                        assert!(Instant::now() < end, "no re-weigh view within 30 s");
                        let secs = blocks.len() as f64 / speed;
                        comm.report_pipeline_metric(secs, blocks.clone(), &costs)
                            .unwrap();
                        thread::sleep(Duration::from_millis(20));
                        if comm.update().unwrap() {
                            break;
                        }
                    }
                    let now = comm.view().clone();
                    (me, first, now, comm)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (slow, first, view) = (&outs[1].0, &outs[1].1, &outs[1].2);
    assert_eq!(view.epoch, first.epoch + 1);
    for (_, _, v, _) in &outs {
        assert_eq!(v, view, "every member installed the same view");
    }
    let ids = |v: &View| v.members.iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(ids(view), ids(first), "same members, same order");
    let w: Vec<f64> = view.members.iter().map(|m| m.weight).collect();
    assert!(
        w[1] < w[0] / 2.0 && w[1] < w[2] / 2.0,
        "the slow member {slow} has weight {}: {w:?}",
        w[1]
    );
    assert!(
        (w.iter().sum::<f64>() - 3.0).abs() < 1e-9,
        "mean kept: {w:?}"
    );
    let before = pipeline::plan_for_view(&costs, first).unwrap();
    let after = pipeline::plan_for_view(&costs, view).unwrap();
    assert!(
        after.stage_of(*slow).unwrap().blocks.len() < before.stage_of(*slow).unwrap().blocks.len(),
        "{before:?} -> {after:?}"
    );
    let st = c.status();
    let hist = st["groups"][0]["history"].as_array().unwrap();
    assert!(
        hist.iter().any(|h| h["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("reweigh: predicted gain"))),
        "{st}"
    );
    assert_eq!(st["groups"][0]["members"][1]["weight"], w[1], "{st}");
    drop(outs);
}

// ---------------------------------------------------------------------------------------------
// The event loop (issue 18): a member that stops reading delays no one.

#[test]
fn a_member_that_stops_reading_delays_no_one_and_is_dropped() {
    let c = Coordinator::bind_with(
        "127.0.0.1:0",
        CoordinatorOptions {
            max_queued: 1 << 20,
            ..CoordinatorOptions::default()
        },
    )
    .unwrap();
    let addr = c.local_addr().to_string();
    let opts = ClientOptions {
        token: None,
        heartbeat: Duration::from_millis(200),
        silence: Duration::ZERO,
    };
    // Large handles: every whole view is 128 KiB (hex) per member, so a member that reads
    // nothing fills its socket buffers within a few views (whole views: no deltas).
    let big = |hb_ms: u64| {
        let mut r = elastic_reg("stuck", 2, hb_ms);
        r.handle = vec![0xab; 64 << 10];
        r.view_deltas = false;
        r
    };
    // The stuck member registers first (so it comes first in every publication), acknowledges
    // every epoch to come at once, and never reads again.
    let (mut stuck, stuck_id) = raw_register(&addr, &big(0));
    stuck
        .write_all(&proto::encode(MsgType::Ack, &proto::Ack { epoch: 1 << 40 }).unwrap())
        .unwrap();
    let spawn = |addr: &str| {
        let (addr, opts, r) = (addr.to_string(), opts.clone(), big(5000));
        thread::spawn(move || {
            let r = rendezvous_with(&addr, &r, &opts, secs(30.0), &AtomicBool::new(false)).unwrap();
            r.0.installed(r.2.epoch);
            r
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let follow = |client: Client| {
        let stop = stop.clone();
        thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let top = client.announced_epoch();
                if top > client.installed_epoch() {
                    client.installed(top);
                }
                thread::sleep(Duration::from_millis(5));
            }
            client
        })
    };
    let mut followers = vec![follow(spawn(&addr).join().unwrap().0)];
    // Joiners one at a time: each is admitted (its view published to everyone) promptly,
    // although the stuck member's socket is full (a blocking write would wait 5 s for it).
    let mut slowest = Duration::ZERO;
    let mut dropped_at = None;
    for j in 0..14 {
        let t = Instant::now();
        let (client, _, view) = spawn(&addr).join().unwrap();
        let took = t.elapsed();
        slowest = slowest.max(took);
        assert!(
            took < Duration::from_secs(4),
            "joiner {j} took {took:?} (view epoch {})",
            view.epoch
        );
        if dropped_at.is_none() && view.rank_of(stuck_id).is_none() {
            dropped_at = Some(j);
        }
        followers.push(follow(client));
    }
    eprintln!("slowest join {slowest:?}; stuck member out of the view from joiner {dropped_at:?}");
    // The stuck member was dropped as a failure once its queue passed the bound.
    wait_until("the stuck member's removal", || {
        c.status()["groups"][0]["history"]
            .as_array()
            .is_some_and(|h| {
                h.iter().any(|e| {
                    e["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains(&format!("failure of {stuck_id}")))
                })
            })
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for f in followers {
        let _ = f.join().unwrap();
    }
    drop(stuck);
}

// ---------------------------------------------------------------------------------------------
// View deltas (issue 18).

/// Reads the next view frame (whole or delta) from a raw member connection, skipping
/// heartbeat echoes.
fn next_view_frame(s: &mut TcpStream) -> proto::Frame {
    loop {
        let f = proto::read_frame(s, Some(secs(10.0)), Duration::from_secs(10), &|| false).unwrap();
        if f.ty == MsgType::View as u16 || f.ty == MsgType::ViewDelta as u16 {
            return f;
        }
        assert_ne!(
            f.ty,
            MsgType::Error as u16,
            "{}",
            String::from_utf8_lossy(&f.payload)
        );
    }
}

fn ack(s: &mut TcpStream, epoch: u64) {
    s.write_all(&proto::encode(MsgType::Ack, &proto::Ack { epoch }).unwrap())
        .unwrap();
}

#[test]
fn views_go_out_as_deltas_to_members_that_take_them_and_whole_to_the_others() {
    let (_c, addr) = coord();
    let mut with = elastic_reg("d", 2, 0);
    with.view_deltas = true;
    let mut without = elastic_reg("d", 2, 0);
    without.view_deltas = false;
    let (mut a, id_a) = raw_register(&addr, &with);
    let (mut b, id_b) = raw_register(&addr, &without);
    // The first view is whole for everyone.
    let fa = next_view_frame(&mut a);
    let fb = next_view_frame(&mut b);
    assert_eq!(fa.ty, MsgType::View as u16);
    assert_eq!(fb.ty, MsgType::View as u16);
    let v1 = fa.body::<proto::ViewMsg>().unwrap().view;
    assert_eq!(v1.epoch, 1);
    ack(&mut a, 1);
    ack(&mut b, 1);
    // A joiner (taking deltas): admitted after the join window; it gets the whole view, A a
    // delta that rebuilds the same view B gets whole.
    let (mut c, id_c) = raw_register(&addr, &with);
    let fa = next_view_frame(&mut a);
    let fb = next_view_frame(&mut b);
    let fc = next_view_frame(&mut c);
    assert_eq!(fa.ty, MsgType::ViewDelta as u16, "A takes deltas");
    assert_eq!(fb.ty, MsgType::View as u16, "B does not");
    assert_eq!(fc.ty, MsgType::View as u16, "a joiner gets the whole view");
    let d2: proto::ViewDeltaMsg = fa.body().unwrap();
    assert_eq!(
        (d2.member_id, d2.base_epoch, d2.epoch),
        (id_a, 1, 2),
        "{d2:?}"
    );
    assert!(d2.left.is_empty(), "{d2:?}");
    assert_eq!(
        d2.joined.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![id_c]
    );
    assert!(d2.reason.contains(&format!("join of {id_c}")), "{d2:?}");
    let v2 = fb.body::<proto::ViewMsg>().unwrap().view;
    assert_eq!(d2.apply(&v1).unwrap(), v2);
    assert_eq!(fc.body::<proto::ViewMsg>().unwrap().view, v2);
    assert!(
        fa.payload.len() * 2 < fb.payload.len(),
        "a delta of one join is smaller than the view: {} vs {} bytes",
        fa.payload.len(),
        fb.payload.len()
    );
    for s in [&mut a, &mut b, &mut c] {
        ack(s, 2);
    }
    // B fails (its connection drops): A and C get a delta removing it.
    drop(b);
    let fa = next_view_frame(&mut a);
    let fc = next_view_frame(&mut c);
    for f in [&fa, &fc] {
        assert_eq!(f.ty, MsgType::ViewDelta as u16);
        let d3: proto::ViewDeltaMsg = f.body().unwrap();
        assert_eq!((d3.base_epoch, d3.epoch), (2, 3));
        assert_eq!(d3.left, vec![id_b]);
        assert!(d3.joined.is_empty());
        let v3 = d3.apply(&v2).unwrap();
        assert_eq!(
            v3.members.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![id_a, id_c]
        );
        assert_ne!(v3.nonce, v2.nonce);
    }
}

#[test]
fn a_delta_that_does_not_apply_is_refused_with_a_reason() {
    let m = |id: u64| Member {
        id,
        host_id: "h".into(),
        hostname: "h".into(),
        pid: 1,
        role: Role::Worker,
        handle: vec![],
        numa: None,
        weight: 1.0,
    };
    let base = View {
        group: "g".into(),
        epoch: 4,
        nonce: 9,
        members: vec![m(1), m(2), m(3)],
    };
    let d = |base_epoch: u64, left: Vec<u64>, joined: Vec<Member>| proto::ViewDeltaMsg {
        member_id: 1,
        group: "g".into(),
        base_epoch,
        epoch: base_epoch + 1,
        nonce: 10,
        left,
        joined,
        reason: String::new(),
    };
    // Applies: 2 leaves, 7 joins; the order of those that stay is kept.
    let v = d(4, vec![2], vec![m(7)]).apply(&base).unwrap();
    assert_eq!(
        v.members.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![1, 3, 7]
    );
    assert_eq!((v.epoch, v.nonce), (5, 10));
    // Another base epoch, an unknown leaver, a member joined twice: refused.
    assert!(d(3, vec![], vec![])
        .apply(&base)
        .unwrap_err()
        .contains("does not apply"));
    assert!(d(4, vec![8], vec![])
        .apply(&base)
        .unwrap_err()
        .contains("not in the view"));
    assert!(d(4, vec![], vec![m(3)])
        .apply(&base)
        .unwrap_err()
        .contains("twice"));
    assert!(d(4, vec![2, 2], vec![])
        .apply(&base)
        .unwrap_err()
        .contains("not in the view"));
}

#[test]
fn a_client_rebuilds_each_view_from_deltas_as_joiners_see_it_whole() {
    let (_c, addr) = coord();
    let opts = ClientOptions::default();
    let first: Vec<_> = spawn_members(&addr, &opts, "cd", 2, 20.0)
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let mut epoch = first[0].2.epoch;
    let mut joined = Vec::new();
    // Three joins one after the other: the running members get deltas (they registered with
    // view_deltas, as Registration::worker does); each joiner gets its first view whole.
    for _ in 0..3 {
        let (joiner, _, whole) = spawn_members(&addr, &opts, "cd", 1, 20.0)
            .pop()
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(whole.epoch, epoch + 1);
        for (client, _, _) in &first {
            let top = client
                .wait_epoch(whole.epoch, secs(10.0), &AtomicBool::new(false))
                .unwrap();
            assert_eq!(top, whole.epoch);
            let (rebuilt, why) = client.view_of(top).unwrap();
            assert_eq!(rebuilt, whole, "rebuilt from a delta ({why})");
            client.installed(top);
        }
        epoch = whole.epoch;
        joined.push(joiner);
    }
}
