"""Scenarios for test_pipeline.py that call braid.torch.pipeline's point-to-point helpers
directly, on 2 ranks under braid-run: `pipeline_worker.py SCENARIO`.

forged_header: rank 0 sends messages whose header does not match what rank 1 expects, under the
tags rank 1 expects (so only the header check can catch them); rank 1 must raise PipelineError
naming what it expected and what came, and never hand out the data. Then a message with the
tags of micro-batch 3 and then 2's: braid matches receives by tag, so rank 1, waiting for
micro-batch 2, gets 2 and then 3.
Prints `OK forged_header` on success."""

import os
import sys

import torch
import torch.distributed as dist

import braid
import braid.torch as bt
from braid.torch import pipeline as pl

R = int(os.environ["BRAID_RANK"])
N = int(os.environ["BRAID_WORLD_SIZE"])


def log(*a):
    print(f"[rank {R}]", *a, flush=True)


def raw_send(pg, t, tag):
    pg._p2p_now(True, t, 1, tag).wait()


def scenario_forged_header():
    dist.init_process_group("braid", store=dist.HashStore(), rank=R, world_size=N)
    pg = dist.distributed_c10d._get_default_group()
    step, F, B = 7, pl.FORWARD, pl.BACKWARD
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)

    def tag(index, direction, part):
        return pl.tag_for(0, step, index, direction, part)

    if R == 0:
        # 1. a good message (the helpers agree with themselves)
        for w in pl.send_tensor(pg, x, 1, step, 2, F):
            w.wait()
        # 2. header of micro-batch 3 under the tags of micro-batch 2, then its payload
        raw_send(pg, pl.make_header(step, 3, F, x), tag(2, F, 0))
        raw_send(pg, x, tag(2, F, 1))
        # 3. the right micro-batch but the backward direction
        raw_send(pg, pl.make_header(step, 2, B, x), tag(2, F, 0))
        raw_send(pg, x, tag(2, F, 1))
        # 4. another step
        raw_send(pg, pl.make_header(step + 1, 2, F, x), tag(2, F, 0))
        raw_send(pg, x, tag(2, F, 1))
        # 5. a header announcing an absurd size, 6. an unknown dtype code: no payload follows
        h = pl.make_header(step, 2, F, x)
        h[5], h[6] = 1 << 30, 1 << 30
        raw_send(pg, h, tag(2, F, 0))
        h = pl.make_header(step, 2, F, x)
        h[3] = 99
        raw_send(pg, h, tag(2, F, 0))
        # 7. micro-batch 3, then 2, each with its own tags, while rank 1 waits for 2 first
        ws = pl.send_tensor(pg, x + 3, 1, step, 3, F) + pl.send_tensor(pg, x + 2, 1, step, 2, F)
        for w in ws:
            w.wait()
        print("OK forged_header", flush=True)
        os._exit(0)

    # rank 1
    got = pl.recv_tensor(pg, 0, step, 2, F)
    assert torch.equal(got, x), got
    expect = [
        ("got micro-batch 3 forward of step 7", True),
        ("got micro-batch 2 backward of step 7", True),
        ("got micro-batch 2 forward of step 8", True),
        ("announcing", False),
        ("unknown dtype code 99", False),
    ]
    for what, payload in expect:
        try:
            t = pl.recv_tensor(pg, 0, step, 2, F)
            raise AssertionError(f"a forged header was accepted ({what}): {t}")
        except pl.PipelineError as e:
            msg = str(e)
            assert "expected micro-batch 2 forward" in msg and what in msg, msg
            log("refused:", msg)
        if payload:  # drain the payload the header announced (raw: no header check)
            buf = torch.zeros(3, 4)
            pg._p2p_now(False, buf, 0, tag(2, F, 1)).wait()
    # braid matches receives by tag: micro-batch 3's messages wait while 2's are received
    got2 = pl.recv_tensor(pg, 0, step, 2, F)
    got3 = pl.recv_tensor(pg, 0, step, 3, F)
    assert torch.equal(got2, x + 2) and torch.equal(got3, x + 3), (got2, got3)
    log("matched by tag: micro-batch 2, then 3 (sent in the other order)")
    print("OK forged_header", flush=True)
    os._exit(0)


if __name__ == "__main__":
    bt  # noqa: B018  (imported for the backend registration)
    globals()[f"scenario_{sys.argv[1]}"]()
