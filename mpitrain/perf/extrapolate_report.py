"""Text and JSON about the extrapolation (``bench --model``): the parameters, the table per N and size,
the crossovers, the validation against bench files (one row per file row, flagged beyond FLAG).

Pure functions of Params (links.py) and the predictions (extrapolate.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..units import format_size, format_us
from .extrapolate import ALGORITHMS, best, crossover, predict_all, topology
from .links import Params
from .validate import FLAG, error_summary


def _regimes(d: dict) -> str:
    s = f"alpha {d['alpha'] * 1e6:.2f} us, beta {d['beta'] * 1e9:.4f} ns/B"
    for K, (a, b) in zip(d["knees"], d["above"]):
        s += f"; past {format_size(K)}: {a * 1e6:.2f} us, {b * 1e9:.4f} ns/B"
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
        lines.append(f"{r['ranks']:>7} {r['hosts']:>5} {r['ppn']:>4} {format_size(r['size']):>9} "
                     + " ".join(f"{format_us(r[a + '_us'] * 1e-6):>12}" for a in ALGORITHMS)
                     + f" {r['best']:>6} {r['busbw']:>11.3f}")
    lines += ["#", "# crossovers (the size from which the first is predicted at least as fast at every larger size):"]
    fine = fine_sizes(sizes)
    for N in Ns:
        H, L = topology(N, ppn)
        parts = []
        for a, b in (("ring", "tree"), ("ring", "hier"), ("hier", "tree")):
            if a == "hier" or b == "hier":
                if H == 1 or L == 1:
                    continue  # hier = tree on one host, = ring with one rank per host
            c = crossover(P, N, ppn, a, b, fine)
            parts.append(f"{a} >= {b} from " + ("never" if c is None else format_size(c)))
        lines.append(f"#   N = {N:>5} ({H} x {L}): " + ", ".join(parts))
    return "\n".join(lines)


def fine_sizes(sizes) -> list[int]:
    """241 sizes spaced evenly in log between the smallest and the largest of ``sizes``, and ``sizes``."""
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
        lines.append(f"{Path(r['file']).name[-25:]:>25} {r['ranks']:>5} {r['hosts']:>3} {format_size(r['size']):>9} "
                     f"{r['algorithm']:>9} {format_us(r['measured']):>13} {format_us(r['predicted']):>13} "
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
