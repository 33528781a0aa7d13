"""The watchdog: end the job when a rank stops coming to the collectives (``comm.timeout_s``).

A rank that never reaches an all-reduce leaves every other rank blocked in it for
ever (MPI has no timeouts), burning the allocation. With ``comm.timeout_s = T > 0``
every collective of the training loop (the gradient all-reduce, the stop-flag
and the evaluation all-reduces) is wrapped in ``watchdog.collective(step, what)``
(or ``arrive(step)`` ... ``with guard(what, step):`` when the collective starts
inside backprop, as with gradient buckets):

    enter   rank r != 0:  Start(send "arrived at step k" -> rank 0)   Start(recv <- rank 0)
            rank 0:       Startall(recv <- every rank)               Startall(send -> every rank)
            (persistent requests on a private Dup of the run's communicator, tag 21; nothing waits)
    body    the collective itself; the watchdog thread knows "inside <what> of step k since t"
    exit    Waitall on this step's arrival requests (all ranks were in the collective, so every
            arrival was sent: they complete at once)

A daemon thread sleeps on an Event and wakes every min(1, T/4) s. When the main
thread has been inside a collective for longer than its limit -- T on rank 0,
T + g on rank 1, T + 2g elsewhere (g = min(max(T/2, 1), 30) s), so that the best
informed rank speaks first and the job prints one message -- it Tests this
step's arrival requests, prints one ``[rank r@host] error: watchdog: ...`` line
and calls MPI_Abort (MPI_THREAD_MULTIPLE, mpi4py's default; else it exits and the
launcher ends the job):

    rank 0: "rank(s) [2] did not reach the gradient all-reduce of step 30 within ..."
    rank r: "rank 0 did not reach ..."  (rank 0 itself is the one stuck)
    either: "every rank reached ... but it has not finished" (a rank stopped inside it)

Cost when on, per collective: one persistent Start and one Waitall per rank
(rank 0: 2(p-1) requests in two calls), a few microseconds; nothing polls or
spins, the thread wakes at most once a second. When off (``T = 0``, the
default): no Dup, no thread, no messages; ``collective()`` returns one shared
no-op context manager.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

import numpy as np
from mpi4py import MPI

from .runtime import UserError, tag
from .units import env_knob

TAG_ARRIVE = 21
ROOT = 0
_NULL = contextlib.nullcontext()


def grace_s(timeout_s: float) -> float:
    """Extra time rank 1 waits (2x for ranks > 1), so that rank 0, which can name names, speaks first."""
    return min(max(timeout_s / 2, 1.0), 30.0)


class _Off:
    """The watchdog when ``comm.timeout_s = 0``: nothing at all happens."""

    timeout_s = 0.0

    def __bool__(self):
        return False

    def collective(self, step, what="the gradient all-reduce"):
        return _NULL

    def guard(self, what, step):
        return _NULL

    def arrive(self, step, what="the gradient all-reduce"):
        pass

    def close(self):
        pass


OFF = _Off()


class Watchdog:
    """Arrival messages + a watching thread over a private Dup of ``comm`` (collective to create)."""

    def __init__(self, comm, timeout_s: float, *, hint: str = "", abort=None):
        if not timeout_s > 0:
            raise ValueError("timeout_s must be > 0 (use watchdog.OFF for no watchdog)")
        self.timeout_s = float(timeout_s)
        self.comm = comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.grace = grace_s(self.timeout_s)
        self.limit = self.timeout_s + self.grace * min(self.rank, 2)
        self.hint = hint
        self._abort = abort
        self._mine = np.zeros(1, dtype=np.int64)                 # the step this rank announces
        others = [r for r in range(self.size) if r != self.rank] if self.rank == ROOT else [ROOT]
        self._peers = others if self.size > 1 else []
        self._inbox = np.zeros((len(self._peers), 1), dtype=np.int64)  # what the peers announced
        self._recvs = [self.comm.Recv_init([self._inbox[i], MPI.INT64_T], source=r, tag=TAG_ARRIVE)
                       for i, r in enumerate(self._peers)]
        self._sends = [self.comm.Send_init([self._mine, MPI.INT64_T], dest=r, tag=TAG_ARRIVE)
                       for r in self._peers]
        self._reqs = self._recvs + self._sends
        self._mt = MPI.Query_thread() >= MPI.THREAD_MULTIPLE  # may the thread call MPI?
        self._lock = threading.Lock()
        self._busy = None      # (what, step, since) while the main thread is inside a collective
        self._active = False   # this step's arrival requests are started and not yet completed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mpitrain-watchdog", daemon=True)
        self._thread.start()

    def __bool__(self):
        return True

    # ------------------------------------------------------------ main thread
    def arrive(self, step: int, what: str = "the gradient all-reduce") -> None:
        """Announce that this rank reached ``what`` of ``step``; the clock starts. Never blocks."""
        if self._reqs and not self._active:
            self._mine[0] = step
            MPI.Prequest.Startall(self._reqs)
            self._active = True
        self._busy = (what, step, time.monotonic())

    def guard(self, what: str, step: int) -> "_Guard":
        """The body is (the end of) a collective: watched; on exit the arrival requests complete."""
        if self._busy is None:
            self.arrive(step, what)
        return _Guard(self, what, step)

    def collective(self, step: int, what: str = "the gradient all-reduce") -> "_Guard":
        """Wrap one collective every rank must join: ``arrive`` + ``guard``."""
        self.arrive(step, what)
        return _Guard(self, what, step)

    def _settle(self, what: str, step: int) -> None:
        if not self._active:
            return
        with self._lock:  # the thread never Tests the requests while they are being completed
            self._active = False
        MPI.Request.Waitall(self._reqs)
        if self.rank == ROOT and (self._inbox != step).any():
            odd = {r: int(v) for r, v in zip(self._peers, self._inbox[:, 0]) if v != step}
            raise UserError(f"{tag()} watchdog: ranks were at different steps in {what} (rank 0 at "
                            f"step {step}, others: {odd}); this is a bug, please report it")

    # ------------------------------------------------------------ the thread
    def _watch(self):
        tick = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(tick):
            busy = self._busy
            if busy is None:
                continue
            what, step, since = busy
            waited = time.monotonic() - since
            if waited > self.limit and self._busy is busy:
                self._fire(self._diagnose(what, step, waited))
                return

    def _diagnose(self, what: str, step: int, waited: float) -> str:
        missing = None
        with self._lock:
            if self._active and self._mt:
                missing = [r for r, req in zip(self._peers, self._recvs) if not req.Test()]
        head = f"{tag()} error: watchdog:"
        limit = f"comm.timeout_s={self.timeout_s:g} s" + (
            f" + {self.limit - self.timeout_s:g} s grace" if self.limit > self.timeout_s else "")
        end = f"Aborting the job{self.hint}"
        look = ("(e.g. `py-spy dump --pid PID` on its host, or the node's health), or raise "
                "comm.timeout_s if a step can legitimately take that long")
        if missing:
            who = f"rank(s) {missing}" if self.rank == ROOT else "rank 0"
            arrived = sorted(set(range(self.size)) - set(missing)) if self.rank == ROOT else None
            seen = f"; arrived: {_ranges(arrived)}" if arrived is not None else ""
            it = "they are" if len(missing) > 1 else "it is"
            them = "those ranks" if len(missing) > 1 else "that rank"
            return (f"{head} {who} did not reach {what} of step {step} within {limit} (waited "
                    f"{waited:.1f} s{seen}); {it} stuck or dead. Look at {them} {look}. {end}")
        return (f"{head} this rank has been inside {what} of step {step} for {waited:.1f} s ({limit}); "
                "every rank it can see reached it, but it has not finished: a rank stopped inside it "
                f"(stuck, stopped, or its network failed). Look at the ranks' hosts {look}. {end}")

    def _fire(self, msg: str) -> None:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()
        if self._abort is not None:  # tests
            self._abort(1)
            return
        from .runtime import abort

        if self._mt:
            abort(1)
        # MPI_Abort is not allowed from this thread: exiting makes the launcher end the job
        sys.stdout.flush()
        os._exit(1)  # pragma: no cover

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop the thread and free the requests and the communicator (not collective)."""
        self._stop.set()
        self._busy = None
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2)
        if self._active:  # the job is failing inside a collective: leave MPI alone, Abort follows
            return
        reqs, self._reqs, self._recvs, self._sends = self._reqs, [], [], []
        for req in reqs:
            with contextlib.suppress(MPI.Exception):
                req.Free()
        if self.comm != MPI.COMM_NULL:
            with contextlib.suppress(MPI.Exception):
                self.comm.Free()


class _Guard:
    __slots__ = ("wd", "what", "step")

    def __init__(self, wd, what, step):
        self.wd, self.what, self.step = wd, what, step

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        self.wd._busy = None
        if typ is None:
            self.wd._settle(self.what, self.step)
        return False


# ---------------------------------------------------------------------------- SIGTERM grace

TERM_GRACE_S = 20.0  # MPITRAIN_TERM_GRACE_S overrides (tests); SLURM's KillWait is 30 s by default
TERM_DUPLICATE_S = 1.0  # SIGTERMs this close to the first are one kill delivered twice (srun + the batch
                        # script's trap, hydra forwarding): only a later one means "end now"


class TermGrace:
    """End this rank ``grace_s`` after SIGTERM if the job has not stopped by itself by then.

    SIGTERM asks the ranks to stop at the next step boundary and write a checkpoint
    (``train._StopFlag``). A rank blocked inside MPI never runs a Python signal
    handler, and mpirun (hydra) forwards SIGTERM without ever escalating, so a job
    with a stuck rank would ignore ``kill``/``timeout`` for ever. Python's C-level
    handler still writes the signal number to the wakeup fd; this thread reads it
    and, ``grace_s`` later (or at a second SIGTERM at least TERM_DUPLICATE_S after the
    first), reports and aborts the job.
    """

    def __init__(self, grace_s: float | None = None, abort=None):
        self.grace_s = float(grace_s) if grace_s is not None else env_knob("MPITRAIN_TERM_GRACE_S", TERM_GRACE_S)
        self._abort = abort
        self._socks = None
        self._old_fd = -1
        self._thread = None

    def install(self) -> bool:
        """Start watching (main thread only; returns False where that is not possible)."""
        import socket

        try:
            r, w = socket.socketpair()
        except OSError:
            return False
        try:
            w.setblocking(False)
            self._old_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError):  # not the main thread
            r.close()
            w.close()
            return False
        self._socks = (r, w)
        self._thread = threading.Thread(target=self._run, args=(r,), name="mpitrain-sigterm", daemon=True)
        self._thread.start()
        return True

    def _run(self, r):
        import select

        since = None
        while True:
            timeout = None if since is None else max(0.0, since + self.grace_s - time.monotonic())
            try:
                ready, _, _ = select.select([r], [], [], timeout)
                data = r.recv(256) if ready else b""
            except (OSError, ValueError):
                return  # closed by restore()
            if ready and not data:
                return  # closed by restore()
            terms = data.count(bytes([signal.SIGTERM]))
            now = time.monotonic()
            if terms and since is not None and now - since >= TERM_DUPLICATE_S:
                return self._fire(f"a second SIGTERM {now - since:.1f} s after the first")
            if terms and since is None:  # several at once are one kill delivered twice (launcher + script)
                since = now
            elif since is not None and time.monotonic() >= since + self.grace_s:
                return self._fire(f"SIGTERM {self.grace_s:g} s ago")

    def _fire(self, what: str) -> None:
        from .runtime import abort, defer_to_rank0, report

        defer_to_rank0()  # every rank got the signal: rank 0 speaks for them
        report(f"{tag()} error: got {what}, but the ranks could not stop at a step boundary (a rank is "
               "stuck in a collective, or a step is very slow); ending now without a new checkpoint. "
               "Resume from the last checkpoint with --resume; set comm.timeout_s to have stuck ranks "
               "named")
        if self._abort is not None:  # tests
            return self._abort(143)
        if MPI.Query_thread() >= MPI.THREAD_MULTIPLE:
            abort(143)
        os._exit(143)  # pragma: no cover

    def restore(self) -> None:
        if self._socks is None:
            return
        try:
            signal.set_wakeup_fd(self._old_fd)
        except (ValueError, OSError):
            pass
        r, w = self._socks
        self._socks = None
        w.close()  # the thread sees end-of-file and returns
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2)
        r.close()


def _ranges(ranks) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ", ".join(out)


def start(comm, timeout_s: float, **kw):
    """``Watchdog(comm, timeout_s)`` when ``timeout_s > 0`` (collective), else ``OFF``."""
    return Watchdog(comm, timeout_s, **kw) if timeout_s and timeout_s > 0 else OFF
