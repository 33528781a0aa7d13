#!/usr/bin/env python3
"""Scaling efficiency of the synthetic job: samples/s, comm share and efficiency per rank count and algorithm.

    python benchmarks/scaling.py                          # N = 1, 2, 4 x ring, tree, native, auto
    python benchmarks/scaling.py --ranks 1,2,4,8 --repeats 3 --set comm.bucket_bytes=4194304
    python benchmarks/scaling.py --markdown runs/scaling.md --plot docs/scaling.png

For each repeat, for each N, for each algorithm (interleaved, so slow drifts in the
machine's load hit every configuration alike) it runs

    mpirun -n N python -m mpitrain train JOB --set comm.algorithm=A [--set ...] --metrics-out F

and reads samples_per_s and comm_fraction from F. N = 1 runs once per repeat (with one
rank there is nothing to reduce: every algorithm is the same). Reported per cell: the
best samples/s of the repeats (the run least disturbed by other processes) and the median
comm share; efficiency = samples/s(N) / (N x samples/s(1)). Rank counts above the
machine's cores are oversubscribed -- the table says so next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mpitrain.compare import train_run  # noqa: E402  (mpirun ... train --metrics-out, one thread per rank)
from mpitrain.runtime import UserError  # noqa: E402
DEFAULT_JOB = ROOT / "jobs" / "synthetic.toml"
# a smaller variant of the synthetic job (same widths, batch and data generator): one epoch of 16 Ki rows
DEFAULT_SET = ["data.path=data/bench/synthetic-16k", "data.rows=16384", "train.epochs=1", "checkpoint.every=0",
               "data.dataset=synthetic"]


def run_one(n: int, algorithm: str, args, tmp: Path) -> dict:
    sets = [*DEFAULT_SET, *args.set, f"comm.algorithm={algorithm}"]
    try:
        m = train_run(n, sets, tmp / f"m-{n}-{algorithm}.json", job=args.job, timeout=args.timeout,
                      env={"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}, cwd=ROOT,
                      what=f"N={n} {algorithm}")
    except UserError as e:
        raise SystemExit(str(e)) from None
    print(f"#   N={n} {algorithm:>6}: {m['samples_per_s']:8,.0f} samples/s, comm {100 * m['comm_fraction']:.0f}%",
          file=sys.stderr, flush=True)
    return m


def collect(args) -> dict:
    ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
    algs = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    runs = {}  # (n, alg) -> [metrics]
    with tempfile.TemporaryDirectory(prefix="scaling-") as d:
        for rep in range(args.repeats):
            print(f"# repeat {rep + 1}/{args.repeats}", file=sys.stderr, flush=True)
            for n in ranks:
                for a in (algs if n > 1 else ["-"]):
                    m = run_one(n, algs[0] if a == "-" else a, args, Path(d))
                    runs.setdefault((n, a), []).append(m)
    return {"ranks": ranks, "algorithms": algs, "runs": runs}


def summarize(data: dict, cores: int) -> list[dict]:
    rows = []
    base = None
    if (1, "-") in data["runs"]:
        base = max(m["samples_per_s"] for m in data["runs"][(1, "-")])
    for (n, a), ms in data["runs"].items():
        sps = max(m["samples_per_s"] for m in ms)
        rows.append({"ranks": n, "algorithm": a, "samples_per_s": sps,
                     "samples_per_s_all": [m["samples_per_s"] for m in ms],
                     "comm_fraction": statistics.median(m["comm_fraction"] for m in ms),
                     "efficiency": sps / (n * base) if base else None,
                     "oversubscribed": n > cores})
    order = ["-", *data["algorithms"]]
    rows.sort(key=lambda r: (r["ranks"], order.index(r["algorithm"])))
    return rows


def markdown(rows, header: str) -> str:
    lines = [header, "",
             "| N | algorithm | samples/s (best) | all runs | comm share | efficiency |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        n = f"{r['ranks']} (oversubscribed)" if r["oversubscribed"] else str(r["ranks"])
        eff = "-" if r["efficiency"] is None else f"{100 * r['efficiency']:.0f}%"
        allr = ", ".join(f"{x:,.0f}" for x in r["samples_per_s_all"])
        lines.append(f"| {n} | {r['algorithm']} | {r['samples_per_s']:,.0f} | {allr} | "
                     f"{100 * r['comm_fraction']:.0f}% | {eff} |")
    return "\n".join(lines)


def plot(path, rows, title: str, cores: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=90)
    ranks = sorted({r["ranks"] for r in rows})
    base = next((r["samples_per_s"] for r in rows if r["ranks"] == 1), None)
    algs = [a for a in dict.fromkeys(r["algorithm"] for r in rows) if a != "-"]
    many = [n for n in ranks if n > 1]
    width = 0.8 / max(1, len(algs))
    for i, a in enumerate(algs):
        pts = sorted(((r["ranks"], r) for r in rows if r["algorithm"] == a or r["ranks"] == 1), key=lambda t: t[0])
        xs, ys = [n for n, _ in pts], [r["samples_per_s"] for _, r in pts]
        ax1.plot(xs, ys, "o-", color=f"C{i}", label=a)
        multi = [(n, r) for n, r in pts if n > 1]
        ax2.bar([many.index(n) + (i - (len(algs) - 1) / 2) * width for n, _ in multi],
                [100 * (r["efficiency"] or 0) for _, r in multi], width, color=f"C{i}", label=a)
    if base:
        ax1.plot(ranks, [base * n for n in ranks], "--", color="0.5", label="linear")
    over = [n for n in ranks if n > cores]
    if over:
        ax1.axvspan(cores + 0.5, max(ranks) + 0.5, color="0.9", zorder=0)
        ax1.text(cores + 0.6, ax1.get_ylim()[1] * 0.95, "oversubscribed", fontsize=7, va="top")
    ax1.set_xticks(ranks)
    ax1.set_xlabel("ranks")
    ax1.set_ylabel("samples/s")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.set_xticks(range(len(many)))
    ax2.set_xticklabels([f"{n}{'*' if n > cores else ''}" for n in many])
    ax2.axhline(100, color="0.5", ls="--", lw=1)
    ax2.set_xlabel(f"ranks (* = more than {cores} cores)")
    ax2.set_ylabel("efficiency (%)")
    ax2.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--algorithms", default="ring,tree,native,auto")
    ap.add_argument("--job", default=str(DEFAULT_JOB))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a job key for every run (after: " + " ".join(DEFAULT_SET) + ")")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", default="runs/scaling.md", help="table goes here (default runs/scaling.md)")
    ap.add_argument("--json", default="runs/scaling.json", help="all runs' metrics (default runs/scaling.json)")
    ap.add_argument("--plot", default="docs/scaling.png", help="PNG (default docs/scaling.png; '' = none)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per mpirun")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    data = collect(args)
    rows = summarize(data, cores)
    cmd = "python benchmarks/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"`{cmd.strip()}` -- {Path(args.job).name} with {' '.join(DEFAULT_SET + args.set)}; "
              f"{cores} cores, 1 thread per rank; best of {args.repeats} interleaved runs")
    text = markdown(rows, header)
    print(text)
    for path, content in ((args.markdown, text + "\n"),
                          (args.json, json.dumps({"rows": rows, "runs": {f"{n}/{a}": ms for (n, a), ms
                                                                        in data["runs"].items()}}, indent=1))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(args.plot, rows, f"{Path(args.job).name} ({' '.join([*DEFAULT_SET[1:3], *args.set])}): "
                              f"scaling on {cores} cores, best of {args.repeats}", cores)
        print(f"# plot: {args.plot} ({Path(args.plot).stat().st_size // 1024} KiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
