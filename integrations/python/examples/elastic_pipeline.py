#!/usr/bin/env python3
"""Elastic pipeline training on braid: a model of numbered blocks runs as a pipeline over the
members of a running job, re-planned when members join, die or slow down, with no process
restarted.

Under braid-run (4 stages; a 5th process joins after 5 s; or rank 2 is killed after 6 s and
the survivors restore the last checkpoint; or 2 stages x 2 replicas):

    braid-run -n 4 --join 1@5 -- python3 elastic_pipeline.py --blocks 10 --steps 30 \\
        --micro-batches 4
    braid-run -n 4 --kill 2@6 -- python3 elastic_pipeline.py --blocks 10 --steps 30 \\
        --micro-batches 4 --checkpoint-every 5
    braid-run -n 4 -- python3 elastic_pipeline.py --blocks 10 --steps 30 --micro-batches 4 \\
        --replicas 2

With torch's environment (MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE; rank 0 hosts braid's
coordinator) start the ranks as usual, and a joiner later with the same MASTER_ADDR/PORT and
``--join``. BRAID_PIPELINE_SLOWDOWN=F (F >= 1) makes this process's stage compute F times
slower: the coordinator re-weighs it by its measured throughput and the re-plan gives it fewer
blocks.

Prints ``# plan epoch=E: 1-3|4-6|7-9|10`` per plan (every member), ``step=S loss=L`` per step
(the member of rank 0), ``# step S failed: ...``, ``# restored step S from DIR``, ``# replan
epoch=E moved_bytes=X model_bytes=Y``, ``# first step on epoch E plan after T s``, and at the
end ``reference match: yes|no``: every member compares the blocks it owns with a
single-process reference (the same blocks from the same initialisation, trained on the same
global batches with the same optimizer, full batch: GPipe with equal micro-batches computes
the full-batch gradient up to float rounding, so the comparison uses rtol 1e-5, atol 1e-6);
the verdicts are all-reduced. Exit 0 on a match, 1 otherwise.

Data for step S depends only on S (a generator seeded with S), so a step retried after a
restore sees the same batch.
"""

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

import braid.torch as bt
from braid.torch.pipeline import ElasticPipeline

RTOL, ATOL = 1e-5, 1e-6


class Delay(torch.nn.Module):
    """Simulated compute: the forward sleeps `seconds` (no parameters; paces the drills so
    joins and kills land in the middle of the run and of a step)."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        if self.seconds > 0:
            time.sleep(self.seconds)
        return x


def make_blocks(n, width, delay=0.0, seed=0):
    """Block i: Linear(width, width) + Tanh (the last one without the Tanh), + Delay."""
    torch.manual_seed(seed)
    blocks = []
    for i in range(n):
        layers = [torch.nn.Linear(width, width)]
        if i < n - 1:
            layers.append(torch.nn.Tanh())
        layers.append(Delay(delay))
        blocks.append(torch.nn.Sequential(*layers))
    return blocks


def make_optimizer(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def data(step, batch, width):
    """The global batch of step `step` (1-based): depends on the step only."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(batch, width, generator=g)
    y = torch.sin(x.roll(1, dims=1)) * 0.5
    return x, y


def reference(args):
    """The same blocks trained by one process on the full batches."""
    blocks = make_blocks(args.blocks, args.width)
    opts = [make_optimizer(list(b.parameters()), args.lr) for b in blocks]
    model = torch.nn.Sequential(*blocks)
    loss_fn = torch.nn.MSELoss()
    for s in range(1, args.steps + 1):
        x, y = data(s, args.batch, args.width)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        for o in opts:
            o.step()
    return blocks


def init_group(args):
    """The default braid process group: braid-run's environment (BRAID_COORDINATOR; joiners
    have no BRAID_RANK) or torch's (MASTER_ADDR...; --join for joiners)."""
    under_braid_run = "BRAID_COORDINATOR" in os.environ and "MASTER_ADDR" not in os.environ
    joining = args.join or (under_braid_run and "BRAID_RANK" not in os.environ)
    if joining:
        pg = bt.join()
        print(f"# joined: rank {pg.rank()} of {pg.size()}", flush=True)
        return pg
    if under_braid_run:
        dist.init_process_group("braid", store=dist.HashStore(),
                                rank=int(os.environ["BRAID_RANK"]),
                                world_size=int(os.environ["BRAID_WORLD_SIZE"]))
    else:
        dist.init_process_group("braid")
    return dist.distributed_c10d._get_default_group()


def default_checkpoint_dir():
    """A directory shared by the members of this job (they run on one host): named after the
    job's coordinator (braid-run) or MASTER_ADDR:MASTER_PORT."""
    key = os.environ.get("BRAID_COORDINATOR") or (
        f"{os.environ.get('MASTER_ADDR', 'local')}-{os.environ.get('MASTER_PORT', '0')}")
    key = "".join(c if c.isalnum() else "-" for c in key)
    return os.path.join(tempfile.gettempdir(), f"braid-pipeline-{key}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=10, help="blocks of the model")
    ap.add_argument("--steps", type=int, default=30, help="training steps of the whole job")
    ap.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--checkpoint-every", type=int, default=0,
                    help="checkpoint every K steps (0: never)")
    ap.add_argument("--checkpoint-dir", default=None,
                    help="checkpoint directory shared by the members (default: one in the "
                         "temporary directory named after the job)")
    ap.add_argument("--replicas", type=int, default=None, help="members per stage")
    ap.add_argument("--batch", type=int, default=32, help="global batch size")
    ap.add_argument("--width", type=int, default=64, help="width of every block")
    ap.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    ap.add_argument("--block-time", type=float, default=0.015,
                    help="simulated compute: seconds each block's forward sleeps per "
                         "micro-batch (paces the drills; not counted as measured compute)")
    ap.add_argument("--step-time", type=float, default=0.0,
                    help="seconds every member sleeps after each step")
    ap.add_argument("--join", action="store_true",
                    help="join a running job (torch's environment; under braid-run joiners "
                         "are recognised by their missing BRAID_RANK)")
    args = ap.parse_args()
    os.environ.setdefault("BRAID_ELASTIC", "1")
    torch.set_num_threads(1)
    slowdown = float(os.environ.get("BRAID_PIPELINE_SLOWDOWN") or 1.0)
    ckdir = None
    if args.checkpoint_every:
        ckdir = args.checkpoint_dir or default_checkpoint_dir()

    # Built before joining: once admitted, a joiner is waited for by the running members
    # (and torch.optim's first use imports lazily, about a second).
    blocks = make_blocks(args.blocks, args.width, args.block_time)
    make_optimizer([torch.nn.Parameter(torch.zeros(1))], args.lr)
    pg = init_group(args)
    pipe = ElasticPipeline(blocks, torch.nn.MSELoss(), lambda ps: make_optimizer(ps, args.lr),
                           micro_batches=args.micro_batches, group=pg,
                           checkpoint_dir=ckdir, checkpoint_every=args.checkpoint_every,
                           replicas=args.replicas, slowdown=slowdown, clock=time.thread_time)
    while pipe.step_count < args.steps:
        loss = pipe.step(lambda s: data(s, args.batch, args.width))
        if pg.rank() == 0:
            print(f"step={pipe.step_count} loss={loss.item():.6f}", flush=True)
        if args.step_time > 0:
            time.sleep(args.step_time)

    ref = reference(args)
    worst, ok = 0.0, True
    for b in pipe.stage_blocks:
        for p, q in zip(blocks[b].parameters(), ref[b].parameters()):
            worst = max(worst, (p.detach() - q.detach()).abs().max().item())
            ok = ok and torch.allclose(p.detach(), q.detach(), rtol=RTOL, atol=ATOL)
    verdict = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(verdict, group=pg)
    match = int(verdict.item()) == 0
    mine = pipe.stage_blocks
    held = f"blocks {mine.start + 1}-{mine.stop}" if len(mine) else "no blocks"
    print(f"# rank {pg.rank()} {held}: max abs diff from the reference {worst:.3g}", flush=True)
    print(f"reference match: {'yes' if match else 'no'}", flush=True)
    pipe.close()
    dist.destroy_process_group()
    return 0 if match else 1


if __name__ == "__main__":
    sys.exit(main())
