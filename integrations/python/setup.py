"""Builds libbraid (cargo, release) and installs it INSIDE the braid package.

`pip install ./integrations/python` and `pip wheel ./integrations/python` run this from the
repository checkout: the Cargo workspace is two directories up. BRAID_CARGO overrides the
cargo executable; BRAID_PREBUILT_LIB=/path/libbraid.so installs that library instead of
building one. The RDMA verbs plugin libbraid_ibverbs.so (loaded by libbraid at run time, only
for BRAID_TRANSPORT=ib/auto with a real NIC) is built and shipped next to libbraid.so when its
build dependencies (rdma-core headers, libclang) are present, else left out with a warning.
"""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def build_libbraid():
    pre = os.environ.get("BRAID_PREBUILT_LIB")
    if pre:
        return pre
    if not os.path.exists(os.path.join(REPO, "Cargo.toml")):
        raise RuntimeError(
            f"braid: no Cargo workspace at {REPO}: build from a checkout of the braid "
            f"repository (pip install ./integrations/python), or set BRAID_PREBUILT_LIB")
    cargo = os.environ.get("BRAID_CARGO") or shutil.which("cargo") or os.path.expanduser(
        "~/.cargo/bin/cargo")
    if not os.path.exists(cargo) and not shutil.which(cargo):
        raise RuntimeError("braid: cargo (the Rust toolchain) is needed to build libbraid")
    subprocess.check_call([cargo, "build", "--release", "-p", "braid-capi"], cwd=REPO)
    if subprocess.call([cargo, "build", "--release", "-p", "braid-ibverbs"], cwd=REPO) != 0:
        print("braid: the verbs plugin (libbraid_ibverbs.so) did not build (rdma-core headers "
              "and libclang are needed: make deps); the package works without it, with no RDMA")
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    return os.path.join(target, "release", "libbraid.so")


class BuildPy(build_py):
    def run(self):
        super().run()
        lib = build_libbraid()
        dest = os.path.join(self.build_lib, "braid")
        os.makedirs(dest, exist_ok=True)
        shutil.copy2(lib, os.path.join(dest, "libbraid.so"))
        plugin = os.path.join(os.path.dirname(lib), "libbraid_ibverbs.so")
        if os.path.exists(plugin):
            shutil.copy2(plugin, os.path.join(dest, "libbraid_ibverbs.so"))


class BinaryDistribution(Distribution):
    """The wheel carries a native library: platform-specific, not pure Python."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildPy}, distclass=BinaryDistribution)
