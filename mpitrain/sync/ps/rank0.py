"""Rank 0 of the parameter server: a server that also keeps the job's progress and reports it.

    per push: the worker's loss/accuracy and totals (from its header) -> progress bar
    every epoch-worth of updates (steps_per_epoch x W): SNAP(FULL) the other servers' chunks ->
        evaluate the test set -> epoch line (train/results.py) -> checkpoint every checkpoint.every
    at the end: gather every chunk and optimizer state -> evaluate -> checkpoint -> metrics -> END
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from ...metrics import ProgressBar
from ...runtime import EXIT_STOPPED, log0, signal_name
from .protocol import (COMM, COMPUTE, CORRECT, COUNT, END, FLAG, HB, KIND, LOSS, SENT, SKIPPED, SNAP, SNAPFULL,
                       TAG_REQ, TAG_SNAP, Buf, bytes_per_step)
from .server import Server


class Rank0(Server):
    def __init__(self, ps):
        super().__init__(ps)
        workers = range(self.S, self.size)
        self.win = [0.0, 0, 0]  # loss sum, correct, samples since the last epoch line
        self.samples = 0
        self.latest = {w: {"sent": 0.0, "compute": 0.0, "comm": 0.0, "data": 0.0, "skipped": 0} for w in workers}
        self.server_sent = {s: 0.0 for s in range(1, self.S)}
        self.bar = ProgressBar(ps.epoch_updates, epochs=self.run.cfg.train.epochs, rank=self.rank)

    def serve(self) -> None:
        super().serve()
        if self.S > 1:
            self.ps.sent_bytes += HB * (self.S - 1)
            end = Buf(0, self.ps.dtype)
            end.hdr[KIND] = END
            self.wait.sends([self.pcomm.Isend(end.msg(), dest=s, tag=TAG_REQ) for s in range(1, self.S)],
                            "the END message")

    def _closing(self) -> None:
        self.bar.close()

    # ------------------------------------------------------------- progress
    def _account(self, w, h, push=True):
        lw = self.latest[w]
        lw.update(sent=float(h[SENT]), compute=float(h[COMPUTE]), comm=float(h[COMM]), skipped=int(h[SKIPPED]))
        if not push:
            lw["data"] = float(h[COUNT])  # DONE: COUNT carries the data timer
            return
        ok = not h[FLAG]
        self.win[0] += float(h[LOSS]) if ok else 0.0
        self.win[1] += int(h[CORRECT]) if ok else 0
        self.win[2] += int(h[COUNT]) if ok else 0
        self.samples += int(h[COUNT])
        e = self.ps.epoch_updates
        k = max(self.u - 1, 0) // e  # 0-based epoch of the newest update
        self.bar.update(self.u - k * e, epoch=k + 1, loss=self.win[0] / max(self.win[2], 1),
                        accuracy=self.win[1] / max(self.win[2], 1), samples=int(h[COUNT]),
                        comm_fraction=self._comm_fraction())
        if self.u % e == 0 and ok and self.u < self.ps.total_updates:
            self._epoch_end(self.u // e)

    def _comm_fraction(self):
        comm = sum(v["comm"] for v in self.latest.values())
        busy = comm + sum(v["compute"] for v in self.latest.values())
        return comm / busy if busy > 0 else 0.0

    def _bytes_so_far(self):
        return self.ps.sent_bytes + sum(self.server_sent.values()) + sum(v["sent"] for v in self.latest.values())

    def _epoch_end(self, k):
        cfg = self.run.cfg
        save = cfg.checkpoint.every > 0 and k % cfg.checkpoint.every == 0
        state = self._snapshot(full=save)
        test = self.ps.evaluate()
        self._epoch_line(k, test)
        if save:
            self.ps.save(state, self._worker_steps())

    def _epoch_line(self, k, test):
        self.bar.clear()
        self.run.results.epoch(k, self.u, self._bytes_so_far(), tuple(self.win), test, self.samples,
                               self._comm_fraction())
        self.win = [0.0, 0, 0]

    def _worker_steps(self):
        return [self.wsteps[w] for w in range(self.S, self.size)]

    # ------------------------------------------------------------- snapshots
    def _full_state(self):
        """Optimizer state vectors of the full length, rank 0's own chunk filled in."""
        ps = self.ps
        n, st = self.run.model.n_params, self.opt.state_dict()
        lo, hi = ps.bounds[0]
        state = {name: np.zeros(n, dtype=ps.dtype) for name in ps.state_names}
        for name in ps.state_names:
            state[name][lo:hi] = st[name]
        return state

    def _snapshot(self, full):
        """The other servers' current chunks (and optimizer state) into the full vectors."""
        ps = self.ps
        state = self._full_state() if full else None
        if self.S == 1:
            return state
        bufs, recvs, reqs = {}, [], []
        ask = Buf(0, ps.dtype)
        ask.hdr[KIND] = SNAPFULL if full else SNAP
        for s in range(1, self.S):
            lo, hi = ps.bounds[s]
            bufs[s] = Buf((hi - lo) * (1 + len(ps.state_names)), ps.dtype)
            recvs.append(self.pcomm.Irecv(bufs[s].msg(), source=s, tag=TAG_SNAP))
            reqs.append(self.pcomm.Isend(ask.msg(), dest=s, tag=TAG_REQ))
            ps.sent_bytes += HB
        self.wait.recvs(recvs, list(range(1, self.S)), "rank 0's snapshot request")
        self.wait.sends(reqs, "a snapshot request")
        for s, b in bufs.items():
            lo, hi = ps.bounds[s]
            m = hi - lo
            self.run.model.params[lo:hi] = b.body[:m]
            self.server_sent[s] = float(b.hdr[SENT])
            if full:
                for i, name in enumerate(ps.state_names, 1):
                    state[name][lo:hi] = b.body[i * m:(i + 1) * m]
        return state

    # ------------------------------------------------------------------- end
    def finish(self, metrics_out) -> int:
        """Gather every chunk, evaluate, checkpoint, metrics; the exit status (told to every rank)."""
        ps, cfg = self.ps, self.run.cfg
        parts = ps.sub.gather((None, None, self.clocks.stats(), self.u, None), root=0)
        state = self._full_state()
        for s in range(1, self.S):
            lo, hi = ps.bounds[s]
            params, sst, _stats, _u, sent = parts[s]
            self.run.model.params[lo:hi] = params
            for name in ps.state_names:
                state[name][lo:hi] = sst[name]
            self.server_sent[s] = sent
        test = ps.evaluate()
        stopped, e, u = self.stopping, ps.epoch_updates, self.u
        if stopped:
            epochs = u // e
        else:
            epochs = max(1, math.ceil(u / e))
            if self.run.results.history and self.run.results.history[-1]["epoch"] >= epochs:
                self.run.results.history.pop()
            self._epoch_line(epochs, test)
        path = ps.save(state, self._worker_steps()) if cfg.checkpoint.every > 0 or stopped else None
        metrics = self._metrics(parts, test, epochs, stopped)
        self.run.results.write(metrics_out, metrics)
        if stopped:
            name = signal_name(stopped)
            log0(f"stopped by signal {name} at epoch {epochs + 1}, update {u}; checkpoint written to {path}; "
                 "resume with --resume")
            return self.wait.final_status(self.pcomm, EXIT_STOPPED)
        skipped = metrics["nonfinite_skipped"]
        note = f" ({skipped} non-finite step(s) skipped)" if skipped else ""
        log0(f"done: test accuracy {test[1]:.4f}, {u} updates ({ps.W} worker(s), "
             f"max gap {metrics['ps']['max_gap']} <= {cfg.comm.max_staleness}) in {self.run.results.elapsed():.1f} s"
             f"{note}")
        return self.wait.final_status(self.pcomm, 0)

    def _metrics(self, parts, test, epochs, stopped) -> dict:
        ps, cfg = self.ps, self.run.cfg
        stats = [p[2] for p in parts]
        lat = self.latest.values()
        comm_s, compute_s = sum(v["comm"] for v in lat), sum(v["compute"] for v in lat)
        gaps = Counter()
        for s in stats:
            gaps.update(s["gap_counts"])
        info = {"servers": self.S, "workers": ps.W, "max_staleness": cfg.comm.max_staleness,
                "max_gap": max(s["max_gap"] for s in stats),
                "gap_counts": {str(k): v for k, v in sorted(gaps.items())},
                "pulls": sum(s["pulls"] for s in stats), "held_pulls": sum(s["held_pulls"] for s in stats),
                "updates_per_server": [p[3] for p in parts], "worker_steps": self._worker_steps(),
                "steps_per_epoch": ps.spe,
                "model_bytes_per_step": bytes_per_step(self.run.model.n_params, ps.dtype.itemsize, self.S)}
        return self.run.results.metrics(
            test=test, epochs=epochs, steps=self.u, ranks=self.size, samples=self.samples,
            comm_fraction=comm_s / (comm_s + compute_s) if comm_s + compute_s > 0 else 0.0,
            timers={"compute": compute_s, "comm": comm_s, "data": sum(v["data"] for v in lat)},
            skipped=sum(v["skipped"] for v in lat), algorithm="ps", backend=cfg.train.backend, stopped=stopped,
            strategy=ps.label, comm_bytes=self._bytes_so_far(), steps_done=self.u - ps.u0, bytes_divisor=1,
            optimizer_bytes=self.run.optimizer_bytes(), ps=info)

