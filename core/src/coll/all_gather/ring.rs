//! Ring all-gather, pipelined in slices.
//!
//! Step sequence (n ranks, rank r, blocks of `count` elements, indices mod n): copy the send
//! buffer into block r of the receive buffer (an identity copy, so a no-op, in place, where
//! the send buffer is block r of the receive buffer); steps s = 0..n-2: send block r-s to r+1
//! (step 0 reads the send buffer, so it does not wait for the copy), receive block r-1-s from
//! r-1 into the receive buffer. Nothing but the copy writes block r.
//!
//! Chunking: each block is cut with `slices(.., slice_bytes, esize)`; the operations on slice
//! j of step s depend only on those on slice j of step s-1 (a received slice is forwarded as
//! soon as it arrived). count = 0: no transfers.
//!
//! busbw factor: (n-1)/n.

use crate::coll::{slices, Op, Plan, PlanCtx, Span};

/// Builds this rank's plan.
pub fn plan(ctx: &PlanCtx) -> Plan {
    let (n, r, es) = (ctx.size, ctx.rank, ctx.esize());
    let bb = ctx.count * es;
    let mut p = Plan::default();
    if bb == 0 {
        return p;
    }
    p.push(
        Op::Copy {
            src: Span::send(0, bb),
            dst: Span::recv(r * bb, bb),
        },
        &[],
    );
    if n <= 1 {
        return p;
    }
    let next = (r + 1) % n;
    let prev = (r + n - 1) % n;
    let cut = slices(0, bb, ctx.slice_bytes, es);
    let mut last: Vec<Vec<u32>> = vec![Vec::new(); cut.len()];
    for s in 0..n - 1 {
        let sb = (r + n - s) % n;
        let rb = (r + 2 * n - 1 - s) % n;
        for (&(o, l), deps) in cut.iter().zip(last.iter_mut()) {
            let src = if s == 0 {
                Span::send(o, l)
            } else {
                Span::recv(sb * bb + o, l)
            };
            let snd = p.push(Op::Send { peer: next, src }, deps);
            let rcv = p.push(
                Op::Recv {
                    peer: prev,
                    dst: Span::recv(rb * bb + o, l),
                },
                deps,
            );
            *deps = vec![snd, rcv];
        }
    }
    p
}
