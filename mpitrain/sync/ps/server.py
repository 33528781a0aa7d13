"""A parameter server: applies pushes in arrival order, answers pulls within the staleness bound.

    loop until every worker is DONE (servers > 0: and rank 0 said END):
        Recv_init(ANY_SOURCE, TAG_REQ) ... Test + nap (never blocking inside MPI)
        PUSH  clock[w] += 1; opt.step(grads chunk) at once        (rank 0 also keeps the progress)
        PULL  held until clock[w] - slowest <= max_staleness, then PARAMS reply (Isend)
        DONE  w leaves the staleness minimum
        SNAP/SNAPFULL (from rank 0): this chunk (+ optimizer state) --TAG_SNAP--> rank 0
    between messages (_idle): a signal answers every pull with a stop flag; comm.timeout_s names
    silent workers
"""

from __future__ import annotations

import time

from mpi4py import MPI

from ...runtime import UserError
from .clocks import Clocks
from .protocol import (DONE, END, FLAG, HB, KIND, PARAMS, PULL, PUSH, SENT, SNAP, SNAPFULL, SNAPSHOT, STEP, COUNT,
                       TAG_REQ, TAG_REPLY, TAG_SNAP, Buf, rank_local)


class Server:
    def __init__(self, ps):
        self.ps, self.run = ps, ps.run
        self.rank, self.S, self.size = ps.rank, ps.S, ps.size
        self.pcomm, self.wait = ps.pcomm, ps.waiter
        self.opt, self.shard, self.schedule = ps.opt, ps.shard, ps.schedule
        self.T, self.g = ps.T, ps.g
        workers = range(self.S, self.size)
        m = self.shard.size
        self.clocks = Clocks(workers, self.run.cfg.comm.max_staleness)
        self.inbox = Buf(m, ps.dtype)
        self.replies = {w: Buf(m, ps.dtype) for w in workers}
        self.reply_reqs = {}
        self.snap_buf = Buf(m * (1 + len(ps.state_names)), ps.dtype)
        self.snap_req = []
        self.stopping = 0
        self.ended = self.rank == 0  # servers > 0 wait for rank 0's END
        self.all_done_at = None
        now = time.monotonic()
        self.heard = dict.fromkeys(workers, now)
        self.wsteps = {w: ps.worker_start[w - self.S] for w in workers}  # steps each worker has done
        self.last_check = now
        self.limit = (self.T if self.rank == 0 else self.T + self.g) if self.T > 0 else 0.0

    @property
    def u(self) -> int:
        return self.ps.u

    # -------------------------------------------------------------- the loop
    def serve(self) -> None:
        status = MPI.Status()
        req = self.pcomm.Recv_init(self.inbox.msg(), source=MPI.ANY_SOURCE, tag=TAG_REQ)
        try:
            while not (self.clocks.all_done and self.ended):
                req.Start()
                self.wait.wait(lambda: req.Test(status), idle=self._idle)
                self._handle(status.Get_source(), status.Get_count(MPI.BYTE))
                for w, _gap in self.clocks.release(force=bool(self.stopping)):
                    self._reply(w)
                self._idle()  # also when messages never stop coming
        finally:
            self._closing()
            req.Free()
        for r in self.reply_reqs.values():
            self.wait.sends([r], "a parameter reply")
        self.wait.sends(self.snap_req, "a snapshot")

    def finish(self, metrics_out) -> int:
        """After the loop: send this chunk and its optimizer state to rank 0; the exit status."""
        ps = self.ps
        st = self.opt.state_dict()
        ps.sent_bytes += self.shard.nbytes * (1 + len(ps.state_names))
        mine = (self.shard.copy(), {k: st[k] for k in ps.state_names}, self.clocks.stats(), self.u, ps.sent_bytes)
        ps.sub.gather(mine, root=0)  # pickled: a few arrays, once
        return self.wait.final_status(self.pcomm)

    def _closing(self) -> None:
        pass

    def _account(self, w, h, push=True) -> None:
        pass  # rank 0 keeps the progress (rank0.py)

    def _hint(self) -> str:
        return self.run.resume_hint()

    # ------------------------------------------------------------ messages
    def _handle(self, src, nbytes):
        h = self.inbox.hdr
        kind = int(h[KIND])
        self.heard[src] = time.monotonic()
        if kind == PUSH:
            self._push(src, h, nbytes)
        elif kind == PULL:
            self.clocks.pull(src)
        elif kind == DONE:
            self.clocks.finish(src)
            self.wsteps[src] = int(h[STEP])
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

    def _push(self, src, h, nbytes):
        self.clocks.push(src)
        self.wsteps[src] = int(h[STEP]) + 1
        if not h[FLAG]:  # a skipped (non-finite) step advances the clock only
            if nbytes != len(self.inbox.raw):
                raise RuntimeError(f"push from rank {src}: {nbytes} bytes, expected {len(self.inbox.raw)}")
            if self.run.faults:
                self.run.faults.at(self.u)
            self.opt.step(self.inbox.body, self.schedule(self.u))
            self.ps.u += 1
        self._account(src, h)

    def _reply(self, w):
        if w in self.reply_reqs:  # the worker received the last one before it asked again
            self.wait.sends([self.reply_reqs.pop(w)], f"the parameter reply to rank {w}")
        b = self.replies[w]
        b.hdr[:] = 0.0
        b.hdr[KIND], b.hdr[STEP], b.hdr[FLAG] = PARAMS, self.u, self.stopping
        b.body[...] = self.shard
        self.ps.sent_bytes += len(b.raw)
        self.reply_reqs[w] = self.pcomm.Isend(b.msg(), dest=w, tag=TAG_REPLY)

    def _snap_reply(self, full):
        ps = self.ps
        self.wait.sends(self.snap_req, "a snapshot")
        b, m = self.snap_buf, self.shard.size
        b.body[:m] = self.shard
        nbytes = HB + m * ps.dtype.itemsize
        if full:
            st = self.opt.state_dict()
            for i, name in enumerate(ps.state_names, 1):
                b.body[i * m:(i + 1) * m] = st[name]
            nbytes = len(b.raw)
            b.hdr[COUNT] = st["step"]
        ps.sent_bytes += nbytes
        b.hdr[KIND], b.hdr[STEP], b.hdr[SENT] = SNAPSHOT, self.u, ps.sent_bytes
        self.snap_req.append(self.pcomm.Isend(b.msg(nbytes), dest=0, tag=TAG_SNAP))

    # ------------------------------------------------------------ watchdog
    def _idle(self):
        """Between messages: notice a signal; with comm.timeout_s, name workers that went silent."""
        if self.run.stop.signum and not self.stopping:
            self.stopping = self.run.stop.signum
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
                raise rank_local(UserError(
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
            raise rank_local(UserError(
                f"watchdog (parameter server): worker rank(s) {silent} sent this server nothing for "
                f"{now - self.heard[w]:.1f} s (comm.timeout_s={self.T:g} s{extra}; rank {w} has done "
                f"{self.wsteps[w]} step(s)); it is stuck or dead, or waits for a rank that "
                "is. Look at that rank (e.g. `py-spy dump --pid PID`), or raise comm.timeout_s if a step can "
                f"legitimately take that long. Aborting the job{self._hint()}"))
