//! Server-side update rules installed at run time ([`KvWorker::set_rule`]): MXNet's SGD with
//! momentum, weight decay, rescale and clipping, the momentum kept by the replicas when a
//! server goes away, the optimizer state read and replaced, a server that joins later, and a
//! server with a callback rule refusing the change. Servers and workers are threads of this
//! process over real TCP and a real coordinator, except in the kill -9 test, whose servers are
//! processes (this test binary re-run as `child_server`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use braid::membership::Coordinator;
use braid::ps::{Consistency, KvServer, KvWorker, PsOptions, UpdateRule};
use braid::Config;

fn cfg(addr: &str, n: usize) -> Config {
    Config {
        coordinator: Some(addr.to_string()),
        world_size: Some(n),
        group: "ps".into(),
        timeout: Duration::from_secs(30),
        init_timeout: Duration::from_secs(30),
        transport: braid::config::TransportKind::Tcp,
        heartbeat: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(3),
        join_window: Duration::from_millis(100),
        ..Config::default()
    }
}

/// The rule the tests install, and its parameters as f32 (what the servers compute f32 keys
/// with).
const RULE: &str = "sgd:lr=0.1,momentum=0.9,wd=0.01,rescale=0.5,clip=2.5";
const LR: f32 = 0.1;
const MOM: f32 = 0.9;
const WD: f32 = 0.01;
const RESCALE: f32 = 0.5;
const CLIP: f32 = 2.5;

/// MXNet's sgd_mom_update on one f32 element, in the order its kernel computes.
fn mx(w: f32, g: f32, m: &mut f32) -> f32 {
    let g = (RESCALE * g).clamp(-CLIP, CLIP);
    *m = MOM * *m - LR * WD * w - LR * g;
    w + *m
}

/// Worker `w`'s gradient in round `r` (element `i`); some are large enough to be clipped.
fn grad(w: usize, r: usize, i: usize) -> f32 {
    let x = ((i * 7 + r * 3 + w * 5) % 17) as f32 - 8.0;
    x * 0.75
}

const N: usize = 40; // 160 bytes: 3 parts of at most 64 bytes, spread over the servers

#[test]
fn sgd_momentum_set_at_run_time_sync_two_workers_and_a_server_leaving() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions {
        partition_bytes: 64,
        replicas: 1,
        ..PsOptions::default() // sync, Sum: the rule comes at run time
    };
    let keys = [3u64, 4];
    let lens = [N, 1];
    let total = N + 1;
    let w0: Vec<f32> = (0..total).map(|i| i as f32 * 0.25 - 3.0).collect();
    const ROUNDS: usize = 8;
    const LEAVE_AFTER: usize = 4;
    // The expected weights and momentum after each round.
    let mut expect = Vec::new();
    {
        let (mut w, mut m) = (w0.clone(), vec![0f32; total]);
        for r in 0..ROUNDS {
            for i in 0..total {
                let g = grad(0, r, i) + grad(1, r, i);
                w[i] = mx(w[i], g, &mut m[i]);
            }
            expect.push((w.clone(), m.clone()));
        }
    }
    std::thread::scope(|s| {
        let mut servers: Vec<_> = (0..2)
            .map(|_| {
                let (addr, opts) = (addr.clone(), opts.clone());
                s.spawn(move || KvServer::start(cfg(&addr, 4), opts).unwrap())
            })
            .collect();
        let (to_main, from_workers) = std::sync::mpsc::channel::<usize>();
        let mut gates = Vec::new();
        let mut workers = Vec::new();
        for w in 0..2 {
            let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
            gates.push(gate_tx);
            let (addr, opts, w0, expect, to_main) = (
                addr.clone(),
                opts.clone(),
                w0.clone(),
                expect.clone(),
                to_main.clone(),
            );
            workers.push(s.spawn(move || {
                let kv = KvWorker::start(cfg(&addr, 4), opts).unwrap();
                kv.init(&keys, &lens, &w0).unwrap();
                // MXNet's Trainer calls set_optimizer on every worker: idempotent.
                kv.set_rule(&UpdateRule::parse(RULE).unwrap()).unwrap();
                for (r, (want_w, want_m)) in expect.iter().enumerate() {
                    if r == LEAVE_AFTER {
                        to_main.send(w).unwrap();
                        gate_rx.recv().unwrap();
                    }
                    let g: Vec<f32> = (0..total).map(|i| grad(w, r, i)).collect();
                    let mut out = vec![0f32; total];
                    let v = kv.push_pull_into(&keys, &lens, &g, &mut out, 0).unwrap();
                    assert_eq!(v, r as u64 + 1);
                    assert_eq!(&out, want_w, "worker {w}, round {r}: weights");
                    let mut st = vec![1f32; total];
                    kv.pull_state_into(&keys, &lens, &mut st).unwrap();
                    assert_eq!(&st, want_m, "worker {w}, round {r}: momentum");
                }
                kv
            }));
        }
        // Both workers finished round LEAVE_AFTER - 1: a server leaves; its replica owns its
        // parts, with the momentum it kept by applying every replicated push with the rule
        // its owner used.
        for _ in 0..2 {
            from_workers.recv_timeout(Duration::from_secs(60)).unwrap();
        }
        let leaver = servers.remove(1).join().unwrap();
        assert!(leaver.parts_held() > 0);
        drop(leaver);
        for g in &gates {
            g.send(()).unwrap();
        }
        let stay = servers.remove(0).join().unwrap();
        let ws: Vec<KvWorker> = workers.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(stay.sizes(), (2, 1));
        // Replaced state: the next round starts from it.
        let m1 = vec![0.5f32; total];
        ws[0].push_state(&keys, &lens, &m1).unwrap();
        let mut st = vec![0f32; total];
        ws[1].pull_state_into(&keys, &lens, &mut st).unwrap();
        assert_eq!(st, m1);
        // Plain SGD now (lr only): the momentum stays on the servers, unused.
        for kv in &ws {
            kv.set_rule(&UpdateRule::parse("sgd:lr=0.5").unwrap())
                .unwrap();
        }
        let want: Vec<f32> = expect[ROUNDS - 1].0.iter().map(|w| w - 0.5 * 2.0).collect();
        std::thread::scope(|s2| {
            let hs: Vec<_> = ws
                .iter()
                .map(|kv| {
                    s2.spawn(move || {
                        let g = vec![1f32; total];
                        let mut out = vec![0f32; total];
                        kv.push_pull_into(&keys, &lens, &g, &mut out, 0).unwrap();
                        out
                    })
                })
                .collect();
            for h in hs {
                assert_eq!(h.join().unwrap(), want);
            }
        });
        ws[0].pull_state_into(&keys, &lens, &mut st).unwrap();
        assert_eq!(st, m1);
        drop(ws);
        drop(stay);
    });
}

/// A server that joins after the rule was set gets it from the worker before anything else
/// the worker sends it: the parts it takes over are updated with the rule, not BRAID_PS_RULE.
#[test]
fn a_server_that_joins_later_gets_the_rule() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions {
        consistency: Consistency::Async,
        ..PsOptions::default()
    };
    let keys: Vec<u64> = (0..300).collect();
    let lens = vec![2usize; 300];
    let first = {
        let (addr, opts) = (addr.clone(), opts.clone());
        std::thread::spawn(move || KvServer::start(cfg(&addr, 2), opts).unwrap())
    };
    let kv = KvWorker::start(cfg(&addr, 2), opts.clone()).unwrap();
    let first = first.join().unwrap();
    let vals: Vec<f32> = (0..600).map(|i| i as f32).collect();
    kv.init(&keys, &lens, &vals).unwrap();
    kv.set_rule(&UpdateRule::parse("sgd:lr=0.5").unwrap())
        .unwrap();
    kv.push(&keys, &lens, &vec![1f32; 600], 0)
        .unwrap()
        .wait()
        .unwrap();
    let joiner = KvServer::start(cfg(&addr, 2), opts.clone()).unwrap();
    let t0 = Instant::now();
    while kv.sizes().0 < 2 || joiner.parts_held() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the joiner got nothing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    kv.push(&keys, &lens, &vec![1f32; 600], 0)
        .unwrap()
        .wait()
        .unwrap();
    let p = kv
        .pull::<f32>(&keys, &lens, None, 0)
        .unwrap()
        .wait()
        .unwrap();
    for (i, v) in p.values.iter().enumerate() {
        assert_eq!(*v, i as f32 - 1.0, "element {i}");
    }
    drop(kv);
    drop(joiner);
    drop(first);
}

/// A server running a callback rule refuses a rule change, naming itself; a custom rule cannot
/// be sent at all.
#[test]
fn a_callback_server_refuses_a_new_rule() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions::default();
    let custom = UpdateRule::Custom(std::sync::Arc::new(|_, _, _: &mut [u8], _: &[u8]| Ok(())));
    let server = {
        let (addr, mut opts) = (addr.clone(), opts.clone());
        opts.rule = custom.clone();
        std::thread::spawn(move || KvServer::start(cfg(&addr, 2), opts).unwrap())
    };
    let kv = KvWorker::start(cfg(&addr, 2), opts).unwrap();
    let server = server.join().unwrap();
    let e = kv
        .set_rule(&UpdateRule::parse("sgd:lr=0.1,momentum=0.9").unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("custom") && e.contains(&format!("server {}", server.member_id())),
        "{e}"
    );
    let e = kv.set_rule(&custom).unwrap_err().to_string();
    assert!(e.contains("custom"), "{e}");
    // The worker goes on as before.
    kv.init(&[1], &[1], &[1f32]).unwrap();
    let st = coord.status();
    assert_eq!(st["live_members"], 2, "{st}");
    assert_eq!(st["registered_total"], 2, "{st}");
    assert_eq!(st["groups"][0]["live"], 2, "{st}");
    drop(kv);
    drop(server);
    // Everyone came and left: the coordinator tells (a scheduler process exits on this).
    let t0 = Instant::now();
    let st = loop {
        let st = coord.status();
        if st["live_members"] == 0 {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "members still live: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(st["registered_total"], 2, "{st}");
    assert_eq!(st["groups"].as_array().map(Vec::len), Some(0), "{st}");
    assert_eq!(st["past_groups"][0]["group"], "ps", "{st}");
    assert_eq!(st["past_groups"][0]["registered_total"], 2, "{st}");
}

const CHILD: &str = "PS_RULES_TEST_COORDINATOR";

fn kill_cfg(addr: &str) -> Config {
    Config {
        world_size: Some(3),
        group: "ps-rules-kill".into(),
        heartbeat_timeout: Duration::from_secs(2),
        log: std::env::var("BRAID_LOG").unwrap_or_else(|_| "error".into()),
        ..cfg(addr, 3)
    }
}

fn kill_opts() -> PsOptions {
    PsOptions {
        partition_bytes: 4096,
        replicas: 1,
        ..PsOptions::default()
    }
}

/// The server process of the kill -9 test: serves until its stdin closes or it is killed.
#[test]
fn child_server() {
    let Ok(addr) = std::env::var(CHILD) else {
        return;
    };
    let s = KvServer::start(kill_cfg(&addr), kill_opts()).unwrap();
    println!("SERVER {}", s.member_id());
    let mut b = [0u8; 1];
    let _ = std::io::stdin().read(&mut b);
    drop(s);
}

/// Kills its process when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two server processes with one replica, a rule with momentum set at run time, one killed
/// with -9 between rounds: the survivor owns every part with the momentum it kept as a
/// replica, and the rounds after the kill give exactly MXNet's weights.
#[test]
fn a_server_killed_with_replicas_keeps_the_momentum() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let mut procs: Vec<Proc> = (0..2)
        .map(|_| {
            Proc(
                Command::new(std::env::current_exe().unwrap())
                    .args(["child_server", "--exact", "--nocapture", "--test-threads=1"])
                    .env(CHILD, &addr)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let kv = KvWorker::start(kill_cfg(&addr), kill_opts()).unwrap();
    let ids: Vec<u64> = procs
        .iter_mut()
        .map(|p| common::server_id(&mut p.0))
        .collect();
    let keys: Vec<u64> = (1..=16).collect();
    let lens = vec![8usize; 16];
    let total = 128;
    let w0: Vec<f32> = (0..total).map(|i| (i as f32 - 60.0) * 0.125).collect();
    kv.init(&keys, &lens, &w0).unwrap();
    kv.set_rule(&UpdateRule::parse(RULE).unwrap()).unwrap();
    let (mut w, mut m) = (w0.clone(), vec![0f32; total]);
    for r in 0..6 {
        if r == 3 {
            // Both servers own parts (and replicate each other's): kill one.
            let victim = procs.remove(0);
            drop(victim);
            let t0 = Instant::now();
            while kv.sizes().0 != 1 {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "no view without {}",
                    ids[0]
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let g: Vec<f32> = (0..total).map(|i| grad(0, r, i) + grad(1, r, i)).collect();
        for i in 0..total {
            w[i] = mx(w[i], g[i], &mut m[i]);
        }
        let mut out = vec![0f32; total];
        let v = kv.push_pull_into(&keys, &lens, &g, &mut out, 0).unwrap();
        assert_eq!(v, r as u64 + 1);
        assert_eq!(out, w, "round {r}");
        let mut st = vec![0f32; total];
        kv.pull_state_into(&keys, &lens, &mut st).unwrap();
        assert_eq!(st, m, "round {r}: momentum");
    }
    drop(kv);
    drop(procs);
}
