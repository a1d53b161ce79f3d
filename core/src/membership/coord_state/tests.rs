//! The state machine without sockets: transitions driven by hand with a synthetic clock,
//! their outputs decoded with `proto` (which connection key, which member, which epoch and
//! ranks).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

/// Connection keys are not member ids: key of the `i`-th connection.
fn key(i: u64) -> u64 {
    100 + i
}

fn peer(i: u64) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 20_000 + i as u16))
}

/// A registration for `group` (heartbeat timeout 1 s, join window 100 ms; whole views, so
/// that every output can be checked alone: deltas are tested in `membership::tests`).
fn reg(group: &str, world: usize, rank: Option<usize>, elastic: bool) -> Registration {
    let mut r = Registration::worker(group, world, rank, vec![7, 7]);
    r.view_deltas = false;
    r.elastic = elastic;
    r.heartbeat_timeout_ms = 1000;
    r.policy = GroupPolicy {
        min_size: 1,
        max_size: None,
        join_window_ms: 100,
    };
    r
}

/// Decodes a whole frame (header and JSON body).
fn frame(bytes: &[u8]) -> Frame {
    assert!(bytes.len() >= proto::HEADER_LEN);
    assert_eq!(bytes[..4], proto::MAGIC);
    let len = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    assert_eq!(bytes.len(), proto::HEADER_LEN + len);
    Frame {
        version: u16::from_be_bytes([bytes[4], bytes[5]]),
        ty: u16::from_be_bytes([bytes[6], bytes[7]]),
        payload: bytes[proto::HEADER_LEN..].to_vec(),
    }
}

/// A member's frame of type `ty` with body `body`.
fn msg<T: Serialize>(ty: MsgType, body: &T) -> Frame {
    Frame {
        version: proto::VERSION,
        ty: ty as u16,
        payload: serde_json::to_vec(body).unwrap(),
    }
}

/// One view frame as sent: (connection key, receiver, epoch, member ids in rank order, reason).
#[derive(Debug, PartialEq)]
struct Sent {
    conn: u64,
    member: u64,
    epoch: u64,
    ids: Vec<u64>,
    reason: String,
}

/// The view frames of `publish`, decoded (every output must be a whole view).
fn views(publish: &[Out]) -> Vec<Sent> {
    publish
        .iter()
        .map(|o| match o {
            Out::Send { conn, frame: b, .. } => {
                let f = frame(b);
                assert_eq!(f.ty, MsgType::View as u16);
                let v: proto::ViewMsg = f.body().unwrap();
                Sent {
                    conn: *conn,
                    member: v.member_id,
                    epoch: v.view.epoch,
                    ids: v.view.members.iter().map(|m| m.id).collect(),
                    reason: v.reason,
                }
            }
            Out::Close { conn } => panic!("a view output closes {conn}"),
        })
        .collect()
}

/// Who got which view: (connection key, receiver) for every frame of `publish`, all of
/// epoch `epoch` with members `ids`.
fn receivers(publish: &[Out], epoch: u64, ids: &[u64]) -> Vec<(u64, u64)> {
    views(publish)
        .into_iter()
        .map(|s| {
            assert_eq!((s.epoch, s.ids.as_slice()), (epoch, ids), "{s:?}");
            (s.conn, s.member)
        })
        .collect()
}

/// `ms` milliseconds after `t0`.
fn at(t0: Instant, ms: u64) -> Instant {
    t0 + Duration::from_millis(ms)
}

/// A state and a clock.
struct Bench {
    st: State,
    t0: Instant,
    /// Acknowledgements written, by member id.
    acks: Vec<(u64, proto::Registered)>,
}

impl Bench {
    fn new() -> Bench {
        Bench {
            st: State::new(false),
            t0: Instant::now(),
            acks: Vec::new(),
        }
    }

    fn at(&self, ms: u64) -> Instant {
        at(self.t0, ms)
    }

    /// Registers `r` on connection `key(i)` at `ms`; the frames it published.
    fn register(&mut self, i: u64, r: Registration, ms: u64) -> Result<(u64, Publish), Refusal> {
        let mut written = Vec::new();
        let now = self.at(ms);
        let res = register(&mut self.st, r, key(i), peer(i), None, now, &mut |id, b| {
            written.push((id, b.to_vec()));
            Ok(())
        });
        for (id, b) in written {
            let f = frame(&b);
            assert_eq!(f.ty, MsgType::Registered as u16);
            self.acks.push((id, f.body().unwrap()));
        }
        res.map(|(id, _, publish)| (id, publish))
    }

    /// Member `id` (on connection `key(i)`) sends `f` at `ms`.
    fn send(&mut self, i: u64, id: u64, group: &str, f: Frame, ms: u64) -> (Flow, Effects) {
        let now = self.at(ms);
        on_member_frame(&mut self.st, f, key(i), peer(i), id, group, now)
    }

    /// Every member of `ids` (member id i on connection key(i)) acknowledges `epoch`.
    fn ack_all(&mut self, group: &str, ids: &[u64], epoch: u64, ms: u64) -> Publish {
        let mut out = Vec::new();
        for &id in ids {
            let (flow, fx) = self.send(id, id, group, msg(MsgType::Ack, &proto::Ack { epoch }), ms);
            assert_eq!(flow, Flow::Go);
            assert!(fx.now.is_empty());
            out.extend(fx.publish);
        }
        out
    }

    /// Forms an elastic group of `n` members (ids 1..=n on connections key(1..=n)) at 0 ms,
    /// all of which acknowledge epoch 1.
    fn elastic(&mut self, group: &str, n: u64, policy: GroupPolicy) {
        for i in 1..=n {
            let mut r = reg(group, n as usize, None, true);
            r.policy = policy.clone();
            let (id, publish) = self.register(i, r, 0).unwrap();
            assert_eq!(id, i);
            if i < n {
                assert!(publish.is_empty());
            } else {
                let ids: Vec<u64> = (1..=n).collect();
                let to: Vec<(u64, u64)> = ids.iter().map(|&i| (key(i), i)).collect();
                assert_eq!(receivers(&publish, 1, &ids), to);
            }
        }
        let ids: Vec<u64> = (1..=n).collect();
        assert!(self.ack_all(group, &ids, 1, 0).is_empty());
    }

    fn secret(&self, id: u64) -> Vec<u8> {
        let a = self.acks.iter().find(|(i, _)| *i == id).unwrap();
        super::super::from_hex(a.1.secret.as_deref().unwrap()).unwrap()
    }

    fn status(&self) -> serde_json::Value {
        status_json(&self.st, self.t0)
    }
}

fn policy(min: usize, max: Option<usize>) -> GroupPolicy {
    GroupPolicy {
        min_size: min,
        max_size: max,
        join_window_ms: 100,
    }
}

#[test]
fn a_fixed_group_forms_with_requested_ranks_first_and_free_ones_in_arrival_order() {
    let mut b = Bench::new();
    // Arrival order: rank 2 asked, any rank, rank 0 asked, any rank.
    let asks = [Some(2), None, Some(0), None];
    for (i, rank) in asks.iter().enumerate() {
        let i = i as u64 + 1;
        let (id, publish) = b.register(i, reg("w", 4, *rank, false), 0).unwrap();
        assert_eq!(id, i, "ids count up from 1");
        if i < 4 {
            assert!(publish.is_empty(), "no view before the group is complete");
            assert!(!b.st.take_dirty(), "nothing to persist before the view");
        } else {
            // Rank 0: member 3; rank 1: member 2 (first free); rank 2: member 1; rank 3: 4.
            let to = receivers(&publish, 1, &[3, 2, 1, 4]);
            // One view per member, on its own connection, in rank order.
            assert_eq!(to, [(key(3), 3), (key(2), 2), (key(1), 1), (key(4), 4)]);
            assert!(views(&publish).iter().all(|s| s.reason == "initial"));
            assert!(b.st.take_dirty(), "the first view is persisted");
        }
    }
    let counts: Vec<usize> = b.acks.iter().map(|a| a.1.registered).collect();
    assert_eq!(counts, [1, 2, 3, 4]);
    assert!(b.acks.iter().all(|a| !a.1.joining && a.1.secret.is_some()));
    // The group is complete: a fixed group takes nobody else.
    let (msg, code) = b.register(5, reg("w", 4, None, false), 0).unwrap_err();
    assert!(msg.contains("elastic join is not enabled"), "{msg}");
    assert_eq!(code, None);
    // A taken rank is refused while a group forms; another world size too.
    b.register(6, reg("v", 2, Some(1), false), 0).unwrap();
    let (msg, _) = b.register(7, reg("v", 2, Some(1), false), 0).unwrap_err();
    assert!(
        msg.contains("rank 1 of group v is already taken by member 5"),
        "{msg}"
    );
    let (msg, _) = b.register(8, reg("v", 3, None, false), 0).unwrap_err();
    assert!(msg.contains("has world size 2"), "{msg}");
    let st = b.status();
    assert_eq!(st["live_members"], 5);
    assert_eq!(st["registered_total"], 5);
    assert_eq!(st["next_member_id"], 6, "refused registrations spend no id");
}

#[test]
fn a_failed_acknowledgement_leaves_the_state_as_it_was() {
    let mut b = Bench::new();
    let res = register(
        &mut b.st,
        reg("w", 2, None, false),
        key(1),
        peer(1),
        None,
        b.t0,
        &mut |_, _| Err(std::io::Error::other("gone")),
    );
    let (msg, _) = res.unwrap_err();
    assert!(msg.contains("acknowledgement failed: gone"), "{msg}");
    assert!(b.st.groups.is_empty(), "the group it created is forgotten");
    let st = b.status();
    assert_eq!(st["registered_total"], 0);
    // Its id is spent (ids are never reused).
    assert_eq!(b.register(1, reg("w", 2, None, false), 0).unwrap().0, 2);
}

#[test]
fn an_elastic_join_is_admitted_after_its_window_once_the_view_is_installed() {
    let mut b = Bench::new();
    b.elastic("e", 2, policy(1, None));
    // A joiner at 500 ms: it waits for the window (100 ms).
    let (id, publish) = b.register(3, reg("e", 2, None, true), 500).unwrap();
    assert_eq!(id, 3);
    assert!(publish.is_empty());
    assert!(b.acks.last().unwrap().1.joining);
    assert!(tick(&mut b.st, at(b.t0, 550)).publish.is_empty());
    for i in 1..=3 {
        let hb = msg(MsgType::Heartbeat, &proto::Heartbeat { epoch: 1 });
        b.send(i, i, "e", hb, 580);
    }
    let fx = tick(&mut b.st, at(b.t0, 600));
    assert!(fx.now.is_empty());
    let sent = views(&fx.publish);
    assert!(sent.iter().all(|s| s.reason == "join of 3"), "{sent:?}");
    // Everyone, the joiner included, on its own connection.
    assert_eq!(
        receivers(&fx.publish, 2, &[1, 2, 3]),
        [(key(1), 1), (key(2), 2), (key(3), 3)]
    );
    assert!(b.st.take_dirty());
    // A second joiner while epoch 2 is not installed everywhere waits for the acks too.
    assert!(b
        .register(4, reg("e", 2, None, true), 600)
        .unwrap()
        .1
        .is_empty());
    assert!(tick(&mut b.st, at(b.t0, 750)).publish.is_empty());
    assert!(b.ack_all("e", &[1, 2], 2, 750).is_empty());
    let publish = b.ack_all("e", &[3], 2, 750);
    assert_eq!(
        receivers(&publish, 3, &[1, 2, 3, 4]),
        [(key(1), 1), (key(2), 2), (key(3), 3), (key(4), 4)]
    );
}

#[test]
fn a_silent_member_is_declared_dead_by_the_tick_and_the_others_get_the_next_view() {
    let mut b = Bench::new();
    b.elastic("e", 3, policy(1, None));
    // Members 1 and 2 beat at 900 ms; member 3 stays silent. The first heartbeat is echoed
    // (on the member's own connection), the next one within a quarter of the timeout not.
    for i in 1..=2 {
        let hb = msg(MsgType::Heartbeat, &proto::Heartbeat { epoch: 1 });
        let (flow, fx) = b.send(i, i, "e", hb.clone(), 900);
        assert_eq!(flow, Flow::Go);
        assert!(fx.publish.is_empty());
        match fx.now.as_slice() {
            [Out::Send { conn, frame: f, .. }] => {
                assert_eq!(*conn, key(i));
                let f = frame(f);
                assert_eq!(f.ty, MsgType::Heartbeat as u16);
                assert_eq!(f.body::<proto::Heartbeat>().unwrap().epoch, 1);
            }
            other => panic!("{other:?}"),
        }
        assert!(b.send(i, i, "e", hb.clone(), 1000).1.now.is_empty());
        assert_eq!(b.send(i, i, "e", hb, 1150).1.now.len(), 1);
    }
    assert!(
        tick(&mut b.st, at(b.t0, 1000)).publish.is_empty(),
        "3 is silent for 1.0 s only"
    );
    let fx = tick(&mut b.st, at(b.t0, 1001));
    // Member 3 gets a goodbye and its connection is shut down...
    match fx.now.as_slice() {
        [Out::Send { conn, frame: f, .. }, Out::Close { conn: c }] => {
            assert_eq!((*conn, *c), (key(3), key(3)));
            let e: proto::ErrorMsg = frame(f).body().unwrap();
            assert_eq!(e.code.as_deref(), Some("retired"));
        }
        other => panic!("{other:?}"),
    }
    // ... and the others the view without it.
    assert_eq!(
        receivers(&fx.publish, 2, &[1, 2]),
        [(key(1), 1), (key(2), 2)]
    );
    let sent = views(&fx.publish);
    assert!(
        sent[0]
            .reason
            .starts_with("failure of 3 (no heartbeat for 1.0 s)"),
        "{sent:?}"
    );
    // A late frame of member 3 is refused: its id is retired.
    let hb = msg(MsgType::Heartbeat, &proto::Heartbeat { epoch: 1 });
    let (flow, fx) = b.send(3, 3, "e", hb, 1100);
    assert_eq!(flow, Flow::End(false));
    match fx.now.as_slice() {
        [Out::Send { conn, frame: f, .. }] => {
            assert_eq!(*conn, key(3));
            let e: proto::ErrorMsg = frame(f).body().unwrap();
            assert_eq!(e.code.as_deref(), Some("retired"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_silent_member_of_a_fixed_group_is_declared_dead_and_the_others_get_a_failure_notice() {
    let mut b = Bench::new();
    for i in 1..=3 {
        let (id, _) = b.register(i, reg("f", 3, None, false), 0).unwrap();
        assert_eq!(id, i);
    }
    assert!(b.ack_all("f", &[1, 2, 3], 1, 0).is_empty());
    let hb = msg(MsgType::Heartbeat, &proto::Heartbeat { epoch: 1 });
    for i in 1..=2 {
        assert_eq!(b.send(i, i, "f", hb.clone(), 900).1.now.len(), 1, "echoed");
    }
    let fx = tick(&mut b.st, at(b.t0, 1000));
    assert!(
        fx.publish.is_empty() && fx.now.is_empty(),
        "silent for 1.0 s only"
    );
    let fx = tick(&mut b.st, at(b.t0, 1001));
    assert!(fx.publish.is_empty(), "a fixed group gets no new view");
    // Members 1 and 2 are told that 3 failed (no new view: nobody re-forms a fixed group);
    // member 3 gets a goodbye and its connection is shut down.
    let mut told = Vec::new();
    let mut retired = Vec::new();
    for o in &fx.now {
        match o {
            Out::Send { conn, frame: f, .. } => {
                let f = frame(f);
                if f.ty == MsgType::Failure as u16 {
                    let m: proto::FailureMsg = f.body().unwrap();
                    assert_eq!((m.group.as_str(), m.epoch, m.failed), ("f", 1, 3));
                    assert!(
                        m.reason
                            .starts_with("failure of 3 (no heartbeat for 1.0 s)"),
                        "{m:?}"
                    );
                    told.push((*conn, m.member_id));
                } else {
                    let e: proto::ErrorMsg = f.body().unwrap();
                    assert_eq!(e.code.as_deref(), Some("retired"));
                    retired.push(*conn);
                }
            }
            Out::Close { conn } => retired.push(*conn),
        }
    }
    assert_eq!(told, [(key(1), 1), (key(2), 2)]);
    assert_eq!(retired, [key(3), key(3)]);
    // Nothing more while the survivors beat; a late frame of 3 is refused.
    for i in 1..=2 {
        b.send(i, i, "f", hb.clone(), 1500);
    }
    let fx = tick(&mut b.st, at(b.t0, 1600));
    assert!(fx.publish.is_empty() && fx.now.is_empty(), "{:?}", fx.now);
    let (flow, _) = b.send(3, 3, "f", hb, 1700);
    assert_eq!(flow, Flow::End(false));
}

#[test]
fn a_graceful_leave_gives_the_leaver_the_next_view_and_retires_its_id() {
    let mut b = Bench::new();
    b.elastic("e", 3, policy(1, None));
    let (flow, fx) = b.send(2, 2, "e", msg(MsgType::Leave, &proto::Goodbye {}), 10);
    assert_eq!(flow, Flow::Go);
    let sent = views(&fx.publish);
    assert!(sent.iter().all(|s| s.reason == "leave of 2"), "{sent:?}");
    // The members that stay, then the leaver (which learns it is out).
    assert_eq!(
        receivers(&fx.publish, 2, &[1, 3]),
        [(key(1), 1), (key(3), 3), (key(2), 2)]
    );
    // Its goodbye ends the connection; nothing more happens.
    let (flow, fx) = b.send(2, 2, "e", msg(MsgType::Goodbye, &proto::Goodbye {}), 20);
    assert_eq!(flow, Flow::End(true));
    assert!(fx.publish.is_empty() && fx.now.is_empty());
    assert!(depart(&mut b.st, 2, "e", peer(2), key(2), true, at(b.t0, 20)).is_empty());
    // It cannot come back as member 2.
    let rj = proto::Rejoin {
        group: "e".into(),
        member_id: 2,
        epoch: 1,
        client_nonce: "c".into(),
        view_deltas: false,
    };
    let hs = Handshake {
        proof: None,
        server_nonce: "s".into(),
        answer: None,
    };
    let res = rejoin(
        &mut b.st,
        &rj,
        key(9),
        peer(9),
        &hs,
        "c",
        at(b.t0, 30),
        &mut |_, _| Ok(()),
    );
    let (msg, code) = res.unwrap_err();
    assert_eq!(code, Some("retired"));
    assert!(msg.contains("left at epoch 2"), "{msg}");
}

#[test]
fn a_resync_is_published_once_every_suspect_is_dead_or_asking_too() {
    let mut b = Bench::new();
    b.elastic("e", 3, policy(1, None));
    let ask = |suspects: Vec<u64>| msg(MsgType::Resync, &proto::Resync { epoch: 1, suspects });
    // Member 1 suspects 2, which is quiet: no view yet.
    assert!(b.send(1, 1, "e", ask(vec![2]), 10).1.publish.is_empty());
    // Member 2 asks too (suspecting 1): both resolved, the same members in a new epoch.
    let (_, fx) = b.send(2, 2, "e", ask(vec![1]), 20);
    assert_eq!(
        receivers(&fx.publish, 2, &[1, 2, 3]),
        [(key(1), 1), (key(2), 2), (key(3), 3)]
    );
    assert!(views(&fx.publish)
        .iter()
        .all(|s| s.reason == "resync asked by 1,2"));
    // A resync of an older epoch is ignored.
    assert!(b.ack_all("e", &[1, 2, 3], 2, 30).is_empty());
    assert!(b.send(3, 3, "e", ask(vec![1]), 40).1.publish.is_empty());
}

#[test]
fn min_size_holds_the_next_view_back_until_a_joiner_comes() {
    let mut b = Bench::new();
    b.elastic("e", 2, policy(2, None));
    // Member 2's connection is lost: one member would be left, below the minimum of 2.
    assert!(depart(&mut b.st, 2, "e", peer(2), key(2), false, at(b.t0, 10)).is_empty());
    assert!(tick(&mut b.st, at(b.t0, 500)).publish.is_empty());
    let st = b.status();
    assert_eq!(st["groups"][0]["epoch"], 1);
    assert_eq!(st["groups"][0]["live"], 1);
    // A joiner fills the gap at once (a failure-driven change does not wait for a window).
    let (id, publish) = b.register(3, reg("e", 2, None, true), 600).unwrap();
    assert_eq!(id, 3);
    assert_eq!(receivers(&publish, 2, &[1, 3]), [(key(1), 1), (key(3), 3)]);
    let reason = &views(&publish)[0].reason;
    assert_eq!(
        reason,
        "failure of 2 (connection to the coordinator lost); join of 3"
    );
}

#[test]
fn max_size_caps_the_joins_and_the_rest_keep_waiting() {
    let mut b = Bench::new();
    b.elastic("e", 2, policy(1, Some(3)));
    for i in 3..=5 {
        assert!(b
            .register(i, reg("e", 2, None, true), 0)
            .unwrap()
            .1
            .is_empty());
    }
    let fx = tick(&mut b.st, at(b.t0, 100));
    // Only one joiner fits (the lowest id); the waiting ones get the view too.
    assert_eq!(
        receivers(&fx.publish, 2, &[1, 2, 3]),
        [
            (key(1), 1),
            (key(2), 2),
            (key(3), 3),
            (key(4), 4),
            (key(5), 5)
        ]
    );
    assert!(b.ack_all("e", &[1, 2, 3], 2, 150).is_empty());
    assert!(
        tick(&mut b.st, at(b.t0, 400)).publish.is_empty(),
        "the group is full"
    );
    let st = b.status();
    let waiting: Vec<u64> = st["groups"][0]["joiners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    assert_eq!(waiting, [4, 5]);
    // When a member leaves, the next joiner takes its place.
    let (_, fx) = b.send(1, 1, "e", msg(MsgType::Leave, &proto::Goodbye {}), 500);
    assert_eq!(
        receivers(&fx.publish, 3, &[2, 3, 4]),
        [
            (key(2), 2),
            (key(3), 3),
            (key(4), 4),
            (key(5), 5),
            (key(1), 1)
        ]
    );
}

#[test]
fn a_rejoin_must_prove_the_member_secret() {
    let mut b = Bench::new();
    for i in 1..=2 {
        b.register(i, reg("w", 2, None, false), 0).unwrap();
    }
    let rj = proto::Rejoin {
        group: "w".into(),
        member_id: 1,
        epoch: 0,
        client_nonce: "cn".into(),
        view_deltas: false,
    };
    let hs = |mac: String| Handshake {
        proof: None,
        server_nonce: "sn".into(),
        answer: Some(proto::Auth {
            mac: String::new(),
            member: Some(mac),
        }),
    };
    // A wrong secret (or none) is refused; member 1 keeps its connection.
    let wrong = auth::rejoin_mac(&[9u8; SECRET_LEN], "w", 1, "sn", "cn");
    let mut wrote = 0;
    let res = rejoin(
        &mut b.st,
        &rj,
        key(11),
        peer(11),
        &hs(wrong),
        "cn",
        at(b.t0, 5),
        &mut |_, _| {
            wrote += 1;
            Ok(())
        },
    );
    assert_eq!(res.unwrap_err().1, Some("auth"));
    assert_eq!(wrote, 0, "no acknowledgement for a refused rejoin");
    assert_eq!(b.status()["groups"][0]["members"][0]["connected"], true);
    // The right one, proved for another nonce, is refused too.
    let replayed = auth::rejoin_mac(&b.secret(1), "w", 1, "other", "cn");
    let res = rejoin(
        &mut b.st,
        &rj,
        key(11),
        peer(11),
        &hs(replayed),
        "cn",
        at(b.t0, 5),
        &mut |_, _| Ok(()),
    );
    assert_eq!(res.unwrap_err().1, Some("auth"));
    // The right proof: acknowledged (without a secret), the old connection shut down, and the
    // view (epoch 1, which it missed) sent on the new one once persisted.
    let good = auth::rejoin_mac(&b.secret(1), "w", 1, "sn", "cn");
    let mut acks = Vec::new();
    let fx = rejoin(
        &mut b.st,
        &rj,
        key(11),
        peer(11),
        &hs(good),
        "cn",
        at(b.t0, 5),
        &mut |id, a| {
            acks.push((id, a.to_vec()));
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].0, 1);
    let ack: proto::Registered = frame(&acks[0].1).body().unwrap();
    assert_eq!((ack.member_id, ack.secret), (1, None));
    assert_eq!(fx.now, [Out::Close { conn: key(1) }]);
    assert_eq!(receivers(&fx.publish, 1, &[1, 2]), [(key(11), 1)]);
    // The old connection ending now says nothing about member 1.
    assert!(depart(&mut b.st, 1, "w", peer(1), key(1), false, at(b.t0, 6)).is_empty());
    assert_eq!(b.st.registered("w"), 2);
    // Views now go to the new connection.
    let views_to: Vec<u64> =
        b.st.groups
            .get("w")
            .map(|g| g.entries.iter().filter_map(|e| e.conn).collect())
            .unwrap();
    assert_eq!(views_to, [key(11), key(2)]);
}

#[test]
fn retired_and_unknown_ids_are_refused() {
    let mut b = Bench::new();
    b.elastic("e", 2, policy(1, None));
    // Member 2's connection is lost after the view: it is retired at once.
    let publish = depart(&mut b.st, 2, "e", peer(2), key(2), false, at(b.t0, 10));
    assert_eq!(receivers(&publish, 2, &[1]), [(key(1), 1)]);
    let hs = Handshake {
        proof: None,
        server_nonce: "sn".into(),
        answer: None,
    };
    let mut rj = proto::Rejoin {
        group: "e".into(),
        member_id: 2,
        epoch: 1,
        client_nonce: "cn".into(),
        view_deltas: false,
    };
    let mut no_ack = |_: u64, _: &[u8]| -> std::io::Result<()> { panic!("acknowledged") };
    let (text, code) = rejoin(
        &mut b.st,
        &rj,
        key(3),
        peer(3),
        &hs,
        "cn",
        at(b.t0, 20),
        &mut no_ack,
    )
    .unwrap_err();
    assert_eq!(code, Some("retired"));
    assert!(
        text.contains("failure of 2 (connection to the coordinator lost)"),
        "{text}"
    );
    // An id never handed out in this group, and a group never seen.
    rj.member_id = 77;
    let (_, code) = rejoin(
        &mut b.st,
        &rj,
        key(3),
        peer(3),
        &hs,
        "cn",
        at(b.t0, 20),
        &mut no_ack,
    )
    .unwrap_err();
    assert_eq!(code, Some("retired"));
    rj.group = "nowhere".into();
    let (_, code) = rejoin(
        &mut b.st,
        &rj,
        key(3),
        peer(3),
        &hs,
        "cn",
        at(b.t0, 20),
        &mut no_ack,
    )
    .unwrap_err();
    assert_eq!(code, Some("unknown"));
    // A registration frame on a member's connection is refused and ends it.
    let (flow, fx) = b.send(
        1,
        1,
        "e",
        msg(MsgType::Register, &reg("e", 2, None, true)),
        30,
    );
    assert_eq!(flow, Flow::End(false));
    assert!(matches!(fx.now.as_slice(), [Out::Send { conn, .. }] if *conn == key(1)));
    // The last member gone: the group is forgotten (and that is persisted).
    b.st.take_dirty();
    assert!(depart(&mut b.st, 1, "e", peer(1), key(1), true, at(b.t0, 40)).is_empty());
    assert!(b.st.groups.is_empty());
    assert!(b.st.take_dirty());
    let st = b.status();
    assert_eq!(st["live_members"], 0);
    assert_eq!(st["past_groups"][0]["group"], "e");
    assert_eq!(st["past_groups"][0]["registered_total"], 2);
}

#[test]
fn ids_stay_monotonic_across_snapshot_and_load() {
    let mut st = State::new(true);
    // No id is durable yet: the I/O layer must write the state first.
    assert!(st.ids_short());
    let mut no_ack = |_: u64, _: &[u8]| -> std::io::Result<()> { Ok(()) };
    let err = register(
        &mut st,
        reg("w", 2, None, false),
        key(1),
        peer(1),
        None,
        Instant::now(),
        &mut no_ack,
    )
    .unwrap_err();
    assert!(err.0.contains("cannot persist its state"), "{}", err.0);
    // The reservation is a block ahead; once written, ids are handed out below it.
    let (gen1, doc) = snapshot(&mut st);
    assert_eq!(doc.id_high_water, 1 + ID_BLOCK);
    st.note_durable(doc.id_high_water);
    assert!(!st.ids_short());
    let mut secrets = Vec::new();
    for i in 1..=2 {
        let mut ack = |_: u64, b: &[u8]| -> std::io::Result<()> {
            let r: proto::Registered = frame(b).body().unwrap();
            secrets.push(r.secret.unwrap());
            Ok(())
        };
        let (id, _, _) = register(
            &mut st,
            reg("w", 2, None, false),
            key(i),
            peer(i),
            None,
            Instant::now(),
            &mut ack,
        )
        .unwrap();
        assert_eq!(id, i);
    }
    assert!(st.take_dirty());
    let (gen2, doc) = snapshot(&mut st);
    assert!(gen2 > gen1, "a later snapshot has a later generation");
    let bytes = serde_json::to_vec(&doc).unwrap();
    // A restarted coordinator: ids continue above everything that may have been handed out.
    let t = Instant::now();
    let mut back = state_from_bytes(Some(&bytes), t).unwrap();
    back.set_persist_ids(true);
    assert_eq!(back.next_id, 1 + ID_BLOCK);
    // Its next id is not durable yet: written first (what the I/O layer does).
    assert!(back.ids_short());
    let (_, d) = snapshot(&mut back);
    back.note_durable(d.id_high_water);
    let (id, _, _) = register(
        &mut back,
        reg("x", 1, None, false),
        key(3),
        peer(3),
        None,
        t,
        &mut no_ack,
    )
    .unwrap();
    assert_eq!(
        id,
        1 + ID_BLOCK,
        "ids continue at the persisted high-water mark"
    );
    // The restored members are disconnected until they rejoin, with the secret they were
    // given (it was persisted).
    let status = status_json(&back, t);
    assert_eq!(status["groups"][0]["group"], "w");
    assert_eq!(status["groups"][0]["members"][0]["connected"], false);
    let rj = proto::Rejoin {
        group: "w".into(),
        member_id: 2,
        epoch: 1,
        client_nonce: "cn".into(),
        view_deltas: false,
    };
    let secret = super::super::from_hex(&secrets[1]).unwrap();
    let hs = Handshake {
        proof: None,
        server_nonce: "sn".into(),
        answer: Some(proto::Auth {
            mac: String::new(),
            member: Some(auth::rejoin_mac(&secret, "w", 2, "sn", "cn")),
        }),
    };
    let fx = rejoin(&mut back, &rj, key(4), peer(4), &hs, "cn", t, &mut no_ack).unwrap();
    assert!(fx.publish.is_empty(), "it runs the current epoch already");
    assert!(fx.now.is_empty(), "no previous connection to shut down");
    // Snapshot -> load -> snapshot again: the high-water mark never goes down.
    let (_, again) = snapshot(&mut back);
    assert!(again.id_high_water >= doc.id_high_water);
    let reloaded = state_from_bytes(Some(&serde_json::to_vec(&again).unwrap()), t).unwrap();
    assert!(reloaded.next_id > id);
}

#[test]
fn measured_pipeline_stages_re_weigh_a_quiet_group() {
    let mut b = Bench::new();
    b.elastic("p", 2, policy(1, None));
    // Four blocks of cost 1; member 1 runs blocks 0..2 in 1 s, member 2 blocks 2..4 in 4 s.
    let report = |first: u64, seconds: f64| {
        msg(
            MsgType::Metric,
            &proto::Metric {
                epoch: 1,
                seconds,
                first_block: first,
                end_block: first + 2,
                costs: vec![1.0; 4],
                gain: 0.1,
            },
        )
    };
    // Every stage must report twice before a decision.
    for (i, first, seconds) in [(1, 0, 1.0), (2, 2, 4.0), (1, 0, 1.0)] {
        let (flow, fx) = b.send(i, i, "p", report(first, seconds), 10);
        assert_eq!(flow, Flow::Go);
        assert!(fx.publish.is_empty());
    }
    let (_, fx) = b.send(2, 2, "p", report(2, 4.0), 10);
    // Measured throughputs 2 and 0.5 blocks/s, scaled to the published mean weight (1):
    // 1.6 and 0.4. The slowest stage takes 2 / 0.4 = 5 s; the best plan (3 + 1 blocks)
    // 2.5 s: a predicted gain of 50 %. Same members, same order, new weights.
    assert_eq!(
        receivers(&fx.publish, 2, &[1, 2]),
        [(key(1), 1), (key(2), 2)]
    );
    let Out::Send { frame: f, .. } = &fx.publish[0] else {
        panic!("not a frame");
    };
    let v: proto::ViewMsg = frame(f).body().unwrap();
    assert_eq!(v.reason, "reweigh: predicted gain 50%");
    let w: Vec<f64> = v.view.members.iter().map(|m| m.weight).collect();
    assert!(
        (w[0] - 1.6).abs() < 1e-9 && (w[1] - 0.4).abs() < 1e-9,
        "{w:?}"
    );
    // A checkpoint note shows in the status (not persisted, no view).
    let note = proto::CheckpointNote {
        id: "c0ffee".into(),
        dir: "/tmp/ck".into(),
        version: 3,
        max_version: 3,
        parts: 2,
        bytes: 64,
    };
    let (flow, fx) = b.send(1, 1, "p", msg(MsgType::Checkpoint, &note), 20);
    assert_eq!(flow, Flow::Go);
    assert!(fx.publish.is_empty() && fx.now.is_empty());
    let st = b.status();
    assert_eq!(st["groups"][0]["checkpoint"]["id"], "c0ffee");
    assert_eq!(st["groups"][0]["checkpoint"]["member"], 1);
}
