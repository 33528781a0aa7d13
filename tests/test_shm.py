"""algorithm="shm" and alloc_shared: against native, bitwise on every rank, the hazards of reuse."""

import gc
import hashlib

import numpy as np
import pytest
from mpi4py import MPI

import mpitrain
from mpitrain.collectives import DTYPES, OPS, allreduce, allreduce_init, shm, state_for
from mpitrain.collectives.nonblocking import iallreduce

MPI_TEST = pytest.mark.mpi
SIZES = [0, 1, 2, 3, 5, 1001]


@pytest.fixture
def tiny_tiles(monkeypatch):
    monkeypatch.setattr(shm, "TILE_BYTES", 64)  # many tiles per slice even at 1001 elements


def rank_data(n, r, dtype, op):
    i = np.arange(n)
    if op == "prod":
        return ((i + r) % 2 + 1).astype(dtype)
    return ((i * 7 + r * 3) % 11 - 3 + r).astype(dtype)


def same_everywhere(comm, arr) -> bool:
    return len(set(comm.allgather(hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()))) == 1


def assert_matches_native(comm, buf, n, r, dtype, op, where):
    ref = allreduce(rank_data(n, r, dtype, op), comm, op=op, algorithm="native")
    if np.dtype(dtype).kind == "f":
        tol = 1e-3 if dtype == "float16" else 1e-6
        np.testing.assert_allclose(buf.astype(np.float64), ref.astype(np.float64), rtol=tol, atol=tol, err_msg=where)
    else:
        np.testing.assert_array_equal(buf, ref, err_msg=where)
    assert same_everywhere(comm, buf), f"ranks differ: {where}"


@MPI_TEST
def test_alloc_shared_is_seen_by_node_peers(comm):
    r = comm.Get_rank()
    a = mpitrain.alloc_shared(100, np.float64, comm)
    assert isinstance(a, np.ndarray) and a.shape == (100,) and a.dtype == np.float64 and (a == 0).all()
    a[...] = r + 1
    nd = shm.node(state_for(comm))
    if nd.size == 1:
        assert not shm.is_shared(a, comm)  # plain memory
        return
    assert shm.is_shared(a, comm) and shm.is_shared(a[10:20], comm)
    w, off = nd.find(a)
    comm.Barrier()
    w.win.Sync()
    for q in range(nd.size):
        peer = w.segs[q][off:off + a.nbytes].view(np.float64)
        assert (peer == q + 1).all(), f"rank {r} sees rank {q}'s buffer as {peer[:3]}"
    comm.Barrier()  # nobody writes before everyone read
    mpitrain.free_shared(a, comm)


@pytest.mark.parametrize("dtype", DTYPES)
@MPI_TEST
def test_zero_copy_and_scratch_against_native(comm, dtype, tiny_tiles):
    r, p = comm.Get_rank(), comm.Get_size()
    whole = mpitrain.alloc_shared(max(SIZES) + 4, dtype, comm)
    for op in OPS:
        for n in SIZES + [p - 1]:
            a = whole[:n + 4]
            view = a[2:2 + n]  # a view at an offset: still zero-copy
            view[...] = rank_data(n, r, dtype, op)
            a[:2] = 99
            a[2 + n:] = 99
            assert allreduce(view, comm, op=op, algorithm="shm") is view
            assert_matches_native(comm, view, n, r, dtype, op, f"zero-copy {op} {dtype} n={n} p={p}")
            assert (a[:2] == 99).all() and (a[2 + n:] == 99).all(), "wrote outside the buffer"
            x = rank_data(n, r, dtype, op)  # plain memory: the scratch window
            allreduce(x, comm, op=op, algorithm="shm")
            assert_matches_native(comm, x, n, r, dtype, op, f"scratch {op} {dtype} n={n} p={p}")


@MPI_TEST
def test_large_odd_size(comm):
    r = comm.Get_rank()
    n = 1000003
    a = mpitrain.alloc_shared(n, np.float32, comm)
    a[...] = rank_data(n, r, np.float32, "sum")
    allreduce(a, comm, algorithm="shm")
    assert_matches_native(comm, a, n, r, np.float32, "sum", "large zero-copy")
    x = rank_data(n, r, np.float64, "avg")
    allreduce(x, comm, op="avg", algorithm="shm")
    assert_matches_native(comm, x, n, r, np.float64, "avg", "large scratch")


@MPI_TEST
def test_back_to_back_calls_rewriting_the_buffer_at_once(comm, tiny_tiles, monkeypatch):
    """Each rank writes its next input the moment a call returns, while slower ranks may still be
    finishing theirs: a rank must never read or write a peer's buffer outside the call's syncs."""
    r, p = comm.Get_rank(), comm.Get_size()
    monkeypatch.setattr(shm, "TILE_BYTES", 4096)
    n = 50001
    a = mpitrain.alloc_shared(n, np.int64, comm)
    x = np.empty(n, dtype=np.int64)
    i = np.arange(n, dtype=np.int64)
    for k in range(30):
        a[...] = i * (r + 1) + k * 1000 + r
        x[...] = a
        if r == k % p:
            sum(range(20000))  # one rank late each round
        allreduce(a, comm, algorithm="shm")
        allreduce(x, comm, op="max", algorithm="shm")
        want = i * (p * (p + 1) // 2) + p * k * 1000 + p * (p - 1) // 2
        assert (a == want).all(), f"round {k}: zero-copy result corrupted"
        assert (x == i * p + k * 1000 + p - 1).all(), f"round {k}: scratch result corrupted"


@MPI_TEST
def test_mixed_shared_and_plain_buffers(comm):
    """Some ranks pass alloc_shared memory, others plain: every rank takes the scratch path."""
    r = comm.Get_rank()
    a = mpitrain.alloc_shared(1001, np.float64, comm)
    b = mpitrain.alloc_shared(1001, np.float64, comm)
    for buf in (a if r % 2 else np.zeros(1001), a if r == 0 else b, a[1:] if r == 0 else a[:-1]):
        n = buf.size
        buf[...] = rank_data(n, r, np.float64, "sum")
        allreduce(buf, comm, algorithm="shm")
        assert_matches_native(comm, buf, n, r, np.float64, "sum", "mixed")


@pytest.mark.mpi(min_size=2)
def test_mismatched_algorithm_raises_on_every_rank(comm):
    r = comm.Get_rank()
    a = mpitrain.alloc_shared(10, np.float32, comm)
    with pytest.raises(ValueError, match="disagree"):
        allreduce(a, comm, algorithm="shm" if r == 0 else "ring")
    a[...] = 1
    assert allreduce(a, comm, algorithm="shm")[0] == comm.Get_size()


@MPI_TEST
def test_nonblocking_and_plans(comm):
    r = comm.Get_rank()
    a = mpitrain.alloc_shared(1001, np.float16, comm)
    a[...] = rank_data(1001, r, np.float16, "sum")
    h = iallreduce(a, comm, algorithm="shm")
    assert h.wait() is a
    assert_matches_native(comm, a, 1001, r, np.float16, "sum", "iallreduce")
    b = mpitrain.alloc_shared(777, np.float32, comm)
    with allreduce_init(b, comm, op="avg", algorithm="shm") as plan:
        for k in range(3):
            b[...] = rank_data(777, r, np.float32, "avg") + k
            plan.start()
            plan.wait()
            want = allreduce(rank_data(777, r, np.float32, "avg") + k, comm, op="avg", algorithm="native")
            np.testing.assert_allclose(b, want, rtol=1e-6)


@MPI_TEST
def test_collected_windows_are_freed_collectively(comm):
    nd = shm.node(state_for(comm))
    if nd.size == 1:
        pytest.skip("one rank on the node: plain memory")
    a = mpitrain.alloc_shared(10, comm=comm)
    wid = nd.find(a)[0].id
    view = a[3:]
    del a
    gc.collect()
    mpitrain.alloc_shared(1, comm=comm)  # sweeps: the view still holds the memory
    assert wid in nd.windows
    view[...] = 1
    del view
    gc.collect()
    mpitrain.alloc_shared(1, comm=comm)
    assert wid not in nd.windows


@pytest.mark.mpi(min_size=2)
def test_free_shared_of_different_arrays_raises_everywhere(comm):
    r = comm.Get_rank()
    a = mpitrain.alloc_shared(4, comm=comm)
    b = mpitrain.alloc_shared(4, comm=comm)
    with pytest.raises(ValueError, match="different windows"):
        mpitrain.free_shared(a if r == 0 else b, comm)
    mpitrain.free_shared(a, comm)
    mpitrain.free_shared(b, comm)


@pytest.mark.mpi(min_size=2)
def test_ranks_on_several_nodes_raise_everywhere(comm, monkeypatch):
    """shm needs one node: emulated by a node of one rank each (the check runs on every rank alike)."""
    nd = shm.node(state_for(comm))
    monkeypatch.setattr(nd, "size", 1)
    with pytest.raises(ValueError, match="use algorithm='hier'"):
        allreduce(np.ones(5), comm, algorithm="shm")


def test_one_rank_gets_plain_memory_and_shm_works():
    """Serial: a node of one rank -- alloc_shared is plain NumPy memory, shm a no-op (avg too)."""
    a = mpitrain.alloc_shared(7, np.int32, MPI.COMM_SELF)
    assert type(a) is np.ndarray and a.dtype == np.int32 and (a == 0).all()
    assert not shm.is_shared(a, MPI.COMM_SELF)
    a[...] = np.arange(7)
    for op in OPS:
        allreduce(a, MPI.COMM_SELF, op=op, algorithm="shm")
    np.testing.assert_array_equal(a, np.arange(7))
    mpitrain.free_shared(a, MPI.COMM_SELF)  # a no-op for plain memory
    with pytest.raises(ValueError, match="non-negative"):
        mpitrain.alloc_shared(-1, comm=MPI.COMM_SELF)


# --------------------------------------------------------------------------- the cost model (serial)


def _model(nodes=1, shm_ab=(3e-6, 0.01e-9)):
    from mpitrain.perf.model import CostModel

    native = [[8, 3e-6], [1 << 20, 400e-6], [1 << 26, 40e-3]]
    return CostModel(ranks=2, host="h", nodes=nodes, alpha=2e-6, beta=0.1e-9, gamma=0.05e-9,
                     ring={"alpha": 20e-6, "beta": 0.2e-9}, tree={"alpha": 8e-6, "beta": 0.15e-9}, native=native,
                     shm=None if shm_ab is None else {"alpha": shm_ab[0], "beta": shm_ab[1]})


def test_shm_formula_and_fit():
    from mpitrain.perf import fit, formulas

    a, b, g, p = 3e-6, 0.05e-9, 0.04e-9, 2
    assert formulas.shm_time(1000, p, a, b, g) == pytest.approx(2 * a + 2000 * b + 500 * g)
    assert formulas.shm_time(1000, p, a, b, g, scratch=True) == pytest.approx(2 * a + 6000 * b + 500 * g)
    assert formulas.shm_time(1000, 1, a, b, g) == 0.0
    sizes = [1 << k for k in range(10, 26, 2)]
    d = fit.fit_algorithm("shm", sizes, [formulas.shm_time(n, p, a, b, g) for n in sizes], p, g)
    assert d["alpha"] == pytest.approx(a, rel=1e-3) and d["beta"] == pytest.approx(b, rel=1e-3)


def test_model_picks_shm_only_where_its_scratch_path_wins_and_on_one_node():
    from mpitrain.collectives.tuning import AutoTable
    from mpitrain.perf.model import CostModel

    m = _model()
    assert m.best(4 << 20) == "shm"  # scratch: 2·3 us + 6·4 MiB·0.01 ns/B + 2 MiB·0.05 ns/B < ring
    assert m.predict("shm-scratch", 1 << 20) > m.predict("shm", 1 << 20)
    assert CostModel.from_dict(m.to_dict()) == m
    table = AutoTable.from_dict(m.to_dict()["auto"])
    assert table.pick(4 << 20) == "shm"
    assert "shm" not in {a for _, a in AutoTable.from_dict(_model(nodes=2).to_dict()["auto"]).steps}
    assert "shm" not in {a for _, a in AutoTable.from_dict(_model(shm_ab=None).to_dict()["auto"]).steps}
    slow = _model(shm_ab=(3e-6, 10e-9))  # memory slower than the messages: never shm
    assert "shm" not in {a for _, a in AutoTable.from_dict(slow.to_dict()["auto"]).steps}


# --------------------------------------------------------------------------- training


@MPI_TEST
@pytest.mark.parametrize("bucket_bytes", [0, 8 * 40])
def test_training_on_shared_grads_matches_ring(comm, bucket_bytes):
    from test_train import _trainer

    from mpitrain import models
    from mpitrain.models import MLP

    r, p, b = comm.Get_rank(), comm.Get_size(), 4
    rng = np.random.default_rng(7)
    X, Y = rng.standard_normal((4, p * b, 12)), rng.integers(0, 5, size=(4, p * b))
    keys = {"bucket_bytes": bucket_bytes}
    ring, dist = _trainer(comm, "ring", comm_keys=keys), _trainer(comm, "shm", comm_keys=keys)
    with models.grads_allocator(dist.run.strategy.grads_allocator("numpy")):
        dist.run.model = MLP(12, [9, 7], 5, xp=np, dtype=np.float64, seed=3)
    dist.run.strategy.bind(dist.run)
    assert shm.is_shared(dist.run.model.grads, comm) == (shm.node(state_for(comm)).size > 1)
    try:
        for k in range(4):
            for t in (ring, dist):
                t.train_step((X[k, r * b:(r + 1) * b], Y[k, r * b:(r + 1) * b]))
                t.run.step = k + 1
    finally:
        ring.run.strategy.close()
        dist.run.strategy.close()
    np.testing.assert_allclose(dist.run.model.params, ring.run.model.params, rtol=1e-12, atol=1e-12)
    assert same_everywhere(comm, dist.run.model.params)


def test_a_training_run_with_shm_matches_ring(tmp_path):
    """End to end, 2 ranks: the trainer puts the gradients in a shared window; the losses match ring's."""
    import json
    import os
    import subprocess
    import sys

    from conftest import MPIRUN

    out = {}
    for alg in ("ring", "shm"):
        job = ["--set", f"data.path={tmp_path / 'digits'}", "--set", "data.dataset=digits", "--set", f"checkpoint.dir={tmp_path / alg}",
               "--set", "train.epochs=2", "--set", "model.hidden=[16]", "--set", f'comm.algorithm="{alg}"',
               "--metrics-out", str(tmp_path / f"{alg}.json")]
        res = subprocess.run([MPIRUN, "-n", "2", sys.executable, "-m", "mpitrain", "train", *job], cwd=tmp_path,
                             env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"sync={alg}" in res.stdout, res.stdout
        out[alg] = json.loads((tmp_path / f"{alg}.json").read_text())
    assert out["shm"]["test_loss"] == pytest.approx(out["ring"]["test_loss"], rel=1e-4)
    assert out["shm"]["test_accuracy"] == pytest.approx(out["ring"]["test_accuracy"], abs=0.01)


@MPI_TEST
def test_bench_times_shm_on_a_shared_buffer(comm):
    from mpitrain.bench.sweep import run_sweep

    rows = run_sweep(comm, [64, 4096, 100000], ("shm", "native"), iters=2, warmup=0, memcpy=False)
    assert {r["algorithm"] for r in rows} == {"shm", "native"}
    assert all(r["wrong"] == 0 for r in rows), rows


@MPI_TEST
@pytest.mark.parametrize("spec", [None, "block:2"])
def test_hier_goes_through_shared_memory_within_hosts(comm, monkeypatch, spec):
    from mpitrain.collectives import hier

    st = state_for(comm)
    if spec:
        monkeypatch.setenv(hier.ENV, spec)
    else:
        monkeypatch.delenv(hier.ENV, raising=False)
    hier.reset(st)
    try:
        r = comm.Get_rank()
        for op, dtype in (("sum", "float32"), ("avg", "float64"), ("max", "int64"), ("sum", "float16")):
            x = rank_data(1001, r, dtype, op)
            allreduce(x, comm, op=op, algorithm="hier")
            assert_matches_native(comm, x, 1001, r, dtype, op, f"hier {spec} {op} {dtype}")
        topo = hier.topology(st)
        assert (topo.node() is not None) == (topo.lsize > 1)
    finally:
        monkeypatch.delenv(hier.ENV, raising=False)
        hier.reset(st)


@MPI_TEST
def test_the_check_carries_the_first_sync_and_falls_back_alike(comm, monkeypatch):
    """Blocking shm folds its first sync into the agreement check; a rank that cannot (here: made
    not to) takes the plain path, and the others follow it -- same results, no hang."""
    import mpitrain.collectives as C

    r, p = comm.Get_rank(), comm.Get_size()
    a = mpitrain.alloc_shared(1001, np.float64, comm)
    plain, real = [], shm.allreduce_on
    for who in (None, 0, p - 1):
        monkeypatch.setattr(shm, "allreduce_on", lambda *a_, **k: (plain.append(1), real(*a_, **k)))
        if who == r:
            monkeypatch.setattr(shm, "checked", lambda *a_, **k: False)
        for buf in (a, np.zeros(1001)):
            plain.clear()
            buf[...] = rank_data(1001, r, np.float64, "sum")
            allreduce(buf, comm, algorithm="shm")
            assert_matches_native(comm, buf, 1001, r, np.float64, "sum", f"fallback by rank {who}")
            assert bool(plain) == (who is not None and p > 1), f"rank {who} fell back: everyone syncs plainly"
        monkeypatch.undo()
    monkeypatch.setattr(C, "FUSE_MAX_RANKS", 0)  # no room in the check's row: the plain path everywhere
    dup = comm.Dup()
    try:
        b = mpitrain.alloc_shared(77, np.int64, dup)
        b[...] = r + 1
        allreduce(b, dup, algorithm="shm")
        assert (b == p * (p + 1) // 2).all()
    finally:
        dup.Free()
