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

from . import TAG_RING, finish_avg, reducer, wide
from .partition import chunk_bounds, segments
from .. import backend

# Segment size: None = adaptive (about a quarter of a chunk, between 1 MiB and 4 MiB,
# measured best on a 2-core box at 1-64 MiB with 2 and 4 ranks: docs/benchmarks.md).
# MPITRAIN_RING_SEGMENT=bytes fixes it.
SEGMENT_BYTES = int(os.environ["MPITRAIN_RING_SEGMENT"]) if os.environ.get("MPITRAIN_RING_SEGMENT") else None
SEGMENT_MIN, SEGMENT_MAX = 1024 * 1024, 4 * 1024 * 1024
DEPTH = 4  # receives posted ahead


def segment_bytes(nbytes: int, p: int) -> int:
    """The segment size for a message of ``nbytes`` on ``p`` ranks (the same on every rank)."""
    if SEGMENT_BYTES:
        return SEGMENT_BYTES
    return min(SEGMENT_MAX, max(SEGMENT_MIN, nbytes // p // 4))


def slot_elems(n: int, p: int, itemsize: int) -> int:
    """Elements of scratch ``steps`` needs for ``n`` elements on ``p`` ranks (DEPTH segment slots)."""
    seg = max(1, segment_bytes(n * itemsize, p) // itemsize)
    return DEPTH * min(seg, -(-n // p))


PHASES = {"both": (0, 2), "rs": (0, 1), "ag": (1, 2)}  # in units of p-1 steps


def owned(n: int, p: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of the chunk rank ``rank`` holds finished after the reduce-scatter: chunk rank+1.

    (Chunk k starts on rank k and is reduced along k, k+1, ..., k+p-1 = k-1, which finishes it.)
    """
    return chunk_bounds(n, p, (rank + 1) % p)


def plan(n: int, p: int, rank: int, seg_elems: int, phase: str = "both"):
    """The ordered list of (step, lo, hi) receives this rank performs.

    Steps 0..p-2 are reduce-scatter, p-1..2p-3 all-gather (``phase`` "rs" or
    "ag": only those). The left neighbour sends the same (step, segment) sequence
    in the same order, so one tag is enough (MPI does not overtake messages
    between one pair on one tag).
    """
    units = []
    a0, a1 = PHASES[phase]
    for t in range(a0 * (p - 1), a1 * (p - 1)):
        k = (rank - t - 1) % p if t < p - 1 else (rank - (t - (p - 1))) % p
        lo, hi = chunk_bounds(n, p, k)
        units += [(t, a, b) for a, b in segments(lo, hi, seg_elems)]
    return units


def allreduce(st, buf, op: str, seg_bytes: int | None = None):
    """Blocking ring all-reduce of ``buf`` on the library state ``st`` (float16 sums in float32: wide.py)."""
    if wide.needed(buf, op):
        return wide.blocking(st, buf, op, lambda s, w, o: allreduce(s, w, o, seg_bytes))
    for req in steps(st, buf, op, seg_bytes=seg_bytes):
        req.Wait()
    return buf


def steps(st, buf, op: str, *, seg_bytes: int | None = None, tag: int = TAG_RING, slots=None,
          phase: str = "both"):
    """The ring as a generator: it yields each request it must see completed before going on.

    ``allreduce`` drives it with ``Wait``; a non-blocking handle drives it with
    ``Test`` between other work (collectives/nonblocking.py). ``slots`` is the
    scratch for DEPTH in-flight segments (default: the state's shared scratch).
    ``phase``: "both" (the all-reduce), "rs" (the reduce-scatter half: rank r ends
    holding ``owned(n, p, r)`` reduced, the rest of ``buf`` partial) or "ag" (the
    all-gather half: every rank contributes its owned chunk, all receive the rest).
    """
    comm, r, p = st.comm, st.rank, st.size
    xp = backend.array_module(buf)
    f = reducer(xp, op)
    flat = buf.reshape(-1)
    n = flat.size
    if p == 1 or n == 0:
        return
    seg = max(1, (seg_bytes or segment_bytes(flat.nbytes, p)) // flat.itemsize)
    width = min(seg, -(-n // p))  # one slot: the longest segment
    left, right = (r - 1) % p, (r + 1) % p
    last_rs = p - 2  # the step after which this rank's chunk is final
    t0, t_end = (a * (p - 1) for a in PHASES[phase])
    units = plan(n, p, r, seg, phase)
    if slots is None and t0 == 0:
        slots = st.scratch(xp, flat.dtype, DEPTH * width)
    sends = {}  # (send step, lo) -> request still in flight
    issued = set()  # (send step, lo) of every send started so far
    dev = backend.is_device(flat)  # CUDA-aware MPI: finish the reduce kernel before MPI reads

    # the first step: the reduce-scatter sends my own chunk, the all-gather alone my finished one
    lo0, hi0 = chunk_bounds(n, p, r) if t0 == 0 else owned(n, p, r)
    for a, b in segments(lo0, hi0, seg):
        sends[(t0, a)] = comm.Isend(flat[a:b], dest=right, tag=tag)
        issued.add((t0, a))

    recvs = [None] * len(units)
    posted = 0  # receives are posted in unit order, at most DEPTH ahead

    def postable(j):
        """An all-gather receive lands in place: only after that region's reduce-scatter send began."""
        t, a, _ = units[j]
        return t <= last_rs or t0 > 0 or (t - (p - 1), a) in issued

    def post_upto(limit):
        nonlocal posted
        while posted < min(limit, len(units)) and postable(posted):
            t, a, b = units[posted]
            if t <= last_rs:
                k = posted % DEPTH
                dst = slots[k * width:k * width + (b - a)]
            else:  # never receive into a region a send is still reading
                old = sends.pop((t - (p - 1), a), None)
                if old is not None:
                    yield old
                dst = flat[a:b]
            recvs[posted] = (comm.Irecv(dst, source=left, tag=tag), dst)
            posted += 1

    yield from post_upto(DEPTH)
    for i, (t, a, b) in enumerate(units):
        yield from post_upto(i + 1)  # always possible: every reduce-scatter send precedes unit i
        req, dst = recvs[i]
        yield req
        recvs[i] = None
        if t <= last_rs:
            view = flat[a:b]
            f(view, dst, out=view)
            if t == last_rs and op == "avg":
                finish_avg(view, p)
            if dev:
                backend.synchronize(view)
        if t < t_end - 1:
            sends[(t + 1, a)] = comm.Isend(flat[a:b], dest=right, tag=tag)
            issued.add((t + 1, a))
        yield from post_upto(i + 1 + DEPTH)
    for req in sends.values():
        yield req
