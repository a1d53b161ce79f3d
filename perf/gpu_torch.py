#!/usr/bin/env python3
"""Peers and checks for perf/gpu_check (issue 14), run on the GPU machine.

  gpu_torch.py nccl-bench --min 8 --max 256M --iters 20
        torch's NCCL backend, 1 rank, all_reduce out-of-place on cuda float32 tensors: the same
        sizes braid-perf -G 1 prints (x4 steps). Columns: size time_us algbw.
  gpu_torch.py copy-bw
        pinned host -> device and device -> host copy bandwidth (GB/s), 256 MiB, torch.
  gpu_torch.py ratios BRAID_PERF_LOG TORCH_LOG
        braid NCCL engine / torch NCCL per size (time ratio and added microseconds); targets:
        <= 5% slower at >= 1 MiB, <= 10 us added at 8 bytes.
  gpu_torch.py staging-ratio BRAID_PERF_LOG COPYBW_LOG
        staging busbw against the pinned copy bandwidth; target >= 70% (at the largest size).
  gpu_torch.py braid-cuda          (under torchrun, 2 ranks)
        torch cuda tensors through the braid backend: all_reduce, broadcast, all_gather,
        send/recv, async work + wait, checked values.
"""
import os
import sys
import time


def parse_size(s):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip()
    return int(s[:-1]) * mult[s[-1].upper()] if s[-1].upper() in mult else int(s)


def nccl_bench(argv):
    import torch
    import torch.distributed as dist
    args = dict(zip(argv[::2], argv[1::2]))
    lo, hi = parse_size(args.get("--min", "8")), parse_size(args.get("--max", "256M"))
    iters = int(args.get("--iters", "20"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    print(f"# torch {torch.__version__} NCCL {torch.cuda.nccl.version()} all_reduce, 1 rank, float32, out-of-place")
    print(f"# {'size':>10} {'time_us':>10} {'algbw':>8}")
    size = lo
    while True:
        n = max(size // 4, 1)
        x = torch.ones(n, device="cuda")
        y = torch.empty_like(x)
        for _ in range(5):
            y.copy_(x)
            dist.all_reduce(y)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(y)
        torch.cuda.synchronize()
        us = (time.perf_counter() - t0) * 1e6 / iters
        print(f"  {n * 4:>10} {us:>10.2f} {n * 4 / us / 1e3:>8.3f}")
        if size >= hi:
            break
        size = min(size * 4, hi)
    dist.destroy_process_group()


def copy_bw(_argv):
    import torch
    n = 256 << 20
    h = torch.empty(n, dtype=torch.uint8).pin_memory()
    d = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = {}
    for name, f in (("h2d", lambda: d.copy_(h, non_blocking=True)),
                    ("d2h", lambda: h.copy_(d, non_blocking=True))):
        f()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            f()
        torch.cuda.synchronize()
        out[name] = n * 10 / (time.perf_counter() - t0) / 1e9
    print(f"# pinned copy GB/s: h2d {out['h2d']:.2f} d2h {out['d2h']:.2f}")


def table(path):
    """size -> out-of-place time (us) from a braid-perf or nccl-bench table."""
    rows = {}
    for line in open(path):
        f = line.split()
        if not f or not f[0].isdigit():
            continue
        if len(f) >= 13:       # braid-perf: size count type redop root time algbw busbw #wrong ...
            rows[int(f[0])] = (float(f[5]), float(f[7]))
        elif len(f) == 3:      # nccl-bench: size time algbw
            rows[int(f[0])] = (float(f[1]), float(f[2]))
    return rows


def ratios(argv):
    braid, torch_ = table(argv[0]), table(argv[1])
    print("# braid NCCL engine vs torch NCCL (1 rank, all_reduce, out-of-place)")
    print(f"# {'size':>10} {'braid_us':>10} {'torch_us':>10} {'ratio':>7} {'added_us':>9} target")
    common = sorted(set(braid) & set(torch_))
    ok = bool(common)
    if not common:
        print("# no size measured by both")
    for size in common:
        b, t = braid[size][0], torch_[size][0]
        target = ""
        if size >= 1 << 20:
            good = b <= 1.05 * t
            target = "PASS <=5%" if good else "FAIL <=5%"
            ok &= good
        elif size <= 8:
            good = b - t <= 10.0
            target = "PASS <=10us" if good else "FAIL <=10us"
            ok &= good
        print(f"  {size:>10} {b:>10.2f} {t:>10.2f} {b / t:>7.3f} {b - t:>9.2f} {target}")
    print(("PASS" if ok else "FAIL") + " NCCL-engine targets")


def staging_ratio(argv):
    rows = table(argv[0])
    line = open(argv[1]).read()
    try:
        h2d = float(line.split("h2d")[1].split()[0])
        d2h = float(line.split("d2h")[1].split()[0])
    except (IndexError, ValueError):
        print("FAIL staging target (>= 70%): no pinned copy bandwidth measured")
        return
    if not rows:
        print("FAIL staging target (>= 70%): no staging row measured")
        return
    peer = min(h2d, d2h)
    size = max(rows)
    busbw = rows[size][1]
    frac = busbw / peer if peer > 0 else 0.0
    print(f"# staging busbw at {size} B: {busbw:.2f} GB/s = {frac * 100:.0f}% of the pinned copy bandwidth ({peer:.2f} GB/s)")
    print(("PASS" if frac >= 0.7 else "FAIL") + " staging target (>= 70%)")


def braid_cuda(_argv):
    import torch
    import torch.distributed as dist
    import braid.torch  # noqa: F401  (registers "braid")
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group("braid")
    n = dist.get_world_size()
    fails = []

    def check(name, got, want):
        if not torch.equal(got.cpu(), want.cpu()):
            fails.append(name)
            print(f"FAIL {name}: got {got[:4].tolist()} want {want[:4].tolist()}")

    x = torch.full((1 << 20,), float(rank + 1), device="cuda")
    dist.all_reduce(x)
    check("all_reduce", x, torch.full_like(x, float(n * (n + 1) // 2)))
    b = torch.arange(1000, device="cuda", dtype=torch.float32) if rank == 0 else torch.zeros(1000, device="cuda")
    dist.broadcast(b, 0)
    check("broadcast", b, torch.arange(1000, dtype=torch.float32))
    outs = [torch.zeros(17, device="cuda", dtype=torch.int64) for _ in range(n)]
    dist.all_gather(outs, torch.full((17,), rank, device="cuda", dtype=torch.int64))
    for r in range(n):
        check(f"all_gather[{r}]", outs[r], torch.full((17,), r, dtype=torch.int64))
    if n >= 2:
        if rank == 0:
            dist.send(torch.arange(33, device="cuda", dtype=torch.float32), 1)
        elif rank == 1:
            y = torch.zeros(33, device="cuda")
            dist.recv(y, 0)
            check("send/recv", y, torch.arange(33, dtype=torch.float32))
    z = torch.ones(4096, device="cuda")
    w = dist.all_reduce(z, async_op=True)
    w.wait()
    torch.cuda.synchronize()
    check("async all_reduce", z, torch.full((4096,), float(n)))
    dist.barrier()
    dist.destroy_process_group()
    print(("OK" if not fails else "FAIL") + f" rank {rank}: braid backend on cuda tensors ({', '.join(fails) or 'all checks'})")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    cmds = {"nccl-bench": nccl_bench, "copy-bw": copy_bw, "ratios": ratios,
            "staging-ratio": staging_ratio, "braid-cuda": braid_cuda}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        print(__doc__)
        sys.exit(2)
    cmds[sys.argv[1]](sys.argv[2:])
