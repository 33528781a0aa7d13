"""reduce_scatter and allgather (collectives/scatter.py): the ring all-reduce's two halves, against
a formula, native and the all-reduce itself, at whatever size mpirun gave us."""

import numpy as np
import pytest

from mpitrain.collectives import DTYPES, OPS, allgather, allreduce, owned_chunk, reduce_scatter, ring
from mpitrain.collectives.nonblocking import ireduce_scatter
from mpitrain.collectives.partition import chunk_bounds
from test_collectives import LENGTHS, expected, rank_data

pytestmark = pytest.mark.mpi
HALVES = ("ring", "native", "auto")


@pytest.fixture(autouse=True)
def small_segments(monkeypatch):
    monkeypatch.setattr(ring, "SEGMENT_BYTES", 24)


def test_the_partition_is_the_rings():
    for n in LENGTHS:
        for p in (1, 2, 3, 4, 7):
            assert [owned_chunk(n, p, r) for r in range(p)] == [chunk_bounds(n, p, (r + 1) % p) for r in range(p)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", HALVES)
def test_reduce_scatter_formula_and_native(comm, algorithm, dtype):
    r, p = comm.Get_rank(), comm.Get_size()
    for op in OPS:
        for n in LENGTHS:
            big = np.full(n + 6, 99, dtype=dtype)
            buf = big[3:3 + n]
            buf[...] = rank_data(n, r, dtype, op)
            mine = reduce_scatter(buf, comm, op=op, algorithm=algorithm)
            lo, hi = owned_chunk(n, p, r)
            assert mine.base is not None and mine.size == hi - lo
            want = expected(n, p, dtype, op)[lo:hi]
            ref = reduce_scatter(rank_data(n, r, dtype, op), comm, op=op, algorithm="native")
            where = f"{algorithm} {op} n={n} {dtype} p={p} rank={r}"
            if np.dtype(dtype).kind == "f":
                tol = 1e-3 if dtype == "float16" else 1e-6
                np.testing.assert_allclose(mine.astype(np.float64), want, rtol=tol, atol=tol, err_msg=where)
                np.testing.assert_allclose(mine.astype(np.float64), ref.astype(np.float64), rtol=tol, atol=tol,
                                           err_msg=where)
            else:
                np.testing.assert_array_equal(mine, want.astype(dtype), err_msg=where)
                np.testing.assert_array_equal(mine, ref, err_msg=where)
            assert (big[:3] == 99).all() and (big[3 + n:] == 99).all(), where


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", HALVES)
def test_allgather_fills_every_chunk_and_leaves_the_rest(comm, algorithm, dtype):
    r, p = comm.Get_rank(), comm.Get_size()
    for n in LENGTHS:
        full = np.stack([rank_data(n, q, dtype, "sum") for q in range(p)])  # rank q's chunk from row q
        want = np.empty(n, dtype=dtype)
        for q in range(p):
            lo, hi = owned_chunk(n, p, q)
            want[lo:hi] = full[q, lo:hi]
        big = np.full(n + 6, 99, dtype=dtype)
        buf = big[3:3 + n]
        buf[...] = -1
        lo, hi = owned_chunk(n, p, r)
        buf[lo:hi] = full[r, lo:hi]
        assert allgather(buf, comm, algorithm=algorithm) is buf
        np.testing.assert_array_equal(buf, want, err_msg=f"{algorithm} n={n} {dtype} p={p}")
        assert (big[:3] == 99).all() and (big[3 + n:] == 99).all()


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_ring_halves_are_the_ring_allreduce_bit_for_bit(comm, dtype):
    r, p = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(5 + r)
    for n in (*LENGTHS, 4099):
        x = rng.standard_normal(n).astype(dtype)
        a, b, c = x.copy(), x.copy(), x.copy()
        allreduce(a, comm, op="avg", algorithm="ring")
        reduce_scatter(b, comm, op="avg", algorithm="ring")
        ireduce_scatter(c, comm, op="avg", algorithm="ring").wait()
        lo, hi = owned_chunk(n, p, r)
        assert b[lo:hi].tobytes() == a[lo:hi].tobytes() == c[lo:hi].tobytes()
        allgather(b, comm, algorithm="ring")
        assert b.tobytes() == a.tobytes()


def test_bad_calls_raise_on_every_rank(comm):
    r, p = comm.Get_rank(), comm.Get_size()
    with pytest.raises(ValueError, match="has no reduce_scatter"):
        reduce_scatter(np.zeros(5), comm, algorithm="tree")
    with pytest.raises(ValueError, match="has no allgather"):
        allgather(np.zeros(5), comm, algorithm="hier")
    if p == 1:
        return
    with pytest.raises(ValueError, match="ranks disagree"):  # lengths differ
        reduce_scatter(np.zeros(5 + r), comm)
    with pytest.raises(ValueError, match="ranks disagree"):  # different collectives, same buffer
        if r == 0:
            allreduce(np.zeros(8), comm)
        else:
            reduce_scatter(np.zeros(8), comm)
    with pytest.raises(ValueError, match="read-only"):
        a = np.zeros(8)
        a.flags.writeable = r != 0
        allgather(a, comm)
