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
library's Allreduce, the reference), auto (picks one by message size).
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .. import backend
from ..runtime import get_comm

OPS = ("sum", "avg", "max", "min", "prod")
DTYPES = ("float16", "float32", "float64", "int32", "int64")
# Name of the elementwise function in numpy / cupy for each op.
_UFUNC = {"sum": "add", "avg": "add", "max": "maximum", "min": "minimum", "prod": "multiply"}
_MPI_OP = {"sum": MPI.SUM, "avg": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}

# Below this many bytes `auto` uses the MPI library's Allreduce (latency-bound;
# Python overhead per ring step dominates), above it the pipelined ring.
AUTO_RING_MIN_BYTES = 64 * 1024

TAG_CHECK = 11  # tags on the library's private communicator (never tag 0)
TAG_RING = 12
TAG_TREE = 13


class _State:
    """Per caller-communicator state: the private Dup and reusable scratch buffers."""

    def __init__(self, comm):
        self.comm = comm.Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._scratch = {}
        self._meta = np.zeros(6, dtype=np.int64)
        self._gathered = np.zeros((self.size, 6), dtype=np.int64)

    def scratch(self, xp, dtype, n: int):
        """A 1-D scratch array of at least ``n`` elements, allocated once per (module, dtype)."""
        key = (xp.__name__, np.dtype(dtype).str)
        buf = self._scratch.get(key)
        if buf is None or buf.size < n:
            buf = xp.empty(max(n, 1), dtype=dtype)
            self._scratch[key] = buf
        return buf[:n]


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


def _algorithms():
    from . import native, ring, tree

    return {"ring": ring.allreduce, "tree": tree.allreduce, "native": native.allreduce}


ALGORITHMS = ("ring", "tree", "native", "auto")


def choose(nbytes: int, size: int) -> str:
    """What ``auto`` runs for a message of ``nbytes`` on ``size`` ranks."""
    if size == 1:
        return "native"
    return "ring" if nbytes >= AUTO_RING_MIN_BYTES else "native"


def _codes(buf, op, algorithm):
    """Local validation folded into integers so that the check itself is collective."""
    problem = 0
    n = dt = -1
    if not (isinstance(buf, np.ndarray) or backend.is_device(buf)):
        problem = 1
    elif not buf.flags.c_contiguous:
        problem = 2
    elif np.dtype(buf.dtype).name not in DTYPES:
        problem = 3
    else:
        n = int(buf.size)
        dt = DTYPES.index(np.dtype(buf.dtype).name)
    opc = OPS.index(op) if op in OPS else -1
    alg = ALGORITHMS.index(algorithm) if algorithm in ALGORITHMS else -1
    return [n, dt, opc, alg, problem, 1 if backend.is_device(buf) else 0]


_PROBLEMS = {1: "buffer is not a NumPy or CuPy array", 2: "buffer is not C-contiguous",
             3: f"dtype not supported (use one of {', '.join(DTYPES)})"}


def _describe(row) -> str:
    n, dt, opc, alg, problem, dev = (int(v) for v in row)
    if problem:
        return _PROBLEMS[problem]
    return (f"{n} x {DTYPES[dt]}, op={OPS[opc] if opc >= 0 else '?'}, "
            f"algorithm={ALGORITHMS[alg] if alg >= 0 else '?'}")


def check(st: _State, buf, op, algorithm) -> None:
    """Raise the same ValueError on every rank when the ranks' calls disagree or are invalid."""
    st._meta[:] = _codes(buf, op, algorithm)
    if st.size > 1:
        st.comm.Allgather(st._meta, st._gathered)
    else:
        st._gathered[0] = st._meta
    g = st._gathered
    for r in range(st.size):
        if g[r, 4]:
            raise ValueError(f"allreduce: rank {r}: {_describe(g[r])}")
        if g[r, 2] < 0:
            name = f"unknown op {op!r}" if r == st.rank else "an unknown op"
            raise ValueError(f"allreduce: rank {r} passed {name}; known ops: {', '.join(OPS)}")
        if g[r, 3] < 0:
            name = f"unknown algorithm {algorithm!r}" if r == st.rank else "an unknown algorithm"
            raise ValueError(f"allreduce: rank {r} passed {name}; known: {', '.join(ALGORITHMS)}")
    if (g[:, :4] != g[0, :4]).any():
        calls = "; ".join(f"rank {r}: {_describe(g[r])}" for r in range(st.size))
        raise ValueError(f"allreduce: ranks disagree on the call ({calls}); "
                         "every rank must pass the same length, dtype, op and algorithm")


def allreduce(buf, comm=None, *, op: str = "sum", algorithm: str = "auto"):
    """Reduce ``buf`` in place across ``comm`` (default: the run's communicator); return ``buf``.

    ops: sum, avg (sum / size; floor division for integers), max, min, prod.
    algorithms: ring, tree, native, auto. Results are bitwise identical on all ranks.
    """
    st = state_for(comm if comm is not None else get_comm())
    check(st, buf, op, algorithm)
    if algorithm == "auto":
        algorithm = choose(buf.nbytes, st.size)
    if st.size == 1 or buf.size == 0:
        return buf
    run = _algorithms()[algorithm]
    if backend.is_device(buf) and not backend.cuda_aware_mpi():
        from .staging import staged

        return staged(run, st, buf, op)
    backend.synchronize(buf)
    return run(st, buf, op)
