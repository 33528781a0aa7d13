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

from . import TAG_TREE, finish_avg, reducer
from .. import backend


def allreduce(st, buf, op: str):
    comm, r, p = st.comm, st.rank, st.size
    xp = backend.array_module(buf)
    f = reducer(xp, op)
    flat = buf.reshape(-1)
    tmp = st.scratch(xp, buf.dtype, flat.size)
    mask = 1
    while mask < p:  # reduce toward rank 0
        if r & mask:
            comm.Send(flat, dest=r - mask, tag=TAG_TREE)
            break
        if r + mask < p:
            comm.Recv(tmp, source=r + mask, tag=TAG_TREE)
            f(flat, tmp, out=flat)
        mask <<= 1
    if r == 0 and op == "avg":
        finish_avg(flat, p)
    # broadcast: rank r (r > 0) receives from r - lowbit(r), then sends to r + m for m < lowbit(r)
    if r:
        low = r & -r
        comm.Recv(flat, source=r - low, tag=TAG_TREE)
    else:
        low = 1
        while low < p:
            low <<= 1
    m = low >> 1
    while m:
        if r + m < p:
            comm.Send(flat, dest=r + m, tag=TAG_TREE)
        m >>= 1
    return buf
