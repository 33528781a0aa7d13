"""Optimizers, gradient clipping and learning-rate schedules on flat buffers.

Every rank applies the same step to the same averaged gradients, so the update
must be deterministic: no randomness, no reduction whose order can change.
Optimizers work on the model's flat ``params``/``grads`` buffers (NumPy or
CuPy) with in-place ``out=`` operations and preallocated scratch, so a step
allocates nothing.

    SGD   v <- mu*v + (g + wd*p)          p <- p - lr*v        (nesterov: p <- p - lr*(g' + mu*v))
    Adam  m <- b1*m + (1-b1)*g'           v <- b2*v + (1-b2)*g'^2
          p <- p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)       with g' = g + wd*p
    AdamW p <- p * (1 - lr*wd) on the decayed segments only (decoupled; e.g. not LayerNorm, biases,
          embeddings), then the Adam step with g' = g                   (PyTorch's AdamW)

(the PyTorch conventions: momentum without dampening, L2 weight decay added
to the gradient.) ``state_dict()`` returns host copies; ``load_state_dict``
restores them bitwise, so a resumed run takes the same steps.

Clip after the all-reduce: the averaged gradients are identical on every
rank, so the local norm is the global one and every rank scales alike.
"""

from __future__ import annotations

import math

import numpy as np

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")


def _module_of(buf):
    if isinstance(buf, np.ndarray):
        return np
    if type(buf).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    raise TypeError(f"expected a NumPy or CuPy array, got {type(buf).__name__}")


def _host_copy(buf):
    return buf.copy() if isinstance(buf, np.ndarray) else buf.get()


def _names(items):
    return ", ".join(repr(s) for s in items)


class Optimizer:
    """Base class: ``params`` is updated in place by ``step(grads)``."""

    kind = "?"

    def __init__(self, params, lr, weight_decay=0.0, *, xp=None):
        lr, weight_decay = float(lr), float(weight_decay)
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.params = params
        self.xp = xp or _module_of(params)
        self.lr = lr
        self.weight_decay = weight_decay
        self.steps = 0
        self._scratch = self.xp.empty_like(params)

    def _check(self, grads):
        if grads.shape != self.params.shape or grads.dtype != self.params.dtype:
            raise ValueError(f"grads {grads.dtype}{tuple(grads.shape)} do not match "
                             f"params {self.params.dtype}{tuple(self.params.shape)}")

    def _decayed(self, grads):
        """``grads + wd*params`` in scratch, or ``grads`` itself when wd == 0."""
        if self.weight_decay == 0.0:
            return grads
        g = self._scratch
        self.xp.multiply(self.params, self.weight_decay, out=g)
        g += grads
        return g

    def step(self, grads, lr=None):  # pragma: no cover - abstract
        raise NotImplementedError

    # state ----------------------------------------------------------------

    def _buffers(self):
        return {}

    def state_dict(self):
        """``{"kind": str, "step": int, <buffer name>: numpy array, ...}`` (host copies)."""
        d = {"kind": self.kind, "step": int(self.steps)}
        for name, buf in self._buffers().items():
            d[name] = _host_copy(buf)
        return d

    def load_state_dict(self, d):
        """Restore what ``state_dict()`` returned (exactly)."""
        kind = d.get("kind", self.kind)
        if isinstance(kind, bytes):
            kind = kind.decode()
        if str(kind) != self.kind:
            raise ValueError(f"optimizer state is for {kind!r}, this optimizer is {self.kind!r}")
        bufs = self._buffers()
        for name, buf in bufs.items():
            if name not in d:
                raise ValueError(f"optimizer state for {self.kind!r} lacks {name!r}")
            shape = tuple(np.shape(d[name]))
            if shape != tuple(buf.shape):
                raise ValueError(f"optimizer state {name!r} has shape {shape}, "
                                 f"expected {tuple(buf.shape)}")
        for name, buf in bufs.items():
            buf[...] = self.xp.asarray(d[name], dtype=buf.dtype)
        self.steps = int(d.get("step", 0))

    def __repr__(self):
        return f"<{type(self).__name__} lr={self.lr} step={self.steps}>"


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay."""

    kind = "sgd"

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False, *, xp=None):
        super().__init__(params, lr, weight_decay, xp=xp)
        momentum = float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0.0:
            raise ValueError("nesterov momentum needs momentum > 0")
        self.momentum = momentum
        self.nesterov = bool(nesterov)
        self.velocity = self.xp.zeros_like(params) if momentum else None
        self._nesterov_tmp = (self.xp.empty_like(params)
                              if self.nesterov and self.weight_decay else None)

    def _buffers(self):
        return {"momentum_buffer": self.velocity} if self.velocity is not None else {}

    def step(self, grads, lr=None):
        """``params -= lr * update``; ``lr`` overrides ``self.lr`` for this step."""
        self._check(grads)
        xp = self.xp
        lr = self.lr if lr is None else float(lr)
        g = self._decayed(grads)            # grads, or g + wd*p in self._scratch
        u = self._scratch
        if self.velocity is not None:
            v = self.velocity
            v *= self.momentum
            v += g
            if self.nesterov:               # u = g + mu*v
                if g is u:
                    t = self._nesterov_tmp
                    xp.multiply(v, self.momentum, out=t)
                    u += t
                else:
                    xp.multiply(v, self.momentum, out=u)
                    u += g
                u *= lr
            else:
                xp.multiply(v, lr, out=u)
        elif g is u:
            u *= lr
        else:
            xp.multiply(g, lr, out=u)
        self.params -= u
        self.steps += 1


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction and L2 weight decay added to the gradient."""

    kind = "adam"

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, xp=None):
        super().__init__(params, lr, weight_decay, xp=xp)
        b1, b2 = (float(b) for b in betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {tuple(betas)}")
        eps = float(eps)
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.betas = (b1, b2)
        self.eps = eps
        self.exp_avg = self.xp.zeros_like(params)
        self.exp_avg_sq = self.xp.zeros_like(params)
        self._scratch2 = self.xp.empty_like(params)

    def _buffers(self):
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def step(self, grads, lr=None):
        """One Adam step; ``lr`` overrides ``self.lr`` for this step."""
        self._check(grads)
        xp = self.xp
        lr = self.lr if lr is None else float(lr)
        b1, b2 = self.betas
        t = self.steps + 1
        g = self._decayed(grads)            # may be self._scratch
        s = self._scratch2
        m, v = self.exp_avg, self.exp_avg_sq
        m *= b1
        xp.multiply(g, 1.0 - b1, out=s)
        m += s
        v *= b2
        xp.multiply(g, g, out=s)
        s *= 1.0 - b2
        v += s
        bc1 = 1.0 - b1 ** t
        bc2 = 1.0 - b2 ** t
        xp.sqrt(v, out=s)
        s *= 1.0 / math.sqrt(bc2)
        s += self.eps
        xp.divide(m, s, out=s)
        s *= lr / bc1
        self.params -= s
        self.steps = t


class AdamW(Adam):
    """Adam with decoupled weight decay, applied to ``decay_segments`` ([(lo, hi), ...]; None: all)."""

    kind = "adamw"

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decay_segments=None, *,
                 xp=None):
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=0.0, xp=xp)
        wd = float(weight_decay)
        if not wd >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {wd}")
        self.decoupled_wd = wd
        self.decay_segments = [(0, params.size)] if decay_segments is None else [
            (int(lo), int(hi)) for lo, hi in decay_segments]

    def step(self, grads, lr=None):
        lr_now = self.lr if lr is None else float(lr)
        if self.decoupled_wd:
            keep = 1.0 - lr_now * self.decoupled_wd
            for lo, hi in self.decay_segments:
                self.params[lo:hi] *= keep
        super().step(grads, lr)


def make_optimizer(name, params, *, lr, momentum=0.0, weight_decay=0.0, nesterov=False,
                   betas=(0.9, 0.999), eps=1e-8, xp=None, decay_segments=None):
    """``SGD``, ``Adam`` or ``AdamW`` by name (``"sgd"``, ``"adam"``, ``"adamw"``); other names raise
    ValueError. ``decay_segments`` (AdamW only): the ranges of ``params`` weight decay applies to."""
    key = str(name).lower()
    if key == "adamw":
        return AdamW(params, lr, betas=betas, eps=eps, weight_decay=weight_decay, decay_segments=decay_segments,
                     xp=xp)
    if key == "sgd":
        return SGD(params, lr, momentum=momentum, weight_decay=weight_decay,
                   nesterov=nesterov, xp=xp)
    if key == "adam":
        return Adam(params, lr, betas=betas, eps=eps, weight_decay=weight_decay, xp=xp)
    raise ValueError(f"unknown optimizer {name!r}: choose one of {_names(OPTIMIZERS)}")


# ------------------------------------------------------------------ clipping

def clip_by_global_norm(grads, max_norm):
    """Scale ``grads`` in place so that ||grads||_2 <= max_norm; return the norm before.

    No-op when ``max_norm <= 0``. A non-finite norm is returned and the
    gradients are left alone: the caller decides (skip the step, stop).
    """
    xp = _module_of(grads)
    flat = grads.reshape(-1)
    norm = math.sqrt(float(xp.vdot(flat, flat)))
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        grads *= max_norm / norm
    return norm


def clip_by_value(grads, tau):
    """``g <- sign(g) * min(|g|, tau)`` element-wise, in place. No-op when ``tau <= 0``."""
    if tau > 0:
        _module_of(grads).clip(grads, -tau, tau, out=grads)
    return grads


# ----------------------------------------------------------------- schedules

class LRSchedule:
    """Learning rate as a function of the step number (0-based).

    All kinds warm up linearly over the first ``warmup_steps`` steps:
    ``lr(s) = base_lr * (s + 1) / warmup_steps``; then

    - ``constant``: ``base_lr``
    - ``step``: ``base_lr * gamma ** (s // step_size)`` (boundaries at multiples
      of ``step_size``, counted from step 0), never below ``min_lr``
    - ``cosine``: from ``base_lr`` at the end of warm-up down to ``min_lr`` at
      ``total_steps`` (and ``min_lr`` after it).
    """

    def __init__(self, kind, base_lr, *, total_steps=None, warmup_steps=0, step_size=None,
                 gamma=0.1, min_lr=0.0):
        kind = str(kind).lower()
        if kind not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {kind!r}: choose one of {_names(SCHEDULES)}")
        self.kind = kind
        self.base_lr = float(base_lr)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.gamma = float(gamma)
        self.min_lr = float(min_lr)
        if self.base_lr < 0:
            raise ValueError(f"base_lr must be >= 0, got {self.base_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.min_lr < 0:
            raise ValueError(f"min_lr must be >= 0, got {self.min_lr}")
        if kind == "cosine" and (self.total_steps is None or self.total_steps < 1):
            raise ValueError("cosine schedule needs total_steps >= 1")
        if kind == "step":
            if step_size is None:
                if not self.total_steps:
                    raise ValueError("step schedule needs step_size (or total_steps)")
                step_size = max(1, self.total_steps // 3)
            if int(step_size) < 1:
                raise ValueError(f"step_size must be >= 1, got {step_size}")
            if not self.gamma > 0:
                raise ValueError(f"gamma must be > 0, got {self.gamma}")
        self.step_size = None if step_size is None else int(step_size)

    def __call__(self, step):
        step = int(step)
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        if self.kind == "step":
            return max(self.min_lr, self.base_lr * self.gamma ** (step // self.step_size))
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def __repr__(self):
        return (f"LRSchedule({self.kind!r}, {self.base_lr}, total_steps={self.total_steps}, "
                f"warmup_steps={self.warmup_steps})")
