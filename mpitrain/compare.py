"""``python -m mpitrain compare``: one job, every synchronization strategy, one report.

    for each strategy S (interleaved over --repeats):
        mpirun -n N python -m mpitrain train JOB --set <S's keys> --metrics-out runs/S.json
    -> a table (final accuracy, wall time, bytes sent per step and in all, vs the baseline)
    -> one PNG: test accuracy vs wall time | test accuracy vs bytes communicated

Run it WITHOUT mpirun: it launches its own (the one next to this Python, else on
PATH, else --mpirun). Each run's metrics JSON (with its per-epoch history) is kept
in --out, so a plot can be redrawn without training again (--replot).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .runtime import UserError, job_size
from .units import json_text

# name -> the --set options that select it (on top of the job and the user's --set)
STRATEGIES = {
    "sync": [],
    "fp16": ["comm.compress=\"fp16\""],
    "topk": ["comm.compress=\"topk\"", "comm.topk_ratio=0.01"],
    "topk-noef": ["comm.compress=\"topk\"", "comm.topk_ratio=0.01", "comm.error_feedback=false"],
    "sign": ["comm.compress=\"sign\""],
    "sign-noef": ["comm.compress=\"sign\"", "comm.error_feedback=false"],
    "local4": ["train.sync_every=4"],
    "local16": ["train.sync_every=16"],
    "ps": ["comm.mode=\"ps\"", "comm.max_staleness=4"],
    "zero1": ["train.zero=1"],  # the same averages as sync; optimizer state sharded (sync/zero.py)
}
DEFAULT = "sync,fp16,topk,topk-noef,sign,sign-noef,local4,local16,ps,zero1"
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", help="job file (TOML); default: the built-in digits job")
    p.add_argument("--ranks", "-n", type=int, default=4, help="ranks per run (default 4)")
    p.add_argument("--strategies", default=DEFAULT,
                   help=f"comma-separated, from: {', '.join(STRATEGIES)} (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="applied to every run, e.g. --set train.epochs=10")
    p.add_argument("--repeats", type=int, default=1, help="runs per strategy; the table shows the median (default 1)")
    p.add_argument("--out", default="runs/compare", help="directory for each run's metrics JSON (default runs/compare)")
    p.add_argument("--plot", metavar="FILE.png", help="draw accuracy vs time and vs bytes (needs matplotlib)")
    p.add_argument("--markdown", metavar="FILE.md", help="also write the table as Markdown")
    p.add_argument("--mpirun", help="the launcher (default: the mpirun next to this Python, else on PATH)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run (default 600)")
    p.add_argument("--replot", action="store_true", help="do not train: table and plot from --out's JSON")
    p.set_defaults(func=main)


def _strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STRATEGIES]
    if bad or not names:
        raise UserError(f"--strategies: unknown {', '.join(map(repr, bad)) or '(none given)'}; "
                        f"choose from {', '.join(STRATEGIES)}")
    return names


def _mpirun(explicit: str | None) -> str:
    found = explicit or shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if not found:
        raise UserError("no mpirun found next to this Python or on PATH; pass --mpirun PATH "
                        "(pip install mpich brings one)")
    return found


def train_run(n: int, sets, metrics: Path, *, job=None, mpirun: str | None = None, timeout=None,
              entry=("-m", "mpitrain"), env=None, cwd=None, what: str = "training") -> dict:
    """``mpirun -n n python ENTRY train [JOB] --set S ... --metrics-out METRICS``, one thread per rank
    (``env`` on top); its metrics, with ``"command"`` added. A run that fails, writes no metrics or
    outlives ``timeout`` raises UserError naming ``what``, the command and the run's last lines.
    Also what the benchmark scripts that train (benchmarks/*.py) call."""
    metrics = Path(metrics)
    metrics.unlink(missing_ok=True)
    cmd = [mpirun or _mpirun(None), "-n", str(n), sys.executable, *entry, "train", *([str(job)] if job else [])]
    for s in sets:
        cmd += ["--set", s]
    cmd += ["--metrics-out", str(metrics)]
    try:
        res = subprocess.run(cmd, env=dict(os.environ, **THREAD_ENV, **(env or {})), cwd=cwd,
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"{what}: no result after {timeout:.0f} s (--timeout); command: {' '.join(cmd)}") from None
    if res.returncode != 0 or not metrics.exists():
        tail = (res.stdout + res.stderr).strip().splitlines()[-6:]
        raise UserError(f"{what}: training failed (exit {res.returncode}); command: {' '.join(cmd)}\n  "
                        + "\n  ".join(tail))
    m = json.loads(metrics.read_text())
    m["command"] = " ".join(cmd)
    return m


def run_one(name: str, rep: int, args, mpirun: str, out: Path) -> dict:
    """Train once with strategy ``name``; return its metrics (or raise UserError with the run's tail)."""
    path = out / f"{name}-{rep}.json"
    sets = [*args.overrides, *STRATEGIES[name], f"checkpoint.dir={out / 'ckpt' / name}"]
    t0 = time.perf_counter()
    m = train_run(args.ranks, sets, path, job=args.job, mpirun=mpirun, timeout=args.timeout, what=name)
    m["name"] = name
    path.write_text(json_text(m, indent=2) + "\n")
    print(f"# {name:<10} accuracy {m['test_accuracy']:.4f}  {time.perf_counter() - t0:5.1f} s end to end "
          f"(start-up included; training {m['wall_s']:.1f} s)  "
          f"{m['bytes_per_step'] / 1e3:9.1f} kB/step/rank", file=sys.stderr, flush=True)
    return m


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per strategy: medians over repeats; bytes relative to the first strategy."""
    rows = []
    for name, ms in runs.items():
        rows.append({"strategy": name, "label": ms[0]["strategy"], "ranks": ms[0]["ranks"], "runs": len(ms),
                     "test_accuracy": _median([m["test_accuracy"] for m in ms]),
                     "wall_s": _median([m["wall_s"] for m in ms]),
                     "bytes_per_step": _median([m["bytes_per_step"] for m in ms]),
                     "comm_bytes": _median([m["comm_bytes"] for m in ms]),
                     "steps": ms[0]["steps"]})
    base = rows[0]["comm_bytes"] if rows else 0
    for r in rows:
        r["bytes_vs_first"] = r["comm_bytes"] / base if base else float("nan")
    return rows


def table(rows: list[dict], markdown: bool = False) -> str:
    head = ["strategy", "setting", "test acc", "train s", "kB/step/rank", "MB in all", f"bytes vs {rows[0]['strategy']}"]
    lines = []
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    else:
        lines.append(f"{head[0]:<10} {head[1]:<26} {head[2]:>8} {head[3]:>7} {head[4]:>13} {head[5]:>10} {head[6]:>10}")
    for r in rows:
        cells = [r["strategy"], r["label"], f"{r['test_accuracy']:.4f}", f"{r['wall_s']:.2f}",
                 f"{r['bytes_per_step'] / 1e3:.1f}", f"{r['comm_bytes'] / 1e6:.2f}", f"{r['bytes_vs_first']:.3f}"]
        if markdown:
            lines.append("| " + " | ".join(cells) + " |")
        else:
            lines.append(f"{cells[0]:<10} {cells[1]:<26} {cells[2]:>8} {cells[3]:>7} {cells[4]:>13} {cells[5]:>10} "
                         f"{cells[6]:>10}")
    return "\n".join(lines)


def plot(path: str, runs: dict[str, list[dict]], title: str) -> None:
    """Test accuracy per epoch vs wall time (left) and vs bytes sent by all ranks (right)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'mpitrain[plot]'") from None
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for name, ms in runs.items():
        m = sorted(ms, key=lambda r: r["wall_s"])[len(ms) // 2]  # the repeat with the median wall time
        h = m["history"]
        if not h:
            continue
        acc = [e["test_accuracy"] for e in h]
        kw = dict(marker="o", ms=3, label=f"{name}: {m['strategy']}")
        a.plot([e["wall_s"] for e in h], acc, **kw)
        b.plot([max(e["comm_bytes"], 1.0) / 1e6 for e in h], acc, **kw)
    a.set_xlabel("wall time (s)")
    b.set_xlabel("bytes sent by all ranks (MB, log)")
    b.set_xscale("log")
    a.set_ylabel("test accuracy")
    lo = min((e["test_accuracy"] for ms in runs.values() for m in ms for e in m["history"]), default=0.0)
    a.set_ylim(max(0.0, min(lo, 0.8) - 0.02), 1.0)
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
    b.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load(out: Path, names: list[str]) -> dict[str, list[dict]]:
    runs = {}
    for name in names:
        files = sorted(f for f in out.glob(f"{name}-*.json") if f.stem[len(name) + 1:].isdigit())  # not topk-noef
        if not files:
            raise UserError(f"--replot: no {name}-*.json in {out}; run without --replot first")
        runs[name] = [json.loads(f.read_text()) for f in files]
    return runs


def main(args) -> int:
    if job_size() > 1:
        raise UserError("compare launches its own mpirun: run it as one process (python -m mpitrain compare)")
    names = _strategies(args.strategies)
    if args.ranks < 1 or args.repeats < 1:
        raise UserError(f"--ranks {args.ranks} and --repeats {args.repeats} must be >= 1")
    if not 0 < args.timeout < float("inf"):  # also NaN
        raise UserError(f"--timeout {args.timeout} must be a finite number of seconds > 0")
    out = Path(args.out)
    if args.replot:
        runs = _load(out, names)
    else:
        out.mkdir(parents=True, exist_ok=True)
        mpirun = _mpirun(args.mpirun)
        runs, failed = {}, []
        for rep in range(args.repeats):
            for i, name in enumerate(names):
                print(f"# run {rep * len(names) + i + 1}/{args.repeats * len(names)}: {name}, "
                      f"{args.ranks} rank(s)", file=sys.stderr, flush=True)
                try:
                    runs.setdefault(name, []).append(run_one(name, rep, args, mpirun, out))
                except UserError as e:
                    failed.append(str(e))
                    print(f"# {e}", file=sys.stderr, flush=True)
        runs = {k: v for k, v in runs.items() if v}
        if failed:
            for f in failed:
                print(f"failed: {f}", file=sys.stderr)
    if not runs:
        raise UserError("no strategy produced a result")
    rows = summarize(runs)
    job = (args.job or "the default digits job") + "".join(f" --set {o}" for o in args.overrides)
    reps = max(len(ms) for ms in runs.values())
    print(f"# {job}, {rows[0]['ranks']} rank(s); medians of {reps} run(s) each; metrics in {out}/")
    print(table(rows))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table(rows, markdown=True) + "\n")
    if args.plot:
        plot(args.plot, runs, f"{job}: {rows[0]['ranks']} ranks, one curve per strategy (points = epochs)")
        print(f"# plot: {args.plot}")
    return 1 if not args.replot and failed else 0
