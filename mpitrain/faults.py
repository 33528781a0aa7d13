"""Fault injection for testing: ``MPITRAIN_FAULT=rank:step:kind``.

A testing aid, documented in docs/failure-modes.md: at training step ``step``
(counted from 0 over the whole run), rank ``rank`` of the run's communicator
(numbered as mpirun numbers the ranks) misbehaves just before the gradient
all-reduce:

    raise   raise RuntimeError (a bug on one rank)
    exit    os._exit(3) without telling anyone
    kill    SIGKILL itself (what the OOM killer does)
    hang    sleep forever before the collective (a stuck rank)
    nan     put NaN into its gradients
    ckptkill  SIGKILL itself while writing the next checkpoint (rank 0)
    usr1    send itself SIGUSR1 (what `#SBATCH --signal` does before the time limit)
    slow    from this step on, sleep MPITRAIN_SLOW_S seconds (default 0.05) per step (a slow rank)
    finish  comm.mode="ps" workers only: stop at this step as if its data had run out (it tells
            the servers it is done); ignored elsewhere

With comm.mode="ps" a worker's "step" is its own step count; a server's is its update count
(the gradients it has applied), so ``0:30:hang`` hangs server 0 before its 31st update.

Several faults may be given, separated by commas, e.g.
``MPITRAIN_FAULT=1:30:hang`` or ``MPITRAIN_FAULT=0:5:nan,1:5:nan``.
A malformed value is a user error (every rank reports it before training).
"""

from __future__ import annotations

import os
import signal
import time

from .runtime import UserError

KINDS = ("raise", "exit", "kill", "hang", "nan", "ckptkill", "usr1", "slow", "finish")
SLOW_S = 0.05  # seconds per step of a "slow" rank; MPITRAIN_SLOW_S overrides


def parse(spec: str | None) -> list[tuple[int, int, str]]:
    if not spec:
        return []
    out = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or parts[2] not in KINDS:
            raise UserError(f"MPITRAIN_FAULT={spec!r}: expected rank:step:kind with kind in {', '.join(KINDS)} "
                            "(e.g. MPITRAIN_FAULT=1:30:hang); unset it for a normal run")
        out.append((int(parts[0]), int(parts[1]), parts[2]))
    return out


class Faults:
    def __init__(self, rank: int, spec: str | None = None):
        spec = os.environ.get("MPITRAIN_FAULT") if spec is None else spec
        self.plan = [(s, k) for r, s, k in parse(spec) if r == rank]
        try:
            self.slow_s = float(os.environ.get("MPITRAIN_SLOW_S") or SLOW_S)
        except ValueError:
            raise UserError(f"MPITRAIN_SLOW_S={os.environ['MPITRAIN_SLOW_S']!r}: expected seconds, "
                            "e.g. 0.05") from None

    def __bool__(self):
        return bool(self.plan)

    def at(self, step: int, grads=None) -> None:
        """Called once per step, before the gradients are averaged."""
        for s, kind in self.plan:
            if kind == "slow" and step >= s:
                time.sleep(self.slow_s)
            if s != step:
                continue
            if kind == "raise":
                raise RuntimeError(f"injected fault at step {step} (MPITRAIN_FAULT)")
            if kind == "exit":
                os._exit(3)
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "hang":
                while True:
                    time.sleep(3600)
            if kind == "usr1":
                os.kill(os.getpid(), signal.SIGUSR1)
            if kind == "nan" and grads is not None:
                grads[: max(1, grads.size // 7)] = float("nan")

    def finished(self, step: int) -> bool:
        """``finish``: a parameter-server worker stops before this step (as if out of data)."""
        return any(k == "finish" and s <= step for s, k in self.plan)

    def checkpoint_kill(self, step: int) -> bool:
        return any(k == "ckptkill" and s <= step for s, k in self.plan)
