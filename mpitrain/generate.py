"""``python -m mpitrain generate``: a GPT checkpoint continues a prompt (serial; byte tokens).

    JOB.toml (+ --set) --checkpoint.dir--> newest valid ckpt-*.h5  (or --checkpoint FILE)
      model_config in the checkpoint --> GPT (numpy, float32) <- params
      prompt --utf-8 bytes--> tokens --+--> last block_size tokens --> logits[-1] / temperature
                                       |        top-k --> softmax --> sample (seeded) --+
                                       +<-----------------------------------------------+  N times
      print(prompt + decoded continuation)        (bytes that are not UTF-8 print as U+FFFD)

Cost: N forward passes over <= block_size tokens (no KV cache): N · 2·N_mm·T FLOPs roughly.
Under mpirun every rank computes the same text and rank 0 prints it.
"""

from __future__ import annotations

import sys

import numpy as np

from . import checkpoint, config
from .runtime import UserError, log0


def add_arguments(p):
    p.add_argument("job", nargs="?", help="job file (TOML) whose checkpoint.dir holds the checkpoints")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a job key (e.g. --set checkpoint.dir=...)")
    p.add_argument("--checkpoint", metavar="FILE", help="a checkpoint file (default: the job's newest)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--tokens", type=int, default=200, metavar="N", help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the K likeliest (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.set_defaults(func=main)


def _checkpoint(args) -> dict:
    if args.checkpoint:
        try:
            return checkpoint.load(args.checkpoint)
        except ValueError as e:
            raise UserError(f"--checkpoint {e}") from None
    cfg = config.load(args.job, args.overrides)
    ck = checkpoint.latest(cfg.checkpoint.dir)
    if ck is None:
        raise UserError(f"no checkpoint in {cfg.checkpoint.dir} (job {cfg.source}); train the job first "
                        f"(mpirun -n 2 python -m mpitrain train {args.job or 'JOB.toml'}) or pass --checkpoint FILE")
    return ck


def load_model(ck, what: str = "generate"):
    """The GPT a checkpoint holds (its params in); ``what`` names the command in the error."""
    from .models import GPT, check

    mc = ck.get("model_config")
    kind = (mc or {}).get("kind") or ((ck.get("config") or {}).get("model") or {}).get("kind", "?")
    if kind != "gpt" or mc is None:
        raise UserError(f"{ck['path']}: holds a model of kind {kind!r}; {what} needs a checkpoint of a "
                        "model.kind = \"gpt\" job")
    m = GPT(mc["n_layer"], mc["n_head"], mc["n_embd"], mc["block_size"], mc["vocab_size"],
            tie_embeddings=mc["tie_embeddings"], dtype=np.float32, seed=0)
    check(ck, m, "its model_config makes", "the file is inconsistent: use another checkpoint")
    m.params[...] = ck["params"].astype(np.float32)
    return m


def check_options(n, temperature, top_k, seed) -> None:
    """UserError (one line) unless every number is one ``sample`` can use."""
    for name, v in (("--tokens", n), ("--top-k", top_k), ("--seed", seed)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            raise UserError(f"{name} = {v!r} must be an integer >= 0" + (" (0 = all tokens)" if name == "--top-k" else ""))
    if not isinstance(temperature, (int, float, np.floating)) or not 0 <= temperature < float("inf"):
        raise UserError(f"--temperature = {temperature!r} must be a finite number >= 0 (0 = greedy)")


def sample(model, prompt: list[int], n: int, *, temperature=1.0, top_k=0, seed=0) -> list[int]:
    """``n`` tokens after ``prompt`` (a list of ids), sampled from the model."""
    check_options(n, temperature, top_k, seed)
    rng, toks = np.random.default_rng(seed), list(prompt)
    for _ in range(n):
        ctx = np.array([toks[-model.block_size:]], dtype=np.int64)
        z = model.logits(ctx)[0, -1].astype(np.float64)                    # (V)
        if temperature <= 0:
            toks.append(int(z.argmax()))
            continue
        if 0 < top_k < z.size:
            z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
        p = np.exp((z - z.max()) / temperature)  # max first: a tiny temperature gives 0s and a 1, never NaN
        toks.append(int(rng.choice(z.size, p=p / p.sum())))
    return toks[len(prompt):]


def main(args) -> int:
    check_options(args.tokens, args.temperature, args.top_k, args.seed)
    ck = _checkpoint(args)
    model = load_model(ck)
    prompt = list(args.prompt.encode("utf-8"))
    if not prompt:
        raise UserError("--prompt is empty; give at least one character")
    if max(prompt) >= model.vocab_size:
        raise UserError(f"the prompt's bytes go up to {max(prompt)} but the model's vocabulary is {model.vocab_size}")
    out = sample(model, prompt, args.tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    log0(f"(checkpoint {ck['path']}, step {ck.get('step')}; {model.describe()})", file=sys.stderr)
    if model.vocab_size <= 256:
        log0(args.prompt + bytes(out).decode("utf-8", errors="replace"))
    else:
        log0(args.prompt + " " + " ".join(map(str, out)))
    return 0
