"""allreduce_init: persistent plans checked once, started many times with changing contents."""

import numpy as np
import pytest

import mpitrain
from mpitrain.collectives import allreduce, ring
from mpitrain.collectives.plan import AllreducePlan

pytestmark = pytest.mark.mpi

ALGS = ["native", "ring", "tree", "auto"]
SIZES = [0, 1, 3, 103, 1001]


@pytest.fixture(autouse=True)
def small_segments(monkeypatch):
    monkeypatch.setattr(ring, "SEGMENT_BYTES", 40)  # many segments even for small buffers


def data(n, r, k, dtype):
    """Rank- and start-dependent values; small integers for the integer dtypes and float16."""
    g = np.random.default_rng(1000 * r + 17 * k + n)
    if np.dtype(dtype).kind == "i" or dtype == np.float16:
        return g.integers(-8, 9, n).astype(dtype)
    return (g.standard_normal(n) * 10).astype(dtype)


def formula(n, p, k, dtype, op):
    rows = np.stack([data(n, q, k, dtype).astype(np.float64) for q in range(p)]) if n else np.zeros((p, 0))
    if op in ("sum", "avg"):
        out = rows.sum(axis=0)
        if op == "avg":
            out = out / p if np.dtype(dtype).kind == "f" else np.floor_divide(out, p)
    elif op == "prod":
        out = rows.prod(axis=0)
    else:
        out = getattr(rows, op)(axis=0)
    return out


@pytest.mark.parametrize("algorithm", ALGS)
@pytest.mark.parametrize("op", ["sum", "avg", "max", "min", "prod"])
def test_many_starts_equal_allreduce_and_formula(comm, algorithm, op):
    r, p = comm.Get_rank(), comm.Get_size()
    results = []
    for dtype in (np.float32, np.float64, np.int32, np.int64, np.float16):
        if op == "prod" and dtype == np.float16:
            continue  # products of random int8s overflow float16 -- covered by sum
        for n in SIZES:
            buf = np.empty(n, dtype=dtype)
            with mpitrain.allreduce_init(buf, comm, op=op, algorithm=algorithm) as h:
                for k in range(3):  # the contents change every start
                    buf[...] = data(n, r, k, dtype)
                    mine = buf.copy()
                    native = allreduce(mine.copy(), comm, op=op, algorithm="native")
                    same_alg = allreduce(mine.copy(), comm, op=op,
                                         algorithm=h.algorithm) if h.algorithm != "native" else native
                    assert h.start() is h
                    assert h.wait() is buf
                    want = formula(n, p, k, dtype, op)
                    if dtype == np.float16 or np.dtype(dtype).kind == "i":
                        assert buf.tobytes() == native.tobytes(), (dtype, n, k)
                        if dtype == np.float16 and op == "avg":  # rounded once from float32
                            np.testing.assert_allclose(buf.astype(np.float64), want, rtol=1e-3)
                        else:
                            np.testing.assert_array_equal(buf.astype(np.float64), want)
                    else:
                        tol = 1e-5 if dtype == np.float32 else 1e-12
                        np.testing.assert_allclose(buf, native, rtol=tol, atol=tol * 10)
                        np.testing.assert_allclose(buf, want, rtol=tol, atol=tol * 100)
                    assert buf.tobytes() == same_alg.tobytes(), "the plan = allreduce with its algorithm"
                    results.append(buf.tobytes())
    assert len(set(comm.allgather(b"".join(results)))) == 1, "bitwise identical on every rank"


@pytest.mark.parametrize("algorithm", ["native", "ring", "hier"])
@pytest.mark.parametrize("dtype,op", [(np.float64, "sum"), (np.float16, "avg")])
def test_test_polls_to_completion_and_other_calls_overlap(comm, algorithm, dtype, op):
    r, p = comm.Get_rank(), comm.Get_size()
    buf = np.zeros(777, dtype=dtype)
    h = mpitrain.allreduce_init(buf, comm, op=op, algorithm=algorithm)
    for k in range(4):
        buf[...] = 2 * (r + k)
        h.start()
        other = allreduce(np.full(5, float(r)), comm, algorithm="ring")  # another call while in flight
        while not h.test():
            pass
        assert h.test() and h.wait() is buf
        want = sum(2 * (q + k) for q in range(p)) / (p if op == "avg" else 1)
        np.testing.assert_allclose(buf.astype(np.float64), want, rtol=1e-3)
        assert (other == sum(range(p))).all()
    h.free()
    assert h.freed


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("case", ["length", "dtype", "op", "algorithm"])
def test_disagreeing_init_raises_on_every_rank(comm, case):
    from test_collectives import disagreeing

    n, dtype, op, alg = disagreeing(comm.Get_rank(), case, other="native")
    with pytest.raises(ValueError, match="allreduce_init"):
        mpitrain.allreduce_init(np.ones(n, dtype=dtype), comm, op=op, algorithm=alg)
    assert allreduce(np.ones(2), comm)[0] == comm.Get_size()  # still usable


def test_bad_arguments_raise_at_init(comm):
    with pytest.raises(ValueError, match="allreduce_init.*unknown algorithm"):
        mpitrain.allreduce_init(np.ones(4), comm, algorithm="nope")
    with pytest.raises(ValueError, match="allreduce_init.*read-only"):
        b = np.ones(4)
        b.flags.writeable = False
        mpitrain.allreduce_init(b, comm)


@pytest.mark.parametrize("algorithm", ["native", "ring"])
def test_start_twice_free_then_start_and_with(comm, algorithm):
    p = comm.Get_size()
    buf = np.ones(9, dtype=np.float32)
    h = mpitrain.allreduce_init(buf, comm, algorithm=algorithm)
    h.start()
    with pytest.raises(ValueError, match="in flight"):
        h.start()
    with pytest.raises(ValueError, match="in flight"):
        h.free()
    assert (h.wait() == p).all()
    assert (h() == p * p).all()  # start + wait
    h.free()
    h.free()  # idempotent
    for call in (h.start, h.test, h.wait):
        with pytest.raises(ValueError, match="after free"):
            call()
    with mpitrain.allreduce_init(buf, comm, algorithm=algorithm) as g:
        buf[...] = 2
        g.start()  # left in flight: the with waits, then frees
    assert g.freed and (buf == 2 * p).all()
    with pytest.raises(ValueError, match="after free"):
        g.start()


def test_plan_does_not_touch_callers_messages(comm):
    """The caller's own message on tag 0 (and the plan's own on the private communicator) stay apart."""
    r, p = comm.Get_rank(), comm.Get_size()
    right, left = (r + 1) % p, (r - 1) % p
    mine = np.full(3, float(r))
    got = np.empty(3)
    req = comm.Irecv(got, source=left, tag=0)
    buf = np.full(50, r + 1.0)
    with mpitrain.allreduce_init(buf, comm, algorithm="ring") as h:
        h.start()
        comm.Send(mine, dest=right, tag=0)
        h.wait()
    req.Wait()
    assert (got == left).all()
    assert (buf == p * (p + 1) / 2).all()


def test_the_public_name(comm):
    assert mpitrain.allreduce_init is not None and "allreduce_init" in mpitrain.__all__
    h = mpitrain.allreduce_init(np.zeros(3), comm)
    assert isinstance(h, AllreducePlan) and "ready" in repr(h)
    h.free()


def test_several_plans_in_flight_at_once(comm):
    """Plans of the same and different algorithms, started in the same order on every rank, all in flight."""
    r, p = comm.Get_rank(), comm.Get_size()
    bufs = [np.zeros(n) for n in (5, 301, 1003)]
    plans = [mpitrain.allreduce_init(b, comm, algorithm=a) for b, a in zip(bufs, ("native", "ring", "ring"))]
    try:
        for k in range(3):
            for i, b in enumerate(bufs):
                b[...] = r + k + i
            for h in plans:
                h.start()
            for h in reversed(plans):
                h.wait()
            for i, b in enumerate(bufs):
                assert (b == sum(q + k + i for q in range(p))).all()
    finally:
        for h in plans:
            h.free()


@pytest.mark.parametrize("schedule,seg", [("direct", None), ("ring", None), ("ring", 4096)])
@pytest.mark.parametrize("op", ["sum", "avg", "max"])
def test_bound_ring_plan_is_bitwise_the_blocking_ring(comm, monkeypatch, schedule, seg, op):
    """A ring plan on host memory runs ring.Bound (persistent requests): the same bits as the blocking
    (pipelined) ring, driven by wait() or by test(), at lengths that do not divide by p."""
    monkeypatch.setattr(ring, "SEGMENT_BYTES", seg)
    monkeypatch.setattr(ring, "BOUND_SCHEDULE", schedule)
    r, p = comm.Get_rank(), comm.Get_size()
    for n in (1, 2, 7, 4099, 100_003):
        buf = np.empty(n, dtype=np.float32)
        with mpitrain.allreduce_init(buf, comm, op=op, algorithm="ring") as h:
            assert (h._bound is not None) == (p > 1)
            for k, drive in enumerate(("wait", "test", "wait")):
                buf[...] = data(n, r, k, np.float32)
                ref = allreduce(buf.copy(), comm, op=op, algorithm="ring")
                h.start()
                if drive == "test":
                    while not h.test():
                        pass
                h.wait()
                assert buf.tobytes() == ref.tobytes(), (n, k, drive)
                assert len(set(comm.allgather(buf.tobytes()))) == 1
