//! Message bodies kept for reuse: a large body is filled once, shared with the channel that
//! sends it (and, on a worker, with the request kept for a retry), and filled again for a later
//! message once nobody else holds it. A fresh buffer per large message would cost a page fault
//! per 4 KiB of it.

use std::sync::Arc;

/// Bodies smaller than this are not kept (a fresh small buffer costs little).
const KEEP_MIN: usize = 64 << 10;

/// A pool of bodies: at most `count` of them, `bytes` in all.
pub(crate) struct BufPool {
    bufs: Vec<Arc<Vec<u8>>>,
    count: usize,
    bytes: usize,
}

impl BufPool {
    /// An empty pool that keeps at most `count` bodies and `bytes` bytes.
    pub(crate) fn new(count: usize, bytes: usize) -> BufPool {
        BufPool {
            bufs: Vec::new(),
            count,
            bytes,
        }
    }

    /// A body of `len` bytes filled by `fill` (given an empty buffer with room for them): a
    /// pooled buffer nobody else holds any more when one is large enough, else a new one,
    /// kept in the pool when large.
    pub(crate) fn fill(&mut self, len: usize, fill: impl FnOnce(&mut Vec<u8>)) -> Arc<Vec<u8>> {
        let reuse = self
            .bufs
            .iter()
            .position(|b| Arc::strong_count(b) == 1 && b.capacity() >= len);
        let mut arc = match reuse {
            Some(i) => self.bufs.swap_remove(i),
            None => Arc::new(Vec::with_capacity(len)),
        };
        if let Some(b) = Arc::get_mut(&mut arc) {
            b.clear();
            fill(b);
        }
        let kept: usize = self.bufs.iter().map(|b| b.capacity()).sum();
        if len >= KEEP_MIN && kept + arc.capacity() <= self.bytes {
            if self.bufs.len() >= self.count {
                // Drop a buffer nobody uses, else the oldest (freed when its user is done).
                let i = self
                    .bufs
                    .iter()
                    .position(|b| Arc::strong_count(b) == 1)
                    .unwrap_or(0);
                self.bufs.swap_remove(i);
            }
            self.bufs.push(arc.clone());
        }
        arc
    }
}

/// Caller memory lent while the caller waits for its call, without a copy: the bytes a
/// message body is sent from (see `worker::Lending`), or the memory a pull's answer is
/// received into ([`Loan::new_mut`], see `chan::Placement`). The lender does not return
/// before it holds the only reference.
pub(crate) struct Loan {
    ptr: *mut u8,
    len: usize,
    /// Lent for receiving: written by whoever received into it ([`Loan::dest`]).
    writable: bool,
}

// SAFETY: the lender keeps the memory valid while any reference exists and does not touch it
// meanwhile (the contracts of `Loan::new` and `Loan::new_mut`): a send loan is only read, and
// a receive loan is written only through `dest`, whose users write disjoint ranges.
unsafe impl Send for Loan {}
// SAFETY: as above.
unsafe impl Sync for Loan {}

impl Loan {
    /// Lends `bytes` for sending.
    ///
    /// # Safety
    /// The memory must stay valid and unmodified until every clone of the returned `Arc` was
    /// dropped.
    pub(crate) unsafe fn new(bytes: &[u8]) -> Arc<Loan> {
        Arc::new(Loan {
            ptr: bytes.as_ptr().cast_mut(),
            len: bytes.len(),
            writable: false,
        })
    }

    /// Lends the `len` bytes at `ptr` for receiving into ([`Loan::dest`]).
    ///
    /// # Safety
    /// The memory must be valid for writes and stay so, neither read nor written by the
    /// lender, until every clone of the returned `Arc` was dropped.
    pub(crate) unsafe fn new_mut(ptr: *mut u8, len: usize) -> Arc<Loan> {
        Arc::new(Loan {
            ptr,
            len,
            writable: true,
        })
    }

    /// The lent bytes (of a send loan; empty for a receive loan, whose bytes are being
    /// written).
    pub(crate) fn bytes(&self) -> &[u8] {
        if self.writable {
            return &[];
        }
        // SAFETY: valid and unmodified while this reference exists (`Loan::new`).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Where to write `len` bytes at `off` of a receive loan; `None` when out of bounds or
    /// for a send loan. The writer must write only there, and no two writers the same range.
    pub(crate) fn dest(&self, off: usize, len: usize) -> Option<*mut u8> {
        if !self.writable || off.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: `off` is within the lent memory (checked above).
        Some(unsafe { self.ptr.add(off) })
    }

    /// How many bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// Byte ranges `(offset, length)`, in order, with each range that starts where the one before
/// ends joined to it: the segments a message body is sent in (one per run of adjacent parts).
pub(crate) fn runs(spans: impl IntoIterator<Item = (usize, usize)>) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (off, n) in spans {
        match out.last_mut() {
            Some((at, len)) if *at + *len == off => *len += n,
            _ => out.push((off, n)),
        }
    }
    out
}

/// The bytes one piece of a message body is sent from: a shared buffer, a range of one, or a
/// range of lent memory.
#[derive(Clone)]
pub(crate) enum Seg {
    /// A whole buffer.
    Owned(Arc<Vec<u8>>),
    /// `.2` bytes at offset `.1` of a shared buffer (in bounds: see [`Seg::part`]), e.g. of
    /// a body received and forwarded as it is.
    Part(Arc<Vec<u8>>, usize, usize),
    /// `.2` bytes at offset `.1` of a loan (in bounds: see [`Seg::lent`]).
    Lent(Arc<Loan>, usize, usize),
}

impl Seg {
    /// `len` bytes at `off` of `loan`; `None` when out of bounds.
    pub(crate) fn lent(loan: &Arc<Loan>, off: usize, len: usize) -> Option<Seg> {
        (!loan.writable && off.checked_add(len)? <= loan.len)
            .then(|| Seg::Lent(loan.clone(), off, len))
    }

    /// `len` bytes at `off` of `buf`; `None` when out of bounds.
    pub(crate) fn part(buf: &Arc<Vec<u8>>, off: usize, len: usize) -> Option<Seg> {
        (off.checked_add(len)? <= buf.len()).then(|| Seg::Part(buf.clone(), off, len))
    }

    /// The bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Seg::Owned(b) => b,
            Seg::Part(b, off, len) => &b[*off..*off + *len],
            Seg::Lent(l, off, len) => &l.bytes()[*off..*off + *len],
        }
    }

    /// How many bytes.
    pub(crate) fn len(&self) -> usize {
        match self {
            Seg::Owned(b) => b.len(),
            Seg::Part(_, _, len) | Seg::Lent(_, _, len) => *len,
        }
    }

    /// Whether it is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it is a range of `loan`.
    pub(crate) fn lends(&self, loan: &Arc<Loan>) -> bool {
        matches!(self, Seg::Lent(l, ..) if Arc::ptr_eq(l, loan))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_ranges_join_into_runs() {
        assert_eq!(
            runs([(0, 4), (4, 2), (8, 1), (9, 3), (20, 5)]),
            vec![(0, 6), (8, 4), (20, 5)]
        );
        assert!(runs([]).is_empty());
    }

    #[test]
    fn a_body_is_reused_once_nobody_holds_it() {
        let mut p = BufPool::new(2, 1 << 30);
        let a = p.fill(100 << 10, |b| b.extend_from_slice(&[1u8; 100 << 10]));
        let a_ptr = a.as_ptr();
        // Still held: a second body is a new buffer.
        let b = p.fill(100 << 10, |b| b.extend_from_slice(&[2u8; 100 << 10]));
        assert_ne!(a_ptr, b.as_ptr());
        assert!(a.iter().all(|x| *x == 1) && b.iter().all(|x| *x == 2));
        drop(a);
        // Released: its buffer is filled again.
        let c = p.fill(80 << 10, |b| b.extend_from_slice(&[3u8; 80 << 10]));
        assert_eq!(c.as_ptr(), a_ptr);
        assert_eq!(c.len(), 80 << 10);
        assert!(c.iter().all(|x| *x == 3) && b.iter().all(|x| *x == 2));
        // Small bodies and bodies over the byte budget are not kept.
        let mut q = BufPool::new(4, 200 << 10);
        let s = q.fill(10, |b| b.push(9));
        drop(s);
        assert!(q.bufs.is_empty());
        let big = q.fill(300 << 10, |b| b.resize(300 << 10, 0));
        drop(big);
        assert!(q.bufs.is_empty());
        // At most `count` kept: the one nobody uses goes first.
        let mut r = BufPool::new(1, 1 << 30);
        let x = r.fill(64 << 10, |b| b.resize(64 << 10, 0));
        let y = r.fill(64 << 10, |b| b.resize(64 << 10, 0));
        assert_eq!(r.bufs.len(), 1);
        assert!(Arc::ptr_eq(&r.bufs[0], &y));
        drop(x);
    }
}
