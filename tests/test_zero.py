"""ZeRO-1 (train.zero = 1, sync/zero.py): sharded optimizer state on the ring's two halves.

With the ring (norm clipping too: the canonical norm), zero=1 gives the parameters of zero=0 bit for bit at every step;
checkpoints hold the full optimizer state, so resume crosses zero=0/1 and rank counts."""

import json

import numpy as np
import pytest

from mpitrain import checkpoint
from mpitrain.sync.zero import Zero
from test_train import _job, _run, _trainer


def _pair(comm, optimizer, comm_keys=None, **train):
    plain = _trainer(comm, "ring", optimizer, comm_keys=comm_keys, **train)
    zero = _trainer(comm, "ring", optimizer, strategy=Zero, comm_keys=comm_keys, **train)
    for t in (plain, zero):  # the canonical clipping norm walks the model's tensors (train/control.py)
        t.run.policy.bind(t.run.model)
    return plain, zero


def _data(comm, steps, b=4):
    rng = np.random.default_rng(11 + comm.Get_rank())
    return rng.standard_normal((steps, b, 12)), rng.integers(0, 5, size=(steps, b))


@pytest.mark.mpi
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("buckets", [0, 8 * 40])
def test_zero1_is_bitwise_zero0_at_every_step(comm, optimizer, buckets):
    X, Y = _data(comm, 5)
    keys = {"bucket_bytes": buckets} if buckets else None
    plain, zero = _pair(comm, optimizer, keys)
    try:
        for k in range(5):
            plain.train_step((X[k], Y[k]))
            zero.train_step((X[k], Y[k]))
            plain.run.step = zero.run.step = k + 1
            assert zero.run.model.params.tobytes() == plain.run.model.params.tobytes(), f"step {k}"
    finally:
        plain.run.strategy.close()
        zero.run.strategy.close()
    p, n = comm.Get_size(), plain.run.model.params.size
    assert zero.run.strategy.sent_bytes == pytest.approx(plain.run.strategy.sent_bytes)
    per = 1 if optimizer == "sgd" else 2  # momentum | Adam's m and v, float64 here
    assert plain.run.optimizer_bytes() == per * 8 * n
    assert abs(zero.run.optimizer_bytes() - per * 8 * n / p) <= per * 8 * len(zero.run.strategy.mine) + 1e-9
    shards = comm.allgather(zero.run.strategy.mine)
    covered = sorted(x for s in shards for lo, hi in s for x in range(lo, hi))
    assert covered == list(range(n)), "the shards tile the parameters"


@pytest.mark.mpi
def test_zero1_with_norm_clipping_is_bitwise_too(comm):
    """The canonical norm from the shards (train/control.py shard_tensor_sums): the same bits as zero 0."""
    X, Y = _data(comm, 4)
    plain, zero = _pair(comm, "adam", clip_norm=0.05, clip_value=0.5)
    for k in range(4):
        plain.train_step((X[k], Y[k]))
        zero.train_step((X[k], Y[k]))
        plain.run.step = zero.run.step = k + 1
        assert zero.run.model.params.tobytes() == plain.run.model.params.tobytes(), f"step {k}"
    assert len(set(comm.allgather(zero.run.model.params.tobytes()))) == 1


@pytest.mark.mpi
def test_zero1_nonfinite_gradient_is_skipped_on_every_rank(comm):
    X, Y = _data(comm, 2)
    _, zero = _pair(comm, "sgd", nonfinite="skip")
    if comm.Get_rank() == comm.Get_size() - 1:
        X[0][0, 0] = np.nan
    before = zero.run.model.params.copy()
    loss, _ = zero.train_step((X[0], Y[0]))
    assert np.isnan(loss) and zero.run.policy.skipped == 1
    np.testing.assert_array_equal(zero.run.model.params, before)
    zero.run.step = 1
    zero.train_step((X[1], Y[1]))
    assert np.isfinite(zero.run.model.params).all()
    assert len(set(comm.allgather(zero.run.model.params.tobytes()))) == 1


@pytest.mark.mpi
def test_zero1_optimizer_state_round_trip(comm):
    X, Y = _data(comm, 3)
    plain, zero = _pair(comm, "adam")
    for k in range(3):
        plain.train_step((X[k], Y[k]))
        zero.train_step((X[k], Y[k]))
        plain.run.step = zero.run.step = k + 1
    full = zero.run.strategy.optimizer_state()  # gathered on rank 0, the layout of zero=0
    if comm.Get_rank() == 0:
        ref = plain.run.opt.state_dict()
        assert full["step"] == ref["step"] == 3
        for name in ("exp_avg", "exp_avg_sq"):
            assert full[name].tobytes() == ref[name].tobytes()
    full = comm.bcast(full, root=0)
    _, fresh = _pair(comm, "adam")
    fresh.run.strategy.load_optimizer_state({"optimizer": full, "path": "<test>"})
    assert fresh.run.opt.state_dict()["exp_avg"].tobytes() == zero.run.opt.state_dict()["exp_avg"].tobytes()


def test_zero1_trains_and_resumes_across_zero_and_rank_counts(tmp_path):
    job = _job(tmp_path, "--set", "train.epochs=2", "--set", "train.optimizer=adam", "--set", "train.lr=0.01")
    a, _ = _run(3, [*job, "--set", "train.zero=1", "--metrics-out", "a.json"], tmp_path)
    assert a.returncode == 0, a.stdout + a.stderr
    m = json.loads((tmp_path / "a.json").read_text())
    n = 64 * 128 + 128 + 128 * 10 + 10
    assert m["strategy"] == "ring+zero1" and m["test_accuracy"] > 0.85, m
    assert abs(m["optimizer_bytes_per_rank"] - 8 * n / 3) <= 8, m
    ck = checkpoint.latest(tmp_path / "ckpt")
    assert ck["optimizer"]["exp_avg"].shape == (n,), "the full optimizer state is in the checkpoint"
    for ranks, zero in ((2, 0), (4, 1)):  # zero=1 -> zero=0 on 2 ranks, -> zero=1 on 4 ranks
        b, _ = _run(ranks, [*job, "--set", "train.epochs=3", "--set", f"train.zero={zero}", "--resume",
                            "--metrics-out", "b.json"], tmp_path)
        assert b.returncode == 0 and "resumed from" in b.stdout, b.stdout + b.stderr
        mb = json.loads((tmp_path / "b.json").read_text())
        assert mb["test_accuracy"] > 0.85 and mb["epochs"] == 3, mb
        (tmp_path / "ckpt" / f"ckpt-{json.loads((tmp_path / 'b.json').read_text())['steps']:08d}.h5").unlink()


def test_a_shard_optimizer_decays_the_parts_of_the_decayed_tensors_it_holds():
    from types import SimpleNamespace

    from mpitrain import config
    from mpitrain.train import Run

    cfg = config.JobConfig()
    cfg.train.optimizer, cfg.train.weight_decay = "adamw", 0.1
    run = Run.__new__(Run)
    run.cfg, run.xp = cfg, np
    run.model = SimpleNamespace(n_params=20, decay_segments=lambda: [(2, 6), (10, 18)])
    whole = run.make_optimizer(np.zeros(20))
    assert whole.decay_segments == [(2, 6), (10, 18)]
    shard = run.make_optimizer(np.zeros(8), pieces=[(4, 8), (16, 20)])  # [4, 8) then [16, 20)
    assert shard.decay_segments == [(0, 2), (4, 6)]


# ----------------------------------------------------------------------------- algorithms without halves


def _algorithms():
    from mpitrain.config import CHOICES

    return CHOICES[("comm", "algorithm")]


def test_zero_runs_on_exactly_the_algorithms_with_halves():
    """The class: every comm.algorithm without a reduce-scatter / all-gather (scatter.ALGORITHMS) is refused
    with zero = 1, at validation, naming both keys; every one with them is accepted."""
    from mpitrain import config
    from mpitrain.collectives import scatter
    from mpitrain.runtime import UserError

    assert set(config.ZERO_ALGORITHMS) == set(scatter.ALGORITHMS)
    for alg in _algorithms():
        sets = ["train.zero=1", f"comm.algorithm={alg}"]
        if alg in scatter.ALGORITHMS:
            assert config.load(None, sets).comm.algorithm == alg
            continue
        with pytest.raises(UserError) as e:
            config.load(None, sets)
        msg = str(e.value)
        assert "train.zero = 1" in msg and f"comm.algorithm = {alg!r}" in msg and "\n" not in msg, msg
        assert config.load(None, [f"comm.algorithm={alg}"]).train.zero == 0  # zero = 0 still runs it


@pytest.mark.parametrize("alg", ["tree", "shm", "hier"])
def test_zero_strategy_refuses_an_algorithm_without_halves(alg):
    """Set up without config.validate (a program building the strategy itself): the same one line."""
    from mpitrain.config import JobConfig
    from mpitrain.runtime import UserError, get_comm

    cfg = JobConfig()
    cfg.train.zero, cfg.comm.algorithm = 1, alg
    with pytest.raises(UserError, match=f"train.zero = 1 .* comm.algorithm = '{alg}'"):
        Zero(cfg, get_comm())


@pytest.mark.parametrize("alg", ["tree", "shm", "hier"])
def test_zero_with_an_algorithm_without_halves_stops_before_training(tmp_path, alg):
    """A tiny training run at 2 ranks: one line naming both keys, exit 1, no traceback, no epoch."""
    from test_faults import failed_cleanly
    from test_user_errors import run
    from test_faults import PY, TINY
    from conftest import MPIRUN

    args = ["-m", "mpitrain", "--set", f"checkpoint.dir={tmp_path / 'c'}", "--set", f"data.path={tmp_path / 'd'}",
            *TINY, "--set", "train.zero=1", "--set", f"comm.algorithm={alg}"]
    job = run([MPIRUN, "-n", "2", PY, *args], tmp_path)
    failed_cleanly(job, "train.zero = 1", f"comm.algorithm = '{alg}'", rank=0)
    assert job.rc == 1 and "epoch" not in job.out, job
