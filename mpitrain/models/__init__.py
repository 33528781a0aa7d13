"""Models: one interface (base.Model) and a registry keyed by ``model.kind``.

    KINDS = {"mlp": MLP, "gpt": GPT, "mpnn": MPNN, "graph-mlp": GraphMLP}   build(kind, options, spec, xp=, seed=) -> Model

Adding a model (docs/architecture.md): write a Model subclass in its own module, list it in
KINDS, add its keys to config.ModelConfig. The data set's spec (data/spec.py) must be one of
the kinds it ``consumes``; otherwise ``build`` raises a UserError naming both.
"""

from __future__ import annotations

import numpy as np

from ..runtime import UserError
from .base import Model, grads_allocator
from .gpt import GPT
from .graph_mlp import GraphMLP
from .mlp import MLP
from .mpnn import MPNN

KINDS: dict[str, type[Model]] = {"mlp": MLP, "gpt": GPT}  # a transformer on token data (gpt.py)
KINDS["mpnn"] = MPNN            # message passing on graph data (mpnn.py)
KINDS["graph-mlp"] = GraphMLP   # its baseline: an MLP on each graph's mean node features


def build(kind: str, options: dict, spec, *, xp=np, seed: int = 0, dtype=np.float32, part=None, tp=None) -> Model:
    """The model of ``kind`` for a data set described by ``spec`` (a data.spec.DataSpec); ``part``: the
    pipeline stage's share (models with ``pipeline = True`` only)."""
    cls = KINDS.get(kind)
    if cls is None:
        raise UserError(f"model.kind = {kind!r} is not a model; known: {', '.join(map(repr, KINDS))}")
    if spec.kind not in cls.consumes:
        raise UserError(f"model.kind = {kind!r} trains on {' or '.join(cls.consumes)} data, but the data set "
                        f"yields {spec.describe()}; choose a data set of that kind (data.path / data.dataset) "
                        "or a model that consumes this one")
    opts = {k: options[k] for k in cls.options_keys}
    if part is not None or tp is not None:
        if not getattr(cls, "pipeline", False):
            raise UserError(f"model.kind = {kind!r} has no pipeline stages or tensor-parallel layers; set "
                            "parallel.pp = 1 and parallel.tp = 1")
        return cls.from_spec(spec, opts, xp=xp, seed=seed, dtype=dtype, part=part, tp=tp)
    return cls.from_spec(spec, opts, xp=xp, seed=seed, dtype=dtype)


__all__ = ["Model", "MLP", "GPT", "MPNN", "GraphMLP", "KINDS", "build", "grads_allocator"]
