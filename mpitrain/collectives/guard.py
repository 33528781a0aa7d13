"""What the agreement check needs beyond shapes: the communicator, the buffer's memory, threads.

Every entry point (allreduce, iallreduce, the compressors) calls through here before it
sends anything, so that a call an algorithm would trip on is refused on *every* rank by
the check's one Allgather, never by one rank alone (which would leave the others
waiting in a receive for ever).

    the communicator   comm_problem(): checked locally, before anything collective --
                       an int, a string, COMM_NULL (this rank is not a member: every
                       member is elsewhere, so raising here leaves nobody waiting), an
                       intercommunicator (every rank of both groups holds one, and
                       Is_inter() is local: all of them raise alike)
    the buffer         buffer_problem(): a code folded into the check's row -- not an
                       array, an np.matrix / masked array, a device array that is not
                       CuPy, not C-contiguous, an unsupported dtype, the right dtype in
                       the other byte order, a misaligned view, read-only, an
                       alloc_shared array whose window free_shared has freed
    threads            Calls, below; thread_problem(): below MPI_THREAD_SERIALIZED only
                       the main thread may call MPI

Threads: concurrent calls on one communicator are refused, never mixed
------------------------------------------------------------------------

Two threads calling allreduce on one communicator at the same time cannot be made
correct by the library: the ranks would have to agree which of rank 0's calls goes
with which of rank 1's, and nothing in a call says so (rank 0 may serve thread A
first, rank 1 thread B: A0 + B1 is garbage, and with a plain lock it is silent).
So they are detected and raise ValueError, on every rank, in the check:

    rank 0   A: enter -- check ------------ ring ------------ post-check -- leave
             B:            enter (A active: "busy") .. waits for the turn .......... check -> raise
    rank 1   B: enter -- check ------------ ring ------------ post-check -- leave
             A:                   enter ("arrived during B") .. waits ........ check -> raise
                                           post-check: rank 0 and 1 saw an overlap -> A0, B1 raise

  - ``Calls`` (one per communicator and process): every call takes a ticket and then
    the *turn*, a lock held for the whole call, so this rank's calls on the
    communicator reach MPI one at a time (MPI needs collectives on one communicator
    issued in one order); a thread of the same call re-entering raises at once.
  - A call is *overlapped* when another call was active on this rank when it arrived,
    or another arrived while it was active. The check's row carries that as a problem
    (code 9): if any rank's row has it, every rank raises before any data moves.
  - Overlaps that begin after the check: the row also says whether other Python threads
    are alive on this rank (threading.active_count() > 1). When any rank says so, every
    rank runs a post-check at the end of the call -- an Allgather of one int64, "did
    another call arrive while this one was active" -- and raises on every rank if any
    did (the buffer then holds undefined data). When no rank has another thread, no
    second call can begin during this one (only the caller exists, and it is inside
    the library), so the post-check is skipped: single-threaded programs pay nothing.

Why nothing can hang: every verdict (run, raise, post-check or not) is computed from
the same gathered rows on every rank, so the k-th call on each rank does the same
collectives as the k-th call on every other rank -- they complete together or raise
together -- and on each rank the turn orders the calls, so the k-th holder of the turn
is the k-th call. (The program must, as always, make the same number of calls on
every rank.) A call that arrives after the earlier one's post-check has begun still
finds it active and raises in its own check, on every rank: the earlier one's result
stands then (it was settled before the overlap). Calls that never overlap on any rank
are ordinary sequential calls, and must come in the same order on every rank, as in a
single-threaded program. Threads started outside Python's ``threading`` (a C library's
own) are not counted.
"""

from __future__ import annotations

import threading

import numpy as np
from mpi4py import MPI

from .. import backend

# problem codes of the check's row (column 4); texts in collectives/__init__.py (_PROBLEMS)
NOT_ARRAY, NOT_CONTIGUOUS, DTYPE, READ_ONLY, MISALIGNED, BYTE_ORDER, SUBCLASS, FOREIGN_DEVICE = range(1, 9)
CONCURRENT, THREAD_LEVEL, TAGS_BUSY, FREED_SHARED = 9, 10, 11, 12

_LEVELS = {MPI.THREAD_SINGLE: "MPI_THREAD_SINGLE", MPI.THREAD_FUNNELED: "MPI_THREAD_FUNNELED",
           MPI.THREAD_SERIALIZED: "MPI_THREAD_SERIALIZED", MPI.THREAD_MULTIPLE: "MPI_THREAD_MULTIPLE"}
_LEVEL = None


def comm_problem(comm) -> str | None:
    """Why ``comm`` cannot be reduced over (a local test: the same answer on every rank that holds it)."""
    if not isinstance(comm, MPI.Comm):
        return (f"comm must be an MPI intracommunicator (e.g. the world communicator or a Dup/Split of it) or None for "
                f"the run's communicator, got {type(comm).__name__} {comm!r:.60}")
    if not comm:
        return ("comm is MPI.COMM_NULL (or freed): this rank is not a member -- call the collective only on the "
                "ranks of the communicator (a Split with MPI.UNDEFINED gives COMM_NULL to the others)")
    if comm.Is_inter():
        return ("comm is an intercommunicator (two groups): all-reduce within one group needs an "
                "intracommunicator -- pass the local group's communicator, or intercomm.Merge() for both groups")
    return None


def freed_memory(buf) -> bool:
    """``buf`` (or the array it views) lies in memory that was released: an alloc_shared array after
    free_shared (its owner, shm._Segment, says ``released``). Local, touches no memory."""
    b = buf.base
    while b is not None:
        if getattr(b, "released", False) is True:
            return True
        b = getattr(b, "base", None)
    return False


def buffer_problem(buf, dtypes) -> tuple[int, int]:
    """(problem code or 0, on-device 0/1) for ``buf``; ``dtypes``: the supported np.dtypes."""
    if isinstance(buf, np.ndarray):
        if freed_memory(buf):
            return FREED_SHARED, 0
        if type(buf) is not np.ndarray and isinstance(buf, (np.matrix, np.ma.MaskedArray)):
            return SUBCLASS, 0
        flags = buf.flags
        if not flags.c_contiguous:
            return NOT_CONTIGUOUS, 0
        if buf.dtype not in dtypes:
            return (BYTE_ORDER if buf.dtype.newbyteorder("=") in dtypes else DTYPE), 0
        if not flags.aligned:
            return MISALIGNED, 0
        if not flags.writeable:
            return READ_ONLY, 0
        return 0, 0
    if not backend.is_device(buf):
        return NOT_ARRAY, 0
    try:
        backend.array_module(buf)
    except TypeError:
        return FOREIGN_DEVICE, 1
    if not buf.flags.c_contiguous:
        return NOT_CONTIGUOUS, 1
    if buf.dtype not in dtypes:
        return (BYTE_ORDER if buf.dtype.newbyteorder("=") in dtypes else DTYPE), 1
    return 0, 1


def thread_level() -> int:
    """MPI's thread level (mpi4py asks for MPI_THREAD_MULTIPLE by default; mpi4py.rc.thread_level)."""
    global _LEVEL
    if _LEVEL is None:
        _LEVEL = MPI.Query_thread()
    return _LEVEL


def level_name(level: int | None = None) -> str:
    return _LEVELS.get(thread_level() if level is None else level, str(level))


def thread_problem() -> bool:
    """True when this thread may not call MPI at all: below SERIALIZED, only the main thread may."""
    return thread_level() < MPI.THREAD_SERIALIZED and not MPI.Is_thread_main()


def others_alive() -> bool:
    """Another Python thread exists in this process (so a second call could begin during this one)."""
    return threading.active_count() > 1


class Call:
    """One call's ticket: ``busy`` (another call was active when it arrived), ``post`` (set by the check:
    every rank runs the post-check)."""

    __slots__ = ("ticket", "busy", "post")

    def __init__(self, ticket: int, busy: bool):
        self.ticket, self.busy, self.post = ticket, busy, False


class Calls:
    """This process's calls on one communicator: tickets, and the turn (one call at a time)."""

    def __init__(self):
        self.turn = threading.Lock()  # held for a whole call (and while the state is made)
        self._mutex = threading.Lock()  # guards the counters below
        self._arrived = 0  # tickets handed out
        self._active = 0  # calls that arrived and have not left (running or waiting for the turn)
        self._owner = None  # ident of the thread holding the turn for a call
        self._flag = np.zeros(1, dtype=np.int64)  # the post-check's row and result
        self._flags = None

    def enter(self, what: str = "allreduce") -> Call:
        """Take a ticket, then wait for the turn. Re-entering from the thread that holds it raises."""
        me = threading.get_ident()
        mutex = self._mutex
        mutex.acquire()
        if self._owner == me:
            mutex.release()
            raise ValueError(f"{what}: called again from inside a call on the same communicator by the same "
                             "thread (a signal handler or callback?); that call would wait for itself")
        call = Call(self._arrived, self._active > 0)
        self._arrived += 1
        self._active += 1
        mutex.release()
        if not self.turn.acquire(False):  # another call holds it: wait (the check will refuse both)
            try:
                self.turn.acquire()
            except BaseException:
                with mutex:
                    self._active -= 1
                raise
        self._owner = me
        return call

    def overlapped(self, call: Call) -> bool:
        """Another call was active when ``call`` arrived, or arrived since (while ``call`` is active)."""
        return call.busy or self._arrived > call.ticket + 1  # (one int read: no lock needed)

    def leave(self, call: Call) -> None:
        self._owner = None
        with self._mutex:
            self._active -= 1
        self.turn.release()

    def post_check(self, st, call: Call, what: str = "allreduce") -> None:
        """Collective when ``call.post``: raise on every rank if any rank saw another call during this one."""
        if not call.post:
            return
        self._flag[0] = self.overlapped(call)
        if st.size == 1:
            flags = self._flag
        else:
            if self._flags is None or self._flags.size != st.size:
                self._flags = np.zeros(st.size, dtype=np.int64)
            flags = self._flags
            st.comm.Allgather(self._flag, flags)
        if flags.any():
            ranks = [int(r) for r in np.flatnonzero(flags)]
            raise ValueError(f"{what}: rank(s) {ranks}: another thread called on this communicator while this "
                             f"call was in progress; {CONCURRENT_ADVICE} (this call's buffer holds undefined data)")


CONCURRENT_ADVICE = ("concurrent calls on one communicator are not supported (the ranks could pair different "
                     "threads' calls): give each thread its own communicator (comm.Dup(), made in the same order "
                     "on every rank), or make the calls one after another in the same order on every rank")
