"""Reference points for a language model: the val split's bits per token under gzip -9 and xz -9.

    val.h5 tokens --bytes--> gzip.compress(level 9) / lzma.compress(preset 9)  (= gzip -9, xz -9)
    bits per token = 8 x compressed bytes / val tokens       (byte tokens: bits per byte)

A compressor sees the whole split at once (its window: 32 KiB for gzip, up to 64 MiB for xz), the
model ``block_size`` tokens of context, so these are targets to beat, not floors. For vocabularies
over 256 the tokens are stored as uint16 and the figure is bits per *token* of those bytes.

The result is cached in ``DIR/baselines.json`` next to the manifest, keyed by the val file's
checksum (a rebuilt split is measured again); a read-only directory just measures every time.
``python -m mpitrain data baseline DIR`` prints it; ``data check`` and ``train`` print it too.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
from pathlib import Path

CACHE = "baselines.json"
NAMES = ("gzip -9", "xz -9")


def _measure(data: bytes, n_tokens: int) -> dict:
    sizes = {"gzip -9": len(gzip.compress(data, compresslevel=9, mtime=0)),
             "xz -9": len(lzma.compress(data, preset=9))}
    return {k: 8.0 * v / max(n_tokens, 1) for k, v in sizes.items()}


def compressor_bits(path) -> dict:
    """``{"gzip -9": bits, "xz -9": bits, "unit": "byte" | "token", "tokens": n}`` for DIR's val split."""
    from .tokens import open_token_file, read_token_manifest

    path = Path(path)
    m = read_token_manifest(path)
    key = m["val"]["checksum"]
    cache = path / CACHE
    try:
        got = json.loads(cache.read_text())
        if got.get("val_checksum") == key and all(k in got for k in NAMES):
            return {k: got[k] for k in (*NAMES, "unit", "tokens")}
    except (OSError, ValueError):
        pass
    with open_token_file(path / m["val"]["file"], m, m["val"], "val") as f:
        tok = f["tokens"][...]
    out = {**_measure(tok.tobytes(), tok.size), "unit": "byte" if tok.dtype.itemsize == 1 else "token",
           "tokens": int(tok.size)}
    try:  # best effort: atomic, and never an error when the directory is read-only
        tmp = cache.with_name(f".{CACHE}.{os.getpid()}")
        tmp.write_text(json.dumps({"val_checksum": key, **out}, indent=1) + "\n")
        os.replace(tmp, cache)
    except OSError:
        pass
    return out


def describe(b: dict) -> str:
    """``gzip -9 1.810, xz -9 1.390 bits/byte`` (the val split)."""
    return ", ".join(f"{k} {b[k]:.3f}" for k in NAMES) + f" bits/{b['unit']}"
