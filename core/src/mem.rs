//! Raw views of caller buffers (the memory module of core: every `unsafe` of the executor lives
//! here).
//!
//! A collective borrows its buffers for the duration of a call (blocking forms) or owns them
//! until its handle completes (non-blocking forms). The executor works on [`RawBuf`]s made from
//! those buffers; the invariant everything relies on is: a `RawBuf` is used only while the
//! buffer it was made from is alive and not accessed by anyone else except through other
//! `RawBuf`s of the same operation, and the executor never creates overlapping `&mut` slices.

use crate::error::{Error, Result};

/// A pointer and a length into a caller's buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a RawBuf is only a description of memory; the operation that holds it guarantees the
// memory stays valid (see the module docs) regardless of the thread that uses it.
unsafe impl Send for RawBuf {}

impl RawBuf {
    /// An empty buffer.
    pub(crate) fn empty() -> RawBuf {
        RawBuf {
            ptr: std::ptr::NonNull::<u64>::dangling().as_ptr() as *mut u8,
            len: 0,
        }
    }

    /// A view of a read-only buffer. The executor never writes through views of the send
    /// buffer (plans are validated for that).
    pub(crate) fn from_slice(s: &[u8]) -> RawBuf {
        RawBuf {
            ptr: s.as_ptr() as *mut u8,
            len: s.len(),
        }
    }

    /// A view of a writable buffer.
    pub(crate) fn from_mut(s: &mut [u8]) -> RawBuf {
        RawBuf {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// A view made from a raw pointer (C ABI).
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid for the whole operation, as for the slice constructors.
    #[allow(dead_code)]
    pub(crate) unsafe fn from_raw(ptr: *mut u8, len: usize) -> RawBuf {
        if len == 0 || ptr.is_null() {
            return RawBuf::empty();
        }
        RawBuf { ptr, len }
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Pointer to byte `off` (checked: `off + len <= self.len`).
    pub(crate) fn at(&self, off: usize, len: usize) -> Result<*mut u8> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => {
                // SAFETY: off <= self.len, so the result stays within (or one past) the buffer.
                Ok(unsafe { self.ptr.add(off) })
            }
            _ => Err(Error::Internal(format!(
                "span {off}+{len} outside a buffer of {} bytes",
                self.len
            ))),
        }
    }
}

/// Whether two byte ranges overlap.
pub(crate) fn overlaps(a: *const u8, alen: usize, b: *const u8, blen: usize) -> bool {
    let (a, b) = (a as usize, b as usize);
    alen > 0 && blen > 0 && a < b + blen && b < a + alen
}

/// `memmove(dst, src, len)`; a no-op when they are equal.
pub(crate) fn copy(dst: *mut u8, src: *const u8, len: usize) {
    if len == 0 || std::ptr::eq(dst, src) {
        return;
    }
    // SAFETY: both pointers were produced by RawBuf::at with this len (in bounds of live
    // buffers); ptr::copy handles overlap.
    unsafe { std::ptr::copy(src, dst, len) }
}

/// Runs `f` with a mutable view of `dst` and a shared view of `src` (which must not overlap).
pub(crate) fn with2<R>(
    dst: *mut u8,
    src: *const u8,
    len: usize,
    f: impl FnOnce(&mut [u8], &[u8]) -> R,
) -> Result<R> {
    if overlaps(dst, len, src, len) {
        return Err(Error::Internal("overlapping reduction operands".into()));
    }
    if len == 0 {
        return Ok(f(&mut [], &[]));
    }
    // SAFETY: both ranges are in bounds of live buffers (RawBuf::at) and do not overlap, so a
    // unique and a shared slice may coexist for the duration of `f`.
    let (d, s) = unsafe {
        (
            std::slice::from_raw_parts_mut(dst, len),
            std::slice::from_raw_parts(src, len),
        )
    };
    Ok(f(d, s))
}

/// Runs `f` with a mutable view of `dst` and shared views of `a` and `b` (neither may overlap
/// `dst`; `a` and `b` may overlap each other).
pub(crate) fn with3<R>(
    dst: *mut u8,
    a: *const u8,
    b: *const u8,
    len: usize,
    f: impl FnOnce(&mut [u8], &[u8], &[u8]) -> R,
) -> Result<R> {
    if overlaps(dst, len, a, len) || overlaps(dst, len, b, len) {
        return Err(Error::Internal("overlapping reduction operands".into()));
    }
    if len == 0 {
        return Ok(f(&mut [], &[], &[]));
    }
    // SAFETY: all ranges are in bounds of live buffers; dst overlaps neither source, and shared
    // slices may alias each other.
    let (d, x, y) = unsafe {
        (
            std::slice::from_raw_parts_mut(dst, len),
            std::slice::from_raw_parts(a, len),
            std::slice::from_raw_parts(b, len),
        )
    };
    Ok(f(d, x, y))
}

/// Runs `f` with a mutable view of `len` bytes at `dst`.
pub(crate) fn with_mut<R>(dst: *mut u8, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    if len == 0 {
        return f(&mut []);
    }
    // SAFETY: in bounds of a live buffer (RawBuf::at) and not otherwise borrowed meanwhile.
    f(unsafe { std::slice::from_raw_parts_mut(dst, len) })
}

/// Runs `f` with a shared view of `len` bytes at `src`.
pub(crate) fn with_ref<R>(src: *const u8, len: usize, f: impl FnOnce(&[u8]) -> R) -> R {
    if len == 0 {
        return f(&[]);
    }
    // SAFETY: in bounds of a live buffer (RawBuf::at) and not written meanwhile.
    f(unsafe { std::slice::from_raw_parts(src, len) })
}

/// `dst = a + b` (f32) with AVX2 where the CPU has it and the byte slices are f32-aligned;
/// false (nothing done) otherwise. Element-wise IEEE additions: the same results as the
/// portable kernel, in half the instructions (the portable build targets SSE2).
pub(crate) fn add_f32_into(dst: &mut [u8], a: &[u8], b: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return false;
        }
        let (Ok(d), Ok(x), Ok(y)) = (
            bytemuck::try_cast_slice_mut::<u8, f32>(dst),
            bytemuck::try_cast_slice::<u8, f32>(a),
            bytemuck::try_cast_slice::<u8, f32>(b),
        ) else {
            return false;
        };
        // SAFETY: AVX2 is present (checked above); the function only indexes slices.
        unsafe { add_f32_avx2(d, x, y) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dst, a, b);
        false
    }
}

/// `acc += b` (f32), as [`add_f32_into`].
pub(crate) fn add_f32_inplace(acc: &mut [u8], b: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return false;
        }
        let (Ok(d), Ok(y)) = (
            bytemuck::try_cast_slice_mut::<u8, f32>(acc),
            bytemuck::try_cast_slice::<u8, f32>(b),
        ) else {
            return false;
        };
        // SAFETY: AVX2 is present (checked above); the function only indexes slices.
        unsafe { acc_f32_avx2(d, y) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (acc, b);
        false
    }
}

/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_f32_avx2(d: &mut [f32], x: &[f32], y: &[f32]) {
    for ((d, x), y) in d.iter_mut().zip(x).zip(y) {
        *d = *x + *y;
    }
}

/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn acc_f32_avx2(d: &mut [f32], y: &[f32]) {
    for (d, y) in d.iter_mut().zip(y) {
        *d += *y;
    }
}
