"""Asynchronous parameter server (``comm.mode = "ps"``): servers own the parameters, workers push gradients.

    ranks 0 .. S-1: servers (S = comm.servers)       ranks S .. P-1: workers (W = P - S)

    server s owns params[lo_s:hi_s] (collectives/partition.py: S contiguous chunks of the flat
    vector) and the optimizer state of that chunk (train.optimizer, applied to the chunk; the lr
    schedule follows the server's update count). Workers open the data set on a workers-only
    communicator (a Split), so the training rows are partitioned among the workers; servers read
    no training rows (rank 0 reads the test set to evaluate). train.lr keeps its sync meaning (the
    rate of one step over W x batch_size samples): a server applies each worker's gradient with
    lr / W, so W updates move the parameters as far as one synchronous step (warm-up and step
    schedules count updates; an epoch is steps_per_epoch x W updates).

      worker w (its own batches)                                 server s (every s, same messages)
      ---------------------------                                ---------------------------------
      PULL  hdr(PULL, step)                   --TAG_REQ  71-->   held while clock[w] - slowest > max_staleness
            hdr(PARAMS, version, stop) + params[lo_s:hi_s]  <--TAG_REPLY 72--
      forward/backward, clip (the full gradient is here)
      PUSH  hdr(PUSH, step, loss, correct, n, bytes, timers)
            + grads[lo_s:hi_s]  (Isend, no wait) --TAG_REQ 71-->   clock[w] += 1; opt.step(grads) at once,
      ... PULL again (no barrier) ...                               in arrival order
      DONE  hdr(DONE, steps, signal, totals)  --TAG_REQ  71-->   w leaves the staleness minimum

      rank 0 -> server s > 0:  hdr(SNAP | SNAPFULL) --TAG_REQ 71-->, reply hdr + params chunk
                               (+ optimizer state for SNAPFULL) --TAG_SNAP 73--> rank 0
                               (evaluation every epoch-worth of updates; epoch checkpoints)
                               hdr(END) --TAG_REQ 71--> once rank 0 has seen every worker's DONE

    All of it on a private Dup of the run's communicator; servers receive with ANY_SOURCE on
    TAG_REQ only, workers from each server on TAG_REPLY. A header is 10 float64 (80 bytes):
    kind, step/version, flag (skipped | signal number), loss sum, correct, samples, bytes sent so
    far, compute s, comm s, non-finite steps skipped. Per-sender order is MPI's non-overtaking
    order on one tag, so a server always sees a worker's push before that worker's next pull.

Staleness (stale-synchronous parallel): a server counts each worker's pushes (its clock).
A pull from worker w is answered when ``clock[w] - min(clock[u] of unfinished u) <= s``
(s = comm.max_staleness), else held until a slower worker pushes or finishes. So no worker
computes a step more than s steps ahead of the slowest worker still training; s = 0 is
lock-step (every worker's step k gradient is applied before anyone gets parameters for
step k + 1). The gap at each reply is recorded (metrics ``ps.max_gap``, ``ps.gap_counts``).

Ending: a worker whose data is done (or that saw a signal) sends DONE to every server and
waits quietly (Ibcast + sleep, never spinning) for the job to end. A finished worker no
longer counts in the minimum, so it never holds the others back. A server ends when every
worker is DONE (servers > 0: and rank 0 said END). Then the servers gather their chunks and
optimizer state on rank 0, which evaluates the test set, writes the checkpoint, the metrics
and the ``done:`` line, and broadcasts the exit status (0, or 75 after SIGUSR1/SIGTERM:
servers then answer every pull at once with a stop flag, workers send DONE, a checkpoint is
written; --resume continues, each worker from its own step).

Waiting never blocks inside MPI (MPICH busy-polls a core in Wait): Test, then sleep with a
growing nap (50 us .. 0.5 ms). With comm.timeout_s = T > 0: rank 0 fails the job when an
unfinished worker it is not holding has sent it nothing for T s (naming it); other servers
after T + g; a worker waiting for a server's reply after T + 2g (naming the server); g =
watchdog.grace_s(T), so that the best informed rank speaks first. (When S > 1 and no worker
waits for this server at all, another server may be the stuck one: a server then waits
T + 3g, letting the workers name it.)

Bytes per worker step (n parameters, itemsize b, S servers):
    pull request S·80, reply n·b + S·80, push n·b + S·80   =>   2·n·b + 240·S bytes
(the sync ring moves 2(p-1)/p · n·b per rank per step). ``comm_bytes`` counts every message
sent by every rank (also snapshots and the final gather); ``bytes_per_step`` is comm_bytes /
worker steps. Every epoch-worth of updates (steps_per_epoch x W, steps_per_epoch being the
workers' common count) rank 0 evaluates the current parameters: one ``history`` entry (its
comm_bytes adds up the byte counts the other ranks last reported in their headers).
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from ...collectives.partition import partition
from ...runtime import UserError, log0
from ...watchdog import grace_s
from ..base import Strategy
from .clocks import Clocks
from .protocol import TAG_REPLY, TAG_REQ, TAG_SNAP, Waiter, bytes_per_step


class ParameterServer(Strategy):
    """``comm.mode = "ps"``: set up by the shared session (train/session.py), then servers serve and
    workers work (server.py, rank0.py, worker.py); the same metrics and checkpoints as every strategy."""

    owns_loop = True
    uses_watchdog = False  # waiting is polled here, with its own limits (protocol.Waiter)

    @staticmethod
    def label_for(cfg) -> str:
        return f"ps(servers={cfg.comm.servers},staleness={cfg.comm.max_staleness})"

    def __init__(self, cfg, comm):
        super().__init__(cfg, comm)
        self.label = self.label_for(cfg)
        self.S = S = cfg.comm.servers
        self.W = self.size - S
        if self.size < S + 1:  # every rank knows: no communication needed to fail alike
            raise UserError(f"comm.mode=\"ps\" with comm.servers={S} needs at least {S + 1} ranks (the "
                            f"{S} server(s) plus one worker or more), but this job has {self.size} rank(s); "
                            f"start more ranks (mpirun -n {S + 1} or more) or lower comm.servers")
        self.is_server = self.rank < S
        self.T = float(cfg.comm.timeout_s)
        self.g = grace_s(self.T) if self.T > 0 else 0.0
        self.u0 = self.u = 0       # updates applied before this run (resume), and so far
        self.start_step = 0        # worker: its first step (resume)
        self.worker_start = [0] * max(self.W, 0)  # every worker's first step, known everywhere
        self.pcomm = self.sub = None
        self.testset = None

    # ------------------------------------------------------------------ set-up
    def data_comm(self):
        """Workers partition the training rows among themselves; servers read none."""
        self.pcomm = self.comm.Dup()  # private: our tags never meet anybody else's messages
        self.sub = self.comm.Split(0 if self.is_server else 1, self.rank)  # the servers' or the workers'
        return None if self.is_server else self.sub

    def info_root(self):
        return self.S  # the first worker

    def backend(self, wanted):
        return "numpy" if self.is_server else wanted

    def describe_ranks(self):
        return f"{self.size} rank(s) = {self.S} server(s) + {self.W} worker(s)"

    def bind(self, run):
        self.run = run
        self.spe = run.steps_per_epoch
        self.epoch_updates = self.spe * self.W
        self.total_updates = run.cfg.train.epochs * self.epoch_updates
        self.bounds = partition(run.model.n_params, self.S)
        self.dtype = run.model.params.dtype
        self.waiter = Waiter(self.rank, self.S, self.T, self.g, run.resume_hint())
        if not self.is_server:
            return
        lo, hi = self.bounds[self.rank]
        self.shard = run.model.params[lo:hi]  # a view: on rank 0 the full vector stays whole
        self.opt = run.opt = run.make_optimizer(self.shard, pieces=[self.bounds[self.rank]])
        self.state_names = sorted(k for k in self.opt.state_dict() if k not in ("kind", "step"))
        # train.lr is the rate of a step over W x batch_size samples (as in the sync trainer): each
        # update is one worker's batch, applied with lr / W, so W updates go as far as one sync step
        self.schedule = run.make_schedule(self.total_updates, self.epoch_updates, scale=1.0 / self.W)
        if self.rank == 0:  # the test set only (structural checks; the workers verify the rows)
            from ...data import open_dataset

            self.testset = open_dataset(run.cfg.data.path, MPI.COMM_SELF, batch_size=1, seed=run.cfg.train.seed,
                                        verify=False)

    def fresh_start(self):
        pass  # every rank drew the same initial values from the seed

    # ------------------------------------------------------------------ resume
    def restore(self, ck):
        n = self.run.model.n_params
        self.run.last_test = tuple(ck.get("last_test") or self.run.last_test)
        ps = ck.get("mode") == "ps"
        if ps:
            self.u0 = int(ck["step"])
        else:  # a sync checkpoint: the same samples seen, counted in worker steps
            self.u0 = int(ck["epoch"]) * self.epoch_updates + min(int(ck["step_in_epoch"]), self.spe) * self.W
        if self.is_server:
            lo, hi = self.bounds[self.rank]
            self.run.model.params[...] = self.run.xp.asarray(ck["params"])
            opt = ck["optimizer"]
            state = {"kind": opt.get("kind", self.opt.kind), "step": opt.get("step", 0)}
            for name in self.state_names:
                if name in opt and np.shape(opt[name]) == (n,):
                    state[name] = opt[name][lo:hi]
            self.run.load_optimizer(self.opt, ck, state)
        steps = ck.get("worker_steps") or []
        exact = ps and len(steps) == self.W and ck.get("steps_per_epoch") == self.spe
        self.worker_start = [int(x) for x in steps] if exact else [self.u0 // self.W] * self.W
        if not self.is_server:
            self.start_step = self.worker_start[self.rank - self.S]
        note = "" if exact else (" (written with another layout: every worker restarts at the same "
                                 "position, so batches differ from an uninterrupted run)")
        log0(f"resumed from {ck['path']}: update {self.u0} (epoch {self.u0 // self.epoch_updates + 1}){note}")

    # --------------------------------------------------------------- running
    def run_loop(self, metrics_out=None, trace=None) -> int:
        from .rank0 import Rank0
        from .server import Server
        from .worker import Worker

        run = self.run
        if trace:
            log0("note: --trace is not supported with comm.mode=\"ps\" yet; no trace is written")
        self.u = self.u0
        run.results.start()
        if run.complete(self.u0, self.total_updates, "updates"):
            if self.rank == 0:
                run.results.write(metrics_out, run.results.metrics(
                    test=run.last_test, epochs=run.cfg.train.epochs, steps=self.u0, ranks=self.size, samples=0,
                    comm_fraction=0.0, timers={}, skipped=0, algorithm="ps", backend=run.cfg.train.backend,
                    stopped=False, strategy=self.label, comm_bytes=0.0, steps_done=0, bytes_divisor=1,
                    optimizer_bytes=run.optimizer_bytes()))
            self.sub.Free()
            self.pcomm.Free()
            return 0
        try:
            if self.is_server:
                server = (Rank0 if self.rank == 0 else Server)(self)
                server.serve()
                return server.finish(metrics_out)
            return Worker(self).work()
        finally:
            self.sub.Free()
            self.pcomm.Free()

    def evaluate(self):
        """Rank 0: (mean test loss, accuracy) of the current parameters on the whole test set."""
        return self.run.evaluate(self.testset, MPI.COMM_SELF)

    def save(self, state, worker_steps):
        """Rank 0 alone: a checkpoint of the full parameters and optimizer state."""
        e = self.epoch_updates
        opt = {"kind": self.opt.kind, "step": int(self.opt.steps), **(state or {})}
        return self.run.save(self.u % e, step=self.u, epoch=self.u // e, params=self.run.model.params.copy(),
                             optimizer=opt, state={}, collective=False,
                             extra={"mode": "ps", "servers": self.S, "workers": self.W, "steps_per_epoch": self.spe,
                                    "worker_steps": worker_steps})

    def close(self):
        if self.testset is not None:
            self.testset.close()


__all__ = ["ParameterServer", "Clocks", "bytes_per_step", "TAG_REQ", "TAG_REPLY", "TAG_SNAP"]
