#!/usr/bin/env python3
"""Collective timing THROUGH THE TORCH API for any torch.distributed backend ("braid",
"gloo"), nccl-tests-style output; and DDP step time. Used by perf/torch_compare.

Usage: torch_coll.py --backend braid|gloo -n NPROCS --op all_reduce|all_gather_into_tensor|
                     reduce_scatter_tensor|broadcast|ddp [--minbytes 8] [--maxbytes 268435456]
                     [--factor 8] [--seconds 0.5] [--iters N]

Spawns N processes on 127.0.0.1 (init_method tcp://), float32, SUM. For each size: barrier,
warmup, barrier, then timed iterations (time.perf_counter around each torch call on every
rank; per-iteration time = max over ranks; reported time = median of those, avg = their mean).
Sizes are the bytes of the buffer nccl-tests names: all_reduce/broadcast: the tensor;
all_gather_into_tensor: the output (n x input); reduce_scatter_tensor: the input (n x output).
algbw = size/time; busbw = algbw x 2(n-1)/n (all_reduce), (n-1)/n (all_gather,
reduce_scatter), 1 (broadcast). #wrong: elements differing from the closed form in a check
run on fresh data after the timed loop.

--op ddp: an MLP of a few million parameters (1024-2048-2048-1024 = 6.3 M) under
DistributedDataParallel, SGD, batch 32 per rank; prints the median step time over --iters
steps after warmup: `# ddp step_ms=X params=P`.
"""
import argparse
import os
import socket
import statistics
import sys
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


BUSF = {
    "all_reduce": lambda n: 2.0 * (n - 1) / n,
    "all_gather_into_tensor": lambda n: (n - 1) / n,
    "reduce_scatter_tensor": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
}


def sizes_of(args):
    out, s = [], args.minbytes
    while s <= args.maxbytes:
        out.append(s)
        s *= args.factor
    if out[-1] != args.maxbytes:
        out.append(args.maxbytes)
    return out


def ddp(args, rank, n, torch, dist):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(),
                                torch.nn.Linear(2048, 2048), torch.nn.ReLU(),
                                torch.nn.Linear(2048, 1024))
    params = sum(p.numel() for p in model.parameters())
    m = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    x = torch.randn(32, 1024)
    y = torch.randn(32, 1024)
    iters = args.iters or 30
    times = []
    for it in range(-5, iters):
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        dt = time.perf_counter() - t0
        if it >= 0:
            times.append(dt)
    tt = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(tt, op=dist.ReduceOp.MAX)
    if rank == 0:
        med = statistics.median(tt.tolist()) * 1e3
        print(f"# ddp step_ms={med:.3f} params={params} nranks={n} backend={args.backend}",
              flush=True)


def worker(rank, args, port):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist
    if args.backend == "braid":
        import braid.torch  # noqa: F401  (registers the backend)

    torch.set_num_threads(1)
    n = args.nprocs
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=n)
    if args.op == "ddp":
        ddp(args, rank, n, torch, dist)
        dist.destroy_process_group()
        return
    op = args.op
    busf = BUSF[op](n)
    if rank == 0:
        print(f"# torch {torch.__version__} backend {args.backend} {op}, nranks={n}, float32, "
              f"time = median over iters of max-over-ranks", flush=True)
        print(f"# {'size':>12} {'count':>12} {'type':>6} {'redop':>6} {'time(us)':>12} "
              f"{'avg(us)':>12} {'algbw(GB/s)':>11} {'busbw(GB/s)':>11} {'iters':>6} "
              f"{'#wrong':>6}", flush=True)
    for nbytes in sizes_of(args):
        count = max(1, nbytes // 4)
        if op in ("all_gather_into_tensor", "reduce_scatter_tensor"):
            per = count // n
            if per == 0:
                continue
            count = per * n
        nbytes = count * 4
        if op == "all_gather_into_tensor":
            inp = torch.full((count // n,), float(rank + 1))
            out = torch.zeros(count)
            once = lambda: dist.all_gather_into_tensor(out, inp)  # noqa: E731
        elif op == "reduce_scatter_tensor":
            inp = torch.full((count,), float(rank + 1))
            out = torch.zeros(count // n)
            once = lambda: dist.reduce_scatter_tensor(out, inp)  # noqa: E731
        elif op == "broadcast":
            t = torch.full((count,), float(rank + 1))
            once = lambda: dist.broadcast(t, src=0)  # noqa: E731
        else:
            t = torch.full((count,), float(rank + 1))
            once = lambda: dist.all_reduce(t)  # noqa: E731
        # calibrate the iteration count to about --seconds
        dist.barrier()
        t0 = time.perf_counter()
        once()
        one = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(one, op=dist.ReduceOp.MAX)
        iters = args.iters or int(max(5, min(2000, args.seconds / max(one.item(), 1e-7))))
        warm = max(2, iters // 10)
        times = []
        dist.barrier()
        for it in range(-warm, iters):
            if it == 0:
                dist.barrier()
            t0 = time.perf_counter()
            once()
            dt = time.perf_counter() - t0
            if it >= 0:
                times.append(dt)
        tt = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(tt, op=dist.ReduceOp.MAX)
        # check on fresh data
        wrong = 0
        tri = n * (n + 1) / 2
        if op == "all_reduce":
            t.fill_(rank + 1)
            once()
            wrong = int((t != tri).sum())
        elif op == "broadcast":
            t.fill_(rank + 1)
            once()
            wrong = int((t != 1).sum())
        elif op == "all_gather_into_tensor":
            out.zero_()
            once()
            want = torch.arange(1, n + 1, dtype=torch.float32).repeat_interleave(count // n)
            wrong = int((out != want).sum())
        else:
            out.zero_()
            once()
            wrong = int((out != tri).sum())
        w = torch.tensor([wrong], dtype=torch.int64)
        dist.all_reduce(w)
        if rank == 0:
            ts = tt.tolist()
            med = statistics.median(ts)
            avg = sum(ts) / len(ts)
            algbw = nbytes / med / 1e9
            print(f"  {nbytes:>12} {count:>12} {'float':>6} {'sum':>6} {med * 1e6:>12.2f} "
                  f"{avg * 1e6:>12.2f} {algbw:>11.3f} {algbw * busf:>11.3f} {len(ts):>6} "
                  f"{int(w.item()):>6}", flush=True)
        del once
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="braid")
    ap.add_argument("-n", "--nprocs", type=int, default=2)
    ap.add_argument("--op", default="all_reduce", choices=list(BUSF) + ["ddp"])
    ap.add_argument("--minbytes", type=int, default=8)
    ap.add_argument("--maxbytes", type=int, default=256 << 20)
    ap.add_argument("--factor", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--iters", type=int, default=0)
    args = ap.parse_args()
    import torch.multiprocessing as mp
    port = free_port()
    mp.spawn(worker, args=(args, port), nprocs=args.nprocs, join=True)


if __name__ == "__main__":
    sys.exit(main())
