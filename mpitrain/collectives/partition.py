"""Split n elements into p contiguous chunks (pure, no MPI).

    n = 10, p = 4        sizes 3 3 2 2         the first n % p chunks get one extra
    |0 1 2|3 4 5|6 7|8 9|

Every chunk size is n // p or n // p + 1, the chunks cover [0, n) without
overlap, in order. Chunks may be empty when n < p.
"""

from __future__ import annotations


def chunk_bounds(n: int, p: int, i: int) -> tuple[int, int]:
    """[lo, hi) of chunk ``i`` of ``p`` over ``n`` elements."""
    if p <= 0:
        raise ValueError(f"need at least one chunk, got p={p}")
    if n < 0:
        raise ValueError(f"negative length n={n}")
    if not 0 <= i < p:
        raise IndexError(f"chunk {i} out of range for p={p}")
    q, r = divmod(n, p)
    lo = i * q + min(i, r)
    return lo, lo + q + (1 if i < r else 0)


def partition(n: int, p: int) -> list[tuple[int, int]]:
    """All ``p`` chunks of ``n`` elements as [lo, hi) pairs."""
    return [chunk_bounds(n, p, i) for i in range(p)]


def segments(lo: int, hi: int, seg: int) -> list[tuple[int, int]]:
    """Cut [lo, hi) into pieces of at most ``seg`` elements (none when empty)."""
    if seg <= 0:
        raise ValueError(f"segment size must be positive, got {seg}")
    return [(a, min(a + seg, hi)) for a in range(lo, hi, seg)]
