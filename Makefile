# braid: the single entry point for building, the demo and the tests.
CARGO ?= cargo
PREFIX ?= /usr/local
## Profile whose libbraid `make install` copies (release or debug); NO_BUILD=1 skips the build.
PROFILE ?= release
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)

## The Python used for the Python package and its tests, and the torch release they are
## tested with (a large download from PyPI: CUDA wheels; installed only when missing).
PYTHON ?= python3
TORCH_PIN ?= torch==2.11.0

.PHONY: gpu-carry valgrind all build demo test test-fast test-python test-mxnet python-deps lint docs clean deps install header fuzz fuzz-smoke fuzz-corpus

all: build

build: deps
	$(CARGO) build --release --workspace

## The bandwidth demo: braid-perf all_reduce over 4 local ranks (shared memory on one host).
demo: build
	./target/release/braid-perf all_reduce --ranks 4 -b 8 -e 64M -f 8 -n 10 -w 2

## Everything CI checks: formatting, lints, docs freshness, unit + multi-process tests.
test: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) build --workspace --bins --lib
	$(CARGO) test --workspace -- --test-threads=2
	$(MAKE) test-python
	$(MAKE) test-mxnet

## The Python package (pip install ./integrations/python builds libbraid into it) and its
## tests: the torch.distributed backend across real processes (pytest).
test-python: python-deps
	$(PYTHON) -m pip install -q ./integrations/python
	cd integrations/python/tests && $(PYTHON) -m pytest -q -p no:cacheprovider

## braid's MXNet kvstores (braid.mxnet) across real processes. MXNet 1.9.1 needs numpy<1.24,
## which would break torch: these tests get their own virtual environment (MXNET_VENV, created
## once and reused), with the braid package installed into it (the libbraid just built).
MXNET_VENV ?= target/mxnet-venv
MXNET_PIN ?= mxnet==1.9.1
test-mxnet:
	@$(MXNET_VENV)/bin/python -c "import mxnet, numpy, pytest, sys; sys.exit(mxnet.__version__ != '$(MXNET_PIN)'.split('==')[1])" 2>/dev/null || \
	  { echo "creating $(MXNET_VENV) with $(MXNET_PIN) (numpy<1.24)"; rm -rf $(MXNET_VENV) && $(PYTHON) -m venv $(MXNET_VENV) && \
	    $(MXNET_VENV)/bin/python -m pip install -q "$(MXNET_PIN)" "numpy<1.24" pytest; }
	$(CARGO) build --release -p braid-capi
	BRAID_PREBUILT_LIB=$(CURDIR)/target/release/libbraid.so $(MXNET_VENV)/bin/python -m pip install -q ./integrations/python
	cd integrations/python/tests_mxnet && $(abspath $(MXNET_VENV))/bin/python -m pytest -q -p no:cacheprovider

## torch (pinned), pytest and numpy, each only when missing.
python-deps:
	@$(PYTHON) -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$(TORCH_PIN)'.split('==')[1] else 1)" 2>/dev/null || \
	  { echo "installing $(TORCH_PIN) from PyPI (large download)"; $(PYTHON) -m pip install -q "$(TORCH_PIN)"; }
	@$(PYTHON) -c "import pytest, numpy" 2>/dev/null || $(PYTHON) -m pip install -q pytest numpy

## Native and Python dependencies of the tests: a C compiler (cc, c++) and pkg-config;
## hwloc (>= 2.8) and libudev headers for braid's topology discovery (hwlocality); for the
## verbs plugin libbraid_ibverbs.so (ibverbs-plugin/: ibverbs-sys runs cmake over rdma-core and
## bindgen, which loads libclang) cmake, libclang, libnl and libibverbs (rdma-core's headers and
## libibverbs.so.1; libbraid itself does not link it).
## Installs only what is missing; refreshes the apt lists only when there are none.
DEB_DEPS := pkg-config libhwloc-dev libudev-dev iproute2 cmake libclang1-14 libclang-common-14-dev libnl-3-dev libnl-route-3-dev libibverbs-dev
deps:
	@dpkg -s $(DEB_DEPS) >/dev/null 2>&1 || { \
	  { ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || apt-get update -q; } && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y $(DEB_DEPS) || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y $(DEB_DEPS); }; }; }

## What perf/gpu_check needs on a GPU machine (no Rust toolchain there): stripped release
## braid-perf, braid-run, braid-coordinator and libbraid.so in target/gpu-carry (a few MiB;
## carry that directory, run `perf/gpu_check OUTDIR`).
gpu-carry: build
	rm -rf target/gpu-carry && mkdir -p target/gpu-carry
	for f in braid-perf braid-run braid-coordinator libbraid.so; do strip -o target/gpu-carry/$$f target/release/$$f; done
	@du -sh target/gpu-carry

## Installs libbraid.so, libbraid.a, the verbs plugin libbraid_ibverbs.so (loaded at run time
## for RDMA; libbraid does not link libibverbs), include/braid.h and braid.pc under PREFIX.
install: deps
ifeq ($(NO_BUILD),)
	$(CARGO) build -p braid-capi -p braid-ibverbs $(if $(filter release,$(PROFILE)),--release,)
endif
	install -d $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/include
	install -m 755 target/$(PROFILE)/libbraid.so $(DESTDIR)$(PREFIX)/lib/libbraid.so
	install -m 644 target/$(PROFILE)/libbraid.a $(DESTDIR)$(PREFIX)/lib/libbraid.a
	@if [ -f target/$(PROFILE)/libbraid_ibverbs.so ]; then \
	  install -m 755 target/$(PROFILE)/libbraid_ibverbs.so $(DESTDIR)$(PREFIX)/lib/libbraid_ibverbs.so; \
	else echo "libbraid_ibverbs.so not built (cargo build -p braid-ibverbs): installed without RDMA verbs"; fi
	install -m 644 include/braid.h $(DESTDIR)$(PREFIX)/include/braid.h
	printf '%s\n' \
	  'prefix=$(PREFIX)' \
	  'libdir=$${prefix}/lib' \
	  'includedir=$${prefix}/include' \
	  '' \
	  'Name: braid' \
	  'Description: collective communication for distributed training (C ABI)' \
	  'Version: $(VERSION)' \
	  'Libs: -L$${libdir} -lbraid' \
	  'Libs.private: -lpthread -ldl -lm' \
	  'Cflags: -I$${includedir}' \
	  > $(DESTDIR)$(PREFIX)/lib/pkgconfig/braid.pc

## The C ABI test programs under valgrind memcheck (every rank); needs valgrind.
valgrind:
	tests/c/valgrind.sh

## Regenerates include/braid.h (cbindgen) after a change of the C ABI.
header:
	UPDATE_HEADER=1 $(CARGO) test -p braid-capi --test header

## Fuzzing (fuzz/README.md). fuzz-smoke (stable; `make test` runs the same test inside its
## cargo test line): every fuzz target over its
## corpus in fuzz/corpus plus deterministic mutations; prints executions and crashes per target.
fuzz-smoke:
	$(CARGO) test -p braid --test fuzz_smoke -- --nocapture --test-threads=1

## Long runs with libFuzzer (nightly; installs cargo-fuzz when missing): FUZZ_SECONDS per
## target (default 300), FUZZ_TARGETS to pick some. New inputs go to fuzz/work/<target>,
## crashes to fuzz/artifacts/<target>; a table of executions and crashes per target at the end
## (fails when any target crashed or has crash inputs left in fuzz/artifacts).
FUZZ_SECONDS ?= 300
FUZZ_TARGETS ?= $(basename $(notdir $(wildcard fuzz/fuzz_targets/*.rs)))
fuzz: deps
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	@cd fuzz && rm -f work/summary.txt && mkdir -p work && fail=0 && for t in $(FUZZ_TARGETS); do \
	  mkdir -p work/$$t artifacts/$$t; \
	  $(CARGO) +nightly fuzz run -a $$t work/$$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) \
	    -rss_limit_mb=2048 -malloc_limit_mb=256 -timeout=20 -detect_leaks=0 -print_final_stats=1 \
	    > work/$$t.log 2>&1; rc=$$?; \
	  execs=$$(sed -n 's/^stat::number_of_executed_units: *//p' work/$$t.log | tail -n 1); \
	  crashes=$$(ls artifacts/$$t | wc -l); \
	  printf '%-16s %12s executions %4s crashes (exit %s, log fuzz/work/%s.log)\n' $$t "$${execs:-?}" $$crashes $$rc $$t | tee -a work/summary.txt; \
	  [ $$rc -eq 0 ] && [ $$crashes -eq 0 ] || fail=1; \
	done; echo "summary in fuzz/work/summary.txt (crash inputs in fuzz/artifacts/<target>)"; exit $$fail

## Rewrites the fuzz seed corpus (fuzz/corpus/<target>/seed-*) from the real encoders.
fuzz-corpus:
	UPDATE_CORPUS=1 $(CARGO) test -p braid --test fuzz_smoke corpus_holds

docs:
	UPDATE_DOCS=1 $(CARGO) test -p braid --lib config::tests::docs_are_current

clean:
	$(CARGO) clean
