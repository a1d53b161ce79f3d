"""Elastic pipeline training over braid: a model cut into numbered blocks runs as a pipeline
over the members of a running (elastic) braid job, re-planned when members join, die or slow
down, without restarting any process.

```python
from braid.torch.pipeline import ElasticPipeline
pipe = ElasticPipeline(blocks=[make_block(i) for i in range(10)], loss_fn=nn.MSELoss(),
                       optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                       micro_batches=4, checkpoint_dir="ckpt", checkpoint_every=5)
while pipe.step_count < steps:
    loss = pipe.step(lambda s: data(s))     # or pipe.step((inputs, targets))
```

Every member builds every block (and one optimizer per block, so a block's optimizer state
travels with it); each member owns the blocks of its stage. ``step()`` first adopts a new
membership view if there is one (:func:`braid.torch.update`), re-plans with libbraid's planner
(``braid_pipeline_replan``: balanced contiguous stages by member weight, fewest blocks moved),
moves the blocks that change owner (parameters + optimizer state, by send/recv), then runs one
GPipe step: every micro-batch forward (activations to the next stage), then every micro-batch
backward in reverse order (input gradients to the previous stage), a commit all-reduce, and
the per-block optimizer steps. The very first ``step()`` adopts the current view without an
update: on a joiner it must meet the running members' adoption, which follows their update.

Design decisions (the brief leaves these to the implementation):

* **How joiners (and survivors) learn the job's state.** After every view change every member
  all-gathers one int64 vector: its step count (-1 for a joiner that never adopted a plan), the
  step of its last complete checkpoint, its adoption generation, the stage it held in the
  previous plan (id space, stage id, block range), its member id, and the *version* of each
  block it holds (the step count at which its copy of the block is current; -1 for none). This
  is a superset of "the oldest member broadcasts the meta": joiners learn the step, the
  checkpoint step and the previous plan from it, and everyone learns who holds every block at
  which step, which is what recovery needs. The re-plan's ``previous`` is the previous plan as
  the surviving members report it (translated into the new plan's id space when replication
  is switched on or off); the moves actually made follow the gathered versions, not the
  planner's move list (they differ only after failures: a block whose previous owner died is
  fetched from a surviving copy or restored). Everything after the gather is computed
  identically on every member from the same data, so no further agreement is needed.
* **The first plan.** Members that construct the pipeline in the group's first view (epoch 1)
  are founders at step 0; the founder of rank 0 is taken to hold every block at version 0 (its
  own initial parameters) and the owners receive their blocks from it, so members need not
  initialise identically (if it dies before the first step, the oldest survivor's own initial
  parameters are used instead: nothing was trained yet). Members constructing the pipeline in
  a later view are joiners.
* **Tag layout** (64 bits): ``0xB`` in bits 60-63, direction in bits 58-59 (0 forward
  activation, 1 backward gradient, 2 block state), bit 57 = 0 for the header and 1 for the
  payload, the adoption generation in bits 40-56 (17 bits; agreed in the gather, +1 at every
  adoption, so a retried step never matches messages of a failed attempt), the step in bits
  16-39 (24 bits) and the micro-batch or block index in bits 0-15. braid matches messages
  between two ranks in order and refuses a receive whose tag differs ("mismatch").
* **Header layout**: every tensor is preceded by an int64 tensor of :data:`HEADER_LEN` = 13
  elements ``[step, index, direction, dtype code, ndim, shape[0..8)]`` (unused shape entries
  0; dtype codes index :data:`DTYPES`). The receiver checks step, index and direction against
  what it expects and the dtype/shape for sanity before it allocates the payload; a mismatch
  raises :class:`PipelineError` ("... expected micro-batch 2 forward, got micro-batch 3
  forward of step 7"), never silently using the data.
* **Commit before the optimizer step**: after the backward (and the replicas' gradient
  all-reduce) every member joins one all-reduce over the whole group of ``[1, its share of the
  loss]``; it completes only when every member finished its part of the step, so no member
  steps its optimizers for a step that failed anywhere (the sum also gives every member the
  loss). A member lost *during* this all-reduce can leave survivors at different step counts;
  the gather after the view change sees that and everyone restores the last checkpoint.
* **Failure handling**: a step failing with a braid peer error, timeout or system error
  prints ``# step S failed: <error> (lost: member M ...)``, adopts the next view and re-plans.
  If every block still has a current copy on a survivor and all survivors are at the same
  step (replicated stages; or a lost member that held no block), training continues from those
  copies. Otherwise every member restores every block it owns in the new plan from the last
  complete checkpoint, the step count goes back to the checkpoint's step and ``# restored step
  S from DIR`` is printed; without a checkpoint a :class:`PipelineError` names the lost blocks.
  The step is then retried (a callable batch gets the step number, so data that depends on
  the step only is reproduced). A loss that ``update()`` itself meets between two steps is
  reported the same way (``# step S failed: lost member M (rank R) ...``). Any other error of
  a step (a header mismatch, an exception in a block or the loss function) aborts this
  member's communicator, so the other members fail at once instead of waiting for its
  messages (they go on without it once it has exited), and is raised.
* **Checkpoints** (``checkpoint(dir)``, collective; automatic every ``checkpoint_every``
  steps and once at step 0 so an early failure is recoverable): the first replica of each
  stage writes ``dir/step-S/block-<i>.pt`` (0-based block index; ``{"params": state_dict,
  "opt": optimizer state_dict}``; temp file + rename), a barrier, then the member of rank 0
  writes ``dir/step-S/manifest.json`` ``{step, blocks, plan}`` and atomically replaces
  ``dir/latest`` (its content: ``step-S``), removes checkpoints older than the previous one,
  and a second barrier makes the checkpoint count as complete on every member. The directory
  must be shared by all members (one host, or a shared file system). When no member of a view
  holds the job's state at all, ``dir/latest`` is restored.
* **Replication**: with ``replicas=R`` (or members outnumbering blocks) the plan is over stage
  groups: member of rank r belongs to group ``r * G // n`` (G = max(1, n // R) groups of
  contiguous ranks), group g plans as virtual member g+1 with the sum of its members'
  weights. Micro-batch m goes to replica ``m % R_g`` of each stage; replicas all-reduce (sum)
  their blocks' gradients in a per-stage communicator (``braid_comm_split``) before the commit.
* **Loss**: the mean over micro-batches of ``loss_fn(out_mb, target_mb)`` (micro-batches from
  ``tensor_split``); with equal micro-batches and a mean-reduced loss this equals the full
  batch loss, and the gradients equal the full-batch gradients up to float rounding.
* **Metrics**: each stage times its own compute (forward + backward of its blocks, not the
  waits) with ``clock`` (default ``time.perf_counter``), multiplies it by ``slowdown``
  (sleeping the extra time) and reports it with ``braid_pipeline_report`` after every step
  (skipped while the library lacks the function, and for non-elastic groups).

Printed with ``verbose`` (every member): ``# plan epoch=E: 1-3|4-6|7-9|10`` (1-based block
ranges of the non-empty stages in order; a replicated stage once), ``# replan epoch=E
moved_bytes=X model_bytes=Y`` (tensor bytes of parameters + optimizer state moved, and of the
whole model), ``# first step on epoch E plan after T s`` (from the start of the view's
adoption to the end of the first step on its plan), the failure and restore lines above.

Limitations: CPU tensors (braid's torch backend); one pipeline per process group; a member
that leaves gracefully (:func:`braid.torch.leave`) is treated as lost.
"""

import collections
import ctypes
import io
import json
import math
import os
import re
import shutil
import sys
import time

import torch

from .. import _lib
from .._lib import PeerError, SystemFailure, Timeout
from . import _pg, _work
from ._backend import _reduce_spec
from . import update as _update

__all__ = [
    "ElasticPipeline",
    "PipelineError",
    "Stage",
    "Move",
    "plan",
    "replan",
    "view_members",
    "tag_for",
    "make_header",
    "check_header",
    "send_tensor",
    "recv_tensor",
    "FORWARD",
    "BACKWARD",
    "BLOCK",
    "HEADER_LEN",
    "DTYPES",
]

FORWARD, BACKWARD, BLOCK = 0, 1, 2
_DIR_NAMES = {FORWARD: "forward", BACKWARD: "backward", BLOCK: "block"}

#: Elements of a header tensor (int64): step, index, direction, dtype code, ndim, 8 sizes.
HEADER_LEN = 13
_MAX_NDIM = HEADER_LEN - 5
#: dtype codes of headers (index in this list).
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128]
_MAX_BYTES = 1 << 40  # a header announcing more is refused (a forged or corrupt header)

_RECOVERABLE = (PeerError, Timeout, SystemFailure)
_MEMBER_SPACE, _GROUP_SPACE = 0, 1
_META = 8  # fields of the gathered state vector before the block versions


class PipelineError(RuntimeError):
    """The pipeline cannot go on: a header that does not match what this stage expects, a
    block lost with no checkpoint to restore it from, inconsistent arguments. ``collective``
    is True when every member raises it (a decision taken from the same data everywhere)."""

    def __init__(self, message, collective=False):
        super().__init__(message)
        self.collective = collective


Stage = collections.namedtuple("Stage", "member first end prev next")
Stage.__doc__ = """A stage of a plan: `member` holds blocks [first, end) (0-based; empty when
equal); `prev`/`next`: members of the previous/next non-empty stage, or None."""
Move = collections.namedtuple("Move", "block from_ to")
Move.__doc__ = "A block changing owner in a re-plan (from_ -> to)."


# ---- the planner (libbraid's C ABI) ---------------------------------------------------------

def _u64s(values):
    return (ctypes.c_uint64 * max(1, len(values)))(*[int(v) for v in values])


def _doubles(values):
    return (ctypes.c_double * max(1, len(values)))(*[float(v) for v in values])


def _none(v):
    return None if v == _lib.PIPELINE_NONE else int(v)


def _stages_out(arr, n):
    return [Stage(int(s.member), int(s.first_block), int(s.end_block), _none(s.prev),
                  _none(s.next)) for s in arr[:n]]


def plan(members, weights, costs):
    """Balanced contiguous stages of blocks with `costs` over `members` (distinct ids, in
    stage order) with `weights` (> 0), by ``braid_pipeline_plan``. Returns (stages,
    max_cost)."""
    L = _lib.lib()
    n, nb = len(members), len(costs)
    out = (_lib.PipelineStage * max(1, n))()
    mc = ctypes.c_double()
    L.check(L.braid_pipeline_plan(_u64s(members), _doubles(weights), n, _doubles(costs), nb,
                                  out, ctypes.byref(mc)), "braid_pipeline_plan")
    return _stages_out(out, n), mc.value


def replan(members, weights, costs, previous=()):
    """Re-plans (``braid_pipeline_replan``): an optimal plan over `members` moving the fewest
    blocks away from their owners in `previous` (Stage-like tuples ``(member, first, end,
    ...)``, any members, no block twice). Returns (stages, max_cost, moves)."""
    L = _lib.lib()
    n, nb = len(members), len(costs)
    prev = (_lib.PipelineStage * max(1, len(previous)))()
    for i, s in enumerate(previous):
        prev[i].member, prev[i].first_block, prev[i].end_block = int(s[0]), int(s[1]), int(s[2])
        prev[i].prev = prev[i].next = _lib.PIPELINE_NONE
    out = (_lib.PipelineStage * max(1, n))()
    mc = ctypes.c_double()
    moves = (_lib.PipelineMove * max(1, nb))()
    nm = ctypes.c_size_t()
    L.check(L.braid_pipeline_replan(_u64s(members), _doubles(weights), n, _doubles(costs), nb,
                                    prev if previous else None, len(previous), out,
                                    ctypes.byref(mc), moves, nb, ctypes.byref(nm)),
            "braid_pipeline_replan")
    mv = [Move(int(m.block), int(m.from_), int(m.to)) for m in moves[:nm.value]]
    return _stages_out(out, n), mc.value, mv


def view_members(group=None):
    """(member ids, weights) of a braid group's current view, in rank order
    (``braid_comm_view_members``)."""
    pg = _pg(group)
    L = pg._L
    cap = pg.comm.size
    while True:
        ids = (ctypes.c_uint64 * cap)()
        ws = (ctypes.c_double * cap)()
        cnt = ctypes.c_size_t()
        st = L.braid_comm_view_members(pg._handle(), ids, ws, cap, ctypes.byref(cnt))
        if st == _lib.INVALID_ARGUMENT and cnt.value > cap:
            cap = cnt.value
            continue
        L.check(st, "braid_comm_view_members")
        return [int(i) for i in ids[:cnt.value]], [float(w) for w in ws[:cnt.value]]


# ---- tagged, header-checked point to point --------------------------------------------------

def tag_for(generation, step, index, direction, part):
    """The braid tag of a pipeline message (see the module docstring): `part` 0 is the
    header, 1 the payload."""
    return ((0xB << 60) | ((direction & 0x3) << 58) | ((part & 0x1) << 57)
            | ((generation & 0x1FFFF) << 40) | ((step & 0xFFFFFF) << 16) | (index & 0xFFFF))


def _what(index, direction):
    if direction == BLOCK:
        return f"block {index} state"
    return f"micro-batch {index} {_DIR_NAMES.get(direction, f'direction {direction}')}"


def make_header(step, index, direction, tensor):
    """The int64 header announcing `tensor` as message (`step`, `index`, `direction`)."""
    if tensor.dtype not in DTYPES:
        raise PipelineError(f"pipeline: cannot send a tensor of dtype {tensor.dtype}")
    if tensor.dim() > _MAX_NDIM:
        raise PipelineError(f"pipeline: cannot send a tensor of {tensor.dim()} dimensions "
                            f"(at most {_MAX_NDIM})")
    h = torch.zeros(HEADER_LEN, dtype=torch.int64)
    h[0], h[1], h[2] = int(step), int(index), int(direction)
    h[3], h[4] = DTYPES.index(tensor.dtype), tensor.dim()
    for i, s in enumerate(tensor.shape):
        h[5 + i] = int(s)
    return h


def check_header(header, step, index, direction, peer=None):
    """Checks a received header against the message expected; returns (dtype, shape) of the
    payload, or raises PipelineError naming what was expected and what came."""
    src = f", from rank {peer}" if peer is not None else ""
    where = f"pipeline (step {step}{src})"
    if header.dtype != torch.int64 or header.numel() != HEADER_LEN:
        raise PipelineError(f"{where}: expected {_what(index, direction)}, got a header of "
                            f"{header.numel()} {header.dtype} elements")
    h = [int(v) for v in header.tolist()]
    if (h[0], h[1], h[2]) != (int(step), int(index), int(direction)):
        raise PipelineError(f"{where}: expected {_what(index, direction)}, got "
                            f"{_what(h[1], h[2])} of step {h[0]}")
    code, ndim = h[3], h[4]
    if not 0 <= code < len(DTYPES):
        raise PipelineError(f"{where}: expected {_what(index, direction)}, got a header with "
                            f"unknown dtype code {code}")
    if not 0 <= ndim <= _MAX_NDIM or any(s < 0 for s in h[5:5 + ndim]) or any(h[5 + ndim:]):
        raise PipelineError(f"{where}: expected {_what(index, direction)}, got a header with "
                            f"shape fields {h[4:]}")
    shape = tuple(h[5:5 + ndim])
    dtype = DTYPES[code]
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes > _MAX_BYTES:
        raise PipelineError(f"{where}: expected {_what(index, direction)}, got a header "
                            f"announcing {nbytes} bytes")
    return dtype, shape


def send_tensor(group, tensor, dst, step, index, direction, generation=0):
    """Starts sending `tensor` (cpu) to rank `dst` of braid `group` as message (`step`,
    `index`, `direction`): a header, then the payload, each with its own tag. Returns the
    works (wait on them before reusing the tensor)."""
    pg = _pg(group)
    t = tensor.detach()
    t = t if t.is_contiguous() else t.contiguous()
    h = make_header(step, index, direction, t)
    works = [pg._p2p_now(True, h, dst, tag_for(generation, step, index, direction, 0))]
    if t.numel():
        works.append(pg._p2p_now(True, t, dst, tag_for(generation, step, index, direction, 1)))
    return works


def recv_tensor(group, src, step, index, direction, generation=0):
    """Receives message (`step`, `index`, `direction`) from rank `src`: checks its header
    (:func:`check_header`) and returns the payload as a new tensor."""
    pg = _pg(group)
    h = torch.zeros(HEADER_LEN, dtype=torch.int64)
    pg._p2p_now(False, h, src, tag_for(generation, step, index, direction, 0)).wait()
    dtype, shape = check_header(h, step, index, direction, peer=src)
    t = torch.empty(shape, dtype=dtype)
    if t.numel():
        pg._p2p_now(False, t, src, tag_for(generation, step, index, direction, 1)).wait()
    return t


# ---- helpers ---------------------------------------------------------------------------------

def _ranges(chain):
    def one(a, b):
        return f"{a + 1}" if b - a == 1 else f"{a + 1}-{b}"
    return "|".join(one(s["first"], s["end"]) for s in chain)


def _state_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


def _step_dirs(directory):
    out = []
    try:
        names = os.listdir(directory)
    except OSError:
        return out
    for n in names:
        m = re.fullmatch(r"step-(\d+)", n)
        if m:
            out.append((int(m.group(1)), os.path.join(directory, n)))
    return sorted(out)


def _write_atomic(path, write):
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


class ElasticPipeline:
    """A model cut into `blocks` (``torch.nn.Module``, every member builds all of them) trained
    as a pipeline over the members of braid `group` (default: the default group); see the
    module docstring for the schedule, planning, recovery and what is printed.

    `loss_fn(output, target)` is applied by the last stage to each micro-batch;
    `optimizer(params)` builds the optimizer of one block (one per block, so its state moves
    with the block; blocks without parameters get none). `block_costs` (default: the
    parameter count of each block, at least 1) drive the plan. `replicas`: members per stage
    (None: 1, or members // blocks when members outnumber blocks). `slowdown` (>= 1) makes this
    member's stage compute that many times slower (it sleeps the extra), for drills.
    `clock`: the timer of the stage compute reported as a metric (default
    ``time.perf_counter``; ``time.thread_time`` measures CPU time, steadier on an
    oversubscribed host).
    """

    def __init__(self, blocks, loss_fn, optimizer, micro_batches=1, group=None,
                 block_costs=None, checkpoint_dir=None, checkpoint_every=0, replicas=None,
                 report_metrics=True, slowdown=None, verbose=True, clock=None, max_retries=20):
        self.blocks = list(blocks)
        if not self.blocks:
            raise ValueError("ElasticPipeline needs at least one block")
        for i, b in enumerate(self.blocks):
            if not isinstance(b, torch.nn.Module):
                raise TypeError(f"block {i} is a {type(b).__name__}, not a torch.nn.Module")
        nb = len(self.blocks)
        if nb > 0xFFFF:
            raise ValueError(f"ElasticPipeline supports at most 65535 blocks, not {nb}")
        self.loss_fn = loss_fn
        self.micro_batches = int(micro_batches)
        if not 1 <= self.micro_batches <= 0xFFFF:
            raise ValueError(f"micro_batches must be in 1..65535, not {micro_batches}")
        self.pg = _pg(group)
        self._L = self.pg._L
        if block_costs is None:
            block_costs = [max(1, sum(p.numel() for p in b.parameters())) for b in self.blocks]
        self.block_costs = [float(c) for c in block_costs]
        if len(self.block_costs) != nb or any(
                not (math.isfinite(c) and c >= 0) for c in self.block_costs):
            raise ValueError(f"block_costs must be {nb} finite numbers >= 0")
        self.optimizers = []
        for b in self.blocks:
            params = [p for p in b.parameters()]
            self.optimizers.append(optimizer(params) if params else None)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = int(checkpoint_every or 0)
        if self.checkpoint_every and not checkpoint_dir:
            raise ValueError("checkpoint_every needs a checkpoint_dir")
        if replicas is not None and int(replicas) < 1:
            raise ValueError(f"replicas must be >= 1, not {replicas}")
        self.replicas = None if replicas is None else int(replicas)
        self.report_metrics = bool(report_metrics)
        self.slowdown = 1.0 if slowdown is None else float(slowdown)
        if not (math.isfinite(self.slowdown) and self.slowdown >= 1.0):
            raise ValueError(f"slowdown must be a number >= 1, not {slowdown}")
        self.verbose = verbose
        self._clock = clock or time.perf_counter
        self.max_retries = int(max_retries)

        comm = self.pg.comm
        founder = comm.epoch <= 1
        #: Steps completed by the job (the same on every member after each step()).
        self.step_count = 0 if founder else -1
        self._versions = [0 if founder and comm.rank == 0 else -1] * nb
        self._ckpt_step = -1
        self._gen = 0
        self._epoch = None
        self._plan = None  # list of stage dicts, in plan order (None: not adopted yet)
        self._chain = []  # the non-empty stages
        self._pos = None  # index of this member's stage in _chain
        self._space = _MEMBER_SPACE
        self._view_ids = view_members(self.pg)[0]
        self._stage_comm = None
        self._broken = None  # an error after a committed step: recover at the next step()
        self._first_step = None  # (epoch, adoption start) awaiting its first step
        self._inflight = []  # sends of the running step or adoption
        # braid.torch hands requests dropped while running to a watcher thread; start it now:
        # starting a thread from a finaliser at interpreter exit can block forever.
        _work._watcher()
        self._costs_c = _doubles(self.block_costs)
        #: The last adoption: {"epoch", "moved_bytes", "model_bytes", "restored", "plan"}.
        self.last_replan = None
        #: Seconds of stage compute (times slowdown) of the last step on this member.
        self.last_compute = 0.0

    # ---- public state --------------------------------------------------------------------

    @property
    def epoch(self):
        """Epoch of the view whose plan is in use (None before the first step)."""
        return self._epoch if self._plan is not None else None

    @property
    def stage_blocks(self):
        """range of the blocks this member owns (empty when it holds no stage)."""
        if self._pos is None:
            return range(0)
        s = self._chain[self._pos]
        return range(s["first"], s["end"])

    @property
    def plan_ranges(self):
        """The plan in use: [(first, end, [member ids])] of the non-empty stages, in order."""
        return [(s["first"], s["end"], list(s["members"])) for s in self._chain]

    def _log(self, msg):
        if self.verbose:
            print(msg, flush=True)

    # ---- collectives on the group ----------------------------------------------------------

    def _coll(self, fn, *args):
        pg = self.pg
        with pg._lock:
            if pg._pending:
                pg._flush_locked()
            st = getattr(self._L, fn)(*args, pg._handle())
        self._L.check(st, fn)

    def _allreduce(self, t):
        t = t.contiguous()
        code = _lib.FLOAT64 if t.dtype == torch.float64 else _lib.INT64
        self._coll("braid_all_reduce", t.data_ptr(), t.data_ptr(), t.numel(), code, _lib.SUM)
        return t

    def _barrier(self):
        self._allreduce(torch.zeros(1, dtype=torch.float64))

    # ---- step ----------------------------------------------------------------------------

    def step(self, batch):
        """One training step of the job: adopts a new view first if there is one (re-plan,
        block moves, or a restore after a failure), then forward/backward over the stages and
        the optimizer steps. `batch` is (inputs, targets) or a callable taking the step number
        (1-based) and returning them. Collective over the group's members. Returns the loss
        (a 0-dim tensor, the same on every member); raises PipelineError when the job cannot
        go on."""
        err, tries = self._broken, 0
        self._broken = None
        while True:
            try:
                start = time.monotonic()
                old_ids = list(self._view_ids)
                if err is not None:
                    try:
                        _update(self.pg)
                    except BaseException:
                        self._log(f"# step {self.step_count + 1} failed: {err}")
                        raise
                    self._log_lost(err, old_ids)
                    self._adopt()
                elif self._plan is None:
                    self._adopt()
                elif _update(self.pg) is not None:
                    # update() may itself have met the loss of a member (between steps).
                    self._log_lost(None, old_ids)
                    self._adopt()
                else:
                    start = None
                if start is not None:
                    self._first_step = (self._epoch, start)
                return self._train(batch)
            except _RECOVERABLE as e:
                self._drain()
                tries += 1
                if tries > self.max_retries:
                    raise
                err = e
            except PipelineError as e:
                if not e.collective:
                    self._abort()
                raise
            except BaseException:
                # Not a lost member: this member cannot go on (a header mismatch, an error in
                # a block or the loss, ...). Abort the communicator so that the others fail
                # at once instead of waiting for its messages; they continue without it
                # once it has exited.
                self._abort()
                raise

    def _abort(self):
        try:
            self.pg.comm.abort()
        except Exception:
            pass
        self._drain()

    def _drain(self, seconds=5.0):
        """Waits (briefly) for the sends of a failed attempt, so none is left running."""
        deadline = time.monotonic() + seconds
        works, self._inflight = self._inflight, []
        for w in works:
            try:
                w.wait(max(0.001, deadline - time.monotonic()))
            except Exception:
                pass

    def _log_lost(self, err, old_ids):
        """Prints the failure line of step S naming the members the new view lost."""
        ids = view_members(self.pg)[0]
        gone = [m for m in old_ids if m not in ids]
        lost = ", ".join(f"member {m} (rank {old_ids.index(m)})" for m in gone)
        S = self.step_count + 1
        if err is not None:
            self._log(f"# step {S} failed: {err}" + (f" (lost: {lost})" if lost else ""))
        elif gone:
            self._log(f"# step {S} failed: lost {lost} (left the view at epoch "
                      f"{self.pg.comm.epoch} before the step)")

    def _train(self, batch):
        S = self.step_count + 1
        if callable(batch):
            batch = batch(S)
        inputs, targets = batch
        M = self.micro_batches
        gen = self._gen
        loss_share = 0.0
        compute = 0.0
        mine = self.stage_blocks
        for b in mine:
            for p in self.blocks[b].parameters():
                p.grad = None
        if self._pos is not None:
            st = self._chain[self._pos]
            first = self._pos == 0
            last = self._pos == len(self._chain) - 1
            prev_r = None if first else self._chain[self._pos - 1]["ranks"]
            next_r = None if last else self._chain[self._pos + 1]["ranks"]
            R, ri = len(st["ranks"]), st["ranks"].index(self.pg.rank())
            mbs = [m for m in range(M) if m % R == ri]
            xs = inputs.tensor_split(M) if first else None
            ts = targets.tensor_split(M) if last else None
            blocks = [self.blocks[b] for b in mine]
            saved = {}
            sends = self._inflight
            for m in mbs:
                if first:
                    x = xs[m]
                else:
                    x = recv_tensor(self.pg, prev_r[m % len(prev_r)], S, m, FORWARD, gen)
                    if x.is_floating_point() or x.is_complex():
                        x.requires_grad_(True)
                t0 = self._clock()
                y = x
                for blk in blocks:
                    y = blk(y)
                if last:
                    y = self.loss_fn(y, ts[m])
                compute += self._slow(self._clock() - t0)
                if not last:
                    sends += send_tensor(self.pg, y, next_r[m % len(next_r)], S, m, FORWARD, gen)
                saved[m] = (x, y)
            for m in reversed(mbs):
                x, y = saved.pop(m)
                if last:
                    loss_share += float(y.detach()) / M
                    t0 = self._clock()
                    if y.requires_grad:
                        (y / M).backward()
                else:
                    g = recv_tensor(self.pg, next_r[m % len(next_r)], S, m, BACKWARD, gen)
                    t0 = self._clock()
                    if y.requires_grad:
                        y.backward(g)
                compute += self._slow(self._clock() - t0)
                if not first and x.requires_grad:
                    gx = x.grad if x.grad is not None else torch.zeros_like(x)
                    sends += send_tensor(self.pg, gx, prev_r[m % len(prev_r)], S, m, BACKWARD,
                                         gen)
            for w in sends:
                w.wait()
            sends.clear()
            if R > 1:
                self._reduce_replica_grads(mine)
        # Commit: completes only when every member finished its part of step S.
        c = self._allreduce(torch.tensor([1.0, loss_share], dtype=torch.float64))
        if int(round(c[0].item())) != self.pg.size():
            raise PipelineError(f"pipeline commit of step {S}: {c[0].item()} of "
                                f"{self.pg.size()} members took part")
        for b in mine:
            if self.optimizers[b] is not None:
                self.optimizers[b].step()
            self._versions[b] = S
        self.step_count = S
        self.last_compute = compute
        if self._first_step is None:
            # (The first step on a plan is not reported: it includes warm-up costs, such as
            # the first use of blocks that just arrived, that would read as a slow member.)
            self._report(compute, mine)
        else:
            epoch, t0 = self._first_step
            self._first_step = None
            self._log(f"# first step on epoch {epoch} plan after {time.monotonic() - t0:.3f} s")
        if self.checkpoint_every and S % self.checkpoint_every == 0:
            try:
                self.checkpoint()
            except _RECOVERABLE as e:
                # The step is committed; the next step() recovers (and may restore).
                self._log(f"# checkpoint of step {S} failed: {e}")
                self._broken = e
        return torch.tensor(c[1].item(), dtype=torch.get_default_dtype())

    def _slow(self, dt):
        """Reported compute seconds of a compute segment of `dt` s (sleeping the slowdown)."""
        if self.slowdown > 1.0 and dt > 0:
            time.sleep(dt * (self.slowdown - 1.0))
        return dt * self.slowdown

    def _reduce_replica_grads(self, mine):
        params = [p for b in mine for p in self.blocks[b].parameters()]
        by_dtype = collections.defaultdict(list)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype[p.dtype].append(p)
        comm = self._stage_comm
        for dtype, ps in by_dtype.items():
            flat = torch.cat([p.grad.reshape(-1) for p in ps])
            code, n, op = _reduce_spec(flat, torch.distributed.ReduceOp.SUM, "all_reduce")
            self._L.check(self._L.braid_all_reduce(flat.data_ptr(), flat.data_ptr(), n, code, op,
                                                   comm.handle), "braid_all_reduce")
            off = 0
            for p in ps:
                p.grad.copy_(flat[off:off + p.numel()].view_as(p.grad))
                off += p.numel()

    def _report(self, seconds, mine):
        if not (self.report_metrics and seconds > 0 and len(mine)):
            return
        if not self._L.has("braid_pipeline_report"):
            return
        st = self._L.braid_pipeline_report(self.pg._handle(), float(seconds), mine.start,
                                           mine.stop, self._costs_c, len(self.block_costs))
        if st == _lib.INVALID_USAGE:  # not an elastic group: no metric channel
            self.report_metrics = False
        elif st != _lib.SUCCESS:
            self._log(f"# metric report failed: {self._L.error(st, 'braid_pipeline_report')}")

    # ---- adoption of a view: plan, moves, restore ----------------------------------------

    def _state_vector(self):
        nb = len(self.blocks)
        v = torch.full((_META + nb,), -1, dtype=torch.int64)
        v[0], v[1], v[2] = self.step_count, self._ckpt_step, self._gen
        if self._plan is not None and self._pos is not None:
            s = self._chain[self._pos]
            v[3], v[4], v[5], v[6] = self._space, s["vid"], s["first"], s["end"]
        v[7] = self.pg.comm.member_id
        v[_META:] = torch.tensor(self._versions, dtype=torch.int64)
        return v

    def _layout(self, ids, weights):
        """Stage groups of the view: (space, [ranks of each group], vids, group weights)."""
        n, nb = len(ids), len(self.blocks)
        R = self.replicas if self.replicas is not None else (n // nb if n > nb else 1)
        if R <= 1:
            return _MEMBER_SPACE, [[r] for r in range(n)], list(ids), list(weights)
        G = max(1, n // R)
        groups = [[] for _ in range(G)]
        for r in range(n):
            groups[r * G // n].append(r)
        return (_GROUP_SPACE, groups, [g + 1 for g in range(G)],
                [sum(weights[r] for r in grp) for grp in groups])

    def _previous(self, rows, old, space, groups, vids):
        """The previous plan as the surviving members report it, in the new id space."""
        group_of = {r: g for g, grp in enumerate(groups) for r in grp}
        reported = collections.defaultdict(list)
        for r in old:
            sp, vid, a, b = (int(x) for x in rows[r][3:7])
            if vid >= 0 and 0 <= a < b <= len(self.blocks):
                reported[(sp, vid, a, b)].append(r)
        out, taken = [], []
        # Largest stages first: with inconsistent reports (a failure during an adoption),
        # overlapping ones are dropped.
        def largest_first(kv):
            return (kv[0][2] - kv[0][3], kv[0][2])
        for (sp, vid, a, b), ranks in sorted(reported.items(), key=largest_first):
            if any(a < e and s < b for s, e in taken):
                continue
            if space == _MEMBER_SPACE:
                member = vids[min(ranks)]
            else:
                count = collections.Counter(group_of[r] for r in ranks)
                member = vids[min(count, key=lambda g: (-count[g], g))]
            taken.append((a, b))
            out.append((member, a, b))
        return sorted(out, key=lambda s: s[1])

    def _gather(self):
        v = self._state_vector()
        n = self.pg.size()
        out = torch.empty(n * v.numel(), dtype=torch.int64)
        self._coll("braid_all_gather", v.data_ptr(), out.data_ptr(), v.numel(), _lib.INT64)
        return out.view(n, v.numel()).tolist()

    def _adopt(self):
        pg = self.pg
        comm = pg.comm
        epoch = comm.epoch
        ids, weights = view_members(pg)
        n, nb = len(ids), len(self.blocks)
        me = pg.rank()
        rows = self._gather()
        old = [r for r in range(n) if rows[r][0] >= 0]
        gen = max(row[2] for row in rows) + 1
        ckpt = max((rows[r][1] for r in old), default=-1)

        space, groups, vids, gweights = self._layout(ids, weights)
        previous = self._previous(rows, old, space, groups, vids)
        stages, _, _ = replan(vids, gweights, self.block_costs, previous)
        plan_ = []
        for g, s in enumerate(stages):
            plan_.append({"vid": s.member, "ranks": groups[g],
                          "members": [ids[r] for r in groups[g]], "first": s.first,
                          "end": s.end})
        chain = [s for s in plan_ if s["end"] > s["first"]]
        owners = [None] * nb
        for s in chain:
            for b in range(s["first"], s["end"]):
                owners[b] = s["ranks"]
        pos = next((k for k, s in enumerate(chain) if me in s["ranks"]), None)
        mine = range(chain[pos]["first"], chain[pos]["end"]) if pos is not None else range(0)
        self._log(f"# plan epoch={epoch}: {_ranges(chain)}")

        # Where is the job's state? Decide continue (moves) or restore, identically everywhere.
        steps = sorted({rows[r][0] for r in old})
        restore_reason = None
        lost = []
        if not old:
            restore_reason = "no member of the view holds the job's state"
            ckpt = self._latest_on_disk()
        else:
            S = steps[-1]
            holders = [[r for r in old if rows[r][0] == S and rows[r][_META + b] == S]
                       for b in range(nb)]
            lost = [b for b in range(nb) if not holders[b]]
            if S == 0 and len(steps) == 1 and lost and ckpt < 0:
                # Nothing was trained yet: the initial parameters of a block whose holder died
                # are taken from the oldest surviving member's own copy.
                init = min(old)
                for b in lost:
                    holders[b] = [init]
                    rows[init][_META + b] = 0
                    if init == me:
                        self._versions[b] = 0
                lost = []
            if len(steps) > 1:
                restore_reason = f"the surviving members are at different steps {steps}"
            elif lost:
                restore_reason = "blocks " + ", ".join(
                    f"{b + 1}{self._last_holder(b)}" for b in lost) + " have no surviving copy"
        moved = 0
        if restore_reason is not None:
            if ckpt < 0 or not self.checkpoint_dir:
                raise PipelineError(f"pipeline: {restore_reason} and there is no checkpoint to "
                                    f"restore (set checkpoint_dir and checkpoint_every)",
                                    collective=True)
            self._restore(ckpt, mine)
        else:
            moved = self._move(rows, holders, owners, S, gen)
            self.step_count = S
            self._ckpt_step = ckpt

        first_plan = self._plan is None
        self._plan, self._chain, self._pos = plan_, chain, pos
        self._space, self._gen, self._view_ids, self._epoch = space, gen, ids, epoch
        self._make_stage_comm()
        model = sum(_state_bytes(self._block_state(b)) for b in mine
                    if chain[pos]["ranks"][0] == me)
        tot = self._allreduce(torch.tensor([float(moved), float(model)], dtype=torch.float64))
        self.last_replan = {"epoch": epoch, "moved_bytes": int(tot[0].item()),
                            "model_bytes": int(tot[1].item()),
                            "restored": restore_reason is not None, "plan": _ranges(chain)}
        if not first_plan:
            self._log(f"# replan epoch={epoch} moved_bytes={self.last_replan['moved_bytes']} "
                      f"model_bytes={self.last_replan['model_bytes']}")
        if (self.checkpoint_every and self.step_count == 0 and self._ckpt_step < 0):
            self.checkpoint()

    def _last_holder(self, b):
        for s in (self._plan or []):
            if s["first"] <= b < s["end"]:
                return f" (member {', '.join(map(str, s['members']))})"
        return ""

    def _block_state(self, b):
        opt = self.optimizers[b]
        return {"params": self.blocks[b].state_dict(),
                "opt": opt.state_dict() if opt is not None else None}

    def _load_block(self, b, state):
        self.blocks[b].load_state_dict(state["params"])
        opt = self.optimizers[b]
        if opt is not None and state.get("opt") is not None:
            opt.load_state_dict(state["opt"])

    def _move(self, rows, holders, owners, S, gen):
        """Sends/receives the blocks whose new owners lack a current copy; returns the tensor
        bytes this member sent."""
        me = self.pg.rank()
        transfers = []
        for b in range(len(self.blocks)):
            need = [o for o in owners[b] if not (rows[o][0] == S and rows[o][_META + b] == S)]
            for i, o in enumerate(need):
                transfers.append((b, holders[b][i % len(holders[b])], o))
        sends, sent = self._inflight, 0
        for b, src, dst in transfers:
            if src == me:
                state = self._block_state(b)
                sent += _state_bytes(state)
                buf = io.BytesIO()
                torch.save(state, buf)
                blob = torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)
                sends += send_tensor(self.pg, blob, dst, S, b, BLOCK, gen)
        for b, src, dst in transfers:
            if dst == me:
                blob = recv_tensor(self.pg, src, S, b, BLOCK, gen)
                state = torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=True)
                self._load_block(b, state)
                self._versions[b] = S
        for w in sends:
            w.wait()
        sends.clear()
        return sent

    def _latest_on_disk(self):
        d = self.checkpoint_dir
        if not d:
            return -1
        try:
            with open(os.path.join(d, "latest")) as f:
                m = re.fullmatch(r"step-(\d+)", f.read().strip())
            return int(m.group(1)) if m else -1
        except OSError:
            return -1

    def _restore(self, ckpt, mine):
        d = os.path.join(self.checkpoint_dir, f"step-{ckpt}")
        for b in range(len(self.blocks)):
            self._versions[b] = -1
        for b in mine:
            path = os.path.join(d, f"block-{b}.pt")
            try:
                state = torch.load(path, weights_only=True)
            except OSError as e:
                raise PipelineError(f"pipeline: cannot restore block {b + 1} from {path}: "
                                    f"{e}") from e
            self._load_block(b, state)
            self._versions[b] = ckpt
        self.step_count = ckpt
        self._ckpt_step = ckpt
        self._log(f"# restored step {ckpt} from {self.checkpoint_dir}")

    def _make_stage_comm(self):
        old, self._stage_comm = self._stage_comm, None
        if old is not None:
            try:
                old.close()
            except Exception:
                pass
        if all(len(s["ranks"]) == 1 for s in self._plan):
            return
        st = self._chain[self._pos] if self._pos is not None else None
        color = self._pos if st is not None and len(st["ranks"]) > 1 else None
        pg = self.pg
        with pg._lock:
            if pg._pending:
                pg._flush_locked()
            self._stage_comm = pg.comm.split(color, pg.rank())

    def close(self):
        """Frees the per-stage communicator of replicated stages (the process group itself
        belongs to the caller). Not collective."""
        comm, self._stage_comm = self._stage_comm, None
        if comm is not None:
            comm.close()

    # ---- checkpoints ---------------------------------------------------------------------

    def checkpoint(self, directory=None):
        """Writes a checkpoint of the current step into `directory` (default: checkpoint_dir)
        (collective; see the module docstring for the layout). Returns its path."""
        d = directory or self.checkpoint_dir
        if not d:
            raise ValueError("checkpoint: no directory (pass one or set checkpoint_dir)")
        S = self.step_count
        sd = os.path.join(d, f"step-{S}")
        os.makedirs(sd, exist_ok=True)
        me = self.pg.rank()
        if self._pos is not None and self._chain[self._pos]["ranks"][0] == me:
            for b in self.stage_blocks:
                state = self._block_state(b)
                _write_atomic(os.path.join(sd, f"block-{b}.pt"),
                              lambda p, s=state: torch.save(s, p))
        self._barrier()
        if me == 0:
            manifest = {"step": S, "blocks": len(self.blocks), "epoch": self._epoch,
                        "plan": [[s["first"], s["end"], s["members"]] for s in self._chain]}

            def wm(p):
                with open(p, "w") as f:
                    json.dump(manifest, f)

            def wl(p):
                with open(p, "w") as f:
                    f.write(f"step-{S}\n")
            _write_atomic(os.path.join(sd, "manifest.json"), wm)
            _write_atomic(os.path.join(d, "latest"), wl)
            dirs = _step_dirs(d)
            older = [s for s, _ in dirs if s < S]
            keep = {S} | set(older[-1:])
            for s, path in dirs:
                if s not in keep and s < S:
                    shutil.rmtree(path, ignore_errors=True)
        self._barrier()
        self._ckpt_step = S
        return sd
