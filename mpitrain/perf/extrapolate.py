"""The cost model extrapolated to many ranks on many hosts: ``python -m mpitrain bench --model``.

Not a measurement and not an MPI run: pure arithmetic on fitted parameters, one process.

Two link types, each measured two ways by ``bench --fit`` (measure.py), alpha (s per message) and
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
(formulas.table_time: log-log interpolation between the two measured sizes around m -- exact at the
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

and, from ``bench --fit`` on one host (fit.py), gamma (s per byte reduced) and ring's and
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
ring_time / tree_time are formulas.py's formulas:

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

So with H = 1 and N = p0 ring and tree are exactly the fitted formulas
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

Where the parameters come from: sources.py; the link types' parameters: links.py (``Link``,
``Params``); fitting the network to bench rows and validating predictions: validate.py.
"""

from __future__ import annotations

from ..collectives import FUSE_MAX_RANKS, META, SMALL_BYTES
from .formulas import log2ceil, regime, ring_segments, ring_time, tree_time
from .links import Link, Params

ALGORITHMS = ("ring", "tree", "hier")  # what is extrapolated (order = tie-break for "best")


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
