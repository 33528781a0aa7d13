#!/usr/bin/env python3
"""A GPT checkpoint's loss on the *whole* val split, in bits per byte, beside gzip -9 and xz -9.

    mpirun -n 2 python benchmarks/val_full.py JOB.toml [--set ...] [--checkpoint FILE] [--batch 64]

The job's newest checkpoint (or FILE) -> the GPT (generate.load_model); every rank reads its part
of the val split (the same windows a train.eval_batches = 0 evaluation reads: consecutive
non-overlapping windows of block_size + 1 tokens) and the ranks' loss sums are added. During
training, evaluations read a sample (train.eval_batches); this is the figure to quote.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from mpi4py import MPI

from mpitrain import config
from mpitrain.data.baseline import compressor_bits, describe
from mpitrain.data.token_reader import open_tokens
from mpitrain.generate import _checkpoint, load_model
from mpitrain.runtime import get_comm, log0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", help="the job file (its checkpoint.dir and data.path)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--checkpoint", metavar="FILE", help="a checkpoint file (default: the job's newest)")
    ap.add_argument("--batch", type=int, default=64, help="windows per forward pass (default 64)")
    args = ap.parse_args(argv)
    comm = get_comm()
    cfg = config.load(args.job, args.overrides)
    ck = _checkpoint(args)
    model = load_model(ck)
    data = open_tokens(cfg.data.path, comm, batch_size=1, seed=0, window=model.block_size + 1)
    t0 = time.perf_counter()
    loss = n = 0.0
    for x, y in data.test_batches(args.batch):
        loss += model.evaluate((x, y), batch_size=args.batch)[0]
        n += y.size
    data.close()
    loss, n = comm.allreduce(loss, op=MPI.SUM), comm.allreduce(n, op=MPI.SUM)
    secs = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    base = compressor_bits(cfg.data.path) if comm.Get_rank() == 0 else None
    bits = loss / max(n, 1) / math.log(2)
    log0(f"{ck['path']} (step {ck.get('step', '?')}): whole val split, {int(n):,} predicted tokens in {secs:.1f} s: "
         f"val loss {loss / max(n, 1):.4f} nats = {bits:.3f} bits/byte; {describe(base) if base else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
