"""What the loop does when something is off: signals, non-finite gradients, clipping.

    SIGUSR1 / SIGTERM  -> StopFlag.signum; the ranks agree on it at the next step boundary
                          (one MAX all-reduce), write a checkpoint and exit 75
    non-finite grads   -> train.nonfinite = "error": a UserError naming the ranks whose loss was
                          non-finite; "skip": the step is skipped and counted
    clipping           -> train.clip_value, then train.clip_norm (after the gradients agree,
                          so every rank scales alike)

The global norm is canonical, the same arithmetic in every layout: each tensor cut into blocks of
64 Ki elements (``NORM_BLOCK``, counted from the tensor's start); each block's sum of squares in
float64 over a fresh copy (so the tensor's place in a buffer cannot change it), the blocks' sums
added in order into the tensor's; then the tensors' sums added in the whole model's tensor order, a
tensor two pipeline stages hold (a tied wte) once. A pipeline stage sends its tensors' sums to the
others of its replica (one small allgather). Sharded gradients (ZeRO, ``shard_tensor_sums``): a rank
sums the blocks that lie whole in its shard and sends the pieces of the blocks its shard cuts (at
most two per shard piece, each < 64 Ki elements) to the one rank that sums that block -- the same
bits as one rank holding the whole gradient. (Buckets much smaller than 64 Ki elements x ranks cut
most blocks: then about the shard's bytes travel once more per step, only when clipping.)
Non-finite gradients: with a pipeline the stages of a replica agree on the flag (one all-reduce)
before any of them skips, so a NaN on one stage never leaves the others waiting.
"""

from __future__ import annotations

import math
import signal

import numpy as np

from .. import watchdog
from ..optim import clip_by_global_norm, clip_by_value
from ..runtime import UserError, log0

_HINT = ("Lower train.lr, set train.clip_norm, check the data (python -m mpitrain data check), or set "
         "train.nonfinite=\"skip\"")


def sum_in_order(values) -> float:
    """A left-to-right float sum (the canonical order: never a pairwise or compensated one)."""
    total = 0.0
    for v in values:
        total += v
    return total


NORM_BLOCK = 1 << 16  # elements per block of the canonical norm (the docstring)


def _sq(xp, t) -> float:
    t = t.astype(xp.float64)
    return float((t * t).sum())


def tensor_sq(xp, flat) -> float:
    """The canonical sum of squares of one tensor (``flat``): its blocks' float64 sums, added in order."""
    total = 0.0
    for a in range(0, flat.size, NORM_BLOCK):
        total += _sq(xp, flat[a:a + NORM_BLOCK])
    return total


def _blocks(tensors):
    """``[(lo, hi, name, j)]``: every norm block of every tensor, in buffer order."""
    out = []
    for name, off, shape in sorted(tensors, key=lambda t: t[1]):
        n = math.prod(shape)
        out += [(off + a, off + min(a + NORM_BLOCK, n), name, j) for j, a in enumerate(range(0, n, NORM_BLOCK))]
    return out


def _merged(pieces):
    """``[(lo, hi, offset in the shard)]`` with adjacent pieces joined (one rank: a single range)."""
    out, so = [], 0
    for lo, hi in pieces:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi, out[-1][2])
        else:
            out.append((lo, hi, so))
        so += hi - lo
    return out


def shard_tensor_sums(xp, tensors, pieces, shard, comm) -> dict:
    """``{name: canonical sum of squares}`` of a gradient sharded over ``comm`` (the same on every rank):
    this rank holds ``pieces`` ([lo, hi) of the flat buffer) concatenated in ``shard``. A block that lies
    whole in this rank's pieces is summed here; the pieces of a block cut between ranks go to one rank
    (block number mod p: one alltoall), which puts them together and sums them; the sums are allgathered."""
    import bisect

    from .. import backend

    blocks = _blocks(tensors)
    starts, p = [b[0] for b in blocks], comm.Get_size()
    whole, parts = {}, [{} for _ in range(p)]
    for plo, phi, so in _merged(pieces):
        i = max(bisect.bisect_right(starts, plo) - 1, 0)
        while i < len(blocks) and blocks[i][0] < phi:
            lo, hi, name, j = blocks[i]
            s, e = max(lo, plo), min(hi, phi)
            if e > s:
                view = shard[so + s - plo:so + e - plo]
                if (s, e) == (lo, hi):
                    whole[(name, j)] = _sq(xp, view)
                else:
                    parts[i % p].setdefault(i, []).append((s, backend.to_numpy(view)))
            i += 1
    cut = {}
    for got in comm.alltoall(parts):
        for i, ps in got.items():
            cut.setdefault(i, []).extend(ps)
    for i, ps in cut.items():
        ps.sort(key=lambda t: t[0])
        whole[blocks[i][2:]] = _sq(xp, xp.asarray(np.concatenate([a for _, a in ps])))
    sums = {}
    for w in comm.allgather(whole):
        sums.update(w)
    out = {}
    for lo, hi, name, j in blocks:
        out[name] = out.get(name, 0.0) + sums[(name, j)]
    return out


class StopFlag:
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
        self._old.clear()


class GradPolicy:
    """The non-finite policy and clipping of ``[train]``, the same for every strategy."""

    def __init__(self, train_cfg, comm):
        self.t, self.comm = train_cfg, comm
        self.skipped = 0
        self.model = self.group = None

    def bind(self, model, group=None) -> None:
        """The model whose tensors the norm walks; ``group``: the other pipeline stages of this replica."""
        self.model, self.group = model, group

    def clip(self, grads) -> None:
        if self.t.clip_value > 0:
            clip_by_value(grads, self.t.clip_value)
        if self.t.clip_norm > 0:
            if self.model is None or grads is not self.model.grads:
                clip_by_global_norm(grads, self.t.clip_norm)
                return
            norm = self.grad_norm(grads)
            if math.isfinite(norm) and norm > self.t.clip_norm:
                grads *= self.t.clip_norm / norm

    def grad_norm(self, grads) -> float:
        """The canonical global norm of the model's gradient ``grads`` (the module docstring). A tensor split
        over tensor-parallel ranks adds its slices' sums in tp-rank order (equal to tolerance, not bitwise)."""
        m, xp = self.model, self.model.xp
        sq = {name: tensor_sq(xp, grads[off:off + math.prod(shape)]) for name, off, shape in m.tensors()}
        return self._total(sq)

    def clip_shard(self, shard, pieces, comm) -> None:
        """Clip this rank's ``shard`` (the ``pieces`` [lo, hi) of the gradient, concatenated) of a
        gradient sharded over ``comm``: every rank scales by the canonical norm of the whole."""
        if self.t.clip_value > 0:
            clip_by_value(shard, self.t.clip_value)
        if self.t.clip_norm > 0:
            norm = self._total(shard_tensor_sums(self.model.xp, self.model.tensors(), pieces, shard, comm))
            if math.isfinite(norm) and norm > self.t.clip_norm:
                shard *= self.t.clip_norm / norm

    def _total(self, sq: dict) -> float:
        """The model-parallel parts' tensor sums (``sq``: this part's) added in the full model's order."""
        m = self.model
        order = m.full_tensors() if hasattr(m, "full_tensors") else m.tensors()
        if self.group is None:
            return math.sqrt(sum_in_order(sq[name] for name, _, _ in order))
        sliced = getattr(m, "shard_index", lambda name, tp_rank=None: None)
        tp_rank = getattr(getattr(m, "tp", None), "rank", 0)
        every = sorted(self.group.allgather((tp_rank, sq)), key=lambda e: e[0])
        total = []
        for name, _, _ in order:
            parts = [d[name] for _, d in every if name in d]
            total.append(sum_in_order(parts) if sliced(name) is not None else parts[0])
        return math.sqrt(sum_in_order(total))

    def finite(self, grads, loss: float, step: int, epoch: int, collective: bool) -> bool:
        """Are the gradients finite (on every stage of the replica)? If not: the non-finite policy."""
        ok = bool(self.model.xp.isfinite(grads).all()) if self.model is not None else bool(np.isfinite(grads).all())
        if self.group is not None:
            from mpi4py import MPI

            ok = bool(self.group.allreduce(int(ok), op=MPI.MIN))
        if not ok:
            self.nonfinite(loss, step, epoch, collective=collective)
        return ok

    def nonfinite(self, loss: float, step: int, epoch: int, collective: bool, where: str = "") -> None:
        """A non-finite gradient: count a skip, or raise. ``collective``: every rank sees the same
        gradients and calls this alike (one allgather says whose loss was non-finite)."""
        if collective:
            bad = self.comm.allgather(not math.isfinite(loss))
            who = [r for r, b in enumerate(bad) if b]
            what = (f"local loss non-finite on rank(s) {who}" if who else
                    "every rank's loss was finite: it arose in the backward pass")
        else:
            what = f"{where or 'this rank'}'s own gradient; local loss {loss}"
        if self.t.nonfinite == "skip":
            self.skipped += 1
            if collective:
                log0(f"step {step}: non-finite gradient ({what}); step skipped ({self.skipped} so far)")
            return
        err = UserError(f"non-finite gradient at step {step} (epoch {epoch + 1}; {what}). {_HINT}")
        err.rank_local = not collective  # only this rank knows: report at once (runtime.defer_to_rank0)
        raise err
