"""The elastic pipeline (braid.torch.pipeline.ElasticPipeline) through its example,
integrations/python/examples/elastic_pipeline.py, on real processes: a member joins the
running pipeline, a stage is killed (kill -9) and restored from a checkpoint, a slowed stage
loses blocks, stages replicated on 2 members, and a forged p2p header is refused.

The jobs run under braid-run (4 ranks) or as processes started here with braid-run's
environment (BRAID_COORDINATOR/BRAID_RANK/BRAID_WORLD_SIZE/BRAID_ELASTIC) where the test must
act at an exact point of the job (kill a member after a checkpoint exists); the coordinator is
a braid-coordinator started by the test when a joiner or a kill needs it to outlive the job.
The binaries come from BRAID_BIN_DIR, else the newer of target/release and target/debug (`make
test` builds target/debug before the Python tests), else they are built (cargo, debug).
Every process has a deadline: a hang fails the test, and every process is killed at the end.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import HERE, REPO

pytest.importorskip("torch")

EXAMPLE = os.path.join(REPO, "integrations", "python", "examples", "elastic_pipeline.py")
GATE = os.path.join(HERE, "pipeline_gate.py")
PY = sys.executable
# A small model: 10 blocks of width 16, a batch of 8 in 2 micro-batches.
SMALL = ["--blocks", "10", "--micro-batches", "2", "--batch", "8", "--width", "16"]
# No simulated compute (the example's --block-time sleeps in every block's forward).
NO_SLEEP = ["--block-time", "0"]

if not os.path.exists(EXAMPLE):
    pytest.skip(f"{EXAMPLE} is missing", allow_module_level=True)


def binary(name):
    """Path of braid's binary `name` (see the module docstring)."""
    d = os.environ.get("BRAID_BIN_DIR")
    if d:
        return os.path.join(d, name)
    found = [os.path.join(REPO, "target", p, name) for p in ("release", "debug")]
    found = [p for p in found if os.path.exists(p)]
    if not found:
        subprocess.run(["cargo", "build", "-p", "braid", "--bin", name], cwd=REPO, check=True,
                       timeout=1800)
        found = [os.path.join(REPO, "target", "debug", name)]
    return max(found, key=os.path.getmtime)


def base_env(**kw):
    e = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", OMP_NUM_THREADS="1",
             BRAID_PIPELINE_REPLAN_GAIN="1")
    for k in ("BRAID_COORDINATOR", "BRAID_RANK", "BRAID_WORLD_SIZE", "BRAID_ELASTIC",
              "BRAID_JOB_TOKEN", "BRAID_PIPELINE_SLOWDOWN", "MASTER_ADDR", "MASTER_PORT",
              "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(k, None)
    e.update({k: str(v) for k, v in kw.items()})
    return e


class Proc:
    """A process in its own session with its output (stdout + stderr) in a log file."""

    def __init__(self, cmd, env, log):
        self.log = str(log)
        with open(self.log, "w") as f:
            self.p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)

    def text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def rc(self):
        return self.p.poll()

    def stop(self):
        """SIGTERM (braid-run passes it on to its ranks), SIGKILL 5 s later; braid-run's ranks
        get SIGTERM when braid-run dies (PR_SET_PDEATHSIG)."""
        if self.p.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def logs(procs):
    return "\n".join(f"--- {p.log} (exit {p.rc()})\n{p.text()[-4000:]}" for p in procs)


def wait_for(procs, pred, timeout, what, watch=None):
    """Waits until pred() is true; fails when the deadline passes or a process of `watch`
    (default: procs) has exited before."""
    watch = procs if watch is None else watch
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return
        dead = [p for p in watch if p.rc() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{dead[0].log} exited {dead[0].rc()}" if dead else f"{timeout} s passed"
            raise AssertionError(f"waiting for {what}: {why}\n{logs(procs)}")
        time.sleep(0.02)


def finish(procs, timeout):
    """Waits for every process (one deadline for all); returns their exit codes."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{p.log} still running after {timeout} s\n{logs(procs)}")
    return [p.rc() for p in procs]


@pytest.fixture
def procs():
    """Processes a test starts (append); all stopped at the end, whatever happened."""
    started = []
    yield started
    for p in reversed(started):
        p.stop()


class Coordinator:
    """A braid-coordinator on 127.0.0.1 with a fresh job token."""

    def __init__(self, tmp_path, started):
        self.token = os.urandom(32).hex()
        self.proc = Proc([binary("braid-coordinator"), "--bind", "127.0.0.1:0"],
                         base_env(BRAID_JOB_TOKEN=self.token, BRAID_LOG="info"),
                         tmp_path / "coordinator.log")
        started.append(self.proc)
        found = []

        def listening():
            m = re.search(r"listening on (\S+)", self.proc.text())
            if m:
                found.append(m.group(1))
            return bool(found)
        wait_for([self.proc], listening, 30, "braid-coordinator to listen")
        self.addr = found[0]

    def env(self, **kw):
        return base_env(BRAID_COORDINATOR=self.addr, BRAID_JOB_TOKEN=self.token,
                        BRAID_ELASTIC=1, **kw)

    def status(self):
        r = subprocess.run([binary("braid-coordinator"), "status", self.addr, "--json"],
                           env=base_env(BRAID_JOB_TOKEN=self.token), capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout)


def lines_of(text, idx=None):
    """Lines of a log; with idx, only braid-run's lines of launcher index idx (unprefixed)."""
    if idx is None:
        return text.splitlines()
    pre = f"[{idx}] "
    return [ln[len(pre):] for ln in text.splitlines() if ln.startswith(pre)]


def plans(lines):
    """[(epoch, [(first, last), ...])] from `# plan epoch=E: 1-3|4-6|7-9|10` lines."""
    out = []
    for ln in lines:
        m = re.match(r"^# plan epoch=(\d+): (.*)$", ln.strip())
        if not m:
            continue
        stages = []
        for s in m.group(2).split("|"):
            a, _, b = s.strip().partition("-")
            stages.append((int(a), int(b or a)))
        out.append((int(m.group(1)), stages))
    return out


def steps(lines):
    return [int(m.group(1)) for ln in lines if (m := re.match(r"^step=(\d+)\b", ln))]


def covers(stages, n_blocks=10):
    """Stages are contiguous, in order, and cover blocks 1..n_blocks."""
    want = 1
    for a, b in stages:
        if a != want or b < a:
            return False
        want = b + 1
    return want == n_blocks + 1


# --- 1. a 5th member joins the running 4-stage pipeline -------------------------------------

def test_join_replans_from_4_to_5_stages(tmp_path, procs):
    c = Coordinator(tmp_path, procs)
    n = 60
    args = [*SMALL, *NO_SLEEP, "--steps", str(n), "--step-time", "0.05"]
    job = Proc([binary("braid-run"), "-n", "4", "--coordinator", c.addr, "--", PY, EXAMPLE,
                *args], c.env(), tmp_path / "job.log")
    procs.append(job)
    gate = tmp_path / "gate"
    # started now, released after step 3 (its Python start must not decide when it joins)
    joiner = Proc([PY, GATE, str(gate), "150", EXAMPLE, *args, "--join"],
                  c.env(BRAID_WORLD_SIZE=4), tmp_path / "joiner.log")
    procs.append(joiner)
    wait_for([job, joiner], lambda: 3 in steps(lines_of(job.text(), 0)), 120,
             "step 3 on 4 stages")
    gate.touch()
    codes = finish([job, joiner], 150)
    assert codes == [0, 0], logs([job, joiner])
    t = job.text()
    r0 = lines_of(t, 0)
    ps = plans(r0)
    assert ps and len(ps[0][1]) == 4 and covers(ps[0][1]), r0
    five = [i for i, (_, s) in enumerate(ps) if len(s) == 5]
    assert five and covers(ps[five[0]][1]), r0
    # the 4-stage plan trained before the joiner came, and the 5-stage plan trained after
    e5 = ps[five[0]][0]
    assert 3 in steps(r0[:r0.index(next(ln for ln in r0 if ln.startswith(f"# plan epoch={e5}:")))])
    assert steps(r0)[-1] == n, r0[-20:]
    # no process restarted: the 4 ranks ran once each, the joiner is the only other process
    for i in range(4):
        assert lines_of(t, i).count("reference match: yes") == 1, lines_of(t, i)[-20:]
    assert not lines_of(t, 4), "braid-run started a 5th process"
    assert "reference match: yes" in joiner.text(), joiner.text()[-3000:]


# --- 2. a stage killed (kill -9), restored from the last checkpoint -------------------------

def test_killed_stage_restored_from_checkpoint(tmp_path, procs):
    c = Coordinator(tmp_path, procs)
    n, every, victim = 40, 4, 2
    ck = tmp_path / "ckpt"
    # simulated compute inside the step (10 ms per block and micro-batch) and no pause between
    # steps: the kill lands in the middle of a step
    args = [*SMALL, "--block-time", "0.01", "--steps", str(n), "--checkpoint-every", str(every),
            "--checkpoint-dir", str(ck)]
    members = []
    for i in range(4):
        members.append(Proc([PY, EXAMPLE, *args], c.env(BRAID_RANK=i, BRAID_WORLD_SIZE=4),
                            tmp_path / f"m{i}.log"))
        procs.append(members[-1])
    # after a checkpoint exists and training went past it
    wait_for(members, lambda: (ck / "latest").exists() and
             any(s > every for s in steps(lines_of(members[0].text()))), 120,
             f"a checkpoint and step {every + 1}")
    ids = [m["id"] for m in _members(c.status()) if m.get("pid") == members[victim].p.pid]
    assert len(ids) == 1, c.status()
    members[victim].p.send_signal(signal.SIGKILL)
    survivors = [m for i, m in enumerate(members) if i != victim]
    codes = finish(survivors, 150)
    members[victim].p.wait(timeout=10)
    assert codes == [0, 0, 0], logs(members)
    assert members[victim].rc() == -signal.SIGKILL
    for m in survivors:
        # the failed step names the dead member, every survivor re-plans to 3 stages,
        # restores the checkpoint and finishes
        lines = lines_of(m.text())
        failed = [ln for ln in lines if re.match(r"^# step \d+ failed: ", ln)]
        assert failed and f"member {ids[0]}" in failed[0], (ids, lines)
        after = lines[lines.index(failed[0]):]
        assert any(len(s) == 3 and covers(s) for _, s in plans(after)), after
        assert any(re.match(r"^# restored step \d+ from ", ln) for ln in after), after
        assert "reference match: yes" in lines, lines[-20:]
    assert steps(lines_of(members[0].text()))[-1] == n, members[0].text()[-2000:]


def _members(status):
    """Members of the current view in `braid-coordinator status --json` (any group)."""
    out = []

    def walk(x):
        if isinstance(x, dict):
            if "id" in x and "pid" in x:
                out.append(x)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(status)
    return out


# --- 3. a slowed stage loses blocks (throughput-aware re-plan) -------------------------------

def test_slowed_stage_loses_blocks(tmp_path, procs):
    c = Coordinator(tmp_path, procs)
    slow = 1
    # rank `slow` sleeps 3x its compute time more (BRAID_PIPELINE_SLOWDOWN=4); wider blocks so
    # that the compute is measurable
    wrap = (f'if [ "$BRAID_RUN_INDEX" = {slow} ]; then export BRAID_PIPELINE_SLOWDOWN=4; fi; '
            'exec "$@"')
    args = ["--blocks", "10", "--micro-batches", "2", "--batch", "32", "--width", "256",
            *NO_SLEEP, "--steps", "30", "--step-time", "0"]
    job = Proc([binary("braid-run"), "-n", "4", "--coordinator", c.addr, "--", "sh", "-c", wrap,
                "sh", PY, EXAMPLE, *args],
               c.env(BRAID_PIPELINE_REPLAN_GAIN="0.1"), tmp_path / "job.log")
    procs.append(job)
    codes = finish([job], 150)
    assert codes == [0], logs([job])
    r0 = lines_of(job.text(), 0)
    ps = plans(r0)
    assert ps and len(ps[0][1]) == 4, r0
    first = ps[0][1]
    size = lambda s: s[1] - s[0] + 1  # noqa: E731
    later = [s for _, s in ps[1:] if len(s) == 4 and size(s[slow]) < size(first[slow])]
    assert later, f"no plan gave stage {slow} fewer than {size(first[slow])} blocks: {ps}"
    # the coordinator logged the view change and its reason
    assert "reweigh" in c.proc.text(), c.proc.text()[-3000:]
    for i in range(4):
        assert "reference match: yes" in lines_of(job.text(), i), lines_of(job.text(), i)[-20:]


# --- 4. replication: 2 stages x 2 members ------------------------------------------------------

def test_replicated_stages_match_reference(tmp_path, procs):
    job = Proc([binary("braid-run"), "-n", "4", "--", PY, EXAMPLE, *SMALL, *NO_SLEEP, "--steps",
                "20", "--step-time", "0", "--replicas", "2"], base_env(), tmp_path / "job.log")
    procs.append(job)
    codes = finish([job], 120)
    assert codes == [0], logs([job])
    t = job.text()
    ps = plans(lines_of(t, 0))
    assert ps and all(len(s) == 2 and covers(s) for _, s in ps), ps
    assert steps(lines_of(t, 0))[-1] == 20
    for i in range(4):
        assert "reference match: yes" in lines_of(t, i), lines_of(t, i)[-20:]


# --- 5. a forged p2p header is refused ---------------------------------------------------------

def test_forged_header_is_refused(tmp_path, procs):
    job = Proc([binary("braid-run"), "-n", "2", "--", PY, os.path.join(HERE, "pipeline_worker.py"),
                "forged_header"], base_env(), tmp_path / "job.log")
    procs.append(job)
    codes = finish([job], 60)
    t = job.text()
    assert codes == [0], t[-4000:]
    for i in range(2):
        assert "OK forged_header" in lines_of(t, i), t[-4000:]
    # every forged message was refused by name; crossed micro-batches matched by tag
    assert t.count("refused:") == 5, t[-4000:]
    assert "matched by tag: micro-batch 2, then 3" in t, t[-4000:]
