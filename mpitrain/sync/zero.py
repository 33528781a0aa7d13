"""ZeRO stage 1 (``train.zero = 1``): optimizer state sharded over the ranks, on the ring's two halves.

    all-reduce = reduce-scatter + all-gather; ZeRO-1 puts the optimizer step in between:

    grads  |  c0  |  c1  |  c2  |     reduce_scatter(avg): rank r holds its chunk of the averaged
              v      v      v         gradient (the ring's partition: rank r ends with chunk r+1)
    rank r:  opt.step(params[chunk], grads[chunk])    state (momentum, Adam's m, v) for the chunk only
    params |  c0  |  c1  |  c2  |     allgather: every rank gets every updated chunk

    with buckets (comm.bucket_bytes): the same per bucket; rank r owns one chunk of every bucket
    (its shard: those pieces, concatenated), reduce-scatters start while backprop runs.

Bytes on the wire: (p-1)/p · n (reduce-scatter of gradients) + (p-1)/p · n (all-gather of
parameters) = what one all-reduce moves. Optimizer memory per rank: state/p (Adam: 8n/p bytes).

Exactness: with comm.algorithm = "ring" each chunk is reduced along the same chain as in the
ring all-reduce, and the optimizers are elementwise, so without norm clipping zero=1 gives the
parameters of zero=0 bit for bit. Norm clipping sums the shards' squares (one small all-reduce)
instead of one dot product over the whole vector: equal to floating-point tolerance only.
The non-finite policy decides on a flag all-reduced over the shards, so every rank agrees.
Checkpoints hold the full optimizer state (gathered at save), in the layout zero=0 uses:
resume works from zero=1 to zero=0, back, and onto another rank count.
"""

from __future__ import annotations

import math

import numpy as np
from mpi4py import MPI

from ..collectives import allgather, owned_chunk, reduce_scatter
from ..config import zero_problem
from ..collectives.nonblocking import ireduce_scatter
from ..optim import clip_by_value
from .allreduce import AllReduce
from .base import allreduce_bytes
from ..runtime import UserError


class Zero(AllReduce):
    plans = False  # its buckets are reduce-scatters (_launch)
    bucket_op = "reduce-scatter"
    @staticmethod
    def label_for(cfg) -> str:
        return AllReduce.label_for(cfg) + "+zero1"

    def __init__(self, cfg, comm):
        problem = zero_problem(cfg.train.zero or 1, cfg.comm.algorithm)  # (config.validate refuses it first)
        if problem:
            raise UserError(problem)
        super().__init__(cfg, comm)
        self.label = self.label_for(cfg)

    def grads_allocator(self, backend_name: str):
        """Plain memory: ZeRO's halves (reduce_scatter, allgather) have no shm."""
        return None

    def pieces(self, rank: int) -> list[tuple[int, int]]:
        """The [lo, hi) ranges of the flat buffer whose optimizer state ``rank`` holds."""
        out = []
        for s, e in self.cuts(self.run.model.grads.size):
            lo, hi = owned_chunk(e - s, self.size, rank)
            if hi > lo:
                out.append((s + lo, s + hi))
        return out

    def bind(self, run):
        self.run = run
        model = run.model
        self.mine = self.pieces(self.rank)
        self.m = sum(hi - lo for lo, hi in self.mine)
        self.views = len(self.mine) <= 1  # one piece: optimize views of the flat buffers, no copies
        if self.views:
            lo, hi = self.mine[0] if self.mine else (0, 0)
            self.pshard, self.gshard = model.params[lo:hi], model.grads[lo:hi]
        else:
            self.pshard = run.xp.empty(self.m, dtype=model.params.dtype)
            self.gshard = run.xp.empty(self.m, dtype=model.grads.dtype)
        run.opt = run.make_optimizer(self.pshard, pieces=self.mine)
        run.schedule = run.make_schedule(run.total_steps, run.steps_per_epoch)
        self._flag = np.zeros(1, dtype=np.int64)
        self._sq = np.zeros(1, dtype=np.float64)

    def _launch(self, view):
        return ireduce_scatter(view, self.comm, op="avg", algorithm=self.algorithm)

    def after_backward(self, step):
        run, grads = self.run, self.run.model.grads
        if self.bucket_bytes > 0:  # the buckets' reduce-scatters started during backprop
            self.drain(step, "the gradient reduce-scatter")
        else:
            run.faults.at(step, grads)
            with run.timers("comm"), run.watchdog.collective(step, "the gradient reduce-scatter"):
                reduce_scatter(grads, self.comm, op="avg", algorithm=self.algorithm)
        self.sent_bytes += allreduce_bytes(grads.nbytes, self.size) / 2

    # ------------------------------------------------------------------ step
    def _copy(self, flat, shard, into_shard: bool) -> None:
        off = 0
        for lo, hi in self.mine:
            if into_shard:
                shard[off:off + hi - lo] = flat[lo:hi]
            else:
                flat[lo:hi] = shard[off:off + hi - lo]
            off += hi - lo

    def _any(self, flag: bool) -> bool:
        self._flag[0] = flag
        self.comm.Allreduce(MPI.IN_PLACE, self._flag, op=MPI.MAX)
        return bool(self._flag[0])

    def _clip(self, g) -> None:
        t = self.cfg.train
        if t.clip_value > 0:
            clip_by_value(g, t.clip_value)
        if t.clip_norm > 0:  # the global norm from the shards' partial sums of squares
            self._sq[0] = float(self.run.xp.vdot(g, g)) if g.size else 0.0
            self.comm.Allreduce(MPI.IN_PLACE, self._sq, op=MPI.SUM)
            norm = math.sqrt(self._sq[0])
            if math.isfinite(norm) and norm > t.clip_norm:
                g *= t.clip_norm / norm

    def update(self, loss, step) -> bool:
        run, model = self.run, self.run.model
        with run.timers("compute"):
            if not self.views:
                self._copy(model.grads, self.gshard, True)
                self._copy(model.params, self.pshard, True)
            bad = self._any(not bool(run.xp.isfinite(self.gshard).all()))
            if bad:
                run.policy.nonfinite(loss, step, run.epoch, collective=True)
                return False
            self._clip(self.gshard)
            run.opt.step(self.gshard, run.schedule(step))
            if not self.views:
                self._copy(model.params, self.pshard, False)
        with run.timers("comm"), run.watchdog.guard("the parameter all-gather", step):
            for s, e in self.cuts(model.params.size):
                allgather(model.params[s:e], self.comm, algorithm=self.algorithm)
        self.sent_bytes += allreduce_bytes(model.params.nbytes, self.size) / 2
        return True

    # -------------------------------------------------------------- checkpoint
    def optimizer_state(self) -> dict:
        """Every rank's shard of every state vector, gathered into the full-length layout on rank 0."""
        st = self.run.opt.state_dict()
        n = self.run.model.params.size
        out = {k: v for k, v in st.items() if not isinstance(v, np.ndarray)}
        counts = [sum(hi - lo for lo, hi in self.pieces(q)) for q in range(self.size)]
        for name in sorted(k for k, v in st.items() if isinstance(v, np.ndarray)):
            mine = np.ascontiguousarray(st[name])
            every = np.empty(sum(counts), dtype=mine.dtype) if self.rank == 0 else None
            self.comm.Gatherv(mine, [every, counts] if self.rank == 0 else None, root=0)
            if self.rank == 0:
                full, off = np.zeros(n, dtype=mine.dtype), 0
                for q in range(self.size):
                    for lo, hi in self.pieces(q):
                        full[lo:hi] = every[off:off + hi - lo]
                        off += hi - lo
                out[name] = full
        return out

    def load_optimizer_state(self, ck) -> None:
        """This rank's pieces of the checkpoint's full-length state (written with zero = 0 or 1, any p)."""
        full, n = ck["optimizer"], self.run.model.params.size
        state = {}
        for k, v in full.items():
            if isinstance(v, np.ndarray) and v.shape == (n,):
                state[k] = np.concatenate([v[lo:hi] for lo, hi in self.mine]) if self.mine else v[:0]
            else:
                state[k] = v
        self.run.load_optimizer(self.run.opt, ck, state)
