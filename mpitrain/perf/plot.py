"""Plots of the cost model (PNG, matplotlib's Agg backend; matplotlib is the ``plot`` extra).

    plot_fit     time vs size, log-log: measured (solid, markers) and predicted (dashed) per
                 algorithm (``bench --fit --plot``)
    plot_model   left: the predicted best algorithm over (N ranks, size) with the crossover lines;
                 right: time vs N at a few sizes (``bench --model --plot``)
    size_axes    log-log axes with message sizes as x ticks, shared with the bench's busbw plot
"""

from __future__ import annotations

import importlib.util
import math
from textwrap import shorten

import numpy as np

from ..collectives import SMALL_BYTES
from ..runtime import UserError
from ..units import format_size
from .extrapolate import ALGORITHMS, best, crossover, predict, predict_all, topology
from .extrapolate_report import fine_sizes
from .fit import times_of
from .links import Params
from .model import CostModel

COLORS = {"ring": "#1f77b4", "tree": "#ff7f0e", "hier": "#2ca02c"}


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def pyplot():
    """matplotlib.pyplot on the Agg backend (files, no display); UserError when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'mpitrain[plot]'") from None
    return plt


def size_axes(ax, sizes, ylabel: str) -> None:
    """Log-log axes with message sizes (8B, 1MiB, ...) as x ticks: shared by every bench plot."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    plt = pyplot()
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    every = max(1, math.ceil(len(sizes) / 14))
    ax.xaxis.set_major_locator(FixedLocator(sizes[::every]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_size(int(round(x)))))
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    ax.set_xlabel("message size")
    ax.set_ylabel(ylabel)


def plot_fit(path, rows, model: CostModel, meta: dict | None = None) -> None:
    """Time vs size, log-log: measured (solid, markers) and predicted (dashed) per algorithm."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    sizes = sorted({r["size"] for r in rows})
    fine = sorted(set(np.geomspace(min(sizes), max(sizes), 120).astype(int).tolist()) | set(sizes))
    for i, a in enumerate(("ring", "tree", "native", "fused")):
        src = "auto" if a == "fused" else a
        xs, ts = times_of(rows, src)
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


# --------------------------------------------------------------------------- bench --model


def _rank_axis(ax, lo_n: int, hi_n: int) -> None:
    """x: rank counts, log2, ticks at the powers of two from lo_n to hi_n."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator([2 ** k for k in range(1, 11) if lo_n <= 2 ** k <= hi_n]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{int(round(x))}"))


def _best_map(ax, P: Params, grid_n, grid_s, ppn: int, lo_n: int, hi_n: int) -> None:
    """The predicted best algorithm over (N, size), with the crossover lines."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    Z = np.array([[ALGORITHMS.index(best(predict_all(P, s, N, ppn))) for N in grid_n] for s in grid_s])
    ax.pcolormesh(grid_n, grid_s, Z, cmap=ListedColormap([COLORS[a] for a in ALGORITHMS]), vmin=-0.5,
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
    _rank_axis(ax, lo_n, hi_n)
    ax.set_yscale("log", base=2)
    ticks = [s for s in (8, 64, 512, 4096, 1 << 15, 1 << 18, 1 << 21, 1 << 24, 1 << 27, 1 << 30)
             if min(grid_s) <= s <= max(grid_s)]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: format_size(int(round(x)))))
    ax.set_xlabel(f"ranks N ({ppn} per host, in blocks)")
    ax.set_ylabel("message size")
    ax.set_title("predicted fastest algorithm", fontsize=10)
    handles = [Patch(color=COLORS[a], alpha=0.55, label=a) for a in ALGORITHMS]
    ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=7, loc="lower left")


def _time_vs_n(bx, P: Params, grid_n, sizes, ppn: int, lo_n: int, hi_n: int) -> None:
    """Time vs N at a few sizes: the ring's time stays flat at large n, the tree's grows with log2 N."""
    picks = [s for s in (4096, 1 << 20, 1 << 28, 1 << 30) if min(sizes) <= s <= max(sizes)] or [max(sizes)]
    picks = sorted(set(picks[:1] + picks[-2:]))
    styles = ["-", "--", ":"]
    marks = ["o", "s", "^"]
    for i, s in enumerate(picks):
        for a in ALGORITHMS:
            bx.plot(grid_n, [predict(P, a, s, N, ppn) for N in grid_n], styles[i % 3], marker=marks[i % 3], ms=3,
                    color=COLORS[a], label=f"{a}, {format_size(s)}")
    _rank_axis(bx, lo_n, hi_n)
    bx.set_yscale("log")
    bx.set_xlabel("ranks N")
    bx.set_ylabel("predicted time per allreduce (s)")
    bx.set_title("time vs N: ring flat at large n (2(N-1)/N·n·beta), tree grows with log2 N", fontsize=10)
    bx.grid(True, which="major", alpha=0.3)
    bx.legend(fontsize=7, ncol=len(picks), loc="upper left")


def plot_model(path, P: Params, Ns, sizes, ppn: int) -> None:
    """Left: the predicted best algorithm over (N, size), with the crossover lines. Right: time vs N
    at a few sizes -- the ring's time stays flat at large n while the tree's grows with log2 N."""
    plt = pyplot()
    lo_n, hi_n = max(2, min(Ns)), max(max(Ns), 3)
    k = 1
    grid_n = set(int(x) for x in Ns)  # the given rank counts and every power of two between them
    while k <= hi_n:
        if k >= lo_n:
            grid_n.add(k)
        k *= 2
    grid_n = sorted(grid_n)
    grid_s = sorted(set(fine_sizes(sizes)[::2] + [max(sizes)]))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=100)
    _best_map(ax, P, grid_n, grid_s, ppn, lo_n, hi_n)
    _time_vs_n(bx, P, grid_n, sizes, ppn, lo_n, hi_n)
    fig.suptitle(f"allreduce cost model extrapolated ({ppn} ranks per host)\n"
                 f"intra: {shorten(P.source, 110, placeholder=' ...')}\n"
                 f"inter: {shorten(P.inter.text(), 110, placeholder=' ...')}\n"
                 f"        {shorten(P.inter.source, 110, placeholder=' ...')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
