"""Synchronization strategies: one interface (base.Strategy) and a registry.

    comm.compress = fp16|topk|sign   Compressed    the gradients travel compressed (compressed.py)
    train.sync_every = T > 1         LocalSGD      T local steps, then average parameters (local_sgd.py)
    comm.mode = "ps"                 ParameterServer  asynchronous servers and workers (ps/)
    train.zero = 1, 2                Zero          ZeRO-1: reduce-scatter, step on this rank's shard of
                                                   the optimizer state, all-gather the parameters; ZeRO-2:
                                                   the gradients sharded too (zero.py)
    train.zero = 3                   Zero3         ZeRO-3: the parameters sharded too, gathered block by
                                                   block just in time (zero3.py)
    otherwise                        AllReduce     average the gradients every step, optionally in
                                                   buckets overlapped with backprop (allreduce.py)

One strategy per job (config.py rejects combinations). Adding one: docs/architecture.md.
"""

from __future__ import annotations

from .allreduce import AllReduce
from .base import Strategy, allreduce_bytes
from .compressed import Compressed
from .local_sgd import LocalSGD


def select(cfg) -> type[Strategy]:
    """The strategy class a job's keys ask for."""
    if cfg.comm.mode == "ps":
        from .ps import ParameterServer

        return ParameterServer
    if cfg.train.sync_every > 1:
        return LocalSGD
    if cfg.comm.compress != "none":
        return Compressed
    if cfg.train.zero == 3:
        from .zero3 import Zero3

        return Zero3
    if cfg.train.zero:
        from .zero import Zero

        return Zero
    return AllReduce


def make(cfg, comm) -> Strategy:
    return select(cfg)(cfg, comm)


def label(cfg) -> str:
    """A short label of how the ranks agree: ``ring``, ``topk(0.01)``, ``local-sgd(T=4)``, ``ps(servers=1,staleness=4)``."""
    return select(cfg).label_for(cfg)


__all__ = ["Strategy", "AllReduce", "Compressed", "LocalSGD", "select", "make", "label", "allreduce_bytes"]
