"""Storing fitted cost models: JSON files per host and rank count, which ``auto`` reads its decision from.

Storage: JSON, one file per host and rank count (and node count when > 1):
``~/.cache/mpitrain/cost-<host>-n<p>.json`` or ``...-n<p>-h<nodes>.json`` (``$XDG_CACHE_HOME`` respected);
``MPITRAIN_COST_FILE=PATH`` names the file instead, ``MPITRAIN_COST_FILE=off``
disables the model. Rank 0 writes it. The file holds the model's parameters and, under
``auto``, the decision table made from them (model.py's ``auto_table``). ``shared(comm)``
(collectives/tuning.py) -- called once per communicator, when the library's state for it is
made -- has rank 0 read the file and broadcast the table, so every rank holds the same table
and ``choose()`` decides the same on every rank. Without a table, ``auto`` keeps its fixed
thresholds. The paths are tuning.py's (``cost_path``): one place for the reader and the writer.

A file written before tables existed loads here as before; ``add_table`` (``python -m
mpitrain.perf FILE``) writes the table into it, so that ``auto`` uses it again.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..collectives import tuning
from .model import CostModel, auto_table


def save(model: CostModel, path) -> Path:
    """Write ``model`` (with auto's decision table) as JSON, atomically (a temporary file in the same
    directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(model.to_dict(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    tuning.forget(path)
    return path


def load(path) -> CostModel:
    """Read a stored model; FileNotFoundError when absent, ValueError when unusable."""
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e})") from None
    return CostModel.from_dict(d)


def add_table(path) -> CostModel:
    """Rewrite the stored model at ``path`` with auto's decision table (a file written before tables
    existed, or after a change to the ring's segments); FileNotFoundError, ValueError as ``load``."""
    model = load(path)
    save(model, path)
    return model


def install(st, model: CostModel | None) -> None:
    """Make ``model`` the one ``auto`` uses on the library state ``st``: its decision table
    (collective: call it on every rank with the same model)."""
    tuning.install(st, None if model is None else auto_table(model))
