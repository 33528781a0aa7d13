"""Side-by-side table of benchmarks/halves_bench.sh: busbw ring vs native per size, N = 2 and 4.

    python benchmarks/halves_table.py OUTDIR [RANKS...]
"""

import json
import pathlib
import sys

from mpitrain.units import format_size


def rows(path):
    doc = json.loads(pathlib.Path(path).read_text())
    return {(r["size"], r["algorithm"]): r for r in doc["rows"]}


def table(out, coll, ranks):
    runs = {n: rows(f"{out}/{coll}-n{n}.json") for n in ranks}
    head = " | ".join(f"N={n} ring | N={n} native | N={n} ring/native | N={n} auto" for n in ranks)
    print(f"\n{coll}: busbw (GB/s)\n\n| size | {head} |\n|---|" + "---|" * 4 * len(ranks))
    for s in sorted({s for r in runs.values() for s, _ in r}):
        cells = []
        for n in ranks:
            r = runs[n]
            ring, nat, auto = r.get((s, "ring")), r.get((s, "native")), r.get((s, "auto"))
            cells += [f"{ring['busbw']:.3f}", f"{nat['busbw']:.3f}",
                      f"{nat['time_us'] / ring['time_us']:.2f}x",
                      f"{auto['busbw']:.3f} ({auto['picked']})" if auto else "-"]
        print(f"| {format_size(s)} | " + " | ".join(cells) + " |")
    wrong = sum(x["wrong"] for r in runs.values() for x in r.values())
    print(f"\n#wrong over every row: {wrong}")


if __name__ == "__main__":
    out, ranks = sys.argv[1], [int(x) for x in sys.argv[2:]] or [2, 4]
    for c in ("reduce_scatter", "allgather", "allreduce"):
        if all(pathlib.Path(f"{out}/{c}-n{n}.json").exists() for n in ranks):
            table(out, c, ranks)
