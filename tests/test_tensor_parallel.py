"""Tensor parallelism in the GPT (models/gpt_shard.py): tp = T equals tp = 1 to rounding.

Serial tests run T "ranks" as threads whose all-reduce is a fixed-order sum, so every layer can be
checked alone against the whole one; MPI tests use the project's all-reduce on the run's ranks;
end-to-end tests train under mpirun and compare the full-layout checkpoints."""

import math
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import run_mpitrain

from mpitrain import config
from mpitrain.models.gpt import GPT
from mpitrain.models.gpt_shard import TP, check, shard_index
from mpitrain.optim import make_optimizer
from mpitrain.parallel.layout import from_full, to_full
from mpitrain.train.control import GradPolicy

ROOT = Path(__file__).resolve().parents[1]
KW = dict(n_layer=2, n_head=4, n_embd=16, block_size=8, vocab_size=32, seed=1)
TOL = {np.float64: dict(rtol=1e-12, atol=1e-13), np.float32: dict(rtol=1e-5, atol=1e-6)}


class Threads:
    """T threads standing in for T tp ranks: ``allreduce(t)`` sums in rank order, the same bits everywhere."""

    def __init__(self, T):
        self.T, self.bar, self.slots = T, threading.Barrier(T), [None] * T

    def allreduce(self, t):
        def reduce(a):
            self.slots[t] = a.copy()
            self.bar.wait()
            total = self.slots[0].copy()
            for k in range(1, self.T):
                total += self.slots[k]
            self.bar.wait()
            a[...] = total
            return a
        return reduce

    def rows(self, t):
        def rows(N):  # the ring's partition: rank t holds chunk (t + 1) mod T (collectives.owned_chunk)
            c = (t + 1) % self.T
            return c * N // self.T, (c + 1) * N // self.T
        return rows

    def reduce_scatter(self, t):
        total = self.allreduce(t)
        return lambda a: total(a.copy())[slice(*self.rows(t)(a.shape[0]))].copy()

    def allgather(self, t):
        def gather(a_s, N):
            self.slots[t] = a_s.copy()
            self.bar.wait()
            out = np.empty((N, a_s.shape[1]), a_s.dtype)
            for k in range(self.T):
                out[slice(*self.rows(k)(N))] = self.slots[k]
            self.bar.wait()
            return out
        return gather

    def tp(self, t, sequence=False):
        return TP(self.T, t, self.allreduce(t), sequence, self.rows(t), self.reduce_scatter(t), self.allgather(t))

    def run(self, fn):
        out = [None] * self.T
        errors = []

        def body(t):
            try:
                out[t] = fn(t)
            except Exception as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                self.bar.abort()

        threads = [threading.Thread(target=body, args=(t,)) for t in range(self.T)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        return out


def _shards(T, dtype=np.float64, sequence=False, **kw):
    g = Threads(T)
    return g, [GPT(**{**KW, **kw}, dtype=dtype, tp=g.tp(t, sequence)) for t in range(T)]


@pytest.mark.parametrize("T", [2, 4])
def test_shards_start_from_the_whole_tensors_sliced(T):
    full = GPT(**KW, dtype=np.float64)
    _, parts = _shards(T)
    for name, _, shape in full.tensors():
        slices = [m.p[name] for m in parts]
        if shard_index(name, 16, T, 0) is None:
            assert all(np.array_equal(s, full.p[name]) for s in slices), name
        else:
            assert sum(s.size for s in slices) == full.p[name].size, name
    flat = to_full([(m.tensors(), m.params, t) for t, m in enumerate(parts)], full.tensors(), np.float64,
                   parts[0].shard_index)
    assert np.array_equal(flat, full.params), "the slices put back together are the whole model"
    for t, m in enumerate(parts):
        assert np.array_equal(from_full(full.params, full.tensors(), m.tensors(), m.shard), m.params)


@pytest.mark.parametrize("T", [2, 4])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_one_block_forward_and_backward_equal_the_whole_block(T, dtype):
    """Column layers (qkv, fc), row layers (proj) and the f/g pair, checked on one block alone."""
    full = GPT(**KW, dtype=dtype)
    g, parts = _shards(T, dtype)
    rng = np.random.default_rng(2)
    B, Tn, C = 3, 8, 16
    h = rng.standard_normal((B * Tn, C)).astype(dtype)
    dout = rng.standard_normal((B * Tn, C)).astype(dtype)
    ref, cache = full._block(1, h, B, Tn, True)
    dref = full._block_backward(1, dout.copy(), cache, B, Tn)

    def one(t):
        m = parts[t]
        y, c = m._block(1, h.copy(), B, Tn, True)
        return y, m._block_backward(1, dout.copy(), c, B, Tn)

    for t, (y, dh) in enumerate(g.run(one)):
        np.testing.assert_allclose(y, ref, **TOL[dtype])
        np.testing.assert_allclose(dh, dref, **TOL[dtype])
        for name, _, _ in parts[t].tensors():
            if name.startswith("h1."):
                np.testing.assert_allclose(parts[t].g[name], parts[t].shard(name, full.g[name]), **TOL[dtype],
                                           err_msg=name)


@pytest.mark.parametrize("T", [2, 4])
@pytest.mark.parametrize("tie,sequence", [(True, False), (False, False), (True, True)])
def test_whole_model_loss_and_every_gradient_match_tp1(T, tie, sequence):
    """Plain tensor parallelism and the sequence-parallel variant, against the whole model."""
    full = GPT(**KW, dtype=np.float64, tie_embeddings=tie)
    tok = np.random.default_rng(0).integers(0, 32, (3, 9))
    loss, _ = full.loss_and_grad((tok,))
    g, parts = _shards(T, np.float64, sequence, tie_embeddings=tie)
    losses = g.run(lambda t: parts[t].loss_and_grad((tok,))[0])
    assert all(abs(x - loss) <= 1e-12 * abs(loss) for x in losses)
    for m in parts:
        for name, _, _ in m.tensors():
            np.testing.assert_allclose(m.g[name], m.shard(name, full.g[name]), rtol=1e-11, atol=1e-14, err_msg=name)
    for name, _, _ in parts[0].tensors():  # replicated tensors: bitwise alike on every tp rank
        if parts[0].shard_index(name) is None:
            assert len({m.g[name].tobytes() for m in parts}) == 1, name


def test_sequence_parallel_blocks_keep_fewer_activations():
    """The caches backward needs: sequence parallelism keeps the LayerNorms' and residuals' rows split."""
    from mpitrain.parallel.pipeline import _nbytes

    tok = np.random.default_rng(0).integers(0, 32, (4, 9))
    sizes = {}
    for sequence in (False, True):
        g, parts = _shards(2, np.float64, sequence)
        out = g.run(lambda t: parts[t].stage_forward(tok[:, :-1], tok[:, 1:])[1])
        sizes[sequence] = _nbytes(out[0][1])
        losses = [o[2][0] for o in out]
        assert losses[0] is not None
    assert sizes[True] < sizes[False], sizes


def test_the_split_is_refused_where_it_cannot_be_made():
    assert check(4, 16, 3) and "n_head" in check(4, 16, 3)
    assert check(6, 6, 4) and "n_head" in check(6, 6, 4)
    assert check(8, 2, 8) is None and check(4, 16, 4) is None
    with pytest.raises(ValueError, match="n_head"):
        GPT(**KW, tp=TP(3, 0, None))


# --------------------------------------------------------------------------------------- MPI

@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tp_over_the_ranks_trains_like_one_rank(comm, dtype):
    """tp = ranks (1-4): three steps with clipping on real all-reduces end within 1e-5 (float32, SGD with
    momentum) or 1e-12 (float64, AdamW) of the whole model; replicated tensors bitwise alike on every rank.
    (Adam divides by sqrt(v): where a gradient element is near zero its update amplifies rounding, so
    float32 Adam runs agree to about 1e-3 of the step there, not 1e-5 of the value.)"""
    from mpitrain.collectives import allreduce
    from mpitrain.parallel.accumulate import Accumulator

    T = comm.Get_size()
    kw = dict(KW, n_head=T * 2, n_embd=T * 8)
    part = GPT(**kw, dtype=dtype, tp=TP(T, comm.Get_rank(), lambda a: allreduce(a, comm, op="sum")))
    full = GPT(**kw, dtype=dtype)
    pol = GradPolicy(config.TrainConfig(clip_norm=0.05), None)
    pol.bind(part, comm if T > 1 else None)
    ref_pol = GradPolicy(config.TrainConfig(clip_norm=0.05), None)
    ref_pol.bind(full)
    name = "adamw" if dtype == np.float64 else "sgd"
    opt = make_optimizer(name, part.params, lr=0.01, momentum=0.9, weight_decay=0.1,
                         decay_segments=part.decay_segments())
    ref = make_optimizer(name, full.params, lr=0.01, momentum=0.9, weight_decay=0.1,
                         decay_segments=full.decay_segments())
    rng = np.random.default_rng(5)
    for step in range(3):
        tok = rng.integers(0, 32, (2, 9))
        for m, p, o in ((part, pol, opt), (full, ref_pol, ref)):
            acc = Accumulator(m, 1)
            m.loss_and_grad((tok,))
            p.clip(m.grads)
            o.step(m.grads, 0.01)
            assert acc.A == 1
    tol = TOL[dtype]
    for name, _, _ in part.tensors():
        np.testing.assert_allclose(part.p[name], part.shard(name, full.p[name]), rtol=tol["rtol"],
                                   atol=tol["atol"], err_msg=name)
        if part.shard_index(name) is None:
            assert len(set(comm.allgather(part.p[name].tobytes()))) == 1, f"{name} drifted between tp ranks"
    assert math.isfinite(pol.grad_norm(part.grads))
    if T > 1:  # the run's replica check sees a replicated tensor that drifted on one tp rank
        from types import SimpleNamespace

        from mpitrain.runtime import UserError
        from mpitrain.train.session import Run

        run = SimpleNamespace(model=part, grid=SimpleNamespace(tp_comm=comm), step=3)
        Run._check_tp_replicated(run)
        if comm.Get_rank() == T - 1:
            part.p["lnf.b"][0] += 1e-7
        with pytest.raises(UserError, match="replicated over tp at step 3"):
            Run._check_tp_replicated(run)


# ------------------------------------------------------------------------------- end to end

_mpirun = run_mpitrain


def _job(corpus, ckpt, *extra):
    keys = [f"data.path={corpus}", f"checkpoint.dir={ckpt}", "model.n_layer=2", "model.n_head=4",
            "model.n_embd=16", "model.block_size=16", "train.batch_size=2", "train.accum_steps=2",
            "train.max_steps=4", "train.eval_every=2", "train.eval_batches=2", "checkpoint.every_steps=2",
            "train.schedule=\"constant\"", "train.warmup_steps=0", *extra]
    return ["train", "jobs/gpt-tiny.toml"] + [a for k in keys for a in ("--set", k)]


def _close(a, b, rtol=1e-5):
    from mpitrain import checkpoint

    ca, cb = checkpoint.latest(a), checkpoint.latest(b)
    assert ca["step"] == cb["step"]
    np.testing.assert_allclose(cb["params"], ca["params"], rtol=rtol, atol=1e-6)
    for k, v in ca["optimizer"].items():
        if isinstance(v, np.ndarray):
            np.testing.assert_allclose(cb["optimizer"][k], v, rtol=1e-3, atol=1e-7, err_msg=k)


def test_tp2_tp2_by_pp2_and_sequence_parallel_match_one_rank_and_resume_into_tp1(tmp_path, corpus):
    one = _mpirun(1, _job(corpus, tmp_path / "one"))
    assert one.returncode == 0, one.stdout + one.stderr
    two = _mpirun(2, _job(corpus, tmp_path / "tp2", "parallel.tp=2"))
    assert two.returncode == 0, two.stdout + two.stderr
    assert "dp 1 x pp 1 x tp 2" in two.stdout and "ranks dp 0: 0,1" in two.stdout
    _close(tmp_path / "one", tmp_path / "tp2")
    four = _mpirun(4, _job(corpus, tmp_path / "tp2pp2", "parallel.tp=2", "parallel.pp=2"), timeout=300)
    assert four.returncode == 0, four.stdout + four.stderr
    assert "stage 1 (blocks 1-1 + head): ranks dp 0: 2,3" in four.stdout
    _close(tmp_path / "one", tmp_path / "tp2pp2")
    seq = _mpirun(2, _job(corpus, tmp_path / "sp", "parallel.tp=2", "parallel.sequence=true"))
    assert seq.returncode == 0, seq.stdout + seq.stderr
    _close(tmp_path / "one", tmp_path / "sp")
    mix = tmp_path / "mix"  # tp = 2 for two steps, then tp = 1 to the end
    a = _mpirun(2, _job(corpus, mix, "parallel.tp=2", "train.max_steps=2"))
    b = _mpirun(1, [*_job(corpus, mix), "--resume"])
    assert a.returncode == 0 and b.returncode == 0 and "resumed from" in b.stdout, a.stdout + b.stdout + b.stderr
    _close(tmp_path / "one", mix)


def test_tp2_by_dp2_on_four_ranks_matches_dp2(tmp_path, corpus):
    dp = _mpirun(2, _job(corpus, tmp_path / "dp2", "train.max_steps=2"))
    assert dp.returncode == 0, dp.stdout + dp.stderr
    four = _mpirun(4, _job(corpus, tmp_path / "tp2dp2", "train.max_steps=2", "parallel.tp=2"), timeout=300)
    assert four.returncode == 0, four.stdout + four.stderr
    assert "dp 2 x pp 1 x tp 2" in four.stdout
    _close(tmp_path / "dp2", tmp_path / "tp2dp2")


def test_zero_over_dp_with_tp_is_bitwise_zero0(tmp_path, corpus):
    """tp = 2 x dp = 2 on 4 ranks: ZeRO-1 and ZeRO-3 over the dp group end bitwise where zero = 0 ends."""
    runs = {}
    for z in (0, 1, 3):
        r = _mpirun(4, _job(corpus, tmp_path / f"z{z}", "train.max_steps=2", "parallel.tp=2", f"train.zero={z}"),
                    timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        runs[z] = tmp_path / f"z{z}"
    from mpitrain import checkpoint

    ref = checkpoint.latest(runs[0])
    for z in (1, 3):
        got = checkpoint.latest(runs[z])
        assert got["params"].tobytes() == ref["params"].tobytes(), f"zero {z}"
        for k, v in ref["optimizer"].items():
            if isinstance(v, np.ndarray):
                assert v.tobytes() == got["optimizer"][k].tobytes(), (z, k)


@pytest.mark.parametrize("keys,message", [
    (["parallel.tp=2", "model.n_head=3", "model.n_embd=12"], "model.n_head = 3"),
    (["parallel.tp=4"], "does not divide the 2 rank(s)"),
    (["parallel.tp=2", "model.kind=\"mlp\"", "data.dataset=\"digits\""], "only the GPT"),
    (["parallel.sequence=true"], "needs parallel.tp > 1"),
    (["parallel.tp=2", "parallel.sequence=true", "model.block_size=15"], "model.block_size"),
])
def test_bad_tp_layouts_are_one_line(tmp_path, corpus, keys, message):
    p = _mpirun(2, _job(corpus, tmp_path / "bad", *keys), timeout=120)
    assert p.returncode != 0 and message in p.stderr, p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr


def test_print_config_layout_names_the_grid():
    from mpitrain.train.effective import layout

    cfg = config.load(ROOT / "jobs" / "gpt-tiny.toml", ["parallel.tp=2", "parallel.pp=2", "train.accum_steps=4"])
    assert "8 rank(s) = dp 2 x pp 2 x tp 2, 1f1b over 4 micro-batches" in layout(cfg, 8)
    assert "x 2 replica(s) = 64 windows" in layout(cfg, 8)
    assert "does not divide them" in layout(cfg, 6)
