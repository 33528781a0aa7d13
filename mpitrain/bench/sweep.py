"""The sweep: every algorithm at every size, interleaved, checked and timed (``run_sweep``).

One collective per sweep (kinds.py: allreduce, reduce_scatter or allgather). Per size, on the same buffers:

    round 0     every algorithm once, native first (allreduce: its result is the reference; the
                halves: the formula, kinds.Reference): #wrong; a warm-up
    warm-up     ``warmup`` rounds, untimed; the last one's duration sizes the run
    rounds      ``iters`` (or rounds_for: ~TARGET_SECONDS per size), round k starting with the k-th
                algorithm so that slow drifts hit all alike; the last one checked again
    rows        per algorithm: time = max over ranks of the median, low_us = of the lower quartile
                (what bench --fit fits), algbw, busbw = algbw * 2(n-1)/n (the halves: (n-1)/n),
                speedup vs native, #wrong;
                then the ceilings: memcpy (one rank), p2p (the wire: a ping-pong between ranks 0 and
                1, bytes / one-way time, perf/measure.py's), d2h (device buffers: every rank at once)

With ``shm`` among the algorithms the buffer is ``alloc_shared``'s (the zero-copy case shm is made
for; the other algorithms do not care where their buffer lives).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from mpi4py import MPI

from .. import backend
from ..collectives import DTYPES, OPS, alloc_shared, state_for
from ..collectives.staging import ops_for
from ..perf.measure import measure_pingpong, pingpong_reps
from . import kinds
from .checks import check_result, make_source, tolerance
from .timing import MIN_ROUNDS, TARGET_SECONDS, measure_d2h, measure_memcpy, rounds_for, time_once

GB = 1e9


def counts_for(sizes, dtype) -> list[int]:
    """Element counts for byte sizes (at least 1, rounded down), without duplicates."""
    item = np.dtype(dtype).itemsize
    out = []
    for s in sizes:
        c = max(1, int(s) // item)
        if c not in out:
            out.append(c)
    return out


busbw_factor = kinds.busbw_factor


def _entries(comm, algorithms, op, collective="allreduce"):
    """[(label, fn(buf))] with native first; ``algorithms`` holds names or (label, fn(buf, comm, op))."""
    out, known = {}, kinds.algorithms_for(collective)
    for a in ["native", *algorithms]:
        if isinstance(a, str):
            if a not in known:
                raise ValueError(f"{collective}: unknown algorithm {a!r}; known: {', '.join(known)}")
            out.setdefault(a, kinds.call(comm, collective, a, op))
        else:
            label, f = a
            out.setdefault(label, (lambda f: lambda b: f(b, comm, op))(f))
    return list(out.items())


def _label(a) -> str:
    return a if isinstance(a, str) else a[0]


def _checked_dtype(dtype, op) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.name not in DTYPES:
        raise ValueError(f"dtype {dt.name} not supported; use one of {', '.join(DTYPES)}")
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    return dt


class _Sweep:
    """What stays fixed over a sweep (the algorithms, buffers, tolerance); one method per phase of a size."""

    def __init__(self, comm, entries, dt, op, xp, nmax: int, seed: int, memcpy: bool, collective="allreduce"):
        self.comm, self.entries, self.dt, self.op, self.xp, self.memcpy = comm, entries, dt, op, xp, memcpy
        self.collective = collective
        self.row_op = "-" if collective == "allgather" else op  # a gather has no op
        self.labels = [lab for lab, _ in entries]
        self.p = comm.Get_size()
        self.src = xp.asarray(make_source(nmax, dt, op, comm.Get_rank(), seed))
        # shm times the zero-copy case: the sweep's buffer (every algorithm's) in a node-shared window
        self.buf = (alloc_shared(nmax, dt, comm) if "shm" in self.labels and xp is np else xp.empty(nmax, dtype=dt))
        self.ref = xp.empty(nmax, dtype=dt)
        # device buffers: a d2h ceiling row per size, into pinned host memory
        self.pinned = ops_for(self.buf).host_empty(dt, nmax) if memcpy and backend.is_device(self.buf) else None
        self.rtol = tolerance(dt, self.p)
        self.factor = busbw_factor(self.p, collective)
        self.formula = (None if collective == "allreduce"
                        else kinds.Reference(comm, collective, dt, op, self.rtol, xp, seed))

    def wrong(self, b, r) -> int:
        """Collective. Wrong elements of this rank's result ``b`` against the reference ``r``."""
        if self.formula is None:
            return check_result(self.comm, b, r, self.rtol, self.xp)
        return self.formula.wrong(b, r)

    def check_round(self, b, s, r, wrong) -> None:
        """Round 0: correctness (allreduce: native first, its result is the reference; the halves:
        the formula, written into ``r`` first); also a warm-up."""
        if self.formula is not None:
            self.formula.fill(r, b.size)
        for lab, fn in self.entries:
            self.xp.copyto(b, s)
            fn(b)
            backend.synchronize(b)
            if lab == "native" and self.formula is None:
                self.xp.copyto(r, b)
            wrong[lab] = max(wrong[lab], self.wrong(b, r))

    def _round(self, b, s) -> float:
        """Seconds of one untimed round: every algorithm once."""
        t0 = time.perf_counter()
        for _, fn in self.entries:
            time_once(self.comm, fn, b, s, self.xp)
        return time.perf_counter() - t0

    def rounds(self, b, s, iters, warmup: int, target_seconds: float) -> int:
        """Warm-up rounds, also timing one round to size the run; the timed rounds to run."""
        round_time = 0.0
        for _ in range(warmup):
            round_time = self._round(b, s)
        if iters:
            return int(iters)
        if not warmup:
            round_time = self._round(b, s)
        return rounds_for(self.comm.allreduce(round_time, op=MPI.MAX), target_seconds)

    def timed(self, b, s, r, rounds: int, wrong, tick) -> dict:
        """The timed rounds, interleaved (round k starts with the k-th algorithm); the last one checked."""
        times = {lab: [] for lab in self.labels}
        for it in range(rounds):
            tick(it, rounds)
            k = it % len(self.entries)
            for lab, fn in self.entries[k:] + self.entries[:k]:
                times[lab].append(time_once(self.comm, fn, b, s, self.xp))
                if it == rounds - 1:  # check the timed runs too (outside the timed region)
                    wrong[lab] = max(wrong[lab], self.wrong(b, r))
        return times

    def _max_over_ranks(self, values, dtype):
        arr = np.array(values, dtype=dtype)
        self.comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.MAX)
        return arr

    def rows(self, n: int, wanted, rounds: int, times, wrong) -> list[dict]:
        """One row per wanted algorithm (keys in COLUMNS, plus low_us); the same on every rank."""
        med = self._max_over_ranks([statistics.median(times[lab]) for lab in self.labels], np.float64)
        # lower quartile of the rounds (max over ranks): what bench --fit fits, robust to bursts of
        # load from other processes (rows carry it as low_us; the table and files show the median)
        low = self._max_over_ranks([np.percentile(times[lab], 25) for lab in self.labels], np.float64)
        bad = self._max_over_ranks([wrong[lab] for lab in self.labels], np.int64)
        nbytes = n * self.dt.itemsize
        t_native = med[self.labels.index("native")]
        out = []
        for lab in wanted:
            i = self.labels.index(lab)
            t = float(med[i])
            algbw = nbytes / t / GB if t > 0 else float("inf")
            out.append({
                "size": nbytes, "count": n, "type": self.dt.name, "op": self.row_op, "algorithm": lab,
                "picked": kinds.picked(self.comm, self.collective, nbytes) if lab == "auto" else "",
                "time_us": t * 1e6, "low_us": float(low[i]) * 1e6, "algbw": algbw, "busbw": algbw * self.factor,
                "speedup": float(t_native / t) if t > 0 else float("inf"),
                "wrong": int(bad[i]), "iters": rounds, "ranks": self.p,
            })
        return out

    def _ceiling(self, n: int, name: str, t: float, iters: int, ranks: int) -> dict:
        nbytes = n * self.dt.itemsize
        bw = nbytes / t / GB if t > 0 else float("inf")
        return {"size": nbytes, "count": n, "type": self.dt.name, "op": self.row_op, "algorithm": name,
                "picked": "", "time_us": t * 1e6, "algbw": bw, "busbw": bw, "speedup": None,
                "wrong": 0, "iters": iters, "ranks": ranks}

    def ceilings(self, b, s, n: int, rounds: int) -> list[dict]:
        """The memcpy row (one rank copying), the p2p row (ranks 0 and 1 ping-pong the same bytes; the
        others idle) and, for device buffers, the d2h row (every rank at once)."""
        out, it = [], max(MIN_ROUNDS, min(rounds, 50))
        if self.memcpy:
            out.append(self._ceiling(n, "memcpy", measure_memcpy(self.comm, b, s, it, self.xp), it, 1))
        if self.memcpy and self.p > 1:
            nbytes = n * self.dt.itemsize
            t = measure_pingpong(state_for(self.comm).comm, [nbytes])[0]
            out.append(self._ceiling(n, "p2p", t, pingpong_reps(nbytes), 2))
        if self.pinned is not None:
            out.append(self._ceiling(n, "d2h", measure_d2h(self.comm, self.pinned[:n], b, it), it, self.p))
        return out

    def size(self, n: int, wanted, iters, warmup: int, target_seconds: float, tick) -> list[dict]:
        """Check, warm up, time and report ``n`` elements: this size's rows."""
        b, s, r = self.buf[:n], self.src[:n], self.ref[:n]
        wrong = dict.fromkeys(self.labels, 0)
        tick(None, None)
        self.check_round(b, s, r, wrong)
        rounds = self.rounds(b, s, iters, warmup, target_seconds)
        times = self.timed(b, s, r, rounds, wrong, tick)
        return self.rows(n, wanted, rounds, times, wrong) + self.ceilings(b, s, n, rounds)


def run_sweep(comm, sizes, algorithms=("ring", "tree", "native", "auto"), dtype="float32", op="sum",
              iters=None, xp=np, *, warmup: int = 2, memcpy: bool = True, seed: int = 1234,
              target_seconds: float = TARGET_SECONDS, progress=None, on_size=None,
              collective: str = "allreduce") -> list[dict]:
    """Collective. Benchmark and check ``collective`` (kinds.COLLECTIVES) for each byte size in ``sizes``.

    ``algorithms``: names ("ring", "tree", "native", "auto"; the halves: "ring", "native", "auto")
    or (label, fn(buf, comm, op)) pairs (checked like the collective they stand for).
    ``iters``: timed rounds per size (default: enough for ~``target_seconds`` per size,
    MIN_ROUNDS..MAX_ROUNDS). Returns one dict per (size, algorithm) -- keys in COLUMNS --
    plus a ``memcpy`` row per size when ``memcpy``; identical on every rank.
    ``progress(i, nsizes, nbytes, round, rounds)`` (round None: warm-up) and ``on_size(rows)``
    are called on every rank.
    """
    if collective not in kinds.COLLECTIVES:
        raise ValueError(f"unknown collective {collective!r}; known: {', '.join(kinds.COLLECTIVES)}")
    dt = _checked_dtype(dtype, op)
    wanted = list(dict.fromkeys(_label(a) for a in algorithms))
    entries = _entries(comm, algorithms, op, collective)
    counts = counts_for(sizes, dt)
    sweep = _Sweep(comm, entries, dt, op, xp, max(counts), seed, memcpy, collective)
    rows = []
    for si, n in enumerate(counts):
        def tick(it, rounds, si=si, nbytes=n * dt.itemsize):
            if progress is not None:
                progress(si, len(counts), nbytes, it, rounds)

        size_rows = sweep.size(n, wanted, iters, warmup, target_seconds, tick)
        rows.extend(size_rows)
        if on_size is not None:
            on_size(size_rows)
    return rows


def exit_status(rows) -> int:
    """1 when any row has wrong elements, else 0 (rows are identical on every rank)."""
    return 1 if any(r.get("wrong") for r in rows) else 0
