"""braid.mxnet: MXNet kvstores on braid, registered with ``mx.kv.KVStoreBase.register``.

``import braid.mxnet`` registers two kvstores (import it BEFORE mxnet: see the launch notes)::

    import braid.mxnet
    import mxnet as mx
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1},
                            kvstore="braid_dist_sync", update_on_kvstore=False)

* ``braid_dist_sync``: synchronous data parallelism on braid's all-reduce (pushpull is one
  all-reduce; push stores the sum over workers, pull returns it; broadcast sends rank 0's
  value; set_optimizer updates locally after the all-reduce, identically on every worker).
* ``braid_dist_async``: braid's push/pull servers (BRAID_PS_MODE async by default, or sync,
  bounded:TAU; BRAID_PS_REPLICAS; ...). set_optimizer installs SGD on the servers. Servers run
  inside the worker processes unless the job has dedicated ones.

Launch (the first that applies):

1. ``BRAID_COORDINATOR=host:port`` (+ ``BRAID_JOB_TOKEN``, ``BRAID_WORLD_SIZE`` = number of
   workers, optional ``BRAID_RANK``): a coordinator already runs (braid-run, braid-coordinator).
2. torchrun's ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``: rank 0 hosts the
   coordinator at MASTER_ADDR:MASTER_PORT.
3. MXNet's ``DMLC_*`` variables (``tools/launch.py``): ``DMLC_PS_ROOT_URI``:``DMLC_PS_ROOT_PORT``
   is the coordinator, hosted by the ``DMLC_ROLE=scheduler`` process, whose ``import
   braid.mxnet`` runs it and exits once every member left; ``DMLC_ROLE=server`` processes run
   a dedicated push/pull server (as ``python -m braid.mxnet.server``) and exit once every
   worker left; ``DMLC_NUM_WORKER`` workers, ``DMLC_NUM_SERVER`` dedicated servers. MXNet's
   own import starts ps-lite in those roles, so ``import braid.mxnet`` must come first.
4. none: a one-worker job with a private coordinator.

Dedicated servers outside DMLC: ``BRAID_PS_SERVERS=S`` on workers and servers, servers
started with ``python -m braid.mxnet.server`` (same coordinator variables).

Errors from braid (a lost worker or server, named; a timeout, BRAID_TIMEOUT; a mismatch)
raise :class:`BraidMXNetError`, an ``mxnet.base.MXNetError``.
"""

import sys as _sys

from . import _launch


def _running_server_module():
    """Whether this process is `python -m braid.mxnet.server` (no mxnet import needed)."""
    argv = getattr(_sys, "orig_argv", None) or []
    for i, a in enumerate(argv[:-1]):
        if a == "-m" and argv[i + 1] == "braid.mxnet.server":
            return True
    return False


_launch.handle_role()  # DMLC_ROLE=scheduler|server: runs the role and exits

if not _running_server_module():
    try:
        import mxnet as _mx  # noqa: F401
    except ImportError as _e:
        raise ImportError(f"braid.mxnet needs MXNet (pip install mxnet==1.9.1 'numpy<1.24'): "
                          f"{_e}") from _e
    from ._kvstore import BraidMXNetError, braid_dist_async, braid_dist_sync  # noqa: F401

    __all__ = ["braid_dist_sync", "braid_dist_async", "BraidMXNetError"]
