"""The parameter server's messages and its way of waiting (see the package docstring for the protocol).

A message is an 80-byte float64 header followed by a body of parameters or gradients. Waiting
never blocks inside MPI (MPICH busy-polls a core in Wait): Test, then sleep with a growing nap.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from ...runtime import UserError

TAG_REQ, TAG_REPLY, TAG_SNAP = 71, 72, 73
PUSH, PULL, DONE, SNAP, SNAPFULL, END, PARAMS, SNAPSHOT = 1, 2, 3, 4, 5, 6, 7, 8
HEADER = 10
HB = HEADER * 8  # header bytes
# header fields (replies: STEP = the server's version = updates it has applied, FLAG = stop signal)
KIND, STEP, FLAG, LOSS, CORRECT, COUNT, SENT, COMPUTE, COMM, SKIPPED = range(HEADER)

SPIN = 50                       # Tests before the first nap
NAP_MIN, NAP_MAX = 50e-6, 5e-4  # seconds


def bytes_per_step(n: int, itemsize: int, servers: int) -> int:
    """Bytes one worker step moves: pull request + reply + push (see the package docstring)."""
    return 2 * n * itemsize + 3 * HB * servers


def rank_local(exc: UserError) -> UserError:
    exc.rank_local = True  # only this rank knows: report at once (runtime.defer_to_rank0)
    return exc


class Buf:
    """One message: an 80-byte float64 header followed by ``count`` elements of ``dtype``."""

    def __init__(self, count: int, dtype):
        self.raw = np.zeros(HB + count * np.dtype(dtype).itemsize, dtype=np.uint8)
        self.hdr = self.raw[:HB].view(np.float64)
        self.body = self.raw[HB:].view(dtype)

    def msg(self, nbytes=None):
        return [self.raw if nbytes is None else self.raw[:nbytes], MPI.BYTE]


class Waiter:
    """Polling with naps and the watchdog's limits (comm.timeout_s = T, grace g) of one rank."""

    def __init__(self, rank: int, servers: int, timeout_s: float, grace: float, hint: str):
        self.rank, self.S, self.T, self.g, self.hint = rank, servers, timeout_s, grace, hint

    def wait(self, test, limit=0.0, expired=None, idle=None):
        """Poll ``test()`` until it is true: spin a little, then nap (MPICH's Wait would burn a core).

        ``idle()`` runs at every nap; after ``limit`` s (> 0) ``expired(waited)`` is raised.
        """
        if test():
            return
        t0 = time.monotonic()
        nap, n = NAP_MIN, 0
        while not test():
            n += 1
            if n <= SPIN:
                continue
            time.sleep(nap)
            nap = min(nap * 2, NAP_MAX)
            if idle is not None:
                idle()
            if limit and time.monotonic() - t0 > limit:
                raise expired(time.monotonic() - t0)

    def sends(self, reqs, what):
        if not reqs:
            return
        limit = self.T + 2 * self.g if self.T > 0 else 0.0
        self.wait(lambda: MPI.Request.Testall(reqs), limit,
                  lambda w: rank_local(UserError(f"watchdog (parameter server): {what} did not complete "
                                                 f"within {w:.1f} s (comm.timeout_s={self.T:g} s + grace); "
                                                 "the receiving rank is stuck or dead. Aborting the job")))
        reqs.clear()

    def recvs(self, reqs, sources, what):
        """Wait for one receive per source; a timeout names the sources that did not answer."""
        done = [False] * len(reqs)

        def test():
            for i, r in enumerate(reqs):
                if not done[i] and r.Test():
                    done[i] = True
            return all(done)

        # rank 0 (snapshots) after T + g; workers after T + 2g, all but the first one more second later
        limit = 0.0
        if self.T > 0:
            limit = self.T + (self.g if self.rank == 0 else 2 * self.g + (self.rank > self.S))

        def expired(w):
            late = [s for s, ok in zip(sources, done) if not ok]
            return rank_local(UserError(
                f"watchdog (parameter server): server rank(s) {late} did not answer {what} within {w:.1f} s "
                f"(comm.timeout_s={self.T:g} s + {limit - self.T:g} s grace); it is stuck or dead, or waits for "
                "a rank that is. Look at that rank (e.g. `py-spy dump --pid PID`), or raise comm.timeout_s if a "
                f"step can legitimately take that long. Aborting the job{self.hint}"))

        self.wait(test, limit, expired)

    def final_status(self, pcomm, code: int = 0) -> int:
        """Everyone learns rank 0's exit status; the others wait quietly (no spinning) meanwhile."""
        buf = np.array([code], dtype=np.int64)
        req = pcomm.Ibcast([buf, MPI.INT64_T], root=0)
        self.wait(req.Test)
        return int(buf[0])
