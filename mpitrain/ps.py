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

import json
import math
import os
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
from mpi4py import MPI

from . import __version__, backend, checkpoint
from .collectives.partition import partition
from .faults import Faults
from .metrics import ProgressBar, Timers
from .model import MLP
from .optim import LRSchedule, clip_by_global_norm, clip_by_value, make_optimizer
from .runtime import UserError, log0
from .train import EXIT_STOPPED, _agree_config, _StopFlag, strategy_name
from .watchdog import grace_s

TAG_REQ, TAG_REPLY, TAG_SNAP = 71, 72, 73
PUSH, PULL, DONE, SNAP, SNAPFULL, END, PARAMS, SNAPSHOT = 1, 2, 3, 4, 5, 6, 7, 8
HEADER = 10
HB = HEADER * 8  # header bytes
# header fields (replies: STEP = the server's version = updates it has applied, FLAG = stop signal)
KIND, STEP, FLAG, LOSS, CORRECT, COUNT, SENT, COMPUTE, COMM, SKIPPED = range(HEADER)

SPIN = 50                       # Tests before the first nap
NAP_MIN, NAP_MAX = 50e-6, 5e-4  # seconds


def bytes_per_step(n: int, itemsize: int, servers: int) -> int:
    """Bytes one worker step moves: pull request + reply + push (see the module comment)."""
    return 2 * n * itemsize + 3 * HB * servers


def _rank_local(exc: UserError) -> UserError:
    exc.rank_local = True  # only this rank knows: report at once (runtime.defer_to_rank0)
    return exc


class Clocks:
    """A server's stale-synchronous bookkeeping (pure: no MPI). Workers are any hashable ids."""

    def __init__(self, workers, max_staleness: int):
        self.s = int(max_staleness)
        self.clock = dict.fromkeys(workers, 0)  # pushes received from each worker
        self.done: set = set()
        self.pending: dict = {}                 # worker -> its clock when it asked to pull
        self.pulls = self.held = self.max_gap = 0
        self.gaps: Counter = Counter()          # gap at each answered pull -> count

    @property
    def all_done(self) -> bool:
        return len(self.done) == len(self.clock)

    def slowest(self):
        live = [c for w, c in self.clock.items() if w not in self.done]
        return min(live) if live else None

    def push(self, w) -> None:
        self.clock[w] += 1

    def pull(self, w) -> None:
        self.pulls += 1
        self.pending[w] = self.clock[w]
        if not self.ready(w):
            self.held += 1

    def ready(self, w) -> bool:
        return self.clock[w] - self.slowest() <= self.s

    def finish(self, w) -> None:
        self.done.add(w)
        self.pending.pop(w, None)

    def release(self, force: bool = False) -> list:
        """Pulls that may be answered now, as (worker, gap); ``force`` answers all (stopping)."""
        out = []
        for w in list(self.pending):
            gap = self.clock[w] - self.slowest()
            if force or gap <= self.s:
                del self.pending[w]
                if not force:
                    self.gaps[gap] += 1
                    self.max_gap = max(self.max_gap, gap)
                out.append((w, gap))
        return out

    def stats(self) -> dict:
        return {"pulls": self.pulls, "held_pulls": self.held, "max_gap": self.max_gap,
                "gap_counts": dict(self.gaps)}


class _Buf:
    """One message: an 80-byte float64 header followed by ``count`` elements of ``dtype``."""

    def __init__(self, count: int, dtype):
        self.raw = np.zeros(HB + count * np.dtype(dtype).itemsize, dtype=np.uint8)
        self.hdr = self.raw[:HB].view(np.float64)
        self.body = self.raw[HB:].view(dtype)

    def msg(self, nbytes=None):
        return [self.raw if nbytes is None else self.raw[:nbytes], MPI.BYTE]


class PSTrainer:
    """``comm.mode = "ps"``: same CLI, metrics and checkpoints as the sync Trainer (train.py)."""

    def __init__(self, cfg, comm):
        self.cfg, self.comm = cfg, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.S = cfg.comm.servers
        self.W = self.size - self.S
        self.is_server = self.rank < self.S
        self.faults = Faults(self.rank)
        self.stop = _StopFlag()
        self.timers = Timers()
        self.sent_bytes = 0.0
        self.history = []
        self.T = float(cfg.comm.timeout_s)
        self.g = grace_s(self.T) if self.T > 0 else 0.0
        self.u0 = 0          # updates applied before this run (resume)
        self.start_step = 0  # worker: its first step (resume)
        self.worker_start = [0] * max(self.W, 0)  # every worker's first step, known everywhere
        self.data = self.testset = None

    # ------------------------------------------------------------------ set-up
    def setup(self, resume: bool):
        from .data import ensure_dataset, open_dataset

        cfg, comm, t, S = self.cfg, self.comm, self.cfg.train, self.S
        if self.size < S + 1:  # every rank knows: no communication needed to fail alike
            raise UserError(f"comm.mode=\"ps\" with comm.servers={S} needs at least {S + 1} ranks (the "
                            f"{S} server(s) plus one worker or more), but this job has {self.size} rank(s); "
                            f"start more ranks (mpirun -n {S + 1} or more) or lower comm.servers")
        _agree_config(comm, cfg)
        self.pcomm = comm.Dup()  # private: our tags never meet anybody else's messages
        self.sub = comm.Split(0 if self.is_server else 1, self.rank)  # the servers' or the workers' communicator
        d = cfg.data
        ensure_dataset(d.path, d.dataset, comm, shards=d.shards, seed=t.seed,
                       rows=d.rows or None, features=d.features or None, classes=d.classes or None)
        info = None
        if self.is_server:
            self.xp = np
            if self.rank == 0:  # the test set only (structural checks; the workers verify the rows)
                self.testset = open_dataset(d.path, MPI.COMM_SELF, batch_size=1, seed=t.seed, verify=False)
        else:
            self.xp = backend.get_xp(t.backend)
            if t.backend == "cupy":
                backend.select_device(self.sub, share=t.share_gpu)
                self.timers = Timers(sync=backend.synchronize)
            self.data = open_dataset(d.path, self.sub, batch_size=t.batch_size, seed=t.seed)
            info = {"features": self.data.features, "classes": self.data.classes,
                    "train_rows": self.data.train_rows, "steps_per_epoch": self.data.steps_per_epoch}
        info = comm.bcast(info, root=S)  # from the first worker
        self.spe = info["steps_per_epoch"]
        self.epoch_updates = self.spe * self.W
        self.total_updates = t.epochs * self.epoch_updates
        self.model = MLP(info["features"], cfg.model.hidden, info["classes"], cfg.model.activation,
                         xp=self.xp, seed=t.seed)  # the same initial values on every rank
        n = self.model.n_params
        self.bounds = partition(n, S)
        self.dtype = self.model.params.dtype
        if self.is_server:
            lo, hi = self.bounds[self.rank]
            self.shard = self.model.params[lo:hi]  # a view: on rank 0 the full vector stays whole
            self.opt = make_optimizer(t.optimizer, self.shard, lr=t.lr, momentum=t.momentum,
                                      weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), xp=np)
            self.state_names = sorted(k for k in self.opt.state_dict() if k not in ("kind", "step"))
            # train.lr is the rate of a step over W x batch_size samples (as in the sync trainer): each
            # update is one worker's batch, applied with lr / W, so W updates go as far as one sync step
            self.schedule = LRSchedule(t.schedule, t.lr / self.W, total_steps=self.total_updates,
                                       warmup_steps=t.warmup_steps, step_size=t.step_epochs * self.epoch_updates,
                                       gamma=t.gamma, min_lr=t.min_lr / self.W)
        if cfg.checkpoint.every > 0 or resume:
            ok = checkpoint.probe(cfg.checkpoint.dir) if self.rank == 0 else None
            comm.bcast(ok, root=0)
        if resume:
            self._resume()
        self.u = self.u0
        log0(f"mpitrain {__version__}: {self.size} rank(s) = {S} server(s) + {self.W} worker(s), "
             f"{self.model.describe()}, {info['train_rows']} training rows, {self.spe} steps/epoch per worker "
             f"of {t.batch_size}, parameter server (max_staleness={cfg.comm.max_staleness}, lr {t.lr:g}/{self.W} per "
             f"update), backend={t.backend}")

    def _resume(self):
        cfg = self.cfg
        ck = checkpoint.latest(cfg.checkpoint.dir) if self.rank == 0 else None
        ck = self.comm.bcast(ck, root=0)
        if ck is None:
            log0(f"--resume: no checkpoint in {cfg.checkpoint.dir}; starting from scratch")
            return
        n = self.model.n_params
        if ck["params"].size != n:
            raise UserError(f"{ck['path']}: holds {ck['params'].size} parameters but the model has {n}; "
                            "the job's model section changed since it was written")
        ps = ck.get("mode") == "ps"
        if ps:
            self.u0 = int(ck["step"])
        else:  # a sync checkpoint: the same samples seen, counted in worker steps
            self.u0 = int(ck["epoch"]) * self.epoch_updates + min(int(ck["step_in_epoch"]), self.spe) * self.W
        if self.is_server:
            lo, hi = self.bounds[self.rank]
            self.model.params[...] = self.xp.asarray(ck["params"])
            opt = ck["optimizer"]
            state = {"kind": opt.get("kind", self.opt.kind), "step": opt.get("step", 0)}
            for name in self.state_names:
                if name in opt and np.shape(opt[name]) == (n,):
                    state[name] = opt[name][lo:hi]
            try:
                self.opt.load_state_dict(state)
            except ValueError as e:
                raise UserError(f"{ck['path']}: its optimizer state does not fit train.optimizer="
                                f"{cfg.train.optimizer!r} ({e})") from None
        steps = ck.get("worker_steps") or []
        exact = ps and len(steps) == self.W and ck.get("steps_per_epoch") == self.spe
        self.worker_start = [int(x) for x in steps] if exact else [self.u0 // self.W] * self.W
        if not self.is_server:
            self.start_step = self.worker_start[self.rank - self.S]
        note = "" if exact else (" (written with another layout: every worker restarts at the same "
                                 "position, so batches differ from an uninterrupted run)")
        log0(f"resumed from {ck['path']}: update {self.u0} (epoch {self.u0 // self.epoch_updates + 1}){note}")

    # ---------------------------------------------------------------- waiting
    def _wait(self, test, limit=0.0, expired=None, idle=None):
        """Poll ``test()`` until it is true: spin a little, then nap (MPICH's Wait would burn a core).

        ``idle()`` runs at every nap; after ``limit`` s (> 0) ``expired(waited)`` is raised.
        """
        if test():
            return
        t0 = time.monotonic()
        nap, n = NAP_MIN, 0
        while not test():
            n += 1
            if n <= SPIN:
                continue
            time.sleep(nap)
            nap = min(nap * 2, NAP_MAX)
            if idle is not None:
                idle()
            if limit and time.monotonic() - t0 > limit:
                raise expired(time.monotonic() - t0)

    def _wait_sends(self, reqs, what):
        if not reqs:
            return
        limit = self.T + 2 * self.g if self.T > 0 else 0.0
        self._wait(lambda: MPI.Request.Testall(reqs), limit,
                   lambda w: _rank_local(UserError(f"watchdog (parameter server): {what} did not complete "
                                                   f"within {w:.1f} s (comm.timeout_s={self.T:g} s + grace); "
                                                   "the receiving rank is stuck or dead. Aborting the job")))
        reqs.clear()

    def _wait_recvs(self, reqs, sources, what):
        """Wait for one receive per source; a timeout names the sources that did not answer."""
        done = [False] * len(reqs)

        def test():
            for i, r in enumerate(reqs):
                if not done[i] and r.Test():
                    done[i] = True
            return all(done)

        # rank 0 (snapshots) after T + g; workers after T + 2g, all but the first one more second later
        limit = 0.0
        if self.T > 0:
            limit = self.T + (self.g if self.rank == 0 else 2 * self.g + (self.rank > self.S))

        def expired(w):
            late = [s for s, ok in zip(sources, done) if not ok]
            return _rank_local(UserError(
                f"watchdog (parameter server): server rank(s) {late} did not answer {what} within {w:.1f} s "
                f"(comm.timeout_s={self.T:g} s + {limit - self.T:g} s grace); it is stuck or dead, or waits for "
                "a rank that is. Look at that rank (e.g. `py-spy dump --pid PID`), or raise comm.timeout_s if a "
                f"step can legitimately take that long. Aborting the job{self._hint()}"))

        self._wait(test, limit, expired)

    def _hint(self):
        return (f"; resume from the last checkpoint in {self.cfg.checkpoint.dir} with --resume"
                if self.cfg.checkpoint.every > 0 else "")

    def _final_status(self, code: int = 0) -> int:
        """Everyone learns rank 0's exit status; the others wait quietly (no spinning) meanwhile."""
        buf = np.array([code], dtype=np.int64)
        req = self.pcomm.Ibcast([buf, MPI.INT64_T], root=0)
        self._wait(req.Test)
        return int(buf[0])

    # ------------------------------------------------------------------ worker
    def _work(self) -> int:
        t, xp, model = self.cfg.train, self.xp, self.model
        self.push_bufs = [_Buf(hi - lo, self.dtype) for lo, hi in self.bounds]
        self.req_bufs = [_Buf(0, self.dtype) for _ in self.bounds]
        self.reply_bufs = [_Buf(hi - lo, self.dtype) for lo, hi in self.bounds]
        self.push_reqs, self.req_reqs = [], []
        self.server_stop = 0  # a server's reply said: stop (a signal reached the job)
        self.skipped = 0
        self.step = self.start_step
        epoch, start = divmod(self.step, self.spe)
        while epoch < t.epochs:
            batches = self.data.batches(epoch, start=start)
            start = 0
            while True:
                if self.stop.signum or self.server_stop or self.faults.finished(self.step):
                    break
                with self.timers("data"):
                    batch = next(batches, None)
                if batch is None:
                    break
                with self.timers("comm"):
                    self._pull()  # every server's chunk, as fresh as the staleness bound allows
                if self.server_stop:
                    break
                x, y = batch
                with self.timers("compute"):
                    loss, correct = model.loss_and_grad(xp.asarray(x), xp.asarray(y))
                if self.faults:
                    self.faults.at(self.step, model.grads)
                with self.timers("compute"):
                    ok = bool(xp.isfinite(model.grads).all())
                    if ok:
                        if t.clip_value > 0:
                            clip_by_value(model.grads, t.clip_value)
                        if t.clip_norm > 0:
                            clip_by_global_norm(model.grads, t.clip_norm)
                    elif t.nonfinite == "skip":
                        self.skipped += 1
                    else:
                        raise _rank_local(UserError(
                            f"non-finite gradient at step {self.step} of worker rank {self.rank} (epoch "
                            f"{epoch + 1}; local loss {loss}). Lower train.lr, set train.clip_norm, check the "
                            "data (python -m mpitrain data check), or set train.nonfinite=\"skip\""))
                with self.timers("comm"):
                    self._push(float(loss), int(correct), len(y), skipped=not ok)
                self.step += 1
                if t.step_sleep:
                    time.sleep(t.step_sleep)
            if self.stop.signum or self.server_stop or self.faults.finished(self.step):
                break
            epoch += 1
        self._done(self.stop.signum or self.server_stop)
        self.data.close()  # a finished worker holds no files while the others train on
        return self._final_status()

    def _header(self, h, kind, flag=0.0):
        h[:] = 0.0
        h[KIND], h[STEP], h[FLAG] = kind, self.step, flag
        h[COMPUTE], h[COMM], h[SKIPPED] = self.timers.total("compute"), self.timers.total("comm"), self.skipped

    def _pull(self):
        recvs = [self.pcomm.Irecv(b.msg(), source=s, tag=TAG_REPLY) for s, b in enumerate(self.reply_bufs)]
        self._wait_sends(self.req_reqs, "a pull request")
        self.sent_bytes += HB * self.S
        for s, b in enumerate(self.req_bufs):
            self._header(b.hdr, PULL)
            b.hdr[SENT] = self.sent_bytes
            self.req_reqs.append(self.pcomm.Isend(b.msg(), dest=s, tag=TAG_REQ))
        self._wait_recvs(recvs, list(range(self.S)), f"the pull of step {self.step} (worker rank {self.rank})")
        for (lo, hi), b in zip(self.bounds, self.reply_bufs):
            self.model.params[lo:hi] = self.xp.asarray(b.body)
            if b.hdr[FLAG]:
                self.server_stop = int(b.hdr[FLAG])

    def _push(self, loss, correct, count, skipped=False):
        g = backend.to_numpy(self.model.grads)
        self._wait_sends(self.push_reqs, "a gradient push")  # long done: the servers answered a pull since
        size = HB if skipped else None
        self.sent_bytes += sum(HB if skipped else len(b.raw) for b in self.push_bufs)
        for s, ((lo, hi), b) in enumerate(zip(self.bounds, self.push_bufs)):
            self._header(b.hdr, PUSH, flag=1.0 if skipped else 0.0)
            b.hdr[LOSS], b.hdr[CORRECT], b.hdr[COUNT], b.hdr[SENT] = loss * count, correct, count, self.sent_bytes
            if not skipped:
                b.body[...] = g[lo:hi]
            self.push_reqs.append(self.pcomm.Isend(b.msg(size), dest=s, tag=TAG_REQ))

    def _done(self, signum):
        self._wait_sends(self.push_reqs, "a gradient push")
        self._wait_sends(self.req_reqs, "a pull request")
        self.sent_bytes += HB * self.S
        for s, b in enumerate(self.req_bufs):
            self._header(b.hdr, DONE, flag=float(signum))
            b.hdr[SENT] = self.sent_bytes
            b.hdr[COUNT] = self.timers.total("data")  # DONE: COUNT carries the data timer
            self.req_reqs.append(self.pcomm.Isend(b.msg(), dest=s, tag=TAG_REQ))
        self._wait_sends(self.req_reqs, "the DONE message")

    # ------------------------------------------------------------------ server
    def _serve(self) -> None:
        S = self.S
        m = self.shard.size
        self.clocks = Clocks(range(S, self.size), self.cfg.comm.max_staleness)
        self.inbox = _Buf(m, self.dtype)
        self.replies = {w: _Buf(m, self.dtype) for w in range(S, self.size)}
        self.reply_reqs = {}
        self.snap_buf = _Buf(m * (1 + len(self.state_names)), self.dtype)
        self.snap_req = []
        self.stopping = 0
        self.ended = self.rank == 0  # servers > 0 wait for rank 0's END
        self.all_done_at = None
        now = time.monotonic()
        self.heard = dict.fromkeys(range(S, self.size), now)
        self.wsteps = {w: self.worker_start[w - S] for w in range(S, self.size)}  # steps each worker has done
        self.last_check = now
        self.limit = (self.T if self.rank == 0 else self.T + self.g) if self.T > 0 else 0.0
        # rank 0: progress, per-epoch train statistics, the workers' latest totals
        self.win = [0.0, 0, 0]  # loss sum, correct, samples since the last epoch line
        self.samples = 0
        self.latest = {w: {"sent": 0.0, "compute": 0.0, "comm": 0.0, "data": 0.0, "skipped": 0}
                       for w in range(S, self.size)}
        self.server_sent = {s: 0.0 for s in range(1, S)}
        self.bar = ProgressBar(self.epoch_updates, epochs=self.cfg.train.epochs, rank=self.rank)
        status = MPI.Status()
        req = self.pcomm.Recv_init(self.inbox.msg(), source=MPI.ANY_SOURCE, tag=TAG_REQ)
        try:
            while not (self.clocks.all_done and self.ended):
                req.Start()
                self._wait(lambda: req.Test(status), idle=self._idle)
                self._handle(status.Get_source(), status.Get_count(MPI.BYTE))
                for w, _gap in self.clocks.release(force=bool(self.stopping)):
                    self._reply(w)
                self._idle()  # also when messages never stop coming
        finally:
            self.bar.close()
            req.Free()
        for r in self.reply_reqs.values():
            self._wait_sends([r], "a parameter reply")
        self._wait_sends(self.snap_req, "a snapshot")
        if self.rank == 0 and S > 1:
            self.sent_bytes += HB * (S - 1)
            end = _Buf(0, self.dtype)
            end.hdr[KIND] = END
            self._wait_sends([self.pcomm.Isend(end.msg(), dest=s, tag=TAG_REQ) for s in range(1, S)],
                             "the END message")

    def _idle(self):
        """Between messages: notice a signal; with comm.timeout_s, name workers that went silent."""
        if self.stop.signum and not self.stopping:
            self.stopping = self.stop.signum
            for w, _gap in self.clocks.release(force=True):
                self._reply(w)
        if not self.limit:
            return
        now = time.monotonic()
        if now - self.last_check < 0.2:
            return
        self.last_check = now
        c = self.clocks
        if c.all_done:  # a server > 0 waiting for END
            if self.all_done_at is not None and now - self.all_done_at > self.T + 2 * self.g:
                raise _rank_local(UserError(
                    f"watchdog (parameter server): every worker finished {now - self.all_done_at:.0f} s ago but "
                    "rank 0 has not ended the job; it is stuck or dead. Aborting the job"))
            return
        live = [w for w in self.heard if w not in c.done]
        quiet = [w for w in live if w not in c.pending]
        limit = self.limit
        if self.S > 1 and len(quiet) == len(live):
            # nobody waits here: maybe another server is stuck and its workers will name it; rank 0 first
            limit = self.T + 3 * self.g + (self.rank > 0)
        silent = sorted(w for w in quiet if now - self.heard[w] > limit)
        if silent:
            w = silent[0]
            extra = f" + {limit - self.T:g} s grace" if limit > self.T else ""
            raise _rank_local(UserError(
                f"watchdog (parameter server): worker rank(s) {silent} sent this server nothing for "
                f"{now - self.heard[w]:.1f} s (comm.timeout_s={self.T:g} s{extra}; rank {w} has done "
                f"{self.wsteps[w]} step(s)); it is stuck or dead, or waits for a rank that "
                "is. Look at that rank (e.g. `py-spy dump --pid PID`), or raise comm.timeout_s if a step can "
                f"legitimately take that long. Aborting the job{self._hint()}"))

    def _handle(self, src, nbytes):
        h = self.inbox.hdr
        kind = int(h[KIND])
        self.heard[src] = time.monotonic()
        if kind == PUSH:
            self.clocks.push(src)
            self.wsteps[src] = int(h[STEP]) + 1
            if not h[FLAG]:  # a skipped (non-finite) step advances the clock only
                if nbytes != len(self.inbox.raw):
                    raise RuntimeError(f"push from rank {src}: {nbytes} bytes, expected {len(self.inbox.raw)}")
                if self.faults:
                    self.faults.at(self.u)
                self.opt.step(self.inbox.body, self.schedule(self.u))
                self.u += 1
            if self.rank == 0:
                self._account(src, h)
        elif kind == PULL:
            self.clocks.pull(src)
        elif kind == DONE:
            self.clocks.finish(src)
            self.wsteps[src] = int(h[STEP])
            if self.rank == 0:
                self.latest[src]["data"] = float(h[COUNT])
                self._account(src, h, push=False)
            if h[FLAG] and not self.stopping:
                self.stopping = int(h[FLAG])
            if self.clocks.all_done:
                self.all_done_at = time.monotonic()
        elif kind in (SNAP, SNAPFULL) and src == 0:
            self._snap_reply(full=kind == SNAPFULL)
        elif kind == END and src == 0:
            self.ended = True
        else:
            raise RuntimeError(f"parameter server rank {self.rank}: unexpected message kind {kind} from rank {src}")

    def _reply(self, w):
        if w in self.reply_reqs:  # the worker received the last one before it asked again
            self._wait_sends([self.reply_reqs.pop(w)], f"the parameter reply to rank {w}")
        b = self.replies[w]
        b.hdr[:] = 0.0
        b.hdr[KIND], b.hdr[STEP], b.hdr[FLAG] = PARAMS, self.u, self.stopping
        b.body[...] = self.shard
        self.sent_bytes += len(b.raw)
        self.reply_reqs[w] = self.pcomm.Isend(b.msg(), dest=w, tag=TAG_REPLY)

    def _snap_reply(self, full):
        self._wait_sends(self.snap_req, "a snapshot")
        b, m = self.snap_buf, self.shard.size
        b.body[:m] = self.shard
        nbytes = HB + m * self.dtype.itemsize
        if full:
            st = self.opt.state_dict()
            for i, name in enumerate(self.state_names, 1):
                b.body[i * m:(i + 1) * m] = st[name]
            nbytes = len(b.raw)
            b.hdr[COUNT] = st["step"]
        self.sent_bytes += nbytes
        b.hdr[KIND], b.hdr[STEP], b.hdr[SENT] = SNAPSHOT, self.u, self.sent_bytes
        self.snap_req.append(self.pcomm.Isend(b.msg(nbytes), dest=0, tag=TAG_SNAP))

    # ------------------------------------------------------- rank 0: progress
    def _account(self, w, h, push=True):
        lw = self.latest[w]
        lw.update(sent=float(h[SENT]), compute=float(h[COMPUTE]), comm=float(h[COMM]), skipped=int(h[SKIPPED]))
        if not push:
            return
        self.win[0] += float(h[LOSS]) if not h[FLAG] else 0.0
        self.win[1] += int(h[CORRECT]) if not h[FLAG] else 0
        self.win[2] += int(h[COUNT]) if not h[FLAG] else 0
        self.samples += int(h[COUNT])
        e = self.epoch_updates
        k = max(self.u - 1, 0) // e  # 0-based epoch of the newest update
        self.bar.update(self.u - k * e, epoch=k + 1,
                        loss=self.win[0] / max(self.win[2], 1), accuracy=self.win[1] / max(self.win[2], 1),
                        samples=int(h[COUNT]), comm_fraction=self._comm_fraction())
        if self.u % e == 0 and not h[FLAG] and self.u < self.total_updates:
            self._epoch_end(self.u // e)

    def _comm_fraction(self):
        comm = sum(v["comm"] for v in self.latest.values())
        busy = comm + sum(v["compute"] for v in self.latest.values())
        return comm / busy if busy > 0 else 0.0

    def _bytes_so_far(self):
        return self.sent_bytes + sum(self.server_sent.values()) + sum(v["sent"] for v in self.latest.values())

    def _epoch_end(self, k):
        cfg = self.cfg
        save = cfg.checkpoint.every > 0 and k % cfg.checkpoint.every == 0
        state = self._snapshot(full=save)
        test_loss, test_acc = self._evaluate()
        self._epoch_line(k, test_loss, test_acc)
        if save:
            self._save(state)

    def _epoch_line(self, k, test_loss, test_acc):
        elapsed = time.perf_counter() - self.t_start
        self.history.append({"epoch": k, "step": self.u, "wall_s": elapsed, "comm_bytes": self._bytes_so_far(),
                             "test_accuracy": float(test_acc), "test_loss": float(test_loss)})
        loss, correct, seen = self.win
        self.bar.clear()
        log0(f"epoch {k:>3}/{self.cfg.train.epochs}  loss {loss / max(seen, 1):.4f}  train acc "
             f"{correct / max(seen, 1):.4f}  test loss {test_loss:.4f}  test acc {test_acc:.4f}  "
             f"{self.samples / max(elapsed, 1e-9):,.0f} samples/s  comm {100 * self._comm_fraction():.0f}%")
        self.win = [0.0, 0, 0]

    def _snapshot(self, full):
        """Rank 0: the other servers' current chunks (and optimizer state) into the full vectors."""
        n, S = self.model.n_params, self.S
        st = self.opt.state_dict()
        lo0, hi0 = self.bounds[0]
        state = {name: np.zeros(n, dtype=self.dtype) for name in self.state_names} if full else None
        if full:
            for name in self.state_names:
                state[name][lo0:hi0] = st[name]
        if S == 1:
            return state
        bufs, recvs, reqs = {}, [], []
        ask = _Buf(0, self.dtype)
        ask.hdr[KIND] = SNAPFULL if full else SNAP
        for s in range(1, S):
            lo, hi = self.bounds[s]
            bufs[s] = _Buf((hi - lo) * (1 + len(self.state_names)), self.dtype)
            recvs.append(self.pcomm.Irecv(bufs[s].msg(), source=s, tag=TAG_SNAP))
            reqs.append(self.pcomm.Isend(ask.msg(), dest=s, tag=TAG_REQ))
            self.sent_bytes += HB
        self._wait_recvs(recvs, list(range(1, S)), "rank 0's snapshot request")
        self._wait_sends(reqs, "a snapshot request")
        for s, b in bufs.items():
            lo, hi = self.bounds[s]
            m = hi - lo
            self.model.params[lo:hi] = b.body[:m]
            self.server_sent[s] = float(b.hdr[SENT])
            if full:
                for i, name in enumerate(self.state_names, 1):
                    state[name][lo:hi] = b.body[i * m:(i + 1) * m]
        return state

    def _evaluate(self):
        loss_sum, correct, count = 0.0, 0, 0
        for x, y in self.testset.test_batches(self.cfg.train.eval_batch_size):
            ls, c = self.model.evaluate(x, y)
            loss_sum, correct, count = loss_sum + ls, correct + c, count + len(y)
        n = max(count, 1)
        return loss_sum / n, correct / n

    def _worker_steps(self):
        return [self.wsteps[w] for w in range(self.S, self.size)]

    def _save(self, state):
        hook = None
        if self.faults.checkpoint_kill(self.u):
            hook = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731 - testing aid
        opt = {"kind": self.opt.kind, "step": int(self.opt.steps), **(state or {})}
        e = self.epoch_updates
        path = checkpoint.save(
            self.cfg.checkpoint.dir, params=backend.to_numpy(self.model.params).copy(), optimizer=opt,
            step=self.u, epoch=self.u // e, step_in_epoch=self.u % e, config=self.cfg.to_dict(),
            ranks=self.size, keep=self.cfg.checkpoint.keep, before_rename=hook,
            extra={"mode": "ps", "servers": self.S, "workers": self.W, "steps_per_epoch": self.spe,
                   "worker_steps": self._worker_steps()})
        return str(path)

    # ------------------------------------------------------------------- end
    def _finish_servers(self, metrics_out) -> int:
        """After the serving loop: gather on rank 0, evaluate, checkpoint, metrics; the exit status."""
        n, S = self.model.n_params, self.S
        st = self.opt.state_dict()
        if self.rank:
            self.sent_bytes += self.shard.nbytes * (1 + len(self.state_names))
            mine = (self.shard.copy(), {k: st[k] for k in self.state_names}, self.clocks.stats(), self.u,
                    self.sent_bytes)
        else:
            mine = (None, None, self.clocks.stats(), self.u, None)
        parts = self.sub.gather(mine, root=0)  # pickled: a few arrays, once
        if self.rank != 0:
            return self._final_status()
        cfg, t = self.cfg, self.cfg.train
        state = {name: np.zeros(n, dtype=self.dtype) for name in self.state_names}
        lo, hi = self.bounds[0]
        for name in self.state_names:
            state[name][lo:hi] = st[name]
        for s in range(1, S):
            lo, hi = self.bounds[s]
            params, sst, _stats, _u, sent = parts[s]
            self.model.params[lo:hi] = params
            for name in self.state_names:
                state[name][lo:hi] = sst[name]
            self.server_sent[s] = sent
        stats = [p[2] for p in parts]
        test_loss, test_acc = self._evaluate()
        stopped = self.stopping
        e = self.epoch_updates
        u, done_updates = self.u, self.u - self.u0
        if stopped:
            epochs = u // e
        else:
            epochs = max(1, math.ceil(u / e))
            if self.history and self.history[-1]["epoch"] >= epochs:
                self.history.pop()
            self._epoch_line(epochs, test_loss, test_acc)
        path = None
        if cfg.checkpoint.every > 0 or stopped:
            path = self._save(state)
        elapsed = time.perf_counter() - self.t_start
        lat = self.latest.values()
        total_bytes = self._bytes_so_far()
        comm_s, compute_s = sum(v["comm"] for v in lat), sum(v["compute"] for v in lat)
        gaps = Counter()
        for s in stats:
            gaps.update(s["gap_counts"])
        ps = {"servers": S, "workers": self.W, "max_staleness": cfg.comm.max_staleness,
              "max_gap": max(s["max_gap"] for s in stats), "gap_counts": {str(k): v for k, v in sorted(gaps.items())},
              "pulls": sum(s["pulls"] for s in stats), "held_pulls": sum(s["held_pulls"] for s in stats),
              "updates_per_server": [p[3] for p in parts], "worker_steps": self._worker_steps(),
              "steps_per_epoch": self.spe, "model_bytes_per_step": bytes_per_step(n, self.dtype.itemsize, S)}

        metrics = {"test_accuracy": float(test_acc), "test_loss": float(test_loss), "epochs": epochs, "steps": u,
                   "ranks": self.size, "samples_per_s": self.samples / max(elapsed, 1e-9),
                   "comm_fraction": comm_s / (comm_s + compute_s) if comm_s + compute_s > 0 else 0.0,
                   "wall_s": elapsed,
                   "timers_s": {"compute": compute_s, "comm": comm_s, "data": sum(v["data"] for v in lat)},
                   "nonfinite_skipped": sum(v["skipped"] for v in lat), "algorithm": "ps", "backend": t.backend,
                   "stopped_early": bool(stopped), "strategy": strategy_name(cfg), "comm_bytes": total_bytes,
                   "bytes_per_step": total_bytes / max(done_updates, 1), "history": self.history, "ps": ps}
        if metrics_out:
            Path(metrics_out).parent.mkdir(parents=True, exist_ok=True)
            Path(metrics_out).write_text(json.dumps(metrics, indent=2) + "\n")
        if stopped:
            name = signal.Signals(stopped).name if stopped in iter(signal.Signals) else str(stopped)
            log0(f"stopped by signal {name} at epoch {epochs + 1}, update {u}; checkpoint written to {path}; "
                 "resume with --resume")
            return self._final_status(EXIT_STOPPED)
        skipped = metrics["nonfinite_skipped"]
        note = f" ({skipped} non-finite step(s) skipped)" if skipped else ""
        log0(f"done: test accuracy {test_acc:.4f}, {u} updates ({self.W} worker(s), "
             f"max gap {ps['max_gap']} <= {cfg.comm.max_staleness}) in {elapsed:.1f} s{note}")
        return self._final_status(0)

    # -------------------------------------------------------------------- run
    def run(self, resume=False, metrics_out=None, trace=None) -> int:
        self.stop.install()
        try:
            self.setup(resume)
            if trace:
                log0("note: --trace is not supported with comm.mode=\"ps\" yet; no trace is written")
            self.t_start = time.perf_counter()
            if self.is_server:
                self._serve()
                code = self._finish_servers(metrics_out)
            else:
                code = self._work()
            self.sub.Free()
            self.pcomm.Free()
            return code
        finally:
            self.stop.restore()
            for r in (self.data, self.testset):
                if r is not None:
                    r.close()


__all__ = ["PSTrainer", "Clocks", "bytes_per_step", "TAG_REQ", "TAG_REPLY", "TAG_SNAP"]
