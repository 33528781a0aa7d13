"""Timing one call the bench's way: reset the buffer (not timed), barrier, time, max over ranks.

    reset buf from src (copy, not timed); synchronize; barrier
    t0 = perf_counter(); fn(buf); synchronize; t = perf_counter() - t0
    time = max over ranks of the median over the rounds

Rounds per size: enough to fill TARGET_SECONDS (all algorithms together), MIN_ROUNDS..MAX_ROUNDS.
The ceilings: ``memcpy`` (rank 0 alone copies, the others idle without busy-polling) and ``d2h``
(every rank copies from its GPU into pinned host memory at once: the staged ring's ceiling).
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
from mpi4py import MPI

from .. import backend
from ..collectives.staging import ops_for

TARGET_SECONDS = 0.5  # default time budget per message size (all algorithms together)
MIN_ROUNDS = 10
MAX_ROUNDS = 1000


def time_once(comm, fn, buf, src, xp) -> float:
    """Collective. Seconds of one ``fn(buf)``, ``buf`` reset from ``src`` first, started at a barrier."""
    xp.copyto(buf, src)
    backend.synchronize(buf)
    comm.Barrier()
    t0 = time.perf_counter()
    fn(buf)
    backend.synchronize(buf)
    return time.perf_counter() - t0


def measure(comm, fn, buf, src, iters: int, warmup: int = 1, xp=None) -> float:
    """Collective. Seconds per call of ``fn(buf)``: max over ranks of the median of ``iters``
    barrier-started calls, ``buf`` reset from ``src`` before each (outside the timed region)."""
    xp = xp or backend.array_module(buf)
    for _ in range(warmup):
        time_once(comm, fn, buf, src, xp)
    ts = [time_once(comm, fn, buf, src, xp) for _ in range(max(1, iters))]
    return comm.allreduce(statistics.median(ts), op=MPI.MAX)


def measure_memcpy(comm, buf, src, iters: int, xp=np) -> float:
    """Collective. Median seconds of ``copyto(buf, src)`` on rank 0 alone (the others idle
    without busy-polling); every rank gets the value."""
    t = 0.0
    if comm.Get_rank() == 0:
        xp.copyto(buf, src)
        backend.synchronize(buf)
        ts = []
        for _ in range(max(1, iters)):
            t0 = time.perf_counter()
            xp.copyto(buf, src)
            backend.synchronize(buf)
            ts.append(time.perf_counter() - t0)
        t = statistics.median(ts)
        comm.Ibarrier().Wait()
    else:
        req = comm.Ibarrier()
        while not req.Test():
            time.sleep(0.0005)
    return comm.bcast(t, root=0)


def measure_d2h(comm, host, buf, iters: int) -> float:
    """Collective. Seconds to copy the device array ``buf`` into the pinned ``host`` array,
    every rank at once (ranks that share a GPU or a PCIe link share its bandwidth, as they do
    in the staged ring): max over ranks of the median. The staged ring's copy ceiling."""
    ops = ops_for(buf)
    stream = ops.stream()
    ts = []
    for _ in range(max(1, iters) + 1):  # the first one warms up
        backend.synchronize(buf)
        comm.Barrier()
        t0 = time.perf_counter()
        ops.copy_d2h(host, buf, stream)
        ops.synchronize(ops.record(stream))
        ts.append(time.perf_counter() - t0)
    return comm.allreduce(statistics.median(ts[1:]), op=MPI.MAX)


def rounds_for(round_time: float, target_seconds: float = TARGET_SECONDS) -> int:
    """Timed rounds for a size whose one round (every algorithm once) took ``round_time`` s:
    enough to fill ``target_seconds``, at least MIN_ROUNDS, at most MAX_ROUNDS."""
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(target_seconds / max(round_time, 1e-9)))))
