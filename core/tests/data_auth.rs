//! Collective data connections are authenticated per connection: the acceptor sends a fresh
//! challenge, and the connector's hello answers it with a MAC keyed by the view (and the job
//! token when set). A hello captured on one connection and replayed on another, or a hello
//! claiming a rank with a wrong MAC, is refused (with a log line naming the reason), even when
//! it arrives before the real member's connection; the real member connects and the
//! collective completes.
//!
//! Run: `cargo test -p braid --test data_auth`. Ranks are threads of this process over real
//! TCP sockets and a real coordinator; rank 0 connects through [`Tap`], a tcp transport that,
//! for every connection it makes, first opens a second connection carrying a forged hello (the
//! real hello replayed, or a hello with its MAC altered) and lets the acceptor see it first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use braid::config::Secret;
use braid::membership::{Coordinator, CoordinatorOptions};
use braid::transport::tcp::{TcpOptions, TcpTransport};
use braid::transport::{
    Challenge, Conn, ConnectHandle, DeviceProps, HelloFn, Listener, NetResult, Transport,
};
use braid::{Communicator, Config, ReduceOp};

/// What [`Tap`] sends on its extra connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Forgery {
    /// The hello just built for the real connection (a capture), on another connection.
    Replay,
    /// A hello that answers its own connection's challenge but with one byte of its view MAC
    /// changed: with a job token, a holder of the token that does not know the view (another
    /// job's process); without one, a stranger guessing.
    WrongMac,
}

/// A tcp transport that sends a forged hello on an extra connection before each real one.
struct Tap {
    inner: TcpTransport,
    forgery: Forgery,
    /// The forged connections (kept open: the victim must close them).
    held: Mutex<Vec<Box<dyn Conn>>>,
}

impl Transport for Tap {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn devices(&self) -> NetResult<Vec<DeviceProps>> {
        self.inner.devices()
    }

    fn listen(&self, dev: usize) -> NetResult<(Box<dyn Listener>, ConnectHandle)> {
        self.inner.listen(dev)
    }

    fn connect_challenged(
        &self,
        handle: &ConnectHandle,
        hello: HelloFn<'_>,
        deadline: Instant,
    ) -> NetResult<Box<dyn Conn>> {
        self.inner.connect_challenged(
            handle,
            &|c: &Challenge| {
                let real = hello(c);
                let forged = |c2: &Challenge| match self.forgery {
                    Forgery::Replay => real.clone(),
                    Forgery::WrongMac => {
                        // A hello for this connection's own challenge, its view MAC altered
                        // (byte 40 lies in it, after the 32 bytes of fields).
                        let mut f = hello(c2);
                        let i = 40.min(f.len() - 1);
                        f[i] ^= 0x01;
                        f
                    }
                };
                self.forge_first(handle, &forged, deadline);
                real
            },
            deadline,
        )
    }
}

impl Tap {
    /// Opens the forged connection (kept open) and gives the acceptor time to take it before
    /// the real one (so that a listener that trusted the first hello for a rank would give it
    /// the rank).
    fn forge_first(&self, handle: &ConnectHandle, forged: HelloFn<'_>, deadline: Instant) {
        match self.inner.connect_challenged(handle, forged, deadline) {
            Ok(c2) => self.held.lock().unwrap().push(c2),
            Err(e) => panic!("the forged connection could not be made: {e}"),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Log lines of every braid thread of this process (warn and above).
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    static INIT: OnceLock<()> = OnceLock::new();
    let l = LOGS.get_or_init(|| Mutex::new(Vec::new()));
    INIT.get_or_init(|| {
        struct W;
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                logs().lock().unwrap().extend_from_slice(b);
                std::io::stderr().write_all(b)?;
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(|| W)
            .try_init();
    });
    l
}

/// The scenarios share the log buffer: they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Three ranks (threads) over tcp; rank 0 connects through a [`Tap`] with `forgery`. Checks
/// that the all-reduce is right on every rank, that every forged connection was closed by its
/// victim, and that the refusals were logged with `reason`.
fn run(forgery: Forgery, token: Option<&[u8]>, reasons: &[&str]) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    logs().lock().unwrap().clear();
    let coord = Coordinator::bind_with(
        "127.0.0.1:0",
        CoordinatorOptions {
            job_token: token.map(|t| t.to_vec()),
            ..CoordinatorOptions::default()
        },
    )
    .unwrap();
    let addr = coord.local_addr().to_string();
    let n = 3;
    let tap = Arc::new(Tap {
        inner: TcpTransport::new(TcpOptions::default()).unwrap(),
        forgery,
        held: Mutex::new(Vec::new()),
    });
    std::thread::scope(|s| {
        for r in 0..n {
            let cfg = Config {
                coordinator: Some(addr.clone()),
                world_size: Some(n),
                rank: Some(r),
                timeout: Duration::from_secs(10),
                init_timeout: Duration::from_secs(20),
                transport: braid::config::TransportKind::Tcp,
                job_token: token.map(|t| Secret(t.to_vec())),
                ..Config::default()
            };
            let t: Arc<dyn Transport> = if r == 0 {
                tap.clone()
            } else {
                Arc::new(TcpTransport::new(TcpOptions::default()).unwrap())
            };
            s.spawn(move || {
                let c = Communicator::init_with_transports(cfg, vec![t]).unwrap();
                assert_eq!(c.rank(), r);
                let mut x = vec![c.member_id() as f64; 1000];
                c.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap();
                let want: f64 = c.view().members.iter().map(|m| m.id as f64).sum();
                assert!(x.iter().all(|v| *v == want), "rank {r}: {} != {want}", x[0]);
            });
        }
    });
    // Rank 0 connected to ranks 1 and 2, each time with a forged connection first.
    let mut held = std::mem::take(&mut *tap.held.lock().unwrap());
    assert_eq!(held.len(), 2);
    let end = Instant::now() + Duration::from_secs(10);
    for c in held.iter_mut() {
        while c.progress().is_ok() {
            assert!(
                Instant::now() < end,
                "a forged connection was not closed by the rank it claimed to reach"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    let refusals = text
        .lines()
        .filter(|l| l.contains("data connection") && reasons.iter().any(|r| l.contains(r)))
        .count();
    assert!(
        refusals >= 2,
        "the refusals were not logged with one of {reasons:?}:\n{text}"
    );
}

#[test]
fn replayed_hello_is_refused_without_token() {
    // Named "replayed" when the stash has seen the original hello first, else "wrong MAC"
    // (the listener's check ran first): both are the refusal of the replay.
    run(Forgery::Replay, None, &["wrong MAC", "replayed"]);
}

#[test]
fn replayed_hello_is_refused_with_token() {
    run(Forgery::Replay, Some(b"s3cret"), &["wrong job-token MAC"]);
}

#[test]
fn wrong_mac_is_refused_without_token() {
    run(Forgery::WrongMac, None, &["wrong MAC"]);
}

#[test]
fn wrong_mac_is_refused_with_token() {
    run(Forgery::WrongMac, Some(b"s3cret"), &["wrong MAC"]);
}
