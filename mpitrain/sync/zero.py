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

ZeRO-2 (``train.zero = 2``): the same, and the gradients are sharded too. The model's gradient buffer
is reserved address space (sync/paged.py): as each bucket's reduce-scatter completes, this rank copies
its piece into its gradient shard and hands the bucket's pages back, so between buckets and between
steps a rank holds only its shard (grads 4n/p instead of 4n). ZeRO-3 (zero3.py) shards the parameters.

Exactness: with comm.algorithm = "ring" each chunk is reduced along the same chain as in the
ring all-reduce, and the optimizers are elementwise, so zero = 1, 2 give the parameters of zero = 0
bit for bit. Norm clipping uses the canonical norm from the shards (train/control.py
``shard_tensor_sums``): bitwise too.
The non-finite policy decides on a flag all-reduced over the shards, so every rank agrees.
Checkpoints hold the full optimizer state (gathered at save), in the layout zero=0 uses:
resume works from zero=1 to zero=0, back, and onto another rank count.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from ..collectives import allgather, owned_chunk, reduce_scatter
from ..config import zero_problem
from ..collectives.nonblocking import ireduce_scatter
from . import paged
from .allreduce import AllReduce
from .base import allreduce_bytes
from ..runtime import UserError


class Zero(AllReduce):
    """ZeRO-1 and ZeRO-2 (``level``); ZeRO-3 (zero3.py) builds on it."""
    plans = False  # its buckets are reduce-scatters (_launch)
    bucket_op = "reduce-scatter"

    @staticmethod
    def label_for(cfg) -> str:
        return AllReduce.label_for(cfg) + f"+zero{cfg.train.zero or 1}"

    def __init__(self, cfg, comm):
        problem = zero_problem(cfg.train.zero or 1, cfg.comm.algorithm)  # (config.validate refuses it first)
        if problem:
            raise UserError(problem)
        super().__init__(cfg, comm)
        self.level = cfg.train.zero or 1
        self.label = self.label_for(cfg)
        self._paged_grads, self._rs = [], []  # ZeRO-2: the paged gradient buffer; reduce-scatters in flight

    def grads_allocator(self, backend_name: str):
        """ZeRO-1: plain memory (its halves have no shm). ZeRO-2: pages handed back per bucket (NumPy)."""
        return paged.allocator(self._paged_grads) if self.level >= 2 and backend_name == "numpy" else None

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
        self.pviews = len(self.mine) <= 1 and self.level < 3   # one piece: the optimizer steps views of the
        self.gviews = len(self.mine) <= 1 and self.level < 2   # flat buffers, no copies
        lo, hi = self.mine[0] if self.mine else (0, 0)
        xp = run.xp
        self.pshard = model.params[lo:hi] if self.pviews else xp.empty(self.m, dtype=model.params.dtype)
        self.gshard = model.grads[lo:hi] if self.gviews else xp.zeros(self.m, dtype=model.grads.dtype)
        self._where, off = {}, 0  # bucket start -> (this rank's piece of it, its offset in the shard)
        for a, b in self.mine:
            self._where[a] = (a, b, off)
            off += b - a
        self._cuts, self._launched = self.cuts(model.grads.size), []
        for buf in self._paged_grads:  # (the model zeroed its gradients: hand the pages back)
            buf.release_all()
        run.opt = run.make_optimizer(self.pshard, pieces=self.mine)
        self.transient = not self.pviews and self.level < 3  # several pieces: the shard copies live only in
        if self.transient:                                   # update (between steps: the full buffers only)
            run.opt.params = self.pshard = None
            if self.level < 2:
                self.gshard = None
        run.schedule = run.make_schedule(run.total_steps, run.steps_per_epoch)
        self._flag = np.zeros(1, dtype=np.int64)

    # ------------------------------------------------------------ gradients
    def _launch(self, view):
        h = ireduce_scatter(view, self.comm, op="avg", algorithm=self.algorithm)
        if self.level >= 2:  # the k-th bucket launched this step is cut k (allreduce.py starts them in order)
            s, e = self._cuts[len(self._launched)]
            self._launched.append(s)
            self._rs.append((h, s, e))
        return h

    def grad_hook(self, step):
        inner = super().grad_hook(step)
        if inner is None or self.level < 2:
            return inner
        self._launched = []

        def ready(hi):
            inner(hi)
            self._collect(block=False)
        return ready

    def _collect(self, block: bool) -> None:
        """ZeRO-2: every finished bucket's piece into the shard, its pages handed back (in order)."""
        while self._rs and (block or self._rs[0][0].done):
            h, s, e = self._rs.pop(0)
            h.wait()
            self._keep(s, e)

    def _keep(self, s: int, e: int) -> None:
        """Bucket [s, e) is reduced: copy this rank's piece of it into the shard; free the bucket."""
        lo, hi = owned_chunk(e - s, self.size, self.rank)
        if hi > lo:
            a, b, off = self._where[s + lo]
            self.gshard[off:off + b - a] = self.run.model.grads[a:b]
        for buf in self._paged_grads:
            buf.release(s, e)

    def after_backward(self, step):
        run, grads = self.run, self.run.model.grads
        if self.bucket_bytes > 0:  # the buckets' reduce-scatters started during backprop
            self.drain(step, "the gradient reduce-scatter")
            if self.level >= 2:
                self._collect(block=True)
        else:
            run.faults.at(step, grads)
            with run.timers("comm"), run.watchdog.collective(step, "the gradient reduce-scatter"):
                reduce_scatter(grads, self.comm, op="avg", algorithm=self.algorithm)
            if self.level >= 2:
                self._keep(0, grads.size)
        for buf in self._paged_grads:  # ZeRO-2: pages buckets shared with their neighbours, handed back too
            buf.release_all()
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
        """Any rank of the dp group (and, with a pipeline, of the replica's stages) says so."""
        self._flag[0] = flag
        self.comm.Allreduce(MPI.IN_PLACE, self._flag, op=MPI.MAX)
        group = self.run.policy.group
        if group is not None:
            group.Allreduce(MPI.IN_PLACE, self._flag, op=MPI.MAX)
        return bool(self._flag[0])

    def _shard_step(self, loss, step) -> bool:
        """Non-finite policy, canonical clipping and the optimizer step on this rank's shard."""
        run, model = self.run, self.run.model
        if not self.gviews and self.level < 2:
            self.gshard = run.xp.empty(self.m, dtype=model.grads.dtype)
            self._copy(model.grads, self.gshard, True)
        if self._any(not bool(run.xp.isfinite(self.gshard).all())):
            run.policy.nonfinite(loss, step, run.epoch, collective=True)
            return False
        run.policy.clip_shard(self.gshard, self.mine, self.comm)
        run.opt.step(self.gshard, run.schedule(step))
        return True

    def update(self, loss, step) -> bool:
        run, model = self.run, self.run.model
        with run.timers("compute"):
            if self.transient:
                run.opt.params = self.pshard = run.xp.empty(self.m, dtype=model.params.dtype)
                self._copy(model.params, self.pshard, True)
            try:
                if not self._shard_step(loss, step):
                    return False
                if self.transient:
                    self._copy(model.params, self.pshard, False)
            finally:
                if self.transient:
                    run.opt.params = self.pshard = None
                    if self.level < 2:
                        self.gshard = None
        with run.timers("comm"), run.watchdog.guard("the parameter all-gather", step):
            for s, e in self.cuts(model.params.size):
                allgather(model.params[s:e], self.comm, algorithm=self.algorithm)
        self.sent_bytes += allreduce_bytes(model.params.nbytes, self.size) / 2
        return True

    def held_bytes(self) -> dict:
        """Bytes this rank holds between steps: its gradient shard and what is resident of the buffer."""
        out = super().held_bytes()
        if self.level >= 2:
            out["grads"] = (self.gshard.nbytes + self._resident(self._paged_grads, self.run.model.grads)
                            + self.apart_bytes())
        return out

    @staticmethod
    def _resident(bufs, arr) -> int:
        """Resident bytes of paged buffers (the kernel's count); plain memory: all of ``arr``."""
        if not bufs:
            return arr.nbytes
        got = [b.resident_bytes() for b in bufs]
        return sum(got) if min(got) >= 0 else arr.nbytes

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
