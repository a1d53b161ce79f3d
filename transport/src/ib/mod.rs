//! The ib transport: InfiniBand / RoCE verbs, written against the narrow [`nic::Nic`] trait.
//!
//! Two providers implement the trait: [`verbs`] (rdma-core through the `ibverbs` crate, built
//! as the plugin library `libbraid_ibverbs.so` that this crate loads at run time, so that
//! libbraid itself never needs libibverbs) and [`emulated`] (a userspace NIC with RC
//! semantics, for tests and demos; chosen only by `BRAID_IB_PROVIDER=emulated`).
//!
//! A connection starts as an authenticated TCP connection (the same challenge–response as the
//! tcp transport): the connect handle carries its address and this side's port (device, LID,
//! GID, link layer, provider); over it both sides exchange their queue pair addresses
//! (QPN, PSN, LID, GID), connect the queue pairs, and from then on move data by verbs
//! ([`conn`] has the protocol). The TCP connection stays as the side channel for goodbye,
//! abort and a fast dead-peer signal.
//!
//! Memory: a buffer registered through [`Transport::register`] is written into and sent from
//! directly (zero copy); any other buffer goes through registered staging slots, copied in
//! chunks that overlap with the transfer. braid does not cache registrations of arbitrary user
//! memory: it cannot see the memory being freed or remapped (that needs allocator hooks), and a
//! stale registration would move bytes to pages the buffer no longer uses.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub mod conn;
pub mod emulated;
pub mod nic;
pub mod verbs;
pub mod verbs_abi;

use crate::tcp::{TcpOptions, TcpTransport};
use crate::{
    Arrival, ConnectHandle, DeviceProps, HelloCheck, HelloFn, Listener, MemHandle, NetError,
    NetResult, PtrSupport, Transport,
};
use nic::{ConnectParams, LinkLayer, Mr, Nic, PortInfo, ACCESS_LOCAL_WRITE, ACCESS_REMOTE_WRITE};

/// Which NIC implementation the ib transport uses (`BRAID_IB_PROVIDER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// rdma-core verbs through the plugin library.
    Verbs,
    /// The userspace emulated NIC (tests and demos).
    Emulated,
}

impl Provider {
    fn code(self) -> u8 {
        match self {
            Provider::Verbs => 1,
            Provider::Emulated => 2,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Provider::Verbs => "verbs",
            Provider::Emulated => "emulated",
        }
    }
}

/// Options of the ib transport (from `BRAID_IB_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IbOptions {
    /// The provider.
    pub provider: Provider,
    /// Device name (`BRAID_IB_DEVICE`); None: the first device.
    pub device: Option<String>,
    /// Port number (`BRAID_IB_PORT`).
    pub port: u8,
    /// GID index (`BRAID_IB_GID_INDEX`).
    pub gid_index: u8,
    /// Traffic class (`BRAID_IB_TC`).
    pub traffic_class: u8,
    /// Data queue pairs per peer (`BRAID_IB_QPS_PER_PEER`), 1..=16.
    pub qps_per_peer: usize,
    /// Address of the side channel's listener (and the emulated NIC's).
    pub bind: IpAddr,
    /// Explicit path of the verbs plugin (`BRAID_IB_PLUGIN`).
    pub plugin: Option<PathBuf>,
}

impl Default for IbOptions {
    fn default() -> Self {
        IbOptions {
            provider: Provider::Verbs,
            device: None,
            port: 1,
            gid_index: 0,
            traffic_class: 0,
            qps_per_peer: 2,
            bind: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            plugin: None,
        }
    }
}

/// Memory registered with the NIC for zero-copy transfers, by start address: regions
/// registered through [`Transport::register`] and braid's shared regions
/// ([`crate::region::Regions`], through [`crate::region::RegionHook`]).
pub(crate) struct RegTable {
    nic: Arc<dyn Nic>,
    /// Start address -> (registration, braid region id if it is one).
    map: Mutex<BTreeMap<u64, (Mr, Option<u64>)>>,
}

impl RegTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (Mr, Option<u64>)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The registration holding all of `[addr, addr + len)`, if any.
    pub(crate) fn find(&self, addr: u64, len: usize) -> Option<Mr> {
        let map = self.lock();
        let (_, (mr, _)) = map.range(..=addr).next_back()?;
        let end = addr.checked_add(len as u64)?;
        (end <= mr.addr + mr.len).then_some(*mr)
    }

    fn dereg(&self, mr: &Mr) {
        if let Err(e) = self.nic.dereg_mr(mr) {
            tracing::warn!(target: "braid::ib", "deregistering {} bytes at {:#x}: {e}", mr.len, mr.addr);
        }
    }
}

impl crate::region::RegionHook for RegTable {
    fn added(&self, base: *mut u8, len: usize, id: u64) {
        // SAFETY: the RegionHook contract: the region stays mapped until `removed`, which
        // deregisters it first.
        match unsafe {
            self.nic
                .reg_mr(base, len, ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE)
        } {
            Ok(mr) => {
                self.lock().insert(mr.addr, (mr, Some(id)));
            }
            Err(e) => tracing::info!(target: "braid::ib",
                "registering a shared region of {len} bytes: {e}; transfers from it are staged"),
        }
    }

    fn removed(&self, id: u64) {
        let mr = {
            let mut map = self.lock();
            let Some(addr) = map
                .iter()
                .find(|(_, (_, r))| *r == Some(id))
                .map(|(a, _)| *a)
            else {
                return;
            };
            map.remove(&addr)
        };
        if let Some((mr, _)) = mr {
            self.dereg(&mr);
        }
    }
}

impl Drop for RegTable {
    fn drop(&mut self) {
        let all: Vec<Mr> = self.lock().values().map(|(m, _)| *m).collect();
        for mr in all {
            self.dereg(&mr);
        }
    }
}

/// The ib transport.
pub struct IbTransport {
    nic: Arc<dyn Nic>,
    port: PortInfo,
    tcp: TcpTransport,
    opts: IbOptions,
    regs: Arc<RegTable>,
}

impl std::fmt::Debug for IbTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "IbTransport({} {} port {})",
            self.opts.provider.name(),
            self.port.device,
            self.port.port
        )
    }
}

impl IbTransport {
    /// Opens the device. `Err(NetError::Unavailable(reason))` when there is none usable: the
    /// reason says why (no plugin, no rdma-core, no device, port down).
    pub fn new(opts: IbOptions) -> NetResult<IbTransport> {
        if !(1..=conn::MAX_QPS).contains(&opts.qps_per_peer) {
            return Err(NetError::Unavailable(format!(
                "BRAID_IB_QPS_PER_PEER must be 1..={}, got {}",
                conn::MAX_QPS,
                opts.qps_per_peer
            )));
        }
        let nic: Arc<dyn Nic> = match opts.provider {
            Provider::Emulated => emulated::open(emulated::EmuOptions {
                bind: opts.bind,
                name: opts.device.clone().unwrap_or_else(|| "emu0".into()),
            })
            .map_err(|e| NetError::Unavailable(format!("emulated NIC: {e}")))?,
            Provider::Verbs => verbs::open(&verbs::VerbsOptions {
                device: opts.device.clone(),
                port: opts.port,
                gid_index: opts.gid_index,
                plugin: opts.plugin.clone(),
            })
            .map_err(NetError::Unavailable)?,
        };
        let port = nic.port();
        let tcp = TcpTransport::new(TcpOptions {
            streams: 1,
            bind: opts.bind,
            ..TcpOptions::default()
        })?;
        tracing::debug!(target: "braid::ib", "ib: {} device {} port {} ({:?}, lid {}, mtu {})",
            opts.provider.name(), port.device, port.port, port.link_layer, port.lid, port.mtu);
        Ok(IbTransport {
            port,
            tcp,
            regs: Arc::new(RegTable {
                nic: nic.clone(),
                map: Mutex::new(BTreeMap::new()),
            }),
            nic,
            opts,
        })
    }

    /// Registers every region of `regions` (now and later) with the NIC, so that transfers
    /// from and into braid's shared memory ([`crate::region::Regions::alloc`]) need no copy.
    pub fn attach_regions(&self, regions: &crate::region::Regions) {
        let regs: Arc<dyn crate::region::RegionHook> = self.regs.clone();
        regions.add_hook(Arc::downgrade(&regs));
    }

    /// The opened port.
    pub fn port(&self) -> &PortInfo {
        &self.port
    }

    fn params(&self, peer: &PeerPort) -> ConnectParams {
        ConnectParams {
            mtu: self.port.mtu.min(peer.mtu).max(256),
            gid_index: self.opts.gid_index,
            traffic_class: self.opts.traffic_class,
            use_gid: self.port.link_layer == LinkLayer::Ethernet || peer.lid == 0,
            ..ConnectParams::default()
        }
    }
}

/// What a connect handle says about the peer's port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerPort {
    provider: u8,
    link: u8,
    lid: u16,
    mtu: u32,
    device: String,
    tcp: Vec<u8>,
}

fn link_code(l: LinkLayer) -> u8 {
    match l {
        LinkLayer::InfiniBand => 1,
        LinkLayer::Ethernet => 2,
        LinkLayer::Emulated => 3,
    }
}

/// Handle address bytes: provider, link layer, LID, MTU, GID, device name, then the side
/// channel's tcp address.
fn encode_addr(p: Provider, port: &PortInfo, tcp: &[u8]) -> Vec<u8> {
    let mut v = vec![p.code(), link_code(port.link_layer)];
    v.extend_from_slice(&port.lid.to_le_bytes());
    v.extend_from_slice(&port.mtu.to_le_bytes());
    v.extend_from_slice(&port.gid);
    let name = port.device.as_bytes();
    let n = name.len().min(64);
    v.push(n as u8);
    v.extend_from_slice(&name[..n]);
    v.extend_from_slice(tcp);
    v
}

fn decode_addr(b: &[u8]) -> NetResult<PeerPort> {
    let bad = || NetError::Protocol("truncated ib connect handle".into());
    if b.len() < 25 {
        return Err(bad());
    }
    let n = b[24] as usize;
    let name = b.get(25..25 + n).ok_or_else(bad)?;
    Ok(PeerPort {
        provider: b[0],
        link: b[1],
        lid: u16::from_le_bytes([b[2], b[3]]),
        mtu: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        device: String::from_utf8_lossy(name).into_owned(),
        tcp: b[25 + n..].to_vec(),
    })
}

/// Listener of the ib transport: the side channel's tcp listener; each accepted connection
/// becomes an [`conn::IbConn`].
pub struct IbListener {
    inner: Box<dyn Listener>,
    nic: Arc<dyn Nic>,
    regs: Arc<RegTable>,
    qps: usize,
    params: ConnectParams,
}

impl Listener for IbListener {
    fn accept_challenged(&mut self) -> NetResult<Option<Arrival>> {
        loop {
            let Some(a) = self.inner.accept_challenged()? else {
                return Ok(None);
            };
            match conn::IbConn::new(
                self.nic.clone(),
                self.regs.clone(),
                a.conn,
                self.qps,
                self.params,
                std::time::Instant::now() + std::time::Duration::from_secs(10),
            ) {
                Ok(c) => {
                    return Ok(Some(Arrival {
                        conn: Box::new(c),
                        hello: a.hello,
                        challenge: a.challenge,
                        peer_pid: a.peer_pid,
                    }))
                }
                Err(e) => {
                    tracing::warn!(target: "braid::ib", "ib connection from an authenticated peer dropped: {e}");
                }
            }
        }
    }

    fn set_hello_check(&mut self, check: HelloCheck) {
        self.inner.set_hello_check(check);
    }

    fn fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.fd()
    }
}

impl Transport for IbTransport {
    fn name(&self) -> &'static str {
        "ib"
    }

    fn devices(&self) -> NetResult<Vec<DeviceProps>> {
        Ok(vec![DeviceProps {
            name: format!("{}:{}", self.port.device, self.port.port),
            speed_mbps: self.port.speed_mbps,
            latency_us: if self.opts.provider == Provider::Emulated {
                0.0
            } else {
                2.0
            },
            ptr_support: PtrSupport {
                host: true,
                cuda: false,
            },
        }])
    }

    fn listen(&self, dev: usize) -> NetResult<(Box<dyn Listener>, ConnectHandle)> {
        if dev != 0 {
            return Err(NetError::Unavailable(format!(
                "ib has one device, not {dev}"
            )));
        }
        let (inner, th) = self.tcp.listen(0)?;
        let h = ConnectHandle {
            transport: "ib".into(),
            addr: encode_addr(self.opts.provider, &self.port, &th.addr),
        };
        let l = IbListener {
            inner,
            nic: self.nic.clone(),
            regs: self.regs.clone(),
            qps: self.opts.qps_per_peer,
            params: self.params(&PeerPort {
                provider: 0,
                link: 0,
                lid: self.port.lid,
                mtu: self.port.mtu,
                device: String::new(),
                tcp: vec![],
            }),
        };
        Ok((Box::new(l), h))
    }

    fn connect_challenged(
        &self,
        handle: &ConnectHandle,
        hello: HelloFn<'_>,
        deadline: std::time::Instant,
    ) -> NetResult<Box<dyn crate::Conn>> {
        self.connect_or_give_up(handle, hello, deadline, &|| false)
    }

    fn connect_or_give_up(
        &self,
        handle: &ConnectHandle,
        hello: HelloFn<'_>,
        deadline: std::time::Instant,
        give_up: &dyn Fn() -> bool,
    ) -> NetResult<Box<dyn crate::Conn>> {
        if handle.transport != "ib" {
            return Err(NetError::Protocol(format!(
                "ib cannot connect to a {} handle",
                handle.transport
            )));
        }
        let peer = decode_addr(&handle.addr)?;
        if peer.provider != self.opts.provider.code() {
            return Err(NetError::Unavailable(format!(
                "the peer's ib provider differs from this side's ({}): set the same BRAID_IB_PROVIDER everywhere",
                self.opts.provider.name()
            )));
        }
        if peer.link != link_code(self.port.link_layer) {
            return Err(NetError::Unavailable(format!(
                "the peer's device {} has another link layer than {} ({:?})",
                peer.device, self.port.device, self.port.link_layer
            )));
        }
        let side = self.tcp.connect_or_give_up(
            &ConnectHandle {
                transport: "tcp".into(),
                addr: peer.tcp.clone(),
            },
            hello,
            deadline,
            give_up,
        )?;
        let c = conn::IbConn::new(
            self.nic.clone(),
            self.regs.clone(),
            side,
            self.opts.qps_per_peer,
            self.params(&peer),
            deadline,
        )?;
        Ok(Box::new(c))
    }

    fn register(&self, ptr: *const u8, len: usize) -> NetResult<MemHandle> {
        // SAFETY: the Transport::register contract: the region stays valid until deregistered.
        let mr = unsafe {
            self.nic.reg_mr(
                ptr as *mut u8,
                len,
                ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE,
            )
        }
        .map_err(|e| NetError::Io {
            op: e.op,
            msg: e.msg,
        })?;
        self.regs.lock().insert(mr.addr, (mr, None));
        Ok(MemHandle { key: mr.id })
    }

    fn deregister(&self, mh: MemHandle) -> NetResult<()> {
        let mr = {
            let mut map = self.regs.lock();
            let Some(addr) = map
                .iter()
                .find(|(_, (m, r))| m.id == mh.key && r.is_none())
                .map(|(a, _)| *a)
            else {
                return Err(NetError::Protocol(format!("no ib registration {}", mh.key)));
            };
            map.remove(&addr)
        };
        if let Some((mr, _)) = mr {
            self.nic.dereg_mr(&mr).map_err(|e| NetError::Io {
                op: e.op,
                msg: e.msg,
            })?;
        }
        Ok(())
    }
}

/// Fuzzing entry (see `crate::fuzzing::ib_wire`): the first byte picks a decoder of bytes a
/// peer controls, the rest is its input: 0 the connect handle address, 1 the queue pair
/// handshake, 2 a control message header, 3 the emulated NIC's address.
pub(crate) fn fuzz_decoders(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(p) = decode_addr(rest) {
                let _ = (p.device.len(), p.tcp.len());
            }
        }
        1 => {
            // The handshake has a fixed length: pad or cut the input to it.
            let mut b = rest.to_vec();
            b.resize(conn::HS_LEN, 0);
            if let Ok((n, addrs)) = conn::decode_handshake(&b) {
                assert_eq!(addrs.len(), n + 1);
                let again = conn::encode_handshake(&addrs, n).ok();
                assert!(again.is_some());
            }
            let _ = conn::decode_handshake(rest);
        }
        2 => conn::fuzz_header(rest),
        _ => {
            let _ = emulated::decode_addr(rest);
        }
    }
}

/// Seed inputs for [`fuzz_decoders`] made by the real encoders: (file name, bytes).
pub(crate) fn fuzz_seeds() -> Vec<(String, Vec<u8>)> {
    let port = PortInfo {
        device: "emu0".into(),
        port: 1,
        lid: 0,
        gid: [7; 16],
        mtu: 4096,
        speed_mbps: 0,
        link_layer: LinkLayer::Emulated,
    };
    let mut out = vec![];
    let mut a = vec![0u8];
    a.extend(encode_addr(Provider::Emulated, &port, b"127.0.0.1:4000"));
    out.push(("seed-handle".to_string(), a));
    let addrs: Vec<nic::QpAddr> = (0..3)
        .map(|i| nic::QpAddr {
            lid: 1,
            gid: [i as u8; 16],
            qpn: 100 + i,
            psn: 7,
            nic_addr: vec![4, 127, 0, 0, 1, 0x10, 0x20],
        })
        .collect();
    if let Ok(h) = conn::encode_handshake(&addrs, 2) {
        let mut v = vec![1u8];
        v.extend(h);
        out.push(("seed-handshake".to_string(), v));
    }
    for (name, h) in conn::fuzz_header_seeds() {
        let mut v = vec![2u8];
        v.extend(h);
        out.push((name, v));
    }
    let mut e = vec![3u8, 4, 127, 0, 0, 1, 0x10, 0x20];
    e.extend([9u8; 16]);
    out.push(("seed-emu-addr".to_string(), e));
    out
}

#[cfg(test)]
mod tests;
