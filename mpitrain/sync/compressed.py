"""Compressed gradients (``comm.compress = fp16 | topk | sign``): the average of the ranks' compressed
gradients, through the codecs of collectives/compress.py (diagrams, bytes and costs there).

    rank r:  grads_r + residual_r --encode--> message_r --allgather/alltoall--> decode in rank order --> g

State: each rank's error-feedback residual (topk, sign). Checkpoints hold every rank's residual
(gathered to rank 0 as a (p, n) array), so a resumed run on the same number of ranks continues
bitwise as if uninterrupted; on another rank count the residuals start from zero (and it says so).
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..collectives import compress
from ..runtime import log0
from .base import Strategy


def _label(c) -> str:
    if c.compress == "topk":
        return f"topk({c.topk_ratio:g}{'' if c.error_feedback else ',no-ef'})"
    if c.compress == "sign":
        opts = [f"block={c.sign_block}"] * (c.sign_block > 0) + ["no-ef"] * (not c.error_feedback)
        return "sign" + (f"({','.join(opts)})" if opts else "")
    return c.compress


class Compressed(Strategy):
    @staticmethod
    def label_for(cfg) -> str:
        return _label(cfg.comm)

    def __init__(self, cfg, comm):
        super().__init__(cfg, comm)
        self.label = self.label_for(cfg)
        self.compressor = None

    def bind(self, run):
        super().bind(run)
        c, g = self.cfg.comm, run.model.grads
        self.compressor = compress.make(c.compress, g.size, run.model.segments(), topk_ratio=c.topk_ratio,
                                        sign_block=c.sign_block,
                                        error_feedback=c.error_feedback, dtype=g.dtype)

    def after_backward(self, step):
        run = self.run
        run.faults.at(step, run.model.grads)
        with run.timers("comm"), run.watchdog.collective(step):
            self.sent_bytes += self.compressor.allreduce_avg(run.model.grads, self.comm)

    # -------------------------------------------------------------- checkpoint
    def state_dict(self):
        comp = self.compressor
        if not comp.error_feedback:
            return {}
        mine = (np.zeros(comp.n, dtype=comp.dtype) if comp.residual is None
                else np.ascontiguousarray(backend.to_numpy(comp.residual)))
        every = np.empty((self.size, comp.n), dtype=comp.dtype) if self.rank == 0 else None
        self.comm.Gather(mine, every, root=0)
        return {"residual": every} if self.rank == 0 else {}

    def load_state_dict(self, state, ranks):
        res = state.get("residual")
        comp = self.compressor
        if res is None or not comp.error_feedback:
            return
        if res.shape != (self.size, comp.n):
            log0(f"note: the checkpoint's error-feedback residuals are for {res.shape[0]} rank(s), this run has "
                 f"{self.size}: they start from zero")
            return
        comp.residual = self.run.xp.asarray(res[self.rank].astype(comp.dtype))
