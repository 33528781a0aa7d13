#!/usr/bin/env python3
"""shm's cost taken apart, each piece against its floor, on one alloc_shared buffer.

    OMP_NUM_THREADS=1 mpirun -n 2 python benchmarks/shm_floor.py [--sizes 1KiB,1MiB,4MiB] [--iters 200]

Per size, each contender in a block of ``iters`` barrier-started calls, median per rank, max over
ranks (µs), twice: with the buffer rewritten before every call ("reset", as the bench and training
do: the other rank's slice is then in the other core's cache) and without ("warm"):

  shm call    mpitrain.allreduce(buf, algorithm="shm")   (the agreement check carries sync 1)
  shm plan    allreduce_init(buf, algorithm="shm"): start().wait()   (checked once; sync 1 is a
              small Allreduce of the buffer's window key)
  native      mpitrain.allreduce(buf, algorithm="native")
  data part   shm's step 2 alone: this rank's slice read from every rank's buffer, reduced in tiles,
              written into every buffer (shm.reduce_tiles) -- no syncs
  barrier     the node communicator's Barrier (what a sync costs)
  memcpy      this rank copying the whole buffer (one pass of the same bytes: the memory floor)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from mpi4py import MPI

import mpitrain
from mpitrain.collectives import shm, state_for
from mpitrain.collectives.partition import chunk_bounds
from mpitrain.runtime import get_comm
from mpitrain.units import format_size, parse_size


def timed(comm, fn, buf, src, iters: int, reset: bool) -> float:
    ts = []
    for _ in range(iters):
        if reset:
            buf[...] = src
        comm.Barrier()
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return comm.allreduce(float(np.median(ts)), op=MPI.MAX) * 1e6


def contenders(comm, buf):
    r, p = comm.Get_rank(), comm.Get_size()
    flat = buf.reshape(-1)
    nd = shm.node(state_for(comm))
    w, off = nd.find(flat)
    bufs = shm._views(w, off, flat)
    lo, hi = chunk_bounds(flat.size, p, r)
    tiles = shm.tiles_for(nd, flat.dtype, "sum")
    plan = mpitrain.allreduce_init(buf, comm, algorithm="shm")
    copy = np.empty_like(flat)
    fns = {
        "shm call": lambda: mpitrain.allreduce(buf, comm, algorithm="shm"),
        "shm plan": lambda: plan.start().wait(),
        "native": lambda: mpitrain.allreduce(buf, comm, algorithm="native"),
        "data part": lambda: shm.reduce_tiles(bufs, r, lo, hi, "sum", None, [bufs[r]] + bufs[:r] + bufs[r + 1:],
                                              tiles),
        "barrier": nd.comm.Barrier,
        "memcpy": lambda: np.copyto(copy, flat),
    }
    return fns, plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1KiB,256KiB,1MiB,4MiB,16MiB")
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args(argv)
    comm = get_comm()
    r = comm.Get_rank()
    if r == 0:
        print(f"# shm_floor: {comm.Get_size()} ranks, float32 sum, {args.iters} calls per cell; µs, reset / warm")
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        n = max(1, size // 4)
        buf = mpitrain.alloc_shared(n, np.float32, comm)
        src = np.full(n, 1.0 / (r + 1), np.float32)  # sums stay small: nothing overflows
        fns, plan = contenders(comm, buf)
        got = {k: (timed(comm, f, buf, src, args.iters, True), timed(comm, f, buf, src, args.iters, False))
               for k, f in fns.items()}
        plan.free()
        if r == 0:
            cells = "  ".join(f"{k} {a:.1f}/{b:.1f}" for k, (a, b) in got.items())
            nat = got["native"][0]
            print(f"{format_size(size):>8}  {cells}  | native/call {nat / got['shm call'][0]:.2f}x, "
                  f"native/plan {nat / got['shm plan'][0]:.2f}x (reset)", flush=True)
        del fns, buf
    return 0


if __name__ == "__main__":
    with np.errstate(over="ignore"):  # "warm" sums the same buffer again and again: it overflows to inf
        main()
