"""ringattn over torch.distributed under a real `torchrun` (gloo, CPU, no MPI).

Communicator.from_torch and process_group=: tests/torch_dist_checks.py
compares each rank's shards with the one-process result; the fault
scenarios of tests/mpi_faults.py (run with --torch) check the failure model
over gloo: a failure on one rank ends the call on every rank, with the same
message as over MPI.  Every job runs under a subprocess timeout.  (The NCCL
path of from_torch is checked with a fake creator only: no GPU here.)
"""

import os
import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

import ringattn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 2.0  # the communicator's timeout where a scenario needs it to fire

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch without gloo"),
    pytest.mark.timeout(180),
]

RECORD = re.compile(r"<<(CHECK|EVENT|OK|RAISED|DONE) rank=(\d+)((?: \w+=\S+)*?)(?: msg=(.*?))?>>")


def torchrun(n, script, *args, limit=90):
    """Run `script` on n local ranks; (returncode, output, records by kind)."""
    env = dict(os.environ, RINGATTN_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           os.path.join(HERE, script), *args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun -n {n} {script} {args} hung for {limit}s:\n{e.stdout}\n{e.stderr}")
    records = {}
    for m in RECORD.finditer(p.stdout):
        fields = dict(kv.split("=", 1) for kv in m.group(3).split())
        fields["msg"] = m.group(4) or ""
        records.setdefault(m.group(1), []).append((int(m.group(2)), fields))
    return p.returncode, p.stdout + p.stderr, records


def raised(records, label):
    """rank -> (type, message) of the ranks that raised in call `label`."""
    return {r: (f["type"], f["msg"]) for r, f in records.get("RAISED", []) if f["label"] == label}


def test_from_torch_in_one_process_errors():
    import ringattn.torch as rt
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            ringattn.Communicator.from_torch()
    with pytest.raises(ValueError, match="process_group= or comm=, not both"):
        rt.RingDilatedAttention([16], [1], process_group=object(), comm=object())


def test_shards_equal_one_process():
    rc, out, records = torchrun(2, "torch_dist_checks.py")
    assert rc == 0, out
    names = {"communicator", "attention_float64", "attention_float32", "module", "nccl_bootstrap",
             "closed_connection"}
    for rank in range(2):
        assert {f["name"] for r, f in records.get("CHECK", []) if r == rank} == names, out


def test_failure_inside_the_ring_ends_the_call_everywhere():
    """Rank 1 of 3 runs out of memory after the agreement: every rank raises,
    naming rank 1's failure, and the communicator is broken everywhere."""
    rc, out, records = torchrun(3, "mpi_faults.py", "oom_in_ring", "600", "--torch")
    got = raised(records, "call2")
    assert set(got) == {0, 1, 2}, out
    assert got[1] == ("MemoryError", "could not allocate the accumulators of rank 1"), out
    for r in (0, 2):
        assert got[r] == ("RingAttnError", "rank 1 failed in forward (call 2): could not allocate the "
                                           "accumulators of rank 1"), out
    assert {r for r, f in records.get("DONE", [])} == {0, 1, 2} and rc == 0, out
    assert all(f["broken"] == "True" for r, f in records["DONE"]), out


def test_a_rank_that_exits():
    rc, out, records = torchrun(2, "mpi_faults.py", "sys_exit", "600", "--torch")
    assert raised(records, "call2") == {
        0: ("RingAttnError", "rank 1 exited after 1 call and will not take part in forward (call 2)")}, out
    assert rc != 0  # the exiting rank's status ends the job


def test_disagreements_through_the_group():
    """Operations and byte counts that differ raise on every rank; the
    communicator stays usable."""
    rc, out, records = torchrun(2, "mpi_faults.py", "forward_backward", "600", "--torch")
    assert rc == 0, out
    want = "operation differs between ranks: forward on rank 0 but backward on rank 1 (call 2)"
    assert raised(records, "call2") == {0: ("RingAttnError", want), 1: ("RingAttnError", want)}, out
    assert {r: t for r, (t, m) in raised(records, "gather_bytes").items()} == {0: "ValueError", 1: "ValueError"}
    assert {r for r, f in records.get("OK", []) if f["label"] == "after"} == {0, 1}, out


def test_timeout():
    """A rank that sleeps past the timeout: the other raises after it, and
    the sleeper raises the other's failure when it arrives."""
    rc, out, records = torchrun(2, "mpi_faults.py", "timeout", str(TIMEOUT), "--torch")
    got = raised(records, "call1")
    assert got[0] == ("RingAttnError", "forward (call 1) timed out after 2 s waiting for its peers to join the call")
    assert got[1] == ("RingAttnError", "rank 0 failed in forward (call 1): timed out after 2 s waiting for its "
                                       "peers to join the call"), out
    elapsed = next(float(f["elapsed"]) for r, f in records["RAISED"] if r == 0 and f["label"] == "call1")
    assert TIMEOUT <= elapsed < TIMEOUT + 2.0, out


def test_from_torch_nccl_is_opt_in(monkeypatch):
    """The NCCL path has not run on a GPU: an NCCL group is refused unless the
    caller opts in, and the refusal says how (no process group needed: the
    group's backend is faked)."""
    from ringattn import _torch_comm

    class Reached(Exception):
        pass

    def creator(group, seconds):
        raise Reached(group, seconds)

    monkeypatch.setattr(_torch_comm, "resolve_group", lambda group: (None, "fake-group"))
    monkeypatch.setattr(_torch_comm, "group_backend", lambda group: "nccl")
    monkeypatch.setattr(_torch_comm, "nccl_communicator", creator)
    with pytest.raises(RuntimeError, match="unverified_nccl=True"):
        ringattn.Communicator.from_torch()
    with pytest.raises(Reached) as got:  # opted in: the NCCL creation is reached
        ringattn.Communicator.from_torch(unverified_nccl=True)
    assert got.value.args == ("fake-group", 0.0)  # 0: no timeout
