"""The two kvstores (imported by braid.mxnet after the DMLC role check; imports mxnet)."""

import atexit
import ctypes
import functools
import hashlib
import os
import pickle
import threading
import time
import weakref
from ctypes import byref, c_int, c_size_t, c_uint64, c_void_p

import mxnet as mx
import numpy as np
from mxnet.base import MXNetError
from mxnet.ndarray import NDArray

from .. import Communicator, _lib
from .._lib import BraidError
from ..kv import KvServer, KvWorker, _env_pop, _env_push
from . import _launch

__all__ = ["braid_dist_sync", "braid_dist_async", "BraidMXNetError"]


class BraidMXNetError(MXNetError, BraidError):
    """A braid kvstore failed: an MXNetError (what MXNet's own kvstores raise) and a
    braid.BraidError (``status``, ``function``) carrying braid's message, which names a lost
    worker or server, a mismatch, a timeout."""

    def __init__(self, message, status=_lib.INTERNAL_ERROR, function=""):
        BraidError.__init__(self, message, status, function)


def _errors(fn):
    """Re-raises braid failures as BraidMXNetError."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BraidMXNetError:
            raise
        except BraidError as e:
            raise BraidMXNetError(str(e), e.status, e.function) from e
        except _launch.LaunchError as e:
            raise BraidMXNetError(f"braid kvstore launch: {e}", _lib.INVALID_ARGUMENT,
                                  "") from e

    return wrapper


def _usage(msg):
    return BraidMXNetError(msg, _lib.INVALID_USAGE, "")


# ---- NDArray memory, in place -------------------------------------------------------------
_MX = mx.base._LIB
_get_data = _MX.MXNDArrayGetData
_wait_to_read = _MX.MXNDArrayWaitToRead
_wait_to_write = _MX.MXNDArrayWaitToWrite
_memmove = ctypes.memmove

# numpy scalar type (NDArray.dtype) -> (braid datatype, element size, numpy dtype)
_DTYPES = {
    np.float16: (_lib.FLOAT16, 2),
    np.float32: (_lib.FLOAT32, 4),
    np.float64: (_lib.FLOAT64, 8),
    np.int8: (_lib.INT8, 1),
    np.uint8: (_lib.UINT8, 1),
    np.int32: (_lib.INT32, 4),
    np.int64: (_lib.INT64, 8),
}


_NAMES = {v[0]: np.dtype(t).name for t, v in _DTYPES.items()}


def _mx_check(rc):
    if rc != 0:
        raise MXNetError(mx.base.py_str(_MX.MXGetLastError()))


def _ptr(nd, wait):
    """The address of `nd`'s data once MXNet's `wait` on it returned."""
    h = nd.handle
    _mx_check(wait(h))
    p = c_void_p()
    _mx_check(_get_data(h, byref(p)))
    return p.value


def _ptr_read(nd):
    """The address of `nd`'s data once every pending write to it completed."""
    return _ptr(nd, _wait_to_read)


def _ptr_write(nd):
    """The address of `nd`'s data once every pending read and write of it completed."""
    return _ptr(nd, _wait_to_write)


def _info(nd, key, what):
    """(elements, braid datatype, element size) of a cpu, dense NDArray."""
    if not isinstance(nd, NDArray):
        raise BraidMXNetError(f"key {key!r}: the {what} must be an NDArray, got "
                              f"{type(nd).__name__}", _lib.INVALID_ARGUMENT, "")
    ctx = nd.context
    if ctx.device_type != "cpu":
        raise BraidMXNetError(f"braid kvstores take cpu NDArrays only: the {what} of key "
                              f"{key!r} is on {ctx} (copy it to mx.cpu() first)",
                              _lib.INVALID_ARGUMENT, "")
    if nd.stype != "default":
        raise BraidMXNetError(f"braid kvstores take dense NDArrays only: the {what} of key "
                              f"{key!r} has storage type {nd.stype}", _lib.INVALID_ARGUMENT, "")
    dt = _DTYPES.get(nd.dtype)
    if dt is None:
        raise BraidMXNetError(f"key {key!r}: dtype {np.dtype(nd.dtype).name} is not supported "
                              f"(float16, float32, float64, int8, uint8, int32, int64)",
                              _lib.INVALID_ARGUMENT, "")
    return nd.size, dt[0], dt[1]


def _infos(nds, key, what):
    """_info of the first of `nds`, checking the others agree."""
    first = _info(nds[0], key, what)
    for o in nds[1:]:
        if _info(o, key, what) != first:
            raise BraidMXNetError(f"key {key!r}: the {what}s differ in size or dtype",
                                  _lib.INVALID_ARGUMENT, "")
    return first


def _view(ptr, n, size, nd):
    return np.frombuffer((ctypes.c_char * (n * size)).from_address(ptr),
                         dtype=np.dtype(nd.dtype))


def _local_sum(vals, dst, n, size):
    """dst = sum of vals (several devices' values, summed locally first); returns dst's
    address."""
    dp = _ptr_write(dst)
    d = _view(dp, n, size, dst)
    np.copyto(d, _view(_ptr_read(vals[0]), n, size, vals[0]))
    for v in vals[1:]:
        np.add(d, _view(_ptr_read(v), n, size, v), out=d)
    return dp


def _copy_out(src_ptr, nbytes, outs, skip_handle=None):
    for o in outs:
        if skip_handle is not None and o.handle.value == skip_handle:
            continue
        dp = _ptr_write(o)
        if dp != src_ptr:
            _memmove(dp, src_ptr, nbytes)


def _items(key, value, out=None, need_out=False):
    """(key, [values] or None, [outs] or None) per key: a key with a value (NDArray or list of
    NDArrays), or a list of keys with a list of values."""
    if isinstance(key, (list, tuple)):
        keys = list(key)
        vals = value if value is not None else [None] * len(keys)
        outs = out if out is not None else [None] * len(keys)
        if not isinstance(vals, (list, tuple)) or len(vals) != len(keys):
            raise BraidMXNetError("a list of keys needs a list of values of the same length",
                                  _lib.INVALID_ARGUMENT, "")
        if not isinstance(outs, (list, tuple)) or len(outs) != len(keys):
            raise BraidMXNetError("a list of keys needs a list of outs of the same length",
                                  _lib.INVALID_ARGUMENT, "")
        res = []
        for k, v, o in zip(keys, vals, outs):
            res.extend(_items(k, v, o, need_out))
        return res
    _check_key(key)
    v = None if value is None else (list(value) if isinstance(value, (list, tuple)) else [value])
    o = None if out is None else (list(out) if isinstance(out, (list, tuple)) else [out])
    if v is not None and not v:
        raise BraidMXNetError(f"key {key!r}: empty list of values", _lib.INVALID_ARGUMENT, "")
    if need_out and not o:
        raise BraidMXNetError(f"key {key!r}: no out given", _lib.INVALID_ARGUMENT, "")
    return [(key, v, o)]


def _check_key(key):
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise BraidMXNetError(f"keys are int or str, got {type(key).__name__}",
                              _lib.INVALID_ARGUMENT, "")
    if isinstance(key, int) and not 0 <= key < 1 << 63:
        raise BraidMXNetError(f"int key {key} is out of range (0 <= key < 2**63)",
                              _lib.INVALID_ARGUMENT, "")


_STR_KEYS = {}


def _u64(key):
    """braid's key of an int or str key: ints are themselves, str keys a stable hash with the
    top bit set (never equal to an int key)."""
    if isinstance(key, int):
        return key
    u = _STR_KEYS.get(key)
    if u is None:
        h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
        u = (1 << 63) | (h & ((1 << 63) - 1))
        _STR_KEYS[key] = u
    return u


# ---- process-wide backends ----------------------------------------------------------------
_lock = threading.Lock()
_backends = {}  # kind -> backend
_generation = {"sync": 0, "async": 0}
_ps_member = None  # the idle/real push/pull membership shared in dedicated-server mode


def _backend(kind):
    with _lock:
        b = _backends.get(kind)
        if b is None or b.closed:
            job = _launch.resolve("worker")
            gen = _generation[kind]
            _generation[kind] += 1
            b = (_SyncBackend if kind == "sync" else _AsyncBackend)(job, gen)
            _backends[kind] = b
        return b


def _coordinator_of(job):
    if job.host is not None:
        return _launch.hosted_coordinator(job)
    return job.coordinator


def _timeout_s():
    try:
        return float(os.environ.get("BRAID_TIMEOUT") or 600)
    except ValueError:
        return 600.0


class _PsMember:
    """This process's membership of the push/pull group: a worker, and (no dedicated servers)
    a server started on a thread beside it so both register at once."""

    def __init__(self, job, generation, background=False):
        self.job = job
        self.coord = _coordinator_of(job)
        self.worker = None
        self.server = None
        self.error = None
        self.refs = 1
        self._done = threading.Event()
        dedicated = job.servers > 0
        self.world = job.workers + (job.servers if dedicated else job.workers)
        over = dict(_launch.ps_env())
        over["BRAID_GROUP"] = _launch.ps_group(generation)
        self._env = _env_push(over)  # popped once every start here returned
        self._srv_thread = None
        if not dedicated:
            self._srv_done = threading.Event()
            self._srv_thread = threading.Thread(target=self._start_server, daemon=True,
                                                name="braid-mxnet-ps-server")
            self._srv_thread.start()
        if background:
            t = threading.Thread(target=self._start_worker, daemon=True,
                                 name="braid-mxnet-ps-worker")
            t.start()
        else:
            self._start_worker()
            if self.error is not None:
                raise self.error

    def _start_server(self):
        try:
            self.server = KvServer(coordinator=self.coord, world_size=self.world,
                                   job_token=self.job.token)
        except BaseException as e:  # noqa: BLE001 - reported through the worker's start
            self.server_error = e
        finally:
            self._srv_done.set()

    def _start_worker(self):
        try:
            self.worker = KvWorker(coordinator=self.coord, world_size=self.world,
                                   job_token=self.job.token)
            if self._srv_thread is not None:
                # the group formed, so our server registered: its start returns promptly
                self._srv_done.wait(_timeout_s())
                if self.server is None:
                    err = getattr(self, "server_error", None)
                    raise err if err is not None else _usage("the in-process server did not "
                                                             "start")
        except BaseException as e:  # noqa: BLE001 - kept, raised by get()
            self.error = e
        finally:
            _env_pop(self._env)
            self._env = None
            self._done.set()

    def get(self):
        """The worker, once started (waits for a background start)."""
        self._done.wait(float(os.environ.get("BRAID_INIT_TIMEOUT") or 300) + 30)
        if self.error is not None:
            raise self.error
        if self.worker is None:
            raise _usage("the push/pull worker did not start in time (BRAID_INIT_TIMEOUT)")
        return self.worker

    def _closed_all(self):
        return self.refs <= 0

    def close(self, wait_s=_launch.EXIT_WAIT_S):
        """Leaves: the worker first, then (in-process server) the server once every worker
        of the group left (at most wait_s), so nobody loses a server it still uses."""
        self.refs -= 1
        if self.refs > 0:
            return
        if not self._done.is_set():
            return  # still starting in the background: leave it to the process's end
        w, self.worker = self.worker, None
        if w is not None:
            w.close()
        s, self.server = self.server, None
        if s is not None:
            deadline = time.monotonic() + wait_s
            try:
                while s.workers > 0 and time.monotonic() < deadline:
                    time.sleep(_launch.POLL_S)
            except BraidError:
                pass
            s.close()


class _SyncBackend:
    """braid_dist_sync's communicator (one per process and generation)."""

    def __init__(self, job, generation):
        global _ps_member
        self.closed = False
        self.job = job
        coord = _coordinator_of(job)
        tok = _env_push({"BRAID_GROUP": _launch.sync_group(generation)})
        try:
            self.comm = Communicator(coordinator=coord, world_size=job.workers, rank=job.rank,
                                     job_token=job.token)
        finally:
            _env_pop(tok)
        self.rank = self.comm.rank
        self.size = self.comm.size
        self.L = _lib.lib()
        self.h = self.comm.handle
        self._all_reduce = self.L.braid_all_reduce
        self._broadcast = self.L.braid_broadcast
        self.ps = None
        if job.servers > 0:
            # dedicated servers (DMLC_ROLE=server processes) wait for the workers of their
            # group: join it (idle) so they form it, and end when we leave
            if _ps_member is not None and not _ps_member._closed_all():
                _ps_member.refs += 1
            else:
                _ps_member = _PsMember(job, 0, background=True)
            self.ps = _ps_member

    def all_reduce(self, src, dst, n, code):
        st = self._all_reduce(src, dst, n, code, _lib.SUM, self.h)
        if st:
            raise self.L.error(st, "braid_all_reduce")

    def broadcast(self, ptr, n, code):
        st = self._broadcast(ptr, ptr, n, code, 0, self.h)
        if st:
            raise self.L.error(st, "braid_broadcast")

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            self.comm.close()
        finally:
            if self.ps is not None:
                self.ps.close()
                self.ps = None


class _AsyncBackend:
    """braid_dist_async's push/pull membership (one per process and generation)."""

    def __init__(self, job, generation):
        global _ps_member
        self.closed = False
        self.job = job
        self.L = _lib.lib()
        if job.servers > 0:
            if generation > 0:
                raise _usage("braid_dist_async with dedicated servers cannot be created again "
                             "after close() (the servers left with the workers)")
            if _ps_member is not None and not _ps_member._closed_all():
                _ps_member.refs += 1
            else:
                _ps_member = _PsMember(job, 0)
            self.ps = _ps_member
        else:
            self.ps = _PsMember(job, generation)
        self.worker = self.ps.get()
        self.wh = c_void_p(self.worker.handle)
        self.comm = None
        if job.rank is None:
            # the launcher did not fix ranks: a communicator of the workers assigns them
            tok = _env_push({"BRAID_GROUP": _launch.ps_group(generation) + ".ranks"})
            try:
                self.comm = Communicator(coordinator=_coordinator_of(job),
                                         world_size=job.workers, job_token=job.token)
            finally:
                _env_pop(tok)
            self.rank = self.comm.rank
        else:
            self.rank = job.rank
        self.size = job.workers
        self.stores = weakref.WeakSet()  # kvstores using this backend (pushes to wait for)

    def close(self):
        if self.closed:
            return
        self.closed = True
        for st in list(self.stores):
            st._drain_all()
        try:
            if self.ps is not None:
                self.ps.close()
                self.ps = None
        finally:
            if self.comm is not None:
                self.comm.close()
                self.comm = None


def _close_all():
    """atexit: every backend of this process, then the coordinator it hosts."""
    with _lock:
        bs = list(_backends.values())
        _backends.clear()
    for b in bs:
        try:
            b.close()
        except Exception:
            pass
    _launch.close_hosted()


atexit.register(_close_all)


# ---- the kvstores -------------------------------------------------------------------------
class _Base(mx.kv.KVStoreBase):
    _kind = None

    def __init__(self):
        self._b = _errors(_backend)(self._kind)
        self._updater = None

    @property
    def type(self):
        return type(self).__name__

    @property
    def rank(self):
        return self._b.rank

    @property
    def num_workers(self):
        return self._b.size

    #: What is_capable("optimizer") answers (see the subclasses).
    _optimizer_capable = True

    @classmethod
    def is_capable(cls, capability):
        if capability.lower() == mx.kv.KVStoreBase.OPTIMIZER:
            return cls._optimizer_capable
        raise ValueError(f"Unknown capability: {capability}")

    def _live(self):
        b = self._b
        if b.closed:
            raise _usage(f"this {self.type} kvstore is closed")
        return b

    def set_gradient_compression(self, compression_params):
        raise BraidMXNetError(f"{self.type} does not compress gradients "
                              f"(compression_params={compression_params!r})",
                              _lib.INVALID_ARGUMENT, "")

    def row_sparse_pull(self, key, out=None, priority=0, row_ids=None):
        raise BraidMXNetError(f"{self.type} takes dense NDArrays only (no row_sparse_pull)",
                              _lib.INVALID_ARGUMENT, "")

    def close(self):
        """Leaves the job: every kvstore of this type in this process stops working (also
        done at interpreter exit). Creating one again afterwards starts a new group."""
        self._b.close()


@mx.kv.KVStoreBase.register
class braid_dist_sync(_Base):  # noqa: N801 - MXNet names kvstores by lower-case class name
    """Synchronous data parallelism on braid's all-reduce.

    * ``pushpull(key, value, out=None)``: one all-reduce (sum over workers) of the local sum of
      `value` (an NDArray or a list: several devices), written to `out` or back into `value`.
    * ``push(key, value)``: the all-reduce of `value` becomes the key's stored value;
      ``pull(key, out)`` copies it out. ``init``/``broadcast``: rank 0's value.
    * ``set_optimizer(opt)`` (called directly, e.g. by Module-style code): pushes then apply
      the optimizer after the all-reduce, locally and identically on every worker (queued on
      MXNet's engine); pull and pushpull return the weights. ``is_capable("optimizer")`` is
      False, so gluon's Trainer all-reduces the gradients and updates with its own batched
      multi-tensor updater: measured faster (perf/mxnet_compare: 34 vs 50 ms per step at 2
      workers) than per-key updates inside the kvstore.
    * ``priority`` is accepted and does not reorder: every worker must run the same sequence of
      collectives, in call order (each call's all-reduce completes before it returns).
    """

    _kind = "sync"
    _optimizer_capable = False

    def __init__(self):
        super().__init__()
        self._stored = {}
        self._scratch = {}

    def _store_for(self, key, like):
        s = self._stored.get(key)
        if s is None:
            s = mx.nd.empty(like.shape, ctx=mx.cpu(), dtype=like.dtype)
            self._stored[key] = s
        elif s.size != like.size or s.dtype != like.dtype:
            raise BraidMXNetError(
                f"key {key!r} holds {s.size} elements of {np.dtype(s.dtype).name}, not "
                f"{like.size} of {np.dtype(like.dtype).name}", _lib.INVALID_ARGUMENT, "")
        return s

    def _scratch_for(self, key, like):
        s = self._scratch.get(key)
        if s is None or s.size != like.size or s.dtype != like.dtype:
            s = mx.nd.empty(like.shape, ctx=mx.cpu(), dtype=like.dtype)
            self._scratch[key] = s
        return s

    @_errors
    def init(self, key, value):
        b = self._live()
        for k, vals, _o in _items(key, value):
            self._bcast(b, k, vals[0], None)

    @_errors
    def broadcast(self, key, value, out, priority=0):
        b = self._live()
        for k, vals, outs in _items(key, value, out, need_out=True):
            self._bcast(b, k, vals[0], outs)

    def _bcast(self, b, k, v, outs):
        n, code, size = _info(v, k, "value")
        if outs and _infos(outs, k, "out") != (n, code, size):
            self._mismatch(k)
        s = self._store_for(k, v)
        sp = _ptr_write(s)
        vp = _ptr_read(v)
        if b.rank == 0 and vp != sp:
            _memmove(sp, vp, n * size)
        b.broadcast(sp, n, code)
        if outs:
            _copy_out(sp, n * size, outs)

    @staticmethod
    def _mismatch(k):
        raise BraidMXNetError(f"key {k!r}: out and value differ in size or dtype",
                              _lib.INVALID_ARGUMENT, "")

    @_errors
    def pushpull(self, key, value, out=None, priority=0):
        b = self._live()
        for k, vals, outs in _items(key, value, out):
            n, code, size = _infos(vals, k, "value")
            if outs and _infos(outs, k, "out") != (n, code, size):
                self._mismatch(k)
            s = self._stored.get(k)
            if s is not None and (s.size != n or _DTYPES[s.dtype][0] != code):
                # before any communication: the error is this worker's only
                self._store_for(k, vals[0])
            targets = outs if outs else vals
            if self._updater is not None:
                w = self._reduce_update(b, k, vals, n, code, size)
                for t in targets:
                    # on MXNet's engine, behind the update: this key's update and copies
                    # overlap the next keys' all-reduces
                    if t.handle.value == w.handle.value:
                        continue
                    if t.shape == w.shape:
                        w.copyto(t)
                    else:
                        _copy_out(_ptr_read(w), n * size, [t])
                continue
            if len(vals) == 1:
                v = vals[0]
                sp = _ptr_read(v)
                dst = targets[0]
                dp = _ptr_write(dst)
                b.all_reduce(sp, dp, n, code)
                _copy_out(dp, n * size, targets[1:])
            else:
                g = self._scratch_for(k, vals[0])
                gp = _local_sum(vals, g, n, size)
                b.all_reduce(gp, gp, n, code)
                _copy_out(gp, n * size, targets)

    def _reduce_update(self, b, k, vals, n, code, size):
        """All-reduce of the local sum into the scratch gradient, then the updater on the
        stored weight (queued on MXNet's engine, not waited for); returns the stored weight
        (an NDArray: reading it through MXNet orders after the update)."""
        s = self._stored.get(k)
        if s is None:
            raise BraidMXNetError(f"key {k!r} was never initialised (init or broadcast it "
                                  f"before pushing with an optimizer)", _lib.INVALID_USAGE, "")
        if s.size != n or _DTYPES[s.dtype][0] != code:
            self._store_for(k, vals[0])  # raises the mismatch
        g = self._scratch_for(k, vals[0])
        if len(vals) == 1:
            gp = _ptr_write(g)
            b.all_reduce(_ptr_read(vals[0]), gp, n, code)
        else:
            gp = _local_sum(vals, g, n, size)
            b.all_reduce(gp, gp, n, code)
        self._updater(k, g, s)
        return s

    @_errors
    def push(self, key, value, priority=0):
        b = self._live()
        for k, vals, _o in _items(key, value):
            n, code, size = _infos(vals, k, "value")
            if self._updater is not None:
                self._reduce_update(b, k, vals, n, code, size)
                continue
            s = self._store_for(k, vals[0])
            sp = _ptr_write(s)
            if len(vals) == 1:
                b.all_reduce(_ptr_read(vals[0]), sp, n, code)
            else:
                _local_sum(vals, s, n, size)
                b.all_reduce(sp, sp, n, code)

    @_errors
    def pull(self, key, out=None, priority=0, ignore_sparse=True):
        self._live()
        for k, _v, outs in _items(key, None, out, need_out=True):
            s = self._stored.get(k)
            if s is None:
                raise BraidMXNetError(f"key {k!r} was never initialised (init, broadcast or "
                                      f"push it before pulling)", _lib.INVALID_USAGE, "")
            n, code, size = _infos(outs, k, "out")
            if s.size != n or _DTYPES[s.dtype][0] != code:
                self._store_for(k, outs[0])  # raises the mismatch
            _copy_out(_ptr_read(s), n * size, outs)

    def set_optimizer(self, optimizer):
        """Pushes apply `optimizer` after the all-reduce, on every worker."""
        self._updater = mx.optimizer.get_updater(optimizer)

    def save_optimizer_states(self, fname, dump_optimizer=False):
        if self._updater is None:
            raise _usage("save_optimizer_states: no optimizer was set (set_optimizer)")
        with open(fname, "wb") as f:
            f.write(self._updater.get_states(dump_optimizer))

    def load_optimizer_states(self, fname):
        if self._updater is None:
            raise _usage("load_optimizer_states: no optimizer was set (set_optimizer)")
        with open(fname, "rb") as f:
            self._updater.set_states(f.read())


_STATE_FORMAT = "braid_dist_async/1"


@mx.kv.KVStoreBase.register
class braid_dist_async(_Base):  # noqa: N801 - MXNet names kvstores by lower-case class name
    """braid's push/pull servers (BRAID_PS_MODE: async by default, sync, bounded:TAU;
    BRAID_PS_REPLICAS; BRAID_PS_PARTITION_BYTES ...). Servers run inside the worker processes
    unless the job has dedicated ones (BRAID_PS_SERVERS or DMLC_NUM_SERVER).

    * ``init(key, value)``: rank 0 creates the key with its value (the first init wins: a job
      restarted on servers that hold the key keeps theirs); the other workers wait until it
      exists, and another shape or dtype than the key's is an error on that worker.
      ``broadcast``: init, then pull (rank 0's value to every worker).
    * ``push(key, value, priority)``: non-blocking (returns once the value was copied); a later
      pull of the key waits for it. ``pull``, ``pushpull``: blocking. Higher `priority` is
      sent first when queues build up.
    * ``set_optimizer(opt)``: an ``mx.optimizer.SGD`` runs on the servers (learning rate,
      momentum, wd, rescale_grad, clip_gradient); any other optimizer is refused.
    """

    _kind = "async"

    def __init__(self):
        super().__init__()
        self._keys = {}  # key -> (u64, elements, braid dtype, numpy dtype)
        self._pending = {}  # u64 -> [request handles of pushes]
        self._scratch = {}
        self._rule = None
        self._rule_params = None
        b = self._b
        self._w = b.worker
        L = b.L
        self._L = L
        self._c_init = L.braid_kv_init
        self._c_push = L.braid_kv_push
        self._c_pull = L.braid_kv_pull
        self._c_push_pull_wait = L.braid_kv_push_pull_wait
        self._c_push_pull_waitv = L.braid_kv_push_pull_waitv
        self._c_wait = L.braid_kv_wait
        self._c_test = L.braid_kv_test
        self._c_free = L.braid_kv_request_free
        self._k = c_uint64()
        self._n = c_size_t()
        self._req = c_void_p()
        self._ver = c_uint64()
        self._done_flag = c_int()
        b.stores.add(self)

    # -- raw calls (one key) --
    def _check(self, st, fn):
        if st:
            raise self._L.error(st, fn)

    def _wait_free(self, h):
        st = self._c_wait(h, byref(self._ver))
        self._c_free(h)
        self._check(st, "braid_kv_wait")

    def _drain(self, u):
        """Waits for this worker's pushes of key u (errors surface here)."""
        hs = self._pending.pop(u, None)
        if not hs:
            return
        err = None
        for h in hs:
            st = self._c_wait(h, byref(self._ver))
            self._c_free(h)
            if st and err is None:
                err = self._L.error(st, "braid_kv_wait")
        if err is not None:
            raise err

    def _reap(self, u):
        hs = self._pending.get(u)
        while hs:
            h = hs[0]
            st = self._c_test(h, byref(self._done_flag))
            if st == 0 and not self._done_flag.value:
                return
            hs.pop(0)
            self._c_free(h)
            self._check(st, "braid_kv_test")

    def _sgd_params(self, opt):
        clip = opt.clip_gradient
        return (float(opt.lr), float(getattr(opt, "momentum", 0.0) or 0.0), float(opt.wd),
                float(opt.rescale_grad), -1.0 if clip is None else float(clip))

    def _sync_rule(self):
        """Re-installs the servers' SGD when the optimizer's hyper-parameters changed (e.g.
        trainer.set_learning_rate)."""
        u = self._updater
        if u is None:
            return
        p = self._sgd_params(u.optimizer)
        if p != self._rule_params:
            self._install(u.optimizer, p)

    def _install(self, opt, params):
        lr, momentum, wd, rescale, clip = params
        rule = f"sgd:lr={lr!r},momentum={momentum!r},wd={wd!r},rescale={rescale!r}"
        if clip >= 0:
            rule += f",clip={clip!r}"
        if not self._L.has("braid_kv_set_rule"):
            raise _usage("braid_dist_async.set_optimizer needs braid_kv_set_rule, which this "
                         f"libbraid ({self._L.path}) does not export: rebuild it")
        self._check(self._L.braid_kv_set_rule(self._w.handle, rule.encode()),
                    "braid_kv_set_rule")
        self._rule = rule
        self._rule_params = params

    def _meta(self, k, v):
        n, code, size = _info(v, k, "value")
        u = _u64(k)
        m = self._keys.get(k)
        if m is not None and (m[1], m[2]) != (n, code):
            raise BraidMXNetError(
                f"key {k!r} holds {m[1]} elements of {np.dtype(m[3]).name}, not {n} of "
                f"{np.dtype(v.dtype).name}", _lib.INVALID_ARGUMENT, "braid_kv_init")
        return u, n, code, size

    def _known(self, k, n, code, what):
        """A key this worker initialised must keep its size and dtype: checked here, before
        anything is sent, so the error is this worker's only."""
        m = self._keys.get(k)
        if m is not None and (m[1] != n or m[2] != code):
            raise BraidMXNetError(
                f"key {k!r} holds {m[1]} elements of {np.dtype(m[3]).name}; this {what} has "
                f"{n} of {_NAMES[code]}", _lib.INVALID_ARGUMENT, "")

    def _source(self, k, vals, n, size):
        """Address of the locally summed value (a scratch NDArray for several devices)."""
        if len(vals) == 1:
            return _ptr_read(vals[0])
        g = self._scratch.get(k)
        if g is None or g.size != n or g.dtype != vals[0].dtype:
            g = mx.nd.empty(vals[0].shape, ctx=mx.cpu(), dtype=vals[0].dtype)
            self._scratch[k] = g
        return _local_sum(vals, g, n, size)

    @_errors
    def init(self, key, value):
        self._live()
        for k, vals, _o in _items(key, value):
            v = vals[0]
            u, n, code, size = self._init1(k, v)
            if self._b.rank != 0:
                # as MXNet's dist kvstores: the value is rank 0's; the others wait for it (and
                # learn there whether their shape and dtype agree)
                tmp = mx.nd.empty(v.shape, ctx=mx.cpu(), dtype=v.dtype)
                self._pull_checked(k, v, u, n, code, size, [tmp])

    def _pull_checked(self, k, v, u, n, code, size, outs):
        """A non-zero rank's pull after init; a failure other than a timeout asks braid's
        init for its verdict on this worker's length and dtype (a clear mismatch error)."""
        try:
            self._pull1(k, u, n, code, size, outs, 0)
        except BraidError as e:
            if isinstance(e, _lib.Timeout):
                raise
            self._k.value = u
            self._n.value = n
            st = self._c_init(self._w.handle, byref(self._k), byref(self._n), 1, _ptr_read(v),
                              code)
            if st:
                e2 = self._L.error(st, "braid_kv_init")
                raise BraidMXNetError(f"key {k!r} (braid key {u}) of {n} elements of "
                                      f"{np.dtype(v.dtype).name}: {e2}", e2.status,
                                      e2.function) from e
            raise

    def _init1(self, k, v):
        """Checks the key and, on rank 0, creates it with value `v` (braid_kv_init)."""
        u, n, code, size = self._meta(k, v)
        u_opt = self._updater
        if (u_opt is not None and code == _lib.FLOAT16
                and getattr(u_opt.optimizer, "multi_precision", False)):
            raise BraidMXNetError(
                f"key {k!r}: braid's servers cannot run SGD with multi_precision on float16 "
                f"weights; use update_on_kvstore=False (with kvstore='braid_dist_sync')",
                _lib.INVALID_ARGUMENT, "")
        if self._b.rank == 0:
            self._k.value = u
            self._n.value = n
            self._check(self._c_init(self._w.handle, byref(self._k), byref(self._n), 1,
                                     _ptr_read(v), code), "braid_kv_init")
        self._keys[k] = (u, n, code, v.dtype)
        return u, n, code, size

    @_errors
    def broadcast(self, key, value, out, priority=0):
        self._live()
        for k, vals, outs in _items(key, value, out, need_out=True):
            u, n, code, size = self._init1(k, vals[0])
            if _infos(outs, k, "out") != (n, code, size):
                raise BraidMXNetError(f"key {k!r}: out and value differ in size or dtype",
                                      _lib.INVALID_ARGUMENT, "")
            if self._b.rank == 0:
                self._pull1(k, u, n, code, size, outs, priority)
            else:
                self._pull_checked(k, vals[0], u, n, code, size, outs)

    @_errors
    def push(self, key, value, priority=0):
        self._live()
        self._sync_rule()
        for k, vals, _o in _items(key, value):
            n, code, size = _infos(vals, k, "value")
            self._known(k, n, code, "value")
            u = _u64(k)
            self._reap(u)
            src = self._source(k, vals, n, size)
            self._k.value = u
            self._n.value = n
            self._check(self._c_push(self._w.handle, byref(self._k), byref(self._n), 1, src,
                                     code, int(priority), byref(self._req)), "braid_kv_push")
            self._pending.setdefault(u, []).append(self._req.value)

    def _pull1(self, k, u, n, code, size, outs, priority):
        self._drain(u)
        dp = _ptr_write(outs[0])
        self._k.value = u
        self._n.value = n
        self._check(self._c_pull(self._w.handle, byref(self._k), byref(self._n), 1, dp, code,
                                 -1, int(priority), byref(self._req)), "braid_kv_pull")
        self._wait_free(self._req.value)
        _copy_out(dp, n * size, outs[1:])

    @_errors
    def pull(self, key, out=None, priority=0, ignore_sparse=True):
        self._live()
        for k, _v, outs in _items(key, None, out, need_out=True):
            n, code, size = _infos(outs, k, "out")
            self._known(k, n, code, "out")
            self._pull1(k, _u64(k), n, code, size, outs, priority)

    @_errors
    def pushpull(self, key, value, out=None, priority=0):
        self._live()
        self._sync_rule()
        calls = {}  # braid dtype -> ([u64 key], [source], [output], [elements])
        copies = []  # (output, bytes, further targets) per key
        for k, vals, outs in _items(key, value, out):
            n, code, size = _infos(vals, k, "value")
            if outs and _infos(outs, k, "out") != (n, code, size):
                raise BraidMXNetError(f"key {k!r}: out and value differ in size or dtype",
                                      _lib.INVALID_ARGUMENT, "")
            self._known(k, n, code, "value")
            u = _u64(k)
            self._drain(u)
            src = self._source(k, vals, n, size)
            targets = outs if outs else vals
            dp = _ptr_write(targets[0])
            for col, x in zip(calls.setdefault(code, ([], [], [], [])), (u, src, dp, n)):
                col.append(x)
            copies.append((dp, n * size, targets[1:]))
        # every key checked before anything is sent; then one call per dtype, waited for: no
        # copy of a source (unless it is its output, in place), the answers received straight
        # into the outputs, the keys of a list in flight together
        for code, (us, ss, ds, ns) in calls.items():
            if len(us) == 1:
                self._k.value = us[0]
                self._n.value = ns[0]
                self._check(self._c_push_pull_wait(self._w.handle, byref(self._k),
                                                   byref(self._n), 1, ss[0], ds[0], code,
                                                   int(priority), byref(self._ver)),
                            "braid_kv_push_pull_wait")
                continue
            m = len(us)
            self._check(self._c_push_pull_waitv(self._w.handle, (c_uint64 * m)(*us),
                                                (c_size_t * m)(*ns), m, (c_void_p * m)(*ss),
                                                (c_void_p * m)(*ds), code, int(priority),
                                                byref(self._ver)),
                        "braid_kv_push_pull_waitv")
        for dp, nbytes, rest in copies:
            _copy_out(dp, nbytes, rest)

    @_errors
    def set_optimizer(self, optimizer):
        """Installs `optimizer` (an mx.optimizer.SGD) on the servers."""
        self._live()
        name = type(optimizer).__name__
        if type(optimizer) is not mx.optimizer.SGD:
            raise BraidMXNetError(
                f"braid_dist_async runs SGD on its servers; {name} cannot run there; use "
                f"update_on_kvstore=False (MXNet's Trainer forces update_on_kvstore=True on "
                f"kvstores whose type contains 'async': use kvstore='braid_dist_sync')",
                _lib.INVALID_ARGUMENT, "")
        why = None
        if optimizer.lr_scheduler is not None:
            why = "a learning-rate scheduler (lr_scheduler)"
        elif any(float(v) != 1.0 for v in optimizer.lr_mult.values()) or any(
                float(getattr(p, "lr_mult", 1.0)) != 1.0
                for p in (optimizer.param_dict or {}).values()):
            why = "per-parameter lr_mult"
        elif any(float(v) != 1.0 for v in optimizer.wd_mult.values()) or any(
                float(getattr(p, "wd_mult", 1.0)) != 1.0
                for p in (optimizer.param_dict or {}).values()):
            why = "per-parameter wd_mult"
        elif optimizer.multi_precision and any(m[2] == _lib.FLOAT16
                                               for m in self._keys.values()):
            why = "multi_precision with float16 weights"
        if why is not None:
            raise BraidMXNetError(
                f"braid_dist_async's servers cannot run SGD with {why}; use "
                f"update_on_kvstore=False (with kvstore='braid_dist_sync')",
                _lib.INVALID_ARGUMENT, "")
        self._install(optimizer, self._sgd_params(optimizer))
        self._updater = mx.optimizer.get_updater(optimizer)

    def _state_keys(self):
        by_dtype = {}
        for k, (u, n, code, npdt) in self._keys.items():
            by_dtype.setdefault(code, []).append((k, u, n, npdt))
        return by_dtype

    @_errors
    def save_optimizer_states(self, fname, dump_optimizer=False):
        """The optimizer (pickled when dump_optimizer) and the servers' momentum of every key
        this worker initialised, in one file."""
        self._live()
        if self._updater is None:
            raise _usage("save_optimizer_states: no optimizer was set (set_optimizer)")
        if not self._L.has("braid_kv_pull_state"):
            raise _usage("braid_dist_async.save_optimizer_states needs braid_kv_pull_state, "
                         f"which this libbraid ({self._L.path}) does not export")
        for u in list(self._pending):
            self._drain(u)
        states = {}
        for _code, items in self._state_keys().items():
            outs = [np.zeros(n, dtype=npdt) for _k, _u, n, npdt in items]
            self._w.pull_state([u for _k, u, _n, _d in items], outs)
            for (k, _u, _n, _d), o in zip(items, outs):
                states[k] = o
        blob = {"format": _STATE_FORMAT, "states": states,
                "optimizer": self._updater.optimizer if dump_optimizer else None}
        with open(fname, "wb") as f:
            pickle.dump(blob, f)

    @_errors
    def load_optimizer_states(self, fname):
        """Restores a file of save_optimizer_states: the optimizer (when saved; installed on
        the servers) and the servers' momentum of the keys this worker initialised."""
        self._live()
        if not self._L.has("braid_kv_push_state"):
            raise _usage("braid_dist_async.load_optimizer_states needs braid_kv_push_state, "
                         f"which this libbraid ({self._L.path}) does not export")
        with open(fname, "rb") as f:
            blob = pickle.load(f)
        if not isinstance(blob, dict) or blob.get("format") != _STATE_FORMAT:
            raise BraidMXNetError(f"{fname} is not a braid_dist_async optimizer-state file",
                                  _lib.INVALID_ARGUMENT, "")
        if blob.get("optimizer") is not None:
            self.set_optimizer(blob["optimizer"])
        elif self._updater is None:
            raise _usage("load_optimizer_states: no optimizer was set and the file holds none")
        for u in list(self._pending):
            self._drain(u)
        states = blob["states"]
        for _code, items in self._state_keys().items():
            items = [it for it in items if it[0] in states]
            if not items:
                continue
            vals = []
            for k, _u, n, npdt in items:
                a = np.ascontiguousarray(states[k], dtype=npdt).reshape(-1)
                if a.size != n:
                    raise BraidMXNetError(f"{fname}: key {k!r} has {a.size} state elements, the "
                                          f"kvstore {n}", _lib.INVALID_ARGUMENT, "")
                vals.append(a)
            self._w.push_state([u for _k, u, _n, _d in items], vals)

    def _wait(self, key):
        """Waits for this worker's pushes of `key` (their errors are raised here)."""
        self._drain(_u64(key))

    def _done(self, key):
        """Whether every push of `key` by this worker has completed (never blocks)."""
        u = _u64(key)
        for h in self._pending.get(u, ()):
            st = self._c_test(h, byref(self._done_flag))
            self._check(st, "braid_kv_test")
            if not self._done_flag.value:
                return False
        return True

    def _drain_all(self):
        """Waits for (and frees) every pending push; their errors are dropped."""
        for u in list(self._pending):
            try:
                self._drain(u)
            except BraidError:
                pass

