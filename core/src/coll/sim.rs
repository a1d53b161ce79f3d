//! Plan simulator (tests only): runs the plans of all ranks of one collective together, in one
//! thread, deterministically, and checks them.
//!
//! Model (mirrors the executor, conservatively):
//! - each rank has one byte array holding its send and receive buffers laid out as a real call
//!   would pass them (separate out of place; aliased as in `Communicator::*_inplace` in place),
//!   followed by its scratch; bytes nobody wrote hold a poison pattern;
//! - a step starts once all its dependencies completed; local steps (copy, reduce, finalize)
//!   run atomically then; a network step is *posted* then;
//! - for each ordered pair of ranks, the k-th send of a to b matches the k-th receive of b from
//!   a (wire order) once both are posted; at the match the sender's source is read, the
//!   receiver's destination is written (`RecvReduce`: `dst = acc ⊕ data`, `acc` read then),
//!   and both steps complete — so a step that waits for a send waits until the receiver
//!   consumed it.
//!
//! The simulator panics with a description of the case on: a dependency on a later step, a
//! span out of bounds, a write to the send buffer, a bad peer, mismatched operand lengths,
//! partial overlap of `acc`/`dst` (`RecvReduce`) or of an operand and `dst` (`Reduce`), a wire
//! order violation (count or length of matched messages), a deadlock (steps left, none can
//! progress), and a data race: two steps of one rank touching a common byte (one of them
//! writing; after in-place aliasing; identity copies touch nothing) without one depending
//! (transitively) on the other. Network steps count as touching their spans for their whole
//! life, since the executor may read a send source or write a receive destination at any time
//! between posting and completion.

use super::{select, Algo, Buf, CollKind, Op, Plan, PlanCtx, Span};
use crate::reduce;
use crate::types::{DataType, ReduceOp};
use std::collections::VecDeque;

/// Byte written to every buffer byte before the run.
pub const POISON: u8 = 0xA5;

/// One collective call over all ranks.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// The collective.
    pub kind: CollKind,
    /// The algorithm.
    pub algo: Algo,
    /// Rank count.
    pub n: usize,
    /// Element type.
    pub dtype: DataType,
    /// Operator.
    pub op: ReduceOp,
    /// `PlanCtx::count`.
    pub count: usize,
    /// Root.
    pub root: usize,
    /// Pipelining unit.
    pub slice_bytes: usize,
    /// In-place buffers.
    pub in_place: bool,
}

impl Case {
    /// The plan context of `rank`.
    pub fn ctx(&self, rank: usize) -> PlanCtx {
        PlanCtx {
            kind: self.kind,
            rank,
            size: self.n,
            count: self.count,
            dtype: self.dtype,
            op: self.op,
            root: self.root,
            slice_bytes: self.slice_bytes,
        }
    }
}

/// Where the send and receive buffers of one rank lie in its user region (byte offsets and
/// lengths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of the user region.
    pub user: usize,
    /// Send buffer (offset, length).
    pub send: (usize, usize),
    /// Receive buffer (offset, length).
    pub recv: (usize, usize),
}

/// The buffer layout of `rank` for `case` (lengths from the table of `coll`, non-significant
/// buffers empty out of place; in place as the `*_inplace` methods of the communicator alias
/// them).
pub fn layout(case: &Case, rank: usize) -> Layout {
    let es = case.dtype.size();
    let (c, n) = (case.count * es, case.n);
    let root = rank == case.root;
    use CollKind::*;
    if case.in_place {
        let whole = |u: usize| Layout {
            user: u,
            send: (0, u),
            recv: (0, u),
        };
        match case.kind {
            AllReduce | Broadcast | Reduce => whole(c),
            AllToAll => whole(c * n),
            Barrier | P2p | AllToAllV => whole(0),
            ReduceScatter | Scatter => Layout {
                user: c * n,
                send: (0, c * n),
                recv: (rank * c, c),
            },
            AllGather | Gather => Layout {
                user: c * n,
                send: (rank * c, c),
                recv: (0, c * n),
            },
        }
    } else {
        let (s, r) = match case.kind {
            AllReduce => (c, c),
            ReduceScatter => (c * n, c),
            AllGather => (c, c * n),
            Broadcast => (if root { c } else { 0 }, c),
            Reduce => (c, if root { c } else { 0 }),
            AllToAll => (c * n, c * n),
            Gather => (c, if root { c * n } else { 0 }),
            Scatter => (if root { c * n } else { 0 }, c),
            Barrier | P2p | AllToAllV => (0, 0),
        };
        Layout {
            user: s + r,
            send: (0, s),
            recv: (s, r),
        }
    }
}

/// Result of a run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Each rank's receive buffer after the run.
    pub recv: Vec<Vec<u8>>,
    /// Each rank's plan.
    pub plans: Vec<Plan>,
    /// Per rank, the set (bit mask) of ranks whose start it (transitively) heard of.
    pub knows: Vec<u64>,
}

/// An access of a step to its rank's memory: absolute byte range, write or read.
#[derive(Debug, Clone, Copy)]
struct Access {
    lo: usize,
    hi: usize,
    write: bool,
    step: usize,
}

struct Rank {
    plan: Plan,
    lay: Layout,
    mem: Vec<u8>,
    deps_left: Vec<usize>,
    children: Vec<Vec<usize>>,
    done: Vec<bool>,
    posted: Vec<bool>,
    knows: Vec<u64>,
}

/// Runs `case` with `inputs[r]` as rank r's send-buffer contents (length of its send buffer).
pub fn run(case: &Case, inputs: &[Vec<u8>]) -> Outcome {
    let plans = (0..case.n)
        .map(|r| {
            select::plan(&case.ctx(r), case.algo)
                .unwrap_or_else(|e| panic!("{case:?}: rank {r}: no plan: {e}"))
        })
        .collect();
    run_plans(case, plans, inputs)
}

/// Runs the given plans (one per rank) as `case` with `inputs[r]` as rank r's send-buffer
/// contents.
pub fn run_plans(case: &Case, plans: Vec<Plan>, inputs: &[Vec<u8>]) -> Outcome {
    let n = case.n;
    assert_eq!(inputs.len(), n, "{case:?}: one input per rank");
    assert_eq!(plans.len(), n, "{case:?}: one plan per rank");
    let mut ranks: Vec<Rank> = Vec::with_capacity(n);
    for (r, (input, plan)) in inputs.iter().zip(plans).enumerate() {
        let lay = layout(case, r);
        assert_eq!(
            input.len(),
            lay.send.1,
            "{case:?}: rank {r}: input length vs send buffer"
        );
        let mut mem = vec![POISON; lay.user + plan.scratch_bytes];
        mem[lay.send.0..lay.send.0 + lay.send.1].copy_from_slice(input);
        let steps = plan.steps.len();
        let mut children = vec![Vec::new(); steps];
        let mut deps_left = vec![0; steps];
        for (i, st) in plan.steps.iter().enumerate() {
            for &d in &st.deps {
                let d = d as usize;
                assert!(
                    d < i,
                    "{case:?}: rank {r}: step {i} depends on step {d}, not an earlier one"
                );
                children[d].push(i);
            }
            deps_left[i] = st.deps.len();
        }
        ranks.push(Rank {
            plan,
            lay,
            mem,
            deps_left,
            children,
            done: vec![false; steps],
            posted: vec![false; steps],
            knows: vec![0; steps],
        });
    }
    for (r, rk) in ranks.iter().enumerate() {
        static_checks(case, r, rk);
    }
    wire_order(case, &ranks);

    // Per ordered pair (a, b): a's sends to b and b's receives from a, in step order.
    let mut sendq: Vec<VecDeque<usize>> = vec![VecDeque::new(); n * n];
    let mut recvq: Vec<VecDeque<usize>> = vec![VecDeque::new(); n * n];
    for (r, rk) in ranks.iter().enumerate() {
        for (i, st) in rk.plan.steps.iter().enumerate() {
            match st.op {
                Op::Send { peer, .. } => sendq[r * n + peer].push_back(i),
                Op::Recv { peer, .. } | Op::RecvReduce { peer, .. } => {
                    recvq[peer * n + r].push_back(i)
                }
                _ => {}
            }
        }
    }
    let mut ready: Vec<(usize, usize)> = Vec::new();
    for (r, rk) in ranks.iter().enumerate() {
        for i in 0..rk.plan.steps.len() {
            if rk.deps_left[i] == 0 {
                ready.push((r, i));
            }
        }
    }
    // Steps are popped from the back; reverse so that lower steps go first (deterministic,
    // like a posting order).
    ready.reverse();
    let total: usize = ranks.iter().map(|rk| rk.plan.steps.len()).sum();
    let mut completed = 0usize;
    loop {
        while let Some((r, i)) = ready.pop() {
            let rk = &mut ranks[r];
            let own = rk.plan.steps[i]
                .deps
                .iter()
                .fold(1u64 << (r % 64), |m, &d| m | rk.knows[d as usize]);
            rk.knows[i] = own;
            let op = rk.plan.steps[i].op;
            match op {
                Op::Send { .. } | Op::Recv { .. } | Op::RecvReduce { .. } => rk.posted[i] = true,
                _ => {
                    local(case, r, rk, &op);
                    complete(&mut ranks[r], i, r, &mut ready);
                    completed += 1;
                }
            }
        }
        if completed == total {
            break;
        }
        // Match what can be matched.
        let mut matched = false;
        for a in 0..n {
            for b in 0..n {
                while let (Some(&si), Some(&ri)) =
                    (sendq[a * n + b].front(), recvq[a * n + b].front())
                {
                    if !ranks[a].posted[si] || !ranks[b].posted[ri] {
                        break;
                    }
                    sendq[a * n + b].pop_front();
                    recvq[a * n + b].pop_front();
                    deliver(case, &mut ranks, a, si, b, ri);
                    complete(&mut ranks[a], si, a, &mut ready);
                    complete(&mut ranks[b], ri, b, &mut ready);
                    completed += 2;
                    matched = true;
                }
            }
        }
        if !matched && ready.is_empty() {
            let mut msg = String::new();
            for (r, rk) in ranks.iter().enumerate() {
                let pending: Vec<String> = (0..rk.plan.steps.len())
                    .filter(|&i| !rk.done[i])
                    .take(6)
                    .map(|i| {
                        format!(
                            "#{i} {:?} {} deps left",
                            rk.plan.steps[i].op,
                            if rk.posted[i] {
                                "posted,".to_string()
                            } else {
                                format!("{}", rk.deps_left[i])
                            }
                        )
                    })
                    .collect();
                if !pending.is_empty() {
                    msg += &format!("\n  rank {r}: {}", pending.join("; "));
                }
            }
            panic!("{case:?}: deadlock, no step can progress:{msg}");
        }
    }
    let mut recv = Vec::with_capacity(n);
    let mut knows = Vec::with_capacity(n);
    let mut plans = Vec::with_capacity(n);
    for (r, rk) in ranks.into_iter().enumerate() {
        let (o, l) = rk.lay.recv;
        recv.push(rk.mem[o..o + l].to_vec());
        knows.push(rk.knows.iter().fold(1u64 << (r % 64), |m, &k| m | k));
        plans.push(rk.plan);
    }
    Outcome { recv, plans, knows }
}

fn complete(rk: &mut Rank, i: usize, r: usize, ready: &mut Vec<(usize, usize)>) {
    rk.done[i] = true;
    for k in 0..rk.children[i].len() {
        let c = rk.children[i][k];
        rk.deps_left[c] -= 1;
        if rk.deps_left[c] == 0 {
            ready.push((r, c));
        }
    }
}

/// Absolute byte range of a span in the rank's memory, checked.
fn abs(case: &Case, r: usize, rk: &Rank, s: &Span, step: usize) -> (usize, usize) {
    let (base, cap) = match s.buf {
        Buf::Send => rk.lay.send,
        Buf::Recv => rk.lay.recv,
        Buf::Scratch => (rk.lay.user, rk.plan.scratch_bytes),
    };
    let end = s.off.checked_add(s.len);
    assert!(
        end.is_some_and(|e| e <= cap),
        "{case:?}: rank {r} step {step}: span {s:?} out of bounds ({:?} has {cap} bytes)",
        s.buf
    );
    (base + s.off, base + s.off + s.len)
}

fn local(case: &Case, r: usize, rk: &mut Rank, op: &Op) {
    let (dt, rop) = (case.dtype, case.op);
    match op {
        Op::Copy { src, dst } => {
            let s = abs(case, r, rk, src, usize::MAX);
            let d = abs(case, r, rk, dst, usize::MAX);
            rk.mem.copy_within(s.0..s.1, d.0);
        }
        Op::Reduce { a, b, dst } => {
            let a = abs(case, r, rk, a, usize::MAX);
            let b = abs(case, r, rk, b, usize::MAX);
            let d = abs(case, r, rk, dst, usize::MAX);
            let mut x = rk.mem[a.0..a.1].to_vec();
            let y = rk.mem[b.0..b.1].to_vec();
            reduce::reduce_inplace(dt, rop, &mut x, &y)
                .unwrap_or_else(|e| panic!("{case:?}: rank {r}: {op:?}: {e}"));
            rk.mem[d.0..d.1].copy_from_slice(&x);
        }
        Op::Finalize { span } => {
            let s = abs(case, r, rk, span, usize::MAX);
            reduce::finalize(dt, rop, &mut rk.mem[s.0..s.1], case.n)
                .unwrap_or_else(|e| panic!("{case:?}: rank {r}: {op:?}: {e}"));
        }
        _ => unreachable!(),
    }
}

fn deliver(case: &Case, ranks: &mut [Rank], a: usize, si: usize, b: usize, ri: usize) {
    let Op::Send { src, .. } = ranks[a].plan.steps[si].op else {
        unreachable!()
    };
    let s = abs(case, a, &ranks[a], &src, si);
    let data = ranks[a].mem[s.0..s.1].to_vec();
    let kn = ranks[a].knows[si];
    let rk = &mut ranks[b];
    rk.knows[ri] |= kn;
    match rk.plan.steps[ri].op {
        Op::Recv { dst, .. } => {
            let d = abs(case, b, rk, &dst, ri);
            assert_eq!(
                d.1 - d.0,
                data.len(),
                "{case:?}: length mismatch: rank {a} step {si} sends {} bytes, rank {b} step {ri} receives {}",
                data.len(),
                d.1 - d.0
            );
            rk.mem[d.0..d.1].copy_from_slice(&data);
        }
        Op::RecvReduce { acc, dst, .. } => {
            let ac = abs(case, b, rk, &acc, ri);
            let d = abs(case, b, rk, &dst, ri);
            assert_eq!(
                d.1 - d.0,
                data.len(),
                "{case:?}: length mismatch: rank {a} step {si} sends {} bytes, rank {b} step {ri} receives {}",
                data.len(),
                d.1 - d.0
            );
            let mut x = rk.mem[ac.0..ac.1].to_vec();
            reduce::reduce_inplace(case.dtype, case.op, &mut x, &data)
                .unwrap_or_else(|e| panic!("{case:?}: rank {b} step {ri}: {e}"));
            rk.mem[d.0..d.1].copy_from_slice(&x);
        }
        _ => unreachable!(),
    }
}

fn disjoint_or_equal(x: (usize, usize), y: (usize, usize)) -> bool {
    x == y || x.1 <= y.0 || y.1 <= x.0 || x.0 == x.1 || y.0 == y.1
}

/// Per-step checks and the race check of one rank's plan.
fn static_checks(case: &Case, r: usize, rk: &Rank) {
    let es = case.dtype.size();
    let mut acc: Vec<Access> = Vec::new();
    let mut add = |lo: usize, hi: usize, write: bool, step: usize| {
        if hi > lo {
            acc.push(Access {
                lo,
                hi,
                write,
                step,
            });
        }
    };
    for (i, st) in rk.plan.steps.iter().enumerate() {
        let ctx = format!("{case:?}: rank {r} step {i} {:?}", st.op);
        let peer_ok = |p: usize| {
            assert!(p < case.n && p != r, "{ctx}: bad peer {p}");
        };
        let no_send_write = |s: &Span| {
            assert!(
                s.buf != Buf::Send || s.len == 0,
                "{ctx}: writes to the send buffer"
            );
        };
        let whole = |s: &Span| {
            assert!(s.len % es == 0, "{ctx}: length not a multiple of {es}");
        };
        match &st.op {
            Op::Send { peer, src } => {
                peer_ok(*peer);
                let s = abs(case, r, rk, src, i);
                add(s.0, s.1, false, i);
            }
            Op::Recv { peer, dst } => {
                peer_ok(*peer);
                no_send_write(dst);
                let d = abs(case, r, rk, dst, i);
                add(d.0, d.1, true, i);
            }
            Op::RecvReduce { peer, acc: a, dst } => {
                peer_ok(*peer);
                no_send_write(dst);
                whole(dst);
                assert_eq!(a.len, dst.len, "{ctx}: acc and dst lengths differ");
                let x = abs(case, r, rk, a, i);
                let d = abs(case, r, rk, dst, i);
                assert!(disjoint_or_equal(x, d), "{ctx}: acc partially overlaps dst");
                add(x.0, x.1, false, i);
                add(d.0, d.1, true, i);
            }
            Op::Reduce { a, b, dst } => {
                no_send_write(dst);
                whole(dst);
                assert!(
                    a.len == dst.len && b.len == dst.len,
                    "{ctx}: operand lengths differ"
                );
                let x = abs(case, r, rk, a, i);
                let y = abs(case, r, rk, b, i);
                let d = abs(case, r, rk, dst, i);
                assert!(
                    disjoint_or_equal(x, d) && disjoint_or_equal(y, d),
                    "{ctx}: an operand partially overlaps dst"
                );
                add(x.0, x.1, false, i);
                add(y.0, y.1, false, i);
                add(d.0, d.1, true, i);
            }
            Op::Copy { src, dst } => {
                no_send_write(dst);
                assert_eq!(src.len, dst.len, "{ctx}: copy lengths differ");
                let s = abs(case, r, rk, src, i);
                let d = abs(case, r, rk, dst, i);
                if s != d {
                    add(s.0, s.1, false, i);
                    add(d.0, d.1, true, i);
                }
            }
            Op::Finalize { span } => {
                no_send_write(span);
                whole(span);
                let s = abs(case, r, rk, span, i);
                add(s.0, s.1, true, i);
            }
        }
    }
    // Transitive ancestors as bit sets.
    let steps = rk.plan.steps.len();
    let words = steps.div_ceil(64).max(1);
    let mut anc = vec![0u64; steps * words];
    for i in 0..steps {
        for &d in &rk.plan.steps[i].deps {
            let d = d as usize;
            for w in 0..words {
                anc[i * words + w] |= anc[d * words + w];
            }
            anc[i * words + d / 64] |= 1 << (d % 64);
        }
    }
    let ordered = |i: usize, j: usize| {
        let (a, b) = if i < j { (i, j) } else { (j, i) };
        anc[b * words + a / 64] & (1 << (a % 64)) != 0
    };
    acc.sort_by_key(|a| (a.lo, a.hi));
    for x in 0..acc.len() {
        for y in x + 1..acc.len() {
            if acc[y].lo >= acc[x].hi {
                break;
            }
            let (p, q) = (acc[x], acc[y]);
            if p.step == q.step || !(p.write || q.write) {
                continue;
            }
            assert!(
                ordered(p.step, q.step),
                "{case:?}: rank {r}: race: steps {} ({:?}) and {} ({:?}) touch bytes {}..{} \
                 without a dependency path",
                p.step,
                rk.plan.steps[p.step].op,
                q.step,
                rk.plan.steps[q.step].op,
                p.lo.max(q.lo),
                p.hi.min(q.hi)
            );
        }
    }
}

/// The k-th send of a to b carries as many bytes as the k-th receive of b from a.
fn wire_order(case: &Case, ranks: &[Rank]) {
    let n = case.n;
    for a in 0..n {
        for b in 0..n {
            let sends: Vec<usize> = ranks[a]
                .plan
                .steps
                .iter()
                .filter_map(|s| match s.op {
                    Op::Send { peer, src } if peer == b => Some(src.len),
                    _ => None,
                })
                .collect();
            let recvs: Vec<usize> = ranks[b]
                .plan
                .steps
                .iter()
                .filter_map(|s| match s.op {
                    Op::Recv { peer, dst } | Op::RecvReduce { peer, dst, .. } if peer == a => {
                        Some(dst.len)
                    }
                    _ => None,
                })
                .collect();
            assert_eq!(
                sends.len(),
                recvs.len(),
                "{case:?}: rank {a} sends {} messages to rank {b}, which receives {}",
                sends.len(),
                recvs.len()
            );
            for (k, (s, v)) in sends.iter().zip(&recvs).enumerate() {
                assert_eq!(
                    s, v,
                    "{case:?}: wire order: message {k} from rank {a} to rank {b}: {s} bytes sent, {v} expected"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
