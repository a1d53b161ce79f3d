//! Single-copy collectives between ranks of one host: all-reduce, reduce-scatter, all-gather,
//! broadcast, reduce, all-to-all (out of place), gather and scatter. A peer's buffer is reached in one of two ways:
//! * it lies in a shared region ([`crate::shared::SharedBuf`], like NCCL with registered
//!   buffers, `-R 1`): this rank maps the region and reads or writes it with plain loads and
//!   stores;
//! * it is ordinary private memory (a `Vec`, a tensor): this rank copies from or to it with
//!   cross-memory attach ([`braid_transport::cma`], `process_vm_readv`/`writev`: the kernel
//!   copies once), where the system permits it (`BRAID_SHM_CMA`); reductions read a block into
//!   a cache-sized scratch block first.
//!
//! Steps (n ranks):
//! 1. Handshake: every rank sends every peer a descriptor of its send and receive buffers
//!    (region, offset, length; or process, address, length), whether it can use cross-memory
//!    attach, or "not connected through shared memory". Every rank sees all descriptors, so
//!    all agree: if any rank said "not", or a buffer is private and some rank cannot use
//!    cross-memory attach, all run the usual plan.
//! 2. Each rank maps the peers' regions it needs (cached) or probes their private buffers
//!    (reads the peer's cookie: permitted, and the right process), and tells every peer whether
//!    that worked; any failure: all run the usual plan (nothing was written yet; one log line;
//!    a rank whose probe was refused stops offering cross-memory attach). After this exchange
//!    every rank is inside the call.
//! 3. The data movement, each byte copied once:
//!    * all-reduce (chunk r = elements `[r*count/n, (r+1)*count/n)`): rank r alone handles chunk
//!      r of every buffer: block by block (cache-sized) it reduces chunk r of every rank's send
//!      buffer (read in place in the peers' memory) into a scratch block with the kernels of
//!      [`crate::reduce`], then writes the block into chunk r of every rank's receive buffer
//!      (its own included) with non-temporal stores (plain stores where that receive buffer is
//!      the send buffer: those lines were just read). Needs every rank's send and receive
//!      buffers registered. In place is safe: nobody but rank r touches chunk r of any buffer,
//!      and each block is read entirely before it is written.
//!    * reduce-scatter: rank r reduces block r of every rank's send buffer into its receive
//!      buffer (same blocking). Needs the send buffers registered.
//!    * all-gather: rank r copies every rank's send buffer into block q of its receive buffer.
//!      Needs the send buffers registered (in place: the send block is inside the receive
//!      buffer and is never written).
//!    * broadcast: every rank copies the root's buffer into its own. Needs the root's registered.
//!    * reduce: as all-reduce, each rank reducing its chunk into the root's receive buffer only.
//!      Needs every send buffer and the root's receive buffer registered.
//!    * all-to-all: rank q copies block q of every rank's send buffer into its receive buffer.
//!      Needs the send buffers registered; not in place (a rank would overwrite blocks its
//!      peers still read).
//!    * gather: every rank copies its send buffer into its block of the root's receive buffer;
//!      scatter: every rank copies its block of the root's send buffer. Needs the root's
//!      buffer registered.
//! 4. Barrier (nobody reads or writes this rank's buffers any more), which also carries whether
//!    each rank's part succeeded: a copy that failed half-way (a peer that vanished) is an
//!    error on every rank, never a hang.
//!
//! Busbw factors as for the ring algorithms. The handshakes and the barrier are small
//! messages over the existing connections, so a peer that dies or aborts meanwhile is reported
//! as usual (executor waits, `BRAID_TIMEOUT`); memory of a dead peer stays mapped (and valid)
//! until the cache drops it.

use std::sync::atomic::{AtomicBool, Ordering};

use braid_transport::cma::{self, CmaDesc};
use braid_transport::region::{RegionDesc, Regions, RemoteMaps, DESC_LEN};
use braid_transport::NetError;

use crate::coll::{Algo, CollKind, PlanCtx};
use crate::error::{Error, Result};
use crate::exec::{Exec, P2pOp, Peer, Sig};
use crate::mem::{self, RawBuf};
use crate::reduce;

/// Largest communicator that tries the single-copy paths (peer mappings are cached per region).
pub(crate) const MAX_RANKS: usize = 8;

const TOKEN: usize = 24 + 2 * DESC_LEN;

/// Bytes reduced per step (the scratch block and the source blocks stay in cache).
const BLOCK: usize = 64 << 10;

/// Bytes reduced per step when a source or destination is reached by cross-memory attach
/// (fewer system calls; the blocks still fit in L2).
const CMA_BLOCK: usize = 256 << 10;

/// Calls whose buffers are at least this large write results with streaming stores.
const NT_MIN: usize = 16 << 20;

/// Descriptor kinds in the handshake.
const KIND_REGION: u8 = 1;
const KIND_CMA: u8 = 2;

/// Set when cross-memory attach was refused in this process (ptrace rules, seccomp): it is not
/// offered again.
static CMA_REFUSED: AtomicBool = AtomicBool::new(false);

/// A buffer of some rank as this rank reaches it.
#[derive(Clone, Copy)]
enum Buf {
    /// Memory this process addresses: its own buffer, or a peer's region mapped here.
    Mem(RawBuf),
    /// A peer's private memory (cross-memory attach), and the peer's rank.
    Cma(CmaDesc, usize),
}

impl Buf {
    fn sub(&self, off: usize, len: usize) -> Result<Buf> {
        Ok(match self {
            Buf::Mem(b) => Buf::Mem(sub(b, off, len)?),
            Buf::Cma(d, p) => Buf::Cma(
                CmaDesc {
                    addr: d.at(off, len).map_err(|e| Error::Internal(e.to_string()))?,
                    len: len as u64,
                    ..*d
                },
                *p,
            ),
        })
    }

    /// Copies `len` bytes from `src` to `off` of this buffer.
    fn write_from(
        &self,
        off: usize,
        src: *const u8,
        len: usize,
        nt: bool,
        w: &mut Watch,
    ) -> Moved<()> {
        self.copy(off, src as *mut u8, len, true, nt, w)
    }

    /// Copies `len` bytes at `off` of this buffer into `dst`.
    fn read_into(
        &self,
        off: usize,
        dst: *mut u8,
        len: usize,
        nt: bool,
        w: &mut Watch,
    ) -> Moved<()> {
        self.copy(off, dst, len, false, nt, w)
    }

    /// `local` -> this buffer at `off` (`into`), or the other way (then `local` is written);
    /// `nt`: streaming stores where the memory is addressed here. In pieces of
    /// [`WATCH_BYTES`], looking at the connections in between.
    fn copy(
        &self,
        off: usize,
        local: *mut u8,
        len: usize,
        into: bool,
        nt: bool,
        w: &mut Watch,
    ) -> Moved<()> {
        let mut done = 0;
        while done < len {
            let l = WATCH_BYTES.min(len - done);
            self.copy_piece(off + done, local.wrapping_add(done), l, into, nt)?;
            w.tick(l)?;
            done += l;
        }
        Ok(())
    }

    fn copy_piece(
        &self,
        off: usize,
        local: *mut u8,
        len: usize,
        into: bool,
        nt: bool,
    ) -> Moved<()> {
        match self {
            Buf::Mem(b) => {
                let p = b.at(off, len)?;
                let (d, s) = if into { (p, local) } else { (local, p) };
                if !nt {
                    mem::copy(d, s, len);
                } else if !std::ptr::eq(d, s) {
                    mem::with2(d, s, len, braid_transport::region::stream_copy)?;
                }
                Ok(())
            }
            Buf::Cma(d, p) => {
                let a = d.at(off, len).map_err(|e| Fail::Peer(*p, e))?;
                if into {
                    mem::with_ref(local, len, |x| cma::write(d.pid, a, x))
                } else {
                    mem::with_mut(local, len, |x| cma::read(d.pid, a, x))
                }
                .map_err(|e| Fail::Peer(*p, e))
            }
        }
    }
}

/// Bytes copied between two looks at the connections ([`Watch`]).
const WATCH_BYTES: usize = 1 << 20;

/// Looks at every connection every [`WATCH_BYTES`] bytes of the data movement, so that a peer
/// that died or aborted meanwhile stops this rank's copying at once (not at the end of its
/// part, possibly after the peers left the call and reused their buffers).
struct Watch<'a> {
    peers: &'a mut [Option<Peer>],
    since: usize,
}

impl Watch<'_> {
    fn tick(&mut self, bytes: usize) -> Moved<()> {
        self.since += bytes;
        if self.since < WATCH_BYTES {
            return Ok(());
        }
        self.since = 0;
        for (p, peer) in self.peers.iter_mut().enumerate() {
            if let Some(peer) = peer {
                peer.conn.progress().map_err(|e| Fail::Peer(p, e))?;
            }
        }
        Ok(())
    }
}

/// Why this rank's part of the data movement failed.
enum Fail {
    /// Here (a bug: a range outside a buffer).
    Local(Error),
    /// Reaching this rank's memory failed (cross-memory attach: the process is gone, ...).
    Peer(usize, NetError),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Local(e)
    }
}

type Moved<T> = std::result::Result<T, Fail>;

/// What [`run`] did.
pub(crate) enum Outcome {
    /// The call is complete; this many bytes were read from or written to peers' memory.
    Done(u64),
    /// Some rank cannot take the single-copy path: every rank runs the usual plan.
    Fallback,
}

/// Exchanges `mine` with every peer (all-to-all of equal-sized tokens); `all[r]` gets rank
/// r's token (this rank's own included).
fn exchange(
    exec: &mut Exec,
    peers: &mut [Option<Peer>],
    ctx: &PlanCtx,
    sig: Sig,
    mine: &[u8],
    all: &mut [Vec<u8>],
) -> Result<()> {
    let mut ops = Vec::with_capacity(2 * ctx.size);
    let (before, rest) = all.split_at_mut(ctx.rank);
    let (me, after) = rest.split_at_mut(1);
    me[0].copy_from_slice(mine);
    for (p, t) in before.iter_mut().enumerate().chain(
        after
            .iter_mut()
            .enumerate()
            .map(|(i, t)| (ctx.rank + 1 + i, t)),
    ) {
        ops.push(P2pOp {
            send: true,
            peer: p,
            buf: RawBuf::from_slice(mine),
            sig,
            source: None,
        });
        ops.push(P2pOp {
            send: false,
            peer: p,
            buf: RawBuf::from_mut(t),
            sig,
            source: None,
        });
    }
    exec.run_p2p(peers, ops)
}

fn chunk(count: usize, n: usize, r: usize) -> (usize, usize) {
    let at = |k: usize| ((count as u128 * k as u128) / n as u128) as usize;
    (at(r), at(r + 1))
}

/// Which of a rank's buffers its peers touch in `kind` (send, receive); `None`: the
/// collective has no single-copy path.
fn needs(kind: CollKind, rank: usize, root: usize) -> Option<(bool, bool)> {
    Some(match kind {
        CollKind::AllReduce => (true, true),
        CollKind::ReduceScatter | CollKind::AllGather | CollKind::AllToAll => (true, false),
        CollKind::Broadcast => (rank == root, false),
        CollKind::Reduce => (true, rank == root),
        CollKind::Gather => (false, rank == root),
        CollKind::Scatter => (rank == root, false),
        _ => return None,
    })
}

/// Whether `kind` has a single-copy path.
pub(crate) fn supports(kind: CollKind) -> bool {
    needs(kind, 0, 0).is_some()
}

/// Reduces the equal-length `srcs` block by block into a scratch block and writes each block
/// to every one of `dsts` (streaming stores, or plain ones where a destination is also a
/// source; cross-memory attach for peers' private buffers, whose blocks are first read into
/// scratch blocks).
fn reduce_to(
    ctx: &PlanCtx,
    srcs: &[Buf],
    dsts: &[Buf],
    len: usize,
    nt: bool,
    w: &mut Watch,
) -> Moved<()> {
    let es = ctx.dtype.size();
    let any_cma = srcs.iter().chain(dsts).any(|b| matches!(b, Buf::Cma(..)));
    let block = if any_cma { CMA_BLOCK } else { BLOCK };
    let step = (block / es).max(1) * es;
    let ncma = srcs.iter().filter(|b| matches!(b, Buf::Cma(..))).count();
    SCRATCH.with(|cell| {
        let mut tmp = cell.borrow_mut();
        let want = step.div_ceil(8) * (1 + ncma);
        if tmp.len() < want {
            tmp.resize(want, 0);
        }
        let tmpb: &mut [u8] = bytemuck::cast_slice_mut(&mut tmp[..want]);
        reduce_blocks(ctx, srcs, dsts, len, nt, w, step, RawBuf::from_mut(tmpb))
    })
}

thread_local! {
    /// Scratch blocks of [`reduce_to`], kept between calls (no allocation and zeroing of up to
    /// a few hundred KiB per collective).
    static SCRATCH: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The loop of [`reduce_to`]; `tmp`: one scratch block of `step` bytes, then one per
/// cross-memory-attach source.
#[allow(clippy::too_many_arguments)]
fn reduce_blocks(
    ctx: &PlanCtx,
    srcs: &[Buf],
    dsts: &[Buf],
    len: usize,
    nt: bool,
    w: &mut Watch,
    step: usize,
    tmp: RawBuf,
) -> Moved<()> {
    let mut blocks = vec![std::ptr::null::<u8>(); srcs.len()];
    let mut off = 0;
    while off < len {
        let l = step.min(len - off);
        let mut k = 0;
        for (s, p) in srcs.iter().zip(blocks.iter_mut()) {
            *p = match s {
                Buf::Mem(b) => b.at(off, l)?,
                Buf::Cma(..) => {
                    k += 1;
                    let at = tmp.at(k * step, l)?;
                    s.copy_piece(off, at, l, false, false)?;
                    at
                }
            };
        }
        let t = tmp.at(0, l)?;
        mem::with3(t, blocks[0], blocks[1], l, |d, x, y| {
            reduce::reduce_into(ctx.dtype, ctx.op, d, x, y)
        })??;
        for &x in blocks.iter().skip(2) {
            mem::with2(t, x, l, |d, x| {
                reduce::reduce_inplace(ctx.dtype, ctx.op, d, x)
            })??;
        }
        mem::with_mut(t, l, |d| reduce::finalize(ctx.dtype, ctx.op, d, ctx.size))?;
        for d in dsts {
            match d {
                Buf::Mem(d) => {
                    let d = d.at(off, l)?;
                    if !nt || blocks.iter().any(|&s| std::ptr::eq(d, s)) {
                        // A small call (its results stay in cache for whoever reads them
                        // next), or in place: the block was just read, so it is in this CPU's
                        // cache and plain stores hit it (streaming stores to cached lines are
                        // slower).
                        mem::copy(d, t, l);
                    } else {
                        mem::with2(d, t, l, braid_transport::region::stream_copy)?;
                    }
                }
                Buf::Cma(c, p) => {
                    let a = c.at(off, l).map_err(|e| Fail::Peer(*p, e))?;
                    mem::with_ref(t, l, |x| cma::write(c.pid, a, x))
                        .map_err(|e| Fail::Peer(*p, e))?;
                }
            }
        }
        w.tick(l)?;
        off += l;
    }
    Ok(())
}

fn sub(b: &RawBuf, off: usize, len: usize) -> Result<RawBuf> {
    let p = b.at(off, len)?;
    // SAFETY: p..p+len lies inside `b` (checked by at), which stays valid for the call.
    Ok(unsafe { RawBuf::from_raw(p, len) })
}

/// Runs one collective single-copy if every rank can (see the module docs).
///
/// `local_ok`: this rank reaches every peer through shared memory. `cma`: cross-memory attach
/// may be used (`BRAID_SHM_CMA`). `sig`: the collective's signature (its `seq`); the handshakes
/// are told apart by `slice_kib`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    exec: &mut Exec,
    peers: &mut [Option<Peer>],
    regions: &Regions,
    remote: &mut RemoteMaps,
    ctx: &PlanCtx,
    bufs: [RawBuf; 2],
    sig: Sig,
    local_ok: bool,
    cma: bool,
) -> Result<Outcome> {
    let n = ctx.size;
    let me = ctx.rank;
    let es = ctx.dtype.size();
    let c = ctx.count * es;
    let Some(mine_needed) = needs(ctx.kind, me, ctx.root) else {
        return Ok(Outcome::Fallback);
    };
    let cma = cma && !CMA_REFUSED.load(Ordering::Relaxed);
    let round = |k: u32| Sig {
        algo: Algo::Direct,
        slice_kib: 0xD1_0000 | k,
        ..sig
    };
    // 1. Descriptors of what the peers need: [ok, send kind, recv kind, can cma, 0..,
    //    send len @8, recv len @16, send desc @24, recv desc @24 + DESC_LEN].
    let mut tok = [0u8; TOKEN];
    tok[0] = u8::from(local_ok);
    tok[3] = u8::from(cma);
    if ctx.kind == CollKind::AllToAll
        && mem::overlaps(
            bufs[0].at(0, bufs[0].len())?,
            bufs[0].len(),
            bufs[1].at(0, bufs[1].len())?,
            bufs[1].len(),
        )
    {
        // In place, a rank would overwrite blocks its peers are still reading.
        tok[0] = 0;
    }
    tok[8..16].copy_from_slice(&(bufs[0].len() as u64).to_le_bytes());
    tok[16..24].copy_from_slice(&(bufs[1].len() as u64).to_le_bytes());
    for (i, (need, b)) in [(mine_needed.0, &bufs[0]), (mine_needed.1, &bufs[1])]
        .into_iter()
        .enumerate()
    {
        if !need {
            continue;
        }
        let at = 24 + i * DESC_LEN;
        let p = b.at(0, b.len())?;
        if let Some(d) = regions.lookup(p, b.len()) {
            tok[1 + i] = KIND_REGION;
            tok[at..at + DESC_LEN].copy_from_slice(&d.encode());
        } else if cma {
            tok[1 + i] = KIND_CMA;
            tok[at..at + cma::CMA_DESC_LEN].copy_from_slice(&CmaDesc::local(p, b.len()).encode());
        } else {
            tok[0] = 0;
        }
    }
    let mut all = vec![vec![0u8; TOKEN]; n];
    exchange(exec, peers, ctx, round(1), &tok, &mut all)?;
    let any_cma = all.iter().any(|t| t[1] == KIND_CMA || t[2] == KIND_CMA);
    if all.iter().any(|t| t[0] != 1 || (any_cma && t[3] != 1)) {
        return Ok(Outcome::Fallback);
    }
    // 2. Map or probe the peers' buffers this rank needs.
    let mut sends = vec![Buf::Mem(RawBuf::empty()); n];
    let mut recvs = vec![Buf::Mem(RawBuf::empty()); n];
    let mut failed: Option<String> = None;
    for (p, t) in all.iter().enumerate() {
        if p == me {
            sends[p] = Buf::Mem(bufs[0]);
            recvs[p] = Buf::Mem(bufs[1]);
            continue;
        }
        let Some((ns, nr)) = needs(ctx.kind, p, ctx.root) else {
            failed = Some("no single-copy path".into());
            break;
        };
        let u64at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&t[o..o + 8]);
            u64::from_le_bytes(x) as usize
        };
        for (i, need, slot, what) in [
            (0, ns, &mut sends[p], "send"),
            (1, nr, &mut recvs[p], "receive"),
        ] {
            if !need || failed.is_some() {
                continue;
            }
            let (len, at) = (u64at(8 + 8 * i), 24 + i * DESC_LEN);
            let raw = &t[at..at + DESC_LEN];
            match t[1 + i] {
                KIND_REGION => {
                    let Some(d) = RegionDesc::decode(raw) else {
                        failed = Some(format!("rank {p} sent a malformed descriptor"));
                        continue;
                    };
                    match remote.resolve(&d, len) {
                        // SAFETY: resolve returned a pointer to `len` readable and writable
                        // bytes of a mapping that stays in the cache for this call (at most
                        // 2(n-1) <= 14 regions are resolved per call, below the cache's
                        // capacity, and a region in use is never swept: its owner is inside
                        // this call and keeps it alive). Send views are only read; of a
                        // receive view this rank writes only its own chunk, which no other
                        // rank touches during the call.
                        Ok(x) => *slot = Buf::Mem(unsafe { RawBuf::from_raw(x, len) }),
                        Err(e) => failed = Some(format!("mapping rank {p}'s {what} buffer: {e}")),
                    }
                }
                KIND_CMA => match CmaDesc::decode(raw) {
                    Some(d) if d.len as usize == len => match d.probe(i == 1) {
                        Ok(()) => *slot = Buf::Cma(d, p),
                        Err(e) => {
                            if !CMA_REFUSED.swap(true, Ordering::Relaxed) {
                                tracing::warn!(target: "braid::coll", "rank {me}: cross-memory attach to rank {p} refused ({e}); large same-host messages in private buffers go through the shm rings from now on");
                            }
                            failed = Some(format!("reaching rank {p}'s {what} buffer: {e}"));
                        }
                    },
                    _ => failed = Some(format!("rank {p} sent a malformed descriptor")),
                },
                k => failed = Some(format!("rank {p} sent descriptor kind {k}")),
            }
        }
        if failed.is_some() {
            break;
        }
    }
    let mut ok = [0u8; 8];
    ok[0] = u8::from(failed.is_none());
    let mut oks = vec![vec![0u8; 8]; n];
    exchange(exec, peers, ctx, round(2), &ok, &mut oks)?;
    if oks.iter().any(|t| t[0] != 1) {
        if let Some(why) = failed {
            tracing::warn!(target: "braid::coll", "rank {me}: single-copy {} unavailable ({why}); using the shm rings", ctx.kind.name());
        }
        return Ok(Outcome::Fallback);
    }
    // 3. Move the data.
    let moved = move_data(
        ctx,
        &bufs,
        &sends,
        &recvs,
        c,
        &mut Watch { peers, since: 0 },
    );
    // 4. Nobody reads or writes this rank's buffers any more; every rank learns whether all
    //    parts succeeded.
    // The token: [3, ok, culprit (rank + 1 whose process was gone; 0: none) as u16 LE, ..].
    let culprit = match &moved {
        Err(Fail::Peer(p, NetError::Lost(_) | NetError::Closed(_))) => *p as u16 + 1,
        _ => 0,
    };
    let mut done = [3u8; 8];
    done[1] = u8::from(moved.is_ok());
    done[2..4].copy_from_slice(&culprit.to_le_bytes());
    let exchanged = exchange(exec, peers, ctx, round(3), &done, &mut oks);
    let what = || format!("single-copy {}", ctx.kind.name());
    let lost =
        |peers: &[Option<Peer>], p: usize, e: NetError| match peers.get(p).and_then(|x| x.as_ref())
        {
            // A process that is gone: PeerLost naming it, as over the rings.
            Some(peer) => crate::exec::net_error(peer, e, me, &what()),
            None => Error::System(format!("rank {me}: {} with rank {p}: {e}", what())),
        };
    // This rank's own failure is the most precise report; then the exchange's.
    let moved = match moved {
        Err(Fail::Peer(p, e)) => {
            // A process found gone by cross-memory attach may have left after an error of
            // its own, which it reported on the connection before exiting: prefer that.
            let said = peers
                .get_mut(p)
                .and_then(|x| x.as_mut())
                .and_then(|x| x.conn.progress().err());
            return Err(lost(peers, p, said.unwrap_or(e)));
        }
        Err(Fail::Local(e)) => return Err(Error::System(format!("rank {me}: {}: {e}", what()))),
        Ok(m) => m,
    };
    exchanged?;
    if let Some((q, t)) = oks.iter().enumerate().find(|(_, t)| t[1] != 1) {
        let c = u16::from_le_bytes([t[2], t[3]]) as usize;
        if c > 0 && c - 1 != me {
            return Err(lost(
                peers,
                c - 1,
                NetError::Lost(format!("rank {q} found its process gone during {}", what())),
            ));
        }
        return Err(Error::System(format!(
            "{}: rank {q} failed to copy its part (its log says why); the result is undefined",
            what()
        )));
    }
    Ok(Outcome::Done(moved as u64))
}

/// `off..off + len` of every buffer.
fn subs(bufs: &[Buf], off: usize, len: usize) -> Result<Vec<Buf>> {
    bufs.iter().map(|b| b.sub(off, len)).collect()
}

/// Step 3 of [`run`]: this rank's share of the data movement; the bytes it read from or wrote
/// to peers' memory.
fn move_data(
    ctx: &PlanCtx,
    bufs: &[RawBuf; 2],
    sends: &[Buf],
    recvs: &[Buf],
    c: usize,
    w: &mut Watch,
) -> Moved<usize> {
    let (n, me, es) = (ctx.size, ctx.rank, ctx.dtype.size());
    // All-reduce and reduce: this rank's chunk of the elements.
    let (lo, hi) = chunk(ctx.count, n, me);
    let (off, len) = (lo * es, (hi - lo) * es);
    let not_root = |x: usize| if me == ctx.root { 0 } else { x };
    // Streaming stores only for calls larger than the caches: a smaller result stays in cache
    // for whoever reads it next (measured: 1-4 MiB all-reduce 17 -> 35 GB/s with plain stores).
    let per_buffer = match ctx.kind {
        CollKind::AllReduce | CollKind::Reduce | CollKind::Broadcast => c,
        _ => c * n,
    };
    let nt = per_buffer >= NT_MIN;
    Ok(match ctx.kind {
        CollKind::AllReduce => {
            reduce_to(
                ctx,
                &subs(sends, off, len)?,
                &subs(recvs, off, len)?,
                len,
                nt,
                w,
            )?;
            2 * (n - 1) * len
        }
        CollKind::ReduceScatter => {
            let dst = [Buf::Mem(sub(&bufs[1], 0, c)?)];
            reduce_to(ctx, &subs(sends, me * c, c)?, &dst, c, nt, w)?;
            (n - 1) * c
        }
        CollKind::AllGather => {
            for (q, s) in sends.iter().enumerate() {
                s.read_into(0, bufs[1].at(q * c, c)?, c, nt, w)?;
            }
            (n - 1) * c
        }
        CollKind::Broadcast => {
            sends[ctx.root].read_into(0, bufs[1].at(0, c)?, c, nt, w)?;
            not_root(c)
        }
        CollKind::Reduce => {
            let dst = recvs[ctx.root].sub(off, len)?;
            reduce_to(ctx, &subs(sends, off, len)?, &[dst], len, nt, w)?;
            (n - 1) * len + not_root(len)
        }
        CollKind::AllToAll => {
            for (p, s) in sends.iter().enumerate() {
                s.read_into(me * c, bufs[1].at(p * c, c)?, c, nt, w)?;
            }
            (n - 1) * c
        }
        CollKind::Gather => {
            recvs[ctx.root].write_from(me * c, bufs[0].at(0, c)?, c, nt, w)?;
            not_root(c)
        }
        CollKind::Scatter => {
            sends[ctx.root].read_into(me * c, bufs[1].at(0, c)?, c, nt, w)?;
            not_root(c)
        }
        _ => 0,
    })
}
