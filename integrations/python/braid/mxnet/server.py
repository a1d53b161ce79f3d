"""A dedicated push/pull server of a braid MXNet job: ``python -m braid.mxnet.server``.

Joins the job's push/pull group (coordinator from BRAID_COORDINATOR, DMLC_PS_ROOT_URI and
DMLC_PS_ROOT_PORT, or MASTER_ADDR and MASTER_PORT; workers from BRAID_WORLD_SIZE, WORLD_SIZE
or DMLC_NUM_WORKER; servers from BRAID_PS_SERVERS or DMLC_NUM_SERVER, which the workers must
see too) and serves until every worker has left (exit status 0), or SIGTERM (0). BRAID_PS_MODE
(default async), BRAID_PS_REPLICAS, BRAID_PS_PARTITION_BYTES ... as for the workers. Exit
status 1: it could not start (bad environment, the group did not form in BRAID_INIT_TIMEOUT).
"""

import sys

from ._launch import run_server


def main():
    return run_server()


if __name__ == "__main__":
    sys.exit(main())
