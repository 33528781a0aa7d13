"""hier (reduce within hosts, ring across leaders, broadcast) against native, on real and emulated hosts."""

import hashlib

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.collectives import DTYPES, OPS, allreduce, hier, ring, state_for
from mpitrain.collectives.nonblocking import iallreduce
from mpitrain.collectives.partition import partition
from test_collectives import check_formula_and_native, rank_data

pytestmark = pytest.mark.mpi
# None: the real hosts (Split_type); the others emulate hosts with MPITRAIN_HOSTS
SPECS = [None, "block:2", "block:3", "cyclic:2"]


@pytest.fixture(autouse=True)
def small_segments(monkeypatch):
    """Tiny segments (hier uses ring's rule), so a few hundred elements cross many segments and slots."""
    monkeypatch.setattr(ring, "SEGMENT_BYTES", 24)


@pytest.fixture
def hosts(comm, monkeypatch):
    """``hosts(spec)``: set MPITRAIN_HOSTS (None: unset) and make the next hier call read it again."""
    st = state_for(comm)

    def use(spec):
        if spec is None:
            monkeypatch.delenv(hier.ENV, raising=False)
        else:
            monkeypatch.setenv(hier.ENV, spec)
        hier.reset(st)
        return st

    use(None)
    yield use
    monkeypatch.delenv(hier.ENV, raising=False)
    hier.reset(st)  # later tests see the real hosts


def expected_hosts(spec, p):
    """The host of every rank for an emulated spec, computed here independently of hier.py."""
    kind, k = spec.split(":")
    k = int(k)
    if kind == "cyclic":
        return [r % k for r in range(p)]
    return [g for g, (lo, hi) in enumerate(partition(p, k)) for _ in range(lo, hi)]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_native(comm, hosts, spec, dtype):
    hosts(spec)
    check_formula_and_native(comm, "hier", dtype, label=f" {spec}")


@pytest.mark.parametrize("spec", SPECS)
def test_bitwise_identical_on_every_rank(comm, hosts, spec):
    hosts(spec)
    r = comm.Get_rank()
    for dtype in ("float16", "float32", "float64"):
        for n in (1, 3, 1001):
            x = np.random.default_rng(100 + r).standard_normal(n).astype(dtype)
            for op in ("sum", "avg", "prod"):
                out = allreduce(x.copy(), comm, op=op, algorithm="hier")
                digests = comm.allgather(hashlib.sha1(out.tobytes()).hexdigest())
                assert len(set(digests)) == 1, f"hier {spec} {op} {dtype} n={n}: ranks differ {digests}"


def test_large_multidimensional(comm, hosts, monkeypatch):
    monkeypatch.setattr(ring, "SEGMENT_BYTES", 64 * 1024)
    r, p = comm.Get_rank(), comm.Get_size()
    for spec in (None, "block:2"):
        hosts(spec)
        x = np.full((517, 1031), r + 1, dtype=np.float32)  # ~2 MiB, not divisible by p
        allreduce(x, comm, algorithm="hier")
        assert (x == p * (p + 1) / 2).all()


@pytest.mark.parametrize("spec", ["block:1", "block:2", "block:3", "block:7", "cyclic:2", "cyclic:3"])
def test_emulated_hosts(comm, hosts, spec):
    """The grouping follows MPITRAIN_HOSTS, every rank agrees, each host's leader is its lowest rank."""
    st = hosts(spec)
    r, p = comm.Get_rank(), comm.Get_size()
    topo = hier.topology(st)
    want = expected_hosts(spec, p)
    mine = [q for q in range(p) if want[q] == want[r]]
    assert topo.lsize == len(mine) and topo.lrank == mine.index(r)
    assert topo.leader == (r == mine[0]) and (topo.leaders is not None) == topo.leader
    assert MPI.Comm.Compare(topo.local, st.comm) != MPI.IDENT  # its own communicator, never the caller's
    assert topo.local.allgather(r) == mine
    assert topo.sizes == [want.count(h) for h in dict.fromkeys(want)]  # in the leaders' (rank) order
    assert topo.hosts == len(set(want))
    assert hier.topology(st) is topo  # cached on the state
    if topo.leader:
        assert topo.leaders.comm.allgather(r) == sorted({min(q for q in range(p) if want[q] == h)
                                                         for h in want})


def test_real_hosts(comm, hosts):
    """Unset: the hosts are the shared-memory domains MPI reports (one, on a single machine)."""
    st = hosts(None)
    topo = hier.topology(st)
    shm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        assert topo.lsize == shm.Get_size() and topo.lrank == shm.Get_rank()
        assert sum(topo.sizes) == comm.Get_size()
    finally:
        shm.Free()


@pytest.mark.mpi(min_size=3)
def test_unequal_hosts(comm, hosts):
    """3 ranks in block:2 -> hosts of 2 and 1 (and with more ranks, other uneven splits)."""
    r, p = comm.Get_rank(), comm.Get_size()
    spec = "block:2" if p % 2 else "block:3"
    st = hosts(spec)
    sizes = hier.topology(st).sizes
    assert len(set(sizes)) > 1, sizes
    for op in OPS:
        for dtype in ("float32", "int64"):
            x = rank_data(1001, r, dtype, op)
            ref = allreduce(x.copy(), comm, op=op, algorithm="native")
            allreduce(x, comm, op=op, algorithm="hier")
            if dtype == "int64":
                np.testing.assert_array_equal(x, ref, err_msg=f"{spec} {sizes} {op}")
            else:
                np.testing.assert_allclose(x, ref, rtol=1e-6, err_msg=f"{spec} {sizes} {op}")


@pytest.mark.parametrize("bad", ["block", "block:", "block:0", "block:-2", "block:x", "ring:2", "2", "cyclic:1.5"])
def test_bad_hosts_value_raises_everywhere(comm, hosts, bad):
    st = hosts(bad)
    with pytest.raises(ValueError, match=f"MPITRAIN_HOSTS={bad!r}"):
        hier.topology(st)
    if comm.Get_size() > 1:  # the real path (size 1 never needs the hosts)
        with pytest.raises(ValueError, match="MPITRAIN_HOSTS.*block:K"):
            allreduce(np.ones(5), comm, algorithm="hier")
    with pytest.raises(hier.HostsError):  # also a UserError: the CLI reports it without a traceback
        hier.topology(st)
    hosts("block:2")
    x = np.ones(5)
    assert allreduce(x, comm, algorithm="hier") is x and (x == comm.Get_size()).all()  # usable again


@pytest.mark.mpi(min_size=2)
def test_ranks_disagreeing_on_hosts_all_raise(comm, hosts):
    st = hosts("block:2" if comm.Get_rank() == 0 else "block:1")
    with pytest.raises(ValueError, match="MPITRAIN_HOSTS differs between ranks"):
        allreduce(np.ones(5), comm, algorithm="hier")
    hosts("block:2")
    assert allreduce(np.ones(3), comm, algorithm="hier")[0] == comm.Get_size()
    assert st.hier is not None


@pytest.mark.parametrize("spec", [None, "block:2"])
def test_nonblocking_many_in_flight(comm, hosts, spec):
    hosts(spec)
    r = comm.Get_rank()
    bufs = [np.arange(n, dtype=np.float64) * (r + 1) + k for k, n in enumerate((1, 7, 100, 1001, 0, 33))]
    want = [allreduce(b.copy(), comm, op="avg", algorithm="native") for b in bufs]
    handles = [iallreduce(b, comm, op="avg", algorithm="hier") for b in bufs]
    while not all([h.progress() for h in handles[::-1]]):  # every one, newest first
        pass
    for b, w, h in zip(bufs, want, handles):
        assert h.wait() is b
        np.testing.assert_allclose(b, w, rtol=1e-12)
    digests = comm.allgather(hashlib.sha1(b"".join(b.tobytes() for b in bufs)).hexdigest())
    assert len(set(digests)) == 1


@pytest.mark.parametrize("spec", [None, "block:2"])
def test_callers_messages_are_untouched(comm, hosts, spec):
    """A caller's pending wildcard receive and messages in flight with the library's tags."""
    hosts(spec)
    r, p = comm.Get_rank(), comm.Get_size()
    right, left = (r + 1) % p, (r - 1) % p
    got = np.zeros(5, dtype=np.int64)
    wild = comm.Irecv(got, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
    mine = np.arange(5, dtype=np.int64) + 1000 * r
    inflight = [comm.Isend(mine, dest=right, tag=t) for t in (0, 12, 14)]
    x = np.arange(1001, dtype=np.float64) + r
    allreduce(x, comm, algorithm="hier")
    np.testing.assert_array_equal(x, p * np.arange(1001) + p * (p - 1) / 2)
    st = MPI.Status()
    wild.Wait(st)
    assert st.Get_source() == left
    for t in (12, 14):
        buf = np.zeros(5, dtype=np.int64)
        comm.Recv(buf, source=left, tag=t)
        np.testing.assert_array_equal(buf, np.arange(5) + 1000 * left)
    MPI.Request.Waitall(inflight)
    np.testing.assert_array_equal(got, np.arange(5) + 1000 * left)


def test_subcommunicators(comm, hosts):
    """Each communicator gets its own hosts (made from its own ranks)."""
    hosts("block:2")
    r = comm.Get_rank()
    sub = comm.Split(r % 2, r)
    try:
        q = sub.Get_size()
        x = np.arange(13, dtype=np.int64) * (sub.Get_rank() + 1)
        allreduce(x, sub, algorithm="hier")
        np.testing.assert_array_equal(x, np.arange(13) * q * (q + 1) // 2)
        topo = state_for(sub).hier
        assert topo is None if q == 1 else sum(topo.sizes) == q
    finally:
        hier.reset(state_for(sub))
        sub.Free()
