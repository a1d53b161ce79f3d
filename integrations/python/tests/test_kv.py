"""braid.kv from Python: 2 servers and 2 workers of one group as threads of this process (every
blocking braid call releases the GIL), in sync mode, with exact expected values."""

import os
import threading

import numpy as np
import pytest

import braid
import braid.kv as kv

WORKERS, SERVERS = 2, 2
BIG = 400_000  # float32: 1.6 MB, split into parts over both servers (lent, not copied)


def _group(monkeypatch, body):
    """Runs body(w, worker) on WORKERS worker threads next to SERVERS server threads; raises the
    first failure. Every thread has a deadline: a hang fails the test."""
    monkeypatch.setenv("BRAID_PS_MODE", "sync")
    monkeypatch.setenv("BRAID_PS_PARTITION_BYTES", str(1 << 20))
    monkeypatch.setenv("BRAID_GROUP", "kv-py")
    monkeypatch.setenv("BRAID_TIMEOUT", "60")
    token = os.urandom(16).hex()
    coord = braid.Coordinator("127.0.0.1:0", job_token=token)
    addr = f"127.0.0.1:{coord.port}"
    n = WORKERS + SERVERS
    errors, servers, done = [], [], threading.Event()

    def serve():
        try:
            s = kv.KvServer(coordinator=addr, world_size=n, job_token=token)
            servers.append(s)
            done.wait(120)
        except Exception as e:  # reported by the test below
            errors.append(e)

    def work(w):
        try:
            wk = kv.KvWorker(coordinator=addr, world_size=n, job_token=token)
            try:
                body(w, wk)
            finally:
                wk.close()
        except Exception as e:  # reported by the test below
            errors.append(e)

    ts = [threading.Thread(target=serve) for _ in range(SERVERS)]
    ws = [threading.Thread(target=work, args=(w,)) for w in range(WORKERS)]
    for t in ts + ws:
        t.start()
    for t in ws:
        t.join(180)
    hung = [t for t in ws if t.is_alive()]
    done.set()
    for t in ts:
        t.join(60)
    for s in servers:
        s.close()
    coord.close()
    assert not hung, "a worker hung"
    if errors:
        raise errors[0]


def test_push_pull_wait_sums_without_copies_and_in_place(monkeypatch):
    pattern = (np.arange(BIG) % 7 + 1).astype(np.float32)
    small = np.arange(10, dtype=np.int64)
    tri = WORKERS * (WORKERS + 1) // 2

    def body(w, wk):
        wk.init([1, 2], [np.zeros(BIG, np.float32), np.zeros(10, np.int64)])
        g = (w + 1) * pattern
        gs = (w + 1) * small
        out, outs = np.zeros(BIG, np.float32), np.zeros(10, np.int64)
        # round 1: apart (sent from g, received into out)
        v = wk.push_pull_wait([1, 2], [g, gs], [out, outs])
        assert v == 1, v
        assert np.array_equal(out, tri * pattern), "round 1 sum"
        assert np.array_equal(outs, tri * small), "round 1 int sum"
        assert np.array_equal(g, (w + 1) * pattern), "the pushed array is unchanged"
        # round 2: in place
        assert wk.push_pull_wait(1, g, g) == 2
        assert np.array_equal(g, tri * pattern), "round 2 sum, in place"
        # round 3: the non-blocking push_pull gives the same
        out2 = np.zeros(BIG, np.float32)
        req = wk.push_pull(1, (w + 1) * pattern, out2)
        assert req.wait() == 3
        req.free()
        assert np.array_equal(out2, tri * pattern), "round 3 sum"
        # refused before anything is sent: an output of another length or dtype
        with pytest.raises(braid.BraidError, match="differs"):
            wk.push_pull_wait([1, 2], [g, gs], [out, np.zeros(9, np.int64)])
        with pytest.raises(braid.BraidError, match="differs"):
            wk.push_pull_wait(2, gs, np.zeros(10, np.float64))

    _group(monkeypatch, body)


def test_push_pull_wait_keys_in_flight_together_and_refused_mid_call(monkeypatch):
    """push_pull_wait of several keys of one dtype: one braid_kv_push_pull_waitv call (a lent
    1.6 MB key, a small one, one in place); then a call whose second key has a wrong length:
    the first key was sent and waited for, the error names the refused key; outputs sharing
    memory are refused before anything is sent."""
    tri = WORKERS * (WORKERS + 1) // 2
    keys = [21, 22, 23]
    sizes = [BIG, 5, 4]

    def body(w, wk):
        wk.init(keys, [np.zeros(n, np.float32) for n in sizes])
        gs = [np.full(n, (w + 1) * (i + 1), np.float32) for i, n in enumerate(sizes)]
        outs = [np.zeros(sizes[0], np.float32), np.zeros(sizes[1], np.float32), gs[2]]
        assert wk.push_pull_wait(keys, gs, outs) == 1
        for i, n in enumerate(sizes):
            assert np.array_equal(outs[i], np.full(n, tri * (i + 1), np.float32)), f"key {i}"
        assert np.array_equal(gs[0], np.full(BIG, w + 1, np.float32)), "pushed array unchanged"
        # keys 22 (sent), 23 with 3 elements (refused), 21 (not sent)
        o22 = np.zeros(5, np.float32)
        with pytest.raises(braid.BraidError, match="key 23"):
            wk.push_pull_wait([22, 23, 21],
                              [np.full(5, w + 1, np.float32), np.ones(3, np.float32), gs[0]],
                              [o22, np.zeros(3, np.float32), outs[0]])
        assert np.array_equal(o22, np.full(5, tri, np.float32)), "key 22's round 2"
        # outputs that share memory: refused before anything is sent
        shared = np.zeros(9, np.float32)
        with pytest.raises(braid.BraidError, match="outs.1. overlaps outs.0."):
            wk.push_pull_wait([22, 23], [np.ones(5, np.float32), np.ones(4, np.float32)],
                              [shared[:5], shared[4:8]])
        assert not shared.any(), "a refused call wrote"
        # every key again: 21 and 23 at round 2, 22 at round 3
        assert wk.push_pull_wait(keys, gs, [np.zeros(n, np.float32) for n in sizes]) == 2

    _group(monkeypatch, body)


def test_push_pull_without_copy_keys_in_flight(monkeypatch):
    """push_pull(copy=False): braid_kv_push_pull_nocopy per key, the call returns before the
    answers; a lent 1.6 MB key, a 64 KiB one and a small one in flight together, another key
    in place; exact values, the pushed arrays untouched; the request keeps the arrays alive
    (they are dropped by the caller before the wait). Then push(copy=False) and a pull."""
    tri = WORKERS * (WORKERS + 1) // 2
    keys = [41, 42, 43, 44]
    sizes = [BIG, 1 << 14, 3, 7]

    def body(w, wk):
        wk.init(keys, [np.zeros(n, np.float32) for n in sizes])
        gs = [np.arange(n, dtype=np.float32) % 5 * (w + 1) for n in sizes]
        outs = [np.zeros(n, np.float32) for n in sizes[:3]] + [gs[3]]
        want = [np.arange(n, dtype=np.float32) % 5 * tri for n in sizes]
        req = wk.push_pull(keys, gs, outs, copy=False)
        mid = gs[1]
        del gs[:2]  # the request holds the arrays until it completes
        assert req.wait() == 1
        req.free()
        for i in range(4):
            assert np.array_equal(outs[i], want[i]), f"key {keys[i]}"
        assert np.array_equal(mid, np.arange(sizes[1], dtype=np.float32) % 5 * (w + 1)), \
            "pushed array unchanged"
        # a second round through the copying path gives the next round's values
        again = [np.arange(n, dtype=np.float32) % 5 * (w + 1) for n in sizes]
        outs2 = [np.zeros(n, np.float32) for n in sizes]
        r2 = wk.push_pull(keys, again, outs2)
        assert r2.wait() == 2
        for i in range(4):
            assert np.array_equal(outs2[i], want[i]), f"key {keys[i]} round 2"
        # push(copy=False) of the two large keys (braid_kv_push_nocopy), then their round
        p = wk.push(keys[:2], again[:2], copy=False)
        del again[:2]
        assert p.wait() == 0
        p.free()
        outs3 = [np.zeros(n, np.float32) for n in sizes[:2]]
        assert wk.pull(keys[:2], outs3).wait() == 3
        for i in range(2):
            assert np.array_equal(outs3[i], want[i]), f"key {keys[i]} round 3"

    _group(monkeypatch, body)
