"""The bench's output: the table (header, one row per size and algorithm, footer), CSV, JSON, the plot.

    #     size      count     type    op    algorithm    time(us) algbw(GB/s) busbw(GB/s)  speedup  #wrong

CSV has the columns COLUMNS; JSON {"meta": run parameters, "rows": [...]} (every key of a row);
the plot draws busbw vs size per algorithm, memcpy, p2p (and d2h) as dashed ceilings.
"""

from __future__ import annotations

import csv
import math

from ..perf.plot import pyplot, size_axes
from ..units import format_size, json_text
from .timing import MAX_ROUNDS, MIN_ROUNDS, TARGET_SECONDS

COLUMNS = ("size", "count", "type", "op", "algorithm", "picked", "time_us", "algbw", "busbw",
           "speedup", "wrong", "iters", "ranks")


def _alg_text(row) -> str:
    return f"{row['algorithm']}:{row['picked']}" if row.get("picked") else row["algorithm"]


HEADER = (f"#{'size':>9} {'count':>10} {'type':>8} {'op':>5} {'algorithm':>12} {'time(us)':>11} "
          f"{'algbw(GB/s)':>11} {'busbw(GB/s)':>11} {'speedup':>8} {'#wrong':>7}")


CEILINGS = ("memcpy", "p2p", "d2h")  # rows that are copies or messages, not all-reduces


def format_row(row) -> str:
    memcpy = row["algorithm"] in CEILINGS
    sp = "-" if row.get("speedup") is None else f"{row['speedup']:.2f}"
    wrong = "-" if memcpy else str(row["wrong"])
    return (f"{format_size(row['size']):>10} {row['count']:>10} {row['type']:>8} {row['op']:>5} "
            f"{_alg_text(row):>12} {row['time_us']:>11.1f} {row['algbw']:>11.3f} {row['busbw']:>11.3f} "
            f"{sp:>8} {wrong:>7}")


_WRONG = {  # what #wrong compares, per collective (the allreduce's line takes the tolerance)
    "allreduce": "#   #wrong: elements differing from native ({tol}) or between ranks; ",
    "reduce_scatter": "#   #wrong: elements of this rank's chunk differing from the op over every rank's "
                      "input ({tol}); ",
    "allgather": "#   #wrong: elements differing from every rank's chunk of its input (exact) or between ranks; ",
}


def format_header(meta: dict) -> str:
    tol = "exact" if not meta["rtol"] else f"rtol {meta['rtol']:.2g}"
    iters = meta["iters"] or f"auto (~{TARGET_SECONDS:g} s per size, {MIN_ROUNDS}..{MAX_ROUNDS})"
    coll = meta.get("collective", "allreduce")
    factor = "2(n-1)/n" if coll == "allreduce" else "(n-1)/n"
    lines = [
        f"# mpitrain bench: {coll}",
        f"#   ranks {meta['ranks']} on {len(meta['hosts'])} host(s): {', '.join(meta['hosts'])}"
        + (f" ({meta['nodes']} nodes by shared memory)" if meta.get("nodes", 1) > len(meta["hosts"]) else ""),
        f"#   MPI library: {meta['mpi']}",
        f"#   dtype {meta['dtype']}  op {meta['op']}  backend {meta['backend']}  "
        f"algorithms {','.join(meta['algorithms'])}",
        f"#   sizes {format_size(meta['min'])}..{format_size(meta['max'])} x{meta['step']:g}  "
        f"iters {iters}  "
        f"warmup {meta['warmup']}",
        f"#   time: max over ranks of the median; algbw = bytes/time; busbw = algbw*{factor}"
        + (" -- at 1 rank that is 0 (no bytes move), so busbw = algbw here: a local copy, not a network; "
           "mpirun -n 2 or more measures one" if meta["ranks"] == 1 else "") + "; speedup = native time / time",
        _WRONG[coll].format(tol=tol) + "memcpy: one rank copying the same bytes (the ceiling)",
        "#   p2p: ranks 0 and 1 ping-pong the same bytes, busbw = bytes / one-way time (the wire every "
        "algorithm here runs on)",
        "#",
        HEADER,
    ]
    if meta.get("backend") == "cupy":
        lines[-2:-2] = ["#   d2h: every rank copying the bytes GPU -> pinned host at once (the staged "
                        "ring's copy ceiling); " + meta.get("cuda_aware", "")]
    return "\n".join(lines)


def format_table(rows, meta: dict | None = None) -> str:
    parts = [format_header(meta)] if meta else [HEADER]
    parts += [format_row(r) for r in rows]
    return "\n".join(parts)


def _peaks(rows, algs) -> list[str]:
    """Per algorithm its peak busbw and, except native, its speedup vs native (>= 1 MiB where there is)."""
    out, big = [], 1 << 20
    for a in algs:
        rs = [r for r in rows if r["algorithm"] == a]
        peak = max(rs, key=lambda r: r["busbw"])
        line = f"# {a:>8}: peak busbw {peak['busbw']:.3f} GB/s at {format_size(peak['size'])}"
        if a != "native":
            sel = [r for r in rs if r["size"] >= big] or rs
            sp = [r["speedup"] for r in sel if r["speedup"] and math.isfinite(r["speedup"])]
            if sp:
                gm = math.exp(sum(math.log(x) for x in sp) / len(sp))
                span = ">= 1MiB" if sel is not rs else "all sizes"
                line += f"; speedup vs native ({span}): geo-mean {gm:.2f}, range {min(sp):.2f}..{max(sp):.2f}"
        out.append(line)
    return out


def _against(rows, algs, ceiling: str, how: str, ratio: str) -> list[str]:
    """A ceiling row's peak, and each algorithm's busbw over the ceiling's at the largest size."""
    top_rows = {r["size"]: r for r in rows if r["algorithm"] == ceiling}
    if not top_rows:
        return []
    peak = max(top_rows.values(), key=lambda r: r["busbw"])
    out = [f"# {ceiling:>8}: peak {peak['busbw']:.3f} GB/s at {format_size(peak['size'])} {how}"]
    top = max(top_rows)
    for a in algs:
        r = next((r for r in rows if r["algorithm"] == a and r["size"] == top), None)
        if r is not None and top_rows[top]["busbw"] > 0:
            out.append(f"# {a:>8}: {ratio} at {format_size(top)}: {r['busbw'] / top_rows[top]['busbw']:.2f}")
    return out


def _ceilings(rows, algs) -> list[str]:
    """The memcpy, p2p and d2h peaks, and each algorithm's busbw against p2p and d2h at the largest size."""
    out = []
    mc = [r for r in rows if r["algorithm"] == "memcpy"]
    if mc:
        peak = max(mc, key=lambda r: r["busbw"])
        out.append(f"#   memcpy: peak {peak['busbw']:.3f} GB/s at {format_size(peak['size'])} (one rank)")
    out += _against(rows, algs, "p2p", "(ping-pong, ranks 0-1)", "busbw / p2p")
    out += _against(rows, algs, "d2h", "(all ranks at once)", "busbw / d2h ceiling")
    return out


def summarize(rows) -> list[str]:
    """Footer lines: wrong results, and per algorithm its peak busbw and speedup vs native."""
    bad = [r for r in rows if r.get("wrong")]
    if bad:
        where = ", ".join(f"{_alg_text(r)} at {format_size(r['size'])} ({r['wrong']})" for r in bad[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        out = [f"# wrong results: {sum(r['wrong'] for r in bad)} elements -- FAILED: {where}{more}"]
    else:
        out = ["# wrong results: 0 -- OK"]
    algs = list(dict.fromkeys(r["algorithm"] for r in rows if r["algorithm"] not in CEILINGS))
    return out + _peaks(rows, algs) + _ceilings(rows, algs)


def write_csv(path, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})


def write_json(path, rows, meta: dict | None = None) -> None:
    with open(path, "w") as f:
        f.write(json_text({"meta": meta or {}, "rows": rows}, indent=1))
        f.write("\n")


def plot(path, rows, meta: dict | None = None) -> None:
    """busbw vs size per algorithm, log-log, memcpy as a dashed ceiling; PNG (Agg)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    algs = list(dict.fromkeys(r["algorithm"] for r in rows))
    for a in algs:
        rs = sorted((r for r in rows if r["algorithm"] == a), key=lambda r: r["size"])
        xs = [r["size"] for r in rs]
        ys = [max(r["busbw"], 1e-9) for r in rs]
        if a == "memcpy":
            ax.plot(xs, ys, "--", color="0.3", label="memcpy (1 rank, ceiling)")
        elif a == "p2p":
            ax.plot(xs, ys, "-.", color="0.45", label="p2p ping-pong (ranks 0-1, the wire)")
        elif a == "d2h":
            ax.plot(xs, ys, ":", color="0.3", label="GPU->host copy (all ranks, staging ceiling)")
        else:
            ax.plot(xs, ys, "o-", ms=3, label=a)
    size_axes(ax, sorted({r["size"] for r in rows}), "busbw (GB/s)")
    if meta:
        ax.set_title(f"{meta.get('collective', 'allreduce')} busbw: {meta.get('ranks')} ranks on {len(meta.get('hosts', []))} host(s), "
                     f"{meta.get('dtype')} {meta.get('op')}\n{meta.get('mpi', '')}", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
