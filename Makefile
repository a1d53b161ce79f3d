# braid: the single entry point for building, the demo and the tests.
CARGO ?= cargo
PREFIX ?= /usr/local

.PHONY: all build demo test test-fast lint docs clean

all: build

build:
	$(CARGO) build --release --workspace

## The bandwidth demo: braid-perf all_reduce over 4 local ranks (TCP).
demo: build
	./target/release/braid-perf all_reduce --ranks 4 -b 8 -e 64M -f 8 -n 10 -w 2

## Everything CI checks: formatting, lints, docs freshness, unit + multi-process tests.
test: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace -- --test-threads=2

## Native and Python dependencies of the tests (none beyond the Rust toolchain yet).
deps:
	@true

docs:
	UPDATE_DOCS=1 $(CARGO) test -p braid --lib config::tests::docs_are_current

clean:
	$(CARGO) clean
