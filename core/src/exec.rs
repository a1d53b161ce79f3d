//! The executor: runs a [`Plan`] (or a group of point-to-point operations) over the
//! connections to the other ranks.
//!
//! The calling thread drives everything itself (non-blocking sockets, readiness polling): after
//! a round with no progress it keeps looking for `BRAID_SPIN_US`, yielding the CPU between
//! looks (never spinning bare: a co-scheduled peer must get the CPU), then blocks in
//! `poll(2)` on every connection, so that an idle rank burns no CPU and a dead peer (hang-up on
//! any connection) is noticed at once. When a connection reports an oversubscribed host
//! ([`Conn::oversubscribed`]: more same-host ranks than CPUs) the yielding lasts longer
//! ([`OVERSUB_YIELD`]) before blocking: the peer waited for is then usually runnable but off the
//! CPU. Every wait has a deadline (`BRAID_TIMEOUT` without progress) and watches the
//! communicator's abort flag.
//!
//! Every message carries the collective's signature ([`Sig`], in the transport's meta bytes);
//! a receive whose sender's signature differs fails with both signatures named.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use braid_transport::{Conn, Meta, NetError, PollFd, Request, META_LEN};

use crate::coll::{Algo, Buf, CollKind, Op, Plan, PlanCtx, Span};
use crate::error::{Error, Result};
use crate::matcher::{set_source, Matcher, SourceSlot, ANY_SOURCE};
use crate::mem::{self, RawBuf};
use crate::reduce;
use crate::types::{DataType, ReduceOp};

/// A connection to another rank, with that rank's identity for error messages.
pub(crate) struct Peer {
    pub conn: Box<dyn Conn>,
    pub rank: usize,
    pub member: u64,
    pub host: String,
}

/// The signature of one operation; it travels with every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sig {
    pub kind: CollKind,
    pub dtype: DataType,
    pub op: ReduceOp,
    pub algo: Algo,
    pub root: u32,
    pub slice_kib: u32,
    pub count: u64,
    /// Collective sequence number, or the user's tag for point-to-point.
    pub seq: u64,
}

const SIG_VERSION: u8 = 1;

impl Sig {
    /// The signature of one all_to_allv message between two ranks: `count` elements travel
    /// this way (from the sender to the receiver), `back` the other way. Both ranks compute it
    /// for the message (the receiver from its receive and send counts for the sender), so a
    /// disagreement in either direction is caught by both ranks of the pair. `back` travels in
    /// the `root` (low half) and `slice_kib` (high half) fields, unused by all_to_allv.
    pub(crate) fn all_to_allv(dtype: DataType, count: usize, back: usize, seq: u64) -> Sig {
        let back = back as u64;
        Sig {
            kind: CollKind::AllToAllV,
            dtype,
            op: ReduceOp::Sum,
            algo: Algo::Pairwise,
            root: back as u32,
            slice_kib: (back >> 32) as u32,
            count: count as u64,
            seq,
        }
    }

    pub(crate) fn encode(&self) -> Meta {
        let mut m = [0u8; META_LEN];
        m[0] = SIG_VERSION;
        m[1] = self.kind as u8;
        m[2] = self.dtype as u8;
        m[3] = self.op as u8;
        m[4] = self.algo as u8;
        m[8..12].copy_from_slice(&self.root.to_le_bytes());
        m[12..16].copy_from_slice(&self.slice_kib.to_le_bytes());
        m[16..24].copy_from_slice(&self.count.to_le_bytes());
        m[24..32].copy_from_slice(&self.seq.to_le_bytes());
        m
    }

    pub(crate) fn decode(m: &Meta) -> Option<Sig> {
        if m[0] != SIG_VERSION {
            return None;
        }
        let u32at = |o: usize| u32::from_le_bytes([m[o], m[o + 1], m[o + 2], m[o + 3]]);
        let u64at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&m[o..o + 8]);
            u64::from_le_bytes(b)
        };
        Some(Sig {
            kind: CollKind::from_code(m[1])?,
            dtype: DataType::from_code(m[2])?,
            op: ReduceOp::from_code(m[3])?,
            algo: Algo::from_code(m[4])?,
            root: u32at(8),
            slice_kib: u32at(12),
            count: u64at(16),
            seq: u64at(24),
        })
    }

    /// Human-readable form, e.g. `all_reduce(float, sum, count=1000, algo=ring, seq=3)`.
    pub(crate) fn describe(&self) -> String {
        match self.kind {
            CollKind::P2p => format!(
                "send/recv({}, count={}, tag={})",
                self.dtype, self.count, self.seq
            ),
            CollKind::Barrier => format!("barrier(seq={})", self.seq),
            CollKind::AllToAllV => format!(
                "all_to_allv({}, count={} one way, {} the other, seq={})",
                self.dtype,
                self.count,
                self.back(),
                self.seq
            ),
            k => {
                let mut s = format!("{}({}", k.name(), self.dtype);
                if matches!(
                    k,
                    CollKind::AllReduce | CollKind::ReduceScatter | CollKind::Reduce
                ) {
                    s.push_str(&format!(", {}", self.op));
                }
                s.push_str(&format!(", count={}", self.count));
                if k.rooted() {
                    s.push_str(&format!(", root={}", self.root));
                }
                s.push_str(&format!(
                    ", algo={}, slice={}KiB, seq={})",
                    self.algo.name(),
                    self.slice_kib,
                    self.seq
                ));
                s
            }
        }
    }

    /// The count of the other direction of an all_to_allv message (see [`Sig::all_to_allv`]).
    fn back(&self) -> u64 {
        u64::from(self.root) | (u64::from(self.slice_kib) << 32)
    }

    /// As [`Sig::describe`], from the side of a rank that sends (`send`) this message to
    /// `peer` or receives it from `peer`: all_to_allv names both directions' counts.
    pub(crate) fn describe_dir(&self, send: bool, peer: usize) -> String {
        if self.kind != CollKind::AllToAllV {
            return self.describe();
        }
        let (dt, c, b, q) = (self.dtype, self.count, self.back(), self.seq);
        if send {
            format!("all_to_allv({dt}, sending {c} elements to rank {peer} and expecting {b} from it, seq={q})")
        } else {
            format!("all_to_allv({dt}, expecting {c} elements from rank {peer} and sending it {b}, seq={q})")
        }
    }

    pub(crate) fn describe_meta(m: &Meta) -> String {
        match Sig::decode(m) {
            Some(s) => s.describe(),
            None => "an unknown operation (incompatible braid version?)".into(),
        }
    }
}

/// One point-to-point operation of a group.
#[derive(Debug, Clone)]
pub(crate) struct P2pOp {
    pub send: bool,
    /// A rank, or [`ANY_SOURCE`] for a receive from any rank.
    pub peer: usize,
    pub buf: RawBuf,
    pub sig: Sig,
    /// Where a receive records the rank its message came from (any-source receives).
    pub source: Option<SourceSlot>,
}

impl P2pOp {
    /// The ranks this operation may use: its peer, or every rank but `me` for a receive from
    /// any rank of `size`.
    pub(crate) fn ranks(&self, me: usize, size: usize) -> impl Iterator<Item = usize> {
        let (lo, hi, one) = if self.peer == ANY_SOURCE {
            (0, size, None)
        } else {
            (0, 0, Some(self.peer))
        };
        (lo..hi).filter(move |&r| r != me).chain(one)
    }
}

/// How long a rank on an oversubscribed host ([`Conn::oversubscribed`]) keeps yielding the CPU
/// between looks at its connections before it blocks in `poll(2)` (at least `BRAID_SPIN_US`).
const OVERSUB_YIELD: Duration = Duration::from_millis(2);

/// Collectives of at least this many bytes per rank receive their results past the cache
/// ([`Conn::irecv_hint`]): such results are not read again soon, and writing them past the cache
/// skips reading the destination first.
const STREAM_BYTES: usize = 32 << 20;

/// Maximum receive-reduce operations in flight per peer (each holds one staging buffer).
const STAGING_PER_PEER: usize = 4;

/// Set by the membership layer while an operation may be running: the coordinator announced
/// a view without these members (declared dead, or gone), or this member lost the
/// coordinator. Waits on such peers fail at once instead of running into `BRAID_TIMEOUT`.
#[derive(Debug, Default)]
pub(crate) struct Tripwire {
    /// Any news (cheap to check).
    pub set: AtomicBool,
    /// Member ids dropped by an announced view, with the reason.
    pub dropped: std::sync::Mutex<Vec<(u64, String)>>,
    /// This member lost contact with the coordinator (it has presumably been declared dead).
    pub isolated: std::sync::Mutex<Option<String>>,
    /// How long an operation must have made no progress before isolation fails it, in ms (0:
    /// at once). Groups that are not elastic set their heartbeat timeout: nobody re-forms
    /// them, so a coordinator that went quiet (stopped, or cut off from this member) fails
    /// only operations that are stuck too, never a job that moves.
    pub isolated_after_ms: std::sync::atomic::AtomicU64,
}

impl Tripwire {
    /// Records members dropped by the membership (id, reason) and sets the wire.
    pub fn drop_members(&self, dropped: impl IntoIterator<Item = (u64, String)>) {
        if let Ok(mut d) = self.dropped.lock() {
            d.extend(dropped);
        }
        self.set.store(true, Ordering::SeqCst);
    }
}

/// Reusable executor state (one per communicator; buffers are kept between calls).
pub(crate) struct Exec {
    pub spin: Duration,
    pub timeout: Duration,
    pub abort: Arc<AtomicBool>,
    pub trip: Arc<Tripwire>,
    pub rank: usize,
    scratch: Vec<u64>,
    staging: Vec<Vec<u64>>,
    free_staging: Vec<usize>,
    pollfds: Vec<PollFd>,
    pollscratch: Vec<libc::pollfd>,
    // Per-run scratch vectors, kept to avoid allocation.
    deps_left: Vec<u32>,
    child_off: Vec<u32>,
    children: Vec<u32>,
    ready: Vec<bool>,
    work: Vec<u32>,
    fill: Vec<u32>,
    queues: Vec<PeerQ>,
    /// Point-to-point receives matched by tag and source.
    pub matcher: Matcher,
}

#[derive(Default)]
struct PeerQ {
    sends: VecDeque<u32>,
    recvs: VecDeque<u32>,
    /// (step, request, staging index or usize::MAX)
    inflight_s: VecDeque<(u32, Request)>,
    inflight_r: VecDeque<(u32, Request, usize)>,
    staging_used: usize,
}

impl PeerQ {
    fn busy(&self) -> bool {
        !self.inflight_s.is_empty() || !self.inflight_r.is_empty()
    }
}

/// Translates a transport error on the connection to `peer` into braid's error.
pub(crate) fn net_error(peer: &Peer, e: NetError, me: usize, mine: &str) -> Error {
    let who = || format!("rank {} ({})", peer.rank, peer.host);
    match e {
        NetError::Lost(d) => Error::PeerLost {
            rank: peer.rank,
            member: peer.member,
            host: peer.host.clone(),
            detail: d,
        },
        NetError::Closed(d) => Error::PeerLost {
            rank: peer.rank,
            member: peer.member,
            host: peer.host.clone(),
            detail: d,
        },
        NetError::PeerAborted(d) => Error::Remote {
            rank: peer.rank,
            host: peer.host.clone(),
            detail: d,
        },
        NetError::Mismatch {
            meta,
            got_len,
            expected_len,
            ..
        } => Error::Mismatch {
            rank: me,
            peer: peer.rank,
            local: format!("{mine} expecting {expected_len} bytes"),
            remote: format!(
                "{} sending {got_len} bytes",
                match Sig::decode(&meta) {
                    Some(s) => s.describe_dir(true, me),
                    None => Sig::describe_meta(&meta),
                }
            ),
        },
        NetError::Protocol(d) => Error::System(format!("protocol error from {}: {d}", who())),
        NetError::Timeout(d) => Error::Timeout {
            what: format!("{} ({d})", who()),
            secs: 0.0,
        },
        NetError::Io { op, msg } => Error::System(format!("{op} with {}: {msg}", who())),
        NetError::Unavailable(d) => Error::System(d),
    }
}

impl Exec {
    pub(crate) fn new(
        rank: usize,
        spin: Duration,
        timeout: Duration,
        abort: Arc<AtomicBool>,
    ) -> Exec {
        Exec {
            spin,
            timeout,
            abort,
            trip: Arc::new(Tripwire::default()),
            rank,
            scratch: Vec::new(),
            staging: Vec::new(),
            free_staging: Vec::new(),
            pollfds: Vec::new(),
            pollscratch: Vec::new(),
            deps_left: Vec::new(),
            child_off: Vec::new(),
            children: Vec::new(),
            ready: Vec::new(),
            work: Vec::new(),
            fill: Vec::new(),
            queues: Vec::new(),
            matcher: Matcher::new(),
        }
    }

    fn resolve(&mut self, bufs: &[RawBuf; 2], s: &Span) -> Result<*mut u8> {
        match s.buf {
            Buf::Send => bufs[0].at(s.off, s.len),
            Buf::Recv => bufs[1].at(s.off, s.len),
            Buf::Scratch => {
                let sb: &mut [u8] = bytemuck::cast_slice_mut(&mut self.scratch);
                RawBuf::from_mut(sb).at(s.off, s.len)
            }
        }
    }

    fn take_staging(&mut self, len: usize) -> usize {
        let words = len.div_ceil(8);
        let idx = match self.free_staging.pop() {
            Some(i) => i,
            None => {
                self.staging.push(Vec::new());
                self.staging.len() - 1
            }
        };
        if self.staging[idx].len() < words {
            self.staging[idx].resize(words, 0);
        }
        idx
    }

    /// Checks a plan before anything is sent: dependencies point backwards, spans are in
    /// bounds, nothing writes to the send buffer, peers exist.
    fn validate(&self, plan: &Plan, bufs: &[RawBuf; 2], peers: &[Option<Peer>]) -> Result<()> {
        let bad = |i: usize, what: &str| Err(Error::Internal(format!("plan step {i}: {what}")));
        let inb = |s: &Span| -> bool {
            let cap = match s.buf {
                Buf::Send => bufs[0].len(),
                Buf::Recv => bufs[1].len(),
                Buf::Scratch => plan.scratch_bytes,
            };
            s.off.checked_add(s.len).map(|e| e <= cap).unwrap_or(false)
        };
        for (i, st) in plan.steps.iter().enumerate() {
            if st.deps.iter().any(|&d| d as usize >= i) {
                return bad(i, "depends on a later step");
            }
            let (reads, writes, peer): (&[Span], Option<Span>, Option<usize>) = match &st.op {
                Op::Send { peer, src } => (std::slice::from_ref(src), None, Some(*peer)),
                Op::Recv { peer, dst } => (&[], Some(*dst), Some(*peer)),
                Op::RecvReduce { peer, acc, dst } => {
                    if acc.len != dst.len {
                        return bad(i, "acc and dst lengths differ");
                    }
                    (std::slice::from_ref(acc), Some(*dst), Some(*peer))
                }
                Op::Reduce { a, b, dst } => {
                    if a.len != dst.len || b.len != dst.len {
                        return bad(i, "operand lengths differ");
                    }
                    if !inb(a) || !inb(b) {
                        return bad(i, "span out of bounds");
                    }
                    (&[], Some(*dst), None)
                }
                Op::Copy { src, dst } => {
                    if src.len != dst.len {
                        return bad(i, "copy lengths differ");
                    }
                    (std::slice::from_ref(src), Some(*dst), None)
                }
                Op::Finalize { span } => (&[], Some(*span), None),
            };
            if reads.iter().any(|s| !inb(s)) {
                return bad(i, "span out of bounds");
            }
            if let Some(w) = writes {
                if !inb(&w) {
                    return bad(i, "span out of bounds");
                }
                if w.buf == Buf::Send && w.len > 0 {
                    return bad(i, "writes to the send buffer");
                }
            }
            if let Some(p) = peer {
                if p >= peers.len() || p == self.rank || peers[p].is_none() {
                    return bad(i, &format!("no connection to rank {p}"));
                }
            }
        }
        Ok(())
    }

    fn local_op(&mut self, ctx: &PlanCtx, bufs: &[RawBuf; 2], op: &Op) -> Result<()> {
        match op {
            Op::Copy { src, dst } => {
                let s = self.resolve(bufs, src)?;
                let d = self.resolve(bufs, dst)?;
                mem::copy(d, s, src.len);
            }
            Op::Reduce { a, b, dst } => {
                let pa = self.resolve(bufs, a)?;
                let pb = self.resolve(bufs, b)?;
                let pd = self.resolve(bufs, dst)?;
                let len = dst.len;
                if pd == pa {
                    mem::with2(pd, pb, len, |d, s| {
                        reduce::reduce_inplace(ctx.dtype, ctx.op, d, s)
                    })??;
                } else if pd == pb {
                    mem::with2(pd, pa, len, |d, s| {
                        reduce::reduce_inplace(ctx.dtype, ctx.op, d, s)
                    })??;
                } else {
                    mem::with3(pd, pa, pb, len, |d, x, y| {
                        reduce::reduce_into(ctx.dtype, ctx.op, d, x, y)
                    })??;
                }
            }
            Op::Finalize { span } => {
                let p = self.resolve(bufs, span)?;
                mem::with_mut(p, span.len, |d| {
                    reduce::finalize(ctx.dtype, ctx.op, d, ctx.size)
                })?;
            }
            _ => return Err(Error::Internal("network op executed locally".into())),
        }
        Ok(())
    }

    /// Runs this rank's plan of one collective.
    pub(crate) fn run_plan(
        &mut self,
        peers: &mut [Option<Peer>],
        ctx: &PlanCtx,
        plan: &Plan,
        bufs: [RawBuf; 2],
        sig: &Sig,
    ) -> Result<()> {
        self.validate(plan, &bufs, peers)?;
        let n = plan.steps.len();
        if n == 0 {
            return Ok(());
        }
        let words = plan.scratch_bytes.div_ceil(8);
        if self.scratch.len() < words {
            self.scratch.resize(words, 0);
        }
        let meta = sig.encode();
        let tag = sig.seq;

        // Dependency graph in CSR form.
        self.deps_left.clear();
        self.child_off.clear();
        self.child_off.resize(n + 1, 0);
        for st in &plan.steps {
            self.deps_left.push(st.deps.len() as u32);
            for &d in &st.deps {
                self.child_off[d as usize + 1] += 1;
            }
        }
        for i in 0..n {
            self.child_off[i + 1] += self.child_off[i];
        }
        self.children.clear();
        self.children.resize(self.child_off[n] as usize, 0);
        {
            let mut fill = std::mem::take(&mut self.fill);
            fill.clear();
            fill.extend_from_slice(&self.child_off[..n]);
            for (i, st) in plan.steps.iter().enumerate() {
                for &d in &st.deps {
                    self.children[fill[d as usize] as usize] = i as u32;
                    fill[d as usize] += 1;
                }
            }
            self.fill = fill;
        }
        self.ready.clear();
        self.ready.resize(n, false);
        // Per-peer queues are kept between calls (no allocation on the hot path).
        let mut queues = std::mem::take(&mut self.queues);
        queues.resize_with(peers.len(), PeerQ::default);
        for q in queues.iter_mut() {
            q.sends.clear();
            q.recvs.clear();
            q.inflight_s.clear();
            q.inflight_r.clear();
            q.staging_used = 0;
        }
        for (i, st) in plan.steps.iter().enumerate() {
            match st.op {
                Op::Send { peer, .. } => queues[peer].sends.push_back(i as u32),
                Op::Recv { peer, .. } | Op::RecvReduce { peer, .. } => {
                    queues[peer].recvs.push_back(i as u32)
                }
                _ => {}
            }
        }
        self.work.clear();
        for i in 0..n {
            if self.deps_left[i] == 0 {
                self.work.push(i as u32);
            }
        }
        // Results of a large collective are not read again soon: receives into them may go past
        // the cache; receives into staging buffers (reduced at once) never do.
        let stream = ctx.count * ctx.esize() >= STREAM_BYTES;
        let mut done = 0usize;
        // `None`: progress just now (read lazily by `idle`: no clock read per step).
        let mut last_progress: Option<Instant> = None;
        let mut last_full_sweep: Option<Instant> = None;
        let result = (|| -> Result<()> {
            loop {
                let mut progressed = false;
                // 1. Execute ready local steps; mark network steps ready.
                while let Some(i) = self.work.pop() {
                    let op = plan.steps[i as usize].op;
                    match op {
                        Op::Send { .. } | Op::Recv { .. } | Op::RecvReduce { .. } => {
                            self.ready[i as usize] = true;
                        }
                        _ => {
                            self.local_op(ctx, &bufs, &op)?;
                            done += 1;
                            self.finish(i);
                        }
                    }
                    progressed = true;
                }
                // 2. Post what can be posted, in per-peer order.
                for (p, q) in queues.iter_mut().enumerate() {
                    let Some(peer) = peers[p].as_mut() else {
                        continue;
                    };
                    while let Some(&h) = q.sends.front() {
                        if !self.ready[h as usize] {
                            break;
                        }
                        let Op::Send { src, .. } = plan.steps[h as usize].op else {
                            break;
                        };
                        let ptr = self.resolve(&bufs, &src)?;
                        // SAFETY: ptr..ptr+len is inside a live buffer of this operation (checked
                        // by resolve); the request is completed or the connection aborted
                        // before this function returns (see the end of run_plan).
                        let r = unsafe { peer.conn.isend(tag, &meta, ptr, src.len) }
                            .map_err(|e| net_error(peer, e, self.rank, &sig.describe()))?;
                        let Some(r) = r else { break };
                        q.sends.pop_front();
                        q.inflight_s.push_back((h, r));
                        progressed = true;
                    }
                    while let Some(&h) = q.recvs.front() {
                        if !self.ready[h as usize] {
                            break;
                        }
                        let (ptr, len, stg) = match plan.steps[h as usize].op {
                            Op::Recv { dst, .. } => {
                                (self.resolve(&bufs, &dst)?, dst.len, usize::MAX)
                            }
                            Op::RecvReduce { dst, .. } => {
                                if q.staging_used >= STAGING_PER_PEER {
                                    break;
                                }
                                let idx = self.take_staging(dst.len);
                                let sb: &mut [u8] =
                                    bytemuck::cast_slice_mut(&mut self.staging[idx]);
                                (sb.as_mut_ptr(), dst.len, idx)
                            }
                            _ => break,
                        };
                        // SAFETY: as for isend; staging buffers are owned by self and not
                        // touched until the request completes.
                        let r = unsafe {
                            peer.conn
                                .irecv_hint(tag, ptr, len, stream && stg == usize::MAX)
                        };
                        let r = match r {
                            Ok(Some(r)) => r,
                            Ok(None) => {
                                if stg != usize::MAX {
                                    self.free_staging.push(stg);
                                }
                                break;
                            }
                            Err(e) => {
                                if stg != usize::MAX {
                                    self.free_staging.push(stg);
                                }
                                return Err(net_error(peer, e, self.rank, &sig.describe()));
                            }
                        };
                        if stg != usize::MAX {
                            q.staging_used += 1;
                        }
                        q.recvs.pop_front();
                        q.inflight_r.push_back((h, r, stg));
                        progressed = true;
                    }
                }
                // 3. Progress and completions.
                for (p, q) in queues.iter_mut().enumerate() {
                    if !q.busy() {
                        continue;
                    }
                    let Some(peer) = peers[p].as_mut() else {
                        continue;
                    };
                    // A connection error is acted on after the completions are taken: a peer
                    // that sent its last message and died has still delivered it.
                    let failed = match peer.conn.progress() {
                        Ok(moved) => {
                            progressed |= moved;
                            None
                        }
                        Err(e) => Some(e),
                    };
                    while let Some(&(h, r)) = q.inflight_s.front() {
                        match peer.conn.test(r) {
                            Ok(Some(_)) => {
                                q.inflight_s.pop_front();
                                done += 1;
                                self.finish(h);
                                progressed = true;
                            }
                            Ok(None) => break,
                            Err(e) => return Err(net_error(peer, e, self.rank, &sig.describe())),
                        }
                    }
                    while let Some(&(h, r, stg)) = q.inflight_r.front() {
                        let c = match peer.conn.test(r) {
                            Ok(Some(c)) => c,
                            Ok(None) => break,
                            Err(e) => return Err(net_error(peer, e, self.rank, &sig.describe())),
                        };
                        if c.meta != meta {
                            return Err(Error::Mismatch {
                                rank: self.rank,
                                peer: peer.rank,
                                local: sig.describe(),
                                remote: Sig::describe_meta(&c.meta),
                            });
                        }
                        q.inflight_r.pop_front();
                        if let Op::RecvReduce { acc, dst, .. } = plan.steps[h as usize].op {
                            let pa = self.resolve(&bufs, &acc)?;
                            let pd = self.resolve(&bufs, &dst)?;
                            let sb: &[u8] = bytemuck::cast_slice(&self.staging[stg]);
                            let ps = sb.as_ptr();
                            if pa == pd {
                                mem::with2(pd, ps, dst.len, |d, s| {
                                    reduce::reduce_inplace(ctx.dtype, ctx.op, d, s)
                                })??;
                            } else {
                                mem::with3(pd, pa, ps, dst.len, |d, a, s| {
                                    reduce::reduce_into(ctx.dtype, ctx.op, d, a, s)
                                })??;
                            }
                            self.free_staging.push(stg);
                            q.staging_used -= 1;
                        }
                        done += 1;
                        self.finish(h);
                        progressed = true;
                    }
                    if let Some(e) = failed {
                        if q.busy() {
                            return Err(net_error(peer, e, self.rank, &sig.describe()));
                        }
                    }
                }
                if done == n {
                    return Ok(());
                }
                if progressed || !self.work.is_empty() {
                    last_progress = None;
                    continue;
                }
                self.idle(
                    peers,
                    &mut last_progress,
                    &mut last_full_sweep,
                    &|| sig.describe(),
                    Duration::from_millis(50),
                )?;
            }
        })();
        // Staging buffers still held by receives that never completed go back to the pool.
        for q in queues.iter_mut() {
            for &(_, _, stg) in q.inflight_r.iter() {
                if stg != usize::MAX {
                    self.free_staging.push(stg);
                }
            }
        }
        self.queues = queues;
        if let Err(e) = &result {
            // Buffers of this call may still be referenced by posted requests: make every
            // connection with outstanding work drop them before returning (telling the peer
            // why).
            self.cancel_pending(peers, &e.to_string());
        }
        result
    }

    fn finish(&mut self, i: u32) {
        let (a, b) = (
            self.child_off[i as usize] as usize,
            self.child_off[i as usize + 1] as usize,
        );
        for k in a..b {
            let c = self.children[k] as usize;
            self.deps_left[c] -= 1;
            if self.deps_left[c] == 0 {
                self.work.push(c as u32);
            }
        }
    }

    /// Aborts connections that still hold posted requests (their buffers are about to go away).
    pub(crate) fn cancel_pending(&mut self, peers: &mut [Option<Peer>], why: &str) {
        for p in peers.iter_mut().flatten() {
            if p.conn.pending() > 0 {
                p.conn.abort(why);
            }
        }
        self.matcher.reset();
    }

    /// The error a tripped wire means for this operation: a peer it may wait on was dropped by
    /// the membership, or this member is isolated.
    fn tripped(&self, peers: &[Option<Peer>], quiet: Duration) -> Option<Error> {
        let dropped = self
            .trip
            .dropped
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default();
        for (id, why) in dropped {
            if let Some(p) = peers.iter().flatten().find(|p| p.member == id) {
                return Some(Error::PeerLost {
                    rank: p.rank,
                    member: p.member,
                    host: p.host.clone(),
                    detail: format!("removed from the group by the coordinator: {why}"),
                });
            }
        }
        let after = Duration::from_millis(self.trip.isolated_after_ms.load(Ordering::Relaxed));
        if quiet < after {
            return None;
        }
        let iso = self.trip.isolated.lock().ok().and_then(|g| g.clone());
        iso.map(|m| {
            if after.is_zero() {
                Error::Coordinator(m)
            } else {
                Error::Coordinator(format!(
                    "{m}; this operation has made no progress for {:.1} s",
                    quiet.as_secs_f64()
                ))
            }
        })
    }

    /// Nothing moved: spin briefly, then block in poll on every connection; check the abort
    /// flag, the deadline, and hang-ups on idle connections.
    fn idle(
        &mut self,
        peers: &mut [Option<Peer>],
        last_progress: &mut Option<Instant>,
        last_sweep: &mut Option<Instant>,
        mine: &dyn Fn() -> String,
        max_wait: Duration,
    ) -> Result<()> {
        if self.abort.load(Ordering::Relaxed) {
            return Err(Error::Aborted);
        }
        let now = Instant::now();
        let quiet = now.duration_since(*last_progress.get_or_insert(now));
        if self.trip.set.load(Ordering::Relaxed) {
            if let Some(e) = self.tripped(peers, quiet) {
                return Err(e);
            }
        }
        if quiet > self.timeout {
            let waiting: Vec<String> = peers
                .iter()
                .flatten()
                .filter(|p| p.conn.pending() > 0)
                .map(|p| format!("rank {} ({})", p.rank, p.host))
                .collect();
            return Err(Error::Timeout {
                what: format!(
                    "{}: no progress; waiting on {} (BRAID_TIMEOUT)",
                    mine(),
                    if waiting.is_empty() {
                        "nothing?".to_string()
                    } else {
                        waiting.join(", ")
                    }
                ),
                secs: quiet.as_secs_f64(),
            });
        }
        // Look again after yielding the CPU, never after a bare spin: when the host has more
        // runnable threads than CPUs (more ranks than CPUs, or other work) the peer waited for
        // is often runnable on this very CPU, and a spinning waiter keeps it off for the whole
        // spin (measured: 2 ranks next to one busy process took 22 µs per 8-byte all_reduce
        // with 20 µs of spinning first, 2-3 µs yielding at once; on a quiet host both ~1 µs,
        // since sched_yield returns at once when nobody else wants the CPU). With more ranks
        // than CPUs, yield for longer before blocking: a blocked rank costs a full wake-up
        // through the scheduler on both sides.
        let oversub = peers.iter().flatten().any(|p| p.conn.oversubscribed());
        let spin = if oversub {
            self.spin.max(OVERSUB_YIELD)
        } else {
            self.spin
        };
        if quiet < spin {
            std::thread::yield_now();
            return Ok(());
        }
        self.pollfds.clear();
        let mut fd_less = false;
        for p in peers.iter().flatten() {
            let before = self.pollfds.len();
            p.conn.poll_fds(&mut self.pollfds);
            if self.pollfds.len() == before {
                fd_less = true;
            }
        }
        let wait = max_wait.min(self.timeout.saturating_sub(quiet));
        if fd_less || self.pollfds.is_empty() {
            std::thread::sleep(Duration::from_micros(50));
        } else {
            braid_transport::wait_fds(&self.pollfds, wait, &mut self.pollscratch)
                .map_err(|e| Error::System(e.to_string()))?;
        }
        // Sweep every connection (idle ones too) for hang-ups and abort notices, at most every
        // few milliseconds.
        if last_sweep.map_or(true, |t| t.elapsed() >= Duration::from_millis(5)) || !fd_less {
            *last_sweep = Some(Instant::now());
            for p in peers.iter_mut().flatten() {
                if let Err(e) = p.conn.progress() {
                    return Err(net_error(p, e, self.rank, &mine()));
                }
            }
        }
        Ok(())
    }

    /// Checks a group of point-to-point operations and prepares its state: receives of
    /// point-to-point messages on connections that can peek (and every receive from any
    /// rank) go to the matcher, the rest are posted in group order by [`Exec::p2p_step`].
    pub(crate) fn p2p_begin(
        &mut self,
        peers: &[Option<Peer>],
        ops: Vec<P2pOp>,
    ) -> Result<P2pBatch> {
        let mut matched = vec![None; ops.len()];
        for (i, o) in ops.iter().enumerate() {
            if o.peer == ANY_SOURCE {
                if o.send || o.sig.kind != CollKind::P2p {
                    return Err(Error::InvalidArgument(format!(
                        "operation {i} of the group: only a receive can name any source"
                    )));
                }
                if peers.iter().flatten().next().is_none() {
                    return Err(Error::InvalidArgument(
                        "a receive from any source in a group of one rank".into(),
                    ));
                }
                if let Some(p) = peers.iter().flatten().find(|p| !p.conn.can_peek()) {
                    return Err(Error::InvalidArgument(format!(
                        "a receive from any source needs connections that can look at a \
                         message before receiving it (braid's tcp, shm and ib can); rank {} \
                         is connected over one that cannot",
                        p.rank
                    )));
                }
                continue;
            }
            if o.peer >= peers.len() || peers[o.peer].is_none() {
                return Err(Error::InvalidArgument(format!(
                    "operation {i} of the group names rank {}, which is not a peer of rank {}",
                    o.peer, self.rank
                )));
            }
        }
        for (i, o) in ops.iter().enumerate() {
            let peeks =
                o.peer == ANY_SOURCE || peers[o.peer].as_ref().is_some_and(|p| p.conn.can_peek());
            if !o.send && o.sig.kind == CollKind::P2p && peeks {
                matched[i] = Some(self.matcher.post(o.peer, &o.buf, o.sig)?);
            }
        }
        let n = ops.len();
        Ok(P2pBatch {
            metas: ops.iter().map(|o| o.sig.encode()).collect(),
            ops,
            reqs: vec![None; n],
            matched,
            complete: vec![false; n],
            done: 0,
            last_progress: None,
            last_sweep: None,
        })
    }

    /// One round for a group: posts what can be posted (in group order per peer), drives the
    /// connections, collects completions. Returns whether anything moved.
    pub(crate) fn p2p_step(
        &mut self,
        peers: &mut [Option<Peer>],
        b: &mut P2pBatch,
    ) -> Result<bool> {
        let mut progressed = false;
        let mut blocked = vec![false; peers.len()];
        for (i, o) in b.ops.iter().enumerate() {
            if b.matched[i].is_some() || b.reqs[i].is_some() || b.complete[i] || blocked[o.peer] {
                continue;
            }
            let Some(peer) = peers[o.peer].as_mut() else {
                continue;
            };
            let p = o.buf.at(0, o.buf.len())?;
            // SAFETY: the buffer is live until the group completes (the caller borrows or owns
            // it) and pending requests are cancelled before an error is returned to the caller.
            let r = unsafe {
                if o.send {
                    peer.conn.isend(o.sig.seq, &b.metas[i], p, o.buf.len())
                } else {
                    peer.conn.irecv(o.sig.seq, p, o.buf.len())
                }
            }
            .map_err(|e| net_error(peer, e, self.rank, &o.sig.describe_dir(o.send, o.peer)))?;
            match r {
                Some(r) => {
                    b.reqs[i] = Some(r);
                    progressed = true;
                }
                None => blocked[o.peer] = true,
            }
        }
        let mut moved_peers = vec![false; peers.len()];
        // Per peer: the error its connection's progress returned, acted on only for requests
        // that did not complete (a peer that sent its last message and died delivered it).
        let mut failed: Vec<Option<NetError>> = vec![None; peers.len()];
        for (i, o) in b.ops.iter().enumerate() {
            let Some(r) = b.reqs[i] else { continue };
            let Some(peer) = peers[o.peer].as_mut() else {
                continue;
            };
            if !moved_peers[o.peer] {
                moved_peers[o.peer] = true;
                match peer.conn.progress() {
                    Ok(m) => progressed |= m,
                    Err(e) => failed[o.peer] = Some(e),
                }
            }
            match peer.conn.test(r) {
                Ok(Some(c)) => {
                    if !o.send && c.meta != b.metas[i] {
                        let remote = match Sig::decode(&c.meta) {
                            Some(s) => s.describe_dir(true, self.rank),
                            None => Sig::describe_meta(&c.meta),
                        };
                        return Err(Error::Mismatch {
                            rank: self.rank,
                            peer: o.peer,
                            local: o.sig.describe_dir(false, o.peer),
                            remote,
                        });
                    }
                    b.complete[i] = true;
                    b.reqs[i] = None;
                    b.done += 1;
                    progressed = true;
                }
                Ok(None) => {
                    if let Some(e) = failed[o.peer].clone() {
                        return Err(net_error(
                            peer,
                            e,
                            self.rank,
                            &o.sig.describe_dir(o.send, o.peer),
                        ));
                    }
                }
                Err(e) => {
                    return Err(net_error(
                        peer,
                        e,
                        self.rank,
                        &o.sig.describe_dir(o.send, o.peer),
                    ))
                }
            }
        }
        if b.matched.iter().any(|m| m.is_some()) || !self.matcher.idle() {
            progressed |= self.matcher.step(peers, self.rank)?;
            for (i, o) in b.ops.iter().enumerate() {
                let Some(id) = b.matched[i] else { continue };
                if b.complete[i] {
                    continue;
                }
                if let Some(src) = self.matcher.take_done(id) {
                    set_source(&o.source, src);
                    b.complete[i] = true;
                    b.done += 1;
                    progressed = true;
                }
            }
        }
        if progressed {
            b.last_progress = None;
        }
        Ok(progressed)
    }

    /// Waits (spin, then poll up to `max_wait`) on behalf of a group that made no progress.
    pub(crate) fn p2p_idle(
        &mut self,
        peers: &mut [Option<Peer>],
        b: &mut P2pBatch,
        max_wait: Duration,
    ) -> Result<()> {
        let ops = &b.ops;
        let complete = &b.complete;
        let what = || {
            ops.iter()
                .zip(complete)
                .find(|(_, c)| !**c)
                .map(|(o, _)| {
                    if o.sig.kind == CollKind::AllToAllV {
                        // Names the peer and both directions' counts.
                        return o.sig.describe_dir(o.send, o.peer);
                    }
                    let who = match o.peer {
                        ANY_SOURCE => "any rank".to_string(),
                        p => format!("rank {p}"),
                    };
                    format!(
                        "{} {} {who}",
                        o.sig.describe(),
                        if o.send { "to" } else { "from" },
                    )
                })
                .unwrap_or_default()
        };
        let (mut lp, mut ls) = (b.last_progress, b.last_sweep);
        let r = self.idle(peers, &mut lp, &mut ls, &what, max_wait);
        (b.last_progress, b.last_sweep) = (lp, ls);
        match r {
            // Receives matched by tag wait on nothing posted: say what they wait for and what
            // came instead.
            Err(Error::Timeout { what, secs }) if b.matched.iter().any(|m| m.is_some()) => {
                Err(Error::Timeout {
                    what: format!("{what}{}", self.matcher.describe()),
                    secs,
                })
            }
            r => r,
        }
    }

    /// Runs a group of point-to-point operations: posts all (per-peer order = group order),
    /// waits for all.
    pub(crate) fn run_p2p(&mut self, peers: &mut [Option<Peer>], ops: Vec<P2pOp>) -> Result<()> {
        let mut b = self.p2p_begin(peers, ops)?;
        let result = (|| -> Result<()> {
            loop {
                let progressed = self.p2p_step(peers, &mut b)?;
                if b.done == b.ops.len() {
                    return Ok(());
                }
                if !progressed {
                    self.p2p_idle(peers, &mut b, Duration::from_millis(50))?;
                }
            }
        })();
        if let Err(e) = &result {
            self.cancel_pending(peers, &e.to_string());
        }
        result
    }
}

/// State of a group of point-to-point operations in flight.
pub(crate) struct P2pBatch {
    ops: Vec<P2pOp>,
    metas: Vec<Meta>,
    reqs: Vec<Option<Request>>,
    /// The matcher's id of each receive it matches.
    matched: Vec<Option<u64>>,
    complete: Vec<bool>,
    done: usize,
    /// `None`: progress just now (see `Exec::idle`).
    last_progress: Option<Instant>,
    last_sweep: Option<Instant>,
}

impl P2pBatch {
    /// Whether every operation completed.
    pub(crate) fn finished(&self) -> bool {
        self.done == self.ops.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sig_round_trip_and_describe() {
        let s = Sig {
            kind: CollKind::AllReduce,
            dtype: DataType::F32,
            op: ReduceOp::Sum,
            algo: Algo::Ring,
            root: 0,
            slice_kib: 512,
            count: 1000,
            seq: 3,
        };
        assert_eq!(Sig::decode(&s.encode()), Some(s));
        let d = s.describe();
        assert!(d.contains("all_reduce(float, sum, count=1000"), "{d}");
        assert!(Sig::decode(&[0u8; META_LEN]).is_none());
    }

    #[test]
    fn all_to_allv_signatures_carry_both_counts() {
        let back = (7u64 << 32 | 5) as usize;
        let s = Sig::all_to_allv(DataType::I64, 3, back, 9);
        let d = Sig::decode(&s.encode()).unwrap();
        assert_eq!(d, s);
        assert_eq!(d.back(), back as u64);
        // A disagreement in either direction changes the signature.
        assert_ne!(
            s.encode(),
            Sig::all_to_allv(DataType::I64, 4, back, 9).encode()
        );
        assert_ne!(
            s.encode(),
            Sig::all_to_allv(DataType::I64, 3, 5, 9).encode()
        );
        let r = s.describe_dir(false, 2);
        assert!(
            r.contains("expecting 3 elements from rank 2 and sending it 30064771077"),
            "{r}"
        );
        let t = s.describe_dir(true, 1);
        assert!(t.contains("sending 3 elements to rank 1"), "{t}");
    }
}
