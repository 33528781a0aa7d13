"""Synchronous data parallelism: every step, every rank's gradients are replaced by their average.

    rank r:  batch_r --backward--> grads_r --allreduce(avg)--> g (identical everywhere) --step-->

One all-reduce per step (``comm.algorithm``), or, with ``comm.bucket_bytes > 0``, buckets that
leave while backprop still runs (like DDP). Each bucket (or the whole buffer) is a persistent plan
(``allreduce_init``, op avg): checked and bound once, on the first step (and again if the model's
``grads`` buffer is ever replaced), then only ``start()`` / ``test()`` / ``wait()`` every step (GPU
gradients without a CUDA-aware MPI: the blocking call, which stages through the host):

    grads:  | last layer | ... | first layer |      backprop fills it from offset 0
            |--bucket 0--|--bucket 1--| ... |      fixed cuts of bucket_bytes (the last shorter);
                  plan.start() plan.start()        once the finished prefix covers a bucket its plan
                                                   is started (non-blocking), progressed after every
                                                   layer ("progress") or by a communication thread
                                                   ("thread"). Fixed cuts: ZeRO (zero.py) shards the
                                                   same buckets, so both reduce along the same chains.

Bytes per rank and step: 2(p-1)/p · n · itemsize (``allreduce_bytes``).
"""

from __future__ import annotations

from .. import backend
from ..collectives import allreduce, allreduce_init
from ..collectives.nonblocking import CommThread, iallreduce
from ..runtime import UserError
from .base import Strategy, allreduce_bytes


def bucket_cuts(n: int, limit: int) -> list[tuple[int, int]]:
    """The buckets [s, e) of an n-element gradient: ``limit`` elements each, the last shorter (0 = one)."""
    if limit <= 0 or n == 0:
        return [(0, n)]
    return [(s, min(s + limit, n)) for s in range(0, n, limit)]


class AllReduce(Strategy):
    plans = True  # buckets on persistent plans; False: ``_launch`` (an iallreduce-like handle) per bucket
    bucket_op = "allreduce"  # what a bucket does (its --trace track's name)
    @staticmethod
    def label_for(cfg) -> str:
        c = cfg.comm
        return c.algorithm + (f"+buckets({c.bucket_bytes})" if c.bucket_bytes > 0 else "")

    def __init__(self, cfg, comm):
        super().__init__(cfg, comm)
        c = cfg.comm
        self.algorithm, self.bucket_bytes, self.overlap = c.algorithm, c.bucket_bytes, c.overlap
        self.label = self.label_for(cfg)
        self._handles, self._thread = [], None
        self._plans, self._plan_buf = [], None  # one plan per bucket, bound to _plan_buf

    def grads_allocator(self, backend_name: str):
        """shm (or auto with a table that runs shm): gradients in a node-shared window, so the all-reduce
        reads every rank's buffer in place (collectives/shm.py); NumPy only, and only where the node
        holds every rank (else shm does not run; alloc_shared gives plain memory on a node of one)."""
        from ..collectives import alloc_shared, state_for

        if backend_name != "numpy" or self.size == 1:
            return None
        table = state_for(self.comm).auto if self.algorithm == "auto" else None  # (collective on first use)
        if self.algorithm != "shm" and not (table is not None and "shm" in {a for _, a in table.steps}):
            return None
        return lambda n, dtype: alloc_shared(n, dtype, self.comm)

    def bind(self, run) -> None:
        super().bind(run)
        if self.bucket_bytes > 0 and self.cfg.train.backend == "cupy" and not backend.cuda_aware_mpi():
            raise UserError("comm.bucket_bytes > 0 with train.backend='cupy' needs a CUDA-aware MPI "
                            f"({backend.cuda_aware_info()[1]}); set comm.bucket_bytes=0")

    def cuts(self, n: int) -> list[tuple[int, int]]:
        itemsize = self.run.model.grads.itemsize
        return bucket_cuts(n, max(1, self.bucket_bytes // itemsize) if self.bucket_bytes > 0 else 0)

    def _launch(self, view):
        """A non-blocking reduction of one finished bucket (without plans)."""
        return iallreduce(view, self.comm, op="avg", algorithm=self.algorithm)

    def plans_for(self, grads) -> list:
        """The plans of ``grads``' buckets (one for the whole buffer without buckets): made on first use,
        collectively, and again when ``grads`` is another buffer than the one they are bound to."""
        if self._plan_buf is not grads:
            self.free_plans()
            self._plans = [allreduce_init(grads[s:e], self.comm, op="avg", algorithm=self.algorithm)
                           for s, e in self.cuts(grads.size)]
            self._plan_buf = grads
        return self._plans

    def free_plans(self) -> None:
        for h in self._plans:
            if not h.active:
                h.free()
        self._plans, self._plan_buf = [], None

    def grad_hook(self, step):
        if self.bucket_bytes <= 0:
            return None
        run, grads = self.run, self.run.model.grads
        cuts = self.cuts(grads.size)
        plans = self.plans_for(grads) if self.plans else None
        if self.overlap == "thread" and self._thread is None:
            self._thread = CommThread()
        nxt, first = 0, True

        def ready(hi):
            nonlocal nxt, first
            if first:  # before the first bucket leaves: what the faults and the watchdog see as "the step"
                first = False
                run.faults.at(step, grads[:hi])
                run.watchdog.arrive(step)
            if nxt < len(cuts) and cuts[nxt][1] <= hi:
                backend.synchronize(grads)
            while nxt < len(cuts) and cuts[nxt][1] <= hi:
                s, e = cuts[nxt]
                h = plans[nxt].start() if plans is not None else self._launch(grads[s:e])
                h = self._traced(h, nxt, step, (e - s) * grads.itemsize)
                if self._thread is not None:
                    self._thread.submit(h)
                else:
                    self._handles.append(h)
                nxt += 1
            for h in self._handles:
                h.progress()

        return ready

    def _traced(self, h, i: int, step: int, nbytes: int):
        """With --trace: bucket ``i``'s reduction as a span on a track of its own (start -> seen complete)."""
        trace = self.run.trace
        if trace is None:
            return h
        return trace.pending(h, f"{self.bucket_op} bucket {i}", f"{self.bucket_op} {i}", step=step + 1, bytes=nbytes)

    def after_backward(self, step):
        run, grads = self.run, self.run.model.grads
        if self.bucket_bytes > 0:  # only what backprop did not hide
            self.drain(step, "the gradient all-reduce")
        else:
            run.faults.at(step, grads)
            with run.timers("comm"), run.watchdog.collective(step):
                if backend.is_device(grads) and not backend.cuda_aware_mpi():  # plans need MPI to read the GPU
                    allreduce(grads, self.comm, op="avg", algorithm=self.algorithm)  # (host staging: staging.py)
                else:
                    self.plans_for(grads)[0].start().wait()
        self.sent_bytes += allreduce_bytes(grads.nbytes, self.size)

    def drain(self, step, what: str) -> None:
        """Wait for every bucket started during backprop (the communication it did not hide)."""
        run = self.run
        with run.timers("comm"), run.watchdog.guard(what, step):
            if self._thread is not None:
                self._thread.drain()
            for h in self._handles:
                h.wait()
            self._handles.clear()

    def close(self):
        if self._thread is not None:
            self._thread.close()
            self._thread = None
        self.free_plans()
