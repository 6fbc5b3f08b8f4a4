"""Communicator.from_torch: ringattn over a torch.distributed process group.

gloo groups: the ring's bytes move through torch.distributed itself, on a
private gloo group over the same ranks (so ringattn's messages never meet
the application's), by a C transport (csrc/transport/external.c) whose
operations call the _GlooTransport below (ringattn/ext/pycomm.c).  The
agreement that starts every call (csrc/transport/agree.c) is an all_gather
on that group.  The failure model (docs/design.md) maps onto gloo thus:

  - gloo has no test for a pending send or receive, so a wait blocks in
    Work.wait() -- with the GIL released, bounded by the communicator's
    timeout;
  - a rank that gives up a call writes a FAIL record (the call, the rank
    where the trouble began, the message) into the group's store and then
    *poisons* its private group: a 1 ms receive that times out, on which
    gloo closes every connection of the group.  Every peer blocked on this
    rank fails at once ("connection closed"), reads the record and raises
    the same message -- and gives up in turn, so the failure travels the
    ring;
  - closing the communicator writes CLOSE, and at exit every live one
    writes EXIT, with the calls made: a peer waiting in a call this rank
    will never make raises "rank 1 exited after 2 calls and will not take
    part in forward (call 3)" as soon as the connection closes;
  - transfers are staged through tensors owned here (one copy each way):
    after a failure gloo may still hold a transfer's buffer, and the ring's
    own buffers are freed when the call returns, so the staging tensors of
    failed transfers are kept (never freed) instead.

NCCL groups: a ringattn NCCL communicator on the rank's current CUDA device;
every rank checks what it can alone, the ranks agree through the group, and
rank 0's NCCL unique id is broadcast through it.  (Not run on a GPU yet.)
"""

import datetime
import secrets
import threading
import time

import numpy as np

from . import _ext

_POISON_TAG = 0x7A7A0001  # never a ring tag (those are branch numbers)
_FOREVER = datetime.timedelta(days=365)  # gloo's own timeout: ringattn bounds every wait itself

_live = set()  # transports whose communicator is open: they say EXIT at exit
_live_lock = threading.Lock()


def _torch():
    try:
        import torch
        import torch.distributed as dist
    except ImportError as e:
        raise ImportError("Communicator.from_torch needs torch (pip install torch)") from e
    if not dist.is_available():
        raise RuntimeError("Communicator.from_torch: this torch was built without torch.distributed")
    return torch, dist


def resolve_group(group):
    """(torch.distributed, the group): the default group for None; refuses a
    process that has no process group or is not in `group`."""
    torch, dist = _torch()
    if not dist.is_initialized():
        raise RuntimeError("Communicator.from_torch needs an initialised torch.distributed process group: call "
                           "torch.distributed.init_process_group() first (e.g. under torchrun)")
    if group is None:
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("group: this process is not a member of the process group")
    return dist, group


def group_backend(group):
    """"nccl" or "gloo": what from_torch builds for `group`."""
    _, dist = _torch()
    name = str(dist.get_backend(group)).lower()  # "gloo", "nccl", or e.g. "cpu:gloo,cuda:nccl"
    if "nccl" in name:
        return "nccl"
    if "gloo" in name:
        return "gloo"
    raise ValueError(f"group: the {name!r} backend is not supported by Communicator.from_torch (gloo and NCCL "
                     "are); for an MPI job use Communicator.mpi()")


# ------------------------------------------------------------------ gloo

def gloo_communicator(group):
    """(rank, world_size, id, transport) for an external communicator over a
    private gloo group with the ranks of `group`.  Collective over `group`."""
    torch, dist = _torch()
    ranks = dist.get_process_group_ranks(group)
    private = dist.new_group(ranks, backend="gloo", timeout=_FOREVER, use_local_synchronization=True)
    rank, size = dist.get_rank(private), dist.get_world_size(private)
    ident = torch.tensor([secrets.randbits(63) | 1 if rank == 0 else 0], dtype=torch.int64)
    dist.broadcast(ident, group_src=0, group=private)
    ident = int(ident.item())
    transport = _GlooTransport(private, rank, size, ident)
    return rank, size, ident, transport


class _Op:
    """One transfer: its gloo work, the staging tensor, the ring's buffer
    (a memoryview, receives only) and the peer."""
    __slots__ = ("work", "stage", "out", "peer")

    def __init__(self, work, stage, out, peer):
        self.work, self.stage, self.out, self.peer = work, stage, out, peer


def _release(view):
    try:
        view.release()
    except (AttributeError, ValueError):  # pragma: no cover - exported elsewhere
        pass


class _GlooTransport:
    """The Python side of an external communicator (ringattn/ext/pycomm.c
    calls these with the GIL held; torch's waits release it)."""

    def __init__(self, group, rank, size, ident):
        import torch
        import torch.distributed as dist
        self.torch, self.dist = torch, dist
        self.group, self.rank, self.size = group, rank, size
        self.store = dist.PrefixStore(f"ringattn/{ident:x}/", group.get_group_store())
        self.kept = []       # staging tensors gloo may still hold (failed transfers)
        self.echo = None     # (call number, origin) of a peer's failure this rank passed on
        self.calls = 0       # the last call this rank took part in
        self.current = ("collective call (call 0)", 0)  # its name and number (from its agreement)
        self.poisoned = False
        self.closed = False
        with _live_lock:
            _live.add(self)

    # -------------------------------------------------------------- transfers
    def _stage_copy(self, view):
        torch = self.torch
        data = torch.empty(len(view), dtype=torch.uint8)
        if len(view):
            data.numpy()[:] = np.frombuffer(view, dtype=np.uint8)
        return data

    def isend(self, data, dst, tag):
        try:
            stage = self._stage_copy(data)
        finally:
            _release(data)
        work = self._start(lambda: self.dist.isend(stage, group_dst=dst, group=self.group, tag=tag), stage, dst)
        return _Op(work, stage, None, dst)

    def irecv(self, out, src, tag):
        stage = self.torch.empty(len(out), dtype=self.torch.uint8)
        try:
            work = self._start(lambda: self.dist.irecv(stage, group_src=src, group=self.group, tag=tag), stage, src)
        except BaseException:
            _release(out)
            raise
        return _Op(work, stage, out, src)

    def _start(self, start, stage, peer):
        """Start a transfer (gloo refuses at once when the peer's connection
        closed: explained as a failed wait is)."""
        try:
            return start()
        except Exception as e:
            self.kept.append(stage)
            call, number = self.current
            raise RuntimeError(self._why(e, (call, number, "", 0.0), peer, 0.0)) from None

    def wait(self, op, abandon, info):
        call, number, waiting_for, timeout = info
        try:
            if abandon:  # the call was given up: gloo may still use the staging tensor
                self.kept.append(op.stage)
                return
            try:
                self._wait(op.work, info, op.peer)
            except BaseException:
                self.kept.append(op.stage)
                raise
            if op.out is not None and len(op.out):
                np.frombuffer(op.out, dtype=np.uint8)[:] = op.stage.numpy()
        finally:
            if op.out is not None:
                _release(op.out)

    def allgather(self, send, out, info):
        torch = self.torch
        self.calls = max(self.calls, info[1])
        self.current = (info[0], info[1])
        try:
            n = len(send)
            stage = self._stage_copy(send)
            parts = [torch.empty(n, dtype=torch.uint8) for _ in range(self.size)]
            try:
                try:
                    work = self.dist.all_gather(parts, stage, group=self.group, async_op=True)
                except Exception as e:  # a connection already closed
                    raise RuntimeError(self._why(e, info, None, 0.0)) from None
                self._wait(work, info, None)
            except BaseException:
                self.kept.extend(parts + [stage])
                raise
            whole = np.frombuffer(out, dtype=np.uint8)
            for r, part in enumerate(parts):
                whole[r * n:(r + 1) * n] = part.numpy()
            del whole
        finally:
            _release(send)
            _release(out)

    def _wait(self, work, info, peer):
        call, number, waiting_for, timeout = info
        start = time.monotonic()
        try:
            done = work.wait(datetime.timedelta(seconds=timeout)) if timeout > 0 else work.wait()
            if done is False:
                raise RuntimeError("the transfer was aborted")
        except Exception as e:
            raise RuntimeError(self._why(e, info, peer, time.monotonic() - start)) from None

    # -------------------------------------------------------------- failures
    def _why(self, error, info, peer, waited):
        """The message of a failed wait: a peer's recorded failure or exit,
        else a timeout, else the lost connection."""
        call, number, waiting_for, timeout = info
        record = self._peer_record(call, number)
        if record is not None:
            return record
        who = f"rank {peer}" if peer is not None else "its peers"
        if timeout > 0 and waited >= 0.98 * timeout:
            return f"{call} timed out after {timeout:g} s waiting for {who} {waiting_for}"
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"{call}: lost the connection to {who} (a peer exited or failed): {text}"

    def _get(self, key):
        try:
            return self.store.get(key).decode() if self.store.check([key]) else None
        except Exception:  # the store went away with its host
            return None

    def _set(self, key, value):
        try:
            self.store.set(key, value)
        except Exception:
            pass

    def _peer_record(self, call, number):
        """What a peer recorded that keeps it from completing call `number`:
        a FAIL of this call or an earlier one, an EXIT or CLOSE after fewer
        calls.  The rank where the trouble began is named first."""
        found = []
        for r in range(self.size):
            if r == self.rank:
                continue
            fail = self._get(f"fail/{r}")
            if fail is not None:
                failed_call, origin, text = fail.split("\n", 2)
                if int(failed_call) <= number:
                    found.append((int(origin) != r, int(origin), text))
            left = self._get(f"left/{r}")
            if left is not None:
                kind, made = left.split("\n")
                made = int(made)
                if made < number:
                    verb = "exited" if kind == "EXIT" else "closed the communicator"
                    found.append((False, r, f"rank {r} {verb} after {made} call{'' if made == 1 else 's'} and "
                                            f"will not take part in {call}"))
        if not found:
            return None
        found.sort(key=lambda f: f[0])
        _, origin, text = found[0]
        self.echo = (number, origin)
        return text

    def give_up(self, call, number, why):
        """This rank gives up call `number`: record why, then close every
        connection of the private group so that no peer waits for it."""
        if self.echo is not None and self.echo[0] == number:  # a peer's failure: passed on as it is
            origin, text = self.echo[1], why
        else:
            origin, text = self.rank, f"rank {self.rank} failed in {call}: {why}"
        self._set(f"fail/{self.rank}", f"{number}\n{origin}\n{text}")
        self._poison()

    def _poison(self):
        if self.poisoned or self.size < 2:
            return
        self.poisoned = True
        sink = self.torch.empty(1, dtype=self.torch.uint8)
        self.kept.append(sink)
        try:  # a receive nobody sends: its timeout closes the group's connections
            work = self.dist.irecv(sink, group_src=(self.rank + 1) % self.size, group=self.group, tag=_POISON_TAG)
            work.wait(datetime.timedelta(milliseconds=1))
        except Exception:
            pass

    # -------------------------------------------------------------- lifetime
    def leave(self, kind):
        if self.closed:
            return
        self.closed = True
        with _live_lock:
            _live.discard(self)
        self._set(f"left/{self.rank}", f"{kind}\n{self.calls}")

    def close(self, calls):
        self.calls = max(self.calls, int(calls))
        self.leave("CLOSE")
        if not self.poisoned:  # a poisoned group is kept: gloo may still hold its buffers
            try:
                self.dist.destroy_process_group(self.group)
            except Exception:
                pass


def exiting():
    """At exit: every open communicator over torch.distributed says EXIT."""
    with _live_lock:
        live = list(_live)
    for t in live:
        t.leave("EXIT")


# ------------------------------------------------------------------ NCCL

def _have_nccl():
    return bool(_ext.have()["nccl"])


def _nccl_unique_id():
    return _ext.nccl_unique_id()


def _create_nccl(unique_id, world_size, rank, device, timeout):
    return _ext.comm_nccl(unique_id, world_size, rank, device, timeout)


def _current_cuda_device():
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("the group is an NCCL group but torch sees no CUDA device")
    return torch.cuda.current_device()


def nccl_communicator(group, timeout):
    """An NCCL communicator handle on this rank's current CUDA device over
    the ranks of `group`.  Every rank checks what it can alone (NCCL in this
    build, a CUDA device) and the ranks agree through the group before any
    of them enters NCCL's initialisation; rank 0's unique id is then
    broadcast through the group.  Collective over `group`."""
    _, dist = _torch()
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    problem, device, unique_id = None, -1, None
    try:
        if not _have_nccl():
            raise RuntimeError("ringattn was built without NCCL support (build it with -Dcuda=enabled)")
        device = _current_cuda_device()
        if rank == 0:
            unique_id = _nccl_unique_id()
    except Exception as e:
        problem = f"{type(e).__name__}: {e}"
    problems = [None] * size
    dist.all_gather_object(problems, problem, group=group)
    bad = [(r, p) for r, p in enumerate(problems) if p is not None]
    if bad:
        r, p = bad[0]
        raise RuntimeError(f"Communicator.from_torch: rank {r} cannot join an NCCL communicator: {p}")
    box = [unique_id]
    dist.broadcast_object_list(box, group_src=0, group=group)
    return _create_nccl(box[0], size, rank, device, timeout)
