"""Memory planned before it is spent: predicted bytes per rank for a layout, and the refusal.

    per rank (Ψ = this stage's parameters, b = bytes per value, p = dp ranks, s = optimizer slots:
    Adam 2, SGD with momentum 1, plain SGD 0)
                   zero 0      zero 1      zero 2      zero 3
    parameters     Ψb          Ψb          Ψb          Ψb/p  + gathered: what no group covers, and the
    gradients      Ψb          Ψb          Ψb/p        Ψb/p    two largest groups (in use + prefetched)
    optimizer      sΨb         sΨb/p       sΨb/p       sΨb/p
    during a step  + the gradient in flight (zero 2/3: the whole buffer without buckets, else about two
                   buckets), + Ψb with accumulation (the running sum), + the model's activations
                   (``activation_bytes`` per micro-batch, times the pipeline's stash)

At start every rank predicts its own; the largest is printed in one line. When it exceeds
``train.memory_limit`` (0: MemAvailable of the node / the ranks on the node) the run stops there, in
one line, with the estimate and a layout that would fit.
"""

from __future__ import annotations

from mpi4py import MPI

from .. import units
from ..runtime import UserError, log0

PARTS = ("params", "grads", "optimizer", "gathered", "in_flight", "activations")


def slots(t) -> int:
    """Optimizer state values per parameter."""
    return 2 if t.optimizer in ("adam", "adamw") else (1 if t.momentum else 0)


def predict(run, zero: int, p: int) -> dict:
    """``{part: bytes}`` this rank would hold with ``train.zero = zero`` over ``p`` dp ranks."""
    cfg, model = run.cfg, run.model
    t, b = cfg.train, model.params.itemsize
    psi = model.n_params * b
    groups = sorted((hi - lo for lo, hi in model.param_groups()), reverse=True)
    rest = model.n_params - sum(groups)
    out = {"params": psi if zero < 3 else psi / p,
           "grads": (psi if zero < 2 else psi / p) + run.strategy.apart_bytes(),
           "optimizer": slots(t) * psi / (p if zero else 1),
           "gathered": (rest + sum(groups[:2])) * b if zero == 3 else 0}
    flight = 0
    if zero >= 2:
        bucket = cfg.comm.bucket_bytes
        flight = psi if bucket <= 0 else min(psi, 2 * max(bucket, (groups[0] if groups else 0) * b))
    if t.accum_steps > 1:
        flight += psi
    out["in_flight"] = flight
    stash = 1
    if run.pipeline is not None:
        stash = t.accum_steps if cfg.parallel.schedule == "gpipe" else min(run.grid.pp, t.accum_steps)
    out["activations"] = model.activation_bytes(t.batch_size) * stash
    return {k: int(v) for k, v in out.items()}


def node_free_share(comm) -> int:
    """MemAvailable of this node divided by the ranks of ``comm`` on it (0 where unknown)."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        ranks = local.Get_size()
    finally:
        local.Free()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // ranks
    except OSError:
        pass
    return 0


def describe(plan: dict) -> str:
    return " + ".join(f"{k.replace('_', ' ')} {units.format_size(v)}" for k, v in plan.items() if v) or "0B"


def suggest(run, zero: int, p: int, limit: int) -> str:
    """A layout predicted to fit ``limit``: a higher zero level, else zero 3 on more dp ranks."""
    for z in range(zero + 1, 4):
        if run.comm.allreduce(sum(predict(run, z, p).values()), op=MPI.MAX) <= limit:
            return f"would fit: train.zero = {z} on the same {run.size} rank(s)"
    other = run.size // p
    for k in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        if run.comm.allreduce(sum(predict(run, 3, p * k).values()), op=MPI.MAX) <= limit:
            return f"would fit: train.zero = 3 on {run.size * k} ranks (dp = {p * k}{f' x {other}' if other > 1 else ''})"
    return "no layout up to 1024x the ranks fits: lower train.batch_size or the model, or raise train.memory_limit"


def check(run) -> dict:
    """Collective: print the plan (the largest rank's); refuse when it exceeds the limit (every rank)."""
    t = run.cfg.train
    zero, p = t.zero, run.replica_comm.Get_size()
    plan = predict(run, zero, p)
    total = sum(plan.values())
    worst = run.comm.allreduce((total, run.rank), op=MPI.MAX)
    shown = run.comm.bcast(plan, root=worst[1])
    limit = t.memory_limit or run.comm.allreduce(node_free_share(run.comm), op=MPI.MIN)
    where = "train.memory_limit" if t.memory_limit else "the node's free memory / its ranks"
    if limit and worst[0] > limit:
        raise UserError(f"this layout needs ~{units.format_size(worst[0])} per rank ({describe(shown)}; zero "
                        f"{zero}, dp {p}), more than {units.format_size(limit)} ({where}); "
                        f"{suggest(run, zero, p, limit)}")
    log0(f"memory plan per rank (zero {zero}, dp {p}): {describe(shown)} = {units.format_size(worst[0])}"
         + (f" of {units.format_size(limit)} ({where})" if limit else ""))
    return {"predicted_bytes_per_rank": int(worst[0]), **{f"predicted_{k}_bytes": v for k, v in shown.items()}}
