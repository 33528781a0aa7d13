"""Summarize benchmarks/zero_steps.sh: zero=0 vs zero=1 per job and rank count (docs/zero.md).

    python benchmarks/zero_summary.py OUTDIR

Per run: ms/step (wall_s / steps), samples/s, comm fraction, optimizer bytes per rank; per pair
(the same repetition) the ratio zero=1 / zero=0 of ms/step; then medians over the repetitions and
the spread (max/min - 1) of each side, which says how noisy the box was.
"""

import json
import pathlib
import re
import statistics
import sys


def load(out):
    runs = {}
    for f in sorted(pathlib.Path(out).glob("*.json")):
        m = re.fullmatch(r"(\w+)-n(\d+)-z(\d)-r(\d+)", f.stem)
        if m:
            job, n, z, k = m[1], int(m[2]), int(m[3]), int(m[4])
            runs[(job, n, z, k)] = json.loads(f.read_text())
    return runs


def ms_per_step(m):
    return 1e3 * m["wall_s"] / max(m["steps"], 1)


def table(runs):
    print("| job | N | zero | rep | steps | wall_s | ms/step | samples/s | comm | optimizer bytes/rank |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (job, n, z, k), m in sorted(runs.items()):
        print(f"| {job} | {n} | {z} | {k} | {m['steps']} | {m['wall_s']:.2f} | {ms_per_step(m):.2f} | "
              f"{m['samples_per_s']:,.0f} | {100 * m['comm_fraction']:.1f}% | {m['optimizer_bytes_per_rank']:,} |")


def medians(runs):
    print("\n| job | N | ms/step z0 (median, spread) | ms/step z1 (median, spread) | z1/z0 per pair | "
          "median z1/z0 | samples/s z0 / z1 | comm z0 / z1 | opt bytes/rank z0 / z1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for job, n in sorted({(j, n) for j, n, _, _ in runs}):
        reps = sorted({k for j, nn, _, k in runs if (j, nn) == (job, n)})
        pairs = [(runs[(job, n, 0, k)], runs[(job, n, 1, k)]) for k in reps
                 if (job, n, 0, k) in runs and (job, n, 1, k) in runs]
        if not pairs:
            continue
        t = [[ms_per_step(p[z]) for p in pairs] for z in (0, 1)]
        ratio = [b / a for a, b in zip(*t)]
        sps = [statistics.median(p[z]["samples_per_s"] for p in pairs) for z in (0, 1)]
        comm = [statistics.median(p[z]["comm_fraction"] for p in pairs) for z in (0, 1)]
        opt = [pairs[0][z]["optimizer_bytes_per_rank"] for z in (0, 1)]
        print(f"| {job} | {n} | {statistics.median(t[0]):.2f} ({max(t[0]) / min(t[0]) - 1:.0%}) | "
              f"{statistics.median(t[1]):.2f} ({max(t[1]) / min(t[1]) - 1:.0%}) | "
              f"{', '.join(f'{r:.3f}' for r in ratio)} | **{statistics.median(ratio):.3f}** | "
              f"{sps[0]:,.0f} / {sps[1]:,.0f} | {100 * comm[0]:.1f}% / {100 * comm[1]:.1f}% | "
              f"{opt[0]:,} / {opt[1]:,} ({opt[0] / max(opt[1], 1):.2f}x) |")


if __name__ == "__main__":
    runs = load(sys.argv[1])
    table(runs)
    medians(runs)
