# stage.sh -- sourced by gpu_check.sh and nccl_check.sh: their shared paths,
# the card's description, the CUDA build, and making the package importable
# from a build directory without installing it.
#
#   gpu_info                       the card (nvidia-smi) into the summary
#   find_meson                     MESON=(how to run meson); returns 1 (after
#                                  saying why) when there is none
#   build_gpu TESTS [SECONDS]      meson setup + compile of $BUILD with CUDA;
#                                  returns 1 (after saying why) on failure
#
#   stage_ringattn BUILD STAGE     copy ringattn/*.py and the built _ext module
#                                  into STAGE/ringattn and put STAGE first on
#                                  PYTHONPATH; returns 1 (after saying why)
#                                  when BUILD has no _ext module.
# Needs REPO and a `say` function from the caller.

# The paths the GPU checks share, from the repository root: REPO, OUT
# (default $1 under the repository, made absolute), PY, BUILD, STAGE, and T0
# (the start time); the summary file is emptied.
check_paths() {
  REPO=$PWD
  OUT=${OUT:-$REPO/$1}
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  PY=${PYTHON:-python3}
  PY=$(command -v "$PY" || echo "$PY")
  BUILD=${RINGATTN_GPU_BUILDDIR:-$REPO/build-gpu}
  STAGE=$BUILD/stage
  T0=$(date +%s)
  : >"$OUT/summary.txt"
}

gpu_info() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 \
    | sed 's/^/  gpu: /' | tee -a "$OUT/summary.txt"
  return 0
}

find_meson() {
  if "$PY" -c "import mesonbuild" 2>/dev/null; then
    MESON=("$PY" -m mesonbuild.mesonmain)
  elif command -v meson >/dev/null; then
    MESON=(meson)
  else
    say "FAIL: meson not found (neither '$PY -m mesonbuild' nor 'meson')"
    return 1
  fi
}

# Configure and compile $BUILD (-Dcuda=$RINGATTN_CUDA, default enabled) with
# the C tests when TESTS is true (an existing build keeps the tests it has
# when TESTS is false), the compile bounded by SECONDS (0 or none: no bound);
# the log is $OUT/build.log.  meson's python module builds the extensions
# for the Python meson runs under unless a native file names one: it names
# $PY, whatever runs meson.
build_gpu() {
  local tests=$1 limit=${2:-0} cuda=${RINGATTN_CUDA:-enabled} native rc steps
  [ -n "${MESON+set}" ] || find_meson || return 1
  mkdir -p "$BUILD"
  native="$BUILD/python-native.ini"
  printf "[binaries]\npython = '%s'\n" "$PY" >"$native"
  say "build: ${MESON[*]} setup $BUILD -Dcuda=$cuda"
  {
    if [ -f "$BUILD/build.ninja" ]; then
      "${MESON[@]}" setup --reconfigure "$BUILD" -Dbuildtype=release -Dcuda="$cuda" \
        $([ "$tests" = true ] && echo -Dtests=true)
    else
      "${MESON[@]}" setup "$BUILD" --native-file "$native" -Dbuildtype=release -Dcuda="$cuda" -Dtests="$tests"
    fi && timeout "$limit" "${MESON[@]}" compile -C "$BUILD"
  } >"$OUT/build.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    tail -40 "$OUT/build.log"
    say "FAIL: build (exit $rc); see build.log"
    return 1
  fi
  steps=$(grep -c 'Compiling\|Linking' "$OUT/build.log" 2>/dev/null)  # grep -c says 0 (and fails) for none
  say "build OK (${steps:-?} compile and link steps)"
}

stage_ringattn() {
  local build=$1 stage=$2 exts
  rm -rf "$stage"
  mkdir -p "$stage/ringattn"
  cp "$REPO"/ringattn/*.py "$stage/ringattn/"
  shopt -s nullglob
  exts=("$build"/_ext*.so "$build"/_ext*.pyd)
  shopt -u nullglob
  if [ ${#exts[@]} -lt 1 ]; then
    say "FAIL: the build has no _ext extension module in $build"
    return 1
  fi
  cp "${exts[@]}" "$stage/ringattn/"
  export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
}

# Say where ringattn is imported from (run from $1, so the repository's own
# checkout does not shadow the stage), and warn when it is not the stage.
report_import() {
  local from=$1 stage=$2 where
  where=$(cd "$from" && "$PY" -c "import ringattn, ringattn._ext as e; print(ringattn.__file__, e.have()['cuda'], ringattn.cuda_device_count())" 2>&1)
  say "import: $where"
  case "$where" in
    "$stage"*) ;;
    *) say "WARNING: ringattn is not imported from the stage ($stage); an installed copy may shadow it" ;;
  esac
}
