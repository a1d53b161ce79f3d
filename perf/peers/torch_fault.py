#!/usr/bin/env python3
"""A rank fails in the middle of a training-like loop of all_reduces; how long until the
survivors hear of it, THROUGH THE TORCH API, for any torch.distributed backend ("braid",
"gloo"). Used by perf/fault_compare.

Usage: torch_fault.py --backend braid|gloo -n NPROCS --fault stop|kill [--limit 30]

Spawns N processes on 127.0.0.1 (init_method tcp://, the default op timeout of torch: 30
minutes); they all_reduce 64 KiB float32 in a loop. After 3 s the parent sends the last rank
SIGSTOP (a hung process: its sockets stay open) or SIGKILL, and waits at most --limit seconds
for every survivor to raise. Prints one line per survivor and a summary:

  # fault=stop backend=braid survivors=2 raised=2 max_s=2.04 error="..."
  # fault=stop backend=gloo survivors=2 raised=0 max_s=- error="(none within 30 s)"

max_s: seconds from the signal to the last survivor's exception (clock: time.time() on the
same host). braid's heartbeat settings come from the environment (BRAID_HEARTBEAT,
BRAID_HEARTBEAT_TIMEOUT; defaults 1 s and 10 s).
"""
import argparse
import os
import select
import signal
import subprocess
import sys
import time

from torch_coll import free_port  # this directory (sys.path[0])


def child(args):
    import torch
    import torch.distributed as dist
    if args.backend == "braid":
        import braid.torch  # noqa: F401  (registers the backend)
    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{os.environ['PORT']}",
                            rank=rank, world_size=n)
    t = torch.ones(1 << 14)
    dist.all_reduce(t)
    print("READY", flush=True)
    try:
        while True:
            dist.all_reduce(t)
    except Exception as e:  # the failure, as the backend reports it
        msg = str(e).replace("\n", " ")[:300]
        print(f"RAISED {time.time():.6f} {type(e).__name__}: {msg}", flush=True)
    os._exit(0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", required=True)
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--fault", choices=["stop", "kill"], default="stop")
    ap.add_argument("--limit", type=float, default=30.0)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child(args)
    port = free_port()
    procs = []
    for r in range(args.n):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(args.n), PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--child", "--backend", args.backend],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    for p in procs:
        # every rank has 120 s to start (a hung init fails the run, never hangs it)
        ready = select.select([p.stdout], [], [], 120)[0]
        line = p.stdout.readline() if ready else "(no READY within 120 s)"
        if "READY" not in line:
            for q in procs:
                q.kill()
            sys.exit(f"a rank did not start: {line!r}")
    time.sleep(3)
    victim = procs[-1]
    t0 = time.time()
    victim.send_signal(signal.SIGSTOP if args.fault == "stop" else signal.SIGKILL)
    raised, worst, first_err = 0, None, None
    deadline = time.monotonic() + args.limit
    for r, p in enumerate(procs[:-1]):
        try:
            out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        got = [ln for ln in out.splitlines() if ln.startswith("RAISED ")]
        if got:
            _, ts, err = got[0].split(" ", 2)
            dt = float(ts) - t0
            raised += 1
            worst = dt if worst is None else max(worst, dt)
            first_err = first_err or err
            print(f"rank {r}: raised after {dt:.2f} s: {err}")
        else:
            print(f"rank {r}: nothing raised within {args.limit:.0f} s")
    victim.kill()
    victim.wait()
    err = first_err or f"(none within {args.limit:.0f} s)"
    max_s = f"{worst:.2f}" if worst is not None else "-"
    print(f'# fault={args.fault} backend={args.backend} survivors={args.n - 1} '
          f'raised={raised} max_s={max_s} error="{err[:160]}"', flush=True)


if __name__ == "__main__":
    main()
