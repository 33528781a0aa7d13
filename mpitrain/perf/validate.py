"""The extrapolation against measurements: the network link fitted to bench rows, and predicted vs measured.

    fit_inter   bench JSON files of multi-host runs -> one (alpha_n, beta_n) for the network, the
                intra-host parameters fixed: every prediction is affine in (alpha_n, beta_n), so
                it is a relative least squares (fit.lsq_relative) on the rows' times
    validate    every ring, tree and hier row of bench JSON files: measured (the row's lower
                quartile of rounds, else its median) vs predicted, error = predicted/measured - 1;
                rows beyond FLAG are flagged
"""

from __future__ import annotations

import statistics

import numpy as np

from .extrapolate import ALGORITHMS, predict, topology
from .fit import lsq_relative, row_time
from .links import Link, Params

FLAG = 0.20  # validation flags rows whose |predicted/measured - 1| is above this


def file_topology(doc: dict, ppn: int | None = None) -> tuple[int, int, int]:
    """(N ranks, H hosts, L ranks per host) of a bench JSON: nodes, else distinct host names, in
    its meta; ``ppn`` overrides (H = ceil(N / ppn))."""
    meta = doc.get("meta") or {}
    rows = doc.get("rows") or []
    N = int(meta.get("ranks") or max((r.get("ranks", 1) for r in rows if r.get("algorithm") not in ("memcpy", "p2p", "d2h")),
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
    (alpha_n, beta_n), so this is the relative least squares of fit.lsq_relative."""
    X, y, off, names = [], [], [], []
    for name, doc in docs:
        N, H, L = file_topology(doc)
        if H < 2:
            raise ValueError(f"{name}: its ranks ran on one host (meta: {N} ranks, hosts "
                             f"{(doc.get('meta') or {}).get('hosts')}): no inter-host link to fit")
        for r in doc.get("rows") or []:
            if r.get("algorithm") not in algorithms or row_time(r) <= 0:
                continue
            n = int(r["size"])
            f0 = predict(P.with_inter(Link(0.0, 0.0, xalpha=0.0, xbeta=0.0)), r["algorithm"], n, N, L)
            fa = predict(P.with_inter(Link(1.0, 0.0, xalpha=1.0, xbeta=0.0)), r["algorithm"], n, N, L) - f0
            fb = predict(P.with_inter(Link(0.0, 1.0, xalpha=0.0, xbeta=1.0)), r["algorithm"], n, N, L) - f0
            X.append([fa, fb])
            y.append(row_time(r))
            off.append(f0)
        names.append(name)
    if len(y) < 2:
        raise ValueError(f"fitting the inter-host link needs {' or '.join(algorithms)} rows at two sizes at least "
                         f"in {', '.join(names)}")
    a, b = lsq_relative(np.array(X), np.array(y), np.array(off))
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
            t = row_time(r)
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
