"""Persistent all-reduce plans: ``h = allreduce_init(buf, comm, op=..., algorithm=...)``, then
``h.start()`` / ``h.test()`` / ``h.wait()`` every step, ``h.free()`` at the end (MPI-4's MPI_Allreduce_init).

    init (once, collective)                      every step (no check, nothing allocated)
    ---------------------------------------      -----------------------------------------
    the agreement check (what="allreduce_init")  buf[...] = new gradients   (contents only)
    resolve auto -> ring | tree | native | hier  h.start()   native: Prequest.Start()
    bind buf; float16 sums: a float32 twin                   ring/tree/hier: the schedule begins
    native: comm.Allreduce_init(IN_PLACE, buf)   h.test()    progress, never blocks -> bool
    ring/tree/hier: own scratch, own tag         h.wait()    -> buf, reduced on every rank

The check (one small Allgather) runs once, at init, so a mismatch -- lengths, dtypes, op, algorithm,
a buffer an algorithm could not use -- raises the same ValueError on every rank there, as allreduce
does. What a plan binds and a start may not change: the *identity* of ``buf`` (the same array
object; its memory), its length and its dtype, and the op and algorithm. What may change between
starts, and is the point: the *contents* of ``buf`` (the gradients of each step). Write them only
while the plan is not in flight (before start, after wait): MPI reads and writes ``buf`` in between.

Per algorithm:
  native  ``comm.Allreduce_init(MPI.IN_PLACE, buf, op)`` on the library's private communicator: a
          persistent collective request (MPI-4; MPICH 5 has it), started with ``Start`` and finished
          with ``Wait``/``Test``; avg divides after completion, float16 sum/avg/prod runs on the plan's
          float32 twin (copied in at start, rounded once at the end, as wide.py). Without MPI-4
          persistent collectives the plan falls back to an ``Iallreduce`` per start (same results).
  ring    ring.Bound: the ring's every message a persistent request on precomputed views (made at
          init), each step Startall + Wait + one add, step by step (ring.bound_segments; the same
          chains and bits as the blocking ring; device buffers: ring.steps as below).
  tree    the algorithm's generator (tree.steps, hier.steps) on the plan's own slots (allocated once,
  hier    at init) and the plan's own tag, so plans, handles and blocking calls on the same
          communicator never share scratch or match each other's messages.
          The per-start work is the schedule itself: no check, no allocation. Tags: the lowest of the
          communicator's TAG_SPAN = 4096 plan tags that is free on every rank (one Allreduce of the free
          sets at init, so ranks that collected a dead plan at different times still agree), held
          until free() or collection: no two live plans share one. All 4096 held: ValueError on every rank.
  shm     the whole shared-memory reduction runs inside start() (node barriers cannot be yielded safely
          while other operations are in flight: shm.py); test()/wait() then return at once.

Results: exactly those of ``allreduce(buf, comm, op=op, algorithm=<resolved algorithm>)`` (bitwise
identical on every rank; native: MPI's own). Cost per start: the algorithm's alpha-beta cost
(ring: 2(p-1)·alpha + 2(p-1)/p·n·beta + (p-1)/p·n·gamma), without the check's Allgather (about one
small collective's latency) that every allreduce pays.

Ordering (as for any collective): create, start and free plans in the same order on every rank,
relative to each other and to other calls on the communicator. A plan in flight may overlap other
library calls on the same communicator (its tag and scratch are its own; native plans are MPI
collectives started in program order). One thread drives a plan; starting it while another thread
holds the communicator's turn (is inside a call on it) raises ValueError on that rank. Errors of use --
start while in flight, start / test / wait after free, free while in flight -- raise ValueError
locally: with the same program on every rank they raise on every rank alike.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from . import _MPI_OP, PLAN_TAGS, check, choose, finish_avg
from . import hier, ring, shm, tree, wide
from .nonblocking import started
from .. import backend

TAG_BASE, TAG_SPAN = PLAN_TAGS  # plans' tags on the private communicator (the map: collectives/__init__.py)
READY, ACTIVE, FREED = 0, 1, 2


def _held(st):
    """Per communicator: which plan tags live plans hold on this rank (TAG_BASE + index)."""
    held = getattr(st, "plan_tags", None)
    if held is None:
        held = st.plan_tags = np.zeros(TAG_SPAN, dtype=bool)
    return held


def take_tag(st) -> int:
    """Collective: the lowest plan tag free on every rank, now held (the same on every rank)."""
    held = _held(st)
    busy = np.packbits(held)
    if st.size > 1:
        st.comm.Allreduce(MPI.IN_PLACE, busy, op=MPI.BOR)
    free = np.flatnonzero(~np.unpackbits(busy)[:TAG_SPAN].astype(bool))
    if not free.size:
        raise ValueError(f"allreduce_init: all {TAG_SPAN} plan tags of this communicator are held by live plans "
                         "(on some rank); free() plans no longer needed, or reuse one plan per buffer")
    held[free[0]] = True
    return TAG_BASE + int(free[0])


def give_tag(st, tag) -> None:
    if tag is not None:
        _held(st)[tag - TAG_BASE] = False


class AllreducePlan:
    """A persistent all-reduce of one buffer (see the module doc): start / test / wait / free."""

    def __init__(self, st, call, buf, op, algorithm):
        """Made holding this rank's turn on the communicator (``call``): the check, then the binding."""
        check(st, buf, op, algorithm, call=call, what="allreduce_init")  # raises on every rank alike
        st.calls.post_check(st, call, "allreduce_init")
        self.buf, self.op, self._st = buf, op, st
        if algorithm == "auto":
            algorithm = choose(buf.nbytes, st.size, st)
        self.algorithm = algorithm
        shm.hold(buf, self)  # an alloc_shared buf: free_shared refuses its window while the plan lives
        self._tag = None  # taken below for the algorithms that send messages with it (ring, tree, hier)
        self._flat = buf.reshape(-1)
        self._dev = backend.is_device(buf)
        xp = backend.array_module(buf)
        self._s = READY  # READY | ACTIVE | FREED
        self._turn = st.calls.turn
        self._fast = False  # start = Prequest.Start, wait = Prequest.Wait: nothing else to do
        self._bfast = False  # start = Bound.begin, wait = Bound.finish: nothing else to do
        self._req = None  # native: the persistent request (or None: Iallreduce per start)
        self._gen = self._pending = None
        self._trivial = st.size == 1 or buf.size == 0
        self._native, self._work, self._slots = algorithm == "native", self._flat, None
        self._bound = None  # ring: ring.Bound (persistent requests per step), or None: ring.steps
        if self._trivial:
            return
        # the array the algorithm reduces: buf itself, or the float32 twin of a float16 sum/avg/prod
        self._work = xp.empty(buf.size, dtype=np.float32) if wide.needed(buf, op) else self._flat
        w = self._work
        if algorithm == "native":
            self._native = True
            make = getattr(st.comm, "Allreduce_init", None)
            if make is not None:
                try:
                    self._req = make(MPI.IN_PLACE, w, op=_MPI_OP[op])
                except NotImplementedError:  # mpi4py built against an MPI without MPI-4 persistent collectives
                    self._req = None
            self._fast = self._req is not None and w is self._flat and op != "avg" and not self._dev
            return
        self._native = False
        if algorithm != "shm":
            self._tag = take_tag(st)  # collective; the same on every rank
        nseg = 0 if self._dev else ring.bound_segments(w.nbytes, st.size)
        if algorithm == "ring" and nseg:
            self._slots = xp.empty(max(1, ring.bound_slot_elems(w.size, st.size)), dtype=w.dtype)
            self._bound = ring.Bound(st.comm, st.rank, st.size, w, op, self._tag, self._slots, nseg)
            self._bfast = w is self._flat
        elif algorithm == "ring":
            self._slots = xp.empty(max(1, ring.slot_elems(w.size, st.size, w.itemsize)), dtype=w.dtype)
        elif algorithm == "tree":
            self._slots = xp.empty(max(1, w.size), dtype=w.dtype)
        elif algorithm == "shm":  # no slots; the node (and its windows) made here, collectively
            if self._dev:
                raise ValueError("allreduce_init: algorithm='shm' takes host (NumPy) buffers; use 'ring'")
            shm.node(st)
        else:  # hier: the hosts are made here (collectively, at init) if not yet cached
            self._slots = xp.empty(max(1, hier.slot_elems(hier.topology(st), w.size, w.itemsize)), dtype=w.dtype)

    # -- every step ---------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Started and not yet complete (waited for, or test() returned True)."""
        return self._s == ACTIVE

    @property
    def freed(self) -> bool:
        return self._s == FREED

    def holding(self) -> bool:
        """Still bound to ``buf`` (shm.hold: free_shared refuses the window meanwhile)."""
        return self._s != FREED

    def start(self) -> "AllreducePlan":
        """Begin reducing the current contents of ``buf``; returns the plan. Raises ValueError when the plan
        is in flight (not yet waited for) or freed."""
        if self._s:
            raise self._misuse("start")
        turn = self._turn
        if not turn.acquire(False):
            raise ValueError("allreduce_init: start() while another call on this communicator is in progress on "
                             "this rank (another thread?); drive a plan from the thread that makes the calls")
        try:
            if self._fast:
                self._req.Start()
            elif self._bfast:
                self._bound.begin()
            else:
                self._begin()
            self._s = ACTIVE
        finally:
            turn.release()
        return self

    def test(self) -> bool:
        """Progress without blocking; True once the reduction is complete (``buf`` holds the result)."""
        if self._s != ACTIVE:
            if self._s == FREED:
                raise self._misuse("test")
            return True
        if self._native:
            req = self._req if self._fast else self._pending
            if req is not None and not req.Test():
                return False
        elif self._bound is not None:
            if not self._bound.run(False):
                return False
        else:
            while self._gen is not None:
                if self._pending is not None and not self._pending.Test():
                    return False
                self._advance()
        self._finish()
        return True

    def progress(self) -> bool:
        """``test()`` under the name non-blocking handles use (nonblocking.Handle)."""
        return self.test()

    def wait(self):
        """Block until the reduction is complete; return ``buf``. Waiting for a plan not in flight returns at once."""
        if self._s == ACTIVE:
            if self._fast:
                self._req.Wait()
                self._s = READY
                return self.buf
            if self._bfast:
                self._bound.finish()
                self._s = READY
                return self.buf
            if self._native:
                if self._pending is not None:
                    self._pending.Wait()
            elif self._bound is not None:
                self._bound.run(True)
            else:
                while self._gen is not None:
                    if self._pending is not None:
                        self._pending.Wait()
                    self._advance()
            self._finish()
        elif self._s == FREED:
            raise self._misuse("wait")
        return self.buf

    def __call__(self):
        """start() then wait(): one blocking all-reduce of the current contents; returns ``buf``."""
        return self.start().wait()

    # -- the end ------------------------------------------------------------------------------------
    def free(self) -> None:
        """Release the persistent request and the scratch. Idempotent; raises ValueError while in flight."""
        if self._s == FREED:
            return
        if self._s == ACTIVE:
            raise self._misuse("free")
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if self.active:
                self.wait()
            self.free()
        elif not self.freed:  # an error: MPI may not free an active collective request -- just let go of it
            if not self.active:
                self._release()
            else:
                self._s, self._req, self._gen, self._pending, self._bound = FREED, None, None, None, None
                self._bfast = False
        return False

    def __del__(self):
        try:
            if not self.freed and not self.active and not MPI.Is_finalized():
                give_tag(self._st, self._tag)  # (an active plan keeps it: its messages may be in flight)
                if self._req is not None:
                    self._req.Free()
                if self._bound is not None:
                    self._bound.free()
        except Exception:
            pass

    def __repr__(self):
        state = "freed" if self.freed else "in flight" if self.active else "ready"
        return (f"<AllreducePlan {self.buf.size} x {self.buf.dtype} op={self.op} algorithm={self.algorithm} "
                f"{state}>")

    # -- inside ---------------------------------------------------------------------------------------
    def _misuse(self, what) -> ValueError:
        if self._s == FREED:
            return ValueError(f"allreduce_init: {what}() after free()")
        return ValueError(f"allreduce_init: {what}() while the plan is in flight; wait() (or test() until True) "
                          "first")

    def _begin(self):
        """start() but for the fast path (the turn held)."""
        if self._trivial:
            return
        if self._dev:
            backend.synchronize(self.buf)
        if self._work is not self._flat:
            self._work[...] = self._flat
        if self._native:
            if self._req is not None:
                self._req.Start()
                self._pending = self._req
            else:
                self._pending = self._st.comm.Iallreduce(MPI.IN_PLACE, self._work, op=_MPI_OP[self.op])
        elif self._bound is not None:
            self._bound.begin()
        else:
            self._gen = self._steps()
            self._advance()

    def _release(self):
        if self._req is not None:
            self._req.Free()
        if self._bound is not None:
            self._bound.free()
        self._req = self._gen = self._pending = self._bound = None
        self._bfast = False
        self._slots = self._work = None
        self._s = FREED
        give_tag(self._st, self._tag)
        self._tag = None

    def _steps(self):
        st, w, op = self._st, self._work, self.op
        if self.algorithm == "ring":
            yield from ring.steps(st, w, op, tag=self._tag, slots=self._slots)
        elif self.algorithm == "tree":
            yield from tree.steps(st, w, op, tag=self._tag, tmp=self._slots)
        elif self.algorithm == "shm":  # runs whole at start(): shm.py
            yield from shm.steps(st, w, op)
        else:
            yield from hier.steps(st, w, op, tag=self._tag, slots=self._slots)

    def _advance(self):
        try:
            self._pending = next(self._gen)
        except StopIteration:
            self._pending = self._gen = None

    def _finish(self):
        """Once complete: avg's division (native), the float16 rounding, and the plan is ready again."""
        if not self._trivial:
            if self._native:
                self._pending = None
                if self.op == "avg":
                    finish_avg(self._work, self._st.size)
            if self._work is not self._flat:
                wide.narrow(self._flat, self._work)
        self._s = READY


def allreduce_init(buf, comm=None, *, op: str = "sum", algorithm: str = "auto") -> AllreducePlan:
    """A persistent plan reducing ``buf`` in place across ``comm``: checked once, started every step.

    Collective (the agreement check: a mismatch raises ValueError on every rank). ``buf``'s identity,
    length and dtype are bound; its contents may change between starts. See collectives/plan.py.
    """
    return started(lambda st, call: AllreducePlan(st, call, buf, op, algorithm), buf, comm, "allreduce_init")
