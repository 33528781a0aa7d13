"""Ring all-reduce: reduce-scatter, then all-gather, pipelined in segments.

    p = 4, the buffer cut into 4 chunks; rank r sends to r+1, receives from r-1

    reduce-scatter (p-1 steps)             all-gather (p-1 steps)
    step 0: r sends chunk r                step 0: r sends chunk r+1 (now final)
    step s: r sends chunk r-s, receives    step s: r sends chunk r+1-s, receives
            chunk r-s-1 and adds it in             chunk r-s into place
    after p-1 steps rank r owns the        after p-1 steps every rank has
    finished chunk r+1                     every chunk

         +---> r0 ---> r1 ---> r2 ---> r3 ---+
         |                                   |
         +-----------------------------------+

Each chunk is cut into segments. A segment is forwarded to the right the
moment it has been reduced (so step s+1 of segment j overlaps step s of
segment j+1), and receives are posted `DEPTH` segments ahead into reused
scratch slots, so the wire and the reduction run at the same time.

Every chunk is reduced exactly once, along a fixed chain of ranks, and then
copied: results are bitwise identical on every rank. For avg the owner of a
chunk divides it before the all-gather.

Cost: 2(p-1)·alpha + 2(p-1)/p·n·beta + (p-1)/p·n·gamma
(plus (segments-1)·alpha of pipelining start-up per step, hidden by overlap).
Bandwidth-optimal: use it for long messages.
"""

from __future__ import annotations

import os

from mpi4py import MPI

from . import TAG_RING, finish_avg, reducer
from .partition import chunk_bounds, segments
from .. import backend

# Segment size: None = adaptive (about a quarter of a chunk, between 256 KiB and 4 MiB,
# measured best on a 2-core box at 1-64 MiB with 2 and 4 ranks: docs/benchmarks.md).
# MPITRAIN_RING_SEGMENT=bytes fixes it.
SEGMENT_BYTES = int(os.environ["MPITRAIN_RING_SEGMENT"]) if os.environ.get("MPITRAIN_RING_SEGMENT") else None
SEGMENT_MIN, SEGMENT_MAX = 256 * 1024, 4 * 1024 * 1024
DEPTH = 4  # receives posted ahead


def segment_bytes(nbytes: int, p: int) -> int:
    """The segment size for a message of ``nbytes`` on ``p`` ranks (the same on every rank)."""
    if SEGMENT_BYTES:
        return SEGMENT_BYTES
    return min(SEGMENT_MAX, max(SEGMENT_MIN, nbytes // p // 4))


def plan(n: int, p: int, rank: int, seg_elems: int):
    """The ordered list of (step, lo, hi) receives this rank performs.

    Steps 0..p-2 are reduce-scatter, p-1..2p-3 all-gather. The left neighbour
    sends the same (step, segment) sequence in the same order, so one tag is
    enough (MPI does not overtake messages between one pair on one tag).
    """
    units = []
    for t in range(2 * (p - 1)):
        k = (rank - t - 1) % p if t < p - 1 else (rank - (t - (p - 1))) % p
        lo, hi = chunk_bounds(n, p, k)
        units += [(t, a, b) for a, b in segments(lo, hi, seg_elems)]
    return units


def allreduce(st, buf, op: str, seg_bytes: int | None = None):
    comm, r, p = st.comm, st.rank, st.size
    xp = backend.array_module(buf)
    f = reducer(xp, op)
    flat = buf.reshape(-1)
    n = flat.size
    seg = max(1, (seg_bytes or segment_bytes(flat.nbytes, p)) // flat.itemsize)
    left, right = (r - 1) % p, (r + 1) % p
    last_rs = p - 2  # the step after which this rank's chunk is final
    units = plan(n, p, r, seg)
    slots = st.scratch(xp, flat.dtype, DEPTH * min(seg, -(-n // p)))
    width = slots.size // DEPTH
    sends = {}  # (send step, lo) -> request

    # step 0 of the reduce-scatter: send my own chunk, segment by segment
    lo0, hi0 = chunk_bounds(n, p, r)
    for a, b in segments(lo0, hi0, seg):
        sends[(0, a)] = comm.Isend(flat[a:b], dest=right, tag=TAG_RING)

    recvs = [None] * len(units)

    def post(i):
        t, a, b = units[i]
        if t <= last_rs:
            dst = slots[(i % DEPTH) * width:(i % DEPTH) * width + (b - a)]
        else:  # all-gather: straight into place, once the send of that region is done
            old = sends.pop((t - (p - 1), a), None)
            if old is not None:
                old.Wait()
            dst = flat[a:b]
        recvs[i] = (comm.Irecv(dst, source=left, tag=TAG_RING), dst)

    for i in range(min(DEPTH, len(units))):
        post(i)
    for i, (t, a, b) in enumerate(units):
        req, dst = recvs[i]
        req.Wait()
        recvs[i] = None
        if t <= last_rs:
            view = flat[a:b]
            f(view, dst, out=view)
            if t == last_rs and op == "avg":
                finish_avg(view, p)
        if i + DEPTH < len(units):
            post(i + DEPTH)
        if t < 2 * (p - 1) - 1:
            sends[(t + 1, a)] = comm.Isend(flat[a:b], dest=right, tag=TAG_RING)
    MPI.Request.Waitall(list(sends.values()))
    return buf
