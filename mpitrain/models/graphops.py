"""Gather/scatter for message passing: sums of rows grouped by an index, on NumPy or CuPy.

    values [E, W]   idx [E] (receiver of each edge)          out [N, W]
    e0 -> 2         out[t] = sum of values[e] over the edges e with idx[e] = t
    e1 -> 0
    e2 -> 2         NumPy "bincount" (default): one np.bincount(idx, weights=values[:, j], minlength=N) per
                      column j -- no sort, accumulates in float64, then stored in out's dtype
                    NumPy "reduceat": order = stable argsort(idx) (skipped when idx is sorted, as the reader
                      yields receivers), runs of equal idx found once per batch,
                      out[targets] = np.add.reduceat(values[order], run starts, axis=0)
                    CuPy:  cupyx.scatter_add(out, idx, values)  (atomic adds on the device)

``Segments(idx, n, xp)`` is the plan (made once per batch, used in every round, forward and
backward); ``sum(values)`` applies it. Cost: one pass over the E x W values. Measured (CPU time,
benchmarks/graphs.py kernel, docs/graphs.md): per-column bincount ~215 ns per edge of 32 values from 2k to
15k edges, ~620 ns at 120k; reduceat 250 -> 1170 ns (it degrades as E grows, and more when unsorted);
``np.add.at`` 550-790 ns: 1.0-3.2x slower than bincount.
"""

from __future__ import annotations

import numpy as np


class Segments:
    """Sums of rows of ``values`` grouped by ``idx`` (length E, targets in [0, n))."""

    def __init__(self, idx, n: int, xp=np, method: str = "bincount"):
        self.xp, self.n = xp, int(n)
        self.idx = idx
        self.method = method if xp is np else "scatter_add"
        if self.method == "reduceat":
            idx = np.asarray(idx)
            if idx.size and (idx[1:] < idx[:-1]).any():
                self.order = np.argsort(idx, kind="stable")
                idx = idx[self.order]
            else:
                self.order = None
            if idx.size:
                self.starts = np.flatnonzero(np.concatenate([[True], idx[1:] != idx[:-1]]))
                self.targets = idx[self.starts]
            else:
                self.starts = self.targets = np.empty(0, dtype=np.int64)

    def sum(self, values, out=None):
        """``out[t] = sum(values[e] for e with idx[e] == t)`` (a new zeroed array unless ``out``)."""
        xp = self.xp
        if out is None:
            out = xp.zeros((self.n,) + tuple(values.shape[1:]), dtype=values.dtype)
        else:
            out[...] = 0
        if values.shape[0] == 0:
            return out
        if self.method == "reduceat":
            v = values if self.order is None else values[self.order]
            out[self.targets] = np.add.reduceat(v, self.starts, axis=0)
        elif self.method == "bincount":
            flat = out.reshape(self.n, -1)
            cols = values.reshape(len(values), -1)
            for j in range(cols.shape[1]):
                flat[:, j] = np.bincount(self.idx, weights=cols[:, j], minlength=self.n)
        else:
            import cupyx

            cupyx.scatter_add(out, self.idx, values)
        return out


def graph_of_node(node_ptr, n_nodes: int, xp=np):
    """The graph index of every node: node_ptr[g] <= v < node_ptr[g+1] -> g."""
    return xp.searchsorted(node_ptr[1:], xp.arange(n_nodes), side="right")


def add_at_sum(values, idx, n: int):
    """The reference: the same sum with ``np.add.at`` (for tests and the kernel benchmark)."""
    out = np.zeros((n,) + values.shape[1:], dtype=values.dtype)
    np.add.at(out, idx, values)
    return out
