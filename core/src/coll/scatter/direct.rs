//! Direct scatter.
//!
//! Step sequence: the root sends block j of its send buffer to rank j, for j = root+1,
//! root+2, … (mod n), all posted at once, and copies its own block to its receive buffer (a
//! no-op in place, where the receive buffer is that block); a non-root rank receives its block
//! from the root.
//!
//! Chunking: none (one message per rank). count = 0: no transfers.
//!
//! busbw factor: (n-1)/n.

use crate::coll::{Op, Plan, PlanCtx, Span};

/// Builds this rank's plan.
pub fn plan(ctx: &PlanCtx) -> Plan {
    let (n, r, root) = (ctx.size, ctx.rank, ctx.root);
    let bb = ctx.count * ctx.esize();
    let mut p = Plan::default();
    if bb == 0 {
        return p;
    }
    if r != root {
        p.push(
            Op::Recv {
                peer: root,
                dst: Span::recv(0, bb),
            },
            &[],
        );
        return p;
    }
    for i in 1..n {
        let j = (root + i) % n;
        p.push(
            Op::Send {
                peer: j,
                src: Span::send(j * bb, bb),
            },
            &[],
        );
    }
    p.push(
        Op::Copy {
            src: Span::send(r * bb, bb),
            dst: Span::recv(0, bb),
        },
        &[],
    );
    p
}
