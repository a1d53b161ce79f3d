"""Where a braid MXNet job meets (the launch conventions), and the scheduler/server roles.

This module must not import mxnet: it runs before it (``DMLC_ROLE=scheduler|server``), since
MXNet's own import starts ps-lite's role for those processes.
"""

import os
import signal
import socket
import sys
import threading
import time

from .. import Coordinator, _lib

#: How long a process that hosts the coordinator (or an in-process server) waits at exit for
#: the job's other members to leave before it stops anyway (seconds).
EXIT_WAIT_S = 60.0

#: Poll interval of the scheduler and dedicated-server loops (seconds).
POLL_S = 0.1


class LaunchError(RuntimeError):
    """The launch environment is incomplete or contradictory."""


def _int_env(*names, required=None, lo=0):
    for n in names:
        v = os.environ.get(n)
        if v is None or v.strip() == "":
            continue
        try:
            i = int(v.strip())
        except ValueError:
            raise LaunchError(f"{n}={v!r}: expected an integer") from None
        if i < lo:
            raise LaunchError(f"{n}={v!r}: expected an integer >= {lo}")
        return i
    if required:
        raise LaunchError(required)
    return None


class Job:
    """The job this process belongs to: coordinator address and token, number of workers,
    this worker's rank when the launcher fixes it, number of dedicated servers."""

    def __init__(self, mode, coordinator, token, workers, rank, servers, host):
        self.mode = mode  # "braid" | "torchrun" | "dmlc" | "local"
        self.coordinator = coordinator
        self.token = token
        self.workers = workers
        self.rank = rank
        self.servers = servers
        self.host = host  # the host:port this process must host the coordinator at, or None

    def __repr__(self):
        return (f"Job(mode={self.mode}, coordinator={self.coordinator}, workers={self.workers}, "
                f"rank={self.rank}, servers={self.servers}, host={self.host})")


def dedicated_servers():
    """Number of dedicated server processes (BRAID_PS_SERVERS, else DMLC_NUM_SERVER; 0)."""
    return _int_env("BRAID_PS_SERVERS", "DMLC_NUM_SERVER") or 0


def resolve(role="worker"):
    """The Job from the environment, in this order:

    1. ``BRAID_COORDINATOR`` (+ ``BRAID_JOB_TOKEN``, ``BRAID_WORLD_SIZE`` = workers, optional
       ``BRAID_RANK``): a coordinator already runs (braid-run, braid-coordinator, a harness).
    2. torchrun: ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``: rank 0 hosts the
       coordinator at MASTER_ADDR:MASTER_PORT.
    3. MXNet's DMLC variables: ``DMLC_PS_ROOT_URI``:``DMLC_PS_ROOT_PORT`` is the coordinator
       (hosted by the DMLC_ROLE=scheduler process), ``DMLC_NUM_WORKER`` workers,
       ``DMLC_NUM_SERVER`` dedicated servers.
    4. none of these: a single-worker job with a private coordinator (tests, notebooks).
    """
    env = os.environ
    token = env.get("BRAID_JOB_TOKEN") or None
    servers = dedicated_servers()
    coord = (env.get("BRAID_COORDINATOR") or "").strip()
    if coord:
        workers = _int_env("BRAID_WORLD_SIZE", "WORLD_SIZE", "DMLC_NUM_WORKER", lo=1,
                           required="BRAID_COORDINATOR is set but the number of workers is not: "
                                    "set BRAID_WORLD_SIZE")
        rank = _int_env("BRAID_RANK", "RANK") if role == "worker" else None
        return _checked(Job("braid", coord, token, workers, rank, servers, None))
    maddr, mport = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if maddr and mport:
        workers = _int_env("BRAID_WORLD_SIZE", "WORLD_SIZE", lo=1,
                           required="MASTER_ADDR/MASTER_PORT are set but WORLD_SIZE is not")
        rank = None
        if role == "worker":
            rank = _int_env("BRAID_RANK", "RANK",
                            required="MASTER_ADDR/MASTER_PORT are set but RANK is not")
        addr = f"{maddr}:{int(mport)}"
        host = addr if rank == 0 else None
        return _checked(Job("torchrun", addr, token, workers, rank, servers, host))
    uri, port = env.get("DMLC_PS_ROOT_URI"), env.get("DMLC_PS_ROOT_PORT")
    if uri and port:
        workers = _int_env("DMLC_NUM_WORKER", lo=1,
                           required="DMLC_PS_ROOT_URI/PORT are set but DMLC_NUM_WORKER is not")
        rank = None
        if role == "worker" and env.get("DMLC_JOB_CLUSTER") == "local":
            # MXNet's local launcher numbers its workers 0..W-1 (servers after them)
            tid = _int_env("DMLC_TASK_ID")
            if tid is not None and tid < workers:
                rank = tid
        addr = f"{uri}:{int(port)}"
        return _checked(Job("dmlc", addr, token, workers, rank, servers, None))
    for n in ("BRAID_WORLD_SIZE", "WORLD_SIZE", "DMLC_NUM_WORKER"):
        if (_int_env(n) or 1) > 1:
            raise LaunchError(
                f"{n}={os.environ[n]} but no coordinator address: set BRAID_COORDINATOR, or "
                f"MASTER_ADDR and MASTER_PORT, or DMLC_PS_ROOT_URI and DMLC_PS_ROOT_PORT (MXNet's "
                f"launch.py sets those only with at least one server: -s 1 or more)")
    return Job("local", None, token, 1, 0, 0, "127.0.0.1:0")


def _checked(job):
    if job.rank is not None and not 0 <= job.rank < job.workers:
        raise LaunchError(f"rank {job.rank} is not below the number of workers {job.workers}")
    return job


def _bind_address(addr):
    """An ip:port to bind for host:port (a name is resolved; unresolvable: every interface)."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        ip = "0.0.0.0"
    return f"{ip}:{port}"


# ---- the coordinator this process hosts (torchrun rank 0, the local mode, the scheduler) ----
_hosted_lock = threading.Lock()
_hosted = None  # (Coordinator, address)


def hosted_coordinator(job):
    """Starts (once per process) the coordinator `job` says this process hosts; returns the
    address workers use (the job's coordinator address, or the private one)."""
    global _hosted
    with _hosted_lock:
        if _hosted is None:
            c = Coordinator(bind=_bind_address(job.host), job_token=job.token)
            addr = job.coordinator or f"127.0.0.1:{c.port}"
            _hosted = (c, addr)
        return _hosted[1]


def live_members(coord):
    """(live members, registrations ever) of a coordinator hosted here."""
    from ..kv import coordinator_status

    st = coordinator_status(coord)
    return int(st.get("live_members", 0)), int(st.get("registered_total", 0))


def close_hosted(wait_s=EXIT_WAIT_S):
    """Stops the hosted coordinator, once the job's members left (at most `wait_s`)."""
    global _hosted
    with _hosted_lock:
        h, _hosted = _hosted, None
    if h is None:
        return
    c = h[0]
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline:
            live, _ever = live_members(c)
            if live == 0:
                break
            time.sleep(POLL_S)
    except Exception:
        pass
    try:
        c.close()
    except Exception:
        pass


# ---- DMLC_ROLE=scheduler ------------------------------------------------------------------
def _sigterm_exit(code):
    def handler(signum, frame):
        raise SystemExit(code)

    return handler


def run_scheduler():
    """Hosts the coordinator at DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT until every member that
    registered has left (exit status 0), or nobody registered within BRAID_INIT_TIMEOUT
    (default 300 s; status 1). SIGTERM/SIGINT stop it (status 0)."""
    uri, port = os.environ.get("DMLC_PS_ROOT_URI"), os.environ.get("DMLC_PS_ROOT_PORT")
    if not uri or not port:
        print("braid.mxnet: DMLC_ROLE=scheduler needs DMLC_PS_ROOT_URI and DMLC_PS_ROOT_PORT",
              file=sys.stderr)
        return 2
    token = os.environ.get("BRAID_JOB_TOKEN") or None
    init_s = float(os.environ.get("BRAID_INIT_TIMEOUT") or 300)
    try:
        c = Coordinator(bind=_bind_address(f"{uri}:{int(port)}"), job_token=token)
    except Exception as e:  # noqa: BLE001 - reported, exit status says it
        print(f"braid.mxnet scheduler: cannot host the coordinator at {uri}:{port}: {e}",
              file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _sigterm_exit(0))
    start = time.monotonic()
    empty_since = None
    code = 0
    try:
        while True:
            live, ever = live_members(c)
            now = time.monotonic()
            if ever == 0:
                if now - start > init_s:
                    print(f"braid.mxnet scheduler: nobody registered within {init_s:g} s "
                          f"(BRAID_INIT_TIMEOUT)", file=sys.stderr)
                    code = 1
                    break
            elif live == 0:
                # every member that came has left; a short grace for a group that is about
                # to re-form (a kvstore closed and created again)
                if empty_since is None:
                    empty_since = now
                elif now - empty_since >= 1.0:
                    break
            else:
                empty_since = None
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            c.close()
        except Exception:
            pass
    return code


# ---- dedicated servers (DMLC_ROLE=server, python -m braid.mxnet.server) -------------------
def ps_group(generation=0):
    """BRAID_GROUP of the push/pull group (servers and workers)."""
    base = os.environ.get("BRAID_GROUP") or "mxnet"
    return f"{base}.ps" if generation == 0 else f"{base}.ps.{generation}"


def sync_group(generation=0):
    """BRAID_GROUP of braid_dist_sync's all-reduce communicator."""
    base = os.environ.get("BRAID_GROUP") or "mxnet"
    return f"{base}.sync" if generation == 0 else f"{base}.sync.{generation}"


def ps_env():
    """Environment overrides of push/pull starts: async mode unless BRAID_PS_MODE says."""
    return {} if os.environ.get("BRAID_PS_MODE") else {"BRAID_PS_MODE": "async"}


def run_server():
    """A dedicated push/pull server: joins the job's push/pull group (workers + servers) and
    serves until every worker has left (exit status 0), or SIGTERM/SIGINT (status 0). A
    failure to start (bad environment, the group did not form within BRAID_INIT_TIMEOUT) is
    status 1."""
    from ..kv import KvServer

    try:
        job = resolve(role="server")
        if job.mode == "local":
            raise LaunchError("a dedicated server needs the job's coordinator: set "
                              "BRAID_COORDINATOR (or DMLC_PS_ROOT_URI/DMLC_PS_ROOT_PORT, or "
                              "MASTER_ADDR/MASTER_PORT)")
        if job.servers == 0:
            raise LaunchError("a dedicated server needs the number of servers: set "
                              "BRAID_PS_SERVERS (or DMLC_NUM_SERVER)")
        srv = KvServer(coordinator=job.coordinator, world_size=job.workers + job.servers,
                       job_token=job.token, group=ps_group(), env=ps_env())
    except (LaunchError, _lib.BraidError) as e:
        print(f"braid.mxnet server: {e}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _sigterm_exit(0))
    seen = False
    try:
        while True:
            n = srv.workers
            if n > 0:
                seen = True
            elif seen:
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        pass
    except _lib.BraidError as e:
        print(f"braid.mxnet server: {e}", file=sys.stderr)
        srv.close()
        return 1
    finally:
        try:
            srv.close()
        except Exception:
            pass
    return 0


def handle_role():
    """Runs the scheduler or server role of ``DMLC_ROLE`` and exits the process; returns for
    workers (and when DMLC_ROLE is unset)."""
    role = (os.environ.get("DMLC_ROLE") or "").strip().lower()
    if role not in ("scheduler", "server"):
        return
    if "mxnet" in sys.modules:
        print("braid.mxnet: warning: mxnet was imported before braid.mxnet with "
              f"DMLC_ROLE={role}; import braid.mxnet first", file=sys.stderr)
    code = run_scheduler() if role == "scheduler" else run_server()
    # SystemExit out of `import braid.mxnet`: the training code after it never runs in a
    # scheduler or server process (as with MXNet's own import in those roles)
    sys.exit(code)
