"""Gather/scatter for message passing: sums of rows grouped by an index, on NumPy or CuPy.

    values [E, W]   idx [E] (receiver of each edge)          out [N, W]
    e0 -> 2         NumPy: order = stable argsort(idx)        out[t] = sum of values[e] with idx[e] = t
    e1 -> 0                (skipped when idx is sorted),
    e2 -> 2                runs of equal idx found once per batch,
                           out[targets] = np.add.reduceat(values[order], run starts)
                    CuPy:  cupyx.scatter_add(out, idx, values)  (atomic adds on the device)

``Segments(idx, n, xp)`` is the plan (made once per batch, used in every round, forward and
backward); ``sum(values)`` applies it. Cost: one pass over the E x W values (plus a gather of them
when idx is not sorted); the plan costs a sort only when the edges are not sorted by receiver
(graph shards store them sorted, and packing keeps them so). ``np.add.at`` does the same sum
unbuffered and is several times slower (docs/graphs.md has the numbers).
"""

from __future__ import annotations

import numpy as np


class Segments:
    """Sums of rows of ``values`` grouped by ``idx`` (length E, targets in [0, n))."""

    def __init__(self, idx, n: int, xp=np):
        self.xp, self.n = xp, int(n)
        self.idx = idx
        if xp is np:
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
        if xp is np:
            v = values if self.order is None else values[self.order]
            out[self.targets] = np.add.reduceat(v, self.starts, axis=0)
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
