"""``python -m mpitrain export CKPT --out DIR``: a GPT checkpoint as Hugging Face GPT-2 files.

    ckpt-*.h5 --model_config + params--> GPT --rename (no transposes)--> DIR/model.safetensors
                                                                        DIR/config.json (GPT-2 keys)

Our GPT is GPT-2's architecture exactly (pre-LayerNorm blocks with biases, eps 1e-5, tanh GELU =
"gelu_new", learned positions, q|k|v in one (C, 3C) matrix, heads split the same way), and our linear
weights are already (fan_in, fan_out) -- the layout of GPT-2's Conv1D -- so every tensor keeps its
shape and values:

    ours                 GPT2LMHeadModel                                shape
    wte                  transformer.wte.weight                         (V, C)
    wpe                  transformer.wpe.weight                         (block_size, C)
    h{i}.ln1.w / .b      transformer.h.{i}.ln_1.weight / .bias          (C,)
    h{i}.attn_qkv.w / .b transformer.h.{i}.attn.c_attn.weight / .bias   (C, 3C) / (3C,)
    h{i}.attn_proj.w / .b transformer.h.{i}.attn.c_proj.weight / .bias  (C, C) / (C,)
    h{i}.ln2.w / .b      transformer.h.{i}.ln_2.weight / .bias          (C,)
    h{i}.mlp_fc.w / .b   transformer.h.{i}.mlp.c_fc.weight / .bias      (C, 4C) / (4C,)
    h{i}.mlp_proj.w / .b transformer.h.{i}.mlp.c_proj.weight / .bias    (4C, C) / (C,)
    lnf.w / .b           transformer.ln_f.weight / .bias                (C,)
    wte (tied) | lm_head lm_head.weight                                 (V, C)

Tokens are raw bytes (id = byte value) for vocab_size 256: there is no tokenizer file to ship and no
BOS/EOS token (config.json says so under "mpitrain"). Rank 0 writes; the other ranks do nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import checkpoint
from .runtime import UserError, get_comm, log0

_BLOCK = {"ln1.w": "ln_1.weight", "ln1.b": "ln_1.bias", "attn_qkv.w": "attn.c_attn.weight",
          "attn_qkv.b": "attn.c_attn.bias", "attn_proj.w": "attn.c_proj.weight", "attn_proj.b": "attn.c_proj.bias",
          "ln2.w": "ln_2.weight", "ln2.b": "ln_2.bias", "mlp_fc.w": "mlp.c_fc.weight", "mlp_fc.b": "mlp.c_fc.bias",
          "mlp_proj.w": "mlp.c_proj.weight", "mlp_proj.b": "mlp.c_proj.bias"}
INSTALL = "pip install 'mpitrain[export]' (or: pip install safetensors)"


def add_arguments(p):
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint file of a model.kind = \"gpt\" job")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for model.safetensors and config.json")
    p.set_defaults(func=main)


def gpt2_name(ours: str) -> str:
    """Our tensor name -> GPT2LMHeadModel's (see the table above)."""
    if ours in ("wte", "wpe"):
        return f"transformer.{ours}.weight"
    if ours in ("lnf.w", "lnf.b"):
        return "transformer.ln_f." + ("weight" if ours.endswith(".w") else "bias")
    if ours == "lm_head":
        return "lm_head.weight"
    layer, _, rest = ours.partition(".")
    return f"transformer.h.{int(layer[1:])}.{_BLOCK[rest]}"


def gpt2_tensors(model) -> dict[str, np.ndarray]:
    """GPT-2 name -> a contiguous copy of the tensor (lm_head.weight is a copy of wte when tied)."""
    out = {gpt2_name(name): np.ascontiguousarray(model.p[name]) for name, _, _ in model.tensors()}
    if model.tie:
        out["lm_head.weight"] = out["transformer.wte.weight"].copy()
    return out


def gpt2_config(model, ck: dict) -> dict:
    """config.json: GPT2Config's keys (Hugging Face reads the file as it is), plus what it cannot say."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": model.vocab_size, "n_positions": model.block_size, "n_ctx": model.block_size,
        "n_embd": model.n_embd, "n_layer": model.n_layer, "n_head": model.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
        "tie_word_embeddings": model.tie, "bos_token_id": None, "eos_token_id": None,
        "torch_dtype": model.dtype.name,
        "mpitrain": {"checkpoint": str(ck["path"]), "step": ck.get("step"),
                     "tokens": "raw bytes, id = byte value (no tokenizer, no BOS/EOS)" if model.vocab_size <= 256
                     else "the data set's token ids"},
    }


def export(ck: dict, out) -> tuple[Path, Path]:
    """Write ``out``/model.safetensors and ``out``/config.json for checkpoint ``ck``; their paths."""
    from .generate import load_model

    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise UserError(f"export needs the safetensors library: {INSTALL}") from None
    model = load_model(ck, "export")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        st, cj = out / "model.safetensors", out / "config.json"
        tmp = out / f".model.safetensors.tmp{os.getpid()}"
        save_file(gpt2_tensors(model), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, st)
        cj.write_text(json.dumps(gpt2_config(model, ck), indent=2) + "\n")
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or e}); choose another directory") from None
    return st, cj


def main(args) -> int:
    if get_comm().Get_rank() != 0:
        return 0
    try:
        ck = checkpoint.load(args.checkpoint)
    except ValueError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"{args.checkpoint}: {e.strerror or e}") from None
    st, cj = export(ck, args.out)
    log0(f"wrote {st} ({st.stat().st_size:,} bytes, GPT-2 names) and {cj} from {ck['path']} (step {ck.get('step')})")
    return 0
