//! Pipelined chain broadcast.
//!
//! Step sequence (virtual rank v = (rank - root) mod n, chain root → root+1 → … → root+n-1):
//! the root copies its send buffer to its receive buffer (a no-op in place) and sends every
//! slice of the send buffer to v+1; a rank 0 < v < n-1 receives each slice from v-1 into its
//! receive buffer and forwards it to v+1 as soon as it arrived; the last rank only receives.
//!
//! Chunking: `slices(0, count·esize, slice_bytes, esize)`; slice j's forward depends only on
//! slice j's receive, so every link of the chain is busy at once. count = 0: no transfers.
//!
//! busbw factor: 1.

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
    let next = (r + 1) % n;
    let prev = (r + n - 1) % n;
    let cut = slices(0, len, ctx.slice_bytes, es);
    if v == 0 {
        p.push(
            Op::Copy {
                src: Span::send(0, len),
                dst: Span::recv(0, len),
            },
            &[],
        );
        if n > 1 {
            for &(o, l) in &cut {
                p.push(
                    Op::Send {
                        peer: next,
                        src: Span::send(o, l),
                    },
                    &[],
                );
            }
        }
        return p;
    }
    for &(o, l) in &cut {
        let rcv = p.push(
            Op::Recv {
                peer: prev,
                dst: Span::recv(o, l),
            },
            &[],
        );
        if v + 1 < n {
            p.push(
                Op::Send {
                    peer: next,
                    src: Span::recv(o, l),
                },
                &[rcv],
            );
        }
    }
    p
}
