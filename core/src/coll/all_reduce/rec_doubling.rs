//! Recursive-doubling all-reduce for small (latency-bound) messages, with a fold for rank
//! counts that are not powers of two.
//!
//! Step sequence (n ranks, p = largest power of two ≤ n, m = n - p):
//! 1. Fold: among the first 2m ranks, odd rank r sends its whole buffer to r-1 and waits;
//!    even rank r receives it into scratch and combines `Send ⊕ scratch` into the receive
//!    buffer. The p remaining ranks ("participants": the even ranks below 2m and every rank
//!    from 2m on) get virtual ranks 0..p in rank order.
//! 2. For d = 1, 2, 4, …, p/2: exchange the current value with the participant whose virtual
//!    rank differs in bit d (send the current value, receive the partner's into a free
//!    location) and combine as `lower-rank value ⊕ higher-rank value`. Both partners compute
//!    the same expression, so after the last round every participant holds identical bits.
//! 3. `Finalize` (`Avg` only) on every participant: identical input bits give identical output.
//! 4. Unfold: even rank r < 2m sends the result to r+1, which receives it into its receive
//!    buffer.
//!
//! Locations: the value starts in the send buffer (read-only) and then lives in either the
//! receive buffer or the one scratch slot; each round receives into the location that does not
//! hold the value and writes the combination into a location that is neither read by the
//! round's send nor aliased to an operand other than the left one (`dst` equals `a` or is
//! distinct from both), so every `Reduce` keeps the lower-rank operand on the left whatever
//! the executor's aliasing shortcut. A final `Copy` moves the value into the receive buffer if
//! it ended in scratch. Dependencies are derived from whole-buffer hazards, with the send and
//! receive buffers treated as one (in-place calls alias them).
//!
//! Chunking: none (messages are small; one transfer per round). Scratch: the message size.
//! Zero-length messages (count = 0) produce an empty plan.
//!
//! busbw factor (nccl-tests convention for all_reduce): 2(n-1)/n.

use crate::coll::{Op, Plan, PlanCtx, Span};
use crate::types::ReduceOp;

/// Where a value lives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Loc {
    Send,
    Recv,
    Scratch,
}

impl Loc {
    fn span(self, len: usize) -> Span {
        match self {
            Loc::Send => Span::send(0, len),
            Loc::Recv => Span::recv(0, len),
            Loc::Scratch => Span::scratch(0, len),
        }
    }
    /// Hazard class: send and receive buffers may alias.
    fn class(self) -> usize {
        match self {
            Loc::Send | Loc::Recv => 0,
            Loc::Scratch => 1,
        }
    }
}

/// Whole-buffer hazard tracking: last writer and readers since, per hazard class.
#[derive(Default)]
struct Hazards {
    writer: [Option<u32>; 2],
    readers: [Vec<u32>; 2],
}

impl Hazards {
    /// Pushes `op` reading `reads` and writing `write`, with the RAW/WAR/WAW dependencies.
    fn push(&mut self, p: &mut Plan, op: Op, reads: &[Loc], write: Option<Loc>) -> u32 {
        let mut deps: Vec<u32> = Vec::new();
        for l in reads {
            deps.extend(self.writer[l.class()]);
        }
        if let Some(w) = write {
            deps.extend(self.writer[w.class()]);
            deps.extend(self.readers[w.class()].iter().copied());
        }
        deps.sort_unstable();
        deps.dedup();
        let i = p.push(op, &deps);
        for l in reads {
            self.readers[l.class()].push(i);
        }
        if let Some(w) = write {
            self.writer[w.class()] = Some(i);
            self.readers[w.class()].clear();
        }
        i
    }
}

/// Builds this rank's plan.
pub fn plan(ctx: &PlanCtx) -> Plan {
    let (n, r) = (ctx.size, ctx.rank);
    let len = ctx.count * ctx.esize();
    let avg = ctx.op == ReduceOp::Avg;
    let mut p = Plan::default();
    if len == 0 {
        return p;
    }
    let mut h = Hazards::default();
    let pw = if n == 0 {
        1
    } else {
        1usize << (usize::BITS - 1 - n.leading_zeros())
    };
    let m = n.saturating_sub(pw);
    // Virtual rank among the participants, or None for odd folded ranks.
    let vrank = |x: usize| -> Option<usize> {
        if x < 2 * m {
            (x % 2 == 0).then_some(x / 2)
        } else {
            Some(x - m)
        }
    };
    let real = |v: usize| if v < m { 2 * v } else { v + m };

    let Some(v) = vrank(r) else {
        // Odd folded rank: hand the value to r-1, get the result back.
        h.push(
            &mut p,
            Op::Send {
                peer: r - 1,
                src: Loc::Send.span(len),
            },
            &[Loc::Send],
            None,
        );
        h.push(
            &mut p,
            Op::Recv {
                peer: r - 1,
                dst: Loc::Recv.span(len),
            },
            &[],
            Some(Loc::Recv),
        );
        return p;
    };

    let mut cur = Loc::Send;
    if r < 2 * m {
        // Even folded rank: combine with r+1's value (this rank is the lower one).
        h.push(
            &mut p,
            Op::Recv {
                peer: r + 1,
                dst: Loc::Scratch.span(len),
            },
            &[],
            Some(Loc::Scratch),
        );
        h.push(
            &mut p,
            Op::Reduce {
                a: Loc::Send.span(len),
                b: Loc::Scratch.span(len),
                dst: Loc::Recv.span(len),
            },
            &[Loc::Send, Loc::Scratch],
            Some(Loc::Recv),
        );
        cur = Loc::Recv;
    }
    let mut d = 1;
    while d < pw {
        let pv = v ^ d;
        let peer = real(pv);
        let tmp = if cur == Loc::Scratch {
            Loc::Recv
        } else {
            Loc::Scratch
        };
        h.push(
            &mut p,
            Op::Send {
                peer,
                src: cur.span(len),
            },
            &[cur],
            None,
        );
        h.push(
            &mut p,
            Op::Recv {
                peer,
                dst: tmp.span(len),
            },
            &[],
            Some(tmp),
        );
        let (a, b, dst) = if v < pv {
            // Mine is the left operand: write over mine (or into Recv if mine is read-only).
            let dst = if cur == Loc::Send { Loc::Recv } else { cur };
            (cur, tmp, dst)
        } else {
            (tmp, cur, tmp)
        };
        h.push(
            &mut p,
            Op::Reduce {
                a: a.span(len),
                b: b.span(len),
                dst: dst.span(len),
            },
            &[a, b],
            Some(dst),
        );
        cur = dst;
        d <<= 1;
    }
    if cur == Loc::Send {
        // n == 1.
        h.push(
            &mut p,
            Op::Copy {
                src: cur.span(len),
                dst: Loc::Recv.span(len),
            },
            &[cur],
            Some(Loc::Recv),
        );
        cur = Loc::Recv;
    }
    if avg {
        h.push(
            &mut p,
            Op::Finalize {
                span: cur.span(len),
            },
            &[cur],
            Some(cur),
        );
    }
    if cur != Loc::Recv {
        h.push(
            &mut p,
            Op::Copy {
                src: cur.span(len),
                dst: Loc::Recv.span(len),
            },
            &[cur],
            Some(Loc::Recv),
        );
    }
    if r < 2 * m {
        h.push(
            &mut p,
            Op::Send {
                peer: r + 1,
                src: Loc::Recv.span(len),
            },
            &[Loc::Recv],
            None,
        );
    }
    p.scratch_bytes = len;
    p
}
