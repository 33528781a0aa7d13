"""Issue 27, round 3, data and metrics: token sets shorter than a window, the shard advice of the
readers, strict JSON from every metrics writer (docs/failure-modes.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpitrain.runtime import UserError

ROOT = Path(__file__).resolve().parents[1]


def strict_loads(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (Python's json accepts them by default)."""
    def no(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(text, parse_constant=no)


# ------------------------------------------------------------------ token sets shorter than a window


def _token_set(comm, d, train, val):
    from mpitrain.data.tokens import write_token_set

    if comm.Get_rank() == 0:
        write_token_set(d, np.arange(train) % 251, np.arange(val) % 251, vocab_size=256, shards=1, made={},
                        sources=[])
    comm.Barrier()


def _open_error(comm, d, **kw) -> str:
    from mpitrain.data.token_reader import open_tokens

    with pytest.raises(UserError) as e:
        open_tokens(d, comm, **kw)
    return str(e.value)


@pytest.mark.mpi
@pytest.mark.parametrize("T", [4, 9])
def test_mpi_token_set_without_a_train_window_on_some_rank(comm, shared_tmp, T):
    """A rank needs 2T train tokens for one window at any offset: every rank refuses, naming the fewest
    tokens, the rank, the need and a block_size that fits; one token more on every rank opens."""
    from mpitrain.data.token_reader import open_tokens

    p = comm.Get_size()
    _token_set(comm, shared_tmp / f"s{T}", p * 2 * T - 1, 10 * T)       # the last rank holds 2T - 1
    msg = _open_error(comm, shared_tmp / f"s{T}", batch_size=1, window=T + 1)
    assert comm.allgather(msg.split("] ", 1)[1]) == [msg.split("] ", 1)[1]] * p, "the same error everywhere"
    assert f"{2 * T - 1:,} on rank {p - 1} (the fewest)" in msg and f"needs {2 * T:,} tokens per rank" in msg
    assert f"model.block_size <= {(2 * T - 1) // 2}" in msg and "\n" not in msg
    _token_set(comm, shared_tmp / f"ok{T}", p * 2 * T, 10 * T)
    r = open_tokens(shared_tmp / f"ok{T}", comm, batch_size=1, window=T + 1)
    assert r.steps_per_epoch == 1
    r.close()


@pytest.mark.mpi
def test_mpi_token_set_without_a_val_window_on_any_rank(comm, shared_tmp):
    """No rank holds block_size + 1 val tokens: refused at open (no 'val loss nan' run); one rank
    with a window is enough."""
    from mpitrain.data.token_reader import open_tokens

    p, T = comm.Get_size(), 5
    _token_set(comm, shared_tmp / "v", 200 * p, p * T)                # every rank holds T < T + 1
    msg = _open_error(comm, shared_tmp / "v", batch_size=2, window=T + 1)
    assert "the val split holds" in msg and "no rank holds one window of block_size + 1 = 6" in msg
    assert "--val-fraction" in msg and "\n" not in msg
    _token_set(comm, shared_tmp / "v1", 200 * p, p * T + 1)           # rank 0 alone holds T + 1
    r = open_tokens(shared_tmp / "v1", comm, batch_size=2, window=T + 1)
    assert comm.allreduce(sum(len(x) for x, _ in r.test_batches(4))) >= 1
    r.close()


@pytest.mark.mpi
def test_mpi_token_steps_are_never_negative(comm, shared_tmp):
    """Every (train tokens, window, batch) either opens with steps >= 1 matching the formula or refuses."""
    from mpitrain.data.shards import split_bounds
    from mpitrain.data.token_reader import open_tokens

    p = comm.Get_size()
    for n in (p, 7 * p, 40 * p + 3):
        _token_set(comm, shared_tmp / f"n{n}", n, 50)
        for window, bs in ((2, 1), (5, 2), (9, 1), (30, 1)):
            T = window - 1
            want = min((hi - lo - T) // T for lo, hi in split_bounds(n, p)) // bs
            try:
                r = open_tokens(shared_tmp / f"n{n}", comm, batch_size=bs, window=window)
            except UserError as e:
                assert want < 1, (n, window, bs, str(e))
                continue
            assert r.steps_per_epoch == want >= 1, (n, window, bs)
            r.close()


def test_training_on_a_token_set_shorter_than_a_window_is_one_line(tmp_path):
    """End to end at 2 ranks: the refusal is one rank-tagged line, no traceback, no '-1 steps/epoch'."""
    from conftest import MPIRUN
    from test_faults import ERROR

    text = tmp_path / "t.txt"
    text.write_bytes(bytes(np.random.default_rng(0).integers(32, 127, 300).astype(np.uint8)))
    subprocess.run([sys.executable, "-m", "mpitrain", "data", "import", str(text), "--out", str(tmp_path / "d")],
                   check=True, capture_output=True, cwd=tmp_path)
    p = subprocess.run([MPIRUN, "-n", "2", sys.executable, "-m", "mpitrain", "train", str(ROOT / "jobs/gpt-tiny.toml"),
                        "--set", f"data.path={tmp_path / 'd'}", "--set", "checkpoint.every=0",
                        "--set", "model.block_size=256"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    errors = [ln for ln in p.stderr.splitlines() if ERROR.match(ln)]
    assert p.returncode != 0 and len(errors) == 1, p.stdout + p.stderr
    assert "needs 512 tokens per rank" in errors[0] and "Traceback" not in p.stderr + p.stdout
    assert "steps/epoch" not in p.stdout


# ------------------------------------------------------------------ the shard advice


@pytest.mark.parametrize("n", [50, 100, 999, 1437, 4000])
def test_shard_advice_helps_for_every_shard_and_rank_count(n):
    """Whatever the warning advises -- a shard count, a batch size, or both -- does use >= 90 % of the rows
    when the set is remade that way (data make's cut), and it is always a count that divides by the ranks."""
    import re

    from mpitrain.data.reader import USED, _cut, balance_advice, rows_used

    seen = set()
    for k in range(1, 13):
        for p in range(1, 9):
            for bs in (1, 8, 32, 100):
                if n // p < bs or n // max(k, p) == 0:
                    continue
                rows = _cut(n, k)
                advice = balance_advice(rows, p, bs)
                used = rows_used(rows, p, bs)
                if used >= USED * n:
                    assert advice is None
                    continue
                assert advice and f"only {used} of {n} training rows" in advice, (n, k, p, bs)
                shards = re.search(r"--shards (\d+)", advice)
                batch = re.search(r"train\.batch_size = (\d+)", advice)
                k2 = int(shards.group(1)) if shards else k
                b2 = int(batch.group(1)) if batch else bs
                if shards:
                    assert k2 % p == 0 and k2 != k, advice
                    seen.add("shards")
                if batch:
                    assert b2 < bs, advice
                    seen.add("batch")
                if shards or batch:
                    assert rows_used(_cut(n, k2), p, b2) >= USED * n, (n, k, p, bs, advice)
                else:
                    assert "fewer ranks or a larger data set" in advice
                    assert all(rows_used(_cut(n, c), p, b) < USED * n for c in range(1, 3 * p + 1)
                               for b in range(1, bs + 1)), advice
    assert "shards" in seen and (n > 100 or "batch" in seen)


def test_the_old_advice_case_a_multiple_already():
    """4 shards over 2 ranks already divide: the loss is the batch's, and the advice says so."""
    from mpitrain.data.reader import _cut, balance_advice

    advice = balance_advice(_cut(100, 4), 2, 32)
    assert "--shards" not in advice and "train.batch_size = 25" in advice


@pytest.mark.mpi
def test_mpi_readers_print_the_advice_that_helps(comm, shared_tmp, capfd):
    """Rows and graphs: 3 shards over the ranks, a batch that leaves rows unused: the readers' warning is
    balance_advice's, and a set remade as advised opens without one."""
    import re

    from mpitrain.data import make_graphs, make_synthetic, open_dataset
    from mpitrain.data.reader import USED, _cut, rows_used

    p = comm.Get_size()
    for kind, make, n in (("rows", make_synthetic, 40 * p + 7), ("graphs", make_graphs, 20 * p + 3)):
        d = shared_tmp / kind
        if comm.Get_rank() == 0:
            kw = {"rows": n, "features": 4} if kind == "rows" else {"graphs": n, "nodes": (3, 4)}
            make(d / "a", shards=3, **kw)
        comm.Barrier()
        bs = max(1, n // p // 2 + 1)                  # one batch per rank: about half the rows unused
        open_dataset(d / "a", comm, batch_size=bs).close()
        out = capfd.readouterr().out
        if comm.Get_rank() != 0:
            continue
        warn = [ln for ln in out.splitlines() if "are used per epoch" in ln]
        assert len(warn) == 1 and f"training {kind}" in warn[0], out
        k2 = int(m.group(1)) if (m := re.search(r"--shards (\d+)", warn[0])) else 3
        b2 = int(m.group(1)) if (m := re.search(r"train\.batch_size = (\d+)", warn[0])) else bs
        assert rows_used(_cut(n, k2), p, b2) >= USED * n, warn[0]


# ------------------------------------------------------------------ strict JSON


def test_finite_cleans_nested_values_and_numpy():
    from mpitrain.units import finite, json_text

    doc = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -math.inf, "d": (np.float32("nan"), 2)}],
           "e": np.array([1.0, np.nan]), "f": np.float64(3.5), "g": np.int64(4), "h": "nan", "i": None}
    out = strict_loads(json_text(doc))
    assert out == {"a": None, "b": [1.0, None, {"c": None, "d": [None, 2]}], "e": [1.0, None], "f": 3.5,
                   "g": 4, "h": "nan", "i": None}
    assert finite(doc)["f"] == 3.5 and type(finite(doc)["g"]) is int


def test_metrics_writers_emit_strict_json(tmp_path):
    """The --metrics-out writer, the trace and the bench's JSON: NaN anywhere becomes null."""
    from mpitrain.bench.report import write_json
    from mpitrain.train.results import Results

    nan = float("nan")
    Results.write(tmp_path / "m.json", {"val_loss": nan, "history": [{"test_loss": nan, "x": [math.inf]}],
                                        "evals": [{"val_loss": -math.inf}], "ok": 1.5})
    m = strict_loads((tmp_path / "m.json").read_text())
    assert m == {"val_loss": None, "history": [{"test_loss": None, "x": [None]}], "evals": [{"val_loss": None}],
                 "ok": 1.5}
    write_json(tmp_path / "b.json", [{"size": 8, "time": nan, "busbw": math.inf}], {"x": nan})
    assert strict_loads((tmp_path / "b.json").read_text())["rows"] == [{"size": 8, "time": None, "busbw": None}]


@pytest.mark.mpi
def test_mpi_trace_with_a_nan_argument_is_strict_json(comm, shared_tmp):
    from mpitrain.metrics import Trace

    tr = Trace(comm)
    with tr("step", args={"loss": float("nan"), "rank": comm.Get_rank()}):
        pass
    tr.write(shared_tmp / "trace.json", comm)
    comm.Barrier()
    if comm.Get_rank() == 0:
        doc = strict_loads((shared_tmp / "trace.json").read_text())
        args = [e["args"] for e in doc["traceEvents"] if e.get("name") == "step"]
        assert sorted(a["rank"] for a in args) == list(range(comm.Get_size())) and all(a["loss"] is None for a in args)


# ------------------------------------------------------------------ graph import validates before it casts


def _graph_arrays(suffix=""):
    from mpitrain.data.graph_make import synthetic_graphs

    g = synthetic_graphs(3, 0, 12, (4, 6))
    ea = np.arange(len(g.edges) * 2, dtype=np.float32).reshape(-1, 2)
    return {f"{k}{suffix}": v for k, v in dict(x=g.x, edges=g.edges, edge_attr=ea, node_ptr=g.node_ptr,
                                                edge_ptr=g.edge_ptr, y=g.y).items()}


def _bad_graphs():
    """(key, how to spoil the arrays, words): every array, in its original dtype and shape."""
    def put(key, fn):
        return lambda a: {**a, key: fn(a[key])}
    big = 2 ** 32 + 1                     # as int32 this wraps around to 1: a valid node id
    return [
        ("edges", put("edges", lambda e: np.where(e == 1, np.int64(big), e.astype(np.int64))), "holds 4294967297, beyond the int32"),
        ("edges", put("edges", lambda e: e.astype(np.float64)), "must be integers of shape [edges, 2]"),
        ("edges", put("edges", lambda e: e.astype(np.int64)[:, :1]), "must have shape [edges, 2]"),
        ("edges", put("edges", lambda e: e.ravel()), "must be integers of shape [edges, 2]"),
        ("edges", put("edges", lambda e: e.astype(np.int64) - 2 ** 40), "beyond the int32 range"),
        ("node_ptr", put("node_ptr", lambda p: p.astype(np.uint64) + np.uint64(2 ** 63)), "beyond the int64 range"),
        ("node_ptr", put("node_ptr", lambda p: p.astype(np.float64)), "must be integers of shape [graphs + 1]"),
        ("edge_ptr", put("edge_ptr", lambda p: p[:, None]), "must be integers of shape [graphs + 1]"),
        ("y", put("y", lambda y: y.astype(np.float64) + 0.5), "must be integers of shape [graphs]"),
        ("y", put("y", lambda y: y.astype(np.uint64) + np.uint64(2 ** 63)), "beyond the int64 range"),
        ("y", put("y", lambda y: y + 2 ** 30), "holds label 1073741825, beyond 16777216 (2**24) classes"),
        ("x", put("x", lambda x: x[:, :, None]), "must be numbers of shape [nodes, features]"),
        ("x", put("x", lambda x: np.where(x == x.max(), 1e300, x.astype(np.float64))), "beyond the float32 range"),
        ("edge_attr", put("edge_attr", lambda a: a[:-1]), "rows but edges"),
        ("edge_attr", put("edge_attr", lambda a: np.concatenate([a, a])), "rows but edges"),
        ("edge_attr", put("edge_attr", lambda a: a[:, :, None]), "must be numbers of shape [edges, edge_features]"),
        ("edge_attr", put("edge_attr", lambda a: a.astype(str)), "must be numbers of shape [edges, edge_features]"),
    ]


@pytest.mark.parametrize("suffix", ["", "_test"])
@pytest.mark.parametrize("key, spoil, words", _bad_graphs())
def test_graph_import_refuses_each_array_before_any_cast(tmp_path, suffix, key, spoil, words):
    from mpitrain.data import import_graphs

    arrays = {**_graph_arrays(), **(_graph_arrays("_test") if suffix else {})}
    spoiled = spoil({k[:-len(suffix)] if suffix and k.endswith(suffix) else k: v for k, v in arrays.items()
                     if k.endswith(suffix) or not suffix})
    arrays.update({f"{k}{suffix}": v for k, v in spoiled.items()})
    np.savez(tmp_path / "g.npz", **arrays)
    with pytest.raises(UserError) as e:
        import_graphs(tmp_path / "g.npz", tmp_path / "out")
    msg = str(e.value)
    assert f"g.npz: {key}{suffix}" in msg and words in msg and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()


def test_graph_import_keeps_good_arrays_of_any_integer_width(tmp_path):
    """int64 ids within range, uint8 labels, a 1-D edge_attr ([edges]): imported, equal to the source."""
    from mpitrain.data import import_graphs, open_dataset

    a = _graph_arrays()
    a.update(edges=a["edges"].astype(np.int64), y=a["y"].astype(np.uint8), edge_attr=a["edge_attr"][:, 0].copy())
    np.savez(tmp_path / "g.npz", **a)
    import_graphs(tmp_path / "g.npz", tmp_path / "out", shards=1, shuffle=False, test_fraction=0.25)
    r = open_dataset(tmp_path / "out", batch_size=1)
    g = r.local_graphs()
    assert r.spec.edge_features == 1 and np.array_equal(g.y, a["y"][3:].astype(np.int64))
    assert np.array_equal(g.edge_attr[:, 0], a["edge_attr"][a["edge_ptr"][3]:])
    r.close()
