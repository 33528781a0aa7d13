"""A multi-layer perceptron with flat parameter and gradient buffers.

Forward and backward are written by hand against one array module ``xp``
(NumPy or CuPy), so the same code runs on a CPU or a GPU. There is no MPI
here: the training loop moves the gradients.

All parameters live in ONE contiguous 1-D buffer, ``model.params``, and all
gradients in another of the same size, ``model.grads``. Each layer's ``W``,
``b``, ``dW`` and ``db`` are views into them. The LAST layer comes FIRST::

    offset 0                                                          n_params
    | W[L-1] b[L-1] | W[L-2] b[L-2] |   ...   | W[1] b[1] | W[0] b[0] |
    '------ 1 ------'------ 2 ------'         '---- L-1 --'---- L ----'
                  backprop finishes the blocks in this order

Backprop runs from the last layer to the first, so the finished gradients
always form a growing prefix ``grads[0:hi]``. ``loss_and_grad((x, y),
on_grad_ready=cb)`` calls ``cb(hi)`` as each layer completes; the training
loop can start averaging that prefix while earlier layers still compute.

Within a block, ``W`` (fan_in x fan_out, row-major) precedes ``b``.
Layer ``i`` computes ``a[i+1] = act(a[i] @ W[i] + b[i])``; the last layer
gives the logits of a softmax cross-entropy loss (mean over the batch).

Initial values are drawn with ``numpy.random.default_rng(seed)`` on the host
(layers in order 0..L-1; He-normal for relu, Glorot-uniform for tanh, zero
biases) and copied in, so NumPy and CuPy models start bitwise identical.
"""

from __future__ import annotations

import math

import numpy as np

from .base import Model, grads_buffer, params_buffer

ACTIVATIONS = ("relu", "tanh")


class Layer:
    """One dense layer: views into the model's flat buffers and its range there."""

    __slots__ = ("name", "index", "fan_in", "fan_out", "lo", "hi", "W", "b", "dW", "db")

    def __init__(self, name, index, fan_in, fan_out, lo):
        self.name = name
        self.index = index
        self.fan_in = fan_in
        self.fan_out = fan_out
        self.lo = lo
        self.hi = lo + fan_in * fan_out + fan_out
        self.W = self.b = self.dW = self.db = None

    def __repr__(self):
        return f"Layer({self.name}: {self.fan_in}->{self.fan_out}, params[{self.lo}:{self.hi}])"


class MLP(Model):
    """``features -> hidden[0] -> ... -> hidden[-1] -> classes`` with softmax cross-entropy.

    ``hidden=[]`` is softmax regression. ``xp`` is the array module (numpy or
    cupy); ``dtype`` the floating type of parameters and activations.
    """

    kind = "mlp"
    consumes = ("features+labels",)
    options_keys = ("hidden", "activation")

    @classmethod
    def from_spec(cls, spec, options, *, xp=np, seed=0, dtype=np.float32):
        return cls(spec.features, options["hidden"], spec.classes, options["activation"], xp=xp, dtype=dtype,
                   seed=seed)

    _MAX_CACHED_BATCH_SIZES = 8  # train, last partial batch, eval chunks, ...

    def __init__(self, features, hidden=(), classes=10, activation="relu", *,
                 xp=np, dtype=np.float32, seed=0):
        hidden = [int(h) for h in (hidden or [])]
        features, classes = int(features), int(classes)
        if features < 1:
            raise ValueError(f"features must be >= 1, got {features}")
        if classes < 2:
            raise ValueError(f"classes must be >= 2, got {classes}")
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden widths must be >= 1, got {hidden}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: choose one of "
                             + ", ".join(repr(a) for a in ACTIVATIONS))
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise ValueError(f"dtype must be a floating type, got {dtype}")

        self.features, self.hidden, self.classes = features, hidden, classes
        self.activation = activation
        self.xp, self.dtype = xp, dtype
        self.widths = [features, *hidden, classes]

        # Offsets: the last layer at 0, then backwards.
        L = len(self.widths) - 1
        sizes = [self.widths[i] * self.widths[i + 1] + self.widths[i + 1] for i in range(L)]
        lo = {}
        off = 0
        for i in reversed(range(L)):
            lo[i] = off
            off += sizes[i]
        self._n = off

        self.params = params_buffer(xp, self._n, dtype)
        self.grads = grads_buffer(xp, self._n, dtype)
        self.layers = []
        for i in range(L):
            fi, fo = self.widths[i], self.widths[i + 1]
            layer = Layer(f"fc{i}", i, fi, fo, lo[i])
            w_end = layer.lo + fi * fo
            layer.W = self.params[layer.lo:w_end].reshape(fi, fo)
            layer.b = self.params[w_end:layer.hi]
            layer.dW = self.grads[layer.lo:w_end].reshape(fi, fo)
            layer.db = self.grads[w_end:layer.hi]
            self.layers.append(layer)

        self._cache = {}  # batch size -> (activation buffers, scratch, row indices)
        self.seed = None
        self.init(seed)

    # ------------------------------------------------------------------ setup

    def init(self, seed=0):
        """(Re)initialise the parameters from ``seed``; zero the gradients."""
        rng = np.random.default_rng(seed)
        host = np.zeros(self.n_params, dtype=np.float64)
        for layer in self.layers:
            fi, fo = layer.fan_in, layer.fan_out
            if self.activation == "relu":  # He normal
                w = rng.standard_normal((fi, fo)) * math.sqrt(2.0 / fi)
            else:  # Glorot uniform
                a = math.sqrt(6.0 / (fi + fo))
                w = rng.uniform(-a, a, size=(fi, fo))
            host[layer.lo:layer.lo + fi * fo] = w.ravel()
        self.params[...] = self.xp.asarray(host.astype(self.dtype))
        self.grads[...] = 0
        self.seed = seed

    def set_params(self, flat):
        """Copy a flat array (NumPy or this model's ``xp``) into ``params``; sizes must match."""
        if flat.size != self.n_params:
            raise ValueError(f"parameter vector has {flat.size} elements, model has {self.n_params}")
        self.params[...] = self.xp.asarray(flat, dtype=self.dtype).reshape(-1)

    def tensors(self):
        """``[(name, offset, shape), ...]`` in buffer order: each layer's W, then its b."""
        out = []
        for l in reversed(self.layers):
            out += [(f"{l.name}.W", l.lo, (l.fan_in, l.fan_out)), (f"{l.name}.b", l.lo + l.fan_in * l.fan_out,
                                                                     (l.fan_out,))]
        return out

    def layer_slices(self):
        """``[(name, lo, hi), ...]`` in buffer order (= the order backprop completes them)."""
        return [(l.name, l.lo, l.hi) for l in reversed(self.layers)]

    def config(self):
        """The constructor arguments that fix the shapes (for checkpoints)."""
        return {"features": self.features, "hidden": list(self.hidden), "classes": self.classes,
                "activation": self.activation, "dtype": self.dtype.name}

    def describe(self):
        """One line: ``MLP 64-128-10 relu, 9,610 params (float32, numpy)``."""
        widths = "-".join(str(w) for w in self.widths)
        return (f"MLP {widths} {self.activation}, {self.n_params:,} params "
                f"({self.dtype.name}, {self.xp.__name__})")

    # ---------------------------------------------------------------- compute

    def _buffers(self, batch):
        bufs = self._cache.get(batch)
        if bufs is None:
            if len(self._cache) >= self._MAX_CACHED_BATCH_SIZES:
                self._cache.pop(next(iter(self._cache)))
            xp = self.xp
            acts = [xp.empty((batch, w), dtype=self.dtype) for w in self.widths[1:]]
            scratch = xp.empty(batch * max(self.widths[1:-1], default=1), dtype=self.dtype)
            rows = xp.arange(batch)
            bufs = self._cache[batch] = (acts, scratch, rows)
        return bufs

    def _prepare(self, x, y=None):
        xp = self.xp
        x = xp.asarray(x, dtype=self.dtype)
        if x.ndim != 2 or x.shape[1] != self.features:
            raise ValueError(f"x must have shape (batch, {self.features}), got {tuple(x.shape)}")
        if y is not None:
            y = xp.asarray(y)
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            if y.dtype.kind not in "iu":
                y = y.astype(np.int64)
        return x, y

    def _forward(self, x, acts):
        """Logits into ``acts[-1]``; hidden activations (post-nonlinearity) into ``acts[:-1]``."""
        xp = self.xp
        a = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = acts[i]
            xp.matmul(a, layer.W, out=h)
            h += layer.b
            if i < last:
                if self.activation == "relu":
                    xp.maximum(h, 0, out=h)
                else:
                    xp.tanh(h, out=h)
            a = h
        return acts[-1]

    def _loss_terms(self, z, y, rows):
        """Turn logits ``z`` into softmax probabilities in place.

        Returns (sum of per-sample losses, number correct) as device scalars.
        """
        xp = self.xp
        correct = (z.argmax(axis=1) == y).sum()
        z -= z.max(axis=1, keepdims=True)
        picked = z[rows, y]                    # shifted logit of the true class
        xp.exp(z, out=z)
        s = z.sum(axis=1, keepdims=True)
        loss_sum = (xp.log(s[:, 0]) - picked).sum()
        z /= s
        return loss_sum, correct

    def loss_and_grad(self, batch, on_grad_ready=None):
        """Forward and backward on one batch ``(x, y)``; overwrite ``grads``.

        Returns ``(mean loss, number correct)``. With ``on_grad_ready``, calls
        ``on_grad_ready(hi)`` as soon as each layer's gradient is final, where
        ``grads[0:hi]`` is the finished prefix (increasing; the last call has
        ``hi == grads.size``). On a GPU the kernels may still be running when
        it is called: synchronize before handing the prefix to MPI.
        """
        xp = self.xp
        x, y = self._prepare(*batch)
        batch = x.shape[0]
        if batch == 0:
            raise ValueError("loss_and_grad needs a non-empty batch")
        acts, scratch, rows = self._buffers(batch)

        z = self._forward(x, acts)
        loss_sum, correct = self._loss_terms(z, y, rows)
        # dL/dz = (softmax - onehot) / batch, built in the logits buffer.
        z[rows, y] -= 1
        z *= 1.0 / batch

        delta = z
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            a_in = x if i == 0 else acts[i - 1]
            xp.matmul(a_in.T, delta, out=layer.dW)
            delta.sum(axis=0, out=layer.db)
            if on_grad_ready is not None:
                on_grad_ready(layer.hi)
            if i > 0:
                # delta_prev = (delta @ W.T) * act'(a_in), written over a_in
                # (no longer needed: dW of layer i-1 reads acts[i-2]).
                back = scratch[:batch * layer.fan_in].reshape(batch, layer.fan_in)
                xp.matmul(delta, layer.W.T, out=back)
                if self.activation == "relu":
                    xp.sign(a_in, out=a_in)          # relu outputs are >= 0: 1 where active
                else:
                    xp.multiply(a_in, a_in, out=a_in)
                    xp.subtract(1, a_in, out=a_in)   # tanh' = 1 - tanh^2
                a_in *= back
                delta = a_in

        return float(loss_sum) / batch, int(correct)

    def evaluate(self, batch, batch_size=1024):
        """``(sum of per-sample losses, number correct)`` over ``batch = (x, y)``; leaves ``grads`` alone.

        Sums, not means, so ranks can add their results up.
        """
        x, y = self._prepare(*batch)
        n = x.shape[0]
        loss_total, correct_total = 0.0, 0
        for start in range(0, n, max(1, int(batch_size))):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            acts, _, rows = self._buffers(xb.shape[0])
            z = self._forward(xb, acts)
            loss_sum, correct = self._loss_terms(z, yb, rows)
            loss_total += float(loss_sum)
            correct_total += int(correct)
        return loss_total, correct_total

    def forward(self, x):
        """Logits for ``x`` (a new array)."""
        x, _ = self._prepare(x)
        acts, _, _ = self._buffers(x.shape[0])
        return self._forward(x, acts).copy()

    def predict(self, x):
        """Predicted class per row of ``x``."""
        return self.forward(x).argmax(axis=1)
