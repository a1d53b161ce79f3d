//! Fuzz entry points (not part of the API): each function feeds arbitrary bytes to one decoder
//! or state machine that a peer reaches over the network, and must return without panicking,
//! aborting, hanging or allocating much more than the protocol allows. The libFuzzer targets in
//! `fuzz/` and the smoke test (`core/tests/fuzz_smoke.rs`, `make fuzz-smoke`) call these; the
//! transport's own targets are in `braid_transport::fuzzing`.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use braid_transport::{Conn, Request, META_LEN};

use crate::membership::Role;
use crate::ps::chan::{Chan, Incoming, Limits, OnMsg};
use crate::ps::wire::Msg;

/// The channel limits of the `ps_chan` target (a server's for a 1 MiB partition).
const LIMITS: Limits = Limits {
    hdr: 1 << 20,
    body: 1 << 20,
};

/// [`crate::comm::decode_handles`] (the connect handles a member publishes through the
/// coordinator, read by every peer); a list that decodes must encode back to the same bytes.
pub fn decode_handles(data: &[u8]) {
    if let Ok(hs) = crate::comm::decode_handles(data) {
        if data.len() >= 5 && data[..4] == *b"BRDL" {
            assert_eq!(
                crate::comm::encode_handles(&hs),
                data,
                "handle list does not round-trip"
            );
        }
    }
}

/// The collective data-connection hello (`comm::parse_hello`), for a rank without and with a
/// job token (first input byte even: without); the rest of the input is the hello.
pub fn comm_hello(data: &[u8]) {
    let Some((first, hello)) = data.split_first() else {
        return;
    };
    let token: Option<&[u8]> = (first & 1 == 1).then_some(b"fuzz-token".as_slice());
    let _ = crate::comm::parse_hello(hello, token);
}

/// The push/pull data-connection hello (`ps::node::decode_hello`).
pub fn ps_hello(data: &[u8]) {
    let _ = crate::ps::node::decode_hello(data);
}

/// Push/pull message headers ([`Msg::decode`]), then what a receiver checks before acting on
/// one: the role rule for every sender/receiver pair and the checked length of its parts. A
/// decoded header must encode and decode again (to the same message, and its JSON form too,
/// where it has a binary form). The input also goes to [`ps_checkpoint`].
pub fn ps_wire(data: &[u8]) {
    ps_checkpoint(data);
    let Ok(m) = Msg::decode(data) else {
        return;
    };
    let roles = [Role::Worker, Role::Server, Role::Reader];
    for from in roles {
        for to in roles {
            let _ = crate::ps::wire::permitted(from, to, &m);
        }
    }
    match &m {
        Msg::Init { parts, .. } | Msg::Push { parts, .. } | Msg::Pull { parts, .. } => {
            let _ = crate::ps::wire::parts_len(parts);
        }
        _ => {}
    }
    let again = Msg::decode(&m.encode());
    assert!(again.is_ok(), "re-encoded push/pull header does not decode");
    if m.encode().first() == Some(&crate::ps::wire::BINARY_MARK) {
        assert_eq!(again.as_ref(), Ok(&m), "binary header does not round-trip");
        let json = Msg::decode(&m.encode_json());
        assert_eq!(
            json.as_ref(),
            Ok(&m),
            "JSON form of a binary header differs"
        );
    }
}

/// A push/pull checkpoint manifest (`ps::checkpoint::Manifest::decode`: checksum and every
/// bound checked), a server file's header, and names and paths as the checkpoint code checks
/// them. Run by the `ps_wire` target too (its JSON inputs are the closest corpus).
pub fn ps_checkpoint(data: &[u8]) {
    crate::ps::checkpoint::fuzz_manifest(data);
}

/// Splits the input into records `[tag u8][len u16 LE][len bytes]` (the last one shorter if the
/// input ends).
fn records(mut data: &[u8]) -> Vec<(u64, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 3 {
        let tag = u64::from(data[0]);
        let len = u16::from_le_bytes([data[1], data[2]]) as usize;
        let body = &data[3..];
        let n = len.min(body.len());
        out.push((tag, &body[..n]));
        data = &body[n..];
    }
    out
}

/// Drives the posted sends of `conn` until all completed, the connection failed, or nothing
/// moves any more.
fn drive_sends(conn: &mut dyn Conn, reqs: &[Request]) {
    braid_transport::fuzzing::drive_requests(conn, reqs, 50, Duration::from_micros(100));
}

/// The push/pull message channel (`ps::chan`: prefix, header, body over tagged transport
/// messages) on a real TCP-transport connection, as a server's or worker's data connection
/// sees it: one input = the transport messages a peer sends, as records
/// `[tag u8][len u16 LE][bytes]`. Every message the channel delivers goes to the header decoder.
pub fn ps_chan(data: &[u8]) {
    let Some((mine, mut peer)) = braid_transport::fuzzing::tcp_pair() else {
        return;
    };
    let (closed_tx, closed_rx) = mpsc::channel::<String>();
    let on_msg: OnMsg = Box::new(|m: &Incoming| Msg::decode(&m.hdr).map(|_| ()));
    let on_close = Box::new(move |why: String| {
        let _ = closed_tx.send(why);
    });
    let Ok(chan) = Chan::start(mine, "fuzz", LIMITS, on_msg, on_close) else {
        return;
    };
    let chan = Arc::new(chan);
    let recs = records(data);
    let zero = [0u8; META_LEN];
    let mut reqs = Vec::new();
    for (tag, b) in &recs {
        // SAFETY: every record borrows `data`, which outlives `peer` (dropped below).
        match unsafe { peer.isend(*tag, &zero, b.as_ptr(), b.len()) } {
            Ok(Some(r)) => reqs.push(r),
            _ => break,
        }
    }
    drive_sends(&mut *peer, &reqs);
    peer.goodbye();
    drop(peer);
    // The peer is gone: the channel must notice and end by itself.
    let ended = closed_rx.recv_timeout(Duration::from_secs(20)).is_ok() || chan.closed().is_some();
    assert!(
        ended,
        "the push/pull channel did not end after its peer closed"
    );
    chan.close();
}

/// Coordinator frames as the coordinator reads a connection, each payload decoded as every
/// message body (`membership::fuzz_decode_frame`).
pub fn coord_frame(data: &[u8]) {
    crate::membership::fuzz_decode_frame(data);
}

/// The coordinator's state file (`membership::fuzz_load_state`: parsed and turned into the
/// coordinator's state, as at a restart).
pub fn coord_state(data: &[u8]) {
    crate::membership::fuzz_load_state(data);
}

/// The address of this process's fuzzing coordinator (started on first use, then kept).
fn fuzz_coordinator() -> Option<std::net::SocketAddr> {
    static ADDR: std::sync::OnceLock<Option<std::net::SocketAddr>> = std::sync::OnceLock::new();
    *ADDR.get_or_init(|| {
        let opts = crate::membership::CoordinatorOptions {
            handshake_timeout: Duration::from_secs(2),
            frame_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        let c = crate::membership::Coordinator::bind_with("127.0.0.1:0", opts).ok()?;
        let addr = c.local_addr();
        // Serves until the process ends.
        std::mem::forget(c);
        Some(addr)
    })
}

/// A running coordinator serving one connection: one input = the bytes a client sends before
/// closing its side; the coordinator's answers are read until it closes (at most 5 s). The
/// coordinator is shared by all inputs of a process (state left by earlier inputs stays).
pub fn coord_session(data: &[u8]) {
    use std::io::{Read, Write};
    let Some(addr) = fuzz_coordinator() else {
        return;
    };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return;
    };
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = s.write_all(&data[..data.len().min(64 << 10)]);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let end = std::time::Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    while std::time::Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
}

/// A coordinator frame (header as in `membership::proto`).
fn coord_frame_bytes(ty: u16, body: &serde_json::Value) -> Vec<u8> {
    let payload = serde_json::to_vec(body).unwrap_or_default();
    let mut v = b"BRDC".to_vec();
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&ty.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(&payload);
    v
}

/// The `ps_chan` record of one transport message.
fn record(out: &mut Vec<u8>, tag: u64, b: &[u8]) {
    out.push(tag as u8);
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

/// The `ps_chan` records of one channel message (prefix, header, body).
fn chan_message(out: &mut Vec<u8>, hdr: &[u8], body: &[u8]) {
    let mut p = b"BRPS".to_vec();
    p.extend_from_slice(&(hdr.len() as u32).to_le_bytes());
    p.extend_from_slice(&(body.len() as u64).to_le_bytes());
    record(out, 1, &p);
    record(out, 2, hdr);
    if !body.is_empty() {
        record(out, 3, body);
    }
}

/// The `ps_chan` records of one segmented channel message (magic `BRPM`: the segment table
/// before the header, the body as one transport message per segment).
fn chan_segmented(out: &mut Vec<u8>, hdr: &[u8], segs: &[&[u8]]) {
    let body: usize = segs.iter().map(|s| s.len()).sum();
    let mut h = (segs.len() as u32).to_le_bytes().to_vec();
    for s in segs {
        h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    }
    h.extend_from_slice(hdr);
    let mut p = b"BRPM".to_vec();
    p.extend_from_slice(&(h.len() as u32).to_le_bytes());
    p.extend_from_slice(&(body as u64).to_le_bytes());
    record(out, 1, &p);
    record(out, 2, &h);
    for s in segs {
        record(out, 3, s);
    }
}

fn sample_view() -> crate::membership::View {
    use crate::membership::{Member, View};
    let member = |id: u64, role: Role| Member {
        id,
        host_id: "boot-id:host-a".into(),
        hostname: "host-a".into(),
        pid: 4242 + id as u32,
        role,
        handle: crate::comm::encode_handles(&[sample_handle()]),
        numa: Some(0),
        weight: 1.0,
    };
    View {
        group: "g".into(),
        epoch: 3,
        nonce: 0x1234_5678_9abc_def0,
        members: vec![member(1, Role::Worker), member(2, Role::Server)],
    }
}

fn sample_handle() -> braid_transport::ConnectHandle {
    braid_transport::ConnectHandle {
        transport: "tcp".into(),
        addr: b"127.0.0.1:40000".to_vec(),
    }
}

/// Seed inputs made by the real encoders: (target, file name, bytes). The smoke test checks
/// that `fuzz/corpus/<target>/<name>` holds each (`make fuzz-corpus` rewrites them).
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    use crate::ps::wire::PartRef;
    let mut out: Vec<(&'static str, String, Vec<u8>)> = Vec::new();
    let shm = braid_transport::ConnectHandle {
        transport: "shm".into(),
        addr: b"braid-shm-1234-5678".to_vec(),
    };
    out.push((
        "decode_handles",
        "seed-list".into(),
        crate::comm::encode_handles(&[shm.clone(), sample_handle()]),
    ));
    out.push((
        "decode_handles",
        "seed-bare".into(),
        sample_handle().encode(),
    ));
    out.push((
        "decode_handles",
        "seed-empty-list".into(),
        crate::comm::encode_handles(&[]),
    ));

    // comm_hello: fields (magic, version 2, flags, epoch, rank, member), view MAC, and with
    // the token flag a job-token MAC (layout of comm.rs).
    for (name, token) in [("seed-no-token", false), ("seed-token", true)] {
        let mut h = vec![u8::from(token)];
        h.extend_from_slice(b"BRDA");
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&u16::from(token).to_le_bytes());
        h.extend_from_slice(&3u64.to_le_bytes());
        h.extend_from_slice(&1u64.to_le_bytes());
        h.extend_from_slice(&7u64.to_le_bytes());
        h.extend_from_slice(&[0x11; crate::membership::auth::MAC_LEN]);
        if token {
            h.extend_from_slice(&[0x22; crate::membership::auth::MAC_LEN]);
        }
        out.push(("comm_hello", name.into(), h));
    }

    let view = sample_view();
    let ch = [7u8; braid_transport::CHALLENGE_LEN];
    let member = crate::ps::node::Cred::member(1, &view, Some(b"token"), 1 << 20);
    out.push(("ps_hello", "seed-member".into(), member.hello(&ch)));
    let reader =
        crate::ps::node::Cred::reader(1 << 40, 3, [9; crate::membership::auth::MAC_LEN], 4096);
    out.push(("ps_hello", "seed-reader".into(), reader.hello(&ch)));

    let parts = vec![
        PartRef {
            s: 1,
            k: 10,
            p: 0,
            n: 16,
            t: 0,
        },
        PartRef {
            s: 2,
            k: 11,
            p: 1,
            n: 8,
            t: 0,
        },
    ];
    let msgs = vec![
        (
            "push",
            Msg::Push {
                req: 1,
                op: 2,
                prio: 0,
                dtype: "f32".into(),
                parts: parts.clone(),
            },
        ),
        (
            "init",
            Msg::Init {
                req: 1,
                op: 1,
                prio: 1,
                dtype: "f32".into(),
                parts: parts.clone(),
            },
        ),
        (
            "pull",
            Msg::Pull {
                req: 3,
                epoch: 3,
                prio: 0,
                parts: parts.clone(),
                min: Some(1),
                at: None,
            },
        ),
        (
            "values",
            Msg::Values {
                req: 3,
                versions: vec![1, 2],
            },
        ),
        (
            "fail",
            Msg::Fail {
                req: 4,
                msg: "no".into(),
                retry: true,
            },
        ),
        (
            "snap",
            Msg::Snap {
                req: 5,
                version: Some(9),
            },
        ),
        (
            "replicate",
            Msg::Replicate {
                seq: 1,
                worker: 1,
                op: Box::new(Msg::Push {
                    req: 1,
                    op: 2,
                    prio: 0,
                    dtype: "f32".into(),
                    parts: parts.clone(),
                }),
                rule: Some("sgd:lr=0.1,momentum=0.9".into()),
            },
        ),
        (
            "set-rule",
            Msg::SetRule {
                req: 6,
                rule: "sgd:lr=0.1,momentum=0.9,wd=0.0001,rescale=0.5,clip=5".into(),
            },
        ),
        (
            "pull-state",
            Msg::PullState {
                req: 7,
                prio: 0,
                parts: parts.clone(),
            },
        ),
        (
            "push-state",
            Msg::PushState {
                req: 8,
                op: 3,
                prio: 0,
                dtype: "f32".into(),
                parts: parts.clone(),
            },
        ),
        (
            "keys",
            Msg::Keys {
                add: vec![(1, 10, 0), (2, 11, 1)],
            },
        ),
        (
            "bye",
            Msg::Bye {
                reason: "done".into(),
            },
        ),
    ];
    for (name, m) in &msgs {
        out.push(("ps_wire", format!("seed-{name}"), m.encode()));
        // Binary where the message has that form; its JSON form decodes too.
        let json = m.encode_json();
        if json != m.encode() {
            out.push(("ps_wire", format!("seed-json-{name}"), json));
        }
    }
    // Checkpoints: the request, the answers, and a manifest.
    let entry = crate::ps::checkpoint::PartEntry {
        s: crate::ps::shard::part_key(10, 0),
        k: 10,
        p: 0,
        dtype: "float".into(),
        version: 4,
        file: 0,
        offset: 64,
        len: 16,
        hash: "0123456789abcdef".into(),
        applied: vec![(3, 17), (4, 9)],
    };
    let file = crate::ps::checkpoint::FileEntry {
        name: crate::ps::checkpoint::file_name("00ab", 2),
        server: 2,
        bytes: 80,
        hash: "fedcba9876543210".into(),
    };
    for (name, m) in [
        (
            "checkpoint",
            Msg::Checkpoint {
                req: 7,
                id: "00ab".into(),
                dir: "/tmp/ckpt".into(),
            },
        ),
        (
            "ckpt-parts",
            Msg::CkptParts {
                req: 7,
                parts: vec![entry.clone()],
            },
        ),
        (
            "checkpointed",
            Msg::Checkpointed {
                req: 7,
                file: file.clone(),
                epoch: 3,
                known: 1,
                copy_us: 10,
                write_us: 20,
            },
        ),
    ] {
        out.push(("ps_wire", format!("seed-{name}"), m.encode()));
    }
    let mut manifest = crate::ps::checkpoint::Manifest {
        format: crate::ps::checkpoint::FORMAT.into(),
        format_version: crate::ps::checkpoint::FORMAT_VERSION,
        id: "00ab".into(),
        group: "g".into(),
        mode: "sync".into(),
        partition_bytes: 4096,
        epoch: 3,
        version: 4,
        max_version: 4,
        created_unix_ms: 1_700_000_000_000,
        files: vec![file],
        parts: vec![entry],
        hash: String::new(),
    };
    manifest.seal();
    out.push((
        "ps_wire",
        "seed-checkpoint-manifest".into(),
        serde_json::to_vec_pretty(&manifest).unwrap_or_default(),
    ));
    out.push((
        "ps_wire",
        "seed-transfer".into(),
        br#"{"t":"Transfer","dumps":{"1":[1,2,3]},"seen":[[1,2,3]],"keys":[[1,10,0]]}"#.to_vec(),
    ));
    let mut two = Vec::new();
    chan_message(&mut two, &msgs[0].1.encode(), &[1u8; 24]);
    chan_message(&mut two, &msgs[3].1.encode(), &[]);
    out.push(("ps_chan", "seed-push-and-values".into(), two));
    let mut one = Vec::new();
    chan_message(&mut one, &msgs[2].1.encode(), &[]);
    out.push(("ps_chan", "seed-pull".into(), one));
    let mut segs = Vec::new();
    chan_segmented(&mut segs, &msgs[3].1.encode(), &[&[2u8; 16], &[3u8; 8]]);
    out.push(("ps_chan", "seed-segmented-values".into(), segs));

    // Coordinator frames and sessions.
    let mut reg = crate::membership::Registration::worker(
        "g",
        2,
        None,
        crate::comm::encode_handles(&[sample_handle()]),
    );
    reg.host_id = "boot-id:host-a".into();
    reg.hostname = "host-a".into();
    reg.pid = 4242;
    reg.numa = Some(0);
    reg.heartbeat_timeout_ms = 2000;
    reg.client_nonce = "00112233445566778899aabbccddeeff".into();
    // A one-member elastic group (its view is complete at once), for pipeline metrics.
    let mut elastic = reg.clone();
    elastic.group = "pipe".into();
    elastic.world_size = 1;
    elastic.elastic = true;
    let elastic = serde_json::to_value(&elastic).unwrap_or_default();
    let reg = serde_json::to_value(&reg).unwrap_or_default();
    let nonce = serde_json::json!("00112233445566778899aabbccddeeff");
    let register = coord_frame_bytes(1, &reg);
    let heartbeat = coord_frame_bytes(6, &serde_json::json!({"epoch": 1}));
    let ack = coord_frame_bytes(7, &serde_json::json!({"epoch": 1}));
    let resync = coord_frame_bytes(9, &serde_json::json!({"epoch": 1, "suspects": [2]}));
    let leave = coord_frame_bytes(8, &serde_json::json!({}));
    let goodbye = coord_frame_bytes(5, &serde_json::json!({}));
    let rejoin = coord_frame_bytes(
        10,
        &serde_json::json!({"group": "g", "member_id": 1, "epoch": 1, "client_nonce": nonce}),
    );
    let auth = coord_frame_bytes(12, &serde_json::json!({"mac": "00", "member": "00"}));
    let status = coord_frame_bytes(13, &serde_json::json!({"client_nonce": nonce}));
    let viewreq = coord_frame_bytes(
        16,
        &serde_json::json!({"group": "g", "client_nonce": nonce}),
    );
    let readerreq = coord_frame_bytes(
        17,
        &serde_json::json!({"group": "g", "client_nonce": nonce}),
    );
    let view = coord_frame_bytes(
        3,
        &serde_json::json!({"member_id": 1, "view": sample_view(), "reason": "initial"}),
    );
    let error = coord_frame_bytes(4, &serde_json::json!({"message": "no", "code": "auth"}));
    let checkpoint = coord_frame_bytes(
        20,
        &serde_json::json!({"id": "00ab", "dir": "/tmp/ckpt", "version": 4, "max_version": 4,
            "parts": 12, "bytes": 4096}),
    );
    let metric = coord_frame_bytes(
        19,
        &serde_json::json!({"epoch": 1, "seconds": 0.25, "first_block": 0, "end_block": 3,
            "costs": [1.0, 2.0, 0.5, 4.0], "gain": 0.1}),
    );
    let sessions: Vec<(&str, Vec<u8>)> = vec![
        (
            "register",
            [&register[..], &heartbeat, &ack, &resync, &leave, &goodbye].concat(),
        ),
        ("rejoin", [&rejoin[..], &auth, &heartbeat].concat()),
        (
            "checkpoint",
            [&register[..], &ack, &checkpoint, &goodbye].concat(),
        ),
        (
            "metric",
            [
                &coord_frame_bytes(1, &elastic)[..],
                &ack,
                &metric,
                &metric,
                &goodbye,
            ]
            .concat(),
        ),
        ("status", status.clone()),
        ("viewreq", viewreq.clone()),
        ("readerreq", readerreq.clone()),
    ];
    for (name, b) in &sessions {
        out.push(("coord_session", format!("seed-{name}"), b.clone()));
        out.push(("coord_frame", format!("seed-{name}"), b.clone()));
    }
    // A whole view, then a delta to apply to it (member 2 out, member 3 in).
    let joined = sample_view().members[0].clone();
    let delta = coord_frame_bytes(
        21,
        &serde_json::json!({"member_id": 1, "group": "g", "base_epoch": 3, "epoch": 4,
            "nonce": 7, "left": [2], "joined": [crate::membership::Member { id: 3, ..joined }],
            "reason": "failure of 2; join of 3"}),
    );
    out.push((
        "coord_frame",
        "seed-view-delta".into(),
        [&view[..], &delta].concat(),
    ));
    out.push(("coord_frame", "seed-view".into(), view));
    out.push(("coord_frame", "seed-error".into(), error));

    let state = serde_json::json!({
        "id_high_water": 5,
        "groups": [{
            "world_size": 2,
            "elastic": true,
            "policy": {"min_size": 1, "max_size": 4, "join_window_ms": 500},
            "view": sample_view(),
            "heartbeat_ms": [[1, 5000], [2, 5000]],
            "history": [{"epoch": 3, "size": 2, "reason": "initial", "at": 1.5e9}],
            "secrets": [[1, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"]],
        }],
    });
    out.push((
        "coord_state",
        "seed-one-group".into(),
        serde_json::to_vec_pretty(&state).unwrap_or_default(),
    ));
    out
}
