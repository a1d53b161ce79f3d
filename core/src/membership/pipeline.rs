//! Pipeline planning: a model cut into numbered blocks (layers) spread over the members of a
//! view as contiguous stages.
//!
//! [`plan_pipeline`] gives each member (in view order) a contiguous range of blocks so that the
//! largest stage cost — the sum of its blocks' costs divided by the member's weight (e.g. its
//! measured throughput) — is as small as possible. With at least as many blocks as members,
//! every member gets at least one block. Each stage knows its previous and next member (the
//! forward and backward send/recv partners).
//!
//! [`replan_pipeline`] does the same for a new view (members joined, left or changed weight)
//! and, among the plans with the optimal largest stage, picks one that moves the fewest blocks
//! from their current owners; it lists the moves (block, from, to) so weights can travel with
//! send/recv.
//!
//! Both run a dynamic programme over (members, blocks): O(members × blocks²) time, fine for
//! the thousands of blocks and hundreds of members pipelines have.

use std::ops::Range;

use crate::error::{Error, Result};

/// One stage of a pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct StagePlan {
    /// Member id owning the stage.
    pub member: u64,
    /// Blocks of the stage (may be empty when there are fewer blocks than members).
    pub blocks: Range<usize>,
    /// The member holding the previous non-empty stage (forward input, backward output).
    pub prev: Option<u64>,
    /// The member holding the next non-empty stage.
    pub next: Option<u64>,
}

/// A pipeline plan: one stage per member, in view order.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelinePlan {
    /// Stages in member (view) order.
    pub stages: Vec<StagePlan>,
    /// The largest stage cost (block cost sum / member weight).
    pub max_cost: f64,
}

impl PipelinePlan {
    /// The stage of `member`, if it has one.
    pub fn stage_of(&self, member: u64) -> Option<&StagePlan> {
        self.stages.iter().find(|s| s.member == member)
    }

    /// The member owning `block`.
    pub fn owner_of(&self, block: usize) -> Option<u64> {
        self.stages
            .iter()
            .find(|s| s.blocks.contains(&block))
            .map(|s| s.member)
    }
}

/// A block that changes owner in a re-plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// The block.
    pub block: usize,
    /// Its current owner.
    pub from: u64,
    /// Its new owner.
    pub to: u64,
}

fn check(costs: &[f64], members: &[(u64, f64)]) -> Result<()> {
    if members.is_empty() {
        return Err(Error::InvalidArgument(
            "a pipeline needs at least one member".into(),
        ));
    }
    if let Some(c) = costs.iter().find(|c| !(c.is_finite() && **c >= 0.0)) {
        return Err(Error::InvalidArgument(format!(
            "block cost {c} is not a finite non-negative number"
        )));
    }
    if let Some((m, w)) = members.iter().find(|(_, w)| !(w.is_finite() && *w > 0.0)) {
        return Err(Error::InvalidArgument(format!(
            "member {m} has weight {w}; weights must be positive"
        )));
    }
    let mut ids: Vec<u64> = members.iter().map(|(m, _)| *m).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return Err(Error::InvalidArgument("a member appears twice".into()));
    }
    Ok(())
}

/// Minimal largest stage cost, by DP over (members, blocks).
fn optimal_max(prefix: &[f64], members: &[(u64, f64)], min_one: bool) -> f64 {
    let b = prefix.len() - 1;
    let m = members.len();
    // best[i] = minimal largest cost placing the first i blocks on the members seen so far.
    let mut best = vec![f64::INFINITY; b + 1];
    best[0] = 0.0;
    for (j, (_, w)) in members.iter().enumerate() {
        let mut next = vec![f64::INFINITY; b + 1];
        // Member j takes blocks k..i.
        for i in 0..=b {
            // Blocks left for the remaining members must be enough when each needs one.
            if min_one && b - i < m - j - 1 {
                continue;
            }
            for k in 0..=i {
                if min_one && k == i {
                    continue;
                }
                if best[k].is_infinite() {
                    continue;
                }
                let c = (prefix[i] - prefix[k]) / w;
                let v = best[k].max(c);
                if v < next[i] {
                    next[i] = v;
                }
            }
        }
        best = next;
    }
    best[b]
}

/// Among plans whose stages all cost at most `limit`, the cut points (stage boundaries) that
/// keep the most blocks with their `owner` (None: any optimal plan).
fn cuts(
    prefix: &[f64],
    members: &[(u64, f64)],
    min_one: bool,
    limit: f64,
    owner: &[Option<u64>],
) -> Option<Vec<usize>> {
    let b = prefix.len() - 1;
    let m = members.len();
    let tol = limit * 1e-9 + 1e-12;
    // kept[j][i]: most blocks kept placing the first i blocks on members 0..j.
    let mut kept = vec![vec![i64::MIN; b + 1]; m + 1];
    let mut from = vec![vec![usize::MAX; b + 1]; m + 1];
    kept[0][0] = 0;
    for (j, (id, w)) in members.iter().enumerate() {
        for i in 0..=b {
            if min_one && b - i < m - j - 1 {
                continue;
            }
            let mut stay = 0i64; // blocks k..i owned by this member already, built downwards
            for k in (0..=i).rev() {
                if k < i && owner[k] == Some(*id) {
                    stay += 1;
                }
                if min_one && k == i {
                    continue;
                }
                if kept[j][k] == i64::MIN {
                    continue;
                }
                if (prefix[i] - prefix[k]) / w > limit + tol {
                    continue;
                }
                let v = kept[j][k] + stay;
                if v > kept[j + 1][i] {
                    kept[j + 1][i] = v;
                    from[j + 1][i] = k;
                }
            }
        }
    }
    if kept[m][b] == i64::MIN {
        return None;
    }
    let mut out = vec![0; m + 1];
    out[m] = b;
    let mut i = b;
    for j in (1..=m).rev() {
        i = from[j][i];
        out[j - 1] = i;
    }
    Some(out)
}

fn build(members: &[(u64, f64)], cut: &[usize], prefix: &[f64]) -> PipelinePlan {
    let mut stages: Vec<StagePlan> = members
        .iter()
        .enumerate()
        .map(|(j, (id, _))| StagePlan {
            member: *id,
            blocks: cut[j]..cut[j + 1],
            prev: None,
            next: None,
        })
        .collect();
    let busy: Vec<usize> = (0..stages.len())
        .filter(|j| !stages[*j].blocks.is_empty())
        .collect();
    for (k, &j) in busy.iter().enumerate() {
        stages[j].prev = k.checked_sub(1).map(|p| stages[busy[p]].member);
        stages[j].next = busy.get(k + 1).map(|n| stages[*n].member);
    }
    let max_cost = members
        .iter()
        .enumerate()
        .map(|(j, (_, w))| (prefix[cut[j + 1]] - prefix[cut[j]]) / w)
        .fold(0.0, f64::max);
    PipelinePlan { stages, max_cost }
}

fn prefix_sums(costs: &[f64]) -> Vec<f64> {
    let mut p = Vec::with_capacity(costs.len() + 1);
    p.push(0.0);
    for c in costs {
        p.push(p[p.len() - 1] + c);
    }
    p
}

/// Plans contiguous stages of `block_costs` over `members` (id, weight) in the given order,
/// minimising the largest stage cost.
///
/// Errors: no members, a negative or non-finite cost, a non-positive weight, a repeated member.
pub fn plan_pipeline(block_costs: &[f64], members: &[(u64, f64)]) -> Result<PipelinePlan> {
    replan_pipeline(block_costs, members, None).map(|(p, _)| p)
}

/// Plans `block_costs` over the members of `view`, in view order, balanced by the weight each
/// member published at registration (`BRAID_WEIGHT`).
///
/// Errors: as [`plan_pipeline`].
pub fn plan_for_view(block_costs: &[f64], view: &super::View) -> Result<PipelinePlan> {
    let members: Vec<(u64, f64)> = view.members.iter().map(|m| (m.id, m.weight)).collect();
    plan_pipeline(block_costs, &members)
}

/// Re-plans for a new view (after a join or a failure), moving as few blocks as possible away
/// from their owners in `previous`; each member learns from the moves which blocks it gains
/// and from whom.
///
/// Errors: as [`plan_pipeline`].
pub fn replan_for_view(
    block_costs: &[f64],
    view: &super::View,
    previous: &PipelinePlan,
) -> Result<(PipelinePlan, Vec<Move>)> {
    let members: Vec<(u64, f64)> = view.members.iter().map(|m| (m.id, m.weight)).collect();
    replan_pipeline(block_costs, &members, Some(previous))
}

/// Re-plans for a new member list: an optimal plan (smallest largest stage) that moves the
/// fewest blocks away from their owners in `previous`; returns it with the moves.
///
/// Errors: as [`plan_pipeline`].
pub fn replan_pipeline(
    block_costs: &[f64],
    members: &[(u64, f64)],
    previous: Option<&PipelinePlan>,
) -> Result<(PipelinePlan, Vec<Move>)> {
    check(block_costs, members)?;
    let prefix = prefix_sums(block_costs);
    let b = block_costs.len();
    let min_one = b >= members.len();
    let limit = optimal_max(&prefix, members, min_one);
    let owner: Vec<Option<u64>> = (0..b)
        .map(|k| previous.and_then(|p| p.owner_of(k)))
        .collect();
    let cut = cuts(&prefix, members, min_one, limit, &owner)
        .ok_or_else(|| Error::Internal("pipeline plan: no feasible split".into()))?;
    let plan = build(members, &cut, &prefix);
    let moves = (0..b)
        .filter_map(|k| {
            let to = plan.owner_of(k)?;
            match owner[k] {
                Some(from) if from != to => Some(Move { block: k, from, to }),
                _ => None,
            }
        })
        .collect();
    Ok((plan, moves))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(p: &PipelinePlan) -> Vec<usize> {
        p.stages.iter().map(|s| s.blocks.len()).collect()
    }

    #[test]
    fn ten_equal_blocks_over_four_equal_members() {
        let m: Vec<(u64, f64)> = (1..=4).map(|i| (i, 1.0)).collect();
        let p = plan_pipeline(&[1.0; 10], &m).unwrap();
        assert_eq!(p.max_cost, 3.0);
        assert_eq!(sizes(&p).iter().sum::<usize>(), 10);
        assert!(
            sizes(&p).iter().all(|s| (1..=3).contains(s)),
            "{:?}",
            sizes(&p)
        );
        // Contiguous, in order, with neighbours.
        assert_eq!(p.stages[0].blocks.start, 0);
        for w in p.stages.windows(2) {
            assert_eq!(w[0].blocks.end, w[1].blocks.start);
        }
        assert_eq!(p.stages[0].prev, None);
        assert_eq!(p.stages[0].next, Some(2));
        assert_eq!(p.stages[3].prev, Some(3));
        assert_eq!(p.stages[3].next, None);
    }

    #[test]
    fn weights_balance_the_stages() {
        // Member 2 is twice as fast: it should take about twice the blocks.
        let p = plan_pipeline(&[1.0; 12], &[(1, 1.0), (2, 2.0), (3, 1.0)]).unwrap();
        assert_eq!(sizes(&p), vec![3, 6, 3]);
        assert_eq!(p.max_cost, 3.0);
        // Uneven block costs.
        let p = plan_pipeline(&[5.0, 1.0, 1.0, 1.0, 1.0, 1.0], &[(7, 1.0), (8, 1.0)]).unwrap();
        assert_eq!(p.max_cost, 5.0);
        assert_eq!(p.stages[0].blocks, 0..1);
    }

    #[test]
    fn brute_force_agrees_on_small_cases() {
        // Every split of up to 7 blocks over 3 members: the DP finds the true optimum.
        let costs = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0];
        let m = [(1, 1.0), (2, 1.5), (3, 0.5)];
        let p = plan_pipeline(&costs, &m).unwrap();
        let pre = prefix_sums(&costs);
        let mut best = f64::INFINITY;
        for a in 1..costs.len() {
            for b2 in a + 1..costs.len() {
                let c = [
                    pre[a] / 1.0,
                    (pre[b2] - pre[a]) / 1.5,
                    (pre[7] - pre[b2]) / 0.5,
                ];
                best = best.min(c.iter().cloned().fold(0.0, f64::max));
            }
        }
        assert!((p.max_cost - best).abs() < 1e-9, "{} vs {best}", p.max_cost);
    }

    #[test]
    fn fewer_blocks_than_members() {
        let m: Vec<(u64, f64)> = (1..=4).map(|i| (i, 1.0)).collect();
        let p = plan_pipeline(&[1.0, 1.0], &m).unwrap();
        assert_eq!(p.max_cost, 1.0);
        assert_eq!(sizes(&p).iter().filter(|s| **s == 1).count(), 2);
        let busy: Vec<&StagePlan> = p.stages.iter().filter(|s| !s.blocks.is_empty()).collect();
        assert_eq!(busy[0].next, Some(busy[1].member));
        assert_eq!(busy[1].prev, Some(busy[0].member));
    }

    #[test]
    fn replan_after_a_join_moves_the_fewest_blocks() {
        let m3 = [(1, 1.0), (2, 1.0), (3, 1.0)];
        let before = plan_pipeline(&[1.0; 12], &m3).unwrap();
        assert_eq!(sizes(&before), vec![4, 4, 4]);
        // Member 9 joins last: the optimum is 3 blocks per stage.
        let m4 = [(1, 1.0), (2, 1.0), (3, 1.0), (9, 1.0)];
        let (after, moves) = replan_pipeline(&[1.0; 12], &m4, Some(&before)).unwrap();
        assert_eq!(after.max_cost, 3.0);
        assert_eq!(sizes(&after), vec![3, 3, 3, 3]);
        // Any 3,3,3,3 split moves exactly: blocks 3 (2←1), 6,7 (3←2), 9,10,11 (9←3) = 6.
        assert_eq!(moves.len(), 6, "{moves:?}");
        assert!(moves
            .iter()
            .all(|mv| after.owner_of(mv.block) == Some(mv.to)));
        assert!(moves
            .iter()
            .all(|mv| before.owner_of(mv.block) == Some(mv.from)));
        // With slack the re-plan prefers staying: 12 blocks, weights allowing 4 per stage.
        let m4w = [(1, 4.0 / 3.0), (2, 4.0 / 3.0), (3, 4.0 / 3.0), (9, 1.0)];
        let (after, moves) = replan_pipeline(&[1.0; 12], &m4w, Some(&before)).unwrap();
        let brute_min = brute_min_moves(&[1.0; 12], &m4w, &before, after.max_cost);
        assert_eq!(moves.len(), brute_min);
    }

    fn brute_min_moves(
        costs: &[f64],
        m: &[(u64, f64)],
        before: &PipelinePlan,
        limit: f64,
    ) -> usize {
        let n = costs.len();
        let pre = prefix_sums(costs);
        let mut best = usize::MAX;
        for a in 1..n {
            for b in a + 1..n {
                for c in b + 1..n {
                    let cut = [0, a, b, c, n];
                    let ok =
                        (0..4).all(|j| (pre[cut[j + 1]] - pre[cut[j]]) / m[j].1 <= limit + 1e-9);
                    if !ok {
                        continue;
                    }
                    let moved = (0..n)
                        .filter(|k| {
                            let j = (0..4).find(|j| cut[*j] <= *k && *k < cut[j + 1]).unwrap();
                            before.owner_of(*k) != Some(m[j].0)
                        })
                        .count();
                    best = best.min(moved);
                }
            }
        }
        best
    }

    #[test]
    fn plans_follow_the_view_and_its_weights() {
        let m = |id: u64, w: f64| super::super::Member {
            id,
            host_id: "h".into(),
            hostname: "h".into(),
            pid: 1,
            role: super::super::Role::Worker,
            handle: Vec::new(),
            numa: None,
            weight: w,
        };
        let v = super::super::View {
            group: "g".into(),
            epoch: 1,
            nonce: 1,
            members: vec![m(1, 1.0), m(2, 1.0), m(3, 2.0)],
        };
        let p = plan_for_view(&[1.0; 8], &v).unwrap();
        // The member of weight 2 takes about half of the blocks.
        let big = p.stage_of(3).unwrap();
        assert_eq!(big.blocks.len(), 4, "{p:?}");
        let mut v2 = v.clone();
        v2.epoch = 2;
        v2.members.push(m(4, 2.0));
        let (p2, moves) = replan_for_view(&[1.0; 8], &v2, &p).unwrap();
        assert!(p2.stage_of(4).is_some());
        assert!(moves.iter().all(|mv| mv.from != mv.to));
        assert!(!moves.is_empty() && moves.len() < 8, "{moves:?}");
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(plan_pipeline(&[1.0], &[]).is_err());
        assert!(plan_pipeline(&[-1.0], &[(1, 1.0)]).is_err());
        assert!(plan_pipeline(&[1.0], &[(1, 0.0)]).is_err());
        assert!(plan_pipeline(&[f64::NAN], &[(1, 1.0)]).is_err());
        assert!(plan_pipeline(&[1.0], &[(1, 1.0), (1, 2.0)]).is_err());
        let p = plan_pipeline(&[], &[(1, 1.0)]).unwrap();
        assert_eq!(p.stages[0].blocks, 0..0);
    }
}
