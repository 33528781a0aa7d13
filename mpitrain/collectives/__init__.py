"""``allreduce(buf, comm=None, *, op="sum", algorithm="auto")`` and the algorithm registry.

Every call:
  1. validates the buffer locally and, in one small Allgather on the library's
     private communicator, checks that every rank passed the same length, dtype,
     op and algorithm -- any mismatch raises ValueError on *every* rank, so no
     rank is left waiting in a receive;
  2. runs the chosen algorithm in place on the private communicator (a Dup of
     the caller's, made once and cached on it as an MPI attribute), so the
     library's messages never match a receive the caller has posted.

Algorithms: ring (bandwidth-optimal), tree (latency-optimal), native (the MPI
library's Allreduce, the reference), auto (messages <= SMALL_BYTES ride inside
the check's Allgather and are reduced locally in rank order -- one collective
in all, up to FUSE_MAX_RANKS ranks; larger ones go to the algorithm the stored
decision table -- written from a fitted cost model, tuning.py -- or the fixed threshold
says is fastest), hier (topology-aware: reduce
within each host, ring across the hosts' leaders, broadcast within each host;
hier.py, with MPITRAIN_HOSTS=block:K to emulate K hosts on one machine).
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from . import tuning as _tuning
from .. import backend
from ..runtime import get_comm

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

TAG_CHECK = 11  # tags on the library's private communicator (never tag 0)
TAG_RING = 12
TAG_TREE = 13
TAG_HIER = 14


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

    def scratch(self, xp, dtype, n: int):
        """A 1-D scratch array of at least ``n`` elements, allocated once per (module, dtype)."""
        key = (xp.__name__, np.dtype(dtype).str)
        buf = self._scratch.get(key)
        if buf is None or buf.size < n:
            buf = xp.empty(max(n, 1), dtype=dtype)
            self._scratch[key] = buf
        return buf[:n]

    def borrow(self, xp, dtype, n: int):
        """Scratch of ``n`` elements for one of several operations in flight at once (non-blocking
        ones): taken from a pool, handed back with ``give_back`` and reused by the next step."""
        free = self._pool.setdefault((xp.__name__, np.dtype(dtype).str, n), [])
        return free.pop() if free else xp.empty(max(n, 1), dtype=dtype)[:n]

    def give_back(self, arr) -> None:
        self._pool[(backend.array_module(arr).__name__, arr.dtype.str, arr.size)].append(arr)


_KEYVAL = None


def state_for(comm) -> _State:
    """The library state cached on ``comm`` (created collectively on first use)."""
    global _KEYVAL
    if _KEYVAL is None:
        _KEYVAL = MPI.Comm.Create_keyval()
    st = comm.Get_attr(_KEYVAL)
    if st is None:
        st = _State(comm)
        comm.Set_attr(_KEYVAL, st)
    return st


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
        from . import hier, native, ring, tree

        _RUN.update(ring=ring.allreduce, tree=tree.allreduce, native=native.allreduce,
                    hier=hier.allreduce)
    return _RUN


ALGORITHMS = ("ring", "tree", "native", "auto", "hier")


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


def _codes(row, buf, op, algorithm) -> None:
    """Local validation folded into integers, so that the check itself is collective."""
    problem = n = dt = dev = 0
    if not isinstance(buf, np.ndarray):
        if backend.is_device(buf):
            dev = 1
        else:
            problem = 1
    if not problem:
        if not buf.flags.c_contiguous:
            problem = 2
        else:
            dt = _DT.get(buf.dtype, -1)
            if dt < 0:
                problem, dt = 3, 0
            else:
                n = buf.size
    row[:META] = (n, dt, _OPC.get(op, -1) if isinstance(op, str) else -1,
                  _ALG.get(algorithm, -1) if isinstance(algorithm, str) else -1, problem, dev)


_PROBLEMS = {1: "buffer is not a NumPy or CuPy array", 2: "buffer is not C-contiguous",
             3: f"dtype not supported (use one of {', '.join(DTYPES)})"}


def _describe(row) -> str:
    n, dt, opc, alg, problem, dev = (int(v) for v in row[:META])
    if problem:
        return _PROBLEMS[problem]
    return (f"{n} x {DTYPES[dt]}, op={OPS[opc] if opc >= 0 else '?'}, "
            f"algorithm={ALGORITHMS[alg] if alg >= 0 else '?'}")


def _explain(st: _State, op, algorithm) -> None:
    """The slow path of check(): say what is wrong, on every rank alike."""
    g = st._rows
    for r in range(st.size):
        if g[r, 4]:
            raise ValueError(f"allreduce: rank {r}: {_describe(g[r])}")
        if g[r, 2] < 0:
            name = f"unknown op {op!r}" if r == st.rank else "an unknown op"
            raise ValueError(f"allreduce: rank {r} passed {name}; known ops: {', '.join(OPS)}")
        if g[r, 3] < 0:
            name = f"unknown algorithm {algorithm!r}" if r == st.rank else "an unknown algorithm"
            raise ValueError(f"allreduce: rank {r} passed {name}; known: {', '.join(ALGORITHMS)}")
    calls = "; ".join(f"rank {r}: {_describe(g[r])}" for r in range(st.size))
    raise ValueError(f"allreduce: ranks disagree on the call ({calls}); "
                     "every rank must pass the same length, dtype, op and algorithm")


def check(st: _State, buf, op, algorithm, payload: bool = False) -> bool:
    """Raise the same ValueError on every rank when the ranks' calls disagree or are invalid.

    With ``payload``, a message of at most SMALL_BYTES travels in the same
    Allgather; returns True when it did (the caller then reduces st._rows).
    """
    row = st._row
    _codes(row, buf, op, algorithm)
    nbytes = int(row[0]) * buf.itemsize if not row[4] else 0
    carry = payload and not row[4] and not row[5] and nbytes <= st.small
    if carry:
        row[META:].view(np.uint8)[:nbytes] = buf.reshape(-1).view(np.uint8)
        row[5] = -1  # "carrying": must agree too
    if st.size > 1:
        st.comm.Allgather(row, st._rows)
    else:
        st._rows[0] = row
    mine = row[:META].tobytes()
    if row[4] or row[2] < 0 or row[3] < 0 or st._rows[:, :META].tobytes() != mine * st.size:
        _explain(st, op, algorithm)
    return carry


def fused(st: _State, buf, op: str):
    """Reduce the small message that travelled with the check: rows in rank order, on every rank.

    Cost: one Allgather of p·(48 B + SMALL_BYTES), i.e. about the latency of
    one small MPI collective, then (p-1)·n·gamma locally.
    """
    flat = buf.reshape(-1)
    nb = flat.nbytes
    rows = st._rows[:, META:].view(np.uint8)[:, :nb].view(flat.dtype)
    reducer(np, op).reduce(rows, axis=0, dtype=flat.dtype, out=flat)
    if op == "avg":
        finish_avg(flat, st.size)
    return buf


def allreduce(buf, comm=None, *, op: str = "sum", algorithm: str = "auto"):
    """Reduce ``buf`` in place across ``comm`` (default: the run's communicator); return ``buf``.

    ops: sum, avg (sum / size; floor division for integers), max, min, prod.
    algorithms: ring, tree, native, auto, hier (hier.py: reduce within each host, ring across
    hosts, broadcast within each host). Results are bitwise identical on all ranks.
    """
    st = state_for(comm if comm is not None else get_comm())
    if check(st, buf, op, algorithm, payload=algorithm == "auto"):
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
