"""``python -m mpitrain bench``: one harness for every all-reduce algorithm (nccl-tests style).

For each message size (``--min`` .. ``--max``, times ``--step``) and each
algorithm, on the same buffers, interleaved (round k runs every algorithm once,
starting with a different one each round, so slow drifts hit all alike):

    reset buf from a pristine rank-dependent source   (copy, not timed)
    barrier
    t0 = perf_counter(); allreduce(buf, algorithm=a); t = perf_counter() - t0

    time    = max over ranks of the median t
    algbw   = bytes / time                    (GB/s, 1 GB = 1e9 bytes)
    busbw   = algbw * 2(n-1)/n                (what each link carries; = algbw for n = 1)
    speedup = native's time / this time       (native is always timed: it is the reference)
    #wrong  = elements that differ from native's result for the same input (exactly for
              integers, beyond rtol = 4 * ranks * eps for floats), on the worst rank; results
              that are not bitwise identical on every rank count too. Checked for every
              algorithm at every size, in the first (untimed) round and in the last timed one.

A ``memcpy`` row per size (one rank copying the same number of bytes, the
other ranks idle) shows the physical ceiling; its bandwidth is bytes / time.
With ``--backend cupy`` a ``d2h`` row per size (every rank copying the bytes from
its GPU into pinned host memory at the same time) shows the ceiling of the
staged ring (collectives/staging.py), which moves every byte over that link.

The harness is reusable: ``run_sweep`` returns the rows as dicts (the same on
every rank), ``measure`` times one function, ``parse_size``/``size_range`` make
the sizes, ``format_table``/``write_csv``/``write_json``/``plot`` present them.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

from . import backend
from .runtime import error_message, get_comm, hostname, log0, UserError

TARGET_SECONDS = 0.5  # default time budget per message size (all algorithms together)
MIN_ROUNDS = 10
MAX_ROUNDS = 1000
CHECK_CHUNK = 1 << 20  # elements compared at a time (bounded temporaries)
GB = 1e9

COLUMNS = ("size", "count", "type", "op", "algorithm", "picked", "time_us", "algbw", "busbw",
           "speedup", "wrong", "iters", "ranks")

# --------------------------------------------------------------------------- sizes

_UNITS = {"": 1, "b": 1,
          "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
          "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9}


def parse_size(text) -> int:
    """``8B``, ``4KiB``, ``1MiB``, ``64M`` (= MiB), ``1GB`` (= 10**9), ``4096`` -> bytes."""
    if isinstance(text, (int, np.integer)):
        value = int(text)
    else:
        s = str(text).strip().replace("_", "")
        i = len(s)
        while i > 0 and s[i - 1].isalpha():
            i -= 1
        num, unit = s[:i].strip(), s[i:].lower()
        if unit not in _UNITS or not num:
            raise ValueError(f"bad size {text!r}: use a number with an optional unit "
                             "B, K/KiB, M/MiB, G/GiB (binary) or KB, MB, GB (decimal), e.g. 8B, 4KiB, 64M")
        try:
            x = float(num)
        except ValueError:
            raise ValueError(f"bad size {text!r}: {num!r} is not a number") from None
        if not math.isfinite(x):
            raise ValueError(f"bad size {text!r}")
        value = int(round(x * _UNITS[unit]))
    if value <= 0:
        raise ValueError(f"bad size {text!r}: must be at least 1 byte")
    return value


def format_size(n: int) -> str:
    """8B, 64KiB, 1MiB, 1.5KiB, 1000B."""
    n = int(n)
    for name, unit in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= unit:
            return f"{n // unit}{name}" if n % unit == 0 else f"{n / unit:.3g}{name}"
    return f"{n}B"


def size_range(lo: int, hi: int, step: float = 4) -> list[int]:
    """lo, lo*step, lo*step**2, ... up to hi; hi itself is added when the steps miss it."""
    if lo > hi:
        raise ValueError(f"--min ({format_size(lo)}) is larger than --max ({format_size(hi)})")
    if not step > 1:
        raise ValueError(f"--step must be > 1 (a size multiplier), got {step}")
    out, s = [], float(lo)
    while int(round(s)) <= hi:
        out.append(int(round(s)))
        s *= step
    if out[-1] != hi:
        out.append(hi)
    return out


def counts_for(sizes, dtype) -> list[int]:
    """Element counts for byte sizes (at least 1, rounded down), without duplicates."""
    item = np.dtype(dtype).itemsize
    out = []
    for s in sizes:
        c = max(1, int(s) // item)
        if c not in out:
            out.append(c)
    return out


def busbw_factor(n: int) -> float:
    """Bus bandwidth factor of allreduce: 2(n-1)/n (1 for a single rank)."""
    return 2.0 * (n - 1) / n if n > 1 else 1.0


def tolerance(dtype, ranks: int) -> float:
    """Relative tolerance for comparing float results with native: 4 * ranks * eps (0 for ints)."""
    dt = np.dtype(dtype)
    if dt.kind != "f":
        return 0.0
    return 4.0 * max(ranks, 1) * float(np.finfo(dt).eps)


# --------------------------------------------------------------------------- data and checks


def make_source(n: int, dtype, op: str, rank: int, seed: int = 1234) -> np.ndarray:
    """Rank-dependent input that cannot overflow for any op: positive floats near 1 (so no
    cancellation and a bounded product), small integers for prod, +-1000 otherwise."""
    rng = np.random.default_rng([seed, rank])
    dt = np.dtype(dtype)
    if dt.kind == "f":
        lo, hi = (0.9, 1.1) if op == "prod" else (0.5, 1.5)
        x = rng.random(n, dtype=np.float32 if dt.itemsize <= 4 else np.float64)
        x *= hi - lo
        x += lo
        return x.astype(dt, copy=False)
    if op == "prod":
        return rng.choice(np.array([-2, -1, 1, 2], dtype=dt), size=n)
    return rng.integers(-1000, 1001, size=n, dtype=dt)


def count_wrong(got, ref, rtol: float, xp=np) -> int:
    """Elements of ``got`` that differ from ``ref`` (exactly when rtol == 0), in bounded chunks."""
    n = got.size
    bad = 0
    for i in range(0, n, CHECK_CHUNK):
        g, r = got[i:i + CHECK_CHUNK], ref[i:i + CHECK_CHUNK]
        if rtol == 0:
            bad += int(xp.count_nonzero(g != r))
        else:
            ok = xp.isclose(g.astype(xp.float64), r.astype(xp.float64), rtol=rtol, atol=0.0, equal_nan=True)
            bad += int(g.size - int(xp.count_nonzero(ok)))
    return bad


def _digest(buf) -> tuple[int, int]:
    """Cheap fingerprint of the exact bits (xor and wrapped sum of the words)."""
    h = backend.to_numpy(buf).reshape(-1)
    bits = h.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[h.itemsize])
    if bits.size == 0:
        return (0, 0)
    return int(np.bitwise_xor.reduce(bits)), int(bits.sum(dtype=np.uint64))


def check_result(comm, buf, ref, rtol: float, xp=np) -> int:
    """Collective. Elements of this rank's ``buf`` that are wrong against ``ref`` -- plus, when
    the ranks' results are not bitwise identical, those differing from rank 0's."""
    wrong = count_wrong(buf, ref, rtol, xp)
    if comm.Get_size() > 1:
        digests = comm.allgather(_digest(buf))
        if any(d != digests[0] for d in digests):
            root = xp.empty_like(buf)
            if comm.Get_rank() == 0:
                root[...] = buf
            _bcast(comm, root)
            mine_differs = digests[comm.Get_rank()] != digests[0]
            wrong = max(wrong, count_wrong(buf, root, 0.0, xp), 1 if mine_differs else 0)
    return wrong


def _bcast(comm, arr) -> None:
    """Bcast from rank 0 into ``arr`` (through the host for device arrays)."""
    if backend.is_device(arr):
        h = backend.to_numpy(arr).copy()
        comm.Bcast(h, root=0)
        arr.set(h)
    else:
        comm.Bcast(arr, root=0)


# --------------------------------------------------------------------------- timing


def _time_once(comm, fn, buf, src, xp) -> float:
    xp.copyto(buf, src)
    backend.synchronize(buf)
    comm.Barrier()
    t0 = time.perf_counter()
    fn(buf)
    backend.synchronize(buf)
    return time.perf_counter() - t0


def measure(comm, fn, buf, src, iters: int, warmup: int = 1, xp=None) -> float:
    """Collective. Seconds per call of ``fn(buf)``: max over ranks of the median of ``iters``
    barrier-started calls, ``buf`` reset from ``src`` before each (outside the timed region)."""
    xp = xp or backend.array_module(buf)
    for _ in range(warmup):
        _time_once(comm, fn, buf, src, xp)
    ts = [_time_once(comm, fn, buf, src, xp) for _ in range(max(1, iters))]
    return comm.allreduce(statistics.median(ts), op=MPI.MAX)


def measure_memcpy(comm, buf, src, iters: int, xp=np) -> float:
    """Collective. Median seconds of ``copyto(buf, src)`` on rank 0 alone (the others idle
    without busy-polling); every rank gets the value."""
    t = 0.0
    if comm.Get_rank() == 0:
        xp.copyto(buf, src)
        backend.synchronize(buf)
        ts = []
        for _ in range(max(1, iters)):
            t0 = time.perf_counter()
            xp.copyto(buf, src)
            backend.synchronize(buf)
            ts.append(time.perf_counter() - t0)
        t = statistics.median(ts)
        comm.Ibarrier().Wait()
    else:
        req = comm.Ibarrier()
        while not req.Test():
            time.sleep(0.0005)
    return comm.bcast(t, root=0)


def measure_d2h(comm, host, buf, iters: int) -> float:
    """Collective. Seconds to copy the device array ``buf`` into the pinned ``host`` array,
    every rank at once (ranks that share a GPU or a PCIe link share its bandwidth, as they do
    in the staged ring): max over ranks of the median. The staged ring's copy ceiling."""
    from .collectives.staging import ops_for

    ops = ops_for(buf)
    stream = ops.stream()
    ts = []
    for _ in range(max(1, iters) + 1):  # the first one warms up
        backend.synchronize(buf)
        comm.Barrier()
        t0 = time.perf_counter()
        ops.copy_d2h(host, buf, stream)
        ops.synchronize(ops.record(stream))
        ts.append(time.perf_counter() - t0)
    return comm.allreduce(statistics.median(ts[1:]), op=MPI.MAX)


def rounds_for(round_time: float, target_seconds: float = TARGET_SECONDS) -> int:
    """Timed rounds for a size whose one round (every algorithm once) took ``round_time`` s:
    enough to fill ``target_seconds``, at least MIN_ROUNDS, at most MAX_ROUNDS."""
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(target_seconds / max(round_time, 1e-9)))))


def _entries(comm, algorithms, op):
    """[(label, fn(buf))] with native first; ``algorithms`` holds names or (label, fn(buf, comm, op))."""
    from .collectives import ALGORITHMS, allreduce

    out = {}
    for a in ["native", *algorithms]:
        if isinstance(a, str):
            if a not in ALGORITHMS:
                raise ValueError(f"unknown algorithm {a!r}; known: {', '.join(ALGORITHMS)}")
            out.setdefault(a, (lambda name: lambda b: allreduce(b, comm, op=op, algorithm=name))(a))
        else:
            label, f = a
            out.setdefault(label, (lambda f: lambda b: f(b, comm, op))(f))
    return list(out.items())


def _label(a) -> str:
    return a if isinstance(a, str) else a[0]


def run_sweep(comm, sizes, algorithms=("ring", "tree", "native", "auto"), dtype="float32", op="sum",
              iters=None, xp=np, *, warmup: int = 2, memcpy: bool = True, seed: int = 1234,
              target_seconds: float = TARGET_SECONDS, progress=None, on_size=None) -> list[dict]:
    """Collective. Benchmark and check allreduce for each byte size in ``sizes``.

    ``algorithms``: names ("ring", "tree", "native", "auto") or (label, fn(buf, comm, op)) pairs.
    ``iters``: timed rounds per size (default: enough for ~``target_seconds`` per size,
    MIN_ROUNDS..MAX_ROUNDS). Returns one dict per (size, algorithm) -- keys in COLUMNS --
    plus a ``memcpy`` row per size when ``memcpy``; identical on every rank.
    ``progress(i, nsizes, nbytes, round, rounds)`` (round None: warm-up) and ``on_size(rows)``
    are called on every rank.
    """
    from .collectives import DTYPES, OPS, choose, state_for

    dt = np.dtype(dtype)
    if dt.name not in DTYPES:
        raise ValueError(f"dtype {dt.name} not supported; use one of {', '.join(DTYPES)}")
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    p, rank = comm.Get_size(), comm.Get_rank()
    wanted = list(dict.fromkeys(_label(a) for a in algorithms))
    entries = _entries(comm, algorithms, op)
    labels = [lab for lab, _ in entries]
    counts = counts_for(sizes, dt)
    nmax = max(counts)
    src = xp.asarray(make_source(nmax, dt, op, rank, seed))
    buf = xp.empty(nmax, dtype=dt)
    ref = xp.empty(nmax, dtype=dt)
    pinned = None  # device buffers: a d2h ceiling row per size, into pinned host memory
    if memcpy and backend.is_device(buf):
        from .collectives.staging import ops_for

        pinned = ops_for(buf).host_empty(dt, nmax)
    rtol = tolerance(dt, p)
    factor = busbw_factor(p)
    rows = []
    for si, n in enumerate(counts):
        nbytes = n * dt.itemsize
        b, s, r = buf[:n], src[:n], ref[:n]
        wrong = dict.fromkeys(labels, 0)

        # round 0: correctness (native first, its result is the reference); also a warm-up
        if progress is not None:
            progress(si, len(counts), nbytes, None, None)
        for lab, fn in entries:
            xp.copyto(b, s)
            fn(b)
            backend.synchronize(b)
            if lab == "native":
                xp.copyto(r, b)
            wrong[lab] = max(wrong[lab], check_result(comm, b, r, rtol, xp))

        # warm-up rounds, also timing one round to size the run
        round_time = 0.0
        for _ in range(warmup):
            t0 = time.perf_counter()
            for lab, fn in entries:
                _time_once(comm, fn, b, s, xp)
            round_time = time.perf_counter() - t0
        if iters:
            rounds = int(iters)
        else:
            if not warmup:
                t0 = time.perf_counter()
                for lab, fn in entries:
                    _time_once(comm, fn, b, s, xp)
                round_time = time.perf_counter() - t0
            rounds = rounds_for(comm.allreduce(round_time, op=MPI.MAX), target_seconds)

        times = {lab: [] for lab in labels}
        for it in range(rounds):
            if progress is not None:
                progress(si, len(counts), nbytes, it, rounds)
            k = it % len(entries)
            for lab, fn in entries[k:] + entries[:k]:
                times[lab].append(_time_once(comm, fn, b, s, xp))
                if it == rounds - 1:  # check the timed runs too (outside the timed region)
                    wrong[lab] = max(wrong[lab], check_result(comm, b, r, rtol, xp))

        med = np.array([statistics.median(times[lab]) for lab in labels], dtype=np.float64)
        comm.Allreduce(MPI.IN_PLACE, med, op=MPI.MAX)
        # lower quartile of the rounds (max over ranks): what bench --fit fits, robust to bursts of
        # load from other processes (rows carry it as low_us; the table and files show the median)
        low = np.array([np.percentile(times[lab], 25) for lab in labels], dtype=np.float64)
        comm.Allreduce(MPI.IN_PLACE, low, op=MPI.MAX)
        bad = np.array([wrong[lab] for lab in labels], dtype=np.int64)
        comm.Allreduce(MPI.IN_PLACE, bad, op=MPI.MAX)
        t_native = med[labels.index("native")]
        size_rows = []
        for lab in wanted:
            i = labels.index(lab)
            t = float(med[i])
            algbw = nbytes / t / GB if t > 0 else float("inf")
            size_rows.append({
                "size": nbytes, "count": n, "type": dt.name, "op": op, "algorithm": lab,
                "picked": choose(nbytes, p, state_for(comm)) if lab == "auto" else "",
                "time_us": t * 1e6, "low_us": float(low[i]) * 1e6, "algbw": algbw, "busbw": algbw * factor,
                "speedup": float(t_native / t) if t > 0 else float("inf"),
                "wrong": int(bad[i]), "iters": rounds, "ranks": p,
            })
        if memcpy:
            t = measure_memcpy(comm, b, s, max(MIN_ROUNDS, min(rounds, 50)), xp)
            bw = nbytes / t / GB if t > 0 else float("inf")
            size_rows.append({"size": nbytes, "count": n, "type": dt.name, "op": op, "algorithm": "memcpy",
                              "picked": "", "time_us": t * 1e6, "algbw": bw, "busbw": bw, "speedup": None,
                              "wrong": 0, "iters": max(MIN_ROUNDS, min(rounds, 50)), "ranks": 1})
        if pinned is not None:
            it = max(MIN_ROUNDS, min(rounds, 50))
            t = measure_d2h(comm, pinned[:n], b, it)
            bw = nbytes / t / GB if t > 0 else float("inf")
            size_rows.append({"size": nbytes, "count": n, "type": dt.name, "op": op, "algorithm": "d2h",
                              "picked": "", "time_us": t * 1e6, "algbw": bw, "busbw": bw, "speedup": None,
                              "wrong": 0, "iters": it, "ranks": p})
        rows.extend(size_rows)
        if on_size is not None:
            on_size(size_rows)
    return rows


def exit_status(rows) -> int:
    """1 when any row has wrong elements, else 0 (rows are identical on every rank)."""
    return 1 if any(r.get("wrong") for r in rows) else 0


# --------------------------------------------------------------------------- output


def _alg_text(row) -> str:
    return f"{row['algorithm']}:{row['picked']}" if row.get("picked") else row["algorithm"]


HEADER = (f"#{'size':>9} {'count':>10} {'type':>8} {'op':>5} {'algorithm':>12} {'time(us)':>11} "
          f"{'algbw(GB/s)':>11} {'busbw(GB/s)':>11} {'speedup':>8} {'#wrong':>7}")


CEILINGS = ("memcpy", "d2h")  # rows that are copies, not all-reduces


def format_row(row) -> str:
    memcpy = row["algorithm"] in CEILINGS
    sp = "-" if row.get("speedup") is None else f"{row['speedup']:.2f}"
    wrong = "-" if memcpy else str(row["wrong"])
    return (f"{format_size(row['size']):>10} {row['count']:>10} {row['type']:>8} {row['op']:>5} "
            f"{_alg_text(row):>12} {row['time_us']:>11.1f} {row['algbw']:>11.3f} {row['busbw']:>11.3f} "
            f"{sp:>8} {wrong:>7}")


def format_header(meta: dict) -> str:
    tol = "exact" if not meta["rtol"] else f"rtol {meta['rtol']:.2g}"
    iters = meta["iters"] or f"auto (~{TARGET_SECONDS:g} s per size, {MIN_ROUNDS}..{MAX_ROUNDS})"
    lines = [
        "# mpitrain bench: allreduce",
        f"#   ranks {meta['ranks']} on {len(meta['hosts'])} host(s): {', '.join(meta['hosts'])}"
        + (f" ({meta['nodes']} nodes by shared memory)" if meta.get("nodes", 1) > len(meta["hosts"]) else ""),
        f"#   MPI library: {meta['mpi']}",
        f"#   dtype {meta['dtype']}  op {meta['op']}  backend {meta['backend']}  "
        f"algorithms {','.join(meta['algorithms'])}",
        f"#   sizes {format_size(meta['min'])}..{format_size(meta['max'])} x{meta['step']:g}  "
        f"iters {iters}  "
        f"warmup {meta['warmup']}",
        "#   time: max over ranks of the median; algbw = bytes/time; busbw = algbw*2(n-1)/n; "
        "speedup = native time / time",
        f"#   #wrong: elements differing from native ({tol}) or between ranks; "
        "memcpy: one rank copying the same bytes (the ceiling)",
        "#",
        HEADER,
    ]
    if meta.get("backend") == "cupy":
        lines[-2:-2] = ["#   d2h: every rank copying the bytes GPU -> pinned host at once (the staged "
                        "ring's copy ceiling); " + meta.get("cuda_aware", "")]
    return "\n".join(lines)


def format_table(rows, meta: dict | None = None) -> str:
    parts = [format_header(meta)] if meta else [HEADER]
    parts += [format_row(r) for r in rows]
    return "\n".join(parts)


def summarize(rows) -> list[str]:
    """Footer lines: wrong results, and per algorithm its peak busbw and speedup vs native."""
    out = []
    bad = [r for r in rows if r.get("wrong")]
    if bad:
        where = ", ".join(f"{_alg_text(r)} at {format_size(r['size'])} ({r['wrong']})" for r in bad[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        out.append(f"# wrong results: {sum(r['wrong'] for r in bad)} elements -- FAILED: {where}{more}")
    else:
        out.append("# wrong results: 0 -- OK")
    algs = list(dict.fromkeys(r["algorithm"] for r in rows if r["algorithm"] not in CEILINGS))
    big = 1 << 20
    for a in algs:
        rs = [r for r in rows if r["algorithm"] == a]
        peak = max(rs, key=lambda r: r["busbw"])
        line = f"# {a:>8}: peak busbw {peak['busbw']:.3f} GB/s at {format_size(peak['size'])}"
        if a != "native":
            sel = [r for r in rs if r["size"] >= big] or rs
            sp = [r["speedup"] for r in sel if r["speedup"] and math.isfinite(r["speedup"])]
            if sp:
                gm = math.exp(sum(math.log(x) for x in sp) / len(sp))
                span = ">= 1MiB" if sel is not rs else "all sizes"
                line += f"; speedup vs native ({span}): geo-mean {gm:.2f}, range {min(sp):.2f}..{max(sp):.2f}"
        out.append(line)
    mc = [r for r in rows if r["algorithm"] == "memcpy"]
    if mc:
        peak = max(mc, key=lambda r: r["busbw"])
        out.append(f"#   memcpy: peak {peak['busbw']:.3f} GB/s at {format_size(peak['size'])} (one rank)")
    d2h = {r["size"]: r for r in rows if r["algorithm"] == "d2h"}
    if d2h:
        peak = max(d2h.values(), key=lambda r: r["busbw"])
        out.append(f"#      d2h: peak {peak['busbw']:.3f} GB/s at {format_size(peak['size'])} (all ranks at once)")
        top = max(d2h)
        for a in algs:
            r = next((r for r in rows if r["algorithm"] == a and r["size"] == top), None)
            if r is not None and d2h[top]["busbw"] > 0:
                out.append(f"# {a:>8}: busbw / d2h ceiling at {format_size(top)}: "
                           f"{r['busbw'] / d2h[top]['busbw']:.2f}")
    return out


def write_csv(path, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})


def write_json(path, rows, meta: dict | None = None) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta or {}, "rows": rows}, f, indent=1)
        f.write("\n")


def size_axes(ax, sizes, ylabel: str) -> None:
    """Log-log axes with message sizes (8B, 1MiB, ...) as x ticks: shared by every bench plot."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    every = max(1, math.ceil(len(sizes) / 14))
    ax.xaxis.set_major_locator(FixedLocator(sizes[::every]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_size(int(round(x)))))
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    ax.set_xlabel("message size")
    ax.set_ylabel(ylabel)


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot(path, rows, meta: dict | None = None) -> None:
    """busbw vs size per algorithm, log-log, memcpy as a dashed ceiling; PNG (Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'mpitrain[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    algs = list(dict.fromkeys(r["algorithm"] for r in rows))
    for a in algs:
        rs = sorted((r for r in rows if r["algorithm"] == a), key=lambda r: r["size"])
        xs = [r["size"] for r in rs]
        ys = [max(r["busbw"], 1e-9) for r in rs]
        if a == "memcpy":
            ax.plot(xs, ys, "--", color="0.3", label="memcpy (1 rank, ceiling)")
        elif a == "d2h":
            ax.plot(xs, ys, ":", color="0.3", label="GPU->host copy (all ranks, staging ceiling)")
        else:
            ax.plot(xs, ys, "o-", ms=3, label=a)
    size_axes(ax, sorted({r["size"] for r in rows}), "busbw (GB/s)")
    if meta:
        ax.set_title(f"allreduce busbw: {meta.get('ranks')} ranks on {len(meta.get('hosts', []))} host(s), "
                     f"{meta.get('dtype')} {meta.get('op')}\n{meta.get('mpi', '')}", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


class _DefaultSize(int):
    """A size the user did not give (``bench --model`` has its own default range, up to 1 GiB)."""

    is_default = True


def _size_arg(text):
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _step_arg(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --step {text!r}: a number > 1") from None
    if not v > 1:
        raise argparse.ArgumentTypeError(f"--step must be > 1 (a size multiplier), got {text}")
    return v


def _positive(text):
    v = _nonneg(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .collectives import DTYPES, OPS

    p.description = ("Time and check every all-reduce algorithm over a range of message sizes "
                     "(nccl-tests style). Exit status 1 when any result is wrong.")
    p.add_argument("--algorithms", default="ring,tree,native,auto",
                   help="comma-separated: ring, tree, native, auto (default: all)")
    p.add_argument("--min", type=_size_arg, default=parse_size("8B"), metavar="SIZE",
                   help="smallest message, e.g. 8B, 4KiB (default 8B)")
    p.add_argument("--max", type=_size_arg, default=_DefaultSize(parse_size("256MiB")), metavar="SIZE",
                   help="largest message, e.g. 64M, 256MiB (default 256MiB; 1GiB with --model); K/M/G are binary")
    p.add_argument("--step", type=_step_arg, default=4.0, help="size multiplier (default 4)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--op", default="sum", choices=OPS)
    p.add_argument("--iters", type=_nonneg, default=None,
                   help=f"timed iterations per size (default or 0: scaled to size, ~{TARGET_SECONDS:g} s "
                        f"per size, {MIN_ROUNDS}..{MAX_ROUNDS})")
    p.add_argument("--warmup", type=_nonneg, default=2, help="untimed rounds per size (default 2)")
    p.add_argument("--json", metavar="FILE", help="write the rows (and run parameters) as JSON")
    p.add_argument("--csv", metavar="FILE", help="write the rows as CSV")
    p.add_argument("--plot", metavar="FILE.png", help="draw busbw vs size per algorithm (needs matplotlib)")
    p.add_argument("--backend", default="numpy", choices=("numpy", "cupy"),
                   help="where the buffers live (cupy: on the GPU)")
    p.add_argument("--quiet", action="store_true", help="no table or progress (files and errors only)")
    p.add_argument("--fit", action="store_true",
                   help="fit the cost model (alpha, beta, gamma: collectives/cost.py) to this sweep, "
                        "store it for this host and rank count (~/.cache/mpitrain, or $MPITRAIN_COST_FILE) "
                        "and print predicted vs measured; auto then picks by the model. "
                        "With --plot: measured (solid) vs predicted (dashed) time per size")
    m = p.add_argument_group(
        "extrapolation (--model: one process, no mpirun; collectives/extrapolate.py)")
    m.add_argument("--model", action="store_true",
                   help="predict ring, tree and hier times for many ranks on many hosts from the fitted "
                        "alpha/beta/gamma per link type (intra-host, inter-host); prints a table per N and size "
                        "(--json: the rows); --plot: the best algorithm over (N, size) and time vs N")
    m.add_argument("--ranks", metavar="LIST", default=None,
                   help="rank counts N for --model: 2,8,64 or 2..1024 (powers of two; default 2..1024)")
    m.add_argument("--ppn", type=_positive, default=None, metavar="L",
                   help="ranks per host for --model (in blocks: N = H hosts x L; default: this host's cores; "
                        "with --validate: from each file's meta)")
    m.add_argument("--link", action="append", metavar="TYPE=SRC[,TYPE=SRC]",
                   help="parameter sources for --model: intra=COST.json (a single-host bench --fit; default: this "
                        "host's), inter=COST.json (a bench --fit across hosts), inter=25us@1.17GB/s, "
                        "inter=BENCH.json[,BENCH2.json] (fitted to their ring rows), TYPE=default")
    m.add_argument("--from-json", metavar="A.json[,B.json]", default=None,
                   help="--model: fit the inter-host link to the ring rows of these multi-host bench JSON files")
    m.add_argument("--validate", metavar="A.json[,B.json]", default=None,
                   help="--model: compare predictions with the ring/tree/hier rows of these bench JSON files "
                        "(measured vs predicted, error per row, median/max; rows beyond 20%% flagged)")
    p.set_defaults(func=main)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpitrain bench")
    add_arguments(p)
    return p


def _agree(comm, problem: str | None) -> str | None:
    """Collective: the first rank's problem (tagged with its rank), or None when no rank has one."""
    probs = comm.allgather(problem)
    for r, msg in enumerate(probs):
        if msg:
            return msg if r == comm.Get_rank() or comm.Get_size() == 1 else f"(rank {r}) {msg}"
    return None


def _use_gpu(comm):
    """cupy on this rank's GPU (backend.select_device). Ranks may share a GPU here: the bench
    then measures the sharing (and the d2h row copies on all ranks at once). Collective."""
    problem = None
    try:
        xp = backend.get_xp("cupy")
    except UserError as e:
        problem = str(e)
    problem = _agree(comm, problem)
    if problem:
        raise UserError(problem)
    backend.select_device(comm, share=True)
    return xp


def _meta(comm, args, algorithms, dtype) -> dict:
    from .collectives.cost import node_ids

    hosts = comm.allgather(hostname())
    nodes = node_ids(comm)
    return {"ranks": comm.Get_size(), "hosts": sorted(set(hosts)), "nodes": len(set(nodes)),
            "ppn": max(nodes.count(h) for h in set(nodes)),
            "mpi": " ".join(MPI.Get_library_version().strip().splitlines()[0].split()),
            "dtype": dtype, "op": args.op, "algorithms": algorithms, "backend": args.backend,
            "min": args.min, "max": args.max, "step": args.step, "iters": args.iters,
            "warmup": args.warmup, "rtol": tolerance(dtype, comm.Get_size()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **({"cuda_aware": "CUDA-aware MPI: " + ("yes" if backend.cuda_aware_mpi() else "no") + " ("
                + backend.cuda_aware_info()[1] + ")"} if args.backend == "cupy" else {})}


def main(args) -> int:
    from .collectives import ALGORITHMS
    from .metrics import StatusLine

    comm = get_comm()
    rank = comm.Get_rank()
    model_only = [o for o, v in (("--ranks", getattr(args, "ranks", None)), ("--ppn", getattr(args, "ppn", None)),
                                 ("--link", getattr(args, "link", None)),
                                 ("--from-json", getattr(args, "from_json", None)),
                                 ("--validate", getattr(args, "validate", None))) if v]
    if getattr(args, "model", False):
        if args.fit:
            log0(error_message(UserError("--model predicts from fitted parameters, --fit measures them: "
                                         "run them separately")), file=sys.stderr)
            return 2
        from .collectives import extrapolate

        code = extrapolate.run(args) if rank == 0 else 0  # not an MPI run: rank 0 alone
        return comm.bcast(code, root=0)
    if model_only:
        log0(error_message(UserError(f"{', '.join(model_only)}: only with --model")), file=sys.stderr)
        return 2

    # validate everything before the sweep; every rank agrees on the outcome
    problem = None
    algorithms = list(dict.fromkeys(a.strip() for a in str(args.algorithms).split(",") if a.strip()))
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    xp = np
    if not algorithms:
        problem = f"--algorithms is empty; known: {', '.join(ALGORITHMS)}"
    elif unknown:
        problem = f"unknown algorithm(s) {', '.join(map(repr, unknown))} in --algorithms; known: {', '.join(ALGORITHMS)}"
    if problem is None:
        try:
            sizes = size_range(args.min, args.max, args.step)
        except ValueError as e:
            problem = str(e)
    if problem is None and args.plot and rank == 0 and not have_matplotlib():
        problem = "--plot needs matplotlib: pip install 'mpitrain[plot]'"
    if problem is None and args.fit:
        if comm.Get_size() < 2:
            problem = "--fit needs 2 ranks or more (with 1, auto always runs native): mpirun -n P python -m mpitrain bench --fit"
        elif args.backend != "numpy":
            problem = "--fit models host buffers: use --backend numpy"
        else:  # the fit needs every algorithm timed
            algorithms = list(dict.fromkeys([*algorithms, "ring", "tree", "native", "auto"]))
    if problem is None and args.backend == "cupy":
        try:
            xp = _use_gpu(comm)
        except UserError as e:
            problem = str(e)
    problem = _agree(comm, problem)
    if problem:
        log0(error_message(UserError(problem)), file=sys.stderr)
        return 2

    meta = _meta(comm, args, algorithms, args.dtype)
    show = rank == 0 and not args.quiet
    if show:
        log0(format_header(meta))
    # Under mpirun the ranks' stderr is a pipe, not a TTY: then a plain progress line every
    # 10 s, starting only once the sweep has run that long (short sweeps print none).
    status = StatusLine(sys.stderr, interval=10.0, enabled=show, delay_first=True)
    t_start = time.perf_counter()

    def progress(i, nsizes, nbytes, it, rounds):
        if status.due():
            where = "warm-up" if it is None else f"round {it + 1}/{rounds}"
            status.update(f"bench: {format_size(nbytes)} ({i + 1}/{nsizes} sizes), {where}, "
                          f"{time.perf_counter() - t_start:.0f} s elapsed")

    def on_size(size_rows):
        if show:
            status.clear()
            log0("\n".join(format_row(r) for r in size_rows))

    rows = run_sweep(comm, sizes, algorithms, args.dtype, args.op, iters=args.iters or None, xp=xp,
                     warmup=args.warmup, progress=progress, on_size=on_size)
    status.close()
    from .collectives import cost

    fitted = cost.fit_for_bench(comm, rows, meta) if args.fit else None  # collective: fit, store, use
    if fitted:
        meta["cost_model"] = fitted["model"].to_dict()
    if show:
        log0("\n".join(summarize(rows) + cost.format_auto_vs_best(rows)))
        if fitted:
            log0(fitted["report"])
    if rank == 0:
        if args.json:
            write_json(args.json, rows, meta)
        if args.csv:
            write_csv(args.csv, rows)
        if args.plot:
            if fitted:
                cost.plot_fit(args.plot, fitted["rows"], fitted["model"], meta)
            else:
                plot(args.plot, rows, meta)
    code = exit_status(rows)
    if code:
        n = sum(r["wrong"] for r in rows)
        log0(error_message(UserError(f"bench: {n} wrong elements (see #wrong); the algorithms disagree with native")),
             file=sys.stderr)
    comm.Barrier()  # files are complete before any rank exits
    return code


if __name__ == "__main__":  # python -m mpi4py -m mpitrain.bench ... (without the full CLI)
    sys.exit(main(build_parser().parse_args()))
