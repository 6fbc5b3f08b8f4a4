#!/usr/bin/env bash
# The multi-process NCCL ring on one GPU (issue 17), one command, no network:
#
#   OUT=/some/dir bash benchmarks/nccl_check.sh [nccl_ring.py options]
#
#  1. builds the package with meson + ninja (-Dcuda=enabled) into build-gpu/,
#     the directory benchmarks/gpu_check.sh uses (an earlier build is reused),
#     and stages it on PYTHONPATH as gpu_check.sh does (SKIP_BUILD=1: use the
#     staged or installed ringattn as it is);
#  2. benchmarks/nccl_ring.py: prints the NCCL version ringattn loads (and
#     torch's); with NCCL < 2.30 and RINGATTN_NCCL_LIBRARY unset it uses a
#     carried build at build-nccl/lib/libnccl.so.2 (docs/gpu.md), else stops
#     with exit status 3; then k = 2 and 4 processes on GPU 0 with
#     NCCL_MULTI_RANK_GPU_ENABLE=1: forward/backward against one rank, per-rank
#     memory and bytes, mismatched calls, an absent rank, timings.
#
# $OUT (default ./gpu_results/nccl) gets summary.txt, nccl_ring.log, nccl.json,
# nccl_table.txt and one log per rank (NCCL's output included); the table is
# printed last.  Exit status: 0 passed, 1 a check failed or hung, 2 no GPU,
# 3 NCCL too old, 124 the whole check ran past NCCL_CHECK_BUDGET seconds.
#
# Knobs: PYTHON, RINGATTN_GPU_BUILDDIR (build-gpu), SKIP_BUILD=1, DRY_RUN=1
# (no build, no GPU: nccl_ring.py --dry-run), NCCL_CHECK_BUDGET (seconds for
# the whole check, 270), NCCL_DEBUG (INFO, into the per-rank logs), RINGATTN_NCCL_LIBRARY.
set -uo pipefail
if [ -z "${NCCL_CHECK_INNER:-}" ]; then  # the whole check under one timeout
  export NCCL_CHECK_INNER=1
  exec timeout --kill-after=15 "${NCCL_CHECK_BUDGET:-270}" bash "$0" "$@"
fi
cd "$(dirname "$0")/.." || exit 1
# shellcheck source=benchmarks/stage.sh
. benchmarks/stage.sh
check_paths gpu_results/nccl

say() { echo "[nccl_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/summary.txt"; }
# seconds left for a step (at least 5: `timeout 0` would mean no limit)
left() { local s=$(( ${NCCL_CHECK_BUDGET:-270} - ($(date +%s) - T0) - 10 )); echo $(( s < 5 ? 5 : s )); }

say "repo $REPO, python $PY, out $OUT"
gpu_info
"$PY" -m pip show nvidia-nccl-cu13 nvidia-nccl-cu12 torch 2>/dev/null | grep -E '^(Name|Version)' \
  | paste - - | sed 's/^/  /' | tee -a "$OUT/summary.txt"

if [ "${DRY_RUN:-0}" != 1 ] && [ "${SKIP_BUILD:-0}" != 1 ]; then
  build_gpu false "$(left)" || exit 1
  stage_ringattn "$BUILD" "$STAGE" || exit 1
  report_import "$OUT" "$STAGE"
fi

args=(--out "$OUT" --json "$OUT/nccl.json" --table "$OUT/nccl_table.txt" --budget "$(( $(left) > 15 ? $(left) - 10 : 5 ))")
[ "${DRY_RUN:-0}" = 1 ] && args+=(--dry-run)
say "nccl_ring.py ${args[*]} $* (timeout $(left) s)"
# the children are spawned from here: run from $OUT so that a ringattn/ in the
# repository root cannot shadow the staged package
(cd "$OUT" && timeout --kill-after=10 "$(left)" "$PY" -u "$REPO/benchmarks/nccl_ring.py" "${args[@]}" "$@") \
  >"$OUT/nccl_ring.log" 2>&1
rc=$?
grep -E '^(nccl probe|STOP|k = |baseline:|NO CUDA|cannot)' "$OUT/nccl_ring.log" | sed 's/^/  /' | tee -a "$OUT/summary.txt"
case $rc in
  0) say "nccl_ring OK" ;;
  2) say "NO CUDA DEVICE visible" ;;
  3) say "STOPPED: NCCL older than 2.30 and no newer library (exit 3); see nccl_ring.log" ;;
  124|137) say "FAIL: nccl_ring.py ran past its timeout (exit $rc)"; tail -20 "$OUT/nccl_ring.log" ;;
  *) say "FAIL: nccl_ring.py (exit $rc)"; tail -20 "$OUT/nccl_ring.log" ;;
esac
say "exit status $rc"
if [ -s "$OUT/nccl_table.txt" ]; then
  echo
  cat "$OUT/nccl_table.txt"
fi
exit $rc
