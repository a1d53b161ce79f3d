//! Collective algorithms as plans.
//!
//! An algorithm is a pure function from a [`PlanCtx`] (this rank, rank count, sizes, root, ...)
//! to a [`Plan`]: a list of [`Step`]s over a small set of primitives ([`Op`]) with explicit
//! dependencies. Algorithms do no I/O; the executor (`crate::exec`) runs plans over any
//! transport, and the plan simulator (`sim`, tests only) runs them for all ranks at once.
//!
//! Wire-order rule every plan obeys: for each ordered pair of ranks (a, b), the k-th
//! `Send { peer: b }` step of a's plan (in step order) carries exactly as many bytes as the k-th
//! receiving step (`Recv`/`RecvReduce { peer: a }`) of b's plan. The executor posts the
//! operations of one peer and direction in step order.
//!
//! Buffer conventions (counts in elements, `n` ranks, `count` = [`PlanCtx::count`]):
//!
//! | kind | send buffer | recv buffer |
//! |---|---|---|
//! | all_reduce | count | count |
//! | reduce_scatter | count·n | count (this rank's block) |
//! | all_gather | count | count·n |
//! | broadcast | count (root) | count |
//! | reduce | count | count (root) |
//! | all_to_all | count·n (block j goes to rank j) | count·n (block j came from rank j) |
//! | gather | count | count·n (root) |
//! | scatter | count·n (root) | count |
//! | barrier | 0 | 0 |
//!
//! all_to_allv has no plan (counts differ per peer): `Communicator::all_to_allv` runs it on
//! the point-to-point engine.
//!
//! In-place calls pass aliasing buffers (for all_gather the send buffer is this rank's block of
//! the receive buffer; for reduce_scatter the receive buffer is this rank's block of the send
//! buffer; otherwise they are equal). Plans must be correct under that aliasing: [`Op::Copy`]
//! with identical source and destination is a no-op, and a plan never reads a send-buffer byte
//! after writing the receive-buffer byte aliased to it, except through identity copies.

pub mod order;
pub mod select;

pub mod all_gather;
pub mod all_reduce;
pub mod all_to_all;
pub mod barrier;
pub mod broadcast;
pub mod gather;
pub mod reduce;
pub mod reduce_scatter;
pub mod scatter;

#[cfg(test)]
pub mod sim;

use crate::types::{DataType, ReduceOp};

/// Which collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CollKind {
    /// All-reduce.
    AllReduce = 1,
    /// Reduce-scatter.
    ReduceScatter = 2,
    /// All-gather.
    AllGather = 3,
    /// Broadcast from root.
    Broadcast = 4,
    /// Reduce to root.
    Reduce = 5,
    /// All-to-all.
    AllToAll = 6,
    /// Gather to root.
    Gather = 7,
    /// Scatter from root.
    Scatter = 8,
    /// Barrier.
    Barrier = 9,
    /// Point-to-point (a group of sends and receives).
    P2p = 10,
    /// All-to-all with a count and displacement per peer (`MPI_Alltoallv`). It has no plan: it
    /// runs as a pairwise exchange on the point-to-point engine, one message (possibly empty)
    /// each way between every pair of ranks, ordered with the other collectives by their
    /// sequence number.
    AllToAllV = 11,
}

impl CollKind {
    /// Every kind.
    pub const ALL: [CollKind; 11] = [
        CollKind::AllReduce,
        CollKind::ReduceScatter,
        CollKind::AllGather,
        CollKind::Broadcast,
        CollKind::Reduce,
        CollKind::AllToAll,
        CollKind::Gather,
        CollKind::Scatter,
        CollKind::Barrier,
        CollKind::P2p,
        CollKind::AllToAllV,
    ];

    /// snake_case name (as braid-perf takes it).
    pub fn name(self) -> &'static str {
        match self {
            CollKind::AllReduce => "all_reduce",
            CollKind::ReduceScatter => "reduce_scatter",
            CollKind::AllGather => "all_gather",
            CollKind::Broadcast => "broadcast",
            CollKind::Reduce => "reduce",
            CollKind::AllToAll => "all_to_all",
            CollKind::Gather => "gather",
            CollKind::Scatter => "scatter",
            CollKind::Barrier => "barrier",
            CollKind::P2p => "p2p",
            CollKind::AllToAllV => "all_to_allv",
        }
    }

    /// Decodes the wire code.
    pub fn from_code(c: u8) -> Option<CollKind> {
        CollKind::ALL.iter().copied().find(|k| *k as u8 == c)
    }

    /// Whether the collective has a root.
    pub fn rooted(self) -> bool {
        matches!(
            self,
            CollKind::Broadcast | CollKind::Reduce | CollKind::Gather | CollKind::Scatter
        )
    }
}

/// Algorithm identifiers (travel in the collective signature, so ranks that chose differently
/// are caught).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Algo {
    /// Ring (all_reduce, reduce_scatter, all_gather).
    Ring = 1,
    /// Recursive doubling with a fold for non-powers of two (small all_reduce).
    RecDoubling = 2,
    /// Pipelined chain (broadcast, reduce).
    Chain = 3,
    /// Binomial tree (broadcast, reduce; latency-bound sizes).
    Tree = 4,
    /// Pairwise exchange (all_to_all).
    Pairwise = 5,
    /// Dissemination (barrier).
    Dissemination = 6,
    /// Direct to/from root (gather, scatter).
    Direct = 7,
    /// Point-to-point group.
    P2p = 8,
}

impl Algo {
    /// Every algorithm.
    pub const ALL: [Algo; 8] = [
        Algo::Ring,
        Algo::RecDoubling,
        Algo::Chain,
        Algo::Tree,
        Algo::Pairwise,
        Algo::Dissemination,
        Algo::Direct,
        Algo::P2p,
    ];

    /// Name as `BRAID_ALGO` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Algo::Ring => "ring",
            Algo::RecDoubling => "recdoubling",
            Algo::Chain => "chain",
            Algo::Tree => "tree",
            Algo::Pairwise => "pairwise",
            Algo::Dissemination => "dissemination",
            Algo::Direct => "direct",
            Algo::P2p => "p2p",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Algo> {
        Algo::ALL
            .iter()
            .copied()
            .find(|a| a.name().eq_ignore_ascii_case(s))
    }

    /// Decodes the wire code.
    pub fn from_code(c: u8) -> Option<Algo> {
        Algo::ALL.iter().copied().find(|a| *a as u8 == c)
    }
}

/// Everything an algorithm needs to build this rank's plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlanCtx {
    /// The collective.
    pub kind: CollKind,
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub size: usize,
    /// Element count as in the buffer table of this module.
    pub count: usize,
    /// Element type.
    pub dtype: DataType,
    /// Reduction operator (reductions only).
    pub op: ReduceOp,
    /// Root rank (rooted collectives; 0 otherwise).
    pub root: usize,
    /// Pipelining unit in bytes: algorithms split transfers larger than this into slices of at
    /// most this many bytes (always a multiple of the element size) so sending, receiving and
    /// reducing overlap.
    pub slice_bytes: usize,
}

impl PlanCtx {
    /// Size of one element.
    pub fn esize(&self) -> usize {
        self.dtype.size()
    }
}

/// Which buffer a span lies in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Buf {
    /// The caller's send buffer (read-only).
    Send,
    /// The caller's receive buffer.
    Recv,
    /// A temporary buffer of [`Plan::scratch_bytes`] bytes owned by the executor.
    Scratch,
}

/// A byte range in one buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Span {
    /// The buffer.
    pub buf: Buf,
    /// Offset in bytes.
    pub off: usize,
    /// Length in bytes.
    pub len: usize,
}

impl Span {
    /// A span in the send buffer.
    pub fn send(off: usize, len: usize) -> Span {
        Span {
            buf: Buf::Send,
            off,
            len,
        }
    }
    /// A span in the receive buffer.
    pub fn recv(off: usize, len: usize) -> Span {
        Span {
            buf: Buf::Recv,
            off,
            len,
        }
    }
    /// A span in the scratch buffer.
    pub fn scratch(off: usize, len: usize) -> Span {
        Span {
            buf: Buf::Scratch,
            off,
            len,
        }
    }
}

/// A primitive operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Send the bytes of `src` to `peer`.
    Send {
        /// Destination rank.
        peer: usize,
        /// What to send.
        src: Span,
    },
    /// Receive `dst.len` bytes from `peer` into `dst`.
    Recv {
        /// Source rank.
        peer: usize,
        /// Where to put them.
        dst: Span,
    },
    /// Receive `dst.len` bytes from `peer` and combine: `dst = acc ⊕ received`, elementwise
    /// with the context's operator (`acc.len == dst.len`; `acc` may be `dst`). Operand order:
    /// `acc` is the left operand. For `Avg` this sums (see [`Op::Finalize`]).
    RecvReduce {
        /// Source rank.
        peer: usize,
        /// Left operand.
        acc: Span,
        /// Result.
        dst: Span,
    },
    /// Local combine: `dst = a ⊕ b` (any of them may be the same span).
    Reduce {
        /// Left operand.
        a: Span,
        /// Right operand.
        b: Span,
        /// Result.
        dst: Span,
    },
    /// Local copy (`src == dst` is a no-op; overlapping spans are copied as by `memmove`).
    Copy {
        /// Source.
        src: Span,
        /// Destination.
        dst: Span,
    },
    /// Finishes a reduction result in place: for `Avg`, divides by the rank count; for other
    /// operators a no-op. Each result byte must be finalized exactly once, on one rank, before
    /// it is sent on (so every rank ends up with identical bits).
    Finalize {
        /// The span to finish.
        span: Span,
    },
}

/// One step: an operation and the earlier steps it waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The operation.
    pub op: Op,
    /// Indices of earlier steps (strictly smaller than this step's index) that must complete
    /// before this one starts.
    pub deps: Vec<u32>,
}

/// This rank's part of a collective.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Steps in wire order (see the module docs).
    pub steps: Vec<Step>,
    /// Bytes of scratch the executor must provide.
    pub scratch_bytes: usize,
}

impl Plan {
    /// Appends a step and returns its index.
    pub fn push(&mut self, op: Op, deps: &[u32]) -> u32 {
        let i = self.steps.len() as u32;
        self.steps.push(Step {
            op,
            deps: deps.to_vec(),
        });
        i
    }
}

/// Splits `len` bytes starting at `off` into slices of at most `slice` bytes, each a multiple
/// of `esize` (the last may be shorter). Returns (offset, length) pairs; empty for `len == 0`.
pub fn slices(off: usize, len: usize, slice: usize, esize: usize) -> Vec<(usize, usize)> {
    let step = (slice / esize).max(1) * esize;
    let mut out = Vec::with_capacity(len.div_ceil(step));
    let mut o = 0;
    while o < len {
        let l = step.min(len - o);
        out.push((off + o, l));
        o += l;
    }
    out
}

/// Splits `count` elements into `n` blocks as evenly as possible (the first `count % n` blocks
/// get one more). Returns (first element, element count) of block `i`.
pub fn block(count: usize, n: usize, i: usize) -> (usize, usize) {
    let base = count / n;
    let extra = count % n;
    let start = i * base + i.min(extra);
    let len = base + usize::from(i < extra);
    (start, len)
}
