//! Algorithm selection: the one place that decides which algorithm runs a collective.
//!
//! [`Policy`] holds the `BRAID_ALGO` overrides and the small-message threshold
//! (`BRAID_SMALL_BYTES`); [`Policy::choose`] picks an [`Algo`] from the collective, the rank
//! count and the message size; [`plan`] builds the plan of a chosen algorithm.
//!
//! Defaults:
//!
//! | collective | algorithm |
//! |---|---|
//! | all_reduce | recdoubling if bytes ≤ small_bytes or n = 1, else ring |
//! | reduce_scatter, all_gather | ring |
//! | broadcast, reduce | tree if bytes ≤ small_bytes, else chain |
//! | all_to_all | pairwise |
//! | barrier | dissemination |
//! | gather, scatter | direct |
//! | p2p | p2p (plans are built by the p2p module, not here) |
//! | all_to_allv | none: a pairwise exchange on the point-to-point engine |
//!
//! Every rank must choose the same algorithm (the choice travels in the collective signature
//! and a mismatch is reported): choices depend only on arguments that are equal on all ranks.

use super::{all_gather, all_reduce, all_to_all, barrier, broadcast, gather, reduce};
use super::{reduce_scatter, scatter, Algo, CollKind, Plan, PlanCtx};
use crate::error::{Error, Result};

/// The algorithms that can run a collective, default-preference order aside.
pub fn valid(kind: CollKind) -> &'static [Algo] {
    match kind {
        CollKind::AllReduce => &[Algo::Ring, Algo::RecDoubling],
        CollKind::ReduceScatter | CollKind::AllGather => &[Algo::Ring],
        CollKind::Broadcast | CollKind::Reduce => &[Algo::Chain, Algo::Tree],
        CollKind::AllToAll => &[Algo::Pairwise],
        CollKind::Barrier => &[Algo::Dissemination],
        CollKind::Gather | CollKind::Scatter => &[Algo::Direct],
        CollKind::P2p => &[Algo::P2p],
        // Runs on the point-to-point engine (`Communicator::all_to_allv`), never from a plan.
        CollKind::AllToAllV => &[],
    }
}

/// Algorithm-selection policy: `BRAID_ALGO` overrides plus the small-message threshold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// A global override (`BRAID_ALGO=ring`): used wherever it is valid, ignored elsewhere.
    global: Option<Algo>,
    /// Per-collective overrides (`all_reduce=ring`), indexed by `CollKind as usize` (codes
    /// run from 1 to the number of kinds).
    per_kind: [Option<Algo>; CollKind::ALL.len() + 1],
    /// Messages up to this many bytes count as small (latency-bound).
    small_bytes: usize,
}

impl Policy {
    /// Parses `BRAID_ALGO`: empty for the defaults; a comma-separated list of items, each
    /// either an algorithm name (`ring`: use it for every collective where it is valid) or
    /// `collective=algorithm` with the names of [`CollKind::name`] and [`Algo::name`]
    /// (`all_reduce=recdoubling,broadcast=chain`). Spaces around items are ignored, names are
    /// case-insensitive, later items override earlier ones. `small_bytes` is the
    /// small-message threshold (`BRAID_SMALL_BYTES`).
    ///
    /// Errors: [`Error::InvalidArgument`] naming the first unknown collective or algorithm
    /// name, or an item with an empty side. Whether an algorithm suits a collective is checked
    /// by [`Policy::choose`].
    pub fn parse(braid_algo: &str, small_bytes: usize) -> Result<Policy> {
        let mut p = Policy {
            small_bytes,
            ..Policy::default()
        };
        for item in braid_algo.split(',') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let bad = |what: &str, tok: &str| {
                Err(Error::InvalidArgument(format!(
                    "BRAID_ALGO: unknown {what} '{tok}' in '{braid_algo}' (collectives: {}; \
                     algorithms: {})",
                    CollKind::ALL.map(|k| k.name()).join(" "),
                    Algo::ALL.map(|a| a.name()).join(" ")
                )))
            };
            match item.split_once('=') {
                None => match Algo::parse(item) {
                    Some(a) => p.global = Some(a),
                    None => return bad("algorithm", item),
                },
                Some((k, a)) => {
                    let (k, a) = (k.trim(), a.trim());
                    let Some(kind) = CollKind::ALL
                        .iter()
                        .copied()
                        .find(|c| c.name().eq_ignore_ascii_case(k))
                    else {
                        return bad("collective", k);
                    };
                    let Some(algo) = Algo::parse(a) else {
                        return bad("algorithm", a);
                    };
                    p.per_kind[kind as usize] = Some(algo);
                }
            }
        }
        Ok(p)
    }

    /// The small-message threshold in bytes.
    pub fn small_bytes(&self) -> usize {
        self.small_bytes
    }

    /// Whether `BRAID_ALGO` forces an algorithm for `kind` (single-copy paths then stay off).
    pub fn forced(&self, kind: CollKind) -> bool {
        self.per_kind[kind as usize].is_some()
            || self.global.is_some_and(|a| valid(kind).contains(&a))
    }

    /// Picks the algorithm for `kind` on `nranks` ranks with a message of `bytes` bytes (the
    /// per-rank `count · esize` of [`PlanCtx`]). Overrides first: a per-collective override
    /// must suit the collective; a global one is used only where it suits. Otherwise the
    /// defaults of the module docs.
    ///
    /// Errors: [`Error::InvalidArgument`] if a per-collective override names an algorithm that
    /// cannot run this collective (e.g. `broadcast=ring`).
    pub fn choose(&self, kind: CollKind, nranks: usize, bytes: usize) -> Result<Algo> {
        let ok = valid(kind);
        if let Some(a) = self.per_kind[kind as usize] {
            if ok.contains(&a) {
                return Ok(a);
            }
            return Err(Error::InvalidArgument(format!(
                "BRAID_ALGO: {} cannot run {} (valid: {})",
                a.name(),
                kind.name(),
                ok.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
            )));
        }
        if let Some(a) = self.global {
            if ok.contains(&a) {
                return Ok(a);
            }
        }
        let small = bytes <= self.small_bytes;
        Ok(match kind {
            CollKind::AllReduce if small || nranks <= 1 => Algo::RecDoubling,
            CollKind::AllReduce | CollKind::ReduceScatter | CollKind::AllGather => Algo::Ring,
            CollKind::Broadcast | CollKind::Reduce if small => Algo::Tree,
            CollKind::Broadcast | CollKind::Reduce => Algo::Chain,
            CollKind::AllToAll => Algo::Pairwise,
            CollKind::Barrier => Algo::Dissemination,
            CollKind::Gather | CollKind::Scatter => Algo::Direct,
            CollKind::P2p => Algo::P2p,
            // Not chosen here (see `valid`); the signature of its messages says pairwise.
            CollKind::AllToAllV => Algo::Pairwise,
        })
    }
}

/// Builds this rank's plan of `ctx.kind` with algorithm `algo`.
///
/// Errors: [`Error::InvalidArgument`] if `algo` cannot run `ctx.kind`, for `P2p` (whose plans
/// are built by the point-to-point layer), if `ctx.size == 0`, `ctx.rank` or (rooted
/// collectives) `ctx.root` is out of range, or `ctx.slice_bytes == 0`.
pub fn plan(ctx: &PlanCtx, algo: Algo) -> Result<Plan> {
    if ctx.size == 0 || ctx.rank >= ctx.size {
        return Err(Error::InvalidArgument(format!(
            "plan: rank {} of {} ranks",
            ctx.rank, ctx.size
        )));
    }
    if ctx.kind.rooted() && ctx.root >= ctx.size {
        return Err(Error::InvalidArgument(format!(
            "plan: root {} of {} ranks",
            ctx.root, ctx.size
        )));
    }
    if ctx.slice_bytes == 0 {
        return Err(Error::InvalidArgument("plan: slice_bytes is 0".into()));
    }
    let p = match (ctx.kind, algo) {
        (CollKind::AllReduce, Algo::Ring) => all_reduce::ring::plan(ctx),
        (CollKind::AllReduce, Algo::RecDoubling) => all_reduce::rec_doubling::plan(ctx),
        (CollKind::ReduceScatter, Algo::Ring) => reduce_scatter::ring::plan(ctx),
        (CollKind::AllGather, Algo::Ring) => all_gather::ring::plan(ctx),
        (CollKind::Broadcast, Algo::Chain) => broadcast::chain::plan(ctx),
        (CollKind::Broadcast, Algo::Tree) => broadcast::tree::plan(ctx),
        (CollKind::Reduce, Algo::Chain) => reduce::chain::plan(ctx),
        (CollKind::Reduce, Algo::Tree) => reduce::tree::plan(ctx),
        (CollKind::AllToAll, Algo::Pairwise) => all_to_all::pairwise::plan(ctx),
        (CollKind::Barrier, Algo::Dissemination) => barrier::dissemination::plan(ctx),
        (CollKind::Gather, Algo::Direct) => gather::direct::plan(ctx),
        (CollKind::Scatter, Algo::Direct) => scatter::direct::plan(ctx),
        (kind, algo) => {
            return Err(Error::InvalidArgument(format!(
                "no plan for {} with algorithm {}{}",
                kind.name(),
                algo.name(),
                if kind == CollKind::P2p {
                    " (p2p plans are built by the p2p layer)"
                } else {
                    ""
                }
            )))
        }
    };
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_defaults() {
        let p = Policy::parse("", 65536).unwrap();
        assert_eq!(p.small_bytes(), 65536);
        assert_eq!(
            p.choose(CollKind::AllReduce, 8, 8).unwrap(),
            Algo::RecDoubling
        );
        assert_eq!(
            p.choose(CollKind::AllReduce, 8, 65536).unwrap(),
            Algo::RecDoubling
        );
        assert_eq!(p.choose(CollKind::AllReduce, 8, 65537).unwrap(), Algo::Ring);
        assert_eq!(
            p.choose(CollKind::AllReduce, 1, 1 << 30).unwrap(),
            Algo::RecDoubling
        );
        assert_eq!(p.choose(CollKind::ReduceScatter, 8, 0).unwrap(), Algo::Ring);
        assert_eq!(
            p.choose(CollKind::AllGather, 8, 1 << 30).unwrap(),
            Algo::Ring
        );
        assert_eq!(p.choose(CollKind::Broadcast, 8, 100).unwrap(), Algo::Tree);
        assert_eq!(
            p.choose(CollKind::Broadcast, 8, 1 << 20).unwrap(),
            Algo::Chain
        );
        assert_eq!(p.choose(CollKind::Reduce, 8, 100).unwrap(), Algo::Tree);
        assert_eq!(p.choose(CollKind::Reduce, 8, 1 << 20).unwrap(), Algo::Chain);
        assert_eq!(p.choose(CollKind::AllToAll, 8, 4).unwrap(), Algo::Pairwise);
        assert_eq!(
            p.choose(CollKind::Barrier, 8, 0).unwrap(),
            Algo::Dissemination
        );
        assert_eq!(p.choose(CollKind::Gather, 8, 4).unwrap(), Algo::Direct);
        assert_eq!(p.choose(CollKind::Scatter, 8, 4).unwrap(), Algo::Direct);
        assert_eq!(p.choose(CollKind::P2p, 8, 4).unwrap(), Algo::P2p);
        assert_eq!(
            Policy::parse(" , ", 1).unwrap(),
            Policy::parse("", 1).unwrap()
        );
    }

    #[test]
    fn global_override_applies_where_valid() {
        let p = Policy::parse("ring", 65536).unwrap();
        assert_eq!(p.choose(CollKind::AllReduce, 8, 8).unwrap(), Algo::Ring);
        assert_eq!(
            p.choose(CollKind::Broadcast, 8, 1 << 20).unwrap(),
            Algo::Chain
        );
        assert_eq!(p.choose(CollKind::Broadcast, 8, 8).unwrap(), Algo::Tree);
        assert_eq!(
            p.choose(CollKind::Barrier, 8, 0).unwrap(),
            Algo::Dissemination
        );
        let p = Policy::parse("TREE", 0).unwrap();
        assert_eq!(p.choose(CollKind::Reduce, 8, 1 << 20).unwrap(), Algo::Tree);
        assert_eq!(
            p.choose(CollKind::AllReduce, 8, 1 << 20).unwrap(),
            Algo::Ring
        );
    }

    #[test]
    fn per_kind_overrides() {
        let p = Policy::parse("all_reduce=recdoubling, broadcast = chain", 65536).unwrap();
        assert_eq!(
            p.choose(CollKind::AllReduce, 8, 1 << 30).unwrap(),
            Algo::RecDoubling
        );
        assert_eq!(p.choose(CollKind::Broadcast, 8, 4).unwrap(), Algo::Chain);
        assert_eq!(p.choose(CollKind::Reduce, 8, 4).unwrap(), Algo::Tree);
        // Per-kind beats global, whatever the order.
        let p = Policy::parse("all_reduce=recdoubling,ring", 0).unwrap();
        assert_eq!(
            p.choose(CollKind::AllReduce, 8, 1 << 30).unwrap(),
            Algo::RecDoubling
        );
        assert_eq!(
            p.choose(CollKind::AllGather, 8, 1 << 30).unwrap(),
            Algo::Ring
        );
        // Invalid per-kind override: an error naming both.
        let p = Policy::parse("broadcast=ring", 65536).unwrap();
        let e = p.choose(CollKind::Broadcast, 8, 4).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("ring") && m.contains("broadcast"))
        );
        assert_eq!(
            p.choose(CollKind::AllReduce, 8, 4).unwrap(),
            Algo::RecDoubling
        );
    }

    #[test]
    fn parse_errors_name_the_token() {
        for (s, tok) in [
            ("rung", "rung"),
            ("all_reduce=fast", "fast"),
            ("allreduce=ring", "allreduce"),
            ("=ring", "''"),
            ("ring,broadcast=", "''"),
        ] {
            match Policy::parse(s, 0) {
                Err(Error::InvalidArgument(m)) => assert!(m.contains(tok), "{s}: {m}"),
                other => panic!("{s}: {other:?}"),
            }
        }
    }

    #[test]
    fn plan_rejects_mismatches() {
        let ctx = PlanCtx {
            kind: CollKind::Broadcast,
            rank: 0,
            size: 4,
            count: 10,
            dtype: crate::DataType::F32,
            op: crate::ReduceOp::Sum,
            root: 0,
            slice_bytes: 4096,
        };
        assert!(plan(&ctx, Algo::Ring).is_err());
        assert!(plan(&ctx, Algo::Chain).is_ok());
        assert!(plan(&PlanCtx { root: 4, ..ctx }, Algo::Chain).is_err());
        assert!(plan(&PlanCtx { rank: 4, ..ctx }, Algo::Chain).is_err());
        assert!(plan(
            &PlanCtx {
                slice_bytes: 0,
                ..ctx
            },
            Algo::Chain
        )
        .is_err());
        let p2p = PlanCtx {
            kind: CollKind::P2p,
            ..ctx
        };
        assert!(plan(&p2p, Algo::P2p).is_err());
        // Every valid pair plans; every invalid one does not.
        for kind in CollKind::ALL {
            for algo in Algo::ALL {
                let c = PlanCtx { kind, ..ctx };
                let want = valid(kind).contains(&algo) && kind != CollKind::P2p;
                assert_eq!(
                    plan(&c, algo).is_ok(),
                    want,
                    "{} {}",
                    kind.name(),
                    algo.name()
                );
            }
        }
    }
}
