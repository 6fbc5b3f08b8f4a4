#!/usr/bin/env bash
# One command for a GPU machine (no network needed):
#
#   bash benchmarks/gpu_check.sh            # results under $OUT (default ./gpu_results)
#
#  1. build with plain meson + ninja, CUDA on (-Dcuda=enabled), into build-gpu/
#     (meson-python is not needed: the package is staged from the build dir);
#  2. meson test (the C tests, tests/c/test_cuda.c among them);
#  3. stops here, with a clear message, when no CUDA device is visible;
#  4. pytest tests/test_gpu.py and the device-array tests against the staged build;
#  5. benchmarks/bench_gpu.py: dense attention vs torch SDPA (flash), the seed's
#     dilated configuration vs a PyTorch implementation, the one-GPU ring at k=1..8.
#
# Everything (logs, bench.json, table.txt, summary.txt) goes to $OUT; the
# table is printed last.  Exit status: 0 when every step passed, 1 when the
# build, a test step or the benchmark failed (what ran is still reported), 2
# when no GPU is visible (0 with RINGATTN_ALLOW_NO_GPU=1).
#
# Knobs: PYTHON (default python3), RINGATTN_GPU_BUILDDIR (build-gpu),
# RINGATTN_CUDA (enabled), BENCH_BUDGET (seconds, 150), SKIP_BUILD=1,
# SKIP_BENCH=1, PYTEST_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
# shellcheck source=benchmarks/stage.sh
. benchmarks/stage.sh
check_paths gpu_results
status=0

say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/summary.txt"; }
finish() {
  say "exit status $1"
  if [ -s "$OUT/table.txt" ]; then
    echo
    cat "$OUT/table.txt"
  fi
  exit "$1"
}

say "repo $REPO, python $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1)), out $OUT"
gpu_info
command -v nvcc >/dev/null && say "nvcc: $(nvcc --version | tail -1)"

# ------------------------------------------------------------------ build
find_meson || finish 1
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  build_gpu true || finish 1
fi

# stage: the package's .py files and the built extension, importable from $STAGE
stage_ringattn "$BUILD" "$STAGE" || finish 1
report_import "$OUT" "$STAGE"
# the tests that exercise device arrays (the GPU tests, and protocol tests that run anywhere)
shopt -s nullglob
device_tests=("$REPO"/tests/test_gpu.py "$REPO"/tests/test_device_*.py "$REPO"/tests/test_intake_*.py
              "$REPO"/tests/test_dlpack_export.py "$REPO"/tests/test_raw_pointers.py
              "$REPO"/tests/test_call_sequence.py "$REPO"/tests/test_bf16_helpers.py)
shopt -u nullglob
ngpu=$(cd "$OUT" && "$PY" -c "import ringattn; print(ringattn.cuda_device_count())" 2>/dev/null || echo 0)

# ------------------------------------------------------------------ C tests
say "meson test"
(cd "$REPO" && timeout 240 "${MESON[@]}" test -C "$BUILD" --print-errorlogs) >"$OUT/meson_test.log" 2>&1
rc=$?
grep -E '^ *[0-9]+/[0-9]+ ' "$OUT/meson_test.log" | sed 's/^/  /' | tee -a "$OUT/summary.txt"
if [ $rc -ne 0 ]; then
  say "FAIL: meson test (exit $rc); see meson_test.log"
  status=1
else
  say "meson test OK"
fi

# ------------------------------------------------------------------ GPU?
if [ "${ngpu:-0}" = 0 ]; then
  say "NO CUDA DEVICE visible (ringattn.cuda_device_count() == 0): stopping after the build and the C tests."
  say "tests/test_gpu.py and the benchmarks need a GPU; the array-protocol tests run anywhere."
  if [ "${RINGATTN_ALLOW_NO_GPU:-0}" = 1 ] || [ $status -ne 0 ]; then finish $status; fi
  finish 2
fi

# ------------------------------------------------------------------ pytest
say "pytest ${device_tests[*]#$REPO/}"
# shellcheck disable=SC2086  # PYTEST_ARGS is split into words on purpose
(cd "$OUT" && timeout 300 "$PY" -m pytest -p no:cacheprovider -q -rs ${PYTEST_ARGS:-} \
   "${device_tests[@]}") >"$OUT/pytest.log" 2>&1
rc=$?
tail -1 "$OUT/pytest.log" | sed 's/^/  /' | tee -a "$OUT/summary.txt"
if [ $rc -ne 0 ]; then
  grep -E '^(FAILED|ERROR)' "$OUT/pytest.log" | head -30 | sed 's/^/  /' | tee -a "$OUT/summary.txt"
  say "FAIL: pytest (exit $rc); see pytest.log"
  status=1
else
  say "pytest OK"
fi

# ------------------------------------------------------------------ benchmarks
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  say "bench_gpu.py (budget ${BENCH_BUDGET:-150} s)"
  (cd "$OUT" && timeout $(( ${BENCH_BUDGET:-150} + 120 )) "$PY" "$REPO/benchmarks/bench_gpu.py" \
     --budget "${BENCH_BUDGET:-150}" --json "$OUT/bench.json" --table "$OUT/table.txt") >"$OUT/bench.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    tail -30 "$OUT/bench.log"
    say "FAIL: bench_gpu.py (exit $rc); see bench.log"
    status=1
  else
    say "bench OK"
  fi
fi
finish $status
