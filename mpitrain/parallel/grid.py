"""The process grid: every rank's place in data x pipeline x tensor parallelism, and its groups.

    global rank g = (pp_rank · dp + dp_rank) · tp + tp_rank          tp innermost, pp outermost

    8 ranks, tp = 2, pp = 2, dp = 2:       pp stage 0            pp stage 1
                                        dp 0      dp 1        dp 0      dp 1
                                       [0, 1]    [2, 3]      [4, 5]    [6, 7]     <- tp groups
    dp groups (same stage, same tp slot): {0, 2} {1, 3} {4, 6} {5, 7}
    pp groups (one replica's stages):     {0, 4} {1, 5} {2, 6} {3, 7}
    model-parallel group (one replica):   {0, 1, 4, 5} {2, 3, 6, 7}

Consecutive ranks share a node under mpirun's default (block) placement, so a tp group -- the
chattiest, two all-reduces per block -- stays on one node; dp groups come next; pipeline neighbours,
which exchange one (B, T, C) activation per micro-batch, may cross nodes (Megatron-LM's order).
Every group is an ``MPI.Comm.Split`` of the run's communicator (so its tags are the library's own).
With tp = pp = 1 the dp group *is* the run's communicator (no split: nothing changes for data
parallelism).
"""

from __future__ import annotations

from ..runtime import UserError


class Grid:
    """``Grid(comm, tp, pp)``: collective over ``comm``; raises UserError when tp·pp does not divide it."""

    def __init__(self, comm, tp: int = 1, pp: int = 1):
        size, rank = comm.Get_size(), comm.Get_rank()
        tp, pp = int(tp), int(pp)
        if tp < 1 or pp < 1 or size % (tp * pp):
            raise UserError(f"parallel.tp = {tp} x parallel.pp = {pp} = {tp * pp} does not divide the {size} "
                            f"rank(s) of this job; run a multiple of {tp * pp} ranks (mpirun -n "
                            f"{tp * pp * max(1, size // (tp * pp))}) or change parallel.tp / parallel.pp")
        self.comm, self.size, self.rank = comm, size, rank
        self.tp, self.pp, self.dp = tp, pp, size // (tp * pp)
        self.tp_rank, self.dp_rank, self.pp_rank = self.coords(rank)
        if tp * pp == 1:
            self.dp_comm, self.tp_comm, self.pp_comm, self.mp_comm = comm, None, None, None
        else:
            self.tp_comm = comm.Split(self.pp_rank * self.dp + self.dp_rank, rank)
            self.dp_comm = comm.Split(self.pp_rank * tp + self.tp_rank, rank)
            self.pp_comm = comm.Split(self.dp_rank * tp + self.tp_rank, rank)
            self.mp_comm = comm.Split(self.dp_rank, rank)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """Global ``rank`` -> (tp_rank, dp_rank, pp_rank)."""
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def rank_of(self, dp: int = 0, pp: int = 0, tp: int = 0) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    @property
    def first(self) -> bool:
        return self.pp_rank == 0

    @property
    def last(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return f"{self.size} rank(s) = dp {self.dp} x pp {self.pp} x tp {self.tp}"

    def table(self, stages=None) -> list[str]:
        """One line per pipeline stage: which global ranks hold it (per dp replica and tp slot)."""
        lines = []
        for s in range(self.pp):
            what = f" {stages[s]}" if stages else ""
            reps = "; ".join(f"dp {d}: " + ",".join(str(self.rank_of(d, s, t)) for t in range(self.tp))
                             for d in range(self.dp))
            lines.append(f"  stage {s}{what}: ranks {reps}")
        return lines

    def free(self) -> None:
        for c in (self.tp_comm, self.pp_comm, self.mp_comm):
            if c is not None:
                c.Free()
        if self.dp_comm is not self.comm and self.dp_comm is not None:
            self.dp_comm.Free()
        self.tp_comm = self.pp_comm = self.mp_comm = None
        self.dp_comm = self.comm
