"""Calls the algorithms would trip on: refused on every rank by the check, never a hang or garbage.

Buffers (read-only, misaligned, byte order, np.matrix, masked, foreign GPU arrays) on one
rank or all; communicators (intercommunicators, COMM_NULL, non-communicators); threads
(overlapping calls on one communicator, the post-check, re-entry, MPI's thread level);
float16 sums accumulated in float32.
"""

import threading
import time

import numpy as np
import pytest
from mpi4py import MPI

import mpitrain.collectives as C
from mpitrain.collectives import ALGORITHMS, allreduce, compress, guard, ring, state_for
from mpitrain.collectives.nonblocking import iallreduce

pytestmark = [pytest.mark.mpi, pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")]
BIG = 100_000  # above SMALL_BYTES: auto leaves the fused path (native / ring)


@pytest.fixture(autouse=True)
def small_segments(monkeypatch):
    monkeypatch.setattr(ring, "SEGMENT_BYTES", 4096)


def outcome(fn):
    """('ok', result) or (exception type name, message)."""
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001 - compared across ranks
        return type(e).__name__, str(e)


def assert_raises_everywhere(comm, fn, match):
    """fn raises ValueError matching ``match`` on every rank (gathered, so a rank that did not is named)."""
    kind, text = outcome(fn)
    seen = comm.allgather((kind, text if kind != "ok" else ""))
    bad = [(r, k, t[:200]) for r, (k, t) in enumerate(seen) if k != "ValueError" or match not in t]
    assert not bad, f"expected ValueError with {match!r} on every rank, got {bad}"
    return text


def assert_usable(comm):
    assert allreduce(np.ones(3), comm, algorithm="ring")[0] == comm.Get_size()


# --------------------------------------------------------------------------- buffers


def _misaligned(x):
    raw = np.zeros(x.nbytes + 1, np.uint8)
    out = raw[1:].view(x.dtype)
    out[...] = x
    return out


class ForeignGPU:
    """Looks like a GPU array (``__cuda_array_interface__``) but is not CuPy."""

    dtype, shape, size, itemsize = np.dtype(np.float32), (4,), 4, 4
    __cuda_array_interface__ = {"shape": (4,), "typestr": "<f4", "data": (0, False), "version": 3}


BAD = {  # kind -> (make the bad buffer from good data, words of the message)
    "read-only": (lambda x: _readonly(x), "read-only"),
    "misaligned": (_misaligned, "not aligned"),
    "byte order": (lambda x: x.astype(x.dtype.newbyteorder(">")), "byte order"),
    "matrix": (lambda x: np.asmatrix(x), "np.matrix"),
    "masked": (lambda x: np.ma.masked_array(x, mask=x < 0), "masked"),
    "foreign gpu": (lambda x: ForeignGPU(), "another library than CuPy"),
    "not contiguous": (lambda x: np.repeat(x, 2)[::2], "not C-contiguous"),
}


def _readonly(x):
    x.flags.writeable = False
    return x


def data(n, r):
    return (np.arange(n) % 13 + r).astype(np.float64)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("n", [10, BIG])
def test_bad_buffer_on_one_rank_raises_on_every_rank(comm, algorithm, kind, n):
    r, p = comm.Get_rank(), comm.Get_size()
    make, words = BAD[kind]
    bad_rank = p - 1
    x = make(data(n, r)) if r == bad_rank else data(n, r)
    before = np.array(x, copy=True) if not isinstance(x, ForeignGPU) else None
    text = assert_raises_everywhere(comm, lambda: allreduce(x, comm, algorithm=algorithm), words)
    assert f"rank {bad_rank}" in text
    if before is not None:  # nothing ran: no rank's buffer changed
        np.testing.assert_array_equal(np.asarray(x), before)
    assert_usable(comm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_rank_read_only_raises_everywhere(comm, algorithm):
    """(at 3 ranks the tree used to hang even when every rank's buffer was read-only)"""
    r = comm.Get_rank()
    for n in (10, BIG):
        x = _readonly(data(n, r))
        assert_raises_everywhere(comm, lambda: allreduce(x, comm, algorithm=algorithm), "read-only")
    assert_usable(comm)


@pytest.mark.parametrize("kind", ["read-only", "misaligned", "matrix"])
@pytest.mark.parametrize("algorithm", ["ring", "tree", "native", "auto"])
def test_iallreduce_refuses_bad_buffers_everywhere(comm, kind, algorithm):
    r, p = comm.Get_rank(), comm.Get_size()
    make, words = BAD[kind]
    x = make(data(1001, r)) if r == p - 1 else data(1001, r)
    assert_raises_everywhere(comm, lambda: iallreduce(x, comm, algorithm=algorithm).wait(), words)
    assert_usable(comm)


@pytest.mark.parametrize("scheme", compress.SCHEMES)
def test_compressors_refuse_bad_buffers_everywhere(comm, scheme):
    r, p = comm.Get_rank(), comm.Get_size()
    c = compress.make(scheme, 64)
    g = np.linspace(-1, 1, 64, dtype=np.float32) * (r + 1)
    bad = _readonly(g.copy()) if r == p - 1 else g.copy()
    assert_raises_everywhere(comm, lambda: c.allreduce_avg(bad, comm), "read-only")
    bad = g[::-1] if r == p - 1 else g.copy()  # a view of non-contiguous memory
    assert_raises_everywhere(comm, lambda: c.allreduce_avg(bad, comm), "not C-contiguous")
    out = g.copy()
    c.allreduce_avg(out, comm)  # and still works
    assert len({o.tobytes() for o in comm.allgather(out)}) == 1


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_zero_d_and_size_one_views_work(comm, algorithm):
    r, p = comm.Get_rank(), comm.Get_size()
    x = np.array(float(r + 1))  # 0-d
    allreduce(x, comm, algorithm=algorithm)
    assert x.shape == () and float(x) == p * (p + 1) / 2
    base = np.arange(5.0) + r
    y = base[::-1][:1]  # size 1, negative stride: C-contiguous
    allreduce(y, comm, op="max", algorithm=algorithm)
    assert y[0] == 4 + p - 1 and base[4] == 4 + p - 1 and (base[:4] == np.arange(4) + r).all()


# --------------------------------------------------------------------------- communicators


@pytest.mark.mpi(min_size=2)
def test_intercommunicator_raises_on_every_rank_of_both_groups(comm):
    r = comm.Get_rank()
    local = comm.Split(r % 2, r)
    inter = local.Create_intercomm(0, comm, 1 - r % 2, tag=77)
    try:
        x = np.full(5, float(r))
        for alg in ALGORITHMS:
            assert_raises_everywhere(comm, lambda: allreduce(x, inter, algorithm=alg), "intercommunicator")
        assert (x == r).all()
        assert_raises_everywhere(comm, lambda: iallreduce(x, inter), "intercommunicator")
        assert_raises_everywhere(comm, lambda: compress.make("topk", 5).allreduce_avg(x.astype(np.float32), inter),
                                 "intercommunicator")
        assert_raises_everywhere(comm, lambda: state_for(inter), "intercommunicator")
    finally:
        inter.Free()
        local.Free()
    assert_usable(comm)


def test_comm_null_raises_there_and_the_members_go_on(comm):
    r, p = comm.Get_rank(), comm.Get_size()
    sub = comm.Split(MPI.UNDEFINED if r == 0 else 0, r)
    x = np.full(7, r + 1.0)
    if r == 0:
        assert sub == MPI.COMM_NULL
        with pytest.raises(ValueError, match="COMM_NULL"):
            allreduce(x, sub)
        assert (x == 1).all()
    else:
        allreduce(x, sub, algorithm="ring")
        assert (x == sum(range(2, p + 1))).all()
        sub.Free()
    with pytest.raises(ValueError, match="COMM_NULL"):  # a freed communicator is COMM_NULL too
        dup = comm.Dup()
        dup.Free()
        allreduce(x, dup)
    assert_usable(comm)


@pytest.mark.parametrize("bad", [0, 1, "world", False, 2.5, object()], ids=repr)
def test_non_communicators_raise_on_every_rank(comm, bad):
    x = np.ones(4)
    assert_raises_everywhere(comm, lambda: allreduce(x, bad), "comm must be an MPI intracommunicator")
    assert_raises_everywhere(comm, lambda: iallreduce(x, bad), "comm must be an MPI intracommunicator")
    assert (x == 1).all()


# --------------------------------------------------------------------------- threads


def test_mpi4py_gives_thread_multiple():
    """What guard.py and CommThread rely on: mpi4py's default thread level."""
    assert MPI.Query_thread() == MPI.THREAD_MULTIPLE == guard.thread_level()


def _wait_for(cond, what, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.001)  # sleep-ok: yields while polling a condition another thread sets (bounded above)


def _run_threads(targets):
    """Run each target on its own thread; their outcome() results, in order."""
    results = [None] * len(targets)

    def body(k):
        results[k] = outcome(targets[k])

    ts = [threading.Thread(target=body, args=(k,), name=f"caller-{k}") for k in range(len(targets))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
        assert not t.is_alive(), "a caller thread hangs"
    return results


def _calls(comm):
    return state_for(comm).calls


@pytest.fixture
def fresh(comm):
    """A communicator of its own (its calls guard starts at zero), freed afterwards."""
    dup = comm.Dup()
    yield dup
    dup.Free()


@pytest.mark.parametrize("algorithm", ["ring", "auto", "native"])
def test_overlapping_calls_raise_in_the_check_on_every_rank(fresh, algorithm):
    """Both threads are inside allreduce before either checks: both calls raise, on every rank."""
    r, p = fresh.Get_rank(), fresh.Get_size()
    calls = _calls(fresh)
    start = calls._arrived
    xs = [np.full(1000, 1.0 + 99 * k + r) for k in range(2)]
    with calls.turn:  # hold the turn while both threads arrive
        results = [None, None]
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(
            k, outcome(lambda: allreduce(xs[k], fresh, algorithm=algorithm)))) for k in range(2)]
        for t in threads:
            t.start()
        _wait_for(lambda: calls._arrived == start + 2, "both threads to arrive")
    for t in threads:
        t.join(60)
    everyone = fresh.allgather([(k, t[:160]) for k, t in results])
    for rank, res in enumerate(everyone):
        for kind, text in res:
            assert kind == "ValueError" and "another thread" in text, f"rank {rank}: {kind}: {text}"
    for k in range(2):
        assert (xs[k] == 1.0 + 99 * k + r).all(), "a refused call changed its buffer"
    assert_usable(fresh)


@pytest.mark.parametrize("algorithm", ["ring", "tree", "hier"])
def test_a_call_arriving_during_another_raises_both_on_every_rank(fresh, monkeypatch, algorithm):
    """Rank-dependent order (even ranks: thread A first, odd ranks: B first), the second thread
    arrives after the first passed its check (before it runs the algorithm): the first raises in
    the post-check, the second in its check -- on every rank, never A0 + B1."""
    r = fresh.Get_rank()
    calls = _calls(fresh)
    inside = threading.Event()
    real = C.check

    def slow(*args, **kwargs):
        carried = real(*args, **kwargs)
        inside.set()
        _wait_for(lambda: calls._arrived >= 2, "the second thread to arrive")
        return carried

    monkeypatch.setattr(C, "check", slow)
    xs = {"A": np.full(500, 1.0), "B": np.full(500, 100.0)}
    first, second = ("A", "B") if r % 2 == 0 else ("B", "A")

    def later():
        inside.wait(30)
        return allreduce(xs[second], fresh, algorithm=algorithm)

    res = _run_threads([lambda: allreduce(xs[first], fresh, algorithm=algorithm), later])
    everyone = fresh.allgather([(k, t[:200] if k != "ok" else "") for k, t in res])
    for rank, ((k1, t1), (k2, t2)) in enumerate(everyone):
        assert k1 == "ValueError" and "while this call was in progress" in t1, f"rank {rank} first: {k1} {t1}"
        assert k2 == "ValueError" and "another thread's call" in t2, f"rank {rank} second: {k2} {t2}"
    monkeypatch.undo()
    assert_usable(fresh)


def test_two_threads_free_running_never_mix(fresh):
    """The reported case: two threads, each calling allreduce on one communicator with its own data.
    Every call either returns its own threads' sum or raises ValueError on that thread -- and every
    rank makes all its calls (no hang)."""
    r, p = fresh.Get_rank(), fresh.Get_size()
    barrier = threading.Barrier(2)

    def worker(k):
        def run():
            barrier.wait(10)
            got = []
            for _ in range(3):
                x = np.full(64, 1.0 + 10 * k)
                got.append(outcome(lambda: allreduce(x, fresh, algorithm="ring")[0]))
            return got
        return run

    res = _run_threads([worker(0), worker(1)])
    for k, (kind, got) in enumerate(res):
        assert kind == "ok", got
        for what, value in got:
            if what == "ok":
                assert value == p * (1.0 + 10 * k), f"rank {r} thread {k}: mixed result {value}"
            else:
                assert what == "ValueError" and "thread" in value, value
    assert_usable(fresh)


def test_the_post_check_runs_only_when_some_rank_has_other_threads(fresh, monkeypatch):
    r, p = fresh.Get_rank(), fresh.Get_size()
    st = state_for(fresh)
    for alive_on in ([], [p - 1], list(range(p))):
        monkeypatch.setattr(guard, "others_alive", lambda a=alive_on: r in a)
        call = st.calls.enter()
        try:
            C.check(st, np.ones(4), "sum", "ring", call=call)
        finally:
            st.calls.leave(call)
        assert call.post == bool(alive_on), f"others alive on ranks {alive_on}"
    monkeypatch.setattr(guard, "others_alive", lambda: False)  # single-threaded: one collective, correct
    for alg in ALGORITHMS:
        x = np.arange(9.0) + r
        allreduce(x, fresh, algorithm=alg)
        np.testing.assert_array_equal(x, p * np.arange(9.0) + p * (p - 1) / 2)


def test_reentering_from_inside_a_call_raises(fresh, monkeypatch):
    real = C.check

    def nested(*args, **kwargs):
        carried = real(*args, **kwargs)
        allreduce(np.ones(2), fresh)  # e.g. a signal handler or callback calling back in
        return carried

    monkeypatch.setattr(C, "check", nested)
    assert_raises_everywhere(fresh, lambda: allreduce(np.ones(8), fresh, algorithm="ring"), "called again")
    monkeypatch.undo()
    assert_usable(fresh)


def test_below_serialized_only_the_main_thread_may_call(fresh, monkeypatch):
    r, p = fresh.Get_rank(), fresh.Get_size()
    monkeypatch.setattr(guard, "thread_level", lambda: MPI.THREAD_FUNNELED)
    x = np.ones(16)
    if r == p - 1:
        [(kind, text)] = _run_threads([lambda: allreduce(x, fresh)])
    else:
        kind, text = outcome(lambda: allreduce(x, fresh))
    for rank, (k, t) in enumerate(fresh.allgather((kind, text if kind != "ok" else ""))):
        assert k == "ValueError" and "MPI_THREAD_FUNNELED" in t and f"rank {p - 1}" in t, (rank, k, t)
    assert allreduce(np.ones(2), fresh)[0] == p  # the main thread still may


def test_iallreduce_and_compress_overlaps_raise_everywhere(fresh):
    calls = _calls(fresh)
    c = compress.make("topk", 32)
    for start_call in (lambda: iallreduce(np.ones(300), fresh, algorithm="ring").wait(),
                       lambda: c.allreduce_avg(np.ones(32, np.float32), fresh)):
        start = calls._arrived
        res = [None, None]
        with calls.turn:
            ts = [threading.Thread(target=lambda k=k: res.__setitem__(k, outcome(start_call))) for k in range(2)]
            for t in ts:
                t.start()
            _wait_for(lambda: calls._arrived == start + 2, "both threads to arrive")
        for t in ts:
            t.join(60)
        for rank, rr in enumerate(fresh.allgather([(k, t[:120]) for k, t in res])):
            assert all(k == "ValueError" and "another thread" in t for k, t in rr), (rank, rr)
    assert_usable(fresh)


# --------------------------------------------------------------------------- float16 in float32


F16_ALGS = ["ring", "tree", "hier", "auto", "native"]


@pytest.mark.parametrize("algorithm", F16_ALGS)
@pytest.mark.parametrize("n", [10, 1001, BIG])
def test_float16_avg_does_not_overflow(comm, algorithm, n):
    """avg of values near float16's limit (60000 - 100 r): the float32 sum fits, as native's does."""
    r, p = comm.Get_rank(), comm.Get_size()
    x = np.full(n, 60000 - 100 * r, dtype=np.float16)
    allreduce(x, comm, op="avg", algorithm=algorithm)
    want = np.float16(np.mean([np.float32(np.float16(60000 - 100 * k)) for k in range(p)]))
    assert np.isfinite(x).all(), f"{algorithm}: float16 avg overflowed"
    ref = allreduce(np.full(n, 60000 - 100 * r, dtype=np.float16), comm, op="avg", algorithm="native")
    np.testing.assert_array_equal(x, ref)
    np.testing.assert_allclose(x.astype(np.float64), float(want), rtol=1e-3)
    assert len(set(comm.allgather(x.tobytes()))) == 1


@pytest.mark.parametrize("algorithm", F16_ALGS)
def test_float16_sum_and_prod_round_once_like_native(comm, algorithm):
    r, p = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(7 + r)
    for op, x in (("sum", (rng.standard_normal(3001) * 2000).astype(np.float16)),
                  ("prod", rng.uniform(0.5, 300, 1001).astype(np.float16)),
                  ("max", (rng.standard_normal(301) * 1e4).astype(np.float16))):
        got = allreduce(x.copy(), comm, op=op, algorithm=algorithm)
        ref = allreduce(x.copy(), comm, op=op, algorithm="native")
        exact = {"sum": np.sum, "prod": np.prod, "max": np.max}[op](
            np.stack(comm.allgather(x)).astype(np.float64), axis=0)
        with np.errstate(over="ignore"):
            np.testing.assert_allclose(got.astype(np.float64), np.float16(exact).astype(np.float64),
                                       rtol=2e-3, atol=1, err_msg=f"{algorithm} {op}")
        np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), rtol=2e-3, atol=1,
                                   err_msg=f"{algorithm} {op} vs native")
        assert len(set(comm.allgather(got.tobytes()))) == 1, f"{algorithm} {op}: ranks differ"


@pytest.mark.parametrize("algorithm", ["ring", "tree", "hier", "native"])
def test_float16_iallreduce_accumulates_in_float32(comm, algorithm):
    r, p = comm.Get_rank(), comm.Get_size()
    x = np.full(777, 60000 - 100 * r, dtype=np.float16)
    iallreduce(x, comm, op="avg", algorithm=algorithm).wait()
    ref = allreduce(np.full(777, 60000 - 100 * r, dtype=np.float16), comm, op="avg", algorithm="native")
    np.testing.assert_array_equal(x, ref)
