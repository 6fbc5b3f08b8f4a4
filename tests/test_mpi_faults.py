"""Failures on one rank of a real `mpirun` job: the other ranks must raise
(or be ended by mpirun), never hang, and the job must terminate.

Each test runs one scenario of tests/mpi_faults.py under mpirun with a
subprocess timeout, asserts what every surviving rank raised and that the
job ended, and prints how long the survivors took to see the error after
the misbehaviour (run pytest with -s to see the "fault timing" lines).
Communicators get short timeouts where a test needs the timeout to fire.
"""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import ringattn

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "mpi_faults.py")
MPIRUN = shutil.which("mpirun")
TIMEOUT = 2.0  # the communicator's timeout where a test needs it to fire
SLACK = 2.0    # what a survivor may take beyond it (a send's grace, a loaded 2-core machine)

pytestmark = [
    pytest.mark.skipif(MPIRUN is None, reason="mpirun not found (apt-get install openmpi-bin)"),
    pytest.mark.skipif(not ringattn._ext.have()["mpi"], reason="ringattn built without MPI"),
]

RECORD = re.compile(r"<<(EVENT|OK|RAISED|DONE) rank=(\d+)((?: \w+=\S+)*?)(?: msg=(.*?))?>>")


class Job:
    """An mpirun of one scenario, its output parsed by rank."""

    def __init__(self, n, scenario, timeout=600.0, limit=60, mca=(), extra=()):
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   OMPI_MCA_rmaps_base_oversubscribe="1", RINGATTN_NUM_THREADS="1")
        cmd = [MPIRUN, "--oversubscribe", *mca, "-n", str(n), sys.executable, SCRIPT, scenario, str(timeout), *extra]
        self.n, self.scenario = n, scenario
        start = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"mpirun -n {n} {scenario} hung for {limit}s:\n{e.stdout}\n{e.stderr}")
        self.ended = time.time()
        self.wall = self.ended - start
        self.rc, self.stdout, self.stderr = p.returncode, p.stdout, p.stderr
        self.text = p.stdout + p.stderr
        self.events, self.ok, self.raised, self.done = {}, {}, {}, set()
        for m in RECORD.finditer(p.stdout):
            tag, rank, fields, msg = m.group(1), int(m.group(2)), m.group(3), m.group(4) or ""
            f = dict(kv.split("=", 1) for kv in fields.split())
            if tag == "EVENT":
                self.events[rank] = float(f["at"])
            elif tag == "OK":
                self.ok[rank, f["label"]] = float(f["elapsed"])
            elif tag == "RAISED":
                self.raised[rank, f["label"]] = dict(type=f["type"], elapsed=float(f["elapsed"]), at=float(f["at"]),
                                                     msg=msg)
            else:
                self.done.add(rank)

    def event_at(self):
        assert len(self.events) >= 1, self.text
        return min(self.events.values())

    def expect_raise(self, rank, label, exc_type, pattern):
        """Rank `rank` raised exc_type matching `pattern` in call `label`; returns the record."""
        got = self.raised.get((rank, label))
        assert got is not None, f"rank {rank} did not raise in {label}:\n{self.text}"
        assert got["type"] == exc_type and re.search(pattern, got["msg"]), \
            f"rank {rank} {label}: {got['type']}: {got['msg']!r} (wanted {exc_type} /{pattern}/)\n{self.text}"
        return got

    def report(self, rank, label, what="saw the error"):
        """Print (and return) how long after the misbehaviour rank `rank` raised in `label`."""
        delay = self.raised[rank, label]["at"] - self.event_at()
        print(f"\n[fault timing] {self.scenario} (mpirun -n {self.n}): rank {rank} {what} "
              f"{delay:.3f} s after the event ({self.raised[rank, label]['type']}); job wall {self.wall:.2f} s")
        return delay


def test_timeout_argument():
    """Communicator.mpi(timeout=...) is checked before anything collective."""
    from ringattn._comm import _timeout
    assert _timeout(3) == 3.0 and _timeout(None) == 0.0 and _timeout(float("inf")) == 0.0
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            _timeout(bad)
    for bad in ("3", True):
        with pytest.raises(TypeError, match="timeout"):
            _timeout(bad)


@pytest.mark.parametrize("n", [2, 3])
def test_rank_raising_before_the_call(n):
    """The last rank's own code raises between calls and the exception ends
    its process: the others raise RingAttnError at once in their next call,
    and later calls raise at once (broken)."""
    job = Job(n, "raise_before")
    last = n - 1
    assert job.rc != 0 and "RuntimeError: the user's code failed on this rank" in job.stderr, job.text
    for r in range(last):
        job.expect_raise(r, "call2", "RingAttnError",
                         rf"rank {last} exited after 1 call and will not take part in forward \(call 2\)")
        after = job.expect_raise(r, "after", "RingAttnError", r"communicator is broken.*rank \d exited after 1 call")
        assert after["elapsed"] < 0.5 and r in job.done
        assert job.report(r, "call2") < 5.0


def test_sys_exit_before_the_call():
    """sys.exit(3) on rank 1 of 3 between two calls."""
    job = Job(3, "sys_exit")
    assert job.rc == 3, job.text  # mpirun passes the exit status on
    for r in (0, 2):
        job.expect_raise(r, "call2", "RingAttnError",
                         r"rank 1 exited after 1 call and will not take part in forward \(call 2\)")
        job.expect_raise(r, "after", "RingAttnError", r"communicator is broken")
        assert job.report(r, "call2") < 5.0


def test_memory_error_on_one_rank():
    """numpy.empty raises MemoryError on rank 1 while the output is allocated:
    rank 1 raises it, the others a RingAttnError naming it, and the
    communicator stays usable (a refusal breaks nothing)."""
    job = Job(2, "memory_error")
    assert job.rc == 0, job.text
    job.expect_raise(1, "call1", "MemoryError", r"Unable to allocate the output \(simulated\)")
    job.expect_raise(0, "call1", "RingAttnError", r"^rank 1: MemoryError: Unable to allocate the output")
    assert (0, "after") in job.ok and (1, "after") in job.ok, job.text
    job.report(0, "call1")


def test_forward_against_backward():
    """A forward on rank 0 meets a backward on rank 1 (before, the messages
    overran buffers: MPI_ERR_TRUNCATE, malloc corruption); gathers of
    different sizes, and a gather against a forward, are refused the same
    way; then the communicator works."""
    job = Job(2, "forward_backward")
    assert job.rc == 0, job.text
    for r in (0, 1):
        job.expect_raise(r, "call2", "RingAttnError",
                         r"^operation differs between ranks: forward on rank 0 but backward on rank 1 \(call 2\)$")
        job.expect_raise(r, "gather_bytes", "ValueError",
                         r"^gather: byte counts differ between ranks: 16 on rank 0 but 8 on rank 1$")
        job.expect_raise(r, "gather_vs_forward", "RingAttnError",
                         r"^operation differs between ranks: gather on rank 0 but forward on rank 1 \(call 4\)$")
        assert (r, "after") in job.ok, job.text
    job.report(1, "call2")


def test_one_rank_makes_one_call_more():
    """Ranks 1 and 2 make two calls and leave (rank 1 exits, rank 2 closes
    its communicator); rank 0's third call raises at once."""
    job = Job(3, "extra_call")
    assert job.rc == 0, job.text
    job.expect_raise(0, "call3", "RingAttnError",
                     r"^rank [12] (exited|closed the communicator) after 2 calls and will not take part in "
                     r"forward \(call 3\)$")
    assert {(r, c) for r in range(3) for c in ("call1", "call2")} <= set(job.ok), job.text
    job.report(0, "call3")


@pytest.mark.parametrize("n,mpi4py", [(2, False), (3, False), (2, True)], ids=["2", "3", "2-mpi4py"])
def test_timeout_fires(n, mpi4py):
    """The last rank sleeps four timeouts before its first call: the others
    raise RingAttnError naming the operation and that rank after the
    timeout; the communicator is broken; and since a peer may be stuck, the
    job is aborted at exit instead of waiting in MPI_Finalize -- also when
    mpi4py, not ringattn, initialised MPI and finalizes it."""
    if mpi4py:
        pytest.importorskip("mpi4py")
    job = Job(n, "timeout", timeout=TIMEOUT, extra=("--mpi4py",) if mpi4py else ())
    last = n - 1
    first = None  # a rank whose own wait timed out (the others may hear it from that rank first)
    for r in range(last):
        rec = job.expect_raise(r, "call1", "RingAttnError",
                               rf"^(rank \d failed in forward \(call 1\): )?(forward \(call 1\) )?timed out after "
                               rf"{TIMEOUT:g} s waiting for rank {last} to join the call$")
        if rec["msg"].startswith("forward (call 1) timed out"):
            first = rec
            assert TIMEOUT - 0.05 <= rec["elapsed"] <= TIMEOUT + SLACK, rec
        assert rec["elapsed"] <= TIMEOUT + SLACK, rec
        job.expect_raise(r, "after", "RingAttnError", r"broken.*timed out")
        job.report(r, "call1")
    assert first is not None, job.text
    assert job.rc != 0 and "aborting the MPI job (MPI_Abort) instead" in job.stderr, job.text
    assert job.ended - job.event_at() < 4 * TIMEOUT, f"the job waited for the sleeper:\n{job.text}"


def test_rank_killed_mid_ring():
    """Rank 1 of 3 is killed (SIGKILL) from a thread during a ring call.
    mpirun notices and ends the job: the survivors are terminated by mpirun
    (they print nothing more) within a couple of seconds."""
    job = Job(3, "kill_mid_ring", timeout=TIMEOUT)
    assert job.rc != 0 and "exited on signal 9" in job.text, job.text
    assert not job.done, job.text
    delay = job.ended - job.event_at()
    print(f"\n[fault timing] kill_mid_ring (mpirun -n 3): mpirun ended the job {delay:.3f} s after the SIGKILL; "
          f"job wall {job.wall:.2f} s")
    assert delay < 10, job.text


def test_rank_killed_mid_ring_job_kept_alive():
    """The same with mpirun told not to end the job (orte_abort_on_non_zero_status
    0), as a launcher that does not watch its processes would: the
    survivors' waits time out.  A survivor whose receive was matched by the
    dead rank's transfer (which can never finish now) aborts the job, since
    MPI may still write into it; the other raises RingAttnError naming
    the rank it waited for: rank 1, or rank 2 when rank 2 is itself stuck
    behind rank 1 (the ring's sub-blocks flow 1 -> 2 -> 0, so which wait
    times out first is a race of two equal timeouts).  Either way the job
    ends within about two timeouts."""
    job = Job(3, "kill_mid_ring", timeout=TIMEOUT, mca=("--mca", "orte_abort_on_non_zero_status", "0"))
    assert job.rc != 0, job.text
    for r in (0, 2):
        raised = job.raised.get((r, "call2"))
        if raised is not None:
            job.expect_raise(r, "call2", "RingAttnError", r"(waiting for rank [12]|rank \d failed in forward \(call 2\))")
            job.report(r, "call2", "raised")
    assert job.raised or "ringattn: rank" in job.stderr, job.text
    delay = job.ended - job.event_at()
    print(f"\n[fault timing] kill_mid_ring, job kept alive (mpirun -n 3): the job ended {delay:.3f} s after the "
          f"SIGKILL (timeout {TIMEOUT:g} s); job wall {job.wall:.2f} s")
    assert delay < 3 * TIMEOUT + SLACK + 3, job.text


def test_failure_inside_the_ring():
    """Rank 1 cannot allocate its accumulator after the agreement (its
    address space is limited): it raises MemoryError and sends a FAIL notice,
    the others raise RingAttnError naming rank 1 and the cause at once,
    and the communicator is broken everywhere."""
    job = Job(2, "oom_in_ring")
    assert job.rc == 0, job.text
    job.expect_raise(1, "call2", "MemoryError", r"could not allocate the accumulators of rank 1")
    job.expect_raise(0, "call2", "RingAttnError",
                     r"^rank 1 failed in forward \(call 2\): could not allocate the accumulators of rank 1$")
    for r in (0, 1):
        job.expect_raise(r, "after", "RingAttnError", r"communicator is broken.*could not allocate")
    job.report(0, "call2")
