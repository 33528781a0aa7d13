"""ZeRO-3 (``train.zero = 3``): parameters, gradients and optimizer state all sharded over the dp group.

    between steps   rank r holds: its pieces of the parameters (pshard), of the gradient (gshard), of
                    the optimizer state -- the same pieces ZeRO-1 steps (zero.py: the ring's chunk of
                    every bucket), so the optimizer step is ZeRO-1's, bit for bit
    a step          params_held("train"):  gather "the rest" (what no group covers: embeddings, head)
                      block k forward:  needed(k) -> gathered into place (the next group's gather
                                        already started: prefetch); done(k) -> its pages handed back
                      block k backward: needed(k) again ... done(k); its gradient bucket leaves
                    exit: the rest handed back; reduce-scatter (zero.py), step on the shards

The model knows nothing of this: it calls ``params_needed(lo, hi)`` / ``params_done(lo, hi)`` around
each block (models/base.py); ``params`` is reserved address space (sync/paged.py) whose pages hold
only what is gathered. A gather of [lo, hi) is one ``Iallgatherv`` on a Dup of the dp group: every
rank sends its pieces of the range, packed; each unpacks them into place -- a copy of bits, exact.
Prefetch: the order of ``needed`` calls in the previous scope of the same kind is the prediction;
on ``needed(k)`` the gather of the group that came next last time starts, and ``done(k)`` keeps a
group that is needed again at once (the last block's forward, then its backward).

Persistent tensors: none are kept whole between steps. What no group covers (the GPT's embeddings,
final LayerNorm and head; all of an MLP or MPNN, which declare no groups) is gathered for the whole
step and freed after it -- the embeddings are needed at both ends of the step, and the LayerNorms
and biases inside a block travel with their block's gather (splitting them off saves nothing).

Bytes on the wire per step: two gathers of every block (forward, backward) and one of the rest, each
(p-1)/p of its bytes, plus ZeRO-1's gradient reduce-scatter: about 1.5x one all-reduce (ZeRO's 3Ψ).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from .. import backend
from . import paged
from .base import allreduce_bytes
from .zero import Zero


class _Gather:
    """One range [lo, hi) of the flat buffer: every rank's pieces of it (``parts``), packed in rank order
    (``counts``, ``displs``), and where this rank's sit in its shard (``send``)."""

    def __init__(self, lo, hi, pieces_of, rank, shard_off):
        self.lo, self.hi = lo, hi
        self.parts = [[(max(a, lo), min(b, hi)) for a, b in ps if a < hi and b > lo] for ps in pieces_of]
        self.counts = [sum(b - a for a, b in ps) for ps in self.parts]
        self.displs = [sum(self.counts[:q]) for q in range(len(self.counts))]
        self.send = [(shard_off(a), shard_off(a) + b - a) for a, b in self.parts[rank]]


class _Pending:
    """A started gather: its request and buffers (``send`` alive until done), when it began and ended."""

    def __init__(self, g, req, recv, send):
        self.g, self.req, self.recv, self.send = g, req, recv, send
        self.t0, self.t_done = time.perf_counter(), None

    def test(self) -> None:
        if self.t_done is None and self.req is not None and self.req.Test():
            self.t_done = time.perf_counter()

    def wait(self) -> None:
        if self.t_done is None:
            self.req.Wait()
            self.t_done = time.perf_counter()


class Zero3(Zero):
    @staticmethod
    def label_for(cfg) -> str:
        return Zero.label_for(cfg)

    def __init__(self, cfg, comm):
        super().__init__(cfg, comm)
        self._paged_params = []
        self._held, self._inflight = set(), {}
        self._orders, self._seq, self._scope, self._depth = {}, [], None, 0
        self._next = None
        self.sharded = False
        self._gcomm = None

    def params_allocator(self, backend_name: str):
        return paged.allocator(self._paged_params) if backend_name == "numpy" else None

    def bind(self, run):
        super().bind(run)
        model = run.model
        n = model.params.size
        self.groups = [tuple(g) for g in model.param_groups()]
        cover = sorted(self.groups)
        self.rest, at = [], 0
        for lo, hi in cover:
            if lo > at:
                self.rest.append((at, lo))
            at = max(at, hi)
        if at < n:
            self.rest.append((at, n))
        pieces_of = [self.pieces(q) for q in range(self.size)]
        self._gathers = {r: _Gather(r[0], r[1], pieces_of, self.rank, self._shard_off)
                         for r in self.groups + self.rest}
        self._gcomm = self.comm.Dup()
        model.params_hook = self

    # --------------------------------------------------------------- sharding
    def shard(self) -> None:
        """The whole parameters are in place (fresh start, resume): keep this rank's pieces, free the rest."""
        self._copy(self.run.model.params, self.pshard, True)
        self._release(0, self.run.model.params.size)
        self.sharded = True

    def fresh_start(self) -> None:
        self.run.broadcast_params()
        self.shard()

    def restore(self, ck) -> None:
        self.run.restore_replicated(ck)
        self.shard()

    def _release(self, lo, hi) -> None:
        for buf in self._paged_params:
            buf.release(lo, hi)

    # ---------------------------------------------------------------- gathers
    def _start(self, key):
        """Start gathering ``key`` = (lo, hi) into place; a handle for ``_finish``."""
        g, params = self._gathers[key], self.run.model.params
        if self.size == 1:
            return _Pending(g, None, None, None)
        send = np.concatenate([backend.to_numpy(self.pshard[a:b]) for a, b in g.send]) if g.send else \
            np.empty(0, dtype=params.dtype)
        recv = np.empty(sum(g.counts), dtype=params.dtype)
        h = _Pending(g, self._gcomm.Iallgatherv(send, [recv, (g.counts, g.displs)]), recv, send)
        self.sent_bytes += allreduce_bytes((g.hi - g.lo) * params.itemsize, self.size) / 2
        return h

    def _poll(self) -> None:
        """Let MPI move the prefetched gathers on (MPICH progresses only inside MPI calls); note completions."""
        for h in self._inflight.values():
            h.test()

    def _finish(self, h) -> None:
        g, params, xp = h.g, self.run.model.params, self.run.xp
        if h.req is None:  # one rank: its shard is everything
            for (a, b), (sa, sb) in zip(g.parts[self.rank], g.send):
                params[a:b] = self.pshard[sa:sb]
            return
        with self.run.timers("comm"):
            h.wait()
        if self.run.trace is not None:  # --trace: from the gather's start to when it was first seen complete
            self.run.trace.add_span("gather", f"gather [{g.lo}, {g.hi})", h.t0, h.t_done - h.t0,
                                    step=self.run.step + 1, bytes=(g.hi - g.lo) * params.itemsize)
        off = 0
        for q in range(self.size):
            for a, b in g.parts[q]:
                params[a:b] = xp.asarray(h.recv[off:off + b - a])
                off += b - a

    def _shard_off(self, a: int) -> int:
        """Where flat element ``a`` (in one of this rank's pieces) sits in the shard."""
        off = 0
        for lo, hi in self.mine:
            if lo <= a < hi:
                return off + a - lo
            off += hi - lo
        raise ValueError(f"element {a} is not in this rank's shard")

    def _gather_now(self, key) -> None:
        h = self._inflight.pop(key, None) or self._start(key)
        if self._scope == "train":  # MPITRAIN_FAULT: a rank that fails inside a gather (the others wait in it)
            self.run.faults.inside(self.run.step)
        with self.run.watchdog.guard("a parameter gather", self.run.step):
            self._finish(h)
        self._held.add(key)

    # ------------------------------------------------------------- the hooks
    def needed(self, lo, hi) -> None:
        key = (lo, hi)
        if not self.sharded:
            return
        i = len(self._seq)
        self._seq.append(key)
        if key not in self._held:
            self._gather_now(key)
        plan = self._orders.get(self._scope, [])
        self._next = plan[i + 1] if i + 1 < len(plan) and plan[i] == key else None
        nxt = self._next
        if nxt is not None and nxt != key and nxt not in self._held and nxt not in self._inflight:
            self._inflight[nxt] = self._start(nxt)  # prefetch: the group that came next last time

    def done(self, lo, hi) -> None:
        key = (lo, hi)
        self._poll()
        if not self.sharded or self._next == key:  # needed again at once: keep it
            return
        self._held.discard(key)
        self._release(lo, hi)

    @contextlib.contextmanager
    def params_held(self, what: str = "train"):
        """Gather the rest around a use of the model; afterwards every gathered part is freed."""
        if not self.sharded or self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._depth, self._scope, self._seq = 1, what, []
        try:
            for key in self.rest:
                self._gather_now(key)
            yield
        finally:
            self._depth = 0
            self._end_scope(what)

    def _end_scope(self, what) -> None:
        for key, h in list(self._inflight.items()):  # a prefetch that was not used
            self._finish(h)
        self._inflight.clear()
        for lo, hi in list(self._held):
            self._release(lo, hi)
        self._held.clear()
        self._orders[what], self._next, self._scope = self._seq, None, None

    # ------------------------------------------------------------------ step
    def update(self, loss, step) -> bool:
        with self.run.timers("compute"):
            return self._shard_step(loss, step)

    def params_chunks(self):
        """Each range gathered in turn (buffer order), copied out, freed: one group resident at a time."""
        if not self.sharded:
            yield from super().params_chunks()
            return
        for key in sorted(self._gathers):
            self._gather_now(key)
            yield backend.to_numpy(self.run.model.params[key[0]:key[1]]).copy()
            self._held.discard(key)
            self._release(*key)

    def saved_params(self):
        """The stage's parameters from every rank's shard, on dp rank 0 (Gatherv of the pieces)."""
        if not self.sharded:
            return super().saved_params()
        return self._gather_full(backend.to_numpy(self.pshard), self.run.model.params.size)

    def _gather_full(self, mine, n):
        counts = [sum(hi - lo for lo, hi in self.pieces(q)) for q in range(self.size)]
        mine = np.ascontiguousarray(mine)
        every = np.empty(sum(counts), dtype=mine.dtype) if self.rank == 0 else None
        self.comm.Gatherv(mine, [every, counts] if self.rank == 0 else None, root=0)
        if self.rank != 0:
            return None
        full, off = np.zeros(n, dtype=mine.dtype), 0
        for q in range(self.size):
            for lo, hi in self.pieces(q):
                full[lo:hi] = every[off:off + hi - lo]
                off += hi - lo
        return full

    def held_bytes(self) -> dict:
        out = super().held_bytes()
        out["params"] = self.pshard.nbytes + self._resident(self._paged_params, self.run.model.params)
        return out

    def close(self):
        super().close()
        if self._gcomm is not None:
            self._gcomm.Free()
            self._gcomm = None
