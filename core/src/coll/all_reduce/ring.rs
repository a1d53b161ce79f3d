//! Ring all-reduce: a reduce-scatter followed by an all-gather around the ring
//! r → r+1 → … → r-1 → r, pipelined in slices.
//!
//! Step sequence (n ranks, rank r, blocks `block(count, n, b)`, indices mod n):
//! - reduce-scatter, steps s = 0..n-2: send block r-1-s to r+1; receive block r-2-s from r-1
//!   and reduce it with this rank's contribution: `RecvReduce { acc: Send[b], dst: Recv[b] }`.
//!   Step 0 sends straight from the send buffer; later steps send what the previous step
//!   reduced into the receive buffer. After step n-2 rank r holds the full reduction of block
//!   r, which gets `Finalize` (`Avg` only) before it is sent on.
//! - all-gather, steps s = 0..n-2: send block r-s, receive block r-1-s into the receive buffer.
//!
//! Every block of the receive buffer is written (block r-1, sent first from the send buffer,
//! arrives in all-gather step 0), nothing is copied locally, no scratch is used.
//!
//! Chunking: each block is cut with `slices(.., slice_bytes, esize)`; the operations on slice
//! j of a step depend only on the operations on slice j of the previous step (which orders
//! every access to slice j of any block, and so makes in-place calls safe), so slices flow
//! through the ring independently and sending, receiving and reducing overlap. Empty blocks
//! (count < n) have no slices and so no transfers, on both sides alike.
//!
//! busbw factor: 2(n-1)/n.

use crate::coll::{block, slices, Buf, Op, Plan, PlanCtx, Span};
use crate::types::ReduceOp;

/// Builds this rank's plan.
pub fn plan(ctx: &PlanCtx) -> Plan {
    let (n, r, es) = (ctx.size, ctx.rank, ctx.esize());
    let avg = ctx.op == ReduceOp::Avg;
    let mut p = Plan::default();
    let total = ctx.count * es;
    if n <= 1 {
        if total > 0 {
            let c = p.push(
                Op::Copy {
                    src: Span::send(0, total),
                    dst: Span::recv(0, total),
                },
                &[],
            );
            if avg {
                p.push(
                    Op::Finalize {
                        span: Span::recv(0, total),
                    },
                    &[c],
                );
            }
        }
        return p;
    }
    let next = (r + 1) % n;
    let prev = (r + n - 1) % n;
    let cut = |b: usize| {
        let (s, l) = block(ctx.count, n, b % n);
        slices(s * es, l * es, ctx.slice_bytes, es)
    };
    // Block 0 is the largest: it has the most slices.
    let mut last: Vec<Vec<u32>> = vec![Vec::new(); cut(0).len()];

    // Reduce-scatter.
    for s in 0..n - 1 {
        let sb = cut(r + 2 * n - 1 - s);
        let rb = cut(r + 2 * n - 2 - s);
        let src_buf = if s == 0 { Buf::Send } else { Buf::Recv };
        for (j, deps) in last.iter_mut().enumerate() {
            let mut now = Vec::new();
            if let Some(&(off, len)) = sb.get(j) {
                let src = Span {
                    buf: src_buf,
                    off,
                    len,
                };
                now.push(p.push(Op::Send { peer: next, src }, deps));
            }
            if let Some(&(off, len)) = rb.get(j) {
                let rr = p.push(
                    Op::RecvReduce {
                        peer: prev,
                        acc: Span::send(off, len),
                        dst: Span::recv(off, len),
                    },
                    deps,
                );
                if s == n - 2 && avg {
                    // Later steps wait for the finalize (which waits for the receive).
                    now.push(p.push(
                        Op::Finalize {
                            span: Span::recv(off, len),
                        },
                        &[rr],
                    ));
                } else {
                    now.push(rr);
                }
            }
            if !now.is_empty() {
                *deps = now;
            }
        }
    }
    // All-gather.
    for s in 0..n - 1 {
        let sb = cut(r + n - s);
        let rb = cut(r + 2 * n - 1 - s);
        for (j, deps) in last.iter_mut().enumerate() {
            let mut now = Vec::new();
            if let Some(&(off, len)) = sb.get(j) {
                now.push(p.push(
                    Op::Send {
                        peer: next,
                        src: Span::recv(off, len),
                    },
                    deps,
                ));
            }
            if let Some(&(off, len)) = rb.get(j) {
                now.push(p.push(
                    Op::Recv {
                        peer: prev,
                        dst: Span::recv(off, len),
                    },
                    deps,
                ));
            }
            if !now.is_empty() {
                *deps = now;
            }
        }
    }
    p
}
