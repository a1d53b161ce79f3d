//! The data-hello checks of the stash, without a coordinator: a forged connection that
//! arrived before the view was known loses to the real one, replays are named, the
//! connecting pid must be the member's, unverified connections are capped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::membership::{self, Role};
use braid_transport::mem::{MemFabric, MemTransport};

fn view(nonce: u64) -> View {
    let m = |id: u64, pid: u32| membership::Member {
        id,
        host_id: "h".into(),
        hostname: "h".into(),
        pid,
        role: Role::Worker,
        handle: Vec::new(),
        numa: None,
        weight: 1.0,
    };
    View {
        group: "g".into(),
        epoch: 1,
        nonce,
        members: vec![m(10, 100), m(11, 101)],
    }
}

/// One end of a fresh in-process connection.
fn conn() -> Box<dyn Conn> {
    let t = MemTransport::new(MemFabric::new());
    let (mut l, h) = t.listen(0).unwrap();
    let th = std::thread::spawn(move || {
        let d = Instant::now() + Duration::from_secs(5);
        t.connect_challenged(&h, &|_| vec![1], d).unwrap()
    });
    let a = loop {
        if let Some(a) = l.accept_challenged().unwrap() {
            break a;
        }
        std::thread::yield_now();
    };
    drop(th.join().unwrap());
    a.conn
}

fn arrived(hello: &[u8], challenge: Challenge, pid: Option<u32>, token: Option<&[u8]>) -> Arrived {
    Arrived {
        conn: conn(),
        hello: parse_hello(hello, token).unwrap(),
        challenge,
        peer_pid: pid,
        transport: "mem",
        at: Instant::now(),
        verified: false,
    }
}

#[test]
fn a_forged_connection_that_came_first_does_not_win() {
    for token in [None, Some(&b"t0ken"[..])] {
        let s = Stash::new(token.map(|t| t.to_vec()), 2);
        let v = view(77);
        let (c1, c2) = ([1u8; 16], [2u8; 16]);
        // A stranger who does not know the view nonce claims rank 0 first.
        let forged = hello_bytes(&c1, 78, 1, 0, 10, token);
        let real = hello_bytes(&c2, 77, 1, 0, 10, token);
        s.push(arrived(&forged, c1, None, token));
        s.push(arrived(&real, c2, None, token));
        assert_eq!(lock(&s.list).len(), 2, "unknown view: both wait unverified");
        s.learn(&v);
        let l = lock(&s.list);
        assert_eq!(l.len(), 1);
        assert!(l[0].verified);
        assert_eq!(l[0].challenge, c2);
    }
}

#[test]
fn replays_wrong_members_and_pids_are_refused() {
    let s = Stash::new(None, 2);
    let v = view(77);
    s.learn(&v);
    let kv = KnownView::of(&v);
    let c = [5u8; 16];
    let h = parse_hello(&hello_bytes(&c, 77, 1, 1, 11, None), None).unwrap();
    assert_eq!(s.check(&h, &c, None, &kv), Ok(()));
    assert_eq!(s.check(&h, &c, Some(101), &kv), Ok(()));
    // 0: the peer's pid is not visible from this pid namespace.
    assert_eq!(s.check(&h, &c, Some(0), &kv), Ok(()));
    assert!(s
        .check(&h, &c, Some(4242), &kv)
        .unwrap_err()
        .contains("pid 4242"));
    // The same hello on a connection with another challenge.
    let other = [6u8; 16];
    assert_eq!(s.check(&h, &other, None, &kv).unwrap_err(), "wrong MAC");
    s.push(arrived(&hello_bytes(&c, 77, 1, 1, 11, None), c, None, None));
    assert!(lock(&s.list)[0].verified);
    assert!(s
        .check(&h, &other, None, &kv)
        .unwrap_err()
        .starts_with("replayed"));
    // A rank that is another member's, a rank past the view.
    let wrong = parse_hello(&hello_bytes(&c, 77, 1, 1, 10, None), None).unwrap();
    assert!(s
        .check(&wrong, &c, None, &kv)
        .unwrap_err()
        .contains("not a member"));
    let past = parse_hello(&hello_bytes(&c, 77, 1, 7, 10, None), None).unwrap();
    assert!(s
        .check(&past, &c, None, &kv)
        .unwrap_err()
        .contains("not a member"));
    // A hello pushed for a known view that fails is not kept.
    s.push(arrived(
        &hello_bytes(&other, 1, 1, 0, 10, None),
        other,
        None,
        None,
    ));
    assert_eq!(lock(&s.list).len(), 1);
}

#[test]
fn hello_form_and_token_mac() {
    let c = [9u8; 16];
    let tok = &b"t0ken"[..];
    let with = hello_bytes(&c, 77, 1, 0, 10, Some(tok));
    let without = hello_bytes(&c, 77, 1, 0, 10, None);
    assert!(parse_hello(&with, None).is_err());
    assert!(parse_hello(&without, Some(tok)).is_err());
    assert!(parse_hello(&without[..40], None).is_err());
    assert!(parse_hello(b"GET / HTTP/1.0\r\n\r\n..............", None).is_err());
    let h = parse_hello(&with, Some(tok)).unwrap();
    assert_eq!(check_token(&h, &c, Some(tok)), Ok(()));
    assert!(check_token(&h, &[0u8; 16], Some(tok)).is_err());
    assert!(check_token(&h, &c, Some(b"guess")).is_err());
    // The check every listener runs: refuses a token MAC that does not answer the challenge
    // even for a view it does not know; for a known view checks the view MAC too.
    let s = Arc::new(Stash::new(Some(tok.to_vec()), 2));
    let check = hello_check(s.clone());
    assert!(check(&c, &with, None).is_ok());
    assert!(check(&[0u8; 16], &with, None).is_err());
    let stranger = hello_bytes(&c, 78, 1, 0, 10, Some(tok));
    assert!(
        check(&c, &stranger, None).is_ok(),
        "view unknown: checked later"
    );
    s.learn(&view(77));
    assert!(check(&c, &stranger, None).is_err());
    assert!(check(&c, &with, None).is_ok());
    // A local (shm) peer's pid must be the member's, before anything is mapped.
    assert!(check(&c, &with, Some(100)).is_ok());
    let e = check(&c, &with, Some(4242)).unwrap_err();
    assert!(e.contains("pid"), "{e}");
}

#[test]
fn unverified_connections_are_capped() {
    let s = Stash::new(None, 2);
    for i in 0..MIN_UNVERIFIED + 5 {
        let c = [i as u8; 16];
        s.push(arrived(&hello_bytes(&c, 1, 9, 0, 10, None), c, None, None));
    }
    let l = lock(&s.list);
    assert_eq!(l.len(), MIN_UNVERIFIED);
    // The oldest went.
    assert_eq!(l[0].challenge, [5u8; 16]);
}

#[test]
fn the_dial_back_flag_is_covered_by_the_macs_and_requests_are_never_claimed() {
    for token in [None, Some(&b"t0ken"[..])] {
        let s = Stash::new(token.map(|t| t.to_vec()), 2);
        let v = view(77);
        s.learn(&v);
        let kv = KnownView::of(&v);
        let c = [7u8; 16];
        // Rank 1 asks rank 0 to connect: a well-formed request verifies.
        let ask = hello_bytes_as(&c, 77, 1, 1, 11, token, true);
        let h = parse_hello(&ask, token).unwrap();
        assert!(h.dial_back);
        assert_eq!(s.check(&h, &c, None, &kv), Ok(()));
        assert_eq!(check_token(&h, &c, token), Ok(()));
        // The flag flipped on a data hello (or off a request) fails its MACs.
        for dial_back in [false, true] {
            let mut b = hello_bytes_as(&c, 77, 1, 1, 11, token, dial_back);
            b[6] ^= 2;
            let forged = parse_hello(&b, token).unwrap();
            assert_eq!(forged.dial_back, !dial_back);
            assert_eq!(s.check(&forged, &c, None, &kv).unwrap_err(), "wrong MAC");
            if token.is_some() {
                assert!(check_token(&forged, &c, token).is_err());
            }
        }
        // A request waiting in the stash (no lazy view installed) is never a rank's
        // connection: eager set-up drops it.
        s.push(arrived(&ask, c, None, token));
        let a = lock(&s.list).pop().unwrap();
        let mut peers: Vec<Option<Peer>> = vec![None, None];
        assert!(claim(&s, &v, 0, &mut peers, a).is_none());
        assert!(peers.iter().all(|p| p.is_none()));
    }
}
