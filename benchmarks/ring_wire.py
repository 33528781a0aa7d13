#!/usr/bin/env python3
"""The ring at the wire: ring plan vs ring call vs a two-step exchange vs MPI's Allreduce vs the wire.

    OMP_NUM_THREADS=1 mpirun -n 2 python benchmarks/ring_wire.py
    OMP_NUM_THREADS=1 mpirun -n 3 python benchmarks/ring_wire.py --max 16MiB --json runs/ring_wire.json

Contenders, on a float32 buffer of zeros (sum: nothing overflows), timed in one process, interleaved
round by round as benchmarks/plan_latency.py does, but in a random order each round (``measure``):

  plan      h.start(); h.wait()  with h = allreduce_init(buf, algorithm="ring")
  call      mpitrain.allreduce(buf, algorithm="ring")   (the check every call, then the same ring)
  exchange  2 ranks only: Sendrecv half, add, Sendrecv half (the plain exchange an MPI library does)
  native    comm.Allreduce(IN_PLACE, buf) on a Dup of the run's communicator
  wire      the ring's messages without the reduction: 2(p-1) Sendrecv of n/p to the right neighbour
            from the left one, into preallocated scratch (the floor any ring over point-to-point pays)

Time per operation: per rank the best round (``med``: the median round), then the maximum over ranks.
Ratios are speed-ups of the plan: other time / plan time (above 1: the plan is faster). Goals
(issue 17): plan >= exchange at 1-16 MiB on 2 ranks; plan >= native at >= 512 KiB on 2, 3, 4 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plan_latency import measure, sizes  # noqa: E402  (the house timing loop)

import mpitrain  # noqa: E402
from mpitrain.collectives.partition import chunk_bounds  # noqa: E402
from mpitrain.runtime import get_comm  # noqa: E402
from mpitrain.units import format_size, parse_size  # noqa: E402

TAG = 77


def exchange(comm, buf, tmp):
    """2 ranks: Sendrecv my half's partner, add, Sendrecv the finished half back (in place)."""
    r, n = comm.Get_rank(), buf.size
    other = 1 - r
    mlo, mhi = chunk_bounds(n, 2, r)
    olo, ohi = chunk_bounds(n, 2, other)
    t = tmp[:mhi - mlo]

    def run():
        comm.Sendrecv(buf[olo:ohi], dest=other, sendtag=TAG, recvbuf=t, source=other, recvtag=TAG)
        np.add(buf[mlo:mhi], t, out=buf[mlo:mhi])
        comm.Sendrecv(buf[mlo:mhi], dest=other, sendtag=TAG, recvbuf=buf[olo:ohi], source=other, recvtag=TAG)
    return run


def wire(comm, buf, tmp):
    """The ring's 2(p-1) messages of n/p each (right out, left in), without the reduction."""
    r, p, n = comm.Get_rank(), comm.Get_size(), buf.size
    right, left = (r + 1) % p, (r - 1) % p
    w = -(-n // p)
    src, dst = buf[:w], tmp[:w]

    def run():
        for _ in range(2 * (p - 1)):
            comm.Sendrecv(src, dest=right, sendtag=TAG, recvbuf=dst, source=left, recvtag=TAG)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--budget", type=float, default=0.02, help="seconds per contender per round")
    ap.add_argument("--min", default="512KiB")
    ap.add_argument("--max", default="16MiB")
    ap.add_argument("--json")
    args = ap.parse_args()
    comm = get_comm()
    raw = comm.Dup()
    r, p = comm.Get_rank(), comm.Get_size()
    say = print if r == 0 else (lambda *a, **k: None)
    mpi = MPI.Get_library_version().splitlines()[0]
    say(f"# ring_wire: {p} ranks, {mpi}, float32 sum, {args.rounds} rounds; time = max over ranks of the best "
        "round's per-op time; x = other/plan (>1: the plan is faster); med: from the median rounds")
    names = ["plan", "call"] + (["exchange"] if p == 2 else []) + ["native", "wire"]
    say("# " + f"{'size':>8} " + " ".join(f"{k + '(us)':>13}" for k in names) + " "
        + " ".join(f"{k + '/plan':>13}" for k in names[1:]) + f" {'med native/plan':>16}")
    rows = []
    for nbytes in sizes(parse_size(args.min), parse_size(args.max)):
        buf = np.zeros(nbytes // 4, dtype=np.float32)
        tmp = np.zeros(buf.size, dtype=np.float32)
        h = mpitrain.allreduce_init(buf, comm, algorithm="ring")
        fns = {"plan": lambda: h.start().wait(),
               "call": lambda: mpitrain.allreduce(buf, comm, algorithm="ring")}
        if p == 2:
            fns["exchange"] = exchange(raw, buf, tmp)
        fns["native"] = lambda: raw.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        fns["wire"] = wire(raw, buf, tmp)
        # a random order each round: a fixed rotation always runs the same contender after the same one,
        # and the one after ``wire`` paid for it (measured: the same plan 1.1-1.9x slower in that place)
        t, m = measure(comm, fns, args.rounds, args.budget, shuffle=True)
        h.free()
        row = {"bytes": nbytes, **{k: v * 1e6 for k, v in t.items()}, **{k + "_med": v * 1e6 for k, v in m.items()}}
        rows.append(row)
        say(f"  {format_size(nbytes):>8} " + " ".join(f"{row[k]:13.1f}" for k in names) + " "
            + " ".join(f"{t[k] / t['plan']:12.2f}x" for k in names[1:]) + f" {m['native'] / m['plan']:15.2f}x")
    if r == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"ranks": p, "mpi": mpi, "rows": rows}, f, indent=1)
    raw.Free()


if __name__ == "__main__":
    main()
