"""``data import``: your own .npz or .csv file -> shards (serial; the CLI runs it on rank 0).

  .npz  arrays ``x`` [N, ...] (flattened to [N, D]) and ``y`` [N] integer labels 0..C-1;
        optional ``x_test``/``y_test`` become the test set.
  .csv  comma-separated numbers, one row per sample, the label in the last column. UTF-8
        (a byte-order mark is dropped), any line ends (LF, CRLF, CR), blank lines skipped.
        The first line is a header when it is not all numbers, or when it is the column
        numbers 0..K-1 (or 1..K) that pandas writes for unnamed columns; a header whose
        first name is empty (pandas' index column) with row numbers below it drops that
        column. What was taken as a header, and how many rows were read, is logged.

The file is loaded into memory, shuffled (seeded), split into train/test and sharded.
Labels are checked before any conversion (1e20 or 2**63+5 are reported as themselves).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..runtime import UserError, tag
from .make import DEFAULT_SHARDS, _made, check_seed, split_rows, write_arrays

MAX_CLASSES = 2**24  # labels beyond this are not class numbers
_INT = re.compile(r"[0-9]+")


def _labels(y, src, name="y", at=None) -> np.ndarray:
    """Integer class labels, checked in their own dtype; ``at(i)`` names row i in messages."""
    at = at or (lambda i: f"row {i} of {name}")
    y = np.asarray(y)
    if y.ndim != 1:
        raise UserError(f"{tag()} {src}: labels must be one-dimensional (got shape {y.shape})")
    if y.dtype.kind not in "iubf":
        raise UserError(f"{tag()} {src}: labels have dtype {y.dtype}; they must be integer class "
                        "numbers 0..classes-1")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserError(f"{tag()} {src}: label {y[i]!r} at {at(i)} is not an integer; "
                            "labels must be class numbers 0..classes-1")
    if len(y):  # compared in the labels' own dtype: no wrap-around before the check
        i, j = int(np.argmin(y)), int(np.argmax(y))
        if y[i] < 0:
            raise UserError(f"{tag()} {src}: negative label {_num(y[i])} at {at(i)}; labels "
                            "must be class numbers 0..classes-1")
        if y[j] >= MAX_CLASSES:
            raise UserError(f"{tag()} {src}: label {_num(y[j])} at {at(j)} is too large: labels "
                            f"are class numbers 0..classes-1, with at most {MAX_CLASSES} (2**24) classes")
    return y.astype(np.int64)


def _num(v) -> str:
    """A label as the user wrote it: 1e+20, 9223372036854775813, -1."""
    v = v.item()
    return repr(int(v)) if isinstance(v, float) and abs(v) < 1e16 else repr(v)


def _features(x, src, name="x") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim < 2:
        raise UserError(f"{tag()} {src}: {name} must have one row per sample (shape [N, features] "
                        f"or [N, ...]), got shape {x.shape}")
    if x.dtype.kind not in "iufb":
        raise UserError(f"{tag()} {src}: {name} has dtype {x.dtype}; features must be numbers")
    x = x.reshape(len(x), int(np.prod(x.shape[1:])))
    if x.shape[1] == 0:
        raise UserError(f"{tag()} {src}: {name} has 0 features per row (shape {x.shape}); each "
                        "sample needs at least one feature")
    with np.errstate(over="ignore", invalid="ignore"):
        x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():
        bad = int(np.flatnonzero(~np.isfinite(x32).all(axis=1))[0])
        raise UserError(f"{tag()} {src}: {name} row {bad} contains NaN or Inf (or a value too "
                        "large for float32); clean the data before importing")
    return x32


def _read_npz(src: Path, log=None):
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
    if log is not None:
        log(f"importing {src.name}: read x {tuple(x.shape)}, y {tuple(y.shape)}"
            + (f", x_test {tuple(test[0].shape)}, y_test {tuple(test[1].shape)}" if test else ""))
    return x, y, test


def _numeric(fields: list[str]) -> bool:
    try:
        [float(f) for f in fields]
        return True
    except ValueError:
        return False


def _is_header(fields: list[str]) -> tuple[bool, str]:
    """(is the first line a header?, why) -- see the module docstring."""
    if not _numeric(fields):
        return True, "not all numbers"
    if len(fields) >= 3 and all(_INT.fullmatch(f) for f in fields):
        start = int(fields[0])
        if start in (0, 1) and [int(f) for f in fields] == list(range(start, start + len(fields))):
            return True, f"the column numbers {start}..{start + len(fields) - 1}, as pandas writes them"
    return False, ""


def _text_lines(src: Path) -> tuple[list[tuple[int, str]], list[str]]:
    """Non-blank lines with their 1-based line numbers, and notes (BOM, line ends)."""
    try:
        raw = src.read_bytes()
    except OSError as e:
        raise UserError(f"{tag()} {src}: cannot read ({e.strerror or e})") from None
    notes = []
    if raw.startswith(b"\xef\xbb\xbf"):
        notes.append("UTF-8 byte-order mark dropped")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{tag()} {src}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "save it as UTF-8 CSV") from None
    if "\r\n" in text:
        notes.append("CRLF line ends")
    lines = [(i + 1, ln) for i, ln in enumerate(re.split(r"\r\n|\r|\n", text)) if ln.strip()]
    return lines, notes


def _parse_rows(src: Path, lines: list[tuple[int, str]]) -> np.ndarray:
    try:
        return np.loadtxt([ln for _, ln in lines], delimiter=",", ndmin=2, dtype=np.float64)
    except ValueError:
        pass
    width = len(lines[0][1].split(","))
    for no, ln in lines:  # the failure path only: find the line and say what is wrong with it
        fields = ln.split(",")
        if len(fields) != width:
            raise UserError(f"{tag()} {src}: line {no} has {len(fields)} columns, line {lines[0][0]} has "
                            f"{width}; every row needs the same columns (features..., label)") from None
        for col, f in enumerate(fields, 1):
            try:
                float(f)
            except ValueError:
                raise UserError(f"{tag()} {src}: not a numeric CSV: line {no}, column {col} is {f.strip()!r}; "
                                "expected comma-separated numbers with the label in the last column") from None
    raise UserError(f"{tag()} {src}: not a numeric CSV; expected comma-separated numbers with the label "
                    "in the last column")


def _read_csv(src: Path, log=None):
    say = log or (lambda s: None)
    lines, notes = _text_lines(src)
    if not lines:
        raise UserError(f"{tag()} {src}: is empty (no rows); expected comma-separated numbers, one row "
                        "per sample, the label in the last column")
    fields = [f.strip() for f in lines[0][1].split(",")]
    header, why = _is_header(fields)
    if header:
        shown = [f or "''" for f in fields]
        names = ", ".join(shown[:4]) + (f", ..., {shown[-1]}" if len(shown) > 5 else
                                        "".join(f", {f}" for f in shown[4:]))
        say(f"importing {src.name}: line {lines[0][0]} taken as a header ({why}): {names}")
        lines = lines[1:]
        if not lines:
            raise UserError(f"{tag()} {src}: holds a header line but no data rows")
    else:
        say(f"importing {src.name}: no header (line {lines[0][0]} is data)")
    data = _parse_rows(src, lines)
    if header and fields[0] == "" and data.shape[1] > 2 and np.array_equal(data[:, 0], np.round(data[:, 0])) \
            and len(np.unique(data[:, 0])) == len(data):
        say(f"importing {src.name}: column 1 has no name and holds distinct row numbers (a pandas index): "
            "dropped; write the CSV with index=False to leave it out")
        data = data[:, 1:]
    if data.shape[1] < 2:
        raise UserError(f"{tag()} {src}: needs at least 2 columns (features..., label), "
                        f"found {data.shape[1]}")
    d = data.shape[1] - 1
    say(f"importing {src.name}: read {len(data)} rows x {d} feature{'s' if d != 1 else ''} + label"
        + (f" ({', '.join(notes)})" if notes else ""))
    return data[:, :-1], _labels(data[:, -1], src, at=lambda i: f"line {lines[i][0]}"), None


def import_file(src, out, *, shards: int = DEFAULT_SHARDS, seed: int = 0,
                test_fraction: float = 0.2, classes: int | None = None, shuffle: bool = True,
                overwrite: bool = False, log=None, allow_no_test: bool = False) -> dict:
    """Import ``src`` (.npz with x, y [, x_test, y_test]; or .csv, label last) into shards."""
    src = Path(src)
    if not src.is_file():
        raise UserError(f"{tag()} {src}: no such file")
    check_seed(seed, src)
    suffix = src.suffix.lower()
    if suffix == ".npz":
        x, y, test = _read_npz(src, log)
    elif suffix == ".csv":
        x, y, test = _read_csv(src, log)
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
        xt, yt = _features(test[0], src, "x_test"), _labels(test[1], src, "y_test")
        if xt.shape[1] != x.shape[1] or len(xt) != len(yt):
            raise UserError(f"{tag()} {src}: x_test {xt.shape} / y_test {yt.shape} do not match "
                            f"x's {x.shape[1]} features")
        how = "x_test has 0 rows"
    else:
        nt = split_rows(len(y), test_fraction, src)
        xt, yt, x, y = x[:nt], y[:nt], x[nt:], y[nt:]
        how = f"--test-fraction {test_fraction} of {len(y) + nt} rows"
    classes = _classes(src, y, yt, classes)
    argv = ["import", str(src), "--out", str(out), "--shards", str(shards), "--seed", str(seed),
            "--test-fraction", str(test_fraction)]
    argv += (["--no-shuffle"] if not shuffle else []) + (["--allow-no-test"] if allow_no_test else [])
    made = _made("import", {"source": str(src.resolve()), "shards": shards, "seed": seed,
                            "test_fraction": test_fraction if test is None else None,
                            "test_from_file": test is not None, "shuffle": shuffle}, argv)
    return write_arrays(out, x, y, xt, yt, shards=shards, classes=classes, made=made,
                        overwrite=overwrite, log=log, label=f"importing {src.name}",
                        allow_no_test=allow_no_test, test_how=how)


def _classes(src, y, yt, classes: int | None) -> int:
    """The class count: ``--classes`` (checked against the labels) or largest label + 1 (>= 2)."""
    ymax = max(int(y.max()) if len(y) else 0, int(yt.max()) if len(yt) else 0)
    if classes is None:
        if ymax < 1:
            raise UserError(f"{tag()} {src}: every label is 0, a single class: a classifier needs at least "
                            "2; pass --classes N if the file is a sample of a larger set")
        return ymax + 1
    if classes < 2 or classes > MAX_CLASSES:
        raise UserError(f"{tag()} {src}: --classes {classes} must be in 2..{MAX_CLASSES}")
    if ymax >= classes:
        raise UserError(f"{tag()} {src}: label {ymax} out of range for --classes {classes}")
    return classes
