"""Pipeline parallelism: one replica's stages on the pp group, driven by a checked schedule.

    stage 0 (embed, blocks [0, a))      stage 1 (blocks [a, b))      stage p-1 (blocks, lnf, head, loss)
      fwd mb --(B, T, C) act, Isend-->  recv, fwd --act, Isend--> ... recv, fwd + loss
      bwd mb <--(B, T, C) grad, Isend-- bwd, Isend <--grad, Isend-- ... bwd from the loss

Each stage runs its own instruction list (parallel/schedule.py: GPipe or 1F1B), which the checker
simulated before any message is sent: every send has its receive, the channels match in order (one
tag per direction on the pp group: MPI matches them FIFO), no cycle of waits, the stash of live
activations within its bound. Receives block; sends are non-blocking (``Isend``) so a stage goes on
to its next micro-batch while its output travels; all sends are completed before the step ends.
Shapes (B, T, C) and the dtype are agreed once, at start. Device arrays go through host memory
when MPI cannot read the GPU (as the all-reduce's staging does).

After the last backward: each stage's gradient is the canonical sum over micro-batches
(parallel/accumulate.py); a tied ``wte`` has its embedding part on stage 0 and its head part on the
last stage, summed between the two (one ``Sendrecv``: both get ``a + b``, bitwise alike) before the
1/M scale -- so the pipeline's gradients equal a single rank's with accumulation, bit for bit.

Cost per step and boundary: 2 · M · B · T · C · itemsize bytes (M activations forward, M gradients
back); the bubble, with equal stage times, (p-1)/(m+p-1) of the step (``schedule.bubble``).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from .. import backend
from . import schedule as sched
from .accumulate import Accumulator

TAG_ACT, TAG_GRAD, TAG_EVAL, TAG_TIED = 201, 202, 203, 204  # on the pp group (a Split: the library's own)
_WHAT = {TAG_ACT: "activation", TAG_GRAD: "gradient", TAG_EVAL: "eval activation", TAG_TIED: "tied wte grad"}


class Pipeline:
    """This rank's stage of one replica: ``step(micro)`` trains on M micro-batches, ``evaluate`` scores."""

    def __init__(self, model, grid, schedule: str, micro_batches: int, batch_size: int, *,
                 timers=None, trace=None):
        self.model, self.grid, self.m = model, grid, int(micro_batches)
        self.comm, self.r, self.p = grid.pp_comm, grid.pp_rank, grid.pp
        self.first, self.last = grid.first, grid.last
        self.schedule = schedule
        self.programs = sched.build(schedule, self.p, self.m)
        self.check = sched.check(self.programs, self.p, self.m, schedule)  # raises before any message
        self.program = self.programs[self.r]
        self.bubble = sched.bubble(self.p, self.m)  # predicted idle share of a step, equal stage times
        self.shape = (int(batch_size), model.block_size, model.n_embd)
        self._agree_shapes()
        self.xp, self.dtype = model.xp, model.dtype
        self.staged = backend.is_device(model.params) and not backend.cuda_aware_mpi()
        self.acc = Accumulator(model, self.m)
        self.timers, self.trace = timers, trace
        self.sent_bytes = 0.0        # everything this stage sent (the run's byte count)
        self.sent = dict.fromkeys(_WHAT.values(), 0)  # ... by kind: activations, gradients, eval, tied wte
        self.peak_stash = 0          # most micro-batches whose activations were alive at once
        self.peak_stash_bytes = 0    # their bytes (the caches backward needs), at that moment
        self._sends = []

    def _agree_shapes(self) -> None:
        mine = (self.shape, self.model.dtype.str)
        every = self.comm.allgather(mine)
        if any(s != mine for s in every):
            raise ValueError(f"pipeline stages disagree on the activation shape/dtype: {every}")

    # ---------------------------------------------------------------- messages
    def _span(self, name, k):
        """A forward/backward span on the stage's track of ``--trace`` (F3 = forward of micro-batch 3)."""
        if self.trace is None:
            return contextlib.nullcontext()
        return self.trace.span(f"stage {self.r}", name, stage=self.r, micro_batch=k)

    def _send(self, arr, dest, tag):
        host = backend.to_numpy(arr) if self.staged else arr
        if not self.staged:
            backend.synchronize(arr)
        host = host if host.flags.c_contiguous else host.copy()
        self._sends.append((self.comm.Isend(host, dest=dest, tag=tag), host))
        self.sent_bytes += host.nbytes
        self.sent[_WHAT[tag]] += host.nbytes
        if self.trace is not None:
            self.trace.instant(f"send {_WHAT[tag]} to stage {dest}", track="pipeline send", bytes=host.nbytes)

    def _recv(self, shape, source, tag):
        buf = np.empty(shape, dtype=self.dtype) if self.staged else self.xp.empty(shape, dtype=self.dtype)
        t0 = time.perf_counter()
        self.comm.Recv(buf, source=source, tag=tag)
        dt = time.perf_counter() - t0
        if self.timers is not None:
            self.timers.add("comm", dt)
        if self.trace is not None:
            self.trace.add_span("pipeline recv", f"recv {_WHAT[tag]} from stage {source}", t0, dt, bytes=buf.nbytes)
        return self.xp.asarray(buf) if self.staged else buf

    def _wait_sends(self) -> None:
        from mpi4py import MPI

        t0 = time.perf_counter()
        MPI.Request.Waitall([r for r, _ in self._sends])
        self._sends.clear()
        if self.timers is not None:
            self.timers.add("comm", time.perf_counter() - t0)

    # -------------------------------------------------------------------- step
    def step(self, micro, before_backward=None) -> tuple[float, int]:
        """Forward and backward of the M micro-batches ``micro`` (every stage gets the same list);
        leaves the stage's averaged gradient in ``model.grads``; (mean loss, correct) on every stage.
        ``before_backward()`` is called once, before the first backward (fault injection)."""
        if len(micro) != self.m:
            raise ValueError(f"the pipeline was built for {self.m} micro-batches, got {len(micro)}")
        model, acc = self.model, self.acc
        acc.reset()
        inputs, outs, dgrads, dins, stash = {}, {}, {}, {}, {}
        losses, correct = [0.0] * self.m, 0
        for ins in self.program:
            op, k = ins.op, ins.mb
            if op == "recv_act":
                inputs[k] = self._recv(self.shape, self.r - 1, TAG_ACT)
            elif op == "fwd":
                x, y = model.split_batch(micro[k])
                if tuple(x.shape) != self.shape[:2]:
                    raise ValueError(f"micro-batch {k} has shape {tuple(x.shape)}; the pipeline agreed on "
                                     f"{self.shape[:2]} (train.batch_size x model.block_size)")
                with self._span(f"F{k}", k), self._compute():
                    out, ctx = model.stage_forward(x if self.first else inputs.pop(k), y if self.last else None)
                stash[k] = ctx
                self._note_stash(stash)
                if self.last:
                    losses[k], correct = out[0] / out[2], correct + out[1]
                else:
                    outs[k] = out
            elif op == "send_act":
                self._send(outs.pop(k), self.r + 1, TAG_ACT)
            elif op == "recv_grad":
                dgrads[k] = self._recv(self.shape, self.r + 1, TAG_GRAD)
            elif op == "bwd":
                if before_backward is not None:
                    before_backward()
                    before_backward = None
                with self._span(f"B{k}", k), self._compute():
                    din = model.stage_backward(stash.pop(k), None if self.last else dgrads.pop(k))
                    acc.add()
                if not self.first:
                    dins[k] = din
            elif op == "send_grad":
                self._send(dins.pop(k), self.r - 1, TAG_GRAD)
        self._wait_sends()
        n = model.grads.size
        acc.finish(0, n, scale=False)
        self._tie()
        acc.scale(0, n)
        return self._share_loss(losses, correct)

    def _compute(self):
        return self.timers("compute") if self.timers is not None else contextlib.nullcontext()

    def _note_stash(self, stash) -> None:
        if len(stash) > self.peak_stash:
            self.peak_stash = len(stash)
            self.peak_stash_bytes = sum(_nbytes(c) for c in stash.values())

    def _tie(self) -> None:
        """Tied embeddings: stage 0's embedding part of wte's gradient + the last stage's head part."""
        if not (getattr(self.model, "tie", False) and self.p > 1 and (self.first or self.last)):
            return
        g = self.model.g["wte"]
        mine = backend.to_numpy(g).copy()
        other = np.empty_like(mine)
        peer = self.p - 1 if self.first else 0
        t0 = time.perf_counter()
        self.comm.Sendrecv(mine, dest=peer, sendtag=TAG_TIED, recvbuf=other, source=peer, recvtag=TAG_TIED)
        if self.timers is not None:
            self.timers.add("comm", time.perf_counter() - t0)
        self.sent_bytes += mine.nbytes
        self.sent[_WHAT[TAG_TIED]] += mine.nbytes
        g += self.xp.asarray(other)

    def _share_loss(self, losses, correct) -> tuple[float, int]:
        """The last stage's mean loss and correct count, on every stage (the loop's lines and policy)."""
        got = self.comm.bcast((float(np.mean(losses)), int(correct)) if self.last else None, root=self.p - 1)
        return got

    # -------------------------------------------------------------- evaluation
    def evaluate(self, x, y, chunk: int = 64) -> tuple[float, int, int]:
        """Forward only, chained through the stages (no schedule needed: nothing flows back), in chunks of
        ``chunk`` rows as ``GPT.evaluate`` does; (loss sum, correct, tokens) on the last stage, zeros elsewhere."""
        loss_total, correct_total, count = 0.0, 0, 0
        for a in range(0, x.shape[0], max(1, int(chunk))):
            xb, yb = x[a:a + chunk], y[a:a + chunk]
            shape = (xb.shape[0], xb.shape[1], self.model.n_embd)
            inp = xb if self.first else self._recv(shape, self.r - 1, TAG_EVAL)
            out, _ = self.model.stage_forward(inp, yb if self.last else None, keep=False)
            if self.last:
                loss_total, correct_total, count = loss_total + out[0], correct_total + out[1], count + out[2]
            else:
                self._send(out, self.r + 1, TAG_EVAL)
                self._wait_sends()
        return loss_total, correct_total, count


def _nbytes(obj) -> int:
    """Bytes of the arrays inside a nested tuple/list (a stashed micro-batch's caches)."""
    if obj is None:
        return 0
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    return int(getattr(obj, "nbytes", 0))
