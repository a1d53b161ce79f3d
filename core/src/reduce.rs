//! Reduction kernels.
//!
//! Elementwise combination of byte buffers holding elements of a [`DataType`] with a
//! [`ReduceOp`]. The executor calls these on receive, local-reduce and finalize steps.
//!
//! Buffers are byte slices and may be unaligned for the element type: aligned buffers are
//! reinterpreted in place (`bytemuck`), unaligned ones are processed in blocks of 256
//! elements copied through aligned stack arrays. Each operator gets its own monomorphised loop
//! (a plain zip over typed slices), which the compiler vectorises.
//!
//! Semantics:
//! - integers: `Sum`/`Avg` and `Prod` wrap on overflow (never panic); `Min`/`Max` as `Ord`;
//!   `Band`/`Bor`/`Bxor` are `&`, `|`, `^` of the two's-complement bits.
//! - floats: IEEE `+`/`*`; `Min`/`Max` follow `f32::min`/`f32::max` (a NaN operand yields the
//!   other operand).
//! - f16/bf16 are converted to f32 in blocks, combined, and rounded back (round to nearest).
//! - `Avg` combines as `Sum`; the division by the rank count happens once, in [`finalize`].
//! - the bitwise operators are refused on floating-point types ([`ReduceOp::supports`]): every
//!   entry point returns [`Error::InvalidArgument`] for them, before touching any buffer.

use crate::error::{Error, Result};
use crate::types::{DataType, ReduceOp};
use bytemuck::Pod;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Elements per block on the unaligned and f16/bf16 paths.
const BLOCK: usize = 256;

/// Arithmetic of one element type (integers wrap).
trait Arith: Pod {
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn min_(self, o: Self) -> Self;
    fn max_(self, o: Self) -> Self;
    /// Divides every element by `n` (`n > 0`): integer division (towards zero) for integers.
    fn div_slice(buf: &mut [Self], n: usize);
}

/// Bitwise operations of the integer element types.
trait Bitwise: Arith {
    fn and_(self, o: Self) -> Self;
    fn or_(self, o: Self) -> Self;
    fn xor_(self, o: Self) -> Self;
}

macro_rules! arith_int {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)]
            fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            #[inline(always)]
            fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            #[inline(always)]
            fn min_(self, o: Self) -> Self { Ord::min(self, o) }
            #[inline(always)]
            fn max_(self, o: Self) -> Self { Ord::max(self, o) }
            fn div_slice(buf: &mut [Self], n: usize) {
                match <$t>::try_from(n) {
                    Ok(d) if d > 0 => {
                        for x in buf.iter_mut() {
                            *x /= d;
                        }
                    }
                    _ => {
                        // n does not fit the element type: divide in a wider type.
                        let d = n as i128;
                        for x in buf.iter_mut() {
                            *x = (*x as i128 / d) as $t;
                        }
                    }
                }
            }
        }
        impl Bitwise for $t {
            #[inline(always)]
            fn and_(self, o: Self) -> Self { self & o }
            #[inline(always)]
            fn or_(self, o: Self) -> Self { self | o }
            #[inline(always)]
            fn xor_(self, o: Self) -> Self { self ^ o }
        }
    )*};
}
arith_int!(i8, u8, i16, i32, u32, i64, u64);

macro_rules! arith_float {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)]
            fn add(self, o: Self) -> Self { self + o }
            #[inline(always)]
            fn mul(self, o: Self) -> Self { self * o }
            #[inline(always)]
            fn min_(self, o: Self) -> Self { <$t>::min(self, o) }
            #[inline(always)]
            fn max_(self, o: Self) -> Self { <$t>::max(self, o) }
            fn div_slice(buf: &mut [Self], n: usize) {
                let d = n as $t;
                for x in buf.iter_mut() {
                    *x /= d;
                }
            }
        }
    )*};
}
arith_float!(f32, f64);

/// f16/bf16 blockwise conversions to and from f32 (round to nearest even, NaN stays NaN).
trait Half: Pod {
    fn to_f32s(h: &[Self], f: &mut [f32]);
    fn from_f32s(h: &mut [Self], f: &[f32]);
}

impl Half for f16 {
    fn to_f32s(h: &[Self], f: &mut [f32]) {
        h.convert_to_f32_slice(f);
    }
    fn from_f32s(h: &mut [Self], f: &[f32]) {
        h.convert_from_f32_slice(f);
    }
}

// bf16 is the upper half of an f32: plain integer loops (which vectorise) instead of the
// element-at-a-time conversions of `half`; bit-identical to `bf16::to_f32`/`bf16::from_f32`.
impl Half for bf16 {
    fn to_f32s(h: &[Self], f: &mut [f32]) {
        for (d, s) in f.iter_mut().zip(h) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    fn from_f32s(h: &mut [Self], f: &[f32]) {
        for (d, s) in h.iter_mut().zip(f) {
            // Both results computed, then selected: branch-free, so it vectorises.
            let b = s.to_bits();
            let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
            let quiet = (b >> 16) | 0x40;
            let r = if s.is_nan() { quiet } else { rounded };
            *d = bf16::from_bits(r as u16);
        }
    }
}

#[inline(always)]
fn zip_inplace<T: Copy, F: Fn(T, T) -> T>(acc: &mut [T], b: &[T], f: F) {
    for (x, &y) in acc.iter_mut().zip(b) {
        *x = f(*x, y);
    }
}

#[inline(always)]
fn zip_into<T: Copy, F: Fn(T, T) -> T>(dst: &mut [T], a: &[T], b: &[T], f: F) {
    for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        *d = f(x, y);
    }
}

/// Copies `bytes` into the first `bytes.len() / size_of::<T>()` elements of `tmp`.
#[inline(always)]
fn load<T: Pod>(tmp: &mut [T], bytes: &[u8]) {
    bytemuck::cast_slice_mut::<T, u8>(tmp).copy_from_slice(bytes);
}

#[inline(always)]
fn store<T: Pod>(bytes: &mut [u8], tmp: &[T]) {
    bytes.copy_from_slice(bytemuck::cast_slice::<T, u8>(tmp));
}

fn bytes_inplace<T: Pod, F: Fn(T, T) -> T + Copy>(acc: &mut [u8], b: &[u8], f: F) {
    if let (Ok(x), Ok(y)) = (
        bytemuck::try_cast_slice_mut::<u8, T>(acc),
        bytemuck::try_cast_slice::<u8, T>(b),
    ) {
        zip_inplace(x, y, f);
        return;
    }
    let es = std::mem::size_of::<T>();
    let mut ta = [T::zeroed(); BLOCK];
    let mut tb = [T::zeroed(); BLOCK];
    for (ca, cb) in acc.chunks_mut(BLOCK * es).zip(b.chunks(BLOCK * es)) {
        let k = ca.len() / es;
        load(&mut ta[..k], ca);
        load(&mut tb[..k], cb);
        zip_inplace(&mut ta[..k], &tb[..k], f);
        store(ca, &ta[..k]);
    }
}

fn bytes_into<T: Pod, F: Fn(T, T) -> T + Copy>(dst: &mut [u8], a: &[u8], b: &[u8], f: F) {
    if let (Ok(d), Ok(x), Ok(y)) = (
        bytemuck::try_cast_slice_mut::<u8, T>(dst),
        bytemuck::try_cast_slice::<u8, T>(a),
        bytemuck::try_cast_slice::<u8, T>(b),
    ) {
        zip_into(d, x, y, f);
        return;
    }
    let es = std::mem::size_of::<T>();
    let mut ta = [T::zeroed(); BLOCK];
    let mut tb = [T::zeroed(); BLOCK];
    for ((cd, ca), cb) in dst
        .chunks_mut(BLOCK * es)
        .zip(a.chunks(BLOCK * es))
        .zip(b.chunks(BLOCK * es))
    {
        let k = cd.len() / es;
        load(&mut ta[..k], ca);
        load(&mut tb[..k], cb);
        zip_inplace(&mut ta[..k], &tb[..k], f);
        store(cd, &ta[..k]);
    }
}

/// f16/bf16: `acc = acc ⊕ b` computed in f32, blockwise.
fn half_inplace<H, F>(acc: &mut [u8], b: &[u8], f: F)
where
    H: Half,
    F: Fn(f32, f32) -> f32 + Copy,
{
    let mut ha = [H::zeroed(); BLOCK];
    let mut fa = [0f32; BLOCK];
    let mut fb = [0f32; BLOCK];
    for (ca, cb) in acc.chunks_mut(BLOCK * 2).zip(b.chunks(BLOCK * 2)) {
        let k = ca.len() / 2;
        load(&mut ha[..k], cb);
        H::to_f32s(&ha[..k], &mut fb[..k]);
        load(&mut ha[..k], ca);
        H::to_f32s(&ha[..k], &mut fa[..k]);
        zip_inplace(&mut fa[..k], &fb[..k], f);
        H::from_f32s(&mut ha[..k], &fa[..k]);
        store(ca, &ha[..k]);
    }
}

/// f16/bf16: `dst = a ⊕ b` computed in f32, blockwise.
fn half_into<H, F>(dst: &mut [u8], a: &[u8], b: &[u8], f: F)
where
    H: Half,
    F: Fn(f32, f32) -> f32 + Copy,
{
    let mut ha = [H::zeroed(); BLOCK];
    let mut fa = [0f32; BLOCK];
    let mut fb = [0f32; BLOCK];
    for ((cd, ca), cb) in dst
        .chunks_mut(BLOCK * 2)
        .zip(a.chunks(BLOCK * 2))
        .zip(b.chunks(BLOCK * 2))
    {
        let k = cd.len() / 2;
        load(&mut ha[..k], cb);
        H::to_f32s(&ha[..k], &mut fb[..k]);
        load(&mut ha[..k], ca);
        H::to_f32s(&ha[..k], &mut fa[..k]);
        zip_inplace(&mut fa[..k], &fb[..k], f);
        H::from_f32s(&mut ha[..k], &fa[..k]);
        store(cd, &ha[..k]);
    }
}

/// The error of a bitwise operator on a type without bits semantics (floats).
fn not_bitwise(dtype: DataType, op: ReduceOp) -> Error {
    match op.check(dtype) {
        Err(e) => e,
        Ok(()) => Error::Internal(format!("{op} on {dtype} reached a kernel without it")),
    }
}

/// Arithmetic operators of any element type (floats included); the bitwise ones are refused
/// here (integers take them in [`int_inplace`]).
fn typed_inplace<T: Arith>(dtype: DataType, op: ReduceOp, acc: &mut [u8], b: &[u8]) -> Result<()> {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => bytes_inplace::<T, _>(acc, b, T::add),
        ReduceOp::Prod => bytes_inplace::<T, _>(acc, b, T::mul),
        ReduceOp::Min => bytes_inplace::<T, _>(acc, b, T::min_),
        ReduceOp::Max => bytes_inplace::<T, _>(acc, b, T::max_),
        ReduceOp::Band | ReduceOp::Bor | ReduceOp::Bxor => return Err(not_bitwise(dtype, op)),
    }
    Ok(())
}

fn typed_into<T: Arith>(
    dtype: DataType,
    op: ReduceOp,
    dst: &mut [u8],
    a: &[u8],
    b: &[u8],
) -> Result<()> {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => bytes_into::<T, _>(dst, a, b, T::add),
        ReduceOp::Prod => bytes_into::<T, _>(dst, a, b, T::mul),
        ReduceOp::Min => bytes_into::<T, _>(dst, a, b, T::min_),
        ReduceOp::Max => bytes_into::<T, _>(dst, a, b, T::max_),
        ReduceOp::Band | ReduceOp::Bor | ReduceOp::Bxor => return Err(not_bitwise(dtype, op)),
    }
    Ok(())
}

/// Every operator of an integer type: the bitwise ones here, the others as [`typed_inplace`].
fn int_inplace<T: Bitwise>(dtype: DataType, op: ReduceOp, acc: &mut [u8], b: &[u8]) -> Result<()> {
    match op {
        ReduceOp::Band => bytes_inplace::<T, _>(acc, b, T::and_),
        ReduceOp::Bor => bytes_inplace::<T, _>(acc, b, T::or_),
        ReduceOp::Bxor => bytes_inplace::<T, _>(acc, b, T::xor_),
        _ => return typed_inplace::<T>(dtype, op, acc, b),
    }
    Ok(())
}

fn int_into<T: Bitwise>(
    dtype: DataType,
    op: ReduceOp,
    dst: &mut [u8],
    a: &[u8],
    b: &[u8],
) -> Result<()> {
    match op {
        ReduceOp::Band => bytes_into::<T, _>(dst, a, b, T::and_),
        ReduceOp::Bor => bytes_into::<T, _>(dst, a, b, T::or_),
        ReduceOp::Bxor => bytes_into::<T, _>(dst, a, b, T::xor_),
        _ => return typed_into::<T>(dtype, op, dst, a, b),
    }
    Ok(())
}

fn halfs_inplace<H>(dtype: DataType, op: ReduceOp, acc: &mut [u8], b: &[u8]) -> Result<()>
where
    H: Half,
{
    match op {
        ReduceOp::Sum | ReduceOp::Avg => half_inplace::<H, _>(acc, b, f32::add),
        ReduceOp::Prod => half_inplace::<H, _>(acc, b, f32::mul),
        ReduceOp::Min => half_inplace::<H, _>(acc, b, f32::min),
        ReduceOp::Max => half_inplace::<H, _>(acc, b, f32::max),
        ReduceOp::Band | ReduceOp::Bor | ReduceOp::Bxor => return Err(not_bitwise(dtype, op)),
    }
    Ok(())
}

fn halfs_into<H>(dtype: DataType, op: ReduceOp, dst: &mut [u8], a: &[u8], b: &[u8]) -> Result<()>
where
    H: Half,
{
    match op {
        ReduceOp::Sum | ReduceOp::Avg => half_into::<H, _>(dst, a, b, f32::add),
        ReduceOp::Prod => half_into::<H, _>(dst, a, b, f32::mul),
        ReduceOp::Min => half_into::<H, _>(dst, a, b, f32::min),
        ReduceOp::Max => half_into::<H, _>(dst, a, b, f32::max),
        ReduceOp::Band | ReduceOp::Bor | ReduceOp::Bxor => return Err(not_bitwise(dtype, op)),
    }
    Ok(())
}

fn check_len(dtype: DataType, what: &str, lens: &[usize]) -> Result<()> {
    let first = lens.first().copied().unwrap_or(0);
    if lens.iter().any(|&l| l != first) {
        return Err(Error::InvalidArgument(format!(
            "{what}: buffer lengths differ ({lens:?} bytes)"
        )));
    }
    if first % dtype.size() != 0 {
        return Err(Error::InvalidArgument(format!(
            "{what}: {first} bytes is not a multiple of the {dtype} element size ({})",
            dtype.size()
        )));
    }
    Ok(())
}

/// `acc[i] = acc[i] ⊕ b[i]` for every element (`acc` is the left operand).
///
/// `Avg` sums (see [`finalize`]). Buffers may be unaligned for the element type.
///
/// Errors: [`Error::InvalidArgument`] if the lengths differ or are not a multiple of
/// `dtype.size()`, or for a bitwise operator on a floating-point type (nothing is written).
pub fn reduce_inplace(dtype: DataType, op: ReduceOp, acc: &mut [u8], b: &[u8]) -> Result<()> {
    op.check(dtype)?;
    check_len(dtype, "reduce_inplace", &[acc.len(), b.len()])?;
    if dtype == DataType::F32 && op == ReduceOp::Sum && crate::mem::add_f32_inplace(acc, b) {
        return Ok(());
    }
    match dtype {
        DataType::I8 => int_inplace::<i8>(dtype, op, acc, b),
        DataType::U8 => int_inplace::<u8>(dtype, op, acc, b),
        DataType::I16 => int_inplace::<i16>(dtype, op, acc, b),
        DataType::I32 => int_inplace::<i32>(dtype, op, acc, b),
        DataType::U32 => int_inplace::<u32>(dtype, op, acc, b),
        DataType::I64 => int_inplace::<i64>(dtype, op, acc, b),
        DataType::U64 => int_inplace::<u64>(dtype, op, acc, b),
        DataType::F16 => halfs_inplace::<f16>(dtype, op, acc, b),
        DataType::BF16 => halfs_inplace::<bf16>(dtype, op, acc, b),
        DataType::F32 => typed_inplace::<f32>(dtype, op, acc, b),
        DataType::F64 => typed_inplace::<f64>(dtype, op, acc, b),
    }
}

/// `dst[i] = a[i] ⊕ b[i]` for every element (`a` is the left operand).
///
/// `dst` cannot alias `a` or `b` (Rust borrows forbid it); use [`reduce_inplace`] for that.
/// `Avg` sums (see [`finalize`]). Buffers may be unaligned for the element type.
///
/// Errors: [`Error::InvalidArgument`] if the lengths differ or are not a multiple of
/// `dtype.size()`, or for a bitwise operator on a floating-point type (nothing is written).
pub fn reduce_into(
    dtype: DataType,
    op: ReduceOp,
    dst: &mut [u8],
    a: &[u8],
    b: &[u8],
) -> Result<()> {
    op.check(dtype)?;
    check_len(dtype, "reduce_into", &[dst.len(), a.len(), b.len()])?;
    if dtype == DataType::F32 && op == ReduceOp::Sum && crate::mem::add_f32_into(dst, a, b) {
        return Ok(());
    }
    match dtype {
        DataType::I8 => int_into::<i8>(dtype, op, dst, a, b),
        DataType::U8 => int_into::<u8>(dtype, op, dst, a, b),
        DataType::I16 => int_into::<i16>(dtype, op, dst, a, b),
        DataType::I32 => int_into::<i32>(dtype, op, dst, a, b),
        DataType::U32 => int_into::<u32>(dtype, op, dst, a, b),
        DataType::I64 => int_into::<i64>(dtype, op, dst, a, b),
        DataType::U64 => int_into::<u64>(dtype, op, dst, a, b),
        DataType::F16 => halfs_into::<f16>(dtype, op, dst, a, b),
        DataType::BF16 => halfs_into::<bf16>(dtype, op, dst, a, b),
        DataType::F32 => typed_into::<f32>(dtype, op, dst, a, b),
        DataType::F64 => typed_into::<f64>(dtype, op, dst, a, b),
    }
}

fn typed_div<T: Arith>(buf: &mut [u8], n: usize) {
    if let Ok(x) = bytemuck::try_cast_slice_mut::<u8, T>(buf) {
        T::div_slice(x, n);
        return;
    }
    let es = std::mem::size_of::<T>();
    let mut t = [T::zeroed(); BLOCK];
    for c in buf.chunks_mut(BLOCK * es) {
        let k = c.len() / es;
        load(&mut t[..k], c);
        T::div_slice(&mut t[..k], n);
        store(c, &t[..k]);
    }
}

fn half_div<H>(buf: &mut [u8], n: usize)
where
    H: Half,
{
    let mut h = [H::zeroed(); BLOCK];
    let mut f = [0f32; BLOCK];
    for c in buf.chunks_mut(BLOCK * 2) {
        let k = c.len() / 2;
        load(&mut h[..k], c);
        H::to_f32s(&h[..k], &mut f[..k]);
        f32::div_slice(&mut f[..k], n);
        H::from_f32s(&mut h[..k], &f[..k]);
        store(c, &h[..k]);
    }
}

/// Finishes a reduction result in place: for [`ReduceOp::Avg`] divides every element by
/// `nranks` (integer division towards zero for integer types, true division for floats;
/// f16/bf16 through f32); a no-op for the other operators.
///
/// Errors: [`Error::InvalidArgument`] if `buf.len()` is not a multiple of `dtype.size()`, for
/// `Avg` with `nranks == 0`, or for a bitwise operator on a floating-point type.
pub fn finalize(dtype: DataType, op: ReduceOp, buf: &mut [u8], nranks: usize) -> Result<()> {
    op.check(dtype)?;
    check_len(dtype, "finalize", &[buf.len()])?;
    if op != ReduceOp::Avg {
        return Ok(());
    }
    if nranks == 0 {
        return Err(Error::InvalidArgument(
            "finalize: average over 0 ranks".into(),
        ));
    }
    match dtype {
        DataType::I8 => typed_div::<i8>(buf, nranks),
        DataType::U8 => typed_div::<u8>(buf, nranks),
        DataType::I16 => typed_div::<i16>(buf, nranks),
        DataType::I32 => typed_div::<i32>(buf, nranks),
        DataType::U32 => typed_div::<u32>(buf, nranks),
        DataType::I64 => typed_div::<i64>(buf, nranks),
        DataType::U64 => typed_div::<u64>(buf, nranks),
        DataType::F16 => half_div::<f16>(buf, nranks),
        DataType::BF16 => half_div::<bf16>(buf, nranks),
        DataType::F32 => typed_div::<f32>(buf, nranks),
        DataType::F64 => typed_div::<f64>(buf, nranks),
    }
    Ok(())
}

/// Measures [`reduce_inplace`] on f32 `Sum` over two buffers of `bytes` bytes (rounded down to
/// whole elements), `iters` times, and returns the bandwidth in GB/s (10⁹ bytes per second),
/// counting 3 × `bytes` moved per call (read `acc`, read `b`, write `acc`). Returns 0 when
/// nothing was measured (`bytes < 4` or `iters == 0`).
pub fn bench_bandwidth(bytes: usize, iters: usize) -> f64 {
    let n = bytes / 4;
    if n == 0 || iters == 0 {
        return 0.0;
    }
    let mut acc = vec![1.0f32; n];
    let b = vec![0.5f32; n];
    let accb: &mut [u8] = bytemuck::cast_slice_mut(&mut acc);
    let bb: &[u8] = bytemuck::cast_slice(&b);
    // Warm-up (page faults, caches).
    let _ = reduce_inplace(DataType::F32, ReduceOp::Sum, accb, bb);
    let t = std::time::Instant::now();
    for _ in 0..iters {
        let _ = reduce_inplace(
            DataType::F32,
            ReduceOp::Sum,
            std::hint::black_box(&mut *accb),
            std::hint::black_box(bb),
        );
    }
    let secs = t.elapsed().as_secs_f64().max(1e-9);
    std::hint::black_box(&acc);
    (3 * n * 4) as f64 * iters as f64 / secs / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scalar reference value of one element, decoded as f64 or i128 and re-encoded.
    fn scalar(dtype: DataType, op: ReduceOp, a: &[u8], b: &[u8]) -> Vec<u8> {
        macro_rules! int {
            ($t:ty) => {{
                let x = <$t>::from_le_bytes(a.try_into().unwrap());
                let y = <$t>::from_le_bytes(b.try_into().unwrap());
                let r = match op {
                    ReduceOp::Sum | ReduceOp::Avg => x.wrapping_add(y),
                    ReduceOp::Prod => x.wrapping_mul(y),
                    ReduceOp::Min => x.min(y),
                    ReduceOp::Max => x.max(y),
                    ReduceOp::Band => x & y,
                    ReduceOp::Bor => x | y,
                    ReduceOp::Bxor => x ^ y,
                };
                r.to_le_bytes().to_vec()
            }};
        }
        macro_rules! flt {
            ($t:ty, $to:expr, $from:expr) => {{
                let x: f32 = $to(<$t>::from_le_bytes(a.try_into().unwrap()));
                let y: f32 = $to(<$t>::from_le_bytes(b.try_into().unwrap()));
                let r = match op {
                    ReduceOp::Sum | ReduceOp::Avg => x + y,
                    ReduceOp::Prod => x * y,
                    ReduceOp::Min => x.min(y),
                    ReduceOp::Max => x.max(y),
                    ReduceOp::Band | ReduceOp::Bor | ReduceOp::Bxor => unreachable!(),
                };
                let r: $t = $from(r);
                r.to_le_bytes().to_vec()
            }};
        }
        match dtype {
            DataType::I8 => int!(i8),
            DataType::U8 => int!(u8),
            DataType::I16 => int!(i16),
            DataType::I32 => int!(i32),
            DataType::U32 => int!(u32),
            DataType::I64 => int!(i64),
            DataType::U64 => int!(u64),
            DataType::F16 => flt!(f16, f16::to_f32, f16::from_f32),
            DataType::BF16 => flt!(bf16, bf16::to_f32, bf16::from_f32),
            DataType::F32 => flt!(f32, |v| v, |v| v),
            DataType::F64 => {
                let x = f64::from_le_bytes(a.try_into().unwrap());
                let y = f64::from_le_bytes(b.try_into().unwrap());
                let r = match op {
                    ReduceOp::Sum | ReduceOp::Avg => x + y,
                    ReduceOp::Prod => x * y,
                    ReduceOp::Min => x.min(y),
                    ReduceOp::Max => x.max(y),
                    ReduceOp::Band | ReduceOp::Bor | ReduceOp::Bxor => unreachable!(),
                };
                r.to_le_bytes().to_vec()
            }
        }
    }

    /// Deterministic pseudo-random bytes that are valid, mostly finite, elements.
    fn data(dtype: DataType, n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s >> 11
        };
        let mut out = Vec::with_capacity(n * dtype.size());
        for i in 0..n {
            let r = next();
            // A few special values (NaN, ±0, ±inf) for floats.
            let v = ((r % 2001) as f64 - 1000.0) / 8.0;
            let v = match i % 97 {
                5 => f64::NAN,
                6 => -0.0,
                7 => 0.0,
                8 => f64::INFINITY,
                _ => v,
            };
            match dtype {
                DataType::F16 => out.extend(f16::from_f64(v).to_le_bytes()),
                DataType::BF16 => out.extend(bf16::from_f64(v).to_le_bytes()),
                DataType::F32 => out.extend((v as f32).to_le_bytes()),
                DataType::F64 => out.extend(v.to_le_bytes()),
                _ => {
                    let bits = r.to_le_bytes();
                    out.extend(&bits[..dtype.size()]);
                }
            }
        }
        out
    }

    fn same_bits(dtype: DataType, got: &[u8], want: &[u8]) -> bool {
        // NaN payloads may differ between the vector and scalar paths; compare NaN-ness.
        got.chunks(dtype.size())
            .zip(want.chunks(dtype.size()))
            .all(|(g, w)| {
                g == w
                    || match dtype {
                        DataType::F16 => {
                            f16::from_le_bytes(g.try_into().unwrap()).is_nan()
                                && f16::from_le_bytes(w.try_into().unwrap()).is_nan()
                        }
                        DataType::BF16 => {
                            bf16::from_le_bytes(g.try_into().unwrap()).is_nan()
                                && bf16::from_le_bytes(w.try_into().unwrap()).is_nan()
                        }
                        DataType::F32 => {
                            f32::from_le_bytes(g.try_into().unwrap()).is_nan()
                                && f32::from_le_bytes(w.try_into().unwrap()).is_nan()
                        }
                        DataType::F64 => {
                            f64::from_le_bytes(g.try_into().unwrap()).is_nan()
                                && f64::from_le_bytes(w.try_into().unwrap()).is_nan()
                        }
                        _ => false,
                    }
            })
    }

    #[test]
    fn every_dtype_and_op_matches_scalar_reference() {
        for dtype in DataType::ALL {
            for op in ReduceOp::ALL {
                if !op.supports(dtype) {
                    continue; // float + bitwise: see bitwise_ops_are_refused_on_floats
                }
                // Lengths around the block size, aligned and unaligned at both operands.
                for n in [0usize, 1, 3, 255, 256, 257, 1000] {
                    for (oa, ob, od) in [(0usize, 0usize, 0usize), (1, 0, 3), (0, 1, 2), (3, 5, 0)]
                    {
                        let es = dtype.size();
                        let a = data(dtype, n, 1 + n as u64);
                        let b = data(dtype, n, 99 + n as u64);
                        let want: Vec<u8> = a
                            .chunks(es)
                            .zip(b.chunks(es))
                            .flat_map(|(x, y)| scalar(dtype, op, x, y))
                            .collect();
                        // Place the operands at odd offsets inside u64-aligned storage.
                        let mut sa = vec![0u64; (n * es + 16) / 8 + 1];
                        let mut sb = vec![0u64; (n * es + 16) / 8 + 1];
                        let mut sd = vec![0u64; (n * es + 16) / 8 + 1];
                        let ba: &mut [u8] = bytemuck::cast_slice_mut(&mut sa);
                        let bb: &mut [u8] = bytemuck::cast_slice_mut(&mut sb);
                        let bd: &mut [u8] = bytemuck::cast_slice_mut(&mut sd);
                        ba[oa..oa + n * es].copy_from_slice(&a);
                        bb[ob..ob + n * es].copy_from_slice(&b);
                        reduce_into(
                            dtype,
                            op,
                            &mut bd[od..od + n * es],
                            &ba[oa..oa + n * es],
                            &bb[ob..ob + n * es],
                        )
                        .unwrap();
                        assert!(
                            same_bits(dtype, &bd[od..od + n * es], &want),
                            "reduce_into {dtype} {op} n={n} offsets {oa},{ob},{od}"
                        );
                        reduce_inplace(dtype, op, &mut ba[oa..oa + n * es], &bb[ob..ob + n * es])
                            .unwrap();
                        assert!(
                            same_bits(dtype, &ba[oa..oa + n * es], &want),
                            "reduce_inplace {dtype} {op} n={n} offsets {oa},{ob}"
                        );
                    }
                }
            }
        }
    }

    /// Closed forms of the bitwise operators on every integer type, aligned and unaligned, in
    /// place and out of place: a = i, b = !i (so a & b = 0, a | b = a ^ b = all ones), and
    /// a = b = i (a & b = a | b = i, a ^ b = 0).
    #[test]
    fn bitwise_closed_forms_on_every_integer_type() {
        macro_rules! check {
            ($t:ty, $d:expr) => {{
                let es = std::mem::size_of::<$t>();
                for n in [0usize, 1, 7, 255, 256, 257, 1000] {
                    let a: Vec<$t> = (0..n).map(|i| i as $t).collect();
                    let na: Vec<$t> = a.iter().map(|&x| !x).collect();
                    let ones: Vec<$t> = vec![!0; n];
                    let zeros: Vec<$t> = vec![0; n];
                    let cases: [(ReduceOp, &Vec<$t>, &Vec<$t>); 6] = [
                        (ReduceOp::Band, &na, &zeros),
                        (ReduceOp::Bor, &na, &ones),
                        (ReduceOp::Bxor, &na, &ones),
                        (ReduceOp::Band, &a, &a),
                        (ReduceOp::Bor, &a, &a),
                        (ReduceOp::Bxor, &a, &zeros),
                    ];
                    for (op, b, want) in cases {
                        for off in [0usize, 1, 3] {
                            let bytes = n * es;
                            let mut st_a = vec![0u8; bytes + 8];
                            let mut st_b = vec![0u8; bytes + 8];
                            let mut st_d = vec![0u8; bytes + 8];
                            st_a[off..off + bytes].copy_from_slice(bytemuck::cast_slice(&a));
                            st_b[off + 1..off + 1 + bytes].copy_from_slice(bytemuck::cast_slice(b));
                            let wantb: &[u8] = bytemuck::cast_slice(want);
                            reduce_into(
                                $d,
                                op,
                                &mut st_d[off..off + bytes],
                                &st_a[off..off + bytes],
                                &st_b[off + 1..off + 1 + bytes],
                            )
                            .unwrap();
                            assert_eq!(&st_d[off..off + bytes], wantb, "into {} {op} n={n}", $d);
                            reduce_inplace(
                                $d,
                                op,
                                &mut st_a[off..off + bytes],
                                &st_b[off + 1..off + 1 + bytes],
                            )
                            .unwrap();
                            assert_eq!(&st_a[off..off + bytes], wantb, "inplace {} {op} n={n}", $d);
                            // No division for the bitwise operators.
                            finalize($d, op, &mut st_a[off..off + bytes], 3).unwrap();
                            assert_eq!(&st_a[off..off + bytes], wantb, "finalize {} {op}", $d);
                        }
                    }
                }
            }};
        }
        check!(i8, DataType::I8);
        check!(u8, DataType::U8);
        check!(i16, DataType::I16);
        check!(i32, DataType::I32);
        check!(u32, DataType::U32);
        check!(i64, DataType::I64);
        check!(u64, DataType::U64);
        // Mixed bits over three operands, as a reduction chain does.
        let mut acc = bytemuck::cast::<[i16; 3], [u8; 6]>([0x0f0f, -1, 0x1234]);
        let b = bytemuck::cast::<[i16; 3], [u8; 6]>([0x00ff, 0x5555, 0x0204]);
        let c = bytemuck::cast::<[i16; 3], [u8; 6]>([0x0003, 0x0f00, 0x0030]);
        reduce_inplace(DataType::I16, ReduceOp::Bxor, &mut acc, &b).unwrap();
        reduce_inplace(DataType::I16, ReduceOp::Bxor, &mut acc, &c).unwrap();
        assert_eq!(
            bytemuck::cast::<[u8; 6], [i16; 3]>(acc),
            [
                0x0f0f ^ 0x00ff ^ 0x0003,
                !0x5555 ^ 0x0f00,
                0x1234 ^ 0x0204 ^ 0x0030
            ]
        );
    }

    #[test]
    fn bitwise_ops_are_refused_on_floats() {
        for dtype in [DataType::F16, DataType::BF16, DataType::F32, DataType::F64] {
            for op in [ReduceOp::Band, ReduceOp::Bor, ReduceOp::Bxor] {
                let orig = vec![0x3cu8; 4 * dtype.size()];
                let mut acc = orig.clone();
                let b = vec![0xffu8; 4 * dtype.size()];
                let mut dst = orig.clone();
                let msg = |e: Error| match e {
                    Error::InvalidArgument(m) => m,
                    e => panic!("{dtype} {op}: {e:?}"),
                };
                let m = msg(reduce_inplace(dtype, op, &mut acc, &b).unwrap_err());
                assert!(m.contains(op.name()) && m.contains(dtype.name()), "{m}");
                let m = msg(reduce_into(dtype, op, &mut dst, &orig, &b).unwrap_err());
                assert!(m.contains(op.name()) && m.contains(dtype.name()), "{m}");
                msg(finalize(dtype, op, &mut acc, 2).unwrap_err());
                // Nothing was written; also unaligned and empty buffers.
                assert_eq!(acc, orig);
                assert_eq!(dst, orig);
                assert!(reduce_inplace(
                    dtype,
                    op,
                    &mut acc[1..1 + dtype.size()],
                    &b[..dtype.size()]
                )
                .is_err());
                assert!(reduce_inplace(dtype, op, &mut [], &[]).is_err());
                // The internal kernels refuse too (never a panic).
                assert!(typed_inplace::<f32>(dtype, op, &mut [0u8; 4], &[0u8; 4]).is_err());
                assert!(typed_into::<f64>(dtype, op, &mut [0u8; 8], &[0u8; 8], &[0u8; 8]).is_err());
                assert!(halfs_inplace::<f16>(dtype, op, &mut [0u8; 2], &[0u8; 2]).is_err());
                assert!(
                    halfs_into::<bf16>(dtype, op, &mut [0u8; 2], &[0u8; 2], &[0u8; 2]).is_err()
                );
            }
        }
    }

    #[test]
    fn int16_arithmetic() {
        let a = bytemuck::cast::<[i16; 4], [u8; 8]>([i16::MAX, -7, 300, -32768]);
        let b = bytemuck::cast::<[i16; 4], [u8; 8]>([1, 3, 200, -1]);
        let mut d = [0u8; 8];
        reduce_into(DataType::I16, ReduceOp::Sum, &mut d, &a, &b).unwrap();
        assert_eq!(
            bytemuck::cast::<[u8; 8], [i16; 4]>(d),
            [i16::MIN, -4, 500, i16::MAX]
        );
        reduce_into(DataType::I16, ReduceOp::Prod, &mut d, &a, &b).unwrap();
        assert_eq!(
            bytemuck::cast::<[u8; 8], [i16; 4]>(d),
            [i16::MAX, -21, (300i32 * 200) as i16, i16::MIN]
        );
        reduce_into(DataType::I16, ReduceOp::Min, &mut d, &a, &b).unwrap();
        assert_eq!(bytemuck::cast::<[u8; 8], [i16; 4]>(d), [1, -7, 200, -32768]);
        reduce_into(DataType::I16, ReduceOp::Max, &mut d, &a, &b).unwrap();
        assert_eq!(
            bytemuck::cast::<[u8; 8], [i16; 4]>(d),
            [i16::MAX, 3, 300, -1]
        );
        let mut s = bytemuck::cast::<[i16; 4], [u8; 8]>([7, -7, 9, 30000]);
        finalize(DataType::I16, ReduceOp::Avg, &mut s, 3).unwrap();
        assert_eq!(bytemuck::cast::<[u8; 8], [i16; 4]>(s), [2, -2, 3, 10000]);
        // A rank count that does not fit i16.
        let mut s = bytemuck::cast::<[i16; 2], [u8; 4]>([i16::MIN, 5]);
        finalize(DataType::I16, ReduceOp::Avg, &mut s, 40000).unwrap();
        assert_eq!(bytemuck::cast::<[u8; 4], [i16; 2]>(s), [0, 0]);
        // Odd length (not a multiple of 2 bytes).
        assert!(reduce_inplace(DataType::I16, ReduceOp::Sum, &mut [0u8; 3], &[0u8; 3]).is_err());
    }

    #[test]
    fn integers_wrap() {
        let mut a = [200u8, 100];
        reduce_inplace(DataType::U8, ReduceOp::Sum, &mut a, &[100, 200]).unwrap();
        assert_eq!(a, [44, 44]);
        let mut a = i64::MAX.to_le_bytes();
        reduce_inplace(DataType::I64, ReduceOp::Prod, &mut a, &2i64.to_le_bytes()).unwrap();
        assert_eq!(i64::from_le_bytes(a), -2);
    }

    #[test]
    fn float_min_max_ignore_nan() {
        let mut a = bytemuck::cast::<[f32; 2], [u8; 8]>([f32::NAN, 1.0]);
        let b = bytemuck::cast::<[f32; 2], [u8; 8]>([2.0, f32::NAN]);
        reduce_inplace(DataType::F32, ReduceOp::Min, &mut a, &b).unwrap();
        assert_eq!(bytemuck::cast::<[u8; 8], [f32; 2]>(a), [2.0, 1.0]);
    }

    #[test]
    fn length_errors() {
        let mut a = [0u8; 8];
        for dtype in DataType::ALL {
            for op in ReduceOp::ALL {
                assert!(reduce_inplace(dtype, op, &mut a, &[0u8; 4]).is_err());
                assert!(reduce_into(dtype, op, &mut [0u8; 8], &a, &[0u8; 7]).is_err());
                assert!(reduce_into(dtype, op, &mut [0u8; 4], &a, &a).is_err());
            }
        }
        // Not a multiple of the element size.
        assert!(matches!(
            reduce_inplace(DataType::F32, ReduceOp::Sum, &mut [0u8; 6], &[0u8; 6]),
            Err(Error::InvalidArgument(_))
        ));
        assert!(finalize(DataType::F64, ReduceOp::Avg, &mut [0u8; 12], 2).is_err());
        assert!(finalize(DataType::F64, ReduceOp::Sum, &mut [0u8; 12], 2).is_err());
        assert!(finalize(DataType::F64, ReduceOp::Avg, &mut [0u8; 16], 0).is_err());
        // Zero length is fine.
        assert!(reduce_inplace(DataType::F64, ReduceOp::Sum, &mut [], &[]).is_ok());
    }

    #[test]
    fn avg_finalize() {
        // Integers: division towards zero.
        let mut b = bytemuck::cast::<[i32; 4], [u8; 16]>([7, -7, 9, 100]);
        finalize(DataType::I32, ReduceOp::Avg, &mut b, 3).unwrap();
        assert_eq!(bytemuck::cast::<[u8; 16], [i32; 4]>(b), [2, -2, 3, 33]);
        // A rank count that does not fit the element type.
        let mut b = [(-128i8) as u8, 127, 5];
        finalize(DataType::I8, ReduceOp::Avg, &mut b, 128).unwrap();
        assert_eq!(b, [(-1i8) as u8, 0, 0]);
        let mut b = [255u8, 3];
        finalize(DataType::U8, ReduceOp::Avg, &mut b, 300).unwrap();
        assert_eq!(b, [0, 0]);
        // Other operators: no-op.
        let mut b = [9u8, 8];
        finalize(DataType::U8, ReduceOp::Sum, &mut b, 2).unwrap();
        assert_eq!(b, [9, 8]);
        // Floats, unaligned too.
        for off in [0usize, 1] {
            let mut st = [0u8; 1 + 3 * 8];
            st[off..off + 24]
                .copy_from_slice(&bytemuck::cast::<[f64; 3], [u8; 24]>([3.0, -1.0, 10.0]));
            finalize(DataType::F64, ReduceOp::Avg, &mut st[off..off + 24], 4).unwrap();
            let got: [u8; 24] = st[off..off + 24].try_into().unwrap();
            assert_eq!(
                bytemuck::cast::<[u8; 24], [f64; 3]>(got),
                [0.75, -0.25, 2.5]
            );
        }
        for (dtype, enc, dec) in [
            (
                DataType::F16,
                (|v: f32| f16::from_f32(v).to_le_bytes()) as fn(f32) -> [u8; 2],
                (|b: [u8; 2]| f16::from_le_bytes(b).to_f32()) as fn([u8; 2]) -> f32,
            ),
            (
                DataType::BF16,
                |v: f32| bf16::from_f32(v).to_le_bytes(),
                |b: [u8; 2]| bf16::from_le_bytes(b).to_f32(),
            ),
        ] {
            let vals = [6.0f32, -3.0, 1.0];
            let mut b: Vec<u8> = vals.iter().flat_map(|&v| enc(v)).collect();
            finalize(dtype, ReduceOp::Avg, &mut b, 3).unwrap();
            let got: Vec<f32> = b.chunks(2).map(|c| dec([c[0], c[1]])).collect();
            let want: Vec<f32> = vals.iter().map(|&v| dec(enc(v / 3.0))).collect();
            assert_eq!(got, want, "{dtype}");
        }
        let mut b = bytemuck::cast::<[f32; 2], [u8; 8]>([1.0, 2.0]);
        finalize(DataType::F32, ReduceOp::Avg, &mut b, 3).unwrap();
        assert_eq!(
            bytemuck::cast::<[u8; 8], [f32; 2]>(b),
            [1.0 / 3.0, 2.0 / 3.0]
        );
    }

    #[test]
    fn bench_runs() {
        assert!(bench_bandwidth(1 << 16, 2) > 0.0);
        assert_eq!(bench_bandwidth(2, 2), 0.0);
    }
}
