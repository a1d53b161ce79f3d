"""braid.torch: the torch.distributed backend "braid" (cpu tensors), and braid's elastic
membership for torch programs.

``import braid.torch`` registers the backend; then ``dist.init_process_group("braid")``
works wherever ``"gloo"`` did (torchrun's environment, ``env://``, ``tcp://``, ``file://``,
an explicit ``store=``). Rendezvous goes through the c10d Store torch hands the backend:
group rank 0 starts braid's coordinator on a free port and publishes its address and a fresh
random job token in the store; the others read them (so braid never collides with torch's own
MASTER_PORT, and every group is authenticated). With ``BRAID_COORDINATOR=host:port`` (and
``BRAID_JOB_TOKEN``) set, the group meets at that coordinator instead (one that outlives any
rank, e.g. ``braid-coordinator``).

Elastic training (``BRAID_ELASTIC=1`` in every process): :func:`update` adopts a new
membership view between steps (joiners admitted, dead or leaving ranks dropped),
:func:`sync_from_oldest` gives joiners the current parameters, :func:`join` makes a process
started later a member of the running job, :func:`leave` leaves it gracefully.
"""

import ctypes
import os
import secrets
import socket
import time
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import Communicator, Coordinator, _lib
from ._backend import ProcessGroupBraid
from ._work import Work

__all__ = [
    "ProcessGroupBraid",
    "Work",
    "update",
    "sync_from_oldest",
    "join",
    "leave",
    "monitored_barrier",
    "split_group",
    "communicator",
]

BACKEND = "braid"
_STORE_KEY = "braid"
# Where the default group's coordinator is published on the root store (for join()).
_JOIN_KEY = "braid/job"


def _advertised_host():
    """The address peers reach this host at: the interface towards MASTER_ADDR when set,
    else the host name's address, else loopback."""
    master = os.environ.get("MASTER_ADDR")
    if master:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((master, int(os.environ.get("MASTER_PORT") or 29500)))
                return s.getsockname()[0]
        except OSError:
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _root_store(store):
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store


def _secs(timeout):
    if timeout is None:
        return None
    return timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)


def _rendezvous(store, rank, size, timeout, default_group):
    """A fresh braid communicator for a torch group, meeting through `store`."""
    coord = None
    env_coord = os.environ.get("BRAID_COORDINATOR")
    if env_coord:
        addr, token = env_coord, os.environ.get("BRAID_JOB_TOKEN")
    elif rank == 0:
        token = secrets.token_hex(32)
        host = _advertised_host()
        coord = Coordinator(bind=f"{host}:0", job_token=token)
        addr = f"{host}:{coord.port}"
        store.set(f"{_STORE_KEY}/coordinator", addr)
        store.set(f"{_STORE_KEY}/token", token)
        if default_group:
            try:
                root = _root_store(store)
                root.set(f"{_JOIN_KEY}/coordinator", addr)
                root.set(f"{_JOIN_KEY}/token", token)
                root.set(f"{_JOIN_KEY}/world_size", str(size))
            except Exception:
                pass
    else:
        addr = store.get(f"{_STORE_KEY}/coordinator").decode()
        token = store.get(f"{_STORE_KEY}/token").decode()
    try:
        comm = Communicator(coordinator=addr, world_size=size, rank=rank,
                            timeout_s=_secs(timeout), job_token=token)
    except BaseException:
        if coord is not None:
            coord.close()
        raise
    return comm, coord


# A communicator made by join(), adopted by the next backend creation.
_adopt = None


def _create(opts, backend_opts=None):
    """The backend creator torch calls (extended API) for the default group and for every
    new_group/new_subgroups on its members."""
    global _adopt
    store, rank, size = opts.store, opts.group_rank, opts.group_size
    timeout = opts.timeout
    ranks = list(opts.global_ranks_in_group)
    if _adopt is not None and not ranks:
        comm, _adopt = _adopt, None
        return ProcessGroupBraid(comm, comm.rank, comm.size, timeout)
    parent = None
    if ranks:
        try:
            d = dist.distributed_c10d._get_default_group()
            parent = d if isinstance(d, ProcessGroupBraid) else None
        except Exception:
            parent = None
    if parent is not None and parent._L.has("braid_comm_create_group"):
        # MPI_Comm_create_group semantics: torch calls this on the members only.
        tag = zlib.crc32(str(opts.group_id).encode()) & 0x7FFFFFFF
        comm = parent.comm.create_group(ranks, tag=tag)
        pg = ProcessGroupBraid(comm, comm.rank, comm.size, timeout)
        parent._children.append(pg)
        return pg
    comm, coord = _rendezvous(store, rank, size, timeout, default_group=not ranks)
    return ProcessGroupBraid(comm, rank, size, timeout, coordinator=coord)


def _register():
    if BACKEND in getattr(dist.Backend, "_plugins", {}) or BACKEND.upper() in getattr(
            dist.Backend, "_plugins", {}):
        return
    # cuda: device tensors go to libbraid's device engines (NCCL where every rank has it and a
    # GPU of its own, else staging through pinned host memory), on the current stream.
    from .. import _export_nccl_dirs
    _export_nccl_dirs()
    dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu", "cuda"])


_register()


def _pg(group):
    g = group if group is not None else dist.distributed_c10d._get_default_group()
    if not isinstance(g, ProcessGroupBraid):
        raise ValueError(f"braid.torch: {g!r} is not a braid process group")
    return g


def communicator(group=None):
    """The :class:`braid.Communicator` of a braid process group (default: the default one)."""
    return _pg(group).comm


def update(group=None):
    """Adopts the next membership view of an elastic braid group, if there is one.

    Call it between training steps on every member (it is collective over the current view),
    and after an operation failed because a member died. Returns the process group (the same
    object, whose rank() and size() now follow the new view) when the view changed, else
    None. After a change: call :func:`sync_from_oldest` on the model and rebuild
    DistributedDataParallel (it captured the old size). Needs ``BRAID_ELASTIC=1``.
    """
    pg = _pg(group)
    with pg._lock:
        if pg._pending:
            pg._flush_locked()
        changed = pg.comm.update()
        if not changed:
            return None
        pg._refresh()
    pg._drop_streams()
    _retorch(pg)
    return pg


def _retorch(pg):
    """Tells torch's bookkeeping the group's new rank and size (identity rank maps)."""
    try:
        c10d = dist.distributed_c10d
        w = c10d._world
        if pg in w.pg_group_ranks:
            w.pg_group_ranks[pg] = {i: i for i in range(pg.size())}
        if c10d._get_default_group() is pg:
            c10d._update_default_pg(pg)
    except Exception:
        pass


def _tensors_of(obj):
    if isinstance(obj, torch.nn.Module):
        return [p.data for p in obj.parameters()] + [b for b in obj.buffers()]
    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t.data if isinstance(t, torch.nn.Parameter) else t for t in obj]


def sync_from_oldest(obj, group=None):
    """Broadcasts a module's parameters and buffers (or a tensor, or a list of tensors) from
    the member with the smallest id (the oldest one) to all: after :func:`update` returned a
    changed group, joiners start from the running state. Collective: call it on every member
    with the same structure."""
    pg = _pg(group)
    L = pg._L
    by_dtype = {}
    for t in _tensors_of(obj):
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, ts in by_dtype.items():
        flat = torch.cat([t.detach().reshape(-1) for t in ts]) if ts else None
        if flat is None or flat.numel() == 0:
            continue
        from ._backend import _move_spec
        dt, n = _move_spec(flat)
        with pg._lock:
            if pg._pending:
                pg._flush_locked()
            L.check(L.braid_sync_from_oldest(flat.data_ptr(), n, dt, pg._handle()),
                    "braid_sync_from_oldest")
        off = 0
        with torch.no_grad():
            for t in ts:
                t.copy_(flat[off:off + t.numel()].view(t.shape))
                off += t.numel()


def join(init_method=None, store=None, timeout=timedelta(minutes=5)):
    """Makes this process a member of a RUNNING elastic braid job (started with
    ``BRAID_ELASTIC=1``) and installs the result as torch's default process group.

    The job's coordinator is found through the rendezvous store of the running job (torch's
    ``MASTER_ADDR``/``MASTER_PORT``, an ``init_method`` "tcp://host:port", or a `store`), or
    ``BRAID_COORDINATOR``/``BRAID_JOB_TOKEN``. Returns once the running members admitted this
    process at their next :func:`update`; then call :func:`sync_from_oldest` (as they do).
    """
    global _adopt
    env_coord = os.environ.get("BRAID_COORDINATOR")
    root = None
    if env_coord:
        addr, token, world = env_coord, os.environ.get("BRAID_JOB_TOKEN"), None
    else:
        if store is None:
            if init_method and init_method.startswith("tcp://"):
                host, port = init_method[len("tcp://"):].rsplit(":", 1)
            else:
                host = os.environ.get("MASTER_ADDR", "127.0.0.1")
                port = os.environ.get("MASTER_PORT", "29500")
            store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
        root = _root_store(store)
        addr = root.get(f"{_JOIN_KEY}/coordinator").decode()
        token = root.get(f"{_JOIN_KEY}/token").decode()
        world = int(root.get(f"{_JOIN_KEY}/world_size").decode())
    os.environ["BRAID_ELASTIC"] = "1"
    comm = Communicator(coordinator=addr, world_size=world, job_token=token)
    _adopt = comm
    try:
        ps = dist.PrefixStore(f"braid-join-{comm.member_id}",
                              store if store is not None else dist.HashStore())
        dist.init_process_group(BACKEND, store=ps, rank=comm.rank, world_size=comm.size,
                                timeout=timeout)
    finally:
        _adopt = None
    return dist.distributed_c10d._get_default_group()


def leave(group=None):
    """Announces a graceful leave: keep training and calling :func:`update` until it returns
    the group with ``braid.torch.communicator(group).has_left`` true."""
    _pg(group).comm.leave()


def monitored_barrier(group=None, timeout=None, wait_all_ranks=False):
    """Gloo's monitored_barrier for braid groups (torch's own refuses non-Gloo backends):
    rank 0 waits up to `timeout` for every rank and raises naming the ranks that did not
    arrive (the first one, or all of them with ``wait_all_ranks``); the others wait for rank
    0's release."""
    pg = _pg(group)
    secs = _secs(timeout)
    if secs is None:
        secs = _secs(pg._timeout) or 1800.0
    rank, size = pg.rank(), pg.size()
    token = torch.zeros(1, dtype=torch.uint8)
    tag = 0x6D6F6E69  # "moni"
    deadline = time.monotonic() + secs
    if size == 1:
        return
    if rank != 0:
        pg._p2p_now(True, token, 0, tag)
        w = pg._p2p_now(False, torch.zeros(1, dtype=torch.uint8), 0, tag + 1)
        w.wait(timedelta(seconds=max(0.001, deadline - time.monotonic()) + secs))
        return
    bufs = [torch.zeros(1, dtype=torch.uint8) for _ in range(size)]
    works = {r: pg._p2p_now(False, bufs[r], r, tag) for r in range(1, size)}
    missing = []
    for r, w in works.items():
        left = deadline - time.monotonic()
        try:
            w.wait(timedelta(seconds=max(0.001, left)))
        except _lib.Timeout:
            missing.append(r)
            if not wait_all_ranks:
                break
    if missing:
        ms = int(secs * 1000)
        if wait_all_ranks:
            raise RuntimeError(f"Ranks {', '.join(map(str, missing))} failed to pass "
                               f"monitoredBarrier in {ms} ms")
        raise RuntimeError(f"Rank {missing[0]} failed to pass monitoredBarrier in {ms} ms")
    for r in range(1, size):
        pg._p2p_now(True, token, r, tag + 1).wait()


def split_group(parent_pg=None, split_ranks=None, timeout=None, group_desc=None):
    """torch.distributed.split_group for braid groups (torch's own needs a CUDA device bound
    to the default group): every rank of `parent_pg` calls it with the same `split_ranks`
    (lists of parent group ranks, disjoint); each rank gets the group of its list, or None.
    Built on braid_comm_split (ncclCommSplit's semantics)."""
    pg = _pg(parent_pg)
    if not split_ranks:
        raise ValueError("split_ranks cannot be None or empty")
    seen = set()
    color, key = None, 0
    for i, grp in enumerate(split_ranks):
        if not grp:
            raise ValueError("the split group cannot be empty")
        if len(set(grp)) != len(grp) or seen & set(grp):
            raise ValueError("split groups cannot overlap or repeat ranks")
        seen |= set(grp)
        for r in grp:
            if not 0 <= r < pg.size():
                raise ValueError(f"rank {r} is not a rank of the parent group")
        if pg.rank() in grp:
            color, key = i, sorted(grp).index(pg.rank())
    with pg._lock:
        if pg._pending:
            pg._flush_locked()
        comm = pg.comm.split(color, key)
    if comm is None:
        return None
    child = ProcessGroupBraid(comm, comm.rank, comm.size, timeout or pg._timeout)
    pg._children.append(child)
    members = sorted(split_ranks[color])
    try:
        c10d = dist.distributed_c10d
        w = c10d._world
        name = f"braid-split-{'-'.join(map(str, members))}-{id(child):x}"
        parent_ranks = w.pg_group_ranks.get(pg, {i: i for i in range(pg.size())})
        to_global = {g: gl for gl, g in parent_ranks.items()}
        w.pg_map[child] = (BACKEND, None)
        w.pg_names[child] = name
        w.pg_group_ranks[child] = {to_global.get(r, r): i for i, r in enumerate(members)}
        w.pg_backend_config[child] = f"cpu:{BACKEND}"
        c10d._register_process_group(name, child)
    except Exception:
        pass
    return child
