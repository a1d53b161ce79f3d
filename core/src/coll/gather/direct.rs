//! Direct gather.
//!
//! Step sequence: a non-root rank sends its send buffer to the root; the root copies its send
//! buffer into its block of the receive buffer (a no-op in place, where the send buffer is that
//! block) and receives block j from rank j, for j = root+1, root+2, … (mod n), all posted at
//! once.
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
            Op::Send {
                peer: root,
                src: Span::send(0, bb),
            },
            &[],
        );
        return p;
    }
    p.push(
        Op::Copy {
            src: Span::send(0, bb),
            dst: Span::recv(r * bb, bb),
        },
        &[],
    );
    for i in 1..n {
        let j = (root + i) % n;
        p.push(
            Op::Recv {
                peer: j,
                dst: Span::recv(j * bb, bb),
            },
            &[],
        );
    }
    p
}
