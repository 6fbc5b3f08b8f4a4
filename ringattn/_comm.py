"""Communicators: one process per rank, over MPI (CPU), NCCL (GPU) or a
torch.distributed process group (from_torch)."""

import atexit
import math
import numbers

from . import _ext
from . import _validate as check

DEFAULT_TIMEOUT = 600.0  # seconds, as torch.distributed's process-group timeout


def _timeout(value):
    """A timeout in seconds: a positive number, or None / inf for none."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds or None, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or value <= 0:
        raise ValueError(f"timeout must be a positive number of seconds (or None for none), got {value!r}")
    return 0.0 if math.isinf(value) else value


def _mpi_handle(comm):
    """Address of the MPI_Comm inside an mpi4py communicator (None: WORLD)."""
    if comm is None:
        return None
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - only without mpi4py
        raise TypeError("comm: passing an MPI communicator needs mpi4py") from e
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"comm must be an mpi4py.MPI.Comm or None, got {type(comm).__name__}")
    return MPI._addressof(comm)


class Communicator:
    """This process's place in a distributed ring: world_size, rank, backend
    ("mpi", "nccl" or "gloo") and device (the CUDA ordinal of an NCCL
    communicator).

    Build one with Communicator.mpi() (CPU processes started by mpirun/srun),
    Communicator.nccl(unique_id, world_size, rank, device),
    Communicator.nccl_from_mpi(device=...) or Communicator.from_torch(group)
    (a torch.distributed process group, e.g. under torchrun).  Creating and
    closing are collective: every rank must do them, in the same order.  close() while
    another thread of this process is inside a call on the communicator
    raises RuntimeError (nothing is freed under a running call).

    Every call on a communicator (a forward, a backward, gather_sequence)
    is collective: the ranks first agree on the operation, the call number
    and the configuration, and a mismatch, or an exception on any rank
    before that point, raises on every rank.  No rank waits forever: each
    wait of a call ends after `timeout` seconds (default 600, as
    torch.distributed's process-group timeout) with a RingAttnError naming
    the operation and the missing rank, and at once when a peer failed,
    closed the communicator or exited.  After such a failure the
    communicator is *broken* (`broken` says why): every later call raises
    at once; create a new one.  See docs/design.md, "Failure model".
    NCCL communicators enforce a timeout only when given one (timeout=
    of nccl() / nccl_from_mpi(); none by default): the NCCL communicator
    is then nonblocking, its creation and every wait of a call poll NCCL's
    asynchronous error (and the stream) until the deadline, and a rank that
    gives up a call aborts its NCCL communicator (ncclCommAbort).  That
    path has not run on a multi-rank GPU job yet.
    """

    def __init__(self, handle):
        self._handle = handle
        self.rank, self.world_size, self.backend, self.device = _ext.comm_info(handle)

    @classmethod
    def mpi(cls, comm=None, timeout=DEFAULT_TIMEOUT):
        """MPI_COMM_WORLD, or the given mpi4py communicator (duplicated).
        MPI is initialised here if nobody has done it yet.  timeout: seconds
        any wait of a call may last (None: forever)."""
        if not _ext.have()["mpi"]:
            raise RuntimeError("ringattn was built without MPI: install an MPI implementation "
                               "(e.g. `apt-get install libopenmpi-dev openmpi-bin`) and reinstall ringattn")
        seconds = _timeout(timeout)
        self = cls(_ext.comm_mpi(_mpi_handle(comm)))
        _ext.comm_set_timeout(self._handle, seconds)
        return self

    @classmethod
    def from_torch(cls, group=None, timeout="default", *, unverified_nccl=False):
        """A communicator over the ranks of an initialised torch.distributed
        process group (the default group for None); collective over it.

        gloo groups: the ring's transfers and the agreement go through
        torch.distributed on a private gloo group with the same ranks, so a
        CPU job under torchrun needs no MPI; tensors are CPU tensors, this
        rank's shards.  NCCL groups: an NCCL communicator on this rank's
        current CUDA device (torch.cuda.current_device()), its unique id
        broadcast through the group.  That NCCL path has not run on a GPU
        yet, so it is opt-in: an NCCL group raises RuntimeError unless
        unverified_nccl=True.  A group with both (init_process_group()
        without a backend) gives NCCL.
        timeout: seconds any wait of a call may last (None: forever); the
        default is 600 s for gloo, none for NCCL (opt-in, as nccl()).
        The failure model is the MPI communicator's (docs/design.md): a
        failure on one rank ends the call on every rank."""
        from . import _torch_comm
        _, group = _torch_comm.resolve_group(group)
        backend = _torch_comm.group_backend(group)
        if timeout == "default":
            timeout = DEFAULT_TIMEOUT if backend == "gloo" else None
        seconds = _timeout(timeout)
        if backend == "nccl":
            if not unverified_nccl:
                raise RuntimeError(
                    "Communicator.from_torch on an NCCL process group has not run on a GPU yet, so it is "
                    "opt-in: pass unverified_nccl=True to use it (or build the communicator with "
                    "Communicator.nccl(...) and pass comm=)")
            self = cls(_torch_comm.nccl_communicator(group, seconds))
        else:
            rank, size, ident, transport = _torch_comm.gloo_communicator(group)
            self = cls(_ext.comm_external(transport, rank, size, ident))
            self.backend = "gloo"
            _ext.comm_set_timeout(self._handle, seconds)
        self.group = group
        return self

    @property
    def timeout(self):
        """Seconds any wait of a call may last (None: forever)."""
        return _ext.comm_state(self.handle())["timeout"] or None

    @timeout.setter
    def timeout(self, value):
        _ext.comm_set_timeout(self.handle(), _timeout(value))

    @property
    def calls(self):
        """Collective calls made on this communicator so far."""
        return _ext.comm_state(self.handle())["calls"]

    @property
    def broken(self):
        """None while usable; else why the communicator cannot be used any more."""
        return _ext.comm_state(self.handle())["broken"]

    @classmethod
    def nccl(cls, unique_id, world_size, rank, device, timeout=None):
        """NCCL communicator; every rank passes the same nccl_unique_id().
        timeout: seconds any wait of a call may last (None, the default:
        forever; opt-in for NCCL, see the class docstring)."""
        if not isinstance(unique_id, (bytes, bytearray)):
            raise TypeError(f"unique_id must be bytes from ringattn.nccl_unique_id(), got {type(unique_id).__name__}")
        world_size = check.positive_int(world_size, "world_size")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise ValueError(f"device must be a non-negative integer, got {device!r}")
        seconds = _timeout(timeout)
        return cls(_ext.comm_nccl(bytes(unique_id), world_size, rank, device, seconds))

    @classmethod
    def nccl_from_mpi(cls, device=0, comm=None, timeout=None):
        """NCCL communicator over the ranks of an MPI communicator; rank 0's
        unique id is shared over MPI.  timeout as in nccl()."""
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise ValueError(f"device must be a non-negative integer, got {device!r}")
        seconds = _timeout(timeout)
        return cls(_ext.comm_nccl_from_mpi(_mpi_handle(comm), device, seconds))

    def close(self):
        """Release the communicator (collective).  While another thread is
        inside a call on it, close() raises RuntimeError and leaves the
        communicator as it was: close it once the call has returned."""
        if self._handle is not None:
            _ext.comm_close(self._handle)
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        dev = f", device={self.device}" if self.backend == "nccl" else ""
        return f"Communicator(backend={self.backend!r}, rank={self.rank}, world_size={self.world_size}{dev})"

    def handle(self):
        if self._handle is None:
            raise ValueError("comm has been closed")
        return self._handle

    def refuse(self, error, op):
        """Take part in the agreement of the call `op` ("forward", "backward"
        or "gather") with this rank's exception (any type), so that the other
        ranks raise too instead of waiting: a TypeError or ValueError as
        such, anything else as a RingAttnError naming its type."""
        if isinstance(error, TypeError):
            kind = "type"
        elif isinstance(error, ValueError):
            kind = "value"
        else:  # its public name: numpy's _ArrayMemoryError is a MemoryError
            kind = next((c.__name__ for c in type(error).__mro__ if not c.__name__.startswith("_")), "error")
        _ext.comm_fail(self.handle(), str(error), kind, op)


def nccl_unique_id():
    """A fresh NCCL unique id (128 bytes) to share with every rank."""
    return _ext.nccl_unique_id()


# At exit every live communicator tells its peers, so that a peer waiting in
# a call this process will never make fails at once instead of at its timeout.
atexit.register(_ext.comm_exiting)


def _torch_exiting():
    import sys
    if "ringattn._torch_comm" in sys.modules:  # only if from_torch was used
        sys.modules["ringattn._torch_comm"].exiting()


atexit.register(_torch_exiting)
