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

A plan (plan.py) binds the ring to one buffer instead (``Bound``): every message is a persistent
request made once (``Send_init``/``Recv_init`` on precomputed views); each step is ``Startall``,
``Waitall``, then ``np.add(out=)`` on precomputed views -- nothing allocated, a few Python calls a
step. Below BOUND_PIPELINE_MIN it runs unpipelined (on this box MPICH's single-copy shared-memory
path copies inside the receiver's own MPI calls, so a reduction cannot overlap its own receive), in
one of two schedules with the same chains, so the same bits as the pipelined ring:

    ring (default)    the 2(p-1) neighbour steps above, one at a time.
                      Cost: 2(p-1)·alpha + 2(p-1)/p·n·beta + (p-1)/p·n·gamma, no overlap.
    direct            (MPITRAIN_RING_BOUND=direct) phase 1: every rank sends rank q its piece of
                      chunk q+1 at once; q folds the p-1 pieces in the ring's order.  phase 2: every
                      owner sends its chunk to all.  Cost: 2·alpha (p-1 concurrent messages each) +
                      2(p-1)/p·n·beta + (p-1)/p·n·gamma -- two synchronisations instead of 2(p-1), but
                      measured slower than ring at 3-4 ranks here; a network would see incast.

At p = 2 both are the plain two-step exchange (Sendrecv half, add, Sendrecv half).
"""

from __future__ import annotations


from mpi4py import MPI

from . import TAG_RING, finish_avg, reducer, wide
from .partition import checked, chunk_bounds, segments
from .. import backend
from ..units import env_knob

# Segment size: None = adaptive (about a quarter of a chunk, between 1 MiB and 4 MiB,
# measured best on a 2-core box at 1-64 MiB with 2 and 4 ranks: docs/benchmarks.md).
# MPITRAIN_RING_SEGMENT=bytes fixes it.
SEGMENT_BYTES = env_knob("MPITRAIN_RING_SEGMENT")  # (checked: units.KNOBS)
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
    A rank outside 0..p-1 raises (partition.checked), never wraps round to another rank's chunk.
    """
    n, p, rank = checked(n, p, rank, "rank")
    return chunk_bounds(n, p, (rank + 1) % p)


def plan(n: int, p: int, rank: int, seg_elems: int, phase: str = "both"):
    """The ordered list of (step, lo, hi) receives this rank performs.

    Steps 0..p-2 are reduce-scatter, p-1..2p-3 all-gather (``phase`` "rs" or
    "ag": only those). The left neighbour sends the same (step, segment) sequence
    in the same order, so one tag is enough (MPI does not overtake messages
    between one pair on one tag).
    """
    n, p, rank = checked(n, p, rank, "rank")
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


# A bound ring pipelines (the generator above, cross-step) from this size on; below it runs step by
# step with persistent requests (measured on 2 cores, 2-4 ranks: docs/benchmarks.md "The ring at the wire").
BOUND_PIPELINE_MIN = 64 << 20
# "ring" (2(p-1) neighbour steps) or "direct" (2 phases, every peer at once) below BOUND_PIPELINE_MIN;
# at 3 and 4 ranks ring measured 0.8-1.0x direct's time (docs/benchmarks.md); at 2 they are the same
BOUND_SCHEDULE = env_knob("MPITRAIN_RING_BOUND", "ring")


def bound_segments(nbytes: int, p: int) -> int:
    """Segments per chunk for a bound (plan) ring of ``nbytes`` on ``p`` ranks (the ring schedule; direct
    sends one message per chunk); 0: use the pipeline."""
    if nbytes >= BOUND_PIPELINE_MIN:
        return 0
    if SEGMENT_BYTES:
        return max(1, -(-(-(-nbytes // p)) // SEGMENT_BYTES))
    return 1


def bound_slot_elems(n: int, p: int) -> int:
    """Scratch a ``Bound`` of ``n`` elements needs: p-1 chunks (direct) or one (ring)."""
    return -(-n // p) * (p - 1 if BOUND_SCHEDULE == "direct" else 1)


class Bound:
    """The ring bound to ``flat`` (plans): persistent requests per step, driven by ``begin`` + ``run``.

    ring (2(p-1) steps): step t < p-1 sends chunk r-t right, receives chunk r-t-1 from the left into
    ``slots`` and adds it in (local op incoming, as ``steps``); step p-2 finishes chunk r+1 (avg divides
    it); step t >= p-1 sends chunk r+1-t', receives chunk r-t' in place (t' = t-(p-1)).
    direct (2 steps, the same chains): rank r receives chunk r+1 from every rank into ``slots`` and
    folds it in the ring's order -- acc = x[r+1]; acc = x[r+j] op acc (j = 2..p-1); x[r] op acc -- then
    sends it to every rank and receives every other finished chunk in place. At p = 2 both are the
    two-step exchange. Nothing is allocated per start. ``free()`` releases the requests.
    """

    def __init__(self, comm, rank: int, p: int, flat, op: str, tag: int, slots, nseg: int = 1):
        self.avg, self.p = op == "avg", p
        self.f = reducer(backend.array_module(flat), op)
        self.owned = flat[slice(*owned(flat.size, p, rank))]
        # per step: (receives + sends, number of receives, per receive [(x, y, out)] to fold, last rs?)
        self.prog = []
        if BOUND_SCHEDULE == "direct":
            self._direct(comm, rank, p, flat, tag, slots)
        else:
            self._ring(comm, rank, p, flat, tag, slots, nseg)
        self.t = self.k = len(self.prog)  # the next step and request to complete (done: len(prog))
        # for finish(): per step (requests, [(x, y, out)] to fold after them, divide for avg?)
        self.flat_prog = [(reqs, [xyo for fs in folds for xyo in fs], last and self.avg)
                          for reqs, _, folds, last in self.prog]

    def _ring(self, comm, rank, p, flat, tag, slots, nseg):
        n, right, left = flat.size, (rank + 1) % p, (rank - 1) % p
        for t in range(2 * (p - 1)):
            rs = t < p - 1
            u = t if rs else t - (p - 1)
            ks, kr = ((rank - u) % p, (rank - u - 1) % p) if rs else ((rank + 1 - u) % p, (rank - u) % p)
            slo, shi = chunk_bounds(n, p, ks)
            rlo, rhi = chunk_bounds(n, p, kr)
            inc = slots[:rhi - rlo] if rs else flat[rlo:rhi]
            seg_s, seg_r = max(1, -(-(shi - slo) // nseg)), max(1, -(-(rhi - rlo) // nseg))
            rsegs = segments(rlo, rhi, seg_r)
            recvs = [comm.Recv_init(inc[a - rlo:b - rlo], source=left, tag=tag) for a, b in rsegs]
            sends = [comm.Send_init(flat[a:b], dest=right, tag=tag) for a, b in segments(slo, shi, seg_s)]
            folds = [[(flat[a:b], inc[a - rlo:b - rlo], flat[a:b])] if rs else [] for a, b in rsegs]
            self.prog.append((recvs + sends, len(recvs), folds, t == p - 2))

    def _direct(self, comm, rank, p, flat, tag, slots):
        n, mine = flat.size, self.owned
        if mine.size:  # phase 1: chunk r+1 from every rank, folded in the ring's order
            acc = [slots[j * mine.size:(j + 1) * mine.size] for j in range(p - 1)]  # from r+1, r+2, ...
            recvs = [comm.Recv_init(acc[j], source=(rank + 1 + j) % p, tag=tag) for j in range(p - 1)]
            folds = [[] for _ in recvs]
            for j in range(1, p - 1):
                folds[j].append((acc[j], acc[0], acc[0]))
            folds[-1].append((mine, acc[0], mine))
        else:
            recvs, folds = [], []
        sends = []
        for j in range(1, p):
            a, b = owned(n, p, (rank - j) % p)  # what rank r-j owns: its chunk from me
            if b > a:
                sends.append(comm.Send_init(flat[a:b], dest=(rank - j) % p, tag=tag))
        self.prog.append((recvs + sends, len(recvs), folds, True))
        recvs, sends = [], []  # phase 2: every finished chunk to every rank
        for j in range(1, p):
            a, b = owned(n, p, (rank + j) % p)
            if b > a:
                recvs.append(comm.Recv_init(flat[a:b], source=(rank + j) % p, tag=tag))
            if mine.size:
                sends.append(comm.Send_init(mine, dest=(rank + j) % p, tag=tag))
        self.prog.append((recvs + sends, len(recvs), [[] for _ in recvs], False))

    def begin(self) -> None:
        """Start one all-reduce of the bound buffer's current contents (the first step's requests)."""
        self.t = self.k = 0
        if self.prog and self.prog[0][0]:
            MPI.Prequest.Startall(self.prog[0][0])

    def finish(self) -> None:
        """``run(True)`` for an all-reduce nothing has progressed since ``begin``: the same work, fewer
        Python steps (one Waitall per step, then its folds)."""
        if self.t or self.k:
            self.run(True)
            return
        startall, waitall, f = MPI.Prequest.Startall, MPI.Request.Waitall, self.f
        first = True
        for reqs, folds, divide in self.flat_prog:
            if reqs:
                if not first:
                    startall(reqs)
                waitall(reqs)
            first = False
            for x, y, out in folds:
                f(x, y, out=out)
            if divide:
                finish_avg(self.owned, self.p)
        self.t = len(self.prog)

    def run(self, block: bool) -> bool:
        """Drive the started all-reduce: to the end (``block``) or as far as it goes without blocking;
        True once complete."""
        prog, f, t, k, waitall = self.prog, self.f, self.t, self.k, MPI.Request.Waitall
        while t < len(prog):
            reqs, nrecv, folds, last = prog[t]
            if block and k == 0:  # the whole step at once: one MPI call, then the folds in order
                if reqs:
                    waitall(reqs)
                for fs in folds:
                    for x, y, out in fs:
                        f(x, y, out=out)
                k = len(reqs)
            while k < len(reqs):
                if block:
                    reqs[k].Wait()
                elif not reqs[k].Test():
                    self.t, self.k = t, k
                    return False
                if k < nrecv:
                    for x, y, out in folds[k]:
                        f(x, y, out=out)
                k += 1
            if last and self.avg:
                finish_avg(self.owned, self.p)
            t, k = t + 1, 0
            if t < len(prog) and prog[t][0]:
                MPI.Prequest.Startall(prog[t][0])
        self.t, self.k = t, 0
        return True

    def free(self) -> None:
        for reqs, _, _, _ in self.prog:
            for q in reqs:
                q.Free()
        self.prog, self.flat_prog = [], []
