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
  import     .npz with arrays ``x`` [N, ...] and ``y`` [N] (optionally ``x_test`` and
             ``y_test``), or .csv with the label in the last column (header optional).
             The file is loaded into memory, shuffled (seeded), split, and sharded.
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


def _check_sizes(shards: int, train_rows: int, where) -> None:
    if not isinstance(shards, int) or shards < 1:
        raise UserError(f"{tag()} {where}: --shards must be at least 1 (got {shards})")
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
                 overwrite: bool = False, log=None, label: str = "writing") -> dict:
    """Shard in-memory arrays into ``out`` (train shards, test file, manifest). Returns the manifest."""
    n, d = x_train.shape
    _check_sizes(shards, n, out)
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


def _split(n: int, test_fraction: float, where) -> int:
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"{tag()} {where}: --test-fraction must be in [0, 1) (got {test_fraction})")
    return int(round(n * test_fraction))


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
                overwrite: bool = False, log=None) -> dict:
    """Write scikit-learn's 8x8 digits (x/16 in [0, 1]) as ``shards`` train shards + test.h5."""
    x, y = load_digits_arrays()
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng([int(seed), 0xD161]).permutation(len(y))
    x, y = x[perm], y[perm]
    nt = _split(len(y), test_fraction, out)
    argv = ["make", "digits", "--out", str(out), "--shards", str(shards), "--seed", str(seed),
            "--test-fraction", str(test_fraction)]
    made = _made("make digits", {"shards": shards, "seed": seed, "test_fraction": test_fraction},
                 argv)
    return write_arrays(out, x[nt:], y[nt:], x[:nt], y[:nt], shards=shards, classes=10,
                        made=made, overwrite=overwrite, log=log, label="making digits")


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
                   chunk_rows: int = 8192, overwrite: bool = False, log=None) -> dict:
    """Write a seeded synthetic classification set chunk by chunk (never all in memory)."""
    for name, v, least in (("--rows", rows, 1), ("--features", features, 1),
                           ("--classes", classes, 2), ("--test-rows", test_rows, 0),
                           ("--chunk-rows", chunk_rows, 1)):
        if not isinstance(v, int) or v < least:
            raise UserError(f"{tag()} {out}: {name} must be an integer >= {least} (got {v})")
    _check_sizes(shards, rows, out)
    out = _prepare_out(out, overwrite)
    teacher = Teacher(features, classes, seed)
    prog = Progress(rows + test_rows, "making synthetic", log)
    argv = ["make", "synthetic", "--out", str(out), "--rows", str(rows), "--features", str(features),
            "--classes", str(classes), "--seed", str(seed), "--shards", str(shards),
            "--test-rows", str(test_rows)]
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


# ----------------------------------------------------------------------------- import


def _labels(y, src) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise UserError(f"{tag()} {src}: labels must be one-dimensional (got shape {y.shape})")
    if y.dtype.kind in "iub":
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            bad = int(np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))[0])
            raise UserError(f"{tag()} {src}: label {y[bad]!r} at row {bad} is not an integer; "
                            "labels must be class numbers 0..classes-1")
        return y.astype(np.int64)
    raise UserError(f"{tag()} {src}: labels have dtype {y.dtype}; they must be integer class "
                    "numbers 0..classes-1")


def _features(x, src, name="x") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim < 2:
        raise UserError(f"{tag()} {src}: {name} must have one row per sample (shape [N, features] "
                        f"or [N, ...]), got shape {x.shape}")
    if x.dtype.kind not in "iufb":
        raise UserError(f"{tag()} {src}: {name} has dtype {x.dtype}; features must be numbers")
    x = x.reshape(len(x), -1)
    with np.errstate(over="ignore", invalid="ignore"):
        x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():
        bad = int(np.flatnonzero(~np.isfinite(x32).all(axis=1))[0])
        raise UserError(f"{tag()} {src}: {name} row {bad} contains NaN or Inf (or a value too "
                        "large for float32); clean the data before importing")
    return x32


def _read_npz(src: Path):
    try:
        z = np.load(src, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any failure to parse is the user's file
        raise UserError(f"{tag()} {src}: cannot read as .npz ({e})") from None
    with z:
        keys = set(z.files)
        if not {"x", "y"} <= keys:
            raise UserError(f"{tag()} {src}: an .npz to import needs arrays 'x' and 'y' "
                            f"(found: {', '.join(sorted(keys)) or 'none'})")
        try:
            x, y = z["x"], z["y"]
            test = (z["x_test"], z["y_test"]) if {"x_test", "y_test"} <= keys else None
        except ValueError as e:
            raise UserError(f"{tag()} {src}: {e}") from None
    return x, y, test


def _read_csv(src: Path):
    try:
        with open(src, newline="") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{tag()} {src}: cannot read ({e})") from None
    fields = [f.strip() for f in first.split(",")]
    try:
        [float(f) for f in fields]
        header = 0
    except ValueError:
        header = 1
    try:
        data = np.loadtxt(src, delimiter=",", skiprows=header, ndmin=2, dtype=np.float64)
    except ValueError as e:
        raise UserError(f"{tag()} {src}: not a numeric CSV ({e}); expected comma-separated "
                        "numbers with the label in the last column") from None
    if data.shape[1] < 2:
        raise UserError(f"{tag()} {src}: needs at least 2 columns (features..., label), "
                        f"found {data.shape[1]}")
    return data[:, :-1], data[:, -1], None


def import_file(src, out, *, shards: int = DEFAULT_SHARDS, seed: int = 0,
                test_fraction: float = 0.2, classes: int | None = None, shuffle: bool = True,
                overwrite: bool = False, log=None) -> dict:
    """Import ``src`` (.npz with x, y [, x_test, y_test]; or .csv, label last) into shards."""
    src = Path(src)
    if not src.is_file():
        raise UserError(f"{tag()} {src}: no such file")
    suffix = src.suffix.lower()
    if suffix == ".npz":
        x, y, test = _read_npz(src)
    elif suffix == ".csv":
        x, y, test = _read_csv(src)
    else:
        raise UserError(f"{tag()} {src}: unknown file type {suffix or '(none)'}; "
                        "import reads .npz (arrays x, y) or .csv (label in the last column)")
    x, y = _features(x, src), _labels(y, src)
    if len(x) != len(y):
        raise UserError(f"{tag()} {src}: x has {len(x)} rows but y has {len(y)}")
    if len(y) == 0:
        raise UserError(f"{tag()} {src}: holds no rows")
    if shuffle:
        perm = np.random.default_rng([int(seed), 0x1A9]).permutation(len(y))
        x, y = x[perm], y[perm]
    if test is not None:
        xt, yt = _features(test[0], src, "x_test"), _labels(test[1], src)
        if xt.shape[1] != x.shape[1] or len(xt) != len(yt):
            raise UserError(f"{tag()} {src}: x_test {xt.shape} / y_test {yt.shape} do not match "
                            f"x's {x.shape[1]} features")
    else:
        nt = _split(len(y), test_fraction, src)
        xt, yt, x, y = x[:nt], y[:nt], x[nt:], y[nt:]
    ymin = min(int(y.min()), int(yt.min()) if len(yt) else 0)
    ymax = max(int(y.max()), int(yt.max()) if len(yt) else 0)
    if ymin < 0:
        raise UserError(f"{tag()} {src}: negative label {ymin}; labels must be 0..classes-1")
    if classes is None:
        classes = ymax + 1
    elif ymax >= classes:
        raise UserError(f"{tag()} {src}: label {ymax} out of range for --classes {classes}")
    argv = ["import", str(src), "--out", str(out), "--shards", str(shards), "--seed", str(seed),
            "--test-fraction", str(test_fraction)]
    if not shuffle:
        argv.append("--no-shuffle")
    made = _made("import", {"source": str(src.resolve()), "shards": shards, "seed": seed,
                            "test_fraction": test_fraction if test is None else None,
                            "test_from_file": test is not None, "shuffle": shuffle}, argv)
    return write_arrays(out, x, y, xt, yt, shards=shards, classes=classes, made=made,
                        overwrite=overwrite, log=log, label=f"importing {src.name}")


def regenerate_hint(manifest: dict | None, path) -> str:
    """What to tell a user whose data set is damaged."""
    cmd = ((manifest or {}).get("made") or {}).get("command") if isinstance(manifest, dict) else None
    if isinstance(cmd, str) and cmd:
        return f"regenerate with `{cmd} --force`"
    return (f"regenerate it with `python -m mpitrain data make digits --out {path} --force` "
            f"(or `data import FILE --out {path} --force`); `python -m mpitrain data check {path}` "
            "lists every problem")
