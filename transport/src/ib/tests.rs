//! The ib transport over the emulated NIC: the conformance suite, rendezvous through staging
//! and through registered memory, striping, credits under many small messages, and errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use super::*;
use crate::conformance as conf;
use crate::{Conn, META_LEN};

fn emu(qps: usize) -> IbTransport {
    IbTransport::new(IbOptions {
        provider: Provider::Emulated,
        qps_per_peer: qps,
        ..IbOptions::default()
    })
    .unwrap()
}

fn pair_of(a: &IbTransport, b: &IbTransport) -> (Box<dyn Conn>, Box<dyn Conn>) {
    let (mut l, h) = a.listen(0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    std::thread::scope(|s| {
        let th = s.spawn(|| {
            b.connect_challenged(&h, &|_| b"hello-ib".to_vec(), deadline)
                .unwrap()
        });
        let acc = loop {
            if let Some(x) = l.accept_challenged().unwrap() {
                break x;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(acc.hello, b"hello-ib");
        (acc.conn, th.join().unwrap())
    })
}

fn default_pair() -> (Box<dyn Conn>, Box<dyn Conn>) {
    // Two NICs (two "processes"), as across hosts.
    let (a, b) = (emu(2), emu(2));
    pair_of(&a, &b)
}

#[test]
fn conformance_over_emulated_nic() {
    let mut sizes = conf::SIZES.to_vec();
    sizes.extend_from_slice(&[conn::EAGER_MAX, conn::EAGER_MAX + 1, 5 * conn::CHUNK + 3]);
    conf::exchange(&default_pair, &sizes);
    conf::both_directions_at_once(&default_pair);
    conf::mismatch_is_reported_with_meta(&default_pair);
    conf::death_goodbye_and_abort(&default_pair);
    conf::delivered_before_death_is_received(&default_pair);
    conf::peek_shows_the_next_header(&default_pair);
}

fn send_recv(a: &mut dyn Conn, b: &mut dyn Conn, src: &[u8], dst: &mut [u8]) {
    // SAFETY: both buffers outlive the requests (waited below).
    let s = unsafe { a.isend(7, &[1; META_LEN], src.as_ptr(), src.len()) }
        .unwrap()
        .unwrap();
    // SAFETY: as above.
    let r = unsafe { b.irecv(7, dst.as_mut_ptr(), dst.len()) }
        .unwrap()
        .unwrap();
    std::thread::scope(|sc| {
        sc.spawn(|| conf::wait(a, s).unwrap());
        conf::wait(b, r).unwrap();
    });
}

#[test]
fn registered_buffers_zero_copy_and_striping() {
    for qps in [1, 3] {
        let (ta, tb) = (emu(qps), emu(qps));
        let (mut a, mut b) = pair_of(&ta, &tb);
        let n = 3 * conn::WINDOW_MAX + 12345;
        let src: Vec<u8> = (0..n).map(|i| (i * 13 % 251) as u8).collect();
        let mut dst = vec![0u8; n];
        let hs = ta.register(src.as_ptr(), n).unwrap();
        let hr = tb.register(dst.as_ptr(), n).unwrap();
        send_recv(a.as_mut(), b.as_mut(), &src, &mut dst);
        assert!(dst == src, "registered transfer corrupted with {qps} qps");
        // Zero copy: every byte went by RDMA from and into the registered buffers.
        assert_eq!(a.direct_bytes().0, n as u64);
        assert_eq!(b.direct_bytes().1, n as u64);
        assert_eq!((a.bytes().0, b.bytes().1), (0, 0));
        // Only part of a registration: still direct.
        let mut dst2 = vec![0u8; 100_000];
        send_recv(a.as_mut(), b.as_mut(), &src[1000..101_000], &mut dst2);
        assert_eq!(&dst2[..], &src[1000..101_000]);
        // The sender's part of its registration went direct; the receiver's heap buffer staged.
        assert_eq!(a.direct_bytes().0, n as u64 + 100_000);
        assert_eq!(b.bytes().1, 100_000);
        ta.deregister(hs).unwrap();
        tb.deregister(hr).unwrap();
        assert!(ta.deregister(hs).is_err());
    }
}

#[test]
fn many_small_messages_use_credits() {
    let (mut a, mut b) = default_pair();
    // Far more than the peer's receive slots, all posted before any receive.
    let k = 10 * conn::SLOTS;
    let src: Vec<Vec<u8>> = (0..k).map(|i| vec![i as u8; 1 + i % 300]).collect();
    let mut dst: Vec<Vec<u8>> = (0..k).map(|i| vec![0u8; 1 + i % 300]).collect();
    let sreqs: Vec<_> = src
        .iter()
        .enumerate()
        .map(|(i, s)| {
            // SAFETY: the buffers outlive the requests.
            unsafe { a.isend(i as u64, &[0; META_LEN], s.as_ptr(), s.len()) }
                .unwrap()
                .unwrap()
        })
        .collect();
    std::thread::scope(|sc| {
        let a = a.as_mut();
        sc.spawn(move || {
            for r in sreqs {
                conf::wait(a, r).unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        let rreqs: Vec<_> = dst
            .iter_mut()
            .enumerate()
            .map(|(i, d)| {
                // SAFETY: as above.
                unsafe { b.irecv(i as u64, d.as_mut_ptr(), d.len()) }
                    .unwrap()
                    .unwrap()
            })
            .collect();
        for r in rreqs {
            conf::wait(b.as_mut(), r).unwrap();
        }
    });
    assert_eq!(src, dst);
}

#[test]
fn large_mismatch_fails_both_sides_clearly() {
    let (mut a, mut b) = default_pair();
    let src = vec![1u8; 3 * conn::CHUNK];
    let mut dst = vec![0u8; 2 * conn::CHUNK];
    // SAFETY: buffers outlive the requests (or the connections, which fail).
    let s = unsafe { a.isend(4, &[6; META_LEN], src.as_ptr(), src.len()) }
        .unwrap()
        .unwrap();
    // SAFETY: as above.
    let r = unsafe { b.irecv(4, dst.as_mut_ptr(), dst.len()) }
        .unwrap()
        .unwrap();
    std::thread::scope(|sc| {
        let a = a.as_mut();
        let h = sc.spawn(move || conf::wait(a, s).unwrap_err());
        let e = conf::wait(b.as_mut(), r).unwrap_err();
        assert!(
            matches!(e, NetError::Mismatch { expected_len, got_len, meta, .. }
            if expected_len == dst.len() as u64 && got_len == src.len() as u64 && meta == [6; META_LEN]),
            "{e}"
        );
        // As the layer above does with a receiver's mismatch: abort with it. The sender fails
        // with the abort, or earlier with its own protocol error when the receive's CTS went
        // out before the RTS was matched (which one comes first is a race).
        b.abort(&e.to_string());
        let e = h.join().unwrap();
        assert!(
            matches!(&e, NetError::PeerAborted(r) if r.contains("mismatch"))
                || e.to_string().contains("bytes"),
            "{e}"
        );
    });
    assert!(
        dst.iter().all(|&x| x == 0),
        "a mismatched message wrote into the buffer"
    );
}

#[test]
fn connect_handle_round_trip_and_garbage() {
    let t = emu(1);
    let (_l, h) = t.listen(0).unwrap();
    let p = decode_addr(&h.addr).unwrap();
    assert_eq!(p.provider, Provider::Emulated.code());
    assert_eq!(p.device, t.port().device);
    assert!(decode_addr(&h.addr[..10]).is_err());
    let mut bad = h.clone();
    bad.addr[0] = Provider::Verbs.code();
    let e = t
        .connect_challenged(&bad, &|_| vec![], Instant::now() + Duration::from_secs(1))
        .err()
        .unwrap();
    assert!(e.to_string().contains("BRAID_IB_PROVIDER"), "{e}");
}

/// A connected pair of concrete connections (for the test hooks).
fn concrete_pair(a: &IbTransport, b: &IbTransport) -> (conn::IbConn, conn::IbConn) {
    let (mut l, h) = a.tcp.listen(0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let params = ConnectParams::default();
    std::thread::scope(|s| {
        let th = s.spawn(|| {
            let side = b
                .tcp
                .connect_challenged(&h, &|_| b"x".to_vec(), deadline)
                .unwrap();
            conn::IbConn::new(b.nic.clone(), b.regs.clone(), side, 2, params, deadline).unwrap()
        });
        let acc = loop {
            if let Some(x) = l.accept_challenged().unwrap() {
                break x;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let c = conn::IbConn::new(a.nic.clone(), a.regs.clone(), acc.conn, 2, params, deadline)
            .unwrap();
        (c, th.join().unwrap())
    })
}

/// A CTS with a corrupted rkey, or a window address outside the registered region: the
/// sender's write fails with the verbs status text naming the peer, the receiver fails too,
/// and not one byte lands in the receiver's memory (guards around the buffer included).
#[test]
fn corrupted_rkey_or_out_of_bounds_window_touches_nothing() {
    let corruptions: [fn(&mut u32, &mut u64); 2] = [
        |rkey, _| *rkey ^= 0x5a5a,
        |_, addr| *addr += 64 * 1024 * 1024,
    ];
    for (i, f) in corruptions.into_iter().enumerate() {
        let (ta, tb) = (emu(2), emu(2));
        let (mut a, mut b) = concrete_pair(&ta, &tb);
        let n = 2 * conn::CHUNK;
        let src = vec![0xabu8; n];
        // Guard pages around the receive buffer, all registered.
        let mut mem = vec![0u8; n + 2 * 4096];
        let h = tb.register(mem.as_ptr(), mem.len()).unwrap();
        b.corrupt_cts = Some(f);
        // SAFETY: buffers outlive the connections (dropped at the end of the iteration).
        let s = unsafe { a.isend(1, &[0; META_LEN], src.as_ptr(), n) }
            .unwrap()
            .unwrap();
        // SAFETY: as above.
        let r = unsafe { b.irecv(1, mem.as_mut_ptr().add(4096), n) }
            .unwrap()
            .unwrap();
        std::thread::scope(|sc| {
            let bb = &mut b;
            let rh = sc.spawn(move || conf::wait(bb, r));
            let e = conf::wait(&mut a, s).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("remote access error") && text.contains("127.0.0.1"),
                "case {i}: {text}"
            );
            assert!(
                rh.join().unwrap().is_err(),
                "case {i}: the receive completed"
            );
        });
        assert!(mem.iter().all(|&x| x == 0), "case {i}: bytes landed");
        drop((a, b));
        tb.deregister(h).unwrap();
    }
}

#[test]
fn emulated_nic_stages_gpu_memory() {
    let t = emu(1);
    assert!(matches!(
        t.nic.gpu_path(false),
        verbs::GpuPath::HostStaging { .. }
    ));
    // SAFETY: the call fails before touching anything (no such registration is possible).
    let r = unsafe { t.nic.reg_dmabuf_mr(-1, 0, 4096, 0, nic::ACCESS_LOCAL_WRITE) };
    assert!(r.is_err());
}
