"""What the bench times (``--collective``): the call per algorithm, the busbw factor, the reference.

    collective      algorithms                  #wrong against                              busbw
    allreduce       ring tree native auto ...   native's result for the same input, and     algbw*2(n-1)/n
                                                bitwise identical on every rank
    reduce_scatter  ring native auto            the formula: this rank's chunk              algbw*(n-1)/n
                                                (owned_chunk) of op over every rank's input
    allgather       ring native auto            the formula: every rank's chunk of its own  algbw*(n-1)/n
                                                input, in place; exact, bitwise on every rank

Every rank's input is ``make_source(n, dtype, op, rank, seed)`` (checks.py); a rank builds the
others' inputs itself to get the formula. The sweep's buffers are the first n elements of inputs
of the largest size, and ``make_source`` draws its elements in order, so the prefix is the input
of size n (tests/test_bench.py checks it). busbw follows nccl-tests: the size is the whole buffer,
and each half of the ring moves (n-1)/n of it over every link.
"""

from __future__ import annotations

import numpy as np

from ..collectives import ALGORITHMS, allgather, allreduce, choose, owned_chunk, reduce_scatter, state_for
from ..collectives.scatter import ALGORITHMS as HALF_ALGORITHMS
from .checks import check_result, count_wrong, make_source

COLLECTIVES = ("allreduce", "reduce_scatter", "allgather")


def algorithms_for(collective: str) -> tuple[str, ...]:
    """The algorithms ``collective`` has (allreduce: all of them; the halves: ring, native, auto)."""
    return ALGORITHMS if collective == "allreduce" else HALF_ALGORITHMS


def busbw_factor(n: int, collective: str = "allreduce") -> float:
    """Bus bandwidth factor: 2(n-1)/n for allreduce, (n-1)/n for its halves (1 for a single rank)."""
    if n <= 1:
        return 1.0
    return 2.0 * (n - 1) / n if collective == "allreduce" else (n - 1) / n


def call(comm, collective: str, name: str, op: str):
    """fn(buf): one ``collective`` with algorithm ``name`` on ``buf`` (in place)."""
    if collective == "reduce_scatter":
        return lambda b: reduce_scatter(b, comm, op=op, algorithm=name)
    if collective == "allgather":
        return lambda b: allgather(b, comm, algorithm=name)
    return lambda b: allreduce(b, comm, op=op, algorithm=name)


def picked(comm, collective: str, nbytes: int) -> str:
    """What ``auto`` runs for ``nbytes`` (the halves map every choice but ring to native)."""
    c = choose(nbytes, comm.Get_size(), state_for(comm))
    return c if collective == "allreduce" else ("ring" if c == "ring" else "native")


_REDUCE = {"sum": np.add, "avg": np.add, "max": np.maximum, "min": np.minimum, "prod": np.multiply}


def reduce_formula(n: int, dt, op: str, p: int, seed: int) -> np.ndarray:
    """op over every rank's input of n elements (float64 / int64 accumulation, rounded once)."""
    dt = np.dtype(dt)
    acc = make_source(n, dt, op, 0, seed).astype(np.float64 if dt.kind == "f" else np.int64)
    for q in range(1, p):
        _REDUCE[op](acc, make_source(n, dt, op, q, seed), out=acc)
    if op == "avg":
        acc = acc / p if dt.kind == "f" else acc // p
    return acc.astype(dt)


def gather_formula(n: int, dt, op: str, p: int, seed: int) -> np.ndarray:
    """Every rank q's chunk owned_chunk(n, p, q) of its own input, each at its place."""
    out = np.empty(n, dtype=dt)
    for q in range(p):
        lo, hi = owned_chunk(n, p, q)
        out[lo:hi] = make_source(n, dt, op, q, seed)[lo:hi]
    return out


class Reference:
    """The formula a reduce_scatter or allgather result is checked against (none for allreduce)."""

    def __init__(self, comm, collective: str, dt, op: str, rtol: float, xp, seed: int):
        self.comm, self.collective, self.dt, self.op, self.xp, self.seed = comm, collective, dt, op, xp, seed
        self.p, self.rank = comm.Get_size(), comm.Get_rank()
        self.rtol = rtol if collective == "reduce_scatter" else 0.0  # a gather copies: exact

    def fill(self, ref, n: int) -> None:
        """Write the expected result for n elements into ``ref`` (n elements)."""
        f = reduce_formula if self.collective == "reduce_scatter" else gather_formula
        ref[...] = self.xp.asarray(f(n, self.dt, self.op, self.p, self.seed))

    def wrong(self, buf, ref) -> int:
        """Collective for allgather. Wrong elements of this rank's result (reduce_scatter: its chunk)."""
        if self.collective == "reduce_scatter":
            lo, hi = owned_chunk(buf.size, self.p, self.rank)
            return count_wrong(buf[lo:hi], ref[lo:hi], self.rtol, self.xp)
        return check_result(self.comm, buf, ref, 0.0, self.xp)
