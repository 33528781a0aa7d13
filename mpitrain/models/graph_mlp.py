"""The baseline for graph data: an MLP on each graph's mean node features (``model.kind = "graph-mlp"``).

    graph g: nodes node_ptr[g]:node_ptr[g+1] --mean over its nodes--> x_g [F] --MLP--> logits [classes]

It sees what a graph's nodes are, never how they are connected: on the synthetic graph set
(data/graph_make.py) that is exactly what the label does not depend on, so it stays near chance
while the MPNN (mpnn.py) learns the task. Everything else is the MLP's (mlp.py): the same flat
buffers, layout, initialisation and backward; only the batch is pooled first.

Cost: one segment sum of the N x F node features per batch (graphops.Segments), then the MLP's.
"""

from __future__ import annotations

import numpy as np

from .graphops import Segments, graph_of_node
from .mlp import MLP


class GraphMLP(MLP):
    kind = "graph-mlp"
    consumes = ("graphs",)
    options_keys = ("hidden", "activation")

    @classmethod
    def from_spec(cls, spec, options, *, xp=np, seed=0, dtype=np.float32):
        return cls(spec.features, options["hidden"], spec.classes, options["activation"], xp=xp, dtype=dtype,
                   seed=seed)

    def pool(self, batch):
        """``(mean node features [graphs, F], y)`` of a packed graph batch (data/spec.py)."""
        xp = self.xp
        x, _edges, _ea, ptr, y = batch
        x = xp.asarray(x, dtype=self.dtype)
        ptr = xp.asarray(ptr).astype(xp.int64)
        sums = Segments(graph_of_node(ptr, x.shape[0], xp), len(y), xp).sum(x)
        return sums / (ptr[1:] - ptr[:-1]).astype(self.dtype)[:, None], y

    def loss_and_grad(self, batch, on_grad_ready=None):
        return super().loss_and_grad(self.pool(batch), on_grad_ready)

    def evaluate(self, batch, batch_size=1024):
        return super().evaluate(self.pool(batch), batch_size)

    def describe(self):
        return "graph-mlp (mean node features) " + super().describe()
