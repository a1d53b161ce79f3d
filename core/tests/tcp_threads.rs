//! Ranks as threads of one process over real TCP sockets: strangers on the coordinator port
//! and on a rank's data port are rejected while a job runs, and the job is unaffected.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use braid::membership::Coordinator;
use braid::{Communicator, Config, ReduceOp};

#[test]
fn strangers_on_coordinator_and_data_ports_do_not_disturb_the_job() {
    let coord = Coordinator::bind("127.0.0.1:0").unwrap();
    let caddr = coord.local_addr();
    let n = 3;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::scope(|s| {
        for r in 0..n {
            let tx = tx.clone();
            s.spawn(move || {
                let cfg = Config {
                    coordinator: Some(caddr.to_string()),
                    world_size: Some(n),
                    rank: Some(r),
                    timeout: Duration::from_secs(30),
                    transport: braid::config::TransportKind::Tcp,
                    ..Config::default()
                };
                let c = Communicator::init_with(cfg).unwrap();
                assert_eq!(c.transport_name(), "tcp");
                if r == 0 {
                    tx.send(c.listen_addr().to_string()).unwrap();
                }
                for i in 0..300u32 {
                    let mut x = vec![(r as u32 + i) as f32; 10_000 + i as usize];
                    c.all_reduce_inplace(&mut x, ReduceOp::Sum).unwrap();
                    let want = (0..n as u32).map(|k| (k + i) as f32).sum::<f32>();
                    assert!(x.iter().all(|v| *v == want), "iteration {i}");
                    if i % 50 == 0 {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                c.barrier().unwrap();
            });
        }
        let data = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        // Garbage, an HTTP request, a truncated frame and a fake braid transport hello with a
        // valid magic but a random job nonce, at both ports, while the job runs.
        let mut fake = b"BRDT".to_vec();
        fake.extend_from_slice(&1u16.to_le_bytes()); // version
        fake.extend_from_slice(&0u16.to_le_bytes()); // index
        fake.extend_from_slice(&1u16.to_le_bytes()); // sockets
        fake.extend_from_slice(&0u16.to_le_bytes());
        fake.extend_from_slice(&65536u32.to_le_bytes());
        fake.extend_from_slice(&7u64.to_le_bytes());
        let hello = b"BRDA\x01\x00\x00\x00"
            .iter()
            .copied()
            .chain([0u8; 32])
            .collect::<Vec<u8>>();
        fake.extend_from_slice(&(hello.len() as u32).to_le_bytes());
        fake.extend_from_slice(&hello);
        let payloads: Vec<Vec<u8>> = vec![
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            b"BRDC\x00".to_vec(),
            b"BRDC\x00\x01\x00\x01\xff\xff\xff\xff".to_vec(),
            fake,
        ];
        for _round in 0..3 {
            for addr in [caddr.to_string(), data.clone()] {
                for p in &payloads {
                    if let Ok(mut s) = TcpStream::connect(&addr) {
                        let _ = s.write_all(p);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}
