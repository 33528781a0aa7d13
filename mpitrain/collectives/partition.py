"""Split n elements into p contiguous chunks (pure, no MPI).

    n = 10, p = 4        sizes 3 3 2 2         the first n % p chunks get one extra
    |0 1 2|3 4 5|6 7|8 9|

Every chunk size is n // p or n // p + 1, the chunks cover [0, n) without
overlap, in order. Chunks may be empty when n < p.

Every function here and every (n, p, rank) function built on them (ring.owned, ring.plan,
scatter.owned_chunk) validates with ``checked``: integers, n >= 0, p >= 1, 0 <= i < p -- a rank
outside the communicator is an error, never wrapped round modulo p into another rank's chunk.
"""

from __future__ import annotations

import operator


class ChunkIndexError(IndexError, ValueError):
    """A chunk or rank index outside 0..p-1 (an IndexError, and a ValueError like the other bad arguments)."""


def _integer(name: str, v) -> int:
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {v!r}") from None


def checked(n, p, i, what: str = "chunk") -> tuple[int, int, int]:
    """(n, p, i) as ints; ValueError unless n >= 0 and p >= 1, ChunkIndexError unless 0 <= i < p."""
    n, p, i = _integer("n", n), _integer("p", p), _integer(what, i)
    if p <= 0:
        raise ValueError(f"need at least one chunk, got p={p}")
    if n < 0:
        raise ValueError(f"negative length n={n}")
    if not 0 <= i < p:
        raise ChunkIndexError(f"{what} {i} out of range for p={p} (use 0..{p - 1})")
    return n, p, i


def chunk_bounds(n: int, p: int, i: int) -> tuple[int, int]:
    """[lo, hi) of chunk ``i`` of ``p`` over ``n`` elements."""
    n, p, i = checked(n, p, i)
    q, r = divmod(n, p)
    lo = i * q + min(i, r)
    return lo, lo + q + (1 if i < r else 0)


def partition(n: int, p: int) -> list[tuple[int, int]]:
    """All ``p`` chunks of ``n`` elements as [lo, hi) pairs."""
    n, p, _ = checked(n, p, 0)
    return [chunk_bounds(n, p, i) for i in range(p)]


def segments(lo: int, hi: int, seg: int) -> list[tuple[int, int]]:
    """Cut [lo, hi) into pieces of at most ``seg`` elements (none when empty)."""
    lo, hi, seg = _integer("lo", lo), _integer("hi", hi), _integer("seg", seg)
    if seg <= 0:
        raise ValueError(f"segment size must be positive, got {seg}")
    return [(a, min(a + seg, hi)) for a in range(lo, hi, seg)]
