//! The typed API: blocking and non-blocking collectives and point-to-point on slices and
//! owned vectors.

use crate::coll::{Algo, CollKind};
use crate::error::Result;
use crate::exec::{P2pOp, Sig};
use crate::matcher::ANY_SOURCE;
use crate::mem::RawBuf;
use crate::types::{DataType, Element, ReduceOp};

use super::progress::{Handle, JobDesc};
use super::raw::AnySource;
use super::{bytes_of, bytes_of_mut, invalid, sub, Communicator};

impl Communicator {
    pub(super) fn check_root(&self, root: usize) -> Result<()> {
        if root >= self.size() {
            return invalid(format!(
                "root {root} is not a rank of this communicator of {} ranks",
                self.size()
            ));
        }
        Ok(())
    }

    fn coll<T: Element>(
        &self,
        kind: CollKind,
        op: ReduceOp,
        count: usize,
        root: usize,
        send: RawBuf,
        recv: RawBuf,
    ) -> Result<()> {
        self.run_blocking(
            JobDesc::Coll {
                kind,
                dtype: T::DTYPE,
                op,
                count,
                root,
            },
            [send, recv],
        )
    }

    /// Splits an in-place buffer of `n` equal blocks: (block count, whole buffer, this rank's
    /// block).
    fn own_block<T: Element>(&self, what: &str, buf: &mut [T]) -> Result<(usize, RawBuf, RawBuf)> {
        let n = self.size();
        if buf.len() % n != 0 {
            return invalid(format!(
                "{what}: {} elements are not a multiple of {n} ranks",
                buf.len()
            ));
        }
        let c = buf.len() / n;
        let es = T::DTYPE.size();
        let all = RawBuf::from_mut(bytes_of_mut(buf));
        let mine = sub(all, self.rank() * c * es, c * es)?;
        Ok((c, all, mine))
    }

    // ---- collectives -----------------------------------------------------------------

    /// All-reduce: `recv[i] = send_0[i] ⊕ … ⊕ send_{n-1}[i]` on every rank.
    ///
    /// Errors: `send.len() != recv.len()`.
    pub fn all_reduce<T: Element>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        if send.len() != recv.len() {
            return invalid(format!(
                "all_reduce: send has {} elements, recv {}",
                send.len(),
                recv.len()
            ));
        }
        let n = send.len();
        self.coll::<T>(
            CollKind::AllReduce,
            op,
            n,
            0,
            RawBuf::from_slice(bytes_of(send)),
            RawBuf::from_mut(bytes_of_mut(recv)),
        )
    }

    /// In-place all-reduce of `buf`.
    pub fn all_reduce_inplace<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let n = buf.len();
        let b = RawBuf::from_mut(bytes_of_mut(buf));
        self.coll::<T>(CollKind::AllReduce, op, n, 0, b, b)
    }

    /// Reduce-scatter: `send` holds `n` blocks of `recv.len()` elements; rank r receives the
    /// reduction of everyone's block r.
    ///
    /// Errors: `send.len() != recv.len() * n`.
    pub fn reduce_scatter<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let n = self.size();
        if send.len() != recv.len() * n {
            return invalid(format!(
                "reduce_scatter: send has {} elements, expected recv ({}) × ranks ({n})",
                send.len(),
                recv.len()
            ));
        }
        let c = recv.len();
        self.coll::<T>(
            CollKind::ReduceScatter,
            op,
            c,
            0,
            RawBuf::from_slice(bytes_of(send)),
            RawBuf::from_mut(bytes_of_mut(recv)),
        )
    }

    /// In-place reduce-scatter: `buf` holds `n` blocks; the result lands in this rank's block
    /// (`buf[rank*c..(rank+1)*c]`), the other blocks are left unspecified.
    ///
    /// Errors: `buf.len()` not a multiple of the rank count.
    pub fn reduce_scatter_inplace<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let (c, all, mine) = self.own_block("reduce_scatter_inplace", buf)?;
        self.coll::<T>(CollKind::ReduceScatter, op, c, 0, all, mine)
    }

    /// All-gather: `recv` gets every rank's `send`, in rank order.
    ///
    /// Errors: `recv.len() != send.len() * n`.
    pub fn all_gather<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let n = self.size();
        if recv.len() != send.len() * n {
            return invalid(format!(
                "all_gather: recv has {} elements, expected send ({}) × ranks ({n})",
                recv.len(),
                send.len()
            ));
        }
        self.coll::<T>(
            CollKind::AllGather,
            ReduceOp::Sum,
            send.len(),
            0,
            RawBuf::from_slice(bytes_of(send)),
            RawBuf::from_mut(bytes_of_mut(recv)),
        )
    }

    /// In-place all-gather: this rank's contribution is already in its block of `buf`.
    ///
    /// Errors: `buf.len()` not a multiple of the rank count.
    pub fn all_gather_inplace<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        let (c, all, mine) = self.own_block("all_gather_inplace", buf)?;
        self.coll::<T>(CollKind::AllGather, ReduceOp::Sum, c, 0, mine, all)
    }

    /// In-place broadcast: the root's `buf` is copied into every rank's `buf`.
    ///
    /// Errors: root out of range.
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.check_root(root)?;
        let n = buf.len();
        let b = RawBuf::from_mut(bytes_of_mut(buf));
        self.coll::<T>(CollKind::Broadcast, ReduceOp::Sum, n, root, b, b)
    }

    /// Out-of-place broadcast: the root's `send` lands in every rank's `recv` (`send` is
    /// significant only at the root and may be empty elsewhere).
    ///
    /// Errors: root out of range; at the root `send.len() != recv.len()`.
    pub fn broadcast_from<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        root: usize,
    ) -> Result<()> {
        self.check_root(root)?;
        if self.rank() == root && send.len() != recv.len() {
            return invalid(format!(
                "broadcast: root send has {} elements, recv {}",
                send.len(),
                recv.len()
            ));
        }
        let n = recv.len();
        self.coll::<T>(
            CollKind::Broadcast,
            ReduceOp::Sum,
            n,
            root,
            RawBuf::from_slice(bytes_of(send)),
            RawBuf::from_mut(bytes_of_mut(recv)),
        )
    }

    /// Reduce to the root: the root's `recv` gets the reduction of every rank's `send`
    /// (`recv` is significant only at the root and may be empty elsewhere).
    ///
    /// Errors: root out of range; at the root `send.len() != recv.len()`.
    pub fn reduce<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        self.check_root(root)?;
        if self.rank() == root && send.len() != recv.len() {
            return invalid(format!(
                "reduce: send has {} elements, root recv {}",
                send.len(),
                recv.len()
            ));
        }
        let n = send.len();
        self.coll::<T>(
            CollKind::Reduce,
            op,
            n,
            root,
            RawBuf::from_slice(bytes_of(send)),
            RawBuf::from_mut(bytes_of_mut(recv)),
        )
    }

    /// In-place reduce: the root's `buf` is replaced by the reduction; other ranks' `buf` is
    /// left unchanged.
    pub fn reduce_inplace<T: Element>(
        &self,
        buf: &mut [T],
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        self.check_root(root)?;
        let n = buf.len();
        let b = RawBuf::from_mut(bytes_of_mut(buf));
        self.coll::<T>(CollKind::Reduce, op, n, root, b, b)
    }

    /// All-to-all: block j of `send` goes to rank j; block j of `recv` comes from rank j
    /// (blocks of `send.len() / n` elements).
    ///
    /// Errors: lengths differ or are not a multiple of the rank count.
    pub fn all_to_all<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let n = self.size();
        if send.len() != recv.len() || send.len() % n != 0 {
            return invalid(format!(
                "all_to_all: send {} and recv {} elements must be equal multiples of {n} ranks",
                send.len(),
                recv.len()
            ));
        }
        self.coll::<T>(
            CollKind::AllToAll,
            ReduceOp::Sum,
            send.len() / n,
            0,
            RawBuf::from_slice(bytes_of(send)),
            RawBuf::from_mut(bytes_of_mut(recv)),
        )
    }

    /// In-place all-to-all on `buf` (uses a scratch copy of one rank's share).
    pub fn all_to_all_inplace<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        let n = self.size();
        if buf.len() % n != 0 {
            return invalid(format!(
                "all_to_all_inplace: {} elements are not a multiple of {n} ranks",
                buf.len()
            ));
        }
        let c = buf.len() / n;
        let b = RawBuf::from_mut(bytes_of_mut(buf));
        self.coll::<T>(CollKind::AllToAll, ReduceOp::Sum, c, 0, b, b)
    }

    /// Gather to the root: block r of the root's `recv` gets rank r's `send` (`recv` is
    /// significant only at the root).
    ///
    /// Errors: root out of range; at the root `recv.len() != send.len() * n`.
    pub fn gather<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<()> {
        self.check_root(root)?;
        let n = self.size();
        if self.rank() == root && recv.len() != send.len() * n {
            return invalid(format!(
                "gather: root recv has {} elements, expected send ({}) × ranks ({n})",
                recv.len(),
                send.len()
            ));
        }
        self.coll::<T>(
            CollKind::Gather,
            ReduceOp::Sum,
            send.len(),
            root,
            RawBuf::from_slice(bytes_of(send)),
            RawBuf::from_mut(bytes_of_mut(recv)),
        )
    }

    /// In-place gather: `buf` has `n` blocks on every rank; rank r's contribution is its block
    /// r; the root's `buf` ends up with every block.
    pub fn gather_inplace<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.check_root(root)?;
        let (c, all, mine) = self.own_block("gather_inplace", buf)?;
        self.coll::<T>(CollKind::Gather, ReduceOp::Sum, c, root, mine, all)
    }

    /// Scatter from the root: rank r's `recv` gets block r of the root's `send` (`send` is
    /// significant only at the root).
    ///
    /// Errors: root out of range; at the root `send.len() != recv.len() * n`.
    pub fn scatter<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<()> {
        self.check_root(root)?;
        let n = self.size();
        if self.rank() == root && send.len() != recv.len() * n {
            return invalid(format!(
                "scatter: root send has {} elements, expected recv ({}) × ranks ({n})",
                send.len(),
                recv.len()
            ));
        }
        self.coll::<T>(
            CollKind::Scatter,
            ReduceOp::Sum,
            recv.len(),
            root,
            RawBuf::from_slice(bytes_of(send)),
            RawBuf::from_mut(bytes_of_mut(recv)),
        )
    }

    /// In-place scatter: `buf` has `n` blocks on every rank; rank r's block r receives block r
    /// of the root's `buf`.
    pub fn scatter_inplace<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.check_root(root)?;
        let (c, all, mine) = self.own_block("scatter_inplace", buf)?;
        self.coll::<T>(CollKind::Scatter, ReduceOp::Sum, c, root, all, mine)
    }

    /// Barrier: returns once every rank has entered it.
    pub fn barrier(&self) -> Result<()> {
        self.run_blocking(
            JobDesc::Coll {
                kind: CollKind::Barrier,
                dtype: DataType::U8,
                op: ReduceOp::Sum,
                count: 0,
                root: 0,
            },
            [RawBuf::empty(), RawBuf::empty()],
        )
    }

    // ---- point-to-point ----------------------------------------------------------------

    pub(super) fn check_peer(&self, peer: usize) -> Result<()> {
        if peer >= self.size() || peer == self.rank() {
            return invalid(format!(
                "peer {peer} is not another rank of this communicator (rank {} of {})",
                self.rank(),
                self.size()
            ));
        }
        Ok(())
    }

    pub(super) fn p2p_sig<T: Element>(count: usize, tag: u64) -> Sig {
        Self::p2p_sig_of(T::DTYPE, count, tag)
    }

    /// The signature of a point-to-point message of `count` elements of `dtype` with `tag`.
    pub(super) fn p2p_sig_of(dtype: DataType, count: usize, tag: u64) -> Sig {
        Sig {
            kind: CollKind::P2p,
            dtype,
            op: ReduceOp::Sum,
            algo: Algo::P2p,
            root: 0,
            slice_kib: 0,
            count: count as u64,
            seq: tag,
        }
    }

    /// Sends `buf` to `peer` with `tag`. A receive takes the first message from its source
    /// (or from any rank, [`Communicator::recv_any`]) with its tag, whatever was sent before it
    /// with other tags (as MPI and Gloo match); messages with the same tag match in order. The
    /// receiver's type and count must match the sender's (else both sides get an error naming
    /// both).
    pub fn send<T: Element>(&self, buf: &[T], peer: usize, tag: u64) -> Result<()> {
        self.check_peer(peer)?;
        let op = P2pOp {
            send: true,
            peer,
            buf: RawBuf::from_slice(bytes_of(buf)),
            sig: Self::p2p_sig::<T>(buf.len(), tag),
            source: None,
        };
        self.run_blocking(JobDesc::P2p(vec![op]), [RawBuf::empty(), RawBuf::empty()])
    }

    /// Receives into `buf` from `peer` with `tag` (see [`Communicator::send`]).
    pub fn recv<T: Element>(&self, buf: &mut [T], peer: usize, tag: u64) -> Result<()> {
        self.check_peer(peer)?;
        let n = buf.len();
        let op = P2pOp {
            send: false,
            peer,
            buf: RawBuf::from_mut(bytes_of_mut(buf)),
            sig: Self::p2p_sig::<T>(n, tag),
            source: None,
        };
        self.run_blocking(JobDesc::P2p(vec![op]), [RawBuf::empty(), RawBuf::empty()])
    }

    /// Receives into `buf` the first message with `tag` from any rank (MPI's
    /// `MPI_ANY_SOURCE`, torch's `recv(src=None)`) and returns the rank it came from. Needs
    /// connections that can look at a message before receiving it (tcp, shm; not ib).
    pub fn recv_any<T: Element>(&self, buf: &mut [T], tag: u64) -> Result<usize> {
        let src = AnySource::new();
        let op = P2pOp {
            send: false,
            peer: ANY_SOURCE,
            buf: RawBuf::from_mut(bytes_of_mut(buf)),
            sig: Self::p2p_sig::<T>(buf.len(), tag),
            source: Some(src.slot()),
        };
        self.run_blocking(JobDesc::P2p(vec![op]), [RawBuf::empty(), RawBuf::empty()])?;
        src.rank()
            .ok_or_else(|| crate::Error::Internal("a completed receive without a source".into()))
    }

    /// Non-blocking [`Communicator::recv_any`] into `buf` (its length is the count); the
    /// handle returns the buffer and the rank the message came from.
    pub fn irecv_any<T: Element>(
        &self,
        mut buf: Vec<T>,
        tag: u64,
    ) -> Result<Handle<(Vec<T>, usize)>> {
        let src = AnySource::new();
        let op = P2pOp {
            send: false,
            peer: ANY_SOURCE,
            buf: RawBuf::from_mut(bytes_of_mut(&mut buf)),
            sig: Self::p2p_sig::<T>(buf.len(), tag),
            source: Some(src.slot()),
        };
        self.submit(
            JobDesc::P2p(vec![op]),
            [RawBuf::empty(), RawBuf::empty()],
            Box::new(buf),
            move |k| {
                let b = k.downcast::<Vec<T>>().map(|b| *b).unwrap_or_default();
                (b, src.rank().unwrap_or(usize::MAX))
            },
        )
    }

    /// Starts a group of point-to-point operations: post many sends and receives, then
    /// [`Group::run`] waits for all of them, so exchange patterns cannot deadlock.
    pub fn group(&self) -> Group<'_, '_> {
        Group {
            comm: self,
            ops: Vec::new(),
            _bufs: std::marker::PhantomData,
        }
    }

    // ---- non-blocking forms ----------------------------------------------------------

    /// Non-blocking in-place all-reduce; the handle returns the buffer.
    pub fn iall_reduce<T: Element>(&self, mut buf: Vec<T>, op: ReduceOp) -> Result<Handle<Vec<T>>> {
        let n = buf.len();
        let b = RawBuf::from_mut(bytes_of_mut(&mut buf));
        self.submit_coll::<T, _>(CollKind::AllReduce, op, n, 0, [b, b], buf, |v| v)
    }

    /// Non-blocking reduce-scatter; the handle returns this rank's reduced block.
    pub fn ireduce_scatter<T: Element>(
        &self,
        send: Vec<T>,
        op: ReduceOp,
    ) -> Result<Handle<Vec<T>>> {
        let n = self.size();
        if send.len() % n != 0 {
            return invalid(format!(
                "reduce_scatter: {} elements are not a multiple of {n} ranks",
                send.len()
            ));
        }
        let c = send.len() / n;
        let mut recv = vec![T::default(); c];
        let s = RawBuf::from_slice(bytes_of(&send));
        let r = RawBuf::from_mut(bytes_of_mut(&mut recv));
        self.submit_coll::<T, _>(
            CollKind::ReduceScatter,
            op,
            c,
            0,
            [s, r],
            (send, recv),
            |(_, r)| r,
        )
    }

    /// Non-blocking all-gather; the handle returns the gathered buffer (`n × send.len()`).
    pub fn iall_gather<T: Element>(&self, send: Vec<T>) -> Result<Handle<Vec<T>>> {
        let c = send.len();
        let mut recv = vec![T::default(); c * self.size()];
        let s = RawBuf::from_slice(bytes_of(&send));
        let r = RawBuf::from_mut(bytes_of_mut(&mut recv));
        self.submit_coll::<T, _>(
            CollKind::AllGather,
            ReduceOp::Sum,
            c,
            0,
            [s, r],
            (send, recv),
            |(_, r)| r,
        )
    }

    /// Non-blocking in-place broadcast from `root`.
    pub fn ibroadcast<T: Element>(&self, mut buf: Vec<T>, root: usize) -> Result<Handle<Vec<T>>> {
        self.check_root(root)?;
        let n = buf.len();
        let b = RawBuf::from_mut(bytes_of_mut(&mut buf));
        self.submit_coll::<T, _>(
            CollKind::Broadcast,
            ReduceOp::Sum,
            n,
            root,
            [b, b],
            buf,
            |v| v,
        )
    }

    /// Non-blocking in-place reduce to `root` (other ranks get their buffer back unchanged).
    pub fn ireduce<T: Element>(
        &self,
        mut buf: Vec<T>,
        op: ReduceOp,
        root: usize,
    ) -> Result<Handle<Vec<T>>> {
        self.check_root(root)?;
        let n = buf.len();
        let b = RawBuf::from_mut(bytes_of_mut(&mut buf));
        self.submit_coll::<T, _>(CollKind::Reduce, op, n, root, [b, b], buf, |v| v)
    }

    /// Non-blocking all-to-all; the handle returns the received blocks.
    pub fn iall_to_all<T: Element>(&self, send: Vec<T>) -> Result<Handle<Vec<T>>> {
        let n = self.size();
        if send.len() % n != 0 {
            return invalid(format!(
                "all_to_all: {} elements are not a multiple of {n} ranks",
                send.len()
            ));
        }
        let mut recv = vec![T::default(); send.len()];
        let s = RawBuf::from_slice(bytes_of(&send));
        let r = RawBuf::from_mut(bytes_of_mut(&mut recv));
        let c = send.len() / n;
        self.submit_coll::<T, _>(
            CollKind::AllToAll,
            ReduceOp::Sum,
            c,
            0,
            [s, r],
            (send, recv),
            |(_, r)| r,
        )
    }

    /// Non-blocking gather to `root`; the handle returns the gathered buffer at the root and
    /// an empty vector elsewhere.
    pub fn igather<T: Element>(&self, send: Vec<T>, root: usize) -> Result<Handle<Vec<T>>> {
        self.check_root(root)?;
        let c = send.len();
        let rl = if self.rank() == root {
            c * self.size()
        } else {
            0
        };
        let mut recv = vec![T::default(); rl];
        let s = RawBuf::from_slice(bytes_of(&send));
        let r = RawBuf::from_mut(bytes_of_mut(&mut recv));
        self.submit_coll::<T, _>(
            CollKind::Gather,
            ReduceOp::Sum,
            c,
            root,
            [s, r],
            (send, recv),
            |(_, r)| r,
        )
    }

    /// Non-blocking scatter from `root` of blocks of `count` elements (`send` significant only
    /// at the root, where it must hold `count × n` elements).
    pub fn iscatter<T: Element>(
        &self,
        send: Vec<T>,
        count: usize,
        root: usize,
    ) -> Result<Handle<Vec<T>>> {
        self.check_root(root)?;
        if self.rank() == root && send.len() != count * self.size() {
            return invalid(format!(
                "scatter: root send has {} elements, expected {count} × {} ranks",
                send.len(),
                self.size()
            ));
        }
        let mut recv = vec![T::default(); count];
        let s = RawBuf::from_slice(bytes_of(&send));
        let r = RawBuf::from_mut(bytes_of_mut(&mut recv));
        self.submit_coll::<T, _>(
            CollKind::Scatter,
            ReduceOp::Sum,
            count,
            root,
            [s, r],
            (send, recv),
            |(_, r)| r,
        )
    }

    /// Non-blocking barrier.
    pub fn ibarrier(&self) -> Result<Handle<()>> {
        self.submit(
            JobDesc::Coll {
                kind: CollKind::Barrier,
                dtype: DataType::U8,
                op: ReduceOp::Sum,
                count: 0,
                root: 0,
            },
            [RawBuf::empty(), RawBuf::empty()],
            Box::new(()),
            |_| (),
        )
    }

    /// Non-blocking send; the handle returns the buffer.
    pub fn isend<T: Element>(&self, buf: Vec<T>, peer: usize, tag: u64) -> Result<Handle<Vec<T>>> {
        self.igroup_with(vec![P2p::Send { buf, peer, tag }], |mut v| {
            v.pop().unwrap_or_default()
        })
    }

    /// Non-blocking receive into `buf` (its length is the count); the handle returns it.
    pub fn irecv<T: Element>(&self, buf: Vec<T>, peer: usize, tag: u64) -> Result<Handle<Vec<T>>> {
        self.igroup_with(vec![P2p::Recv { buf, peer, tag }], |mut v| {
            v.pop().unwrap_or_default()
        })
    }

    /// Non-blocking group of point-to-point operations on owned buffers; the handle returns
    /// the buffers in the order given.
    pub fn igroup<T: Element>(&self, ops: Vec<P2p<T>>) -> Result<Handle<Vec<Vec<T>>>> {
        self.igroup_with(ops, |v| v)
    }

    fn igroup_with<T: Element, R: 'static>(
        &self,
        ops: Vec<P2p<T>>,
        finish: fn(Vec<Vec<T>>) -> R,
    ) -> Result<Handle<R>> {
        let mut bufs: Vec<Vec<T>> = Vec::with_capacity(ops.len());
        let mut pops = Vec::with_capacity(ops.len());
        for o in ops {
            let (send, mut buf, peer, tag) = match o {
                P2p::Send { buf, peer, tag } => (true, buf, peer, tag),
                P2p::Recv { buf, peer, tag } => (false, buf, peer, tag),
            };
            self.check_peer(peer)?;
            let rb = RawBuf::from_mut(bytes_of_mut(&mut buf));
            pops.push(P2pOp {
                send,
                peer,
                buf: rb,
                sig: Self::p2p_sig::<T>(buf.len(), tag),
                source: None,
            });
            bufs.push(buf);
        }
        self.submit(
            JobDesc::P2p(pops),
            [RawBuf::empty(), RawBuf::empty()],
            Box::new(bufs),
            move |k| match k.downcast::<Vec<Vec<T>>>() {
                Ok(b) => finish(*b),
                Err(_) => finish(Vec::new()),
            },
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_coll<T: Element, K: Send + 'static>(
        &self,
        kind: CollKind,
        op: ReduceOp,
        count: usize,
        root: usize,
        bufs: [RawBuf; 2],
        keep: K,
        finish: fn(K) -> Vec<T>,
    ) -> Result<Handle<Vec<T>>> {
        self.submit(
            JobDesc::Coll {
                kind,
                dtype: T::DTYPE,
                op,
                count,
                root,
            },
            bufs,
            Box::new(keep),
            move |k| match k.downcast::<K>() {
                Ok(b) => finish(*b),
                Err(_) => Vec::new(),
            },
        )
    }
}

/// A point-to-point operation of a non-blocking group ([`Communicator::igroup`]).
pub enum P2p<T> {
    /// Send `buf` to `peer` with `tag`.
    Send {
        /// The data.
        buf: Vec<T>,
        /// Destination rank.
        peer: usize,
        /// Tag.
        tag: u64,
    },
    /// Receive `buf.len()` elements from `peer` with `tag`.
    Recv {
        /// The destination (its length is the count).
        buf: Vec<T>,
        /// Source rank.
        peer: usize,
        /// Tag.
        tag: u64,
    },
}

/// A group of blocking point-to-point operations on borrowed buffers
/// ([`Communicator::group`]).
pub struct Group<'c, 'b> {
    comm: &'c Communicator,
    ops: Vec<P2pOp>,
    _bufs: std::marker::PhantomData<&'b mut [u8]>,
}

impl<'c, 'b> Group<'c, 'b> {
    /// Adds a send of `buf` to `peer`.
    pub fn send<T: Element>(mut self, buf: &'b [T], peer: usize, tag: u64) -> Result<Self> {
        self.comm.check_peer(peer)?;
        self.ops.push(P2pOp {
            send: true,
            peer,
            buf: RawBuf::from_slice(bytes_of(buf)),
            sig: Communicator::p2p_sig::<T>(buf.len(), tag),
            source: None,
        });
        Ok(self)
    }

    /// Adds a receive into `buf` from `peer`.
    pub fn recv<T: Element>(mut self, buf: &'b mut [T], peer: usize, tag: u64) -> Result<Self> {
        self.comm.check_peer(peer)?;
        let n = buf.len();
        self.ops.push(P2pOp {
            send: false,
            peer,
            buf: RawBuf::from_mut(bytes_of_mut(buf)),
            sig: Communicator::p2p_sig::<T>(n, tag),
            source: None,
        });
        Ok(self)
    }

    /// Posts every operation and waits for all of them.
    pub fn run(self) -> Result<()> {
        if self.ops.is_empty() {
            return Ok(());
        }
        self.comm
            .run_blocking(JobDesc::P2p(self.ops), [RawBuf::empty(), RawBuf::empty()])
    }
}
