"""Which blocks each pipeline stage holds: contiguous, balanced by compute.

    blocks   0 1 2 3 4 5 6 7      costs: every block c_b (the GPT's blocks are alike); stage 0 also
    stages  [0 1 2][3 4 5][6 7]          pays the embedding c_e, the last stage the head + loss c_h
                                          (6·V·C per token: 0.1-0.5 of a block for small models)

The split minimises the slowest stage's cost (the pipeline's step time is set by it) over every
contiguous split with at least one block per stage: a small dynamic programme, O(pp · L²). Ties go
to the split that gives the later stages fewer blocks (the last stage also holds the head).
"""

from __future__ import annotations

from functools import lru_cache


def split_blocks(n_layer: int, pp: int, block: float = 1.0, first: float = 0.0,
                 last: float = 0.0) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]`` per stage: contiguous, >= 1 block each, the slowest stage as fast as it can be."""
    if not 1 <= pp <= n_layer:
        raise ValueError(f"{pp} stage(s) for {n_layer} block(s): need 1 <= pp <= n_layer")

    def cost(s, lo, hi):
        return (hi - lo) * block + (first if s == 0 else 0.0) + (last if s == pp - 1 else 0.0)

    @lru_cache(maxsize=None)
    def best(s, lo):
        """(slowest cost, cuts) for stages s.. over blocks lo..n_layer."""
        if s == pp - 1:
            return cost(s, lo, n_layer), (n_layer,)
        out = None
        for hi in range(lo + 1, n_layer - (pp - 1 - s) + 1):
            rest, cuts = best(s + 1, hi)
            c = max(cost(s, lo, hi), rest)
            if out is None or c < out[0] or (c == out[0] and hi > out[1][0]):
                out = (c, (hi, *cuts))
        return out

    cuts = (0, *best(0, 0)[1])
    return [(cuts[i], cuts[i + 1]) for i in range(pp)]


def stage_costs(splits, block: float, first: float, last: float) -> list[float]:
    pp = len(splits)
    return [(hi - lo) * block + (first if s == 0 else 0.0) + (last if s == pp - 1 else 0.0)
            for s, (lo, hi) in enumerate(splits)]
