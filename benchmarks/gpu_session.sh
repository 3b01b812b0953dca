#!/usr/bin/env bash
# The GPU session: what one lent GPU must measure, most valuable first, in at most 8 minutes
# (a lent H200 gives 15 minutes of device time in all, its start-up included). From the
# repository root:
#   1. ninja present? then the in-place build for sm_90 with every core
#   2. the CUDA tests: tests/test_cuda.py and the cuda entries of the backend-parametrised tests
#      (tests/test_paged.py's included: the paged kernel's first run; softcap, sinks and the
#      8-bit selection cache: tests/test_softmax_variants.py and tests/test_int8_key_t.py, small
#      shapes)
#   3. benchmarks/profile_stages.py: kernel time per call at B=1, S=32K and 128K
#   4. benchmarks/bench_attention.py: B 1/8, Hq 32, Hkv 8, D 128, S 4K/32K/128K, bf16, against
#      the best SDPA backend, eager and then with CUDA graphs (JSON written after every shape);
#      benchmarks/bench_paged.py: paged_attention against attention at B 8, S 32K (into bench.log)
#   5. compute-sanitizer memcheck on benchmarks/sanitizer_case.py; synccheck, initcheck and
#      racecheck while time remains
# Each step has its own time limit, and none runs past the session's budget (SESSION_BUDGET_S,
# default 470 s). Results go flat into $OUT (the device tool's output folder; default
# ./gpu_out), at most 8 files: session.log, build.log, pytest.log, profile.log, bench.log,
# bench_attention_<tag>_eager.json, bench_attention_<tag>_graphs.json, sanitizer.log.
# SPARQ_COMMIT names the commit in session.log where the tree travels without .git.
#
# --dry-run (or SPARQ_GPU_SESSION_DRY_RUN=1): the whole session here, without a GPU: the build
# and compute-sanitizer commands are echoed, the CUDA tests collected, and the Python steps run
# on the CPU at tiny shapes (tests/test_benchmarks.py runs it).
# Exit status: the number of failed steps.
set -u -o pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" || "${SPARQ_GPU_SESSION_DRY_RUN:-0}" == "1" ]]; then DRY=1; fi
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${SESSION_BUDGET_S:-470}
FAILED=0
LOG="$OUT/session.log"
TAG=$([[ $DRY == 1 ]] && echo dry || echo cuda)
DEVICE=$([[ $DRY == 1 ]] && echo cpu || echo cuda)

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# run_step NAME LOGFILE MAX_SECONDS CMD...: CMD under min(MAX, time left - 5) seconds.
run_step() {
  local name=$1 log=$2 max=$3; shift 3
  local limit; limit=$(( $(left) - 5 ))
  (( limit > max )) && limit=$max
  if (( limit < 10 )); then say "SKIP $name (no time left)"; FAILED=$((FAILED + 1)); return 1; fi
  say "START $name (limit ${limit}s): $*"
  echo "### $name: $*" >> "$log"
  timeout --signal=TERM --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$log" | tail -n 8
  local rc=${PIPESTATUS[0]}
  if (( rc == 0 )); then say "PASS $name"; else say "FAIL $name (rc=$rc; 124 = timed out)"; FAILED=$((FAILED + 1)); fi
  return "$rc"
}

{
  echo "session: $([[ $DRY == 1 ]] && echo 'DRY RUN (no GPU; build and sanitizer echoed)' || echo GPU)"
  echo "commit: ${SPARQ_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" || true
  command -v nvcc && nvcc --version | tail -n 1
  echo "cores: $(nproc)"
} >> "$LOG" 2>&1

# 1. Build. Without ninja, torch builds one file at a time: say so first.
run_step ninja "$OUT/build.log" 20 "$PY" -c "from torch.utils.cpp_extension import is_ninja_available as ok; import sys; ok() or sys.exit('ninja is missing: the build would compile one file at a time')"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)"
PIP_CUDA_INCLUDE=$("$PY" -c "import glob, os, nvidia; print(':'.join(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], 'cu*', 'include')))))" 2>/dev/null || true)
export CPATH="${PIP_CUDA_INCLUDE}${CPATH:+:$CPATH}"  # cusparse.h and friends from pip's nvidia/cu13
BUILD=("$PY" setup.py build_ext --inplace)
if (( DRY )); then BUILD=(echo "[dry run] CUDA_HOME=$CUDA_HOME MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST CPATH=$CPATH" "${BUILD[@]}"); fi
if ! run_step build "$OUT/build.log" 240 "${BUILD[@]}"; then
  say "build failed: the remaining steps would test the pure-torch fallback; stopping"
  exit "$FAILED"
fi
if ! run_step import "$OUT/build.log" 60 "$PY" -c "import sparq_ext; assert sparq_ext.has_native_kernel('$DEVICE'), f'no native $DEVICE kernel: {sparq_ext.extension_error}'; print('native $DEVICE kernel registered')"; then
  say "the native kernels are not in use: the remaining steps would test the fallback; stopping"
  exit "$FAILED"
fi

# 2. The CUDA tests (the slow long-cache ones too); a per-test limit where pytest-timeout is there.
TESTS=(tests/test_cuda.py tests/test_backends.py tests/test_semantics.py tests/test_paged.py
       tests/test_softmax_variants.py tests/test_int8_key_t.py tests/test_component_weights.py -k cuda)
PER_TEST=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout=90)
if (( DRY )); then
  run_step tests "$OUT/pytest.log" 60 env SPARQ_EXT_REQUIRE_NATIVE=cpu "$PY" -m pytest -q --collect-only -p no:cacheprovider "${TESTS[@]}"
else
  run_step tests "$OUT/pytest.log" 170 env SPARQ_EXT_REQUIRE_NATIVE=cpu,cuda "$PY" -m pytest -q -rfEs --durations=10 -p no:cacheprovider "${PER_TEST[@]}" "${TESTS[@]}"
fi

# 3. Kernel time per call, grouped by kernel name, beside SDPA.
if (( DRY )); then SHAPE=(--query-heads 4 --kv-heads 2 --head-dim 32 --seq 1024 --dtype fp32 --iters 2)
else SHAPE=(--seq 32768 131072); fi
run_step profile "$OUT/profile.log" 75 "$PY" benchmarks/profile_stages.py --device "$DEVICE" --batch 1 "${SHAPE[@]}"

# 4. The focused benchmark: eager, then CUDA graphs (no launch gaps).
if (( DRY )); then GRID=(--batch 1 --query-heads 4 --kv-heads 2 --head-dim 32 --seq-lens 256 --dtypes fp32 --repeats 2 --warmup 1 --bandwidth-mib 16 --cache warm)
else GRID=(--batch 1 8 --query-heads 32 --kv-heads 8 --head-dim 128 --seq-lens 4096 32768 131072 --dtypes bf16); fi
BENCH=("$PY" benchmarks/bench_attention.py --device "$DEVICE" "${GRID[@]}" --ratios 8 --no-seed --no-plot --out "$OUT")
run_step bench_eager "$OUT/bench.log" 110 "${BENCH[@]}" --tag "${TAG}_eager"
run_step bench_graphs "$OUT/bench.log" 110 "${BENCH[@]}" --cuda-graphs --tag "${TAG}_graphs"
if (( DRY )); then PAGED=(--device cpu --batch 1 --query-heads 4 --kv-heads 2 --head-dim 32 --seq 1024 --dtype fp32 --iters 2)
else PAGED=(--device cuda); fi
run_step bench_paged "$OUT/bench.log" 20 "$PY" benchmarks/bench_paged.py "${PAGED[@]}"

# 5. compute-sanitizer last: memcheck, then the other tools while time remains. No caching
#    allocator, so every workspace is its own allocation and overruns hit its edge.
SAN=""
for c in "$(command -v compute-sanitizer || true)" "$CUDA_HOME/bin/compute-sanitizer" \
         "$CUDA_HOME/compute-sanitizer/compute-sanitizer"; do
  if [[ -n "$c" && -x "$c" ]]; then SAN=$c; break; fi
done
sanitize() {  # sanitize TOOL MAX_SECONDS [sanitizer_case.py options]
  local tool=$1 max=$2; shift 2
  local cmd=("${SAN:-compute-sanitizer}" --tool "$tool" --error-exitcode 99 --print-limit 20 "$PY" benchmarks/sanitizer_case.py "$@")
  if (( DRY )); then
    echo "[dry run] would run: PYTORCH_NO_CUDA_MEMORY_CACHING=1 ${cmd[*]}" >> "$OUT/sanitizer.log"
    run_step "$tool" "$OUT/sanitizer.log" "$max" "$PY" benchmarks/sanitizer_case.py --device cpu "$@"
  elif [[ -n "$SAN" ]]; then
    run_step "$tool" "$OUT/sanitizer.log" "$max" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${cmd[@]}"
  else
    say "SKIP $tool: compute-sanitizer not found (PATH, \$CUDA_HOME)"; FAILED=$((FAILED + 1))
  fi
}
sanitize memcheck 100
sanitize synccheck 60 --quick
sanitize initcheck 60 --quick
sanitize racecheck 60 --quick

say "done: $FAILED step(s) failed; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$FAILED"
