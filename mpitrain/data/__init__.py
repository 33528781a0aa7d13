"""Data sets as HDF5 shards, and the per-rank reader that streams mini-batches.

    DIR/manifest.json  DIR/train-00000.h5 ... DIR/test.h5      (format: shards.py)

Public API:
  open_dataset(path, comm=None, *, batch_size, seed=0, verify=True) -> Reader | GraphReader
      (open.py: dispatches on the manifest's kind; graph sets get graph_reader.GraphReader)
      collective; rank r reads only its shards (round-robin) or its row range
      (when shards < ranks). Reader: features, classes, spec (a DataSpec), train_rows, test_rows,
      has_test, rows_local, steps_per_epoch, batches(epoch, start=0), test_batches(batch_size), close().
      A "tokens" set (tokens.py) opens a TokenReader of ``window``-token rows (token_reader.py).
  ensure_dataset(path, dataset, comm=None, *, shards=None, seed=0) -> Path
      makes a built-in set ("digits", "synthetic") on rank 0 if path has none.
  make_digits(out, *, shards=4, seed=0, test_fraction=0.2, overwrite=False, log=None)
  make_synthetic(out, *, rows=20000, features=256, classes=10, seed=0, shards=4,
                 test_rows=4000, chunk_rows=8192, overwrite=False, log=None)
  import_file(src, out, *, shards=4, seed=0, test_fraction=0.2, classes=None,
              shuffle=True, overwrite=False, log=None)
  (make and import refuse a set with 0 test rows unless allow_no_test=True; the Reader's
  test_rows / has_test say whether a set has any)
  make_graphs(out, *, graphs=4000, test_graphs=None, nodes=(10, 30), seed=0, shards=4, ...)
  import_graphs(src.npz, out, *, shards=4, seed=0, test_fraction=0.2, ...)
      graph sets (graphs.py, graph_make.py); open_dataset returns a GraphReader for them
  check_dataset(path) -> CheckReport (.ok, .problems, .files, .format())
  import_text(paths, out, *, shards=4, val_fraction=0.1, ...), make_pycode(out, *, max_bytes=0, ...)

The make/import/check functions are serial (call them on one rank); the CLI
(``python -m mpitrain data ...``) runs them on rank 0 under mpirun.
Data knows nothing of models.
"""

from .check import CheckReport, check_dataset
from .graph_make import import_graphs, make_graphs
from .graphs import GraphSet
from .importer import import_file
from .make import make_digits, make_synthetic
from .open import open_dataset
from .reader import Reader, ensure_dataset
from .spec import DataSpec
from .tokens import import_text, make_pycode

__all__ = ["open_dataset", "ensure_dataset", "make_digits", "make_synthetic", "import_file",
           "check_dataset", "Reader", "CheckReport", "DataSpec", "make_graphs", "import_graphs", "GraphSet", "import_text", "make_pycode"]
