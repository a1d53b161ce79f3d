"""braid: collective communication for distributed training (Python package over libbraid).

``import braid`` loads libbraid (installed inside this package by ``pip install``; the
environment variable ``BRAID_LIBRARY=/path/libbraid.so`` overrides which library is loaded)
through its C ABI. Framework integrations live in subpackages: ``braid.torch`` (a
torch.distributed backend named "braid") and ``braid.mxnet`` (MXNet kvstores
"braid_dist_sync" and "braid_dist_async"); ``braid.kv`` binds braid's push/pull servers and
workers (numpy arrays or raw buffers).

Errors from braid surface as :class:`BraidError` (a ``RuntimeError``) or one of its
subclasses, carrying braid's own message (which names the lost rank and host, both
signatures of a mismatch, the timeout).
"""

import ctypes

from . import _lib
from ._lib import (
    BraidError,
    InternalError,
    InvalidArgument,
    InvalidUsage,
    PeerError,
    SystemFailure,
    Timeout,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "library_path",
    "library_version",
    "cuda_available",
    "BraidError",
    "InvalidArgument",
    "InvalidUsage",
    "SystemFailure",
    "PeerError",
    "Timeout",
    "InternalError",
    "Coordinator",
    "Communicator",
]


def library_path():
    """Path of the libbraid this package uses."""
    return _lib.lib().path


def library_version():
    """The loaded libbraid's version as a string "MAJOR.MINOR.PATCH"."""
    v = ctypes.c_int()
    L = _lib.lib()
    L.check(L.braid_get_version(ctypes.byref(v)), "braid_get_version")
    code = v.value
    return f"{code // 10000}.{code // 100 % 100}.{code % 100}"


def _nccl_dirs():
    """The nvidia/nccl/lib directories of the installed nvidia-nccl-cu13 / -cu12 pip packages
    (torch's CUDA wheels depend on one), for BRAID_NCCL_DIRS."""
    import importlib.util
    import os
    dirs = []
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except (ImportError, ValueError):
        spec = None
    for p in (spec.submodule_search_locations or []) if spec else []:
        d = os.path.join(p, "lib")
        if os.path.isdir(d):
            dirs.append(d)
    return dirs


def _export_nccl_dirs():
    """Points libbraid at the pip packages' NCCL (BRAID_NCCL_DIRS) unless the user chose one
    (BRAID_NCCL_LIBRARY or BRAID_NCCL_DIRS set). Read by libbraid at its first device call."""
    import os
    if os.environ.get("BRAID_NCCL_LIBRARY") or os.environ.get("BRAID_NCCL_DIRS"):
        return
    dirs = _nccl_dirs()
    if dirs:
        os.environ["BRAID_NCCL_DIRS"] = ":".join(dirs)


def cuda_available():
    """``(True, description)`` when libbraid can use CUDA device buffers in this process
    (driver, device, NCCL or not), else ``(False, reason)``, e.g. ``(False, "braid_cuda_available:
    system error: no CUDA driver (libcuda.so.1 not found)")``."""
    _export_nccl_dirs()
    L = _lib.lib()
    if not L.has("braid_cuda_available"):
        return False, f"{L.path} has no device support (braid_cuda_available missing)"
    buf = ctypes.create_string_buffer(512)
    st = L.braid_cuda_available(buf, len(buf))
    if st != _lib.SUCCESS:
        return False, (L.braid_get_last_error() or b"").decode("utf-8", "replace")
    return True, buf.value.decode("utf-8", "replace")


class Coordinator:
    """braid's membership coordinator, hosted in this process (what braid-run or
    ``braid-coordinator`` run elsewhere). Communicators meet at ``host:port``.

    ``bind`` is "ip:port" ("0.0.0.0:0": every interface, a free port); ``job_token`` (str or
    bytes) makes registration and data connections authenticated (HMAC; never sent).
    """

    def __init__(self, bind="0.0.0.0:0", job_token=None):
        L = _lib.lib()
        self._L = L
        h = _lib.coordinator_t()
        tok = _bytes_or_none(job_token)
        L.check(L.braid_coordinator_start(bind.encode(), tok, ctypes.byref(h)),
                "braid_coordinator_start")
        self._h = h
        p = ctypes.c_int()
        L.check(L.braid_coordinator_port(h, ctypes.byref(p)), "braid_coordinator_port")
        self.port = p.value

    def close(self):
        """Stops the coordinator (communicators created through it keep their connections)."""
        h, self._h = getattr(self, "_h", None), None
        if h:
            self._L.check(self._L.braid_coordinator_destroy(h), "braid_coordinator_destroy")

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _bytes_or_none(s):
    if s is None:
        return None
    return s if isinstance(s, bytes) else str(s).encode()


class Communicator:
    """A braid communicator (the C handle ``braid_comm_t``), created collectively by every
    rank: ``Communicator(coordinator="host:port", world_size=N, rank=r, job_token=...)``.
    Arguments left as None come from the environment (BRAID_*, or torchrun's variables).

    Collectives on tensors are offered by framework integrations (``braid.torch``); this
    class holds the handle, membership calls and properties.
    """

    def __init__(self, coordinator=None, world_size=None, rank=None, timeout_s=None,
                 transport=None, job_token=None, _handle=None):
        L = _lib.lib()
        self._L = L
        if _handle is not None:
            self._h = _handle
            return
        cfg = _lib.Config()
        keep = []  # the encoded strings must outlive the call
        if coordinator is not None:
            keep.append(coordinator.encode())
            cfg.coordinator = keep[-1]
        if world_size is not None:
            cfg.world_size = int(world_size)
        if rank is not None:
            cfg.rank = int(rank)
        if timeout_s is not None:
            cfg.timeout_s = float(timeout_s)
        if transport is not None:
            keep.append(transport.encode())
            cfg.transport = keep[-1]
        if job_token is not None:
            keep.append(_bytes_or_none(job_token))
            cfg.job_token = keep[-1]
        h = _lib.comm_t()
        L.check(L.braid_comm_init(ctypes.byref(h), ctypes.byref(cfg)), "braid_comm_init")
        self._h = h

    @property
    def handle(self):
        """The C handle (a ctypes c_void_p); raises after close()."""
        if not self._h:
            raise InvalidUsage("the communicator is closed", _lib.INVALID_USAGE, "")
        return self._h

    def _int(self, fn, ctype=ctypes.c_int):
        v = ctype()
        self._L.check(getattr(self._L, fn)(self.handle, ctypes.byref(v)), fn)
        return v.value

    @property
    def rank(self):
        """This process's rank (position in the current view)."""
        return self._int("braid_comm_rank")

    @property
    def size(self):
        """Number of ranks."""
        return self._int("braid_comm_size")

    @property
    def member_id(self):
        """This member's id (unique for the coordinator's lifetime, never reused)."""
        return self._int("braid_comm_member_id", ctypes.c_uint64)

    @property
    def epoch(self):
        """Epoch of the installed membership view."""
        return self._int("braid_comm_epoch", ctypes.c_uint64)

    def update(self):
        """Adopts the next membership view if there is one (collective over the current view;
        elastic groups). Returns True when the view changed (rank and size may differ)."""
        return bool(self._int("braid_comm_update"))

    def leave(self):
        """Announces a graceful leave (keep calling update() until has_left())."""
        self._L.check(self._L.braid_comm_leave(self.handle), "braid_comm_leave")

    @property
    def has_left(self):
        """Whether this member left the group."""
        return bool(self._int("braid_comm_has_left"))

    def split(self, color, key=0):
        """ncclCommSplit: collective over all ranks; ranks with the same color >= 0 form a new
        communicator ordered by key (then rank); color None or < 0: returns None."""
        h = _lib.comm_t()
        c = _lib.SPLIT_NOCOLOR if color is None or color < 0 else int(color)
        self._L.check(self._L.braid_comm_split(self.handle, c, int(key), ctypes.byref(h)),
                      "braid_comm_split")
        return Communicator(_handle=h) if h.value else None

    def create_group(self, ranks, tag=0):
        """MPI_Comm_create_group: a communicator over `ranks` of this one (new rank = position
        in `ranks`), created by those ranks only (the others do not call)."""
        arr = (ctypes.c_int * len(ranks))(*[int(r) for r in ranks])
        h = _lib.comm_t()
        self._L.check(self._L.braid_comm_create_group(self.handle, arr, len(ranks), int(tag),
                                                      ctypes.byref(h)),
                      "braid_comm_create_group")
        return Communicator(_handle=h)

    def abort(self):
        """Fails every pending and later operation (from any thread; never blocks long)."""
        if self._h:
            self._L.check(self._L.braid_comm_abort(self._h), "braid_comm_abort")

    def close(self):
        """Frees the communicator (idempotent)."""
        h, self._h = self._h, None
        if h:
            self._L.check(self._L.braid_comm_destroy(h), "braid_comm_destroy")

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
