//! Buffers in shared memory ([`SharedBuf`], from [`Communicator::alloc_shared`]).
//!
//! Like NCCL's `ncclMemAlloc` + `ncclCommRegister` (nccl-tests `-R 1`): a buffer allocated
//! through the communicator lives in a `memfd`-backed shared mapping that the other ranks on
//! this host can map. When every rank of a call passes such buffers (and all ranks are on one
//! host, connected through shared memory), the call copies each byte once, straight between
//! the ranks' buffers, instead of twice through the shared-memory rings (see
//! `BRAID_SHM_DIRECT`): all-reduce, reduce-scatter, all-gather, broadcast, and sends of at
//! least the shm ring size (4 MiB). Anything else (ordinary `Vec`s, a rank that passes one)
//! takes the usual path, with the same results.
//!
//! Nothing is left in `/dev/shm` or on disk: the memory goes away when the buffer is dropped
//! and no peer maps it any more.
//!
//! [`Communicator::alloc_shared`]: crate::Communicator::alloc_shared

use std::marker::PhantomData;

use braid_transport::region::Region;

use crate::types::Element;

/// `len` elements of `T` in shared memory, zero-initialised; derefs to `[T]`. Unmapped when
/// dropped (peers that mapped it keep their mapping, unused, until their cache drops it, so
/// the memory itself may be released a little later).
///
/// Keep it alive while a call uses it (the borrow checker does for blocking calls).
pub struct SharedBuf<T: Element> {
    region: Region,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Element> SharedBuf<T> {
    pub(crate) fn new(region: Region, len: usize) -> SharedBuf<T> {
        SharedBuf {
            region,
            len,
            _t: PhantomData,
        }
    }

    /// The region's id (what peers see in the single-copy handshake).
    pub fn region_id(&self) -> u64 {
        self.region.id()
    }
}

impl<T: Element> std::ops::Deref for SharedBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the region is a live, page-aligned mapping of at least len * size_of::<T>()
        // bytes (alloc_shared sized it), zero-initialised, and every bit pattern is a valid T
        // (Element: Pod); shared access follows from &self.
        unsafe { std::slice::from_raw_parts(self.region.as_ptr() as *const T, self.len) }
    }
}

impl<T: Element> std::ops::DerefMut for SharedBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in deref; &mut self guarantees exclusive access within this process
        // (peers only read it during a call that borrows it).
        unsafe { std::slice::from_raw_parts_mut(self.region.as_ptr() as *mut T, self.len) }
    }
}

impl<T: Element> std::fmt::Debug for SharedBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBuf")
            .field("dtype", &T::DTYPE)
            .field("len", &self.len)
            .field("region", &self.region.id())
            .finish()
    }
}
