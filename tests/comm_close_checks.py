"""Communicator.close() while another thread is inside a call on it: run by
tests/test_threads.py under `mpirun -n 1` (a one-rank MPI communicator).

The close must raise RuntimeError and leave the communicator working: the
running call finishes with the right result, and close() succeeds once it
has returned.  Prints "COMM CLOSE CHECKS PASSED" on success."""

import linecache
import sys
import threading
import time

import numpy as np

import ringattn


def inside_ext_run(thread):
    """Is `thread` inside _ext.run (the C call, GIL released)?  Its innermost
    Python frame is then _Call.run at the line that calls it."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_filename.endswith("_call.py") and frame.f_code.co_name == "run":
            return "_ext.run(" in linecache.getline(frame.f_code.co_filename, frame.f_lineno)
        frame = frame.f_back
    return False


def main():
    comm = ringattn.Communicator.mpi()
    assert comm.world_size == 1, comm
    rng = np.random.default_rng(5)
    # one thread, dense attention over 8192 positions: about a second or more on any CPU
    q, k, v = (rng.standard_normal((1, 8192, 4, 64)).astype(np.float32) for _ in range(3))
    ring = ringattn.RingDilatedAttention([8192], [1], comm=comm, num_threads=1)
    result = {}

    def work():
        try:
            result["o"] = ring(q, k, v)
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    t = threading.Thread(target=work)
    t.start()
    deadline = time.monotonic() + 60
    while not inside_ext_run(t):
        assert t.is_alive() and time.monotonic() < deadline, ("the call never started", result)
        time.sleep(0.001)
    time.sleep(0.05)  # the C call is under way (it takes far longer)
    assert t.is_alive(), "the call ended too soon for the check"
    try:
        comm.close()
    except RuntimeError as e:
        assert "in use" in str(e), e
    else:
        raise AssertionError("close() during a call did not raise")
    assert t.is_alive(), "the call ended while close() was refused: inconclusive"
    t.join(120)
    assert not t.is_alive(), "the call did not return"
    assert "error" not in result, result["error"]
    want = ringattn.dilated_attention(q, k, v, [8192], [1], num_threads=1)
    assert np.array_equal(result["o"], want), float(np.abs(result["o"] - want).max())
    comm.close()  # no call in flight: closes
    try:
        ring(q[:, :8], k[:, :8], v[:, :8])
    except ValueError as e:
        assert "closed" in str(e), e
    else:
        raise AssertionError("a call on a closed communicator did not raise")
    print("COMM CLOSE CHECKS PASSED", flush=True)


if __name__ == "__main__":
    main()
