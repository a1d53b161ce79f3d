//! Pipelined chain reduce towards the root.
//!
//! Step sequence (virtual rank v = (rank - root) mod n, chain root+n-1 → … → root+1 → root):
//! the last rank (v = n-1) sends each slice of its send buffer to v-1; a rank 0 < v < n-1
//! receives slice j from v+1 reducing it with its own contribution into a scratch slot
//! (`RecvReduce { acc: Send[j], dst: slot }`) and sends the slot on to v-1; the root receives
//! into its receive buffer (`acc: Send[j]`, which is the same span in place) and finalizes
//! each slice (`Avg` only). n = 1: copy and finalize.
//!
//! Chunking: `slices(0, count·esize, slice_bytes, esize)`. Intermediate ranks cycle through
//! `SLOTS` scratch slots of one slice: slice j uses slot j mod SLOTS, and its receive waits
//! for the send of slice j - SLOTS (the previous user of the slot) to complete. Scratch is at
//! most SLOTS × slice_bytes, on intermediate ranks only. count = 0: no transfers.
//!
//! busbw factor: 1.

use super::SLOTS;
use crate::coll::{slices, Op, Plan, PlanCtx, Span};
use crate::types::ReduceOp;

/// Builds this rank's plan.
pub fn plan(ctx: &PlanCtx) -> Plan {
    let (n, r, es) = (ctx.size, ctx.rank, ctx.esize());
    let avg = ctx.op == ReduceOp::Avg;
    let len = ctx.count * es;
    let mut p = Plan::default();
    if len == 0 {
        return p;
    }
    let v = (r + n - ctx.root) % n;
    let up = (r + 1) % n; // v + 1: farther from the root
    let down = (r + n - 1) % n; // v - 1: towards the root
    let cut = slices(0, len, ctx.slice_bytes, es);
    if n <= 1 {
        let c = p.push(
            Op::Copy {
                src: Span::send(0, len),
                dst: Span::recv(0, len),
            },
            &[],
        );
        if avg {
            p.push(
                Op::Finalize {
                    span: Span::recv(0, len),
                },
                &[c],
            );
        }
        return p;
    }
    if v == 0 {
        for &(o, l) in &cut {
            let rr = p.push(
                Op::RecvReduce {
                    peer: up,
                    acc: Span::send(o, l),
                    dst: Span::recv(o, l),
                },
                &[],
            );
            if avg {
                p.push(
                    Op::Finalize {
                        span: Span::recv(o, l),
                    },
                    &[rr],
                );
            }
        }
        return p;
    }
    if v == n - 1 {
        for &(o, l) in &cut {
            p.push(
                Op::Send {
                    peer: down,
                    src: Span::send(o, l),
                },
                &[],
            );
        }
        return p;
    }
    let step = (ctx.slice_bytes / es).max(1) * es;
    let mut sends: Vec<u32> = Vec::with_capacity(cut.len());
    for (j, &(o, l)) in cut.iter().enumerate() {
        let slot = Span::scratch((j % SLOTS) * step, l);
        let deps: Vec<u32> = j.checked_sub(SLOTS).map(|k| sends[k]).into_iter().collect();
        let rr = p.push(
            Op::RecvReduce {
                peer: up,
                acc: Span::send(o, l),
                dst: slot,
            },
            &deps,
        );
        sends.push(p.push(
            Op::Send {
                peer: down,
                src: slot,
            },
            &[rr],
        ));
    }
    p.scratch_bytes = cut.len().min(SLOTS) * step;
    p
}
