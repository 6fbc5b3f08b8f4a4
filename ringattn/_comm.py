"""Communicators: one process per rank, over MPI (CPU) or NCCL (GPU)."""

from . import _ext
from . import _validate as check


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
    ("mpi" or "nccl") and device (the CUDA ordinal of an NCCL communicator).

    Build one with Communicator.mpi() (CPU processes started by mpirun/srun),
    Communicator.nccl(unique_id, world_size, rank, device) or
    Communicator.nccl_from_mpi(device=...).  Creating and closing are
    collective: every rank must do them, in the same order.
    """

    def __init__(self, handle):
        self._handle = handle
        self.rank, self.world_size, self.backend, self.device = _ext.comm_info(handle)

    @classmethod
    def mpi(cls, comm=None):
        """MPI_COMM_WORLD, or the given mpi4py communicator (duplicated).
        MPI is initialised here if nobody has done it yet."""
        if not _ext.have()["mpi"]:
            raise RuntimeError("ringattn was built without MPI: install an MPI implementation "
                               "(e.g. `apt-get install libopenmpi-dev openmpi-bin`) and reinstall ringattn")
        return cls(_ext.comm_mpi(_mpi_handle(comm)))

    @classmethod
    def nccl(cls, unique_id, world_size, rank, device):
        """NCCL communicator; every rank passes the same nccl_unique_id()."""
        if not isinstance(unique_id, (bytes, bytearray)):
            raise TypeError(f"unique_id must be bytes from ringattn.nccl_unique_id(), got {type(unique_id).__name__}")
        world_size = check.positive_int(world_size, "world_size")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise ValueError(f"device must be a non-negative integer, got {device!r}")
        return cls(_ext.comm_nccl(bytes(unique_id), world_size, rank, device))

    @classmethod
    def nccl_from_mpi(cls, device=0, comm=None):
        """NCCL communicator over the ranks of an MPI communicator; rank 0's
        unique id is shared over MPI."""
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise ValueError(f"device must be a non-negative integer, got {device!r}")
        return cls(_ext.comm_nccl_from_mpi(_mpi_handle(comm), device))

    def close(self):
        """Release the communicator (collective)."""
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

    def refuse(self, error):
        """Take part in the agreement with a failure, so the other ranks
        raise too instead of waiting (used when validation fails here)."""
        _ext.comm_fail(self.handle(), str(error), 1 if isinstance(error, TypeError) else 0)


def nccl_unique_id():
    """A fresh NCCL unique id (128 bytes) to share with every rank."""
    return _ext.nccl_unique_id()
