#!/usr/bin/env bash
# The test command: C unit tests of the core (meson test), then the Python
# suite (pytest) against the installed ringattn.  Run from the repository
# root after `pip install .`; it installs meson, ninja and pytest if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip --version >/dev/null
for mod in pytest mesonbuild ninja pytest_timeout; do
  pkg=${mod/mesonbuild/meson}
  python -c "import $mod" 2>/dev/null || python -m pip install -q "${pkg/_/-}"
done

builddir=${RINGATTN_TEST_BUILDDIR:-build-tests}
if [ ! -f "$builddir/build.ninja" ]; then
  python -m mesonbuild.mesonmain setup "$builddir" -Dbuildtype=debugoptimized ${RINGATTN_MESON_ARGS:-}
fi
python -m mesonbuild.mesonmain test -C "$builddir" --print-errorlogs

# pytest from outside the tree so that the installed package is imported
python -m pytest "$PWD/tests" -q "$@"
