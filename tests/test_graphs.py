"""Graph data sets and the MPNN (issue 19): format, make/import/check, the packing reader, the model's
gradients (finite differences in float64, every tensor), its layout, torch equivalence (when torch is
installed), N ranks x b graphs = 1 rank x N*b graphs, and short 2-rank jobs (buckets, ps, baseline).

Every data set is made by the CLI or the functions here, small (a few hundred graphs).
"""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import MPIRUN
from mpitrain import config, models, sync
from mpitrain.data import GraphSet, check_dataset, import_graphs, make_graphs, open_dataset
from mpitrain.data.graph_make import one_graph, synthetic_graphs
from mpitrain.data.spec import DataSpec
from mpitrain.models import MPNN, GraphMLP
from mpitrain.models.graphops import Segments, add_at_sum
from mpitrain.optim import LRSchedule, make_optimizer
from mpitrain.runtime import UserError


def _set(tmp_path, name="g", graphs=120, shards=3, nodes=(6, 12), seed=0):
    out = tmp_path / name
    make_graphs(out, graphs=graphs, test_graphs=30, nodes=nodes, seed=seed, shards=shards)
    return out


def _edge_attr_batch(seed=0, graphs=5, fe=3):
    g = synthetic_graphs(seed, 0, graphs, (5, 9))
    x, e, _, ptr, y = g.pack(np.arange(graphs))
    ea = np.random.default_rng(seed).standard_normal((len(e), fe))
    return x.astype(np.float64), e, ea, ptr, y


# ============================================================================ data


def test_make_is_seeded_independent_of_shards_and_label_follows_the_rule(tmp_path):
    a, b = _set(tmp_path, "a", shards=2), _set(tmp_path, "b", shards=5)
    ra, rb = open_dataset(a, batch_size=4), open_dataset(b, batch_size=4)
    for k in ("x", "edges", "node_ptr", "edge_ptr", "y"):
        assert np.array_equal(getattr(ra.local_graphs(), k), getattr(rb.local_graphs(), k)), k
    g = ra.local_graphs()
    red = g.x[:, 0] > 0.5
    for i in range(len(g)):
        e = g.edges[g.edge_ptr[i]:g.edge_ptr[i + 1]] + g.node_ptr[i]
        assert (np.diff(e[:, 1]) >= 0).all(), "edges sorted by receiver"
        same = (red[e[:, 0]] == red[e[:, 1]]).sum() // 2
        assert g.y[i] == int(2 * same > len(e) // 2), i
        nr = red[g.node_ptr[i]:g.node_ptr[i + 1]].sum()
        assert abs(2 * nr - (g.node_ptr[i + 1] - g.node_ptr[i])) <= 1, "colours balanced"
    counts = np.bincount(g.y, minlength=2)
    assert counts.min() > 0.3 * len(g), counts
    m = json.loads((a / "manifest.json").read_text())
    assert m["kind"] == "graphs" and m["features"] == 4 and m["classes"] == 2 and m["train_rows"] == 120
    assert ra.spec == DataSpec("graphs", 4, 2, 0)


def test_mean_node_features_carry_no_label():
    g = synthetic_graphs(0, 0, 400, (10, 30))
    means = np.add.reduceat(g.x, g.node_ptr[:-1], axis=0) / np.diff(g.node_ptr)[:, None]
    for c in (0, 1):
        mc = means[g.y == c].mean(axis=0)
        assert abs(mc[0] - 0.5) < 0.02 and abs(mc[2]) < 0.1, (c, mc)


@pytest.mark.parametrize("how,fragment", [
    ("edge", "graph 3: edge 0"), ("ptr", "graph 1: node_ptr is not monotone"),
    ("size", "sizes disagree"), ("label", "graph 2: label 7 out of range"), ("flip", "checksum mismatch")])
def test_check_and_open_name_the_shard_and_graph(tmp_path, how, fragment):
    d = _set(tmp_path, shards=2)
    f0 = d / "train-00000.h5"

    def damage(f):
        if how == "edge":
            e = f["edges"][...]
            e[f["edge_ptr"][3]] = [0, 99]
            f["edges"][...] = e
        elif how == "ptr":
            p = f["node_ptr"][...]
            p[2] = p[1] - 1
            f["node_ptr"][...] = p
        elif how == "size":
            p = f["node_ptr"][...]
            p[-1] += 1
            f["node_ptr"][...] = p
        elif how == "label":
            y = f["y"][...]
            y[2] = 7
            f["y"][...] = y
        else:
            x = f["x"][...]
            x[0, 2] += 1
            f["x"][...] = x

    with h5py.File(f0, "r+") as f:
        damage(f)
    rep = check_dataset(d)
    assert not rep.ok and len(rep.problems) == 1, rep.format()
    assert "train-00000.h5" in rep.problems[0] and fragment in rep.problems[0], rep.problems
    with pytest.raises(UserError, match="train-00000.h5") as e:
        open_dataset(d, batch_size=4)
    assert fragment in str(e.value)


def _cli(*argv):
    import argparse

    from mpitrain.data.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_make_check_import(tmp_path, capsys):
    assert _cli("make", "graphs", "--out", str(tmp_path / "c"), "--graphs", "40", "--nodes", "4:6",
                "--shards", "2") == 0
    assert "40 train graphs" in capsys.readouterr().out
    assert _cli("check", str(tmp_path / "c")) == 0
    assert _cli("make", "graphs", "--out", str(tmp_path / "bad"), "--nodes", "9:3") == 1
    assert "--nodes" in capsys.readouterr().err
    g = synthetic_graphs(1, 0, 30, (4, 7))  # npz with the same arrays -> import (no shuffle) -> same graphs
    ea = np.arange(len(g.edges) * 2, dtype=np.float32).reshape(-1, 2)
    np.savez(tmp_path / "g.npz", x=g.x, edges=g.edges, edge_attr=ea, node_ptr=g.node_ptr, edge_ptr=g.edge_ptr, y=g.y)
    assert _cli("import", str(tmp_path / "g.npz"), "--out", str(tmp_path / "i"), "--no-shuffle", "--shards", "2",
                "--test-fraction", "0.2") == 0
    assert "2 edge features" in capsys.readouterr().out
    r = open_dataset(tmp_path / "i", batch_size=2)
    assert r.spec.edge_features == 2 and len(r.local_graphs()) == 24 and len(r.test_graphs()) == 6
    t = r.local_graphs()
    assert np.array_equal(t.x, g.subset(6, 30).x) and np.array_equal(t.edges, g.subset(6, 30).edges)
    assert np.array_equal(t.edge_attr, ea[g.edge_ptr[6]:])
    assert _cli("import", str(tmp_path / "g.npz"), "--out", str(tmp_path / "s"), "--shards", "2") == 0
    sh = open_dataset(tmp_path / "s", batch_size=2)
    both = GraphSet.concat([sh.local_graphs(), sh.test_graphs()])
    key = lambda gs: sorted(gs.x[gs.node_ptr[i]:gs.node_ptr[i + 1]].tobytes() + gs.edges[  # noqa: E731
        gs.edge_ptr[i]:gs.edge_ptr[i + 1]].tobytes() for i in range(len(gs)))
    assert sh.rows_local == 24 and key(both) == key(g), "a shuffled import holds the same graphs"
    h = synthetic_graphs(2, 0, 5, (4, 7))
    np.savez(tmp_path / "t.npz", x=g.x, edges=g.edges, node_ptr=g.node_ptr, edge_ptr=g.edge_ptr, y=g.y,
             x_test=h.x, edges_test=h.edges, node_ptr_test=h.node_ptr, edge_ptr_test=h.edge_ptr, y_test=h.y)
    assert _cli("import", str(tmp_path / "t.npz"), "--out", str(tmp_path / "t"), "--shards", "3") == 0
    tt = open_dataset(tmp_path / "t", batch_size=2)
    assert tt.rows_local == 30 and np.array_equal(tt.test_graphs().x, h.x), "the *_test arrays are the test set"
    np.savez(tmp_path / "bad.npz", x=g.x, edges=g.edges + 50, node_ptr=g.node_ptr, edge_ptr=g.edge_ptr, y=g.y)
    assert _cli("import", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "j")) == 1
    err = capsys.readouterr().err
    assert "out of range" in err and "graph 0" in err and "Traceback" not in err, err


@pytest.mark.parametrize("block,window", [(1024, 4), (7, 2)])
def test_reader_packs_covers_shuffles_and_resumes(tmp_path, block, window):
    d = _set(tmp_path, graphs=120, shards=3)
    r = open_dataset(d, batch_size=8, seed=5, block_graphs=block, window_blocks=window)
    assert r.steps_per_epoch == 15
    ep0 = list(r.batches(0))
    seen = []
    for x, e, ea, ptr, y in ep0:
        assert len(y) == 8 and ptr[0] == 0 and ptr[-1] == len(x) and ea.shape == (len(e), 0)
        owner = np.searchsorted(ptr[1:], e, side="right")
        assert (owner[:, 0] == owner[:, 1]).all(), "edges stay inside their graph"
        assert (np.diff(e[:, 1]) >= 0).all(), "receivers sorted in the packed batch"
        seen += [x[a:b].tobytes() for a, b in zip(ptr[:-1], ptr[1:])]
    assert len(set(seen)) == 120, "every training graph once per epoch"
    again = list(open_dataset(d, batch_size=8, seed=5, block_graphs=block, window_blocks=window).batches(0, start=6))
    for a, b in zip(ep0[6:], again):
        assert all(np.array_equal(u, v) for u, v in zip(a, b)), "resume at step 6 = the uninterrupted tail"
    assert not np.array_equal(ep0[0][0], next(iter(r.batches(1)))[0]), "epochs differ"
    tb = list(r.test_batches(7))
    assert sum(len(b[-1]) for b in tb) == 30 and len(tb[-1][-1]) == 2


def test_ensure_builtin_graphs_and_model_data_mismatch(tmp_path):
    from mpitrain.data import ensure_dataset

    ensure_dataset(tmp_path / "b", "graphs", rows=40, shards=2)
    spec = open_dataset(tmp_path / "b", batch_size=4).spec
    with pytest.raises(UserError, match="'mlp' trains on features\\+labels data.*graphs"):
        models.build("mlp", vars(config.ModelConfig()), spec)
    with pytest.raises(UserError, match="'mpnn' trains on graphs"):
        models.build("mpnn", vars(config.ModelConfig()), DataSpec("features+labels", 64, 10))
    m = models.build("mpnn", vars(config.ModelConfig()), spec)
    assert isinstance(m, MPNN) and m.count(next(iter(open_dataset(tmp_path / "b", batch_size=4).batches(0)))) == 4
    for job in ("graph.toml", "graph-mlp.toml"):
        cfg = config.load(config.default_job_path().with_name(job))
        assert cfg.data.dataset == "graphs" and cfg.model.kind in ("mpnn", "graph-mlp")


# ============================================================================ model


def test_segments_match_add_at():
    rng = np.random.default_rng(0)
    for idx in (rng.integers(0, 9, 40), np.sort(rng.integers(0, 9, 40)), np.zeros(0, np.int64)):
        v = rng.standard_normal((len(idx), 3))
        for method in ("bincount", "reduceat"):
            np.testing.assert_allclose(Segments(idx, 12, method=method).sum(v), add_at_sum(v, idx, 12), atol=1e-12)


def _numeric(model, batch, h=1e-6):
    num = np.zeros_like(model.params)
    G = len(batch[-1])
    for i in range(model.params.size):
        old = model.params[i]
        model.params[i] = old + h
        lp = model.evaluate(batch)[0]
        model.params[i] = old - h
        lm = model.evaluate(batch)[0]
        model.params[i] = old
        num[i] = (lp - lm) / (2 * h * G)
    return num


@pytest.mark.parametrize("readout,activation,residual,fe", [
    ("sum", "relu", False, 0), ("mean", "tanh", True, 0), ("mean", "relu", True, 3), ("sum", "tanh", False, 2)])
def test_mpnn_gradient_matches_finite_differences(readout, activation, residual, fe):
    x, e, ea, ptr, y = _edge_attr_batch(graphs=4, fe=fe)
    m = MPNN(4, fe, 2, width=4, rounds=2, hidden=[3], readout=readout, residual=residual, activation=activation,
             dtype=np.float64, seed=7)
    m.params += np.random.default_rng(1).normal(0, 0.1, m.n_params)  # nonzero biases: no input sits on relu's kink
    batch = (x, e, ea, ptr, y)
    m.loss_and_grad(batch)
    num = _numeric(m, batch)
    for name, off, shape in m.tensors():
        sl = slice(off, off + int(np.prod(shape)))
        np.testing.assert_allclose(m.grads[sl], num[sl], rtol=1e-5, atol=1e-7, err_msg=name)
        if not name.endswith((".c", ".bm", ".b")):
            assert np.abs(m.grads[sl]).max() > 0, f"{name}: no gradient reaches it"


def test_mpnn_layout_and_ready_prefixes():
    x, e, ea, ptr, y = _edge_attr_batch(graphs=6, fe=2)
    m = MPNN(4, 2, 2, width=5, rounds=3, hidden=[4], dtype=np.float64, seed=1)
    names = [n for n, _, _ in m.tensors()]
    assert names[:4] == ["head1.W", "head1.b", "head0.W", "head0.b"] and names[4:10] == [
        "round2.U", "round2.V", "round2.c", "round2.M", "round2.Ew", "round2.bm"] and names[-1] == "round0.bm"
    assert [lo for lo, _ in m.segments()] == sorted(o for _, o, _ in m.tensors())
    seen = []
    m.loss_and_grad((x, e, ea, ptr, y), on_grad_ready=lambda hi: seen.append((hi, m.grads[:hi].copy())))
    his = [h for h, _ in seen]
    assert his == sorted(his) and his[-1] == m.n_params and len(his) == 2 + 2 * 3
    for hi, snap in seen:
        assert np.array_equal(snap, m.grads[:hi]), "a prefix reported ready changed later"
    a = MPNN(4, 2, 2, width=5, rounds=3, seed=4)
    assert np.array_equal(a.params, MPNN(4, 2, 2, width=5, rounds=3, seed=4).params)
    assert "MPNN 4 + 2 edge features -> 3 rounds x 5" in a.describe()


def test_mpnn_matches_torch():
    torch = pytest.importorskip("torch")
    x, e, ea, ptr, y = _edge_attr_batch(graphs=5, fe=2)
    m = MPNN(4, 2, 2, width=6, rounds=2, hidden=[5], readout="mean", residual=True, dtype=np.float64, seed=2)
    loss, _ = m.loss_and_grad((x, e, ea, ptr, y))
    P = {n: torch.tensor(m.p[n], requires_grad=True) for n, _, _ in m.tensors()}
    h, src, dst = torch.tensor(x), torch.tensor(e[:, 0]).long(), torch.tensor(e[:, 1]).long()
    eat, gid = torch.tensor(ea), torch.tensor(np.repeat(np.arange(5), np.diff(ptr)))
    for k in range(2):
        msg = torch.relu(h[src] @ P[f"round{k}.M"] + eat @ P[f"round{k}.Ew"] + P[f"round{k}.bm"])
        agg = torch.zeros(len(h), 6, dtype=torch.float64).index_add(0, dst, msg)
        a = torch.relu(h @ P[f"round{k}.U"] + agg @ P[f"round{k}.V"] + P[f"round{k}.c"])
        h = a + h if h.shape[1] == 6 else a
    r = torch.zeros(5, 6, dtype=torch.float64).index_add(0, gid, h) / torch.tensor(np.diff(ptr))[:, None]
    z = torch.relu(r @ P["head0.W"] + P["head0.b"]) @ P["head1.W"] + P["head1.b"]
    tl = torch.nn.functional.cross_entropy(z, torch.tensor(y))
    tl.backward()
    assert abs(tl.item() - loss) < 1e-10
    for n, off, shape in m.tensors():
        np.testing.assert_allclose(m.grads[off:off + int(np.prod(shape))], P[n].grad.numpy().ravel(), atol=1e-10)


def test_graph_mlp_pools_mean_node_features():
    x, e, ea, ptr, y = _edge_attr_batch(graphs=4, fe=0)
    gm = GraphMLP(4, [3], 2, dtype=np.float64, seed=0)
    xm, _ = gm.pool((x, e, ea, ptr, y))
    np.testing.assert_allclose(xm[1], x[ptr[1]:ptr[2]].mean(axis=0))
    from mpitrain.models import MLP

    assert gm.evaluate((x, e, ea, ptr, y))[0] == pytest.approx(MLP.evaluate(gm, (xm, y))[0])


# ============================================================================ distributed


def _trainer(comm, **comm_keys):
    from mpitrain.train import Loop, Run

    cfg = config.JobConfig()
    for k, v in comm_keys.items():
        setattr(cfg.comm, k, v)
    run = Run(cfg, comm)
    run.xp = np
    run.model = MPNN(4, 2, 2, width=6, rounds=2, hidden=[5], readout="mean", dtype=np.float64, seed=3)
    run.steps_per_epoch = run.total_steps = 1
    run.strategy = sync.select(cfg)(cfg, comm)
    run.strategy.bind(run)
    run.opt = make_optimizer("adam", run.model.params, lr=0.01)
    run.schedule = LRSchedule("constant", 0.01)
    return Loop(run)


@pytest.mark.mpi
@pytest.mark.parametrize("bucket_bytes", [0, 8 * 50])
def test_n_ranks_x_b_graphs_match_one_rank_x_nb(comm, bucket_bytes):
    r, p, b, steps = comm.Get_rank(), comm.Get_size(), 3, 4
    g = synthetic_graphs(11, 0, steps * p * b, (4, 9))
    g = GraphSet(g.x, g.edges, np.random.default_rng(0).standard_normal((len(g.edges), 2)), g.node_ptr,
                 g.edge_ptr, g.y)
    dist, ref = _trainer(comm, bucket_bytes=bucket_bytes), _trainer(comm)
    try:
        for k in range(steps):
            base = k * p * b
            dist.train_step(g.pack(np.arange(base + r * b, base + (r + 1) * b)))
            ref.run.model.loss_and_grad(g.pack(np.arange(base, base + p * b)))
            ref.run.opt.step(ref.run.model.grads, 0.01)
            dist.run.step = ref.run.step = k + 1
    finally:
        dist.run.strategy.close()
    np.testing.assert_allclose(dist.run.model.params, ref.run.model.params, rtol=1e-9, atol=1e-11)
    assert len(set(comm.allgather(dist.run.model.params.tobytes()))) == 1, "replicas differ"


@pytest.mark.mpi
def test_mpi_reader_partitions_graphs_and_fails_together(comm, shared_tmp):
    rank, size = comm.Get_rank(), comm.Get_size()
    d = shared_tmp / "mg"
    if rank == 0:
        make_graphs(d, graphs=60, test_graphs=10, nodes=(4, 6), shards=3, seed=2)
    comm.Barrier()
    r = open_dataset(d, comm, batch_size=2, seed=1)
    mine = {round(float(x[:, 2].sum()), 5) for b in r.batches(0) for x in [b[0]]}
    ids = comm.allgather(sorted(round(float(v), 5) for v in r.local_graphs().x[:, 2]))
    assert sum(len(i) for i in ids) == len({v for i in ids for v in i}), "ranks hold disjoint graphs"
    assert mine and r.steps_per_epoch == min(comm.allgather(r.rows_local)) // 2
    r.close()
    comm.Barrier()
    if rank == 0:
        with h5py.File(d / f"train-0000{size - 1 if size < 3 else 2}.h5", "r+") as f:
            y = f["y"][...]
            y[0] = 9
            f["y"][...] = y
    comm.Barrier()
    with pytest.raises(UserError, match="label 9 out of range"):
        open_dataset(d, comm, batch_size=2)
    comm.Barrier()


def _job(n, tmp_path, data, *sets, env=None, rc=0, args=()):
    args = ["train", "--set", f"data.path={data}", "--set", f"checkpoint.dir={tmp_path / 'ck'}", "--set",
            'model.kind="mpnn"', "--set", "model.width=16", "--set", 'model.readout="mean"', "--set",
            "model.hidden=[16]", "--set", 'train.optimizer="adam"', "--set", "train.lr=0.01", "--set",
            "train.batch_size=16", "--metrics-out", str(tmp_path / "m.json"), *args]
    for s in sets:
        args += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([MPIRUN, "-n", str(n), sys.executable, "-m", "mpitrain", *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == rc, p.stdout + p.stderr
    return (json.loads((tmp_path / "m.json").read_text()) if rc == 0 else None), p.stdout


@pytest.fixture(scope="module")
def small_graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp("graphs") / "g"
    make_graphs(d, graphs=800, test_graphs=200, nodes=(8, 16), shards=4, seed=0)
    return d


def test_two_rank_mpnn_with_buckets_trains_and_a_stopped_run_resumes_bitwise(tmp_path, small_graphs):
    """Buckets overlapped with backprop; SIGUSR1 at step 37 (mid epoch 2 of 25-step epochs): checkpoint,
    exit 75, --resume; the graph reader restarts the epoch at that step and the final parameters equal
    the uninterrupted run's, bit for bit."""
    from mpitrain import checkpoint

    common = ("comm.bucket_bytes=4096", "train.epochs=3", "checkpoint.every=1")
    m, out = _job(2, tmp_path / "a", small_graphs, *common)
    assert "MPNN" in out and m["strategy"] == "ring+buckets(4096)" and m["test_accuracy"] >= 0.85, m
    _, out = _job(2, tmp_path / "b", small_graphs, *common, env={"MPITRAIN_FAULT": "0:37:usr1"}, rc=75)
    assert "stopped by signal SIGUSR1" in out
    _, out = _job(2, tmp_path / "b", small_graphs, *common, args=["--resume"])
    assert "resumed from" in out
    a, b = checkpoint.latest(tmp_path / "a" / "ck"), checkpoint.latest(tmp_path / "b" / "ck")
    assert a["step"] == b["step"] == 75
    assert a["params"].tobytes() == b["params"].tobytes(), "the resumed MPNN run differs from the uninterrupted one"


def test_two_rank_mpnn_with_the_parameter_server_and_the_baseline(tmp_path, small_graphs):
    m, _ = _job(2, tmp_path / "p", small_graphs, 'comm.mode="ps"', "train.epochs=3", "checkpoint.every=0")
    assert m["strategy"].startswith("ps") and m["epochs"] == 3 and m["test_accuracy"] >= 0.75, m
    m, _ = _job(2, tmp_path / "m", small_graphs, 'model.kind="graph-mlp"', "train.epochs=3", "checkpoint.every=0")
    assert m["test_accuracy"] < 0.65, f"the mean-feature baseline should be near chance: {m}"


@pytest.mark.gpu
def test_mpnn_and_graph_mlp_on_cupy_match_numpy():
    from mpitrain import backend

    if not backend.gpu_available():
        assert os.environ.get("MPITRAIN_REQUIRE_GPU") != "1", backend.gpu_unavailable_reason()
        pytest.skip(f"needs a CUDA GPU: {backend.gpu_unavailable_reason()}")
    import cupy

    batch = _edge_attr_batch(graphs=6, fe=2)
    for make in (lambda xp: MPNN(4, 2, 2, width=6, rounds=2, hidden=[5], readout="mean", residual=True, xp=xp,
                                 dtype=np.float64, seed=2),
                 lambda xp: GraphMLP(4, [5], 2, xp=xp, dtype=np.float64, seed=2)):
        cpu, gpu = make(np), make(cupy)
        assert np.array_equal(cpu.params, cupy.asnumpy(gpu.params)), "host-drawn initial values agree"
        lc, cc = cpu.loss_and_grad(batch)
        lg, cg = gpu.loss_and_grad(tuple(cupy.asarray(a) for a in batch))
        assert abs(lc - lg) < 1e-10 and cc == cg
        np.testing.assert_allclose(cupy.asnumpy(gpu.grads), cpu.grads, rtol=1e-9, atol=1e-12)
