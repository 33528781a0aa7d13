#!/usr/bin/env python3
"""Training step time and the communication each step exposes, per way of averaging the gradients.

    python benchmarks/train_steps.py                       # synthetic + GPT jobs, 2 ranks
    python benchmarks/train_steps.py --ranks 2,4 --repeats 3 --markdown runs/steps.md
    python benchmarks/train_steps.py --code /tmp/before    # the same runs on another checkout

Each variant is ``mpirun -n N python -m mpitrain train JOB --set ...`` with --metrics-out, the
variants interleaved round by round; from each run its timers per step: step = data + compute +
comm (evaluations are outside them) -- comm is the time a rank waited for gradients to be averaged *after* its
backprop (the exposed part: with buckets, what overlapped backprop is not in it), compute is the
forward/backward/optimizer. Best (lowest step time) of the repeats. ``--code DIR`` runs DIR's
``mpitrain`` (PYTHONPATH=DIR) -- a checkout of an older commit, for before/after; variants that
checkout does not know (a config error) print "n/a".
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mpitrain.compare import train_run  # noqa: E402  (mpirun ... train --metrics-out, one thread per rank)
from mpitrain.runtime import UserError  # noqa: E402
B = "comm.bucket_bytes=1048576"
JOBS = {
    "synthetic": ("jobs/synthetic.toml", ["data.path=data/bench/synthetic-16k", "data.rows=16384", "train.epochs=1",
                                          "checkpoint.every=0", "data.dataset=synthetic"]),
    "gpt": ("jobs/gpt.toml", ["train.max_steps=60", "train.eval_every=0", "checkpoint.every_steps=0"]),
}
VARIANTS = {
    "ring": ["comm.algorithm=ring", "comm.bucket_bytes=0"],
    "ring + buckets": ["comm.algorithm=ring", B],
    "native": ["comm.algorithm=native", "comm.bucket_bytes=0"],
    "native + buckets": ["comm.algorithm=native", B],
    "shm": ["comm.algorithm=shm", "comm.bucket_bytes=0"],
    "shm + buckets": ["comm.algorithm=shm", B],
}


def run(job, sets, n, code, tmp) -> dict | None:
    path, base = JOBS[job]
    try:
        m = train_run(n, [*base, *sets], Path(tmp) / "m.json", job=path, timeout=900, cwd=ROOT,
                      env={"PYTHONPATH": str(code), "PYTHONSAFEPATH": "1"})  # not the cwd's package: ``code``'s
    except UserError:  # a variant this checkout does not know: "n/a"
        return None
    st, t = max(m["steps"], 1), m["timers_s"]
    return {"step_ms": 1e3 * sum(t.values()) / st, "comm_ms": 1e3 * t.get("comm", 0) / st,
            "compute_ms": 1e3 * t.get("compute", 0) / st}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="2")
    ap.add_argument("--jobs", default="synthetic,gpt")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--code", default=str(ROOT), help="the checkout whose mpitrain runs (default: this one)")
    ap.add_argument("--markdown", metavar="FILE")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    lines = [f"code: {args.code} ({_rev(args.code)}); best of {args.repeats} interleaved runs",
             "", "| job | N | variant | step (ms) | exposed comm (ms/step) | compute (ms/step) |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for job in args.jobs.split(","):
            for n in [int(x) for x in args.ranks.split(",")]:
                best = {v: None for v in names}
                for _ in range(args.repeats):
                    for v in names:
                        r = run(job, VARIANTS[v], n, args.code, tmp)
                        if r and (best[v] is None or r["step_ms"] < best[v]["step_ms"]):
                            best[v] = r
                for v in names:
                    r = best[v]
                    cells = "n/a | n/a | n/a" if r is None else \
                        f"{r['step_ms']:.1f} | {r['comm_ms']:.2f} | {r['compute_ms']:.1f}"
                    lines.append(f"| {job} | {n} | {v} | {cells} |")
                    print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


def _rev(code) -> str:
    r = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
