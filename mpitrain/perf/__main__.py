"""``python -m mpitrain.perf COST.json ...``: write auto's decision table into stored cost models.

For files written before the table existed (``auto`` then says so once and keeps its fixed
threshold) or after a change to the ring's segments (MPITRAIN_RING_SEGMENT): the table is made
from the file's own parameters, so ``auto`` picks what the model predicts fastest again.
Exit status 1 when any file could not be read or written.
"""

from __future__ import annotations

import argparse
import sys

from .model import auto_table
from .store import add_table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpitrain.perf",
                                 description="Write auto's decision table into stored cost model files.")
    ap.add_argument("files", nargs="+", metavar="COST.json", help="cost model files (bench --fit)")
    args = ap.parse_args(argv)
    code = 0
    for f in args.files:
        try:
            m = add_table(f)
        except (OSError, ValueError) as e:
            print(f"error: {f}: {e}", file=sys.stderr)
            code = 1
            continue
        steps = ", ".join(f"{a} from {n} B" for n, a in auto_table(m).steps)
        print(f"{f}: auto on {m.ranks} ranks ({m.nodes} node(s)): {steps}")
    return code


if __name__ == "__main__":
    sys.exit(main())
