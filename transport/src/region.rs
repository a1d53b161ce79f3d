//! Shared memory regions: buffers that other processes on this host can map and read
//! directly, so that a transfer between same-host ranks copies each byte once (like NCCL's
//! `ncclMemAlloc` + `ncclCommRegister`).
//!
//! A [`Region`] is an anonymous shared mapping backed by a `memfd` (`memfd_create` +
//! `ftruncate` + `mmap(MAP_SHARED)`): nothing is ever visible in `/dev/shm` or on disk, and
//! the memory goes away when the last mapping of it is gone. A [`Regions`] registry (one per
//! communicator, no process-global state) records the live regions so that the layers above
//! can tell whether a pointer range lies inside one, and describe it to a peer
//! ([`RegionDesc`]: owner pid, descriptor number, inode, random region id, offset).
//!
//! A peer maps a described region (read-write: single-copy collectives write results straight
//! into the peers' receive buffers) by opening `/proc/<pid>/fd/<fd>` of the owner
//! (same user; the inode and size are checked, so a reused descriptor number is never mapped
//! by mistake) and keeps the mapping in its [`RemoteMaps`] cache. A region the owner freed
//! stays mapped by a peer until the peer's cache drops it: on every cache miss the peer checks
//! the owner's other cached regions and drops those whose descriptor no longer names the same
//! inode, and the cache holds at most [`REMOTE_CACHE`] regions.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, Weak};

use crate::{NetError, NetResult};

/// Most peer regions a [`RemoteMaps`] keeps mapped.
pub const REMOTE_CACHE: usize = 32;

/// Bytes of an encoded [`RegionDesc`].
pub const DESC_LEN: usize = 48;

/// Where a byte range of a registered region lives, as a peer needs it to map the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionDesc {
    /// Owner process id.
    pub pid: u32,
    /// The owner's descriptor number of the memfd.
    pub fd: i32,
    /// Inode number of the memfd (checked by the peer).
    pub ino: u64,
    /// Random id of the region (never reused).
    pub id: u64,
    /// Length of the whole region in bytes.
    pub region_len: u64,
    /// Offset of the range inside the region.
    pub offset: u64,
}

impl RegionDesc {
    /// Encodes into [`DESC_LEN`] bytes.
    pub fn encode(&self) -> [u8; DESC_LEN] {
        let mut b = [0u8; DESC_LEN];
        b[0..4].copy_from_slice(&self.pid.to_le_bytes());
        b[4..8].copy_from_slice(&self.fd.to_le_bytes());
        b[8..16].copy_from_slice(&self.ino.to_le_bytes());
        b[16..24].copy_from_slice(&self.id.to_le_bytes());
        b[24..32].copy_from_slice(&self.region_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.offset.to_le_bytes());
        b
    }

    /// Decodes what [`RegionDesc::encode`] produced (`None` when `b` is too short).
    pub fn decode(b: &[u8]) -> Option<RegionDesc> {
        if b.len() < DESC_LEN {
            return None;
        }
        let u32at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        Some(RegionDesc {
            pid: u32at(0),
            fd: u32at(4) as i32,
            ino: u64at(8),
            id: u64at(16),
            region_len: u64at(24),
            offset: u64at(32),
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    len: usize,
    fd: RawFd,
    ino: u64,
    id: u64,
}

/// Told when regions of a [`Regions`] come and go: a transport that registers memory with a
/// device (ib) registers every region, so that transfers from and into them need no copy.
pub trait RegionHook: Send + Sync {
    /// A region of `len` bytes at `base` (page-aligned, mapped until [`RegionHook::removed`]).
    fn added(&self, base: *mut u8, len: usize, id: u64);
    /// The region is about to be unmapped: after this returns, nothing may touch it.
    fn removed(&self, id: u64);
}

/// The live regions of one owner (a communicator). Cheap to share (`Arc`).
#[derive(Default)]
pub struct Regions {
    /// Start address -> region.
    map: Mutex<BTreeMap<usize, Entry>>,
    /// Hooks (weak: a hook dies with its transport).
    hooks: Mutex<Vec<std::sync::Weak<dyn RegionHook>>>,
}

impl std::fmt::Debug for Regions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Regions({})", self.count())
    }
}

fn last_err(op: &str) -> NetError {
    NetError::io(op, std::io::Error::last_os_error())
}

pub(crate) fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish() | 1
}

/// Seals that every memfd braid hands to a peer carries, and that a receiver requires before
/// it maps one: its size can never change, so a peer cannot truncate it under our mapping
/// (which would kill us with SIGBUS on the next access).
pub(crate) const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// A fresh memfd of `len` bytes (close-on-exec), sealed with [`SEALS`] and `F_SEAL_SEAL`.
///
/// Errors: `memfd_create`, `ftruncate` or `fcntl(F_ADD_SEALS)` failed.
pub(crate) fn sealed_memfd(name: &std::ffi::CStr, len: usize) -> NetResult<OwnedFd> {
    // SAFETY: `name` is a NUL-terminated C string.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(last_err("memfd_create"));
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain system call on an open memfd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(last_err("ftruncate of a memfd"));
    }
    // SAFETY: plain system call on an open memfd created with MFD_ALLOW_SEALING.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS | libc::F_SEAL_SEAL) } != 0 {
        return Err(last_err("sealing a memfd"));
    }
    Ok(fd)
}

/// Checks, BEFORE anything maps it, that `fd` (passed or named by a peer) is a sealed memfd
/// ([`SEALS`]: its size cannot change) of a regular file of at least `len` bytes (exactly `len`
/// with `exact`). Returns its inode and size; the error says why it must not be mapped.
pub(crate) fn check_sealed(fd: RawFd, len: u64, exact: bool) -> Result<(u64, u64), String> {
    // SAFETY: stat is plain data; all-zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the live `st`.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(format!("fstat: {}", std::io::Error::last_os_error()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err("segment not sealed: not a memfd".into());
    }
    // SAFETY: plain system call on an open descriptor; fails (EINVAL) for non-memfd files.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals < 0 || seals & SEALS != SEALS {
        return Err(format!(
            "segment not sealed (seals {seals:#x}, need shrink and grow): the peer could \
             truncate it under our mapping"
        ));
    }
    let size = st.st_size as u64;
    if (exact && size != len) || size < len {
        return Err(format!("segment of {size} bytes, expected {len}"));
    }
    Ok((st.st_ino, size))
}

fn fstat_ino_size(fd: RawFd) -> NetResult<(u64, u64)> {
    // SAFETY: stat is plain data; all-zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the live `st`.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(last_err("fstat"));
    }
    Ok((st.st_ino, st.st_size as u64))
}

impl Regions {
    /// An empty registry.
    pub fn new() -> Arc<Regions> {
        Arc::new(Regions::default())
    }

    /// Allocates and registers a zero-filled region of `len` bytes (at least one page is
    /// mapped; `len == 0` gives an empty region).
    ///
    /// Errors: `memfd_create`, `ftruncate` or `mmap` failed (out of memory, descriptor limit).
    pub fn alloc(self: &Arc<Self>, len: usize) -> NetResult<Region> {
        let map_len = len.max(1).div_ceil(4096) * 4096;
        let fd = sealed_memfd(c"braid-region", map_len)?;
        self.register_memfd(fd, len, map_len)
    }

    /// As [`Regions::alloc`] with an unsealed memfd (which peers refuse to map).
    #[cfg(test)]
    pub(crate) fn alloc_unsealed(self: &Arc<Self>, len: usize) -> NetResult<Region> {
        let map_len = len.max(1).div_ceil(4096) * 4096;
        // SAFETY: the name is a NUL-terminated literal.
        let fd = unsafe { libc::memfd_create(c"braid-unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(last_err("memfd_create"));
        }
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain system call on an open memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), map_len as libc::off_t) } != 0 {
            return Err(last_err("ftruncate"));
        }
        self.register_memfd(fd, len, map_len)
    }

    /// Maps the memfd `fd` of `map_len` bytes and registers it as a region of `len` bytes.
    fn register_memfd(
        self: &Arc<Self>,
        fd: OwnedFd,
        len: usize,
        map_len: usize,
    ) -> NetResult<Region> {
        // SAFETY: maps map_len bytes of the memfd just sized to map_len; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_err("mmap of a shared region"));
        }
        let (ino, _) = match fstat_ino_size(fd.as_raw_fd()) {
            Ok(x) => x,
            Err(e) => {
                // SAFETY: p/map_len is the mapping made above, not used elsewhere.
                unsafe { libc::munmap(p, map_len) };
                return Err(e);
            }
        };
        let e = Entry {
            len: map_len,
            fd: fd.as_raw_fd(),
            ino,
            id: random_id(),
        };
        self.lock().insert(p as usize, e);
        for h in self.live_hooks() {
            h.added(p as *mut u8, map_len, e.id);
        }
        Ok(Region {
            base: p as *mut u8,
            len,
            map_len,
            _fd: fd,
            id: e.id,
            owner: Arc::downgrade(self),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live_hooks(&self) -> Vec<Arc<dyn RegionHook>> {
        let mut hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner());
        hooks.retain(|h| h.strong_count() > 0);
        hooks.iter().filter_map(|h| h.upgrade()).collect()
    }

    /// Adds a hook and tells it of every region that exists now.
    pub fn add_hook(&self, hook: std::sync::Weak<dyn RegionHook>) {
        let now: Vec<(usize, usize, u64)> =
            self.lock().iter().map(|(a, e)| (*a, e.len, e.id)).collect();
        if let Some(h) = hook.upgrade() {
            for (a, len, id) in now {
                h.added(a as *mut u8, len, id);
            }
        }
        self.hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(hook);
    }

    /// Describes `ptr..ptr+len` if it lies entirely inside one registered region.
    pub fn lookup(&self, ptr: *const u8, len: usize) -> Option<RegionDesc> {
        let a = ptr as usize;
        let m = self.lock();
        let (&start, e) = m.range(..=a).next_back()?;
        let off = a - start;
        if off.checked_add(len)? > e.len {
            return None;
        }
        Some(RegionDesc {
            pid: std::process::id(),
            fd: e.fd,
            ino: e.ino,
            id: e.id,
            region_len: e.len as u64,
            offset: off as u64,
        })
    }

    /// Number of live regions.
    pub fn count(&self) -> usize {
        self.lock().len()
    }
}

/// A region allocated by [`Regions::alloc`]: `len` bytes of shared memory, unmapped (and
/// deregistered) on drop.
#[derive(Debug)]
pub struct Region {
    base: *mut u8,
    len: usize,
    map_len: usize,
    /// Kept open while the region lives: peers open it as `/proc/<pid>/fd/<fd>`.
    _fd: OwnedFd,
    id: u64,
    owner: Weak<Regions>,
}

// SAFETY: a Region owns its mapping like a Box owns its allocation; the raw pointer is only
// handed out through &self/&mut self accessors.
unsafe impl Send for Region {}
// SAFETY: shared access only yields the base pointer; writes need the caller's own
// synchronisation exactly as for a `Vec<u8>` behind `&`.
unsafe impl Sync for Region {}

impl Region {
    /// Start of the region (page-aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.base
    }
    /// Length in bytes as requested.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The region's random id.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if let Some(o) = self.owner.upgrade() {
            o.lock().remove(&(self.base as usize));
            for h in o.live_hooks() {
                h.removed(self.id);
            }
        }
        // SAFETY: base/map_len describe the mapping made by Regions::alloc, unmapped only here.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.map_len) };
        // The memfd closes when `_fd` drops.
    }
}

#[derive(Debug)]
struct RemoteMap {
    base: *mut u8,
    len: usize,
    fd: i32,
    ino: u64,
    used: u64,
}

impl Drop for RemoteMap {
    fn drop(&mut self) {
        // SAFETY: base/len describe a mapping made by RemoteMaps::map, unmapped only here.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// Mappings of peers' regions, by (owner pid, region id).
#[derive(Debug, Default)]
pub struct RemoteMaps {
    maps: HashMap<(u32, u64), RemoteMap>,
    clock: u64,
}

// SAFETY: the mappings are owned by this value and only read through pointers it hands out.
unsafe impl Send for RemoteMaps {}

fn proc_fd_ino(pid: u32, fd: i32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
}

impl RemoteMaps {
    /// An empty cache.
    pub fn new() -> RemoteMaps {
        RemoteMaps::default()
    }

    /// Number of regions mapped.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// A pointer to `len` readable and writable bytes at `d.offset` of the described region,
    /// mapping it on first use. The pointer stays valid until the next call of `resolve` that misses the
    /// cache (which may drop least recently used or freed regions) or until `self` is dropped.
    ///
    /// Errors: the range is outside the region; the owner's descriptor cannot be opened
    /// (another user, no `/proc`, the owner exited or freed the region) or names another file.
    pub fn resolve(&mut self, d: &RegionDesc, len: usize) -> NetResult<*mut u8> {
        let end = d.offset.checked_add(len as u64);
        if end.map_or(true, |e| e > d.region_len) {
            return Err(NetError::Protocol(format!(
                "region range {}+{len} outside a region of {} bytes",
                d.offset, d.region_len
            )));
        }
        self.clock += 1;
        let key = (d.pid, d.id);
        if let Some(m) = self.maps.get_mut(&key) {
            if m.len as u64 >= d.region_len {
                m.used = self.clock;
                // SAFETY: offset + len <= region_len <= m.len (checked above).
                return Ok(unsafe { m.base.add(d.offset as usize) });
            }
        }
        self.sweep(d.pid);
        let mut m = Self::map(d)?;
        m.used = self.clock;
        let base = m.base;
        self.maps.insert(key, m);
        // SAFETY: offset + len <= region_len == the mapping's length.
        Ok(unsafe { base.add(d.offset as usize) })
    }

    /// Drops cached regions of `pid` whose descriptor no longer names the same inode (freed),
    /// and the least recently used regions beyond [`REMOTE_CACHE`] - 1.
    fn sweep(&mut self, pid: u32) {
        self.maps
            .retain(|(p, _), m| *p != pid || proc_fd_ino(pid, m.fd) == Some(m.ino));
        while self.maps.len() >= REMOTE_CACHE {
            let Some(k) = self
                .maps
                .iter()
                .min_by_key(|(_, m)| m.used)
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.maps.remove(&k);
        }
    }

    fn map(d: &RegionDesc) -> NetResult<RemoteMap> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = format!("/proc/{}/fd/{}", d.pid, d.fd);
        // Non-blocking: a descriptor that names a FIFO or a device must not block the open.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)
            .map_err(|e| NetError::io(format!("open {path}"), e))?;
        // Only a sealed memfd is mapped: the owner cannot truncate it under the mapping.
        let (ino, size) = check_sealed(f.as_raw_fd(), d.region_len, false)
            .map_err(|why| NetError::Unavailable(format!("{path}: {why}")))?;
        if ino != d.ino || size < d.region_len {
            return Err(NetError::Unavailable(format!(
                "{path} is not the region described (inode {ino} size {size}, expected inode {} size {})",
                d.ino, d.region_len
            )));
        }
        let len = d.region_len as usize;
        if len == 0 {
            return Err(NetError::Unavailable("empty region".into()));
        }
        // SAFETY: maps `len` bytes (checked against the file size above); checked against
        // MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_err(&format!("mmap of {path}")));
        }
        Ok(RemoteMap {
            base: p as *mut u8,
            len,
            fd: d.fd,
            ino,
            used: 0,
        })
    }
}

/// Copies `src` into `dst` (equal lengths) past the cache for the destination where the CPU
/// allows (non-temporal stores: no read-for-ownership of `dst`), then fences the stores so that
/// they are visible before any later publication. For large results written once and not read
/// again soon by this CPU.
pub fn stream_copy(dst: &mut [u8], src: &[u8]) {
    let n = dst.len().min(src.len());
    // SAFETY: both slices hold at least `n` bytes and cannot overlap (one is borrowed mutably).
    unsafe { stream_copy_raw(dst.as_mut_ptr(), src.as_ptr(), n) }
}

/// [`stream_copy_raw`] with 32-byte streaming stores (few instructions per byte:
/// the copy shares its core with the reduction).
///
/// # Safety
/// As `std::ptr::copy_nonoverlapping`; the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn stream_copy_avx2(dst: *mut u8, src: *const u8, n: usize) {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm256_stream_si256, _mm_sfence};
    // SAFETY: all accesses stay inside src..src+n and dst..dst+n (caller's contract); the
    // streaming stores go to 32-byte aligned addresses (head copied first).
    unsafe {
        let head = dst.align_offset(64).min(n);
        std::ptr::copy_nonoverlapping(src, dst, head);
        let (mut s, mut d) = (src.add(head), dst.add(head));
        let body = (n - head) / 128;
        for _ in 0..body {
            let a = _mm256_loadu_si256(s as *const __m256i);
            let b = _mm256_loadu_si256(s.add(32) as *const __m256i);
            let c = _mm256_loadu_si256(s.add(64) as *const __m256i);
            let e = _mm256_loadu_si256(s.add(96) as *const __m256i);
            _mm256_stream_si256(d as *mut __m256i, a);
            _mm256_stream_si256(d.add(32) as *mut __m256i, b);
            _mm256_stream_si256(d.add(64) as *mut __m256i, c);
            _mm256_stream_si256(d.add(96) as *mut __m256i, e);
            s = s.add(128);
            d = d.add(128);
        }
        std::ptr::copy_nonoverlapping(s, d, n - head - body * 128);
        _mm_sfence();
    }
}

/// As [`stream_copy`], on raw pointers.
///
/// # Safety
/// As `std::ptr::copy_nonoverlapping`.
pub(crate) unsafe fn stream_copy_raw(dst: *mut u8, src: *const u8, n: usize) {
    #[cfg(target_arch = "x86_64")]
    if n >= 1024 && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked); the caller's contract.
        unsafe { stream_copy_avx2(dst, src, n) };
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, n) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_lookup_map_free() {
        let regs = Regions::new();
        let r = regs.alloc(10_000).unwrap();
        assert_eq!(regs.count(), 1);
        // SAFETY: the region has 10_000 writable bytes.
        let s = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len()) };
        for (i, b) in s.iter_mut().enumerate() {
            *b = i as u8;
        }
        // SAFETY: in bounds.
        let d = regs.lookup(unsafe { r.as_ptr().add(100) }, 50).unwrap();
        assert_eq!(d.offset, 100);
        assert_eq!(RegionDesc::decode(&d.encode()), Some(d));
        assert!(regs.lookup(r.as_ptr(), 1 << 20).is_none());
        let x = 0u8;
        assert!(regs.lookup(&x, 1).is_none());
        // The region's memfd is sealed: its owner cannot truncate it under a peer's mapping.
        // SAFETY: plain system call on the region's open memfd.
        assert_ne!(unsafe { libc::ftruncate(r._fd.as_raw_fd(), 0) }, 0);
        let mut rm = RemoteMaps::new();
        let p = rm.resolve(&d, 50).unwrap();
        // SAFETY: 50 readable bytes.
        let got = unsafe { std::slice::from_raw_parts(p, 50) };
        assert_eq!(got, &s[100..150]);
        assert_eq!(rm.len(), 1);
        let bad = RegionDesc {
            ino: d.ino + 1,
            id: 7,
            ..d
        };
        assert!(rm.resolve(&bad, 1).is_err());
        drop(r);
        assert_eq!(regs.count(), 0);
        // A freed region is dropped from the cache at the next miss.
        let r2 = regs.alloc(4096).unwrap();
        let d2 = regs.lookup(r2.as_ptr(), 4096).unwrap();
        rm.resolve(&d2, 4096).unwrap();
        assert_eq!(rm.len(), 1);
    }

    #[test]
    fn unsealed_regions_are_never_mapped() {
        let regs = Regions::new();
        let r = regs.alloc_unsealed(8192).unwrap();
        let d = regs.lookup(r.as_ptr(), 8192).unwrap();
        let mut rm = RemoteMaps::new();
        let e = rm.resolve(&d, 8192).unwrap_err().to_string();
        assert!(e.contains("not sealed"), "{e}");
        assert!(rm.is_empty());
        // Not a memfd at all (a pipe): refused without blocking.
        let mut p = [0; 2];
        // SAFETY: pipe writes two descriptors into the live array.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors owned here.
        let _p = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        let fake = RegionDesc { fd: p[0], ..d };
        let e = rm.resolve(&fake, 1).unwrap_err().to_string();
        assert!(
            e.contains("not sealed") || e.contains("not the region"),
            "{e}"
        );
    }
}
