"""Fault injection for testing: ``MPITRAIN_FAULT=rank:step:kind``.

A testing aid, documented in docs/failure-modes.md: at training step ``step``
(counted from 0 over the whole run), rank ``rank`` of the run's communicator
(numbered as mpirun numbers the ranks) misbehaves just before the gradient
all-reduce:

    raise   raise RuntimeError (a bug on one rank)
    exit    os._exit(3) without telling anyone
    kill    SIGKILL itself (what the OOM killer does)
    hang    sleep forever before the collective (a stuck rank); says so on stderr first
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
import re
import signal
import sys
import time

from .runtime import UserError, job_size, tag
from .units import env_knob

KINDS = ("raise", "exit", "kill", "hang", "nan", "ckptkill", "usr1", "slow", "finish")
SLOW_S = 0.05  # seconds per step of a "slow" rank; MPITRAIN_SLOW_S overrides
_NUMBER = re.compile(r"[0-9]+")


def parse(spec: str | None) -> list[tuple[int, int, str]]:
    if not spec:
        return []
    out = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        # ASCII digits only: str.isdigit() also accepts '²', which int() then rejects
        if len(parts) != 3 or not _NUMBER.fullmatch(parts[0]) or not _NUMBER.fullmatch(parts[1]) \
                or parts[2] not in KINDS:
            raise UserError(f"MPITRAIN_FAULT={spec!r}: expected rank:step:kind with kind in {', '.join(KINDS)} "
                            "(e.g. MPITRAIN_FAULT=1:30:hang); unset it for a normal run")
        out.append((int(parts[0]), int(parts[1]), parts[2]))
    return out


def slow_seconds(text: str | None) -> float:
    """``MPITRAIN_SLOW_S``: a finite number of seconds >= 0 (unset or empty: the default)."""
    return env_knob("MPITRAIN_SLOW_S", SLOW_S, text or "")


class Faults:
    def __init__(self, rank: int, spec: str | None = None, size: int | None = None):
        """This rank's faults; a fault naming a rank the job does not have (>= ``size``, default the
        job's rank count) is a user error on every rank, since it would silently never happen."""
        spec = os.environ.get("MPITRAIN_FAULT") if spec is None else spec
        faults = parse(spec)
        size = job_size() if size is None else size
        missing = sorted({r for r, _, _ in faults if r >= size})
        if missing:
            raise UserError(f"MPITRAIN_FAULT={spec!r}: rank(s) {missing} do not exist in this job of {size} "
                            f"rank(s) (0..{size - 1}); the fault would never happen. Name an existing rank "
                            "or start more ranks")
        self.plan = [(s, k) for r, s, k in faults if r == rank]
        self.slow_s = env_knob("MPITRAIN_SLOW_S", SLOW_S)

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
            if kind == "hang":  # said once, so that a test (or a reader of the log) knows when it began
                print(f"{tag()} fault: hanging before the gradient all-reduce of step {step} (MPITRAIN_FAULT)",
                      file=sys.stderr, flush=True)
                while True:
                    time.sleep(3600)
            if kind == "usr1":
                os.kill(os.getpid(), signal.SIGUSR1)
            if kind == "nan" and grads is not None:
                grads[: max(1, grads.size // 7)] = float("nan")

    def inside(self, step: int) -> None:
        """Inside a pipeline schedule (before its first backward): only the faults that end a rank
        (raise, exit, kill, hang); the rest wait for ``at``."""
        for s, kind in self.plan:
            if s == step and kind in ("raise", "exit", "kill", "hang"):
                self.at(step)

    def finished(self, step: int) -> bool:
        """``finish``: a parameter-server worker stops before this step (as if out of data)."""
        return any(k == "finish" and s <= step for s, k in self.plan)

    def checkpoint_kill(self, step: int) -> bool:
        return any(k == "ckptkill" and s <= step for s, k in self.plan)
