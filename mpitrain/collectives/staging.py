"""Device buffers through an MPI library that cannot read GPU memory.

    GPU buf --D2H--> pinned host copy --(algorithm on host)--> --H2D--> GPU buf

The copy back happens once, after the host reduction; the stream is
synchronised before MPI touches the host copy and after the copy back.
"""

from __future__ import annotations

import numpy as np


def _pinned(st, dtype, n):
    import cupy as cp

    key = ("pinned", np.dtype(dtype).str)
    host = st._scratch.get(key)
    if host is None or host.size < n:
        mem = cp.cuda.alloc_pinned_memory(max(n, 1) * np.dtype(dtype).itemsize)
        host = np.frombuffer(mem, dtype=dtype, count=max(n, 1))
        st._scratch[key] = host
    return host[:n]


def staged(run, st, buf, op):
    import cupy as cp

    flat = buf.reshape(-1)
    host = _pinned(st, flat.dtype, flat.size)
    stream = cp.cuda.get_current_stream()
    flat.get(out=host, stream=stream)
    stream.synchronize()
    run(st, host, op)
    flat.set(host, stream=stream)
    stream.synchronize()
    return buf
