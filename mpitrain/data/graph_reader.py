"""The per-rank reader of a graph data set: ``open_graphs`` (via ``open_dataset``) -> ``GraphReader``.

Ownership is the rows reader's (reader.plan_segments), with graphs for rows::

    K >= p  round-robin shards: rank r opens shards r, r+p, ...
    K <  p  the global graphs [0, G) cut into p contiguous ranges, read as slices of the shards

Streaming, as the rows reader does it: this rank's graphs are cut into blocks of ``block_graphs``
consecutive graphs; each epoch the block order is shuffled, ``window_blocks`` blocks at a time are
read and their graphs permuted, and consecutive b graphs of that stream are packed into one batch::

    epoch e:  blocks in order permutation(blocks)           seeded by (seed, e, rank, 0)
              window w: its graphs in permutation(graphs)   seeded by (seed, e, rank, 1, w)
              stream = window 0's graphs, window 1's, ...;  batch k = pack(stream[k*b : (k+1)*b])
    steps_per_epoch = min over ranks (graphs_r // b)        agreed at open; the rest dropped per epoch

``batches(epoch, start=k)`` skips the windows before batch k without reading them and then yields
exactly what an uninterrupted pass yields. Memory: one window (+ one partial batch), never the whole
share. ``test_batches(b)``: this rank's contiguous part of the test graphs, in order, b at a time.

At open every rank checks the files it reads (structure, attributes) and, with ``verify``, every
graph it will read (edges in range, offsets monotone, sizes agree, labels, finite values; the
checksum of each file it reads whole), one file at a time. One ``allgather`` then shares (error,
signature, graphs): a problem on any rank is a UserError on every rank, naming the rank, file and
graph. Cost per batch: one gather of its nodes and edges (GraphSet.pack).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime import UserError, log0, tag
from .graphs import GraphSet, open_graph_file, read_graphs, verify_graphs
from .shards import DataProblem, split_bounds
from .stream import StreamReader
from .spec import spec_of

BLOCK_GRAPHS = 1024


class GraphReader(StreamReader):
    """This rank's graphs; see the module docstring. Same surface as reader.Reader."""

    def __init__(self, *, path, comm, manifest, batch_size, seed, files, segments, test_file, test_range,
                 steps_per_epoch, graphs_per_rank, block_graphs=BLOCK_GRAPHS, window_blocks=4):
        self.path, self.comm = Path(path), comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.manifest = manifest
        self.spec = spec_of(manifest)
        self.features, self.classes = self.spec.features, self.spec.classes
        self.train_rows = int(manifest["train_rows"])
        self.test_rows = int(manifest["test"]["rows"])
        self.num_shards = len(manifest["shards"])
        self.batch_size, self.seed = int(batch_size), int(seed)
        self._files, self._test, self.test_range = files, test_file, test_range
        self.segments = segments
        self.rows_local = sum(hi - lo for _, lo, hi in segments)
        self.test_rows_local = test_range[1] - test_range[0]
        self.rows_per_rank = graphs_per_rank
        self.steps_per_epoch = int(steps_per_epoch)
        self.dropped_per_epoch = self.rows_local - self.steps_per_epoch * self.batch_size
        self.block_graphs, self.window_blocks = int(block_graphs), int(window_blocks)
        self._blocks = [(s, a, min(a + self.block_graphs, hi)) for s, lo, hi in segments
                        for a in range(lo, hi, self.block_graphs)]
        self.closed = False

    def describe(self) -> str:
        return (f"{self.path}: {self.train_rows} train graphs in {self.num_shards} shards, {self.test_rows} test "
                f"graphs, {self.spec.describe()}; {self.size} rank(s), {self.steps_per_epoch} steps/epoch of "
                f"{self.batch_size} graphs per rank")

    def __repr__(self) -> str:
        return f"<GraphReader {self.path} rank {self.rank}/{self.size}: {self.rows_local} graphs>"

    def _read(self, s, a, b) -> GraphSet:
        return read_graphs(self._files[s], self.path / self.manifest["shards"][s]["file"], a, b)

    def local_graphs(self) -> GraphSet:
        """All of this rank's training graphs in file order (reads them; for tools and tests)."""
        self._check_open()
        return GraphSet.concat([self._read(s, lo, hi) for s, lo, hi in self.segments]) if self.segments else \
            _empty(self.manifest)

    def test_graphs(self) -> GraphSet:
        """This rank's part of the test graphs."""
        self._check_open()
        lo, hi = self.test_range
        return read_graphs(self._test, self.path / self.manifest["test"]["file"], lo, hi) if hi > lo else \
            _empty(self.manifest)

    def _stream(self, epoch, start):
        b = self.batch_size
        total, need = self.steps_per_epoch * b, start * b
        order = np.random.default_rng([self.seed, epoch, self.rank, 0]).permutation(len(self._blocks))
        pos, carry, emitted, W = 0, None, 0, self.window_blocks
        for w, i0 in enumerate(range(0, len(self._blocks), W)):
            if pos >= total:
                break
            win = [self._blocks[j] for j in order[i0:i0 + W]]
            n = sum(hi - lo for _, lo, hi in win)
            if pos + n <= need:  # before the resume point: not read
                pos += n
                continue
            graphs = GraphSet.concat([self._read(*blk) for blk in win])
            perm = np.random.default_rng([self.seed, epoch, self.rank, 1, w]).permutation(n)
            graphs = graphs.reorder(perm[max(need - pos, 0):min(total - pos, n)])
            pos += n
            if carry is not None:
                graphs = GraphSet.concat([carry, graphs])
            full = len(graphs) // b
            for k in range(full):
                emitted += 1
                yield graphs.pack(np.arange(k * b, (k + 1) * b))
            carry = graphs.subset(full * b, len(graphs)) if len(graphs) > full * b else None
        assert carry is None and emitted == self.steps_per_epoch - start, (emitted, carry)

    def _test_stream(self, bs):
        lo, hi = self.test_range
        path = self.path / self.manifest["test"]["file"]
        for a in range(lo, hi, bs):
            g = read_graphs(self._test, path, a, min(a + bs, hi))
            yield g.pack(np.arange(len(g)))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        _close_all(list(self._files.values()) + [self._test])
        self._files, self._test = {}, None



def _empty(m) -> GraphSet:
    return GraphSet(np.zeros((0, m["features"])), np.zeros((0, 2)), np.zeros((0, m.get("edge_features", 0))),
                    np.zeros(1), np.zeros(1), np.zeros(0))


def _close_all(files) -> None:
    for f in files:
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass


def _open_local(path: Path, m: dict, rank: int, size: int, verify: bool, st: dict) -> None:
    """Open (and with ``verify`` check, one file at a time) what this rank reads; fills ``st``."""
    from .reader import plan_segments

    st["segments"] = plan_segments([e["rows"] for e in m["shards"]], size, rank)
    for s, lo, hi in st["segments"]:
        e, fp = m["shards"][s], path / m["shards"][s]["file"]
        st["files"][s] = open_graph_file(fp, manifest=m, entry=e, kind="train")
        if verify:
            verify_graphs(read_graphs(st["files"][s], fp, lo, hi), fp, m, e, lo=lo, whole=lo == 0 and hi == e["rows"])
    te, fp = m["test"], path / m["test"]["file"]
    st["test_range"] = tlo, thi = split_bounds(te["rows"], size)[rank]
    if thi > tlo:
        st["test"] = open_graph_file(fp, manifest=m, entry=te, kind="test")
        if verify:
            verify_graphs(read_graphs(st["test"], fp, tlo, thi), fp, m, te, lo=tlo, whole=thi - tlo == te["rows"])


def open_graphs(path, comm, manifest: dict, *, batch_size: int, seed: int = 0, verify: bool = True,
                block_graphs: int = BLOCK_GRAPHS, window_blocks: int = 4) -> GraphReader:
    """Open graph set ``path`` (its manifest already read) for this rank; collective over ``comm``."""
    from .reader import _hint

    rank, size = comm.Get_rank(), comm.Get_size()
    err, st = None, {"files": {}, "test": None, "segments": []}
    try:
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise UserError(f"{tag()} batch_size must be a positive integer (got {batch_size!r})")
        _open_local(Path(path), manifest, rank, size, verify, st)
    except DataProblem as e:
        err = f"{tag()} {e.file}: {e.reason}; {_hint(manifest, path)}"
    except UserError as e:
        err = str(e)
    except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
        err = f"{tag()} {type(e).__name__}: {e}"
    sig = {"features": manifest["features"], "classes": manifest["classes"], "train_rows": manifest["train_rows"],
           "batch_size": batch_size, "seed": int(seed)}
    n = sum(hi - lo for _, lo, hi in st["segments"]) if err is None else -1
    gathered = comm.allgather((err, sig, n)) if size > 1 else [(err, sig, n)]

    def fail(text):
        _close_all(list(st["files"].values()) + [st["test"]])
        raise UserError(text)

    bad = [(r, g[0]) for r, g in enumerate(gathered) if g[0] is not None]
    if bad:
        r, text = bad[0]
        fail(text if r == rank else f"{tag()} cannot open data set {path}: rank {r} failed: {text}")
    if any(g[1] != sig for g in gathered):
        fail(f"{tag()} {path}: ranks disagree on the data set or on batch_size/seed "
             f"({[g[1] for g in gathered]}); every rank must read the same set with the same job")
    per_rank = [g[2] for g in gathered]
    steps = min(per_rank) // int(batch_size)
    if steps == 0:
        r = int(np.argmin(per_rank))
        fail(f"{tag()} {path}: rank {r} holds only {per_rank[r]} training graphs, fewer than "
             f"batch_size={batch_size} ({manifest['train_rows']} graphs in {len(manifest['shards'])} "
             f"shards over {size} ranks); use a smaller batch size, fewer ranks or more graphs")
    from .reader import balance_advice

    advice = balance_advice([e["rows"] for e in manifest["shards"]], size, int(batch_size), "graphs")
    if advice:
        log0(f"warning: data set {path}: {advice}", comm=comm)
    return GraphReader(path=path, comm=comm, manifest=manifest, batch_size=int(batch_size), seed=seed,
                       files=st["files"], segments=st["segments"], test_file=st["test"],
                       test_range=st["test_range"], steps_per_epoch=steps, graphs_per_rank=per_rank,
                       block_graphs=block_graphs, window_blocks=window_blocks)


def graph_manifest(path) -> dict | None:
    """The manifest of ``path`` when it is a graph set, else None (the rows reader reports problems)."""
    from .graphs import is_graph_manifest
    from .shards import read_manifest

    try:
        m = read_manifest(path)
    except DataProblem:
        return None
    return m if is_graph_manifest(m) else None
