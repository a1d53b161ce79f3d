"""The elastic example: DDP on 2 processes, a 3rd joins the RUNNING job, all continue with
identical parameters; then a process is killed and the survivors continue. No process is
restarted."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, free_port

pytest.importorskip("torch")

EXAMPLE = os.path.join(REPO, "integrations", "python", "examples", "elastic_ddp.py")


class Proc:
    def __init__(self, args, env, log):
        self.log = log
        with open(log, "w") as f:
            self.p = subprocess.Popen([sys.executable, EXAMPLE, *args], env=env, stdout=f,
                                      stderr=subprocess.STDOUT)

    def text(self):
        with open(self.log, errors="replace") as f:
            return f.read()


def wait_for(procs, pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(pred(p.text()) for p in procs):
            return
        for p in procs:
            if p.p.poll() not in (None, 0):
                break
        time.sleep(0.05)
    logs = "\n".join(f"--- {p.log}\n{p.text()[-3000:]}" for p in procs)
    raise AssertionError(f"timed out waiting for {what}:\n{logs}")


@pytest.mark.parametrize("hook", ["none", "powersgd"])
def test_join_running_job_then_kill(tmp_path, hook):
    # powersgd: callbacks' operations run on communicators of their own, which every view
    # change replaces
    port = free_port()
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                BRAID_ELASTIC="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    steps = ["--steps", "600", "--step-time", "0.01"] + (["--powersgd"] if hook != "none" else [])
    procs = []
    try:
        for r in range(2):
            procs.append(Proc(steps, dict(base, RANK=str(r)), str(tmp_path / f"rank{r}.log")))
        wait_for(procs[:1], lambda t: "step 50 " in t, 120, "the job to train")
        joiner = Proc(["--join"] + steps, dict(base), str(tmp_path / "joiner.log"))
        procs.append(joiner)
        wait_for(procs, lambda t: "size=3" in t and "params identical on 3 ranks" in t, 120,
                 "the joiner to be admitted")
        # all three train together for a while
        wait_for(procs[:1], lambda t: " size 3\n" in t, 120, "training on 3 ranks")
        # kill rank 1 (not rank 0: it hosts the coordinator)
        procs[1].p.send_signal(signal.SIGKILL)
        for p in (procs[0], procs[2]):
            p.p.wait(timeout=180)
        procs[1].p.wait(timeout=10)
    finally:
        for p in procs:
            if p.p.poll() is None:
                p.p.kill()
                p.p.wait()
    texts = [p.text() for p in procs]
    assert procs[1].p.returncode == -signal.SIGKILL
    for i in (0, 2):
        assert procs[i].p.returncode == 0, texts[i][-4000:]
        t = texts[i]
        assert "params identical on 3 ranks" in t, t[-3000:]
        # after the kill: a view of 2 with identical parameters, and training finished
        after = t[t.index("params identical on 3 ranks"):]
        assert "size=2" in after and "params identical on 2 ranks" in after, t[-3000:]
        assert "# done: step 600 on 2 ranks" in t, t[-3000:]
    # the joiner got the running step, not 0
    j = texts[2]
    first = j[j.index("size=3"):]
    assert "step=0" not in first.splitlines()[0], first.splitlines()[0]
