"""Fitting the cost model (formulas.py) to measurements: least squares, knees, native's table.

How it is fitted (``python -m mpitrain bench --fit``; ``fit()`` below):

    1. ping-pong rank 0 <-> rank 1 at sizes 8 B .. max      -> alpha, beta   (the wire)
       np.add(a, b, out=a) on rank 0 at sizes 4 KiB .. max   -> gamma         (the reduction)
    2. the bench sweep times ring, tree, native and auto, interleaved, at every size, and a
       second sweep does it again with the sizes largest first; the fit uses, per size and
       algorithm, the lowest of the two lower quartiles of the rounds (max over ranks) --
       other processes only ever add time, and a burst of load rarely hits both passes
    1b. when the job spans more than one node (MPI Split_type SHARED: emulated hosts count), a
       ping-pong between rank 0 and the first rank on another node -> alpha_n, beta_n (the
       network), and one between two ranks on one node, if any -> alpha_s, beta_s (shared
       memory); stored as ``links`` -- what ``bench --model`` (extrapolate.py) extrapolates with.
       Each link is also timed as an *exchange*: the two ranks Sendrecv the same size to each
       other at once (median seconds per exchange, sizes 8 B .. max) -> its own (alpha, beta),
       stored as ``links[type]["exchange"]``. Every ring step and the per-call check's
       Allgather are such simultaneous exchanges, and on a network (or a user-space emulation of
       one) they cost more than a one-way ping-pong -- ~2x on the emulated hosts here. On one node
       the intra link (ranks 0, 1) is timed both ways too. Files without ``exchange`` still load.
    3. gamma fixed from 1., a least-squares fit (relative error, coefficients >= 0) of
       the ring and tree formulas to their measured times gives each its effective
       alpha and beta (and knee) -- they include Python's per-message cost and memory
       contention, which a ping-pong does not see. (Ring and tree's n-terms are both
       multiples of (2·beta + gamma), so gamma cannot come from them.) Native gets its
       piecewise table, fused the median of auto's times at sizes <= SMALL_BYTES; shm (when the
       sweep timed it, on one node) its alpha_m, beta_m the same way as ring's.

Steps 1 and 1b are measure.py (collective), step 2 the bench (bench/fit.py), step 3 this
module: pure functions of the timings.
"""

from __future__ import annotations

import math
import statistics
import time
from itertools import combinations

import numpy as np

from ..collectives import SMALL_BYTES
from .formulas import formula, log2ceil, ring_segments
from .model import CostModel

KNEE_GAIN = 0.7  # a knee is kept only when it cuts the squared relative error to below 70 %
KNEE_MIN_RMS = 0.05  # ... and the fit without it misses by more than 5 % (rms): not just noise
KNEE_SIDE = 3  # sizes needed in each regime
MAX_KNEES = 2  # e.g. the L2 and the last-level cache
DISTURBED = 1.4  # a size where native ran this many times above its lower envelope was disturbed


def lsq_relative(X, y, offset=None):
    """Coefficients c >= 0 minimizing sum(((X c + offset - y) / y)^2) (y > 0).

    Ordinary least squares on rows scaled by 1/y; when a coefficient comes out
    negative, the best fit with it fixed at 0 (all subsets tried: X is narrow).
    """
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    off = np.zeros_like(y) if offset is None else np.asarray(offset, dtype=float)
    w = 1.0 / y
    k = X.shape[1]
    best, best_err = np.zeros(k), math.inf
    for mask in range(1, 1 << k):
        cols = [j for j in range(k) if mask >> j & 1]
        A = X[:, cols] * w[:, None]
        c, *_ = np.linalg.lstsq(A, (y - off) * w, rcond=None)
        if np.any(c < 0):
            continue
        full = np.zeros(k)
        full[cols] = c
        err = float(np.sum(((X @ full + off - y) * w) ** 2))
        if err < best_err:
            best, best_err = full, err
    return best


def fit_alpha_beta(sizes, times):
    """(alpha, beta) of t = alpha + n·beta, relative least squares (a ping-pong's one-way times)."""
    X = np.array([[1.0, float(n)] for n in sizes])
    a, b = lsq_relative(X, times)
    return float(a), float(b)


def fit_gamma(sizes, times):
    """(gamma, c0) of t = c0 + n·gamma (the reduction's per-byte cost and its call overhead)."""
    c0, g = lsq_relative(np.array([[1.0, float(n)] for n in sizes]), times)
    return float(g), float(c0)


# --------------------------------------------------------------------------- ring and tree, with knees


def _design(kind, sizes, p):
    """Columns multiplying (alpha, beta) in the ring, tree or shm formula."""
    L = log2ceil(p)
    rows = []
    for n in sizes:
        if kind == "shm":
            rows.append([2, 2 * n])
            continue
        a, b = (2 * (p - 1) * ring_segments(n, p), 2 * (p - 1) / p) if kind == "ring" else (2 * L, 2 * L)
        rows.append([a, b * n])
    return np.array(rows, dtype=float)


def _gamma_term(kind, n, p):
    return (p - 1) / p * n if kind in ("ring", "shm") else log2ceil(p) * n


def fit_algorithm(kind, sizes, times, p, gamma) -> dict:
    """Effective {alpha, beta, knees, above} of the ring or tree formula, gamma given.

    First one (alpha, beta) for all sizes; then the best split of the sorted sizes into
    two regimes (KNEE_SIDE sizes or more each), then into three. Each knee is kept only
    when it cuts the squared relative error below KNEE_GAIN of the fit without it, and
    that fit misses by more than KNEE_MIN_RMS -- both judged without the one size that
    fit misses most, so that one odd size cannot buy itself a regime.
    """
    return _fit_once(kind, [int(n) for n in sizes], [float(t) for t in times], p, gamma)


def _fit_once(kind, sizes, times, p, gamma) -> dict:
    """The best fit with 0, 1 or up to MAX_KNEES knees (each kept only when it clearly helps)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    y = np.asarray(times, dtype=float)
    off = np.array([_gamma_term(kind, int(n), p) * gamma for n in sizes])
    X = _design(kind, [int(n) for n in sizes], p)
    order = np.argsort(sizes, kind="stable")
    ns = sizes[order]
    cache = {}

    def part(lo, hi):  # (alpha, beta) fitted to the sorted sizes [lo, hi)
        if (lo, hi) not in cache:
            idx = order[lo:hi]
            cache[lo, hi] = lsq_relative(X[idx], y[idx], off[idx])
        return cache[lo, hi]

    def build(cuts):  # cuts: indices into the sorted sizes where a new regime starts
        bounds = [0, *cuts, len(ns)]
        parts = [part(a, b) for a, b in zip(bounds, bounds[1:])]
        d = {"alpha": float(parts[0][0]), "beta": float(parts[0][1]),
             "knees": [int(ns[c - 1]) for c in cuts],
             "above": [[float(c[0]), float(c[1])] for c in parts[1:]]}
        return d

    def residuals(d):
        return np.array([((formula(kind, int(n), p, d, gamma) - t) / t) ** 2 for n, t in zip(sizes, y)])

    # Knees are judged without the one size the current fit misses most, so that a single
    # odd size cannot buy itself a regime.
    valid = [c for c in range(KNEE_SIDE, len(ns) - KNEE_SIDE + 1) if ns[c - 1] != ns[c]]
    best = build([])
    for k in range(1, MAX_KNEES + 1):
        r = residuals(best)
        w = int(np.argmax(r))
        best_err = float(r.sum() - r[w])
        if best_err < KNEE_MIN_RMS ** 2 * max(1, len(ns) - 1):
            break
        cand, cand_err = None, math.inf
        for cuts in combinations(valid, k):
            if any(b - a < KNEE_SIDE for a, b in zip(cuts, cuts[1:])):
                continue
            d = build(list(cuts))
            rc = residuals(d)
            e = float(rc.sum() - rc[w])
            if e < cand_err:
                cand, cand_err = d, e
        if cand is None or cand_err > KNEE_GAIN * best_err:
            break
        best = cand
    return best


# --------------------------------------------------------------------------- native: a measured table


def lower_envelope(y):
    """The largest non-decreasing sequence not above ``y``: y'[i] = min(y[i:]).

    A larger message is never cheaper, and other processes only ever add time, so a
    measurement above a later (larger) one was disturbed: it is lowered to that one.
    """
    out, m = [], math.inf
    for v in reversed([float(v) for v in y]):
        m = min(m, v)
        out.append(m)
    return out[::-1]


def fit_piecewise(sizes, times):
    """A table [(n, t)] for log-log interpolation: one point per size, sorted, non-decreasing."""
    pts = {}
    for n, t in zip(sizes, times):
        if n > 0 and t > 0:
            pts.setdefault(int(n), []).append(float(t))
    ns = sorted(pts)
    return [[n, t] for n, t in zip(ns, lower_envelope([min(pts[n]) for n in ns]))]


# --------------------------------------------------------------------------- fitting from bench rows


def row_time(row) -> float:
    """A bench row's time in seconds: the lower quartile of its rounds when the row has it
    (robust to bursts of load from other processes), else its median."""
    return (row.get("low_us") or row["time_us"]) * 1e-6


def times_of(rows, algorithm):
    rs = sorted((r for r in rows if r["algorithm"] == algorithm and row_time(r) > 0), key=lambda r: r["size"])
    return [r["size"] for r in rs], [row_time(r) for r in rs]


def _without(sizes, times, drop):
    keep = [(n, t) for n, t in zip(sizes, times) if n not in drop]
    if len(keep) < 2:  # too much set aside: use everything
        keep = list(zip(sizes, times))
    return [n for n, _ in keep], [t for _, t in keep]


def fit(rows, prims: dict, *, ranks: int, host: str = "", nodes: int = 1, mpi: str = "",
        dtype: str = "float32") -> CostModel:
    """The model from bench rows (ring, tree, native and auto timed at several sizes) and primitives."""
    p = ranks
    gamma = prims["gamma"]
    rs, rt = times_of(rows, "ring")
    ts, tt = times_of(rows, "tree")
    ns, nt = times_of(rows, "native")
    if not (rs and ts and ns):
        raise ValueError("fitting needs ring, tree and native timed at one size at least")
    native = fit_piecewise(ns, nt)
    # every algorithm was timed interleaved at each size: where native ran much slower than its
    # lower envelope, the whole size was disturbed (another process ran) -- fit ring and tree without it
    env = dict((n, t) for n, t in native)
    noisy = sorted(n for n, t in zip(ns, nt) if t > DISTURBED * env.get(n, t))
    ring = fit_algorithm("ring", *_without(rs, rt, noisy), p, gamma)
    tree = fit_algorithm("tree", *_without(ts, tt, noisy), p, gamma)
    ms, mt = times_of(rows, "shm")  # timed on alloc_shared buffers (bench): the zero-copy path
    shm = fit_algorithm("shm", *_without(ms, mt, noisy), p, gamma) if ms and nodes == 1 else None
    small = [t - (p - 1) * n * gamma for n, t in zip(*times_of(rows, "auto")) if n <= SMALL_BYTES]
    fused = statistics.median(small) if small else None
    return CostModel(ranks=p, host=host, nodes=nodes, mpi=mpi, dtype=dtype,
                     created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     alpha=prims["alpha"], beta=prims["beta"], gamma=gamma,
                     reduce_overhead=prims.get("reduce_overhead", 0.0),
                     ring=ring, tree=tree, shm=shm,
                     native=native, fused=fused, sizes=sorted({r["size"] for r in rows}),
                     disturbed=noisy, links=prims.get("links"))


def merge_passes(passes) -> list[dict]:
    """Rows of several sweeps over the same sizes as one: per (size, algorithm) the row with the
    lowest time (other processes only ever add time), its low_us the lowest of the passes'."""
    best = {}
    for rows in passes:
        for r in rows:
            key = (r["size"], r["algorithm"])
            low = r.get("low_us") or r["time_us"]
            b = best.get(key)
            if b is None:
                best[key] = dict(r, low_us=low)
            elif r["time_us"] < b["time_us"]:
                best[key] = dict(r, low_us=min(low, b["low_us"]))
            else:
                b["low_us"] = min(b["low_us"], low)
    return list(best.values())
