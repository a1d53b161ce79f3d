//! The raw API of the C ABI (collectives and point-to-point on raw buffers) and all_to_allv
//! (typed and raw).

use crate::coll::CollKind;
use crate::error::{Error, Result};
use crate::exec::{P2pOp, Sig};
use crate::matcher::{SourceSlot, ANY_SOURCE};
use crate::mem::RawBuf;
use crate::types::{DataType, Element, ReduceOp};

use super::progress::{Handle, JobDesc};
use super::{bytes_of, bytes_of_mut, invalid, sub, Communicator};

/// One collective call on raw buffers ([`Communicator::coll_raw`], the C ABI's entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawColl {
    /// Which collective.
    pub kind: CollKind,
    /// Element type.
    pub dtype: DataType,
    /// Reduction operator (ignored by non-reductions).
    pub op: ReduceOp,
    /// Element count as NCCL counts it: all_reduce, broadcast, reduce: the buffer; reduce_scatter:
    /// the per-rank result (recvcount); all_gather: the per-rank input (sendcount); all_to_all,
    /// gather, scatter: the per-rank block.
    pub count: usize,
    /// Root rank (rooted collectives).
    pub root: usize,
}

impl RawColl {
    /// Byte lengths of its (send, recv) buffers on rank `rank` of `n` (0 where a buffer is
    /// not significant on that rank); the root must already be checked. Host and device
    /// forms share it.
    pub(crate) fn byte_lens(&self, rank: usize, n: usize) -> Result<(usize, usize)> {
        let es = self.dtype.size();
        let is_root = rank == self.root;
        let blk = self
            .count
            .checked_mul(es)
            .ok_or_else(|| Error::InvalidArgument("count overflows".into()))?;
        let all = blk
            .checked_mul(n)
            .ok_or_else(|| Error::InvalidArgument("count overflows".into()))?;
        Ok(match self.kind {
            CollKind::AllReduce => (blk, blk),
            CollKind::ReduceScatter => (all, blk),
            CollKind::AllGather => (blk, all),
            CollKind::Broadcast => (if is_root { blk } else { 0 }, blk),
            CollKind::Reduce => (blk, if is_root { blk } else { 0 }),
            CollKind::AllToAll => (all, all),
            CollKind::Gather => (blk, if is_root { all } else { 0 }),
            CollKind::Scatter => (if is_root { all } else { 0 }, blk),
            CollKind::Barrier => (0, 0),
            CollKind::P2p => {
                return Err(Error::InvalidArgument(
                    "point-to-point has calls of its own (p2p_raw, p2p_device_raw)".into(),
                ))
            }
            CollKind::AllToAllV => {
                return Err(Error::InvalidArgument(
                    "all_to_allv has calls of its own (all_to_allv_raw; on device buffers braid_all_to_allv_stream)".into(),
                ))
            }
        })
    }
}

/// One point-to-point operation on a raw buffer ([`Communicator::p2p_raw`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawP2p {
    /// Send (true) or receive.
    pub send: bool,
    /// The buffer.
    pub buf: *mut u8,
    /// Element count.
    pub count: usize,
    /// Element type.
    pub dtype: DataType,
    /// The other rank.
    pub peer: usize,
    /// Tag (must match the other side's).
    pub tag: u64,
}

/// The rank a receive from any source took its message from
/// ([`Communicator::irecv_any_raw`]), once it completed.
#[derive(Debug, Clone)]
pub struct AnySource(SourceSlot);

impl AnySource {
    pub(crate) fn new() -> AnySource {
        AnySource(std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(
            usize::MAX,
        )))
    }

    pub(crate) fn slot(&self) -> SourceSlot {
        self.0.clone()
    }

    /// The source rank; `None` until the receive completed.
    pub fn rank(&self) -> Option<usize> {
        match self.0.load(std::sync::atomic::Ordering::Acquire) {
            usize::MAX => None,
            r => Some(r),
        }
    }
}

impl Communicator {
    /// Byte lengths of the (send, recv) buffers of a raw collective on this rank.
    fn raw_lens(&self, c: &RawColl) -> Result<(usize, usize)> {
        if c.kind.rooted() {
            self.check_root(c.root)?;
        }
        c.byte_lens(self.rank(), self.size())
    }

    fn raw_bufs(&self, c: &RawColl, send: *const u8, recv: *mut u8) -> Result<[RawBuf; 2]> {
        let (sl, rl) = self.raw_lens(c)?;
        if (sl > 0 && send.is_null()) || (rl > 0 && recv.is_null()) {
            return invalid(format!(
                "{}: NULL buffer for {} bytes",
                c.kind.name(),
                if sl > 0 && send.is_null() { sl } else { rl }
            ));
        }
        // SAFETY: the caller of coll_raw/icoll_raw guarantees these ranges are valid.
        Ok(unsafe {
            [
                RawBuf::from_raw(send as *mut u8, sl),
                RawBuf::from_raw(recv, rl),
            ]
        })
    }

    /// Runs a collective on raw buffers (blocking). In-place follows nccl.h: `send == recv`
    /// (all_gather: `send == recv + rank*count*size`; reduce_scatter:
    /// `recv == send + rank*count*size`).
    ///
    /// # Safety
    /// `send` and `recv` must be valid for the lengths the collective implies on this rank (see
    /// [`RawColl::count`]) for the duration of the call; buffers not significant on this rank
    /// may be NULL.
    pub unsafe fn coll_raw(&self, c: RawColl, send: *const u8, recv: *mut u8) -> Result<()> {
        let bufs = self.raw_bufs(&c, send, recv)?;
        self.run_blocking(
            JobDesc::Coll {
                kind: c.kind,
                dtype: c.dtype,
                op: c.op,
                count: c.count,
                root: c.root,
            },
            bufs,
        )
    }

    /// Starts a collective on raw buffers; the handle completes when it is done.
    ///
    /// # Safety
    /// As [`Communicator::coll_raw`], and the buffers must stay valid and untouched until the
    /// handle reports completion (`test` true or `wait` returned).
    pub unsafe fn icoll_raw(
        &self,
        c: RawColl,
        send: *const u8,
        recv: *mut u8,
    ) -> Result<Handle<()>> {
        let bufs = self.raw_bufs(&c, send, recv)?;
        self.submit(
            JobDesc::Coll {
                kind: c.kind,
                dtype: c.dtype,
                op: c.op,
                count: c.count,
                root: c.root,
            },
            bufs,
            Box::new(()),
            |_| (),
        )
    }

    fn raw_p2p_ops(&self, ops: &[RawP2p]) -> Result<Vec<P2pOp>> {
        let mut out = Vec::with_capacity(ops.len());
        for o in ops {
            self.check_peer(o.peer)?;
            let len = o
                .count
                .checked_mul(o.dtype.size())
                .ok_or_else(|| Error::InvalidArgument("count overflows".into()))?;
            if len > 0 && o.buf.is_null() {
                return invalid("send/recv: NULL buffer".into());
            }
            out.push(P2pOp {
                send: o.send,
                peer: o.peer,
                // SAFETY: the caller of p2p_raw/ip2p_raw guarantees the range is valid.
                buf: unsafe { RawBuf::from_raw(o.buf, len) },
                sig: Self::p2p_sig_of(o.dtype, o.count, o.tag),
                source: None,
            });
        }
        Ok(out)
    }

    fn any_op(
        &self,
        buf: *mut u8,
        count: usize,
        dtype: DataType,
        tag: u64,
    ) -> Result<(P2pOp, AnySource)> {
        let len = count
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::InvalidArgument("count overflows".into()))?;
        if len > 0 && buf.is_null() {
            return invalid("recv: NULL buffer".into());
        }
        let src = AnySource::new();
        let op = P2pOp {
            send: false,
            peer: ANY_SOURCE,
            // SAFETY: the caller of recv_any_raw/irecv_any_raw guarantees the range is valid.
            buf: unsafe { RawBuf::from_raw(buf, len) },
            sig: Self::p2p_sig_of(dtype, count, tag),
            source: Some(src.slot()),
        };
        Ok((op, src))
    }

    /// Receives `count` elements of `dtype` into `buf`: the first message with `tag` from any
    /// rank ([`Communicator::recv_any`]); returns the rank it came from.
    ///
    /// # Safety
    /// `buf` must be valid for `count` elements for the duration of the call.
    pub unsafe fn recv_any_raw(
        &self,
        buf: *mut u8,
        count: usize,
        dtype: DataType,
        tag: u64,
    ) -> Result<usize> {
        let (op, src) = self.any_op(buf, count, dtype, tag)?;
        self.run_blocking(JobDesc::P2p(vec![op]), [RawBuf::empty(), RawBuf::empty()])?;
        src.rank()
            .ok_or_else(|| Error::Internal("a completed receive without a source".into()))
    }

    /// Starts [`Communicator::recv_any_raw`]; the [`AnySource`] gives the rank once the handle
    /// completed.
    ///
    /// # Safety
    /// As [`Communicator::recv_any_raw`], until the handle reports completion.
    pub unsafe fn irecv_any_raw(
        &self,
        buf: *mut u8,
        count: usize,
        dtype: DataType,
        tag: u64,
    ) -> Result<(Handle<()>, AnySource)> {
        let (op, src) = self.any_op(buf, count, dtype, tag)?;
        let h = self.submit(
            JobDesc::P2p(vec![op]),
            [RawBuf::empty(), RawBuf::empty()],
            Box::new(()),
            |_| (),
        )?;
        Ok((h, src))
    }

    /// Runs a group of point-to-point operations on raw buffers (blocking).
    ///
    /// # Safety
    /// Every buffer must be valid for `count` elements for the duration of the call; receive
    /// buffers must not overlap anything else of the group.
    pub unsafe fn p2p_raw(&self, ops: &[RawP2p]) -> Result<()> {
        let ops = self.raw_p2p_ops(ops)?;
        if ops.is_empty() {
            return Ok(());
        }
        self.run_blocking(JobDesc::P2p(ops), [RawBuf::empty(), RawBuf::empty()])
    }

    /// Starts a group of point-to-point operations on raw buffers.
    ///
    /// # Safety
    /// As [`Communicator::p2p_raw`], until the handle reports completion.
    pub unsafe fn ip2p_raw(&self, ops: &[RawP2p]) -> Result<Handle<()>> {
        let ops = self.raw_p2p_ops(ops)?;
        self.submit(
            JobDesc::P2p(ops),
            [RawBuf::empty(), RawBuf::empty()],
            Box::new(()),
            |_| (),
        )
    }
}

/// The arguments of one all_to_allv call on this rank (buffers as raw views).
struct VArgs<'a> {
    dtype: DataType,
    send: RawBuf,
    send_counts: &'a [usize],
    send_displs: &'a [usize],
    recv: RawBuf,
    recv_counts: &'a [usize],
    recv_displs: &'a [usize],
}

/// Checks one side (send or receive) of an all_to_allv layout and returns, per rank, the
/// (byte offset, byte length) of its block, and the bytes the blocks span from the start of
/// the buffer. `len`: the buffer's length in elements, when known (the Rust form); blocks of
/// zero elements are not checked (their displacement is ignored, as in MPI).
fn alltoallv_blocks(
    side: &str,
    n: usize,
    es: usize,
    len: Option<usize>,
    counts: &[usize],
    displs: &[usize],
) -> Result<(Vec<(usize, usize)>, usize)> {
    if counts.len() != n || displs.len() != n {
        return invalid(format!(
            "all_to_allv: {side} counts ({}) and displacements ({}) must have one entry per rank ({n})",
            counts.len(),
            displs.len()
        ));
    }
    let mut blocks = Vec::with_capacity(n);
    let mut extent = 0usize;
    for (p, (&c, &d)) in counts.iter().zip(displs).enumerate() {
        if c == 0 {
            blocks.push((0, 0));
            continue;
        }
        let end = d.checked_add(c).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "all_to_allv: {side} block of rank {p} (displacement {d}, count {c}) overflows"
            ))
        })?;
        if let Some(len) = len {
            if end > len {
                return invalid(format!(
                    "all_to_allv: {side} block of rank {p} (elements {d}..{end}) lies outside the {side} buffer of {len} elements"
                ));
            }
        }
        let (off, bytes, end_b) = match (d.checked_mul(es), c.checked_mul(es), end.checked_mul(es))
        {
            (Some(o), Some(b), Some(e)) => (o, b, e),
            _ => {
                return invalid(format!(
                    "all_to_allv: {side} block of rank {p} (displacement {d}, count {c}) overflows in bytes"
                ))
            }
        };
        extent = extent.max(end_b);
        blocks.push((off, bytes));
    }
    Ok((blocks, extent))
}

/// Whether any two of the (start, length) byte ranges `a` overlap one another (`within`), or
/// any range of `a` overlaps one of `b`. Empty ranges overlap nothing. Returns the indices of
/// a pair found.
fn first_overlap(
    a: &[(usize, usize)],
    b: &[(usize, usize)],
    within: bool,
) -> Option<(usize, usize)> {
    let sorted = |v: &[(usize, usize)]| {
        let mut s: Vec<(usize, usize, usize)> = v
            .iter()
            .enumerate()
            .filter(|(_, r)| r.1 > 0)
            .map(|(i, r)| (r.0, r.0.saturating_add(r.1), i))
            .collect();
        s.sort_unstable();
        s
    };
    let sa = sorted(a);
    if within {
        // Sorted by start: a range overlaps an earlier one iff it starts before the largest end
        // seen so far.
        let mut reach: Option<(usize, usize)> = None;
        for &(st, en, i) in &sa {
            if let Some((e, j)) = reach {
                if st < e {
                    return Some((j, i));
                }
            }
            if reach.map_or(true, |(e, _)| en > e) {
                reach = Some((en, i));
            }
        }
        return None;
    }
    let sb = sorted(b);
    let (mut i, mut j) = (0, 0);
    while i < sa.len() && j < sb.len() {
        let (x, y) = (sa[i], sb[j]);
        if x.0 < y.1 && y.0 < x.1 {
            return Some((x.2, y.2));
        }
        if x.1 <= y.1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    None
}

impl Communicator {
    /// Checks an all_to_allv call and builds its job (nothing is sent here).
    fn alltoallv_job(
        &self,
        a: VArgs<'_>,
        send_len: Option<usize>,
        recv_len: Option<usize>,
    ) -> Result<JobDesc> {
        let (n, me) = (self.size(), self.rank());
        let es = a.dtype.size();
        let (sb, _) = alltoallv_blocks("send", n, es, send_len, a.send_counts, a.send_displs)?;
        let (rb, _) = alltoallv_blocks("recv", n, es, recv_len, a.recv_counts, a.recv_displs)?;
        if a.send_counts[me] != a.recv_counts[me] {
            return invalid(format!(
                "all_to_allv: count mismatch for this rank's own block: sends {} elements to itself, receives {}",
                a.send_counts[me], a.recv_counts[me]
            ));
        }
        if let Some((x, y)) = first_overlap(&rb, &[], true) {
            return invalid(format!(
                "all_to_allv: the receive blocks of ranks {x} and {y} overlap"
            ));
        }
        // Absolute addresses: the send and receive buffers must not overlap (in place is not
        // supported; the Rust form cannot alias them, the raw form is checked here).
        let abs = |b: &RawBuf, v: &[(usize, usize)]| -> Result<Vec<(usize, usize)>> {
            v.iter()
                .map(|&(o, l)| {
                    if l == 0 {
                        Ok((0, 0))
                    } else {
                        b.at(o, l).map(|p| (p as usize, l))
                    }
                })
                .collect()
        };
        let (sa, ra) = (abs(&a.send, &sb)?, abs(&a.recv, &rb)?);
        if let Some((x, y)) = first_overlap(&sa, &ra, false) {
            return invalid(format!(
                "all_to_allv: the send block for rank {x} overlaps the receive block of rank {y} (in-place all_to_allv is not supported)"
            ));
        }
        let block = |b: RawBuf, (o, l): (usize, usize)| -> Result<RawBuf> {
            if l == 0 {
                Ok(RawBuf::empty())
            } else {
                sub(b, o, l)
            }
        };
        let mut ops = Vec::with_capacity(2 * n.saturating_sub(1));
        // Receives first (from rank-1, rank-2, ...), then sends (to rank+1, rank+2, ...): every
        // pair exchanges one message each way, empty ones included, so that every rank checks
        // both counts of every pair.
        for k in 1..n {
            let p = (me + n - k) % n;
            ops.push(P2pOp {
                send: false,
                peer: p,
                buf: block(a.recv, rb[p])?,
                sig: Sig::all_to_allv(a.dtype, a.recv_counts[p], a.send_counts[p], 0),
                source: None,
            });
        }
        for k in 1..n {
            let p = (me + k) % n;
            ops.push(P2pOp {
                send: true,
                peer: p,
                buf: block(a.send, sb[p])?,
                sig: Sig::all_to_allv(a.dtype, a.send_counts[p], a.recv_counts[p], 0),
                source: None,
            });
        }
        let local = if sb[me].1 > 0 {
            Some((block(a.send, sb[me])?, block(a.recv, rb[me])?))
        } else {
            None
        };
        Ok(JobDesc::AllToAllV { ops, local })
    }

    /// All-to-all with a count and a displacement per rank (`MPI_Alltoallv`; torch's
    /// `all_to_all_single` with uneven splits): this rank sends
    /// `send[send_displs[p]..][..send_counts[p]]` to rank p and receives `recv_counts[p]`
    /// elements from rank p into `recv[recv_displs[p]..]`. Counts and displacements are in
    /// elements, one per rank; rank p's `send_counts[r]` must equal rank r's `recv_counts[p]`.
    /// Blocks of zero elements are allowed (their displacement is ignored); send blocks may
    /// overlap, receive blocks may not. One rank: a local copy. Not in place (`send` and `recv`
    /// are distinct by the borrow rules). Ordered with the other collectives (all ranks call it
    /// at the same point), never on the single-copy paths.
    ///
    /// Errors (before anything is sent, the communicator stays usable):
    /// [`Error::InvalidArgument`] when an array does not have one entry per rank, a block lies
    /// outside its buffer (checked arithmetic), receive blocks overlap, or this rank's own send
    /// and receive counts differ. A count that disagrees with the peer's
    /// ([`Error::Mismatch`], sticky, "collective mismatch" naming both sides) fails on both
    /// ranks of the pair; a rank that called another collective meanwhile gives the same error.
    pub fn all_to_allv<T: Element>(
        &self,
        send: &[T],
        send_counts: &[usize],
        send_displs: &[usize],
        recv: &mut [T],
        recv_counts: &[usize],
        recv_displs: &[usize],
    ) -> Result<()> {
        let (sl, rl) = (send.len(), recv.len());
        let job = self.alltoallv_job(
            VArgs {
                dtype: T::DTYPE,
                send: RawBuf::from_slice(bytes_of(send)),
                send_counts,
                send_displs,
                recv: RawBuf::from_mut(bytes_of_mut(recv)),
                recv_counts,
                recv_displs,
            },
            Some(sl),
            Some(rl),
        )?;
        self.run_blocking(job, [RawBuf::empty(), RawBuf::empty()])
    }

    /// Raw views of an all_to_allv's buffers, spanning every block (the raw forms cannot know
    /// the buffers' lengths: they trust the counts and displacements, as MPI does).
    #[allow(clippy::too_many_arguments)]
    fn raw_alltoallv_job(
        &self,
        dtype: DataType,
        send: *const u8,
        send_counts: &[usize],
        send_displs: &[usize],
        recv: *mut u8,
        recv_counts: &[usize],
        recv_displs: &[usize],
    ) -> Result<JobDesc> {
        let (n, es) = (self.size(), dtype.size());
        let (_, sx) = alltoallv_blocks("send", n, es, None, send_counts, send_displs)?;
        let (_, rx) = alltoallv_blocks("recv", n, es, None, recv_counts, recv_displs)?;
        if (sx > 0 && send.is_null()) || (rx > 0 && recv.is_null()) {
            return invalid(format!(
                "all_to_allv: NULL {} buffer with non-zero counts",
                if sx > 0 && send.is_null() {
                    "send"
                } else {
                    "receive"
                }
            ));
        }
        // SAFETY: the caller of all_to_allv_raw/iall_to_allv_raw guarantees that every block
        // its counts and displacements describe is valid: `sx`/`rx` bytes from the start span
        // exactly those blocks.
        let (sbuf, rbuf) = unsafe {
            (
                RawBuf::from_raw(send as *mut u8, sx),
                RawBuf::from_raw(recv, rx),
            )
        };
        self.alltoallv_job(
            VArgs {
                dtype,
                send: sbuf,
                send_counts,
                send_displs,
                recv: rbuf,
                recv_counts,
                recv_displs,
            },
            None,
            None,
        )
    }

    /// [`Communicator::all_to_allv`] on raw buffers (the C ABI's entry; blocking). Counts and
    /// displacements are read during the call only.
    ///
    /// Errors: as [`Communicator::all_to_allv`] (the blocks are not checked against buffer
    /// lengths, which are unknown here); NULL buffers with non-zero counts; send and receive
    /// blocks that overlap (in place is not supported).
    ///
    /// # Safety
    /// For every rank p, `send + send_displs[p]*size` must be valid for reading
    /// `send_counts[p]` elements of `dtype`, and `recv + recv_displs[p]*size` for writing
    /// `recv_counts[p]` elements, for the duration of the call.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn all_to_allv_raw(
        &self,
        dtype: DataType,
        send: *const u8,
        send_counts: &[usize],
        send_displs: &[usize],
        recv: *mut u8,
        recv_counts: &[usize],
        recv_displs: &[usize],
    ) -> Result<()> {
        let job = self.raw_alltoallv_job(
            dtype,
            send,
            send_counts,
            send_displs,
            recv,
            recv_counts,
            recv_displs,
        )?;
        self.run_blocking(job, [RawBuf::empty(), RawBuf::empty()])
    }

    /// Starts [`Communicator::all_to_allv_raw`] on the progress thread; the handle completes
    /// when it is done. Counts and displacements are read during the call only (they may be
    /// freed when it returns).
    ///
    /// # Safety
    /// As [`Communicator::all_to_allv_raw`], and the buffers must stay valid and untouched
    /// (the send blocks unmodified, the receive blocks unread) until the handle reports
    /// completion.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn iall_to_allv_raw(
        &self,
        dtype: DataType,
        send: *const u8,
        send_counts: &[usize],
        send_displs: &[usize],
        recv: *mut u8,
        recv_counts: &[usize],
        recv_displs: &[usize],
    ) -> Result<Handle<()>> {
        let job = self.raw_alltoallv_job(
            dtype,
            send,
            send_counts,
            send_displs,
            recv,
            recv_counts,
            recv_displs,
        )?;
        self.submit(
            job,
            [RawBuf::empty(), RawBuf::empty()],
            Box::new(()),
            |_| (),
        )
    }
}
