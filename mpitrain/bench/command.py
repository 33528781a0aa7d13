"""``python -m mpitrain bench`` itself: check the options on every rank, sweep, print, write, exit status.

    1. --model (one process, no sweep: model.py) or the sweep's options, checked before anything
       runs, every rank agreeing on the outcome: a bad option, a file that cannot be written
       (--json/--csv/--plot), a missing matplotlib, --fit's needs -> one message, exit status 2
    2. the sweep (sweep.py) of --collective (kinds.py: allreduce, reduce_scatter, allgather; the halves
       refuse tree and hier): the table row by row on rank 0, a progress line on stderr every 10 s
       once the sweep has run that long
    3. --fit (fit.py): fit, store, report; then the footer, the files (rank 0), and exit status 1
       when any result was wrong
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from mpi4py import MPI

from .. import backend
from ..collectives.tuning import node_ids
from ..metrics import StatusLine
from ..perf.plot import have_matplotlib, plot_fit
from ..perf.report import format_auto_vs_best
from ..runtime import UserError, error_message, get_comm, hostname, log0
from ..units import format_size, size_range
from .checks import tolerance
from .fit import fit_for_bench
from .kinds import algorithms_for
from .model import run as run_model
from .report import format_header, format_row, plot, summarize, write_csv, write_json
from .sweep import exit_status, run_sweep

MODEL_ONLY = (("--ranks", "ranks"), ("--ppn", "ppn"), ("--link", "link"), ("--from-json", "from_json"),
              ("--validate", "validate"))
OUTPUTS = (("--json", "json"), ("--csv", "csv"), ("--plot", "plot"))


def _agree(comm, problem: str | None) -> str | None:
    """Collective: the first rank's problem (tagged with its rank), or None when no rank has one."""
    probs = comm.allgather(problem)
    for r, msg in enumerate(probs):
        if msg:
            return msg if r == comm.Get_rank() or comm.Get_size() == 1 else f"(rank {r}) {msg}"
    return None


def _fail(message: str) -> int:
    log0(error_message(UserError(message)), file=sys.stderr)
    return 2


def unwritable(args) -> str | None:
    """Why one of the --json/--csv/--plot files cannot be written (probed now: opened, never truncated;
    a file made by the probe is removed again), or None."""
    for flag, attr in OUTPUTS:
        path = getattr(args, attr, None)
        if not path:
            continue
        try:
            if os.path.isdir(path):
                raise IsADirectoryError(21, "is a directory")
            existed = os.path.exists(path)
            with open(path, "a"):
                pass
            if not existed:
                os.unlink(path)
        except OSError as e:
            return f"{flag} {path}: cannot write there ({e.strerror or e})"
    return None


def _model(comm, args) -> int | None:
    """``--model`` (rank 0 alone: not an MPI run) or a misuse of its options; None: not a --model run."""
    if getattr(args, "model", False):
        if args.fit:
            return _fail("--model predicts from fitted parameters, --fit measures them: run them separately")
        code = 0
        if comm.Get_rank() == 0:
            problem = unwritable(args)
            code = _fail(problem) if problem else run_model(args)
        return comm.bcast(code, root=0)
    given = [flag for flag, attr in MODEL_ONLY if getattr(args, attr, None)]
    if given:
        return _fail(f"{', '.join(given)}: only with --model")
    return None


def _algorithm_problem(collective: str, algorithms) -> str | None:
    """Why ``algorithms`` cannot be swept for ``collective`` (unknown names; tree/hier for the halves)."""
    known, every = algorithms_for(collective), algorithms_for("allreduce")
    if not algorithms:
        return f"--algorithms is empty; known: {', '.join(known)}"
    unknown = [a for a in algorithms if a not in every]
    if unknown:
        return f"unknown algorithm(s) {', '.join(map(repr, unknown))} in --algorithms; known: {', '.join(known)}"
    halves = [a for a in algorithms if a not in known]
    if halves:
        return (f"--collective {collective} has no {' or '.join(halves)} algorithm (only the all-reduce has); "
                f"use --algorithms {','.join(known)}")
    return None


def _local_problem(comm, args, algorithms) -> str | None:
    """This rank's objection to the sweep's options (rank 0 also checks the output files)."""
    problem = _algorithm_problem(_collective(args), algorithms)
    if problem:
        return problem
    try:
        size_range(args.min, args.max, args.step)
    except ValueError as e:
        return str(e)
    if comm.Get_rank() == 0:
        if args.plot and not have_matplotlib():
            return "--plot needs matplotlib: pip install 'mpitrain[plot]'"
        problem = unwritable(args)
        if problem:
            return problem
    if args.fit:
        if _collective(args) != "allreduce":
            return "--fit fits the all-reduce's cost model: only with --collective allreduce"
        if comm.Get_size() < 2:
            return ("--fit needs 2 ranks or more (with 1, auto always runs native): "
                    "mpirun -n P python -m mpitrain bench --fit")
        if args.backend != "numpy":
            return "--fit models host buffers: use --backend numpy"
    return None


def _use_gpu(comm):
    """cupy on this rank's GPU (backend.select_device). Ranks may share a GPU here: the bench
    then measures the sharing (and the d2h row copies on all ranks at once). Collective."""
    problem = None
    try:
        xp = backend.get_xp("cupy")
    except UserError as e:
        problem = str(e)
    problem = _agree(comm, problem)
    if problem:
        raise UserError(problem)
    backend.select_device(comm, share=True)
    return xp


def _collective(args) -> str:
    return getattr(args, "collective", None) or "allreduce"


def _algorithm_names(args) -> list[str]:
    """--algorithms as a list (not given: every algorithm of the collective)."""
    text = args.algorithms
    if getattr(text, "is_default", False):
        text = ",".join(a for a in algorithms_for(_collective(args)) if a in str(text).split(","))
    return list(dict.fromkeys(a.strip() for a in str(text).split(",") if a.strip()))


def _prepare(comm, args):
    """Collective: (problem, algorithms, sizes, xp) -- every rank gets the same problem, or None."""
    algorithms = _algorithm_names(args)
    problem = _agree(comm, _local_problem(comm, args, algorithms))
    if problem:
        return problem, algorithms, None, np
    if args.fit:  # the fit needs every algorithm timed
        algorithms = list(dict.fromkeys([*algorithms, "ring", "tree", "native", "auto"]))
    xp = np
    if args.backend == "cupy":
        try:
            xp = _use_gpu(comm)
        except UserError as e:
            return str(e), algorithms, None, np
    return None, algorithms, size_range(args.min, args.max, args.step), xp


def _meta(comm, args, algorithms, dtype) -> dict:
    hosts = comm.allgather(hostname())
    nodes = node_ids(comm)
    return {"ranks": comm.Get_size(), "hosts": sorted(set(hosts)), "nodes": len(set(nodes)),
            "ppn": max(nodes.count(h) for h in set(nodes)),
            "mpi": " ".join(MPI.Get_library_version().strip().splitlines()[0].split()),
            "collective": _collective(args),
            "dtype": dtype, "op": "-" if _collective(args) == "allgather" else args.op,
            "algorithms": algorithms, "backend": args.backend,
            "min": args.min, "max": args.max, "step": args.step, "iters": args.iters,
            "warmup": args.warmup, "rtol": tolerance(dtype, comm.Get_size()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **({"cuda_aware": "CUDA-aware MPI: " + ("yes" if backend.cuda_aware_mpi() else "no") + " ("
                + backend.cuda_aware_info()[1] + ")"} if args.backend == "cupy" else {})}


def _sweep(comm, args, sizes, algorithms, xp, show: bool) -> list[dict]:
    """Collective: run_sweep with the table printed row by row (rank 0) and a progress line."""
    # Under mpirun the ranks' stderr is a pipe, not a TTY: then a plain progress line every
    # 10 s, starting only once the sweep has run that long (short sweeps print none).
    status = StatusLine(sys.stderr, interval=10.0, enabled=show, delay_first=True)
    t_start = time.perf_counter()

    def progress(i, nsizes, nbytes, it, rounds):
        if status.due():
            where = "warm-up" if it is None else f"round {it + 1}/{rounds}"
            status.update(f"bench: {format_size(nbytes)} ({i + 1}/{nsizes} sizes), {where}, "
                          f"{time.perf_counter() - t_start:.0f} s elapsed")

    def on_size(size_rows):
        if show:
            status.clear()
            log0("\n".join(format_row(r) for r in size_rows))

    rows = run_sweep(comm, sizes, algorithms, args.dtype, args.op, iters=args.iters or None, xp=xp,
                     warmup=args.warmup, progress=progress, on_size=on_size, collective=_collective(args))
    status.close()
    return rows


def _write(args, rows, meta, fitted) -> None:
    """Rank 0: the --json, --csv and --plot files."""
    if args.json:
        write_json(args.json, rows, meta)
    if args.csv:
        write_csv(args.csv, rows)
    if args.plot:
        if fitted:
            plot_fit(args.plot, fitted["rows"], fitted["model"], meta)
        else:
            plot(args.plot, rows, meta)


def main(args) -> int:
    comm = get_comm()
    code = _model(comm, args)
    if code is not None:
        return code
    # validate everything before the sweep; every rank agrees on the outcome
    problem, algorithms, sizes, xp = _prepare(comm, args)
    if problem:
        return _fail(problem)
    meta = _meta(comm, args, algorithms, args.dtype)
    show = comm.Get_rank() == 0 and not args.quiet
    if show:
        log0(format_header(meta))
    rows = _sweep(comm, args, sizes, algorithms, xp, show)
    fitted = fit_for_bench(comm, rows, meta) if args.fit else None  # collective: fit, store, use
    if fitted:
        meta["cost_model"] = fitted["model"].to_dict()
    if show:
        log0("\n".join(summarize(rows) + format_auto_vs_best(rows)))
        if fitted:
            log0(fitted["report"])
    if comm.Get_rank() == 0:
        _write(args, rows, meta, fitted)
    code = exit_status(rows)
    if code:
        n = sum(r["wrong"] for r in rows)
        ref = "native" if _collective(args) == "allreduce" else "the formula"
        log0(error_message(UserError(f"bench: {n} wrong elements (see #wrong); the algorithms disagree with {ref}")),
             file=sys.stderr)
    comm.Barrier()  # files are complete before any rank exits
    return code
