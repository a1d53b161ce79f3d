//! Ring reduce-scatter, pipelined in slices.
//!
//! Step sequence (n ranks, rank r, blocks of `count` elements, indices mod n): steps
//! s = 0..n-2: send block r-1-s to r+1; receive block r-2-s from r-1 and reduce it with this
//! rank's contribution, `RecvReduce { acc: Send[b], dst }`. Step 0 sends straight from the
//! send buffer; step s ≥ 1 sends what step s-1 reduced. The last step receives block r into
//! the receive buffer, which then gets `Finalize` (`Avg` only). n = 1: copy and finalize.
//!
//! Intermediate partial sums cannot go to the send buffer (read-only) nor to the receive buffer
//! (in place it is this rank's block of the send buffer, still needed as `acc` of the last
//! step), so they alternate between two scratch slots of one block each (by step parity):
//! scratch is 2·count·esize for n ≥ 4, count·esize for n = 3, 0 for n ≤ 2.
//!
//! Chunking: each block is cut with `slices(.., slice_bytes, esize)`; the operations on slice
//! j of step s depend only on those on slice j of step s-1 (which also orders the reuse of a
//! scratch slot after the send that read it). count = 0: no transfers.
//!
//! busbw factor: (n-1)/n.

use crate::coll::{slices, Op, Plan, PlanCtx, Span};
use crate::types::ReduceOp;

/// Builds this rank's plan.
pub fn plan(ctx: &PlanCtx) -> Plan {
    let (n, r, es) = (ctx.size, ctx.rank, ctx.esize());
    let avg = ctx.op == ReduceOp::Avg;
    let bb = ctx.count * es;
    let mut p = Plan::default();
    if bb == 0 {
        return p;
    }
    if n <= 1 {
        let c = p.push(
            Op::Copy {
                src: Span::send(0, bb),
                dst: Span::recv(0, bb),
            },
            &[],
        );
        if avg {
            p.push(
                Op::Finalize {
                    span: Span::recv(0, bb),
                },
                &[c],
            );
        }
        return p;
    }
    let next = (r + 1) % n;
    let prev = (r + n - 1) % n;
    let cut = slices(0, bb, ctx.slice_bytes, es);
    let mut last: Vec<Vec<u32>> = vec![Vec::new(); cut.len()];
    // Where step s puts its result (relative offset `o` in the block).
    let result = |s: usize, o: usize, l: usize| {
        if s == n - 2 {
            Span::recv(o, l)
        } else {
            Span::scratch((s % 2) * bb + o, l)
        }
    };
    for s in 0..n - 1 {
        let sb = (r + 2 * n - 1 - s) % n;
        let rb = (r + 2 * n - 2 - s) % n;
        for (&(o, l), deps) in cut.iter().zip(last.iter_mut()) {
            let src = if s == 0 {
                Span::send(sb * bb + o, l)
            } else {
                result(s - 1, o, l)
            };
            let snd = p.push(Op::Send { peer: next, src }, deps);
            let dst = result(s, o, l);
            let rr = p.push(
                Op::RecvReduce {
                    peer: prev,
                    acc: Span::send(rb * bb + o, l),
                    dst,
                },
                deps,
            );
            *deps = vec![snd, rr];
            if s == n - 2 && avg {
                p.push(Op::Finalize { span: dst }, &[rr]);
            }
        }
    }
    p.scratch_bytes = match n {
        0..=2 => 0,
        3 => bb,
        _ => 2 * bb,
    };
    p
}
