"""The extrapolated cost model (mpitrain/perf: extrapolate, links, sources, validate; ``bench --model``):
serial and fast.

Nothing reads the real ~/.cache: every test points XDG_CACHE_HOME at a temporary directory
and MPITRAIN_COST_FILE at a file of its own (or unsets it).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from mpitrain import bench
from mpitrain.bench import model as bench_model
from mpitrain.collectives import tuning
from mpitrain.perf import extrapolate as ex
from mpitrain.perf import extrapolate_report as report
from mpitrain.perf import formulas, sources, store
from mpitrain.perf import validate as val
from mpitrain.perf.links import DEFAULT_INTER, DEFAULT_INTRA, Link, parse_link_literal, parse_link_specs
from mpitrain.perf.model import CostModel
from mpitrain.units import size_range

MiB = 1 << 20
GiB = 1 << 30
SIZES = [8 * 4 ** k for k in range(15)]  # 8 B .. 2 GiB


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(tuning.ENV, raising=False)


def model(p=2, *, ring=None, tree=None, gamma=0.035e-9, nodes=1, links=None, host="h"):
    ring = ring or {"alpha": 18e-6, "beta": 0.5e-9, "knees": [MiB], "above": [[60e-6, 0.1e-9]]}
    tree = tree or {"alpha": 9e-6, "beta": 0.4e-9, "knees": [256 << 10], "above": [[120e-6, 0.12e-9]]}
    return CostModel(ranks=p, host=host, nodes=nodes, alpha=2.5e-6, beta=0.08e-9, gamma=gamma,
                          ring=ring, tree=tree, native=[[8, 10e-6], [64 * MiB, 30e-3]], created="2026-01-01",
                          links=links)


def params(m=None, inter=(50e-6, 0.8e-9)):
    P = sources._intra_from_model(m or model(), "test")
    P.inter = Link(*inter, "test")
    return P


def without_check(P, a, n, N, ppn):
    """The algorithm's own time: the prediction less the agreement check beyond the fit's."""
    return ex.predict(P, a, n, N, ppn) - (ex.check_time(P, N, ppn) - ex.check_time(P, P.ranks, P.ranks))


# --------------------------------------------------------------------------- the formulas


@pytest.mark.parametrize("p0", [2, 4])
def test_one_host_reduces_to_the_fitted_single_host_formulas(p0):
    m = model(p0)
    P = params(m)
    for n in SIZES + [12345, MiB, MiB + 1]:
        for a in ("ring", "tree"):  # at the fitted rank count: exactly the fit
            assert ex.predict(P, a, n, p0, ppn=p0) == pytest.approx(m.predict(a, n), rel=1e-12)
        assert ex.predict(P, "hier", n, p0, ppn=64) == ex.predict(P, "tree", n, p0, ppn=64)  # one host
    # one regime, alpha and beta as fitted: at any N on one host, formulas.py's formulas for N ranks
    # (plus the agreement check's growth beyond p0)
    flat = model(p0, ring={"alpha": 18e-6, "beta": 0.2e-9}, tree={"alpha": 9e-6, "beta": 0.3e-9})
    P = params(flat)
    for N in (3, 8, 100, 1024):
        for n in SIZES:
            for a in ("ring", "tree"):
                assert without_check(P, a, n, N, N) == pytest.approx(flat.predict(a, n, p=N), rel=1e-9)


def test_the_agreement_check():
    P = params(inter=(50e-6, 0.8e-9))
    p0 = P.ranks
    assert ex.check_time(P, 1, 8) == 0
    # one host at the fitted rank count: absorbed in the fit, nothing added
    assert ex.predict(P, "ring", 8, p0, p0) == pytest.approx(model().predict("ring", 8))
    # across hosts: one network latency per doubling of hosts, and the rows crossing the network
    r = 48 + 4096
    two = ex.check_time(P, 16, 8)
    assert two == pytest.approx(3 * P.intra.alpha + 7 * r * P.intra.beta + 50e-6 + 8 * r * 0.8e-9)
    assert ex.check_time(P, 64, 8) > ex.check_time(P, 32, 8) > two
    # above FUSE_MAX_RANKS the row carries no payload room: 48 B per rank
    assert ex.check_time(P, 128, 8) < ex.check_time(P, 64, 8)
    assert ex.check_time(P, 128, 8) == pytest.approx(3 * P.intra.alpha + 7 * 48 * P.intra.beta
                                                     + 4 * 50e-6 + 15 * 8 * 48 * 0.8e-9)


def test_topology():
    assert ex.topology(8, 8) == (1, 8)
    assert ex.topology(4, 8) == (1, 4)       # fewer ranks than a host holds: one host
    assert ex.topology(1024, 8) == (128, 8)
    assert ex.topology(10, 4) == (3, 4)      # the last host partly filled
    assert ex.topology(5, 1) == (5, 1)


def test_ring_flat_in_n_at_large_sizes_tree_grows_with_log_n():
    P = params(model(ring={"alpha": 20e-6, "beta": 0.1e-9}, tree={"alpha": 10e-6, "beta": 0.1e-9}))
    n = GiB
    for ppn in (1, 8, 4096):  # all inter-host, blocks of 8, one big host
        ring = {N: ex.predict(P, "ring", n, N, ppn) for N in (64, 256, 1024)}
        tree = {N: ex.predict(P, "tree", n, N, ppn) for N in (64, 256, 1024)}
        assert ring[1024] / ring[64] < 1.15  # 2(N-1)/N·n·beta: flat
        assert tree[64] < tree[256] < tree[1024]
        if ppn != 8:  # one link type throughout: grows as ceil(log2 N)
            assert tree[1024] / tree[64] == pytest.approx(10 / 6, rel=0.05)
    # small messages: the ring's 2(N-1) messages grow linearly, the tree's levels with log N
    r = [without_check(P, "ring", 8, N, 8) for N in (64, 1024)]
    t = [without_check(P, "tree", 8, N, 8) for N in (64, 1024)]
    assert r[1] / r[0] == pytest.approx(2046 / 126, rel=0.01) and t[1] / t[0] < 3


def test_hier_across_hosts():
    m = model()
    slow = params(m, inter=(200e-6, 0.8e-9))  # network latency far above shared memory's
    for N in (16, 64, 1024):
        for n in (8, 4096, 64 << 10):
            assert ex.predict(slow, "hier", n, N, 8) < ex.predict(slow, "ring", n, N, 8)
    for n in SIZES:
        assert ex.predict(slow, "hier", n, 12, 1) == ex.predict(slow, "ring", n, 12, 1)  # L = 1: a ring
        # more hosts for the same N (fewer ranks per host) never makes the tree cheaper
        assert ex.predict(slow, "tree", n, 64, 4) >= ex.predict(slow, "tree", n, 64, 16)
        # a slower network never makes anything cheaper
        for a in ex.ALGORITHMS:
            assert ex.predict(slow, a, n, 64, 8) >= ex.predict(params(m, inter=(20e-6, 0.8e-9)), a, n, 64, 8)
    # the inter-host ring pays the network: beta_n dominates at 1 GiB
    P = params(m, inter=(50e-6, 1e-9))
    t = ex.predict(P, "ring", GiB, 64, 8)
    assert 2 * 63 / 64 * GiB * 1e-9 < t < 1.2 * 2 * GiB * 1.1e-9


def test_a_regime_with_alpha_zero_does_not_make_messages_free():
    # fitted at 2 ranks: past 128 KiB alpha 0 (its two messages vanish in n·beta), past 1 MiB 98 us;
    # at 2 ranks the fit grows with n
    ring = {"alpha": 18e-6, "beta": 0.3e-9, "knees": [128 << 10, MiB], "above": [[0.0, 0.6e-9], [98e-6, 0.45e-9]]}
    m = model(2, ring=ring)
    P = params(m)
    sizes = sorted({int(x) for x in np.geomspace(8, GiB, 300)})
    assert all(m.predict("ring", b) >= m.predict("ring", a) for a, b in zip(sizes, sizes[1:]))
    for N, ppn in ((2, 2), (64, 64), (1024, 8), (1024, 1)):
        ts = [ex.predict(P, "ring", n, N, ppn) for n in sizes]
        assert all(b >= a * (1 - 1e-9) for a, b in zip(ts, ts[1:])), N  # so does the extrapolation
    for n in sizes:
        # every one of the 2(N-1) messages costs at least the small messages' alpha
        assert ex.predict(P, "ring", n, 1024, 1024) >= 2 * 1023 * 18e-6
        # and at the fitted rank count it is still exactly the fit
        assert ex.predict(P, "ring", n, 2, 2) == pytest.approx(m.predict("ring", n), rel=1e-9)


def test_best_and_crossover():
    P = params()
    for N in (2, 16, 1024):
        pr = ex.predict_all(P, 8, N, 8)
        assert ex.best(pr) == min(pr, key=pr.get)
        c = ex.crossover(P, N, 8, "ring", "tree", SIZES)
        assert c is not None
        assert all(ex.predict(P, "ring", n, N, 8) <= ex.predict(P, "tree", n, N, 8) for n in SIZES if n >= c)
        below = [n for n in SIZES if n < c]
        assert not below or ex.predict(P, "ring", below[-1], N, 8) > ex.predict(P, "tree", below[-1], N, 8)
    assert ex.best({"ring": 1.0, "tree": 2.0, "hier": 2.0}) == "ring"
    assert ex.best({"ring": 3.0, "tree": 2.0, "hier": 2.0}) == "tree"  # ties go to the first


# --------------------------------------------------------------------------- sources


def test_parse_link_literal_and_specs():
    ln = parse_link_literal("25us@1.25GB/s")
    assert ln.alpha == pytest.approx(25e-6) and ln.beta == pytest.approx(0.8e-9)
    ln = parse_link_literal("0.1ms@10gbit")
    assert ln.alpha == pytest.approx(1e-4) and ln.beta == pytest.approx(0.8e-9)
    for bad in ("25@1GB/s", "25us@", "25us@0GB/s", "fast@slow"):
        with pytest.raises(ValueError):
            parse_link_literal(bad)
    assert parse_link_specs(["intra=a.json,inter=b.json,c.json", "inter=5us@1GB/s"]) == \
        {"intra": ["a.json"], "inter": ["5us@1GB/s"]}
    assert parse_link_specs(["inter=b.json,c.json"]) == {"inter": ["b.json", "c.json"]}
    for bad in (["wire=x"], ["x.json"]):
        with pytest.raises(ValueError):
            parse_link_specs(bad)


def test_missing_fits_fall_back_to_defaults_and_say_so():
    P = sources.load_params()
    assert P.default and P.inter.default
    assert P.gamma == DEFAULT_INTRA["gamma"] and P.inter.alpha == DEFAULT_INTER["alpha"]
    text = "\n".join(report.format_params(P, 8))
    assert text.count("DEFAULT parameters") == 2  # intra and inter, each said
    assert "bench --fit" in text
    os.environ[tuning.ENV] = "off"
    try:
        assert "disables" in sources.load_params().notes[0]
    finally:
        del os.environ[tuning.ENV]


def test_stored_models_are_found(tmp_path):
    base = tuning.cache_dir()
    for p in (2, 4, 8):
        store.save(model(p, host="box"), base / f"cost-box-n{p}.json")
    assert sources.find_intra("box", cores=4)[0].name == "cost-box-n4.json"  # most ranks not sharing cores
    assert sources.find_intra("box", cores=1)[0].name == "cost-box-n2.json"  # else the fewest
    assert sources.find_intra("other", cores=4)[0] is None
    assert sources.find_inter()[0] is None
    links = {"intra": {"alpha": 3e-6, "beta": 0.1e-9, "ranks": [0, 1]},
             "inter": {"alpha": 40e-6, "beta": 0.9e-9, "ranks": [0, 2]}}
    multi = model(4, nodes=2, links=links, host="box")
    store.save(multi, base / "cost-box-n4-h2.json")
    assert sources.find_inter()[0].name == "cost-box-n4-h2.json"
    ln = sources.load_inter([], params())
    assert (ln.alpha, ln.beta) == (40e-6, 0.9e-9) and not ln.default
    with pytest.raises(ValueError, match="single-host"):
        sources.load_intra(str(base / "cost-box-n4-h2.json"))
    with pytest.raises(ValueError, match="no inter-host link"):
        sources.load_inter([str(base / "cost-box-n2.json")], params())
    (tmp_path / "ab.json").write_text(json.dumps({"alpha": 7e-6, "beta": 1e-9}))
    assert sources.load_inter([str(tmp_path / "ab.json")], params()).alpha == 7e-6


# --------------------------------------------------------------------------- bench rows: fit and validation


def bench_doc(P, N, hosts, errors=None, algorithms=("ring", "tree"), sizes=SIZES[:10]):
    """A bench JSON whose ring/tree rows are the model's predictions times (1 + error)."""
    L = -(-N // hosts)
    rows = []
    for i, n in enumerate(sizes):
        for a in algorithms:
            e = (errors or {}).get((n, a), 0.0)
            rows.append({"size": n, "algorithm": a, "time_us": ex.predict(P, a, n, N, L) * (1 + e) * 1e6,
                         "ranks": N})
        rows.append({"size": n, "algorithm": "native", "time_us": 1.0, "ranks": N})
    return {"meta": {"ranks": N, "hosts": [f"h{i}" for i in range(hosts)]}, "rows": rows}


def test_fit_inter_recovers_the_network():
    true = params(inter=(80e-6, 0.85e-9))
    docs = [("a.json", bench_doc(true, 3, 3)), ("b.json", bench_doc(true, 6, 3))]
    ln = val.fit_inter(params(inter=(0.0, 0.0)), docs)
    assert ln.alpha == pytest.approx(80e-6, rel=1e-6) and ln.beta == pytest.approx(0.85e-9, rel=1e-6)
    assert "ring rows of a.json, b.json" in ln.source
    with pytest.raises(ValueError, match="one host"):
        val.fit_inter(params(), [("c.json", bench_doc(true, 2, 1))])


def test_validation_math():
    P = params()
    errs = {(SIZES[0], "ring"): 0.5, (SIZES[1], "tree"): -0.25, (SIZES[2], "ring"): 0.1}
    doc = bench_doc(P, 4, 2, errs)
    res = val.validate(P, [("x.json", doc)])
    assert res["files"] == [("x.json", 4, 2, 2)]
    assert res["skipped"] == {"native": 10}
    got = {(r["size"], r["algorithm"]): r["error"] for r in res["rows"]}
    assert len(got) == 20
    for k, e in errs.items():  # predicted/measured - 1 with measured = predicted·(1 + e)
        assert got[k] == pytest.approx(1 / (1 + e) - 1)
    s = val.error_summary(res["rows"])
    assert s["all"][0] == 20 and s["all"][3] == 2  # 1/1.5-1 = -33% and 1/0.75-1 = +33% flagged; 1/1.1-1 not
    assert s["all"][2] == pytest.approx(1 / 0.75 - 1) and s["all"][1] == pytest.approx(0.0, abs=1e-12)
    assert s["ring"][0] == s["tree"][0] == 10
    text = report.format_validation(P, res)
    assert text.count("% !") == 2 and "median 0%" in text and "native (10 rows)" in text
    # the topology: from the meta's nodes when it has them, --ppn over everything
    doc["meta"]["nodes"] = 4
    assert val.validate(P, [("x.json", doc)])["files"] == [("x.json", 4, 4, 1)]
    assert val.validate(P, [("x.json", doc)], ppn=4)["files"] == [("x.json", 4, 1, 4)]


# --------------------------------------------------------------------------- the command line


def _args(*argv):
    return bench.build_parser().parse_args(["--model", *argv])


def test_table_json_and_validate_in_process(tmp_path, capsys):
    j = tmp_path / "m.json"
    assert bench_model.run(_args("--ranks", "2,8,1024", "--ppn", "4", "--max", "1MiB", "--json", str(j))) == 0
    out, err = capsys.readouterr()
    rows = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("#")]
    sizes = size_range(8, MiB, 4)
    assert len(rows) == 3 * len(sizes)
    assert "DEFAULT parameters" in out and "DEFAULT parameters" in err  # said on stdout and stderr
    assert "native (MPI's Allreduce) is not extrapolated" in out
    assert "N =  1024 (256 x 4): ring >= tree from" in out
    doc = json.loads(j.read_text())
    assert len(doc["rows"]) == len(rows) and doc["ppn"] == 4 and doc["params"]["inter"]["default"]
    r = doc["rows"][-1]
    assert (r["ranks"], r["hosts"], r["ppn"], r["size"]) == (1024, 256, 4, MiB)
    assert r["best"] == min(ex.ALGORITHMS, key=lambda a: r[a + "_us"])
    # the default range runs to 1 GiB
    assert _args().max == 256 * MiB and getattr(_args().max, "is_default", False)
    # validation against a file made from the same (default) parameters: all errors ~0
    P = sources.load_params(["intra=default,inter=default"])
    (tmp_path / "hosts.json").write_text(json.dumps(bench_doc(P, 3, 3)))
    assert bench_model.run(_args("--link", "intra=default,inter=default", "--validate", str(tmp_path / "hosts.json"))) == 0
    out = capsys.readouterr().out
    assert "median 0%, max 0%, 0/20 rows above 20%" in out
    # --from-json: the network fitted to those rows, then validated on them (and told so)
    assert bench_model.run(_args("--link", "intra=default", "--from-json", str(tmp_path / "hosts.json"),
                        "--validate", str(tmp_path / "hosts.json"))) == 0
    out = capsys.readouterr().out
    assert "fitted to the ring rows" in out and "in-sample" in out and "max 0%" in out


@pytest.mark.skipif(not importlib.util.find_spec("matplotlib"), reason="needs matplotlib")
def test_plot(tmp_path):
    png = tmp_path / "m.png"
    assert bench_model.run(_args("--ranks", "2..64", "--ppn", "8", "--min", "64B", "--max", "64MiB", "--plot", str(png),
                        "--link", "inter=30us@2GB/s")) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000


def test_command_line_without_mpirun(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop(tuning.ENV, None)
    run = [sys.executable, "-m", "mpitrain", "bench"]
    res = subprocess.run(run + ["--model", "--ranks", "4", "--max", "64B"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert "DEFAULT parameters" in res.stdout and "warning" in res.stderr
    res = subprocess.run(run + ["--model", "--link", "inter=nowhere.json"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert res.returncode != 0 and "nowhere.json: no such file" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run(run + ["--ppn", "4", "--max", "64B"], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 2 and "only with --model" in res.stderr


def test_parse_ranks():
    assert bench_model.parse_ranks("2..16") == [2, 4, 8, 16]
    assert bench_model.parse_ranks("3,2,100") == [2, 3, 100]
    for bad in ("1", "a", ""):
        with pytest.raises(ValueError):
            bench_model.parse_ranks(bad)
    assert math.isfinite(ex.predict(params(), "ring", 8, 3, 2))


# --------------------------------------------------------------------------- the exchange link parameters


PP, XX = (50e-6, 0.8e-9), (100e-6, 1.6e-9)  # ping-pong and exchange of the network


def params_x(inter_exchange=True, intra_exchange=(3e-6, 0.09e-9)):
    links = {"intra": {"alpha": 2.5e-6, "beta": 0.08e-9, "ranks": [0, 1]}}
    if intra_exchange:
        links["intra"]["exchange"] = {"alpha": intra_exchange[0], "beta": intra_exchange[1]}
    P = sources._intra_from_model(model(links=links), "test")
    P.inter = Link(*PP, "test", xalpha=XX[0] if inter_exchange else None, xbeta=XX[1] if inter_exchange else None)
    return P


def test_ring_and_check_use_the_exchange_tree_the_ping_pong():
    P, old = params_x(), params_x(inter_exchange=False)
    assert P.inter.exchange() == XX and old.inter.exchange() == PP  # not measured: the ping-pong
    for n in (8, 4096, MiB):
        a, b = ex.fitted("ring", ex.equivalent_size("ring", n, 4, P), P)
        # ring across hosts: the network's exchange + the overhead above the shared-memory exchange
        assert ex.on_link("ring", n, 4, P, True) == pytest.approx((XX[0] + max(0, a - 3e-6), XX[1] + max(0, b - 0.09e-9)))
        a, b = ex.fitted("tree", n, P)
        # tree levels are one way: the ping-pongs, whether or not an exchange was measured
        want = (PP[0] + max(0, a - 2.5e-6), PP[1] + max(0, b - 0.08e-9))
        assert ex.on_link("tree", n, 2, P, True) == pytest.approx(want)
        assert ex.on_link("tree", n, 2, old, True) == pytest.approx(want)
        assert ex._algorithm_time(P, "tree", n, 8, 4) == pytest.approx(ex._algorithm_time(old, "tree", n, 8, 4))
        assert ex._algorithm_time(P, "ring", n, 8, 4) > ex._algorithm_time(old, "ring", n, 8, 4)
        assert ex._algorithm_time(P, "hier", n, 8, 4) > ex._algorithm_time(old, "hier", n, 8, 4)  # its ring
    # the check (an Allgather: exchanges), 2 hosts x 4: Li = 2, Lh = 1
    from mpitrain.collectives import FUSE_MAX_RANKS, META, SMALL_BYTES

    r = 8 * META + (SMALL_BYTES if 8 <= FUSE_MAX_RANKS else 0)
    assert ex.check_time(P, 8, 4) == pytest.approx(2 * 3e-6 + 3 * r * 0.09e-9 + XX[0] + 4 * r * XX[1])
    # one host at the fit's rank count: exactly the fitted formulas, exchange or not
    for n in (8, MiB):
        assert ex.predict(P, "ring", n, 2, 2) == pytest.approx(model().predict("ring", n))


PP_T = [[8, 40e-6], [128, 42e-6], [512, 80e-6], [32768, 110e-6], [MiB, 900e-6]]  # measured, with a jump
XX_T = [[8, 60e-6], [128, 62e-6], [512, 150e-6], [32768, 200e-6], [MiB, 1800e-6]]


def test_network_terms_use_the_measured_tables():
    P, line = params_x(), params_x()
    P.inter = Link(*PP, "test", xalpha=XX[0], xbeta=XX[1], table=PP_T, xtable=XX_T)
    for n in (8, 100, 4096, 300000, MiB, 64 * MiB):
        # tree levels across hosts: the ping-pong table at n (whole n per level), + the same overhead
        a, b = ex.on_link("tree", n, 2, P, True)
        la, lb = ex.on_link("tree", n, 2, line, True)
        assert b == lb
        assert a + n * b == pytest.approx(formulas.table_time(PP_T, n, PP[1]) + (la - PP[0]) + n * lb - n * PP[1])
        # ring steps across hosts: the exchange table at one segment, n / (N·s)
        for N in (2, 8):
            s = formulas.ring_segments(n, N)
            m = n / (N * s)
            a, b = ex.on_link("ring", n, N, P, True)
            la, lb = ex.on_link("ring", n, N, line, True)
            assert b == lb and a - la == pytest.approx(formulas.table_time(XX_T, m, XX[1]) - m * XX[1] - XX[0], abs=1e-15)
            # the ring's network time is s·T(m) per step: 2(N-1)·s·T(m) + the overheads, as in the line
            assert formulas.ring_time(n, N, a, b, 0.0, s) - formulas.ring_time(n, N, la, lb, 0.0, s) == pytest.approx(
                2 * (N - 1) * s * (formulas.table_time(XX_T, m, XX[1]) - XX[0] - m * XX[1]), rel=1e-9, abs=1e-15)
    # the protocol jump between 128 B and 512 B shows in the prediction, not in the line's
    assert ex._algorithm_time(P, "tree", 512, 8, 4) - ex._algorithm_time(P, "tree", 128, 8, 4) > 70e-6
    assert ex._algorithm_time(line, "tree", 512, 8, 4) - ex._algorithm_time(line, "tree", 128, 8, 4) < 5e-6
    # the check: round k exchanges min(2^k, H - 2^k) hosts' rows of L·r bytes, from the table
    from mpitrain.collectives import FUSE_MAX_RANKS, META, SMALL_BYTES

    r = 8 * META + (SMALL_BYTES if 24 <= FUSE_MAX_RANKS else 0)
    intra = ex.check_time(line.with_inter(Link(0.0, 0.0, xalpha=0.0, xbeta=0.0)), 24, 8)  # the Li rounds
    want = intra + 2 * formulas.table_time(XX_T, 8 * r, XX[1])  # H = 3: rounds of 1 and 1 host's rows
    assert ex.check_time(P, 24, 8) == pytest.approx(want, rel=1e-12)
    assert ex.check_time(P, 40, 8) == pytest.approx(  # H = 5: rounds of 1, 2 and 1 hosts' rows
        ex.check_time(line.with_inter(Link(0.0, 0.0, xalpha=0.0, xbeta=0.0)), 40, 8)
        + sum(formulas.table_time(XX_T, k * 8 * r, XX[1]) for k in (1, 2, 1)), rel=1e-12)
    # one host at the fit's rank count: still exactly CostModel.predict (no network term)
    for n in SIZES:
        for a in ("ring", "tree"):
            assert ex.predict(P, a, n, 2, 2) == pytest.approx(model().predict(a, n), rel=1e-12)
    # no exchange measured: the exchange terms fall back to the ping-pong, table included
    noexch = Link(*PP, "test", table=PP_T)
    assert noexch.exchange_at(300) == noexch.pingpong_at(300) != PP


def test_a_source_without_tables_keeps_the_line():
    P = params_x()
    assert P.inter.table is None and P.inter.xtable is None
    for m in (0.5, 8, 300, MiB):
        assert P.inter.pingpong_at(m) == PP and P.inter.exchange_at(m) == XX
    # the numbers the straight-line model gave (the formulas written out)
    from mpitrain.collectives import FUSE_MAX_RANKS, META, SMALL_BYTES

    r = 8 * META + (SMALL_BYTES if 24 <= FUSE_MAX_RANKS else 0)
    assert ex.check_time(P, 24, 8) == pytest.approx(3 * 3e-6 + 7 * r * 0.09e-9 + 2 * XX[0] + 2 * 8 * r * XX[1],
                                                    rel=1e-12)
    for n in (8, 4096, MiB):
        a, b = ex.fitted("ring", ex.equivalent_size("ring", n, 8, P), P)
        assert ex.on_link("ring", n, 8, P, True) == (XX[0] + max(0.0, a - 3e-6), XX[1] + max(0.0, b - 0.09e-9))
        a, b = ex.fitted("tree", n, P)
        assert ex.on_link("tree", n, 2, P, True) == (PP[0] + max(0.0, a - 2.5e-6), PP[1] + max(0.0, b - 0.08e-9))
    # loaders: a literal, a small JSON and --from-json fits carry no table
    assert parse_link_literal("25us@1.17GB/s").table is None


def test_loaders_keep_the_measured_tables(tmp_path):
    sizes, tp, tx = [8, 512, 32768, MiB], [40e-6, 80e-6, 110e-6, 900e-6], [60e-6, 150e-6, 200e-6, 1800e-6]
    links = {"inter": {"alpha": PP[0], "beta": PP[1], "ranks": [0, 1], "pingpong": [sizes, tp],
                       "exchange": {"alpha": XX[0], "beta": XX[1], "times": [sizes, tx]}}}
    store.save(model(2, nodes=2, links=links), tmp_path / "c.json")
    P = params_x()
    ln = sources.load_inter([str(tmp_path / "c.json")], P)
    assert ln.table == [[n, t] for n, t in zip(sizes, tp)] and ln.xtable == [[n, t] for n, t in zip(sizes, tx)]
    assert "measured tables" in ln.text()
    (tmp_path / "pp.json").write_text(json.dumps({
        "results": [{"bytes": n, "one_way_us": t * 1e6} for n, t in zip(sizes, tp)],
        "exchange": [{"bytes": n, "time_us": t * 1e6} for n, t in zip(sizes, tx)]}))
    ln = sources.load_inter([str(tmp_path / "pp.json")], P)
    assert [n for n, _ in ln.table] == sizes and [t for _, t in ln.table] == pytest.approx(tp)
    assert ln.exchange_at(512)[0] + 512 * ln.exchange_at(512)[1] == pytest.approx(150e-6)
    # an old file (no tables) loads as the line
    del links["inter"]["pingpong"], links["inter"]["exchange"]["times"]
    store.save(model(2, nodes=2, links=links), tmp_path / "o.json")
    ln = sources.load_inter([str(tmp_path / "o.json")], P)
    assert ln.table is None and ln.xtable is None and ln.exchange_at(512) == XX


def test_old_files_fall_back_to_the_ping_pong_and_say_so(tmp_path):
    links = {"inter": {"alpha": PP[0], "beta": PP[1], "ranks": [0, 1]}}
    old = model(2, nodes=2, links=links)
    store.save(old, tmp_path / "old.json")
    single = tmp_path / "intra.json"
    store.save(model(2, links={"intra": {"alpha": 2.5e-6, "beta": 0.08e-9, "ranks": [0, 1],
                                        "exchange": {"alpha": 3e-6, "beta": 0.09e-9}}}), single)
    P = sources.load_params([f"intra={single},inter={tmp_path / 'old.json'}"])
    assert not P.inter.has_exchange and P.intra.has_exchange and P.inter.exchange() == PP
    text = "\n".join(report.format_params(P, None))
    assert "NOTE inter-host: no exchange measurement" in text and "fall back to its ping-pong" in text
    assert "NOTE intra-host" not in text and "exchange: not measured" in text
    links["inter"]["exchange"] = {"alpha": XX[0], "beta": XX[1]}
    store.save(model(2, nodes=2, links=links), tmp_path / "new.json")
    P = sources.load_params([f"intra={single},inter={tmp_path / 'new.json'}"])
    assert P.inter.has_exchange and P.inter.exchange() == XX and (P.inter.alpha, P.inter.beta) == PP
    assert not [n for n in P.notes if "exchange" in n]
    assert "ping-pong and exchange" in P.inter.source
    # small JSON and ping-pong tables with an exchange table
    (tmp_path / "ab.json").write_text(json.dumps({"alpha": PP[0], "beta": PP[1],
                                                  "exchange": {"alpha": XX[0], "beta": XX[1]}}))
    assert sources.load_inter([str(tmp_path / "ab.json")], P).exchange() == XX
    sizes = [8, 512, 32768, MiB]
    (tmp_path / "pp.json").write_text(json.dumps({
        "results": [{"bytes": n, "one_way_us": (PP[0] + n * PP[1]) * 1e6} for n in sizes],
        "exchange": [{"bytes": n, "time_us": (XX[0] + n * XX[1]) * 1e6} for n in sizes]}))
    ln = sources.load_inter([str(tmp_path / "pp.json")], P)
    assert ln.exchange() == pytest.approx(XX, rel=1e-6) and (ln.alpha, ln.beta) == pytest.approx(PP, rel=1e-6)
    # a literal has no exchange: said
    P = sources.load_params([f"intra={single},inter=25us@1.17GB/s"])
    assert any("inter-host: no exchange measurement" in n for n in P.notes)
