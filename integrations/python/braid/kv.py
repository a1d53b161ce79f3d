"""braid.kv: braid's push/pull parameter servers from Python (no framework inside).

A job has S servers and W workers in one group on a coordinator (BRAID_GROUP, world size
W + S). Servers hold the values (sharded by consistent hashing, split into parts above
BRAID_PS_PARTITION_BYTES, replicated BRAID_PS_REPLICAS times) and apply the update rule
(BRAID_PS_RULE, or :meth:`KvWorker.set_rule` at run time) in the consistency mode
BRAID_PS_MODE (sync rounds, async, bounded:TAU). Workers init, push, pull and push-pull keys
(unsigned 64-bit integers)::

    srv = threading.Thread(target=lambda: servers.append(braid.kv.KvServer(...)))
    w = braid.kv.KvWorker(coordinator="host:port", world_size=W + S, job_token=tok)
    w.init([7], [np.zeros(1000, np.float32)])
    w.push([7], [grad]).wait()
    w.pull([7], [out]).wait()

Starting (``KvServer(...)``, ``KvWorker(...)``) blocks until the whole group registered, so
servers and workers must start concurrently (separate processes, or threads of one). Starting
reads the environment: arguments left None come from BRAID_COORDINATOR, BRAID_WORLD_SIZE,
BRAID_JOB_TOKEN, BRAID_TIMEOUT (or torchrun's variables); the settings braid reads only from
the environment (BRAID_GROUP, BRAID_PS_MODE, BRAID_PS_REPLICAS, BRAID_PS_PARTITION_BYTES,
BRAID_INIT_TIMEOUT, ...) can be given as ``group=`` and ``env={NAME: value}``: they are set in
``os.environ`` for the duration of the start call (and restored afterwards; a value None
unsets the variable).

Arrays are numpy arrays (C-contiguous; float16, float32, float64, int8, uint8, int16, int32,
uint32, int64, uint64) or raw ``(address, nbytes, dtype)`` triples (dtype a numpy dtype or a
``braid._lib`` datatype code). Failures raise :class:`braid.BraidError` subclasses carrying
braid's message.
"""

import ctypes
import json
import os
import threading
from ctypes import byref, c_int, c_size_t, c_uint64

from . import _bytes_or_none, _lib
from ._lib import InvalidArgument, InvalidUsage

__all__ = [
    "KvServer",
    "KvWorker",
    "KvRequest",
    "coordinator_status",
    "dtype_code",
]

try:  # numpy is optional for the raw (address, nbytes, dtype) forms
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is installed wherever the tests run
    _np = None

_NP_CODES = {
    "float16": _lib.FLOAT16,
    "float32": _lib.FLOAT32,
    "float64": _lib.FLOAT64,
    "int8": _lib.INT8,
    "uint8": _lib.UINT8,
    "int16": _lib.INT16,
    "int32": _lib.INT32,
    "uint32": _lib.UINT32,
    "int64": _lib.INT64,
    "uint64": _lib.UINT64,
    "bfloat16": _lib.BFLOAT16,
}


def dtype_code(dtype):
    """braid's datatype code (braid_datatype_t) of a numpy dtype, its name, or a code."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype not in _lib.DTYPE_SIZE:
            raise InvalidArgument(f"unknown braid datatype code {dtype}", _lib.INVALID_ARGUMENT,
                                  "")
        return dtype
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    if _np is not None and not isinstance(dtype, str):
        try:
            name = _np.dtype(dtype).name
        except TypeError:
            pass
    code = _NP_CODES.get(name)
    if code is None:
        raise InvalidArgument(
            f"dtype {name} is not supported by braid's push/pull (supported: "
            f"{', '.join(sorted(_NP_CODES))})", _lib.INVALID_ARGUMENT, "")
    return code


# ---- environment overrides (reference counted, so concurrent starts agree) ----------------
_env_lock = threading.Lock()
_env_saved = {}  # name -> [count, original value or None]


def _env_push(env):
    """Sets `env` (name -> value or None) in os.environ; returns the token for _env_pop."""
    if not env:
        return None
    with _env_lock:
        for k, v in env.items():
            ent = _env_saved.get(k)
            if ent is None:
                _env_saved[k] = [1, os.environ.get(k)]
            else:
                ent[0] += 1
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
    return list(env)


def _env_pop(token):
    """Undoes one _env_push: a name regains its original value once no start overrides it."""
    if not token:
        return
    with _env_lock:
        for k in token:
            ent = _env_saved.get(k)
            if ent is None:
                continue
            ent[0] -= 1
            if ent[0] == 0:
                del _env_saved[k]
                if ent[1] is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = ent[1]


def _config(coordinator, world_size, job_token, timeout_s, keep):
    cfg = _lib.Config()
    if coordinator is not None:
        keep.append(str(coordinator).encode())
        cfg.coordinator = keep[-1]
    if world_size is not None:
        cfg.world_size = int(world_size)
    if job_token is not None:
        keep.append(_bytes_or_none(job_token))
        cfg.job_token = keep[-1]
    if timeout_s is not None:
        cfg.timeout_s = float(timeout_s)
    return cfg


def _start(fn_name, coordinator, world_size, job_token, group, timeout_s, env):
    L = _lib.lib()
    over = dict(env or {})
    if group is not None:
        over["BRAID_GROUP"] = group
    keep = []
    cfg = _config(coordinator, world_size, job_token, timeout_s, keep)
    h = ctypes.c_void_p()
    tok = _env_push(over)
    try:
        L.check(getattr(L, fn_name)(byref(h), byref(cfg)), fn_name)
    finally:
        _env_pop(tok)
    return L, h


class KvServer:
    """A push/pull server of the group (blocks until the group formed; see the module doc).

    ``world_size`` is the number of members of the group: workers + servers.
    """

    def __init__(self, coordinator=None, world_size=None, job_token=None, group=None,
                 timeout_s=None, env=None):
        self._L, self._h = _start("braid_kv_server_start", coordinator, world_size, job_token,
                                  group, timeout_s, env)

    @property
    def workers(self):
        """Number of workers in this server's current view (0 once they all left)."""
        if not self._h:
            raise InvalidUsage("the server is closed", _lib.INVALID_USAGE, "")
        n = c_size_t()
        self._L.check(self._L.braid_kv_server_workers(self._h, byref(n)),
                      "braid_kv_server_workers")
        return n.value

    def close(self):
        """Stops the server: it leaves the group (replicas take over its keys). Idempotent."""
        h, self._h = getattr(self, "_h", None), None
        if h:
            self._L.check(self._L.braid_kv_server_destroy(h), "braid_kv_server_destroy")

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _as_buf(a):
    """(address, element count, datatype code, owner to keep alive) of an array argument."""
    if isinstance(a, tuple):
        if len(a) != 3:
            raise InvalidArgument("a raw buffer is an (address, nbytes, dtype) triple",
                                  _lib.INVALID_ARGUMENT, "")
        ptr, nbytes, dt = a
        code = dtype_code(dt)
        size = _lib.DTYPE_SIZE[code]
        if int(nbytes) % size:
            raise InvalidArgument(f"nbytes {nbytes} is not a multiple of the element size {size}",
                                  _lib.INVALID_ARGUMENT, "")
        return int(ptr or 0), int(nbytes) // size, code, None
    if _np is not None and isinstance(a, _np.ndarray):
        if not a.flags.c_contiguous:
            raise InvalidArgument("arrays must be C-contiguous (use numpy.ascontiguousarray)",
                                  _lib.INVALID_ARGUMENT, "")
        return a.ctypes.data, a.size, dtype_code(a.dtype), a
    raise InvalidArgument(f"expected a numpy array or an (address, nbytes, dtype) triple, got "
                          f"{type(a).__name__}", _lib.INVALID_ARGUMENT, "")


def _keys_arrays(keys, arrays):
    if isinstance(keys, (list, tuple)):
        keys = list(keys)
        if not isinstance(arrays, (list, tuple)) or len(arrays) != len(keys):
            raise InvalidArgument("give one array per key", _lib.INVALID_ARGUMENT, "")
        return keys, list(arrays)
    return [keys], [arrays]


def _key(k):
    k = int(k)
    if not 0 <= k < 1 << 64:
        raise InvalidArgument(f"key {k} is not an unsigned 64-bit integer",
                              _lib.INVALID_ARGUMENT, "")
    return k


def _pairs(keys, arrays, outs):
    """(key, source address, output address, elements, datatype code) per key of a push-pull;
    an output that differs from its input in length or dtype is refused before anything is
    sent."""
    out = []
    for k, a, o in zip(keys, arrays, outs):
        sp, n, code, _own = _as_buf(a)
        dp, m, code2, _own2 = _as_buf(o)
        if (m, code2) != (n, code):
            raise InvalidArgument(f"key {k}: the output differs from the input in length or "
                                  f"dtype", _lib.INVALID_ARGUMENT, "")
        out.append((k, sp, dp, n, code))
    return out


class KvRequest:
    """Pending push, pull or push-pull operations (one per key). Holds the arrays it uses
    until it is freed; :meth:`wait` returns the version (the smallest over its keys; 0 for a
    push)."""

    __slots__ = ("_L", "_hs", "_keep", "__weakref__")

    def __init__(self, L, handles, keep):
        self._L = L
        self._hs = handles
        self._keep = keep

    def wait(self):
        """Blocks until every operation completed (bounded by BRAID_TIMEOUT); raises braid's
        error of the first that failed. May be called again."""
        ver = None
        v = c_uint64()
        for h in self._hs:
            self._L.check(self._L.braid_kv_wait(h, byref(v)), "braid_kv_wait")
            ver = v.value if ver is None else min(ver, v.value)
        return 0 if ver is None else ver

    def test(self):
        """Whether every operation completed (raises the error of one that failed)."""
        d = c_int()
        for h in self._hs:
            self._L.check(self._L.braid_kv_test(h, byref(d)), "braid_kv_test")
            if not d.value:
                return False
        return True

    def free(self):
        """Frees the operations (waits for incomplete ones first; raises an error no wait or
        test reported). Idempotent."""
        hs, self._hs = self._hs, []
        err = None
        for h in hs:
            st = self._L.braid_kv_request_free(h)
            if st != _lib.SUCCESS and err is None:
                err = self._L.error(st, "braid_kv_request_free")
        self._keep = None
        if err is not None:
            raise err

    def __del__(self):
        try:
            self.free()
        except Exception:
            pass


class KvWorker:
    """A push/pull worker of the group (blocks until the group formed; see the module doc).

    ``world_size`` is the number of members of the group: workers + servers.
    """

    def __init__(self, coordinator=None, world_size=None, job_token=None, group=None,
                 timeout_s=None, env=None):
        self._L, self._h = _start("braid_kv_worker_start", coordinator, world_size, job_token,
                                  group, timeout_s, env)

    @property
    def handle(self):
        """The C handle (an int); raises after close()."""
        if not self._h:
            raise InvalidUsage("the worker is closed", _lib.INVALID_USAGE, "")
        return self._h.value

    # ---- raw single-key calls (addresses), for integrations with their own buffers ----------
    def init_raw(self, key, ptr, count, dtype):
        """braid_kv_init of one key of `count` elements at address `ptr` (blocking)."""
        k = c_uint64(key)
        n = c_size_t(count)
        self._L.check(self._L.braid_kv_init(self.handle, byref(k), byref(n), 1, ptr, dtype),
                      "braid_kv_init")

    def push_raw(self, key, ptr, count, dtype, priority=0):
        """braid_kv_push of one key (the buffer is copied before this returns); returns the
        request handle (an int) for wait_raw/test_raw/free_raw."""
        k = c_uint64(key)
        n = c_size_t(count)
        r = ctypes.c_void_p()
        self._L.check(self._L.braid_kv_push(self.handle, byref(k), byref(n), 1, ptr, dtype,
                                            int(priority), byref(r)), "braid_kv_push")
        return r.value

    def push_nocopy_raw(self, key, ptr, count, dtype, priority=0):
        """braid_kv_push_nocopy of one key (the buffer is sent from where it is and must stay
        unmodified until the request completed); returns the request handle."""
        k = c_uint64(key)
        n = c_size_t(count)
        r = ctypes.c_void_p()
        self._L.check(self._L.braid_kv_push_nocopy(self.handle, byref(k), byref(n), 1, ptr,
                                                   dtype, int(priority), byref(r)),
                      "braid_kv_push_nocopy")
        return r.value

    def pull_raw(self, key, ptr, count, dtype, priority=0, min_version=-1):
        """braid_kv_pull of one key into address `ptr` (written by completion); returns the
        request handle."""
        k = c_uint64(key)
        n = c_size_t(count)
        r = ctypes.c_void_p()
        self._L.check(self._L.braid_kv_pull(self.handle, byref(k), byref(n), 1, ptr, dtype,
                                            int(min_version), int(priority), byref(r)),
                      "braid_kv_pull")
        return r.value

    def push_pull_raw(self, key, src, dst, count, dtype, priority=0):
        """braid_kv_push_pull of one key (`src` copied before this returns, `dst` written by
        completion; they may be equal); returns the request handle."""
        k = c_uint64(key)
        n = c_size_t(count)
        r = ctypes.c_void_p()
        self._L.check(self._L.braid_kv_push_pull(self.handle, byref(k), byref(n), 1, src, dst,
                                                 dtype, int(priority), byref(r)),
                      "braid_kv_push_pull")
        return r.value

    def push_pull_nocopy_raw(self, key, src, dst, count, dtype, priority=0):
        """braid_kv_push_pull_nocopy of one key: as :meth:`push_pull_raw`, but `src` is sent
        from where it is (not copied; it must stay unmodified until the request completed);
        returns the request handle."""
        k = c_uint64(key)
        n = c_size_t(count)
        r = ctypes.c_void_p()
        self._L.check(self._L.braid_kv_push_pull_nocopy(self.handle, byref(k), byref(n), 1, src,
                                                        dst, dtype, int(priority), byref(r)),
                      "braid_kv_push_pull_nocopy")
        return r.value

    def push_pull_wait_raw(self, key, src, dst, count, dtype, priority=0):
        """braid_kv_push_pull_wait of one key: pushes `src` and pulls into `dst`, waiting for
        the answer (neither copied unless they overlap); returns the version."""
        k = c_uint64(key)
        n = c_size_t(count)
        v = c_uint64()
        self._L.check(self._L.braid_kv_push_pull_wait(self.handle, byref(k), byref(n), 1, src,
                                                      dst, dtype, int(priority), byref(v)),
                      "braid_kv_push_pull_wait")
        return v.value

    def wait_raw(self, req):
        """braid_kv_wait on a raw request handle; returns the version."""
        v = c_uint64()
        self._L.check(self._L.braid_kv_wait(req, byref(v)), "braid_kv_wait")
        return v.value

    def test_raw(self, req):
        """braid_kv_test on a raw request handle."""
        d = c_int()
        self._L.check(self._L.braid_kv_test(req, byref(d)), "braid_kv_test")
        return bool(d.value)

    def free_raw(self, req):
        """braid_kv_request_free on a raw request handle."""
        self._L.check(self._L.braid_kv_request_free(req), "braid_kv_request_free")

    # ---- array calls ---------------------------------------------------------------------
    def init(self, keys, arrays):
        """Creates keys with initial values (blocking; the first init of a key wins, later
        ones must agree on length and dtype)."""
        for k, a in zip(*_keys_arrays(keys, arrays)):
            ptr, n, code, _own = _as_buf(a)
            self.init_raw(_key(k), ptr, n, code)

    def push(self, keys, arrays, priority=0, copy=True):
        """Pushes arrays; returns a :class:`KvRequest`. With ``copy=True`` they are copied
        before this returns (braid_kv_push); with ``copy=False`` they are sent from where they
        are (braid_kv_push_nocopy: nothing copied, the call returns at once) and must not be
        modified until the request completed (its wait, a test that says True, or free)."""
        ks, arrs = _keys_arrays(keys, arrays)
        start = self.push_raw if copy else self.push_nocopy_raw
        # Uncopied arrays stay alive as long as the request.
        req = KvRequest(self._L, [], None if copy else arrs)
        for k, a in zip(ks, arrs):
            ptr, n, code, _own = _as_buf(a)
            req._hs.append(start(_key(k), ptr, n, code, priority))
        return req

    def pull(self, keys, outs, priority=0, min_version=-1):
        """Pulls keys into `outs` (written when the returned :class:`KvRequest` completes;
        min_version as braid_kv_pull)."""
        ks, arrs = _keys_arrays(keys, outs)
        req = KvRequest(self._L, [], arrs)
        for k, a in zip(ks, arrs):
            ptr, n, code, _own = _as_buf(a)
            req._hs.append(self.pull_raw(_key(k), ptr, n, code, priority, min_version))
        return req

    def push_pull(self, keys, arrays, outs, priority=0, copy=True):
        """Pushes `arrays` and pulls the keys' values into `outs` in one round trip (outs may
        be the arrays themselves); returns a :class:`KvRequest`. With ``copy=True`` the arrays
        are copied before this returns (braid_kv_push_pull); with ``copy=False`` they are sent
        from where they are (braid_kv_push_pull_nocopy: nothing copied, the call returns at
        once) and must not be modified until the request completed (its wait, a test that
        says True, or free); an array that is its own output is copied either way."""
        ks, arrs = _keys_arrays(keys, arrays)
        _, outs = _keys_arrays(keys, outs)
        pairs = _pairs(ks, arrs, outs)
        start = self.push_pull_raw if copy else self.push_pull_nocopy_raw
        # The request keeps the outputs alive, and the arrays too when they are not copied.
        req = KvRequest(self._L, [], outs if copy else (arrs, outs))
        for k, sp, dp, n, code in pairs:
            req._hs.append(start(_key(k), sp, dp, n, code, priority))
        return req

    def push_pull_waitv_raw(self, keys, srcs, dsts, counts, dtype, priority=0):
        """braid_kv_push_pull_waitv: pushes `srcs[i]` (an address, `counts[i]` elements of
        `dtype`) to `keys[i]` and pulls into `dsts[i]`, every key in flight together, waiting
        for all (neither side copied unless they overlap); returns the smallest version."""
        n = len(keys)
        k = (c_uint64 * n)(*keys)
        c = (c_size_t * n)(*counts)
        s = (ctypes.c_void_p * n)(*srcs)
        d = (ctypes.c_void_p * n)(*dsts)
        v = c_uint64()
        self._L.check(self._L.braid_kv_push_pull_waitv(self.handle, k, c, n, s, d, dtype,
                                                       int(priority), byref(v)),
                      "braid_kv_push_pull_waitv")
        return v.value

    def push_pull_wait(self, keys, arrays, outs, priority=0):
        """As :meth:`push_pull`, waited for: returns the version (the smallest over the keys).
        Neither side is copied: the arrays are sent as they are and the answers received
        straight into `outs` (outs may be the arrays themselves, which costs one copy of each).
        Every key is in flight together (braid_kv_push_pull_waitv; one call per dtype, in the
        order the dtypes first appear)."""
        ks, arrs = _keys_arrays(keys, arrays)
        _, outs = _keys_arrays(keys, outs)
        by_code = {}
        for k, sp, dp, n, code in _pairs(ks, arrs, outs):
            g = by_code.setdefault(code, ([], [], [], []))
            for col, x in zip(g, (_key(k), sp, dp, n)):
                col.append(x)
        ver = None
        for code, (kk, ss, dd, nn) in by_code.items():
            v = self.push_pull_waitv_raw(kk, ss, dd, nn, code, priority)
            ver = v if ver is None else min(ver, v)
        return 0 if ver is None else ver

    def set_rule(self, rule):
        """Installs update rule `rule` on every server ("sum", "sgd:LR" or
        "sgd:lr=..,momentum=..,wd=..,rescale=..,clip=.."); blocks until all acknowledged."""
        self._L.check(self._L.braid_kv_set_rule(self.handle, str(rule).encode()),
                      "braid_kv_set_rule")

    def _state(self, fn, keys, arrays):
        ks, arrs = _keys_arrays(keys, arrays)
        if not ks:
            return
        bufs = [_as_buf(a) for a in arrs]
        codes = {b[2] for b in bufs}
        if len(codes) != 1:
            raise InvalidArgument("state transfers take arrays of one dtype per call",
                                  _lib.INVALID_ARGUMENT, fn)
        code = codes.pop()
        # one call, values concatenated: copy through a staging array
        total = sum(b[1] for b in bufs)
        size = _lib.DTYPE_SIZE[code]
        stage = (ctypes.c_char * max(1, total * size))()
        kk = (c_uint64 * len(ks))(*[_key(k) for k in ks])
        nn = (c_size_t * len(ks))(*[b[1] for b in bufs])
        base = ctypes.addressof(stage)
        if fn == "braid_kv_push_state":
            off = 0
            for ptr, n, _c, _o in bufs:
                ctypes.memmove(base + off, ptr, n * size)
                off += n * size
        self._L.check(getattr(self._L, fn)(self.handle, kk, nn, len(ks), base, code), fn)
        if fn == "braid_kv_pull_state":
            off = 0
            for ptr, n, _c, _o in bufs:
                ctypes.memmove(ptr, base + off, n * size)
                off += n * size

    def pull_state(self, keys, outs):
        """The servers' optimizer state (momentum) of keys into `outs` (blocking; zeros where
        none exists yet). One dtype per call."""
        self._state("braid_kv_pull_state", keys, outs)

    def push_state(self, keys, arrays):
        """Replaces the servers' optimizer state (momentum) of keys (blocking). One dtype per
        call."""
        self._state("braid_kv_push_state", keys, arrays)

    def checkpoint(self, directory):
        """Writes a checkpoint of the group's push/pull state to `directory` (blocking)."""
        self._L.check(self._L.braid_kv_checkpoint(self.handle, os.fsencode(directory)),
                      "braid_kv_checkpoint")

    def close(self):
        """Leaves the group and frees the worker (wait for or free its requests first).
        Idempotent."""
        h, self._h = getattr(self, "_h", None), None
        if h:
            self._L.check(self._L.braid_kv_worker_destroy(h), "braid_kv_worker_destroy")

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def coordinator_status(coordinator):
    """The status document (a dict) of a :class:`braid.Coordinator` hosted in this process:
    groups, their members, ``live_members``, ``registered_total`` (see braid.h,
    braid_coordinator_status)."""
    L = _lib.lib()
    h = coordinator._h
    if not h:
        raise InvalidUsage("the coordinator is closed", _lib.INVALID_USAGE, "")
    n = c_size_t()
    cap = 4096
    for _ in range(8):
        buf = ctypes.create_string_buffer(cap)
        st = L.braid_coordinator_status(h, buf, cap, byref(n))
        if st == _lib.SUCCESS:
            return json.loads(buf.raw[: n.value].decode("utf-8"))
        if st == _lib.INVALID_ARGUMENT and n.value + 1 > cap:
            cap = n.value + 1 + 1024
            continue
        L.check(st, "braid_coordinator_status")
    raise InvalidUsage("the coordinator's status document kept growing", _lib.INVALID_USAGE,
                       "braid_coordinator_status")
