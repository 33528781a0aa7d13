#!/usr/bin/env python3
"""Training steps on plans vs on per-step calls, side by side in one process (issue 17: "buckets use plans").

    OMP_NUM_THREADS=1 mpirun -n 2 python benchmarks/plan_steps.py
    OMP_NUM_THREADS=1 mpirun -n 2 python benchmarks/plan_steps.py --hidden 2048,1024 --bucket 262144 --steps 20

Two loops on the same float32 MLP (synthetic batches, seed 0), stepped alternately, the order flipped
every step: *plans* -- the all-reduce strategy as it is (one allreduce_init plan per bucket, bound once);
*calls* -- the same strategy with ``plans = False`` and the unbucketed path on ``allreduce`` (before
issue 17: an iallreduce per bucket and step, or one checked allreduce per step). Reported: per-step wall
and exposed-communication ms, median over the steps (max over ranks), for each bucket size given.
The parameters are checked to stay equal (allclose) and identical on every rank.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from mpi4py import MPI

from mpitrain import config, sync
from mpitrain.collectives import allreduce
from mpitrain.models import MLP
from mpitrain.runtime import get_comm
from mpitrain.sync.allreduce import AllReduce
from mpitrain.train import Loop, Run


class Calls(AllReduce):
    """The strategy before plans: iallreduce per bucket and step, a checked allreduce without buckets."""
    plans = False

    def after_backward(self, step):
        if self.bucket_bytes > 0:
            return super().after_backward(step)
        run, grads = self.run, self.run.model.grads
        with run.timers("comm"), run.watchdog.collective(step):
            allreduce(grads, self.comm, op="avg", algorithm=self.algorithm)


def loop(comm, cls, args, bucket: int, overlap: str):
    cfg = config.JobConfig()
    cfg.comm.algorithm, cfg.comm.bucket_bytes, cfg.comm.overlap = args.algorithm, bucket, overlap
    cfg.train.lr, cfg.train.momentum = 0.01, 0.9
    run = Run(cfg, comm)
    run.xp = np
    run.model = MLP(args.features, [int(h) for h in args.hidden.split(",")], 10, xp=np, dtype=np.float32, seed=0)
    run.steps_per_epoch = run.total_steps = args.steps
    run.strategy = cls(cfg, comm)
    run.strategy.bind(run)
    return Loop(run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--hidden", default="2048,1024")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--buckets", default="0,262144,4194304", help="comm.bucket_bytes values, comma-separated")
    ap.add_argument("--overlap", default="progress")
    ap.add_argument("--algorithm", default="ring")
    args = ap.parse_args()
    comm = get_comm()
    r, p = comm.Get_rank(), comm.Get_size()
    say = print if r == 0 else (lambda *a, **k: None)
    rng = np.random.default_rng(r)
    say(f"# plan_steps: {p} ranks, MLP {args.features}-{args.hidden}-10 float32, batch {args.batch}/rank, "
        f"{args.algorithm}, overlap {args.overlap}, {args.steps} steps each, alternating; median ms per step, "
        "max over ranks")
    say(f"# {'bucket_bytes':>12} {'plans step':>11} {'calls step':>11} {'plans/calls':>12} "
        f"{'plans comm':>11} {'calls comm':>11}")
    for bucket in (int(b) for b in args.buckets.split(",")):
        loops = {"plans": loop(comm, sync.select(config.JobConfig()), args, bucket, args.overlap),
                 "calls": loop(comm, Calls, args, bucket, args.overlap)}
        wall = {k: [] for k in loops}
        comm_ms = {k: [] for k in loops}
        for step in range(args.steps + 2):  # the first two: warm-up (plans are made on the first)
            x = rng.standard_normal((args.batch, args.features)).astype(np.float32)
            y = rng.integers(0, 10, args.batch)
            for k in (("plans", "calls") if step % 2 else ("calls", "plans")):
                lp = loops[k]
                before = lp.run.timers.total("comm")
                comm.Barrier()
                t = time.perf_counter()
                lp.train_step((x, y))
                lp.run.step += 1
                dt = time.perf_counter() - t
                after = lp.run.timers.total("comm")
                if step >= 2:
                    wall[k].append(dt)
                    comm_ms[k].append(after - before)
        a, b = (lp.run.model.params for lp in (loops["plans"], loops["calls"]))
        assert np.allclose(a, b, rtol=1e-4, atol=1e-6), "plans and calls diverged"
        assert len(set(comm.allgather(a.tobytes()))) == 1, "parameters differ between ranks"
        med = {k: comm.allreduce(statistics.median(v) * 1e3, op=MPI.MAX) for k, v in wall.items()}
        cm = {k: comm.allreduce(statistics.median(v) * 1e3, op=MPI.MAX) for k, v in comm_ms.items()}
        say(f"  {bucket:>12} {med['plans']:11.2f} {med['calls']:11.2f} {med['plans'] / med['calls']:11.2f}x "
            f"{cm['plans']:11.2f} {cm['calls']:11.2f}")
        for lp in loops.values():
            lp.run.strategy.close()


if __name__ == "__main__":
    main()
