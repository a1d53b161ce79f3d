//! Dissemination barrier.
//!
//! Step sequence (n ranks, rank r): rounds k = 0, 1, … while 2^k < n: send a zero-byte message
//! to (r + 2^k) mod n and receive one from (r - 2^k) mod n; both operations of round k+1
//! depend on both of round k. After ⌈log2 n⌉ rounds every rank has (transitively) heard from
//! every rank. n = 1: an empty plan.
//!
//! Chunking: none (zero-byte messages; the executor must transmit them).
//!
//! busbw factor: none (no data).

use crate::coll::{Op, Plan, PlanCtx, Span};

/// Builds this rank's plan.
pub fn plan(ctx: &PlanCtx) -> Plan {
    let (n, r) = (ctx.size, ctx.rank);
    let mut p = Plan::default();
    let mut prev: Vec<u32> = Vec::new();
    let mut d = 1;
    while d < n {
        let s = p.push(
            Op::Send {
                peer: (r + d) % n,
                src: Span::send(0, 0),
            },
            &prev,
        );
        let v = p.push(
            Op::Recv {
                peer: (r + n - d) % n,
                dst: Span::recv(0, 0),
            },
            &prev,
        );
        prev = vec![s, v];
        d <<= 1;
    }
    p
}
