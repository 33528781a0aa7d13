"""The per-rank reader of a graph data set: ``open_graphs`` (via ``open_dataset``) -> ``GraphReader``.

Ownership is the rows reader's (reader.plan_segments), with graphs for rows::

    K >= p  round-robin shards: rank r opens shards r, r+p, ...
    K <  p  the global graphs [0, G) cut into p contiguous ranges, read as slices of the shards

Each rank loads its own graphs at open (memory: its share of the set, nodes + edges) and
validates them (edges in range, offsets monotone, sizes agree, labels, finite values; the
checksum of each file it reads whole). One ``allgather`` then shares (error, signature,
graphs): a problem on any rank is a UserError on every rank, naming the rank, file and graph.

    epoch e:  perm = permutation(graphs_r) seeded by (seed, e, rank)
              batch k = pack(perm[k*b : (k+1)*b])       b graphs -> one block-diagonal graph
    steps_per_epoch = min over ranks (graphs_r // b)    agreed at open; the rest dropped per epoch

``batches(epoch, start=k)`` yields exactly what an uninterrupted pass yields from batch k on
(the permutation is recomputed, nothing is read). ``test_batches(b)``: this rank's contiguous
part of the test graphs, in order. Cost per batch: one gather of its nodes and edges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime import UserError, log0, tag
from .graphs import GraphSet, read_graph_file
from .shards import DataProblem, split_bounds
from .spec import spec_of


class GraphReader:
    """This rank's graphs; see the module docstring. Same surface as reader.Reader."""

    def __init__(self, *, path, comm, manifest, batch_size, seed, train: GraphSet, test: GraphSet,
                 steps_per_epoch, graphs_per_rank):
        self.path, self.comm = Path(path), comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.manifest = manifest
        self.spec = spec_of(manifest)
        self.features, self.classes = self.spec.features, self.spec.classes
        self.train_rows = int(manifest["train_rows"])
        self.test_rows = int(manifest["test"]["rows"])
        self.num_shards = len(manifest["shards"])
        self.batch_size, self.seed = int(batch_size), int(seed)
        self._train, self._test = train, test
        self.rows_local = len(train)
        self.test_rows_local = len(test)
        self.rows_per_rank = graphs_per_rank
        self.steps_per_epoch = int(steps_per_epoch)
        self.dropped_per_epoch = self.rows_local - self.steps_per_epoch * self.batch_size
        self.closed = False

    def describe(self) -> str:
        return (f"{self.path}: {self.train_rows} train graphs in {self.num_shards} shards, {self.test_rows} test "
                f"graphs, {self.spec.describe()}; {self.size} rank(s), {self.steps_per_epoch} steps/epoch of "
                f"{self.batch_size} graphs per rank")

    def __repr__(self) -> str:
        return f"<GraphReader {self.path} rank {self.rank}/{self.size}: {self.rows_local} graphs>"

    def _check_open(self):
        if self.closed:
            raise ValueError("reader is closed")

    def order(self, epoch: int) -> np.ndarray:
        """This rank's graph order in ``epoch`` (seeded by seed, epoch, rank)."""
        return np.random.default_rng([self.seed, int(epoch), self.rank, 0]).permutation(self.rows_local)

    def batches(self, epoch: int, start: int = 0):
        """Yield exactly ``steps_per_epoch - start`` packed batches (spec.py, kind graphs)."""
        self._check_open()
        epoch, start = int(epoch), int(start)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start <= self.steps_per_epoch:
            raise ValueError(f"start={start} is outside 0..{self.steps_per_epoch} (steps_per_epoch)")
        return self._stream(epoch, start)

    def _stream(self, epoch, start):
        perm, b = self.order(epoch), self.batch_size
        for k in range(start, self.steps_per_epoch):
            yield self._train.pack(perm[k * b:(k + 1) * b])

    def test_batches(self, batch_size: int):
        self._check_open()
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return (self._test.pack(np.arange(a, min(a + batch_size, len(self._test))))
                for a in range(0, len(self._test), batch_size))

    def close(self) -> None:
        self.closed = True
        self._train = self._test = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _load_local(path: Path, m: dict, rank: int, size: int, verify: bool):
    from .reader import plan_segments

    parts = []
    for s, lo, hi in plan_segments([e["rows"] for e in m["shards"]], size, rank):
        e = m["shards"][s]
        parts.append(read_graph_file(path / e["file"], manifest=m, entry=e, kind="train", verify=verify,
                                     lo=lo, hi=hi))
    te = m["test"]
    tlo, thi = split_bounds(te["rows"], size)[rank]
    test = read_graph_file(path / te["file"], manifest=m, entry=te, kind="test", verify=verify, lo=tlo, hi=thi)
    empty = GraphSet(np.zeros((0, m["features"])), np.zeros((0, 2)), np.zeros((0, m.get("edge_features", 0))),
                     np.zeros(1), np.zeros(1), np.zeros(0))
    return GraphSet.concat(parts) if parts else empty, test


def open_graphs(path, comm, manifest: dict, *, batch_size: int, seed: int = 0, verify: bool = True) -> GraphReader:
    """Open graph set ``path`` (its manifest already read) for this rank; collective over ``comm``."""
    from .reader import _hint

    rank, size = comm.Get_rank(), comm.Get_size()
    err, train, test = None, None, None
    try:
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise UserError(f"{tag()} batch_size must be a positive integer (got {batch_size!r})")
        train, test = _load_local(Path(path), manifest, rank, size, verify)
    except DataProblem as e:
        err = f"{tag()} {e.file}: {e.reason}; {_hint(manifest, path)}"
    except UserError as e:
        err = str(e)
    except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
        err = f"{tag()} {type(e).__name__}: {e}"
    sig = {"features": manifest["features"], "classes": manifest["classes"], "train_rows": manifest["train_rows"],
           "batch_size": batch_size, "seed": int(seed)}
    n = len(train) if train is not None else -1
    gathered = comm.allgather((err, sig, n)) if size > 1 else [(err, sig, n)]
    bad = [(r, g[0]) for r, g in enumerate(gathered) if g[0] is not None]
    if bad:
        r, text = bad[0]
        if r == rank:
            raise UserError(text)
        raise UserError(f"{tag()} cannot open data set {path}: rank {r} failed: {text}")
    if any(g[1] != sig for g in gathered):
        raise UserError(f"{tag()} {path}: ranks disagree on the data set or on batch_size/seed "
                        f"({[g[1] for g in gathered]}); every rank must read the same set with the same job")
    per_rank = [g[2] for g in gathered]
    steps = min(per_rank) // int(batch_size)
    if steps == 0:
        r = int(np.argmin(per_rank))
        raise UserError(f"{tag()} {path}: rank {r} holds only {per_rank[r]} training graphs, fewer than "
                        f"batch_size={batch_size} ({manifest['train_rows']} graphs in {len(manifest['shards'])} "
                        f"shards over {size} ranks); use a smaller batch size, fewer ranks or more graphs")
    used = steps * int(batch_size) * size
    if used < 0.9 * manifest["train_rows"]:
        log0(f"warning: data set {path}: only {used} of {manifest['train_rows']} training graphs are used per "
             f"epoch ({len(manifest['shards'])} shards over {size} ranks, batch {batch_size}); remake it with a "
             f"shard count that is a multiple of {size}", comm=comm)
    return GraphReader(path=path, comm=comm, manifest=manifest, batch_size=int(batch_size), seed=seed,
                       train=train, test=test, steps_per_epoch=steps, graphs_per_rank=per_rank)


def graph_manifest(path) -> dict | None:
    """The manifest of ``path`` when it is a graph set, else None (the rows reader reports problems)."""
    from .graphs import is_graph_manifest
    from .shards import read_manifest

    try:
        m = read_manifest(path)
    except DataProblem:
        return None
    return m if is_graph_manifest(m) else None
