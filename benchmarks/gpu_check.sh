#!/usr/bin/env bash
# The device check, run from the repo root on a GPU machine (the `device` tool):
#   bash benchmarks/gpu_check.sh [quick|full]
# Builds pdepth._C against that machine's own torch (never a build carried from elsewhere),
# runs the whole test suite (CUDA cases included), compute-sanitizer on a small CUDA case
# when available, then the GPU benchmark; prints a short table last. Logs go to $OUT.
set -uo pipefail
mode="${1:-full}"
OUT="${OUT:-/tmp/pdepth-gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
# The device image's default C++ compiler (/opt/gcc) puts its own static libstdc++ into the
# extension; formatting any error message (an ostream insert of a number) then segfaults
# against the process's libstdc++ (seen 2026-11-27 under cuda-gdb). Use the system compiler.
if [ -x /usr/bin/g++ ] && [ -z "${PDEPTH_KEEP_CXX:-}" ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
fi
status=0

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
echo "CXX=${CXX:-default} ($(${CXX:-c++} --version | head -1))"

echo "== build (FORCE_CUDA=1, archs $TORCH_CUDA_ARCH_LIST)"
rm -rf build pdepth/_C*.so
t0=$(date +%s)
if ! FORCE_CUDA=1 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "built in $(( $(date +%s) - t0 ))s"
"$PY" -c "import pdepth; print(pdepth.build_info())"

echo "== tests (${TESTS:=tests/test_knn.py tests/test_knn_errors.py tests/test_knn_opcheck.py tests/test_knn_filter.py tests/test_build.py})"
# shellcheck disable=SC2086
"$PY" -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tee "$OUT/tests.log" | tail -25
test_rc=${PIPESTATUS[0]}
[ "$test_rc" = 0 ] || status=1

if command -v compute-sanitizer > /dev/null && [ "$mode" = full ]; then
  echo "== compute-sanitizer (memcheck, racecheck) on a small CUDA case"
  for tool in memcheck racecheck; do
    PYTHONPATH="$PWD" timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$PY" benchmarks/_sanitize_case.py \
      > "$OUT/sanitize_$tool.log" 2>&1
    rc=$?
    echo "$tool: rc=$rc $(grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log")"
    [ "$rc" = 0 ] || status=1
  done
fi

echo "== benchmark"
bench_args=()
[ "$mode" = quick ] && bench_args+=(--quick)
"$PY" benchmarks/bench_gpu.py "${bench_args[@]}" 2>&1 | tee "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "== gpu_check: tests rc=$test_rc, overall status=$status"
exit $status
