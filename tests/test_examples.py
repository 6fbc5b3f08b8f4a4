"""The examples run, so that they cannot rot.

examples/train_tiny_lm.py, short: in one process and under
`torchrun --nproc_per_node 2` (gloo; each rank holds half of every
sequence).  The loss must fall, and the two runs' per-step losses must agree
to float32 rounding: the runs differ only in the order of float32 sums (the
ring's log-sum-exp merges of partial results, and the all_reduce of the two
ranks' loss and gradient shares), a few ulps (float32 eps = 1.2e-7) per step
-- measured: at most 2.6e-7 relative over 15 steps.  RTOL = 1e-5 leaves room
for other CPUs' kernels, while a wrong shard, a lost gradient share or a
dropped ring block changes the loss by 1e-2 or more.

examples/quickstart.ipynb is executed with nbclient (skipped when nbclient,
ipykernel or matplotlib is not installed).
"""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
RTOL = 1e-5
SHORT = ["--steps", "15", "--seq-len", "2048", "--batch", "2", "--lr", "3e-3", "--every", "5"]


def run(cmd, limit):
    env = dict(os.environ, OMP_NUM_THREADS="1", RINGATTN_NUM_THREADS="1")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} ran past {limit}s:\n{e.stdout}\n{e.stderr}")
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@pytest.mark.timeout(150)
def test_train_tiny_lm_one_process_and_torchrun_agree(tmp_path):
    script = os.path.join(EXAMPLES, "train_tiny_lm.py")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    out = run([sys.executable, script, *SHORT, "--losses", str(one)], 60)
    assert "step 15/15" in out and "tok/s" in out, out
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *SHORT,
         "--losses", str(two)], 90)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    la, lb = a["losses"], b["losses"]
    assert len(la) == len(lb) == 15
    assert sum(la[-5:]) / 5 < sum(la[:5]) / 5 - 0.3, la  # the loss falls
    for step, (x, y) in enumerate(zip(la, lb), 1):
        assert abs(x - y) <= RTOL * abs(x), f"step {step}: one process {x!r}, two ranks {y!r}"


@pytest.mark.timeout(240)
def test_quickstart_notebook_runs():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    nb = nbformat.read(os.path.join(EXAMPLES, "quickstart.ipynb"), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": EXAMPLES}})
    client.execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "gradient check passed" in text, text
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])), "no plot"
