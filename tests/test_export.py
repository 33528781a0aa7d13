"""export: a GPT checkpoint -> model.safetensors (GPT-2 names) + config.json, read back with the
safetensors NumPy API and run by a NumPy GPT-2 forward written from GPT-2's definition (not ours)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from mpitrain import checkpoint
from mpitrain.models import GPT

st_numpy = pytest.importorskip("safetensors.numpy")

TINY = dict(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=256)


def _checkpoint(tmp_path, tie=True):
    m = GPT(**TINY, tie_embeddings=tie, dtype=np.float32, seed=3)
    m.params += np.random.default_rng(7).normal(0, 0.1, m.params.size).astype(np.float32)  # LN, biases != 0/1
    path = checkpoint.save(tmp_path / "ck", params=m.params, optimizer={}, step=5, epoch=0, step_in_epoch=5,
                           config={"model": {"kind": "gpt"}}, ranks=1,
                           extra={"model_config": {"kind": "gpt", **m.config()}})
    return m, path


def _export(ck_path, out):
    r = subprocess.run([sys.executable, "-m", "mpitrain", "export", str(ck_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return r


# --------------------------------------------------------------- GPT-2, from its definition

def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def gpt2_logits(sd, cfg, ids):
    """GPT2LMHeadModel's forward (eval mode) in float64 from its state dict; ids (B, T) -> (B, T, V)."""
    assert cfg["activation_function"] == "gelu_new"
    f = {k: v.astype(np.float64) for k, v in sd.items()}
    eps, nh, C = cfg["layer_norm_epsilon"], cfg["n_head"], cfg["n_embd"]
    B, T = ids.shape
    hs = C // nh
    h = f["transformer.wte.weight"][ids] + f["transformer.wpe.weight"][np.arange(T)]
    causal = np.tril(np.ones((T, T), dtype=bool))
    for i in range(cfg["n_layer"]):
        p = lambda n: f[f"transformer.h.{i}.{n}"]  # noqa: E731
        a = _ln(h, p("ln_1.weight"), p("ln_1.bias"), eps)
        qkv = a @ p("attn.c_attn.weight") + p("attn.c_attn.bias")          # Conv1D: x @ W + b, W (in, out)
        q, k, v = (t.reshape(B, T, nh, hs).transpose(0, 2, 1, 3) for t in np.split(qkv, 3, axis=-1))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)
        s = np.where(causal, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        y = (w / w.sum(-1, keepdims=True)) @ v
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
        h = h + y @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        m = _ln(h, p("ln_2.weight"), p("ln_2.bias"), eps)
        h = h + _gelu_new(m @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias")) @ p("mlp.c_proj.weight") \
            + p("mlp.c_proj.bias")
    h = _ln(h, f["transformer.ln_f.weight"], f["transformer.ln_f.bias"], eps)
    return h @ f["lm_head.weight"].T


def _xent(logits, targets):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, targets[..., None], -1).mean())


def _read(out):
    return st_numpy.load_file(str(out / "model.safetensors")), json.loads((out / "config.json").read_text())


# --------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("tie", [True, False])
def test_export_reloads_as_gpt2_with_the_same_loss(tmp_path, tie):
    m, ck = _checkpoint(tmp_path, tie)
    r = _export(ck, tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    assert "model.safetensors" in r.stdout
    sd, cfg = _read(tmp_path / "hf")
    C, L = TINY["n_embd"], TINY["n_layer"]
    assert (cfg["model_type"], cfg["architectures"]) == ("gpt2", ["GPT2LMHeadModel"])
    assert (cfg["n_embd"], cfg["n_head"], cfg["n_layer"], cfg["n_positions"], cfg["vocab_size"]) == \
        (C, TINY["n_head"], L, TINY["block_size"], 256)
    assert cfg["tie_word_embeddings"] is tie and cfg["layer_norm_epsilon"] == 1e-5
    assert len(sd) == 4 + 12 * L + 1  # wte wpe ln_f.{weight,bias}, 12 per block, lm_head
    assert sd["transformer.h.1.attn.c_attn.weight"].shape == (C, 3 * C)
    assert sd["transformer.h.0.mlp.c_proj.weight"].shape == (4 * C, C)
    assert all(a.dtype == np.float32 for a in sd.values())
    assert np.array_equal(sd["lm_head.weight"], sd["transformer.wte.weight"]) is tie
    tok = np.random.default_rng(1).integers(0, 256, size=(3, TINY["block_size"] + 1))
    ref = gpt2_logits(sd, cfg, tok[:, :-1])
    ours, _ = m.loss_and_grad((tok,))
    assert _xent(ref, tok[:, 1:]) == pytest.approx(ours, rel=1e-5)
    np.testing.assert_allclose(ref, m.logits(tok[:, :-1]), rtol=1e-4, atol=1e-5)


def test_export_logits_match_a_torch_gpt2(tmp_path):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    m, ck = _checkpoint(tmp_path, tie=True)
    assert _export(ck, tmp_path / "hf").returncode == 0
    sd, cfg = _read(tmp_path / "hf")
    ids = torch.tensor(np.random.default_rng(2).integers(0, 256, size=(2, TINY["block_size"])))
    try:
        from transformers import GPT2LMHeadModel  # the real thing, where it is installed

        got = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()(ids).logits.detach().numpy()
    except ImportError:  # else torch's own kernels on the same names
        got = _torch_gpt2(torch, F, {k: torch.tensor(v) for k, v in sd.items()}, cfg, ids).numpy()
    np.testing.assert_allclose(got, m.logits(ids.numpy()), rtol=1e-4, atol=1e-5)


def _torch_gpt2(torch, F, t, cfg, ids):
    C, nh, eps = cfg["n_embd"], cfg["n_head"], cfg["layer_norm_epsilon"]
    B, T = ids.shape
    h = t["transformer.wte.weight"][ids] + t["transformer.wpe.weight"][:T]
    for i in range(cfg["n_layer"]):
        p = lambda n: t[f"transformer.h.{i}.{n}"]  # noqa: E731
        a = F.layer_norm(h, (C,), p("ln_1.weight"), p("ln_1.bias"), eps)
        q, k, v = (x.view(B, T, nh, C // nh).transpose(1, 2)
                   for x in (torch.addmm(p("attn.c_attn.bias"), a.view(-1, C), p("attn.c_attn.weight"))
                             .view(B, T, 3 * C).split(C, dim=2)))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        h = h + y @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        mm = F.layer_norm(h, (C,), p("ln_2.weight"), p("ln_2.bias"), eps)
        h = h + F.gelu(mm @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias"), approximate="tanh") \
            @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
    h = F.layer_norm(h, (C,), t["transformer.ln_f.weight"], t["transformer.ln_f.bias"], eps)
    return h @ t["lm_head.weight"].T


def test_export_of_a_non_gpt_checkpoint_is_one_line(tmp_path):
    path = checkpoint.save(tmp_path / "ck", params=np.zeros(10, np.float32), optimizer={}, step=1, epoch=0,
                           step_in_epoch=1, config={"model": {"kind": "mlp"}}, ranks=1)
    r = _export(path, tmp_path / "hf")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "generate needs" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]  # (MPICH adds its own Abort line)
    assert len(lines) == 1 and "[rank 0@" in lines[0] and "'mlp'" in lines[0], r.stderr
    assert not (tmp_path / "hf" / "model.safetensors").exists()
