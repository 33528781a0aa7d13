"""Token data sets (kind "tokens"): text -> byte tokens in HDF5 shards; make, import, check (serial).

    DIR/manifest.json      kind "tokens", vocab_size, dtype, shard list, val file, sources + sha256
    DIR/train-00000.h5     tokens uint8 [n] (uint16 when vocab_size > 256); attrs: format,
    DIR/train-00001.h5     schema_version, kind (train | val), vocab_size, tokens, offset, checksum
    DIR/val.h5             the held-out split, same schema

    text files --bytes--> one stream --split--> train (K contiguous shards) | val
      import FILE.txt [FILE2 ... | DIR]: sources in the order given (a DIR's files sorted), the
          last --val-fraction of the stream is val (one cut, so no window straddles the two)
      make pycode: the standard library's own .py files (no tests, no site-packages), sorted;
          each file goes to val when sha256(its relative path) < --val-fraction (a file is never
          in both), so the split does not move when --max-bytes takes fewer files

The checksum is ``"sha256:" + sha256(little-endian token bytes)``. Files are written to a
temporary name and renamed; the manifest is written last (a crash leaves no data set).
Cost: one pass over the bytes (read, hash, write); memory holds the whole stream (text corpora
here are tens of MB).
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

from ..runtime import UserError, tag
from .shards import (FORMAT, MANIFEST, SCHEMA_VERSION, DataProblem, _fsync_path, shard_name, split_bounds,
                     tmp_name, write_json_atomic)

KIND = "tokens"
VAL_FILE = "val.h5"
CHUNK = 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("u1") if vocab_size <= 256 else np.dtype("<u2")


def token_checksum(tokens) -> str:
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- writing

def _write_file(path: Path, tokens, *, kind: str, vocab_size: int, offset: int) -> dict:
    import h5py

    tmp = tmp_name(path)
    checksum = token_checksum(tokens)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("tokens", data=tokens, chunks=(min(CHUNK, max(len(tokens), 1)),))
            a = f.attrs
            a["format"], a["schema_version"], a["kind"] = FORMAT, SCHEMA_VERSION, kind
            a["vocab_size"], a["tokens"], a["offset"], a["checksum"] = vocab_size, len(tokens), offset, checksum
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"file": path.name, "tokens": int(len(tokens)), "offset": int(offset), "checksum": checksum}


def write_token_set(out, train, val, *, vocab_size: int, shards: int, made: dict, sources: list,
                    overwrite: bool = False, log=None) -> dict:
    """Write ``train`` (cut into ``shards`` contiguous shards) and ``val`` token arrays; the manifest."""
    from .make import _prepare_out

    dt = token_dtype(vocab_size)
    train, val = np.asarray(train), np.asarray(val)
    for name, a in (("train", train), ("val", val)):
        if a.size and (int(a.min()) < 0 or int(a.max()) >= vocab_size):
            raise UserError(f"{tag()} {out}: {name} tokens outside [0, {vocab_size})")
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise UserError(f"{tag()} {out}: --shards must be at least 1 (got {shards})")
    if not val.size:
        raise UserError(f"{tag()} {out}: the val split would hold no tokens; hold out more (--val-fraction)")
    if len(train) < shards:
        raise UserError(f"{tag()} {out}: {len(train)} training tokens cannot fill {shards} shard(s); "
                        "use fewer --shards or more text")
    out = _prepare_out(out, overwrite)
    entries = []
    for i, (lo, hi) in enumerate(split_bounds(len(train), shards)):
        entries.append(_write_file(out / shard_name(i), train[lo:hi].astype(dt), kind="train",
                                   vocab_size=vocab_size, offset=lo))
    val_entry = _write_file(out / VAL_FILE, val.astype(dt), kind="val", vocab_size=vocab_size, offset=0)
    m = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "kind": KIND, "vocab_size": int(vocab_size),
         "dtype": dt.name, "train_tokens": int(len(train)), "shards": entries, "val": val_entry,
         "sources": sources, "made": made}
    write_json_atomic(out / MANIFEST, m)
    if log is not None:
        log(f"wrote {out}: {len(train):,} train tokens in {shards} shards, {len(val):,} val tokens, "
            f"vocab {vocab_size} ({dt.name})")
    return m


def _source(path: Path, data: bytes, split: str, root=None) -> dict:
    name = str(path.relative_to(root)) if root is not None else str(path)
    return {"path": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "split": split}


def _text_files(paths) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
            if not found:
                raise UserError(f"{tag()} {p}: the directory holds no files to import")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{tag()} {p}: no such file or directory")
    return files


def import_text(paths, out, *, shards: int = 4, val_fraction: float = 0.1, overwrite: bool = False,
                log=None, argv=None) -> dict:
    """Text files (or directories of them) -> byte tokens; the last ``val_fraction`` is val."""
    from .make import _made

    _check_fraction(val_fraction)
    files, chunks, sources = _text_files(paths), [], []
    for p in files:
        try:
            data = p.read_bytes()
        except OSError as e:
            raise UserError(f"{tag()} {p}: cannot read ({e.strerror})") from None
        chunks.append(data)
        sources.append(_source(p, data, "train+val"))
    stream = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    n_val = int(round(len(stream) * val_fraction))
    if n_val < 1 or len(stream) - n_val < shards:
        raise UserError(f"{tag()} {', '.join(map(str, paths))}: {len(stream)} bytes are too few to split into "
                        f"{shards} train shard(s) and a val fraction of {val_fraction}")
    made = _made("import text", {"sources": [str(p) for p in paths], "val_fraction": val_fraction},
                 argv or ["import", *map(str, paths), "--out", str(out), "--shards", str(shards),
                          "--val-fraction", str(val_fraction)])
    return write_token_set(out, stream[:-n_val], stream[-n_val:], vocab_size=256, shards=shards, made=made,
                           sources=sources, overwrite=overwrite, log=log)


# ----------------------------------------------------------------------------- pycode

def stdlib_sources(root=None) -> list[Path]:
    """The standard library's own .py files, sorted: no test packages, site-packages, __pycache__."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    out = []
    for p in root.rglob("*.py"):
        parts = p.relative_to(root).parts
        if skip.intersection(parts[:-1]) or p.name.startswith("test_") or not p.is_file():
            continue
        out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _check_fraction(val_fraction) -> None:
    if not 0 < val_fraction < 1:  # also NaN
        raise UserError(f"{tag()} --val-fraction = {val_fraction} must be in (0, 1)")


def _in_val(rel: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")
    return h / 2.0 ** 64 < val_fraction


def make_pycode(out, *, shards: int = 4, val_fraction: float = 0.1, max_bytes: int = 0,
                overwrite: bool = False, log=None, root=None) -> dict:
    """The stdlib .py corpus (``max_bytes`` > 0: whole files in sorted order up to that many bytes)."""
    from .make import _made

    _check_fraction(val_fraction)
    if max_bytes < 0:
        raise UserError(f"{tag()} --max-bytes = {max_bytes} must be >= 0 (0 = the whole standard library)")
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_sources(root)
    if not files:
        raise UserError(f"{tag()} {root}: no .py files found (is the standard library installed?)")
    parts, total, sources = {"train": [], "val": []}, 0, []
    for p in files:
        data = p.read_bytes()
        if max_bytes and total + len(data) > max_bytes and total > 0:
            break
        rel = p.relative_to(root).as_posix()
        split = "val" if _in_val(rel, val_fraction) else "train"
        parts[split].append(data)
        sources.append(_source(p, data, split, root))
        total += len(data)
    if not parts["val"] and len(sources) > 1:  # a tiny corpus: the last file is held out
        sources[-1]["split"] = "val"
        parts["val"].append(parts["train"].pop())
    if not parts["train"] or not parts["val"]:
        raise UserError(f"{tag()} {out}: --max-bytes = {max_bytes} takes {len(sources)} file(s) ({total:,} bytes): "
                        "too few for a train and a val split; raise --max-bytes (or 0 = all)")
    train = np.frombuffer(b"".join(parts["train"]), dtype=np.uint8)
    val = np.frombuffer(b"".join(parts["val"]), dtype=np.uint8)
    if log is not None:
        log(f"pycode: {len(sources)} files of {root} ({total:,} bytes), Python {sys.version.split()[0]}")
    made = _made("make pycode", {"python": sys.version.split()[0], "stdlib": str(root), "files": len(sources),
                                 "bytes": total, "val_fraction": val_fraction, "max_bytes": max_bytes},
                 ["make", "pycode", "--out", str(out), "--shards", str(shards), "--val-fraction",
                  str(val_fraction)] + (["--max-bytes", str(max_bytes)] if max_bytes else []))
    made["sha256"] = {"train": hashlib.sha256(train.tobytes()).hexdigest(),
                      "val": hashlib.sha256(val.tobytes()).hexdigest()}
    return write_token_set(out, train, val, vocab_size=256, shards=shards, made=made, sources=sources,
                           overwrite=overwrite, log=log)


# ----------------------------------------------------------------------------- reading

def manifest_kind(path) -> str | None:
    """The ``kind`` a data set's manifest names (None: no readable manifest; the callers say why)."""
    import json

    try:
        with open(Path(path) / MANIFEST) as fh:
            m = json.load(fh)
    except (OSError, ValueError):
        return None
    return m.get("kind") if isinstance(m, dict) else None


def read_token_manifest(path) -> dict:
    """Load and validate a tokens manifest; DataProblem naming the file and reason."""
    import json

    mpath = Path(path) / MANIFEST
    try:
        with open(mpath) as fh:
            m = json.load(fh)
    except (OSError, ValueError) as e:
        raise DataProblem(mpath, f"unreadable ({e})") from None
    for key, typ in (("format", str), ("schema_version", int), ("vocab_size", int), ("train_tokens", int),
                     ("shards", list), ("val", dict)):
        if not isinstance(m.get(key), typ):
            raise DataProblem(mpath, f"missing or invalid key {key!r}")
    if m["format"] != FORMAT or m["schema_version"] != SCHEMA_VERSION or m.get("kind") != KIND:
        raise DataProblem(mpath, f"not a version-{SCHEMA_VERSION} token data set")
    if not m["shards"] or m["vocab_size"] < 2:
        raise DataProblem(mpath, "lists no shards or a vocab_size < 2")
    off = 0
    for i, e in enumerate(m["shards"] + [m["val"]]):
        if not isinstance(e, dict) or not all(isinstance(e.get(k), t) for k, t in
                                              (("file", str), ("tokens", int), ("checksum", str))):
            raise DataProblem(mpath, f"entry {i} lacks file, tokens or checksum")
        if "/" in e["file"] or e["file"] in ("", ".", ".."):
            raise DataProblem(mpath, f"entry {i}: file name {e['file']!r} must be a plain name")
        if e is not m["val"]:
            if e.get("offset") != off:
                raise DataProblem(mpath, f"shards[{i}] has offset {e.get('offset')}, expected {off}")
            off += e["tokens"]
    if off != m["train_tokens"]:
        raise DataProblem(mpath, f"shards hold {off} tokens but train_tokens = {m['train_tokens']}")
    return m


def open_token_file(path: Path, m: dict, entry: dict, kind: str):
    """Open one token file read-only; check dataset, dtype, length and attributes (reads no tokens)."""
    from .shards import open_h5

    def check(f, path):
        ds = f.get("tokens")
        if ds is None or ds.ndim != 1:
            raise DataProblem(path, "has no 1-D dataset 'tokens'")
        if ds.dtype != token_dtype(m["vocab_size"]):
            raise DataProblem(path, f"tokens have dtype {ds.dtype}, expected {token_dtype(m['vocab_size'])}")
        if ds.shape[0] != entry["tokens"]:
            raise DataProblem(path, f"holds {ds.shape[0]} tokens, manifest.json says {entry['tokens']}")
        a = f.attrs
        for k, want in (("vocab_size", m["vocab_size"]), ("offset", entry.get("offset", 0))):
            if int(a.get(k, -1)) != want:
                raise DataProblem(path, f"attribute {k} = {a.get(k)}, manifest.json says {want}")
        got_kind = a.get("kind", kind)
        if (got_kind.decode() if isinstance(got_kind, bytes) else str(got_kind)) != kind:
            raise DataProblem(path, f"is a {got_kind} file, expected {kind}")
        ck = a.get("checksum", "")
        if (ck.decode() if isinstance(ck, bytes) else str(ck)) != entry["checksum"]:
            raise DataProblem(path, "checksum attribute differs from manifest.json")

    return open_h5(Path(path), check)
