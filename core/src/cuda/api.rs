//! The device forms of the communicator API: collectives and point-to-point on device memory,
//! enqueued on a CUDA stream (stream-ordered, as in NCCL).

use super::{DevPtr, DeviceBuf, Stream};
use crate::coll::CollKind;
use crate::comm::{Communicator, RawColl};
use crate::error::{Error, Result};
use crate::types::{DataType, ReduceOp};

/// One point-to-point operation on device memory ([`Communicator::p2p_device_raw`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceP2p {
    /// Send (true) or receive.
    pub send: bool,
    /// The device buffer.
    pub buf: DevPtr,
    /// Element count.
    pub count: usize,
    /// Element type.
    pub dtype: DataType,
    /// The other rank.
    pub peer: usize,
    /// Tag (must match the other side's).
    pub tag: u64,
}

impl Communicator {
    /// Enqueues a collective on device buffers on `stream` and returns at once (NCCL's
    /// semantics: completion is observed through the stream; an error found after the call
    /// returned is reported by [`Communicator::device_error`] and by the next device call).
    /// Buffer lengths and in-place rules are those of [`Communicator::coll_raw`].
    ///
    /// # Safety
    /// `send` and `recv` must be device (or managed) memory valid for the lengths the
    /// collective implies on this rank until the work completes on `stream`; `stream` must be
    /// a live stream of the current context (or the default stream).
    pub unsafe fn coll_device_raw(
        &self,
        c: RawColl,
        send: DevPtr,
        recv: DevPtr,
        stream: Stream,
    ) -> Result<()> {
        self.device_slot().coll(self, c, send, recv, stream)
    }

    /// Enqueues a group of point-to-point operations on device buffers on `stream`.
    ///
    /// # Safety
    /// As [`Communicator::coll_device_raw`], for every buffer of the group.
    pub unsafe fn p2p_device_raw(&self, ops: &[DeviceP2p], stream: Stream) -> Result<()> {
        self.device_slot().p2p(self, ops, stream)
    }

    /// Sets up the device engines of the current view now (collective: every rank calls it,
    /// like `ncclCommInitRank`) and returns the engine chosen ("nccl" or "staging"). Device
    /// calls do this themselves at the first call of each view, which must then be made on
    /// every rank; an application whose first device call after a view change is a
    /// point-to-point between some ranks calls this first on all of them.
    pub fn prepare_device(&self) -> Result<String> {
        super::driver::driver()?;
        self.device_slot().prepare(self)?;
        Ok(self.device_engine().unwrap_or_default())
    }

    /// The engine of this communicator's device calls on its current view ("nccl" or
    /// "staging"), once the first device call chose it.
    pub fn device_engine(&self) -> Option<String> {
        self.device_slot().engine_name()
    }

    /// The first error of a device call that failed after it returned (on its stream), if
    /// any (as `ncclCommGetAsyncError`); it is sticky.
    pub fn device_error(&self) -> Option<Error> {
        self.device_slot().async_error()
    }

    /// All-reduce of `send` into `recv` (device buffers of the same length, a multiple of
    /// `dtype`'s size; the same buffer for in place), enqueued on `stream`.
    pub fn all_reduce_device(
        &self,
        send: &DeviceBuf,
        recv: &DeviceBuf,
        dtype: DataType,
        op: ReduceOp,
        stream: &Stream,
    ) -> Result<()> {
        let count = elems("all_reduce_device", "send", send, dtype)?;
        same_len("all_reduce_device", send, recv)?;
        self.device_coll(CollKind::AllReduce, send, recv, dtype, op, count, 0, stream)
    }

    /// Reduce-scatter: rank r gets in `recv` block r of the reduction of every rank's `send`
    /// (`send` holds size() blocks of `recv`'s length), enqueued on `stream`.
    pub fn reduce_scatter_device(
        &self,
        send: &DeviceBuf,
        recv: &DeviceBuf,
        dtype: DataType,
        op: ReduceOp,
        stream: &Stream,
    ) -> Result<()> {
        let count = elems("reduce_scatter_device", "recv", recv, dtype)?;
        blocks("reduce_scatter_device", "send", send, recv, self.size())?;
        self.device_coll(
            CollKind::ReduceScatter,
            send,
            recv,
            dtype,
            op,
            count,
            0,
            stream,
        )
    }

    /// All-gather: `recv` (size() blocks of `send`'s length) gets every rank's `send` in rank
    /// order, enqueued on `stream`.
    pub fn all_gather_device(
        &self,
        send: &DeviceBuf,
        recv: &DeviceBuf,
        dtype: DataType,
        stream: &Stream,
    ) -> Result<()> {
        let count = elems("all_gather_device", "send", send, dtype)?;
        blocks("all_gather_device", "recv", recv, send, self.size())?;
        self.device_coll(
            CollKind::AllGather,
            send,
            recv,
            dtype,
            ReduceOp::Sum,
            count,
            0,
            stream,
        )
    }

    /// Broadcast of the root's `buf` into every rank's `buf` (in place), enqueued on `stream`.
    pub fn broadcast_device(
        &self,
        buf: &DeviceBuf,
        dtype: DataType,
        root: usize,
        stream: &Stream,
    ) -> Result<()> {
        let count = elems("broadcast_device", "buf", buf, dtype)?;
        self.device_coll(
            CollKind::Broadcast,
            buf,
            buf,
            dtype,
            ReduceOp::Sum,
            count,
            root,
            stream,
        )
    }

    /// Reduce to the root: the root's `recv` gets the reduction of every rank's `send` (same
    /// lengths; `recv` is ignored elsewhere), enqueued on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn reduce_device(
        &self,
        send: &DeviceBuf,
        recv: &DeviceBuf,
        dtype: DataType,
        op: ReduceOp,
        root: usize,
        stream: &Stream,
    ) -> Result<()> {
        let count = elems("reduce_device", "send", send, dtype)?;
        if self.rank() == root {
            same_len("reduce_device", send, recv)?;
        }
        self.device_coll(CollKind::Reduce, send, recv, dtype, op, count, root, stream)
    }

    /// All-to-all: block j of this rank's `send` lands in block r (this rank) of rank j's
    /// `recv` (both size() equal blocks), enqueued on `stream`.
    pub fn all_to_all_device(
        &self,
        send: &DeviceBuf,
        recv: &DeviceBuf,
        dtype: DataType,
        stream: &Stream,
    ) -> Result<()> {
        elems("all_to_all_device", "send", send, dtype)?;
        same_len("all_to_all_device", send, recv)?;
        let n = self.size();
        let all = send.len() / dtype.size();
        if all % n != 0 {
            return Err(Error::InvalidArgument(format!(
                "all_to_all_device: {all} elements are not a multiple of {n} ranks"
            )));
        }
        self.device_coll(
            CollKind::AllToAll,
            send,
            recv,
            dtype,
            ReduceOp::Sum,
            all / n,
            0,
            stream,
        )
    }

    /// Sends `buf` to rank `peer` with `tag`, enqueued on `stream` (the receive names this
    /// rank, the tag and the length).
    pub fn send_device(
        &self,
        buf: &DeviceBuf,
        dtype: DataType,
        peer: usize,
        tag: u64,
        stream: &Stream,
    ) -> Result<()> {
        self.p2p_one("send_device", true, buf, dtype, peer, tag, stream)
    }

    /// Receives into `buf` from rank `peer` with `tag`, enqueued on `stream`.
    pub fn recv_device(
        &self,
        buf: &DeviceBuf,
        dtype: DataType,
        peer: usize,
        tag: u64,
        stream: &Stream,
    ) -> Result<()> {
        self.p2p_one("recv_device", false, buf, dtype, peer, tag, stream)
    }

    #[allow(clippy::too_many_arguments)]
    fn p2p_one(
        &self,
        func: &str,
        send: bool,
        buf: &DeviceBuf,
        dtype: DataType,
        peer: usize,
        tag: u64,
        stream: &Stream,
    ) -> Result<()> {
        let op = DeviceP2p {
            send,
            buf: buf.ptr(),
            count: elems(func, "buf", buf, dtype)?,
            dtype,
            peer,
            tag,
        };
        // SAFETY: DeviceBuf's contract (from_raw) covers validity until stream completion.
        unsafe { self.p2p_device_raw(&[op], *stream) }
    }

    #[allow(clippy::too_many_arguments)]
    fn device_coll(
        &self,
        kind: CollKind,
        send: &DeviceBuf,
        recv: &DeviceBuf,
        dtype: DataType,
        op: ReduceOp,
        count: usize,
        root: usize,
        stream: &Stream,
    ) -> Result<()> {
        let c = RawColl {
            kind,
            dtype,
            op,
            count,
            root,
        };
        // SAFETY: DeviceBuf's contract (from_raw) covers validity until stream completion;
        // the lengths were checked against what the collective implies.
        unsafe { self.coll_device_raw(c, send.ptr(), recv.ptr(), *stream) }
    }
}

/// Elements of `dtype` in `b` (its length must be a multiple of the element size).
fn elems(func: &str, name: &str, b: &DeviceBuf, dtype: DataType) -> Result<usize> {
    let es = dtype.size();
    if b.len() % es != 0 {
        return Err(Error::InvalidArgument(format!(
            "{func}: {name} is {} bytes, not a multiple of {es} ({})",
            b.len(),
            dtype.name()
        )));
    }
    Ok(b.len() / es)
}

fn same_len(func: &str, a: &DeviceBuf, b: &DeviceBuf) -> Result<()> {
    if a.len() != b.len() {
        return Err(Error::InvalidArgument(format!(
            "{func}: send is {} bytes and recv {} bytes; they must be equal",
            a.len(),
            b.len()
        )));
    }
    Ok(())
}

/// `big` must hold `n` blocks of `small`'s length.
fn blocks(func: &str, name: &str, big: &DeviceBuf, small: &DeviceBuf, n: usize) -> Result<()> {
    if Some(big.len()) != small.len().checked_mul(n) {
        return Err(Error::InvalidArgument(format!(
            "{func}: {name} is {} bytes; it must hold {n} ranks x {} bytes",
            big.len(),
            small.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::membership::Coordinator;
    use braid_transport::mem::MemFabric;
    use std::time::Duration;

    #[test]
    fn typed_device_calls_check_lengths_then_say_why_without_a_driver() {
        if super::super::driver::driver().is_ok() {
            eprintln!("a CUDA driver is present: the no-driver checks do not apply here");
            return;
        }
        let coord = Coordinator::bind("127.0.0.1:0").expect("coordinator");
        let cfg = Config {
            coordinator: Some(coord.local_addr().to_string()),
            world_size: Some(1),
            rank: Some(0),
            timeout: Duration::from_secs(20),
            init_timeout: Duration::from_secs(20),
            ..Config::default()
        };
        let comm = Communicator::init_in_process(cfg, MemFabric::new()).expect("init");
        // SAFETY: never dereferenced: every call fails before touching memory.
        let (a, b, odd) = unsafe {
            (
                DeviceBuf::from_raw(0x1000, 64, 0),
                DeviceBuf::from_raw(0x2000, 32, 0),
                DeviceBuf::from_raw(0x3000, 6, 0),
            )
        };
        let s = Stream::DEFAULT;
        let e = comm
            .all_reduce_device(&a, &b, DataType::F32, ReduceOp::Sum, &s)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let e = comm
            .all_reduce_device(&odd, &odd, DataType::F32, ReduceOp::Sum, &s)
            .unwrap_err();
        assert!(e.to_string().contains("not a multiple of 4"), "{e}");
        let e = comm
            .all_gather_device(&a, &b, DataType::F32, &s)
            .unwrap_err();
        assert!(e.to_string().contains("must hold 1 ranks"), "{e}");
        for r in [
            comm.all_reduce_device(&a, &a, DataType::F32, ReduceOp::Sum, &s),
            comm.broadcast_device(&a, DataType::F32, 0, &s),
            comm.all_to_all_device(&a, &a, DataType::F32, &s),
            comm.send_device(&a, DataType::F32, 0, 1, &s),
        ] {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("no CUDA driver (libcuda.so.1 not found)"), "{e}");
        }
        assert!(comm.device_error().is_none());
    }
}
