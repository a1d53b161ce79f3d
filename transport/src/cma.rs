//! Cross-memory attach (`process_vm_readv` / `process_vm_writev`): one copy between the
//! private memory of two processes of one host, done by the kernel. This is how same-host ranks
//! move large messages held in ordinary heap buffers (a tensor's storage, a `Vec`) with a single
//! copy, where buffers from a shared region ([`crate::region`]) are not available.
//!
//! It is permitted where the caller may ptrace the peer (same user, and Yama's
//! `ptrace_scope` 0, or 1 with the peer a descendant or having named us with
//! `PR_SET_PTRACER`); container seccomp profiles often forbid it. Naming any process as a
//! tracer weakens a process under `ptrace_scope` 1, so [`allow_peers_with`] does it only on
//! the user's opt-in (`BRAID_SHM_CMA=1`). Callers therefore
//! [`CmaDesc::probe`] a peer first (which also proves that the pid names the peer, not another
//! process of another pid namespace: it reads the peer's random [`cookie`]) and fall back to
//! the rings when that fails.

use std::sync::OnceLock;

use crate::{NetError, NetResult};

/// Bytes of an encoded [`CmaDesc`] (fits a region descriptor's slot).
pub const CMA_DESC_LEN: usize = 36;

/// A byte range of a peer process's memory, as [`read()`] and [`write()`] need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmaDesc {
    /// Owner process id (in the owner's pid namespace: checked by [`CmaDesc::probe`]).
    pub pid: u32,
    /// Start address in the owner.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Address of the owner's [`cookie`].
    pub cookie_addr: u64,
    /// Value of the owner's [`cookie`].
    pub cookie: u64,
}

struct Cookie(u64);

static COOKIE: OnceLock<Box<Cookie>> = OnceLock::new();

/// This process's random cookie and its address: a peer that reads this value at this address
/// through cross-memory attach has reached this process.
pub fn cookie() -> (u64, u64) {
    let c = COOKIE.get_or_init(|| Box::new(Cookie(crate::region::random_id())));
    (&c.0 as *const u64 as u64, c.0)
}

impl CmaDesc {
    /// Describes `len` bytes at `ptr` of this process.
    pub fn local(ptr: *const u8, len: usize) -> CmaDesc {
        let (cookie_addr, cookie) = cookie();
        CmaDesc {
            pid: std::process::id(),
            addr: ptr as u64,
            len: len as u64,
            cookie_addr,
            cookie,
        }
    }

    /// Encodes into [`CMA_DESC_LEN`] bytes.
    pub fn encode(&self) -> [u8; CMA_DESC_LEN] {
        let mut b = [0u8; CMA_DESC_LEN];
        b[0..4].copy_from_slice(&self.pid.to_le_bytes());
        b[4..12].copy_from_slice(&self.addr.to_le_bytes());
        b[12..20].copy_from_slice(&self.len.to_le_bytes());
        b[20..28].copy_from_slice(&self.cookie_addr.to_le_bytes());
        b[28..36].copy_from_slice(&self.cookie.to_le_bytes());
        b
    }

    /// Decodes what [`CmaDesc::encode`] produced (`None` when `b` is too short).
    pub fn decode(b: &[u8]) -> Option<CmaDesc> {
        if b.len() < CMA_DESC_LEN {
            return None;
        }
        let u64at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        Some(CmaDesc {
            pid: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            addr: u64at(4),
            len: u64at(12),
            cookie_addr: u64at(20),
            cookie: u64at(28),
        })
    }

    /// Checks that this process may read and write the described memory: reads the owner's
    /// cookie (the pid names the owner and cross-memory attach is permitted), then reads the
    /// range's first byte and writes it back where `writable` (the range is mapped; a peer's
    /// buffer is only written while its owner is inside the same collective).
    ///
    /// Errors: not permitted (ptrace rules, seccomp), no such process, another process of
    /// that pid (other pid namespace), or the range is not mapped.
    pub fn probe(&self, writable: bool) -> NetResult<()> {
        let mut c = [0u8; 8];
        read(self.pid, self.cookie_addr, &mut c)?;
        if u64::from_le_bytes(c) != self.cookie {
            return Err(NetError::Protocol(format!(
                "process {} is not the peer (another pid namespace?)",
                self.pid
            )));
        }
        if self.len > 0 {
            let mut b = [0u8; 1];
            read(self.pid, self.addr, &mut b)?;
            if writable {
                write(self.pid, self.addr, &b)?;
            }
        }
        Ok(())
    }

    /// `len` bytes at `off` of the range, checked against its length.
    pub fn at(&self, off: usize, len: usize) -> NetResult<u64> {
        match (off as u64).checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(self.addr + off as u64),
            _ => Err(NetError::Protocol(format!(
                "range {off}+{len} outside a peer buffer of {} bytes",
                self.len
            ))),
        }
    }
}

/// What Yama's `ptrace_scope` means for cross-memory attach by same-user peers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Yama {
    /// Peers may attach as things are (the text says why, for the log).
    Permitted(String),
    /// Scope 1 and the user opted in: `prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY)` is needed.
    SetPtracer,
    /// Peers cannot attach (the text says why and, where it helps, how to enable it).
    Refused(String),
}

/// The decision for a `ptrace_scope` value (`None`: no Yama) and the user's opt-in
/// (`BRAID_SHM_CMA=1`). Scope 1 permits attach only to processes that name their tracer:
/// naming ANY process of this user weakens this process, so that is done only on opt-in.
fn yama(scope: Option<&str>, opt_in: bool) -> Yama {
    match scope.map(str::trim) {
        None => Yama::Permitted("no Yama ptrace_scope: same-user attach permitted".into()),
        Some("0") => Yama::Permitted("Yama ptrace_scope 0: same-user attach permitted".into()),
        Some("1") if opt_in => Yama::SetPtracer,
        Some("1") => Yama::Refused(
            "Yama ptrace_scope 1 permits it only if every rank lets any process of this user \
             read its memory (prctl PR_SET_PTRACER_ANY); set BRAID_SHM_CMA=1 to allow that"
                .into(),
        ),
        Some(other) => Yama::Refused(format!(
            "Yama ptrace_scope {other}: peers cannot attach (needs CAP_SYS_PTRACE or is disabled)"
        )),
    }
}

/// Makes this process reachable by its peers' cross-memory attach where that does not weaken
/// it, or where the user opted in (`opt_in`, `BRAID_SHM_CMA=1`):
/// - no Yama, or `ptrace_scope` 0: nothing to do, `Ok`;
/// - `ptrace_scope` 1: with `opt_in`, `prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY)` (as UCX
///   does; processes of other users stay refused by the kernel's usual checks) and `Ok`;
///   without it nothing is changed and `Err` says how to enable it;
/// - `ptrace_scope` 2 or 3: `Err`.
///
/// `Err` means peers cannot attach: the caller moves private buffers through the rings and
/// logs the text once (info). `Ok`'s text is for a debug log.
pub fn allow_peers_with(opt_in: bool) -> Result<String, String> {
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok();
    match yama(scope.as_deref(), opt_in) {
        Yama::Permitted(s) => Ok(s),
        Yama::Refused(s) => Err(s),
        Yama::SetPtracer => {
            // SAFETY: prctl with integer arguments only; it changes this process's Yama
            // exception and nothing else.
            let r = unsafe {
                libc::prctl(
                    libc::PR_SET_PTRACER,
                    libc::PR_SET_PTRACER_ANY,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                )
            };
            if r == 0 {
                Ok(
                    "Yama ptrace_scope 1 and BRAID_SHM_CMA=1: set PR_SET_PTRACER_ANY so that \
                    peers may attach"
                        .into(),
                )
            } else {
                Err(format!(
                    "Yama ptrace_scope 1 and prctl(PR_SET_PTRACER) failed: {}",
                    std::io::Error::last_os_error()
                ))
            }
        }
    }
}

/// [`allow_peers_with`] without the user's opt-in (the safe default: this process is never
/// opened to every process of its user).
pub fn allow_peers() -> Result<String, String> {
    allow_peers_with(false)
}

fn cma_err(op: &str, pid: u32) -> NetError {
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        return NetError::Lost(format!(
            "{op} of process {pid}: no such process here (the peer exited, or runs in another \
             pid namespace)"
        ));
    }
    let why = match e.raw_os_error() {
        Some(libc::EPERM) => {
            " (not permitted: ptrace rules such as Yama ptrace_scope, a seccomp profile, or \
             another user or pid namespace)"
        }
        Some(libc::ENOSYS) => " (not available in this kernel or sandbox)",
        Some(libc::EFAULT) => " (the peer's buffer is not mapped any more)",
        _ => "",
    };
    NetError::io(format!("{op} of process {pid}{why}"), e)
}

/// Copies `dst.len()` bytes from address `addr` of process `pid` into `dst`.
///
/// Errors: as [`CmaDesc::probe`]; a short transfer that makes no progress.
pub fn read(pid: u32, addr: u64, dst: &mut [u8]) -> NetResult<()> {
    transfer(pid, addr, dst.as_mut_ptr(), dst.len(), false)
}

/// Copies `src` to address `addr` of process `pid`.
///
/// Errors: as [`read`].
pub fn write(pid: u32, addr: u64, src: &[u8]) -> NetResult<()> {
    transfer(pid, addr, src.as_ptr() as *mut u8, src.len(), true)
}

/// The loop of [`read()`] (`local` is written) and [`write()`] (`local` is only read).
fn transfer(pid: u32, addr: u64, local: *mut u8, len: usize, write: bool) -> NetResult<()> {
    let mut done = 0usize;
    while done < len {
        let l = libc::iovec {
            // SAFETY: done < len: inside the caller's slice.
            iov_base: unsafe { local.add(done) }.cast(),
            iov_len: len - done,
        };
        let r = libc::iovec {
            iov_base: (addr + done as u64) as *mut libc::c_void,
            iov_len: len - done,
        };
        let p = pid as libc::pid_t;
        // SAFETY: `l` describes memory of the caller's slice (writable for a read, only read
        // for a write); the kernel checks `r` against the other process's mappings (EFAULT
        // when not mapped).
        let n = unsafe {
            if write {
                libc::process_vm_writev(p, &l, 1, &r, 1, 0)
            } else {
                libc::process_vm_readv(p, &l, 1, &r, 1, 0)
            }
        };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            let op = if write {
                "process_vm_writev"
            } else {
                "process_vm_readv"
            };
            return Err(cma_err(op, pid));
        }
        done += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_peers_reports_this_machine() {
        // Whatever the machine's Yama setting, the answer names it (or its absence).
        let r = allow_peers();
        let text = match &r {
            Ok(s) | Err(s) => s.clone(),
        };
        assert!(text.contains("ptrace_scope"), "{text}");
        if std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
            .map(|s| s.trim() == "0")
            .unwrap_or(true)
        {
            assert!(r.is_ok(), "{text}");
        }
    }

    #[test]
    fn yama_scope_1_needs_the_opt_in() {
        // Scope 1 without BRAID_SHM_CMA=1: refused (private buffers go through the rings),
        // and the reason says how to enable it; no prctl is asked for.
        match yama(Some("1\n"), false) {
            Yama::Refused(s) => assert!(s.contains("BRAID_SHM_CMA=1"), "{s}"),
            other => panic!("scope 1 without opt-in: {other:?}"),
        }
        assert_eq!(yama(Some("1"), true), Yama::SetPtracer);
        for opt_in in [false, true] {
            assert!(matches!(yama(Some("0"), opt_in), Yama::Permitted(_)));
            assert!(matches!(yama(None, opt_in), Yama::Permitted(_)));
            assert!(matches!(yama(Some("2"), opt_in), Yama::Refused(_)));
            assert!(matches!(yama(Some("3"), opt_in), Yama::Refused(_)));
        }
    }

    #[test]
    fn desc_round_trips() {
        let d = CmaDesc {
            pid: 7,
            addr: 0x1234_5678_9abc,
            len: 99,
            cookie_addr: 42,
            cookie: u64::MAX - 3,
        };
        assert_eq!(CmaDesc::decode(&d.encode()), Some(d));
        assert_eq!(CmaDesc::decode(&d.encode()[..CMA_DESC_LEN - 1]), None);
    }

    #[test]
    fn reads_and_writes_this_process() {
        // Cross-memory attach on oneself is always permitted: exercises the copy loops.
        let src: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        let d = CmaDesc::local(src.as_ptr(), src.len());
        d.probe(false).unwrap();
        let mut dst = vec![0u8; 1000];
        read(d.pid, d.at(5000, 1000).unwrap(), &mut dst).unwrap();
        assert_eq!(dst, src[5000..6000]);
        let mut out = vec![0u8; 300];
        let o = CmaDesc::local(out.as_mut_ptr(), out.len());
        write(o.pid, o.at(100, 100).unwrap(), &src[..100]).unwrap();
        assert_eq!(out[100..200], src[..100]);
        assert!(d.at(199_999, 2).is_err());
    }

    #[test]
    fn wrong_cookie_and_missing_process_are_errors() {
        let buf = [0u8; 16];
        let mut d = CmaDesc::local(buf.as_ptr(), 16);
        d.cookie ^= 1;
        let e = d.probe(false).unwrap_err().to_string();
        assert!(e.contains("not the peer"), "{e}");
        // pid_max is at most 2^22: this pid does not exist.
        let d = CmaDesc {
            pid: (1 << 22) + 17,
            ..CmaDesc::local(buf.as_ptr(), 16)
        };
        let e = d.probe(false).unwrap_err().to_string();
        assert!(e.contains("process_vm_readv"), "{e}");
    }
}
