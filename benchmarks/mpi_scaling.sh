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
# seed and dense causal with both partitions; GQA (32 query heads) with 32
# and 8 key/value heads (dense causal, zigzag): bytes and time.
run() { # config partition kv_heads lens
  for k in 1 2; do
    mpirun --bind-to core -n "$k" python benchmarks/bench_mpi.py --config "$1" --partition "$2" \
      ${3:+--kv-heads "$3"} --seq-lens "$4" "${extra[@]}" | tee -a "$out/mpi_scaling.jsonl"
  done
}
extra=("$@")
for partition in contiguous zigzag; do
  run seed "$partition" "" "${SEED_LENS:-8192,16384,32768}"
  run dense-causal "$partition" "" "${DENSE_LENS:-4096,8192}"
done
for kv in 32 8; do run gqa zigzag "$kv" "${GQA_LENS:-4096}"; done
python - "$out/mpi_scaling.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
key = lambda r: (r["config"], r["partition"], r["kv_heads"], r["n"])
one = {key(r): r for r in rows if r["ranks"] == 1}
print("\n| config | partition | heads (kv) | n | ranks | ms | speed-up vs 1 | peak MB/rank | peak vs 1 | MB sent/rank |"
      " plain ring MB sent/rank |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    b = one[key(r)]
    print(f"| {r['config']} | {r['partition']} | {r['heads']} ({r['kv_heads']}) | {r['n']} | {r['ranks']} | "
          f"{r['ms']:.0f} | {b['ms'] / r['ms']:.2f}x | {r['peak_mb']:.1f} | {r['peak_mb'] / b['peak_mb']:.2f}x | "
          f"{r['sent_mb']:.1f} | {r['plain_ring_sent_mb']:.1f} |")
PY
# Per-rank peak of dense attention, in-process ring, k = 1, 2, 4, 8: units of
# n/k and the ratio to k = 1 (ring/stream.c; target at most 1.2/k).
python benchmarks/ring_memory.py --memory | tee -a "$out/mpi_scaling.jsonl" | grep -v '^{'
