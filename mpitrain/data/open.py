"""``open_dataset``: one entry point for every kind of data set, dispatched on the manifest's ``kind``.

    manifest.json  kind absent ("features+labels")  --> reader.open_dataset   -> Reader      (rows)
                   kind "graphs"                    --> graph_reader.open_graphs -> GraphReader (graphs)

Both readers have the same surface (spec, train_rows, steps_per_epoch, size, batches(epoch, start),
test_batches(b), close()), so the training loop never asks which one it got. Cost: one extra read of
manifest.json per rank.
"""

from __future__ import annotations

from pathlib import Path

from ..runtime import get_comm
from . import reader
from .graph_reader import graph_manifest, open_graphs


def open_dataset(path, comm=None, *, batch_size: int, seed: int = 0, verify: bool = True, **kw):
    """Open the data set in ``path`` for this rank (collective over ``comm``); see reader.open_dataset.

    ``kw``: block_rows / window_blocks for rows, block_graphs / window_blocks for graphs."""
    comm = comm if comm is not None else get_comm()
    gm = graph_manifest(Path(path))
    if gm is not None:
        extra = {k: kw[k] for k in ("block_graphs", "window_blocks") if k in kw}
        return open_graphs(path, comm, gm, batch_size=batch_size, seed=seed, verify=verify, **extra)
    kw.pop("block_graphs", None)
    return reader.open_dataset(path, comm, batch_size=batch_size, seed=seed, verify=verify, **kw)
