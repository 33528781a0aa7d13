"""Tensor parallelism inside the GPT's blocks (Megatron-LM's split): which slice of each tensor a tp rank holds.

    attention (heads split)                          MLP (hidden width split)
    x --f--> ln1 @ [Wq|Wk|Wv] cols of my heads       x --f--> ln2 @ W_fc  cols t·4C/T .. (t+1)·4C/T
             attention over my nh/T heads                     gelu
             @ W_proj rows of my heads --g--> + b             @ W_proj rows t·4C/T .. --g--> + b

    f: identity forward, all-reduce (sum) of the input gradient backward     (before each column layer)
    g: all-reduce (sum) forward, identity backward                           (after each row layer)

Column layers (attn_qkv, mlp_fc) hold a slice of their output columns (and of their bias); row layers
(attn_proj, mlp_proj) a slice of their input rows; their biases, the LayerNorms, the embeddings and
the head are whole on every tp rank (replicated). attn_qkv's columns are q | k | v, each heads-major,
so rank t takes q, k and v of heads [t·nh/T, (t+1)·nh/T) and keeps them in that order. Per block:
two all-reduces of (B, T, C) forward and two backward; bytes on the wire per rank and all-reduce
2(T-1)/T · B·T·C·itemsize. The all-reduce is handed in (``TP.allreduce``): the model knows no MPI.
"""

from __future__ import annotations

from typing import Callable, NamedTuple


class TP(NamedTuple):
    """This rank's tensor-parallel slot: ``size`` ranks, this is ``rank``; ``allreduce(a)`` sums ``a`` in place
    over the tp group and returns it (identical bits on every tp rank). Sequence parallelism
    (models/gpt_seq.py) adds ``rows(N)`` -> this rank's [lo, hi) of N rows, ``reduce_scatter(a (N, C))`` -> the
    sum's rows of this rank (N/t, C), ``allgather(a_s (N/t, C), N)`` -> every rank's rows (N, C)."""
    size: int = 1
    rank: int = 0
    allreduce: Callable | None = None
    sequence: bool = False
    rows: Callable | None = None
    reduce_scatter: Callable | None = None
    allgather: Callable | None = None


SHARDED = ("attn_qkv.w", "attn_qkv.b", "attn_proj.w", "mlp_fc.w", "mlp_fc.b", "mlp_proj.w")


def block_shapes(C: int, T: int = 1) -> dict:
    """The block tensors' shapes on one of T tp ranks (T = 1: the whole tensors)."""
    return {"mlp_proj.w": (4 * C // T, C), "mlp_proj.b": (C,), "mlp_fc.w": (C, 4 * C // T),
            "mlp_fc.b": (4 * C // T,), "ln2.w": (C,), "ln2.b": (C,), "attn_proj.w": (C // T, C),
            "attn_proj.b": (C,), "attn_qkv.w": (C, 3 * C // T), "attn_qkv.b": (3 * C // T,),
            "ln1.w": (C,), "ln1.b": (C,)}


def shard_index(name: str, C: int, T: int, t: int):
    """The index of tp rank ``t``'s slice in the whole tensor ``name`` (e.g. ``h3.mlp_fc.w``); None: replicated."""
    kind = name.split(".", 1)[1] if name.startswith("h") and "." in name else name
    if T == 1 or kind not in SHARDED:
        return None
    c, h = C // T, 4 * C // T
    if kind.startswith("attn_qkv"):
        cols = [j for part in range(3) for j in range(part * C + t * c, part * C + (t + 1) * c)]
        return (slice(None), cols) if kind.endswith(".w") else (cols,)
    if kind == "attn_proj.w":
        return (slice(t * c, (t + 1) * c), slice(None))
    if kind == "mlp_fc.w":
        return (slice(None), slice(t * h, (t + 1) * h))
    if kind == "mlp_fc.b":
        return (slice(t * h, (t + 1) * h),)
    return (slice(t * h, (t + 1) * h), slice(None))  # mlp_proj.w


def check(n_head: int, n_embd: int, T: int) -> str | None:
    """Why ``T`` tp ranks cannot split this GPT (None: they can)."""
    if n_head % T:
        return f"model.n_head = {n_head} is not a multiple of parallel.tp = {T} (each tp rank takes whole heads)"
    if (4 * n_embd) % T:
        return f"4 x model.n_embd = {4 * n_embd} is not a multiple of parallel.tp = {T} (the MLP's hidden width)"
    return None
