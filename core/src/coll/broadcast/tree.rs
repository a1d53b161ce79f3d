//! Binomial-tree broadcast, for latency-bound sizes.
//!
//! Step sequence (virtual rank v = (rank - root) mod n): a rank v > 0 receives from its parent
//! v - lowbit(v), then sends to its children v + m for m = lowbit(v)/2, …, 2, 1 (the root:
//! for every power of two m < n, largest first) where v + m < n: farthest subtree first, so
//! the tree finishes in ⌈log2 n⌉ rounds. The root copies send → receive buffer (a no-op in
//! place) and sends from its send buffer.
//!
//! Chunking: the message is cut with `slices(.., slice_bytes, esize)` and each slice is
//! forwarded as soon as it arrived (for the small messages this algorithm is chosen for, that
//! is one slice). count = 0: no transfers.
//!
//! busbw factor: 1.

use super::binomial;
use crate::coll::{slices, Op, Plan, PlanCtx, Span};

/// Builds this rank's plan.
pub fn plan(ctx: &PlanCtx) -> Plan {
    let (n, r, es) = (ctx.size, ctx.rank, ctx.esize());
    let len = ctx.count * es;
    let mut p = Plan::default();
    if len == 0 {
        return p;
    }
    let v = (r + n - ctx.root) % n;
    let real = |x: usize| (x + ctx.root) % n;
    let (parent, children) = binomial(v, n);
    let cut = slices(0, len, ctx.slice_bytes, es);
    if parent.is_none() {
        p.push(
            Op::Copy {
                src: Span::send(0, len),
                dst: Span::recv(0, len),
            },
            &[],
        );
    }
    for &(o, l) in &cut {
        let (src, deps) = match parent {
            None => (Span::send(o, l), Vec::new()),
            Some(pv) => {
                let rcv = p.push(
                    Op::Recv {
                        peer: real(pv),
                        dst: Span::recv(o, l),
                    },
                    &[],
                );
                (Span::recv(o, l), vec![rcv])
            }
        };
        for &c in &children {
            p.push(Op::Send { peer: real(c), src }, &deps);
        }
    }
    p
}
