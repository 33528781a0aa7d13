"""Binomial-tree reduce to rank 0, then binomial-tree broadcast.

    reduce (p = 6)                      broadcast (the same edges, reversed)
    step 1:  1->0   3->2   5->4         step 1:  0->4
    step 2:  2->0                       step 2:  0->2          (4->6: no such rank)
    step 3:  4->0                       step 3:  0->1   2->3   4->5

    rank r, for mask = 1, 2, 4, ...: if r & mask, send to r - mask and stop;
    otherwise receive from r + mask (if it exists) and reduce into buf.
    Broadcast walks the masks back down from the root.

Works for any p (not only powers of two). The result is computed once, at
rank 0, and copied, so it is bitwise identical on every rank.

Cost: 2·ceil(log2 p)·(alpha + n·beta) + ceil(log2 p)·n·gamma.
Latency-optimal, but every step moves the whole buffer: use it for short
messages.
"""

from __future__ import annotations

from . import TAG_TREE, finish_avg, reducer, wide
from .. import backend


def allreduce(st, buf, op: str):
    """Blocking tree all-reduce of ``buf`` on the library state ``st`` (float16 sums in float32: wide.py)."""
    if wide.needed(buf, op):
        return wide.blocking(st, buf, op, allreduce)
    for req in steps(st, buf, op):
        req.Wait()
    return buf


def steps(st, buf, op: str, *, tag: int = TAG_TREE, tmp=None):
    """The tree as a generator that yields each request it must see completed (see ring.steps)."""
    comm, r, p = st.comm, st.rank, st.size
    xp = backend.array_module(buf)
    f = reducer(xp, op)
    flat = buf.reshape(-1)
    if tmp is None:
        tmp = st.scratch(xp, buf.dtype, flat.size)
    mask = 1
    while mask < p:  # reduce toward rank 0
        if r & mask:
            yield comm.Isend(flat, dest=r - mask, tag=tag)
            break
        if r + mask < p:
            yield comm.Irecv(tmp, source=r + mask, tag=tag)
            f(flat, tmp, out=flat)
        mask <<= 1
    if r == 0 and op == "avg":
        finish_avg(flat, p)
    # broadcast: rank r (r > 0) receives from r - lowbit(r), then sends to r + m for m < lowbit(r)
    if r:
        low = r & -r
        yield comm.Irecv(flat, source=r - low, tag=tag)
    else:
        low = 1
        while low < p:
            low <<= 1
    m = low >> 1
    sends = []
    while m:
        if r + m < p:
            sends.append(comm.Isend(flat, dest=r + m, tag=tag))
        m >>= 1
    yield from sends
