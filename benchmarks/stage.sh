# stage.sh -- sourced by gpu_check.sh and nccl_check.sh: their shared paths,
# and making the package
# importable from a build directory without installing it.
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
