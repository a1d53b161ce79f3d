//! Single-copy collectives between ranks of one host whose buffers lie in shared regions
//! ([`crate::shared::SharedBuf`]), like NCCL with registered buffers (`-R 1`): all-reduce,
//! reduce-scatter, all-gather and broadcast.
//!
//! Steps (n ranks):
//! 1. Handshake: every rank sends every peer a descriptor of its send and receive buffers
//!    (region, offset, length), or "not registered" / "not connected through shared memory".
//!    Every rank sees all descriptors, so all agree: if any rank said "not", all run the usual
//!    plan. Only the buffers a peer touches must be registered (below).
//! 2. Each rank maps the peers' regions it needs (cached) and tells every peer whether that
//!    worked; any failure: all run the usual plan (nothing was written yet; one log line).
//!    After this exchange every rank is inside the call.
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
//! 4. Barrier (nobody reads or writes this rank's buffers any more): return.
//!
//! Busbw factors as for the ring algorithms. The handshakes and the barrier are small
//! messages over the existing connections, so a peer that dies or aborts meanwhile is reported
//! as usual (executor waits, `BRAID_TIMEOUT`); memory of a dead peer stays mapped (and valid)
//! until the cache drops it.

use braid_transport::region::{RegionDesc, Regions, RemoteMaps, DESC_LEN};

use crate::coll::{Algo, CollKind, PlanCtx};
use crate::error::Result;
use crate::exec::{Exec, P2pOp, Peer, Sig};
use crate::mem::{self, RawBuf};
use crate::reduce;

/// Largest communicator that tries the single-copy paths (peer mappings are cached per region).
pub(crate) const MAX_RANKS: usize = 8;

const TOKEN: usize = 24 + 2 * DESC_LEN;

/// Bytes reduced per step (the scratch block and the source blocks stay in cache).
const BLOCK: usize = 64 << 10;

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
        });
        ops.push(P2pOp {
            send: false,
            peer: p,
            buf: RawBuf::from_mut(t),
            sig,
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
        CollKind::ReduceScatter | CollKind::AllGather => (true, false),
        CollKind::Broadcast => (rank == root, false),
        _ => return None,
    })
}

/// Whether `kind` has a single-copy path.
pub(crate) fn supports(kind: CollKind) -> bool {
    needs(kind, 0, 0).is_some()
}

/// Reduces the equal-length `srcs` block by block into a scratch block and writes each block
/// to every one of `dsts` (streaming stores, or plain ones where a destination is also a
/// source).
fn reduce_to(ctx: &PlanCtx, srcs: &[RawBuf], dsts: &[RawBuf], len: usize) -> Result<()> {
    let es = ctx.dtype.size();
    let step = (BLOCK / es).max(1) * es;
    let mut tmp = vec![0u64; step.div_ceil(8)];
    let tmpb: &mut [u8] = bytemuck::cast_slice_mut(&mut tmp);
    let tmp = RawBuf::from_mut(tmpb);
    let mut off = 0;
    while off < len {
        let l = step.min(len - off);
        let t = tmp.at(0, l)?;
        let a = srcs[0].at(off, l)?;
        let b = srcs[1].at(off, l)?;
        mem::with3(t, a, b, l, |d, x, y| {
            reduce::reduce_into(ctx.dtype, ctx.op, d, x, y)
        })??;
        for s in srcs.iter().skip(2) {
            let x = s.at(off, l)?;
            mem::with2(t, x, l, |d, x| {
                reduce::reduce_inplace(ctx.dtype, ctx.op, d, x)
            })??;
        }
        mem::with_mut(t, l, |d| reduce::finalize(ctx.dtype, ctx.op, d, ctx.size))?;
        for d in dsts {
            let d = d.at(off, l)?;
            let mut cached = false;
            for s in srcs {
                cached |= std::ptr::eq(d, s.at(off, l)?);
            }
            if cached {
                // In place: the block was just read, so it is in this CPU's cache and plain
                // stores hit it (streaming stores to cached lines are slower).
                mem::copy(d, t, l);
            } else {
                mem::with2(d, t, l, braid_transport::region::stream_copy)?;
            }
        }
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
/// `local_ok`: this rank reaches every peer through shared memory. `sig`: the collective's
/// signature (its `seq`); the handshakes are told apart by `slice_kib`.
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
) -> Result<Outcome> {
    let n = ctx.size;
    let me = ctx.rank;
    let es = ctx.dtype.size();
    let c = ctx.count * es;
    let Some(mine_needed) = needs(ctx.kind, me, ctx.root) else {
        return Ok(Outcome::Fallback);
    };
    let round = |k: u32| Sig {
        algo: Algo::Direct,
        slice_kib: 0xD1_0000 | k,
        ..sig
    };
    // 1. Descriptors of what the peers need: [ok, 0.., send len @8, recv len @16, descs].
    let describe = |b: &RawBuf| -> Option<RegionDesc> {
        let p = b.at(0, b.len()).ok()?;
        regions.lookup(p, b.len())
    };
    let mut tok = [0u8; TOKEN];
    let sd = if mine_needed.0 {
        describe(&bufs[0])
    } else {
        None
    };
    let rd = if mine_needed.1 {
        describe(&bufs[1])
    } else {
        None
    };
    if local_ok && (sd.is_some() || !mine_needed.0) && (rd.is_some() || !mine_needed.1) {
        tok[0] = 1;
        tok[8..16].copy_from_slice(&(bufs[0].len() as u64).to_le_bytes());
        tok[16..24].copy_from_slice(&(bufs[1].len() as u64).to_le_bytes());
        if let Some(d) = sd {
            tok[24..24 + DESC_LEN].copy_from_slice(&d.encode());
        }
        if let Some(d) = rd {
            tok[24 + DESC_LEN..].copy_from_slice(&d.encode());
        }
    }
    let mut all = vec![vec![0u8; TOKEN]; n];
    exchange(exec, peers, ctx, round(1), &tok, &mut all)?;
    if all.iter().any(|t| t[0] != 1) {
        return Ok(Outcome::Fallback);
    }
    // 2. Map the peers' buffers this rank needs.
    let mut sends = vec![RawBuf::empty(); n];
    let mut recvs = vec![RawBuf::empty(); n];
    let mut failed: Option<String> = None;
    for (p, t) in all.iter().enumerate() {
        if p == me {
            sends[p] = bufs[0];
            recvs[p] = bufs[1];
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
        for (need, len, at, slot, what) in [
            (ns, u64at(8), 24, &mut sends[p], "send"),
            (nr, u64at(16), 24 + DESC_LEN, &mut recvs[p], "receive"),
        ] {
            if !need || failed.is_some() {
                continue;
            }
            let Some(d) = RegionDesc::decode(&t[at..at + DESC_LEN]) else {
                failed = Some(format!("rank {p} sent a malformed descriptor"));
                continue;
            };
            match remote.resolve(&d, len) {
                // SAFETY: resolve returned a pointer to `len` readable and writable bytes of
                // a mapping that stays in the cache for this call (at most 2(n-1) <= 14
                // regions are resolved per call, below the cache's capacity, and a region in
                // use is never swept: its owner is inside this call and keeps it alive). Send
                // views are only read; of a receive view this rank writes only its own chunk,
                // which no other rank touches during the call.
                Ok(x) => *slot = unsafe { RawBuf::from_raw(x, len) },
                Err(e) => failed = Some(format!("mapping rank {p}'s {what} buffer: {e}")),
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
    let moved = match ctx.kind {
        CollKind::AllReduce => {
            let (lo, hi) = chunk(ctx.count, n, me);
            let (off, len) = (lo * es, (hi - lo) * es);
            let srcs = sends
                .iter()
                .map(|b| sub(b, off, len))
                .collect::<Result<Vec<_>>>()?;
            let dsts = recvs
                .iter()
                .map(|b| sub(b, off, len))
                .collect::<Result<Vec<_>>>()?;
            reduce_to(ctx, &srcs, &dsts, len)?;
            2 * (n - 1) * len
        }
        CollKind::ReduceScatter => {
            let srcs = sends
                .iter()
                .map(|b| sub(b, me * c, c))
                .collect::<Result<Vec<_>>>()?;
            reduce_to(ctx, &srcs, &[sub(&bufs[1], 0, c)?], c)?;
            (n - 1) * c
        }
        CollKind::AllGather => {
            for (q, s) in sends.iter().enumerate() {
                let d = bufs[1].at(q * c, c)?;
                let s = s.at(0, c)?;
                if !std::ptr::eq(d, s) {
                    mem::with2(d, s, c, braid_transport::region::stream_copy)?;
                }
            }
            (n - 1) * c
        }
        CollKind::Broadcast => {
            let d = bufs[1].at(0, c)?;
            let s = sends[ctx.root].at(0, c)?;
            if !std::ptr::eq(d, s) {
                mem::with2(d, s, c, braid_transport::region::stream_copy)?;
            }
            if me == ctx.root {
                0
            } else {
                c
            }
        }
        _ => 0,
    };
    // 4. Nobody reads or writes this rank's buffers any more.
    exchange(exec, peers, ctx, round(3), &[3u8; 8], &mut oks)?;
    Ok(Outcome::Done(moved as u64))
}
