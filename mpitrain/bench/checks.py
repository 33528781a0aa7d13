"""The bench's inputs and its correctness check (#wrong).

    input   rank-dependent, reproducible (seeded by (seed, rank)), and safe for every op: positive
            floats near 1 (no cancellation, a bounded product), small integers for prod, +-1000
            otherwise -- the bench resets the buffer from it before every call (a repeated
            in-place sum would overflow)
    #wrong  elements of a rank's result that differ from native's for the same input: exactly
            for integers, beyond rtol = 4 * ranks * eps for floats; and when the ranks' results
            are not bitwise identical, the elements that differ from rank 0's (at least 1)
"""

from __future__ import annotations

import numpy as np

from .. import backend

CHECK_CHUNK = 1 << 20  # elements compared at a time (bounded temporaries)


def tolerance(dtype, ranks: int) -> float:
    """Relative tolerance for comparing float results with native: 4 * ranks * eps (0 for ints)."""
    dt = np.dtype(dtype)
    if dt.kind != "f":
        return 0.0
    return 4.0 * max(ranks, 1) * float(np.finfo(dt).eps)


def make_source(n: int, dtype, op: str, rank: int, seed: int = 1234) -> np.ndarray:
    """Rank-dependent input that cannot overflow for any op: positive floats near 1 (so no
    cancellation and a bounded product), small integers for prod, +-1000 otherwise."""
    rng = np.random.default_rng([seed, rank])
    dt = np.dtype(dtype)
    if dt.kind == "f":
        lo, hi = (0.9, 1.1) if op == "prod" else (0.5, 1.5)
        x = rng.random(n, dtype=np.float32 if dt.itemsize <= 4 else np.float64)
        x *= hi - lo
        x += lo
        return x.astype(dt, copy=False)
    if op == "prod":
        return rng.choice(np.array([-2, -1, 1, 2], dtype=dt), size=n)
    return rng.integers(-1000, 1001, size=n, dtype=dt)


def count_wrong(got, ref, rtol: float, xp=np) -> int:
    """Elements of ``got`` that differ from ``ref`` (exactly when rtol == 0), in bounded chunks."""
    n = got.size
    bad = 0
    for i in range(0, n, CHECK_CHUNK):
        g, r = got[i:i + CHECK_CHUNK], ref[i:i + CHECK_CHUNK]
        if rtol == 0:
            bad += int(xp.count_nonzero(g != r))
        else:
            ok = xp.isclose(g.astype(xp.float64), r.astype(xp.float64), rtol=rtol, atol=0.0, equal_nan=True)
            bad += int(g.size - int(xp.count_nonzero(ok)))
    return bad


def _digest(buf) -> tuple[int, int]:
    """Cheap fingerprint of the exact bits (xor and wrapped sum of the words)."""
    h = backend.to_numpy(buf).reshape(-1)
    bits = h.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[h.itemsize])
    if bits.size == 0:
        return (0, 0)
    return int(np.bitwise_xor.reduce(bits)), int(bits.sum(dtype=np.uint64))


def check_result(comm, buf, ref, rtol: float, xp=np) -> int:
    """Collective. Elements of this rank's ``buf`` that are wrong against ``ref`` -- plus, when
    the ranks' results are not bitwise identical, those differing from rank 0's."""
    wrong = count_wrong(buf, ref, rtol, xp)
    if comm.Get_size() > 1:
        digests = comm.allgather(_digest(buf))
        if any(d != digests[0] for d in digests):
            root = xp.empty_like(buf)
            if comm.Get_rank() == 0:
                root[...] = buf
            _bcast(comm, root)
            mine_differs = digests[comm.Get_rank()] != digests[0]
            wrong = max(wrong, count_wrong(buf, root, 0.0, xp), 1 if mine_differs else 0)
    return wrong


def _bcast(comm, arr) -> None:
    """Bcast from rank 0 into ``arr`` (through the host for device arrays)."""
    if backend.is_device(arr):
        h = backend.to_numpy(arr).copy()
        comm.Bcast(h, root=0)
        arr.set(h)
    else:
        comm.Bcast(arr, root=0)
