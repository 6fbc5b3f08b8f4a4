# stage.sh -- sourced by gpu_check.sh and nccl_check.sh: make the package
# importable from a build directory without installing it.
#
#   stage_ringattn BUILD STAGE     copy ringattn/*.py and the built _ext module
#                                  into STAGE/ringattn and put STAGE first on
#                                  PYTHONPATH; returns 1 (after saying why)
#                                  when BUILD has no _ext module.
# Needs REPO and a `say` function from the caller.
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
