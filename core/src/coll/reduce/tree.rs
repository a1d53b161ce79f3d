//! Binomial-tree reduce, for latency-bound sizes.
//!
//! Step sequence (virtual rank v = (rank - root) mod n): a rank receives from its children
//! v + m for m = 1, 2, 4, … below lowbit(v) (the root: below n) where v + m < n, nearest
//! first, combining each into its accumulator — the first as
//! `RecvReduce { acc: Send[j], dst: A }`, the next ones as `RecvReduce { acc: A, dst: A }` —
//! then sends A to its parent v - lowbit(v). A leaf sends its send buffer directly. The root's
//! accumulator is its receive buffer, finalized at the end (`Avg` only); other ranks'
//! accumulator is a scratch slot. n = 1: copy and finalize.
//!
//! Chunking: the message is cut with `slices(.., slice_bytes, esize)` (one slice for the small
//! messages this algorithm is chosen for); slice j uses scratch slot j mod `SLOTS`, whose
//! first receive waits for the send of slice j - SLOTS. Scratch is at most SLOTS × slice_bytes,
//! on inner non-root ranks only. count = 0: no transfers.
//!
//! busbw factor: 1.

use super::SLOTS;
use crate::coll::broadcast::binomial;
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
    let real = |x: usize| (x + ctx.root) % n;
    let (parent, mut children) = binomial(v, n);
    children.reverse(); // nearest (smallest subtree, done first) first
    let cut = slices(0, len, ctx.slice_bytes, es);
    let step = (ctx.slice_bytes / es).max(1) * es;
    if children.is_empty() {
        match parent {
            None => {
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
            }
            Some(pv) => {
                for &(o, l) in &cut {
                    p.push(
                        Op::Send {
                            peer: real(pv),
                            src: Span::send(o, l),
                        },
                        &[],
                    );
                }
            }
        }
        return p;
    }
    let mut sends: Vec<u32> = Vec::with_capacity(cut.len());
    for (j, &(o, l)) in cut.iter().enumerate() {
        let acc_span = match parent {
            None => Span::recv(o, l),
            Some(_) => Span::scratch((j % SLOTS) * step, l),
        };
        let mut deps: Vec<u32> = match parent {
            Some(_) => j.checked_sub(SLOTS).map(|k| sends[k]).into_iter().collect(),
            None => Vec::new(),
        };
        let mut acc = Span::send(o, l);
        for &c in &children {
            let rr = p.push(
                Op::RecvReduce {
                    peer: real(c),
                    acc,
                    dst: acc_span,
                },
                &deps,
            );
            deps = vec![rr];
            acc = acc_span;
        }
        match parent {
            None => {
                if avg {
                    p.push(Op::Finalize { span: acc_span }, &deps);
                }
            }
            Some(pv) => sends.push(p.push(
                Op::Send {
                    peer: real(pv),
                    src: acc_span,
                },
                &deps,
            )),
        }
    }
    if parent.is_some() {
        p.scratch_bytes = cut.len().min(SLOTS) * step;
    }
    p
}
