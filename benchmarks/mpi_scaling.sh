#!/usr/bin/env bash
# MPI scaling on this machine: 1 process on 1 core versus 2 processes on 1
# core each (RINGATTN_NUM_THREADS=1, bound to cores), same run, same inputs
# sizes.  Prints a markdown table; raw JSON lines go to ${OUT:-results}/mpi_scaling.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results}
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 RINGATTN_NUM_THREADS=1 OMP_NUM_THREADS=1
: > "$out/mpi_scaling.jsonl"
for config in seed dense-causal; do
  lens=$([ "$config" = seed ] && echo 8192,16384,32768 || echo 4096,8192)
  for k in 1 2; do
    mpirun --bind-to core -n "$k" python benchmarks/bench_mpi.py --config "$config" --seq-lens "$lens" "$@" \
      | tee -a "$out/mpi_scaling.jsonl"
  done
done
python - "$out/mpi_scaling.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
one = {(r["config"], r["n"]): r for r in rows if r["ranks"] == 1}
print("\n| config | n | ranks | ms | speed-up vs 1 | peak MB/rank | peak vs 1 | MB sent/rank | plain ring MB sent/rank |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    b = one[(r["config"], r["n"])]
    print(f"| {r['config']} | {r['n']} | {r['ranks']} | {r['ms']:.0f} | {b['ms'] / r['ms']:.2f}x | "
          f"{r['peak_mb']:.1f} | {r['peak_mb'] / b['peak_mb']:.2f}x | {r['sent_mb']:.1f} | {r['plain_ring_sent_mb']:.1f} |")
PY
