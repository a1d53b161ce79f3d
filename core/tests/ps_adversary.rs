//! Attackers against a real push/pull server (issue 16, "Push/pull ports"): a coordinator, a
//! `KvServer` and a `KvWorker` run on threads of this process over real TCP; the attacker opens
//! its own connections to the server's data port with the transport API and crafts every byte
//! above it (hellos and push/pull frames). Each case asserts that the attacker is refused (or
//! its connection closed) and that the server keeps serving the real worker exactly. A server
//! that aborted (an allocation of an attacker-chosen size) takes this process down: the test
//! fails.
//!
//! Run: `cargo test -p braid --test ps_adversary`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use braid::membership::{self, ClientOptions, Coordinator, Registration, Role};
use braid::ps::{Consistency, KvServer, KvWorker, PsOptions};
use braid::Config;
use braid_transport::tcp::{TcpOptions, TcpTransport};
use braid_transport::{Challenge, Conn, ConnectHandle, Transport, META_LEN};
use hmac::{Hmac, Mac};
use sha2::Sha256;

const PART: usize = 4096;
const GROUP: &str = "ps";
/// The key the real worker uses: 16 floats.
const KEY: u64 = 7;
const LEN: usize = 16;

/// The job token of the runs that use one.
const TOKEN: &[u8] = b"ps-adversary-job-token";

fn cfg_tok(addr: &str, n: usize, token: Option<&[u8]>) -> Config {
    Config {
        job_token: token.map(|t| braid::config::Secret(t.to_vec())),
        ..cfg(addr, n)
    }
}

fn cfg(addr: &str, n: usize) -> Config {
    Config {
        coordinator: Some(addr.to_string()),
        world_size: Some(n),
        group: GROUP.into(),
        timeout: Duration::from_secs(60),
        init_timeout: Duration::from_secs(30),
        transport: braid::config::TransportKind::Tcp,
        heartbeat: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(3),
        join_window: Duration::from_millis(100),
        ..Config::default()
    }
}

fn opts(part: usize) -> PsOptions {
    PsOptions {
        consistency: Consistency::Async,
        partition_bytes: part,
        ..PsOptions::default()
    }
}

/// A running group: coordinator, one server, one worker that initialised `KEY` to zeros.
struct Job {
    _coord: Coordinator,
    addr: String,
    token: Option<&'static [u8]>,
    server: KvServer,
    worker: KvWorker,
    pushes: f32,
}

impl Job {
    fn start() -> Job {
        Job::start_with(None)
    }

    /// As [`Job::start`], every process (and the coordinator) with job token `token`.
    fn start_with(token: Option<&'static [u8]>) -> Job {
        let coord = Coordinator::bind_with(
            "127.0.0.1:0",
            membership::CoordinatorOptions {
                job_token: token.map(<[u8]>::to_vec),
                ..Default::default()
            },
        )
        .unwrap();
        let addr = coord.local_addr().to_string();
        let a2 = addr.clone();
        let s = std::thread::spawn(move || {
            KvServer::start(cfg_tok(&a2, 2, token), opts(PART)).unwrap()
        });
        let worker = KvWorker::start(cfg_tok(&addr, 2, token), opts(PART)).unwrap();
        let server = s.join().unwrap();
        worker.init(&[KEY], &[LEN], &[0f32; LEN]).unwrap();
        let mut j = Job {
            _coord: coord,
            addr,
            token,
            server,
            worker,
            pushes: 0.0,
        };
        j.still_serves();
        j
    }

    /// The real worker pushes 1 to every element and pulls exactly the total so far.
    fn still_serves(&mut self) {
        self.worker
            .push(&[KEY], &[LEN], &[1f32; LEN], 0)
            .unwrap()
            .wait()
            .unwrap();
        self.pushes += 1.0;
        let p = self
            .worker
            .pull::<f32>(&[KEY], &[LEN], None, 0)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(
            p.values,
            vec![self.pushes; LEN],
            "the server lost or changed data"
        );
    }

    /// A new worker (registered with the coordinator; keep the client to stay in the view) and
    /// its own connection to the server, made with a valid hello.
    fn connect_as_new_worker(&self) -> (membership::Client, Box<dyn Conn>) {
        let (h, _) = self.server_handle();
        let (client, me, view) = join_as_worker(&self.addr);
        let key = view_key(view.nonce);
        let mk = |ch: &Challenge| hello(MEMBER, me, view.epoch, PART, &key, ch);
        (client, connect(&h, &mk).expect("connect"))
    }

    /// The server's tcp connect handle and its member id, from the coordinator.
    fn server_handle(&self) -> (ConnectHandle, u64) {
        let v =
            membership::fetch_view(&self.addr, GROUP, self.token, Duration::from_secs(5)).unwrap();
        let m = v
            .members
            .iter()
            .find(|m| m.id == self.server.member_id())
            .unwrap();
        (tcp_handle(&m.handle), m.id)
    }
}

/// The tcp handle in a member's published handle list (`BRDL`, count, then u16-length-prefixed
/// handles).
fn tcp_handle(b: &[u8]) -> ConnectHandle {
    assert_eq!(&b[..4], b"BRDL");
    let mut off = 5;
    for _ in 0..b[4] {
        let n = u16::from_le_bytes([b[off], b[off + 1]]) as usize;
        let h = ConnectHandle::decode(&b[off + 2..off + 2 + n]).unwrap();
        if h.transport == "tcp" {
            return h;
        }
        off += 2 + n;
    }
    panic!("no tcp handle");
}

// ---------------------------------------------------------------------------------------------
// The hello, as documented in core/src/ps/node.rs (crafted here independently).
// ---------------------------------------------------------------------------------------------

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <Hmac<Sha256>>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn view_key(nonce: u64) -> [u8; 32] {
    mac(b"", &[b"braid-view", &nonce.to_le_bytes()])
}

const MEMBER: u8 = 1;
const READER: u8 = 2;

/// The push/pull hello version this build speaks (3: binary message headers).
const HELLO_VERSION: u8 = 3;

fn hello(claim: u8, id: u64, epoch: u64, part: usize, key: &[u8], ch: &Challenge) -> Vec<u8> {
    hello_v(HELLO_VERSION, claim, id, epoch, part, key, ch)
}

fn hello_v(
    version: u8,
    claim: u8,
    id: u64,
    epoch: u64,
    part: usize,
    key: &[u8],
    ch: &Challenge,
) -> Vec<u8> {
    let mut h = b"BRPH".to_vec();
    h.push(version);
    h.push(claim);
    h.extend_from_slice(&id.to_le_bytes());
    h.extend_from_slice(&epoch.to_le_bytes());
    h.extend_from_slice(&(part as u64).to_le_bytes());
    let m = mac(key, &[b"braid-ps", ch, &h]);
    h.extend_from_slice(&m);
    h
}

// ---------------------------------------------------------------------------------------------
// A raw connection: push/pull frames by hand.
// ---------------------------------------------------------------------------------------------

const TAG_PREFIX: u64 = 1;
const TAG_HDR: u64 = 2;
const TAG_BODY: u64 = 3;

/// Connects with the hello `mk` builds from the challenge; `None` when the transport refused.
fn connect(
    h: &ConnectHandle,
    mk: &(dyn Fn(&Challenge) -> Vec<u8> + Sync),
) -> Option<Box<dyn Conn>> {
    let t = TcpTransport::new(TcpOptions::default()).unwrap();
    t.connect_challenged(h, mk, Instant::now() + Duration::from_secs(5))
        .ok()
}

/// Sends one tagged transport message and drives it out; false if the connection failed.
fn send_raw(c: &mut dyn Conn, tag: u64, b: &[u8]) -> bool {
    let zero = [0u8; META_LEN];
    let end = Instant::now() + Duration::from_secs(10);
    let r = loop {
        // SAFETY: `b` outlives the request: it is driven to completion below; on failure or
        // timeout every caller drops the connection (which drops the request) before `b`.
        match unsafe { c.isend(tag, &zero, b.as_ptr(), b.len()) } {
            Ok(Some(r)) => break r,
            Ok(None) => {
                if c.progress().is_err() || Instant::now() > end {
                    return false;
                }
            }
            Err(_) => return false,
        }
    };
    while Instant::now() < end {
        match c.test(r) {
            Ok(Some(_)) => return true,
            Ok(None) => {
                if c.progress().is_err() {
                    return false;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(_) => return false,
        }
    }
    false
}

/// Sends a frame: prefix (magic, header length, the given body length), header, body.
fn send_frame(c: &mut dyn Conn, hdr: &[u8], body_len: u64, body: &[u8]) -> bool {
    let mut p = b"BRPS".to_vec();
    p.extend_from_slice(&(hdr.len() as u32).to_le_bytes());
    p.extend_from_slice(&body_len.to_le_bytes());
    send_raw(c, TAG_PREFIX, &p)
        && send_raw(c, TAG_HDR, hdr)
        && (body.is_empty() || send_raw(c, TAG_BODY, body))
}

/// What came back on a connection.
#[derive(Debug)]
enum Outcome {
    /// A message header (in its JSON form; a header that does not decode, as it came).
    Answer(String),
    /// The connection ended.
    Closed,
    /// Nothing within the wait.
    Silent,
}

/// Waits up to 10 s for the next message header (a body, if any, is not read).
fn next(c: &mut dyn Conn) -> Outcome {
    let end = Instant::now() + Duration::from_secs(10);
    let mut prefix = Box::new([0u8; 16]);
    // SAFETY: `prefix` lives until this function returns; the request completes or fails first
    // (or the connection is dropped by the caller).
    let r = match unsafe { c.irecv(TAG_PREFIX, prefix.as_mut_ptr(), 16) } {
        Ok(Some(r)) => r,
        _ => return Outcome::Closed,
    };
    loop {
        match c.test(r) {
            Ok(Some(_)) => break,
            Ok(None) => {}
            Err(_) => return Outcome::Closed,
        }
        if c.progress().is_err() {
            return Outcome::Closed;
        }
        if Instant::now() > end {
            return Outcome::Silent;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let hl = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]) as usize;
    let mut hdr = vec![0u8; hl];
    // SAFETY: as above, for `hdr`.
    let r = match unsafe { c.irecv(TAG_HDR, hdr.as_mut_ptr(), hl) } {
        Ok(Some(r)) => r,
        _ => return Outcome::Closed,
    };
    loop {
        match c.test(r) {
            Ok(Some(_)) => {
                return Outcome::Answer(
                    braid::ps::header_json(&hdr)
                        .unwrap_or_else(|_| String::from_utf8_lossy(&hdr).into_owned()),
                )
            }
            Ok(None) => {}
            Err(_) => return Outcome::Closed,
        }
        if c.progress().is_err() {
            return Outcome::Closed;
        }
        if Instant::now() > end {
            return Outcome::Silent;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A pull of `KEY` (one part) as JSON.
fn pull_hdr() -> Vec<u8> {
    let s = braid::ps::shard::split(KEY, LEN * 4, 4, PART)[0].skey;
    format!(
        r#"{{"t":"Pull","req":1,"epoch":0,"prio":0,"parts":[{{"s":{s},"k":{KEY},"p":0,"n":{}}}],"min":null,"at":null}}"#,
        LEN * 4
    )
    .into_bytes()
}

/// Whether a connection made with hello `mk` is served: sends a pull of `KEY` and waits for
/// its answer. A refused hello (transport refusal, or the connection closed) is `false`.
fn served(h: &ConnectHandle, mk: &(dyn Fn(&Challenge) -> Vec<u8> + Sync)) -> bool {
    let Some(mut c) = connect(h, mk) else {
        return false;
    };
    if !send_frame(&mut *c, &pull_hdr(), 0, &[]) {
        return false;
    }
    match next(&mut *c) {
        Outcome::Answer(a) => {
            assert!(a.contains(r#""t":"Values""#), "unexpected answer {a}");
            true
        }
        Outcome::Closed | Outcome::Silent => false,
    }
}

/// A reader grant from the coordinator and the hello it allows.
fn reader_hello(addr: &str) -> impl Fn(&Challenge) -> Vec<u8> + Sync {
    reader_hello_tok(addr, None)
}

fn reader_hello_tok(addr: &str, token: Option<&[u8]>) -> impl Fn(&Challenge) -> Vec<u8> + Sync {
    let g = membership::fetch_reader_grant(addr, GROUP, token, Duration::from_secs(5)).unwrap();
    move |ch: &Challenge| hello(READER, g.id, g.view.epoch, PART, &g.ticket, ch)
}

// ---------------------------------------------------------------------------------------------
// 1. Lengths are bounded before allocation
// ---------------------------------------------------------------------------------------------

#[test]
fn huge_lengths_close_only_that_connection() {
    let mut job = Job::start();
    let (h, _) = job.server_handle();
    let rh = reader_hello(&job.addr);
    // The reader's hello is good: a pull is answered.
    assert!(served(&h, &rh), "an admitted reader was not served");
    // The confirmed attack: a body length of 2^40 (the server allocated it and aborted).
    // Then a header length of 4 GiB - 1, and a body one byte over the partition size.
    for (hl, bl) in [
        (0usize, 1u64 << 40),
        (u32::MAX as usize, 0),
        (0, PART as u64 + 1),
    ] {
        let mut c = connect(&h, &rh).expect("connect");
        let hdr = pull_hdr();
        let mut p = b"BRPS".to_vec();
        let hl = if hl == 0 { hdr.len() } else { hl };
        p.extend_from_slice(&(hl as u32).to_le_bytes());
        p.extend_from_slice(&bl.to_le_bytes());
        assert!(send_raw(&mut *c, TAG_PREFIX, &p));
        // A goodbye naming the reason, then the end of the connection.
        match next(&mut *c) {
            Outcome::Answer(a) => {
                assert!(
                    a.contains(r#""t":"Bye""#) && a.contains("over the limits"),
                    "{a}"
                );
                assert!(matches!(next(&mut *c), Outcome::Closed));
            }
            o => assert!(matches!(o, Outcome::Closed), "header {hl} body {bl}: {o:?}"),
        }
        job.still_serves();
    }
    // Part lists that do not add up are protocol errors too (lengths overflow).
    let mut c = connect(&h, &rh).expect("connect");
    let s = braid::ps::shard::split(KEY, LEN * 4, 4, PART)[0].skey;
    let hdr = format!(
        r#"{{"t":"Pull","req":2,"epoch":0,"prio":0,"parts":[{{"s":{s},"k":{KEY},"p":0,"n":{}}},{{"s":{s},"k":{KEY},"p":0,"n":2}}],"min":null,"at":null}}"#,
        usize::MAX
    );
    assert!(send_frame(&mut *c, hdr.as_bytes(), 0, &[]));
    match next(&mut *c) {
        Outcome::Answer(a) => assert!(a.contains(r#""t":"Bye""#), "{a}"),
        o => assert!(matches!(o, Outcome::Closed), "{o:?}"),
    }
    job.still_serves();
}

// ---------------------------------------------------------------------------------------------
// 2. Hellos: unknown ids, readers without a ticket, replays
// ---------------------------------------------------------------------------------------------

#[test]
fn strangers_and_readers_without_a_ticket_are_refused() {
    strangers_refused(None);
}

#[test]
fn strangers_are_refused_with_a_job_token_too() {
    strangers_refused(Some(TOKEN));
}

fn strangers_refused(token: Option<&'static [u8]>) {
    let mut job = Job::start_with(token);
    let (h, _) = job.server_handle();
    let epoch = job.server.epoch();
    let garbage = [0x5au8; 32];
    // A member id nobody registered, and the old trick (an id >= 2^63 was taken as a reader).
    for id in [999_999u64, (1 << 63) + 5] {
        assert!(
            !served(&h, &|ch| hello(MEMBER, id, epoch, PART, &garbage, ch)),
            "unknown member id {id} was served"
        );
    }
    // A reader claim without the coordinator's ticket (a made-up id, and a real grant's id
    // with a wrong MAC).
    assert!(!served(&h, &|ch| hello(
        READER,
        1 << 40,
        epoch,
        PART,
        &garbage,
        ch
    )));
    let g =
        membership::fetch_reader_grant(&job.addr, GROUP, token, Duration::from_secs(5)).unwrap();
    assert!(!served(&h, &|ch| hello(
        READER,
        g.id,
        g.view.epoch,
        PART,
        &garbage,
        ch
    )));
    // The pre-hardening hello (magic and a member id, nothing else).
    let old = |_: &Challenge| {
        let mut v = b"BRPH".to_vec();
        v.extend_from_slice(&((1u64 << 63) + 9).to_le_bytes());
        v
    };
    assert!(!served(&h, &old));
    // A member hello keyed by the view key without the job token (what a stranger who learnt
    // the view nonce could compute) is refused when the job has a token.
    if token.is_some() {
        // The worker's real id and epoch, a key without the token.
        let wid = job.worker.member_id();
        assert!(!served(&h, &|ch| hello(
            MEMBER,
            wid,
            epoch,
            PART,
            &view_key(0),
            ch
        )));
    }
    // The real grant in a hello of the previous version (a build that reads JSON headers
    // only) is refused at the hello, before any message.
    assert!(!served(&h, &|ch| hello_v(
        HELLO_VERSION - 1,
        READER,
        g.id,
        g.view.epoch,
        PART,
        &g.ticket,
        ch
    )));
    // The real reader grant with its ticket is served (the checks above refuse, not all).
    assert!(served(&h, &|ch| hello(
        READER,
        g.id,
        g.view.epoch,
        PART,
        &g.ticket,
        ch
    )));
    job.still_serves();
}

/// Registers a member worker with the coordinator (it joins the group's view) and returns the
/// hello maker for it with its view, and its id.
fn join_as_worker(addr: &str) -> (membership::Client, u64, membership::View) {
    let mut reg = Registration::worker(GROUP, 2, None, Vec::new());
    reg.role = Role::Worker;
    reg.elastic = true;
    reg.heartbeat_timeout_ms = 3000;
    let copts = ClientOptions {
        token: None,
        heartbeat: Duration::from_millis(200),
        silence: Duration::from_secs(3),
    };
    let abort = AtomicBool::new(false);
    membership::rendezvous_with(
        addr,
        &reg,
        &copts,
        Instant::now() + Duration::from_secs(30),
        &abort,
    )
    .unwrap()
}

#[test]
fn a_captured_hello_cannot_be_replayed() {
    let mut job = Job::start();
    let (h, _) = job.server_handle();
    // A real member (registered worker) and a real reader: their hellos are served once...
    let (_client, me, view) = join_as_worker(&job.addr);
    let key = view_key(view.nonce);
    let captured = std::sync::Mutex::new(Vec::new());
    let mk = |ch: &Challenge| {
        let v = hello(MEMBER, me, view.epoch, PART, &key, ch);
        *captured.lock().unwrap() = v.clone();
        v
    };
    assert!(served(&h, &mk), "the registered member was not served");
    let member_hello = captured.lock().unwrap().clone();
    let rh = reader_hello(&job.addr);
    let reader_bytes = std::sync::Mutex::new(Vec::new());
    assert!(served(&h, &|ch: &Challenge| {
        let v = rh(ch);
        *reader_bytes.lock().unwrap() = v.clone();
        v
    }));
    let reader_bytes = reader_bytes.lock().unwrap().clone();
    // ... and refused when replayed on a new connection (a fresh challenge).
    assert!(
        !served(&h, &|_: &Challenge| member_hello.clone()),
        "a replayed member hello was served"
    );
    assert!(
        !served(&h, &|_: &Challenge| reader_bytes.clone()),
        "a replayed reader hello was served"
    );
    job.still_serves();
}

// ---------------------------------------------------------------------------------------------
// 3. Roles: a worker may not replicate
// ---------------------------------------------------------------------------------------------

#[test]
fn a_worker_sending_a_replication_is_refused() {
    let mut job = Job::start();
    let (_client, mut c) = job.connect_as_new_worker();
    // Admitted: its pull is answered.
    assert!(send_frame(&mut *c, &pull_hdr(), 0, &[]));
    match next(&mut *c) {
        Outcome::Answer(a) => assert!(a.contains(r#""t":"Values""#), "{a}"),
        o => panic!("the registered member's pull: {o:?}"),
    }
    // A replication of a push of 1000 to every element, as if from the real worker.
    let s = braid::ps::shard::split(KEY, LEN * 4, 4, PART)[0].skey;
    let rep = format!(
        r#"{{"t":"Replicate","seq":1,"worker":{},"op":{{"t":"Push","req":0,"op":0,"prio":0,"dtype":"float","parts":[{{"s":{s},"k":{KEY},"p":0,"n":{}}}]}}}}"#,
        job.worker.member_id(),
        LEN * 4
    );
    let body: Vec<u8> = [1000f32; LEN]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    assert!(send_frame(
        &mut *c,
        rep.as_bytes(),
        body.len() as u64,
        &body
    ));
    match next(&mut *c) {
        Outcome::Answer(a) => {
            assert!(
                a.contains(r#""t":"Bye""#) && a.contains("worker may not send a Replicate"),
                "{a}"
            );
            assert!(matches!(next(&mut *c), Outcome::Closed));
        }
        o => assert!(matches!(o, Outcome::Closed), "{o:?}"),
    }
    // Nothing was applied: the real worker's totals are exact.
    job.still_serves();
}

/// A reader (it may only read) cannot install an update rule or replace the optimizer state:
/// each closes its connection with a goodbye naming the message; nothing changes.
#[test]
fn a_reader_may_not_set_the_rule_or_the_optimizer_state() {
    let mut job = Job::start();
    let (h, _) = job.server_handle();
    let mk = reader_hello(&job.addr);
    let s = braid::ps::shard::split(KEY, LEN * 4, 4, PART)[0].skey;
    let set_rule = r#"{"t":"SetRule","req":1,"rule":"sgd:lr=1000"}"#.to_string();
    let push_state = format!(
        r#"{{"t":"PushState","req":2,"op":9,"prio":0,"dtype":"float","parts":[{{"s":{s},"k":{KEY},"p":0,"n":{}}}]}}"#,
        LEN * 4
    );
    let body: Vec<u8> = [1000f32; LEN]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    for (hdr, body, kind) in [
        (set_rule, Vec::new(), "SetRule"),
        (push_state, body, "PushState"),
    ] {
        let mut c = connect(&h, &mk).expect("connect");
        assert!(send_frame(
            &mut *c,
            hdr.as_bytes(),
            body.len() as u64,
            &body
        ));
        match next(&mut *c) {
            Outcome::Answer(a) => {
                let why = format!("reader may not send a {kind}");
                assert!(a.contains(r#""t":"Bye""#) && a.contains(&why), "{a}");
                assert!(matches!(next(&mut *c), Outcome::Closed));
            }
            o => assert!(matches!(o, Outcome::Closed), "{o:?}"),
        }
    }
    // The server still sums (no sgd with lr 1000), exactly.
    job.still_serves();
}

/// A registered worker's push naming an unknown dtype, or whose body is not what its parts
/// say, is answered with a failure naming the problem (the connection stays open) and the
/// server keeps serving (these answers once went out with the server's state lock still held,
/// which stopped the server for good).
#[test]
fn a_push_with_an_unknown_dtype_or_a_short_body_fails_and_the_server_serves_on() {
    let mut job = Job::start();
    let (_client, mut c) = job.connect_as_new_worker();
    let s = braid::ps::shard::split(KEY, LEN * 4, 4, PART)[0].skey;
    let push = |req: u32, dtype: &str| {
        format!(
            r#"{{"t":"Push","req":{req},"op":{req},"prio":0,"dtype":"{dtype}","parts":[{{"s":{s},"k":{KEY},"p":0,"n":{}}}]}}"#,
            LEN * 4
        )
    };
    let body: Vec<u8> = [1000f32; LEN]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let cases: [(String, &[u8], &str); 2] = [
        (push(1, "nope"), &body, "unknown dtype nope"),
        (
            push(2, "float"),
            &body[..8],
            "message body has 8 bytes, its parts say 64",
        ),
    ];
    for (hdr, b, why) in cases {
        assert!(send_frame(&mut *c, hdr.as_bytes(), b.len() as u64, b));
        match next(&mut *c) {
            Outcome::Answer(a) => {
                assert!(a.contains(r#""t":"Fail""#) && a.contains(why), "{a}")
            }
            o => panic!("push with {why}: {o:?}"),
        }
    }
    // The same connection is still served, and nothing was applied.
    assert!(send_frame(&mut *c, &pull_hdr(), 0, &[]));
    match next(&mut *c) {
        Outcome::Answer(a) => assert!(a.contains(r#""t":"Values""#), "{a}"),
        o => panic!("pull after the failed pushes: {o:?}"),
    }
    job.still_serves();
}

// ---------------------------------------------------------------------------------------------
// 4. A connection closed on a protocol error: the worker hears at once, naming the server
// ---------------------------------------------------------------------------------------------

#[test]
fn a_worker_whose_connection_is_refused_gets_a_prompt_error_naming_the_server() {
    let mut job = Job::start();
    let sid = job.server.member_id();
    // A worker configured with another partition size: the server closes its connection with
    // the reason; the worker's request fails with it (the timeout is 60 s).
    let addr = job.addr.clone();
    let odd = KvWorker::start(cfg(&addr, 2), opts(2 * PART)).unwrap();
    let t0 = Instant::now();
    let e = odd
        .pull::<f32>(&[KEY], &[LEN], None, 0)
        .unwrap()
        .wait()
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        !matches!(e, braid::Error::Timeout { .. }),
        "timed out instead: {msg}"
    );
    assert!(
        msg.contains(&format!("server {sid}")) && msg.contains("partition size mismatch"),
        "{msg}"
    );
    eprintln!("refused after {:?}: {msg}", t0.elapsed());
    drop(odd);
    job.still_serves();
}

// ---------------------------------------------------------------------------------------------
// 2b. A reader's grant is bound to the view: a stale one is refused, and renewed
// ---------------------------------------------------------------------------------------------

#[test]
fn a_stale_reader_grant_is_refused_and_the_reader_renews_it() {
    let mut job = Job::start();
    let (h, _) = job.server_handle();
    // A grant for the current view, and a reader that has not connected yet.
    let old = reader_hello(&job.addr);
    let mut reader = braid::ps::KvReader::connect(cfg(&job.addr, 2), opts(PART)).unwrap();
    // The view changes (a worker joins) and the server installs it.
    let before = job.server.epoch();
    let (_client, _, _) = join_as_worker(&job.addr);
    let end = Instant::now() + Duration::from_secs(20);
    while job.server.epoch() <= before {
        assert!(
            Instant::now() < end,
            "the server never installed the new view"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The old grant is refused now, a fresh one is served.
    assert!(!served(&h, &old), "a stale reader grant was served");
    assert!(served(&h, &reader_hello(&job.addr)));
    // The reader's first connection names the old view: refused; it renews its grant and reads.
    job.still_serves();
    let (v, vals) = reader.snapshot::<f32>(&[KEY], &[LEN], None).unwrap();
    assert!(v >= 1, "version {v}");
    assert_eq!(vals, vec![job.pushes; LEN]);
}

// ---------------------------------------------------------------------------------------------
// 5. A retried push that crosses a restore from a checkpoint is not applied twice
// ---------------------------------------------------------------------------------------------

/// A worker's push is applied and checkpointed, then every server is gone before the worker
/// heard the acknowledgement (it retries). A server restored from the checkpoint must
/// acknowledge the retry without applying it again (the checkpoint carries the writes its
/// values include), and still apply the worker's next push.
#[test]
fn a_retried_push_that_crosses_a_restore_is_not_applied_twice() {
    let job = Job::start();
    let Job {
        _coord,
        addr,
        server,
        mut worker,
        ..
    } = job;
    let (client, me, view) = join_as_worker(&addr);
    let client = std::sync::Arc::new(client);
    // The raw worker installs every view it is given, as a real member does (a new view waits
    // for its members' acknowledgements).
    // The last view it got is kept: its nonce keys the hello.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let latest = std::sync::Arc::new(std::sync::Mutex::new(view.clone()));
    let installer = {
        let (client, stop, latest) = (client.clone(), stop.clone(), latest.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let e = client.announced_epoch();
                if let Some((v, _)) = client.view_of(e) {
                    *latest.lock().unwrap() = v;
                    client.installed(e);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let s = braid::ps::shard::split(KEY, LEN * 4, 4, PART)[0].skey;
    // Operation ids as a worker draws them (large, random); the raw worker's own.
    const OP: u64 = 0x2bad_cafe_0000_0001;
    let push = |req: u64, op: u64| {
        format!(
            r#"{{"t":"Push","req":{req},"op":{op},"prio":0,"dtype":"float","parts":[{{"s":{s},"k":{KEY},"p":0,"n":{}}}]}}"#,
            LEN * 4
        )
    };
    let body: Vec<u8> = [10f32; LEN].iter().flat_map(|x| x.to_le_bytes()).collect();
    let send = |c: &mut Box<dyn Conn>, req: u64, op: u64| {
        assert!(send_frame(
            &mut **c,
            push(req, op).as_bytes(),
            body.len() as u64,
            &body
        ));
        match next(&mut **c) {
            Outcome::Answer(a) => {
                assert!(a.contains(r#""t":"Ack""#), "push op {op:#x}: {a}");
                a
            }
            o => panic!("push op {op:#x}: {o:?}"),
        }
    };
    let total = |w: &mut KvWorker| -> Vec<f32> {
        w.pull::<f32>(&[KEY], &[LEN], None, 0)
            .unwrap()
            .wait()
            .unwrap()
            .values
    };
    let (h, _) = {
        let v = membership::fetch_view(&addr, GROUP, None, Duration::from_secs(5)).unwrap();
        let m = v
            .members
            .iter()
            .find(|m| m.id == server.member_id())
            .unwrap();
        (tcp_handle(&m.handle), m.id)
    };
    let key = view_key(view.nonce);
    let mk = |ch: &Challenge| hello(MEMBER, me, view.epoch, PART, &key, ch);
    let mut c = connect(&h, &mk).expect("connect");
    // The job's worker pushed 1 (Job::start); the raw worker's push of 10 is applied once.
    let first = send(&mut c, 1, OP);
    assert_eq!(total(&mut worker), vec![11f32; LEN]);
    let dir = std::env::temp_dir().join(format!("braid-adv-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let info = worker.checkpoint(&dir).unwrap();
    let m = braid::ps::checkpoint::read_manifest(&dir).unwrap();
    assert!(
        m.parts.iter().any(|p| p.applied.contains(&(me, OP))),
        "the checkpoint does not record worker {me}'s op: {:?}",
        m.parts
    );
    // Every server is gone (the only one leaves: its parts are lost with it)...
    let gone = server.member_id();
    drop(c);
    drop(server);
    // ... and one restored from the checkpoint takes its place in the same job.
    let restored = KvServer::start(
        cfg(&addr, 2),
        PsOptions {
            restore: Some(dir.clone()),
            ..opts(PART)
        },
    )
    .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let now = loop {
        let v = latest.lock().unwrap().clone();
        if v.members.iter().all(|m| m.id != gone)
            && v.members.iter().any(|m| m.id == restored.member_id())
            && restored.epoch() >= v.epoch
        {
            break v;
        }
        assert!(
            Instant::now() < end,
            "the restored server never installed a view without the old one"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let m = now
        .members
        .iter()
        .find(|m| m.id == restored.member_id())
        .unwrap();
    let h = tcp_handle(&m.handle);
    let key = view_key(now.nonce);
    let mk = |ch: &Challenge| hello(MEMBER, me, now.epoch, PART, &key, ch);
    let mut c = connect(&h, &mk).expect("connect to the restored server");
    // The retry: acknowledged with the version it led to, not applied again.
    let again = send(&mut c, 2, OP);
    let version = |a: &str| {
        a.split(r#""versions":["#)
            .nth(1)
            .map(|v| v.split(']').next().unwrap_or("").to_string())
    };
    assert_eq!(version(&again), version(&first), "{first} / {again}");
    assert_eq!(
        total(&mut worker),
        vec![11f32; LEN],
        "the retried push was applied twice"
    );
    // A new operation is applied.
    send(&mut c, 3, OP + 1);
    assert_eq!(total(&mut worker), vec![21f32; LEN]);
    eprintln!(
        "checkpoint {} at version {}; retry answered {again}",
        info.id, info.version
    );
    drop(c);
    drop(worker);
    drop(restored);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    installer.join().unwrap();
    drop(client);
    let _ = std::fs::remove_dir_all(&dir);
}
