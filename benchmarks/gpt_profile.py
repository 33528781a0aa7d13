#!/usr/bin/env python3
"""Where one GPT training step's compute goes, by kind of work, on one rank (no communication).

    OMP_NUM_THREADS=1 python benchmarks/gpt_profile.py                  # jobs/gpt.toml's shapes
    OMP_NUM_THREADS=1 python benchmarks/gpt_profile.py --set model.block_size=64 --set train.batch_size=16

loss_and_grad runs on a batch of the job's shapes with ``xp`` replaced by a proxy of NumPy that
times every call (matmul, sum, ...) and with the layer kernels (models/gpt_layers.py) timed as
one unit each: time is *exclusive* -- a NumPy call inside a kernel counts for the kernel, so
nothing is counted twice. What no call covers (residual and bias adds written as operators,
slicing, Python) is "other". Steps are timed with and without the proxy; the shares are scaled
to the plain step time. Prints a markdown table (ms per step, share).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import numpy as np

from mpitrain import config
from mpitrain.models import GPT
from mpitrain.models import gpt_layers as K

KINDS = {"layernorm_forward": "layernorm", "layernorm_backward": "layernorm", "gelu_forward": "gelu",
         "gelu_backward": "gelu", "attention_forward": "attention (scores, softmax, values)",
         "attention_backward": "attention (scores, softmax, values)", "cross_entropy": "cross-entropy + softmax",
         "embedding_backward": "embedding scatter-add", "matmul": "matmuls (linear layers, head)"}


class Clock:
    def __init__(self):
        self.t, self.depth = defaultdict(float), 0

    def wrap(self, name, fn):
        def timed(*a, **k):
            if self.depth:  # inside a kernel: its time is the kernel's
                return fn(*a, **k)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[KINDS.get(name, "other NumPy calls (bias sums, copies)")] += time.perf_counter() - t0
                self.depth -= 1
        return timed


class TimedNumpy:
    """``np`` whose callables are timed by ``clock`` (attributes that are not functions pass through)."""

    def __init__(self, clock):
        self._clock = clock

    def __getattr__(self, name):
        v = getattr(np, name)
        if isinstance(v, np.ufunc):
            return TimedUfunc(v, self._clock.wrap(name, v))
        return self._clock.wrap(name, v) if callable(v) and not isinstance(v, type) else v


class TimedUfunc:
    """A ufunc whose call is timed; ``.at``, ``.reduce`` ... pass through (untimed: "other")."""

    def __init__(self, uf, timed):
        self._uf, self._timed = uf, timed

    def __call__(self, *a, **k):
        return self._timed(*a, **k)

    def __getattr__(self, name):
        return getattr(self._uf, name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", nargs="?", default="jobs/gpt.toml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    cfg = config.load(args.job, args.set)
    mc, B = cfg.model, cfg.train.batch_size
    m = GPT(mc.n_layer, mc.n_head, mc.n_embd, mc.block_size, mc.vocab_size or 256,
            tie_embeddings=mc.tie_embeddings, seed=0)
    tok = np.random.default_rng(0).integers(0, 256, size=(B, mc.block_size + 1))
    for _ in range(3):
        m.loss_and_grad(tok)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        m.loss_and_grad(tok)
    plain = (time.perf_counter() - t0) / args.steps
    clock = Clock()
    saved = {n: getattr(K, n) for n in KINDS if hasattr(K, n)}
    for n, f in saved.items():
        setattr(K, n, clock.wrap(n, f))
    m.xp = TimedNumpy(clock)
    try:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            m.loss_and_grad(tok)
        proxied = (time.perf_counter() - t0) / args.steps
    finally:
        for n, f in saved.items():
            setattr(K, n, f)
        m.xp = np
    parts = {k: v / args.steps for k, v in clock.t.items()}
    parts["other (operator adds, slicing, Python)"] = max(proxied - sum(parts.values()), 0.0)
    scale = plain / proxied
    tokens = B * mc.block_size
    print(f"GPT {mc.n_layer}L {mc.n_head}H {mc.n_embd}C ctx {mc.block_size}, batch {B}: {tokens} tokens per step; "
          f"loss_and_grad {1e3 * plain:.1f} ms ({tokens / plain:,.0f} tokens/s on this rank; timed with the "
          f"proxy: {1e3 * proxied:.1f} ms, shares scaled to the plain time)\n")
    print("| part | ms per step | share |\n|---|---|---|")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {1e3 * v * scale:.2f} | {100 * v / proxied:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
