"""The alpha-beta-gamma formulas of the all-reduce algorithms, and the measured tables they interpolate.

    p ranks, n bytes, L = ceil(log2 p), s = ring segments per chunk (ring.segment_bytes)

    alpha   seconds per message (latency; for our algorithms: MPI + Python per step)
    beta    seconds per byte moved
    gamma   seconds per byte reduced (np.add(a, b, out=a))

    ring    2(p-1)·s·alpha_r + 2(p-1)/p·n·beta_r + (p-1)/p·n·gamma
    tree    2L·(alpha_t + n·beta_t) + L·n·gamma

            each may have up to MAX_KNEES knees K: past one (n > K) another (alpha, beta)
            applies -- the buffers no longer fit in a cache level, or the MPI library
            changes protocol; a knee is fitted only where it explains the measurements
            clearly better
    native  the MPI library switches algorithms inside: a piecewise model of its own,
            log-log interpolation of its measured times' lower envelope (non-decreasing
            in n: a size measured slower than a larger one was disturbed)
    shm     2·alpha_m + (2 + 4c)·n·beta_m + (p-1)/p·n·gamma     (one node, shared memory: no messages;
            alpha_m a node barrier, beta_m per byte read or written; c = 1 when the buffer is not
            alloc_shared's and is copied into the scratch window and out, 0 zero-copy)
    fused   auto's small path (n <= SMALL_BYTES): one Allgather of p·(48 + 4096) B,
            then (p-1)·n·gamma locally -- a constant c_f + (p-1)·n·gamma

Pure arithmetic: fit.py fits the parameters, model.py holds them (CostModel), extrapolate.py
carries them to many ranks on many hosts.
"""

from __future__ import annotations

import math

from ..collectives.ring import segment_bytes


def log2ceil(p: int) -> int:
    return max(0, (int(p) - 1).bit_length())


def ring_segments(nbytes: int, p: int) -> int:
    """Segments per ring chunk for a message of ``nbytes`` on ``p`` ranks (as ring.py cuts them)."""
    chunk = -(-int(nbytes) // p)
    seg = max(1, int(segment_bytes(int(nbytes), p)))
    return max(1, -(-chunk // seg))


# --------------------------------------------------------------------------- the formulas


def ring_time(n, p, alpha, beta, gamma, segments=1) -> float:
    """2(p-1)·s·alpha + 2(p-1)/p·n·beta + (p-1)/p·n·gamma."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * segments * alpha + 2 * (p - 1) / p * n * beta + (p - 1) / p * n * gamma


def tree_time(n, p, alpha, beta, gamma) -> float:
    """2L·(alpha + n·beta) + L·n·gamma."""
    L = log2ceil(p)
    return 2 * L * (alpha + n * beta) + L * n * gamma


def shm_time(n, p, alpha, beta, gamma, scratch: bool = False) -> float:
    """2·alpha + (2 + 4·scratch)·n·beta + (p-1)/p·n·gamma (collectives/shm.py)."""
    if p <= 1:
        return 0.0
    return 2 * alpha + (2 + 4 * bool(scratch)) * n * beta + (p - 1) / p * n * gamma


def regime(d: dict, n: int):
    """The (alpha, beta) of ``d`` that apply to ``n`` bytes: past knees[i], above[i]."""
    a, b = d["alpha"], d["beta"]
    for K, ab in zip(d.get("knees", ()), d.get("above", ())):
        if n <= K:
            break
        a, b = ab
    return a, b


def formula(kind: str, n: int, p: int, d: dict, gamma: float) -> float:
    """Predicted seconds of ring, tree or shm (zero-copy) for ``n`` bytes with the parameters ``d``."""
    a, b = regime(d, n)
    if kind == "shm":
        return shm_time(n, p, a, b, gamma)
    if kind == "ring":
        return ring_time(n, p, a, b, gamma, ring_segments(n, p))
    return tree_time(n, p, a, b, gamma)


# --------------------------------------------------------------------------- measured tables


def piecewise_time(table, n) -> float:
    """Log-log interpolation in ``table``; constant below it, proportional to n above it."""
    if not table:
        return math.inf
    if n <= table[0][0]:
        return table[0][1]
    if n >= table[-1][0]:
        return table[-1][1] * n / table[-1][0]
    return _loglog(table, n)


def _loglog(table, n) -> float:
    """Log-log interpolation between the two rows of ``table`` around n (table[0][0] < n < table[-1][0])."""
    lo, hi = 0, len(table) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if table[mid][0] <= n:
            lo = mid
        else:
            hi = mid
    (n0, t0), (n1, t1) = table[lo], table[hi]
    if n == n0:
        return t0
    f = (math.log(n) - math.log(n0)) / (math.log(n1) - math.log(n0))
    return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0)))


def link_table(sizes, times) -> list | None:
    """A measured link table [[n, t], ...] (sorted by n, n > 0, t > 0; a repeated size keeps its
    fastest time) for ``table_time``, or None with fewer than two usable sizes. The times are kept
    as measured (no envelope): ``table_time`` is exact at every measured size."""
    pts = {}
    for n, t in zip(sizes or (), times or ()):
        n, t = float(n), float(t)
        if n > 0 and t > 0 and math.isfinite(n) and math.isfinite(t):
            pts[int(n)] = min(t, pts.get(int(n), math.inf))
    return [[n, pts[n]] for n in sorted(pts)] if len(pts) >= 2 else None


def table_time(table, n, beta) -> float:
    """Seconds of one message of ``n`` bytes (may be fractional) on a link with a measured ``table``
    (``link_table``): log-log interpolation between the two measured sizes around n (exact at
    them, monotone between them); outside the measured range a straight line of slope ``beta``
    (the link's fitted alpha + n·beta) through the nearest end point, so there is no jump at
    the edge."""
    n0, t0 = table[0]
    if n <= n0:
        return max(0.0, t0 - (n0 - n) * beta)
    n1, t1 = table[-1]
    if n >= n1:
        return t1 + (n - n1) * beta
    return _loglog(table, n)
