"""The fitted cost model of one machine and rank count (``CostModel``), and auto's decision table from it.

What ``auto`` runs with a model (``CostModel.best``): ring or tree, whichever is predicted
faster, when that prediction is at most PREFER_NATIVE (0.9) times native's; otherwise
native. Native's curve is measured, ring's and tree's are a model with some error: near
ties go to the MPI library's own, and a wrong pick costs at most ~1/0.9 where the
predictions are right. With shm fitted (the sweep timed it; one node only): shm where even
its scratch path (a buffer not from alloc_shared, copied in and out) is predicted at most
0.9 times that pick's time -- auto does not see whether a buffer is shared, so it assumes not.

The collectives do not evaluate the model: they read a decision table (collectives/tuning.py),
the sizes from which ``best`` changes, stored in the model's JSON under ``auto``
(``CostModel.to_dict``). ``auto_table`` makes it: ``best`` on a grid of TABLE_PER_OCTAVE sizes
per doubling from 1 B to TABLE_MAX (plus the knees and native's measured sizes), each change
bisected to the exact byte. So the table picks what ``best`` picks at every size, unless the
pick flips and flips back within one grid step (a near-tie over a few per cent of sizes);
above TABLE_MAX, its last pick.
"""

from __future__ import annotations

import math

from ..collectives import SMALL_BYTES
from ..collectives.tuning import KEY, AutoTable
from .formulas import formula, piecewise_time, regime, shm_time

VERSION = 2  # 2 added ``links`` (per link type ping-pongs, optionally ``exchange``); version 1 files still load
READS = (1, 2)
PREFER_NATIVE = 0.9  # auto runs ring or tree only when predicted at most 0.9x native's time
_MEMO_MAX = 4096
LINK_TYPES = ("intra", "inter")  # shared memory within a node; the network between nodes
TABLE_MAX = 1 << 40  # auto's decision table covers 0 B .. 1 TiB (above: its last pick)
TABLE_PER_OCTAVE = 32  # grid sizes per doubling where the table checks best()


def parse_timing(t) -> list:
    """[sizes, seconds] of a stored timing table (two lists of one length)."""
    ns, ts = t
    if len(ns) != len(ts):
        raise ValueError("a timing table needs as many times as sizes")
    return [[int(n) for n in ns], [float(x) for x in ts]]


def parse_links(d) -> dict:
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
            ln["pingpong"] = parse_timing(v["pingpong"])
        x = v.get("exchange")
        if x is not None:
            ln["exchange"] = {"alpha": float(x["alpha"]), "beta": float(x["beta"])}
            if x.get("times") is not None:
                ln["exchange"]["times"] = parse_timing(x["times"])
        out[k] = ln
    return out


def parse_regimes(d) -> dict:
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
              "disturbed", "links", "shm")

    def __init__(self, *, ranks, alpha, beta, gamma, ring, tree, native, fused=None, host="",
                 nodes=1, mpi="", dtype="float32", created="", reduce_overhead=0.0, sizes=(),
                 disturbed=None, links=None, shm=None, version=VERSION):
        self.version = int(version)
        self.host, self.ranks, self.nodes = str(host), int(ranks), int(nodes)
        self.mpi, self.dtype, self.created = str(mpi), str(dtype), str(created)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.reduce_overhead = float(reduce_overhead)
        self.ring, self.tree = parse_regimes(ring), parse_regimes(tree)
        self.shm = None if shm is None else parse_regimes(shm)  # fitted when the sweep timed shm on one node
        self.native = [[int(n), float(t)] for n, t in native]
        self.fused = None if fused is None else float(fused)
        self.sizes = [int(s) for s in sizes]
        self.disturbed = [int(n) for n in (disturbed or [])]  # sizes ring and tree were not fitted to
        self.links = parse_links(links)  # {"intra": {...}, "inter": {...}}: ping-pongs per link type (may be empty)
        self._memo = {}

    # ---- JSON
    def params(self) -> dict:
        """The fitted parameters (what ``from_dict`` reads)."""
        return {k: getattr(self, k) for k in self.FIELDS}

    def to_dict(self) -> dict:
        """The parameters and, under ``auto``, the decision table made from them (``auto_table``)."""
        return {**self.params(), KEY: auto_table(self).to_dict()}

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
        for d in (m.ring, m.tree) + ((m.shm,) if m.shm else ()):
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
        return isinstance(other, CostModel) and self.params() == other.params()

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
        if algorithm in ("shm", "shm-scratch"):  # zero-copy, or through the scratch window (copy in, out)
            if self.shm is None or self.nodes > 1:
                return math.inf
            a, b = regime(self.shm, n)
            return shm_time(n, p, a, b, self.gamma, scratch=algorithm == "shm-scratch")
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
            if self.predict("shm-scratch", n) <= PREFER_NATIVE * self.predict(pick, n):
                pick = "shm"
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()
            self._memo[n] = pick
        return pick


# --------------------------------------------------------------------------- auto's decision table


def _grid(model: CostModel) -> list[int]:
    """Sizes where ``auto_table`` evaluates ``best``: TABLE_PER_OCTAVE per doubling from 1 B to
    TABLE_MAX, and every size where a piece of the model changes (knees, native's measured sizes)."""
    out = {0, TABLE_MAX}
    k, step = 0, 2 ** (1 / TABLE_PER_OCTAVE)
    while (n := int(round(step ** k))) < TABLE_MAX:
        out.add(n)
        k += 1
    for d in (model.ring, model.tree):
        out.update(x for K in d["knees"] for x in (K, K + 1))
    out.update(x for n, _ in model.native for x in (n, n + 1))
    return sorted(n for n in out if 0 <= n <= TABLE_MAX)


def _changes(best, a: int, b: int) -> list[list]:
    """[[n, pick]] where ``best`` changes in (a, b]: each change bisected to the byte."""
    out, pick = [], best(a)
    while best(b) != pick:
        lo, hi = a, b  # best(lo) == pick != best(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if best(mid) == pick:
                lo = mid
            else:
                hi = mid
        pick = best(hi)
        out.append([hi, pick])
        a = hi
    return out


def auto_table(model: CostModel) -> AutoTable:
    """What ``auto`` runs on ``model.ranks`` ranks: from each size on, ``model.best`` (module docstring)."""
    grid = _grid(model)
    steps = [[0, model.best(0)]]
    for a, b in zip(grid, grid[1:]):
        steps += _changes(model.best, a, b)
    return AutoTable(model.ranks, model.nodes, steps)
