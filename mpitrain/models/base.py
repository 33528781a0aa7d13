"""The interface every model implements, so that strategies and the loop never look inside one.

    params  | block that backprop finishes first | ... | block finished last |   one flat buffer
    grads   | same layout                         | ... |                     |   one flat buffer
              '--- grads[0:hi] is final once on_grad_ready(hi) was called ---'

- ``params`` / ``grads``: one contiguous 1-D buffer each (NumPy or CuPy, the model's ``xp``),
  every tensor a view into them; backprop finishes a growing prefix, so buckets overlap with it.
- ``tensors()``: ``[(name, offset, shape), ...]`` in buffer order (compression scales per tensor).
- ``loss_and_grad(batch, on_grad_ready=None)`` -> ``(mean loss, correct)``; overwrites ``grads``.
- ``evaluate(batch)`` -> ``(loss sum, correct)`` (sums, so ranks can add them up).
- ``count(batch)``: how many items the loss averages over (rows, tokens, graphs).
- ``describe()``: one line for the start-up log.
- ``from_spec(spec, options, xp=, seed=, dtype=)``: build for a data set (``data.spec.DataSpec``)
  and the ``[model]`` keys listed in ``options_keys``.

Initial values are drawn on the host from the seed, so NumPy and CuPy models start bitwise equal.
A model knows nothing of MPI: it takes its ``grads`` buffer from ``grads_buffer``, which the
caller may point at other memory for one build (``with grads_allocator(alloc): build(...)``; the
trainer uses it for node-shared windows when the all-reduce is ``shm``). ``params_buffer`` and
``params_allocator`` do the same for ``params`` (ZeRO-3 hands in memory whose pages it can give back).

Sharded parameters (ZeRO-3, sync/zero3.py): ``param_groups()`` lists the contiguous ``[lo, hi)`` ranges of
the flat buffer the model brackets with ``params_needed(lo, hi)`` / ``params_done(lo, hi)`` around each
use (a GPT block's forward and its backward); no-ops unless a strategy set ``params_hook``. Whatever
no group covers is needed whenever the model runs (the strategy gathers it around the step).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import numpy as np


_GRADS_ALLOC = contextvars.ContextVar("mpitrain_grads_alloc", default=None)
_PARAMS_ALLOC = contextvars.ContextVar("mpitrain_params_alloc", default=None)


@contextlib.contextmanager
def _using(var, alloc):
    token = var.set(alloc)
    try:
        yield
    finally:
        var.reset(token)


def grads_allocator(alloc):
    """Within the block, NumPy models take ``grads`` from ``alloc(n, dtype)`` (zeroed); None: xp.zeros."""
    return _using(_GRADS_ALLOC, alloc)


def params_allocator(alloc):
    """Within the block, NumPy models take ``params`` from ``alloc(n, dtype)`` (zeroed); None: xp.zeros."""
    return _using(_PARAMS_ALLOC, alloc)


def params_buffer(xp, n: int, dtype):
    """A zeroed 1-D parameter buffer of ``n`` x ``dtype``: from the current params_allocator (NumPy only)."""
    alloc = _PARAMS_ALLOC.get()
    if alloc is not None and xp is np:
        return alloc(int(n), np.dtype(dtype))
    return xp.zeros(n, dtype=dtype)


def grads_buffer(xp, n: int, dtype):
    """A zeroed 1-D gradient buffer of ``n`` x ``dtype``: from the current grads_allocator (NumPy only)."""
    alloc = _GRADS_ALLOC.get()
    if alloc is not None and xp is np:
        return alloc(int(n), np.dtype(dtype))
    return xp.zeros(n, dtype=dtype)


class Model:
    kind = "?"
    consumes: tuple[str, ...] = ()     # DataSpec kinds this model trains on
    options_keys: tuple[str, ...] = ()  # the [model] keys it reads (besides kind)

    params = grads = None
    xp = np
    params_hook = None  # set by a strategy that shards the parameters: .needed(lo, hi) / .done(lo, hi)

    @classmethod
    def from_spec(cls, spec, options: dict, *, xp=np, seed: int = 0, dtype=np.float32) -> "Model":
        raise NotImplementedError

    def tensors(self) -> list[tuple[str, int, tuple[int, ...]]]:
        raise NotImplementedError

    def segments(self) -> list[tuple[int, int]]:
        """``[(lo, hi), ...]`` of every tensor in buffer order (they tile ``[0, n_params)``)."""
        return [(off, off + math.prod(shape)) for _name, off, shape in sorted(self.tensors(), key=lambda t: t[1])]

    def param_groups(self) -> list[tuple[int, int]]:
        """The ``[lo, hi)`` ranges this model brackets with ``params_needed`` / ``params_done`` (none)."""
        return []

    def params_needed(self, lo: int, hi: int) -> None:
        """``params[lo:hi]`` is about to be read (ZeRO-3 gathers it into place)."""
        if self.params_hook is not None:
            self.params_hook.needed(lo, hi)

    def params_done(self, lo: int, hi: int) -> None:
        """``params[lo:hi]`` is not read again until the next ``params_needed`` (ZeRO-3 may free it)."""
        if self.params_hook is not None:
            self.params_hook.done(lo, hi)

    def activation_bytes(self, batch_size: int) -> int:
        """Bytes of activations one training micro-batch of ``batch_size`` keeps for backward (an estimate)."""
        return 0

    @property
    def n_params(self) -> int:
        return int(self.params.size)

    def loss_and_grad(self, batch, on_grad_ready=None):
        raise NotImplementedError

    def evaluate(self, batch):
        raise NotImplementedError

    def count(self, batch) -> int:
        return len(batch[-1])

    def describe(self) -> str:
        return self.kind

    def __repr__(self):
        return f"<{self.describe()}>"
