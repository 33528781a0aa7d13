"""Gradient accumulation in one canonical order, the same for every layout.

    micro-batches 0 .. A-1, in order:   acc = g_0;  acc += g_1; ... ; acc += g_(A-2)
    the last one (A-1):                 grads = g_(A-1) + acc            (per finished range)
    parts kept apart (a tied wte's head part h_k, models.gpt):
                                        grads[wte] += h_0 + h_1 + ... + h_(A-1)
    then                                grads *= 1/A

The parts kept apart are what makes a pipeline equal a single rank bit for bit: its first stage
holds only the embedding part of wte's gradient, its last stage only the head part; each sums its
own over the micro-batches, and they are added once. A single rank does the same additions in the
same order. (Floating-point addition of two values is commutative, so ``a + b`` on one stage and
``b + a`` on the other agree; longer sums are kept in one order.)
"""

from __future__ import annotations


class Accumulator:
    """Sums the gradients of ``A`` micro-batches of ``model`` into ``model.grads`` (see the docstring)."""

    def __init__(self, model, A: int):
        self.model, self.A = model, int(A)
        self.apart = model.grads_apart() if hasattr(model, "grads_apart") else []
        self._acc = None
        self._acc_apart = None
        self.k = 0

    def kwargs(self) -> dict:
        """What the model's ``loss_and_grad`` needs to keep its apart parts apart."""
        return {"keep_apart": True} if self.apart else {}

    def add(self) -> None:
        """A micro-batch's gradient (in ``model.grads``, apart parts in theirs) is final: take it in."""
        last = self.k == self.A - 1
        if not last:
            g = self.model.grads
            if self.k == 0:
                if self._acc is None:
                    self._acc = self.model.xp.empty_like(g)
                self._acc[...] = g
            else:
                self._acc += g
        parts = [a for _, _, a in self.apart]
        if self.k == 0:
            self._acc_apart = [p.copy() for p in parts] if self.A > 1 else parts
        else:
            for s, p in zip(self._acc_apart, parts):
                s += p
        self.k += 1

    def finish(self, lo: int, hi: int, scale: bool = True) -> None:
        """The last micro-batch's ``grads[lo:hi]`` is final: add the sums, then (``scale``) times 1/A."""
        g = self.model.grads
        if self.A > 1 and hi > lo:
            g[lo:hi] += self._acc[lo:hi]
        if self.k < self.A and any(lo <= a and b <= hi for a, b, _ in self.apart):
            self.add()  # the last micro-batch's apart parts (backprop is still running: take them now)
        for (a, b, _), s in zip(self.apart, self._acc_apart or []):
            if lo <= a and b <= hi:
                g[a:b] += s
            elif a < hi and b > lo:
                raise ValueError(f"a gradient kept apart [{a}, {b}) straddles the finished range [{lo}, {hi})")
        if scale:
            self.scale(lo, hi)

    def scale(self, lo: int, hi: int) -> None:
        if self.A > 1 and hi > lo:
            self.model.grads[lo:hi] *= 1.0 / self.A

    def reset(self) -> None:
        self.k = 0
        self._acc_apart = None
