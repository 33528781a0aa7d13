#!/usr/bin/env python3
"""Bytes per rank of zero 0/1/2/3 at p = 1, 2, 4, measured, beside the formulas (docs/zero.md).

    OMP_NUM_THREADS=1 python benchmarks/zero_memory.py [--job jobs/gpt.toml] [--ranks 1,2,4] [--steps 3]
                                                       [--set section.key=value ...] [--json F]

Each (p, zero) is one training run of ``--steps`` steps (``mpirun -n p python -m mpitrain train JOB``);
its ``--metrics-out`` gives what rank 0 holds between steps, measured from the arrays (ZeRO-2/3's paged
buffers: the pages the kernel says are resident), and the process's peak RSS. Formulas (b = 4, Adam):

    params    4Ψ (zero 0-2)      4Ψ/p (zero 3)
    grads     4Ψ (zero 0-1)      4Ψ/p (zero 2-3)     + the tied head's gradient part (V·C·4, every level)
    optimizer 8Ψ (zero 0)        8Ψ/p (zero 1-3)

"ok" when the measured sum is within 5 % of the formula's (zero 3: plus one gathered block, the pages at
the edges of the gathered ranges that stay resident).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(p: int, zero: int, job: str, steps: int, out: Path, more=()) -> dict:
    keys = [*more, f"train.zero={zero}", f"train.max_steps={steps}", "train.eval_every=0", "train.eval_batches=1",
            "checkpoint.every_steps=0", "train.check_every=0", "comm.bucket_bytes=262144"]
    cmd = ["mpirun", "-n", str(p), sys.executable, "-m", "mpitrain", "train", job, "--metrics-out", str(out),
           *[a for k in keys for a in ("--set", k)]]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stdout + r.stderr)
    return json.loads(out.read_text())


def formula(psi: int, apart: int, zero: int, p: int) -> dict:
    return {"params": 4 * psi / (p if zero == 3 else 1), "grads": 4 * psi / (p if zero >= 2 else 1) + apart,
            "optimizer": 8 * psi / (p if zero else 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default="jobs/gpt.toml")
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], help="more job keys (section.key=value)")
    ap.add_argument("--json")
    a = ap.parse_args()
    from mpitrain import config
    from mpitrain.models.gpt import GPT

    m = config.load(ROOT / a.job, a.set).model
    probe = GPT(m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size or 256, tie_embeddings=m.tie_embeddings)
    psi, apart = probe.n_params, (m.vocab_size or 256) * m.n_embd * 4 if m.tie_embeddings else 0
    block = 4 * max(hi - lo for lo, hi in probe.param_groups())
    rows, tmp = [], Path(tempfile.mkdtemp())
    print(f"{a.job}: Ψ = {psi:,} parameters; tied head gradient part {apart:,} B; one block {block:,} B")
    print(f"{'p':>2} {'zero':>4} {'params':>10} {'grads':>10} {'optimizer':>10} {'sum':>10} {'formula':>10} "
          f"{'ratio':>6} {'peak RSS':>10}")
    for p in map(int, a.ranks.split(",")):
        for zero in (0, 1, 2, 3):
            mt = run(p, zero, a.job, a.steps, tmp / f"m{p}{zero}.json", a.set)
            got = {k: mt[f"{k[:-1] if k != 'optimizer' else k}_bytes_per_rank"]
                   for k in ("params", "grads", "optimizer")}
            want = formula(psi, apart, zero, p)
            s, f = sum(got.values()), sum(want.values())
            ok = abs(s - f) <= 0.05 * f + (block if zero == 3 else 0)
            rows.append({"p": p, "zero": zero, "measured": got, "formula": want, "peak_rss": mt["peak_rss_bytes"],
                         "predicted_bytes_per_rank": mt.get("predicted_bytes_per_rank"), "ok": ok})
            print(f"{p:>2} {zero:>4} {got['params']:>10,} {got['grads']:>10,} {got['optimizer']:>10,} {s:>10,} "
                  f"{int(f):>10,} {s / f:>6.3f} {mt['peak_rss_bytes']:>10,} {'ok' if ok else 'OFF'}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
