#!/usr/bin/env python3
"""Persistent plans (allreduce_init) vs a bare comm.Allreduce vs mpitrain.allreduce, side by side.

    OMP_NUM_THREADS=1 mpirun -n 2 python benchmarks/plan_latency.py
    OMP_NUM_THREADS=1 mpirun -n 2 python benchmarks/plan_latency.py --rounds 21 --json runs/plan.json

Two tables, every contender timed in the same process, interleaved round by round (the order of
the contenders rotates each round), each round a barrier and then ``iters`` back-to-back
operations on a float32 buffer of zeros (sum: zeros stay zeros, nothing overflows):

  small (8 B .. 64 KiB):  bare   comm.Allreduce(IN_PLACE, buf) on a Dup of the run's communicator
                          plan   h.start(); h.wait()  with h = allreduce_init(buf) (auto -> native:
                                 MPI-4's persistent Allreduce_init)
                          call   mpitrain.allreduce(buf)  (auto: the check + the fused small path)
  large (1 .. 16 MiB):    ring plan  allreduce_init(buf, algorithm="ring"): start + wait
                          ring call  mpitrain.allreduce(buf, algorithm="ring")

Time per operation: the best round of this rank (round time / iters; on a box shared with other jobs
the best round is the one least disturbed by them), then the maximum over ranks; the ``med`` column is
the same ratio from the median rounds. Ratios are time / time (below 1: the numerator is faster). Goal (issue 17): plan <= 1.3x
bare at 8 B .. 4 KiB on 2 ranks.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from mpi4py import MPI

import mpitrain
from mpitrain.runtime import get_comm
from mpitrain.units import format_size


def timed(comm, fn, iters: int) -> float:
    comm.Barrier()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def measure(comm, contenders: dict, rounds: int, budget_s: float, shuffle: bool = False) -> tuple[dict, dict]:
    """({name: best seconds per op}, {name: median seconds per op}): calibrated iters (the same on every
    rank), interleaved rounds; per rank the best (or median) round, then the maximum over ranks.
    Each round rotates the order by one, or (``shuffle``) draws a random one, the same on every rank."""
    for fn in contenders.values():  # warm-up
        fn()
        fn()
    est = max(timed(comm, fn, 3) for fn in contenders.values())
    iters = comm.allreduce(max(3, min(5000, int(budget_s / max(est, 1e-7)))), op=MPI.MAX)
    names = list(contenders)
    got = {k: [] for k in names}
    rng = np.random.default_rng(17)
    for r in range(rounds):
        order = [names[i] for i in rng.permutation(len(names))] if shuffle else \
            names[r % len(names):] + names[:r % len(names)]
        for k in order:
            got[k].append(timed(comm, contenders[k], iters))
    best = {k: comm.allreduce(float(np.min(v)), op=MPI.MAX) for k, v in got.items()}
    med = {k: comm.allreduce(float(np.median(v)), op=MPI.MAX) for k, v in got.items()}
    return best, med


def overhead(comm) -> tuple[float, float]:
    """(us of h.start().wait() around a no-op request, us of the no-op request's Start + Wait alone):
    what the plan's Python adds per step, measured locally on this rank (no MPI traffic)."""

    class Noop:
        def Start(self):
            pass

        def Wait(self):
            pass

        def Test(self):
            return True

    h = mpitrain.allreduce_init(np.zeros(2, dtype=np.float32), comm, algorithm="native")
    real, h._req = h._req, Noop()
    fast, h._fast, h._trivial, h._native = h._fast, True, False, True
    noop = Noop()

    def best(fn, n=100_000):
        out = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            out.append((time.perf_counter() - t) / n)
        return min(out) * 1e6

    plan_us = best(lambda: h.start().wait())
    bare_us = best(lambda: (noop.Start(), noop.Wait()))
    h._req, h._fast = real, fast
    h.free()
    return plan_us, bare_us


def sizes(lo: int, hi: int):
    s = lo
    while s <= hi:
        yield s
        s *= 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--budget", type=float, default=0.005, help="seconds per contender per round")
    ap.add_argument("--small-max", type=int, default=64 * 1024)
    ap.add_argument("--large-max", type=int, default=16 * 1024 * 1024)
    ap.add_argument("--json")
    args = ap.parse_args()
    comm = get_comm()
    bare_comm = comm.Dup()
    r, p = comm.Get_rank(), comm.Get_size()
    out = {"ranks": p, "mpi": MPI.Get_library_version().splitlines()[0], "small": [], "large": []}
    say = print if r == 0 else (lambda *a, **k: None)
    say(f"# plan_latency: {p} ranks, {out['mpi']}, float32 sum, {args.rounds} rounds, "
        f"time = max over ranks of the best round's per-op time; med: ratio of the median rounds")
    say(f"# {'size':>8} {'bare(us)':>9} {'plan(us)':>9} {'call(us)':>9} {'plan/bare':>10} {'call/bare':>10} "
        f"{'plan/call':>10} {'med plan/bare':>14}")
    for nbytes in sizes(8, args.small_max):
        buf = np.zeros(nbytes // 4, dtype=np.float32)
        h = mpitrain.allreduce_init(buf, comm)
        t, m = measure(comm, {
            "bare": lambda: bare_comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
            "plan": lambda: h.start().wait(),
            "call": lambda: mpitrain.allreduce(buf, comm),
        }, args.rounds, args.budget)
        h.free()
        row = {"bytes": nbytes, **{k: v * 1e6 for k, v in t.items()}, **{k + "_med": v * 1e6 for k, v in m.items()}}
        out["small"].append(row)
        say(f"  {format_size(nbytes):>8} {row['bare']:9.2f} {row['plan']:9.2f} {row['call']:9.2f} "
            f"{t['plan'] / t['bare']:9.2f}x {t['call'] / t['bare']:9.2f}x {t['plan'] / t['call']:9.2f}x "
            f"{m['plan'] / m['bare']:13.2f}x")
    say(f"#\n# {'size':>8} {'ring plan(us)':>14} {'ring call(us)':>14} {'plan/call':>10} {'med plan/call':>14}")
    for nbytes in sizes(1024 * 1024, args.large_max):
        buf = np.zeros(nbytes // 4, dtype=np.float32)
        h = mpitrain.allreduce_init(buf, comm, algorithm="ring")
        t, m = measure(comm, {
            "ring_plan": lambda: h.start().wait(),
            "ring_call": lambda: mpitrain.allreduce(buf, comm, algorithm="ring"),
        }, args.rounds, args.budget * 5)
        h.free()
        row = {"bytes": nbytes, **{k: v * 1e6 for k, v in t.items()}, **{k + "_med": v * 1e6 for k, v in m.items()}}
        out["large"].append(row)
        say(f"  {format_size(nbytes):>8} {row['ring_plan']:14.1f} {row['ring_call']:14.1f} "
            f"{t['ring_plan'] / t['ring_call']:9.2f}x {m['ring_plan'] / m['ring_call']:13.2f}x")
    plan_us, noop_us = overhead(comm)
    say(f"# plan overhead (rank 0, local): h.start().wait() around a no-op request {plan_us:.3f} us, the no-op "
        f"request alone {noop_us:.3f} us: +{plan_us - noop_us:.3f} us per step")
    out["overhead_us"] = plan_us - noop_us
    if r == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    bare_comm.Free()


if __name__ == "__main__":
    main()
