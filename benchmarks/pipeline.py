#!/usr/bin/env python3
"""Pipeline parallelism measured: bubble, stash memory, speed-up and bytes, beside their formulas.

    mpirun -n 2 python benchmarks/pipeline.py [--micro 1,2,4,8] [--layers 4 --embd 256 --ctx 128 --batch 4]
                                              [--steps 4] [--json F] [--plot F.png]

One run, side by side on the same ranks:
  1. rank 0 alone trains the whole GPT with accumulation of M micro-batches (the other ranks wait
     in a barrier): the pp = 1 step time;
  2. all ranks as one pipeline (pp = ranks), GPipe and 1F1B, for every M: the step time, every stage's
     forward/backward spans (the last step's), idle share per stage = 1 - busy / makespan against the
     predicted bubble (p-1)/(m+p-1), the peak of live stashed activations (count and bytes) against its
     bound (GPipe M, 1F1B p-r), and the bytes each boundary carries against 2·M·B·T·C·itemsize.
Speed-up = step(pp=1) / step(pipeline) against the ideal p·m/(m+p-1) (equal stages, free messages).
--plot draws the predicted and measured timelines of the largest M (1F1B) one above the other.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from mpitrain.models.gpt import GPT, Part, piece_flops
from mpitrain.parallel import schedule as sched
from mpitrain.parallel.accumulate import Accumulator
from mpitrain.parallel.grid import Grid
from mpitrain.parallel.pipeline import Pipeline
from mpitrain.parallel.stages import split_blocks
from mpitrain.runtime import get_comm, log0


class Recorder:
    """A stand-in for the run's trace: keeps each span as (op, mb, start, end) in perf_counter seconds."""

    def __init__(self):
        self.spans = []

    def instant(self, *a, **k):
        pass

    def add_span(self, *a, **k):
        pass

    def span(self, track, name, **args):
        rec = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                rec.spans.append(("fwd" if name[0] == "F" else "bwd", int(name[1:]), self.t0, time.perf_counter()))

        return _Span()


def _batches(m, b, T, V=256, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, V, (b, T + 1)),) for _ in range(m)]


def whole_step_time(args, m, steps) -> float:
    """Rank 0: the whole model, M micro-batches accumulated, seconds per step (median)."""
    model = GPT(args.layers, args.heads, args.embd, args.ctx, 256, seed=0)
    acc, times = Accumulator(model, m), []
    micro = _batches(m, args.batch, args.ctx)
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        acc.reset()
        for k, mb in enumerate(micro):
            model.loss_and_grad(mb, **acc.kwargs())
            if k < m - 1:
                acc.add()
        acc.finish(0, model.grads.size)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def pipeline_run(args, grid, schedule, m, steps):
    embed, block, head = piece_flops(args.embd, 256, args.ctx)
    lo, hi = split_blocks(args.layers, grid.pp, block, embed, head)[grid.pp_rank]
    model = GPT(args.layers, args.heads, args.embd, args.ctx, 256, seed=0, part=Part(lo, hi, grid.first, grid.last))
    pipe = Pipeline(model, grid, schedule, m, args.batch)
    micro, times = _batches(m, args.batch, args.ctx), []
    for s in range(steps + 1):
        rec = Recorder()
        pipe.trace = rec
        grid.pp_comm.Barrier()
        t0 = time.perf_counter()
        pipe.step(micro)
        grid.pp_comm.Barrier()
        times.append(time.perf_counter() - t0)
    sent = grid.pp_comm.allreduce(pipe.sent["activation"] + pipe.sent["gradient"]) / (steps + 1) / (grid.pp - 1)
    spans = grid.pp_comm.gather([(grid.pp_rank, *sp) for sp in rec.spans], root=0)
    stash = grid.pp_comm.gather((pipe.peak_stash, pipe.peak_stash_bytes), root=0)
    return float(np.median(times[1:])), spans, stash, sent, pipe.check


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--micro", default="1,2,4,8", help="micro-batch counts M (default 1,2,4,8)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="windows per micro-batch (default 4)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per point (after one warm-up)")
    ap.add_argument("--json", metavar="F")
    ap.add_argument("--plot", metavar="F.png")
    args = ap.parse_args(argv)
    comm = get_comm()
    p = comm.Get_size()
    if p < 2:
        raise SystemExit("run it on 2 or more ranks: mpirun -n 2 python benchmarks/pipeline.py")
    grid = Grid(comm, 1, p)
    ms = [int(x) for x in args.micro.split(",")]
    rows, last_spans = [], None
    B, T, C = args.batch, args.ctx, args.embd
    log0(f"pipeline of {p} stages, GPT {args.layers}L {args.embd}C ctx {args.ctx}, {B} windows per micro-batch; "
         f"OMP_NUM_THREADS-limited ranks; medians of {args.steps} steps")
    log0(f"{'sched':<6} {'M':>3} {'step ms':>9} {'pp=1 ms':>9} {'speed-up':>9} {'ideal':>6} {'of ideal':>8} "
         f"{'bubble':>7} {'idle/stage (measured)':>24} {'stash/stage (bound)':>22} {'bytes/boundary':>15} {'2MBTC4':>9}")
    for m in ms:
        whole = whole_step_time(args, m, args.steps) if comm.Get_rank() == 0 else None
        comm.Barrier()
        whole = comm.bcast(whole, root=0)
        for schedule in ("gpipe", "1f1b"):
            secs, spans, stash, sent, _ = pipeline_run(args, grid, schedule, m, args.steps)
            if comm.Get_rank() != 0:
                continue
            flat = [sched.Span(stage=s, op=op, mb=k, start=a, end=b) for part in spans for s, op, k, a, b in part]
            idle = sched.idle_fraction(flat, p)
            bound = [m if schedule == "gpipe" else min(m, p - r) for r in range(p)]
            ideal = p * m / (m + p - 1)
            boundary = 2 * m * B * T * C * 4
            row = {"schedule": schedule, "M": m, "step_s": secs, "whole_step_s": whole, "speedup": whole / secs,
                   "ideal": ideal, "bubble": sched.bubble(p, m), "idle": idle,
                   "stash": [s for s, _ in stash], "stash_bytes": [b for _, b in stash], "stash_bound": bound,
                   "bytes_per_boundary": sent, "boundary_formula": boundary}
            rows.append(row)
            if schedule == "1f1b":
                last_spans = flat
            log0(f"{schedule:<6} {m:>3} {secs * 1e3:>9.1f} {whole * 1e3:>9.1f} {whole / secs:>8.2f}x {ideal:>6.2f} "
                 f"{whole / secs / ideal:>7.0%} {sched.bubble(p, m):>7.1%} "
                 f"{' '.join(f'{x:.1%}' for x in idle):>24} "
                 f"{' '.join(f'{s}({b})' for s, b in zip(row['stash'], bound)):>22} "
                 f"{sent:>15,.0f} {boundary:>9,}")
    if comm.Get_rank() == 0:
        for schedule in ("gpipe", "1f1b"):
            mem = [r for r in rows if r["schedule"] == schedule]
            log0(f"peak stashed activation bytes per stage, {schedule}: " + "; ".join(
                f"M={r['M']}: " + ", ".join(f"{b / 2**20:.1f} MiB" for b in r["stash_bytes"]) for r in mem))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ranks": p, "args": vars(args), "rows": rows}, f, indent=1)
        if args.plot and last_spans:
            m = ms[-1]
            predicted = sched.simulate(sched.build("1f1b", p, m), p, m)
            t0 = min(s.start for s in last_spans)
            measured = [sched.Span(s.stage, s.op, s.mb, s.start - t0, s.end - t0) for s in last_spans]
            sched.plot(predicted, args.plot, f"1F1B, pp={p}, M={m}: predicted (units) and measured (s)",
                       measured=measured)
            log0(f"wrote {args.plot}")
    grid.free()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
