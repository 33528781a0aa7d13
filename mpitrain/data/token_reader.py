"""The per-rank reader of a token data set: (block_size + 1)-token windows, resumable at any step.

    global train stream [0, N) (the shards back to back), cut into p contiguous ranges:
        |------ rank 0 ------|------ rank 1 ------|------ rank 2 ------|
    rank r, epoch e: an offset o in [0, T) and a permutation, both seeded by (seed, e, r):
        | o |  w0  |  w1  |  w2  | ...        window i = tokens [o + i*T, o + i*T + T + 1)
    a batch = B windows in permuted order -> (x = w[:, :-1], y = w[:, 1:]) int64 (B, T)

Every token of a rank's range is a target about once per epoch; windows overlap by one token
(the target of one is the first input of the next). ``steps_per_epoch`` = min over ranks of
``windows_r // B`` with ``windows_r = (n_r - T) // T`` (the count for any offset), agreed in the
one collective of ``open_tokens``. ``batches(epoch, start=k)`` skips k batches without
computing them, so a resumed run yields exactly what an uninterrupted one would.
``test_batches(bs)``: this rank's contiguous part of the val split, non-overlapping windows in
order (ranks sum their losses: the val loss is over the whole val split).

``train_rows`` counts training TOKENS (the whole set); ``rows_local`` this rank's. Memory: the
rank's train range and val range, in the file's dtype (uint8 for bytes). Cost per batch: one
gather of B·(T+1) tokens. Data knows nothing of models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime import UserError, get_comm, tag, warn
from .shards import DataProblem, split_bounds
from .stream import StreamReader
from .spec import TOKENS, DataSpec
from .tokens import open_token_file, read_token_manifest


def _read_range(path: Path, m: dict, lo: int, hi: int) -> np.ndarray:
    """Global train tokens [lo, hi) from the shards that hold them."""
    parts = []
    for e in m["shards"]:
        a, b = max(lo, e["offset"]), min(hi, e["offset"] + e["tokens"])
        if a < b:
            with open_token_file(path / e["file"], m, e, "train") as f:
                parts.append(f["tokens"][a - e["offset"]:b - e["offset"]])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)


class TokenReader(StreamReader):
    """This rank's windows of a token data set; made by ``open_tokens``."""

    def __init__(self, *, path, comm, manifest, batch_size, seed, window, train, val, steps_per_epoch):
        self.path, self.comm, self.manifest = Path(path), comm, manifest
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.window = int(window)              # T + 1 tokens per row
        self.T = self.window - 1
        self.spec = DataSpec(TOKENS, vocab_size=int(manifest["vocab_size"]))
        self.vocab_size = self.spec.vocab_size
        self.train_rows = int(manifest["train_tokens"])  # tokens, not windows
        self.unit = "tokens"
        self._train, self._val = train, val
        self.rows_local = len(train)
        self.windows_local = (len(train) - self.T) // self.T
        self.steps_per_epoch = int(steps_per_epoch)
        self.closed = False

    def describe(self) -> str:
        return (f"{self.path}: {self.train_rows:,} train tokens, {self.manifest['val']['tokens']:,} val tokens, "
                f"vocab {self.vocab_size}; {self.size} rank(s), {self.steps_per_epoch} steps/epoch of "
                f"{self.batch_size} windows of {self.window} tokens per rank")

    def _stream(self, epoch, start):
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        off = int(rng.integers(0, self.T))
        order = rng.permutation(self.windows_local)
        B, T, cols = self.batch_size, self.T, np.arange(self.window)
        for s in range(start, self.steps_per_epoch):
            starts = off + order[s * B:(s + 1) * B] * T
            w = self._train[starts[:, None] + cols].astype(np.int64)   # (B, T+1)
            yield w[:, :-1], w[:, 1:]

    def test_batches(self, batch_size: int, limit: int = 0):
        """This rank's val windows in order, ``batch_size`` at a time (``limit`` > 0: at most that
        many batches); the last batch may be short."""
        self._check_open()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return self._test_stream(int(batch_size), int(limit))

    def _test_stream(self, bs, limit):
        T, cols = self.T, np.arange(self.window)
        n = max((len(self._val) - 1) // T, 0)
        for k, a in enumerate(range(0, n, bs)):
            if limit and k >= limit:
                return
            starts = np.arange(a, min(a + bs, n)) * T
            w = self._val[starts[:, None] + cols].astype(np.int64)
            yield w[:, :-1], w[:, 1:]

    def close(self) -> None:
        self.closed = True
        self._train = self._val = None



def _open_local(path: Path, rank: int, size: int, window: int):
    m = read_token_manifest(path)
    lo, hi = split_bounds(m["train_tokens"], size)[rank]
    train = _read_range(path, m, lo, hi)
    vlo, vhi = split_bounds(m["val"]["tokens"], size)[rank]
    val = np.zeros(0, dtype=train.dtype)
    if vhi > vlo:
        with open_token_file(path / m["val"]["file"], m, m["val"], "val") as f:
            val = f["tokens"][vlo:vhi]
    for name, a in (("train", train), ("val", val)):
        if a.size and int(a.max()) >= m["vocab_size"]:
            raise DataProblem(path, f"{name} token {int(a.max())} outside the vocabulary [0, {m['vocab_size']})")
    return m, train, val


def _fewest(what: str, counts: list[int]) -> str:
    r = int(np.argmin(counts))
    return (f"the {what} split holds {sum(counts):,} tokens over {len(counts)} rank(s), {counts[r]:,} on rank {r} "
            "(the fewest)")


def _steps_per_epoch(path, sizes: list[tuple[int, int]], window: int, batch_size: int) -> int:
    """Batches per rank and epoch (the same on every rank). UserError when a rank has no train window (one
    needs 2·block_size tokens: it starts at a random offset below block_size), or no rank a val window."""
    T, train, val = window - 1, [n for n, _ in sizes], [v for _, v in sizes]
    per_rank = [(n - T) // T for n in train]
    if min(per_rank) < 1:
        fit = f"model.block_size <= {min(train) // 2}" if min(train) >= 4 else "a smaller model.block_size"
        fit += ", fewer ranks" if len(train) > 1 else ""
        raise UserError(f"{tag()} {path}: {_fewest('train', train)}, but one window of block_size + 1 = {window} "
                        f"tokens needs {2 * T:,} tokens per rank (it starts at a random offset below block_size); "
                        f"use {fit}, or more text")
    if max(val) < window:
        raise UserError(f"{tag()} {path}: {_fewest('val', val)}, and no rank holds one window of block_size + 1 = "
                        f"{window} tokens: the val loss would measure nothing; use a smaller model.block_size"
                        f"{f' (at most {max(val) - 1})' if max(val) >= 2 else ''}{', fewer ranks' if len(val) > 1 else ''}, or remake the set "
                        "with a larger --val-fraction")
    steps = min(per_rank) // batch_size
    if steps < 1:
        r = int(np.argmin(per_rank))
        raise UserError(f"{tag()} {path}: rank {r} holds only {per_rank[r]} windows of {window} tokens, "
                        f"fewer than batch_size = {batch_size} ({sum(train):,} train tokens over {len(train)} "
                        "ranks); use a smaller batch or block_size, fewer ranks, or more text")
    return steps


def open_tokens(path, comm=None, *, batch_size: int, seed: int = 0, window: int | None = None) -> TokenReader:
    """Open the token data set in ``path`` for this rank (collective over ``comm``); errors on every rank."""
    comm = comm if comm is not None else get_comm()
    rank, size, path = comm.Get_rank(), comm.Get_size(), Path(path)
    err, st = None, None
    try:
        if window is None or int(window) < 2:
            raise UserError(f"{tag()} {path} holds tokens: reading it needs windows of block_size + 1 >= 2 "
                            f"tokens (got {window}); train it with model.kind = \"gpt\"")
        if int(batch_size) < 1:
            raise UserError(f"{tag()} batch_size must be a positive integer (got {batch_size!r})")
        st = _open_local(path, rank, size, int(window))
    except DataProblem as e:
        err = f"{tag()} {e.file}: {e.reason}; remake the set (`python -m mpitrain data check {path}` lists problems)"
    except UserError as e:
        err = str(e)
    sig = (st[0]["train_tokens"], st[0]["vocab_size"], int(batch_size), int(seed), window) if st else None
    sizes = (len(st[1]), len(st[2])) if st is not None else (0, 0)
    gathered = comm.allgather((err, sig, sizes)) if size > 1 else [(err, sig, sizes)]
    bad = [(r, g[0]) for r, g in enumerate(gathered) if g[0] is not None]
    if bad:
        r, text = bad[0]
        raise UserError(text if r == rank else f"{tag()} cannot open data set {path}: rank {r} failed: {text}")
    if any(g[1] != gathered[0][1] for g in gathered):
        raise UserError(f"{tag()} {path}: ranks disagree on the data set or its reading (tokens, vocab, batch, "
                        f"seed, window): {[g[1] for g in gathered]}")
    steps = _steps_per_epoch(path, [g[2] for g in gathered], int(window), int(batch_size))
    m, train, val = st
    if len(val) < window:
        warn(f"{path}: this rank holds only {len(val)} val tokens, fewer than one window of {window}; "
             "it adds nothing to the val loss")
    return TokenReader(path=path, comm=comm, manifest=m, batch_size=batch_size, seed=seed, window=window,
                       train=train, val=val, steps_per_epoch=steps)
