"""Models: one interface (base.Model) and a registry keyed by ``model.kind``.

    KINDS = {"mlp": MLP, "gpt": GPT, "mpnn": MPNN, "graph-mlp": GraphMLP}   build(kind, options, spec, xp=, seed=) -> Model

Adding a model (docs/architecture.md): write a Model subclass in its own module, list it in
KINDS, add its keys to config.ModelConfig. The data set's spec (data/spec.py) must be one of
the kinds it ``consumes``; otherwise ``build`` raises a UserError naming both.
"""

from __future__ import annotations

import math

import numpy as np

from ..runtime import UserError
from .base import Model, grads_allocator, params_allocator
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



# What a checkpoint records about a model, and how a resume compares it with the model it builds (the
# parameter count alone lets a model of another shape -- n_head 2 -> 4, hidden widths permuted -- take
# over the parameters silently):
#   model_config   {"kind", **model.config()}: the arguments that fix its shapes and meaning
#   model_tensors  [[name, shape], ...] in buffer order (model.tensors())

def record(model) -> dict:
    """The checkpoint's record of ``model``: {"model_config", "model_tensors"}."""
    cfg = getattr(model, "config", None)
    conf = {"kind": model.kind, **(cfg() if cfg is not None else {})}
    return {"model_config": conf, "model_tensors": [[name, [int(n) for n in shape]]
                                                     for name, _off, shape in _whole(model)]}


def _whole(model):
    """The whole model's tensors (a pipeline stage or a tensor-parallel slice records the model it is part of)."""
    full = getattr(model, "full_tensors", None)
    return full() if full is not None else model.tensors()


def differences(saved: dict, model) -> list[str]:
    """``key: saved != now`` for each way ``model`` differs from the record in ``saved`` (a loaded checkpoint;
    older ones hold less: what they record is compared, at least the parameter count)."""
    now, diffs = record(model), []
    then = saved.get("model_config")
    if isinstance(then, dict):
        for k in sorted(then):  # a key an older checkpoint lacks was not recorded: nothing to compare
            a, b = then[k], now["model_config"].get(k, "<none>")
            if a != b:
                diffs.append(f"model.{k} {a!r} != {b!r}")
    tens = saved.get("model_tensors")
    if isinstance(tens, list) and not diffs:
        mine = {n: s for n, s in now["model_tensors"]}
        theirs = {n: s for n, s in (t for t in tens if isinstance(t, list) and len(t) == 2)}
        diffs += [f"tensor {n} {theirs.get(n, '<none>')} != {mine.get(n, '<none>')}"
                  for n in sorted(set(mine) | set(theirs), key=str) if mine.get(n) != theirs.get(n)]
    count, n = int(np.asarray(saved["params"]).size), sum(math.prod(s) for _, _, s in _whole(model))
    if not diffs and count != n:
        diffs.append(f"parameter count {count} != {n}")
    return diffs


RESUME_HINT = "resume with the [model] section it was written with, or start a new run in another checkpoint.dir"


def check(saved: dict, model, what: str = "this job's", hint: str = RESUME_HINT) -> None:
    """UserError naming the differences when checkpoint ``saved`` holds another model than ``model``."""
    diffs = differences(saved, model)
    if diffs:
        more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
        raise UserError(f"{saved['path']}: holds another model than {what} (checkpoint != now: "
                        f"{'; '.join(diffs[:6])}{more}); {hint}")


__all__ = ["Model", "MLP", "GPT", "MPNN", "GraphMLP", "KINDS", "build", "grads_allocator", "params_allocator", "record", "differences", "check"]
