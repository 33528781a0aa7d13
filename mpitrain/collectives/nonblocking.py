"""Non-blocking all-reduce: ``h = iallreduce(buf, comm, op=..., algorithm=...)``, then
``h.progress()`` between other work and ``h.wait()`` at the end.

    main thread:  backward(layer L) | progress | backward(L-1) | progress | ... | wait
    bucket L:          iallreduce --- ring steps advance in every progress ----> done
    bucket L-1:                          iallreduce ---- ring steps ----------------> done

Each algorithm is a generator that yields the MPI request it must see
completed before it can go on (ring.steps, tree.steps, hier.steps; shm runs whole when
started: shm.py). ``progress()`` tests the pending request and, while requests are
complete, runs the algorithm on to its next wait — it never blocks; ``wait()`` drives
it with ``Wait``. MPICH moves shared-memory messages only inside MPI calls, so overlap comes from
calling ``progress()`` often (the training loop does it after every layer of
backprop) or from driving the handles on a communication thread
(``CommThread``, needs MPI_THREAD_MULTIPLE).

Starting a handle runs the blocking ``allreduce``'s agreement check (one small
Allgather), so a mismatch -- or a buffer the algorithm could not use, or a call
overlapping another thread's on the same communicator (guard.py) -- raises
ValueError on every rank right there, and then starts the algorithm at once, so the
MPI collectives inside (native's Iallreduce) begin in the same order on every rank
whatever the progress timing. float16 sums run in float32 (wide.py).
Every outstanding operation gets its own tag and scratch, so several may be in
flight at once; start them in the same order on every rank.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
from mpi4py import MPI

from . import _MPI_OP, NB_TAGS, check, choose, enter, finish_avg
from . import hier, ring, scatter, shm, tree, wide
from .. import backend

TAG_BASE, TAG_SPAN = NB_TAGS  # tags TAG_BASE .. TAG_BASE+TAG_SPAN-1 on the private communicator (the map:
                               # collectives/__init__.py); slot = creation count mod TAG_SPAN


def _live(st):
    """Per communicator: which handle slots are held by a handle still in flight on this rank."""
    live = getattr(st, "nb_live", None)
    if live is None:
        live = st.nb_live = np.zeros(TAG_SPAN, dtype=bool)
    return live


def _native_steps(st, buf, op):
    flat = buf.reshape(-1)
    w = flat.astype(np.float32) if flat.dtype == np.float16 else flat
    yield st.comm.Iallreduce(MPI.IN_PLACE, w, op=_MPI_OP[op])
    if op == "avg":
        finish_avg(w, st.size)
    if w is not flat:
        wide.narrow(flat, w)


class Handle:
    """One outstanding all-reduce. ``progress()`` -> bool (done?), ``wait()`` -> buf."""

    def __init__(self, st, call, buf, op, algorithm, phase="both"):
        """Made holding this rank's turn on the communicator (``call``, see iallreduce); ``phase`` "rs":
        the reduce-scatter half only (ireduce_scatter, scatter.py)."""
        self.buf, self._st = buf, st
        what = "iallreduce" if phase == "both" else "ireduce_scatter"
        seq, live = getattr(st, "nb_seq", -1) + 1, _live(st)
        # blocking and cheap: raises on every rank (also when this slot's last handle is in flight on any rank)
        check(st, buf, op, algorithm, call=call, what=what, kind=0 if phase == "both" else scatter.RS,
              busy=bool(live[seq % TAG_SPAN]))
        if phase != "both":
            algorithm = scatter._resolve(st, buf, algorithm, what)
        st.calls.post_check(st, call, what)  # (before any message: nothing is left in flight)
        self._seq = st.nb_seq = seq
        self._slot, self._live = seq % TAG_SPAN, live
        self._tag = TAG_BASE + self._slot
        live[self._slot] = True  # until the algorithm has finished on this rank (_advance)
        self._gen = self._run(st, buf, op, algorithm) if phase == "both" else self._half(st, buf, op, algorithm)
        self._pending = None
        self.done = False
        shm.hold(buf, self)  # free_shared refuses an alloc_shared buf's window until this is done
        self._advance()  # start now: collectives begin in creation order on every rank

    def _run(self, st, buf, op, algorithm):
        if st.size == 1 or buf.size == 0:
            return
        if algorithm == "auto":
            algorithm = choose(buf.nbytes, st.size, st)
        backend.synchronize(buf)
        if algorithm != "native" and wide.needed(buf, op):  # float16 sums in float32 (wide.py)
            w = st.borrow(backend.array_module(buf), np.float32, buf.size)
            w[...] = buf.reshape(-1)
            yield from self._run(st, w, op, algorithm)
            wide.narrow(buf.reshape(-1), w)
            st.give_back(w)
            return
        xp = backend.array_module(buf)
        if algorithm == "ring":
            tmp = st.borrow(xp, buf.dtype, ring.slot_elems(buf.size, st.size, buf.itemsize))
            yield from ring.steps(st, buf, op, tag=self._tag, slots=tmp)
        elif algorithm == "tree":
            tmp = st.borrow(xp, buf.dtype, buf.size)
            yield from tree.steps(st, buf, op, tag=self._tag, tmp=tmp)
        elif algorithm == "hier":  # the hosts are made here, at the start, if not yet cached
            tmp = st.borrow(xp, buf.dtype, hier.slot_elems(hier.topology(st), buf.size, buf.itemsize))
            yield from hier.steps(st, buf, op, tag=self._tag, slots=tmp)
        elif algorithm == "shm":  # the whole reduction at the start (shm.py)
            yield from shm.steps(st, buf, op)
            return
        else:
            yield from _native_steps(st, buf, op)
            return
        st.give_back(tmp)  # only once complete: MPI is done with it

    def _half(self, st, buf, op, algorithm):
        """The reduce-scatter half (float16: in float32 scratch, this rank's chunk rounded once)."""
        if st.size == 1 or buf.size == 0:
            return
        backend.synchronize(buf)
        flat, xp = buf.reshape(-1), backend.array_module(buf)
        w = flat
        if wide.needed(flat, op):
            w = st.borrow(xp, np.float32, flat.size)
            w[...] = flat
        tmp = st.borrow(xp, w.dtype, ring.slot_elems(w.size, st.size, w.itemsize))
        yield from scatter.steps(st, w, op, algorithm, "rs", tag=self._tag, slots=tmp)
        st.give_back(tmp)
        if w is not flat:
            lo, hi = scatter.owned_chunk(flat.size, st.size, st.rank)
            wide.narrow(flat[lo:hi], w[lo:hi])
            st.give_back(w)

    def holding(self) -> bool:
        return not self.done

    def progress(self) -> bool:
        """Advance as far as possible without blocking; True once complete."""
        while not self.done:
            if self._pending is not None and not self._pending.Test():
                return False
            self._advance()
        return True

    def wait(self):
        """Block until complete; return the buffer."""
        while not self.done:
            if self._pending is not None:
                self._pending.Wait()
            self._advance()
        return self.buf

    def _advance(self):
        try:
            self._pending = next(self._gen)
        except StopIteration:
            self._pending, self.done = None, True
            self._live[self._slot] = False


def started(make, buf, comm, what: str):
    """``make(st, call)`` holding this rank's turn on ``comm`` (guard.py); device buffers need a
    CUDA-aware MPI. Shared by iallreduce, ireduce_scatter and allreduce_init (plan.py)."""
    if backend.is_device(buf) and not backend.cuda_aware_mpi():
        raise ValueError(f"{what} of device buffers needs a CUDA-aware MPI; use the blocking call")
    st, call = enter(comm, what)
    try:
        return make(st, call)
    finally:
        st.calls.leave(call)


def iallreduce(buf, comm=None, *, op: str = "sum", algorithm: str = "auto") -> Handle:
    """Start reducing ``buf`` in place across ``comm``; returns a Handle (progress / wait)."""
    return started(lambda st, call: Handle(st, call, buf, op, algorithm), buf, comm, "iallreduce")


def ireduce_scatter(buf, comm=None, *, op: str = "sum", algorithm: str = "auto") -> Handle:
    """Start the reduce-scatter half of ``buf`` (this rank's chunk: scatter.owned_chunk); a Handle."""
    return started(lambda st, call: Handle(st, call, buf, op, algorithm, phase="rs"), buf, comm, "ireduce_scatter")


class CommThread:
    """Drive handles on a background thread, in the order they were submitted.

    Needs MPI_THREAD_MULTIPLE (mpi4py asks for it by default). Exceptions
    raised on the thread come back from ``drain()``.
    """

    def __init__(self):
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError("CommThread needs MPI_THREAD_MULTIPLE")
        self._q: queue.Queue = queue.Queue()
        self._error = None
        self._t = threading.Thread(target=self._loop, name="mpitrain-comm", daemon=True)
        self._t.start()

    def _loop(self):
        while True:
            item = self._q.get()
            if item is None:
                self._q.task_done()
                return
            try:
                if self._error is None:
                    item.wait()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self._error = e
            finally:
                self._q.task_done()

    def submit(self, handle: Handle) -> None:
        self._q.put(handle)

    def drain(self) -> None:
        """Wait until every submitted handle is complete; re-raise a failure."""
        self._q.join()
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def close(self) -> None:
        self._q.put(None)
        self._t.join()
