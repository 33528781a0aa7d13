"""``allreduce(buf, comm=None, *, op="sum", algorithm="auto")`` and the algorithm registry.

Every call:
  0. refuses, locally and with ValueError, what is not an intracommunicator (an
     intercommunicator, COMM_NULL, an int or a string: every rank holding it raises);
  1. validates the buffer locally and, in one small Allgather on the library's
     private communicator, checks that every rank passed the same length, dtype,
     op and algorithm -- any mismatch, and anything an algorithm would trip on on
     one rank (a read-only, misaligned or byte-swapped buffer, np.matrix, a GPU
     array that is not CuPy: guard.py), raises ValueError on *every* rank, so no
     rank is left waiting in a receive;
  2. runs the chosen algorithm in place on the private communicator (a Dup of
     the caller's, made once and cached on it as an MPI attribute), so the
     library's messages never match a receive the caller has posted.

Threads (MPI_THREAD_MULTIPLE, mpi4py's default): concurrent calls on one
communicator from several threads are *refused*, not served -- the ranks cannot
know which thread's call goes with which, so both overlapping calls raise
ValueError on every rank (the later one in the check, the earlier one in a
post-check that runs only when some rank has other threads alive); a rank's
calls reach MPI one at a time, so nothing hangs (the argument: guard.py). Use
one communicator per thread (comm.Dup(), in the same order on every rank).
float16 sum/avg/prod accumulate in float32 and are rounded once (wide.py).

Algorithms: ring (bandwidth-optimal), tree (latency-optimal), native (the MPI
library's Allreduce, the reference), auto (messages <= SMALL_BYTES ride inside
the check's Allgather and are reduced locally in rank order -- one collective
in all, up to FUSE_MAX_RANKS ranks; larger ones go to the algorithm the stored
decision table -- written from a fitted cost model, tuning.py -- or the fixed threshold
says is fastest), hier (topology-aware: reduce
within each host, ring across the hosts' leaders, broadcast within each host;
hier.py, with MPITRAIN_HOSTS=block:K to emulate K hosts on one machine), shm (one node: every
rank reads every rank's buffer in a shared window, no messages; zero-copy for buffers from
``alloc_shared``: shm.py).
"""

from __future__ import annotations

import threading

import numpy as np
from mpi4py import MPI

from . import tuning as _tuning
from .. import backend
from ..runtime import get_comm

from . import guard as _guard  # (after the others: guard imports only backend)
from . import wide as _wide

OPS = ("sum", "avg", "max", "min", "prod")
DTYPES = ("float16", "float32", "float64", "int32", "int64")
# Name of the elementwise function in numpy / cupy for each op.
_UFUNC = {"sum": "add", "avg": "add", "max": "maximum", "min": "minimum", "prod": "multiply"}
_MPI_OP = {"sum": MPI.SUM, "avg": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}

# Below this many bytes `auto` uses the MPI library's Allreduce (latency-bound;
# Python overhead per ring step dominates), above it the pipelined ring.
AUTO_RING_MIN_BYTES = 512 * 1024

# `auto` reduces messages up to this size inside the check itself: the check's
# Allgather carries the data too, every rank reduces the p rows in rank order,
# and one collective does the whole job (see fused() below).
SMALL_BYTES = 4096
FUSE_MAX_RANKS = 64  # above this the check's Allgather (p x 4 KiB) would cost more than it saves
META = 6  # n, dtype, op, algorithm, problem, on-device

# The tag map of the library's private communicator (a Dup of the caller's; never tag 0; every MPI allows
# tags up to 32767). Two operations that may be in flight at once never share a tag:
#   11 check, 12 ring, 13 tree, 14 hier   blocking calls: one at a time per communicator (guard.py)
#   NB_TAGS   1000 .. 5095    non-blocking handles (nonblocking.py): slot = creation count mod 4096; a
#                             handle whose slot's last holder is still in flight on any rank is refused
#                             (ValueError on every rank, by the agreement check: problem TAGS_BUSY)
#   PLAN_TAGS 8192 .. 12287   persistent plans (plan.py): the lowest tag free on every rank (an Allreduce of
#                             the free sets at init), held until free() or collection; none free: ValueError
# Other communicators carry their own tags: the watchdog's Dup (21), the parameter server's Dup (71-73),
# hier's per-host and leaders' Splits (TAG_HIER, or the handle's / plan's tag), shm's node Split (none).
TAG_CHECK = 11
TAG_RING = 12
TAG_TREE = 13
TAG_HIER = 14
NB_TAGS = (1000, 4096)  # (first, how many)
PLAN_TAGS = (8192, 4096)


class _State:
    """Per caller-communicator state: the private Dup and reusable scratch buffers."""

    def __init__(self, comm):
        self.comm = comm.Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._scratch = {}
        self._pool = {}  # (module, dtype, n) -> free scratch arrays (see borrow)
        # the check's Allgather row: 6 int64 of metadata, then room for a small message
        self.small = SMALL_BYTES if self.size <= FUSE_MAX_RANKS else 0
        self._row = np.zeros(META + self.small // 8, dtype=np.int64)
        self._rows = np.zeros((self.size, self._row.size), dtype=np.int64)
        # auto's decision table for this host and size (tuning.py), or None: rank 0 reads, all get it
        self.auto = _tuning.shared(self.comm)
        # hier.py's hosts (per-host and leaders' communicators), made on first use of hier
        self.hier = None
        # shm.py's node (shared-memory communicator, windows, scratch), made on first use of shm
        self.shm = None

    def scratch(self, xp, dtype, n: int, kind: str = ""):
        """A 1-D scratch array of at least ``n`` elements, allocated once per (module, dtype, kind)."""
        key = (xp.__name__, np.dtype(dtype).str, kind)
        buf = self._scratch.get(key)
        if buf is None or buf.size < n:
            buf = xp.empty(max(n, 1), dtype=dtype)
            self._scratch[key] = buf
        return buf[:n]

    def wide(self, xp, n: int):
        """float32 scratch for a float16 sum (wide.py): never the same memory as ``scratch``'s slots."""
        return self.scratch(xp, np.float32, n, "wide")

    def borrow(self, xp, dtype, n: int):
        """Scratch of ``n`` elements for one of several operations in flight at once (non-blocking
        ones): taken from a pool, handed back with ``give_back`` and reused by the next step."""
        free = self._pool.setdefault((xp.__name__, np.dtype(dtype).str, n), [])
        return free.pop() if free else xp.empty(max(n, 1), dtype=dtype)[:n]

    def give_back(self, arr) -> None:
        self._pool[(backend.array_module(arr).__name__, arr.dtype.str, arr.size)].append(arr)


_KEYVAL = None
_NEW = threading.Lock()  # guards the attribute on first use (local work only: never held in MPI)


class _Slot:
    """What is cached on the caller's communicator: the calls guard (guard.Calls, made at once,
    locally) and the state (made collectively by the first call, holding the turn)."""

    def __init__(self):
        self.calls = _guard.Calls()
        self.state = None

    def make(self, comm) -> _State:
        """The state; the caller holds the turn, so two threads never Dup the communicator twice."""
        if self.state is None:
            st = _State(comm)
            st.calls = self.calls
            self.state = st
        return self.state


def _slot(comm) -> _Slot:
    """The slot cached on ``comm``; a ValueError (local, on every rank alike) for a bad communicator."""
    if not isinstance(comm, MPI.Comm) or not comm:
        raise ValueError(f"collectives: {_guard.comm_problem(comm)}")
    slot = comm.Get_attr(_KEYVAL) if _KEYVAL is not None else None
    if slot is None:
        problem = _guard.comm_problem(comm)  # intercommunicators: Is_inter() is local
        if problem:
            raise ValueError(f"collectives: {problem}")
        slot = _new_slot(comm)
    return slot


def _new_slot(comm) -> _Slot:
    global _KEYVAL
    with _NEW:
        if _KEYVAL is None:
            _KEYVAL = MPI.Comm.Create_keyval()
        slot = comm.Get_attr(_KEYVAL)
        if slot is None:
            slot = _Slot()
            comm.Set_attr(_KEYVAL, slot)
    return slot


def state_for(comm) -> _State:
    """The library state cached on ``comm`` (created collectively on first use)."""
    slot = _slot(comm)
    if slot.state is None:
        with slot.calls.turn:
            slot.make(comm)
    return slot.state


def enter(comm, what: str = "allreduce"):
    """(state, call) for one call on ``comm``: a ticket and the turn taken (guard.Calls), the state made.
    Leave with ``st.calls.leave(call)`` in a ``finally``."""
    c = comm if comm is not None else get_comm()
    slot = _slot(c)
    call = slot.calls.enter(what)
    try:
        return slot.make(c), call
    except BaseException:
        slot.calls.leave(call)
        raise


def reducer(xp, op: str):
    """The elementwise reduction for ``op`` (called as f(a, b, out=a))."""
    return getattr(xp, _UFUNC[op])


def finish_avg(view, p: int) -> None:
    """Divide a reduced sum by the number of ranks, in place (floor division for integers)."""
    if view.dtype.kind == "f":
        view /= view.dtype.type(p)
    else:
        view //= p


_RUN = {}


def _algorithms():
    if not _RUN:
        from . import hier, native, ring, shm, tree

        _RUN.update(ring=ring.allreduce, tree=tree.allreduce, native=native.allreduce,
                    hier=hier.allreduce, shm=shm.allreduce)
    return _RUN


ALGORITHMS = ("ring", "tree", "native", "auto", "hier", "shm")


def choose(nbytes: int, size: int, st=None) -> str:
    """What ``auto`` runs for a message of ``nbytes`` on ``size`` ranks (above SMALL_BYTES; below, it fuses).

    With a decision table stored for this host and rank count (tuning.py; ``bench --fit`` writes
    it from the cost model it fits): the algorithm the model predicts fastest -- the table on
    ``st`` (a communicator's state: read once by rank 0 and broadcast, so every rank decides
    alike) or, without ``st``, the one last read for ``size`` ranks. Without a table: the fixed
    threshold AUTO_RING_MIN_BYTES.
    """
    if size == 1:
        return "native"
    table = getattr(st, "auto", None) if st is not None else _tuning.last_for(size)
    if table is not None and table.ranks == size:
        return table.pick(nbytes)
    return "ring" if nbytes >= AUTO_RING_MIN_BYTES else "native"


_DT = {np.dtype(name): i for i, name in enumerate(DTYPES)}
_OPC = {name: i for i, name in enumerate(OPS)}
_ALG = {name: i for i, name in enumerate(ALGORITHMS)}


_DEV, _CARRY, _THREADS = 1, 2, 4  # bits of a row's column 5: on the GPU, carrying data, other threads alive


KINDS = ("allreduce", "reduce_scatter", "allgather")  # folded into the algorithm code: calls of different
_KIND_STEP = 16                                        # collectives on different ranks disagree, never hang


def _codes(row, buf, op, algorithm, st=None, call=None, kind: int = 0, busy: bool = False) -> None:
    """Local validation folded into integers, so that the check itself is collective (guard.py)."""
    problem, flags = _guard.buffer_problem(buf, _DT)
    if busy and not problem:
        problem = _guard.TAGS_BUSY
    n = dt = 0
    if not problem:
        n, dt = buf.size, _DT[buf.dtype]
    if call is not None:
        if st.calls.overlapped(call):
            problem = _guard.CONCURRENT
        if _guard.others_alive():
            flags |= _THREADS
    if _guard.thread_problem():
        problem = _guard.THREAD_LEVEL
    alg = _ALG.get(algorithm, -1) if isinstance(algorithm, str) else -1
    row[:META] = (n, dt, _OPC.get(op, -1) if isinstance(op, str) else -1,
                  alg + _KIND_STEP * kind if alg >= 0 else -1, problem, flags)


_PROBLEMS = {
    _guard.NOT_ARRAY: "buffer is not a NumPy or CuPy array",
    _guard.NOT_CONTIGUOUS: "buffer is not C-contiguous",
    _guard.DTYPE: f"dtype not supported (use one of {', '.join(DTYPES)})",
    _guard.READ_ONLY: "buffer is read-only (flags.writeable is False) but the result is written into it; "
                      "pass a writable array (e.g. a copy)",
    _guard.MISALIGNED: "buffer is not aligned to its dtype (a view at an odd byte offset, e.g. np.frombuffer(b, "
                       "dtype, offset=1)), which MPI cannot send; pass an aligned copy",
    _guard.BYTE_ORDER: "dtype is not in this machine's byte order (e.g. '>f4'); reduce "
                       "x.astype(x.dtype.newbyteorder('=')) and copy the result back",
    _guard.SUBCLASS: "buffer is an np.matrix or a masked array; pass a plain ndarray (np.asarray(x)) -- a "
                     "mask would be ignored",
    _guard.FOREIGN_DEVICE: "buffer is a GPU array of another library than CuPy; pass cupy.asarray(x) "
                           "(it shares the memory)",
    _guard.CONCURRENT: "called while another thread's call on this communicator was in progress on that rank; "
                       + _guard.CONCURRENT_ADVICE,
    _guard.TAGS_BUSY: f"{NB_TAGS[1]} non-blocking operations are still in flight on this communicator (the "
                      "oldest one's tag would be reused); wait() for earlier handles first",
    _guard.FREED_SHARED: "buffer lies in a shared window that free_shared() has freed (its memory is gone); "
                         "allocate a new one with alloc_shared",
}


def _describe(row) -> str:
    n, dt, opc, alg, problem, flags = (int(v) for v in row[:META])
    if problem == _guard.THREAD_LEVEL:
        return (f"called from a thread other than the main one, but MPI runs at {_guard.level_name()}, where only "
                "the main thread may call MPI (mpi4py's default, mpi4py.rc.thread_level = 'multiple', allows it)")
    if problem:
        return _PROBLEMS[problem]
    kind, alg = divmod(alg, _KIND_STEP) if alg >= 0 else (0, -1)
    return (f"{KINDS[kind] + ' of ' if kind else ''}{n} x {DTYPES[dt]}{' on the GPU' if flags & _DEV else ''}, "
            f"op={OPS[opc] if opc >= 0 else '?'}, algorithm={ALGORITHMS[alg] if alg >= 0 else '?'}")


def _explain(st: _State, op, algorithm, what: str = "allreduce") -> None:
    """The slow path of check(): say what is wrong, on every rank alike."""
    g = st._rows
    for r in range(st.size):
        if g[r, 4]:
            here = f" (here: thread {threading.current_thread().name!r})" if r == st.rank else ""
            raise ValueError(f"{what}: rank {r}: {_describe(g[r])}{here if g[r, 4] == _guard.CONCURRENT else ''}")
        if g[r, 2] < 0:
            name = f"unknown op {op!r}" if r == st.rank else "an unknown op"
            raise ValueError(f"{what}: rank {r} passed {name}; known ops: {', '.join(OPS)}")
        if g[r, 3] < 0:
            name = f"unknown algorithm {algorithm!r}" if r == st.rank else "an unknown algorithm"
            raise ValueError(f"{what}: rank {r} passed {name}; known: {', '.join(ALGORITHMS)}")
    calls = "; ".join(f"rank {r}: {_describe(g[r])}" for r in range(st.size))
    raise ValueError(f"{what}: ranks disagree on the call ({calls}); "
                     "every rank must pass the same length, dtype, op and algorithm")


def _agree_but_threads(g) -> bool:
    """The rows are equal but for the other-threads bit (which only decides the post-check)."""
    sig = g.copy()
    sig[:, 5] &= ~_THREADS
    return bool((sig == sig[0]).all())


def check(st: _State, buf, op, algorithm, payload: bool = False, call=None, what: str = "allreduce",
          kind: int = 0, shm_key: int | None = None, busy: bool = False) -> bool:
    """Raise the same ValueError on every rank when the ranks' calls disagree or are invalid.

    With ``payload``, a message of at most SMALL_BYTES travels in the same
    Allgather; returns True when it did (the caller then reduces st._rows).
    ``call`` (guard.Call, the turn held): the check also refuses overlapping calls and sets
    ``call.post`` when the call must end with ``st.calls.post_check`` (other threads alive).
    ``busy``: this rank has no free tag for the call (nonblocking.py); refused on every rank.
    """
    row = st._row
    _codes(row, buf, op, algorithm, st, call, kind, busy)
    bad = row[4] or row[2] < 0 or row[3] < 0
    nbytes = int(row[0]) * buf.itemsize if not bad else 0
    carry = payload and not bad and not row[5] & _DEV and nbytes <= st.small
    if carry:
        row[META:].view(np.uint8)[:nbytes] = buf.reshape(-1).view(np.uint8)
        row[5] |= _CARRY  # must agree too
    elif algorithm == "shm" and row.size > META:  # shm's sync 1 rides along (shm.checked)
        row[META] = -2 if shm_key is None else shm_key
    if st.size > 1:
        st.comm.Allgather(row, st._rows)
    else:
        st._rows[0] = row
    g = st._rows[:, :META]
    post = bool(row[5] & _THREADS)
    if bad or g.tobytes() != row[:META].tobytes() * st.size:
        if bad or not _agree_but_threads(g):
            _explain(st, op, algorithm, what)
        post = True
    if call is not None:
        call.post = post
    return carry


def fused(st: _State, buf, op: str):
    """Reduce the small message that travelled with the check: rows in rank order, on every rank.

    float16 sums and products accumulate in float32 and are rounded once (wide.py), as native.
    Cost: one Allgather of p·(48 B + SMALL_BYTES), i.e. about the latency of
    one small MPI collective, then (p-1)·n·gamma locally.
    """
    flat = buf.reshape(-1)
    nb = flat.nbytes
    rows = st._rows[:, META:].view(np.uint8)[:, :nb].view(flat.dtype)
    if _wide.needed(flat, op):
        acc = reducer(np, op).reduce(rows, axis=0, dtype=np.float32)
        if op == "avg":
            finish_avg(acc, st.size)
        _wide.narrow(flat, acc)
        return buf
    reducer(np, op).reduce(rows, axis=0, dtype=flat.dtype, out=flat)
    if op == "avg":
        finish_avg(flat, st.size)
    return buf


def allreduce(buf, comm=None, *, op: str = "sum", algorithm: str = "auto"):
    """Reduce ``buf`` in place across ``comm`` (default: the run's communicator); return ``buf``.

    ops: sum, avg (sum / size; floor division for integers), max, min, prod.
    algorithms: ring, tree, native, auto, hier (hier.py: reduce within each host, ring across
    hosts, broadcast within each host), shm (shm.py: one node, shared memory; zero-copy for
    ``alloc_shared`` buffers). Results are bitwise identical on all ranks.
    Concurrent calls on one communicator from several threads raise ValueError (guard.py).
    """
    st, call = enter(comm)
    try:
        _allreduce(st, call, buf, op, algorithm)
        st.calls.post_check(st, call)
    finally:
        st.calls.leave(call)
    return buf


def _allreduce(st, call, buf, op, algorithm):
    """allreduce with this rank's turn on the communicator held (``call``)."""
    if algorithm == "shm" and st.shm is not None:  # the check is shm's first sync too (shm.py)
        from . import shm

        if shm.checked(st, call, buf, op, check, lambda b: _guard.buffer_problem(b, _DT)[0]
                       or backend.is_device(b)):
            return buf
    if check(st, buf, op, algorithm, payload=algorithm == "auto", call=call):
        return fused(st, buf, op) if st.size > 1 else buf
    if algorithm == "auto":
        algorithm = choose(buf.nbytes, st.size, st)
    if st.size == 1 or buf.size == 0:
        return buf
    run = _algorithms()[algorithm]
    if backend.is_device(buf):  # staged through pinned host memory, or CUDA-aware (staging.py)
        from . import staging

        return staging.allreduce(algorithm, run, st, buf, op)
    backend.synchronize(buf)
    return run(st, buf, op)


def reduce_scatter(buf, comm=None, *, op: str = "sum", algorithm: str = "auto"):
    """Reduce ``buf`` across ``comm``; return this rank's chunk, a view (scatter.py: the ring's partition)."""
    from .scatter import reduce_scatter as _rs

    return _rs(buf, comm, op=op, algorithm=algorithm)


def allgather(buf, comm=None, *, algorithm: str = "auto"):
    """Fill ``buf`` in place with every rank's chunk (scatter.py); return ``buf``."""
    from .scatter import allgather as _ag

    return _ag(buf, comm, algorithm=algorithm)


def allreduce_init(buf, comm=None, *, op: str = "sum", algorithm: str = "auto"):
    """A persistent all-reduce plan of ``buf`` (checked once; start / test / wait / free): plan.py."""
    from .plan import allreduce_init as _init

    return _init(buf, comm, op=op, algorithm=algorithm)


def alloc_shared(n: int, dtype=np.float32, comm=None):
    """A zeroed array of ``n`` x ``dtype`` in a node-shared MPI window (collective; shm.py), which
    ``allreduce(..., algorithm="shm")`` reduces without copies; plain memory on a node of one rank."""
    from .shm import alloc_shared as _alloc

    return _alloc(n, dtype, comm)


def free_shared(arr, comm=None) -> None:
    """Free ``arr``'s shared window now (collective; shm.py). Do not use ``arr`` afterwards."""
    from .shm import free_shared as _free

    _free(arr, comm)


def owned_chunk(n: int, p: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of the chunk ``rank`` holds after reduce_scatter: chunk (rank + 1) mod p."""
    from .ring import owned

    return owned(n, p, rank)
