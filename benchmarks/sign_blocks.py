#!/usr/bin/env python3
"""Scaled-sign compression on the default digits job: test accuracy and bytes per block size and seed.

    python benchmarks/sign_blocks.py                                  # 3 ranks, blocks 0..32, seeds 0,1,2
    python benchmarks/sign_blocks.py --ranks 4 --blocks 0,256 --seeds 0,1 --scales rms
    python benchmarks/sign_blocks.py --markdown runs/sign-blocks.md

Each cell is one training run of the default job (jobs/digits.toml, 20 epochs):

    mpirun -n N python -m mpitrain --set comm.compress='"sign"' --set comm.sign_block=B \\
        --set train.seed=S --set checkpoint.every=0 --metrics-out F

``--scales rms,mean`` also runs every cell with the scale mean|acc| (what "sign" used before
the rms scale; the job has no key for it, so those runs go through this script, which starts
the same CLI with ``compress.make(..., sign_scale="mean")``). Reported: the blocks B of the
9,610-parameter MLP, bytes per step per rank (from the run's metrics, counted from the buffers
handed to MPI; = (N-1)·(ceil(n/8) + 4·B)), and the test accuracy of each seed.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mpitrain.compare import train_run  # noqa: E402  (mpirun ... train --metrics-out, one thread per rank)
from mpitrain.runtime import UserError  # noqa: E402


def worker(scale: str, argv: list[str]) -> int:
    """One rank of a run whose sign compressor uses ``scale`` (started by mpirun from run_one)."""
    from mpitrain.__main__ import main
    from mpitrain.collectives import compress

    compress.make = functools.partial(compress.make, sign_scale=scale)
    return main(argv)


def run_one(args, block: int, seed: int, scale: str, tmp: Path) -> dict:
    sets = ['comm.compress="sign"', f"comm.sign_block={block}", f"train.seed={seed}", "checkpoint.every=0",
            f'data.path="{args.data}"', 'data.dataset="digits"', *args.set]
    entry = ["-m", "mpitrain"] if scale == "rms" else [str(Path(__file__).resolve()), "--worker-scale", scale, "--"]
    try:
        m = train_run(args.ranks, sets, tmp / f"m-{scale}-{block}-{seed}.json", entry=entry, timeout=args.timeout,
                      env={"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}, cwd=ROOT,
                      what=f"scale={scale} block={block} seed={seed}")
    except UserError as e:
        raise SystemExit(str(e)) from None
    print(f"#   {scale:>4} block {block:>5} seed {seed}: test acc {m['test_accuracy']:.4f}, "
          f"{m['bytes_per_step']:,.0f} B/step/rank", file=sys.stderr, flush=True)
    return m


def n_blocks(block: int, tensors=((0, 1280), (1280, 1290), (1290, 9482), (9482, 9610))) -> int:
    """Scales of the default MLP (64-128-10: W2, b2, W1, b1 in buffer order) at this block size."""
    return sum(1 if block == 0 else -(-(hi - lo) // block) for lo, hi in tensors)


def markdown(rows, scales, seeds, header: str) -> str:
    cols = [f"{s} seed {k}" for s in scales for k in seeds]
    lines = [header, "", "| sign_block | scales B | bytes/step/rank | " + " | ".join(cols) + f" | min ({' / '.join(scales)}) |",
             "|---" * (4 + len(cols)) + "|"]
    for r in rows:
        accs = [r["acc"][s][k] for s in scales for k in seeds]
        mins = " / ".join(f"{min(r['acc'][s].values()):.4f}" for s in scales)
        lines.append(f"| {r['block']} | {r['blocks']} | {r['bytes']:,.0f} | "
                     + " | ".join(f"{a:.4f}" for a in accs) + f" | {mins} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker-scale"]:
        return worker(argv[1], argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--blocks", default="0,1024,256,128,64,32")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--scales", default="rms", help="rms (the default scale), mean, or both: rms,mean")
    ap.add_argument("--data", default="data/digits", help="the digits shards (made on first use)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a job key")
    ap.add_argument("--markdown", default="", help="also write the table here")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mpirun")
    args = ap.parse_args(argv)
    blocks = [int(b) for b in args.blocks.split(",") if b.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    scales = [s.strip() for s in args.scales.split(",") if s.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="sign-blocks-") as d:
        for b in blocks:
            row = {"block": b, "blocks": n_blocks(b), "acc": {}}
            for s in scales:
                row["acc"][s] = {}
                for k in seeds:
                    m = run_one(args, b, k, s, Path(d))
                    row["acc"][s][k] = m["test_accuracy"]
                    row["bytes"] = m["bytes_per_step"]
            rows.append(row)
    header = (f"`python benchmarks/sign_blocks.py {' '.join(argv)}`".replace(" `", "`") +
              f" -- digits, {args.ranks} ranks, 20 epochs, lr 0.1, momentum 0.9")
    text = markdown(rows, scales, seeds, header)
    print(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
