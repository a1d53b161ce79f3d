//! What C passes in and how it is checked: the datatype and operator enums (received as any
//! int, converted with [`dtype_of`] and [`op_of`]), handles, out-pointers, ranks, strings and
//! arrays.

use std::ffi::{c_char, c_int, CStr};
use std::mem::size_of;

use braid_core::{DataType, ReduceOp};

use crate::comm::{braid_comm, braid_comm_t};
use crate::error::{CResult, Fail};

// ---- enums ---------------------------------------------------------------------------------

/// Element type of a buffer. Values other than those listed give braid_invalid_argument.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum braid_datatype_t {
    /// int8_t.
    braid_int8 = 0,
    /// uint8_t.
    braid_uint8 = 1,
    /// int32_t.
    braid_int32 = 2,
    /// uint32_t.
    braid_uint32 = 3,
    /// int64_t.
    braid_int64 = 4,
    /// uint64_t.
    braid_uint64 = 5,
    /// IEEE 754 half precision (binary16), passed as 16-bit patterns.
    braid_float16 = 6,
    /// bfloat16, passed as 16-bit patterns.
    braid_bfloat16 = 7,
    /// float.
    braid_float32 = 8,
    /// double.
    braid_float64 = 9,
    /// int16_t.
    braid_int16 = 10,
}

/// Reduction operator. Values other than those listed give braid_invalid_argument. The bitwise
/// operators (braid_band, braid_bor, braid_bxor) apply to the integer datatypes only: with
/// braid_float16, braid_bfloat16, braid_float32 or braid_float64 a call returns
/// braid_invalid_argument naming the operator and the datatype, before anything is sent (the
/// communicator stays usable).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum braid_redop_t {
    /// Sum.
    braid_sum = 0,
    /// Product.
    braid_prod = 1,
    /// Minimum.
    braid_min = 2,
    /// Maximum.
    braid_max = 3,
    /// Average: the sum divided by the number of ranks (integer division for integer types).
    braid_avg = 4,
    /// Bitwise AND (integer datatypes only).
    braid_band = 5,
    /// Bitwise OR (integer datatypes only).
    braid_bor = 6,
    /// Bitwise exclusive OR (integer datatypes only).
    braid_bxor = 7,
}

/// A `braid_datatype_t` as received from C: any int (an out-of-range value must not become a
/// Rust enum). Named `braid_datatype_t` in the header.
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct DatatypeArg(pub c_int);

/// A `braid_redop_t` as received from C. Named `braid_redop_t` in the header.
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct RedopArg(pub c_int);

// ---- argument helpers ----------------------------------------------------------------------

/// The communicator behind a handle.
///
/// # Safety
/// `comm` is NULL or a handle from braid_comm_init* not yet destroyed.
pub(crate) unsafe fn comm_ref<'a>(comm: braid_comm_t) -> CResult<&'a braid_comm> {
    // SAFETY: per this function's contract, a non-NULL `comm` points to a live braid_comm
    // (created by Box::into_raw in braid_comm_init*, freed only by braid_comm_destroy).
    unsafe { comm.cast_const().as_ref() }.ok_or_else(|| Fail::arg("comm is NULL"))
}

pub(crate) fn dtype_of(d: DatatypeArg) -> CResult<DataType> {
    Ok(match d.0 {
        0 => DataType::I8,
        1 => DataType::U8,
        2 => DataType::I32,
        3 => DataType::U32,
        4 => DataType::I64,
        5 => DataType::U64,
        6 => DataType::F16,
        7 => DataType::BF16,
        8 => DataType::F32,
        9 => DataType::F64,
        10 => DataType::I16,
        v => return Err(Fail::arg(format!("datatype {v} is not a braid_datatype_t"))),
    })
}

pub(crate) fn op_of(o: RedopArg) -> CResult<ReduceOp> {
    Ok(match o.0 {
        0 => ReduceOp::Sum,
        1 => ReduceOp::Prod,
        2 => ReduceOp::Min,
        3 => ReduceOp::Max,
        4 => ReduceOp::Avg,
        5 => ReduceOp::Band,
        6 => ReduceOp::Bor,
        7 => ReduceOp::Bxor,
        v => return Err(Fail::arg(format!("op {v} is not a braid_redop_t"))),
    })
}

pub(crate) fn rank_arg(what: &str, v: c_int, size: usize) -> CResult<usize> {
    match usize::try_from(v) {
        Ok(r) if r < size => Ok(r),
        _ => Err(Fail::arg(format!(
            "{what} {v} is not a rank of this communicator (size {size})"
        ))),
    }
}

/// Writes `v` through an out-pointer.
///
/// # Safety
/// `p` is NULL or valid for a write of `T`.
pub(crate) unsafe fn put<T>(p: *mut T, what: &str, v: T) -> CResult {
    if p.is_null() {
        return Err(Fail::arg(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL, and valid for writes per this function's contract.
    unsafe { p.write(v) };
    Ok(())
}

/// Reads an optional C string argument.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
pub(crate) unsafe fn opt_str(p: *const c_char, what: &str) -> CResult<Option<String>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL and NUL-terminated per contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(|s| Some(s.to_string()))
        .map_err(|_| Fail::arg(format!("{what} is not UTF-8")))
}

/// The braid_datatype_t code of a data type.
pub(crate) fn dtype_code(d: DataType) -> c_int {
    c_int::from(d as u8)
}

/// A slice over a C array of `n` elements (NULL allowed when `n` is 0).
///
/// # Safety
/// `p` is NULL or valid for reading `n` elements of `T` for `'a`.
pub(crate) unsafe fn c_slice<'a, T>(p: *const T, n: usize, what: &str) -> CResult<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    c_array_ok(p, n, what)?;
    // SAFETY: non-NULL, aligned, not too large (checked above), and valid for `n` elements
    // (contract).
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// A mutable slice over a C array of `n` elements (NULL allowed when `n` is 0).
///
/// # Safety
/// `p` is NULL or valid for writing `n` elements of `T` for `'a`, and nobody else uses them
/// meanwhile.
pub(crate) unsafe fn c_slice_mut<'a, T>(p: *mut T, n: usize, what: &str) -> CResult<&'a mut [T]> {
    if n == 0 {
        return Ok(&mut []);
    }
    c_array_ok(p.cast_const(), n, what)?;
    // SAFETY: non-NULL, aligned, not too large (checked above), valid for writing `n` elements
    // and not used by anyone else (contract).
    Ok(unsafe { std::slice::from_raw_parts_mut(p, n) })
}

/// What `c_slice` and `c_slice_mut` check of a C array of `n` (> 0) elements: non-NULL,
/// aligned for `T`, at most `isize::MAX` bytes.
fn c_array_ok<T>(p: *const T, n: usize, what: &str) -> CResult {
    if p.is_null() {
        return Err(Fail::arg(format!("{what} is NULL")));
    }
    if !p.is_aligned() {
        return Err(Fail::arg(format!(
            "{what} is not aligned for its element type"
        )));
    }
    if n.checked_mul(size_of::<T>())
        .map_or(true, |b| b > isize::MAX as usize)
    {
        return Err(Fail::arg(format!("{what}: {n} elements is too large")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_core() {
        for (i, d) in DataType::ALL.iter().enumerate() {
            assert_eq!(dtype_of(DatatypeArg(i as c_int)).ok(), Some(*d));
        }
        for (i, o) in ReduceOp::ALL.iter().enumerate() {
            assert_eq!(op_of(RedopArg(i as c_int)).ok(), Some(*o));
        }
        for d in DataType::ALL {
            assert_eq!(dtype_of(DatatypeArg(dtype_code(d))).ok(), Some(d));
        }
        assert!(dtype_of(DatatypeArg(11)).is_err());
        assert!(op_of(RedopArg(-1)).is_err());
        assert!(op_of(RedopArg(8)).is_err());
        // The C enums and the core codes agree value by value.
        assert_eq!(
            dtype_of(DatatypeArg(braid_datatype_t::braid_int16 as c_int)).ok(),
            Some(DataType::I16)
        );
        for (c, o) in [
            (braid_redop_t::braid_sum, ReduceOp::Sum),
            (braid_redop_t::braid_prod, ReduceOp::Prod),
            (braid_redop_t::braid_min, ReduceOp::Min),
            (braid_redop_t::braid_max, ReduceOp::Max),
            (braid_redop_t::braid_avg, ReduceOp::Avg),
            (braid_redop_t::braid_band, ReduceOp::Band),
            (braid_redop_t::braid_bor, ReduceOp::Bor),
            (braid_redop_t::braid_bxor, ReduceOp::Bxor),
        ] {
            assert_eq!(op_of(RedopArg(c as c_int)).ok(), Some(o));
        }
    }
}
