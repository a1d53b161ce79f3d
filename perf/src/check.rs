//! Closed-form inputs and expected results for braid-perf's #wrong column.
//!
//! Inputs are small integers, so every reduction is exact in every type (f16 and bf16
//! included) whatever the order of operations; integer types wrap like the kernels do.

use braid::{Element, ReduceOp};
use half::{bf16, f16};

use crate::Bufs;

/// Which collective (mirrors the CLI names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
    Reduce,
    AllToAll,
    Gather,
    Scatter,
    SendRecv,
}

/// Element arithmetic for expected values.
pub trait PerfElem: Element + PartialEq + std::fmt::Debug {
    fn from_i64(v: i64) -> Self;
    fn combine(op: ReduceOp, a: Self, b: Self) -> Self;
    fn div_n(self, n: usize) -> Self;
    fn close(a: Self, b: Self) -> bool {
        a == b
    }
}

macro_rules! int_elem {
    ($($t:ty),*) => {$(
        impl PerfElem for $t {
            fn from_i64(v: i64) -> Self { v as $t }
            fn combine(op: ReduceOp, a: Self, b: Self) -> Self {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => a.wrapping_add(b),
                    ReduceOp::Prod => a.wrapping_mul(b),
                    ReduceOp::Min => a.min(b),
                    ReduceOp::Max => a.max(b),
                    ReduceOp::Band => a & b,
                    ReduceOp::Bor => a | b,
                    ReduceOp::Bxor => a ^ b,
                }
            }
            fn div_n(self, n: usize) -> Self { self / (n as $t) }
        }
    )*};
}
int_elem!(i8, u8, i16, i32, u32, i64, u64);

macro_rules! float_elem {
    ($t:ty, $to:expr, $from:expr, $tol:expr) => {
        impl PerfElem for $t {
            fn from_i64(v: i64) -> Self {
                $from(v as f64)
            }
            fn combine(op: ReduceOp, a: Self, b: Self) -> Self {
                let (x, y): (f64, f64) = ($to(a), $to(b));
                $from(match op {
                    ReduceOp::Sum | ReduceOp::Avg => x + y,
                    ReduceOp::Prod => x * y,
                    ReduceOp::Min => x.min(y),
                    ReduceOp::Max => x.max(y),
                    // Bitwise operators on floats are refused (parse_args, and the library
                    // before anything is sent): never reached.
                    ReduceOp::Band | ReduceOp::Bor | ReduceOp::Bxor => x,
                })
            }
            fn div_n(self, n: usize) -> Self {
                $from($to(self) / n as f64)
            }
            fn close(a: Self, b: Self) -> bool {
                let (x, y): (f64, f64) = ($to(a), $to(b));
                (x - y).abs() <= $tol * y.abs().max(1.0)
            }
        }
    };
}
float_elem!(f32, |v: f32| v as f64, |v: f64| v as f32, 1e-6);
float_elem!(f64, |v: f64| v, |v: f64| v, 1e-12);
float_elem!(f16, |v: f16| v.to_f64(), f16::from_f64, 2e-3);
float_elem!(bf16, |v: bf16| v.to_f64(), bf16::from_f64, 1e-2);

/// Input of rank `r` at element `i` for reductions.
fn v<T: PerfElem>(op: ReduceOp, n: usize, r: usize, i: usize) -> T {
    match op {
        ReduceOp::Prod => T::from_i64(if r == i % n { 2 } else { 1 }),
        _ => T::from_i64(((r * 7 + i * 3) % 5) as i64 + 1),
    }
}

/// Data of rank `r` at element `k` for data-movement collectives.
fn d<T: PerfElem>(r: usize, k: usize) -> T {
    T::from_i64(((r * 131 + k) % 97) as i64 + 1)
}

/// Block for rank `j` from rank `r` at element `k` (all-to-all).
fn g<T: PerfElem>(r: usize, j: usize, k: usize) -> T {
    T::from_i64(((r * 31 + j * 17 + k) % 97) as i64 + 1)
}

fn reduced<T: PerfElem>(op: ReduceOp, n: usize, i: usize) -> T {
    let mut acc = v::<T>(op, n, 0, i);
    for r in 1..n {
        acc = T::combine(op, acc, v::<T>(op, n, r, i));
    }
    if op == ReduceOp::Avg {
        acc = acc.div_n(n);
    }
    acc
}

/// Fresh buffers for one call; `c` is the per-rank count.
pub fn buffers<T: PerfElem>(
    k: Kind,
    n: usize,
    rank: usize,
    c: usize,
    root: usize,
    inplace: bool,
    op: ReduceOp,
) -> Bufs<T> {
    let z = T::default();
    let is_root = rank == root;
    let (send, recv): (Vec<T>, Vec<T>) = match k {
        Kind::AllReduce => {
            let s: Vec<T> = (0..c).map(|i| v(op, n, rank, i)).collect();
            if inplace {
                (vec![], s)
            } else {
                (s, vec![z; c])
            }
        }
        Kind::ReduceScatter => {
            let s: Vec<T> = (0..n * c).map(|i| v(op, n, rank, i)).collect();
            if inplace {
                (vec![], s)
            } else {
                (s, vec![z; c])
            }
        }
        Kind::AllGather => {
            let s: Vec<T> = (0..c).map(|k| d(rank, k)).collect();
            if inplace {
                let mut b = vec![z; n * c];
                b[rank * c..(rank + 1) * c].copy_from_slice(&s);
                (vec![], b)
            } else {
                (s, vec![z; n * c])
            }
        }
        Kind::Broadcast => {
            let s: Vec<T> = if is_root {
                (0..c).map(|k| d(root, k)).collect()
            } else {
                vec![]
            };
            if inplace {
                (vec![], if is_root { s } else { vec![z; c] })
            } else {
                (s, vec![z; c])
            }
        }
        Kind::Reduce => {
            let s: Vec<T> = (0..c).map(|i| v(op, n, rank, i)).collect();
            if inplace {
                (vec![], s)
            } else {
                (s, if is_root { vec![z; c] } else { vec![] })
            }
        }
        Kind::AllToAll => {
            let s: Vec<T> = (0..n * c)
                .map(|x| g(rank, x / c.max(1), x % c.max(1)))
                .collect();
            if inplace {
                (vec![], s)
            } else {
                (s, vec![z; n * c])
            }
        }
        Kind::Gather => {
            let s: Vec<T> = (0..c).map(|k| d(rank, k)).collect();
            if inplace {
                let mut b = vec![z; n * c];
                b[rank * c..(rank + 1) * c].copy_from_slice(&s);
                (vec![], b)
            } else {
                (s, if is_root { vec![z; n * c] } else { vec![] })
            }
        }
        Kind::Scatter => {
            let s: Vec<T> = if is_root {
                (0..n * c).map(|x| d(x / c.max(1), x % c.max(1))).collect()
            } else {
                vec![]
            };
            if inplace {
                (vec![], if is_root { s } else { vec![z; n * c] })
            } else {
                (s, vec![z; c])
            }
        }
        Kind::SendRecv => {
            let s: Vec<T> = (0..c).map(|k| d(rank, k)).collect();
            if inplace {
                let mut b = s;
                b.resize(2 * c, z);
                (vec![], b)
            } else {
                (s, vec![z; c])
            }
        }
    };
    Bufs {
        send: crate::Mem::Heap(send),
        recv: crate::Mem::Heap(recv),
    }
}

/// Counts elements of `recv` that differ from the expected result.
#[allow(clippy::too_many_arguments)]
pub fn count_wrong<T: PerfElem>(
    k: Kind,
    n: usize,
    rank: usize,
    c: usize,
    root: usize,
    inplace: bool,
    op: ReduceOp,
    recv: &[T],
) -> u64 {
    let mut wrong = 0u64;
    let mut chk = |got: T, want: T| {
        if !T::close(got, want) {
            wrong += 1;
        }
    };
    let is_root = rank == root;
    match k {
        Kind::AllReduce => (0..c).for_each(|i| chk(recv[i], reduced(op, n, i))),
        Kind::ReduceScatter => {
            let base = if inplace { rank * c } else { 0 };
            (0..c).for_each(|x| chk(recv[base + x], reduced(op, n, rank * c + x)))
        }
        Kind::AllGather => (0..n * c).for_each(|x| chk(recv[x], d(x / c, x % c))),
        Kind::Broadcast => (0..c).for_each(|x| chk(recv[x], d(root, x))),
        Kind::Reduce => {
            if is_root {
                (0..c).for_each(|i| chk(recv[i], reduced(op, n, i)))
            } else if inplace {
                // Non-root buffers are left unchanged.
                (0..c).for_each(|i| chk(recv[i], v(op, n, rank, i)))
            }
        }
        Kind::AllToAll => (0..n * c).for_each(|x| chk(recv[x], g(x / c, rank, x % c))),
        Kind::Gather => {
            if is_root {
                (0..n * c).for_each(|x| chk(recv[x], d(x / c, x % c)))
            }
        }
        Kind::Scatter => {
            let base = if inplace { rank * c } else { 0 };
            (0..c).for_each(|x| chk(recv[base + x], d(rank, x)))
        }
        Kind::SendRecv => {
            let prev = (rank + n - 1) % n;
            let base = if inplace { c } else { 0 };
            (0..c).for_each(|x| chk(recv[base + x], d(prev, x)))
        }
    }
    wrong
}
