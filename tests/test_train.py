"""Training: the distributed step equals the big-batch step; end-to-end runs, resume, checkpoints."""

import json
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import MPIRUN
from mpitrain import checkpoint, config, sync
from mpitrain.models import MLP
from mpitrain.train import Loop, Run


def _trainer(comm, algorithm="ring", optimizer="sgd", strategy=None, comm_keys=None, **train):
    """The loop of a run on a small float64 MLP (no data set): ``train_step((x, y))`` and its ``run``
    (model, strategy, opt, step). ``train`` sets [train] keys, ``comm_keys`` [comm] keys, before it
    is made; ``strategy`` (a sync class) replaces the one the keys select. The reference for
    one process: ``ref.run.model.loss_and_grad((x, y))`` then ``ref.run.opt.step(grads, 0.1)``."""
    cfg = config.JobConfig()
    cfg.comm.algorithm = algorithm
    cfg.train.optimizer = optimizer
    cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay = 0.1, 0.9, 1e-3
    for k, v in train.items():
        setattr(cfg.train, k, v)
    for k, v in (comm_keys or {}).items():
        setattr(cfg.comm, k, v)
    run = Run(cfg, comm)
    run.xp = np
    run.model = MLP(12, [9, 7], 5, xp=np, dtype=np.float64, seed=3)
    run.steps_per_epoch = run.total_steps = 1
    run.strategy = (strategy or sync.select(cfg))(cfg, comm)
    run.strategy.bind(run)  # the optimizer (train.optimizer, lr 0.1, momentum 0.9, wd 1e-3), a constant rate
    return Loop(run)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "tree", "native"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_n_ranks_match_one_rank_with_n_times_the_batch(comm, algorithm, optimizer):
    r, p, b, steps = comm.Get_rank(), comm.Get_size(), 6, 5
    rng = np.random.default_rng(42)  # the same global data on every rank
    X = rng.standard_normal((steps, p * b, 12))
    Y = rng.integers(0, 5, size=(steps, p * b))
    dist, ref = _trainer(comm, algorithm, optimizer), _trainer(comm, algorithm, optimizer)
    for k in range(steps):
        dist.train_step((X[k, r * b:(r + 1) * b], Y[k, r * b:(r + 1) * b]))
        ref.run.model.loss_and_grad((X[k], Y[k]))  # one process, batch p*b, no communication
        ref.run.opt.step(ref.run.model.grads, 0.1)
        dist.run.step = ref.run.step = k + 1
    np.testing.assert_allclose(dist.run.model.params, ref.run.model.params, rtol=1e-10, atol=1e-12)
    assert not np.allclose(dist.run.model.params, _trainer(comm, algorithm).run.model.params), "nothing trained"
    digests = comm.allgather(dist.run.model.params.tobytes())
    assert all(d == digests[0] for d in digests), "replicas differ"


def _run(n, args, tmp_path, env=None, timeout=240):
    cmd = [MPIRUN, "-n", str(n), sys.executable, "-m", "mpitrain", *args]
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=timeout)
    return p, time.perf_counter() - t0


def _job(tmp_path, *extra):
    return ["--set", f"data.path={tmp_path / 'digits'}", "--set", "data.dataset=digits", "--set", f"checkpoint.dir={tmp_path / 'ckpt'}", *extra]


def test_default_job_on_two_ranks_reaches_96_percent(tmp_path):
    out = tmp_path / "m.json"
    p, wall = _run(2, ["--metrics-out", str(out), *_job(tmp_path)], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    m = json.loads(out.read_text())
    print(f"default job, 2 ranks: {wall:.1f} s wall, test accuracy {m['test_accuracy']:.4f}")
    assert m["ranks"] == 2 and m["epochs"] == 20 and m["steps"] > 0
    assert m["test_accuracy"] >= 0.96, m
    assert 0 < m["comm_fraction"] < 1 and m["samples_per_s"] > 0
    epoch_lines = [ln for ln in p.stdout.splitlines() if ln.startswith("epoch")]
    assert len(epoch_lines) == 20, "one line per epoch, printed by rank 0 only"
    assert checkpoint.list_checkpoints(tmp_path / "ckpt"), "checkpoints written"


def test_three_ranks_with_tree_trains(tmp_path):
    out = tmp_path / "m.json"
    p, _ = _run(3, ["--metrics-out", str(out), *_job(tmp_path, "--set", "comm.algorithm=tree",
                                                       "--set", "train.epochs=6", "--set", "checkpoint.every=0")],
                tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    m = json.loads(out.read_text())
    assert m["ranks"] == 3 and m["test_accuracy"] >= 0.9, m


def _final_params(d):
    ck = checkpoint.latest(d)
    return ck["params"], ck["step"]


STRATEGY_KEYS = {"sync": [], "fp16": ["comm.compress=\"fp16\""],
                 "topk": ["comm.compress=\"topk\"", "comm.topk_ratio=0.05"],
                 "sign": ["comm.compress=\"sign\""], "local4": ["train.sync_every=4"],
                 "zero1": ["train.zero=1", "train.optimizer=\"adam\"", "train.lr=0.003"]}


@pytest.mark.parametrize("strategy,stop", [("sync", "kill"), ("sync", "usr1"), ("fp16", "usr1"), ("topk", "usr1"),
                                           ("topk", "kill"), ("sign", "usr1"), ("local4", "usr1"),
                                           ("zero1", "usr1")])
def test_resumed_run_is_bitwise_identical(tmp_path, strategy, stop):
    """Uninterrupted vs. stopped mid-epoch-3 (killed, or SIGUSR1 -> checkpoint) and resumed, for every
    strategy: its own state (error-feedback residuals of every rank, local steps) is in the checkpoint."""
    common = ["--set", "train.epochs=4", "--set", "model.hidden=[32]", "--set", f"data.path={tmp_path / 'd'}",
              "--set", "data.dataset=digits"]
    for k in STRATEGY_KEYS[strategy]:
        common += ["--set", k]
    a, _ = _run(2, [*common, "--set", f"checkpoint.dir={tmp_path / 'a'}"], tmp_path)
    assert a.returncode == 0, a.stderr
    b, _ = _run(2, [*common, "--set", f"checkpoint.dir={tmp_path / 'b'}"], tmp_path,
                env={"MPITRAIN_FAULT": f"0:55:{stop}"})
    if stop == "kill":
        assert b.returncode != 0
    else:
        assert b.returncode == 75, b.stdout + b.stderr
        assert "stopped by signal SIGUSR1" in b.stdout
    if strategy in ("topk", "sign"):
        ck = checkpoint.latest(tmp_path / "b")
        res = ck["strategy"]["residual"]
        assert res.shape == (2, ck["params"].size) and np.abs(res).sum() > 0, "every rank's residual is saved"
    c, _ = _run(2, [*common, "--set", f"checkpoint.dir={tmp_path / 'b'}", "--resume"], tmp_path)
    assert c.returncode == 0, c.stdout + c.stderr
    assert "resumed from" in c.stdout
    pa, sa = _final_params(tmp_path / "a")
    pb, sb = _final_params(tmp_path / "b")
    assert sa == sb
    assert pa.tobytes() == pb.tobytes(), f"{strategy}: resumed run differs from the uninterrupted one"


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    params = np.arange(10, dtype=np.float32)
    opt = {"step": 3, "momentum": np.ones(10, dtype=np.float32)}
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, params=params + step, optimizer=opt, step=step, epoch=step // 10,
                        step_in_epoch=0, config={"a": 1}, ranks=2, keep=3)
    files = checkpoint.list_checkpoints(tmp_path)
    assert [f.name for f in files] == ["ckpt-00000040.h5", "ckpt-00000030.h5", "ckpt-00000020.h5"]
    ck = checkpoint.latest(tmp_path)
    assert ck["step"] == 40 and (ck["params"] == params + 40).all() and ck["optimizer"]["step"] == 3
    with h5py.File(files[0], "r+") as f:  # flip a value: the checksum must catch it
        f["params"][0] = 123
    ck = checkpoint.latest(tmp_path)
    assert ck["step"] == 30
    files[1].write_bytes(b"garbage")  # truncated / not HDF5
    assert checkpoint.latest(tmp_path)["step"] == 20


def test_unknown_job_key_is_a_clear_error(tmp_path):
    p, _ = _run(2, ["--set", "train.learning_rate=0.1"], tmp_path, timeout=60)
    assert p.returncode != 0
    assert "unknown key train.learning_rate" in p.stderr and "[rank " in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("overlap", ["progress", "thread"])
@pytest.mark.parametrize("algorithm", ["ring", "tree", "native"])
def test_bucketed_overlap_matches_one_allreduce(comm, algorithm, overlap):
    r, p, b = comm.Get_rank(), comm.Get_size(), 4
    rng = np.random.default_rng(7)
    X, Y = rng.standard_normal((4, p * b, 12)), rng.integers(0, 5, size=(4, p * b))
    plain = _trainer(comm, algorithm)
    # several buckets per step, cut inside layers' ranges
    buck = _trainer(comm, algorithm, comm_keys={"bucket_bytes": 8 * 40, "overlap": overlap})
    try:
        for k in range(4):
            plain.train_step((X[k, r * b:(r + 1) * b], Y[k, r * b:(r + 1) * b]))
            buck.train_step((X[k, r * b:(r + 1) * b], Y[k, r * b:(r + 1) * b]))
            buck.run.step = plain.run.step = k + 1
    finally:
        buck.run.strategy.close()
    np.testing.assert_allclose(buck.run.model.params, plain.run.model.params, rtol=1e-12, atol=1e-12)
    assert len(set(comm.allgather(buck.run.model.params.tobytes()))) == 1
    assert buck.run.strategy.sent_bytes == plain.run.strategy.sent_bytes > (0 if comm.Get_size() > 1 else -1)


@pytest.mark.parametrize("mode", ["sync", "ps"])
def test_resuming_a_finished_run_reports_it_and_its_final_metrics(tmp_path, mode):
    job = _job(tmp_path, "--set", "train.epochs=2", "--set", "model.hidden=[16]")
    if mode == "ps":
        job += ["--set", 'comm.mode="ps"']
    a, _ = _run(2, [*job, "--metrics-out", "a.json"], tmp_path)
    assert a.returncode == 0, a.stdout + a.stderr
    b, _ = _run(2, [*job, "--resume", "--metrics-out", "b.json"], tmp_path)
    assert b.returncode == 0, b.stdout + b.stderr
    assert "is already complete" in b.stdout and " nan" not in b.stdout, b.stdout
    assert not [ln for ln in b.stdout.splitlines() if ln.startswith("epoch")], "no invented epoch line"
    ma, mb = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))  # valid JSON (no NaN)
    assert mb["test_accuracy"] == pytest.approx(ma["test_accuracy"]) and mb["steps"] == ma["steps"]


def test_a_new_run_sets_aside_another_runs_checkpoints(tmp_path):
    first = _job(tmp_path, "--set", "train.epochs=2", "--set", "model.hidden=[16]")
    a, _ = _run(2, first, tmp_path)
    assert a.returncode == 0, a.stdout + a.stderr
    owner_a = checkpoint.owner(tmp_path / "ckpt")["run_id"]
    second = _job(tmp_path, "--set", "train.epochs=1", "--set", "model.hidden=[8]")
    b, _ = _run(2, second, tmp_path)
    assert b.returncode == 0, b.stdout + b.stderr
    assert "held the checkpoints of another run" in b.stdout, b.stdout
    prev = list((tmp_path / "ckpt").glob(f"previous-{owner_a}-1/ckpt-*.h5"))
    assert len(prev) == 2, "the first run's checkpoints are kept, apart"
    mine = checkpoint.list_checkpoints(tmp_path / "ckpt")
    assert [checkpoint.load(p)["run_id"] for p in mine] == [checkpoint.owner(tmp_path / "ckpt")["run_id"]]
    c, _ = _run(2, [*second, "--resume"], tmp_path)  # resumes its own run, not the other one
    assert c.returncode == 0 and "already complete (1/1 epochs)" in c.stdout, c.stdout + c.stderr
    d, _ = _run(2, [*first, "--set", f"checkpoint.dir={prev[0].parent}", "--resume"], tmp_path)
    assert d.returncode == 0 and "already complete (2/2 epochs)" in d.stdout, d.stdout + d.stderr


def test_a_run_whose_directory_was_taken_over_stops_with_a_message(tmp_path):
    slow = [*_job(tmp_path, "--set", "train.epochs=2", "--set", "model.hidden=[8]"), "--set", "train.step_sleep=0.3"]
    cmd = [MPIRUN, "-n", "2", sys.executable, "-m", "mpitrain", *slow]
    a = subprocess.Popen(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        for line in a.stdout:  # the first epoch is done and checkpointed
            if line.startswith("epoch"):
                break
        b, _ = _run(2, _job(tmp_path, "--set", "train.epochs=1", "--set", "model.hidden=[8]"), tmp_path)
        out, err = a.communicate(timeout=120)
    finally:
        a.kill()
    assert b.returncode == 0, b.stdout + b.stderr
    assert a.returncode != 0 and "now belongs to another run" in err, out + err


def test_owner_check_unit(tmp_path):
    checkpoint.claim(tmp_path, "abc", "d1")
    checkpoint.check_owner(tmp_path, "abc")
    checkpoint.claim(tmp_path, "xyz", "d2")
    with pytest.raises(config.UserError, match="now belongs to another run"):
        checkpoint.check_owner(tmp_path, "abc")


def test_output_paths_are_checked_before_training(tmp_path):
    for flag in ("--metrics-out", "--trace"):
        p, wall = _run(2, [*_job(tmp_path), flag, "/proc/no/such/dir/m.json"], tmp_path, timeout=60)
        assert p.returncode != 0 and f"{flag} /proc/no/such/dir/m.json: cannot write there" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr and "epoch" not in p.stdout, "failed before the first epoch"


def test_resume_after_changing_the_optimizer_is_a_clear_error(tmp_path):
    job = _job(tmp_path, "--set", "train.epochs=1", "--set", "model.hidden=[8]")
    a, _ = _run(2, job, tmp_path)
    assert a.returncode == 0, a.stderr
    b, _ = _run(2, [*job, "--set", "train.epochs=2", "--set", "train.optimizer=adam", "--resume"], tmp_path)
    assert b.returncode != 0 and "does not fit train.optimizer='adam'" in b.stderr, b.stdout + b.stderr
    assert "Traceback" not in b.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("buckets", [0, 8 * 40])
def test_gradients_reduce_on_plans_bound_once_and_rebound_to_a_new_buffer(comm, buckets):
    """The all-reduce strategy makes one persistent plan per bucket on the first step and reuses it; a new
    gradient buffer gets new plans (the old ones freed); close() frees them."""
    from mpitrain.collectives.plan import AllreducePlan
    r, p, b = comm.Get_rank(), comm.Get_size(), 4
    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((3, p * b, 12)), rng.integers(0, 5, size=(3, p * b))
    keys = {"bucket_bytes": buckets} if buckets else None
    plain, planned = _trainer(comm, "ring"), _trainer(comm, "ring", comm_keys=keys)
    s, grads = planned.run.strategy, planned.run.model.grads
    first = None  # the plans of the first step
    try:
        for k in range(3):
            for t in (plain, planned):
                t.train_step((X[k, r * b:(r + 1) * b], Y[k, r * b:(r + 1) * b]))
            planned.run.step = plain.run.step = k + 1
            assert s._plan_buf is grads and len(s._plans) == len(s.cuts(grads.size)) > (1 if buckets else 0)
            assert all(isinstance(h, AllreducePlan) for h in s._plans)
            first = first or list(s._plans)
            assert s._plans == first, "the same plans every step"
        np.testing.assert_allclose(planned.run.model.params, plain.run.model.params, rtol=1e-12, atol=1e-12)
        other = np.arange(grads.size, dtype=grads.dtype) * (r + 1)
        for h in s.plans_for(other):
            h.start().wait()
        assert all(h.freed for h in first) and s._plan_buf is other
        np.testing.assert_allclose(other, np.arange(grads.size) * (p + 1) / 2)
    finally:
        s.close()
    assert not s._plans
