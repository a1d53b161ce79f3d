"""One worker process of perf/mxnet_compare (run under the MXNet venv's python).

    mxnet_bench_worker.py --kvstore NAME --bench trainer|pushpull [--steps N] [--warmup K]
                          [--update-on-kvstore default|true|false] [--elems N]

The kvstore comes from the launch environment: MXNet's "dist_sync" from DMLC_* (ps-lite),
braid's "braid_dist_sync"/"braid_dist_async" from BRAID_* or DMLC_* (``import braid.mxnet``
registers them; it is imported BEFORE mxnet, as braid's DMLC mode requires).

trainer:  MLP 1024-2048-2048-10 (6.3 M float32 parameters), batch 32 of synthetic data per
          worker, SGD lr 0.01 momentum 0.9. Each timed step is one full iteration:
          forward + backward + trainer.step(32) + mx.nd.waitall() (MXNet's engine is
          asynchronous: only waitall makes the time the step's real time; communication that
          MXNet overlaps with backward counts once). Before the trainer loop, --compute
          iterations of forward + backward + waitall alone (no communication) give the
          compute time of one step on the same loaded machine.
pushpull: kv.init(key, zeros(elems)); each timed iteration kv.pushpull(key, value, out) then
          out.wait_to_read(). The value is reset to rank+1 OUTSIDE the timed region every
          iteration (MXNet's dist_sync pushpull writes the reduced value back into `value`).
          The first pushpull is checked: out == sum over ranks of (rank+1).

Prints one line "RESULT <json>" with rank, num_workers, per-step seconds and checks.
"""
import argparse
import json
import os
import sys
import time


def percentile(xs, q):
    s = sorted(xs)
    if not s:
        return None
    i = min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))
    return s[i]


def make_kv(mx, name):
    return mx.kv.create(name)


class Prof:
    """--profile: wall time spent inside wrapped calls (braid's kvstore calls block until
    done, so their time is the communication's; MXNet's return after enqueueing)."""

    def __init__(self):
        self.acc = {}
        self.on = False

    def wrap(self, obj, name, label):
        fn = getattr(obj, name)

        def wrapped(*args, **kw):
            if not self.on:
                return fn(*args, **kw)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                c = self.acc.setdefault(label, [0, 0.0])
                c[0] += 1
                c[1] += time.perf_counter() - t0

        setattr(obj, name, wrapped)

    def report(self, steps):
        return {k: {"calls_per_step": v[0] / steps, "ms_per_step": v[1] * 1e3 / steps}
                for k, v in sorted(self.acc.items())}


PROF = Prof()


def wrap_braid_internals():
    """--profile with braid's kvstores: also time braid.mxnet's private helpers (waiting for
    MXNet's engine to finish an NDArray; the C all-reduce; the push/pull calls), when they
    exist under these names (private: a renamed one is just not timed)."""
    mod = sys.modules.get("braid.mxnet._kvstore")
    if mod is None:
        return
    for name in ("_ptr_read", "_ptr_write", "_local_sum", "_copy_out"):
        if callable(getattr(mod, name, None)):
            PROF.wrap(mod, name, "braid." + name)
    for cls, meths in (("_SyncBackend", ("all_reduce", "broadcast")),):
        c = getattr(mod, cls, None)
        for m in meths:
            if c is not None and callable(getattr(c, m, None)):
                PROF.wrap(c, m, f"braid.{cls}.{m}")


def bench_pushpull(mx, kv, a, res):
    n = a.elems
    key = 7
    rank, w = kv.rank, kv.num_workers
    kv.init(key, mx.nd.zeros((n,), dtype="float32"))
    val = mx.nd.zeros((n,), dtype="float32")
    out = mx.nd.zeros((n,), dtype="float32")

    def reset():
        val[:] = rank + 1
        val.wait_to_read()

    reset()
    kv.pushpull(key, val, out=out)
    out.wait_to_read()
    want = w * (w + 1) / 2
    got = out.asnumpy()
    res["check"] = bool((got == want).all())
    res["check_detail"] = f"out[0]={float(got[0])} out[-1]={float(got[-1])} want {want}"
    times = []
    if a.profile:
        PROF.wrap(kv, "pushpull", "kv.pushpull")
        wrap_braid_internals()
    for i in range(a.warmup + a.steps):
        reset()
        PROF.on = a.profile and i >= a.warmup
        t0 = time.perf_counter()
        kv.pushpull(key, val, out=out)
        out.wait_to_read()
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(dt)
    PROF.on = False
    res["times"] = times
    res["bytes"] = n * 4
    if a.profile:
        res["profile"] = PROF.report(max(1, a.steps))


def bench_trainer(mx, kv, a, res):
    from mxnet import autograd, gluon

    mx.random.seed(42)
    net = gluon.nn.HybridSequential()
    with net.name_scope():
        net.add(gluon.nn.Dense(2048, activation="relu", in_units=1024))
        net.add(gluon.nn.Dense(2048, activation="relu", in_units=2048))
        net.add(gluon.nn.Dense(10, in_units=2048))
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    if a.hybridize:
        net.hybridize(static_alloc=True, static_shape=True)
    nparams = sum(p.data().size for p in net.collect_params().values())
    res["params"] = int(nparams)
    uokv = {"default": None, "true": True, "false": False}[a.update_on_kvstore]
    trainer = gluon.Trainer(net.collect_params(), "sgd",
                            {"learning_rate": 0.01, "momentum": 0.9},
                            kvstore=kv, update_on_kvstore=uokv)
    if a.profile:
        for m in ("pushpull", "push", "pull", "broadcast", "init"):
            if hasattr(kv, m):
                PROF.wrap(kv, m, "kv." + m)
        for m in ("_allreduce_grads", "_update"):
            PROF.wrap(trainer, m, "trainer." + m)
        wrap_braid_internals()
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    mx.random.seed(1000 + kv.rank)  # each worker its own shard of synthetic data
    bs = 32
    x = mx.nd.random.normal(shape=(bs, 1024))
    y = mx.nd.random.randint(0, 10, shape=(bs,)).astype("float32")
    mx.nd.waitall()

    comp = []
    for i in range(a.compute):
        t0 = time.perf_counter()
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        mx.nd.waitall()
        comp.append(time.perf_counter() - t0)
    res["compute_times"] = comp[min(2, len(comp)):]

    times = []
    phases = {"fwd_bwd": 0.0, "step": 0.0, "waitall": 0.0}
    for i in range(a.warmup + a.steps):
        PROF.on = a.profile and i >= a.warmup
        t0 = time.perf_counter()
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        t1 = time.perf_counter()
        trainer.step(bs)
        t2 = time.perf_counter()
        mx.nd.waitall()
        t3 = time.perf_counter()
        dt = t3 - t0
        if i >= a.warmup:
            times.append(dt)
            phases["fwd_bwd"] += t1 - t0
            phases["step"] += t2 - t1
            phases["waitall"] += t3 - t2
    PROF.on = False
    res["times"] = times
    if a.profile:
        # fwd_bwd: enqueue time of forward+backward (MXNet runs them asynchronously: their
        # compute shows in whichever later call waits); step: trainer.step's wall time
        res["profile"] = {k: v * 1e3 / max(1, a.steps) for k, v in phases.items()}
        res["profile"].update(PROF.report(max(1, a.steps)))
    res["update_on_kvstore"] = trainer._update_on_kvstore
    # identical parameters on every worker (synchronous training): the harness compares these
    w0 = list(net.collect_params().values())[0].data()
    res["param_sum"] = float(w0.sum().asscalar())
    res["param_abs"] = float(w0.abs().sum().asscalar())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvstore", required=True)
    ap.add_argument("--bench", choices=("trainer", "pushpull"), required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compute", type=int, default=10)
    ap.add_argument("--elems", type=int, default=4 * 1024 * 1024)
    ap.add_argument("--update-on-kvstore", choices=("default", "true", "false"),
                    default="default")
    ap.add_argument("--hybridize", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="time spent per step in the kvstore's and the trainer's calls")
    a = ap.parse_args()

    t_start = time.perf_counter()
    if a.kvstore.startswith("braid"):
        import braid.mxnet  # noqa: F401  (before mxnet: braid's DMLC roles run at import)
    import mxnet as mx

    kv = make_kv(mx, a.kvstore)
    res = {"rank": kv.rank, "num_workers": kv.num_workers, "kvstore": kv.type,
           "bench": a.bench, "setup_s": time.perf_counter() - t_start}
    if a.bench == "pushpull":
        bench_pushpull(mx, kv, a, res)
    else:
        bench_trainer(mx, kv, a, res)
    ts = res["times"]
    res["median"] = percentile(ts, 0.5)
    res["p90"] = percentile(ts, 0.9)
    if res.get("compute_times"):
        res["compute_median"] = percentile(res["compute_times"], 0.5)
    print("RESULT " + json.dumps(res), flush=True)
    close = getattr(kv, "close", None)
    if callable(close):
        close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
