"""A parameter-server worker: pull every server's chunk, compute a gradient, push it, repeat.

    PULL hdr --TAG_REQ--> every server;  params chunks <--TAG_REPLY-- (as fresh as the staleness allows)
    forward/backward, non-finite policy, clip (the full gradient is here)
    PUSH hdr + grads[lo_s:hi_s] --TAG_REQ--> server s   (Isend, waited for before the next push)
    ... until the data is done or a signal arrives: DONE hdr --TAG_REQ--> every server
"""

from __future__ import annotations

import time

from ... import backend
from .protocol import (COMM, COMPUTE, CORRECT, COUNT, DONE, FLAG, HB, KIND, LOSS, PULL, PUSH, SENT, SKIPPED, STEP,
                       TAG_REPLY, TAG_REQ, Buf)


class Worker:
    def __init__(self, ps):
        self.ps, self.run = ps, ps.run
        self.pcomm, self.bounds, self.S, self.wait = ps.pcomm, ps.bounds, ps.S, ps.waiter
        d = ps.dtype
        self.push_bufs = [Buf(hi - lo, d) for lo, hi in self.bounds]
        self.req_bufs = [Buf(0, d) for _ in self.bounds]
        self.reply_bufs = [Buf(hi - lo, d) for lo, hi in self.bounds]
        self.push_reqs, self.req_reqs = [], []
        self.server_stop = 0  # a server's reply said: stop (a signal reached the job)
        self.step = ps.start_step

    def _stopping(self) -> bool:
        return bool(self.run.stop.signum or self.server_stop or self.run.faults.finished(self.step))

    def work(self) -> int:
        run, t = self.run, self.run.cfg.train
        epoch, start = divmod(self.step, self.ps.spe)
        while epoch < t.epochs and not self._stopping():
            batches = run.data.batches(epoch, start=start)
            start = 0
            while not self._stopping():
                with run.timers("data"):
                    batch = next(batches, None)
                if batch is None:
                    break
                with run.timers("comm"):
                    self._pull()  # every server's chunk, as fresh as the staleness bound allows
                if self.server_stop:
                    break
                self._step(batch, epoch)
                if t.step_sleep:
                    time.sleep(t.step_sleep)
            if not self._stopping():
                epoch += 1
        self._done(run.stop.signum or self.server_stop)
        run.data.close()  # a finished worker holds no files while the others train on
        return self.wait.final_status(self.pcomm)

    def _step(self, batch, epoch):
        run, model, xp = self.run, self.run.model, self.run.xp
        with run.timers("compute"):
            batch = tuple(xp.asarray(a) for a in batch)
            loss, correct = model.loss_and_grad(batch)
        run.faults.at(self.step, model.grads)
        with run.timers("compute"):
            ok = bool(xp.isfinite(model.grads).all())
            if ok:
                run.policy.clip(model.grads)
            else:
                run.policy.nonfinite(loss, self.step, epoch, collective=False, where=f"worker rank {run.rank}")
        with run.timers("comm"):
            self._push(float(loss), int(correct), model.count(batch), skipped=not ok)
        self.step += 1

    def _header(self, h, kind, flag=0.0):
        t = self.run.timers
        h[:] = 0.0
        h[KIND], h[STEP], h[FLAG] = kind, self.step, flag
        h[COMPUTE], h[COMM], h[SKIPPED] = t.total("compute"), t.total("comm"), self.run.policy.skipped

    def _pull(self):
        ps = self.ps
        recvs = [self.pcomm.Irecv(b.msg(), source=s, tag=TAG_REPLY) for s, b in enumerate(self.reply_bufs)]
        self.wait.sends(self.req_reqs, "a pull request")
        ps.sent_bytes += HB * self.S
        for s, b in enumerate(self.req_bufs):
            self._header(b.hdr, PULL)
            b.hdr[SENT] = ps.sent_bytes
            self.req_reqs.append(self.pcomm.Isend(b.msg(), dest=s, tag=TAG_REQ))
        self.wait.recvs(recvs, list(range(self.S)), f"the pull of step {self.step} (worker rank {self.run.rank})")
        for (lo, hi), b in zip(self.bounds, self.reply_bufs):
            self.run.model.params[lo:hi] = self.run.xp.asarray(b.body)
            if b.hdr[FLAG]:
                self.server_stop = int(b.hdr[FLAG])

    def _push(self, loss, correct, count, skipped=False):
        ps = self.ps
        g = backend.to_numpy(self.run.model.grads)
        self.wait.sends(self.push_reqs, "a gradient push")  # long done: the servers answered a pull since
        size = HB if skipped else None
        ps.sent_bytes += sum(HB if skipped else len(b.raw) for b in self.push_bufs)
        for s, ((lo, hi), b) in enumerate(zip(self.bounds, self.push_bufs)):
            self._header(b.hdr, PUSH, flag=1.0 if skipped else 0.0)
            b.hdr[LOSS], b.hdr[CORRECT], b.hdr[COUNT], b.hdr[SENT] = loss * count, correct, count, ps.sent_bytes
            if not skipped:
                b.body[...] = g[lo:hi]
            self.push_reqs.append(self.pcomm.Isend(b.msg(size), dest=s, tag=TAG_REQ))

    def _done(self, signum):
        ps = self.ps
        self.wait.sends(self.push_reqs, "a gradient push")
        self.wait.sends(self.req_reqs, "a pull request")
        ps.sent_bytes += HB * self.S
        for s, b in enumerate(self.req_bufs):
            self._header(b.hdr, DONE, flag=float(signum))
            b.hdr[SENT] = ps.sent_bytes
            b.hdr[COUNT] = self.run.timers.total("data")  # DONE: COUNT carries the data timer
            self.req_reqs.append(self.pcomm.Isend(b.msg(), dest=s, tag=TAG_REQ))
        self.wait.sends(self.req_reqs, "the DONE message")
