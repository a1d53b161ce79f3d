"""Starts a script when a gate file appears: `pipeline_gate.py GATE SECONDS SCRIPT [ARGS...]`.

It imports torch and braid.torch first (the slow part of a Python start, seconds on a loaded
host), then waits up to SECONDS for the file GATE to exist, then runs SCRIPT with ARGS as
``__main__`` (sys.argv and sys.path[0] as if started directly). A test starts a joiner ahead of
time this way and releases it at an exact point of the running job (say, after its step 3), so
what the test checks does not depend on how long Python takes to start. Exit status: the
script's; 3 when the gate never appeared.
"""

import os
import runpy
import sys
import time


def main():
    if len(sys.argv) < 4:
        sys.exit("usage: pipeline_gate.py GATE SECONDS SCRIPT [ARGS...]")
    gate, seconds, script, args = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4:]
    import torch  # noqa: F401  (the slow imports, before the gate)
    import braid.torch  # noqa: F401

    deadline = time.monotonic() + seconds
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            print(f"pipeline_gate: {gate} did not appear within {seconds} s", flush=True)
            sys.exit(3)
        time.sleep(0.01)
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
