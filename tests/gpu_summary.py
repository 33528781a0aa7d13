#!/usr/bin/env python3
"""The numbers `make gpu-check` owes (docs/gpu.md, "GPU checks still owed"), from its result files.

    python tests/gpu_summary.py DIR        # DIR: train-cupy.json, synthetic-{numpy,cupy}.json,
                                           # bench-cupy.json, streams-cupy.json (any may be missing)

Prints: digits test accuracy / samples/s / comm_fraction with CuPy; the synthetic job's samples/s
with NumPy and CuPy, their ratio and both comm_fraction; ring busbw / d2h ceiling at every size
>= 64 MiB against the 0.80 goal; ring vs native (whole-buffer staging) at every size >= 1 MiB;
the staged ring with one vs two streams. A missing file is named, not an error. Standard library only.
"""

from __future__ import annotations

import json
import os
import sys

MiB = 1 << 20
GOAL = 0.80          # ring busbw / d2h ceiling, at sizes >= GOAL_FROM
GOAL_FROM = 64 * MiB
VS_NATIVE_FROM = 1 * MiB
STREAMS_FROM = 16 * MiB


def load(folder, name):
    try:
        with open(os.path.join(folder, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _mib(size) -> str:
    return f"{size / MiB:g} MiB"


def _by_size(rows):
    out = {}
    for r in rows:
        out.setdefault(r["size"], {})[r["algorithm"]] = r
    return out


def training(folder) -> list[str]:
    t = load(folder, "train-cupy.json")
    if not t:
        return ["training (digits, cupy): no result (train-cupy.json missing: the step failed or did not run)"]
    return [f"training (digits, cupy, {t.get('ranks', '?')} ranks, {t.get('epochs', '?')} epochs): test accuracy "
            f"{t['test_accuracy']:.4f}, {t['samples_per_s']:,.0f} samples/s, comm_fraction {t['comm_fraction']:.3f}"]


def synthetic(folder) -> list[str]:
    a, b = load(folder, "synthetic-numpy.json"), load(folder, "synthetic-cupy.json")
    out = []
    for name, m in (("numpy", a), ("cupy", b)):
        if m:
            out.append(f"synthetic job, backend={name}: {m['samples_per_s']:,.0f} samples/s, "
                       f"comm_fraction {m['comm_fraction']:.3f}")
        else:
            out.append(f"synthetic job, backend={name}: no result (synthetic-{name}.json missing)")
    if a and b:
        ratio = b["samples_per_s"] / max(a["samples_per_s"], 1e-9)
        out.append(f"synthetic job samples/s cupy/numpy: {ratio:.2f}x ({'cupy faster' if ratio > 1 else 'cupy NOT faster'})")
    return out


def ring_bench(folder) -> list[str]:
    bench = load(folder, "bench-cupy.json")
    if not bench:
        return ["bench --backend cupy: no result (bench-cupy.json missing)"]
    out = [bench.get("meta", {}).get("cuda_aware", "")] if bench.get("meta", {}).get("cuda_aware") else []
    by = _by_size(bench["rows"])
    big = [s for s in sorted(by) if s >= GOAL_FROM and "ring" in by[s] and "d2h" in by[s]]
    if not big:
        out.append(f"ring / d2h goal: no size >= {_mib(GOAL_FROM)} in the bench (raise --max)")
    for s in big:
        ring, d2h = by[s]["ring"]["busbw"], by[s]["d2h"]["busbw"]
        ratio = ring / d2h if d2h else float("nan")
        out.append(f"ring {_mib(s):>9}: busbw {ring:7.2f} GB/s, d2h ceiling {d2h:7.2f} GB/s, ratio {ratio:.2f} "
                   f"(goal >= {GOAL:.2f}: {'met' if ratio >= GOAL else 'NOT met'})")
    cmp = [s for s in sorted(by) if s >= VS_NATIVE_FROM and "ring" in by[s] and "native" in by[s]]
    if cmp:
        ratios = {s: by[s]["ring"]["busbw"] / by[s]["native"]["busbw"] for s in cmp if by[s]["native"]["busbw"]}
        worst = min(ratios, key=ratios.get)
        ok = all(v >= 1 for v in ratios.values())
        out.append(f"ring >= native at every size >= {_mib(VS_NATIVE_FROM)}: {'yes' if ok else 'NO'} "
                   f"(ring/native busbw from {ratios[worst]:.2f} at {_mib(worst)} to "
                   f"{max(ratios.values()):.2f}; " + ", ".join(f"{_mib(s)} {v:.2f}" for s, v in ratios.items()) + ")")
    wrong = sum(r.get("wrong") or 0 for r in bench["rows"])
    out.append(f"bench #wrong: {wrong}")
    return out


def streams(folder) -> list[str]:
    res = load(folder, "streams-cupy.json")
    if not res:
        return ["staged ring 1 vs 2 streams: no result (streams-cupy.json missing)"]
    labels = {int(k): v for k, v in res.get("meta", {}).get("labels", {"1": "ring-1stream", "2": "ring-2streams"}).items()}
    by = _by_size(res["rows"])
    out = []
    for s in sorted(by):
        g = by[s]
        if s < STREAMS_FROM or labels[1] not in g or labels[2] not in g:
            continue
        one, two = g[labels[1]]["busbw"], g[labels[2]]["busbw"]
        d2h = g.get("d2h", {}).get("busbw") or float("nan")
        out.append(f"staged ring {_mib(s):>9}: 1 stream {one:7.2f} GB/s ({one / d2h:.2f} of d2h), "
                   f"2 streams {two:7.2f} GB/s ({two / d2h:.2f} of d2h): 2/1 = {two / one:.2f}")
    if res.get("meta", {}).get("direct"):
        out.append("(CUDA-aware MPI: the device ring runs direct, without copies; streams do not apply)")
    return out or ["staged ring 1 vs 2 streams: no size >= 16 MiB in streams-cupy.json"]


def summary(folder) -> list[str]:
    return training(folder) + synthetic(folder) + ring_bench(folder) + streams(folder)


if __name__ == "__main__":
    print("\n".join(summary(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu-check")))
