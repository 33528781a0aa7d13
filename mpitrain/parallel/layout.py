"""Maps between a stage's flat buffer and the whole model's: checkpoints are always the full layout.

    full    | lm_head? lnf | block L-1 | ... | block a | block a-1 | ... | block 0 | wpe | wte |
    stage 1 | lm_head? lnf | block L-1 | ... | block a | wte (tied) |                  (the last stage)
    stage 0 |                                           | block a-1 | ... | block 0 | wpe | wte |

A part's tensors are a subsequence of the full model's, found by name; a tensor two stages hold (a
tied wte) is identical on both and is taken from the first that has it. Optimizer state is laid out
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


def to_full(parts, full_tensors, dtype) -> np.ndarray:
    """``parts``: ``[(tensors, flat), ...]`` of every stage -> the full flat buffer (host)."""
    full = spans(full_tensors)
    out = np.zeros(sum(n for _, n in full.values()), dtype=dtype)
    seen = set()
    for tensors, flat in parts:
        for name, (o, n) in spans(tensors).items():
            if name not in seen:
                fo, fn = full[name]
                out[fo:fo + fn] = flat[o:o + n]
                seen.add(name)
    missing = set(full) - seen
    if missing:
        raise ValueError(f"no stage holds {sorted(missing)[:3]}...")
    return out


def from_full(full_flat, full_tensors, tensors) -> np.ndarray:
    """The full flat buffer -> this part's flat buffer (host)."""
    full = spans(full_tensors)
    mine = spans(tensors)
    out = np.empty(sum(n for _, n in mine.values()), dtype=np.asarray(full_flat).dtype)
    for name, (o, n) in mine.items():
        fo, _ = full[name]
        out[o:o + n] = full_flat[fo:fo + n]
    return out


def gather_full(model, optimizer_state: dict, comm, params=None, root: int = 0):
    """Collective over the pp group: ``(params, optimizer state)`` in the full layout on ``root``
    (``(None, None)`` elsewhere, and where a stage has no ``params`` to give: not dp rank 0 under ZeRO-3).
    ``params``: this stage's (host), when not ``model.params``."""
    n = model.params.size
    mine = (model.tensors(), backend.to_numpy(model.params) if params is None else params,
            {k: v for k, v in optimizer_state.items() if isinstance(v, np.ndarray) and v.size == n})
    every = comm.gather(mine, root=root)
    if comm.Get_rank() != root or any(p is None for _, p, _ in every):
        return None, None
    full_t = model.full_tensors()
    params = to_full([(t, p) for t, p, _ in every], full_t, model.params.dtype)
    opt = dict(optimizer_state)
    for key, arr in mine[2].items():
        opt[key] = to_full([(t, s[key]) for t, _, s in every], full_t, arr.dtype)
    return params, opt


def checkpoint_for(ck: dict, model) -> dict:
    """A full-layout checkpoint -> the same with ``params`` and optimizer buffers in this part's layout."""
    full_t = model.full_tensors()
    full_n = sum(math.prod(s) for _, _, s in full_t)
    out = dict(ck)
    out["params"] = from_full(ck["params"], full_t, model.tensors())
    if isinstance(ck.get("optimizer"), dict):
        out["optimizer"] = {k: (from_full(v, full_t, model.tensors())
                                if isinstance(v, np.ndarray) and v.size == full_n else v)
                            for k, v in ck["optimizer"].items()}
    return out
