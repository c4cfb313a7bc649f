#!/usr/bin/env bash
# The device check, run from the repo root on a GPU machine (the `device` tool):
#   bash benchmarks/gpu_check.sh [quick|full]
# One call: builds pdepth._C against that machine's own torch (never a build carried from
# elsewhere), runs the test suite but the tests marked slow (`make test`'s selection, which
# holds every CUDA case: op, errors, opcheck, every filter mode against fp32, streaming, depth,
# the store, extraction, the protocol and `pdepth score` on CUDA; the slow tier is end-to-end
# CLI runs on the CPU, 11 minutes on 2 cores; MARK="" runs it too), compute-sanitizer memcheck and racecheck on every kernel and filter mode, the GPU
# benchmark (every mode against the torch addmm+topk pipeline, memory) and the paper-scale
# k-NN stage; prints a table of the parts last. Logs go to $OUT.
#
# Budget (full, one H100; estimated, not yet run on a card): build ~90 s (the card's own arch
# only, 16 jobs; this 2-core machine takes ~8 min for two archs), the tests but the slow tier
# <= 240 s (timeout; the k-NN files alone took 371 s on 2 busy CPU cores here, the GPU cases
# are ~30 s of kernels), memcheck and racecheck run in the background during the tests
# (<= 240 s each, timeout), bench_gpu ~30 s (2 sizes x 6 methods x 6 runs at 0.02-0.1 s),
# the paper-scale stage ~40 s (8.75e14 flop at ~50 TFLOP/s in fp32, ~2 s of GEMM in bf16,
# plus the canonical keys). Typical ~6 min, worst case (every timeout) ~9.5 min.
# quick: build, the k-NN test files, bench_gpu --quick, no sanitizer, no paper-scale stage.
set -uo pipefail
mode="${1:-full}"
case "$mode" in quick|full) ;; *) echo "usage: $0 [quick|full]"; exit 2 ;; esac
OUT="${OUT:-/tmp/pdepth-gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS="${MAX_JOBS:-16}"
# The card's own arch only (the CPU-side CI compiles 8.0 and 9.0); override to test both.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)"
fi
export TORCH_CUDA_ARCH_LIST
# The device image's default C++ compiler (/opt/gcc) puts its own static libstdc++ into the
# extension; formatting any error message (an ostream insert of a number) then segfaults
# against the process's libstdc++ (seen 2026-11-27 under cuda-gdb). Use the system compiler.
if [ -x /usr/bin/g++ ] && [ -z "${PDEPTH_KEEP_CXX:-}" ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
fi
status=0
declare -a rows=()
part() {  # part NAME RC SECONDS DETAIL: one row of the final table
  rows+=("$(printf '%-14s %-5s %5ss  %s' "$1" "$([ "$2" = 0 ] && echo ok || echo "FAIL($2)")" "$3" "$4")")
  [ "$2" = 0 ] || status=1
}
now() { date +%s; }

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
echo "CXX=${CXX:-default} ($(${CXX:-c++} --version | head -1)); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

echo "== build (FORCE_CUDA=1, archs $TORCH_CUDA_ARCH_LIST)"
rm -rf build pdepth/_C*.so
t0=$(now)
if ! FORCE_CUDA=1 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
part build 0 $(( $(now) - t0 )) "$(grep -c -i 'warning' "$OUT/build.log") warning lines"
"$PY" -c "import pdepth; print(pdepth.build_info(), pdepth.backend('cuda'))"

sanitize() {  # sanitize TOOL: compute-sanitizer on the small case of every kernel and mode
  PYTHONPATH="$PWD" timeout 240 compute-sanitizer --tool "$1" --error-exitcode 9 \
    "$PY" benchmarks/_sanitize_case.py > "$OUT/sanitize_$1.log" 2>&1
  echo $? > "$OUT/sanitize_$1.rc"
}
declare -A san_t0=()
if [ "$mode" = full ]; then
  if command -v compute-sanitizer > /dev/null; then
    echo "== compute-sanitizer memcheck and racecheck (background, during the tests)"
    for tool in memcheck racecheck; do
      san_t0[$tool]=$(now)
      sanitize "$tool" &
    done
  else
    part sanitizer 1 0 "compute-sanitizer not on PATH ($CUDA_HOME/bin)"
  fi
  TESTS="${TESTS:-tests}"
  MARK="${MARK-not slow}"
  TEST_TIMEOUT="${TEST_TIMEOUT:-240}"
else
  TESTS="${TESTS:-tests/test_knn.py tests/test_knn_errors.py tests/test_knn_opcheck.py tests/test_knn_filter.py tests/test_knn_cuda.py tests/test_build.py}"
  MARK="${MARK-}"
  TEST_TIMEOUT="${TEST_TIMEOUT:-150}"
fi
echo "== tests ($TESTS, -m '$MARK'; timeout ${TEST_TIMEOUT}s)"
t0=$(now)
# shellcheck disable=SC2086
timeout "$TEST_TIMEOUT" "$PY" -m pytest -q -p no:cacheprovider -rs --durations=10 -m "$MARK" $TESTS \
  > "$OUT/tests.log" 2>&1
test_rc=$?
tail -30 "$OUT/tests.log"
summary="$(grep -E ' (passed|failed)' "$OUT/tests.log" | tail -1)"
skipped_cuda="$(grep -c -i 'SKIPPED.*cuda' "$OUT/tests.log")"
part tests "$test_rc" $(( $(now) - t0 )) "${summary:-no summary}; $skipped_cuda CUDA skip lines"

wait  # the sanitizers
for tool in "${!san_t0[@]}"; do
  part "$tool" "$(cat "$OUT/sanitize_$tool.rc" 2>/dev/null || echo 99)" \
    $(( $(now) - ${san_t0[$tool]} )) \
    "$(grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log") (wall incl. waiting)"
  tail -2 "$OUT/sanitize_$tool.log"
done

echo "== bench_gpu ($mode)"
bench_args=(--json "$OUT/bench_gpu.json")
[ "$mode" = quick ] && bench_args+=(--quick)
t0=$(now)
timeout 120 "$PY" benchmarks/bench_gpu.py "${bench_args[@]}" > "$OUT/bench.txt" 2>&1
rc=$?
cat "$OUT/bench.txt"
part bench_gpu "$rc" $(( $(now) - t0 )) "see the table above ($OUT/bench.txt)"

if [ "$mode" = full ]; then
  echo "== paper-scale k-NN stage (ResNet-18 unpooled probe widths, 60,000 x 30,000)"
  t0=$(now)
  timeout 150 "$PY" benchmarks/bench_gpu.py --paper-scale --filters fp32,bf16 \
    --json "$OUT/paper_scale.json" \
    > "$OUT/paper_scale.txt" 2>&1
  rc=$?
  cat "$OUT/paper_scale.txt"
  part paper_scale "$rc" $(( $(now) - t0 )) "$(tail -1 "$OUT/paper_scale.txt")"
fi

echo
echo "== gpu_check $mode: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
printf '%s\n' "${rows[@]}"
echo "overall status=$status"
exit $status
