"""Multi-process harness: runs a scenario of worker.py in N real processes (ranks) with
torch's environment (MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE) and checks every rank's exit
status and output. Every launch has a deadline: a hang is a failure, never a stuck CI."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """Processes of one launch."""

    def __init__(self, procs, logs):
        self.procs = procs
        self.logs = logs

    def wait(self, timeout):
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            left = deadline - time.monotonic()
            try:
                codes.append(p.wait(timeout=max(0.1, left)))
            except subprocess.TimeoutExpired:
                codes.append(None)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        outs = []
        for path in self.logs:
            with open(path, errors="replace") as f:
                outs.append(f.read())
        return codes, outs


def start(scenario, n, tmp_path, env=None, args=(), ranks=None, port=None, extra_env=None):
    """Starts `scenario` of worker.py on ranks 0..n-1 (or `ranks`)."""
    port = port or free_port()
    procs, logs = [], []
    for r in (ranks if ranks is not None else range(n)):
        e = dict(os.environ)
        e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                 WORLD_SIZE=str(n), PYTHONUNBUFFERED="1")
        e.pop("BRAID_COORDINATOR", None)
        if env:
            e.update(env)
        if extra_env and r in extra_env:
            e.update(extra_env[r])
        log = os.path.join(str(tmp_path), f"{scenario}-{r}.log")
        logs.append(log)
        f = open(log, "w")
        procs.append(subprocess.Popen([sys.executable, WORKER, scenario, *map(str, args)],
                                      env=e, stdout=f, stderr=subprocess.STDOUT,
                                      cwd=str(tmp_path)))
        f.close()
    return Ranks(procs, logs)


def run(scenario, n, tmp_path, timeout=120, **kw):
    """Runs `scenario` on n ranks and asserts every rank exited 0; returns the outputs."""
    codes, outs = start(scenario, n, tmp_path, **kw).wait(timeout)
    for r, (c, o) in enumerate(zip(codes, outs)):
        assert c == 0, f"rank {r} of {scenario} (n={n}) exited {c}:\n{o[-6000:]}"
    return outs


@pytest.fixture
def ranks(tmp_path):
    """run(scenario, n, ...) bound to this test's temporary directory."""
    def go(scenario, n, **kw):
        return run(scenario, n, tmp_path, **kw)
    return go


def pytest_configure(config):
    # The worker imports the INSTALLED braid package (sys.path[0] is this directory), so
    # the package shipped is the package tested.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL) if hasattr(signal, "SIGPIPE") else None
