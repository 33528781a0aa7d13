"""mpitrain's GPT as a PyTorch nn.Module, for benchmarks/ddp_gpt.py (torch is not a dependency).

    TorchGPT(ours)   parameters = copies of ``ours.params`` (models/gpt.py), one nn.Parameter per
                     tensor of ``ours.tensors()``, the same names; forward(x, y) -> mean cross-entropy

The network is the one tests/test_gpt.py checks against ours (pre-LayerNorm blocks, tanh GELU,
tied or untied head), written as nanoGPT writes it: F.scaled_dot_product_attention(is_causal=True).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TorchGPT(nn.Module):
    def __init__(self, ours):
        super().__init__()
        self.n_layer, self.n_head, self.C, self.tie = ours.n_layer, ours.n_head, ours.n_embd, ours.tie
        self._names = {}
        self.w = nn.ParameterDict()
        for name, o, s in ours.tensors():
            key = name.replace(".", "_")
            self._names[name] = key
            self.w[key] = nn.Parameter(torch.tensor(ours.params[o:o + math.prod(s)].reshape(s).copy()))
        self._decay = {self._names[n] for n, _, s in ours.tensors() if len(s) == 2 and n not in ("wte", "wpe")}

    def groups(self):
        """(decayed, not decayed) parameters: AdamW decays only the 2-D linear weights, as ours."""
        dec = [p for k, p in self.w.items() if k in self._decay]
        return dec, [p for k, p in self.w.items() if k not in self._decay]

    def forward(self, x, y):
        P = lambda n: self.w[self._names[n]]  # noqa: E731
        B, T = x.shape
        C, nh = self.C, self.n_head
        h = P("wte")[x] + P("wpe")[:T]
        for i in range(self.n_layer):
            a = F.layer_norm(h, (C,), P(f"h{i}.ln1.w"), P(f"h{i}.ln1.b"), eps=1e-5)
            q, k, v = (a @ P(f"h{i}.attn_qkv.w") + P(f"h{i}.attn_qkv.b")).split(C, dim=-1)
            q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + att.transpose(1, 2).reshape(B, T, C) @ P(f"h{i}.attn_proj.w") + P(f"h{i}.attn_proj.b")
            a = F.layer_norm(h, (C,), P(f"h{i}.ln2.w"), P(f"h{i}.ln2.b"), eps=1e-5)
            m = F.gelu(a @ P(f"h{i}.mlp_fc.w") + P(f"h{i}.mlp_fc.b"), approximate="tanh")
            h = h + m @ P(f"h{i}.mlp_proj.w") + P(f"h{i}.mlp_proj.b")
        h = F.layer_norm(h, (C,), P("lnf.w"), P("lnf.b"), eps=1e-5)
        logits = h @ (P("wte") if self.tie else P("lm_head")).T
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
