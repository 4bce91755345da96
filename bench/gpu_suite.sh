#!/usr/bin/env bash
# One GPU run of everything the CPU cannot check: install (builds ple_fast._C with CUDA), the
# whole-iteration bench first (bench_e2e: the figure that decides the most), the gpu-marked tests, every
# other bench/bench_*.py, and a markdown summary. No network needed.
#
#   OUT=/some/dir bash bench/gpu_suite.sh          # from anywhere; default OUT=bench/results
#
# Env knobs: SUITE_BUDGET_S (default 480: the whole run must fit in 8 minutes on an H100),
# BENCH_ARGS (extra args for every bench, e.g. "--quick"), BENCH_ARGS_<name> (extra args for one,
# e.g. BENCH_ARGS_bench_rollout="--batches 128"), SUITE_BENCHES (names to run, default every
# bench/bench_*.py), SUITE_TESTS (test files for the gpu-marked run, default tests/), SUITE_SKIP_TESTS=1 (no
# pytest step), PYTEST_WORKERS (default 8 where
# pytest-xdist is installed: the GPU tests' time is mostly single-threaded Triton JIT compiles),
# BENCH_TIMEOUT_S (per bench; default: a fair share of what is left). A failing or timed-out step is recorded and the suite goes on;
# benches write their JSON after every row, so a timeout keeps what was measured.
# Wheels carried in bench/wheels/*.whl (liger-kernel, cut-cross-entropy) are installed with
# --no-deps; nothing is downloaded.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/bench/results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# Step logs live outside $OUT: the device tool returns at most 8 files from $OUT, and those
# should be the JSON results, summary.md and one logs.txt holding every log's tail.
LOGS="${SUITE_LOGS:-$(mktemp -d /tmp/ple_fast_suite.XXXXXX)}"
mkdir -p "$LOGS"
BUDGET="${SUITE_BUDGET_S:-480}"
START=$(date +%s)
STATUS="$LOGS/status.tsv"
printf 'step\tstatus\tseconds\tlog\n' > "$STATUS"
# Always "$PY" -m pip, never a bare pip: on the GPU image `pip` belongs to another interpreter than
# the python that has torch (a hand-run `pip install -e .` there failed: no scikit_build_core).
PY="${PYTHON:-python}"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run_step NAME TIMEOUT_S CMD...: log to $OUT/logs/NAME.log, record status, never abort the suite
run_step() {
  local name="$1" limit="$2"; shift 2
  local log="$LOGS/$name.log" t0 rc status
  t0=$(date +%s)
  echo "== $name (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timeout(${limit}s)" ;;
    *) status="failed(rc=$rc)" ;;
  esac
  tail -n 5 "$log" | sed 's/^/   /'
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "logs.txt#$name" >> "$STATUS"
}

"$PY" - > "$LOGS/env.txt" 2>&1 <<'EOF'
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
EOF
if command -v nvidia-smi > /dev/null; then nvidia-smi >> "$LOGS/env.txt" 2>&1; fi

# 1. install: editable, no build isolation (compiles against the installed torch), no deps
run_step install 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
if ! "$PY" -c "import torch, ple_fast._C" > /dev/null 2>&1; then
  # the CUDA compile failed (see logs.txt#install): a CPU-only _C keeps every Python path and the
  # benches running, and pytest -m gpu then reports the CUDA ops' tests as skipped, not passed
  run_step install_cpu_ops 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
    -Ccmake.define.PLE_FAST_CUDA=OFF
fi
"$PY" -m ple_fast._ext >> "$LOGS/env.txt" 2>&1
# the toolchain that built _C, and whether libstdc++ code got linked into it (a static libstdc++ beside
# the process's shared one is one suspect of the 2026-11-28 crash that csrc/check.h works around)
{ c++ --version | head -n 1; nvcc --version | tail -n 2; cmake --version | head -n 1
  so="$("$PY" -c 'import torch, ple_fast._C as m; print(m.__file__)' 2>/dev/null)"
  if [[ -n "$so" ]]; then
    ls -la "$so"
    # libstdc++'s own stream/locale code defined inside _C (none in a local CUDA build) would mean a
    # second copy beside the process's libstdc++ (the crash's backtrace ran through such names)
    echo "stream/locale code defined in _C:"
    nm -D --defined-only -C "$so" 2>/dev/null | grep -E 'codecvt|_M_insert|locale::|basic_ostream<' | head -n 10
  fi
} >> "$LOGS/env.txt" 2>&1
shopt -s nullglob
wheels=(bench/wheels/*.whl)
if (( ${#wheels[@]} )); then
  run_step wheels 60 "$PY" -m pip install --no-deps --no-index "${wheels[@]}"
fi

# 2. the headline first: whole PLE iterations against the HF pipelines (bench_e2e), E2E_TIMEOUT_S at most;
# the bench skips what would not finish (pipelines in order, then the fit table) and writes after each row
if [[ -z "${SUITE_BENCHES:-}" || " ${SUITE_BENCHES} " == *" bench_e2e "* ]]; then
  e2e_limit="${E2E_TIMEOUT_S:-210}"
  export BENCH_DEADLINE=$(( $(date +%s) + e2e_limit - 10 ))
  # shellcheck disable=SC2086  # BENCH_ARGS* are deliberately word-split
  run_step bench_e2e "$e2e_limit" "$PY" bench/bench_e2e.py --out "$OUT" ${BENCH_ARGS:-} ${BENCH_ARGS_bench_e2e:-}
fi

# 3. GPU-marked tests (compiled Triton, CUDA ops)
# per-test limit where pytest-timeout is installed (it is on the GPU image): one hung test must not
# take the whole step's time
per_test=()
if "$PY" -c "import pytest_timeout" > /dev/null 2>&1; then per_test=(--timeout=90); fi
workers=()
if [[ "${PYTEST_WORKERS:-8}" != 0 ]] && "$PY" -c "import xdist" > /dev/null 2>&1; then
  workers=(-n "${PYTEST_WORKERS:-8}")
fi
# 180 s at most: most of it is Triton JIT-compiling each kernel variant the tests launch (a few s
# each, one core each, hence the workers); --durations shows where it went
if [[ "${SUITE_SKIP_TESTS:-0}" != 1 ]]; then
  run_step pytest_gpu "$(( $(left) < 180 ? ($(left) > 30 ? $(left) : 30) : 180 ))" \
    "$PY" -m pytest -q -m gpu ${SUITE_TESTS:-tests/} -p no:cacheprovider -p no:logging --tb=short --durations=15 \
    "${per_test[@]}" "${workers[@]}"
fi

# 4. every other bench, each with a fair share of the time left
benches=()
if [[ -n "${SUITE_BENCHES:-}" ]]; then
  for name in $SUITE_BENCHES; do [[ "$name" != bench_e2e ]] && benches+=("bench/$name.py"); done
else
  for bench in bench/bench_*.py; do [[ "$bench" != bench/bench_e2e.py ]] && benches+=("$bench"); done
fi
for i in "${!benches[@]}"; do
  bench="${benches[$i]}"
  name="$(basename "$bench" .py)"
  remaining=$(left)
  share=$(( remaining / (${#benches[@]} - i) ))
  limit="${BENCH_TIMEOUT_S:-$share}"
  if (( limit < 20 )); then
    printf '%s\t%s\t0\t-\n' "$name" "skipped(no time left)" >> "$STATUS"
    continue
  fi
  # benches may read BENCH_DEADLINE (epoch seconds; common.seconds_left) to stop in time
  export BENCH_DEADLINE=$(( $(date +%s) + limit - 10 ))
  own_args="BENCH_ARGS_$name"
  # shellcheck disable=SC2086  # BENCH_ARGS* are deliberately word-split
  run_step "$name" "$limit" "$PY" "$bench" --out "$OUT" ${BENCH_ARGS:-} ${!own_args:-}
done

# 5. markdown summary: step status + every JSON's rows
{
  echo "# GPU suite $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo '```'
  head -n 3 "$LOGS/env.txt"
  echo "commit ${SUITE_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo '```'
  echo
  echo "| step | status | seconds | log |"
  echo "|---|---|---|---|"
  tail -n +2 "$STATUS" | awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}'
  echo
  "$PY" "$REPO/bench/common.py" summarize "$OUT" || echo "(summary failed; see the JSON files)"
} > "$OUT/summary.md"
# the test log whole (up to 3000 lines: its failures are what the next session must read), the rest's tails
for log in "$LOGS"/env.txt "$LOGS"/*.log; do
  lines=200
  [[ "$(basename "$log")" == pytest_gpu.log ]] && lines=3000
  echo "===== $(basename "$log") (last $lines lines)"
  tail -n "$lines" "$log"
done > "$OUT/logs.txt"
echo "== wrote $OUT/summary.md and $OUT/logs.txt in $(( $(date +%s) - START ))s"
cat "$OUT/summary.md"
