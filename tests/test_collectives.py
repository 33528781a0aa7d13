"""allreduce against a formula and against native, at whatever size mpirun gave us."""

import hashlib

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.collectives import ALGORITHMS, DTYPES, OPS, allreduce, ring, state_for

pytestmark = pytest.mark.mpi
LENGTHS = [0, 1, 2, 3, 5, 7, 17, 100, 1001]


def _spans_nodes(comm) -> bool:
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    spans = comm.allreduce(node.Get_size(), op=MPI.MIN) < comm.Get_size()
    node.Free()
    return spans


@pytest.fixture(autouse=True)
def shm_on_one_node(request, comm):
    """shm on ranks of several nodes (tests/test_hosts.py runs this file across emulated hosts): it
    refuses on every rank -- checked here -- and the test with algorithm='shm' is skipped."""
    params = getattr(request.node, "callspec", None)
    if params is None or params.params.get("algorithm") != "shm":
        return
    if _spans_nodes(comm):
        from mpitrain.collectives.shm import NodeError

        with pytest.raises(NodeError, match="needs every rank on one node"):
            allreduce(np.ones(5, np.float32), comm, algorithm="shm")
        pytest.skip("algorithm='shm' needs every rank on one node (its refusal checked)")


@pytest.fixture(autouse=True)
def small_segments(monkeypatch):
    """Tiny ring segments, so a few hundred elements already cross many segments and slots."""
    monkeypatch.setattr(ring, "SEGMENT_BYTES", 24)


def rank_data(n, r, dtype, op):
    i = np.arange(n)
    if op == "prod":  # keep products small enough for float16 and int32
        return ((i + r) % 2 + 1).astype(dtype)
    return ((i * 7 + r * 3) % 11 - 3 + r).astype(dtype)


def expected(n, p, dtype, op):
    xs = np.stack([rank_data(n, r, np.float64, op) for r in range(p)]) if p else None
    f = {"sum": np.sum, "avg": np.sum, "max": np.max, "min": np.min, "prod": np.prod}[op]
    out = f(xs, axis=0)
    if op == "avg":
        out = out / p if np.dtype(dtype).kind == "f" else np.floor_divide(out, p)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_formula_and_native(comm, algorithm, dtype):
    check_formula_and_native(comm, algorithm, dtype)


def check_formula_and_native(comm, algorithm, dtype, label=""):
    """Every op and length: the result equals the formula and native; nothing outside the buffer changes."""
    r, p = comm.Get_rank(), comm.Get_size()
    for op in OPS:
        for n in LENGTHS:
            big = np.full(n + 6, 99, dtype=dtype)  # guard elements around the buffer
            buf = big[3:3 + n]
            buf[...] = rank_data(n, r, dtype, op)
            out = allreduce(buf, comm, op=op, algorithm=algorithm)
            assert out is buf
            ref = allreduce(rank_data(n, r, dtype, op), comm, op=op, algorithm="native")
            want = expected(n, p, dtype, op)
            where = f"{algorithm}{label} {op} n={n} {dtype} p={p} rank={r}"
            if np.dtype(dtype).kind == "f":
                tol = 1e-3 if dtype == "float16" else 1e-6
                np.testing.assert_allclose(buf.astype(np.float64), want, rtol=tol, atol=tol, err_msg=where)
                np.testing.assert_allclose(buf.astype(np.float64), ref.astype(np.float64), rtol=tol,
                                           atol=tol, err_msg=where)
            else:
                np.testing.assert_array_equal(buf, want.astype(dtype), err_msg=where)
                np.testing.assert_array_equal(buf, ref, err_msg=where)
            assert (big[:3] == 99).all() and (big[3 + n:] == 99).all(), f"wrote outside the buffer: {where}"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_bitwise_identical_on_every_rank(comm, algorithm, dtype):
    r = comm.Get_rank()
    for n in (1, 3, 1001):
        x = np.random.default_rng(100 + r).standard_normal(n).astype(dtype)
        for op in ("sum", "avg", "prod"):
            out = allreduce(x.copy(), comm, op=op, algorithm=algorithm)
            digests = comm.allgather(hashlib.sha1(out.tobytes()).hexdigest())
            assert len(set(digests)) == 1, f"{algorithm} {op} {dtype} n={n}: ranks differ {digests}"


@pytest.mark.parametrize("algorithm", ["ring", "tree", "hier"])
def test_float16_sum_is_accurate(comm, algorithm):
    r, p = comm.Get_rank(), comm.Get_size()
    x = (np.linspace(0.1, 1.0, 257) * (r + 1)).astype(np.float16)
    want = sum((np.linspace(0.1, 1.0, 257) * (k + 1)).astype(np.float16).astype(np.float64) for k in range(p))
    out = allreduce(x, comm, op="sum", algorithm=algorithm)
    np.testing.assert_allclose(out.astype(np.float64), want, rtol=2e-3 * p)


def test_multidimensional_and_large(comm, monkeypatch):
    monkeypatch.setattr(ring, "SEGMENT_BYTES", 64 * 1024)
    r, p = comm.Get_rank(), comm.Get_size()
    x = np.full((517, 1031), r + 1, dtype=np.float32)  # ~2 MiB, not divisible by p
    allreduce(x, comm, algorithm="ring")
    assert (x == p * (p + 1) / 2).all()


def disagreeing(rank: int, what: str, other: str = "tree"):
    """(n, dtype, op, algorithm) of a call where rank 1 differs from the others in ``what``."""
    n, dtype, op, alg = 10, np.float32, "sum", "ring"
    if rank != 1:
        return n, dtype, op, alg
    return {"length": (11, dtype, op, alg), "dtype": (n, np.float64, op, alg), "op": (n, dtype, "max", alg),
            "algorithm": (n, dtype, op, other)}[what]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("what", ["length", "dtype", "op", "algorithm"])
def test_disagreeing_ranks_all_raise(comm, what):
    n, dtype, op, alg = disagreeing(comm.Get_rank(), what)
    with pytest.raises(ValueError, match="disagree"):
        allreduce(np.ones(n, dtype), comm, op=op, algorithm=alg)
    # the communicator is still usable afterwards
    assert allreduce(np.ones(3), comm)[0] == comm.Get_size()


def test_unknown_algorithm_names_the_known_ones(comm):
    with pytest.raises(ValueError, match="ring, tree, native, auto"):
        allreduce(np.ones(4), comm, algorithm="butterfly")
    with pytest.raises(ValueError, match="sum, avg, max, min, prod"):
        allreduce(np.ones(4), comm, op="mean")


@pytest.mark.mpi(min_size=2)
def test_unknown_algorithm_on_one_rank_raises_everywhere(comm):
    alg = "butterfly" if comm.Get_rank() == comm.Get_size() - 1 else "ring"
    with pytest.raises(ValueError, match="unknown algorithm"):
        allreduce(np.ones(4), comm, algorithm=alg)


def test_bad_buffers_raise_everywhere(comm):
    r = comm.Get_rank()
    bad = np.ones((4, 4))[:, ::2] if r == 0 else np.ones(8)  # rank 0: not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        allreduce(bad, comm)
    bad = np.ones(4, dtype=np.uint8) if r == 0 else np.ones(4)
    with pytest.raises(ValueError, match="dtype"):
        allreduce(bad, comm)
    bad = [1.0, 2.0] if r == 0 else np.ones(2)
    with pytest.raises(ValueError, match="NumPy or CuPy"):
        allreduce(bad, comm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_callers_messages_are_untouched(comm, algorithm):
    """A caller's pending receive (any source, any tag) and a message in flight with our tags."""
    r, p = comm.Get_rank(), comm.Get_size()
    right, left = (r + 1) % p, (r - 1) % p
    got = np.zeros(5, dtype=np.int64)
    wild = comm.Irecv(got, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
    mine = np.arange(5, dtype=np.int64) + 1000 * r
    inflight = [comm.Isend(mine, dest=right, tag=t) for t in (0, 11, 12, 13)]
    x = np.arange(1001, dtype=np.float64) + r
    allreduce(x, comm, algorithm=algorithm)
    np.testing.assert_array_equal(x, p * np.arange(1001) + p * (p - 1) / 2)
    st = MPI.Status()
    wild.Wait(st)
    assert st.Get_source() == left
    for t in (11, 12, 13):
        buf = np.zeros(5, dtype=np.int64)
        comm.Recv(buf, source=left, tag=t)
        np.testing.assert_array_equal(buf, np.arange(5) + 1000 * left)
    MPI.Request.Waitall(inflight)
    np.testing.assert_array_equal(got, np.arange(5) + 1000 * left)


def test_private_communicator_is_cached(comm):
    a = state_for(comm)
    allreduce(np.ones(3), comm)
    assert state_for(comm) is a
    assert a.comm != comm and MPI.Comm.Compare(a.comm, comm) == MPI.CONGRUENT


def test_subcommunicators_of_any_size(comm):
    r = comm.Get_rank()
    for color_of in (lambda k: k, lambda k: k % 2, lambda k: 0 if k < 3 else 1):
        sub = comm.Split(color_of(r), r)
        try:
            q = sub.Get_size()
            for alg in ALGORITHMS:
                x = np.arange(13, dtype=np.int64) * (sub.Get_rank() + 1)
                if alg == "shm" and _spans_nodes(sub):  # refused on every rank of ``sub`` (emulated hosts)
                    with pytest.raises(ValueError, match="needs every rank on one node"):
                        allreduce(x, sub, algorithm=alg)
                    continue
                allreduce(x, sub, algorithm=alg)
                np.testing.assert_array_equal(x, np.arange(13) * q * (q + 1) // 2)
        finally:
            sub.Free()


def test_auto_without_the_fused_path_on_many_ranks(comm, monkeypatch):
    """Above FUSE_MAX_RANKS the check carries no data; auto still reduces small messages right."""
    import mpitrain.collectives as C

    monkeypatch.setattr(C, "FUSE_MAX_RANKS", 0)
    dup = comm.Dup()  # a fresh communicator: its state is made with the patched limit
    try:
        r, p = dup.Get_rank(), dup.Get_size()
        x = np.arange(5, dtype=np.float32) + r
        allreduce(x, dup)
        assert state_for(dup).small == 0
        np.testing.assert_array_equal(x, p * np.arange(5) + p * (p - 1) / 2)
    finally:
        dup.Free()
