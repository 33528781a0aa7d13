"""Local SGD (``train.sync_every = T > 1``): T steps on local gradients, then the ranks average
their parameters.

    step:    1    2    3    4 | 5    6    7    8 |        (T = 4)
    rank r:  local steps ...  avg(params)  local ...  avg(params)
                              '-- one all-reduce of n params per T steps --'

Bytes per rank and step: 2(p-1)/p · n · itemsize / T (plus one average at an epoch end that
falls between synchronizations). Between synchronizations the replicas differ, so the loop
checks replicas, stops on a signal and checkpoints only at synchronized points. The state in a
checkpoint: the count of local steps since the last average (0 at every such point) and every
rank's own optimizer state (momentum, Adam's moments: each rank stepped on its own gradients, so
they differ), gathered as (p, ...) arrays; on another rank count every rank takes rank 0's.
"""

from __future__ import annotations

import numpy as np

from ..collectives import allreduce
from ..runtime import UserError, log0
from .base import Strategy, allreduce_bytes


class LocalSGD(Strategy):
    grads_agree = False  # each rank steps on its own gradients

    @staticmethod
    def label_for(cfg) -> str:
        return f"local-sgd(T={cfg.train.sync_every})"

    def __init__(self, cfg, comm, every: int | None = None):
        super().__init__(cfg, comm)
        self.every = int(every if every is not None else cfg.train.sync_every)
        self.label = f"local-sgd(T={self.every})"
        self.local_steps = 0  # steps since the parameters were last averaged

    def after_step(self, step):
        self.local_steps += 1
        if self.local_steps >= self.every:
            self.average(step)

    def synced(self):
        return self.local_steps == 0

    def epoch_end(self, step):
        if not self.synced():  # the epoch ends between synchronizations
            self.average(step)

    def average(self, step):
        """Every rank takes the average of the ranks' parameters."""
        run, p = self.run, self.run.model.params
        self.local_steps = 0
        with run.timers("comm"), run.watchdog.collective(step):
            allreduce(p, self.comm, op="avg", algorithm=self.cfg.comm.algorithm)
        self.sent_bytes += allreduce_bytes(p.nbytes, self.size)
        if not bool(run.xp.isfinite(p).all()):  # identical on every rank after the average
            raise UserError(f"non-finite parameters after averaging at step {step} (local SGD, "
                            f"train.sync_every={self.every}): a rank diverged between synchronizations. "
                            "Lower train.lr or train.sync_every, or set train.clip_norm")

    def state_dict(self):
        state = {"local_steps": self.local_steps}
        opt = self.run.opt.state_dict()
        for name in sorted(k for k, v in opt.items() if isinstance(v, np.ndarray)):
            mine = np.ascontiguousarray(opt[name])
            every = np.empty((self.size, *mine.shape), dtype=mine.dtype) if self.rank == 0 else None
            self.comm.Gather(mine, every, root=0)
            if self.rank == 0:
                state[f"optimizer.{name}"] = every
        return state

    def load_state_dict(self, state, ranks):
        self.local_steps = int(state.get("local_steps", 0))
        rows = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("optimizer.")}
        if not rows:
            return
        if any(v.shape[0] != self.size for v in rows.values()):
            log0(f"note: the checkpoint holds the optimizer state of {ranks} rank(s), this run has {self.size}: "
                 "every rank continues from rank 0's")
            return
        opt = self.run.opt.state_dict()
        opt.update({name: v[self.rank] for name, v in rows.items()})
        self.run.opt.load_state_dict(opt)
