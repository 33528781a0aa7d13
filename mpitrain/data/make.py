"""Making data sets: the built-in digits and synthetic sets, and importing .npz / .csv files.

Everything here is serial (one process writes); under MPI the callers run it on
rank 0 while the others wait (see ``reader.run_on_root``).

  digits     the 1797 8x8 handwritten digits bundled inside scikit-learn (no
             download), features scaled to [0, 1] (x / 16), split by a seeded
             permutation into train shards and a held-out test file.
  synthetic  a seeded classification set of any size: x ~ N(0, 1), labels from a
             random teacher network (tanh hidden layer, class biases balanced on a
             calibration sample). Rows are generated in fixed units of 1024, each
             seeded by (seed, unit), and written chunk by chunk -- the set never has
             to fit in memory, and its contents do not depend on --chunk-rows or
             --shards. Training rows come first, test rows after them.
  import     (importer.py) .npz or .csv files of your own, loaded, shuffled, split, sharded.

A set whose test split would be empty is refused unless ``allow_no_test`` is given
(``--allow-no-test``): training would otherwise report a test accuracy it never measured.
The reader exposes ``test_rows`` (0 for such a set) and ``has_test``.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import shlex
import time
from pathlib import Path

import numpy as np

from ..runtime import UserError, tag
from .shards import (FORMAT, MANIFEST, SCHEMA_VERSION, TEST_FILE, TMP_MARK, ShardWriter,
                     is_shard_name, shard_name, split_bounds, write_json_atomic)

DEFAULT_SHARDS = 4
BUILTINS = ("digits", "synthetic", "graphs")
GEN_UNIT = 1024  # synthetic rows generated per seeded unit
PROGRESS_EVERY = 1.0  # seconds between progress lines


class Progress:
    """Progress lines for long work: at most one per ``every`` seconds, plus a final one."""

    def __init__(self, total: int, label: str, log=None, every: float | None = None):
        self.total, self.label, self.log = max(int(total), 1), label, log
        self.every = PROGRESS_EVERY if every is None else every
        self.t0 = self.last = time.perf_counter()
        self.done = 0
        self.printed = False

    def add(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.log is not None and now - self.last >= self.every and self.done < self.total:
            self.last = now
            self.printed = True
            pct = 100.0 * self.done / self.total
            self.log(f"{self.label}: {pct:5.1f}% ({self.done}/{self.total} rows, "
                     f"{now - self.t0:.1f} s)")

    def finish(self, what: str) -> None:
        if self.log is not None:
            self.log(f"{self.label}: {what} in {time.perf_counter() - self.t0:.1f} s")


def _command(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in ["python", "-m", "mpitrain", "data", *argv])


def _made(how: str, params: dict, argv: list[str]) -> dict:
    from .. import __version__

    return {"how": how, "params": params, "command": _command(argv),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "mpitrain": __version__}


def _prepare_out(out, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{tag()} {out}: exists and is not a directory; choose another --out")
    if (out / MANIFEST).exists() and not overwrite:
        raise UserError(f"{tag()} {out}: already holds a data set ({MANIFEST}); pass --force "
                        "to replace it, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{tag()} {out}: cannot create the directory ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"{tag()} {out}: directory is not writable; choose another --out")
    # The old manifest goes first: from here until the new one is written the
    # directory does not look like a complete data set.
    try:
        (out / MANIFEST).unlink()
    except FileNotFoundError:
        pass
    for p in out.iterdir():  # temporaries left by a crashed writer
        if p.name.startswith(".") and TMP_MARK in p.name:
            p.unlink(missing_ok=True)
    return out


def check_seed(seed, where) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"{tag()} {where}: --seed must be a non-negative integer (got {seed!r})")


def check_test_rows(test_rows: int, where, how: str, allow_no_test: bool) -> None:
    """A set without test rows only when asked for: training could not measure test accuracy."""
    if test_rows == 0 and not allow_no_test:
        raise UserError(f"{tag()} {where}: the test set would have no rows ({how}), so training could not "
                        "measure test accuracy; hold out some rows, or pass --allow-no-test to make a set "
                        "without a test set")


def _check_sizes(shards: int, train_rows: int, where) -> None:
    if not isinstance(shards, int) or shards < 1:
        raise UserError(f"{tag()} {where}: --shards must be at least 1 (got {shards})")
    if train_rows < 1:
        raise UserError(f"{tag()} {where}: no training rows are left; hold out fewer rows for the test set")
    if shards > train_rows:
        raise UserError(f"{tag()} {where}: {shards} shards requested but only {train_rows} "
                        f"training rows; use --shards {max(1, train_rows)} or fewer")


def _finish(out: Path, *, features, classes, shard_entries, test_entry, made) -> dict:
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "features": int(features),
        "classes": int(classes),
        "train_rows": int(sum(s["rows"] for s in shard_entries)),
        "shards": shard_entries,
        "test": test_entry,
        "made": made,
    }
    write_json_atomic(out / MANIFEST, manifest)
    keep = {s["file"] for s in shard_entries}
    for p in out.iterdir():  # shards of an older, larger set in the same directory
        if is_shard_name(p.name) and p.name not in keep:
            p.unlink(missing_ok=True)
    return manifest


def write_arrays(out, x_train, y_train, x_test, y_test, *, shards: int, classes: int, made: dict,
                 overwrite: bool = False, log=None, label: str = "writing", allow_no_test: bool = False,
                 test_how: str = "") -> dict:
    """Shard in-memory arrays into ``out`` (train shards, test file, manifest). Returns the manifest."""
    n, d = x_train.shape
    _check_sizes(shards, n, out)
    check_test_rows(len(y_test), out, test_how or "0 test rows", allow_no_test)
    out = _prepare_out(out, overwrite)
    prog = Progress(n + len(y_test), label, log)
    entries = []
    step = max(1, (4 << 20) // max(1, 4 * d))
    for i, (lo, hi) in enumerate(split_bounds(n, shards)):
        name = shard_name(i)
        with ShardWriter(out / name, rows=hi - lo, features=d, classes=classes, offset=lo) as w:
            for a in range(lo, hi, step):
                b = min(a + step, hi)
                w.write(x_train[a:b], y_train[a:b])
                prog.add(b - a)
            entries.append({"file": name, "rows": hi - lo, "offset": lo, "checksum": w.close()})
    with ShardWriter(out / TEST_FILE, rows=len(y_test), features=d, classes=classes,
                     kind="test") as w:
        w.write(x_test, y_test)
        test_entry = {"file": TEST_FILE, "rows": len(y_test), "checksum": w.close()}
    prog.add(len(y_test))
    manifest = _finish(out, features=d, classes=classes, shard_entries=entries,
                       test_entry=test_entry, made=made)
    prog.finish(f"{n} train rows in {shards} shards + {len(y_test)} test rows -> {out}")
    return manifest


def split_rows(n: int, test_fraction: float, where) -> int:
    """Rows held out for the test set; at least one row must be left for training."""
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"{tag()} {where}: --test-fraction must be in [0, 1) (got {test_fraction})")
    nt = int(round(n * test_fraction))
    if nt >= n:
        raise UserError(f"{tag()} {where}: --test-fraction {test_fraction} holds out all {n} rows and leaves "
                        f"none for training; use at most {(n - 1) / n:.4g} (at most {n - 1} test rows)")
    return nt


# ----------------------------------------------------------------------------- digits


def load_digits_arrays():
    """(x float64 [1797, 64] in 0..16, y int64) from the csv bundled in scikit-learn."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            p = Path(root) / "datasets" / "data" / "digits.csv.gz"
            if p.is_file():
                data = np.loadtxt(p, delimiter=",")
                return data[:, :-1], data[:, -1].astype(np.int64)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError(f"{tag()} the digits data set ships with scikit-learn, which is not "
                        "installed; run `pip install scikit-learn`") from None
    d = load_digits()
    return d.data, d.target.astype(np.int64)


def make_digits(out, *, shards: int = DEFAULT_SHARDS, seed: int = 0, test_fraction: float = 0.2,
                overwrite: bool = False, log=None, allow_no_test: bool = False) -> dict:
    """Write scikit-learn's 8x8 digits (x/16 in [0, 1]) as ``shards`` train shards + test.h5."""
    check_seed(seed, out)
    x, y = load_digits_arrays()
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng([int(seed), 0xD161]).permutation(len(y))
    x, y = x[perm], y[perm]
    nt = split_rows(len(y), test_fraction, out)
    argv = ["make", "digits", "--out", str(out), "--shards", str(shards), "--seed", str(seed),
            "--test-fraction", str(test_fraction)] + (["--allow-no-test"] if allow_no_test else [])
    made = _made("make digits", {"shards": shards, "seed": seed, "test_fraction": test_fraction},
                 argv)
    return write_arrays(out, x[nt:], y[nt:], x[:nt], y[:nt], shards=shards, classes=10,
                        made=made, overwrite=overwrite, log=log, label="making digits",
                        allow_no_test=allow_no_test, test_how=f"--test-fraction {test_fraction} of {len(y)} rows")


# ----------------------------------------------------------------------------- synthetic


class Teacher:
    """A random one-hidden-layer tanh network; label = argmax of its (balanced) logits."""

    def __init__(self, features: int, classes: int, seed: int, hidden: int = 32):
        rng = np.random.default_rng([int(seed), 0x7EAC])
        self.w1 = (rng.standard_normal((features, hidden)) / np.sqrt(features)).astype(np.float32)
        self.b1 = (0.5 * rng.standard_normal(hidden)).astype(np.float32)
        self.w2 = (rng.standard_normal((hidden, classes)) * 2.0 / np.sqrt(hidden)).astype(np.float32)
        self.b2 = np.zeros(classes, dtype=np.float32)
        calib = np.random.default_rng([int(seed), 0xCA1B]).standard_normal(
            (4096, features), dtype=np.float32)
        self.b2 = -self.logits(calib).mean(axis=0)

    def logits(self, x):
        return np.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2

    def labels(self, x):
        return np.argmax(self.logits(x), axis=1).astype(np.int64)


def synthetic_rows(teacher: Teacher, seed: int, features: int, lo: int, hi: int):
    """Rows [lo, hi) of the synthetic stream (the same whatever the chunking)."""
    xs, ys = [], []
    for u in range(lo // GEN_UNIT, (hi + GEN_UNIT - 1) // GEN_UNIT):
        a, b = max(lo, u * GEN_UNIT), min(hi, (u + 1) * GEN_UNIT)
        x = np.random.default_rng([int(seed), 1, u]).standard_normal(
            (GEN_UNIT, features), dtype=np.float32)[a - u * GEN_UNIT:b - u * GEN_UNIT]
        xs.append(x)
        ys.append(teacher.labels(x))
    if not xs:
        return np.empty((0, features), np.float32), np.empty(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def make_synthetic(out, *, rows: int = 20000, features: int = 256, classes: int = 10,
                   seed: int = 0, shards: int = DEFAULT_SHARDS, test_rows: int = 4000,
                   chunk_rows: int = 8192, overwrite: bool = False, log=None,
                   allow_no_test: bool = False) -> dict:
    """Write a seeded synthetic classification set chunk by chunk (never all in memory)."""
    check_seed(seed, out)
    for name, v, least in (("--rows", rows, 1), ("--features", features, 1),
                           ("--classes", classes, 2), ("--test-rows", test_rows, 0),
                           ("--chunk-rows", chunk_rows, 1)):
        if not isinstance(v, int) or v < least:
            raise UserError(f"{tag()} {out}: {name} must be an integer >= {least} (got {v})")
    _check_sizes(shards, rows, out)
    check_test_rows(test_rows, out, "--test-rows 0", allow_no_test)
    out = _prepare_out(out, overwrite)
    teacher = Teacher(features, classes, seed)
    prog = Progress(rows + test_rows, "making synthetic", log)
    argv = ["make", "synthetic", "--out", str(out), "--rows", str(rows), "--features", str(features),
            "--classes", str(classes), "--seed", str(seed), "--shards", str(shards),
            "--test-rows", str(test_rows)] + (["--allow-no-test"] if allow_no_test else [])
    made = _made("make synthetic", {"rows": rows, "features": features, "classes": classes,
                                    "seed": seed, "shards": shards, "test_rows": test_rows,
                                    "teacher": "tanh MLP, 32 hidden"}, argv)

    def fill(w: ShardWriter, lo: int, hi: int):
        for a in range(lo, hi, chunk_rows):
            b = min(a + chunk_rows, hi)
            w.write(*synthetic_rows(teacher, seed, features, a, b))
            prog.add(b - a)
        return w.close()

    entries = []
    for i, (lo, hi) in enumerate(split_bounds(rows, shards)):
        with ShardWriter(out / shard_name(i), rows=hi - lo, features=features, classes=classes,
                         offset=lo) as w:
            entries.append({"file": shard_name(i), "rows": hi - lo, "offset": lo,
                            "checksum": fill(w, lo, hi)})
    with ShardWriter(out / TEST_FILE, rows=test_rows, features=features, classes=classes,
                     kind="test") as w:
        test_entry = {"file": TEST_FILE, "rows": test_rows,
                      "checksum": fill(w, rows, rows + test_rows)}
    manifest = _finish(out, features=features, classes=classes, shard_entries=entries,
                       test_entry=test_entry, made=made)
    prog.finish(f"{rows} x {features} train rows in {shards} shards + {test_rows} test rows -> {out}")
    return manifest


def regenerate_hint(manifest: dict | None, path) -> str:
    """What to tell a user whose data set (in directory ``path``) is damaged.

    The manifest's command names the directory the set was made in; a set copied or moved
    since must be remade where it is now, never over the original, so ``--out`` is
    rewritten to ``path`` (and an imported file to the absolute path it was read from).
    """
    made = ((manifest or {}).get("made") or {}) if isinstance(manifest, dict) else {}
    cmd = made.get("command") if isinstance(made, dict) else None
    if isinstance(cmd, str) and cmd:
        try:
            argv = shlex.split(cmd)
        except ValueError:
            argv = []
        if "--out" in argv[:-1]:
            argv[argv.index("--out") + 1] = str(path)
            source = (made.get("params") or {}).get("source") if isinstance(made.get("params"), dict) else None
            if len(argv) > 5 and argv[3:5] == ["data", "import"] and isinstance(source, str) and source:
                argv[5] = source
            return f"regenerate with `{' '.join(shlex.quote(a) for a in argv)} --force`"
    return (f"regenerate it with `python -m mpitrain data make digits --out {path} --force` "
            f"(or `data import FILE --out {path} --force`); `python -m mpitrain data check {path}` "
            "lists every problem")
