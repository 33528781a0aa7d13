"""A message-passing graph network (MPNN) for graph classification, forward and backward by hand.

One batch is b graphs packed into one block-diagonal graph (data/spec.py, kind "graphs"):
x [N, F] node features, edges [E, 2] (sender s, receiver t), edge_attr [E, Fe], node_ptr [b+1], y [b].

    h0 = x
    round k = 0..K-1 (din = F for k = 0, else W):
      m_e   = act(h[s_e] M_k + ea_e Ew_k + bm_k)               message f along edge e = (s_e -> t_e)
      agg_v = sum over edges e with t_e = v of m_e              scatter-add (graphops.Segments)
      h'    = act(h U_k + agg V_k + c_k)  (+ h when residual and din = W)      update g
    r_g  = sum (or mean) of h_K over the nodes of graph g      readout
    z    = MLP head (widths [W, *hidden, classes]) of r;  loss = mean softmax cross-entropy over graphs

Backward runs the same path in reverse: d agg = d pre_u V^T, d m = d agg[t] (a gather), and the
sender terms use linearity, (h M)[s] forward and scatter-add over senders backward:
dM = h^T S, dh += S M^T with S_v = sum over edges e with s_e = v of d pre_m_e.

Flat buffers (Model interface), in the order backprop finishes them, so on_grad_ready prefixes grow::

    | head L-1 (W, b) | ... | head 0 | round K-1: U V c | M Ew bm | ... | round 0: U V c | M Ew bm |
      ready after each head layer, after each round's update block and after its message block

Cost per round (N nodes, E edges, width W): forward 2N(din + W)W + 2NdinW flops for the matmuls,
one gather and one scatter of E x W values; backward about twice that. Initial values are drawn on
the host from the seed (He-normal for relu, Glorot-uniform for tanh, zero biases).
"""

from __future__ import annotations

import math

import numpy as np

from .base import Model, grads_buffer, params_buffer
from .graphops import Segments, graph_of_node

READOUTS = ("sum", "mean")
ACTIVATIONS = ("relu", "tanh")


class MPNN(Model):
    kind = "mpnn"
    consumes = ("graphs",)
    options_keys = ("width", "rounds", "readout", "residual", "hidden", "activation")

    @classmethod
    def from_spec(cls, spec, options, *, xp=np, seed=0, dtype=np.float32):
        return cls(spec.features, spec.edge_features, spec.classes, width=options["width"],
                   rounds=options["rounds"], readout=options["readout"], residual=options["residual"],
                   hidden=options["hidden"], activation=options["activation"], xp=xp, seed=seed, dtype=dtype)

    def __init__(self, features, edge_features=0, classes=2, *, width=32, rounds=2, readout="sum",
                 residual=False, hidden=(), activation="relu", xp=np, dtype=np.float32, seed=0):
        self.features, self.edge_features, self.classes = int(features), int(edge_features), int(classes)
        self.width, self.rounds, self.readout = int(width), int(rounds), readout
        self.residual, self.activation = bool(residual), activation
        self.hidden = [int(h) for h in (hidden or [])]
        if self.features < 1 or self.edge_features < 0 or self.classes < 2:
            raise ValueError(f"features >= 1, edge_features >= 0, classes >= 2 needed, got "
                             f"{self.features}, {self.edge_features}, {self.classes}")
        if self.width < 1 or self.rounds < 1 or any(h < 1 for h in self.hidden):
            raise ValueError(f"width, rounds and hidden widths must be >= 1, got {width}, {rounds}, {hidden}")
        if readout not in READOUTS or activation not in ACTIVATIONS:
            raise ValueError(f"readout must be one of {READOUTS}, activation one of {ACTIVATIONS}; got "
                             f"{readout!r}, {activation!r}")
        self.xp, self.dtype = xp, np.dtype(dtype)
        self.head_widths = [self.width, *self.hidden, self.classes]
        self._layout = self._make_layout()
        n = sum(math.prod(s) for _, s in self._layout)
        self.params, self.grads = params_buffer(xp, n, self.dtype), grads_buffer(xp, n, self.dtype)
        self.p, self.g, self._offsets, off = {}, {}, {}, 0
        for name, shape in self._layout:
            size = math.prod(shape)
            self.p[name] = self.params[off:off + size].reshape(shape)
            self.g[name] = self.grads[off:off + size].reshape(shape)
            self._offsets[name] = off
            off += size
        self.init(seed)

    def _round_in(self, k):
        return self.features if k == 0 else self.width

    def _make_layout(self):
        W, out = self.width, []
        for i in reversed(range(len(self.head_widths) - 1)):
            out += [(f"head{i}.W", (self.head_widths[i], self.head_widths[i + 1])),
                    (f"head{i}.b", (self.head_widths[i + 1],))]
        for k in reversed(range(self.rounds)):
            din = self._round_in(k)
            out += [(f"round{k}.U", (din, W)), (f"round{k}.V", (W, W)), (f"round{k}.c", (W,)),
                    (f"round{k}.M", (din, W))]
            if self.edge_features:
                out.append((f"round{k}.Ew", (self.edge_features, W)))
            out.append((f"round{k}.bm", (W,)))
        return out

    def init(self, seed=0):
        """(Re)initialise from ``seed`` on the host (tensors in forward order); zero the gradients."""
        rng = np.random.default_rng(seed)
        host = np.zeros(self.params.size, dtype=np.float64)
        for name, shape in sorted(self._layout, key=lambda t: _forward_rank(t[0])):
            if len(shape) == 2:
                fi, fo = shape
                if self.activation == "relu":
                    w = rng.standard_normal(shape) * math.sqrt(2.0 / fi)
                else:
                    a = math.sqrt(6.0 / (fi + fo))
                    w = rng.uniform(-a, a, size=shape)
                host[self._offsets[name]:self._offsets[name] + w.size] = w.ravel()
        self.params[...] = self.xp.asarray(host.astype(self.dtype))
        self.grads[...] = 0
        self.seed = seed

    def tensors(self):
        return [(name, self._offsets[name], shape) for name, shape in self._layout]

    def config(self):
        """The constructor arguments that fix the shapes and meaning of the parameters (for checkpoints)."""
        return {"features": self.features, "edge_features": self.edge_features, "classes": self.classes,
                "width": self.width, "rounds": self.rounds, "readout": self.readout, "residual": self.residual,
                "hidden": list(self.hidden), "activation": self.activation, "dtype": self.dtype.name}

    def block_end(self, name):
        """The end offset of tensor ``name`` in the flat buffers."""
        return self._offsets[name] + math.prod(self.p[name].shape)

    def describe(self):
        e = f" + {self.edge_features} edge features" if self.edge_features else ""
        head = "-".join(str(w) for w in self.head_widths)
        return (f"MPNN {self.features}{e} -> {self.rounds} rounds x {self.width} ({self.activation}"
                f"{', residual' if self.residual else ''}), {self.readout} readout, head {head}, "
                f"{self.n_params:,} params ({self.dtype.name}, {self.xp.__name__})")

    # ---------------------------------------------------------------- compute
    def _act(self, a):
        xp = self.xp
        return xp.maximum(a, 0, out=a) if self.activation == "relu" else xp.tanh(a, out=a)

    def _dact(self, out, grad):
        """grad * act'(pre) from the activation's output ``out`` (in place in ``grad``)."""
        if self.activation == "relu":
            grad *= out > 0
        else:
            grad *= 1 - out * out
        return grad

    def _prepare(self, batch):
        xp = self.xp
        if len(batch) != 5:
            raise ValueError("an MPNN batch is (x, edges, edge_attr, node_ptr, y) (data/spec.py, kind graphs)")
        x, edges, ea, ptr, y = batch
        x = xp.asarray(x, dtype=self.dtype)
        if x.ndim != 2 or x.shape[1] != self.features:
            raise ValueError(f"x must have shape (nodes, {self.features}), got {tuple(x.shape)}")
        edges = xp.asarray(edges).reshape(-1, 2).astype(xp.int64)
        ea = xp.asarray(ea, dtype=self.dtype)
        if ea.ndim != 2 or ea.shape[0] != len(edges) or ea.shape[1] != self.edge_features:
            raise ValueError(f"edge_attr must have shape ({len(edges)}, {self.edge_features}), got {ea.shape}")
        ptr, y = xp.asarray(ptr).astype(xp.int64), xp.asarray(y).astype(xp.int64)
        N = x.shape[0]
        plan = {"src": edges[:, 0], "dst": edges[:, 1], "ea": ea, "N": N, "G": len(y),
                "to_dst": Segments(edges[:, 1], N, xp), "to_src": Segments(edges[:, 0], N, xp),
                "node_graph": graph_of_node(ptr, N, xp), "sizes": (ptr[1:] - ptr[:-1]).astype(self.dtype)}
        plan["to_graph"] = Segments(plan["node_graph"], len(y), xp)
        return x, y, plan

    def _forward(self, x, plan):
        """Logits and what backward needs (per round: h, agg, m, a; head activations)."""
        p, keep, h = self.p, [], x
        for k in range(self.rounds):
            pre_m = (h @ p[f"round{k}.M"])[plan["src"]]
            if self.edge_features:
                pre_m += plan["ea"] @ p[f"round{k}.Ew"]
            pre_m += p[f"round{k}.bm"]
            m = self._act(pre_m)
            agg = plan["to_dst"].sum(m)
            a = h @ p[f"round{k}.U"]
            a += agg @ p[f"round{k}.V"]
            a += p[f"round{k}.c"]
            a = self._act(a)
            keep.append((h, agg, m, a))
            h = a + h if self.residual and h.shape[1] == self.width else a
        r = plan["to_graph"].sum(h)
        if self.readout == "mean":
            r /= plan["sizes"][:, None]
        acts, last = [r], len(self.head_widths) - 2
        for i in range(last + 1):
            z = acts[-1] @ p[f"head{i}.W"]
            z += p[f"head{i}.b"]
            acts.append(self._act(z) if i < last else z)
        return acts, keep

    def _loss(self, z, y):
        """(loss sum, correct, softmax probabilities) of logits ``z``."""
        xp = self.xp
        correct = int((z.argmax(axis=1) == y).sum())
        z = z - z.max(axis=1, keepdims=True)
        rows = xp.arange(len(y))
        picked = z[rows, y]
        e = xp.exp(z)
        s = e.sum(axis=1, keepdims=True)
        return float((xp.log(s[:, 0]) - picked).sum()), correct, e / s

    def loss_and_grad(self, batch, on_grad_ready=None):
        """Forward and backward on one packed batch; overwrite ``grads``; ``(mean loss, correct)``."""
        x, y, plan = self._prepare(batch)
        G = len(y)
        if G == 0:
            raise ValueError("loss_and_grad needs a non-empty batch")
        acts, keep = self._forward(x, plan)
        loss, correct, prob = self._loss(acts[-1], y)
        prob[self.xp.arange(G), y] -= 1
        prob *= 1.0 / G
        dr = self._backward_head(acts, prob, on_grad_ready)
        if self.readout == "mean":
            dr = dr / plan["sizes"][:, None]
        self._backward_rounds(keep, dr[plan["node_graph"]], plan, on_grad_ready)
        return loss / G, correct

    def _backward_head(self, acts, delta, ready):
        p, g = self.p, self.g
        for i in reversed(range(len(self.head_widths) - 1)):
            self.xp.matmul(acts[i].T, delta, out=g[f"head{i}.W"])
            delta.sum(axis=0, out=g[f"head{i}.b"])
            if ready is not None:
                ready(self.block_end(f"head{i}.b"))
            delta = delta @ p[f"head{i}.W"].T
            if i > 0:
                delta = self._dact(acts[i], delta)
        return delta

    def _backward_rounds(self, keep, dh, plan, ready):
        xp, p, g = self.xp, self.p, self.g
        for k in reversed(range(self.rounds)):
            h, agg, m, a = keep[k]
            du = self._dact(a, dh.copy() if self.residual else dh)
            xp.matmul(h.T, du, out=g[f"round{k}.U"])
            xp.matmul(agg.T, du, out=g[f"round{k}.V"])
            du.sum(axis=0, out=g[f"round{k}.c"])
            if ready is not None:
                ready(self.block_end(f"round{k}.c"))
            dm = self._dact(m, (du @ p[f"round{k}.V"].T)[plan["dst"]])
            dm.sum(axis=0, out=g[f"round{k}.bm"])
            if self.edge_features:
                xp.matmul(plan["ea"].T, dm, out=g[f"round{k}.Ew"])
            S = plan["to_src"].sum(dm)
            xp.matmul(h.T, S, out=g[f"round{k}.M"])
            if ready is not None:
                ready(self.block_end(f"round{k}.bm"))
            if k > 0:
                back = du @ p[f"round{k}.U"].T
                back += S @ p[f"round{k}.M"].T
                if self.residual and h.shape[1] == self.width:
                    back += dh
                dh = back

    def evaluate(self, batch):
        """``(loss sum, correct)`` over the graphs of ``batch``; leaves ``grads`` alone."""
        x, y, plan = self._prepare(batch)
        if len(y) == 0:
            return 0.0, 0
        acts, _ = self._forward(x, plan)
        loss, correct, _ = self._loss(acts[-1], y)
        return loss, correct

    def forward(self, batch):
        """Logits [graphs, classes] (a new array)."""
        x, _, plan = self._prepare(batch)
        return self._forward(x, plan)[0][-1].copy()


def _forward_rank(name: str):
    """Initialisation order: round 0 .. K-1 (U V M Ew), then head 0 .. L-1."""
    part, t = name.split(".")
    if part.startswith("round"):
        return (0, int(part[5:]), "UVMEw".find(t[0]))
    return (1, int(part[4:]), 0)
