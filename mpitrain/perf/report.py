"""Text about a fitted cost model: its parameters, predicted vs measured per size, auto vs the best.

    format_params        alpha, beta, gamma of the ping-pong and np.add; ring's and tree's fitted
                         (alpha, beta) per regime; native's table; the links when measured
    format_compare       per size: measured and predicted time per algorithm, the error, what the
                         model picks and what was measured fastest
    format_auto_vs_best  the bench's footer: auto's time over the best of the others it may run

Pure functions of a CostModel (model.py), the bench's rows and the measured primitives
(measure.py); ``bench --fit`` prints them on rank 0.
"""

from __future__ import annotations

import math
import statistics

from ..collectives import SMALL_BYTES
from ..collectives.tuning import CANDIDATES, ENV
from ..units import format_gbs, format_size, format_us
from .fit import DISTURBED, row_time
from .formulas import log2ceil
from .model import CostModel

POOR_FIT = 0.25  # bench --fit warns when ring's or tree's median |error| is above this


def _knee(d) -> str:
    return "".join(f"\n#                past {format_size(K)}: alpha {a * 1e6:8.2f} us   beta {b * 1e9:7.4f} ns/B"
                   for K, (a, b) in zip(d["knees"], d["above"]))


def format_params(model: CostModel) -> str:
    m, p = model, model.ranks
    lines = [
        f"# cost model: {p} ranks on {m.nodes} node(s), rank 0 on {m.host}; {m.mpi}",
        f"#   ping-pong (0<->1):  alpha {m.alpha * 1e6:8.2f} us   beta {m.beta * 1e9:7.4f} ns/B ({format_gbs(m.beta)})",
        f"#   np.add (rank 0):    gamma {m.gamma * 1e9:7.4f} ns/B ({format_gbs(m.gamma)}), "
        f"{m.reduce_overhead * 1e6:.2f} us per call",
        "#   ring (fit):  t = 2(p-1)·s·alpha + 2(p-1)/p·n·beta + (p-1)/p·n·gamma",
        f"#                alpha {m.ring['alpha'] * 1e6:8.2f} us   beta {m.ring['beta'] * 1e9:7.4f} ns/B{_knee(m.ring)}",
        f"#   tree (fit):  t = 2L·(alpha + n·beta) + L·n·gamma   (L = {log2ceil(p)})",
        f"#                alpha {m.tree['alpha'] * 1e6:8.2f} us   beta {m.tree['beta'] * 1e9:7.4f} ns/B{_knee(m.tree)}",
        f"#   native:      piecewise, log-log through {len(m.native)} measured sizes (lower envelope: non-decreasing)",
    ]
    if m.shm is not None:
        lines += ["#   shm (fit):   t = 2·alpha + 2n·beta + (p-1)/p·n·gamma   (zero-copy; scratch: + 4n·beta)",
                  f"#                alpha {m.shm['alpha'] * 1e6:8.2f} us   beta {m.shm['beta'] * 1e9:7.4f} ns/B"
                  f"{_knee(m.shm)}"]
    if m.fused is not None:
        lines.append(f"#   fused (auto, n <= {format_size(SMALL_BYTES)}): {m.fused * 1e6:.1f} us + (p-1)·n·gamma")
    for kind, what in (("intra", "within a node (shared memory)"), ("inter", "between nodes (network)")):
        ln = m.links.get(kind)
        if ln and ("inter" in m.links or "exchange" in ln):  # one node: the ping-pong is the one above
            pair = "<->".join(map(str, ln["ranks"]))
            if "inter" in m.links:
                lines.append(f"#   link {kind} ({pair}, {what}): alpha {ln['alpha'] * 1e6:8.2f} us   "
                             f"beta {ln['beta'] * 1e9:7.4f} ns/B ({format_gbs(ln['beta'])})")
            x = ln.get("exchange")
            if x:
                lines.append(f"#   link {kind} exchange ({pair}, both send at once): alpha {x['alpha'] * 1e6:8.2f} us"
                             f"   beta {x['beta'] * 1e9:7.4f} ns/B ({format_gbs(x['beta'])})")
    if m.disturbed:
        lines.append(f"#   not fitted, disturbed (native there > {DISTURBED:g}x its lower envelope): "
                     + ", ".join(format_size(n) for n in m.disturbed))
    return "\n".join(lines)


def compare(rows, model: CostModel) -> list[dict]:
    """Per size: measured and predicted seconds per algorithm, the model's pick, the measured best."""
    out = []
    for n in sorted({r["size"] for r in rows}):
        at = {r["algorithm"]: row_time(r) for r in rows if r["size"] == n}
        e = {"size": n, "measured": {}, "predicted": {}}
        for a in ("ring", "tree", "native") + (("shm",) if model.shm is not None else ()):
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
    algs = ("ring", "tree", "native", "fused") + (("shm",) if model.shm is not None else ())
    head = f"#{'size':>9}" + "".join(f" {a + ' meas':>12} {'pred':>8} {'err':>5}" for a in algs)
    head += f" {'picks':>7} {'best':>7} {'pick/best':>9}"
    lines = ["# predicted vs measured (us; measured = lower quartile of the timed rounds, what was fitted; "
             "err = predicted/measured - 1)",
             f"# picks: what auto runs above {format_size(SMALL_BYTES)} with this model; best: the fastest measured",
             head]
    errs = {a: [] for a in algs}
    for e in compare(rows, model):
        s = f"{format_size(e['size']):>10}"
        for a in algs:
            if a in e["measured"]:
                m, pr = e["measured"][a], e["predicted"][a]
                err = pr / m - 1
                errs[a].append(abs(err))
                s += f" {format_us(m):>12} {format_us(pr):>8} {err * 100:>+4.0f}%"
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
                     f"{w['pick_vs_best']:.2f}x the best ({format_size(w['size'])})")
    return "\n".join(lines)


def auto_vs_best(rows) -> list[dict]:
    """Per size with an auto row: auto's time over the best of the others auto may run (measured)."""
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
    timed = "/".join(a for a in CANDIDATES if any(r["algorithm"] == a for r in rows))
    line = (f"#     auto vs the best of {timed}: worst {worst['ratio']:.2f}x at "
            f"{format_size(worst['size'])} (auto ran {worst['picked'] or '?'}, best {worst['best']})")
    if over:
        line += f"; above {limit:g}x at: " + ", ".join(f"{format_size(e['size'])} ({e['ratio']:.2f}x)" for e in over)
    return [line]


def _timings(head: str, sizes, times) -> str:
    return head + "  ".join(f"{format_size(n)} {t * 1e6:.1f}" for n, t in zip(sizes, times))


def format_fit_report(model: CostModel, prims: dict, rows, path) -> str:
    """What ``bench --fit`` prints after the sweep: the parameters, the primitives' timings, predicted
    vs measured, where the model was stored (``path``; None: not stored)."""
    links = prims.get("links", {})
    lines = [
        "#",
        format_params(model),
        _timings("#   ping-pong one-way (us): ", *prims["pingpong"]),
        _timings("#   np.add (us):            ", *prims["reduce"]),
        *(_timings(f"#   ping-pong {k} {'<->'.join(map(str, ln['ranks']))} (us): ", *ln["pingpong"])
          for k, ln in sorted(links.items()) if "inter" in links),
        *(_timings(f"#   exchange {k} {'<->'.join(map(str, ln['ranks']))} (us): ", *ln["exchange"]["times"])
          for k, ln in sorted(links.items()) if "exchange" in ln),
        "#",
        format_compare(rows, model),
        "#",
        (f"# stored: {path} -- auto uses it for {model.ranks} ranks with rank 0 on {model.host} "
         f"(MPITRAIN_COST_FILE overrides the path; =off disables)") if path else
        f"# not stored ({ENV}=off)",
        "# the auto rows above ran the previous choice; run the bench again to time auto with this model",
    ]
    return "\n".join(lines)
