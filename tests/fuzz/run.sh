#!/usr/bin/env bash
# Build the libFuzzer target tests/fuzz/fuzz_plan.c from the core's sources
# (CPU only: no CUDA, MPI or OpenMP) with clang -fsanitize=fuzzer,address,
# undefined, and run it for a bounded time:
#
#   bash tests/fuzz/run.sh [SECONDS]        (default 60)
#
# Exits non-zero when the fuzzer finds a crash, a sanitizer report or a
# broken invariant (the reproducer is left in build-fuzz/; rerun it with
# `build-fuzz/fuzz_plan build-fuzz/crash-...`).  Needs clang with
# libclang_rt.fuzzer (Debian/Ubuntu: apt-get install clang libclang-rt-14-dev,
# or the clang-NN / libclang-rt-NN-dev of another version).  CC=clang-NN
# picks a compiler; the corpus grows in build-fuzz/corpus between runs.
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=${1:-60}
cc=${CC:-clang}
out=build-fuzz
mkdir -p "$out/corpus"
if ! command -v "$cc" >/dev/null; then
  echo "tests/fuzz/run.sh: $cc not found (apt-get install clang libclang-rt-14-dev)" >&2
  exit 2
fi

# the core as meson builds it (-march=native) without CUDA, MPI and NCCL:
# every C source of csrc/ but the MPI and NCCL transports (their stubs
# instead), and cuda/absent.c
# The files meson compiles once per ISA are compiled here once, as the
# baseline variant (their names suffixed by csrc/cpu/isa_names.h).
sources=()
for f in csrc/core/*.c csrc/ring/*.c csrc/cpu/*.c csrc/transport/*.c; do
  case "$f" in
    csrc/transport/mpi.c | csrc/transport/nccl.c) ;;
    csrc/cpu/kernel.c | csrc/cpu/backward.c | csrc/cpu/isa_table.c) ;;
    *) sources+=("$f") ;;
  esac
done
sources+=(cuda/absent.c)

flags=(-g -O1 -std=c11 -D_POSIX_C_SOURCE=200809L -Icsrc
  -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
  -march=native -Wno-unknown-pragmas -Wno-psabi)
isa_objects=()
for f in csrc/cpu/kernel.c csrc/cpu/backward.c csrc/cpu/isa_table.c; do
  obj="$out/$(basename "$f" .c)_baseline.o"
  "$cc" "${flags[@]}" -DRA_ISA_SUFFIX=_baseline -include csrc/cpu/isa_names.h \
    -c "$f" -o "$obj"
  isa_objects+=("$obj")
done
"$cc" "${flags[@]}" tests/fuzz/fuzz_plan.c "${sources[@]}" "${isa_objects[@]}" -lm -lpthread -o "$out/fuzz_plan"

# leaks count as failures (detect_leaks); a failed allocation is a path under
# test, not a crash (allocator_may_return_null); one input may take 10 s
# the fuzzer's progress goes to $out/fuzz.log; its end is shown, all of it on failure
rc=0
ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  "$out/fuzz_plan" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -max_len=512 \
  -print_final_stats=1 -artifact_prefix="$out/" "$out/corpus" >"$out/fuzz.log" 2>&1 || rc=$?
if [ "$rc" -ne 0 ]; then
  tail -n 80 "$out/fuzz.log"
  echo "tests/fuzz/run.sh: the fuzzer failed (exit $rc); the log is $out/fuzz.log" >&2
  exit "$rc"
fi
grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$out/fuzz.log" || tail -n 5 "$out/fuzz.log"
echo "fuzz_plan: clean for ${seconds} s"
