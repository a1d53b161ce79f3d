"""Scenarios run by the MXNet tests in real worker processes. The kvstore name comes from
TEST_KVSTORE; each scenario prints one line "RESULT <json>" and exits 0 when its own checks
passed (an AssertionError exits non-zero with the message)."""

import json
import os
import signal
import sys
import time

import braid.mxnet  # noqa: F401  (first: registers the kvstores, takes DMLC server roles)
import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

KV = os.environ.get("TEST_KVSTORE", "braid_dist_sync")
DTYPES = ["float16", "float32", "float64", "int32", "int64", "uint8"]


def result(**kw):
    print("RESULT " + json.dumps(kw), flush=True)


def nd(value, shape, dtype):
    return mx.nd.array(np.full(shape, value), dtype=dtype)


def check_eq(arr, value, what):
    a = arr.asnumpy()
    assert (a == np.asarray(value, dtype=a.dtype)).all(), f"{what}: got {a.ravel()[:8]}, want {value}"


def methods():
    """Every KVStoreBase method with exact sums: int and str keys, lists of values (summed
    locally first), every dtype, several shapes including one of 4M floats."""
    kv = mx.kv.create(KV)
    r, w = kv.rank, kv.num_workers
    assert kv.type == KV and "dist" in kv.type, kv.type
    assert 0 <= r < w and w == int(os.environ["BRAID_WORLD_SIZE"]), (r, w)
    assert kv.is_capable("optimizer") in (True, False)
    tri = w * (w + 1) // 2  # sum over workers of (rank + 1)
    shapes = [(3, 5), (7,), (2, 3, 4)]
    for i, dt in enumerate(DTYPES):
        shape = shapes[i % len(shapes)]
        key = i if i % 2 == 0 else f"param_{dt}"
        # broadcast: rank 0's value everywhere (and the key initialised to it)
        out = [mx.nd.zeros(shape, dtype=dt), mx.nd.zeros(shape, dtype=dt)]
        kv.broadcast(key, nd(r + 1, shape, dt), out=out)
        for o in out:
            check_eq(o, 1, f"broadcast {key} {dt}")
        # pushpull of one value into out
        o = mx.nd.zeros(shape, dtype=dt)
        kv.pushpull(key, nd(r + 1, shape, dt), out=o, priority=-i)
        check_eq(o, tri, f"pushpull {key} {dt}")
        # pushpull of a list (two devices' values summed locally), in place
        vals = [nd(r + 1, shape, dt), nd(1, shape, dt)]
        kv.pushpull(key, vals)
        for v in vals:
            check_eq(v, tri + w, f"pushpull list {key} {dt}")
        # push then pull
        kv.push(key, [nd(2, shape, dt), nd(r, shape, dt)], priority=i)
        o = mx.nd.zeros(shape, dtype=dt)
        kv.pull(key, out=o, priority=i)
        check_eq(o, 2 * w + (w - 1) * w // 2, f"push/pull {key} {dt}")
    # lists of keys with lists of values and outs
    keys = [100, "k101", 102]
    vals = [nd(r + 1, (4,), "float32"), nd(2 * (r + 1), (5, 2), "float32"),
            nd(3 * (r + 1), (1,), "float32")]
    outs = [mx.nd.zeros(v.shape) for v in vals]
    kv.broadcast(keys, vals, out=outs)
    for o, m in zip(outs, (1, 2, 3)):
        check_eq(o, m, "broadcast list")
    kv.pushpull(keys, vals, out=outs)
    for o, m in zip(outs, (1, 2, 3)):
        check_eq(o, m * tri, "pushpull list of keys")
    # one key of 4M floats
    big = 4 * 1024 * 1024
    kv.broadcast("big", mx.nd.zeros((big,)), out=mx.nd.zeros((big,)))
    v = mx.nd.array(np.arange(big, dtype=np.float32) % 1000 + r)
    o = mx.nd.zeros((big,))
    kv.pushpull("big", v, out=o)
    want = (np.arange(big, dtype=np.float64) % 1000) * w + (w - 1) * w // 2
    assert (o.asnumpy() == want.astype(np.float32)).all(), "pushpull of 4M floats"
    result(rank=r, workers=w)


def bad_shape():
    """A wrong shape and a wrong dtype for an initialised key fail on that worker only; every
    worker then goes on with correct calls."""
    kv = mx.kv.create(KV)
    r, w = kv.rank, kv.num_workers
    kv.broadcast(3, mx.nd.zeros((4, 4)), out=mx.nd.zeros((4, 4)))
    errors = []
    if r == 1:
        for bad in (mx.nd.ones((4, 5)), mx.nd.ones((4, 4), dtype="float64")):
            try:
                kv.pushpull(3, bad, out=mx.nd.zeros(bad.shape, dtype=bad.dtype))
            except mx.base.MXNetError as e:
                errors.append(str(e))
        assert len(errors) == 2, f"rank 1 expected two errors, got {errors}"
        assert all("3" in e for e in errors), errors
    if KV == "braid_dist_async":
        # an optimizer braid's servers cannot run: a clear error, nothing installed
        try:
            kv.set_optimizer(mx.optimizer.Adam())
            raise AssertionError("set_optimizer(Adam) was accepted")
        except mx.base.MXNetError as e:
            assert "Adam" in str(e), str(e)
    o = mx.nd.zeros((4, 4))
    for step in range(3):
        kv.pushpull(3, mx.nd.ones((4, 4)), out=o)
        check_eq(o, w, f"pushpull after the error, step {step}")
    result(rank=r, errors=errors)


def mlp():
    net = gluon.nn.Sequential()
    net.add(gluon.nn.Dense(16, activation="relu", in_units=8), gluon.nn.Dense(4, in_units=16))
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    return net


def data(workers, per_worker, steps):
    rng = np.random.RandomState(7)
    x = rng.randn(steps, workers * per_worker, 8).astype(np.float32)
    y = rng.randn(steps, workers * per_worker, 4).astype(np.float32)
    return x, y


def train(net, trainer, x, y, batch):
    loss_fn = gluon.loss.L2Loss()
    for s in range(x.shape[0]):
        with autograd.record():
            loss = loss_fn(net(mx.nd.array(x[s])), mx.nd.array(y[s]))
        loss.backward()
        trainer.step(batch)
    return {k: p.data().asnumpy().tolist() for k, p in
            sorted(net.collect_params().items(), key=lambda kv: kv[0])}


def trainer(steps, update_on_kvstore):
    """gluon Trainer on synthetic data sharded by rank; prints the parameters."""
    steps, per = int(steps), 6
    update_on_kvstore = update_on_kvstore == "1"
    kv = mx.kv.create(KV)
    r, w = kv.rank, kv.num_workers
    mx.random.seed(1)
    net = mlp()  # the same seed everywhere (the first step's broadcast comes after the
    # first backward, as with every gluon kvstore)
    opt = mx.optimizer.SGD(learning_rate=0.1, momentum=0.9, wd=1e-3)
    tr = gluon.Trainer(net.collect_params(), opt, kvstore=kv,
                       update_on_kvstore=update_on_kvstore)
    x, y = data(w, per, steps)
    params = train(net, tr, x[:, r * per:(r + 1) * per], y[:, r * per:(r + 1) * per], w * per)
    assert tr._update_on_kvstore == update_on_kvstore, tr._update_on_kvstore
    result(rank=r, params=params)


def reference(steps, workers):
    """The single-process reference on the global batch (no kvstore)."""
    steps, per, workers = int(steps), 6, int(workers)
    mx.random.seed(1)
    net = mlp()
    opt = mx.optimizer.SGD(learning_rate=0.1, momentum=0.9, wd=1e-3)
    tr = gluon.Trainer(net.collect_params(), opt, kvstore=None)
    x, y = data(workers, per, steps)
    result(params=train(net, tr, x, y, workers * per))


def states():
    """save_optimizer_states / load_optimizer_states of a momentum SGD run by the kvstore:
    after loading the states saved one step earlier, the same gradient moves the weights by
    exactly the step it moved them by then (the momentum went back); without the load it
    would not."""
    kv = mx.kv.create(KV)
    r = kv.rank
    kv.set_optimizer(mx.optimizer.SGD(learning_rate=0.5, momentum=0.9, rescale_grad=0.25))
    shape = (3, 4)
    weight = mx.nd.zeros(shape)
    kv.broadcast(0, mx.nd.array(np.arange(12, dtype=np.float32).reshape(shape)), out=weight)

    def grad(s):
        return mx.nd.array(np.full(shape, (r + 1) * (s + 1), dtype=np.float32))

    for s in range(3):
        kv.pushpull(0, grad(s), out=weight)
    fname = os.path.join(os.getcwd(), f"states-{r}")
    kv.save_optimizer_states(fname, dump_optimizer=True)
    before = weight.asnumpy()
    kv.pushpull(0, grad(3), out=weight)
    first = weight.asnumpy() - before
    kv.pushpull(0, grad(3), out=weight)
    unloaded = weight.asnumpy()
    kv.pushpull(0, grad(3), out=weight)
    no_load = weight.asnumpy() - unloaded
    kv.load_optimizer_states(fname)
    before = weight.asnumpy()
    kv.pushpull(0, grad(3), out=weight)
    again = weight.asnumpy() - before
    assert np.allclose(first, again, rtol=1e-5, atol=1e-5), f"{again.ravel()[:4]} vs {first.ravel()[:4]}"
    assert not np.allclose(no_load, first, rtol=1e-3), "the momentum did not change the step"
    assert isinstance(kv._updater.optimizer, mx.optimizer.SGD)
    result(rank=r)


def kill_worker(victim):
    """Worker `victim` is killed (SIGKILL) after two steps; the others must get an MXNetError
    naming it at their next collective, never hang."""
    victim = int(victim)
    kv = mx.kv.create(KV)
    r = kv.rank
    o = mx.nd.zeros((1000,))
    kv.broadcast(0, mx.nd.zeros((1000,)), out=o)
    kv.pushpull(0, mx.nd.ones((1000,)), out=o)
    t0 = time.monotonic()
    try:
        # the victim may finish its 2nd pushpull while a slower rank is still receiving
        # that one's data: the survivors' error may come from their 2nd call already
        for step in range(50):
            kv.pushpull(0, mx.nd.ones((1000,)), out=o)
            if r == victim and step == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.05)
    except mx.base.MXNetError as e:
        result(rank=r, error=str(e), after_s=time.monotonic() - t0)
        return
    raise AssertionError("no error after the victim died")


def accumulate(steps, marker):
    """Async Sum rule: every worker pushes +1 to three keys per step (one of 1M floats); with a
    dedicated server killed in the middle (replicas 1) nothing acknowledged may be lost: the
    keys end at exactly workers x steps."""
    steps = int(steps)
    kv = mx.kv.create(KV)
    r, w = kv.rank, kv.num_workers
    shapes = {"a": (10,), "b": (1024 * 1024,), 7: (3, 3)}
    for k, s in shapes.items():
        kv.broadcast(k, mx.nd.zeros(s), out=mx.nd.zeros(s))
    for step in range(steps):
        for k, s in shapes.items():
            kv.push(k, mx.nd.ones(s))
        if step == 3 and r == 0:
            open(marker, "w").close()  # the harness kills a server now
        o = mx.nd.zeros(shapes["a"])
        kv.pull("a", out=o)  # waits for this worker's pushes of the key
        time.sleep(0.1)
    want = float(w * steps)
    deadline = time.monotonic() + 60
    got = {}
    while time.monotonic() < deadline:
        for k, s in shapes.items():
            o = mx.nd.zeros(s)
            kv.pull(k, out=o)
            a = o.asnumpy()
            got[str(k)] = (float(a.min()), float(a.max()))
        if all(v == (want, want) for v in got.values()):
            break
        assert all(v[1] <= want for v in got.values()), f"more than pushed: {got}"
        time.sleep(0.2)
    assert all(v == (want, want) for v in got.values()), f"want {want} everywhere, got {got}"
    result(rank=r, got=got)


def priority():
    """A small high-priority push issued after a large low-priority one completes first: when
    the small push has been acknowledged (applied and replicated), the large one is not."""
    kv = mx.kv.create(KV)
    r = kv.rank
    big, small = 32 * 1024 * 1024, 16  # 128 MiB of float32, in parts of the partition size
    kv.broadcast("big", mx.nd.zeros((big,)), out=mx.nd.zeros((big,)))
    kv.broadcast("small", mx.nd.zeros((small,)), out=mx.nd.zeros((small,)))
    order, times = [], []
    for trial in range(3):
        g_big, g_small = mx.nd.ones((big,)), mx.nd.ones((small,))
        g_big.wait_to_read()
        g_small.wait_to_read()
        t0 = time.perf_counter()
        kv.push("big", g_big, priority=-100)
        t1 = time.perf_counter()
        kv.push("small", g_small, priority=100)
        kv._wait("small")
        t2 = time.perf_counter()
        order.append(kv._done("big"))
        kv._wait("big")
        t3 = time.perf_counter()
        times.append({"big_push_copy_ms": 1e3 * (t1 - t0), "small_ms": 1e3 * (t2 - t1),
                      "big_ms": 1e3 * (t3 - t1)})
    o = mx.nd.zeros((small,))
    kv.pull("small", out=o)
    assert not any(order), f"the large low-priority push completed first: {order} {times}"
    result(rank=r, big_done_when_small_done=order, times=times)


def quick():
    """One broadcast and one pushpull with exact sums (the launch tests)."""
    kv = mx.kv.create(KV)
    r, w = kv.rank, kv.num_workers
    o = mx.nd.zeros((5,))
    kv.broadcast("q", mx.nd.ones((5,)) * (r + 1), out=o)
    check_eq(o, 1, "broadcast")
    kv.pushpull("q", mx.nd.ones((5,)) * (r + 1), out=o)
    check_eq(o, w * (w + 1) // 2, "pushpull")
    result(rank=r, workers=w)


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
