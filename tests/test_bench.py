"""The benchmark harness (mpitrain.bench): sizes, formatting, files, and the sweep under MPI."""

import csv
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from mpitrain import bench
from mpitrain.bench import COLUMNS, exit_status, format_table, report, timing
from mpitrain.bench.checks import count_wrong, make_source, tolerance
from mpitrain.bench.command import unwritable
from mpitrain.bench.sweep import busbw_factor, counts_for
from mpitrain.units import size_range

from conftest import MPIRUN  # noqa: E402 - beside this Python, else on PATH


# --------------------------------------------------------------------------- sizes (serial; parsing: test_units.py)


def test_counts_for_rounds_down_and_dedupes():
    assert counts_for([8, 32, 1000], "float32") == [2, 8, 250]
    assert counts_for([1, 2, 4, 8, 12], "float64") == [1]  # at least one element, no duplicates
    assert counts_for([2, 4, 6], "float16") == [1, 2, 3]


def test_busbw_factor_and_tolerance():
    assert busbw_factor(1) == 1.0
    assert busbw_factor(2) == 1.0
    assert busbw_factor(4) == pytest.approx(1.5)
    assert tolerance("int32", 4) == 0.0 and tolerance("int64", 4) == 0.0
    assert tolerance("float32", 4) == pytest.approx(16 * np.finfo(np.float32).eps)
    assert tolerance("float16", 2) > tolerance("float32", 2) > tolerance("float64", 2) > 0


def test_count_wrong():
    ref = np.linspace(1, 2, 3000, dtype=np.float32)
    got = ref.copy()
    assert count_wrong(got, ref, tolerance("float32", 2)) == 0
    got[[0, 7, 2999]] *= np.float32(1.001)
    assert count_wrong(got, ref, tolerance("float32", 2)) == 3
    got = ref * np.float32(1 + 2e-7)  # within 8 eps
    assert count_wrong(got, ref, tolerance("float32", 2)) == 0
    i = np.arange(10, dtype=np.int64)
    j = i.copy()
    j[3] += 1
    assert count_wrong(j, i, 0.0) == 1


def test_make_source_rank_dependent_and_safe():
    a = make_source(1000, "float32", "sum", 0)
    b = make_source(1000, "float32", "sum", 1)
    assert a.dtype == np.float32 and not np.array_equal(a, b)
    assert np.array_equal(a, make_source(1000, "float32", "sum", 0))  # reproducible
    assert (a >= 0.5).all() and (a < 1.5).all()
    p = make_source(1000, "int32", "prod", 3)
    assert set(np.unique(p)) <= {-2, -1, 1, 2}
    h = make_source(10, "float16", "prod", 2)
    assert h.dtype == np.float16 and (h > 0.85).all() and (h < 1.15).all()


# --------------------------------------------------------------------------- formatting (serial)


def _rows():
    base = {"count": 256, "type": "float32", "op": "sum", "iters": 10, "ranks": 4, "size": 1024}
    return [
        {**base, "algorithm": "ring", "picked": "", "time_us": 50.0, "algbw": 0.02048, "busbw": 0.03072,
         "speedup": 0.5, "wrong": 0},
        {**base, "algorithm": "native", "picked": "", "time_us": 25.0, "algbw": 0.04096, "busbw": 0.06144,
         "speedup": 1.0, "wrong": 0},
        {**base, "algorithm": "auto", "picked": "native", "time_us": 26.0, "algbw": 0.0394, "busbw": 0.0591,
         "speedup": 0.96, "wrong": 0},
        {**base, "algorithm": "memcpy", "picked": "", "time_us": 0.5, "algbw": 2.048, "busbw": 2.048,
         "speedup": None, "wrong": 0, "ranks": 1},
        {**base, "algorithm": "p2p", "picked": "", "time_us": 1.0, "algbw": 1.024, "busbw": 1.024,
         "speedup": None, "wrong": 0, "ranks": 2},
    ]


def _meta():
    return {"ranks": 4, "hosts": ["a", "b"], "mpi": "MPICH Version: 5", "dtype": "float32", "op": "sum",
            "algorithms": ["ring", "native", "auto"], "backend": "numpy", "min": 8, "max": 1024, "step": 4.0,
            "iters": None, "warmup": 2, "rtol": tolerance("float32", 4)}


def test_format_table():
    text = format_table(_rows(), _meta())
    lines = text.splitlines()
    header = next(line for line in lines if "algbw(GB/s)" in line)
    for col in ("size", "count", "type", "op", "algorithm", "time(us)", "algbw(GB/s)", "busbw(GB/s)",
                "speedup", "#wrong"):
        assert col in header
    assert any("ranks 4 on 2 host(s)" in line for line in lines)
    assert any("MPICH" in line for line in lines)
    body = [line for line in lines if not line.startswith("#")]
    assert len(body) == 5
    ring = body[0].split()
    assert ring[:5] == ["1KiB", "256", "float32", "sum", "ring"]
    assert ring[5:] == ["50.0", "0.020", "0.031", "0.50", "0"]
    assert "auto:native" in body[2]
    mem = body[3].split()
    assert mem[4] == "memcpy" and mem[-2:] == ["-", "-"]
    wire = body[4].split()
    assert wire[4] == "p2p" and wire[-2:] == ["-", "-"] and wire[7] == "1.024"
    assert any(line.startswith("#   p2p: ranks 0 and 1 ping-pong") for line in lines)
    # columns line up with the header
    assert len(body[0]) == len(body[3]) == len(body[4]) == len(header)


def test_summary_shows_the_wire_beside_memcpy():
    s = report.summarize(_rows())
    assert any("memcpy: peak 2.048 GB/s" in line for line in s)
    assert any("p2p: peak 1.024 GB/s at 1KiB (ping-pong, ranks 0-1)" in line for line in s)
    ring = next(line for line in s if "ring: busbw / p2p at 1KiB" in line)
    assert ring.endswith(f"{0.03072 / 1.024:.2f}")
    assert not any(line.lstrip("# ").startswith("p2p: peak busbw") for line in s), "p2p is no algorithm"


def test_the_fit_takes_the_wire_from_p2p_rows_that_span_both_regimes():
    from mpitrain.bench.fit import wire_pingpong
    rows = [{"algorithm": "p2p", "size": n, "time_us": 1 + n / 1e4} for n in (8, 1024, 65536, 1 << 20)]
    sizes, times = wire_pingpong(rows + _rows()[:3])  # the algorithms' rows are not the wire
    assert sizes == [8, 1024, 65536, 1 << 20] and times[0] == pytest.approx(1.0008e-6)
    big = [r for r in rows if r["size"] >= 65536] + [{"algorithm": "p2p", "size": 1 << 22, "time_us": 400.0}]
    assert wire_pingpong(big) is None  # nothing in the latency regime
    assert wire_pingpong(rows[:2]) is None  # too few, nothing large


def test_summary_reports_failures():
    rows = _rows()
    assert report.summarize(rows)[0].endswith("OK")
    rows[0]["wrong"] = 7
    s = report.summarize(rows)
    assert "FAILED" in s[0] and "ring at 1KiB (7)" in s[0]
    assert exit_status(rows) == 1
    assert exit_status(_rows()) == 0


def test_csv_and_json(tmp_path):
    rows = _rows()
    bench.write_csv(tmp_path / "b.csv", rows)
    with open(tmp_path / "b.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0].keys()) == list(COLUMNS)
    assert [g["algorithm"] for g in got] == ["ring", "native", "auto", "memcpy", "p2p"]
    assert float(got[0]["busbw"]) == pytest.approx(0.03072) and got[3]["speedup"] == ""
    assert got[2]["picked"] == "native"
    bench.write_json(tmp_path / "b.json", rows, _meta())
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["rows"] == rows and doc["meta"]["ranks"] == 4


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "b.png"
    bench.plot(out, _rows() + [{**r, "size": 4096, "busbw": r["busbw"] * 3} for r in _rows()], _meta())
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_parser_defaults_and_errors():
    p = bench.build_parser()
    a = p.parse_args([])
    assert (a.min, a.max, a.step, a.dtype, a.op, a.iters) == (8, 256 << 20, 4.0, "float32", "sum", None)
    assert a.algorithms == "ring,tree,native,auto" and a.func is bench.main
    a = p.parse_args(["--min", "4KiB", "--max", "64M", "--step", "2", "--dtype", "int64", "--op", "max"])
    assert (a.min, a.max, a.step, a.dtype, a.op) == (4096, 64 << 20, 2.0, "int64", "max")
    for bad in (["--min", "8XB"], ["--step", "1"], ["--dtype", "int8"], ["--op", "mean"], ["--iters", "-1"]):
        with pytest.raises(SystemExit), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p.parse_args(bad)


def test_parser_model_options():
    p = bench.build_parser()
    a = p.parse_args([])
    assert not a.model and a.ppn is None and a.link is None and a.validate is None and a.from_json is None
    assert getattr(a.max, "is_default", False)  # --model then runs to 1 GiB
    assert not getattr(p.parse_args(["--max", "256MiB"]).max, "is_default", False)
    a = p.parse_args(["--model", "--ranks", "2..64", "--ppn", "8", "--link", "intra=a.json",
                      "--link", "inter=25us@1GB/s", "--from-json", "x.json,y.json", "--validate", "z.json"])
    assert (a.model, a.ranks, a.ppn, a.link, a.from_json, a.validate) == (
        True, "2..64", 8, ["intra=a.json", "inter=25us@1GB/s"], "x.json,y.json", "z.json")
    with pytest.raises(SystemExit), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p.parse_args(["--model", "--ppn", "0"])


def test_header_tells_nodes_apart_from_host_names():
    meta = dict(_meta(), hosts=["vm"], nodes=3)
    assert "(3 nodes by shared memory)" in report.format_header(meta)
    assert "nodes by shared memory" not in report.format_header(dict(meta, nodes=1))


# --------------------------------------------------------------------------- end to end (serial, spawns mpirun)


def _bench_command():
    """``python -m mpitrain bench`` when the full CLI imports, else the module on its own."""
    try:
        from mpitrain import cli

        cli.build_parser()
        return [sys.executable, "-m", "mpitrain", "bench"]
    except ImportError as e:
        warnings.warn(f"the mpitrain CLI does not import yet ({e}); testing python -m mpitrain.bench")
        return [sys.executable, "-m", "mpi4py", "-m", "mpitrain.bench"]


def _run(args, n=2, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([MPIRUN, "-n", str(n), *_bench_command(), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.skipif(not os.path.exists(MPIRUN), reason="no mpirun next to the Python interpreter")
def test_bench_command_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    j, c, png = tmp_path / "b.json", tmp_path / "b.csv", tmp_path / "b.png"
    res = _run(["--min", "8B", "--max", "64KiB", "--json", str(j), "--csv", str(c), "--plot", str(png)])
    assert res.returncode == 0, res.stdout + res.stderr
    table = [line for line in res.stdout.splitlines() if line.strip() and not line.startswith("#")]
    sizes = size_range(8, 64 << 10, 4)
    assert len(table) == len(sizes) * 6  # ring, tree, native, auto, memcpy, p2p
    assert res.stdout.count("# mpitrain bench") == 1  # rank 0 only
    doc = json.loads(j.read_text())
    rows = doc["rows"]
    assert doc["meta"]["ranks"] == 2
    assert [r["size"] for r in rows if r["algorithm"] == "ring"] == sizes
    assert {r["algorithm"] for r in rows} == {"ring", "tree", "native", "auto", "memcpy", "p2p"}
    assert "p2p: peak" in res.stdout and "ring: busbw / p2p at 64KiB" in res.stdout
    for r in rows:
        assert r["wrong"] == 0
        assert r["time_us"] > 0 and r["algbw"] == pytest.approx(r["size"] / r["time_us"] / 1e3)
        if r["algorithm"] not in ("memcpy", "p2p"):
            assert r["busbw"] == pytest.approx(r["algbw"])  # 2(n-1)/n = 1 for n = 2
            assert r["count"] == r["size"] // 4 and r["type"] == "float32" and r["op"] == "sum"
    with open(c, newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.skipif(not os.path.exists(MPIRUN), reason="no mpirun next to the Python interpreter")
def test_bench_command_bad_algorithm_one_message():
    res = _run(["--algorithms", "ring,bogus", "--max", "64B"], timeout=60)
    assert res.returncode != 0
    assert res.stderr.count("bogus") == 1, res.stderr  # one message, from rank 0
    assert "[rank 0@" in res.stderr and "known:" in res.stderr


@pytest.mark.skipif(not os.path.exists(MPIRUN), reason="no mpirun next to the Python interpreter")
@pytest.mark.parametrize("flag", ["--json", "--csv", "--plot"])
def test_bench_command_unwritable_output_fails_before_the_sweep(tmp_path, flag):
    if flag == "--plot":
        pytest.importorskip("matplotlib")
    path = tmp_path / "no-such-dir" / "out.file"
    # up to 256 MiB with the default rounds the sweep would take minutes: the error must come first
    res = _run([flag, str(path), "--min", "8B", "--max", "256MiB"], timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "[rank 0@" in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert f"{flag} {path}: cannot write there (No such file or directory)" in lines[0]
    assert "# mpitrain bench" not in res.stdout and not [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert not path.parent.exists()


@pytest.mark.skipif(not os.path.exists(MPIRUN), reason="no mpirun next to the Python interpreter")
def test_bench_model_unwritable_json_fails_at_once(tmp_path):
    res = _run(["--model", "--ranks", "4", "--max", "64B", "--json", str(tmp_path)], n=1, timeout=60)
    assert res.returncode == 2 and f"--json {tmp_path}: cannot write there" in res.stderr
    assert "# mpitrain bench --model" not in res.stdout


def test_unwritable_probes_without_leaving_anything(tmp_path):
    def args(**kw):
        return bench.build_parser().parse_args([x for k, v in kw.items() for x in (f"--{k}", str(v))])

    assert unwritable(args()) is None
    ok = tmp_path / "fine.json"
    assert unwritable(args(json=ok, csv=tmp_path / "fine.csv")) is None
    assert not ok.exists() and not (tmp_path / "fine.csv").exists()  # the probe removed what it made
    old = tmp_path / "old.csv"
    old.write_text("kept\n")
    assert unwritable(args(csv=old)) is None and old.read_text() == "kept\n"  # never truncated
    assert "--json " + str(tmp_path) + ": cannot write there (is a directory)" == unwritable(args(json=tmp_path))
    assert "cannot write there" in unwritable(args(plot=old / "x.png"))  # below a regular file
    assert unwritable(args(json=ok, csv=tmp_path / "nope" / "x.csv")).startswith("--csv ")


# --------------------------------------------------------------------------- MPI: the sweep itself


def _same_everywhere(comm, rows):
    return all(g == rows for g in comm.allgather(rows))


@pytest.mark.mpi
def test_run_sweep_rows_correct_and_busbw(comm):
    from mpitrain.collectives import choose

    p = comm.Get_size()
    sizes = [8, 1000, 4096]
    algs = ["ring", "tree", "native", "auto"]
    rows = bench.run_sweep(comm, sizes, algs, "float32", "sum", iters=2, warmup=0)
    assert _same_everywhere(comm, rows)
    ceilings = ["memcpy"] + (["p2p"] if p > 1 else [])  # p2p: the wire between ranks 0 and 1
    assert len(rows) == len(sizes) * (len(algs) + len(ceilings))
    for s in sizes:
        at = [r for r in rows if r["size"] == s]
        assert [r["algorithm"] for r in at] == algs + ceilings
    for r in rows:
        assert r["wrong"] == 0, r
        assert r["time_us"] > 0
        assert r["algbw"] == pytest.approx(r["size"] / (r["time_us"] * 1e-6) / 1e9)
        if r["algorithm"] in ("memcpy", "p2p"):
            assert r["busbw"] == r["algbw"] and r["speedup"] is None
            assert r["ranks"] == (1 if r["algorithm"] == "memcpy" else 2)
            continue
        assert r["busbw"] == pytest.approx(r["algbw"] * (2 * (p - 1) / p if p > 1 else 1))
        assert r["iters"] == 2 and r["ranks"] == p
        assert r["picked"] == (choose(r["size"], p) if r["algorithm"] == "auto" else "")
        native = next(x for x in rows if x["size"] == r["size"] and x["algorithm"] == "native")
        assert r["speedup"] == pytest.approx(native["time_us"] / r["time_us"])
    assert exit_status(rows) == 0


@pytest.mark.mpi
@pytest.mark.parametrize("dtype,op", [("int32", "prod"), ("int64", "avg"), ("float16", "sum"),
                                      ("float64", "max"), ("float32", "min")])
def test_run_sweep_dtypes_ops(comm, dtype, op):
    rows = bench.run_sweep(comm, [2, 3000], ["ring", "tree"], dtype, op, iters=1, warmup=0, memcpy=False)
    assert [r["algorithm"] for r in rows] == ["ring", "tree"] * 2
    assert all(r["wrong"] == 0 and r["type"] == dtype and r["op"] == op for r in rows), rows


def test_rounds_for_scales_with_time():
    assert timing.rounds_for(1e-5, 0.25) == timing.MAX_ROUNDS  # tiny messages: capped
    assert timing.rounds_for(1e-3, 0.25) == 250
    assert timing.rounds_for(0.01, 0.25) == max(timing.MIN_ROUNDS, 25)
    assert timing.rounds_for(0.5, 0.25) == timing.MIN_ROUNDS  # huge messages: a few
    assert timing.rounds_for(0.0, 0.25) == timing.MAX_ROUNDS


@pytest.mark.mpi
def test_run_sweep_default_iters(comm):
    rows = bench.run_sweep(comm, [8, 1 << 16], ["native"], warmup=1, memcpy=False, target_seconds=0.05)
    assert _same_everywhere(comm, rows)
    assert all(timing.MIN_ROUNDS <= r["iters"] <= timing.MAX_ROUNDS for r in rows)


@pytest.mark.mpi
def test_broken_algorithm_is_caught(comm):
    from mpitrain.collectives import allreduce

    last = comm.Get_size() - 1

    def broken(buf, c, op):  # right everywhere except one element on the last rank
        allreduce(buf, c, op=op, algorithm="native")
        if c.Get_rank() == last and buf.size > 1:
            buf[1] += 1

    rows = bench.run_sweep(comm, [4, 64], ["ring", ("broken", broken)], "int32", "sum", iters=1, warmup=0)
    got = {(r["size"], r["algorithm"]): r["wrong"] for r in rows}
    assert got[(4, "broken")] == 0  # one element: nothing to break
    assert got[(64, "broken")] == 1  # reported on every rank, not only the broken one
    assert got[(4, "ring")] == got[(64, "ring")] == 0
    assert exit_status(rows) == 1
    assert "FAILED" in report.summarize(rows)[0]


@pytest.mark.mpi(min_size=2)
def test_results_differing_between_ranks_are_caught(comm):
    from mpitrain.collectives import allreduce

    def skewed(buf, c, op):  # within float tolerance of native, but not bitwise identical on rank 1
        allreduce(buf, c, op=op, algorithm="native")
        if c.Get_rank() == 1:
            buf[0] = np.nextafter(buf[0], np.float32(np.inf))

    rows = bench.run_sweep(comm, [256], [("skewed", skewed)], "float32", "sum", iters=1, warmup=0,
                           memcpy=False)
    assert rows[0]["wrong"] >= 1


@pytest.mark.mpi
def test_measure(comm):
    from mpitrain.collectives import allreduce

    src = np.arange(1000, dtype=np.float64) + comm.Get_rank()
    buf = np.empty_like(src)
    t = bench.measure(comm, lambda b: allreduce(b, comm, algorithm="ring"), buf, src, iters=3)
    assert t > 0 and comm.allgather(t) == [t] * comm.Get_size()
    assert np.array_equal(src, np.arange(1000, dtype=np.float64) + comm.Get_rank())  # source untouched


@pytest.mark.mpi
def test_main_in_process(comm, shared_tmp, capsys):
    args = bench.build_parser().parse_args(
        ["--min", "8B", "--max", "2KiB", "--step", "16", "--iters", "2", "--warmup", "0", "--quiet",
         "--json", str(shared_tmp / "m.json"), "--csv", str(shared_tmp / "m.csv")])
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert out == ""  # --quiet
    rows = json.loads((shared_tmp / "m.json").read_text())["rows"]
    assert len(rows) == 3 * (5 + (comm.Get_size() > 1)) and all(r["wrong"] == 0 for r in rows)  # + p2p
    assert (shared_tmp / "m.csv").exists()


@pytest.mark.mpi
def test_main_rejects_an_unwritable_file_before_the_sweep(comm, shared_tmp, capsys):
    p = bench.build_parser()
    bad = shared_tmp / "absent" / "m.csv"
    assert bench.main(p.parse_args(["--max", "256MiB", "--csv", str(bad), "--json", str(shared_tmp / "m2.json")])) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no header, no rows: nothing ran
    if comm.Get_rank() == 0:
        assert err.count("\n") == 1 and f"--csv {bad}: cannot write there" in err
    else:
        assert err == ""
    comm.Barrier()
    assert not (shared_tmp / "m2.json").exists()


@pytest.mark.mpi
def test_main_rejects_bad_options_on_every_rank(comm, capsys):
    p = bench.build_parser()
    assert bench.main(p.parse_args(["--algorithms", "ring,nope"])) == 2
    assert bench.main(p.parse_args(["--min", "1MiB", "--max", "8B"])) == 2
    err = capsys.readouterr().err
    if comm.Get_rank() == 0:
        assert "nope" in err and "larger" in err
    else:
        assert err == ""


# --------------------------------------------------------------------------- --collective: the all-reduce's halves


def test_busbw_factor_of_the_halves():
    from mpitrain.bench.kinds import busbw_factor as factor

    for c in ("reduce_scatter", "allgather"):
        assert factor(1, c) == 1.0 and factor(2, c) == 0.5 and factor(4, c) == pytest.approx(0.75)
    assert factor(4, "allreduce") == busbw_factor(4) == pytest.approx(1.5)  # the all-reduce keeps 2(n-1)/n


def test_make_source_prefix_is_the_smaller_input():
    # the sweep slices the inputs of the largest size; the formulas draw the inputs of each size
    for dt, op in (("float16", "prod"), ("float32", "sum"), ("float64", "max"), ("int32", "prod"), ("int64", "avg")):
        assert np.array_equal(make_source(1000, dt, op, 3)[:37], make_source(37, dt, op, 3))


def test_formulas():
    from mpitrain.bench.kinds import gather_formula, reduce_formula
    from mpitrain.collectives import owned_chunk

    srcs = [make_source(11, "int64", "sum", q) for q in range(3)]
    assert np.array_equal(reduce_formula(11, "int64", "sum", 3, 1234), srcs[0] + srcs[1] + srcs[2])
    assert np.array_equal(reduce_formula(11, "int64", "avg", 3, 1234), (srcs[0] + srcs[1] + srcs[2]) // 3)
    g = gather_formula(11, "int64", "sum", 3, 1234)
    for q in range(3):
        lo, hi = owned_chunk(11, 3, q)
        assert np.array_equal(g[lo:hi], srcs[q][lo:hi])


def test_parser_and_header_of_the_halves():
    p = bench.build_parser()
    assert p.parse_args([]).collective == "allreduce"
    a = p.parse_args(["--collective", "reduce_scatter"])
    assert a.collective == "reduce_scatter" and getattr(a.algorithms, "is_default", False)
    with pytest.raises(SystemExit), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p.parse_args(["--collective", "broadcast"])
    head = report.format_header(dict(_meta(), collective="allgather"))
    assert "# mpitrain bench: allgather" in head and "busbw = algbw*(n-1)/n" in head
    assert "busbw = algbw*2(n-1)/n" in report.format_header(_meta())  # allreduce unchanged


HALVES = ("reduce_scatter", "allgather")


@pytest.mark.mpi
@pytest.mark.parametrize("collective", HALVES)
def test_run_sweep_halves_correct_and_busbw(comm, collective):
    from mpitrain.bench.kinds import picked

    p = comm.Get_size()
    sizes = [4, 12, 1000, 4096]  # 1 and 3 elements: fewer than the ranks
    algs = ["ring", "native", "auto"]
    rows = bench.run_sweep(comm, sizes, algs, "float32", "sum", iters=2, warmup=0, collective=collective)
    assert _same_everywhere(comm, rows)
    assert [r["algorithm"] for r in rows] == (algs + ["memcpy"] + (["p2p"] if p > 1 else [])) * len(sizes)
    for r in rows:
        assert r["wrong"] == 0, r
        assert r["op"] == ("-" if collective == "allgather" else "sum")
        if r["algorithm"] in ("memcpy", "p2p"):
            continue
        assert r["busbw"] == pytest.approx(r["algbw"] * ((p - 1) / p if p > 1 else 1))
        assert r["picked"] == (picked(comm, collective, r["size"]) if r["algorithm"] == "auto" else "")
        assert r["picked"] in ("", "ring", "native")
        native = next(x for x in rows if x["size"] == r["size"] and x["algorithm"] == "native")
        assert r["speedup"] == pytest.approx(native["time_us"] / r["time_us"])


@pytest.mark.mpi
@pytest.mark.parametrize("dtype,op", [("int32", "prod"), ("int64", "avg"), ("float16", "sum"),
                                      ("float64", "max"), ("float32", "min"), ("float32", "avg")])
def test_run_sweep_reduce_scatter_dtypes_ops(comm, dtype, op):
    rows = bench.run_sweep(comm, [2, 3000], ["ring", "native"], dtype, op, iters=1, warmup=0, memcpy=False,
                           collective="reduce_scatter")
    assert all(r["wrong"] == 0 and r["type"] == dtype and r["op"] == op for r in rows), rows


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("collective", HALVES)
def test_run_sweep_halves_catch_wrong_results(comm, collective):
    from mpitrain.collectives import allgather, owned_chunk, reduce_scatter

    last, p = comm.Get_size() - 1, comm.Get_size()

    def broken(buf, c, op):  # right, except one element of the last rank's chunk on the last rank
        if collective == "reduce_scatter":
            reduce_scatter(buf, c, op=op, algorithm="native")
        else:
            allgather(buf, c, algorithm="native")
        lo, hi = owned_chunk(buf.size, p, last)
        if c.Get_rank() == last and hi > lo:
            buf[lo] += 1

    def idle(buf, c, op):  # does nothing: the other ranks' chunks are missing / not reduced
        pass

    rows = bench.run_sweep(comm, [4000], ["ring", ("broken", broken), ("idle", idle)], "int32", "sum",
                           iters=1, warmup=0, memcpy=False, collective=collective)
    got = {r["algorithm"]: r["wrong"] for r in rows}
    assert got["ring"] == 0 and got["broken"] == 1 and got["idle"] > 0, got  # on every rank
    assert exit_status(rows) == 1


@pytest.mark.mpi
@pytest.mark.parametrize("collective", HALVES)
def test_main_halves_refuse_tree_and_hier_on_every_rank(comm, capsys, collective):
    p = bench.build_parser()
    for algs in ("ring,tree", "hier", "tree,hier,native"):
        assert bench.main(p.parse_args(["--collective", collective, "--algorithms", algs])) == 2
    assert bench.main(p.parse_args(["--collective", collective, "--fit"])) == 2
    out, err = capsys.readouterr()
    assert out == ""
    if comm.Get_rank() == 0:
        lines = err.strip().splitlines()
        assert len(lines) == 4 and all("[rank 0@" in ln for ln in lines), err
        assert f"--collective {collective} has no tree algorithm" in lines[0]
        assert "has no hier algorithm" in lines[1] and "has no tree or hier algorithm" in lines[2]
        assert "use --algorithms ring,native,auto" in lines[0] and "--fit" in lines[3]
    else:
        assert err == ""


@pytest.mark.mpi
def test_main_allgather_in_process(comm, shared_tmp, capsys):
    args = bench.build_parser().parse_args(
        ["--collective", "allgather", "--min", "8B", "--max", "2KiB", "--step", "16", "--iters", "2",
         "--warmup", "0", "--json", str(shared_tmp / "g.json"), "--csv", str(shared_tmp / "g.csv")])
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    doc = json.loads((shared_tmp / "g.json").read_text())
    assert doc["meta"]["collective"] == "allgather" and doc["meta"]["algorithms"] == ["ring", "native", "auto"]
    rows = doc["rows"]
    assert len(rows) == 3 * (4 + (comm.Get_size() > 1)) and all(r["wrong"] == 0 for r in rows)  # + p2p
    with open(shared_tmp / "g.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    if comm.Get_rank() == 0:
        assert "# mpitrain bench: allgather" in out and "# wrong results: 0 -- OK" in out
