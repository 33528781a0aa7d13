"""The on-disk format of a data set: HDF5 shards + ``manifest.json`` (pure, no MPI).

A data set is a directory::

    DIR/manifest.json       schema version, features, classes, shard list, test file,
                            checksums, how the set was made
    DIR/train-00000.h5      one HDF5 file per training shard
    DIR/train-00001.h5      ...
    DIR/test.h5             the held-out test set, same schema

Every ``.h5`` file holds

    x   float32 [rows, features]   chunked, row-major
    y   int64   [rows]             labels in [0, classes)

and the attributes ``format``, ``schema_version``, ``kind`` (train | test),
``features``, ``classes``, ``rows``, ``offset`` (first global row of the shard;
0 for the test file) and ``checksum``.

The checksum is ``"sha256:" + sha256(b"x" + sha256(x bytes) + b"y" + sha256(y bytes))``
over the little-endian bytes of x (row-major) and y, so it can be computed block by
block while streaming the rows in order.

Files are written atomically: to a hidden temporary name in the same directory,
flushed, fsync'ed, then renamed. The manifest is written last, so a crash leaves
either no manifest (the set does not exist yet) or a complete set.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

FORMAT = "mpitrain-shards"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TEST_FILE = "test.h5"
TMP_MARK = ".tmp-"
X_DTYPE = np.dtype("<f4")
Y_DTYPE = np.dtype("<i8")
CHUNK_BYTES = 1 << 20  # HDF5 chunk size target for x
BLOCK_BYTES = 2 << 20  # rows read at a time when scanning / streaming


def shard_name(i: int) -> str:
    return f"train-{i:05d}.h5"


def is_shard_name(name: str) -> bool:
    return name.startswith("train-") and name.endswith(".h5") and name[6:-3].isdigit()


def split_bounds(n: int, k: int) -> list[tuple[int, int]]:
    """``k`` contiguous [lo, hi) ranges over ``n`` rows; sizes differ by at most one."""
    q, r = divmod(n, k)
    out, lo = [], 0
    for i in range(k):
        hi = lo + q + (1 if i < r else 0)
        out.append((lo, hi))
        lo = hi
    return out


def block_rows_for(features: int, batch_size: int = 1) -> int:
    """Rows per streamed block: about BLOCK_BYTES of x, at least one batch."""
    rows = BLOCK_BYTES // max(1, 4 * features)
    return max(int(batch_size), min(65536, max(256, rows)))


class DataProblem(Exception):
    """A problem with one file of a data set (turned into a rank-tagged UserError by callers)."""

    def __init__(self, file, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file = str(file)
        self.reason = reason


class Checksum:
    """Incremental content checksum; update with consecutive row blocks in order."""

    def __init__(self):
        self._x = hashlib.sha256()
        self._y = hashlib.sha256()

    def update(self, x, y) -> None:
        self._x.update(np.ascontiguousarray(x, dtype=X_DTYPE).data)
        self._y.update(np.ascontiguousarray(y, dtype=Y_DTYPE).data)

    def hexdigest(self) -> str:
        h = hashlib.sha256(b"x" + self._x.digest() + b"y" + self._y.digest())
        return "sha256:" + h.hexdigest()


def checksum_of(x, y) -> str:
    c = Checksum()
    c.update(x, y)
    return c.hexdigest()


# ----------------------------------------------------------------------------- writing


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def check_block(x, y, classes: int, where: str, first_row: int = 0) -> None:
    """Raise DataProblem(where, ...) if labels are out of range or x is not finite.

    Row numbers in the message are rows of the file (``first_row`` is the block's first).
    """
    if y.size:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= classes:
            bad = int(np.flatnonzero((y < 0) | (y >= classes))[0])
            found = int(y[bad])
            raise DataProblem(where, f"labels out of range (found {found} at row "
                                     f"{first_row + bad}, classes={classes})")
    if x.size and not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise DataProblem(where, f"features contain NaN or Inf (first at row {first_row + bad})")


class ShardWriter:
    """Write one ``.h5`` file of a known number of rows, block by block, atomically.

    Use as a context manager: on an exception the temporary file is removed and
    nothing appears under the final name.
    """

    def __init__(self, path, *, rows: int, features: int, classes: int, offset: int = 0,
                 kind: str = "train"):
        import h5py

        self.path = Path(path)
        self.rows, self.features, self.classes = int(rows), int(features), int(classes)
        self.offset, self.kind = int(offset), kind
        self.written = 0
        self._sum = Checksum()
        self._tmp = tmp_name(self.path)
        self._f = h5py.File(self._tmp, "w")
        chunk = None
        if self.rows > 0:
            crow = max(1, min(self.rows, CHUNK_BYTES // max(1, 4 * self.features)))
            chunk = (crow, max(1, self.features))
        self._x = self._f.create_dataset("x", (self.rows, self.features), dtype=X_DTYPE,
                                         chunks=chunk if self.features > 0 else None)
        self._y = self._f.create_dataset("y", (self.rows,), dtype=Y_DTYPE,
                                         chunks=(chunk[0],) if chunk else None)
        self.checksum = None

    def write(self, x, y) -> None:
        """Append rows (validated: shape, finite features, labels in range)."""
        x = np.ascontiguousarray(x, dtype=X_DTYPE)
        y = np.ascontiguousarray(y, dtype=Y_DTYPE)
        n = len(y)
        if x.shape != (n, self.features):
            raise ValueError(f"block of shape {x.shape} does not match {n} x {self.features}")
        if self.written + n > self.rows:
            raise ValueError(f"{self.path}: more rows written than declared ({self.rows})")
        check_block(x, y, self.classes, self.path, self.written)
        if n:
            self._x[self.written:self.written + n] = x
            self._y[self.written:self.written + n] = y
            self._sum.update(x, y)
        self.written += n

    def close(self) -> str:
        """Finish the file: attributes, flush, fsync, rename. Returns the checksum."""
        if self.written != self.rows:
            raise ValueError(f"{self.path}: {self.written} rows written, {self.rows} declared")
        self.checksum = self._sum.hexdigest()
        a = self._f.attrs
        a["format"] = FORMAT
        a["schema_version"] = SCHEMA_VERSION
        a["kind"] = self.kind
        a["features"] = self.features
        a["classes"] = self.classes
        a["rows"] = self.rows
        a["offset"] = self.offset
        a["checksum"] = self.checksum
        self._f.flush()
        self._f.close()
        _fsync_path(self._tmp)
        os.replace(self._tmp, self.path)
        _fsync_path(self.path.parent)
        return self.checksum

    def abort(self) -> None:
        try:
            self._f.close()
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def write_json_atomic(path, obj) -> None:
    path = Path(path)
    tmp = tmp_name(path)
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


# ----------------------------------------------------------------------------- reading

_REQUIRED = {"format": str, "schema_version": int, "features": int, "classes": int,
             "train_rows": int, "shards": list, "test": dict}


def read_manifest(dirpath) -> dict:
    """Load and validate ``DIR/manifest.json``; raise DataProblem naming the reason."""
    d = Path(dirpath)
    if not d.exists():
        raise DataProblem(d, "no such directory")
    if not d.is_dir():
        raise DataProblem(d, "not a directory")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise DataProblem(mpath, "missing (not an mpitrain data set, or its creation was "
                                 "interrupted before it finished)")
    try:
        with open(mpath) as fh:
            m = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataProblem(mpath, f"unreadable ({e})") from None
    if not isinstance(m, dict):
        raise DataProblem(mpath, "not a JSON object")
    for key, typ in _REQUIRED.items():
        if key not in m:
            raise DataProblem(mpath, f"missing key {key!r}")
        if not isinstance(m[key], typ) or (typ is int and isinstance(m[key], bool)):
            raise DataProblem(mpath, f"key {key!r} should be {typ.__name__}, "
                                     f"got {type(m[key]).__name__}")
    if m["format"] != FORMAT:
        raise DataProblem(mpath, f"format is {m['format']!r}, expected {FORMAT!r}")
    if m["schema_version"] != SCHEMA_VERSION:
        raise DataProblem(mpath, f"schema version {m['schema_version']} is not supported "
                                 f"(this mpitrain reads version {SCHEMA_VERSION})")
    if m["features"] < 1 or m["classes"] < 1:
        raise DataProblem(mpath, f"features={m['features']}, classes={m['classes']}: "
                                 "both must be at least 1")
    if not m["shards"]:
        raise DataProblem(mpath, "lists no shards")
    offset = 0
    for i, s in enumerate(m["shards"]):
        _check_entry(mpath, f"shards[{i}]", s)
        if s["offset"] != offset:
            raise DataProblem(mpath, f"shards[{i}] ({s['file']}) has offset {s['offset']}, "
                                     f"expected {offset} (shards must be contiguous)")
        offset += s["rows"]
    if offset != m["train_rows"]:
        raise DataProblem(mpath, f"shards hold {offset} rows but train_rows={m['train_rows']}")
    _check_entry(mpath, "test", m["test"], with_offset=False)
    return m


def _check_entry(mpath, what, s, with_offset=True) -> None:
    keys = {"file": str, "rows": int, "checksum": str}
    if with_offset:
        keys["offset"] = int
    if not isinstance(s, dict):
        raise DataProblem(mpath, f"{what} is not an object")
    for k, t in keys.items():
        if not isinstance(s.get(k), t) or isinstance(s.get(k), bool):
            raise DataProblem(mpath, f"{what}: missing or invalid {k!r}")
    if s["rows"] < 0 or (with_offset and s["offset"] < 0):
        raise DataProblem(mpath, f"{what}: negative rows or offset")
    if "/" in s["file"] or "\\" in s["file"] or s["file"] in ("", ".", ".."):
        raise DataProblem(mpath, f"{what}: file name {s['file']!r} must be a plain name in the directory")


def open_checked(path, *, manifest: dict, entry: dict, kind: str):
    """Open one ``.h5`` file read-only and check its structure and attributes cheaply.

    Checks: the file opens (not truncated, is HDF5), has ``x`` float32 [rows, features]
    and ``y`` int64 [rows], and its attributes agree with the manifest (schema version,
    features, classes, rows, offset, checksum). Reads no rows. Returns the open h5py.File.
    """
    return open_h5(path, lambda f, p: _check_structure(f, p, manifest, entry, kind))


def open_h5(path, check):
    """Open an HDF5 file listed in a manifest read-only, run ``check(f, path)`` (raising DataProblem),
    close it again on any failure; the open h5py.File. Shared by rows, graphs and tokens."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise DataProblem(path, "missing (listed in manifest.json)")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        msg = str(e).split("(")[-1].rstrip(")") if "(" in str(e) else str(e)
        raise DataProblem(path, f"unreadable: truncated or not an HDF5 file ({msg})") from None
    try:
        check(f, path)
    except BaseException:
        f.close()
        raise
    return f


def _check_structure(f, path, manifest, entry, kind) -> None:
    import h5py

    D, C, rows = manifest["features"], manifest["classes"], entry["rows"]
    for name in ("x", "y"):
        if name not in f or not isinstance(f[name], h5py.Dataset):
            raise DataProblem(path, f"has no dataset {name!r}")
    x, y = f["x"], f["y"]
    if x.dtype != np.float32:
        raise DataProblem(path, f"x has dtype {x.dtype}, expected float32")
    if y.dtype != np.int64:
        raise DataProblem(path, f"y has dtype {y.dtype}, expected int64")
    if x.ndim != 2 or x.shape[1] != D:
        raise DataProblem(path, f"x has shape {x.shape}, expected ({rows}, {D})")
    if y.ndim != 1:
        raise DataProblem(path, f"y has shape {y.shape}, expected ({rows},)")
    if x.shape[0] != y.shape[0]:
        raise DataProblem(path, f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    if x.shape[0] != rows:
        raise DataProblem(path, f"holds {x.shape[0]} rows, manifest.json says {rows}")
    a = f.attrs
    want = {"schema_version": SCHEMA_VERSION, "features": D, "classes": C, "rows": rows,
            "offset": entry.get("offset", 0)}
    for k, v in want.items():
        if k not in a:
            raise DataProblem(path, f"attribute {k!r} missing")
        got = a[k]
        try:
            got = int(got)
        except (TypeError, ValueError):
            raise DataProblem(path, f"attribute {k!r} = {got!r} is not an integer") from None
        if got != v:
            what = "schema mismatch: " if k in ("schema_version", "features", "classes") else ""
            raise DataProblem(path, f"{what}attribute {k}={got}, manifest.json says {v}")
    if "kind" in a and _s(a["kind"]) != kind:
        raise DataProblem(path, f"is a {_s(a['kind'])} file, expected {kind}")
    if _s(a.get("checksum", "")) != entry["checksum"]:
        raise DataProblem(path, "checksum attribute differs from manifest.json (the file "
                                "belongs to another data set or was rewritten)")


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def scan(f, path, lo: int, hi: int, *, classes: int, block_rows: int = 8192,
         checksum: bool = False):
    """Read rows [lo, hi) of an open file in blocks: labels in range, finite features.

    With ``checksum=True`` (only meaningful for lo=0, hi=rows) returns the content
    checksum, else None. Raises DataProblem on the first bad row (its row in the file).
    """
    x, y = f["x"], f["y"]
    c = Checksum() if checksum else None
    D = x.shape[1]
    buf = np.empty((min(block_rows, max(hi - lo, 0)), D), dtype=np.float32)
    for a in range(lo, hi, block_rows):
        b = min(a + block_rows, hi)
        xb = buf[: b - a]
        try:
            x.read_direct(xb, np.s_[a:b], np.s_[0:b - a])
            yb = y[a:b]
        except (OSError, ValueError, RuntimeError) as e:
            raise DataProblem(path, f"unreadable rows {a}..{b} ({e}); the file is damaged") from None
        check_block(xb, yb, classes, path, a)
        if c is not None:
            c.update(xb, yb)
    return c.hexdigest() if c is not None else None
