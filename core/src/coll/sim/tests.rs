//! The collective test matrix over the simulator, with closed-form expected values.
//!
//! Rank r's element i (index in its send buffer) is a small integer: for `Prod` 1 or 2, else
//! 0..=10 (shifted to -5..=5 for signed and float types), so sums and products are exact in
//! every type, f16 and bf16 included (integer types wrap where they must, as the kernels do).

use super::*;
use crate::coll::reduce::SLOTS;
use half::{bf16, f16};

const NS: [usize; 6] = [1, 2, 3, 4, 5, 8];

/// (count, slice_bytes): the edge counts with the default-like slice, the same with tiny slices
/// (many pipelined slices per block), and a count spanning several real slices.
const SHAPES: [(usize, usize); 11] = [
    (0, 4096),
    (1, 4096),
    (2, 4096),
    (7, 4096),
    (13, 4096),
    (97, 4096),
    (5000, 4096),
    (2, 8),
    (7, 8),
    (13, 24),
    (97, 24),
];

fn signed(d: DataType) -> bool {
    !matches!(d, DataType::U8 | DataType::U32 | DataType::U64)
}

fn val(case: &Case, r: usize, i: usize) -> f64 {
    if case.op == ReduceOp::Prod {
        1.0 + ((r + i) % 2) as f64
    } else {
        let v = ((r * 7 + i * 3 + 1) % 11) as f64;
        if signed(case.dtype) {
            v - 5.0
        } else {
            v
        }
    }
}

/// One element of `d` from an integral `v` (integers wrap like the kernels).
fn enc(d: DataType, v: f64) -> Vec<u8> {
    let i = v as i64;
    match d {
        DataType::I8 => (i as i8).to_le_bytes().to_vec(),
        DataType::U8 => (i as u8).to_le_bytes().to_vec(),
        DataType::I16 => (i as i16).to_le_bytes().to_vec(),
        DataType::I32 => (i as i32).to_le_bytes().to_vec(),
        DataType::U32 => (i as u32).to_le_bytes().to_vec(),
        DataType::I64 => i.to_le_bytes().to_vec(),
        DataType::U64 => (i as u64).to_le_bytes().to_vec(),
        DataType::F16 => f16::from_f64(v).to_le_bytes().to_vec(),
        DataType::BF16 => bf16::from_f64(v).to_le_bytes().to_vec(),
        DataType::F32 => (v as f32).to_le_bytes().to_vec(),
        DataType::F64 => v.to_le_bytes().to_vec(),
    }
}

/// The reduction of `vals` (one per rank), finalized, as one element.
fn reduced(case: &Case, vals: &[f64]) -> Vec<u8> {
    let d = case.dtype;
    let sum: f64 = vals.iter().sum();
    match case.op {
        ReduceOp::Sum => enc(d, sum),
        ReduceOp::Prod => enc(d, vals.iter().product()),
        ReduceOp::Min => enc(d, vals.iter().copied().fold(f64::INFINITY, f64::min)),
        ReduceOp::Max => enc(d, vals.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
        // Integer types only (matrix skips the others): bits of the sign-extended values.
        ReduceOp::Band => enc(d, vals.iter().fold(-1i64, |a, &v| a & v as i64) as f64),
        ReduceOp::Bor => enc(d, vals.iter().fold(0i64, |a, &v| a | v as i64) as f64),
        ReduceOp::Bxor => enc(d, vals.iter().fold(0i64, |a, &v| a ^ v as i64) as f64),
        ReduceOp::Avg => {
            let n = case.n;
            match d {
                DataType::F16 => f16::from_f32(f16::from_f64(sum).to_f32() / n as f32)
                    .to_le_bytes()
                    .to_vec(),
                DataType::BF16 => bf16::from_f32(bf16::from_f64(sum).to_f32() / n as f32)
                    .to_le_bytes()
                    .to_vec(),
                DataType::F32 => ((sum as f32) / n as f32).to_le_bytes().to_vec(),
                DataType::F64 => (sum / n as f64).to_le_bytes().to_vec(),
                // Sums fit every integer type: truncating division as in the type.
                _ => enc(d, ((sum as i64) / n as i64) as f64),
            }
        }
    }
}

/// Send-buffer contents of every rank.
fn inputs(case: &Case) -> Vec<Vec<u8>> {
    let es = case.dtype.size();
    (0..case.n)
        .map(|r| {
            let lay = layout(case, r);
            let significant = match case.kind {
                CollKind::Broadcast | CollKind::Scatter => r == case.root,
                _ => true,
            };
            if significant {
                (0..lay.send.1 / es)
                    .flat_map(|i| enc(case.dtype, val(case, r, i)))
                    .collect()
            } else {
                vec![POISON; lay.send.1]
            }
        })
        .collect()
}

/// Expected receive-buffer contents of rank q (None: not significant and not checked).
fn expected(case: &Case, q: usize) -> Option<Vec<u8>> {
    let (n, c, root) = (case.n, case.count, case.root);
    let red = |g: usize| reduced(case, &(0..n).map(|r| val(case, r, g)).collect::<Vec<_>>());
    let v = |r: usize, i: usize| enc(case.dtype, val(case, r, i));
    let e =
        |f: &dyn Fn(usize) -> Vec<u8>, len: usize| -> Vec<u8> { (0..len).flat_map(f).collect() };
    Some(match case.kind {
        CollKind::AllReduce => e(&red, c),
        CollKind::ReduceScatter => e(&|i| red(q * c + i), c),
        CollKind::AllGather => e(&|g| v(g / c.max(1), g % c.max(1)), c * n),
        CollKind::Broadcast => e(&|i| v(root, i), c),
        CollKind::Reduce if q == root => e(&red, c),
        // In place, a non-root's buffer is its input, untouched.
        CollKind::Reduce if case.in_place => e(&|i| v(q, i), c),
        CollKind::Reduce => return None,
        CollKind::AllToAll => e(&|g| v(g / c.max(1), q * c + g % c.max(1)), c * n),
        CollKind::Gather if q == root => e(&|g| v(g / c.max(1), g % c.max(1)), c * n),
        // In place, a non-root's buffer holds its block and nothing else was touched.
        CollKind::Gather if case.in_place => {
            let es = case.dtype.size();
            let mut b = vec![POISON; c * n * es];
            b[q * c * es..(q + 1) * c * es].copy_from_slice(&e(&|i| v(q, i), c));
            b
        }
        CollKind::Gather => return None,
        CollKind::Scatter => e(&|i| v(root, q * c + i), c),
        CollKind::Barrier | CollKind::P2p | CollKind::AllToAllV => Vec::new(),
    })
}

/// Runs `case` and compares every significant receive buffer with its closed form.
fn check(case: Case) -> Outcome {
    let out = run(&case, &inputs(&case));
    let es = case.dtype.size();
    for q in 0..case.n {
        if let Some(want) = expected(&case, q) {
            let got = &out.recv[q];
            if *got != want {
                let i = got
                    .chunks(es)
                    .zip(want.chunks(es))
                    .position(|(a, b)| a != b)
                    .unwrap_or(usize::MAX);
                panic!(
                    "{case:?}: rank {q}: element {i}: got {:?}, want {:?} ({} vs {} bytes)",
                    got.get(i * es..(i + 1) * es),
                    want.get(i * es..(i + 1) * es),
                    got.len(),
                    want.len()
                );
            }
        }
    }
    out
}

fn roots(n: usize) -> Vec<usize> {
    let mut v = vec![0, n - 1, n / 2];
    v.sort_unstable();
    v.dedup();
    v
}

#[allow(clippy::too_many_arguments)]
fn matrix(
    kind: CollKind,
    algos: &[Algo],
    dtypes: &[DataType],
    ops: &[ReduceOp],
    shapes: &[(usize, usize)],
) -> usize {
    let mut runs = 0;
    for &algo in algos {
        for n in NS {
            let rts = if kind.rooted() { roots(n) } else { vec![0] };
            for root in rts {
                for &dtype in dtypes {
                    for &op in ops {
                        if !op.supports(dtype) {
                            continue; // bitwise on floats: refused before any plan runs
                        }
                        for &(count, slice_bytes) in shapes {
                            for in_place in [false, true] {
                                check(Case {
                                    kind,
                                    algo,
                                    n,
                                    dtype,
                                    op,
                                    count,
                                    root,
                                    slice_bytes,
                                    in_place,
                                });
                                runs += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    runs
}

const SUM: [ReduceOp; 1] = [ReduceOp::Sum];
const SOME_TYPES: [DataType; 4] = [DataType::U8, DataType::F16, DataType::I32, DataType::F64];

#[test]
fn all_reduce_ring() {
    matrix(
        CollKind::AllReduce,
        &[Algo::Ring],
        &DataType::ALL,
        &ReduceOp::ALL,
        &SHAPES,
    );
}

#[test]
fn all_reduce_rec_doubling() {
    matrix(
        CollKind::AllReduce,
        &[Algo::RecDoubling],
        &DataType::ALL,
        &ReduceOp::ALL,
        &SHAPES,
    );
}

#[test]
fn reduce_scatter_ring() {
    matrix(
        CollKind::ReduceScatter,
        &[Algo::Ring],
        &DataType::ALL,
        &ReduceOp::ALL,
        &SHAPES,
    );
}

#[test]
fn reduce_chain() {
    matrix(
        CollKind::Reduce,
        &[Algo::Chain],
        &[
            DataType::I8,
            DataType::U32,
            DataType::BF16,
            DataType::F32,
            DataType::F64,
        ],
        &ReduceOp::ALL,
        &SHAPES,
    );
}

#[test]
fn reduce_tree() {
    matrix(
        CollKind::Reduce,
        &[Algo::Tree],
        &[
            DataType::I8,
            DataType::U64,
            DataType::F16,
            DataType::F32,
            DataType::I64,
        ],
        &ReduceOp::ALL,
        &SHAPES,
    );
}

#[test]
fn all_gather_ring() {
    matrix(
        CollKind::AllGather,
        &[Algo::Ring],
        &SOME_TYPES,
        &SUM,
        &SHAPES,
    );
}

#[test]
fn broadcast_chain_and_tree() {
    matrix(
        CollKind::Broadcast,
        &[Algo::Chain, Algo::Tree],
        &SOME_TYPES,
        &SUM,
        &SHAPES,
    );
}

#[test]
fn all_to_all_pairwise() {
    matrix(
        CollKind::AllToAll,
        &[Algo::Pairwise],
        &SOME_TYPES,
        &SUM,
        &SHAPES,
    );
}

#[test]
fn gather_and_scatter_direct() {
    matrix(
        CollKind::Gather,
        &[Algo::Direct],
        &SOME_TYPES,
        &SUM,
        &SHAPES,
    );
    matrix(
        CollKind::Scatter,
        &[Algo::Direct],
        &SOME_TYPES,
        &SUM,
        &SHAPES,
    );
}

#[test]
fn barrier_dissemination() {
    for n in [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17] {
        let case = Case {
            kind: CollKind::Barrier,
            algo: Algo::Dissemination,
            n,
            dtype: DataType::U8,
            op: ReduceOp::Sum,
            count: 0,
            root: 0,
            slice_bytes: 4096,
            in_place: false,
        };
        let out = check(case);
        let all = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
        for (r, k) in out.knows.iter().enumerate() {
            assert_eq!(
                *k, all,
                "barrier n={n}: rank {r} left without hearing from all"
            );
        }
        let rounds = (n as f64).log2().ceil() as usize;
        for p in &out.plans {
            assert_eq!(p.steps.len(), 2 * rounds);
        }
    }
}

/// Every rank of an all-reduce or all-gather heard (transitively) from every rank.
#[test]
fn everyone_hears_from_everyone() {
    for (kind, algo) in [
        (CollKind::AllReduce, Algo::Ring),
        (CollKind::AllReduce, Algo::RecDoubling),
        (CollKind::AllGather, Algo::Ring),
        (CollKind::AllToAll, Algo::Pairwise),
    ] {
        for n in NS {
            let out = check(Case {
                kind,
                algo,
                n,
                dtype: DataType::F32,
                op: ReduceOp::Sum,
                count: 3 * n,
                root: 0,
                slice_bytes: 4096,
                in_place: false,
            });
            assert!(
                out.knows.iter().all(|&k| k == (1u64 << n) - 1),
                "{kind:?} {n}"
            );
        }
    }
}

/// Non-exact float sums: every rank must still hold the same bits.
#[test]
fn all_reduce_bitwise_identical_on_all_ranks() {
    for algo in [Algo::Ring, Algo::RecDoubling] {
        for n in [2, 3, 5, 6, 7, 8] {
            for dtype in [DataType::F32, DataType::F16, DataType::BF16, DataType::F64] {
                for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Prod] {
                    let case = Case {
                        kind: CollKind::AllReduce,
                        algo,
                        n,
                        dtype,
                        op,
                        count: 301,
                        root: 0,
                        slice_bytes: 64,
                        in_place: false,
                    };
                    let ins: Vec<Vec<u8>> = (0..n)
                        .map(|r| {
                            (0..301)
                                .flat_map(|i| {
                                    let v = ((r * 7919 + i * 104729) % 1000) as f64 / 7.3 + 0.01;
                                    match dtype {
                                        DataType::F16 => f16::from_f64(v).to_le_bytes().to_vec(),
                                        DataType::BF16 => bf16::from_f64(v).to_le_bytes().to_vec(),
                                        DataType::F32 => (v as f32).to_le_bytes().to_vec(),
                                        _ => v.to_le_bytes().to_vec(),
                                    }
                                })
                                .collect()
                        })
                        .collect();
                    let out = run(&case, &ins);
                    for r in 1..n {
                        assert_eq!(
                            out.recv[r], out.recv[0],
                            "{case:?}: rank {r} differs from 0"
                        );
                    }
                }
            }
        }
    }
}

fn plan_of(kind: CollKind, algo: Algo, n: usize, rank: usize, count: usize, slice: usize) -> Plan {
    select::plan(
        &PlanCtx {
            kind,
            rank,
            size: n,
            count,
            dtype: DataType::F32,
            op: ReduceOp::Avg,
            root: 0,
            slice_bytes: slice,
        },
        algo,
    )
    .unwrap()
}

#[test]
fn scratch_bounds() {
    for n in NS {
        for r in 0..n {
            // Ring all-reduce: no scratch at all.
            assert_eq!(
                plan_of(CollKind::AllReduce, Algo::Ring, n, r, 1 << 20, 4096).scratch_bytes,
                0
            );
            // Reduce: bounded by SLOTS slices whatever the message size.
            for algo in [Algo::Chain, Algo::Tree] {
                let p = plan_of(CollKind::Reduce, algo, n, r, 1 << 20, 4096);
                assert!(p.scratch_bytes <= SLOTS * 4096, "{algo:?} n={n} r={r}");
            }
            // Small messages need less than a slice per slot.
            let p = plan_of(CollKind::Reduce, Algo::Chain, n, r, 10, 4096);
            assert!(p.scratch_bytes <= 4096);
            // Recursive doubling: the message size.
            let p = plan_of(CollKind::AllReduce, Algo::RecDoubling, n, r, 100, 4096);
            assert!(p.scratch_bytes <= 400);
        }
    }
}

#[test]
fn ring_pipelines_slices() {
    // Slice j of step s+1 depends only on slice j's operations of step s.
    let n = 4;
    let p = plan_of(CollKind::AllReduce, Algo::Ring, n, 1, 4096, 1024);
    // 4 blocks of 4096 B, 4 slices each: 2(n-1) steps × 4 slices × (send + receive), and the
    // owned block's 4 finalize steps.
    assert_eq!(p.steps.len(), 2 * (n - 1) * 4 * 2 + 4);
    for st in &p.steps {
        assert!(st.deps.len() <= 2);
    }
    // The first step's operations on different slices do not wait for anything.
    assert!(p.steps[..8].iter().all(|s| s.deps.is_empty()));
}

#[test]
fn count_zero_plans_no_transfers() {
    for kind in CollKind::ALL {
        for &algo in select::valid(kind) {
            if kind == CollKind::P2p || kind == CollKind::Barrier {
                continue;
            }
            for n in NS {
                for r in 0..n {
                    let p = plan_of(kind, algo, n, r, 0, 4096);
                    assert!(p.steps.is_empty(), "{kind:?} {algo:?} n={n}");
                    assert_eq!(p.scratch_bytes, 0);
                }
            }
        }
    }
}

// The simulator catches broken plans.

fn two_rank_case() -> Case {
    Case {
        kind: CollKind::AllReduce,
        algo: Algo::Ring,
        n: 2,
        dtype: DataType::U8,
        op: ReduceOp::Sum,
        count: 4,
        root: 0,
        slice_bytes: 4096,
        in_place: false,
    }
}

fn plan(steps: &[(Op, &[u32])]) -> Plan {
    let mut p = Plan::default();
    for (op, d) in steps {
        p.push(*op, d);
    }
    p
}

#[test]
#[should_panic(expected = "deadlock")]
fn sim_catches_deadlock() {
    // Both ranks receive before sending.
    let p = |peer| {
        plan(&[
            (
                Op::Recv {
                    peer,
                    dst: Span::recv(0, 4),
                },
                &[],
            ),
            (
                Op::Send {
                    peer,
                    src: Span::send(0, 4),
                },
                &[0],
            ),
        ])
    };
    run_plans(
        &two_rank_case(),
        vec![p(1), p(0)],
        &[vec![0; 4], vec![0; 4]],
    );
}

#[test]
#[should_panic(expected = "wire order")]
fn sim_catches_length_mismatch() {
    let s = plan(&[(
        Op::Send {
            peer: 1,
            src: Span::send(0, 4),
        },
        &[],
    )]);
    let r = plan(&[(
        Op::Recv {
            peer: 0,
            dst: Span::recv(0, 2),
        },
        &[],
    )]);
    run_plans(&two_rank_case(), vec![s, r], &[vec![0; 4], vec![0; 4]]);
}

#[test]
#[should_panic(expected = "race")]
fn sim_catches_race() {
    // In place, receiving into the buffer that is still being sent.
    let case = Case {
        in_place: true,
        ..two_rank_case()
    };
    let p = |peer| {
        plan(&[
            (
                Op::Send {
                    peer,
                    src: Span::send(0, 4),
                },
                &[],
            ),
            (
                Op::Recv {
                    peer,
                    dst: Span::recv(0, 4),
                },
                &[],
            ),
        ])
    };
    run_plans(&case, vec![p(1), p(0)], &[vec![0; 4], vec![0; 4]]);
}

#[test]
#[should_panic(expected = "out of bounds")]
fn sim_catches_out_of_bounds() {
    let p = plan(&[(
        Op::Copy {
            src: Span::send(0, 4),
            dst: Span::recv(2, 4),
        },
        &[],
    )]);
    let case = Case {
        n: 1,
        ..two_rank_case()
    };
    run_plans(&case, vec![p], &[vec![0; 4]]);
}

#[test]
#[should_panic(expected = "not an earlier one")]
fn sim_catches_forward_dependency() {
    let mut p = Plan::default();
    p.steps.push(crate::coll::Step {
        op: Op::Finalize {
            span: Span::recv(0, 4),
        },
        deps: vec![0],
    });
    let case = Case {
        n: 1,
        ..two_rank_case()
    };
    run_plans(&case, vec![p], &[vec![0; 4]]);
}

#[test]
#[should_panic(expected = "partially overlaps")]
fn sim_catches_partial_overlap() {
    let s = plan(&[(
        Op::Send {
            peer: 1,
            src: Span::send(0, 2),
        },
        &[],
    )]);
    let r = plan(&[(
        Op::RecvReduce {
            peer: 0,
            acc: Span::recv(0, 2),
            dst: Span::recv(1, 2),
        },
        &[],
    )]);
    run_plans(&two_rank_case(), vec![s, r], &[vec![0; 4], vec![0; 4]]);
}

#[test]
#[should_panic(expected = "send buffer")]
fn sim_catches_send_buffer_write() {
    let p = plan(&[(
        Op::Copy {
            src: Span::recv(0, 4),
            dst: Span::send(0, 4),
        },
        &[],
    )]);
    let case = Case {
        n: 1,
        ..two_rank_case()
    };
    run_plans(&case, vec![p], &[vec![0; 4]]);
}
