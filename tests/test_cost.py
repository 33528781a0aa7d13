"""The cost model (mpitrain/perf: fit, model, store, measure, report), and how `auto` uses it
through its decision table (collectives/tuning.py).

Nothing here reads or writes the real ~/.cache: every test points MPITRAIN_COST_FILE
(or XDG_CACHE_HOME) at a temporary path, and the MPI tests use fresh communicators,
so the library state of the run's communicator -- and with it the rest of the suite --
is the same whether or not a model is stored on this machine.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from mpitrain import collectives
from mpitrain.collectives import tuning
from mpitrain.perf import fit, formulas, measure, report, store
from mpitrain.perf import model as perf_model
from mpitrain.perf.model import CostModel, auto_table

from conftest import MPIRUN  # noqa: E402 - beside this Python, else on PATH
MiB = 1 << 20


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """No test sees the real cache, and the module's 'last model per size' is restored after."""
    monkeypatch.setenv(tuning.ENV, "off")
    saved = dict(tuning._LAST)
    yield
    tuning._LAST.clear()
    tuning._LAST.update(saved)


def make_model(p=4, *, ring=(20e-6, 0.2e-9), tree=(8e-6, 0.15e-9), gamma=0.05e-9, native=None, host="h"):
    native = native or [[8, 12e-6], [64 << 10, 60e-6], [MiB, 600e-6], [64 * MiB, 40e-3]]
    return CostModel(ranks=p, host=host, alpha=2e-6, beta=0.1e-9, gamma=gamma,
                          ring={"alpha": ring[0], "beta": ring[1]}, tree={"alpha": tree[0], "beta": tree[1]},
                          native=native, fused=15e-6, sizes=[8, 64 << 10, MiB])


def synthetic_rows(model, sizes, noise=0.0, seed=0):
    """Bench-like rows whose times follow ``model`` (times up to ``noise`` relative error)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        for a in ("ring", "tree", "native", "auto"):
            t = model.predict("fused" if a == "auto" and n <= collectives.SMALL_BYTES else
                              (model.best(n) if a == "auto" else a), n)
            t *= 1 + noise * (2 * rng.random() - 1)
            rows.append({"size": n, "algorithm": a, "time_us": t * 1e6})
    return rows


SIZES = [8 * 4 ** k for k in range(13)]  # 8 B .. 128 MiB


# --------------------------------------------------------------------------- fitting (serial)


def test_the_fused_prediction_covers_what_the_fused_path_carries():
    m = make_model(4)
    n = collectives.SMALL_BYTES  # the largest message that rides inside the check's Allgather
    assert m.predict("fused", n) == pytest.approx(m.fused + 3 * n * m.gamma)
    assert m.predict("fused", n + 1) == math.inf


def test_fit_alpha_beta_and_gamma_recover_known_values():
    sizes = [8 * 4 ** k for k in range(10)]
    a, b = fit.fit_alpha_beta(sizes, [3e-6 + n * 0.25e-9 for n in sizes])
    assert a == pytest.approx(3e-6, rel=1e-6) and b == pytest.approx(0.25e-9, rel=1e-6)
    g, c0 = fit.fit_gamma(sizes, [0.4e-6 + n * 0.07e-9 for n in sizes])
    assert g == pytest.approx(0.07e-9, rel=1e-6) and c0 == pytest.approx(0.4e-6, rel=1e-6)


@pytest.mark.parametrize("p", [2, 3, 4, 8])
@pytest.mark.parametrize("noise", [0.0, 0.03])
def test_fit_recovers_ring_and_tree_parameters(p, noise):
    true = make_model(p, ring=(14e-6, 0.3e-9), tree=(7e-6, 0.12e-9), gamma=0.04e-9)
    rows = synthetic_rows(true, SIZES, noise)
    prims = {"alpha": 2e-6, "beta": 0.1e-9, "gamma": 0.04e-9}
    m = fit.fit(rows, prims, ranks=p, host="h")
    tol = 1e-6 if noise == 0 else 0.08
    assert m.ring["alpha"] == pytest.approx(14e-6, rel=tol)
    assert m.ring["beta"] == pytest.approx(0.3e-9, rel=tol)
    assert m.tree["alpha"] == pytest.approx(7e-6, rel=tol)
    assert m.tree["beta"] == pytest.approx(0.12e-9, rel=tol)
    assert m.gamma == 0.04e-9 and m.ranks == p
    assert m.fused == pytest.approx(15e-6, rel=max(tol, 1e-9))
    if noise == 0:
        assert m.ring["knees"] == [] and m.tree["knees"] == []
        for n in SIZES:  # the fitted model predicts what it was fitted to
            for a in ("ring", "tree", "native"):
                assert m.predict(a, n) == pytest.approx(true.predict(a, n), rel=1e-6)


def test_fit_finds_a_knee():
    p, K = 4, 512 * 1024
    sizes = [8 * 2 ** k for k in range(25)]
    # a jump past 512 KiB (out of L2), a steeper slope past 8 MiB (out of L3)
    true = {"alpha": 10e-6, "beta": 0.1e-9, "knees": [K, 8 * MiB], "above": [[60e-6, 0.2e-9], [60e-6, 1.0e-9]]}
    times = [formulas.formula("ring", n, p, true, 0.05e-9) for n in sizes]
    d = fit.fit_algorithm("ring", sizes, times, p, 0.05e-9)
    assert d["knees"] == true["knees"]
    assert [d["alpha"], d["beta"], *sum(d["above"], [])] == pytest.approx(
        [true["alpha"], true["beta"], *sum(true["above"], [])], rel=1e-6)
    one = {"alpha": 10e-6, "beta": 0.1e-9, "knees": [K], "above": [[60e-6, 0.2e-9]]}
    d = fit.fit_algorithm("tree", sizes, [formulas.formula("tree", n, p, one, 0.05e-9) for n in sizes], p, 0.05e-9)
    assert d["knees"] == [K]
    straight = [formulas.tree_time(n, p, 10e-6, 0.1e-9, 0.05e-9) for n in sizes]
    assert fit.fit_algorithm("tree", sizes, straight, p, 0.05e-9)["knees"] == []


def test_a_single_odd_size_does_not_make_a_knee():
    p = 2
    sizes = [8 * 4 ** k for k in range(13)]
    times = [formulas.ring_time(n, p, 12e-6, 0.2e-9, 0.03e-9, formulas.ring_segments(n, p)) for n in sizes]
    times[7] *= 2.0
    assert fit.fit_algorithm("ring", sizes, times, p, 0.03e-9)["knees"] == []


def test_fit_skips_sizes_where_native_was_disturbed_too():
    true = make_model(2, ring=(14e-6, 0.3e-9), tree=(7e-6, 0.12e-9), gamma=0.04e-9,
                      native=[[8, 10e-6], [MiB, 400e-6], [128 * MiB, 60e-3]])
    rows = synthetic_rows(true, SIZES)
    for r in rows:  # everything timed at 2 KiB ran 2.5x slower: another process was busy then
        if r["size"] == SIZES[4]:
            r["time_us"] *= 2.5
    m = fit.fit(rows, {"alpha": 2e-6, "beta": 0.1e-9, "gamma": 0.04e-9}, ranks=2)
    assert m.disturbed == [SIZES[4]]
    assert m.ring["alpha"] == pytest.approx(14e-6, rel=1e-6)
    assert m.predict("native", SIZES[4]) < 2 * true.predict("native", SIZES[4])


def test_merge_passes_keeps_the_lowest_times():
    a = [{"size": 8, "algorithm": "ring", "time_us": 30.0, "low_us": 28.0},
         {"size": 8, "algorithm": "tree", "time_us": 15.0, "low_us": 14.0}]
    b = [{"size": 8, "algorithm": "tree", "time_us": 40.0, "low_us": 12.0},
         {"size": 8, "algorithm": "ring", "time_us": 25.0, "low_us": 26.0}]
    m = fit.merge_passes([a, b])
    assert [(r["algorithm"], r["time_us"], r["low_us"]) for r in m] == [("ring", 25.0, 26.0), ("tree", 15.0, 12.0)]


def test_lsq_relative_keeps_coefficients_nonnegative():
    X = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    c = fit.lsq_relative(X, np.array([3.0, 2.0, 1.0]))  # a falling line: slope clamped to 0
    assert np.all(c >= 0) and c[1] == 0


def test_native_piecewise_is_monotone_and_interpolates():
    table = fit.fit_piecewise([8, 64, 512, 4096, 32768], [10e-6, 12e-6, 11e-6, 20e-6, 80e-6])
    ts = [t for _, t in table]
    assert ts == [10e-6, 11e-6, 11e-6, 20e-6, 80e-6]  # 64 B measured slower than 512 B: disturbed, lowered
    assert formulas.piecewise_time(table, 8) == pytest.approx(10e-6)
    assert formulas.piecewise_time(table, 4) == pytest.approx(10e-6)  # constant below
    assert formulas.piecewise_time(table, 2 * 32768) == pytest.approx(160e-6)  # proportional above
    mid = formulas.piecewise_time(table, int(math.sqrt(4096 * 32768)))
    assert mid == pytest.approx(math.sqrt(20e-6 * 80e-6), rel=1e-4)  # log-log midpoint


def test_link_table_interpolates_exactly_monotonely_and_extends_with_the_line():
    sizes = [8, 128, 512, 8192, 1 << 20]
    times = [10e-6, 11e-6, 21e-6, 30e-6, 900e-6]  # a protocol jump between 128 B and 512 B
    table = formulas.link_table(sizes + [512, 0], times + [25e-6, 5e-6])  # a repeat keeps its fastest; n = 0 dropped
    assert table == [[n, t] for n, t in zip(sizes, times)]
    assert formulas.link_table([8], [1e-6]) is None and formulas.link_table([], []) is None
    beta = 0.8e-9
    for n, t in zip(sizes, times):  # exact at every measured size
        assert formulas.table_time(table, n, beta) == t
    for (n0, t0), (n1, t1) in zip(table, table[1:]):  # monotone between neighbours, log-log
        xs = np.geomspace(n0, n1, 23)
        ys = [formulas.table_time(table, x, beta) for x in xs]
        assert all(min(t0, t1) - 1e-18 <= y <= max(t0, t1) + 1e-18 for y in ys)
        assert all(y1 >= y0 - 1e-18 for y0, y1 in zip(ys, ys[1:]))
        assert formulas.table_time(table, math.sqrt(n0 * n1), beta) == pytest.approx(math.sqrt(t0 * t1), rel=1e-9)
    # the jump is kept (a straight line through the points would smooth it away)
    assert formulas.table_time(table, 256, beta) == pytest.approx(math.sqrt(11e-6 * 21e-6), rel=1e-9)
    # outside the measured range: the line's slope beta, through the end point (continuous)
    assert formulas.table_time(table, 4 << 20, beta) == pytest.approx(900e-6 + (3 << 20) * beta)
    assert formulas.table_time(table, 4, beta) == pytest.approx(10e-6 - 4 * beta)
    assert formulas.table_time(table, 0.5, beta) < 10e-6
    assert formulas.table_time([[8, 1e-9], [16, 2e-9]], 0, 1.0) == 0.0  # never negative


def test_best_is_the_fastest_prediction():
    m = make_model(4)
    for n in [8, 4096, 65536, MiB, 16 * MiB, 256 * MiB, 12345] + SIZES:
        preds = {a: m.predict(a, n) for a in tuning.CANDIDATES}
        fastest = min(preds, key=preds.get)
        if fastest != "native" and preds[fastest] > perf_model.PREFER_NATIVE * preds["native"]:
            fastest = "native"  # a near-tie goes to the MPI library's own
        assert m.best(n) == fastest
    picks = {m.best(n) for n in SIZES}
    assert len(picks) >= 2, picks  # this model has crossovers


# --------------------------------------------------------------------------- storage (serial)


def test_store_round_trip(tmp_path):
    m = make_model(3, host="node7")
    m.ring.update(knees=[MiB], above=[[50e-6, 0.5e-9]])
    path = store.save(m, tmp_path / "sub" / "c.json")
    back = store.load(path)
    assert back == m
    assert back.to_dict() == json.loads(path.read_text())
    assert json.loads(path.read_text())["auto"] == auto_table(m).to_dict()  # what auto reads
    for n in SIZES:
        assert back.best(n) == m.best(n) and back.predict("ring", n) == m.predict("ring", n)
    assert not list(path.parent.glob("*.tmp"))  # written atomically, nothing left over


@pytest.mark.parametrize("change,match", [
    ({"version": 99}, "version"), ({"alpha": -1.0}, ">= 0"), ({"ring": {"alpha": 1e-6}}, "malformed"),
    ({"tree": {"alpha": 1e-6, "beta": 1e-9, "knees": [8], "above": []}}, "malformed"),
    ({"native": []}, "native"), ({"gamma": float("nan")}, ">= 0"),
])
def test_load_rejects_bad_files(tmp_path, change, match):
    d = make_model(2).to_dict()
    d.update(change)
    (tmp_path / "c.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        store.load(tmp_path / "c.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        store.load(tmp_path / "bad.json")


def test_version_1_files_still_load_and_links_round_trip(tmp_path):
    d = make_model(2).to_dict()
    d["version"] = 1
    del d["links"]  # written before links existed
    (tmp_path / "v1.json").write_text(json.dumps(d))
    m = store.load(tmp_path / "v1.json")
    assert m.version == 1 and m.links == {} and m.predict("ring", MiB) == make_model(2).predict("ring", MiB)
    m = make_model(4)
    m.nodes = 2
    m.links = perf_model.parse_links({"intra": {"alpha": 2e-6, "beta": 0.1e-9, "ranks": [0, 1]},
                           "inter": {"alpha": 30e-6, "beta": 0.8e-9, "ranks": [0, 2]}})
    back = store.load(store.save(m, tmp_path / "v2.json"))
    assert back == m and back.version == perf_model.VERSION == 2
    assert back.links["inter"] == {"alpha": 30e-6, "beta": 0.8e-9, "ranks": [0, 2]}
    assert "link inter (0<->2" in report.format_params(back)
    for bad, match in (({"wire": {"alpha": 1.0, "beta": 1.0}}, "link type"),
                       ({"inter": {"alpha": -1.0, "beta": 1e-9}}, ">= 0")):
        d = m.to_dict()
        d["links"] = bad
        (tmp_path / "bad.json").write_text(json.dumps(d))
        with pytest.raises(ValueError, match=match):
            store.load(tmp_path / "bad.json")


@pytest.mark.parametrize("nodes,want", [
    ([0, 0], {"intra": (0, 1)}),
    ([0, 1, 2], {"inter": (0, 1)}),                       # one rank per node: no intra pair
    ([0, 0, 1, 1], {"inter": (0, 2), "intra": (0, 1)}),    # blocks
    ([0, 1, 0, 1], {"inter": (0, 1), "intra": (0, 2)}),    # round robin
    ([0, 1, 1], {"inter": (0, 1), "intra": (1, 2)}),       # rank 0 alone on its node
])
def test_link_pairs(nodes, want):
    assert measure.link_pairs(nodes) == want


def test_cost_path(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(tuning.ENV)
    assert tuning.cost_path("nodeA", 4) == tmp_path / "mpitrain" / "cost-nodeA-n4.json"
    assert tuning.cost_path("a/b", 2, nodes=3) == tmp_path / "mpitrain" / "cost-a_b-n2-h3.json"
    monkeypatch.setenv(tuning.ENV, str(tmp_path / "x.json"))
    assert tuning.cost_path("nodeA", 4) == tmp_path / "x.json"
    for off in ("off", "OFF", "none", "0"):
        monkeypatch.setenv(tuning.ENV, off)
        assert tuning.cost_path("nodeA", 4) is None


def test_read_ignores_unusable_files(tmp_path, monkeypatch, capsys):
    f = tmp_path / "c.json"
    monkeypatch.setenv(tuning.ENV, str(f))
    assert tuning._read_for("h", 2, 1) is None  # absent: silently none
    f.write_text("garbage")
    tuning._FILES.pop(str(f), None)
    assert tuning._read_for("h", 2, 1) is None
    assert "fixed thresholds" in capsys.readouterr().err
    store.save(make_model(2), f)
    assert tuning._read_for("h", 2, 1) == auto_table(make_model(2))
    assert tuning._read_for("h", 4, 1) is None  # fitted for 2 ranks, not 4
    assert "fitted for 2 rank(s)" in capsys.readouterr().err


def test_a_file_without_a_table_falls_back_says_so_once_and_can_get_one(tmp_path, monkeypatch, capsys):
    f = tmp_path / "old.json"
    f.write_text(json.dumps(make_model(2).params()))  # what files held before the decision table existed
    monkeypatch.setenv(tuning.ENV, str(f))
    assert store.load(f) == make_model(2)  # the model itself still loads
    assert tuning._read_for("h", 2, 1) is None
    tuning.forget(f)
    assert tuning._read_for("h", 2, 1) is None
    err = capsys.readouterr().err
    assert err.count("no decision table") == 1 and "AUTO_RING_MIN_BYTES" in err and "mpitrain.perf" in err
    # the perf layer writes the table into the existing file: auto follows the model again
    from mpitrain.perf.__main__ import main as add_tables

    assert add_tables([str(f)]) == 0
    assert "auto on 2 ranks" in capsys.readouterr().out
    assert json.loads(f.read_text())["auto"] == auto_table(make_model(2)).to_dict()
    assert tuning._read_for("h", 2, 1) == auto_table(make_model(2))
    assert add_tables([str(tmp_path / "absent.json")]) == 1


def _fitted(p, noise=0.03):
    """A model fitted the way bench --fit fits one (from bench-like rows, with noise)."""
    true = make_model(p, ring=(14e-6, 0.3e-9), tree=(7e-6, 0.12e-9), gamma=0.04e-9)
    return fit.fit(synthetic_rows(true, SIZES, noise, seed=p), {"alpha": 2e-6, "beta": 0.1e-9, "gamma": 0.04e-9},
                   ranks=p, host="h")


def _with_knees():
    m = make_model(4)
    m.ring.update(knees=[MiB], above=[[50e-6, 0.5e-9]])
    m.tree.update(knees=[64 << 10], above=[[3e-6, 0.3e-9]])
    return m


@pytest.mark.parametrize("which", ["fitted-2", "fitted-3", "fitted-8", "crossovers", "knees", "plain"])
def test_the_decision_table_picks_what_the_model_picks(which):
    """auto reads a table (collectives/tuning.py), no longer the model: at every size it must run
    what the model's best() says -- the choice it made before from the model itself."""
    m = {"fitted-2": lambda: _fitted(2), "fitted-3": lambda: _fitted(3), "fitted-8": lambda: _fitted(8),
         "crossovers": lambda: _model_for_this_run(4), "knees": _with_knees, "plain": lambda: make_model(4)}[which]()
    table = auto_table(m)
    rng = np.random.default_rng(7)
    sizes = sorted({0, 1, *SIZES, *(int(x) for x in np.geomspace(1, 4 << 30, 4000)),
                    *rng.integers(0, 1 << 31, 3000).tolist(), *rng.integers(0, 1 << 21, 3000).tolist()})
    assert [table.pick(n) for n in sizes] == [m.best(n) for n in sizes]
    assert (table.ranks, table.nodes) == (m.ranks, m.nodes)
    assert tuning.AutoTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    if which == "crossovers":
        assert {"native", "tree", "ring"} <= {a for _, a in table.steps}


@pytest.mark.parametrize("bad,match", [
    ({"ranks": 2, "nodes": 1, "steps": []}, "start at 0"),
    ({"ranks": 2, "nodes": 1, "steps": [[8, "ring"]]}, "start at 0"),
    ({"ranks": 2, "nodes": 1, "steps": [[0, "ring"], [0, "tree"]]}, "increase"),
    ({"ranks": 2, "nodes": 1, "steps": [[0, "ring"], [64, "bogus"]]}, "unknown algorithm"),
    ({"ranks": 2, "steps": [[0, "ring"]]}, "malformed"),
    ({"ranks": 0, "nodes": 1, "steps": [[0, "ring"]]}, ">= 1"),
])
def test_a_bad_table_is_rejected_and_not_used(bad, match, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match=match):
        tuning.AutoTable.from_dict(bad)
    f = tmp_path / "c.json"
    f.write_text(json.dumps({**make_model(2).params(), "auto": bad}))
    monkeypatch.setenv(tuning.ENV, str(f))
    assert tuning._read_for("h", 2, 1) is None
    assert "fixed thresholds" in capsys.readouterr().err


def test_choose_without_a_model_uses_the_thresholds():
    tuning._LAST.clear()
    for p in (2, 3, 4):
        for n in (8, 4096, collectives.AUTO_RING_MIN_BYTES - 1, collectives.AUTO_RING_MIN_BYTES, 64 * MiB):
            want = "ring" if n >= collectives.AUTO_RING_MIN_BYTES else "native"
            assert collectives.choose(n, p) == want
    assert collectives.choose(64 * MiB, 1) == "native"


def test_choose_with_a_state_uses_its_model():
    model = make_model(4)

    class St:
        auto = auto_table(model)

    for n in SIZES:
        assert collectives.choose(n, 4, St()) == model.best(n)
    assert collectives.choose(16 * MiB, 2, St()) == "ring"  # a model for 4 ranks is not used for 2


# --------------------------------------------------------------------------- MPI: sharing and choosing


def _fresh(comm):
    """A new communicator: its library state is made (and its model loaded) now."""
    return comm.Dup()


def _model_for_this_run(p):
    """A model whose picks change with size: native small, tree in the middle, ring large."""
    native = [[8, 10e-6], [8192, 30e-6], [MiB, 3e-3], [256 * MiB, 1.0]]
    return make_model(p, ring=(40e-6, 0.15e-9), tree=(5e-6, 0.2e-9), native=native)


@pytest.mark.mpi
def test_choose_follows_the_stored_model_on_every_rank(comm, shared_tmp, monkeypatch):
    p, r = comm.Get_size(), comm.Get_rank()
    path = shared_tmp / "cost.json"
    model = _model_for_this_run(p)
    if r == 0:
        store.save(model, path)
        monkeypatch.setenv(tuning.ENV, str(path))
    else:  # only rank 0 reads: the others must get its model even when their own setting differs
        monkeypatch.setenv(tuning.ENV, str(shared_tmp / f"absent-{r}.json"))
    comm.Barrier()
    c = _fresh(comm)
    try:
        st = collectives.state_for(c)
        sizes = sorted({int(x) for x in np.geomspace(8, 256 * MiB, 60)} | set(SIZES))
        picks = [collectives.choose(n, p, st) for n in sizes]
        if p == 1:
            assert st.auto is None and set(picks) == {"native"}
        else:
            assert st.auto == auto_table(model)
            assert picks == [model.best(n) for n in sizes]
            assert {"native", "tree", "ring"} <= set(picks)
            assert [collectives.choose(n, p) for n in sizes] == picks  # the last model shared for p ranks
        assert c.allgather(picks) == [picks] * p
        # auto runs what the model picks, and gets the right answer
        for n in (3, 5000, 300_000):
            x = (np.arange(n) % 13 + r).astype(np.float32)
            out = collectives.allreduce(x.copy(), c, algorithm="auto")
            want = (np.arange(n) % 13).astype(np.float64) * p + p * (p - 1) / 2
            np.testing.assert_allclose(out, want, rtol=1e-6)
    finally:
        c.Free()


@pytest.mark.mpi
def test_without_a_stored_model_auto_uses_the_thresholds(comm, shared_tmp, monkeypatch):
    p = comm.Get_size()
    monkeypatch.setenv(tuning.ENV, str(shared_tmp / "none-here.json"))
    c = _fresh(comm)
    try:
        st = collectives.state_for(c)
        assert st.auto is None
        for n in (8, 5000, collectives.AUTO_RING_MIN_BYTES - 4, collectives.AUTO_RING_MIN_BYTES, 8 * MiB):
            want = "native" if p == 1 or n < collectives.AUTO_RING_MIN_BYTES else "ring"
            assert collectives.choose(n, p, st) == want
    finally:
        c.Free()


@pytest.mark.mpi
def test_a_model_for_another_size_is_ignored(comm, shared_tmp, monkeypatch):
    p = comm.Get_size()
    path = shared_tmp / "other.json"
    if comm.Get_rank() == 0:
        store.save(_model_for_this_run(p + 1), path)
    comm.Barrier()
    monkeypatch.setenv(tuning.ENV, str(path))
    c = _fresh(comm)
    try:
        assert collectives.state_for(c).auto is None
    finally:
        c.Free()


@pytest.mark.mpi
def test_node_ids_and_measure_links(comm):
    p = comm.Get_size()
    assert tuning.node_ids(comm) == [0] * p  # one machine (no emulated hosts in the test runs)
    fake = [r % 2 for r in range(p)]  # pretend ranks alternate between two nodes
    links = measure.measure_links(comm, [8, 4096], fake)
    assert comm.allgather(links) == [links] * p  # the same on every rank
    assert set(links) == set(measure.link_pairs(fake))
    for ln in links.values():
        assert ln["alpha"] >= 0 and ln["beta"] >= 0 and len(ln["pingpong"][1]) == 2
        assert all(t > 0 for t in ln["pingpong"][1])


@pytest.mark.mpi(min_size=2)
def test_measure_primitives_takes_a_given_ping_pong(comm, monkeypatch):
    """bench --fit hands its p2p rows over (bench/fit.py wire_pingpong): no second ping-pong, the same fit."""
    def no(*a, **k):
        raise AssertionError("the ping-pong was timed again")
    monkeypatch.setattr(measure, "measure_pingpong", no)
    sizes, times = [8, 4096, 65536], [2e-6, 3e-6, 10e-6]
    prims = measure.measure_primitives(collectives.state_for(comm).comm, 65536, pingpong=(sizes, times))
    assert prims["pingpong"] == [sizes, times] and comm.allgather(prims["alpha"]) == [prims["alpha"]] * comm.Get_size()
    assert (prims["alpha"], prims["beta"]) == pytest.approx(fit.fit_alpha_beta(sizes, times))
    assert prims["links"]["intra"]["pingpong"] == [sizes, times]


@pytest.mark.mpi
def test_install_switches_the_model(comm):
    p = comm.Get_size()
    c = _fresh(comm)
    try:
        st = collectives.state_for(c)
        store.install(st, _model_for_this_run(p))
        if p > 1:
            assert collectives.choose(20 * 1024, p, st) == "tree"
        store.install(st, None)
        assert collectives.choose(20 * 1024, p, st) == "native"
    finally:
        c.Free()


# --------------------------------------------------------------------------- bench --fit end to end


def test_bench_fit_writes_a_valid_model(tmp_path):
    path = tmp_path / "fit.json"
    env = dict(os.environ, MPITRAIN_COST_FILE=str(path), OMP_NUM_THREADS="1")
    cmd = [MPIRUN, "-n", "2", sys.executable, "-m", "mpitrain", "bench", "--fit", "--min", "8B", "--max", "64KiB",
           "--step", "8", "--iters", "3", "--warmup", "0", "--json", str(tmp_path / "rows.json")]
    if importlib.util.find_spec("matplotlib"):
        cmd += ["--plot", str(tmp_path / "fit.png")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    m = store.load(path)
    assert m.ranks == 2 and m.nodes == 1
    assert m.sizes == [8, 64, 512, 4096, 32768, 65536]
    assert all(math.isfinite(m.predict(a, n)) for a in tuning.CANDIDATES for n in m.sizes)
    assert m.fused is not None and m.alpha > 0 and m.gamma > 0
    assert "predicted vs measured" in res.stdout and f"stored: {path}" in res.stdout
    assert json.loads((tmp_path / "rows.json").read_text())["meta"]["cost_model"] == m.to_dict()
    if "--plot" in cmd:
        assert (tmp_path / "fit.png").stat().st_size > 1000


def test_bench_fit_needs_two_ranks(tmp_path):
    env = dict(os.environ, MPITRAIN_COST_FILE=str(tmp_path / "fit.json"))
    res = subprocess.run([sys.executable, "-m", "mpitrain", "bench", "--fit", "--max", "64B"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 2 and "2 ranks or more" in res.stderr
    assert not (tmp_path / "fit.json").exists()


# --------------------------------------------------------------------------- exchange per link


def test_link_entry_fits_the_exchange_from_synthetic_timings(monkeypatch):
    sizes = measure.pingpong_sizes(16 << 20)
    pp = [9e-6 + n * 0.45e-9 for n in sizes]       # one way
    xx = [13e-6 + n * 0.75e-9 for n in sizes]      # both ranks send at once: slower
    monkeypatch.setattr(measure, "measure_pingpong", lambda comm, s, pair: pp[:len(s)])
    monkeypatch.setattr(measure, "measure_exchange", lambda comm, s, pair: xx[:len(s)])
    ln = measure.link_entry(None, sizes, (0, 2))
    assert ln["ranks"] == [0, 2] and ln["pingpong"] == [sizes, pp] and ln["exchange"]["times"] == [sizes, xx]
    assert ln["alpha"] == pytest.approx(9e-6, rel=1e-6) and ln["beta"] == pytest.approx(0.45e-9, rel=1e-6)
    assert ln["exchange"]["alpha"] == pytest.approx(13e-6, rel=1e-6)
    assert ln["exchange"]["beta"] == pytest.approx(0.75e-9, rel=1e-6)
    # noisy medians: still close
    rng = np.random.default_rng(1)
    noisy = [t * (1 + 0.03 * rng.standard_normal()) for t in xx]
    a, b = fit.fit_alpha_beta(sizes, noisy)
    assert a == pytest.approx(13e-6, rel=0.1) and b == pytest.approx(0.75e-9, rel=0.1)


def test_links_keep_the_exchange_and_old_links_load_without_it(tmp_path):
    m = make_model(2)
    m.nodes = 2
    sizes = [8, 4096]
    m.links = perf_model.parse_links({"inter": {"alpha": 9e-6, "beta": 0.45e-9, "ranks": [0, 1],
                                     "pingpong": [sizes, [9e-6, 11e-6]],
                                     "exchange": {"alpha": 13e-6, "beta": 0.75e-9, "times": [sizes, [13e-6, 16e-6]]}}})
    back = store.load(store.save(m, tmp_path / "x.json"))
    assert back == m and back.links["inter"]["exchange"]["alpha"] == 13e-6
    assert back.links["inter"]["exchange"]["times"] == [sizes, [13e-6, 16e-6]]
    text = report.format_params(back)
    assert "link inter (0<->1" in text and "link inter exchange (0<->1, both send at once)" in text
    d = json.loads(json.dumps(m.to_dict()))  # a copy
    del d["links"]["inter"]["exchange"]  # written before the exchange existed
    (tmp_path / "old.json").write_text(json.dumps(d))
    old = store.load(tmp_path / "old.json")
    assert "exchange" not in old.links["inter"] and old.links["inter"]["alpha"] == 9e-6
    d = json.loads(json.dumps(m.to_dict()))
    d["links"]["inter"]["exchange"]["beta"] = -1.0
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=">= 0"):
        store.load(tmp_path / "bad.json")
