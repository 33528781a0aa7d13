"""This rank's share of the model on the process grid: its pipeline part, its tensor-parallel slot and
the collectives the model is handed (the model itself knows no MPI).

    grid (parallel/grid.py) --> part(): the blocks of this pipeline stage (parallel/stages.py, balanced
                                by FLOPs: a block 72·C² + 12·T·C per token, the head 6·V·C + 15·V)
                            --> tp_slot(): TP(size, rank, allreduce[, rows, reduce_scatter, allgather])
                                on the tp group, each call timed and its bytes counted
                            --> log(): which global ranks hold which stage and tp slot
"""

from __future__ import annotations

import time

from ..runtime import log0


class ModelParallel:
    def __init__(self, cfg, grid, xp, vocab_size: int):
        self.cfg, self.grid, self.xp, self.vocab = cfg, grid, xp, int(vocab_size)
        self.splits = [(0, cfg.model.n_layer)]
        self.comm_s = self.bytes = 0.0  # tensor parallelism's collectives: seconds, bytes this rank sent

    # ----------------------------------------------------------------------------- pipeline part
    def part(self):
        """The blocks this rank's pipeline stage holds, or None without a pipeline."""
        pp, m = self.grid.pp, self.cfg.model
        if pp == 1:
            return None
        from ..models.gpt import Part, piece_flops
        from ..parallel.stages import split_blocks

        embed, block, head = piece_flops(m.n_embd, self.vocab, m.block_size)  # (config.py refused pp > n_layer)
        self.splits = split_blocks(m.n_layer, pp, block, embed, head)
        lo, hi = self.splits[self.grid.pp_rank]
        return Part(lo, hi, self.grid.first, self.grid.last)

    def log(self) -> None:
        """Which global ranks hold which stage (and its blocks), per dp replica and tp slot."""
        what = []
        for s, (lo, hi) in enumerate(self.splits):
            extra = (["embeddings"] if s == 0 else []) + [f"blocks {lo}-{hi - 1}"] + (
                ["head"] if s == self.grid.pp - 1 else [])
            what.append("(" + " + ".join(extra) + ")")
        log0("layout (rank = (stage * dp + replica) * tp + tp slot):\n" + "\n".join(self.grid.table(what)))

    # --------------------------------------------------------------------------- tensor parallelism
    def tp_slot(self):
        """This rank's tensor-parallel slot and the collectives handed to the model (None: tp = 1)."""
        g = self.grid
        if g.tp == 1:
            return None
        from ..models.gpt_shard import TP

        if not self.cfg.parallel.sequence:
            return TP(g.tp, g.tp_rank, self.allreduce)
        return TP(g.tp, g.tp_rank, self.allreduce, True, self.rows, self.reduce_scatter, self.allgather)

    def _timed(self, fn, wire_bytes: float):
        t0 = time.perf_counter()
        out = fn()
        self.comm_s += time.perf_counter() - t0
        self.bytes += wire_bytes
        return out

    def allreduce(self, a):
        """Sum ``a`` in place over the tp group with the project's all-reduce (bitwise alike on every tp rank)."""
        from ..collectives import allreduce

        algorithm = self.cfg.comm.algorithm
        if algorithm in ("shm", "hier"):  # (shm reduces node-shared windows; activations are plain memory)
            algorithm = "ring"
        t = self.grid.tp
        return self._timed(lambda: allreduce(a, self.grid.tp_comm, op="sum", algorithm=algorithm),
                           2.0 * (t - 1) / t * a.nbytes)

    def rows(self, N: int) -> tuple[int, int]:
        """This tp rank's rows of N (sequence parallelism): the ring's chunk of the N x C elements."""
        from ..collectives import owned_chunk

        C = self.cfg.model.n_embd
        lo, hi = owned_chunk(N * C, self.grid.tp, self.grid.tp_rank)
        if lo % C or hi % C:
            raise ValueError(f"{N} rows do not split evenly over {self.grid.tp} tp ranks")
        return lo // C, hi // C

    def reduce_scatter(self, a):
        """(N, C) partial sums -> this rank's rows of their sum (a new (N/t, C) array)."""
        from ..collectives import reduce_scatter

        t = self.grid.tp
        chunk = self._timed(lambda: reduce_scatter(a.reshape(-1), self.grid.tp_comm, op="sum", algorithm="ring"),
                            (t - 1) / t * a.nbytes)
        return chunk.reshape(-1, a.shape[1]).copy()

    def allgather(self, a_s, N: int):
        """This rank's rows (N/t, C) -> every rank's (N, C)."""
        from ..collectives import allgather

        whole = self.xp.empty((N, a_s.shape[1]), dtype=a_s.dtype)
        lo, hi = self.rows(N)
        whole[lo:hi] = a_s
        t = self.grid.tp
        return self._timed(lambda: allgather(whole.reshape(-1), self.grid.tp_comm, algorithm="ring"),
                           (t - 1) / t * whole.nbytes).reshape(N, -1)
