"""A decoder-only transformer (GPT-2 shape) with flat parameter and gradient buffers.

    tokens (B, T) --wte[tokens] + wpe[:T]--> x (B, T, C)
      n_layer x  x = x + attn_proj(attention(attn_qkv(ln1(x))))      causal, n_head heads
                 x = x + mlp_proj(gelu(mlp_fc(ln2(x))))              4C hidden, tanh GELU
    lnf(x) @ wte^T (tied; lm_head^T when model.tie_embeddings = false) --> logits (B, T, V)
    next-token cross-entropy, mean over the B*T targets

Batches: a data set of kind "tokens" yields windows of T+1 tokens; the model takes either the
window ``(tokens (B, T+1),)`` or its split ``(x = tokens[:, :-1], y = tokens[:, 1:])`` (what the
reader yields). ``count(batch)`` = B*T; ``loss_and_grad`` -> (mean loss per token, correct
next-token predictions); ``evaluate`` -> (loss sum, correct).

Buffer layout -- backprop finishes the tensors in this order, so finished gradients form a
growing prefix (``on_grad_ready(hi)`` after the head, after each block, and at the end)::

    0                                                                           n_params
    | [lm_head] lnf | block L-1 | block L-2 | ... | block 0 | wpe | wte |
    '---- 1 -------'---- 2 -----'---- 3 ----'     '- L+1 --'-- L+2 -----'
    block: mlp_proj.w mlp_proj.b mlp_fc.w mlp_fc.b ln2.w ln2.b attn_proj.w attn_proj.b
           attn_qkv.w attn_qkv.b ln1.w ln1.b                    (its own backprop order)

wte is last: with tied embeddings its gradient gets the head's part first and the embedding's
part at the very end. Linear weights are (fan_in, fan_out), applied as ``x @ W + b``; wte and
lm_head are (V, C). Initial values (host, ``numpy.random.default_rng(seed)``, tensors drawn in
the order wte, wpe, lm_head, then blocks 0..L-1): GPT-2 style N(0, 0.02) weights and embeddings,
the residual projections (attn_proj.w, mlp_proj.w) N(0, 0.02/sqrt(2 n_layer)), zero biases, LayerNorm
weights 1. Weight decay (AdamW) applies only to the 2-D linear weights (``decay_segments()``).

Cost: training FLOPs per token ~ 6·N_mm + 12·L·T·C (``flops_per_token``), N_mm the parameters
in matmuls (the blocks' weights and the head; not wpe, LayerNorm or biases). Activations kept
for backward per layer ~ 16·N·C + B·nh·T² values (N = B·T). A model knows nothing of MPI.
"""

from __future__ import annotations

import math

import numpy as np

from . import gpt_layers as K
from .base import Model, grads_buffer

BLOCK_TENSORS = ("mlp_proj.w", "mlp_proj.b", "mlp_fc.w", "mlp_fc.b", "ln2.w", "ln2.b",
                 "attn_proj.w", "attn_proj.b", "attn_qkv.w", "attn_qkv.b", "ln1.w", "ln1.b")


def _block_shapes(C):
    return {"mlp_proj.w": (4 * C, C), "mlp_proj.b": (C,), "mlp_fc.w": (C, 4 * C), "mlp_fc.b": (4 * C,),
            "ln2.w": (C,), "ln2.b": (C,), "attn_proj.w": (C, C), "attn_proj.b": (C,),
            "attn_qkv.w": (C, 3 * C), "attn_qkv.b": (3 * C,), "ln1.w": (C,), "ln1.b": (C,)}


class GPT(Model):
    kind = "gpt"
    consumes = ("tokens",)
    options_keys = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "tie_embeddings")

    @classmethod
    def from_spec(cls, spec, options, *, xp=np, seed=0, dtype=np.float32):
        from ..runtime import UserError

        vocab = int(options["vocab_size"]) or int(spec.vocab_size)
        if vocab < spec.vocab_size:
            raise UserError(f"model.vocab_size = {vocab} but the data set's tokens go up to "
                            f"{spec.vocab_size - 1} (vocab_size {spec.vocab_size}); raise model.vocab_size "
                            "or set it to 0 (= the data set's)")
        if options["n_embd"] % options["n_head"]:
            raise UserError(f"model.n_embd = {options['n_embd']} is not a multiple of model.n_head = "
                            f"{options['n_head']}")
        return cls(options["n_layer"], options["n_head"], options["n_embd"], options["block_size"], vocab,
                   tie_embeddings=options["tie_embeddings"], xp=xp, dtype=dtype, seed=seed)

    def __init__(self, n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=256, *,
                 tie_embeddings=True, xp=np, dtype=np.float32, seed=0):
        n_layer, n_head, n_embd = int(n_layer), int(n_head), int(n_embd)
        block_size, vocab_size = int(block_size), int(vocab_size)
        if min(n_layer, n_head, n_embd, block_size) < 1 or vocab_size < 2:
            raise ValueError("n_layer, n_head, n_embd, block_size must be >= 1 and vocab_size >= 2")
        if n_embd % n_head:
            raise ValueError(f"n_embd = {n_embd} is not a multiple of n_head = {n_head}")
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.block_size, self.vocab_size, self.tie = block_size, vocab_size, bool(tie_embeddings)
        self.xp, self.dtype = xp, np.dtype(dtype)
        self._layout()
        self.params = xp.zeros(self._n, dtype=self.dtype)
        self.grads = grads_buffer(xp, self._n, self.dtype)
        self.p = {name: self.params[o:o + math.prod(s)].reshape(s) for name, o, s in self._tensors}
        self.g = {name: self.grads[o:o + math.prod(s)].reshape(s) for name, o, s in self._tensors}
        self._masks = {}
        self.seed = None
        self.init(seed)

    # ------------------------------------------------------------------ layout
    def _layout(self):
        C, V = self.n_embd, self.vocab_size
        out, off, self.ready = [], 0, []

        def add(name, shape):
            nonlocal off
            out.append((name, off, tuple(shape)))
            off += math.prod(shape)

        if not self.tie:
            add("lm_head", (V, C))
        add("lnf.w", (C,))
        add("lnf.b", (C,))
        self.ready.append(off)
        shapes = _block_shapes(C)
        for layer in reversed(range(self.n_layer)):
            for t in BLOCK_TENSORS:
                add(f"h{layer}.{t}", shapes[t])
            self.ready.append(off)
        add("wpe", (self.block_size, C))
        add("wte", (V, C))
        self._tensors, self._n = out, off

    def tensors(self):
        return list(self._tensors)

    def decay_segments(self):
        """``[(lo, hi), ...]`` of the tensors weight decay applies to: the 2-D linear weights
        (blocks' and an untied lm_head); not LayerNorm, biases, wte or wpe."""
        return [(o, o + math.prod(s)) for name, o, s in self._tensors
                if len(s) == 2 and name not in ("wte", "wpe")]

    def init(self, seed=0):
        rng = np.random.default_rng(seed)
        host = np.zeros(self._n, dtype=np.float64)
        where = {name: (o, s) for name, o, s in self._tensors}
        resid = 0.02 / math.sqrt(2 * self.n_layer)

        def put(name, values):
            o, s = where[name]
            host[o:o + math.prod(s)] = np.asarray(values, dtype=np.float64).ravel()

        put("wte", rng.normal(0.0, 0.02, where["wte"][1]))
        put("wpe", rng.normal(0.0, 0.02, where["wpe"][1]))
        if not self.tie:
            put("lm_head", rng.normal(0.0, 0.02, where["lm_head"][1]))
        put("lnf.w", np.ones(self.n_embd))
        for layer in range(self.n_layer):
            for t, shape in _block_shapes(self.n_embd).items():
                if t.startswith("ln") and t.endswith(".w"):
                    put(f"h{layer}.{t}", np.ones(shape))
                elif t.endswith(".w"):
                    put(f"h{layer}.{t}", rng.normal(0.0, resid if "proj" in t else 0.02, shape))
        self.params[...] = self.xp.asarray(host.astype(self.dtype))
        self.grads[...] = 0
        self.seed = seed

    def config(self):
        return {"n_layer": self.n_layer, "n_head": self.n_head, "n_embd": self.n_embd,
                "block_size": self.block_size, "vocab_size": self.vocab_size, "tie_embeddings": self.tie,
                "dtype": self.dtype.name}

    def flops_per_token(self, T=None) -> float:
        """Training FLOPs per token (forward + backward): 6·N_mm + 12·L·T·C (see the docstring)."""
        T = self.block_size if T is None else int(T)
        C, L, V = self.n_embd, self.n_layer, self.vocab_size
        n_mm = L * 12 * C * C + V * C
        return 6.0 * n_mm + 12.0 * L * T * C

    def describe(self):
        tie = "tied" if self.tie else "untied"
        return (f"GPT {self.n_layer}L {self.n_head}H {self.n_embd}C ctx {self.block_size} vocab "
                f"{self.vocab_size} ({tie}), {self.n_params:,} params ({self.dtype.name}, {self.xp.__name__})")

    # ----------------------------------------------------------------- batches
    def _split(self, batch):
        xp = self.xp
        if not isinstance(batch, (tuple, list)):
            batch = (batch,)
        if len(batch) == 1:
            tok = xp.asarray(batch[0])
            x, y = tok[:, :-1], tok[:, 1:]
        else:
            x, y = xp.asarray(batch[0]), xp.asarray(batch[1])
        if x.ndim != 2 or y.shape != x.shape:
            raise ValueError(f"a GPT batch is tokens (B, T+1) or (x (B, T), y (B, T)); got {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
        if x.shape[1] > self.block_size:
            raise ValueError(f"sequence length {x.shape[1]} exceeds block_size {self.block_size}")
        return x.astype(np.int64), y.astype(np.int64)

    def count(self, batch):
        x, _ = self._split(batch)
        return int(x.size)

    def _mask(self, T):
        m = self._masks.get(T)
        if m is None:
            m = self._masks[T] = K.causal_mask(self.xp, T, self.dtype)
        return m

    # ----------------------------------------------------------------- forward
    def _forward(self, x, keep):
        """x (B, T) int -> logits (B*T, V) and, with ``keep``, the per-layer caches."""
        xp, p, C = self.xp, self.p, self.n_embd
        B, T = x.shape
        N = B * T
        h = (p["wte"][x.reshape(-1)].reshape(B, T, C) + p["wpe"][:T]).reshape(N, C)   # (N, C)
        mask, caches = self._mask(T), []
        for layer in range(self.n_layer):
            q = lambda t: p[f"h{layer}.{t}"]  # noqa: E731
            ln1, c_ln1 = K.layernorm_forward(xp, h, q("ln1.w"), q("ln1.b"))           # (N, C)
            qkv = xp.matmul(ln1, q("attn_qkv.w")) + q("attn_qkv.b")                   # (N, 3C)
            att, c_att = K.attention_forward(xp, qkv.reshape(B, T, 3 * C), self.n_head, mask)
            att = att.reshape(N, C)                                                   # (N, C)
            h2 = h + xp.matmul(att, q("attn_proj.w")) + q("attn_proj.b")              # (N, C)
            ln2, c_ln2 = K.layernorm_forward(xp, h2, q("ln2.w"), q("ln2.b"))          # (N, C)
            fc = xp.matmul(ln2, q("mlp_fc.w")) + q("mlp_fc.b")                        # (N, 4C)
            gl, c_gelu = K.gelu_forward(xp, fc)                                       # (N, 4C)
            h = h2 + xp.matmul(gl, q("mlp_proj.w")) + q("mlp_proj.b")                 # (N, C)
            if keep:
                caches.append((ln1, c_ln1, c_att, att, ln2, c_ln2, c_gelu, gl))
        lnf, c_lnf = K.layernorm_forward(xp, h, p["lnf.w"], p["lnf.b"])               # (N, C)
        head = p["wte"] if self.tie else p["lm_head"]                                 # (V, C)
        logits = xp.matmul(lnf, head.T)                                               # (N, V)
        return logits, (caches, lnf, c_lnf)

    def logits(self, x):
        """x (B, T) int tokens -> logits (B, T, V) (a new array)."""
        x = self.xp.asarray(x).astype(np.int64)
        z, _ = self._forward(x, keep=False)
        return z.reshape(x.shape[0], x.shape[1], self.vocab_size)

    # ---------------------------------------------------------------- backward
    def loss_and_grad(self, batch, on_grad_ready=None):
        """Forward + backward on ``batch``; overwrites ``grads``; (mean loss per token, correct)."""
        xp, p, g, C = self.xp, self.p, self.g, self.n_embd
        x, y = self._split(batch)
        B, T = x.shape
        N = B * T
        if N == 0:
            raise ValueError("loss_and_grad needs a non-empty batch")
        z, (caches, lnf, c_lnf) = self._forward(x, keep=True)
        loss_sum, correct = K.cross_entropy(xp, z, y.reshape(-1), xp.arange(N))
        z[xp.arange(N), y.reshape(-1)] -= 1
        z *= 1.0 / N                                                                  # dlogits (N, V)
        head = p["wte"] if self.tie else p["lm_head"]
        dhead = g["wte"] if self.tie else g["lm_head"]
        xp.matmul(z.T, lnf, out=dhead)                                                # (V, C)
        dh = K.layernorm_backward(xp, xp.matmul(z, head), c_lnf, p["lnf.w"], g["lnf.w"], g["lnf.b"])
        del z
        if on_grad_ready is not None:
            on_grad_ready(self.ready[0])
        for i, layer in enumerate(reversed(range(self.n_layer))):
            dh = self._block_backward(layer, dh, caches[layer], B, T)
            caches[layer] = None
            if on_grad_ready is not None:
                on_grad_ready(self.ready[i + 1])
        g["wpe"][T:] = 0
        xp.sum(dh.reshape(B, T, C), axis=0, out=g["wpe"][:T])                         # (T, C)
        if not self.tie:
            g["wte"][...] = 0
        K.embedding_backward(xp, g["wte"], x.reshape(-1), dh)
        if on_grad_ready is not None:
            on_grad_ready(self._n)
        return float(loss_sum) / N, int(correct)

    def _block_backward(self, layer, dh, cache, B, T):
        """dh (N, C) at the block's output -> dh at its input; the block's grads written."""
        xp, C = self.xp, self.n_embd
        q = lambda t: self.p[f"h{layer}.{t}"]  # noqa: E731
        d = lambda t: self.g[f"h{layer}.{t}"]  # noqa: E731
        ln1, c_ln1, c_att, att, ln2, c_ln2, c_gelu, gl = cache
        xp.matmul(gl.T, dh, out=d("mlp_proj.w"))                                      # (4C, C)
        xp.sum(dh, axis=0, out=d("mlp_proj.b"))
        dfc = K.gelu_backward(xp, xp.matmul(dh, q("mlp_proj.w").T), c_gelu)           # (N, 4C)
        xp.matmul(ln2.T, dfc, out=d("mlp_fc.w"))                                      # (C, 4C)
        xp.sum(dfc, axis=0, out=d("mlp_fc.b"))
        dh2 = dh + K.layernorm_backward(xp, xp.matmul(dfc, q("mlp_fc.w").T), c_ln2, q("ln2.w"),
                                        d("ln2.w"), d("ln2.b"))                        # (N, C)
        xp.matmul(att.T, dh2, out=d("attn_proj.w"))                                   # (C, C)
        xp.sum(dh2, axis=0, out=d("attn_proj.b"))
        datt = xp.matmul(dh2, q("attn_proj.w").T).reshape(B, T, C)                    # (B, T, C)
        dqkv = K.attention_backward(xp, datt, c_att).reshape(B * T, 3 * C)            # (N, 3C)
        xp.matmul(ln1.T, dqkv, out=d("attn_qkv.w"))                                   # (C, 3C)
        xp.sum(dqkv, axis=0, out=d("attn_qkv.b"))
        return dh2 + K.layernorm_backward(xp, xp.matmul(dqkv, q("attn_qkv.w").T), c_ln1, q("ln1.w"),
                                          d("ln1.w"), d("ln1.b"))

    # -------------------------------------------------------------- evaluation
    def evaluate(self, batch, batch_size=64):
        """(sum of per-token losses, correct next-token predictions) over ``batch``; grads untouched."""
        x, y = self._split(batch)
        xp = self.xp
        loss_total, correct_total = 0.0, 0
        for a in range(0, x.shape[0], max(1, int(batch_size))):
            xb, yb = x[a:a + batch_size], y[a:a + batch_size]
            z, _ = self._forward(xb, keep=False)
            ls, c = K.cross_entropy(xp, z, yb.reshape(-1), xp.arange(yb.size))
            loss_total += float(ls)
            correct_total += int(c)
        return loss_total, correct_total
