#!/usr/bin/env python3
"""The loss curve of a language-model run, in bits per byte, against gzip -9 and xz -9.

    mpirun -n 2 python -m mpitrain train jobs/gpt.toml --metrics-out runs/gpt.json
    python benchmarks/lm_curve.py runs/gpt.json --out docs/gpt-loss.png [--full-val 1.71]

Reads ``evals`` (one entry per train.eval_every: step, wall_s, train_loss, val_loss in nats per
token) and ``baseline_bits`` from the --metrics-out JSON; draws train and val bits per byte
(nats / ln 2) against training tokens (a second axis: wall minutes), the compressors' figures as
dashed lines, and prints the same numbers as a markdown table. ``--full-val``: a final val figure
measured on the whole split (benchmarks/val_full.py), drawn as a marker at the last step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def rows(m: dict) -> list[dict]:
    tokens_per_step = m["samples_per_s"] * m["wall_s"] / max(m["steps"], 1)  # samples are tokens for a GPT
    return [{"step": e["step"], "tokens": e["step"] * tokens_per_step, "minutes": e["wall_s"] / 60,
             "train_bits": e["train_loss"] / math.log(2), "val_bits": e["val_loss"] / math.log(2)}
            for e in m.get("evals", [])]


def table(rs, base) -> str:
    ref = f" (gzip -9 {base['gzip -9']:.3f}, xz -9 {base['xz -9']:.3f})" if base else ""
    out = [f"| step | tokens | wall (min) | train bits/byte | val bits/byte{ref} |", "|---|---|---|---|---|"]
    out += [f"| {r['step']} | {r['tokens'] / 1e6:.2f} M | {r['minutes']:.1f} | {r['train_bits']:.3f} | "
            f"{r['val_bits']:.3f} |" for r in rs]
    return "\n".join(out)


def plot(m, rs, base, path: str, title: str, full_val: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    tok = [r["tokens"] / 1e6 for r in rs]
    ax.plot(tok, [r["train_bits"] for r in rs], "-o", ms=3, label="train (mean since its epoch began)")
    ax.plot(tok, [r["val_bits"] for r in rs], "-o", ms=3, label="val (eval_batches sample)")
    if full_val is not None:
        ax.plot([tok[-1]], [full_val], "k*", ms=10, label=f"val, whole split: {full_val:.3f}")
    for (k, style) in (("gzip -9", "--"), ("xz -9", ":")):
        if base:
            ax.axhline(base[k], color="gray", ls=style, label=f"{k} on the val split: {base[k]:.3f}")
    h = (m.get("history") or [{}])[-1]
    if h.get("epoch", 0) > 1:  # where the second pass over the training data begins
        per_epoch = h["step"] / h["epoch"] * rs[-1]["tokens"] / rs[-1]["step"] / 1e6
        ax.axvline(per_epoch, color="k", lw=0.8, alpha=0.5)
        ax.text(per_epoch, ax.get_ylim()[1], " epoch 2", va="top", fontsize=8)
    ax.set_xlabel("training tokens (millions, all ranks)")
    ax.set_ylabel("bits per byte")
    ax.set_ylim(bottom=min([r["val_bits"] for r in rs] + ([base["xz -9"]] if base else [])) - 0.2,
                top=min(8.0, max(r["train_bits"] for r in rs) + 0.3))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("metrics", help="a --metrics-out JSON of a GPT run (with train.eval_every > 0)")
    ap.add_argument("--out", help="PNG to write (needs matplotlib: pip install -e '.[plot]')")
    ap.add_argument("--title", default="", help="plot title")
    ap.add_argument("--full-val", type=float, help="bits per byte on the whole val split, to mark")
    ap.add_argument("--data", help="the token set, for gzip/xz when the JSON has no baseline_bits")
    args = ap.parse_args(argv)
    m = json.loads(open(args.metrics).read())
    rs = rows(m)
    if not rs:
        raise SystemExit(f"{args.metrics}: no 'evals' (run with train.eval_every > 0 and --metrics-out)")
    base = m.get("baseline_bits")
    if base is None and args.data:
        from mpitrain.data.baseline import compressor_bits

        base = compressor_bits(args.data)
    print(table(rs, base))
    if args.out:
        plot(m, rs, base, args.out, args.title or f"{args.metrics}: {m['ranks']} ranks, {m['steps']} steps", args.full_val)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
