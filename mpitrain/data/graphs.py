"""Graph data sets: the on-disk format, validation, and packing graphs into one batch (pure, no MPI).

A graph set is a directory like any other (manifest.json written last, atomic files)::

    DIR/manifest.json     kind "graphs", features (node), edge_features, classes, train_rows (= graphs),
                          shards [{file, rows (graphs), offset, nodes, edges, checksum}], test {...}
    DIR/train-00000.h5    graphs [offset, offset + rows) of the training set
    DIR/test.h5           the held-out graphs

Every ``.h5`` file of G graphs, N nodes, E directed edges holds::

    x          float32 [N, features]        node features, graph after graph
    edges      int32   [E, 2]               (sender, receiver), LOCAL to its graph: 0 <= v < nodes of it;
                                            sorted by receiver inside each graph
    edge_attr  float32 [E, edge_features]   only when edge_features > 0
    node_ptr   int64   [G+1]                graph g owns nodes node_ptr[g]:node_ptr[g+1] (>= 1 node each)
    edge_ptr   int64   [G+1]                ... and edges edge_ptr[g]:edge_ptr[g+1] (0 is fine)
    y          int64   [G]                  labels in [0, classes)

with the attributes format, schema_version, kind (train | test), graphs, nodes, edges, features,
edge_features, classes, offset, checksum (sha256 over the arrays' little-endian bytes, in that order).

Packing (``GraphSet.pack(idx)``): b graphs become ONE block-diagonal graph, node ids shifted by the
nodes before them, so edges never cross graphs and the receiver order stays sorted::

    graph 3: nodes 0..4  edges (1,0) (0,1) ...        packed: nodes 0..4   edges (1,0) (0,1) ...
    graph 7: nodes 0..2  edges (2,0) ...      --->            nodes 5..7   edges (7,5) ...
                                                      node_ptr [0, 5, 8]

Cost: packing is one gather of the chosen graphs' nodes and edges, O(N_b + E_b) per batch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .shards import FORMAT, SCHEMA_VERSION, DataProblem, _fsync_path, tmp_name

KIND = "graphs"
ARRAYS = ("x", "edges", "edge_attr", "node_ptr", "edge_ptr", "y")
DTYPES = {"x": np.dtype("<f4"), "edges": np.dtype("<i4"), "edge_attr": np.dtype("<f4"),
          "node_ptr": np.dtype("<i8"), "edge_ptr": np.dtype("<i8"), "y": np.dtype("<i8")}


def _ranges(starts, counts):
    """Concatenated ``arange(s, s + c)`` for each (s, c), without a Python loop."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.repeat(np.asarray(starts, dtype=np.int64) - first, counts) + np.arange(total)


class GraphSet:
    """Graphs in memory, in the file layout (``ARRAYS``). ``pack(idx)`` makes one batch."""

    def __init__(self, x, edges, edge_attr, node_ptr, edge_ptr, y):
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.edges = np.ascontiguousarray(edges, dtype=np.int32).reshape(-1, 2)
        ea = np.zeros((len(self.edges), 0), np.float32) if edge_attr is None else np.asarray(edge_attr)
        ea = ea.reshape(len(self.edges), ea.shape[-1] if ea.ndim == 2 else (ea.size // max(len(self.edges), 1)))
        self.edge_attr = np.ascontiguousarray(ea, dtype=np.float32)
        self.node_ptr = np.ascontiguousarray(node_ptr, dtype=np.int64)
        self.edge_ptr = np.ascontiguousarray(edge_ptr, dtype=np.int64)
        self.y = np.ascontiguousarray(y, dtype=np.int64)

    def __len__(self):
        return len(self.y)

    @property
    def features(self) -> int:
        return self.x.shape[1]

    @property
    def edge_features(self) -> int:
        return self.edge_attr.shape[1]

    def arrays(self) -> dict:
        return {k: getattr(self, k) for k in ARRAYS}

    def pack(self, idx):
        """Graphs ``idx`` (in that order) as ``(x, edges, edge_attr, node_ptr, y)`` (see module doc)."""
        idx = np.asarray(idx, dtype=np.int64)
        n0, e0 = self.node_ptr[idx], self.edge_ptr[idx]
        ns, es = self.node_ptr[idx + 1] - n0, self.edge_ptr[idx + 1] - e0
        ptr = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(ns, out=ptr[1:])
        eidx = _ranges(e0, es)
        edges = self.edges[eidx]
        edges += np.repeat(ptr[:-1], es).astype(np.int32)[:, None]
        return self.x[_ranges(n0, ns)], edges, self.edge_attr[eidx], ptr, self.y[idx]

    def reorder(self, idx) -> "GraphSet":
        """Graphs ``idx`` in that order as a GraphSet of their own (edges local again)."""
        idx = np.asarray(idx, dtype=np.int64)
        x, edges, ea, ptr, y = self.pack(idx)
        es = self.edge_ptr[idx + 1] - self.edge_ptr[idx]
        eptr = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(es, out=eptr[1:])
        edges -= np.repeat(ptr[:-1], es).astype(np.int32)[:, None]
        return GraphSet(x, edges, ea, ptr, eptr, y)

    def subset(self, lo: int, hi: int) -> "GraphSet":
        """Graphs [lo, hi) as a GraphSet of their own (pointers rebased to 0)."""
        a, b = self.node_ptr[lo], self.node_ptr[hi]
        c, d = self.edge_ptr[lo], self.edge_ptr[hi]
        return GraphSet(self.x[a:b], self.edges[c:d], self.edge_attr[c:d], self.node_ptr[lo:hi + 1] - a,
                        self.edge_ptr[lo:hi + 1] - c, self.y[lo:hi])

    @staticmethod
    def concat(parts: list["GraphSet"]) -> "GraphSet":
        if len(parts) == 1:
            return parts[0]
        nptr, eptr, n, e = [np.zeros(1, np.int64)], [np.zeros(1, np.int64)], 0, 0
        for p in parts:
            nptr.append(p.node_ptr[1:] + n)
            eptr.append(p.edge_ptr[1:] + e)
            n, e = n + int(p.node_ptr[-1]), e + int(p.edge_ptr[-1])
        cat = lambda k: np.concatenate([getattr(p, k) for p in parts])  # noqa: E731
        return GraphSet(cat("x"), cat("edges"), cat("edge_attr"), np.concatenate(nptr), np.concatenate(eptr),
                        cat("y"))


def checksum_graphs(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in ARRAYS:
        a = arrays.get(k)
        if a is None:
            continue
        h.update(k.encode() + hashlib.sha256(np.ascontiguousarray(a, dtype=DTYPES[k]).data).digest())
    return "sha256:" + h.hexdigest()


def validate(g: GraphSet, where, *, classes: int, features: int, edge_features: int, first: int = 0) -> None:
    """Raise DataProblem(where, ...) naming the first bad graph (``first`` + its index in the file)."""
    G = len(g.y)
    if g.x.ndim != 2 or g.x.shape[1] != features:
        raise DataProblem(where, f"x has shape {g.x.shape}, expected (nodes, {features})")
    if g.edge_attr.shape[1] != edge_features:
        raise DataProblem(where, f"edge_attr has {g.edge_attr.shape[1]} features, expected {edge_features}")
    for name, ptr, total, least in (("node_ptr", g.node_ptr, len(g.x), 1), ("edge_ptr", g.edge_ptr,
                                                                             len(g.edges), 0)):
        if ptr.shape != (G + 1,):
            raise DataProblem(where, f"{name} has shape {ptr.shape}, expected ({G + 1},) for {G} graphs")
        if ptr[0] != 0:
            raise DataProblem(where, f"{name}[0] = {ptr[0]}, expected 0")
        d = np.diff(ptr)
        if (d < least).any():
            bad = int(np.flatnonzero(d < least)[0])
            what = "is not monotone" if d[bad] < 0 else "gives it no nodes (every graph needs one)"
            raise DataProblem(where, f"graph {first + bad}: {name} {what} ({name}[{bad}] = {ptr[bad]}, "
                                     f"{name}[{bad + 1}] = {ptr[bad + 1]})")
        if ptr[-1] != total:
            raise DataProblem(where, f"{name}[-1] = {ptr[-1]} but the file holds {total} "
                                     f"{'nodes' if name == 'node_ptr' else 'edges'} (sizes disagree)")
    if len(g.edge_attr) != len(g.edges):
        raise DataProblem(where, f"edge_attr has {len(g.edge_attr)} rows but there are {len(g.edges)} edges")
    sizes = np.diff(g.node_ptr)
    limit = np.repeat(sizes, np.diff(g.edge_ptr))[:, None]
    bad = (g.edges < 0) | (g.edges >= limit)
    if bad.any():
        e = int(np.flatnonzero(bad.any(axis=1))[0])
        gi = int(np.searchsorted(g.edge_ptr, e, side="right") - 1)
        pair = tuple(int(v) for v in g.edges[e])
        raise DataProblem(where, f"graph {first + gi}: edge {e - int(g.edge_ptr[gi])} = {pair} "
                                 f"is out of range for its {int(sizes[gi])} nodes")
    if G and (g.y.min() < 0 or g.y.max() >= classes):
        gi = int(np.flatnonzero((g.y < 0) | (g.y >= classes))[0])
        raise DataProblem(where, f"graph {first + gi}: label {g.y[gi]} out of range (classes={classes})")
    for name, a in (("x", g.x), ("edge_attr", g.edge_attr)):
        if a.size and not np.isfinite(a).all():
            row = int(np.flatnonzero(~np.isfinite(a).all(axis=1))[0])
            ptr = g.node_ptr if name == "x" else g.edge_ptr
            gi = int(np.searchsorted(ptr, row, side="right") - 1)
            raise DataProblem(where, f"graph {first + gi}: {name} contains NaN or Inf (row {row})")


# ----------------------------------------------------------------------------- files


def write_graph_file(path, g: GraphSet, *, classes: int, kind: str = "train", offset: int = 0) -> dict:
    """Write one graph file atomically; returns its manifest entry (without ``offset`` for test)."""
    import h5py

    path = Path(path)
    validate(g, path, classes=classes, features=g.features, edge_features=g.edge_features)
    arrays = g.arrays()
    if g.edge_features == 0:
        arrays.pop("edge_attr")
    checksum = checksum_graphs(arrays)
    tmp = tmp_name(path)
    try:
        with h5py.File(tmp, "w") as f:
            for k, a in arrays.items():
                f.create_dataset(k, data=np.ascontiguousarray(a, dtype=DTYPES[k]))
            at = f.attrs
            for k, v in (("format", FORMAT), ("schema_version", SCHEMA_VERSION), ("kind", kind),
                         ("graphs", len(g)), ("nodes", len(g.x)), ("edges", len(g.edges)),
                         ("features", g.features), ("edge_features", g.edge_features), ("classes", classes),
                         ("offset", offset), ("checksum", checksum)):
                at[k] = v
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    entry = {"file": path.name, "rows": len(g), "nodes": int(len(g.x)), "edges": int(len(g.edges)),
             "checksum": checksum}
    if kind == "train":
        entry["offset"] = int(offset)
    return entry


def open_graph_file(path, *, manifest: dict, entry: dict, kind: str):
    """Open one graph file read-only, its structure and attributes checked (no graphs read)."""
    from .shards import open_h5

    return open_h5(path, lambda f, p: _check_attrs(f, p, manifest, entry, kind))


def read_graphs(f, path, lo: int, hi: int) -> GraphSet:
    """Graphs [lo, hi) of an open graph file (pointers rebased); DataProblem when the arrays disagree."""
    try:
        nptr, eptr = f["node_ptr"][lo:hi + 1], f["edge_ptr"][lo:hi + 1]
        if len(nptr) != hi - lo + 1 or len(eptr) != hi - lo + 1:
            raise DataProblem(path, f"node_ptr/edge_ptr hold fewer than {hi + 1} entries "
                                    f"({len(f['node_ptr'])}, {len(f['edge_ptr'])}; sizes disagree)")
        a, b, c, d = int(nptr[0]), int(nptr[-1]), int(eptr[0]), int(eptr[-1])
        if not (0 <= a <= b <= len(f["x"]) and 0 <= c <= d <= len(f["edges"])):
            raise DataProblem(path, f"node_ptr/edge_ptr point outside the file's {len(f['x'])} nodes / "
                                    f"{len(f['edges'])} edges (sizes disagree)")
        ea = f["edge_attr"][c:d] if "edge_attr" in f else None
        return GraphSet(f["x"][a:b], f["edges"][c:d], ea, nptr - a, eptr - c, f["y"][lo:hi])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataProblem(path, f"unreadable arrays ({e}); the file is damaged") from None


def read_graph_file(path, *, manifest: dict, entry: dict, kind: str, verify: bool = True,
                    lo: int = 0, hi: int | None = None) -> GraphSet:
    """Graphs [lo, hi) of one file, checked against the manifest; DataProblem naming file and graph.

    Structure and attributes are always checked; with ``verify`` the graphs read are validated and,
    when the whole file is read, its checksum is recomputed.
    """
    rows = int(entry["rows"])
    hi = rows if hi is None else hi
    with open_graph_file(path, manifest=manifest, entry=entry, kind=kind) as f:
        g = read_graphs(f, path, lo, hi)
    if verify:
        verify_graphs(g, path, manifest, entry, lo=lo, whole=lo == 0 and hi == rows)
    return g


def verify_graphs(g: GraphSet, path, manifest: dict, entry: dict, *, lo: int, whole: bool) -> None:
    """validate() against the manifest; the checksum too when ``g`` is the whole file."""
    validate(g, path, classes=manifest["classes"], features=manifest["features"],
             edge_features=manifest.get("edge_features", 0), first=lo)
    if whole:
        arrays = g.arrays()
        if g.edge_features == 0:
            arrays.pop("edge_attr")
        if checksum_graphs(arrays) != entry["checksum"]:
            raise DataProblem(path, "checksum mismatch: the contents changed since the set was made "
                                    "(corrupted or edited)")


def _check_attrs(f, path, manifest, entry, kind) -> None:
    import h5py

    for name in ("x", "edges", "node_ptr", "edge_ptr", "y") + (("edge_attr",) if manifest.get(
            "edge_features", 0) else ()):
        if name not in f or not isinstance(f[name], h5py.Dataset):
            raise DataProblem(path, f"has no dataset {name!r} (not a graph shard?)")
        if f[name].dtype != DTYPES[name]:
            raise DataProblem(path, f"{name} has dtype {f[name].dtype}, expected {DTYPES[name]}")
    if f["edges"].ndim != 2 or f["edges"].shape[1] != 2:
        raise DataProblem(path, f"edges has shape {f['edges'].shape}, expected (edges, 2)")
    if len(f["y"]) != entry["rows"]:
        raise DataProblem(path, f"holds {len(f['y'])} graphs, manifest.json says {entry['rows']}")
    a = f.attrs
    want = {"schema_version": SCHEMA_VERSION, "features": manifest["features"],
            "edge_features": manifest.get("edge_features", 0), "classes": manifest["classes"],
            "graphs": entry["rows"], "offset": entry.get("offset", 0)}
    for k, v in want.items():
        if k not in a:
            raise DataProblem(path, f"attribute {k!r} missing")
        if int(a[k]) != v:
            raise DataProblem(path, f"attribute {k}={int(a[k])}, manifest.json says {v}")
    got_kind = a.get("kind", kind)
    got_kind = got_kind.decode() if isinstance(got_kind, bytes) else str(got_kind)
    if got_kind != kind:
        raise DataProblem(path, f"is a {got_kind} file, expected {kind}")
    ck = a.get("checksum", "")
    if (ck.decode() if isinstance(ck, bytes) else str(ck)) != entry["checksum"]:
        raise DataProblem(path, "checksum attribute differs from manifest.json (the file belongs to another "
                                "data set or was rewritten)")


def is_graph_manifest(manifest) -> bool:
    return isinstance(manifest, dict) and manifest.get("kind") == KIND
