"""The training loop: data -> gradients -> the strategy's agreement -> step, the same on every rank.

    for epoch:                                       every rank, in lock-step
      for batch_r in this rank's shard:
        loss = model.loss_and_grad(batch_r, strategy.grad_hook(step))     compute
        strategy.after_backward(step)                                     e.g. allreduce(avg)
        strategy.update(loss, step)        non-finite? policy (skip | error); clip; opt.step(grads, lr(step))
        strategy.after_step(step)                                         e.g. local SGD's average
        every check_every steps (when synced): prove the replicas are identical (hash)
        a signal? (agreed when synced) -> checkpoint, exit 75
      strategy.epoch_end; evaluate; epoch line; checkpoint every checkpoint.every epochs

Every rank starts from rank 0's parameters (broadcast, then verified by hash). Rank 0 prints;
the other ranks only speak when something is wrong.
"""

from __future__ import annotations

import math
import time

import numpy as np
from mpi4py import MPI

from ..metrics import ProgressBar, Trace
from ..runtime import EXIT_STOPPED, log0, signal_name


class Loop:
    def __init__(self, run):
        self.run = run
        self.cfg, self.comm = run.cfg, run.comm
        self._flag = np.zeros(1, dtype=np.int64)
        self.samples = 0
        self.test = (float("nan"), float("nan"))
        self.complete = False  # resumed a run that had nothing left to do

    # --------------------------------------------------------------- one step
    def train_step(self, batch):
        """One step on this rank's batch; returns (loss, correct) -- (nan, 0) for a skipped step."""
        run, strategy, model = self.run, self.run.strategy, self.run.model
        with run.timers("compute"):
            batch = tuple(run.xp.asarray(a) for a in batch)
            loss, correct = model.loss_and_grad(batch, on_grad_ready=strategy.grad_hook(run.step))
        strategy.after_backward(run.step)
        if not strategy.update(loss, run.step):  # it times its own compute and communication
            return float("nan"), 0
        return loss, correct

    def should_stop(self) -> bool:
        self._flag[0] = self.run.stop.signum
        with self.run.watchdog.guard("the stop-flag all-reduce", self.run.step):
            self.comm.Allreduce(MPI.IN_PLACE, self._flag, op=MPI.MAX)
        return bool(self._flag[0])

    # ------------------------------------------------------------------ epochs
    def epoch(self, bar) -> int | None:
        """One epoch (from ``start_in_epoch``); the step within it where a signal stopped it, else None."""
        run, t = self.run, self.cfg.train
        start, run.start_in_epoch = run.start_in_epoch, 0
        stats, i = [0.0, 0, 0], start  # loss sum, correct, seen
        batches = run.data.batches(run.epoch, start=start)
        while True:
            with run.timers("data"):
                batch = next(batches, None)
            if batch is None:
                break
            loss, c = self.train_step(batch)
            if t.step_sleep:
                time.sleep(t.step_sleep)
            run.step += 1
            i += 1
            run.strategy.after_step(run.step)
            n = run.model.count(batch)
            if math.isfinite(loss):
                stats = [stats[0] + loss * n, stats[1] + c, stats[2] + n]
            self.samples += n * run.size
            synced = run.strategy.synced()
            if t.check_every and run.step % t.check_every == 0 and synced:
                run.check_replicas()
            bar.update(i, epoch=run.epoch + 1, loss=stats[0] / max(stats[2], 1),
                       accuracy=stats[1] / max(stats[2], 1), samples=n * run.size,
                       comm_fraction=run.timers.fraction("comm"))
            if synced and self.should_stop():
                return i
        run.strategy.epoch_end(run.step)
        self.test = run.evaluate()
        run.epoch += 1
        bar.clear()
        run.results.epoch(run.epoch, run.step, run.total_bytes, stats, self.test, self.samples,
                          run.timers.fraction("comm"))
        if self.cfg.checkpoint.every and run.epoch % self.cfg.checkpoint.every == 0:
            run.save(0)
        return None

    def run_all(self, trace=None) -> bool:
        """Every epoch left; True when a signal stopped the run (a checkpoint was written)."""
        run, t = self.run, self.cfg.train
        if trace:
            run.trace = Trace(self.comm)
            run.timers.trace = run.trace
        bar = ProgressBar(run.steps_per_epoch, epochs=t.epochs, comm=self.comm)
        run.results.start()
        self.complete = run.complete(run.epoch, t.epochs, "epochs")
        if self.complete:
            self.test = run.last_test
        try:
            while run.epoch < t.epochs:
                stopped_at = self.epoch(bar)
                if stopped_at is not None:
                    path = run.save(stopped_at)
                    log0(f"stopped by signal {signal_name(int(self._flag[0]))} at epoch {run.epoch + 1}, step "
                         f"{run.step}; checkpoint written to {path}; resume with --resume")
                    return True
            run.check_replicas()
            return False
        finally:
            bar.close()

    def metrics(self, stopped: bool) -> dict:
        run = self.run
        return run.results.metrics(
            test=self.test, epochs=run.epoch, steps=run.step, ranks=run.size, samples=self.samples,
            comm_fraction=run.timers.fraction("comm"), timers=run.timers.totals(), skipped=run.policy.skipped,
            algorithm=self.cfg.comm.algorithm, backend=self.cfg.train.backend, stopped=stopped,
            strategy=run.strategy.label, comm_bytes=run.total_bytes, steps_done=run.step - run.first_step,
            bytes_divisor=run.size, optimizer_bytes=run.optimizer_bytes())


def run_loop(run, metrics_out=None, trace=None) -> int:
    """Train ``run`` (set up) to the end; write metrics; the exit status."""
    loop = Loop(run)
    stopped = loop.run_all(trace)
    metrics = loop.metrics(stopped)
    if run.trace is not None:
        run.trace.write(trace, run.comm)
    if run.rank == 0:
        run.results.write(metrics_out, metrics)
    if stopped:
        return EXIT_STOPPED
    if loop.complete:
        return 0
    skipped = f" ({run.policy.skipped} non-finite step(s) skipped)" if run.policy.skipped else ""
    log0(f"done: test accuracy {loop.test[1]:.4f}, {run.step} steps in {run.results.elapsed():.1f} s{skipped}")
    return 0
