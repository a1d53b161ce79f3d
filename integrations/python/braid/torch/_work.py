"""Requests, works and the completion watcher of the braid torch backend.

A braid operation is issued in one of three ways:

* a synchronous torch collective (``async_op=False``: torch waits at once) runs right away
  on the calling thread through the blocking C call; no thread hand-off, so small messages
  cost what braid costs.
* ``dist.send``/``dist.recv`` (which torch waits on at once) and ``batch_isend_irecv`` are
  recorded as a *pending* group, run as ONE braid group by the first wait on any of them
  (blocking, on the waiting thread) or started non-blocking when anything else happens.
* everything else (``async_op=True``, ``isend``/``irecv``, calls from C++ such as DDP's
  reducer) is started with braid's non-blocking calls (braid_i*), which braid's progress
  thread drives; ``wait()`` blocks in ``braid_wait`` (GIL released), and ``get_future()``
  hands the work to the process's watcher thread, which completes futures in issue order (no
  Python thread per operation; see :class:`Watcher`).
"""

import ctypes
import queue
import sys
import threading
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import _lib

PENDING, RUNNING, DONE = 0, 1, 2


class Request:
    """One braid_request_t, possibly shared by several works (a group of sends and receives).

    braid forbids two threads using one request at once; the lock serialises them (a thread
    blocked on it waits without the GIL)."""

    __slots__ = ("h", "lock", "status", "exc", "L", "keep", "what", "__weakref__")

    def __init__(self, L, h, what, keep=None):
        self.L = L
        self.h = h
        self.what = what
        self.lock = threading.Lock()
        self.status = None  # braid status once complete
        self.exc = None  # the error (read on the thread that saw the failure)
        self.keep = keep  # buffers the operation reads or writes: alive until completion

    def _done(self, st):
        if st != _lib.SUCCESS:
            self.exc = self.L.error(st, self.what)
        self.status = st

    def wait(self):
        """Blocks until complete; returns the braid status (idempotent)."""
        if self.status is not None:
            return self.status
        with self.lock:
            if self.status is None:
                self._done(self.L.braid_wait(self.h))
        return self.status

    def test(self):
        """The status if complete, else None (never blocks; None while another thread waits)."""
        if self.status is not None:
            return self.status
        if not self.lock.acquire(blocking=False):
            return None
        try:
            if self.status is None:
                done = ctypes.c_int()
                st = self.L.braid_test(self.h, ctypes.byref(done))
                if done.value or st != _lib.SUCCESS:
                    self._done(st)
            return self.status
        finally:
            self.lock.release()

    def wait_for(self, seconds):
        """Waits at most `seconds`; the status if complete, else None."""
        if self.status is not None:
            return self.status
        with self.lock:
            if self.status is None:
                done = ctypes.c_int()
                st = self.L.braid_wait_for(self.h, max(0.0, seconds), ctypes.byref(done))
                if done.value or st != _lib.SUCCESS:
                    self._done(st)
        return self.status

    def __del__(self):
        h, self.h = self.h, None
        if not h:
            return
        if self.status is None:
            # Still running: its buffers must outlive it. The watcher waits and frees it.
            try:
                _watcher().free_later(h, self.keep)
            except Exception:  # interpreter shutdown: no new thread; the process ends anyway
                pass
            return
        try:
            self.L.braid_request_free(h)
        except Exception:
            pass


class Watcher:
    """The threads that complete futures of non-blocking operations and free requests dropped
    before they completed; they wait with the GIL released.

    Futures complete, and their callbacks run, one at a time in issue order on the first
    thread, so every rank runs them in the same order: callbacks that issue collectives (a
    DDP comm hook's chain) issue them in the same order everywhere. A callback may also issue
    an operation and wait for its future (torch's PowerSGD hook does, twice per bucket): what
    a watcher thread issues goes to the next thread, one per such level of nesting, which
    completes it while the callback waits. (A callback that waits for the future of an
    operation issued elsewhere and completed after its own still waits forever.)"""

    #: Most levels of nesting (threads); deeper operations share the last one.
    MAX_LEVELS = 64

    def __init__(self):
        self.lock = threading.Lock()
        self.queues = []
        self._queue(0)

    def _queue(self, level):
        """The queue of `level`, its thread started first if needed."""
        with self.lock:
            while len(self.queues) <= level:
                if self.queues and (len(self.queues) >= self.MAX_LEVELS or sys.is_finalizing()):
                    return self.queues[-1]
                q = queue.SimpleQueue()
                t = threading.Thread(target=self._run, args=(q, len(self.queues)),
                                     name=f"braid-torch-watcher-{len(self.queues)}", daemon=True)
                t.start()
                self.queues.append(q)
            return self.queues[level]

    def _run(self, q, level):
        _nesting.level = level
        while True:
            item = q.get()
            try:
                if item[0] == "work":
                    item[1]._finish()
                else:
                    _, h, _keep = item
                    L = _lib.lib()
                    L.braid_wait(h)
                    L.braid_request_free(h)
            except Exception:
                pass

    def _put(self, item):
        # Issued by a watcher thread (in a callback): the next level completes it.
        self._queue(getattr(_nesting, "level", -1) + 1).put(item)

    def watch(self, work):
        """Completes `work` (and its future) when its requests complete."""
        self._put(("work", work))

    def free_later(self, h, keep):
        """Waits for request `h` and frees it (its buffers `keep` stay alive until then)."""
        self._put(("free", h, keep))


# The nesting level of a watcher thread (absent on every other thread).
_nesting = threading.local()

_w = None
_w_lock = threading.Lock()


def _watcher():
    global _w
    if _w is None:
        with _w_lock:
            if _w is None:
                if sys.is_finalizing():
                    # A thread started while the interpreter shuts down never runs, and
                    # Thread.start() would wait for it forever (a hang at exit).
                    raise RuntimeError("interpreter shutting down: no watcher thread")
                _w = Watcher()
    return _w


# ---- callback depth ------------------------------------------------------------------------
#
# A process group's operations form ONE stream per rank, which every rank must issue in the
# same order. Operations issued from a future's callbacks (a DDP comm hook's chain: PowerSGD
# issues two all_reduces per bucket from callbacks) are issued whenever the future completes,
# while the main thread (DDP's backward) keeps issuing its own: the two interleave differently
# on every rank. So they go to a communicator of their own: an operation issued by a callback
# of a future of an operation at depth d runs at depth d + 1 (the main thread is depth 0), on
# the process group's depth-(d + 1) communicator, created when first needed. Each depth's
# operations are issued in the same order everywhere: callbacks run in their futures' order.
#
# The depth follows the callback, not the thread: torch runs a callback added to a future
# that is already complete on the adding thread at once, and a chain's later callbacks on
# the thread that completed the earlier ones. torch's Future is a C++ type whose callbacks
# braid cannot see, so its then/add_done_callback are wrapped (see _patch): callbacks added
# to braid's futures, and to futures chained from them, run with the depth set; every
# other future is left exactly as it was.

#: The most depths (communicators) a process group uses; deeper callbacks share the last.
MAX_DEPTH = 8

_ctx = threading.local()  # .depth: the depth of the callback running on this thread


def depth():
    """The depth of the calling context: 0 outside callbacks of braid futures."""
    return getattr(_ctx, "depth", 0)


_depth_of = weakref.WeakKeyDictionary()  # future -> the depth its callbacks run at
_patched = False
_patch_lock = threading.Lock()


def _at(callback, d):
    def run(fut):
        prev = getattr(_ctx, "depth", 0)
        _ctx.depth = d
        try:
            return callback(fut)
        finally:
            _ctx.depth = prev
    return run


def _lookup(fut):
    try:
        return _depth_of.get(fut)
    except TypeError:  # not weak-referenceable
        return None


def _patch():
    global _patched
    with _patch_lock:
        if _patched:
            return
        C = torch._C.Future
        then0, add0 = C.then, C.add_done_callback

        def then(self, callback):
            d = _lookup(self)
            if d is None:
                return then0(self, callback)
            out = then0(self, _at(callback, d))
            track(out, d)
            return out

        def add_done_callback(self, callback):
            d = _lookup(self)
            return add0(self, callback if d is None else _at(callback, d))

        then.__doc__, add_done_callback.__doc__ = then0.__doc__, add0.__doc__
        C.then, C.add_done_callback = then, add_done_callback
        _patched = True


def track(fut, d):
    """Callbacks added to `fut`, and to the futures chained from it, run at depth `d`."""
    if not _patched:
        _patch()
    try:
        _depth_of[fut] = min(d, MAX_DEPTH)
    except TypeError:
        pass


class _Failed:
    """The value of a base future whose operation failed (see Work.get_future)."""

    __slots__ = ("exc",)

    def __init__(self, exc):
        self.exc = exc


def _unwrap(fut):
    v = fut.value()
    if isinstance(v, _Failed):
        raise v.exc
    return v


class Work(dist._Work):
    """The torch ``Work`` of one braid operation.

    ``wait(timeout)`` blocks until the operation completed (raising the braid error it
    failed with), ``is_completed()``/``is_success()``/``exception()`` never block,
    ``get_future()`` completes with the output tensors (DDP comm hooks use it),
    ``result()`` returns them."""

    # Defaults as class attributes: creating a work sets four fields (small calls are
    # latency-bound).
    _state = PENDING
    _reqs = ()
    _exc = None
    _fut = None  # base future, completed by _resolve
    _user_fut = None  # what get_future() returned: base.then(_unwrap)
    _lock = None  # created when the work starts running (threads may then race)
    _src = -1
    _any = None  # the Request of a receive from any source (see source_rank)
    _depth = 0  # the depth it was issued at (see depth())

    def __init__(self, pg, result, post, what):
        dist._Work.__init__(self)
        self._pg = pg
        self._result = result
        self._post = post
        self._what = what
        d = getattr(_ctx, "depth", 0)
        if d:
            self._depth = d

    def _running(self, reqs):
        self._lock = threading.Lock()
        self._reqs = reqs
        self._state = RUNNING

    # ---- driving ----------------------------------------------------------------------

    def _kick(self):
        """Starts a pending operation non-blocking (idempotent)."""
        if self._state == PENDING:
            self._pg._flush(self)

    def _finish(self, timeout_s=None):
        """Completes the work (waits for its requests; runs copy-backs once). Returns False
        when `timeout_s` passed first."""
        if self._state == DONE:
            return True
        if self._state == PENDING:
            self._pg._run_pending(self)
            if self._state == DONE:
                return True
        with self._lock:
            if self._state == DONE:
                return True
            exc = None
            for r in self._reqs:
                st = r.wait() if timeout_s is None else r.wait_for(timeout_s)
                if st is None:
                    return False
                if st != _lib.SUCCESS and exc is None:
                    exc = r.exc
            fut = self._complete(exc)
        self._resolve(fut)
        return True

    def _complete(self, exc):
        """Marks the work done (its operation has completed, failed with `exc` or not);
        returns the future to resolve (outside any lock: its callbacks may call back)."""
        self._exc = exc
        if self._exc is None and self._post is not None:
            try:
                self._post()
            except Exception as e:  # a copy-back failed: report it through the work
                self._exc = e
        self._post = None
        self._reqs = ()
        self._state = DONE
        return self._fut

    def _resolve(self, fut):
        # `fut` is the private base future (see get_future).
        if fut is not None and not fut.done():
            fut.set_result(self._result if self._exc is None else _Failed(self._exc))

    # ---- torch's Work API ---------------------------------------------------------------

    def wait(self, timeout=None):
        """Blocks until done; raises the operation's error. With a timeout (timedelta or
        seconds) that passes first, raises a braid Timeout (the operation keeps running)."""
        secs = None
        if timeout is not None:
            secs = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
            if secs <= 0:
                secs = None  # torch's kNoTimeout
        if not self._finish(secs):
            raise _lib.Timeout(
                f"braid: {self._what} did not complete within {secs:.3f} s (Work.wait timeout); "
                f"it is still running",
                _lib.TIMEOUT,
                self._what,
            )
        if self._exc is not None:
            raise self._exc
        return True

    def is_completed(self):
        """Whether the operation completed (successfully or not); never blocks."""
        if self._state == PENDING:
            self._kick()
        if self._state == DONE:
            return True
        if all(r.test() is not None for r in self._reqs):
            self._finish()
            return True
        return False

    def is_success(self):
        """Whether it completed without error (False while running)."""
        return self.is_completed() and self._exc is None

    def exception(self):
        """The error it failed with, or None."""
        if self.is_completed():
            return self._exc
        return None

    def result(self):
        """The output tensors (waits first)."""
        self.wait()
        return self._result

    def source_rank(self):
        """The peer of a receive (of a receive from any source: the rank its message came
        from, once it completed)."""
        if self._any is not None and self._state == DONE and self._exc is None:
            src = ctypes.c_int(-1)
            r = self._any
            r.L.check(r.L.braid_request_source(r.h, ctypes.byref(src)), "braid_request_source")
            self._src, self._any = src.value, None
        return self._src

    # torch's dist.recv(src=None) asks this name
    _source_rank = source_rank

    def synchronize(self):
        """Waits (CPU tensors: nothing is stream-ordered)."""
        self.wait()

    def get_future(self):
        """A torch.futures.Future completed with the output tensors, or failed with the
        operation's error.

        torch's Python ``Future.set_exception`` completes a future *successfully* with the
        exception object as its value, which C++ consumers (DDP's reducer) then read as
        tensors (a crash). So the future handed out is ``base.then(unwrap)``: the callback
        raises the error, which C++ records as a real failure of the returned future.

        Its callbacks run one depth deeper than this operation (see depth()): what they
        issue goes to the group's next communicator."""
        if self._user_fut is None:
            self._fut = torch.futures.Future()
            self._user_fut = self._fut.then(_unwrap)
            track(self._user_fut, self._depth + 1)
            if self._state == PENDING:
                self._kick()
            if self._state == DONE:
                self._resolve(self._fut)
            else:
                _watcher().watch(self)
        return self._user_fut
