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

Pipeline parts (``part=Part(lo, hi, embed, head)``; the whole model is ``Part(0, n_layer, True,
True)``): a part holds only its tensors -- blocks [lo, hi), wte + wpe with ``embed``, lnf (+ lm_head, or
wte when tied) with ``head`` -- in the same relative order, so its buffers are a subsequence of the
full layout (``tensors()`` names them as the full model does). ``stage_forward`` / ``stage_backward``
run one micro-batch through the part; ``loss_and_grad`` of the whole model is the same pieces
composed, so a pipeline computes exactly what one rank computes. The tied ``wte`` gradient has two
parts, the head's (``g_head``) and the embedding's; they are kept apart and added once
(``keep_apart=True`` leaves the adding to the caller, as accumulation and pipelines need).

Cost: training FLOPs per token ~ 6·N_mm + 12·L·T·C (``flops_per_token``), N_mm the parameters
in matmuls (the blocks' weights and the head; not wpe, LayerNorm or biases). Activations kept
for backward per layer ~ 16·N·C + B·nh·T² values (N = B·T). A model knows nothing of MPI.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import gpt_layers as K
from . import gpt_seq
from .gpt_shard import TP, block_shapes, shard_index
from .gpt_shard import check as _tp_check
from .base import Model, grads_buffer, params_buffer

BLOCK_TENSORS = ("mlp_proj.w", "mlp_proj.b", "mlp_fc.w", "mlp_fc.b", "ln2.w", "ln2.b",
                 "attn_proj.w", "attn_proj.b", "attn_qkv.w", "attn_qkv.b", "ln1.w", "ln1.b")


def piece_flops(C: int, V: int, T: int) -> tuple[float, float, float]:
    """Training FLOPs per token of (the embeddings, one block, the head + loss): what pipeline stages balance."""
    return 6.0 * C, 6.0 * 12 * C * C + 12.0 * T * C, 6.0 * V * C + 15.0 * V


class Part(NamedTuple):
    """The slice of the model one pipeline stage holds: blocks [lo, hi), the embeddings, the head."""
    lo: int
    hi: int
    embed: bool
    head: bool


def layout(n_layer, C, V, T, tie, part, tp=1):
    """``([(name, offset, shape)], n, ready)`` of ``part``: the tensors in backprop order (docstring)."""
    out, off, ready = [], 0, []

    def add(name, shape):
        nonlocal off
        out.append((name, off, tuple(shape)))
        off += math.prod(shape)

    if part.head:
        if not tie:
            add("lm_head", (V, C))
        add("lnf.w", (C,))
        add("lnf.b", (C,))
        ready.append(off)
    shapes = block_shapes(C, tp)
    for layer in reversed(range(part.lo, part.hi)):
        for t in BLOCK_TENSORS:
            add(f"h{layer}.{t}", shapes[t])
        ready.append(off)
    if part.embed:
        add("wpe", (T, C))
    if part.embed or (part.head and tie):
        add("wte", (V, C))
    return out, off, ready


class GPT(Model):
    kind = "gpt"
    consumes = ("tokens",)
    options_keys = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "tie_embeddings")
    pipeline = True  # offers stage parts (part=, stage_forward, stage_backward)

    @classmethod
    def from_spec(cls, spec, options, *, xp=np, seed=0, dtype=np.float32, part=None, tp=None):
        from ..runtime import UserError

        vocab = int(options["vocab_size"]) or int(spec.vocab_size)
        if vocab < spec.vocab_size:
            raise UserError(f"model.vocab_size = {vocab} but the data set's tokens go up to "
                            f"{spec.vocab_size - 1} (vocab_size {spec.vocab_size}); raise model.vocab_size "
                            "or set it to 0 (= the data set's)")
        if options["n_embd"] % options["n_head"]:
            raise UserError(f"model.n_embd = {options['n_embd']} is not a multiple of model.n_head = "
                            f"{options['n_head']}")
        if tp is not None and (why := _tp_check(options["n_head"], options["n_embd"], tp.size)):
            raise UserError(why)
        return cls(options["n_layer"], options["n_head"], options["n_embd"], options["block_size"], vocab,
                   tie_embeddings=options["tie_embeddings"], xp=xp, dtype=dtype, seed=seed, part=part, tp=tp)

    def __init__(self, n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=256, *,
                 tie_embeddings=True, xp=np, dtype=np.float32, seed=0, part=None, tp=None):
        n_layer, n_head, n_embd = int(n_layer), int(n_head), int(n_embd)
        block_size, vocab_size = int(block_size), int(vocab_size)
        if min(n_layer, n_head, n_embd, block_size) < 1 or vocab_size < 2:
            raise ValueError("n_layer, n_head, n_embd, block_size must be >= 1 and vocab_size >= 2")
        if n_embd % n_head:
            raise ValueError(f"n_embd = {n_embd} is not a multiple of n_head = {n_head}")
        self.part = Part(0, n_layer, True, True) if part is None else Part(*part)
        self.tp = TP() if tp is None else TP(*tp)
        if why := _tp_check(n_head, n_embd, self.tp.size):
            raise ValueError(why)
        if not 0 <= self.part.lo <= self.part.hi <= n_layer:
            raise ValueError(f"part {self.part}: blocks must lie in [0, {n_layer}]")
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.block_size, self.vocab_size, self.tie = block_size, vocab_size, bool(tie_embeddings)
        self.xp, self.dtype = xp, np.dtype(dtype)
        self._tensors, self._n, self.ready = layout(n_layer, n_embd, vocab_size, block_size, self.tie, self.part,
                                                    self.tp.size)
        self.params = params_buffer(xp, self._n, self.dtype)
        self.grads = grads_buffer(xp, self._n, self.dtype)
        self.p = {name: self.params[o:o + math.prod(s)].reshape(s) for name, o, s in self._tensors}
        self.g = {name: self.grads[o:o + math.prod(s)].reshape(s) for name, o, s in self._tensors}
        self.g_head = None  # the head's gradient: lm_head's, or the head part of a tied wte
        if self.part.head:
            both = self.tie and self.part.embed
            self.g_head = xp.zeros((vocab_size, n_embd), self.dtype) if both else self.g[
                "wte" if self.tie else "lm_head"]
        self._masks = {}
        self.seed = None
        self.init(seed)

    def tensors(self):
        return list(self._tensors)

    def grads_apart(self):
        """``[(lo, hi, array)]``: gradient parts that ``keep_apart=True`` leaves out of ``grads[lo:hi]``."""
        if self.tie and self.part.embed and self.part.head:
            o = next(o for name, o, _ in self._tensors if name == "wte")
            return [(o, o + self.g_head.size, self.g_head.reshape(-1))]
        return []

    def block_span(self, layer):
        """``(lo, hi)`` of block ``layer``'s tensors in the flat buffer (contiguous: the layout above)."""
        o = {name: (off, off + math.prod(shape)) for name, off, shape in self._tensors}
        return o[f"h{layer}.{BLOCK_TENSORS[0]}"][0], o[f"h{layer}.{BLOCK_TENSORS[-1]}"][1]

    def param_groups(self):
        """Every block of this part (ZeRO-3 gathers each just before its forward and its backward)."""
        return [self.block_span(layer) for layer in range(self.part.lo, self.part.hi)]

    def activation_bytes(self, batch_size):
        """The docstring's estimate: 16·N·C + B·nh·T² values per block, plus the logits (N·V, twice)."""
        N, T = batch_size * self.block_size, self.block_size
        per = 16 * N * self.n_embd + batch_size * self.n_head * T * T
        return self.dtype.itemsize * ((self.part.hi - self.part.lo) * per + (2 * N * self.vocab_size if self.part.head else 0))

    def decay_segments(self):
        """``[(lo, hi), ...]`` of the tensors weight decay applies to: the 2-D linear weights
        (blocks' and an untied lm_head); not LayerNorm, biases, wte or wpe."""
        return [(o, o + math.prod(s)) for name, o, s in self._tensors
                if len(s) == 2 and name not in ("wte", "wpe")]

    def init(self, seed=0):
        """Every tensor of the whole model drawn in one order (the docstring's); this part keeps its own."""
        rng = np.random.default_rng(seed)
        where = {name: (o, s) for name, o, s in self._tensors}
        for o, s in where.values():  # zeros where nothing is drawn (biases); tensor by tensor, no whole host copy
            self.params[o:o + math.prod(s)] = 0
        resid = 0.02 / math.sqrt(2 * self.n_layer)
        C, V, T = self.n_embd, self.vocab_size, self.block_size

        def put(name, values):  # the whole tensor drawn; this rank keeps its part (and its tp slice)
            if name in where:
                o, s = where[name]
                part = self.shard(name, np.asarray(values, dtype=np.float64)).ravel()
                self.params[o:o + math.prod(s)] = self.xp.asarray(part.astype(self.dtype))

        put("wte", rng.normal(0.0, 0.02, (V, C)))
        put("wpe", rng.normal(0.0, 0.02, (T, C)))
        if not self.tie:
            put("lm_head", rng.normal(0.0, 0.02, (V, C)))
        put("lnf.w", np.ones(C))
        for layer in range(self.n_layer):
            for t, shape in block_shapes(C).items():
                if t.startswith("ln") and t.endswith(".w"):
                    put(f"h{layer}.{t}", np.ones(shape))
                elif t.endswith(".w"):
                    put(f"h{layer}.{t}", rng.normal(0.0, resid if "proj" in t else 0.02, shape))
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

    def full_tensors(self):
        """``tensors()`` of the whole model, whole tensors (every part's names are a subsequence of it)."""
        return layout(self.n_layer, self.n_embd, self.vocab_size, self.block_size, self.tie,
                      Part(0, self.n_layer, True, True))[0]

    def shard_index(self, name, tp_rank=None):
        """The index of tp rank ``tp_rank``'s (default: this rank's) slice in the whole tensor; None: whole."""
        return shard_index(name, self.n_embd, self.tp.size, self.tp.rank if tp_rank is None else tp_rank)

    def shard(self, name, whole):
        """This rank's tp slice of the whole tensor ``name`` (the array itself when it is replicated)."""
        idx = self.shard_index(name)
        return whole if idx is None else whole[idx]

    def describe(self):
        tie = "tied" if self.tie else "untied"
        lo, hi, embed, head = self.part
        if (lo, hi, embed, head) != (0, self.n_layer, True, True):
            what = "+".join((["embeddings"] if embed else []) + [f"blocks {lo}-{hi - 1}"] + (["head"] if head else []))
            tie += f"; this stage: {what}"
        if self.tp.size > 1:
            tie += f"; tp slot {self.tp.rank} of {self.tp.size}: heads and MLP width / {self.tp.size}"
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

    def split_batch(self, batch):
        """A batch -> (x (B, T), y (B, T)) int64 (the inputs and the next-token targets)."""
        return self._split(batch)

    def count(self, batch):
        x, _ = self._split(batch)
        return int(x.size)

    def _mask(self, T):
        m = self._masks.get(T)
        if m is None:
            m = self._masks[T] = K.causal_mask(self.xp, T, self.dtype)
        return m

    # ------------------------------------------------------------------ pieces
    def _embed(self, x):
        """x (B, T) int -> h (N, C): wte[x] + wpe[:T]."""
        p, (B, T), C = self.p, x.shape, self.n_embd
        return (p["wte"][x.reshape(-1)].reshape(B, T, C) + p["wpe"][:T]).reshape(B * T, C)

    def _block(self, layer, h, B, T, keep):
        """One block's forward: h (N, C) -> h (N, C), and (with ``keep``) what its backward needs."""
        if self.tp.sequence:
            return gpt_seq.block_forward(self, layer, h, B, T, keep)
        xp, C, N = self.xp, self.n_embd, B * T
        q = lambda t: self.p[f"h{layer}.{t}"]  # noqa: E731
        ln1, c_ln1 = K.layernorm_forward(xp, h, q("ln1.w"), q("ln1.b"))               # (N, C)
        Cl, nh = C // self.tp.size, self.n_head // self.tp.size                       # this tp rank's share
        qkv = xp.matmul(ln1, q("attn_qkv.w")) + q("attn_qkv.b")                       # (N, 3C/tp)
        att, c_att = K.attention_forward(xp, qkv.reshape(B, T, 3 * Cl), nh, self._mask(T))
        att = att.reshape(N, Cl)                                                      # (N, C/tp)
        h2 = h + self._g(xp.matmul(att, q("attn_proj.w"))) + q("attn_proj.b")         # (N, C)
        ln2, c_ln2 = K.layernorm_forward(xp, h2, q("ln2.w"), q("ln2.b"))              # (N, C)
        fc = xp.matmul(ln2, q("mlp_fc.w")) + q("mlp_fc.b")                            # (N, 4C)
        gl, c_gelu = K.gelu_forward(xp, fc)                                           # (N, 4C)
        h = h2 + self._g(xp.matmul(gl, q("mlp_proj.w"))) + q("mlp_proj.b")            # (N, C)
        return h, ((ln1, c_ln1, c_att, att, ln2, c_ln2, c_gelu, gl) if keep else None)

    def _hooked(self, fn, layer, *args):
        """``fn(layer, *args)`` (a block's forward or backward) between params_needed / params_done (base.py)."""
        span = self.block_span(layer)
        self.params_needed(*span)
        out = fn(layer, *args)
        self.params_done(*span)
        return out

    def _g(self, partial):
        """The sum over the tp group of a row layer's partial product (g forward; f's backward): in place."""
        return partial if self.tp.size == 1 else self.tp.allreduce(partial)

    def _head(self, h):
        """h (N, C) -> logits (N, V), (lnf, its cache)."""
        p = self.p
        lnf, c_lnf = K.layernorm_forward(self.xp, h, p["lnf.w"], p["lnf.b"])           # (N, C)
        head = p["wte"] if self.tie else p["lm_head"]                                 # (V, C)
        return self.xp.matmul(lnf, head.T), (lnf, c_lnf)                              # (N, V)

    def _head_backward(self, z, y, ctx):
        """z: softmax probabilities (N, V), y (N) targets -> dh (N, C); lnf's and the head's grads written."""
        xp, p, g = self.xp, self.p, self.g
        lnf, c_lnf = ctx
        N = z.shape[0]
        z[xp.arange(N), y] -= 1
        z *= 1.0 / N                                                                  # dlogits (N, V)
        head = p["wte"] if self.tie else p["lm_head"]
        xp.matmul(z.T, lnf, out=self.g_head)                                          # (V, C)
        return K.layernorm_backward(xp, xp.matmul(z, head), c_lnf, p["lnf.w"], g["lnf.w"], g["lnf.b"])

    def _embed_backward(self, x, dh):
        """dh (N, C) at the embeddings -> wpe's and wte's (embedding part) grads written."""
        xp, g, (B, T), C = self.xp, self.g, x.shape, self.n_embd
        g["wpe"][T:] = 0
        xp.sum(dh.reshape(B, T, C), axis=0, out=g["wpe"][:T])                         # (T, C)
        g["wte"][...] = 0
        K.embedding_backward(xp, g["wte"], x.reshape(-1), dh)

    def _blocks(self, h, B, T, layers, keep):
        """h (N, C) through ``layers`` -> (h (N, C), their caches); with sequence parallelism the blocks
        work on this rank's rows (models/gpt_seq.py), gathered back whole at the end."""
        h, caches = self._rows(h), []
        for layer in layers:
            h, cache = self._hooked(self._block, layer, h, B, T, keep)
            caches.append(cache)
        return self._whole(h, B * T), caches

    def _blocks_backward(self, dh, caches, B, T, layers, ready=None):
        """dh (N, C) at the last of ``layers``' output -> at the first one's input; ``ready(i)`` after each."""
        dh = self._rows(dh)
        for i, (layer, cache) in enumerate(zip(reversed(layers), reversed(caches))):
            dh = self._hooked(self._block_backward, layer, dh, cache, B, T)
            caches[len(caches) - 1 - i] = None
            if ready is not None:
                ready(i)
        return self._whole(dh, B * T)

    def _rows(self, h):
        """This rank's rows of h (sequence parallelism), else h."""
        if not self.tp.sequence:
            return h
        lo, hi = self.tp.rows(h.shape[0])
        return h[lo:hi].copy()

    def _whole(self, h_s, N):
        return self.tp.allgather(h_s, N) if self.tp.sequence else h_s

    def _forward(self, x, keep):
        """x (B, T) int -> logits (B*T, V) and, with ``keep``, the per-layer caches (the whole model)."""
        B, T = x.shape
        h, caches = self._blocks(self._embed(x), B, T, range(self.n_layer), keep)
        logits, ctx = self._head(h)
        return logits, (caches, ctx)

    def logits(self, x):
        """x (B, T) int tokens -> logits (B, T, V) (a new array)."""
        x = self.xp.asarray(x).astype(np.int64)
        z, _ = self._forward(x, keep=False)
        return z.reshape(x.shape[0], x.shape[1], self.vocab_size)

    # ---------------------------------------------------------------- backward
    def loss_and_grad(self, batch, on_grad_ready=None, keep_apart=False):
        """Forward + backward on ``batch``; overwrites ``grads``; (mean loss per token, correct).
        ``keep_apart``: the tied head part stays in ``g_head`` (``grads_apart``), not added to wte's."""
        xp = self.xp
        x, y = self._split(batch)
        B, T = x.shape
        N = B * T
        if N == 0:
            raise ValueError("loss_and_grad needs a non-empty batch")
        z, (caches, ctx) = self._forward(x, keep=True)
        loss_sum, correct = K.cross_entropy(xp, z, y.reshape(-1), xp.arange(N))
        dh = self._head_backward(z, y.reshape(-1), ctx)
        del z
        if on_grad_ready is not None:
            on_grad_ready(self.ready[0])
        hook = None if on_grad_ready is None else (lambda i: on_grad_ready(self.ready[i + 1]))
        dh = self._blocks_backward(dh, caches, B, T, range(self.n_layer), hook)
        self._embed_backward(x, dh)
        if self.tie and not keep_apart:
            self.g["wte"] += self.g_head
        if on_grad_ready is not None:
            on_grad_ready(self._n)
        return float(loss_sum) / N, int(correct)

    def _block_backward(self, layer, dh, cache, B, T):
        """dh (N, C) at the block's output -> dh at its input; the block's grads written."""
        if self.tp.sequence:
            return gpt_seq.block_backward(self, layer, dh, cache, B, T)
        xp, C = self.xp, self.n_embd
        q = lambda t: self.p[f"h{layer}.{t}"]  # noqa: E731
        d = lambda t: self.g[f"h{layer}.{t}"]  # noqa: E731
        ln1, c_ln1, c_att, att, ln2, c_ln2, c_gelu, gl = cache
        xp.matmul(gl.T, dh, out=d("mlp_proj.w"))                                      # (4C, C)
        xp.sum(dh, axis=0, out=d("mlp_proj.b"))
        dfc = K.gelu_backward(xp, xp.matmul(dh, q("mlp_proj.w").T), c_gelu)           # (N, 4C)
        xp.matmul(ln2.T, dfc, out=d("mlp_fc.w"))                                      # (C, 4C)
        xp.sum(dfc, axis=0, out=d("mlp_fc.b"))
        dh2 = dh + K.layernorm_backward(xp, self._g(xp.matmul(dfc, q("mlp_fc.w").T)), c_ln2, q("ln2.w"),
                                        d("ln2.w"), d("ln2.b"))                        # (N, C); f's backward
        xp.matmul(att.T, dh2, out=d("attn_proj.w"))                                   # (C, C)
        xp.sum(dh2, axis=0, out=d("attn_proj.b"))
        datt = xp.matmul(dh2, q("attn_proj.w").T).reshape(B, T, C // self.tp.size)    # (B, T, C/tp)
        dqkv = K.attention_backward(xp, datt, c_att).reshape(B * T, 3 * C // self.tp.size)  # (N, 3C/tp)
        xp.matmul(ln1.T, dqkv, out=d("attn_qkv.w"))                                   # (C, 3C)
        xp.sum(dqkv, axis=0, out=d("attn_qkv.b"))
        return dh2 + K.layernorm_backward(xp, self._g(xp.matmul(dqkv, q("attn_qkv.w").T)), c_ln1, q("ln1.w"),
                                          d("ln1.w"), d("ln1.b"))

    # ------------------------------------------------------------------ stages
    def stage_forward(self, inp, y=None, keep=True):
        """One micro-batch through this part. ``inp``: tokens x (B, T) when the part embeds, else
        h (B, T, C). Returns (out, ctx): out = h (B, T, C), or on the head part (loss sum, correct,
        tokens) against targets ``y`` (B, T); ``ctx`` is what ``stage_backward`` needs."""
        xp, part = self.xp, self.part
        if part.embed:
            x = xp.asarray(inp).astype(np.int64)
            B, T = x.shape
            h = self._embed(x)
        else:
            x, (B, T, _) = None, inp.shape
            h = inp.reshape(B * T, self.n_embd)
        h, caches = self._blocks(h, B, T, range(part.lo, part.hi), keep)
        if not part.head:
            return h.reshape(B, T, self.n_embd), (x, caches, None, None)
        z, hctx = self._head(h)
        yy = xp.asarray(y).astype(np.int64).reshape(-1)
        loss_sum, correct = K.cross_entropy(xp, z, yy, xp.arange(B * T))
        return (float(loss_sum), int(correct), B * T), (x, caches, (z, yy, hctx) if keep else None, (B, T))

    def stage_backward(self, ctx, dout=None):
        """Backward of one micro-batch through this part (``dout``: the gradient at its output, None on
        the head part); overwrites this part's grads; returns the gradient at its input (None when it
        embeds). The tied head part of wte stays in ``g_head`` when the part embeds too (``grads_apart``)."""
        x, caches, head, shape = ctx
        if head is not None:
            z, yy, hctx = head
            B, T = shape
            dh = self._head_backward(z, yy, hctx)
        else:
            B, T, _ = dout.shape
            dh = dout.reshape(B * T, self.n_embd)
        dh = self._blocks_backward(dh, caches, B, T, range(self.part.lo, self.part.hi))
        if self.part.embed:
            self._embed_backward(x, dh)
            return None
        return dh.reshape(B, T, self.n_embd)

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
