"""GPT: gradients against finite differences and a PyTorch reference, buffer layout, init,
token data (import, pycode, reader), training options, generation."""

import math

import numpy as np
import pytest

from mpitrain.models import GPT

TINY = dict(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=11)


def _tiny(tie=True, seed=3):
    m = GPT(**TINY, tie_embeddings=tie, dtype=np.float64, seed=seed)
    m.params += np.random.default_rng(7).normal(0, 0.05, m.params.size)  # non-trivial LN, biases
    return m


def _tokens(B=3, T=6, V=11, seed=0):
    return np.random.default_rng(seed).integers(0, V, size=(B, T + 1))


def _loss(m, tok):
    s, _ = m.evaluate((tok,))
    return s / (tok.shape[0] * (tok.shape[1] - 1))


# ------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("tie", [True, False])
def test_every_tensor_gradient_matches_finite_differences(tie):
    """Per tensor: a random direction over all its entries, and its largest entries one by one."""
    m, tok, h = _tiny(tie), _tokens(), 1e-5
    loss, _ = m.loss_and_grad((tok,))
    assert loss == pytest.approx(_loss(m, tok), rel=1e-12)
    ana = m.grads.copy()
    rng = np.random.default_rng(1)
    p = m.params
    for name, off, shape in m.tensors():
        n = math.prod(shape)
        sl = slice(off, off + n)
        d = rng.standard_normal(n)
        old = p[sl].copy()
        p[sl] = old + h * d
        fp = _loss(m, tok)
        p[sl] = old - h * d
        fm = _loss(m, tok)
        p[sl] = old
        num = (fp - fm) / (2 * h)
        got = float(ana[sl] @ d)
        assert abs(got - num) <= 1e-6 * max(abs(num), 1e-3), (name, got, num)
        for k in np.argsort(-np.abs(ana[sl]))[:3] + off:
            o = p[k]
            p[k] = o + h
            fp = _loss(m, tok)
            p[k] = o - h
            fm = _loss(m, tok)
            p[k] = o
            num = (fp - fm) / (2 * h)
            assert abs(ana[k] - num) <= 1e-6 * max(abs(num), 1e-3), (name, k, ana[k], num)


def test_short_sequences_and_split_batches():
    """T < block_size: unused position rows get zero gradient; (x, y) equals the window form."""
    m, tok = _tiny(), _tokens(B=2, T=4)
    m.grads[...] = 7.0
    loss, correct = m.loss_and_grad((tok,))
    wpe = m.g["wpe"]
    assert np.all(wpe[4:] == 0) and np.abs(wpe[:4]).max() > 0
    g1 = m.grads.copy()
    loss2, correct2 = m.loss_and_grad((tok[:, :-1], tok[:, 1:]))
    assert (loss2, correct2) == (loss, correct) and np.array_equal(m.grads, g1)
    assert m.count((tok,)) == 8 == m.count((tok[:, :-1], tok[:, 1:]))
    s, c = m.evaluate((tok,), batch_size=1)
    assert s / 8 == pytest.approx(loss, rel=1e-12) and c == correct
    with pytest.raises(ValueError, match="block_size"):
        m.loss_and_grad((_tokens(T=7),))


def test_grad_ready_prefixes_and_layout():
    m, seen = _tiny(), []
    m.loss_and_grad((_tokens(),), on_grad_ready=seen.append)
    assert seen == sorted(seen) and seen[-1] == m.n_params and len(seen) == TINY["n_layer"] + 2
    names = [t[0] for t in m.tensors()]
    assert names[0] == "lnf.w" and names[-2:] == ["wpe", "wte"] and names[2].startswith("h1.")
    lo = 0
    for name, off, shape in m.tensors():   # the tensors tile the buffer in order
        assert off == lo
        lo += math.prod(shape)
    assert lo == m.n_params
    # a hook sees the prefix already final: compare with the grads at the end
    snap = []
    m.loss_and_grad((_tokens(),), on_grad_ready=lambda hi: snap.append((hi, m.grads[:hi].copy())))
    for hi, g in snap:
        assert np.array_equal(g, m.grads[:hi])


def test_init_is_gpt2_style_and_seeded():
    m = GPT(n_layer=4, n_head=2, n_embd=32, block_size=16, vocab_size=64, seed=5)
    assert m.p["wte"].std() == pytest.approx(0.02, rel=0.1)
    assert m.p["h0.attn_proj.w"].std() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert m.p["h3.mlp_proj.w"].std() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert np.all(m.p["h1.ln1.w"] == 1) and np.all(m.p["h1.attn_qkv.b"] == 0)
    again = GPT(n_layer=4, n_head=2, n_embd=32, block_size=16, vocab_size=64, seed=5)
    assert np.array_equal(m.params, again.params)
    assert m.params.dtype == np.float32
    decayed = {n for n, o, s in m.tensors() if any(lo == o for lo, _ in m.decay_segments())}
    assert "h0.mlp_fc.w" in decayed and not decayed & {"wte", "wpe", "lnf.w", "h0.ln1.b", "h0.mlp_fc.b"}


def test_untrained_loss_is_log_vocab():
    m = GPT(**TINY, seed=0)
    loss, _ = m.loss_and_grad((_tokens(),))
    assert loss == pytest.approx(math.log(11), rel=0.05)


# ------------------------------------------------------------------------------ PyTorch reference

def _torch_loss(torch, m, tok):
    """The same network in PyTorch, from the same flat parameters (float64, autograd)."""
    F = torch.nn.functional
    flat = torch.tensor(m.params, dtype=torch.float64, requires_grad=True)
    P = {n: flat[o:o + math.prod(s)].view(*s) for n, o, s in m.tensors()}
    x, y = torch.tensor(tok[:, :-1]), torch.tensor(tok[:, 1:])
    B, T = x.shape
    C, nh = m.n_embd, m.n_head
    h = P["wte"][x] + P["wpe"][:T]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(m.n_layer):
        q = lambda t: P[f"h{i}.{t}"]  # noqa: E731
        a = F.layer_norm(h, (C,), q("ln1.w"), q("ln1.b"), eps=1e-5)
        qq, kk, vv = (a @ q("attn_qkv.w") + q("attn_qkv.b")).split(C, dim=-1)
        qq, kk, vv = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (qq, kk, vv))
        att = (qq @ kk.transpose(-2, -1)) / math.sqrt(C // nh)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        yy = (att @ vv).transpose(1, 2).reshape(B, T, C)
        h = h + yy @ q("attn_proj.w") + q("attn_proj.b")
        a = F.layer_norm(h, (C,), q("ln2.w"), q("ln2.b"), eps=1e-5)
        h = h + F.gelu(a @ q("mlp_fc.w") + q("mlp_fc.b"), approximate="tanh") @ q("mlp_proj.w") + q("mlp_proj.b")
    h = F.layer_norm(h, (C,), P["lnf.w"], P["lnf.b"], eps=1e-5)
    logits = h @ (P["wte"] if m.tie else P["lm_head"]).T
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    return float(loss), flat.grad.numpy()


@pytest.mark.parametrize("tie", [True, False])
def test_matches_pytorch_reference(tie):
    torch = pytest.importorskip("torch")
    m, tok = _tiny(tie), _tokens()
    loss, _ = m.loss_and_grad((tok,))
    ref_loss, ref_grad = _torch_loss(torch, m, tok)
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    for name, off, shape in m.tensors():
        sl = slice(off, off + math.prod(shape))
        err = np.abs(m.grads[sl] - ref_grad[sl]).max() / max(np.abs(ref_grad[sl]).max(), 1e-12)
        assert err < 1e-6, (name, err)
