"""``data import`` / ``data make`` edge cases: nothing is lost or mistaken silently.

CSV with a byte-order mark, CRLF or a pandas-style header/index; labels that do not fit
int64; empty files, 0 rows, 0 features; test splits that leave nothing; the regenerate
hint of a copied set. Serial tests (make/import are serial; the CLI runs them on rank 0).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.data import import_file, make_digits, make_synthetic, open_dataset
from mpitrain.data.shards import MANIFEST
from mpitrain.runtime import UserError

X = np.round(np.random.default_rng(1).random((30, 3)), 3)
Y = np.arange(30) % 3


def _rows(newline="\n") -> str:
    return newline.join(",".join(f"{v:.3f}" for v in r) + f",{lab}" for r, lab in zip(X, Y)) + newline


def _train_and_test(out) -> tuple[np.ndarray, np.ndarray]:
    """Every row of an imported set (train shards, then test), x and y."""
    m = json.loads((Path(out) / MANIFEST).read_text())
    xs, ys = [], []
    for name in [s["file"] for s in m["shards"]] + [m["test"]["file"]]:
        with h5py.File(Path(out) / name, "r") as f:
            xs.append(f["x"][...])
            ys.append(f["y"][...])
    return np.concatenate(xs), np.concatenate(ys)


def _imported(tmp_path, name: str, data: bytes, log: list | None = None):
    src = tmp_path / name
    src.write_bytes(data)
    m = import_file(src, tmp_path / (name + ".set"), shards=2, shuffle=False, log=(log.append if log is not None
                                                                                   else None))
    return m, _train_and_test(tmp_path / (name + ".set"))


@pytest.mark.parametrize("name, data, header", [
    ("plain.csv", _rows().encode(), None),
    ("bom.csv", b"\xef\xbb\xbf" + _rows().encode(), None),
    ("crlf.csv", _rows("\r\n").encode(), None),
    ("bom-crlf-header.csv", b"\xef\xbb\xbf" + ("a,b,c,label\r\n" + _rows("\r\n")).encode(), "not all numbers"),
    ("pandas-numbers.csv", ("0,1,2,3\n" + _rows()).encode(), "the column numbers 0..3"),
    ("pandas-index.csv", (",0,1,2,3\n" + "".join(f"{i},{r}\n" for i, r in enumerate(_rows().splitlines())))
     .encode(), "not all numbers"),
    ("blank-lines.csv", ("\n" + _rows().replace("\n", "\n\n")).encode(), None),
])
def test_csv_rows_are_all_kept(tmp_path, name, data, header):
    log = []
    m, (x, y) = _imported(tmp_path, name, data, log)
    assert m["train_rows"] + m["test"]["rows"] == 30 and m["features"] == 3, (m, log)
    assert np.allclose(x, X[np.r_[6:30, 0:6]], atol=1e-6) and np.array_equal(y, Y[np.r_[6:30, 0:6]])
    said = " | ".join(log)
    assert "read 30 rows x 3 features + label" in said, log
    if header is None:
        assert "no header" in said and "taken as a header" not in said, log
    else:
        assert f"taken as a header ({header}" in said, log
    if name.startswith("bom"):
        assert "byte-order mark dropped" in said, log
    if "crlf" in name:
        assert "CRLF line ends" in said, log
    if name == "pandas-index.csv":
        assert "a pandas index): dropped" in said, log


def test_a_numeric_first_row_that_is_not_column_numbers_stays_data(tmp_path):
    log = []
    m, _ = _imported(tmp_path, "d.csv", ("1,2,3,0\n" + _rows()).encode(), log)
    assert m["train_rows"] + m["test"]["rows"] == 31 and "no header" in log[0]


@pytest.mark.parametrize("name, data, words", [
    ("empty.csv", b"", "is empty (no rows)"),
    ("blank.csv", b"\n\r\n  \n", "is empty (no rows)"),
    ("header-only.csv", b"a,b,label\n", "holds a header line but no data rows"),
    ("one-column.csv", b"1\n2\n", "needs at least 2 columns (features..., label), found 1"),
    ("ragged.csv", b"1,2,0\n1,2\n", "line 2 has 2 columns, line 1 has 3"),
    ("text.csv", b"1,2,0\n1,x,1\n", "not a numeric CSV: line 2, column 2 is 'x'"),
    ("latin1.csv", "caf\u00e9,b,label\n1,2,0\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 3)"),
    ("huge-label.csv", b"0.5,1e20\n0.5,1\n", "label 1e+20 at line 1 is too large"),
    ("neg-label.csv", b"a,label\n0.5,1\n0.5,-2\n", "negative label -2 at line 3"),
    ("one-class.csv", b"0.5,0\n0.7,0\n", "every label is 0, a single class"),
])
def test_csv_errors(tmp_path, name, data, words):
    src = tmp_path / name
    src.write_bytes(data)
    with pytest.raises(UserError) as e:
        import_file(src, tmp_path / "out", allow_no_test=True)
    assert words in str(e.value) and str(src) in str(e.value), str(e.value)
    assert not (tmp_path / "out" / MANIFEST).exists()


@pytest.mark.parametrize("arrays, words", [
    ({"x": np.ones((3, 2)), "y": np.array([0, 1, 2**63 + 5], dtype=np.uint64)},
     "label 9223372036854775813 at row 2 of y is too large"),
    ({"x": np.ones((3, 2)), "y": np.array([0, 1, 1e20])}, "label 1e+20 at row 2 of y is too large"),
    ({"x": np.ones((3, 2)), "y": np.array([0, -1, 1])}, "negative label -1 at row 1 of y"),
    ({"x": np.ones((0, 4)), "y": np.zeros(0, dtype=int)}, "holds no rows"),
    ({"x": np.ones((10, 0)), "y": np.arange(10) % 2}, "x has 0 features per row (shape (10, 0))"),
    ({"x": np.ones((10, 2)), "y": np.arange(10) % 2, "x_test": np.ones((0, 2)), "y_test": np.zeros(0, int)},
     "the test set would have no rows (x_test has 0 rows)"),
    ({"x": np.ones((10, 2)), "y": np.arange(10) % 2, "x_test": np.ones((2, 2)), "y_test": np.array([0, 2**40])},
     "label 1099511627776 at row 1 of y_test is too large"),
])
def test_npz_errors(tmp_path, arrays, words):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(UserError) as e:
        import_file(tmp_path / "d.npz", tmp_path / "out", shards=1)
    assert words in str(e.value), str(e.value)


def test_no_test_rows_only_when_allowed_and_the_reader_says_so(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((40, 2)), y=np.arange(40) % 2)
    with pytest.raises(UserError, match=r"test set would have no rows \(--test-fraction 0.0 of 40 rows\).*"
                                        "--allow-no-test"):
        import_file(tmp_path / "d.npz", tmp_path / "a", test_fraction=0.0)
    with pytest.raises(UserError, match=r"test set would have no rows \(--test-fraction 0.01 of 40 rows\)"):
        import_file(tmp_path / "d.npz", tmp_path / "a", test_fraction=0.01)  # rounds to 0 rows
    with pytest.raises(UserError, match=r"no rows \(--test-rows 0\)"):
        make_synthetic(tmp_path / "s", rows=100, features=2, test_rows=0)
    with pytest.raises(UserError, match=r"no rows \(--test-fraction 0 of 1797 rows\)"):
        make_digits(tmp_path / "g", test_fraction=0)
    m = import_file(tmp_path / "d.npz", tmp_path / "a", test_fraction=0.0, allow_no_test=True)
    assert m["test"]["rows"] == 0 and "--allow-no-test" in m["made"]["command"]
    with open_dataset(tmp_path / "a", MPI.COMM_SELF, batch_size=4) as r:
        assert r.test_rows == 0 and r.has_test is False
    with open_dataset(tmp_path / "a", MPI.COMM_SELF, batch_size=4) as r, \
            open_dataset(_digits(tmp_path), MPI.COMM_SELF, batch_size=4) as d:
        assert d.has_test and d.test_rows == 359 and not r.has_test


def _digits(tmp_path):
    make_digits(tmp_path / "digits", shards=2)
    return tmp_path / "digits"


def test_a_test_fraction_that_leaves_no_training_rows(tmp_path):
    with pytest.raises(UserError, match=r"--test-fraction 0.9999 holds out all 1797 rows and leaves none for "
                                        r"training; use at most 0.9994"):
        make_digits(tmp_path / "g", test_fraction=0.9999)
    make_digits(tmp_path / "g", test_fraction=0.9994, shards=1)  # the suggestion works


def test_seed_must_not_be_negative(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((10, 2)), y=np.arange(10) % 2)
    for call in (lambda: make_digits(tmp_path / "g", seed=-1),
                 lambda: make_synthetic(tmp_path / "s", rows=100, features=2, seed=-1),
                 lambda: import_file(tmp_path / "d.npz", tmp_path / "o", seed=-1)):
        with pytest.raises(UserError, match=r"--seed must be a non-negative integer \(got -1\)"):
            call()


def test_regenerate_hint_names_where_the_set_is_now(tmp_path):
    """A copied set's hint must remake the copy, never overwrite the original with --force."""
    np.savez(tmp_path / "d.npz", x=np.ones((40, 2), np.float32), y=np.arange(40) % 2)
    for how, orig in (("make", tmp_path / "orig-digits"), ("import", tmp_path / "orig-import")):
        if how == "make":
            make_digits(orig, shards=2)
        else:
            import_file(tmp_path / "d.npz", orig, shards=2)
        copy = tmp_path / f"copy-{how}"
        shutil.copytree(orig, copy)
        (copy / "train-00001.h5").write_bytes(b"junk")
        with pytest.raises(UserError) as e:
            open_dataset(copy, MPI.COMM_SELF, batch_size=4)
        msg = str(e.value)
        assert f"--out {copy} " in msg and f"--out {orig} " not in msg and msg.endswith("--force`"), msg
        if how == "import":
            assert f"data import {tmp_path / 'd.npz'} " in msg, msg
