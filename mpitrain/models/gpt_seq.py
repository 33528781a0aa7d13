"""Sequence parallelism (Megatron-LM's, with tensor parallelism): outside attention and the MLP the
activations are split by rows (the B·T tokens) over the tp ranks; the all-reduces become the ring's halves.

    h_s (N/t, C) --LN--> ln_s --all-gather--> ln (N, C) --column layer ... row layer--> partial (N, C)
        --reduce-scatter--> (N/t, C) + h_s + bias = the next h_s
    backward: each all-gather's backward is a reduce-scatter and each reduce-scatter's an all-gather;
    the LayerNorms and the row layers' biases see only this rank's rows, so their gradients are summed
    over the tp group (one all-reduce per block of the six small tensors).

The same bytes move as with plain tp (an all-reduce = a reduce-scatter + an all-gather), but the
LayerNorms, residuals and their caches hold N/t rows on each rank instead of N: less activation memory.
The LayerNorm inputs are re-gathered in backward instead of kept whole (as Megatron-LM does). Blocks
take and give h by rows; the stack's ends gather (``GPT._rows``, ``GPT._whole``) so embeddings, head and
pipeline messages stay whole.
"""

from __future__ import annotations

from . import gpt_layers as K

PARTIAL = ("ln1.w", "ln1.b", "ln2.w", "ln2.b", "attn_proj.b", "mlp_proj.b")  # gradients summed over tp


def block_forward(m, layer, h_s, B, T, keep):
    """One block on this rank's rows ``h_s`` (N/t, C) -> the next rows, and what backward needs."""
    xp, tp, C = m.xp, m.tp, m.n_embd
    N, Cl, nh = B * T, C // tp.size, m.n_head // tp.size
    q = lambda t: m.p[f"h{layer}.{t}"]  # noqa: E731
    ln1_s, c_ln1 = K.layernorm_forward(xp, h_s, q("ln1.w"), q("ln1.b"))
    qkv = xp.matmul(tp.allgather(ln1_s, N), q("attn_qkv.w")) + q("attn_qkv.b")      # (N, 3C/t)
    att, c_att = K.attention_forward(xp, qkv.reshape(B, T, 3 * Cl), nh, m._mask(T))
    att = att.reshape(N, Cl)
    h2_s = h_s + tp.reduce_scatter(xp.matmul(att, q("attn_proj.w"))) + q("attn_proj.b")
    ln2_s, c_ln2 = K.layernorm_forward(xp, h2_s, q("ln2.w"), q("ln2.b"))
    gl, c_gelu = K.gelu_forward(xp, xp.matmul(tp.allgather(ln2_s, N), q("mlp_fc.w")) + q("mlp_fc.b"))
    h_s = h2_s + tp.reduce_scatter(xp.matmul(gl, q("mlp_proj.w"))) + q("mlp_proj.b")
    return h_s, ((ln1_s, c_ln1, c_att, att, ln2_s, c_ln2, c_gelu, gl) if keep else None)


def block_backward(m, layer, dh_s, cache, B, T):
    """dh_s (N/t, C) at the block's output rows -> at its input rows; this rank's gradients written
    (the six replicated tensors' summed over tp)."""
    xp, tp, C = m.xp, m.tp, m.n_embd
    N = B * T
    q = lambda t: m.p[f"h{layer}.{t}"]  # noqa: E731
    d = lambda t: m.g[f"h{layer}.{t}"]  # noqa: E731
    ln1_s, c_ln1, c_att, att, ln2_s, c_ln2, c_gelu, gl = cache
    dy = tp.allgather(dh_s, N)                                                       # (N, C)
    xp.matmul(gl.T, dy, out=d("mlp_proj.w"))
    xp.sum(dh_s, axis=0, out=d("mlp_proj.b"))
    dfc = K.gelu_backward(xp, xp.matmul(dy, q("mlp_proj.w").T), c_gelu)              # (N, 4C/t)
    xp.matmul(tp.allgather(ln2_s, N).T, dfc, out=d("mlp_fc.w"))
    xp.sum(dfc, axis=0, out=d("mlp_fc.b"))
    dln2_s = tp.reduce_scatter(xp.matmul(dfc, q("mlp_fc.w").T))                      # (N/t, C)
    dh2_s = dh_s + K.layernorm_backward(xp, dln2_s, c_ln2, q("ln2.w"), d("ln2.w"), d("ln2.b"))
    dy2 = tp.allgather(dh2_s, N)
    xp.matmul(att.T, dy2, out=d("attn_proj.w"))
    xp.sum(dh2_s, axis=0, out=d("attn_proj.b"))
    datt = xp.matmul(dy2, q("attn_proj.w").T).reshape(B, T, C // tp.size)
    dqkv = K.attention_backward(xp, datt, c_att).reshape(N, 3 * C // tp.size)
    xp.matmul(tp.allgather(ln1_s, N).T, dqkv, out=d("attn_qkv.w"))
    xp.sum(dqkv, axis=0, out=d("attn_qkv.b"))
    dln1_s = tp.reduce_scatter(xp.matmul(dqkv, q("attn_qkv.w").T))
    dh_s = dh2_s + K.layernorm_backward(xp, dln1_s, c_ln1, q("ln1.w"), d("ln1.w"), d("ln1.b"))
    parts = [d(t).reshape(-1) for t in PARTIAL]                                      # summed over tp at once
    packed = tp.allreduce(xp.concatenate(parts))
    o = 0
    for part in parts:
        part[...] = packed[o:o + part.size]
        o += part.size
    return dh_s
