"""The per-rank reader: which rows each rank owns, how mini-batches stream, open-time checks.

Ownership (K shards, p ranks)::

    K >= p  round-robin: rank r opens shards r, r+p, r+2p, ...
            K=5, p=2:  rank 0 <- 0 2 4    rank 1 <- 1 3
    K <  p  the global train rows [0, N) are cut into p contiguous ranges (sizes
            differ by at most one); each rank reads its range as hyperslabs of
            the one or two shards it touches
            K=2, p=3:  |---- shard 0 ----|---- shard 1 ----|
                       |  rank 0  |  rank 1  |  rank 2     |

Steps: every rank runs ``steps_per_epoch = min over ranks of (rows_r // batch_size)``
steps per epoch (agreed in the one collective of ``open_dataset``).

Remainder: each epoch, a rank's rows form a stream (blocks in shuffled order, rows
shuffled inside each window of blocks); the first ``steps_per_epoch * batch_size``
rows of the stream are used and the rest -- ``rows_local - steps_per_epoch*batch_size``
rows, the ``dropped_per_epoch`` attribute -- are dropped *for that epoch only*.
Since the order is reshuffled every epoch, different rows are dropped each epoch.
When the shard count is not a multiple of the rank count, round-robin gives some
ranks more rows than others and those ranks drop more (a warning says so).

Streaming: rows are read in contiguous blocks of ``block_rows`` (about 2 MiB of x,
at least one batch). Each epoch the block order is shuffled, then ``window_blocks``
consecutive blocks at a time are read into one buffer and their rows permuted.
Memory held: one window (+ one partial batch), never the whole set. The shuffle is
seeded by (seed, epoch, rank) -- the block order by (seed, epoch, rank, 0), each
window's row permutation by (seed, epoch, rank, 1, window) -- so ``batches(epoch,
start=k)`` skips the first k batches without reading them and then yields exactly
what an uninterrupted pass would.

Open-time checks (``verify=True``, the default), on every rank, for the files it reads:
  - manifest.json valid; each file opens (not truncated), x float32 [rows, features],
    y int64 [rows], attributes agree with the manifest (schema, rows, offset, checksum);
  - every row this rank will read (train and test): labels in [0, classes), x finite;
  - content checksums of the files this rank reads entirely (round-robin train shards;
    the test file when it has the whole of it; everything at 1 rank). Shards split
    across ranks are scanned but their checksum is verified only by ``data check``.
With ``verify=False`` only the structural checks run (no rows are read on open).
Then one ``allgather`` of (error or None, schema, rows): any problem raises
UserError on every rank -- the failing rank with the file and the reason, the
others saying which rank failed and why -- so no rank is left in a collective.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..runtime import UserError, get_comm, log0, tag
from .stream import StreamReader
from .spec import spec_of
from .shards import (DataProblem, MANIFEST, block_rows_for, open_checked, read_manifest, scan,
                     split_bounds)


# ----------------------------------------------------------------------------- collectives


def _quiet_wait(comm) -> None:
    """A barrier that sleeps instead of busy-polling (MPICH spins in a blocking call)."""
    req = comm.Ibarrier()
    delay = 0.0005
    while not req.Test():
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def run_on_root(comm, fn, root: int = 0):
    """Run ``fn()`` on ``root`` only while the others wait quietly; share the outcome.

    Returns fn's result (broadcast, so it must pickle) on every rank. If fn raises,
    the root re-raises its exception and every other rank raises a UserError
    naming the root and the reason -- nobody is left waiting.
    """
    if comm.Get_size() == 1:
        return fn()
    rank = comm.Get_rank()
    if rank == root:
        exc = None
        try:
            outcome = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - must reach the other ranks
            exc = e
            text = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            outcome = ("error", text)
        _quiet_wait(comm)
        comm.bcast(outcome, root=root)
        if exc is not None:
            raise exc
        return outcome[1]
    _quiet_wait(comm)
    status, value = comm.bcast(None, root=root)
    if status == "error":
        raise UserError(f"{tag()} rank {root} failed: {value}")
    return value


# ----------------------------------------------------------------------------- plan


def plan_segments(shard_rows: list[int], size: int, rank: int) -> list[tuple[int, int, int]]:
    """This rank's rows as (shard index, lo, hi) ranges inside shards (see module doc)."""
    if not 0 <= rank < size:  # (a rank outside would wrap round to another rank's rows)
        raise ValueError(f"plan_segments: rank {rank!r} out of range for {size!r} ranks (use 0..{size - 1})")
    k = len(shard_rows)
    if k >= size:
        return [(s, 0, shard_rows[s]) for s in range(rank, k, size) if shard_rows[s] > 0]
    n = sum(shard_rows)
    glo, ghi = split_bounds(n, size)[rank]
    segs, off = [], 0
    for s, rows in enumerate(shard_rows):
        lo, hi = max(glo, off), min(ghi, off + rows)
        if lo < hi:
            segs.append((s, lo - off, hi - off))
        off += rows
    return segs


def rows_used(shard_rows: list[int], size: int, batch_size: int) -> int:
    """Rows all ranks together train on per epoch: steps (the fewest rows of any rank // batch) x batch x ranks."""
    return _fewest(shard_rows, size) // batch_size * batch_size * size


def _fewest(shard_rows: list[int], size: int) -> int:
    """The rows of the rank that holds fewest (``plan_segments``' ownership, without listing segments)."""
    if len(shard_rows) < size:
        return sum(shard_rows) // size
    return int(np.bincount(np.arange(len(shard_rows)) % size, weights=shard_rows, minlength=size).min())


def _cut(n: int, k: int) -> list[int]:
    """Rows per shard when ``data make`` cuts ``n`` rows into ``k`` shards."""
    return [hi - lo for lo, hi in split_bounds(n, k)]


USED = 0.9  # below this fraction of the train rows used per epoch, open_dataset warns


def balance_advice(shard_rows: list[int], size: int, batch_size: int, unit: str = "rows") -> str | None:
    """None when >= 90 % of the rows are used per epoch; else the warning's advice: a shard count
    (as ``data make`` cuts shards) or a batch size that does use them, checked by ``rows_used``."""
    n, k, used = sum(shard_rows), len(shard_rows), rows_used(shard_rows, size, batch_size)
    if used >= USED * n:
        return None
    head = f"only {used} of {n} training {unit} are used per epoch ({k} shards over {size} ranks, batch {batch_size})"
    counts = sorted({size * m for m in range(1, k // size + 3)}, key=lambda c: (abs(c - k), c))
    best = max(counts, key=lambda c: rows_used(_cut(n, c), size, batch_size))  # the closest of the best
    fewest = _fewest(_cut(n, best), size)
    if fewest // batch_size * batch_size * size >= USED * n:
        return f"{head}: the shards do not divide evenly among the ranks; remake it with --shards {best}"
    b = next((b for b in range(batch_size - 1, 0, -1) if fewest // b * b * size >= USED * n), 0)
    if b and _fewest(shard_rows, size) // b * b * size < USED * n:
        return f"{head}; remake it with --shards {best} and train.batch_size = {b} (each rank then holds ~{fewest} {unit})"
    if b:
        return f"{head}: each rank holds about {fewest} {unit}; use train.batch_size = {b}"
    return f"{head}: each rank holds about {fewest} {unit}; use fewer ranks or a larger data set"


def _hint(manifest, path) -> str:
    from .make import regenerate_hint

    return regenerate_hint(manifest, path)


# ----------------------------------------------------------------------------- reader


class Reader(StreamReader):
    """This rank's view of a data set; made by ``open_dataset``. See the module docstring."""

    def __init__(self, *, path, comm, manifest, batch_size, seed, segments, files, test_file,
                 test_range, steps_per_epoch, block_rows, window_blocks, rows_per_rank):
        self.path = Path(path)
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.manifest = manifest
        self.features = int(manifest["features"])
        self.classes = int(manifest["classes"])
        self.spec = spec_of(manifest)  # what a batch is (spec.py): the model checks it fits
        self.train_rows = int(manifest["train_rows"])
        self.test_rows = int(manifest["test"]["rows"])  # 0: the set has no test split (made with
        self.has_test = self.test_rows > 0               # --allow-no-test): report "no test rows"
        self.num_shards = len(manifest["shards"])
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.segments = segments
        self.shard_files = [manifest["shards"][s]["file"] for s in sorted(files)]
        self._files = files
        self._test = test_file
        self.test_range = test_range
        self.test_rows_local = test_range[1] - test_range[0]
        self.rows_local = sum(hi - lo for _, lo, hi in segments)
        self.rows_per_rank = rows_per_rank
        self.steps_per_epoch = int(steps_per_epoch)
        self.dropped_per_epoch = self.rows_local - self.steps_per_epoch * self.batch_size
        self.block_rows = int(block_rows)
        self.window_blocks = int(window_blocks)
        self._blocks = [(s, a, min(a + self.block_rows, hi))
                        for s, lo, hi in segments for a in range(lo, hi, self.block_rows)]
        self.closed = False

    # -- info

    def describe(self) -> str:
        return (f"{self.path}: {self.train_rows} train rows in {self.num_shards} shards, "
                f"{self.test_rows} test rows, {self.features} features, {self.classes} classes; "
                f"{self.size} rank(s), {self.steps_per_epoch} steps/epoch of {self.batch_size} "
                f"rows per rank")

    def __repr__(self) -> str:
        return (f"<Reader {self.path} rank {self.rank}/{self.size}: {self.rows_local} rows, "
                f"{self.steps_per_epoch} steps/epoch, batch {self.batch_size}>")

    # -- streaming

    def _read_block(self, s, a, b, xout, yout) -> None:
        f = self._files[s]
        f["x"].read_direct(xout, np.s_[a:b], np.s_[0:b - a])
        f["y"].read_direct(yout, np.s_[a:b], np.s_[0:b - a])

    def _stream(self, epoch: int, start: int):
        b = self.batch_size
        total, need = self.steps_per_epoch * b, start * b
        blocks = self._blocks
        order = np.random.default_rng([self.seed, epoch, self.rank, 0]).permutation(len(blocks))
        W = self.window_blocks
        pos = 0  # stream position of the current window's first row
        carry = None
        emitted = 0
        for w, i0 in enumerate(range(0, len(blocks), W)):
            if pos >= total:
                break
            win = [blocks[j] for j in order[i0:i0 + W]]
            wrows = sum(hi - lo for _, lo, hi in win)
            if pos + wrows <= need:
                pos += wrows
                continue
            xb = np.empty((wrows, self.features), dtype=np.float32)
            yb = np.empty(wrows, dtype=np.int64)
            o = 0
            for s, lo, hi in win:
                self._read_block(s, lo, hi, xb[o:o + hi - lo], yb[o:o + hi - lo])
                o += hi - lo
            perm = np.random.default_rng([self.seed, epoch, self.rank, 1, w]).permutation(wrows)
            sel = perm[max(need - pos, 0):min(total - pos, wrows)]
            pos += wrows
            xw, yw = xb[sel], yb[sel]
            del xb, yb
            off = 0
            if carry is not None:
                k = min(b - len(carry[1]), len(yw))
                carry = (np.concatenate([carry[0], xw[:k]]), np.concatenate([carry[1], yw[:k]]))
                off = k
                if len(carry[1]) < b:
                    continue
                emitted += 1
                yield carry
                carry = None
            while off + b <= len(yw):
                emitted += 1
                yield xw[off:off + b], yw[off:off + b]
                off += b
            if off < len(yw):
                carry = (xw[off:].copy(), yw[off:].copy())
        assert carry is None and emitted == self.steps_per_epoch - start, (emitted, carry)

    def _test_stream(self, bs: int):
        lo, hi = self.test_range
        if hi <= lo:
            return
        f = self._test
        for a in range(lo, hi, bs):
            e = min(a + bs, hi)
            x = np.empty((e - a, self.features), dtype=np.float32)
            y = np.empty(e - a, dtype=np.int64)
            f["x"].read_direct(x, np.s_[a:e], np.s_[0:e - a])
            f["y"].read_direct(y, np.s_[a:e], np.s_[0:e - a])
            yield x, y

    # -- lifetime

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for f in self._files.values():
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass
        if self._test is not None:
            try:
                self._test.close()
            except Exception:  # noqa: BLE001
                pass
        self._files = {}
        self._test = None



def _open_local(path: Path, rank: int, size: int, batch_size: int, verify: bool, block_rows):
    """Everything one rank does before the collective. Returns a dict (files left open)."""
    st = {"manifest": None, "files": {}, "test": None}
    try:
        m = read_manifest(path)
    except DataProblem as e:
        raise _as_user_error(e, None, path) from None
    st["manifest"] = m
    shard_rows = [s["rows"] for s in m["shards"]]
    segs = plan_segments(shard_rows, size, rank)
    st["segments"] = segs
    br = block_rows or block_rows_for(m["features"], batch_size)
    st["block_rows"] = br
    try:
        for s, lo, hi in segs:
            entry = m["shards"][s]
            fp = path / entry["file"]
            if s not in st["files"]:
                st["files"][s] = open_checked(fp, manifest=m, entry=entry, kind="train")
            if verify:
                whole = lo == 0 and hi == entry["rows"]
                got = scan(st["files"][s], fp, lo, hi, classes=m["classes"], block_rows=br,
                           checksum=whole)
                if whole and got != entry["checksum"]:
                    raise DataProblem(fp, "checksum mismatch: the contents changed since the "
                                          "set was made (corrupted or edited)")
        te = m["test"]
        tlo, thi = split_bounds(te["rows"], size)[rank]
        st["test_range"] = (tlo, thi)
        if thi > tlo:
            fp = path / te["file"]
            st["test"] = open_checked(fp, manifest=m, entry=te, kind="test")
            if verify:
                whole = tlo == 0 and thi == te["rows"]
                got = scan(st["test"], fp, tlo, thi, classes=m["classes"], block_rows=br,
                           checksum=whole)
                if whole and got != te["checksum"]:
                    raise DataProblem(fp, "checksum mismatch: the contents changed since the "
                                          "set was made (corrupted or edited)")
    except DataProblem as e:
        _close_all(st)
        raise _as_user_error(e, m, path) from None
    except BaseException:
        _close_all(st)
        raise
    return st


def _as_user_error(e: DataProblem, manifest, path) -> UserError:
    if e.reason == "no such directory":
        return UserError(f"{tag()} {path}: no such data set directory; create it with "
                         f"`python -m mpitrain data make digits --out {path}` or import your data "
                         f"with `python -m mpitrain data import FILE --out {path}`")
    if e.file.endswith(MANIFEST) and manifest is None and "missing" in e.reason:
        return UserError(f"{tag()} {e.file}: {e.reason}; make the set with `python -m mpitrain "
                         f"data make digits --out {path}` or `python -m mpitrain data import FILE "
                         f"--out {path}`")
    return UserError(f"{tag()} {e.file}: {e.reason}; {_hint(manifest, path)}")


def _close_all(st) -> None:
    for f in st["files"].values():
        try:
            f.close()
        except Exception:  # noqa: BLE001
            pass
    if st.get("test") is not None:
        try:
            st["test"].close()
        except Exception:  # noqa: BLE001
            pass


def open_dataset(path, comm=None, *, batch_size: int, seed: int = 0, verify: bool = True,
                 block_rows: int | None = None, window_blocks: int = 4, window: int | None = None) -> Reader:
    """Open the data set in directory ``path`` for this rank (collective over ``comm``).

    Raises UserError on every rank if any rank finds a problem (see module docstring).
    A manifest of kind "tokens" opens a TokenReader (token_reader.py) of ``window``-token rows.
    """
    comm = comm if comm is not None else get_comm()
    from .tokens import KIND as TOKENS, manifest_kind

    if manifest_kind(path) == TOKENS:
        from .token_reader import open_tokens

        return open_tokens(path, comm, batch_size=batch_size, seed=seed, window=window)
    rank, size = comm.Get_rank(), comm.Get_size()
    path = Path(path)
    err, st, exc = None, None, None
    try:
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise UserError(f"{tag()} batch_size must be a positive integer (got {batch_size!r})")
        if block_rows is not None and int(block_rows) < 1:
            raise UserError(f"{tag()} block_rows must be >= 1 (got {block_rows!r})")
        if int(window_blocks) < 1:
            raise UserError(f"{tag()} window_blocks must be >= 1 (got {window_blocks!r})")
        st = _open_local(path, rank, size, int(batch_size), verify, block_rows)
    except BaseException as e:  # noqa: BLE001 - every failure must reach the other ranks
        exc = e
        err = str(e) if isinstance(e, UserError) else f"{tag()} {type(e).__name__}: {e}"
    sig = None
    rows = -1
    if st is not None:
        m = st["manifest"]
        sig = {"schema_version": m["schema_version"], "features": m["features"],
               "classes": m["classes"], "train_rows": m["train_rows"],
               "shard rows": [s["rows"] for s in m["shards"]], "test rows": m["test"]["rows"],
               "batch_size": int(batch_size), "seed": int(seed)}
        rows = sum(hi - lo for _, lo, hi in st["segments"])
    gathered = comm.allgather((err, sig, rows)) if size > 1 else [(err, sig, rows)]

    def fail(e: BaseException):
        if st is not None:
            _close_all(st)
        raise e

    if exc is not None:
        fail(exc)
    bad = [(r, g[0]) for r, g in enumerate(gathered) if g[0] is not None]
    if bad:
        r, text = bad[0]
        more = f" (and {len(bad) - 1} other rank(s))" if len(bad) > 1 else ""
        fail(UserError(f"{tag()} cannot open data set {path}: rank {r} failed{more}: {text}"))
    sigs = [g[1] for g in gathered]
    if any(s != sigs[0] for s in sigs):
        diff = sorted({k for s in sigs for k in s if s[k] != sigs[0][k]})
        seen = "; ".join(f"rank {r}: " + ", ".join(f"{k}={s[k]}" for k in diff)
                         for r, s in enumerate(sigs))
        fail(UserError(f"{tag()} {path}: ranks disagree on the data set ({seen}); every rank "
                       "must read the same data set (the same directory on a shared file "
                       "system) with the same batch_size and seed"))
    rows_per_rank = [g[2] for g in gathered]
    steps = min(rows_per_rank) // int(batch_size)
    if steps == 0:
        r = int(np.argmin(rows_per_rank))
        fail(UserError(f"{tag()} {path}: rank {r} holds only {rows_per_rank[r]} training rows, "
                       f"fewer than batch_size={batch_size} ({sigs[0]['train_rows']} rows in "
                       f"{len(sigs[0]['shard rows'])} shards over {size} ranks); use a smaller "
                       "batch size, fewer ranks, or a larger data set"))
    m = st["manifest"]
    reader = Reader(path=path, comm=comm, manifest=m, batch_size=int(batch_size), seed=int(seed),
                    segments=st["segments"], files=st["files"], test_file=st["test"],
                    test_range=st["test_range"], steps_per_epoch=steps,
                    block_rows=st["block_rows"], window_blocks=int(window_blocks),
                    rows_per_rank=rows_per_rank)
    advice = balance_advice([e["rows"] for e in m["shards"]], size, int(batch_size))
    if advice:
        log0(f"warning: data set {path}: {advice}", comm=comm)
    return reader


# ----------------------------------------------------------------------------- ensure


def ensure_dataset(path, dataset, comm=None, *, shards: int | None = None, seed: int = 0,
                   rows: int | None = None, features: int | None = None,
                   classes: int | None = None) -> Path:
    """Make sure ``path`` holds a data set; make a built-in one on rank 0 if it is missing.

    ``dataset``: "digits", "synthetic" or "graphs" (``rows``: graphs) are made when ``path`` has no manifest.json;
    anything else (or empty) raises UserError telling the user to run ``data make`` or
    ``data import``. ``rows``/``features``/``classes`` size a synthetic set (None: the
    defaults of ``make_synthetic``; ignored for digits). Collective over ``comm``; errors
    reach every rank. Returns the path. Does not validate an existing set
    (``open_dataset`` does).
    """
    from .make import BUILTINS, DEFAULT_SHARDS, make_digits, make_synthetic

    comm = comm if comm is not None else get_comm()
    path = Path(path)
    k = DEFAULT_SHARDS if shards is None else int(shards)

    def work():
        if (path / MANIFEST).is_file():
            return "exists"
        name = (dataset or "").strip().lower()
        if name == "pycode":
            from .tokens import make_pycode

            log0(f"data: {path} holds no data set yet; making the built-in 'pycode' set ({k} shards)", comm=comm)
            make_pycode(path, shards=k, log=lambda s: log0(s, comm=comm))
            return "made"
        if name in BUILTINS:
            log0(f"data: {path} holds no data set yet; making the built-in '{name}' set "
                 f"({k} shards, seed {seed})", comm=comm)
            say = lambda s: log0(s, comm=comm)  # noqa: E731
            if name == "digits":
                make_digits(path, shards=k, seed=seed, log=say)
            elif name == "graphs":
                from .graph_make import make_graphs

                make_graphs(path, shards=k, seed=seed, log=say, **({"graphs": int(rows)} if rows else {}))
            else:
                size = {key: int(v) for key, v in
                        (("rows", rows), ("features", features), ("classes", classes)) if v}
                make_synthetic(path, shards=k, seed=seed, log=say, **size)
            return "made"
        what = "has no manifest.json" if path.exists() else "does not exist"
        known = f" (dataset={dataset!r} is not a built-in)" if dataset else ""
        raise UserError(f"{tag()} data set {path} {what}{known}; make it with `python -m "
                        f"mpitrain data make {{{','.join(BUILTINS)}}} --out {path}` or import "
                        f"your own with `python -m mpitrain data import FILE.npz|FILE.csv --out "
                        f"{path}`, or set data.dataset to one of: {', '.join(BUILTINS)}")

    run_on_root(comm, work)
    return path
