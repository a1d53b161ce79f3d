"""The torch.distributed backend "braid" across real processes (2 and 3 ranks)."""

import os
import subprocess
import sys

import pytest

from conftest import HERE, free_port, start

pytest.importorskip("torch")


@pytest.mark.parametrize("n", [2, 3])
def test_every_operation_every_dtype(ranks, n):
    outs = ranks("ops", n, timeout=300)
    assert all("OK ops" in o for o in outs)


@pytest.mark.parametrize("n", [1, 2])
def test_every_operation_small_groups(ranks, n):
    # 1 rank (every collective is a copy) and 2 ranks over plain TCP sockets
    env = {"BRAID_TRANSPORT": "tcp"} if n == 2 else None
    outs = ranks("ops", n, timeout=300, env=env)
    assert all("OK ops" in o for o in outs)


@pytest.mark.parametrize("n", [2, 3])
def test_async_handles_and_futures(ranks, n):
    outs = ranks("async", n)
    assert all("OK async" in o for o in outs)


@pytest.mark.parametrize("n", [2, 3])
def test_ddp_matches_single_process_reference(ranks, n):
    outs = ranks("ddp", n)
    assert all("OK ddp" in o for o in outs)


def test_torch_libraries_on_braid_groups(ranks):
    # PowerSGD and ZeRO against Gloo in the same processes, FSDP2, DTensor, nested futures
    outs = ranks("ecosystem", 2, timeout=240)
    assert all("OK ecosystem" in o for o in outs)


@pytest.mark.parametrize("n", [2, 3])
def test_operations_from_future_callbacks_keep_their_own_order(ranks, n):
    # a callback run at once on one rank and later on the others; PowerSGD over 3 buckets
    outs = ranks("callbacks", n, timeout=120)
    assert all("OK callbacks" in o for o in outs)
    assert all("PowerSGD over 3 buckets" in o for o in outs), outs


def test_mismatched_collectives_raise_mismatch_on_every_rank(ranks):
    outs = ranks("mismatch", 2, timeout=60)
    assert all("OK mismatch" in o for o in outs)


@pytest.mark.parametrize("transport", ["shm", "tcp", "ib"])
def test_receives_match_by_tag_and_from_any_source(ranks, transport):
    env = {"BRAID_TRANSPORT": transport}
    if transport == "ib":
        env["BRAID_IB_PROVIDER"] = "emulated"  # braid's userspace NIC (no RDMA device here)
    outs = ranks("tag_order", 3, timeout=60, env=env)
    assert all("OK tag_order" in o for o in outs), outs
    assert "any source: got tag 9 from [1, 2]" in outs[0], outs[0]


@pytest.mark.parametrize("n", [2, 3])
def test_bad_input_is_refused_before_sending(ranks, n):
    outs = ranks("bad_input", n)
    assert all("OK bad_input" in o for o in outs)


def test_kill_9_survivors_raise_naming_the_dead_rank(tmp_path):
    n = 3
    codes, outs = start("kill", n, tmp_path).wait(60)
    assert codes[n - 1] == -9, outs[n - 1]
    for r in range(n - 1):
        assert codes[r] == 0, f"rank {r}:\n{outs[r]}"
        assert "OK kill" in outs[r]


def test_stopped_rank_is_named_within_the_heartbeat_timeout(tmp_path):
    # SIGSTOP: no connection breaks; only the heartbeats tell (every 0.5 s, dead after 2 s)
    n = 3
    env = {"BRAID_HEARTBEAT": "0.5", "BRAID_HEARTBEAT_TIMEOUT": "2"}
    launch = start("stop", n, tmp_path, env=env)
    codes = []
    try:
        for r in range(n - 1):
            codes.append(launch.procs[r].wait(timeout=90))
    except subprocess.TimeoutExpired:
        pass
    launch.procs[n - 1].kill()
    _, outs = launch.wait(10)  # kills whatever is left
    for r in range(n - 1):
        assert r < len(codes) and codes[r] == 0, f"rank {r}:\n{outs[r]}"
        assert "OK stop" in outs[r]


def test_monitored_barrier_names_the_missing_rank(ranks):
    outs = ranks("monitored_missing", 3, timeout=60)
    assert all("OK monitored_missing" in o for o in outs)


def test_rank_killed_inside_ddp_backward(tmp_path):
    n = 3
    codes, outs = start("ddp_kill", n, tmp_path, env={"PYTHONFAULTHANDLER": "1"}).wait(90)
    assert codes[n - 1] == -9, outs[n - 1]
    for r in range(n - 1):
        assert codes[r] == 0, f"rank {r}:\n{outs[r]}"
        assert "OK ddp_kill" in outs[r]


@pytest.mark.parametrize("method", ["env", "tcp", "file", "store"])
def test_init_methods(ranks, tmp_path, method):
    env = {"INIT_FILE": str(tmp_path / "rendezvous")}
    outs = ranks("init", 2, args=(method,), env=env)
    assert all(f"OK init {method}" in o for o in outs)


def test_torchrun_launch(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port),
           os.path.join(HERE, "worker.py"), "torchrun"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=str(tmp_path))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    assert "OK torchrun rank 0" in out and "OK torchrun rank 1" in out
