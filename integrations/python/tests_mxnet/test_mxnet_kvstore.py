"""braid's MXNet kvstores (braid_dist_sync: all-reduce; braid_dist_async: push/pull servers)
across real worker processes: every KVStoreBase method with exact sums, gluon's Trainer
against a single-process reference, optimizer states, kill -9 of a worker and of a server,
priorities, and the three launch conventions (braid coordinator, torchrun, DMLC)."""

import os
import signal
import sys
import time

import numpy as np
import pytest

from conftest import WORKER, Job, base_env, check_ok, free_port, results, run, start

SYNC, ASYNC = "braid_dist_sync", "braid_dist_async"
PS_SYNC = {"BRAID_PS_MODE": "sync"}


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("kvstore,env,servers", [
    (SYNC, {}, 0),
    (ASYNC, PS_SYNC, 0),
    (ASYNC, PS_SYNC, 2),
], ids=["sync", "async-inproc", "async-dedicated"])
def test_every_method_exact(tmp_path, workers, kvstore, env, servers):
    res = run("methods", workers, tmp_path, kvstore=kvstore, env=env, servers=servers,
              timeout=240)
    assert sorted(r["rank"] for r in res.values() if "rank" in r) == list(range(workers))


@pytest.mark.parametrize("kvstore,env", [(SYNC, {}), (ASYNC, PS_SYNC)], ids=["sync", "async"])
def test_wrong_shape_or_dtype_fails_on_that_worker_only(tmp_path, kvstore, env):
    res = run("bad_shape", 2, tmp_path, kvstore=kvstore, env=env)
    errs = [r["errors"] for r in res.values() if r["errors"]]
    assert len(errs) == 1 and len(errs[0]) == 2, res


def reference(tmp_path, steps, workers):
    job = Job(tmp_path)
    job.spawn("reference", [sys.executable, WORKER, "reference", str(steps), str(workers)],
              base_env())
    out = job.wait(120)
    check_ok(out)
    return results(out)["reference"]["params"]


@pytest.mark.parametrize("kvstore,update_on_kvstore,workers,env", [
    (SYNC, 0, 2, {}),
    (SYNC, 0, 3, {}),
    (ASYNC, 1, 2, PS_SYNC),
    (ASYNC, 1, 3, PS_SYNC),
], ids=["sync-w2", "sync-w3", "async-w2", "async-w3"])
def test_trainer_matches_single_process_reference(tmp_path, kvstore, update_on_kvstore,
                                                  workers, env):
    steps = 6
    res = run("trainer", workers, tmp_path, kvstore=kvstore, env=env,
              args=(steps, update_on_kvstore), timeout=240)
    ref = reference(tmp_path, steps, workers)
    params = [r["params"] for r in res.values()]
    assert len(params) == workers
    for name, want in ref.items():
        want = np.asarray(want)
        for w, p in enumerate(params):
            got = np.asarray(p[name])
            # identical on every worker
            assert np.array_equal(got, np.asarray(params[0][name])), f"{name}: worker {w} differs"
            # the global-batch reference within 1e-5 relative
            err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12)
            assert err <= 1e-5, f"{name}: relative error {err}"
        # and the weights did move
    first = np.asarray(next(iter(ref.values())))
    assert np.any(first != 0)


@pytest.mark.parametrize("kvstore,env", [(SYNC, {}), (ASYNC, PS_SYNC)], ids=["sync", "async"])
def test_optimizer_states_save_and_load(tmp_path, kvstore, env):
    run("states", 2, tmp_path, kvstore=kvstore, env=env)


def test_killed_worker_is_an_mxnet_error_naming_it(tmp_path):
    """The worker of rank 2 (ranks are given by arrival) kills itself with SIGKILL after two
    steps; the two others get an MXNetError naming rank 2 at their next pushpull."""
    job = start("kill_worker", 3, tmp_path, kvstore=SYNC, args=(2,),
                env={"BRAID_TIMEOUT": "30"})
    out = job.wait(120)
    killed = [n for n, (code, _) in out.items() if code == -signal.SIGKILL]
    assert len(killed) == 1, {n: c for n, (c, _) in out.items()}
    survivors = {n for n in out if n not in killed}
    check_ok(out, names=survivors)
    res = results(out)
    for name in survivors:
        err = res[name]["error"]
        assert "rank 2" in err and "peer lost" in err, err
        assert res[name]["after_s"] < 25, res[name]


def test_killed_server_with_replicas_loses_nothing(tmp_path):
    marker = os.path.join(str(tmp_path), "kill-now")
    job = start("accumulate", 2, tmp_path, kvstore=ASYNC, servers=3, args=(30, marker),
                env={"BRAID_PS_MODE": "async", "BRAID_PS_REPLICAS": "1",
                     "BRAID_PS_PARTITION_BYTES": "262144"})
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(marker):
            assert time.monotonic() < deadline, "the workers never reached step 3"
            time.sleep(0.05)
        job.kill("server1")
    except BaseException:
        job.close()
        raise
    out = job.wait(180)
    assert out["server1"][0] == -signal.SIGKILL
    check_ok(out, names={"worker0", "worker1", "server0", "server2"})


def test_priority_small_high_priority_push_overtakes_a_large_one(tmp_path):
    """One dedicated server, no replicas: the small push's acknowledgement must arrive while
    the large one (128 MiB, queued first) is still being sent."""
    res = run("priority", 2, tmp_path, kvstore=ASYNC, servers=1,
              env={"BRAID_PS_MODE": "async", "BRAID_PS_REPLICAS": "0"})
    for r in res.values():
        assert not any(r["big_done_when_small_done"]), r


@pytest.mark.parametrize("kvstore", [SYNC, ASYNC])
def test_torchrun_environment(tmp_path, kvstore):
    port = free_port()
    job = Job(tmp_path)
    for r in range(2):
        job.spawn(f"worker{r}", [sys.executable, WORKER, "quick"], base_env({
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r),
            "WORLD_SIZE": "2", "TEST_KVSTORE": kvstore, "BRAID_PS_MODE": "sync"}))
    out = job.wait(120)
    check_ok(out)
    assert sorted(r["rank"] for r in results(out).values()) == [0, 1]


@pytest.mark.parametrize("kvstore", [SYNC, ASYNC])
def test_dmlc_launch_like_mxnet_launch_py(tmp_path, kvstore):
    """A scheduler, 2 servers and 2 workers, every process running the same script with
    MXNet's DMLC_* variables (as tools/launch.py --launcher local starts them): the job ends
    with every process exiting 0."""
    port = free_port()
    common = {"DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": str(port),
              "DMLC_NUM_WORKER": "2", "DMLC_NUM_SERVER": "2", "TEST_KVSTORE": kvstore,
              "BRAID_PS_MODE": "sync"}
    job = Job(tmp_path)
    roles = [("scheduler", "scheduler"), ("server0", "server"), ("server1", "server"),
             ("worker0", "worker"), ("worker1", "worker")]
    for name, role in roles:
        job.spawn(name, [sys.executable, WORKER, "quick"],
                  base_env(dict(common, DMLC_ROLE=role)))
    out = job.wait(180)
    check_ok(out)
    res = results(out)
    assert sorted(res[w]["rank"] for w in ("worker0", "worker1")) == [0, 1]


def _braid_run():
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    for profile in ("release", "debug"):
        p = os.path.join(repo, "target", profile, "braid-run")
        if os.path.exists(p):
            return p
    pytest.fail("braid-run is not built (cargo build --workspace --bins)")


@pytest.mark.parametrize("kvstore", [SYNC, ASYNC])
def test_braid_run_launch(tmp_path, kvstore):
    """braid-run -n 3 starts the workers (its coordinator, BRAID_* variables)."""
    job = Job(tmp_path)
    job.spawn("braid-run", [_braid_run(), "-n", "3", "--", sys.executable, WORKER, "quick"],
              base_env({"TEST_KVSTORE": kvstore, "BRAID_PS_MODE": "sync"}))
    out = job.wait(120)
    check_ok(out)
    ranks = sorted(int(line.split('"rank": ')[1].split(",")[0])
                   for line in out["braid-run"][1].splitlines() if "RESULT" in line)
    assert ranks == [0, 1, 2], out["braid-run"][1][-3000:]
