"""The bench's command line: ``add_arguments`` (for ``python -m mpitrain bench``) and ``build_parser``.

Sizes take units (mpitrain.units: 8B, 4KiB, 64M = MiB, 1GB = 10**9); bad values are argparse
errors (exit status 2) before anything runs. ``--fit`` and ``--model`` hand over to mpitrain.perf.
"""

from __future__ import annotations

import argparse

from ..collectives import DTYPES, OPS
from ..units import parse_size
from .command import main
from .kinds import COLLECTIVES
from .timing import MAX_ROUNDS, MIN_ROUNDS, TARGET_SECONDS


class _DefaultAlgorithms(str):
    """--algorithms not given: every algorithm the collective has (the halves have no tree or hier)."""

    is_default = True


class _DefaultSize(int):
    """A size the user did not give (``bench --model`` has its own default range, up to 1 GiB)."""

    is_default = True


def _size_arg(text):
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _step_arg(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --step {text!r}: a number > 1") from None
    if not v > 1:
        raise argparse.ArgumentTypeError(f"--step must be > 1 (a size multiplier), got {text}")
    return v


def _positive(text):
    v = _nonneg(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Time and check every all-reduce algorithm over a range of message sizes "
                     "(nccl-tests style). Exit status 1 when any result is wrong.")
    p.add_argument("--collective", default="allreduce", choices=COLLECTIVES,
                   help="what to time: allreduce (default), or one of its halves, reduce_scatter or allgather "
                        "(algorithms ring, native, auto; busbw = algbw*(n-1)/n; #wrong against the formula)")
    p.add_argument("--algorithms", default=_DefaultAlgorithms("ring,tree,native,auto"),
                   help="comma-separated: ring, tree, native, auto, hier, shm (default: ring,tree,native,auto; "
                        "with shm the buffers are alloc_shared's, the zero-copy case; "
                        "reduce_scatter/allgather: ring, native, auto)")
    p.add_argument("--min", type=_size_arg, default=parse_size("8B"), metavar="SIZE",
                   help="smallest message, e.g. 8B, 4KiB (default 8B)")
    p.add_argument("--max", type=_size_arg, default=_DefaultSize(parse_size("256MiB")), metavar="SIZE",
                   help="largest message, e.g. 64M, 256MiB (default 256MiB; 1GiB with --model); K/M/G are binary")
    p.add_argument("--step", type=_step_arg, default=4.0, help="size multiplier (default 4)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="element type of the buffers reduced (default float32)")
    p.add_argument("--op", default="sum", choices=OPS, help="reduction operation (default sum)")
    p.add_argument("--iters", type=_nonneg, default=None,
                   help=f"timed iterations per size (default or 0: scaled to size, ~{TARGET_SECONDS:g} s "
                        f"per size, {MIN_ROUNDS}..{MAX_ROUNDS})")
    p.add_argument("--warmup", type=_nonneg, default=2, help="untimed rounds per size (default 2)")
    p.add_argument("--json", metavar="FILE", help="write the rows (and run parameters) as JSON")
    p.add_argument("--csv", metavar="FILE", help="write the rows as CSV")
    p.add_argument("--plot", metavar="FILE.png", help="draw busbw vs size per algorithm (needs matplotlib)")
    p.add_argument("--backend", default="numpy", choices=("numpy", "cupy"),
                   help="where the buffers live (cupy: on the GPU)")
    p.add_argument("--quiet", action="store_true", help="no table or progress (files and errors only)")
    p.add_argument("--fit", action="store_true",
                   help="fit the cost model (alpha, beta, gamma: mpitrain/perf) to this sweep, "
                        "store it for this host and rank count (~/.cache/mpitrain, or $MPITRAIN_COST_FILE) "
                        "and print predicted vs measured; auto then picks by the model. "
                        "With --plot: measured (solid) vs predicted (dashed) time per size")
    m = p.add_argument_group(
        "extrapolation (--model: one process, no mpirun; perf/extrapolate.py)")
    m.add_argument("--model", action="store_true",
                   help="predict ring, tree and hier times for many ranks on many hosts from the fitted "
                        "alpha/beta/gamma per link type (intra-host, inter-host); prints a table per N and size "
                        "(--json: the rows); --plot: the best algorithm over (N, size) and time vs N")
    m.add_argument("--ranks", metavar="LIST", default=None,
                   help="rank counts N for --model: 2,8,64 or 2..1024 (powers of two; default 2..1024)")
    m.add_argument("--ppn", type=_positive, default=None, metavar="L",
                   help="ranks per host for --model (in blocks: N = H hosts x L; default: this host's cores; "
                        "with --validate: from each file's meta)")
    m.add_argument("--link", action="append", metavar="TYPE=SRC[,TYPE=SRC]",
                   help="parameter sources for --model: intra=COST.json (a single-host bench --fit; default: this "
                        "host's), inter=COST.json (a bench --fit across hosts), inter=25us@1.17GB/s, "
                        "inter=BENCH.json[,BENCH2.json] (fitted to their ring rows), TYPE=default")
    m.add_argument("--from-json", metavar="A.json[,B.json]", default=None,
                   help="--model: fit the inter-host link to the ring rows of these multi-host bench JSON files")
    m.add_argument("--validate", metavar="A.json[,B.json]", default=None,
                   help="--model: compare predictions with the ring/tree/hier rows of these bench JSON files "
                        "(measured vs predicted, error per row, median/max; rows beyond 20%% flagged)")
    p.set_defaults(func=main)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpitrain bench")
    add_arguments(p)
    return p
