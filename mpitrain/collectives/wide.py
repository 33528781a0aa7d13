"""float16 sums and products accumulate in float32, rounded to float16 once at the end.

    float16 buf --copy--> float32 scratch --the algorithm (float32 on the wire)--> round once --> buf

A float16 partial sum overflows at 65504 (3 ranks x 60000 is inf) and rounds at every
step; the MPI library has no float16, so native reduces it in float32 and rounds once.
ring, tree and hier (their blocking ``allreduce`` and the non-blocking handles) and auto's
fused path do the same, so float16 sum/avg/prod match native or are better. Still
bitwise identical on every rank: the float32 algorithm is, and rounding is deterministic.
Cost: the wire carries float32, twice the float16 bytes (as native does), plus two
local copies; the float32 scratch is kept per communicator (``_State.wide``). max and
min are exact in float16 and stay float16. (The device ring, staging.py, still adds
float16 segments in float16; whole-buffer staging runs these host algorithms, so it
accumulates in float32.)
"""

from __future__ import annotations

import numpy as np

from .. import backend

OPS = ("sum", "avg", "prod")


def needed(buf, op: str) -> bool:
    """True when ``op`` on ``buf`` must accumulate in float32."""
    return buf.dtype == np.float16 and op in OPS


def narrow(flat, wide) -> None:
    """``flat[...] = wide``, rounding to float16 (beyond ±65504: inf, as native, without a warning)."""
    if isinstance(flat, np.ndarray):
        with np.errstate(over="ignore"):
            flat[...] = wide
    else:
        flat[...] = wide


def blocking(st, buf, op: str, run):
    """``run(st, wide, op)`` on a float32 copy of the float16 ``buf``, then round back into ``buf``."""
    flat = buf.reshape(-1)
    wide = st.wide(backend.array_module(flat), flat.size)
    wide[...] = flat
    run(st, wide, op)
    narrow(flat, wide)
    return buf
