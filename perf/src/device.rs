//! `braid-perf ... -G 1`: the collective on CUDA device buffers (cuMemAlloc'd, like
//! nccl-tests' default), enqueued on a CUDA stream through braid's device engines (NCCL, or
//! staging through pinned host memory; `BRAID_DEVICE_ENGINE` picks). Same columns as the host
//! table; time per iteration is measured from the first enqueue to the stream's completion.

use std::io::Write;
use std::time::Instant;

use braid::coll::CollKind;
use braid::cuda::driver::{self, DeviceAlloc};
use braid::cuda::{DevPtr, DeviceP2p, Stream};
use braid::{Communicator, RawColl, ReduceOp};

use crate::check::{self, PerfElem};
use crate::{Args, Coll};

/// Why `-G 1` cannot run on this machine, or what it runs on: "device 0 (NVIDIA H100 ...),
/// CUDA driver 13.0, NCCL 2.27.3".
pub(crate) fn describe() -> Result<String, String> {
    let info = braid::cuda::available().map_err(|e| format!("-G 1: {e}"))?;
    let dev = info
        .devices
        .iter()
        .find(|d| d.ordinal == info.device)
        .map(|d| d.name.clone())
        .unwrap_or_default();
    let nccl = match &info.nccl {
        Ok(n) => format!("NCCL {} ({})", n.version_string(), n.path),
        Err(why) => format!("no NCCL ({why})"),
    };
    Ok(format!(
        "device {} ({dev}), CUDA driver {}, {nccl}",
        info.device,
        driver::version_string(info.driver_version)
    ))
}

/// Host data of one buffer copied into fresh device memory.
fn upload<T: PerfElem>(host: &[T]) -> braid::Result<DeviceAlloc> {
    let bytes: &[u8] = bytemuck::cast_slice(host);
    let d = DeviceAlloc::new(bytes.len(), None)?;
    if !bytes.is_empty() {
        d.copy_from_host(bytes)?;
    }
    Ok(d)
}

fn download<T: PerfElem>(d: &DeviceAlloc, len: usize) -> braid::Result<Vec<T>> {
    let mut v = vec![T::default(); len];
    if len > 0 {
        d.copy_to_host(bytemuck::cast_slice_mut(&mut v))?;
    }
    Ok(v)
}

fn kind_of(c: Coll) -> CollKind {
    match c {
        Coll::AllReduce => CollKind::AllReduce,
        Coll::ReduceScatter => CollKind::ReduceScatter,
        Coll::AllGather => CollKind::AllGather,
        Coll::Broadcast => CollKind::Broadcast,
        Coll::Reduce => CollKind::Reduce,
        Coll::AllToAll => CollKind::AllToAll,
        Coll::Gather => CollKind::Gather,
        Coll::Scatter => CollKind::Scatter,
        Coll::SendRecv => CollKind::P2p,
    }
}

/// One device call (out-of-place: `send`, `recv`; in-place: `recv` only, with nccl.h's
/// in-place pointers).
fn call(
    comm: &Communicator,
    a: &Args,
    per: usize,
    send: &DeviceAlloc,
    recv: &DeviceAlloc,
    inplace: bool,
    stream: Stream,
) -> braid::Result<()> {
    let (n, r) = (comm.size(), comm.rank());
    let es = a.dtype.size() as u64;
    let blk = per as u64 * es;
    let (s, d): (DevPtr, DevPtr) = if !inplace {
        (send.ptr(), recv.ptr())
    } else {
        let b = recv.ptr();
        match a.coll {
            Coll::ReduceScatter => (b, b + r as u64 * blk),
            Coll::AllGather | Coll::Gather => (b + r as u64 * blk, b),
            Coll::Scatter => (b, b + r as u64 * blk),
            _ => (b, b),
        }
    };
    if a.coll == Coll::SendRecv {
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let (src, dst) = if inplace { (s, s + blk) } else { (s, d) };
        let ops = [
            DeviceP2p {
                send: true,
                buf: src,
                count: per,
                dtype: a.dtype,
                peer: next,
                tag: 0,
            },
            DeviceP2p {
                send: false,
                buf: dst,
                count: per,
                dtype: a.dtype,
                peer: prev,
                tag: 0,
            },
        ];
        // SAFETY: both buffers were allocated for (at least) these ranges and stay alive
        // until the stream is synchronised by the caller.
        return unsafe { comm.p2p_device_raw(&ops, stream) };
    }
    let c = RawColl {
        kind: kind_of(a.coll),
        dtype: a.dtype,
        op: a.op,
        count: per,
        root: a.root,
    };
    // SAFETY: the buffers were allocated with the lengths check::buffers gives this rank for
    // this collective (as coll_raw counts them) and outlive the stream synchronisation.
    unsafe { comm.coll_device_raw(c, s, d, stream) }
}

fn sync(comm: &Communicator, stream: Stream) -> braid::Result<()> {
    driver::synchronize(stream)?;
    match comm.device_error() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// One row of the table on device buffers: (mean µs per iteration over ranks, #wrong summed
/// over ranks) for out-of-place and in-place.
pub(crate) fn measure<T: PerfElem>(
    comm: &Communicator,
    a: &Args,
    per: usize,
) -> braid::Result<[(f64, u64); 2]> {
    let (n, rank) = (comm.size(), comm.rank());
    let stream = Stream::DEFAULT;
    let mut res = [(0.0f64, 0u64); 2];
    for (k, inplace) in [false, true].into_iter().enumerate() {
        let hb = check::buffers::<T>(a.coll_kind(), n, rank, per, a.root, inplace, a.op);
        let send = upload::<T>(&hb.send)?;
        let recv = upload::<T>(&hb.recv)?;
        for _ in 0..a.warmup {
            call(comm, a, per, &send, &recv, inplace, stream)?;
        }
        sync(comm, stream)?;
        comm.barrier()?;
        let t0 = Instant::now();
        for _ in 0..a.iters {
            call(comm, a, per, &send, &recv, inplace, stream)?;
        }
        sync(comm, stream)?;
        let mean_us = t0.elapsed().as_secs_f64() * 1e6 / a.iters as f64;
        // Checked run on fresh inputs.
        let send = upload::<T>(&hb.send)?;
        let recv = upload::<T>(&hb.recv)?;
        call(comm, a, per, &send, &recv, inplace, stream)?;
        sync(comm, stream)?;
        let got = download::<T>(&recv, hb.recv.len())?;
        let wrong = check::count_wrong(a.coll_kind(), n, rank, per, a.root, inplace, a.op, &got);
        let mut tmax = [0.0f64];
        comm.all_reduce(&[mean_us], &mut tmax, ReduceOp::Max)?;
        let mut wsum = [0u64];
        comm.all_reduce(&[wrong], &mut wsum, ReduceOp::Sum)?;
        res[k] = (tmax[0], wsum[0]);
    }
    Ok(res)
}

/// The buffers line of the header (rank 0).
pub(crate) fn header(out: &mut impl Write) {
    let what = describe().unwrap_or_else(|e| e);
    let _ = writeln!(
        out,
        "# buffers: device (-G 1: cuMemAlloc, stream-ordered on the default stream), {what}"
    );
}

/// The engine line after the table (rank 0): `# device engine: nccl` or `staging`.
pub(crate) fn footer(comm: &Communicator, out: &mut impl Write) {
    let _ = writeln!(
        out,
        "# device engine: {}",
        comm.device_engine().unwrap_or_else(|| "none".into())
    );
}
