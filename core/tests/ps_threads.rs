//! Push/pull with servers and workers as threads of one process over real TCP and a real
//! coordinator (the multi-process drills are in perf/tests/ps.rs).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use braid::membership::Coordinator;
use braid::ps::{Consistency, KvReader, KvServer, KvWorker, PsOptions, UpdateRule};
use braid::Config;

fn cfg(addr: &str, n: usize) -> Config {
    Config {
        coordinator: Some(addr.to_string()),
        world_size: Some(n),
        group: "ps".into(),
        timeout: Duration::from_secs(20),
        init_timeout: Duration::from_secs(30),
        transport: braid::config::TransportKind::Tcp,
        heartbeat: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(3),
        join_window: Duration::from_millis(100),
        ..Config::default()
    }
}

#[test]
fn sync_push_pull_two_workers_two_servers() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions {
        partition_bytes: 1024,
        ..PsOptions::default()
    };
    std::thread::scope(|s| {
        let servers: Vec<_> = (0..2)
            .map(|_| {
                let (addr, opts) = (addr.clone(), opts.clone());
                s.spawn(move || KvServer::start(cfg(&addr, 4), opts).unwrap())
            })
            .collect();
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let (addr, opts) = (addr.clone(), opts.clone());
                s.spawn(move || {
                    let kv = KvWorker::start(cfg(&addr, 4), opts).unwrap();
                    let keys = [1u64, 2, 3];
                    let lens = [4usize, 1000, 1];
                    let zeros = vec![0f32; 1005];
                    kv.init(&keys, &lens, &zeros).unwrap();
                    for round in 1..=5u64 {
                        let g: Vec<f32> = (0..1005)
                            .map(|i| (w as f32 + 1.0) * (i as f32 + round as f32))
                            .collect();
                        let p = kv.push_pull(&keys, &lens, &g, 0).unwrap().wait().unwrap();
                        assert_eq!(p.version, round);
                        for (i, v) in p.values.iter().enumerate() {
                            let want = 3.0 * (i as f32 + round as f32);
                            assert_eq!(*v, want, "round {round} element {i}");
                        }
                    }
                    // Bad input: wrong length for a known key.
                    let e = kv.push(&[1], &[5], &[0f32; 5], 0).err().unwrap();
                    assert!(e.to_string().contains("key 1"), "{e}");
                    kv
                })
            })
            .collect();
        let ws: Vec<KvWorker> = workers.into_iter().map(|h| h.join().unwrap()).collect();
        // A reader sees a consistent snapshot: round 5 everywhere.
        let mut r = KvReader::connect(cfg(&addr, 4), opts.clone()).unwrap();
        let (v, vals) = r.snapshot::<f32>(&[1, 2, 3], &[4, 1000, 1], None).unwrap();
        assert_eq!(v, 5);
        assert_eq!(vals[0], 3.0 * 5.0);
        assert_eq!(vals[1004], 3.0 * (1004.0 + 5.0));
        drop(ws);
        let ss: Vec<KvServer> = servers.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(ss.iter().all(|s| s.parts_held() > 0));
    });
}

#[test]
fn async_and_sgd_rule() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let addr = coord.local_addr().to_string();
    let opts = PsOptions {
        consistency: Consistency::Async,
        rule: UpdateRule::Sgd { lr: 0.5 },
        ..PsOptions::default()
    };
    std::thread::scope(|s| {
        let server = {
            let (addr, opts) = (addr.clone(), opts.clone());
            s.spawn(move || KvServer::start(cfg(&addr, 2), opts).unwrap())
        };
        let kv = KvWorker::start(cfg(&addr, 2), opts.clone()).unwrap();
        kv.init(&[9], &[3], &[10f64, 10.0, 10.0]).unwrap();
        for _ in 0..4 {
            kv.push(&[9], &[3], &[1f64, 2.0, 4.0], 0)
                .unwrap()
                .wait()
                .unwrap();
        }
        let p = kv.pull::<f64>(&[9], &[3], None, 0).unwrap().wait().unwrap();
        assert_eq!(p.values, vec![8.0, 6.0, 2.0]);
        assert_eq!(p.version, 4);
        drop(kv);
        drop(server.join().unwrap());
    });
}
