"""The training loop: data -> gradients -> the strategy's agreement -> step, the same on every rank.

    for epoch (or until train.max_steps):            every rank, in lock-step
      for batch_r in this rank's shard:                (train.accum_steps = A: A micro-batches, their
        loss = model.loss_and_grad(batch_r, strategy.grad_hook(step))     gradients averaged; the hook
                                                                          and agreement on the last only)
        strategy.after_backward(step)                                     e.g. allreduce(avg)
        strategy.update(loss, step)        non-finite? policy (skip | error); clip; opt.step(grads, lr(step))
        strategy.after_step(step)                                         e.g. local SGD's average
        every check_every steps (when synced): prove the replicas are identical (hash)
        a signal? (agreed when synced) -> checkpoint, exit 75
        every train.eval_every steps: evaluate (eval line); every checkpoint.every_steps: checkpoint
      strategy.epoch_end; evaluate; epoch line; checkpoint every checkpoint.every epochs
    max_steps reached mid-epoch: evaluate, epoch line, a final checkpoint when checkpointing is on

Every rank starts from rank 0's parameters (broadcast, then verified by hash). Rank 0 prints;
the other ranks only speak when something is wrong.
"""

from __future__ import annotations

import math
import time

import numpy as np
from mpi4py import MPI

from ..metrics import Trace
from ..parallel.accumulate import Accumulator
from ..runtime import EXIT_STOPPED, log0, signal_name
from .progress import Progress


class Loop:
    def __init__(self, run):
        self.run = run
        self.cfg, self.comm = run.cfg, run.comm
        self._flag = np.zeros(1, dtype=np.int64)
        self.samples = 0
        self.test = (float("nan"), float("nan"))
        self.complete = False  # resumed a run that had nothing left to do
        self.stop_at_epoch_end = False  # a signal agreed at an epoch's last step
        self.accum = max(1, self.cfg.train.accum_steps)
        self.max_steps = self.cfg.train.max_steps
        self.saved_step = -1     # the step of the last checkpoint this run wrote
        self.eval_s = 0.0        # seconds spent evaluating (not in tokens_per_s)
        self._acc = None         # accumulated gradients (accum_steps > 1)
        self._bwd_t0 = None      # --trace: when backprop handed over its first gradients this step

    # --------------------------------------------------------------- one step
    def train_step(self, batch):
        """One step on this rank's batch; returns (loss, correct) -- (nan, 0) for a skipped step."""
        run, strategy, model = self.run, self.run.strategy, self.run.model
        with run.timers("compute"), strategy.params_held("train"):
            batch = tuple(run.xp.asarray(a) for a in batch)
            loss, correct = model.loss_and_grad(batch, on_grad_ready=self._hook(strategy.grad_hook(run.step)))
            self._backward_done()
        strategy.after_backward(run.step)
        if not strategy.update(loss, run.step):  # it times its own compute and communication
            return float("nan"), 0
        return loss, correct

    def accum_step(self, micro):
        """One optimizer step over A micro-batches: (mean loss, correct summed)."""
        run, strategy, model = self.run, self.run.strategy, self.run.model
        xp, A = run.xp, len(micro)
        with run.timers("compute"), strategy.params_held("train"):
            if self._acc is None:
                self._acc = Accumulator(model, A)
            acc, losses, correct = self._acc, [], 0
            acc.reset()
            kw = acc.kwargs()  # a tied wte: its head and embedding parts summed apart (parallel/accumulate.py)
            for batch in micro[:-1]:
                loss, c = model.loss_and_grad(tuple(xp.asarray(a) for a in batch), **kw)
                losses.append(loss)
                correct += c
                acc.add()
            inner, grads, done = strategy.grad_hook(run.step), model.grads, [0]

            def ready(hi):  # the last micro-step: finish grads[lo:hi] = (g + acc) / A, then hand it on
                acc.finish(done[0], hi)
                done[0] = hi
                if inner is not None:
                    inner(hi)

            loss, c = model.loss_and_grad(tuple(xp.asarray(a) for a in micro[-1]), on_grad_ready=self._hook(ready),
                                          **kw)
            self._backward_done()
            if done[0] < grads.size:
                ready(grads.size)
        losses.append(loss)
        correct += c
        strategy.after_backward(run.step)
        loss = float(np.mean(losses))
        if not strategy.update(loss, run.step):
            return float("nan"), 0
        return loss, correct

    def pipe_step(self, micro):
        """One optimizer step through this rank's pipeline stage (parallel/pipeline.py): the schedule,
        then the strategy over the dp group, exactly as a whole-model step."""
        run, strategy = self.run, self.run.strategy
        with strategy.params_held("train"):
            loss, correct = run.pipeline.step(micro, before_backward=lambda: run.faults.inside(run.step))
        hook = strategy.grad_hook(run.step)  # buckets: started once the stage's gradient is whole
        if hook is not None:
            hook(run.model.grads.size)
        strategy.after_backward(run.step)
        if not strategy.update(loss, run.step):
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
        A = self.accum
        batches = run.data.batches(run.epoch, start=start * A)
        ended = False
        while True:
            if self.max_steps and run.step >= self.max_steps:
                ended = True
                break
            if A > 1 and i >= run.steps_per_epoch:
                break
            t_step = time.perf_counter()
            with run.timers("data"):
                batch = next(batches, None) if A == 1 else [next(batches) for _ in range(A)]
            if batch is None:
                break
            if run.pipeline is not None:
                loss, c = self.pipe_step([batch] if A == 1 else batch)
            else:
                loss, c = self.train_step(batch) if A == 1 else self.accum_step(batch)
            if t.step_sleep:
                time.sleep(t.step_sleep)
            run.step += 1
            i += 1
            run.strategy.after_step(run.step)
            self._traced_step(t_step, loss)
            n = run.model.count(batch) if A == 1 else sum(run.model.count(b) for b in batch)
            if math.isfinite(loss):
                stats = [stats[0] + loss * n, stats[1] + c, stats[2] + n]
            self.samples += n * run.replica_comm.Get_size()  # each replica's items once
            synced = run.strategy.synced()
            if t.check_every and run.step % t.check_every == 0 and synced:
                run.check_replicas()
            bar.step(i, loss, c, n)
            self._periodic(bar, i, stats)
            if synced and self.should_stop():
                if i < run.steps_per_epoch:
                    return i
                self.stop_at_epoch_end = True  # the epoch's last step: finish it (its line) first
        if ended and i < run.steps_per_epoch:  # max_steps mid-epoch: the run's last evaluation and checkpoint
            run.strategy.epoch_end(run.step)   # the run ends here (local SGD: average the replicas)
            self._evaluate(bar)
            run.results.epoch(round(run.epoch + i / run.steps_per_epoch, 3), run.step, run.total_bytes, stats,
                              self.test, self.samples, run.timers.fraction("comm"), self.eval_s)
            if run.checkpointing() and self.saved_step != run.step:
                run.save(i)
                self.saved_step = run.step
            return None
        run.strategy.epoch_end(run.step)
        self._evaluate(bar)
        run.epoch += 1
        run.results.epoch(run.epoch, run.step, run.total_bytes, stats, self.test, self.samples,
                          run.timers.fraction("comm"), self.eval_s)
        ck = self.cfg.checkpoint
        if ((ck.every and run.epoch % ck.every == 0) or (ck.every_steps and run.step % ck.every_steps == 0)
                or (run.checkpointing() and self.max_steps and run.step >= self.max_steps)):
            run.save(0)
            self.saved_step = run.step
        return None

    def _evaluate(self, bar):
        self.test = self._timed_eval()
        bar.clear()

    def _timed_eval(self):
        """run.evaluate(), its time kept out of the rates (and, with --trace, a span on track "eval")."""
        run, t0 = self.run, time.perf_counter()
        val = run.evaluate()
        dt = time.perf_counter() - t0
        self.eval_s += dt
        if run.trace is not None:
            run.trace.add_span("eval", f"eval @ step {run.step}", t0, dt, step=run.step, loss=float(val[0]))
        return val

    def _periodic(self, bar, i, stats) -> None:
        """train.eval_every: an eval line; checkpoint.every_steps: a checkpoint (not at the epoch's end)."""
        run, t = self.run, self.cfg.train
        if t.eval_every and run.step % t.eval_every == 0:
            val = self._timed_eval()
            bar.clear()
            run.results.eval_line(run.step, run.total_steps, bar.take_eval_window(), val, self.rates())
        every = self.cfg.checkpoint.every_steps
        if every and run.step % every == 0 and i < run.steps_per_epoch and run.strategy.synced():
            run.save(i)
            self.saved_step = run.step

    # ------------------------------------------------------------------- trace
    def _hook(self, hook):
        """With --trace: ``hook`` (may be None) that also notes when backprop hands over its first gradients."""
        if self.run.trace is None:
            return hook
        self._bwd_t0 = None

        def noted(hi):
            if self._bwd_t0 is None:
                self._bwd_t0 = time.perf_counter()
            if hook is not None:
                hook(hi)

        return noted

    def _backward_done(self) -> None:
        """A "backward" span: from the first finished gradients (the head's) to the end of backprop."""
        trace, t0 = self.run.trace, self._bwd_t0
        if trace is not None and t0 is not None:
            trace.add("backward", "compute", t0, time.perf_counter() - t0, args={"step": self.run.step + 1})

    def _traced_step(self, t0: float, loss: float) -> None:
        """A span per step on track "steps" (data, compute, communication, update) and the loss counter."""
        trace = self.run.trace
        if trace is None:
            return
        step = self.run.step
        ok = math.isfinite(loss)
        trace.add_span("steps", f"step {step}", t0, time.perf_counter() - t0, step=step, epoch=self.run.epoch + 1,
                       loss=loss if ok else None)
        if ok:
            trace.counter("loss", loss)

    def rates(self) -> dict:
        """tokens (items) per second of training (evaluation time left out) and, for a model that counts
        its FLOPs, MFU = tokens/s x flops_per_token / the ranks' summed matmul peak."""
        run = self.run
        secs = max(run.results.elapsed() - self.eval_s, 1e-9)
        r = {"tokens_per_s": self.samples / secs}
        fpt = getattr(run.model, "flops_per_token", None)
        if fpt is not None and run.peak_flops > 0:
            r["mfu"] = r["tokens_per_s"] * fpt() / run.peak_flops
        return r

    def run_all(self, trace=None) -> bool:
        """Every epoch left; True when a signal stopped the run (a checkpoint was written)."""
        run, t = self.run, self.cfg.train
        if trace:
            run.trace = Trace(self.comm)
            run.timers.trace = run.trace
            run.trace.track("steps")  # the tracks' order: main thread, steps, eval, then the buckets'
            run.trace.track("eval")
            if run.pipeline is not None:
                run.pipeline.trace = run.trace
        per_epoch = min(run.steps_per_epoch, self.max_steps) if self.max_steps else run.steps_per_epoch
        bar = Progress(self, per_epoch)  # (it tells run.results what the run counts: samples, tokens, graphs)
        run.results.start()
        if self.max_steps:
            self.complete = run.complete(run.step, self.max_steps, "steps")
        else:
            self.complete = run.complete(run.epoch, t.epochs, "epochs")
        if self.complete:
            self.test = run.last_test
        try:
            while (run.step < self.max_steps) if self.max_steps else (run.epoch < t.epochs):
                stopped_at = self.epoch(bar)
                if stopped_at is not None or self.stop_at_epoch_end:
                    path = run.save(stopped_at or 0)  # at an epoch's end: step_in_epoch 0 of the next
                    log0(f"stopped by signal {signal_name(int(self._flag[0]))} at epoch {run.epoch + 1}, step "
                         f"{run.step}; checkpoint written to {path}; resume with --resume")
                    return True
            run.check_replicas()
            return False
        finally:
            bar.close()

    def metrics(self, stopped: bool) -> dict:
        run = self.run
        extra = {}
        if hasattr(run.model, "flops_per_token"):  # a language model: per-token numbers (results.py)
            extra = run.results.lm_metrics(self.test, self.rates(), getattr(run.spec, "vocab_size", 0))
        g = run.grid
        if g is not None and g.pp * g.tp > 1:  # the layout, and rank 0's share of its traffic
            extra["grid"] = {"dp": g.dp, "pp": g.pp, "tp": g.tp, "sequence": self.cfg.parallel.sequence,
                             "tp_comm_s": run.mp.comm_s, "tp_bytes": run.mp.bytes}
            if run.pipeline is not None:
                p = run.pipeline
                extra["grid"].update(schedule=p.schedule, micro_batches=p.m, predicted_bubble=p.bubble,
                                     peak_stash=p.peak_stash, peak_stash_bytes=p.peak_stash_bytes, sent_by_kind=p.sent)
        return run.results.metrics(
            test=self.test, epochs=run.epoch, steps=run.step, ranks=run.size, samples=self.samples,
            comm_fraction=run.timers.fraction("comm"), timers=run.timers.totals(), skipped=run.policy.skipped,
            algorithm=self.cfg.comm.algorithm, backend=self.cfg.train.backend, stopped=stopped,
            strategy=run.strategy.label, comm_bytes=run.total_bytes, steps_done=run.step - run.first_step,
            bytes_divisor=run.size, optimizer_bytes=run.optimizer_bytes(), **run.held_bytes(), **run.memory_plan,
            **extra)


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
    run.results.done_line(loop.test, run.step, loop.rates(), skipped)
    return 0
