"""``bench --model``: the cost model extrapolated to many ranks on many hosts -- one process, no sweep.

Prints the predicted table per rank count N and size (or, with --validate, predicted vs measured
for bench JSON files); --json writes the rows, --plot the best algorithm over (N, size) and time
vs N. The arithmetic is mpitrain/perf (extrapolate.py; the parameters: sources.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..perf.extrapolate_report import format_table, format_validation, params_dict, table_rows
from ..perf.plot import have_matplotlib, plot_model
from ..perf.sources import load_params, read_json
from ..perf.validate import error_summary, validate
from ..runtime import UserError, warn
from ..units import geometric, size_range

DEFAULT_RANKS = tuple(2 ** k for k in range(1, 11))  # 2 .. 1024
DEFAULT_MAX = 1 << 30


def parse_ranks(text) -> list[int]:
    """``2,4,8`` or ``2..1024`` (powers of two) -> sorted rank counts >= 2."""
    out = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ".." in part:
                lo, hi = (int(x) for x in part.split(".."))
                out.update(geometric(lo, hi, 2))
                out.add(hi)
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"bad --ranks {text!r}: e.g. 2,8,64 or 2..1024 (powers of two)") from None
    if not out or min(out) < 2:
        raise ValueError(f"bad --ranks {text!r}: rank counts must be >= 2")
    return sorted(out)


def run(args, out=None) -> int:
    """``bench --model``: one process, prints the table (or the validation); --plot, --json."""
    out = out or sys.stdout
    try:
        P = load_params(args.link, args.from_json)
        Ns = parse_ranks(args.ranks) if args.ranks else list(DEFAULT_RANKS)
        hi = DEFAULT_MAX if getattr(args.max, "is_default", False) else args.max
        sizes = size_range(args.min, hi, args.step)
        docs = [(f, read_json(Path(f).expanduser())) for f in str(args.validate).split(",") if f.strip()] \
            if args.validate else []
    except ValueError as e:
        raise UserError(f"bench --model: {e}") from None
    if args.plot and not have_matplotlib():
        raise UserError("--plot needs matplotlib: pip install 'mpitrain[plot]'")
    for note in P.notes:  # on stderr too: a fallback is never silent
        warn(note)
    ppn = args.ppn or os.cpu_count() or 1
    if docs:
        if args.from_json and set(str(args.from_json).split(",")) & set(str(args.validate).split(",")):
            P.notes.append("validating on files the inter-host link was fitted to: their ring rows are in-sample")
        res = validate(P, docs, args.ppn)
        print(format_validation(P, res), file=out, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"params": params_dict(P), "validation": res, "summary": {
                    a: dict(zip(("rows", "median_abs_error", "max_abs_error", "flagged"), v))
                    for a, v in error_summary(res["rows"]).items()}}, f, indent=1)
        return 0
    print(format_table(P, Ns, sizes, ppn), file=out, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": params_dict(P), "ppn": ppn, "rows": table_rows(P, Ns, sizes, ppn)}, f, indent=1)
            f.write("\n")
    if args.plot:
        plot_model(args.plot, P, Ns, sizes, ppn)
        print(f"# plot: {args.plot}", file=out)
    return 0
