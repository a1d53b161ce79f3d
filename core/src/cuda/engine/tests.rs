//! The device engine's decision, the NCCL unique-id hand-off and the NCCL communicator's
//! lifecycle (lazy creation, rebuild at a view change, abort by the watcher, destroy at the
//! communicator's drop), with ranks as threads of this process.
//!
//! NCCL's role is played by a TEST DOUBLE (`FakeNccl`), for the id hand-off and the lifecycle
//! ONLY: it makes unique ids, records every init / abort / destroy and can report an
//! asynchronous error. No data moves through it and no real NCCL or GPU is involved; the data
//! path runs on GPU machines (perf/gpu_check).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::config::{Config, TransportKind};
use crate::membership::Coordinator;
use crate::transport::mem::MemFabric;
use crate::types::{DataType, ReduceOp};

// ---- the test double --------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Init {
    label: u64,
    token: Token,
    nranks: usize,
    rank: usize,
    id: UniqueId,
}

/// What every rank's double saw (shared by the ranks of one test).
#[derive(Default)]
struct World {
    next: AtomicUsize,
    /// (label of the instance that made it, id).
    ids: Mutex<Vec<(u64, UniqueId)>>,
    inits: Mutex<Vec<Init>>,
    /// (token, "abort" | "destroy"), in order.
    ends: Mutex<Vec<(Token, &'static str)>>,
    /// Tokens whose asynchronous error is set.
    failed: Mutex<HashSet<Token>>,
}

impl World {
    fn ends_of(&self, t: Token) -> Vec<&'static str> {
        self.ends
            .lock()
            .unwrap()
            .iter()
            .filter(|(x, _)| *x == t)
            .map(|(_, k)| *k)
            .collect()
    }
}

/// NCCL's stand-in for one rank (`label`: the member id, stable across views).
struct FakeNccl {
    world: Arc<World>,
    label: u64,
    cap: Capability,
}

impl NcclBackend for FakeNccl {
    fn capability(&self) -> Capability {
        self.cap.clone()
    }

    fn unique_id(&self) -> Result<UniqueId> {
        let n = self.world.next.fetch_add(1, Ordering::SeqCst) as u64 + 1;
        let mut id = UniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        // Distinct ids: a counter, and a pattern over all 128 bytes.
        for (i, b) in id.internal.iter_mut().enumerate() {
            *b = (i as u64 * 31 + n * 7 + self.label) as u8;
        }
        id.internal[..8].copy_from_slice(&n.to_le_bytes());
        self.world.ids.lock().unwrap().push((self.label, id));
        Ok(id)
    }

    fn init_rank(&self, nranks: usize, id: &UniqueId, rank: usize, _device: i32) -> Result<Token> {
        let token = 1000 + self.world.next.fetch_add(1, Ordering::SeqCst);
        self.world.inits.lock().unwrap().push(Init {
            label: self.label,
            token,
            nranks,
            rank,
            id: *id,
        });
        Ok(token)
    }

    fn abort(&self, c: Token) -> Result<()> {
        self.world.ends.lock().unwrap().push((c, "abort"));
        Ok(())
    }

    fn destroy(&self, c: Token) -> Result<()> {
        self.world.ends.lock().unwrap().push((c, "destroy"));
        Ok(())
    }

    fn async_error(&self, c: Token) -> Result<Option<String>> {
        Ok(self
            .world
            .failed
            .lock()
            .unwrap()
            .contains(&c)
            .then(|| "remote process exited or there was a network error".to_string()))
    }

    fn lib(&self) -> Option<&'static NcclLib> {
        None
    }
}

fn able(device: i32, pci: &str) -> Capability {
    Capability {
        nccl: Ok(22703),
        device,
        pci_bus_id: pci.into(),
    }
}

fn unable() -> Capability {
    Capability {
        nccl: Err((NO_NCCL, "NCCL not found: set BRAID_NCCL_LIBRARY".into())),
        device: 0,
        pci_bus_id: "0000:99:00.0".into(),
    }
}

fn fake(world: &Arc<World>, c: &Communicator, cap: Capability, setting: Option<Setting>) {
    c.device_slot().use_backend(
        Arc::new(FakeNccl {
            world: world.clone(),
            label: c.member_id(),
            cap,
        }),
        setting,
    );
}

// ---- harnesses ------------------------------------------------------------------------------

fn cfg(addr: &str, n: usize, r: usize) -> Config {
    Config {
        coordinator: Some(addr.to_string()),
        world_size: Some(n),
        rank: Some(r),
        timeout: Duration::from_secs(30),
        init_timeout: Duration::from_secs(30),
        ..Config::default()
    }
}

/// Runs `f(rank, comm)` on `n` in-process ranks (threads); returns what each returned.
fn with_ranks<R: Send>(n: usize, f: impl Fn(usize, &Communicator) -> R + Send + Sync) -> Vec<R> {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let fabric = MemFabric::new();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (addr, fabric, f) = (addr.clone(), fabric.clone(), &f);
                s.spawn(move || {
                    let c = Communicator::init_in_process(cfg(&addr, n, r), fabric).unwrap();
                    f(r, &c)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

fn elastic(addr: &str, n: usize) -> Config {
    Config {
        coordinator: Some(addr.to_string()),
        world_size: Some(n),
        timeout: Duration::from_secs(20),
        init_timeout: Duration::from_secs(30),
        transport: TransportKind::Tcp,
        elastic: true,
        join_window: Duration::from_millis(200),
        heartbeat: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(3),
        ..Config::default()
    }
}

/// Waits (up to a generous deadline, never asserting on time) for `f` to give `Some`.
fn wait_for<T>(what: &str, f: impl Fn() -> Option<T>) -> T {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(x) = f() {
            return x;
        }
        assert!(Instant::now() < end, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---- the decision (pure) ------------------------------------------------------------------------

fn rec(setting: Setting, cap: &Capability, host: &str) -> Record {
    Record::new(Some(setting), cap, host)
}

#[test]
fn records_survive_the_wire() {
    let r = rec(Setting::Nccl, &able(3, "00000000:1b:00.0"), "host-a");
    assert_eq!(Record::from_words(&r.to_words()).unwrap(), r);
    let long = rec(Setting::Auto, &able(1, &"x".repeat(40)), "h");
    assert_eq!(
        Record::from_words(&long.to_words()).unwrap().pci,
        "x".repeat(32)
    );
    let mut w = r.to_words();
    w[0] ^= 1;
    assert!(Record::from_words(&w).is_err());
}

#[test]
fn the_decision_follows_capabilities_gpus_and_the_setting() {
    let a = Setting::Auto;
    // Every rank able, each on its own GPU: NCCL.
    let recs = vec![
        rec(a, &able(0, "0000:1b:00.0"), "h1"),
        rec(a, &able(1, "0000:1c:00.0"), "h1"),
        rec(a, &able(0, "0000:1b:00.0"), "h2"),
    ];
    assert_eq!(
        decide(&recs).unwrap(),
        Engine::Nccl,
        "same bus id on another host is another GPU"
    );
    // One rank without NCCL: staging everywhere (auto), an error naming it (nccl).
    let recs = vec![
        rec(a, &able(0, "0000:1b:00.0"), "h1"),
        rec(a, &unable(), "h2"),
    ];
    assert_eq!(decide(&recs).unwrap(), Engine::Staging);
    let forced: Vec<Record> = recs
        .iter()
        .map(|r| Record {
            setting: Setting::Nccl.code(),
            ..r.clone()
        })
        .collect();
    let e = decide(&forced).unwrap_err();
    assert!(matches!(e, Error::InvalidUsage(_)), "{e}");
    assert!(
        e.to_string().contains(
            "BRAID_DEVICE_ENGINE=nccl, but NCCL cannot run on rank 1 (NCCL not loaded there)"
        ),
        "{e}"
    );
    // Two ranks on one GPU: staging; forced: an error naming both.
    let recs = vec![
        rec(a, &able(0, "0000:1b:00.0"), "h1"),
        rec(a, &able(0, "0000:1b:00.0"), "h1"),
    ];
    assert_eq!(decide(&recs).unwrap(), Engine::Staging);
    let forced: Vec<Record> = recs
        .iter()
        .map(|r| Record {
            setting: Setting::Nccl.code(),
            ..r.clone()
        })
        .collect();
    let e = decide(&forced).unwrap_err().to_string();
    assert!(
        e.contains("rank 0 (shares GPU 0000:1b:00.0 with rank 1"),
        "{e}"
    );
    assert!(
        e.contains("rank 1 (shares GPU 0000:1b:00.0 with rank 0"),
        "{e}"
    );
    // Different NCCL versions: staging.
    let mut old = able(1, "0000:1c:00.0");
    old.nccl = Ok(21903);
    let recs = vec![rec(a, &able(0, "0000:1b:00.0"), "h1"), rec(a, &old, "h1")];
    assert_eq!(decide(&recs).unwrap(), Engine::Staging);
    // staging forced: staging even where NCCL could run.
    let recs = vec![
        rec(Setting::Staging, &able(0, "0000:1b:00.0"), "h1"),
        rec(Setting::Staging, &able(1, "0000:1c:00.0"), "h1"),
    ];
    assert_eq!(decide(&recs).unwrap(), Engine::Staging);
    // Settings must match; an unparsable one is named.
    let recs = vec![
        rec(a, &able(0, "0000:1b:00.0"), "h1"),
        rec(Setting::Staging, &able(1, "0000:1c:00.0"), "h1"),
    ];
    let e = decide(&recs).unwrap_err().to_string();
    assert!(
        e.contains("BRAID_DEVICE_ENGINE differs between ranks (rank 0: auto, rank 1: staging)"),
        "{e}"
    );
    let bad = Record::new(None, &able(1, "0000:1c:00.0"), "h1");
    let e = decide(&[rec(a, &able(0, "x"), "h1"), bad]).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(
        e.to_string().contains("BRAID_DEVICE_ENGINE on rank 1"),
        "{e}"
    );
}

#[test]
fn settings_parse() {
    assert_eq!(Setting::parse(None).unwrap(), Setting::Auto);
    assert_eq!(Setting::parse(Some(" NCCL ")).unwrap(), Setting::Nccl);
    assert_eq!(Setting::parse(Some("staging")).unwrap(), Setting::Staging);
    assert!(Setting::parse(Some("gloo"))
        .unwrap_err()
        .to_string()
        .contains("BRAID_DEVICE_ENGINE=\"gloo\""));
}

// ---- argument checks and routing (pure) ---------------------------------------------------------

fn rc(kind: CollKind, dtype: DataType, op: ReduceOp, count: usize, root: usize) -> RawColl {
    RawColl {
        kind,
        dtype,
        op,
        count,
        root,
    }
}

#[test]
fn arguments_are_checked_with_the_host_apis_messages() {
    let ar = rc(CollKind::AllReduce, DataType::F32, ReduceOp::Sum, 10, 0);
    assert_eq!(check_coll(0, 4, &ar, 0x1000, 0x2000).unwrap(), (40, 40));
    let ag = rc(CollKind::AllGather, DataType::F32, ReduceOp::Sum, 10, 0);
    assert_eq!(check_coll(1, 4, &ag, 0x1000, 0x2000).unwrap(), (40, 160));
    let e = check_coll(0, 4, &ar, 0, 0x2000).unwrap_err().to_string();
    assert_eq!(e, "invalid argument: all_reduce: NULL buffer for 40 bytes");
    // Zero length: NULL is fine; a non-root's broadcast send buffer is not significant.
    let z = rc(CollKind::AllReduce, DataType::F32, ReduceOp::Sum, 0, 0);
    assert!(check_coll(0, 4, &z, 0, 0).is_ok());
    let b = rc(CollKind::Broadcast, DataType::U8, ReduceOp::Sum, 8, 0);
    assert!(check_coll(1, 4, &b, 0, 0x2000).is_ok());
    assert!(check_coll(0, 4, &b, 0, 0x2000).is_err());
    let r = rc(CollKind::Reduce, DataType::F32, ReduceOp::Sum, 8, 4);
    assert_eq!(
        check_coll(0, 4, &r, 1, 1).unwrap_err().to_string(),
        "invalid argument: root 4 is not a rank of this communicator of 4 ranks"
    );
    let big = rc(
        CollKind::AllToAll,
        DataType::F64,
        ReduceOp::Sum,
        usize::MAX / 16,
        0,
    );
    assert_eq!(
        check_coll(0, 4, &big, 1, 1).unwrap_err().to_string(),
        "invalid argument: count overflows"
    );
    let bw = rc(CollKind::AllReduce, DataType::F32, ReduceOp::Bxor, 8, 0);
    let e = check_coll(0, 4, &bw, 1, 1).unwrap_err().to_string();
    assert!(
        e.starts_with("invalid argument: all_reduce: reduction operator bxor"),
        "{e}"
    );
    assert!(check_coll(
        0,
        4,
        &rc(CollKind::P2p, DataType::U8, ReduceOp::Sum, 1, 0),
        1,
        1
    )
    .is_err());
    let op = |send, buf, peer| DeviceP2p {
        send,
        buf,
        count: 4,
        dtype: DataType::I32,
        peer,
        tag: 0,
    };
    assert!(check_p2p(0, 3, &[op(true, 1, 1), op(false, 2, 2)], false).is_ok());
    assert_eq!(
        check_p2p(0, 3, &[op(true, 1, 0)], false)
            .unwrap_err()
            .to_string(),
        "invalid argument: peer 0 is not another rank of this communicator (rank 0 of 3)"
    );
    assert_eq!(
        check_p2p(0, 3, &[op(true, 1, 3)], false)
            .unwrap_err()
            .to_string(),
        "invalid argument: peer 3 is not another rank of this communicator (rank 0 of 3)"
    );
    assert!(check_p2p(0, 3, &[op(true, 1, 0), op(false, 2, 0)], true).is_ok());
    assert_eq!(
        check_p2p(0, 3, &[op(false, 0, 1)], false)
            .unwrap_err()
            .to_string(),
        "invalid argument: send/recv: NULL buffer"
    );
}

#[test]
fn nccl_runs_what_it_has_and_staging_the_rest() {
    let v = 22703;
    assert!(nccl_can(
        &rc(CollKind::AllReduce, DataType::F32, ReduceOp::Sum, 1, 0),
        v
    ));
    assert!(nccl_can(
        &rc(CollKind::AllReduce, DataType::BF16, ReduceOp::Avg, 1, 0),
        v
    ));
    assert!(!nccl_can(
        &rc(CollKind::AllReduce, DataType::BF16, ReduceOp::Sum, 1, 0),
        2909
    ));
    assert!(!nccl_can(
        &rc(CollKind::AllReduce, DataType::F32, ReduceOp::Avg, 1, 0),
        2909
    ));
    assert!(!nccl_can(
        &rc(CollKind::ReduceScatter, DataType::I16, ReduceOp::Sum, 1, 0),
        v
    ));
    assert!(!nccl_can(
        &rc(CollKind::Reduce, DataType::I32, ReduceOp::Band, 1, 0),
        v
    ));
    // Data movement of any type: bytes.
    for k in [
        CollKind::AllGather,
        CollKind::Broadcast,
        CollKind::AllToAll,
        CollKind::Gather,
        CollKind::Scatter,
        CollKind::Barrier,
    ] {
        assert!(
            nccl_can(&rc(k, DataType::I16, ReduceOp::Bxor, 1, 0), v),
            "{k:?}"
        );
    }
}

// ---- the id hand-off and the lifecycle over communicators ---------------------------------------

#[test]
fn every_rank_gets_the_same_id_and_its_own_rank_and_drop_destroys() {
    let world = Arc::new(World::default());
    let labels = with_ranks(3, |r, c| {
        fake(
            &world,
            c,
            able(r as i32, &format!("0000:{:02x}:00.0", 0x1b + r)),
            None,
        );
        assert_eq!(c.device_slot().prepare(c).unwrap(), Engine::Nccl);
        // A second call on the same view reuses the communicator.
        assert_eq!(c.device_slot().prepare(c).unwrap(), Engine::Nccl);
        assert!(c.device_error().is_none());
        c.barrier().unwrap();
        (r, c.member_id())
    });
    let ids = world.ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 1, "one ncclGetUniqueId, by rank 0");
    assert_eq!(ids[0].0, labels[0].1);
    let inits = world.inits.lock().unwrap().clone();
    assert_eq!(inits.len(), 3);
    let by_label: HashMap<u64, &Init> = inits.iter().map(|i| (i.label, i)).collect();
    for (r, label) in &labels {
        let i = by_label[label];
        assert_eq!((i.rank, i.nranks), (*r, 3));
        assert_eq!(i.id, ids[0].1, "rank {r} got rank 0's id");
    }
    // The communicators' drop destroyed each NCCL communicator once.
    for i in &inits {
        assert_eq!(world.ends_of(i.token), vec!["destroy"]);
    }
}

#[test]
fn one_rank_without_nccl_makes_every_rank_stage() {
    let world = Arc::new(World::default());
    with_ranks(3, |r, c| {
        let cap = if r == 1 {
            unable()
        } else {
            able(r as i32, &format!("0000:{:02x}:00.0", 0x1b + r))
        };
        fake(&world, c, cap, Some(Setting::Auto));
        assert_eq!(c.device_slot().prepare(c).unwrap(), Engine::Staging);
    });
    assert!(world.ids.lock().unwrap().is_empty());
    assert!(world.inits.lock().unwrap().is_empty());
}

#[test]
fn two_ranks_on_one_gpu_stage() {
    let world = Arc::new(World::default());
    with_ranks(2, |_, c| {
        // In-process ranks share a host id: one GPU for both.
        fake(&world, c, able(0, "0000:1b:00.0"), None);
        assert_eq!(c.device_slot().prepare(c).unwrap(), Engine::Staging);
    });
    assert!(world.inits.lock().unwrap().is_empty());
}

#[test]
fn forced_nccl_that_cannot_run_names_the_rank_on_every_rank() {
    let world = Arc::new(World::default());
    let errs = with_ranks(3, |r, c| {
        let cap = if r == 2 {
            unable()
        } else {
            able(r as i32, &format!("0000:{:02x}:00.0", 0x1b + r))
        };
        fake(&world, c, cap, Some(Setting::Nccl));
        c.device_slot().prepare(c).unwrap_err().to_string()
    });
    for (r, e) in errs.iter().enumerate() {
        assert!(
            e.contains(
                "BRAID_DEVICE_ENGINE=nccl, but NCCL cannot run on rank 2 (NCCL not loaded there)"
            ),
            "rank {r}: {e}"
        );
    }
    assert!(
        errs[2].contains("on this rank (2): NCCL not found: set BRAID_NCCL_LIBRARY"),
        "{}",
        errs[2]
    );
    assert!(world.inits.lock().unwrap().is_empty());
}

#[test]
fn different_engine_settings_are_an_error_on_every_rank() {
    let world = Arc::new(World::default());
    let errs = with_ranks(2, |r, c| {
        let s = if r == 0 {
            Setting::Auto
        } else {
            Setting::Staging
        };
        fake(
            &world,
            c,
            able(r as i32, &format!("0000:{:02x}:00.0", 0x1b + r)),
            Some(s),
        );
        c.device_slot().prepare(c).unwrap_err().to_string()
    });
    for e in errs {
        assert!(e.contains("(rank 0: auto, rank 1: staging)"), "{e}");
    }
}

#[test]
fn nccls_async_error_makes_the_watcher_abort_once_and_is_sticky() {
    let world = Arc::new(World::default());
    with_ranks(2, |r, c| {
        fake(
            &world,
            c,
            able(r as i32, &format!("0000:{:02x}:00.0", 0x1b + r)),
            None,
        );
        assert_eq!(c.device_slot().prepare(c).unwrap(), Engine::Nccl);
        c.barrier().unwrap();
        if r == 1 {
            let token = world
                .inits
                .lock()
                .unwrap()
                .iter()
                .find(|i| i.label == c.member_id())
                .map(|i| i.token)
                .unwrap();
            world.failed.lock().unwrap().insert(token);
            let e = wait_for("the async error", || c.device_error());
            assert!(
                e.to_string().contains(
                    "NCCL communicator failed: remote process exited or there was a network error"
                ),
                "{e}"
            );
            wait_for("the abort", || {
                (world.ends_of(token) == vec!["abort"]).then_some(())
            });
            // Sticky: still there, and a later call on the same view reports it.
            assert_eq!(c.device_error(), Some(e));
        }
        c.barrier().unwrap();
    });
    // Dropping the communicators ended each NCCL communicator exactly once: the failed one by
    // the watcher's abort, the other by destroy.
    for i in world.inits.lock().unwrap().iter() {
        let ends = world.ends_of(i.token);
        assert_eq!(ends.len(), 1, "{ends:?}");
    }
}

#[test]
fn aborting_the_communicator_aborts_nccl() {
    let world = Arc::new(World::default());
    with_ranks(1, |_, c| {
        fake(&world, c, able(0, "0000:1b:00.0"), None);
        assert_eq!(c.device_slot().prepare(c).unwrap(), Engine::Nccl);
        let token = world.inits.lock().unwrap()[0].token;
        c.abort();
        let e = wait_for("the device error", || c.device_error());
        assert_eq!(e, Error::Aborted);
        wait_for("the abort", || {
            (world.ends_of(token) == vec!["abort"]).then_some(())
        });
    });
    let token = world.inits.lock().unwrap()[0].token;
    assert_eq!(world.ends_of(token), vec!["abort"], "ended once");
}

#[test]
fn a_view_change_rebuilds_with_a_new_id_and_ends_the_old_communicator_once() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let world = Arc::new(World::default());
    let started = Arc::new(Barrier::new(3));
    let pci = |id: u64| format!("0000:{:02x}:00.0", id % 200);
    std::thread::scope(|s| {
        let mut hs = Vec::new();
        for i in 0..2 {
            let (addr, world, started) = (addr.clone(), world.clone(), started.clone());
            hs.push(s.spawn(move || {
                let mut c = Communicator::init_with(Config {
                    rank: Some(i),
                    ..elastic(&addr, 2)
                })
                .unwrap();
                let id = c.member_id();
                fake(&world, &c, able(i as i32, &pci(id)), None);
                assert_eq!(c.device_slot().prepare(&c).unwrap(), Engine::Nccl);
                started.wait();
                while c.size() < 3 {
                    if !c.update().unwrap() {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                assert_eq!(c.device_slot().prepare(&c).unwrap(), Engine::Nccl);
                c.barrier().unwrap();
            }));
        }
        started.wait();
        let (addr, world) = (addr.clone(), world.clone());
        hs.push(s.spawn(move || {
            let c = Communicator::init_with(elastic(&addr, 2)).unwrap();
            assert_eq!(c.size(), 3);
            fake(&world, &c, able(2, &pci(c.member_id())), None);
            assert_eq!(c.device_slot().prepare(&c).unwrap(), Engine::Nccl);
            c.barrier().unwrap();
        }));
        for h in hs {
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        }
    });
    let ids = world.ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 2, "one id per view");
    assert_ne!(ids[0].1, ids[1].1, "a new id for the new view");
    let inits = world.inits.lock().unwrap().clone();
    assert_eq!(inits.len(), 5, "{inits:?}");
    let (old, new): (Vec<&Init>, Vec<&Init>) = inits.iter().partition(|i| i.nranks == 2);
    assert_eq!((old.len(), new.len()), (2, 3));
    for i in &old {
        assert_eq!(i.id, ids[0].1);
    }
    let mut ranks: Vec<usize> = new.iter().map(|i| i.rank).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, vec![0, 1, 2]);
    for i in &new {
        assert_eq!(i.id, ids[1].1);
    }
    // Every NCCL communicator ended exactly once; the old view's (healthy) were destroyed.
    for i in &inits {
        assert_eq!(world.ends_of(i.token), vec!["destroy"], "{i:?}");
    }
    // The old ones ended before the new ones were made: their ends come first.
    let ends = world.ends.lock().unwrap().clone();
    let first_two: HashSet<Token> = ends[..2].iter().map(|(t, _)| *t).collect();
    assert_eq!(first_two, old.iter().map(|i| i.token).collect());
}

/// Where the killed rank's process finds the coordinator: a file named after its parent.
fn kill_rendezvous(parent: u32) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("braid-engine-kill-{parent}.addr"))
}

/// The rank that is killed (a child process of
/// `a_killed_rank_makes_the_watcher_abort_nccl_and_the_error_names_it`): joins as rank 2,
/// sets its engine up, and waits to be killed. Run alone it does nothing.
#[test]
#[ignore = "a child process of the kill test"]
fn kill_test_child_rank() {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() } as u32;
    let Ok(addr) = std::fs::read_to_string(kill_rendezvous(parent)) else {
        return;
    };
    let world = Arc::new(World::default());
    let c = Communicator::init_with(Config {
        rank: Some(2),
        ..elastic(addr.trim(), 3)
    })
    .unwrap();
    fake(&world, &c, able(2, "0000:1d:00.0"), None);
    assert_eq!(c.device_slot().prepare(&c).unwrap(), Engine::Nccl);
    // Killed here (bounded, should the parent die first).
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn a_killed_rank_makes_the_watcher_abort_nccl_and_the_error_names_it() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let file = kill_rendezvous(std::process::id());
    std::fs::write(&file, &addr).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "cuda::engine::tests::kill_test_child_rank",
            "--exact",
            "--ignored",
            "--test-threads=1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let world = Arc::new(World::default());
    let ready = Arc::new(Barrier::new(3));
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|i| {
                let (addr, world, ready) = (addr.clone(), world.clone(), ready.clone());
                s.spawn(move || {
                    let c = Communicator::init_with(Config {
                        rank: Some(i),
                        ..elastic(&addr, 3)
                    })
                    .unwrap();
                    fake(
                        &world,
                        &c,
                        able(i as i32, &format!("0000:{:02x}:00.0", 0x1b + i)),
                        None,
                    );
                    // Collective with the child: it has set its engine up too.
                    assert_eq!(c.device_slot().prepare(&c).unwrap(), Engine::Nccl);
                    assert!(c.device_error().is_none());
                    ready.wait();
                    let e = wait_for("the device error", || c.device_error());
                    match &e {
                        Error::PeerLost { rank, .. } => assert_eq!(*rank, 2, "{e}"),
                        e => panic!("rank {i}: expected the loss of rank 2, got {e}"),
                    }
                    let token = world
                        .inits
                        .lock()
                        .unwrap()
                        .iter()
                        .find(|x| x.label == c.member_id())
                        .map(|x| x.token)
                        .unwrap();
                    wait_for("the abort", || {
                        (world.ends_of(token) == vec!["abort"]).then_some(())
                    });
                })
            })
            .collect();
        ready.wait();
        // kill -9 of rank 2.
        child.kill().unwrap();
        child.wait().unwrap();
        for h in hs {
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        }
    });
    std::fs::remove_file(&file).ok();
    // Exactly once each, by the watchers' abort (the drops found them ended).
    let inits = world.inits.lock().unwrap().clone();
    assert_eq!(inits.len(), 2);
    for i in &inits {
        assert_eq!(world.ends_of(i.token), vec!["abort"], "{i:?}");
    }
}

// ---- without a driver -------------------------------------------------------------------------

#[test]
fn without_a_driver_device_calls_give_the_drivers_error_first() {
    if driver::driver().is_ok() {
        return; // a machine with a GPU driver: covered by perf/gpu_check
    }
    with_ranks(1, |_, c| {
        let ar = rc(CollKind::AllReduce, DataType::F32, ReduceOp::Sum, 4, 0);
        // Even with invalid arguments (NULL buffers, bad root): the driver's error first.
        let bad = rc(CollKind::Reduce, DataType::F32, ReduceOp::Bxor, 4, 9);
        for (c_, send, recv) in [(ar, 0x1000, 0x2000), (bad, 0, 0)] {
            // SAFETY: nothing is dereferenced: the call fails before touching the buffers.
            let e = unsafe { c.coll_device_raw(c_, send, recv, Stream::DEFAULT) }.unwrap_err();
            assert!(
                e.to_string()
                    .contains("no CUDA driver (libcuda.so.1 not found)"),
                "{e}"
            );
        }
        let op = DeviceP2p {
            send: true,
            buf: 0,
            count: 1,
            dtype: DataType::U8,
            peer: 5,
            tag: 0,
        };
        // SAFETY: as above.
        let e = unsafe { c.p2p_device_raw(&[op], Stream::DEFAULT) }.unwrap_err();
        assert!(e.to_string().contains("no CUDA driver"), "{e}");
        assert!(c.device_error().is_none());
        // The host communicator is untouched.
        let mut x = [1u32];
        c.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap();
        assert_eq!(x[0], 1);
    });
}
