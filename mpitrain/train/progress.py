"""Training progress on rank 0, with an ETA: what a user watching a run (or its log file) sees between evaluations.

    on a terminal          the in-place bar (stderr), redrawn every 0.1 s
    under mpirun (a pipe)  a line on stderr every AUTO_S seconds, the first after the first step
    train.log_every = K    a line on stdout every K steps (as nanoGPT's log interval), wherever it goes

    epoch 1/1  step  120/3000  loss 2.9134  41.2 ms/step  61,978 tokens/s  comm 3%  eta 2m10s

loss (and acc, for a classifier) is the mean over the steps since the previous line, ms/step and the
rate are measured over them (evaluation time left out), comm is the run's share so far, and the ETA is
the steps left times the run's wall time per step so far (evaluations included). Each line is flushed.
"""

from __future__ import annotations

import sys
import time

from ..metrics import StatusLine
from ..runtime import log0
from ..units import format_duration

AUTO_S = 10.0  # seconds between lines when the output is not a terminal and train.log_every = 0


def rate_unit(run) -> str:
    """What the run counts per second: tokens (a language model), graphs, or samples."""
    if getattr(run, "data_unit", "") == "tokens":
        return "tokens"
    return "graphs" if getattr(getattr(run, "spec", None), "kind", None) == "graphs" else "samples"


class Window:
    """Sums over an interval of steps: loss x items, correct, items, steps."""

    def __init__(self):
        self.loss = self.correct = self.items = self.steps = 0

    def add(self, loss: float, correct: int, items: int) -> None:
        self.steps += 1
        if loss == loss:  # a skipped (non-finite) step adds no loss
            self.loss, self.correct, self.items = self.loss + loss * items, self.correct + correct, self.items + items

    def sums(self) -> tuple:
        """(loss sum, correct, items): the tuple the results lines take."""
        return self.loss, self.correct, self.items


class Progress:
    def __init__(self, loop, per_epoch: int, *, stream=None, tty=None, clock=time.monotonic):
        run = loop.run
        self.loop, self.run, self.clock = loop, run, clock
        self.per_epoch, self.every = per_epoch, run.cfg.train.log_every
        self.unit, self.lm = rate_unit(run), rate_unit(run) == "tokens"
        res = run.results  # its lines say what this model kind measures, per unit
        res.unit, res.first_step, res.vocab_size = self.unit, run.step, getattr(run.spec, "vocab_size", 0) or 0
        self.line = StatusLine(stream, interval=AUTO_S, enabled=run.rank == 0, tty=tty, clock=clock)
        self.window, self.since_eval = Window(), Window()
        self._start = (clock(), run.step)
        self._mark = (clock(), loop.eval_s, 0)  # time, eval seconds, samples at the interval's start
        self._samples = 0

    def step(self, i: int, loss: float, correct: int, items: int) -> None:
        """After step ``i`` of the epoch (``items`` counted on this rank): a line when one is due."""
        self.window.add(loss, correct, items)
        self.since_eval.add(loss, correct, items)
        replicas = getattr(self.run, "replica_comm", None)  # each replica's items once (a grid: dp, not ranks)
        self._samples += items * (replicas.Get_size() if replicas is not None else self.run.size)
        if self.line.enabled and self.every and self.run.step % self.every == 0:
            self.line.clear()
            log0(self.text(i, bar=False))
            self._reset()
        elif self.line.enabled and not self.every and self.line.due():
            self.line.update(self.text(i, bar=self.line.tty), force=True)
            self._reset()

    def take_eval_window(self) -> tuple:
        """(loss sum, correct, items) since the previous evaluation, and start a new window."""
        sums, self.since_eval = self.since_eval.sums(), Window()
        return sums

    def text(self, i: int, bar: bool) -> str:
        run, w = self.run, self.window
        n = len(str(run.total_steps))
        parts = [f"epoch {run.epoch + 1}/{run.results.epochs}", f"step {run.step:>{n}}/{run.total_steps}"]
        if bar and self.per_epoch > 0:
            done = int(20 * min(i, self.per_epoch) / self.per_epoch)
            parts.append("[" + "#" * done + "." * (20 - done) + "]")
        if w.items:
            parts.append(f"loss {w.loss / w.items:.4f}")
            if not self.lm:
                parts.append(f"acc {100 * w.correct / w.items:.1f}%")
        now, (t0, e0, s0) = self.clock(), self._mark
        secs = max(now - t0 - (self.loop.eval_s - e0), 1e-9)
        parts += [f"{1000 * secs / max(w.steps, 1):.1f} ms/step", f"{(self._samples - s0) / secs:,.0f} {self.unit}/s",
                  f"comm {100 * run.timers.fraction('comm'):.0f}%", f"eta {self.eta(now)}"]
        return "  ".join(parts)

    def eta(self, now: float) -> str:
        t0, s0 = self._start
        done, left = self.run.step - s0, self.run.total_steps - self.run.step
        return format_duration(left * (now - t0) / done) if done > 0 else "?"

    def _reset(self) -> None:
        self.window = Window()
        self._mark = (self.clock(), self.loop.eval_s, self._samples)

    def clear(self) -> None:
        self.line.clear()

    def close(self) -> None:
        self.line.close()
        sys.stdout.flush()
