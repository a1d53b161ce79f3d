//! Host-aware ring order.
//!
//! Ring and chain algorithms send to the next rank in ring order. When ranks of one host are not
//! numbered contiguously (hosts a, b, a, b), the rank-order ring crosses host boundaries at
//! every hop. [`host_ring`] orders ranks host by host (hosts in order of their lowest rank,
//! ranks ascending within a host), and [`plan_in_order`] builds a plan in that virtual order
//! and maps it back to real ranks: peers are translated, and for the collectives whose buffers
//! are laid out per rank (reduce_scatter's send blocks, all_gather's receive blocks) block
//! offsets too, so results land exactly where the rank-order plan would put them.

use crate::coll::{select, Algo, Buf, CollKind, Op, Plan, PlanCtx, Span};
use crate::error::{Error, Result};

/// Ring order for ranks whose host ids are `hosts` (index = rank). `ring[v]` is the rank at
/// position `v`.
pub fn host_ring(hosts: &[&str]) -> Vec<usize> {
    let mut order: Vec<&str> = Vec::new();
    for h in hosts {
        if !order.contains(h) {
            order.push(h);
        }
    }
    let mut ring = Vec::with_capacity(hosts.len());
    for h in order {
        ring.extend(
            hosts
                .iter()
                .enumerate()
                .filter(|(_, x)| **x == h)
                .map(|(r, _)| r),
        );
    }
    ring
}

/// Whether `algo` sends along the ring order (and so benefits from a host-aware order).
pub fn follows_ring(algo: Algo) -> bool {
    matches!(algo, Algo::Ring | Algo::Chain)
}

/// Builds `algo`'s plan for `ctx` with the ring order `ring` (a permutation of the ranks) and
/// returns it in real ranks.
pub fn plan_in_order(ctx: &PlanCtx, algo: Algo, ring: &[usize]) -> Result<Plan> {
    let n = ctx.size;
    if ring.len() != n {
        return Err(Error::Internal(format!(
            "ring order of {} ranks for {n} ranks",
            ring.len()
        )));
    }
    let mut inv = vec![usize::MAX; n];
    for (v, &r) in ring.iter().enumerate() {
        if r >= n || inv[r] != usize::MAX {
            return Err(Error::Internal("ring order is not a permutation".into()));
        }
        inv[r] = v;
    }
    let mut vctx = *ctx;
    vctx.rank = inv[ctx.rank];
    if ctx.kind.rooted() {
        vctx.root = inv[ctx.root];
    }
    let mut plan = select::plan(&vctx, algo)?;
    let blk = ctx.count * ctx.esize();
    let per_rank = match ctx.kind {
        CollKind::ReduceScatter => Some(Buf::Send),
        CollKind::AllGather => Some(Buf::Recv),
        _ => None,
    };
    let fix = |s: &mut Span| -> Result<()> {
        if Some(s.buf) == per_rank && blk > 0 && s.len > 0 {
            let (b, within) = (s.off / blk, s.off % blk);
            if within + s.len > blk || b >= n {
                return Err(Error::Internal("a span crosses a per-rank block".into()));
            }
            s.off = ring[b] * blk + within;
        }
        Ok(())
    };
    for st in plan.steps.iter_mut() {
        match &mut st.op {
            Op::Send { peer, src } => {
                *peer = ring[*peer];
                fix(src)?;
            }
            Op::Recv { peer, dst } => {
                *peer = ring[*peer];
                fix(dst)?;
            }
            Op::RecvReduce { peer, acc, dst } => {
                *peer = ring[*peer];
                fix(acc)?;
                fix(dst)?;
            }
            Op::Reduce { a, b, dst } => {
                fix(a)?;
                fix(b)?;
                fix(dst)?;
            }
            Op::Copy { src, dst } => {
                fix(src)?;
                fix(dst)?;
            }
            Op::Finalize { span } => fix(span)?,
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_hosts_in_order_of_their_lowest_rank() {
        assert_eq!(host_ring(&["a", "b", "a", "b"]), vec![0, 2, 1, 3]);
        assert_eq!(host_ring(&["x", "x", "y"]), vec![0, 1, 2]);
        assert_eq!(host_ring(&["b", "a", "c", "a", "b"]), vec![0, 4, 1, 3, 2]);
        assert_eq!(host_ring(&[]), Vec::<usize>::new());
    }

    #[test]
    fn ring_neighbours_stay_on_the_host() {
        use crate::types::{DataType, ReduceOp};
        let ring = host_ring(&["a", "b", "a", "b"]);
        let ctx = PlanCtx {
            kind: CollKind::AllReduce,
            rank: 0,
            size: 4,
            count: 4096,
            dtype: DataType::F32,
            op: ReduceOp::Sum,
            root: 0,
            slice_bytes: 4096,
        };
        let plan = plan_in_order(&ctx, Algo::Ring, &ring).unwrap();
        // Rank 0 sits between 3 (previous) and 2 (next) in the ring 0,2,1,3.
        for st in &plan.steps {
            match st.op {
                Op::Send { peer, .. } => assert_eq!(peer, 2),
                Op::Recv { peer, .. } | Op::RecvReduce { peer, .. } => assert_eq!(peer, 3),
                _ => {}
            }
        }
    }
}
