"""The GPT's kernels, forward and backward by hand against ``xp`` (NumPy or CuPy); no autograd.

    layernorm   x (N, C) --(mean, rstd over C)--> (x - mean) * rstd * w + b       (N, C)
    gelu        h (N, H) --> 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))      (N, H)
    attention   qkv (B, T, 3C) --split heads--> q, k, v (B, nh, T, hs)
                S = q k^T / sqrt(hs) (B, nh, T, T), causal mask (j > i: -inf), P = softmax(S)
                y = P v (B, nh, T, hs) --merge heads--> (B, T, C)
    cross-ent.  logits (N, V) --softmax--> loss_i = logsumexp(z_i) - z_i[target_i]

Shapes in the comments follow karpathy/llm.c: B batch, T time, C channels, nh heads,
hs = C / nh, V vocabulary, N = B*T rows. Each ``*_forward`` returns its output and what its
``*_backward`` needs; the backward functions return the input gradient and write parameter
gradients into the ``out=`` views they are given (views of the model's flat ``grads``).

Cost (multiply-adds x2 = FLOPs, per layer, forward; backward is about twice):
    layernorm ~8·N·C   gelu ~10·N·H   attention 4·B·nh·T²·hs = 4·B·T²·C (two batched matmuls)
    softmax ~5·B·nh·T²   cross-entropy ~5·N·V (the logits matmul 2·N·C·V is the model's)
Memory kept for backward per attention layer: q, k, v (3·N·C) and P (B·nh·T²).
"""

from __future__ import annotations

import math

LN_EPS = 1e-5
GELU_K = math.sqrt(2.0 / math.pi)


# ---------------------------------------------------------------------------- layernorm

def layernorm_forward(xp, x, w, b):
    """x (N, C), w (C), b (C) -> out (N, C), cache (xhat (N, C), rstd (N, 1))."""
    mean = x.mean(axis=-1, keepdims=True)                     # (N, 1)
    xc = x - mean                                             # (N, C)
    var = (xc * xc).mean(axis=-1, keepdims=True)              # (N, 1) biased, as PyTorch
    rstd = 1.0 / xp.sqrt(var + LN_EPS)                        # (N, 1)
    xhat = xc * rstd                                          # (N, C)
    return xhat * w + b, (xhat, rstd)


def layernorm_backward(xp, dout, cache, w, dw, db):
    """dout (N, C) -> dx (N, C); dw (C) and db (C) written in place."""
    xhat, rstd = cache
    xp.sum(dout * xhat, axis=0, out=dw)                       # (C)
    xp.sum(dout, axis=0, out=db)                              # (C)
    dnorm = dout * w                                          # (N, C)
    dx = dnorm - dnorm.mean(axis=-1, keepdims=True)
    dx -= xhat * (dnorm * xhat).mean(axis=-1, keepdims=True)
    dx *= rstd
    return dx


# ---------------------------------------------------------------------------- gelu (tanh)

def gelu_forward(xp, h):
    """h (N, H) -> g (N, H), cache (h, tanh term). In place on temporaries (a step's biggest arrays)."""
    t = h * h                                                 # (N, H)
    t *= GELU_K * 0.044715
    t += GELU_K
    t *= h                                                    # sqrt(2/pi) (h + 0.044715 h^3)
    xp.tanh(t, out=t)
    g = t + 1.0
    g *= h
    g *= 0.5
    return g, (h, t)


def gelu_backward(xp, dg, cache):
    """dg (N, H) -> dh (N, H) = dg (0.5 (1 + t) + 0.5 h (1 - t^2) sqrt(2/pi) (1 + 3·0.044715 h^2))."""
    h, t = cache
    a = h * h
    a *= 3 * 0.044715 * GELU_K
    a += GELU_K                                               # d(inner)/dh
    b = t * t
    xp.subtract(1.0, b, out=b)
    b *= h
    b *= a
    b += t
    b += 1.0
    b *= 0.5
    b *= dg
    return b


# ---------------------------------------------------------------------------- attention

def causal_mask(xp, T, dtype):
    """(T, T): 0 on and below the diagonal, -inf above (query i sees keys j <= i)."""
    m = xp.zeros((T, T), dtype=dtype)
    m[xp.triu(xp.ones((T, T), dtype=bool), k=1)] = -xp.inf
    return m


def attention_forward(xp, qkv, n_head, mask):
    """qkv (B, T, 3C) -> y (B, T, C), cache (q, k, v, P)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    qkv5 = qkv.reshape(B, T, 3, n_head, hs)
    q = qkv5[:, :, 0].transpose(0, 2, 1, 3)                   # (B, nh, T, hs)
    k = qkv5[:, :, 1].transpose(0, 2, 1, 3)                   # (B, nh, T, hs)
    v = qkv5[:, :, 2].transpose(0, 2, 1, 3)                   # (B, nh, T, hs)
    S = xp.matmul(q, k.transpose(0, 1, 3, 2))                 # (B, nh, T, T)
    S *= 1.0 / math.sqrt(hs)
    S += mask
    S -= S.max(axis=-1, keepdims=True)
    P = xp.exp(S, out=S)
    P /= P.sum(axis=-1, keepdims=True)                        # (B, nh, T, T) rows sum to 1
    y = xp.matmul(P, v)                                       # (B, nh, T, hs)
    return y.transpose(0, 2, 1, 3).reshape(B, T, C), (q, k, v, P)


def attention_backward(xp, dy, cache):
    """dy (B, T, C) -> dqkv (B, T, 3C)."""
    q, k, v, P = cache
    B, nh, T, hs = q.shape
    dy4 = dy.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)      # (B, nh, T, hs)
    dqkv = xp.empty((B, T, 3, nh, hs), dtype=dy.dtype)
    dqkv[:, :, 2] = xp.matmul(P.transpose(0, 1, 3, 2), dy4).transpose(0, 2, 1, 3)   # dv
    dP = xp.matmul(dy4, v.transpose(0, 1, 3, 2))              # (B, nh, T, T)
    dP -= (dP * P).sum(axis=-1, keepdims=True)
    dP *= P                                                   # dS (masked entries: P = 0)
    dP *= 1.0 / math.sqrt(hs)
    dqkv[:, :, 0] = xp.matmul(dP, k).transpose(0, 2, 1, 3)    # dq (B, T, nh, hs)
    dqkv[:, :, 1] = xp.matmul(dP.transpose(0, 1, 3, 2), q).transpose(0, 2, 1, 3)   # dk
    return dqkv.reshape(B, T, 3 * nh * hs)


# ---------------------------------------------------------------------------- cross-entropy

def cross_entropy(xp, logits, targets, rows):
    """logits (N, V) -> (loss sum, correct) as device scalars; logits become softmax probs in place."""
    correct = (logits.argmax(axis=1) == targets).sum()
    logits -= logits.max(axis=1, keepdims=True)
    picked = logits[rows, targets]                            # (N) shifted logit of the target
    xp.exp(logits, out=logits)
    s = logits.sum(axis=1, keepdims=True)                     # (N, 1)
    loss_sum = (xp.log(s[:, 0]) - picked).sum()
    logits /= s
    return loss_sum, correct


def embedding_backward(xp, dwte, tokens, dx):
    """dwte (V, C) += sum of dx (N, C) rows per token id (N); deterministic on both backends.

    NumPy: ``add.at`` (sequential). CuPy: a one-hot matmul (no atomics, so the sum's order is
    fixed and a rerun is bitwise equal); it costs 2·N·V·C FLOPs, like the logits matmul.
    """
    if xp.__name__ == "numpy":
        xp.add.at(dwte, tokens, dx)
        return
    V = dwte.shape[0]
    onehot = (tokens[:, None] == xp.arange(V)[None, :]).astype(dx.dtype)    # (N, V)
    dwte += xp.matmul(onehot.T, dx)
