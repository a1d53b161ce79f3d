//! One ib connection: braid's ordered, tagged messages over reliable-connected queue pairs.
//!
//! # Queue pairs
//! A connection has one control queue pair and `qps` data queue pairs (BRAID_IB_QPS_PER_PEER).
//! The control QP carries only SENDs into receive slots the peer posted; the data QPs carry
//! only RDMA WRITE WITH IMMEDIATE, whose receives are posted (zero length) exactly for the chunks
//! the peer was told to write, so no write ever meets an empty receive queue (no RNR).
//!
//! # Eager (small messages, <= [`EAGER_MAX`])
//! The sender copies header + payload into a registered send slot and SENDs it into one of
//! the peer's [`SLOTS`] receive slots; its request completes when the SEND's completion
//! arrives, that is once the peer's NIC placed it (RC), as NCCL's sends complete: a process
//! that exits right after its last send has delivered it.
//! Flow control is by credits: the sender may have at most `SLOTS` messages unreturned; every
//! control message carries the receiver's returned credits, and a CREDIT-only message (which
//! needs no credit; two spare receive slots absorb them) goes out when half the window is owed.
//!
//! # Rendezvous (large messages)
//! The receiver, when it posts a receive, advertises windows of its buffer in CTS messages
//! (sequence number, tag, total length, offset, length, address, rkey, window id). A buffer
//! registered through [`crate::Transport::register`] is advertised directly, in windows of up
//! to [`WINDOW_MAX`] bytes (zero copy); any other buffer goes through registered staging slots
//! of [`CHUNK`] bytes, one window per slot, copied out when the window is complete. The sender
//! sends an RTS (sequence, tag, length, meta) and, for every window, RDMA WRITE WITH IMMEDIATE of
//! chunks of at most [`CHUNK`] bytes, chunk `j` of window `w` on data QP `(w + j) % qps`
//! (striping), each with immediate `w`; from a registered buffer directly, else through a send
//! staging slot. The receive completes when the RTS matched and every chunk of every window
//! arrived; the send completes when every write completed (RC: the data is placed remotely).
//!
//! Messages are matched in order: the n-th message sent meets the n-th receive posted; the
//! header of the next one can be looked at before a receive is posted ([`Conn::peek`]), and
//! an eager message that arrived before its sender closed or died is still received. A
//! receive whose tag or length differs from the sender's RTS/eager header fails with
//! [`NetError::Mismatch`] carrying the sender's meta; the sender, seeing a CTS whose tag or
//! total disagrees, fails with a protocol error naming both.
//!
//! # Side channel
//! The authenticated TCP connection that exchanged the queue pair addresses stays open: it
//! carries goodbye and abort, and its hang-up reports a dead peer at once (the verbs retry
//! timers would take seconds).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::nic::{
    status, ConnectParams, Cq, Mr, Nic, Qp, QpAddr, SendOp, SendWr, Sge, Wc, WcOpcode,
    ACCESS_LOCAL_WRITE, ACCESS_REMOTE_WRITE,
};
use super::RegTable;
use crate::reqs::ReqTable;
use crate::{Completion, Conn, Meta, NetError, NetResult, PollFd, Request, META_LEN};

/// Bytes of a control message header.
pub const HDR: usize = 64;
/// Bytes of a control slot (header + eager payload).
pub const SLOT: usize = 8192;
/// Largest message sent eagerly.
pub const EAGER_MAX: usize = SLOT - HDR;
/// Receive slots each side posts for the peer's normal control messages (its credits).
pub const SLOTS: usize = 32;
/// Spare receive slots for CREDIT-only messages (at most two can be outstanding).
const SPARE: usize = 2;
/// Largest chunk of one RDMA WRITE, and the size of a staging slot.
pub const CHUNK: usize = 512 * 1024;
/// Staging slots per direction (allocated at the first staged transfer).
const STAGES: usize = 4;
/// Largest window advertised over a registered buffer.
pub const WINDOW_MAX: usize = 16 * CHUNK;
/// Data receives (chunks) outstanding per data QP at most.
const DATA_DEPTH: usize = 128;
/// Windows outstanding on the receive side at most.
const MAX_WINDOWS: usize = 32;
/// Requests posted and not complete, per direction, at most.
const MAX_POSTED: usize = 4096;
/// Windows the peer may advertise ahead of this side's sends.
const MAX_STORED_WINDOWS: usize = 8 * MAX_WINDOWS;
/// Largest number of data QPs.
pub const MAX_QPS: usize = 16;
/// Largest provider address in the handshake.
const MAX_NIC_ADDR: usize = 64;
/// Bytes of one queue pair address in the handshake.
const QP_ENTRY: usize = 2 + 16 + 4 + 4 + 2 + MAX_NIC_ADDR;
/// Bytes of the handshake message.
pub(crate) const HS_LEN: usize = 16 + (MAX_QPS + 1) * QP_ENTRY;
const HS_MAGIC: &[u8; 4] = b"BRIB";
const HS_VERSION: u16 = 1;
/// Tag of the handshake message on the side channel.
const HS_TAG: u64 = 0x4252_4942_0000_0001;
/// Tag of the side channel's sentinel receive (never sent: it only watches the channel).
const WATCH_TAG: u64 = 0x4252_4942_0000_0002;

/// `slot_msg` entry of a slot carrying no eager message.
const NO_MSG: u64 = u64::MAX;

const K_EAGER: u8 = 1;
const K_RTS: u8 = 2;
const K_CTS: u8 = 3;
const K_CREDIT: u8 = 4;

// wr_id kinds (top byte).
const W_CRECV: u64 = 1 << 56;
const W_CSEND: u64 = 2 << 56;
const W_DRECV: u64 = 3 << 56;
const W_WRITE: u64 = 4 << 56;
const W_KIND: u64 = 0xff << 56;
/// Low bits of a message sequence number in a write's id (far more than MAX_POSTED).
const SEQ_MASK: u64 = (1 << 20) - 1;

/// A write's id below the kind byte: staging slot + 1 (0: none), data QP, length, message.
fn pack_write(stage: usize, qp: usize, len: usize, seq: u64) -> u64 {
    (stage as u64 & 0xff) << 48
        | (qp as u64 & 0xff) << 40
        | (len as u64 & 0xf_ffff) << 20
        | (seq & SEQ_MASK)
}

fn unpack_write(v: u64) -> (usize, usize, usize, u64) {
    (
        ((v >> 48) & 0xff) as usize,
        ((v >> 40) & 0xff) as usize,
        ((v >> 20) & 0xf_ffff) as usize,
        v & SEQ_MASK,
    )
}

/// Memory this connection owns, registered with the NIC.
struct OwnedMr {
    mem: Vec<u8>,
    mr: Mr,
    nic: Arc<dyn Nic>,
}

impl Drop for OwnedMr {
    fn drop(&mut self) {
        if let Err(e) = self.nic.dereg_mr(&self.mr) {
            tracing::debug!(target: "braid::ib", "deregistering {} bytes: {e}", self.mem.len());
        }
    }
}

impl OwnedMr {
    fn new(nic: &Arc<dyn Nic>, len: usize) -> NetResult<OwnedMr> {
        let mut mem = vec![0u8; len];
        // SAFETY: `mem` is a live allocation of `len` bytes that this struct owns and never
        // resizes; Drop deregisters it before the vector is freed (fields drop after `drop`).
        let mr = unsafe {
            nic.reg_mr(
                mem.as_mut_ptr(),
                len,
                ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE,
            )
        }
        .map_err(|e| NetError::Unavailable(format!("registering {len} bytes: {e}")))?;
        Ok(OwnedMr {
            mem,
            mr,
            nic: nic.clone(),
        })
    }
    fn addr(&self, off: usize) -> u64 {
        self.mem.as_ptr() as u64 + off as u64
    }
}

/// A control message header (decoded).
#[derive(Debug, Clone, Copy, Default)]
struct Hdr {
    kind: u8,
    credits: u32,
    seq: u64,
    tag: u64,
    len: u64,
    meta: Meta,
    // CTS only.
    off: u64,
    wlen: u64,
    addr: u64,
    rkey: u32,
    win: u32,
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn get64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn get32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

impl Hdr {
    fn encode(&self, b: &mut [u8]) {
        b[..HDR].fill(0);
        b[0] = self.kind;
        put32(b, 4, self.credits);
        put64(b, 8, self.seq);
        if self.kind == K_CTS {
            put64(b, 16, self.tag);
            put64(b, 24, self.len);
            put64(b, 32, self.off);
            put64(b, 40, self.wlen);
            put64(b, 48, self.addr);
            put32(b, 56, self.rkey);
            put32(b, 60, self.win);
        } else {
            put64(b, 16, self.tag);
            put64(b, 24, self.len);
            b[32..64].copy_from_slice(&self.meta);
        }
    }
    fn decode(b: &[u8]) -> NetResult<Hdr> {
        if b.len() < HDR {
            return Err(NetError::Protocol(format!(
                "ib control message of {} bytes (header is {HDR})",
                b.len()
            )));
        }
        let kind = b[0];
        if !(K_EAGER..=K_CREDIT).contains(&kind) {
            return Err(NetError::Protocol(format!(
                "ib control message of unknown kind {kind}"
            )));
        }
        let mut h = Hdr {
            kind,
            credits: get32(b, 4),
            seq: get64(b, 8),
            tag: get64(b, 16),
            len: get64(b, 24),
            ..Hdr::default()
        };
        if kind == K_CTS {
            h.off = get64(b, 32);
            h.wlen = get64(b, 40);
            h.addr = get64(b, 48);
            h.rkey = get32(b, 56);
            h.win = get32(b, 60);
        } else {
            h.meta.copy_from_slice(&b[32..64]);
        }
        Ok(h)
    }
}

/// Fuzzing: decodes a control message header (and re-encodes what decodes).
pub(crate) fn fuzz_header(b: &[u8]) {
    if let Ok(h) = Hdr::decode(b) {
        let mut out = [0u8; HDR];
        h.encode(&mut out);
        let again = Hdr::decode(&out).ok();
        assert!(again.is_some_and(|g| g.kind == h.kind && g.seq == h.seq));
    }
}

/// Fuzzing seeds: one header of each kind.
pub(crate) fn fuzz_header_seeds() -> Vec<(String, Vec<u8>)> {
    [K_EAGER, K_RTS, K_CTS, K_CREDIT]
        .iter()
        .map(|&kind| {
            let h = Hdr {
                kind,
                credits: 3,
                seq: 9,
                tag: 5,
                len: 70000,
                off: 4096,
                wlen: 65536,
                addr: 0x7f00_0000_1000,
                rkey: 0x1234,
                win: 2,
                ..Hdr::default()
            };
            let mut out = vec![0u8; HDR];
            h.encode(&mut out);
            (format!("seed-header-{kind}"), out)
        })
        .collect()
}

/// Encodes this side's queue pair addresses for the handshake.
pub(crate) fn encode_handshake(addrs: &[QpAddr], qps: usize) -> NetResult<Vec<u8>> {
    let mut b = vec![0u8; HS_LEN];
    b[..4].copy_from_slice(HS_MAGIC);
    b[4..6].copy_from_slice(&HS_VERSION.to_le_bytes());
    b[6..8].copy_from_slice(&(qps as u16).to_le_bytes());
    put32(&mut b, 8, SLOTS as u32);
    put32(&mut b, 12, CHUNK as u32);
    for (i, a) in addrs.iter().enumerate().take(MAX_QPS + 1) {
        let at = 16 + i * QP_ENTRY;
        if a.nic_addr.len() > MAX_NIC_ADDR {
            return Err(NetError::Unavailable(format!(
                "NIC address of {} bytes (at most {MAX_NIC_ADDR})",
                a.nic_addr.len()
            )));
        }
        b[at..at + 2].copy_from_slice(&a.lid.to_le_bytes());
        b[at + 2..at + 18].copy_from_slice(&a.gid);
        put32(&mut b, at + 18, a.qpn);
        put32(&mut b, at + 22, a.psn);
        b[at + 26..at + 28].copy_from_slice(&(a.nic_addr.len() as u16).to_le_bytes());
        b[at + 28..at + 28 + a.nic_addr.len()].copy_from_slice(&a.nic_addr);
    }
    Ok(b)
}

/// Decodes the peer's handshake: its data QP count and its addresses (control first).
pub(crate) fn decode_handshake(b: &[u8]) -> NetResult<(usize, Vec<QpAddr>)> {
    if b.len() != HS_LEN || &b[..4] != HS_MAGIC {
        return Err(NetError::Protocol("not an ib handshake".into()));
    }
    let ver = u16::from_le_bytes([b[4], b[5]]);
    if ver != HS_VERSION {
        return Err(NetError::Protocol(format!(
            "ib handshake version {ver}, this build speaks {HS_VERSION}"
        )));
    }
    let qps = u16::from_le_bytes([b[6], b[7]]) as usize;
    if !(1..=MAX_QPS).contains(&qps) {
        return Err(NetError::Protocol(format!(
            "ib handshake with {qps} data queue pairs (1..={MAX_QPS})"
        )));
    }
    let (slots, chunk) = (get32(b, 8) as usize, get32(b, 12) as usize);
    if slots != SLOTS || chunk != CHUNK {
        return Err(NetError::Protocol(format!(
            "peer's ib protocol uses {slots} slots of chunks of {chunk} bytes, this side {SLOTS} and {CHUNK}"
        )));
    }
    let mut out = Vec::with_capacity(qps + 1);
    for i in 0..=qps {
        let at = 16 + i * QP_ENTRY;
        let n = u16::from_le_bytes([b[at + 26], b[at + 27]]) as usize;
        if n > MAX_NIC_ADDR {
            return Err(NetError::Protocol(
                "ib handshake: NIC address too long".into(),
            ));
        }
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[at + 2..at + 18]);
        out.push(QpAddr {
            lid: u16::from_le_bytes([b[at], b[at + 1]]),
            gid,
            qpn: get32(b, at + 18),
            psn: get32(b, at + 22),
            nic_addr: b[at + 28..at + 28 + n].to_vec(),
        });
    }
    Ok((qps, out))
}

/// A posted send.
struct SendMsg {
    seq: u64,
    tag: u64,
    meta: Meta,
    buf: *const u8,
    len: usize,
    /// lkey of a registered buffer holding all of it.
    lkey: Option<u32>,
    /// Eager: sent (complete when its SEND completes); rendezvous: RTS sent.
    started: bool,
    /// Bytes whose writes were posted / completed.
    posted: usize,
    written: usize,
    done: bool,
}

/// A window the peer advertised for one of this side's messages.
#[derive(Debug, Clone, Copy)]
struct PeerWindow {
    tag: u64,
    total: u64,
    off: u64,
    len: u64,
    addr: u64,
    rkey: u32,
    win: u32,
    /// Bytes of it whose writes were posted.
    posted: u64,
}

/// A posted receive.
struct RecvMsg {
    seq: u64,
    tag: u64,
    buf: *mut u8,
    len: usize,
    /// The registration holding all of it (zero copy), if any.
    mr: Option<Mr>,
    /// The sender's header matched (eager: data copied).
    matched: bool,
    /// Bytes advertised in windows / received.
    advertised: usize,
    received: usize,
    done: bool,
}

/// A window this side advertised.
struct MyWindow {
    seq: u64,
    off: usize,
    len: usize,
    chunks: usize,
    got: usize,
    stage: Option<usize>,
}

/// Send-side chunk staged or direct, in flight.
struct Staging {
    mem: OwnedMr,
    free: Vec<usize>,
}

/// A received control message waiting for its receive to be posted.
enum Unexpected {
    /// An eager message in control slot `slot`.
    Eager { slot: usize, hdr: Hdr },
    /// An RTS.
    Rts(Hdr),
}

enum Phase {
    /// Sending this side's addresses and waiting for the peer's on the side channel (the
    /// buffers stay here until both requests complete).
    Handshake {
        sreq: Request,
        rreq: Request,
        _out: Vec<u8>,
        buf: Vec<u8>,
    },
    Ready,
}

/// An ib connection (see the module docs).
pub struct IbConn {
    // Drop order matters: queue pairs before the completion queue, memory regions before the
    // NIC (the regions deregister in their own Drop through `nic`).
    qps: Vec<Box<dyn Qp>>,
    cq: Box<dyn Cq>,
    ctrl_recv: OwnedMr,
    ctrl_send: OwnedMr,
    send_stage: Option<Staging>,
    recv_stage: Option<Staging>,
    nic: Arc<dyn Nic>,
    regs: Arc<RegTable>,
    side: Box<dyn crate::Conn>,
    phase: Phase,
    params: ConnectParams,
    peer: String,
    /// Data QPs in use (min of both sides).
    ndata: usize,
    error: Option<NetError>,
    peer_closed: Option<NetError>,
    // Control flow.
    credits: usize,
    to_return: usize,
    free_send_slots: Vec<usize>,
    /// Per control send slot: the eager message it carries (`NO_MSG`: none), completed by
    /// the slot's SEND completion.
    slot_msg: Vec<u64>,
    ctrl_out: VecDeque<Hdr>,
    unexpected: HashMap<u64, Unexpected>,
    // Sends.
    sends: ReqTable,
    send_q: VecDeque<SendMsg>,
    send_seq: u64,
    windows_in: HashMap<u64, VecDeque<PeerWindow>>,
    stored_windows: usize,
    writes_out: Vec<usize>,
    // Receives.
    recvs: ReqTable,
    recv_q: VecDeque<RecvMsg>,
    recv_seq: u64,
    my_windows: HashMap<u32, MyWindow>,
    next_win: u32,
    data_posted: Vec<usize>,
    bytes_tx: u64,
    bytes_rx: u64,
    /// Bytes written from / landed in registered memory without a staging copy.
    zc_tx: u64,
    zc_rx: u64,
    wcs: Vec<Wc>,
    /// Test hook: rewrites every CTS this side sends (a corrupted rkey or address).
    #[cfg(test)]
    pub(crate) corrupt_cts: Option<fn(&mut u32, &mut u64)>,
}

// SAFETY: the raw pointers inside SendMsg/RecvMsg are the caller's buffers, which the Conn
// contract (isend/irecv safety) keeps valid and unaliased until completion or drop; the
// connection is used by one thread at a time (Conn: Send, not Sync).
unsafe impl Send for IbConn {}

fn nic_err(e: super::nic::NicError) -> NetError {
    NetError::Io {
        op: e.op,
        msg: e.msg,
    }
}

impl IbConn {
    /// A connection over the authenticated side channel `side`: creates the queue pairs, posts
    /// the control receive slots and sends this side's addresses; the peer's are read by
    /// [`Conn::progress`].
    pub(crate) fn new(
        nic: Arc<dyn Nic>,
        regs: Arc<RegTable>,
        mut side: Box<dyn Conn>,
        qps: usize,
        params: ConnectParams,
        deadline: std::time::Instant,
    ) -> NetResult<IbConn> {
        let qps = qps.clamp(1, MAX_QPS);
        let depth = (SLOTS + SPARE) * 2 + qps * DATA_DEPTH * 2 + 64;
        let cq = nic.create_cq(depth as u32).map_err(nic_err)?;
        let mut qp_v: Vec<Box<dyn Qp>> = Vec::with_capacity(qps + 1);
        qp_v.push(
            nic.create_qp(
                cq.as_ref(),
                (SLOTS + SPARE) as u32 + 4,
                (SLOTS + SPARE) as u32 + 4,
            )
            .map_err(nic_err)?,
        );
        for _ in 0..qps {
            qp_v.push(
                nic.create_qp(cq.as_ref(), DATA_DEPTH as u32 + 4, DATA_DEPTH as u32 + 4)
                    .map_err(nic_err)?,
            );
        }
        let ctrl_recv = OwnedMr::new(&nic, (SLOTS + SPARE) * SLOT)?;
        let ctrl_send = OwnedMr::new(&nic, (SLOTS + SPARE) * SLOT)?;
        for i in 0..SLOTS + SPARE {
            qp_v[0]
                .post_recv(
                    W_CRECV | i as u64,
                    Some(Sge {
                        addr: ctrl_recv.addr(i * SLOT),
                        len: SLOT as u32,
                        lkey: ctrl_recv.mr.lkey,
                    }),
                )
                .map_err(nic_err)?;
        }
        let addrs: Vec<QpAddr> = qp_v.iter().map(|q| q.addr()).collect();
        let hs = encode_handshake(&addrs, qps)?;
        let peer = side.peer_desc();
        // SAFETY: `hs` is a heap buffer moved into the Handshake phase of the returned
        // connection (moving a Vec does not move its heap data); it stays there until the
        // send completed (or the connection is dropped, which drops the side channel first).
        let sreq = unsafe { side.isend(HS_TAG, &[0; META_LEN], hs.as_ptr(), hs.len()) }?
            .ok_or_else(|| NetError::Protocol("side channel refused the handshake".into()))?;
        let mut buf = vec![0u8; HS_LEN];
        // SAFETY: as for `hs`: `buf` lives in the Handshake phase until the receive completes.
        let rreq = unsafe { side.irecv(HS_TAG, buf.as_mut_ptr(), HS_LEN) }?
            .ok_or_else(|| NetError::Protocol("side channel refused the handshake".into()))?;
        let mut c = IbConn {
            qps: qp_v,
            cq,
            ctrl_recv,
            ctrl_send,
            send_stage: None,
            recv_stage: None,
            nic,
            regs,
            side,
            phase: Phase::Handshake {
                sreq,
                rreq,
                _out: hs,
                buf,
            },
            params,
            peer,
            ndata: qps,
            error: None,
            peer_closed: None,
            credits: SLOTS,
            to_return: 0,
            free_send_slots: (0..SLOTS + SPARE).rev().collect(),
            slot_msg: vec![NO_MSG; SLOTS + SPARE],
            ctrl_out: VecDeque::new(),
            unexpected: HashMap::new(),
            sends: ReqTable::default(),
            send_q: VecDeque::new(),
            send_seq: 0,
            windows_in: HashMap::new(),
            stored_windows: 0,
            writes_out: vec![0; qps],
            recvs: ReqTable::default(),
            recv_q: VecDeque::new(),
            recv_seq: 0,
            my_windows: HashMap::new(),
            next_win: 0,
            data_posted: vec![0; qps],
            bytes_tx: 0,
            bytes_rx: 0,
            zc_tx: 0,
            zc_rx: 0,
            #[cfg(test)]
            corrupt_cts: None,
            wcs: vec![
                Wc {
                    wr_id: 0,
                    status: 0,
                    opcode: WcOpcode::Send,
                    byte_len: 0,
                    imm: None,
                    qpn: 0,
                };
                64
            ],
        };
        // The peer sends its addresses as soon as it is connected: wait for them (bounded), so
        // that the connection is ready when it is handed out.
        let mut fds = Vec::new();
        let mut scratch = Vec::new();
        loop {
            c.side.progress()?;
            if c.finish_handshake()? {
                return Ok(c);
            }
            if std::time::Instant::now() >= deadline {
                return Err(NetError::Timeout(format!(
                    "the ib handshake with {} did not finish",
                    c.peer
                )));
            }
            fds.clear();
            c.side.poll_fds(&mut fds);
            crate::wait_fds(&fds, std::time::Duration::from_millis(10), &mut scratch)?;
        }
    }

    fn check(&self) -> NetResult<()> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        Ok(())
    }

    fn fail(&mut self, e: NetError) -> NetError {
        if self.error.is_none() {
            tracing::debug!(target: "braid::ib", "connection to {}: {e}", self.peer);
            self.error = Some(e.clone());
        }
        self.error.clone().unwrap_or(e)
    }

    /// Completes the handshake once the peer's addresses are in: connects the queue pairs.
    fn finish_handshake(&mut self) -> NetResult<bool> {
        let Phase::Handshake {
            sreq, rreq, buf, ..
        } = &self.phase
        else {
            return Ok(false);
        };
        let (sreq, rreq) = (*sreq, *rreq);
        if self.side.test(rreq)?.is_none() || self.side.test(sreq)?.is_none() {
            return Ok(false);
        }
        let (their_qps, addrs) = decode_handshake(buf)?;
        self.ndata = self.ndata.min(their_qps);
        for (i, a) in addrs.iter().enumerate().take(self.ndata + 1) {
            self.qps[i].connect(a, &self.params).map_err(|e| {
                NetError::Unavailable(format!("connecting queue pair {i} to {}: {e}", self.peer))
            })?;
        }
        self.phase = Phase::Ready;
        // Watch the side channel for goodbye, abort and hang-up.
        // SAFETY: a zero-length receive writes nothing (the peer never sends WATCH_TAG; a
        // message that arrived instead would be reported as a mismatch, not written).
        let _ = unsafe {
            self.side
                .irecv(WATCH_TAG, std::ptr::NonNull::<u8>::dangling().as_ptr(), 0)
        }?;
        Ok(true)
    }

    fn stage_mem<'a>(
        nic: &Arc<dyn Nic>,
        st: &'a mut Option<Staging>,
    ) -> NetResult<&'a mut Staging> {
        if st.is_none() {
            *st = Some(Staging {
                mem: OwnedMr::new(nic, STAGES * CHUNK)?,
                free: (0..STAGES).rev().collect(),
            });
        }
        st.as_mut()
            .ok_or_else(|| NetError::Protocol("staging unavailable".into()))
    }

    // ---------------------------------------------------------------- control messages

    /// Sends queued control messages while credits and slots allow; CREDIT-only when owed.
    fn pump_ctrl(&mut self) -> NetResult<bool> {
        let mut moved = false;
        while let Some(h) = self.ctrl_out.front().copied() {
            if self.credits == 0 || self.free_send_slots.is_empty() {
                break;
            }
            self.ctrl_out.pop_front();
            self.credits -= 1;
            self.post_ctrl(h, None)?;
            moved = true;
        }
        if self.to_return >= SLOTS / 2 && !self.free_send_slots.is_empty() {
            self.post_ctrl(
                Hdr {
                    kind: K_CREDIT,
                    ..Hdr::default()
                },
                None,
            )?;
            moved = true;
        }
        Ok(moved)
    }

    /// Posts one control message (header + optional eager payload) from a send slot.
    /// Sends control message `h` (with an eager payload); returns the send slot it used.
    fn post_ctrl(&mut self, mut h: Hdr, payload: Option<(*const u8, usize)>) -> NetResult<usize> {
        let slot = self
            .free_send_slots
            .pop()
            .ok_or_else(|| NetError::Protocol("no control send slot".into()))?;
        h.credits = self.to_return as u32;
        self.to_return = 0;
        #[cfg(test)]
        if let (K_CTS, Some(f)) = (h.kind, self.corrupt_cts) {
            f(&mut h.rkey, &mut h.addr);
        }
        let base = slot * SLOT;
        h.encode(&mut self.ctrl_send.mem[base..base + HDR]);
        let mut n = HDR;
        if let Some((p, len)) = payload {
            if len > 0 {
                // SAFETY: the caller's buffer holds `len` (<= EAGER_MAX) readable bytes (isend
                // contract); the slot holds SLOT = HDR + EAGER_MAX bytes.
                let src = unsafe { std::slice::from_raw_parts(p, len) };
                self.ctrl_send.mem[base + HDR..base + HDR + len].copy_from_slice(src);
            }
            n += len;
        }
        let wr = SendWr {
            wr_id: W_CSEND | slot as u64,
            op: SendOp::Send,
            sge: Some(Sge {
                addr: self.ctrl_send.addr(base),
                len: n as u32,
                lkey: self.ctrl_send.mr.lkey,
            }),
            signaled: true,
        };
        if let Err(e) = self.qps[0].post_send(&wr) {
            self.free_send_slots.push(slot);
            return Err(nic_err(e));
        }
        Ok(slot)
    }

    /// Reposts control receive slot `slot` and owes the peer a credit if it was a normal one.
    fn repost_ctrl(&mut self, slot: usize, credit: bool) -> NetResult<()> {
        self.qps[0]
            .post_recv(
                W_CRECV | slot as u64,
                Some(Sge {
                    addr: self.ctrl_recv.addr(slot * SLOT),
                    len: SLOT as u32,
                    lkey: self.ctrl_recv.mr.lkey,
                }),
            )
            .map_err(nic_err)?;
        if credit {
            self.to_return += 1;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- completions

    fn on_wc(&mut self, wc: Wc) -> NetResult<()> {
        if wc.status != status::SUCCESS {
            let what = match wc.wr_id & W_KIND {
                W_CRECV | W_DRECV => "receive",
                W_CSEND => "control send",
                _ => "RDMA write",
            };
            let s = self.nic.status_str(wc.status);
            let e = if wc.status == status::RETRY_EXC_ERR || wc.status == status::WR_FLUSH_ERR {
                NetError::Lost(format!(
                    "{what} to {} failed: {s} (status {}; peer dead or unreachable)",
                    self.peer, wc.status
                ))
            } else {
                NetError::Protocol(format!(
                    "{what} to {} failed: {s} (status {})",
                    self.peer, wc.status
                ))
            };
            return Err(e);
        }
        let low = wc.wr_id & !W_KIND;
        match wc.wr_id & W_KIND {
            W_CSEND => {
                let slot = low as usize;
                let msg = self
                    .slot_msg
                    .get_mut(slot)
                    .map_or(NO_MSG, |m| std::mem::replace(m, NO_MSG));
                self.free_send_slots.push(slot);
                if msg != NO_MSG {
                    self.eager_delivered(msg);
                }
                Ok(())
            }
            W_CRECV => self.on_ctrl(low as usize, wc.byte_len as usize),
            W_DRECV => self.on_chunk(low as usize, wc),
            W_WRITE => self.on_write_done(low),
            _ => Err(NetError::Protocol(format!(
                "completion with unknown id {:#x}",
                wc.wr_id
            ))),
        }
    }

    fn on_ctrl(&mut self, slot: usize, n: usize) -> NetResult<()> {
        if slot >= SLOTS + SPARE || !(HDR..=SLOT).contains(&n) {
            return Err(NetError::Protocol(format!(
                "control message of {n} bytes in slot {slot} from {}",
                self.peer
            )));
        }
        let base = slot * SLOT;
        let h = Hdr::decode(&self.ctrl_recv.mem[base..base + HDR])?;
        self.credits = self
            .credits
            .checked_add(h.credits as usize)
            .filter(|c| *c <= SLOTS)
            .ok_or_else(|| {
                NetError::Protocol(format!(
                    "{} returned more credits than it was given",
                    self.peer
                ))
            })?;
        match h.kind {
            K_CREDIT => self.repost_ctrl(slot, false),
            K_CTS => {
                self.repost_ctrl(slot, true)?;
                self.on_cts(h)
            }
            K_RTS => {
                self.repost_ctrl(slot, true)?;
                if self.seen(h.seq) {
                    return Err(NetError::Protocol(format!(
                        "duplicate message {} from {}",
                        h.seq, self.peer
                    )));
                }
                self.unexpected.insert(h.seq, Unexpected::Rts(h));
                self.match_recvs()
            }
            _ => {
                if h.len as usize != n - HDR {
                    return Err(NetError::Protocol(format!(
                        "eager message of {} bytes announces {}",
                        n - HDR,
                        h.len
                    )));
                }
                if self.seen(h.seq) {
                    return Err(NetError::Protocol(format!(
                        "duplicate message {} from {}",
                        h.seq, self.peer
                    )));
                }
                self.unexpected
                    .insert(h.seq, Unexpected::Eager { slot, hdr: h });
                self.match_recvs()
            }
        }
    }

    /// Whether the next message (no receive posted) arrived whole: an eager one.
    fn next_arrived(&self) -> bool {
        self.recv_q.is_empty()
            && matches!(
                self.unexpected.get(&self.recv_seq),
                Some(Unexpected::Eager { .. })
            )
    }

    /// Whether the header of message `seq` arrived before (a peer that repeats one is broken).
    fn seen(&self, seq: u64) -> bool {
        let done_below = self.recv_q.front().map(|r| r.seq).unwrap_or(self.recv_seq);
        seq < done_below
            || self.unexpected.contains_key(&seq)
            || self
                .recv_q
                .get((seq - done_below) as usize)
                .is_some_and(|r| r.matched)
    }

    /// Matches posted receives with the headers that arrived for them.
    fn match_recvs(&mut self) -> NetResult<()> {
        let mut i = 0;
        while i < self.recv_q.len() {
            let (seq, matched) = (self.recv_q[i].seq, self.recv_q[i].matched);
            i += 1;
            if matched {
                continue;
            }
            let Some(u) = self.unexpected.remove(&seq) else {
                continue;
            };
            let r = &mut self.recv_q[i - 1];
            let (h, eager_slot) = match u {
                Unexpected::Eager { slot, hdr } => (hdr, Some(slot)),
                Unexpected::Rts(h) => (h, None),
            };
            let wants_eager = r.len <= EAGER_MAX;
            if h.tag != r.tag || h.len != r.len as u64 || wants_eager != eager_slot.is_some() {
                return Err(NetError::Mismatch {
                    expected_tag: r.tag,
                    expected_len: r.len as u64,
                    got_tag: h.tag,
                    got_len: h.len,
                    meta: h.meta,
                });
            }
            r.matched = true;
            self.recvs.set_meta(r.seq, h.meta);
            if let Some(slot) = eager_slot {
                if r.len > 0 {
                    let base = slot * SLOT + HDR;
                    // SAFETY: the receive's buffer holds r.len writable bytes (irecv
                    // contract); the slot holds the eager payload of exactly r.len bytes.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            self.ctrl_recv.mem.as_ptr().add(base),
                            r.buf,
                            r.len,
                        )
                    };
                }
                r.received = r.len;
                self.bytes_rx += r.len as u64;
                self.repost_ctrl(slot, true)?;
            }
        }
        self.complete_recvs();
        Ok(())
    }

    fn complete_recvs(&mut self) {
        for r in self.recv_q.iter_mut() {
            if !r.done && r.matched && r.received == r.len {
                r.done = true;
                self.recvs.part_done(r.seq);
            }
        }
        while self.recv_q.front().is_some_and(|r| r.done) {
            self.recv_q.pop_front();
        }
    }

    fn on_cts(&mut self, h: Hdr) -> NetResult<()> {
        if h.seq < self.sends_base_seq() {
            return Err(NetError::Protocol(format!(
                "{} advertised a window for message {} which is complete",
                self.peer, h.seq
            )));
        }
        if self.stored_windows >= MAX_STORED_WINDOWS {
            return Err(NetError::Protocol(format!(
                "{} advertised more than {MAX_STORED_WINDOWS} windows ahead",
                self.peer
            )));
        }
        let end = h.off.checked_add(h.wlen);
        if end.is_none() || end > Some(h.len) || h.wlen == 0 {
            return Err(NetError::Protocol(format!(
                "{} advertised a window [{}, +{}) outside its message of {} bytes",
                self.peer, h.off, h.wlen, h.len
            )));
        }
        self.stored_windows += 1;
        self.windows_in
            .entry(h.seq)
            .or_default()
            .push_back(PeerWindow {
                tag: h.tag,
                total: h.len,
                off: h.off,
                len: h.wlen,
                addr: h.addr,
                rkey: h.rkey,
                win: h.win,
                posted: 0,
            });
        Ok(())
    }

    fn sends_base_seq(&self) -> u64 {
        self.send_q.front().map(|s| s.seq).unwrap_or(self.send_seq)
    }

    fn on_chunk(&mut self, qp: usize, wc: Wc) -> NetResult<()> {
        if qp >= self.ndata || wc.opcode != WcOpcode::RecvRdmaWithImm {
            return Err(NetError::Protocol(format!(
                "unexpected data completion on queue pair {qp} from {}",
                self.peer
            )));
        }
        self.data_posted[qp] = self.data_posted[qp].saturating_sub(1);
        let win = wc.imm.unwrap_or(u32::MAX);
        let Some(w) = self.my_windows.get_mut(&win) else {
            return Err(NetError::Protocol(format!(
                "{} wrote into unknown window {win}",
                self.peer
            )));
        };
        w.got += 1;
        if w.stage.is_some() {
            self.bytes_rx += wc.byte_len as u64;
        } else {
            self.zc_rx += wc.byte_len as u64;
        }
        if w.got < w.chunks {
            return Ok(());
        }
        let Some(w) = self.my_windows.remove(&win) else {
            return Ok(());
        };
        let Some(r) = self.recv_q.iter_mut().find(|r| r.seq == w.seq) else {
            return Err(NetError::Protocol(format!("window {win} of no receive")));
        };
        if let (Some(s), Some(st)) = (w.stage, self.recv_stage.as_mut()) {
            // SAFETY: the window lies inside the receive's buffer (checked when advertised)
            // and the staging slot holds w.len <= CHUNK bytes the peer wrote.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    st.mem.mem.as_ptr().add(s * CHUNK),
                    r.buf.add(w.off),
                    w.len,
                )
            };
            st.free.push(s);
        }
        r.received += w.len;
        self.complete_recvs();
        Ok(())
    }

    fn on_write_done(&mut self, low: u64) -> NetResult<()> {
        let (stage, qp, len, seq) = unpack_write(low);
        if stage > 0 {
            if let Some(st) = self.send_stage.as_mut() {
                st.free.push(stage - 1);
            }
        }
        if let Some(n) = self.writes_out.get_mut(qp) {
            *n = n.saturating_sub(1);
        }
        let Some(s) = self
            .send_q
            .iter_mut()
            .find(|s| s.seq & SEQ_MASK == seq && !s.done)
        else {
            return Err(NetError::Protocol(format!(
                "write completion of no message ({seq})"
            )));
        };
        s.written += len;
        if stage > 0 {
            self.bytes_tx += len as u64;
        } else {
            self.zc_tx += len as u64;
        }
        self.complete_sends();
        Ok(())
    }

    /// Eager message `seq` reached the peer (its SEND completed): its send is complete.
    fn eager_delivered(&mut self, seq: u64) {
        let base = self.sends_base_seq();
        if let Some(s) = seq
            .checked_sub(base)
            .and_then(|i| self.send_q.get_mut(i as usize))
        {
            if s.seq == seq && !s.done {
                s.done = true;
                self.sends.part_done(seq);
            }
        }
        while self.send_q.front().is_some_and(|s| s.done) {
            self.send_q.pop_front();
        }
    }

    fn complete_sends(&mut self) {
        for s in self.send_q.iter_mut() {
            if !s.done && s.started && s.written == s.len && s.len > EAGER_MAX {
                s.done = true;
                self.sends.part_done(s.seq);
            }
        }
        while self.send_q.front().is_some_and(|s| s.done) {
            self.send_q.pop_front();
        }
    }

    // ---------------------------------------------------------------- driving work

    /// Starts sends (eager data or RTS) in order, then posts writes for advertised windows.
    fn pump_sends(&mut self) -> NetResult<bool> {
        let mut moved = false;
        // Start messages in order (credits permitting).
        for i in 0..self.send_q.len() {
            if self.send_q[i].started {
                continue;
            }
            if self.credits == 0 || self.free_send_slots.is_empty() || !self.ctrl_out.is_empty() {
                break;
            }
            let s = &self.send_q[i];
            let h = Hdr {
                kind: if s.len <= EAGER_MAX { K_EAGER } else { K_RTS },
                seq: s.seq,
                tag: s.tag,
                len: s.len as u64,
                meta: s.meta,
                ..Hdr::default()
            };
            let payload = (s.len <= EAGER_MAX).then_some((s.buf, s.len));
            self.credits -= 1;
            let slot = self.post_ctrl(h, payload)?;
            let s = &mut self.send_q[i];
            s.started = true;
            if s.len <= EAGER_MAX {
                self.slot_msg[slot] = s.seq;
                self.bytes_tx += s.len as u64;
            }
            moved = true;
        }
        // Writes into the windows the peer advertised, oldest message first.
        for i in 0..self.send_q.len() {
            let (seq, tag, len) = (self.send_q[i].seq, self.send_q[i].tag, self.send_q[i].len);
            if len <= EAGER_MAX || !self.send_q[i].started {
                continue;
            }
            while let Some(w) = self.windows_in.get_mut(&seq).and_then(|q| q.front_mut()) {
                if w.tag != tag || w.total != len as u64 {
                    let e = NetError::Protocol(format!(
                        "{} posted a receive of tag {} and {} bytes for message {seq}; this side sends tag {tag} and {len} bytes",
                        self.peer, w.tag, w.total
                    ));
                    return Err(e);
                }
                let wcopy = *w;
                let j = (wcopy.posted as usize).div_ceil(CHUNK);
                let qp = (wcopy.win as usize + j) % self.ndata;
                if self.writes_out[qp] >= DATA_DEPTH {
                    return Ok(moved);
                }
                let clen = (wcopy.len - wcopy.posted).min(CHUNK as u64) as usize;
                let src_off = (wcopy.off + wcopy.posted) as usize;
                let s = &self.send_q[i];
                // SAFETY: src_off + clen <= len (the window lies inside the message, checked
                // against the total above and when it arrived); the caller's buffer is valid.
                let src = unsafe { s.buf.add(src_off) };
                let (sge, stage) = match s.lkey {
                    Some(lkey) => (
                        Sge {
                            addr: src as u64,
                            len: clen as u32,
                            lkey,
                        },
                        0usize,
                    ),
                    None => {
                        let st = Self::stage_mem(&self.nic, &mut self.send_stage)?;
                        let Some(k) = st.free.pop() else {
                            return Ok(moved);
                        };
                        // SAFETY: the source range is inside the caller's buffer (above); the
                        // staging slot holds CHUNK >= clen bytes.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                src,
                                st.mem.mem.as_mut_ptr().add(k * CHUNK),
                                clen,
                            )
                        };
                        (
                            Sge {
                                addr: st.mem.addr(k * CHUNK),
                                len: clen as u32,
                                lkey: st.mem.mr.lkey,
                            },
                            k + 1,
                        )
                    }
                };
                let wr = SendWr {
                    wr_id: W_WRITE | pack_write(stage, qp, clen, seq),
                    op: SendOp::WriteImm {
                        remote_addr: wcopy.addr + wcopy.posted,
                        rkey: wcopy.rkey,
                        imm: wcopy.win,
                    },
                    sge: Some(sge),
                    signaled: true,
                };
                if let Err(e) = self.qps[1 + qp].post_send(&wr) {
                    if stage > 0 {
                        if let Some(st) = self.send_stage.as_mut() {
                            st.free.push(stage - 1);
                        }
                    }
                    return Err(nic_err(e));
                }
                self.writes_out[qp] += 1;
                self.send_q[i].posted += clen;
                moved = true;
                let q = self.windows_in.get_mut(&seq);
                if let Some(q) = q {
                    if let Some(w) = q.front_mut() {
                        w.posted += clen as u64;
                        if w.posted == w.len {
                            q.pop_front();
                            self.stored_windows = self.stored_windows.saturating_sub(1);
                        }
                    }
                    if q.is_empty() {
                        self.windows_in.remove(&seq);
                    }
                }
            }
        }
        Ok(moved)
    }

    /// Advertises windows of posted large receives while budgets allow.
    fn pump_windows(&mut self) -> NetResult<bool> {
        let mut moved = false;
        for i in 0..self.recv_q.len() {
            loop {
                let r = &self.recv_q[i];
                if r.len <= EAGER_MAX || r.advertised == r.len {
                    break;
                }
                if self.my_windows.len() >= MAX_WINDOWS || self.ctrl_out.len() >= SLOTS {
                    return Ok(moved);
                }
                let (off, seq, tag, total) = (r.advertised, r.seq, r.tag, r.len);
                let (wlen, addr, rkey, stage) = match r.mr {
                    Some(mr) => {
                        let wlen = (total - off).min(WINDOW_MAX);
                        (wlen, r.buf as u64 + off as u64, mr.rkey, None)
                    }
                    None => {
                        let st = Self::stage_mem(&self.nic, &mut self.recv_stage)?;
                        let Some(k) = st.free.pop() else {
                            return Ok(moved);
                        };
                        let wlen = (total - off).min(CHUNK);
                        (wlen, st.mem.addr(k * CHUNK), st.mem.mr.rkey, Some(k))
                    }
                };
                let win = self.next_win;
                let chunks = wlen.div_ceil(CHUNK);
                // The receives the writes of this window consume, per data QP.
                let mut need = vec![0usize; self.ndata];
                for j in 0..chunks {
                    need[(win as usize + j) % self.ndata] += 1;
                }
                if need
                    .iter()
                    .enumerate()
                    .any(|(q, n)| self.data_posted[q] + n > DATA_DEPTH)
                {
                    if let (Some(k), Some(st)) = (stage, self.recv_stage.as_mut()) {
                        st.free.push(k);
                    }
                    return Ok(moved);
                }
                for (q, n) in need.iter().enumerate() {
                    for _ in 0..*n {
                        self.qps[1 + q]
                            .post_recv(W_DRECV | q as u64, None)
                            .map_err(nic_err)?;
                        self.data_posted[q] += 1;
                    }
                }
                self.next_win = self.next_win.wrapping_add(1);
                self.my_windows.insert(
                    win,
                    MyWindow {
                        seq,
                        off,
                        len: wlen,
                        chunks,
                        got: 0,
                        stage,
                    },
                );
                self.ctrl_out.push_back(Hdr {
                    kind: K_CTS,
                    seq,
                    tag,
                    len: total as u64,
                    off: off as u64,
                    wlen: wlen as u64,
                    addr,
                    rkey,
                    win,
                    ..Hdr::default()
                });
                self.recv_q[i].advertised += wlen;
                moved = true;
            }
        }
        Ok(moved)
    }

    fn poll_cq(&mut self) -> NetResult<bool> {
        let mut moved = false;
        loop {
            let mut wcs = std::mem::take(&mut self.wcs);
            let n = self.cq.poll(&mut wcs).map_err(nic_err);
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    self.wcs = wcs;
                    return Err(e);
                }
            };
            let mut res = Ok(());
            let mut failed_wc = false;
            for wc in wcs.iter().take(n) {
                failed_wc = wc.status != status::SUCCESS;
                res = self.on_wc(*wc);
                if res.is_err() {
                    break;
                }
            }
            self.wcs = wcs;
            if let Err(e) = res {
                if !failed_wc {
                    return Err(e);
                }
                // A failed work request usually means the peer went away: its side channel
                // says how (goodbye, abort, or death) better than a flushed completion does.
                return match self.side_verdict() {
                    Some(NetError::Closed(m)) if self.pending() == 0 => {
                        self.peer_closed = Some(NetError::Closed(m));
                        Ok(moved)
                    }
                    Some(se) => Err(se),
                    None => Err(e),
                };
            }
            if n == 0 {
                return Ok(moved);
            }
            moved = true;
        }
    }

    /// What the side channel says within a short grace period (None: nothing wrong there).
    fn side_verdict(&mut self) -> Option<NetError> {
        let end = std::time::Instant::now() + std::time::Duration::from_millis(200);
        loop {
            if let Err(e) = self.side.progress() {
                return Some(e);
            }
            if std::time::Instant::now() >= end {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn drive(&mut self) -> NetResult<bool> {
        let mut moved = false;
        // The side channel: handshake, then goodbye / abort / hang-up. Its error is acted on
        // after the completion queue is drained, so that data that arrived before a goodbye
        // is still delivered.
        let mut side_err = None;
        if self.peer_closed.is_none() {
            match self.side.progress() {
                Ok(m) => moved |= m,
                Err(e) => side_err = Some(e),
            }
        }
        if let Phase::Handshake { .. } = self.phase {
            if let Some(e) = side_err {
                return Err(e);
            }
            if !self.finish_handshake()? {
                return Ok(moved);
            }
            moved = true;
        }
        if let Some(e) = &self.peer_closed {
            // Idle after a goodbye is fine; after a death, only while a message that arrived
            // before it waits to be received.
            let lost = matches!(e, NetError::Lost(_)) && !self.next_arrived();
            return if self.pending() > 0 || lost {
                Err(e.clone())
            } else {
                Ok(moved)
            };
        }
        let _ = self.cq.take_event();
        loop {
            let mut again = self.poll_cq()?;
            again |= self.pump_windows()?;
            again |= self.pump_ctrl()?;
            again |= self.pump_sends()?;
            again |= self.pump_ctrl()?;
            moved |= again;
            if again {
                continue;
            }
            // Arm, then look once more: a completion between the last poll and the arming
            // raises no event.
            self.cq.arm().map_err(nic_err)?;
            if !self.poll_cq()? || self.peer_closed.is_some() {
                break;
            }
            moved = true;
        }
        let busy = self.sends.pending() + self.recvs.pending() > 0;
        if !moved && busy {
            tracing::trace!(target: "braid::ib", "[{}] idle: sends {} recvs {} credits {} to_return {} free_slots {} ctrl_out {} unexpected {} send_q {:?} recv_q {:?} windows_in {} my_windows {} data_posted {:?} writes_out {:?}",
                self.peer, self.sends.pending(), self.recvs.pending(), self.credits, self.to_return, self.free_send_slots.len(), self.ctrl_out.len(), self.unexpected.len(),
                self.send_q.iter().take(3).map(|s| (s.seq, s.len, s.started, s.posted, s.written)).collect::<Vec<_>>(),
                self.recv_q.iter().take(3).map(|r| (r.seq, r.len, r.matched, r.advertised, r.received)).collect::<Vec<_>>(),
                self.windows_in.len(), self.my_windows.len(), self.data_posted, self.writes_out);
        }
        if let Some(e) = side_err {
            // A goodbye, or a death with a whole message still to receive: kept, and reported
            // when something is posted that the peer cannot serve any more.
            let keep = matches!(e, NetError::Closed(_))
                || (matches!(e, NetError::Lost(_)) && self.next_arrived());
            if keep && !busy {
                self.peer_closed = Some(e);
            } else {
                return Err(e);
            }
        }
        if let Some(e) = &self.peer_closed {
            if busy {
                return Err(e.clone());
            }
        }
        Ok(moved)
    }

    /// Drives until every posted send completed and every control message left (bounded).
    fn flush(&mut self, within: std::time::Duration) {
        let end = std::time::Instant::now() + within;
        while std::time::Instant::now() < end {
            let idle = self.send_q.is_empty()
                && self.ctrl_out.is_empty()
                && self.free_send_slots.len() == SLOTS + SPARE;
            if idle || self.error.is_some() || self.progress().is_err() {
                return;
            }
            std::thread::yield_now();
        }
    }
}

impl Conn for IbConn {
    unsafe fn isend(
        &mut self,
        tag: u64,
        meta: &Meta,
        buf: *const u8,
        len: usize,
    ) -> NetResult<Option<Request>> {
        self.check()?;
        if let Some(e) = &self.peer_closed {
            return Err(e.clone());
        }
        if self.sends.pending() >= MAX_POSTED {
            return Ok(None);
        }
        let lkey = if len > EAGER_MAX {
            self.regs.find(buf as u64, len).map(|mr| mr.lkey)
        } else {
            None
        };
        let seq = self.sends.post(1);
        debug_assert_eq!(seq, self.send_seq);
        self.send_seq += 1;
        self.send_q.push_back(SendMsg {
            seq,
            tag,
            meta: *meta,
            buf,
            len,
            lkey,
            started: false,
            posted: 0,
            written: 0,
            done: false,
        });
        // Start it now (eager data leaves at once, as tcp writes at once). An error here is
        // sticky and reported by `test` / `progress`, as for any other posted request.
        let _ = self.progress();
        Ok(Some(Request { send: true, seq }))
    }

    unsafe fn irecv(&mut self, tag: u64, buf: *mut u8, len: usize) -> NetResult<Option<Request>> {
        self.check()?;
        if let Some(e) = &self.peer_closed {
            // A message that arrived whole before the peer went is still received.
            if !self.next_arrived() {
                return Err(e.clone());
            }
        }
        if self.recvs.pending() >= MAX_POSTED {
            return Ok(None);
        }
        let mr = if len > EAGER_MAX {
            self.regs.find(buf as u64, len)
        } else {
            None
        };
        let seq = self.recvs.post(1);
        self.recv_seq += 1;
        self.recv_q.push_back(RecvMsg {
            seq,
            tag,
            buf,
            len,
            mr,
            matched: false,
            advertised: 0,
            received: 0,
            done: false,
        });
        // Match a header that arrived before, and advertise windows now (errors are sticky, as
        // above).
        if let Err(e) = self.match_recvs() {
            self.fail(e);
        }
        let _ = self.progress();
        Ok(Some(Request { send: false, seq }))
    }

    fn progress(&mut self) -> NetResult<bool> {
        self.check()?;
        match self.drive() {
            Ok(m) => Ok(m),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn can_peek(&self) -> bool {
        true
    }

    /// The eager header or RTS of the next message (sequence `recv_seq`), once it arrived:
    /// it waits in `unexpected` until a receive is posted, and the sender starts every
    /// message (eager payload or RTS) without waiting for the receiver, so the header of a
    /// large message shows before any window is advertised.
    fn peek(&mut self) -> NetResult<Option<crate::Peeked>> {
        self.check()?;
        if !self.recv_q.is_empty() {
            return Ok(None);
        }
        if let Err(e) = self.drive() {
            return Err(self.fail(e));
        }
        Ok(self.unexpected.get(&self.recv_seq).map(|u| {
            let h = match u {
                Unexpected::Eager { hdr, .. } => hdr,
                Unexpected::Rts(h) => h,
            };
            crate::Peeked {
                tag: h.tag,
                len: h.len,
                meta: h.meta,
            }
        }))
    }

    fn test(&mut self, req: Request) -> NetResult<Option<Completion>> {
        let err = self.error.clone().or_else(|| self.peer_closed.clone());
        if req.send {
            self.sends.test(req, err.as_ref())
        } else {
            self.recvs.test(req, err.as_ref())
        }
    }

    fn pending(&self) -> usize {
        self.sends.pending() + self.recvs.pending()
    }

    fn poll_fds(&self, out: &mut Vec<PollFd>) {
        self.side.poll_fds(out);
        if matches!(self.phase, Phase::Ready) {
            out.push(PollFd {
                fd: self.cq.fd(),
                read: true,
                write: false,
            });
        }
    }

    fn abort(&mut self, reason: &str) {
        self.side.abort(reason);
        if self.error.is_none() {
            self.error = Some(NetError::Closed("connection aborted locally".into()));
        }
    }

    fn goodbye(&mut self) {
        // Sends posted before the goodbye still reach the peer, as on tcp.
        self.flush(std::time::Duration::from_millis(500));
        self.side.goodbye();
    }

    fn peer_desc(&self) -> String {
        format!("{} (ib)", self.peer)
    }

    fn bytes(&self) -> (u64, u64) {
        (self.bytes_tx, self.bytes_rx)
    }

    /// Bytes moved by RDMA straight from / into registered memory (no staging copy).
    fn direct_bytes(&self) -> (u64, u64) {
        (self.zc_tx, self.zc_rx)
    }
}
