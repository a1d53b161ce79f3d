"""Multi-process harness for braid's MXNet kvstores: runs a scenario of mx_worker.py in W real
worker processes (plus dedicated server processes, or a DMLC-style scheduler) and collects each
process's exit status and output. Every launch has a deadline: a hang is a failure.

These tests run in their own virtual environment (MXNet 1.9.1 needs numpy<1.24): `make
test-mxnet` creates it and installs the braid package into it."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "mx_worker.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """The processes of one launch: workers first, then servers/scheduler."""

    def __init__(self, tmp_path, coordinator=None):
        self.tmp = str(tmp_path)
        self.procs = []  # (name, Popen, log path)
        self.coordinator = coordinator

    def spawn(self, name, argv, env):
        log = os.path.join(self.tmp, f"{name}.log")
        with open(log, "w") as f:
            p = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT,
                                 cwd=self.tmp, start_new_session=True)
        self.procs.append((name, p, log))
        return p

    def pid(self, name):
        for n, p, _ in self.procs:
            if n == name:
                return p.pid
        raise KeyError(name)

    def kill(self, name, sig=signal.SIGKILL):
        os.kill(self.pid(name), sig)

    def wait(self, timeout):
        """Waits for every process (bounded); returns {name: (exit code or None, output)}."""
        deadline = time.monotonic() + timeout
        res = {}
        for name, p, log in self.procs:
            try:
                code = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = None
            res[name] = code
        self.close()
        out = {}
        for name, _, log in self.procs:
            with open(log, errors="replace") as f:
                out[name] = (res[name], f.read())
        return out

    def close(self):
        for _, p, _ in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
                p.wait()
        if self.coordinator is not None:
            self.coordinator.close()
            self.coordinator = None


def base_env(extra=None):
    e = dict(os.environ)
    for k in list(e):
        if k.startswith(("DMLC_", "BRAID_", "MASTER_")) or k in ("RANK", "WORLD_SIZE"):
            if k not in ("BRAID_LIBRARY",):
                del e[k]
    e["PYTHONUNBUFFERED"] = "1"
    e.setdefault("BRAID_TIMEOUT", "60")
    if extra:
        e.update(extra)
    return e


def start(scenario, workers, tmp_path, kvstore="braid_dist_sync", servers=0, env=None,
          args=(), worker_env=None):
    """Starts `scenario` on `workers` worker processes meeting at a braid coordinator hosted
    here (launch convention 1: BRAID_COORDINATOR, BRAID_JOB_TOKEN, BRAID_WORLD_SIZE), with
    `servers` dedicated push/pull servers (`python -m braid.mxnet.server`)."""
    import braid

    token = secrets.token_hex(16)
    coord = braid.Coordinator(bind="127.0.0.1:0", job_token=token)
    job = Job(tmp_path, coord)
    common = {"BRAID_COORDINATOR": f"127.0.0.1:{coord.port}", "BRAID_JOB_TOKEN": token,
              "BRAID_WORLD_SIZE": str(workers), "TEST_KVSTORE": kvstore}
    if servers:
        common["BRAID_PS_SERVERS"] = str(servers)
    common.update(env or {})
    for s in range(servers):
        job.spawn(f"server{s}", [sys.executable, "-m", "braid.mxnet.server"], base_env(common))
    for w in range(workers):
        e = base_env(common)
        if worker_env and w in worker_env:
            e.update(worker_env[w])
        job.spawn(f"worker{w}", [sys.executable, WORKER, scenario, *map(str, args)], e)
    return job


def results(out):
    """The JSON result lines ("RESULT {...}") each process printed."""
    res = {}
    for name, (_, text) in out.items():
        for line in text.splitlines():
            if line.startswith("RESULT "):
                res[name] = json.loads(line[len("RESULT "):])
    return res


def check_ok(out, names=None):
    for name, (code, text) in out.items():
        if names is None or name in names:
            assert code == 0, f"{name} exited {code}:\n{text[-6000:]}"


def run(scenario, workers, tmp_path, timeout=120, **kw):
    """Runs `scenario` and asserts every process exited 0; returns the results."""
    out = start(scenario, workers, tmp_path, **kw).wait(timeout)
    check_ok(out)
    return results(out)
