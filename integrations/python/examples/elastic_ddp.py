#!/usr/bin/env python3
"""Elastic DDP on braid: processes join a RUNNING job and dead ones are dropped, with no
process restarted (torchrun restarts every worker when one joins).

Start the job (2 processes here; every process needs BRAID_ELASTIC=1):

    BRAID_ELASTIC=1 torchrun --nproc-per-node 2 --master-port 29500 elastic_ddp.py --steps 400

Later, from any shell, add a process to the running job:

    BRAID_ELASTIC=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python elastic_ddp.py --join --steps 400

It is admitted at the running ranks' next braid.torch.update() (between two steps), receives
the current parameters and step from the oldest member, and all continue with DDP over the
new view. Kill any process but the one hosting the coordinator (group rank 0 of the first
view; or run `braid-coordinator` yourself and set BRAID_COORDINATOR) and the survivors drop it
at their next step and continue. Each view change prints `# view epoch=E size=N rank=R` and a
check that every rank holds identical parameters.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

import braid.torch as bt


def model_fn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 4))


def batch(step, rank, size, per_rank=16):
    """This rank's slice of global batch `step` (the global batch depends on the step only)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(per_rank * size, 16, generator=g)
    y = x[:, :4].sin()
    return x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]


def checksum(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().sum()


def check_identical(model, pg):
    """All-gathers each rank's parameter checksum; raises unless all are identical."""
    c = checksum(model).reshape(1)
    all_c = [torch.zeros(1, dtype=torch.float64) for _ in range(pg.size())]
    dist.all_gather(all_c, c, group=pg)
    if any(not torch.equal(a, c) for a in all_c):
        raise RuntimeError(f"parameters differ between ranks: {[a.item() for a in all_c]}")
    print(f"# params identical on {pg.size()} ranks (checksum {c.item():.12f})", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--join", action="store_true", help="join a running job")
    ap.add_argument("--steps", type=int, default=400, help="training steps of the whole job")
    ap.add_argument("--step-time", type=float, default=0.02,
                    help="extra seconds per step (to watch joins and failures)")
    ap.add_argument("--powersgd", action="store_true",
                    help="DDP with torch's PowerSGD comm hook over several small buckets")
    args = ap.parse_args()
    os.environ.setdefault("BRAID_ELASTIC", "1")

    model = model_fn()
    step = torch.zeros(1, dtype=torch.int64)  # the job's step, synced with the parameters
    if args.join:
        pg = bt.join()
        print(f"# joined: rank {pg.rank()} of {pg.size()}", flush=True)
    else:
        dist.init_process_group("braid")
        pg = dist.distributed_c10d._get_default_group()
    loss = torch.zeros(())
    new_view = True  # (re)start on this view: state from the oldest member, a fresh DDP
    while True:
        try:
            if new_view:
                bt.sync_from_oldest(list(model.parameters()) + [step], pg)
                print(f"# view epoch={bt.communicator(pg).epoch} size={pg.size()} "
                      f"rank={pg.rank()} step={int(step)}", flush=True)
                check_identical(model, pg)
                opt = torch.optim.SGD(model.parameters(), lr=0.05)
                if args.powersgd:
                    # several buckets: the hook's callbacks issue all_reduces while backward
                    # issues the next buckets' (braid orders them; Gloo hangs on this)
                    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
                    ddp = torch.nn.parallel.DistributedDataParallel(
                        model, process_group=pg, bucket_cap_mb=0.0001)
                    state = powerSGD_hook.PowerSGDState(
                        process_group=pg, matrix_approximation_rank=2, start_powerSGD_iter=2)
                    ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
                else:
                    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=pg)
                new_view = False
            if int(step) >= args.steps:  # every member holds the same step
                break
            x, y = batch(int(step), pg.rank(), pg.size())
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            opt.step()
            step += 1
            if int(step) % 50 == 0 and pg.rank() == 0:
                print(f"step {int(step)} loss {loss.item():.5f} size {pg.size()}", flush=True)
            time.sleep(args.step_time)
        except RuntimeError as e:
            # A member died (or failed): the survivors move to a view without it below.
            # braid.BraidError is a RuntimeError; errors that reach us through DDP's futures
            # are RuntimeErrors carrying braid's message.
            print(f"# step {int(step)} failed: {e}", flush=True)
        # Between steps: adopt a new view (joiners admitted, dead or leaving members dropped).
        if bt.update(pg) is not None:
            new_view = True
    check_identical(model, pg)
    print(f"# done: step {int(step)} on {pg.size()} ranks, final loss "
          f"{loss.item():.5f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
