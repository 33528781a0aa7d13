"""Maps between a stage's flat buffer and the whole model's: checkpoints are always the full layout.

    full    | lm_head? lnf | block L-1 | ... | block a | block a-1 | ... | block 0 | wpe | wte |
    stage 1 | lm_head? lnf | block L-1 | ... | block a | wte (tied) |                  (the last stage)
    stage 0 |                                           | block a-1 | ... | block 0 | wpe | wte |

A part's tensors are a subsequence of the full model's, found by name; a tensor two stages hold (a
tied wte) is identical on both and is taken from the first that has it. With tensor parallelism a
tp slot holds a slice of some tensors (models/gpt_shard.py): ``shard_index(name, tp_rank)`` says where
it sits in the whole tensor, and the slices of every tp slot are put back together. Optimizer state is laid out
like the parameters (one value per parameter per buffer: momentum, Adam's m and v), so the same map
moves it. A checkpoint written by any layout resumes into any other.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend


def spans(tensors) -> dict:
    """``{name: (offset, size)}`` of a ``tensors()`` list."""
    return {name: (off, math.prod(shape)) for name, off, shape in tensors}


def to_full(parts, full_tensors, dtype, shard_index=None) -> np.ndarray:
    """``parts``: ``[(tensors, flat, tp_rank), ...]`` of every stage and tp slot -> the full flat buffer (host).
    ``shard_index(name, tp_rank)``: where a tp slot's slice sits in the whole tensor (None: whole)."""
    full = {name: (off, shape) for name, off, shape in full_tensors}
    out = np.zeros(sum(math.prod(s) for _, s in full.values()), dtype=dtype)
    seen = set()
    for tensors, flat, tp_rank in parts:
        for name, (o, n) in spans(tensors).items():
            fo, shape = full[name]
            idx = shard_index(name, tp_rank) if shard_index is not None else None
            if idx is None and name in seen:
                continue
            whole = out[fo:fo + math.prod(shape)].reshape(shape)
            if idx is None:
                whole[...] = flat[o:o + n].reshape(shape)
            else:
                whole[idx] = flat[o:o + n].reshape(whole[idx].shape)
            seen.add(name)
    missing = set(full) - seen
    if missing:
        raise ValueError(f"no stage holds {sorted(missing)[:3]}...")
    return out


def from_full(full_flat, full_tensors, tensors, shard=None) -> np.ndarray:
    """The full flat buffer -> this part's flat buffer (host); ``shard(name, whole)``: this tp slot's slice."""
    full = {name: (off, shape) for name, off, shape in full_tensors}
    mine = spans(tensors)
    out = np.empty(sum(n for _, n in mine.values()), dtype=np.asarray(full_flat).dtype)
    for name, (o, n) in mine.items():
        fo, shape = full[name]
        whole = np.asarray(full_flat[fo:fo + math.prod(shape)]).reshape(shape)
        out[o:o + n] = (shard(name, whole) if shard is not None else whole).ravel()
    return out


def gather_full(model, optimizer_state: dict, comm, params=None, root: int = 0):
    """Collective over one replica's model-parallel group (its stages and tp slots): ``(params, optimizer
    state)`` in the full layout on ``root`` (``(None, None)`` elsewhere, and where a part has no ``params``
    to give: not dp rank 0 under ZeRO-3). ``params``: this part's (host), when not ``model.params``."""
    n = model.params.size
    tp_rank = getattr(getattr(model, "tp", None), "rank", 0)
    mine = (model.tensors(), backend.to_numpy(model.params) if params is None else params,
            {k: v for k, v in optimizer_state.items() if isinstance(v, np.ndarray) and v.size == n}, tp_rank)
    every = comm.gather(mine, root=root)
    if comm.Get_rank() != root or any(e[1] is None for e in every):
        return None, None
    full_t = model.full_tensors()
    where = getattr(model, "shard_index", None)
    params = to_full([(t, p, r) for t, p, _, r in every], full_t, model.params.dtype, where)
    opt = dict(optimizer_state)
    for key, arr in mine[2].items():
        opt[key] = to_full([(t, s[key], r) for t, _, s, r in every], full_t, arr.dtype, where)
    return params, opt


def checkpoint_for(ck: dict, model) -> dict:
    """A full-layout checkpoint -> the same with ``params`` and optimizer buffers in this part's layout."""
    full_t = model.full_tensors()
    full_n = sum(math.prod(s) for _, _, s in full_t)
    shard = getattr(model, "shard", None)
    out = dict(ck)
    out["params"] = from_full(ck["params"], full_t, model.tensors(), shard)
    if isinstance(ck.get("optimizer"), dict):
        out["optimizer"] = {k: (from_full(v, full_t, model.tensors(), shard)
                                if isinstance(v, np.ndarray) and v.size == full_n else v)
                            for k, v in ck["optimizer"].items()}
    return out
