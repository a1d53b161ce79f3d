//! Pairwise-exchange all-to-all.
//!
//! Step sequence (n ranks, rank r, blocks of `count` elements, indices mod n): copy block r of
//! the send buffer to block r of the receive buffer (a no-op in place); steps k = 1..n-1: send
//! block r+k to rank r+k, receive block r-k from rank r-k.
//!
//! In place (send and receive buffers are the same memory, which a plan cannot tell) the block
//! received at step k, r-k, overwrites send block r-k, which leaves at step n-k:
//! - if k > n/2, that send came earlier: the receive goes straight into the receive buffer and
//!   depends on that send having completed;
//! - if k ≤ n/2, it has not left yet (or leaves in this very step, k = n/2): the receive goes
//!   into its own scratch block, copied to the receive buffer once the send of step n-k
//!   completed (the copy is placed at step n-k).
//!
//! Scratch is ⌊n/2⌋ blocks (⌊n/2⌋·count·esize bytes), and ⌊n/2⌋ blocks are copied locally once;
//! the other receives land in place. Both happen out of place too (a plan does not know).
//!
//! Chunking: none: one message per pair, sends never wait. count = 0: no transfers.
//!
//! busbw factor: (n-1)/n.

use crate::coll::{Op, Plan, PlanCtx, Span};

/// Builds this rank's plan.
pub fn plan(ctx: &PlanCtx) -> Plan {
    let (n, r) = (ctx.size, ctx.rank);
    let bb = ctx.count * ctx.esize();
    let mut p = Plan::default();
    if bb == 0 {
        return p;
    }
    p.push(
        Op::Copy {
            src: Span::send(r * bb, bb),
            dst: Span::recv(r * bb, bb),
        },
        &[],
    );
    // sends[k] = step index of the send of step k.
    let mut sends: Vec<u32> = vec![0; n];
    // scratch_recv[k] = (step index of the receive into scratch of step k, slot).
    let mut scratch_recv: Vec<Option<(u32, usize)>> = vec![None; n];
    let mut slots = 0;
    for k in 1..n {
        let to = (r + k) % n;
        let from = (r + n - k) % n;
        sends[k] = p.push(
            Op::Send {
                peer: to,
                src: Span::send(to * bb, bb),
            },
            &[],
        );
        if 2 * k > n {
            p.push(
                Op::Recv {
                    peer: from,
                    dst: Span::recv(from * bb, bb),
                },
                &[sends[n - k]],
            );
        } else {
            let slot = slots;
            slots += 1;
            let i = p.push(
                Op::Recv {
                    peer: from,
                    dst: Span::scratch(slot * bb, bb),
                },
                &[],
            );
            scratch_recv[k] = Some((i, slot));
        }
        // The scratch receive whose block just left (step n-k ≤ k) can be moved in place.
        if let Some((i, slot)) = scratch_recv[n - k] {
            let src_rank = (r + k) % n; // = r - (n-k)
            p.push(
                Op::Copy {
                    src: Span::scratch(slot * bb, bb),
                    dst: Span::recv(src_rank * bb, bb),
                },
                &[i, sends[k]],
            );
        }
    }
    p.scratch_bytes = slots * bb;
    p
}
