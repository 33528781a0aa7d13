"""``reduce_scatter`` and ``allgather``: the two halves of the ring all-reduce as collectives of their own.

    reduce_scatter(buf, op)                         allgather(buf)
    r0: | a0 | b0 | c0 |                            r0: |    | B  |    |      each rank holds its own
    r1: | a1 | b1 | c1 |   -->  r0 holds B = b*     r1: |    |    | C  |      chunk; afterwards every
    r2: | a2 | b2 | c2 |        r1 holds C = c*     r2: | A  |    |    |      rank holds all of them
                                r2 holds A = a*

The partition is the ring's: chunk k = ``partition.chunk_bounds(n, p, k)``, and rank r holds
chunk (r + 1) mod p -- ``owned_chunk(n, p, r)`` -- because the ring reduces chunk k along the
chain k, k+1, ..., k-1 and finishes it on rank k-1. So ``allreduce(ring)`` is exactly
``reduce_scatter(ring)`` then ``allgather(ring)``, bit for bit (ZeRO-1, sync/zero.py, relies on
it). ``native`` keeps that ownership: MPI_Reduce_scatter over the chunks rotated by one (a copy
of the buffer), MPI_Allgatherv with each rank's chunk at its own displacement (no copy).

reduce_scatter reduces in place and returns the view ``buf[lo:hi]`` of this rank's chunk; the rest
of ``buf`` is left holding partial sums (scratch). allgather fills ``buf`` in place from every rank's
chunk. The same contract as allreduce: one agreement check (it also tells the collectives apart),
own tags, any length and rank count, the dtypes and ops of allreduce (float16 sums in float32).

Cost (n elements, p ranks), each half of the ring all-reduce:
    reduce_scatter: (p-1)·alpha + (p-1)/p·n·beta + (p-1)/p·n·gamma
    allgather:      (p-1)·alpha + (p-1)/p·n·beta                       busbw = algbw·(p-1)/p
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from . import _MPI_OP, check, choose, enter, finish_avg, ring, wide
from .partition import chunk_bounds
from .. import backend

ALGORITHMS = ("ring", "native", "auto")
RS, AG = 1, 2  # kinds in the agreement check (collectives.KINDS)


def owned_chunk(n: int, p: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of the chunk ``rank`` holds after a reduce_scatter (and contributes to an allgather)."""
    return ring.owned(n, p, rank)


def _resolve(st, buf, algorithm: str, what: str) -> str:
    """Every rank passed the same algorithm (checked): refuse one without a half alike on every rank."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{what}: algorithm {algorithm!r} has no {what}; use one of {', '.join(ALGORITHMS)}")
    if algorithm == "auto":
        return "ring" if choose(buf.nbytes, st.size, st) == "ring" else "native"
    return algorithm


def _native_rs(st, flat, op):
    p, n = st.size, flat.size
    e0 = chunk_bounds(n, p, 0)[1]
    rotated = np.concatenate([flat[e0:], flat[:e0]])  # chunks 1, 2, ..., p-1, 0: rank q gets chunk q+1
    counts = [(lambda b: b[1] - b[0])(owned_chunk(n, p, q)) for q in range(p)]
    lo, hi = owned_chunk(n, p, st.rank)
    out = np.empty(max(hi - lo, 1), dtype=flat.dtype)[:hi - lo]
    yield st.comm.Ireduce_scatter(rotated, out, counts, op=_MPI_OP[op])
    if op == "avg":
        finish_avg(out, p)
    flat[lo:hi] = out


def _native_ag(st, flat):
    p, n = st.size, flat.size
    b = flat.view(np.uint8)
    bounds = [owned_chunk(n, p, q) for q in range(p)]
    counts = [(hi - lo) * flat.itemsize for lo, hi in bounds]
    displs = [lo * flat.itemsize for lo, _ in bounds]
    yield st.comm.Iallgatherv(MPI.IN_PLACE, [b, (counts, displs), MPI.BYTE])


def steps(st, flat, op, algorithm, phase, *, tag=None, slots=None):
    """The half ``phase`` ("rs" | "ag") as a generator of requests (blocking and non-blocking alike)."""
    if st.size == 1 or flat.size == 0:
        return
    if algorithm == "native":
        yield from _native_rs(st, flat, op) if phase == "rs" else _native_ag(st, flat)
    else:
        kw = {"tag": tag} if tag is not None else {}
        yield from ring.steps(st, flat, op, phase=phase, slots=slots, **kw)


def _drive(st, flat, op, algorithm, phase):
    if phase == "rs" and wide.needed(flat, op):  # float16 sums in float32, rounded once (wide.py)
        w = flat.astype(np.float32)
        _drive(st, w, op, algorithm, phase)
        lo, hi = owned_chunk(flat.size, st.size, st.rank)
        wide.narrow(flat[lo:hi], w[lo:hi])
        return
    for req in steps(st, flat, op, algorithm, phase):
        req.Wait()


def _call(buf, comm, op, algorithm, phase, what):
    st, call = enter(comm, what)
    try:
        check(st, buf, op, algorithm, call=call, what=what, kind=RS if phase == "rs" else AG)
        alg = _resolve(st, buf, algorithm, what)
        flat = buf.reshape(-1)
        if st.size > 1 and flat.size:
            if backend.is_device(flat):  # staged through host memory
                host = backend.to_numpy(flat).copy()
                _drive(st, host, op, alg, phase)
                flat[...] = backend.array_module(flat).asarray(host)
            else:
                _drive(st, flat, op, alg, phase)
        st.calls.post_check(st, call, what)
        return st, flat
    finally:
        st.calls.leave(call)


def reduce_scatter(buf, comm=None, *, op: str = "sum", algorithm: str = "auto"):
    """Reduce ``buf`` across ``comm``; return this rank's finished chunk (a view, ``owned_chunk``)."""
    st, flat = _call(buf, comm, op, algorithm, "rs", "reduce_scatter")
    lo, hi = owned_chunk(flat.size, st.size, st.rank)
    return flat[lo:hi]


def allgather(buf, comm=None, *, algorithm: str = "auto"):
    """Fill ``buf`` in place with every rank's chunk (``owned_chunk``); return ``buf``."""
    _call(buf, comm, "sum", algorithm, "ag", "allgather")
    return buf
