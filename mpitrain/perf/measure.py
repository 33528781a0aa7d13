"""Measuring the primitives the cost model is fitted with (collective): ping-pong, exchange, reduction.

    ping-pong   rank a sends n bytes to rank b, b sends them back; one way = median RTT / 2
                (sizes 8 B .. max, x4)                                  -> alpha, beta
    exchange    a and b Sendrecv n bytes to each other at once; median seconds per exchange
                (what every ring step and the check's Allgather do)      -> its own alpha, beta
    reduce      np.add(a, b, out=a) on rank 0 (sizes 4 KiB .. max, x4)  -> gamma (+ per call)
    links       per link type the job has (``link_pairs``: within a node, between nodes), a
                ping-pong and an exchange, each kept as fitted (alpha, beta) and as its table

Steps 1 and 1b of the fit (fit.py's docstring). The ranks not taking part wait in a
non-blocking barrier without busy-polling, so they do not steal the measuring ranks' cores.
Every function returns the same values on every rank.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from ..units import geometric
from .fit import fit_alpha_beta, fit_gamma

TAG_PING = 21  # on the library's private communicator (collectives use 11-13, non-blocking 1000+)


def _quiet_barrier(comm):
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.0005)


def pingpong_sizes(max_bytes: int) -> list[int]:
    return geometric(8, max_bytes, 4) or [8]


def pingpong_reps(n: int) -> int:
    """Round trips a ping-pong of ``n`` bytes is timed over (the bench's p2p row says it too)."""
    return max(5, min(200, int(4e7 // max(n, 1))))


_reps = pingpong_reps


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
    return geometric(4096, max_bytes, 4) or [4096]


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


def measure_primitives(comm, max_bytes: int, dtype="float32", nodes=None, pingpong=None) -> dict:
    """Collective: ping-pong and reduction timings, and their fits (same on every rank).

    ``nodes`` (``node_ids``): when the ranks span more than one node, also a ping-pong per link
    type (``links``: within a node, between nodes). ``pingpong`` ([sizes], [one-way seconds]) of
    ranks 0 and 1 measured already (the bench's p2p rows, bench/fit.py): used instead of timing again."""
    if pingpong and comm.Get_size() > 1:
        pp, tp = [int(n) for n in pingpong[0]], [float(t) for t in pingpong[1]]
    else:
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
