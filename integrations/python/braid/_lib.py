"""The C ABI of libbraid through ctypes: loading, prototypes, status codes and errors.

Everything in the ``braid`` package reaches braid through this module, so the ABI shipped
(``include/braid.h``) is the ABI tested. ctypes releases the GIL for the duration of every
foreign call (``ctypes.CDLL``), so a blocking braid call never stalls other Python threads.
"""

import ctypes
import os
import threading
from ctypes import (
    POINTER,
    c_char_p,
    c_double,
    c_int,
    c_size_t,
    c_int64,
    c_uint32,
    c_uint64,
    c_void_p,
)

# ---- status codes (braid_status_t) -------------------------------------------------------
SUCCESS = 0
INVALID_ARGUMENT = 1
INVALID_USAGE = 2
SYSTEM_ERROR = 3
REMOTE_ERROR = 4
TIMEOUT = 5
INTERNAL_ERROR = 6
IN_PROGRESS = 7

# ---- datatypes (braid_datatype_t) ---------------------------------------------------------
INT8, UINT8, INT32, UINT32, INT64, UINT64, FLOAT16, BFLOAT16, FLOAT32, FLOAT64, INT16 = range(11)
DTYPE_SIZE = {INT8: 1, UINT8: 1, INT16: 2, INT32: 4, UINT32: 4, INT64: 8, UINT64: 8,
              FLOAT16: 2, BFLOAT16: 2, FLOAT32: 4, FLOAT64: 8}

# ---- reduction operators (braid_redop_t) --------------------------------------------------
SUM, PROD, MIN, MAX, AVG, BAND, BOR, BXOR = range(8)

#: color of braid_comm_split for "not in any new communicator" (BRAID_SPLIT_NOCOLOR).
SPLIT_NOCOLOR = -1

CONFIG_VERSION = 1


class Config(ctypes.Structure):
    """braid_config_t (fields are only ever appended; see include/braid.h)."""

    _fields_ = [
        ("size", c_size_t),
        ("version", c_uint32),
        ("coordinator", c_char_p),
        ("world_size", c_int),
        ("rank", c_int),
        ("timeout_s", c_double),
        ("transport", c_char_p),
        ("job_token", c_char_p),
    ]

    def __init__(self):
        super().__init__()
        self.size = ctypes.sizeof(Config)
        self.version = CONFIG_VERSION
        self.coordinator = None
        self.world_size = -1
        self.rank = -1
        self.timeout_s = 0.0
        self.transport = None
        self.job_token = None


class BraidError(RuntimeError):
    """A braid call failed. ``status`` is the braid_status_t, ``function`` the C function, and
    the message is braid's own (it names a lost rank and its host, both signatures of a
    mismatch, the timeout)."""

    def __init__(self, message, status=INTERNAL_ERROR, function=""):
        super().__init__(message)
        self.status = status
        self.function = function


class InvalidArgument(BraidError, ValueError):
    """braid_invalid_argument: a bad argument, detected before anything was sent."""


class InvalidUsage(BraidError):
    """braid_invalid_usage: a call that is not allowed in this state."""


class SystemFailure(BraidError):
    """braid_system_error: the operating system refused something."""


class PeerError(BraidError):
    """braid_remote_error: a peer was lost, or failed and told us (the message names it)."""


class Timeout(BraidError, TimeoutError):
    """braid_timeout: a wait ran past its deadline."""


class InternalError(BraidError):
    """braid_internal_error: a bug in braid."""


_ERRORS = {
    INVALID_ARGUMENT: InvalidArgument,
    INVALID_USAGE: InvalidUsage,
    SYSTEM_ERROR: SystemFailure,
    REMOTE_ERROR: PeerError,
    TIMEOUT: Timeout,
    INTERNAL_ERROR: InternalError,
}

comm_t = c_void_p
request_t = c_void_p
coordinator_t = c_void_p
kv_server_t = c_void_p
kv_worker_t = c_void_p
kv_request_t = c_void_p

#: "no member" in the prev/next fields of a pipeline stage (BRAID_PIPELINE_NONE).
PIPELINE_NONE = 0xFFFFFFFFFFFFFFFF


class PipelineStage(ctypes.Structure):
    """braid_pipeline_stage_t: a stage's member, its blocks [first_block, end_block) and the
    members of its previous and next non-empty stages (PIPELINE_NONE: none)."""

    _fields_ = [
        ("member", c_uint64),
        ("first_block", c_uint64),
        ("end_block", c_uint64),
        ("prev", c_uint64),
        ("next", c_uint64),
    ]


class PipelineMove(ctypes.Structure):
    """braid_pipeline_move_t: a block changing owner in a re-plan (C field ``from`` is
    ``from_`` here: ``from`` is a Python keyword)."""

    _fields_ = [("block", c_uint64), ("from_", c_uint64), ("to", c_uint64)]


# name -> (argtypes); every function returns braid_status_t (int) unless listed in _RESTYPE.
_PROTOS = {
    "braid_get_version": [POINTER(c_int)],
    "braid_config_init": [POINTER(Config)],
    "braid_comm_init": [POINTER(comm_t), POINTER(Config)],
    "braid_comm_init_rank": [POINTER(comm_t), c_int, c_int, c_char_p],
    "braid_comm_rank": [comm_t, POINTER(c_int)],
    "braid_comm_size": [comm_t, POINTER(c_int)],
    "braid_comm_abort": [comm_t],
    "braid_comm_member_id": [comm_t, POINTER(c_uint64)],
    "braid_comm_epoch": [comm_t, POINTER(c_uint64)],
    "braid_comm_update": [comm_t, POINTER(c_int)],
    "braid_comm_leave": [comm_t],
    "braid_comm_has_left": [comm_t, POINTER(c_int)],
    "braid_sync_from_oldest": [c_void_p, c_size_t, c_int, comm_t],
    "braid_comm_destroy": [comm_t],
    "braid_comm_split": [comm_t, c_int, c_int, POINTER(comm_t)],
    "braid_comm_create_group": [comm_t, POINTER(c_int), c_int, c_int, POINTER(comm_t)],
    "braid_all_reduce": [c_void_p, c_void_p, c_size_t, c_int, c_int, comm_t],
    "braid_reduce_scatter": [c_void_p, c_void_p, c_size_t, c_int, c_int, comm_t],
    "braid_all_gather": [c_void_p, c_void_p, c_size_t, c_int, comm_t],
    "braid_broadcast": [c_void_p, c_void_p, c_size_t, c_int, c_int, comm_t],
    "braid_reduce": [c_void_p, c_void_p, c_size_t, c_int, c_int, c_int, comm_t],
    "braid_all_to_all": [c_void_p, c_void_p, c_size_t, c_int, comm_t],
    "braid_all_to_allv": [c_void_p, POINTER(c_size_t), POINTER(c_size_t), c_void_p,
                          POINTER(c_size_t), POINTER(c_size_t), c_int, comm_t],
    "braid_gather": [c_void_p, c_void_p, c_size_t, c_int, c_int, comm_t],
    "braid_scatter": [c_void_p, c_void_p, c_size_t, c_int, c_int, comm_t],
    "braid_barrier": [comm_t],
    "braid_send": [c_void_p, c_size_t, c_int, c_int, c_uint64, comm_t],
    "braid_recv": [c_void_p, c_size_t, c_int, c_int, c_uint64, comm_t],
    "braid_group_start": [],
    "braid_group_end": [],
    "braid_igroup_end": [POINTER(request_t)],
    "braid_iall_reduce": [c_void_p, c_void_p, c_size_t, c_int, c_int, comm_t, POINTER(request_t)],
    "braid_ireduce_scatter": [c_void_p, c_void_p, c_size_t, c_int, c_int, comm_t,
                              POINTER(request_t)],
    "braid_iall_gather": [c_void_p, c_void_p, c_size_t, c_int, comm_t, POINTER(request_t)],
    "braid_ibroadcast": [c_void_p, c_void_p, c_size_t, c_int, c_int, comm_t, POINTER(request_t)],
    "braid_ireduce": [c_void_p, c_void_p, c_size_t, c_int, c_int, c_int, comm_t,
                      POINTER(request_t)],
    "braid_iall_to_all": [c_void_p, c_void_p, c_size_t, c_int, comm_t, POINTER(request_t)],
    "braid_iall_to_allv": [c_void_p, POINTER(c_size_t), POINTER(c_size_t), c_void_p,
                           POINTER(c_size_t), POINTER(c_size_t), c_int, comm_t,
                           POINTER(request_t)],
    "braid_igather": [c_void_p, c_void_p, c_size_t, c_int, c_int, comm_t, POINTER(request_t)],
    "braid_iscatter": [c_void_p, c_void_p, c_size_t, c_int, c_int, comm_t, POINTER(request_t)],
    "braid_ibarrier": [comm_t, POINTER(request_t)],
    "braid_isend": [c_void_p, c_size_t, c_int, c_int, c_uint64, comm_t, POINTER(request_t)],
    "braid_irecv": [c_void_p, c_size_t, c_int, c_int, c_uint64, comm_t, POINTER(request_t)],
    "braid_recv_any": [c_void_p, c_size_t, c_int, c_uint64, comm_t, POINTER(c_int)],
    "braid_irecv_any": [c_void_p, c_size_t, c_int, c_uint64, comm_t, POINTER(request_t)],
    "braid_request_source": [request_t, POINTER(c_int)],
    "braid_test": [request_t, POINTER(c_int)],
    "braid_wait": [request_t],
    "braid_wait_for": [request_t, c_double, POINTER(c_int)],
    "braid_request_free": [request_t],
    "braid_coordinator_start": [c_char_p, c_char_p, POINTER(coordinator_t)],
    "braid_coordinator_port": [coordinator_t, POINTER(c_int)],
    "braid_coordinator_destroy": [coordinator_t],
    "braid_comm_view_members": [comm_t, POINTER(c_uint64), POINTER(c_double), c_size_t,
                                POINTER(c_size_t)],
    "braid_pipeline_plan": [POINTER(c_uint64), POINTER(c_double), c_size_t, POINTER(c_double),
                            c_size_t, POINTER(PipelineStage), POINTER(c_double)],
    "braid_pipeline_replan": [POINTER(c_uint64), POINTER(c_double), c_size_t, POINTER(c_double),
                              c_size_t, POINTER(PipelineStage), c_size_t,
                              POINTER(PipelineStage), POINTER(c_double), POINTER(PipelineMove),
                              c_size_t, POINTER(c_size_t)],
    "braid_pipeline_plan_view": [comm_t, POINTER(c_double), c_size_t, POINTER(PipelineStage),
                                 POINTER(c_double)],
    "braid_pipeline_replan_view": [comm_t, POINTER(c_double), c_size_t, POINTER(PipelineStage),
                                   c_size_t, POINTER(PipelineStage), POINTER(c_double),
                                   POINTER(PipelineMove), c_size_t, POINTER(c_size_t)],
    "braid_pipeline_report": [comm_t, c_double, c_uint64, c_uint64, POINTER(c_double), c_size_t],
    "braid_coordinator_status": [coordinator_t, c_void_p, c_size_t, POINTER(c_size_t)],
    # CUDA device buffers: the _stream forms (a trailing cudaStream_t), device memory
    "braid_all_reduce_stream": [c_void_p, c_void_p, c_size_t, c_int, c_int, comm_t, c_void_p],
    "braid_reduce_scatter_stream": [c_void_p, c_void_p, c_size_t, c_int, c_int, comm_t,
                                    c_void_p],
    "braid_all_gather_stream": [c_void_p, c_void_p, c_size_t, c_int, comm_t, c_void_p],
    "braid_broadcast_stream": [c_void_p, c_void_p, c_size_t, c_int, c_int, comm_t, c_void_p],
    "braid_reduce_stream": [c_void_p, c_void_p, c_size_t, c_int, c_int, c_int, comm_t,
                            c_void_p],
    "braid_all_to_all_stream": [c_void_p, c_void_p, c_size_t, c_int, comm_t, c_void_p],
    "braid_all_to_allv_stream": [c_void_p, POINTER(c_size_t), POINTER(c_size_t), c_void_p,
                                 POINTER(c_size_t), POINTER(c_size_t), c_int, comm_t,
                                 c_void_p],
    "braid_gather_stream": [c_void_p, c_void_p, c_size_t, c_int, c_int, comm_t, c_void_p],
    "braid_scatter_stream": [c_void_p, c_void_p, c_size_t, c_int, c_int, comm_t, c_void_p],
    "braid_barrier_stream": [comm_t, c_void_p],
    "braid_send_stream": [c_void_p, c_size_t, c_int, c_int, c_uint64, comm_t, c_void_p],
    "braid_recv_stream": [c_void_p, c_size_t, c_int, c_int, c_uint64, comm_t, c_void_p],
    "braid_mem_alloc_device": [c_size_t, POINTER(c_void_p)],
    "braid_mem_free_device": [c_void_p],
    "braid_comm_get_async_error": [comm_t, POINTER(c_int)],
    "braid_cuda_available": [c_char_p, c_size_t],
    # push/pull (keys: uint64_t arrays, lens: size_t arrays; buffers as plain addresses)
    "braid_kv_server_start": [POINTER(kv_server_t), POINTER(Config)],
    "braid_kv_server_destroy": [kv_server_t],
    "braid_kv_server_workers": [kv_server_t, POINTER(c_size_t)],
    "braid_kv_worker_start": [POINTER(kv_worker_t), POINTER(Config)],
    "braid_kv_worker_destroy": [kv_worker_t],
    "braid_kv_checkpoint": [kv_worker_t, c_char_p],
    "braid_kv_init": [kv_worker_t, c_void_p, c_void_p, c_size_t, c_void_p, c_int],
    "braid_kv_push": [kv_worker_t, c_void_p, c_void_p, c_size_t, c_void_p, c_int, c_int,
                      POINTER(kv_request_t)],
    "braid_kv_push_nocopy": [kv_worker_t, c_void_p, c_void_p, c_size_t, c_void_p, c_int,
                             c_int, POINTER(kv_request_t)],
    "braid_kv_pull": [kv_worker_t, c_void_p, c_void_p, c_size_t, c_void_p, c_int, c_int64,
                      c_int, POINTER(kv_request_t)],
    "braid_kv_push_pull": [kv_worker_t, c_void_p, c_void_p, c_size_t, c_void_p, c_void_p,
                           c_int, c_int, POINTER(kv_request_t)],
    "braid_kv_push_pull_nocopy": [kv_worker_t, c_void_p, c_void_p, c_size_t, c_void_p,
                                  c_void_p, c_int, c_int, POINTER(kv_request_t)],
    "braid_kv_push_pull_wait": [kv_worker_t, c_void_p, c_void_p, c_size_t, c_void_p,
                                c_void_p, c_int, c_int, POINTER(c_uint64)],
    "braid_kv_push_pull_waitv": [kv_worker_t, c_void_p, c_void_p, c_size_t, c_void_p,
                                 c_void_p, c_int, c_int, POINTER(c_uint64)],
    "braid_kv_wait": [kv_request_t, POINTER(c_uint64)],
    "braid_kv_test": [kv_request_t, POINTER(c_int)],
    "braid_kv_request_free": [kv_request_t],
    "braid_kv_set_rule": [kv_worker_t, c_char_p],
    "braid_kv_pull_state": [kv_worker_t, c_void_p, c_void_p, c_size_t, c_void_p, c_int],
    "braid_kv_push_state": [kv_worker_t, c_void_p, c_void_p, c_size_t, c_void_p, c_int],
}


class _Missing:
    """Stands for a C function this libbraid does not export (an older library)."""

    def __init__(self, name, path):
        self.name = name
        self.path = path

    def __call__(self, *args):
        raise InvalidUsage(
            f"{self.name} is not exported by {self.path}: this libbraid is older than the "
            f"braid Python package (rebuild it, or unset BRAID_LIBRARY)",
            INVALID_USAGE,
            self.name,
        )


class Lib:
    """The loaded libbraid: one attribute per C function (a ctypes function or _Missing)."""

    def __init__(self, path):
        self.path = path
        self.dll = ctypes.CDLL(path)
        for name, argtypes in _PROTOS.items():
            try:
                f = getattr(self.dll, name)
            except AttributeError:
                setattr(self, name, _Missing(name, path))
                continue
            f.argtypes = argtypes
            f.restype = c_int
            setattr(self, name, f)
        f = self.dll.braid_get_last_error
        f.argtypes = []
        f.restype = c_char_p
        self.braid_get_last_error = f
        f = self.dll.braid_status_string
        f.argtypes = [c_int]
        f.restype = c_char_p
        self.braid_status_string = f

    def has(self, name):
        """Whether this library exports C function `name`."""
        return not isinstance(getattr(self, name, None), _Missing)

    def error(self, status, function):
        """The Python exception for a failed call (reads this thread's last error)."""
        msg = (self.braid_get_last_error() or b"").decode("utf-8", "replace")
        if not msg:
            msg = f"{function}: {self.braid_status_string(status).decode()}"
        return _ERRORS.get(status, BraidError)(msg, status, function)

    def check(self, status, function):
        """Raises the braid error of `status` (from C function `function`) unless success."""
        if status != SUCCESS:
            raise self.error(status, function)


_lock = threading.Lock()
_lib = None


def default_path():
    """The libbraid this package loads: BRAID_LIBRARY, else the one installed inside the
    package, else (a source checkout) target/release/libbraid.so of the repository."""
    env = os.environ.get("BRAID_LIBRARY")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    inside = os.path.join(here, "libbraid.so")
    if os.path.exists(inside):
        return inside
    repo = os.path.dirname(os.path.dirname(os.path.dirname(here)))
    for profile in ("release", "debug"):
        p = os.path.join(repo, "target", profile, "libbraid.so")
        if os.path.exists(p):
            return p
    return inside


def lib():
    """The process's libbraid (loaded at first use)."""
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                path = default_path()
                if not os.path.exists(path):
                    raise ImportError(
                        f"libbraid not found at {path}: install the package with "
                        f"`pip install ./integrations/python` (it builds libbraid), or set "
                        f"BRAID_LIBRARY=/path/to/libbraid.so"
                    )
                _lib = Lib(path)
    return _lib
