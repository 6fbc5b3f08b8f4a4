"""Real multi-process rings: `mpirun -n 2` and `-n 4` running tests/mpi_checks.py.

Each rank's output must equal its slice of the single-process reference for
dense, dilated, causal, sub-ring and fp16 cases, and mismatched
configurations, NaN inputs and invalid inputs on one rank must raise on
every rank.  A hang is a failure: every run has a timeout.
"""

import os
import shutil
import subprocess
import sys

import pytest

import ringattn

HERE = os.path.dirname(os.path.abspath(__file__))
MPIRUN = shutil.which("mpirun")

pytestmark = [
    pytest.mark.skipif(MPIRUN is None, reason="mpirun not found (apt-get install openmpi-bin)"),
    pytest.mark.skipif(not ringattn._ext.have()["mpi"], reason="ringattn built without MPI"),
]


def mpirun(n, script, *args, timeout=300):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", RINGATTN_NUM_THREADS="1")
    cmd = [MPIRUN, "--oversubscribe", "-n", str(n), sys.executable, script, *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpirun -n {n} hung for {timeout}s:\n{e.stdout}\n{e.stderr}")


@pytest.mark.parametrize("n", [2, 4])
def test_mpi_ring_matches_reference(n):
    r = mpirun(n, os.path.join(HERE, "mpi_checks.py"))
    assert r.returncode == 0 and "MPI CHECKS PASSED" in r.stdout, r.stdout + r.stderr


def test_mpi_demo_runs():
    r = mpirun(2, "-m", "ringattn", "--mpi", "--seq-lens", "4096", "--heads", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.strip().startswith("4096")]
    assert len(rows) == 1 and rows[0][1] == "2", r.stdout  # one table row, printed by rank 0 only
    assert float(rows[0][-1]) < 1e-5, r.stdout  # max |diff| from the single-process output


def test_mpi4py_subcommunicators():
    pytest.importorskip("mpi4py")
    r = mpirun(4, os.path.join(HERE, "mpi4py_checks.py"))
    assert r.returncode == 0 and "MPI4PY CHECKS PASSED" in r.stdout, r.stdout + r.stderr
