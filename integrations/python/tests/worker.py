"""Scenarios run by the tests in N real processes: `python worker.py SCENARIO [ARGS]` with
torch's environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE). Each checks closed-form
values and prints "OK <scenario>" on success; a failed check exits non-zero."""

import math
import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import braid
import braid.torch as bt

R = int(os.environ.get("RANK", "0"))
N = int(os.environ.get("WORLD_SIZE", "1"))

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
          torch.complex128]
INTS = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
COMPLEX = [torch.complex64, torch.complex128]
RO = dist.ReduceOp
SIZES = [0, 1, 7, 1000]


def log(*a):
    print(f"[rank {R}]", *a, flush=True)


def eq(got, want, what):
    want = want.to(got.dtype) if isinstance(want, torch.Tensor) else torch.tensor(want).to(
        got.dtype)
    if got.shape != want.shape or not torch.equal(got, want.expand_as(got)):
        raise AssertionError(f"{what}: got {got.flatten()[:8].tolist()} want "
                             f"{want.flatten()[:8].tolist()} ({got.dtype})")


def init(backend="braid", **kw):
    dist.init_process_group(backend, **kw)
    assert dist.get_rank() == R and dist.get_world_size() == N


def full(n, v, dtype):
    return torch.full((n,), v, dtype=torch.float64).to(dtype) if dtype not in COMPLEX else \
        torch.full((n,), v, dtype=dtype)


# ---- closed forms ----------------------------------------------------------------------------

def check_all_reduce(dtype, n):
    tri = N * (N + 1) // 2
    if dtype == torch.bool:
        cases = [
            (RO.SUM, lambda r: r == 0, True),
            (RO.MAX, lambda r: r == 0, True),
            (RO.PRODUCT, lambda r: r == 0, N == 1),
            (RO.MIN, lambda r: r == 0, N == 1),
            (RO.BAND, lambda r: r % 2 == 0, N == 1),
            (RO.BOR, lambda r: r % 2 == 1, N > 1),
            (RO.BXOR, lambda r: True, N % 2 == 1),
        ]
        for op, f, want in cases:
            t = torch.full((n,), f(R), dtype=torch.bool)
            dist.all_reduce(t, op=op)
            eq(t, torch.full((n,), want), f"all_reduce {op} bool n={n}")
        return
    if dtype in COMPLEX:
        t = torch.full((n,), complex(R + 1, R), dtype=dtype)
        dist.all_reduce(t, op=RO.SUM)
        eq(t, torch.full((n,), complex(tri, N * (N - 1) // 2), dtype=dtype), "complex sum")
        t = torch.full((n,), complex(2 * (R + 1), 2 * R), dtype=dtype)
        dist.all_reduce(t, op=RO.AVG)
        eq(t, torch.full((n,), complex(N + 1, N - 1), dtype=dtype), "complex avg")
        return
    cases = [
        (RO.SUM, lambda r: r + 1, tri),
        (RO.PRODUCT, lambda r: r + 1, math.factorial(N)),
        (RO.MIN, lambda r: r + 1, 1),
        (RO.MAX, lambda r: r + 1, N),
        (RO.AVG, lambda r: 2 * (r + 1), N + 1),
    ]
    if dtype in INTS:
        cases += [
            (RO.BAND, lambda r: (1 << r) | 8, 8 if N > 1 else 9),
            (RO.BOR, lambda r: (1 << r) | 8, ((1 << N) - 1) | 8),
            (RO.BXOR, lambda r: (1 << r) | 8, ((1 << N) - 1) ^ (8 if N % 2 else 0)),
        ]
    for op, f, want in cases:
        if dtype == torch.uint8 and op == RO.AVG:
            pass
        t = full(n, f(R), dtype)
        dist.all_reduce(t, op=op)
        eq(t, full(n, want, dtype), f"all_reduce {op} {dtype} n={n}")
        # out of the synchronous path: non-blocking, then wait
        t = full(n, f(R), dtype)
        dist.all_reduce(t, op=op, async_op=True).wait()
        eq(t, full(n, want, dtype), f"async all_reduce {op} {dtype} n={n}")


def scenario_ops():
    init()
    for dtype in DTYPES:
        for n in SIZES:
            check_all_reduce(dtype, n)
    log("all_reduce ok")
    for dtype in DTYPES:
        for n in [0, 5]:
            # broadcast (from every root)
            for root in range(N):
                t = full(n, 10 + R, dtype) if dtype != torch.bool else torch.full(
                    (n,), R == root)
                dist.broadcast(t, src=root)
                eq(t, full(n, 10 + root, dtype) if dtype != torch.bool else torch.full(
                    (n,), True), f"broadcast {dtype} root {root}")
            # all_gather (list) and all_gather_into_tensor
            src = full(n, R + 1, dtype) if dtype != torch.bool else torch.full((n,), R % 2 == 0)
            outs = [torch.zeros(n, dtype=dtype) for _ in range(N)]
            dist.all_gather(outs, src)
            for i, o in enumerate(outs):
                eq(o, full(n, i + 1, dtype) if dtype != torch.bool else torch.full(
                    (n,), i % 2 == 0), f"all_gather {dtype} block {i}")
            big = torch.zeros(N * n, dtype=dtype)
            dist.all_gather_into_tensor(big, src)
            for i in range(N):
                eq(big[i * n:(i + 1) * n], outs[i], f"all_gather_into_tensor {dtype}")
            stacked = torch.zeros(N, n, dtype=dtype)
            dist.all_gather_into_tensor(stacked, src)
            for i in range(N):
                eq(stacked[i], outs[i], f"all_gather_into_tensor stacked {dtype}")
    log("broadcast/all_gather ok")
    for dtype in [d for d in DTYPES if d != torch.bool]:
        for n in [0, 3]:
            tri = N * (N + 1) // 2
            # reduce to every root
            for root in range(N):
                t = full(n, R + 1, dtype)
                dist.reduce(t, dst=root, op=RO.SUM)
                if R == root:
                    eq(t, full(n, tri, dtype), f"reduce {dtype} root {root}")
            # reduce_scatter (list) and reduce_scatter_tensor: block i from rank r = r+i+1
            ins = [full(n, R + i + 1, dtype) for i in range(N)]
            out = torch.zeros(n, dtype=dtype)
            dist.reduce_scatter(out, ins, op=RO.SUM)
            eq(out, full(n, tri + N * R, dtype), f"reduce_scatter {dtype}")
            flat = torch.cat(ins)
            out2 = torch.zeros(n, dtype=dtype)
            dist.reduce_scatter_tensor(out2, flat, op=RO.SUM)
            eq(out2, out, f"reduce_scatter_tensor {dtype}")
            # gather / scatter
            for root in range(N):
                lst = [torch.zeros(n, dtype=dtype) for _ in range(N)] if R == root else None
                dist.gather(full(n, 100 + R, dtype), gather_list=lst, dst=root)
                if R == root:
                    for i, g in enumerate(lst):
                        eq(g, full(n, 100 + i, dtype), f"gather {dtype} root {root}")
                sl = [full(n, 50 + i, dtype) for i in range(N)] if R == root else None
                o = torch.zeros(n, dtype=dtype)
                dist.scatter(o, scatter_list=sl, src=root)
                eq(o, full(n, 50 + R, dtype), f"scatter {dtype} root {root}")
    log("reduce/reduce_scatter/gather/scatter ok")
    for dtype in [torch.float32, torch.int64, torch.bfloat16, torch.complex64, torch.bool]:
        # all_to_all_single: even, then uneven splits (rank r sends r+p+1 rows to p)
        if dtype == torch.bool:
            vals = lambda p: torch.full((2 * (N), 3), (R + p) % 2 == 0)  # noqa: E731
        inp = torch.cat([full(2 * 3, 10 * R + p, dtype).view(2, 3) for p in range(N)]) \
            if dtype != torch.bool else torch.cat([torch.full((2, 3), (R + p) % 2 == 0)
                                                   for p in range(N)])
        out = torch.empty(2 * N, 3, dtype=dtype)
        dist.all_to_all_single(out, inp)
        for p in range(N):
            want = full(6, 10 * p + R, dtype).view(2, 3) if dtype != torch.bool else \
                torch.full((2, 3), (p + R) % 2 == 0)
            eq(out[2 * p:2 * p + 2], want, f"all_to_all_single {dtype} from {p}")
        if dtype == torch.bool:
            continue
        in_splits = [R + p + 1 for p in range(N)]
        out_splits = [p + R + 1 for p in range(N)]
        inp = torch.cat([full((R + p + 1) * 2, 10 * R + p, dtype).view(-1, 2)
                         for p in range(N)])
        out = torch.empty(sum(out_splits), 2, dtype=dtype)
        dist.all_to_all_single(out, inp, output_split_sizes=out_splits,
                               input_split_sizes=in_splits)
        off = 0
        for p in range(N):
            k = out_splits[p]
            eq(out[off:off + k], full(k * 2, 10 * p + R, dtype).view(k, 2),
               f"all_to_all_single uneven {dtype} from {p}")
            off += k
        # all_to_all (lists of different sizes per peer)
        ins = [full(R + p, 7 * R + p, dtype) for p in range(N)]
        outs = [torch.empty(p + R, dtype=dtype) for p in range(N)]
        dist.all_to_all(outs, ins)
        for p in range(N):
            eq(outs[p], full(p + R, 7 * p + R, dtype), f"all_to_all {dtype} from {p}")
    log("all_to_all ok")
    # point to point, with tags, in a ring; blocking and non-blocking; batch_isend_irecv
    nxt, prv = (R + 1) % N, (R - 1) % N
    if N > 1:
        for dtype in [torch.float32, torch.int16, torch.complex128, torch.bool]:
            a = full(9, R, dtype) if dtype != torch.bool else torch.full((9,), R % 2 == 1)
            b = torch.zeros(9, dtype=dtype)
            if R % 2 == 0:
                dist.send(a, dst=nxt, tag=3)
                dist.recv(b, src=prv, tag=3)
            else:
                dist.recv(b, src=prv, tag=3)
                dist.send(a, dst=nxt, tag=3)
            eq(b, full(9, prv, dtype) if dtype != torch.bool else torch.full(
                (9,), prv % 2 == 1), f"send/recv {dtype}")
        # tagged non-blocking sends and receives in flight together (matched by tag, as
        # Gloo does: see scenario_tag_order)
        x1, x2 = torch.full((4,), 1.0 + R), torch.full((4,), 2.0 + R)
        y1, y2 = torch.zeros(4), torch.zeros(4)
        reqs = [dist.isend(x1, nxt, tag=11), dist.isend(x2, nxt, tag=12)]
        r1 = dist.irecv(y1, prv, tag=11)
        r2 = dist.irecv(y2, prv, tag=12)
        for q in reqs + [r2, r1]:
            q.wait()
        eq(y1, torch.full((4,), 1.0 + prv), "irecv tag 11")
        eq(y2, torch.full((4,), 2.0 + prv), "irecv tag 12")
        # large messages both ways at once: one braid group (no deadlock)
        big_out = torch.full((3 << 20,), float(R))
        big_in = torch.zeros(3 << 20)
        ops = [dist.P2POp(dist.isend, big_out, nxt), dist.P2POp(dist.irecv, big_in, prv)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        eq(big_in, torch.full((3 << 20,), float(prv)), "batch_isend_irecv")
    dist.barrier()
    bt.monitored_barrier(timeout=timedelta(seconds=30))
    bt.monitored_barrier(timeout=timedelta(seconds=30), wait_all_ranks=True)
    log("p2p/barrier ok")
    # non-contiguous tensors are copied to contiguous and back
    base = torch.arange(20, dtype=torch.float32).view(4, 5) * (R + 1)
    view = base.t()  # not contiguous
    dist.all_reduce(view)
    want = torch.arange(20, dtype=torch.float32).view(4, 5).t() * (N * (N + 1) // 2)
    eq(view, want, "non-contiguous all_reduce")
    eq(base, want.t(), "non-contiguous all_reduce (base)")
    col = torch.zeros(6, 2)[:, 1]
    if R == 0:
        col.copy_(torch.arange(6.0))
    dist.broadcast(col, 0)
    eq(col, torch.arange(6.0), "non-contiguous broadcast")
    log("non-contiguous ok")
    groups_part()
    dist.destroy_process_group()
    print("OK ops", flush=True)


def groups_part():
    """new_group, new_subgroups and split_group against closed forms."""
    # new_group of the even ranks (the odd ones take no part), used next to the world group
    evens = list(range(0, N, 2))
    g = dist.new_group(evens)
    if R in evens:
        t = torch.full((3,), float(R))
        dist.all_reduce(t, group=g)
        eq(t, torch.full((3,), float(sum(evens))), "new_group all_reduce")
        assert dist.get_rank(g) == evens.index(R)
        dist.broadcast(t, src=evens[-1], group=g)
        eq(t, torch.full((3,), float(sum(evens))), "new_group broadcast")
    w = torch.ones(2)
    dist.all_reduce(w)
    eq(w, torch.full((2,), float(N)), "world after new_group")
    # new_subgroups: groups of 2 consecutive ranks (or 1)
    size = 2 if N % 2 == 0 else 1
    cur, subs = dist.new_subgroups(group_size=size)
    t = torch.full((2,), float(R))
    dist.all_reduce(t, group=cur)
    first = R - R % size
    eq(t, torch.full((2,), float(sum(range(first, first + size)))), "new_subgroups")
    # split_group: [[ranks in reverse order of the last two]], others None
    if N >= 2:
        grp = [N - 1, 0]
        child = bt.split_group(split_ranks=[grp])
        if R in grp:
            assert child is not None and child.size() == 2
            t = torch.full((1,), float(R + 1))
            dist.all_reduce(t, group=child)
            eq(t, torch.full((1,), float(N + 1)), "split_group all_reduce")
            assert child.rank() == sorted(grp).index(R)
        else:
            assert child is None
    log("groups ok")


def scenario_async():
    init()
    # async handles: wait(timeout), is_completed, is_success, exception, get_future, result
    t = torch.full((1 << 20,), float(R + 1))
    w = dist.all_reduce(t, async_op=True)
    assert w.wait(timeout=timedelta(seconds=60))
    assert w.is_completed() and w.is_success() and w.exception() is None
    eq(t, torch.full((1 << 20,), float(N * (N + 1) // 2)), "async all_reduce")
    fut = dist.all_reduce(torch.full((5,), 2.0), async_op=True).get_future()
    res = fut.wait()
    eq(res[0], torch.full((5,), 2.0 * N), "future result")
    # chained future (as DDP comm hooks do)
    f2 = dist.all_reduce(torch.ones(3), async_op=True).get_future().then(
        lambda f: f.value()[0] * 10)
    eq(f2.wait(), torch.full((3,), 10.0 * N), "future then")
    # many in flight at once, completed in order
    ts = [torch.full((1000,), float(i + R)) for i in range(20)]
    ws = [dist.all_reduce(x, async_op=True) for x in ts]
    for i, (x, wk) in enumerate(zip(ts, ws)):
        wk.wait()
        eq(x, torch.full((1000,), float(N * i + N * (N - 1) // 2)), f"in flight {i}")
    # result()
    wk = dist.all_reduce(torch.ones(2), async_op=True)
    eq(wk.result()[0], torch.full((2,), float(N)), "result")
    # is_completed polling
    wk = dist.all_reduce(torch.ones(2), async_op=True)
    deadline = time.monotonic() + 30
    while not wk.is_completed():
        assert time.monotonic() < deadline, "is_completed never became true"
        time.sleep(0.001)
    # the GIL is released while braid blocks: a Python thread runs during a blocking call
    if N > 1:
        import threading
        ticks = [0]
        stop = threading.Event()

        def spin():
            while not stop.is_set():
                ticks[0] += 1
                time.sleep(0.001)
        th = threading.Thread(target=spin)
        th.start()
        if R == 1:
            time.sleep(1.0)
        before = ticks[0]
        dist.all_reduce(torch.ones(4))  # rank 0 blocks here for about a second
        during = ticks[0] - before
        stop.set()
        th.join()
        if R == 0:
            assert during > 100, f"the GIL was held during a blocking call ({during} ticks)"
    # wait(timeout) that runs out: rank 1 joins late
    if N > 1:
        if R == 1:
            time.sleep(1.5)
        wk = dist.all_reduce(torch.ones(4), async_op=True)
        if R == 0:
            try:
                wk.wait(timeout=timedelta(seconds=0.2))
                raise AssertionError("wait(timeout) returned before the peer arrived")
            except braid.Timeout as e:
                assert "did not complete" in str(e)
            assert not wk.is_completed()
        wk.wait()
    dist.barrier()
    dist.destroy_process_group()
    print("OK async", flush=True)


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))


def batch(step, n_ranks, rank):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8 * n_ranks, 32, generator=g, dtype=torch.float32)
    y = torch.randn(8 * n_ranks, 8, generator=g, dtype=torch.float32)
    return x[8 * rank:8 * (rank + 1)], y[8 * rank:8 * (rank + 1)], x, y


def params_of(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train(model, opt, steps, whole=False):
    """`steps` steps of `opt` on `model`: this rank's share of each batch, or with `whole`
    the whole batch in float64 (a single-process reference)."""
    for step in range(steps):
        x, y, gx, gy = batch(step, N, R)
        if whole:
            x, y = gx.double(), gy.double()
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def train_with_reference(model, steps):
    """Trains `model` with SGD, and a single-process reference from mlp(seed=0) on the whole
    batches; returns the reference."""
    train(model, torch.optim.SGD(model.parameters(), lr=0.05), steps)
    ref = mlp(seed=0).double()
    train(ref, torch.optim.SGD(ref.parameters(), lr=0.05), steps, whole=True)
    return ref


def scenario_ddp():
    init()
    model = mlp(seed=R)  # different initial weights: DDP broadcasts rank 0's
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.01)
    ref = train_with_reference(ddp, 20)
    # identical on every rank
    flat = params_of(model)
    outs = [torch.zeros_like(flat) for _ in range(N)]
    dist.all_gather(outs, flat)
    for o in outs:
        assert torch.equal(o, flat), "parameters differ between ranks"
    reff = params_of(ref).float()
    rel = ((flat - reff).norm() / reff.norm()).item()
    log(f"DDP vs single-process reference: relative difference {rel:.2e}")
    assert rel < 1e-5, f"DDP differs from the reference: {rel}"
    dist.destroy_process_group()
    print("OK ddp", flush=True)


def close(got, want, what, rel=1e-6):
    d = ((got - want).norm() / want.norm()).item()
    log(f"{what}: relative difference {d:.2e}")
    assert d <= rel, f"{what}: relative difference {d} > {rel}"


def train_ddp(group, hook=None, zero=False, steps=6, bucket_mb=0.01):
    """DDP on `group` (a small MLP, rank 0's start, SGD or ZeRO-sharded Adam): parameters."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    model = mlp(seed=0)
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=group,
                                                    bucket_cap_mb=bucket_mb)
    if hook is not None:
        ddp.register_comm_hook(*hook(group))
    if zero:
        opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.Adam,
                                      process_group=group, lr=0.01)
    else:
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    train(ddp, opt, steps)
    if zero:
        opt.consolidate_state_dict(to=0)
    return params_of(model)


def scenario_ecosystem():
    """torch libraries over braid groups: DDP with the PowerSGD hook (its future callbacks
    wait for further all_reduces) and ZeroRedundancyOptimizer against the same run on a Gloo
    group of the same processes; FSDP2 (fully_shard) against the single-process reference;
    DeviceMesh/DTensor; group names; futures whose callbacks wait for other futures."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    init(timeout=timedelta(seconds=60))
    world = dist.group.WORLD
    # torch looks groups up by name (DeviceMesh, DTensor, functional collectives)
    name = world.group_name
    assert name, "the default group has no name"
    assert dist.distributed_c10d._resolve_process_group(name) is world
    gloo = dist.new_group(backend="gloo")

    # nested futures: each callback issues an all_reduce and waits for its future (as
    # PowerSGD's hook does), three deep; the values are closed-form
    def deeper(k):
        def cb(fut):
            t = fut.value()[0] if isinstance(fut.value(), list) else fut.value()
            t = t.clone()
            return dist.all_reduce(t, async_op=True).get_future().wait()[0] + k
        return cb
    t = torch.ones(4)
    got = dist.all_reduce(t, async_op=True).get_future().then(deeper(1)).then(
        deeper(2)).then(deeper(3)).wait()
    # all_reduce multiplies by N; each step then adds k and the next all_reduce multiplies
    want = ((float(N) * N + 1) * N + 2) * N + 3
    eq(got, torch.full((4,), want), "nested future callbacks")

    def power_sgd(group):
        return (psgd.PowerSGDState(process_group=group, matrix_approximation_rank=1,
                                   start_powerSGD_iter=2), psgd.powerSGD_hook)
    # One bucket, for Gloo: with several, the hook's callbacks issue all_reduces while DDP's
    # backward issues the next buckets', in an order that differs between ranks, and Gloo
    # hangs (braid runs callbacks' operations on a communicator of their own:
    # scenario_callbacks checks several buckets).
    close(train_ddp(world, hook=power_sgd, bucket_mb=25),
          train_ddp(gloo, hook=power_sgd, bucket_mb=25), "DDP + PowerSGD hook, braid vs gloo")
    close(train_ddp(world, zero=True), train_ddp(gloo, zero=True),
          "DDP + ZeroRedundancyOptimizer, braid vs gloo")

    # FSDP2 on a DeviceMesh over the braid group: matches a single process on the global
    # batch (FSDP averages gradients over the mesh)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (N,))
    model = mlp(seed=0)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ref = train_with_reference(model, 6)
    full_params = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])
    close(full_params, params_of(ref).float(), "FSDP2 vs single-process reference", rel=1e-5)
    dt = distribute_tensor(torch.arange(4.0 * N), mesh, [Shard(0)])
    eq(dt.to_local(), torch.arange(4.0) + 4 * R, "DTensor shard")
    eq(dt.redistribute(mesh, [Replicate()]).to_local(), torch.arange(4.0 * N),
       "DTensor redistribute")
    dist.destroy_process_group()
    print("OK ecosystem", flush=True)


def scenario_callbacks():
    """Operations issued from future callbacks run on a communicator of their own (one per
    depth of nesting), so they cannot interleave with the main thread's in a different order
    on different ranks: (1) a callback that rank 0 runs at once on its own thread (its future
    is already complete when it adds it) and the other ranks run later on braid's watcher,
    while their main threads go on with a broadcast; (2) DDP with torch's PowerSGD hook over
    several buckets (its callbacks issue two all_reduces per bucket while backward issues the
    next buckets': Gloo hangs on this), with a rank that makes PowerSGD exact, against the
    single-process reference."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    init(timeout=timedelta(seconds=60))

    def cb(fut):
        t = fut.value()[0].clone()
        return dist.all_reduce(t, async_op=True).get_future().wait()[0] + 1

    for i in range(3):
        if R == 0:
            time.sleep(0.3)  # the others add their callback to a future still running
            w = dist.all_reduce(torch.full((4,), float(i)), async_op=True)
            w.wait()
            f = w.get_future()
            assert f.done()
        else:
            f = dist.all_reduce(torch.full((4,), float(i)), async_op=True).get_future()
        g = f.then(cb)
        b = torch.full((3,), float(R + i))
        dist.broadcast(b, src=0)
        eq(b, torch.full((3,), float(i)), "broadcast after a callback")
        eq(g.wait(), torch.full((4,), float(i * N * N + 1)), "callback's all_reduce")

    buckets = set()

    def hook(state, bucket):
        buckets.add(bucket.index())
        return psgd.powerSGD_hook(state, bucket)

    model = mlp(seed=R)  # DDP broadcasts rank 0's parameters
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.0001)
    # rank >= the smaller side of every weight and no minimum compression rate: every weight
    # is compressed, and P Q^T reconstructs it exactly (up to rounding)
    state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=64,
                               min_compression_rate=0, start_powerSGD_iter=2)
    ddp.register_comm_hook(state, hook)
    ref = train_with_reference(ddp, 12)
    log(f"PowerSGD over {len(buckets)} buckets")
    assert len(buckets) >= 3, buckets
    flat = params_of(model)
    outs = [torch.zeros_like(flat) for _ in range(N)]
    dist.all_gather(outs, flat)
    for o in outs:
        assert torch.equal(o, flat), "parameters differ between ranks"
    close(flat, params_of(ref).float(), "DDP + PowerSGD (several buckets) vs reference",
          rel=1e-5)
    dist.destroy_process_group()
    print("OK callbacks", flush=True)


def scenario_mismatch():
    init()
    t = torch.ones(8)
    try:
        if R == 0:
            dist.all_reduce(t)
        else:
            dist.broadcast(t, src=0)
        raise AssertionError("mismatched collectives did not fail")
    except braid.BraidError as e:
        assert "mismatch" in str(e), str(e)
        log("mismatch:", e)
    print("OK mismatch", flush=True)
    os._exit(0)


def scenario_tag_order():
    """Receives match messages by tag, not by arrival (as with Gloo): two tags sent in one
    order are received in the other (the large message first, over its sender's small one);
    two messages of one tag match in order; a receive from any source (src=None, blocking and
    irecv) takes the first message with its tag and names its sender; a receive of another
    length under the same tag is a mismatch naming both."""
    init()
    nxt, prv = (R + 1) % N, (R - 1) % N
    n = 300_000  # 2.4 MB: more than a socket buffer holds
    a = dist.isend(torch.full((4,), float(R)), nxt, tag=5)
    b = dist.isend(torch.arange(n, dtype=torch.float64) + R, nxt, tag=6)
    c1 = dist.isend(torch.tensor([1, R]), nxt, tag=7)
    c2 = dist.isend(torch.tensor([2, R]), nxt, tag=7)
    big = torch.zeros(n, dtype=torch.float64)
    dist.recv(big, prv, tag=6)
    small = torch.zeros(4)
    dist.recv(small, prv, tag=5)
    x, y = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    wx = dist.irecv(x, prv, tag=7)  # posted first: takes the first message of tag 7
    dist.recv(y, prv, tag=7)
    wx.wait()
    for w in (a, b, c1, c2):
        w.wait()
    assert torch.equal(big, torch.arange(n, dtype=torch.float64) + prv), big[:4]
    assert torch.equal(small, torch.full((4,), float(prv))), small
    assert x.tolist() == [1, prv] and y.tolist() == [2, prv], (x, y)
    # any source
    if R == 0:
        seen = set()
        for k in range(N - 1):
            t = torch.zeros(3)
            if k % 2 == 0:
                src = dist.recv(t, tag=9)
            else:
                w = dist.irecv(t, tag=9)
                w.wait()
                src = w._source_rank()
            assert 0 < src < N and src not in seen and torch.equal(t, torch.full((3,), float(src))), (src, seen, t)
            seen.add(src)
        log("any source: got tag 9 from", sorted(seen))
    else:
        dist.send(torch.full((3,), float(R)), 0, tag=9)
    # the same tag with another length: a mismatch on the receiver, named with both sides (on
    # a group of ranks 0 and 1: the other ranks' exit cannot race the detection)
    pair = dist.new_group([0, 1])
    dist.barrier()
    if R == 0:
        try:
            dist.send(torch.ones(4), 1, tag=10, group=pair)
        except braid.BraidError as e:  # rank 1 aborts the communicator when it detects it
            assert "mismatch" in str(e), str(e)
    elif R == 1:
        try:
            dist.recv(torch.zeros(6), 0, tag=10, group=pair)
            raise AssertionError("a receive took a message of another length")
        except braid.BraidError as e:
            assert "mismatch" in str(e) and "count=6" in str(e) and "count=4" in str(e), str(e)
            log("tag order:", e)
    # nobody leaves while another still sets up or reads `pair` (os._exit says no goodbye)
    dist.barrier()
    print("OK tag_order", flush=True)
    os._exit(0)


def scenario_bad_input():
    init()
    # unsupported dtype/op combinations are refused before anything is sent
    for dtype in FLOATS:
        for op in (RO.BAND, RO.BOR, RO.BXOR):
            try:
                dist.all_reduce(torch.ones(3, dtype=dtype), op=op)
                raise AssertionError(f"{op} on {dtype} was accepted")
            except ValueError as e:
                assert "integer" in str(e)
    try:
        dist.all_reduce(torch.ones(3, dtype=torch.bool), op=RO.AVG)
        raise AssertionError("AVG on bool accepted")
    except ValueError:
        pass
    try:
        dist.all_reduce(torch.ones(3, device="meta"))
        raise AssertionError("meta tensor accepted")
    except (ValueError, RuntimeError) as e:
        assert "not supported" in str(e) or "meta" in str(e), str(e)
    try:
        dist.all_reduce(torch.ones(2), op=RO.PREMUL_SUM) if hasattr(RO, "PREMUL_SUM") else None
    except (ValueError, RuntimeError, TypeError, AttributeError):
        pass
    # wrong sizes
    try:
        dist.all_gather_into_tensor(torch.zeros(N * 3 + 1), torch.zeros(3))
        raise AssertionError("wrong all_gather_into_tensor size accepted")
    except (ValueError, RuntimeError):
        pass
    try:
        dist.all_to_all_single(torch.zeros(N), torch.zeros(N), input_split_sizes=[N + 1] * N,
                               output_split_sizes=[1] * N)
        raise AssertionError("bad split sizes accepted")
    except (ValueError, RuntimeError):
        pass
    # the group still works afterwards
    t = torch.ones(4)
    dist.all_reduce(t)
    eq(t, torch.full((4,), float(N)), "all_reduce after bad input")
    dist.destroy_process_group()
    print("OK bad_input", flush=True)


def last_rank_fails(sig, name, error_class, expect, within):
    """Trains a little, then the last rank sends itself `sig`; the survivors' operations must
    raise `error_class` containing every string of `expect` within `within` seconds."""
    init()
    t = torch.ones(1 << 16)
    for i in range(20):
        dist.all_reduce(t)
    if R == N - 1:
        os.kill(os.getpid(), sig)
    start = time.monotonic()
    try:
        for i in range(1000000):
            dist.all_reduce(t)
        raise AssertionError(f"collectives kept succeeding after a rank got {sig!r}")
    except error_class as e:
        took = time.monotonic() - start
        log(f"error after {took:.2f} s: {e}")
        assert all(x in str(e) for x in expect), str(e)
        assert took < within, took
    print(f"OK {name}", flush=True)
    os._exit(0)


def scenario_kill():
    """The last rank kills itself (SIGKILL) mid-training; the survivors' next operations raise
    an error naming it, within the heartbeat timeout, never a hang."""
    last_rank_fails(signal.SIGKILL, "kill", braid.BraidError, [f"rank {N - 1}"], 20)


def scenario_stop():
    """The last rank stops itself (SIGSTOP) mid-training: a hung process, whose sockets stay
    open. braid's failure detector declares it dead after its heartbeat timeout (2 s here,
    set by the test); the survivors' operations raise an error naming it, long before the
    operation timeout (torch's 30 minutes), never a hang."""
    last_rank_fails(signal.SIGSTOP, "stop", braid.PeerError,
                    [f"rank {N - 1}", "no heartbeat"], 15)


def scenario_monitored_missing():
    """The last rank never enters monitored_barrier: rank 0 raises naming it (as Gloo's
    monitored_barrier does); the others time out instead of hanging."""
    init()
    dist.barrier()
    if R == N - 1:
        time.sleep(4)
        print("OK monitored_missing", flush=True)
        os._exit(0)
    try:
        bt.monitored_barrier(timeout=timedelta(seconds=1), wait_all_ranks=True)
        raise AssertionError("monitored_barrier passed without rank N-1")
    except RuntimeError as e:
        log("monitored_barrier:", e)
        if R == 0:
            assert f"Ranks {N - 1} failed to pass monitoredBarrier in 1000 ms" in str(e), str(e)
    print("OK monitored_missing", flush=True)
    os._exit(0)


def scenario_ddp_kill():
    """The last rank dies (SIGKILL) in the middle of DDP's backward, after some of its buckets'
    all-reduces were issued: the survivors' backward raises an error naming it (through
    DDP's futures), never a crash or a hang."""
    init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.02)
    x = torch.randn(4, 64)
    for _ in range(3):
        ddp(x).sum().backward()
    if R == N - 1:
        # the first layer's gradient is among the last computed: earlier buckets are in flight
        model[0].weight.register_hook(lambda g: os.kill(os.getpid(), signal.SIGKILL))
    start = time.monotonic()
    try:
        for _ in range(50):
            ddp(x).sum().backward()
        raise AssertionError("training kept succeeding after a rank died")
    except RuntimeError as e:
        log(f"backward raised after {time.monotonic() - start:.2f} s: {str(e)[:300]}")
        assert f"rank {N - 1}" in str(e), str(e)
    print("OK ddp_kill", flush=True)
    os._exit(0)


def scenario_init(method):
    """init_process_group through env://, tcp://, file:// or an explicit store."""
    if method == "env":
        dist.init_process_group("braid", init_method="env://")
    elif method == "tcp":
        dist.init_process_group("braid", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                                rank=R, world_size=N)
    elif method == "file":
        dist.init_process_group("braid", init_method=f"file://{os.environ['INIT_FILE']}",
                                rank=R, world_size=N)
    elif method == "store":
        store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), N, R == 0,
                              timeout=timedelta(seconds=60))
        dist.init_process_group("braid", store=store, rank=R, world_size=N)
    t = torch.full((3,), float(R))
    dist.all_reduce(t)
    eq(t, torch.full((3,), float(N * (N - 1) // 2)), f"all_reduce after init {method}")
    assert dist.get_backend() == "braid"
    dist.destroy_process_group()
    print(f"OK init {method}", flush=True)


def scenario_torchrun():
    """Launched by torchrun (its environment: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*)."""
    dist.init_process_group("braid")
    r, n = dist.get_rank(), dist.get_world_size()
    assert os.environ.get("LOCAL_RANK") is not None
    t = torch.full((4,), float(r + 1))
    dist.all_reduce(t)
    eq(t, torch.full((4,), float(n * (n + 1) // 2)), "torchrun all_reduce")
    dist.destroy_process_group()
    print(f"OK torchrun rank {r}", flush=True)


if __name__ == "__main__":
    name = sys.argv[1]
    fn = globals()[f"scenario_{name}"]
    fn(*sys.argv[2:])
