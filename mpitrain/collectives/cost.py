"""The alpha-beta-gamma cost model of the all-reduce algorithms, fitted on this machine; ``auto`` uses it.

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
    fused   auto's small path (n <= SMALL_BYTES): one Allgather of p·(48 + 4096) B,
            then (p-1)·n·gamma locally -- a constant c_f + (p-1)·n·gamma

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
       piecewise table, fused the median of auto's times at sizes <= SMALL_BYTES.

Storage: JSON, one file per host and rank count (and node count when > 1):
``~/.cache/mpitrain/cost-<host>-n<p>.json`` or ``...-n<p>-h<nodes>.json`` (``$XDG_CACHE_HOME`` respected);
``MPITRAIN_COST_FILE=PATH`` names the file instead, ``MPITRAIN_COST_FILE=off``
disables the model. Rank 0 writes it. ``shared(comm)`` -- called once per
communicator, when the library's state for it is made -- has rank 0 read the
file and broadcast the model, so every rank holds the same numbers and
``choose()`` (pure arithmetic on them, memoized per size) decides the same on
every rank. Without a model, ``auto`` keeps its fixed thresholds.

What ``auto`` runs with a model (``CostModel.best``): ring or tree, whichever is predicted
faster, when that prediction is at most PREFER_NATIVE (0.9) times native's; otherwise
native. Native's curve is measured, ring's and tree's are a model with some error: near
ties go to the MPI library's own, and a wrong pick costs at most ~1/0.9 where the
predictions are right.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np

VERSION = 2  # 2 added ``links`` (per link type ping-pongs, optionally ``exchange``); version 1 files still load
READS = (1, 2)
ENV = "MPITRAIN_COST_FILE"
OFF = ("off", "none", "0", "false", "no")
CANDIDATES = ("native", "ring", "tree")  # what auto may run above SMALL_BYTES
TAG_PING = 21  # on the library's private communicator (collectives use 11-13, non-blocking 1000+)
SMALL_BYTES = 4096  # = collectives.SMALL_BYTES (auto's fused path); checked in tests
_MEMO_MAX = 4096
POOR_FIT = 0.25  # bench --fit warns when ring's or tree's median |error| is above this
FIT_PASSES = 2  # sweeps bench --fit fits: its own, then one more with the sizes largest first


def log2ceil(p: int) -> int:
    return max(0, (int(p) - 1).bit_length())


def ring_segments(nbytes: int, p: int) -> int:
    """Segments per ring chunk for a message of ``nbytes`` on ``p`` ranks (as ring.py cuts them)."""
    from .ring import segment_bytes

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


def regime(d: dict, n: int):
    """The (alpha, beta) of ``d`` that apply to ``n`` bytes: past knees[i], above[i]."""
    a, b = d["alpha"], d["beta"]
    for K, ab in zip(d.get("knees", ()), d.get("above", ())):
        if n <= K:
            break
        a, b = ab
    return a, b


def formula(kind: str, n: int, p: int, d: dict, gamma: float) -> float:
    """Predicted seconds of ring or tree for ``n`` bytes with the parameters ``d``."""
    a, b = regime(d, n)
    if kind == "ring":
        return ring_time(n, p, a, b, gamma, ring_segments(n, p))
    return tree_time(n, p, a, b, gamma)


def _design(kind, sizes, p):
    """Columns multiplying (alpha, beta) in the ring or tree formula."""
    L = log2ceil(p)
    rows = []
    for n in sizes:
        a, b = (2 * (p - 1) * ring_segments(n, p), 2 * (p - 1) / p) if kind == "ring" else (2 * L, 2 * L)
        rows.append([a, b * n])
    return np.array(rows, dtype=float)


def _gamma_term(kind, n, p):
    return (p - 1) / p * n if kind == "ring" else log2ceil(p) * n


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


KNEE_GAIN = 0.7  # a knee is kept only when it cuts the squared relative error to below 70 %
KNEE_MIN_RMS = 0.05  # ... and the fit without it misses by more than 5 % (rms): not just noise
KNEE_SIDE = 3  # sizes needed in each regime
MAX_KNEES = 2  # e.g. the L2 and the last-level cache
DISTURBED = 1.4  # a size where native ran this many times above its lower envelope was disturbed
PREFER_NATIVE = 0.9  # auto runs ring or tree only when predicted at most 0.9x native's time


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


# --------------------------------------------------------------------------- the model


LINK_TYPES = ("intra", "inter")  # shared memory within a node; the network between nodes


def _table(t) -> list:
    """[sizes, seconds] of a stored timing table (two lists of one length)."""
    ns, ts = t
    if len(ns) != len(ts):
        raise ValueError("a timing table needs as many times as sizes")
    return [[int(n) for n in ns], [float(x) for x in ts]]


def _links(d) -> dict:
    """{"intra"|"inter": {"alpha", "beta", "ranks": [a, b]}} from a stored dict (absent types left out);
    the ping-pong's (alpha, beta). Optional, kept when present: "pingpong": [sizes, one-way s] and
    "exchange": {"alpha", "beta"[, "times": [sizes, s]]} -- the simultaneous exchange's fit (files
    written before it existed have none: extrapolate.py falls back to the ping-pong and says so)."""
    out = {}
    for k, v in (d or {}).items():
        if k not in LINK_TYPES:
            raise ValueError(f"unknown link type {k!r} (known: {', '.join(LINK_TYPES)})")
        if v is None:
            continue
        ln = {"alpha": float(v["alpha"]), "beta": float(v["beta"]),
              "ranks": [int(r) for r in v.get("ranks", [])]}
        if v.get("pingpong") is not None:
            ln["pingpong"] = _table(v["pingpong"])
        x = v.get("exchange")
        if x is not None:
            ln["exchange"] = {"alpha": float(x["alpha"]), "beta": float(x["beta"])}
            if x.get("times") is not None:
                ln["exchange"]["times"] = _table(x["times"])
        out[k] = ln
    return out


def _params(d) -> dict:
    """{alpha, beta, knees, above} from a stored dict; knees increasing, one (alpha, beta) above each."""
    knees = [int(k) for k in d.get("knees", [])]
    above = [[float(a), float(b)] for a, b in d.get("above", [])]
    if len(knees) != len(above) or knees != sorted(set(knees)):
        raise ValueError("knees must increase and each needs its (alpha, beta) in 'above'")
    return {"alpha": float(d["alpha"]), "beta": float(d["beta"]), "knees": knees, "above": above}


class CostModel:
    """Fitted parameters for one machine and rank count; ``predict``, ``best``, JSON round trip."""

    FIELDS = ("version", "host", "ranks", "nodes", "mpi", "dtype", "created",
              "alpha", "beta", "gamma", "reduce_overhead", "ring", "tree", "native", "fused", "sizes",
              "disturbed", "links")

    def __init__(self, *, ranks, alpha, beta, gamma, ring, tree, native, fused=None, host="",
                 nodes=1, mpi="", dtype="float32", created="", reduce_overhead=0.0, sizes=(),
                 disturbed=None, links=None, version=VERSION):
        self.version = int(version)
        self.host, self.ranks, self.nodes = str(host), int(ranks), int(nodes)
        self.mpi, self.dtype, self.created = str(mpi), str(dtype), str(created)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.reduce_overhead = float(reduce_overhead)
        self.ring, self.tree = _params(ring), _params(tree)
        self.native = [[int(n), float(t)] for n, t in native]
        self.fused = None if fused is None else float(fused)
        self.sizes = [int(s) for s in sizes]
        self.disturbed = [int(n) for n in (disturbed or [])]  # sizes ring and tree were not fitted to
        self.links = _links(links)  # {"intra": {...}, "inter": {...}}: ping-pongs per link type (may be empty)
        self._memo = {}

    # ---- JSON
    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        """Build from a stored dict; ValueError naming the problem when it is not a valid model."""
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        if d.get("version") not in READS:
            raise ValueError(f"version {d.get('version')!r}, this mpitrain reads versions "
                             f"{', '.join(map(str, READS))}")
        try:
            m = cls(**{k: d[k] for k in cls.FIELDS if k in d})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"missing or malformed field ({e})") from None
        nums = [m.alpha, m.beta, m.gamma]
        for d in (m.ring, m.tree):
            nums += [d["alpha"], d["beta"], *(x for ab in d["above"] for x in ab)]
        nums += [x for ln in m.links.values() for x in (ln["alpha"], ln["beta"])]
        nums += [x for ln in m.links.values() if "exchange" in ln
                 for x in (ln["exchange"]["alpha"], ln["exchange"]["beta"])]
        if m.ranks < 1 or not all(math.isfinite(x) and x >= 0 for x in nums):
            raise ValueError("parameters must be finite and >= 0")
        if not m.native or any(not (n > 0 and t > 0 and math.isfinite(t)) for n, t in m.native):
            raise ValueError("native table empty or malformed")
        return m

    def __eq__(self, other):
        return isinstance(other, CostModel) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return (f"CostModel({self.ranks} ranks on {self.host or '?'}: alpha {self.alpha * 1e6:.2f} us, "
                f"beta {self.beta * 1e9:.4f} ns/B, gamma {self.gamma * 1e9:.4f} ns/B)")

    # ---- predictions (seconds)
    def predict(self, algorithm: str, nbytes: int, p: int | None = None) -> float:
        p = self.ranks if p is None else p
        n = int(nbytes)
        if p <= 1:
            return 0.0
        if algorithm in ("ring", "tree"):
            return formula(algorithm, n, p, getattr(self, algorithm), self.gamma)
        if algorithm == "native":
            return piecewise_time(self.native, n)
        if algorithm == "fused":
            return math.inf if self.fused is None or n > SMALL_BYTES else self.fused + (p - 1) * n * self.gamma
        raise ValueError(f"no cost model for algorithm {algorithm!r}")

    def best(self, nbytes: int) -> str:
        """What ``auto`` runs for ``nbytes``: ring or tree when predicted at most PREFER_NATIVE times
        native's time (native's table is measured, theirs modelled: near-ties go to the MPI
        library's own), else native. Memoized; the same on every rank for the same model."""
        n = int(nbytes)
        pick = self._memo.get(n)
        if pick is None:
            own = min(("ring", "tree"), key=lambda a: (self.predict(a, n), a != "ring"))
            pick = own if self.predict(own, n) <= PREFER_NATIVE * self.predict("native", n) else "native"
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()
            self._memo[n] = pick
        return pick


# --------------------------------------------------------------------------- storage


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text)) or "host"


def default_path(host: str, ranks: int, nodes: int = 1) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mpitrain"
    return base / (f"cost-{_safe(host)}-n{int(ranks)}" + (f"-h{int(nodes)}" if nodes > 1 else "") + ".json")


def cost_path(host: str, ranks: int, nodes: int = 1) -> Path | None:
    """Where the model for ``ranks`` ranks with rank 0 on ``host`` lives (None: disabled)."""
    v = os.environ.get(ENV, "").strip()
    if v:
        return None if v.lower() in OFF else Path(v).expanduser()
    return default_path(host, ranks, nodes)


def save(model: CostModel, path) -> Path:
    """Write ``model`` as JSON, atomically (a temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(model.to_dict(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _FILES.pop(str(path), None)
    return path


def load(path) -> CostModel:
    """Read a stored model; FileNotFoundError when absent, ValueError when unusable."""
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e})") from None
    return CostModel.from_dict(d)


_FILES = {}   # path -> CostModel or None, read once per process (rank 0)
_WARNED = set()
_LAST = {}    # ranks -> the model most recently shared for a communicator of that size


def _read_for(host: str, ranks: int, nodes: int):
    """Rank 0: the model for (host, ranks, nodes), or None, with a warning when a file is unusable."""
    path = cost_path(host, ranks, nodes)
    if path is None:
        return None
    key = str(path)
    if key in _FILES:
        m = _FILES[key]
    else:
        try:
            m = load(path)
        except FileNotFoundError:
            m = None
        except (OSError, ValueError) as e:
            _warn_once(key, f"cost model {path}: {e}; auto uses its fixed thresholds "
                            "(refit with: mpirun -n P python -m mpitrain bench --fit)")
            m = None
        _FILES[key] = m
    if m is not None and (m.ranks != ranks or m.nodes != nodes):
        _warn_once((key, ranks, nodes), f"cost model {path} was fitted for {m.ranks} rank(s) on {m.nodes} "
                                        f"node(s), this communicator has {ranks} on {nodes}: not used")
        return None
    return m


def _warn_once(key, msg):
    if key not in _WARNED:
        _WARNED.add(key)
        from ..runtime import warn

        warn(msg)


def shared(comm) -> CostModel | None:
    """Collective, once per communicator: rank 0 reads the model for this host and size, all get it."""
    from ..runtime import hostname

    p = comm.Get_size()
    if p == 1:
        return None  # one rank: auto always runs native, nothing to decide
    hosts = comm.gather(hostname(), root=0)
    nnodes = len(set(node_ids(comm)))  # emulated hosts (network namespaces) share a host name
    d = None
    if comm.Get_rank() == 0:
        try:  # never leave the other ranks waiting in the bcast
            m = _read_for(hosts[0], p, max(len(set(hosts)), nnodes))
        except Exception as e:  # noqa: BLE001 - e.g. no home directory: no model, say why
            _warn_once(("read", type(e).__name__), f"cost model not read ({type(e).__name__}: {e}); "
                                                   "auto uses its fixed thresholds")
            m = None
        d = None if m is None else m.to_dict()
    d = comm.bcast(d, root=0)
    m = None if d is None else CostModel.from_dict(d)
    if m is not None:
        _LAST[p] = m
    else:
        _LAST.pop(p, None)
    return m


def last_for(ranks: int) -> CostModel | None:
    """The model most recently shared for a communicator of ``ranks`` ranks (None: none stored)."""
    return _LAST.get(ranks)


def install(st, model: CostModel | None) -> None:
    """Make ``model`` the one ``auto`` uses on the library state ``st`` (collective: same on every rank)."""
    st.cost = model
    if model is not None:
        _LAST[st.size] = model
    else:
        _LAST.pop(st.size, None)


# --------------------------------------------------------------------------- measuring (collective)


def _quiet_barrier(comm):
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.0005)


def pingpong_sizes(max_bytes: int) -> list[int]:
    out, s = [], 8
    while s <= max_bytes:
        out.append(s)
        s *= 4
    return out or [8]


def _reps(n: int) -> int:
    return max(5, min(200, int(4e7 // max(n, 1))))


def measure_pingpong(comm, sizes, pair=(0, 1)) -> list[float]:
    """Collective. One-way seconds per message between the ranks ``pair`` (median RTT / 2); the
    other ranks wait without busy-polling. Every rank gets the list."""
    r = comm.Get_rank()
    a, b = pair
    buf = np.zeros(max(sizes), dtype=np.uint8)
    out = []
    if r in (a, b):
        peer = b if r == a else a
        for n in sizes:
            b = buf[:n]
            reps = _reps(n)
            ts = []
            for i in range(reps + 2):
                if r == a:
                    t0 = time.perf_counter()
                    comm.Send(b, dest=peer, tag=TAG_PING)
                    comm.Recv(b, source=peer, tag=TAG_PING)
                    if i >= 2:
                        ts.append(time.perf_counter() - t0)
                else:
                    comm.Recv(b, source=peer, tag=TAG_PING)
                    comm.Send(b, dest=peer, tag=TAG_PING)
            out.append(statistics.median(ts) / 2 if ts else 0.0)
    _quiet_barrier(comm)
    return comm.bcast(out if r == a else None, root=a)


def measure_exchange(comm, sizes, pair=(0, 1)) -> list[float]:
    """Collective. Seconds per simultaneous exchange between the ranks ``pair``: both Sendrecv
    ``n`` bytes to each other at once (what every ring step and the check's Allgather do), the
    median over the rounds timed on the first rank of the pair; the other ranks wait without
    busy-polling. Every rank gets the list."""
    r = comm.Get_rank()
    a, b = pair
    out = []
    if r in (a, b):
        peer = b if r == a else a
        sbuf = np.zeros(max(sizes), dtype=np.uint8)
        rbuf = np.empty_like(sbuf)
        for n in sizes:
            ts = []
            for i in range(_reps(n) + 2):
                t0 = time.perf_counter()
                comm.Sendrecv(sbuf[:n], dest=peer, sendtag=TAG_PING, recvbuf=rbuf[:n], source=peer,
                              recvtag=TAG_PING)
                if i >= 2:
                    ts.append(time.perf_counter() - t0)
            out.append(statistics.median(ts) if ts else 0.0)
    _quiet_barrier(comm)
    return comm.bcast(out if r == a else None, root=a)


def link_entry(comm, sizes, pair) -> dict:
    """Collective. One link: its ping-pong and its exchange, timed and fitted (t = alpha + n·beta)."""
    tp = measure_pingpong(comm, sizes, pair)
    tx = measure_exchange(comm, sizes, pair)
    a, b = fit_alpha_beta(sizes, tp)
    xa, xb = fit_alpha_beta(sizes, tx)
    return {"alpha": a, "beta": b, "ranks": list(pair), "pingpong": [list(sizes), tp],
            "exchange": {"alpha": xa, "beta": xb, "times": [list(sizes), tx]}}


def gamma_sizes(max_bytes: int) -> list[int]:
    out, s = [], 4096
    while s <= max_bytes:
        out.append(s)
        s *= 4
    return out or [4096]


def measure_reduce(comm, sizes, dtype="float32") -> list[float]:
    """Collective. Seconds of np.add(a, b, out=a) on rank 0 (the others idle quietly), per byte size."""
    out = None
    if comm.Get_rank() == 0:
        dt = np.dtype(dtype)
        a = np.ones(max(sizes) // dt.itemsize + 1, dtype=dt)
        b = np.ones_like(a)
        out = []
        for n in sizes:
            x, y = a[:max(1, n // dt.itemsize)], b[:max(1, n // dt.itemsize)]
            np.add(x, y, out=x)
            ts = []
            for _ in range(_reps(n)):
                x.fill(1)
                t0 = time.perf_counter()
                np.add(x, y, out=x)
                ts.append(time.perf_counter() - t0)
            out.append(statistics.median(ts))
    _quiet_barrier(comm)
    return comm.bcast(out, root=0)


def node_ids(comm) -> list[int]:
    """Collective. For every rank of ``comm``, the index (0, 1, ... in rank order) of its node:
    the ranks that share memory (MPI Split_type SHARED -- emulated hosts count as nodes)."""
    from mpi4py import MPI

    shm = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        leader = shm.allreduce(comm.Get_rank(), op=MPI.MIN)
    finally:
        shm.Free()
    leaders = comm.allgather(leader)
    index = {}
    return [index.setdefault(x, len(index)) for x in leaders]


def link_pairs(nodes) -> dict:
    """The rank pairs ``measure_links`` ping-pongs, from ``node_ids``: "inter": rank 0 and the first
    rank on another node; "intra": the first two ranks of the first node holding two. Absent: none."""
    out = {}
    other = next((r for r, h in enumerate(nodes) if h != nodes[0]), None)
    if other is not None:
        out["inter"] = (0, other)
    for h in dict.fromkeys(nodes):
        on = [r for r, x in enumerate(nodes) if x == h]
        if len(on) >= 2:
            out["intra"] = (on[0], on[1])
            break
    return out


def measure_links(comm, sizes, nodes) -> dict:
    """Collective. {"intra"|"inter": {"alpha", "beta", "ranks", "pingpong": [sizes, times],
    "exchange": {"alpha", "beta", "times": [sizes, times]}}} for the link types this job has
    (``nodes`` from ``node_ids``); the same on every rank."""
    return {kind: link_entry(comm, sizes, pair) for kind, pair in sorted(link_pairs(nodes).items())}


def measure_primitives(comm, max_bytes: int, dtype="float32", nodes=None) -> dict:
    """Collective: ping-pong and reduction timings, and their fits (same on every rank).

    ``nodes`` (``node_ids``): when the ranks span more than one node, also a ping-pong per link
    type (``links``: within a node, between nodes)."""
    pp = pingpong_sizes(min(max_bytes, 64 << 20))
    tp = measure_pingpong(comm, pp) if comm.Get_size() > 1 else []
    gs = gamma_sizes(min(max(max_bytes, 4096), 64 << 20))
    tg = measure_reduce(comm, gs, dtype)
    alpha, beta = fit_alpha_beta(pp, tp) if tp else (0.0, 0.0)
    gamma, c0 = fit_gamma(gs, tg)
    links = {}
    if nodes is not None and len(set(nodes)) > 1:
        links = measure_links(comm, pp, nodes)
    elif tp:  # one node: ranks 0 and 1 share memory, their ping-pong is the intra-node link
        tx = measure_exchange(comm, pp)
        xa, xb = fit_alpha_beta(pp, tx)
        links = {"intra": {"alpha": alpha, "beta": beta, "ranks": [0, 1], "pingpong": [pp, tp],
                           "exchange": {"alpha": xa, "beta": xb, "times": [pp, tx]}}}
    return {"pingpong": [pp, tp], "reduce": [gs, tg], "alpha": alpha, "beta": beta,
            "gamma": gamma, "reduce_overhead": c0, "links": links}


# --------------------------------------------------------------------------- fitting from bench rows


def _t(row) -> float:
    """A bench row's time in seconds: the lower quartile of its rounds when the row has it
    (robust to bursts of load from other processes), else its median."""
    return (row.get("low_us") or row["time_us"]) * 1e-6


def _times(rows, algorithm):
    rs = sorted((r for r in rows if r["algorithm"] == algorithm and _t(r) > 0), key=lambda r: r["size"])
    return [r["size"] for r in rs], [_t(r) for r in rs]


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
    rs, rt = _times(rows, "ring")
    ts, tt = _times(rows, "tree")
    ns, nt = _times(rows, "native")
    if not (rs and ts and ns):
        raise ValueError("fitting needs ring, tree and native timed at one size at least")
    native = fit_piecewise(ns, nt)
    # every algorithm was timed interleaved at each size: where native ran much slower than its
    # lower envelope, the whole size was disturbed (another process ran) -- fit ring and tree without it
    env = dict((n, t) for n, t in native)
    noisy = sorted(n for n, t in zip(ns, nt) if t > DISTURBED * env.get(n, t))
    ring = fit_algorithm("ring", *_without(rs, rt, noisy), p, gamma)
    tree = fit_algorithm("tree", *_without(ts, tt, noisy), p, gamma)
    small = [t - (p - 1) * n * gamma for n, t in zip(*_times(rows, "auto")) if n <= SMALL_BYTES]
    fused = statistics.median(small) if small else None
    return CostModel(ranks=p, host=host, nodes=nodes, mpi=mpi, dtype=dtype,
                     created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     alpha=prims["alpha"], beta=prims["beta"], gamma=gamma,
                     reduce_overhead=prims.get("reduce_overhead", 0.0),
                     ring=ring, tree=tree,
                     native=native, fused=fused, sizes=sorted({r["size"] for r in rows}),
                     disturbed=noisy, links=prims.get("links"))


# --------------------------------------------------------------------------- reports


def _fmt_size(n):
    from ..bench import format_size

    return format_size(n)


def _us(t):
    return "-" if t is None or not math.isfinite(t) else (f"{t * 1e6:.1f}" if t < 1e-2 else f"{t * 1e6:.0f}")


def _gbs(beta):
    return f"{1e-9 / beta:.2f} GB/s" if beta > 0 else "inf"


def _knee(d) -> str:
    return "".join(f"\n#                past {_fmt_size(K)}: alpha {a * 1e6:8.2f} us   beta {b * 1e9:7.4f} ns/B"
                   for K, (a, b) in zip(d["knees"], d["above"]))


def format_params(model: CostModel) -> str:
    m, p = model, model.ranks
    lines = [
        f"# cost model: {p} ranks on {m.nodes} node(s), rank 0 on {m.host}; {m.mpi}",
        f"#   ping-pong (0<->1):  alpha {m.alpha * 1e6:8.2f} us   beta {m.beta * 1e9:7.4f} ns/B ({_gbs(m.beta)})",
        f"#   np.add (rank 0):    gamma {m.gamma * 1e9:7.4f} ns/B ({_gbs(m.gamma)}), "
        f"{m.reduce_overhead * 1e6:.2f} us per call",
        "#   ring (fit):  t = 2(p-1)·s·alpha + 2(p-1)/p·n·beta + (p-1)/p·n·gamma",
        f"#                alpha {m.ring['alpha'] * 1e6:8.2f} us   beta {m.ring['beta'] * 1e9:7.4f} ns/B{_knee(m.ring)}",
        f"#   tree (fit):  t = 2L·(alpha + n·beta) + L·n·gamma   (L = {log2ceil(p)})",
        f"#                alpha {m.tree['alpha'] * 1e6:8.2f} us   beta {m.tree['beta'] * 1e9:7.4f} ns/B{_knee(m.tree)}",
        f"#   native:      piecewise, log-log through {len(m.native)} measured sizes (lower envelope: non-decreasing)",
    ]
    if m.fused is not None:
        lines.append(f"#   fused (auto, n <= {_fmt_size(SMALL_BYTES)}): {m.fused * 1e6:.1f} us + (p-1)·n·gamma")
    for kind, what in (("intra", "within a node (shared memory)"), ("inter", "between nodes (network)")):
        ln = m.links.get(kind)
        if ln and ("inter" in m.links or "exchange" in ln):  # one node: the ping-pong is the one above
            pair = "<->".join(map(str, ln["ranks"]))
            if "inter" in m.links:
                lines.append(f"#   link {kind} ({pair}, {what}): alpha {ln['alpha'] * 1e6:8.2f} us   "
                             f"beta {ln['beta'] * 1e9:7.4f} ns/B ({_gbs(ln['beta'])})")
            x = ln.get("exchange")
            if x:
                lines.append(f"#   link {kind} exchange ({pair}, both send at once): alpha {x['alpha'] * 1e6:8.2f} us"
                             f"   beta {x['beta'] * 1e9:7.4f} ns/B ({_gbs(x['beta'])})")
    if m.disturbed:
        lines.append(f"#   not fitted, disturbed (native there > {DISTURBED:g}x its lower envelope): "
                     + ", ".join(_fmt_size(n) for n in m.disturbed))
    return "\n".join(lines)


def compare(rows, model: CostModel) -> list[dict]:
    """Per size: measured and predicted seconds per algorithm, the model's pick, the measured best."""
    out = []
    for n in sorted({r["size"] for r in rows}):
        at = {r["algorithm"]: _t(r) for r in rows if r["size"] == n}
        e = {"size": n, "measured": {}, "predicted": {}}
        for a in ("ring", "tree", "native"):
            if a in at:
                e["measured"][a] = at[a]
                e["predicted"][a] = model.predict(a, n)
        if "auto" in at and n <= SMALL_BYTES and model.fused is not None:
            e["measured"]["fused"] = at["auto"]
            e["predicted"]["fused"] = model.predict("fused", n)
        meas = {a: t for a, t in e["measured"].items() if a in CANDIDATES}
        e["pick"] = model.best(n)
        e["best"] = min(meas, key=meas.get) if meas else None
        e["pick_vs_best"] = meas[e["pick"]] / meas[e["best"]] if e["pick"] in meas and e["best"] else None
        out.append(e)
    return out


def format_compare(rows, model: CostModel) -> str:
    algs = ("ring", "tree", "native", "fused")
    head = f"#{'size':>9}" + "".join(f" {a + ' meas':>12} {'pred':>8} {'err':>5}" for a in algs)
    head += f" {'picks':>7} {'best':>7} {'pick/best':>9}"
    lines = ["# predicted vs measured (us; measured = lower quartile of the timed rounds, what was fitted; "
             "err = predicted/measured - 1)",
             f"# picks: what auto runs above {_fmt_size(SMALL_BYTES)} with this model; best: the fastest measured",
             head]
    errs = {a: [] for a in algs}
    for e in compare(rows, model):
        s = f"{_fmt_size(e['size']):>10}"
        for a in algs:
            if a in e["measured"]:
                m, pr = e["measured"][a], e["predicted"][a]
                err = pr / m - 1
                errs[a].append(abs(err))
                s += f" {_us(m):>12} {_us(pr):>8} {err * 100:>+4.0f}%"
            else:
                s += f" {'-':>12} {'-':>8} {'':>5}"
        pvb = "-" if e["pick_vs_best"] is None else f"{e['pick_vs_best']:.2f}"
        s += f" {e['pick']:>7} {e['best'] or '-':>7} {pvb:>9}"
        lines.append(s)
    summ = ", ".join(f"{a} {100 * statistics.median(v):.0f}%" for a, v in errs.items() if v)
    lines.append(f"# median |error|: {summ}")
    poor = [a for a in ("ring", "tree") if errs[a] and statistics.median(errs[a]) > POOR_FIT]
    if poor:
        lines.append(f"# warning: {' and '.join(poor)} fit poorly (median error above {POOR_FIT:.0%}): "
                     "was the machine busy? Refit when it is quiet")
    worst = [e for e in compare(rows, model) if e["pick_vs_best"] is not None]
    if worst:
        w = max(worst, key=lambda e: e["pick_vs_best"])
        agree = sum(1 for e in worst if e["pick"] == e["best"])
        lines.append(f"# the model picks the measured best at {agree}/{len(worst)} sizes; worst pick "
                     f"{w['pick_vs_best']:.2f}x the best ({_fmt_size(w['size'])})")
    return "\n".join(lines)


def auto_vs_best(rows) -> list[dict]:
    """Per size with an auto row: auto's time over the best of ring, tree, native (measured)."""
    out = []
    for n in sorted({r["size"] for r in rows if r["algorithm"] == "auto"}):
        at = {r["algorithm"]: r for r in rows if r["size"] == n}
        others = [at[a] for a in CANDIDATES if a in at]
        if not others:
            continue
        best = min(others, key=lambda r: r["time_us"])
        out.append({"size": n, "auto_us": at["auto"]["time_us"], "picked": at["auto"].get("picked", ""),
                    "best": best["algorithm"], "best_us": best["time_us"],
                    "ratio": at["auto"]["time_us"] / best["time_us"] if best["time_us"] > 0 else math.inf})
    return out


def format_auto_vs_best(rows, limit: float = 1.2) -> list[str]:
    """Footer line(s) for the bench: the worst auto/best ratio and any size above ``limit``."""
    av = auto_vs_best(rows)
    if not av:
        return []
    worst = max(av, key=lambda e: e["ratio"])
    over = [e for e in av if e["ratio"] > limit]
    line = (f"#     auto vs the best of ring/tree/native: worst {worst['ratio']:.2f}x at "
            f"{_fmt_size(worst['size'])} (auto ran {worst['picked'] or '?'}, best {worst['best']})")
    if over:
        line += f"; above {limit:g}x at: " + ", ".join(f"{_fmt_size(e['size'])} ({e['ratio']:.2f}x)" for e in over)
    return [line]


def plot_fit(path, rows, model: CostModel, meta: dict | None = None) -> None:
    """Time vs size, log-log: measured (solid, markers) and predicted (dashed) per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    sizes = sorted({r["size"] for r in rows})
    fine = sorted(set(np.geomspace(min(sizes), max(sizes), 120).astype(int).tolist()) | set(sizes))
    for i, a in enumerate(("ring", "tree", "native", "fused")):
        src = "auto" if a == "fused" else a
        xs, ts = _times(rows, src)
        if a == "fused":
            xs, ts = [x for x in xs if x <= SMALL_BYTES], [t for x, t in zip(xs, ts) if x <= SMALL_BYTES]
            if not xs or model.fused is None:
                continue
        if not xs:
            continue
        c = f"C{i}"
        ax.plot(xs, [t * 1e6 for t in ts], "o-", ms=3, color=c, label=f"{a} measured (lower quartile)")
        grid = [x for x in fine if a != "fused" or x <= SMALL_BYTES]
        ax.plot(grid, [model.predict(a, x) * 1e6 for x in grid], "--", color=c, alpha=0.8, label=f"{a} model")
    from ..bench import size_axes

    size_axes(ax, sizes, "time per allreduce (us)")
    title = f"allreduce time, measured vs cost model: {model.ranks} ranks"
    if meta:
        title += f", {meta.get('dtype')} {meta.get('op')}\n{meta.get('mpi', '')}"
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- bench --fit


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


def fit_for_bench(comm, rows, meta: dict) -> dict:
    """Collective (``python -m mpitrain bench --fit``): measure the primitives, fit the model to the
    sweep's ``rows``, store it (rank 0) and make ``auto`` use it on ``comm`` from now on.

    The fit uses FIT_PASSES sweeps: the bench's own ``rows`` and more over the same sizes,
    largest first, merged (per size and algorithm the lowest time), so that a burst of load
    during one pass does not shape the model.

    Returns {"model", "path" (None: not stored), "prims", "rows" (the merged rows that were
    fitted), "report" (text for rank 0)}.
    """
    from . import state_for
    from ..bench import run_sweep
    from ..runtime import UserError, hostname, log0

    st = state_for(comm)
    p = st.size
    sizes = sorted({r["size"] for r in rows})
    passes = [rows]
    for k in range(1, FIT_PASSES):
        log0(f"# fit: pass {k + 1}/{FIT_PASSES} over the same sizes, {'largest' if k % 2 else 'smallest'} first",
             comm=comm)
        passes.append(run_sweep(comm, sizes[::-1] if k % 2 else sizes, ("ring", "tree", "native", "auto"),
                                meta.get("dtype", "float32"), meta.get("op", "sum"), iters=meta.get("iters") or None,
                                memcpy=False, warmup=1))
    rows = merge_passes(passes)
    nodes = node_ids(st.comm)
    prims = measure_primitives(st.comm, int(meta.get("max") or max(r["size"] for r in rows)),
                               meta.get("dtype", "float32"), nodes=nodes)
    hosts = st.comm.gather(hostname(), root=0)
    d = problem = path = None
    if st.rank == 0:
        try:
            model = fit(rows, prims, ranks=p, host=hosts[0], nodes=max(len(set(hosts)), len(set(nodes))),
                        mpi=meta.get("mpi", ""), dtype=meta.get("dtype", "float32"))
            path = cost_path(model.host, p, model.nodes)
            if path is not None:
                save(model, path)
            d = model.to_dict()
        except (OSError, ValueError) as e:
            problem = f"bench --fit: {e}"
    d, problem, path = st.comm.bcast((d, problem, None if path is None else str(path)), root=0)
    if problem:
        raise UserError(problem)
    model = CostModel.from_dict(d)
    install(st, model)
    pp, tp = prims["pingpong"]
    gs, tg = prims["reduce"]
    lines = [
        "#",
        format_params(model),
        "#   ping-pong one-way (us): " + "  ".join(f"{_fmt_size(n)} {t * 1e6:.1f}" for n, t in zip(pp, tp)),
        "#   np.add (us):            " + "  ".join(f"{_fmt_size(n)} {t * 1e6:.1f}" for n, t in zip(gs, tg)),
        *(f"#   ping-pong {k} {'<->'.join(map(str, ln['ranks']))} (us): "
          + "  ".join(f"{_fmt_size(n)} {t * 1e6:.1f}" for n, t in zip(*ln["pingpong"]))
          for k, ln in sorted(prims.get("links", {}).items()) if "inter" in prims.get("links", {})),
        *(f"#   exchange {k} {'<->'.join(map(str, ln['ranks']))} (us): "
          + "  ".join(f"{_fmt_size(n)} {t * 1e6:.1f}" for n, t in zip(*ln["exchange"]["times"]))
          for k, ln in sorted(prims.get("links", {}).items()) if "exchange" in ln),
        "#",
        format_compare(rows, model),
        "#",
        (f"# stored: {path} -- auto uses it for {p} ranks with rank 0 on {model.host} "
         f"(MPITRAIN_COST_FILE overrides the path; =off disables)") if path else
        f"# not stored ({ENV}=off)",
        "# the auto rows above ran the previous choice; run the bench again to time auto with this model",
    ]
    return {"model": model, "path": path, "prims": prims, "rows": rows, "report": "\n".join(lines)}
