//! Pipeline planning through the C ABI: the members of a communicator's view with their
//! weights, balanced contiguous stages of numbered blocks over explicit member lists or over
//! the view, re-plans that move the fewest blocks, and the metric channel that lets the
//! coordinator re-weigh members by measured throughput (see `braid_core::membership::pipeline`).

use std::ops::Range;

use braid_core::membership::pipeline::{replan_pipeline, Move, PipelinePlan, StagePlan};

use crate::args::{c_slice, comm_ref, put};
use crate::comm::braid_comm_t;
use crate::error::{boundary, braid_status_t, CResult, Fail};

/// "No member" in the prev/next fields of braid_pipeline_stage_t (and never a valid member id
/// in a plan).
pub const BRAID_PIPELINE_NONE: u64 = u64::MAX;

/// One stage of a pipeline plan.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct braid_pipeline_stage_t {
    /// Member id owning the stage (the caller's own ids in plans over explicit lists).
    pub member: u64,
    /// First block of the stage (0-based); the stage holds blocks [first_block, end_block),
    /// none when they are equal.
    pub first_block: u64,
    /// One past the last block of the stage.
    pub end_block: u64,
    /// Member of the previous non-empty stage (forward input, backward output);
    /// BRAID_PIPELINE_NONE for none.
    pub prev: u64,
    /// Member of the next non-empty stage; BRAID_PIPELINE_NONE for none.
    pub next: u64,
}

/// A block that changes owner in a re-plan.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct braid_pipeline_move_t {
    /// The block (0-based).
    pub block: u64,
    /// Its owner in the previous plan.
    pub from: u64,
    /// Its owner in the new plan.
    pub to: u64,
}

fn to_u64(v: usize) -> u64 {
    // usize is at most 64 bits on every platform braid builds for.
    u64::try_from(v).unwrap_or(u64::MAX)
}

fn c_stage(s: &StagePlan) -> braid_pipeline_stage_t {
    braid_pipeline_stage_t {
        member: s.member,
        first_block: to_u64(s.blocks.start),
        end_block: to_u64(s.blocks.end),
        prev: s.prev.unwrap_or(BRAID_PIPELINE_NONE),
        next: s.next.unwrap_or(BRAID_PIPELINE_NONE),
    }
}

/// The (id, weight) list of an explicit member list.
fn member_list(ids: &[u64], weights: &[f64]) -> CResult<Vec<(u64, f64)>> {
    if ids.is_empty() {
        return Err(Fail::arg(
            "a pipeline needs at least one member (n_members is 0)",
        ));
    }
    if ids.contains(&BRAID_PIPELINE_NONE) {
        return Err(Fail::arg(
            "member id BRAID_PIPELINE_NONE (UINT64_MAX) is reserved for \"no member\"",
        ));
    }
    Ok(ids.iter().copied().zip(weights.iter().copied()).collect())
}

/// The members of a communicator's current view with their published weights.
///
/// # Safety
/// `comm` is NULL or a live communicator.
unsafe fn view_list(comm: braid_comm_t) -> CResult<Vec<(u64, f64)>> {
    // SAFETY: forwarded contract.
    let c = unsafe { comm_ref(comm) }?;
    Ok(c.comm
        .view()
        .members
        .iter()
        .map(|m| (m.id, m.weight))
        .collect())
}

/// A previous plan given as C stages: block ranges within `n_blocks`, no block held twice.
fn previous_plan(stages: &[braid_pipeline_stage_t], n_blocks: usize) -> CResult<PipelinePlan> {
    let mut out: Vec<StagePlan> = Vec::with_capacity(stages.len());
    for (i, s) in stages.iter().enumerate() {
        let range = usize::try_from(s.first_block)
            .ok()
            .zip(usize::try_from(s.end_block).ok())
            .filter(|(a, b)| a <= b && *b <= n_blocks)
            .map(|(a, b)| a..b)
            .ok_or_else(|| {
                Fail::arg(format!(
                    "previous[{i}] (member {}) has blocks [{}, {}), not a range within the \
                     {n_blocks} blocks",
                    s.member, s.first_block, s.end_block
                ))
            })?;
        if let Some((j, o)) = out
            .iter()
            .enumerate()
            .find(|(_, o)| overlap(&o.blocks, &range))
        {
            return Err(Fail::arg(format!(
                "previous[{j}] (member {}) and previous[{i}] (member {}) both hold block {}",
                o.member,
                s.member,
                range.start.max(o.blocks.start)
            )));
        }
        out.push(StagePlan {
            member: s.member,
            blocks: range,
            prev: None,
            next: None,
        });
    }
    Ok(PipelinePlan {
        stages: out,
        max_cost: 0.0,
    })
}

fn overlap(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Output arrays of a plan or re-plan.
struct PlanOut {
    stages: *mut braid_pipeline_stage_t,
    max_cost: *mut f64,
    moves: Option<MovesOut>,
}

struct MovesOut {
    moves: *mut braid_pipeline_move_t,
    capacity: usize,
    count: *mut usize,
}

/// Plans (or re-plans, with `previous`) `costs` over `members` and writes the results.
///
/// # Safety
/// The pointers of `out` are NULL or valid for writes of `members.len()` stages, one double,
/// `capacity` moves and one size_t.
unsafe fn plan_into(
    members: &[(u64, f64)],
    costs: &[f64],
    previous: Option<&PipelinePlan>,
    out: PlanOut,
) -> CResult {
    if out.stages.is_null() {
        return Err(Fail::arg("stages is NULL"));
    }
    if out.max_cost.is_null() {
        return Err(Fail::arg("max_cost is NULL"));
    }
    if let Some(m) = &out.moves {
        if m.count.is_null() {
            return Err(Fail::arg("n_moves is NULL"));
        }
        if m.moves.is_null() && m.capacity > 0 {
            return Err(Fail::arg("moves is NULL"));
        }
    }
    let (plan, moves): (PipelinePlan, Vec<Move>) = replan_pipeline(costs, members, previous)?;
    if let Some(m) = &out.moves {
        // SAFETY: checked non-NULL; valid for a write (contract).
        unsafe { m.count.write(moves.len()) };
        if moves.len() > m.capacity {
            return Err(Fail::arg(format!(
                "the re-plan moves {} blocks but moves_capacity is {} (n_blocks always suffices)",
                moves.len(),
                m.capacity
            )));
        }
        for (k, mv) in moves.iter().enumerate() {
            // SAFETY: k < moves.len() <= capacity, and `moves` is valid for `capacity` writes.
            unsafe {
                m.moves.add(k).write(braid_pipeline_move_t {
                    block: to_u64(mv.block),
                    from: mv.from,
                    to: mv.to,
                })
            };
        }
    }
    for (k, s) in plan.stages.iter().enumerate() {
        // SAFETY: the plan has one stage per member and `stages` is valid for that many writes.
        unsafe { out.stages.add(k).write(c_stage(s)) };
    }
    // SAFETY: checked non-NULL; valid for a write (contract).
    unsafe { out.max_cost.write(plan.max_cost) };
    Ok(())
}

/// Writes the members of `comm`'s current view, in view (= rank) order, to `ids` and their
/// published weights (BRAID_WEIGHT at registration, or measured weights after a coordinator
/// re-weigh) to `weights`. `*count` is always set to the view size.
///
/// Errors: braid_invalid_argument for a NULL `comm` or `count`, NULL `ids`/`weights` with a
/// non-zero capacity, or `capacity` below the view size (`*count` then says how many are
/// needed; nothing else is written).
///
/// # Safety
/// `comm` is NULL or a live communicator; `ids` and `weights` are NULL or valid for `capacity`
/// writes; `count` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_comm_view_members(
    comm: braid_comm_t,
    ids: *mut u64,
    weights: *mut f64,
    capacity: usize,
    count: *mut usize,
) -> braid_status_t {
    boundary("braid_comm_view_members", || {
        // SAFETY: caller contract.
        let members = unsafe { view_list(comm) }?;
        // SAFETY: caller contract.
        unsafe { put(count, "count", members.len()) }?;
        if capacity < members.len() {
            return Err(Fail::arg(format!(
                "capacity {capacity} is below the view size {}",
                members.len()
            )));
        }
        if ids.is_null() {
            return Err(Fail::arg("ids is NULL"));
        }
        if weights.is_null() {
            return Err(Fail::arg("weights is NULL"));
        }
        for (k, (id, w)) in members.iter().enumerate() {
            // SAFETY: k < members.len() <= capacity; both arrays are valid for `capacity`
            // writes (contract).
            unsafe {
                ids.add(k).write(*id);
                weights.add(k).write(*w);
            }
        }
        Ok(())
    })
}

/// Plans contiguous pipeline stages of `n_blocks` blocks with costs `costs` over an explicit
/// member list `members`/`weights` (`n_members` entries, in stage order): minimises the largest
/// stage cost (sum of the stage's block costs / member weight). With at least as many blocks
/// as members every member gets at least one block. Writes one stage per member, in the given
/// order, to `stages` and the largest stage cost to `*max_cost`.
///
/// Errors: braid_invalid_argument for NULL pointers (`costs` may be NULL when `n_blocks` is
/// 0), no members, repeated member ids, the id BRAID_PIPELINE_NONE, a weight that is not a
/// positive finite number, or a cost that is negative or not finite.
///
/// # Safety
/// `members` and `weights` valid for `n_members` reads, `costs` for `n_blocks` reads, `stages`
/// for `n_members` writes, `max_cost` for one write (or NULL).
#[no_mangle]
pub unsafe extern "C" fn braid_pipeline_plan(
    members: *const u64,
    weights: *const f64,
    n_members: usize,
    costs: *const f64,
    n_blocks: usize,
    stages: *mut braid_pipeline_stage_t,
    max_cost: *mut f64,
) -> braid_status_t {
    boundary("braid_pipeline_plan", || {
        // SAFETY: caller contract (all four).
        let ids = unsafe { c_slice(members, n_members, "members") }?;
        // SAFETY: as above.
        let w = unsafe { c_slice(weights, n_members, "weights") }?;
        // SAFETY: as above.
        let costs = unsafe { c_slice(costs, n_blocks, "costs") }?;
        let list = member_list(ids, w)?;
        let out = PlanOut {
            stages,
            max_cost,
            moves: None,
        };
        // SAFETY: as above.
        unsafe { plan_into(&list, costs, None, out) }
    })
}

/// Re-plans `n_blocks` blocks over an explicit member list (as braid_pipeline_plan): among the
/// plans with the smallest largest stage cost, one that moves the fewest blocks away from
/// their owners in `previous` (`n_previous` stages of any members; `previous` may be NULL when
/// `n_previous` is 0; their prev/next fields are ignored). Writes the new stages, the largest
/// stage cost, the moved blocks (block, old owner, new owner; in block order) to `moves` and
/// their number to `*n_moves`. Blocks no previous stage held are not moves.
///
/// Errors: as braid_pipeline_plan; also a previous stage whose range is not within
/// [0, n_blocks) or overlaps another one, and `moves_capacity` below the number of moves
/// (`*n_moves` then says how many; `moves_capacity` >= `n_blocks` always suffices).
///
/// # Safety
/// As braid_pipeline_plan; `previous` valid for `n_previous` reads, `moves` for
/// `moves_capacity` writes, `n_moves` for one write (or NULL).
#[no_mangle]
pub unsafe extern "C" fn braid_pipeline_replan(
    members: *const u64,
    weights: *const f64,
    n_members: usize,
    costs: *const f64,
    n_blocks: usize,
    previous: *const braid_pipeline_stage_t,
    n_previous: usize,
    stages: *mut braid_pipeline_stage_t,
    max_cost: *mut f64,
    moves: *mut braid_pipeline_move_t,
    moves_capacity: usize,
    n_moves: *mut usize,
) -> braid_status_t {
    boundary("braid_pipeline_replan", || {
        // SAFETY: caller contract (all four).
        let ids = unsafe { c_slice(members, n_members, "members") }?;
        // SAFETY: as above.
        let w = unsafe { c_slice(weights, n_members, "weights") }?;
        // SAFETY: as above.
        let costs = unsafe { c_slice(costs, n_blocks, "costs") }?;
        // SAFETY: as above.
        let prev = unsafe { c_slice(previous, n_previous, "previous") }?;
        let list = member_list(ids, w)?;
        let prev = previous_plan(prev, n_blocks)?;
        let out = PlanOut {
            stages,
            max_cost,
            moves: Some(MovesOut {
                moves,
                capacity: moves_capacity,
                count: n_moves,
            }),
        };
        // SAFETY: as above.
        unsafe { plan_into(&list, costs, Some(&prev), out) }
    })
}

/// braid_pipeline_plan over `comm`'s current view: members in view (= rank) order with the
/// weights published in the view (see braid_comm_view_members). `stages` holds the comm size.
///
/// Errors: as braid_pipeline_plan; braid_invalid_argument for a NULL `comm`.
///
/// # Safety
/// `comm` is NULL or a live communicator; `costs` valid for `n_blocks` reads; `stages` for
/// comm-size writes; `max_cost` for one write (or NULL).
#[no_mangle]
pub unsafe extern "C" fn braid_pipeline_plan_view(
    comm: braid_comm_t,
    costs: *const f64,
    n_blocks: usize,
    stages: *mut braid_pipeline_stage_t,
    max_cost: *mut f64,
) -> braid_status_t {
    boundary("braid_pipeline_plan_view", || {
        // SAFETY: caller contract.
        let list = unsafe { view_list(comm) }?;
        // SAFETY: caller contract.
        let costs = unsafe { c_slice(costs, n_blocks, "costs") }?;
        let out = PlanOut {
            stages,
            max_cost,
            moves: None,
        };
        // SAFETY: caller contract.
        unsafe { plan_into(&list, costs, None, out) }
    })
}

/// braid_pipeline_replan over `comm`'s current view (members in view order, published
/// weights): typically called on every member after braid_comm_update reported a change, with
/// the plan of the previous view. `stages` holds the comm size.
///
/// Errors: as braid_pipeline_replan; braid_invalid_argument for a NULL `comm`.
///
/// # Safety
/// As braid_pipeline_replan, with `comm` NULL or a live communicator.
#[no_mangle]
pub unsafe extern "C" fn braid_pipeline_replan_view(
    comm: braid_comm_t,
    costs: *const f64,
    n_blocks: usize,
    previous: *const braid_pipeline_stage_t,
    n_previous: usize,
    stages: *mut braid_pipeline_stage_t,
    max_cost: *mut f64,
    moves: *mut braid_pipeline_move_t,
    moves_capacity: usize,
    n_moves: *mut usize,
) -> braid_status_t {
    boundary("braid_pipeline_replan_view", || {
        // SAFETY: caller contract.
        let list = unsafe { view_list(comm) }?;
        // SAFETY: caller contract.
        let costs = unsafe { c_slice(costs, n_blocks, "costs") }?;
        // SAFETY: caller contract.
        let prev = unsafe { c_slice(previous, n_previous, "previous") }?;
        let prev = previous_plan(prev, n_blocks)?;
        let out = PlanOut {
            stages,
            max_cost,
            moves: Some(MovesOut {
                moves,
                capacity: moves_capacity,
                count: n_moves,
            }),
        };
        // SAFETY: caller contract.
        unsafe { plan_into(&list, costs, Some(&prev), out) }
    })
}

/// Metric channel of elastic pipelines: this member's stage, blocks [first_block, end_block)
/// of a pipeline whose block costs are `costs` (`n_blocks` entries), took `seconds` of compute
/// (excluding waits) in the last step. Sent to the coordinator by a background thread: returns
/// at once. The coordinator follows each member's measured throughput (stage cost per second,
/// smoothed) and, when every stage reported at least twice in the current view and a plan with
/// the measured weights is predicted to shorten the slowest stage by more than
/// BRAID_PIPELINE_REPLAN_GAIN, publishes a view with the same members re-weighed;
/// braid_comm_update adopts it (`*changed` = 1) and braid_pipeline_replan_view over it gives
/// slow members fewer blocks. Call it on every stage once per step with the same `costs`.
/// `seconds` 0 or an empty stage is accepted and ignored.
///
/// Errors: braid_invalid_usage when the group is not elastic (BRAID_ELASTIC unset) or this
/// member left; braid_invalid_argument for a NULL `comm`, NULL `costs` with `n_blocks` > 0,
/// more than 65536 blocks, a cost or `seconds` that is negative or not finite, or a stage not
/// within [0, n_blocks).
///
/// # Safety
/// `comm` is NULL or a live communicator; `costs` valid for `n_blocks` reads.
#[no_mangle]
pub unsafe extern "C" fn braid_pipeline_report(
    comm: braid_comm_t,
    seconds: f64,
    first_block: u64,
    end_block: u64,
    costs: *const f64,
    n_blocks: usize,
) -> braid_status_t {
    boundary("braid_pipeline_report", || {
        // SAFETY: caller contract.
        let c = unsafe { comm_ref(comm) }?;
        // SAFETY: caller contract.
        let costs = unsafe { c_slice(costs, n_blocks, "costs") }?;
        let first = usize::try_from(first_block).unwrap_or(usize::MAX);
        let end = usize::try_from(end_block).unwrap_or(usize::MAX);
        c.comm.report_pipeline_metric(seconds, first..end, costs)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previous_plans_are_checked() {
        let s = |member, first, end| braid_pipeline_stage_t {
            member,
            first_block: first,
            end_block: end,
            prev: BRAID_PIPELINE_NONE,
            next: BRAID_PIPELINE_NONE,
        };
        assert!(previous_plan(&[s(1, 0, 3), s(2, 3, 5)], 5).is_ok());
        assert!(previous_plan(&[s(1, 0, 3), s(2, 2, 5)], 5).is_err());
        assert!(previous_plan(&[s(1, 0, 6)], 5).is_err());
        assert!(previous_plan(&[s(1, 3, 2)], 5).is_err());
        assert!(previous_plan(&[s(1, 2, 2), s(2, 2, 2)], 5).is_ok());
    }
}
