"""Set-up and resume, shared by every strategy: from a job config to a ready ``Run``.

    agree on the job --> strategy (sync.make) --> backend, device --> data set (made on first use,
    opened over the strategy's data communicator) --> spec --> model (models.build) -->
    strategy.bind: optimizer + schedule --> checkpoint dir probed --> resume or broadcast --> start-up line

A ``Run`` is what strategies and the loop see: cfg, comm, rank/size, xp, model, opt, schedule,
data, timers, watchdog, faults, stop, policy, results, the step counters, and the helpers
``make_optimizer``, ``make_schedule``, ``evaluate`` and ``save``.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
import signal

import numpy as np

from .. import __version__, backend, checkpoint, config, models, sync, threads, units, watchdog
from ..faults import Faults
from ..metrics import Timers
from ..optim import LRSchedule, make_optimizer
from ..runtime import UserError, agree, agree_config, log0
from .control import GradPolicy, StopFlag
from .model_parallel import ModelParallel
from .results import Results, optimizer_bytes


def params_digest(params) -> str:
    return hashlib.sha1(backend.to_numpy(params).tobytes()).hexdigest()[:12]


class Run:
    def __init__(self, cfg, comm):
        self.cfg, self.comm = cfg, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.faults = Faults(self.rank)
        self.watchdog = watchdog.OFF
        self.timers = Timers()
        self.trace = None
        self.stop = StopFlag()
        self.policy = GradPolicy(cfg.train, comm)
        self.results = Results(cfg.train.epochs)
        self.step = self.epoch = self.start_in_epoch = 0
        self.first_step = 0
        self.data = self.model = self.opt = self.schedule = None
        self.strategy = None
        self.grid = self.pipeline = None  # the process grid (parallel/grid.py); this rank's pipeline stage
        self.mp = None                    # this rank's share of the model on the grid (model_parallel.py)
        self.replica_comm = comm          # the ranks that hold the same parameters (the dp group)
        self.total_bytes = 0.0
        self.memory_plan = {}
        self.last_test = (float("nan"), float("nan"))  # the newest evaluation (also read back on resume)
        self.run_id, self._fresh, self._claimed = None, True, False  # who owns checkpoint.dir (_identify)
        self.xp = np

    # ------------------------------------------------------------------ set-up
    def setup(self, resume: bool) -> None:
        from ..data import open_dataset
        from ..parallel.grid import Grid

        cfg, comm, t = self.cfg, self.comm, self.cfg.train
        agree_config(comm, cfg)
        self.grid = Grid(comm, cfg.parallel.tp, cfg.parallel.pp)
        self.replica_comm = self.grid.dp_comm
        self.strategy = sync.make(cfg, self.grid.dp_comm)  # checks what every rank can check alone
        threads.apply(comm, t.threads)  # before anything computes (the MFU peak too)
        if self.strategy.uses_watchdog:
            self.watchdog = watchdog.start(comm, cfg.comm.timeout_s, hint=self.resume_hint())
        dcomm = self.strategy.data_comm()
        self.backend = self.strategy.backend(t.backend)
        self.xp = backend.get_xp(self.backend)
        if self.backend == "cupy":
            # one GPU per rank of the node: with a grid every rank computes (each stage and tp slot its own)
            backend.select_device(comm if self.grid.pp * self.grid.tp > 1 else dcomm, share=t.share_gpu)
            self.timers = Timers(sync=backend.synchronize)
        d = cfg.data
        self._ensure_data()
        if dcomm is not None:
            self.data = open_dataset(d.path, dcomm, batch_size=t.batch_size, seed=t.seed,
                                     window=cfg.model.block_size + 1)
        self._data_info()
        self.mp = ModelParallel(cfg, self.grid, self.xp, cfg.model.vocab_size or getattr(self.spec, "vocab_size", 0))
        with models.grads_allocator(self.strategy.grads_allocator(self.backend)), \
                models.params_allocator(self.strategy.params_allocator(self.backend)):  # (shm, ZeRO-2/3)
            self.model = models.build(cfg.model.kind, vars(cfg.model), self.spec, xp=self.xp, seed=t.seed,
                                      part=self.mp.part(), tp=self.mp.tp_slot())
        self.policy.bind(self.model, self.grid.mp_comm)
        self._lm_setup()
        self.strategy.bind(self)
        if self.grid.pp > 1:
            from ..parallel.pipeline import Pipeline

            self.pipeline = Pipeline(self.model, self.grid, cfg.parallel.schedule, t.accum_steps, t.batch_size,
                                     timers=self.timers)
        from .memory import check as memory_check

        self.memory_plan = memory_check(self)  # before anything big is spent: refuse a layout that won't fit
        if self.checkpointing() or resume:
            ok = checkpoint.probe(cfg.checkpoint.dir) if self.rank == 0 else None
            comm.bcast(ok, root=0)
        ck = self.read_checkpoint() if resume else None
        self._identify(ck, claim=cfg.checkpoint.every > 0 or resume)
        if ck is None:
            self.strategy.fresh_start()
        else:
            self.strategy.restore(ck)
        self.first_step = self.step
        accum = f" x {t.accum_steps} micro-steps" if t.accum_steps > 1 else ""
        ranks = self.strategy.describe_ranks()
        if self.pipeline is not None:
            ranks = (f"{self.grid.describe()} ({cfg.parallel.schedule}, {t.accum_steps} micro-batches, "
                     f"predicted bubble {self.pipeline.bubble:.0%})")
        elif self.grid.tp > 1:
            ranks = self.grid.describe()
        log0(f"mpitrain {__version__}: {ranks}, {self.model.describe()}, "
             f"{self.train_rows} training {self.data_unit}, {self.steps_per_epoch} steps/epoch of {t.batch_size} x "
             f"{self.data_ranks}{accum}, sync={self.strategy.label}, backend={t.backend}, threads "
             f"{threads.describe()}, optimizer state "
             f"{units.format_size(self.optimizer_bytes())}/rank")
        if self.grid.pp * self.grid.tp > 1:
            self.mp.log()

    def _ensure_data(self) -> None:
        """data.path made on first use -- only where the job named its data set with that path (config.py)."""
        from ..data import ensure_dataset

        d, ok = self.cfg.data, config.may_make_builtin(self.cfg)
        try:
            ensure_dataset(d.path, d.dataset if ok else "", self.comm, shards=d.shards, seed=self.cfg.train.seed,
                           rows=d.rows or None, features=d.features or None, classes=d.classes or None)
        except UserError as e:
            if ok:
                raise
            raise UserError(f"{e} (nothing is made at a data.path the job did not name a data set with: check "
                            "it for a typo, or name the set there with --set data.dataset=...)") from None

    def _data_info(self) -> None:
        """Every rank learns the data set's spec and sizes from a rank that reads training data."""
        info = None
        if self.data is not None:
            info = {"spec": self.data.spec, "train_rows": self.data.train_rows,
                    "steps_per_epoch": self.data.steps_per_epoch, "ranks": self.data.size,
                    "unit": getattr(self.data, "unit", "rows")}
        info = self.comm.bcast(info, root=self.strategy.info_root())
        self.spec, self.train_rows, self.data_unit = info["spec"], info["train_rows"], info["unit"]
        t = self.cfg.train
        self.steps_per_epoch, self.data_ranks = info["steps_per_epoch"] // t.accum_steps, info["ranks"]
        if self.steps_per_epoch == 0:
            raise UserError(f"train.accum_steps = {t.accum_steps}: an epoch holds only {info['steps_per_epoch']} "
                            "batches per rank, fewer than one optimizer step; lower train.accum_steps or "
                            "train.batch_size")
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        if t.max_steps:  # the epoch line counts the epochs max_steps spans
            self.results.epochs = -(-t.max_steps // self.steps_per_epoch)

    def checkpointing(self) -> bool:
        c = self.cfg.checkpoint
        return c.every > 0 or c.every_steps > 0

    def _lm_setup(self) -> None:
        """Models that count their FLOPs (the GPT) get MFU: every rank measures its matmul peak."""
        t = self.cfg.train
        if self.strategy.owns_loop and (t.accum_steps > 1 or t.max_steps or t.eval_every):
            raise UserError("comm.mode = \"ps\" runs its own loop: train.accum_steps, train.max_steps and "
                            "train.eval_every are not supported there; reset them or use comm.mode = \"sync\"")
        self.peak_flops = 0.0
        if hasattr(self.model, "flops_per_token"):
            from mpi4py import MPI

            from .results import measure_peak_flops

            self.peak_flops = self.comm.allreduce(measure_peak_flops(self.xp, self.model.dtype), op=MPI.SUM)
        if getattr(self.spec, "kind", None) == "tokens":  # the compressors' figures, beside the val bpb
            self.results.baseline = self.comm.bcast(self._baseline() if self.rank == 0 else None, root=0)

    def _baseline(self):
        """gzip -9 / xz -9 on the val split (data/baseline.py; cached next to the manifest), or None."""
        from ..data.baseline import compressor_bits, describe

        try:
            b = compressor_bits(self.cfg.data.path)
        except Exception as e:  # noqa: BLE001 - a reference point only: say so, train on
            log0(f"note: no compressor baseline for {self.cfg.data.path} ({type(e).__name__}: {e})")
            return None
        log0(f"val split compressed whole: {describe(b)} (the model's val bits are read against these)")
        return b

    def make_optimizer(self, params, xp=None, pieces=None):
        """train.optimizer over ``params``: the whole flat buffer, or (``pieces``: its [lo, hi) ranges,
        concatenated) a shard of it -- AdamW then decays the parts of its decayed tensors that fall in it."""
        t = self.cfg.train
        segs = None  # adamw: the model says which tensors decay
        if t.optimizer == "adamw" and hasattr(self.model, "decay_segments"):
            full = self.model.decay_segments()
            if pieces is None and params.size == self.model.n_params:
                segs = full
            elif pieces is not None:
                segs, off = [], 0
                for lo, hi in pieces:
                    segs += [(off + max(a, lo) - lo, off + min(b, hi) - lo) for a, b in full if a < hi and b > lo]
                    off += hi - lo
        return make_optimizer(t.optimizer, params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                              betas=(t.beta1, t.beta2), xp=xp or self.xp, decay_segments=segs)

    def make_schedule(self, total_steps: int, epoch_steps: int, scale: float = 1.0) -> LRSchedule:
        """train.lr's schedule over ``total_steps`` (``epoch_steps`` per epoch), its rates times ``scale``."""
        t = self.cfg.train
        return LRSchedule(t.schedule, t.lr * scale, total_steps=total_steps, warmup_steps=t.warmup_steps,
                          step_size=t.step_epochs * epoch_steps, gamma=t.gamma, min_lr=t.min_lr * scale)

    def resume_hint(self) -> str:
        return (f"; resume from the last checkpoint in {self.cfg.checkpoint.dir} with --resume"
                if self.checkpointing() else "")

    def optimizer_bytes(self) -> int:
        return optimizer_bytes(self.opt) if self.opt is not None else 0

    def held_bytes(self) -> dict:
        """What this rank holds between steps, measured: ``{param,grad,optimizer}_bytes_per_rank`` and the
        process's peak RSS so far."""
        import resource

        held = self.strategy.held_bytes()
        return {"param_bytes_per_rank": held["params"], "grad_bytes_per_rank": held["grads"],
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    # ------------------------------------------------------------------ resume
    def broadcast_params(self) -> None:
        if self.xp is np:  # in place: no second copy of the parameters
            self.replica_comm.Bcast(self.model.params, root=0)
        else:
            host = backend.to_numpy(self.model.params).copy()
            self.replica_comm.Bcast(host, root=0)
            self.model.params[...] = self.xp.asarray(host)
        self.check_replicas("initial parameters (hash)", "this is a bug: please report it")

    def check_replicas(self, what=None, hint=None) -> None:
        h = hashlib.sha1()
        for chunk in self.strategy.params_chunks():  # (ZeRO-3: one gathered group at a time)
            h.update(np.ascontiguousarray(chunk))  # (its buffer: no bytes copy)
        agree(self.replica_comm, h.hexdigest()[:12], what or f"parameters at step {self.step} (hash)",
              hint or "the replicas diverged: check that every rank runs the same code and MPI library")
        if self.grid is not None and self.grid.tp > 1 and not getattr(self.strategy, "sharded", False):
            self._check_tp_replicated()

    def _check_tp_replicated(self) -> None:
        """The tensors every tp rank holds whole (LayerNorms, row biases, embeddings, head) are bitwise alike."""
        m, h = self.model, hashlib.sha1()
        for name, off, shape in m.tensors():
            if m.shard_index(name) is None:
                h.update(backend.to_numpy(m.params[off:off + int(np.prod(shape))]).tobytes())
        agree(self.grid.tp_comm, h.hexdigest()[:12], f"tensors replicated over tp at step {self.step} (hash)",
              "the tp ranks' replicated tensors drifted: this is a bug, please report it")

    def read_checkpoint(self):
        """Rank 0 reads the newest valid checkpoint; every rank gets it (None: there is none)."""
        ck = checkpoint.latest(self.cfg.checkpoint.dir) if self.rank == 0 else None
        ck = self.comm.bcast(ck, root=0)
        if ck is None:
            log0(f"--resume: no checkpoint in {self.cfg.checkpoint.dir}; starting from scratch")
            return None
        models.check(ck, self.model)
        if self.grid.pp * self.grid.tp > 1:  # the full layout -> this stage's (and tp slot's) share
            from ..parallel.layout import checkpoint_for

            ck = checkpoint_for(ck, self.model)
        return ck

    def restore_replicated(self, ck) -> None:
        """Resume a run whose parameters and optimizer state are replicated on every rank."""
        self.model.params[...] = self.xp.asarray(ck["params"])
        self.strategy.load_optimizer_state(ck)
        self.strategy.load_state_dict(ck.get("strategy", {}), ck["ranks"])
        self.step, self.epoch, self.start_in_epoch = ck["step"], ck["epoch"], ck["step_in_epoch"]
        self.last_test = tuple(ck.get("last_test") or self.last_test)
        was = int(ck.get("data_ranks", ck["ranks"]))  # the replicas that read data (older files: all ranks)
        if was != self.data_ranks:  # a new data layout: the partly done epoch starts over on it
            self.start_in_epoch = 0
        if self.start_in_epoch >= self.steps_per_epoch:
            self.epoch, self.start_in_epoch = self.epoch + 1, 0
        note = "" if was == self.data_ranks else (
            f" (written by {was} data-parallel rank(s), now {self.data_ranks}: the data is re-partitioned, "
            "so batches differ from an uninterrupted run)")
        done = self.epoch >= self.cfg.train.epochs and not getattr(self.cfg.train, "max_steps", 0)
        log0(f"resumed from {ck['path']}: " + (f"step {self.step}, all {self.epoch} epochs done" if done else
                                                f"epoch {self.epoch + 1}, step {self.step}{note}"))
        self.check_replicas("resumed parameters (hash)", "this is a bug: please report it")

    def complete(self, done: int, total: int, unit: str) -> bool:
        """True (and says so) when a resumed run has nothing left to do: ``done`` of ``total`` ``unit``."""
        if done < total:
            return False
        loss, acc = self.last_test
        log0(f"the run in {self.cfg.checkpoint.dir} is already complete ({done}/{total} {unit}); nothing to "
             f"train. Its final test accuracy {acc:.4f}, test loss {loss:.4f}. Raise "
             f"{'train.max_steps' if unit == 'steps' else 'train.epochs'} to train further, or start a new run "
             "in another checkpoint.dir")
        return True

    def load_optimizer(self, opt, ck, state=None) -> None:
        try:
            opt.load_state_dict(state if state is not None else ck["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{ck['path']}: its optimizer state does not fit train.optimizer="
                            f"{self.cfg.train.optimizer!r} ({e}); resume with the optimizer it was written "
                            "with, or start a new run in another checkpoint.dir") from None

    # -------------------------------------------------------------- ownership
    def _identify(self, ck, claim: bool) -> None:
        """This run's id (a resumed run keeps its checkpoint's); rank 0 claims checkpoint.dir."""
        rid = (ck or {}).get("run_id")
        if self.rank == 0 and not rid:
            rid = secrets.token_hex(6)
        self.run_id = self.comm.bcast(rid, root=0)
        self._fresh, self._claimed = ck is None, False
        if claim and self.rank == 0:
            self._claim_dir()

    def _claim_dir(self) -> None:
        """Rank 0: a fresh run sets aside another run's checkpoints, then records itself as the owner."""
        d = self.cfg.checkpoint.dir
        moved = checkpoint.set_aside(d) if self._fresh else None
        if moved:
            dest, prev = moved
            log0(f"note: {d} held the checkpoints of another run (run {prev['run_id']}, steps "
                 f"{', '.join(map(str, prev['steps']))}); moved them to {dest}. To continue that run: "
                 f"--set checkpoint.dir={dest} --resume")
        checkpoint.claim(d, self.run_id, self.cfg.digest(), job=config.to_toml(self.cfg))
        self._claimed = True

    # -------------------------------------------------------------- evaluation
    def evaluate(self, data=None, comm=None):
        """(mean test loss, accuracy) over the test rows of ``data`` (summed over ``comm``'s ranks; at most
        train.eval_batches batches per rank when it is > 0). For a token set: the val split, per token."""
        data, comm = data or self.data, comm if comm is not None else self.comm
        limit = self.cfg.train.eval_batches or None
        with self.strategy.params_held("eval"):
            loss_sum, correct, count = self._eval_sums(data, limit)
        sent = self.strategy.sent_bytes + (self.mp.bytes if self.mp is not None else 0.0) + (
            self.pipeline.sent_bytes if self.pipeline is not None else 0.0)
        tot = np.array([loss_sum, correct, count, sent], dtype=np.float64)
        if comm.Get_size() > 1:
            from mpi4py import MPI

            with self.watchdog.guard("the evaluation all-reduce", self.step):
                comm.Allreduce(MPI.IN_PLACE, tot, op=MPI.SUM)
        n = max(tot[2], 1.0)
        self.total_bytes = float(tot[3])  # sent by all ranks together since this run started
        self.last_test = (tot[0] / n, tot[1] / n) if tot[2] > 0 else (float("nan"), float("nan"))
        return self.last_test

    def _eval_sums(self, data, limit):
        """(loss sum, correct, count) over this rank's test batches."""
        loss_sum, correct, count = 0.0, 0, 0
        xp = self.xp
        for arrays in itertools.islice(data.test_batches(self.cfg.train.eval_batch_size), limit):
            batch = tuple(xp.asarray(a) for a in arrays)  # (x, y), or a graph batch's five
            if self.pipeline is not None:  # the loss is the last stage's; the others add zeros
                ls, c, k = self.pipeline.evaluate(*self.model.split_batch(batch))
                loss_sum, correct, count = loss_sum + ls, correct + c, count + k
                continue
            ls, c = self.model.evaluate(batch)
            loss_sum, correct, count = loss_sum + ls, correct + c, count + self.model.count(batch)
        return loss_sum, correct, count

    # ------------------------------------------------------------- checkpoints
    def save(self, step_in_epoch: int, *, step=None, epoch=None, params=None, optimizer=None, state=None,
             extra=None, collective=True):
        """The strategy's state is gathered (unless given); rank 0 writes; every rank gets the path
        (``collective=False``: rank 0 alone calls it and gets the path)."""
        if state is None:
            state = self.strategy.state_dict()
        if optimizer is None:
            optimizer = self.strategy.optimizer_state()
        if params is None:
            params = self.strategy.saved_params()  # (ZeRO-3: gathered from the shards on dp rank 0)
            if self.grid.pp * self.grid.tp > 1:  # every stage's share, in the full layout
                from ..parallel.layout import gather_full

                params, optimizer = gather_full(self.model, optimizer, self.grid.mp_comm, params)
        ok = None
        if self.rank == 0:
            if not self._claimed:
                self._claim_dir()
            checkpoint.check_owner(self.cfg.checkpoint.dir, self.run_id)
            step = self.step if step is None else step
            hook = None
            if self.faults.checkpoint_kill(step):
                hook = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731 - testing aid
            ok = str(checkpoint.save(
                self.cfg.checkpoint.dir, params=backend.to_numpy(self.model.params if params is None else params),
                optimizer=optimizer, step=step,
                epoch=self.epoch if epoch is None else epoch, step_in_epoch=step_in_epoch,
                config=self.cfg.to_dict(), ranks=self.size, keep=self.cfg.checkpoint.keep, before_rename=hook,
                state=state, extra={"last_test": [float(v) for v in self.last_test], "run_id": self.run_id,
                                    "config_digest": self.cfg.digest(), "data_ranks": self.data_ranks,
                                    **self._model_extra(), **(extra or {})}))
        return self.comm.bcast(ok, root=0) if collective else ok

    def _model_extra(self) -> dict:
        """What rebuilds the model without the data set (``generate``): its kind and shape."""
        return models.record(self.model)

    def close(self) -> None:
        self.stop.restore()
        if self.strategy is not None:
            self.strategy.close()
        if self.data is not None:
            self.data.close()
        if self.grid is not None:
            self.grid.free()
        self.watchdog.close()
