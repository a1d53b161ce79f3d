"""CUDA tensors in the braid backend: calls go to libbraid's ``_stream`` forms on the tensor's
current CUDA stream (NCCL's semantics: enqueued, the call returns at once), and the work they
return completes with a CUDA event recorded after them."""

import ctypes

import torch
import torch.distributed as dist

from .. import _lib
from ._work import DONE, PENDING


def stream_of(device):
    """The current torch stream of `device` and its raw cudaStream_t."""
    s = torch.cuda.current_stream(device)
    return s, ctypes.c_void_p(s.cuda_stream)


def async_error(pg):
    """The braid error of a device call of `pg` that failed on its stream, or None."""
    L = pg._L
    st = ctypes.c_int(0)
    rc = L.braid_comm_get_async_error(pg._h, ctypes.byref(st))
    if rc != _lib.SUCCESS:
        return L.error(rc, "braid_comm_get_async_error")
    if st.value != _lib.SUCCESS:
        return L.error(st.value, "braid device call")
    return None


class CudaWork(dist._Work):
    """A device operation enqueued on `stream`: like ProcessGroupNCCL's work, ``wait()``
    makes the caller's current stream wait for it (the host does not block), ``synchronize``
    and ``wait`` with a timeout block the host, ``get_future()`` is a CUDA-aware future
    completed at once (its users' streams wait on the work)."""

    def __init__(self, pg, result, stream, keep, what):
        super().__init__()
        self._pg = pg
        self._result = result
        self._stream = stream
        self._keep = keep  # tensors used by the enqueued work (alive until it ran)
        self._what = what
        self._event = torch.cuda.Event()
        self._event.record(stream)

    def _raise_if_failed(self):
        e = async_error(self._pg)
        if e is not None:
            raise e

    def wait(self, timeout=None):
        if timeout is not None and timeout.total_seconds() > 0:
            self._event.synchronize()
        else:
            torch.cuda.current_stream(self._stream.device).wait_event(self._event)
        self._raise_if_failed()
        return True

    def is_completed(self):
        return self._event.query()

    def is_success(self):
        return self.is_completed() and async_error(self._pg) is None

    def exception(self):
        return async_error(self._pg)

    def result(self):
        return self._result

    def synchronize(self):
        self._event.synchronize()
        self._raise_if_failed()

    def get_future(self):
        fut = torch.futures.Future(devices=[self._stream.device])
        with torch.cuda.stream(self._stream):
            fut.set_result(self._result)
        return fut


def run(pg, what, result, post, keep, calls, device):
    """Enqueues the libbraid calls [(name, args)] in their ``_stream`` form on `device`'s
    current stream, then `post` (torch copies, on the same stream); returns a CudaWork."""
    stream, raw = stream_of(device)
    L = pg._L
    for name, args in calls:
        fn = getattr(L, "braid_" + name + "_stream")
        st = fn(*args, raw)
        if st != _lib.SUCCESS:
            raise L.error(st, what)
    if post is not None:
        post()
    return CudaWork(pg, result, stream, keep, what)


def run_p2p_group(pg, ops, device):
    """Enqueues device sends/receives (send, ptr, count, dtype, peer, tag, tensor) as one
    braid group on `device`'s current stream; returns the stream."""
    stream, raw = stream_of(device)
    L = pg._L
    L.braid_group_start()
    for send, ptr, count, dt, peer, tag, _t in ops:
        (L.braid_send_stream if send else L.braid_recv_stream)(ptr, count, dt, peer, tag,
                                                               pg._h, raw)
    st = L.braid_group_end()
    if st != _lib.SUCCESS:
        raise L.error(st, "send/recv group")
    return stream


class PendingCudaWork(CudaWork):
    """A device send/recv recorded in the process group's pending group: enqueued with the
    group at the next operation or when waited on (then as CudaWork)."""

    _PENDING, _ENQUEUED = PENDING, DONE

    def __init__(self, pg, result, post, what, device):
        dist._Work.__init__(self)
        self._pg = pg
        self._result = result
        self._post = post
        self._what = what
        self._device = device
        self._stream = None
        self._event = None
        self._error = None
        self._keep = None
        self._state = self._PENDING

    def _enqueued(self, stream):
        self._stream = stream
        if self._post is not None:
            with torch.cuda.stream(stream):
                self._post()
        self._event = torch.cuda.Event()
        self._event.record(stream)
        self._state = self._ENQUEUED

    def _fail(self, exc):
        self._error = exc
        self._state = self._ENQUEUED

    def _ensure(self):
        if self._state == self._PENDING:
            self._pg._flush(self)
        if self._error is not None:
            raise self._error

    def wait(self, timeout=None):
        self._ensure()
        return super().wait(timeout)

    def is_completed(self):
        if self._state == self._PENDING:
            return False
        return self._error is not None or self._event.query()

    def is_success(self):
        return self._error is None and self.is_completed() and async_error(self._pg) is None

    def exception(self):
        return self._error if self._error is not None else async_error(self._pg)

    def synchronize(self):
        self._ensure()
        super().synchronize()

    def get_future(self):
        self._ensure()
        return super().get_future()
