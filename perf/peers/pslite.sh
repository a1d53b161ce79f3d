#!/usr/bin/env bash
# perf/peers/pslite.sh: ps-lite (BytePS's fork) as a peer for `braid-perf push_pull`.
#
# Usage: perf/peers/pslite.sh [--workers 2] [--servers 2] [--sizes 4096,65536,1048576,16777216]
#                             [--iters 10] [--warmup 2] [--keys-per-server 40]
#                             [--mode push_pull|push|pull] [--server-sum] [--no-spin] [--no-install]
#                             [--jobs 2] [--timeout 900]
#   BYTEPS_SDIST=/path/byteps-0.2.5.post15.tar.gz uses an already downloaded sdist instead of pip.
#
# What it does
#   1. Installs what it needs from Debian if missing (g++, make, libzmq3-dev; apt-get -y).
#      No protobuf is needed: this fork replaced ps-lite's protobuf Meta with a plain struct
#      (src/meta.h).
#   2. Downloads the byteps sdist with pip (`pip download --no-deps --no-binary :all:
#      byteps==0.2.5.post15`) into perf/peers-build/pslite/ (gitignored), checks its sha256,
#      and extracts only 3rdparty/ps-lite/ (BytePS's fork of dmlc/ps-lite). GitHub is not used.
#   3. Builds build/libps.a and tests/test_benchmark with the fork's own Makefile against the
#      system libzmq: `make ZMQ= DEPS_PATH=<empty dir>` (ZMQ= removes the rule that wgets and
#      builds zeromq 4.1.4; -lzmq then resolves to Debian's libzmq5). Nothing outside
#      perf/peers-build/ is touched. With --server-sum it also builds tests/test_benchmark_sum,
#      a sed-patched copy (in the build tree) whose server really sums every pushed byte (as
#      f32) into the stored value; the stock benchmark does no arithmetic (see below).
#   4. For each size runs 1 scheduler + S servers + W workers as local processes over TCP
#      loopback (DMLC_PS_ROOT_URI=127.0.0.1, DMLC_NODE_HOST=127.0.0.1, zmq van), logs under
#      perf/peers-build/pslite/run/, parses the workers' per-round lines, prints a table.
#
# The benchmark (tests/test_benchmark.cc of the fork; upstream dmlc/ps-lite's
# tests/test_kv_app_benchmark.cc is a different program: one Push and one Pull of 10M sparse
# float keys with no size argument. BytePS renamed and rewrote it as this dense benchmark.)
#   argv: LEN REPEAT MODE. Env: NUM_KEY_PER_SERVER=K (default 40), LOG_DURATION (default 10).
#   - Each worker owns T = K*S keys; key k lives on server k % S (ps key
#     krs[k%S].begin()+k). Each key's value is ONE contiguous message of LEN bytes
#     (KVWorker<char>; no slicing of a key across servers). Every key is pushed once before
#     timing ("init push", not timed).
#   - A "round" (MODE 1, push_pull) = for each of the T keys, issue ZPush(key, LEN bytes) and
#     then ZPull(key, LEN bytes) without waiting (2*T requests in flight, per-connection
#     order keeps pull after push), then Wait on all 2*T. So per worker per round:
#     LEN*K*S bytes pushed and LEN*K*S bytes pulled. MODE 2 = pushes only, MODE 3 = pulls only.
#   - Server handler: on push it only checks the length (first push of a key allocates the
#     store) and answers an empty ack; it does NOT copy or sum the pushed data (it sums only
#     with DEBUG_MODE, which also logs every push). On pull it answers the stored LEN bytes
#     (zero-copy from the store). There is NO synchronisation between workers: no per-round
#     aggregation barrier, a pull never waits for the other workers' pushes (≈ async mode,
#     with the server's reduction cost removed). --server-sum restores the f32 sum (still async).
#   - Workers run independently (no barrier between their rounds) and time themselves.
#   - Printed per worker every LOG_DURATION rounds: "Application goodput: G Gbps" with
#     G = 8*LEN*T*LOG_DURATION / elapsed_ns, i.e. push bytes only (pulled bytes not counted),
#     per worker. The timer is restarted after the print, so printing is not timed.
#   CPU: the fork's zmq van polls: every process runs a receive thread per socket (workers:
#   1 + S + 1 sockets, servers and scheduler: 1) that loops on zmq_msg_recv(ZMQ_DONTWAIT)
#   under the van's mutex without ever blocking, plus BYTEPS_ZMQ_NTHREADS (default 4) zmq I/O
#   threads. With W=S=2 that is 11 spinning threads; on a machine with fewer free cores than
#   that the stock numbers measure CPU contention more than the transport. --no-spin builds a
#   second tree (perf/peers-build/pslite/ps-lite-nospin) where, on EAGAIN, the receive
#   thread drops the mutex and sleeps 20 us before retrying; nothing else changes. Report
#   which one was used (the table header says so).
#   This script sets LOG_DURATION=1 and REPEAT=warmup+iters, so every round is reported;
#   round time is recovered as t = 8*LEN*T/G (to G's 6 significant digits), the first
#   --warmup rounds of each worker are dropped.
#
# Columns
#   size_B      LEN: bytes of one key's value = bytes per ZPush message
#   keys        T = K*S keys per worker per round (each pushed and pulled once)
#   MB/round    LEN*T/1e6: bytes one worker pushes per round (it pulls as many)
#   Gbps(psl)   ps-lite's own number: mean over workers of 8*LEN*T*iters/sum(round ns)
#   push GB/s   aggregate over workers of pushed bytes / time (= sum of per-worker LEN*T/mean t)
#   pp GB/s     aggregate of pushed + pulled bytes (2x push GB/s)
#   round_us    mean round time (per worker mean, max over workers); med_us: median round,
#               max over workers; min_us: fastest round of any worker
#
# Matching braid: `braid-perf push_pull --workers W --servers S` should use async
# consistency (no round barrier), T = K*S keys each of LEN bytes per worker per round (or,
# if it pushes one tensor per round, a tensor of LEN*T bytes with partition size LEN so it
# splits into T parts spread over the S servers), push_pull of all keys then wait, and report
# the same per-round time. Its -b/-e are then LEN*T (tensor) or LEN (per key) accordingly.
set -euo pipefail

WORKERS=2
SERVERS=2
SIZES=4096,65536,1048576,16777216
ITERS=10
WARMUP=2
KPS=40
MODE=push_pull
SUM=0
NOSPIN=0
INSTALL=1
JOBS=2
TIMEOUT=900
BYTEPS_VERSION=0.2.5.post15
BYTEPS_SHA256=9d6a3c5be4c4b5a172739744bb32725c433f9a9f63794e1885e7376ff4eea99f

die() { echo "# pslite: error: $*" >&2; exit 1; }
say() { echo "# pslite: $*" >&2; }
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS=$2; shift 2 ;;
    --servers) SERVERS=$2; shift 2 ;;
    --sizes) SIZES=$2; shift 2 ;;
    --iters|-n) ITERS=$2; shift 2 ;;
    --warmup|-w) WARMUP=$2; shift 2 ;;
    --keys-per-server) KPS=$2; shift 2 ;;
    --mode) MODE=$2; shift 2 ;;
    --server-sum) SUM=1; shift ;;
    --no-spin) NOSPIN=1; shift ;;
    --no-install) INSTALL=0; shift ;;
    --jobs) JOBS=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done
for v in WORKERS SERVERS ITERS KPS JOBS TIMEOUT; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
[[ $WARMUP =~ ^[0-9]+$ ]] || die "--warmup must be >= 0"
case "$MODE" in push_pull) MODE_N=1 ;; push) MODE_N=2 ;; pull) MODE_N=3 ;; *) die "--mode push_pull|push|pull" ;; esac
IFS=, read -r -a SIZE_LIST <<<"$SIZES"
for s in "${SIZE_LIST[@]}"; do
  [[ $s =~ ^[1-9][0-9]*$ ]] && [ "$s" -lt 2147483648 ] || die "bad size '$s' (bytes, < 2^31: the benchmark's LEN is an int)"
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD=$ROOT/perf/peers-build/pslite
SRC=$BUILD/ps-lite
mkdir -p "$BUILD"

# ---- 1. Debian packages -------------------------------------------------------------------
need=()
for p in g++ make libzmq3-dev; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
command -v python3 >/dev/null || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if [ ${#need[@]} -gt 0 ]; then
  [ "$INSTALL" = 1 ] || die "missing Debian packages: ${need[*]} (run without --no-install)"
  say "installing from Debian: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${need[@]}"; }
fi

# ---- 2. source: byteps sdist from PyPI -> 3rdparty/ps-lite ---------------------------------
SDIST=$BUILD/dl/byteps-$BYTEPS_VERSION.tar.gz
if [ ! -f "$SDIST" ] && [ -n "${BYTEPS_SDIST:-}" ]; then
  mkdir -p "$BUILD/dl" && cp "$BYTEPS_SDIST" "$SDIST"
fi
if [ ! -f "$SDIST" ]; then
  [ "$INSTALL" = 1 ] || die "$SDIST is missing (run without --no-install to download it)"
  say "downloading byteps==$BYTEPS_VERSION sdist from PyPI (source of BytePS's ps-lite fork)"
  mkdir -p "$BUILD/dl"
  python3 -m pip download -q --no-deps --no-binary :all: -d "$BUILD/dl" "byteps==$BYTEPS_VERSION" >&2 ||
    die "pip download of byteps==$BYTEPS_VERSION failed"
  [ -f "$SDIST" ] || die "pip did not produce $SDIST"
fi
got=$(sha256sum "$SDIST" | cut -d' ' -f1)
[ "$got" = "$BYTEPS_SHA256" ] || say "WARNING: sha256 of $SDIST is $got, expected $BYTEPS_SHA256"
# extract a pristine tree; --no-spin builds in a second tree whose zmq van is patched
extract() {  # $1: directory
  if [ ! -f "$1/.extracted" ]; then
    rm -rf "$1" && mkdir -p "$1"
    tar -xzf "$SDIST" -C "$1" --strip-components=3 "byteps-$BYTEPS_VERSION/3rdparty/ps-lite"
    touch "$1/.extracted"
  fi
}
extract "$SRC"
if [ "$NOSPIN" = 1 ]; then
  SRC=$BUILD/ps-lite-nospin
  extract "$SRC"
  if ! grep -q 'braid-peer: no-spin' "$SRC/src/zmq_van.h"; then
    # In CallZmqRecvThread, on EAGAIN from the non-blocking zmq_msg_recv, release the van's
    # mutex and sleep 20 us instead of retrying at once. Nothing else changes.
    perl -0pi -e 's|(\} else if \(errno == EAGAIN\) \{ // ZMQ_DONTWAIT\n)(\s*)continue;|$1$2mu_.unlock(); std::this_thread::sleep_for(std::chrono::microseconds(20)); mu_.lock();  // braid-peer: no-spin\n$2continue;|' \
      "$SRC/src/zmq_van.h"
    grep -q 'braid-peer: no-spin' "$SRC/src/zmq_van.h" || die "--no-spin: could not patch src/zmq_van.h"
    sed -i 's|^#include <thread>$|#include <thread>\n#include <chrono>|' "$SRC/src/zmq_van.h"
  fi
fi

# ---- 3. build with the system libzmq -------------------------------------------------------
mkdir -p "$BUILD/deps"   # DEPS_PATH: empty on purpose, so nothing is fetched into it
targets=(ps tests/test_benchmark)
if [ "$SUM" = 1 ]; then
  sed 's/size_t sum_len = debug_mode_ ? req_data.vals.size() : 0;/size_t sum_len = req_data.vals.size();/' \
    "$SRC/tests/test_benchmark.cc" >"$SRC/tests/test_benchmark_sum.cc.new"
  grep -q 'size_t sum_len = req_data.vals.size();' "$SRC/tests/test_benchmark_sum.cc.new" ||
    die "--server-sum: could not patch the server's sum in tests/test_benchmark.cc"
  cmp -s "$SRC/tests/test_benchmark_sum.cc.new" "$SRC/tests/test_benchmark_sum.cc" 2>/dev/null ||
    mv "$SRC/tests/test_benchmark_sum.cc.new" "$SRC/tests/test_benchmark_sum.cc"
  rm -f "$SRC/tests/test_benchmark_sum.cc.new"
  targets+=(tests/test_benchmark_sum)
fi
say "building $SRC (${targets[*]}) with make -j$JOBS against Debian's libzmq"
if ! make -C "$SRC" -j"$JOBS" "${targets[@]}" ZMQ= DEPS_PATH="$BUILD/deps" >"$SRC/build.log" 2>&1; then
  grep -E 'error|Error' "$SRC/build.log" | head -30 >&2 || true
  die "build failed, full log: $SRC/build.log"
fi
BIN=$SRC/tests/test_benchmark
[ "$SUM" = 1 ] && BIN=$SRC/tests/test_benchmark_sum
[ -x "$BIN" ] || die "$BIN was not built"

# ---- 4. run ---------------------------------------------------------------------------------
mem_avail_kb=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
RUN=$BUILD/run
rm -rf "$RUN" && mkdir -p "$RUN"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

REPEAT=$((WARMUP + ITERS))
T=$((KPS * SERVERS))
say "W=$WORKERS workers, S=$SERVERS servers, $KPS keys/server (T=$T keys/worker/round), mode $MODE," \
    "iters $ITERS after warmup $WARMUP, server $([ "$SUM" = 1 ] && echo 'sums f32' || echo 'does no arithmetic (stock)'), zmq van over 127.0.0.1"
RESULTS=$RUN/results.tsv
: >"$RESULTS"
for len in "${SIZE_LIST[@]}"; do
  # worker: T*len of buffers; each server: KPS*len of store; x2 headroom for zmq messages
  need_kb=$(( (len * T * WORKERS + len * KPS * SERVERS) * 2 / 1024 ))
  if [ "$need_kb" -gt $((mem_avail_kb * 8 / 10)) ]; then
    say "size $len: needs ~$((need_kb / 1024)) MiB, more than 80% of available memory: skipped"
    printf '%s\tskip\n' "$len" >>"$RESULTS"; continue
  fi
  d=$RUN/$len; mkdir -p "$d"
  port=$(free_port)
  export DMLC_NUM_WORKER=$WORKERS DMLC_NUM_SERVER=$SERVERS DMLC_PS_ROOT_URI=127.0.0.1 \
         DMLC_PS_ROOT_PORT=$port DMLC_NODE_HOST=127.0.0.1 DMLC_INTERFACE=lo \
         NUM_KEY_PER_SERVER=$KPS LOG_DURATION=1
  PIDS=()
  DMLC_ROLE=scheduler timeout "$TIMEOUT" "$BIN" "$len" "$REPEAT" "$MODE_N" >"$d/scheduler.log" 2>&1 & PIDS+=($!)
  for ((i = 0; i < SERVERS; i++)); do
    DMLC_ROLE=server timeout "$TIMEOUT" "$BIN" "$len" "$REPEAT" "$MODE_N" >"$d/server$i.log" 2>&1 & PIDS+=($!)
  done
  for ((i = 0; i < WORKERS; i++)); do
    DMLC_ROLE=worker timeout "$TIMEOUT" "$BIN" "$len" "$REPEAT" "$MODE_N" >"$d/worker$i.log" 2>&1 & PIDS+=($!)
  done
  failed=0
  for p in "${PIDS[@]}"; do wait "$p" || failed=1; done
  PIDS=()
  if [ "$failed" = 1 ]; then
    say "size $len: a process failed or timed out (${TIMEOUT}s); last lines of its logs:"
    tail -n 5 "$d"/*.log >&2 || true
    printf '%s\tfail\n' "$len" >>"$RESULTS"; continue
  fi
  # one line per worker: ns of each timed round (after warmup)
  for ((i = 0; i < WORKERS; i++)); do
    awk -v len="$len" -v t="$T" -v w="$WARMUP" '
      /Application goodput:/ {
        for (j = 1; j <= NF; j++) { if ($j == "goodput:") g = $(j + 1); if ($j == "count") c = $(j + 2) }
        if (c > w) printf "%.1f ", 8.0 * len * t / g
      } END { print "" }' "$d/worker$i.log"
  done | sed "s/^/$len\t/" >>"$RESULTS"
  say "size $len done"
done
trap - EXIT INT TERM

python3 - "$RESULTS" "$T" "$WORKERS" "$ITERS" "$MODE" "$NOSPIN" "$SUM" <<'EOF'
import sys, statistics
path, T, W, iters, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
van = "zmq, recv threads patched to sleep 20us on EAGAIN (--no-spin)" if sys.argv[6] == "1" else "zmq, stock (busy-polling recv threads)"
srv = "sums pushed f32 into the store (--server-sum)" if sys.argv[7] == "1" else "stock (no arithmetic)"
rows = {}
order = []
for line in open(path):
    parts = line.rstrip("\n").split("\t")
    size = int(parts[0])
    if size not in rows:
        rows[size] = []
        order.append(size)
    rows[size].append(parts[1])
dirs = 2 if mode == "push_pull" else 1
hdr = f"{'size_B':>10} {'keys':>5} {'MB/round':>9} {'Gbps(psl)':>10} {'push GB/s':>10} {'pp GB/s':>9} {'round_us':>11} {'med_us':>11} {'min_us':>11} {'#rounds':>8}"
print(f"# ps-lite (BytePS fork) tests/test_benchmark, mode {mode}, {W} workers, T={T} keys/worker/round, van: {van}, server: {srv}")
print("# push GB/s, pp GB/s: aggregate over workers ('push' = bytes of the first direction of the mode);"
      " round_us: max over workers of the mean round")
print(hdr)
for size in order:
    vals = rows[size]
    if vals[0] in ("skip", "fail"):
        print(f"{size:>10} {T:>5} {size*T/1e6:>9.3f} {vals[0]:>10}")
        continue
    per = [[float(x) for x in v.split()] for v in vals]
    if any(len(p) != iters for p in per):
        print(f"{size:>10} {T:>5} {size*T/1e6:>9.3f} {'parse?':>10}  rounds per worker: {[len(p) for p in per]}")
    per = [p for p in per if p]
    if not per:
        continue
    bytes_round = size * T
    means = [sum(p) / len(p) for p in per]
    gbps = statistics.mean(8.0 * bytes_round / m for m in means)          # ps-lite's own definition
    push = sum(bytes_round / m for m in means)                            # GB/s (bytes/ns)
    med = max(statistics.median(p) for p in per)
    mn = min(min(p) for p in per)
    print(f"{size:>10} {T:>5} {bytes_round/1e6:>9.3f} {gbps:>10.4g} {push:>10.4g} {push*dirs:>9.4g}"
          f" {max(means)/1e3:>11.1f} {med/1e3:>11.1f} {mn/1e3:>11.1f} {sum(len(p) for p in per):>8}")
EOF
say "logs: $RUN (overwritten by the next run)"
