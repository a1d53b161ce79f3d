"""ProcessGroupBraid: torch.distributed's process-group interface over braid's C ABI."""

import ctypes
import math
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import _lib
from . import _cuda
from ._work import DONE, PENDING, RUNNING, Request, Work, depth, track

_C10D = "torch.distributed.distributed_c10d"

# torch dtype -> braid datatype for reductions (bool is handled as uint8 with logical ops).
_DTYPES = {
    torch.float32: _lib.FLOAT32,
    torch.float64: _lib.FLOAT64,
    torch.float16: _lib.FLOAT16,
    torch.bfloat16: _lib.BFLOAT16,
    torch.int8: _lib.INT8,
    torch.uint8: _lib.UINT8,
    torch.int16: _lib.INT16,
    torch.int32: _lib.INT32,
    torch.int64: _lib.INT64,
    torch.bool: _lib.UINT8,
}
for _name, _code in (("uint32", _lib.UINT32), ("uint64", _lib.UINT64)):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code
_COMPLEX = {torch.complex64: _lib.FLOAT32, torch.complex128: _lib.FLOAT64}

_R = dist.ReduceOp.RedOpType
_OPS = {
    _R.SUM: _lib.SUM,
    _R.AVG: _lib.AVG,
    _R.PRODUCT: _lib.PROD,
    _R.MIN: _lib.MIN,
    _R.MAX: _lib.MAX,
    _R.BAND: _lib.BAND,
    _R.BOR: _lib.BOR,
    _R.BXOR: _lib.BXOR,
}
_OP_NAMES = {v: k.name for k, v in _OPS.items()}
_OPS_BY_VALUE = {k.value: v for k, v in _OPS.items()}  # pybind enums hash slowly
# bool tensors: SUM is a logical or, PRODUCT a logical and (as torch's NCCL backend does).
_BOOL_OPS = {_lib.SUM: _lib.MAX, _lib.PROD: _lib.MIN, _lib.MIN: _lib.MIN, _lib.MAX: _lib.MAX,
             _lib.BAND: _lib.BAND, _lib.BOR: _lib.BOR, _lib.BXOR: _lib.BXOR}
_FLOATS = {torch.float32, torch.float64, torch.float16, torch.bfloat16}

_SIZE_T = ctypes.c_size_t

# create_group tag of a process group's depth-d communicator: _DEPTH_TAG + d ("brd\0" + d).
_DEPTH_TAG = 0x62726400


def _redop(op):
    rt = getattr(op, "op", op)
    try:
        return _OPS_BY_VALUE[rt.value]
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"braid: reduction operator {rt} is not supported "
                         f"(supported: SUM, AVG, PRODUCT, MIN, MAX, BAND, BOR, BXOR)") from None


def _check_cpu(t, what):
    """Checks a tensor argument: a dense cpu or cuda tensor (cuda tensors go to libbraid's
    device engines, NCCL or staging, on the tensor's current stream)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"braid {what}: expected a tensor, got {type(t).__name__}")
    if not (t.is_cpu or t.is_cuda):
        raise ValueError(
            f"braid {what}: tensors on device '{t.device}' are not supported (braid's torch "
            f"backend serves cpu and cuda tensors)")
    if t.is_sparse:
        raise ValueError(f"braid {what}: sparse tensors are not supported")


def _device_of(keep, what):
    """The cuda device of an operation's tensors, or None for cpu ones; mixing is refused."""
    dev = None
    cpu = False
    for t in keep or ():
        if not isinstance(t, torch.Tensor):
            continue
        if t.is_cuda:
            if dev is not None and t.device != dev:
                raise ValueError(f"braid {what}: tensors on {dev} and {t.device} in one call")
            dev = t.device
        else:
            cpu = True
    if dev is not None and cpu:
        raise ValueError(f"braid {what}: cpu and cuda tensors cannot be mixed in one call")
    return dev


def _flat(t):
    """(contiguous tensor, its real view for complex) with the same storage order."""
    c = t if t.is_contiguous() else t.contiguous()
    return c


def _reduce_spec(t, op, what):
    """braid (datatype, count, op) of a reduction over tensor `t` (already contiguous).
    Raises ValueError for what braid cannot reduce, before anything is sent."""
    bop = _redop(op)
    dt = t.dtype
    if dt in _COMPLEX:
        if bop not in (_lib.SUM, _lib.AVG):
            raise ValueError(f"braid {what}: {_OP_NAMES[bop]} is not defined for complex "
                             f"tensors (SUM and AVG are)")
        return _COMPLEX[dt], t.numel() * 2, bop
    code = _DTYPES.get(dt)
    if code is None:
        raise ValueError(f"braid {what}: dtype {dt} is not supported for reductions")
    if dt == torch.bool:
        if bop == _lib.AVG:
            raise ValueError(f"braid {what}: AVG is not defined for bool tensors")
        return code, t.numel(), _BOOL_OPS[bop]
    if dt in _FLOATS and bop in (_lib.BAND, _lib.BOR, _lib.BXOR):
        raise ValueError(f"braid {what}: {_OP_NAMES[bop]} needs an integer or bool tensor, "
                         f"not {dt}")
    return code, t.numel(), bop


def _fast_reductions():
    """{(torch dtype, RedOpType value): (braid datatype, braid op)} of every pair
    _reduce_spec accepts on a real (not complex) tensor, for allreduce's fast path."""
    out = {}
    for dt, code in _DTYPES.items():
        for rt, bop in _OPS.items():
            if dt == torch.bool:
                if bop != _lib.AVG:
                    out[(dt, rt.value)] = (code, _BOOL_OPS[bop])
            elif not (dt in _FLOATS and bop in (_lib.BAND, _lib.BOR, _lib.BXOR)):
                out[(dt, rt.value)] = (code, bop)
    return out


_FAST_REDUCTIONS = _fast_reductions()


def _move_spec(t):
    """braid (datatype, count) to move tensor `t` unchanged (no arithmetic): its own type
    where braid has it, else bytes."""
    code, mult = _unit(t)
    return code, t.numel() * mult


def _same_layout(tensors, what):
    first = tensors[0]
    for t in tensors[1:]:
        if t.dtype != first.dtype or t.numel() != first.numel():
            raise ValueError(f"braid {what}: every tensor of the list must have the dtype and "
                             f"size of the first ({first.dtype}, {first.numel()} elements)")


def _copy_back(pairs):
    """A post action copying each (destination, source) pair."""
    def post():
        for dst, src in pairs:
            dst.copy_(src.view(dst.shape) if src.shape != dst.shape else src)
    return post


def _p2p_mode():
    """How a send/recv reached us: 'group' when torch waits at once (dist.send/dist.recv) or
    batches (batch_isend_irecv): recorded and run as one braid group; 'async' otherwise
    (dist.isend/irecv: started now). Frames: 0 here, 1 _p2p, 2 our send/recv, 3 torch's
    isend/irecv, 4 its caller."""
    try:
        inner = sys._getframe(3)
        outer = inner.f_back
    except ValueError:
        return "async"
    if (outer is None or inner.f_globals.get("__name__") != _C10D
            or inner.f_code.co_name not in ("isend", "irecv")):
        return "async"
    if outer.f_globals.get("__name__") == _C10D and outer.f_code.co_name in (
            "send", "recv", "batch_isend_irecv"):
        return "group"
    return "async"


def _unit(t):
    """braid datatype moving tensor `t` unchanged, and how many of its units one element is."""
    code = _DTYPES.get(t.dtype)
    if code is not None and t.dtype != torch.bool:
        return code, 1
    if t.dtype in _COMPLEX:
        return _COMPLEX[t.dtype], 2
    return _lib.UINT8, t.element_size()


class _Done:
    """What a synchronous operation returns: it already ran (torch waits on it at once, and
    this wait returns True); the Work API answers as for a completed work."""

    __slots__ = ("_result",)

    def __init__(self, result):
        self._result = result

    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True

    def is_success(self):
        return True

    def exception(self):
        return None

    def result(self):
        return self._result

    def synchronize(self):
        pass

    def get_future(self):
        f = torch.futures.Future()
        f.set_result(self._result)
        track(f, depth() + 1)
        return f


class ProcessGroupBraid(dist.ProcessGroup):
    """The torch.distributed process group of backend "braid" (cpu tensors).

    Created by ``dist.init_process_group("braid")`` (and new_group/new_subgroups); use it
    through torch.distributed's functions. ``rank()``/``size()`` follow braid's membership
    view: after :func:`braid.torch.update` returned it, they may have changed (rebuild DDP).
    """

    def __init__(self, comm, rank, size, timeout=None, coordinator=None, name="braid"):
        super().__init__(rank, size)
        self._comm = comm
        self._h = comm.handle
        self._L = _lib.lib()
        self._rank = rank
        self._size = size
        self._timeout = timeout
        self._coordinator = coordinator  # braid.Coordinator hosted by this process (or None)
        self._pending = []  # works recorded, not started: one collective, or a p2p group
        self._pending_ops = []  # the p2p group's operations
        self._lock = threading.RLock()
        self._children = []  # communicators created from this one (kept alive)
        self._closed = None
        self._backend_name = name
        self._blocking_fns = {}
        self._all_reduce = self._L.braid_all_reduce
        # depth -> (lock, handle, Communicator) of the operations issued by callbacks (see
        # _work.depth): each depth is a stream of its own, ordered the same on every rank
        self._streams = {}
        self._streams_lock = threading.Lock()

    # ---- identity ---------------------------------------------------------------------

    def getRank(self):
        return self._rank

    def getSize(self):
        return self._size

    def getBackendName(self):
        return self._backend_name

    def name(self):
        return self._backend_name

    # torch's ProcessGroup reads its name and description from its registered backends; this
    # group is its own backend (none registered), so it keeps them itself: torch sets them
    # at creation, and DeviceMesh, DTensor and FSDP2 look groups up by name.
    _group_name = ""
    _group_desc = ""

    def setGroupName(self, name):
        self._group_name = name

    def getGroupName(self):
        return self._group_name

    def setGroupDesc(self, desc):
        self._group_desc = desc

    def getGroupDesc(self):
        return self._group_desc

    @property
    def comm(self):
        """The braid.Communicator under this process group."""
        return self._comm

    def _refresh(self):
        self._rank = self._comm.rank
        self._size = self._comm.size

    # ---- issuing and driving ------------------------------------------------------------

    def _handle(self):
        """The communicator handle of the calling context's depth (see _work.depth)."""
        if self._closed is not None:
            raise _lib.InvalidUsage(self._closed, _lib.INVALID_USAGE, "")
        d = depth()
        return self._h if not d else self._stream(d)[1]

    def _lock_here(self):
        """The lock that orders the calling context's stream, and whether it is the main one
        (depth 0, whose pending send/recv group runs first)."""
        d = depth()
        return (self._lock, True) if not d else (self._stream(d)[0], False)

    def _stream(self, d):
        """(lock, handle, Communicator) of depth `d` > 0, created at its first operation:
        collective over the group's members (create_group through the coordinator, so it
        never interleaves with the operations of another depth), which every member reaches
        at the same point of its depth-d stream."""
        s = self._streams.get(d)
        if s is not None:
            return s
        with self._streams_lock:
            s = self._streams.get(d)
            if s is None:
                if self._closed is not None:
                    raise _lib.InvalidUsage(self._closed, _lib.INVALID_USAGE, "")
                comm = self._comm.create_group(list(range(self._comm.size)),
                                               tag=_DEPTH_TAG + d)
                s = self._streams[d] = (threading.RLock(), comm.handle, comm)
        return s

    def _drop_streams(self):
        """Closes the communicators of depths > 0 (after a view change: the next callback
        operation creates them over the new members)."""
        with self._streams_lock:
            streams, self._streams = self._streams, {}
        for _lock, _h, comm in streams.values():
            comm.close()

    def _submit(self, fn, args, what, keep):
        req = _lib.request_t()
        self._L.check(fn(*args, ctypes.byref(req)), fn.__name__)
        return Request(self._L, req, what, keep)

    def _coll(self, what, opts, result, post, keep, name, *args):
        """Issues collective C function braid_<name>(*args) (or braid_i<name>)."""
        return self._issue(what, opts, result, post, keep, ((name, args),))

    def _multi(self, what, opts, result, post, keep, calls):
        """Issues several collectives [(name, args)] as one work."""
        return self._issue(what, opts, result, post, keep, calls)

    def _issue(self, what, opts, result, post, keep, calls):
        """For a synchronous torch call (asyncOp False: torch waits at once) runs the
        operation on the calling thread right now: no hand-off to braid's progress thread,
        and a completed work is returned. Otherwise starts it non-blocking (braid_i*).
        CUDA tensors: enqueued on the current stream (braid_*_stream), a CudaWork."""
        dev = _device_of(keep, what) if keep else None
        if dev is not None:
            with self._lock:
                if self._pending:
                    self._flush_locked()
                return _cuda.run(self, what, result, post, keep, calls, dev)
        lk, main = self._lock_here()
        if opts is not None and not opts.asyncOp:
            with lk:
                if main and self._pending:
                    self._flush_locked()
                st = self._run_calls(calls)
            if st != _lib.SUCCESS:
                raise self._L.error(st, what)
            if post is not None:
                post()
            return _Done(result)
        w = Work(self, result, post, what)
        with lk:
            if main and self._pending:
                self._flush_locked()
            self._start_or_fail(w, lambda: self._start_calls(what, calls, keep))
        return w

    def _start_or_fail(self, w, start):
        """Starts `w` non-blocking. A failed communicator (a lost peer, an abort) makes the
        work fail, not the call: the caller may be C++ (DDP's reducer in an autograd hook),
        which must get a Work whose wait()/future reports the error. Argument errors are
        raised at once (nothing was sent)."""
        try:
            w._running(start())
        except _lib.InvalidArgument:
            raise
        except _lib.BraidError as e:
            w._resolve(w._complete(e))

    def _start_calls(self, what, calls, keep):
        L = self._L
        return [self._submit(getattr(L, "braid_i" + name), args, what, keep)
                for name, args in calls]

    def _run_calls(self, calls):
        fns = self._blocking_fns
        for name, args in calls:
            fn = fns.get(name)
            if fn is None:
                fn = fns[name] = getattr(self._L, "braid_" + name)
            st = fn(*args)
            if st != _lib.SUCCESS:
                return st
        return _lib.SUCCESS

    def _p2p_now(self, send, t, peer, tag):
        """Starts a send or receive of contiguous cpu tensor `t` now (non-blocking)."""
        return self._p2p("send" if send else "recv", send, t, t, peer, tag, [t], None,
                         mode="async")

    def _p2p(self, what, send, t, buf, peer, tag, result, post, mode=None):
        h = self._handle()
        if not 0 <= peer < self._size:
            raise ValueError(f"braid {what}: peer {peer} is not a rank of this group of "
                             f"{self._size}")
        dt, count = _move_spec(buf)
        tag = int(tag) & 0xFFFFFFFFFFFFFFFF
        op = (send, buf.data_ptr(), count, dt, peer, tag, buf)
        w = Work(self, result, post, what)
        if not send:
            w._src = peer
        if mode is None:
            mode = _p2p_mode()
        if buf.is_cuda:
            return self._p2p_cuda(what, op, buf, result, post, mode)
        lk, main = self._lock_here()
        with lk:
            if mode == "group" and main:
                self._pending.append(w)
                self._pending_ops.append(op)
                return w
            if main and self._pending:
                self._flush_locked()
            fn = self._L.braid_isend if send else self._L.braid_irecv
            self._start_or_fail(
                w, lambda: [self._submit(fn, (op[1], count, dt, peer, tag, h), what, [buf])])
        return w

    def _p2p_cuda(self, what, op, buf, result, post, mode):
        """A device send/recv: batched ones (batch_isend_irecv, dist.send/recv) wait in the
        pending group until the next operation or a wait; others are enqueued now, alone."""
        with self._lock:
            if mode == "group" and (not self._pending_ops or self._pending_ops[0][6].is_cuda):
                w = _cuda.PendingCudaWork(self, result, post, what, buf.device)
                self._pending.append(w)
                self._pending_ops.append(op)
                return w
            if self._pending:
                self._flush_locked()
            stream = _cuda.run_p2p_group(self, [op], buf.device)
            if post is not None:
                post()
            return _cuda.CudaWork(self, result, stream, [buf], what)

    def _run_group_blocking(self, ops):
        L = self._L
        L.braid_group_start()
        for send, ptr, count, dt, peer, tag, _buf in ops:
            (L.braid_send if send else L.braid_recv)(ptr, count, dt, peer, tag, self._h)
        return L.braid_group_end()

    def _run_pending(self, work):
        """Runs the pending operations (ending with `work`) on the calling thread."""
        with self._lock:
            if work._state != PENDING:
                return
            if self._pending_ops and self._pending_ops[0][6].is_cuda:
                self._flush_locked()
                return
            works, ops = self._pending, self._pending_ops
            self._pending, self._pending_ops = [], []
            st = self._run_group_blocking(ops)
            exc = self._L.error(st, "send/recv group") if st != _lib.SUCCESS else None
            futs = [w._complete(exc) for w in works]
        for w, f in zip(works, futs):
            w._resolve(f)

    def _flush(self, work):
        """Starts the pending operations non-blocking (when `work` is one of them)."""
        with self._lock:
            if work._state == PENDING:
                self._flush_locked()

    def _flush_locked(self):
        """Starts the pending send/recv group non-blocking: one braid group, one request
        (device tensors: one group enqueued on the current stream)."""
        works, ops = self._pending, self._pending_ops
        self._pending, self._pending_ops = [], []
        if ops and ops[0][6].is_cuda:
            try:
                stream = _cuda.run_p2p_group(self, ops, ops[0][6].device)
            except _lib.BraidError as e:
                for w in works:
                    w._fail(e)
                return
            for w in works:
                w._enqueued(stream)
            return
        L = self._L
        try:
            L.braid_group_start()
            for send, ptr, count, dt, peer, tag, _b in ops:
                (L.braid_send if send else L.braid_recv)(ptr, count, dt, peer, tag, self._h)
            req = _lib.request_t()
            L.check(L.braid_igroup_end(ctypes.byref(req)), "braid_igroup_end")
        except _lib.BraidError as e:
            futs = [w._complete(e) for w in works]
            for w, f in zip(works, futs):
                w._resolve(f)
            return
        r = Request(L, req, "send/recv group", [o[6] for o in ops])
        for w in works:
            w._running([r])

    # ---- collectives ------------------------------------------------------------------

    def allreduce(self, tensors, opts=None):
        # dist.all_reduce(t) of one contiguous cpu tensor, waited for by torch at once, in as
        # few reads of torch's objects as it takes (each costs 0.1-0.6 us, measured); every
        # other call, and any error, goes the general way below.
        if opts is not None and len(tensors) == 1 and not opts.asyncOp:
            t = tensors[0]
            if (isinstance(t, torch.Tensor) and t.is_cpu and t.layout is torch.strided
                    and t.is_contiguous()):
                try:
                    spec = _FAST_REDUCTIONS.get((t.dtype, opts.reduceOp.op.value))
                except AttributeError:
                    spec = None
                if spec is not None:
                    p = t.data_ptr()
                    h = self._handle()
                    lk, main = self._lock_here()
                    with lk:
                        if main and self._pending:
                            self._flush_locked()
                        st = self._all_reduce(p, p, t.numel(), spec[0], spec[1], h)
                    if st != _lib.SUCCESS:
                        raise self._L.error(st, "all_reduce")
                    return _Done(tensors)
        if len(tensors) != 1:
            return self.allreduce_coalesced(tensors, opts)
        t = tensors[0]
        _check_cpu(t, "all_reduce")
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        buf = _flat(t)
        dt, n, bop = _reduce_spec(buf, op, "all_reduce")
        post = _copy_back([(t, buf)]) if buf is not t else None
        p = buf.data_ptr()
        return self._coll("all_reduce", opts, tensors, post, [buf], "all_reduce",
                          p, p, n, dt, bop, self._handle())

    def allreduce_coalesced(self, tensors, opts=None):
        if not tensors:
            raise ValueError("braid all_reduce_coalesced: no tensors")
        for t in tensors:
            _check_cpu(t, "all_reduce_coalesced")
        _same_dtype(tensors, "all_reduce_coalesced")
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dt, n, bop = _reduce_spec(flat, op, "all_reduce_coalesced")
        pairs, off = [], 0
        for t in tensors:
            pairs.append((t, flat[off:off + t.numel()]))
            off += t.numel()
        p = flat.data_ptr()
        return self._coll("all_reduce_coalesced", opts, tensors, _copy_back(pairs), [flat],
                          "all_reduce", p, p, n, dt, bop, self._handle())

    def broadcast(self, tensors, opts=None):
        root = opts.rootRank if opts is not None else 0
        t = tensors[opts.rootTensor if opts is not None else 0]
        _check_cpu(t, "broadcast")
        self._check_root(root, "broadcast")
        buf = _flat(t)
        dt, n = _move_spec(buf)
        post = _copy_back([(t, buf)]) if buf is not t else None
        p = buf.data_ptr()
        return self._coll("broadcast", opts, tensors, post, [buf], "broadcast",
                          p, p, n, dt, root, self._handle())

    def reduce(self, tensors, opts=None):
        t = tensors[0]
        root = opts.rootRank if opts is not None else 0
        _check_cpu(t, "reduce")
        self._check_root(root, "reduce")
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        buf = _flat(t)
        dt, n, bop = _reduce_spec(buf, op, "reduce")
        post = _copy_back([(t, buf)]) if buf is not t else None
        p = buf.data_ptr()
        return self._coll("reduce", opts, tensors, post, [buf], "reduce",
                          p, p, n, dt, bop, root, self._handle())

    def allgather(self, output_tensors, input_tensors, opts=None):
        if len(input_tensors) != 1 or len(output_tensors) != 1:
            raise ValueError("braid all_gather: one input tensor and one output list per rank")
        inp, outs = input_tensors[0], output_tensors[0]
        _check_cpu(inp, "all_gather")
        if len(outs) != self._size:
            raise ValueError(f"braid all_gather: the output list has {len(outs)} tensors, the "
                             f"group {self._size} ranks")
        for o in outs:
            _check_cpu(o, "all_gather")
            if o.numel() != inp.numel() or o.dtype != inp.dtype:
                raise ValueError("braid all_gather: every output tensor must have the input's "
                                 f"dtype and size ({inp.dtype}, {inp.numel()} elements)")
        src = _flat(inp)
        flat = torch.empty(self._size * inp.numel(), dtype=inp.dtype, device=inp.device)
        dt, n = _move_spec(src)
        n_in = inp.numel()
        pairs = [(o, flat[i * n_in:(i + 1) * n_in]) for i, o in enumerate(outs)]
        return self._coll("all_gather", opts, output_tensors, _copy_back(pairs), [src, flat],
                          "all_gather", src.data_ptr(), flat.data_ptr(), n, dt, self._handle())

    def _allgather_base(self, output, input, opts=None):
        _check_cpu(output, "all_gather_into_tensor")
        _check_cpu(input, "all_gather_into_tensor")
        if output.dtype != input.dtype or output.numel() != input.numel() * self._size:
            raise ValueError(
                f"braid all_gather_into_tensor: the output must hold {self._size} x "
                f"{input.numel()} elements of {input.dtype} (it has {output.numel()} of "
                f"{output.dtype})")
        src = _flat(input)
        dst = _flat(output)
        dt, n = _move_spec(src)
        post = _copy_back([(output, dst)]) if dst is not output else None
        return self._coll("all_gather_into_tensor", opts, [output], post, [src, dst],
                          "all_gather", src.data_ptr(), dst.data_ptr(), n, dt, self._handle())

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts=None):
        calls, keep, posts = [], [], []
        for o, i in zip(outputs, inputs):
            _check_cpu(o, "all_gather_into_tensor")
            _check_cpu(i, "all_gather_into_tensor")
            if o.numel() != i.numel() * self._size or o.dtype != i.dtype:
                raise ValueError("braid all_gather_into_tensor_coalesced: output sizes must be "
                                 "world size x input sizes")
            src, dst = _flat(i), _flat(o)
            dt, n = _move_spec(src)
            calls.append(("all_gather", (src.data_ptr(), dst.data_ptr(), n, dt,
                                         self._handle())))
            keep += [src, dst]
            if dst is not o:
                posts.append((o, dst))
        return self._multi("all_gather_into_tensor_coalesced", opts, outputs,
                           _copy_back(posts) if posts else None, keep, calls)

    def reduce_scatter(self, output_tensors, input_tensors, opts=None):
        if len(output_tensors) != 1 or len(input_tensors) != 1:
            raise ValueError("braid reduce_scatter: one output tensor and one input list")
        out, ins = output_tensors[0], input_tensors[0]
        _check_cpu(out, "reduce_scatter")
        if len(ins) != self._size:
            raise ValueError(f"braid reduce_scatter: the input list has {len(ins)} tensors, the "
                             f"group {self._size} ranks")
        for i in ins:
            _check_cpu(i, "reduce_scatter")
            if i.numel() != out.numel() or i.dtype != out.dtype:
                raise ValueError("braid reduce_scatter: every input tensor must have the "
                                 f"output's dtype and size ({out.dtype}, {out.numel()})")
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        flat = torch.cat([i.reshape(-1) for i in ins]) if ins else torch.empty(0, dtype=out.dtype, device=out.device)
        dst = _flat(out)
        dt, n, bop = _reduce_spec(dst, op, "reduce_scatter")
        post = _copy_back([(out, dst)]) if dst is not out else None
        return self._coll("reduce_scatter", opts, output_tensors, post, [flat, dst],
                          "reduce_scatter", flat.data_ptr(), dst.data_ptr(), n, dt, bop,
                          self._handle())

    def _reduce_scatter_base(self, output, input, opts=None):
        _check_cpu(output, "reduce_scatter_tensor")
        _check_cpu(input, "reduce_scatter_tensor")
        if output.dtype != input.dtype or input.numel() != output.numel() * self._size:
            raise ValueError(
                f"braid reduce_scatter_tensor: the input must hold {self._size} x "
                f"{output.numel()} elements of {output.dtype} (it has {input.numel()} of "
                f"{input.dtype})")
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        src, dst = _flat(input), _flat(output)
        dt, n, bop = _reduce_spec(dst, op, "reduce_scatter_tensor")
        post = _copy_back([(output, dst)]) if dst is not output else None
        return self._coll("reduce_scatter_tensor", opts, [output], post, [src, dst],
                          "reduce_scatter", src.data_ptr(), dst.data_ptr(), n, dt, bop,
                          self._handle())

    def reduce_scatter_tensor_coalesced(self, outputs, inputs, opts=None):
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        calls, keep, posts = [], [], []
        for o, i in zip(outputs, inputs):
            _check_cpu(o, "reduce_scatter_tensor")
            _check_cpu(i, "reduce_scatter_tensor")
            if i.numel() != o.numel() * self._size or o.dtype != i.dtype:
                raise ValueError("braid reduce_scatter_tensor_coalesced: input sizes must be "
                                 "world size x output sizes")
            src, dst = _flat(i), _flat(o)
            dt, n, bop = _reduce_spec(dst, op, "reduce_scatter_tensor")
            calls.append(("reduce_scatter", (src.data_ptr(), dst.data_ptr(), n, dt, bop,
                                             self._handle())))
            keep += [src, dst]
            if dst is not o:
                posts.append((o, dst))
        return self._multi("reduce_scatter_tensor_coalesced", opts, outputs,
                           _copy_back(posts) if posts else None, keep, calls)

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        _check_cpu(output, "all_to_all_single")
        _check_cpu(input, "all_to_all_single")
        if output.dtype != input.dtype:
            raise ValueError("braid all_to_all_single: input and output dtypes differ "
                             f"({input.dtype}, {output.dtype})")
        src, dst = _flat(input), _flat(output)
        post = _copy_back([(output, dst)]) if dst is not output else None
        n = self._size
        if not output_split_sizes and not input_split_sizes:
            if input.numel() % n or output.numel() != input.numel():
                raise ValueError(
                    f"braid all_to_all_single: {input.numel()} input elements (output "
                    f"{output.numel()}) do not split evenly over {n} ranks")
            dt, c = _move_spec(src)
            return self._coll("all_to_all_single", opts, [output], post, [src, dst],
                              "all_to_all", src.data_ptr(), dst.data_ptr(), c // n, dt,
                              self._handle())
        scounts = _split_counts(input, input_split_sizes, n, "input")
        rcounts = _split_counts(output, output_split_sizes, n, "output")
        return self._alltoallv("all_to_all_single", opts, [output], post, src, scounts, dst,
                               rcounts)

    def alltoall(self, output_tensors, input_tensors, opts=None):
        n = self._size
        if len(output_tensors) != n or len(input_tensors) != n:
            raise ValueError(f"braid all_to_all: the lists must hold {n} tensors (one per rank)")
        for t in list(output_tensors) + list(input_tensors):
            _check_cpu(t, "all_to_all")
        dtype = input_tensors[0].dtype
        if any(t.dtype != dtype for t in list(output_tensors) + list(input_tensors)):
            raise ValueError("braid all_to_all: every tensor must have the same dtype")
        src = torch.cat([t.reshape(-1) for t in input_tensors])
        dst = torch.empty(sum(t.numel() for t in output_tensors), dtype=dtype,
                          device=input_tensors[0].device)
        pairs, off = [], 0
        for t in output_tensors:
            pairs.append((t, dst[off:off + t.numel()]))
            off += t.numel()
        return self._alltoallv("all_to_all", opts, output_tensors, _copy_back(pairs), src,
                               [t.numel() for t in input_tensors], dst,
                               [t.numel() for t in output_tensors])

    def _alltoallv(self, what, opts, result, post, src, scounts, dst, rcounts):
        """Variable all-to-all of element counts per rank (contiguous blocks in rank order)."""
        dt, mult = _unit(src)
        sc = [c * mult for c in scounts]
        rc = [c * mult for c in rcounts]
        sd = _displs(sc)
        rd = _displs(rc)
        n = self._size
        if self._L.has("braid_all_to_allv"):
            arrs = [(_SIZE_T * n)(*v) for v in (sc, sd, rc, rd)]
            return self._coll(what, opts, result, post, [src, dst] + arrs, "all_to_allv",
                              src.data_ptr(), arrs[0], arrs[1], dst.data_ptr(), arrs[2],
                              arrs[3], dt, self._handle())
        raise _lib.InvalidUsage(f"braid {what}: this libbraid has no braid_all_to_allv",
                                _lib.INVALID_USAGE, "braid_all_to_allv")

    def gather(self, output_tensors, input_tensors, opts=None):
        root = opts.rootRank if opts is not None else 0
        self._check_root(root, "gather")
        inp = input_tensors[0]
        _check_cpu(inp, "gather")
        src = _flat(inp)
        dt, n = _move_spec(src)
        if self._rank == root:
            outs = output_tensors[0]
            if len(outs) != self._size:
                raise ValueError(f"braid gather: the root's list has {len(outs)} tensors, the "
                                 f"group {self._size} ranks")
            for o in outs:
                _check_cpu(o, "gather")
                if o.numel() != inp.numel() or o.dtype != inp.dtype:
                    raise ValueError("braid gather: output tensors must match the input")
            flat = torch.empty(self._size * inp.numel(), dtype=inp.dtype, device=inp.device)
            k = inp.numel()
            post = _copy_back([(o, flat[i * k:(i + 1) * k]) for i, o in enumerate(outs)])
            rp = flat.data_ptr()
            keep = [src, flat]
        else:
            if output_tensors and output_tensors[0]:
                raise ValueError("braid gather: only the root passes a gather list")
            post, rp, keep = None, None, [src]
        return self._coll("gather", opts, output_tensors, post, keep, "gather",
                          src.data_ptr(), rp, n, dt, root, self._handle())

    def scatter(self, output_tensors, input_tensors, opts=None):
        root = opts.rootRank if opts is not None else 0
        self._check_root(root, "scatter")
        out = output_tensors[0]
        _check_cpu(out, "scatter")
        dst = _flat(out)
        dt, n = _move_spec(dst)
        if self._rank == root:
            ins = input_tensors[0]
            if len(ins) != self._size:
                raise ValueError(f"braid scatter: the root's list has {len(ins)} tensors, the "
                                 f"group {self._size} ranks")
            for i in ins:
                _check_cpu(i, "scatter")
                if i.numel() != out.numel() or i.dtype != out.dtype:
                    raise ValueError("braid scatter: input tensors must match the output")
            flat = torch.cat([i.reshape(-1) for i in ins])
            sp, keep = flat.data_ptr(), [flat, dst]
        else:
            if input_tensors and input_tensors[0]:
                raise ValueError("braid scatter: only the root passes a scatter list")
            sp, keep = None, [dst]
        post = _copy_back([(out, dst)]) if dst is not out else None
        return self._coll("scatter", opts, output_tensors, post, keep, "scatter",
                          sp, dst.data_ptr(), n, dt, root, self._handle())

    def barrier(self, opts=None):
        return self._coll("barrier", opts, [], None, None, "barrier", self._handle())

    # ---- point to point ---------------------------------------------------------------

    def send(self, tensors, dst, tag=0):
        t = tensors[0]
        _check_cpu(t, "send")
        buf = _flat(t)
        return self._p2p("send", True, t, buf, dst, tag, tensors, None)

    def recv(self, tensors, src, tag=0):
        t = tensors[0]
        _check_cpu(t, "recv")
        buf = _flat(t)
        post = _copy_back([(t, buf)]) if buf is not t else None
        return self._p2p("recv", False, t, buf, src, tag, tensors, post)

    def recv_anysource(self, tensors, tag=0):
        """dist.recv/irecv with src=None: the first message with `tag` from any rank (the
        work's source rank says which)."""
        t = tensors[0]
        _check_cpu(t, "recv")
        if t.is_cuda:
            raise ValueError("braid recv: a receive from any source takes cpu tensors; name "
                             "the source rank for a cuda tensor")
        buf = _flat(t)
        post = _copy_back([(t, buf)]) if buf is not t else None
        h = self._handle()
        dt, count = _move_spec(buf)
        tag = int(tag) & 0xFFFFFFFFFFFFFFFF
        w = Work(self, tensors, post, "recv")
        fn = self._L.braid_irecv_any

        def start():
            r = self._submit(fn, (buf.data_ptr(), count, dt, tag, h), "recv", [buf])
            w._any = r  # kept (not freed at completion) for braid_request_source
            return [r]

        lk, main = self._lock_here()
        with lk:
            if main and self._pending:
                self._flush_locked()
            self._start_or_fail(w, start)
        return w

    # ---- misc -------------------------------------------------------------------------

    def _check_root(self, root, what):
        if not 0 <= root < self._size:
            raise ValueError(f"braid {what}: root {root} is not a rank of this group of "
                             f"{self._size}")

    def abort(self):
        for _lock, _h, comm in list(self._streams.values()):
            comm.abort()
        self._comm.abort()

    def shutdown(self):
        self.close()

    def close(self):
        """Frees the communicator (and the coordinator this process hosts)."""
        with self._lock:
            if self._pending:
                self._flush_locked()
            if self._closed is None:
                self._closed = "braid: this process group was shut down"
            for c in self._children:
                c.close()
            self._children = []
            self._drop_streams()
            self._comm.close()
            if self._coordinator is not None:
                self._coordinator.close()
                self._coordinator = None

    def __repr__(self):
        return f"ProcessGroupBraid(rank={self._rank}, size={self._size})"


def _same_dtype(tensors, what):
    d = tensors[0].dtype
    if any(t.dtype != d for t in tensors):
        raise ValueError(f"braid {what}: every tensor must have the same dtype")


def _split_counts(t, splits, n, which):
    """Element counts per rank of an all_to_all_single side (splits in rows of dim 0)."""
    row = math.prod(t.shape[1:]) if t.dim() > 0 else 1
    rows = t.shape[0] if t.dim() > 0 else 1
    if not splits:
        if rows % n:
            raise ValueError(f"braid all_to_all_single: {rows} {which} rows do not split evenly "
                             f"over {n} ranks")
        return [rows // n * row] * n
    if len(splits) != n:
        raise ValueError(f"braid all_to_all_single: {len(splits)} {which} split sizes for "
                         f"{n} ranks")
    if any(s < 0 for s in splits) or sum(splits) != rows:
        raise ValueError(f"braid all_to_all_single: {which} split sizes {list(splits)} do not "
                         f"add up to the {rows} rows of the {which} tensor")
    return [int(s) * row for s in splits]


def _displs(counts):
    out, off = [], 0
    for c in counts:
        out.append(off)
        off += c
    return out


__all__ = ["ProcessGroupBraid", "Work", "DONE", "PENDING", "RUNNING", "timedelta"]
