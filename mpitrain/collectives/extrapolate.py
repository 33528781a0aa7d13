"""The cost model extrapolated to many ranks on many hosts: ``python -m mpitrain bench --model``.

Not a measurement and not an MPI run: pure arithmetic on fitted parameters, one process.

Two link types, each measured two ways by ``bench --fit`` (cost.py), alpha (s per message) and
beta (s per byte) fitted to t = alpha + n·beta for each:

                ping-pong (one way)     exchange (both send at once)
    intra       (alpha_s, beta_s)       (alpha_sx, beta_sx)     two ranks on one host (shared memory)
    inter       (alpha_n, beta_n)       (alpha_nx, beta_nx)     two ranks on different hosts (the network)

Which one feeds which term -- by what the step does on the wire:

    ring steps (ring, hier's ring across leaders)   exchange: every rank sends its chunk to the right
                                                    and receives one from the left at the same time
    the per-call check (an Allgather)               exchange: recursive doubling / Bruck, each round
                                                    sends and receives at once
    tree levels (tree, hier's reduce/bcast)         ping-pong: a binomial level is one direction --
                                                    in the reduce a parent receives from its child and
                                                    sends nothing, in the broadcast the reverse

On the emulated hosts (tools/netns-hosts.sh) an exchange costs ~2x a one-way ping-pong (the
measured fact this follows: MPICH's Allreduce on 2 hosts, two exchanges, took ~4 one-way
times); in shared memory the two are close. A source without an exchange measurement (cost
files written before it existed, a ping-pong table, a literal ALPHA@BANDWIDTH) falls back to
its ping-pong for the exchange terms, and the output says so in a NOTE line -- expect
ring predictions that are too low on networks where a simultaneous exchange is slower.

Measured tables for the network. ``bench --fit`` across hosts also stores the timings it fitted
the two lines to (sizes 8 B .. max, x4): ``links.inter.pingpong`` and ``links.inter.exchange.times``
(a ping-pong table JSON has them as ``results`` / ``exchange``). Where the inter source has them,
the network's time for one message of m bytes is the *table* at m instead of its line
(cost.table_time: log-log interpolation between the two measured sizes around m -- exact at the
measured sizes, so a protocol jump such as the one between 128 B and 512 B is kept; outside the
measured range the straight line with the fitted beta, through the nearest end point). Written
as an effective alpha_n(m) = T(m) - m·beta_n (beta_n the fitted slope), so the formulas below
keep their shape. Exactly these terms use a table:

    tree levels across hosts (tree's Lh levels)      ping-pong table at m = n
    ring steps across hosts (ring when H > 1,        exchange table at m = one segment,
      hier's ring across the H leaders)                n / (N·s(n, N)), resp. n / (H·s(n, H))
    the check's Lh rounds across hosts               exchange table at m = the round's bytes,
                                                       min(2^k, H - 2^k)·L·r in round k
    (no exchange measured: the ping-pong table, like the line's fallback)

Everything else -- the intra links, the overheads a - alpha_s, b - beta_s (against the intra
*lines*), the fitted ring/tree regimes -- is as before; a source with no table (an older cost
file, {"alpha", "beta"}, a literal, ``--from-json``) gives the lines, as before.

and, from ``bench --fit`` on one host (cost.py), gamma (s per byte reduced) and ring's and
tree's *effective* (alpha, beta) -- per size regime (knees) -- which include what a ping-pong
does not see: Python's cost per message and per byte, memory contention. On the network an
algorithm pays the network's link plus that same software overhead, both taken the way its
steps use the link (ring: exchange, tree: ping-pong):

    on intra links:  (alpha, beta) = the fitted regime (a, b) of the algorithm at n bytes
    on inter links, tree:  (alpha_n + max(0, a - alpha_s),   beta_n + max(0, b - beta_s))
    on inter links, ring:  (alpha_nx + max(0, a - alpha_sx), beta_nx + max(0, b - beta_sx))

Topology (``--ppn L``): N = H hosts x L ranks per host, ranks in blocks (rank r on host
r // L); H = ceil(N / L); N <= L is one host (H = 1, L = N). Li = ceil(log2 L),
Lh = ceil(log2 H), s(n, p) = ring segments per chunk (ring.segment_bytes), and
ring_time / tree_time are cost.py's formulas:

    ring    ring_time(n, N, alpha, beta, gamma, s(n, N)) with the inter (alpha, beta) of the
            ring's regime when H > 1 (from the exchange) -- every ring step waits for its slowest
            link, and with more than one host some link of every step crosses hosts:
                2(N-1)·s·alpha_nx' + 2(N-1)/N·n·beta_nx' + (N-1)/N·n·gamma
    tree    binomial levels: with blocks of L (a power of two) the first Li levels pair
            ranks of one host, the remaining Lh cross hosts:
                tree_time(n, L, intra) + tree_time(n, H, inter)
              = 2Li·(alpha_t + n·beta_t) + 2Lh·(alpha_n' + n·beta_n') + (Li + Lh)·n·gamma
    hier    binomial reduce to the host's leader and binomial broadcast from it over shared
            memory (tree's fitted parameters), a ring across the H leaders (ring's, inter):
                tree_time(n, L, intra) + ring_time(n, H, inter, s(n, H))
              = 2Li·(alpha_t + n·beta_t) + Li·n·gamma
                + 2(H-1)·s·alpha_nx' + 2(H-1)/H·n·beta_nx' + (H-1)/H·n·gamma

Size regimes (the fit's knees, ``fitted``): the fitted (alpha, beta) change with the message
size at the rank count p0 of the fit. Every tree step moves the whole n: tree takes the regime
of n. A ring step moves one chunk of n/N bytes (in segments): at N ranks the ring takes the
regime of the size with the same chunk at p0, n0 = n·p0/N (hier's ring across the H leaders:
n·p0/H) -- per-message costs follow the message, not the buffer. And a fit may give a regime
alpha = 0 (at p0 its 2(p0-1) messages vanish in the n·beta term), which at N = 1024 would make
those messages free and the time fall as n grows: alpha is made non-decreasing over the
regimes, that regime's beta lowered to keep the time at p0.

The agreement check: every call first runs one small Allgather (collectives/__init__.py) of a
row of r = 48 B (+ SMALL_BYTES of room for auto's fused path when N <= FUSE_MAX_RANKS) per
rank. On one host at p0 ranks the fit absorbed it into alpha; at N ranks on H hosts it costs
(MPICH's recursive doubling or Bruck -- simultaneous exchanges: the exchange parameters, no
Python per message)

    check(N) = Li·alpha_sx + (L-1)·r·beta_sx + Lh·alpha_nx + (H-1)·L·r·beta_nx
             (with an exchange table: the Lh network rounds as sum_k T_x(min(2^k, H - 2^k)·L·r))

and every prediction adds check(N) - check(p0 on one host): on one host a few us, across
hosts its Lh network latencies and (H-1)·L rows over the network.

So with H = 1 and N = p0 ring and tree are exactly cost.py's fitted formulas
(``CostModel.predict``); hier equals tree on one host, and ring with L = 1.

Not extrapolated: ``native`` (the MPI library's Allreduce). Its model is a table of times
measured at one rank count on one host, and the library switches algorithms inside with
the rank count, the message size and the topology: there is no formula to carry to N = 1024.

What the model leaves out (read predictions as a first-order estimate): contention (ranks
of a host sharing its network card -- here at most one rank per host sends across hosts at
a time in ring, tree and hier, so there is none in these three with blocks), the
per-call agreement check (one small Allgather over N ranks: grows with log N), ranks
sharing cores (the intra fit should come from a run with no more ranks than cores), and
the way the fitted overhead was spread over messages (it is charged per message, so it
grows with N like alpha does).

Where the parameters come from (``--link intra=SRC,inter=SRC``, each also ``default``):

    intra   a single-host cost model JSON (``bench --fit``); default: the one stored for this
            host with the most ranks not above its core count (~/.cache/mpitrain/cost-<host>-n<p>.json)
    inter   a cost model JSON fitted on more than one host (its ``links.inter``, with its
            ``exchange`` when it has one); a small JSON {"alpha": s, "beta": s/B[, "exchange":
            {"alpha", "beta"}]}; a ping-pong table {"results": [{"bytes", "one_way_us"}][,
            "exchange": [{"bytes", "time_us"}]]} (each fitted t = alpha + n·beta, and kept as a table
            for the terms listed above, like a cost model's tables); a literal
            ALPHA@BANDWIDTH (``25us@1.17GB/s``, ``100us@10gbit``: ping-pong only); or bench JSON
            files of multi-host runs (``--from-json``), whose ring rows are fitted for one
            (alpha_n, beta_n) used for both ways (an effective link), the intra overheads fixed;
            default: the newest multi-host cost model in the cache
    when none is found: DEFAULT_INTRA / DEFAULT_INTER below, and the output says so.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import cost
from .cost import log2ceil, regime, ring_segments, ring_time, tree_time

ALGORITHMS = ("ring", "tree", "hier")  # what is extrapolated (order = tie-break for "best")
NOT_MODELLED = ("native", "auto", "memcpy", "d2h")
FLAG = 0.20  # validation flags rows whose |predicted/measured - 1| is above this
DEFAULT_RANKS = tuple(2 ** k for k in range(1, 11))  # 2 .. 1024
DEFAULT_MAX = 1 << 30

# The 2-core reference VM of docs/benchmarks.md (bench --fit, N = 2, MPICH 5, float32): used
# only when this host has no fitted model, and the output says so.
DEFAULT_INTRA = {
    "source": "DEFAULT: the 2-core reference VM of docs/benchmarks.md (bench --fit, N = 2)",
    "alpha": 1.62e-6, "beta": 0.075e-9, "gamma": 0.035e-9, "ranks": 2,
    "ring": {"alpha": 13.4e-6, "beta": 1.81e-9, "knees": [2048, 1 << 20],
             "above": [[20.6e-6, 0.335e-9], [57.2e-6, 0.095e-9]]},
    "tree": {"alpha": 6.95e-6, "beta": 0.598e-9, "knees": [32768, 1 << 20],
             "above": [[3.36e-6, 0.334e-9], [170e-6, 0.096e-9]]},
}
# A 10 Gbit/s Ethernet under MPI over TCP: typical, not measured here.
DEFAULT_INTER = {"source": "DEFAULT: 10 GbE under MPI over TCP (typical values, not measured)",
                 "alpha": 25e-6, "beta": 1 / 1.17e9}


def _ab_text(a: float, b: float) -> str:
    bw = f"{1e-9 / b:.3g} GB/s" if b > 0 else "inf"
    return f"alpha {a * 1e6:.2f} us, beta {b * 1e9:.4f} ns/B ({bw})"


@dataclass
class Link:
    """One link type: a ping-pong's alpha (s) and beta (s/B), the simultaneous exchange's (xalpha,
    xbeta) -- None: not measured, ``exchange()`` falls back to the ping-pong -- and the source."""

    alpha: float
    beta: float
    source: str = ""
    default: bool = False
    xalpha: float | None = None
    xbeta: float | None = None
    table: list | None = None   # the measured ping-pong [[n, one-way s], ...] (cost.link_table), None: line only
    xtable: list | None = None  # the measured exchange [[n, s], ...]; used only with (xalpha, xbeta)

    @property
    def has_exchange(self) -> bool:
        return self.xalpha is not None and self.xbeta is not None

    def pingpong_at(self, m: float) -> tuple[float, float]:
        """(alpha, beta) of one one-way message of ``m`` bytes: with a measured table alpha is the
        table's time at m less m·beta (so alpha + m·beta = the table, cost.table_time), else the
        fitted line."""
        if self.table is None:
            return self.pingpong()
        return cost.table_time(self.table, m, self.beta) - m * self.beta, self.beta

    def exchange_at(self, m: float) -> tuple[float, float]:
        """``pingpong_at`` for a simultaneous exchange of ``m`` bytes each way (falls back like
        ``exchange()``: no exchange measured -> the ping-pong, its table included)."""
        if not self.has_exchange:
            return self.pingpong_at(m)
        if self.xtable is None:
            return self.xalpha, self.xbeta
        return cost.table_time(self.xtable, m, self.xbeta) - m * self.xbeta, self.xbeta

    def exchange(self) -> tuple[float, float]:
        """(alpha, beta) of a simultaneous exchange: measured, else the ping-pong's."""
        return (self.xalpha, self.xbeta) if self.has_exchange else (self.alpha, self.beta)

    def pingpong(self) -> tuple[float, float]:
        return self.alpha, self.beta

    def text(self) -> str:
        s = "ping-pong " + _ab_text(self.alpha, self.beta)
        if self.has_exchange:
            s += "; exchange " + _ab_text(self.xalpha, self.xbeta)
        else:
            s += "; exchange: not measured (= the ping-pong)"
        tabs = [w for w, t in (("ping-pong", self.table), ("exchange", self.xtable if self.has_exchange else None))
                if t is not None]
        if tabs:
            s += (f"; measured tables used between {_fmt_size(min(t[0][0] for t in (self.table, self.xtable) if t))}"
                  f" and {_fmt_size(max(t[-1][0] for t in (self.table, self.xtable) if t))} "
                  f"({' and '.join(tabs)}: log-log interpolation; the line outside)")
        return s


@dataclass
class Params:
    """Everything the extrapolation needs: the intra-host fit (ring, tree, gamma, ping-pong) and the
    inter-host link."""

    gamma: float
    intra: Link
    inter: Link
    ring: dict
    tree: dict
    source: str = ""       # where ring, tree and gamma come from
    ranks: int = 2         # the rank count they were fitted at
    default: bool = False  # ring, tree, gamma are DEFAULT_INTRA
    notes: list = field(default_factory=list)  # lines the output must show (fallbacks, caveats)

    def with_inter(self, inter: Link) -> "Params":
        return Params(self.gamma, self.intra, inter, self.ring, self.tree, self.source, self.ranks,
                      self.default, list(self.notes))


# --------------------------------------------------------------------------- the formulas


def topology(N: int, ppn: int) -> tuple[int, int]:
    """(H hosts, L ranks per host) for N ranks placed in blocks of ``ppn``."""
    N, ppn = int(N), max(1, int(ppn))
    L = min(ppn, N)
    return -(-N // L), L


def equivalent_size(kind: str, n: int, p: int, P: Params) -> int:
    """The size at the fit's p0 ranks whose regime ``kind`` takes for ``n`` bytes on ``p`` ranks:
    tree moves all n every step (n); a ring step one chunk (the size with that chunk at p0)."""
    if kind != "ring" or p <= 1:
        return int(n)
    return max(1, int(round(int(n) * max(2, P.ranks) / int(p))))


def fitted(kind: str, n: int, P: Params) -> tuple[float, float]:
    """The fitted (alpha, beta) of ``kind`` (ring, tree) for ``n`` bytes at the fit's p0 ranks (an
    ``equivalent_size``), ready to extrapolate in N.

    A fit at p0 ranks may give a size regime alpha = 0 (at p0 its 2(p0-1) messages are lost in
    the n·beta term); at N = 1024 that would make those messages free and the predicted time fall
    as the size grows. So alpha is made non-decreasing over the regimes (a larger message never
    costs less per message), and beta lowered to match: at p0 ranks the prediction stays exactly
    the fitted one.
    """
    d = getattr(P, kind)
    a, b = regime(d, n)
    env = d["alpha"]
    for K, (ak, _) in zip(d["knees"], d["above"]):
        if n <= K:
            break
        env = max(env, ak)
    if env > a and n > 0:
        p0 = max(2, P.ranks)
        # the same time at p0: ring 2(p0-1)·s0·da = 2(p0-1)/p0·n·db; tree 2L·da = 2L·n·db
        db = (env - a) * (ring_segments(n, p0) * p0 if kind == "ring" else 1) / n
        a, b = env, max(0.0, b - db)
    return a, b


EXCHANGE_STEPS = ("ring",)  # algorithms whose steps are simultaneous exchanges (tree levels: one way)


def link_params(link: Link, kind: str, m: float | None = None) -> tuple[float, float]:
    """(alpha, beta) of ``link`` the way a step of ``kind`` uses it: ring (and the check) exchange,
    tree one way (ping-pong). With ``m`` (bytes per message of the step) and a measured table:
    the table's time at m (``Link.pingpong_at`` / ``exchange_at``), else the fitted line."""
    if m is None:
        return link.exchange() if kind in EXCHANGE_STEPS else link.pingpong()
    return link.exchange_at(m) if kind in EXCHANGE_STEPS else link.pingpong_at(m)


def message_bytes(kind: str, n: int, p: int) -> float:
    """Bytes per message of one step of ``kind`` for ``n`` bytes on ``p`` ranks: a ring step sends
    one segment, n / (p·s(n, p)) (so s·m = n/p exactly); a tree level the whole n."""
    if kind == "ring":
        return int(n) / (p * ring_segments(n, p)) if p > 0 else float(n)
    return float(n)


def on_link(kind: str, n: int, p: int, P: Params, inter: bool) -> tuple[float, float]:
    """The (alpha, beta) ``kind`` (ring, tree) pays per message for ``n`` bytes on ``p`` ranks: on one
    host its fitted regime (``fitted``); across hosts the network's link plus the software
    overhead the fit saw above the shared-memory link -- both the exchange for ring, the
    ping-pong for tree (``link_params``); the network's at the step's message size
    (``message_bytes``) from its measured table when the source has one."""
    a, b = fitted(kind, equivalent_size(kind, n, p, P), P)
    if not inter:
        return a, b
    na, nb = link_params(P.inter, kind, message_bytes(kind, n, p))
    sa, sb = link_params(P.intra, kind)
    return na + max(0.0, a - sa), nb + max(0.0, b - sb)


def check_time(P: Params, N: int, ppn: int) -> float:
    """Seconds of the per-call agreement check (one Allgather of a small row per rank) on N ranks."""
    from . import FUSE_MAX_RANKS, META, SMALL_BYTES

    if N <= 1:
        return 0.0
    H, L = topology(N, ppn)
    r = 8 * META + (SMALL_BYTES if N <= FUSE_MAX_RANKS else 0)
    sa, sb = P.intra.exchange()  # every round of the Allgather sends and receives at once
    t = log2ceil(L) * sa + (L - 1) * r * sb
    if H > 1:
        if (P.inter.xtable if P.inter.has_exchange else P.inter.table) is not None:
            # from the table: round k of the recursive doubling / Bruck exchanges min(2^k, H - 2^k)
            # hosts' rows (L·r bytes each); the rounds add up to (H-1)·L·r bytes as in the line
            for k in range(log2ceil(H)):
                m = min(2 ** k, H - 2 ** k) * L * r
                na, nb = P.inter.exchange_at(m)
                t += na + m * nb
        else:
            na, nb = P.inter.exchange()
            t += log2ceil(H) * na + (H - 1) * L * r * nb
    return t


def predict(P: Params, algorithm: str, nbytes: int, N: int, ppn: int) -> float:
    """Predicted seconds of ``algorithm`` (ring, tree, hier) for ``nbytes`` on N ranks, ``ppn`` per host."""
    n, N = int(nbytes), int(N)
    if N <= 1:
        return 0.0
    # the agreement check at N ranks, less what the fit at p0 ranks on one host absorbed
    extra = check_time(P, N, ppn) - check_time(P, max(2, P.ranks), max(2, P.ranks))
    return extra + _algorithm_time(P, algorithm, n, N, ppn)


def _algorithm_time(P: Params, algorithm: str, n: int, N: int, ppn: int) -> float:
    H, L = topology(N, ppn)
    g = P.gamma
    if algorithm == "ring":
        a, b = on_link("ring", n, N, P, H > 1)
        return ring_time(n, N, a, b, g, ring_segments(n, N))
    if algorithm in ("tree", "hier"):
        within = tree_time(n, L, *on_link("tree", n, L, P, False), g)  # binomial over the L ranks of a host
        if H == 1:
            return within
        if algorithm == "tree":
            return within + tree_time(n, H, *on_link("tree", n, H, P, True), g)
        an, bn = on_link("ring", n, H, P, True)
        return within + ring_time(n, H, an, bn, g, ring_segments(n, H))
    raise ValueError(f"no extrapolation for algorithm {algorithm!r} (modelled: {', '.join(ALGORITHMS)})")


def predict_all(P: Params, nbytes: int, N: int, ppn: int) -> dict:
    return {a: predict(P, a, nbytes, N, ppn) for a in ALGORITHMS}


def best(preds: dict) -> str:
    """The fastest prediction; ties to the first of ALGORITHMS (hier = tree on one host: tree)."""
    return min(ALGORITHMS, key=lambda a: (preds[a], ALGORITHMS.index(a)))


def crossover(P: Params, N: int, ppn: int, a: str, b: str, sizes) -> int | None:
    """The smallest of ``sizes`` (sorted) from which ``a`` is predicted at least as fast as ``b`` at
    every larger size too; None when ``a`` is slower at the largest."""
    sizes = sorted(int(n) for n in sizes)
    out = None
    for n in reversed(sizes):
        if predict(P, a, n, N, ppn) <= predict(P, b, n, N, ppn):
            out = n
        else:
            break
    return out


# --------------------------------------------------------------------------- parameter sources


_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_BW_UNITS = {"gb/s": 1e9, "mb/s": 1e6, "kb/s": 1e3, "gib/s": 2 ** 30, "mib/s": 2 ** 20,
             "gbit/s": 1.25e8, "gbit": 1.25e8, "gb": 1.25e8, "gbps": 1.25e8,
             "mbit/s": 1.25e5, "mbit": 1.25e5, "mbps": 1.25e5}


def _number(text: str, units: dict, what: str) -> float:
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-zµ/]*)\s*", text)
    if not m or m.group(2).lower() not in units:
        raise ValueError(f"bad {what} {text!r}: a number with one of the units {', '.join(sorted(set(units)))}")
    try:
        x = float(m.group(1)) * units[m.group(2).lower()]
    except ValueError:
        raise ValueError(f"bad {what} {text!r}") from None
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"bad {what} {text!r}: must be finite and >= 0")
    return x


def parse_link_literal(text: str) -> Link:
    """``25us@1.17GB/s`` or ``100us@10gbit``: a latency and a bandwidth (beta = 1 / bandwidth)."""
    lat, _, bw = text.partition("@")
    alpha = _number(lat, _TIME_UNITS, "latency")
    b = _number(bw, _BW_UNITS, "bandwidth")
    if b <= 0:
        raise ValueError(f"bad bandwidth in {text!r}: must be > 0")
    return Link(alpha, 1.0 / b, f"given: {text}")


def parse_link_specs(specs) -> dict:
    """``["intra=A.json,inter=B.json,C.json", "inter=25us@1GB/s"]`` -> {"intra": [A], "inter": [...]}.
    An item without ``=`` continues the previous key (several bench JSON files for one link)."""
    out, key = {}, None
    for spec in specs or ():
        for item in str(spec).split(","):
            item = item.strip()
            if not item:
                continue
            if "=" in item:
                key, _, val = item.partition("=")
                key = key.strip()
                if key not in cost.LINK_TYPES:
                    raise ValueError(f"--link {spec!r}: unknown link type {key!r} (known: "
                                     f"{', '.join(cost.LINK_TYPES)})")
                out[key] = [val.strip()]
            elif key is None:
                raise ValueError(f"--link {spec!r}: use TYPE=SOURCE, e.g. intra=cost.json,inter=25us@1.17GB/s")
            else:
                out[key].append(item)
    return out


def cache_dir() -> Path:
    return cost.default_path("h", 1).parent


def _read_json(path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _intra_from_model(m: cost.CostModel, source: str) -> Params:
    if m.nodes > 1:
        raise ValueError(f"{source}: fitted on {m.nodes} nodes, its ring and tree parameters mix link types; "
                         "the intra-host parameters need a single-host fit (bench --fit on one host)")
    ln = m.links.get("intra") or {"alpha": m.alpha, "beta": m.beta}
    x = ln.get("exchange") or {}
    intra = Link(ln["alpha"], ln["beta"], f"ping-pong in {source}", xalpha=x.get("alpha"), xbeta=x.get("beta"))
    return Params(m.gamma, intra, Link(0.0, 0.0), m.ring, m.tree,
                  f"{source} ({m.ranks} ranks on {m.host or '?'}, {m.created or 'undated'})", m.ranks)


def default_intra(note: str) -> Params:
    d = DEFAULT_INTRA
    P = Params(d["gamma"], Link(d["alpha"], d["beta"], d["source"], True), Link(0.0, 0.0),
               cost._params(d["ring"]), cost._params(d["tree"]), d["source"], d["ranks"], True)
    P.notes.append(f"intra-host: {note}; using DEFAULT parameters ({d['source']}). Measure this host with: "
                   "mpirun -n 2 python -m mpitrain bench --fit")
    return P


def find_intra(host: str | None = None, cores: int | None = None) -> tuple[Path | None, str]:
    """The single-host model stored for this host to extrapolate from: the most ranks not above its
    core count (ranks sharing cores inflate alpha), else the fewest. (path or None, why)."""
    from ..runtime import hostname

    host = host or hostname()
    cores = cores or os.cpu_count() or 1
    env = os.environ.get(cost.ENV, "").strip()
    if env:
        if env.lower() in cost.OFF:
            return None, f"{cost.ENV}={env} disables the stored model"
        return Path(env).expanduser(), f"{cost.ENV}"
    found = []
    for f in sorted(cache_dir().glob(f"cost-{cost._safe(host)}-n*.json")):
        m = re.fullmatch(rf"cost-{re.escape(cost._safe(host))}-n(\d+)\.json", f.name)
        if m:
            found.append((int(m.group(1)), f))
    if not found:
        return None, f"no fitted model for this host ({cache_dir()}/cost-{cost._safe(host)}-n<p>.json)"
    fit = [x for x in found if x[0] <= cores]
    p, f = max(fit) if fit else min(found)
    return f, f"the stored fit for {p} ranks on {host} ({cores} cores)"


def load_intra(src: str | None = None) -> Params:
    """The intra-host parameters from ``src`` (a cost model JSON, or ``default``); None: this host's."""
    if src is not None and src.strip().lower() == "default":
        return default_intra("--link intra=default")
    if src is None:
        path, why = find_intra()
        if path is None:
            return default_intra(why)
        if not path.exists():
            return default_intra(f"{why} names {path}, which does not exist")
    else:
        path = Path(src).expanduser()
    try:
        m = cost.CostModel.from_dict(_read_json(path))
    except ValueError as e:
        raise ValueError(f"intra-host parameters from {path}: {e}") from None
    P = _intra_from_model(m, str(path))
    if src is None and m.ranks > (os.cpu_count() or 1):
        P.notes.append(f"intra-host: fitted with {m.ranks} ranks on {os.cpu_count()} cores (shared cores "
                       "inflate alpha); fit with fewer ranks for a better extrapolation")
    return P


def find_inter() -> tuple[Path | None, str]:
    """The newest stored cost model with an inter-host link (a ``bench --fit`` across hosts)."""
    best_f, best_t = None, ""
    for f in sorted(cache_dir().glob("cost-*.json")):
        try:
            d = _read_json(f)
            m = cost.CostModel.from_dict(d)
        except ValueError:
            continue
        if "inter" in m.links and (best_f is None or m.created > best_t):
            best_f, best_t = f, m.created
    if best_f is None:
        return None, f"no model fitted across hosts in {cache_dir()}"
    return best_f, "the newest model fitted across hosts"


def _inter_from_file(path: Path) -> Link | None:
    """A Link from a cost model (links.inter) or a {"alpha", "beta"} JSON; None for a bench JSON."""
    d = _read_json(path)
    if isinstance(d, dict) and "rows" in d:
        return None
    if isinstance(d, dict) and isinstance(d.get("results"), list):  # a ping-pong table
        try:
            pts = [(int(r["bytes"]), float(r["one_way_us"]) * 1e-6) for r in d["results"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: a ping-pong table needs results: [{{\"bytes\", \"one_way_us\"}}]") from None
        pts = [(n, t) for n, t in pts if n > 0 and t > 0]
        if len(pts) < 2:
            raise ValueError(f"{path}: a ping-pong table needs two sizes at least")
        a, b = cost.fit_alpha_beta([n for n, _ in pts], [t for _, t in pts])
        xa = xb = xt = None
        if d.get("exchange") is not None:
            try:
                xs = [(int(r["bytes"]), float(r["time_us"]) * 1e-6) for r in d["exchange"]]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: an exchange table needs exchange: [{{\"bytes\", \"time_us\"}}]") from None
            xs = [(n, t) for n, t in xs if n > 0 and t > 0]
            if len(xs) < 2:
                raise ValueError(f"{path}: an exchange table needs two sizes at least")
            xa, xb = cost.fit_alpha_beta([n for n, _ in xs], [t for _, t in xs])
            xt = cost.link_table([n for n, _ in xs], [t for _, t in xs])
        return Link(a, b, f"{path} (ping-pong{' and exchange' if xa is not None else ''} table, "
                          f"{len(pts)} sizes, fitted t = alpha + n·beta)", xalpha=xa, xbeta=xb,
                    table=cost.link_table([n for n, _ in pts], [t for _, t in pts]), xtable=xt)
    if isinstance(d, dict) and "ranks" in d and "ring" in d:
        try:
            m = cost.CostModel.from_dict(d)
        except ValueError as e:
            raise ValueError(f"inter-host parameters from {path}: {e}") from None
        if "inter" not in m.links:
            raise ValueError(f"{path}: no inter-host link in this model (fitted on {m.nodes} node(s)); "
                             "fit one with bench --fit on ranks spanning two hosts or more")
        ln = m.links["inter"]
        x = ln.get("exchange") or {}
        what = "ping-pong and exchange" if x else "ping-pong"
        pp, xt = ln.get("pingpong"), x.get("times")
        return Link(ln["alpha"], ln["beta"], f"{path} ({what}, ranks {ln['ranks'][0]}<->{ln['ranks'][1]}, "
                                             f"{m.created or 'undated'})", xalpha=x.get("alpha"), xbeta=x.get("beta"),
                    table=cost.link_table(*pp) if pp else None, xtable=cost.link_table(*xt) if xt else None)
    try:
        a, b = float(d["alpha"]), float(d["beta"])
        x = d.get("exchange")
        xa, xb = (None, None) if x is None else (float(x["alpha"]), float(x["beta"]))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: neither a cost model, a bench JSON nor {{\"alpha\": s, \"beta\": s/B}}") from None
    if not all(math.isfinite(v) and v >= 0 for v in (a, b, *(v for v in (xa, xb) if v is not None))):
        raise ValueError(f"{path}: alpha and beta must be finite and >= 0")
    return Link(a, b, str(path), xalpha=xa, xbeta=xb)


def load_inter(srcs, P: Params) -> Link:
    """The inter-host link from ``srcs`` (see the module docstring); ``P``: the intra parameters
    (fitting from bench rows needs their overheads). Missing: the stored one, else DEFAULT_INTER."""
    if not srcs:
        path, why = find_inter()
        if path is None:
            d = DEFAULT_INTER
            P.notes.append(f"inter-host: {why}; using DEFAULT parameters ({d['source']}: "
                           f"{Link(d['alpha'], d['beta']).text()}). Measure them with bench --fit on ranks spanning "
                           "two hosts, or give them: --link inter=FILE or inter=25us@1.17GB/s")
            return Link(d["alpha"], d["beta"], d["source"], True)
        return _inter_from_file(path)
    if len(srcs) == 1 and srcs[0].strip().lower() == "default":
        d = DEFAULT_INTER
        P.notes.append(f"inter-host: --link inter=default: DEFAULT parameters ({d['source']})")
        return Link(d["alpha"], d["beta"], d["source"], True)
    if len(srcs) == 1 and "@" in srcs[0]:
        return parse_link_literal(srcs[0])
    docs = []
    for s in srcs:
        path = Path(s).expanduser()
        ln = _inter_from_file(path)
        if ln is not None:
            if len(srcs) > 1:
                raise ValueError(f"{path}: several inter-host sources are only for bench JSON files (--from-json)")
            return ln
        docs.append((str(path), _read_json(path)))
    return fit_inter(P, docs)


def load_params(link_specs=None, from_json=None) -> Params:
    """Intra and inter parameters from ``--link`` specs and ``--from-json`` files."""
    specs = parse_link_specs(link_specs)
    inter = list(specs.get("inter", []))
    if from_json:
        if inter:
            raise ValueError("give the inter-host link once: --from-json FILES or --link inter=SRC")
        inter = [f for f in str(from_json).split(",") if f.strip()]
    intra = specs.get("intra")
    if intra is not None and len(intra) != 1:
        raise ValueError("--link intra= takes one cost model JSON (or default)")
    P = load_intra(intra[0] if intra else None)
    P.inter = load_inter(inter, P)
    for kind, ln in (("inter-host", P.inter), ("intra-host", P.intra)):
        if not ln.has_exchange and not ln.default:  # DEFAULT parameters have their own NOTE
            P.notes.append(
                f"{kind}: no exchange measurement in {ln.source or 'the source'} (an older file, a ping-pong "
                "table or a literal): the exchange terms (ring steps, the check) fall back to its ping-pong"
                + (" -- likely too low where a simultaneous exchange is slower (refit: mpirun -n P python -m "
                   "mpitrain bench --fit on ranks spanning two hosts)" if kind == "inter-host" else
                   " (in shared memory the two are close; refit with bench --fit to measure it)"))
    return P


# --------------------------------------------------------------------------- bench rows: fitting, validation


def _row_time(row) -> float:
    return cost._t(row)


def file_topology(doc: dict, ppn: int | None = None) -> tuple[int, int, int]:
    """(N ranks, H hosts, L ranks per host) of a bench JSON: nodes, else distinct host names, in
    its meta; ``ppn`` overrides (H = ceil(N / ppn))."""
    meta = doc.get("meta") or {}
    rows = doc.get("rows") or []
    N = int(meta.get("ranks") or max((r.get("ranks", 1) for r in rows if r.get("algorithm") not in ("memcpy",)),
                                     default=1))
    if ppn:
        H, L = topology(N, ppn)
    else:
        H = int(meta.get("nodes") or len(meta.get("hosts") or []) or 1)
        L = -(-N // H)
    return N, H, L


def fit_inter(P: Params, docs, algorithms=("ring",)) -> Link:
    """(alpha_n, beta_n) fitted to the ``algorithms`` rows of multi-host bench JSON ``docs``
    [(name, doc)], the intra parameters (overheads, gamma) fixed. Every prediction is affine in
    (alpha_n, beta_n), so this is the relative least squares of cost.lsq_relative."""
    X, y, off, names = [], [], [], []
    for name, doc in docs:
        N, H, L = file_topology(doc)
        if H < 2:
            raise ValueError(f"{name}: its ranks ran on one host (meta: {N} ranks, hosts "
                             f"{(doc.get('meta') or {}).get('hosts')}): no inter-host link to fit")
        for r in doc.get("rows") or []:
            if r.get("algorithm") not in algorithms or _row_time(r) <= 0:
                continue
            n = int(r["size"])
            f0 = predict(P.with_inter(Link(0.0, 0.0, xalpha=0.0, xbeta=0.0)), r["algorithm"], n, N, L)
            fa = predict(P.with_inter(Link(1.0, 0.0, xalpha=1.0, xbeta=0.0)), r["algorithm"], n, N, L) - f0
            fb = predict(P.with_inter(Link(0.0, 1.0, xalpha=0.0, xbeta=1.0)), r["algorithm"], n, N, L) - f0
            X.append([fa, fb])
            y.append(_row_time(r))
            off.append(f0)
        names.append(name)
    if len(y) < 2:
        raise ValueError(f"fitting the inter-host link needs {' or '.join(algorithms)} rows at two sizes at least "
                         f"in {', '.join(names)}")
    a, b = cost.lsq_relative(np.array(X), np.array(y), np.array(off))
    return Link(float(a), float(b), f"fitted to the {'/'.join(algorithms)} rows of {', '.join(names)} "
                                    f"({len(y)} rows; intra overheads fixed; one link for both ways)",
                xalpha=float(a), xbeta=float(b))


def validate(P: Params, docs, ppn: int | None = None) -> dict:
    """Predicted vs measured for every ring, tree and hier row of the bench JSON ``docs`` [(name, doc)].

    Returns {"rows": [{file, ranks, hosts, ppn, size, algorithm, measured, predicted, error}],
    "skipped": {algorithm: count}, "files": [(name, N, H, L)]}; error = predicted/measured - 1."""
    out, skipped, files = [], {}, []
    for name, doc in docs:
        N, H, L = file_topology(doc, ppn)
        files.append((name, N, H, L))
        for r in doc.get("rows") or []:
            a = r.get("algorithm")
            if a not in ALGORITHMS:
                skipped[a] = skipped.get(a, 0) + 1
                continue
            t = _row_time(r)
            if not t > 0:
                continue
            pr = predict(P, a, int(r["size"]), N, L)
            out.append({"file": name, "ranks": N, "hosts": H, "ppn": L, "size": int(r["size"]), "algorithm": a,
                        "measured": t, "predicted": pr, "error": pr / t - 1})
    return {"rows": out, "skipped": skipped, "files": files}


def error_summary(rows) -> dict:
    """{algorithm or "all": (count, median |error|, max |error|, flagged)}."""
    out = {}
    groups = {a: [r for r in rows if r["algorithm"] == a] for a in ALGORITHMS}
    groups["all"] = list(rows)
    for a, rs in groups.items():
        if rs:
            e = [abs(r["error"]) for r in rs]
            out[a] = (len(rs), statistics.median(e), max(e), sum(1 for x in e if x > FLAG))
    return out


# --------------------------------------------------------------------------- reports


def _us(t: float) -> str:
    us = t * 1e6
    return f"{us:.1f}" if us < 1e4 else f"{us:.0f}"


def _fmt_size(n) -> str:
    from ..bench import format_size

    return format_size(n)


def _regimes(d: dict) -> str:
    s = f"alpha {d['alpha'] * 1e6:.2f} us, beta {d['beta'] * 1e9:.4f} ns/B"
    for K, (a, b) in zip(d["knees"], d["above"]):
        s += f"; past {_fmt_size(K)}: {a * 1e6:.2f} us, {b * 1e9:.4f} ns/B"
    return s


def format_params(P: Params, ppn: int | None) -> list[str]:
    lines = [
        "# mpitrain bench --model: predicted allreduce times "
        "(alpha-beta-gamma per link type; a model, not a measurement)",
        f"#   intra-host (shared memory): {P.source}",
        f"#     {P.intra.text()};  gamma {P.gamma * 1e9:.4f} ns/B",
        f"#     ring (fitted at {P.ranks} ranks): {_regimes(P.ring)}",
        f"#     tree (fitted at {P.ranks} ranks): {_regimes(P.tree)}",
        f"#   inter-host (network): {P.inter.source}",
        f"#     {P.inter.text()}",
    ]
    if ppn is not None:
        lines.append(f"#   topology: N = H hosts x L ranks per host (--ppn {ppn}), ranks in blocks; "
                     "N <= L: one host")
    lines += [
        "#   ring  2(N-1)·s·alpha' + 2(N-1)/N·n·beta' + (N-1)/N·n·gamma; alpha', beta' inter-host (exchange) "
        "when H > 1",
        "#   tree  2Li·(alpha_t + n·beta_t) + 2Lh·(alpha_n' + n·beta_n') + (Li+Lh)·n·gamma;  "
        "Li = ceil(log2 L), Lh = ceil(log2 H)",
        "#   hier  tree within each host (2Li·(alpha_t + n·beta_t) + Li·n·gamma) "
        "+ ring across the H leaders (inter)",
        "#   each + the agreement check's Allgather beyond the fit's: Li·alpha_sx + (L-1)·r·beta_sx + "
        "Lh·alpha_nx + (H-1)·L·r·beta_nx - (the same at p0)  (x: exchange)",
        "#   inter-host alpha', beta' = the network's link + the fit's software overhead above the shared-memory "
        "link; ring steps and the check: exchange (both ranks send at once), tree levels: ping-pong (one way)",
        "#   the network's link per message of m bytes: its measured table at m where the source has one "
        "(log-log between measured sizes, the line outside; ring: m = one segment, tree: m = n, check: a round's "
        "rows), else alpha + m·beta",
        "#   native (MPI's Allreduce) is not extrapolated: its model is a table measured at one rank count on one "
        "host, and the library changes algorithm with N and topology",
    ]
    for note in P.notes:
        lines.append(f"#   NOTE {note}")
    return lines


HEAD = (f"#{'N':>6} {'H':>5} {'L':>4} {'size':>9} {'ring(us)':>12} {'tree(us)':>12} {'hier(us)':>12} "
        f"{'best':>6} {'busbw(GB/s)':>11}")


def table_rows(P: Params, Ns, sizes, ppn: int) -> list[dict]:
    out = []
    for N in Ns:
        H, L = topology(N, ppn)
        for n in sizes:
            pr = predict_all(P, n, N, ppn)
            b = best(pr)
            t = pr[b]
            bus = n / t / 1e9 * (2 * (N - 1) / N) if t > 0 else math.inf
            out.append({"ranks": N, "hosts": H, "ppn": L, "size": int(n),
                        **{f"{a}_us": pr[a] * 1e6 for a in ALGORITHMS}, "best": b, "busbw": bus})
    return out


def format_table(P: Params, Ns, sizes, ppn: int) -> str:
    lines = format_params(P, ppn) + ["#", HEAD]
    rows = table_rows(P, Ns, sizes, ppn)
    last = None
    for r in rows:
        if last is not None and r["ranks"] != last:
            lines.append("")
        last = r["ranks"]
        lines.append(f"{r['ranks']:>7} {r['hosts']:>5} {r['ppn']:>4} {_fmt_size(r['size']):>9} "
                     + " ".join(f"{_us(r[a + '_us'] * 1e-6):>12}" for a in ALGORITHMS)
                     + f" {r['best']:>6} {r['busbw']:>11.3f}")
    lines += ["#", "# crossovers (the size from which the first is predicted at least as fast at every larger size):"]
    fine = _fine(sizes)
    for N in Ns:
        H, L = topology(N, ppn)
        parts = []
        for a, b in (("ring", "tree"), ("ring", "hier"), ("hier", "tree")):
            if a == "hier" or b == "hier":
                if H == 1 or L == 1:
                    continue  # hier = tree on one host, = ring with one rank per host
            c = crossover(P, N, ppn, a, b, fine)
            parts.append(f"{a} >= {b} from " + ("never" if c is None else _fmt_size(c)))
        lines.append(f"#   N = {N:>5} ({H} x {L}): " + ", ".join(parts))
    return "\n".join(lines)


def _fine(sizes) -> list[int]:
    lo, hi = min(sizes), max(sizes)
    return sorted({int(x) for x in np.geomspace(lo, hi, 241)} | {int(s) for s in sizes})


def format_validation(P: Params, result: dict) -> str:
    lines = format_params(P, None)
    lines += ["#", "# validation: predicted vs measured (measured = the row's lower quartile of rounds where the "
                   "file has it, else its median; err = predicted/measured - 1; ! = |err| > "
                   f"{FLAG:.0%})"]
    for name, N, H, L in result["files"]:
        lines.append(f"#   {name}: {N} ranks = {H} host(s) x {L}")
    lines.append(f"#{'file':>24} {'N':>5} {'H':>3} {'size':>9} {'algorithm':>9} {'measured(us)':>13} "
                 f"{'predicted(us)':>13} {'err':>7}")
    for r in result["rows"]:
        flag = " !" if abs(r["error"]) > FLAG else ""
        lines.append(f"{Path(r['file']).name[-25:]:>25} {r['ranks']:>5} {r['hosts']:>3} {_fmt_size(r['size']):>9} "
                     f"{r['algorithm']:>9} {_us(r['measured']):>13} {_us(r['predicted']):>13} "
                     f"{r['error'] * 100:>+6.0f}%{flag}")
    if len(result["files"]) > 1:
        for name, *_ in result["files"]:
            summ = error_summary([r for r in result["rows"] if r["file"] == name])
            lines.append(f"# {Path(name).name}: " + ("; ".join(
                f"{a} median {m * 100:.0f}% max {x * 100:.0f}%" for a, (c, m, x, f) in summ.items()) or "no rows"))
    summ = error_summary(result["rows"])
    lines.append("# |error| per algorithm: " + ("; ".join(
        f"{a}: median {m * 100:.0f}%, max {x * 100:.0f}%, {f}/{c} rows above {FLAG:.0%}"
        for a, (c, m, x, f) in summ.items()) or "no modelled rows"))
    if result["skipped"]:
        lines.append("# not compared (not extrapolated): " + ", ".join(
            f"{a} ({c} rows)" for a, c in sorted(result["skipped"].items(), key=lambda kv: str(kv[0]))))
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def plot_model(path, P: Params, Ns, sizes, ppn: int) -> None:
    """Left: the predicted best algorithm over (N, size), with the crossover lines. Right: time vs N
    at a few sizes -- the ring's time stays flat at large n while the tree's grows with log2 N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lo_n, hi_n = max(2, min(Ns)), max(max(Ns), 3)
    k = 1
    grid_n = set(int(x) for x in Ns)  # the given rank counts and every power of two between them
    while k <= hi_n:
        if k >= lo_n:
            grid_n.add(k)
        k *= 2
    grid_n = sorted(grid_n)
    grid_s = _fine(sizes)[::2] + [max(sizes)]
    grid_s = sorted(set(grid_s))
    colors = {"ring": "#1f77b4", "tree": "#ff7f0e", "hier": "#2ca02c"}
    Z = np.array([[ALGORITHMS.index(best(predict_all(P, s, N, ppn))) for N in grid_n] for s in grid_s])

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=100)
    ax.pcolormesh(grid_n, grid_s, Z, cmap=ListedColormap([colors[a] for a in ALGORITHMS]), vmin=-0.5,
                  vmax=len(ALGORITHMS) - 0.5, shading="nearest", alpha=0.55)
    for (a, b), style in ((("ring", "tree"), "k-"), (("ring", "hier"), "k--")):
        xs, ys = [], []
        for N in grid_n:
            H, L = topology(N, ppn)
            if b == "hier" and (H == 1 or L == 1):
                continue
            c = crossover(P, N, ppn, a, b, grid_s)
            if c is not None and c > min(grid_s):
                xs.append(N)
                ys.append(c)
        if xs:
            ax.plot(xs, ys, style, lw=1.6, label=f"{a} at least as fast as {b} above")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator([2 ** k for k in range(1, 11) if lo_n <= 2 ** k <= hi_n]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{int(round(x))}"))
    ticks = [s for s in (8, 64, 512, 4096, 1 << 15, 1 << 18, 1 << 21, 1 << 24, 1 << 27, 1 << 30)
             if min(grid_s) <= s <= max(grid_s)]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: _fmt_size(int(round(x)))))
    ax.set_xlabel(f"ranks N ({ppn} per host, in blocks)")
    ax.set_ylabel("message size")
    ax.set_title("predicted fastest algorithm", fontsize=10)
    handles = [Patch(color=colors[a], alpha=0.55, label=a) for a in ALGORITHMS]
    ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=7, loc="lower left")

    # right: time vs N at a few sizes
    picks = [s for s in (4096, 1 << 20, 1 << 28, 1 << 30) if min(sizes) <= s <= max(sizes)] or [max(sizes)]
    picks = sorted(set(picks[:1] + picks[-2:]))
    styles = ["-", "--", ":"]
    marks = ["o", "s", "^"]
    for i, s in enumerate(picks):
        for a in ALGORITHMS:
            bx.plot(grid_n, [predict(P, a, s, N, ppn) for N in grid_n], styles[i % 3], marker=marks[i % 3], ms=3,
                    color=colors[a], label=f"{a}, {_fmt_size(s)}")
    bx.set_xscale("log", base=2)
    bx.set_yscale("log")
    bx.xaxis.set_major_locator(FixedLocator([2 ** k for k in range(1, 11) if lo_n <= 2 ** k <= hi_n]))
    bx.xaxis.set_minor_locator(NullLocator())
    bx.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{int(round(x))}"))
    bx.set_xlabel("ranks N")
    bx.set_ylabel("predicted time per allreduce (s)")
    bx.set_title("time vs N: ring flat at large n (2(N-1)/N·n·beta), tree grows with log2 N", fontsize=10)
    bx.grid(True, which="major", alpha=0.3)
    bx.legend(fontsize=7, ncol=len(picks), loc="upper left")
    from textwrap import shorten

    fig.suptitle(f"allreduce cost model extrapolated ({ppn} ranks per host)\n"
                 f"intra: {shorten(P.source, 110, placeholder=' ...')}\n"
                 f"inter: {shorten(P.inter.text(), 110, placeholder=' ...')}\n"
                 f"        {shorten(P.inter.source, 110, placeholder=' ...')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def parse_ranks(text) -> list[int]:
    """``2,4,8`` or ``2..1024`` (powers of two) -> sorted rank counts >= 2."""
    out = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ".." in part:
                lo, hi = (int(x) for x in part.split(".."))
                k = lo
                while k <= hi:
                    out.add(k)
                    k *= 2
                out.add(hi)
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"bad --ranks {text!r}: e.g. 2,8,64 or 2..1024 (powers of two)") from None
    if not out or min(out) < 2:
        raise ValueError(f"bad --ranks {text!r}: rank counts must be >= 2")
    return sorted(out)


def run(args, out=None) -> int:
    """``bench --model``: one process, prints the table (or the validation); --plot, --json."""
    from ..bench import have_matplotlib, size_range
    from ..runtime import UserError, warn

    out = out or sys.stdout
    try:
        P = load_params(args.link, args.from_json)
        Ns = parse_ranks(args.ranks) if args.ranks else list(DEFAULT_RANKS)
        hi = DEFAULT_MAX if getattr(args.max, "is_default", False) else args.max
        sizes = size_range(args.min, hi, args.step)
        docs = [(f, _read_json(Path(f).expanduser())) for f in str(args.validate).split(",") if f.strip()] \
            if args.validate else []
    except ValueError as e:
        raise UserError(f"bench --model: {e}") from None
    if args.plot and not have_matplotlib():
        raise UserError("--plot needs matplotlib: pip install 'mpitrain[plot]'")
    for note in P.notes:  # on stderr too: a fallback is never silent
        warn(note)
    ppn = args.ppn or os.cpu_count() or 1
    if docs:
        if args.from_json and set(str(args.from_json).split(",")) & set(str(args.validate).split(",")):
            P.notes.append("validating on files the inter-host link was fitted to: their ring rows are in-sample")
        res = validate(P, docs, args.ppn)
        print(format_validation(P, res), file=out, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"params": params_dict(P), "validation": res, "summary": {
                    a: dict(zip(("rows", "median_abs_error", "max_abs_error", "flagged"), v))
                    for a, v in error_summary(res["rows"]).items()}}, f, indent=1)
        return 0
    print(format_table(P, Ns, sizes, ppn), file=out, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": params_dict(P), "ppn": ppn, "rows": table_rows(P, Ns, sizes, ppn)}, f, indent=1)
            f.write("\n")
    if args.plot:
        plot_model(args.plot, P, Ns, sizes, ppn)
        print(f"# plot: {args.plot}", file=out)
    return 0


def params_dict(P: Params) -> dict:
    return {"gamma": P.gamma, "ring": P.ring, "tree": P.tree, "fitted_ranks": P.ranks, "intra_source": P.source,
            "intra": {"alpha": P.intra.alpha, "beta": P.intra.beta, "default": P.default,
                      "exchange": {"alpha": P.intra.exchange()[0], "beta": P.intra.exchange()[1],
                                   "measured": P.intra.has_exchange}},
            "inter": {"alpha": P.inter.alpha, "beta": P.inter.beta, "source": P.inter.source,
                      "default": P.inter.default,
                      "exchange": {"alpha": P.inter.exchange()[0], "beta": P.inter.exchange()[1],
                                   "measured": P.inter.has_exchange},
                      "tables": {"pingpong": P.inter.table,
                                 "exchange": P.inter.xtable if P.inter.has_exchange else None}},
            "notes": list(P.notes)}
