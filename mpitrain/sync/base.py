"""The interface of a synchronization strategy: how the ranks agree on the parameters.

The training loop (train/loop.py) calls every strategy at the same fixed points and has no
branches of its own:

    with s.params_held("train"):                  around every use of the model (ZeRO-3 gathers there;
                                                  also "eval" around an evaluation)
    hook = s.grad_hook(step)                      before backward: on_grad_ready(hi), or None
    loss = model.loss_and_grad(batch, hook)       (buckets: finished prefixes leave while backprop runs)
    s.after_backward(step)                        the local gradients are final: make them the agreed ones
    s.update(loss, step)                          non-finite policy, clipping, optimizer step (ZeRO: on
                                                  this rank's shard, then the parameters all-gathered)
    s.after_step(step)                            e.g. local SGD averages the parameters every T steps
    s.synced()                                    do the replicas hold identical parameters right now?
    s.epoch_end(step)                             the epoch's last step is done
    s.state_dict() / s.load_state_dict(state)     its own state in checkpoints (residuals, counters)

Memory: ``grads_allocator`` / ``params_allocator`` say where the model's buffers live (shm windows,
ZeRO's paged buffers); ``held_bytes`` measures what a rank holds between steps.
A strategy owns its state, its byte accounting (``sent_bytes``: what this rank handed to MPI
for others during this run) and its label. It sees a model only through ``params``, ``grads``
and ``segments()``. ``grads_agree`` says whether the gradients after ``after_backward`` are
identical on every rank (then a non-finite gradient is decided alike everywhere, collectively;
otherwise it is this rank's own business). A strategy that runs a loop of its own (the
parameter server) sets ``owns_loop`` and implements ``run_loop(metrics_out, trace)``.

``run`` (given to ``bind``) is the training run's set-up (train/session.py): cfg, comm, xp,
model, opt, schedule, timers, watchdog, faults, data, and the results and checkpoint helpers.
"""

from __future__ import annotations

import contextlib


def allreduce_bytes(nbytes: int, p: int) -> float:
    """Bytes one rank sends, on average, in an all-reduce of ``nbytes`` over ``p`` ranks.

    2(p-1)/p · n for every algorithm here: ring sends 2(p-1) chunks of n/p; a
    binomial reduce + broadcast sends n once per non-root in each half (2(p-1)·n in
    all, spread unevenly); hier is a tree inside hosts plus a ring across them (the
    same total). For ``native`` it is what a bandwidth-optimal MPI library sends.
    """
    return 2.0 * (p - 1) / p * nbytes if p > 1 else 0.0


class Strategy:
    label = "?"
    grads_agree = True
    owns_loop = False
    uses_watchdog = True

    @staticmethod
    def label_for(cfg) -> str:
        """The label a job's keys give this strategy (before any rank runs it)."""
        return "?"

    def __init__(self, cfg, comm):
        self.cfg, self.comm = cfg, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.sent_bytes = 0.0
        self.run = None

    # ------------------------------------------------------------------ set-up
    def data_comm(self):
        """The communicator over which this rank's training rows are partitioned (None: it reads none)."""
        return self.comm

    def info_root(self) -> int:
        """A rank that reads training data (it tells the others the data set's spec)."""
        return 0

    def backend(self, wanted: str) -> str:
        """The array backend this rank computes with."""
        return wanted

    def grads_allocator(self, backend_name: str):
        """Collective. Where the model's ``grads`` should live: ``alloc(n, dtype)``, or None (plain memory)."""
        return None

    def bind(self, run) -> None:
        """Called once the model exists: the default optimizer and schedule over the full parameters."""
        self.run = run
        run.opt = run.make_optimizer(run.model.params)
        run.schedule = run.make_schedule(run.total_steps, run.steps_per_epoch)

    def fresh_start(self) -> None:
        """No checkpoint: every rank starts from rank 0's parameters."""
        self.run.broadcast_params()

    def restore(self, ck) -> None:
        """Resume from checkpoint ``ck`` (every rank has it)."""
        self.run.restore_replicated(ck)

    def describe_ranks(self) -> str:
        return f"{self.size} rank(s)"

    # ------------------------------------------------------------ fixed points
    def grad_hook(self, step: int):
        return None

    def after_backward(self, step: int) -> None:
        self.run.faults.at(step, self.run.model.grads)

    def update(self, loss: float, step: int) -> bool:
        """The optimizer step on the agreed gradients; False when a non-finite gradient skipped it."""
        run, grads = self.run, self.run.model.grads
        with run.timers("compute"):
            if not run.policy.finite(grads, loss, step, run.epoch, collective=self.grads_agree):
                return False
            run.policy.clip(grads)
            run.opt.step(grads, run.schedule(step))
        return True

    def after_step(self, step: int) -> None:
        pass

    def synced(self) -> bool:
        return True

    def epoch_end(self, step: int) -> None:
        pass

    # ---------------------------------------------------------------- memory
    def held_bytes(self) -> dict:
        """``{"params", "grads"}``: bytes of the arrays this rank holds between steps."""
        m = self.run.model
        return {"params": int(m.params.nbytes), "grads": int(m.grads.nbytes) + self.apart_bytes()}

    def apart_bytes(self) -> int:
        """Gradient parts a model keeps apart (a tied wte's head part: models/gpt.py)."""
        m = self.run.model
        return sum(int(a.nbytes) for _, _, a in m.grads_apart()) if hasattr(m, "grads_apart") else 0

    def params_allocator(self, backend_name: str):
        """Where the model's ``params`` should live (like ``grads_allocator``): None = plain memory."""
        return None

    def params_held(self, what: str = "train"):
        """A context around every use of the model (a step, an evaluation): ZeRO-3 gathers there."""
        return contextlib.nullcontext()

    def params_chunks(self):
        """The model's parameters, in buffer order, as host arrays (replica hash checks)."""
        from .. import backend

        yield backend.to_numpy(self.run.model.params)

    def saved_params(self):
        """Collective over the dp group: this stage's parameters (host, full layout of the stage) on dp
        rank 0, for the checkpoint (None where not needed)."""
        from .. import backend

        return backend.to_numpy(self.run.model.params)

    # -------------------------------------------------------------- checkpoint
    def optimizer_state(self) -> dict:
        """Collective: the full optimizer state as a replicated optimizer holds it (rank 0's is saved)."""
        return self.run.opt.state_dict()

    def load_optimizer_state(self, ck) -> None:
        """Every rank: the optimizer state of checkpoint ``ck`` (full length) into this rank's optimizer."""
        self.run.load_optimizer(self.run.opt, ck)

    def state_dict(self) -> dict:
        """Collective: every rank calls it; what rank 0 returns goes into the checkpoint."""
        return {}

    def load_state_dict(self, state: dict, ranks: int) -> None:
        """Every rank, with the saved state (written by ``ranks`` ranks)."""

    def close(self) -> None:
        pass
