#!/usr/bin/env python3
"""The staged device ring with one CUDA stream vs two, side by side (issue 20, item 8).

    mpirun -n 2 python benchmarks/gpu_streams.py [--min 16MiB] [--max 256MiB] [--json FILE]

With one stream a rank's copies to the host (D2H) and from it (H2D) run one after the other,
which caps ring busbw / d2h near 0.5 at 2 ranks; the second stream (copies in + reductions)
lets them overlap (collectives/staging.py; on the CPU tests' timing model 0.49 -> 0.92 at 2
ranks). This measures it on the GPU: per size, in one run and interleaved by bench.run_sweep,
the staged ring with ``streams=1`` and ``streams=2``, native (whole-buffer staging) and the
``d2h`` ceiling row; it prints busbw, busbw / d2h and two streams over one. Needs CuPy and a
GPU (ranks may share one). Exit status 1 when any result is wrong, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from mpitrain import backend, bench, units  # noqa: E402
from mpitrain.collectives import staging, state_for  # noqa: E402
from mpitrain.runtime import UserError, error_message, get_comm, log0  # noqa: E402

LABELS = {1: "ring-1stream", 2: "ring-2streams"}


def entries(direct: bool):
    """(label, fn(buf, comm, op)) for the staged ring with one and with two streams."""
    def ring_with(k):
        return lambda b, comm, op: staging.ring(state_for(comm), b, op, direct=direct, streams=k)

    return [(LABELS[k], ring_with(k)) for k in (1, 2)]


def table(rows) -> list[str]:
    """Per size: busbw of each, busbw / d2h, and two streams over one."""
    by = {}
    for r in rows:
        by.setdefault(r["size"], {})[r["algorithm"]] = r
    out = [f"#{'size':>9} {'1 stream':>9} {'2 streams':>9} {'native':>8} {'d2h':>8}   (busbw GB/s)"
           f" {'1s/d2h':>7} {'2s/d2h':>7} {'2s/1s':>6}"]
    for size in sorted(by):
        g = by[size]
        one, two = g[LABELS[1]]["busbw"], g[LABELS[2]]["busbw"]
        d2h = g.get("d2h", {}).get("busbw") or float("nan")
        out.append(f"{units.format_size(size):>10} {one:9.2f} {two:9.2f} {g['native']['busbw']:8.2f} {d2h:8.2f}"
                   f"{'':15} {one / d2h:7.2f} {two / d2h:7.2f} {two / one:6.2f}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min", type=units.parse_size, default=units.parse_size("16MiB"))
    ap.add_argument("--max", type=units.parse_size, default=units.parse_size("256MiB"))
    ap.add_argument("--iters", type=int, default=None, help="timed rounds per size (default: ~0.5 s per size)")
    ap.add_argument("--json", help="write the rows here (rank 0)")
    args = ap.parse_args(argv)
    comm = get_comm()
    try:
        xp = backend.get_xp("cupy")
        backend.select_device(comm, share=True)
    except UserError as e:
        log0(error_message(e), file=sys.stderr)
        return 2
    direct = backend.cuda_aware_mpi()
    sizes = units.size_range(args.min, args.max)
    log0(f"# staged ring, 1 vs 2 CUDA streams, {comm.Get_size()} ranks, float32 sum, "
         f"{'CUDA-aware MPI (direct: no staging, streams do not apply)' if direct else 'staged'}")
    rows = bench.run_sweep(comm, sizes, [*entries(direct), "native"], "float32", "sum", iters=args.iters, xp=xp)
    log0("\n".join(table(rows)))
    if args.json and comm.Get_rank() == 0:
        bench.write_json(args.json, rows, {"ranks": comm.Get_size(), "direct": direct,
                                           "cuda_aware": backend.cuda_aware_info()[1], "labels": LABELS})
    return bench.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
