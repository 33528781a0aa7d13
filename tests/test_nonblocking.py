"""iallreduce: several operations in flight, progressed in between, equal to the blocking result."""

import numpy as np
import pytest

from mpitrain.collectives import allreduce, ring, state_for
from mpitrain.collectives.nonblocking import CommThread, iallreduce

pytestmark = pytest.mark.mpi


@pytest.fixture(autouse=True)
def small_segments(monkeypatch):
    monkeypatch.setattr(ring, "SEGMENT_BYTES", 40)


def data(n, r, k, dtype=np.float32):
    return (np.random.default_rng(1000 * r + k).standard_normal(n) * 10).astype(dtype)


@pytest.mark.parametrize("algorithm", ["ring", "tree", "native", "auto"])
def test_many_in_flight_equal_blocking(comm, algorithm):
    r = comm.Get_rank()
    sizes = [0, 1, 5, 103, 1001, 4097]
    bufs = [data(n, r, k) for k, n in enumerate(sizes)]
    want = [allreduce(b.copy(), comm, op="avg", algorithm=algorithm) for b in bufs]
    handles = [iallreduce(b, comm, op="avg", algorithm=algorithm) for b in bufs]
    spins = 0
    while not all(h.progress() for h in handles):
        spins += 1
        np.dot(np.ones(200), np.ones(200))  # "compute" between progress calls
    for b, w, h in zip(bufs, want, handles):
        assert h.wait() is b
        if algorithm in ("native", "auto"):  # blocking auto fuses small ones into its check
            np.testing.assert_allclose(b, w, rtol=1e-5, atol=1e-6)
        else:
            assert b.tobytes() == w.tobytes(), "same chunks, same reduction order as the blocking call"
    assert len(set(comm.allgather(b"".join(b.tobytes() for b in bufs)))) == 1


@pytest.mark.mpi(min_size=2)
def test_mismatch_raises_on_every_rank(comm):
    n = 10 if comm.Get_rank() else 11
    with pytest.raises(ValueError, match="disagree"):
        iallreduce(np.ones(n), comm, algorithm="ring")
    assert allreduce(np.ones(2), comm)[0] == comm.Get_size()  # still usable


def test_comm_thread_drives_handles(comm):
    r, p = comm.Get_rank(), comm.Get_size()
    t = CommThread()
    try:
        bufs = [np.full(n, r + 1.0) for n in (7, 300, 2049)]
        for b in bufs:
            t.submit(iallreduce(b, comm, algorithm="ring"))
        t.drain()
        for b in bufs:
            assert (b == p * (p + 1) / 2).all()
    finally:
        t.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["ring", "tree"])
def test_scratch_is_reused_across_steps(comm, algorithm):
    """Buckets of the same sizes every step: the second step allocates no new scratch."""
    st = state_for(comm)
    bufs = [np.ones(n) for n in (300, 1001)]

    def one_step():
        for h in [iallreduce(b, comm, algorithm=algorithm) for b in bufs]:
            h.wait()
        return {k: sorted(id(a) for a in v) for k, v in st._pool.items()}

    first = one_step()
    assert sum(len(v) for v in first.values()) >= 2  # both handles gave theirs back
    assert one_step() == first  # the same arrays, borrowed and returned again
    for b in bufs:
        assert (b == comm.Get_size() ** 2).all()
