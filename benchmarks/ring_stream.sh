#!/usr/bin/env bash
# Streamed ring buffers (ring/stream.c) against whole blocks, same run:
# RINGATTN_RING_SUB_BLOCKS=1 (whole blocks: the previous path) and the CPU
# default (8 sub-blocks) alternate for ${ROUNDS:-6} rounds; every time is the
# minimum over the rounds and the repeats inside them, so that a loaded
# machine hurts both alike.  In-process (ring_memory.py --timing: dense causal
# at k = 2, 4 and the seed configuration at k = 4, where a branch spans ranks)
# and MPI (bench_mpi.py, 2 processes, dense causal and seed).  Prints a
# markdown table; raw JSON lines go to ${OUT:-results}/ring_stream.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results}
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
: > "$out/ring_stream.jsonl"
for round in $(seq "${ROUNDS:-6}"); do
  for sub in 1 8; do
    RINGATTN_RING_SUB_BLOCKS=$sub python benchmarks/ring_memory.py --timing --repeat "${REPEAT:-3}" \
      | grep '"ring_timing"' | sed "s/\"sub_blocks\": \"[^\"]*\"/\"sub_blocks\": \"$sub\"/" >> "$out/ring_stream.jsonl"
    for config in dense-causal seed; do
      lens=4096  # the seed's 4096-segment branch spans the 2 ranks only while n < 8192
      RINGATTN_RING_SUB_BLOCKS=$sub RINGATTN_NUM_THREADS=1 OMP_NUM_THREADS=1 \
        mpirun -x RINGATTN_RING_SUB_BLOCKS -x RINGATTN_NUM_THREADS --oversubscribe -n 2 \
        python benchmarks/bench_mpi.py --config "$config" --seq-lens "$lens" --repeat "${REPEAT:-3}" \
        | grep '^{' | sed "s/^{/{\"bench\": \"mpi\", \"sub_blocks\": \"$sub\", /" >> "$out/ring_stream.jsonl"
    done
  done
done
python - "$out/ring_stream.jsonl" <<'PY'
import json, sys
best = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    transport = "in-process" if r["bench"] == "ring_timing" else "MPI"
    key = (transport, r["config"], r["n"], r["ranks"])
    cur = best.setdefault(key, {})
    sub = r["sub_blocks"]
    old = cur.get(sub, (float("inf"), 0, float("inf")))
    cur[sub] = (min(old[0], r["ms"]), r["peak_mb"], min(old[2], r.get("cpu_ms", float("inf"))))
print("\n| transport | config | n | ranks | ms whole blocks | ms 8 sub-blocks | time ratio | CPU ms whole | CPU ms sub-blocks | CPU ratio | peak MB whole | peak MB sub-blocks | peak ratio |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for (t, c, n, k), v in sorted(best.items()):
    (a, pa, ca), (b, pb, cb) = v["1"], v["8"]
    cpu = f"{ca:.0f} | {cb:.0f} | {cb / ca:.3f}" if ca < float("inf") else "- | - | -"
    print(f"| {t} | {c} | {n} | {k} | {a:.0f} | {b:.0f} | {b / a:.3f} | {cpu} | {pa:.1f} | {pb:.1f} | {pb / pa:.3f} |")
PY
