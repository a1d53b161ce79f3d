//! How a staged call is cut into pipeline steps: for each step, the device-to-host copies into
//! the step's pinned slot, the host collective (or point-to-point group) run on the slot, and
//! the host-to-device copies out of it. Pure arithmetic: no I/O, no device.
//!
//! Chunking rules (equal on every rank, so every rank runs the same host calls in the same
//! order; `chunk_bytes` is agreed between the ranks when the stager starts):
//! - all_reduce, broadcast, reduce: chunk `i` is the element range `[i*m, i*m + k)` of the
//!   buffer, `m = chunk_bytes / size` elements; the host collective runs in place on the slot.
//! - the rank-blocked collectives are chunked per block segment: chunk `i` is the same element
//!   range `[i*m, i*m + k)` of every rank's block (so a chunk is several copies, one per block),
//!   laid out in the slot as `n` consecutive pieces of `k` elements, and the host collective
//!   runs with count `k` on that layout. `m` is chosen so that a chunk's whole pinned footprint
//!   fits `chunk_bytes`: all_gather and reduce_scatter `n*k` elements (run in place, per
//!   nccl.h's in-place rules), all_to_all `2*n*k` (input and output areas), gather and scatter
//!   `(n+1)*k` (the block and the `n` blocks of the root).
//! - point-to-point: every operation of a group is cut into pieces of `chunk_bytes / size`
//!   elements (a rule that needs nothing but the operation itself, so the two sides of every
//!   pair cut alike whatever the rest of their groups hold); step `i` is one group call with
//!   piece `i` of every operation that still has one.
//! - barrier: one step without data. A call without data otherwise (count 0) has no step.
//!
//! Only significant buffers are copied: broadcast non-root has no device-to-host copy, reduce
//! and gather non-root no host-to-device copy, scatter non-root no device-to-host copy; an
//! in-place broadcast root and an in-place all_gather's own block are not written back.

use crate::coll::CollKind;
use crate::comm::RawColl;
use crate::cuda::{DevPtr, DeviceP2p};
use crate::error::{Error, Result};
use crate::types::DataType;

/// One copy between device memory and the step's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Copy {
    /// Device address.
    pub dev: DevPtr,
    /// Offset in the slot.
    pub off: usize,
    /// Bytes.
    pub len: usize,
}

/// One point-to-point piece of a step (the buffer is at `off` in the slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub send: bool,
    pub off: usize,
    pub count: usize,
    pub dtype: DataType,
    pub peer: usize,
    pub tag: u64,
}

/// The host operation of a step, on the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostOp {
    /// `coll_raw(c, slot+send, slot+recv)`; `None` = not significant here (NULL).
    Coll {
        c: RawColl,
        send: Option<usize>,
        recv: Option<usize>,
    },
    /// `p2p_raw` of these pieces.
    P2p(Vec<Piece>),
}

/// One pipeline step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    pub d2h: Vec<Copy>,
    pub op: HostOp,
    pub h2d: Vec<Copy>,
    /// Bytes of the slot the step uses.
    pub bytes: usize,
}

/// A staged call, cut into steps.
#[derive(Debug, Clone)]
pub(crate) enum Plan {
    Coll(CollPlan),
    P2p(P2pPlan),
}

#[derive(Debug, Clone)]
pub(crate) struct CollPlan {
    c: RawColl,
    send: DevPtr,
    recv: DevPtr,
    n: usize,
    rank: usize,
    /// Elements per chunk (of the buffer, or of each block).
    m: usize,
    steps: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct P2pPlan {
    ops: Vec<DeviceP2p>,
    /// Elements per piece, per operation.
    per: Vec<usize>,
    steps: usize,
}

/// Pinned elements of a chunk per element of the chunked range (see the module comment).
fn footprint(kind: CollKind, n: usize) -> usize {
    match kind {
        CollKind::AllGather | CollKind::ReduceScatter => n,
        CollKind::AllToAll => 2 * n,
        CollKind::Gather | CollKind::Scatter => n + 1,
        _ => 1,
    }
}

/// Byte lengths of the (send, recv) device buffers of a collective on this rank (those of
/// `Communicator::coll_raw`: [`RawColl::byte_lens`]), checking the arguments.
pub(crate) fn coll_lens(c: &RawColl, n: usize, rank: usize) -> Result<(usize, usize)> {
    if c.kind.rooted() && c.root >= n {
        return Err(Error::InvalidArgument(format!(
            "{}: root {} is not a rank (size {n})",
            c.kind.name(),
            c.root
        )));
    }
    if matches!(c.kind, CollKind::P2p | CollKind::AllToAllV) {
        return Err(Error::InvalidArgument(format!(
            "{} cannot be staged as a collective (use the point-to-point form)",
            c.kind.name()
        )));
    }
    // The slot layouts multiply the block by at most 2n + 1.
    let over = || Error::InvalidArgument(format!("{}: count {} overflows", c.kind.name(), c.count));
    c.count
        .checked_mul(c.dtype.size())
        .and_then(|blk| blk.checked_mul(n))
        .and_then(|all| all.checked_mul(3))
        .ok_or_else(over)?;
    c.byte_lens(rank, n)
}

impl Plan {
    /// The plan of a collective on `n` ranks seen from `rank` (arguments checked: root, lengths,
    /// NULL device pointers of significant buffers).
    pub(crate) fn coll(
        c: RawColl,
        send: DevPtr,
        recv: DevPtr,
        n: usize,
        rank: usize,
        chunk_bytes: usize,
    ) -> Result<Plan> {
        let (sl, rl) = coll_lens(&c, n, rank)?;
        if (sl > 0 && send == 0) || (rl > 0 && recv == 0) {
            return Err(Error::InvalidArgument(format!(
                "{}: NULL device buffer for {} bytes",
                c.kind.name(),
                if sl > 0 && send == 0 { sl } else { rl }
            )));
        }
        let es = c.dtype.size();
        let m = (chunk_bytes / (footprint(c.kind, n) * es)).max(1);
        let steps = if c.kind == CollKind::Barrier {
            1
        } else {
            c.count.div_ceil(m)
        };
        Ok(Plan::Coll(CollPlan {
            c,
            send,
            recv,
            n,
            rank,
            m,
            steps,
        }))
    }

    /// The plan of a point-to-point group on `n` ranks.
    pub(crate) fn p2p(ops: &[DeviceP2p], n: usize, chunk_bytes: usize) -> Result<Plan> {
        let mut per = Vec::with_capacity(ops.len());
        let mut steps = 0;
        for o in ops {
            if o.peer >= n {
                return Err(Error::InvalidArgument(format!(
                    "send/recv: peer {} is not a rank (size {n})",
                    o.peer
                )));
            }
            let es = o.dtype.size();
            let len = o.count.checked_mul(es).ok_or_else(|| {
                Error::InvalidArgument(format!("send/recv: count {} overflows", o.count))
            })?;
            if len > 0 && o.buf == 0 {
                return Err(Error::InvalidArgument(
                    "send/recv: NULL device buffer".into(),
                ));
            }
            let q = (chunk_bytes / es).max(1);
            per.push(q);
            steps = steps.max(o.count.div_ceil(q));
        }
        Ok(Plan::P2p(P2pPlan {
            ops: ops.to_vec(),
            per,
            steps,
        }))
    }

    /// Number of steps (0: nothing to do).
    pub(crate) fn steps(&self) -> usize {
        match self {
            Plan::Coll(p) => p.steps,
            Plan::P2p(p) => p.steps,
        }
    }

    /// The most slot bytes a step uses (the first step's: it has the largest pieces).
    pub(crate) fn slot_bytes(&self) -> usize {
        if self.steps() == 0 {
            0
        } else {
            self.step(0).bytes
        }
    }

    /// Step `i` (< `steps()`).
    pub(crate) fn step(&self, i: usize) -> Step {
        match self {
            Plan::Coll(p) => p.step(i),
            Plan::P2p(p) => p.step(i),
        }
    }
}

impl CollPlan {
    fn step(&self, i: usize) -> Step {
        let c = self.c;
        let (n, rank) = (self.n, self.rank);
        let es = c.dtype.size();
        let e0 = i * self.m;
        let k = self.m.min(c.count.saturating_sub(e0));
        let b = k * es;
        let big = c.count * es; // a block's bytes
        let root = rank == c.root;
        // Device address of element `e0` of block `j` of a blocked buffer.
        let at = |base: DevPtr, j: usize| base + (j * big + e0 * es) as u64;
        let cp = |dev: DevPtr, off: usize| Copy { dev, off, len: b };
        let op = |send: Option<usize>, recv: Option<usize>| HostOp::Coll {
            c: RawColl { count: k, ..c },
            send,
            recv,
        };
        let (d2h, op, h2d, bytes) = match c.kind {
            CollKind::AllReduce => (
                vec![cp(at(self.send, 0), 0)],
                op(Some(0), Some(0)),
                vec![cp(at(self.recv, 0), 0)],
                b,
            ),
            CollKind::Broadcast => {
                if root {
                    let back = if self.send == self.recv {
                        vec![]
                    } else {
                        vec![cp(at(self.recv, 0), 0)]
                    };
                    (vec![cp(at(self.send, 0), 0)], op(Some(0), Some(0)), back, b)
                } else {
                    (vec![], op(None, Some(0)), vec![cp(at(self.recv, 0), 0)], b)
                }
            }
            CollKind::Reduce => {
                if root {
                    (
                        vec![cp(at(self.send, 0), 0)],
                        op(Some(0), Some(0)),
                        vec![cp(at(self.recv, 0), 0)],
                        b,
                    )
                } else {
                    (vec![cp(at(self.send, 0), 0)], op(Some(0), None), vec![], b)
                }
            }
            CollKind::AllGather => {
                let in_place = self.send == self.recv + (rank * big) as u64;
                let h2d = (0..n)
                    .filter(|&j| !(in_place && j == rank))
                    .map(|j| cp(at(self.recv, j), j * b))
                    .collect();
                (
                    vec![cp(at(self.send, 0), rank * b)],
                    op(Some(rank * b), Some(0)),
                    h2d,
                    n * b,
                )
            }
            CollKind::ReduceScatter => {
                let d2h = (0..n).map(|j| cp(at(self.send, j), j * b)).collect();
                (
                    d2h,
                    op(Some(0), Some(rank * b)),
                    vec![cp(at(self.recv, 0), rank * b)],
                    n * b,
                )
            }
            CollKind::AllToAll => {
                let d2h = (0..n).map(|j| cp(at(self.send, j), j * b)).collect();
                let h2d = (0..n).map(|j| cp(at(self.recv, j), (n + j) * b)).collect();
                (d2h, op(Some(0), Some(n * b)), h2d, 2 * n * b)
            }
            CollKind::Gather => {
                let h2d = if root {
                    (0..n).map(|j| cp(at(self.recv, j), (1 + j) * b)).collect()
                } else {
                    vec![]
                };
                (
                    vec![cp(at(self.send, 0), 0)],
                    op(Some(0), if root { Some(b) } else { None }),
                    h2d,
                    (n + 1) * b,
                )
            }
            CollKind::Scatter => {
                let d2h = if root {
                    (0..n).map(|j| cp(at(self.send, j), j * b)).collect()
                } else {
                    vec![]
                };
                (
                    d2h,
                    op(if root { Some(0) } else { None }, Some(n * b)),
                    vec![cp(at(self.recv, 0), n * b)],
                    (n + 1) * b,
                )
            }
            // Barrier (and, never planned, the point-to-point kinds): no data.
            _ => (vec![], op(None, None), vec![], 0),
        };
        Step {
            d2h,
            op,
            h2d,
            bytes,
        }
    }
}

/// Offsets of pieces in a slot are aligned to this (the largest element size).
const ALIGN: usize = 8;

impl P2pPlan {
    fn step(&self, i: usize) -> Step {
        let mut step = Step {
            d2h: vec![],
            op: HostOp::P2p(vec![]),
            h2d: vec![],
            bytes: 0,
        };
        let mut pieces = Vec::new();
        for (o, &q) in self.ops.iter().zip(&self.per) {
            let e0 = i * q;
            if e0 >= o.count {
                continue;
            }
            let k = q.min(o.count - e0);
            let es = o.dtype.size();
            let off = step.bytes.next_multiple_of(ALIGN);
            let cp = Copy {
                dev: o.buf + (e0 * es) as u64,
                off,
                len: k * es,
            };
            if o.send {
                step.d2h.push(cp);
            } else {
                step.h2d.push(cp);
            }
            pieces.push(Piece {
                send: o.send,
                off,
                count: k,
                dtype: o.dtype,
                peer: o.peer,
                tag: o.tag,
            });
            step.bytes = off + k * es;
        }
        step.op = HostOp::P2p(pieces);
        step
    }
}
