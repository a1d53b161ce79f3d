"""The Python package itself: version, which libbraid it loads, errors as exceptions."""

import os
import subprocess
import sys

import braid
import pytest


def test_version_matches_the_library():
    assert braid.__version__ == braid.library_version()


def test_library_is_loaded_from_inside_the_package_or_braid_library():
    path = braid.library_path()
    assert os.path.exists(path)
    env = os.environ.get("BRAID_LIBRARY")
    if env:
        assert path == env
    else:
        assert os.path.dirname(path) == os.path.dirname(braid.__file__), path


def _py(code, **env):
    e = dict(os.environ)
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=e, timeout=60)


def test_braid_library_overrides_the_library(tmp_path):
    # a copy of the same library elsewhere is the one loaded
    copy = tmp_path / "libbraid-copy.so"
    copy.write_bytes(open(braid.library_path(), "rb").read())
    r = _py("import braid; print(braid.library_path())", BRAID_LIBRARY=str(copy))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(copy)
    # a missing one is a clear error, not a crash
    r = _py("import braid; braid.library_path()", BRAID_LIBRARY=str(tmp_path / "nope.so"))
    assert r.returncode != 0
    assert "libbraid not found" in r.stderr and "BRAID_LIBRARY" in r.stderr


def test_errors_are_exceptions_carrying_braids_message():
    # no coordinator anywhere: an invalid-argument error naming what is missing
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BRAID_", "MASTER_", "RANK", "WORLD_SIZE"))}
    code = ("import braid\n"
            "try:\n"
            "    braid.Communicator(world_size=2, rank=0)\n"
            "except braid.InvalidArgument as e:\n"
            "    assert isinstance(e, ValueError) and isinstance(e, braid.BraidError)\n"
            "    print('ERR', e.status, e.function, e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ERR 1 braid_comm_init"), r.stdout
    assert "coordinator" in r.stdout


def test_a_wrong_job_token_is_refused():
    coord = braid.Coordinator(bind="127.0.0.1:0", job_token="right")
    try:
        with pytest.raises(braid.BraidError) as ei:
            braid.Communicator(coordinator=f"127.0.0.1:{coord.port}", world_size=1, rank=0,
                               job_token="wrong", timeout_s=5)
        assert "token" in str(ei.value).lower() or "auth" in str(ei.value).lower()
        c = braid.Communicator(coordinator=f"127.0.0.1:{coord.port}", world_size=1, rank=0,
                               job_token="right")
        assert (c.rank, c.size) == (0, 1)
        c.close()
    finally:
        coord.close()


def _has_libcuda():
    import ctypes
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            pass
    return False


def test_cuda_available_says_why_not():
    ok, why = braid.cuda_available()
    if _has_libcuda():
        # perf/gpu_check covers machines with a driver; here only the shape of the answer.
        assert isinstance(why, str) and why
        return
    assert not ok
    assert "no CUDA driver (libcuda.so.1 not found)" in why, why


def test_backend_is_registered_for_cpu_and_cuda():
    import torch.distributed as dist
    import braid.torch  # noqa: F401
    caps = dist.Backend.backend_capability.get("braid")
    assert caps is not None and "cpu" in caps and "cuda" in caps, caps
