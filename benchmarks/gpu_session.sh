#!/usr/bin/env bash
# One unattended GPU session for the CUDA backend (run from the repository root):
#   build (sm_90) -> CUDA tests -> compute-sanitizer memcheck + racecheck on a small case
#   -> latency sweep (benchmarks/bench_attention.py, written by the lead) -> per-kernel profile.
# Every log and JSON goes flat into $OUT (default ./gpu_out): session.log, build.log,
# pytest.log, sanitizer.log, bench.log, plus what the sweep writes (keep it to <= 3 files).
# Ends within 9 minutes: each step has its own time limit, and later steps get what is left.
# Exit status: 0 when every step passed, else the number of failed steps.
set -u -o pipefail

OUT="${OUT:-$PWD/gpu_out}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, for the scripts
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${SESSION_BUDGET_S:-530}  # 9 min minus margin for the copy-back
PY=${PYTHON:-python}
FAILED=0
LOG="$OUT/session.log"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# run_step NAME LOGFILE MAX_SECONDS CMD...: runs with min(MAX, time left - 5) seconds.
run_step() {
  local name=$1 log=$2 max=$3; shift 3
  local limit; limit=$(left); limit=$(( limit - 5 ))
  (( limit > max )) && limit=$max
  if (( limit < 10 )); then say "SKIP $name (no time left)"; FAILED=$((FAILED + 1)); return 1; fi
  say "START $name (limit ${limit}s): $*"
  echo "### $name: $*" >> "$log"
  timeout --signal=TERM --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$log" | tail -n 5
  local rc=${PIPESTATUS[0]}
  if (( rc == 0 )); then say "PASS $name"; else say "FAIL $name (rc=$rc; 124 = timed out)"; FAILED=$((FAILED + 1)); fi
  return $rc
}

{
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) dirty"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" || true
  command -v nvcc && nvcc --version | tail -n 1
  command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer || true
} >> "$LOG" 2>&1

# 1. Build in place for sm_90 (the machine's GPU), all cores.
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
BUILD_START=$(date +%s)
if ! run_step build "$OUT/build.log" 300 "$PY" setup.py build_ext --inplace; then
  say "build failed: the remaining steps would test the pure-torch fallback; stopping"
  exit $FAILED
fi
say "build took $(( $(date +%s) - BUILD_START ))s"
if ! run_step import "$OUT/build.log" 60 "$PY" -c "import sparq_ext, torch; assert sparq_ext.extension_error is None, sparq_ext.extension_error; assert sparq_ext.has_native_kernel('cuda'), 'no CUDA kernel registered'; print('native cuda kernel registered on', torch.cuda.get_device_name())"; then
  say "the CUDA kernels are not in use: the remaining steps would test the fallback; stopping"
  exit $FAILED
fi

# 2. Tests: the shared math (CPU) and everything marked cuda.
run_step test_shared_math "$OUT/pytest.log" 60 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_shared_math.py
run_step test_cuda "$OUT/pytest.log" 200 "$PY" -m pytest -q -rs --durations=10 -p no:cacheprovider -m cuda tests

# 3. compute-sanitizer on a small case. No caching allocator, so every workspace is its own
#    allocation and out-of-bounds accesses are caught at the workspace's edge.
SAN=""
for c in "$(command -v compute-sanitizer || true)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
         "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer" \
         /usr/local/cuda-*/compute-sanitizer/compute-sanitizer; do
  if [[ -n "$c" && -x "$c" ]]; then SAN=$c; break; fi
done
if [[ -n "$SAN" ]]; then
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  run_step memcheck "$OUT/sanitizer.log" 100 "$SAN" --tool memcheck --error-exitcode 99 --print-limit 20 "$PY" benchmarks/sanitizer_case.py
  run_step racecheck "$OUT/sanitizer.log" 80 "$SAN" --tool racecheck --racecheck-report hazard --error-exitcode 99 --print-limit 20 "$PY" benchmarks/sanitizer_case.py --quick
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
else
  say "SKIP memcheck/racecheck: compute-sanitizer not found (PATH, \$CUDA_HOME, /usr/local/cuda*)"
  FAILED=$((FAILED + 1))
fi

# 4. Latency sweep (JSON and plot into $OUT).
if [[ -f benchmarks/bench_attention.py ]]; then
  run_step bench "$OUT/bench.log" 330 "$PY" benchmarks/bench_attention.py --device cuda --out "$OUT"
else
  say "SKIP bench: benchmarks/bench_attention.py is not in this checkout"
fi

# 5. Per-kernel breakdown (torch.profiler), appended to bench.log.
run_step profile "$OUT/bench.log" 90 "$PY" benchmarks/profile_stages.py

say "done: $FAILED step(s) failed; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $FAILED
