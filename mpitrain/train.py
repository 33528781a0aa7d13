"""The training loop: data -> gradients -> allreduce -> step, the same on every rank.

    rank r:  batch_r --forward/backward--> grads_r --allreduce(avg)--> g --clip--> step
                                                   (ring by default)

Every rank starts from rank 0's parameters (broadcast, then verified by hash),
averages its gradients with the others' and applies the same optimizer step,
so the parameters stay identical; every ``train.check_every`` steps a hash
exchange proves it. Rank 0 prints; the other ranks only speak when something
is wrong.

Other ways for the ranks to agree (one per job, see docs/jobs.md):

    comm.compress = fp16|topk|sign   the gradients travel compressed (collectives/compress.py)
    train.sync_every = T > 1         local SGD: T steps on local gradients, then average parameters
    comm.mode = "ps"                 asynchronous parameter server (ps.py)

Every rank counts the bytes it sends; the per-epoch history (wall time, bytes
sent by all ranks together, test accuracy) lands in ``--metrics-out``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from . import __version__, backend, checkpoint, config, watchdog
from .collectives import allreduce
from .faults import Faults
from .metrics import ProgressBar, Timers, Trace
from .model import MLP
from .optim import LRSchedule, clip_by_global_norm, clip_by_value, make_optimizer
from .runtime import UserError, get_comm, log0

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early by a signal, a checkpoint was written, --resume continues


def add_arguments(p):
    p.add_argument("job", nargs="?", help="job file (TOML); default: the built-in digits job")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a job key, e.g. --set train.lr=0.05 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("--metrics-out", metavar="FILE.json", help="write final metrics (rank 0)")
    p.add_argument("--trace", metavar="FILE.json", help="write a Chrome trace (one process per rank)")
    p.set_defaults(func=main)


def main(args) -> int:
    cfg = config.load(args.job, args.overrides)
    if cfg.comm.mode == "ps":  # asynchronous parameter server: its own loop (ps.py)
        from .ps import PSTrainer

        return PSTrainer(cfg, get_comm()).run(resume=args.resume, metrics_out=args.metrics_out, trace=args.trace)
    return Trainer(cfg, get_comm()).run(resume=args.resume, metrics_out=args.metrics_out, trace=args.trace)


def allreduce_bytes(nbytes: int, p: int) -> float:
    """Bytes one rank sends, on average, in an all-reduce of ``nbytes`` over ``p`` ranks.

    2(p-1)/p · n for every algorithm here: ring sends 2(p-1) chunks of n/p; a
    binomial reduce + broadcast sends n once per non-root in each half (2(p-1)·n in
    all, spread unevenly); hier is a tree inside hosts plus a ring across them (the
    same total). For ``native`` it is what a bandwidth-optimal MPI library sends.
    """
    return 2.0 * (p - 1) / p * nbytes if p > 1 else 0.0


def params_digest(params) -> str:
    return hashlib.sha1(backend.to_numpy(params).tobytes()).hexdigest()[:12]


def _agree(comm, value, what: str, hint: str) -> None:
    """Every rank must hold the same ``value``; otherwise a UserError naming the odd ranks, on every rank."""
    values = comm.allgather(value)
    if len(set(values)) > 1:
        groups = {}
        for r, v in enumerate(values):
            groups.setdefault(v, []).append(r)
        desc = "; ".join(f"ranks {rs}: {v}" for v, rs in groups.items())
        raise UserError(f"{what} differs across ranks ({desc}); {hint}")


def _agree_config(comm, cfg) -> None:
    """Every rank must run the same job; otherwise a UserError naming the keys that differ, on every rank."""
    if len(set(comm.allgather(cfg.digest()))) == 1:
        return
    flat = comm.allgather({f"{s}.{k}": repr(v) for s, sec in cfg.to_dict().items() for k, v in sec.items()})
    diffs = []
    for key in sorted({k for f in flat for k in f}):
        groups = {}
        for r, f in enumerate(flat):
            groups.setdefault(f.get(key, "<missing>"), []).append(r)
        if len(groups) > 1:
            diffs.append(f"{key} is " + ", ".join(f"{v} on ranks {rs}" for v, rs in groups.items()))
    raise UserError(f"the job configuration differs across ranks: {'; '.join(diffs) or 'unknown keys'}; "
                    "start every rank with the same job file and --set options")


def strategy_name(cfg) -> str:
    """A short label of how the ranks agree: ``ring``, ``topk(0.01)``, ``local-sgd(T=4)``, ``ps(servers=1,staleness=4)``."""
    c = cfg.comm
    if c.mode == "ps":
        return f"ps(servers={c.servers},staleness={c.max_staleness})"
    if cfg.train.sync_every > 1:
        return f"local-sgd(T={cfg.train.sync_every})"
    if c.compress == "topk":
        return f"topk({c.topk_ratio:g}{'' if c.error_feedback else ',no-ef'})"
    if c.compress == "sign":
        return "sign" + ("" if c.error_feedback else "(no-ef)")
    if c.compress == "fp16":
        return "fp16"
    return c.algorithm + (f"+buckets({c.bucket_bytes})" if c.bucket_bytes > 0 else "")


class _StopFlag:
    """Set by SIGUSR1/SIGTERM; ranks agree on it at the next step boundary."""

    def __init__(self):
        self.signum = 0
        self._old = {}
        self._grace = watchdog.TermGrace()  # a rank stuck in MPI cannot stop: end it 20 s after SIGTERM

    def install(self):
        for s in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread
                pass
        self._grace.install()

    def _handler(self, signum, frame):
        self.signum = signum

    def restore(self):
        self._grace.restore()
        for s, h in self._old.items():
            signal.signal(s, h)


class Trainer:
    def __init__(self, cfg: config.JobConfig, comm):
        self.cfg = cfg
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.faults = Faults(self.rank)
        self.watchdog = watchdog.OFF  # comm.timeout_s > 0: started in setup()
        self.timers = Timers()
        self.trace = None
        self.stop = _StopFlag()
        self.nonfinite_skipped = 0
        self.step = self.epoch = self.start_in_epoch = 0
        self._flag = np.zeros(1, dtype=np.int64)
        self.sent_bytes = 0.0    # by this rank, since the start of this run
        self.history = []        # one entry per epoch: wall time, bytes (all ranks), test loss/accuracy
        self.sync_every = cfg.train.sync_every
        self.local_sgd = cfg.train.sync_every > 1  # T = 1 is synchronous training (gradients averaged)
        self.local_steps = 0     # local SGD: steps since the parameters were last averaged

    # ------------------------------------------------------------------ set-up
    def setup(self, resume: bool):
        from .data import ensure_dataset, open_dataset

        cfg, comm = self.cfg, self.comm
        _agree_config(comm, cfg)
        self.watchdog = watchdog.start(comm, cfg.comm.timeout_s, hint=(
            f"; resume from the last checkpoint in {cfg.checkpoint.dir} with --resume"
            if cfg.checkpoint.every > 0 else ""))
        self.xp = backend.get_xp(cfg.train.backend)
        if cfg.train.backend == "cupy":
            backend.select_device(comm, share=cfg.train.share_gpu)
            self.timers = Timers(sync=backend.synchronize)
            if cfg.comm.bucket_bytes > 0 and not backend.cuda_aware_mpi():
                raise UserError("comm.bucket_bytes > 0 with train.backend='cupy' needs a CUDA-aware MPI "
                                f"({backend.cuda_aware_info()[1]}); set comm.bucket_bytes=0")
        d = cfg.data
        ensure_dataset(d.path, d.dataset, comm, shards=d.shards, seed=cfg.train.seed,
                       rows=d.rows or None, features=d.features or None, classes=d.classes or None)
        self.data = open_dataset(d.path, comm, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
        t = cfg.train
        self.model = MLP(self.data.features, cfg.model.hidden, self.data.classes, cfg.model.activation,
                         xp=self.xp, seed=t.seed)
        self.opt = make_optimizer(t.optimizer, self.model.params, lr=t.lr, momentum=t.momentum,
                                  weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), xp=self.xp)
        self.steps_per_epoch = self.data.steps_per_epoch
        self.total_steps = t.epochs * self.steps_per_epoch
        self.schedule = LRSchedule(t.schedule, t.lr, total_steps=self.total_steps, warmup_steps=t.warmup_steps,
                                   step_size=t.step_epochs * self.steps_per_epoch, gamma=t.gamma, min_lr=t.min_lr)
        self.step = self.epoch = self.start_in_epoch = 0
        if cfg.checkpoint.every > 0 or resume:
            ok = checkpoint.probe(cfg.checkpoint.dir) if self.rank == 0 else None
            comm.bcast(ok, root=0)
        if resume:
            self._resume()
        else:
            self._broadcast_params()
        log0(f"mpitrain {__version__}: {self.size} rank(s), {self.model.describe()}, "
             f"{self.data.train_rows} training rows, {self.steps_per_epoch} steps/epoch of "
             f"{t.batch_size} x {self.size}, sync={strategy_name(cfg)}, backend={t.backend}")

    def _broadcast_params(self):
        host = backend.to_numpy(self.model.params).copy()
        self.comm.Bcast(host, root=0)
        self.model.params[...] = self.xp.asarray(host)
        _agree(self.comm, params_digest(self.model.params), "initial parameters (hash)",
               "this is a bug: please report it")

    def _resume(self):
        ck = checkpoint.latest(self.cfg.checkpoint.dir) if self.rank == 0 else None
        ck = self.comm.bcast(ck, root=0)
        if ck is None:
            log0(f"--resume: no checkpoint in {self.cfg.checkpoint.dir}; starting from scratch")
            self._broadcast_params()
            return
        if ck["params"].size != self.model.params.size:
            raise UserError(f"{ck['path']}: holds {ck['params'].size} parameters but the model has "
                            f"{self.model.params.size}; the job's model section changed since it was written")
        self.model.params[...] = self.xp.asarray(ck["params"])
        self.opt.load_state_dict(ck["optimizer"])
        self.step, self.epoch, self.start_in_epoch = ck["step"], ck["epoch"], ck["step_in_epoch"]
        if ck["ranks"] != self.size:  # a new data layout: the partly done epoch starts over on it
            self.start_in_epoch = 0
        if self.start_in_epoch >= self.steps_per_epoch:
            self.epoch, self.start_in_epoch = self.epoch + 1, 0
        note = "" if ck["ranks"] == self.size else (
            f" (written by {ck['ranks']} rank(s), now {self.size}: the data is re-partitioned, "
            "so batches differ from an uninterrupted run)")
        log0(f"resumed from {ck['path']}: epoch {self.epoch + 1}, step {self.step}{note}")
        _agree(self.comm, params_digest(self.model.params), "resumed parameters (hash)",
               "this is a bug: please report it")

    # --------------------------------------------------------------- one step
    def train_step(self, x, y):
        cfg, xp, model = self.cfg, self.xp, self.model
        if cfg.comm.bucket_bytes > 0:
            loss, correct = self._backward_bucketed(x, y)
        else:
            with self.timers("compute"):
                x, y = xp.asarray(x), xp.asarray(y)
                loss, correct = model.loss_and_grad(x, y)
            if self.faults:
                self.faults.at(self.step, model.grads)
            if not self.local_sgd:
                with self.timers("comm"), self.watchdog.collective(self.step):
                    self._average_grads()
        with self.timers("compute"):
            if not bool(xp.isfinite(model.grads).all()):
                if self.local_sgd:  # only this rank knows; its own step is skipped or fails
                    return self._nonfinite_local(loss)
                # the averaged gradients are identical on every rank: every rank decides the same
                return self._nonfinite(loss)
            if cfg.train.clip_value > 0:
                clip_by_value(model.grads, cfg.train.clip_value)
            if cfg.train.clip_norm > 0:
                clip_by_global_norm(model.grads, cfg.train.clip_norm)
            self.opt.step(model.grads, self.schedule(self.step))
        return loss, correct

    def _average_grads(self):
        """Replace the local gradients with their average over the ranks.

        ``comm.compress`` != "none": the average of the ranks' compressed gradients
        (collectives/compress.py); the compressor, with its error-feedback residual,
        is made on the first step (a resumed run starts with a zero residual).
        """
        g = self.model.grads
        c = self.cfg.comm
        if c.compress != "none":
            comp = getattr(self, "compressor", None)
            if comp is None:
                from .collectives import compress

                tensors = []  # each layer's W and b, in buffer order
                for layer in sorted(self.model.layers, key=lambda l: l.lo):
                    w_end = layer.lo + layer.fan_in * layer.fan_out
                    tensors += [(layer.lo, w_end), (w_end, layer.hi)]
                comp = self.compressor = compress.make(c.compress, g.size, tensors, topk_ratio=c.topk_ratio,
                                                       sign_block=c.sign_block,
                                                       error_feedback=c.error_feedback, dtype=g.dtype)
            self.sent_bytes += comp.allreduce_avg(g, self.comm)
            return
        allreduce(g, self.comm, op="avg", algorithm=self.cfg.comm.algorithm)
        self.sent_bytes += allreduce_bytes(g.nbytes, self.size)

    def _average_params(self):
        """Local SGD's synchronization: every rank takes the average of the ranks' parameters."""
        p = self.model.params
        self.local_steps = 0
        with self.timers("comm"), self.watchdog.collective(self.step):
            allreduce(p, self.comm, op="avg", algorithm=self.cfg.comm.algorithm)
        self.sent_bytes += allreduce_bytes(p.nbytes, self.size)
        if not bool(self.xp.isfinite(p).all()):  # identical on every rank after the average
            raise UserError(f"non-finite parameters after averaging at step {self.step} (local SGD, "
                            f"train.sync_every={self.sync_every}): a rank diverged between synchronizations. "
                            "Lower train.lr or train.sync_every, or set train.clip_norm")

    def after_step(self):
        """Local SGD: count the step; every ``sync_every``-th one, average the parameters."""
        if self.local_sgd:
            self.local_steps += 1
            if self.local_steps >= self.sync_every:
                self._average_params()

    def _synced(self) -> bool:
        """True when the replicas hold the same parameters (always, unless local SGD is between syncs)."""
        return self.local_steps == 0

    def _backward_bucketed(self, x, y):
        """Backprop with gradient buckets averaged while earlier layers still compute (like DDP).

        The flat gradient buffer fills from offset 0 (last layer first); each time
        the finished prefix has grown by ``comm.bucket_bytes`` it is handed to a
        non-blocking all-reduce, progressed after every layer (``comm.overlap =
        "progress"``) or driven by a communication thread (``"thread"``).
        """
        from .collectives.nonblocking import iallreduce

        cfg, model, xp = self.cfg, self.model, self.xp
        grads = model.grads
        limit = max(1, cfg.comm.bucket_bytes // grads.itemsize)
        handles, sent = [], 0
        thread = self._comm_thread()

        def ready(hi):
            nonlocal sent
            if hi - sent >= limit or hi == grads.size:
                backend.synchronize(grads)
                h = iallreduce(grads[sent:hi], self.comm, op="avg", algorithm=cfg.comm.algorithm)
                if thread is not None:
                    thread.submit(h)
                else:
                    handles.append(h)
                sent = hi
            for h in handles:
                h.progress()

        with self.timers("compute"):
            if self.faults:
                self.faults.at(self.step, x)  # 'nan' poisons the input, so the gradients follow
            self.watchdog.arrive(self.step)
            loss, correct = model.loss_and_grad(xp.asarray(x), xp.asarray(y), on_grad_ready=ready)
        # only what backprop did not hide
        with self.timers("comm"), self.watchdog.guard("the gradient all-reduce", self.step):
            if thread is not None:
                thread.drain()
            for h in handles:
                h.wait()
        self.sent_bytes += allreduce_bytes(grads.nbytes, self.size)
        return loss, correct

    def _comm_thread(self):
        if self.cfg.comm.overlap != "thread":
            return None
        if getattr(self, "_thread", None) is None:
            from .collectives.nonblocking import CommThread

            self._thread = CommThread()
        return self._thread

    def _nonfinite(self, loss):
        bad = self.comm.allgather(not math.isfinite(loss))
        who = [r for r, b in enumerate(bad) if b]
        where = (f"local loss non-finite on rank(s) {who}" if who else
                 "every rank's loss was finite: it arose in the backward pass")
        if self.cfg.train.nonfinite == "skip":
            self.nonfinite_skipped += 1
            log0(f"step {self.step}: non-finite gradient ({where}); step skipped "
                 f"({self.nonfinite_skipped} so far)")
            return float("nan"), 0
        raise UserError(f"non-finite gradient at step {self.step} (epoch {self.epoch + 1}; {where}). "
                        "Lower train.lr, set train.clip_norm, check the data "
                        "(python -m mpitrain data check), or set train.nonfinite=\"skip\"")

    def _nonfinite_local(self, loss):
        """Local SGD: a non-finite gradient on this rank only (no collective: the others did not see it)."""
        if self.cfg.train.nonfinite == "skip":
            self.nonfinite_skipped += 1
            return float("nan"), 0
        raise UserError(f"non-finite gradient at step {self.step} (epoch {self.epoch + 1}, local SGD: this "
                        f"rank's own gradient; local loss {loss}). Lower train.lr, set train.clip_norm, check "
                        "the data (python -m mpitrain data check), or set train.nonfinite=\"skip\"")

    def _check_replicas(self):
        _agree(self.comm, params_digest(self.model.params), f"parameters at step {self.step} (hash)",
               "the replicas diverged: check that every rank runs the same code and MPI library")

    def _should_stop(self) -> bool:
        self._flag[0] = self.stop.signum
        with self.watchdog.guard("the stop-flag all-reduce", self.step):
            self.comm.Allreduce(MPI.IN_PLACE, self._flag, op=MPI.MAX)
        return bool(self._flag[0])

    # ------------------------------------------------------------------- eval
    def evaluate(self):
        loss_sum, correct, count = 0.0, 0, 0
        for x, y in self.data.test_batches(self.cfg.train.eval_batch_size):
            ls, c = self.model.evaluate(self.xp.asarray(x), self.xp.asarray(y))
            loss_sum, correct, count = loss_sum + ls, correct + c, count + len(y)
        tot = np.array([loss_sum, correct, count, self.sent_bytes], dtype=np.float64)
        with self.watchdog.guard("the evaluation all-reduce", self.step):
            self.comm.Allreduce(MPI.IN_PLACE, tot, op=MPI.SUM)
        n = max(tot[2], 1.0)
        self.total_bytes = float(tot[3])  # sent by all ranks together since this run started
        return tot[0] / n, tot[1] / n

    def save(self, step_in_epoch):
        if self.rank == 0:
            hook = None
            if self.faults.checkpoint_kill(self.step):
                hook = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731 - testing aid
            path = checkpoint.save(
                self.cfg.checkpoint.dir, params=backend.to_numpy(self.model.params),
                optimizer=self.opt.state_dict(), step=self.step, epoch=self.epoch,
                step_in_epoch=step_in_epoch, config=self.cfg.to_dict(), ranks=self.size,
                keep=self.cfg.checkpoint.keep, before_rename=hook)
            ok = str(path)
        else:
            ok = None
        return self.comm.bcast(ok, root=0)

    # -------------------------------------------------------------------- run
    def run(self, resume=False, metrics_out=None, trace=None) -> int:
        cfg, comm = self.cfg, self.comm
        self.stop.install()  # before set-up: a signal while data is made or a checkpoint read is kept
        try:
            self.setup(resume)
        except BaseException:
            self.stop.restore()
            raise
        if self._should_stop():
            self.stop.restore()
            log0("stopped by a signal during set-up, before the first step; nothing to save; "
                 "run again (with --resume to continue from an existing checkpoint)")
            return EXIT_STOPPED
        if trace:
            self.trace = Trace(comm)
            self.timers.trace = self.trace
        t = cfg.train
        bar = ProgressBar(self.steps_per_epoch, epochs=t.epochs, comm=comm)
        t_start = time.perf_counter()
        first_step = self.step  # after a resume: the steps of this run are the ones its bytes count
        samples = 0
        test_loss = test_acc = float("nan")
        stopped = False
        try:
            while self.epoch < t.epochs and not stopped:
                start = self.start_in_epoch
                self.start_in_epoch = 0
                loss_sum, correct, seen, i = 0.0, 0, 0, start
                batches = self.data.batches(self.epoch, start=start)
                while True:
                    with self.timers("data"):
                        batch = next(batches, None)
                    if batch is None:
                        break
                    x, y = batch
                    loss, c = self.train_step(x, y)
                    if t.step_sleep:
                        time.sleep(t.step_sleep)
                    self.step += 1
                    i += 1
                    self.after_step()
                    if math.isfinite(loss):
                        loss_sum, correct, seen = loss_sum + loss * len(y), correct + c, seen + len(y)
                    samples += len(y) * self.size
                    if t.check_every and self.step % t.check_every == 0 and self._synced():
                        self._check_replicas()
                    bar.update(i, epoch=self.epoch + 1, loss=loss_sum / max(seen, 1),
                               accuracy=correct / max(seen, 1), samples=len(y) * self.size,
                               comm_fraction=self.timers.fraction("comm"))
                    if self._synced() and self._should_stop():
                        stopped = True
                        break
                if stopped:
                    break
                if not self._synced():  # local SGD: the epoch ends between synchronizations
                    self._average_params()
                test_loss, test_acc = self.evaluate()
                self.epoch += 1
                elapsed = time.perf_counter() - t_start
                self.history.append({"epoch": self.epoch, "step": self.step, "wall_s": elapsed,
                                     "comm_bytes": self.total_bytes, "test_accuracy": float(test_acc),
                                     "test_loss": float(test_loss)})
                bar.clear()
                log0(f"epoch {self.epoch:>3}/{t.epochs}  loss {loss_sum / max(seen, 1):.4f}  "
                                 f"train acc {correct / max(seen, 1):.4f}  test loss {test_loss:.4f}  "
                                 f"test acc {test_acc:.4f}  {samples / max(elapsed, 1e-9):,.0f} samples/s  "
                                 f"comm {100 * self.timers.fraction('comm'):.0f}%")
                if cfg.checkpoint.every and self.epoch % cfg.checkpoint.every == 0:
                    self.save(0)
            if stopped:
                path = self.save(i)
                name = signal.Signals(self._flag[0]).name if self._flag[0] in iter(signal.Signals) else "?"
                log0(f"stopped by signal {name} at epoch {self.epoch + 1}, step {self.step}; checkpoint "
                     f"written to {path}; resume with --resume")
            else:
                self._check_replicas()
        finally:
            self.stop.restore()
            bar.close()
            if getattr(self, "_thread", None) is not None:
                self._thread.close()
            self.data.close()
            self.watchdog.close()
        elapsed = time.perf_counter() - t_start
        metrics = {"test_accuracy": float(test_acc), "test_loss": float(test_loss), "epochs": self.epoch,
                   "steps": self.step, "ranks": self.size, "samples_per_s": samples / max(elapsed, 1e-9),
                   "comm_fraction": self.timers.fraction("comm"), "wall_s": elapsed,
                   "timers_s": self.timers.totals(), "nonfinite_skipped": self.nonfinite_skipped,
                   "algorithm": cfg.comm.algorithm, "backend": cfg.train.backend, "stopped_early": stopped,
                   "strategy": strategy_name(cfg), "comm_bytes": getattr(self, "total_bytes", 0.0),
                   "bytes_per_step": getattr(self, "total_bytes", 0.0) / max(self.size, 1)
                   / max(self.step - first_step, 1),
                   "history": self.history}
        if self.trace is not None:
            self.trace.write(trace, comm)
        if metrics_out and self.rank == 0:
            Path(metrics_out).parent.mkdir(parents=True, exist_ok=True)
            Path(metrics_out).write_text(json.dumps(metrics, indent=2) + "\n")
        if not stopped:
            skipped = f" ({self.nonfinite_skipped} non-finite step(s) skipped)" if self.nonfinite_skipped else ""
            log0(f"done: test accuracy {test_acc:.4f}, {self.step} steps in {elapsed:.1f} s{skipped}")
        return EXIT_STOPPED if stopped else 0
