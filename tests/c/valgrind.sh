#!/usr/bin/env bash
# Runs the C ABI test programs of tests/c/ under valgrind (memcheck), every rank, on the rank
# counts capi/tests/c_programs.rs uses (the largest of each), with the release libbraid.
# Usage: tests/c/valgrind.sh   (from the repository root; `make valgrind` runs it)
# Prints one line per program: status, seconds, memcheck error count; exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)"; exit 2; }
cargo build -q --release -p braid-capi --lib && cargo build -q --release -p braid --bins || exit 2
out=$(mktemp -d /tmp/braid-valgrind.XXXXXX)
lib=$PWD/target/release
fail=0
run() { # name ranks [env...]
  local t=$1 n=$2; shift 2
  cc -std=c11 -g -pthread -Wall -Wextra -Werror -Iinclude -o "$out/$t" "tests/c/$t.c" -L"$lib" -lbraid || { echo "$t: does not compile"; fail=1; return; }
  local s; s=$(date +%s)
  env "$@" BRAID_TIMEOUT=300 LD_LIBRARY_PATH="$lib" timeout 900 "$lib/braid-run" -n "$n" ${BR_ARGS:-} -- \
    valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite \
    --log-file="$out/$t.%p.vg" "$out/$t" >"$out/$t.out" 2>&1
  local rc=$? errs
  errs=$(cat "$out/$t".*.vg 2>/dev/null | grep -c "^==[0-9]*== .*\(Invalid\|uninitialised\|definitely lost\|Mismatched\|overlap\)" || true)
  printf '%-12s ranks=%d rc=%d %3ds memcheck_errors=%s\n' "$t" "$n" "$rc" "$(( $(date +%s) - s ))" "$errs"
  [ "$rc" = 0 ] && [ "$errs" = 0 ] || { fail=1; tail -20 "$out/$t.out"; cat "$out/$t".*.vg 2>/dev/null | head -40; }
}
run collectives 4
run p2p 4
run nonblocking 3
run errors 3
run mismatch 3
run backend 3
run groups 4
run pipeline 4
mkdir -p "$out/kv-done"
run kv 4 BRAID_GROUP=kv BRAID_PS_MODE=sync BRAID_PS_RULE=sum BRAID_PS_PARTITION_BYTES=1024 \
  BRAID_PS_REPLICAS=1 BRAID_KV_TEST_CALLBACK=1 BRAID_KV_TEST_DIR="$out/kv-done"
BR_ARGS="--join 1@1" run elastic 2
echo "logs: $out"
exit $fail
