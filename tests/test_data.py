"""The data package: making, importing, checking shards, and the per-rank reader.

Serial tests (unmarked) cover the file format, make/import/check and every kind of
damaged file. MPI tests (marked ``mpi``) run at 1..4 ranks: ownership, equal steps,
coverage without duplicates, the test split, determinism, resume, and that a
problem seen by one rank raises on every rank instead of hanging.

Rows are identified by a row id stored in feature 0 (``id_set``), and the label is
``id % classes``, so a batch whose x and y got separated by the shuffle is caught.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from conftest import h5_edit, h5_replace
from mpitrain.data import (check_dataset, ensure_dataset, import_file, make_digits, make_synthetic,
                           open_dataset)
from mpitrain.data import cli as data_cli
from mpitrain.data.reader import plan_segments
from mpitrain.data.shards import MANIFEST, ShardWriter, checksum_of
from mpitrain.runtime import UserError

CLASSES = 3
FEATURES = 4


def id_arrays(n, features=FEATURES, classes=CLASSES, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, features), dtype=np.float32)
    x[:, 0] = np.arange(n, dtype=np.float32)
    return x, (np.arange(n) % classes).astype(np.int64)


def id_set(dirpath, n, *, shards, test_fraction=0.1):
    """Import n id-rows (unshuffled): the test set is ids [0, nt), train is [nt, n)."""
    x, y = id_arrays(n)
    src = Path(dirpath).parent / (Path(dirpath).name + ".npz")
    np.savez(src, x=x, y=y)
    return import_file(src, dirpath, shards=shards, test_fraction=test_fraction, shuffle=False)


def ids(x):
    return x[:, 0].astype(np.int64)


def read_all(path):
    """All train rows of a set in global order (x, y), straight from the files."""
    m = json.loads((Path(path) / MANIFEST).read_text())
    xs, ys = [], []
    for s in m["shards"]:
        with h5py.File(Path(path) / s["file"], "r") as f:
            xs.append(f["x"][...])
            ys.append(f["y"][...])
    return np.concatenate(xs), np.concatenate(ys)


# ============================================================================ serial: make


def test_digits_layout_and_contents(tmp_path):
    out = tmp_path / "digits"
    m = make_digits(out, shards=3, seed=0)
    assert m["features"] == 64 and m["classes"] == 10
    assert m["train_rows"] + m["test"]["rows"] == 1797
    assert m["test"]["rows"] == round(1797 * 0.2)
    assert [s["file"] for s in m["shards"]] == ["train-00000.h5", "train-00001.h5", "train-00002.h5"]
    assert [s["offset"] for s in m["shards"]] == [0, m["shards"][0]["rows"],
                                                  m["shards"][0]["rows"] + m["shards"][1]["rows"]]
    assert max(s["rows"] for s in m["shards"]) - min(s["rows"] for s in m["shards"]) <= 1
    assert m["made"]["how"] == "make digits" and "--shards 3" in m["made"]["command"]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "test.h5", "train-00000.h5",
                                                     "train-00001.h5", "train-00002.h5"]
    x, y = read_all(out)
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (m["train_rows"], 64)
    assert 0.0 <= x.min() and x.max() == 1.0  # scaled x / 16
    assert set(np.unique(y)) == set(range(10))
    with h5py.File(out / "train-00001.h5", "r") as f:
        a = f.attrs
        assert (a["schema_version"], a["features"], a["classes"]) == (1, 64, 10)
        assert (a["rows"], a["offset"]) == (m["shards"][1]["rows"], m["shards"][1]["offset"])
        assert a["checksum"] == m["shards"][1]["checksum"] == checksum_of(f["x"][...], f["y"][...])
        assert f["x"].chunks is not None
    assert check_dataset(out).ok


def test_digits_split_is_seeded(tmp_path):
    a = make_digits(tmp_path / "a", shards=2, seed=1)
    b = make_digits(tmp_path / "b", shards=2, seed=1)
    c = make_digits(tmp_path / "c", shards=2, seed=2)
    key = lambda m: [s["checksum"] for s in m["shards"]] + [m["test"]["checksum"]]  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)
    # train and test are disjoint and together are the whole digits set
    xa, _ = read_all(tmp_path / "a")
    with h5py.File(tmp_path / "a" / "test.h5", "r") as f:
        xt = f["x"][...]
    rows = {r.tobytes() for r in np.concatenate([xa, xt])}
    assert len(xa) + len(xt) == 1797 and len(rows) >= 1700  # digits has a few duplicate images


def test_synthetic_independent_of_chunking_and_sharding(tmp_path):
    kw = dict(rows=2500, features=16, classes=4, seed=5, test_rows=300)
    m1 = make_synthetic(tmp_path / "a", shards=2, chunk_rows=300, **kw)
    m2 = make_synthetic(tmp_path / "b", shards=3, chunk_rows=4096, **kw)
    make_synthetic(tmp_path / "c", shards=2, chunk_rows=300, **{**kw, "seed": 6})
    xa, ya = read_all(tmp_path / "a")
    xb, yb = read_all(tmp_path / "b")
    xc, _ = read_all(tmp_path / "c")
    assert xa.shape == (2500, 16) and np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert not np.array_equal(xa, xc)
    assert m1["test"]["checksum"] == m2["test"]["checksum"]
    counts = np.bincount(ya, minlength=4)
    assert counts.min() > 0.08 * len(ya), counts  # the teacher's classes are roughly balanced
    assert check_dataset(tmp_path / "b").ok


def test_synthetic_reports_progress(tmp_path, monkeypatch):
    from mpitrain.data import make

    lines = []
    monkeypatch.setattr(make, "PROGRESS_EVERY", 0.0)
    make_synthetic(tmp_path / "s", rows=3000, features=8, classes=3, test_rows=100, chunk_rows=500,
                   log=lines.append)
    pct = [ln for ln in lines if "%" in ln]
    assert len(pct) >= 3 and "making synthetic" in pct[0], lines
    assert "3000 x 8 train rows" in lines[-1]


def test_import_npz_and_csv(tmp_path):
    x, y = id_arrays(50)
    np.savez(tmp_path / "d.npz", x=x.reshape(50, 2, 2), y=y)  # [N, ...] is flattened
    m = import_file(tmp_path / "d.npz", tmp_path / "n", shards=2, test_fraction=0.2)
    assert (m["features"], m["classes"], m["train_rows"], m["test"]["rows"]) == (4, 3, 40, 10)
    xs, ys = read_all(tmp_path / "n")
    assert sorted(ids(xs)) != list(range(40))  # shuffled before the split
    assert np.array_equal(ys, ids(xs) % 3)

    np.savez(tmp_path / "t.npz", x=x[:40], y=y[:40], x_test=x[40:], y_test=y[40:])
    m = import_file(tmp_path / "t.npz", tmp_path / "t", shards=1, classes=5)
    assert (m["classes"], m["train_rows"], m["test"]["rows"]) == (5, 40, 10)

    body = "\n".join(",".join(f"{v:g}" for v in row) + f",{lab}" for row, lab in zip(x, y))
    (tmp_path / "h.csv").write_text("a,b,c,d,label\n" + body + "\n")
    (tmp_path / "n.csv").write_text(body + "\n")
    mh = import_file(tmp_path / "h.csv", tmp_path / "h", shards=3, shuffle=False)
    mn = import_file(tmp_path / "n.csv", tmp_path / "nh", shards=3, shuffle=False)
    assert mh["train_rows"] == mn["train_rows"] == 40 and mh["features"] == 4
    assert [s["checksum"] for s in mh["shards"]] == [s["checksum"] for s in mn["shards"]]
    xh, yh = read_all(tmp_path / "h")
    assert np.array_equal(ids(xh), np.arange(10, 50)) and np.array_equal(yh, np.arange(10, 50) % 3)


@pytest.mark.parametrize("case,fragment", [
    ("nan.csv", "NaN or Inf"),
    ("neg.csv", "negative label"),
    ("frac.csv", "not an integer"),
    ("text.csv", "not a numeric CSV"),
    ("one.csv", "at least 2 columns"),
    ("nox.npz", "needs arrays 'x' and 'y'"),
    ("len.npz", "x has 5 rows but y has 4"),
    ("d.txt", "unknown file type"),
    ("missing.npz", "no such file"),
    ("big.csv", "out of range for --classes 2"),
])
def test_import_errors(tmp_path, case, fragment):
    p = tmp_path / case
    content = {"nan.csv": "1,2,0\nnan,3,1\n", "neg.csv": "1,2,0\n1,3,-1\n", "frac.csv": "1,2,0.5\n",
               "text.csv": "1,2,0\nx,y,1\n", "one.csv": "1\n2\n", "d.txt": "1,2\n",
               "big.csv": "1,2,0\n1,2,1\n1,2,2\n"}
    if case in content:
        p.write_text(content[case])
    elif case == "nox.npz":
        np.savez(p, a=np.zeros(3))
    elif case == "len.npz":
        np.savez(p, x=np.zeros((5, 2)), y=np.zeros(4, dtype=int))
    with pytest.raises(UserError) as e:
        import_file(p, tmp_path / "out", classes=2 if case == "big.csv" else None, test_fraction=0)
    assert fragment in str(e.value) and str(p) in str(e.value) and "[rank 0@" in str(e.value)
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_more_shards_than_rows(tmp_path):
    x, y = id_arrays(10)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(UserError, match="11 shards requested but only 8 training rows"):
        import_file(tmp_path / "d.npz", tmp_path / "o", shards=11)
    with pytest.raises(UserError, match="shards must be at least 1"):
        make_digits(tmp_path / "o", shards=0)
    with pytest.raises(UserError, match="shards requested"):
        make_synthetic(tmp_path / "o", rows=5, features=2, shards=6)


def test_make_refuses_to_overwrite_and_force_replaces(tmp_path):
    out = tmp_path / "s"
    make_synthetic(out, rows=400, features=4, classes=2, shards=4, test_rows=10)
    with pytest.raises(UserError, match="already holds a data set.*--force"):
        make_synthetic(out, rows=400, features=4, classes=2, shards=2, test_rows=10)
    m = make_synthetic(out, rows=300, features=4, classes=2, shards=2, test_rows=10, overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert names == [MANIFEST, "test.h5", "train-00000.h5", "train-00001.h5"]  # stale shards gone
    assert m["train_rows"] == 300 and check_dataset(out).ok


def test_atomic_writer_leaves_nothing_on_crash(tmp_path):
    target = tmp_path / "train-00000.h5"
    with pytest.raises(RuntimeError):
        with ShardWriter(target, rows=10, features=3, classes=2) as w:
            w.write(np.zeros((5, 3)), np.zeros(5, dtype=int))
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    # a writer that never finished (killed): only a hidden temporary exists, which
    # is not a data set and which the next make cleans up
    w = ShardWriter(target, rows=10, features=3, classes=2)
    w.write(np.zeros((5, 3)), np.zeros(5, dtype=int))
    w._f.flush()
    assert not target.exists() and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(UserError, match="manifest.json: missing"):
        open_dataset(tmp_path, MPI.COMM_SELF, batch_size=1)
    make_digits(tmp_path, shards=1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    w._f.close()


def test_writer_rejects_bad_rows(tmp_path):
    with ShardWriter(tmp_path / "a.h5", rows=2, features=2, classes=2) as w:
        with pytest.raises(Exception, match="labels out of range"):
            w.write(np.zeros((2, 2)), np.array([0, 2]))
        with pytest.raises(Exception, match="NaN or Inf"):
            w.write(np.array([[0, np.inf], [0, 0]]), np.array([0, 1]))
        w.write(np.zeros((2, 2)), np.array([0, 1]))
        w.close()
    assert (tmp_path / "a.h5").exists()


# ============================================================================ serial: check + open


def _corrupt(out: Path, how: str) -> str:
    """Damage shard 1 (or the set) one way; return the file name the error must name."""
    s1 = out / "train-00001.h5"
    if how == "missing_shard":
        s1.unlink()
    elif how == "truncated":
        data = s1.read_bytes()
        s1.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        s1.write_bytes(b"not an hdf5 file at all" * 100)
    elif how == "labels":
        h5_edit(s1, lambda f: f["y"].__setitem__(3, 12))
    elif how == "nan":
        h5_edit(s1, lambda f: f["x"].__setitem__((5, 1), np.nan))
    elif how == "inf":
        h5_edit(s1, lambda f: f["x"].__setitem__((0, 0), -np.inf))
    elif how == "x_dtype":
        h5_edit(s1, lambda f: h5_replace(f, "x", f["x"][...].astype(np.float64)))
    elif how == "y_dtype":
        h5_edit(s1, lambda f: h5_replace(f, "y", f["y"][...].astype(np.int32)))
    elif how == "x_shape":
        h5_edit(s1, lambda f: h5_replace(f, "x", f["x"][:, :3]))
    elif how == "y_shape":
        h5_edit(s1, lambda f: h5_replace(f, "y", f["y"][:-1]))
    elif how == "no_y":
        h5_edit(s1, lambda f: f.__delitem__("y"))
    elif how == "schema":
        h5_edit(s1, lambda f: f.attrs.__setitem__("features", 99))
    elif how == "content":  # valid values, changed: only the checksum can tell
        h5_edit(s1, lambda f: f["x"].__setitem__((2, 2), f["x"][2, 2] + 0.25))
    elif how == "manifest_missing":
        (out / MANIFEST).unlink()
        return MANIFEST
    elif how == "manifest_garbage":
        (out / MANIFEST).write_text("{not json")
        return MANIFEST
    elif how == "manifest_rows":
        m = json.loads((out / MANIFEST).read_text())
        m["shards"][1]["rows"] += 1  # consistent manifest, but the file disagrees
        m["shards"][2]["offset"] += 1
        m["train_rows"] += 1
        (out / MANIFEST).write_text(json.dumps(m))
    elif how == "no_dir":
        import shutil

        shutil.rmtree(out)
        return out.name
    return s1.name


CORRUPTIONS = {
    "missing_shard": "missing", "truncated": "unreadable", "garbage": "unreadable",
    "labels": "labels out of range (found 12", "nan": "NaN or Inf", "inf": "NaN or Inf",
    "x_dtype": "x has dtype float64, expected float32", "y_dtype": "y has dtype int32, expected int64",
    "x_shape": "x has shape", "y_shape": "rows but y has", "no_y": "no dataset 'y'",
    "schema": "schema mismatch", "content": "checksum mismatch", "manifest_missing": "missing",
    "manifest_garbage": "unreadable", "manifest_rows": "manifest.json says", "no_dir": "no such",
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_check_and_open_report_damage(tmp_path, how, capsys):
    out = tmp_path / "set"
    make_synthetic(out, rows=600, features=FEATURES, classes=CLASSES, shards=3, test_rows=20)
    name = _corrupt(out, how)
    reason = CORRUPTIONS[how]
    rep = check_dataset(out)
    assert not rep.ok
    assert any(name in p and reason in p for p in rep.problems), rep.problems
    with pytest.raises(UserError) as e:
        open_dataset(out, MPI.COMM_SELF, batch_size=4)
    msg = str(e.value)
    assert msg.startswith("[rank 0@") and name in msg and reason in msg, msg
    if how == "manifest_garbage":  # how it was made is unknown: the generic advice
        assert "regenerate it with `python -m mpitrain data make digits" in msg, msg
    elif how not in ("no_dir", "manifest_missing"):
        assert "regenerate with `python -m mpitrain data make synthetic" in msg, msg
    else:
        assert "data make" in msg and "data import" in msg
    # the CLI: per-file summary, non-zero exit, the file and the reason on stderr
    args = parse(["check", str(out)])
    assert args.func(args) == 1
    cap = capsys.readouterr()
    assert "error:" in cap.err and name in cap.err and reason in cap.err


def test_check_ok_summary_and_notes(tmp_path, capsys):
    out = tmp_path / "set"
    make_synthetic(out, rows=200, features=3, classes=2, shards=2, test_rows=0, allow_no_test=True)
    (out / "train-00007.h5").write_bytes(b"old")
    (out / ".train-00000.h5.tmp-123").write_bytes(b"x")
    rep = check_dataset(out)
    assert rep.ok and len(rep.notes) == 2
    args = parse(["check", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "train-00001.h5" in text and "100 rows" in text and "all files ok" in text
    with open_dataset(out, MPI.COMM_SELF, batch_size=8) as r:  # a 0-row test set is fine
        assert r.test_rows == 0 and not r.has_test and list(r.test_batches(4)) == []


def test_quick_open_skips_row_scan(tmp_path):
    out = tmp_path / "set"
    make_synthetic(out, rows=100, features=3, classes=2, shards=2, test_rows=10)
    _corrupt(out, "nan")
    open_dataset(out, MPI.COMM_SELF, batch_size=4, verify=False).close()  # structure only
    _corrupt(out, "x_dtype")
    with pytest.raises(UserError, match="dtype float64"):
        open_dataset(out, MPI.COMM_SELF, batch_size=4, verify=False)


# ============================================================================ serial: CLI


def parse(argv):
    ap = argparse.ArgumentParser(prog="data")
    data_cli.add_arguments(ap)
    return ap.parse_args(argv)


def test_cli_make_import_check(tmp_path, capsys):
    a = parse(["make", "synthetic", "--out", str(tmp_path / "s"), "--rows", "300", "--features", "5",
               "--classes", "3", "--test-rows", "30", "--shards", "2", "--chunk-rows", "64"])
    assert a.func(a) == 0
    m = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert (m["train_rows"], m["features"], m["classes"], len(m["shards"])) == (300, 5, 3, 2)
    assert a.func(a) == 1  # exists: refused
    assert "--force" in capsys.readouterr().err
    a = parse(["make", "digits", "--out", str(tmp_path / "d"), "--shards", "2"])
    assert a.func(a) == 0
    x, y = id_arrays(30)
    np.savez(tmp_path / "f.npz", x=x, y=y)
    a = parse(["import", str(tmp_path / "f.npz"), "--out", str(tmp_path / "i"), "--shards", "3"])
    assert a.func(a) == 0
    for d in ("s", "d", "i"):
        a = parse(["check", str(tmp_path / d)])
        assert a.func(a) == 0
    with pytest.raises(SystemExit):
        parse(["import", "--help"])
    assert "last column" in capsys.readouterr().out.replace("\n", " ").lower()


# ============================================================================ serial: reader


def test_reader_serial_cover_resume_shuffle(tmp_path):
    out = tmp_path / "set"
    id_set(out, 333, shards=3)  # 300 train ids [33, 333), 33 test ids
    with open_dataset(out, MPI.COMM_SELF, batch_size=7, seed=4, block_rows=23, window_blocks=2) as r:
        assert (r.features, r.classes, r.train_rows, r.rows_local) == (4, 3, 300, 300)
        assert r.steps_per_epoch == 300 // 7 and r.dropped_per_epoch == 300 % 7
        e0 = list(r.batches(0))
        assert len(e0) == r.steps_per_epoch
        for x, y in e0:
            assert x.shape == (7, 4) and x.dtype == np.float32 and x.flags.c_contiguous
            assert y.shape == (7,) and y.dtype == np.int64 and np.array_equal(y, ids(x) % 3)
        seen = np.concatenate([ids(x) for x, _ in e0])
        assert len(set(seen)) == len(seen) == 294 and set(seen) <= set(range(33, 333))
        assert not np.array_equal(seen, np.sort(seen))  # shuffled
        e1 = np.concatenate([ids(x) for x, _ in r.batches(1)])
        assert not np.array_equal(seen, e1)
        used = [frozenset(np.concatenate([ids(x) for x, _ in r.batches(e)])) for e in range(6)]
        assert len(set(used)) > 1  # the dropped remainder changes from epoch to epoch
        again = list(r.batches(0))
        assert all(np.array_equal(a[0], b[0]) for a, b in zip(e0, again))
        for k in (1, 5, 13, r.steps_per_epoch - 1, r.steps_per_epoch):
            tail = list(r.batches(0, start=k))
            assert len(tail) == r.steps_per_epoch - k
            assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
                       for a, b in zip(e0[k:], tail))
        with pytest.raises(ValueError):
            r.batches(0, start=r.steps_per_epoch + 1)
        t = list(r.test_batches(10))
        assert [len(y) for _, y in t] == [10, 10, 10, 3]
        assert np.array_equal(np.concatenate([ids(x) for x, _ in t]), np.arange(33))
    assert r.closed
    with pytest.raises(ValueError, match="closed"):
        r.batches(0)


def test_reader_streams_in_blocks_and_resume_skips_reads(tmp_path, monkeypatch):
    from mpitrain.data.reader import Reader

    out = tmp_path / "set"
    id_set(out, 1100, shards=2, test_fraction=100 / 1100)  # 1000 train rows
    reads = []
    orig = Reader._read_block

    def spy(self, s, a, b, xout, yout):
        reads.append(b - a)
        return orig(self, s, a, b, xout, yout)

    monkeypatch.setattr(Reader, "_read_block", spy)
    with open_dataset(out, MPI.COMM_SELF, batch_size=10, block_rows=50, window_blocks=2) as r:
        sizes, first = [], None
        for x, _ in r.batches(0):
            sizes.append(sum(reads))
            first = ids(x) if first is None else first
        assert max(reads) <= 50 and sum(reads) == 1000  # every row read once, in blocks
        assert sizes[0] <= 100  # the first batch came after reading one window, not the set
        reads.clear()
        tail = list(r.batches(0, start=90))
        assert len(tail) == 10 and sum(reads) <= 200  # the skipped 90 batches were not read
        # a window mixes rows from both of its blocks (shuffled within the window)
        blocks_in_first = {int(i - 100) // 50 for i in first}
        assert len(blocks_in_first) >= 2, first


def test_reader_seed_changes_order(tmp_path):
    out = tmp_path / "set"
    id_set(out, 120, shards=2)
    orders = []
    for seed in (0, 0, 1):
        with open_dataset(out, MPI.COMM_SELF, batch_size=8, seed=seed) as r:
            orders.append(np.concatenate([ids(x) for x, _ in r.batches(0)]))
    assert np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[0], orders[2])


def test_plan_segments():
    assert plan_segments([5, 5, 5, 5, 5], 2, 0) == [(0, 0, 5), (2, 0, 5), (4, 0, 5)]
    assert plan_segments([5, 5, 5, 5, 5], 2, 1) == [(1, 0, 5), (3, 0, 5)]
    # 2 shards of 6 and 4 rows over 3 ranks: global ranges [0,4) [4,7) [7,10)
    assert plan_segments([6, 4], 3, 0) == [(0, 0, 4)]
    assert plan_segments([6, 4], 3, 1) == [(0, 4, 6), (1, 0, 1)]
    assert plan_segments([6, 4], 3, 2) == [(1, 1, 4)]


def test_batch_size_errors(tmp_path):
    out = tmp_path / "set"
    id_set(out, 40, shards=1)
    with pytest.raises(UserError, match="fewer than batch_size=100"):
        open_dataset(out, MPI.COMM_SELF, batch_size=100)
    with pytest.raises(UserError, match="positive integer"):
        open_dataset(out, MPI.COMM_SELF, batch_size=0)


def test_ensure_dataset_serial(tmp_path):
    p = tmp_path / "data" / "digits"
    assert ensure_dataset(p, "digits", MPI.COMM_SELF, shards=2) == p
    m = json.loads((p / MANIFEST).read_text())
    assert len(m["shards"]) == 2
    stamp = (p / MANIFEST).stat().st_mtime_ns
    ensure_dataset(p, "digits", MPI.COMM_SELF)
    assert (p / MANIFEST).stat().st_mtime_ns == stamp  # an existing set is left alone
    s = tmp_path / "syn"
    ensure_dataset(s, "synthetic", MPI.COMM_SELF, shards=3, rows=500, features=7, classes=4)
    m = json.loads((s / MANIFEST).read_text())
    assert (m["train_rows"], m["features"], m["classes"], len(m["shards"])) == (500, 7, 4, 3)
    for ds in ("", None, "mnist"):
        with pytest.raises(UserError, match="data make .*data import"):
            ensure_dataset(tmp_path / "nope", ds, MPI.COMM_SELF)
    assert not (tmp_path / "nope").exists()


# ============================================================================ MPI


@pytest.fixture
def shared(shared_tmp, comm):
    """The shared directory, after every rank has it (make things on rank 0, then barrier)."""
    yield shared_tmp
    comm.Barrier()


def on_rank0(comm, fn):
    """Run fn on rank 0 only; re-raise its failure everywhere (so no rank waits forever)."""
    err = None
    if comm.Get_rank() == 0:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            err = repr(e)
    err = comm.bcast(err, root=0)
    if err:
        raise RuntimeError(f"rank 0 failed to prepare: {err}")


def all_ok(comm, ok, what):
    """Gather a local verdict so every rank fails together (never one rank alone)."""
    verdicts = comm.allgather((bool(ok), what))
    bad = [(r, w) for r, (o, w) in enumerate(verdicts) if not o]
    assert not bad, bad


@pytest.mark.mpi
@pytest.mark.parametrize("shards", [1, 2, 3, 5, 8])
def test_mpi_cover_steps_test_determinism(comm, shared, shards):
    rank, size = comm.Get_rank(), comm.Get_size()
    out = shared / f"ids{shards}"
    n, nt = 403, 40  # ids [0, 40) are the test set, [40, 403) the 363 train rows
    on_rank0(comm, lambda: id_set(out, n, shards=shards, test_fraction=nt / n))
    b = 5
    r = open_dataset(out, comm, batch_size=b, seed=3, block_rows=17, window_blocks=3)
    with r:
        # ownership: round-robin shards, or contiguous row ranges when shards < ranks
        m = r.manifest
        if shards >= size:
            mine = [s for s in range(shards) if s % size == rank]
            assert r.shard_files == [m["shards"][s]["file"] for s in mine]
            want = set()
            for s in mine:
                want |= set(range(nt + m["shards"][s]["offset"],
                                  nt + m["shards"][s]["offset"] + m["shards"][s]["rows"]))
        else:
            q, rem = divmod(363, size)
            lo = rank * q + min(rank, rem)
            want = set(range(nt + lo, nt + lo + q + (rank < rem)))
            assert len(r.shard_files) <= 2
        assert r.rows_local == len(want)
        rows = comm.allgather(r.rows_local)
        steps = comm.allgather(r.steps_per_epoch)
        assert sum(rows) == r.train_rows == 363
        assert len(set(steps)) == 1 and steps[0] == min(rows) // b
        assert r.dropped_per_epoch == r.rows_local - steps[0] * b

        e0 = list(r.batches(0))
        local_ok = len(e0) == r.steps_per_epoch and all(
            x.shape == (b, FEATURES) and x.dtype == np.float32 and x.flags.c_contiguous
            and y.dtype == np.int64 and np.array_equal(y, ids(x) % CLASSES) for x, y in e0)
        seen = np.concatenate([ids(x) for x, _ in e0]) if e0 else np.empty(0, np.int64)
        local_ok = local_ok and set(seen.tolist()) <= want
        everything = np.concatenate(comm.allgather(seen))
        all_ok(comm, local_ok, "batch shapes/labels/ownership")
        assert len(everything) == len(set(everything.tolist())) == steps[0] * b * size
        assert set(everything.tolist()) <= set(range(nt, n))
        # deterministic; another epoch is another order; resuming gives the same tail
        same = all(np.array_equal(a[0], c[0]) for a, c in zip(e0, r.batches(0)))
        e1 = np.concatenate([ids(x) for x, _ in r.batches(1)])
        k = r.steps_per_epoch // 2
        tail = list(r.batches(0, start=k))
        resumed = len(tail) == r.steps_per_epoch - k and all(
            np.array_equal(a[0], c[0]) for a, c in zip(e0[k:], tail))
        all_ok(comm, same and resumed and not np.array_equal(seen, e1),
               f"determinism/resume/reshuffle at rank {rank}")
        # the test set: split in contiguous ranges, covered exactly once
        t = [ids(x) for x, _ in r.test_batches(6)]
        tl = np.concatenate(t) if t else np.empty(0, np.int64)
        all_ok(comm, all(len(v) <= 6 for v in t) and np.array_equal(tl, np.sort(tl)), "test order")
        tall = np.concatenate(comm.allgather(tl))
        assert np.array_equal(np.sort(tall), np.arange(nt))


@pytest.mark.mpi
def test_mpi_more_ranks_than_test_rows(comm, shared):
    out = shared / "tiny"
    on_rank0(comm, lambda: id_set(out, 64, shards=1, test_fraction=2 / 64))  # 2 test rows
    with open_dataset(out, comm, batch_size=2) as r:
        got = [len(y) for _, y in r.test_batches(8)]
        counts = comm.allgather(sum(got))
    assert sum(counts) == 2 and all(c in (0, 1, 2) for c in counts)


def _broken(comm, shared, name, shards, how):
    out = shared / name
    on_rank0(comm, lambda: (id_set(out, 120 * max(shards, 1), shards=shards, test_fraction=0.05),
                            how(out)))
    return out


@pytest.mark.mpi
def test_mpi_bad_shard_on_one_rank_raises_everywhere(comm, shared):
    """The last shard (owned by the last rank only) has a label out of range."""
    rank, size = comm.Get_rank(), comm.Get_size()
    k = size
    last = f"train-{k - 1:05d}.h5"
    out = _broken(comm, shared, "badlabel", k,
                  lambda o: h5_edit(o / last, lambda f: f["y"].__setitem__(2, 12)))
    with pytest.raises(UserError) as e:
        open_dataset(out, comm, batch_size=4)
    msg = str(e.value)
    assert msg.startswith(f"[rank {MPI.COMM_WORLD.Get_rank()}@")
    assert last in msg and "labels out of range (found 12" in msg and "regenerate" in msg
    if rank != size - 1:
        assert f"rank {size - 1} failed" in msg


@pytest.mark.mpi
def test_mpi_truncated_shard_raises_everywhere(comm, shared):
    size = comm.Get_size()
    k = size + 1  # the extra shard goes to rank 0 (round-robin): others must still raise
    target = "train-00000.h5"
    out = _broken(comm, shared, "trunc", k,
                  lambda o: (o / target).write_bytes((o / target).read_bytes()[:800]))
    with pytest.raises(UserError) as e:
        open_dataset(out, comm, batch_size=4)
    assert target in str(e.value) and "unreadable" in str(e.value)
    if comm.Get_rank() != 0:
        assert "rank 0 failed" in str(e.value)


@pytest.mark.mpi
def test_mpi_nan_in_split_shard_seen_by_last_rank(comm, shared):
    """One shard, split in row ranges over the ranks: a NaN in the last row is only the last rank's."""
    size = comm.Get_size()
    out = _broken(comm, shared, "nan", 1,
                  lambda o: h5_edit(o / "train-00000.h5", lambda f: f["x"].__setitem__((-1, 1), np.nan)))
    with pytest.raises(UserError) as e:
        open_dataset(out, comm, batch_size=4)
    assert "train-00000.h5" in str(e.value) and "NaN or Inf" in str(e.value)
    if comm.Get_rank() != size - 1:
        assert f"rank {size - 1} failed" in str(e.value)


@pytest.mark.mpi(min_size=2)
def test_mpi_ranks_disagree(comm, shared):
    out = shared / "agree"
    on_rank0(comm, lambda: id_set(out, 200, shards=2))
    with pytest.raises(UserError, match="ranks disagree.*batch_size"):
        open_dataset(out, comm, batch_size=4 + (comm.Get_rank() == 1))
    with pytest.raises(UserError, match="fewer than batch_size"):
        open_dataset(out, comm, batch_size=1000)


@pytest.mark.mpi
def test_mpi_ensure_dataset(comm, shared):
    p = shared / "made" / "digits"
    assert ensure_dataset(p, "digits", comm, shards=comm.Get_size()) == p
    with open_dataset(p, comm, batch_size=16) as r:
        assert r.train_rows + r.test_rows == 1797 and r.features == 64
        total = sum(comm.allgather(r.rows_local))
    assert total == r.train_rows
    with pytest.raises(UserError, match="data make"):
        ensure_dataset(shared / "absent", "", comm)
    with pytest.raises(UserError, match="no such data set directory"):
        open_dataset(shared / "absent", comm, batch_size=4)


@pytest.mark.mpi
def test_mpi_cli_make_and_check(comm, shared):
    out = str(shared / "cli")
    a = parse(["make", "synthetic", "--out", out, "--rows", "500", "--features", "6",
               "--classes", "3", "--test-rows", "50", "--shards", "3"])
    codes = comm.allgather(a.func(a))
    assert codes == [0] * comm.Get_size()
    assert comm.allgather(a.func(a)) == [1] * comm.Get_size()  # exists: every rank fails
    c = parse(["check", out])
    assert comm.allgather(c.func(c)) == [0] * comm.Get_size()
    on_rank0(comm, lambda: _corrupt(Path(out), "labels"))
    assert comm.allgather(c.func(c)) == [1] * comm.Get_size()
