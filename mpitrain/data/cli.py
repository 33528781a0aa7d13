"""``python -m mpitrain data {make,import,check,baseline}`` (rows, graph and token sets).

Safe under ``mpirun -n N``: rank 0 does the work (writing, checking) while the
other ranks wait without spinning; the exit status is shared, so every rank exits
with the same code and the error is printed once, by rank 0.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from ..runtime import UserError, error_message, get_comm, log0, tag
from .make import DEFAULT_SHARDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Make, import and check HDF5 data sets (a directory of train shards, "
                          "test.h5 and manifest.json).")
    sub = parser.add_subparsers(dest="data_command", metavar="{make,import,check,baseline}", required=True)

    mk = sub.add_parser("make", help="make a built-in data set (digits, synthetic, graphs)",
                        description="Make a built-in data set.")
    mksub = mk.add_subparsers(dest="dataset", metavar="{digits,synthetic,graphs,pycode}", required=True)

    def common(p, seed_help):
        p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
        p.add_argument("--shards", type=int, default=DEFAULT_SHARDS, metavar="K",
                       help=f"number of train shard files (default {DEFAULT_SHARDS}; a multiple "
                            "of the rank count balances the ranks)")
        p.add_argument("--seed", type=int, default=0, help=seed_help)
        p.add_argument("--force", action="store_true",
                       help="replace a data set already in --out")
        p.add_argument("--allow-no-test", action="store_true",
                       help="allow a set whose test split is empty (otherwise an error: training "
                            "could not measure test accuracy)")

    dg = mksub.add_parser(
        "digits", help="the 1797 8x8 handwritten digits bundled with scikit-learn",
        description="The 1797 8x8 handwritten digits that scikit-learn ships (no download); "
                    "features scaled to [0, 1], 10 classes; split by a seeded shuffle into "
                    "train shards and test.h5.")
    common(dg, "seed of the train/test split (default 0)")
    dg.add_argument("--test-fraction", type=float, default=0.2, metavar="F",
                    help="fraction held out as the test set (default 0.2)")
    dg.set_defaults(func=cmd_make)

    sy = mksub.add_parser(
        "synthetic", help="a seeded classification set of any size",
        description="A seeded synthetic classification set: x ~ N(0,1), labels from a random "
                    "teacher network. Written chunk by chunk, so it may be larger than memory; "
                    "the contents depend only on --seed, --rows, --features, --classes.")
    common(sy, "seed of the data and the teacher network (default 0)")
    sy.add_argument("--rows", type=int, default=20000, help="training rows (default 20000)")
    sy.add_argument("--features", type=int, default=256, help="features per row (default 256)")
    sy.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    sy.add_argument("--test-rows", type=int, default=4000,
                    help="held-out test rows, generated after the training rows (default 4000)")
    sy.add_argument("--chunk-rows", type=int, default=8192,
                    help="rows generated and written at a time; bounds memory (default 8192)")
    sy.set_defaults(func=cmd_make)

    _add_make_graphs(mksub, common)
    _add_pycode(mksub)

    im = sub.add_parser(
        "import", help="import your own data from .npz or .csv",
        description="Import a data set. Text (FILE.txt, several files, or a DIR of them): their bytes, "
                    "concatenated in order, become byte tokens (vocab 256) for a GPT; the last "
                    "--val-fraction is the val split. FILE.npz: arrays 'x' [N, ...] (flattened to [N, D]) and "
                    "'y' [N] integer labels 0..C-1; optional 'x_test'/'y_test' become the test "
                    "set. FILE.csv: comma-separated numbers, one row per sample, the LABEL IN THE "
                    "LAST COLUMN; UTF-8 (a byte-order mark is fine), any line ends; a header line is "
                    "optional (detected when the first line is not numeric, or is the column numbers "
                    "0..K-1 pandas writes; a pandas index column is dropped). The file is loaded into memory, shuffled (seeded), split into "
                    "train/test and sharded. A graph .npz (arrays x, edges, node_ptr, edge_ptr, y, optional "
                    "edge_attr and *_test) becomes a graph set (docs/graphs.md).")
    im.add_argument("file", metavar="FILE", nargs="+",
                    help="a .npz or .csv file; or text: FILE.txt [FILE2 ...] or DIR (-> byte tokens)")
    common(im, "seed of the shuffle and train/test split (default 0)")
    im.add_argument("--test-fraction", type=float, default=0.2, metavar="F",
                    help="fraction held out as the test set when the file has none (default 0.2)")
    im.add_argument("--classes", type=int, default=None,
                    help="number of classes (default: largest label + 1)")
    im.add_argument("--no-shuffle", action="store_true",
                    help="keep the file's row order (the test set is then its first rows)")
    im.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                    help="text: the last fraction F of the byte stream is the val split (default 0.1)")
    im.set_defaults(func=cmd_import)

    ck = sub.add_parser(
        "check", help="validate a data set: every file, every row, checksums",
        description="Validate a data set: manifest, every shard and the test file (structure, "
                    "schema, labels in range, no NaN/Inf, checksums). Prints a per-file summary; "
                    "exits non-zero on any problem.")
    ck.add_argument("dir", metavar="DIR", help="the data set directory")
    ck.set_defaults(func=cmd_check)
    _add_baseline(sub)


def _add_make_graphs(mksub, common) -> None:
    gr = mksub.add_parser(
        "graphs", help="a seeded graph-classification set (label: how colours are connected)",
        description="A seeded synthetic graph-classification set: nodes coloured red/blue half and half; "
                    "label 1 when more than half of the edges join nodes of the same colour. Mean node "
                    "features say nothing about the label; message passing does (docs/graphs.md).")
    common(gr, "seed of the graphs (default 0)")
    gr.add_argument("--graphs", type=int, default=4000, metavar="N", help="training graphs (default 4000)")
    gr.add_argument("--test-graphs", type=int, default=None, metavar="N",
                    help="held-out graphs, generated after the training ones (default N/4)")
    gr.add_argument("--nodes", default="10:30", metavar="A:B", help="nodes per graph, A to B (default 10:30)")
    gr.set_defaults(func=cmd_make)


def _add_baseline(sub) -> None:
    bl = sub.add_parser(
        "baseline", help="a token set's val split in bits per byte under gzip -9 and xz -9",
        description="The reference points a language model's val bits per byte is read against: the "
                    "val split compressed whole by gzip -9 and xz -9 (cached in DIR/baselines.json).")
    bl.add_argument("dir", metavar="DIR", help="a token data set directory (data import / data make pycode)")
    bl.set_defaults(func=cmd_baseline)


def _add_pycode(mksub) -> None:
    pc = mksub.add_parser(
        "pycode", help="byte tokens of the Python standard library's own .py sources (for GPT)",
        description="The .py files of this Python's standard library (sysconfig stdlib path; no test "
                    "packages, no site-packages), sorted, as byte tokens (vocab 256). Each file goes to "
                    "train or val by a hash of its path, so a file is never in both. The manifest records "
                    "the Python version and the sha256 of every file.")
    pc.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    pc.add_argument("--shards", type=int, default=DEFAULT_SHARDS, metavar="K",
                    help=f"train shard files (default {DEFAULT_SHARDS})")
    pc.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                    help="fraction of the files held out (by path hash; default 0.1)")
    pc.add_argument("--max-bytes", type=int, default=0, metavar="N",
                    help="take whole files in sorted order up to N bytes (default 0 = all)")
    pc.add_argument("--force", action="store_true", help="replace a data set already in --out")
    pc.set_defaults(func=cmd_make)


def on_root(fn) -> int:
    """Run ``fn() -> int`` on rank 0 while the others wait; every rank returns its code.

    Rank 0 prints any error itself (one rank-tagged line; a traceback too for a bug)
    before the outcome is shared, so the message is never lost.
    """
    from .reader import run_on_root

    comm = get_comm()

    def guarded():
        try:
            return int(fn() or 0)
        except UserError as e:
            _print_error(e)
            return 1
        except Exception as e:  # noqa: BLE001 - a bug: show it, then share the failure
            traceback.print_exc()
            log0(error_message(e), comm=get_comm(), file=sys.stderr)
            return 2

    return int(run_on_root(comm, guarded))


def _print_error(e: UserError) -> None:
    """``[rank r@host] error: ...`` once (our messages already start with the tag)."""
    text, t = str(e), tag()
    if text.startswith(t):
        text = text[len(t):].lstrip()
    log0(f"{t} error: {text}", comm=get_comm(), file=sys.stderr)


def _log(s: str) -> None:
    log0(s, comm=get_comm())


def cmd_make(args) -> int:
    from .make import make_digits, make_synthetic

    def work():
        if args.dataset == "pycode":
            from .tokens import make_pycode

            make_pycode(args.out, shards=args.shards, val_fraction=args.val_fraction,
                        max_bytes=args.max_bytes, overwrite=args.force, log=_log)
            return 0
        if args.dataset == "graphs":
            from .graph_make import make_graphs

            m = make_graphs(args.out, graphs=args.graphs, test_graphs=args.test_graphs, nodes=args.nodes,
                            seed=args.seed, shards=args.shards, overwrite=args.force, log=_log)
        elif args.dataset == "digits":
            m = make_digits(args.out, shards=args.shards, seed=args.seed,
                            test_fraction=args.test_fraction, overwrite=args.force, log=_log,
                            allow_no_test=args.allow_no_test)
        else:
            m = make_synthetic(args.out, rows=args.rows, features=args.features,
                               classes=args.classes, seed=args.seed, shards=args.shards,
                               test_rows=args.test_rows, chunk_rows=args.chunk_rows,
                               overwrite=args.force, log=_log, allow_no_test=args.allow_no_test)
        _summary(args.out, m)
        return 0

    return on_root(work)


def cmd_import(args) -> int:
    from .importer import import_file

    files = args.file
    tabular = len(files) == 1 and files[0].lower().endswith((".npz", ".csv"))

    def work():
        from .graph_make import import_graphs, is_graph_npz

        if tabular and files[0].lower().endswith(".npz") and is_graph_npz(files[0]):
            m = import_graphs(files[0], args.out, shards=args.shards, seed=args.seed,
                              test_fraction=args.test_fraction, classes=args.classes,
                              shuffle=not args.no_shuffle, overwrite=args.force, log=_log)
            _summary(args.out, m)
            return 0
        if not tabular:
            from .tokens import import_text

            import_text(files, args.out, shards=args.shards, val_fraction=args.val_fraction,
                        overwrite=args.force, log=_log)
            return 0
        m = import_file(files[0], args.out, shards=args.shards, seed=args.seed,
                        test_fraction=args.test_fraction, classes=args.classes,
                        shuffle=not args.no_shuffle, overwrite=args.force, log=_log,
                        allow_no_test=args.allow_no_test)
        _summary(args.out, m)
        return 0

    return on_root(work)


def cmd_check(args) -> int:
    from .check import check_dataset

    def work():
        rep = check_dataset(args.dir)
        if rep.ok and (rep.manifest or {}).get("kind") == "tokens":
            from .baseline import compressor_bits, describe

            rep.notes.append("val split compressed: " + describe(compressor_bits(args.dir)))
        _log(rep.format())
        if rep.ok:
            return 0
        for p in rep.problems:
            _print_error(UserError(p))
        return 1

    return on_root(work)


def cmd_baseline(args) -> int:
    from .baseline import compressor_bits, describe
    from .shards import DataProblem

    def work():
        try:
            b = compressor_bits(args.dir)
        except DataProblem as e:
            raise UserError(f"{e.file}: {e.reason} (data baseline needs a token data set: python -m mpitrain "
                            "data import FILE.txt --out DIR, or data make pycode --out DIR)") from None
        _log(f"{args.dir}: val split of {b['tokens']:,} tokens: {describe(b)}")
        return 0

    return on_root(work)


def _summary(out, m) -> None:
    if m.get("kind") == "graphs":
        _log(f"wrote {out}: {m['train_rows']} train graphs in {len(m['shards'])} shards, {m['test']['rows']} test "
             f"graphs, {m['features']} node features, {m.get('edge_features', 0)} edge features, "
             f"{m['classes']} classes")
        return
    _log(f"wrote {out}: {m['train_rows']} train rows in {len(m['shards'])} shards, "
         f"{m['test']['rows']} test rows, {m['features']} features, {m['classes']} classes")
