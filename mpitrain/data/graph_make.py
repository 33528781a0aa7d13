"""Making graph data sets: the seeded synthetic "colour homophily" set, and importing graphs from .npz.

The synthetic set (``make_graphs``): graph i is drawn from its own generator seeded by (seed, i), so
the contents depend only on --seed, --graphs, --test-graphs, --nodes (not on --shards)::

    n ~ U{A..B} nodes, coloured red/blue half and half (odd n: one colour gets the extra node);
    x = [is_red, is_blue, noise, noise]                        node features (4), no edge features
    m = round(1.5 n) undirected edges (both directions stored), no loops, no duplicates; each is a
        same-colour pair with probability 0.75 (drawn class "homophilous") or 0.25 ("heterophilous")
    label = 1 if more than half of the m edges join two nodes of the SAME colour, else 0

    class 0: o--x  x--o  o--x      class 1: o--o  x--x  o--o        o red, x blue
             mostly red-blue                mostly same colour

The label depends only on how the colours are connected: every graph's mean node features are
(0.5, 0.5, ~0, ~0) whatever its class, so a model of the mean node features stays at chance, while one
round of message passing can count same-colour neighbours.

Import (``import_graphs``): an .npz with the arrays of graphs.py (x, edges, node_ptr, edge_ptr, y,
optional edge_attr; optional x_test, edges_test, node_ptr_test, edge_ptr_test, y_test[, edge_attr_test]
as the test set), shuffled (seeded), split and sharded. Edges are re-sorted by receiver per graph.

Cost: O(total nodes + edges) time; memory: one shard for ``make`` (graphs are generated shard by shard),
the whole file for ``import``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime import UserError, tag
from .graphs import KIND, DataProblem, GraphSet, validate, write_graph_file
from .importer import MAX_CLASSES
from .make import DEFAULT_SHARDS, Progress, _check_sizes, _made, _prepare_out, split_rows
from .shards import FORMAT, MANIFEST, SCHEMA_VERSION, TEST_FILE, is_shard_name, shard_name, split_bounds, \
    write_json_atomic

GRAPH_FEATURES = 4
P_SAME = (0.25, 0.75)


def one_graph(seed: int, i: int, lo: int, hi: int):
    """Graph ``i`` of the synthetic stream: (x [n, 4], edges [2m, 2] sorted by receiver, label)."""
    rng = np.random.default_rng([int(seed), 0x6A, int(i)])
    n = int(rng.integers(lo, hi + 1))
    red = np.zeros(n, dtype=bool)
    red[:n // 2 + (int(rng.integers(2)) if n % 2 else 0)] = True
    rng.shuffle(red)
    m = min(max(1, int(round(1.5 * n))), n * (n - 1) // 2)
    p_same = P_SAME[int(rng.integers(2))]
    groups = (np.flatnonzero(red), np.flatnonzero(~red))
    und = np.zeros((0, 2), dtype=np.int64)
    for _ in range(20):  # candidates in bulk; duplicates and loops dropped, first m kept in draw order
        k = 8 * m
        same = rng.random(k) < p_same
        g = rng.integers(2, size=k)
        pick = lambda grp, u: grp[(u * len(grp)).astype(np.int64)] if len(grp) else np.full(k, -1)  # noqa: E731
        ua, ub = rng.random(k), rng.random(k)
        a = np.where(same, np.where(g == 0, pick(groups[0], ua), pick(groups[1], ua)), pick(groups[0], ua))
        b = np.where(same, np.where(g == 0, pick(groups[0], ub), pick(groups[1], ub)), pick(groups[1], ub))
        cand = np.concatenate([und, np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)])
        cand = cand[(cand[:, 0] != cand[:, 1]) & (cand[:, 0] >= 0)]
        _, first = np.unique(cand[:, 0] * n + cand[:, 1], return_index=True)
        und = cand[np.sort(first)][:m]
        if len(und) >= m:
            break
    same = int((red[und[:, 0]] == red[und[:, 1]]).sum())
    edges = np.concatenate([und, und[:, ::-1]]).astype(np.int32)
    edges = edges[np.lexsort((edges[:, 0], edges[:, 1]))]
    x = np.zeros((n, GRAPH_FEATURES), dtype=np.float32)
    x[:, 0], x[:, 1] = red, ~red
    x[:, 2:] = rng.standard_normal((n, GRAPH_FEATURES - 2))
    return x, edges, int(2 * same > len(und))


def synthetic_graphs(seed: int, lo_i: int, hi_i: int, nodes: tuple[int, int], prog=None) -> GraphSet:
    xs, es, ns, ms, ys = [], [], [], [], []
    for i in range(lo_i, hi_i):
        x, e, y = one_graph(seed, i, *nodes)
        xs.append(x), es.append(e), ns.append(len(x)), ms.append(len(e)), ys.append(y)
        if prog is not None and (i - lo_i) % 256 == 255:
            prog.add(256)
    cum = lambda v: np.concatenate([[0], np.cumsum(v)]).astype(np.int64)  # noqa: E731
    return GraphSet(np.concatenate(xs), np.concatenate(es), None, cum(ns), cum(ms), np.array(ys, np.int64))


def parse_nodes(text) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in str(text).split(":"))
    except ValueError:
        raise UserError(f"{tag()} --nodes {text!r}: expected A:B (e.g. 10:30), the range of nodes per graph") \
            from None
    if not 2 <= a <= b:
        raise UserError(f"{tag()} --nodes {text!r}: need 2 <= A <= B")
    return a, b


def write_graph_set(out, n_train: int, train_part, test_part, *, shards: int, classes: int, made: dict,
                    overwrite: bool = False, log=None) -> dict:
    """Write ``train_part(lo, hi)`` (a GraphSet of training graphs [lo, hi)) shard by shard and
    ``test_part()`` as test.h5 into ``out``; the manifest last. Memory: one shard. Returns the manifest."""
    _check_sizes(shards, n_train, out)
    out = _prepare_out(out, overwrite)
    entries, nodes, edges, part = [], 0, 0, None
    for i, (lo, hi) in enumerate(split_bounds(n_train, shards)):
        part = train_part(lo, hi)
        entries.append(write_graph_file(out / shard_name(i), part, classes=classes, offset=lo))
        nodes, edges = nodes + len(part.x), edges + len(part.edges)
    test = test_part()
    test_entry = write_graph_file(out / TEST_FILE, test, classes=classes, kind="test")
    manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "kind": KIND,
                "features": int(part.features), "edge_features": int(part.edge_features),
                "classes": int(classes), "train_rows": int(n_train), "shards": entries, "test": test_entry,
                "made": made}
    write_json_atomic(out / MANIFEST, manifest)
    keep = {e["file"] for e in entries}
    for p in out.iterdir():
        if is_shard_name(p.name) and p.name not in keep:
            p.unlink(missing_ok=True)
    if log is not None:
        log(f"{n_train} train graphs ({nodes} nodes, {edges} edges) in {shards} shards + {len(test)} test "
            f"graphs -> {out}")
    return manifest


def make_graphs(out, *, graphs: int = 4000, test_graphs: int | None = None, nodes=(10, 30), seed: int = 0,
                shards: int = DEFAULT_SHARDS, overwrite: bool = False, log=None) -> dict:
    """Write the seeded synthetic graph-classification set (module docstring), one shard at a time."""
    lo, hi = parse_nodes(nodes) if isinstance(nodes, str) else (int(nodes[0]), int(nodes[1]))
    test_graphs = max(1, graphs // 4) if test_graphs is None else int(test_graphs)
    if not isinstance(graphs, int) or graphs < 1 or test_graphs < 1:
        raise UserError(f"{tag()} {out}: --graphs and --test-graphs must be >= 1 (got {graphs}, {test_graphs})")
    _check_sizes(shards, graphs, out)
    prog = Progress(graphs + test_graphs, "making graphs", log)
    argv = ["make", "graphs", "--out", str(out), "--graphs", str(graphs), "--test-graphs", str(test_graphs),
            "--nodes", f"{lo}:{hi}", "--seed", str(seed), "--shards", str(shards)]
    made = _made("make graphs", {"graphs": graphs, "test_graphs": test_graphs, "nodes": [lo, hi], "seed": seed,
                                 "shards": shards, "rule": "label = more than half the edges join same colours"},
                 argv)
    m = write_graph_set(out, graphs, lambda a, b: synthetic_graphs(seed, a, b, (lo, hi), prog),
                        lambda: synthetic_graphs(seed, graphs, graphs + test_graphs, (lo, hi), prog), shards=shards,
                        classes=2, made=made, overwrite=overwrite, log=None)
    prog.finish(f"{graphs} train graphs in {shards} shards + {test_graphs} test graphs -> {out}")
    return m


# ----------------------------------------------------------------------------- import


# What each array of a graph .npz must be before it is cast to the file's dtype (graphs.DTYPES): its kinds
# of numbers, its dimensions, and the range the stored dtype holds (checked on the ORIGINAL values, so an
# int64 node id beyond int32 is refused instead of wrapping around into a valid one).
_NPZ = {"x": ("iufb", 2, "[nodes, features]"), "edges": ("iu", 2, "[edges, 2]"),
        "edge_attr": ("iufb", (1, 2), "[edges, edge_features]"), "node_ptr": ("iu", 1, "[graphs + 1]"),
        "edge_ptr": ("iu", 1, "[graphs + 1]"), "y": ("iu", 1, "[graphs]")}


def _npz_array(z, key: str, suffix: str, src) -> np.ndarray:
    """Array ``key+suffix`` of ``z``, checked on its own dtype and shape; UserError naming file and key."""
    from .graphs import DTYPES

    a, (kinds, ndim, shape) = np.asarray(z[f"{key}{suffix}"]), _NPZ[key]
    name = f"{src}: {key}{suffix}"
    if a.dtype.kind not in kinds or a.ndim not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        what = "integers" if kinds == "iu" else "numbers"
        raise UserError(f"{tag()} {name} must be {what} of shape {shape}, got {a.dtype} {a.shape}")
    if key == "edges" and a.shape[1] != 2:
        raise UserError(f"{tag()} {name} must have shape [edges, 2] (sender, receiver), got {a.shape}")
    dt = DTYPES[key]
    if a.size and dt.kind == "i" and a.dtype.kind in "iu":
        lo, hi, info = int(a.min()), int(a.max()), np.iinfo(dt)
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise UserError(f"{tag()} {name} holds {bad}, beyond the {dt.name} range of the format "
                            f"[{info.min}, {info.max}]")
    if a.size and dt.kind == "f" and a.dtype.kind == "f":
        big = np.abs(a[np.isfinite(a)]).max(initial=0)
        if big > np.finfo(dt).max:
            raise UserError(f"{tag()} {name} holds {big:g}, beyond the float32 range of the format")
    return a


def _graphs_from(z, src, suffix="") -> GraphSet | None:
    names = ["x", "edges", "node_ptr", "edge_ptr", "y"]
    have = [f"{k}{suffix}" in z for k in names]
    if not any(have):
        return None
    if not all(have):
        missing = [f"{k}{suffix}" for k, h in zip(names, have) if not h]
        raise UserError(f"{tag()} {src}: a graph .npz needs the arrays x, edges, node_ptr, edge_ptr, y; "
                        f"missing {', '.join(missing)}")
    arrays = {k: _npz_array(z, k, suffix, src) for k in names}
    ea = _npz_array(z, "edge_attr", suffix, src) if f"edge_attr{suffix}" in z else None
    if ea is not None and len(ea) != len(arrays["edges"]):
        raise UserError(f"{tag()} {src}: edge_attr{suffix} has {len(ea)} rows but edges{suffix} has "
                        f"{len(arrays['edges'])} (one row of edge features per edge)")
    if ea is not None and ea.ndim == 1:
        ea = ea[:, None]
    if len(arrays["y"]) and int(arrays["y"].max()) >= MAX_CLASSES:
        raise UserError(f"{tag()} {src}: y{suffix} holds label {int(arrays['y'].max())}, beyond {MAX_CLASSES} "
                        "(2**24) classes; labels are class numbers 0..classes-1")
    g = GraphSet(arrays["x"], arrays["edges"], ea, arrays["node_ptr"], arrays["edge_ptr"], arrays["y"])
    try:
        validate(g, f"{src} (arrays{suffix or ''})", classes=int(g.y.max()) + 1 if len(g.y) else 1,
                 features=g.features, edge_features=g.edge_features)
    except DataProblem as e:
        raise UserError(f"{tag()} {e}") from None
    return g


def sort_by_receiver(g: GraphSet) -> GraphSet:
    owner = np.repeat(np.arange(len(g)), np.diff(g.edge_ptr))
    order = np.lexsort((g.edges[:, 1], owner))
    return GraphSet(g.x, g.edges[order], g.edge_attr[order], g.node_ptr, g.edge_ptr, g.y)


def import_graphs(src, out, *, shards: int = DEFAULT_SHARDS, seed: int = 0, test_fraction: float = 0.2,
                  classes: int | None = None, shuffle: bool = True, overwrite: bool = False, log=None) -> dict:
    """Import graphs from an .npz (module docstring) into graph shards."""
    src = Path(src)
    try:
        z = np.load(src, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - the user's file
        raise UserError(f"{tag()} {src}: cannot read as .npz ({e})") from None
    with z:
        train, test = _graphs_from(z, src), _graphs_from(z, src, "_test")
    if train is None or len(train) == 0:
        raise UserError(f"{tag()} {src}: holds no graphs")
    if shuffle:
        train = train.reorder(np.random.default_rng([int(seed), 0x1A9]).permutation(len(train)))
    if test is None:
        nt = split_rows(len(train), test_fraction, src)
        if nt < 1:
            raise UserError(f"{tag()} {src}: --test-fraction {test_fraction} leaves no test graphs")
        test, train = train.subset(0, nt), train.subset(nt, len(train))
    elif (test.features, test.edge_features) != (train.features, train.edge_features):
        raise UserError(f"{tag()} {src}: the test graphs have {test.features} node / {test.edge_features} edge "
                        f"features, the training graphs {train.features} / {train.edge_features}")
    ymax = max(int(train.y.max()), int(test.y.max()) if len(test) else 0)
    if classes is None:
        classes = max(2, ymax + 1)
    elif ymax >= classes:
        raise UserError(f"{tag()} {src}: label {ymax} out of range for --classes {classes}")
    argv = ["import", str(src), "--out", str(out), "--shards", str(shards), "--seed", str(seed),
            "--test-fraction", str(test_fraction)] + ([] if shuffle else ["--no-shuffle"])
    made = _made("import graphs", {"source": str(src.resolve()), "shards": shards, "seed": seed,
                                   "shuffle": shuffle}, argv)
    train, test = sort_by_receiver(train), sort_by_receiver(test)
    return write_graph_set(out, len(train), train.subset, lambda: test, shards=shards, classes=classes,
                           made=made, overwrite=overwrite, log=log)


def is_graph_npz(src) -> bool:
    """True when ``src`` is an .npz holding graph arrays (edges and node_ptr)."""
    try:
        with np.load(src, allow_pickle=False) as z:
            return "edges" in z.files and "node_ptr" in z.files
    except Exception:  # noqa: BLE001 - not ours to judge here; import_file reports it
        return False
